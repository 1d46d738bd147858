use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::backoff::random_u64;
use super::budget::Ledger;
use super::{Backoff, Classify, DefaultClassify, Retry, RetryBudget};

/// Applies [`Retry`] to a service: retries what [`Classify`] calls
/// retryable, waiting `max(backoff delay, Retry-After)` before each retry.
///
/// ```
/// use std::time::Duration;
/// use tollgate::{Backoff, RetryLayer};
///
/// let layer = RetryLayer::new(Backoff::exponential(Duration::from_millis(500)).max_retries(4))
///     .max_retry_after(Duration::from_secs(60))
///     .deadline(Duration::from_secs(30));
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct RetryLayer<C = DefaultClassify> {
    pub(super) backoff: Backoff,
    pub(super) max_retry_after: Duration,
    pub(super) deadline: Option<Duration>,
    pub(super) retry_after_alone: bool,
    pub(super) budget: Option<RetryBudget>,
    pub(super) classify: C,
    #[cfg(feature = "metrics")]
    pub(super) metrics: crate::metrics::Metrics,
}

impl RetryLayer {
    /// The longest `Retry-After` honoured unless set: 5 minutes.
    ///
    /// Power Platform meters requests in 5-minute windows, so a throttling
    /// server there never needs to ask for more; one that does (a daily
    /// quota spent) is better answered by returning its response to the
    /// caller than by holding the request, and its slot, for hours.
    pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(5 * 60);

    /// Retries on `backoff`'s schedule with the [`DefaultClassify`] rule, a
    /// 5-minute [`max_retry_after`](RetryLayer::max_retry_after), no
    /// deadline and no budget.
    pub const fn new(backoff: Backoff) -> Self {
        RetryLayer {
            backoff,
            max_retry_after: Self::DEFAULT_MAX_RETRY_AFTER,
            deadline: None,
            retry_after_alone: false,
            budget: None,
            classify: DefaultClassify::new(),
            #[cfg(feature = "metrics")]
            metrics: crate::metrics::Metrics::new(),
        }
    }

    /// Whether `POST`, `PATCH` and other non-idempotent requests retry on
    /// the statuses and errors that idempotent ones do (default `false`;
    /// 429 retries for every method regardless). See [`DefaultClassify`].
    pub const fn retry_non_idempotent(mut self, retry: bool) -> Self {
        self.classify = self.classify.retry_non_idempotent(retry);
        self
    }
}

impl<C> RetryLayer<C> {
    /// A server asking to wait longer than `limit` gets its response returned
    /// at once instead of a sleep (default
    /// [`DEFAULT_MAX_RETRY_AFTER`](RetryLayer::DEFAULT_MAX_RETRY_AFTER)).
    pub fn max_retry_after(mut self, limit: Duration) -> Self {
        self.max_retry_after = limit;
        self
    }

    /// The time budget of one request, from `call` on (default: none). The
    /// layer never sleeps past it: when the next retry would start later,
    /// the last response (or error) is returned instead.
    ///
    /// It bounds the waiting between attempts, not an attempt itself; put a
    /// `tower::timeout::TimeoutLayer` inside the retry layer for that.
    pub fn deadline(mut self, budget: Duration) -> Self {
        self.deadline = Some(budget);
        self
    }

    /// Whether a response that carries a `Retry-After` is retried, the first
    /// two times, after that wait alone, not `max(backoff delay,
    /// Retry-After)` (default `false`). A request throttled a third time
    /// waits the larger, as without it.
    ///
    /// For a retry layer above a [`RateLimit`](crate::RateLimit), as in the
    /// [`Tollgate`](crate::Tollgate) stack, which turns it on: there the 429
    /// pauses and paces the whole connection, and the retry passes that
    /// connection's bucket like every request, so the server's wait is
    /// kept and the retries are spread; the backoff's own delay (5 to 7.5 s
    /// for the first retry of [`Backoff::power_automate`]) would only leave
    /// the request idle after its connection is sending again. A third
    /// throttle says the pace does not hold it, and the backoff spreads the
    /// rest (without that, four processes learning one server's limit
    /// apart lost a lead to spent retries in `examples/fleet.rs`; from the
    /// second, a sliding window's 5-second import waited 15 s for one
    /// lead).
    /// Responses without `Retry-After` (or with a zero one, which spaces
    /// nothing), and errors, wait the backoff's delay.
    pub fn retry_after_alone(mut self, alone: bool) -> Self {
        self.retry_after_alone = alone;
        self
    }

    /// Caps retries at a share of first tries over a window (default: no
    /// cap; see [`RetryBudget`]). Each service a [`layer`](Layer::layer)
    /// call builds counts its own first tries and retries; clones of a
    /// service share the count. A retry the budget refuses returns the
    /// last response (or error), as when the retries run out.
    ///
    /// A retry of a response with a non-zero `Retry-After` neither needs
    /// nor spends budget: the server scheduled it (and, below this layer in
    /// the [`Tollgate`](crate::Tollgate) stack, the rate limiter's pause and
    /// pace of the connection space it). An invalid budget is clamped as
    /// [`RetryBudget`] documents, never a panic.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Replaces the rule deciding which outcomes retry: a [`Classify`], such
    /// as a closure `Fn(&Method, &Outcome<'_>) -> bool`.
    pub fn classify<D: Classify>(self, classify: D) -> RetryLayer<D> {
        RetryLayer {
            backoff: self.backoff,
            max_retry_after: self.max_retry_after,
            deadline: self.deadline,
            retry_after_alone: self.retry_after_alone,
            budget: self.budget,
            classify,
            #[cfg(feature = "metrics")]
            metrics: self.metrics,
        }
    }

    /// Publishes retries by reason, give-ups by reason and the delays
    /// before retries under `metrics`' labels (see [`crate::metrics`]);
    /// without this call, under
    /// [`Metrics::default`](crate::metrics::Metrics).
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The retry schedule.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }
}

impl<C> fmt::Debug for RetryLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut f = f.debug_struct("RetryLayer");
        f.field("backoff", &self.backoff)
            .field("max_retry_after", &self.max_retry_after)
            .field("deadline", &self.deadline)
            .field("retry_after_alone", &self.retry_after_alone)
            .field("budget", &self.budget)
            .field("classify", &std::any::type_name::<C>());
        #[cfg(feature = "metrics")]
        f.field("metrics", &self.metrics);
        f.finish()
    }
}

impl<S, C: Clone> Layer<S> for RetryLayer<C> {
    type Service = Retry<S, C>;

    fn layer(&self, inner: S) -> Retry<S, C> {
        Retry {
            inner,
            shared: Arc::new(super::service::Shared {
                config: self.clone(),
                requests: AtomicU64::new(0),
                unseeded_key: random_u64(),
                budget: self.budget.as_ref().map(Ledger::new),
                #[cfg(feature = "metrics")]
                publisher: crate::metrics::Publisher::new(self.metrics.clone()),
            }),
        }
    }
}
