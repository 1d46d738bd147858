//! The token bucket, as GCRA arithmetic on one `u64`.
//!
//! The Generic Cell Rate Algorithm keeps one number per bucket, the
//! *theoretical arrival time* (TAT): when the bucket would be full again if
//! nothing else arrived. With `t` the time between tokens and `tau = t *
//! (burst - 1)` the slack a burst may use, a request at `now` is admitted iff
//! `now >= tat - tau`, and then `tat = max(tat, now) + t`. A denial knows
//! exactly when the next token is ready: `tat - tau`.
//!
//! Times are nanoseconds since the limiter's epoch, in tokio time. A TAT at
//! or before `now` means a full bucket, which is why a key that was never
//! seen can start at 0, and why a full bucket can be forgotten.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::Quota;
use crate::Error;

/// The two constants of one quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Gcra {
    /// Nanoseconds per token (at least 1).
    t: u64,
    /// Nanoseconds of burst tolerance: `t * (burst - 1)`.
    tau: u64,
}

impl Gcra {
    /// `None` for an invalid quota.
    pub(crate) fn new(quota: &Quota) -> Option<Self> {
        let t = quota.emission_interval()?.max(1);
        let tau = t.saturating_mul(u64::from(quota.burst_size()) - 1);
        Some(Gcra { t, tau })
    }

    /// The new TAT if a request at `now` is admitted, else `Err(ready_at)`.
    pub(crate) fn admit(&self, tat: u64, now: u64) -> Result<u64, u64> {
        let earliest = tat.saturating_sub(self.tau);
        if now < earliest {
            Err(earliest)
        } else {
            Ok(tat.max(now).saturating_add(self.t))
        }
    }

    /// Nanoseconds between tokens.
    pub(crate) fn interval(&self) -> u64 {
        self.t
    }

    /// Nanoseconds of burst tolerance.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn tolerance(&self) -> u64 {
        self.tau
    }

    /// The same bucket held to at most one request per `interval`, one at
    /// a time: a learned pace. Its only tolerance is for late wake-ups:
    /// tokio's timer ticks in milliseconds, and a pace that lost the time a
    /// sleeper overslept would run slower than learned (100/s, not 103/s).
    pub(crate) fn paced(&self, interval: u64) -> Self {
        const OVERSLEEP: u64 = 2_000_000;
        let t = self.t.max(interval);
        Gcra {
            t,
            tau: t.min(OVERSLEEP),
        }
    }

    /// The TAT that holds every request until `until`, then lets one
    /// through and refills from empty at the quota's rate.
    pub(crate) fn paused_until(&self, until: u64) -> u64 {
        until.saturating_add(self.tau)
    }
}

/// Nanoseconds since a limiter was made, in tokio time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Epoch(Instant);

impl Epoch {
    pub(crate) fn start() -> Self {
        Epoch(Instant::now())
    }

    pub(crate) fn now(&self) -> u64 {
        self.at(Instant::now())
    }

    pub(crate) fn at(&self, instant: Instant) -> u64 {
        nanos(instant.saturating_duration_since(self.0))
    }
}

/// A duration in nanoseconds, saturating at `u64::MAX` (584 years).
pub(crate) fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// One bucket's state: its TAT in an atomic, so admission is lock-free.
#[derive(Debug, Default)]
pub(crate) struct Tat(AtomicU64);

impl Tat {
    /// Takes a token at `now`, or says when one will be ready.
    pub(crate) fn acquire(&self, gcra: &Gcra, now: u64) -> Result<(), u64> {
        let mut tat = self.0.load(Ordering::Acquire);
        loop {
            let next = gcra.admit(tat, now)?;
            match self
                .0
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }

    /// Holds the bucket until `until` (never shortening a longer pause).
    pub(crate) fn pause(&self, gcra: &Gcra, until: u64) {
        self.0.fetch_max(gcra.paused_until(until), Ordering::AcqRel);
    }

    /// Moves the TAT kept under `from` to `to`'s tolerance, keeping the
    /// moment the next request may go.
    pub(crate) fn rebase(&self, from: &Gcra, to: &Gcra) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.saturating_sub(from.tau).saturating_add(to.tau))
            });
    }

    /// When the next token is ready, seen at `now` (`now` if one is).
    pub(crate) fn ready_at(&self, gcra: &Gcra, now: u64) -> u64 {
        match gcra.admit(self.0.load(Ordering::Acquire), now) {
            Ok(_) => now,
            Err(ready_at) => ready_at,
        }
    }

    /// True if the bucket is full at `now`: it then behaves exactly like a
    /// bucket never used, and can be dropped.
    pub(crate) fn is_full(&self, now: u64) -> bool {
        self.0.load(Ordering::Acquire) <= now
    }
}

/// One token bucket for everything that shares it: a direct (unkeyed)
/// limiter, for a quota that spans connections (e.g. the Power Platform's
/// 100,000 requests per 5 minutes per user). Lock-free: one atomic per
/// acquire.
///
/// ```
/// use std::time::Duration;
/// use tollgate::rate_limit::Bucket;
/// use tollgate::Quota;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), tollgate::Error> {
/// let bucket = Bucket::new(Quota::per_second(10).burst(1))?;
/// assert_eq!(bucket.try_acquire(), Ok(()));
/// assert_eq!(bucket.try_acquire(), Err(Duration::from_millis(100)));
/// # Ok(())
/// # }
/// ```
pub struct Bucket {
    gcra: Gcra,
    epoch: Epoch,
    tat: Tat,
}

impl Bucket {
    /// A full bucket of `quota`; [`Error::InvalidConfig`] if it is invalid.
    pub fn new(quota: Quota) -> Result<Self, Error> {
        quota.validate()?;
        let gcra = Gcra::new(&quota)
            .ok_or_else(|| Error::invalid_config("quota", format!("{quota:?}")))?;
        Ok(Bucket {
            gcra,
            epoch: Epoch::start(),
            tat: Tat::default(),
        })
    }

    /// Takes a token, or says how long until one is ready.
    pub fn try_acquire(&self) -> Result<(), Duration> {
        let now = self.epoch.now();
        self.tat
            .acquire(&self.gcra, now)
            .map_err(|ready_at| Duration::from_nanos(ready_at - now))
    }

    /// Holds every acquire for `pause` from now (a shorter pause never cuts
    /// a longer one short); afterwards the bucket refills from empty.
    pub fn pause(&self, pause: Duration) {
        let until = self.epoch.now().saturating_add(nanos(pause));
        self.tat.pause(&self.gcra, until);
    }
}

impl fmt::Debug for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bucket")
            .field("gcra", &self.gcra)
            .field("tat", &self.tat)
            .finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn burst_then_rate() {
        let gcra = Gcra::new(&Quota::per_second(4).burst(2)).unwrap();
        let bucket = Tat::default();
        assert_eq!(bucket.acquire(&gcra, 0), Ok(()));
        assert_eq!(bucket.acquire(&gcra, 0), Ok(()));
        assert_eq!(bucket.acquire(&gcra, 0), Err(SEC / 4));
        assert_eq!(bucket.acquire(&gcra, SEC / 4), Ok(()));
        assert_eq!(bucket.acquire(&gcra, SEC / 4), Err(SEC / 2));
        assert!(!bucket.is_full(SEC / 2));
        assert!(bucket.is_full(SEC));
    }

    #[test]
    fn pause_holds_then_refills_from_empty_and_never_shortens() {
        let gcra = Gcra::new(&Quota::per_second(10)).unwrap();
        let bucket = Tat::default();
        bucket.pause(&gcra, 7 * SEC);
        bucket.pause(&gcra, 3 * SEC); // shorter: no effect
        assert_eq!(bucket.acquire(&gcra, 0), Err(7 * SEC));
        assert_eq!(bucket.acquire(&gcra, 7 * SEC - 1), Err(7 * SEC));
        assert_eq!(bucket.acquire(&gcra, 7 * SEC), Ok(()));
        // One token at the end of the pause, then one per 100 ms.
        assert_eq!(bucket.acquire(&gcra, 7 * SEC), Err(7 * SEC + SEC / 10));
    }

    #[test]
    fn saturates_instead_of_overflowing() {
        // An unbounded burst tolerance admits everything, even when paused.
        let gcra = Gcra::new(&Quota::new(1, Duration::MAX).burst(u32::MAX)).unwrap();
        let bucket = Tat::default();
        assert_eq!(bucket.acquire(&gcra, u64::MAX), Ok(()));
        bucket.pause(&gcra, u64::MAX);
        assert_eq!(bucket.acquire(&gcra, 0), Ok(()));
        // One token a lifetime, and a pause to the end of time.
        let gcra = Gcra::new(&Quota::new(1, Duration::MAX)).unwrap();
        let bucket = Tat::default();
        assert_eq!(bucket.acquire(&gcra, 0), Ok(()));
        assert_eq!(bucket.acquire(&gcra, u64::MAX - 1), Err(u64::MAX));
        bucket.pause(&gcra, u64::MAX);
        assert_eq!(bucket.acquire(&gcra, 0), Err(u64::MAX));
    }

    /// The first window `[a, b]` of admission times (nanoseconds) holding
    /// more than `burst + count * (b - a) / period` admissions, if any.
    pub(crate) fn over_quota(admitted: &[u64], quota: &Quota) -> Option<(u64, u64)> {
        let period = quota.period().as_nanos();
        for (i, a) in admitted.iter().enumerate() {
            for (j, b) in admitted.iter().enumerate().skip(i) {
                let n = (j - i + 1) as u128;
                let allowed = u128::from(quota.burst_size())
                    + u128::from(quota.count()) * u128::from(b - a) / period;
                if n > allowed {
                    return Some((*a, *b));
                }
            }
        }
        None
    }

    proptest! {
        /// Over any arrivals, the admitted requests in any window
        /// `[a, b]` never exceed `burst + count * (b - a) / period`.
        #[test]
        fn never_exceeds_burst_plus_rate(
            count in 1u32..50,
            period_ms in 1u64..5_000,
            burst in 1u32..20,
            gaps in proptest::collection::vec(0u64..200_000_000, 1..300),
        ) {
            let period = period_ms * 1_000_000;
            let quota = Quota::new(count, Duration::from_nanos(period)).burst(burst);
            let gcra = Gcra::new(&quota).unwrap();
            let bucket = Tat::default();
            let mut now = 0u64;
            let mut admitted = Vec::new();
            for gap in gaps {
                now += gap;
                if bucket.acquire(&gcra, now).is_ok() {
                    admitted.push(now);
                }
            }
            prop_assert_eq!(over_quota(&admitted, &quota), None);
        }

        /// A denial's `ready_at` is exact: admitted then, not a nanosecond before.
        #[test]
        fn ready_at_is_exact(count in 1u32..1_000, burst in 1u32..10, uses in 1usize..40) {
            let gcra = Gcra::new(&Quota::per_second(count).burst(burst)).unwrap();
            let bucket = Tat::default();
            while bucket.acquire(&gcra, 0).is_ok() {}
            for _ in 0..uses {
                let ready_at = bucket.acquire(&gcra, 0).unwrap_err();
                prop_assert_eq!(bucket.acquire(&gcra, ready_at - 1), Err(ready_at));
                prop_assert_eq!(bucket.acquire(&gcra, ready_at), Ok(()));
                // Leave it empty again at ready_at.
                while bucket.acquire(&gcra, ready_at).is_ok() {}
            }
        }
    }
}
