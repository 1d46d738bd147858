//! Token buckets per connection, paused when the server says so.
//!
//! Power Automate applies its throttling limits **per connection** (e.g.
//! SharePoint: 600 calls per 60 s per connection), and users spread load over
//! several connections to multiply capacity. [`RateLimitLayer`] does the same
//! for any HTTP client: one token bucket per [`ConnectionKey`] (by default the
//! request's scheme and authority), so each connection spends its own
//! [`Quota`].
//!
//! # Cool-down: one 429 pauses the whole connection
//!
//! When many requests share a connection and each meets its own 429, each
//! retries on its own clock and the connection is "throttled to death". So
//! when a response is `429` or `503` with a `Retry-After` (or
//! `retry-after-ms`, `x-ms-retry-after-ms`; see
//! [`retry_after`](crate::retry_after)), the layer pauses that connection's
//! bucket until then:
//!
//! - every request on the connection waits, including those already waiting;
//!   other connections are untouched;
//! - a shorter later `Retry-After` never shortens a longer cool-down;
//! - when it ends, the connection gets **one** token and refills at its
//!   quota's rate: releasing a full burst at the instant the server named
//!   would be the stampede that earned the 429;
//! - a server asking for more than
//!   [`max_cool_down`](RateLimitLayer::max_cool_down) (default 5 minutes)
//!   pauses the connection that long.
//!
//! That is the whole pause for a connection nothing spaces yet (a herd).
//! Once the connection has learned a pace (below), its requests are spaced
//! already, and a later 429 pauses it only for the share of `Retry-After`
//! its pace was over the server's rate: a rounded-up `Retry-After: 1` for
//! a pace 2% too fast is 20 ms of silence, not a second.
//!
//! # Learned pace: a 429 also slows the connection down
//!
//! A cool-down is only as good as the server's `Retry-After`. When it names
//! the end of a fixed window, pausing until then is exact. When a
//! token-bucket server rounds "10 ms" up to `Retry-After: 1`, the
//! connection idles for the second, then every request that waited goes at
//! once, overruns the server's burst and earns the next 429: without a
//! quota, 0.12 of the server's capacity in `benches/throttled.rs`. So, unless
//! [`learn_rate(false)`](RateLimitLayer::learn_rate), a 429 (or a 503 with
//! `Retry-After`) also teaches the connection a **pace**: requests sent
//! evenly, one at a time, just under the rate that earned it, and never
//! faster than the quota.
//!
//! - The first 429 of a connection that sent at least 10 requests pauses
//!   it for the whole `Retry-After` and gives an estimate (between the
//!   rate it sent at and that rate spread over the pause too); it doubles
//!   every 0.5 s until the next 429, which takes the pace of a quarter
//!   second before.
//! - Each later 429 sets the pace to the rate it was sent at, less what the
//!   server's burst may have hidden (more when it came soon after the
//!   connection resumed), or to what the server accepted over the last
//!   second if that is less (a window server's limit). A paced connection
//!   is no herd: it pauses only for the excess's share of `Retry-After`
//!   (milliseconds after a pace 1% too fast, not a rounded-up second).
//!   The pace restarts at 90%, climbs back to 99.5% within a second, holds
//!   there 5 s (longer each time a lesson confirms the last, up to 10
//!   minutes), then probes upward (3.5% a second) until the next 429, so a
//!   pace cut too deep, or capacity that grew, is found again. 30 minutes
//!   without a 429 and it is forgotten.
//! - Only the first 429 of an episode teaches: the 429s of requests sent
//!   before the connection resumed belong to the crowd that earned the
//!   first one.
//!
//! Against four kinds of server (`tests/learning.rs`: nginx's leaky bucket,
//! a sliding window that counts throttled requests too, fixed windows, a
//! token bucket rounding `Retry-After` up; 500/s per connection, 2
//! connections) the builder's stack without a quota reaches 0.73-0.84 of
//! capacity on 5-second imports and 0.93-0.96 on 30-second ones, losing
//! nothing; over a million leads, 0.99 of a rounding token bucket's and
//! 0.98 of fixed windows' (`benches/throttled.rs`). A server with no burst at all (one request per interval,
//! nothing early) costs a few more 429s while the pace settles:
//! `tests/rate_limit.rs` checks it. [`RateLimitHandle::rate_cuts`] counts
//! the lessons and [`Buckets::learned_rate`] reads a connection's pace.
//!
//! # Published limits: the server says its limit before it throttles
//!
//! Many servers state their limit on every response: the IETF draft's
//! `RateLimit-Policy` and `RateLimit` fields, the older `RateLimit-*` and
//! `X-RateLimit-*` headers (GitHub, X, Discord, Kong...; see
//! [`published`] for which are read and how). Unless
//! [`learn_from_headers(false)`](RateLimitLayer::learn_from_headers), the
//! layer reads them: a stated policy paces the connection at 99% of it
//! before any 429; a response saying no requests remain pauses the
//! connection until the stated reset; a 429 without `Retry-After` waits
//! for that reset. `Retry-After` wins when both are there.
//! `tests/published.rs` checks each.
//!
//! # Waiting
//!
//! The key depends on the request, so the wait happens in the response
//! future, not in `poll_ready` (which only passes the inner service's
//! readiness through). A request whose token is there, with nobody waiting
//! on its connection, takes it and is sent from `call`, as
//! `tower::limit::RateLimit` spends its permit there (and its future carries
//! nothing but the inner one's). Any other sleeps in its future until the
//! bucket says a token will be ready, then tries again; it takes the token
//! and sends the request in the same poll, so dropping a waiting request
//! never wastes a token. With
//! [`max_wait`](RateLimitLayer::max_wait), a request whose token is further
//! away fails at once with [`Error::RateLimited`](crate::Error::RateLimited).
//!
//! Requests waiting on one connection wait in line: only the first sleeps
//! until its token, the others until the one ahead of them is served, so a
//! token costs one wake-up however many wait, and they are served in order
//! of arrival. A cool-down wakes only the first in line. A loom model of
//! the line (`src/rate_limit/waitlist.rs`, run by CI) checks that no
//! departure, however it interleaves, leaves the next request unwoken.
//!
//! # The bucket
//!
//! GCRA arithmetic on one atomic `u64` per key, lock-free, as in governor;
//! keys live in a bounded, sharded store ([`Buckets`]); [`Bucket`] is the
//! same bucket without keys. Hand-written rather than wrapping governor
//! because governor's state has no way to push a key's TAT forward (the
//! cool-down) and its keyed store keeps every key until the caller runs
//! `retain_recent()` (governor#171), where ours is bounded by itself; at
//! equal clocks it costs what governor does (`BENCHMARKS.md`). governor's
//! default is faster by reading the CPU's TSC, which would leave tokio's
//! virtual time, and with it every test of this crate's users.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tollgate::testing::{Reply, Script};
//! use tollgate::{Quota, RateLimitLayer};
//! use tower::{Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let server = Script::new()
//!     .reply(Reply::status(429).retry_after(Duration::from_secs(10)))
//!     .reply(200);
//! let client = RateLimitLayer::per_connection(Quota::per_second(100)).layer(server.service());
//! let get = || http::Request::get("http://127.0.0.1:8080/leads").body(()).unwrap();
//!
//! let throttled = client.clone().oneshot(get()).await?;
//! assert_eq!(throttled.status(), 429);
//! // The whole connection now waits the 10 s out, not just that request.
//! let started = tokio::time::Instant::now();
//! client.clone().oneshot(get()).await?;
//! assert_eq!(started.elapsed(), Duration::from_secs(10));
//! assert_eq!(client.handle().cool_downs(), 1);
//! # Ok(())
//! # }
//! ```

pub(crate) mod bucket;
mod future;
mod key;
mod keyed;
mod layer;
pub(crate) mod meter;
pub(crate) mod pace;
/// Reading the rate limits a server publishes in its response headers.
pub mod published;
mod quota;
mod service;
mod waitlist;

pub use bucket::Bucket;
pub use future::ResponseFuture;
pub use key::{ByConnection, ConnectionKey, KeyOf};
pub use keyed::Buckets;
pub use layer::RateLimitLayer;
pub use quota::Quota;
pub use service::{RateLimit, RateLimitHandle};
