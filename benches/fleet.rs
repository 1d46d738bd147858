//! What a decision costs with the fleet store: latency of one request
//! through `RateLimit` (p50 / p99 / mean) on the in-memory store and on a
//! `RedisStore` at a redis-server on 127.0.0.1 (started here), with and
//! without leasing; and decisions per second with 1 and 4 processes.
//!
//! cargo bench --bench fleet --features redis
//!
//! Not criterion: criterion reports means, and the question here is the
//! tail of a network round trip.

#[path = "../tests/common/redis_server.rs"]
#[allow(dead_code)]
mod redis_server;

use std::convert::Infallible;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{Request, Response};
use redis_server::RedisServer;
use tollgate::redis::RedisStore;
use tollgate::{ConnectionKey, Quota, RateLimitLayer};
use tower::{Layer, Service, ServiceExt};

/// Requests timed per row.
const SAMPLES: usize = 20_000;
/// Seconds each throughput run lasts.
const RUN_SECS: u64 = 3;
/// Connections (keys) each throughput process spreads its requests over.
const CONNECTIONS: usize = 64;

/// A quota no run reaches, so every row measures admissions.
fn quota() -> Quota {
    Quota::per_second(1_000_000).burst(1_000)
}

fn inner() -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<()>, Infallible>>,
> + Clone {
    tower::service_fn(|_: Request<()>| std::future::ready(Ok(Response::new(()))))
}

fn request(key: &ConnectionKey) -> Request<()> {
    let mut request = Request::get("http://crm.example/leads").body(()).unwrap();
    request.extensions_mut().insert(key.clone());
    request
}

/// p50, p99 and mean of `samples`, in µs.
fn summary(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    let mean = samples.iter().sum::<Duration>().as_secs_f64() * 1e6 / samples.len() as f64;
    (at(0.5), at(0.99), mean)
}

/// Times `SAMPLES` requests on one connection, `tasks` at a time.
async fn latency<S>(client: S, tasks: usize) -> Vec<Duration>
where
    S: Service<Request<()>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let key = ConnectionKey::new("crm-1");
    let per_task = SAMPLES / tasks;
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let client = client.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(per_task);
                for _ in 0..per_task {
                    let started = Instant::now();
                    client.clone().oneshot(request(&key)).await.unwrap();
                    times.push(started.elapsed());
                }
                times
            })
        })
        .collect();
    let mut all = Vec::with_capacity(SAMPLES);
    for handle in handles {
        all.extend(handle.await.unwrap());
    }
    all
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// A throughput worker (this binary, run again): `CONNECTIONS` tasks, one
/// per connection, sending through the store for `RUN_SECS` from `start`;
/// prints how many requests went.
async fn worker(url: String, start: u64) {
    let store = RedisStore::connect(&url).await.unwrap();
    let client = RateLimitLayer::per_connection(quota())
        .store(store)
        .layer(inner());
    let sent = Arc::new(AtomicU64::new(0));
    tokio::time::sleep(Duration::from_micros(start.saturating_sub(unix_micros()))).await;
    let end = start + RUN_SECS * 1_000_000;
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let client = client.clone();
            let sent = Arc::clone(&sent);
            let key = ConnectionKey::new(format!("crm-{i}"));
            tokio::spawn(async move {
                while unix_micros() < end {
                    client.clone().oneshot(request(&key)).await.unwrap();
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    println!(
        "SENT {} FALLBACKS {}",
        sent.load(Ordering::Relaxed),
        client.handle().fallbacks()
    );
}

/// Decisions per second of `processes` workers at once.
fn throughput(server: &RedisServer, processes: usize) -> f64 {
    let start = unix_micros() + 1_000_000;
    let children: Vec<_> = (0..processes)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .env("FLEET_BENCH_WORKER", server.url())
                .env("FLEET_BENCH_START", start.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut sent = 0;
    for child in children {
        let output = child.wait_with_output().unwrap();
        let text = String::from_utf8(output.stdout).unwrap();
        let line = text.lines().find(|l| l.starts_with("SENT ")).unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        sent += fields[1].parse::<u64>().unwrap();
        assert_eq!(fields[3], "0", "a worker fell back to local decisions");
    }
    sent as f64 / RUN_SECS as f64
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Ok(url) = std::env::var("FLEET_BENCH_WORKER") {
        let start = std::env::var("FLEET_BENCH_START").unwrap().parse().unwrap();
        runtime.block_on(worker(url, start));
        return;
    }
    // `cargo bench` also runs benches with `--bench`; `cargo test` with
    // none: build only then.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let redis = RedisServer::start();
    println!("== fleet: one request through RateLimit, {SAMPLES} samples per row");
    println!(
        "{:<44} {:>9} {:>9} {:>9}",
        "store", "p50 µs", "p99 µs", "mean µs"
    );
    let row = |name: &str, samples: Vec<Duration>| {
        let (p50, p99, mean) = summary(samples);
        println!("{name:<44} {p50:>9.2} {p99:>9.2} {mean:>9.2}");
    };
    runtime.block_on(async {
        let local = RateLimitLayer::per_connection(quota()).layer(inner());
        row("in memory (default)", latency(local, 1).await);
        let store = RedisStore::connect(&redis.url()).await.unwrap();
        let shared = RateLimitLayer::per_connection(quota())
            .store(store.clone().prefix("one").unwrap())
            .layer(inner());
        row("redis, one request at a time", latency(shared, 1).await);
        let busy = RateLimitLayer::per_connection(quota())
            .store(store.clone().prefix("busy").unwrap())
            .layer(inner());
        row(
            "redis, 8 at a time on one connection",
            latency(busy, 8).await,
        );
        let leasing = RateLimitLayer::per_connection(quota())
            .store(store.clone().lease(8).prefix("lease").unwrap())
            .layer(inner());
        row("redis, 8 at a time, lease(8)", latency(leasing, 8).await);
    });
    println!("== fleet: decisions per second, {CONNECTIONS} connections per process, {RUN_SECS} s");
    for processes in [1, 4] {
        let rate = throughput(&redis, processes);
        println!("{processes} process(es): {rate:>9.0} decisions/s");
    }
}
