use std::fmt;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{BoxError, Service};

use super::future::ResponseFuture;
use super::line::{LineOf, OneLine};
use super::queue::{Admission, Gate};
use crate::sync::Arc;
use crate::Error;

/// At most `parallelism` requests in flight, a bounded queue, and an
/// immediate refusal beyond. Made by
/// [`ConcurrencyGateLayer`](crate::ConcurrencyGateLayer); what a slot
/// means, and how waiting requests take turns, is in the
/// [module docs](super).
///
/// Clones share one gate: it bounds the whole client, not one clone.
///
/// # `poll_ready` and `call`
///
/// `poll_ready` is always ready and reserves nothing; `call` decides at once
/// (with one compare-and-swap while nobody waits, else under the gate's
/// lock): a free slot (the request runs), a place in the
/// queue (it waits its turn), or the queue is full (its future
/// fails with [`Error::QueueFull`] on first poll, without waiting). So
///
/// - a caller waiting in the queue waits in its *response future*, never in
///   `poll_ready`, and cannot hold up the clones of other callers;
/// - refusal is per request, as a typed error, instead of an error from
///   `poll_ready` (which tells tower the service itself has failed);
/// - a request handed a slot is called at once, from `call`, if the inner
///   service is ready without waiting (asked with a waker that does
///   nothing, as the common HTTP clients always are); otherwise the inner
///   service goes into the future and is polled ready there, once the
///   request holds its slot (a fresh clone stays behind), so the gate
///   composes with any `tower::ServiceBuilder` stack and needs no `Buffer`.
///
/// A slot is returned when the response future completes (for HTTP: when
/// the response head arrives) or is dropped; a queued future that is
/// dropped leaves the queue, or passes on a slot it had just been handed.
pub struct ConcurrencyGate<S, L = OneLine> {
    pub(super) inner: S,
    pub(super) gate: Arc<Gate>,
    pub(super) queue_timeout: Option<Duration>,
    pub(super) lines: L,
}

impl<S, L> ConcurrencyGate<S, L> {
    /// Live figures and the parallelism knob of this gate (shared by all
    /// clones).
    pub fn handle(&self) -> ConcurrencyGateHandle {
        ConcurrencyGateHandle {
            gate: Arc::clone(&self.gate),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, L: Clone> Clone for ConcurrencyGate<S, L> {
    fn clone(&self) -> Self {
        ConcurrencyGate {
            inner: self.inner.clone(),
            gate: Arc::clone(&self.gate),
            queue_timeout: self.queue_timeout,
            lines: self.lines.clone(),
        }
    }
}

impl<S: fmt::Debug, L> fmt::Debug for ConcurrencyGate<S, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyGate")
            .field("inner", &self.inner)
            .field("gate", &self.gate)
            .field("queue_timeout", &self.queue_timeout)
            .finish()
    }
}

impl<S, L, Request> Service<Request> for ConcurrencyGate<S, L>
where
    S: Service<Request> + Clone,
    S::Error: Into<BoxError>,
    L: LineOf<Request>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Request>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let (request, admission) = self.admit(request);
        if let Admission::Full = admission {
            self.gate.refused.fetch_add(1, Ordering::Relaxed);
        }
        self.future(admission, request)
    }
}

impl<S, L> ConcurrencyGate<S, L> {
    /// Admits `request` to the gate: a slot, a place in its line, or no
    /// room.
    pub(super) fn admit<Request>(&self, request: Request) -> (Request, Admission)
    where
        L: LineOf<Request>,
    {
        #[cfg(feature = "metrics")]
        self.gate.publisher.sample(&self.gate);
        // The request's line is read only if it has to wait for a slot.
        match self.gate.by_line() {
            false => (request, Gate::admit(&self.gate, 0)),
            true => match Gate::try_slot(&self.gate) {
                Some(slot) => (request, Admission::Slot(slot)),
                None => {
                    let (request, line) = self.lines.line_of(request);
                    (request, Gate::admit(&self.gate, line))
                }
            },
        }
    }

    /// The response future of an admitted request (called at once if it
    /// has a slot and the inner service is ready).
    pub(super) fn future<Request>(
        &mut self,
        admission: Admission,
        request: Request,
    ) -> ResponseFuture<S, Request>
    where
        S: Service<Request> + Clone,
        S::Error: Into<BoxError>,
    {
        ResponseFuture::new(
            admission,
            &mut self.inner,
            request,
            &self.gate,
            self.queue_timeout,
        )
    }
}

/// Live figures of one [`ConcurrencyGate`] (and all its clones), and its
/// parallelism, adjustable at run time.
#[derive(Clone, Debug)]
pub struct ConcurrencyGateHandle {
    gate: Arc<Gate>,
}

impl ConcurrencyGateHandle {
    /// Requests holding a slot now.
    pub fn in_flight(&self) -> usize {
        self.gate.in_flight()
    }

    /// Requests waiting for a slot now: not yet admitted, or taking back
    /// a slot they lent.
    pub fn queued(&self) -> usize {
        self.gate.queued()
    }

    /// Admitted requests waiting for their connection's token now, with
    /// their slot lent to requests that can go. They count against the
    /// queue limit with [`queued`](ConcurrencyGateHandle::queued).
    pub fn lent(&self) -> usize {
        self.gate.lent()
    }

    /// Requests refused so far because the queue was full.
    pub fn refused(&self) -> u64 {
        self.gate.refused.load(Ordering::Relaxed)
    }

    /// Requests that gave up waiting after `queue_timeout` so far.
    pub fn timed_out(&self) -> u64 {
        self.gate.timed_out.load(Ordering::Relaxed)
    }

    /// The current parallelism.
    pub fn parallelism(&self) -> usize {
        self.gate.parallelism()
    }

    /// How many requests may wait.
    pub fn queue_limit(&self) -> usize {
        self.gate.queue_limit()
    }

    /// Changes how many requests may be in flight, e.g. from a controller
    /// that backs off when the server throttles. Raising it admits waiting
    /// requests at once, in order; lowering it never cancels running work
    /// (slots are simply not handed on until fewer than `parallelism` run).
    /// Zero is [`Error::InvalidConfig`] and changes nothing. On a gate with
    /// [adaptive parallelism](crate::ConcurrencyGateLayer::adaptive_parallelism)
    /// the value is clamped into its range and learning goes on from it.
    pub fn set_parallelism(&self, parallelism: usize) -> Result<(), Error> {
        if parallelism == 0 {
            return Err(Error::invalid_config(
                "concurrency gate",
                "parallelism must be at least 1",
            ));
        }
        let parallelism = self.gate.set_parallelism_by_hand(parallelism);
        tracing::debug!(target: "tollgate::concurrency", parallelism, "parallelism changed");
        Ok(())
    }
}
