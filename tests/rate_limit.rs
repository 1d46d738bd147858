//! The per-connection rate limiter end to end, in virtual time.

mod common;

use common::{secs, watchdog};

use std::time::Duration;

use http::{Request, StatusCode};
use tokio::time::Instant;
use tollgate::testing::{Reply, Script};
use tollgate::{ConnectionKey, Error, Quota, RateLimit, RateLimitLayer};
use tower::{BoxError, Layer, Service, ServiceExt};

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn to(uri: &str) -> Request<()> {
    Request::get(uri).body(()).unwrap()
}

fn on(connection: &str) -> Request<()> {
    let mut request = to("http://127.0.0.1:8080/leads");
    request
        .extensions_mut()
        .insert(ConnectionKey::new(connection));
    request
}

type Limited = RateLimit<tollgate::testing::ScriptService>;

fn limited(quota: Quota, server: &Script) -> Limited {
    RateLimitLayer::per_connection(quota).layer(server.service())
}

/// Sends every request at once, each as its own task on its own clone (so
/// each has its own waker: a lost wake-up hangs it, which the watchdog
/// reports), and returns when each got its answer, relative to the start.
async fn send_all(client: &Limited, requests: Vec<Request<()>>) -> Vec<Duration> {
    let started = Instant::now();
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|request| {
            let client = client.clone();
            tokio::spawn(async move {
                client.oneshot(request).await.unwrap();
                started.elapsed()
            })
        })
        .collect();
    let mut times = Vec::new();
    for task in tasks {
        times.push(task.await.unwrap());
    }
    times
}

#[tokio::test(start_paused = true)]
async fn n_per_period_after_the_burst() {
    watchdog(secs(3_600), async {
        let server = Script::new();
        let client = limited(Quota::per_second(5), &server);
        let times = send_all(&client, (0..20).map(|_| on("a")).collect()).await;
        // A full bucket of 5 at once, then one every 200 ms: 5 per second.
        let mut expected: Vec<Duration> = vec![Duration::ZERO; 5];
        expected.extend((1..=15).map(|i| ms(200 * i)));
        let mut times = times;
        times.sort();
        assert_eq!(times, expected);
        assert_eq!(client.handle().admitted(), 20);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn burst_size_caps_what_goes_at_once() {
    watchdog(secs(3_600), async {
        let server = Script::new();
        let client = limited(Quota::per_second(10).burst(2), &server);
        let mut times = send_all(&client, (0..5).map(|_| on("a")).collect()).await;
        times.sort();
        assert_eq!(times, [ms(0), ms(0), ms(100), ms(200), ms(300)]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn connections_are_independent() {
    watchdog(secs(3_600), async {
        let server = Script::new();
        let client = limited(Quota::per_second(2).burst(1), &server);
        let requests = vec![on("a"), on("a"), on("b"), on("b"), on("c")];
        let times = send_all(&client, requests).await;
        let mut a = vec![times[0], times[1]];
        a.sort();
        let mut b = vec![times[2], times[3]];
        b.sort();
        assert_eq!(a, [ms(0), ms(500)]);
        assert_eq!(b, [ms(0), ms(500)]);
        assert_eq!(times[4], ms(0));
        assert_eq!(client.handle().keys(), 3);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn authority_is_the_key_without_an_extension() {
    watchdog(secs(3_600), async {
        let server = Script::new();
        let client = limited(Quota::per_second(1), &server);
        let requests = vec![
            to("http://crm.example/leads/1"),
            to("http://crm.example/leads/2"),
            to("http://erp.example/orders/1"),
            to("https://crm.example/leads/3"),
        ];
        let times = send_all(&client, requests).await;
        // Same scheme and authority share a bucket; the others are their own.
        let mut crm = vec![times[0], times[1]];
        crm.sort();
        assert_eq!(crm, [ms(0), secs(1)]);
        assert_eq!(times[2], ms(0));
        assert_eq!(times[3], ms(0));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn key_by_a_header() {
    watchdog(secs(3_600), async {
        let server = Script::new();
        let layer = RateLimitLayer::per_connection(Quota::per_second(1)).key_by(
            |head: &http::request::Parts| {
                head.headers
                    .get("x-tenant")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            },
        );
        let client = layer.layer(server.service());
        let tenant = |t: &str| {
            Request::get("http://api.example/")
                .header("x-tenant", t)
                .body(())
                .unwrap()
        };
        let started = Instant::now();
        client.clone().oneshot(tenant("t1")).await.unwrap();
        client.clone().oneshot(tenant("t2")).await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
        client.clone().oneshot(tenant("t1")).await.unwrap();
        assert_eq!(started.elapsed(), secs(1));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_429_pauses_the_whole_connection_and_only_it() {
    watchdog(secs(3_600), async {
        // Connection a's first request meets a 429 asking for 10 s.
        let server = Script::new()
            .reply(Reply::status(429).retry_after(secs(10)))
            .reply(200);
        let client = limited(Quota::per_second(100), &server);
        let first = client.clone().oneshot(on("a")).await.unwrap();
        assert_eq!(first.status(), StatusCode::TOO_MANY_REQUESTS);

        let times = send_all(&client, vec![on("a"), on("a"), on("b")]).await;
        // b goes at once; a waits the cool-down out, then refills from empty
        // at 100/s: one request at 10 s, the next 10 ms later.
        assert_eq!(times[2], Duration::ZERO);
        let mut a = vec![times[0], times[1]];
        a.sort();
        assert_eq!(a, [secs(10), secs(10) + ms(10)]);
        assert_eq!(client.handle().cool_downs(), 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn requests_already_waiting_also_wait_the_cool_down_out() {
    watchdog(secs(3_600), async {
        // Bucket of 1: request 2 waits for a token when request 1's 429 lands.
        let server = Script::new()
            .reply(Reply::status(429).retry_after(secs(5)))
            .reply(200);
        let client = limited(Quota::per_second(1), &server);
        let times = send_all(&client, vec![on("a"), on("a")]).await;
        // Request 2 would have gone at 1 s; the cool-down holds it to 5 s.
        assert_eq!(times, [Duration::ZERO, secs(5)]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_shorter_retry_after_never_shortens_a_longer_cool_down() {
    watchdog(secs(3_600), async {
        // Two requests in flight together; their answers land at 1 s, asking
        // for 30 s and then for 2 s.
        let server = Script::new()
            .reply(Reply::status(503).retry_after(secs(30)).after(secs(1)))
            .reply(Reply::status(429).retry_after(secs(2)).after(secs(1)))
            .reply(200);
        let client = limited(Quota::per_second(100), &server);
        let times = send_all(&client, vec![on("a"), on("a")]).await;
        assert_eq!(times, [secs(1), secs(1)]);
        let started = Instant::now();
        client.clone().oneshot(on("a")).await.unwrap();
        assert_eq!(started.elapsed(), secs(30));
        assert_eq!(client.handle().cool_downs(), 2);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn cool_down_is_capped_and_needs_a_throttling_status() {
    watchdog(secs(3_600), async {
        let server = Script::new()
            .reply(Reply::status(429).retry_after(secs(3_600)))
            .reply(200);
        let client = RateLimitLayer::per_connection(Quota::per_second(100))
            .max_cool_down(secs(60))
            .layer(server.service());
        client.clone().oneshot(on("a")).await.unwrap();
        let started = Instant::now();
        client.clone().oneshot(on("a")).await.unwrap();
        assert_eq!(started.elapsed(), secs(60));

        // A Retry-After on a 200 or a 500 is not a throttle.
        let server = Script::new()
            .reply(Reply::status(500).retry_after(secs(60)))
            .reply(Reply::status(200).retry_after(secs(60)))
            .reply(200);
        let client = limited(Quota::per_second(100), &server);
        let started = Instant::now();
        for _ in 0..3 {
            client.clone().oneshot(on("a")).await.unwrap();
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(client.handle().cool_downs(), 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn max_wait_refuses_at_once_with_when_to_come_back() {
    watchdog(secs(3_600), async {
        let server = Script::new();
        let client = RateLimitLayer::per_connection(Quota::per_second(2).burst(1))
            .max_wait(ms(400))
            .layer(server.service());
        client.clone().oneshot(on("a")).await.unwrap();
        let started = Instant::now();
        let error: BoxError = client.clone().oneshot(on("a")).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::ZERO, "refused without waiting");
        assert_eq!(
            error.downcast_ref::<Error>(),
            Some(&Error::RateLimited {
                retry_after: ms(500)
            })
        );
        assert_eq!(server.count(), 1);

        // Within max_wait, it waits.
        tokio::time::advance(ms(200)).await;
        client.clone().oneshot(on("a")).await.unwrap();
        assert_eq!(started.elapsed(), ms(500));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_waiter_is_refused_when_a_cool_down_pushes_past_max_wait() {
    watchdog(secs(3_600), async {
        let server = Script::new()
            .reply(Reply::status(429).retry_after(secs(20)))
            .reply(200);
        let client = RateLimitLayer::per_connection(Quota::per_second(1))
            .max_wait(secs(5))
            .layer(server.service());
        let (first, second) = tokio::join!(client.clone().oneshot(on("a")), async {
            tokio::task::yield_now().await;
            client.clone().oneshot(on("a")).await
        });
        assert_eq!(first.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
        let error = second.unwrap_err();
        assert!(matches!(
            error.downcast_ref::<Error>(),
            Some(Error::RateLimited { retry_after }) if *retry_after > secs(5)
        ));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn dropped_waiters_spend_nothing() {
    watchdog(secs(3_600), async {
        let server = Script::new();
        let client = limited(Quota::per_second(1).burst(1), &server);
        client.clone().oneshot(on("a")).await.unwrap();

        // Ten requests wait for the next token, then give up before it comes.
        let waiters: Vec<_> = (0..10)
            .map(|_| tokio::spawn(client.clone().oneshot(on("a"))))
            .collect();
        tokio::time::sleep(ms(500)).await;
        assert_eq!(client.handle().waiting(), 10);
        for waiter in &waiters {
            waiter.abort();
        }
        for waiter in waiters {
            assert!(waiter.await.unwrap_err().is_cancelled());
        }
        assert_eq!(client.handle().waiting(), 0);

        // The token at 1 s is still there for the next request.
        let started = Instant::now();
        client.clone().oneshot(on("a")).await.unwrap();
        assert_eq!(started.elapsed(), ms(500));
        assert_eq!(server.count(), 2);
        assert_eq!(client.handle().admitted(), 2);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn invalid_quota_fails_every_call_without_panicking() {
    watchdog(secs(3_600), async {
        let server = Script::new();
        for quota in [
            Quota::per_second(0),
            Quota::new(5, Duration::ZERO),
            Quota::per_second(5).burst(0),
        ] {
            let client = limited(quota, &server);
            for _ in 0..2 {
                let error = client.clone().oneshot(on("a")).await.unwrap_err();
                assert!(matches!(
                    error.downcast_ref::<Error>(),
                    Some(Error::InvalidConfig { .. })
                ));
            }
        }
        let client = RateLimitLayer::per_connection(Quota::per_second(1))
            .max_keys(0)
            .layer(server.service());
        assert!(client.oneshot(on("a")).await.is_err());
        assert_eq!(server.count(), 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn many_distinct_connections_stay_under_max_keys() {
    watchdog(secs(3_600), async {
        let inner = tower::service_fn(|_: Request<()>| async {
            Ok::<_, BoxError>(http::Response::new(()))
        });
        let mut client = RateLimitLayer::per_connection(Quota::per_second(1))
            .max_keys(500)
            .layer(inner);
        let handle = client.handle();
        let mut peak = 0;
        for n in 0..100_000 {
            client
                .ready()
                .await
                .unwrap()
                .call(on(&format!("conn-{n}")))
                .await
                .unwrap();
            peak = peak.max(handle.keys());
        }
        assert!(peak <= 500, "peak {peak}");
        assert_eq!(handle.admitted(), 100_000);
        assert!(
            handle.evicted_active() > 0,
            "a store full of active keys evicts"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_share_buckets_across_threads() {
    watchdog(secs(60), async {
        // Real time, but nothing waits: a bucket of 100 that refills one a
        // minute, and max_wait zero, so a request either takes a token or is
        // refused at once. 1,000 requests on 1,000 clones over two threads:
        // exactly 100 get through only if every clone spends the same bucket.
        let server = Script::new();
        let client = RateLimitLayer::per_connection(Quota::per_minute(1).burst(100))
            .max_wait(Duration::ZERO)
            .layer(server.service());
        let tasks: Vec<_> = (0..1_000)
            .map(|_| tokio::spawn(client.clone().oneshot(on("a"))))
            .collect();
        let mut refused = 0;
        for task in tasks {
            if let Err(error) = task.await.unwrap() {
                assert!(matches!(
                    error.downcast_ref::<Error>(),
                    Some(Error::RateLimited { .. })
                ));
                refused += 1;
            }
        }
        let handle = client.handle();
        assert_eq!((handle.admitted(), refused), (100, 900));
        assert_eq!(handle.waiting(), 0);
        assert_eq!(server.count(), 100);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn waiters_on_a_connection_are_served_in_order() {
    watchdog(secs(3_600), async {
        let server = Script::new();
        let client = limited(Quota::per_second(10).burst(1), &server);
        let requests: Vec<Request<()>> = (0..12)
            .map(|i| {
                let mut request = to(&format!("http://crm.example/leads/{i}"));
                request.extensions_mut().insert(ConnectionKey::new("a"));
                request
            })
            .collect();
        let started = Instant::now();
        send_all(&client, requests).await;
        let attempts = server.attempts();
        let order: Vec<String> = attempts.iter().map(|a| a.uri.path().to_string()).collect();
        let expected: Vec<String> = (0..12).map(|i| format!("/leads/{i}")).collect();
        assert_eq!(order, expected, "served in arrival order");
        let times: Vec<Duration> = attempts.iter().map(|a| a.at - started).collect();
        assert_eq!(times, (0..12).map(|i| ms(100 * i)).collect::<Vec<_>>());
        assert_eq!(client.handle().waiting(), 0);
    })
    .await;
}

/// A token-bucket server (`per_second`, a burst of `burst`) that answers
/// the rest `429` with `Retry-After` in whole seconds, rounded up: "10 ms"
/// becomes "1 s", as most servers send it. Counts what it accepted and
/// refused.
#[derive(Clone)]
struct RoundingServer {
    interval: Duration,
    tolerance: Duration,
    // When the bucket is full again (GCRA's theoretical arrival time).
    full_at: std::sync::Arc<std::sync::Mutex<Instant>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl RoundingServer {
    fn new(per_second: u32, burst: u32) -> Self {
        RoundingServer {
            interval: secs(1) / per_second,
            tolerance: secs(1) / per_second * (burst - 1),
            full_at: std::sync::Arc::new(std::sync::Mutex::new(Instant::now())),
            accepted: Default::default(),
            refused: Default::default(),
        }
    }
}

impl Service<Request<()>> for RoundingServer {
    type Response = http::Response<()>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<http::Response<()>, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        use std::sync::atomic::Ordering::Relaxed;
        let now = Instant::now();
        let mut full_at = self.full_at.lock().unwrap();
        let allowed_at = full_at.checked_sub(self.tolerance).unwrap_or(*full_at);
        let mut response = http::Response::new(());
        if now >= allowed_at {
            *full_at = (*full_at).max(now) + self.interval;
            self.accepted.fetch_add(1, Relaxed);
        } else {
            let wait = allowed_at - now;
            let seconds = wait.as_nanos().div_ceil(1_000_000_000).max(1);
            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            response
                .headers_mut()
                .insert("retry-after", seconds.to_string().parse().unwrap());
            self.refused.fetch_add(1, Relaxed);
        }
        std::future::ready(Ok(response))
    }
}

/// Pushes `leads` requests, 20 at a time, through the limiter (unlimited
/// quota) around a 10/s rounding server of `burst`, resending each 429
/// after its `Retry-After` as a retry layer would; returns the time taken,
/// the 429s, and the limiter's handle.
async fn push_through_rounding_server(
    learn: bool,
    burst: u32,
    leads: u64,
) -> (Duration, u64, tollgate::rate_limit::RateLimitHandle) {
    use futures_util::stream::{self, StreamExt};
    use std::sync::atomic::Ordering::Relaxed;
    let server = RoundingServer::new(10, burst);
    let client = RateLimitLayer::per_connection(Quota::unlimited())
        .learn_rate(learn)
        .layer(server.clone());
    let started = Instant::now();
    stream::iter(0..leads)
        .for_each_concurrent(20, |_| {
            let client = client.clone();
            async move {
                loop {
                    let response = client.clone().oneshot(on("crm")).await.unwrap();
                    if response.status() != StatusCode::TOO_MANY_REQUESTS {
                        break;
                    }
                    tokio::time::sleep(secs(1)).await;
                }
            }
        })
        .await;
    assert_eq!(server.accepted.load(Relaxed), leads);
    (
        started.elapsed(),
        server.refused.load(Relaxed),
        client.handle(),
    )
}

#[tokio::test(start_paused = true)]
async fn a_learned_pace_keeps_a_rounding_server_busy() {
    watchdog(secs(36_000), async {
        // 600 requests at 10/s: a minute at best. Learning costs a few
        // seconds and 429s (the first crowd's, then one per probe above
        // the pace, every several seconds);
        // without it, each 429 idles the connection for its rounded-up
        // second, then the 20 waiting go at once and earn the next one.
        // (burst, most time learning, least time with the cool-down only)
        for (burst, learning, cool_down_only) in
            [(1, secs(75), secs(500)), (5, secs(70), secs(110))]
        {
            let (took, refused, handle) = push_through_rounding_server(true, burst, 600).await;
            let seen = format!("burst {burst}, learning: {took:?}, {refused} 429s");
            assert!(took < learning, "{seen}");
            assert!(refused <= 20, "{seen}");
            assert!(handle.rate_cuts() >= 1, "{seen}");
            let (took, refused, handle) = push_through_rounding_server(false, burst, 600).await;
            let seen = format!("burst {burst}, cool-down only: {took:?}, {refused} 429s");
            assert!(took > cool_down_only, "{seen}");
            assert_eq!(handle.rate_cuts(), 0);
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_request_with_its_token_free_is_sent_from_call_and_one_without_waits_to_be_polled() {
    watchdog(secs(60), async {
        let server = Script::new();
        let mut client = limited(Quota::per_second(1), &server);
        let first = ServiceExt::<Request<()>>::ready(&mut client)
            .await
            .unwrap()
            .call(on("crm"));
        assert_eq!(
            server.count(),
            1,
            "sent before its first poll, as tower's RateLimit does"
        );
        let second = ServiceExt::<Request<()>>::ready(&mut client)
            .await
            .unwrap()
            .call(on("crm"));
        assert_eq!(
            server.count(),
            1,
            "no token: nothing spent until it is polled"
        );
        // Dropped unpolled, the waiting request spent nothing: the next
        // token is still the one due in a second.
        drop(second);
        let started = Instant::now();
        let first: http::Response<_> = first.await.unwrap();
        assert_eq!(first.status(), StatusCode::OK);
        let third = ServiceExt::<Request<()>>::ready(&mut client)
            .await
            .unwrap()
            .call(on("crm"))
            .await
            .unwrap();
        assert_eq!(third.status(), StatusCode::OK);
        assert_eq!(started.elapsed(), secs(1));
        assert_eq!(server.count(), 2);
    })
    .await;
}
