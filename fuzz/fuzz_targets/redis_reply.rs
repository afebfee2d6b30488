//! The Redis store's codec: the claim script's reply (a verdict, then the record's
//! fields as `HGETALL` gives them), read from the wire as RESP.
//!
//! Checks: no panic on any reply (`redis::parse_redis_value`, then the store's decoder);
//! a decoded record belongs to the storage key asked for, has a valid key, and its
//! fingerprint and claim id have their sizes (by construction).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oncely::{ClaimOutcome, StorageKey};

fuzz_target!(|data: &[u8]| {
    let Ok(reply) = redis::parse_redis_value(data) else { return };
    let key = StorageKey::derive_raw("scope", "key");
    let record = match oncely_redis::fuzz_claim_outcome(&key, reply) {
        Ok(ClaimOutcome::Completed(record) | ClaimOutcome::InProgress(record) | ClaimOutcome::Mismatch(record)) => {
            record
        }
        Ok(_) | Err(_) => return,
    };
    assert_eq!(record.storage_key, key);
    assert!(oncely::IdempotencyKey::new(record.key.as_str()).is_ok(), "an invalid key decoded: {:?}", record.key);
});
