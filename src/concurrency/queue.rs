//! The gate's state: slots in flight, requests waiting for one in lines
//! served in turn, and slots lent back by requests waiting for tokens.
//!
//! Everything is decided under one mutex, so "at most `parallelism` in
//! flight and `queue_limit` waiting" holds at every instant, whatever the
//! races. Slots, queue places and loans are owned guards: dropping one
//! gives back what it held, which is what makes every future of the gate
//! cancel-safe.
//!
//! One exception, the fast lane ([`Lane`]): while nobody waits, the free
//! slots are put in an atomic word, and a request takes one (and gives it
//! back) with a compare-and-swap instead of the mutex, as tokio's
//! semaphore hands out permits. The mutex counts those slots as in flight
//! ("reserved"), and whoever takes it first takes them back out of the
//! word and closes the lane, so everything decided under it sees every
//! free slot, and a slot released while a request waits reaches it.
//!
//! A request *waits* either in a line for a slot ([`Place`]) or, admitted,
//! with its slot lent back while it waits for its connection's token
//! ([`Lent`]); both count against `queue_limit`. A lent slot is taken back
//! with the request's first ticket, so within its line it is ahead of
//! every request that arrived after it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::task::{Context, Poll, Waker};

use super::adaptive::{GradientLimit, Sample};
use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicWaker, Mutex, MutexGuard};

pub(crate) struct Gate {
    state: Mutex<State>,
    // The free slots while nobody waits, and the ticket counter (see
    // `Lane`).
    lane: AtomicU64,
    queue_limit: usize,
    // Whether requests wait in one line per connection, served in turn
    // (else all in one line, and every `line` given is read as 0).
    by_line: bool,
    pub(crate) refused: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    // The learned parallelism, when it adapts (locked before `state`).
    adaptive: Option<Adaptive>,
    // Why a gate with parallelism 0 refuses every request.
    closed_because: &'static str,
    // Where its figures and queue waits are published.
    #[cfg(feature = "metrics")]
    pub(crate) publisher: crate::metrics::Publisher,
}

/// An adaptive gate's learning: the limit, and whether the gate's own
/// futures take its samples (a gate standing alone) or a rate limiter
/// inside does (the `Tollgate` stack: it sees each attempt, not the
/// retries and token waits between them).
struct Adaptive {
    limit: Mutex<GradientLimit>,
    sampled_here: bool,
}

struct State {
    parallelism: usize,
    in_flight: usize,
    // Admitted requests waiting for a token with their slot lent back.
    lent: usize,
    // Invariant: while any ticket waits, `in_flight >= parallelism` (a
    // freed slot goes straight to the next ticket), so a new arrival never
    // overtakes the lines. A ticket leaves them either when it is handed a
    // slot or when its future leaves.
    lines: Lines,
    // Requests that wait for a token but kept their slot because no
    // waiting place was free, by slot ticket: woken to lend it when a
    // ticket starts waiting (see `Gate::lend`).
    stuck: BTreeMap<u64, Waker>,
}

impl State {
    /// Whether a request may take a slot now: one is free and nobody
    /// waits for one.
    fn slot_free(&self) -> bool {
        self.in_flight < self.parallelism && self.lines.len() == 0
    }
}

/// Waiting tickets: one line per connection, first come first served
/// within a line, the lines served in turn (round-robin). A line served
/// goes to the back of the turns, so a connection that queued a burst
/// takes one slot in every round, not every slot until its burst is gone.
#[derive(Default)]
struct Lines {
    lines: HashMap<u64, BTreeMap<u64, Arc<Waiter>>>,
    // The lines that have a ticket, in the order they will be served.
    turns: VecDeque<u64>,
    // Requests taking back a slot they lent, whose token is due: served
    // before the lines, oldest ticket first. At most one per connection
    // (only the head of a connection's line for tokens takes a slot back),
    // and each can go at once, where a newcomer may only find that it must
    // wait for its token and lend the slot again; serving them in their
    // connection's turn left tokens unspent (`benches/throttled.rs`, no
    // quota, fixed windows: 0.974 of capacity; served first, 0.983; 0.980
    // before slots were lent).
    returning: BTreeMap<u64, (u64, Arc<Waiter>)>,
    len: usize,
}

impl Lines {
    fn len(&self) -> usize {
        self.len
    }

    /// Puts a request taking back its slot ahead of the lines.
    fn push_returning(&mut self, line: u64, ticket: u64, waiter: Arc<Waiter>) {
        self.returning.insert(ticket, (line, waiter));
        self.len += 1;
    }

    fn push(&mut self, line: u64, ticket: u64, waiter: Arc<Waiter>) {
        let tickets = self.lines.entry(line).or_default();
        if tickets.is_empty() {
            self.turns.push_back(line);
        }
        tickets.insert(ticket, waiter);
        self.len += 1;
    }

    /// The first ticket of the line whose turn it is; that line goes to
    /// the back of the turns.
    fn pop_next(&mut self) -> Option<Arc<Waiter>> {
        if let Some((_, (_, waiter))) = self.returning.pop_first() {
            self.len -= 1;
            return Some(waiter);
        }
        let line = self.turns.pop_front()?;
        let tickets = self.lines.get_mut(&line)?;
        let (_, waiter) = tickets.pop_first()?;
        if tickets.is_empty() {
            self.lines.remove(&line);
        } else {
            self.turns.push_back(line);
        }
        self.len -= 1;
        Some(waiter)
    }

    /// Takes `ticket` out of `line`; `false` if it was not there.
    fn remove(&mut self, line: u64, ticket: u64) -> bool {
        if self.returning.remove(&ticket).is_some() {
            self.len -= 1;
            return true;
        }
        let Some(tickets) = self.lines.get_mut(&line) else {
            return false;
        };
        if tickets.remove(&ticket).is_none() {
            return false;
        }
        if tickets.is_empty() {
            self.lines.remove(&line);
            self.turns.retain(|turn| *turn != line);
        }
        self.len -= 1;
        true
    }
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

    /// Hands this ticket a slot (its ticket is already out of the lines).
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
    pub(crate) fn new(parallelism: usize, queue_limit: usize, by_line: bool) -> Self {
        Gate {
            state: Mutex::new(State {
                parallelism,
                in_flight: 0,
                lent: 0,
                lines: Lines::default(),
                stuck: BTreeMap::new(),
            }),
            lane: AtomicU64::new(0),
            queue_limit,
            by_line,
            refused: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            adaptive: None,
            closed_because: "parallelism must be at least 1",
            #[cfg(feature = "metrics")]
            publisher: crate::metrics::Publisher::default(),
        }
    }

    /// This gate publishes under `metrics`' labels.
    #[cfg(feature = "metrics")]
    pub(crate) fn publishing(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.publisher = crate::metrics::Publisher::new(metrics);
        self
    }

    /// This (closed) gate refuses every request for `reason`.
    pub(crate) fn invalid(mut self, reason: &'static str) -> Self {
        self.closed_because = reason;
        self
    }

    /// Why this gate refuses every request, if its parallelism is 0.
    pub(crate) fn closed_because(&self) -> &'static str {
        self.closed_because
    }

    /// A gate whose parallelism adapts inside `range`, starting at
    /// `parallelism` (clamped into it; the range is checked by the caller).
    /// `sampled_here`: whether the gate's futures take the samples.
    pub(crate) fn adaptive(
        parallelism: usize,
        range: std::ops::RangeInclusive<usize>,
        queue_limit: usize,
        by_line: bool,
        sampled_here: bool,
    ) -> Self {
        let limit = GradientLimit::new(range, parallelism);
        let mut gate = Gate::new(limit.parallelism(), queue_limit, by_line);
        gate.adaptive = Some(Adaptive {
            limit: Mutex::new(limit),
            sampled_here,
        });
        gate
    }

    /// Whether this gate adapts and a rate limiter inside takes its samples.
    pub(crate) fn sampled_inside(&self) -> bool {
        self.adaptive
            .as_ref()
            .is_some_and(|adaptive| !adaptive.sampled_here)
    }

    /// Whether this gate's futures time their calls for the learning.
    pub(crate) fn samples_calls(&self) -> bool {
        self.adaptive
            .as_ref()
            .is_some_and(|adaptive| adaptive.sampled_here)
    }

    /// Learns from one answer of the server (nothing for a gate that does
    /// not adapt); at the end of a round, applies the new parallelism.
    pub(crate) fn sample(&self, sample: Sample) {
        let Some(adaptive) = &self.adaptive else {
            return;
        };
        let mut limit = adaptive
            .limit
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // What the caller has ready to send: working, or waiting for a
        // slot. Not the requests waiting for their connection's token (lent
        // slots): more parallelism would not send them sooner, and counting
        // them let a paced connection's latency, flat because the rate
        // limiter spaces it, raise the limit far past any use.
        let demand = || {
            let state = self.lock();
            state.in_flight + state.lines.len()
        };
        let Some(parallelism) = limit.sample(sample, demand) else {
            return;
        };
        if parallelism != self.parallelism() {
            tracing::debug!(target: "tollgate::concurrency", parallelism, "adaptive parallelism");
            self.set_parallelism(parallelism);
        }
    }

    /// Sets the parallelism by hand; an adaptive gate learns on from it
    /// (clamped into its range). `parallelism >= 1`. Returns the value set.
    pub(crate) fn set_parallelism_by_hand(&self, parallelism: usize) -> usize {
        match &self.adaptive {
            Some(adaptive) => {
                let mut limit = adaptive
                    .limit
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                limit.reset(parallelism);
                let applied = limit.parallelism();
                self.set_parallelism(applied);
                applied
            }
            None => {
                self.set_parallelism(parallelism);
                parallelism
            }
        }
    }

    /// The state, with the fast lane's free slots taken back (so that
    /// `in_flight` counts only slots held); the lane reopens, if the gate
    /// is calm, when the guard drops.
    fn lock(&self) -> Locked<'_> {
        let mut state = self.peek();
        state.in_flight -= Lane::close(&self.lane);
        Locked { state, gate: self }
    }

    /// The state as it is, the lane left alone: for what does not read
    /// `in_flight`.
    fn peek(&self) -> MutexGuard<'_, State> {
        // No code that can panic runs under this lock; recover regardless.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A ticket: the order of arrival.
    fn next_ticket(&self) -> u64 {
        Lane::ticket(&self.lane)
    }

    /// Whether requests wait in one line per connection.
    pub(crate) fn by_line(&self) -> bool {
        self.by_line
    }

    fn line(&self, line: u64) -> u64 {
        if self.by_line {
            line
        } else {
            0
        }
    }

    /// A slot for a request if one is free and nobody waits; the caller
    /// then needs no line. (A function of `&Arc<Gate>` rather than a
    /// method on `self: &Arc<Self>`: loom's `Arc` cannot be a receiver.)
    pub(crate) fn try_slot(gate: &Arc<Gate>) -> Option<Slot> {
        if let Some(slot) = Self::lane_slot(gate) {
            return Some(slot);
        }
        let mut state = gate.lock();
        if !state.slot_free() {
            return None;
        }
        Some(Self::seat(gate, &mut state))
    }

    /// A slot from the fast lane, if it is open and has one.
    fn lane_slot(gate: &Arc<Gate>) -> Option<Slot> {
        Lane::take(&gate.lane).map(|ticket| Slot {
            gate: Arc::clone(gate),
            ticket,
            held: true,
        })
    }

    fn seat(gate: &Arc<Gate>, state: &mut State) -> Slot {
        state.in_flight += 1;
        let ticket = gate.next_ticket();
        Slot {
            gate: Arc::clone(gate),
            ticket,
            held: true,
        }
    }

    /// Admits one request, of `line`, to `gate`.
    pub(crate) fn admit(gate: &Arc<Gate>, line: u64) -> Admission {
        let line = gate.line(line);
        if let Some(slot) = Self::lane_slot(gate) {
            return Admission::Slot(slot);
        }
        let mut state = gate.lock();
        if state.parallelism == 0 {
            return Admission::Closed;
        }
        if state.slot_free() {
            return Admission::Slot(Self::seat(gate, &mut state));
        }
        if state.lines.len() + state.lent < gate.queue_limit {
            let ticket = gate.next_ticket();
            let (waiter, stuck) = Self::wait_in_line(&mut state, line, ticket, false);
            drop(state);
            if let Some(stuck) = stuck {
                stuck.wake();
            }
            return Admission::Queued(Place {
                gate: Arc::clone(gate),
                line,
                ticket,
                waiter,
                armed: true,
            });
        }
        // (Counted as refused by the caller: `send_all` holds its request
        // back instead.)
        Admission::Full
    }

    /// Gives a slot back: to the next ticket if parallelism allows,
    /// otherwise to the pool.
    fn release(&self, ticket: u64) {
        if Lane::give(&self.lane) {
            return;
        }
        let mut state = self.lock();
        let forgotten = if state.stuck.is_empty() {
            None
        } else {
            state.stuck.remove(&ticket)
        };
        // `in_flight` still counts the slot being released.
        if state.in_flight <= state.parallelism {
            if let Some(waiter) = state.lines.pop_next() {
                // The slot passes to that ticket: in_flight is unchanged.
                drop(state);
                waiter.grant();
                drop(forgotten);
                return;
            }
        }
        state.in_flight -= 1;
        let next_keeper = Self::keeper_for_waiting(&mut state);
        drop(state);
        drop(forgotten);
        if let Some(waker) = next_keeper {
            waker.wake();
        }
    }

    /// Over a lowered parallelism a retired slot is not handed on, so a
    /// ticket may still wait for the one a request kept for want of a
    /// waiting place: the keeper woken for that ticket may have been the
    /// request retiring it (on its way to the server, or lending it to the
    /// pool). The next keeper's waker, to wake once the lock is let go, so
    /// it swaps its slot with the ticket. (Without it, parallelism lowered
    /// below the slots kept by requests waiting behind their connection's
    /// head, with the head waiting for a slot, left them waiting for each
    /// other: an adaptive gate cut to 5 froze `tests/learning.rs`'s sliding
    /// window.)
    fn keeper_for_waiting(state: &mut State) -> Option<Waker> {
        match state.lines.len() {
            0 => None,
            _ => state.stuck.pop_first().map(|(_, waker)| waker),
        }
    }

    /// Lends slot `ticket` back while its request waits for a token: to
    /// the next ticket waiting (that ticket's place becomes the lender's),
    /// or to the pool if a waiting place is free. If neither, the request
    /// keeps its slot and `waker` is woken when a ticket starts waiting, to
    /// try again: the slot then goes to that ticket. (Without that second
    /// try, slots kept by requests waiting behind the head of their
    /// connection's line, with the head waiting for a slot, would wait for
    /// each other forever.)
    fn lend(&self, ticket: u64, waker: &Waker) -> bool {
        let mut state = self.lock();
        // Out of the keepers first, so that the next one woken is another.
        let forgotten = state.stuck.remove(&ticket);
        let place_free = state.lines.len() + state.lent < self.queue_limit;
        let mut handed = None;
        let mut next_keeper = None;
        if state.in_flight > state.parallelism && place_free {
            // Parallelism was lowered: the slot is not handed on.
            state.in_flight -= 1;
            next_keeper = Self::keeper_for_waiting(&mut state);
        } else if let Some(waiter) = state.lines.pop_next() {
            // A swap: in_flight and the waiting count are unchanged.
            handed = Some(waiter);
        } else if place_free {
            state.in_flight -= 1;
        } else {
            state.stuck.insert(ticket, waker.clone());
            drop(state);
            // (Dropped after the lock: dropping a waker may run the
            // executor's code.)
            drop(forgotten);
            return false;
        }
        state.lent += 1;
        drop(state);
        if let Some(waiter) = handed {
            waiter.grant();
        }
        if let Some(waker) = next_keeper {
            waker.wake();
        }
        drop(forgotten);
        true
    }

    /// Puts a ticket in its line, and takes the waker of one slot kept for
    /// want of a waiting place, to wake once the lock is let go: that
    /// request lends its slot to the ticket (a swap). One, not all: a woken
    /// request that no longer waits for a token is on its way to the
    /// server and will release its slot to the ticket anyway. (Waking
    /// every kept slot for every ticket took `benches/throttled.rs`'s
    /// million paced requests 3 to 7 times the CPU time they took before
    /// slots were lent; waking one, 1.4 to 1.5 times.)
    fn wait_in_line(
        state: &mut State,
        line: u64,
        ticket: u64,
        returning: bool,
    ) -> (Arc<Waiter>, Option<Waker>) {
        let waiter = Arc::new(Waiter::new());
        if returning {
            state
                .lines
                .push_returning(line, ticket, Arc::clone(&waiter));
        } else {
            state.lines.push(line, ticket, Arc::clone(&waiter));
        }
        let stuck = state.stuck.pop_first().map(|(_, waker)| waker);
        (waiter, stuck)
    }

    pub(crate) fn in_flight(&self) -> usize {
        let state = self.peek();
        state.in_flight - Lane::free(&self.lane)
    }

    pub(crate) fn queued(&self) -> usize {
        self.peek().lines.len()
    }

    pub(crate) fn lent(&self) -> usize {
        self.peek().lent
    }

    pub(crate) fn parallelism(&self) -> usize {
        self.peek().parallelism
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
                let Some(waiter) = state.lines.pop_next() else {
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

/// The handle's figures, from one look under the lock (so that they agree).
#[cfg(feature = "metrics")]
impl crate::metrics::Sampled for Gate {
    fn read(&self, into: &mut Vec<crate::metrics::Reading>) {
        use crate::metrics::{name, Reading};
        let state = self.peek();
        let in_flight = state.in_flight - Lane::free(&self.lane);
        into.extend([
            Reading::Level(name::GATE_IN_FLIGHT, in_flight as u64),
            Reading::Level(name::GATE_QUEUED, state.lines.len() as u64),
            Reading::Level(name::GATE_LENT, state.lent as u64),
            Reading::Level(name::GATE_PARALLELISM, state.parallelism as u64),
            Reading::Level(name::GATE_QUEUE_LIMIT, self.queue_limit as u64),
            Reading::Count(name::GATE_REFUSED, self.refused.load(Ordering::Relaxed)),
            Reading::Count(name::GATE_TIMED_OUT, self.timed_out.load(Ordering::Relaxed)),
        ]);
    }
}

/// The gate's state under its lock, the lane closed; reopens the lane on
/// drop if the gate is calm.
struct Locked<'a> {
    state: MutexGuard<'a, State>,
    gate: &'a Gate,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;

    fn deref(&self) -> &State {
        &self.state
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let state = &mut *self.state;
        // Calm: nobody waits for a slot or to lend one, and the slots in
        // flight are within the parallelism (after it was lowered, each
        // release must retire its slot, under the lock). A full gate opens
        // with no free slot: releases then go to the lane.
        if state.lines.len() == 0
            && state.stuck.is_empty()
            && state.in_flight <= state.parallelism
            && state.parallelism <= Lane::MAX_FREE
        {
            let free = state.parallelism - state.in_flight;
            state.in_flight += free;
            Lane::open(&self.gate.lane, free);
        }
    }
}

/// The fast lane: one atomic word holding the gate's ticket counter, its
/// free slots while it is calm, and whether it is open.
///
/// ```text
/// bits 63..24  ticket counter (wraps after 2^40 tickets)
/// bits 23..1   free slots, taken and given back without the lock
/// bit  0       open
/// ```
///
/// Tickets order the lines (first come, first served) and the requests
/// taking back a slot they lent. The counter has 40 bits: after 2^40
/// tickets (four months at 100,000 requests a second) it wraps, and the
/// requests waiting at that instant may be served out of order once; no
/// slot or place is lost or doubled by it. A full-width counter would cost
/// the fast lane a second atomic operation per request.
///
/// Only the lock holder opens or closes the lane; while it is closed, the
/// free slots are 0 and every take and give goes through the lock. A slot
/// given back while the lane is open goes to the word (nobody waits, or
/// the lane would be closed); one given back while it is closed goes
/// through the lock, to a waiting ticket if any. Tickets are drawn from the
/// same word so that a fast take costs one compare-and-swap: tower's
/// `ConcurrencyLimit` pays one to take a permit and the mutex of tokio's
/// semaphore to give it back.
struct Lane;

impl Lane {
    const OPEN: u64 = 1;
    const FREE_SHIFT: u32 = 1;
    const FREE_BITS: u32 = 23;
    const FREE_ONE: u64 = 1 << Self::FREE_SHIFT;
    const FREE_MASK: u64 = ((1 << Self::FREE_BITS) - 1) << Self::FREE_SHIFT;
    const TICKET_SHIFT: u32 = Self::FREE_SHIFT + Self::FREE_BITS;
    const TICKET_ONE: u64 = 1 << Self::TICKET_SHIFT;
    /// The most parallelism the lane serves (8,388,607); a gate above it
    /// decides every request under its lock.
    const MAX_FREE: usize = (1 << Self::FREE_BITS) - 1;

    fn free_of(word: u64) -> usize {
        ((word & Self::FREE_MASK) >> Self::FREE_SHIFT) as usize
    }

    /// A free slot's ticket, if the lane is open and has a slot.
    #[inline]
    fn take(lane: &AtomicU64) -> Option<u64> {
        let mut word = lane.load(Ordering::Relaxed);
        loop {
            if word & Self::OPEN == 0 || word & Self::FREE_MASK == 0 {
                return None;
            }
            let next = word.wrapping_add(Self::TICKET_ONE) - Self::FREE_ONE;
            match lane.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(word >> Self::TICKET_SHIFT),
                Err(actual) => word = actual,
            }
        }
    }

    /// Gives a slot back to the open lane; `false` if it is closed (the
    /// caller then releases under the lock).
    #[inline]
    fn give(lane: &AtomicU64) -> bool {
        let mut word = lane.load(Ordering::Relaxed);
        loop {
            if word & Self::OPEN == 0 {
                return false;
            }
            // Below `MAX_FREE`: the lane holds at most the parallelism less
            // the slots held, this one among them.
            let next = word + Self::FREE_ONE;
            match lane.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(actual) => word = actual,
            }
        }
    }

    /// Closes the lane and returns the free slots it held (lock held).
    fn close(lane: &AtomicU64) -> usize {
        let word = lane.load(Ordering::Relaxed);
        if word & (Self::OPEN | Self::FREE_MASK) == 0 {
            return 0;
        }
        Self::free_of(lane.fetch_and(!(Self::OPEN | Self::FREE_MASK), Ordering::AcqRel))
    }

    /// Opens the closed lane with `free` slots (lock held, `free <=
    /// MAX_FREE`).
    fn open(lane: &AtomicU64, free: usize) {
        lane.fetch_add(
            ((free as u64) << Self::FREE_SHIFT) | Self::OPEN,
            Ordering::AcqRel,
        );
    }

    /// The free slots in the lane now (a figure: it moves).
    fn free(lane: &AtomicU64) -> usize {
        Self::free_of(lane.load(Ordering::Relaxed))
    }

    /// The next ticket.
    fn ticket(lane: &AtomicU64) -> u64 {
        lane.fetch_add(Self::TICKET_ONE, Ordering::Relaxed) >> Self::TICKET_SHIFT
    }
}

/// A slot in flight; given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    gate: Arc<Gate>,
    // The request's first ticket: its place if it lends the slot and
    // takes it back.
    ticket: u64,
    // False once the slot has been lent (the `Lent` answers for it).
    held: bool,
}

impl Slot {
    /// Lends the slot back while its request waits for a token on `line`
    /// (`Err`: no waiting place is free, keep it; `waker` will be woken to
    /// try again).
    pub(crate) fn lend(mut self, line: u64, waker: &Waker) -> Result<Lent, Slot> {
        if !self.gate.lend(self.ticket, waker) {
            return Err(self);
        }
        self.held = false;
        Ok(Lent {
            gate: Arc::clone(&self.gate),
            line: self.gate.line(line),
            ticket: self.ticket,
            held: true,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.held {
            self.gate.release(self.ticket);
        }
    }
}

/// A slot lent back by a request waiting for its connection's token: a
/// waiting place, given up on drop.
#[derive(Debug)]
pub(crate) struct Lent {
    gate: Arc<Gate>,
    line: u64,
    ticket: u64,
    // False once reclaimed (the slot or place taken back answers for it).
    held: bool,
}

impl Lent {
    /// Takes a slot back: at once if one is free and nobody waits, else
    /// in `line` with the request's first ticket.
    pub(crate) fn reclaim(mut self) -> Result<Slot, Place> {
        let gate = Arc::clone(&self.gate);
        let (line, ticket) = (self.line, self.ticket);
        // Leaves `lent` and takes a slot or a ticket in one step under the
        // lock, so the place it held is never free in between.
        let mut state = gate.lock();
        self.held = false;
        state.lent -= 1;
        if state.slot_free() {
            state.in_flight += 1;
            drop(state);
            return Ok(Slot {
                gate,
                ticket,
                held: true,
            });
        }
        let (waiter, stuck) = Gate::wait_in_line(&mut state, line, ticket, true);
        drop(state);
        if let Some(stuck) = stuck {
            stuck.wake();
        }
        Err(Place {
            gate,
            line,
            ticket,
            waiter,
            armed: true,
        })
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if self.held {
            self.gate.lock().lent -= 1;
        }
    }
}

/// A ticket in a line. On drop it leaves the line, or, if it had been
/// handed a slot it never used, passes the slot on.
#[derive(Debug)]
pub(crate) struct Place {
    gate: Arc<Gate>,
    line: u64,
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
            ticket: self.ticket,
            held: true,
        }
    }

    /// Leaves the line if still in it (`true`); `false` means a slot was
    /// handed over meanwhile, and the ticket still holds it.
    pub(crate) fn leave(&mut self) -> bool {
        // Out of the lines means handed a slot, even if `granted` is not
        // set yet (the releaser sets it just after unlocking).
        let left = !self.waiter.granted.load(Ordering::Acquire)
            && self.gate.lock().lines.remove(self.line, self.ticket);
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
            self.gate.release(self.ticket);
        }
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.peek();
        f.debug_struct("Gate")
            .field("parallelism", &state.parallelism)
            .field("in_flight", &(state.in_flight - Lane::free(&self.lane)))
            .field("queued", &state.lines.len())
            .field("lent", &state.lent)
            .field("queue_limit", &self.queue_limit)
            .field("by_line", &self.by_line)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(p: usize, q: usize) -> Arc<Gate> {
        Arc::new(Gate::new(p, q, false))
    }

    fn cx() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    #[test]
    fn slots_then_queue_then_full() {
        let g = gate(2, 1);
        let a = Gate::admit(&g, 0);
        let b = Gate::admit(&g, 0);
        let c = Gate::admit(&g, 0);
        assert!(matches!(
            (&a, &b, &c),
            (Admission::Slot(_), Admission::Slot(_), Admission::Queued(_))
        ));
        assert!(matches!(Gate::admit(&g, 0), Admission::Full));
        assert_eq!((g.in_flight(), g.queued()), (2, 1));
        // Counted by the service's `call`, not here (`send_all` holds a
        // request back instead of refusing it).
        assert_eq!(g.refused.load(Ordering::Relaxed), 0);
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
        let running = Gate::admit(&g, 0);
        let first = Gate::admit(&g, 0);
        let second = Gate::admit(&g, 0);
        drop(first); // leaves the queue
        assert_eq!(g.queued(), 1);
        drop(running); // slot goes to `second`
        assert_eq!((g.in_flight(), g.queued()), (1, 0));
        drop(second); // handed a slot, never used it: back to the pool
        assert_eq!((g.in_flight(), g.queued()), (0, 0));
    }

    #[test]
    fn the_lane_holds_the_free_slots_only_while_nobody_waits() {
        let g = gate(2, 1);
        let a = slot(Gate::admit(&g, 0));
        // Calm after the first (locked) admission: the other slot is in
        // the lane, and the figures do not count it as in flight.
        assert_eq!(Lane::free(&g.lane), 1);
        assert_eq!(g.in_flight(), 1);
        let b = slot(Gate::admit(&g, 0));
        assert_eq!((Lane::free(&g.lane), g.in_flight()), (0, 2));
        assert!(a.ticket < b.ticket, "tickets keep the order of arrival");
        // A request queues: the lane closes, and a slot given back goes to
        // the ticket, not to the lane.
        let mut c = place(Gate::admit(&g, 0));
        assert_eq!(g.lane.load(Ordering::Relaxed) & Lane::OPEN, 0);
        drop(a);
        assert!(c.poll_granted(&mut cx()).is_ready());
        let c = c.into_slot();
        assert!(b.ticket < c.ticket);
        drop((b, c));
        assert_eq!((g.in_flight(), g.queued()), (0, 0));
        assert_eq!(Lane::free(&g.lane), 2, "calm again: both slots in the lane");
    }

    #[test]
    fn a_gate_past_the_lane_decides_under_its_lock() {
        let g = gate(Lane::MAX_FREE + 1, 0);
        let a = slot(Gate::admit(&g, 0));
        assert_eq!(g.lane.load(Ordering::Relaxed) & Lane::OPEN, 0);
        assert_eq!(g.in_flight(), 1);
        drop(a);
        assert_eq!(g.in_flight(), 0);
    }

    #[test]
    fn zero_parallelism_is_closed() {
        assert!(matches!(Gate::admit(&gate(0, 5), 0), Admission::Closed));
    }

    #[test]
    fn lowering_parallelism_lets_running_work_finish() {
        let g = gate(3, 3);
        let running: Vec<_> = (0..3).map(|_| Gate::admit(&g, 0)).collect();
        let waiting = Gate::admit(&g, 0);
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
        let _running = Gate::admit(&g, 0);
        let places: Vec<_> = (0..3)
            .map(|_| match Gate::admit(&g, 0) {
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

    fn noop() -> Waker {
        Waker::noop().clone()
    }

    fn slot(admission: Admission) -> Slot {
        match admission {
            Admission::Slot(slot) => slot,
            _ => panic!("expected a slot"),
        }
    }

    fn place(admission: Admission) -> Place {
        match admission {
            Admission::Queued(place) => place,
            _ => panic!("expected a place"),
        }
    }

    #[test]
    fn lines_take_turns_and_keep_their_order() {
        let mut lines = Lines::default();
        let waiter = || Arc::new(Waiter::new());
        // a queues a burst first, then b and c.
        for ticket in 0..4 {
            lines.push(1, ticket, waiter());
        }
        lines.push(2, 10, waiter());
        lines.push(3, 20, waiter());
        lines.push(2, 11, waiter());
        assert_eq!(lines.len(), 7);
        let order: Vec<u64> = std::iter::from_fn(|| {
            let line = *lines.turns.front()?;
            let ticket = *lines.lines.get(&line)?.keys().next()?;
            lines.pop_next().map(|_| ticket)
        })
        .collect();
        assert_eq!(order, [0, 10, 20, 1, 11, 2, 3]);
        assert!(lines.lines.is_empty() && lines.turns.is_empty());
    }

    #[test]
    fn leaving_an_emptied_line_takes_it_out_of_the_turns() {
        let mut lines = Lines::default();
        lines.push(1, 0, Arc::new(Waiter::new()));
        lines.push(2, 1, Arc::new(Waiter::new()));
        assert!(lines.remove(1, 0));
        assert!(!lines.remove(1, 0), "already gone");
        assert_eq!((lines.len(), lines.turns.len()), (1, 1));
        assert!(lines.pop_next().is_some());
        assert!(lines.pop_next().is_none());
    }

    #[test]
    fn a_lent_slot_goes_to_the_next_ticket_and_comes_back_first_in_its_line() {
        let g = Arc::new(Gate::new(1, 3, true));
        let waiting = slot(Gate::admit(&g, 7));
        let mut next = place(Gate::admit(&g, 8));
        // The request on line 7 waits for a token: its slot goes to line 8.
        let lent = waiting.lend(7, &noop()).expect("a place is free");
        assert!(next.poll_granted(&mut cx()).is_ready());
        let running = next.into_slot();
        assert_eq!((g.in_flight(), g.queued(), g.lent()), (1, 0, 1));
        // A later arrival on line 7, then the lender takes its slot back:
        // it queues ahead of the later arrival, with its first ticket.
        let mut later = place(Gate::admit(&g, 7));
        let Err(mut back) = lent.reclaim() else {
            panic!("the only slot is busy");
        };
        assert_eq!((g.queued(), g.lent()), (2, 0));
        drop(running);
        assert!(back.poll_granted(&mut cx()).is_ready());
        assert!(later.poll_granted(&mut cx()).is_pending());
        drop(back.into_slot());
        assert!(later.poll_granted(&mut cx()).is_ready());
        drop(later);
        assert_eq!((g.in_flight(), g.queued(), g.lent()), (0, 0, 0));
    }

    #[test]
    fn lent_slots_take_waiting_places_and_a_full_queue_keeps_the_slot() {
        let g = Arc::new(Gate::new(2, 1, true));
        let first = slot(Gate::admit(&g, 1));
        let second = slot(Gate::admit(&g, 1));
        let lent = first.lend(1, &noop()).expect("the one place is free");
        assert_eq!((g.in_flight(), g.lent()), (1, 1));
        // No place left for a second lender: it keeps its slot.
        let flag = std::sync::Arc::new(Flag::default());
        let waker = Waker::from(std::sync::Arc::clone(&flag));
        let Err(second) = second.lend(1, &waker) else {
            panic!("no waiting place is free");
        };
        // A newcomer takes the free slot; the next has nowhere to wait.
        let third = slot(Gate::admit(&g, 2));
        assert!(matches!(Gate::admit(&g, 2), Admission::Full));
        // The lender's token is near: the slots are busy, so it queues,
        // and the request that kept its slot is woken to lend it now.
        let Err(mut back) = lent.reclaim() else {
            panic!("both slots are busy");
        };
        assert!(flag.0.load(Ordering::SeqCst), "the keeper was woken");
        let lent_now = second.lend(1, &noop()).expect("a swap with the queued");
        assert!(back.poll_granted(&mut cx()).is_ready());
        assert_eq!((g.in_flight(), g.queued(), g.lent()), (2, 0, 1));
        drop((back.into_slot(), third, lent_now));
        assert_eq!((g.in_flight(), g.queued(), g.lent()), (0, 0, 0));
    }

    #[test]
    fn a_slot_lent_after_parallelism_was_lowered_is_not_handed_on() {
        let g = Arc::new(Gate::new(2, 5, true));
        let first = slot(Gate::admit(&g, 1));
        let _second = slot(Gate::admit(&g, 1));
        let mut waiting = place(Gate::admit(&g, 2));
        g.set_parallelism(1);
        // Two run where one may: the lent slot goes to the pool.
        let _lent = first.lend(1, &noop()).expect("a place is free");
        assert_eq!((g.in_flight(), g.queued(), g.lent()), (1, 1, 1));
        assert!(waiting.poll_granted(&mut cx()).is_pending());
    }

    #[test]
    fn a_request_taking_its_slot_back_goes_before_the_lines() {
        let g = Arc::new(Gate::new(1, 4, true));
        let waiting = slot(Gate::admit(&g, 1));
        let lent = waiting.lend(1, &noop()).expect("a place is free");
        let running = slot(Gate::admit(&g, 2));
        // A newcomer of another connection queues first...
        let mut newcomer = place(Gate::admit(&g, 3));
        // ...then the lender's token is due: it goes first all the same.
        let Err(mut back) = lent.reclaim() else {
            panic!("the slot is busy");
        };
        drop(running);
        assert!(back.poll_granted(&mut cx()).is_ready());
        assert!(newcomer.poll_granted(&mut cx()).is_pending());
    }

    #[test]
    fn one_line_gates_ignore_lines() {
        let g = gate(1, 4);
        let running = slot(Gate::admit(&g, 0));
        let mut first = place(Gate::admit(&g, 1));
        let mut second = place(Gate::admit(&g, 2));
        let mut third = place(Gate::admit(&g, 1));
        drop(running);
        assert!(first.poll_granted(&mut cx()).is_ready());
        drop(first.into_slot());
        assert!(second.poll_granted(&mut cx()).is_ready());
        assert!(third.poll_granted(&mut cx()).is_pending());
    }

    #[test]
    fn a_slot_not_handed_on_wakes_the_next_keeper_for_a_waiting_ticket() {
        let g = Arc::new(Gate::new(3, 1, true));
        let first = slot(Gate::admit(&g, 1));
        let second = slot(Gate::admit(&g, 2));
        let third = slot(Gate::admit(&g, 2));
        let lent = first.lend(1, &noop()).expect("the one place is free");
        // Both others wait for tokens behind heads of their lines; no place
        // is free, so they keep their slots.
        let (flags, wakers): (Vec<_>, Vec<_>) = (0..2)
            .map(|_| {
                let flag = std::sync::Arc::new(Flag::default());
                (std::sync::Arc::clone(&flag), Waker::from(flag))
            })
            .unzip();
        let Err(second) = second.lend(2, &wakers[0]) else {
            panic!("no waiting place is free");
        };
        let Err(third) = third.lend(2, &wakers[1]) else {
            panic!("no waiting place is free");
        };
        g.set_parallelism(1);
        // The lender's token is due; the slots are over the parallelism, so
        // it waits, and the first keeper is woken to swap with it...
        let Err(mut back) = lent.reclaim() else {
            panic!("over the parallelism");
        };
        assert!(flags[0].0.load(Ordering::SeqCst));
        // ... but its own token came meanwhile: it is sent and answered.
        // Its slot is not handed on (2 > 1): the next keeper must swap.
        drop(second);
        assert!(back.poll_granted(&mut cx()).is_pending());
        assert!(
            flags[1].0.load(Ordering::SeqCst),
            "the next keeper is woken"
        );
        let lent_now = third
            .lend(2, &noop())
            .expect("a swap with the waiting ticket");
        assert!(back.poll_granted(&mut cx()).is_ready());
        drop((back.into_slot(), lent_now));
        assert_eq!((g.in_flight(), g.queued(), g.lent()), (0, 0, 0));
    }

    #[test]
    fn a_slot_lent_to_the_pool_over_the_parallelism_wakes_the_next_keeper() {
        let g = Arc::new(Gate::new(3, 3, true));
        let lent: Vec<_> = (0..3)
            .map(|_| {
                let slot = slot(Gate::admit(&g, 1));
                slot.lend(1, &noop()).expect("a place is free")
            })
            .collect();
        let (flags, wakers): (Vec<_>, Vec<_>) = (0..2)
            .map(|_| {
                let flag = std::sync::Arc::new(Flag::default());
                (std::sync::Arc::clone(&flag), Waker::from(flag))
            })
            .unzip();
        // Two more wait for tokens behind the first three: every place is
        // taken, so they keep their slots.
        let Err(first_keeper) = slot(Gate::admit(&g, 1)).lend(1, &wakers[0]) else {
            panic!("no waiting place is free");
        };
        let Err(second_keeper) = slot(Gate::admit(&g, 1)).lend(1, &wakers[1]) else {
            panic!("no waiting place is free");
        };
        g.set_parallelism(1);
        let mut lent = lent.into_iter();
        drop(lent.next());
        // The head's token is due: it waits for a slot, waking a keeper...
        let Err(mut head) = lent.next().unwrap().reclaim() else {
            panic!("over the parallelism");
        };
        assert!(flags[0].0.load(Ordering::SeqCst));
        // ... which lends to the pool (over the parallelism, a place free),
        // so the next keeper must be woken to swap with the head.
        let lent_first = first_keeper.lend(1, &noop()).expect("a place is free");
        assert!(head.poll_granted(&mut cx()).is_pending());
        assert!(
            flags[1].0.load(Ordering::SeqCst),
            "the next keeper is woken"
        );
        let lent_second = second_keeper
            .lend(1, &noop())
            .expect("a swap with the head");
        assert!(head.poll_granted(&mut cx()).is_ready());
        drop((head.into_slot(), lent_first, lent_second, lent));
        assert_eq!((g.in_flight(), g.queued(), g.lent()), (0, 0, 0));
    }

    #[derive(Default)]
    struct Flag(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Flag {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// loom models of the gate's core: every interleaving of admission,
/// release, cancellation, re-sizing, lending and taking back, checked for
/// lost wake-ups (a waiter loom finds blocked forever) and for slots or
/// places leaked or counted twice (the counts at the end). Run by CI, with the command in
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
        assert_eq!(gate.lent(), 0, "a lent slot was not given up");
        (gate.in_flight(), gate.queued())
    }

    /// Waits for `place`'s slot and holds it.
    fn seated(mut place: Place) -> Slot {
        block_on(poll_fn(|cx| place.poll_granted(cx)));
        place.into_slot()
    }

    /// Waits for `place`'s slot and gives it back.
    fn wait_then_run(mut place: Place) {
        block_on(poll_fn(|cx| place.poll_granted(cx)));
        drop(place.into_slot());
    }

    /// A request that must find a free slot.
    fn seated_now(gate: &Arc<Gate>) -> Slot {
        match Gate::admit(gate, 0) {
            Admission::Slot(slot) => slot,
            _ => panic!("a slot was free"),
        }
    }

    /// A request arriving on a thread of its own: it runs at once or waits
    /// its turn, then gives its slot back.
    fn arrive_and_run(gate: &Arc<Gate>) -> thread::JoinHandle<()> {
        let gate = Arc::clone(gate);
        thread::spawn(move || match Gate::admit(&gate, 0) {
            Admission::Queued(place) => wait_then_run(place),
            Admission::Slot(slot) => drop(slot),
            _ => panic!("refused with a place free"),
        })
    }

    #[test]
    fn loom_a_freed_slot_reaches_the_waiter() {
        loom::model(|| {
            let gate = Arc::new(Gate::new(1, 1, false));
            let Admission::Slot(slot) = Gate::admit(&gate, 0) else {
                panic!("the first request runs");
            };
            let waiter = arrive_and_run(&gate);
            drop(slot);
            waiter.join().unwrap();
            assert_eq!(settled(&gate), (0, 0));
        });
    }

    #[test]
    fn loom_slots_given_back_through_the_lane_reach_a_request_that_queues() {
        loom::model(|| {
            let gate = Arc::new(Gate::new(2, 1, false));
            let (first, second) = (seated_now(&gate), seated_now(&gate));
            let releasing = thread::spawn(move || drop(first));
            let third = arrive_and_run(&gate);
            drop(second);
            releasing.join().unwrap();
            third.join().unwrap();
            assert_eq!(settled(&gate), (0, 0));
        });
    }

    #[test]
    fn loom_lowering_parallelism_as_a_slot_goes_back_through_the_lane() {
        loom::model(|| {
            let gate = Arc::new(Gate::new(2, 1, false));
            let (first, second) = (seated_now(&gate), seated_now(&gate));
            let other = Arc::clone(&gate);
            let lowering = thread::spawn(move || other.set_parallelism(1));
            drop(first);
            lowering.join().unwrap();
            // One slot held, parallelism 1: a newcomer waits.
            let Admission::Queued(place) = Gate::admit(&gate, 0) else {
                panic!("admitted over the lowered parallelism");
            };
            drop(second);
            wait_then_run(place);
            assert_eq!(settled(&gate), (0, 0));
        });
    }

    #[test]
    fn loom_a_waiter_leaving_as_its_slot_frees_neither_leaks_nor_doubles() {
        loom::model(|| {
            let gate = Arc::new(Gate::new(1, 1, false));
            let Admission::Slot(slot) = Gate::admit(&gate, 0) else {
                panic!("the first request runs");
            };
            let Admission::Queued(place) = Gate::admit(&gate, 0) else {
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
            let gate = Arc::new(Gate::new(1, 2, false));
            let Admission::Slot(slot) = Gate::admit(&gate, 0) else {
                panic!("the first request runs");
            };
            let (Admission::Queued(first), Admission::Queued(second)) =
                (Gate::admit(&gate, 0), Gate::admit(&gate, 0))
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

    #[test]
    fn loom_a_lender_takes_its_slot_back_from_the_request_it_lent_it_to() {
        loom::model(|| {
            let gate = Arc::new(Gate::new(1, 2, true));
            let Admission::Slot(waiting) = Gate::admit(&gate, 1) else {
                panic!("the first request runs");
            };
            let Admission::Queued(ready) = Gate::admit(&gate, 2) else {
                panic!("the second waits");
            };
            let noop = std::task::Waker::noop().clone();
            let Ok(lent) = waiting.lend(1, &noop) else {
                panic!("a place is free");
            };
            // The borrower runs while the lender's token comes.
            let borrower = thread::spawn(move || drop(seated(ready)));
            match lent.reclaim() {
                Ok(slot) => drop(slot),
                Err(place) => drop(seated(place)),
            }
            borrower.join().unwrap();
            assert_eq!(settled(&gate), (0, 0));
        });
    }

    #[test]
    fn loom_a_kept_slot_is_lent_when_a_lender_comes_back_for_one() {
        loom::model(|| {
            // One waiting place: the first lender takes it, so the second
            // request must keep its slot until the first comes back.
            let gate = Arc::new(Gate::new(1, 1, true));
            let Admission::Slot(first) = Gate::admit(&gate, 1) else {
                panic!("the first request runs");
            };
            let noop = std::task::Waker::noop().clone();
            let Ok(lent) = first.lend(1, &noop) else {
                panic!("the place is free");
            };
            let Admission::Slot(second) = Gate::admit(&gate, 1) else {
                panic!("the lent slot is free");
            };
            let keeper = thread::spawn(move || {
                // As the rate limiter does: try to lend on every poll.
                let mut kept = Some(second);
                let lent = block_on(poll_fn(|cx| {
                    match kept.take().expect("polled until lent").lend(1, cx.waker()) {
                        Ok(lent) => Poll::Ready(lent),
                        Err(slot) => {
                            kept = Some(slot);
                            Poll::Pending
                        }
                    }
                }));
                drop(lent);
            });
            match lent.reclaim() {
                Ok(slot) => drop(slot),
                Err(place) => drop(seated(place)),
            }
            keeper.join().unwrap();
            assert_eq!(settled(&gate), (0, 0));
        });
    }

    #[test]
    fn loom_a_keeper_woken_that_sends_instead_wakes_the_next() {
        loom::model(|| {
            // One waiting place, taken by a lender; two more requests wait
            // for tokens behind it and keep their slots; parallelism is cut
            // to 1.
            let gate = Arc::new(Gate::new(3, 1, true));
            let seat = |gate: &Arc<Gate>| match Gate::admit(gate, 1) {
                Admission::Slot(slot) => slot,
                _ => panic!("a slot is free"),
            };
            let (first, second, third) = (seat(&gate), seat(&gate), seat(&gate));
            let noop = std::task::Waker::noop().clone();
            let Ok(lent) = first.lend(1, &noop) else {
                panic!("the place is free");
            };
            gate.set_parallelism(1);
            // Each keeper's token comes after the first has been sent (the
            // rate limiter's line order): main sets it, and wakes the
            // keeper, as the token's timer would.
            let tokens: [_; 2] = std::array::from_fn(|_| {
                std::sync::Arc::new((AtomicBool::new(false), AtomicWaker::new()))
            });
            // The second tries to lend once; woken (by the gate, or its
            // token), its token has come: it is sent and answered instead
            // of lending (the slot retires).
            let sends = thread::spawn({
                let token = std::sync::Arc::clone(&tokens[0]);
                move || {
                    let mut kept = Some(second);
                    let mut tried = false;
                    let lent = block_on(poll_fn(|cx| {
                        token.1.register(cx.waker());
                        if std::mem::replace(&mut tried, true) || token.0.load(Ordering::Acquire) {
                            return Poll::Ready(None);
                        }
                        match kept.take().expect("tried once").lend(1, cx.waker()) {
                            Ok(lent) => Poll::Ready(Some(lent)),
                            Err(slot) => {
                                kept = Some(slot);
                                Poll::Pending
                            }
                        }
                    }));
                    drop((lent, kept));
                }
            });
            // The third lends when it can, until its token comes.
            let keeps = thread::spawn({
                let token = std::sync::Arc::clone(&tokens[1]);
                move || {
                    let mut kept = Some(third);
                    let lent = block_on(poll_fn(|cx| {
                        token.1.register(cx.waker());
                        if token.0.load(Ordering::Acquire) {
                            return Poll::Ready(None);
                        }
                        match kept.take().expect("polled until lent").lend(1, cx.waker()) {
                            Ok(lent) => Poll::Ready(Some(lent)),
                            Err(slot) => {
                                kept = Some(slot);
                                Poll::Pending
                            }
                        }
                    }));
                    drop((lent, kept));
                }
            });
            // The first's token is due: it takes a slot back (it would wait
            // forever if a woken keeper that sent instead woke no other).
            match lent.reclaim() {
                Ok(slot) => drop(slot),
                Err(place) => drop(seated(place)),
            }
            for token in &tokens {
                token.0.store(true, Ordering::Release);
                token.1.wake();
            }
            sends.join().unwrap();
            keeps.join().unwrap();
            assert_eq!(settled(&gate), (0, 0));
        });
    }

    #[test]
    fn loom_a_lender_dropped_while_others_come_and_go() {
        loom::model(|| {
            let gate = Arc::new(Gate::new(1, 2, true));
            let Admission::Slot(first) = Gate::admit(&gate, 1) else {
                panic!("the first request runs");
            };
            let noop = std::task::Waker::noop().clone();
            let Ok(lent) = first.lend(1, &noop) else {
                panic!("a place is free");
            };
            let other = Arc::clone(&gate);
            let newcomer = thread::spawn(move || match Gate::admit(&other, 2) {
                Admission::Slot(slot) => drop(slot),
                Admission::Queued(place) => drop(seated(place)),
                _ => panic!("refused with a place free"),
            });
            // The lender's request is cancelled while it waits.
            drop(lent);
            newcomer.join().unwrap();
            assert_eq!(settled(&gate), (0, 0));
        });
    }
}
