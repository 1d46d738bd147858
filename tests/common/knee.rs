//! A server with a concurrency knee and no 429: the first seed's CRM. Up
//! to `knee` requests at once each takes `base`; past it each takes
//! `base * concurrency / knee` (the server queues them inside: throughput
//! stays at `knee / base`); past `fails_beyond` it answers 503 without
//! `Retry-After` after 10 ms ("resources are not available"). Shared by
//! `tests/adaptive.rs` and `benches/knee.rs`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::BoxError;

/// The knee server's state; clone the service it gives.
#[derive(Debug)]
pub struct Knee {
    base: Duration,
    // Each answer's latency varies by up to this share either way, and one
    // request in `refuse_every` is answered 404 in 2 ms (a lead the CRM
    // already has): a real server's answers are not all alike.
    spread: f64,
    refuse_every: u64,
    knee: AtomicUsize,
    fails_beyond: AtomicUsize,
    in_flight: AtomicUsize,
    served: AtomicU64,
    failed: AtomicU64,
    arrivals: AtomicU64,
    // Down (every request 503 after 10 ms) until then.
    down_until: Mutex<Option<tokio::time::Instant>>,
    // How long each served request took at the server.
    latencies: Mutex<Vec<Duration>>,
}

/// How long an overloaded request takes to fail.
const FAIL_AFTER: Duration = Duration::from_millis(10);

impl Knee {
    pub fn new(knee: usize, fails_beyond: usize, base: Duration) -> Arc<Knee> {
        Knee::varied(knee, fails_beyond, base, 0.0, 0)
    }

    /// A knee server whose answers vary by up to `spread` either way
    /// (deterministically, by arrival), one in `refuse_every` (0: none)
    /// answered 404 in 2 ms.
    pub fn varied(
        knee: usize,
        fails_beyond: usize,
        base: Duration,
        spread: f64,
        refuse_every: u64,
    ) -> Arc<Knee> {
        Arc::new(Knee {
            base,
            spread,
            refuse_every,
            knee: AtomicUsize::new(knee),
            fails_beyond: AtomicUsize::new(fails_beyond),
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            arrivals: AtomicU64::new(0),
            down_until: Mutex::new(None),
            latencies: Mutex::new(Vec::new()),
        })
    }

    /// Moves the knee (and the failure point) from now on.
    pub fn set_knee(&self, knee: usize, fails_beyond: usize) {
        self.knee.store(knee, Ordering::Relaxed);
        self.fails_beyond.store(fails_beyond, Ordering::Relaxed);
    }

    /// Down for `outage` from now: every request fails (an outage).
    pub fn fail_for(&self, outage: Duration) {
        *self.down_until.lock().unwrap() = Some(tokio::time::Instant::now() + outage);
    }

    /// Requests that reached the server, answered or failed.
    pub fn arrivals(&self) -> u64 {
        self.arrivals.load(Ordering::Relaxed)
    }

    fn down(&self) -> bool {
        self.down_until
            .lock()
            .unwrap()
            .is_some_and(|until| tokio::time::Instant::now() < until)
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Requests at the server now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The `q` quantile (0..=1) of the served requests' time at the server.
    pub fn latency_quantile(&self, q: f64) -> Duration {
        let mut latencies = self.latencies.lock().unwrap().clone();
        if latencies.is_empty() {
            return Duration::ZERO;
        }
        latencies.sort_unstable();
        let at = ((latencies.len() - 1) as f64 * q).round() as usize;
        latencies[at]
    }

    /// The server as a `tower::Service`.
    pub fn service(
        self: &Arc<Self>,
    ) -> impl tower::Service<
        Request<()>,
        Response = Response<()>,
        Error = BoxError,
        Future = impl Send + 'static,
    > + Clone
           + Send
           + 'static {
        let knee = Arc::clone(self);
        tower::service_fn(move |_request: Request<()>| {
            let knee = Arc::clone(&knee);
            async move {
                let arrival = knee.arrivals.fetch_add(1, Ordering::Relaxed) + 1;
                let at = knee.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                let _leave = Leave(&knee.in_flight);
                if at > knee.fails_beyond.load(Ordering::Relaxed) || knee.down() {
                    tokio::time::sleep(FAIL_AFTER).await;
                    knee.failed.fetch_add(1, Ordering::Relaxed);
                    let mut response = Response::new(());
                    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    return Ok::<_, BoxError>(response);
                }
                if knee.refuse_every > 0 && arrival % knee.refuse_every == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let mut response = Response::new(());
                    *response.status_mut() = StatusCode::NOT_FOUND;
                    return Ok(response);
                }
                let k = knee.knee.load(Ordering::Relaxed).max(1);
                let took = knee.base * (at.max(k) as u32) / k as u32;
                // A uniform draw in -1..1 from the arrival number.
                let draw = (arrival.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64
                    / (1u64 << 53) as f64
                    * 2.0
                    - 1.0;
                let took = took.mul_f64(1.0 + knee.spread * draw);
                tokio::time::sleep(took).await;
                knee.served.fetch_add(1, Ordering::Relaxed);
                knee.latencies.lock().unwrap().push(took);
                Ok(Response::new(()))
            }
        })
    }
}

/// Leaves the server's count when the request ends or is dropped.
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A gate's parallelism read every `every`, until stopped: what an
/// adaptive gate chose over a run.
pub struct Watch {
    seen: Arc<Mutex<Vec<usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    pub fn start(handle: tollgate::concurrency::ConcurrencyGateHandle, every: Duration) -> Watch {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let seen = Arc::clone(&seen);
            async move {
                loop {
                    tokio::time::sleep(every).await;
                    seen.lock().unwrap().push(handle.parallelism());
                }
            }
        });
        Watch { seen, task }
    }

    /// Stops reading; what was read, in order.
    pub fn stop(self) -> Vec<usize> {
        self.task.abort();
        self.seen.lock().unwrap().clone()
    }
}
