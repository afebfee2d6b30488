//! The PostgreSQL store's codec, the parts that run without a server: the table name
//! (the only text spliced into SQL), stored times, and durations as bound parameters.
//! (`read_record` itself takes an sqlx `PgRow`, which only sqlx can build.)
//!
//! Input: 8 bytes of microseconds, 8 of seconds, 4 of nanoseconds, then the table name.
//! Checks: no panic; an accepted table name is `[a-z_][a-z0-9_]*`, at most 50 bytes, the
//! input folded to lower case; a time decodes exactly when it is not negative; a duration
//! becomes whole microseconds rounded up, exactly below 2^53 µs.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 20 {
        return;
    }
    let (head, name) = data.split_at(20);
    let us = i64::from_le_bytes(head[0..8].try_into().expect("8 bytes"));
    let secs = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    let nanos = u32::from_le_bytes(head[16..20].try_into().expect("4 bytes")) % 1_000_000_000;
    let Ok(name) = std::str::from_utf8(name) else { return };
    let duration = Duration::new(secs, nanos);

    let (table, time, micros) = oncely_postgres::fuzz_parts(name, us, duration);
    if let Some(table) = table {
        assert!(table.len() <= 50 && !table.is_empty(), "table name {table:?}");
        assert!(table.starts_with(|c: char| c.is_ascii_lowercase() || c == '_'), "table name {table:?}");
        assert!(table.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{table:?}");
        assert_eq!(table, name.to_ascii_lowercase());
    }
    assert_eq!(time.is_some(), us >= 0, "time {us}");
    if let Some(time) = time {
        assert_eq!(time.duration_since(UNIX_EPOCH).ok().map(|d| d.as_micros()), Some(us as u128));
    }
    if let Some(micros) = micros {
        let exact = duration.as_nanos().div_ceil(1_000);
        if exact < 1 << 53 {
            assert_eq!(micros, exact as f64, "{duration:?}");
        }
    }
});
