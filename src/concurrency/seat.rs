//! Lending a slot: how a request that must wait for its connection's token
//! gives its slot to a request that can go, and takes one back in turn.
//!
//! The gate's response future owns its request's [`Seat`]. While it polls
//! the inner service's future it can put the seat where code further in, on
//! the same thread, finds it: a thread-local, the way `tracing` finds the
//! current span. It does so only once something inside asked (a flag the
//! rate limiter sets when it must wait and finds no seat; the gate then
//! polls again at once with the seat out), so requests that never wait pay
//! for no more than that flag. The rate limiter's future, waiting for a
//! token, lends the slot ([`SeatLoan::lend_seat`]); before it sends, it
//! waits to be seated again ([`SeatLoan::poll_seated`]). Seats are tagged
//! with their gate's nesting depth: with gates inside gates, a rate limiter
//! lends only the innermost one's slot. So the gate knows nothing of
//! tokens, the rate limiter nothing of slots, and a request holds a slot
//! only while it is being sent, answered, or sleeping between its own
//! retries.
//!
//! Without a gate outside it, or when something between them polls the
//! rate limiter on another task (a `tower::buffer::Buffer`), there is no
//! seat to find: the request keeps its slot while it waits, as it would
//! without lending.
//!
//! If the rate limiter's future is dropped while the slot is lent (an
//! attempt timed out, a retry gave up on it), the loan has no lender: the
//! gate's future takes the slot back itself before it polls further in,
//! so a request does not sleep before a retry without a slot; and a next
//! attempt polled within the same poll adopts the loan
//! ([`SeatLoan::adopt_orphan`]) and is seated before it is sent.
//!
//! One request, one rate limiter future at a time: a layer between the gate
//! and the rate limiter that runs two attempts of a request at once
//! (hedging) shares one slot between them, and one that polls other
//! requests' futures inside this request's poll (coalescing) could lend
//! this request's slot for them. Neither is supported.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use super::queue::{Lent, Place, Slot};

/// What an admitted request holds: its slot, or a loan of it.
#[derive(Debug)]
pub(super) enum Seat {
    Seated(Slot),
    Loaned(Arc<Loan>),
}

thread_local! {
    // The seat put out by the gate future polling its inner future on
    // this thread, tagged with that gate's depth (below).
    static CURRENT: Cell<Option<(u32, Seat)>> = const { Cell::new(None) };
    // How many gate futures are polling inside one another on this
    // thread: a rate limiter lends only the innermost gate's seat.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    // Set by a rate limiter that wanted to lend a slot and found no seat:
    // the gate future polling it then puts its seat out from the next poll
    // on. (Putting it out on every poll would cost every request; asking
    // costs only those that wait.)
    static WANTED: Cell<bool> = const { Cell::new(false) };
    // Set when a rate limiter's future is dropped with its slot lent: the
    // next one polled here adopts the loan before it sends (see
    // `SeatLoan::adopt_orphan`).
    static ORPHANED: Cell<bool> = const { Cell::new(false) };
}

/// Counts a gate future polling inside for as long as it lives.
struct Deeper(u32);

impl Deeper {
    #[inline]
    fn enter() -> Option<Deeper> {
        DEPTH
            .try_with(|depth| {
                let inner = depth.get().wrapping_add(1);
                depth.set(inner);
                Deeper(inner)
            })
            .ok()
    }
}

impl Drop for Deeper {
    #[inline]
    fn drop(&mut self) {
        let _ = DEPTH.try_with(|depth| depth.set(self.0.wrapping_sub(1)));
    }
}

/// Runs `poll` without putting a seat out. Seats put out by gates further
/// out are hidden from it.
#[inline]
pub(super) fn polling<R>(poll: impl FnOnce() -> R) -> R {
    let _deeper = Deeper::enter();
    poll()
}

/// Whether something polled inside, on this thread, asked for a seat since
/// the last call (see [`polling`]); clears the request.
#[inline]
pub(super) fn wanted() -> bool {
    WANTED
        .try_with(|wanted| wanted.replace(false))
        .unwrap_or(false)
}

/// Runs `poll` with `seat` put out for the rate limiter inside, and takes
/// it back afterwards, also if `poll` panics. Nested gates each put out
/// their own: the outer one's is put back when the inner poll ends.
#[inline]
pub(super) fn polling_with<R>(seat: &mut Option<Seat>, poll: impl FnOnce() -> R) -> R {
    struct Restore<'a> {
        seat: &'a mut Option<Seat>,
        outer: Option<(u32, Seat)>,
        _deeper: Deeper,
    }
    impl Drop for Restore<'_> {
        #[inline]
        fn drop(&mut self) {
            let outer = self.outer.take();
            if let Ok(ours) = CURRENT.try_with(|current| current.replace(outer)) {
                *self.seat = ours.map(|(_, seat)| seat);
            }
        }
    }
    let Some(deeper) = Deeper::enter() else {
        // Thread-locals are being torn down: poll without lending.
        return poll();
    };
    let ours = seat.take().map(|seat| (deeper.0, seat));
    let Ok(outer) = CURRENT.try_with(|current| current.replace(ours)) else {
        return poll();
    };
    let _restore = Restore {
        seat,
        outer,
        _deeper: deeper,
    };
    poll()
}

/// Runs `f` on this thread's current seat if it is the innermost gate's,
/// and puts back the seat `f` returns; `None` if there is none.
fn with_current_seat<R>(f: impl FnOnce(Seat) -> (Seat, R)) -> Option<R> {
    let depth = DEPTH.try_with(Cell::get).ok()?;
    CURRENT
        .try_with(|current| match current.take() {
            Some((at, seat)) if at == depth => {
                let (seat, result) = f(seat);
                current.set(Some((at, seat)));
                Some(result)
            }
            // An outer gate's seat, or none.
            other => {
                current.set(other);
                None
            }
        })
        .ok()
        .flatten()
}

/// A lent slot, shared by the gate future and the rate limiter's future
/// that lent it.
#[derive(Debug)]
pub(super) struct Loan {
    away: Mutex<Away>,
    // The line the request takes its slot back in.
    line: u64,
    // Whether a rate limiter's future still holds the loan. If none does,
    // the gate future takes the slot back before polling further in.
    lender: AtomicBool,
}

#[derive(Debug)]
enum Away {
    Lent(Lent),
    Reclaiming(Place),
    Seated(Slot),
    // Only while a transition is under way (`poll_seated`, `lend`).
    Moving,
}

impl Loan {
    fn away(&self) -> std::sync::MutexGuard<'_, Away> {
        self.away.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ready once the request holds a slot again: at once if one is free
    /// and nobody waits, else when its turn comes.
    pub(super) fn poll_seated(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut away = self.away();
        loop {
            let (next, ready) = match std::mem::replace(&mut *away, Away::Moving) {
                Away::Seated(slot) => (Away::Seated(slot), true),
                Away::Lent(lent) => match lent.reclaim() {
                    Ok(slot) => (Away::Seated(slot), true),
                    Err(place) => (Away::Reclaiming(place), false),
                },
                Away::Reclaiming(mut place) => match place.poll_granted(cx) {
                    Poll::Ready(()) => (Away::Seated(place.into_slot()), true),
                    Poll::Pending => {
                        *away = Away::Reclaiming(place);
                        return Poll::Pending;
                    }
                },
                // Only after a panic mid-transition (nothing there can
                // panic): let the request go rather than hang it.
                Away::Moving => (Away::Moving, true),
            };
            *away = next;
            if ready {
                return Poll::Ready(());
            }
        }
    }

    /// Lends the slot if the request holds it. If no waiting place is
    /// free it keeps it, and `cx` is woken to try again when one is.
    fn lend(&self, cx: &Context<'_>) {
        let mut away = self.away();
        *away = match std::mem::replace(&mut *away, Away::Moving) {
            Away::Seated(slot) => match slot.lend(self.line, cx.waker()) {
                Ok(lent) => Away::Lent(lent),
                Err(slot) => Away::Seated(slot),
            },
            other => other,
        };
    }

    /// Whether the gate future must take the slot back before it polls
    /// further in: lent, and nobody left to take it back.
    pub(super) fn orphaned(&self) -> bool {
        // (`Moving` only after a panic mid-transition: not taken back, so
        // that the gate future does not spin on it.)
        !self.lender.load(Ordering::Acquire)
            && !matches!(*self.away(), Away::Seated(_) | Away::Moving)
    }
}

/// The rate limiter's hold on its request's gate slot while the request
/// waits for a token: made by [`SeatLoan::lend_seat`]; the request must be
/// [seated](SeatLoan::poll_seated) again before it is sent.
#[derive(Debug)]
pub(crate) struct SeatLoan {
    loan: Arc<Loan>,
}

impl SeatLoan {
    /// Lends the slot of the request being polled on this thread, which
    /// waits for a token on `line` (the gate's line of its connection:
    /// [`line_of`](super::line_of) its key). `None` if no gate put a seat
    /// out here (it is asked to, for the next poll), or another future of
    /// the same request holds the loan (see the module docs). If no waiting
    /// place is free, the request keeps its slot for now;
    /// [`lend`](SeatLoan::lend) again on each poll while it waits (the gate
    /// wakes it when lending can work).
    pub(crate) fn lend_seat(line: u64, cx: &Context<'_>) -> Option<SeatLoan> {
        let loan = with_current_seat(|seat| match seat {
            Seat::Seated(slot) => {
                let loan = Arc::new(Loan {
                    away: Mutex::new(Away::Seated(slot)),
                    line,
                    lender: AtomicBool::new(true),
                });
                (Seat::Loaned(Arc::clone(&loan)), Some(loan))
            }
            Seat::Loaned(loan) => {
                let held = adopt(&loan);
                (Seat::Loaned(loan), held)
            }
        })
        .flatten();
        let Some(loan) = loan else {
            // The gate future polling this (if any) has not put its seat
            // out: ask it to, for the next poll.
            let _ = WANTED.try_with(|wanted| wanted.set(true));
            return None;
        };
        let loan = SeatLoan { loan };
        loan.lend(cx);
        Some(loan)
    }

    /// The loan of a rate limiter future dropped with its request's slot
    /// lent, if it was this request's: the request must be seated again
    /// before it is sent (a retry after an attempt timeout can come within
    /// the same poll, before the gate future could take the slot back).
    /// One read of a thread-local when there is none.
    #[inline]
    pub(crate) fn adopt_orphan() -> Option<SeatLoan> {
        if !ORPHANED
            .try_with(|orphaned| orphaned.replace(false))
            .unwrap_or(false)
        {
            return None;
        }
        with_current_seat(|seat| {
            let held = match &seat {
                Seat::Loaned(loan) => adopt(loan),
                Seat::Seated(_) => None,
            };
            (seat, held)
        })
        .flatten()
        .map(|loan| SeatLoan { loan })
    }

    /// Whether a loan was orphaned on this thread and not yet adopted: a
    /// request that would be sent at once must then be seated first (see
    /// [`adopt_orphan`](SeatLoan::adopt_orphan)). Leaves the flag as it is.
    #[inline]
    pub(crate) fn orphan_waiting() -> bool {
        ORPHANED.try_with(Cell::get).unwrap_or(false)
    }

    /// Lends the slot if the request holds it (after
    /// [`poll_seated`](SeatLoan::poll_seated) found the token still not
    /// there, or while a waiting place was not free).
    pub(crate) fn lend(&self, cx: &Context<'_>) {
        self.loan.lend(cx);
    }

    /// Ready once the request holds a slot: at once if it still does or
    /// one is free, else when its turn in its line comes (it keeps the
    /// place of its first arrival).
    pub(crate) fn poll_seated(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.loan.poll_seated(cx)
    }
}

/// The loan, if its lender is gone (this one takes its place).
fn adopt(loan: &Arc<Loan>) -> Option<Arc<Loan>> {
    loan.lender
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
        .then(|| Arc::clone(loan))
}

impl Drop for SeatLoan {
    fn drop(&mut self) {
        self.loan.lender.store(false, Ordering::Release);
        if self.loan.orphaned() {
            let _ = ORPHANED.try_with(|orphaned| orphaned.set(true));
        }
    }
}
