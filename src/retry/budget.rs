//! The retry budget: retries as a share of first tries over a window.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use crate::sync::AtomicU64;
use crate::Error;

/// Caps retries at a share of the first tries sent over a sliding window,
/// plus a small floor, so an outage does not multiply the load on the
/// server by the number of retries.
///
/// A retry is allowed while
///
/// ```text
/// retries in the window < min_per_second × window + ratio × first tries in the window
/// ```
///
/// (The window moves in tenths of itself; retries racing on many threads
/// may go one over the budget at a tenth's boundary, or one under.)
///
/// Every request a [`Retry`](crate::Retry) service sends counts as a first
/// try when it is called; every retry it allows counts against the budget.
/// A retry the budget refuses ends the request as running out of retries
/// does: the last response (or error) is returned. Without a budget, a
/// server down for everyone gets `1 + max_retries` attempts per request (5
/// with [`Backoff::power_automate`](crate::Backoff::power_automate)); with
/// the default one, 1.2 and the floor's share: 2,000 requests over a
/// 20-second outage send 2,878 attempts, not 10,000
/// (`tests/retry_budget.rs`).
///
/// # When to use one
///
/// For a retry layer whose callers arrive on their own (an online
/// service's requests): there each caller's retries add to the load, and a
/// budget caps them, at a price: requests it denies fail that retrying
/// would have delivered (`benches/knee.rs`, a 30 s outage, 100 requests a
/// second: 12,609 attempts without, 6,901 with, and 2,832 of 6,000
/// requests failed). Behind a [`ConcurrencyGate`](crate::ConcurrencyGate)
/// with its slots held through retries (the [`Tollgate`](crate::Tollgate)
/// stack) the gate already bounds them, and a budget frees the slots of
/// sleeping retries for first tries that fail too: at parallelism 200 it
/// raised the attempts during that outage from 602 to 3,370. So the
/// builder sets none unless told to.
///
/// A retry of a response carrying a non-zero `Retry-After` neither needs
/// nor spends budget: the server scheduled it, and in the
/// [`Tollgate`](crate::Tollgate) stack the connection's pause and pace
/// in the rate limiter below space it. Everything else spends: a 503 or
/// 429 without `Retry-After` (or with a zero one), other 5xx, timeouts and
/// transport errors.
///
/// ```
/// use std::time::Duration;
/// use tollgate::testing::Script;
/// use tollgate::{Backoff, RetryBudget, RetryLayer};
/// use tower::{Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), tower::BoxError> {
/// // A server that is down: 503 without Retry-After, to everything.
/// let server = Script::new().reply(503);
/// // One retry per two first tries, and no floor.
/// let budget = RetryBudget::new(0.5).min_per_second(0);
/// budget.validate()?;
/// let client = RetryLayer::new(Backoff::fixed(Duration::from_secs(1)).max_retries(3))
///     .budget(budget)
///     .layer(server.service());
///
/// for _ in 0..2 {
///     let response = client.clone().oneshot(http::Request::new(())).await?;
///     assert_eq!(response.status(), 503);
/// }
/// // Two first tries and the one retry they earned, not 2 × 4 attempts.
/// assert_eq!(server.count(), 3);
/// # Ok(())
/// # }
/// ```
///
/// # Counting
///
/// Each [`RetryLayer::layer`](crate::RetryLayer) call makes a service with
/// a budget of its own; clones of that service share it. The window is
/// counted in ten slots of tokio time (`tokio::time::Instant`, so tests
/// run under `tokio::time::pause()`): a first try or retry is forgotten
/// between 0.9 and 1 window after it. Counting is lock-free: a first try
/// costs a clock read and one atomic update; two retries racing for the
/// last one allowed cannot both go.
///
/// # Nonsense in, documented clamp out
///
/// [`RetryLayer::budget`](crate::RetryLayer::budget) never panics: a ratio
/// that is negative or not a number is taken as 0 (only the floor is left),
/// an infinite one as `f64::MAX`, and a zero window as the shortest one the
/// slots can count (ten of 1 ns), which in effect allows only the exempt
/// retries: the stricter reading wins, as a cap keeps a client polite.
/// [`validate`](RetryBudget::validate) reports those same cases as
/// [`Error::InvalidConfig`], and the [`Tollgate`](crate::Tollgate) builder
/// refuses them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    window: Duration,
}

impl RetryBudget {
    /// Retries allowed per first try unless set: 0.2, the default
    /// `budget_percent` of Envoy's retry budget (20%).
    pub const DEFAULT_RATIO: f64 = 0.2;

    /// The floor unless set: 10 retries a second, the `min_per_sec` of
    /// tower's `TpsBudget` and Finagle's `RetryBudget`, so a lone request, or
    /// a client that sends few, still retries.
    pub const DEFAULT_MIN_PER_SECOND: u32 = 10;

    /// How long a first try or retry counts unless set: 10 seconds, the
    /// `ttl` of tower's `TpsBudget` and Finagle's `RetryBudget`.
    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

    /// A budget of `ratio` retries per first try (0.2: one retry for every
    /// five requests), with the default floor and window.
    pub const fn new(ratio: f64) -> Self {
        RetryBudget {
            ratio,
            min_per_second: Self::DEFAULT_MIN_PER_SECOND,
            window: Self::DEFAULT_WINDOW,
        }
    }

    /// Retries a second allowed whatever the first tries (default 10): `n`
    /// times the window's seconds, in whole retries, may always go.
    pub const fn min_per_second(mut self, n: u32) -> Self {
        self.min_per_second = n;
        self
    }

    /// How long a first try or retry counts (default 10 s).
    pub const fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Reports the inputs [`RetryBudget`] would otherwise clamp: a ratio
    /// that is negative, not a number or infinite, or a zero window.
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.ratio.is_finite() && self.ratio >= 0.0) {
            return Err(Error::invalid_config(
                "retry budget",
                format!(
                    "a ratio of {} is not a finite number of retries per first try, 0 or more",
                    self.ratio
                ),
            ));
        }
        if self.window.is_zero() {
            return Err(Error::invalid_config(
                "retry budget",
                "a zero window counts no first try, so allows no retry",
            ));
        }
        Ok(())
    }

    /// The ratio after the documented clamp.
    fn clamped_ratio(&self) -> f64 {
        if self.ratio.is_nan() {
            0.0
        } else {
            self.ratio.clamp(0.0, f64::MAX)
        }
    }
}

impl Default for RetryBudget {
    /// 20% of first tries, 10 retries a second, over 10 seconds: see
    /// [`DEFAULT_RATIO`](RetryBudget::DEFAULT_RATIO),
    /// [`DEFAULT_MIN_PER_SECOND`](RetryBudget::DEFAULT_MIN_PER_SECOND) and
    /// [`DEFAULT_WINDOW`](RetryBudget::DEFAULT_WINDOW).
    fn default() -> Self {
        RetryBudget::new(Self::DEFAULT_RATIO)
    }
}

/// Slots a window is counted in: a count is forgotten between 0.9 and 1
/// window after it was made (tower's `TpsBudget` uses ten too).
const SLOTS: usize = 10;

/// The first tries and retries of one service (and its clones) over the
/// last window, and the arithmetic of the budget on them.
///
/// Each slot is one `AtomicU64` for first tries and one for retries, each
/// holding `period << 32 | count`: the slot's period (the low 32 bits of
/// the number of slot lengths since `start`) beside its count, so a slot is
/// renewed by the first update of a later period without a lock, and a
/// stale slot is recognised when read. Counts saturate at `u32::MAX` (4
/// billion a slot); a saturated count errs towards fewer retries.
pub(super) struct Ledger {
    start: Instant,
    /// One slot's length in nanoseconds, at least 1.
    slot_nanos: u64,
    /// Retries a window allows whatever the first tries.
    floor: f64,
    ratio: f64,
    first_tries: [AtomicU64; SLOTS],
    retries: [AtomicU64; SLOTS],
}

/// What a refused retry found in the window, for its tracing event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Spent {
    pub(super) first_tries: u64,
    pub(super) retries: u64,
    pub(super) allowed: f64,
}

impl Ledger {
    pub(super) fn new(budget: &RetryBudget) -> Self {
        Self::starting_at(budget, Instant::now())
    }

    fn starting_at(budget: &RetryBudget, start: Instant) -> Self {
        let slot_nanos = u64::try_from(budget.window.as_nanos() / SLOTS as u128)
            .unwrap_or(u64::MAX)
            .max(1);
        // The window the slots cover, after a zero one was raised.
        let window = Duration::from_nanos(slot_nanos).saturating_mul(SLOTS as u32);
        Ledger {
            start,
            slot_nanos,
            // Whole retries: under a strict `<`, a fraction would grant one.
            floor: (f64::from(budget.min_per_second) * window.as_secs_f64()).floor(),
            ratio: budget.clamped_ratio(),
            first_tries: std::array::from_fn(|_| AtomicU64::new(0)),
            retries: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Counts a first try now.
    pub(super) fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// Counts a retry now if the budget allows it.
    pub(super) fn withdraw(&self) -> Result<(), Spent> {
        self.withdraw_at(Instant::now())
    }

    fn deposit_at(&self, now: Instant) {
        let period = self.period(now);
        // Relaxed: a first try seen late by a racing retry only makes that
        // retry's check stricter.
        count(&self.first_tries[slot(period)], period, Ordering::Relaxed);
    }

    fn withdraw_at(&self, now: Instant) -> Result<(), Spent> {
        let period = self.period(now);
        let counted = &self.retries[slot(period)];
        // Count first, then check, all SeqCst: of two retries racing for
        // the last one allowed in one window, the one counted second sees
        // the other's count, so they cannot both go. Two slack cases, both
        // by one retry: across a slot boundary a retry that read the later
        // period does not see one counted later in the earlier slot (its
        // window no longer holds that slot), so both may go; and two
        // racing retries may both be refused when one was allowed.
        count(counted, period, Ordering::SeqCst);
        let first_tries = total(&self.first_tries, period, Ordering::SeqCst);
        // This retry included.
        let retries = total(&self.retries, period, Ordering::SeqCst);
        let allowed = self.floor + self.ratio * first_tries as f64;
        if (retries.saturating_sub(1) as f64) < allowed {
            return Ok(());
        }
        uncount(counted, period);
        Err(Spent {
            first_tries,
            retries: retries.saturating_sub(1),
            allowed,
        })
    }

    /// Slot lengths since `start` (0 for an instant before it).
    fn period(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        u64::try_from(elapsed / u128::from(self.slot_nanos)).unwrap_or(u64::MAX)
    }
}

fn slot(period: u64) -> usize {
    (period % SLOTS as u64) as usize
}

/// The tag a slot holding `period` carries: its low 32 bits. Two periods
/// with one tag are 2^32 slots apart (136 years of 1-second slots), so a
/// slot mistaken for current was last updated that long ago.
fn tag(period: u64) -> u64 {
    period & u64::from(u32::MAX)
}

fn pack(tag: u64, count: u64) -> u64 {
    tag << 32 | count
}

fn unpack(packed: u64) -> (u64, u64) {
    (packed >> 32, packed & u64::from(u32::MAX))
}

/// Adds one to `period`'s count in `slot`, renewing a slot that holds an
/// older period.
fn count(slot: &AtomicU64, period: u64, order: Ordering) {
    let now = tag(period);
    let _ = slot.fetch_update(order, Ordering::Relaxed, |packed| {
        let (held, n) = unpack(packed);
        Some(if held == now {
            pack(now, (n + 1).min(u64::from(u32::MAX)))
        } else if (held.wrapping_sub(now) as u32 as i32) > 0 {
            // A later period already renewed it: this caller was held up
            // for a whole window, and counts in the newer period instead.
            pack(held, (n + 1).min(u64::from(u32::MAX)))
        } else {
            pack(now, 1)
        })
    });
}

/// Takes back a refused retry's count, unless its slot has moved on.
fn uncount(slot: &AtomicU64, period: u64) {
    let now = tag(period);
    let _ = slot.fetch_update(Ordering::SeqCst, Ordering::Relaxed, |packed| {
        let (held, n) = unpack(packed);
        (held == now && n > 0).then(|| pack(now, n - 1))
    });
}

/// The counts of the window ending with `period`: the slots whose tag is
/// one of its periods.
fn total(slots: &[AtomicU64; SLOTS], period: u64, order: Ordering) -> u64 {
    (0..=period.min(SLOTS as u64 - 1))
        .map(|back| period - back)
        .map(|p| {
            let (held, n) = unpack(slots[slot(p)].load(order));
            if held == tag(p) {
                n
            } else {
                0
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn new_ledger(budget: RetryBudget) -> (Ledger, Instant) {
        let start = Instant::now();
        (Ledger::starting_at(&budget, start), start)
    }

    /// Retries allowed at `at` before one is refused.
    fn allowed_at(ledger: &Ledger, at: Instant) -> u64 {
        let mut n = 0;
        while ledger.withdraw_at(at).is_ok() {
            n += 1;
            assert!(n < 1_000_000, "the budget never ran out");
        }
        n
    }

    #[test]
    fn the_floor_alone_allows_min_per_second_times_the_window() {
        let (ledger, t0) = new_ledger(RetryBudget::new(0.0).min_per_second(3));
        assert_eq!(allowed_at(&ledger, t0), 30);
        // 3 a second over half a second: 1.5, so one whole retry.
        let (ledger, t0) = new_ledger(RetryBudget::new(0.0).min_per_second(3).window(ms(500)));
        assert_eq!(allowed_at(&ledger, t0), 1);
    }

    #[test]
    fn each_first_try_earns_its_share() {
        let (ledger, t0) = new_ledger(RetryBudget::new(0.25).min_per_second(0));
        assert_eq!(allowed_at(&ledger, t0), 0);
        for _ in 0..8 {
            ledger.deposit_at(t0 + ms(10));
        }
        // 8 × 0.25 = 2.
        assert_eq!(allowed_at(&ledger, t0 + ms(20)), 2);
        ledger.deposit_at(t0 + ms(30));
        // 9 × 0.25 = 2.25: a third retry, as 2 < 2.25.
        assert_eq!(allowed_at(&ledger, t0 + ms(40)), 1);
    }

    #[test]
    fn floor_and_share_add_up() {
        let (ledger, t0) = new_ledger(RetryBudget::new(0.5).min_per_second(1));
        for _ in 0..4 {
            ledger.deposit_at(t0);
        }
        assert_eq!(allowed_at(&ledger, t0), 10 + 2);
    }

    #[test]
    fn a_refused_retry_is_not_counted() {
        let (ledger, t0) = new_ledger(RetryBudget::new(1.0).min_per_second(0));
        ledger.deposit_at(t0);
        assert!(ledger.withdraw_at(t0).is_ok());
        for _ in 0..5 {
            let spent = ledger.withdraw_at(t0).unwrap_err();
            assert_eq!((spent.first_tries, spent.retries), (1, 1));
        }
        // One more first try makes room for exactly one more retry.
        ledger.deposit_at(t0);
        assert_eq!(allowed_at(&ledger, t0), 1);
    }

    #[test]
    fn counts_are_forgotten_a_window_later() {
        // Slots of 1 s: a count made in slot 0 is in the window until slot
        // 9 ends, 10 s after the start.
        let (ledger, t0) = new_ledger(RetryBudget::new(1.0).min_per_second(0));
        for _ in 0..4 {
            ledger.deposit_at(t0 + ms(500));
        }
        assert_eq!(allowed_at(&ledger, t0 + ms(600)), 4);
        assert_eq!(allowed_at(&ledger, t0 + ms(9_999)), 0);
        // Both the first tries and the retries have gone.
        assert_eq!(allowed_at(&ledger, t0 + ms(10_000)), 0);
        for _ in 0..2 {
            ledger.deposit_at(t0 + ms(10_000));
        }
        assert_eq!(allowed_at(&ledger, t0 + ms(10_000)), 2);
    }

    #[test]
    fn retries_are_forgotten_too() {
        // A window's floor of 10, spent at once, is back a window later.
        let (ledger, t0) = new_ledger(RetryBudget::new(0.0).min_per_second(1));
        assert_eq!(allowed_at(&ledger, t0), 10);
        assert_eq!(allowed_at(&ledger, t0 + ms(9_999)), 0);
        assert_eq!(allowed_at(&ledger, t0 + ms(10_000)), 10);
        // Long after, every slot is stale and the floor is whole again.
        assert_eq!(allowed_at(&ledger, t0 + Duration::from_secs(3_600)), 10);
    }

    #[test]
    fn the_window_slides_slot_by_slot() {
        let (ledger, t0) = new_ledger(RetryBudget::new(1.0).min_per_second(0));
        ledger.deposit_at(t0); // slot 0
        ledger.deposit_at(t0 + ms(5_000)); // slot 5
        assert_eq!(allowed_at(&ledger, t0 + ms(9_000)), 2);
        // At 10 s slot 0 is forgotten, with the first try and a retry.
        assert!(ledger.withdraw_at(t0 + ms(10_000)).is_err());
        ledger.deposit_at(t0 + ms(10_500));
        assert_eq!(allowed_at(&ledger, t0 + ms(10_500)), 0);
        // 3 first tries (slots 5, 10, 11) and 2 retries (slot 9): one more.
        ledger.deposit_at(t0 + ms(11_000));
        assert_eq!(allowed_at(&ledger, t0 + ms(11_000)), 1);
    }

    #[test]
    fn an_instant_before_the_start_counts_as_the_start() {
        let start = Instant::now() + Duration::from_secs(60);
        let ledger = Ledger::starting_at(&RetryBudget::new(1.0).min_per_second(0), start);
        ledger.deposit_at(start - Duration::from_secs(30));
        assert_eq!(allowed_at(&ledger, start), 1);
    }

    #[test]
    fn nonsense_is_clamped_and_reported() {
        let t = |budget: RetryBudget| {
            let (ledger, t0) = new_ledger(budget);
            for _ in 0..10 {
                ledger.deposit_at(t0);
            }
            (allowed_at(&ledger, t0), budget.validate())
        };
        let floor = |ratio| RetryBudget::new(ratio).min_per_second(1);
        for ratio in [-1.0, f64::NAN, f64::NEG_INFINITY] {
            let (allowed, valid) = t(floor(ratio));
            assert_eq!(allowed, 10, "{ratio}: the floor alone");
            assert!(matches!(valid, Err(Error::InvalidConfig { .. })), "{ratio}");
        }
        let (unlimited, t0) = new_ledger(floor(f64::INFINITY));
        unlimited.deposit_at(t0);
        for _ in 0..100_000 {
            assert!(unlimited.withdraw_at(t0).is_ok());
        }
        assert!(floor(f64::INFINITY).validate().is_err());
        // A zero window holds a first try for 10 ns, and its floor is no
        // whole retry: a retry a millisecond after its first try is refused.
        let zero = RetryBudget::new(1.0).window(Duration::ZERO);
        let (brief, t0) = new_ledger(zero);
        brief.deposit_at(t0);
        assert_eq!(allowed_at(&brief, t0 + ms(1)), 0);
        assert!(zero.validate().is_err());
        assert!(RetryBudget::default().validate().is_ok());
        assert!(RetryBudget::new(0.0).min_per_second(0).validate().is_ok());
        assert!(RetryBudget::new(-0.0).validate().is_ok());
    }

    #[test]
    fn the_default_is_envoys_share_and_towers_floor() {
        assert_eq!(
            RetryBudget::default(),
            RetryBudget::new(0.2)
                .min_per_second(10)
                .window(Duration::from_secs(10))
        );
        let (ledger, t0) = new_ledger(RetryBudget::default());
        // A lone request: 100 retries from the floor, and its 0.2.
        ledger.deposit_at(t0);
        assert_eq!(allowed_at(&ledger, t0), 101);
    }

    #[test]
    fn counts_saturate_instead_of_reaching_the_tag() {
        let slot = AtomicU64::new(pack(tag(7), u64::from(u32::MAX) - 1));
        count(&slot, 7, Ordering::Relaxed);
        count(&slot, 7, Ordering::Relaxed);
        assert_eq!(
            unpack(slot.load(Ordering::Relaxed)),
            (7, u64::from(u32::MAX))
        );
        // A later period renews the slot; an earlier one (a caller held up)
        // counts in the later one.
        count(&slot, 17, Ordering::Relaxed);
        count(&slot, 7, Ordering::Relaxed);
        assert_eq!(unpack(slot.load(Ordering::Relaxed)), (17, 2));
        // Across the 32-bit wrap of the tag, too.
        let old = u64::from(u32::MAX);
        let slot = AtomicU64::new(pack(tag(old), 5));
        count(&slot, old + 10, Ordering::Relaxed);
        assert_eq!(unpack(slot.load(Ordering::Relaxed)), (tag(old + 10), 1));
        count(&slot, old, Ordering::Relaxed);
        assert_eq!(unpack(slot.load(Ordering::Relaxed)), (tag(old + 10), 2));
    }

    #[test]
    fn huge_windows_and_tiny_ones_do_not_panic() {
        for window in [Duration::MAX, Duration::from_nanos(1), Duration::ZERO] {
            let (ledger, t0) = new_ledger(RetryBudget::new(0.5).window(window));
            // A century on, past 2^32 slots of a tiny window.
            let century = Duration::from_secs(100 * 365 * 86_400);
            ledger.deposit_at(t0 + century);
            let _ = ledger.withdraw_at(t0 + century + ms(1));
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Step {
        FirstTry,
        Retry,
        Wait(Duration),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => Just(Step::FirstTry),
            4 => Just(Step::Retry),
            1 => (0u64..3_000).prop_map(|n| Step::Wait(ms(n))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Against a plain list of timestamps: a retry is allowed exactly
        /// when the retries the ring still holds are fewer than the floor
        /// plus the ratio of the first tries it holds, a ring holding what
        /// happened in the current slot and the nine before.
        #[test]
        fn the_ring_agrees_with_a_list_of_events(
            ratio in prop_oneof![Just(0.0), Just(0.2), Just(0.5), Just(1.0), Just(3.0)],
            per_second in 0u32..3,
            steps in proptest::collection::vec(step(), 0..300),
        ) {
            let budget = RetryBudget::new(ratio).min_per_second(per_second);
            let (ledger, t0) = new_ledger(budget);
            let mut now = t0;
            let (mut firsts, mut retries): (Vec<Instant>, Vec<Instant>) = (vec![], vec![]);
            let slot = Duration::from_secs(1);
            let slot_of = |at: Instant| (at - t0).as_nanos() / slot.as_nanos();
            for step in steps {
                match step {
                    Step::Wait(d) => now += d,
                    Step::FirstTry => {
                        ledger.deposit_at(now);
                        firsts.push(now);
                    }
                    Step::Retry => {
                        let current = slot_of(now);
                        let held = |at: &&Instant| current - slot_of(**at) < SLOTS as u128;
                        let f = firsts.iter().filter(held).count() as f64;
                        let r = retries.iter().filter(held).count() as f64;
                        let expected = r < f64::from(per_second) * 10.0 + ratio * f;
                        prop_assert_eq!(ledger.withdraw_at(now).is_ok(), expected);
                        if expected {
                            retries.push(now);
                        }
                    }
                }
            }
        }
    }
}

/// loom model of the count-then-check: two retries racing for the last one
/// the budget allows never both go, and a refused one leaves no count.
#[cfg(all(test, tollgate_loom))]
mod loom_models {
    use loom::sync::Arc;
    use loom::thread;

    use super::*;

    #[test]
    fn loom_two_retries_race_for_the_last_one() {
        loom::model(|| {
            let start = Instant::now();
            let budget = RetryBudget::new(1.0).min_per_second(0);
            let ledger = Arc::new(Ledger::starting_at(&budget, start));
            ledger.deposit_at(start);
            let other = {
                let ledger = Arc::clone(&ledger);
                thread::spawn(move || ledger.withdraw_at(start).is_ok())
            };
            let mine = ledger.withdraw_at(start).is_ok();
            let theirs = other.join().unwrap();
            assert!(!(mine && theirs), "both retries went");
            // At least one goes unless both were refused by the other's
            // count at once; either way the counts left are the ones allowed.
            let retries = total(&ledger.retries, 0, Ordering::SeqCst);
            assert_eq!(retries, u64::from(mine) + u64::from(theirs));
        });
    }
}
