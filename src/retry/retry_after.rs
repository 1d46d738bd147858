//! Reading how long a server asked us to wait.
//!
//! [`parse`] reads three headers:
//!
//! | header | unit | sent by |
//! |---|---|---|
//! | `retry-after-ms` | milliseconds | Azure services |
//! | `x-ms-retry-after-ms` | milliseconds | Azure services (Cosmos DB among them) |
//! | `Retry-After` | delay-seconds or HTTP-date (RFC 9110 §10.2.3) | everyone |
//!
//! The Azure SDKs read all three in this order (e.g. Azure/azure-sdk-for-net#5938).
//!
//! The millisecond headers win when they hold a valid value, because they are
//! more precise; `retry-after-ms` wins over `x-ms-retry-after-ms`. A malformed
//! millisecond header is skipped, so `Retry-After` still counts.
//!
//! # What counts as a value
//!
//! Every case below returns a value or `None` (the policy's own delay is then
//! used); none panics.
//!
//! - **delay-seconds**: ASCII digits, optionally with a fractional part
//!   (`"1.5"`; not in the RFC, but some servers send it and its meaning is
//!   plain). Optional whitespace around it is ignored. A value too large to
//!   represent saturates to `Duration::MAX`: the server asked for "very long",
//!   and the retry layer's `max_retry_after` turns that into "do not wait".
//! - **HTTP-date**: IMF-fixdate, RFC 850 or asctime, via `httpdate`. A date
//!   at or before `now` is `Some(Duration::ZERO)`: retry without waiting for
//!   the server.
//! - **malformed**: a sign (`"-5"`, `"+5"`), an exponent, other text, empty,
//!   or non-ASCII bytes: `None`.
//! - **absurdly long**: a value over 256 bytes is not read at all (`None`);
//!   no legitimate value is longer than about 30.
//! - **several values** (repeated header lines, or one line of
//!   comma-separated delay-seconds as a proxy may fold them): the **largest**
//!   valid value, for each header. Retry-After is a singleton field, so
//!   several values are an error somewhere upstream; waiting the longest any
//!   of them asked for is the choice that cannot earn another 429.

use std::time::{Duration, SystemTime};

use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

/// `retry-after-ms`: milliseconds, sent by Azure services.
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// `x-ms-retry-after-ms`: milliseconds, sent by Azure services such as
/// Cosmos DB.
pub const X_MS_RETRY_AFTER_MS: HeaderName = HeaderName::from_static("x-ms-retry-after-ms");

/// Longest header value read; anything longer is treated as malformed so
/// that a hostile value costs nothing to reject.
const MAX_VALUE_LEN: usize = 256;

/// How long `headers` ask the client to wait, as of the wall-clock time
/// `now` (used only for HTTP-dates).
///
/// Returns `None` when no header holds a usable value. See the
/// [module docs](self) for every case.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use http::HeaderMap;
/// use tollgate::retry_after;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("retry-after", "7".parse().unwrap());
/// assert_eq!(retry_after::parse(&headers, SystemTime::now()), Some(Duration::from_secs(7)));
///
/// headers.insert("retry-after-ms", "6500".parse().unwrap());
/// assert_eq!(retry_after::parse(&headers, SystemTime::now()), Some(Duration::from_millis(6500)));
/// ```
pub fn parse(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    largest(headers, &RETRY_AFTER_MS, |v| parse_number(v, Unit::Millis))
        .or_else(|| {
            largest(headers, &X_MS_RETRY_AFTER_MS, |v| {
                parse_number(v, Unit::Millis)
            })
        })
        .or_else(|| largest(headers, &RETRY_AFTER, |v| parse_retry_after(v, now)))
}

/// The largest valid value among every line of header `name`.
fn largest(
    headers: &HeaderMap,
    name: &HeaderName,
    parse_one: impl Fn(&str) -> Option<Duration>,
) -> Option<Duration> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| text(value))
        .filter_map(|value| {
            // An HTTP-date holds a comma itself, so the whole value goes first.
            parse_one(value).or_else(|| value.split(',').filter_map(&parse_one).max())
        })
        .max()
}

/// The value as trimmed ASCII text, or `None` if it is not, or too long.
fn text(value: &HeaderValue) -> Option<&str> {
    if value.len() > MAX_VALUE_LEN {
        return None;
    }
    value.to_str().ok().map(|s| s.trim_matches([' ', '\t']))
}

fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim_matches([' ', '\t']);
    if value.starts_with(|c: char| c.is_ascii_digit()) && !value.contains(' ') {
        return parse_number(value, Unit::Secs);
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[derive(Clone, Copy)]
enum Unit {
    Secs,
    Millis,
}

/// A non-negative decimal number of `unit`s, saturating at `Duration::MAX`.
fn parse_number(value: &str, unit: Unit) -> Option<Duration> {
    let value = value.trim_matches([' ', '\t']);
    let (whole, fraction) = match value.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (value, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    // Nanoseconds per unit; the fraction is read to nanosecond precision.
    let (per_unit, fraction_digits) = match unit {
        Unit::Secs => (1_000_000_000u128, 9),
        Unit::Millis => (1_000_000u128, 6),
    };
    let whole = whole
        .bytes()
        .try_fold(0u128, |n, b| {
            n.checked_mul(10)?.checked_add(u128::from(b - b'0'))
        })
        .and_then(|n| n.checked_mul(per_unit));
    let Some(whole) = whole else {
        return Some(Duration::MAX);
    };
    let mut fraction_nanos = 0u128;
    let mut scale = per_unit;
    for b in fraction.bytes().take(fraction_digits) {
        scale /= 10;
        fraction_nanos += u128::from(b - b'0') * scale;
    }
    let nanos = whole.saturating_add(fraction_nanos);
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
    if secs == u64::MAX {
        return Some(Duration::MAX);
    }
    Some(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::test_util::{at, headers};

    /// 1994-11-06T08:49:37Z, the RFC's example date.
    const RFC_DATE: u64 = 784_111_777;

    fn parse_at(pairs: &[(&str, &[u8])], now: u64) -> Option<Duration> {
        parse(&headers(pairs), at(now))
    }

    #[test]
    fn delay_seconds() {
        let s = Duration::from_secs;
        assert_eq!(parse_at(&[("retry-after", b"120")], 0), Some(s(120)));
        assert_eq!(parse_at(&[("retry-after", b"0")], 0), Some(s(0)));
        assert_eq!(parse_at(&[("retry-after", b" 7 ")], 0), Some(s(7)));
        assert_eq!(parse_at(&[("retry-after", b"007")], 0), Some(s(7)));
        assert_eq!(
            parse_at(&[("retry-after", b"1.5")], 0),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_at(&[], 0), None);
    }

    #[test]
    fn all_three_http_date_formats() {
        let now = RFC_DATE - 30;
        for date in [
            &b"Sun, 06 Nov 1994 08:49:37 GMT"[..],
            b"Sunday, 06-Nov-94 08:49:37 GMT",
            b"Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(
                parse_at(&[("retry-after", date)], now),
                Some(Duration::from_secs(30)),
                "{}",
                String::from_utf8_lossy(date)
            );
        }
    }

    #[test]
    fn past_dates_mean_now() {
        let date = b"Sun, 06 Nov 1994 08:49:37 GMT";
        assert_eq!(
            parse_at(&[("retry-after", date)], RFC_DATE),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_at(&[("retry-after", date)], RFC_DATE + 999),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn millisecond_headers_win() {
        let ms = Duration::from_millis;
        let both = [("retry-after", &b"3"[..]), ("retry-after-ms", b"2500")];
        assert_eq!(parse_at(&both, 0), Some(ms(2500)));
        let x_ms = [("retry-after", &b"3"[..]), ("x-ms-retry-after-ms", b"250")];
        assert_eq!(parse_at(&x_ms, 0), Some(ms(250)));
        let all = [
            ("retry-after", &b"3"[..]),
            ("x-ms-retry-after-ms", b"250"),
            ("retry-after-ms", b"750"),
        ];
        assert_eq!(parse_at(&all, 0), Some(ms(750)));
        // A broken millisecond header does not hide a good Retry-After.
        let broken = [("retry-after", &b"3"[..]), ("retry-after-ms", b"soon")];
        assert_eq!(parse_at(&broken, 0), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_at(&[("retry-after-ms", b"12.5")], 0),
            Some(Duration::from_micros(12_500))
        );
    }

    #[test]
    fn malformed_values_are_none() {
        for bad in [
            &b"-5"[..],
            b"+5",
            b"",
            b"   ",
            b"5s",
            b"1e3",
            b".5",
            b"1.2.3",
            b"soon",
            b"Sun, 06 Nov 1994 08:49:37 PST",
            b"Sun, 32 Nov 1994 08:49:37 GMT",
            b"\xff\xfe",
            "caf\u{e9}".as_bytes(),
        ] {
            let got = parse_at(&[("retry-after", bad)], 0);
            assert_eq!(got, None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn huge_values_saturate_and_long_values_are_refused() {
        let huge = [(
            "retry-after",
            &b"99999999999999999999999999999999999999999999"[..],
        )];
        assert_eq!(parse_at(&huge, 0), Some(Duration::MAX));
        let max_secs = u64::MAX.to_string();
        assert_eq!(
            parse_at(&[("retry-after", max_secs.as_bytes())], 0),
            Some(Duration::MAX)
        );
        let huge_ms = [("retry-after-ms", &b"99999999999999999999999999999999"[..])];
        assert_eq!(parse_at(&huge_ms, 0), Some(Duration::MAX));
        let long = "9".repeat(MAX_VALUE_LEN + 1);
        assert_eq!(parse_at(&[("retry-after", long.as_bytes())], 0), None);
        let padded = format!("{}5", "0".repeat(MAX_VALUE_LEN - 1));
        assert_eq!(
            parse_at(&[("retry-after", padded.as_bytes())], 0),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn several_values_take_the_largest() {
        let s = Duration::from_secs;
        let lines = [("retry-after", &b"5"[..]), ("retry-after", b"30")];
        assert_eq!(parse_at(&lines, 0), Some(s(30)));
        assert_eq!(parse_at(&[("retry-after", b"5, 30, 2")], 0), Some(s(30)));
        let mixed = [("retry-after", &b"bogus"[..]), ("retry-after", b"4")];
        assert_eq!(parse_at(&mixed, 0), Some(s(4)));
        let date_and_secs = [
            ("retry-after", &b"Sun, 06 Nov 1994 08:49:37 GMT"[..]),
            ("retry-after", b"10"),
        ];
        assert_eq!(parse_at(&date_and_secs, RFC_DATE - 60), Some(s(60)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]

        #[test]
        fn arbitrary_bytes_never_panic(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..4),
            now in any::<u64>(),
        ) {
            let mut map = HeaderMap::new();
            for (i, bytes) in values.iter().enumerate() {
                let name = [RETRY_AFTER, RETRY_AFTER_MS, X_MS_RETRY_AFTER_MS][i % 3].clone();
                if let Ok(value) = HeaderValue::from_bytes(bytes) {
                    map.append(name, value);
                }
            }
            let now = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(now >> 24)).unwrap();
            let _ = parse(&map, now);
        }

        #[test]
        fn any_delay_seconds_round_trips(secs in any::<u64>()) {
            let value = secs.to_string();
            let got = parse_at(&[("retry-after", value.as_bytes())], 0);
            let want = if secs == u64::MAX { Duration::MAX } else { Duration::from_secs(secs) };
            prop_assert_eq!(got, Some(want));
        }

        #[test]
        fn date_strings_in_any_shape_never_panic(s in "[A-Za-z0-9 ,:\\-]{0,40}") {
            let _ = parse_at(&[("retry-after", s.as_bytes())], RFC_DATE);
        }
    }
}
