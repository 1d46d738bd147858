//! A local throttling server for the examples: 127.0.0.1 only, HTTP/1.1 or
//! HTTP/2 (so thousands of concurrent requests can share a few sockets), a
//! quota per connection, and `429 Too Many Requests` with `Retry-After`
//! beyond it.
//!
//! A "connection" is named by the request's `x-connection` header, as Power
//! Platform meters each connection of a connector separately. Each one may
//! make `per_second` requests in each fixed one-second window (counted from
//! the server's start); past that the server answers 429 with `Retry-After`
//! set to the seconds left in the window, rounded up.

// Each example uses the part it needs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// What the server saw.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Requests answered 200.
    pub accepted: AtomicU64,
    /// Requests answered 429.
    pub throttled: AtomicU64,
}

struct Windows {
    started: Instant,
    per_second: u32,
    // connection name -> (window number, requests in it)
    counts: Mutex<HashMap<String, (u64, u32)>>,
}

impl Windows {
    /// `None` to accept, or the `Retry-After` seconds to answer with.
    fn admit(&self, connection: &str) -> Option<u64> {
        let elapsed = self.started.elapsed();
        let window = elapsed.as_secs();
        let mut counts = self.counts.lock().unwrap();
        let entry = counts.entry(connection.to_owned()).or_insert((window, 0));
        if entry.0 != window {
            *entry = (window, 0);
        }
        entry.1 += 1;
        if entry.1 <= self.per_second {
            return None;
        }
        let left = Duration::from_secs(window + 1) - elapsed;
        Some(left.as_secs() + u64::from(left.subsec_nanos() > 0))
    }
}

/// The two connections the examples import over.
pub const CONNECTIONS: [&str; 2] = ["crm-1", "crm-2"];

/// Lead `n`, on connection `crm-1` or `crm-2`: the header tells the
/// server, the extension tells tollgate.
pub fn lead(addr: SocketAddr, n: u64) -> Request<Full<Bytes>> {
    let connection = CONNECTIONS[(n % 2) as usize];
    let mut request = Request::post(format!("http://{addr}/leads"))
        .header("x-connection", connection)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!("{{\"lead\":{n}}}"))))
        .expect("a valid request");
    request
        .extensions_mut()
        .insert(tollgate::ConnectionKey::new(connection));
    request
}

/// Starts the server on 127.0.0.1 (a free port); it runs until the process
/// ends. It answers HTTP/1.1 and HTTP/2 (prior knowledge).
pub async fn throttled_server(per_second: u32) -> std::io::Result<(SocketAddr, Arc<ServerStats>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stats = Arc::new(ServerStats::default());
    let windows = Arc::new(Windows {
        started: Instant::now(),
        per_second,
        counts: Mutex::default(),
    });
    let served = Arc::clone(&stats);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (windows, stats) = (Arc::clone(&windows), Arc::clone(&served));
            let answer = hyper::service::service_fn(move |request: Request<Incoming>| {
                let (windows, stats) = (Arc::clone(&windows), Arc::clone(&stats));
                async move {
                    let connection = request
                        .headers()
                        .get("x-connection")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("default")
                        .to_owned();
                    // Some work per request, as a real server would do.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let response = match windows.admit(&connection) {
                        None => {
                            stats.accepted.fetch_add(1, Ordering::Relaxed);
                            Response::new(Full::new(Bytes::from_static(b"ok")))
                        }
                        Some(retry_after) => {
                            stats.throttled.fetch_add(1, Ordering::Relaxed);
                            let mut response = Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                            response
                                .headers_mut()
                                .insert("retry-after", retry_after.into());
                            response
                        }
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            tokio::spawn(async move {
                let mut server = auto::Builder::new(TokioExecutor::new());
                server.http2().max_concurrent_streams(None);
                let _ = server.serve_connection(TokioIo::new(stream), answer).await;
            });
        }
    });
    Ok((addr, stats))
}

/// Sends `leads` POSTs at once through `client`, alternating between the
/// connections `crm-1` and `crm-2` (the `x-connection` header tells the
/// server, a [`tollgate::ConnectionKey`] tells tollgate), and prints how
/// each ended. An error if any lead failed.
pub async fn import_leads<S, B, R>(
    client: S,
    addr: SocketAddr,
    leads: u64,
    stats: &ServerStats,
) -> Result<(), tower::BoxError>
where
    S: tower::Service<Request<B>, Response = Response<R>, Error = tower::BoxError>,
    S: Clone + Send + 'static,
    S::Future: Send,
    B: From<String> + Send + 'static,
    R: hyper::body::Body + Send + 'static,
    R::Data: Send,
    R::Error: Into<tower::BoxError>,
{
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let started = Instant::now();
    let mut sent = tokio::task::JoinSet::new();
    for n in 0..leads {
        let connection = ["crm-1", "crm-2"][(n % 2) as usize];
        let mut request = Request::post(format!("http://{addr}/leads"))
            .header("x-connection", connection)
            .body(B::from(format!("{{\"lead\":{n}}}")))?;
        request
            .extensions_mut()
            .insert(tollgate::ConnectionKey::new(connection));
        let client = client.clone();
        sent.spawn(async move {
            let response = client.oneshot(request).await?;
            let status = response.status();
            response.into_body().collect().await.map_err(Into::into)?;
            Ok::<_, tower::BoxError>(status)
        });
    }
    let (mut succeeded, mut failed) = (0, 0);
    while let Some(ended) = sent.join_next().await {
        match ended? {
            Ok(status) if status.is_success() => succeeded += 1,
            Ok(status) => {
                failed += 1;
                println!("  a lead ended {status}");
            }
            Err(error) => {
                failed += 1;
                println!("  a lead failed: {error}");
            }
        }
    }
    println!(
        "{leads} leads in {:.1?}: {succeeded} succeeded, {failed} failed; the server answered {} with 200 and {} with 429",
        started.elapsed(),
        stats.accepted.load(Ordering::Relaxed),
        stats.throttled.load(Ordering::Relaxed),
    );
    if failed > 0 {
        return Err(format!("{failed} leads failed").into());
    }
    Ok(())
}
