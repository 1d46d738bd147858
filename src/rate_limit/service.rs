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
use super::waitlist::WaitLists;
use super::{ByConnection, KeyOf};
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
pub(super) struct Shared<K> {
    pub(super) buckets: Result<Buckets<K>, Error>,
    pub(super) waitlists: Arc<WaitLists<K>>,
    pub(super) figures: Arc<Figures>,
    pub(super) max_wait: Option<Duration>,
    pub(super) max_cool_down: Duration,
    pub(super) learn_rate: bool,
}

impl<K: std::hash::Hash + Eq + Clone + fmt::Debug> Shared<K> {
    pub(super) fn new(
        buckets: Result<Buckets<K>, Error>,
        max_wait: Option<Duration>,
        max_cool_down: Duration,
        learn_rate: bool,
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
        }
    }

    /// Pauses `key` and slows its pace if `status` and `headers` say the
    /// server is throttling a request sent at `sent_at` (ns, the buckets'
    /// clock): a 429, or a 503 with `Retry-After` (without one, a 503 is an
    /// outage, not a limit).
    pub(super) fn cool_down_on(
        &self,
        key: &K,
        sent_at: u64,
        status: StatusCode,
        headers: &HeaderMap,
    ) {
        let too_many = status == StatusCode::TOO_MANY_REQUESTS;
        if !too_many && status != StatusCode::SERVICE_UNAVAILABLE {
            return;
        }
        let Ok(buckets) = &self.buckets else {
            return;
        };
        let asked = retry_after::parse(headers, SystemTime::now());
        if asked.is_none() && !too_many {
            return;
        }
        let pause = asked.map_or(Duration::ZERO, |asked| asked.min(self.max_cool_down));
        let now = buckets.now();
        let learned = if self.learn_rate {
            buckets.throttled_at(key, now, sent_at, nanos(pause))
        } else {
            if !pause.is_zero() {
                buckets.pause(key, pause);
            }
            None
        };
        if !pause.is_zero() {
            self.figures.cool_downs.fetch_add(1, Ordering::Relaxed);
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
        // The future sends the request once its bucket allows, on the
        // service the caller drove ready; this one gets a fresh clone.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(ready, request, key, Arc::clone(&self.shared))
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

    /// Cool-downs applied so far (429/503 responses with a usable
    /// `Retry-After`).
    pub fn cool_downs(&self) -> u64 {
        self.figures.cool_downs.load(Ordering::Relaxed)
    }

    /// Lessons taken from the server's 429s: times a connection's pace was
    /// learned or cut (once per throttling episode, not per 429).
    pub fn rate_cuts(&self) -> u64 {
        self.figures.rate_cuts.load(Ordering::Relaxed)
    }

    /// Keys evicted while their bucket was not yet full, so that what they
    /// owed was forgotten; non-zero means `max_keys` is too small.
    pub fn evicted_active(&self) -> u64 {
        self.figures.evicted_active.load(Ordering::Relaxed)
    }
}
