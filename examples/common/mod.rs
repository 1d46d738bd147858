//! The examples' local servers, on 127.0.0.1 only, HTTP/1.1 or HTTP/2 (so
//! thousands of concurrent requests can share a few sockets), and the
//! import they share.
//!
//! - [`throttled_server`]: a quota per connection, and `429 Too Many
//!   Requests` with `Retry-After` beyond it. A "connection" is named by the
//!   request's `x-connection` header, as Power Platform meters each
//!   connection of a connector separately. Each one may make `per_second`
//!   requests in each fixed one-second window (counted from the server's
//!   start); past that the server answers 429 with `Retry-After` set to the
//!   seconds left in the window, rounded up.
//! - [`knee_server`]: no published limit and never a 429, but a knee of
//!   concurrency: slower past it, failing far past it.

// Each example uses the part it needs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tollgate::TollgateService;
use tower::BoxError;

/// What the throttled server saw.
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
/// server, the extension tells tollgate. The body is any type made from a
/// `String` (hyper's `Full<Bytes>`, `String` for reqwest).
pub fn lead_as<B: From<String>>(addr: SocketAddr, n: u64) -> Request<B> {
    let connection = CONNECTIONS[(n % 2) as usize];
    let mut request = Request::post(format!("http://{addr}/leads"))
        .header("x-connection", connection)
        .header("content-type", "application/json")
        .body(B::from(format!("{{\"lead\":{n}}}")))
        .expect("a valid request");
    request
        .extensions_mut()
        .insert(tollgate::ConnectionKey::new(connection));
    request
}

/// Lead `n` with a `Full<Bytes>` body, for hyper's client.
pub fn lead(addr: SocketAddr, n: u64) -> Request<Full<Bytes>> {
    lead_as(addr, n)
}

/// Serves `answer` on `listener`, HTTP/1.1 and HTTP/2 (prior knowledge)
/// with no cap on concurrent streams, until the process ends.
fn serve<A, F>(listener: TcpListener, answer: A)
where
    A: Fn(Request<Incoming>) -> F + Clone + Send + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            let service = hyper::service::service_fn(move |request| {
                let response = answer(request);
                async move { Ok::<_, Infallible>(response.await) }
            });
            tokio::spawn(async move {
                let mut server = auto::Builder::new(TokioExecutor::new());
                server.http2().max_concurrent_streams(None);
                let _ = server.serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
}

/// Starts the throttled server on 127.0.0.1 (a free port); it runs until
/// the process ends.
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
    serve(listener, move |request: Request<Incoming>| {
        let (windows, stats) = (Arc::clone(&windows), Arc::clone(&served));
        async move {
            let connection = request
                .headers()
                .get("x-connection")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("default")
                .to_owned();
            // Some work per request, as a real server would do.
            tokio::time::sleep(Duration::from_millis(2)).await;
            match windows.admit(&connection) {
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
            }
        }
    });
    Ok((addr, stats))
}

/// How long the knee server takes to refuse a request it has no
/// resources for: a little work, as a real server does to say so.
const REFUSE_AFTER: Duration = Duration::from_millis(10);

/// Starts a server that publishes no limit and never answers 429 (the
/// first seed's CRM) on 127.0.0.1 (a free port); it runs until the
/// process ends. With `concurrency` requests at the server (this one
/// included, counted as it arrives) a request takes `base` up to `knee`,
/// and `base * concurrency / knee` past it: the server queues them inside,
/// so it never completes more than `knee / base` a second. Past `2 * knee`
/// it answers `503 Service Unavailable` without `Retry-After`: "resources
/// are not available".
pub async fn knee_server(knee: usize, base: Duration) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let at_server = Arc::new(AtomicUsize::new(0));
    serve(listener, move |_request: Request<Incoming>| {
        let at_server = Arc::clone(&at_server);
        async move {
            let concurrency = at_server.fetch_add(1, Ordering::Relaxed) + 1;
            // Leaves the count when answered, or when the client gives up.
            let _leave = Leave(&at_server);
            if concurrency > 2 * knee {
                tokio::time::sleep(REFUSE_AFTER).await;
                let mut response = Response::new(Full::new(Bytes::new()));
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return response;
            }
            tokio::time::sleep(base * concurrency.max(knee) as u32 / knee as u32).await;
            Response::new(Full::new(Bytes::from_static(b"ok")))
        }
    });
    Ok(addr)
}

/// Takes one request off the knee server's count when dropped.
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sends `leads` POSTs through `client` with `send_all`, which keeps as
/// many in hand as its gate admits (so none is refused for a full queue),
/// alternating between the connections `crm-1` and `crm-2` (the
/// `x-connection` header tells the server, a [`tollgate::ConnectionKey`]
/// tells tollgate), and prints how each ended. An error if any lead failed.
pub async fn import_leads<S, B, R>(
    client: TollgateService<S>,
    addr: SocketAddr,
    leads: u64,
    stats: &ServerStats,
) -> Result<(), BoxError>
where
    S: tower::Service<Request<B>, Response = Response<R>> + Clone,
    S::Error: Into<BoxError>,
    B: From<String> + Clone,
    R: hyper::body::Body,
    R::Error: Into<BoxError>,
{
    let started = Instant::now();
    let requests = stream::iter(0..leads).map(|n| lead_as::<B>(addr, n));
    let mut results = client.send_all(requests);
    let (mut succeeded, mut failed) = (0, 0);
    // `n` is the lead's place in `requests`: here, its number.
    while let Some((n, result)) = results.next().await {
        match result {
            Ok(response) if response.status().is_success() => {
                response.into_body().collect().await.map_err(Into::into)?;
                succeeded += 1;
            }
            Ok(response) => {
                failed += 1;
                println!("  lead {n} ended {}", response.status());
            }
            Err(error) => {
                failed += 1;
                println!("  lead {n} failed: {error}");
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
