//! The concurrency gate: `parallelism` in flight, a bounded FIFO queue,
//! an immediate refusal beyond.
//!
//! Power Automate's "degree of parallelism" runs at most `p` at once and
//! queues up to **10 + p** waiting runs; beyond that new work is refused,
//! which is what protects a downstream server when a million CRM leads
//! arrive at once. [`ConcurrencyGateLayer`] does the same for any
//! `tower::Service`:
//!
//! - the first `parallelism` callers run;
//! - the next `queue_limit` (default `10 + parallelism`) wait, and are
//!   admitted in strict arrival order as slots free up;
//! - the next caller's future fails with [`Error::QueueFull`](crate::Error::QueueFull)
//!   on its first poll, without waiting;
//! - with [`queue_timeout`](ConcurrencyGateLayer::queue_timeout), a waiter
//!   not admitted in time fails with [`Error::QueueTimeout`](crate::Error::QueueTimeout).
//!
//! At no instant are more than `parallelism + queue_limit` requests inside
//! the gate: each decision is made under one lock. tower's
//! `ConcurrencyLimit` queues without bound; the usual advice, `LoadShed` in
//! front of it (tower#793), refuses whenever any inner service is not ready
//! rather than when a queue is full, and with a `Buffer` between them can
//! refuse with permits to spare (apollographql/router#9034). .NET's
//! `ConcurrencyLimiter` has a `QueueLimit`, which this matches.
//!
//! Slots and queue places are owned guards held by the response future, so
//! dropping a future at any point gives back what it held. loom models of
//! admission, release, cancellation and re-sizing (`src/concurrency/queue.rs`,
//! run by CI) check that no wake-up is lost and no slot leaks or is counted
//! twice. See
//! [`ConcurrencyGate`] for how `poll_ready` and `call` divide the work, and
//! [`ConcurrencyGateHandle`] for live figures and run-time parallelism.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tollgate::testing::{Reply, Script};
//! use tollgate::{ConcurrencyGateLayer, Error};
//! use tower::{Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // A server that takes a second per request, behind 2 slots and 1 place.
//! let server = Script::new().reply(Reply::status(200).after(Duration::from_secs(1)));
//! let client = ConcurrencyGateLayer::new(2).queue_limit(1).layer(server.service());
//!
//! let requests = (0..4).map(|_| client.clone().oneshot(http::Request::new(())));
//! let results = futures_util::future::join_all(requests).await;
//!
//! // Two ran, one waited its turn, the fourth was refused at once.
//! assert!(results[..3].iter().all(|r| r.is_ok()));
//! let refused = results[3].as_ref().unwrap_err();
//! assert_eq!(refused.downcast_ref::<Error>(), Some(&Error::QueueFull));
//! assert_eq!(client.handle().refused(), 1);
//! # }
//! ```

mod future;
mod layer;
mod line;
mod queue;
mod seat;
mod service;

pub use future::ResponseFuture;
pub use layer::ConcurrencyGateLayer;
pub(crate) use line::line_of;
pub use line::{LineOf, OneLine};
pub(crate) use seat::SeatLoan;
pub use service::{ConcurrencyGate, ConcurrencyGateHandle};
