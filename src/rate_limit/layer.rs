use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::keyed::Buckets;
use super::service::Shared;
use super::{ByConnection, KeyOf, Quota, RateLimit};

/// Applies [`RateLimit`]: one token bucket of `quota` per key (by default
/// per connection), paused when the server answers 429/503 with
/// `Retry-After`.
///
/// ```
/// use std::time::Duration;
/// use tollgate::{Quota, RateLimitLayer};
///
/// // SharePoint's documented limit: 600 calls per minute per connection.
/// let layer = RateLimitLayer::per_connection(Quota::per_minute(600))
///     .max_wait(Duration::from_secs(30));
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct RateLimitLayer<F = ByConnection> {
    quota: Quota,
    key_of: F,
    max_wait: Option<Duration>,
    max_keys: usize,
    max_cool_down: Duration,
    learn_rate: bool,
    learn_from_headers: bool,
    #[cfg(feature = "redis")]
    store: Option<crate::redis::RedisStore>,
    #[cfg(feature = "metrics")]
    metrics: crate::metrics::Metrics,
}

impl RateLimitLayer {
    /// Keys tracked at most, unless set: 10,000. Far more connections than
    /// a client keeps open (so active keys are not evicted), at about 1.4 MB
    /// when full (139 bytes a key, measured).
    pub const DEFAULT_MAX_KEYS: usize = 10_000;

    /// The longest cool-down a server can impose, unless set: 5 minutes, the
    /// same as the retry layer's `max_retry_after` and Power Platform's
    /// metering window.
    pub const DEFAULT_MAX_COOL_DOWN: Duration = Duration::from_secs(5 * 60);

    /// A bucket of `quota` for each connection: the request's
    /// [`ConnectionKey`](crate::ConnectionKey) extension, or its URI's scheme
    /// and authority.
    ///
    /// Requests wait as long as their bucket says (no
    /// [`max_wait`](RateLimitLayer::max_wait)): refusing overload belongs to
    /// the concurrency gate in front, and a rate limiter that failed
    /// requests by default would lose work that only needed delaying.
    pub const fn per_connection(quota: Quota) -> Self {
        RateLimitLayer {
            quota,
            key_of: ByConnection,
            max_wait: None,
            max_keys: Self::DEFAULT_MAX_KEYS,
            max_cool_down: Self::DEFAULT_MAX_COOL_DOWN,
            learn_rate: true,
            learn_from_headers: true,
            #[cfg(feature = "redis")]
            store: None,
            #[cfg(feature = "metrics")]
            metrics: crate::metrics::Metrics::new(),
        }
    }
}

impl<F> RateLimitLayer<F> {
    /// Keys requests by another rule: any [`KeyOf`], such as a closure
    /// `Fn(&http::request::Parts) -> K` (e.g. by tenant header).
    pub fn key_by<G: KeyOf>(self, key_of: G) -> RateLimitLayer<G> {
        RateLimitLayer {
            quota: self.quota,
            key_of,
            max_wait: self.max_wait,
            max_keys: self.max_keys,
            max_cool_down: self.max_cool_down,
            learn_rate: self.learn_rate,
            learn_from_headers: self.learn_from_headers,
            #[cfg(feature = "redis")]
            store: self.store,
            #[cfg(feature = "metrics")]
            metrics: self.metrics,
        }
    }

    /// A request that would wait longer than `limit` for a token fails at
    /// once with [`Error::RateLimited`](crate::Error::RateLimited), whose
    /// `retry_after` says when the token will be ready. A request already
    /// waiting fails when a cool-down pushes its token past the limit.
    pub fn max_wait(mut self, limit: Duration) -> Self {
        self.max_wait = Some(limit);
        self
    }

    /// Keys tracked at most (default
    /// [`DEFAULT_MAX_KEYS`](RateLimitLayer::DEFAULT_MAX_KEYS)); see
    /// [`Buckets`] for the eviction policy. Zero is
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig).
    pub fn max_keys(mut self, keys: usize) -> Self {
        self.max_keys = keys;
        self
    }

    /// The longest a `Retry-After` may pause a connection (default
    /// [`DEFAULT_MAX_COOL_DOWN`](RateLimitLayer::DEFAULT_MAX_COOL_DOWN)); a
    /// server asking for more pauses it this long.
    pub fn max_cool_down(mut self, limit: Duration) -> Self {
        self.max_cool_down = limit;
        self
    }

    /// Whether a connection's 429s teach it a slower pace (default: yes).
    ///
    /// A cool-down alone is only as good as the server's `Retry-After`: a
    /// token-bucket server that rounds "10 ms" up to "1 s" idles the
    /// connection for the second, then the requests released together
    /// overrun its burst and earn the next 429 (10% of the server's capacity
    /// in `benches/throttled.rs`). Learning, the connection is sent evenly
    /// at just under the rate the server lets through, never faster than
    /// its quota, probing upward after a quiet spell (5 s at first, longer
    /// as lessons confirm the rate); a paced connection's later 429s pause
    /// it only for the excess's share of `Retry-After`. See "Learned pace"
    /// in the [module docs](crate::rate_limit). Off, only the quota and the
    /// cool-downs (all of every `Retry-After`) hold a connection back.
    pub fn learn_rate(mut self, learn: bool) -> Self {
        self.learn_rate = learn;
        self
    }

    /// Whether the limits a server publishes in its response headers hold
    /// its connection (default: yes; the headers and services are listed in
    /// [`published`](crate::rate_limit::published)):
    ///
    /// - a stated **policy** (`RateLimit-Policy: "default";q=50;w=1`, and
    ///   the other forms with a window) paces the connection at 99% of it,
    ///   sent evenly, from the first response that states it, before any
    ///   429 (never faster than the quota; a slower pace its 429s taught is
    ///   kept; not with [`learn_rate(false)`](RateLimitLayer::learn_rate));
    /// - a response saying that **no requests remain** (`RateLimit: r=0`,
    ///   `X-RateLimit-Remaining: 0`, ...) pauses the connection until the
    ///   reset it states, at most
    ///   [`max_cool_down`](RateLimitLayer::max_cool_down), instead of
    ///   letting the next request earn a 429;
    /// - a 429 without `Retry-After` pauses it until the published reset.
    ///   `Retry-After` wins when both are present.
    ///
    /// Responses with no such header cost one look at their header names.
    /// With a [`store`](RateLimitLayer::store), pauses are shared with the
    /// fleet, but a policy's pace is not yet: it paces this process's own
    /// buckets, which decide only while the store fails.
    pub fn learn_from_headers(mut self, learn: bool) -> Self {
        self.learn_from_headers = learn;
        self
    }

    /// Publishes the handle's figures, cool-downs, lessons and token
    /// waits under `metrics`' labels (see [`crate::metrics`]); without
    /// this call, under [`Metrics::default`](crate::metrics::Metrics).
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Keeps each connection's bucket, cool-down and learned pace in a
    /// store the fleet shares, so every process using the same store and
    /// prefix holds a connection to one quota. This process's own buckets
    /// decide only while the store fails. See the [`redis`](crate::redis)
    /// module.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn store(mut self, store: crate::redis::RedisStore) -> Self {
        self.store = Some(store);
        self
    }

    /// The quota of every bucket.
    pub fn quota(&self) -> Quota {
        self.quota
    }
}

impl<F> fmt::Debug for RateLimitLayer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut f = f.debug_struct("RateLimitLayer");
        f.field("quota", &self.quota)
            .field("key_of", &std::any::type_name::<F>())
            .field("max_wait", &self.max_wait)
            .field("max_keys", &self.max_keys)
            .field("max_cool_down", &self.max_cool_down)
            .field("learn_rate", &self.learn_rate)
            .field("learn_from_headers", &self.learn_from_headers);
        #[cfg(feature = "redis")]
        f.field("store", &self.store);
        #[cfg(feature = "metrics")]
        f.field("metrics", &self.metrics);
        f.finish()
    }
}

impl<S, F: KeyOf + Clone> Layer<S> for RateLimitLayer<F> {
    type Service = RateLimit<S, F>;

    /// Each call makes a new set of buckets; clone the service, not the
    /// layer, to share them.
    fn layer(&self, inner: S) -> RateLimit<S, F> {
        self.layer_sampled(inner, None)
    }
}

impl<F: KeyOf + Clone> RateLimitLayer<F> {
    /// The rate limiter around `inner`; each attempt's latency and
    /// overload answer go to `sampler`, an adaptive gate outside.
    pub(crate) fn layer_sampled<S>(
        &self,
        inner: S,
        sampler: Option<crate::sync::Arc<crate::concurrency::Gate>>,
    ) -> RateLimit<S, F> {
        let mut shared = Shared::new(
            Buckets::new(self.quota, self.max_keys),
            self.max_wait,
            self.max_cool_down,
            self.learn_rate,
            self.learn_from_headers,
        );
        #[cfg(feature = "redis")]
        if let (Some(store), Ok(buckets)) = (&self.store, &shared.buckets) {
            shared.fleet = Some(crate::redis::Fleet::new(
                store.clone(),
                buckets.gcra(),
                self.learn_rate,
                self.max_keys,
            ));
        }
        shared.sampler = sampler;
        #[cfg(feature = "metrics")]
        {
            shared.publisher = crate::metrics::Publisher::new(self.metrics.clone());
        }
        RateLimit {
            inner,
            key_of: self.key_of.clone(),
            shared: Arc::new(shared),
        }
    }
}
