use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{ready, Context, Poll};
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
        service: S,
        request: Option<Request>,
        // Held while queued; turned into `seat` when a slot is handed over.
        place: Option<Place>,
        seat: Option<Seat>,
        #[pin]
        timeout: Option<Sleep>,
        gate: Arc<Gate>,
        // Whether the seat is put out for the rate limiter inside (from the
        // poll after it asked for it).
        lending: bool,
        // When the request was called, if this gate times calls to learn
        // its parallelism.
        called_at: Option<Instant>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // Decided in `call`: this request is refused.
        Refused { error: Option<Error> },
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
    pub(super) fn new(
        admission: Admission,
        service: S,
        request: Request,
        gate: &Arc<Gate>,
        queue_timeout: Option<Duration>,
    ) -> Self {
        let (state, place, seat, timeout) = match admission {
            Admission::Slot(slot) => (State::Readying, None, Some(Seat::Seated(slot)), None),
            Admission::Queued(place) => {
                tracing::trace!(target: "tollgate::concurrency", "queued for a slot");
                (State::Queued, Some(place), None, queue_timeout.map(sleep))
            }
            Admission::Full => {
                tracing::debug!(target: "tollgate::concurrency", "refused: the queue is full");
                let error = Some(Error::QueueFull);
                (State::Refused { error }, None, None, None)
            }
            Admission::Closed => {
                let error = Some(Error::invalid_config(
                    "concurrency gate",
                    gate.closed_because(),
                ));
                (State::Refused { error }, None, None, None)
            }
        };
        ResponseFuture {
            state,
            service,
            request: Some(request),
            place,
            seat,
            timeout,
            gate: Arc::clone(gate),
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
                    let error = error.take().unwrap_or(Error::QueueFull);
                    return Poll::Ready(Err(error.into()));
                }
                StateProj::Queued => {
                    let place = this
                        .place
                        .as_mut()
                        .expect("a queued future holds its place");
                    if place.poll_granted(cx).is_pending() {
                        let Some(timeout) = this.timeout.as_mut().as_pin_mut() else {
                            return Poll::Pending;
                        };
                        ready!(timeout.poll(cx));
                        if place.leave() {
                            *this.place = None;
                            this.gate.timed_out.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(target: "tollgate::concurrency", "gave up: queue_timeout");
                            return Poll::Ready(Err(Error::QueueTimeout.into()));
                        }
                        // Handed a slot just as the timeout fired: take it.
                    }
                    let place = this.place.take().expect("checked above");
                    *this.seat = Some(Seat::Seated(place.into_slot()));
                    tracing::trace!(target: "tollgate::concurrency", "admitted from the queue");
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
                    ready!(this.service.poll_ready(cx)).map_err(Into::into)?;
                    let request = this
                        .request
                        .take()
                        .expect("the request is sent once, from this state only");
                    if this.gate.samples_calls() {
                        *this.called_at = Some(Instant::now());
                    }
                    let future = this.service.call(request);
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
                        if let Some(called_at) = this.called_at.take() {
                            this.gate.sample(match &result {
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

impl<S, Request> fmt::Debug for ResponseFuture<S, Request>
where
    S: Service<Request>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("queued", &self.place.is_some())
            .field("seat", &self.seat)
            .finish_non_exhaustive()
    }
}
