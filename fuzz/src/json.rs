//! A JSON document as the fuzz targets re-serialise it: numbers kept as their text (as
//! the fingerprint compares them), strings decoded, object members in document order.

use serde_json::value::RawValue;

/// A parsed JSON document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Doc {
    /// `null`, `true`, `false` or a number, as written.
    Literal(String),
    /// A string, decoded.
    String(String),
    /// An array.
    Array(Vec<Doc>),
    /// An object's members in document order.
    Object(Vec<(String, Doc)>),
}

/// How deep [`Doc::parse`] goes before giving up (it recurses; the targets call it on
/// their own thread, after the fingerprint has survived the document).
pub const MAX_DEPTH: usize = 100;

impl Doc {
    /// Parses `json`; `None` when it is not JSON or nests deeper than [`MAX_DEPTH`].
    pub fn parse(json: &[u8]) -> Option<Doc> {
        let raw: &RawValue = serde_json::from_slice(json).ok()?;
        Self::from_raw(raw, 0)
    }

    fn from_raw(raw: &RawValue, depth: usize) -> Option<Doc> {
        if depth > MAX_DEPTH {
            return None;
        }
        let text = raw.get();
        Some(match text.as_bytes().first()? {
            b'{' => {
                let members: Vec<(String, &RawValue)> = object_members(text)?;
                let mut out = Vec::with_capacity(members.len());
                for (key, value) in members {
                    out.push((key, Self::from_raw(value, depth + 1)?));
                }
                Doc::Object(out)
            }
            b'[' => {
                let items: Vec<&RawValue> = serde_json::from_str(text).ok()?;
                Doc::Array(items.into_iter().map(|item| Self::from_raw(item, depth + 1)).collect::<Option<_>>()?)
            }
            b'"' => Doc::String(serde_json::from_str(text).ok()?),
            _ => Doc::Literal(text.to_owned()),
        })
    }

    /// Whether some object has two members with the same (decoded) key.
    pub fn has_duplicate_keys(&self) -> bool {
        match self {
            Doc::Literal(_) | Doc::String(_) => false,
            Doc::Array(items) => items.iter().any(Doc::has_duplicate_keys),
            Doc::Object(members) => {
                let mut keys: Vec<&str> = members.iter().map(|(k, _)| k.as_str()).collect();
                keys.sort_unstable();
                keys.windows(2).any(|w| w[0] == w[1]) || members.iter().any(|(_, v)| v.has_duplicate_keys())
            }
        }
    }

    /// Whether every number is written the way `serde_json` writes it back (`1`, `1.5`,
    /// not `1.50`, `1e2` or `-0`), so that a `serde_json::Value` keeps its text.
    pub fn numbers_survive_serde_json(&self) -> bool {
        match self {
            Doc::Literal(text) => match text.as_str() {
                "null" | "true" | "false" => true,
                number => serde_json::from_str::<serde_json::Number>(number).is_ok_and(|n| n.to_string() == number),
            },
            Doc::String(_) => true,
            Doc::Array(items) => items.iter().all(Doc::numbers_survive_serde_json),
            Doc::Object(members) => members.iter().all(|(_, v)| v.numbers_survive_serde_json()),
        }
    }

    /// The same document written another way: members in reverse order, whitespace
    /// everywhere it may go, every non-ASCII character (and `/`, and every `seed`-th
    /// ASCII character) as a `\uXXXX` escape.
    pub fn write_variant(&self, seed: usize, out: &mut String) {
        let ws = [" ", "\n", "\t", "\r\n  ", ""][seed % 5];
        out.push_str(ws);
        match self {
            Doc::Literal(text) => out.push_str(text),
            Doc::String(s) => write_escaped(s, seed, out),
            Doc::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(ws);
                        out.push(',');
                    }
                    item.write_variant(seed.wrapping_add(i + 1), out);
                }
                out.push_str(ws);
                out.push(']');
            }
            Doc::Object(members) => {
                out.push('{');
                for (i, (key, value)) in members.iter().rev().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(ws);
                    write_escaped(key, seed.wrapping_add(i), out);
                    out.push_str(ws);
                    out.push(':');
                    value.write_variant(seed.wrapping_add(i + 2), out);
                }
                out.push_str(ws);
                out.push('}');
            }
        }
        out.push_str(ws);
    }

    /// The document with one leaf changed in meaning (the first leaf wrapped in an
    /// array, or an empty container given a member): never the same document.
    pub fn changed(&self) -> Doc {
        match self {
            Doc::Literal(_) | Doc::String(_) => Doc::Array(vec![self.clone()]),
            Doc::Array(items) if items.is_empty() => Doc::Array(vec![Doc::Literal("null".into())]),
            Doc::Object(members) if members.is_empty() => {
                Doc::Object(vec![(String::new(), Doc::Literal("null".into()))])
            }
            Doc::Array(items) => {
                let mut items = items.clone();
                items[0] = items[0].changed();
                Doc::Array(items)
            }
            Doc::Object(members) => {
                let mut members = members.clone();
                members[0].1 = members[0].1.changed();
                Doc::Object(members)
            }
        }
    }
}

/// `json` with what it leaves open closed: an open string, then every open array and
/// object, innermost first (`[{"a":[` becomes `[{"a":[]}]`); `None` when nothing is open.
///
/// Why: a random mutation rarely keeps brackets balanced, so a fuzzer that only gets
/// complete documents almost never nests deeper than a few dozen levels (measured:
/// 69 after 15 minutes). With this, any run of `[` or `{"a":` is a document as deep as
/// it is long, and libFuzzer's stack-depth feedback can grow it by copying parts of it
/// into itself.
pub fn close_open(json: &[u8]) -> Option<Vec<u8>> {
    let mut open = Vec::new();
    let (mut in_string, mut escaped) = (false, false);
    let mut last = 0u8;
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' => open.push(b']'),
            b'{' => open.push(b'}'),
            b']' | b'}' => {
                open.pop();
            }
            _ => {}
        }
        if !b.is_ascii_whitespace() {
            last = b;
        }
    }
    if open.is_empty() && !in_string {
        return None;
    }
    let mut out = json.to_vec();
    if in_string {
        if escaped {
            out.pop();
        }
        out.push(b'"');
        last = b'"';
    }
    if matches!(last, b':' | b',') {
        out.extend_from_slice(b"null");
    }
    out.extend(open.iter().rev());
    Some(out)
}

fn object_members(text: &str) -> Option<Vec<(String, &RawValue)>> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    struct Members;
    impl<'de> Visitor<'de> for Members {
        type Value = Vec<(String, &'de RawValue)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
            let mut out = Vec::new();
            while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                out.push(entry);
            }
            Ok(out)
        }
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    deserializer.deserialize_map(Members).ok()
}

fn write_escaped(s: &str, seed: usize, out: &mut String) {
    use std::fmt::Write;
    out.push('"');
    for (i, c) in s.chars().enumerate() {
        let escape_anyway = seed % 7 == 3 && i % 2 == 0;
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' => out.push_str("\\/"),
            c if (c as u32) < 0x20 || !c.is_ascii() || escape_anyway => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04X}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
