//! The concurrency gate: `parallelism` in flight, a bounded queue, an
//! immediate refusal beyond.
//!
//! Power Automate's "degree of parallelism" runs at most `p` at once and
//! queues up to **10 + p** waiting runs; beyond that new work is refused,
//! which is what protects a downstream server when a million CRM leads
//! arrive at once. [`ConcurrencyGateLayer`] does the same for any
//! `tower::Service`:
//!
//! - the first `parallelism` callers run;
//! - the next `queue_limit` (default `10 + parallelism`) wait, and are
//!   admitted in arrival order as slots free up (in turn between
//!   connections with [`share_by`](ConcurrencyGateLayer::share_by));
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
//! # What a slot is: a request working on a server
//!
//! A slot bounds the requests **working on servers**: sent and not yet
//! answered, or sleeping between their own retries (a request keeps its
//! slot through its retries). A request that is admitted but must wait
//! for its connection's token (the connection is paused by a 429, or out
//! of tokens, or others are ahead of it in the connection's line) is not
//! working: the [`RateLimit`](crate::RateLimit) inside **lends its slot
//! back** to the gate while it waits, and a ready request, of another
//! connection, runs in it. Without that, one 429 with `Retry-After: 10`
//! on connection `a` let `a`'s waiting requests hold every slot, and
//! connection `b` completed 15 requests in those 10 s instead of 10,000
//! (`tests/fairness.rs`, `benches/paused.rs`: 8,991 now, one slot staying
//! with `a`'s request that sleeps before its retry).
//!
//! - A lent slot counts against `queue_limit`: a request waiting for a
//!   token is a waiting request. So `parallelism` working and
//!   `queue_limit` waiting still bound the gate, and a new request is
//!   refused at once when both are full. If no waiting place is free the
//!   request keeps its slot, and lends it as soon as a request starts
//!   waiting for one (a swap: the waiting count does not change).
//! - Before it is sent, the request takes a slot back: at once if one is
//!   free and nobody waits, else in its connection's line with the ticket
//!   of its first arrival, ahead of every later request of its connection.
//! - The rate limiter finds the slot through the gate's response future,
//!   which, while it polls inside, leaves its slot where code on the same
//!   thread can reach it (as `tracing` keeps the current span). A stack
//!   that polls the rate limiter on another task (a `tower::buffer::Buffer`
//!   between them) does not lend: its requests keep their slots while they
//!   wait, as before.
//! - If the rate limiter's future is dropped while its slot is lent (an
//!   attempt timed out), the gate's future takes a slot back before it lets
//!   the request go on, so a retry does not sleep without one, and a retry
//!   sent at once waits for a slot before it goes (`tests/fairness.rs`).
//! - One attempt of a request at a time: a layer between the gate and the
//!   rate limiter that hedges (two attempts at once) shares one slot
//!   between them.
//!
//! # Fair between connections: round-robin
//!
//! With [`share_by`](ConcurrencyGateLayer::share_by) (the
//! [`Tollgate`](crate::Tollgate) builder shares by its connection key),
//! waiting requests stand in one line per connection and the lines take
//! the freed slots in turn; within a line, first come first served. A
//! connection that queues a burst of 100 takes one slot per round, not
//! the next 100: round-robin rather than FIFO with a per-connection cap,
//! because a cap must be tuned to the number of connections, and
//! round-robin gives each connection with waiting work an equal share
//! however many there are, and a lone connection every slot. The lines
//! share the queue's places first come first served: a caller that fills
//! the whole queue still has every place (keep `parallelism +
//! queue_limit` in hand across all callers to never be refused). Without
//! `share_by` the gate keeps one line (any request type, not only HTTP).
//!
//! Slots, queue places and loans are owned guards held by the response
//! futures, so dropping a future at any point gives back what it held.
//! loom models of admission, release, cancellation, re-sizing, lending and
//! taking back (`src/concurrency/queue.rs`, run by CI) check that no
//! wake-up is lost and no slot leaks or is counted twice. See
//! [`ConcurrencyGate`] for how `poll_ready` and `call` divide the work, and
//! [`ConcurrencyGateHandle`] for live figures and run-time parallelism.
//!
//! # A batch, and a parallelism that finds the server's knee
//!
//! [`ConcurrencyGate::send_all`] drives a stream of requests through the
//! gate, keeping exactly what it admits in hand, so a batch of any size is
//! never refused. [`ConcurrencyGateLayer::adaptive_parallelism`] lets the
//! parallelism follow a server that publishes no limit: it rises while the
//! server's latency stays flat and settles a few requests past the
//! concurrency where the server starts to queue (`src/concurrency/adaptive.rs` says how
//! and why, constant by constant).
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

mod adaptive;
mod future;
mod layer;
mod line;
mod queue;
mod seat;
mod send_all;
mod service;

pub(crate) use adaptive::{check_range, Sample};
pub use future::ResponseFuture;
pub use layer::ConcurrencyGateLayer;
pub(crate) use line::line_of;
pub use line::{LineOf, OneLine};
pub(crate) use queue::Gate;
pub(crate) use seat::SeatLoan;
pub use send_all::SendAll;
pub use service::{ConcurrencyGate, ConcurrencyGateHandle};
