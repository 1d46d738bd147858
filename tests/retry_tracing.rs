//! The retry layer's tracing events. In a test binary of its own: tracing
//! caches each callsite's interest globally, and a test on another thread
//! hitting the same callsite without a subscriber can race this one's
//! thread-local subscriber and hide an event.

mod common;

use common::secs;

use std::sync::Arc;

use http::Request;
use tollgate::testing::{Reply, Script};
use tollgate::{Backoff, RetryLayer};
use tower::{Layer, ServiceExt};

/// Collects what the `fmt` subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn every_retry_emits_a_tracing_event_with_its_reasons() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = Script::new()
        .reply(Reply::status(429).retry_after(secs(7)))
        .reply(Reply::error("reset"))
        .reply(200);
    RetryLayer::new(Backoff::exponential(secs(2)))
        .layer(server.service())
        .oneshot(Request::new(()))
        .await
        .unwrap();

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let retries: Vec<&str> = log.lines().filter(|l| l.contains("retrying")).collect();
    assert_eq!(retries.len(), 2, "{log}");
    for field in [
        "attempt=2",
        "delay=7s",
        "policy_delay=2s",
        "retry_after=Some(7s)",
        "status=429",
    ] {
        assert!(
            retries[0].contains(field),
            "{field} missing from {}",
            retries[0]
        );
    }
    for field in [
        "attempt=3",
        "delay=4s",
        "policy_delay=4s",
        "scripted error: reset",
    ] {
        assert!(
            retries[1].contains(field),
            "{field} missing from {}",
            retries[1]
        );
    }
}
