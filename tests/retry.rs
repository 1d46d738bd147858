//! The retry layer end to end against a scripted server, in virtual time.

mod common;

use common::secs;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::{Method, Request, StatusCode};
use tokio::time::Instant;
use tollgate::retry::{Outcome, ReplayBody};
use tollgate::testing::{Reply, Script, ScriptError, ScriptService};
use tollgate::{Backoff, Jitter, Retry, RetryLayer};
use tower::{BoxError, Layer, Service, ServiceExt};

fn get() -> Request<()> {
    Request::new(())
}

fn with_method(method: Method) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = method;
    request
}

async fn send<B>(layer: RetryLayer, script: &Script, request: Request<B>) -> http::Response<String>
where
    B: ReplayBody,
{
    layer
        .layer(script.service())
        .oneshot(request)
        .await
        .expect("the scripted server answers")
}

#[tokio::test(start_paused = true)]
async fn server_retry_after_wins_when_longer() {
    let server = Script::new()
        .reply(Reply::status(429).retry_after(secs(7)))
        .reply(200);
    let response = send(RetryLayer::new(Backoff::fixed(secs(2))), &server, get()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.waits(), [secs(7)]);
}

#[tokio::test(start_paused = true)]
async fn policy_wins_when_longer() {
    let server = Script::new()
        .reply(Reply::status(503).retry_after(secs(1)))
        .reply(Reply::status(503).retry_after(secs(1)))
        .reply(200);
    let backoff = Backoff::exponential(secs(4));
    let response = send(RetryLayer::new(backoff), &server, get()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.waits(), [secs(4), secs(8)]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_alone_waits_the_server_not_the_policy() {
    // The first two retries of a throttled request wait the server's wait
    // alone; a request throttled a third time waits the larger.
    let server = Script::new()
        .reply(Reply::status(429).retry_after(secs(1)))
        .reply(Reply::status(503).retry_after(secs(2)))
        .reply(Reply::status(429).retry_after(secs(3)))
        .reply(200);
    let layer = RetryLayer::new(Backoff::fixed(secs(5))).retry_after_alone(true);
    let response = send(layer, &server, get()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.waits(), [secs(1), secs(2), secs(5)]);
    // A 503 without Retry-After, or a zero one (which spaces nothing),
    // waits the policy's delay.
    for first in [
        Reply::status(503),
        Reply::status(429).retry_after(Duration::ZERO),
    ] {
        let server = Script::new().reply(first).reply(200);
        let layer = RetryLayer::new(Backoff::fixed(secs(5))).retry_after_alone(true);
        send(layer, &server, get()).await;
        assert_eq!(server.waits(), [secs(5)]);
    }
    // The cap still holds: a longer wait returns the response.
    let server = Script::new()
        .reply(Reply::status(429).retry_after(secs(600)))
        .reply(200);
    let layer = RetryLayer::new(Backoff::fixed(secs(5))).retry_after_alone(true);
    let response = send(layer, &server, get()).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test(start_paused = true)]
async fn policy_alone_without_retry_after() {
    let server = Script::new().reply(500).reply(502).reply(504).reply(200);
    let backoff = Backoff::exponential(secs(1));
    let response = send(RetryLayer::new(backoff), &server, get()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.waits(), [secs(1), secs(2), secs(4)]);
}

#[tokio::test(start_paused = true)]
async fn http_date_retry_after() {
    // HTTP-dates are wall-clock; the sleep they cause is virtual.
    let date = httpdate::fmt_http_date(SystemTime::now() + secs(20));
    let server = Script::new()
        .reply(Reply::status(429).header(http::header::RETRY_AFTER, &date))
        .reply(200);
    let response = send(RetryLayer::new(Backoff::fixed(secs(1))), &server, get()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let wait = server.waits()[0];
    // One-second resolution of HTTP-dates: 19 s and a fraction to 20 s.
    assert!(secs(19) <= wait && wait <= secs(20), "{wait:?}");
}

#[tokio::test(start_paused = true)]
async fn millisecond_headers() {
    let ms = Duration::from_millis;
    let server = Script::new()
        .reply(Reply::status(429).header("retry-after-ms".parse().unwrap(), "2500"))
        .reply(
            Reply::status(429)
                .retry_after(secs(9))
                .header("x-ms-retry-after-ms".parse().unwrap(), "1250"),
        )
        .reply(200);
    let backoff = Backoff::fixed(ms(100));
    let response = send(RetryLayer::new(backoff), &server, get()).await;
    assert_eq!(response.status(), StatusCode::OK);
    // The precise millisecond value wins over the 9 s Retry-After.
    assert_eq!(server.waits(), [ms(2500), ms(1250)]);
}

#[tokio::test(start_paused = true)]
async fn malformed_retry_after_falls_back_to_policy() {
    let server = Script::new()
        .reply(Reply::status(429).header(http::header::RETRY_AFTER, "-30"))
        .reply(Reply::status(429).header(http::header::RETRY_AFTER, "soon"))
        .reply(200);
    let response = send(RetryLayer::new(Backoff::fixed(secs(3))), &server, get()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.waits(), [secs(3), secs(3)]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_above_the_cap_returns_the_response_at_once() {
    let server = Script::new()
        .reply(Reply::status(429).retry_after(secs(3_600)))
        .reply(200);
    let started = Instant::now();
    let response = send(RetryLayer::new(Backoff::fixed(secs(1))), &server, get()).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(server.count(), 1);

    // A lower cap applies the same way; exactly the cap is still honoured.
    let server = Script::new()
        .reply(Reply::status(429).retry_after(secs(10)))
        .reply(Reply::status(429).retry_after(secs(11)))
        .reply(200);
    let layer = RetryLayer::new(Backoff::fixed(secs(1))).max_retry_after(secs(10));
    let response = send(layer, &server, get()).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(server.waits(), [secs(10)]);
}

#[tokio::test(start_paused = true)]
async fn deadline_stops_before_sleeping_past_it() {
    let server = Script::new().reply(503);
    let layer = RetryLayer::new(Backoff::fixed(secs(10)).max_retries(10)).deadline(secs(25));
    let started = Instant::now();
    let response = send(layer, &server, get()).await;
    // Attempts at 0, 10 and 20 s; one at 30 s would be past the deadline.
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(server.waits(), [secs(10), secs(10)]);
    assert_eq!(started.elapsed(), secs(20));

    // A Retry-After that would cross the deadline stops it too.
    let server = Script::new()
        .reply(Reply::status(429).retry_after(secs(30)))
        .reply(200);
    let layer = RetryLayer::new(Backoff::fixed(secs(1))).deadline(secs(25));
    let response = send(layer, &server, get()).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(server.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn post_retries_on_429_but_not_on_503() {
    let server = Script::new().reply(503).reply(200);
    let response = send(
        RetryLayer::new(Backoff::fixed(secs(1))),
        &server,
        with_method(Method::POST),
    )
    .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(server.count(), 1);

    let server = Script::new().reply(429).reply(200);
    let response = send(
        RetryLayer::new(Backoff::fixed(secs(1))),
        &server,
        with_method(Method::POST),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.count(), 2);

    let server = Script::new().reply(503).reply(200);
    let layer = RetryLayer::new(Backoff::fixed(secs(1))).retry_non_idempotent(true);
    let response = send(layer, &server, with_method(Method::POST)).await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn last_response_is_returned_when_retries_run_out() {
    let server = Script::new()
        .reply(Reply::status(503).body("one"))
        .reply(Reply::status(503).body("two"))
        .reply(Reply::status(503).body("three"))
        .reply(Reply::status(429).body("last"));
    let response = send(RetryLayer::new(Backoff::fixed(secs(1))), &server, get()).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.body(), "last");
    assert_eq!(server.count(), 4, "one try and three retries");
}

#[tokio::test(start_paused = true)]
async fn inner_errors_retry_for_idempotent_methods_and_pass_through_at_the_end() {
    let server = Script::new().reply(Reply::error("reset")).reply(200);
    let response = send(RetryLayer::new(Backoff::fixed(secs(2))), &server, get()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.waits(), [secs(2)]);

    let server = Script::new().reply(Reply::error("refused"));
    let error = RetryLayer::new(Backoff::fixed(secs(2)).max_retries(2))
        .layer(server.service())
        .oneshot(get())
        .await
        .unwrap_err();
    assert_eq!(
        error.downcast_ref::<ScriptError>(),
        Some(&ScriptError("refused".into()))
    );
    assert_eq!(server.count(), 3);

    let server = Script::new().reply(Reply::error("refused")).reply(200);
    let error = RetryLayer::new(Backoff::fixed(secs(2)))
        .layer(server.service())
        .oneshot(with_method(Method::POST))
        .await
        .unwrap_err();
    assert!(error.is::<ScriptError>());
    assert_eq!(server.count(), 1);
}

/// A body that, like a stream, cannot be copied.
struct Streaming;

impl ReplayBody for Streaming {
    fn try_replay(&self) -> Option<Self> {
        None
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_that_cannot_be_replayed_is_sent_once() {
    let server = Script::new().reply(429).reply(200);
    let response = send(
        RetryLayer::new(Backoff::fixed(secs(1))),
        &server,
        Request::new(Streaming),
    )
    .await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(server.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn retries_resend_the_whole_request() {
    let server = Script::new().reply(429).reply(200);
    let request = Request::builder()
        .method(Method::PUT)
        .uri("http://127.0.0.1/leads/7")
        .header("x-lead", "7")
        .body(String::from("{}"))
        .unwrap();
    send(RetryLayer::new(Backoff::fixed(secs(1))), &server, request).await;
    let attempts = server.attempts();
    assert_eq!(attempts.len(), 2);
    for attempt in attempts {
        assert_eq!(attempt.method, Method::PUT);
        assert_eq!(attempt.uri, "http://127.0.0.1/leads/7");
        assert_eq!(attempt.headers["x-lead"], "7");
    }
}

#[tokio::test(start_paused = true)]
async fn cancellation_mid_sleep_sends_nothing_more() {
    let server = Script::new().reply(429).reply(200);
    let client = RetryLayer::new(Backoff::fixed(secs(10))).layer(server.service());
    let outcome = tokio::time::timeout(secs(5), client.oneshot(get())).await;
    assert!(
        outcome.is_err(),
        "timed out while sleeping before the retry"
    );
    tokio::time::sleep(secs(60)).await;
    assert_eq!(server.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn backoff_none_sends_once() {
    let server = Script::new().reply(429).reply(200);
    let response = send(RetryLayer::new(Backoff::none()), &server, get()).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(server.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn custom_classifier_replaces_the_default() {
    // Retry 409 only; a 429 is returned as it is.
    let layer = RetryLayer::new(Backoff::fixed(secs(1))).classify(|_: &Method, o: &Outcome<'_>| {
        matches!(o, Outcome::Response { status, .. } if *status == StatusCode::CONFLICT)
    });
    let server = Script::new().reply(409).reply(429).reply(200);
    let response = layer.layer(server.service()).oneshot(get()).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(server.count(), 2);
}

/// Sends `n` GETs through `client`, each after the one before has ended.
async fn send_one_by_one(client: &mut Retry<ScriptService>, n: usize) {
    for _ in 0..n {
        ServiceExt::<Request<()>>::ready(&mut *client)
            .await
            .unwrap()
            .call(get())
            .await
            .unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn jitter_is_independent_per_request_and_reproducible() {
    let backoff = Backoff::exponential(secs(10))
        .jitter(Jitter::Full)
        .max_retries(2)
        .seed(42);
    let server = Script::new().reply(503);
    let mut client = RetryLayer::new(backoff.clone()).layer(server.service());
    send_one_by_one(&mut client, 2).await;
    let waits = server.waits();
    // Attempts: request 1 at [0, a, a+b], request 2 at [.., c, c+d].
    let (first, second) = (&waits[0..2], &waits[3..5]);
    assert_eq!(
        waits[2],
        Duration::ZERO,
        "request 2 starts as request 1 ends"
    );
    assert_eq!(first, backoff.delays().collect::<Vec<_>>().as_slice());
    assert_ne!(first, second, "each request draws its own jitter");

    // The same seed through a fresh service reproduces both.
    let again = Script::new().reply(503);
    let mut client = RetryLayer::new(backoff).layer(again.service());
    send_one_by_one(&mut client, 2).await;
    assert_eq!(again.waits(), waits);
}

#[tokio::test(start_paused = true)]
async fn unseeded_requests_that_retry_draw_streams_of_their_own() {
    // Without a seed the stream number is taken at the first retry: a
    // request that succeeds between two that retry takes none, and the two
    // still differ.
    let backoff = Backoff::exponential(secs(10))
        .jitter(Jitter::Full)
        .max_retries(1);
    let server = Script::new()
        .reply(503)
        .reply(200)
        .reply(200)
        .reply(503)
        .reply(200);
    let mut client = RetryLayer::new(backoff).layer(server.service());
    send_one_by_one(&mut client, 3).await;
    let waits = server.waits();
    assert_eq!(waits.len(), 4, "{waits:?}");
    assert_ne!(
        waits[0], waits[3],
        "each retrying request draws its own jitter"
    );
}

/// Counts `poll_ready` calls on the way to the scripted server.
#[derive(Clone)]
struct CountReady<S> {
    inner: S,
    polls: Arc<AtomicUsize>,
}

impl<S: Service<Request<()>>> Service<Request<()>> for CountReady<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<()>) -> S::Future {
        self.inner.call(request)
    }
}

#[tokio::test(start_paused = true)]
async fn inner_service_is_polled_ready_before_every_attempt() {
    let server = Script::new().reply(429).reply(429).reply(200);
    let polls = Arc::new(AtomicUsize::new(0));
    let inner = CountReady {
        inner: server.service(),
        polls: Arc::clone(&polls),
    };
    let client = RetryLayer::new(Backoff::fixed(secs(1))).layer(inner);
    let clone = client.clone();
    clone.oneshot(get()).await.unwrap();
    assert_eq!(server.count(), 3);
    assert_eq!(polls.load(Ordering::SeqCst), 3);
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_all_end() {
    // Real time, but no sleeps: a zero backoff and no Retry-After.
    let server = Script::new().reply(429).reply(503).reply(200);
    let client =
        RetryLayer::new(Backoff::fixed(Duration::ZERO).max_retries(2)).layer(server.service());
    let tasks: Vec<_> = (0..1_000)
        .map(|_| tokio::spawn(client.clone().oneshot(get())))
        .collect();
    let mut ok = 0;
    for task in tasks {
        let response: Result<_, BoxError> = task.await.unwrap();
        ok += usize::from(response.unwrap().status() == StatusCode::OK);
    }
    // Two attempts met a 429 and a 503; their requests retried into a 200.
    assert_eq!(ok, 1_000);
    assert_eq!(server.count(), 1_002);
}
