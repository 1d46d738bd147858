//! The first seed in virtual time: a batch of CRM leads pushed into a
//! server that publishes no limit and never answers 429. It has a knee of
//! concurrency: up to 20 requests at once each takes 100 ms; past 20 it
//! queues them inside (each takes `100 ms * concurrency / 20`, throughput
//! stays at 200/s); past 40 it answers 503 at once, "resources are not
//! available" (`tests/common/knee.rs`, shared with `tests/adaptive.rs`).
//!
//! ```text
//! cargo bench --bench knee                 # 1,000,000 leads (the seed's million)
//! LEADS=20000 cargo bench --bench knee     # a shorter run
//! ```
//!
//! Every client is the default [`Tollgate`] stack fed by `send_all` (so
//! nothing is refused for a full queue), the leads POSTs (a 503 is not
//! retried: the lead fails), with parallelism 50 (the seed's choice), 10
//! (the reply that found 10 better than 50 by trial), 20 and 30 (the best
//! a fixed number does here, known only with the server's knee in hand),
//! and adaptive inside 1..=200 starting at 10 and at 200.
//!
//! The second table is an outage: the same server down for the first 30 s
//! (every request 503 after 10 ms), then healthy, 20,000 idempotent PUTs
//! at parallelism 25 retried on Power Automate's policy (4 retries after 5
//! to 7.5 s doubling), with and without the retry budget.
//!
//! Deterministic: tokio's clock is paused and the runtime has one thread.

use std::sync::Arc;
use std::time::Duration;

#[allow(dead_code)]
#[path = "../tests/common/knee.rs"]
mod knee;

use futures_util::StreamExt;
use knee::Knee;
use tokio::time::Instant;
use tollgate::Tollgate;

const KNEE: usize = 20;
const FAILS_BEYOND: usize = 40;
const BASE: Duration = Duration::from_millis(100);
/// What the server completes a second at best.
const CAPACITY: f64 = KNEE as f64 / 0.1;

struct Row {
    completed: u64,
    failed: u64,
    secs: f64,
    p99: Duration,
    // The parallelism over the second half of the run (median).
    settled: usize,
}

async fn import(leads: usize, parallelism: usize, adaptive: bool) -> Row {
    let server = Knee::new(KNEE, FAILS_BEYOND, BASE);
    let mut builder = Tollgate::builder().parallelism(parallelism);
    if adaptive {
        builder = builder.adaptive_parallelism(1..=200);
    }
    let client = builder.build(server.service()).expect("a valid stack");
    let handle = client.handle();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let watch = tokio::spawn({
        let seen = Arc::clone(&seen);
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                seen.lock().unwrap().push(handle.parallelism());
            }
        }
    });
    let requests = futures_util::stream::iter((0..leads).map(|_| {
        http::Request::post("http://crm.example/leads")
            .body(())
            .expect("a valid request")
    }));
    let start = Instant::now();
    let (mut completed, mut failed) = (0, 0);
    let mut results = client.send_all(requests);
    while let Some((_, result)) = results.next().await {
        match result.map(|response| response.status().is_success()) {
            Ok(true) => completed += 1,
            _ => failed += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    watch.abort();
    let mut seen = seen.lock().unwrap().clone();
    let half = seen.len() / 2;
    let second_half = &mut seen[half..];
    second_half.sort_unstable();
    let settled = second_half
        .get(second_half.len() / 2)
        .copied()
        .unwrap_or(parallelism);
    Row {
        completed,
        failed,
        secs,
        p99: server.latency_quantile(0.99),
        settled,
    }
}

fn print_row(name: &str, leads: usize, row: &Row) {
    println!(
        "{name:<28} {leads:>8} {:>10} {:>8} {:>9.0} ms {:>9.1} s {:>8.3} {:>8}",
        row.completed,
        row.failed,
        row.p99.as_secs_f64() * 1e3,
        row.secs,
        row.completed as f64 / row.secs / CAPACITY,
        row.settled,
    );
}

fn main() {
    let leads: usize = std::env::var("LEADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    println!(
        "{leads} leads into a server with a knee at {KNEE} concurrent requests ({BASE:?} each, \
         {CAPACITY}/s at best), failing past {FAILS_BEYOND}; no 429, no published limit"
    );
    println!(
        "{:<28} {:>8} {:>10} {:>8} {:>12} {:>11} {:>8} {:>8}",
        "client", "leads", "completed", "failed", "p99 latency", "wall", "goodput", "settled"
    );
    let rows = [
        ("fixed 50 (the seed's)", 50, false),
        ("fixed 10 (the reply's)", 10, false),
        ("fixed 20", 20, false),
        ("fixed 30", 30, false),
        ("adaptive 1..=200, from 10", 10, true),
        ("adaptive 1..=200, from 200", 200, true),
    ];
    for (name, parallelism, adaptive) in rows {
        let real = std::time::Instant::now();
        let row = runtime.block_on(import(leads, parallelism, adaptive));
        print_row(name, leads, &row);
        eprintln!("  ({name}: {:.1?} of real time)", real.elapsed());
    }
}
