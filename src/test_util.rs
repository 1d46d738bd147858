//! Helpers shared by the unit tests of the header parsers.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};

/// A header map from `(name, raw value)` pairs, in order.
pub(crate) fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value).unwrap(),
        );
    }
    map
}

/// The wall-clock instant `epoch_secs` seconds after 1970.
pub(crate) fn at(epoch_secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(epoch_secs)
}
