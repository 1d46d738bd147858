//! The "throttled to death" simulation: a million CRM leads pushed over 2
//! connections into a server that allows each connection 500 requests a
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
//! The server: per connection (the URI's host, `crm-0` or `crm-1`) a GCRA
//! bucket of 500 requests a second with a burst of 10, checked when a
//! request arrives after a one-way network delay of 1-5 ms; 20 ms of work
//! for an accepted request; over the limit, `429` at once with
//! `Retry-After` in whole seconds (rounded up, at least 1), as most servers
//! send it.
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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

mod common;

use common::{mix, TowerPolicy, RETRIES};
use futures_util::stream::{self, StreamExt};
use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tollgate::rate_limit::ByConnection;
use tollgate::{Backoff, ConcurrencyGateLayer, Quota, RateLimitLayer, ServiceBuilderExt, Tollgate};
use tower::{Service, ServiceBuilder, ServiceExt};

const CONNECTIONS: u64 = 2;
/// Requests a second each connection may make.
const CAPACITY: u64 = 100;
const SERVER_BURST: u64 = 10;
const WORK: Duration = Duration::from_millis(20);
const PARALLELISM: usize = 50;

#[derive(Default)]
struct ServerCounts {
    arrivals: AtomicU64,
    accepted: AtomicU64,
    throttled: AtomicU64,
}

/// How the server counts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Limit {
    /// A token bucket (GCRA): 100 a second, a burst of 10. `Retry-After`
    /// is the wait for the next token, rounded up to whole seconds.
    TokenBucket,
    /// 100 requests in each fixed one-second window (counted from the
    /// server's start). `Retry-After` is the time to the window's end,
    /// rounded up: exact, as in Power Platform's or GitHub's reset times.
    FixedWindow,
}

struct ServerState {
    limit: Limit,
    started: Instant,
    /// Per connection, GCRA's theoretical arrival time in ns since `started`.
    tat: [Mutex<u64>; CONNECTIONS as usize],
    counts: ServerCounts,
}

impl ServerState {
    /// `None` to accept, or the `Retry-After` seconds to answer with.
    fn admit(&self, connection: usize) -> Option<u64> {
        const SECOND: u64 = 1_000_000_000;
        const INTERVAL: u64 = SECOND / CAPACITY;
        const TOLERANCE: u64 = (SERVER_BURST - 1) * INTERVAL;
        let now = self.started.elapsed().as_nanos() as u64;
        let mut tat = self.tat[connection].lock().unwrap();
        if self.limit == Limit::FixedWindow {
            // `tat` holds (window << 32) | requests in it.
            let window = now / SECOND;
            if *tat >> 32 != window {
                *tat = window << 32;
            }
            if *tat & u64::from(u32::MAX) >= CAPACITY {
                return Some(((window + 1) * SECOND - now).div_ceil(SECOND));
            }
            *tat += 1;
            return None;
        }
        let allowed_at = tat.saturating_sub(TOLERANCE);
        if now < allowed_at {
            let wait = allowed_at - now;
            return Some(wait.div_ceil(1_000_000_000).max(1));
        }
        *tat = (*tat).max(now) + INTERVAL;
        None
    }
}

/// The simulated server as a `tower::Service`; the request's body is the
/// lead's number.
#[derive(Clone)]
struct Server(Arc<ServerState>);

impl Server {
    fn new(limit: Limit) -> Self {
        Server(Arc::new(ServerState {
            limit,
            started: Instant::now(),
            tat: Default::default(),
            counts: ServerCounts::default(),
        }))
    }

    fn count(&self, counter: fn(&ServerCounts) -> &AtomicU64) -> u64 {
        counter(&self.0.counts).load(Ordering::Relaxed)
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<()>, tower::BoxError>> + Send>>;

impl Service<Request<u64>> for Server {
    type Response = Response<()>;
    type Error = tower::BoxError;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<u64>) -> Answer {
        let state = Arc::clone(&self.0);
        let connection = usize::from(request.uri().host() == Some("crm-1"));
        let arrival = state.counts.arrivals.fetch_add(1, Ordering::Relaxed);
        let network = Duration::from_millis(1 + mix(arrival) % 5);
        Box::pin(async move {
            tokio::time::sleep(network).await;
            let mut response = Response::new(());
            match state.admit(connection) {
                None => {
                    tokio::time::sleep(WORK).await;
                    state.counts.accepted.fetch_add(1, Ordering::Relaxed);
                }
                Some(retry_after) => {
                    state.counts.throttled.fetch_add(1, Ordering::Relaxed);
                    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                    response
                        .headers_mut()
                        .insert("retry-after", retry_after.into());
                }
            }
            Ok(response)
        })
    }
}

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

fn simulate(limit: Limit, client: Client, leads: u64) -> Run {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let real = std::time::Instant::now();
    let (tally, server, virtual_time) = runtime.block_on(async {
        let (tally, server) = (Tally::default(), Server::new(limit));
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
        (Limit::TokenBucket, "a token bucket (burst 10); Retry-After: the next token's wait, rounded up to whole seconds"),
        (Limit::FixedWindow, "fixed one-second windows; Retry-After: the seconds left in the window"),
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
    assert_eq!(succeeded, run.server.count(|c| &c.accepted));
    let attempts = run.server.count(|c| &c.arrivals);
    let seconds = run.virtual_time.as_secs_f64();
    let goodput = succeeded as f64 / ((CAPACITY * CONNECTIONS) as f64 * seconds);
    println!(
        "| {} | {succeeded} | {failed} | {refused} | {:.3} | {} | {:.1} s | {goodput:.3} | {:.1?} |",
        client.name(),
        attempts as f64 / succeeded.max(1) as f64,
        run.server.count(|c| &c.throttled),
        seconds,
        run.real_time,
    );
}
