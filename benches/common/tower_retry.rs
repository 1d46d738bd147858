//! tower's retry policy for the benches' success-path rows: retry a 429 up
//! to `n` times at once, as a tower user would write it. Shared by
//! `benches/retry.rs`, `benches/stack.rs` and `benches/layers.rs` through
//! `#[path]` (not `mod common`, whose counting allocator would be in their
//! timings).

use std::future::{ready, Ready};

use http::{Request, Response, StatusCode};

/// Retries 429s up to `.0` times.
#[derive(Clone)]
pub struct RetryTooManyRequests(pub u32);

impl<B: Clone, R, E> tower::retry::Policy<Request<B>, Response<R>, E> for RetryTooManyRequests {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Request<B>,
        result: &mut Result<Response<R>, E>,
    ) -> Option<Self::Future> {
        match result {
            Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS && self.0 > 0 => {
                self.0 -= 1;
                Some(ready(()))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, req: &Request<B>) -> Option<Request<B>> {
        let mut copy = Request::new(req.body().clone());
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.headers_mut() = req.headers().clone();
        Some(copy)
    }
}
