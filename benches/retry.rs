//! Cost of the retry layer on the success path (tollgate vs tower::retry,
//! with and without a retry budget), of computing delays, and of parsing
//! Retry-After.
//!
//! cargo bench --bench retry

use std::future::{ready, Ready};
use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Request, Response};
use tollgate::{retry_after, Backoff, Jitter, RetryBudget, RetryLayer};
use tower::{BoxError, Layer, Service, ServiceExt};

#[path = "common/tower_retry.rs"]
mod tower_retry;
use tower_retry::RetryTooManyRequests;

/// The cheapest possible inner service, so the layer's own cost shows.
fn ok_service() -> impl Service<
    Request<&'static str>,
    Response = Response<()>,
    Error = BoxError,
    Future = Ready<Result<Response<()>, BoxError>>,
> + Clone {
    tower::service_fn(|_req: Request<&'static str>| ready(Ok(Response::new(()))))
}

fn request() -> Request<&'static str> {
    Request::builder()
        .uri("http://127.0.0.1:8080/leads")
        .header("content-type", "application/json")
        .body("{\"lead\":1}")
        .unwrap()
}

fn success_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("success_path");
    group.bench_function("bare service", |b| {
        let mut svc = ok_service();
        b.iter(|| {
            rt.block_on(async { svc.ready().await.unwrap().call(request()).await })
                .unwrap()
        });
    });
    group.bench_function("tower::retry::Retry", |b| {
        let mut svc = tower::retry::RetryLayer::new(RetryTooManyRequests(3)).layer(ok_service());
        b.iter(|| rt.block_on(async { svc.ready().await.unwrap().call(request()).await.unwrap() }));
    });
    group.bench_function("tollgate::Retry", |b| {
        let mut svc = RetryLayer::new(Backoff::power_automate()).layer(ok_service());
        b.iter(|| rt.block_on(async { svc.ready().await.unwrap().call(request()).await.unwrap() }));
    });
    // The first try's deposit (a clock read and one atomic update) is the
    // budget's cost on a request that succeeds.
    group.bench_function("tollgate::Retry, with budget", |b| {
        let mut svc = RetryLayer::new(Backoff::power_automate())
            .budget(RetryBudget::default())
            .layer(ok_service());
        b.iter(|| rt.block_on(async { svc.ready().await.unwrap().call(request()).await.unwrap() }));
    });
    group.finish();
}

fn delays(c: &mut Criterion) {
    let mut group = c.benchmark_group("backoff");
    group.bench_function("power_automate schedule (4 delays)", |b| {
        let backoff = Backoff::power_automate().seed(1);
        b.iter(|| {
            black_box(&backoff)
                .delays()
                .fold(Duration::ZERO, |a, d| a + d)
        });
    });
    for jitter in [Jitter::None, Jitter::Full, Jitter::Banded] {
        group.bench_function(format!("delay(10), {jitter:?}"), |b| {
            let backoff = Backoff::exponential(Duration::from_millis(100))
                .max_retries(16)
                .jitter(jitter)
                .seed(1);
            b.iter(|| black_box(&backoff).delay(black_box(10)));
        });
    }
    group.finish();
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("retry_after::parse");
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_000);
    let cases = [
        ("absent", None),
        ("delay-seconds", Some(("retry-after", "120"))),
        ("retry-after-ms", Some(("retry-after-ms", "2500"))),
        (
            "IMF-fixdate",
            Some(("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")),
        ),
    ];
    for (name, header) in cases {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        if let Some((k, v)) = header {
            headers.insert(k, HeaderValue::from_static(v));
        }
        group.bench_function(name, |b| {
            b.iter(|| retry_after::parse(black_box(&headers), now));
        });
    }
    group.finish();
}

criterion_group!(benches, success_path, delays, parse);
criterion_main!(benches);
