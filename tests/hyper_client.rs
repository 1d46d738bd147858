//! The default stack around a real hyper-util client, against a real local
//! server on 127.0.0.1: headers on the wire drive retry and cool-down.
//! Sockets are real; time is paused (tokio advances it only when no socket
//! has anything to deliver), so the server's 200 ms costs no real time.

mod common;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate::{Backoff, ConnectionKey, Tollgate};
use tower::ServiceExt;

#[tokio::test(start_paused = true)]
async fn the_stack_around_hyper_util_retries_and_cools_down_from_real_headers() {
    let (addr, seen) = common::first_throttled_server().await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let stack = Tollgate::builder()
        .parallelism(4)
        .retry(Backoff::fixed(Duration::from_millis(10)).max_retries(2))
        .build(client)
        .unwrap();
    let request = |n: u32| {
        let mut request = Request::post(format!("http://{addr}/leads/{n}"))
            .body(Full::new(Bytes::from(format!("{{\"lead\":{n}}}"))))
            .unwrap();
        request.extensions_mut().insert(ConnectionKey::new("crm"));
        request
    };
    let started = tokio::time::Instant::now();
    let first = tokio::spawn(stack.clone().oneshot(request(1)));
    let first = first.await.unwrap().unwrap();
    // The POST was retried on 429 after max(10 ms, retry-after-ms 200 ms).
    assert_eq!(first.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(first.into_body().collect().await.unwrap().to_bytes(), "ok");
    let second = stack.clone().oneshot(request(2)).await.unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(
        seen.lock().unwrap().len(),
        3,
        "429, its retry, and the second"
    );
    let rate_limit = stack.get_ref().get_ref().handle();
    assert_eq!((rate_limit.cool_downs(), rate_limit.admitted()), (1, 3));
    let gate = stack.handle();
    assert_eq!((gate.in_flight(), gate.queued()), (0, 0));
}
