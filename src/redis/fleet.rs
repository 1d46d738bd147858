//! One rate limiter's view of the shared store: the connections' stored
//! pace states as last seen, its leases, Redis's clock, and outages.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::redis::{RedisError, Script, Value};

use super::script::{Malformed, Outcome, Reply};
use super::RedisStore;
use crate::rate_limit::bucket::Gcra;
use crate::rate_limit::meter::Counts;
use crate::rate_limit::pace;

/// How often a process in an outage asks Redis again.
const PROBE_EVERY_US: u64 = 1_000_000;

/// Times a decision asks again after a "stale" answer (another member
/// changed the pace in between) before it is made locally.
const STALE_TRIES: usize = 3;

/// The fleet side of one [`RateLimit`](crate::RateLimit) (and its clones).
pub(crate) struct Fleet<K> {
    store: RedisStore,
    quota: Gcra,
    learn_rate: bool,
    max_keys: usize,
    clock: Clock,
    known: Mutex<HashMap<K, Known>>,
    outage: Outage,
}

/// What this process last heard of a connection's stored state.
#[derive(Default)]
struct Known {
    pace: Option<u64>,
    n: u32,
    lease: Option<Lease>,
}

/// Tokens reserved in one round trip, spent one by one on the bucket's
/// schedule. Times are µs of Redis's clock.
#[derive(Debug, Clone, Copy)]
struct Lease {
    base: u64,
    t: f64,
    tau: f64,
    next: u32,
    taken: u32,
    expires: u64,
}

impl Lease {
    /// When token `next` may go.
    fn ready_at(&self) -> f64 {
        self.base as f64 + f64::from(self.next) * self.t - self.tau
    }
}

/// Why a decision could not be had from Redis.
#[derive(Debug)]
pub(crate) enum Failure {
    Timeout(Duration),
    Redis(RedisError),
    Malformed,
    Stale,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout(limit) => write!(f, "no answer within {limit:?}"),
            Failure::Redis(error) => write!(f, "{error}"),
            Failure::Malformed => f.write_str("a reply tollgate's scripts never give"),
            Failure::Stale => f.write_str("the pace changed under every try"),
        }
    }
}

impl From<Malformed> for Failure {
    fn from(_: Malformed) -> Self {
        Failure::Malformed
    }
}

/// Redis's clock as this process estimates it: its own monotonic clock plus
/// the offset the last reply showed.
struct Clock {
    start: Instant,
    // Redis µs minus local µs.
    offset: AtomicI64,
}

impl Clock {
    fn new() -> Self {
        // Until Redis answers, the wall clock is the best guess.
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_micros());
        Clock {
            start: Instant::now(),
            offset: AtomicI64::new(i64::try_from(wall).unwrap_or(i64::MAX)),
        }
    }

    fn local(&self) -> i64 {
        i64::try_from(self.start.elapsed().as_micros()).unwrap_or(i64::MAX)
    }

    /// Redis's time now, µs since 1970.
    fn now(&self) -> u64 {
        let now = self
            .local()
            .saturating_add(self.offset.load(Ordering::Relaxed));
        u64::try_from(now).unwrap_or(0)
    }

    /// A reply said Redis's time was `redis` µs.
    fn saw(&self, redis: u64) {
        let redis = i64::try_from(redis).unwrap_or(i64::MAX);
        self.offset
            .store(redis.saturating_sub(self.local()), Ordering::Relaxed);
    }
}

/// Whether Redis is answering; while it is not, one request a second asks.
struct Outage {
    // Local µs of the next probe; 0 while Redis answers. One atomic, so
    // the change from 0 (an outage starts: warn) and back (it ends) is
    // seen by exactly one caller each.
    next_probe: AtomicU64,
    // Whether an answer about one key (not an outage) was logged already.
    odd_logged: AtomicBool,
}

impl<K: Hash + Eq + Clone + fmt::Debug> Fleet<K> {
    pub(crate) fn new(store: RedisStore, quota: Gcra, learn_rate: bool, max_keys: usize) -> Self {
        Fleet {
            store,
            quota,
            learn_rate,
            max_keys,
            clock: Clock::new(),
            known: Mutex::new(HashMap::new()),
            outage: Outage {
                next_probe: AtomicU64::new(0),
                odd_logged: AtomicBool::new(false),
            },
        }
    }

    fn known(&self) -> MutexGuard<'_, HashMap<K, Known>> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tokens a request may ask for when `waiting` requests (itself
    /// included) wait on its connection.
    pub(crate) fn want(&self, waiting: usize) -> u32 {
        self.store
            .lease
            .min(u32::try_from(waiting).unwrap_or(u32::MAX))
            .max(1)
    }

    /// A token of this process's lease on `key`: `Ok(sent_at)` (ns of
    /// Redis's clock) if one is ready, `Err(wait)` (ns) if the next is not
    /// yet; `None` without a live lease.
    pub(crate) fn leased(&self, key: &K) -> Option<Result<u64, u64>> {
        let mut known = self.known();
        Self::spend(known.get_mut(key)?, self.clock.now())
    }

    /// Spends the next token of `entry`'s lease at `now` (µs); see
    /// [`leased`](Fleet::leased).
    fn spend(entry: &mut Known, now: u64) -> Option<Result<u64, u64>> {
        let lease = entry.lease.as_mut()?;
        if now >= lease.expires || lease.next >= lease.taken {
            entry.lease = None;
            return None;
        }
        let ready_at = lease.ready_at();
        if ready_at <= now as f64 {
            lease.next += 1;
            return Some(Ok(now.saturating_mul(1_000)));
        }
        Some(Err(((ready_at - now as f64) * 1_000.0).ceil() as u64))
    }

    /// Whether to ask Redis: always while it answers; during an outage,
    /// one caller a second (the probe), the others decide locally.
    pub(crate) fn ask(&self) -> bool {
        let next = self.outage.next_probe.load(Ordering::Acquire);
        if next == 0 {
            return true;
        }
        let now = self.clock.local().max(0) as u64;
        now >= next
            && self
                .outage
                .next_probe
                .compare_exchange(
                    next,
                    now + PROBE_EVERY_US,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// A decision could not be had from Redis. If Redis is unreachable,
    /// stalled or restarting, an outage starts (logged once) or goes on;
    /// an answer about one key (a script error, an odd reply) is logged
    /// and that decision alone is made locally.
    pub(crate) fn failed(&self, failure: &Failure) {
        let unreachable = match failure {
            Failure::Timeout(_) => true,
            Failure::Redis(error) => {
                error.is_io_error()
                    || error.is_connection_dropped()
                    || error.is_connection_refusal()
                    || error.is_timeout()
                    || error.is_unrecoverable_error()
            }
            Failure::Malformed | Failure::Stale => false,
        };
        if !unreachable {
            // Once: a bad key fails each of its decisions alike.
            if !self.outage.odd_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    target: "tollgate::redis",
                    error = %failure,
                    "the shared store could not decide: deciding such requests locally"
                );
            }
            return;
        }
        let next = (self.clock.local().max(0) as u64 + PROBE_EVERY_US).max(1);
        if self.outage.next_probe.swap(next, Ordering::AcqRel) == 0 {
            tracing::warn!(
                target: "tollgate::redis",
                error = %failure,
                "the shared store failed: deciding on this process's own buckets until it answers"
            );
        }
    }

    fn answered(&self, now: u64) {
        self.clock.saw(now);
        if self.outage.next_probe.load(Ordering::Acquire) != 0
            && self.outage.next_probe.swap(0, Ordering::AcqRel) != 0
        {
            tracing::info!(target: "tollgate::redis", "the shared store answers again");
        }
    }

    /// Drops this process's lease on `key`: what it reserved would be sent
    /// into the pause a 429 just started.
    pub(crate) fn void_lease(&self, key: &K) {
        if let Some(entry) = self.known().get_mut(key) {
            entry.lease = None;
        }
    }

    /// The bucket's arithmetic under pace state `pace` at `now` (µs).
    fn gcra(&self, pace: Option<u64>, now: u64) -> Gcra {
        match pace.and_then(|state| pace::interval_at(state, now.saturating_mul(1_000))) {
            Some(interval) => self.quota.paced(interval),
            None => self.quota,
        }
    }

    /// Keeps what `reply` said of `key`'s stored state, and `lease` if
    /// it brought one (a reply without one leaves the current lease); returns
    /// the next leased token as [`leased`](Fleet::leased) would.
    fn remember(&self, key: &K, reply: &Reply, lease: Option<Lease>) -> Option<Result<u64, u64>> {
        let mut known = self.known();
        if known.len() >= self.max_keys && !known.contains_key(key) {
            // Bounded like the local store: what is forgotten is relearned
            // from the next reply.
            known.clear();
        }
        let entry = known.entry(key.clone()).or_default();
        entry.pace = Some(reply.pace);
        entry.n = reply.n;
        if lease.is_some() {
            entry.lease = lease;
        }
        Self::spend(entry, reply.now)
    }

    fn last_heard(&self, key: &K) -> Option<(u64, u32)> {
        let known = self.known();
        let entry = known.get(key)?;
        Some((entry.pace?, entry.n))
    }

    async fn run(&self, script: &Script, key: &K, args: &[String]) -> Result<Reply, Failure> {
        let name = self.store.key_name(&format!("{key:?}"));
        let mut invocation = script.key(name);
        for arg in args {
            invocation.arg(arg);
        }
        let mut connection = self.store.connection.clone();
        let value = invocation
            .invoke_async::<Value>(&mut connection)
            .await
            .map_err(Failure::Redis)?;
        let reply = Reply::parse(&value)?;
        self.answered(reply.now);
        Ok(reply)
    }

    /// Reserves `key`'s next token (and up to `want - 1` more as a lease)
    /// if it is at most [`RedisStore::LEASE_AHEAD`] away: `Ok(Ok(sent_at))`
    /// in ns of Redis's clock if it may go now, `Ok(Err(wait))` in ns
    /// until it may go (it is then this process's lease) or until asking
    /// again is worth it.
    ///
    /// Reserving rather than asking again at the token's time is what
    /// keeps the fleet fair: the members waiting on a connection are served
    /// in the order they asked, where a race for each token would go to
    /// whoever has the fastest timer and the shortest trip to Redis.
    pub(crate) async fn acquire(&self, key: &K, want: u32) -> Result<Result<u64, u64>, Failure> {
        let limit = self.store.timeout;
        tokio::time::timeout(limit, self.acquire_within(key, want))
            .await
            .map_err(|_| Failure::Timeout(limit))?
    }

    async fn acquire_within(&self, key: &K, want: u32) -> Result<Result<u64, u64>, Failure> {
        let ahead = RedisStore::LEASE_AHEAD.as_micros() as u64;
        for _ in 0..STALE_TRIES {
            let now = self.clock.now();
            let assumed = self.last_heard(key).map(|(pace, _)| pace);
            let gcra = self.gcra(assumed, now);
            let args = [
                assumed.map_or_else(String::new, |pace| pace.to_string()),
                pace::fresh(now.saturating_mul(1_000)).to_string(),
                micros(gcra.interval()),
                micros(gcra.tolerance()),
                want.to_string(),
                ahead.to_string(),
                forget_ms(),
            ];
            let reply = self.run(&self.store.scripts.acquire, key, &args).await?;
            let lease = match reply.outcome {
                Outcome::Taken { taken, base } => Some(Lease {
                    base,
                    t: gcra.interval() as f64 / 1_000.0,
                    tau: gcra.tolerance() as f64 / 1_000.0,
                    next: 0,
                    taken,
                    expires: reply.now.saturating_add(2 * ahead),
                }),
                _ => None,
            };
            // The first token may go now, or at its reserved time.
            let first = self.remember(key, &reply, lease);
            match reply.outcome {
                Outcome::Stale => continue,
                Outcome::Wait(wait) => return Ok(Err(wait.saturating_mul(1_000))),
                Outcome::Taken { .. } => {
                    return Ok(first.unwrap_or(Ok(reply.now.saturating_mul(1_000))))
                }
                Outcome::Done => return Err(Failure::Malformed),
            }
        }
        Err(Failure::Stale)
    }

    /// The server throttled a request on `key` sent at `sent_at` (ns of
    /// Redis's clock; `None` if it was decided locally), asking for `pause`
    /// ns: pauses the connection for the fleet and, if the episode is new,
    /// stores the pace it teaches. Returns the pace learned and the pause
    /// applied (ns; a paced connection pauses for the excess's share).
    pub(crate) async fn throttle(
        &self,
        key: &K,
        sent_at: Option<u64>,
        pause: u64,
    ) -> Result<(Option<f64>, u64), Failure> {
        let limit = self.store.timeout;
        tokio::time::timeout(limit, self.throttle_within(key, sent_at, pause))
            .await
            .map_err(|_| Failure::Timeout(limit))?
    }

    async fn throttle_within(
        &self,
        key: &K,
        sent_at: Option<u64>,
        pause: u64,
    ) -> Result<(Option<f64>, u64), Failure> {
        let quota_rate = 1e9 / self.quota.interval() as f64;
        for _ in 0..STALE_TRIES {
            let now = self.clock.now();
            let now_ns = now.saturating_mul(1_000);
            // Without the stored state (this process never heard of the
            // key), only the pause is stored; the reply brings the state.
            let heard = self.last_heard(key);
            // A paced connection pauses for the excess's share only (see
            // `pace::lesson`); the store keeps only the admissions since
            // the lesson, not what the server accepted.
            let (lesson, taught, pause) = match (heard, sent_at) {
                (Some((state, n)), Some(sent_at)) if self.learn_rate => {
                    let counts = Counts::admitted(n);
                    let verdict = pace::lesson(state, counts, now_ns, sent_at, pause, quota_rate);
                    (verdict.state, verdict.taught, verdict.pause)
                }
                _ => (None, false, pause),
            };
            let before = self.gcra(heard.map(|(state, _)| state), now);
            let after = self.gcra(lesson.or(heard.map(|(state, _)| state)), now);
            let args = [
                heard.map_or_else(String::new, |(state, _)| state.to_string()),
                lesson.map_or_else(String::new, |state| state.to_string()),
                (pause / 1_000).to_string(),
                micros(before.tolerance()),
                micros(after.tolerance()),
                forget_ms(),
                pace::fresh(now_ns).to_string(),
            ];
            let reply = self.run(&self.store.scripts.throttle, key, &args).await?;
            self.remember(key, &reply, None);
            match reply.outcome {
                Outcome::Stale => continue,
                Outcome::Done => {
                    let learned = lesson.filter(|_| taught).and_then(pace::rate_of);
                    return Ok((learned, pause));
                }
                _ => return Err(Failure::Malformed),
            }
        }
        Err(Failure::Stale)
    }
}

/// Nanoseconds as µs for a script (a decimal Lua reads exactly enough).
fn micros(nanos: u64) -> String {
    (nanos as f64 / 1_000.0).to_string()
}

/// How long Redis keeps a learned pace, in ms.
fn forget_ms() -> String {
    ((pace::FORGET_SECS * 1_000.0) as u64).to_string()
}

impl<K> fmt::Debug for Fleet<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fleet")
            .field("store", &self.store)
            .field("learn_rate", &self.learn_rate)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_spends_its_tokens_on_the_buckets_schedule() {
        let lease = Lease {
            base: 1_000,
            t: 10.0,
            tau: 5.0,
            next: 1,
            taken: 3,
            expires: 2_000,
        };
        assert_eq!(lease.ready_at(), 1_005.0);
        assert_eq!(Lease { next: 2, ..lease }.ready_at(), 1_015.0);
    }

    #[test]
    fn script_numbers_are_plain_decimals() {
        assert_eq!(micros(1), "0.001");
        assert_eq!(micros(20_000_000), "20000");
        assert_eq!(micros(333_333), "333.333");
        assert_eq!(forget_ms(), "1800000");
    }
}
