use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::{sleep, Sleep};
use tower::{BoxError, Service};

use super::keyed::Figures;
use super::service::Shared;
use crate::Error;

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit): waits for a
    /// token from the request's bucket, sends the request, and applies any
    /// cool-down its response asks for.
    ///
    /// Cancel-safe: a token is taken in the same poll that sends the
    /// request, so a future dropped while waiting has spent nothing.
    pub struct ResponseFuture<S, B, K>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        // The ready service and the request, until the request is sent.
        pending: Option<(S, Request<B>)>,
        key: K,
        // Counts this future in `waiting()` while it waits.
        waiting: Option<Waiting>,
        shared: Arc<Shared<K>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // Trying the bucket.
        Acquiring,
        // Waiting until the bucket said a token would be ready.
        Sleeping { #[pin] sleep: Sleep },
        // The request is with the inner service.
        Called { #[pin] future: F },
    }
}

impl<S, B, K> ResponseFuture<S, B, K>
where
    S: Service<Request<B>>,
{
    pub(super) fn new(service: S, request: Request<B>, key: K, shared: Arc<Shared<K>>) -> Self {
        ResponseFuture {
            state: State::Acquiring,
            pending: Some((service, request)),
            key,
            waiting: None,
            shared,
        }
    }
}

impl<S, B, R, K> Future for ResponseFuture<S, B, K>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    K: std::hash::Hash + Eq + Clone + fmt::Debug,
{
    type Output = Result<Response<R>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Acquiring => {
                    let buckets = match &this.shared.buckets {
                        Ok(buckets) => buckets,
                        Err(invalid) => return Poll::Ready(Err(invalid.clone().into())),
                    };
                    let now = buckets.now();
                    match buckets.acquire_at(this.key, now) {
                        Ok(()) => {
                            *this.waiting = None;
                            this.shared.figures.admitted.fetch_add(1, Ordering::Relaxed);
                            let (mut service, request) = this
                                .pending
                                .take()
                                .expect("the request is sent once, from this state only");
                            let future = service.call(request);
                            this.state.set(State::Called { future });
                        }
                        Err(ready_at) => {
                            let wait = Duration::from_nanos(ready_at - now);
                            if this.shared.max_wait.is_some_and(|limit| wait > limit) {
                                tracing::debug!(
                                    target: "tollgate::rate_limit",
                                    key = ?this.key,
                                    ?wait,
                                    "refused: the token is further away than max_wait"
                                );
                                let refusal = Error::RateLimited { retry_after: wait };
                                return Poll::Ready(Err(refusal.into()));
                            }
                            if this.waiting.is_none() {
                                *this.waiting = Some(Waiting::new(&this.shared.figures));
                                tracing::debug!(
                                    target: "tollgate::rate_limit",
                                    key = ?this.key,
                                    ?wait,
                                    "waiting for a token"
                                );
                            } else {
                                tracing::trace!(
                                    target: "tollgate::rate_limit",
                                    key = ?this.key,
                                    ?wait,
                                    "still waiting: the token went to another request"
                                );
                            }
                            this.state.set(State::Sleeping { sleep: sleep(wait) });
                        }
                    }
                }
                StateProj::Sleeping { sleep } => {
                    ready!(sleep.poll(cx));
                    this.state.set(State::Acquiring);
                }
                StateProj::Called { future } => {
                    let result = ready!(future.poll(cx)).map_err(Into::into);
                    if let Ok(response) = &result {
                        this.shared
                            .cool_down_on(this.key, response.status(), response.headers());
                    }
                    return Poll::Ready(result);
                }
            }
        }
    }
}

/// Counts one future in `waiting()` for as long as it lives.
struct Waiting(Arc<Figures>);

impl Waiting {
    fn new(figures: &Arc<Figures>) -> Self {
        figures.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(Arc::clone(figures))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, B, K: fmt::Debug> fmt::Debug for ResponseFuture<S, B, K>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("key", &self.key)
            .field("sent", &self.pending.is_none())
            .finish_non_exhaustive()
    }
}
