//! A local throttling server for the examples: 127.0.0.1 only, HTTP/2 (so
//! thousands of concurrent requests share a few sockets), a quota per
//! connection, and `429 Too Many Requests` with `Retry-After` beyond it.
//!
//! A "connection" is named by the request's `x-connection` header, as Power
//! Platform meters each connection of a connector separately. Each one may
//! make `per_second` requests in each fixed one-second window (counted from
//! the server's start); past that the server answers 429 with `Retry-After`
//! set to the seconds left in the window, rounded up.

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

/// Starts the server on 127.0.0.1 (a free port); it runs until the process
/// ends. Clients must speak HTTP/2 (hyper-util: `.http2_only(true)`).
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
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(None)
                    .serve_connection(TokioIo::new(stream), answer)
                    .await;
            });
        }
    });
    Ok((addr, stats))
}
