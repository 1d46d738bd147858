//! Without a quota, the default stack finds each server's capacity from its
//! 429s: against the four kinds of throttling server (issue 14), 2
//! connections at 500 requests a second each, fed as a bulk import feeds it,
//! in virtual time. Run with `--nocapture` for the table.

mod common;

use common::servers::{Kind, Server};
use futures_util::stream::{self, StreamExt};
use http::Request;
use tokio::time::Instant;
use tollgate::{Backoff, Quota, Tollgate};
use tower::ServiceExt;

const RATE: u64 = 500;
const CONNECTIONS: u64 = 2;
const PARALLELISM: usize = 50;

struct Outcome {
    goodput: f64,
    throttled_share: f64,
    lost: u64,
}

async fn import(kind: Kind, seconds: u64) -> Outcome {
    let server = Server::new(kind, RATE);
    let leads = RATE * CONNECTIONS * seconds;
    let stack = Tollgate::builder()
        .parallelism(PARALLELISM)
        .per_connection(Quota::unlimited())
        .retry(Backoff::power_automate().seed(7))
        .build(server.clone())
        .expect("a valid configuration");
    let started = Instant::now();
    let succeeded: u64 = stream::iter(0..leads)
        .map(|n| {
            let stack = stack.clone();
            async move {
                let request = Request::post(format!("http://crm-{}/leads", n % CONNECTIONS))
                    .body(())
                    .unwrap();
                let response = stack.oneshot(request).await;
                u64::from(matches!(response, Ok(r) if r.status().is_success()))
            }
        })
        .buffer_unordered(PARALLELISM + 10 + PARALLELISM)
        .fold(0, |sum, ok| async move { sum + ok })
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let outcome = Outcome {
        goodput: succeeded as f64 / (elapsed * (RATE * CONNECTIONS) as f64),
        throttled_share: server.throttled() as f64 / server.arrivals() as f64,
        lost: leads - succeeded,
    };
    println!(
        "{kind:?}, {seconds} s: goodput {:.3}, 429s {} of {} attempts ({:.2}%), lost {}, took {elapsed:.1} s",
        outcome.goodput,
        server.throttled(),
        server.arrivals(),
        outcome.throttled_share * 100.0,
        outcome.lost,
    );
    outcome
}

/// What the default stack reaches today, a little under each figure the
/// simulation gives (deterministic, so a drop is a change in the code):
/// nothing lost; at most 1% of attempts throttled over 30 s, 3% over 5 s
/// (the first crowd's: every request in flight when the first 429 comes);
/// and the goodput floors given. Issue 14 asks for 0.75 and 0.95 with at
/// most 1%: the 30-second runs are at 0.93-0.96, the 5-second ones at
/// 0.73-0.84 with 0.2-2.4% throttled.
async fn reaches(kind: Kind, short_floor: f64, long_floor: f64) {
    let short = import(kind, 5).await;
    let long = import(kind, 30).await;
    for (outcome, most) in [(&short, 0.03), (&long, 0.01)] {
        assert_eq!(outcome.lost, 0, "{kind:?}: a lead failed");
        assert!(
            outcome.throttled_share <= most,
            "{kind:?}: {:.2}% throttled",
            outcome.throttled_share * 100.0
        );
    }
    assert!(
        short.goodput >= short_floor,
        "{kind:?}, 5 s: {:.3}",
        short.goodput
    );
    assert!(
        long.goodput >= long_floor,
        "{kind:?}, 30 s: {:.3}",
        long.goodput
    );
}

#[tokio::test(start_paused = true)]
async fn a_leaky_bucket() {
    // 0.742 and 0.934 in the simulation.
    reaches(Kind::LeakyBucket { burst: 20 }, 0.73, 0.92).await;
}

#[tokio::test(start_paused = true)]
async fn a_sliding_window_counting_throttled_requests() {
    // 0.834 and 0.949.
    reaches(Kind::SlidingWindow, 0.82, 0.94).await;
}

#[tokio::test(start_paused = true)]
async fn fixed_windows() {
    // 0.835 and 0.958.
    reaches(Kind::FixedWindow, 0.82, 0.95).await;
}

#[tokio::test(start_paused = true)]
async fn a_token_bucket_rounding_retry_after_up() {
    // 0.726 and 0.928.
    reaches(Kind::TokenBucket { burst: 10 }, 0.72, 0.92).await;
}
