//! The retry budget end to end against a scripted server, in virtual time:
//! an outage costs 1.44 attempts a request, not 5; retries the server
//! scheduled with `Retry-After` are exempt; a lone request keeps its
//! retries; the budget comes back a window later.

mod common;

use common::secs;

use std::time::Duration;

use http::{Request, StatusCode};
use tokio::time::Instant;
use tollgate::testing::{Reply, Script};
use tollgate::{Backoff, Error, RetryBudget, RetryLayer, Tollgate};
use tower::{BoxError, Layer, Service, ServiceExt};

fn get() -> Request<()> {
    Request::new(())
}

/// First tries a second in the outage.
const RATE: u64 = 100;
/// How long first tries keep coming.
const OUTAGE: Duration = Duration::from_secs(20);

struct Run {
    first_tries: u64,
    attempts: u64,
    /// How long from the first try to the last answer.
    took: Duration,
}

/// `RATE` first tries a second for `OUTAGE`, each its own task, through
/// `client`; every request must end with `status`.
async fn stream_into<S>(client: S, server: &Script, status: u16) -> Run
where
    S: Service<Request<()>, Response = http::Response<String>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let started = Instant::now();
    let first_tries = RATE * OUTAGE.as_secs();
    let mut requests = Vec::new();
    for n in 0..first_tries {
        tokio::time::sleep_until(started + Duration::from_millis(1_000 * n / RATE)).await;
        requests.push(tokio::spawn(client.clone().oneshot(get())));
    }
    for request in requests {
        let response = request.await.expect("no panic").expect("a response");
        assert_eq!(response.status(), status, "every request ends, answered");
    }
    Run {
        first_tries,
        attempts: server.count() as u64,
        took: started.elapsed(),
    }
}

/// A server down for everyone: `reply`, of `status`, to every request.
async fn outage(reply: Reply, status: u16, budget: Option<RetryBudget>) -> Run {
    let server = Script::new().reply(reply);
    let mut layer = RetryLayer::new(Backoff::power_automate().seed(7));
    if let Some(budget) = budget {
        layer = layer.budget(budget);
    }
    let run = stream_into(layer.layer(server.service()), &server, status).await;
    println!(
        "budget {budget:?}: {} first tries, {} attempts ({:.2} a request), over {:?}",
        run.first_tries,
        run.attempts,
        run.attempts as f64 / run.first_tries as f64,
        run.took,
    );
    run
}

#[tokio::test(start_paused = true)]
async fn an_outage_without_a_budget_multiplies_the_load_by_five() {
    let run = outage(Reply::status(503), 503, None).await;
    assert_eq!(run.attempts, 5 * run.first_tries);
}

#[tokio::test(start_paused = true)]
async fn an_outage_with_the_default_budget_costs_a_fifth_more_and_its_floor() {
    let run = outage(Reply::status(503), 503, Some(RetryBudget::default())).await;
    // A fifth of the first tries again, and the floor of 10 a second over
    // the first window; the tolerance is that floor for the rest of the
    // run, which it allows in every window: Power Automate's retries come
    // up to 97.5 s after their first try, so retries run on for 85 s after
    // the last one (2,000 first tries: at most 3,444 attempts; 2,878 with
    // this seed, 463 retries while first tries came and 415 after).
    let firsts = run.first_tries as f64;
    let tolerance = 10.0 * (run.took.as_secs_f64() - 10.0);
    let most = firsts * 1.2 + 10.0 * 10.0 + tolerance;
    assert!(
        run.attempts as f64 <= most,
        "{} attempts, more than {most}",
        run.attempts
    );
    // Without a budget, 5 attempts a request.
    assert!(run.attempts as f64 <= 1.5 * firsts, "{}", run.attempts);
}

#[tokio::test(start_paused = true)]
async fn retries_the_server_scheduled_are_exempt() {
    // The same outage, answered `429 Retry-After: 1`: every retry goes.
    let run = outage(
        Reply::status(429).retry_after(secs(1)),
        429,
        Some(RetryBudget::default()),
    )
    .await;
    assert_eq!(run.attempts, 5 * run.first_tries);
}

#[tokio::test(start_paused = true)]
async fn which_retries_spend() {
    // A budget of nothing: only exempt retries go.
    let none = RetryBudget::new(0.0).min_per_second(0);
    let backoff = Backoff::fixed(secs(1)).max_retries(1);
    let cases = [
        (Reply::status(429).retry_after(secs(1)), 2),
        (Reply::status(503).retry_after(secs(2)), 2),
        (Reply::status(503), 1),
        (Reply::status(500), 1),
        (Reply::status(429), 1),
        // A zero Retry-After schedules nothing.
        (Reply::status(429).retry_after(Duration::ZERO), 1),
        (Reply::error("connection reset"), 1),
    ];
    for (reply, attempts) in cases {
        let server = Script::new().reply(reply.clone());
        let client = RetryLayer::new(backoff.clone())
            .budget(none)
            .layer(server.service());
        let _ = client.oneshot(get()).await;
        assert_eq!(server.count(), attempts, "{reply:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_lone_request_keeps_its_retries() {
    // A healthy server with a bad moment: the floor lets one request
    // retry all four times.
    let server = Script::new()
        .reply(503)
        .reply(503)
        .reply(Reply::error("reset"))
        .reply(504)
        .reply(200);
    let client = RetryLayer::new(Backoff::power_automate().seed(1))
        .budget(RetryBudget::default())
        .layer(server.service());
    let response = client.oneshot(get()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.count(), 5);

    // Without the floor, its one first try earns it one retry (0 < 0.2).
    let server = Script::new().reply(503).reply(503).reply(200);
    let client = RetryLayer::new(Backoff::power_automate().seed(1))
        .budget(RetryBudget::new(0.2).min_per_second(0))
        .layer(server.service());
    let response = client.oneshot(get()).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(server.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_budget_recovers_after_the_window() {
    // 10 retries in any 10 seconds, and no share of first tries.
    let budget = RetryBudget::new(0.0).min_per_second(1);
    let server = Script::new().reply(503);
    let client = RetryLayer::new(Backoff::fixed(secs(1)).max_retries(3))
        .budget(budget)
        .layer(server.service());
    let started = Instant::now();
    // Five requests want 15 retries: the 10 of the window go, at 0 and 1 s.
    let requests: Vec<_> = (0..5)
        .map(|_| tokio::spawn(client.clone().oneshot(get())))
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap().unwrap().status(), 503);
    }
    assert_eq!(server.count(), 5 + 10);
    assert_eq!(started.elapsed(), secs(2));
    // Within the window, a new request gets none.
    client.clone().oneshot(get()).await.unwrap();
    assert_eq!(server.count(), 16);
    // Once the retries of 0 s and 1 s have left the window, it has all 3.
    tokio::time::sleep_until(started + secs(11)).await;
    client.clone().oneshot(get()).await.unwrap();
    assert_eq!(server.count(), 16 + 4);
}

#[tokio::test(start_paused = true)]
async fn clones_share_a_budget_and_each_layer_call_has_its_own() {
    // One retry for every two first tries, no floor.
    let budget = RetryBudget::new(0.5).min_per_second(0);
    let server = Script::new().reply(503);
    let layer = RetryLayer::new(Backoff::fixed(secs(1)).max_retries(1)).budget(budget);
    let one = layer.layer(server.service());
    one.clone().oneshot(get()).await.unwrap();
    assert_eq!(server.count(), 2, "0 retries < 0.5 × 1 first try");
    one.clone().oneshot(get()).await.unwrap();
    assert_eq!(server.count(), 3, "a clone finds the retry spent");
    layer.layer(server.service()).oneshot(get()).await.unwrap();
    assert_eq!(server.count(), 5, "another layer call has its own budget");
}

#[tokio::test(start_paused = true)]
async fn an_invalid_budget_is_clamped_not_a_panic() {
    // A ratio that is not a number is 0: only the floor (here none).
    let server = Script::new().reply(503);
    RetryLayer::new(Backoff::fixed(secs(1)))
        .budget(RetryBudget::new(f64::NAN).min_per_second(0))
        .layer(server.service())
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(server.count(), 1);
    // A zero window counts nothing: no retry but exempt ones.
    let server = Script::new().reply(Reply::status(503).after(Duration::from_millis(5)));
    RetryLayer::new(Backoff::fixed(secs(1)))
        .budget(RetryBudget::default().window(Duration::ZERO))
        .layer(server.service())
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(server.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_builder_refuses_an_invalid_budget() {
    for budget in [
        RetryBudget::new(-0.1),
        RetryBudget::new(f64::INFINITY),
        RetryBudget::default().window(Duration::ZERO),
    ] {
        let built = Tollgate::builder()
            .retry_budget(budget)
            .build(Script::new().service());
        assert!(
            matches!(
                built.map(|_| ()),
                Err(Error::InvalidConfig {
                    setting: "retry budget",
                    ..
                })
            ),
            "{budget:?}"
        );
    }
}

/// The outage through the builder's stack (gate, retry, rate limiter), with
/// room in the gate for every request.
async fn builder_outage(budget: Option<RetryBudget>) -> Run {
    let server = Script::new().reply(503);
    let builder = Tollgate::builder()
        .parallelism(2_000)
        .retry(Backoff::power_automate().seed(7));
    let builder = match budget {
        Some(budget) => builder.retry_budget(budget),
        None => builder.no_retry_budget(),
    };
    let client = builder.build(server.service()).unwrap();
    let run = stream_into(client, &server, 503).await;
    println!(
        "builder, budget {budget:?}: {} first tries, {} attempts",
        run.first_tries, run.attempts
    );
    run
}

#[tokio::test(start_paused = true)]
async fn the_builders_budget_can_be_turned_off() {
    let with = builder_outage(Some(RetryBudget::default())).await;
    let without = builder_outage(None).await;
    assert_eq!(without.attempts, 5 * without.first_tries);
    assert!(with.attempts < 2 * with.first_tries, "{}", with.attempts);
}
