use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{BoxError, Service};

use super::service::{Asking, Decision, Reporting, Shared};
use super::waitlist::Ticket;
use crate::concurrency::{line_of, Sample, SeatLoan};
use crate::Error;

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit): waits its
    /// turn for a token from the request's bucket, sends the request, and
    /// applies any cool-down its response asks for.
    ///
    /// Cancel-safe: a request that finds a token at once, with nobody
    /// waiting ahead on its key, takes it and is sent in `call` (as
    /// `tower::limit::RateLimit` spends its permit there); any other takes
    /// its token in the same poll that sends it, so a future dropped while
    /// waiting has spent nothing, and its place in line goes to the next
    /// request.
    pub struct ResponseFuture<S, B, K>
    where
        S: Service<Request<B>>,
        K: Hash,
        K: Eq,
        K: Clone,
    {
        #[pin]
        state: State<S::Future, S::Response>,
        // What a request that waits for its token needs, boxed: most
        // requests are sent from `call` and carry none of it (a future
        // moved by value through three layers is copied each time).
        waiting: Option<Box<Waiting<S, B, K>>>,
        key: K,
        // When the request was sent (ns, the buckets' clock; and the store's,
        // if the store admitted it), to tell which throttling episode its
        // response belongs to.
        sent_at: u64,
        fleet_at: FleetAt,
        shared: Arc<Shared<K>>,
    }
}

/// A request that has not been sent: its service and itself, and its hold
/// on a place in line and on its gate slot while it waits.
struct Waiting<S, B, K: Hash + Eq + Clone> {
    // The ready service and the request, until the request is sent.
    pending: Option<(S, Request<B>)>,
    // The request's place in its connection's line, while it waits.
    ticket: Option<Ticket<K>>,
    // The gate slot this request lent back while it waits for a token
    // (see `crate::concurrency::seat`); it must be seated to be sent.
    loan: Option<SeatLoan>,
    // The sleep until the bucket's next token, kept for the next wait.
    sleep: Option<Pin<Box<Sleep>>>,
    // When the request arrived (ns, the buckets' clock), for the token
    // wait it publishes.
    #[cfg(feature = "metrics")]
    arrived: u64,
}

pin_project! {
    #[project = StateProj]
    enum State<F, R> {
        // First look: straight to the bucket if no one waits on the key.
        Arriving,
        // In line: waiting to be first, then trying the bucket.
        InLine,
        // First in line, sleeping until the bucket's next token.
        Sleeping,
        // The head of the line, waiting for the fleet's store to decide.
        Asking { asking: Asking },
        // The request is with the inner service.
        Called { #[pin] future: F },
        // The response throttled: telling the fleet before handing it on.
        Reporting { reporting: Reporting, held: Option<R> },
    }
}

impl<S, B, K> ResponseFuture<S, B, K>
where
    S: Service<Request<B>>,
    K: Hash + Eq + Clone,
{
    /// A request that must go through the bucket (and perhaps a line)
    /// before it is sent on `service`.
    pub(super) fn waiting(service: S, request: Request<B>, key: K, shared: Arc<Shared<K>>) -> Self {
        ResponseFuture {
            state: State::Arriving,
            waiting: Some(Box::new(Waiting {
                pending: Some((service, request)),
                ticket: None,
                loan: None,
                sleep: None,
                #[cfg(feature = "metrics")]
                arrived: shared.buckets.as_ref().map_or(0, |buckets| buckets.now()),
            })),
            key,
            sent_at: 0,
            fleet_at: FleetAt::default(),
            shared,
        }
    }

    /// A request sent from `call` at `sent_at`, its token taken.
    pub(super) fn called(future: S::Future, key: K, sent_at: u64, shared: Arc<Shared<K>>) -> Self {
        ResponseFuture {
            state: State::Called { future },
            waiting: None,
            key,
            sent_at,
            fleet_at: FleetAt::default(),
            shared,
        }
    }
}

impl<S, B, R, K> Future for ResponseFuture<S, B, K>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
{
    type Output = Result<Response<R>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let buckets = match &this.shared.buckets {
            Ok(buckets) => buckets,
            Err(invalid) => return Poll::Ready(Err(invalid.clone().into())),
        };
        loop {
            let decided = match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    let result = ready!(future.poll(cx)).map_err(Into::into);
                    if let Some(gate) = &this.shared.sampler {
                        sample(gate, buckets.now().saturating_sub(*this.sent_at), &result);
                    }
                    if let Ok(response) = &result {
                        let reporting = this.shared.cool_down_on(
                            this.key,
                            *this.sent_at,
                            fleet_at(this.fleet_at),
                            response.status(),
                            response.headers(),
                        );
                        if let Some(reporting) = reporting {
                            let held = result.ok();
                            this.state.set(State::Reporting { reporting, held });
                            continue;
                        }
                    }
                    return Poll::Ready(result);
                }
                StateProj::Reporting { reporting, held } => {
                    ready!(poll_reporting(reporting, cx));
                    let response = held
                        .take()
                        .expect("a throttling response is held while reporting");
                    return Poll::Ready(Ok(response));
                }
                StateProj::Sleeping => {
                    let waiting = waiting(this.waiting);
                    let sleep = waiting
                        .sleep
                        .as_mut()
                        .expect("a sleeping request has a sleep");
                    if sleep.as_mut().poll(cx).is_pending() {
                        lend_slot(&mut waiting.loan, this.key, cx);
                        return Poll::Pending;
                    }
                    this.state.set(State::InLine);
                    continue;
                }
                StateProj::Asking { asking } => Some(ready!(poll_asking(asking, cx))),
                StateProj::InLine => {
                    let waiting = waiting(this.waiting);
                    let ticket = waiting
                        .ticket
                        .as_ref()
                        .expect("a request in line has a ticket");
                    if ticket.poll_head(cx).is_pending() {
                        lend_slot(&mut waiting.loan, this.key, cx);
                        return Poll::Pending;
                    }
                    None
                }
                StateProj::Arriving => {
                    // With a store, every request takes its place in line
                    // first, so a process asks the store once at a time per
                    // connection; without, only when others already wait.
                    if this.shared.holds_line() || this.shared.waitlists.has_waiters(this.key) {
                        let (ticket, ahead) = this.shared.waitlists.join(this.key);
                        let waiting = waiting(this.waiting);
                        waiting.ticket = Some(ticket);
                        if ahead == 0 {
                            // First in line: straight to the bucket.
                            this.state.set(State::InLine);
                            continue;
                        }
                        let now = buckets.now();
                        let wait = this.shared.wait_behind(buckets, this.key, now, ahead);
                        if let Some(refusal) = refuse(this.shared.max_wait, wait, this.key) {
                            waiting.ticket = None;
                            return Poll::Ready(Err(refusal));
                        }
                        tracing::debug!(
                            target: "tollgate::rate_limit",
                            key = ?this.key,
                            ahead,
                            "waiting in line for a token"
                        );
                        this.state.set(State::InLine);
                        continue;
                    }
                    None
                }
            };
            let waiting = waiting(this.waiting);
            // Nobody is ahead of this request: take back the slot it lent
            // (if it did), then try the bucket.
            if decided.is_none() {
                if waiting.loan.is_none() {
                    waiting.loan = SeatLoan::adopt_orphan();
                }
                if let Some(loan) = &waiting.loan {
                    ready!(loan.poll_seated(cx));
                }
            }
            let now = buckets.now();
            let decision = match decided {
                Some(decision) => decision,
                None => match this.shared.decide(buckets, this.key, now) {
                    Ok(decision) => decision,
                    Err(asking) => {
                        // Hold the line while the store decides, so the
                        // process asks once at a time per connection.
                        if waiting.ticket.is_none() {
                            waiting.ticket = Some(this.shared.waitlists.join(this.key).0);
                        }
                        this.state.set(State::Asking { asking });
                        continue;
                    }
                },
            };
            match decision {
                Decision::Admitted { fleet_at } => {
                    *this.sent_at = now;
                    *this.fleet_at = into_fleet_at(fleet_at);
                    this.shared.figures.admitted.fetch_add(1, Ordering::Relaxed);
                    #[cfg(feature = "metrics")]
                    this.shared.publisher.token_wait(
                        this.key,
                        Duration::from_nanos(now.saturating_sub(waiting.arrived)),
                    );
                    let (mut service, request) = waiting
                        .pending
                        .take()
                        .expect("the request is sent once, from this state only");
                    // Leaving the line wakes the next request in it. The
                    // loan goes too: the gate future, holding the slot, gives
                    // it back when the response is here.
                    *this.waiting = None;
                    let future = service.call(request);
                    this.state.set(State::Called { future });
                }
                Decision::Wait(wait) => {
                    if let Some(refusal) = refuse(this.shared.max_wait, wait, this.key) {
                        waiting.ticket = None;
                        return Poll::Ready(Err(refusal));
                    }
                    if waiting.ticket.is_none() {
                        let (ticket, _) = this.shared.waitlists.join(this.key);
                        waiting.ticket = Some(ticket);
                        tracing::debug!(
                            target: "tollgate::rate_limit",
                            key = ?this.key,
                            wait = ?Duration::from_nanos(wait),
                            "waiting for a token"
                        );
                    }
                    crate::timer::rearm(&mut waiting.sleep, Duration::from_nanos(wait));
                    this.state.set(State::Sleeping);
                }
            }
        }
    }
}

/// The hold of a request not yet sent.
fn waiting<S, B, K: Hash + Eq + Clone>(
    waiting: &mut Option<Box<Waiting<S, B, K>>>,
) -> &mut Waiting<S, B, K> {
    waiting
        .as_deref_mut()
        .expect("a request not yet sent holds its waiting state")
}

/// Tells the adaptive gate outside how an attempt sent `took` ns ago
/// ended (see [`Sample::of_answer`]; an error is overload).
fn sample<R>(gate: &crate::concurrency::Gate, took: u64, result: &Result<Response<R>, BoxError>) {
    let sample = match result {
        Err(_) => Some(Sample::Overloaded),
        Ok(response) => Sample::of_answer(
            response.status(),
            response.headers().contains_key(http::header::RETRY_AFTER),
            Duration::from_nanos(took),
        ),
    };
    if let Some(sample) = sample {
        gate.sample(sample);
    }
}

/// Lends the request's gate slot while it waits for a token on `key`, so
/// that a request of another connection can use it. Called on every poll
/// that leaves the request waiting: a lend refused for want of a waiting
/// place is tried again when the gate wakes the request.
fn lend_slot<K: Hash>(loan: &mut Option<SeatLoan>, key: &K, cx: &Context<'_>) {
    match loan {
        Some(loan) => loan.lend(cx),
        None => *loan = SeatLoan::lend_seat(line_of(key), cx),
    }
}

/// When the store admitted the request (ns of its clock); nothing to keep
/// without the feature.
#[cfg(feature = "redis")]
type FleetAt = Option<u64>;
#[cfg(not(feature = "redis"))]
type FleetAt = ();

#[cfg(feature = "redis")]
fn fleet_at(at: &FleetAt) -> Option<u64> {
    *at
}

#[cfg(not(feature = "redis"))]
fn fleet_at(_: &FleetAt) -> Option<u64> {
    None
}

#[cfg(feature = "redis")]
fn into_fleet_at(at: Option<u64>) -> FleetAt {
    at
}

#[cfg(not(feature = "redis"))]
fn into_fleet_at(_: Option<u64>) -> FleetAt {}

#[cfg(feature = "redis")]
fn poll_asking(asking: &mut Asking, cx: &mut Context<'_>) -> Poll<Decision> {
    asking.as_mut().poll(cx)
}

#[cfg(not(feature = "redis"))]
fn poll_asking(asking: &mut Asking, _: &mut Context<'_>) -> Poll<Decision> {
    match *asking {}
}

#[cfg(feature = "redis")]
fn poll_reporting(reporting: &mut Reporting, cx: &mut Context<'_>) -> Poll<()> {
    reporting.as_mut().poll(cx)
}

#[cfg(not(feature = "redis"))]
fn poll_reporting(reporting: &mut Reporting, _: &mut Context<'_>) -> Poll<()> {
    match *reporting {}
}

/// `Error::RateLimited` if `wait` nanoseconds is more than `max_wait`.
fn refuse<K: fmt::Debug>(max_wait: Option<Duration>, wait: u64, key: &K) -> Option<BoxError> {
    let wait = Duration::from_nanos(wait);
    if max_wait.is_some_and(|limit| wait > limit) {
        tracing::debug!(
            target: "tollgate::rate_limit",
            ?key,
            ?wait,
            "refused: the token is further away than max_wait"
        );
        return Some(Error::RateLimited { retry_after: wait }.into());
    }
    None
}

impl<S, B, K> fmt::Debug for ResponseFuture<S, B, K>
where
    S: Service<Request<B>>,
    K: Hash + Eq + Clone + fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("key", &self.key)
            .field("sent", &self.waiting.is_none())
            .finish_non_exhaustive()
    }
}
