//! tollgate's keyed buckets beside governor's direct and keyed limiters, in
//! one criterion run; and the memory a key costs in each.
//!
//! cargo bench --bench rate_limit

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use governor::clock::{Clock, DefaultClock, MonotonicClock};
use governor::{Quota as GovernorQuota, RateLimiter};
use tollgate::rate_limit::{Bucket, Buckets};
use tollgate::{ConnectionKey, Quota};

/// Counts live heap bytes, to measure what a key costs.
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

/// One token per 10 ms with a burst of `u32::MAX`: every acquire in a run
/// is admitted (the admit path is measured, not refusals), and no bucket
/// refills to full while the 1024 keys take their turns (a full bucket is
/// dropped by tollgate's store, which would measure re-insertion instead).
const INTERVAL: Duration = Duration::from_millis(10);

fn tollgate_quota() -> Quota {
    Quota::new(1, INTERVAL).burst(u32::MAX)
}

fn governor_quota() -> GovernorQuota {
    GovernorQuota::with_period(INTERVAL)
        .unwrap()
        .allow_burst(NonZeroU32::MAX)
}

fn keys(n: usize) -> Vec<ConnectionKey> {
    (0..n)
        .map(|i| ConnectionKey::new(format!("conn-{i}")))
        .collect()
}

fn acquire(c: &mut Criterion) {
    let mut group = c.benchmark_group("acquire, one key");
    group.bench_function("governor direct", |b| {
        let limiter = RateLimiter::direct(governor_quota());
        b.iter(|| limiter.check().is_ok());
    });
    let key = ConnectionKey::new("conn-0");
    group.bench_function("governor direct, std Instant clock", |b| {
        let limiter = RateLimiter::direct_with_clock(governor_quota(), MonotonicClock);
        b.iter(|| limiter.check().is_ok());
    });
    group.bench_function("tollgate Bucket (direct)", |b| {
        let bucket = Bucket::new(tollgate_quota()).unwrap();
        b.iter(|| bucket.try_acquire().is_ok());
    });
    group.bench_function("governor keyed (dashmap)", |b| {
        let limiter = RateLimiter::keyed(governor_quota());
        b.iter(|| limiter.check_key(black_box(&key)).is_ok());
    });
    group.bench_function("governor keyed (dashmap), std Instant clock", |b| {
        let limiter = RateLimiter::dashmap_with_clock(governor_quota(), MonotonicClock);
        b.iter(|| limiter.check_key(black_box(&key)).is_ok());
    });
    group.bench_function("tollgate Buckets (keyed)", |b| {
        let buckets = Buckets::new(tollgate_quota(), 10_000).unwrap();
        b.iter(|| buckets.try_acquire(black_box(&key)).is_ok());
    });
    group.finish();

    // What each limiter pays just to read its clock.
    let mut group = c.benchmark_group("clock read");
    group.bench_function("governor default (quanta)", |b| {
        let clock = DefaultClock::default();
        b.iter(|| black_box(clock.now()));
    });
    group.bench_function("std::time::Instant::now", |b| {
        b.iter(|| black_box(std::time::Instant::now()));
    });
    group.bench_function("tokio::time::Instant::now (test-util on)", |b| {
        b.iter(|| black_box(tokio::time::Instant::now()));
    });
    group.finish();

    let mut group = c.benchmark_group("acquire, 1024 keys round robin");
    let many = keys(1024);
    group.bench_function("governor keyed (dashmap)", |b| {
        let limiter = RateLimiter::keyed(governor_quota());
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % many.len();
            limiter.check_key(&many[i]).is_ok()
        });
    });
    group.bench_function("governor keyed (dashmap), std Instant clock", |b| {
        let limiter = RateLimiter::dashmap_with_clock(governor_quota(), MonotonicClock);
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % many.len();
            limiter.check_key(&many[i]).is_ok()
        });
    });
    group.bench_function("tollgate Buckets (keyed)", |b| {
        let buckets = Buckets::new(tollgate_quota(), 10_000).unwrap();
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % many.len();
            buckets.try_acquire(&many[i]).is_ok()
        });
    });
    group.finish();
}

/// Live heap bytes per key after inserting `n` keys that already exist
/// (so the keys' own names are not counted, only what the store adds).
/// One request a minute per key, so no bucket is full (and dropped) before
/// the count.
fn memory_per_key() {
    const N: usize = 10_000;
    let names = keys(N);

    let before = LIVE.load(Ordering::Relaxed);
    let buckets = Buckets::new(Quota::per_minute(1), 2 * N).unwrap();
    for key in &names {
        buckets.try_acquire(key).unwrap();
    }
    let tollgate = (LIVE.load(Ordering::Relaxed) - before) as f64 / N as f64;
    assert_eq!(buckets.keys(), N);

    let before = LIVE.load(Ordering::Relaxed);
    let limiter = RateLimiter::keyed(GovernorQuota::per_minute(NonZeroU32::MIN));
    for key in &names {
        limiter.check_key(key).unwrap();
    }
    let governor = (LIVE.load(Ordering::Relaxed) - before) as f64 / N as f64;
    // (governor 0.10's keyed `len()` answered 16 here, so it is not checked.)

    println!("memory per key, {N} ConnectionKeys (what the store adds, names excluded):");
    println!("  tollgate Buckets (max_keys 2N):  {tollgate:.0} bytes");
    println!("  governor keyed (dashmap):        {governor:.0} bytes");
    println!(
        "  size_of::<ConnectionKey>() = {}",
        std::mem::size_of::<ConnectionKey>()
    );
    drop((buckets, limiter));
}

fn benches(c: &mut Criterion) {
    memory_per_key();
    acquire(c);
}

criterion_group!(rate_limit, benches);
criterion_main!(rate_limit);
