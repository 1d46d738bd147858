use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{BoxError, Service};

use super::budget::Ledger;
use super::future::ResponseFuture;
use super::replay::with_replay;
use super::{Classify, DefaultClassify, ReplayBody, RetryLayer};

/// Retries a request while its outcome is retryable and the schedule, the
/// deadline and the server's `Retry-After` allow. Made by [`RetryLayer`].
///
/// Clones share the configuration, the per-request jitter counter and the
/// [`budget`](RetryLayer::budget)'s count.
pub struct Retry<S, C = DefaultClassify> {
    pub(super) inner: S,
    pub(super) shared: Arc<Shared<C>>,
}

/// What every clone of one [`Retry`] and each of its response futures share.
pub(super) struct Shared<C> {
    pub(super) config: RetryLayer<C>,
    /// Requests seen so far: request `k` draws jitter stream `k`.
    pub(super) requests: AtomicU64,
    /// The jitter key when the backoff has no seed, drawn per service.
    pub(super) unseeded_key: u64,
    /// The first tries and retries the budget counts, if one is set.
    pub(super) budget: Option<Ledger>,
    #[cfg(feature = "metrics")]
    pub(super) publisher: crate::metrics::Publisher,
}

impl<S, C> Retry<S, C> {
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

impl<S: Clone, C> Clone for Retry<S, C> {
    fn clone(&self) -> Self {
        Retry {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for Retry<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish()
    }
}

impl<S, B, R, C> Service<Request<B>> for Retry<S, C>
where
    S: Service<Request<B>, Response = Response<R>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayBody,
    C: Classify,
{
    type Response = Response<R>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let config = &self.shared.config;
        // A seeded backoff promises request k stream k, so the count is
        // taken in order of `call`; without a seed any distinct number will
        // do, and it is taken only when a first retry is due (most requests
        // never touch the shared counter).
        let number = config
            .backoff
            .is_seeded()
            .then(|| self.shared.requests.fetch_add(1, Ordering::Relaxed));
        if let Some(budget) = &self.shared.budget {
            budget.deposit();
        }
        let (request, replay) = if config.backoff.retries() > 0 {
            with_replay(request)
        } else {
            (request, None)
        };
        let method = request.method().clone();
        // The clone serves the retries (each after its own poll_ready); the
        // service the caller drove ready takes the first attempt.
        let service = self.inner.clone();
        let first = self.inner.call(request);
        ResponseFuture::new(
            first,
            service,
            replay,
            method,
            number,
            Arc::clone(&self.shared),
        )
    }
}
