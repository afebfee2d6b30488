//! `oncely_http::parse_key_header`: the `Idempotency-Key` field of every request.
//!
//! Input: header values separated by `\n` (each field a value of its own). Checks: no
//! panic; two or more fields are `Multiple`; an accepted key is 1 to 255 visible ASCII
//! characters; the key written back as an sf-string (`"…"`, with `\"` and `\\`) and, when
//! it can be, as a bare token, with surrounding spaces, reads as the same key.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use oncely_http::{KeyHeaderError, parse_key_header};

fn parse(values: &[&[u8]]) -> Option<Result<Option<oncely::IdempotencyKey>, KeyHeaderError>> {
    let name = HeaderName::from_static("idempotency-key");
    let mut headers = HeaderMap::new();
    for value in values {
        // Bytes hyper would not accept as a field value never reach the parser.
        headers.append(&name, HeaderValue::from_bytes(value).ok()?);
    }
    Some(parse_key_header(&headers, &name))
}

fuzz_target!(|data: &[u8]| {
    let values: Vec<&[u8]> = data.split(|b| *b == b'\n').take(4).collect();
    let Some(result) = parse(&values) else { return };
    if values.len() > 1 {
        assert_eq!(result, Err(KeyHeaderError::Multiple), "{} fields", values.len());
        return;
    }
    let Ok(Some(key)) = result else { return };
    let text = key.as_str();
    assert!((1..=255).contains(&text.len()), "a key of {} bytes", text.len());
    assert!(text.bytes().all(|b| (0x21..=0x7e).contains(&b)), "a key with a byte outside visible ASCII: {text:?}");

    let quoted = format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""));
    assert_eq!(parse(&[quoted.as_bytes()]), Some(Ok(Some(key.clone()))), "as the sf-string {quoted}");
    if !text.starts_with('"') && !text.contains(',') {
        let bare = format!("  {text}\t");
        assert_eq!(parse(&[bare.as_bytes()]), Some(Ok(Some(key.clone()))), "as the bare token {bare:?}");
    }
});
