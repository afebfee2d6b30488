//! The Redis store's codec, read from the wire as RESP: the claim script's reply (a
//! verdict, then a replay's payload, completion time, hits and expiry, or a lease end) and the
//! get script's reply (a record's fields as `HGETALL` gives them).
//!
//! Checks: no panic on any reply (`redis::parse_redis_value`, then the store's decoders);
//! a decoded record belongs to the storage key asked for, has a valid key, and its
//! fingerprint and claim id have their sizes (by construction).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oncely::StorageKey;

fuzz_target!(|data: &[u8]| {
    let Ok(reply) = redis::parse_redis_value(data) else { return };
    let key = StorageKey::derive_raw("scope", "key");
    let _ = oncely_redis::fuzz_claim_outcome(&key, reply.clone());
    let Ok(Some(record)) = oncely_redis::fuzz_record(&key, reply) else { return };
    assert_eq!(record.storage_key, key);
    assert!(oncely::IdempotencyKey::new(record.key.as_str()).is_ok(), "an invalid key decoded: {:?}", record.key);
});
