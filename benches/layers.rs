//! Each layer as a `Service` call, beside what a user would pick instead on
//! the same request (issue 16): the peer's own check plus the same bare
//! call, one criterion run, a current-thread runtime (the contended gate:
//! two worker threads).
//!
//! ```text
//! cargo bench --bench layers                       # feature `metrics` off
//! cargo bench --bench layers --features metrics    # on, a Prometheus recorder installed
//! ```
//!
//! Every row sends the same `http::Request` (built once per call, in every
//! row alike) to the same inner service, which answers 200 at once; the
//! "bare call" row is that service alone, so each row's excess over it is
//! what its layer costs. Quotas are far above what the bench sends, so no
//! request ever waits. `benches/rate_limit.rs` measures the stores
//! directly (no service, no request).

use std::future::{ready, Ready};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use governor::{Quota as GovernorQuota, RateLimiter};
use http::{Request, Response, StatusCode};
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;
use tollgate::{Backoff, ConcurrencyGateLayer, Quota, RateLimitLayer, RetryLayer, Tollgate};
use tower::limit::ConcurrencyLimitLayer;
use tower::{BoxError, Layer, Service, ServiceExt};

#[path = "common/tower_retry.rs"]
mod tower_retry;
use tower_retry::RetryTooManyRequests;

type Answer = Ready<Result<Response<()>, BoxError>>;

/// The bare call: answers 200 at once.
fn ok_service(
) -> impl Service<Request<()>, Response = Response<()>, Error = BoxError, Future = Answer> + Clone {
    tower::service_fn(|_req: Request<()>| ready(Ok(Response::new(()))))
}

/// A request to connection `host` (the rate limiter's key by default).
fn request(host: &str) -> Request<()> {
    Request::post(format!("http://{host}/leads"))
        .header("content-type", "application/json")
        .body(())
        .unwrap()
}

/// The hosts the keyed rows cycle through.
fn hosts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("crm-{i}.example")).collect()
}

/// Sends `iters` requests one after another through `svc`, to `hosts` in
/// turn.
fn send<S>(rt: &Runtime, svc: &mut S, hosts: &[String], iters: u64) -> Duration
where
    S: Service<Request<()>, Response = Response<()>>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let started = Instant::now();
        for i in 0..iters as usize {
            let host = &hosts[i % hosts.len()];
            let response = svc
                .ready()
                .await
                .unwrap()
                .call(request(host))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        started.elapsed()
    })
}

const PLENTY: u32 = 1_000_000_000;

fn governor_quota() -> GovernorQuota {
    GovernorQuota::per_second(NonZeroU32::new(PLENTY).unwrap())
}

/// The key a governor user would derive from the request: its host,
/// hashed (a `String` key would allocate on every call).
fn host_key(request: &Request<()>) -> u64 {
    let mut hasher = DefaultHasher::new();
    request.uri().host().unwrap_or("").hash(&mut hasher);
    hasher.finish()
}

fn rate_limit(c: &mut Criterion, keys: usize) {
    let rt = current_thread();
    let hosts = hosts(keys);
    let mut group = c.benchmark_group(format!("RateLimit as a service call, {keys} key(s)"));
    group.bench_function("bare call", |b| {
        let mut svc = ok_service();
        b.iter_custom(|iters| send(&rt, &mut svc, &hosts, iters));
    });
    if keys == 1 {
        group.bench_function("governor direct check + call", |b| {
            let limiter = Arc::new(RateLimiter::direct(governor_quota()));
            let inner = ok_service();
            let mut svc = tower::service_fn(move |request: Request<()>| {
                limiter.check().expect("plenty of quota");
                inner.clone().oneshot(request)
            });
            b.iter_custom(|iters| send(&rt, &mut svc, &hosts, iters));
        });
    }
    group.bench_function("governor keyed check_key + call", |b| {
        let limiter = Arc::new(RateLimiter::keyed(governor_quota()));
        let inner = ok_service();
        let mut svc = tower::service_fn(move |request: Request<()>| {
            limiter
                .check_key(&host_key(&request))
                .expect("plenty of quota");
            inner.clone().oneshot(request)
        });
        b.iter_custom(|iters| send(&rt, &mut svc, &hosts, iters));
    });
    group.bench_function("tollgate RateLimit (per connection)", |b| {
        let mut svc = RateLimitLayer::per_connection(Quota::per_second(PLENTY)).layer(ok_service());
        b.iter_custom(|iters| send(&rt, &mut svc, &hosts, iters));
    });
    group.finish();
}

fn gate_uncontended(c: &mut Criterion) {
    let rt = current_thread();
    let hosts = hosts(1);
    let mut group = c.benchmark_group("ConcurrencyGate as a service call, uncontended");
    group.bench_function("bare call", |b| {
        let mut svc = ok_service();
        b.iter_custom(|iters| send(&rt, &mut svc, &hosts, iters));
    });
    group.bench_function("tokio Semaphore + call", |b| {
        let semaphore = Arc::new(Semaphore::new(64));
        let inner = ok_service();
        let mut svc = tower::service_fn(move |request: Request<()>| {
            let (semaphore, inner) = (Arc::clone(&semaphore), inner.clone());
            async move {
                let _permit = semaphore.acquire_owned().await.expect("never closed");
                inner.oneshot(request).await
            }
        });
        b.iter_custom(|iters| send(&rt, &mut svc, &hosts, iters));
    });
    group.bench_function("tower ConcurrencyLimit", |b| {
        let mut svc = ConcurrencyLimitLayer::new(64).layer(ok_service());
        b.iter_custom(|iters| send(&rt, &mut svc, &hosts, iters));
    });
    group.bench_function("tollgate ConcurrencyGate", |b| {
        let mut svc = ConcurrencyGateLayer::new(64).layer(ok_service());
        b.iter_custom(|iters| send(&rt, &mut svc, &hosts, iters));
    });
    group.finish();
}

/// 64 tasks, each sending `per_task` requests through a clone of `svc`
/// (whose inner service yields once, so slots are held across a
/// scheduling point); the time per request.
fn contend<S>(rt: &Runtime, svc: &S, iters: u64) -> Duration
where
    S: Service<Request<()>, Response = Response<()>, Error = BoxError>,
    S: Clone + Send + 'static,
    S::Future: Send,
{
    let per_task = iters.div_ceil(64).max(1);
    rt.block_on(async {
        let started = Instant::now();
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let mut svc = svc.clone();
                tokio::spawn(async move {
                    for _ in 0..per_task {
                        let request = request("crm-0.example");
                        svc.ready().await.unwrap().call(request).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        started.elapsed() * iters as u32 / (per_task * 64) as u32
    })
}

fn yielding_service() -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<Response<()>, BoxError>> + Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(|_request: Request<()>| async {
        tokio::task::yield_now().await;
        Ok::<_, BoxError>(Response::new(()))
    })
}

fn gate_contended(c: &mut Criterion) {
    // Timers on, as in `#[tokio::main]`: feature `metrics` reads figures
    // on a timer.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("ConcurrencyGate, 64 tasks on 8 slots (per request)");
    group.bench_function("tower ConcurrencyLimit", |b| {
        let svc = ConcurrencyLimitLayer::new(8).layer(yielding_service());
        b.iter_custom(|iters| contend(&rt, &svc, iters));
    });
    group.bench_function("tollgate ConcurrencyGate (queue 64)", |b| {
        let svc = ConcurrencyGateLayer::new(8)
            .queue_limit(64)
            .layer(yielding_service());
        b.iter_custom(|iters| contend(&rt, &svc, iters));
    });
    group.finish();
}

fn retry_and_stack(c: &mut Criterion) {
    let rt = current_thread();
    let hosts = hosts(1);
    let mut group = c.benchmark_group("Retry and the default stack as a service call, success");
    group.bench_function("bare call", |b| {
        let mut svc = ok_service();
        b.iter_custom(|iters| send(&rt, &mut svc, &hosts, iters));
    });
    group.bench_function("tower Retry", |b| {
        let mut svc = tower::retry::RetryLayer::new(RetryTooManyRequests(3)).layer(ok_service());
        b.iter_custom(|iters| send(&rt, &mut svc, &hosts, iters));
    });
    group.bench_function("tollgate Retry", |b| {
        let mut svc = RetryLayer::new(Backoff::power_automate()).layer(ok_service());
        b.iter_custom(|iters| send(&rt, &mut svc, &hosts, iters));
    });
    group.bench_function("tollgate default stack (Tollgate::builder())", |b| {
        let mut svc = Tollgate::builder().build(ok_service()).unwrap();
        b.iter_custom(|iters| send(&rt, &mut svc, &hosts, iters));
    });
    group.finish();
}

fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

fn benches(c: &mut Criterion) {
    // With feature `metrics` (issue 17), every row publishes into a real
    // Prometheus recorder, as a user watching production would.
    #[cfg(feature = "metrics")]
    let _scrape = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the bench's only recorder");
    rate_limit(c, 1);
    rate_limit(c, 1_024);
    gate_uncontended(c);
    gate_contended(c);
    retry_and_stack(c);
}

criterion_group! {
    name = layers;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(layers);
