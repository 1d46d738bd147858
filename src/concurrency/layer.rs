use std::ops::RangeInclusive;
use std::time::Duration;

use tower::Layer;

use super::adaptive::check_range;
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
    adaptive: Option<RangeInclusive<usize>>,
    #[cfg(feature = "metrics")]
    metrics: crate::metrics::Metrics,
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
            adaptive: None,
            #[cfg(feature = "metrics")]
            metrics: crate::metrics::Metrics::new(),
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
            adaptive: self.adaptive,
            #[cfg(feature = "metrics")]
            metrics: self.metrics,
        }
    }

    /// The parallelism adapts to the server inside `range`, starting at
    /// `parallelism` (clamped into the range); default: fixed. An empty
    /// range, or one starting at 0, is
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) on every call.
    ///
    /// It follows the server's latency and its overload answers (for a
    /// gate standing alone: how long each call through the gate takes, and
    /// the inner service's errors), after Netflix's concurrency-limits
    /// `Gradient` (reading round means, not single answers, and with no
    /// latency tolerance): doubling while latency stays flat, then
    /// settling a few requests past the concurrency where the server starts
    /// to queue, cut by the failed share when calls fail. The algorithm, and
    /// why each constant, is in `src/concurrency/adaptive.rs`. In the
    /// [`Tollgate`](crate::Tollgate) stack
    /// ([`TollgateBuilder::adaptive_parallelism`](crate::TollgateBuilder::adaptive_parallelism))
    /// the rate limiter inside takes the samples instead: each attempt
    /// from sent to answered, 502/503/504 without `Retry-After` as
    /// overload, and 429s left to the rate limiter, so retries, their
    /// sleeps and token waits do not read as a slow server.
    ///
    /// [`ConcurrencyGateHandle::parallelism`](super::ConcurrencyGateHandle::parallelism)
    /// shows where it is.
    ///
    /// ```
    /// use tollgate::ConcurrencyGateLayer;
    ///
    /// // Start at 10, stay between 1 and 200.
    /// let gate = ConcurrencyGateLayer::new(10).adaptive_parallelism(1..=200);
    /// # let _ = gate;
    /// ```
    pub fn adaptive_parallelism(mut self, range: RangeInclusive<usize>) -> Self {
        self.adaptive = Some(range);
        self
    }

    /// Publishes the handle's figures and queue waits under `metrics`'
    /// labels (see [`crate::metrics`]); without this call, under
    /// [`Metrics::default`](crate::metrics::Metrics).
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = metrics;
        self
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
        self.layer_onto(self.gate(true), inner)
    }
}

impl<L: Clone> ConcurrencyGateLayer<L> {
    /// A new gate as configured; `sampled_here`: whether an adaptive gate's
    /// own futures take its samples (else a rate limiter inside does).
    pub(crate) fn gate(&self, sampled_here: bool) -> Arc<Gate> {
        let queue_limit = self.effective_queue_limit();
        let gate = match &self.adaptive {
            None => Gate::new(self.parallelism, queue_limit, self.by_line),
            Some(range) => match check_range(range) {
                Ok(()) if self.parallelism > 0 => Gate::adaptive(
                    self.parallelism,
                    range.clone(),
                    queue_limit,
                    self.by_line,
                    sampled_here,
                ),
                Ok(()) => Gate::new(0, queue_limit, self.by_line),
                Err(reason) => Gate::new(0, queue_limit, self.by_line).invalid(reason),
            },
        };
        #[cfg(feature = "metrics")]
        let gate = gate.publishing(self.metrics.clone());
        Arc::new(gate)
    }

    /// The gate service around `inner`, with `gate`.
    pub(crate) fn layer_onto<S>(&self, gate: Arc<Gate>, inner: S) -> ConcurrencyGate<S, L> {
        ConcurrencyGate {
            inner,
            gate,
            queue_timeout: self.queue_timeout,
            lines: self.lines.clone(),
        }
    }
}
