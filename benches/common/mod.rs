//! What the benches share: a global allocator that counts live heap bytes
//! (what a key or a queued request costs), and the seeded randomness and
//! tower retry policy of the throttling runs.

// Each bench uses the part it needs.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::retry::backoff::{
    Backoff as _, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff,
};
use tower::util::rng::Rng;

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every method forwards to `System` unchanged with the caller's own
// arguments, so `System`'s guarantees carry over; the counter is a side
// effect that touches no memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap bytes allocated and not yet freed, by the whole process.
pub fn live_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Retries a throttling run allows each lead.
pub const RETRIES: u32 = 4;

/// SplitMix64: the seeded randomness of the runs.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// tower's `Rng`, seeded: SplitMix64 over a counter.
#[derive(Clone)]
pub struct SeededRng(u64);

impl Rng for SeededRng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0)
    }
}

/// What a tower user writes: retry 429s with tower's exponential backoff.
/// tower clones the policy for every request; each clone starts a backoff
/// with a new seed, so requests don't share one jitter sequence.
pub struct TowerPolicy {
    backoff: ExponentialBackoff<SeededRng>,
    retries_left: u32,
    seeds: Arc<AtomicU64>,
}

impl TowerPolicy {
    pub fn new() -> Self {
        let seeds = Arc::new(AtomicU64::new(0));
        TowerPolicy {
            backoff: Self::backoff(&seeds),
            retries_left: RETRIES,
            seeds,
        }
    }

    /// 500 ms doubling to 16 s, plus up to 100% jitter.
    fn backoff(seeds: &AtomicU64) -> ExponentialBackoff<SeededRng> {
        let seed = mix(seeds.fetch_add(1, Ordering::Relaxed));
        let mut maker = ExponentialBackoffMaker::new(
            Duration::from_millis(500),
            Duration::from_secs(16),
            1.0,
            SeededRng(seed),
        )
        .expect("a valid backoff");
        maker.make_backoff()
    }
}

impl Clone for TowerPolicy {
    fn clone(&self) -> Self {
        TowerPolicy {
            backoff: Self::backoff(&self.seeds),
            retries_left: self.retries_left,
            seeds: Arc::clone(&self.seeds),
        }
    }
}

impl<B: Clone, R, E> tower::retry::Policy<Request<B>, Response<R>, E> for TowerPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _: &mut Request<B>,
        result: &mut Result<Response<R>, E>,
    ) -> Option<Self::Future> {
        match result {
            Ok(response)
                if response.status() == StatusCode::TOO_MANY_REQUESTS && self.retries_left > 0 =>
            {
                self.retries_left -= 1;
                Some(self.backoff.next_backoff())
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        let mut copy = Request::new(request.body().clone());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        Some(copy)
    }
}
