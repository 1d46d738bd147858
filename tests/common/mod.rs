//! Helpers shared by the integration tests.

// Each test binary uses its own subset.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

pub const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Fails the test instead of hanging it when a waiter is never woken or a
/// slot leaks: under paused time the limit passes at once when everything
/// else is stuck; on a real-time runtime it is a plain timeout.
pub async fn watchdog(limit: Duration, test: impl Future<Output = ()>) {
    tokio::time::timeout(limit, test)
        .await
        .expect("the test hung: a waiter was never woken, or a slot leaked");
}
