//! Tower layers that keep HTTP clients from throttling themselves, and
//! their servers, to death.
//!
//! A server that is overloaded answers `429 Too Many Requests` (or `503`)
//! with `Retry-After`. When every caller retries on its own schedule, the
//! retries arrive together and earn more 429s until the batch is "throttled
//! to death". tollgate brings the knobs that Logic Apps and Power Automate
//! use against that to any `tower::Service` HTTP client:
//!
//! - [`retry`]: exponential (or fixed) [`Backoff`] with [`Jitter`] that
//!   waits the **larger** of its own delay and the server's `Retry-After`
//!   (delay-seconds, HTTP-date, or the millisecond headers Azure sends), and
//!   caps what a server may ask for.
//! - [`rate_limit`]: a token bucket per connection ([`Quota`],
//!   [`ConnectionKey`]); a 429 or 503 with `Retry-After` pauses that whole
//!   connection, not just the one request; bounded memory for any number of
//!   keys.
//! - [`concurrency`]: at most `parallelism` requests working on servers,
//!   `10 + parallelism` more waiting (first come first served, in turn
//!   between connections), and an immediate, typed refusal beyond
//!   ([`ConcurrencyGateLayer`]); a request waiting for its connection's
//!   token lends its slot to one that can go. The parallelism can adapt to
//!   a server that publishes no limit and only slows down
//!   ([`adaptive_parallelism`](ConcurrencyGateLayer::adaptive_parallelism)),
//!   and [`send_all`](ConcurrencyGate::send_all) drives a whole batch
//!   through the gate without a refusal.
//! - `redis` (feature `redis`): each connection's bucket, cool-down and
//!   learned pace shared by a fleet of processes through Redis, so N
//!   workers hold a connection to one quota.
//! - `metrics` (feature `metrics`): the handles' figures, retries by
//!   reason and the time requests wait, published through the `metrics`
//!   facade for a Prometheus or OpenTelemetry exporter.
//! - [`testing`]: a scripted mock server that records when each attempt
//!   arrived, to unit-test a backoff in virtual time.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tollgate::testing::{Reply, Script};
//! use tollgate::{Backoff, RetryLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower::BoxError> {
//! // Stand-in for a real client (hyper-util, reqwest, ...): a server that
//! // throttles once, asking for 30 s.
//! let server = Script::new()
//!     .reply(Reply::status(429).retry_after(Duration::from_secs(30)))
//!     .reply(200);
//!
//! let client = ServiceBuilder::new()
//!     .layer(RetryLayer::new(Backoff::power_automate()))
//!     .service(server.service());
//!
//! let started = tokio::time::Instant::now();
//! let response = client.oneshot(http::Request::new(())).await?;
//! assert_eq!(response.status(), 200);
//! // Power Automate's first retry waits 5-7.5 s; the server asked for 30.
//! assert_eq!(started.elapsed(), Duration::from_secs(30));
//! # Ok(())
//! # }
//! ```
//!
//! # Which layer do I need?
//!
//! | symptom | layer |
//! |---|---|
//! | the server answers 429/503 and my retries ignore its `Retry-After` | [`RetryLayer`] |
//! | one throttled request should pause every request on that connection | [`RateLimitLayer`] |
//! | the server (or API) has a documented quota per connection, key or tenant | [`RateLimitLayer`] with a [`Quota`] |
//! | a burst of work must not all hit the server at once, and overload should be refused | [`ConcurrencyGateLayer`] |
//! | the server publishes no limit, it slows down and then fails; which parallelism? | [`TollgateBuilder::adaptive_parallelism`] |
//! | a batch of a million requests, none refused for a full queue | [`ConcurrencyGate::send_all`] |
//! | all of it, with defaults from Power Automate | [`Tollgate::builder`] |
//! | many processes (pods, workers) share one server's quota | `redis::RedisStore` (feature `redis`) given to `.store(..)` |
//! | queue, tokens, cool-downs and retries on a dashboard | feature `metrics`: the `metrics` module |
//!
//! # The default stack
//!
//! ```text
//! caller ──► ConcurrencyGate ──► Retry ──► RateLimit (per connection) ──► HTTP client
//!            p in flight,         backoff,    token bucket per key,
//!            queue 10 + p,        max(policy, cool-down on 429/503
//!            refuse beyond        Retry-After)  with Retry-After
//! ```
//!
//! The gate is outermost, so a request keeps its slot through its retries
//! and overload is refused at the door, at once, with a typed error. Every
//! attempt passes its connection's bucket, so retries spend quota like
//! first tries. A 429 with `Retry-After` on one request pauses its whole
//! connection, instead of each request earning its own 429, and teaches
//! the connection a pace; so in this stack a throttled request retries
//! after the server's `Retry-After` alone, its connection spacing it
//! ([`TollgateBuilder::retry_after_alone`]). Build it with
//! [`Tollgate::builder`] or [`ServiceBuilderExt`]; each layer also stands
//! alone.
//!
//! # Around your client
//!
//! hyper-util's client is a `tower::Service<http::Request<B>>` already:
//!
//! ```no_run
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tollgate::Tollgate;
//! use tower::ServiceExt;
//!
//! # async fn run() -> Result<(), tower::BoxError> {
//! let hyper = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let client = Tollgate::builder().parallelism(10).build(hyper)?;
//! let request = http::Request::post("http://127.0.0.1:8080/leads")
//!     .body(Full::new(Bytes::from_static(br#"{"lead":1}"#)))?;
//! let response = client.oneshot(request).await?;
//! # let _ = response;
//! # Ok(())
//! # }
//! ```
//!
//! reqwest's is a `Service<reqwest::Request>`; with feature `reqwest`,
//! `tollgate::reqwest::Client` adapts it (`Bytes`, `String` and `Vec<u8>`
//! bodies are resent on a retry, streams sent once):
//!
#![cfg_attr(
    feature = "reqwest",
    doc = r##"
```no_run
use tollgate::Tollgate;
use tower::ServiceExt;

# async fn run() -> Result<(), tower::BoxError> {
let client = Tollgate::builder()
    .parallelism(10)
    .build(tollgate::reqwest::Client::from(reqwest::Client::new()))?;
let request = http::Request::post("http://127.0.0.1:8080/leads")
    .body(String::from(r#"{"lead":1}"#))?;
let response = reqwest::Response::from(client.oneshot(request).await?);
println!("{}", response.text().await?);
# Ok(())
# }
```
"##
)]
//!
//! Errors of tollgate's own are [`Error`]; services return
//! [`tower::BoxError`], from which `downcast_ref::<tollgate::Error>()`
//! recovers them.

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    unreachable_pub,
    rust_2018_idioms,
    missing_debug_implementations
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod builder;
pub mod concurrency;
mod error;
mod ext;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
pub mod rate_limit;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest;
pub mod retry;
mod sync;
#[cfg(test)]
mod test_util;
pub mod testing;
mod timer;

pub use builder::{Tollgate, TollgateBuilder, TollgateLayer, TollgateService};
pub use concurrency::{ConcurrencyGate, ConcurrencyGateLayer};
pub use error::Error;
pub use ext::ServiceBuilderExt;
pub use rate_limit::{ConnectionKey, Quota, RateLimit, RateLimitLayer};
pub use retry::{retry_after, Backoff, Jitter, Retry, RetryBudget, RetryLayer};

/// The README's examples, compiled and run as doctests (with features
/// `reqwest`, `redis` and `metrics`, which three of them use; CI runs all
/// features).
#[cfg(all(doctest, feature = "reqwest", feature = "redis", feature = "metrics"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
