//! The throttling comparison against a real HTTP server on 127.0.0.1, with
//! reqwest as the client, in real time (feature `reqwest`).
//!
//! ```text
//! scripts/bench.sh                                  # starts nginx, runs this
//! TOLLGATE_SERVER=http://127.0.0.1:8089 cargo bench --features reqwest --bench real_server
//! ```
//!
//! The server (`scripts/nginx.conf`): nginx's `limit_req` keyed on the
//! `x-connection` header, 500 requests a second per connection with a
//! burst of 20 (`nodelay`), `429` with `Retry-After: 1` beyond. Without
//! `TOLLGATE_SERVER` the run starts the examples' own throttling server
//! (fixed one-second windows) instead, and says so. The last row asks for
//! `/policy/leads/...`, where nginx limits the same and states it on every
//! response (`RateLimit-Policy: "default";q=500;w=1`).
//!
//! 5,000 leads (`LEADS` to change; the naive client takes minutes; `ONLY`
//! keeps the rows whose name has it), over 2 connections; the clients are
//! those of the simulation (`benches/throttled.rs`), around one reqwest
//! client each.

#[path = "../examples/common/mod.rs"]
mod example_server;

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{Request, Response, StatusCode};
use tollgate::{Backoff, ConnectionKey, Quota, Tollgate};
use tower::{BoxError, ServiceBuilder, ServiceExt};

use common::{TowerPolicy, RETRIES};

const PER_SECOND: u32 = 500;
const BURST: u32 = 20;
const PARALLELISM: usize = 50;

#[derive(Default)]
struct Tally {
    succeeded: AtomicU64,
    failed: AtomicU64,
    attempts: AtomicU64,
    throttled: AtomicU64,
}

impl Tally {
    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn record<R>(&self, outcome: Result<Response<R>, BoxError>) {
        match outcome {
            Ok(response) if response.status().is_success() => &self.succeeded,
            _ => &self.failed,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
}

fn lead(base: &str, n: u64) -> Request<Bytes> {
    lead_at(base, "", n)
}

/// Lead `n` under `prefix` (`/policy`: the server states its policy).
fn lead_at(base: &str, prefix: &str, n: u64) -> Request<Bytes> {
    let connection = ["crm-1", "crm-2"][(n % 2) as usize];
    let mut request = Request::get(format!("{base}{prefix}/leads/{n}"))
        .header("x-connection", connection)
        .body(Bytes::new())
        .expect("a valid request");
    request
        .extensions_mut()
        .insert(ConnectionKey::new(connection));
    request
}

/// reqwest as a service, counting what reaches the wire.
fn counted(
    tally: &'static Tally,
) -> impl tower::Service<
    Request<Bytes>,
    Response = Response<reqwest::Body>,
    Error = BoxError,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    let client = tollgate::reqwest::Client::from(reqwest::Client::new());
    tower::service_fn(move |request: Request<Bytes>| {
        let client = client.clone();
        async move {
            tally.attempts.fetch_add(1, Ordering::Relaxed);
            let response = client.oneshot(request).await?;
            if response.status() == StatusCode::TOO_MANY_REQUESTS {
                tally.throttled.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, BoxError>(response)
        }
    })
}

async fn run(client: usize, base: &str, leads: u64, tally: &'static Tally) {
    let wire = counted(tally);
    match client {
        0 => {
            stream::iter(0..leads)
                .for_each_concurrent(PARALLELISM, |n| {
                    let wire = wire.clone();
                    async move {
                        let mut attempt = 0;
                        let outcome = loop {
                            let outcome = wire.clone().oneshot(lead(base, n)).await;
                            let throttled = matches!(&outcome, Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS);
                            if !throttled || attempt == RETRIES {
                                break outcome;
                            }
                            tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
                            attempt += 1;
                        };
                        tally.record(outcome);
                    }
                })
                .await
        }
        1 => {
            let stack = ServiceBuilder::new()
                .concurrency_limit(PARALLELISM)
                .retry(TowerPolicy::new())
                .service(wire);
            stream::iter(0..leads)
                .for_each_concurrent(PARALLELISM + 10 + PARALLELISM, |n| {
                    let stack = stack.clone();
                    async move { tally.record(stack.oneshot(lead(base, n)).await) }
                })
                .await
        }
        _ => {
            let prefix = if client == 5 { "/policy" } else { "" };
            let quota = if client == 2 {
                Quota::per_second(PER_SECOND).burst(BURST)
            } else {
                Quota::unlimited()
            };
            let stack = Tollgate::builder()
                .parallelism(PARALLELISM)
                .per_connection(quota)
                .learn_rate(client != 4)
                .retry(Backoff::power_automate().seed(7))
                .build(wire)
                .expect("a valid configuration");
            stream::iter(0..leads)
                .for_each_concurrent(PARALLELISM + 10 + PARALLELISM, |n| {
                    let stack = stack.clone();
                    async move { tally.record(stack.oneshot(lead_at(base, prefix, n)).await) }
                })
                .await
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let leads: u64 = std::env::var("LEADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5_000);
    let base = match std::env::var("TOLLGATE_SERVER") {
        Ok(base) => {
            println!("server: {base} (nginx limit_req: {PER_SECOND}/s per x-connection, burst {BURST}, Retry-After: 1)");
            base
        }
        Err(_) => {
            let (addr, _) = example_server::throttled_server(PER_SECOND).await?;
            println!("server: the examples' own, http://{addr} ({PER_SECOND} per one-second window per x-connection; TOLLGATE_SERVER unset)");
            format!("http://{addr}")
        }
    };
    println!("{leads} leads over 2 connections, reqwest underneath every client\n");
    println!("| client | completed | failed | attempts per success | 429s caused | wall time | goodput (of capacity) |");
    println!("|---|---|---|---|---|---|---|");
    let names = [
        "naive: p = 50, own retries 1-2-4-8 s, ignores Retry-After",
        "tower: ConcurrencyLimit(50) + retry, exponential with jitter",
        "tollgate builder, p = 50, quota 500/s burst 20",
        "tollgate builder, p = 50, no quota (429s teach the pace)",
        "tollgate builder, p = 50, no quota, `learn_rate(false)`",
        "tollgate builder, p = 50, no quota, the server states `RateLimit-Policy: q=500;w=1`",
    ];
    let only = std::env::var("ONLY").unwrap_or_default();
    for (client, name) in names.into_iter().enumerate() {
        if !name.contains(&only) {
            continue;
        }
        // Let the server's buckets refill between clients.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let tally: &'static Tally = Box::leak(Box::default());
        let started = Instant::now();
        run(client, &base, leads, tally).await;
        let wall = started.elapsed();
        let succeeded = Tally::get(&tally.succeeded);
        assert_eq!(
            succeeded + Tally::get(&tally.failed),
            leads,
            "a lead was lost"
        );
        let goodput = succeeded as f64 / (2.0 * f64::from(PER_SECOND) * wall.as_secs_f64());
        println!(
            "| {name} | {succeeded} | {} | {:.3} | {} | {:.1?} | {goodput:.3} |",
            Tally::get(&tally.failed),
            Tally::get(&tally.attempts) as f64 / succeeded.max(1) as f64,
            Tally::get(&tally.throttled),
            wall,
        );
    }
    Ok(())
}
