//! Feeds arbitrary values to `tollgate::retry_after::parse` under each of
//! the names it reads: it must never panic.
//!
//! ```sh
//! RUSTC_BOOTSTRAP=1 cargo fuzz run retry_after -s none -- -max_total_time=60
//! ```

#![no_main]

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 3] = ["retry-after", "retry-after-ms", "x-ms-retry-after-ms"];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, value)) = data.split_first() else {
        return;
    };
    let mut headers = HeaderMap::new();
    let name = HeaderName::from_static(NAMES[usize::from(pick) % NAMES.len()]);
    if let Ok(value) = HeaderValue::from_bytes(value) {
        headers.insert(name, value);
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let _ = tollgate::retry_after::parse(&headers, now);
});
