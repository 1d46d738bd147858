//! Simulated throttling servers, in virtual time: the four ways servers
//! count that issue 14 names, each as a `tower::Service`.
//!
//! Per connection (the request's `ConnectionKey`, named by its URI's host
//! here: `crm-0`, `crm-1`, ...) the server allows `rate` requests a second;
//! a request arrives after a one-way network delay and, accepted, takes
//! `work` to answer. Over the limit, `429` at once, with the `Retry-After`
//! its kind sends.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tokio::time::Instant;

const SECOND: u64 = 1_000_000_000;

/// How a server counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// nginx's `limit_req` with `burst` and `nodelay`: a leaky bucket that
    /// lets `burst` requests beyond the rate through at once; a throttled
    /// request does not count; `Retry-After: 1` always (a constant in the
    /// server's configuration).
    LeakyBucket { burst: u64 },
    /// A sliding one-second window that counts every request, throttled
    /// ones too (SharePoint's way; HAProxy's `http_req_rate(1s)` tracked
    /// before the deny): HAProxy's estimate, the current period's count plus
    /// the previous period's weighted by what is left of it. `Retry-After:
    /// 1`.
    SlidingWindow,
    /// `rate` requests in each fixed one-second window; `Retry-After` is the
    /// time to the window's end, rounded up to whole seconds.
    FixedWindow,
    /// A token bucket (GCRA) with `burst`; `Retry-After` is the wait for the
    /// next token, rounded up to whole seconds (so "1" for a few ms).
    TokenBucket { burst: u64 },
}

impl Kind {
    /// The four kinds with the bursts the benches use.
    pub const ALL: [Kind; 4] = [
        Kind::LeakyBucket { burst: 20 },
        Kind::SlidingWindow,
        Kind::FixedWindow,
        Kind::TokenBucket { burst: 10 },
    ];
}

/// What one connection's counter holds.
#[derive(Default)]
struct Counter {
    /// Leaky/token bucket: the theoretical arrival time (ns). Windows: the
    /// current period's start (ns).
    at: u64,
    /// Windows: requests counted in the current period, and in the previous.
    current: u64,
    previous: u64,
}

/// Counts kept by a [`Server`].
#[derive(Default, Debug)]
pub struct Counts {
    pub arrivals: AtomicU64,
    pub accepted: AtomicU64,
    pub throttled: AtomicU64,
}

struct State {
    kind: Kind,
    rate: u64,
    network: Duration,
    work: Duration,
    started: Instant,
    counters: Mutex<Vec<Counter>>,
    counts: Counts,
}

impl State {
    /// `None` to accept, or the `Retry-After` seconds to answer with.
    fn admit(&self, connection: usize) -> Option<u64> {
        let now = self.started.elapsed().as_nanos() as u64;
        let interval = SECOND / self.rate;
        let mut counters = self.counters.lock().unwrap();
        if counters.len() <= connection {
            counters.resize_with(connection + 1, Counter::default);
        }
        let counter = &mut counters[connection];
        match self.kind {
            Kind::LeakyBucket { burst } | Kind::TokenBucket { burst } => {
                // GCRA: `burst` requests beyond the one the rate allows.
                let tolerance = burst * interval;
                let allowed_at = counter.at.saturating_sub(tolerance);
                if now < allowed_at {
                    return Some(match self.kind {
                        Kind::LeakyBucket { .. } => 1,
                        _ => (allowed_at - now).div_ceil(SECOND).max(1),
                    });
                }
                counter.at = counter.at.max(now) + interval;
                None
            }
            Kind::FixedWindow | Kind::SlidingWindow => {
                let period = now / SECOND * SECOND;
                if period != counter.at {
                    counter.previous = if period == counter.at + SECOND {
                        counter.current
                    } else {
                        0
                    };
                    counter.current = 0;
                    counter.at = period;
                }
                if self.kind == Kind::FixedWindow {
                    if counter.current >= self.rate {
                        return Some((period + SECOND - now).div_ceil(SECOND));
                    }
                    counter.current += 1;
                    return None;
                }
                // Counted first, throttled or not.
                counter.current += 1;
                let left = (period + SECOND - now) as f64 / SECOND as f64;
                let estimate = counter.current as f64 + counter.previous as f64 * left;
                (estimate > self.rate as f64).then_some(1)
            }
        }
    }
}

/// A simulated server as a `tower::Service`.
#[derive(Clone)]
pub struct Server(Arc<State>);

impl Server {
    /// A server of `kind` allowing `rate` requests a second per connection.
    pub fn new(kind: Kind, rate: u64) -> Self {
        Server(Arc::new(State {
            kind,
            rate,
            network: Duration::from_millis(1),
            work: Duration::from_millis(5),
            started: Instant::now(),
            counters: Mutex::default(),
            counts: Counts::default(),
        }))
    }

    pub fn counts(&self) -> &Counts {
        &self.0.counts
    }

    pub fn accepted(&self) -> u64 {
        self.0.counts.accepted.load(Ordering::Relaxed)
    }

    pub fn throttled(&self) -> u64 {
        self.0.counts.throttled.load(Ordering::Relaxed)
    }

    pub fn arrivals(&self) -> u64 {
        self.0.counts.arrivals.load(Ordering::Relaxed)
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<()>, tower::BoxError>> + Send>>;

impl<B> tower::Service<Request<B>> for Server {
    type Response = Response<()>;
    type Error = tower::BoxError;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Answer {
        let state = Arc::clone(&self.0);
        let connection = request
            .uri()
            .host()
            .and_then(|host| host.strip_prefix("crm-"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let arrival = state.counts.arrivals.fetch_add(1, Ordering::Relaxed);
        // 1-2 ms each way, varying by arrival.
        let jitter = Duration::from_micros(arrival.wrapping_mul(0x9E37_79B9) % 1_000);
        let network = state.network + jitter;
        Box::pin(async move {
            tokio::time::sleep(network).await;
            let mut response = Response::new(());
            match state.admit(connection) {
                None => {
                    tokio::time::sleep(state.work).await;
                    state.counts.accepted.fetch_add(1, Ordering::Relaxed);
                }
                Some(retry_after) => {
                    state.counts.throttled.fetch_add(1, Ordering::Relaxed);
                    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                    response
                        .headers_mut()
                        .insert("retry-after", retry_after.into());
                }
            }
            tokio::time::sleep(network).await;
            Ok(response)
        })
    }
}
