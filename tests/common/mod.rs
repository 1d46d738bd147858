//! Helpers shared by the integration tests.

// Each test binary uses its own subset.
#![allow(dead_code)]

pub mod knee;
pub mod redis_server;
pub mod servers;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

pub const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Fails the test instead of hanging it when a waiter is never woken or a
/// slot leaks: under paused time the limit passes at once when everything
/// else is stuck; on a real-time runtime it is a plain timeout.
pub async fn watchdog(limit: Duration, test: impl Future<Output = ()>) {
    tokio::time::timeout(limit, test)
        .await
        .expect("the test hung: a waiter was never woken, or a slot leaked");
}

/// A real HTTP/1.1 server on 127.0.0.1 that answers the first request `429`
/// with `retry-after-ms: 200` and every other `200 ok`. Returns its address
/// and the bodies of the requests it received, in order.
pub async fn first_throttled_server() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<bytes::Bytes>>>,
) {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let bodies = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let bodies = Arc::clone(&bodies);
            let answer = hyper::service::service_fn(move |request: Request<Incoming>| {
                let bodies = Arc::clone(&bodies);
                async move {
                    let body = request.into_body().collect().await?.to_bytes();
                    let first = {
                        let mut bodies = bodies.lock().unwrap();
                        bodies.push(body);
                        bodies.len() == 1
                    };
                    let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                    if first {
                        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                        response
                            .headers_mut()
                            .insert("retry-after-ms", http::HeaderValue::from_static("200"));
                    }
                    Ok::<_, hyper::Error>(response)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), answer)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// Polls the inner future at most `polls` times, then drops it.
pub struct DropAfter<F> {
    pub inner: Option<Pin<Box<F>>>,
    pub polls: u32,
}

impl<F: Future> Future for DropAfter<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.polls == 0 {
            self.inner = None;
            return Poll::Ready(None);
        }
        self.polls -= 1;
        match self.inner.as_mut().map(|f| f.as_mut().poll(cx)) {
            Some(Poll::Ready(out)) => Poll::Ready(Some(out)),
            Some(Poll::Pending) => Poll::Pending,
            None => Poll::Ready(None),
        }
    }
}
