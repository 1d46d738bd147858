//! Feature `metrics`: what a Prometheus scrape shows of a stack, read
//! through metrics-exporter-prometheus's recorder (installed once for this
//! test binary; each test publishes under a `test` label of its own).

mod common;

use common::{secs, watchdog};

use std::sync::OnceLock;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use http::Request;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tollgate::metrics::Metrics;
use tollgate::testing::{Reply, Script};
use tollgate::{Backoff, ConcurrencyGateLayer, Quota, RateLimitLayer, RetryLayer, Tollgate};
use tower::{Layer, Service, ServiceExt};

fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("the only recorder of this test binary")
    })
}

/// The value of the series `name{labels}` in a scrape, if it is there.
fn value(name: &str, labels: &str) -> Option<f64> {
    let series = format!("{name}{{{labels}}} ");
    recorder()
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map(|value| value.trim().parse().expect("a number"))
}

/// `value`, or 0 for a series never published.
fn read(name: &str, labels: &str) -> f64 {
    value(name, labels).unwrap_or(0.0)
}

fn post(host: &str, lead: u32) -> Request<String> {
    Request::post(format!("http://{host}/leads"))
        .body(format!("{{\"lead\":{lead}}}"))
        .unwrap()
}

fn get(host: &str) -> Request<()> {
    Request::get(format!("http://{host}/leads"))
        .body(())
        .unwrap()
}

/// Lets the layers' sampling tasks take a reading (they read every second).
async fn sampled() {
    tokio::time::sleep(Metrics::DEFAULT_SAMPLE_EVERY + Duration::from_millis(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_scrape_shows_the_stack_as_its_handles_do() {
    watchdog(secs(600), async {
        recorder();
        let labels = r#"test="stack""#;
        // Each lead takes 100 ms; the first answer throttles for 2 s.
        let server = Script::new()
            .reply(
                Reply::status(429)
                    .retry_after(secs(2))
                    .after(Duration::from_millis(100)),
            )
            .reply(Reply::status(200).after(Duration::from_millis(100)));
        let mut client = Tollgate::builder()
            .parallelism(2)
            .per_connection(Quota::per_second(5))
            .metrics(Metrics::new().label("test", "stack"))
            .build(server.service())
            .unwrap();
        let gate = client.handle();
        let rate_limit = client.get_ref().get_ref().handle();
        // 12 leads at once: 2 in flight, 10 queued (the default queue,
        // 10 + 2, holds them all).
        let calls: Vec<_> = (0..12)
            .map(|lead| tokio::spawn(client.call(post("crm.example", lead))))
            .collect();
        sampled().await;
        // Mid-batch: the gauges are the handle's figures of the last reading.
        tokio::task::yield_now().await;
        assert_eq!(read("tollgate_gate_parallelism", labels), 2.0);
        assert_eq!(read("tollgate_gate_queue_limit", labels), 12.0);
        assert_eq!(
            read("tollgate_gate_in_flight", labels),
            gate.in_flight() as f64
        );
        assert_eq!(read("tollgate_gate_queued", labels), gate.queued() as f64);
        assert_eq!(read("tollgate_gate_lent", labels), gate.lent() as f64);
        assert_eq!(
            read("tollgate_rate_limit_waiting", labels),
            rate_limit.waiting() as f64
        );
        // The 429 paused the connection for 2 s: the leads wait for
        // tokens, their slots lent, or queue for a slot.
        assert!(gate.queued() + gate.lent() >= 10, "leads wait mid-batch");
        for call in calls {
            call.await.unwrap().unwrap();
        }
        sampled().await;
        // After: every count as the handles give it.
        assert_eq!(read("tollgate_gate_in_flight", labels), 0.0);
        assert_eq!(read("tollgate_gate_queued", labels), 0.0);
        assert_eq!(
            read("tollgate_rate_limit_admitted_total", labels),
            rate_limit.admitted() as f64
        );
        assert_eq!(rate_limit.admitted(), 13, "12 leads and one retry");
        assert_eq!(read("tollgate_rate_limit_keys", labels), 1.0);
        assert_eq!(read("tollgate_rate_limit_waiting", labels), 0.0);
        assert_eq!(read("tollgate_rate_limit_cool_downs_total", labels), 1.0);
        assert_eq!(rate_limit.cool_downs(), 1);
        assert_eq!(
            read("tollgate_rate_limit_rate_cuts_total", labels),
            rate_limit.rate_cuts() as f64
        );
        // The retry of the 429, by its reason, and its wait.
        let retried = format!(r#"{labels},reason="429""#);
        assert_eq!(read("tollgate_retry_retries_total", &retried), 1.0);
        assert_eq!(read("tollgate_retry_delay_seconds_count", labels), 1.0);
        assert!(read("tollgate_retry_delay_seconds_sum", labels) >= 2.0);
        // 10 leads queued for a slot.
        assert_eq!(read("tollgate_gate_queue_wait_seconds_count", labels), 10.0);
        // Each waited for the first two answers (100 ms), then had a
        // slot, which it lent while the connection cooled down.
        let queued_for = read("tollgate_gate_queue_wait_seconds_sum", labels);
        assert!((queued_for - 1.0).abs() < 1e-6, "{queued_for} s");
        // Those 10 and the retry waited out the 2 s cool-down, at least.
        assert_eq!(
            read("tollgate_rate_limit_token_wait_seconds_count", labels),
            11.0
        );
        assert!(read("tollgate_rate_limit_token_wait_seconds_sum", labels) >= 22.0);
        // The connection is not a label unless asked for.
        assert!(!recorder()
            .render()
            .contains("connection=\"http://crm.example\",test=\"stack\""));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn per_connection_labels_name_the_connection_only_when_asked() {
    watchdog(secs(600), async {
        recorder();
        for (test, per_connection) in [("per-connection", true), ("aggregate", false)] {
            // Ten leads a second for two seconds, then a 429: a lesson.
            let mut server = Script::new();
            for _ in 0..20 {
                server = server.reply(Reply::status(200).after(Duration::from_millis(100)));
            }
            let server = server
                .reply(Reply::status(429).retry_after(secs(3)))
                .reply(200);
            let mut client = Tollgate::builder()
                .metrics(
                    Metrics::new()
                        .label("test", test)
                        .per_connection(per_connection),
                )
                .build(server.service())
                .unwrap();
            for lead in 0..21 {
                let request = post("CRM.example:8080", lead);
                ServiceExt::<Request<String>>::ready(&mut client)
                    .await
                    .unwrap();
                client.call(request).await.unwrap();
            }
            let rate_limit = client.get_ref().get_ref().handle();
            assert_eq!((rate_limit.cool_downs(), rate_limit.rate_cuts()), (1, 1));
        }
        let per = r#"test="per-connection",connection="http://crm.example:8080""#;
        assert_eq!(read("tollgate_rate_limit_cool_downs_total", per), 1.0);
        assert_eq!(
            read("tollgate_rate_limit_cool_down_seconds_count", per),
            1.0
        );
        assert_eq!(read("tollgate_rate_limit_rate_cuts_total", per), 1.0);
        let pace = value("tollgate_rate_limit_pace", per).expect("a pace per connection");
        assert!(pace > 0.0 && pace < 20.0, "{pace} a second");
        let aggregate = r#"test="aggregate""#;
        assert_eq!(read("tollgate_rate_limit_cool_downs_total", aggregate), 1.0);
        assert_eq!(read("tollgate_rate_limit_rate_cuts_total", aggregate), 1.0);
        let scrape = recorder().render();
        assert!(!scrape.contains(r#"test="aggregate",connection="#));
        assert!(!scrape.contains(r#"tollgate_rate_limit_pace{test="aggregate""#));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_dropped_gate_takes_its_gauges_back() {
    watchdog(secs(600), async {
        recorder();
        let labels = r#"test="dropped""#;
        let metrics = Metrics::new().label("test", "dropped");
        let first = ConcurrencyGateLayer::new(3)
            .metrics(metrics.clone())
            .layer(Script::new().service());
        let second = ConcurrencyGateLayer::new(4)
            .metrics(metrics)
            .layer(Script::new().service());
        // Gates start sampling on their first request.
        first.clone().oneshot(post("a.example", 1)).await.unwrap();
        second.clone().oneshot(post("a.example", 2)).await.unwrap();
        sampled().await;
        // Two gates under the same labels add up.
        assert_eq!(read("tollgate_gate_parallelism", labels), 7.0);
        drop(first);
        sampled().await;
        assert_eq!(read("tollgate_gate_parallelism", labels), 4.0);
        drop(second);
        sampled().await;
        assert_eq!(read("tollgate_gate_parallelism", labels), 0.0);
    })
    .await;
}

/// A client kept across runtimes (a static, say): the runtime that ran its
/// sampling tasks shuts down, the next request starts others on the next.
#[test]
fn a_stack_outliving_its_runtime_samples_again_on_the_next_without_counting_twice() {
    recorder();
    let labels = r#"test="runtimes""#;
    let client = Tollgate::builder()
        .parallelism(3)
        .metrics(Metrics::new().label("test", "runtimes"))
        .build(Script::new().service())
        .unwrap();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    };
    let send = |leads: std::ops::Range<u32>| {
        let client = client.clone();
        async move {
            for lead in leads {
                client
                    .clone()
                    .oneshot(post("a.example", lead))
                    .await
                    .unwrap();
            }
            sampled().await;
        }
    };
    let first = runtime();
    first.block_on(send(0..2));
    assert_eq!(read("tollgate_gate_parallelism", labels), 3.0);
    assert_eq!(read("tollgate_rate_limit_admitted_total", labels), 2.0);
    // Its tasks are dropped with it: their share of the gauges goes back
    // out; the counts stay.
    drop(first);
    assert_eq!(read("tollgate_gate_parallelism", labels), 0.0);
    assert_eq!(read("tollgate_rate_limit_keys", labels), 0.0);
    assert_eq!(read("tollgate_rate_limit_admitted_total", labels), 2.0);
    let second = runtime();
    second.block_on(send(2..3));
    assert_eq!(read("tollgate_gate_parallelism", labels), 3.0);
    assert_eq!(read("tollgate_rate_limit_keys", labels), 1.0);
    assert_eq!(read("tollgate_rate_limit_admitted_total", labels), 3.0);
}

#[tokio::test(start_paused = true)]
async fn refusals_and_time_outs_are_counted_and_only_waits_that_end_in_a_slot_recorded() {
    watchdog(secs(600), async {
        recorder();
        let labels = r#"test="refused""#;
        let gate = ConcurrencyGateLayer::new(1)
            .queue_limit(1)
            .queue_timeout(secs(1))
            .metrics(Metrics::new().label("test", "refused"))
            .layer(
                Script::new()
                    .reply(Reply::status(200).after(secs(10)))
                    .service(),
            );
        // One in flight for 10 s, one queued (it gives up after 1 s), one
        // refused.
        let calls: Vec<_> = (0..3)
            .map(|lead| tokio::spawn(gate.clone().oneshot(post("a.example", lead))))
            .collect();
        let mut ended = Vec::new();
        for call in calls {
            ended.push(call.await.unwrap().is_ok());
        }
        assert_eq!(ended, [true, false, false]);
        sampled().await;
        assert_eq!(read("tollgate_gate_refused_total", labels), 1.0);
        assert_eq!(read("tollgate_gate_timed_out_total", labels), 1.0);
        assert_eq!(read("tollgate_gate_queue_wait_seconds_count", labels), 0.0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_dropped_rate_limiter_publishes_its_last_counts() {
    watchdog(secs(600), async {
        recorder();
        let labels = r#"test="last-counts""#;
        let client = RateLimitLayer::per_connection(Quota::per_second(100))
            .metrics(Metrics::new().label("test", "last-counts"))
            .layer(Script::new().service());
        for lead in 0..3 {
            client
                .clone()
                .oneshot(post("a.example", lead))
                .await
                .unwrap();
        }
        // Gone before its sampling task took a single reading.
        drop(client);
        sampled().await;
        assert_eq!(read("tollgate_rate_limit_admitted_total", labels), 3.0);
        assert_eq!(read("tollgate_rate_limit_keys", labels), 0.0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn retries_given_up_are_counted_by_why() {
    watchdog(secs(600), async {
        recorder();
        let labels = r#"test="gave-up""#;
        let server = Script::new().reply(503);
        let client = RetryLayer::new(Backoff::fixed(secs(1)).max_retries(2))
            .metrics(Metrics::new().label("test", "gave-up"))
            .layer(server.service());
        // A GET: a POST is not retried on a 503 (the server may have
        // acted on it).
        let response = client.oneshot(get("a.example")).await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(
            read(
                "tollgate_retry_retries_total",
                &format!(r#"{labels},reason="503""#)
            ),
            2.0
        );
        assert_eq!(
            read(
                "tollgate_retry_gave_up_total",
                &format!(r#"{labels},reason="retries_spent""#)
            ),
            1.0
        );
        // A server asking for longer than the layer waits: returned.
        let server = Script::new().reply(Reply::status(429).retry_after(secs(600)));
        let client = RetryLayer::new(Backoff::fixed(secs(1)))
            .max_retry_after(secs(60))
            .metrics(Metrics::new().label("test", "gave-up"))
            .layer(server.service());
        let response = client.oneshot(get("a.example")).await.unwrap();
        assert_eq!(response.status(), 429);
        let too_long = format!(r#"{labels},reason="retry_after_too_long""#);
        assert_eq!(read("tollgate_retry_gave_up_total", &too_long), 1.0);
        // The help text went out with the first event.
        assert!(recorder()
            .render()
            .contains("# HELP tollgate_retry_gave_up_total"));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn batches_through_send_all_publish_too() {
    watchdog(secs(600), async {
        recorder();
        let labels = r#"test="send-all""#;
        let server = Script::new().reply(Reply::status(200).after(Duration::from_millis(10)));
        let client = Tollgate::builder()
            .parallelism(4)
            .metrics(Metrics::new().label("test", "send-all"))
            .build(server.service())
            .unwrap();
        let sent = client
            .send_all(stream::iter((0..40).map(|lead| post("crm.example", lead))))
            .count()
            .await;
        assert_eq!(sent, 40);
        sampled().await;
        assert_eq!(read("tollgate_rate_limit_admitted_total", labels), 40.0);
        assert_eq!(read("tollgate_gate_refused_total", labels), 0.0);
    })
    .await;
}
