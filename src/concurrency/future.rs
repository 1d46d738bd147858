use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{sleep, Instant, Sleep};
use tower::{BoxError, Service};

use super::adaptive::Sample;
use super::queue::{Admission, Gate, Place};
use super::seat::{self, Seat};
use crate::sync::Arc;
use crate::Error;

pin_project! {
    /// The response future of [`ConcurrencyGate`](super::ConcurrencyGate):
    /// waits for a slot (if queued), then for the inner service, then for
    /// the response, holding the slot until it completes or is dropped
    /// (lent, while a rate limiter inside waits for a token: see the
    /// module docs).
    pub struct ResponseFuture<S, Request>
    where
        S: Service<Request>,
    {
        #[pin]
        state: State<S::Future>,
        // A request not yet called, and what it needs until it is: boxed,
        // since most requests are called from `call` and carry none of it
        // (a future moved by value through three layers is copied each
        // time).
        waiting: Option<Box<Waiting<S, Request>>>,
        seat: Option<Seat>,
        // Whether the seat is put out for the rate limiter inside (from the
        // poll after it asked for it).
        lending: bool,
        // When the request was called, if this gate times calls to learn
        // its parallelism.
        called_at: Option<(Instant, Arc<Gate>)>,
    }
}

/// A request admitted but not yet called.
struct Waiting<S, Request> {
    service: S,
    request: Option<Request>,
    // Held while queued; turned into the seat when a slot is handed over.
    place: Option<Place>,
    timeout: Option<Pin<Box<Sleep>>>,
    gate: Arc<Gate>,
    // When the request queued, for the queue wait it publishes.
    #[cfg(feature = "metrics")]
    queued_at: Option<Instant>,
}

impl<S, Request> Waiting<S, Request> {
    fn boxed(
        service: S,
        request: Request,
        place: Option<Place>,
        timeout: Option<Pin<Box<Sleep>>>,
        gate: &Arc<Gate>,
    ) -> Option<Box<Self>> {
        Some(Box::new(Waiting {
            service,
            request: Some(request),
            #[cfg(feature = "metrics")]
            queued_at: place.is_some().then(Instant::now),
            place,
            timeout,
            gate: Arc::clone(gate),
        }))
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // Decided in `call`: this request is refused.
        Refused { error: Option<BoxError> },
        // Waiting in the queue for a slot.
        Queued,
        // Holding a slot, waiting for the inner service to be ready.
        Readying,
        // The request is with the inner service.
        Called { #[pin] future: F },
    }
}

impl<S, Request> ResponseFuture<S, Request>
where
    S: Service<Request>,
{
    /// The future of a request admitted as `admission`, sent on `service`
    /// (which the caller drove ready, or not) once it holds a slot.
    ///
    /// A request handed a slot at once is called here if `service` is
    /// ready without waiting (asked with a waker that does nothing: the
    /// future asks again, with its own, if it is not).
    pub(super) fn new(
        admission: Admission,
        service: &mut S,
        request: Request,
        gate: &Arc<Gate>,
        queue_timeout: Option<Duration>,
    ) -> Self
    where
        S: Clone,
        S::Error: Into<BoxError>,
    {
        let (state, waiting, seat) = match admission {
            Admission::Slot(slot) => {
                let seat = Some(Seat::Seated(slot));
                match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
                    Poll::Ready(Ok(())) => {
                        let called_at = gate
                            .samples_calls()
                            .then(|| (Instant::now(), Arc::clone(gate)));
                        return ResponseFuture {
                            state: State::Called {
                                future: service.call(request),
                            },
                            waiting: None,
                            seat,
                            lending: false,
                            called_at,
                        };
                    }
                    Poll::Ready(Err(error)) => (
                        State::Refused {
                            error: Some(error.into()),
                        },
                        None,
                        None,
                    ),
                    // The future drives this very service ready: what it
                    // reserved while pending (a `Buffer`'s permit) is kept.
                    Poll::Pending => {
                        let clone = service.clone();
                        let service = std::mem::replace(service, clone);
                        let waiting = Waiting::boxed(service, request, None, None, gate);
                        (State::Readying, waiting, seat)
                    }
                }
            }
            Admission::Queued(place) => {
                tracing::trace!(target: "tollgate::concurrency", "queued for a slot");
                let timeout = queue_timeout.map(|timeout| Box::pin(sleep(timeout)));
                let waiting = Waiting::boxed(service.clone(), request, Some(place), timeout, gate);
                (State::Queued, waiting, None)
            }
            Admission::Full => {
                tracing::debug!(target: "tollgate::concurrency", "refused: the queue is full");
                let error = Some(Error::QueueFull.into());
                (State::Refused { error }, None, None)
            }
            Admission::Closed => {
                let error =
                    Some(Error::invalid_config("concurrency gate", gate.closed_because()).into());
                (State::Refused { error }, None, None)
            }
        };
        ResponseFuture {
            state,
            waiting,
            seat,
            lending: false,
            called_at: None,
        }
    }
}

impl<S, Request> Future for ResponseFuture<S, Request>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Refused { error } => {
                    let error = error.take().unwrap_or_else(|| Error::QueueFull.into());
                    return Poll::Ready(Err(error));
                }
                StateProj::Queued => {
                    let waiting = waiting(this.waiting);
                    let place = waiting
                        .place
                        .as_mut()
                        .expect("a queued future holds its place");
                    if place.poll_granted(cx).is_pending() {
                        let Some(timeout) = waiting.timeout.as_mut() else {
                            return Poll::Pending;
                        };
                        ready!(timeout.as_mut().poll(cx));
                        if place.leave() {
                            waiting.place = None;
                            waiting.gate.timed_out.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(target: "tollgate::concurrency", "gave up: queue_timeout");
                            return Poll::Ready(Err(Error::QueueTimeout.into()));
                        }
                        // Handed a slot just as the timeout fired: take it.
                    }
                    let place = waiting.place.take().expect("checked above");
                    waiting.timeout = None;
                    #[cfg(feature = "metrics")]
                    if let Some(queued_at) = waiting.queued_at {
                        waiting.gate.publisher.queue_wait(queued_at.elapsed());
                    }
                    *this.seat = Some(Seat::Seated(place.into_slot()));
                    tracing::trace!(target: "tollgate::concurrency", "admitted from the queue");
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
                    let waiting = waiting(this.waiting);
                    ready!(waiting.service.poll_ready(cx)).map_err(Into::into)?;
                    let request = waiting
                        .request
                        .take()
                        .expect("the request is sent once, from this state only");
                    if waiting.gate.samples_calls() {
                        *this.called_at = Some((Instant::now(), Arc::clone(&waiting.gate)));
                    }
                    let future = waiting.service.call(request);
                    *this.waiting = None;
                    this.state.set(State::Called { future });
                }
                StateProj::Called { mut future } => loop {
                    // A slot lent by a rate limiter that is gone is taken
                    // back before the request goes on (to a retry's sleep,
                    // or its next attempt).
                    if let Some(Seat::Loaned(loan)) = &*this.seat {
                        if loan.orphaned() {
                            ready!(loan.poll_seated(cx));
                        }
                    }
                    let polled = if *this.lending {
                        seat::polling_with(this.seat, || future.as_mut().poll(cx))
                    } else {
                        let polled = seat::polling(|| future.as_mut().poll(cx));
                        if polled.is_pending() && seat::wanted() {
                            // A rate limiter inside waits for a token: put
                            // the seat out for it, and poll again at once.
                            *this.lending = true;
                            continue;
                        }
                        polled
                    };
                    if let Poll::Ready(result) = polled {
                        if let Some((called_at, gate)) = this.called_at.take() {
                            gate.sample(match &result {
                                Ok(_) => Sample::Answered(called_at.elapsed()),
                                Err(_) => Sample::Overloaded,
                            });
                        }
                        // The slot goes back as soon as the response is here.
                        *this.seat = None;
                        return Poll::Ready(result.map_err(Into::into));
                    }
                    match &*this.seat {
                        Some(Seat::Loaned(loan)) if loan.orphaned() => continue,
                        _ => return Poll::Pending,
                    }
                },
            }
        }
    }
}

/// The hold of a request not yet called.
fn waiting<S, Request>(waiting: &mut Option<Box<Waiting<S, Request>>>) -> &mut Waiting<S, Request> {
    waiting
        .as_deref_mut()
        .expect("a request not yet called holds its waiting state")
}

impl<S, Request> fmt::Debug for ResponseFuture<S, Request>
where
    S: Service<Request>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field(
                "queued",
                &self.waiting.as_ref().is_some_and(|w| w.place.is_some()),
            )
            .field("seat", &self.seat)
            .finish_non_exhaustive()
    }
}
