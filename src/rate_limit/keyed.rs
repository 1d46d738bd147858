//! Buckets by key, in bounded memory.

use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

// foldhash, hashbrown's default, seeded per store: a key is hashed on every
// request, and std's SipHash was 8% of a one-key RateLimit call (`perf`,
// issue 16; the call 11% faster without it). Its weaker flooding
// resistance is acceptable here: keys name the caller's own connections,
// and the table holds at most `max_keys` of them.
use hashbrown::DefaultHashBuilder as RandomState;
use hashbrown::HashTable;
use tokio::time::Instant;

use super::bucket::{nanos, Epoch, Gcra, Tat};
use super::pace::Pace;
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
/// # Layout and cost
///
/// Keys are spread over up to 16 shards, each behind a read-write lock: a
/// known key is found under the shared lock, with **one** hash of the key
/// (foldhash, hashbrown's default, seeded per store: keys name the caller's
/// own connections, at most `max_keys` of them, so std's slower,
/// flood-resistant SipHash buys nothing here), and its bucket is one atomic
/// compare-and-swap. Each
/// shard keeps its keys in a slab (key, bucket state, learned pace, a
/// "used" flag) and an index of 4-byte slab positions. A
/// [`ConnectionKey`](crate::ConnectionKey) costs about 140 bytes of store,
/// growth slack included (139 measured for 10,000 keys, 94 for 1,000,000,
/// in `benches/rate_limit.rs`; governor's keyed limiter: 94 and 120).
/// At equal clocks an acquire costs what governor's keyed limiter does
/// (`BENCHMARKS.md`).
///
/// # Eviction
///
/// Keys never exceed `max_keys`:
///
/// - once a shard is half full, every insertion first looks at the next two
///   slots under the eviction hand and drops keys whose bucket is **full**
///   and that have no learned pace: such a key behaves exactly like a new
///   one, so forgetting it loses nothing (below half full they stay: under
///   a generous quota a bucket is full again microseconds after a request,
///   and connections taking turns would evict one another on every call)
///   ([`evict_idle`](Buckets::evict_idle) drops all of them at once);
/// - when the shard is still full, the hand evicts by CLOCK, the
///   second-chance approximation of least-recently-used: a key used since
///   the hand last passed gets another round, the first one that was not is
///   dropped. Dropping an active key forgets what it owed (its next request
///   starts from a full bucket), so size `max_keys` above the connections
///   you use.
///
/// The bound is spread over the shards (each holds `max_keys / shards`, at
/// least 64, one shard below 128 keys), so a store can start evicting a
/// little before it holds exactly `max_keys`.
pub struct Buckets<K> {
    gcra: Gcra,
    epoch: Epoch,
    shards: Box<[RwLock<Shard<K>>]>,
    hasher: RandomState,
    per_shard: usize,
    figures: Arc<Figures>,
}

struct Shard<K> {
    // Positions in `slots`, hashed by their key.
    index: HashTable<u32>,
    slots: Vec<Option<Entry<K>>>,
    free: Vec<u32>,
    // The CLOCK hand: the next slot eviction looks at.
    hand: usize,
}

struct Entry<K> {
    key: K,
    tat: Tat,
    // What the server's 429s taught about this key's rate.
    pace: Pace,
    // Set on use, cleared when the hand passes: the second chance.
    referenced: AtomicBool,
}

/// Live counts shared by a store and every handle on it.
#[derive(Debug, Default)]
pub(crate) struct Figures {
    pub(crate) keys: AtomicUsize,
    pub(crate) evicted_active: AtomicU64,
    pub(crate) admitted: AtomicU64,
    // The wait lines' count, which their loom models must see.
    pub(crate) waiting: crate::sync::AtomicUsize,
    pub(crate) cool_downs: AtomicU64,
    pub(crate) rate_cuts: AtomicU64,
    pub(crate) fallbacks: AtomicU64,
}

/// What the handle shows, for the metrics' sampling task.
#[cfg(feature = "metrics")]
impl crate::metrics::Sampled for Figures {
    fn read(&self, into: &mut Vec<crate::metrics::Reading>) {
        use crate::metrics::{name, Reading};
        into.extend([
            Reading::Level(
                name::RATE_LIMIT_KEYS,
                self.keys.load(Ordering::Relaxed) as u64,
            ),
            Reading::Level(
                name::RATE_LIMIT_WAITING,
                self.waiting.load(Ordering::Relaxed) as u64,
            ),
            Reading::Count(
                name::RATE_LIMIT_ADMITTED,
                self.admitted.load(Ordering::Relaxed),
            ),
            Reading::Count(
                name::RATE_LIMIT_FALLBACKS,
                self.fallbacks.load(Ordering::Relaxed),
            ),
            Reading::Count(
                name::RATE_LIMIT_EVICTED_ACTIVE,
                self.evicted_active.load(Ordering::Relaxed),
            ),
        ]);
    }
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
        // Slab positions are u32; a shard never needs more.
        let per_shard = (max_keys / shards).min(u32::MAX as usize);
        Ok(Buckets {
            gcra,
            epoch: Epoch::start(),
            shards: (0..shards)
                .map(|_| {
                    RwLock::new(Shard {
                        index: HashTable::new(),
                        slots: Vec::new(),
                        free: Vec::new(),
                        hand: 0,
                    })
                })
                .collect(),
            hasher: RandomState::default(),
            per_shard,
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
        let now = self.now();
        let until = now.saturating_add(nanos(pause));
        self.with_entry(key, now, |entry| {
            entry.tat.pause(&entry.gcra(&self.gcra, now), until);
        });
    }

    /// Tells the store that `key`'s server throttled (429) a request sent
    /// at `sent_at`, asking for `retry_after`: pauses the key (as
    /// [`pause`](Buckets::pause): for all of it if the key has no pace yet,
    /// for the excess's share if it has, not at all for the rest of an
    /// episode's crowd) and learns a slower pace for it, sent evenly (see
    /// "Learned pace" in the [module docs](crate::rate_limit)). Returns the
    /// pace learned in requests per second, or `None` if an earlier 429 of
    /// the same episode (a request sent no later than the last lesson)
    /// already taught it, or it came too soon after the key resumed.
    pub fn throttled(
        &self,
        key: &K,
        sent_at: Instant,
        retry_after: Option<Duration>,
    ) -> Option<f64> {
        let pause = retry_after.map_or(0, nanos);
        self.throttled_at(key, self.now(), self.epoch.at(sent_at), pause)
            .0
    }

    /// The pace `key` is held to now, in requests per second, if its
    /// server's 429s taught one (and it is not yet forgotten).
    pub fn learned_rate(&self, key: &K) -> Option<f64> {
        let now = self.now();
        let hash = self.hasher.hash_one(key);
        let shard = self
            .shard(hash)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        shard.find(hash, key)?.pace.rate(now)
    }

    /// Keys tracked now.
    pub fn keys(&self) -> usize {
        self.figures.keys.load(Ordering::Relaxed)
    }

    /// Drops every key whose bucket is full and that learned no pace (they
    /// carry no information); returns how many. Insertions do this a little
    /// at a time anyway.
    pub fn evict_idle(&self) -> usize {
        let now = self.now();
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.write().unwrap_or_else(PoisonError::into_inner);
            for position in 0..shard.slots.len() {
                let idle = shard.slots[position]
                    .as_ref()
                    .is_some_and(|entry| entry.is_idle(now));
                if idle {
                    shard.remove(position, &self.hasher);
                    dropped += 1;
                }
            }
        }
        self.figures.keys.fetch_sub(dropped, Ordering::Relaxed);
        dropped
    }

    /// Nanoseconds since this store's epoch, in tokio time.
    pub(crate) fn now(&self) -> u64 {
        self.epoch.now()
    }

    /// Takes a token at `now`, or `Err(ready_at)`.
    pub(crate) fn acquire_at(&self, key: &K, now: u64) -> Result<(), u64> {
        self.with_entry(key, now, |entry| {
            let admitted = entry.tat.acquire(&entry.gcra(&self.gcra, now), now);
            if admitted.is_ok() {
                entry.pace.admitted(now);
            }
            admitted
        })
    }

    /// [`throttled`](Buckets::throttled) in the store's nanoseconds, with
    /// `pause` nanoseconds asked for (zero: none); also returns the pause
    /// applied (a paced key pauses for the excess's share only).
    pub(crate) fn throttled_at(
        &self,
        key: &K,
        now: u64,
        sent_at: u64,
        pause: u64,
    ) -> (Option<f64>, u64) {
        let quota_rate = 1e9 / self.gcra.interval() as f64;
        self.with_entry(key, now, |entry| {
            let had_pace = entry.pace.rate(now).is_some();
            let (learned, pause) = entry.pace.throttled(now, sent_at, pause, quota_rate);
            if learned.is_some() && !had_pace {
                // From the quota's burst to the pace's, keeping the moment
                // the next request may go.
                entry.tat.rebase(&self.gcra, &entry.gcra(&self.gcra, now));
            }
            if pause > 0 {
                let until = now.saturating_add(pause);
                entry.tat.pause(&entry.gcra(&self.gcra, now), until);
            }
            (learned, pause)
        })
    }

    /// A response on `key` at `now` published a policy of `rate` requests
    /// a second: pace the key by it (see `pace::published`). Returns
    /// whether the pace changed.
    pub(crate) fn published_at(&self, key: &K, now: u64, rate: f64) -> bool {
        let quota_rate = 1e9 / self.gcra.interval() as f64;
        self.with_entry(key, now, |entry| {
            let had_pace = entry.pace.rate(now).is_some();
            if !entry.pace.publish(now, rate, quota_rate) {
                return false;
            }
            if !had_pace {
                // From the quota's burst to the pace's, keeping the moment
                // the next request may go.
                entry.tat.rebase(&self.gcra, &entry.gcra(&self.gcra, now));
            }
            true
        })
    }

    /// Nanoseconds from `now` until a request behind `ahead` others on
    /// `key` would get its token, if each of them takes one first. Takes
    /// nothing.
    pub(crate) fn wait_behind(&self, key: &K, now: u64, ahead: u64) -> u64 {
        let (ready_at, interval) = self.with_entry(key, now, |entry| {
            let gcra = entry.gcra(&self.gcra, now);
            (entry.tat.ready_at(&gcra, now), gcra.interval())
        });
        (ready_at - now).saturating_add(ahead.saturating_mul(interval))
    }

    /// The quota's arithmetic.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn gcra(&self) -> Gcra {
        self.gcra
    }

    pub(crate) fn figures(&self) -> &Arc<Figures> {
        &self.figures
    }

    /// The shard of a key's hash.
    fn shard(&self, hash: u64) -> &RwLock<Shard<K>> {
        // Middle bits pick the shard: hashbrown uses the low bits for the
        // bucket and the top seven as a tag, so these are free.
        // (The shard count is a power of two: a mask, not a division.)
        &self.shards[(hash >> 32) as usize & (self.shards.len() - 1)]
    }

    /// Runs `f` on `key`'s entry, inserting it (and evicting) if missing.
    fn with_entry<T>(&self, key: &K, now: u64, f: impl FnOnce(&Entry<K>) -> T) -> T {
        let hash = self.hasher.hash_one(key);
        let shard = self.shard(hash);
        {
            // The common case: a known key, under the shared lock.
            let shard = shard.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = shard.find(hash, key) {
                // Write the flag only when it changes, so the cache line
                // stays shared between cores.
                if !entry.referenced.load(Ordering::Relaxed) {
                    entry.referenced.store(true, Ordering::Relaxed);
                }
                return f(entry);
            }
        }
        let mut shard = shard.write().unwrap_or_else(PoisonError::into_inner);
        let position = match shard.position(hash, key) {
            Some(position) => position,
            None => {
                let dropped = shard.make_room(now, self.per_shard, &self.hasher, &self.figures);
                self.figures.keys.fetch_sub(dropped, Ordering::Relaxed);
                self.figures.keys.fetch_add(1, Ordering::Relaxed);
                shard.insert(hash, key.clone(), now, self.per_shard, &self.hasher)
            }
        };
        match &shard.slots[position] {
            Some(entry) => f(entry),
            None => unreachable!("an indexed position holds an entry"),
        }
    }
}

impl<K> Entry<K> {
    /// The bucket's arithmetic at `now`: the quota's, or, once the server
    /// has throttled the key, its learned pace with a burst of one.
    fn gcra(&self, quota: &Gcra, now: u64) -> Gcra {
        match self.pace.interval(now) {
            Some(interval) => quota.paced(interval),
            None => *quota,
        }
    }

    /// True if the entry carries nothing a new one would not: a full
    /// bucket and no learned pace.
    fn is_idle(&self, now: u64) -> bool {
        self.tat.is_full(now) && self.pace.rate(now).is_none()
    }
}

impl<K: Hash + Eq> Shard<K> {
    fn position(&self, hash: u64, key: &K) -> Option<usize> {
        let slots = &self.slots;
        self.index
            .find(hash, |&at| {
                slots[at as usize]
                    .as_ref()
                    .is_some_and(|entry| entry.key == *key)
            })
            .map(|&at| at as usize)
    }

    fn find(&self, hash: u64, key: &K) -> Option<&Entry<K>> {
        self.slots[self.position(hash, key)?].as_ref()
    }

    /// Stores a new key; the shard has room (see `make_room`).
    fn insert(
        &mut self,
        hash: u64,
        key: K,
        now: u64,
        capacity: usize,
        hasher: &RandomState,
    ) -> usize {
        let entry = Entry {
            key,
            tat: Tat::default(),
            pace: Pace::new(now),
            referenced: AtomicBool::new(false),
        };
        let position = match self.free.pop() {
            Some(position) => {
                self.slots[position as usize] = Some(entry);
                position as usize
            }
            None => {
                // Grow by doubling, but never past the shard's capacity.
                if self.slots.len() == self.slots.capacity() {
                    let target = (self.slots.len() * 2).clamp(4, capacity.max(1));
                    self.slots
                        .reserve_exact(target.saturating_sub(self.slots.len()).max(1));
                }
                self.slots.push(Some(entry));
                self.slots.len() - 1
            }
        };
        let Shard { index, slots, .. } = self;
        index.insert_unique(hash, position as u32, |at| rehash(slots, at, hasher));
        position
    }

    /// Removes the entry at `position`.
    fn remove(&mut self, position: usize, hasher: &RandomState) {
        let Some(entry) = self.slots[position].take() else {
            return;
        };
        let hash = hasher.hash_one(&entry.key);
        if let Ok(found) = self.index.find_entry(hash, |&at| at as usize == position) {
            found.remove();
        }
        self.free.push(position as u32);
    }

    /// Makes room for one more key: drops idle keys under the hand, then
    /// evicts by CLOCK while full. Returns how many keys it dropped.
    fn make_room(
        &mut self,
        now: u64,
        capacity: usize,
        hasher: &RandomState,
        figures: &Figures,
    ) -> usize {
        let mut dropped = 0;
        // Below half full, idle keys stay: a generous quota refills a
        // bucket within microseconds, so a few connections taking turns
        // would otherwise evict one another on every request (a write lock,
        // an insertion and a removal each: 110 ns of a `RateLimit` call
        // over 1,024 keys in `benches/layers.rs`, issue 16).
        if self.slots.is_empty() || self.index.len() < capacity / 2 {
            return dropped;
        }
        // Two steps of the hand per insertion drain idle keys faster than
        // insertions add keys.
        for _ in 0..2 {
            let position = self.advance_hand();
            if self.slots[position]
                .as_ref()
                .is_some_and(|e| e.is_idle(now))
            {
                self.remove(position, hasher);
                dropped += 1;
            }
        }
        // Each pass of the hand clears every flag it meets, so within two
        // passes it finds a victim.
        while self.index.len() >= capacity {
            let position = self.advance_hand();
            let Some(entry) = &self.slots[position] else {
                continue;
            };
            let idle = entry.is_idle(now);
            if !idle && entry.referenced.swap(false, Ordering::Relaxed) {
                continue;
            }
            if !idle {
                figures.evicted_active.fetch_add(1, Ordering::Relaxed);
            }
            self.remove(position, hasher);
            dropped += 1;
        }
        dropped
    }

    fn advance_hand(&mut self) -> usize {
        let position = self.hand % self.slots.len();
        self.hand = position + 1;
        position
    }
}

/// The hash of the key at slab position `at`, for the index to grow.
fn rehash<K: Hash>(slots: &[Option<Entry<K>>], at: &u32, hasher: &RandomState) -> u64 {
    match &slots[*at as usize] {
        Some(entry) => hasher.hash_one(&entry.key),
        None => 0,
    }
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
    use crate::rate_limit::bucket::tests::over_quota;
    use proptest::prelude::*;

    proptest! {
        /// Over any sequence of acquires on several keys at any times, no
        /// key ever has more than `burst + count * elapsed / period`
        /// admitted in any window (no eviction: max_keys above the keys).
        #[test]
        fn no_key_exceeds_burst_plus_rate(
            count in 1u32..20,
            period_ms in 1u64..2_000,
            burst in 1u32..10,
            steps in proptest::collection::vec((0u8..4, 0u64..100_000_000), 1..400),
        ) {
            let period = period_ms * 1_000_000;
            let quota = Quota::new(count, Duration::from_nanos(period)).burst(burst);
            let buckets = Buckets::new(quota, 64).unwrap();
            let mut now = 0u64;
            let mut admitted: [Vec<u64>; 4] = Default::default();
            for (key, gap) in steps {
                now += gap;
                if buckets.acquire_at(&key, now).is_ok() {
                    admitted[usize::from(key)].push(now);
                }
            }
            for times in &admitted {
                prop_assert_eq!(over_quota(times, &quota), None);
            }
        }
    }

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

    fn kept(buckets: &Buckets<i32>) -> Vec<i32> {
        let shard = buckets.shards[0].read().unwrap();
        let mut keys: Vec<_> = shard.slots.iter().flatten().map(|e| e.key).collect();
        keys.sort();
        keys
    }

    #[tokio::test(start_paused = true)]
    async fn recently_used_keys_survive_eviction() {
        // One shard of four keys.
        let buckets = Buckets::new(Quota::per_minute(1), 4).unwrap();
        assert_eq!((buckets.shards.len(), buckets.per_shard), (1, 4));
        for key in 0..4 {
            buckets.try_acquire(&key).unwrap();
        }
        // Inserting sets no flag; using a known key does. Wherever the hand
        // is, one pass spares the flagged keys and meets key 2 unflagged.
        for key in [0, 1, 3] {
            buckets.try_acquire(&key).unwrap_err();
        }
        buckets.try_acquire(&4).unwrap();
        assert_eq!(kept(&buckets), [0, 1, 3, 4]);
        assert_eq!(buckets.figures.evicted_active.load(Ordering::Relaxed), 1);
        // Key 0 was never evicted: its debt is remembered.
        assert!(buckets.try_acquire(&0).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_paces_its_key_and_the_pace_outlives_idleness() {
        let buckets = Buckets::new(Quota::unlimited(), 100).unwrap();
        for _ in 0..20 {
            buckets.try_acquire(&"a").unwrap();
        }
        let sent = Instant::now();
        // 20 requests at once, then a pause of 1 s: a first estimate
        // between 20/s and 20 a tick (16.8 ms).
        let rate = buckets
            .throttled(&"a", sent, Some(Duration::from_secs(1)))
            .unwrap();
        assert!((20.0..1_200.0).contains(&rate), "{rate}");
        assert_eq!(buckets.learned_rate(&"b"), None);
        // Paused for the second, then one request per 1/rate, not a crowd.
        assert_eq!(buckets.try_acquire(&"a"), Err(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        buckets.try_acquire(&"a").unwrap();
        let wait = buckets.try_acquire(&"a").unwrap_err().as_secs_f64();
        assert!((wait - 1.0 / rate).abs() < 1e-6, "{wait}");
        // The other key is untouched; the rest of the same crowd teaches
        // nothing more.
        buckets.try_acquire(&"b").unwrap();
        buckets.try_acquire(&"b").unwrap();
        assert_eq!(buckets.throttled(&"a", sent, None), None);
        // A full bucket that learned a pace is not idle: kept (while the
        // pace lasts: a first estimate's doubling 10 s, a lesson's 30
        // minutes).
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(buckets.evict_idle(), 1); // "b"
        assert!(buckets.learned_rate(&"a").is_some());
    }

    #[test]
    fn idle_keys_stay_while_the_store_has_room() {
        // A bucket of a million a second is full again a microsecond after
        // each request: two connections taking turns must not evict each
        // other on every call. (Below 128 keys the store is one shard, so
        // the two share it.)
        let buckets = Buckets::new(Quota::per_second(1_000_000), 100).unwrap();
        for round in 0..100 {
            for key in ["a", "b"] {
                assert!(buckets.try_acquire(&key).is_ok());
            }
            assert_eq!(
                buckets.figures().keys.load(Ordering::Relaxed),
                2,
                "round {round}"
            );
        }
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
        assert_eq!(shape(usize::MAX), (16, u32::MAX as usize));
    }
}
