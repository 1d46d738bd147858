//! `Tollgate`: the default stack in one builder.

use std::ops::RangeInclusive;
use std::time::Duration;

use tower::Layer;

use crate::sync::Arc;

use crate::rate_limit::{ByConnection, KeyOf};
use crate::{
    Backoff, ConcurrencyGate, ConcurrencyGateLayer, Error, Quota, RateLimit, RateLimitLayer, Retry,
    RetryBudget, RetryLayer,
};

/// The entry point to the default stack around an HTTP client, outside in:
/// the concurrency gate, retry, and per-connection rate limiting.
///
/// ```text
/// caller ──► ConcurrencyGate ──► Retry ──► RateLimit (per connection) ──► client
/// ```
///
/// The gate is outermost so a request keeps its slot through its retries;
/// every retry passes its connection's bucket; a 429 on one request pauses
/// its whole connection.
///
/// ```
/// use std::time::Duration;
/// use tollgate::testing::Script;
/// use tollgate::{Backoff, Quota, Tollgate};
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), tower::BoxError> {
/// let server = Script::new(); // or a hyper-util client
/// let client = Tollgate::builder()
///     .parallelism(10)
///     .per_connection(Quota::per_minute(600))
///     .retry(Backoff::power_automate())
///     .deadline(Duration::from_secs(120))
///     .build(server.service())?;
/// client.oneshot(http::Request::new(())).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Tollgate(());

impl Tollgate {
    /// A builder with the defaults in [`TollgateBuilder`]'s docs.
    pub fn builder() -> TollgateBuilder {
        TollgateBuilder::new()
    }
}

/// The service [`TollgateBuilder::build`] makes around a client `S`.
pub type TollgateService<S, F = ByConnection> = ConcurrencyGate<Retry<RateLimit<S, F>>, F>;

/// Builds the default stack; made by [`Tollgate::builder`].
///
/// Defaults, each the layer's own:
///
/// | setting | default | why |
/// |---|---|---|
/// | `parallelism` | 25 | Power Automate's default trigger concurrency |
/// | `queue_limit` | `10 + parallelism` | Power Automate's waiting-run queue |
/// | `queue_timeout` | none | the queue is bounded, so is the wait |
/// | `per_connection` | [`Quota::unlimited`] | no limit of its own: a 429 pauses the connection and teaches it a pace (set the API's documented quota if there is one: see below) |
/// | `learn_rate` | on | a cool-down alone lets a rounding token-bucket server run at 0.12 of its capacity; learning, 0.99 |
/// | `learn_from_headers` | on | a server that says no requests remain (`RateLimit`, `X-RateLimit-Remaining: 0`, ...) would answer the next request 429: hold the connection until its stated reset instead |
/// | `retry` | [`Backoff::power_automate`] | the Logic Apps / Power Automate default policy |
/// | `retry_after_alone` | on (with `learn_rate`) | a throttled request's first two retries wait the server's `Retry-After` and its connection's pace, not the backoff's 5-7.5 s on top: the connection already spaces it |
/// | `max_retry_after` | 5 minutes | Power Platform meters in 5-minute windows |
/// | `deadline` | none | bound attempts with a timeout layer inside if needed |
/// | `retry_budget` | none | the gate already bounds an outage's retries: a request keeps its slot while it sleeps before a retry, so at most `parallelism` requests retry at once. A budget frees those slots for first tries that fail too: in `benches/knee.rs`'s 30 s outage at parallelism 200 it *raised* the attempts sent during the outage from 602 to 3,370 and failed 2,523 of 6,000 leads a batch without it delivered. Set one for a stack whose parallelism is high and whose callers should fail fast (see [`RetryBudget`]) |
///
/// Without a quota, the server's 429s hold each connection back: the first
/// pauses it for `Retry-After`, and each teaches it a pace just under the
/// rate the server lets through (see [`RateLimitLayer::learn_rate`]),
/// which holds 0.98-0.99 of the server's capacity over a million leads in
/// `benches/throttled.rs`. Learning costs most in a short batch: against
/// real servers (nginx, HAProxy; `BENCHMARKS.md`) a 5-second import
/// reaches 0.78-0.89 of capacity and a 30-second one 0.845-0.933. The quota
/// the API documents, when there is one, does better: no 429 to learn
/// from, 1.00 of nginx's capacity from the first second (against
/// HAProxy's sliding window, which refuses a pace at exactly its limit, set
/// it a little under).
#[derive(Clone)]
pub struct TollgateBuilder<F = ByConnection> {
    parallelism: usize,
    adaptive: Option<RangeInclusive<usize>>,
    queue_limit: Option<usize>,
    queue_timeout: Option<Duration>,
    quota: Quota,
    key_of: F,
    max_keys: usize,
    backoff: Backoff,
    max_retry_after: Duration,
    deadline: Option<Duration>,
    retry_after_alone: Option<bool>,
    retry_budget: Option<RetryBudget>,
    learn_rate: bool,
    learn_from_headers: bool,
    #[cfg(feature = "redis")]
    store: Option<crate::redis::RedisStore>,
    #[cfg(feature = "metrics")]
    metrics: crate::metrics::Metrics,
}

/// The layers of the [`Tollgate`] stack as one `tower::Layer`, made by
/// [`TollgateBuilder::layer`]. Each `layer()` call builds a new gate and new
/// buckets; clone the service to share them.
#[derive(Clone, Debug)]
pub struct TollgateLayer<F = ByConnection> {
    gate: ConcurrencyGateLayer<F>,
    retry: RetryLayer,
    rate_limit: RateLimitLayer<F>,
}

impl<S, F: KeyOf + Clone> Layer<S> for TollgateLayer<F> {
    type Service = TollgateService<S, F>;

    fn layer(&self, client: S) -> TollgateService<S, F> {
        // An adaptive gate learns from each attempt the rate limiter sends.
        let gate = self.gate.gate(false);
        let sampler = gate.sampled_inside().then(|| Arc::clone(&gate));
        let rate_limited = self.rate_limit.layer_sampled(client, sampler);
        self.gate.layer_onto(gate, self.retry.layer(rate_limited))
    }
}

impl TollgateBuilder {
    /// The defaults in this type's docs.
    pub fn new() -> Self {
        const PARALLELISM: usize = 25;
        TollgateBuilder {
            parallelism: PARALLELISM,
            adaptive: None,
            queue_limit: None,
            queue_timeout: None,
            quota: Quota::unlimited(),
            key_of: ByConnection,
            max_keys: RateLimitLayer::DEFAULT_MAX_KEYS,
            backoff: Backoff::power_automate(),
            max_retry_after: RetryLayer::DEFAULT_MAX_RETRY_AFTER,
            deadline: None,
            retry_after_alone: None,
            retry_budget: None,
            learn_rate: true,
            learn_from_headers: true,
            #[cfg(feature = "redis")]
            store: None,
            #[cfg(feature = "metrics")]
            metrics: crate::metrics::Metrics::new(),
        }
    }
}

impl Default for TollgateBuilder {
    fn default() -> Self {
        TollgateBuilder::new()
    }
}

impl<F> TollgateBuilder<F> {
    /// Requests in flight at once (see [`ConcurrencyGateLayer::new`]).
    pub fn parallelism(mut self, parallelism: usize) -> Self {
        self.parallelism = parallelism;
        self
    }

    /// The parallelism adapts to the server's latency and overload answers
    /// inside `range`, starting at [`parallelism`](TollgateBuilder::parallelism)
    /// (default: fixed; see [`ConcurrencyGateLayer::adaptive_parallelism`]).
    /// In this stack each attempt is a sample, timed from sent to answered
    /// by the rate limiter: retries, their sleeps and token waits do not
    /// read as a slow server, and 429s stay the rate limiter's to learn
    /// from. An empty range, or one starting at 0, is
    /// [`Error::InvalidConfig`] from [`build`](TollgateBuilder::build).
    pub fn adaptive_parallelism(mut self, range: RangeInclusive<usize>) -> Self {
        self.adaptive = Some(range);
        self
    }

    /// Requests that may wait for a slot (see
    /// [`ConcurrencyGateLayer::queue_limit`]).
    pub fn queue_limit(mut self, limit: usize) -> Self {
        self.queue_limit = Some(limit);
        self
    }

    /// How long a request may wait for a slot (see
    /// [`ConcurrencyGateLayer::queue_timeout`]).
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.queue_timeout = Some(timeout);
        self
    }

    /// Each connection's quota (see [`RateLimitLayer::per_connection`]).
    pub fn per_connection(mut self, quota: Quota) -> Self {
        self.quota = quota;
        self
    }

    /// Keys buckets by another rule than the connection (see
    /// [`RateLimitLayer::key_by`]).
    pub fn key_by<G: KeyOf>(self, key_of: G) -> TollgateBuilder<G> {
        TollgateBuilder {
            parallelism: self.parallelism,
            adaptive: self.adaptive,
            queue_limit: self.queue_limit,
            queue_timeout: self.queue_timeout,
            quota: self.quota,
            key_of,
            max_keys: self.max_keys,
            backoff: self.backoff,
            max_retry_after: self.max_retry_after,
            deadline: self.deadline,
            retry_after_alone: self.retry_after_alone,
            retry_budget: self.retry_budget,
            learn_rate: self.learn_rate,
            learn_from_headers: self.learn_from_headers,
            #[cfg(feature = "redis")]
            store: self.store,
            #[cfg(feature = "metrics")]
            metrics: self.metrics,
        }
    }

    /// Keys (connections) tracked at most (see [`RateLimitLayer::max_keys`]).
    pub fn max_keys(mut self, keys: usize) -> Self {
        self.max_keys = keys;
        self
    }

    /// The retry schedule (see [`RetryLayer::new`]).
    pub fn retry(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The longest `Retry-After` a retry waits for (see
    /// [`RetryLayer::max_retry_after`]).
    pub fn max_retry_after(mut self, limit: Duration) -> Self {
        self.max_retry_after = limit;
        self
    }

    /// The time budget of one request's retries (see
    /// [`RetryLayer::deadline`]).
    pub fn deadline(mut self, budget: Duration) -> Self {
        self.deadline = Some(budget);
        self
    }

    /// Caps retries at a share of first tries (see [`RetryLayer::budget`];
    /// default: none, for the reason in this type's defaults table; off
    /// again with [`no_retry_budget`](TollgateBuilder::no_retry_budget)).
    /// An invalid budget is [`Error::InvalidConfig`] from
    /// [`build`](TollgateBuilder::build).
    pub fn retry_budget(mut self, budget: RetryBudget) -> Self {
        self.retry_budget = Some(budget);
        self
    }

    /// Retries without a budget (the default): each request retries as its
    /// backoff allows, whatever the others do, bounded by the gate's slots.
    pub fn no_retry_budget(mut self) -> Self {
        self.retry_budget = None;
        self
    }

    /// Whether a throttled request is retried (the first two times) after the
    /// server's `Retry-After` alone, its connection's pause and pace
    /// spacing it, rather than after `max(backoff delay, Retry-After)` (see
    /// [`RetryLayer::retry_after_alone`]; default: on while connections
    /// learn a pace, see [`learn_rate`](TollgateBuilder::learn_rate)).
    /// Off gives Power Automate's rule exactly, at a cost: a 5-second
    /// import's throttled leads would wait 5-7.5 s for their first retry.
    /// Without a learned pace (and no quota) nothing spaces the retries
    /// but the backoff, so it stays off by default there: in
    /// `benches/throttled.rs` retries after the bare `Retry-After` of a
    /// pause-only connection lose 5% of the leads to spent retries.
    pub fn retry_after_alone(mut self, alone: bool) -> Self {
        self.retry_after_alone = Some(alone);
        self
    }

    /// Whether a connection's 429s teach it a slower pace (see
    /// [`RateLimitLayer::learn_rate`]).
    pub fn learn_rate(mut self, learn: bool) -> Self {
        self.learn_rate = learn;
        self
    }

    /// Whether the limits a server publishes in its headers hold its
    /// connection (see [`RateLimitLayer::learn_from_headers`]).
    pub fn learn_from_headers(mut self, learn: bool) -> Self {
        self.learn_from_headers = learn;
        self
    }

    /// Shares each connection's bucket, cool-down and learned pace with
    /// every process using the same store (see
    /// [`RateLimitLayer::store`]).
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn store(mut self, store: crate::redis::RedisStore) -> Self {
        self.store = Some(store);
        self
    }

    /// Publishes the three layers' figures and events under `metrics`'
    /// labels (see [`crate::metrics`]); without this call, under
    /// [`Metrics::default`](crate::metrics::Metrics).
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The stack as one `tower::Layer`, or [`Error::InvalidConfig`] for a
    /// zero parallelism, an invalid quota, backoff or retry budget, or zero
    /// `max_keys`.
    pub fn layer(self) -> Result<TollgateLayer<F>, Error>
    where
        F: KeyOf + Clone,
    {
        if self.parallelism == 0 {
            return Err(Error::invalid_config(
                "concurrency gate",
                "parallelism must be at least 1",
            ));
        }
        if self.max_keys == 0 {
            return Err(Error::invalid_config(
                "rate limit",
                "max_keys must be at least 1",
            ));
        }
        self.quota.validate()?;
        self.backoff.validate()?;
        let mut gate = ConcurrencyGateLayer::new(self.parallelism);
        if let Some(range) = self.adaptive {
            crate::concurrency::check_range(&range)
                .map_err(|reason| Error::invalid_config("concurrency gate", reason))?;
            gate = gate.adaptive_parallelism(range);
        }
        if let Some(limit) = self.queue_limit {
            gate = gate.queue_limit(limit);
        }
        if let Some(timeout) = self.queue_timeout {
            gate = gate.queue_timeout(timeout);
        }
        let mut retry = RetryLayer::new(self.backoff)
            .max_retry_after(self.max_retry_after)
            .retry_after_alone(self.retry_after_alone.unwrap_or(self.learn_rate));
        if let Some(budget) = self.deadline {
            retry = retry.deadline(budget);
        }
        if let Some(budget) = self.retry_budget {
            budget.validate()?;
            retry = retry.budget(budget);
        }
        let rate_limit = RateLimitLayer::per_connection(self.quota)
            .max_keys(self.max_keys)
            .max_cool_down(self.max_retry_after)
            .learn_rate(self.learn_rate)
            .learn_from_headers(self.learn_from_headers);
        #[cfg(feature = "redis")]
        let rate_limit = match self.store {
            Some(store) => rate_limit.store(store),
            None => rate_limit,
        };
        #[cfg(feature = "metrics")]
        let (gate, retry, rate_limit) = (
            gate.metrics(self.metrics.clone()),
            retry.metrics(self.metrics.clone()),
            rate_limit.metrics(self.metrics),
        );
        // The gate's lines are the rate limiter's connections.
        let gate = gate.share_by(self.key_of.clone());
        let rate_limit = rate_limit.key_by(self.key_of);
        Ok(TollgateLayer {
            gate,
            retry,
            rate_limit,
        })
    }

    /// The stack around `client`, or [`Error::InvalidConfig`] (see
    /// [`layer`](TollgateBuilder::layer)).
    pub fn build<S>(self, client: S) -> Result<TollgateService<S, F>, Error>
    where
        F: KeyOf + Clone,
    {
        Ok(self.layer()?.layer(client))
    }
}

impl<F> std::fmt::Debug for TollgateBuilder<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut f = f.debug_struct("TollgateBuilder");
        f.field("parallelism", &self.parallelism)
            .field("adaptive_parallelism", &self.adaptive)
            .field("queue_limit", &self.queue_limit)
            .field("queue_timeout", &self.queue_timeout)
            .field("quota", &self.quota)
            .field("key_of", &std::any::type_name::<F>())
            .field("max_keys", &self.max_keys)
            .field("backoff", &self.backoff)
            .field("max_retry_after", &self.max_retry_after)
            .field("deadline", &self.deadline)
            .field("retry_after_alone", &self.retry_after_alone)
            .field("retry_budget", &self.retry_budget)
            .field("learn_rate", &self.learn_rate)
            .field("learn_from_headers", &self.learn_from_headers);
        #[cfg(feature = "redis")]
        f.field("store", &self.store);
        #[cfg(feature = "metrics")]
        f.field("metrics", &self.metrics);
        f.finish()
    }
}
