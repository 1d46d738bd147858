//! A connection's pace, learned from its server's 429s.
//!
//! A cool-down is only as good as the server's `Retry-After`. A token-bucket
//! server that means "10 ms" but rounds up to "1 s" idles the connection
//! for the second; then every request that waited goes at once, overruns
//! the server's burst, and earns the next 429: 10% of the server's capacity
//! without a quota (`benches/throttled.rs`). So a 429 also teaches the
//! connection a **pace**, requests per second sent evenly, just below the
//! rate that earned it. Time `s` counts from when the key sends again (the
//! end of the cool-down); `r` is the rate learned:
//!
//! - the **first** 429 gives an estimate from the `n` requests admitted
//!   since the key was first seen (at least 10, else the 429 only pauses
//!   the key) in `d` seconds: the server let through at most `n / d` and
//!   at least `n / (d + pause)` (the pause it asked for, at least a
//!   second); the estimate is their geometric mean. Rough (requests in
//!   flight count too), so it doubles every 2 s until the next 429 calls
//!   it;
//! - every later 429 takes the pace it met, less what the server's burst
//!   may have hidden (`LAG_SECS / s`: a 429 a second after resuming means
//!   the pace was ~10% too fast, one after a minute barely), as `r`. The
//!   pace restarts at 80% of `r` to drain what the server queued, climbs
//!   back within 2 s to 99% of `r`, and holds there;
//! - after 5 quiet minutes (Power Platform's metering window) it **probes**
//!   upward by 0.1% of `r` a second, so a server that grew is found again
//!   at the cost of one 429 per probe;
//! - 30 minutes without a 429 and the pace is **forgotten**: the key runs at
//!   its quota again, and may be dropped from the store.
//!
//! Only the first 429 of an episode teaches: a response to a request sent
//! before the last lesson took effect (the rest of the crowd that earned
//! it) is ignored, as TCP cuts its window once per loss event.
//!
//! Against the simulation's servers (100/s per connection), the pace holds
//! 0.98-0.99 of capacity with one 429 per 11,000 requests or fewer, where the
//! cool-down alone held 0.10 (token bucket) or 0.92 (fixed windows).
//!
//! The state fits in one `u64` (the rate as an `f32`, the lesson's time in
//! 16.8 ms ticks), read with one atomic load per request; a `u32` counts
//! admissions for the first estimate.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Nanoseconds per tick of a lesson's time, as a shift: 2^24 ns = 16.8 ms,
/// so a `u32` of ticks spans 2.3 years.
const TICK_SHIFT: u32 = 24;
const NANOS_PER_SEC: f64 = 1e9;
const TICK_SECS: f64 = (1u64 << TICK_SHIFT) as f64 / NANOS_PER_SEC;

/// A first estimate doubles every this many seconds until the next 429.
const DOUBLING_SECS: f64 = 2.0;
/// After a 429, the pace restarts at this share of the rate that earned it.
const CUT: f64 = 0.8;
/// ...and climbs back, in this many seconds...
const CLIMB_SECS: f64 = 2.0;
/// ...to this share of it, where it holds...
const PLATEAU: f64 = 0.99;
/// ...this many seconds (Power Platform meters in 5-minute windows),
/// before probing upward...
const PROBE_AFTER_SECS: f64 = 300.0;
/// ...by this share of it per second.
const PROBE_PER_SEC: f64 = 0.001;
/// A pace this old is forgotten.
pub(crate) const FORGET_SECS: f64 = 1800.0;
/// How long a server's burst can hide an excess: a 429 `age` seconds after
/// the key resumed means the pace was about `LAG_SECS / age` above what
/// the server allows (a token bucket whose burst is a tenth of a second's
/// rate drains in `age` at that excess). A 429 soon after resuming cuts
/// deep, one after a long quiet spell barely.
const LAG_SECS: f64 = 0.1;
/// Fewest admissions a first estimate is made from: below that, one
/// request more or less would move it by more than a third.
const MIN_SAMPLE: f64 = 10.0;
/// The slowest pace learned: one request a minute (a server slower than
/// that says so with its `Retry-After`, which still pauses the key).
const MIN_RATE: f64 = 1.0 / 60.0;
/// The shortest time a first estimate spreads its admissions over.
const MIN_ESTIMATE_SECS: f64 = 1.0;

/// A key's learned pace, and the count behind its first estimate.
#[derive(Debug)]
pub(crate) struct Pace {
    // High half: the rate (requests/s) as `f32` bits, its sign bit set while
    // it is a first estimate, zero while nothing is learned. Low half: the
    // tick of the lesson, or of the key's arrival before any.
    state: AtomicU64,
    // Requests admitted since that tick (wrapping: only an estimate).
    admitted: AtomicU32,
}

/// What one lesson left.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Lesson {
    /// Requests per second; zero if nothing is learned.
    rate: f64,
    estimate: bool,
    /// Set by a policy the server published, not by its 429s: a later
    /// policy replaces it (see [`published`]).
    published: bool,
    tick: u32,
}

impl Lesson {
    fn unpack(state: u64) -> Self {
        let bits = (state >> 32) as u32;
        Lesson {
            // The rate's lowest mantissa bit marks a published lesson (one
            // part in eight million of the rate).
            rate: f64::from(f32::from_bits(bits & !(1 << 31) & !1)),
            estimate: bits >> 31 == 1,
            published: bits & 1 == 1,
            tick: state as u32,
        }
    }

    fn pack(self) -> u64 {
        // f32 keeps 7 digits, plenty for a pace; clamp so it stays finite.
        let rate = self.rate.clamp(0.0, f64::from(f32::MAX)) as f32;
        let sign = u32::from(self.estimate) << 31;
        let bits = (rate.to_bits() & !1) | u32::from(self.published && rate > 0.0);
        (u64::from(bits | sign) << 32) | u64::from(self.tick)
    }

    /// Seconds from the lesson to `now` (in ns since the epoch); negative
    /// while the pause it came with lasts.
    fn age(&self, now: u64) -> f64 {
        let ticks = tick(now).wrapping_sub(self.tick) as i32;
        f64::from(ticks) * (1u64 << TICK_SHIFT) as f64 / NANOS_PER_SEC
    }

    /// The pace `age` seconds after the lesson, or `None` if there is no
    /// lesson or it is forgotten.
    fn rate_at(&self, age: f64) -> Option<f64> {
        if self.rate <= 0.0 || age >= FORGET_SECS {
            return None;
        }
        Some(self.rate * self.share(age.max(0.0)))
    }

    /// The pace `age` seconds after resuming, as a share of the lesson's rate.
    fn share(&self, age: f64) -> f64 {
        if self.estimate {
            (age / DOUBLING_SECS).exp2()
        } else {
            let climb = (age / CLIMB_SECS).min(1.0);
            let probe = (age - PROBE_AFTER_SECS).max(0.0) * PROBE_PER_SEC;
            CUT + (PLATEAU - CUT) * climb + probe
        }
    }
}

/// `now` (ns since the epoch) in ticks, wrapping.
fn tick(now: u64) -> u32 {
    (now >> TICK_SHIFT) as u32
}

impl Pace {
    /// Nothing learned; `now` starts the count for the first estimate.
    pub(crate) fn new(now: u64) -> Self {
        Pace {
            state: AtomicU64::new(fresh(now)),
            admitted: AtomicU32::new(0),
        }
    }

    /// The pace at `now` in requests per second, if one is learned.
    pub(crate) fn rate(&self, now: u64) -> Option<f64> {
        let state = self.state.load(Ordering::Acquire);
        // Every acquire asks; most keys never learned anything.
        if state >> 32 == 0 {
            return None;
        }
        let lesson = Lesson::unpack(state);
        lesson.rate_at(lesson.age(now))
    }

    /// Nanoseconds between two requests at `now`, if a pace is learned.
    pub(crate) fn interval(&self, now: u64) -> Option<u64> {
        interval_at(self.state.load(Ordering::Acquire), now)
    }

    /// Counts one admission toward the first estimate.
    pub(crate) fn admitted(&self) {
        self.admitted.fetch_add(1, Ordering::Relaxed);
    }

    /// The server published a policy of `rate` requests a second at `now`
    /// (see [`published`]); whether the pace changed.
    pub(crate) fn publish(&self, now: u64, rate: f64, quota_rate: f64) -> bool {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let Some(next) = published(current, now, rate, quota_rate) else {
                return false;
            };
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// The server throttled a request sent at `sent_at` (the 429 arrived at
    /// `now`, both ns since the epoch), asking for `pause` ns; the key's
    /// quota allows `quota_rate` requests a second. Returns the new pace if
    /// this 429 taught one, `None` if its episode was already counted.
    pub(crate) fn throttled(
        &self,
        now: u64,
        sent_at: u64,
        pause: u64,
        quota_rate: f64,
    ) -> Option<f64> {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let admitted = self.admitted.load(Ordering::Relaxed);
            let learned = lesson(current, admitted, now, sent_at, pause, quota_rate)?;
            match self.state.compare_exchange_weak(
                current,
                learned,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.admitted.store(0, Ordering::Relaxed);
                    return rate_of(learned);
                }
                Err(actual) => current = actual,
            }
        }
    }
}

/// A key's pace state (as [`Pace`] keeps it) for a key first seen at `now`
/// that learned nothing yet. The fleet store keeps the same state in Redis.
pub(crate) fn fresh(now: u64) -> u64 {
    Lesson {
        rate: 0.0,
        estimate: false,
        published: false,
        tick: tick(now),
    }
    .pack()
}

/// The lesson's rate in `state`, undecayed: what a lesson set.
pub(crate) fn rate_of(state: u64) -> Option<f64> {
    let rate = Lesson::unpack(state).rate;
    (rate > 0.0).then_some(rate)
}

/// Nanoseconds between two requests at `now` under `state`, if it holds a
/// pace that is not forgotten.
pub(crate) fn interval_at(state: u64, now: u64) -> Option<u64> {
    if state >> 32 == 0 {
        return None;
    }
    let lesson = Lesson::unpack(state);
    let rate = lesson.rate_at(lesson.age(now))?;
    // Rounded up, so the pace is never exceeded; `as` saturates, and an
    // infinite rate (a doubled estimate) is one nanosecond.
    Some(((NANOS_PER_SEC / rate).ceil() as u64).max(1))
}

/// The state after a 429 at `now` on a key in `state`, which admitted
/// `admitted` requests since its last lesson (or arrival), for a request
/// sent at `sent_at` that asked for `pause` ns, under a quota of
/// `quota_rate` requests a second; `None` if it teaches nothing (the same
/// episode as the last lesson, or too few requests for a first estimate).
///
/// Pure, so the in-process [`Pace`] and the fleet store (which keeps the
/// state in Redis and swaps it with a compare-and-set script) learn alike.
pub(crate) fn lesson(
    state: u64,
    admitted: u32,
    now: u64,
    sent_at: u64,
    pause: u64,
    quota_rate: f64,
) -> Option<u64> {
    // The lesson dates from when the key sends again: its climb (or
    // doubling) starts there, and a request sent before is of this
    // episode.
    let resume = tick(now.saturating_add(pause));
    let lesson = Lesson::unpack(state);
    let age = lesson.age(now);
    let learned = match lesson.rate_at(age) {
        // Sent no later than the lesson's tick: the same episode.
        Some(_) if (tick(sent_at).wrapping_sub(lesson.tick) as i32) <= 0 => return None,
        Some(rate) => {
            // The pace at the 429, less what the server's burst may
            // have hidden...
            let edge = rate / (1.0 + LAG_SECS / age.max(LAG_SECS));
            Lesson {
                rate: edge.min(quota_rate),
                estimate: false,
                published: false,
                tick: resume,
            }
        }
        None => {
            let count = f64::from(admitted);
            if count < MIN_SAMPLE {
                // Too few requests to tell a rate: the cool-down
                // alone holds the key, and the count goes on.
                return None;
            }
            // The server let through at most `count` over the time
            // it was sent in, and at least that over the time plus
            // the pause it asked for: between the two, geometrically.
            let sent_in = age.max(TICK_SECS);
            let spread = sent_in + (pause as f64 / NANOS_PER_SEC).max(MIN_ESTIMATE_SECS);
            Lesson {
                rate: (count / (sent_in * spread).sqrt()).min(quota_rate),
                estimate: true,
                published: false,
                tick: resume,
            }
        }
    };
    Some(
        Lesson {
            rate: learned.rate.max(MIN_RATE),
            ..learned
        }
        .pack(),
    )
}

/// How often a published policy that has not changed refreshes its
/// lesson, in seconds: well within the probe's wait and the forgetting, so
/// that while a server publishes its policy the pace neither probes above
/// it nor is forgotten, without a write per response.
const PUBLISHED_REFRESH_SECS: f64 = 60.0;

/// The state after a response at `now` published a policy of `rate`
/// requests a second (its quota over its window), under a quota of
/// `quota_rate`; `None` if nothing changes.
///
/// A published policy is a lesson that needs no 429: the key is paced at
/// 99% of it at once (the plateau a lesson climbs to), sent evenly, so a
/// server counting in windows or a leaky bucket never sees a burst it did
/// not announce. A later policy replaces it, and a first 429's rough
/// estimate gives way to it; a pace the server's 429s taught that is
/// slower is kept: those 429s say the policy is not the whole story
/// (another client may share the quota).
pub(crate) fn published(state: u64, now: u64, rate: f64, quota_rate: f64) -> Option<u64> {
    if !rate.is_finite() || rate <= 0.0 {
        return None;
    }
    let rate = rate.max(MIN_RATE).min(quota_rate);
    let lesson = Lesson::unpack(state);
    let age = lesson.age(now);
    if let Some(current) = lesson.rate_at(age) {
        if lesson.published {
            let same = (lesson.rate - rate).abs() <= rate * 1e-6;
            if same && age < PUBLISHED_REFRESH_SECS {
                return None;
            }
        } else if !lesson.estimate && current < rate * PLATEAU {
            // A pace the 429s taught, slower than the policy: they know
            // better (another client may share the quota).
            return None;
        }
    }
    // Dated as if it had climbed already: the plateau from now on.
    let climbed = (CLIMB_SECS / TICK_SECS).ceil() as u32;
    Some(
        Lesson {
            rate,
            estimate: false,
            published: true,
            tick: tick(now).wrapping_sub(climbed),
        }
        .pack(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= b.abs() * 0.01
    }

    #[test]
    fn a_published_policy_paces_at_once_and_a_slower_lesson_stays() {
        let fresh = fresh(0);
        // 50 a second published: 99% of it from now on.
        let state = published(fresh, SEC, 50.0, 1e9).unwrap();
        assert!(close(interval_at(state, SEC).unwrap() as f64, 1e9 / 49.5));
        // The same policy again soon: nothing to write.
        assert_eq!(published(state, 2 * SEC, 50.0, 1e9), None);
        // A minute on, refreshed: no probing above it, no forgetting.
        let later = 400 * SEC;
        let refreshed = published(state, later, 50.0, 1e9).unwrap();
        assert!(close(
            interval_at(refreshed, later).unwrap() as f64,
            1e9 / 49.5
        ));
        // A faster policy replaces it; never faster than the quota.
        let faster = published(state, 3 * SEC, 80.0, 60.0).unwrap();
        assert!(close(rate_of(faster).unwrap(), 60.0));
        // And a slower one too.
        let slower = published(faster, 4 * SEC, 20.0, 1e9).unwrap();
        assert!(close(rate_of(slower).unwrap(), 20.0));
        // A 429 taught 30/s: a policy of 50/s does not undo it.
        let taught = Lesson {
            rate: 30.0,
            estimate: false,
            published: false,
            tick: tick(SEC),
        }
        .pack();
        assert_eq!(published(taught, 10 * SEC, 50.0, 1e9), None);
        // Nonsense rates change nothing.
        assert_eq!(published(fresh, SEC, f64::NAN, 1e9), None);
        assert_eq!(published(fresh, SEC, 0.0, 1e9), None);
    }

    #[test]
    fn nothing_is_learned_until_a_429() {
        let pace = Pace::new(0);
        assert_eq!(pace.rate(0), None);
        assert_eq!(pace.interval(100 * SEC), None);
    }

    #[test]
    fn the_first_429_estimates_over_the_time_and_the_pause() {
        let pace = Pace::new(0);
        for _ in 0..300 {
            pace.admitted();
        }
        // 300 admitted in 2 s, and the server asks for 1 s more: between
        // 100/s (300 in 3 s) and 150/s (in 2 s), geometrically.
        let rate = pace.throttled(2 * SEC, 2 * SEC, SEC, 1e9).unwrap();
        assert!(close(rate, 300.0 / 6f64.sqrt()), "{rate}");
        // Then, from the end of the pause, it doubles every 2 s until the
        // next 429.
        assert!(close(pace.rate(3 * SEC).unwrap(), rate));
        assert!(close(pace.rate(5 * SEC).unwrap(), 2.0 * rate));
        // Sent within a tick, with no pause: over a tick, and a tick and a
        // second.
        let pace = Pace::new(0);
        admit(&pace, 10);
        let rate = pace.throttled(0, 0, 0, 1e9).unwrap();
        let expected = 10.0 / (TICK_SECS * (TICK_SECS + 1.0)).sqrt();
        assert!(close(rate, expected), "{rate}");
    }

    #[test]
    fn too_few_requests_teach_nothing() {
        let pace = Pace::new(0);
        admit(&pace, 9);
        assert_eq!(pace.throttled(SEC, SEC, 10 * SEC, 1e9), None);
        assert_eq!(pace.rate(SEC), None);
        // The count goes on: the tenth request makes an estimate.
        admit(&pace, 1);
        let rate = pace.throttled(2 * SEC, 2 * SEC, 10 * SEC, 1e9).unwrap();
        assert!(close(rate, 10.0 / 24f64.sqrt()), "{rate}");
    }

    fn admit(pace: &Pace, n: u32) {
        for _ in 0..n {
            pace.admitted();
        }
    }

    fn close_to(a: f64, b: f64) -> bool {
        (a - b).abs() <= b.abs() * 0.001
    }

    /// A pace learned as a first estimate at 0 s, no pause, and its rate.
    fn estimated() -> (Pace, f64) {
        let pace = Pace::new(0);
        admit(&pace, 100);
        let rate = pace.throttled(0, 0, 0, 1e9).unwrap();
        (pace, rate)
    }

    #[test]
    fn later_429s_cut_climb_hold_and_probe() {
        let (pace, estimate) = estimated();
        let at = 10 * SEC;
        let rate = pace.throttled(at, at - SEC / 10, 0, 1e9).unwrap();
        // Doubled five times, less a 1% lag allowance for a 429 10 s in.
        assert!(close_to(rate, estimate * 32.0 / 1.01), "{rate}");
        let share = |s: f64| pace.rate(at + (s * 1e9) as u64).unwrap() / rate;
        assert!(close(share(0.0), CUT));
        assert!(close(share(1.0), (CUT + PLATEAU) / 2.0));
        assert!(close(share(2.0), PLATEAU));
        assert!(close(share(PROBE_AFTER_SECS - 1.0), PLATEAU));
        assert!(close(share(PROBE_AFTER_SECS + 10.0), PLATEAU + 0.01));
        assert_eq!(pace.rate(at + (FORGET_SECS as u64 + 1) * SEC), None);
    }

    #[test]
    fn a_429_soon_after_resuming_cuts_deeper() {
        let (soon, _) = estimated();
        let (late, _) = estimated();
        // Same pace met (the estimate, doubled once), at 2 s vs 60 s:
        // what the server's burst may have hidden is 5% vs 0.17%.
        let met = |pace: &Pace, at: u64| pace.rate(at).unwrap();
        let at_soon = met(&soon, 2 * SEC);
        let cut_soon = soon.throttled(2 * SEC, SEC, 0, 1e9).unwrap() / at_soon;
        assert!(close_to(cut_soon, 1.0 / 1.05), "{cut_soon}");
        let at_late = met(&late, 60 * SEC);
        let cut_late = late.throttled(60 * SEC, SEC, 0, f64::MAX).unwrap() / at_late;
        assert!(close_to(cut_late, 1.0 / (1.0 + 0.1 / 60.0)), "{cut_late}");
    }

    #[test]
    fn the_climb_starts_when_the_pause_ends() {
        let (pace, _) = estimated();
        let rate = pace.throttled(4 * SEC, 3 * SEC, 10 * SEC, 1e9).unwrap();
        // Held at the cut through the 10 s pause, then climbing.
        assert!(close(pace.rate(5 * SEC).unwrap(), CUT * rate));
        assert!(close(pace.rate(14 * SEC).unwrap(), CUT * rate));
        assert!(close(pace.rate(16 * SEC).unwrap(), PLATEAU * rate));
        // Requests sent during the pause would be of the same episode.
        assert_eq!(pace.throttled(15 * SEC, 13 * SEC, 0, 1e9), None);
        assert!(pace
            .throttled(15 * SEC, 14 * SEC + SEC / 10, 0, 1e9)
            .is_some());
    }

    #[test]
    fn one_lesson_per_episode() {
        let pace = Pace::new(0);
        admit(&pace, 10);
        assert!(pace.throttled(5 * SEC, 4 * SEC, 0, 1e9).is_some());
        // The crowd sent before that lesson: no new lesson.
        assert_eq!(pace.throttled(6 * SEC, 4 * SEC, 0, 1e9), None);
        assert_eq!(pace.throttled(6 * SEC, 5 * SEC, 0, 1e9), None);
        // A request sent after it: a new lesson.
        assert!(pace.throttled(7 * SEC, 6 * SEC, 0, 1e9).is_some());
    }

    #[test]
    fn the_quota_caps_what_is_learned() {
        let pace = Pace::new(0);
        for _ in 0..10_000 {
            pace.admitted();
        }
        assert_eq!(pace.throttled(0, 0, 0, 50.0), Some(50.0));
        assert_eq!(pace.throttled(SEC, SEC, 0, 20.0), Some(20.0));
    }

    #[test]
    fn a_forgotten_pace_is_learned_afresh() {
        let pace = Pace::new(0);
        admit(&pace, 10);
        pace.throttled(0, 0, 0, 1e9).unwrap();
        let later = (FORGET_SECS as u64 + 10) * SEC;
        assert_eq!(pace.rate(later), None);
        admit(&pace, 10);
        // The next 429 is a first estimate again, even if "sent before".
        assert!(pace.throttled(later, 0, 0, 1e9).is_some());
        assert!(Lesson::unpack(pace.state.load(Ordering::Relaxed)).estimate);
    }

    proptest! {
        /// Hostile inputs: any times, pauses, counts and quota rates give a
        /// finite pace within [MIN_RATE, quota] and an interval >= 1 ns.
        #[test]
        fn any_input_gives_a_finite_pace(
            arrivals in proptest::collection::vec(
                (any::<u64>(), any::<u64>(), any::<u64>(), 0u32..100_000), 1..20),
            quota_rate in 1e-9f64..1e10,
        ) {
            let pace = Pace::new(0);
            for (now, sent_at, pause, admitted) in arrivals {
                for _ in 0..admitted % 1_000 {
                    pace.admitted();
                }
                if let Some(rate) = pace.throttled(now, sent_at, pause, quota_rate) {
                    prop_assert!(rate.is_finite());
                    prop_assert!(rate >= MIN_RATE.min(quota_rate) * 0.999);
                    prop_assert!(rate <= quota_rate.max(MIN_RATE) * 1.001);
                }
                if let Some(interval) = pace.interval(now) {
                    prop_assert!(interval >= 1);
                }
            }
        }
    }
}
