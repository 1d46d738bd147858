//! Feeds arbitrary header names and values to
//! `tollgate::rate_limit::published::parse`: it must never panic, and a
//! reset it returns is never longer than its cap.
//!
//! ```sh
//! RUSTC_BOOTSTRAP=1 cargo fuzz run published -s none -- -max_total_time=60
//! ```

#![no_main]

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tollgate::rate_limit::published::{self, HEADERS, MAX_DURATION};


fuzz_target!(|data: &[u8]| {
    // The first byte picks the wall clock; then each chunk up to a NUL is
    // one header: its first byte picks one of the names the parser reads
    // (so that most inputs reach it), the rest is the value.
    let Some((&clock, rest)) = data.split_first() else {
        return;
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(clock) << 24);
    let mut headers = HeaderMap::new();
    for chunk in rest.split(|&byte| byte == 0) {
        let Some((&pick, value)) = chunk.split_first() else {
            continue;
        };
        let name = HEADERS[usize::from(pick) % HEADERS.len()].clone();
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(name, value);
        }
    }
    let limit = published::parse(&headers, now);
    if let Some(reset) = limit.reset {
        assert!(reset <= MAX_DURATION);
    }
    if let Some(policy) = limit.policy {
        assert!(policy.quota > 0 && !policy.window.is_zero());
    }
});
