//! tollgate's keyed buckets beside governor's direct and keyed limiters, in
//! one criterion run; and the memory a key costs in each.
//!
//! cargo bench --bench rate_limit

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use governor::clock::{Clock, DefaultClock, MonotonicClock};
use governor::{Quota as GovernorQuota, RateLimiter};
use tollgate::rate_limit::{Bucket, Buckets};
use tollgate::{ConnectionKey, Quota};

use common::live_bytes;

/// One token per 10 ms with a burst of `u32::MAX`: every acquire in a run
/// is admitted, so the admit path is measured, not refusals. (With a
/// million keys a bucket does refill between its turns; tollgate drops full
/// buckets only to make room, and its stores here have room to spare.)
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

    round_robin(c, 1024);
    round_robin(c, 1_000_000);
}

/// Acquire on `n` keys in turn: the store's lookup with `n` keys live.
/// tollgate's store gets `max_keys(2n)`, so no bucket is evicted mid-run
/// (its shards are bounded one by one and start evicting slightly early).
fn round_robin(c: &mut Criterion, n: usize) {
    let mut group = c.benchmark_group(format!("acquire, {n} keys round robin"));
    let many = keys(n);
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
        let buckets = Buckets::new(tollgate_quota(), 2 * n).unwrap();
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
fn memory_per_key(n: usize) {
    let names = keys(n);

    let before = live_bytes();
    let buckets = Buckets::new(Quota::per_minute(1), 2 * n).unwrap();
    for key in &names {
        buckets.try_acquire(key).unwrap();
    }
    let tollgate = (live_bytes() - before) as f64 / n as f64;
    assert_eq!(buckets.keys(), n);

    let before = live_bytes();
    let limiter = RateLimiter::keyed(GovernorQuota::per_minute(NonZeroU32::MIN));
    for key in &names {
        limiter.check_key(key).unwrap();
    }
    let governor = (live_bytes() - before) as f64 / n as f64;
    // (governor 0.10's keyed `len()` answered 16 here, so it is not checked.)

    println!("memory per key, {n} ConnectionKeys (what the store adds, names excluded):");
    println!("  tollgate Buckets (max_keys 2N):  {tollgate:.0} bytes");
    println!("  governor keyed (dashmap):        {governor:.0} bytes");
    println!(
        "  size_of::<ConnectionKey>() = {}",
        std::mem::size_of::<ConnectionKey>()
    );
    drop((buckets, limiter));
}

fn benches(c: &mut Criterion) {
    memory_per_key(10_000);
    memory_per_key(1_000_000);
    acquire(c);
}

criterion_group!(rate_limit, benches);
criterion_main!(rate_limit);
