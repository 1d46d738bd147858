//! Retry with a backoff that never waits less than the server asked.
//!
//! [`RetryLayer`] wraps any `tower::Service<http::Request<B>>` that answers
//! `http::Response<R>`. When an attempt ends in an outcome [`Classify`] calls
//! retryable, the layer waits
//!
//! ```text
//! delay before retry n = max(backoff delay n, server's Retry-After)
//! ```
//!
//! and tries again, as Logic Apps and Power Automate do: the policy spreads
//! callers out, the server's `Retry-After` (or `retry-after-ms`,
//! `x-ms-retry-after-ms`; see [`retry_after`]) is a floor it never undercuts.
//!
//! It stops, returning the outcome it has, when:
//! - the outcome is not retryable ([`DefaultClassify`]: 429 always; 408,
//!   500, 502, 503, 504 and inner errors for idempotent methods);
//! - the [`Backoff`] has no retries left: the **last response** is returned,
//!   not an error, so the caller sees the server's last word;
//! - the body cannot be replayed ([`ReplayBody`]): the request is sent once;
//! - the server asks for longer than
//!   [`max_retry_after`](RetryLayer::max_retry_after) (default 5 minutes);
//! - the next retry would start past the [`deadline`](RetryLayer::deadline);
//! - the [`budget`](RetryLayer::budget), if one is set, has no retry left:
//!   retries are capped at a share of first tries over a window
//!   ([`RetryBudget`]), so an outage does not multiply the load by the
//!   retry count. A retry of a response with a non-zero `Retry-After` is
//!   exempt: the server scheduled it.
//!
//! Every retry emits a `tracing` event at `DEBUG` (target `tollgate::retry`)
//! with the attempt number, the delay chosen, the policy's delay, the
//! server's `Retry-After` and the status (or error).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tollgate::testing::{Reply, Script};
//! use tollgate::{Backoff, RetryLayer};
//! use tower::{Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower::BoxError> {
//! // A server that throttles twice, asking for 7 s and then 1 s.
//! let server = Script::new()
//!     .reply(Reply::status(429).retry_after(Duration::from_secs(7)))
//!     .reply(Reply::status(429).retry_after(Duration::from_secs(1)))
//!     .reply(200);
//! let backoff = Backoff::exponential(Duration::from_secs(2)).max_retries(3);
//! let client = RetryLayer::new(backoff).layer(server.service());
//!
//! let response = client.oneshot(http::Request::new(())).await?;
//! assert_eq!(response.status(), 200);
//! // max(2 s, 7 s) = 7 s, then max(4 s, 1 s) = 4 s.
//! assert_eq!(server.waits(), [Duration::from_secs(7), Duration::from_secs(4)]);
//! # Ok(())
//! # }
//! ```
//!
//! # Design notes
//!
//! - `poll_ready` passes through to the inner service, whose readiness the
//!   first attempt uses; each retry polls a clone of it ready again, as
//!   `tower::retry` does, so the inner service must be `Clone`.
//! - The wall clock is read only for HTTP-date `Retry-After` values; every
//!   wait is a `tokio::time` sleep, so tests run in virtual time.

mod backoff;
mod budget;
mod classify;
mod future;
mod layer;
mod replay;
pub mod retry_after;
mod service;

pub use backoff::{Backoff, Delays, Jitter};
pub use budget::RetryBudget;
pub use classify::{Classify, DefaultClassify, Outcome};
pub use future::ResponseFuture;
pub use layer::RetryLayer;
pub use replay::ReplayBody;
pub use service::Retry;
