//! A connection's pace, learned from its server's 429s.
//!
//! A cool-down is only as good as the server's `Retry-After`. A token-bucket
//! server that means "10 ms" but rounds up to "1 s" idles the connection
//! for the second; then every request that waited goes at once, overruns
//! the server's burst, and earns the next 429: 10% of the server's capacity
//! without a quota (`benches/throttled.rs`). So a 429 also teaches the
//! connection a **pace**, requests per second sent evenly, just below the
//! rate that earned it. Time `s` counts from when the key sends again (the
//! end of its pause); `r` is the rate learned:
//!
//! - the **first** 429 (the key is a herd: nothing spaced its requests)
//!   pauses the key for all of its `Retry-After`, and gives an estimate
//!   from the `n` requests admitted since the key was first seen (at least
//!   10, else the 429 only pauses the key) in `d` seconds: the server let
//!   through at most `n / d` and at least `n / (d + pause)` (the pause it
//!   asked for, at least a second); the estimate is their geometric mean.
//!   Rough, so it **doubles every 0.5 s** (TCP's slow start) until the
//!   next 429 calls it: `r` is then the pace of 0.25 s before that 429
//!   (the doubling ran over the server's rate about that long before its
//!   burst was spent);
//! - every later 429 takes the pace it met, less what the server's burst
//!   may have hidden (`LAG_SECS / s`: a 429 a second after resuming means
//!   the pace was ~10% too fast, one after a minute barely), or **what the
//!   server accepted** over the last second if that is less (a window
//!   server's limit, whatever was sent: see `meter`; only once the key
//!   has sent for a second since its last lesson), as `r`; a 429 within
//!   0.1 s of resuming teaches nothing: the server is still in the last
//!   episode (a window not yet over), and the key waits a quarter of the
//!   `Retry-After` more;
//! - a paced key is no herd: a later 429 pauses it only for the share of
//!   the `Retry-After` that was excess (`1 - r / pace met`: a few ms after
//!   a pace 1% too fast), instead of a whole rounded-up second of silence.
//!   The pace restarts at 90% of `r`, climbs back within a second to 99.5%
//!   of `r`, holds there 5 s, then **probes** upward, doubling every 20 s
//!   (3.5% a second), until the next 429: a pace cut too deep is back
//!   within seconds. The pace of a probe's 429 is taken as it was when
//!   the probe passed the server's rate (a burst of 25 ms of it is spent
//!   in ~1.2 s at that climb). Each lesson within 5% of the last doubles
//!   the hold (up to 10 minutes), so a settled pace rarely probes; the
//!   lesson that ends a doubling is rough and probes as soon as it has
//!   climbed, 15% a second;
//! - 30 minutes without a 429 and the pace is **forgotten**: the key runs at
//!   its quota again, and may be dropped from the store.
//!
//! Only the first 429 of an episode teaches: a response to a request sent
//! before the last lesson took effect (the rest of the crowd that earned
//! it) is ignored, as TCP cuts its window once per loss event.
//!
//! Against the four kinds of server in `tests/learning.rs` (500/s per
//! connection; 2 connections, 5 and 30 seconds of leads), the default stack
//! reaches 0.73-0.84 of capacity in 5 s and 0.93-0.96 in 30 s.
//!
//! The state fits in one `u64` (the rate as an `f32`, the lesson's time in
//! 16.8 ms ticks), read with one atomic load per request; a second `u64`
//! holds the meter's counts.

use std::sync::atomic::{AtomicU64, Ordering};

use super::meter::Counts;

/// Nanoseconds per tick of a lesson's time, as a shift: 2^24 ns = 16.8 ms,
/// so a `u32` of ticks spans 2.3 years.
const TICK_SHIFT: u32 = 24;
const NANOS_PER_SEC: f64 = 1e9;
const TICK_SECS: f64 = (1u64 << TICK_SHIFT) as f64 / NANOS_PER_SEC;

/// A first estimate doubles every this many seconds until the next 429
/// (as TCP's slow start doubles its window every round trip)...
const DOUBLING_SECS: f64 = 0.5;
/// ...for this long at most (a million times the estimate), after which
/// it is forgotten: the next 429 is a herd's first again.
const ESTIMATE_FORGET_SECS: f64 = 10.0;
/// The 429 that ends the doubling met a pace the server's burst let run
/// over its rate for about this long: the lesson takes the pace of then.
const DOUBLING_LAG_SECS: f64 = 0.25;
/// After a 429, the pace restarts at this share of the rate it learned
/// (its short pause already drained what the excess queued)...
const CUT: f64 = 0.9;
/// ...and climbs back, in this many seconds...
const CLIMB_SECS: f64 = 1.0;
/// ...to this share of it, where it holds...
const PLATEAU: f64 = 0.995;
/// ...this many seconds, before probing upward...
const HOLD_SECS: f64 = 5.0;
/// ...doubling every this many seconds (3.5% a second): a pace cut too
/// deep is back within seconds, a right one meets its next 429 at a few
/// percent over.
const PROBE_DOUBLING_SECS: f64 = 20.0;
/// The burst a server is taken to have, in seconds of its rate: how long
/// a pace may run over that rate unseen (nginx's `burst=20` at 500/s is
/// 0.04 s).
const BURST_SECS: f64 = 0.025;
/// After a rough lesson, a probe doubles the pace every this many seconds
/// (15% a second), with no hold first.
const ROUGH_PROBE_DOUBLING_SECS: f64 = 5.0;
/// A 429 that comes before a key resumed long enough to be measured waits
/// this share of its `Retry-After`: its server is still in the episode
/// the last lesson paused for (a window not over yet).
const RECOVERING_DIVISOR: u64 = 4;
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
    // What the server accepted lately, and admissions since the lesson.
    meter: AtomicU64,
}

/// The low mantissa bits of a packed rate that hold a lesson's flags
/// (published, rough, and three bits of how settled it is): parts in a
/// quarter million of the rate.
const FLAGS: u32 = 0b11111;
/// The most a pace settles: a hold of 5 s doubled 7 times, 10 minutes.
const MAX_SETTLED: u32 = 7;
/// A published policy paces at this share of it, from its first response
/// on, and never probes above it (the server's word): HAProxy's sliding
/// estimate refuses requests sent at exactly its limit.
const PUBLISHED_SHARE: f64 = 0.99;
/// A lesson within this share of the last one confirms it.
const CONFIRMS: f64 = 0.05;

/// What one lesson left.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Lesson {
    /// Requests per second; zero if nothing is learned.
    rate: f64,
    estimate: bool,
    /// Set by a policy the server published, not by its 429s: a later
    /// policy replaces it (see [`published`]).
    published: bool,
    /// Set when the lesson ended a first estimate's doubling: only roughly
    /// the server's rate, so it probes without holding first.
    rough: bool,
    /// How many lessons in a row found about the same rate (at most
    /// `MAX_SETTLED`): each doubles the hold before the next probe.
    settled: u32,
    tick: u32,
}

impl Lesson {
    fn unpack(state: u64) -> Self {
        let bits = (state >> 32) as u32;
        Lesson {
            // The rate's five lowest mantissa bits hold the flags (see
            // FLAGS: parts in a quarter million of the rate).
            rate: f64::from(f32::from_bits(bits & !(1 << 31) & !FLAGS)),
            estimate: bits >> 31 == 1,
            published: bits & 1 == 1,
            rough: bits & 2 == 2,
            settled: (bits & FLAGS) >> 2,
            tick: state as u32,
        }
    }

    fn pack(self) -> u64 {
        // f32 keeps 7 digits, plenty for a pace; clamp so it stays finite.
        let rate = self.rate.clamp(0.0, f64::from(f32::MAX)) as f32;
        let sign = u32::from(self.estimate) << 31;
        let flags = u32::from(self.published)
            | u32::from(self.rough) << 1
            | self.settled.min(MAX_SETTLED) << 2;
        let bits = (rate.to_bits() & !FLAGS) | if rate > 0.0 { flags } else { 0 };
        (u64::from(bits | sign) << 32) | u64::from(self.tick)
    }

    /// Seconds from the lesson to `now` (in ns since the epoch); negative
    /// while the pause it came with lasts.
    fn age(&self, now: u64) -> f64 {
        let ticks = tick(now).wrapping_sub(self.tick) as i32;
        f64::from(ticks) * (1u64 << TICK_SHIFT) as f64 / NANOS_PER_SEC
    }

    /// Seconds a probe takes to double the pace: faster after a rough
    /// lesson, which may be well under the server's rate.
    fn probe_doubling(&self) -> f64 {
        if self.rough {
            ROUGH_PROBE_DOUBLING_SECS
        } else {
            PROBE_DOUBLING_SECS
        }
    }

    /// How long a probe's pace ran over the server's rate before its 429:
    /// until a burst of BURST_SECS of the rate is spent at the probe's
    /// climb (`sqrt(2 * burst / climb)`).
    fn probe_lag(&self) -> f64 {
        let climb = std::f64::consts::LN_2 / self.probe_doubling();
        (2.0 * BURST_SECS / climb).sqrt()
    }

    /// The pace `age` seconds after the lesson, or `None` if there is no
    /// lesson or it is forgotten.
    fn rate_at(&self, age: f64) -> Option<f64> {
        if self.rate <= 0.0 || age >= FORGET_SECS {
            return None;
        }
        if self.estimate && age >= ESTIMATE_FORGET_SECS {
            // Doubled past any server's rate without meeting a 429: the
            // key's demand stayed under it. Nothing learned.
            return None;
        }
        Some(self.rate * self.share(age.max(0.0)))
    }

    /// The pace `age` seconds after resuming, as a share of the lesson's rate.
    fn share(&self, age: f64) -> f64 {
        if self.estimate {
            return (age / DOUBLING_SECS).exp2();
        }
        if self.published {
            // The server's word: no climb, no probing above it.
            return PUBLISHED_SHARE;
        }
        let climb = (age / CLIMB_SECS).min(1.0);
        let plateau = CUT + (PLATEAU - CUT) * climb;
        let hold = if self.rough {
            0.0
        } else {
            HOLD_SECS * f64::from(1u32 << self.settled.min(MAX_SETTLED))
        };
        let probing = age - CLIMB_SECS - hold;
        if probing <= 0.0 {
            return plateau;
        }
        plateau * (probing / self.probe_doubling()).exp2()
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
            meter: AtomicU64::new(Counts::fresh(now).0),
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

    /// Counts one admission at `now`: toward the first estimate, and in the
    /// meter of what the server accepts.
    pub(crate) fn admitted(&self, now: u64) {
        let _ = self
            .meter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |counts| {
                Some(Counts(counts).sent(now).0)
            });
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
    /// this 429 taught one (`None` if its episode was already counted, or
    /// it came too soon after the key resumed), and the pause to apply in
    /// ns (see [`lesson`]).
    pub(crate) fn throttled(
        &self,
        now: u64,
        sent_at: u64,
        pause: u64,
        quota_rate: f64,
    ) -> (Option<f64>, u64) {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let counts = Counts(self.meter.load(Ordering::Relaxed));
            let verdict = lesson(current, counts, now, sent_at, pause, quota_rate);
            let Some(next) = verdict.state else {
                if verdict.counted {
                    let _ =
                        self.meter
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |counts| {
                                Some(Counts(counts).refused(now).0)
                            });
                }
                return (None, verdict.pause);
            };
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    // What the key sends from its resumption on is
                    // measured against the new pace.
                    let resume = now.saturating_add(verdict.pause);
                    self.meter.store(Counts::fresh(resume).0, Ordering::Relaxed);
                    let learned = rate_of(next).filter(|_| verdict.taught);
                    return (learned, verdict.pause);
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
        rough: false,
        settled: 0,
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

/// What a 429 at `now` does to a key in `state` whose meter reads `counts`
/// (what the server accepted lately, admissions since the last lesson or
/// arrival), for a request sent at `sent_at` that asked for `pause` ns,
/// under a quota of `quota_rate` requests a second: the key's new state,
/// if any (a lesson, or the same pace re-dated to wait longer), and the
/// pause to apply (all of it for a herd's first 429, the excess's share
/// for a paced key's, nothing for the rest of an episode's crowd).
///
/// Pure, so the in-process [`Pace`] and the fleet store (which keeps the
/// state in Redis and swaps it with a compare-and-set script) learn alike.
pub(crate) fn lesson(
    state: u64,
    counts: Counts,
    now: u64,
    sent_at: u64,
    pause: u64,
    quota_rate: f64,
) -> Verdict {
    let lesson = Lesson::unpack(state);
    let age = lesson.age(now);
    let (learned, pause) = match lesson.rate_at(age) {
        // Sent no later than the lesson's tick: the same episode (for a
        // published policy, the crowd sent before it was read).
        Some(_) if (tick(sent_at).wrapping_sub(lesson.tick) as i32) <= 0 => {
            return Verdict::nothing(0, false);
        }
        // A published policy's lesson is dated when it was read, not when
        // the key resumed: no window of the server's to wait out.
        Some(_) if !lesson.published && lesson.age(sent_at) < LAG_SECS => {
            // Sent too soon after the key resumed to have overrun
            // anything: the server is still in the last episode (its
            // window not over yet). Wait longer, from now on, and learn
            // nothing.
            let pause = pause / RECOVERING_DIVISOR;
            let redated = Lesson {
                tick: tick(now.saturating_add(pause)),
                ..lesson
            };
            return Verdict {
                state: Some(redated.pack()),
                taught: false,
                pause,
                counted: true,
            };
        }
        Some(rate) => {
            // What the pace was, as far as the quota let it be.
            let met = rate.min(quota_rate);
            // The pace of the 429, less what the server's burst may have
            // hidden: a doubling ran over for about DOUBLING_LAG_SECS; a
            // steady pace, by LAG_SECS / age (a 429 a second after
            // resuming means ~10% too fast, one after a minute barely)...
            let mut edge = if lesson.estimate {
                met / (DOUBLING_LAG_SECS / DOUBLING_SECS).exp2()
            } else {
                // A probe ran over for about `probe_lag` before the
                // burst was spent: the pace of then.
                let sent_age = lesson.age(sent_at);
                let before = lesson.rate_at(sent_age - lesson.probe_lag()).unwrap_or(met);
                (met / (1.0 + LAG_SECS / age.max(LAG_SECS))).min(before)
            };
            // ...or what the server accepted over the last second, if
            // less: a window server's limit, whatever was sent. Not while
            // doubling: that second's average is the doubling's, not the
            // server's.
            if let Some(accepted) = counts.rate(now, age).filter(|_| !lesson.estimate) {
                edge = edge.min(accepted);
            }
            // A paced key is no herd: it pauses only for the share of the
            // wait its excess over the edge may have cost the server (all
            // of it if that share cannot be told).
            let share = 1.0 - edge / met;
            let share = if share.is_finite() {
                share.clamp(0.0, 1.0)
            } else {
                1.0
            };
            let pause = (pause as f64 * share) as u64;
            (
                Lesson {
                    rate: edge.min(quota_rate),
                    estimate: false,
                    published: false,
                    rough: lesson.estimate,
                    // About the rate the last lesson found: hold it longer.
                    settled: if !lesson.estimate
                        && (edge - lesson.rate).abs() <= CONFIRMS * lesson.rate
                    {
                        lesson.settled + 1
                    } else {
                        0
                    },
                    tick: tick(now.saturating_add(pause)),
                },
                pause,
            )
        }
        None => {
            let count = f64::from(counts.since());
            if count < MIN_SAMPLE {
                // Too few requests to tell a rate: the cool-down
                // alone holds the key, and the count goes on.
                return Verdict::nothing(pause, true);
            }
            // The server let through at most `count` over the time
            // it was sent in, and at least that over the time plus
            // the pause it asked for: between the two, geometrically.
            let sent_in = age.max(TICK_SECS);
            let spread = sent_in + (pause as f64 / NANOS_PER_SEC).max(MIN_ESTIMATE_SECS);
            let mut first = count / (sent_in * spread).sqrt();
            if counts.since() == u32::from(u16::MAX) {
                // The count saturated: what the server accepted over the
                // last second (all of it, before this first 429) says more.
                if let Some(accepted) = counts.rate(now, age) {
                    first = accepted;
                }
            }
            (
                Lesson {
                    rate: first.min(quota_rate),
                    estimate: true,
                    published: false,
                    rough: false,
                    settled: 0,
                    tick: tick(now.saturating_add(pause)),
                },
                pause,
            )
        }
    };
    let state = Lesson {
        rate: learned.rate.max(MIN_RATE),
        ..learned
    }
    .pack();
    Verdict {
        state: Some(state),
        taught: true,
        pause,
        counted: true,
    }
}

/// What a 429 does to its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// The key's pace state after it, if it changes.
    pub(crate) state: Option<u64>,
    /// Whether that state is a lesson (a new pace), not the same pace
    /// waiting longer.
    pub(crate) taught: bool,
    /// Nanoseconds to pause the key from the 429 on.
    pub(crate) pause: u64,
    /// Whether the refused request was counted by the key's meter (sent
    /// after its last lesson).
    pub(crate) counted: bool,
}

impl Verdict {
    /// No change to the key's pace, a pause of `pause` ns.
    fn nothing(pause: u64, counted: bool) -> Self {
        Verdict {
            state: None,
            taught: false,
            pause,
            counted,
        }
    }
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
/// 99% of it at once (`PUBLISHED_SHARE`), sent evenly, so a
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
        } else if !lesson.estimate && current < rate * PUBLISHED_SHARE {
            // A pace the 429s taught, slower than the policy: they know
            // better (another client may share the quota).
            return None;
        }
    }
    // Its share is the same at any age (see `Lesson::share`): no climb.
    Some(
        Lesson {
            rate,
            estimate: false,
            published: true,
            rough: false,
            settled: 0,
            tick: tick(now),
        }
        .pack(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    /// The pace a 429 taught, if any.
    fn learn(pace: &Pace, now: u64, sent_at: u64, pause: u64, quota_rate: f64) -> Option<f64> {
        pace.throttled(now, sent_at, pause, quota_rate).0
    }

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
            rough: false,
            settled: 0,
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
            pace.admitted(0);
        }
        // 300 admitted in 2 s, and the server asks for 1 s more: between
        // 100/s (300 in 3 s) and 150/s (in 2 s), geometrically.
        let rate = learn(&pace, 2 * SEC, 2 * SEC, SEC, 1e9).unwrap();
        assert!(close(rate, 300.0 / 6f64.sqrt()), "{rate}");
        // Then, from the end of the pause, it doubles every 0.5 s until the
        // next 429.
        assert!(close(pace.rate(3 * SEC).unwrap(), rate));
        let doubled = 3 * SEC + (DOUBLING_SECS * 1e9) as u64;
        assert!(close(pace.rate(doubled).unwrap(), 2.0 * rate));
        // Sent within a tick, with no pause: over a tick, and a tick and a
        // second.
        let pace = Pace::new(0);
        admit(&pace, 10);
        let rate = learn(&pace, 0, 0, 0, 1e9).unwrap();
        let expected = 10.0 / (TICK_SECS * (TICK_SECS + 1.0)).sqrt();
        assert!(close(rate, expected), "{rate}");
    }

    #[test]
    fn too_few_requests_teach_nothing() {
        let pace = Pace::new(0);
        admit(&pace, 9);
        assert_eq!(learn(&pace, SEC, SEC, 10 * SEC, 1e9), None);
        assert_eq!(pace.rate(SEC), None);
        // The count goes on: the tenth request makes an estimate.
        admit(&pace, 1);
        let rate = learn(&pace, 2 * SEC, 2 * SEC, 10 * SEC, 1e9).unwrap();
        assert!(close(rate, 10.0 / 24f64.sqrt()), "{rate}");
    }

    fn admit(pace: &Pace, n: u32) {
        for _ in 0..n {
            pace.admitted(0);
        }
    }

    fn close_to(a: f64, b: f64) -> bool {
        (a - b).abs() <= b.abs() * 0.001
    }

    /// A pace learned as a first estimate at 0 s, no pause, and its rate.
    fn estimated() -> (Pace, f64) {
        let pace = Pace::new(0);
        admit(&pace, 100);
        let rate = learn(&pace, 0, 0, 0, 1e9).unwrap();
        (pace, rate)
    }

    /// A pace learned from a 429 a second into the estimate's doubling
    /// (no pause), at 1 s, and its rate.
    fn taught() -> (Pace, f64) {
        let (pace, _) = estimated();
        admit(&pace, 10);
        let rate = learn(&pace, SEC, SEC - SEC / 10, 0, 1e9).unwrap();
        (pace, rate)
    }

    /// A steady (not rough) pace: a lesson at 3 s after the rough one, and
    /// its time and rate.
    fn steady() -> (Pace, u64, f64) {
        let (pace, _) = taught();
        admit(&pace, 10);
        let at = 3 * SEC;
        let rate = learn(&pace, at, at - SEC / 10, 0, 1e9).unwrap();
        (pace, at, rate)
    }

    #[test]
    fn a_confirmed_pace_holds_longer_and_a_rough_one_probes_at_once() {
        let learned = |state: u64, at: u64| {
            // 500 a second sent since the lesson, all accepted.
            let from = u64::from(Lesson::unpack(state).tick) << TICK_SHIFT;
            let mut counts = Counts::fresh(from);
            for i in 0..(at - from) / (SEC / 500) {
                counts = counts.sent(from + i * SEC / 500);
            }
            lesson(state, counts, at, at - 1, 0, 1e9).state.unwrap()
        };
        let first = Lesson {
            rate: 500.0,
            estimate: false,
            published: false,
            rough: false,
            settled: 0,
            tick: 0,
        };
        // A 429 while holding at 99.5% of 500: 2% under it, a confirmation.
        let again = Lesson::unpack(learned(first.pack(), 4 * SEC));
        assert_eq!(again.settled, 1);
        assert!(close(
            again.share(CLIMB_SECS + 2.0 * HOLD_SECS - 0.1),
            PLATEAU
        ));
        let resumed = u64::from(again.tick) << TICK_SHIFT;
        let settled = Lesson::unpack(learned(again.pack(), resumed + 4 * SEC));
        assert_eq!(settled.settled, 2);
        // One far off starts over.
        let cut = Lesson {
            rate: 2_000.0,
            ..again
        };
        assert_eq!(Lesson::unpack(learned(cut.pack(), 10 * SEC)).settled, 0);
        // A lesson that ends a doubling is rough: it probes after the climb,
        // 15% a second.
        let rough = Lesson {
            rough: true,
            ..first
        };
        let share = rough.share(CLIMB_SECS + ROUGH_PROBE_DOUBLING_SECS);
        assert!(close(share, 2.0 * PLATEAU), "{share}");
    }

    #[test]
    fn the_doubling_ends_at_the_pace_of_a_moment_before() {
        let (pace, estimate) = estimated();
        let at = SEC;
        // Doubled twice in the second (less a tick's rounding)...
        let met = pace.rate(at).unwrap();
        assert!(close(met, estimate * 4.0 / 1.014), "{met} {estimate}");
        // ...then taken back by DOUBLING_LAG_SECS.
        admit(&pace, 10);
        let (rate, pause) = pace.throttled(at, at - SEC / 10, SEC, 1e9);
        let rate = rate.unwrap();
        assert!(close_to(rate, met / 2f64.sqrt()), "{rate}");
        // It pauses for the share of the 1 s it asked that was excess.
        let share = 1.0 - 1.0 / 2f64.sqrt();
        assert!(close_to(pause as f64, 1e9 * share), "{pause}");
    }

    #[test]
    fn later_429s_cut_climb_hold_and_probe() {
        let (pace, at, rate) = steady();
        let lesson = Lesson::unpack(pace.state.load(Ordering::Relaxed));
        assert!(!lesson.rough && !lesson.estimate);
        let hold = HOLD_SECS * f64::from(1u32 << lesson.settled);
        let share = |s: f64| pace.rate(at + (s * 1e9) as u64).unwrap() / rate;
        assert!(close(share(0.0), CUT));
        assert!(close(share(CLIMB_SECS / 2.0), (CUT + PLATEAU) / 2.0));
        assert!(close(share(CLIMB_SECS), PLATEAU));
        assert!(close(share(CLIMB_SECS + hold - 0.1), PLATEAU));
        let probed = CLIMB_SECS + hold + PROBE_DOUBLING_SECS;
        assert!(close(share(probed), 2.0 * PLATEAU));
        assert_eq!(pace.rate(at + (FORGET_SECS as u64 + 1) * SEC), None);
    }

    #[test]
    fn a_429_soon_after_resuming_cuts_deeper() {
        let (soon, at, _) = steady();
        let (late, _, _) = steady();
        // A 429 at 2 s vs 5.5 s after the lesson (before any probe): what
        // the server's burst may have hidden is 5% vs 1.8% of the pace met.
        let met = |pace: &Pace, at: u64| pace.rate(at).unwrap();
        let at_soon = at + 2 * SEC;
        let met_soon = met(&soon, at_soon);
        admit(&soon, 10);
        let cut_soon = learn(&soon, at_soon, at_soon - 1, 0, 1e9).unwrap() / met_soon;
        assert!(close_to(cut_soon, 1.0 / 1.05), "{cut_soon}");
        let at_late = at + 5 * SEC + SEC / 2;
        let met_late = met(&late, at_late);
        admit(&late, 10);
        let cut_late = learn(&late, at_late, at_late - 1, 0, f64::MAX).unwrap() / met_late;
        assert!(close_to(cut_late, 1.0 / (1.0 + 0.1 / 5.5)), "{cut_late}");
    }

    #[test]
    fn what_the_server_accepted_caps_the_lesson() {
        let (pace, _) = taught();
        // From the lesson on, 500 requests a second for 1.5 s, all
        // accepted (fewer than the pace allows), then a 429.
        let mut now = SEC;
        for i in 0..750 {
            now = SEC + i * SEC / 500;
            pace.admitted(now);
        }
        let met = pace.rate(now).unwrap();
        assert!(met > 1_000.0, "{met}");
        let (learned, pause) = pace.throttled(now, now - 1, SEC, 1e9);
        let learned = learned.unwrap();
        // What the server accepted over the last second, not the pace met
        // less a lag allowance...
        assert!((learned - 500.0).abs() < 25.0, "{learned}");
        // ...pausing for the excess's share of the second asked for.
        assert!(close(pause as f64, 1e9 * (1.0 - learned / met)), "{pause}");
        // A second earlier there was not a window's worth to tell from.
        let (early, _) = taught();
        for i in 0..400 {
            early.admitted(SEC + i * SEC / 500);
        }
        let at = SEC + 400 * SEC / 500;
        let met = early.rate(at).unwrap();
        let learned = learn(&early, at, at - 1, 0, 1e9).unwrap();
        assert!(learned > 0.5 * met, "{learned} {met}");
    }

    #[test]
    fn the_climb_starts_when_the_pause_ends() {
        let (pace, rate) = taught();
        let at = 4 * SEC;
        let met = pace.rate(at).unwrap();
        admit(&pace, 10);
        let (learned, pause) = pace.throttled(at, 3 * SEC, 10 * SEC, 1e9);
        let learned = learned.unwrap();
        let resume = at + pause;
        assert!(pause > 0 && pause < 10 * SEC, "{pause}");
        assert!(learned < met && learned > 0.5 * rate);
        // Held at the cut through the pause, then climbing.
        assert!(close(pace.rate(at + 1).unwrap(), CUT * learned));
        assert!(close(pace.rate(resume).unwrap(), CUT * learned));
        let climbed = resume + (CLIMB_SECS * 1e9) as u64 + SEC / 10;
        assert!(close(pace.rate(climbed).unwrap(), PLATEAU * learned));
        // Requests sent during the pause would be of the same episode.
        assert_eq!(learn(&pace, resume, resume - 1, 0, 1e9), None);
        // Sent after it, but too soon after resuming to teach: the server
        // is still in the last episode, and the key waits a quarter more.
        let soon = resume + SEC / 20;
        let (learned, pause) = pace.throttled(soon, soon - 1, SEC, 1e9);
        assert_eq!((learned, pause), (None, SEC / 4));
        assert!(learn(&pace, climbed, climbed - 1, 0, 1e9).is_some());
    }

    #[test]
    fn a_herd_waits_the_whole_pause_a_paced_key_a_share() {
        let pace = Pace::new(0);
        admit(&pace, 100);
        // The first 429 (no pace yet): all of it.
        assert_eq!(pace.throttled(SEC, SEC, 3 * SEC, 1e9).1, 3 * SEC);
        // Too few requests for an estimate: all of it too.
        let fresh = Pace::new(0);
        assert_eq!(fresh.throttled(SEC, SEC, 3 * SEC, 1e9), (None, 3 * SEC));
        // The same episode: nothing more.
        assert_eq!(pace.throttled(SEC, SEC, 3 * SEC, 1e9), (None, 0));
        // Paced, 2 s after resuming (climbed, holding): the share its pace
        // was over the lesson's edge, 1 - 1 / (1 + 0.1 / 2), of 3 s.
        let (steady, at, _) = steady();
        admit(&steady, 10);
        let later = at + 2 * SEC;
        let (learned, pause) = steady.throttled(later, later - 1, 3 * SEC, 1e9);
        assert!(learned.is_some());
        let share = 1.0 - 1.0 / 1.05;
        assert!(close(pause as f64, 3e9 * share), "{pause}");
    }

    #[test]
    fn a_late_429_on_a_forgotten_estimate_is_a_herds_first() {
        // An estimate that never met a 429 doubles for 10 s, then is
        // forgotten: a 429 after that pauses the whole Retry-After (no
        // pace of infinity, no share of nothing).
        let (pace, _) = estimated();
        assert!(pace.rate(9 * SEC).is_some());
        assert_eq!(pace.rate(11 * SEC), None);
        admit(&pace, 100);
        let at = 600 * SEC;
        let (learned, pause) = pace.throttled(at, at - 1, 10 * SEC, 1e9);
        assert_eq!(pause, 10 * SEC);
        assert!(learned.unwrap().is_finite());
        // Under a quota, a pace's excess is counted from the quota.
        let (capped, _) = estimated();
        admit(&capped, 10);
        let (learned, pause) = capped.throttled(3 * SEC, 3 * SEC - 1, SEC, 100.0);
        assert!(close(learned.unwrap(), 100.0 / 2f64.sqrt()));
        assert!(
            close(pause as f64, 1e9 * (1.0 - 1.0 / 2f64.sqrt())),
            "{pause}"
        );
    }

    #[test]
    fn a_first_estimate_after_a_long_quiet_run_reads_the_meter() {
        // 500 a second for 140 s, never throttled: more admissions than
        // the count holds (65,535), so the first 429's estimate is what the
        // server accepted over the last second.
        let pace = Pace::new(0);
        let mut now = 0;
        for i in 0..70_000 {
            now = i * SEC / 500;
            pace.admitted(now);
        }
        let (learned, pause) = pace.throttled(now, now, SEC, 1e9);
        let learned = learned.unwrap();
        assert!((learned - 500.0).abs() < 25.0, "{learned}");
        assert_eq!(pause, SEC);
    }

    #[test]
    fn a_published_pace_has_no_recovering() {
        // A policy read at 60 s: a 429 for a request sent just after is a
        // lesson with its pause, not a server still in a window; one sent
        // before it was read is of the crowd that met the policy late.
        let state = published(fresh(0), 60 * SEC, 50.0, 1e9).unwrap();
        let mut counts = Counts::fresh(0);
        for i in 0..600 {
            counts = counts.sent(59 * SEC + i * SEC / 500);
        }
        let at = 60 * SEC + SEC / 10;
        let verdict = lesson(state, counts, at, 60 * SEC + SEC / 20, 30 * SEC, 1e9);
        assert!(verdict.taught && verdict.pause > 0, "{verdict:?}");
        let crowd = lesson(state, counts, at, 60 * SEC - SEC / 10, 30 * SEC, 1e9);
        assert_eq!(crowd.state, None);
    }

    #[test]
    fn a_429_sent_just_after_resuming_waits_longer_from_its_arrival() {
        let (pace, at, rate) = steady();
        let resumed = at;
        admit(&pace, 10);
        // Sent 50 ms after resuming, answered 200 ms after: the server's
        // window is not over; a quarter of its Retry-After more, counted
        // from the 429, and no lesson.
        let sent = resumed + SEC / 20;
        let arrived = resumed + SEC / 5;
        let (learned, pause) = pace.throttled(arrived, sent, 2 * SEC, 1e9);
        assert_eq!((learned, pause), (None, SEC / 2));
        // The pace is the same, re-dated: at the cut when it resumes again.
        let again = arrived + pause;
        assert!(close(pace.rate(again).unwrap(), CUT * rate));
    }

    #[test]
    fn one_lesson_per_episode() {
        let pace = Pace::new(0);
        admit(&pace, 10);
        assert!(learn(&pace, 5 * SEC, 4 * SEC, 0, 1e9).is_some());
        // The crowd sent before that lesson: no new lesson.
        assert_eq!(learn(&pace, 6 * SEC, 4 * SEC, 0, 1e9), None);
        assert_eq!(learn(&pace, 6 * SEC, 5 * SEC, 0, 1e9), None);
        // A request sent after it: a new lesson, once enough went.
        admit(&pace, 10);
        assert!(learn(&pace, 7 * SEC, 6 * SEC, 0, 1e9).is_some());
    }

    #[test]
    fn the_quota_caps_what_is_learned() {
        let pace = Pace::new(0);
        for _ in 0..10_000 {
            pace.admitted(0);
        }
        assert_eq!(learn(&pace, 0, 0, 0, 50.0), Some(50.0));
        // Doubling, but held to the quota: a 429 at the quota's pace takes
        // the doubling's lag off that pace.
        admit(&pace, 10);
        let learned = learn(&pace, SEC, SEC, 0, 20.0).unwrap();
        assert!(close(learned, 20.0 / 2f64.sqrt()), "{learned}");
    }

    #[test]
    fn a_forgotten_pace_is_learned_afresh() {
        let pace = Pace::new(0);
        admit(&pace, 10);
        learn(&pace, 0, 0, 0, 1e9).unwrap();
        let later = (FORGET_SECS as u64 + 10) * SEC;
        assert_eq!(pace.rate(later), None);
        admit(&pace, 10);
        // The next 429 is a first estimate again, even if "sent before".
        assert!(learn(&pace, later, 0, 0, 1e9).is_some());
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
                    pace.admitted(0);
                }
                let (learned, applied) = pace.throttled(now, sent_at, pause, quota_rate);
                prop_assert!(applied <= pause);
                if let Some(rate) = learned {
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
