// Reading the rate limits a server publishes in its response headers. The
// summary line of these docs is on `pub mod published` in `mod.rs`, so links
// here are resolved from `rate_limit` and spelled out in full.

//! [`parse`](crate::rate_limit::published::parse) reads what one response
//! says about its connection's limit: the policy (at most `quota` requests
//! per `window`), the requests left, and the time until they refill. It only
//! reads; what to do with it is the rate limiter's business.
//!
//! | header | sent by | read as |
//! |---|---|---|
//! | `RateLimit-Policy: "default";q=100;w=10` | draft-ietf-httpapi-ratelimit-headers -08 and later (express-rate-limit's `draft-8`) | `policy`: the most restrictive `q` per `w` seconds |
//! | `RateLimit: "default";r=50;t=30` | the same | `remaining`: the smallest `r`; `reset`: that item's `t` seconds |
//! | `RateLimit-Policy: 10;w=1, 50;w=60` | drafts up to -07 (express-rate-limit's `draft-6` and `draft-7`) | `policy`: the most restrictive quota per `w` |
//! | `RateLimit: limit=100, remaining=50, reset=5` | draft -07 (express-rate-limit's `draft-7`) | `remaining`, `reset` seconds |
//! | `RateLimit-Limit: 100, 100;w=60` | earlier drafts; Kong Gateway, express-rate-limit's `draft-6` | `policy` only when a `w` is given |
//! | `RateLimit-Remaining: 50` | the same | `remaining` |
//! | `RateLimit-Reset: 30` | the same | `reset`: seconds, or a timestamp (see below) |
//! | `X-RateLimit-Limit: 5000` | GitHub, Discord, Pexels and many others | `policy` only when a `w` is given: the name states no window |
//! | `X-RateLimit-Remaining: 4999` | the same | `remaining` |
//! | `X-RateLimit-Reset: 1372700873` | the same: GitHub and Discord send a Unix timestamp, others seconds | `reset`: seconds or a timestamp (see below) |
//! | `X-RateLimit-Reset-After: 1.234` | Discord | `reset`: seconds, to the millisecond |
//! | `X-Rate-Limit-Limit`, `-Remaining`, `-Reset` | X (Twitter), IBM Security Verify Access | as `X-RateLimit-*` |
//! | `X-RateLimit-Limit-Minute: 60` (`-Second`, `-Hour`, `-Day`, `-Month`, `-Year`) | Kong Gateway's rate-limiting plugin | `policy`: the most restrictive, the window from the name (a month as 31 days, a year as 366) |
//!
//! Names are matched case-insensitively, as [`HeaderMap`](http::HeaderMap) does.
//!
//! # Which value wins
//!
//! Each of the three fields is taken from the first source, in the order of
//! the table, that gives a usable value; a source that gives nothing (absent
//! or malformed) hands over to the next, and the fields are independent, so
//! a response may give its `policy` in `RateLimit-Policy` and its `remaining`
//! in `X-RateLimit-Remaining`. For `reset`, Discord's `X-RateLimit-Reset-After`
//! comes before `X-RateLimit-Reset`: it needs no clock agreement.
//!
//! With several policies in one field, the **most restrictive** is taken:
//! the smallest quota per second (`"hour";q=1000;w=3600, "day";q=5000;w=86400`
//! is 5000 a day), and of two equal rates the shorter window, which allows
//! the smaller burst. A client that keeps to it keeps to all of them.
//!
//! With several items in `RateLimit`, the one with the smallest `r` gives
//! `remaining` and its `t` gives `reset` (of equal `r`s, the largest `t`):
//! the limit closest to running out is the one that answers the next 429.
//! Items without a valid `r` give only a `reset` (the largest of their
//! `t`s), and only when no item has an `r`.
//!
//! The draft's quota units matter: a policy whose `qu` is not `"requests"`
//! (`"content-bytes"`, `"concurrent-requests"`) counts something other than
//! requests, so it gives no `policy`, and `RateLimit` items naming it give
//! no `remaining` or `reset`.
//!
//! # Seconds or a timestamp
//!
//! `X-RateLimit-Reset` means a Unix timestamp at GitHub, X and Discord, and
//! seconds from now at many other services; `RateLimit-Reset` is seconds
//! by the drafts, but is read the same way, since a server that copied its
//! `X-` header will send a timestamp there too. A value is told apart by its
//! size:
//!
//! - below 10⁹ (about 31.7 years): **seconds from now**;
//! - from 10⁹ to below 10¹²: a **Unix timestamp in seconds** (10⁹ is
//!   2001-09-09), and `reset` is the time from `now` to it, zero if it has
//!   passed;
//! - from 10¹²: a **Unix timestamp in milliseconds** (10¹² ms is again
//!   2001-09-09; 10¹² seconds would be the year 33,658).
//!
//! This is safe because no rate-limit window is 31 years long: no server
//! means "reset in 31 years" when it sends 10⁹, and no server's clock reads
//! before 2001. A timestamp depends on the two clocks agreeing; a server
//! ahead of `now` makes the reset longer by that much, so the caller caps it
//! (its `max_cool_down`). `X-RateLimit-Reset-After` and the draft's `t` are
//! seconds by definition and never read as timestamps.
//!
//! A `cargo fuzz` target (`fuzz/fuzz_targets/published.rs`; the command is
//! in the README's "Checking tollgate itself") feeds it arbitrary headers,
//! beside the proptests below.
//!
//! # What counts as a value
//!
//! Every case below gives a value or leaves the field `None` (the other
//! fields are still read); none panics.
//!
//! - **Structured fields** (`RateLimit-Policy`, `RateLimit`, and the
//!   `*-Limit` fields, whose `w` parameter needs the syntax) are parsed as
//!   RFC 9651 Lists by the [`sfv`] crate; several lines of one field are
//!   joined with commas first (RFC 9651 §4.2). A field that does not parse
//!   is ignored whole, as the draft requires ("Malformed RateLimit header
//!   fields MUST be ignored"); an item missing a parameter, or with one of
//!   the wrong type or sign, is skipped. `q`, `w`, `r` and `t` must be
//!   Integers: `w=1.5` is malformed (the draft allows no fractions).
//! - **Counts** (`*-Remaining`, and Kong's limits): ASCII digits, with
//!   optional spaces around them; a sign, a fraction, an exponent or a value
//!   over `u64::MAX` is malformed.
//! - **Resets** (`*-Reset`, `X-RateLimit-Reset-After`): ASCII digits with an
//!   optional fraction (Discord's `1.234`), read to the nanosecond without
//!   floating point, so `NaN`, `inf`, `-1` and `1e3` are malformed.
//! - **Several values** in one plain field (repeated lines, or one line
//!   folded with commas): the smallest `remaining` and the largest `reset`,
//!   the choices that cannot earn another 429. One malformed value makes the
//!   whole field malformed.
//! - **Non-ASCII** bytes anywhere in a field make it malformed.
//! - **Absurdly long**: a field longer than 4096 bytes, all its lines
//!   together, is not read at all; real ones are a few dozen bytes, a few hundred
//!   with partition keys.
//! - **Durations** saturate at [`MAX_DURATION`](crate::rate_limit::published::MAX_DURATION) (about 136 years): a reset
//!   longer than that is returned as `MAX_DURATION`, and the caller caps it
//!   further. A **window** longer than that, or of 0 seconds, or a
//!   **quota of 0**, gives no policy: none of them says at what rate to send
//!   (a quota of 0 forbids sending at all, which a 429 says better, with a
//!   `Retry-After`).

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use http::header::{HeaderMap, HeaderName};
use sfv::{BareItem, Dictionary, Item, List, ListEntry, Parser};

/// What one response says about its connection's limit.
///
/// Every field is `None` when the response does not state it, or states it
/// in a malformed way; see the [module docs](self) for which headers are
/// read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// The policy: at most `quota` requests per `window`, if stated.
    pub policy: Option<Policy>,
    /// Requests left before the limit, if stated.
    pub remaining: Option<u64>,
    /// Time until the limit resets (the window ends / remaining refills), if
    /// stated. At most [`MAX_DURATION`].
    pub reset: Option<Duration>,
}

impl Published {
    /// `true` when the response states nothing about its limit.
    pub fn is_empty(&self) -> bool {
        self.policy.is_none() && self.remaining.is_none() && self.reset.is_none()
    }

    /// `true` when `remaining == Some(0)`: the connection should hold until
    /// [`reset`](Self::reset) (if stated).
    pub fn exhausted(&self) -> bool {
        self.remaining == Some(0)
    }
}

/// A published policy: at most `quota` requests per `window`.
///
/// [`parse`] only returns policies with a `quota` of at least 1 and a
/// `window` from 1 second to [`MAX_DURATION`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Requests allowed per window.
    pub quota: u64,
    /// The window, in whole seconds.
    pub window: Duration,
}

/// The longest duration [`parse`] returns (`u32::MAX` seconds, about 136
/// years): a longer `reset` saturates to it, and a longer window gives no
/// policy.
pub const MAX_DURATION: Duration = Duration::from_secs(u32::MAX as u64);

/// Longest field read, all its lines together; a longer one is treated as
/// malformed, so a hostile value costs nothing to reject.
const MAX_FIELD_LEN: usize = 4096;

const NANOS_PER_SEC: u128 = 1_000_000_000;
/// From here a reset is a Unix timestamp in seconds (2001-09-09).
const EPOCH_SECONDS_FROM: u128 = 1_000_000_000 * NANOS_PER_SEC;
/// From here a reset is a Unix timestamp in milliseconds (2001-09-09 again).
const EPOCH_MILLIS_FROM: u128 = 1_000_000_000_000 * NANOS_PER_SEC;

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const X_RATELIMIT_RESET_AFTER: HeaderName = HeaderName::from_static("x-ratelimit-reset-after");
const X_RATE_LIMIT_LIMIT: HeaderName = HeaderName::from_static("x-rate-limit-limit");
const X_RATE_LIMIT_REMAINING: HeaderName = HeaderName::from_static("x-rate-limit-remaining");
const X_RATE_LIMIT_RESET: HeaderName = HeaderName::from_static("x-rate-limit-reset");

/// Every header name [`parse`] reads, lower case (as `http` keeps them);
/// the last six are Kong's `X-RateLimit-Limit-<window>` (see
/// `KONG_WINDOWS`).
pub const HEADERS: [HeaderName; 18] = [
    RATELIMIT_POLICY,
    RATELIMIT,
    RATELIMIT_LIMIT,
    RATELIMIT_REMAINING,
    RATELIMIT_RESET,
    X_RATELIMIT_LIMIT,
    X_RATELIMIT_REMAINING,
    X_RATELIMIT_RESET,
    X_RATELIMIT_RESET_AFTER,
    X_RATE_LIMIT_LIMIT,
    X_RATE_LIMIT_REMAINING,
    X_RATE_LIMIT_RESET,
    HeaderName::from_static("x-ratelimit-limit-second"),
    HeaderName::from_static("x-ratelimit-limit-minute"),
    HeaderName::from_static("x-ratelimit-limit-hour"),
    HeaderName::from_static("x-ratelimit-limit-day"),
    HeaderName::from_static("x-ratelimit-limit-month"),
    HeaderName::from_static("x-ratelimit-limit-year"),
];

/// The windows, in seconds, of Kong's headers, the last six of
/// [`HEADERS`]. Months and years are taken at their longest: a longer
/// window is a slower pace, which cannot overrun the server.
const KONG_WINDOWS: [u64; 6] = [1, 60, 3_600, 86_400, 31 * 86_400, 366 * 86_400];

/// What `headers` say about the connection's rate limit, as of the
/// wall-clock time `now` (used only for resets sent as timestamps).
///
/// Never panics; a malformed header leaves its field `None`. See the
/// [module docs](self) for every header and case.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use http::HeaderMap;
/// use tollgate::rate_limit::published::{self, Policy};
///
/// let mut headers = HeaderMap::new();
/// headers.insert("ratelimit-policy", r#""permin";q=50;w=60, "perhr";q=1000;w=3600"#.parse().unwrap());
/// headers.insert("ratelimit", r#""perhr";r=0;t=30"#.parse().unwrap());
///
/// let limits = published::parse(&headers, SystemTime::now());
/// // 1000 an hour is the slower of the two rates.
/// assert_eq!(limits.policy, Some(Policy { quota: 1000, window: Duration::from_secs(3600) }));
/// assert_eq!(limits.remaining, Some(0));
/// assert_eq!(limits.reset, Some(Duration::from_secs(30)));
/// assert!(limits.exhausted());
///
/// // GitHub: a timestamp, and no window.
/// let mut headers = HeaderMap::new();
/// headers.insert("x-ratelimit-limit", "60".parse().unwrap());
/// headers.insert("x-ratelimit-remaining", "56".parse().unwrap());
/// headers.insert("x-ratelimit-reset", "1372700873".parse().unwrap());
/// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1372700873 - 600);
/// let limits = published::parse(&headers, now);
/// assert_eq!(limits.policy, None);
/// assert_eq!(limits.remaining, Some(56));
/// assert_eq!(limits.reset, Some(Duration::from_secs(600)));
/// ```
pub fn parse(headers: &HeaderMap, now: SystemTime) -> Published {
    let policies = sf_list(headers, &RATELIMIT_POLICY);
    let current = service_limit(headers, policies.as_deref());
    let reset = |name: &HeaderName, unit: ResetUnit| {
        plain(headers, name, parse_decimal, u128::max).map(|value| unit.delay(value, now))
    };
    Published {
        policy: policies
            .as_deref()
            .and_then(quota_policy)
            .or_else(|| limit_policy(headers, &RATELIMIT_LIMIT))
            .or_else(|| limit_policy(headers, &X_RATELIMIT_LIMIT))
            .or_else(|| limit_policy(headers, &X_RATE_LIMIT_LIMIT))
            .or_else(|| kong_policy(headers)),
        remaining: current
            .remaining
            .or_else(|| plain(headers, &RATELIMIT_REMAINING, parse_count, u64::min))
            .or_else(|| plain(headers, &X_RATELIMIT_REMAINING, parse_count, u64::min))
            .or_else(|| plain(headers, &X_RATE_LIMIT_REMAINING, parse_count, u64::min)),
        reset: current
            .reset
            .or_else(|| reset(&RATELIMIT_RESET, ResetUnit::SecondsOrTimestamp))
            .or_else(|| reset(&X_RATELIMIT_RESET_AFTER, ResetUnit::Seconds))
            .or_else(|| reset(&X_RATELIMIT_RESET, ResetUnit::SecondsOrTimestamp))
            .or_else(|| reset(&X_RATE_LIMIT_RESET, ResetUnit::SecondsOrTimestamp)),
    }
}

/// Whether any header could publish a limit: a name with `ratelimit` or
/// `rate-limit` in it. One pass over the names, so that responses without
/// any are not parsed.
pub(crate) fn present(headers: &HeaderMap) -> bool {
    headers.keys().any(|name| {
        let name = name.as_str();
        name.contains("ratelimit") || name.contains("rate-limit")
    })
}

/// Every line of field `name`, joined with `", "` (RFC 9651 §4.2), or `None`
/// if it is absent, too long, or not visible ASCII.
fn field<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<Cow<'h, str>> {
    let mut lines = headers.get_all(name).iter();
    let first = lines.next()?;
    let mut len = first.len();
    if len > MAX_FIELD_LEN {
        return None;
    }
    let mut text = Cow::Borrowed(first.to_str().ok()?);
    for line in lines {
        len += 2 + line.len();
        if len > MAX_FIELD_LEN {
            return None;
        }
        let joined = text.to_mut();
        joined.push_str(", ");
        joined.push_str(line.to_str().ok()?);
    }
    Some(text)
}

/// Field `name` as a Structured Field List, or `None` if it does not parse.
fn sf_list(headers: &HeaderMap, name: &HeaderName) -> Option<List> {
    Parser::new(field(headers, name)?.as_ref()).parse().ok()
}

/// The Items of a List (inner lists mean nothing in these fields).
fn items(list: &[ListEntry]) -> impl Iterator<Item = &Item> {
    list.iter().filter_map(|entry| match entry {
        ListEntry::Item(item) => Some(item),
        ListEntry::InnerList(_) => None,
    })
}

/// A non-negative Integer.
fn count(value: &BareItem) -> Option<u64> {
    u64::try_from(value.as_integer()?).ok()
}

/// A non-negative Integer of seconds, saturating at [`MAX_DURATION`].
fn seconds(value: &BareItem) -> Option<Duration> {
    Some(Duration::from_secs(count(value)?).min(MAX_DURATION))
}

/// The policy `quota` per `window_secs`, if it says at what rate to send.
fn policy(quota: u64, window_secs: u64) -> Option<Policy> {
    let window = Duration::from_secs(window_secs);
    (quota > 0 && !window.is_zero() && window <= MAX_DURATION).then_some(Policy { quota, window })
}

/// The slower of two policies; of equal rates, the shorter window.
fn most_restrictive(a: Policy, b: Policy) -> Policy {
    // quota_a / window_a vs quota_b / window_b, cross-multiplied: windows
    // are at most u32::MAX seconds, so neither product overflows a u128.
    let rate_a = u128::from(a.quota) * u128::from(b.window.as_secs());
    let rate_b = u128::from(b.quota) * u128::from(a.window.as_secs());
    if (rate_a, a.window) <= (rate_b, b.window) {
        a
    } else {
        b
    }
}

/// `true` if the policy `item` counts requests (the draft's `qu`, whose
/// default is `"requests"`).
fn counts_requests(item: &Item) -> bool {
    item.params.get("qu").is_none_or(|unit| {
        unit.as_string()
            .is_some_and(|unit| unit.as_str() == "requests")
    })
}

/// The most restrictive policy of a `RateLimit-Policy` List.
fn quota_policy(list: &[ListEntry]) -> Option<Policy> {
    items(list)
        .filter(|item| counts_requests(item))
        .filter_map(|item| {
            // Draft -07 wrote the quota as the item itself: `10;w=1`.
            let quota = item.params.get("q").unwrap_or(&item.bare_item);
            policy(count(quota)?, count(item.params.get("w")?)?)
        })
        .reduce(most_restrictive)
}

/// The most restrictive quota with a `w` in a `*-Limit` field
/// (`100, 100;w=60, 1000;w=3600`); a bare number states no window.
fn limit_policy(headers: &HeaderMap, name: &HeaderName) -> Option<Policy> {
    items(&sf_list(headers, name)?)
        .filter_map(|item| policy(count(&item.bare_item)?, count(item.params.get("w")?)?))
        .reduce(most_restrictive)
}

/// The most restrictive of Kong's `X-RateLimit-Limit-<window>` headers.
fn kong_policy(headers: &HeaderMap) -> Option<Policy> {
    HEADERS[HEADERS.len() - KONG_WINDOWS.len()..]
        .iter()
        .zip(KONG_WINDOWS)
        .filter_map(|(name, window)| policy(plain(headers, name, parse_count, u64::min)?, window))
        .reduce(most_restrictive)
}

/// What a `RateLimit` field says about the limit closest to running out.
#[derive(Default)]
struct ServiceLimit {
    remaining: Option<u64>,
    reset: Option<Duration>,
}

/// The `RateLimit` field: a List of service limit items (draft -08 on), or
/// a Dictionary with `remaining` and `reset` (draft -07). No Dictionary of
/// draft -07 parses as a List, as its `=` cannot follow a List's item.
fn service_limit(headers: &HeaderMap, policies: Option<&[ListEntry]>) -> ServiceLimit {
    let Some(text) = field(headers, &RATELIMIT) else {
        return ServiceLimit::default();
    };
    if let Ok(list) = Parser::new(text.as_ref()).parse::<List>() {
        return service_limit_items(&list, policies);
    }
    let Ok(dictionary) = Parser::new(text.as_ref()).parse::<Dictionary>() else {
        return ServiceLimit::default();
    };
    let member = |key: &str| match dictionary.get(key) {
        Some(ListEntry::Item(item)) => Some(&item.bare_item),
        _ => None,
    };
    ServiceLimit {
        remaining: member("remaining").and_then(count),
        reset: member("reset").and_then(seconds),
    }
}

fn service_limit_items(list: &[ListEntry], policies: Option<&[ListEntry]>) -> ServiceLimit {
    // Items naming a policy that counts something other than requests.
    let other_units: Vec<&BareItem> = policies
        .map(|policies| {
            items(policies)
                .filter(|policy| !counts_requests(policy))
                .map(|policy| &policy.bare_item)
                .collect()
        })
        .unwrap_or_default();
    // (r, t) of the item closest to running out.
    let mut closest: Option<(u64, Option<Duration>)> = None;
    // The longest `t` of items without an `r`.
    let mut unnumbered_reset: Option<Duration> = None;
    for item in items(list) {
        if other_units.iter().any(|&id| *id == item.bare_item) {
            continue;
        }
        let reset = item.params.get("t").and_then(seconds);
        match item.params.get("r").and_then(count) {
            Some(remaining) => {
                let closer =
                    closest.is_none_or(|(r, t)| remaining < r || (remaining == r && reset > t));
                if closer {
                    closest = Some((remaining, reset));
                }
            }
            None => unnumbered_reset = unnumbered_reset.max(reset),
        }
    }
    match closest {
        Some((remaining, reset)) => ServiceLimit {
            remaining: Some(remaining),
            reset,
        },
        None => ServiceLimit {
            remaining: None,
            reset: unnumbered_reset,
        },
    }
}

/// A plain (not structured) field: every comma-separated value parsed by
/// `parse_one` and combined with `pick`; `None` if any value is malformed.
fn plain<T>(
    headers: &HeaderMap,
    name: &HeaderName,
    parse_one: fn(&str) -> Option<T>,
    pick: fn(T, T) -> T,
) -> Option<T> {
    let text = field(headers, name)?;
    let mut values = text.split(',').map(parse_one);
    let first = values.next()??;
    values.try_fold(first, |picked, value| Some(pick(picked, value?)))
}

/// ASCII digits, optionally surrounded by spaces, that fit a `u64`.
fn parse_count(value: &str) -> Option<u64> {
    let value = value.trim_matches([' ', '\t']);
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// A non-negative decimal number (`30`, `1.234`), in nanoseconds of its
/// unit, saturating at `u128::MAX`; no floating point, so no NaN.
fn parse_decimal(value: &str) -> Option<u128> {
    let value = value.trim_matches([' ', '\t']);
    let (whole, fraction) = value.split_once('.').unwrap_or((value, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let whole = whole.bytes().fold(0u128, |n, b| {
        n.saturating_mul(10).saturating_add(u128::from(b - b'0'))
    });
    let mut nanos = whole.saturating_mul(NANOS_PER_SEC);
    let mut scale = NANOS_PER_SEC;
    for b in fraction.bytes().take(9) {
        scale /= 10;
        nanos = nanos.saturating_add(u128::from(b - b'0') * scale);
    }
    Some(nanos)
}

/// How a reset field's number is read.
#[derive(Clone, Copy)]
enum ResetUnit {
    /// Seconds from now, whatever the size.
    Seconds,
    /// Seconds from now, or a Unix timestamp in seconds or milliseconds,
    /// told apart by size (see the module docs).
    SecondsOrTimestamp,
}

impl ResetUnit {
    /// The time from `now` to the reset `nanos` (a number in nanoseconds of
    /// its unit) names, at most [`MAX_DURATION`].
    fn delay(self, nanos: u128, now: SystemTime) -> Duration {
        let delta = match self {
            ResetUnit::SecondsOrTimestamp if nanos >= EPOCH_SECONDS_FROM => {
                let at = if nanos >= EPOCH_MILLIS_FROM {
                    nanos / 1_000
                } else {
                    nanos
                };
                let now = now
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |since| since.as_nanos());
                at.saturating_sub(now)
            }
            _ => nanos,
        };
        saturating_duration(delta)
    }
}

/// `nanos` as a duration, at most [`MAX_DURATION`].
fn saturating_duration(nanos: u128) -> Duration {
    if nanos >= MAX_DURATION.as_nanos() {
        return MAX_DURATION;
    }
    // Below MAX_DURATION, so the seconds fit a u64.
    Duration::new(
        (nanos / NANOS_PER_SEC) as u64,
        (nanos % NANOS_PER_SEC) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    use crate::test_util::{at, headers};

    fn parse_at(pairs: &[(&str, &str)], now: u64) -> Published {
        let pairs: Vec<(&str, &[u8])> = pairs.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        parse(&headers(&pairs), at(now))
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn per(quota: u64, window_secs: u64) -> Option<Policy> {
        Some(Policy {
            quota,
            window: s(window_secs),
        })
    }

    fn published(
        policy: Option<Policy>,
        remaining: Option<u64>,
        reset: Option<Duration>,
    ) -> Published {
        Published {
            policy,
            remaining,
            reset,
        }
    }

    /// The examples of draft-ietf-httpapi-ratelimit-headers (-10), in order.
    #[test]
    fn current_draft_examples() {
        let policy = |value| parse_at(&[("ratelimit-policy", value)], 0).policy;
        assert_eq!(
            policy(r#""burst";q=100;w=60,"daily";q=1000;w=86400"#),
            per(1000, 86400)
        );
        assert_eq!(policy(r#""default";q=100;w=10"#), per(100, 10));
        assert_eq!(
            policy(r#""permin";q=50;w=60,"perhr";q=1000;w=3600"#),
            per(1000, 3600)
        );
        assert_eq!(
            policy(r#""peruser";q=100;w=60;pk=:cHsdsRa894==:"#),
            per(100, 60)
        );
        // A quota of bytes is no request rate.
        assert_eq!(
            policy(r#""peruser";q=65535;qu="content-bytes";w=10;pk=:sdfjLJUOUH==:"#),
            None
        );
        // `w` is optional, and without it there is no rate.
        assert_eq!(policy("quota;q=10"), None);

        let limit = |value| parse_at(&[("ratelimit", value)], 0);
        assert_eq!(
            limit(r#""default";r=50;t=30"#),
            published(None, Some(50), Some(s(30)))
        );
        assert_eq!(
            limit(r#""default";r=999;pk=:dHJpYWwxMjEzMjM=:"#),
            published(None, Some(999), None)
        );
        assert_eq!(
            limit(r#""default";r=1;t=7"#),
            published(None, Some(1), Some(s(7)))
        );
        let problem = limit(r#""problemPolicy";r=0;t=10"#);
        assert!(problem.exhausted());
        assert_eq!(problem.reset, Some(s(10)));

        // Fixed window, dynamic limits, multiple windows.
        let both =
            |policy, limit| parse_at(&[("ratelimit-policy", policy), ("ratelimit", limit)], 0);
        assert_eq!(
            both(r#""fixedwindow";q=100;w=60"#, r#""fixedwindow";r=99;t=50"#),
            published(per(100, 60), Some(99), Some(s(50)))
        );
        assert_eq!(
            both(r#""dynamic";q=15;w=20"#, r#""dynamic";r=0;t=20"#),
            published(per(15, 20), Some(0), Some(s(20)))
        );
        assert_eq!(
            both(
                r#""hour";q=1000;w=3600, "day";q=5000;w=86400"#,
                r#""day";r=100;t=36000"#
            ),
            published(per(5000, 86400), Some(100), Some(s(36000)))
        );
        // Tokens as identifiers, no `r`: only a reset.
        assert_eq!(
            both("quota;q=100;w=1", "quota;t=1"),
            published(per(100, 1), None, Some(s(1)))
        );
        // Unknown parameters are comments.
        assert_eq!(
            both(
                r#""sliding";q=100;w=60;burst=1000"#,
                r#""sliding";r=50;t=44"#
            ),
            published(per(100, 60), Some(50), Some(s(44)))
        );
    }

    /// express-rate-limit's `draft-8` puts spaces after the semicolons.
    #[test]
    fn spaces_between_parameters() {
        let got = parse_at(
            &[
                (
                    "ratelimit-policy",
                    r#""100-in-1min"; q=100; w=60; pk=:ZXhhbXBsZQ==:"#,
                ),
                (
                    "ratelimit",
                    r#""100-in-1min"; r=25; t=5; pk=:ZXhhbXBsZQ==:"#,
                ),
            ],
            0,
        );
        assert_eq!(got, published(per(100, 60), Some(25), Some(s(5))));
    }

    /// Draft -07: a Dictionary `RateLimit`, Integer policy items.
    #[test]
    fn draft_07() {
        let got = parse_at(
            &[
                ("ratelimit-policy", "100;w=10"),
                ("ratelimit", "limit=100, remaining=50, reset=5"),
            ],
            0,
        );
        assert_eq!(got, published(per(100, 10), Some(50), Some(s(5))));
        let policy = |value| parse_at(&[("ratelimit-policy", value)], 0).policy;
        assert_eq!(
            policy("10;w=1, 50;w=60, 1000;w=3600, 5000;w=86400"),
            per(5000, 86400)
        );
        assert_eq!(policy("10;w=1;burst=1000, 1000;w=3600"), per(1000, 3600));
        // 10 a second and 10 a minute: the minute.
        assert_eq!(policy("10;w=1, 10;w=60"), per(10, 60));
        let exhausted = parse_at(&[("ratelimit", "limit=10, remaining=0, reset=10")], 0);
        assert!(exhausted.exhausted());
        assert_eq!(exhausted.reset, Some(s(10)));
    }

    #[test]
    fn several_service_limits() {
        let limit = |value| parse_at(&[("ratelimit", value)], 0);
        // The smallest remaining, with its own reset.
        assert_eq!(
            limit(r#""a";r=50;t=30, "b";r=5;t=3000, "c";r=70;t=1"#),
            published(None, Some(5), Some(s(3000)))
        );
        // Of equal remainings, the later reset.
        assert_eq!(
            limit(r#""a";r=5;t=30, "b";r=5;t=60, "c";r=5"#),
            published(None, Some(5), Some(s(60)))
        );
        // Items without `r` only count when none has one.
        assert_eq!(
            limit(r#""a";t=30, "b";r=9;t=2"#),
            published(None, Some(9), Some(s(2)))
        );
        assert_eq!(
            limit(r#""a";t=30, "b";t=90"#),
            published(None, None, Some(s(90)))
        );
        // Split over two lines, as RFC 9651 allows.
        let lines = headers(&[
            ("ratelimit", br#""a";r=50;t=30"#),
            ("ratelimit", br#""b";r=3;t=9"#),
        ]);
        assert_eq!(parse(&lines, at(0)), published(None, Some(3), Some(s(9))));
    }

    #[test]
    fn service_limits_in_other_units_are_skipped() {
        let got = parse_at(
            &[
                (
                    "ratelimit-policy",
                    r#""bytes";q=300000000;qu="content-bytes";w=60, "reqs";q=100;w=60"#,
                ),
                ("ratelimit", r#""bytes";r=0;t=60, "reqs";r=40;t=20"#),
            ],
            0,
        );
        assert_eq!(got, published(per(100, 60), Some(40), Some(s(20))));
        // `qu="requests"` is the default, said out loud.
        let explicit = parse_at(&[("ratelimit-policy", r#""r";q=10;qu="requests";w=1"#)], 0);
        assert_eq!(explicit.policy, per(10, 1));
    }

    /// GitHub's documented example, and its epoch-seconds reset.
    #[test]
    fn github() {
        let pairs = [
            ("x-ratelimit-limit", "60"),
            ("x-ratelimit-remaining", "56"),
            ("x-ratelimit-used", "4"),
            ("x-ratelimit-reset", "1372700873"),
        ];
        assert_eq!(
            parse_at(&pairs, 1_372_700_873 - 1_234),
            published(None, Some(56), Some(s(1_234)))
        );
        // A reset in the past is now.
        assert_eq!(
            parse_at(&pairs, 1_372_700_873 + 5).reset,
            Some(Duration::ZERO)
        );
        assert_eq!(parse_at(&pairs, 1_372_700_873).reset, Some(Duration::ZERO));
    }

    /// X (Twitter) spells the family `x-rate-limit-*`.
    #[test]
    fn x_twitter() {
        let pairs = [
            ("x-rate-limit-limit", "2000"),
            ("x-rate-limit-remaining", "1999"),
            ("x-rate-limit-reset", "1497039241"),
        ];
        assert_eq!(
            parse_at(&pairs, 1_497_039_241 - 900),
            published(None, Some(1999), Some(s(900)))
        );
    }

    /// Discord's documented example: `Reset-After` wins over the timestamp.
    #[test]
    fn discord() {
        let now = 1_470_173_022;
        let mut pairs = vec![
            ("x-ratelimit-limit", "5"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1470173023.123"),
            ("x-ratelimit-reset-after", "1.234"),
            ("x-ratelimit-bucket", "abcd1234"),
        ];
        let got = parse_at(&pairs, now);
        assert_eq!(
            got,
            published(None, Some(0), Some(Duration::from_millis(1234)))
        );
        assert!(got.exhausted());
        pairs.retain(|(name, _)| *name != "x-ratelimit-reset-after");
        assert_eq!(
            parse_at(&pairs, now).reset,
            Some(Duration::from_millis(1123))
        );
        // A broken `Reset-After` hands over to `Reset`.
        pairs.push(("x-ratelimit-reset-after", "soon"));
        assert_eq!(
            parse_at(&pairs, now).reset,
            Some(Duration::from_millis(1123))
        );
    }

    /// Kong Gateway: the old drafts' fields, and the window in a name.
    #[test]
    fn kong() {
        let mut pairs = vec![
            ("ratelimit-limit", "5"),
            ("ratelimit-remaining", "4"),
            ("ratelimit-reset", "47"),
            ("x-ratelimit-limit-minute", "5"),
            ("x-ratelimit-remaining-minute", "4"),
        ];
        assert_eq!(
            parse_at(&pairs, 0),
            published(per(5, 60), Some(4), Some(s(47)))
        );
        pairs.push(("x-ratelimit-limit-second", "1"));
        pairs.push(("x-ratelimit-limit-hour", "100"));
        assert_eq!(parse_at(&pairs, 0).policy, per(100, 3600));
        pairs.push(("x-ratelimit-limit-month", "1000"));
        assert_eq!(parse_at(&pairs, 0).policy, per(1000, 31 * 86400));
    }

    /// Earlier drafts (and express-rate-limit's `draft-6`).
    #[test]
    fn earlier_drafts() {
        let got = parse_at(
            &[
                ("ratelimit-policy", "100;w=60"),
                ("ratelimit-limit", "100"),
                ("ratelimit-remaining", "25"),
                ("ratelimit-reset", "5"),
            ],
            0,
        );
        assert_eq!(got, published(per(100, 60), Some(25), Some(s(5))));
        let limit = |value| parse_at(&[("ratelimit-limit", value)], 0).policy;
        assert_eq!(limit("100"), None);
        assert_eq!(limit("100;w=60"), per(100, 60));
        assert_eq!(limit("100, 100;w=60"), per(100, 60));
        assert_eq!(limit("100, 100;w=60, 1000;w=3600"), per(1000, 3600));
        // The same syntax is read in `X-RateLimit-Limit`.
        let x = parse_at(&[("x-ratelimit-limit", "10;w=1")], 0);
        assert_eq!(x.policy, per(10, 1));
    }

    #[test]
    fn precedence_is_per_field() {
        let all = [
            ("ratelimit-policy", r#""p";q=10;w=1"#),
            ("ratelimit", r#""p";r=7;t=3"#),
            ("ratelimit-limit", "20;w=1"),
            ("ratelimit-remaining", "17"),
            ("ratelimit-reset", "13"),
            ("x-ratelimit-limit", "30;w=1"),
            ("x-ratelimit-remaining", "27"),
            ("x-ratelimit-reset-after", "22"),
            ("x-ratelimit-reset", "23"),
            ("x-rate-limit-limit", "40;w=1"),
            ("x-rate-limit-remaining", "37"),
            ("x-rate-limit-reset", "33"),
            ("x-ratelimit-limit-second", "50"),
        ];
        // Drop the leading source of each field, one after the other.
        let expected = [
            published(per(10, 1), Some(7), Some(s(3))),
            published(per(20, 1), Some(7), Some(s(3))),
            published(per(20, 1), Some(17), Some(s(13))),
            published(per(30, 1), Some(17), Some(s(13))),
            published(per(30, 1), Some(27), Some(s(13))),
            published(per(30, 1), Some(27), Some(s(22))),
            published(per(40, 1), Some(27), Some(s(22))),
            published(per(40, 1), Some(37), Some(s(22))),
            published(per(40, 1), Some(37), Some(s(23))),
            published(per(40, 1), Some(37), Some(s(33))),
            published(per(50, 1), Some(37), Some(s(33))),
            published(per(50, 1), None, Some(s(33))),
            published(per(50, 1), None, None),
        ];
        for (skip, want) in expected.iter().enumerate() {
            assert_eq!(parse_at(&all[skip..], 0), *want, "without the first {skip}");
        }
        assert_eq!(parse_at(&[], 0), Published::default());
        assert!(parse_at(&[], 0).is_empty());
        assert!(!parse_at(&all, 0).is_empty());
    }

    #[test]
    fn a_malformed_source_hands_over_to_the_next() {
        let got = parse_at(
            &[
                ("ratelimit-policy", r#""p";q=10;w=1,"#), // trailing comma
                ("ratelimit", r#""p";r=-1;t=-3"#),
                ("ratelimit-remaining", "4x"),
                ("x-ratelimit-limit", "30;w=1"),
                ("x-ratelimit-remaining", "27"),
                ("x-ratelimit-reset", "9"),
            ],
            0,
        );
        assert_eq!(got, published(per(30, 1), Some(27), Some(s(9))));
    }

    #[test]
    fn seconds_or_timestamps() {
        let reset = |value, now| parse_at(&[("x-ratelimit-reset", value)], now).reset;
        let now = 1_700_000_000;
        assert_eq!(reset("30", now), Some(s(30)));
        assert_eq!(reset("999999999", now), Some(s(999_999_999)));
        // From 10^9 on, a timestamp: here in the past.
        assert_eq!(reset("1000000000", now), Some(Duration::ZERO));
        assert_eq!(reset("1700000060", now), Some(s(60)));
        assert_eq!(
            reset("1700000000.25", now - 1),
            Some(Duration::from_millis(1250))
        );
        // From 10^12 on, milliseconds.
        assert_eq!(
            reset("1700000060500", now),
            Some(Duration::from_millis(60_500))
        );
        assert_eq!(reset("1000000000000", now), Some(Duration::ZERO));
        // RateLimit-Reset is read the same way.
        let old = parse_at(&[("ratelimit-reset", "1700000042")], now);
        assert_eq!(old.reset, Some(s(42)));
        // Reset-After and the draft's `t` are always seconds.
        let after = parse_at(&[("x-ratelimit-reset-after", "1700000042")], now);
        assert_eq!(after.reset, Some(s(1_700_000_042)));
        let t = parse_at(&[("ratelimit", r#""p";r=1;t=1700000042"#)], now);
        assert_eq!(t.reset, Some(s(1_700_000_042)));
        // A clock before 1970 sees every timestamp in the future.
        let before = SystemTime::UNIX_EPOCH - s(10);
        let map = headers(&[("x-ratelimit-reset", b"1000000005")]);
        assert_eq!(parse(&map, before).reset, Some(s(1_000_000_005)));
    }

    #[test]
    fn several_plain_values() {
        let got = parse_at(
            &[
                ("x-ratelimit-remaining", "9, 3"),
                ("x-ratelimit-remaining", "5"),
                ("x-ratelimit-reset-after", "1.5, 4"),
                ("x-ratelimit-reset-after", "2"),
            ],
            0,
        );
        assert_eq!(got, published(None, Some(3), Some(s(4))));
        // One bad value spoils the field.
        let bad = parse_at(
            &[
                ("x-ratelimit-remaining", "9, x"),
                ("x-ratelimit-reset", "1, "),
            ],
            0,
        );
        assert_eq!(bad, Published::default());
    }

    #[test]
    fn malformed_values_are_ignored() {
        for bad in [
            "",
            " ",
            "-5",
            "+5",
            "5s",
            "1e3",
            "NaN",
            "nan",
            "inf",
            "-inf",
            "0x10",
            "1.2.3",
            ".5",
            "5 5",
            "١٢",
            "caf\u{e9}",
            "\u{ff11}",
        ] {
            for name in [
                "ratelimit-remaining",
                "ratelimit-reset",
                "x-ratelimit-remaining",
                "x-ratelimit-reset",
                "x-ratelimit-reset-after",
                "x-rate-limit-remaining",
                "x-rate-limit-reset",
                "x-ratelimit-limit-minute",
                "ratelimit-limit",
                "ratelimit-policy",
                "ratelimit",
            ] {
                let map = headers(&[(name, bad.as_bytes()), ("x-ratelimit-limit-hour", b"100")]);
                let got = parse(&map, at(0));
                assert_eq!(
                    got,
                    published(per(100, 3600), None, None),
                    "{name}: {bad:?}"
                );
            }
        }
        // Fractions of remaining requests mean nothing.
        assert_eq!(
            parse_at(&[("ratelimit-remaining", "1.5")], 0).remaining,
            None
        );
        // Bytes that are not ASCII.
        let map = headers(&[
            ("x-ratelimit-remaining", b"\xff5"),
            ("ratelimit", b"\"\xe9\";r=1"),
        ]);
        assert_eq!(parse(&map, at(0)), Published::default());
    }

    #[test]
    fn malformed_structured_items_are_skipped() {
        let policy = |value| parse_at(&[("ratelimit-policy", value)], 0).policy;
        for bad in [
            r#""p";q=0;w=10"#,
            r#""p";q=10;w=0"#,
            r#""p";q=-10;w=10"#,
            r#""p";q=10;w=-10"#,
            r#""p";q=10;w=1.5"#,
            r#""p";q=1.5;w=10"#,
            r#""p";q="10";w=10"#,
            r#""p";q=?1;w=10"#,
            r#""p";w=10"#,
            r#""p";q=10;qu="bogus-units";w=10"#,
            r#""p";q=10;qu=requests;w=10"#, // a Token, not a String
            r#"("p" "q");q=10;w=10"#,
            // A window beyond MAX_DURATION.
            r#""p";q=10;w=4294967296"#,
            // Not Structured Fields at all.
            r#""p";q=10;w=10;"#,
            r#""p";Q=10;W=10"#,
            "q=10, w=10",
            "\"unterminated",
        ] {
            assert_eq!(policy(bad), None, "{bad}");
        }
        // A bad item next to a good one: the good one counts.
        assert_eq!(policy(r#""bad";q=0;w=1, "good";q=5;w=1"#), per(5, 1));
        // The largest window still accepted.
        assert_eq!(policy(r#""p";q=10;w=4294967295"#), per(10, 4_294_967_295));
        // Quotas as large as an Integer may be.
        assert_eq!(
            policy(r#""p";q=999999999999999;w=1"#),
            per(999_999_999_999_999, 1)
        );

        let limit = |value| parse_at(&[("ratelimit", value)], 0);
        assert_eq!(limit(r#""p";r=-1;t=5"#), published(None, None, Some(s(5))));
        assert_eq!(limit(r#""p";r=1;t=-5"#), published(None, Some(1), None));
        assert_eq!(limit(r#""p";r=1.0;t=5.0"#), published(None, None, None));
        // Too many digits for an RFC 9651 Integer: the field does not parse.
        assert_eq!(limit(r#""p";r=9999999999999999"#), Published::default());
        assert_eq!(
            limit("limit=10, remaining=-1, reset=x"),
            Published::default()
        );
    }

    #[test]
    fn hostile_sizes() {
        // Durations saturate.
        let huge = "9".repeat(400);
        for name in [
            "ratelimit-reset",
            "x-ratelimit-reset",
            "x-ratelimit-reset-after",
        ] {
            let got = parse_at(&[(name, huge.as_str())], 0);
            assert_eq!(got.reset, Some(MAX_DURATION), "{name}");
        }
        let got = parse_at(&[("x-ratelimit-reset-after", "4294967296")], 0);
        assert_eq!(got.reset, Some(MAX_DURATION));
        let got = parse_at(&[("ratelimit", r#""p";r=1;t=999999999999999"#)], 0);
        assert_eq!(got.reset, Some(MAX_DURATION));
        // A timestamp in the far future too.
        let got = parse_at(&[("x-ratelimit-reset", "999999999999")], 0);
        assert_eq!(got.reset, Some(MAX_DURATION));
        // Counts that overflow are malformed.
        let got = parse_at(&[("x-ratelimit-remaining", "18446744073709551616")], 0);
        assert_eq!(got.remaining, None);
        let got = parse_at(&[("x-ratelimit-remaining", "18446744073709551615")], 0);
        assert_eq!(got.remaining, Some(u64::MAX));
        assert_eq!(
            parse_at(&[("x-ratelimit-limit-second", "18446744073709551616")], 0).policy,
            None
        );

        // A field up to MAX_FIELD_LEN bytes is read; a longer one is not.
        let item = r#""p";q=10;w=1"#;
        let list_of = |n: usize| vec![item; n].join(", ");
        let fits = list_of(MAX_FIELD_LEN / (item.len() + 2));
        assert!(fits.len() <= MAX_FIELD_LEN);
        assert_eq!(
            parse_at(&[("ratelimit-policy", fits.as_str())], 0).policy,
            per(10, 1)
        );
        let long = list_of(MAX_FIELD_LEN / (item.len() + 2) + 1);
        assert!(long.len() > MAX_FIELD_LEN);
        assert_eq!(
            parse_at(&[("ratelimit-policy", long.as_str())], 0).policy,
            None
        );
        let padded = format!("{}5", "0".repeat(MAX_FIELD_LEN - 1));
        assert_eq!(
            parse_at(&[("x-ratelimit-remaining", padded.as_str())], 0).remaining,
            Some(5)
        );
        // Many lines count their separators too.
        let mut map = HeaderMap::new();
        for _ in 0..MAX_FIELD_LEN {
            map.append(X_RATELIMIT_REMAINING, HeaderValue::from_static("1"));
        }
        assert_eq!(parse(&map, at(0)).remaining, None);
    }

    #[test]
    fn names_are_case_insensitive() {
        let map = headers(&[
            ("RateLimit-Policy", br#""default";q=100;w=10"#),
            ("X-RateLimit-Remaining", b"3"),
            ("X-RATELIMIT-RESET-AFTER", b"0.5"),
        ]);
        assert_eq!(
            parse(&map, at(0)),
            published(per(100, 10), Some(3), Some(Duration::from_millis(500)))
        );
    }

    #[test]
    fn exhausted_and_empty() {
        assert!(!Published::default().exhausted());
        assert!(Published::default().is_empty());
        let one = published(None, Some(1), None);
        assert!(!one.exhausted());
        assert!(!one.is_empty());
        assert!(published(None, Some(0), None).exhausted());
        assert!(!published(None, None, Some(s(1))).is_empty());
        assert!(!published(per(1, 1), None, None).is_empty());
    }

    #[test]
    fn most_restrictive_is_the_slowest_rate() {
        let p = |q, w| per(q, w).unwrap();
        assert_eq!(most_restrictive(p(10, 1), p(100, 60)), p(100, 60));
        assert_eq!(most_restrictive(p(100, 60), p(10, 1)), p(100, 60));
        // Equal rates: the shorter window, either way round.
        assert_eq!(most_restrictive(p(600, 60), p(10, 1)), p(10, 1));
        assert_eq!(most_restrictive(p(10, 1), p(600, 60)), p(10, 1));
        // Extremes do not overflow.
        let max = MAX_DURATION.as_secs();
        assert_eq!(
            most_restrictive(p(u64::MAX, 1), p(u64::MAX, max)),
            p(u64::MAX, max)
        );
        assert_eq!(most_restrictive(p(1, max), p(u64::MAX, max)), p(1, max));
    }

    /// The names `parse` reads, and two it does not.
    fn names() -> Vec<HeaderName> {
        let others = ["retry-after", "x-ratelimit-bucket"].map(HeaderName::from_static);
        HEADERS.into_iter().chain(others).collect()
    }

    fn check_invariants(got: &Published) -> Result<(), TestCaseError> {
        if let Some(reset) = got.reset {
            prop_assert!(reset <= MAX_DURATION);
        }
        if let Some(policy) = got.policy {
            prop_assert!(policy.quota > 0);
            prop_assert!(!policy.window.is_zero() && policy.window <= MAX_DURATION);
        }
        Ok(())
    }

    /// Values in the shape of real ones, to reach past the parsers' first byte.
    fn plausible_value() -> impl Strategy<Value = String> {
        let number = prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            (0u64..2_000_000_000_000).prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            (any::<u32>(), any::<u16>()).prop_map(|(a, b)| format!("{a}.{b}")),
            "[0-9.eE+-]{0,24}",
        ]
        .boxed();
        let param = (
            prop::sample::select(vec!["q", "w", "r", "t", "qu", "pk", "x"]),
            number.clone(),
        )
            .prop_map(|(key, value)| format!(";{key}={value}"));
        let item = (
            prop::sample::select(vec!["\"p\"", "\"q\"", "tok", "10", "(\"a\" b)", ""]),
            prop::collection::vec(param, 0..5),
        )
            .prop_map(|(id, params)| format!("{id}{}", params.concat()));
        prop_oneof![
            number,
            prop::collection::vec(item, 0..6).prop_map(|items| items.join(", ")),
            "[ -~]{0,48}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]

        #[test]
        fn arbitrary_bytes_never_panic(
            values in prop::collection::vec(
                (0..names().len(), prop::collection::vec(any::<u8>(), 0..64)),
                0..6,
            ),
            now in any::<u64>(),
        ) {
            let (names, mut map) = (names(), HeaderMap::new());
            for (name, bytes) in &values {
                if let Ok(value) = HeaderValue::from_bytes(bytes) {
                    map.append(names[*name].clone(), value);
                }
            }
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now >> 24);
            check_invariants(&parse(&map, now))?;
        }

        #[test]
        fn plausible_values_never_panic(
            values in prop::collection::vec((0..names().len(), plausible_value()), 0..6),
            now in any::<u64>(),
        ) {
            let (names, mut map) = (names(), HeaderMap::new());
            for (name, text) in &values {
                if let Ok(value) = HeaderValue::from_str(text) {
                    map.append(names[*name].clone(), value);
                }
            }
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now >> 24);
            check_invariants(&parse(&map, now))?;
        }

        #[test]
        fn any_count_round_trips(n in any::<u64>()) {
            let got = parse_at(&[("x-ratelimit-remaining", n.to_string().as_str())], 0);
            prop_assert_eq!(got.remaining, Some(n));
        }

        #[test]
        fn any_delta_below_a_timestamp_round_trips(secs in 0u64..1_000_000_000, millis in 0u32..1000) {
            let value = format!("{secs}.{millis:03}");
            let got = parse_at(&[("x-ratelimit-reset", value.as_str())], 1_700_000_000);
            let want = Duration::from_secs(secs) + Duration::from_millis(u64::from(millis));
            prop_assert_eq!(got.reset, Some(want));
        }

        #[test]
        fn any_policy_round_trips(quota in 1u64..1_000_000_000_000_000, window in 1u64..=u64::from(u32::MAX)) {
            let value = format!("\"p\";q={quota};w={window}");
            let got = parse_at(&[("ratelimit-policy", value.as_str())], 0);
            prop_assert_eq!(got.policy, per(quota, window));
        }
    }
}
