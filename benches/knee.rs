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
//! and adaptive inside 1..=200 starting at 10 and at 200; then the anchors
//! the adaptive gate was picked against (Netflix concurrency-limits' AIMD,
//! Vegas and Gradient2, Envoy's gradient controller: `mod anchors` below),
//! each from 10, through the same gate (`set_parallelism`), fed the same
//! attempts: once as their frameworks feed them (a failed request's
//! latency is a sample), once with failures kept out of the latency, as
//! tollgate's sampler does. `ONLY=anchor` runs the rows whose name has it.
//!
//! The second table is an outage: a healthy server (knee 100) down for the
//! first 30 s (every request 503 without `Retry-After`, after 10 ms), 6,000
//! idempotent PUTs retried on Power Automate's policy, through the default
//! stack at parallelism 25 and 200 (a batch through `send_all`, or 100
//! requests a second arriving on their own) and through the retry layer
//! alone, each with and without the retry budget: what the budget saves,
//! and what it costs, where.
//!
//! Deterministic: tokio's clock is paused and the runtime has one thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[allow(dead_code)]
#[path = "../tests/common/knee.rs"]
mod knee;

use futures_util::StreamExt;
use knee::{Knee, Watch};
use tokio::time::Instant;
use tollgate::concurrency::ConcurrencyGateHandle;
use tollgate::{Backoff, RetryBudget, RetryLayer, Tollgate};
use tower::util::BoxCloneService;
use tower::{BoxError, Service, ServiceExt};

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
    // The parallelism over the second half of the run: 5th percentile,
    // median, 95th.
    settled: (usize, usize, usize),
}

/// How the parallelism is chosen.
enum Mode {
    Fixed,
    Adaptive,
    // The algorithm, and whether a failed request's latency is a sample.
    Anchor(Box<dyn anchors::Limit>, bool),
}

async fn import(leads: usize, parallelism: usize, mode: Mode) -> Row {
    let server = Knee::new(KNEE, FAILS_BEYOND, BASE);
    let mut builder = Tollgate::builder().parallelism(parallelism);
    let anchor = match mode {
        Mode::Fixed => None,
        Mode::Adaptive => {
            builder = builder.adaptive_parallelism(1..=200);
            None
        }
        Mode::Anchor(limit, failures_timed) => {
            Some((Arc::new(Mutex::new((limit, None))), failures_timed))
        }
    };
    let client = match &anchor {
        None => builder.build(ServiceExt::boxed_clone(server.service())),
        Some((control, timed)) => {
            builder.build(sampled(server.service(), Arc::clone(control), *timed))
        }
    }
    .expect("a valid stack");
    let handle = client.handle();
    if let Some((control, _)) = &anchor {
        control.lock().unwrap().1 = Some(handle.clone());
    }
    let watch = Watch::start(handle, Duration::from_millis(500));
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
    let mut seen = watch.stop();
    let half = seen.len() / 2;
    let second_half = &mut seen[half..];
    second_half.sort_unstable();
    let pick = |q: f64| {
        let at = ((second_half.len().max(1) - 1) as f64 * q) as usize;
        second_half.get(at).copied().unwrap_or(parallelism)
    };
    Row {
        completed,
        failed,
        secs,
        p99: server.latency_quantile(0.99),
        settled: (pick(0.05), pick(0.5), pick(0.95)),
    }
}

/// A row's parallelism chooser, made fresh for its run.
type MakeMode = fn() -> Mode;
type Control = Arc<Mutex<(Box<dyn anchors::Limit>, Option<ConcurrencyGateHandle>)>>;
type Client = BoxCloneService<http::Request<()>, http::Response<()>, BoxError>;

/// `server`, each attempt's end fed to an anchor algorithm, which sets the
/// gate's parallelism.
fn sampled<S>(server: S, control: Control, failures_timed: bool) -> Client
where
    S: Service<http::Request<()>, Response = http::Response<()>, Error = BoxError>,
    S: Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let in_flight = Arc::new(AtomicUsize::new(0));
    let sampled = tower::service_fn(move |request| {
        let (server, control, in_flight) =
            (server.clone(), Arc::clone(&control), Arc::clone(&in_flight));
        async move {
            in_flight.fetch_add(1, Ordering::Relaxed);
            let sent = Instant::now();
            let result = server.oneshot(request).await;
            let in_flight = in_flight.fetch_sub(1, Ordering::Relaxed);
            let dropped = !matches!(&result, Ok(response) if response.status().is_success());
            let sample = anchors::Sample {
                latency: (failures_timed || !dropped).then(|| sent.elapsed()),
                dropped,
                in_flight,
            };
            let mut control = control.lock().unwrap();
            let limit = control.0.sample(&sample).max(1);
            if let Some(handle) = &control.1 {
                if handle.parallelism() != limit {
                    let _ = handle.set_parallelism(limit);
                }
            }
            result
        }
    });
    BoxCloneService::new(sampled)
}

fn print_row(name: &str, leads: usize, row: &Row) {
    println!(
        "{name:<44} {leads:>8} {:>10} {:>8} {:>9.0} ms {:>9.1} s {:>8.3} {:>12}",
        row.completed,
        row.failed,
        row.p99.as_secs_f64() * 1e3,
        row.secs,
        row.completed as f64 / row.secs / CAPACITY,
        format!("{} {}-{}", row.settled.1, row.settled.0, row.settled.2),
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
        "{:<44} {:>8} {:>10} {:>8} {:>12} {:>11} {:>8} {:>12}",
        "client", "leads", "completed", "failed", "p99 latency", "wall", "goodput", "parallelism"
    );
    let rows: Vec<(&str, usize, MakeMode)> = vec![
        ("fixed 50 (the seed's)", 50, || Mode::Fixed),
        ("fixed 10 (the reply's)", 10, || Mode::Fixed),
        ("fixed 20", 20, || Mode::Fixed),
        ("fixed 30", 30, || Mode::Fixed),
        ("adaptive 1..=200, from 10", 10, || Mode::Adaptive),
        ("adaptive 1..=200, from 200", 200, || Mode::Adaptive),
        ("anchor: Netflix AIMD", 10, || {
            Mode::Anchor(Box::new(anchors::Aimd { limit: 10.0 }), true)
        }),
        ("anchor: Netflix Vegas", 10, || Mode::Anchor(vegas(), true)),
        ("anchor: Netflix Vegas, failures untimed", 10, || {
            Mode::Anchor(vegas(), false)
        }),
        ("anchor: Netflix Gradient2", 10, || {
            Mode::Anchor(gradient2(), true)
        }),
        ("anchor: Netflix Gradient2, failures untimed", 10, || {
            Mode::Anchor(gradient2(), false)
        }),
        ("anchor: Envoy gradient", 10, || Mode::Anchor(envoy(), true)),
        ("anchor: Envoy gradient, failures untimed", 10, || {
            Mode::Anchor(envoy(), false)
        }),
    ];
    let only = std::env::var("ONLY").unwrap_or_default();
    for (name, parallelism, mode) in rows {
        if !name.contains(&only) {
            continue;
        }
        let real = std::time::Instant::now();
        let row = runtime.block_on(import(leads, parallelism, mode()));
        print_row(name, leads, &row);
        eprintln!("  ({name}: {:.1?} of real time)", real.elapsed());
    }
    println!(
        "(parallelism: the median over the second half of the run, and its 5th-95th percentiles)"
    );

    let leads = 6_000;
    println!(
        "\nAn outage: {leads} idempotent PUTs into a server down for the first {OUTAGE:?} (every \
         request 503 without Retry-After, after 10 ms), then healthy; Power Automate's retry"
    );
    println!(
        "{:<52} {:>10} {:>8} {:>16} {:>9} {:>9}",
        "client", "completed", "failed", "attempts in 30 s", "attempts", "wall"
    );
    let outages = [
        (
            "stack (parallelism 25), batch, no budget",
            Feed::Batch,
            false,
            25,
        ),
        (
            "stack (parallelism 25), batch, budget",
            Feed::Batch,
            true,
            25,
        ),
        (
            "stack (parallelism 200), batch, no budget",
            Feed::Batch,
            false,
            200,
        ),
        (
            "stack (parallelism 200), batch, budget",
            Feed::Batch,
            true,
            200,
        ),
        (
            "stack (parallelism 25), 100/s arriving, no budget",
            Feed::Open,
            false,
            25,
        ),
        (
            "stack (parallelism 25), 100/s arriving, budget",
            Feed::Open,
            true,
            25,
        ),
        (
            "stack (parallelism 200), 100/s arriving, no budget",
            Feed::Open,
            false,
            200,
        ),
        (
            "stack (parallelism 200), 100/s arriving, budget",
            Feed::Open,
            true,
            200,
        ),
        (
            "retry layer alone, 100/s arriving, no budget",
            Feed::Open,
            false,
            0,
        ),
        (
            "retry layer alone, 100/s arriving, budget",
            Feed::Open,
            true,
            0,
        ),
    ];
    for (name, feed, budget, parallelism) in outages {
        if !name.contains(&only) {
            continue;
        }
        let row = runtime.block_on(outage(leads, feed, budget, parallelism));
        println!(
            "{name:<52} {:>10} {:>8} {:>16} {:>9} {:>7.1} s",
            row.completed, row.failed, row.attempts_down, row.attempts, row.secs
        );
    }
}

/// How requests arrive in the outage runs.
#[derive(Clone, Copy)]
enum Feed {
    /// A batch through `send_all`: the next lead when the gate has room.
    Batch,
    /// 100 requests a second, each on its own (an online service's
    /// callers), whatever the gate holds.
    Open,
}

struct Outage {
    completed: u64,
    failed: u64,
    attempts_down: u64,
    attempts: u64,
    secs: f64,
}

const OUTAGE: Duration = Duration::from_secs(30);

/// `leads` idempotent PUTs into a healthy server (knee 100) that is down
/// for the first 30 s, through the default stack at parallelism 25, with
/// or without the retry budget; or through the retry layer alone.
async fn outage(leads: usize, feed: Feed, budget: bool, parallelism: usize) -> Outage {
    let gate = parallelism > 0;
    let server = Knee::new(100, 200, BASE);
    server.fail_for(OUTAGE);
    let request = || {
        http::Request::put("http://crm.example/leads/1")
            .body(())
            .expect("a valid request")
    };
    let client: Client = if gate {
        let builder = Tollgate::builder()
            .parallelism(parallelism)
            .retry(Backoff::power_automate().seed(7));
        let builder = if budget {
            builder.retry_budget(RetryBudget::default())
        } else {
            builder.no_retry_budget()
        };
        BoxCloneService::new(builder.build(server.service()).expect("a valid stack"))
    } else {
        let layer = RetryLayer::new(Backoff::power_automate().seed(7));
        let layer = if budget {
            layer.budget(RetryBudget::default())
        } else {
            layer
        };
        BoxCloneService::new(tower::Layer::layer(&layer, server.service()))
    };
    let start = Instant::now();
    let watch = {
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            tokio::time::sleep(OUTAGE).await;
            server.arrivals()
        })
    };
    let (mut completed, mut failed) = (0, 0);
    let mut count = |ok: bool| match ok {
        true => completed += 1,
        false => failed += 1,
    };
    match feed {
        Feed::Batch => {
            // Only a gate keeps a batch's hand bounded; the retry layer
            // alone gets the same 100/s as the open feed.
            let gate = tollgate::ConcurrencyGateLayer::new(parallelism.max(25));
            let client = tower::Layer::layer(&gate, client);
            let requests = futures_util::stream::iter((0..leads).map(|_| request()));
            let mut results = client.send_all(requests);
            while let Some((_, result)) = results.next().await {
                count(result.is_ok_and(|r| r.status().is_success()));
            }
        }
        Feed::Open => {
            let mut calls = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for _ in 0..leads {
                tick.tick().await;
                calls.spawn(client.clone().oneshot(request()));
            }
            while let Some(ended) = calls.join_next().await {
                count(
                    ended
                        .expect("no panic")
                        .is_ok_and(|r| r.status().is_success()),
                );
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Outage {
        completed,
        failed,
        attempts_down: watch.await.expect("no panic"),
        attempts: server.arrivals(),
        secs,
    }
}

fn vegas() -> Box<dyn anchors::Limit> {
    Box::new(anchors::Vegas {
        limit: 10.0,
        noload: 0.0,
        since_probe: 0,
    })
}

fn gradient2() -> Box<dyn anchors::Limit> {
    Box::new(anchors::Gradient2 {
        limit: 10.0,
        long: 0.0,
        count: 0,
    })
}

fn envoy() -> Box<dyn anchors::Limit> {
    Box::new(anchors::Envoy {
        limit: 10.0,
        measuring: None,
        min_rtt: 0.0,
        window: Vec::new(),
        window_start: None,
        next_measure: None,
    })
}

/// The anchors the adaptive gate was picked against, as Netflix's
/// concurrency-limits writes them (`AIMDLimit`, `VegasLimit`,
/// `Gradient2Limit`, their defaults) and Envoy's adaptive concurrency
/// filter (its gradient controller, its defaults), fed each attempt as
/// their frameworks feed them (a failed request's latency is a sample
/// too) by a layer just
/// around the server and applied through `set_parallelism`: the same
/// samples and the same gate as `adaptive_parallelism`, another algorithm.
mod anchors {
    use std::time::Duration;

    /// One attempt's end, as the sampling layer saw it.
    pub struct Sample {
        // `None` for a failed request when failures are kept out of the
        // latency (as tollgate's sampler does).
        pub latency: Option<Duration>,
        pub dropped: bool,
        // The sampler's attempts in flight when this one ended.
        pub in_flight: usize,
    }

    pub trait Limit: Send {
        fn sample(&mut self, sample: &Sample) -> usize;
    }

    /// `AIMDLimit`: +1 per sample while at least half the limit is in
    /// flight, x0.9 per drop (or a sample slower than its 5 s timeout).
    pub struct Aimd {
        pub limit: f64,
    }

    impl Limit for Aimd {
        fn sample(&mut self, sample: &Sample) -> usize {
            if sample.dropped || sample.latency > Some(Duration::from_secs(5)) {
                self.limit = (self.limit * 0.9).max(1.0);
            } else if sample.in_flight as f64 * 2.0 >= self.limit {
                self.limit = (self.limit + 1.0).min(200.0);
            }
            self.limit as usize
        }
    }

    /// `VegasLimit`: the queue at the server, `limit * (1 - noload/rtt)`,
    /// kept between alpha = 3 log10(limit) and beta = 6 log10(limit);
    /// the no-load latency re-read from a sample every 30 limits of
    /// samples (its probe).
    pub struct Vegas {
        pub limit: f64,
        pub noload: f64,
        pub since_probe: u64,
    }

    impl Limit for Vegas {
        fn sample(&mut self, sample: &Sample) -> usize {
            let log = self.limit.log10().max(1.0);
            let Some(rtt) = sample.latency.map(|l| l.as_secs_f64()) else {
                self.limit = (self.limit - log).clamp(1.0, 200.0);
                return self.limit as usize;
            };
            self.since_probe += 1;
            if self.since_probe as f64 >= 30.0 * self.limit {
                self.since_probe = 0;
                self.noload = rtt;
                return self.limit as usize;
            }
            if self.noload == 0.0 || rtt < self.noload {
                self.noload = rtt;
                return self.limit as usize;
            }
            if sample.dropped {
                self.limit -= log;
            } else if (sample.in_flight as f64) * 2.0 < self.limit {
                return self.limit as usize;
            } else {
                let queue = (self.limit * (1.0 - self.noload / rtt)).ceil();
                if queue <= log {
                    self.limit += 6.0 * log;
                } else if queue < 3.0 * log {
                    self.limit += log;
                } else if queue > 6.0 * log {
                    self.limit -= log;
                }
            }
            self.limit = self.limit.clamp(1.0, 200.0);
            self.limit as usize
        }
    }

    /// Envoy's gradient controller: the minimum RTT measured as the median
    /// of 50 requests at concurrency 3 (every 60 s), then every 100 ms
    /// `limit = limit * (min_rtt * 1.25 / median RTT of the window) +
    /// sqrt(limit)`, the gradient clamped to 0.5..=2.
    pub struct Envoy {
        pub limit: f64,
        pub measuring: Option<(f64, Vec<f64>)>,
        pub min_rtt: f64,
        pub window: Vec<f64>,
        pub window_start: Option<tokio::time::Instant>,
        pub next_measure: Option<tokio::time::Instant>,
    }

    fn median(values: &mut [f64]) -> f64 {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    }

    impl Limit for Envoy {
        fn sample(&mut self, sample: &Sample) -> usize {
            let now = tokio::time::Instant::now();
            let Some(rtt) = sample.latency.map(|l| l.as_secs_f64()) else {
                return self.limit as usize;
            };
            if self.next_measure.is_none_or(|at| now >= at) && self.measuring.is_none() {
                self.measuring = Some((self.limit, Vec::new()));
                self.next_measure = Some(now + Duration::from_secs(60));
            }
            if let Some((before, samples)) = &mut self.measuring {
                samples.push(rtt);
                if samples.len() < 50 {
                    return 3;
                }
                self.min_rtt = median(samples);
                self.limit = *before;
                self.measuring = None;
                self.window.clear();
                self.window_start = Some(now);
                return self.limit as usize;
            }
            self.window.push(rtt);
            let start = *self.window_start.get_or_insert(now);
            if now - start >= Duration::from_millis(100) {
                let sample_rtt = median(&mut self.window);
                let gradient = (self.min_rtt * 1.25 / sample_rtt).clamp(0.5, 2.0);
                self.limit = (self.limit * gradient + self.limit.sqrt())
                    .ceil()
                    .clamp(3.0, 1000.0);
                self.window.clear();
                self.window_start = Some(now);
            }
            self.limit as usize
        }
    }

    /// `Gradient2Limit`: the gradient of a long exponential average of the
    /// latency (600 samples) to this sample's, with 1.5x tolerance, a
    /// queue of 4, smoothing 0.2; drops are not read.
    pub struct Gradient2 {
        pub limit: f64,
        pub long: f64,
        pub count: u64,
    }

    impl Limit for Gradient2 {
        fn sample(&mut self, sample: &Sample) -> usize {
            let Some(short) = sample.latency.map(|l| l.as_secs_f64()) else {
                return self.limit as usize;
            };
            self.count += 1;
            // A plain mean for the first 10 samples, then 600-sample EMA.
            if self.count <= 10 {
                self.long += (short - self.long) / self.count as f64;
            } else {
                let factor = 2.0 / 601.0;
                self.long = self.long * (1.0 - factor) + short * factor;
            }
            if self.long / short > 2.0 {
                self.long *= 0.95;
            }
            if (sample.in_flight as f64) < self.limit / 2.0 {
                return self.limit as usize;
            }
            let gradient = (1.5 * self.long / short).clamp(0.5, 1.0);
            let target = self.limit * gradient + 4.0;
            self.limit = (self.limit * 0.8 + target * 0.2).clamp(1.0, 200.0);
            self.limit as usize
        }
    }
}
