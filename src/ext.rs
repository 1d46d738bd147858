//! `tower::ServiceBuilder` methods for tollgate's layers.

use tower::layer::util::Stack;
use tower::ServiceBuilder;

use crate::{Backoff, ConcurrencyGateLayer, Quota, RateLimitLayer, RetryLayer};

/// Adds tollgate's layers to `tower::ServiceBuilder`, as tower-http's
/// `ServiceBuilderExt` does for its own.
///
/// Layers apply outside in, in the order they are added; the order of
/// DESIGN.md's default stack is gate, then retry, then rate limit:
///
/// ```
/// use std::time::Duration;
/// use tollgate::testing::Script;
/// use tollgate::{Backoff, Quota, ServiceBuilderExt};
/// use tower::{ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), tower::BoxError> {
/// let server = Script::new();
/// let client = ServiceBuilder::new()
///     .concurrency_gate(25)                           // 25 in flight, 35 waiting
///     .retry_backoff(Backoff::power_automate())        // max(policy, Retry-After)
///     .rate_limit_per_connection(Quota::per_minute(600))
///     .service(server.service());
/// client.oneshot(http::Request::new(())).await?;
/// # Ok(())
/// # }
/// ```
///
/// Each method uses its layer's defaults; for other settings add the layer
/// itself with `.layer(...)`.
pub trait ServiceBuilderExt<L>: sealed::Sealed {
    /// Adds a [`ConcurrencyGateLayer::new(parallelism)`](ConcurrencyGateLayer::new).
    fn concurrency_gate(self, parallelism: usize)
        -> ServiceBuilder<Stack<ConcurrencyGateLayer, L>>;

    /// Adds a [`RetryLayer::new(backoff)`](RetryLayer::new).
    fn retry_backoff(self, backoff: Backoff) -> ServiceBuilder<Stack<RetryLayer, L>>;

    /// Adds a [`RateLimitLayer::per_connection(quota)`](RateLimitLayer::per_connection).
    fn rate_limit_per_connection(self, quota: Quota) -> ServiceBuilder<Stack<RateLimitLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn concurrency_gate(
        self,
        parallelism: usize,
    ) -> ServiceBuilder<Stack<ConcurrencyGateLayer, L>> {
        self.layer(ConcurrencyGateLayer::new(parallelism))
    }

    fn retry_backoff(self, backoff: Backoff) -> ServiceBuilder<Stack<RetryLayer, L>> {
        self.layer(RetryLayer::new(backoff))
    }

    fn rate_limit_per_connection(self, quota: Quota) -> ServiceBuilder<Stack<RateLimitLayer, L>> {
        self.layer(RateLimitLayer::per_connection(quota))
    }
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}
