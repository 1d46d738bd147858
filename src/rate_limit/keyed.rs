//! Buckets by key, in bounded memory.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use super::bucket::{Bucket, Gcra};
use super::Quota;
use crate::Error;

/// Most shards a store splits into, so that tasks on different cores
/// rarely wait for the same lock.
const MAX_SHARDS: usize = 16;

/// Fewest keys a shard holds: with fewer, an unlucky spread of a handful of
/// keys over the shards would evict long before `max_keys`.
const MIN_SHARD_KEYS: usize = 64;

/// Token buckets by key, one [`Quota`] for all, in at most `max_keys`
/// entries. The store behind [`RateLimit`](crate::RateLimit), usable on its
/// own outside tower.
///
/// ```
/// use std::time::Duration;
/// use tollgate::rate_limit::Buckets;
/// use tollgate::Quota;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), tollgate::Error> {
/// let buckets = Buckets::new(Quota::per_second(2), 10_000)?;
/// assert!(buckets.try_acquire(&"crm").is_ok());
/// assert!(buckets.try_acquire(&"crm").is_ok());
/// assert_eq!(buckets.try_acquire(&"crm"), Err(Duration::from_millis(500)));
/// assert!(buckets.try_acquire(&"erp").is_ok()); // another key, its own bucket
/// # Ok(())
/// # }
/// ```
///
/// # Memory
///
/// A key costs one hash-map entry (the key and a 16-byte slot) and one more
/// copy of the key in the eviction queue; for a [`ConnectionKey`](crate::ConnectionKey)
/// that is about 150 bytes, measured in `benches/rate_limit.rs`. Keys never
/// exceed `max_keys`:
///
/// - every insertion first drops up to two keys at the eviction hand whose
///   bucket is **full**: a full bucket behaves exactly like a new one, so
///   forgetting it loses nothing ([`evict_idle`](Buckets::evict_idle) drops
///   all of them at once);
/// - when the store is still full, it evicts by CLOCK, the second-chance
///   approximation of least-recently-used: a key used since the hand last
///   passed gets another round, the first one that was not is dropped.
///   Dropping an active key forgets what it owed: its next request starts
///   from a full bucket. Size `max_keys` above the connections you use.
///
/// The bound is spread over up to 16 shards of at least 64 keys each (one
/// shard below 128 keys), so a large store can start evicting a little
/// before it holds exactly `max_keys`.
pub struct Buckets<K> {
    gcra: Gcra,
    epoch: Instant,
    shards: Box<[RwLock<Shard<K>>]>,
    hasher: RandomState,
    per_shard: usize,
    figures: Arc<Figures>,
}

struct Shard<K> {
    map: HashMap<K, Slot>,
    // Every key of `map` once, in CLOCK order; the front is the hand.
    clock: VecDeque<K>,
}

#[derive(Default)]
struct Slot {
    bucket: Bucket,
    // Set on use, cleared when the CLOCK hand passes: a second chance.
    referenced: AtomicBool,
}

/// Live counts shared by a store and every handle on it.
#[derive(Debug, Default)]
pub(crate) struct Figures {
    pub(crate) keys: AtomicUsize,
    pub(crate) evicted_active: AtomicU64,
    pub(crate) admitted: AtomicU64,
    pub(crate) waiting: AtomicUsize,
    pub(crate) cool_downs: AtomicU64,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// Buckets of `quota`, at most `max_keys` of them.
    ///
    /// [`Error::InvalidConfig`] for an invalid quota or `max_keys == 0`.
    pub fn new(quota: Quota, max_keys: usize) -> Result<Self, Error> {
        quota.validate()?;
        let gcra = Gcra::new(&quota)
            .ok_or_else(|| Error::invalid_config("quota", format!("{quota:?}")))?;
        if max_keys == 0 {
            return Err(Error::invalid_config(
                "rate limit",
                "max_keys must be at least 1",
            ));
        }
        // A power of two, each shard holding at least MIN_SHARD_KEYS (or
        // everything, when max_keys is smaller), together at most max_keys.
        let shards = match max_keys / MIN_SHARD_KEYS {
            0 => 1,
            fit => MAX_SHARDS.min(1 << fit.ilog2()),
        };
        Ok(Buckets {
            gcra,
            epoch: Instant::now(),
            shards: (0..shards)
                .map(|_| {
                    RwLock::new(Shard {
                        map: HashMap::new(),
                        clock: VecDeque::new(),
                    })
                })
                .collect(),
            hasher: RandomState::new(),
            per_shard: max_keys / shards,
            figures: Arc::default(),
        })
    }

    /// Takes a token from `key`'s bucket, or says how long until one is
    /// ready.
    pub fn try_acquire(&self, key: &K) -> Result<(), Duration> {
        let now = self.now();
        self.acquire_at(key, now)
            .map_err(|ready_at| Duration::from_nanos(ready_at - now))
    }

    /// Holds every request on `key` for `pause` from now (a shorter pause
    /// never cuts a longer one short); afterwards the bucket refills from
    /// empty at the quota's rate.
    pub fn pause(&self, key: &K, pause: Duration) {
        let until = self.now().saturating_add(nanos(pause));
        self.with_slot(key, self.now(), |slot| slot.bucket.pause(&self.gcra, until));
    }

    /// Keys tracked now.
    pub fn keys(&self) -> usize {
        self.figures.keys.load(Ordering::Relaxed)
    }

    /// Drops every key whose bucket is full (they carry no information);
    /// returns how many. Insertions do this a little at a time anyway.
    pub fn evict_idle(&self) -> usize {
        let now = self.now();
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.write().unwrap_or_else(PoisonError::into_inner);
            let before = shard.map.len();
            shard.map.retain(|_, slot| !slot.bucket.is_full(now));
            let Shard { map, clock } = &mut *shard;
            clock.retain(|key| map.contains_key(key));
            dropped += before - shard.map.len();
        }
        self.figures.keys.fetch_sub(dropped, Ordering::Relaxed);
        dropped
    }

    /// Nanoseconds since this store's epoch, in tokio time.
    pub(crate) fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.epoch))
    }

    /// Takes a token at `now`, or `Err(ready_at)`.
    pub(crate) fn acquire_at(&self, key: &K, now: u64) -> Result<(), u64> {
        let admitted = self.with_slot(key, now, |slot| slot.bucket.acquire(&self.gcra, now));
        if admitted.is_ok() {
            self.figures.admitted.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    pub(crate) fn figures(&self) -> &Arc<Figures> {
        &self.figures
    }

    /// Runs `f` on `key`'s slot, inserting it (and evicting) if missing.
    fn with_slot<T>(&self, key: &K, now: u64, f: impl FnOnce(&Slot) -> T) -> T {
        let shard = &self.shards[self.hasher.hash_one(key) as usize % self.shards.len()];
        {
            // The common case: a known key, under a shared lock.
            let shard = shard.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(slot) = shard.map.get(key) {
                // Write the flag only when it changes, to keep the cache
                // line shared between cores.
                if !slot.referenced.load(Ordering::Relaxed) {
                    slot.referenced.store(true, Ordering::Relaxed);
                }
                return f(slot);
            }
        }
        let mut shard = shard.write().unwrap_or_else(PoisonError::into_inner);
        if !shard.map.contains_key(key) {
            shard.make_room(now, self.per_shard, &self.figures);
            shard.clock.push_back(key.clone());
            self.figures.keys.fetch_add(1, Ordering::Relaxed);
        }
        f(shard.map.entry(key.clone()).or_default())
    }
}

impl<K: Hash + Eq + Clone> Shard<K> {
    /// Makes room for one more key: drops idle keys at the hand, then
    /// evicts by CLOCK while full.
    fn make_room(&mut self, now: u64, capacity: usize, figures: &Figures) {
        // Up to two idle keys at the hand go first, so insertions drain idle
        // keys faster than they add keys; the hand does not move otherwise.
        for _ in 0..2 {
            let idle = self.clock.front().and_then(|key| self.map.get(key));
            if !idle.is_some_and(|slot| slot.bucket.is_full(now)) {
                break;
            }
            if let Some(key) = self.clock.pop_front() {
                self.map.remove(&key);
                figures.keys.fetch_sub(1, Ordering::Relaxed);
            }
        }
        while self.map.len() >= capacity {
            let Some(key) = self.clock.pop_front() else {
                break;
            };
            // The queue and the map hold the same keys; a stale one is skipped.
            let Some(slot) = self.map.get(&key) else {
                continue;
            };
            let idle = slot.bucket.is_full(now);
            if !idle && slot.referenced.swap(false, Ordering::Relaxed) {
                self.clock.push_back(key);
                continue;
            }
            if !idle {
                figures.evicted_active.fetch_add(1, Ordering::Relaxed);
            }
            self.map.remove(&key);
            figures.keys.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A duration in nanoseconds, saturating at `u64::MAX` (584 years).
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl<K> fmt::Debug for Buckets<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buckets")
            .field("gcra", &self.gcra)
            .field("shards", &self.shards.len())
            .field("per_shard", &self.per_shard)
            .field("figures", &self.figures)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_million_distinct_keys_stay_under_the_bound() {
        let buckets = Buckets::new(Quota::per_second(1), 1_000).unwrap();
        let mut peak = 0;
        for key in 0u32..1_000_000 {
            assert!(buckets.try_acquire(&key).is_ok());
            peak = peak.max(buckets.keys());
        }
        assert!(peak <= 1_000, "peak {peak}");
        // Every key spent its one token, so every eviction was of an
        // active key and counted.
        assert!(buckets.figures.evicted_active.load(Ordering::Relaxed) >= 999_000);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_full_buckets_are_dropped_first() {
        let buckets = Buckets::new(Quota::per_second(10), 16).unwrap();
        for key in 0..16 {
            buckets.try_acquire(&key).unwrap();
        }
        assert_eq!(buckets.keys(), 16);
        // A second later every bucket has refilled: full, idle.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(buckets.evict_idle(), 16);
        assert_eq!(buckets.keys(), 0);
        assert_eq!(buckets.figures.evicted_active.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn recently_used_keys_survive_eviction() {
        // One shard of four keys: key 0 is used again, so CLOCK spares it.
        let buckets = Buckets::new(Quota::per_minute(1), 4).unwrap();
        assert_eq!((buckets.shards.len(), buckets.per_shard), (1, 4));
        for key in 0..4 {
            buckets.try_acquire(&key).unwrap();
        }
        // The first insertion sets no flag; a use does.
        buckets.try_acquire(&0).unwrap_err();
        buckets.try_acquire(&4).unwrap();
        let kept: Vec<i32> = {
            let shard = buckets.shards[0].read().unwrap();
            let mut keys: Vec<_> = shard.map.keys().copied().collect();
            keys.sort();
            keys
        };
        assert_eq!(kept, [0, 2, 3, 4]);
        // Key 0 still owes: its bucket was not forgotten.
        assert!(buckets.try_acquire(&0).is_err());
    }

    #[test]
    fn invalid_settings_are_errors() {
        assert!(matches!(
            Buckets::<u8>::new(Quota::per_second(0), 10),
            Err(Error::InvalidConfig { .. })
        ));
        assert!(Buckets::<u8>::new(Quota::per_second(1), 0).is_err());
        let shape = |max| {
            let b = Buckets::<u8>::new(Quota::per_second(1), max).unwrap();
            (b.shards.len(), b.per_shard)
        };
        assert_eq!(shape(1), (1, 1));
        assert_eq!(shape(100), (1, 100));
        assert_eq!(shape(128), (2, 64));
        assert_eq!(shape(10_000), (16, 625));
        assert_eq!(shape(usize::MAX), (16, usize::MAX / 16));
    }
}
