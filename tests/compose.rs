//! The three layers composed in DESIGN.md's order: gate, retry, rate limit.

mod common;

use common::{secs, watchdog};

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tollgate::testing::{Reply, Script, ScriptService};
use tollgate::{
    Backoff, ConcurrencyGate, ConcurrencyGateLayer, Error, Jitter, Quota, RateLimit, Retry,
    ServiceBuilderExt, Tollgate,
};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

type Stack<S> = ConcurrencyGate<Retry<RateLimit<S>>>;

fn stack(
    gate: ConcurrencyGateLayer,
    backoff: Backoff,
    quota: Quota,
    server: &Script,
) -> Stack<ScriptService> {
    ServiceBuilder::new()
        .layer(gate)
        .retry_backoff(backoff)
        .rate_limit_per_connection(quota)
        .service(server.service())
}

fn get(uri: &str) -> Request<()> {
    Request::get(uri).body(()).unwrap()
}

/// When each attempt reached the server, by URI, relative to `start`.
fn arrivals(server: &Script, start: Instant) -> Vec<(String, Duration)> {
    server
        .attempts()
        .into_iter()
        .map(|a| (a.uri.to_string(), a.at - start))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_request_keeps_its_slot_while_it_sleeps_before_a_retry() {
    watchdog(secs(3_600), async {
        let server = Script::new().reply(429).reply(200);
        let client = stack(
            ConcurrencyGateLayer::new(1),
            Backoff::fixed(secs(10)),
            Quota::per_second(1_000),
            &server,
        );
        let gate = client.handle();
        let start = Instant::now();
        let a = tokio::spawn(client.clone().oneshot(get("http://crm.example/a")));
        tokio::task::yield_now().await;
        let b = tokio::spawn(client.clone().oneshot(get("http://crm.example/b")));
        tokio::time::sleep(secs(5)).await;
        // A sleeps before its retry, still counted in flight; B waits its turn.
        assert_eq!((gate.in_flight(), gate.queued()), (1, 1));
        assert_eq!(a.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(b.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(
            arrivals(&server, start),
            [
                ("http://crm.example/a".into(), Duration::ZERO),
                ("http://crm.example/a".into(), secs(10)),
                ("http://crm.example/b".into(), secs(10)),
            ]
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn retries_spend_tokens_like_first_tries() {
    watchdog(secs(3_600), async {
        let server = Script::new().reply(503).reply(200);
        // The policy would retry at once; the connection's bucket says 1 s.
        let client = stack(
            ConcurrencyGateLayer::new(4),
            Backoff::fixed(Duration::ZERO),
            Quota::per_second(1).burst(1),
            &server,
        );
        let response = client
            .clone()
            .oneshot(get("http://crm.example/"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(server.waits(), [secs(1)]);
        assert_eq!(client.get_ref().get_ref().handle().admitted(), 2);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_429_on_one_connection_delays_that_connection_only() {
    watchdog(secs(3_600), async {
        let server = Script::new()
            .reply(Reply::status(429).retry_after(secs(10)))
            .reply(200);
        let client = stack(
            ConcurrencyGateLayer::new(10),
            Backoff::fixed(secs(1)),
            Quota::per_second(100),
            &server,
        );
        let start = Instant::now();
        let first = tokio::spawn(client.clone().oneshot(get("http://a.example/1")));
        tokio::task::yield_now().await;
        // Connection a is cooling down now; b is not.
        let (second, other) = tokio::join!(
            client.clone().oneshot(get("http://a.example/2")),
            client.clone().oneshot(get("http://b.example/1")),
        );
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(second.unwrap().status(), StatusCode::OK);
        assert_eq!(other.unwrap().status(), StatusCode::OK);
        let seen = arrivals(&server, start);
        let at = |host: &str| {
            let mut times: Vec<Duration> = seen
                .iter()
                .filter(|(uri, _)| uri.contains(host))
                .map(|(_, at)| *at)
                .collect();
            times.sort();
            times
        };
        // b never waited. On a: the first try; then its retry (max(1 s,
        // Retry-After 10 s)) and the other request, never throttled itself, both
        // held by the cool-down until 10 s, when a restarts from one token and
        // refills at 100/s.
        assert_eq!(at("b.example"), [Duration::ZERO]);
        assert_eq!(
            at("a.example"),
            [
                Duration::ZERO,
                secs(10),
                secs(10) + Duration::from_millis(10)
            ]
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn queue_full_is_immediate_while_retries_sleep() {
    watchdog(secs(3_600), async {
        let server = Script::new().reply(429).reply(200);
        let client = stack(
            ConcurrencyGateLayer::new(1).queue_limit(0),
            Backoff::fixed(secs(10)),
            Quota::per_second(100),
            &server,
        );
        let sleeping = tokio::spawn(client.clone().oneshot(get("http://crm.example/a")));
        tokio::time::sleep(secs(1)).await;
        let started = Instant::now();
        let error = client
            .clone()
            .oneshot(get("http://crm.example/b"))
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(error.downcast_ref::<Error>(), Some(&Error::QueueFull));
        assert_eq!(sleeping.await.unwrap().unwrap().status(), StatusCode::OK);
    })
    .await;
}

/// A server that accepts `per_second` requests a second and answers the
/// rest `429` with `Retry-After: 1`; each answer takes 20 ms.
#[derive(Clone)]
struct Capacity {
    window: Arc<Mutex<(Instant, u32)>>,
    per_second: u32,
}

impl Service<Request<()>> for Capacity {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        let over = {
            let mut window = self.window.lock().unwrap();
            if window.0.elapsed() >= secs(1) {
                *window = (Instant::now(), 0);
            }
            window.1 += 1;
            window.1 > self.per_second
        };
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut response = Response::new(());
            if over {
                *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                response
                    .headers_mut()
                    .insert("retry-after", http::HeaderValue::from_static("1"));
            }
            Ok(response)
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_hundred_thousand_requests_and_none_lost() {
    watchdog(secs(3_600), async {
        const TOTAL: usize = 100_000;
        let server = Capacity {
            window: Arc::new(Mutex::new((Instant::now(), 0))),
            per_second: 500,
        };
        let client = ServiceBuilder::new()
            .concurrency_gate(25) // Power Automate's default: 25 in flight, 35 waiting
            .retry_backoff(
                Backoff::exponential(Duration::from_millis(200))
                    .max_retries(6)
                    .jitter(Jitter::Full)
                    .seed(7),
            )
            .rate_limit_per_connection(Quota::per_second(450))
            .service(server);
        let gate = client.handle();
        // 70 callers at a time, more than the gate holds (60), so some are
        // refused; a refused caller backs off a second before it ends, as a
        // real importer would, instead of being replaced at once.
        let outcomes: Vec<Result<StatusCode, BoxError>> = stream::iter(0..TOTAL)
            .map(|i| {
                let client = client.clone();
                async move {
                    let request = get(&format!("http://crm.example/leads/{i}"));
                    let outcome = client.oneshot(request).await.map(|r| r.status());
                    if outcome.is_err() {
                        tokio::time::sleep(secs(1)).await;
                    }
                    outcome
                }
            })
            .buffer_unordered(70)
            .collect()
            .await;

        let (mut ok, mut throttled, mut refused) = (0, 0, 0);
        for outcome in &outcomes {
            match outcome {
                Ok(StatusCode::OK) => ok += 1,
                Ok(StatusCode::TOO_MANY_REQUESTS) => throttled += 1,
                Ok(other) => panic!("unexpected status {other}"),
                Err(error) => match error.downcast_ref::<Error>() {
                    Some(Error::QueueFull) => refused += 1,
                    _ => panic!("an error that is not ours: {error}"),
                },
            }
        }
        assert_eq!(
            ok + throttled + refused,
            TOTAL,
            "every request ended somehow"
        );
        assert_eq!(refused as u64, gate.refused());
        assert!(
            ok > TOTAL / 2,
            "ok {ok}, throttled {throttled}, refused {refused}"
        );
        assert!(refused > 0, "the gate refused some: {refused}");
        assert_eq!((gate.in_flight(), gate.queued()), (0, 0));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_builder_defaults_are_the_documented_ones() {
    watchdog(secs(3_600), async {
        let server = Script::new();
        let client = Tollgate::builder().build(server.service()).unwrap();
        let gate = client.handle();
        assert_eq!((gate.parallelism(), gate.queue_limit()), (25, 35));
        let retry = client.get_ref();
        assert_eq!(retry.get_ref().handle().keys(), 0);
    })
    .await;
}

#[test]
fn the_builder_refuses_invalid_settings() {
    let invalid = |builder: tollgate::TollgateBuilder| {
        matches!(builder.layer(), Err(Error::InvalidConfig { .. }))
    };
    assert!(invalid(Tollgate::builder().parallelism(0)));
    assert!(invalid(
        Tollgate::builder().per_connection(Quota::per_second(0))
    ));
    assert!(invalid(
        Tollgate::builder().per_connection(Quota::new(1, Duration::ZERO))
    ));
    assert!(invalid(
        Tollgate::builder().retry(Backoff::exponential(Duration::ZERO))
    ));
    assert!(invalid(
        Tollgate::builder().retry(
            Backoff::fixed(secs(1))
                .min_delay(secs(9))
                .max_delay(secs(2))
        )
    ));
    assert!(invalid(Tollgate::builder().max_keys(0)));
    assert!(Tollgate::builder().queue_limit(0).layer().is_ok());
}

#[tokio::test(start_paused = true)]
async fn the_default_stack_cools_a_connection_down_without_a_quota() {
    watchdog(secs(3_600), async {
        let server = Script::new()
            .reply(Reply::status(429).retry_after(secs(10)))
            .reply(200);
        let client = Tollgate::builder().build(server.service()).unwrap();
        let start = Instant::now();
        let first = tokio::spawn(client.clone().oneshot(get("http://crm.example/1")));
        tokio::task::yield_now().await;
        let second = tokio::spawn(client.clone().oneshot(get("http://crm.example/2")));
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(second.await.unwrap().unwrap().status(), StatusCode::OK);
        // The retry waits max(power_automate's 5-7.5 s, 10 s); the other
        // request on the connection waits the cool-down out too. After it the
        // connection restarts from one token; under the unlimited quota the
        // next is a nanosecond later, which tokio's timer rounds to 1 ms.
        let mut times: Vec<Duration> = arrivals(&server, start).iter().map(|a| a.1).collect();
        times.sort();
        assert_eq!(
            times,
            [
                Duration::ZERO,
                secs(10),
                secs(10) + Duration::from_millis(1)
            ]
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_builder_layer_is_the_same_stack() {
    watchdog(secs(3_600), async {
        let server = Script::new().reply(503).reply(200);
        let layer = Tollgate::builder()
            .parallelism(2)
            .retry(Backoff::fixed(secs(3)))
            .layer()
            .unwrap();
        let client = ServiceBuilder::new().layer(layer).service(server.service());
        assert_eq!(client.handle().parallelism(), 2);
        let response = client.oneshot(get("http://crm.example/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(server.waits(), [secs(3)]);
    })
    .await;
}
