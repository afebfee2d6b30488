//! Properties of the canonical-JSON fingerprint (`Fingerprint::from_json`): the same
//! document written another way has the same fingerprint, a different document another
//! one, and no document, however deep, brings the process down.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use oncely::Fingerprint;
use proptest::prelude::*;

/// A JSON value with numbers kept as text (the fingerprint compares numbers by their
/// exact text) and objects as maps (no duplicate keys: those are hashed as raw bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Json {
    Null,
    Bool(bool),
    Number(String),
    String(String),
    Array(Vec<Json>),
    Object(BTreeMap<String, Json>),
}

/// How a document is written: each choice keeps its meaning.
#[derive(Clone, Debug)]
struct Style {
    /// Whitespace put around every token, cycled.
    whitespace: Vec<&'static str>,
    /// Object members are written rotated by this much (so not sorted).
    rotate: usize,
    /// Non-ASCII characters as `\uXXXX` (surrogate pairs beyond the BMP).
    escape_non_ascii: bool,
    /// Also every n-th character as `\uXXXX` (0: none), and `/` as `\/`.
    escape_every: usize,
    /// Hex digits of escapes in upper case.
    upper_hex: bool,
}

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        "-?(0|[1-9][0-9]{0,25})",
        "-?(0|[1-9][0-9]{0,5})\\.[0-9]{1,12}",
        "-?(0|[1-9][0-9]{0,3})(\\.[0-9]{1,4})?[eE][+-]?[0-9]{1,3}",
    ]
}

fn string() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[a-z\"\\\\/\u{0}-\u{1f}\u{7f}é€😀\u{ffff}\u{10ffff}]{0,12}", Just(String::new()),]
}

fn json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        number().prop_map(Json::Number),
        string().prop_map(Json::String),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
            prop::collection::btree_map(string(), inner, 0..6).prop_map(Json::Object),
        ]
    })
}

fn style() -> impl Strategy<Value = Style> {
    (
        prop::collection::vec(prop::sample::select(vec!["", " ", "\n", "\t", "\r\n", "  \n\t "]), 1..5),
        0usize..8,
        any::<bool>(),
        prop_oneof![Just(0usize), 1usize..5],
        any::<bool>(),
    )
        .prop_map(|(whitespace, rotate, escape_non_ascii, escape_every, upper_hex)| Style {
            whitespace,
            rotate,
            escape_non_ascii,
            escape_every,
            upper_hex,
        })
}

/// The canonical form, as documented: keys sorted by their UTF-8 bytes, no whitespace,
/// strings escaped minimally (as `serde_json` writes them), numbers as written.
fn canonical(value: &Json) -> String {
    match value {
        Json::Null => "null".into(),
        Json::Bool(b) => b.to_string(),
        Json::Number(n) => n.clone(),
        Json::String(s) => serde_json::to_string(s).expect("a string serialises"),
        Json::Array(items) => format!("[{}]", items.iter().map(canonical).collect::<Vec<_>>().join(",")),
        // BTreeMap<String, _> iterates in byte order of the keys.
        Json::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).expect("a key serialises"), canonical(v)))
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

/// `value` written in `style`.
fn write(value: &Json, style: &Style, out: &mut String, counter: &mut usize) {
    let ws = |out: &mut String, counter: &mut usize| {
        *counter += 1;
        out.push_str(style.whitespace[*counter % style.whitespace.len()]);
    };
    ws(out, counter);
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => out.push_str(n),
        Json::String(s) => write_string(s, style, out),
        Json::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(item, style, out, counter);
            }
            ws(out, counter);
            out.push(']');
        }
        Json::Object(map) => {
            out.push('{');
            let mut members: Vec<_> = map.iter().collect();
            if !members.is_empty() {
                let by = style.rotate % members.len();
                members.rotate_left(by);
                if style.rotate % 2 == 1 {
                    members.reverse();
                }
            }
            for (i, (key, item)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                ws(out, counter);
                write_string(key, style, out);
                ws(out, counter);
                out.push(':');
                write(item, style, out, counter);
            }
            ws(out, counter);
            out.push('}');
        }
    }
    ws(out, counter);
}

fn write_string(s: &str, style: &Style, out: &mut String) {
    out.push('"');
    for (i, c) in s.chars().enumerate() {
        let forced = style.escape_every > 0 && i % style.escape_every == 0;
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' if forced => out.push_str("\\/"),
            '\u{8}' if !forced => out.push_str("\\b"),
            '\u{c}' if !forced => out.push_str("\\f"),
            '\n' if !forced => out.push_str("\\n"),
            '\r' if !forced => out.push_str("\\r"),
            '\t' if !forced => out.push_str("\\t"),
            c if (c as u32) < 0x20 || forced || (style.escape_non_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    if style.upper_hex {
                        let _ = write!(out, "\\u{unit:04X}");
                    } else {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn written(value: &Json, style: &Style) -> String {
    let mut out = String::new();
    write(value, style, &mut out, &mut 0);
    out
}

fn fp(text: &str) -> Fingerprint {
    Fingerprint::from_json(text.as_bytes()).unwrap_or_else(|e| panic!("{text:?} is JSON: {e}"))
}

/// `value` with one leaf changed in meaning.
fn changed(value: &Json) -> Json {
    match value {
        Json::Array(items) if !items.is_empty() => {
            let mut items = items.clone();
            items[0] = changed(&items[0]);
            Json::Array(items)
        }
        Json::Object(map) if !map.is_empty() => {
            let mut map = map.clone();
            if let Some(first) = map.values_mut().next() {
                *first = changed(first);
            }
            Json::Object(map)
        }
        Json::Null => Json::Bool(false),
        Json::Bool(b) => Json::Bool(!b),
        Json::Number(n) => Json::String(n.clone()),
        Json::String(s) => Json::String(format!("{s}x")),
        Json::Array(_) => Json::Array(vec![Json::Null]),
        Json::Object(_) => Json::Object(BTreeMap::from([(String::new(), Json::Null)])),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn reserialised_forms_have_the_same_fingerprint(value in json(), a in style(), b in style()) {
        let canonical_text = canonical(&value);
        let (text_a, text_b) = (written(&value, &a), written(&value, &b));
        prop_assert_eq!(fp(&text_a), fp(&canonical_text), "{:?} vs {:?}", text_a, canonical_text);
        prop_assert_eq!(fp(&text_a), fp(&text_b), "{:?} vs {:?}", text_a, text_b);
    }

    #[test]
    fn the_fingerprint_is_the_hash_of_the_documented_canonical_form(value in json(), style in style()) {
        let text = written(&value, &style);
        prop_assert_eq!(fp(&text), Fingerprint::from_bytes(canonical(&value).as_bytes()), "{:?}", text);
    }

    #[test]
    fn distinct_values_have_distinct_fingerprints(a in json(), b in json(), style in style()) {
        let same = canonical(&a) == canonical(&b);
        prop_assert_eq!(fp(&written(&a, &style)) == fp(&written(&b, &style)), same);
        let c = changed(&a);
        prop_assert_ne!(canonical(&a), canonical(&c));
        prop_assert_ne!(fp(&written(&a, &style)), fp(&written(&c, &style)), "{:?} vs {:?}", a, c);
    }

    #[test]
    fn from_serialize_agrees_where_serde_json_keeps_the_numbers(value in json(), style in style()) {
        // serde_json rewrites numbers (`1.50` → `1.5`, `1e2` → `100.0`) and refuses
        // `1e400`: compare only documents whose numbers it writes back as they were.
        prop_assume!(keeps_numbers(&value));
        let text = written(&value, &style);
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        prop_assert_eq!(Fingerprint::from_serialize(&parsed).ok(), Some(fp(&text)));
    }
}

fn keeps_numbers(value: &Json) -> bool {
    match value {
        Json::Number(n) => serde_json::from_str::<serde_json::Number>(n).is_ok_and(|p| p.to_string() == *n),
        Json::Array(items) => items.iter().all(keeps_numbers),
        Json::Object(map) => map.values().all(keeps_numbers),
        _ => true,
    }
}

#[test]
fn escapes_and_literal_characters_are_the_same_string() {
    assert_eq!(fp(r#"{"k":"\u00e9\ud83d\ude00\/"}"#), fp(r#"{"k":"é😀/"}"#));
    assert_eq!(fp(r#""\u00E9""#), fp(r#""\u00e9""#));
    assert_eq!(fp(r#""\u0041\n""#), fp(r#""A\u000a""#));
}

/// The stack of a tokio worker thread, where the gateway and the HTTP layer fingerprint
/// request bodies.
const WORKER_STACK: usize = 2 * 1024 * 1024;

/// A document nested 100,000 deep (a 200 KB request body, well within the gateway's
/// default 1 MiB limit) must give an answer, `Ok` or `Err`, on a worker-sized stack. A
/// stack overflow there aborts the whole process.
#[test]
fn a_document_nested_100_000_deep_returns_on_a_worker_stack() {
    const DEPTH: usize = 100_000;
    let arrays = format!("{}{}", "[".repeat(DEPTH), "]".repeat(DEPTH));
    let objects = format!("{}1{}", r#"{"a":"#.repeat(DEPTH), "}".repeat(DEPTH));
    let mixed = format!("{}0{}", r#"[{"a":"#.repeat(DEPTH / 2), "}]".repeat(DEPTH / 2));
    let unclosed = "[".repeat(DEPTH);
    for (name, document) in [("arrays", arrays), ("objects", objects), ("mixed", mixed), ("unclosed", unclosed)] {
        let answer = std::thread::Builder::new()
            .name(format!("worker-sized-{name}"))
            .stack_size(WORKER_STACK)
            .spawn(move || Fingerprint::from_json(document.as_bytes()).map(|_| ()).map_err(|e| e.to_string()))
            .expect("spawn a worker-sized thread")
            .join();
        assert!(answer.is_ok(), "{name}: the fingerprint panicked instead of answering");
    }
}
