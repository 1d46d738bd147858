//! The "throttled to death" simulation: a million CRM leads pushed over 2
//! connections into a server that allows each connection 100 requests a
//! second, by three clients side by side, in virtual time.
//!
//! ```text
//! cargo bench --bench throttled                 # 1,000,000 leads
//! LEADS=20000 cargo bench --bench throttled     # a shorter run
//! ONLY=tollgate cargo bench --bench throttled   # the rows whose name has it
//! ```
//!
//! Deterministic: tokio's clock is paused (it jumps to the next timer when
//! every task waits), the network delay and every jitter come from fixed
//! seeds, and the runtime has one thread. The same binary prints the same
//! table every run.
//!
//! The server (`tests/common/servers.rs`, shared with `tests/learning.rs`):
//! per connection (the URI's host, `crm-0` or `crm-1`) a GCRA bucket of
//! 100 requests a second with a burst of 10, or fixed one-second windows of
//! 100, checked when a request arrives after a one-way network delay of
//! 1-5 ms; 20 ms of work for an accepted request; over the limit, `429` at
//! once with `Retry-After` in whole seconds (rounded up, at least 1), as
//! most servers send it.
//!
//! The clients, each fed the way its users feed it:
//! - **naive**: a Power Automate "apply to each" of degree 50; each branch
//!   retries a 429 on its own after 1, 2, 4, 8 s (no jitter), ignoring
//!   `Retry-After`; after 4 retries the lead fails.
//! - **tower**: `ConcurrencyLimit(50)` around `tower::retry` with tower's
//!   `ExponentialBackoff` (500 ms doubling to 16 s, jitter 1.0, a distinct
//!   seed per request), 4 retries on 429; fed 110 at a time
//!   (`for_each_concurrent`).
//! - **tollgate**: `Tollgate::builder()` defaults (power_automate retry,
//!   queue 10 + p) with parallelism 50 and the per-connection quota from
//!   the API's documentation (500/s, burst 10); fed `p + queue_limit` = 110
//!   at a time, so the gate never refuses (a refusal would be counted, not
//!   dropped).
//! - **tollgate, no quota**: the same without a quota: only the server's
//!   429s (each pausing its connection for `Retry-After`) hold it back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

mod common;
// The simulated servers of tests/learning.rs; this bench uses two kinds.
#[allow(dead_code)]
#[path = "../tests/common/servers.rs"]
mod servers;

use common::{mix, TowerPolicy, RETRIES};
use futures_util::stream::{self, StreamExt};
use http::{Request, Response, StatusCode};
use servers::{Kind, Server, Timing};
use tokio::time::Instant;
use tollgate::rate_limit::ByConnection;
use tollgate::{Backoff, ConcurrencyGateLayer, Quota, RateLimitLayer, ServiceBuilderExt, Tollgate};
use tower::{ServiceBuilder, ServiceExt};

const CONNECTIONS: u64 = 2;
/// Requests a second each connection may make.
const CAPACITY: u64 = 100;
const SERVER_BURST: u64 = 10;
const WORK: Duration = Duration::from_millis(20);
const PARALLELISM: usize = 50;

/// The bench's network and server: 1-5 ms to the server, 20 ms of work,
/// the answer back at once.
const TIMING: Timing = Timing {
    there: |arrival| Duration::from_millis(1 + mix(arrival) % 5),
    work: WORK,
    back: |_| Duration::ZERO,
};

fn lead(n: u64) -> Request<u64> {
    Request::post(format!("http://crm-{}/leads", n % CONNECTIONS))
        .body(n)
        .expect("a valid request")
}

#[derive(Default)]
struct Tally {
    succeeded: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
}

impl Tally {
    fn record(&self, outcome: Result<Response<()>, tower::BoxError>) {
        match outcome {
            Ok(response) if response.status().is_success() => &self.succeeded,
            Err(error) if error.downcast_ref::<tollgate::Error>().is_some() => &self.refused,
            _ => &self.failed,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
}

async fn naive(leads: u64, tally: &Tally, server: &Server) {
    stream::iter(0..leads)
        .for_each_concurrent(PARALLELISM, |n| async move {
            let mut attempt = 0;
            let outcome = loop {
                let outcome = server.clone().oneshot(lead(n)).await;
                let throttled =
                    matches!(&outcome, Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS);
                if !throttled || attempt == RETRIES {
                    break outcome;
                }
                tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
                attempt += 1;
            };
            tally.record(outcome);
        })
        .await;
}

async fn tower_stack(leads: u64, tally: &Tally, server: &Server) {
    let client = ServiceBuilder::new()
        .concurrency_limit(PARALLELISM)
        .retry(TowerPolicy::new())
        .service(server.clone());
    stream::iter(0..leads)
        .for_each_concurrent(PARALLELISM + 10 + PARALLELISM, |n| {
            let client = client.clone();
            async move { tally.record(client.oneshot(lead(n)).await) }
        })
        .await;
}

/// The stack the builder makes, and the same layers with the per-connection
/// cool-down switched off (`max_cool_down(0)`), for comparison.
async fn tollgate_stack(leads: u64, tally: &Tally, server: &Server, client: Client) {
    let backoff = Backoff::power_automate().seed(7);
    let client = match client {
        Client::Tollgate { quota, learn } => Tollgate::builder()
            .parallelism(PARALLELISM)
            .per_connection(quota)
            .learn_rate(learn)
            .retry(backoff)
            .build(server.clone())
            .expect("a valid configuration"),
        _ => ServiceBuilder::new()
            .layer(ConcurrencyGateLayer::new(PARALLELISM).share_by(ByConnection))
            .retry_backoff(backoff)
            .layer(
                RateLimitLayer::per_connection(Quota::unlimited())
                    .max_cool_down(Duration::ZERO)
                    .learn_rate(false),
            )
            .service(server.clone()),
    };
    let queue_limit = PARALLELISM + 10;
    stream::iter(0..leads)
        .for_each_concurrent(PARALLELISM + queue_limit, |n| {
            let client = client.clone();
            async move { tally.record(client.oneshot(lead(n)).await) }
        })
        .await;
}

#[derive(Clone, Copy)]
enum Client {
    Naive,
    Tower,
    Tollgate { quota: Quota, learn: bool },
    TollgateWithoutCoolDown,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Naive => "naive: p = 50, own retries 1-2-4-8 s, ignores Retry-After",
            Client::Tower => "tower: ConcurrencyLimit(50) + retry, exponential with jitter",
            Client::Tollgate { quota, learn } if quota == Quota::unlimited() => {
                if learn {
                    "tollgate builder, p = 50, no quota (429s pause the connection and teach its pace)"
                } else {
                    "tollgate builder, p = 50, no quota, `learn_rate(false)` (429s only pause the connection)"
                }
            }
            Client::Tollgate { .. } => {
                "tollgate builder, p = 50, quota 100/s burst 10 (the API's documented limit)"
            }
            Client::TollgateWithoutCoolDown => {
                "tollgate layers, p = 50, no quota, no cool-down, no learning"
            }
        }
    }
}

struct Run {
    tally: Tally,
    server: Server,
    virtual_time: Duration,
    real_time: std::time::Duration,
}

fn simulate(limit: Kind, client: Client, leads: u64) -> Run {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let real = std::time::Instant::now();
    let (tally, server, virtual_time) = runtime.block_on(async {
        let (tally, server) = (
            Tally::default(),
            Server::with_timing(limit, CAPACITY, TIMING),
        );
        let started = Instant::now();
        match client {
            Client::Naive => naive(leads, &tally, &server).await,
            Client::Tower => tower_stack(leads, &tally, &server).await,
            _ => tollgate_stack(leads, &tally, &server, client).await,
        }
        (tally, server, started.elapsed())
    });
    Run {
        tally,
        server,
        virtual_time,
        real_time: real.elapsed(),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; this binary has no criterion options.
    let leads: u64 = std::env::var("LEADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let documented = Quota::per_second(CAPACITY as u32).burst(SERVER_BURST as u32);
    let clients = [
        Client::Naive,
        Client::Tower,
        Client::Tollgate {
            quota: documented,
            learn: true,
        },
        Client::Tollgate {
            quota: Quota::unlimited(),
            learn: true,
        },
        Client::Tollgate {
            quota: Quota::unlimited(),
            learn: false,
        },
        Client::TollgateWithoutCoolDown,
    ];
    for (limit, how) in [
        (Kind::TokenBucket { burst: SERVER_BURST }, "a token bucket (burst 10); Retry-After: the next token's wait, rounded up to whole seconds"),
        (Kind::FixedWindow, "fixed one-second windows; Retry-After: the seconds left in the window"),
    ] {
        println!(
            "\n{leads} leads over {CONNECTIONS} connections; the server allows {CAPACITY}/s per connection in {how}; \
             {WORK:?} of work per request, 1-5 ms network delay\n"
        );
        println!(
            "| client | completed | failed | refused | attempts per success | 429s caused | virtual time | goodput (of capacity) | real time |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        let only = std::env::var("ONLY").unwrap_or_default();
        for client in clients.into_iter().filter(|c| c.name().contains(&only)) {
            report(client, simulate(limit, client, leads), leads);
        }
    }
}

fn report(client: Client, run: Run, leads: u64) {
    let succeeded = run.tally.succeeded.load(Ordering::Relaxed);
    let failed = run.tally.failed.load(Ordering::Relaxed);
    let refused = run.tally.refused.load(Ordering::Relaxed);
    assert_eq!(
        succeeded + failed + refused,
        leads,
        "{}: a lead was lost",
        client.name()
    );
    assert_eq!(succeeded, run.server.accepted());
    let attempts = run.server.arrivals();
    let seconds = run.virtual_time.as_secs_f64();
    let goodput = succeeded as f64 / ((CAPACITY * CONNECTIONS) as f64 * seconds);
    println!(
        "| {} | {succeeded} | {failed} | {refused} | {:.3} | {} | {:.1} s | {goodput:.3} | {:.1?} |",
        client.name(),
        attempts as f64 / succeeded.max(1) as f64,
        run.server.throttled(),
        seconds,
        run.real_time,
    );
}
