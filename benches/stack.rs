//! What all three layers cost per request together: the builder's stack
//! beside a bare inner service and beside tower's nearest stack
//! (`ConcurrencyLimit` around `tower::retry`), one request at a time.
//!
//! cargo bench --bench stack
//!
//! Each measurement sends many requests inside one `block_on`, so the
//! runtime's own entry cost is not in the figures.

use std::future::{ready, Ready};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response, StatusCode};
use tokio::runtime::Runtime;
use tollgate::{Quota, Tollgate};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

#[path = "common/tower_retry.rs"]
mod tower_retry;
use tower_retry::RetryTooManyRequests;

type Answer = Ready<Result<Response<()>, BoxError>>;

/// The cheapest possible inner service, so the layers' own cost shows.
fn ok_service(
) -> impl Service<Request<&'static str>, Response = Response<()>, Error = BoxError, Future = Answer>
       + Clone {
    tower::service_fn(|_req: Request<&'static str>| ready(Ok(Response::new(()))))
}

fn request() -> Request<&'static str> {
    Request::post("http://127.0.0.1:8080/leads")
        .header("content-type", "application/json")
        .body("{\"lead\":1}")
        .unwrap()
}

/// Sends `iters` requests one after another through `svc`.
fn send<S>(rt: &Runtime, svc: &mut S, iters: u64) -> std::time::Duration
where
    S: Service<Request<&'static str>, Response = Response<()>>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let started = Instant::now();
        for _ in 0..iters {
            let response = svc.ready().await.unwrap().call(request()).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        started.elapsed()
    })
}

fn one_request(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("the whole stack, one request at a time");
    group.bench_function("bare service (request built, sent, answered)", |b| {
        let mut svc = ok_service();
        b.iter_custom(|iters| send(&rt, &mut svc, iters));
    });
    group.bench_function("tower: ConcurrencyLimit(25) + retry", |b| {
        let mut svc = ServiceBuilder::new()
            .concurrency_limit(25)
            .retry(RetryTooManyRequests(3))
            .service(ok_service());
        b.iter_custom(|iters| send(&rt, &mut svc, iters));
    });
    group.bench_function("tollgate: Tollgate::builder() defaults (no quota)", |b| {
        let mut svc = Tollgate::builder().build(ok_service()).unwrap();
        b.iter_custom(|iters| send(&rt, &mut svc, iters));
    });
    group.bench_function("tollgate: builder with a per-connection quota", |b| {
        // Never runs dry within a run, so the admit path is measured.
        let quota = Quota::per_second(1_000_000_000).burst(u32::MAX);
        let mut svc = Tollgate::builder()
            .per_connection(quota)
            .build(ok_service())
            .unwrap();
        b.iter_custom(|iters| send(&rt, &mut svc, iters));
    });
    group.finish();
}

criterion_group!(benches, one_request);
criterion_main!(benches);
