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
//! 2. [`write()`] walks the arena with an explicit stack, writing objects' members sorted
//!    by their decoded keys, and leaving out the values named by the pointers to ignore
//!    (see [`Ignored`]): each container on a pointer's path costs a lookup per member,
//!    every other container none.
//!
//! Validation is serde_json's (`IgnoredAny`, whose parser is iterative too), so the
//! grammar accepted is exactly serde_json's; this module only has to find token ends.
//!
//! [`Fingerprint::from_json`]: super::Fingerprint::from_json

use std::borrow::Cow;
use std::cell::Cell;

use super::pointer::{Ignored, Trie};

/// Nesting deeper than this is not canonicalised: the document is hashed as it came
/// (see [`Canonical::TooDeep`]). No request body of a real API nests this deep, and the
/// bound keeps the memory a hostile document costs proportional to its size with a small
/// factor. Before this module, such documents crashed the process, so no stored
/// fingerprint depends on canonicalising them.
pub(super) const MAX_DEPTH: usize = 10_000;

/// What [`canonicalise`] made of a valid document.
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

/// The vectors the two passes work in, kept by each thread from one document to the
/// next: a fingerprint is taken on every keyed request, replays included, and each of
/// these vectors cost an allocation (the arena's nodes two) for a body of a few members.
/// Emptied after each document; one that grew past [`KEPT_BYTES`] is dropped rather than
/// kept, so a thread holds at most six times that (96 KiB) after a large document. (Large
/// bodies are fingerprinted on the blocking pool: each of its threads may keep that much
/// until it exits.)
#[derive(Default)]
struct Scratch {
    nodes: Vec<Node>,
    children: Vec<u32>,
    pending: Vec<u32>,
    open: Vec<(bool, usize)>,
    stack: Vec<Writing>,
    out: Vec<u8>,
}

/// The most a vector of [`Scratch`] keeps between documents, in bytes.
const KEPT_BYTES: usize = 16 * 1024;

impl Scratch {
    /// No vectors yet (nothing allocated): what each thread starts with.
    const EMPTY: Self = Self {
        nodes: Vec::new(),
        children: Vec::new(),
        pending: Vec::new(),
        open: Vec::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };

    /// Empties each vector, dropping one whose room is over [`KEPT_BYTES`].
    fn reset(&mut self) {
        fn reset<T>(vec: &mut Vec<T>) {
            vec.clear();
            if vec.capacity() * std::mem::size_of::<T>() > KEPT_BYTES {
                *vec = Vec::new();
            }
        }
        reset(&mut self.nodes);
        reset(&mut self.children);
        reset(&mut self.pending);
        reset(&mut self.open);
        reset(&mut self.stack);
        reset(&mut self.out);
    }
}

thread_local! {
    /// This thread's [`Scratch`]: taken out for a document and put back after, so a
    /// document canonicalised while another is (which nothing here does) gets empty ones.
    static SCRATCH: Cell<Scratch> = const { Cell::new(Scratch::EMPTY) };
}

/// Canonicalises `text` (as [`canonicalise`]) into this thread's reused buffer, and
/// hands what it made of it and the bytes written to `then`.
///
/// # Errors
/// As [`canonicalise`].
pub(super) fn with_canonical<R>(
    text: &[u8],
    ignored: &Ignored<'_>,
    then: impl FnOnce(Canonical, &[u8]) -> R,
) -> Result<R, serde_json::Error> {
    // Where this thread's vectors are gone (a fingerprint taken by another thread-local's
    // destructor), vectors of its own, dropped after.
    let mut scratch = SCRATCH.try_with(Cell::take).unwrap_or_default();
    let result = canonicalise(text, ignored, &mut scratch).map(|canonical| then(canonical, &scratch.out));
    scratch.reset();
    let _ = SCRATCH.try_with(|cell| cell.set(scratch));
    result
}

/// [`canonicalise`] with vectors of its own (the tests' form).
#[cfg(test)]
pub(super) fn write_canonical(
    text: &[u8],
    ignored: &Ignored<'_>,
    out: &mut Vec<u8>,
) -> Result<Canonical, serde_json::Error> {
    let mut scratch = Scratch::default();
    let result = canonicalise(text, ignored, &mut scratch);
    *out = scratch.out;
    result
}

/// Writes the canonical form of `text` to `scratch.out`: object members sorted by the UTF-8 bytes
/// of their keys, no insignificant whitespace, strings re-escaped minimally (as
/// serde_json writes them), numbers and literals exactly as written; the members and
/// array items `ignored` names left out (nothing at all when it names the root). What is
/// written is only meaningful with [`Canonical::Written`]; otherwise the caller hashes
/// the raw bytes.
///
/// `scratch`'s vectors must be empty on entry, and may be left holding values (the
/// caller empties them: [`Scratch::reset`]).
///
/// # Errors
/// serde_json's error when `text` is not one valid JSON document (including invalid
/// UTF-8 and lone surrogate escapes).
fn canonicalise(text: &[u8], ignored: &Ignored<'_>, scratch: &mut Scratch) -> Result<Canonical, serde_json::Error> {
    serde_json::from_slice::<serde::de::IgnoredAny>(text)?;
    // serde_json skips the strings it ignores without checking their UTF-8; strings
    // without escapes are copied as they are below, so check the whole text once here.
    if let Err(e) = std::str::from_utf8(text) {
        return Err(serde::de::Error::custom(format_args!("invalid UTF-8 in a JSON document: {e}")));
    }
    if u32::try_from(text.len()).is_err() {
        return Ok(Canonical::TooDeep);
    }
    let mut arena = Arena {
        text,
        nodes: std::mem::take(&mut scratch.nodes),
        children: std::mem::take(&mut scratch.children),
        strings: Vec::new(),
    };
    let parsed = parse(&mut arena, &mut scratch.pending, &mut scratch.open);
    let result = match parsed {
        Ok(true) => {
            // The canonical form is never longer than the text: one allocation at most.
            scratch.out.reserve(text.len());
            Ok(write(&arena, ignored, &mut scratch.out, &mut scratch.stack))
        }
        Ok(false) => Ok(Canonical::TooDeep),
        Err(e) => Err(e),
    };
    scratch.nodes = arena.nodes;
    scratch.children = arena.children;
    result
}

/// Reads the document into `arena` (empty, but for its text); `false` past
/// [`MAX_DEPTH`]. `text` is valid JSON of at most `u32::MAX` bytes. `pending` and `open`
/// must be empty on entry, and may be left holding values.
fn parse(
    arena: &mut Arena<'_>,
    pending: &mut Vec<u32>,
    open: &mut Vec<(bool, usize)>,
) -> Result<bool, serde_json::Error> {
    let text = arena.text;
    // `pending`: the values completed inside the containers still open, innermost last;
    // `open`: for each open container, whether it is an object and where its values start
    // in `pending`.
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
                    return Ok(false);
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
    Ok(true)
}

/// The index just past the closing quote of the string opening at `start`. The document
/// is valid, so every string closes; the end of `text` bounds the scan regardless.
pub(super) fn string_end(text: &[u8], start: usize) -> usize {
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

/// A container being written, with its node of `ignored`.
enum Writing {
    /// Items `start..end` of `Arena::children`, `next` the one to consider; `wrote`
    /// whether one was written (so the next one needs a comma).
    Array { start: u32, next: u32, end: u32, wrote: bool, trie: Trie },
    /// Members as (key, value, node of `ignored`) in output order, those left out
    /// already dropped; `next` counting keys and values.
    Object { members: Vec<(u32, u32, Trie)>, next: usize },
}

/// Writes the arena's root (the last node created) canonically, leaving out what
/// `ignored` names. `stack` must be empty on entry, and may be left holding containers
/// (a document with duplicate keys is abandoned midway).
fn write(arena: &Arena<'_>, ignored: &Ignored<'_>, out: &mut Vec<u8>, stack: &mut Vec<Writing>) -> Canonical {
    let Some(root) = arena.nodes.len().checked_sub(1) else { return Canonical::Written };
    let root_trie = ignored.root();
    if ignored.is_leaf(root_trie) {
        return Canonical::Written;
    }
    let mut pending = Some((root as u32, root_trie));
    loop {
        if let Some((id, trie)) = pending.take() {
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
                    stack.push(Writing::Array { start, next: start, end, wrote: false, trie });
                }
                Node::Object { start, end } => {
                    // Members left out are dropped before the duplicate check: a key that
                    // appears twice but is ignored cannot make parsers disagree on what
                    // the fingerprint covers.
                    let mut members: Vec<(u32, u32, Trie)> = arena.children[start as usize..end as usize]
                        .chunks_exact(2)
                        .map(|kv| (kv[0], kv[1], ignored.member(trie, arena.string_bytes(kv[0]))))
                        .filter(|&(_, _, child)| !ignored.is_leaf(child))
                        .collect();
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
            Some(Writing::Array { start, next, end, wrote, trie }) => {
                let mut item = None;
                while item.is_none() && next != end {
                    let child = ignored.item(*trie, (*next - *start) as usize);
                    if !ignored.is_leaf(child) {
                        item = Some((arena.children[*next as usize], child));
                    }
                    *next += 1;
                }
                let Some(item) = item else {
                    out.push(b']');
                    stack.pop();
                    continue;
                };
                if *wrote {
                    out.push(b',');
                }
                *wrote = true;
                pending = Some(item);
            }
            Some(Writing::Object { members, next }) => {
                if *next == members.len() * 2 {
                    out.push(b'}');
                    stack.pop();
                    continue;
                }
                let (key, value, trie) = members[*next / 2];
                if *next % 2 == 0 {
                    if *next > 0 {
                        out.push(b',');
                    }
                    pending = Some((key, Ignored::NONE));
                } else {
                    out.push(b':');
                    pending = Some((value, trie));
                }
                *next += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::JsonPointer;
    use super::*;

    fn canonical(text: &str) -> String {
        let mut out = Vec::new();
        assert_eq!(
            write_canonical(text.as_bytes(), &Ignored::new(&[]), &mut out).expect("valid JSON"),
            Canonical::Written,
            "{text}"
        );
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
            assert!(
                write_canonical(bad.as_bytes(), &Ignored::new(&[]), &mut Vec::new()).is_err(),
                "{bad:?} is not JSON"
            );
        }
        assert!(
            write_canonical(b"\"\xff\"", &Ignored::new(&[]), &mut Vec::new()).is_err(),
            "invalid UTF-8 in a string"
        );
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
                let deepest = write_canonical(nest(MAX_DEPTH / 2).as_bytes(), &Ignored::new(&[]), &mut out)
                    .map(|c| (c, out.len()));
                let deeper = write_canonical(nest(200_000).as_bytes(), &Ignored::new(&[]), &mut Vec::new());
                (deepest, deeper)
            })
            .expect("thread starts");
        let (deepest, deeper) = handle.join().expect("no stack overflow");
        assert_eq!(deepest.expect("valid JSON"), (Canonical::Written, MAX_DEPTH / 2 * "[{\"a\":}]".len() + 1));
        assert_eq!(deeper.expect("valid JSON"), Canonical::TooDeep);
    }

    /// The vectors a thread keeps between documents carry nothing from one to the next:
    /// not from a document abandoned midway (duplicate keys, nesting past the cap), not
    /// from a large one, whose vectors are not kept.
    #[test]
    fn reused_vectors_carry_nothing_between_documents() {
        let thread = std::thread::spawn(|| {
            let documents = [
                r#"{"b":{"x":[1,2,{"k":1,"k":2}]},"a":1}"#.to_owned(),
                format!("{}1{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1)),
                // Values completed, then the cap: the parse stops with its vectors in use.
                format!(r#"[1,"a",{{"b":2}},{}1{}]"#, "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH)),
                format!("[{}0]", "{\"key\":\"a long enough value\"},".repeat(5_000)),
                r#"{"z":[3,{"y":"\u00e9","w":null}],"a":true}"#.to_owned(),
                r#"{"b":{"x":[1,2,{"k":1,"k":2}]},"a":1}"#.to_owned(),
            ];
            let kept = |scratch: &Scratch| {
                std::mem::size_of::<Node>() * scratch.nodes.capacity()
                    + std::mem::size_of::<u32>() * (scratch.children.capacity() + scratch.pending.capacity())
                    + std::mem::size_of::<(bool, usize)>() * scratch.open.capacity()
                    + std::mem::size_of::<Writing>() * scratch.stack.capacity()
                    + scratch.out.capacity()
            };
            let mut most_kept = 0;
            for document in &documents {
                let mut alone = Vec::new();
                let expected =
                    write_canonical(document.as_bytes(), &Ignored::new(&[]), &mut alone).expect("valid JSON");
                let reused = with_canonical(document.as_bytes(), &Ignored::new(&[]), |canonical, written| {
                    (canonical, written.to_vec())
                })
                .expect("valid JSON");
                assert_eq!(reused.0, expected);
                if expected == Canonical::Written {
                    assert_eq!(reused.1, alone);
                }
                let scratch = SCRATCH.take();
                assert!(
                    scratch.nodes.is_empty()
                        && scratch.children.is_empty()
                        && scratch.pending.is_empty()
                        && scratch.open.is_empty()
                        && scratch.stack.is_empty()
                        && scratch.out.is_empty(),
                    "{:.40}",
                    document
                );
                most_kept = most_kept.max(kept(&scratch));
                SCRATCH.set(scratch);
            }
            most_kept
        });
        let most_kept = thread.join().expect("no panic");
        assert!(most_kept <= 6 * KEPT_BYTES, "kept {most_kept} bytes");
    }

    fn ignoring(text: &str, pointers: &[&str]) -> Result<String, Canonical> {
        let pointers: Vec<JsonPointer> = pointers.iter().map(|p| JsonPointer::new(p).expect("valid pointer")).collect();
        let mut out = Vec::new();
        match write_canonical(text.as_bytes(), &Ignored::new(&pointers), &mut out).expect("valid JSON") {
            Canonical::Written => Ok(String::from_utf8(out).expect("canonical JSON is UTF-8")),
            other => Err(other),
        }
    }

    #[test]
    fn leaves_out_the_members_pointers_name_at_any_depth() {
        let doc = r#"{"id":"evt_1","metadata":{"sent_at":"12:00","region":"eu"},"delivery":{"attempt":3}}"#;
        assert_eq!(
            ignoring(doc, &["/metadata/sent_at", "/delivery/attempt"]),
            Ok(r#"{"delivery":{},"id":"evt_1","metadata":{"region":"eu"}}"#.to_owned())
        );
        assert_eq!(ignoring(doc, &["/delivery", "/metadata"]), Ok(r#"{"id":"evt_1"}"#.to_owned()));
        // Pointers that name nothing change nothing: absent members, paths through a
        // scalar, an index into an object that has no such member.
        assert_eq!(ignoring(doc, &["/nope", "/id/x", "/metadata/0", "/delivery/attempt/x"]), Ok(canonical(doc)));
        assert_eq!(ignoring(doc, &[]), Ok(canonical(doc)));
        // The empty pointer names the whole document.
        assert_eq!(ignoring(doc, &[""]), Ok(String::new()));
        assert_eq!(ignoring("7", &["/a"]), Ok("7".to_owned()));
    }

    #[test]
    fn leaves_out_array_items_and_members_inside_them() {
        assert_eq!(ignoring("[1,2,3]", &["/0"]), Ok("[2,3]".to_owned()));
        assert_eq!(ignoring("[1,2,3]", &["/1"]), Ok("[1,3]".to_owned()));
        assert_eq!(ignoring("[1,2,3]", &["/2", "/7"]), Ok("[1,2]".to_owned()));
        assert_eq!(ignoring("[1,2,3]", &["/0", "/1", "/2"]), Ok("[]".to_owned()));
        // Only canonical indices name items; `-` names the item after the last: none.
        assert_eq!(ignoring("[1,2,3]", &["/01", "/-", "/+1", "/ 1"]), Ok("[1,2,3]".to_owned()));
        assert_eq!(
            ignoring(r#"{"items":[{"ts":1,"sku":"a"},{"ts":2,"sku":"b"}]}"#, &["/items/0/ts"]),
            Ok(r#"{"items":[{"sku":"a"},{"sku":"b","ts":2}]}"#.to_owned())
        );
        // A token is a member name in an object, whatever it looks like.
        assert_eq!(ignoring(r#"{"0":1,"01":2,"-":3,"x":4}"#, &["/0", "/01", "/-"]), Ok(r#"{"x":4}"#.to_owned()));
    }

    #[test]
    fn pointers_match_decoded_names_and_unescape_their_own() {
        let doc = r#"{"a/b":1,"m~n":2,"\u00e9":3,"\u0074s":4,"":5,"keep":{"":6,"x":7}}"#;
        assert_eq!(
            ignoring(doc, &["/a~1b", "/m~0n", "/é", "/ts", "/", "/keep/"]),
            Ok(r#"{"keep":{"x":7}}"#.to_owned())
        );
        assert_eq!(ignoring(r#"{"a":{"b":1},"a~1b":2}"#, &["/a/b"]), Ok(r#"{"a":{},"a~1b":2}"#.to_owned()));
    }

    #[test]
    fn duplicate_keys_count_only_among_the_members_kept() {
        // Parsers disagree on which duplicate wins: that still falls back to raw bytes,
        // unless the duplicated member is left out anyway.
        assert_eq!(ignoring(r#"{"a":1,"sent_at":1,"sent_at":2}"#, &["/sent_at"]), Ok(r#"{"a":1}"#.to_owned()));
        assert_eq!(ignoring(r#"{"a":1,"meta":{"x":1,"x":2}}"#, &["/meta"]), Ok(r#"{"a":1}"#.to_owned()));
        assert_eq!(ignoring(r#"{"a":1,"a":2,"sent_at":1}"#, &["/sent_at"]), Err(Canonical::DuplicateKeys));
        assert_eq!(
            ignoring(r#"{"meta":{"sent_at":1},"meta":{"sent_at":2}}"#, &["/meta/sent_at"]),
            Err(Canonical::DuplicateKeys),
            "the path goes through a duplicated member"
        );
    }

    #[test]
    fn ignoring_deep_inside_deep_nesting_costs_heap_not_stack() {
        let depth = MAX_DEPTH - 1;
        let doc = format!("{}{{\"t\":1,\"k\":2}}{}", "{\"a\":[".repeat(depth / 2), "]}".repeat(depth / 2));
        let pointer = format!("{}/t", "/a/0".repeat(depth / 2));
        let expected = format!("{}{{\"k\":2}}{}", "{\"a\":[".repeat(depth / 2), "]}".repeat(depth / 2));
        let handle = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(move || (ignoring(&doc, &[&pointer]), ignoring(&format!("[[{doc}]]"), &[&format!("/0/0{pointer}")])))
            .expect("thread starts");
        let (written, too_deep) = handle.join().expect("no stack overflow");
        assert_eq!(written, Ok(expected));
        assert_eq!(too_deep, Err(Canonical::TooDeep), "the depth cap holds with pointers too");
    }

    #[test]
    fn many_pointers_on_many_members_stay_linear() {
        // 100,000 members and 100,000 pointers, half of them naming a member: a lookup
        // per member per pointer would be 10^10 steps.
        let members: Vec<String> = (0..100_000).map(|i| format!("\"k{i}\":{i}")).collect();
        let doc = format!("{{{}}}", members.join(","));
        let pointers: Vec<String> = (0..100_000).map(|i| format!("/k{}", i * 2)).collect();
        let pointers: Vec<&str> = pointers.iter().map(String::as_str).collect();
        let written = ignoring(&doc, &pointers).expect("no duplicates");
        assert_eq!(written.matches(':').count(), 50_000);
        assert!(written.contains("\"k1\":1,") && !written.contains("\"k0\""));
        let items = format!("[{}]", (0..100_000).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
        let pointers: Vec<String> = (0..100_000).map(|i| format!("/{}", i * 2)).collect();
        let pointers: Vec<&str> = pointers.iter().map(String::as_str).collect();
        assert!(ignoring(&items, &pointers).expect("valid").starts_with("[1,3,5,"));
    }
}
