//! Retry schedules: how long to wait before each retry.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use crate::Error;

/// The smallest base an exponential schedule uses: a zero base would never
/// grow, turning "exponential backoff" into a tight loop against the server.
const MIN_EXPONENTIAL_BASE: Duration = Duration::from_millis(1);

/// How a delay is drawn at random around the schedule's nominal delay.
///
/// The nominal delay before retry `n` is the fixed delay, or `base * 2^(n-1)`
/// for an exponential schedule; `hi` below is that nominal delay capped at
/// [`Backoff::max_delay`], and every result is finally clamped to
/// `[min_delay, max_delay]`.
///
/// The first four are the kinds of the AWS Architecture Blog post
/// "Exponential Backoff And Jitter" (2015); `Banded` is the Logic Apps rule.
/// Randomness spreads the retries of many callers that were throttled at the
/// same moment, so they do not all come back at once.
///
/// Drawn delays are whole milliseconds, the resolution of tokio's timer, so
/// the delay [`Backoff::delays`] shows is exactly the one a request waits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Jitter {
    /// No randomness: the delay is `hi`. The default of `fixed` and
    /// `exponential`, so a schedule is deterministic unless asked.
    #[default]
    None,
    /// Uniform in `[min_delay, hi]` (AWS "full jitter", whose lower bound is 0).
    Full,
    /// Uniform in `[hi / 2, hi]` (AWS "equal jitter").
    Equal,
    /// AWS "decorrelated jitter": uniform in `[base, 3 * previous delay]`,
    /// starting from `previous = base`, capped at `max_delay`. It ignores the
    /// doubling and grows from its own previous draw.
    Decorrelated,
    /// The Logic Apps / Power Automate exponential-interval rule: retry 1 is
    /// uniform in `[min_delay, min(base, max_delay)]`, retry `n >= 2` uniform in
    /// `[max(base * 2^(n-2), min_delay), min(base * 2^(n-1), max_delay)]`: each
    /// retry waits somewhere between the previous nominal delay and its own.
    Banded,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Fixed(Duration),
    Exponential(Duration),
}

/// A retry schedule: how many retries, and how long to wait before each.
///
/// `Backoff` is a plain value: build it with a constructor and builder
/// methods, then hand it to [`RetryLayer::new`](crate::RetryLayer::new), or
/// iterate it with [`delays`](Backoff::delays) to see the schedule.
///
/// ```
/// use std::time::Duration;
/// use tollgate::{Backoff, Jitter};
///
/// let backoff = Backoff::exponential(Duration::from_secs(1))
///     .max_retries(4)
///     .max_delay(Duration::from_secs(5));
/// let waits: Vec<_> = backoff.delays().collect();
/// assert_eq!(waits, [1, 2, 4, 5].map(Duration::from_secs));
///
/// // Jittered schedules are reproducible with a seed.
/// let jittered = backoff.jitter(Jitter::Full).seed(7);
/// assert_eq!(jittered.delays().collect::<Vec<_>>(), jittered.delays().collect::<Vec<_>>());
/// ```
///
/// # Nonsense in, documented clamp out
///
/// A schedule never panics and never overflows:
/// - exponentials saturate at `Duration::MAX` (then at `max_delay`), at any
///   retry number;
/// - a `min_delay` above `max_delay` is lowered to `max_delay` (the cap wins,
///   because caps are what keep a client polite);
/// - a zero base for [`exponential`](Backoff::exponential) is raised to 1 ms,
///   since zero never grows.
///
/// [`validate`](Backoff::validate) reports those same cases as
/// [`Error::InvalidConfig`] for callers that prefer to refuse them.
///
/// # Jitter is per request
///
/// The retry layer draws an independent jitter stream for every request, so
/// concurrent requests do not share one sequence of delays. With
/// [`seed`](Backoff::seed) set, the `k`-th request (counted from 0 across all
/// clones of one service) gets stream `k`; stream 0 is what
/// [`delays`](Backoff::delays) yields, so a test can predict every wait.
/// Without a seed, each request that retries draws a stream of its own
/// when its first retry is due.
#[derive(Clone, PartialEq, Eq)]
pub struct Backoff {
    kind: Kind,
    max_retries: u32,
    min_delay: Duration,
    max_delay: Duration,
    jitter: Jitter,
    seed: Option<u64>,
}

impl fmt::Debug for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Backoff");
        match self.kind {
            Kind::Fixed(delay) => s.field("fixed", &delay),
            Kind::Exponential(base) => s.field("exponential", &base),
        };
        s.field("max_retries", &self.max_retries)
            .field("min_delay", &self.min_delay)
            .field(
                "max_delay",
                &(self.max_delay != Duration::MAX).then_some(self.max_delay),
            )
            .field("jitter", &self.jitter)
            .field("seed", &self.seed)
            .finish()
    }
}

impl Backoff {
    /// Retries used by [`fixed`](Backoff::fixed) and
    /// [`exponential`](Backoff::exponential) unless set: 3, the default of
    /// Polly and backon, and Power Automate's "one try plus three retries".
    pub const DEFAULT_MAX_RETRIES: u32 = 3;

    const fn with_kind(kind: Kind) -> Self {
        Backoff {
            kind,
            max_retries: Self::DEFAULT_MAX_RETRIES,
            min_delay: Duration::ZERO,
            max_delay: Duration::MAX,
            jitter: Jitter::None,
            seed: None,
        }
    }

    /// Never retry: every request is sent once.
    ///
    /// (It is `fixed(Duration::ZERO)` with zero retries, so
    /// `Backoff::none().max_retries(n)` retries at once, `n` times.)
    pub const fn none() -> Self {
        Self::with_kind(Kind::Fixed(Duration::ZERO)).max_retries(0)
    }

    /// The same `delay` before every retry; 3 retries, no jitter, no cap.
    pub const fn fixed(delay: Duration) -> Self {
        Self::with_kind(Kind::Fixed(delay))
    }

    /// `base * 2^(n-1)` before retry `n` (so `base`, `2 * base`, `4 * base`,
    /// ...); 3 retries, no jitter.
    ///
    /// There is no `max_delay` by default: with 3 retries the longest wait is
    /// `4 * base`. Set one when you raise [`max_retries`](Backoff::max_retries).
    pub const fn exponential(base: Duration) -> Self {
        Self::with_kind(Kind::Exponential(base))
    }

    /// The default retry policy of Azure Logic Apps and Power Automate,
    /// exactly: exponential, base 7.5 s, delays clamped to `[5 s, 45 s]`,
    /// 4 retries, [`Jitter::Banded`].
    ///
    /// Source: Microsoft Learn, "Handle errors and exceptions in Azure Logic
    /// Apps", *Retry policies*: "The default policy is an exponential interval
    /// policy that sends up to four retries at exponentially increasing
    /// intervals, which scale by 7.5 seconds and are capped between 5 and 45
    /// seconds", with the per-retry ranges of [`Jitter::Banded`]. The four
    /// waits therefore fall in `[5, 7.5]`, `[7.5, 15]`, `[15, 30]` and
    /// `[30, 45]` seconds.
    ///
    /// Some write-ups (e.g. "throttling a workflow to death") describe the
    /// default as one try plus three retries; for that reading use
    /// `Backoff::power_automate().max_retries(3)`.
    pub const fn power_automate() -> Self {
        Self::with_kind(Kind::Exponential(Duration::from_millis(7_500)))
            .max_retries(4)
            .min_delay(Duration::from_secs(5))
            .max_delay(Duration::from_secs(45))
            .jitter(Jitter::Banded)
    }

    /// How many retries after the first try (0 = send once).
    pub const fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// The shortest wait before any retry (default 0). Raised no higher than
    /// [`max_delay`](Backoff::max_delay).
    pub const fn min_delay(mut self, delay: Duration) -> Self {
        self.min_delay = delay;
        self
    }

    /// The longest wait before any retry (default: none, `Duration::MAX`).
    pub const fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// How delays are randomised (default [`Jitter::None`], except for
    /// [`power_automate`](Backoff::power_automate)).
    pub const fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Makes jitter reproducible: the same seed gives the same delays, run
    /// after run. Without a seed each schedule draws fresh randomness.
    pub const fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The number of retries this schedule allows.
    pub const fn retries(&self) -> u32 {
        self.max_retries
    }

    /// The configured jitter.
    pub const fn jitter_kind(&self) -> Jitter {
        self.jitter
    }

    /// Every delay of the schedule, retry 1 first.
    ///
    /// With a [`seed`](Backoff::seed) the sequence is the same on every call
    /// (and equals what the first request through a retry layer waits);
    /// without one, each call draws fresh jitter.
    pub fn delays(&self) -> Delays {
        self.stream(self.seed.map_or_else(random_u64, |seed| mix(seed, 0)))
    }

    /// The delay before retry `retry` (1-based), or `None` for retry 0 or
    /// past [`max_retries`](Backoff::max_retries).
    ///
    /// Costs O(1), except under [`Jitter::Decorrelated`], where each delay
    /// depends on the one before and this walks the schedule from retry 1.
    pub fn delay(&self, retry: u32) -> Option<Duration> {
        if retry == 0 || retry > self.max_retries {
            return None;
        }
        let mut delays = self.delays();
        if self.jitter == Jitter::Decorrelated {
            return delays.nth(retry as usize - 1);
        }
        delays.retry = retry - 1;
        delays.next()
    }

    /// Reports the inputs that [`Backoff`] would otherwise clamp: a
    /// `min_delay` above `max_delay`, or an exponential base of zero.
    pub fn validate(&self) -> Result<(), Error> {
        if self.min_delay > self.max_delay {
            return Err(Error::invalid_config(
                "backoff",
                format!(
                    "min_delay {:?} is above max_delay {:?}",
                    self.min_delay, self.max_delay
                ),
            ));
        }
        if self.kind == Kind::Exponential(Duration::ZERO) {
            return Err(Error::invalid_config(
                "backoff",
                "an exponential base of zero never grows",
            ));
        }
        Ok(())
    }

    /// Whether jitter streams are reproducible (a seed is set).
    pub(crate) fn is_seeded(&self) -> bool {
        self.seed.is_some()
    }

    /// The schedule for jitter stream `stream`: one per request in the retry
    /// layer. Streams of a seeded backoff are reproducible.
    pub(crate) fn stream_for_request(&self, request: u64, unseeded_key: u64) -> Delays {
        let seed = self.seed.unwrap_or(unseeded_key);
        self.stream(mix(seed, request))
    }

    fn stream(&self, key: u64) -> Delays {
        Delays {
            backoff: self.clone(),
            key,
            retry: 0,
            previous: None,
        }
    }

    /// `min_delay` after the documented clamp.
    fn floor(&self) -> Duration {
        self.min_delay.min(self.max_delay)
    }

    fn base(&self) -> Duration {
        match self.kind {
            Kind::Fixed(delay) => delay,
            Kind::Exponential(base) => base.max(MIN_EXPONENTIAL_BASE),
        }
    }

    /// The nominal (un-jittered, uncapped) delay before retry `retry >= 1`.
    fn nominal(&self, retry: u32) -> Duration {
        match self.kind {
            Kind::Fixed(delay) => delay,
            Kind::Exponential(_) => double_saturating(self.base(), retry - 1),
        }
    }
}

/// `base * 2^doublings`, saturating at `Duration::MAX`.
fn double_saturating(base: Duration, doublings: u32) -> Duration {
    if doublings >= u128::BITS {
        return Duration::MAX;
    }
    let nanos = base.as_nanos();
    match nanos.checked_mul(1u128 << doublings) {
        Some(nanos) => duration_from_nanos(nanos),
        None => Duration::MAX,
    }
}

/// A `u128` count of nanoseconds as a `Duration`, saturating.
fn duration_from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    match u64::try_from(nanos / NANOS_PER_SEC) {
        Ok(secs) => Duration::new(secs, (nanos % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}

/// A uniform draw from `[lo, hi]` (`lo` if `hi < lo`), by multiply-shift,
/// truncated to whole milliseconds (but never below `lo`).
///
/// Milliseconds are the resolution of tokio's timer, which rounds a sleep
/// up to the next one; truncating here makes the drawn delay the one that
/// is actually waited, so [`Backoff::delays`] predicts a test exactly.
///
/// Spans up to 2^64 ns (584 years) use all 64 bits and reach `hi` exactly;
/// longer ones use 32 bits so that `span * bits` stays inside `u128` even for
/// `Duration::MAX` (about 2^94 ns).
fn uniform(lo: Duration, hi: Duration, bits: u64) -> Duration {
    if hi <= lo {
        return lo;
    }
    let span = (hi - lo).as_nanos() + 1;
    let offset = if span <= u128::from(u64::MAX) {
        (span * u128::from(bits)) >> 64
    } else {
        (span * u128::from(bits >> 32)) >> 32
    };
    let drawn = lo.as_nanos() + offset;
    duration_from_nanos(drawn - drawn % 1_000_000).max(lo)
}

/// SplitMix64's finaliser over a combination of two words: a cheap,
/// well-distributed hash that turns (stream, retry) into independent bits.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fresh entropy from the standard library's randomly keyed SipHash (the
/// same source tower's retry jitter uses), so no RNG crate is needed.
pub(crate) fn random_u64() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The delays of one [`Backoff`] schedule, retry 1 first. Made by
/// [`Backoff::delays`].
#[derive(Clone, Debug)]
pub struct Delays {
    backoff: Backoff,
    key: u64,
    /// Retries already yielded.
    retry: u32,
    /// The previous delay, for [`Jitter::Decorrelated`].
    previous: Option<Duration>,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let b = &self.backoff;
        if self.retry >= b.max_retries {
            return None;
        }
        self.retry += 1;
        let retry = self.retry;
        let (floor, cap) = (b.floor(), b.max_delay);
        let hi = b.nominal(retry).min(cap);
        let bits = mix(self.key, u64::from(retry));
        let delay = match b.jitter {
            Jitter::None => hi,
            Jitter::Full => uniform(floor, hi, bits),
            Jitter::Equal => uniform(hi / 2, hi, bits),
            Jitter::Decorrelated => {
                let base = b.base();
                let previous = self.previous.unwrap_or(base);
                let grown = previous.saturating_mul(3);
                uniform(base.min(grown), base.max(grown), bits).min(cap)
            }
            Jitter::Banded => {
                let lo = if retry == 1 {
                    floor
                } else {
                    b.nominal(retry - 1).max(floor)
                };
                uniform(lo.min(hi), hi, bits)
            }
        };
        let delay = delay.clamp(floor, cap);
        self.previous = Some(delay);
        Some(delay)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.backoff.max_retries - self.retry) as usize;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Delays {}

impl std::iter::FusedIterator for Delays {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn exponential_doubles_from_base() {
        let b = Backoff::exponential(secs(1)).max_retries(5);
        assert_eq!(b.delays().collect::<Vec<_>>(), [1, 2, 4, 8, 16].map(secs));
        assert_eq!(b.delay(3), Some(secs(4)));
        assert_eq!(b.delay(0), None);
        assert_eq!(b.delay(6), None);
    }

    #[test]
    fn fixed_and_none() {
        let b = Backoff::fixed(secs(2));
        assert_eq!(b.delays().collect::<Vec<_>>(), [secs(2); 3]);
        assert_eq!(Backoff::none().delays().count(), 0);
        assert_eq!(Backoff::none().retries(), 0);
    }

    #[test]
    fn min_and_max_clamp() {
        let b = Backoff::exponential(secs(1))
            .max_retries(5)
            .min_delay(secs(3))
            .max_delay(secs(10));
        assert_eq!(b.delays().collect::<Vec<_>>(), [3, 3, 4, 8, 10].map(secs));
    }

    #[test]
    fn exponential_saturates_without_panic() {
        let b = Backoff::exponential(Duration::MAX).max_retries(u32::MAX);
        assert_eq!(b.delay(1), Some(Duration::MAX));
        assert_eq!(b.delay(u32::MAX), Some(Duration::MAX));
        let b = Backoff::exponential(Duration::from_nanos(1)).max_retries(u32::MAX);
        assert_eq!(b.delay(1_000_000), Some(Duration::MAX));
        assert_eq!(b.delay(129), Some(Duration::MAX));
        let capped = b.max_delay(secs(60));
        assert_eq!(capped.delay(1_000_000), Some(secs(60)));
    }

    #[test]
    fn min_above_max_is_lowered_to_max() {
        let b = Backoff::fixed(secs(1))
            .min_delay(secs(10))
            .max_delay(secs(5));
        assert_eq!(b.delays().collect::<Vec<_>>(), [secs(5); 3]);
        assert!(matches!(b.validate(), Err(Error::InvalidConfig { .. })));
    }

    #[test]
    fn zero_exponential_base_is_raised_to_one_millisecond() {
        let b = Backoff::exponential(Duration::ZERO);
        let ms = Duration::from_millis;
        assert_eq!(b.delays().collect::<Vec<_>>(), [ms(1), ms(2), ms(4)]);
        assert!(b.validate().is_err());
        assert!(Backoff::fixed(Duration::ZERO).validate().is_ok());
        assert!(Backoff::power_automate().validate().is_ok());
    }

    #[test]
    fn power_automate_is_the_documented_policy() {
        let b = Backoff::power_automate();
        assert_eq!(b.retries(), 4);
        assert_eq!(b.jitter_kind(), Jitter::Banded);
        let bands = [(5.0, 7.5), (7.5, 15.0), (15.0, 30.0), (30.0, 45.0)];
        for seed in 0..10_000 {
            let delays: Vec<_> = b.clone().seed(seed).delays().collect();
            assert_eq!(delays.len(), 4);
            for (delay, (lo, hi)) in delays.iter().zip(bands) {
                let s = delay.as_secs_f64();
                assert!(lo <= s && s <= hi, "seed {seed}: {s} not in [{lo}, {hi}]");
            }
        }
    }

    #[test]
    fn power_automate_bands_are_covered_not_pinned() {
        // Jitter must actually spread: across seeds, retry 1 reaches near
        // both ends of its band.
        let firsts: Vec<f64> = (0..2_000)
            .map(|seed| {
                let b = Backoff::power_automate().seed(seed);
                b.delay(1).unwrap().as_secs_f64()
            })
            .collect();
        let lo = firsts.iter().cloned().fold(f64::MAX, f64::min);
        let hi = firsts.iter().cloned().fold(0.0, f64::max);
        assert!(
            lo < 5.05 && hi > 7.45,
            "retry 1 spread only over [{lo}, {hi}]"
        );
    }

    #[test]
    fn jitter_kinds_stay_in_their_ranges() {
        let base = Backoff::exponential(secs(1))
            .max_retries(8)
            .max_delay(secs(60));
        for seed in 0..10_000 {
            for (retry, d) in (1u32..).zip(base.clone().jitter(Jitter::Full).seed(seed).delays()) {
                let hi = secs(1 << (retry - 1)).min(secs(60));
                assert!(d <= hi, "full: retry {retry}: {d:?} > {hi:?}");
            }
            for (retry, d) in (1u32..).zip(base.clone().jitter(Jitter::Equal).seed(seed).delays()) {
                let hi = secs(1 << (retry - 1)).min(secs(60));
                assert!(hi / 2 <= d && d <= hi, "equal: retry {retry}: {d:?}");
            }
            for (retry, d) in (1u32..).zip(base.clone().jitter(Jitter::Banded).seed(seed).delays())
            {
                let hi = secs(1 << (retry - 1)).min(secs(60));
                let lo = if retry == 1 {
                    Duration::ZERO
                } else {
                    secs(1 << (retry - 2))
                };
                assert!(lo.min(hi) <= d && d <= hi, "banded: retry {retry}: {d:?}");
            }
            let mut previous = secs(1);
            for d in base
                .clone()
                .jitter(Jitter::Decorrelated)
                .seed(seed)
                .delays()
            {
                let top = (previous * 3).min(secs(60));
                assert!(
                    secs(1) <= d && d <= top,
                    "decorrelated: {d:?} vs {previous:?}"
                );
                previous = d;
            }
        }
    }

    #[test]
    fn seeds_reproduce_and_differ() {
        let b = Backoff::exponential(secs(1))
            .jitter(Jitter::Full)
            .max_retries(6);
        let one = |seed| b.clone().seed(seed).delays().collect::<Vec<_>>();
        assert_eq!(one(1), one(1));
        assert_ne!(one(1), one(2));
        // delay(n) agrees with the iterator, including the stateful kind.
        for jitter in [Jitter::Full, Jitter::Decorrelated, Jitter::Banded] {
            let b = b.clone().jitter(jitter).seed(9);
            let all: Vec<_> = b.delays().collect();
            for (i, d) in all.iter().enumerate() {
                assert_eq!(b.delay(i as u32 + 1), Some(*d), "{jitter:?}");
            }
        }
    }

    #[test]
    fn request_streams_are_independent_and_stream_zero_is_delays() {
        let b = Backoff::exponential(secs(1)).jitter(Jitter::Full).seed(3);
        let s0: Vec<_> = b.stream_for_request(0, 0).collect();
        let s1: Vec<_> = b.stream_for_request(1, 0).collect();
        assert_eq!(s0, b.delays().collect::<Vec<_>>());
        assert_ne!(s0, s1);
    }

    #[test]
    fn unseeded_schedules_draw_fresh_jitter() {
        let b = Backoff::exponential(secs(100))
            .jitter(Jitter::Full)
            .max_retries(4);
        let draws: std::collections::HashSet<Vec<Duration>> =
            (0..8).map(|_| b.delays().collect()).collect();
        assert!(draws.len() > 1);
    }

    #[test]
    fn uniform_handles_extremes() {
        assert_eq!(uniform(secs(5), secs(1), u64::MAX), secs(5));
        // Past 2^64 ns, 32 random bits resolve the span to one part in 2^32.
        let top = uniform(Duration::ZERO, Duration::MAX, u64::MAX);
        assert!(top >= Duration::MAX - Duration::MAX / (1 << 31));
        assert_eq!(uniform(secs(0), secs(10), u64::MAX), secs(10));
        assert_eq!(uniform(Duration::ZERO, Duration::MAX, 0), Duration::ZERO);
        assert_eq!(uniform(secs(1), secs(1), 12345), secs(1));
        // Whole milliseconds, never below lo.
        let lo = Duration::from_micros(1_500);
        for bits in [0, 1 << 40, u64::MAX / 3, u64::MAX] {
            let d = uniform(lo, secs(1), bits);
            assert!(d == lo || d.subsec_nanos() % 1_000_000 == 0, "{d:?}");
            assert!(lo <= d && d <= secs(1));
        }
    }

    fn any_duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            Just(Duration::ZERO),
            Just(Duration::MAX),
            (0u64..=u64::MAX, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
            (0u64..100_000_000_000).prop_map(Duration::from_nanos),
        ]
    }

    fn any_jitter() -> impl Strategy<Value = Jitter> {
        prop_oneof![
            Just(Jitter::None),
            Just(Jitter::Full),
            Just(Jitter::Equal),
            Just(Jitter::Decorrelated),
            Just(Jitter::Banded),
        ]
    }

    fn any_backoff() -> impl Strategy<Value = Backoff> {
        (
            any::<bool>(),
            any_duration(),
            0u32..64,
            any_duration(),
            any_duration(),
            any_jitter(),
            any::<u64>(),
        )
            .prop_map(|(exp, base, retries, min, max, jitter, seed)| {
                let b = if exp {
                    Backoff::exponential(base)
                } else {
                    Backoff::fixed(base)
                };
                b.max_retries(retries)
                    .min_delay(min)
                    .max_delay(max)
                    .jitter(jitter)
                    .seed(seed)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn delays_stay_within_min_and_max(b in any_backoff()) {
            let floor = b.min_delay.min(b.max_delay);
            prop_assert_eq!(b.delays().len(), b.max_retries as usize);
            for d in b.delays() {
                prop_assert!(floor <= d && d <= b.max_delay, "{:?} outside [{:?}, {:?}]", d, floor, b.max_delay);
            }
        }

        #[test]
        fn upper_bound_is_monotone(b in any_backoff()) {
            // The ceiling a retry may reach never falls as retries go on
            // (for every kind but decorrelated, whose ceiling is its own draw).
            let mut ceiling = Duration::ZERO;
            for retry in 1..=b.max_retries {
                let hi = b.nominal(retry).min(b.max_delay).max(b.floor());
                prop_assert!(hi >= ceiling);
                ceiling = hi;
            }
            if b.jitter == Jitter::None {
                let d: Vec<_> = b.delays().collect();
                prop_assert!(d.windows(2).all(|w| w[0] <= w[1]));
            }
        }

        #[test]
        fn delay_never_panics(b in any_backoff(), retry in any::<u32>()) {
            // Decorrelated walks the schedule; u32::MAX steps is slow, not wrong.
            let jitter = if b.jitter == Jitter::Decorrelated { Jitter::Full } else { b.jitter };
            let b = b.max_retries(u32::MAX).jitter(jitter);
            let d = b.delay(retry);
            prop_assert_eq!(d.is_none(), retry == 0);
        }
    }
}
