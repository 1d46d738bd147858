use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use http::{Method, Request, Response};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{BoxError, Service};

use super::backoff::Delays;
use super::budget::Ledger;
use super::replay::with_replay;
use super::service::Shared;
use super::{retry_after, Classify, Outcome, ReplayBody};

pin_project! {
    /// The response future of [`Retry`](super::Retry): a state machine
    /// through attempts and the sleeps between them.
    ///
    /// Cancel-safe: dropping it at any point drops the attempt in flight or
    /// the sleep, and holds nothing else.
    pub struct ResponseFuture<S, B, C>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        // A clone of the inner service, polled ready before each retry.
        service: S,
        // The copy of the request the next retry sends; `None` once the
        // body cannot be replayed or no retry is left.
        replay: Option<Request<B>>,
        method: Method,
        schedule: Schedule,
        // The sleep before the next retry, kept for the one after.
        sleep: Option<Pin<Box<Sleep>>>,
        // The attempt in flight, 1 for the first try.
        attempt: u32,
        // When the deadline runs out; the clock is read only if one is set.
        deadline: Option<Instant>,
        shared: Arc<Shared<C>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // An attempt is in flight.
        Called { #[pin] future: F },
        // Waiting out the delay before the next attempt.
        Sleeping,
        // Waiting for the inner service to be ready for the next attempt.
        Readying,
    }
}

impl<S, B, C> ResponseFuture<S, B, C>
where
    S: Service<Request<B>>,
{
    pub(super) fn new(
        first: S::Future,
        service: S,
        replay: Option<Request<B>>,
        method: Method,
        number: Option<u64>,
        shared: Arc<Shared<C>>,
    ) -> Self {
        ResponseFuture {
            state: State::Called { future: first },
            service,
            replay,
            method,
            schedule: Schedule::Undrawn { number },
            sleep: None,
            attempt: 1,
            deadline: shared
                .config
                .deadline
                .and_then(|budget| Instant::now().checked_add(budget)),
            shared,
        }
    }
}

/// A request's retry delays: drawn when its first retry is due, so that
/// the many requests that never retry carry a number (or, without a seed,
/// not even that: see `Retry::call`), not a schedule.
#[derive(Debug)]
enum Schedule {
    /// The request's number, its jitter stream; drawn with the schedule
    /// when the backoff has no seed.
    Undrawn {
        number: Option<u64>,
    },
    // Boxed: few requests retry, and the future is moved by value.
    Drawn(Box<Delays>),
}

impl Schedule {
    /// The delays, drawn now if they were not.
    fn delays<C>(&mut self, shared: &Shared<C>) -> &mut Delays {
        if let Schedule::Undrawn { number } = *self {
            let number = number.unwrap_or_else(|| shared.requests.fetch_add(1, Ordering::Relaxed));
            let delays = shared
                .config
                .backoff
                .stream_for_request(number, shared.unseeded_key);
            *self = Schedule::Drawn(Box::new(delays));
        }
        match self {
            Schedule::Drawn(delays) => delays,
            Schedule::Undrawn { .. } => unreachable!("drawn above"),
        }
    }

    /// Whether a retry is left.
    fn any_left<C>(&self, shared: &Shared<C>) -> bool {
        match self {
            Schedule::Undrawn { .. } => shared.config.backoff.retries() > 0,
            Schedule::Drawn(delays) => delays.len() > 0,
        }
    }
}

/// Why the attempt that just ended will not be retried.
#[derive(Debug, Clone, Copy)]
enum Stop {
    NotRetryable,
    NotReplayable,
    RetriesSpent,
    RetryAfterTooLong,
    PastDeadline,
    BudgetSpent,
}

impl Stop {
    /// The `reason` label of a retryable outcome returned (an outcome not
    /// retryable at all is the usual end, and not counted).
    #[cfg(feature = "metrics")]
    fn gave_up(self) -> Option<&'static str> {
        Some(match self {
            Stop::NotRetryable => return None,
            Stop::NotReplayable => "not_replayable",
            Stop::RetriesSpent => "retries_spent",
            Stop::RetryAfterTooLong => "retry_after_too_long",
            Stop::PastDeadline => "past_deadline",
            Stop::BudgetSpent => "budget_spent",
        })
    }
}

impl<S, B, R, C> Future for ResponseFuture<S, B, C>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    B: ReplayBody,
    C: Classify,
{
    type Output = Result<Response<R>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    let result = ready!(future.poll(cx)).map_err(Into::into);
                    let config = &this.shared.config;
                    let outcome = match &result {
                        Ok(response) => Outcome::Response {
                            status: response.status(),
                            headers: response.headers(),
                        },
                        Err(error) => Outcome::Error(&**error),
                    };
                    let stop = if !config.classify.is_retryable(this.method, &outcome) {
                        Err(Stop::NotRetryable)
                    } else if this.replay.is_none() {
                        Err(if !this.schedule.any_left(this.shared) {
                            Stop::RetriesSpent
                        } else {
                            Stop::NotReplayable
                        })
                    } else {
                        // Alone for the first two retries: a request
                        // throttled a third time is not held by its
                        // connection's pace, and waits the larger.
                        next_delay(
                            this.schedule.delays(this.shared),
                            &outcome,
                            config.max_retry_after,
                            config.retry_after_alone && *this.attempt <= 2,
                        )
                        .and_then(|delays| within(*this.deadline, delays))
                        // Last: only a retry that would otherwise go spends.
                        .and_then(|delays| spend(this.shared.budget.as_ref(), delays))
                    };
                    let (delay, policy, server) = match stop {
                        Ok(delays) => delays,
                        Err(reason) => {
                            tracing::debug!(target: "tollgate::retry", attempt = *this.attempt, ?reason, "returning the outcome");
                            #[cfg(feature = "metrics")]
                            if let Some(reason) = reason.gave_up() {
                                this.shared.publisher.gave_up(reason);
                            }
                            return Poll::Ready(result);
                        }
                    };
                    *this.attempt += 1;
                    #[cfg(feature = "metrics")]
                    this.shared.publisher.retry(
                        match &outcome {
                            Outcome::Response { status, .. } => status.as_str().to_owned().into(),
                            Outcome::Error(_) => "error".into(),
                        },
                        delay,
                    );
                    match &outcome {
                        Outcome::Response { status, .. } => tracing::debug!(
                            target: "tollgate::retry",
                            attempt = *this.attempt,
                            ?delay,
                            policy_delay = ?policy,
                            retry_after = ?server,
                            status = status.as_u16(),
                            "retrying"
                        ),
                        Outcome::Error(error) => tracing::debug!(
                            target: "tollgate::retry",
                            attempt = *this.attempt,
                            ?delay,
                            policy_delay = ?policy,
                            error = %error,
                            "retrying"
                        ),
                    }
                    // Drop the response (and the connection it may hold)
                    // before sleeping.
                    drop(result);
                    if delay.is_zero() {
                        this.state.set(State::Readying);
                    } else {
                        crate::timer::rearm(this.sleep, delay);
                        this.state.set(State::Sleeping);
                    }
                }
                StateProj::Sleeping => {
                    let sleep = this.sleep.as_mut().expect("a sleeping retry has its sleep");
                    ready!(sleep.as_mut().poll(cx));
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
                    ready!(this.service.poll_ready(cx)).map_err(Into::into)?;
                    let mut request = this
                        .replay
                        .take()
                        .expect("a retry is scheduled only with a replay copy in hand");
                    if this.schedule.any_left(this.shared) {
                        (request, *this.replay) = with_replay(request);
                    }
                    let future = this.service.call(request);
                    this.state.set(State::Called { future });
                }
            }
        }
    }
}

/// `(delay, policy delay, server's Retry-After)` for the next retry.
type Delay = (Duration, Duration, Option<Duration>);

/// The wait before the next retry: `max(policy, Retry-After)`, or the
/// `Retry-After` alone if `alone` and it is not zero.
fn next_delay(
    delays: &mut Delays,
    outcome: &Outcome<'_>,
    max_retry_after: Duration,
    alone: bool,
) -> Result<Delay, Stop> {
    let policy = delays.next().ok_or(Stop::RetriesSpent)?;
    let server = match outcome {
        Outcome::Response { headers, .. } => retry_after::parse(headers, SystemTime::now()),
        Outcome::Error(_) => None,
    };
    match server {
        Some(asked) if asked > max_retry_after => {
            tracing::debug!(target: "tollgate::retry", retry_after = ?asked, ?max_retry_after, "server asked for longer than max_retry_after");
            Err(Stop::RetryAfterTooLong)
        }
        // A zero wait (`Retry-After: 0`, a date already past) spaces
        // nothing: the policy's delay then.
        Some(asked) if alone && !asked.is_zero() => Ok((asked, policy, server)),
        _ => Ok((policy.max(server.unwrap_or(Duration::ZERO)), policy, server)),
    }
}

/// `delays` if the retry after them starts by the deadline (if any; a
/// deadline too far to represent is none).
fn within(deadline: Option<Instant>, delays: Delay) -> Result<Delay, Stop> {
    let Some(end) = deadline else {
        return Ok(delays);
    };
    match Instant::now().checked_add(delays.0) {
        Some(retry_at) if retry_at <= end => Ok(delays),
        _ => Err(Stop::PastDeadline),
    }
}

/// `delays` if the retry after them needs no budget (none is set, or the
/// server scheduled it with a non-zero `Retry-After`, which every retry
/// that goes honours) or the budget has one left, which it spends.
fn spend(budget: Option<&Ledger>, delays: Delay) -> Result<Delay, Stop> {
    let Some(budget) = budget else {
        return Ok(delays);
    };
    if delays.2.is_some_and(|asked| !asked.is_zero()) {
        return Ok(delays);
    }
    budget.withdraw().map(|()| delays).map_err(|spent| {
        tracing::debug!(
            target: "tollgate::retry",
            first_tries = spent.first_tries,
            retries = spent.retries,
            allowed = spent.allowed,
            "retry budget spent in the window"
        );
        Stop::BudgetSpent
    })
}

impl<S, B, C> fmt::Debug for ResponseFuture<S, B, C>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempt", &self.attempt)
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}
