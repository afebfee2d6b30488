//! `StoredResponse::decode` (oncely-http): the stored form of a response, read back from
//! a store for every replay. A store's bytes may be damaged or written by another version.
//!
//! Checks: no panic on any bytes; a response that decodes encodes to bytes that decode to
//! the same response (status, every header value in order, body or its absence).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(round_trips) = oncely_http::fuzz_stored_response(bytes::Bytes::copy_from_slice(data)) {
        assert!(round_trips, "a decoded response does not survive encode and decode");
    }
});
