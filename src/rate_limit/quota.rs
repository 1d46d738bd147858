//! How many requests a bucket admits, and how fast it refills.

use std::time::Duration;

use crate::Error;

/// A token bucket's refill rate and size: `count` requests per `period`,
/// with at most [`burst`](Quota::burst) at once.
///
/// Plain integers, so literals read naturally:
///
/// ```
/// use std::time::Duration;
/// use tollgate::Quota;
///
/// let sharepoint = Quota::per_minute(600);                        // per connection
/// let dataverse = Quota::new(6_000, Duration::from_secs(300));
/// let power_platform = Quota::new(100_000, Duration::from_secs(300));
/// let gentle = Quota::per_second(10).burst(1);                    // no bursts at all
/// # let _ = (sharepoint, dataverse, power_platform, gentle);
/// ```
///
/// # Invalid quotas
///
/// A zero count, zero period or zero burst never panics and never divides
/// by zero: [`validate`](Quota::validate) reports it as
/// [`Error::InvalidConfig`], and so does every call through a
/// [`RateLimit`](crate::RateLimit) built with it.
///
/// # Precision
///
/// The bucket refills one token every `period / count`, rounded **up** to
/// the nanosecond, so a bucket is never faster than its quota (at most one
/// part in `count` billion slower).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Quota {
    count: u32,
    period: Duration,
    burst: u32,
}

impl Quota {
    /// `count` requests per `period`, burst `count`.
    pub const fn new(count: u32, period: Duration) -> Self {
        Quota {
            count,
            period,
            burst: count,
        }
    }

    /// `count` requests per second, burst `count`.
    pub const fn per_second(count: u32) -> Self {
        Self::new(count, Duration::from_secs(1))
    }

    /// `count` requests per minute, burst `count`.
    pub const fn per_minute(count: u32) -> Self {
        Self::new(count, Duration::from_secs(60))
    }

    /// No limit of its own: a billion requests a second, four billion at
    /// once. A connection under it still pauses when its server answers
    /// 429/503 with `Retry-After` (the cool-down), which is why
    /// [`Tollgate`](crate::Tollgate) uses it when no quota is set. Its
    /// buckets are full again a nanosecond after use, so the store drops
    /// them at once unless a cool-down holds them.
    pub const fn unlimited() -> Self {
        Quota {
            count: u32::MAX,
            period: Duration::from_nanos(1),
            burst: u32::MAX,
        }
    }

    /// The bucket size: how many requests may go at once after a quiet
    /// spell (default: the count, so a full period's worth).
    pub const fn burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// Requests per period.
    pub const fn count(&self) -> u32 {
        self.count
    }

    /// The period.
    pub const fn period(&self) -> Duration {
        self.period
    }

    /// The bucket size.
    pub const fn burst_size(&self) -> u32 {
        self.burst
    }

    /// [`Error::InvalidConfig`] for a zero count, period or burst.
    pub fn validate(&self) -> Result<(), Error> {
        let zero = if self.count == 0 {
            "count"
        } else if self.period.is_zero() {
            "period"
        } else if self.burst == 0 {
            "burst"
        } else {
            return Ok(());
        };
        Err(Error::invalid_config(
            "quota",
            format!("{zero} is zero in {self:?}"),
        ))
    }

    /// Nanoseconds between two tokens, rounded up; `None` if invalid.
    pub(crate) fn emission_interval(&self) -> Option<u64> {
        self.validate().ok()?;
        let interval = self.period.as_nanos().div_ceil(u128::from(self.count));
        Some(u64::try_from(interval).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_anything_is_invalid_not_a_panic() {
        assert!(Quota::per_second(0).validate().is_err());
        assert!(Quota::new(5, Duration::ZERO).validate().is_err());
        assert!(Quota::per_second(5).burst(0).validate().is_err());
        assert_eq!(Quota::per_second(0).emission_interval(), None);
        assert!(Quota::per_second(5).validate().is_ok());
    }

    #[test]
    fn unlimited_is_valid_and_one_nanosecond_a_token() {
        assert!(Quota::unlimited().validate().is_ok());
        assert_eq!(Quota::unlimited().emission_interval(), Some(1));
    }

    #[test]
    fn interval_rounds_up() {
        assert_eq!(Quota::per_second(3).emission_interval(), Some(333_333_334));
        assert_eq!(
            Quota::per_minute(600).emission_interval(),
            Some(100_000_000)
        );
        let huge = Quota::new(1, Duration::MAX);
        assert_eq!(huge.emission_interval(), Some(u64::MAX));
    }
}
