//! Adaptive parallelism: the arithmetic that moves a gate's parallelism
//! with its server's latency and overload answers.
//!
//! A server that publishes no limit (the first seed's CRM: no 429, it
//! slows down until "resources are not available") has a *knee*: up to
//! some concurrency `K` each request takes its base time; past it requests
//! queue inside the server, latency grows with the concurrency and the
//! throughput stays at what `K` gave; far past it the server fails them.
//! The right parallelism is at the knee, a little over it (so the server
//! never idles), and it moves with the server's load.
//!
//! [`GradientLimit`] finds it as Netflix's concurrency-limits `Gradient`
//! does, with the parts that measurement here asked for:
//!
//! - **Rounds.** Samples are taken in rounds of about one parallelism's
//!   worth of answers (at least [`ROUND`]), so the limit moves once per
//!   round trip, as TCP's window does, whatever the request rate.
//! - **Slow start.** From the first round until latency rises or the
//!   server fails a request, the limit doubles each round: from 1 a knee
//!   of 20 is reached in five rounds, where growing by `sqrt(limit)` took
//!   sixteen.
//! - **The gradient.** Past slow start each clean round sets
//!   `limit = limit * base / mean + sqrt(limit)`, where `mean` is the
//!   round's mean latency and `base` the unloaded server's (the lowest
//!   round mean, measured again by each probe), the gradient clamped to
//!   `0.5..=1`. Means, not Gradient's least single latency: the least of
//!   answers that vary by 20% is 0.8 of their mean, which pinned the
//!   limit at 25 whatever the knee (a review's measurement). No
//!   tolerance factor (Gradient's `rttTolerance` of 2 lets latency double
//!   before the limit falls, which here is the failure point): above the knee `mean/base` grows as `limit/K`, so the
//!   limit settles where `limit = K + sqrt(limit)` (a knee of 20: 25; of
//!   10: 14), inside the 1.5x band, a few requests queued at the server so
//!   it never waits for work. The step is half the distance (Gradient's
//!   smoothing) so that one noisy round does not halve the limit.
//! - **Overload.** A round in which the server failed requests (503
//!   without `Retry-After`, a timeout, a connection error) cuts the limit
//!   by the failed share, by at least 10% (AIMD's 0.9, Netflix's default)
//!   and at most half: from 200 against a knee of 20 the limit is under
//!   its failure point in four rounds of fast failures. A round whose
//!   failures outnumber its answers ends after eight of them, not a whole
//!   round: the slots its failures free would be refilled with requests
//!   that fail too.
//! - **The base, measured.** The unloaded latency is measured again, as
//!   the mean of 16 answers at a quarter of the limit (after the requests
//!   sent at the old limit have drained), every 100 rounds, after every
//!   overloaded round, and when ten clean rounds in a row have a mean 2x
//!   over it (as Envoy's adaptive concurrency filter measures its
//!   minimum RTT at a low concurrency). Without that, a gate that started
//!   far over the knee never sees the server's unloaded latency (it
//!   settled at the failure point, 2x the knee), and one whose server has
//!   become slower at any load holds its limit at the floor (the failure
//!   Gradient2's long-term average was written for).
//! - **App-limited.** A round in which the caller kept fewer than half the
//!   limit's requests in hand does not raise it: the latency says nothing
//!   about concurrency never tried (Netflix's `inflight < limit / 2`).
//!
//! 429s are not samples: a throttled connection is the rate limiter's
//! business, not an overloaded server (see
//! [`RateLimitLayer::learn_rate`](crate::RateLimitLayer::learn_rate)).
//! Nor are answers with a `Retry-After`: the server named its pause.

use std::ops::RangeInclusive;
use std::time::Duration;

use http::StatusCode;

/// The fewest answers a round closes on: fewer and one slow request moves
/// the mean too much.
const ROUND: u32 = 8;
/// The least cut of an overloaded round (AIMD's backoff ratio).
const CUT: f64 = 0.9;
/// The most an overloaded round cuts: one round can be all fast failures.
const MOST_CUT: f64 = 0.5;
/// The lowest gradient: latency doubled or more halves the limit at most.
const MIN_GRADIENT: f64 = 0.5;
/// Share of the distance to the gradient's target moved per round.
const SMOOTHING: f64 = 0.5;
/// Slow start ends when a round's mean is this far over the base.
const SLOW_START_RISE: f64 = 1.1;
/// Rounds between two measurements of the base (Netflix's Vegas probes
/// every 30 limits' worth of samples; a probe here costs about one round
/// at a quarter of the throughput, so 100 rounds keep it under 1%).
const PROBE_EVERY: u32 = 100;
/// A probe runs at this share of the limit: under the knee wherever the
/// limit settles (at most 1.5x the knee), and in the descent from far
/// above it, under the knee after a cut or two.
const PROBE_SHARE: f64 = 0.25;
/// Answers a probe measures the base from, after the requests sent before
/// it have drained: a mean of 16 varies by a quarter of one answer's spread.
const PROBE_ROUND: u32 = 2 * ROUND;
/// A round's mean latency this many times the base, ...
const STALE_RATIO: f64 = 2.0;
/// ... this many clean rounds in a row, and the base is measured again.
const STALE_ROUNDS: u32 = 10;

/// One answer from the server, as the gate's sampler read it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Sample {
    /// Answered (any status but an overload or a throttle) this long after
    /// it was sent.
    Answered(Duration),
    /// Failed for overload: 502/503/504 without `Retry-After`, or an error
    /// (timeout, connection refused or reset).
    Overloaded,
}

impl Sample {
    /// What an answer sent `took` ago teaches: nothing if it is a throttle
    /// (a 429, or any answer naming its pause with `Retry-After`: the rate
    /// limiter's business, not an overloaded server), overload for 502,
    /// 503 and 504 without one, else its latency.
    pub(crate) fn of_answer(
        status: StatusCode,
        retry_after: bool,
        took: Duration,
    ) -> Option<Sample> {
        if status == StatusCode::TOO_MANY_REQUESTS || retry_after {
            return None;
        }
        Some(match status.as_u16() {
            502..=504 => Sample::Overloaded,
            _ => Sample::Answered(took),
        })
    }
}

/// The parallelism a gate should run at, learned from its samples: see the
/// [module docs](self).
#[derive(Debug, Clone)]
pub(crate) struct GradientLimit {
    min: f64,
    max: f64,
    // The range as given (a float rounds a huge bound).
    range: RangeInclusive<usize>,
    limit: f64,
    // The latency of an unloaded server (s): the mean of the last probe's
    // round, or a lower round mean since; 0 before the first round.
    base: f64,
    phase: Phase,
    // Clean rounds since the base was measured, and in a row with a mean
    // latency far over it.
    since_probe: u32,
    stale_rounds: u32,
    round: Round,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    // Doubling each round, until latency rises or a request fails.
    SlowStart,
    // Following the gradient.
    Steady,
    // Measuring the base at a quarter of the limit, which it returns to;
    // `drain` answers (of requests sent before it) are not measured.
    Probing { limit: f64, drain: u32 },
}

#[derive(Debug, Clone, Copy, Default)]
struct Round {
    answered: u32,
    overloaded: u32,
    // Sum of the answered latencies (s).
    sum: f64,
}

impl GradientLimit {
    /// Starts at `start` (clamped into `range`; the range is checked by the
    /// caller: `1 <= start <= end`).
    pub(crate) fn new(range: RangeInclusive<usize>, start: usize) -> Self {
        let (min, max) = (*range.start() as f64, *range.end() as f64);
        GradientLimit {
            min,
            max,
            range: range.clone(),
            limit: (start as f64).clamp(min, max),
            base: 0.0,
            phase: Phase::SlowStart,
            since_probe: 0,
            stale_rounds: 0,
            round: Round::default(),
        }
    }

    /// The parallelism to run at now.
    pub(crate) fn parallelism(&self) -> usize {
        (self.limit.round() as usize).clamp(*self.range.start(), *self.range.end())
    }

    /// Moves the limit to `parallelism` (a user's `set_parallelism`),
    /// clamped into the range; learning goes on from there.
    pub(crate) fn reset(&mut self, parallelism: usize) {
        self.limit = (parallelism as f64).clamp(self.min, self.max);
        if let Phase::Probing { .. } = self.phase {
            self.phase = Phase::Steady;
        }
        self.round = Round::default();
    }

    /// Counts one sample; when it closes a round, returns the new
    /// parallelism. `demand` (read only then) is how many requests the
    /// caller has ready to send: in flight and waiting for a slot.
    pub(crate) fn sample(
        &mut self,
        sample: Sample,
        demand: impl FnOnce() -> usize,
    ) -> Option<usize> {
        if let Phase::Probing { drain, .. } = &mut self.phase {
            if *drain > 0 {
                // Sent before the probe: its latency is the old load's.
                *drain -= 1;
                if sample == Sample::Overloaded {
                    self.round.overloaded += 1;
                }
                return None;
            }
        }
        let round = &mut self.round;
        match sample {
            Sample::Answered(latency) => {
                round.answered += 1;
                round.sum += latency.as_secs_f64();
            }
            Sample::Overloaded => round.overloaded += 1,
        }
        let size = match self.phase {
            Phase::Probing { .. } => PROBE_ROUND,
            // (A float cast saturates: a limit past u32::MAX is a round
            // of u32::MAX.)
            _ => (self.limit.ceil() as u32).max(ROUND),
        };
        // A round failing as fast as it is sent ends early: waiting for a
        // whole round at 200 refilled every failed slot with a request that
        // failed too (1.8% of a batch lost against a knee of 20, 0.8% so).
        let failing = round.overloaded >= ROUND && round.overloaded >= round.answered;
        if round.answered + round.overloaded < size && !failing {
            return None;
        }
        let round = std::mem::take(&mut self.round);
        self.close(round, demand());
        Some(self.parallelism())
    }

    fn close(&mut self, round: Round, demand: usize) {
        let mean = match round.answered {
            0 => 0.0,
            answered => round.sum / f64::from(answered),
        };
        if let Phase::Probing { limit, .. } = self.phase {
            // The probe's mean is the base from now on (the old one may be
            // a lucky round, or the server slower at any load).
            if round.answered > 0 {
                self.base = mean;
            }
            self.limit = limit;
            self.phase = Phase::Steady;
            self.since_probe = 0;
            self.stale_rounds = 0;
            if round.overloaded == 0 {
                return;
            }
        }
        if round.overloaded > 0 {
            let failed = f64::from(round.overloaded) / f64::from(round.answered + round.overloaded);
            let keep = (1.0 - failed).clamp(MOST_CUT, CUT);
            self.limit = (self.limit * keep).max(self.min);
            // Measure the base under the failure point: a gate that
            // started far over the knee has never seen it.
            self.probe();
            return;
        }
        // Round means, not single answers: the least single latency of a
        // server whose answers vary by 20% is 0.8 of its mean, and a
        // gradient against it held the limit at `(1 / (1 - 0.8))^2` = 25
        // whatever the knee (a knee of 100 ran at 0.26 of its goodput; 5%
        // of leads refused in 2 ms pinned it at 4).
        if self.base == 0.0 || mean < self.base {
            self.base = mean;
            self.stale_rounds = 0;
        } else if mean >= self.base * STALE_RATIO {
            self.stale_rounds += 1;
        } else {
            self.stale_rounds = 0;
        }
        let limited_by_caller = (demand as f64) < self.limit / 2.0;
        if self.phase == Phase::SlowStart {
            if mean > self.base * SLOW_START_RISE {
                self.phase = Phase::Steady;
            } else {
                if !limited_by_caller {
                    self.limit = (self.limit * 2.0).min(self.max);
                }
                return;
            }
        }
        // A zero mean (a clock that did not move) reads as no queueing.
        let gradient = if mean > 0.0 {
            (self.base / mean).clamp(MIN_GRADIENT, 1.0)
        } else {
            1.0
        };
        let target = self.limit * gradient + self.limit.sqrt();
        if target < self.limit || !limited_by_caller {
            self.limit = (self.limit + SMOOTHING * (target - self.limit)).clamp(self.min, self.max);
        }
        self.since_probe += 1;
        if self.since_probe >= PROBE_EVERY || self.stale_rounds >= STALE_ROUNDS {
            self.probe();
        }
    }

    /// Runs the next round at a quarter of the limit, to measure the base.
    fn probe(&mut self) {
        let limit = self.limit;
        // The requests in flight at the old limit drain first.
        let drain = limit.ceil() as u32;
        self.phase = Phase::Probing { limit, drain };
        self.limit = (limit * PROBE_SHARE).max(self.min);
    }
}

/// Checks an adaptive range against the starting parallelism: `Err` with
/// the reason for an empty range or one that starts at 0.
pub(crate) fn check_range(range: &RangeInclusive<usize>) -> Result<(), &'static str> {
    if *range.start() == 0 {
        return Err("the adaptive parallelism range must start at 1 or more");
    }
    if range.start() > range.end() {
        return Err("the adaptive parallelism range is empty");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A server with a knee at `knee`: base latency 100 ms up to it,
    /// growing with the concurrency past it, failing past `fail`. Feeds
    /// `limit` rounds at its own parallelism, a caller with work to spare.
    fn run(limit: &mut GradientLimit, knee: usize, fail: usize, rounds: usize) -> Vec<usize> {
        let mut seen = Vec::new();
        for _ in 0..rounds {
            let p = limit.parallelism();
            let latency = MS * 100 * (p.max(knee) as u32) / knee as u32;
            let mut changed = None;
            for i in 0..p.max(ROUND as usize) {
                let sample = if p > fail && i % p >= fail {
                    Sample::Overloaded
                } else {
                    Sample::Answered(latency)
                };
                if let Some(next) = limit.sample(sample, || 10_000) {
                    changed = Some(next);
                    break;
                }
            }
            seen.push(changed.unwrap_or(p));
        }
        seen
    }

    #[test]
    fn from_one_slow_start_then_settles_past_the_knee() {
        let mut limit = GradientLimit::new(1..=500, 1);
        let seen = run(&mut limit, 20, 40, 60);
        // Doubling: 2, 4, 8, 16, 32.
        assert_eq!(seen[..5], [2, 4, 8, 16, 32]);
        let last = *seen.last().unwrap();
        // limit = 20 + sqrt(limit) settles at 24.9.
        assert!((23..=27).contains(&last), "{seen:?}");
    }

    #[test]
    fn from_far_above_cuts_under_the_failure_point_fast() {
        let mut limit = GradientLimit::new(1..=500, 200);
        let seen = run(&mut limit, 20, 40, 60);
        let under = seen.iter().position(|p| *p <= 40).unwrap();
        assert!(under <= 4, "{seen:?}");
        let last = *seen.last().unwrap();
        assert!((20..=30).contains(&last), "{seen:?}");
    }

    #[test]
    fn follows_a_knee_that_moves() {
        let mut limit = GradientLimit::new(1..=500, 1);
        run(&mut limit, 20, 40, 40);
        let down = run(&mut limit, 10, 20, 60);
        assert!((10..=15).contains(down.last().unwrap()), "{down:?}");
        let up = run(&mut limit, 40, 80, 60);
        assert!((40..=60).contains(up.last().unwrap()), "{up:?}");
    }

    #[test]
    fn stays_inside_its_range() {
        let mut limit = GradientLimit::new(4..=16, 1);
        assert_eq!(limit.parallelism(), 4);
        let seen = run(&mut limit, 100, 200, 30);
        assert!(seen.iter().all(|p| (4..=16).contains(p)), "{seen:?}");
        assert_eq!(*seen.last().unwrap(), 16);
        let seen = run(&mut limit, 1, 2, 30);
        assert_eq!(*seen.last().unwrap(), 4, "{seen:?}");
    }

    #[test]
    fn a_caller_with_little_work_does_not_raise_it() {
        let mut limit = GradientLimit::new(1..=500, 10);
        for _ in 0..100 {
            limit.sample(Sample::Answered(MS * 100), || 2);
        }
        assert_eq!(limit.parallelism(), 10);
    }

    #[test]
    fn a_server_slower_at_any_load_is_followed() {
        let mut limit = GradientLimit::new(1..=500, 1);
        run(&mut limit, 20, 40, 40);
        // Every request now takes 4x as long, whatever the concurrency:
        // the old base would pin the gradient at 0.5.
        let mut seen = Vec::new();
        for _ in 0..80 {
            let p = limit.parallelism();
            let latency = MS * 400 * (p.max(20) as u32) / 20;
            for _ in 0..p.max(ROUND as usize) {
                if let Some(next) = limit.sample(Sample::Answered(latency), || 10_000) {
                    seen.push(next);
                    break;
                }
            }
        }
        assert!((20..=30).contains(seen.last().unwrap()), "{seen:?}");
    }

    proptest::proptest! {
        /// Whatever the range, start and answers (any latency, overloads,
        /// a caller with any demand), the parallelism stays in the range
        /// and nothing panics: no overflow, no NaN.
        #[test]
        fn stays_in_any_range(
            min in 1usize..=usize::MAX / 2,
            span in proptest::prelude::any::<usize>(),
            start in proptest::prelude::any::<usize>(),
            samples in proptest::collection::vec(
                (proptest::prelude::any::<Option<u64>>(), 0usize..1_000),
                0..400,
            ),
        ) {
            let max = min.saturating_add(span % 1_000_000_000);
            let mut limit = GradientLimit::new(min..=max, start);
            for (latency, demand) in samples {
                let sample = match latency {
                    Some(nanos) => Sample::Answered(Duration::from_nanos(nanos)),
                    None => Sample::Overloaded,
                };
                let parallelism = limit.sample(sample, || demand).unwrap_or(limit.parallelism());
                proptest::prop_assert!((min..=max).contains(&parallelism));
            }
        }
    }

    #[test]
    fn huge_ranges_do_not_overflow() {
        let mut limit = GradientLimit::new(1..=usize::MAX, usize::MAX);
        for _ in 0..100 {
            limit.sample(Sample::Overloaded, || usize::MAX);
        }
        assert!(limit.parallelism() >= 1);
    }

    #[test]
    fn answers_that_vary_do_not_hold_it_down() {
        // A server at its base below the knee, answers varying +-50%
        // (and one in 20 refused in 2 ms): the limit still grows, as far
        // as the caller has work.
        let mut limit = GradientLimit::new(1..=1_000, 10);
        let mut n = 0u64;
        for _ in 0..20_000 {
            n += 1;
            let spread = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 1_000;
            let latency = if n % 20 == 0 {
                MS * 2
            } else {
                MS * (50 + spread as u32 / 10)
            };
            limit.sample(Sample::Answered(latency), || 10_000);
        }
        assert!(limit.parallelism() > 500, "{}", limit.parallelism());
    }

    #[test]
    fn answers_are_classified() {
        let took = MS * 30;
        let of = |status: u16, retry_after| {
            Sample::of_answer(StatusCode::from_u16(status).unwrap(), retry_after, took)
        };
        assert_eq!(of(200, false), Some(Sample::Answered(took)));
        assert_eq!(of(404, false), Some(Sample::Answered(took)));
        assert_eq!(of(500, false), Some(Sample::Answered(took)));
        for overload in [502, 503, 504] {
            assert_eq!(of(overload, false), Some(Sample::Overloaded));
            assert_eq!(of(overload, true), None, "{overload} naming its pause");
        }
        assert_eq!(of(429, false), None);
        assert_eq!(of(429, true), None);
        assert_eq!(of(200, true), None);
    }

    #[test]
    fn ranges_are_checked() {
        assert!(check_range(&(1..=1)).is_ok());
        assert!(check_range(&(0..=5)).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let empty = 5..=4;
        assert!(check_range(&empty).is_err());
    }

    #[test]
    fn start_is_clamped_and_reset_moves_it() {
        let mut limit = GradientLimit::new(5..=50, 100);
        assert_eq!(limit.parallelism(), 50);
        limit.reset(2);
        assert_eq!(limit.parallelism(), 5);
    }
}
