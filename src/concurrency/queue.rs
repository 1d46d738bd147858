//! The gate's state: slots in flight and a FIFO queue of waiting tickets.
//!
//! Everything is decided under one mutex, so "at most `parallelism` in
//! flight and `queue_limit` waiting" holds at every instant, whatever the
//! races. Slots and queue places are owned guards: dropping one gives back
//! what it held, which is what makes every future of the gate cancel-safe.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::task::{Context, Poll};

use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicWaker, Mutex, MutexGuard};

pub(crate) struct Gate {
    state: Mutex<State>,
    queue_limit: usize,
    pub(crate) refused: AtomicU64,
    pub(crate) timed_out: AtomicU64,
}

struct State {
    parallelism: usize,
    in_flight: usize,
    // Waiting tickets in arrival order. Invariant: while any ticket waits,
    // `in_flight >= parallelism` (a freed slot goes straight to the front
    // ticket), so a new arrival never overtakes the queue. A ticket leaves
    // the map either when it is handed a slot or when its future leaves.
    waiting: BTreeMap<u64, Arc<Waiter>>,
    next_ticket: u64,
}

/// What a queued future and the gate share: the future polls `granted`
/// without taking the gate's lock.
#[derive(Debug)]
struct Waiter {
    granted: AtomicBool,
    waker: AtomicWaker,
}

impl Waiter {
    fn new() -> Self {
        Waiter {
            granted: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    /// Hands this ticket a slot (its ticket is already out of the map).
    fn grant(&self) {
        self.granted.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// What [`Gate::admit`] decided for one request.
pub(crate) enum Admission {
    /// Run now.
    Slot(Slot),
    /// Wait in line.
    Queued(Place),
    /// The queue is full.
    Full,
    /// `parallelism` is zero.
    Closed,
}

impl Gate {
    pub(crate) fn new(parallelism: usize, queue_limit: usize) -> Self {
        Gate {
            state: Mutex::new(State {
                parallelism,
                in_flight: 0,
                waiting: BTreeMap::new(),
                next_ticket: 0,
            }),
            queue_limit,
            refused: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code that can panic runs under this lock; recover regardless.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits one request to `gate`. (A function of `&Arc<Gate>` rather
    /// than a method on `self: &Arc<Self>`: loom's `Arc` cannot be a
    /// receiver.)
    pub(crate) fn admit(gate: &Arc<Gate>) -> Admission {
        let mut state = gate.lock();
        if state.parallelism == 0 {
            return Admission::Closed;
        }
        if state.in_flight < state.parallelism && state.waiting.is_empty() {
            state.in_flight += 1;
            return Admission::Slot(Slot {
                gate: Arc::clone(gate),
            });
        }
        if state.waiting.len() < gate.queue_limit {
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            let waiter = Arc::new(Waiter::new());
            state.waiting.insert(ticket, Arc::clone(&waiter));
            return Admission::Queued(Place {
                gate: Arc::clone(gate),
                ticket,
                waiter,
                armed: true,
            });
        }
        drop(state);
        gate.refused.fetch_add(1, Ordering::Relaxed);
        Admission::Full
    }

    /// Gives a slot back: to the front ticket if parallelism allows,
    /// otherwise to the pool.
    fn release(&self) {
        let mut state = self.lock();
        // `in_flight` still counts the slot being released.
        if state.in_flight <= state.parallelism {
            if let Some((_, waiter)) = state.waiting.pop_first() {
                // The slot passes to that ticket: in_flight is unchanged.
                drop(state);
                waiter.grant();
                return;
            }
        }
        state.in_flight -= 1;
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    pub(crate) fn queued(&self) -> usize {
        self.lock().waiting.len()
    }

    pub(crate) fn parallelism(&self) -> usize {
        self.lock().parallelism
    }

    pub(crate) fn queue_limit(&self) -> usize {
        self.queue_limit
    }

    /// Changes parallelism; raising it admits waiting tickets at once,
    /// lowering it lets running requests finish (slots then return to the
    /// pool until in_flight is under the new limit). `parallelism >= 1`.
    pub(crate) fn set_parallelism(&self, parallelism: usize) {
        let mut woken = Vec::new();
        {
            let mut state = self.lock();
            state.parallelism = parallelism;
            while state.in_flight < state.parallelism {
                let Some((_, waiter)) = state.waiting.pop_first() else {
                    break;
                };
                state.in_flight += 1;
                woken.push(waiter);
            }
        }
        for waiter in woken {
            waiter.grant();
        }
    }
}

/// A slot in flight; given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    gate: Arc<Gate>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.release();
    }
}

/// A ticket in the queue. On drop it leaves the queue, or, if it had been
/// handed a slot it never used, passes the slot on.
#[derive(Debug)]
pub(crate) struct Place {
    gate: Arc<Gate>,
    ticket: u64,
    waiter: Arc<Waiter>,
    armed: bool,
}

impl Place {
    /// Ready once the ticket has been handed a slot. Lock-free.
    pub(crate) fn poll_granted(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.waiter.granted.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.waiter.waker.register(cx.waker());
        // A grant between the first check and `register` woke no one: look
        // again.
        if self.waiter.granted.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// The slot this ticket was handed (call after `poll_granted` is ready).
    pub(crate) fn into_slot(mut self) -> Slot {
        self.armed = false;
        Slot {
            gate: Arc::clone(&self.gate),
        }
    }

    /// Leaves the queue if still in it (`true`); `false` means a slot was
    /// handed over meanwhile, and the ticket still holds it.
    pub(crate) fn leave(&mut self) -> bool {
        // Out of the map means handed a slot, even if `granted` is not set
        // yet (the releaser sets it just after unlocking).
        let left = !self.waiter.granted.load(Ordering::Acquire)
            && self.gate.lock().waiting.remove(&self.ticket).is_some();
        if left {
            self.armed = false;
        }
        left
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.armed && !self.leave() {
            // Handed a slot, dropped before using it: pass it on.
            self.gate.release();
        }
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Gate")
            .field("parallelism", &state.parallelism)
            .field("in_flight", &state.in_flight)
            .field("queued", &state.waiting.len())
            .field("queue_limit", &self.queue_limit)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(p: usize, q: usize) -> Arc<Gate> {
        Arc::new(Gate::new(p, q))
    }

    fn cx() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    #[test]
    fn slots_then_queue_then_full() {
        let g = gate(2, 1);
        let a = Gate::admit(&g);
        let b = Gate::admit(&g);
        let c = Gate::admit(&g);
        assert!(matches!(
            (&a, &b, &c),
            (Admission::Slot(_), Admission::Slot(_), Admission::Queued(_))
        ));
        assert!(matches!(Gate::admit(&g), Admission::Full));
        assert_eq!((g.in_flight(), g.queued()), (2, 1));
        assert_eq!(g.refused.load(Ordering::Relaxed), 1);
        let Admission::Queued(mut place) = c else {
            unreachable!()
        };
        assert!(place.poll_granted(&mut cx()).is_pending());
        drop(a);
        // The slot went to the ticket, not back to the pool.
        assert_eq!((g.in_flight(), g.queued()), (2, 0));
        assert!(place.poll_granted(&mut cx()).is_ready());
        let slot = place.into_slot();
        drop((b, slot));
        assert_eq!((g.in_flight(), g.queued()), (0, 0));
    }

    #[test]
    fn a_dropped_ticket_leaves_or_passes_its_slot_on() {
        let g = gate(1, 2);
        let running = Gate::admit(&g);
        let first = Gate::admit(&g);
        let second = Gate::admit(&g);
        drop(first); // leaves the queue
        assert_eq!(g.queued(), 1);
        drop(running); // slot goes to `second`
        assert_eq!((g.in_flight(), g.queued()), (1, 0));
        drop(second); // handed a slot, never used it: back to the pool
        assert_eq!((g.in_flight(), g.queued()), (0, 0));
    }

    #[test]
    fn zero_parallelism_is_closed() {
        assert!(matches!(Gate::admit(&gate(0, 5)), Admission::Closed));
    }

    #[test]
    fn lowering_parallelism_lets_running_work_finish() {
        let g = gate(3, 3);
        let running: Vec<_> = (0..3).map(|_| Gate::admit(&g)).collect();
        let waiting = Gate::admit(&g);
        g.set_parallelism(1);
        assert_eq!(g.in_flight(), 3, "nothing running is cancelled");
        let mut running = running.into_iter();
        drop(running.next());
        drop(running.next());
        // Two released, but 1 still runs and the limit is 1: no hand-over.
        assert_eq!((g.in_flight(), g.queued()), (1, 1));
        drop(running.next());
        assert_eq!((g.in_flight(), g.queued()), (1, 0));
        drop(waiting);
        assert_eq!(g.in_flight(), 0);
    }

    #[test]
    fn raising_parallelism_admits_waiters_in_order() {
        let g = gate(1, 3);
        let _running = Gate::admit(&g);
        let places: Vec<_> = (0..3)
            .map(|_| match Gate::admit(&g) {
                Admission::Queued(place) => place,
                _ => unreachable!(),
            })
            .collect();
        g.set_parallelism(3);
        let mut slots = Vec::new();
        let mut granted = Vec::new();
        for mut place in places {
            let ready = place.poll_granted(&mut cx()).is_ready();
            granted.push(ready);
            if ready {
                slots.push(place.into_slot());
            }
        }
        assert_eq!(granted, [true, true, false]);
        assert_eq!((g.in_flight(), g.queued()), (3, 0));
    }
}

/// loom models of the gate's core: every interleaving of admission,
/// release, cancellation and re-sizing, checked for lost wake-ups (a
/// waiter loom finds blocked forever) and for slots leaked or counted
/// twice (the counts at the end). Run by CI, with the command in
/// `src/sync.rs` (three preemptions a run, as tokio bounds its models:
/// unbounded, three threads take minutes). Each model fails if the
/// grant's wake-up or a dropped ticket's hand-over is removed.
#[cfg(all(test, tollgate_loom))]
mod loom_models {
    use std::future::poll_fn;

    use loom::future::block_on;
    use loom::thread;

    use super::*;

    fn settled(gate: &Gate) -> (usize, usize) {
        (gate.in_flight(), gate.queued())
    }

    /// Waits for `place`'s slot and gives it back.
    fn wait_then_run(mut place: Place) {
        block_on(poll_fn(|cx| place.poll_granted(cx)));
        drop(place.into_slot());
    }

    #[test]
    fn loom_a_freed_slot_reaches_the_waiter() {
        loom::model(|| {
            let gate = Arc::new(Gate::new(1, 1));
            let Admission::Slot(slot) = Gate::admit(&gate) else {
                panic!("the first request runs");
            };
            let other = Arc::clone(&gate);
            let waiter = thread::spawn(move || match Gate::admit(&other) {
                Admission::Queued(place) => wait_then_run(place),
                Admission::Slot(slot) => drop(slot),
                _ => panic!("refused with a place free"),
            });
            drop(slot);
            waiter.join().unwrap();
            assert_eq!(settled(&gate), (0, 0));
        });
    }

    #[test]
    fn loom_a_waiter_leaving_as_its_slot_frees_neither_leaks_nor_doubles() {
        loom::model(|| {
            let gate = Arc::new(Gate::new(1, 1));
            let Admission::Slot(slot) = Gate::admit(&gate) else {
                panic!("the first request runs");
            };
            let Admission::Queued(place) = Gate::admit(&gate) else {
                panic!("the second waits");
            };
            let releasing = thread::spawn(move || drop(slot));
            drop(place);
            releasing.join().unwrap();
            assert_eq!(settled(&gate), (0, 0));
        });
    }

    #[test]
    fn loom_raising_parallelism_while_waiters_leave_and_run() {
        loom::model(|| {
            let gate = Arc::new(Gate::new(1, 2));
            let Admission::Slot(slot) = Gate::admit(&gate) else {
                panic!("the first request runs");
            };
            let (Admission::Queued(first), Admission::Queued(second)) =
                (Gate::admit(&gate), Gate::admit(&gate))
            else {
                panic!("the next two wait");
            };
            let other = Arc::clone(&gate);
            let raising = thread::spawn(move || other.set_parallelism(2));
            let leaving = thread::spawn(move || drop(second));
            drop(slot);
            wait_then_run(first);
            raising.join().unwrap();
            leaving.join().unwrap();
            assert_eq!(settled(&gate), (0, 0));
        });
    }
}
