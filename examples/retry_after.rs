//! Retry against a local throttling server, printing each attempt and the
//! wait before it, so you can see `max(policy delay, Retry-After)` at work.
//!
//! ```text
//! cargo run --example retry_after
//! ```
//!
//! The server listens on 127.0.0.1 (a free port) and answers, in turn:
//! `429` with `Retry-After: 1`, `429` with `retry-after-ms: 300`, `503` with
//! an HTTP-date 4 s ahead, then `200`. The client is hyper-util's, wrapped in
//! `RetryLayer::new(Backoff::exponential(600 ms))`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tollgate::{retry_after, Backoff, RetryLayer};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

/// The throttling server: answers the n-th request from a fixed script.
async fn throttling_server() -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let served = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let served = Arc::clone(&served);
            let answer = hyper::service::service_fn(move |_request: Request<Incoming>| {
                let n = served.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<_, Infallible>(scripted_reply(n)) }
            });
            tokio::spawn(async move {
                let io = TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, answer)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn scripted_reply(n: usize) -> Response<Full<Bytes>> {
    let builder = Response::builder();
    let builder = match n {
        0 => builder.status(429).header("retry-after", "1"),
        1 => builder.status(429).header("retry-after-ms", "300"),
        2 => {
            let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(4));
            builder.status(503).header("retry-after", date)
        }
        _ => builder.status(200),
    };
    builder
        .body(Full::new(Bytes::from_static(b"lead accepted")))
        .expect("a valid static response")
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let addr = throttling_server().await?;
    let backoff = Backoff::exponential(Duration::from_millis(600)).max_retries(4);
    let policy: Vec<Duration> = backoff.delays().collect();
    println!("throttling server on http://{addr}");
    println!("policy: {backoff:?}");
    println!("policy delays: {policy:?}\n");

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();

    // Log every attempt the retry layer makes, with the wait before it.
    let started = Instant::now();
    // When the last attempt ended, and the wait its response asked for.
    type LastAttempt = Option<(Instant, Option<Duration>)>;
    let last: Arc<Mutex<LastAttempt>> = Arc::default();
    let attempts = Arc::new(AtomicUsize::new(0));
    let logged = tower::service_fn(move |request: Request<Empty<Bytes>>| {
        let mut client = client.clone();
        let (last, attempts) = (Arc::clone(&last), Arc::clone(&attempts));
        let policy = policy.clone();
        async move {
            let n = attempts.fetch_add(1, Ordering::SeqCst);
            let now = Instant::now();
            let previous = last.lock().unwrap().take();
            if let Some((at, asked)) = previous {
                let chosen = policy[n - 1].max(asked.unwrap_or_default());
                let asked = asked.map_or("nothing".to_string(), |d| format!("{d:.3?}"));
                println!(
                    "  waited {:.3?}: max(policy {:?}, server asked {asked}) = {chosen:.3?}",
                    now - at,
                    policy[n - 1],
                );
            }
            let response: Response<Incoming> = client.call(request).await?;
            let asked = retry_after::parse(response.headers(), SystemTime::now());
            let header = ["retry-after-ms", "retry-after"]
                .into_iter()
                .find_map(|name| Some(format!("{name}: {:?}", response.headers().get(name)?)))
                .unwrap_or_default();
            println!(
                "attempt {} sent at {:.3?}: {} {header}",
                n + 1,
                now - started,
                response.status(),
            );
            *last.lock().unwrap() = Some((Instant::now(), asked));
            Ok::<_, BoxError>(response)
        }
    });

    let retrying = ServiceBuilder::new()
        .layer(RetryLayer::new(backoff))
        .service(logged);
    let request = Request::get(format!("http://{addr}/leads/1")).body(Empty::new())?;
    let response = retrying.oneshot(request).await?;
    println!(
        "\nfinal: {} after {:.3?}",
        response.status(),
        started.elapsed()
    );
    if !response.status().is_success() {
        return Err("the example expected the server to accept the lead".into());
    }
    Ok(())
}
