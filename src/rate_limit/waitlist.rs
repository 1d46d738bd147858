//! Requests waiting for a token, in arrival order, per key.
//!
//! Only the head of a key's list sleeps until the bucket says a token will
//! be ready; the others wait to be woken. When the head takes its token (or
//! gives up, or is dropped) it wakes the next. So a token costs one wake-up,
//! not one per waiter, and waiters on a key are served in order.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll, Waker};

use super::keyed::Figures;
use crate::sync::{AtomicU64, Mutex, MutexGuard};

/// The wait lists of every key that has waiters; keys without waiters have
/// no list (and cost nothing here).
pub(crate) struct WaitLists<K> {
    lists: Mutex<HashMap<K, VecDeque<Waiter>>>,
    next_ticket: AtomicU64,
    // `figures.waiting` counts waiters across all keys: it lets a request
    // skip the lock when nobody waits anywhere, the common case.
    figures: Arc<Figures>,
}

struct Waiter {
    ticket: u64,
    waker: Option<Waker>,
}

impl<K: Hash + Eq + Clone> WaitLists<K> {
    pub(crate) fn new(figures: Arc<Figures>) -> Self {
        WaitLists {
            lists: Mutex::new(HashMap::new()),
            next_ticket: AtomicU64::new(0),
            figures,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, VecDeque<Waiter>>> {
        // Only `Hash`/`Eq` of K could panic under this lock; recover.
        self.lists.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether requests are waiting on `key` (a newcomer then queues
    /// behind them instead of taking a token first).
    pub(crate) fn has_waiters(&self, key: &K) -> bool {
        self.figures.waiting.load(Ordering::Acquire) > 0 && self.lock().contains_key(key)
    }

    /// How many requests wait on `key`.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn len(&self, key: &K) -> usize {
        if self.figures.waiting.load(Ordering::Acquire) == 0 {
            return 0;
        }
        self.lock().get(key).map_or(0, VecDeque::len)
    }

    /// Joins the end of `key`'s list; also says how many wait ahead.
    pub(crate) fn join(self: &Arc<Self>, key: &K) -> (Ticket<K>, usize) {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let ahead = {
            let mut lists = self.lock();
            let list = lists.entry(key.clone()).or_default();
            list.push_back(Waiter {
                ticket,
                waker: None,
            });
            list.len() - 1
        };
        self.figures.waiting.fetch_add(1, Ordering::AcqRel);
        let ticket = Ticket {
            lists: Arc::clone(self),
            key: key.clone(),
            ticket,
        };
        (ticket, ahead)
    }

    /// Removes `ticket`; if it was the head, wakes the new head.
    fn leave(&self, key: &K, ticket: u64) {
        let next = {
            let mut lists = self.lock();
            let Entry::Occupied(mut list) = lists.entry(key.clone()) else {
                return;
            };
            let was_head = list.get().front().is_some_and(|w| w.ticket == ticket);
            list.get_mut().retain(|w| w.ticket != ticket);
            let next = if was_head {
                list.get_mut().front_mut().and_then(|w| w.waker.take())
            } else {
                None
            };
            if list.get().is_empty() {
                list.remove();
            }
            next
        };
        self.figures.waiting.fetch_sub(1, Ordering::AcqRel);
        if let Some(waker) = next {
            waker.wake();
        }
    }
}

/// A place in a key's wait list; leaves it (waking the next head if this
/// was the head) on drop.
pub(crate) struct Ticket<K: Hash + Eq + Clone> {
    lists: Arc<WaitLists<K>>,
    key: K,
    ticket: u64,
}

impl<K: Hash + Eq + Clone> Ticket<K> {
    /// Ready when this ticket is at the head of its list; otherwise keeps
    /// the task's waker for the head before it to wake.
    pub(crate) fn poll_head(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut lists = self.lists.lock();
        let Some(list) = lists.get_mut(&self.key) else {
            return Poll::Ready(());
        };
        if list.front().is_none_or(|w| w.ticket == self.ticket) {
            return Poll::Ready(());
        }
        if let Some(waiter) = list.iter_mut().find(|w| w.ticket == self.ticket) {
            waiter.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl<K: Hash + Eq + Clone> Drop for Ticket<K> {
    fn drop(&mut self) {
        self.lists.leave(&self.key, self.ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::task::Wake;

    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn head_first_then_each_in_turn() {
        let lists = Arc::new(WaitLists::new(Arc::default()));
        let (a, none_ahead) = lists.join(&"k");
        let (b, one_ahead) = lists.join(&"k");
        let (c, _) = lists.join(&"k");
        let (other, _) = lists.join(&"other");
        assert_eq!((none_ahead, one_ahead), (0, 1));
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(Arc::clone(&flag));
        let mut cx = Context::from_waker(&waker);
        assert!(a.poll_head(&mut cx).is_ready());
        assert!(other.poll_head(&mut cx).is_ready(), "lists are per key");
        assert!(b.poll_head(&mut cx).is_pending());
        assert!(c
            .poll_head(&mut Context::from_waker(Waker::noop()))
            .is_pending());
        assert_eq!(lists.figures.waiting.load(Ordering::SeqCst), 4);
        drop(a);
        assert!(flag.0.load(Ordering::SeqCst), "the new head was woken");
        assert!(b.poll_head(&mut cx).is_ready());
        // Leaving from the middle wakes no one and keeps the order.
        drop(c);
        assert!(b.poll_head(&mut cx).is_ready());
        drop((b, other));
        assert_eq!(lists.figures.waiting.load(Ordering::SeqCst), 0);
        assert!(!lists.has_waiters(&"k"));
        assert!(lists.lock().is_empty());
    }
}

/// loom models of a wait line: every interleaving of joins, departures and
/// the head's hand-over, checked for lost wake-ups (loom reports a waiter
/// blocked forever) and for the waiting count (which lets newcomers skip
/// the lock) going wrong. Run by CI, with the command in `src/sync.rs`.
#[cfg(all(test, tollgate_loom))]
mod loom_models {
    use std::future::poll_fn;

    use loom::future::block_on;
    use loom::thread;

    use super::*;

    fn waiting(lists: &WaitLists<&'static str>) -> usize {
        lists.figures.waiting.load(Ordering::SeqCst)
    }

    #[test]
    fn loom_the_next_in_line_is_woken_when_the_head_leaves() {
        loom::model(|| {
            let lists = Arc::new(WaitLists::new(Arc::default()));
            let (head, _) = lists.join(&"k");
            let (next, _) = lists.join(&"k");
            let (last, _) = lists.join(&"k");
            let leaving = thread::spawn(move || drop(head));
            // The middle of the line leaves at the same time.
            let middle = thread::spawn(move || drop(next));
            block_on(poll_fn(|cx| last.poll_head(cx)));
            leaving.join().unwrap();
            middle.join().unwrap();
            drop(last);
            assert!(!lists.has_waiters(&"k"));
            assert_eq!(waiting(&lists), 0);
        });
    }

    #[test]
    fn loom_a_newcomer_racing_the_last_waiter_out() {
        loom::model(|| {
            let lists = Arc::new(WaitLists::new(Arc::default()));
            let (head, _) = lists.join(&"k");
            let leaving = thread::spawn(move || drop(head));
            // As the future does: queue only behind someone; then wait to
            // be first.
            if lists.has_waiters(&"k") {
                let (ticket, _) = lists.join(&"k");
                block_on(poll_fn(|cx| ticket.poll_head(cx)));
            }
            leaving.join().unwrap();
            assert_eq!(waiting(&lists), 0);
            assert!(lists.lock().is_empty());
        });
    }
}
