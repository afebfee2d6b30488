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
use std::ops::Range;

/// One value of the document.
enum Node {
    /// A number, `true`, `false` or `null`: its text, written as it is.
    Literal(Range<usize>),
    /// A string: its decoded text.
    String(Box<str>),
    /// A string whose text needs no decoding (no escape): the bytes between its quotes.
    PlainString(Range<usize>),
    /// An array: its items, a range of `Arena::children`.
    Array(Range<usize>),
    /// An object: its members as (key node, value node) pairs, a range of
    /// `Arena::children` holding key and value alternately.
    Object(Range<usize>),
}

struct Arena<'a> {
    text: &'a [u8],
    nodes: Vec<Node>,
    children: Vec<usize>,
}

impl Arena<'_> {
    /// A string node's decoded text as bytes (the sort key of object members).
    fn string_bytes(&self, id: usize) -> &[u8] {
        match &self.nodes[id] {
            Node::String(s) => s.as_bytes(),
            Node::PlainString(range) => &self.text[range.clone()],
            _ => b"",
        }
    }
}

/// Writes the canonical form of `text` to `out`: object members sorted by the UTF-8 bytes
/// of their keys, no insignificant whitespace, strings re-escaped minimally (as
/// serde_json writes them), numbers and literals exactly as written.
///
/// `Ok(false)` when an object has the same key twice (the caller hashes the raw bytes
/// instead: parsers disagree on which member wins).
///
/// # Errors
/// serde_json's error when `text` is not one valid JSON document (including invalid
/// UTF-8 and lone surrogate escapes).
pub(super) fn write_canonical(text: &[u8], out: &mut Vec<u8>) -> Result<bool, serde_json::Error> {
    serde_json::from_slice::<serde::de::IgnoredAny>(text)?;
    // serde_json skips the strings it ignores without checking their UTF-8; strings
    // without escapes are copied as they are below, so check the whole text once here.
    if let Err(e) = std::str::from_utf8(text) {
        return Err(serde::de::Error::custom(format_args!("invalid UTF-8 in a JSON document: {e}")));
    }
    let arena = parse(text)?;
    Ok(write(&arena, out))
}

fn parse(text: &[u8]) -> Result<Arena<'_>, serde_json::Error> {
    struct Open {
        object: bool,
        items: Vec<usize>,
    }
    let mut arena = Arena { text, nodes: Vec::new(), children: Vec::new() };
    let mut open: Vec<Open> = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let completed = match text[i] {
            b' ' | b'\t' | b'\n' | b'\r' | b',' | b':' => {
                i += 1;
                continue;
            }
            b'[' | b'{' => {
                open.push(Open { object: text[i] == b'{', items: Vec::new() });
                i += 1;
                continue;
            }
            b']' | b'}' => {
                i += 1;
                let Some(frame) = open.pop() else { break };
                let start = arena.children.len();
                arena.children.extend_from_slice(&frame.items);
                let range = start..arena.children.len();
                if frame.object { Node::Object(range) } else { Node::Array(range) }
            }
            b'"' => {
                let end = string_end(text, i);
                let inner = i + 1..end - 1;
                let token = &text[i..end];
                i = end;
                if token.contains(&b'\\') {
                    let decoded: Cow<'_, str> = serde_json::from_slice(token)?;
                    Node::String(decoded.into_owned().into_boxed_str())
                } else {
                    Node::PlainString(inner)
                }
            }
            _ => {
                let start = i;
                while i < text.len() && !matches!(text[i], b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r') {
                    i += 1;
                }
                Node::Literal(start..i)
            }
        };
        let id = arena.nodes.len();
        arena.nodes.push(completed);
        match open.last_mut() {
            Some(frame) => frame.items.push(id),
            None => break,
        }
    }
    Ok(arena)
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

/// Writes the arena's root (the last node created) canonically; false on a duplicate key.
fn write(arena: &Arena<'_>, out: &mut Vec<u8>) -> bool {
    /// A container being written: the child nodes in output order, and how many are done.
    struct Writing {
        object: bool,
        order: Vec<usize>,
        next: usize,
    }
    let Some(root) = arena.nodes.len().checked_sub(1) else { return true };
    let mut stack: Vec<Writing> = Vec::new();
    let mut pending = Some(root);
    loop {
        if let Some(id) = pending.take() {
            match &arena.nodes[id] {
                Node::Literal(range) => out.extend_from_slice(&arena.text[range.clone()]),
                Node::PlainString(range) => {
                    out.push(b'"');
                    out.extend_from_slice(&arena.text[range.clone()]);
                    out.push(b'"');
                }
                Node::String(s) => {
                    // Writing a `str` into a `Vec` cannot fail.
                    let _ = serde_json::to_writer(&mut *out, s);
                }
                Node::Array(range) => {
                    out.push(b'[');
                    stack.push(Writing { object: false, order: arena.children[range.clone()].to_vec(), next: 0 });
                }
                Node::Object(range) => {
                    let mut members: Vec<(usize, usize)> =
                        arena.children[range.clone()].chunks_exact(2).map(|kv| (kv[0], kv[1])).collect();
                    members.sort_unstable_by(|a, b| arena.string_bytes(a.0).cmp(arena.string_bytes(b.0)));
                    if members.windows(2).any(|w| arena.string_bytes(w[0].0) == arena.string_bytes(w[1].0)) {
                        return false;
                    }
                    out.push(b'{');
                    let order = members.into_iter().flat_map(|(k, v)| [k, v]).collect();
                    stack.push(Writing { object: true, order, next: 0 });
                }
            }
        }
        let Some(top) = stack.last_mut() else { return true };
        if top.next == top.order.len() {
            out.push(if top.object { b'}' } else { b']' });
            stack.pop();
            continue;
        }
        if top.next > 0 {
            // In an object, odd positions are values (after a key): a colon; else a comma.
            out.push(if top.object && top.next % 2 == 1 { b':' } else { b',' });
        }
        pending = Some(top.order[top.next]);
        top.next += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(text: &str) -> String {
        let mut out = Vec::new();
        assert!(write_canonical(text.as_bytes(), &mut out).expect("valid JSON"), "no duplicate keys in {text}");
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
    fn deep_nesting_costs_heap_not_stack() {
        let depth = 200_000;
        let doc = format!("{}{}", "[{\"a\":".repeat(depth), "}]".repeat(depth)).replace(":}", ":1}");
        // A thread with a quarter of a Tokio worker's stack: any recursion per level
        // would overflow it within a few thousand levels.
        let handle = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(move || {
                let mut out = Vec::new();
                write_canonical(doc.as_bytes(), &mut out).map(|unique| (unique, out.len()))
            })
            .expect("thread starts");
        let (unique, len) = handle.join().expect("no stack overflow").expect("valid JSON");
        assert!(unique);
        assert_eq!(len, depth * "[{\"a\":}]".len() + 1);
    }
}
