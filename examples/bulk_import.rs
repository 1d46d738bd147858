//! The seed story: 10,000 CRM leads pushed over 2 connections into a server
//! that allows each connection 500 requests a second and answers 429 with
//! `Retry-After` beyond that. Once with a naive client, once through
//! tollgate's default stack; a progress line each second, a table at the end.
//!
//! ```text
//! cargo run --example bulk_import
//! ```
//!
//! The naive client is a workflow engine that starts 3,000 flow runs at once
//! (a run per lead, as a trigger does); each retries a 429 on its own
//! schedule (1 s, 2 s, 4 s: one try plus three retries), ignoring the
//! server's `Retry-After`, as many clients do. tollgate's stack runs 50 at a
//! time with a queue of 60, holds each connection to 475 a second (just
//! under the server's limit, as you would set it from the API's docs), and
//! retries with a backoff that never undercuts `Retry-After`. A third run
//! sets no quota (`Quota::unlimited()`, the builder's default) and relies on
//! the server's 429s: each pauses its whole connection until `Retry-After`
//! and teaches it a pace just under the rate that earned it.

mod common;

use common::{lead, CONNECTIONS};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tollgate::{Backoff, Error, Jitter, Quota, Tollgate};
use tower::{BoxError, Service, ServiceExt};

const LEADS: u64 = 10_000;
const SERVER_PER_SECOND: u32 = 500;
/// Flow runs started at once by the naive workflow engine.
const NAIVE_CALLERS: usize = 3_000;

#[derive(Debug, Default)]
struct Tally {
    succeeded: AtomicU64,
    lost: AtomicU64,
    refused: AtomicU64,
    attempts: AtomicU64,
    throttled: AtomicU64,
}

impl Tally {
    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Prints a progress line each second until aborted.
fn progress(
    name: &'static str,
    tally: Arc<Tally>,
    started: Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick =
            tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
        loop {
            tick.tick().await;
            println!(
                "  {name} {:>3.0?}: {:>5} succeeded, {:>5} lost, {:>5} refused, {:>6} 429s seen",
                started.elapsed(),
                Tally::get(&tally.succeeded),
                Tally::get(&tally.lost),
                Tally::get(&tally.refused),
                Tally::get(&tally.throttled),
            );
        }
    })
}

async fn naive(addr: std::net::SocketAddr) -> (Arc<Tally>, Duration) {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let ticker = progress("naive   ", Arc::clone(&tally), started);
    stream::iter(0..LEADS)
        .for_each_concurrent(NAIVE_CALLERS, |n| {
            let (client, tally) = (client.clone(), Arc::clone(&tally));
            async move {
                for retry in 0..4u32 {
                    if retry > 0 {
                        tokio::time::sleep(Duration::from_secs(1 << (retry - 1))).await;
                    }
                    tally.attempts.fetch_add(1, Ordering::Relaxed);
                    let Ok(response) = client.request(lead(addr, n)).await else {
                        continue;
                    };
                    let status = response.status();
                    let _ = response.into_body().collect().await;
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        tally.throttled.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if status.is_success() {
                        tally.succeeded.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    break;
                }
                tally.lost.fetch_add(1, Ordering::Relaxed);
            }
        })
        .await;
    ticker.abort();
    (tally, started.elapsed())
}

async fn with_tollgate(
    name: &'static str,
    addr: std::net::SocketAddr,
    quota: Quota,
) -> Result<(Arc<Tally>, Duration), BoxError> {
    let http = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let tally = Arc::new(Tally::default());
    // Count what reaches the wire, below every tollgate layer.
    let counted = {
        let tally = Arc::clone(&tally);
        tower::service_fn(move |request: Request<Full<Bytes>>| {
            let (mut http, tally) = (http.clone(), Arc::clone(&tally));
            async move {
                tally.attempts.fetch_add(1, Ordering::Relaxed);
                let response: Response<Incoming> = http.call(request).await?;
                if response.status() == StatusCode::TOO_MANY_REQUESTS {
                    tally.throttled.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, BoxError>(response)
            }
        })
    };
    let parallelism = 50;
    let client = Tollgate::builder()
        .parallelism(parallelism)
        .per_connection(quota)
        .retry(
            Backoff::exponential(Duration::from_millis(250))
                .max_retries(4)
                .jitter(Jitter::Full),
        )
        .build(counted)?;
    let started = Instant::now();
    let ticker = progress(name, Arc::clone(&tally), started);
    // The importer keeps as many leads in hand as the gate admits (50 in
    // flight, 60 waiting), so none is refused.
    stream::iter(0..LEADS)
        .for_each_concurrent(parallelism + 10 + parallelism, |n| {
            let (client, tally) = (client.clone(), Arc::clone(&tally));
            async move {
                match client.oneshot(lead(addr, n)).await {
                    Ok(response) if response.status().is_success() => {
                        let _ = response.into_body().collect().await;
                        tally.succeeded.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) if error.downcast_ref::<Error>() == Some(&Error::QueueFull) => {
                        tally.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        tally.lost.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
        .await;
    ticker.abort();
    Ok((tally, started.elapsed()))
}

fn row(name: &str, tally: &Tally, wall: Duration) {
    let attempts = Tally::get(&tally.attempts);
    println!(
        "{name:<10} {LEADS:>7} {:>10} {:>6} {:>8} {:>8} {:>10} {:>9.1?}",
        Tally::get(&tally.succeeded),
        Tally::get(&tally.lost),
        Tally::get(&tally.refused),
        attempts.saturating_sub(LEADS),
        Tally::get(&tally.throttled),
        wall,
    );
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    println!("{LEADS} leads over {CONNECTIONS:?}; the server allows {SERVER_PER_SECOND}/s per connection\n");

    let (addr, _) = common::throttled_server(SERVER_PER_SECOND).await?;
    println!("naive client on http://{addr}:");
    let (naive, naive_wall) = naive(addr).await;

    let (addr, _) = common::throttled_server(SERVER_PER_SECOND).await?;
    println!("\ntollgate, quota 475/s per connection (from the API's docs) on http://{addr}:");
    let quota = Quota::per_second(475).burst(20);
    let (gated, gated_wall) = with_tollgate("tollgate", addr, quota).await?;

    let (addr, _) = common::throttled_server(SERVER_PER_SECOND).await?;
    println!("\ntollgate, no quota: the server's 429s pause each connection and teach its pace, on http://{addr}:");
    let (cooled, cooled_wall) = with_tollgate("no quota", addr, Quota::unlimited()).await?;

    println!(
        "\n{:<10} {:>7} {:>10} {:>6} {:>8} {:>8} {:>10} {:>9}",
        "", "sent", "succeeded", "lost", "refused", "retried", "429s seen", "wall time"
    );
    row("naive", &naive, naive_wall);
    row("tollgate", &gated, gated_wall);
    row("no quota", &cooled, cooled_wall);

    if Tally::get(&gated.succeeded) != LEADS || Tally::get(&cooled.succeeded) != LEADS {
        return Err("tollgate lost leads; it should not".into());
    }
    Ok(())
}
