//! Issue 13: a paused connection must not starve the others of the gate's
//! slots. Two callers share one `Tollgate::builder().parallelism(10)`
//! stack, each keeping 15 requests in hand (10 slots + a queue of 20 =
//! 30, so the gate never refuses): `a` on one connection, `b` on another.
//! When `a`'s connection is paused (a 429) or slowed (its quota), how much
//! does `b` still get done, against `b` alone?
//!
//! ```text
//! cargo bench --bench paused                    # the simulation, virtual time
//! TOLLGATE_SERVER=http://127.0.0.1:18089 cargo bench --features reqwest --bench paused
//!                                               # and the real-server part (nginx of scripts/bench.sh)
//! ```
//!
//! **Simulation** (always): deterministic. tokio's clock is paused, the
//! runtime has one thread, and the retry policy (Power Automate's, the
//! builder's default) is seeded. The server answers every request after
//! 10 ms; connection `a` is host `crm-a`, `b` is `crm-b`.
//! - *429*: no quota; `a`'s very first request is answered `429` with
//!   `Retry-After: 10`, every later one `200`. Both callers start at 0;
//!   `b`'s completions are counted over the first 10 s (the pause).
//! - *quota-starved*: a per-connection quota of 20 a second (burst 20),
//!   every answer `200`; `a` starts at 0, `b` at 1 s; `b`'s completions
//!   are counted from 1 s to 6 s. `b` alone is held to the same quota.
//!
//! **Real server** (with `TOLLGATE_SERVER` and the `reqwest` feature):
//! nginx on 127.0.0.1 (`scripts/nginx.conf`), reqwest underneath. `b`
//! asks for `/ok` (`200`) as `ConnectionKey::new("b")`; `a`, as
//! `ConnectionKey::new("a")`, asks for `/paused` (always `429`,
//! `Retry-After: 5`) either once, its first request, then `/ok` (the
//! issue's case: one 429 pauses the connection), or every time (every
//! request `a` has in flight is answered 429 and sleeps 5 s before its
//! retry, keeping its slot: the gate bounds requests working on a server,
//! retries included). `b` alone first, then both; each run lasts 5 s,
//! after which whatever is still in hand is dropped. The retry layer
//! retries `a`'s 429s as it would in production.
//!
//! A completion is a response handed back to its caller inside the
//! window; "max in flight" is the most requests the server (or reqwest)
//! held at once, which the gate keeps at 10 or fewer.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tollgate::{Backoff, Quota, Tollgate};
use tower::{BoxError, Service, ServiceExt};

const PARALLELISM: usize = 10;
/// Requests each caller keeps in hand: two callers fill the 10 slots and
/// the default queue of 10 + 10 exactly.
const IN_HAND: usize = 15;
/// The simulated server's time per request.
const WORK: Duration = Duration::from_millis(10);

/// What the server side saw.
#[derive(Default)]
struct Wire {
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    throttled: AtomicU64,
}

impl Wire {
    /// Counts a request in flight until the guard is dropped (answered, or
    /// its future dropped).
    fn enter(self: &Arc<Self>) -> Entered {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_in_flight.fetch_max(now, Ordering::Relaxed);
        Entered(Arc::clone(self))
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

struct Entered(Arc<Wire>);

impl Drop for Entered {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One caller's completions inside the window.
#[derive(Default)]
struct Tally {
    succeeded: AtomicU64,
    /// Answered, but not 2xx (`a`'s 429 once its retries are spent).
    other: AtomicU64,
    /// Refused by the gate, or failed.
    failed: AtomicU64,
}

impl Tally {
    fn record<R>(&self, outcome: &Result<Response<R>, BoxError>) {
        match outcome {
            Ok(response) if response.status().is_success() => &self.succeeded,
            Ok(_) => &self.other,
            Err(_) => &self.failed,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    fn succeeded(&self) -> u64 {
        Wire::get(&self.succeeded)
    }

    fn answered(&self) -> u64 {
        self.succeeded() + Wire::get(&self.other)
    }

    fn failed(&self) -> u64 {
        Wire::get(&self.failed)
    }
}

/// The instants between which completions count (both included).
#[derive(Clone, Copy)]
struct Window {
    from: Instant,
    until: Instant,
}

impl Window {
    fn contains(&self, now: Instant) -> bool {
        self.from <= now && now <= self.until
    }
}

/// Keeps `IN_HAND` requests in hand, sending a new one as each completes,
/// until the caller drops this future.
async fn feed<S, B, R>(client: S, request: impl Fn() -> Request<B>, window: Window, tally: &Tally)
where
    S: Service<Request<B>, Response = Response<R>, Error = BoxError> + Clone,
{
    let mut in_hand: FuturesUnordered<_> = (0..IN_HAND)
        .map(|_| client.clone().oneshot(request()))
        .collect();
    while let Some(outcome) = in_hand.next().await {
        if window.contains(Instant::now()) {
            tally.record(&outcome);
        }
        in_hand.push(client.clone().oneshot(request()));
    }
}

/// The simulated server: 10 ms per request; optionally `429` with
/// `Retry-After: 10` for `crm-a`'s first request.
#[derive(Clone)]
struct Server {
    wire: Arc<Wire>,
    throttle_first_a: bool,
    arrivals_a: Arc<AtomicU64>,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;

impl Service<Request<()>> for Server {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<()>) -> Answer {
        let entered = self.wire.enter();
        let first_a = request.uri().host() == Some("crm-a")
            && self.arrivals_a.fetch_add(1, Ordering::Relaxed) == 0;
        let throttle = first_a && self.throttle_first_a;
        let wire = Arc::clone(&self.wire);
        Box::pin(async move {
            tokio::time::sleep(WORK).await;
            drop(entered);
            let mut response = Response::new(());
            if throttle {
                wire.throttled.fetch_add(1, Ordering::Relaxed);
                *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                response.headers_mut().insert("retry-after", 10.into());
            }
            Ok(response)
        })
    }
}

fn on(host: &str) -> Request<()> {
    Request::get(format!("http://{host}/leads"))
        .body(())
        .expect("a valid request")
}

struct Scenario {
    name: &'static str,
    quota: Quota,
    throttle_first_a: bool,
    /// When `b` starts, and its window with it.
    b_starts: Duration,
    window: Duration,
}

struct Run {
    a: Tally,
    b: Tally,
    wire: Arc<Wire>,
}

fn simulate(scenario: &Scenario, with_a: bool) -> Run {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let server = Server {
            wire: Arc::default(),
            throttle_first_a: scenario.throttle_first_a,
            arrivals_a: Arc::default(),
        };
        let client = Tollgate::builder()
            .parallelism(PARALLELISM)
            .per_connection(scenario.quota)
            .retry(Backoff::power_automate().seed(7))
            .build(server.clone())
            .expect("a valid configuration");
        let start = Instant::now();
        let window = Window {
            from: start + scenario.b_starts,
            until: start + scenario.b_starts + scenario.window,
        };
        let (a, b) = (Tally::default(), Tally::default());
        // `a` first: at 0 its requests take the slots, `b`'s queue behind.
        let feed_a = async {
            if with_a {
                feed(client.clone(), || on("crm-a"), window, &a).await;
            }
        };
        let feed_b = async {
            if !scenario.b_starts.is_zero() {
                tokio::time::sleep_until(window.from).await;
            }
            feed(client.clone(), || on("crm-b"), window, &b).await;
        };
        // A millisecond past the window, so a completion at its last
        // instant counts whichever timer fires first.
        let end = window.until + Duration::from_millis(1);
        let _ = tokio::time::timeout_at(end, future::join(feed_a, feed_b)).await;
        Run {
            a,
            b,
            wire: server.wire,
        }
    })
}

fn ratio(with: u64, alone: u64) -> f64 {
    with as f64 / alone.max(1) as f64
}

fn simulation() {
    let scenarios = [
        Scenario {
            name: "429: `a`'s first answer is 429, Retry-After: 10; no quota",
            quota: Quota::unlimited(),
            throttle_first_a: true,
            b_starts: Duration::ZERO,
            window: Duration::from_secs(10),
        },
        Scenario {
            name: "quota-starved: 20/s per connection (burst 20), no 429; `b` from 1 s",
            quota: Quota::per_second(20),
            throttle_first_a: false,
            b_starts: Duration::from_secs(1),
            window: Duration::from_secs(5),
        },
    ];
    println!(
        "\nsimulation, virtual time: parallelism {PARALLELISM} (queue {}), each caller {IN_HAND} in hand, \
         {WORK:?} per request\n",
        PARALLELISM + 10
    );
    println!(
        "| scenario | `b`'s window | `b` with `a` | `b` alone | ratio | `a` answered in the window | refused or failed (`a` / `b`) | 429s sent | server's max in flight |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for scenario in &scenarios {
        let alone = simulate(scenario, false);
        let both = simulate(scenario, true);
        for run in [&alone, &both] {
            let max = Wire::get(&run.wire.max_in_flight);
            assert!(
                max <= PARALLELISM as u64,
                "{max} requests in flight at once"
            );
        }
        let from = scenario.b_starts.as_secs_f64();
        println!(
            "| {} | {from:.0}-{:.0} s | {} | {} | {:.4} | {} | {} / {} | {} | {} |",
            scenario.name,
            from + scenario.window.as_secs_f64(),
            both.b.succeeded(),
            alone.b.succeeded(),
            ratio(both.b.succeeded(), alone.b.succeeded()),
            both.a.answered(),
            both.a.failed(),
            both.b.failed(),
            Wire::get(&both.wire.throttled),
            Wire::get(&both.wire.max_in_flight),
        );
    }
}

#[cfg(feature = "reqwest")]
mod real {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tollgate::ConnectionKey;

    use super::*;

    /// Each run's length.
    const RUN: Duration = Duration::from_secs(5);

    /// reqwest as a service that reads the whole body (so the connection
    /// goes back to the pool) and counts what is on the wire.
    fn wire(
        wire: &Arc<Wire>,
    ) -> impl Service<Request<Bytes>, Response = Response<Bytes>, Error = BoxError, Future = impl Send>
           + Clone
           + Send
           + 'static {
        let reqwest = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("a reqwest client");
        let client = tollgate::reqwest::Client::from(reqwest);
        let wire = Arc::clone(wire);
        tower::service_fn(move |request: Request<Bytes>| {
            let (client, wire) = (client.clone(), Arc::clone(&wire));
            async move {
                let _entered = wire.enter();
                let response = client.oneshot(request).await?;
                if response.status() == StatusCode::TOO_MANY_REQUESTS {
                    wire.throttled.fetch_add(1, Ordering::Relaxed);
                }
                let (parts, body) = response.into_parts();
                let body = body.collect().await?.to_bytes();
                Ok::<_, BoxError>(Response::from_parts(parts, body))
            }
        })
    }

    fn on(base: &str, path: &str, connection: &str) -> Request<Bytes> {
        let mut request = Request::get(format!("{base}{path}"))
            .body(Bytes::new())
            .expect("a valid request");
        request
            .extensions_mut()
            .insert(ConnectionKey::new(connection));
        request
    }

    async fn run(base: &str, with_a: bool, a_always_throttled: bool) -> Run {
        let counts = Arc::new(Wire::default());
        let client = Tollgate::builder()
            .parallelism(PARALLELISM)
            .retry(Backoff::power_automate().seed(7))
            .build(wire(&counts))
            .expect("a valid configuration");
        let start = Instant::now();
        let window = Window {
            from: start,
            until: start + RUN,
        };
        let (a, b) = (Tally::default(), Tally::default());
        let feed_a = async {
            if with_a {
                let first = std::sync::atomic::AtomicBool::new(true);
                let path = || {
                    let first = first.swap(false, Ordering::Relaxed);
                    if first || a_always_throttled {
                        "/paused"
                    } else {
                        "/ok"
                    }
                };
                feed(client.clone(), || on(base, path(), "a"), window, &a).await;
            }
        };
        let feed_b = feed(client.clone(), || on(base, "/ok", "b"), window, &b);
        // Stop at 5 s; what is still in hand is dropped.
        let _ = tokio::time::timeout_at(window.until, future::join(feed_a, feed_b)).await;
        Run { a, b, wire: counts }
    }

    pub(super) fn real_server(base: &str) {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        println!(
            "\nreal server: {base}, reqwest; parallelism {PARALLELISM}, each caller {IN_HAND} in hand, \
             {RUN:?} per run (`b` alone first)\n"
        );
        println!(
            "| scenario | `b` with `a` | `b` alone | ratio | `a` answered | refused or failed (`a` / `b`) | 429s received | max in flight (with `a` / alone) |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        let scenarios = [
            (
                false,
                "`a`: first request `/paused` (429, Retry-After: 5), then `/ok`; `b`: `/ok`",
            ),
            (
                true,
                "`a`: every request `/paused` (429, Retry-After: 5); `b`: `/ok`",
            ),
        ];
        for (always, name) in scenarios {
            let (alone, both) = runtime.block_on(async {
                let alone = run(base, false, always).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                let both = run(base, true, always).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                (alone, both)
            });
            println!(
                "| {name} | {} | {} | {:.4} | {} | {} / {} | {} | {} / {} |",
                both.b.succeeded(),
                alone.b.succeeded(),
                ratio(both.b.succeeded(), alone.b.succeeded()),
                both.a.answered(),
                both.a.failed(),
                both.b.failed(),
                Wire::get(&both.wire.throttled),
                Wire::get(&both.wire.max_in_flight),
                Wire::get(&alone.wire.max_in_flight),
            );
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; this binary has no options.
    simulation();
    match std::env::var("TOLLGATE_SERVER") {
        #[cfg(feature = "reqwest")]
        Ok(base) => real::real_server(&base),
        #[cfg(not(feature = "reqwest"))]
        Ok(_) => println!("\nreal server: skipped, it needs `--features reqwest`"),
        Err(_) => println!("\nreal server: skipped, TOLLGATE_SERVER is unset"),
    }
}
