//! Adaptive parallelism against a server that only slows down (the first
//! seed: no 429, a knee of concurrency past which latency grows and, far
//! past it, requests fail), and `send_all`, in virtual time.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::knee::{Knee, Watch};
use futures_util::StreamExt;
use tokio::time::Instant;
use tollgate::Tollgate;
use tower::ServiceExt;

const BASE: Duration = Duration::from_millis(100);

fn leads(n: usize) -> impl futures_util::Stream<Item = http::Request<()>> {
    futures_util::stream::iter((0..n).map(|_| {
        http::Request::post("http://crm.example/leads")
            .body(())
            .unwrap()
    }))
}

#[derive(Debug)]
struct Run {
    completed: usize,
    failed: usize,
    secs: f64,
    // The gate's parallelism, read every second.
    parallelism: Vec<usize>,
}

impl Run {
    fn goodput(&self) -> f64 {
        self.completed as f64 / self.secs
    }

    /// The median parallelism over the second half of the run (a probe
    /// reads a quarter of the limit for a moment: the median skips it).
    fn settled(&self) -> usize {
        median(&self.parallelism[self.parallelism.len() / 2..])
    }
}

fn median(values: &[usize]) -> usize {
    let mut values = values.to_vec();
    values.sort_unstable();
    values[values.len() / 2]
}

/// Sends `n` leads to `server` through the default stack at
/// `parallelism`, adaptive inside 1..=500 if `adaptive`; `during` runs
/// beside it (to move the knee).
async fn run_with(
    server: &Arc<Knee>,
    parallelism: usize,
    adaptive: bool,
    n: usize,
    during: impl std::future::Future<Output = ()> + Send + 'static,
) -> Run {
    let parallelism_start = parallelism;
    let mut builder = Tollgate::builder().parallelism(parallelism);
    if adaptive {
        builder = builder.adaptive_parallelism(1..=500);
    }
    let client = builder.build(server.service()).unwrap();
    let handle = client.handle();
    let watch = Watch::start(handle, Duration::from_secs(1));
    let beside = tokio::spawn(during);
    let start = Instant::now();
    let mut results = client.send_all(leads(n));
    let (mut completed, mut failed) = (0, 0);
    let mut indices = HashSet::new();
    while let Some((index, result)) = results.next().await {
        assert!(indices.insert(index), "index {index} twice");
        match result.unwrap().status().as_u16() {
            // 404: a lead the CRM refused at once (`Knee::varied`).
            200 | 404 => completed += 1,
            503 => failed += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let parallelism = watch.stop();
    beside.abort();
    assert_eq!(indices.len(), n, "every request ends once");
    assert_eq!(client.handle().refused(), 0, "send_all is never refused");
    // `--nocapture` shows each run's figures.
    println!(
        "parallelism {parallelism_start}{}: {completed} completed, {failed} failed in {secs:.1} s, \
         {:.1}/s, settled at {}",
        if adaptive { " adaptive" } else { "" },
        completed as f64 / secs,
        median(&parallelism[parallelism.len() / 2..]),
    );
    Run {
        completed,
        failed,
        secs,
        parallelism,
    }
}

async fn run(server: &Arc<Knee>, parallelism: usize, adaptive: bool, n: usize) -> Run {
    run_with(server, parallelism, adaptive, n, async {}).await
}

/// The best goodput of fixed parallelisms against a fresh knee server.
async fn best_fixed(knee: usize, n: usize) -> f64 {
    best_fixed_of(|| Knee::new(knee, 2 * knee, BASE), knee, n).await
}

/// The best goodput of fixed parallelisms around `knee` against fresh
/// servers from `server`.
async fn best_fixed_of(server: impl Fn() -> Arc<Knee>, knee: usize, n: usize) -> f64 {
    let mut best: f64 = 0.0;
    for parallelism in [knee / 2, knee, knee * 3 / 2, knee * 2, knee * 5 / 2] {
        let server = server();
        let run = run(&server, parallelism, false, n).await;
        best = best.max(run.goodput());
    }
    best
}

#[tokio::test(start_paused = true)]
async fn fixed_parallelism_past_the_failure_point_loses_leads() {
    // The seed: parallelism 50 against a server that fails past 40.
    let server = Knee::new(20, 40, BASE);
    let run = run(&server, 50, false, 5_000).await;
    assert!(run.failed > 500, "{run:?}");
    assert_eq!(run.completed + run.failed, 5_000);
}

#[tokio::test(start_paused = true)]
async fn adaptive_finds_the_knee_from_one_and_from_two_hundred() {
    let n = 20_000;
    let best = best_fixed(20, n).await;
    // From 200, the requests sent before the first cut fail: what the
    // server cannot take.
    for (start, most_failed) in [(1, 0), (200, n / 100)] {
        let server = Knee::new(20, 40, BASE);
        let run = run(&server, start, true, n).await;
        let settled = run.settled();
        assert!(
            (14..=30).contains(&settled),
            "from {start}: settled at {settled}: {run:?}"
        );
        assert!(run.failed <= most_failed, "from {start}: {run:?}");
        let share = run.goodput() / best;
        assert!(
            share >= 0.9,
            "from {start}: goodput {share:.3} of the best fixed: {run:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn adaptive_follows_a_knee_that_moves() {
    let server = Knee::new(20, 40, BASE);
    let moving = Arc::clone(&server);
    // 60 s at a knee of 20, 60 s at 10, then 40.
    let run = run_with(&server, 25, true, 40_000, async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        moving.set_knee(10, 20);
        tokio::time::sleep(Duration::from_secs(60)).await;
        moving.set_knee(40, 80);
    })
    .await;
    let at = |from: usize, to: usize| median(&run.parallelism[from..to.min(run.parallelism.len())]);
    println!(
        "knee 20: {}, knee 10: {}, knee 40: {}",
        at(30, 59),
        at(90, 119),
        at(150, 180)
    );
    assert!((14..=30).contains(&at(30, 59)), "{run:?}");
    assert!((7..=15).contains(&at(90, 119)), "{run:?}");
    assert!((27..=60).contains(&at(150, 180)), "{run:?}");
    assert!(run.parallelism.len() > 150, "{run:?}");
}

#[tokio::test(start_paused = true)]
async fn throttles_are_the_rate_limiters_not_overload() {
    // Every other request is throttled (429, or 503 naming its pause):
    // the gate must not read that as an overloaded server.
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = tower::service_fn(move |_request: http::Request<()>| {
        let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            tokio::time::sleep(BASE).await;
            let mut response = http::Response::builder();
            response = match n % 4 {
                // Throttles, which name their pause: the rate limiter's.
                1 => response.status(429).header("retry-after", "1"),
                3 => response.status(503).header("retry-after", "1"),
                // A 429 without one is a throttle all the same.
                2 if n % 8 == 2 => response.status(429),
                _ => response.status(200),
            };
            let response = response.body(()).unwrap();
            Ok::<_, tower::BoxError>(response)
        }
    });
    let client = Tollgate::builder()
        .parallelism(20)
        .adaptive_parallelism(1..=500)
        .build(server)
        .unwrap();
    let handle = client.handle();
    let mut results = client.send_all(leads(2_000));
    let (mut least, mut most) = (usize::MAX, 0);
    while let Some((_, result)) = results.next().await {
        result.unwrap();
        least = least.min(handle.parallelism());
        most = most.max(handle.parallelism());
    }
    assert!(least >= 20, "throttles cut the parallelism to {least}");
    // The answers between them are samples: flat latency raises it.
    assert!(most > 20, "the parallelism never moved: {most}");
}

#[tokio::test(start_paused = true)]
async fn a_gate_alone_learns_from_its_calls() {
    use tower::Layer;
    // A service that fails every call (connection refused, say).
    let failing = tower::service_fn(|_request: http::Request<()>| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Err::<http::Response<()>, _>(tower::BoxError::from("connection refused"))
    });
    let client = tollgate::ConcurrencyGateLayer::new(64)
        .adaptive_parallelism(2..=64)
        .layer(failing);
    let handle = client.handle();
    let results: Vec<_> = client.send_all(leads(2_000)).collect().await;
    assert_eq!(results.len(), 2_000);
    assert_eq!(handle.parallelism(), 2, "cut to the range's floor");

    // An empty range refuses every call with a typed error.
    #[allow(clippy::reversed_empty_ranges)]
    let empty = 5..=4;
    let client = tollgate::ConcurrencyGateLayer::new(4)
        .adaptive_parallelism(empty)
        .layer(tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, tower::BoxError>(http::Response::new(()))
        }));
    let error = client.oneshot(http::Request::new(())).await.unwrap_err();
    assert!(matches!(
        error.downcast_ref::<tollgate::Error>(),
        Some(tollgate::Error::InvalidConfig { .. })
    ));
    assert!(Tollgate::builder()
        .adaptive_parallelism(0..=10)
        .build(Knee::new(1, 2, BASE).service())
        .is_err());
}

/// Answers that vary (+-50% at a knee of 20, +-20% at 100) and one lead in
/// 20 refused in 2 ms: the gradient reads round means, so neither holds the
/// limit down (with the least single latency as its base, it settled at 4
/// to 27 whatever the knee).
#[tokio::test(start_paused = true)]
async fn adaptive_finds_the_knee_when_answers_vary() {
    for (knee, spread, n) in [(20, 0.5, 20_000), (100, 0.2, 60_000)] {
        let server = || Knee::varied(knee, 2 * knee, BASE, spread, 20);
        let best = best_fixed_of(server, knee, n).await;
        let run = run(&server(), 10, true, n).await;
        let settled = run.settled();
        let band = knee * 2 / 3..=knee * 3 / 2;
        assert!(
            band.contains(&settled),
            "knee {knee}: settled at {settled}: {run:?}"
        );
        let share = run.goodput() / best;
        assert!(
            share >= 0.9,
            "knee {knee}: goodput {share:.3} of the best fixed"
        );
        assert_eq!(run.failed, 0, "knee {knee}");
    }
}
