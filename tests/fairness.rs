//! Slots go to requests that can make progress, in turn between
//! connections: a request waiting for its connection's token (paused by a
//! 429, or out of tokens) lends its gate slot to a ready request of
//! another connection. Virtual time throughout: lending waits on tokio
//! timers. The gate's races on a 2-thread runtime are
//! `tests/concurrency.rs`'s; lending's interleavings, the loom models in
//! `src/concurrency/queue.rs`.

mod common;

use common::{secs, watchdog, DropAfter};

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{Request, Response, StatusCode};
use tokio::time::{sleep, sleep_until, Instant};
use tollgate::concurrency::ConcurrencyGateHandle;
use tollgate::{Backoff, Error, Quota, Tollgate, TollgateService};
use tower::{BoxError, Service, ServiceExt};

const LATENCY: Duration = Duration::from_millis(10);

/// A server with one rule per host: takes `latency` per request; host `a`
/// answers its first `throttle_a` requests `429` with `Retry-After`
/// `retry_after` seconds. It counts completions per host and the most
/// requests it had at once.
#[derive(Clone)]
struct Server {
    latency: Duration,
    // b's latency, if not `latency`.
    latency_b: Option<Duration>,
    throttle_a: u64,
    retry_after: u64,
    seen_a: Arc<AtomicU64>,
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    // (host, when it arrived, when it was answered) for every request.
    log: Arc<Mutex<Vec<(String, Duration, Duration)>>>,
    start: Instant,
}

impl Server {
    fn new(latency: Duration) -> Self {
        Server {
            latency,
            latency_b: None,
            throttle_a: 0,
            retry_after: 0,
            seen_a: Arc::default(),
            running: Arc::default(),
            most: Arc::default(),
            log: Arc::default(),
            start: Instant::now(),
        }
    }

    fn throttling_a(mut self, count: u64, retry_after: u64) -> Self {
        self.throttle_a = count;
        self.retry_after = retry_after;
        self
    }

    fn most(&self) -> usize {
        self.most.load(Ordering::SeqCst)
    }

    /// Requests to `host` answered 200 within `[from, to)` since the start.
    fn ok(&self, host: &str, from: Duration, to: Duration) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(h, _, done)| h == host && *done >= from && *done < to)
            .count()
    }

    fn arrivals(&self, host: &str) -> Vec<Duration> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|(h, _, _)| h == host)
            .map(|(_, at, _)| *at)
            .collect()
    }
}

impl Service<Request<()>> for Server {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<()>) -> Self::Future {
        let host = request.uri().host().unwrap_or_default().to_owned();
        let throttled = host == "a" && self.seen_a.fetch_add(1, Ordering::SeqCst) < self.throttle_a;
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        let server = self.clone();
        let latency = match server.latency_b {
            Some(latency) if host == "b" => latency,
            _ => server.latency,
        };
        Box::pin(async move {
            let arrived = server.start.elapsed();
            sleep(latency).await;
            server.running.fetch_sub(1, Ordering::SeqCst);
            let mut response = Response::new(());
            if throttled {
                *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                let value = http::HeaderValue::from(server.retry_after);
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, value);
            } else {
                let done = server.start.elapsed();
                server.log.lock().unwrap().push((host, arrived, done));
            }
            Ok(response)
        })
    }
}

type Client = TollgateService<Server>;

fn get(host: &str) -> Request<()> {
    Request::get(format!("http://{host}/leads"))
        .body(())
        .unwrap()
}

/// Keeps `in_hand` requests to `host` going from `start` until `stop`
/// (then drops what is still in hand); returns how many ended in an error.
async fn feed(client: Client, host: &'static str, in_hand: usize, start: Instant, stop: Instant) {
    sleep_until(start).await;
    let mut running = FuturesUnordered::new();
    let stopping = sleep_until(stop);
    tokio::pin!(stopping);
    loop {
        while running.len() < in_hand {
            running.push(client.clone().oneshot(get(host)));
        }
        tokio::select! {
            done = running.next() => {
                let response = done.expect("never empty").expect("nothing is refused or lost");
                assert!(response.status().is_success() || response.status() == 429);
            }
            () = &mut stopping => return,
        }
    }
}

/// Requests working on the server never exceed the gate's parallelism and
/// the gate never holds more than it promises.
fn assert_promises_kept(server: &Server, gate: &ConcurrencyGateHandle, parallelism: usize) {
    assert!(server.most() <= parallelism, "{} at once", server.most());
    assert!(gate.queued() + gate.lent() <= gate.queue_limit());
}

/// The scenario: parallelism 10, no quota, `a` and `b` keep 15
/// requests in hand each, `a`'s first request is answered 429 with
/// `Retry-After: 10`. Returns `b`'s completions during `a`'s pause and
/// the server.
async fn b_during_a_pause(with_a: bool) -> (usize, Server) {
    let server = Server::new(LATENCY).throttling_a(1, 10);
    let client = Tollgate::builder()
        .parallelism(10)
        .build(server.clone())
        .unwrap();
    let gate = client.handle();
    let start = Instant::now();
    // a's pause ends at 10.01 s: a second more shows it go on.
    let stop = start + secs(11);
    let mut feeders = vec![tokio::spawn(feed(client.clone(), "b", 15, start, stop))];
    if with_a {
        feeders.push(tokio::spawn(feed(client.clone(), "a", 15, start, stop)));
    }
    // Sample the gate's promises while the load runs.
    while Instant::now() < stop {
        assert_promises_kept(&server, &gate, 10);
        sleep(Duration::from_millis(7)).await;
    }
    for feeder in feeders {
        feeder.await.unwrap();
    }
    // a's 429 arrived after one latency; its pause lasts 10 s from there.
    let b = server.ok("b", LATENCY, LATENCY + secs(10));
    (b, server)
}

#[tokio::test(start_paused = true)]
async fn a_paused_connection_leaves_the_slots_to_the_other() {
    watchdog(secs(600), async {
        let (alone, _) = b_during_a_pause(false).await;
        let (beside_a, server) = b_during_a_pause(true).await;
        // 10 slots / 10 ms = 1,000 a second, less the first round trip.
        assert!(alone > 9_000, "b alone: {alone}");
        // One slot stays with a's throttled request, sleeping before its
        // retry (as it must): 9 of 10 for b. Before slots were lent, 15.
        assert!(
            beside_a * 2 >= alone,
            "b beside a paused a: {beside_a} of {alone} alone"
        );
        // a went on once its pause ended.
        assert!(server.ok("a", secs(10), secs(11)) > 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_quota_starved_connection_beside_a_full_one() {
    watchdog(secs(600), async {
        // 2 a second per connection, a burst of 10. `a` keeps 20 in hand
        // from the start and spends its burst at once; `b` arrives 1 s
        // later with 10 in hand, bucket full. Over the next 5 s `b` should
        // do what it does alone, its burst and 2 a second, however many of
        // a's requests wait for tokens.
        let run = |with_a: bool| async move {
            let server = Server::new(LATENCY);
            let client = Tollgate::builder()
                .parallelism(10)
                .per_connection(Quota::per_second(2).burst(10))
                .build(server.clone())
                .unwrap();
            let start = Instant::now();
            let mut feeders = vec![tokio::spawn(feed(
                client.clone(),
                "b",
                10,
                start + secs(1),
                start + secs(6),
            ))];
            if with_a {
                let a = feed(client.clone(), "a", 20, start, start + secs(6));
                feeders.push(tokio::spawn(a));
            }
            for feeder in feeders {
                feeder.await.unwrap();
            }
            assert!(server.most() <= 10);
            (
                server.ok("b", secs(1), secs(6)),
                server.ok("a", secs(1), secs(6)),
            )
        };
        let (alone, _) = run(false).await;
        let (beside_a, a) = run(true).await;
        assert!(alone >= 19, "b alone: {alone}");
        assert!(a >= 9, "a spent its own quota meanwhile: {a}");
        // Before slots were lent, a's requests waiting for tokens held
        // every slot, and b's waited in the queue behind a's: 9 of 19.
        assert!(
            beside_a * 10 >= alone * 9,
            "b beside a starved a: {beside_a} of {alone} alone"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_request_sleeping_before_its_retry_keeps_its_slot() {
    watchdog(secs(600), async {
        // One slot. a's first request is answered 429, Retry-After 2: it
        // sleeps 2 s before its retry, holding the slot, so b's request
        // (another connection, nothing paused) waits in the queue.
        let server = Server::new(LATENCY).throttling_a(1, 2);
        let client = Tollgate::builder()
            .parallelism(1)
            .retry(Backoff::fixed(Duration::from_millis(100)))
            .build(server.clone())
            .unwrap();
        let a = tokio::spawn(client.clone().oneshot(get("a")));
        tokio::task::yield_now().await;
        let b = tokio::spawn(client.clone().oneshot(get("b")));
        assert_eq!(a.await.unwrap().unwrap().status(), 200);
        assert_eq!(b.await.unwrap().unwrap().status(), 200);
        let a_retry = server.arrivals("a")[0];
        let b_sent = server.arrivals("b")[0];
        // The retry went after 10 ms + 2 s; b only once it was answered.
        assert_eq!(a_retry, LATENCY + secs(2));
        assert_eq!(b_sent, a_retry + LATENCY);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn waiting_connections_take_the_slots_in_turn() {
    watchdog(secs(600), async {
        // Two slots, one second a request. a queues a burst of 12 first,
        // then b 4: b's take every other slot instead of waiting for all
        // of a's.
        let server = Server::new(secs(1));
        let client = Tollgate::builder()
            .parallelism(2)
            .queue_limit(20)
            .build(server.clone())
            .unwrap();
        let mut requests = Vec::new();
        for _ in 0..12 {
            requests.push(tokio::spawn(client.clone().oneshot(get("a"))));
        }
        tokio::task::yield_now().await;
        for _ in 0..4 {
            requests.push(tokio::spawn(client.clone().oneshot(get("b"))));
        }
        for request in requests {
            assert_eq!(request.await.unwrap().unwrap().status(), 200);
        }
        let b: Vec<_> = server.arrivals("b").iter().map(Duration::as_secs).collect();
        // Rounds at 1, 2, 3, 4 s each send one of a's and one of b's.
        assert_eq!(b, [1, 2, 3, 4]);
        let a_by_4s = server
            .arrivals("a")
            .iter()
            .filter(|at| at.as_secs() <= 4)
            .count();
        assert_eq!(a_by_4s, 2 + 4);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn lent_slots_count_against_the_queue_and_refusal_stays_at_once() {
    watchdog(secs(600), async {
        // 2 slots, 3 waiting places. a is paused for 10 s: its requests
        // lend their slots, each taking a waiting place; b's use the slots.
        let server = Server::new(LATENCY).throttling_a(1, 10);
        let client = Tollgate::builder()
            .parallelism(2)
            .queue_limit(3)
            .retry(Backoff::none())
            .build(server.clone())
            .unwrap();
        let gate = client.handle();
        let first = client.clone().oneshot(get("a")).await.unwrap();
        assert_eq!(first.status(), 429);
        let a: Vec<_> = (0..3)
            .map(|_| tokio::spawn(client.clone().oneshot(get("a"))))
            .collect();
        tokio::task::yield_now().await;
        assert_eq!((gate.in_flight(), gate.lent(), gate.queued()), (0, 3, 0));
        // Both slots are free for b; a fourth waiter of a has no place.
        let b: Vec<_> = (0..2)
            .map(|_| tokio::spawn(client.clone().oneshot(get("b"))))
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(gate.in_flight(), 2);
        let refused = client.clone().oneshot(get("a")).await.unwrap_err();
        assert_eq!(refused.downcast_ref::<Error>(), Some(&Error::QueueFull));
        for request in b {
            assert_eq!(request.await.unwrap().unwrap().status(), 200);
        }
        assert_eq!(server.ok("b", Duration::ZERO, secs(1)), 2);
        for request in a {
            assert_eq!(request.await.unwrap().unwrap().status(), 200);
        }
        assert!(server.most() <= 2);
        assert_eq!((gate.in_flight(), gate.lent(), gate.queued()), (0, 0, 0));
    })
    .await;
}

/// Answers at once after yielding a few times (real time: no sleeping).
#[derive(Clone, Default)]
struct Yielding {
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

impl Service<Request<()>> for Yielding {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<()>) -> Self::Future {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        // Counted out when answered or dropped.
        let running = Running(Arc::clone(&self.running));
        let yields = request.uri().path().len() % 4;
        Box::pin(async move {
            for _ in 0..yields {
                tokio::task::yield_now().await;
            }
            drop(running);
            Ok(Response::new(()))
        })
    }
}

struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn random_drops_while_slots_are_lent_leak_nothing() {
    watchdog(secs(600), async {
        // A tight quota on 8 connections, so that requests wait for tokens
        // and lend their slots; dropped at random points: queued, lent,
        // taking a slot back, sent. (The gate's own races on a 2-thread
        // runtime are tests/concurrency.rs's; lending's, the loom models'.)
        const P: usize = 4;
        let server = Yielding::default();
        let client = Tollgate::builder()
            .parallelism(P)
            .queue_limit(64)
            .per_connection(Quota::per_second(5_000).burst(2))
            .build(server.clone())
            .unwrap();
        let gate = client.handle();
        let limiter = client.get_ref().get_ref().handle();
        let mut x = 0x2545_F491_u32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let mut tasks = Vec::new();
        let mut most_lent = 0;
        for id in 0..10_000u32 {
            let polls = next() % 8;
            let host = format!("http://c{}/{}", next() % 8, "x".repeat(id as usize % 4));
            let request = Request::get(host).body(()).unwrap();
            let future = client.clone().oneshot(request);
            tasks.push(tokio::spawn(DropAfter {
                inner: Some(Box::pin(future)),
                polls: if polls >= 6 { u32::MAX } else { polls },
            }));
            if next() % 5 == 0 {
                let victim = next() as usize % tasks.len();
                tasks[victim].abort();
            }
            if id % 16 == 0 {
                most_lent = most_lent.max(gate.lent());
                sleep(Duration::from_millis(1)).await;
            }
        }
        let (mut done, mut dropped, mut refused) = (0, 0, 0);
        for task in tasks {
            match task.await {
                Ok(Some(Ok(_))) => done += 1,
                Ok(Some(Err(error))) => {
                    assert_eq!(error.downcast_ref::<Error>(), Some(&Error::QueueFull));
                    refused += 1;
                }
                Ok(None) | Err(_) => dropped += 1,
            }
        }
        assert_eq!(done + dropped + refused, 10_000);
        assert!(done > 0 && dropped > 0, "done {done}, dropped {dropped}");
        assert!(most_lent > 0, "slots were lent");
        assert_eq!((gate.in_flight(), gate.queued(), gate.lent()), (0, 0, 0));
        assert_eq!(limiter.waiting(), 0);
        assert!(server.most.load(Ordering::SeqCst) <= P);
        assert_eq!(server.running.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_slot_lent_by_an_attempt_that_timed_out_is_taken_back_before_the_retry() {
    watchdog(secs(600), async {
        use tollgate::rate_limit::ByConnection;
        use tollgate::{ConcurrencyGateLayer, RateLimitLayer, RetryLayer};
        use tower::{Layer, ServiceBuilder};

        /// Gives each attempt 1 s.
        #[derive(Clone)]
        struct AttemptTimeout<S>(S);

        impl<S> Service<Request<()>> for AttemptTimeout<S>
        where
            S: Service<Request<()>, Response = Response<()>, Error = BoxError> + Clone,
            S::Future: Send + 'static,
        {
            type Response = Response<()>;
            type Error = BoxError;
            type Future = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;

            fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
                self.0.poll_ready(cx)
            }

            fn call(&mut self, request: Request<()>) -> Self::Future {
                let attempt = tokio::time::timeout(secs(1), self.0.call(request));
                Box::pin(async move { attempt.await? })
            }
        }

        // Two slots; each attempt may take 1 s. a's first request is
        // answered 429, Retry-After 10: it sleeps before its retry in one
        // slot, and a is paused for 10 s, so a's next request lends the
        // other slot while it waits; b's request takes it (for 10 s, timed
        // out after 1). At 1 s a's attempt times out: its rate
        // limiter's future is dropped with the slot lent. The retry must
        // not sleep without a slot: the gate takes one back (it waits for
        // b's) before the request goes on.
        let server = Server {
            latency_b: Some(secs(10)),
            ..Server::new(LATENCY).throttling_a(1, 10)
        };
        let rate_limit = RateLimitLayer::per_connection(Quota::unlimited()).layer(server);
        let attempt_timeout = AttemptTimeout(rate_limit);
        let client = ServiceBuilder::new()
            .layer(ConcurrencyGateLayer::new(2).share_by(ByConnection))
            .layer(RetryLayer::new(
                Backoff::fixed(Duration::from_millis(100)).max_retries(3),
            ))
            .service(attempt_timeout);
        let gate = client.handle();
        // a's first request: 429, Retry-After 10, retried after 10 s.
        let first = tokio::spawn(client.clone().oneshot(get("a")));
        sleep(LATENCY * 2).await;
        let second = tokio::spawn(client.clone().oneshot(get("a")));
        tokio::task::yield_now().await;
        let b = tokio::spawn(client.clone().oneshot(get("b")));
        sleep(Duration::from_millis(500)).await;
        // a's first sleeps in a slot, b's runs in the other, a's second
        // waits for a's pause with its slot lent.
        assert_eq!((gate.in_flight(), gate.queued(), gate.lent()), (2, 0, 1));
        sleep(Duration::from_millis(600)).await;
        // 1.1 s: a's attempt timed out with its slot lent; the gate is
        // taking a slot back for it before its retry: queued, not lent.
        assert_eq!((gate.in_flight(), gate.queued(), gate.lent()), (2, 1, 0));
        assert_eq!(first.await.unwrap().unwrap().status(), 200);
        // b's attempts all time out (10 s each, against 1 s), and so do
        // a's second's while a is paused: each ends as the timeout's error.
        assert!(b.await.unwrap().is_err());
        assert!(second.await.unwrap().is_err());
        assert_eq!((gate.in_flight(), gate.queued(), gate.lent()), (0, 0, 0));
    })
    .await;
}

/// Gives each attempt on connection `a` `limit`, looking at the clock
/// before the attempt (as a `select!` biased to its timer does): an attempt
/// due at the instant its time runs out is dropped unpolled.
#[derive(Clone)]
struct BiasedTimeout<S> {
    inner: S,
    limit: Duration,
}

impl<S> Service<Request<()>> for BiasedTimeout<S>
where
    S: Service<Request<()>, Response = Response<()>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<()>) -> Self::Future {
        let limit = match request.uri().host() {
            Some("a") => self.limit,
            _ => Duration::MAX / 4,
        };
        let attempt = self.inner.call(request);
        let deadline = sleep(limit);
        Box::pin(async move {
            tokio::select! {
                biased;
                () = deadline => Err("attempt timed out".into()),
                result = attempt => result,
            }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_at_once_after_a_lent_attempt_is_dropped_still_waits_for_a_slot() {
    watchdog(secs(600), async {
        use tollgate::rate_limit::ByConnection;
        use tollgate::{ConcurrencyGateLayer, RateLimitLayer, RetryLayer};
        use tower::{Layer, ServiceBuilder};

        // One slot, 1 request a second per connection. a's second request
        // waits for a's next token (at 1 s) with its slot lent, and b's
        // request takes the slot for 10 s. At 1 s the attempt's time runs
        // out just as its token comes: the attempt is dropped with the slot
        // lent, and the retry (no delay) is polled in the same poll, finds
        // the token there, and must still wait for a slot, not go beside
        // b's request.
        let server = Server {
            latency_b: Some(secs(10)),
            ..Server::new(LATENCY)
        };
        let rate_limit = RateLimitLayer::per_connection(Quota::per_second(1).burst(1));
        let client = ServiceBuilder::new()
            .layer(ConcurrencyGateLayer::new(1).share_by(ByConnection))
            .layer(RetryLayer::new(
                Backoff::fixed(Duration::ZERO).max_retries(1),
            ))
            .service(BiasedTimeout {
                inner: rate_limit.layer(server.clone()),
                limit: Duration::from_millis(980),
            });
        let gate = client.handle();
        assert_eq!(
            client.clone().oneshot(get("a")).await.unwrap().status(),
            200
        );
        sleep(LATENCY).await;
        // 20 ms: a's next token is at 1 s.
        let second = tokio::spawn(client.clone().oneshot(get("a")));
        sleep(LATENCY).await;
        assert_eq!((gate.in_flight(), gate.lent()), (0, 1));
        let b = tokio::spawn(client.clone().oneshot(get("b")));
        sleep(secs(2)).await;
        assert_eq!(gate.in_flight(), 1);
        assert_eq!(b.await.unwrap().unwrap().status(), 200);
        // The retry waited for the slot b's request held, and its time ran
        // out too: it never went beside b's.
        assert!(second.await.unwrap().is_err());
        assert!(server.most() <= 1, "{} at once", server.most());
        assert_eq!(server.arrivals("a").len(), 1);
        assert_eq!((gate.in_flight(), gate.queued(), gate.lent()), (0, 0, 0));
    })
    .await;
}
