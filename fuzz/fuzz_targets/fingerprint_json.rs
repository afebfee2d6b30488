//! `Fingerprint::from_json`, the canonical-JSON fingerprint of every keyed JSON request.
//!
//! Checks: it never panics and never overflows the stack of a tokio worker thread (2 MiB,
//! where the gateway runs it: an overflow there aborts the whole process); it gives the
//! same answer on this thread; a document written another way (members reordered,
//! whitespace added, characters `\uXXXX`-escaped) has the same fingerprint; a document
//! changed in meaning has another; and `from_serialize` of the parsed value agrees when
//! `serde_json` keeps the numbers' text.
//!
//! Each input is checked as it is and, when it leaves brackets or a string open, closed
//! (`[[[` as `[[[]]]`, see `close_open`): that is what lets the fuzzer reach deep nesting.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oncely::Fingerprint;
use oncely_fuzz::json::{Doc, close_open};

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(closed) = close_open(data) {
        check(&closed);
    }
});

fn check(data: &[u8]) {
    // As the gateway runs it: on a worker-sized stack.
    let owned = data.to_vec();
    let on_worker = oncely_fuzz::on_worker_stack(move || Fingerprint::from_json(&owned).ok());
    // And on this thread: libFuzzer's stack-depth feedback (`__sancov_lowest_stack`, per
    // thread) only sees this one, and it is what steers the search towards deep nesting.
    let here = Fingerprint::from_json(data).ok();
    assert_eq!(on_worker, here, "the same bytes gave two answers");
    let Some(fingerprint) = here else { return };

    let Some(doc) = Doc::parse(data) else { return };
    if doc.has_duplicate_keys() {
        // Hashed as raw bytes by design: only the exact same bytes match.
        return;
    }
    for seed in [0, 1, 3, 4, 10] {
        let mut variant = String::new();
        doc.write_variant(seed, &mut variant);
        let again = Fingerprint::from_json(variant.as_bytes());
        assert_eq!(again.ok(), Some(fingerprint), "re-serialised as {variant:?}");
    }
    let mut changed = String::new();
    doc.changed().write_variant(4, &mut changed);
    assert_ne!(Fingerprint::from_json(changed.as_bytes()).ok(), Some(fingerprint), "changed to {changed:?}");

    if doc.numbers_survive_serde_json() {
        // serde_json's own recursion limit (128) refuses deeper documents: fine, skipped.
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
            assert_eq!(Fingerprint::from_serialize(&value).ok(), Some(fingerprint), "from_serialize disagrees");
        }
    }
}
