//! A sleep kept in a future for its next wait: boxed, so the future that
//! holds it stays small and `Unpin` where it can (most never sleep), and
//! reset rather than allocated again when the future waits once more.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{sleep_until, Instant, Sleep};

/// Arms `sleep` to end `wait` from now: resets it if there is one, else
/// boxes a new one. A `wait` past what the clock can hold ends in about 30
/// years, as tokio's own `sleep` does.
pub(crate) fn rearm(sleep: &mut Option<Pin<Box<Sleep>>>, wait: Duration) {
    let now = Instant::now();
    let until = now
        .checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30));
    match sleep {
        Some(sleep) => sleep.as_mut().reset(until),
        None => *sleep = Some(Box::pin(sleep_until(until))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rearmed_sleeps_end_when_asked_and_overflow_is_far_off() {
        let mut sleep = None;
        let start = Instant::now();
        rearm(&mut sleep, Duration::from_millis(5));
        sleep.as_mut().unwrap().as_mut().await;
        assert_eq!(start.elapsed(), Duration::from_millis(5));
        // Reused, not replaced: the same allocation, reset.
        let at: *const Sleep = &**sleep.as_ref().unwrap();
        rearm(&mut sleep, Duration::from_millis(7));
        assert!(std::ptr::eq(at, &**sleep.as_ref().unwrap()));
        sleep.as_mut().unwrap().as_mut().await;
        assert_eq!(start.elapsed(), Duration::from_millis(12));
        rearm(&mut sleep, Duration::MAX);
        assert!(sleep.unwrap().deadline() > start + Duration::from_secs(86_400 * 365 * 29));
    }
}
