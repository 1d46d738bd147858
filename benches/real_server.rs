//! The throttling comparison against a real HTTP server on 127.0.0.1, with
//! reqwest as the client, in real time (feature `reqwest`).
//!
//! ```text
//! scripts/bench.sh                                  # starts nginx and HAProxy, runs this against each
//! TOLLGATE_SERVER=http://127.0.0.1:8089 cargo bench --features reqwest --bench real_server
//! TOLLGATE_SERVER=http://127.0.0.1:8091 TOLLGATE_SERVER_KIND=haproxy cargo bench --features reqwest --bench real_server
//! ```
//!
//! `TOLLGATE_SERVER` is the server's base URL; `TOLLGATE_SERVER_KIND` says
//! which of the two configurations it runs, for the heading (`nginx`, the
//! default, or `haproxy`):
//!
//! - `nginx` (`scripts/nginx.conf`): `limit_req`, a leaky bucket keyed on the
//!   `x-connection` header, 500 requests a second per connection with a
//!   burst of 20 (`nodelay`), `429` with `Retry-After: 1` beyond; a refused
//!   request is not counted.
//! - `haproxy` (`scripts/haproxy.cfg`): a stick table's `http_req_rate(1s)`
//!   keyed on `x-connection`, a sliding one-second window (HAProxy's
//!   estimate of it), 500 requests per connection, `429` with
//!   `Retry-After: 1` beyond; every request counts, the refused ones too
//!   (as SharePoint's throttling does).
//!
//! Both answer `/policy/leads/...`, the last row, with the same limit and
//! state it on every response (`RateLimit-Policy: "default";q=500;w=1`).
//! Without `TOLLGATE_SERVER` the run starts the examples' own throttling
//! server (fixed one-second windows) instead, and says so.
//!
//! 5,000 leads (`LEADS` to change; the naive client and the cool-down alone
//! take minutes), over 2 connections; `ONLY` keeps the rows whose name has
//! it, `SKIP` (comma-separated) leaves out those whose name has any of its
//! parts, and the run says which it left out. The clients are those of the
//! simulation (`benches/throttled.rs`), around one reqwest client each.

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

/// The servers `TOLLGATE_SERVER_KIND` names, for the heading.
const NGINX: &str = "nginx (scripts/nginx.conf): limit_req, a leaky bucket, \
    500/s per x-connection, burst 20, 429 with Retry-After: 1, refused requests not counted";
const HAPROXY: &str = "HAProxy (scripts/haproxy.cfg): http_req_rate(1s), a sliding \
    one-second window, 500 per x-connection, 429 with Retry-After: 1, refused requests counted too";

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
            let kind = std::env::var("TOLLGATE_SERVER_KIND").ok();
            let (semantics, assumed) = match kind.as_deref() {
                None => (NGINX, " (TOLLGATE_SERVER_KIND unset: nginx assumed)"),
                Some("nginx") => (NGINX, ""),
                Some("haproxy") => (HAPROXY, ""),
                Some(other) => {
                    let error = format!("TOLLGATE_SERVER_KIND={other:?}: want nginx or haproxy");
                    return Err(error.into());
                }
            };
            println!("server: {base}, {semantics}{assumed}");
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
    // Each row, and for the two whose retries wait whole seconds a 429 on
    // their own clock, why a long run leaves them out.
    let rows = [
        (
            "naive: p = 50, own retries 1-2-4-8 s, ignores Retry-After",
            "its retries wait 1-2-4-8 s after each 429",
        ),
        (
            "tower: ConcurrencyLimit(50) + retry, exponential with jitter",
            "",
        ),
        ("tollgate builder, p = 50, quota 500/s burst 20", ""),
        (
            "tollgate builder, p = 50, no quota (429s teach the pace)",
            "",
        ),
        (
            "tollgate builder, p = 50, no quota, `learn_rate(false)`",
            "each 429 pauses the connection, and the pace never slows",
        ),
        (
            "tollgate builder, p = 50, no quota, the server states `RateLimit-Policy: q=500;w=1`",
            "",
        ),
    ];
    let only = std::env::var("ONLY").unwrap_or_default();
    let skip = std::env::var("SKIP").unwrap_or_default();
    let skipped = |name: &str| {
        skip.split(',')
            .any(|part| !part.is_empty() && name.contains(part))
    };
    let mut left_out = Vec::new();
    for (client, (name, slow)) in rows.into_iter().enumerate() {
        if !name.contains(&only) {
            continue;
        }
        if skipped(name) {
            left_out.push((name, slow));
            continue;
        }
        // Let the server's counters empty between clients.
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
    if !left_out.is_empty() {
        println!();
    }
    for (name, slow) in left_out {
        let why = if slow.is_empty() {
            String::new()
        } else {
            format!(" ({slow}; against nginx, minutes for 5,000 leads)")
        };
        println!("left out (SKIP={skip:?}): {name}{why}");
    }
    Ok(())
}
