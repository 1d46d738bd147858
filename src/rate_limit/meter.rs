//! What a connection's server accepted lately.
//!
//! A 429 says a pace was too fast, not by how much. What the server let
//! through says that: over a second, a server counting in windows accepts
//! its limit whatever was sent, a token or leaky bucket its rate plus what
//! is left of its burst. So each key counts, in slots of about a second,
//! the requests it sent less those answered 429: the accepted rate, which
//! the next lesson takes when it is below the pace the 429 met (see
//! `pace::lesson`).
//!
//! The counts fit in one `u64`: the slot's number and three 16-bit
//! counts (this slot, the one before, and admissions since the key's last
//! lesson, for a first estimate), all saturating.

/// A slot lasts 2^30 ns, 1.07 s: as long as the windows most servers count
/// in, so that a window's whole limit falls in it.
const SLOT_SHIFT: u32 = 30;
const SLOT_NANOS: u64 = 1 << SLOT_SHIFT;
const SLOT_SECS: f64 = SLOT_NANOS as f64 / 1e9;

/// Fewest accepted requests a rate is told from: below that, one request
/// more or less moves it by more than a tenth.
const MIN_COUNT: f64 = 10.0;

/// A key's counts, packed: bits 48..64 the slot (wrapping), 32..48 the
/// slot's net count, 16..32 the previous slot's, 0..16 admissions since
/// the last lesson.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts(pub(crate) u64);

impl Counts {
    /// Counts started afresh at `now` (a lesson: what the key sends from
    /// now on is measured against the new pace).
    pub(crate) fn fresh(now: u64) -> Self {
        Counts(u64::from(slot(now)) << 48)
    }

    /// Counts that know only `n` admissions (the fleet's store keeps no
    /// more).
    #[cfg(feature = "redis")]
    pub(crate) fn admitted(n: u32) -> Self {
        Counts(u64::from(n.min(u32::from(u16::MAX))))
    }

    fn slot(self) -> u16 {
        (self.0 >> 48) as u16
    }

    fn current(self) -> u16 {
        (self.0 >> 32) as u16
    }

    fn previous(self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// Requests admitted since the last lesson (saturating at 65,535).
    pub(crate) fn since(self) -> u32 {
        u32::from(self.0 as u16)
    }

    fn with(slot: u16, current: u16, previous: u16, since: u16) -> Self {
        Counts(
            u64::from(slot) << 48
                | u64::from(current) << 32
                | u64::from(previous) << 16
                | u64::from(since),
        )
    }

    /// The counts moved on to `now`'s slot.
    fn rolled(self, now: u64) -> Self {
        let now_slot = slot(now);
        match now_slot.wrapping_sub(self.slot()) {
            0 => self,
            1 => Self::with(now_slot, 0, self.current(), self.since() as u16),
            _ => Self::with(now_slot, 0, 0, self.since() as u16),
        }
    }

    /// One request admitted at `now`.
    pub(crate) fn sent(self, now: u64) -> Self {
        let rolled = self.rolled(now);
        Self::with(
            rolled.slot(),
            rolled.current().saturating_add(1),
            rolled.previous(),
            (rolled.since() as u16).saturating_add(1),
        )
    }

    /// One request answered 429 at `now`: it was not accepted.
    pub(crate) fn refused(self, now: u64) -> Self {
        let rolled = self.rolled(now);
        let (current, previous) = match rolled.current() {
            0 => (0, rolled.previous().saturating_sub(1)),
            n => (n - 1, rolled.previous()),
        };
        Self::with(rolled.slot(), current, previous, rolled.since() as u16)
    }

    /// Requests a second the server accepted over the last slot at `now`,
    /// if the key has been sending for `sending` seconds, at least a slot
    /// (a window server accepts nothing for the rest of a window it has
    /// spent: a shorter span could see only that), and enough were counted
    /// to tell.
    pub(crate) fn rate(self, now: u64, sending: f64) -> Option<f64> {
        if sending < SLOT_SECS {
            return None;
        }
        let rolled = self.rolled(now);
        let current = f64::from(rolled.current());
        let previous = f64::from(rolled.previous());
        let into = (now & (SLOT_NANOS - 1)) as f64 / SLOT_NANOS as f64;
        let (count, span) = if sending >= SLOT_SECS * (1.0 + into) {
            // HAProxy's sliding estimate: the slot so far, and the share
            // of the previous one that the last slot's length still covers.
            (current + previous * (1.0 - into), SLOT_SECS)
        } else {
            // The counts started within the previous slot: all of them are
            // from the `sending` seconds.
            (current + previous, sending)
        };
        (count >= MIN_COUNT).then(|| count / span)
    }
}

/// `now`'s slot, wrapping (every 19.5 hours).
fn slot(now: u64) -> u16 {
    (now >> SLOT_SHIFT) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    fn sent(mut counts: Counts, from: u64, every: u64, n: u64) -> Counts {
        for i in 0..n {
            counts = counts.sent(from + i * every);
        }
        counts
    }

    #[test]
    fn a_steady_rate_is_measured() {
        // 500 a second for 3 s.
        let counts = sent(Counts::fresh(0), 0, SEC / 500, 1_500);
        let rate = counts.rate(3 * SEC, 3.0).unwrap();
        assert!((rate - 500.0).abs() < 25.0, "{rate}");
        assert_eq!(counts.since(), 1_500);
    }

    #[test]
    fn a_start_within_a_slot_is_measured_from_the_start() {
        // 500 a second from 2.8 s to 4 s: the previous slot only partly.
        let from = 2_800_000_000;
        let mut counts = Counts::fresh(from);
        for i in 0..600 {
            counts = counts.sent(from + i * SEC / 500);
        }
        let rate = counts.rate(4 * SEC, 1.2).unwrap();
        assert!((rate - 500.0).abs() < 5.0, "{rate}");
    }

    #[test]
    fn refusals_are_taken_off() {
        // 1,000 a second sent for 2 s, every other one refused.
        let mut counts = Counts::fresh(0);
        for i in 0..2_000 {
            let at = i * SEC / 1_000;
            counts = counts.sent(at);
            if i % 2 == 1 {
                counts = counts.refused(at);
            }
        }
        let rate = counts.rate(2 * SEC, 2.0).unwrap();
        assert!((rate - 500.0).abs() < 30.0, "{rate}");
    }

    #[test]
    fn a_short_run_or_a_few_tell_nothing() {
        // 100 sent in the 0.2 s since the counts started: shorter than a
        // window, which may have been spent before it.
        let counts = sent(Counts::fresh(0), 0, SEC / 500, 100);
        assert_eq!(counts.rate(SEC / 5, 0.2), None);
        // Too few to tell.
        let few = sent(Counts::fresh(0), 0, SEC / 5, 6);
        assert_eq!(few.rate(2 * SEC, 2.0), None);
    }

    #[test]
    fn old_slots_are_forgotten() {
        let counts = sent(Counts::fresh(0), 0, SEC / 500, 500);
        // Three slots later nothing is left but the count since the lesson.
        let later = counts.sent(4 * SLOT_NANOS);
        assert_eq!(later.rate(4 * SLOT_NANOS, 10.0), None);
        assert_eq!(later.since(), 501);
    }

    proptest! {
        /// Any sequence of sends and refusals at any times: counts never
        /// wrap, and a rate is finite and not negative.
        #[test]
        fn any_sequence_is_sane(
            events in proptest::collection::vec((any::<u64>(), any::<bool>()), 0..2_000),
            sending in 0.0f64..1e6,
        ) {
            let mut counts = Counts::fresh(0);
            for (at, refused) in events {
                let before = counts.since();
                counts = if refused { counts.refused(at) } else { counts.sent(at) };
                prop_assert!(counts.since() >= before);
                if let Some(rate) = counts.rate(at, sending) {
                    prop_assert!(rate.is_finite() && rate >= 0.0);
                }
            }
        }
    }
}
