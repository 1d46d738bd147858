//! Simulated throttling servers, in virtual time: the four ways servers
//! count that issue 14 names, each as a `tower::Service`.
//!
//! Per connection (named by the request URI's host: `crm-0`, `crm-1`, ...)
//! the server allows `rate` requests a second; a request arrives after a
//! network delay and, accepted, takes some work to answer ([`Timing`]).
//! Over the limit, `429` at once, with the `Retry-After` its kind sends.
//! `tests/learning.rs` and `benches/throttled.rs` share it.

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
    /// A token bucket (GCRA) of `burst` tokens; `Retry-After` is the wait
    /// for the next token, rounded up to whole seconds (so "1" for a few
    /// ms).
    TokenBucket { burst: u64 },
}

/// How long a request takes, by the number of its arrival at the server
/// (so that every run is the same).
#[derive(Clone, Copy)]
pub struct Timing {
    /// From the client to the server.
    pub there: fn(u64) -> Duration,
    /// The server's work on an accepted request.
    pub work: Duration,
    /// From the server back to the client.
    pub back: fn(u64) -> Duration,
}

impl Timing {
    /// A LAN: 1-2 ms each way, 5 ms of work.
    pub const LAN: Timing = Timing {
        there: lan,
        work: Duration::from_millis(5),
        back: lan,
    };
}

/// 1-2 ms, varying by arrival.
fn lan(arrival: u64) -> Duration {
    Duration::from_millis(1) + Duration::from_micros(arrival.wrapping_mul(0x9E37_79B9) % 1_000)
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
struct Counts {
    arrivals: AtomicU64,
    accepted: AtomicU64,
    throttled: AtomicU64,
}

struct State {
    kind: Kind,
    rate: u64,
    timing: Timing,
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
                // GCRA: nginx lets `burst` requests through beyond the one
                // the rate allows; a bucket of `burst` tokens, `burst` in all.
                let tolerance = match self.kind {
                    Kind::LeakyBucket { .. } => burst * interval,
                    _ => burst.saturating_sub(1) * interval,
                };
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
    /// A server of `kind` allowing `rate` requests a second per connection,
    /// on a LAN.
    pub fn new(kind: Kind, rate: u64) -> Self {
        Self::with_timing(kind, rate, Timing::LAN)
    }

    /// The same with its own `timing`.
    pub fn with_timing(kind: Kind, rate: u64, timing: Timing) -> Self {
        Server(Arc::new(State {
            kind,
            rate,
            timing,
            started: Instant::now(),
            counters: Mutex::default(),
            counts: Counts::default(),
        }))
    }

    /// Requests accepted so far.
    pub fn accepted(&self) -> u64 {
        self.0.counts.accepted.load(Ordering::Relaxed)
    }

    /// Requests answered 429 so far.
    pub fn throttled(&self) -> u64 {
        self.0.counts.throttled.load(Ordering::Relaxed)
    }

    /// Requests that reached the server so far.
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
        let Timing { there, work, back } = state.timing;
        Box::pin(async move {
            tokio::time::sleep(there(arrival)).await;
            let mut response = Response::new(());
            match state.admit(connection) {
                None => {
                    tokio::time::sleep(work).await;
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
            let back = back(arrival);
            if !back.is_zero() {
                tokio::time::sleep(back).await;
            }
            Ok(response)
        })
    }
}
