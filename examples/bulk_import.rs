//! The seed story, in two halves, each against local servers on 127.0.0.1
//! (`examples/common/mod.rs`).
//!
//! ```text
//! cargo run --example bulk_import
//! ```
//!
//! **A server that says 429.** 10,000 CRM leads go over 2 connections into
//! a server that allows each connection 500 requests a second and answers
//! 429 with `Retry-After` beyond that. The naive client is a workflow engine
//! that starts 3,000 flow runs at once (a run per lead, as a trigger does);
//! each retries a 429 on its own schedule (1 s, 2 s, 4 s: one try plus three
//! retries), ignoring the server's `Retry-After`, as many clients do.
//! tollgate's stack runs 50 at a time, holds each connection to 475 a second
//! (just under the server's limit, as you would set it from the API's
//! docs), and retries with a backoff that never undercuts `Retry-After`. A
//! third run sets no quota (`Quota::unlimited()`, the builder's default) and
//! relies on the server's 429s: each pauses its whole connection until
//! `Retry-After` and teaches it a pace just under the rate that earned it.
//!
//! **A server that never says 429.** 4,000 leads go into a server that
//! publishes no limit (the first seed's CRM): up to 20 requests at once,
//! each takes 20 ms; past 20 it queues them inside, each taking 20 ms x
//! concurrency / 20, so it never completes more than 1,000 a second; past
//! 40 it answers 503 without `Retry-After`, "resources are not available"
//! (a POST's 503 is not retried: the lead is lost). tollgate runs it over
//! HTTP/1.1 with no quota, at a fixed parallelism of 50 (the seed's
//! choice), of 10 (the reply's, found by trial), and adaptive inside
//! 1..=200 from 10: the gate finds the knee from the latency and the 503s.
//!
//! Every tollgate run hands its leads to `client.send_all(..)`, which keeps
//! as many in hand as the gate admits (parallelism + queue) so none is
//! refused for a full queue, and yields each lead's result as it ends. On a
//! terminal each run draws a progress bar (on stderr): leads done, how they
//! ended, and the gate's parallelism with what is in flight and queued.
//! Then one line per run, and a table per half. The example fails if
//! tollgate lost a lead to the 429 server, or if the adaptive run lost more
//! than 1% of its leads to the other one.

mod common;

use common::{lead, CONNECTIONS};

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tollgate::concurrency::ConcurrencyGateHandle;
use tollgate::{Backoff, Error, Jitter, Quota, Tollgate, TollgateBuilder, TollgateService};
use tower::{BoxError, Service};

const LEADS: u64 = 10_000;
const SERVER_PER_SECOND: u32 = 500;
/// Flow runs started at once by the naive workflow engine.
const NAIVE_CALLERS: usize = 3_000;

/// The server that never says 429: leads sent to it, its knee of
/// concurrency, and how long a request takes under the knee.
const KNEE_LEADS: u64 = 4_000;
const KNEE: usize = 20;
const KNEE_BASE: Duration = Duration::from_millis(20);
/// The most it completes a second: `KNEE / KNEE_BASE`.
const KNEE_CAPACITY: u64 = 1_000;

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

    fn done(&self) -> u64 {
        Tally::get(&self.succeeded) + Tally::get(&self.lost) + Tally::get(&self.refused)
    }
}

/// The parallelism a run's gate had over the second half of the run, as
/// its progress bar saw it: the median, the 5th and the 95th percentile.
#[derive(Debug, Clone, Copy)]
struct Settled {
    median: usize,
    low: usize,
    high: usize,
}

impl std::fmt::Display for Settled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.median)
        } else {
            write!(f, "{} ({}-{})", self.median, self.low, self.high)
        }
    }
}

/// A run's progress bar, refreshed every 100 ms from its tally and, for
/// tollgate's runs, its gate. indicatif draws it on stderr when that is a
/// terminal, and not at all otherwise.
struct Progress {
    bar: ProgressBar,
    refresh: JoinHandle<()>,
    started: Instant,
    // The gate's parallelism at each refresh, and when.
    seen: Arc<Mutex<Vec<(Duration, usize)>>>,
}

impl Progress {
    fn start(
        name: &str,
        leads: u64,
        tally: Arc<Tally>,
        gate: Option<ConcurrencyGateHandle>,
    ) -> Progress {
        // Two lines, so that an 80-column terminal shows the gate's figures.
        let style = ProgressStyle::with_template(
            "{prefix:<8} {elapsed:>3} {bar:30} {pos:>5}/{len} leads\n         {wide_msg}",
        )
        .expect("a valid template");
        let bar = ProgressBar::new(leads)
            .with_style(style)
            .with_prefix(name.to_owned());
        let started = Instant::now();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let refresh = tokio::spawn({
            let (bar, seen) = (bar.clone(), Arc::clone(&seen));
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    bar.set_position(tally.done());
                    let mut message = format!(
                        "{} ok, {} lost, {} 429s",
                        Tally::get(&tally.succeeded),
                        Tally::get(&tally.lost),
                        Tally::get(&tally.throttled),
                    );
                    if let Some(gate) = &gate {
                        let parallelism = gate.parallelism();
                        seen.lock().unwrap().push((started.elapsed(), parallelism));
                        let _ = write!(
                            message,
                            "; parallelism {parallelism}: {} in flight, {} queued",
                            gate.in_flight(),
                            gate.queued(),
                        );
                    }
                    bar.set_message(message);
                }
            }
        });
        Progress {
            bar,
            refresh,
            started,
            seen,
        }
    }

    /// Clears the bar; the parallelism it saw over the second half of the
    /// run, if it saw the gate.
    fn finish(self) -> Option<Settled> {
        self.refresh.abort();
        self.bar.finish_and_clear();
        let half = self.started.elapsed() / 2;
        let mut second_half: Vec<usize> = self
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= half)
            .map(|(_, parallelism)| *parallelism)
            .collect();
        second_half.sort_unstable();
        let pick = |q: f64| second_half[((second_half.len() - 1) as f64 * q).round() as usize];
        (!second_half.is_empty()).then(|| Settled {
            median: pick(0.5),
            low: pick(0.05),
            high: pick(0.95),
        })
    }
}

/// How one run went.
struct Run {
    tally: Arc<Tally>,
    wall: Duration,
    settled: Option<Settled>,
}

impl Run {
    /// One line, printed when the run ends.
    fn summary(&self, name: &str) {
        let tally = &self.tally;
        let mut line = format!(
            "  {name}: {} succeeded, {} lost, {} 429s seen, in {:.1?}",
            Tally::get(&tally.succeeded),
            Tally::get(&tally.lost),
            Tally::get(&tally.throttled),
            self.wall,
        );
        if let Some(settled) = self.settled {
            let _ = write!(line, "; parallelism over the second half: {settled}");
        }
        println!("{line}");
    }
}

/// hyper's client, speaking HTTP/2 (prior knowledge): thousands of
/// requests at once share a socket.
fn http2() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// hyper's client, speaking HTTP/1.1: a pooled connection per request in
/// flight.
fn http1() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn naive(addr: SocketAddr) -> Run {
    let client = http2();
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let progress = Progress::start("naive", LEADS, Arc::clone(&tally), None);
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
    let wall = started.elapsed();
    let settled = progress.finish();
    Run {
        tally,
        wall,
        settled,
    }
}

/// `http`, counting in `tally` each attempt that reaches the wire and the
/// 429s among them: below every tollgate layer.
fn counted(
    http: Client<HttpConnector, Full<Bytes>>,
    tally: &Arc<Tally>,
) -> impl Service<Request<Full<Bytes>>, Response = Response<Incoming>, Error = BoxError> + Clone {
    let tally = Arc::clone(tally);
    tower::service_fn(move |request: Request<Full<Bytes>>| {
        let (mut http, tally) = (http.clone(), Arc::clone(&tally));
        async move {
            tally.attempts.fetch_add(1, Ordering::Relaxed);
            let response = http.call(request).await?;
            if response.status() == StatusCode::TOO_MANY_REQUESTS {
                tally.throttled.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, BoxError>(response)
        }
    })
}

/// Builds `builder`'s stack around `http` and sends it `leads` leads with
/// `send_all`, a progress bar showing how it goes.
async fn with_tollgate(
    name: &str,
    builder: TollgateBuilder,
    http: Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    leads: u64,
) -> Result<Run, BoxError> {
    let tally = Arc::new(Tally::default());
    let client = builder.build(counted(http, &tally))?;
    let started = Instant::now();
    let progress = Progress::start(name, leads, Arc::clone(&tally), Some(client.handle()));
    import(&client, addr, leads, &tally).await;
    let wall = started.elapsed();
    let settled = progress.finish();
    Ok(Run {
        tally,
        wall,
        settled,
    })
}

/// The import itself: every lead through `send_all`, each result counted
/// as it comes.
async fn import<S>(client: &TollgateService<S>, addr: SocketAddr, leads: u64, tally: &Tally)
where
    S: Service<Request<Full<Bytes>>, Response = Response<Incoming>, Error = BoxError> + Clone,
{
    let mut results = client.send_all(stream::iter(0..leads).map(|n| lead(addr, n)));
    while let Some((_n, result)) = results.next().await {
        let counter = match result {
            Ok(response) if response.status().is_success() => {
                let _ = response.into_body().collect().await;
                &tally.succeeded
            }
            // `send_all` never overfills the gate: this stays at 0.
            Err(error) if error.downcast_ref::<Error>() == Some(&Error::QueueFull) => {
                &tally.refused
            }
            _ => &tally.lost,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn throttled_row(name: &str, run: &Run) {
    let tally = &run.tally;
    let attempts = Tally::get(&tally.attempts);
    println!(
        "{name:<10} {LEADS:>7} {:>10} {:>6} {:>8} {:>8} {:>10} {:>9.1?}",
        Tally::get(&tally.succeeded),
        Tally::get(&tally.lost),
        Tally::get(&tally.refused),
        attempts.saturating_sub(LEADS),
        Tally::get(&tally.throttled),
        run.wall,
    );
}

fn knee_row(name: &str, run: &Run) {
    let completed = Tally::get(&run.tally.succeeded);
    let settled = run
        .settled
        .map_or("-".to_owned(), |settled| settled.to_string());
    println!(
        "{name:<10} {KNEE_LEADS:>7} {completed:>10} {:>7} {:>9.1?} {:>8.0} {settled:>12}",
        Tally::get(&run.tally.lost) + Tally::get(&run.tally.refused),
        run.wall,
        completed as f64 / run.wall.as_secs_f64(),
    );
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    println!("{LEADS} leads over {CONNECTIONS:?}; the server allows {SERVER_PER_SECOND}/s per connection\n");

    let (addr, _) = common::throttled_server(SERVER_PER_SECOND).await?;
    println!("naive client on http://{addr}:");
    let naive = naive(addr).await;
    naive.summary("naive");

    // 50 at a time, retries that never undercut Retry-After; a quota or none.
    let stack = |quota| {
        Tollgate::builder()
            .parallelism(50)
            .per_connection(quota)
            .retry(
                Backoff::exponential(Duration::from_millis(250))
                    .max_retries(4)
                    .jitter(Jitter::Full),
            )
    };

    let (addr, _) = common::throttled_server(SERVER_PER_SECOND).await?;
    println!("tollgate, quota 475/s per connection (from the API's docs) on http://{addr}:");
    let quota = Quota::per_second(475).burst(20);
    let gated = with_tollgate("tollgate", stack(quota), http2(), addr, LEADS).await?;
    gated.summary("tollgate");

    let (addr, _) = common::throttled_server(SERVER_PER_SECOND).await?;
    println!("tollgate, no quota: the server's 429s pause each connection and teach its pace, on http://{addr}:");
    let cooled = with_tollgate("no quota", stack(Quota::unlimited()), http2(), addr, LEADS).await?;
    cooled.summary("no quota");

    println!(
        "\n{:<10} {:>7} {:>10} {:>6} {:>8} {:>8} {:>10} {:>9}",
        "", "sent", "succeeded", "lost", "refused", "retried", "429s seen", "wall time"
    );
    throttled_row("naive", &naive);
    throttled_row("tollgate", &gated);
    throttled_row("no quota", &cooled);

    println!(
        "\n\n{KNEE_LEADS} leads into a server that publishes no limit and never says 429: \
         {KNEE_BASE:?} a request up to {KNEE} at once, slower past that \
         ({KNEE_CAPACITY}/s at best), 503 past {}\n",
        2 * KNEE
    );
    // No quota (the builder's default), and POSTs: a 503 is not retried.
    let knee_runs = [
        (
            "fixed 50",
            "parallelism 50, the seed's choice",
            Tollgate::builder().parallelism(50),
        ),
        (
            "fixed 10",
            "parallelism 10, the reply's, found by trial",
            Tollgate::builder().parallelism(10),
        ),
        (
            "adaptive",
            "adaptive parallelism inside 1..=200, from 10",
            Tollgate::builder()
                .parallelism(10)
                .adaptive_parallelism(1..=200),
        ),
    ];
    let mut knee = Vec::new();
    for (name, what, builder) in knee_runs {
        let addr = common::knee_server(KNEE, KNEE_BASE).await?;
        println!("tollgate, {what}, on http://{addr}:");
        // HTTP/1.1, as many CRM APIs are spoken to: on this loopback hyper's
        // HTTP/2 client held some small POSTs back 20-40 ms, noise that an
        // adaptive gate reads as a loaded server.
        let run = with_tollgate(name, builder, http1(), addr, KNEE_LEADS).await?;
        run.summary(name);
        knee.push((name, run));
    }

    println!(
        "\n{:<10} {:>7} {:>10} {:>7} {:>9} {:>8} {:>12}",
        "", "sent", "completed", "failed", "wall time", "leads/s", "parallelism"
    );
    for (name, run) in &knee {
        knee_row(name, run);
    }
    println!(
        "\nparallelism: the gate's over the second half of the run, the median \
         (5th-95th percentile) of what the progress bar saw every 100 ms"
    );

    if Tally::get(&gated.tally.succeeded) != LEADS || Tally::get(&cooled.tally.succeeded) != LEADS {
        return Err("tollgate lost leads to the 429 server; it should not".into());
    }
    let (_, adaptive) = &knee[2];
    let failed = KNEE_LEADS - Tally::get(&adaptive.tally.succeeded);
    if failed * 100 > KNEE_LEADS {
        return Err(
            format!("the adaptive gate lost {failed} of {KNEE_LEADS} leads, over 1%").into(),
        );
    }
    Ok(())
}
