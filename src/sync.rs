//! The synchronisation the concurrency gate and the rate limiter's wait
//! lines are built on: std's (and futures' `AtomicWaker`), or loom's when
//! the loom models run, so that loom explores every interleaving of the
//! gate's admission, release and cancellation and of a wait line's joins,
//! hand-overs and departures:
//!
//! ```sh
//! RUSTFLAGS="--cfg tollgate_loom" LOOM_MAX_PREEMPTIONS=3 \
//!     CARGO_TARGET_DIR=target/loom cargo test --lib loom
//! ```

/// loom's `AtomicWaker`, with futures' `register(&Waker)`.
#[cfg(all(test, tollgate_loom))]
#[derive(Debug)]
pub(crate) struct AtomicWaker(loom::future::AtomicWaker);

#[cfg(all(test, tollgate_loom))]
impl AtomicWaker {
    pub(crate) fn new() -> Self {
        AtomicWaker(loom::future::AtomicWaker::new())
    }

    pub(crate) fn register(&self, waker: &std::task::Waker) {
        self.0.register_by_ref(waker);
    }

    pub(crate) fn wake(&self) {
        self.0.wake();
    }
}
#[cfg(all(test, tollgate_loom))]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
#[cfg(all(test, tollgate_loom))]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

#[cfg(not(all(test, tollgate_loom)))]
pub(crate) use futures_util::task::AtomicWaker;
#[cfg(not(all(test, tollgate_loom)))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
#[cfg(not(all(test, tollgate_loom)))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};
