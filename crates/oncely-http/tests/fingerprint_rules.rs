//! What makes two webhook deliveries or queue messages "the same request": media types
//! compared in normal form, JSON members named by pointers left out, and none of it
//! undone by hostile bodies (deep nesting, huge pointer lists, duplicate keys).
//!
//! The rules' HTTP side (`FingerprintRules`, `key_from_json_body`) is tested beside it,
//! in `src/request.rs`.

use http::Request;
use http::request::Parts;
use oncely::Fingerprint;
use oncely::fingerprint::{FindError, JsonPointer, JsonPointerError};
use oncely_http::request_fingerprint;

const LIMIT: usize = 1 << 20;

fn head(content_type: &str) -> Parts {
    Request::post("/hooks").header("content-type", content_type).body(()).expect("test request").into_parts().0
}

fn pointers(texts: &[&str]) -> Vec<JsonPointer> {
    texts.iter().map(|text| text.parse().expect("valid pointer")).collect()
}

#[test]
fn equivalent_media_types_give_one_fingerprint() {
    let body = br#"{"amount":1999,"currency":"eur"}"#;
    let retry = br#"{ "currency" : "eur", "amount" : 1999 }"#;
    let base = request_fingerprint(&head("application/json"), body, LIMIT).expect("no gzip");
    for same in [
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        "application/json;charset=\"utf-8\"",
        " application/json ; ; ",
    ] {
        assert_eq!(request_fingerprint(&head(same), retry, LIMIT), Ok(base), "{same}");
    }
    for other in [
        "application/json; charset=utf-16",
        "application/json; profile=v2",
        "application/merge-patch+json",
        "text/json",
        "text/plain",
    ] {
        assert_ne!(request_fingerprint(&head(other), body, LIMIT), Ok(base), "{other}");
    }
}

#[test]
fn parameters_compare_by_name_and_value_not_by_spelling() {
    let fingerprint = |content_type: &str| request_fingerprint(&head(content_type), b"a,b\n1,2\n", LIMIT);
    let base = fingerprint("text/csv; header=present; charset=utf-8");
    assert_eq!(base, fingerprint("TEXT/CSV;Charset=UTF-8;HEADER=\"present\""));
    assert_eq!(base, fingerprint("text/csv;\tcharset=utf-8 ;header=present"));
    assert_ne!(base, fingerprint("text/csv; header=absent; charset=utf-8"));
    assert_ne!(base, fingerprint("text/csv; header=Present; charset=utf-8"), "values are case-sensitive");
    assert_ne!(base, fingerprint("text/csv; header=present"), "charset counts outside JSON");
    assert_ne!(base, fingerprint("text/csv; header=present; header=present; charset=utf-8"));
}

#[test]
fn a_webhook_retry_that_changed_only_ignored_members_matches() {
    let ignore = pointers(&["/created", "/request/idempotency_key", "/delivery~1attempt", "/data/items/0/sent_at"]);
    let fingerprint = |json: &str| Fingerprint::from_json_ignoring(json.as_bytes(), &ignore).expect("JSON");
    let first = fingerprint(
        r#"{"id":"evt_1","created":1700000000,"request":{"id":"req_1","idempotency_key":"a"},
            "delivery/attempt":1,"data":{"items":[{"sku":"A","sent_at":1},{"sku":"B","sent_at":1}]}}"#,
    );
    let retry = fingerprint(
        r#"{"data":{"items":[{"sent_at":2,"sku":"A"},{"sku":"B","sent_at":1}]},"delivery/attempt":2,
            "request":{"idempotency_key":"b","id":"req_1"},"created":1700000300,"id":"evt_1"}"#,
    );
    assert_eq!(first, retry);
    for changed in [
        r#"{"id":"evt_2","request":{"id":"req_1"},"data":{"items":[{"sku":"A"},{"sku":"B","sent_at":1}]}}"#,
        r#"{"id":"evt_1","request":{"id":"req_2"},"data":{"items":[{"sku":"A"},{"sku":"B","sent_at":1}]}}"#,
        r#"{"id":"evt_1","request":{"id":"req_1"},"data":{"items":[{"sku":"A"},{"sku":"B","sent_at":2}]}}"#,
        r#"{"id":"evt_1","request":{"id":"req_1"},"data":{"items":[{"sku":"B","sent_at":1},{"sku":"A"}]}}"#,
    ] {
        assert_ne!(fingerprint(changed), first, "{changed}");
    }
    // A document with none of the ignored members keeps its fingerprint.
    let plain = r#"{"id":"evt_1","request":{"id":"req_1"},"data":{"items":[{"sku":"A"},{"sku":"B","sent_at":1}]}}"#;
    assert_eq!(fingerprint(plain), Fingerprint::from_json(plain.as_bytes()).expect("JSON"));
    assert_eq!(fingerprint(plain), first);
}

#[test]
fn duplicate_keys_still_fall_back_to_raw_bytes_unless_ignored() {
    let ignore = pointers(&["/sent_at"]);
    let fingerprint = |json: &str| Fingerprint::from_json_ignoring(json.as_bytes(), &ignore).expect("JSON");
    assert_eq!(fingerprint(r#"{"id":1,"sent_at":1,"sent_at":2}"#), fingerprint(r#"{"sent_at":3,"id":1}"#));
    assert_ne!(fingerprint(r#"{"id":1,"id":2,"sent_at":1}"#), fingerprint(r#"{"id":1,"id":2,"sent_at":2}"#));
    assert_ne!(fingerprint(r#"{"id":1,"id":2}"#), fingerprint(r#"{"id":2}"#));
}

#[test]
fn hostile_documents_and_pointer_lists_cost_heap_and_linear_time() {
    let handle = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            // A megabyte of members, 100,000 pointers, half of them naming one.
            let members: Vec<String> = (0..60_000).map(|i| format!(r#""member_{i:06}":"{:>4}""#, i % 10)).collect();
            let wide = format!("{{{}}}", members.join(","));
            assert!(wide.len() > 1 << 20);
            let many: Vec<JsonPointer> =
                (0..100_000).map(|i| JsonPointer::new(format!("/member_{:06}", i * 2))).collect::<Result<_, _>>()?;
            let wide_fp = Fingerprint::from_json_ignoring(wide.as_bytes(), &many).expect("JSON");
            let kept: Vec<&String> = members.iter().skip(1).step_by(2).collect();
            let expected = format!("{{{}}}", kept.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(","));
            assert_eq!(wide_fp, Fingerprint::from_json(expected.as_bytes()).expect("JSON"));

            // Deep nesting, with a pointer to its bottom: no stack frame per level.
            let levels = 4_000;
            let deep = |leaf: &str| format!("{}{leaf}{}", r#"{"a":["#.repeat(levels), "]}".repeat(levels));
            let bottom = "/a/0".repeat(levels);
            let ignore = [JsonPointer::new(format!("{bottom}/t"))?, JsonPointer::new(format!("{bottom}/a/0"))?];
            let a = Fingerprint::from_json_ignoring(deep(r#"{"t":1,"k":1}"#).as_bytes(), &ignore).expect("JSON");
            let b = Fingerprint::from_json_ignoring(deep(r#"{"k":1,"t":2}"#).as_bytes(), &ignore).expect("JSON");
            let c = Fingerprint::from_json_ignoring(deep(r#"{"k":2,"t":1}"#).as_bytes(), &ignore).expect("JSON");
            assert_eq!(a, b);
            assert_ne!(a, c);
            // Far past the depth cap: hashed as raw bytes, never a crash.
            let abyss = format!("{}{}", "[".repeat(500_000), "]".repeat(500_000));
            assert!(Fingerprint::from_json_ignoring(abyss.as_bytes(), &pointers(&["/0/0"])).is_ok());
            Ok::<(), JsonPointerError>(())
        })
        .expect("thread starts");
    handle.join().expect("no stack overflow").expect("valid pointers");
}

#[test]
fn pointers_are_validated_and_found_without_recursion() {
    assert_eq!("sent_at".parse::<JsonPointer>(), Err(JsonPointerError::NoLeadingSlash));
    assert_eq!("/a~".parse::<JsonPointer>(), Err(JsonPointerError::InvalidEscape { position: 2 }));
    assert_eq!("/a~2b".parse::<JsonPointer>(), Err(JsonPointerError::InvalidEscape { position: 2 }));
    let escaped: JsonPointer = "/a~1b/~0".parse().expect("valid");
    assert_eq!(escaped.to_string(), "/a~1b/~0");
    assert_eq!(escaped.find(br#"{"a/b":{"~":"x"}}"#).expect("JSON"), Some(r#""x""#));

    let id: JsonPointer = "/data/object/id".parse().expect("valid");
    let big = format!(r#"{{"pad":[{}],"data":{{"object":{{"id":"ch_1"}}}}}}"#, "[[1]],".repeat(200_000) + "0");
    assert!(big.len() > 1 << 20);
    assert_eq!(id.find(big.as_bytes()).expect("JSON"), Some(r#""ch_1""#));
    assert!(matches!(id.find(&big.as_bytes()[..big.len() - 1]), Err(FindError::NotJson(_))), "truncated");
    assert!(matches!(id.find(br#"{"data":{"object":{"id":1},"object":{}}}"#), Err(FindError::DuplicateMember)));
}
