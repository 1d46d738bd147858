//! One quota for a fleet: per-connection state shared through Redis
//! (feature `redis`).
//!
//! "100 Flows all starting in a relatively short time talking to the same
//! back end server": many workers, on many machines, spending one
//! connection's quota. Each process's [`RateLimit`](crate::RateLimit)
//! believes it owns the quota and learns its own pace while the others
//! overrun it. Given a [`RedisStore`], every process keeps each
//! connection's bucket, cool-down and learned pace in one Redis hash, so N
//! processes hold the connection's quota as one client would:
//!
//! - **one atomic decision per acquire**: GCRA in a Lua script (`EVALSHA`,
//!   reloaded on `NOSCRIPT` after a restart or failover), on Redis's clock
//!   (`TIME`, read inside the script: members' clocks may differ);
//! - **a 429 seen by any process pauses the connection for all** (the
//!   longest pause wins), and the pace it teaches is stored with the
//!   bucket, so the fleet learns once: a member whose 429 belongs to an
//!   episode another member already learned from learns nothing more;
//! - **keys `{prefix:connection}`** (the connection key's `Debug` text),
//!   hash-tagged so a proxy in front of a cluster keeps a connection in one
//!   slot (redis-rs's `ConnectionManager` speaks to one server, not to a
//!   cluster directly), each with a TTL that ends when its state
//!   carries nothing a new key's would not (bucket full, no pace learned):
//!   Redis holds only the connections in use, however many pass through;
//! - **a fair line across the fleet**: within a process, requests on a
//!   connection wait in line and only the first asks Redis; when the next
//!   token is at most [`LEASE_AHEAD`](RedisStore::LEASE_AHEAD) away, the
//!   script *reserves* it for the asker, who sends at the token's time
//!   without asking again. So members waiting on a connection are served
//!   in the order they asked, one token each in turn (without leases); a
//!   member whose next token is further away asks again when it is within
//!   reach, so after a long pause the members race once for their places
//!   in line, not for every token. A race for each
//!   token would go to whoever has the fastest timer and the shortest trip
//!   to Redis (it gave 4 processes shares of 46/47/42/20; reserving,
//!   40/38/39/38: `tests/redis.rs` asserts each at least half an equal
//!   share).
//!
//! # Leases
//!
//! A busy connection can reserve up to [`lease`](RedisStore::lease) tokens
//! in one round trip: those ready now or within `LEASE_AHEAD`, each spent
//! by the process no earlier than the moment the bucket would have
//! admitted it. So a lease never sends faster than the quota; what it can
//! do is spend tokens the fleet no longer wants: if another member meets a
//! 429 and pauses the connection, a process may still send what it
//! reserved before it heard. **Bound**: in any window a connection's fleet
//! sends at most what its quota admits, and at most `lease` requests per
//! limiter (a `RateLimit` and its clones, usually one per process) into
//! another member's pause (1 without leasing: the one reservation).
//! Unspent tokens expire `2 × LEASE_AHEAD` after they were reserved: a
//! worker that crashed, or a lease voided by a 429, loses the fleet those
//! tokens (they were taken from the bucket), but never holds them longer.
//! A process's own 429 voids its lease at once. A decision that times out
//! after Redis made it is made again locally: that token is spent twice.
//!
//! # When Redis fails
//!
//! No request fails, and none is lost, because the store did: a decision
//! that errs or takes longer than [`timeout`](RedisStore::timeout) is made
//! on the process's own buckets, at the same quota (so during an outage a
//! fleet of N may send up to N times the quota; the server's 429s then
//! pause and pace each process on its own). The first failure logs one
//! `tracing` warning for the outage; the process keeps deciding locally
//! and asks Redis again once a second, returning to the shared state (with
//! an `info` event) when it answers. [`RateLimitHandle::fallbacks`](crate::rate_limit::RateLimitHandle::fallbacks)
//! counts the local decisions. After a restart, scripts are reloaded and
//! keys start afresh.
//!
//! # Example
//!
//! ```no_run
//! use tollgate::redis::RedisStore;
//! use tollgate::{Quota, Tollgate};
//!
//! # async fn run() -> Result<(), tower::BoxError> {
//! let store = RedisStore::connect("redis://127.0.0.1:6379").await?.prefix("crm-import")?;
//! let client = Tollgate::builder()
//!     .parallelism(25)
//!     .per_connection(Quota::per_second(50).burst(10))
//!     .store(store)
//!     .build(tower::service_fn(|_: http::Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(()))
//!     }))?;
//! # let _ = client;
//! # Ok(())
//! # }
//! ```
//!
//! # Requirements
//!
//! Redis 5.0 or newer (the scripts read `TIME` and then write). A store is
//! used on the tokio runtime it was connected on (its connection's task
//! runs there). redis-rs 1.x declares Rust 1.88, so this feature needs
//! 1.88; the rest of the crate builds with 1.85.

mod fleet;
mod script;

pub(crate) use fleet::Fleet;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::Script;

use crate::Error;

/// A connection to the Redis server (or cluster proxy) that holds a fleet's
/// per-connection state; give it to
/// [`RateLimitLayer::store`](crate::RateLimitLayer::store) or
/// [`TollgateBuilder::store`](crate::TollgateBuilder::store).
///
/// Cheap to clone: clones share one multiplexed connection, which
/// reconnects by itself after a failure.
#[derive(Clone)]
pub struct RedisStore {
    pub(crate) connection: ConnectionManager,
    pub(crate) prefix: Arc<str>,
    pub(crate) timeout: Duration,
    pub(crate) lease: u32,
    pub(crate) scripts: Arc<Scripts>,
}

pub(crate) struct Scripts {
    pub(crate) acquire: Script,
    pub(crate) throttle: Script,
}

impl RedisStore {
    /// The key prefix unless set: `"tollgate"`.
    pub const DEFAULT_PREFIX: &'static str = "tollgate";

    /// How long a decision may take before it is made locally, unless set:
    /// 100 ms. A decision on a healthy Redis nearby takes about 0.1 ms
    /// (`BENCHMARKS.md`), so this only trips on a Redis that is gone or
    /// stalled. A request waits at most this long for the store to admit
    /// it, and a throttling (429) response at most this long more while the
    /// fleet is told.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);

    /// How far ahead a token may be reserved: 100 ms. Long enough that a
    /// member reserves its turn rather than racing for it, and that a lease
    /// saves round trips on a busy connection; short enough that what was
    /// reserved just before another member's 429 sends little into the
    /// pause.
    pub const LEASE_AHEAD: Duration = Duration::from_millis(100);

    /// The most tokens one round trip reserves: 1,024, beyond any gain (a
    /// round trip on 127.0.0.1 takes ~0.1 ms) and short of tying up what
    /// the fleet shares.
    pub const MAX_LEASE: u32 = 1_024;

    /// How long connecting may take: 5 seconds.
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Connects to the Redis at `url` (`redis://[user:password@]host:port[/db]`,
    /// or `rediss://` with a TLS feature of redis-rs enabled by the
    /// application).
    ///
    /// [`Error::InvalidConfig`] for a URL that does not parse;
    /// [`Error::Store`] if the server cannot be reached within 5 seconds or
    /// refuses (a wrong password, say).
    pub async fn connect(url: &str) -> Result<RedisStore, Error> {
        let client = ::redis::Client::open(url)
            .map_err(|error| Error::invalid_config("redis url", error.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Self::CONNECT_TIMEOUT))
            .set_response_timeout(Some(Self::CONNECT_TIMEOUT))
            // Reconnect attempts in the background are cheap; our own
            // timeout bounds what a request waits for them.
            .set_number_of_retries(1);
        let connecting = ConnectionManager::new_with_config(client, config);
        let connection = match tokio::time::timeout(Self::CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                return Err(Error::Store {
                    reason: error.to_string(),
                })
            }
            Err(_) => {
                return Err(Error::Store {
                    reason: format!("no answer within {:?}", Self::CONNECT_TIMEOUT),
                })
            }
        };
        Ok(RedisStore {
            connection,
            prefix: Arc::from(Self::DEFAULT_PREFIX),
            timeout: Self::DEFAULT_TIMEOUT,
            lease: 1,
            scripts: Arc::new(Scripts {
                acquire: Script::new(script::ACQUIRE),
                throttle: Script::new(script::THROTTLE),
            }),
        })
    }

    /// Namespaces this store's keys: `{prefix:connection}`. Fleets that
    /// share a Redis but not a quota need different prefixes.
    ///
    /// [`Error::InvalidConfig`] unless `prefix` is 1 to 64 printable ASCII
    /// characters other than space, `{` and `}` (braces would break the
    /// cluster hash tag).
    pub fn prefix(mut self, prefix: &str) -> Result<RedisStore, Error> {
        let valid = (1..=64).contains(&prefix.len())
            && prefix
                .bytes()
                .all(|byte| byte.is_ascii_graphic() && byte != b'{' && byte != b'}');
        if !valid {
            return Err(Error::invalid_config(
                "redis prefix",
                format!("{prefix:?}: use 1 to 64 printable ASCII characters, no spaces or braces"),
            ));
        }
        self.prefix = Arc::from(prefix);
        Ok(self)
    }

    /// How long one decision may take before the request is decided
    /// locally instead (default [`DEFAULT_TIMEOUT`](RedisStore::DEFAULT_TIMEOUT)).
    pub fn timeout(mut self, timeout: Duration) -> RedisStore {
        self.timeout = timeout;
        self
    }

    /// Tokens a busy connection may reserve per round trip (default 1: no
    /// lease). A process asks for as many as it has requests waiting on
    /// the connection, up to `tokens`; see "Leases" in the
    /// [module docs](crate::redis) for the bound on overshoot. Zero is
    /// taken as 1, more than [`MAX_LEASE`](RedisStore::MAX_LEASE) as that.
    pub fn lease(mut self, tokens: u32) -> RedisStore {
        self.lease = tokens.clamp(1, Self::MAX_LEASE);
        self
    }

    /// The Redis key of a connection whose key formats (`Debug`) as `key`.
    pub(crate) fn key_name(&self, key: &str) -> String {
        key_name(&self.prefix, key)
    }
}

/// `{prefix:key}`, with `{`, `}` and `%` in `key` escaped so that the hash
/// tag is the whole name and two keys never share one.
fn key_name(prefix: &str, key: &str) -> String {
    let mut name = String::with_capacity(prefix.len() + key.len() + 3);
    name.push('{');
    name.push_str(prefix);
    name.push(':');
    for c in key.chars() {
        match c {
            '{' => name.push_str("%7B"),
            '}' => name.push_str("%7D"),
            '%' => name.push_str("%25"),
            c => name.push(c),
        }
    }
    name.push('}');
    name
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_keep_one_whole_hash_tag() {
        assert_eq!(key_name("tollgate", "crm"), "{tollgate:crm}");
        assert_eq!(key_name("p", "a}b{c%"), "{p:a%7Db%7Bc%25}");
        // Escaping is one-to-one: a key that spells an escape stays apart.
        assert_ne!(key_name("p", "%7D"), key_name("p", "}"));
    }
}
