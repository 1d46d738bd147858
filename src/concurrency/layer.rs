use std::time::Duration;

use tower::Layer;

use super::line::OneLine;
use super::queue::Gate;
use super::ConcurrencyGate;
use crate::sync::Arc;

/// Applies [`ConcurrencyGate`]: at most `parallelism` requests in flight, a
/// queue of `queue_limit` more (default `10 + parallelism`; first come
/// first served, or in turn between connections with
/// [`share_by`](ConcurrencyGateLayer::share_by)), and an immediate
/// [`Error::QueueFull`](crate::Error::QueueFull) beyond.
///
/// ```
/// use std::time::Duration;
/// use tollgate::ConcurrencyGateLayer;
///
/// // Power Automate's trigger default: 25 runs at once, 35 waiting.
/// let gate = ConcurrencyGateLayer::new(25).queue_timeout(Duration::from_secs(60));
/// # let _ = gate;
/// ```
///
/// Each service the layer builds gets its own gate; clones of that service
/// share it. To put two differently built stacks behind one gate, build the
/// gate once and clone it into both.
#[derive(Clone, Debug)]
pub struct ConcurrencyGateLayer<L = OneLine> {
    parallelism: usize,
    queue_limit: Option<usize>,
    queue_timeout: Option<Duration>,
    lines: L,
    by_line: bool,
}

impl ConcurrencyGateLayer {
    /// Extra waiting places beyond `parallelism` in the default queue
    /// limit: Logic Apps and Power Automate queue "10 + degree of
    /// parallelism" waiting runs.
    pub const DEFAULT_EXTRA_QUEUE: usize = 10;

    /// At most `parallelism` in flight, `10 + parallelism` waiting, no queue
    /// timeout. `parallelism` 0 is
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) on every call
    /// (never a hang).
    pub const fn new(parallelism: usize) -> Self {
        ConcurrencyGateLayer {
            parallelism,
            queue_limit: None,
            queue_timeout: None,
            lines: OneLine,
            by_line: false,
        }
    }
}

impl<L> ConcurrencyGateLayer<L> {
    /// Waiting requests take slots in turn, one connection after another,
    /// each connection's in arrival order; `key_of` names a request's
    /// connection, as for the rate limiter (give both the same; default:
    /// one line for all, first come first served). See the
    /// [module docs](super) for why round-robin.
    ///
    /// ```
    /// use tollgate::rate_limit::ByConnection;
    /// use tollgate::ConcurrencyGateLayer;
    ///
    /// let gate = ConcurrencyGateLayer::new(10).share_by(ByConnection);
    /// # let _ = gate;
    /// ```
    pub fn share_by<M>(self, key_of: M) -> ConcurrencyGateLayer<M> {
        ConcurrencyGateLayer {
            parallelism: self.parallelism,
            queue_limit: self.queue_limit,
            queue_timeout: self.queue_timeout,
            lines: key_of,
            by_line: true,
        }
    }

    /// How many requests may wait for a slot (0: refuse as soon as every
    /// slot is busy).
    pub const fn queue_limit(mut self, limit: usize) -> Self {
        self.queue_limit = Some(limit);
        self
    }

    /// A waiting request not admitted within `timeout` fails with
    /// [`Error::QueueTimeout`](crate::Error::QueueTimeout) (default: waits
    /// as long as it takes; the queue is bounded, so the wait is too, by
    /// the requests ahead of it). It bounds the wait for a first slot
    /// only: a request that lent its slot while waiting for a token was
    /// admitted, and takes a slot back however long that takes (bound the
    /// token's wait with [`RateLimitLayer::max_wait`](crate::RateLimitLayer::max_wait)).
    pub const fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.queue_timeout = Some(timeout);
        self
    }

    /// The queue limit this layer gives its gates.
    pub const fn effective_queue_limit(&self) -> usize {
        match self.queue_limit {
            Some(limit) => limit,
            None => self
                .parallelism
                .saturating_add(ConcurrencyGateLayer::DEFAULT_EXTRA_QUEUE),
        }
    }
}

impl<S, L: Clone> Layer<S> for ConcurrencyGateLayer<L> {
    type Service = ConcurrencyGate<S, L>;

    fn layer(&self, inner: S) -> ConcurrencyGate<S, L> {
        let gate = Gate::new(self.parallelism, self.effective_queue_limit(), self.by_line);
        ConcurrencyGate {
            inner,
            gate: Arc::new(gate),
            queue_timeout: self.queue_timeout,
            lines: self.lines.clone(),
        }
    }
}
