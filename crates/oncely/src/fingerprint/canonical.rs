//! Canonical JSON without recursion: the form [`Fingerprint::from_json`] hashes.
//!
//! Request bodies are client input, so nothing here may grow the call stack with the
//! document's nesting, and nothing may take more than linear time in its size (plus the
//! sort of each object's members). A document nested 500,000 deep costs a heap-allocated
//! frame per level, never a stack frame: the recursive version this replaced overflowed a
//! Tokio worker's 2 MiB stack at about 9,300 levels and took the whole process down.
//!
//! Two passes over a document already known to be valid JSON:
//!
//! 1. [`parse`] reads it once, left to right, into a flat arena of [`Node`]s, keeping an
//!    explicit stack of the containers still open. Each node's children are appended to
//!    one shared vector when its container closes, so every child index is copied once.
//! 2. [`write`] walks the arena with an explicit stack, writing objects' members sorted
//!    by their decoded keys.
//!
//! Validation is serde_json's (`IgnoredAny`, whose parser is iterative too), so the
//! grammar accepted is exactly serde_json's; this module only has to find token ends.
//!
//! [`Fingerprint::from_json`]: super::Fingerprint::from_json

use std::borrow::Cow;

/// Nesting deeper than this is not canonicalised: the document is hashed as it came
/// (see [`Canonical::TooDeep`]). No request body of a real API nests this deep, and the
/// bound keeps the memory a hostile document costs proportional to its size with a small
/// factor. Before this module, such documents crashed the process, so no stored
/// fingerprint depends on canonicalising them.
pub(super) const MAX_DEPTH: usize = 10_000;

/// What [`write_canonical`] made of a valid document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Canonical {
    /// The canonical form was written.
    Written,
    /// An object has the same key twice; parsers disagree on which member wins.
    DuplicateKeys,
    /// Nested deeper than [`MAX_DEPTH`] (or longer than 4 GiB).
    TooDeep,
}

/// One value of the document, 12 bytes: offsets into the text, `Arena::children` or
/// `Arena::strings`, as `u32`.
#[derive(Clone, Copy)]
enum Node {
    /// A number, `true`, `false` or `null`: its text, written as it is.
    Literal { start: u32, end: u32 },
    /// A string whose text needs no decoding (no escape): the bytes between its quotes.
    PlainString { start: u32, end: u32 },
    /// A string with escapes: its decoded text, at this index of `Arena::strings`.
    String { index: u32 },
    /// An array: its items, a range of `Arena::children`.
    Array { start: u32, end: u32 },
    /// An object: its members as key and value node ids in turn, a range of
    /// `Arena::children`.
    Object { start: u32, end: u32 },
}

struct Arena<'a> {
    text: &'a [u8],
    nodes: Vec<Node>,
    children: Vec<u32>,
    strings: Vec<Box<str>>,
}

impl Arena<'_> {
    /// A string node's decoded text as bytes (the sort key of object members).
    fn string_bytes(&self, id: u32) -> &[u8] {
        match self.nodes[id as usize] {
            Node::String { index } => self.strings[index as usize].as_bytes(),
            Node::PlainString { start, end } => &self.text[start as usize..end as usize],
            _ => b"",
        }
    }
}

/// Writes the canonical form of `text` to `out`: object members sorted by the UTF-8 bytes
/// of their keys, no insignificant whitespace, strings re-escaped minimally (as
/// serde_json writes them), numbers and literals exactly as written. What is written is
/// only meaningful with [`Canonical::Written`]; otherwise the caller hashes the raw bytes.
///
/// # Errors
/// serde_json's error when `text` is not one valid JSON document (including invalid
/// UTF-8 and lone surrogate escapes).
pub(super) fn write_canonical(text: &[u8], out: &mut Vec<u8>) -> Result<Canonical, serde_json::Error> {
    serde_json::from_slice::<serde::de::IgnoredAny>(text)?;
    // serde_json skips the strings it ignores without checking their UTF-8; strings
    // without escapes are copied as they are below, so check the whole text once here.
    if let Err(e) = std::str::from_utf8(text) {
        return Err(serde::de::Error::custom(format_args!("invalid UTF-8 in a JSON document: {e}")));
    }
    if u32::try_from(text.len()).is_err() {
        return Ok(Canonical::TooDeep);
    }
    match parse(text)? {
        Some(arena) => Ok(write(&arena, out)),
        None => Ok(Canonical::TooDeep),
    }
}

/// Reads the document into an arena; `None` past [`MAX_DEPTH`]. `text` is valid JSON of
/// at most `u32::MAX` bytes.
fn parse(text: &[u8]) -> Result<Option<Arena<'_>>, serde_json::Error> {
    let mut arena = Arena { text, nodes: Vec::new(), children: Vec::new(), strings: Vec::new() };
    // The values completed inside the containers still open, innermost last, and for each
    // open container whether it is an object and where its values start in `pending`.
    let mut pending: Vec<u32> = Vec::new();
    let mut open: Vec<(bool, usize)> = Vec::new();
    let offset = |i: usize| i as u32;
    let mut i = 0;
    while i < text.len() {
        let completed = match text[i] {
            b' ' | b'\t' | b'\n' | b'\r' | b',' | b':' => {
                i += 1;
                continue;
            }
            b'[' | b'{' => {
                if open.len() == MAX_DEPTH {
                    return Ok(None);
                }
                open.push((text[i] == b'{', pending.len()));
                i += 1;
                continue;
            }
            b']' | b'}' => {
                i += 1;
                let Some((object, first)) = open.pop() else { break };
                let start = offset(arena.children.len());
                arena.children.extend(pending.drain(first..));
                let end = offset(arena.children.len());
                if object { Node::Object { start, end } } else { Node::Array { start, end } }
            }
            b'"' => {
                let end = string_end(text, i);
                let token = &text[i..end];
                let node = if token.contains(&b'\\') {
                    let decoded: Cow<'_, str> = serde_json::from_slice(token)?;
                    arena.strings.push(decoded.into_owned().into_boxed_str());
                    Node::String { index: offset(arena.strings.len() - 1) }
                } else {
                    Node::PlainString { start: offset(i + 1), end: offset(end - 1) }
                };
                i = end;
                node
            }
            _ => {
                let start = i;
                while i < text.len() && !matches!(text[i], b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r') {
                    i += 1;
                }
                Node::Literal { start: offset(start), end: offset(i) }
            }
        };
        let id = offset(arena.nodes.len());
        arena.nodes.push(completed);
        if open.is_empty() {
            break;
        }
        pending.push(id);
    }
    Ok(Some(arena))
}

/// The index just past the closing quote of the string opening at `start`. The document
/// is valid, so every string closes; the end of `text` bounds the scan regardless.
fn string_end(text: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < text.len() {
        match text[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    text.len()
}

/// Writes the arena's root (the last node created) canonically.
fn write(arena: &Arena<'_>, out: &mut Vec<u8>) -> Canonical {
    /// A container being written.
    enum Writing {
        /// Items `start..end` of `Arena::children`, `next` the one to write.
        Array { start: u32, next: u32, end: u32 },
        /// Members as (key, value) in output order, `next` counting keys and values.
        Object { members: Vec<(u32, u32)>, next: usize },
    }
    let Some(root) = arena.nodes.len().checked_sub(1) else { return Canonical::Written };
    let mut stack: Vec<Writing> = Vec::new();
    let mut pending = Some(root as u32);
    loop {
        if let Some(id) = pending.take() {
            match arena.nodes[id as usize] {
                Node::Literal { start, end } => out.extend_from_slice(&arena.text[start as usize..end as usize]),
                Node::PlainString { start, end } => {
                    out.push(b'"');
                    out.extend_from_slice(&arena.text[start as usize..end as usize]);
                    out.push(b'"');
                }
                Node::String { index } => {
                    // Writing a `str` into a `Vec` cannot fail.
                    let _ = serde_json::to_writer(&mut *out, &arena.strings[index as usize]);
                }
                Node::Array { start, end } => {
                    out.push(b'[');
                    stack.push(Writing::Array { start, next: start, end });
                }
                Node::Object { start, end } => {
                    let mut members: Vec<(u32, u32)> =
                        arena.children[start as usize..end as usize].chunks_exact(2).map(|kv| (kv[0], kv[1])).collect();
                    members.sort_unstable_by(|a, b| arena.string_bytes(a.0).cmp(arena.string_bytes(b.0)));
                    if members.windows(2).any(|w| arena.string_bytes(w[0].0) == arena.string_bytes(w[1].0)) {
                        return Canonical::DuplicateKeys;
                    }
                    out.push(b'{');
                    stack.push(Writing::Object { members, next: 0 });
                }
            }
        }
        match stack.last_mut() {
            None => return Canonical::Written,
            Some(Writing::Array { start, next, end }) => {
                if next == end {
                    out.push(b']');
                    stack.pop();
                    continue;
                }
                if next > start {
                    out.push(b',');
                }
                pending = Some(arena.children[*next as usize]);
                *next += 1;
            }
            Some(Writing::Object { members, next }) => {
                if *next == members.len() * 2 {
                    out.push(b'}');
                    stack.pop();
                    continue;
                }
                let (key, value) = members[*next / 2];
                if *next % 2 == 0 {
                    if *next > 0 {
                        out.push(b',');
                    }
                    pending = Some(key);
                } else {
                    out.push(b':');
                    pending = Some(value);
                }
                *next += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(text: &str) -> String {
        let mut out = Vec::new();
        assert_eq!(write_canonical(text.as_bytes(), &mut out).expect("valid JSON"), Canonical::Written, "{text}");
        String::from_utf8(out).expect("canonical JSON is UTF-8")
    }

    #[test]
    fn writes_sorted_compact_minimally_escaped_json() {
        assert_eq!(canonical(r#" { "b" : [ 1 , {"y":2, "x":1} , [ ] , { } ], "a" : null } "#), {
            r#"{"a":null,"b":[1,{"x":1,"y":2},[],{}]}"#
        });
        assert_eq!(canonical(r#""\u00e9\n\"\/""#), "\"é\\n\\\"/\"");
        assert_eq!(canonical("-1.50e+3"), "-1.50e+3");
        assert_eq!(canonical("[true,false,null]"), "[true,false,null]");
        assert_eq!(canonical(r#"{"é":1,"e":2,"\u0065\u0301":3}"#), "{\"e\":2,\"e\u{301}\":3,\"é\":1}");
    }

    #[test]
    fn matches_serde_json_compact_sorted_output() {
        // With integer numbers, the canonical form is what serde_json writes for its
        // (sorted) `Value`: the form the recursive canonicaliser this replaced wrote, so
        // fingerprints stored by earlier versions still match.
        for doc in [
            r#"{"z":{"b":[1,2,{"d":"\u0000\t","c":"\ud83d\ude00"}],"a":"x\\y"},"y":[[],[[]],{}],"\u00e9":-7}"#,
            r#"[ "a\"b" , "\u2028" , "\u007f", "tab\tcr\r" , 12345678901234567890 ]"#,
            r#"{"k":"v","K":"v","kk":{"":""},"":[true,false,null]}"#,
        ] {
            let value: serde_json::Value = serde_json::from_str(doc).expect("valid JSON");
            let expected = serde_json::to_string(&value).expect("serialises");
            assert!(!expected.contains('\n'));
            assert_eq!(canonical(doc), expected, "{doc}");
        }
    }

    #[test]
    fn agrees_with_serde_json_on_what_is_valid() {
        for bad in ["", "[", "[1,]", "{\"a\"}", "01", "\"\\ud800\"", "[1] 2", "\"\u{1}\""] {
            assert!(write_canonical(bad.as_bytes(), &mut Vec::new()).is_err(), "{bad:?} is not JSON");
        }
        assert!(write_canonical(b"\"\xff\"", &mut Vec::new()).is_err(), "invalid UTF-8 in a string");
    }

    #[test]
    fn deep_nesting_costs_heap_not_stack_and_is_bounded() {
        let nest = |pairs: usize| format!("{}{}", "[{\"a\":".repeat(pairs), "}]".repeat(pairs)).replace(":}", ":1}");
        // A thread with a quarter of a Tokio worker's stack: any recursion per level
        // would overflow it within a few thousand levels.
        let handle = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(move || {
                let mut out = Vec::new();
                let deepest = write_canonical(nest(MAX_DEPTH / 2).as_bytes(), &mut out).map(|c| (c, out.len()));
                let deeper = write_canonical(nest(200_000).as_bytes(), &mut Vec::new());
                (deepest, deeper)
            })
            .expect("thread starts");
        let (deepest, deeper) = handle.join().expect("no stack overflow");
        assert_eq!(deepest.expect("valid JSON"), (Canonical::Written, MAX_DEPTH / 2 * "[{\"a\":}]".len() + 1));
        assert_eq!(deeper.expect("valid JSON"), Canonical::TooDeep);
    }
}
