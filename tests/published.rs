//! The limits a server publishes hold its connection: a response saying no
//! requests remain pauses the connection until the reset it states, a 429
//! without `Retry-After` waits for the published reset, `Retry-After` wins
//! when both are there, and `learn_from_headers(false)` turns it off.

mod common;

use common::{secs, watchdog};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::HeaderName;
use http::Request;
use tokio::time::Instant;
use tollgate::testing::{Reply, Script};
use tollgate::{ConnectionKey, Quota, RateLimitLayer};
use tower::{Layer, ServiceExt};

fn on(connection: &str) -> Request<()> {
    let mut request = Request::get("http://127.0.0.1:8080/leads")
        .body(())
        .unwrap();
    request
        .extensions_mut()
        .insert(ConnectionKey::new(connection));
    request
}

fn header(name: &'static str) -> HeaderName {
    HeaderName::from_static(name)
}

/// Sends one request on `connection` and returns how long it took.
async fn timed<S, B>(client: &S, connection: &str) -> Duration
where
    S: tower::Service<Request<()>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
{
    let started = Instant::now();
    client.clone().oneshot(on(connection)).await.unwrap();
    started.elapsed()
}

#[tokio::test(start_paused = true)]
async fn no_requests_remaining_holds_the_connection_until_the_reset() {
    watchdog(secs(600), async {
        // The second answer says the window is spent for 7 more seconds
        // (the IETF draft's field), on a 200.
        let server = Script::new()
            .reply(200)
            .reply(Reply::status(200).header(header("ratelimit"), r#""default";r=0;t=7"#))
            .reply(200);
        let client = RateLimitLayer::per_connection(Quota::unlimited()).layer(server.service());
        assert_eq!(timed(&client, "a").await, Duration::ZERO);
        assert_eq!(timed(&client, "a").await, Duration::ZERO);
        // a waits the reset out; b is another connection.
        assert_eq!(timed(&client, "b").await, Duration::ZERO);
        assert_eq!(timed(&client, "a").await, secs(7));
        assert_eq!(client.handle().cool_downs(), 1);
        assert_eq!(
            client.handle().rate_cuts(),
            0,
            "not a 429: nothing to learn"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_github_style_timestamp_reset_is_read_against_the_wall_clock() {
    watchdog(secs(600), async {
        // GitHub: remaining 0, reset as a Unix timestamp 30 s ahead.
        let reset = SystemTime::now().duration_since(UNIX_EPOCH).unwrap() + secs(30);
        let server = Script::new()
            .reply(
                Reply::status(200)
                    .header(header("x-ratelimit-remaining"), "0")
                    .header(header("x-ratelimit-reset"), &reset.as_secs().to_string()),
            )
            .reply(200);
        let client = RateLimitLayer::per_connection(Quota::unlimited()).layer(server.service());
        timed(&client, "a").await;
        let waited = timed(&client, "a").await;
        // Whole seconds on the wire, and the wall clock moved a little.
        assert!(waited > secs(28) && waited <= secs(30), "{waited:?}");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_429_without_retry_after_waits_for_the_published_reset() {
    watchdog(secs(600), async {
        let server = Script::new()
            .reply(Reply::status(429).header(header("x-ratelimit-reset-after"), "4.5"))
            .reply(200);
        let client = RateLimitLayer::per_connection(Quota::unlimited()).layer(server.service());
        assert_eq!(client.clone().oneshot(on("a")).await.unwrap().status(), 429);
        assert_eq!(timed(&client, "a").await, Duration::from_millis(4_500));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_wins_over_the_published_reset() {
    watchdog(secs(600), async {
        let server = Script::new()
            .reply(
                Reply::status(429)
                    .retry_after(secs(2))
                    .header(header("ratelimit"), r#""default";r=0;t=60"#),
            )
            .reply(200);
        let client = RateLimitLayer::per_connection(Quota::unlimited()).layer(server.service());
        client.clone().oneshot(on("a")).await.unwrap();
        assert_eq!(timed(&client, "a").await, secs(2));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_hostile_reset_is_capped_and_requests_left_do_not_hold() {
    watchdog(secs(600), async {
        let server = Script::new()
            // Requests left: nothing to hold.
            .reply(
                Reply::status(200)
                    .header(header("x-ratelimit-remaining"), "3")
                    .header(header("x-ratelimit-reset"), "60"),
            )
            // Spent, with a reset ten years away: held max_cool_down.
            .reply(
                Reply::status(200)
                    .header(header("ratelimit-remaining"), "0")
                    .header(header("ratelimit-reset"), "315360000"),
            )
            .reply(
                Reply::status(200)
                    .header(header("x-ratelimit-remaining"), "zero")
                    .header(header("x-ratelimit-reset"), "-5"),
            )
            .reply(200);
        let client = RateLimitLayer::per_connection(Quota::unlimited())
            .max_cool_down(secs(20))
            .layer(server.service());
        assert_eq!(timed(&client, "a").await, Duration::ZERO);
        assert_eq!(timed(&client, "a").await, Duration::ZERO);
        assert_eq!(timed(&client, "a").await, secs(20));
        // Malformed: ignored (the one timer tick after a pause aside).
        assert!(timed(&client, "a").await <= Duration::from_millis(1));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn learn_from_headers_false_reads_nothing() {
    watchdog(secs(600), async {
        let server = Script::new()
            .reply(Reply::status(200).header(header("ratelimit"), r#""default";r=0;t=7"#))
            .reply(Reply::status(429).header(header("ratelimit"), r#""default";r=0;t=7"#))
            .reply(200);
        let client = RateLimitLayer::per_connection(Quota::unlimited())
            .learn_from_headers(false)
            .layer(server.service());
        assert_eq!(timed(&client, "a").await, Duration::ZERO);
        assert_eq!(timed(&client, "a").await, Duration::ZERO);
        // A 429 without Retry-After still counts, without a pause.
        assert_eq!(timed(&client, "a").await, Duration::ZERO);
        assert_eq!(client.handle().cool_downs(), 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_published_policy_paces_the_connection_before_any_429() {
    watchdog(secs(600), async {
        // Every answer states 10 requests a second; no 429 ever comes.
        let policy =
            || Reply::status(200).header(header("ratelimit-policy"), r#""default";q=10;w=1"#);
        let server = (0..31).fold(Script::new(), |script, _| script.reply(policy()));
        let client = RateLimitLayer::per_connection(Quota::unlimited()).layer(server.service());
        // The first answer teaches the policy.
        assert_eq!(timed(&client, "a").await, Duration::ZERO);
        let started = Instant::now();
        let tasks: Vec<_> = (0..30)
            .map(|_| tokio::spawn(client.clone().oneshot(on("a"))))
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        // Sent evenly at 99% of 10 a second: 30 more take about 3 s (one
        // at once, 29 intervals of 1/9.9 s), where they went at once.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(2_900) && took <= Duration::from_millis(3_000),
            "{took:?}"
        );
        assert_eq!(client.handle().cool_downs(), 0);
        // learn_rate(false): no pace, from 429s or from policies.
        let server = (0..31).fold(Script::new(), |script, _| script.reply(policy()));
        let unpaced = RateLimitLayer::per_connection(Quota::unlimited())
            .learn_rate(false)
            .layer(server.service());
        timed(&unpaced, "a").await;
        let started = Instant::now();
        let tasks: Vec<_> = (0..30)
            .map(|_| tokio::spawn(unpaced.clone().oneshot(on("a"))))
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert!(started.elapsed() <= Duration::from_millis(30));
    })
    .await;
}
