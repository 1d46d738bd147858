use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Request, Response, StatusCode};
use tower::{BoxError, Service};

use super::bucket::nanos;
use super::future::ResponseFuture;
use super::keyed::{Buckets, Figures};
use super::published::{self, Policy, Published};
use super::waitlist::WaitLists;
use super::{ByConnection, KeyOf};
use crate::concurrency::SeatLoan;
use crate::{retry_after, Error};

/// Holds each key (connection) to its token bucket and pauses a key when
/// its server answers 429/503 with `Retry-After`. Made by
/// [`RateLimitLayer`](crate::RateLimitLayer).
///
/// Clones share the buckets, so one `RateLimit` cloned into many tasks is
/// one limiter (unlike `tower::limit::RateLimit`, which is not `Clone`).
pub struct RateLimit<S, F = ByConnection>
where
    F: KeyOf,
{
    pub(super) inner: S,
    pub(super) key_of: F,
    pub(super) shared: Arc<Shared<F::Key>>,
}

/// What every clone of one [`RateLimit`] and its futures share.
pub(crate) struct Shared<K> {
    pub(super) buckets: Result<Buckets<K>, Error>,
    pub(super) waitlists: Arc<WaitLists<K>>,
    pub(super) figures: Arc<Figures>,
    pub(super) max_wait: Option<Duration>,
    pub(super) max_cool_down: Duration,
    pub(super) learn_rate: bool,
    // Whether the limits servers publish in their headers hold connections.
    pub(super) read_published: bool,
    // The fleet's shared state, when a store was given; `buckets` then
    // decide only while the store fails.
    #[cfg(feature = "redis")]
    pub(super) fleet: Option<crate::redis::Fleet<K>>,
    // The adaptive gate outside this rate limiter, which learns its
    // parallelism from the attempts sent here.
    pub(super) sampler: Option<crate::sync::Arc<crate::concurrency::Gate>>,
    #[cfg(feature = "metrics")]
    pub(super) publisher: crate::metrics::Publisher,
}

/// Whether a request may go: the seam between this process's buckets and
/// a fleet's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Sent now; `fleet_at` is when by the store's clock (ns), if the store
    /// decided.
    Admitted { fleet_at: Option<u64> },
    /// The next token is this many ns away.
    Wait(u64),
}

/// A decision the store is making (a round trip to Redis).
#[cfg(feature = "redis")]
pub(crate) type Asking = std::pin::Pin<Box<dyn std::future::Future<Output = Decision> + Send>>;
/// Without a store no decision is ever pending: the type has no values, and
/// the code that would poll one compiles away.
#[cfg(not(feature = "redis"))]
#[derive(Debug)]
pub(crate) enum Asking {}

/// A throttle the store is recording before the response is returned.
#[cfg(feature = "redis")]
pub(crate) type Reporting = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
#[cfg(not(feature = "redis"))]
#[derive(Debug)]
pub(crate) enum Reporting {}

/// What a response asks of its connection.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Hold {
    /// The wait the server asked for (`Retry-After`, or the published
    /// reset), as read.
    asked: Option<Duration>,
    /// The pause to apply: `asked`, at most `max_cool_down`.
    pause: Duration,
    /// Whether it throttled the request (a 429 or 503), which teaches the
    /// connection a pace; a server saying that no requests remain did not.
    throttled: bool,
}

/// What `status` and `headers` ask of the connection, or `None`:
///
/// - a 429, or a 503 with `Retry-After` (without one, a 503 is an outage,
///   not a limit), pauses it for `Retry-After`, or, if the 429 has none,
///   until the reset the server `published` (if read);
/// - any other response that publishes no requests remaining pauses it
///   until the published reset.
///
/// `Retry-After` wins over a published reset, as the IETF draft says.
fn holding(
    status: StatusCode,
    headers: &HeaderMap,
    max_cool_down: Duration,
    published: Option<&Published>,
) -> Option<Hold> {
    let hold = |asked: Option<Duration>, throttled| Hold {
        asked,
        pause: asked.map_or(Duration::ZERO, |asked| asked.min(max_cool_down)),
        throttled,
    };
    let too_many = status == StatusCode::TOO_MANY_REQUESTS;
    if too_many || status == StatusCode::SERVICE_UNAVAILABLE {
        let asked = retry_after::parse(headers, SystemTime::now());
        if asked.is_some() {
            return Some(hold(asked, true));
        }
        if !too_many {
            return None;
        }
        return Some(hold(published.and_then(|limit| limit.reset), true));
    }
    let limit = published?;
    let reset = limit
        .reset
        .filter(|reset| limit.exhausted() && !reset.is_zero())?;
    Some(hold(Some(reset), false))
}

impl<K: std::hash::Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static> Shared<K> {
    pub(super) fn new(
        buckets: Result<Buckets<K>, Error>,
        max_wait: Option<Duration>,
        max_cool_down: Duration,
        learn_rate: bool,
        read_published: bool,
    ) -> Self {
        let figures = match &buckets {
            Ok(buckets) => Arc::clone(buckets.figures()),
            Err(_) => Arc::default(),
        };
        Shared {
            buckets,
            waitlists: Arc::new(WaitLists::new(Arc::clone(&figures))),
            figures,
            max_wait,
            max_cool_down,
            learn_rate,
            read_published,
            #[cfg(feature = "redis")]
            fleet: None,
            sampler: None,
            #[cfg(feature = "metrics")]
            publisher: crate::metrics::Publisher::default(),
        }
    }

    /// Whether every request joins its connection's line before trying the
    /// bucket (with a store: see `future.rs`).
    #[inline]
    pub(super) fn holds_line(&self) -> bool {
        #[cfg(feature = "redis")]
        return self.fleet.is_some();
        #[cfg(not(feature = "redis"))]
        false
    }

    /// Takes a token for a request on `key` now, and says when (ns), if it
    /// can go at once: nobody waits on the key, no store decides, and no
    /// loan of a gate slot is left to adopt (see `future.rs`, which does all
    /// of this the long way when this says `None`).
    #[inline]
    pub(super) fn admit_at_once(&self, key: &K) -> Option<u64> {
        let buckets = self.buckets.as_ref().ok()?;
        if self.holds_line() || self.waitlists.has_waiters(key) || SeatLoan::orphan_waiting() {
            return None;
        }
        let now = buckets.now();
        buckets.acquire_at(key, now).ok()?;
        self.figures.admitted.fetch_add(1, Ordering::Relaxed);
        Some(now)
    }

    /// Decides whether the request at the head of `key`'s line may go at
    /// `now`: on this process's buckets, at once, or (with a store) by a
    /// round trip to the fleet's, returned as `Err` to await.
    #[inline]
    pub(super) fn decide(
        self: &Arc<Self>,
        buckets: &Buckets<K>,
        key: &K,
        now: u64,
    ) -> Result<Decision, Asking> {
        #[cfg(feature = "redis")]
        if let Some(fleet) = &self.fleet {
            return self.decide_in_fleet(fleet, buckets, key, now);
        }
        Ok(decide_locally(buckets, key, now))
    }

    #[cfg(feature = "redis")]
    fn decide_in_fleet(
        self: &Arc<Self>,
        fleet: &crate::redis::Fleet<K>,
        buckets: &Buckets<K>,
        key: &K,
        now: u64,
    ) -> Result<Decision, Asking> {
        match fleet.leased(key) {
            Some(Ok(at)) => return Ok(Decision::Admitted { fleet_at: Some(at) }),
            Some(Err(wait)) => return Ok(Decision::Wait(wait)),
            None => {}
        }
        if !fleet.ask() {
            self.figures.fallbacks.fetch_add(1, Ordering::Relaxed);
            return Ok(decide_locally(buckets, key, now));
        }
        let want = fleet.want(self.waitlists.len(key));
        let shared = Arc::clone(self);
        let asking_key = key.clone();
        // A task of its own, so that what Redis answers is recorded (a
        // reserved token kept for the next request in line) even if this
        // request is dropped meanwhile.
        let asking = tokio::spawn(async move {
            let Some(fleet) = &shared.fleet else {
                return None;
            };
            match fleet.acquire(&asking_key, want).await {
                Ok(Ok(at)) => Some(Decision::Admitted { fleet_at: Some(at) }),
                Ok(Err(wait)) => Some(Decision::Wait(wait)),
                Err(failure) => {
                    fleet.failed(&failure);
                    None
                }
            }
        });
        let shared = Arc::clone(self);
        let key = key.clone();
        Err(Box::pin(async move {
            match asking.await {
                Ok(Some(decision)) => decision,
                // The store failed (or the task did): this process decides.
                _ => {
                    shared.figures.fallbacks.fetch_add(1, Ordering::Relaxed);
                    match &shared.buckets {
                        Ok(buckets) => decide_locally(buckets, &key, buckets.now()),
                        Err(_) => Decision::Wait(0),
                    }
                }
            }
        }))
    }

    /// Pauses `key` and slows its pace if `status` and `headers` say the
    /// server is throttling a request sent at `sent_at` (ns, the buckets'
    /// clock; `fleet_at` by the store's, if the store admitted it). With a
    /// store, returns the round trip that tells the fleet, to await before
    /// the response is handed on (so the request's own retry sees the
    /// pause).
    pub(super) fn cool_down_on(
        self: &Arc<Self>,
        key: &K,
        sent_at: u64,
        fleet_at: Option<u64>,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Option<Reporting> {
        let published = (self.read_published && published::present(headers))
            .then(|| published::parse(headers, SystemTime::now()));
        if let Some(policy) = published.as_ref().and_then(|limit| limit.policy) {
            self.pace_by(key, policy);
        }
        let Hold {
            asked,
            pause,
            throttled,
        } = holding(status, headers, self.max_cool_down, published.as_ref())?;
        // Only a throttled request teaches a pace: a server saying no
        // requests remain only pauses the connection.
        let fleet_at = fleet_at.filter(|_| throttled);
        #[cfg(feature = "redis")]
        if let Some(fleet) = &self.fleet {
            // At once, whatever the store does: this process's own buckets
            // hold the pause (they decide if the store fails), and what it
            // reserved would go into the pause.
            fleet.void_lease(key);
            if fleet.ask() {
                self.cool_down_locally(key, sent_at, status, asked, pause, throttled, false);
                let shared = Arc::clone(self);
                let key = key.clone();
                // A task of its own, so a caller that drops the response
                // future does not drop the fleet's cool-down with it.
                let telling = tokio::spawn(async move {
                    let Some(fleet) = &shared.fleet else {
                        return;
                    };
                    match fleet.throttle(&key, fleet_at, nanos(pause)).await {
                        Ok((learned, applied)) => {
                            let applied = Duration::from_nanos(applied);
                            shared.throttled(&key, status, asked, applied, learned);
                        }
                        Err(failure) => {
                            fleet.failed(&failure);
                            shared.figures.fallbacks.fetch_add(1, Ordering::Relaxed);
                            shared.throttled(&key, status, asked, pause, None);
                        }
                    }
                });
                return Some(Box::pin(async move {
                    let _ = telling.await;
                }));
            }
            self.figures.fallbacks.fetch_add(1, Ordering::Relaxed);
            self.cool_down_locally(key, sent_at, status, asked, pause, throttled, true);
            return None;
        }
        let _ = fleet_at;
        self.cool_down_locally(key, sent_at, status, asked, pause, throttled, true);
        None
    }

    /// Paces `key` by the policy its server published (this process's
    /// buckets only: with a store, the fleet's pace is the store's).
    fn pace_by(&self, key: &K, policy: Policy) {
        let Ok(buckets) = &self.buckets else {
            return;
        };
        let window = policy.window.as_secs_f64();
        if !self.learn_rate || window <= 0.0 {
            return;
        }
        let rate = policy.quota as f64 / window;
        if buckets.published_at(key, buckets.now(), rate) {
            tracing::debug!(
                target: "tollgate::rate_limit",
                ?key,
                quota = policy.quota,
                window = ?policy.window,
                "pacing the connection by its published policy"
            );
        }
    }

    /// Applies a hold to this process's buckets (a lesson too if the
    /// request was `throttled`); counts and logs it if `counted` (with a
    /// store, the store's outcome is what counts).
    #[allow(clippy::too_many_arguments)]
    fn cool_down_locally(
        &self,
        key: &K,
        sent_at: u64,
        status: StatusCode,
        asked: Option<Duration>,
        pause: Duration,
        throttled: bool,
        counted: bool,
    ) {
        let Ok(buckets) = &self.buckets else {
            return;
        };
        let now = buckets.now();
        let (learned, pause) = if self.learn_rate && throttled {
            let (learned, applied) = buckets.throttled_at(key, now, sent_at, nanos(pause));
            (learned, Duration::from_nanos(applied))
        } else {
            if !pause.is_zero() {
                buckets.pause(key, pause);
            }
            (None, pause)
        };
        if counted {
            self.throttled(key, status, asked, pause, learned);
        }
    }

    /// Counts and logs a throttle that was applied.
    fn throttled(
        &self,
        key: &K,
        status: StatusCode,
        asked: Option<Duration>,
        pause: Duration,
        learned: Option<f64>,
    ) {
        if !pause.is_zero() {
            self.figures.cool_downs.fetch_add(1, Ordering::Relaxed);
            #[cfg(feature = "metrics")]
            self.publisher.cool_down(key, pause);
            tracing::debug!(
                target: "tollgate::rate_limit",
                ?key,
                status = status.as_u16(),
                retry_after = ?asked,
                ?pause,
                "cooling down the connection"
            );
        }
        if let Some(rate) = learned {
            self.figures.rate_cuts.fetch_add(1, Ordering::Relaxed);
            #[cfg(feature = "metrics")]
            self.publisher.rate_cut(key, rate);
            tracing::debug!(
                target: "tollgate::rate_limit",
                ?key,
                status = status.as_u16(),
                rate,
                "pacing the connection (requests per second)"
            );
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Shared<K> {
    /// Nanoseconds from `now` until a request behind `ahead` others on
    /// `key` would get its token: from this process's bucket, or, with a
    /// store (whose bucket is a round trip away), at least `ahead` tokens'
    /// time.
    pub(super) fn wait_behind(&self, buckets: &Buckets<K>, key: &K, now: u64, ahead: usize) -> u64 {
        #[cfg(feature = "redis")]
        if self.fleet.is_some() {
            return buckets.gcra().interval().saturating_mul(ahead as u64);
        }
        buckets.wait_behind(key, now, ahead as u64)
    }
}

/// The decision of this process's own buckets.
#[inline]
fn decide_locally<K: std::hash::Hash + Eq + Clone>(
    buckets: &Buckets<K>,
    key: &K,
    now: u64,
) -> Decision {
    match buckets.acquire_at(key, now) {
        Ok(()) => Decision::Admitted { fleet_at: None },
        Err(ready_at) => Decision::Wait(ready_at - now),
    }
}

impl<S, F: KeyOf> RateLimit<S, F> {
    /// Live figures of this limiter, shared by all its clones.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle {
            figures: Arc::clone(&self.shared.figures),
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

impl<S: Clone, F: KeyOf + Clone> Clone for RateLimit<S, F> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            key_of: self.key_of.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, F: KeyOf> fmt::Debug for RateLimit<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("buckets", &self.shared.buckets)
            .finish()
    }
}

impl<S, B, R, F> Service<Request<B>> for RateLimit<S, F>
where
    S: Service<Request<B>, Response = Response<R>> + Clone,
    S::Error: Into<BoxError>,
    F: KeyOf,
{
    type Response = Response<R>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, F::Key>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (head, body) = request.into_parts();
        let key = self.key_of.key_of(&head);
        let request = Request::from_parts(head, body);
        #[cfg(feature = "metrics")]
        self.shared.publisher.sample(&self.shared.figures);
        let shared = Arc::clone(&self.shared);
        if let Some(sent_at) = shared.admit_at_once(&key) {
            let future = self.inner.call(request);
            return ResponseFuture::called(future, key, sent_at, shared);
        }
        // The future sends the request once its bucket allows, on the
        // service the caller drove ready; this one gets a fresh clone.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::waiting(ready, request, key, shared)
    }
}

/// Live figures of one [`RateLimit`] (and all its clones).
#[derive(Clone, Debug)]
pub struct RateLimitHandle {
    figures: Arc<Figures>,
}

impl RateLimitHandle {
    /// Keys (connections) tracked now.
    pub fn keys(&self) -> usize {
        self.figures.keys.load(Ordering::Relaxed)
    }

    /// Requests waiting for a token now.
    pub fn waiting(&self) -> usize {
        self.figures.waiting.load(Ordering::Relaxed)
    }

    /// Tokens spent so far: requests let through.
    pub fn admitted(&self) -> u64 {
        self.figures.admitted.load(Ordering::Relaxed)
    }

    /// Cool-downs applied so far: 429/503 responses with a usable
    /// `Retry-After` (or, for a 429 without one, a published reset) that
    /// paused their connection (on a paced connection the rest of an
    /// episode's crowd pauses nothing more, and is not counted), and
    /// responses publishing that no requests remain.
    pub fn cool_downs(&self) -> u64 {
        self.figures.cool_downs.load(Ordering::Relaxed)
    }

    /// Lessons taken from the server's 429s: times a connection's pace was
    /// learned or cut (once per throttling episode, not per 429).
    pub fn rate_cuts(&self) -> u64 {
        self.figures.rate_cuts.load(Ordering::Relaxed)
    }

    /// Decisions made on this process's own buckets because the shared
    /// store (feature `redis`) failed, timed out, or was in an outage;
    /// always zero without a store.
    pub fn fallbacks(&self) -> u64 {
        self.figures.fallbacks.load(Ordering::Relaxed)
    }

    /// Keys evicted while their bucket was not yet full, so that what they
    /// owed was forgotten; non-zero means `max_keys` is too small.
    pub fn evicted_active(&self) -> u64 {
        self.figures.evicted_active.load(Ordering::Relaxed)
    }
}
