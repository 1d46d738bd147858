//! The two Lua scripts a fleet decides with, and their replies.
//!
//! One hash per connection, `{prefix:connection}`, with three fields:
//! `tat` (the GCRA theoretical arrival time, µs of Redis's clock), `pace`
//! (the learned pace's state as the decimal of the `u64` that
//! [`Pace`](crate::rate_limit) keeps in memory) and `n` (admissions since the
//! last lesson, for a first estimate). Every decision is one script, so it
//! is atomic; the clock is Redis's `TIME`, read inside the script, so fleet
//! members whose clocks differ still agree. Times are µs as Lua numbers
//! (doubles: exact to 2^53 µs, 285 years past 1970).
//!
//! The arithmetic of the learned pace lives in Rust only (`pace.rs`): a
//! caller passes the interval and tolerance it computed from the pace state
//! it believes current, and the script answers "stale" (with the state it
//! holds) when that belief is wrong, so the caller recomputes and asks
//! again. A lesson is stored by compare-and-set the same way.
//!
//! Each write sets the hash's TTL to when its state would carry nothing a
//! new key's would not: the bucket full again, plus the time a learned pace
//! is kept, plus a second so that the count behind a first estimate of the
//! pace survives short gaps (without it, a connection with no quota would
//! be forgotten a millisecond after each request). Redis's memory is then
//! bounded by the connections in use in the last second or so.
//!
//! A field that is not what these scripts write (another program's value
//! under the same name, a NaN) is replaced by a new key's state rather than
//! failing every decision on the connection. The scripts read `TIME` and
//! then write, which Redis allows from 5.0 (effects replication).

use std::str::FromStr;

/// The start of both scripts: Redis's clock, and the connection's state
/// (`tat` may be nil; `pace`, `n` are a new key's, `fresh`, when absent or
/// not what the scripts write).
macro_rules! read_state {
    () => {
        r"local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local h = redis.call('HMGET', KEYS[1], 'tat', 'pace', 'n')
local pace, n = h[2], tonumber(h[3]) or 0
if not pace or not tonumber(pace) then pace, n = fresh, 0 end
"
    };
}

use ::redis::Value;

/// Takes the connection's next token, and up to `want - 1` after it, for
/// the caller: those ready now or within `ahead` µs (a reservation: the
/// caller sends each at its time, without asking again). If even the
/// first is further away, takes nothing and says when to ask again.
///
/// `KEYS[1]`: the connection's hash. `ARGV`: `[1]` the pace state the
/// caller assumed (`""`: none), `[2]` the state of a key first seen now,
/// `[3]` µs between tokens, `[4]` µs of burst tolerance, `[5]` tokens
/// wanted, `[6]` µs ahead a token may be reserved, `[7]` ms a learned pace
/// is kept.
///
/// Replies `{code, now, pace, n, ...}`, where `pace` and `n` are the stored
/// state: `{0, ..}` (stale: nothing done, ask again with `pace`), `{1, ..,
/// wait}` (ask again in `wait` µs) or `{2, .., taken, base}` (tokens `0 ..
/// taken` are the caller's; token `i` may go at `base + i * t - tau`).
pub(crate) const ACQUIRE: &str = concat!(
    "local fresh = ARGV[2]\n",
    read_state!(),
    r"
local learned = tonumber(pace) >= 4294967296
local assumed = (tonumber(ARGV[1]) or 0) >= 4294967296
if pace ~= ARGV[1] and (learned or assumed) then
  return {0, now, pace, n}
end
local t, tau = tonumber(ARGV[3]), tonumber(ARGV[4])
local want, ahead = tonumber(ARGV[5]), tonumber(ARGV[6])
local tat = tonumber(h[1])
if not tat or tat ~= tat or tat == math.huge or tat == -math.huge then tat = now end
if tat - tau > now + ahead then
  return {1, now, pace, n, math.ceil(tat - tau - now - ahead)}
end
local base = math.max(tat, now)
local taken = math.max(1, math.min(want, math.floor((now + ahead + tau - base) / t) + 1))
tat = base + taken * t
n = math.min(n + taken, 4294967295)
redis.call('HSET', KEYS[1], 'tat', string.format('%.17g', tat), 'pace', pace, 'n', n)
local keep = math.max(math.ceil((tat - now) / 1000), 0) + 1000
if learned then keep = keep + tonumber(ARGV[7]) end
redis.call('PEXPIRE', KEYS[1], keep)
return {2, now, pace, n, taken, math.ceil(base)}
"
);

/// Pauses a connection and stores a lesson, after a 429 (or a 503 with
/// `Retry-After`).
///
/// `KEYS[1]`: the connection's hash. `ARGV`: `[1]` the pace state the
/// lesson was computed from, `[2]` the lesson (`""`: none), `[3]` µs of
/// pause, `[4]` µs of burst tolerance before the lesson, `[5]` after it,
/// `[6]` ms a learned pace is kept, `[7]` the state of a key first seen now.
///
/// Replies `{0, now, pace, n}` (stale: nothing done; recompute the lesson
/// from the stored `pace` and `n`) or `{3, now, pace, n}` (done).
pub(crate) const THROTTLE: &str = concat!(
    "local fresh = ARGV[7]\n",
    read_state!(),
    r"
local tat = tonumber(h[1])
if not tat or tat ~= tat or tat == math.huge or tat == -math.huge then tat = now end
local after = tonumber(ARGV[5])
if ARGV[2] ~= '' then
  if pace ~= ARGV[1] then
    return {0, now, pace, n}
  end
  pace, n = ARGV[2], 0
  tat = math.max(tat - tonumber(ARGV[4]), now) + after
end
local pause = tonumber(ARGV[3])
if pause > 0 then
  tat = math.max(tat, now + pause + after)
end
redis.call('HSET', KEYS[1], 'tat', string.format('%.17g', tat), 'pace', pace, 'n', n)
local keep = math.max(math.ceil((tat - now) / 1000), 0) + 1000
if tonumber(pace) >= 4294967296 then keep = keep + tonumber(ARGV[6]) end
redis.call('PEXPIRE', KEYS[1], keep)
return {3, now, pace, n}
"
);

/// A script's answer, parsed: Redis's clock and the connection's stored
/// pace state, and what was decided.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reply {
    /// Redis's `TIME`, µs since 1970.
    pub(crate) now: u64,
    /// The stored pace state (see `pace.rs`).
    pub(crate) pace: u64,
    /// Admissions since the stored lesson.
    pub(crate) n: u32,
    pub(crate) outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The caller's pace state was not the stored one: nothing done.
    Stale,
    /// No token: ask again in this many µs.
    Wait(u64),
    /// `taken` tokens, token `i` to go at `base + i * t - tau` (µs).
    Taken { taken: u32, base: u64 },
    /// The throttle was applied.
    Done,
}

/// Why a reply could not be read: a script of another version answering,
/// or a store that is not Redis. Never a panic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Malformed;

impl Reply {
    /// Reads the reply of [`ACQUIRE`] or [`THROTTLE`].
    pub(crate) fn parse(value: &Value) -> Result<Reply, Malformed> {
        let Value::Array(items) = value else {
            return Err(Malformed);
        };
        let field = |at: usize| items.get(at).ok_or(Malformed);
        let outcome = match number::<u8>(field(0)?)? {
            0 => Outcome::Stale,
            1 => Outcome::Wait(number(field(4)?)?),
            2 => Outcome::Taken {
                taken: match number(field(4)?)? {
                    0 => return Err(Malformed),
                    taken => taken,
                },
                base: number(field(5)?)?,
            },
            3 => Outcome::Done,
            _ => return Err(Malformed),
        };
        Ok(Reply {
            now: number(field(1)?)?,
            pace: number(field(2)?)?,
            n: number(field(3)?)?,
            outcome,
        })
    }
}

/// An integer reply, or a decimal string one (the pace state, which a Lua
/// number could not hold exactly). Negative or out of range: malformed.
fn number<T: TryFrom<i64> + FromStr>(value: &Value) -> Result<T, Malformed> {
    match value {
        Value::Int(int) => T::try_from(*int).map_err(|_| Malformed),
        Value::BulkString(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or(Malformed),
        Value::SimpleString(text) => text.parse().map_err(|_| Malformed),
        _ => Err(Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(i: i64) -> Value {
        Value::Int(i)
    }

    fn text(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn reply(items: Vec<Value>) -> Result<Reply, Malformed> {
        Reply::parse(&Value::Array(items))
    }

    #[test]
    fn replies_parse() {
        let big = u64::MAX - 1;
        let parsed = reply(vec![int(0), int(5), text(&big.to_string()), int(3)]).unwrap();
        assert_eq!((parsed.now, parsed.pace, parsed.n), (5, big, 3));
        assert_eq!(parsed.outcome, Outcome::Stale);
        let outcome = |items| reply(items).unwrap().outcome;
        assert_eq!(
            outcome(vec![int(1), int(5), text("7"), int(0), int(9)]),
            Outcome::Wait(9)
        );
        assert_eq!(
            outcome(vec![int(2), int(5), text("7"), int(0), int(4), int(11)]),
            Outcome::Taken { taken: 4, base: 11 }
        );
        assert_eq!(
            outcome(vec![int(3), int(5), text("7"), int(0)]),
            Outcome::Done
        );
    }

    #[test]
    fn anything_else_is_malformed_not_a_panic() {
        let bad = [
            vec![],
            vec![int(2), int(5)],
            vec![int(9), int(5), int(1), int(1)],
            vec![int(1), int(-5), int(1), int(1), int(1)],
            vec![int(1), int(5), int(1), int(1)],
            vec![int(2), int(5), int(1), int(1), int(-1), int(1)],
            vec![int(0), int(5), text("not a number"), int(1)],
            vec![int(2), int(5), int(1), int(1), int(i64::MAX), int(1)],
            vec![text("x"), int(5), int(1), int(1)],
            vec![int(2), int(5), int(1), int(1), int(0), int(1)],
            vec![Value::Nil, int(5), int(1), int(1)],
        ];
        for items in bad {
            assert_eq!(reply(items.clone()), Err(Malformed), "{items:?}");
        }
        assert_eq!(Reply::parse(&Value::Okay), Err(Malformed));
    }
}
