//! The default stack around a real `reqwest::Client` (feature `reqwest`),
//! against a real server on 127.0.0.1, in paused time: buffered bodies are
//! resent on a retry, streams are sent once, and a request reqwest cannot
//! build fails at once.
#![cfg(feature = "reqwest")]

mod common;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use tokio::time::Instant;
use tollgate::{Backoff, Tollgate, TollgateService};
use tower::ServiceExt;

fn stack() -> TollgateService<tollgate::reqwest::Client> {
    Tollgate::builder()
        .parallelism(4)
        .retry(Backoff::fixed(Duration::from_millis(10)).max_retries(2))
        .build(tollgate::reqwest::Client::from(reqwest::Client::new()))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_buffered_body_is_resent_after_max_of_policy_and_retry_after() {
    let (addr, seen) = common::first_throttled_server().await;
    let client = stack();
    for body in ["{\"lead\":1}", "{\"lead\":2}"] {
        let request = Request::post(format!("http://{addr}/leads"))
            .body(Bytes::from(body))
            .unwrap();
        let started = Instant::now();
        let response = client.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        if body.contains('1') {
            // Retried on 429 after max(10 ms, retry-after-ms 200 ms).
            assert!(started.elapsed() >= Duration::from_millis(200));
        }
        let text = reqwest::Response::from(response).text().await.unwrap();
        assert_eq!(text, "ok");
    }
    assert_eq!(
        *seen.lock().unwrap(),
        ["{\"lead\":1}", "{\"lead\":1}", "{\"lead\":2}"],
        "the 429'd body went again, byte for byte"
    );
    let rate_limit = client.get_ref().get_ref().handle();
    assert_eq!((rate_limit.cool_downs(), rate_limit.admitted()), (1, 3));
}

#[tokio::test(start_paused = true)]
async fn a_string_body_is_resent_too() {
    let (addr, seen) = common::first_throttled_server().await;
    let request = Request::put(format!("http://{addr}/leads/7"))
        .body(String::from("seven"))
        .unwrap();
    let response = stack().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(*seen.lock().unwrap(), ["seven", "seven"]);
}

#[tokio::test(start_paused = true)]
async fn a_streaming_body_is_sent_once_and_its_429_returned() {
    let (addr, seen) = common::first_throttled_server().await;
    let stream = reqwest::Body::wrap(http_body_util::Full::new(Bytes::from("streamed")));
    let body = tollgate::reqwest::Body::from(stream);
    assert!(!body.is_buffered());
    let request = Request::post(format!("http://{addr}/upload"))
        .body(body)
        .unwrap();
    let response = stack().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(*seen.lock().unwrap(), ["streamed"]);
}

#[tokio::test(start_paused = true)]
async fn a_request_reqwest_cannot_build_fails_at_once_without_retries() {
    let started = Instant::now();
    // A GET would be retried on a transport error; a relative URI is not one.
    let request = Request::get("/leads").body(Bytes::new()).unwrap();
    let error = stack().oneshot(request).await.unwrap_err();
    let error = error
        .downcast_ref::<reqwest::Error>()
        .expect("reqwest's own error, unwrapped");
    assert!(error.is_builder());
    assert_eq!(started.elapsed(), Duration::ZERO, "no retry waits");
}
