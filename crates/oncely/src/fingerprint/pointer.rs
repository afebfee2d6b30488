//! JSON Pointers (RFC 6901), and the set of them a fingerprint leaves out.
//!
//! [`JsonPointer`] owns the syntax (parsing, the `~0`/`~1` escapes, how a reference
//! token reads against an array) and finding the value a pointer names in a document
//! ([`JsonPointer::find`]: one pass, no recursion). [`Ignored`] is the pointers a
//! canonical form skips,
//! arranged as a tree of reference tokens so that the writer looks up each member on a
//! pointer's path once, in logarithmic time, and never looks at members off every path.

use std::fmt;
use std::str::FromStr;

/// A JSON Pointer (RFC 6901): the path to one value inside a JSON document, such as
/// `/metadata/sent_at`, `/items/0/ts` or `/id`.
///
/// The text is the empty string (the whole document) or a sequence of `/`-prefixed
/// reference tokens, in which `~1` stands for `/` and `~0` for `~`. A token applied to
/// an array is an index (`0`, or digits without a leading zero); applied to an object it
/// is a member name, compared with the member's decoded name.
///
/// ```
/// use oncely::fingerprint::{JsonPointer, JsonPointerError};
///
/// let pointer: JsonPointer = "/metadata/sent~1at/0".parse()?;
/// assert_eq!(pointer.tokens().collect::<Vec<_>>(), ["metadata", "sent/at", "0"]);
/// assert_eq!(pointer.as_str(), "/metadata/sent~1at/0");
///
/// assert_eq!("metadata".parse::<JsonPointer>(), Err(JsonPointerError::NoLeadingSlash));
/// assert_eq!("/a~2".parse::<JsonPointer>(), Err(JsonPointerError::InvalidEscape { position: 2 }));
/// # Ok::<(), JsonPointerError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct JsonPointer {
    text: Box<str>,
    /// The decoded reference tokens, in order.
    tokens: Box<[Box<str>]>,
}

/// Why a string is not a [`JsonPointer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonPointerError {
    /// The pointer is neither empty nor starts with `/` (`metadata/sent_at`, say).
    #[error("a JSON pointer must be empty or start with '/'")]
    NoLeadingSlash,
    /// A `~` is not followed by `0` or `1`, the only escapes RFC 6901 defines.
    #[error("a JSON pointer has '~' not followed by '0' or '1' at byte {position}")]
    InvalidEscape {
        /// The byte offset of the `~`.
        position: usize,
    },
}

impl JsonPointer {
    /// Parses and validates `pointer`.
    ///
    /// ```
    /// use oncely::fingerprint::JsonPointer;
    ///
    /// let whole = JsonPointer::new("")?;
    /// assert_eq!(whole.tokens().count(), 0);
    /// // A trailing `/` names the member whose name is empty.
    /// assert_eq!(JsonPointer::new("/a/")?.tokens().collect::<Vec<_>>(), ["a", ""]);
    /// # Ok::<(), oncely::fingerprint::JsonPointerError>(())
    /// ```
    ///
    /// # Errors
    /// [`JsonPointerError`] when `pointer` is not empty and does not start with `/`, or
    /// has a `~` that is not `~0` or `~1`.
    pub fn new(pointer: impl AsRef<str>) -> Result<Self, JsonPointerError> {
        let text = pointer.as_ref();
        let Some(rest) = text.strip_prefix('/') else {
            return if text.is_empty() {
                Ok(Self { text: Box::from(""), tokens: Box::new([]) })
            } else {
                Err(JsonPointerError::NoLeadingSlash)
            };
        };
        let mut tokens = Vec::new();
        let mut offset = 1;
        for raw in rest.split('/') {
            tokens.push(unescape(raw, offset)?);
            offset += raw.len() + 1;
        }
        Ok(Self { text: Box::from(text), tokens: tokens.into_boxed_slice() })
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The reference tokens, unescaped (`~1` read as `/`, `~0` as `~`); none for the
    /// empty pointer, which names the whole document.
    pub fn tokens(&self) -> impl ExactSizeIterator<Item = &str> + DoubleEndedIterator + Clone {
        self.tokens.iter().map(|token| &**token)
    }

    /// The array index a reference token names, as RFC 6901 reads it: `0`, or digits
    /// without a leading zero. `None` for anything else (`-`, `01`, `+1`, a name), which
    /// names no item of any array.
    ///
    /// ```
    /// use oncely::fingerprint::JsonPointer;
    ///
    /// assert_eq!(JsonPointer::array_index("0"), Some(0));
    /// assert_eq!(JsonPointer::array_index("12"), Some(12));
    /// assert_eq!(JsonPointer::array_index("01"), None);
    /// assert_eq!(JsonPointer::array_index("-"), None);
    /// ```
    pub fn array_index(token: &str) -> Option<usize> {
        match token.as_bytes() {
            [b'0'] => Some(0),
            [b'1'..=b'9', rest @ ..] if rest.iter().all(u8::is_ascii_digit) => token.parse().ok(),
            _ => None,
        }
    }

    /// The value this pointer names in the JSON document `json`, as it is written there
    /// (`"ch_1"` with its quotes and escapes, `42`, `{"a":1}`), or `None` when it names
    /// nothing: an absent member, an index past the end, a path through a scalar.
    ///
    /// ```
    /// use oncely::fingerprint::{FindError, JsonPointer};
    ///
    /// let id: JsonPointer = "/data/object/id".parse()?;
    /// assert_eq!(id.find(br#"{"data":{"object":{"id": "ch_1"}}}"#)?, Some(r#""ch_1""#));
    /// assert_eq!(id.find(br#"{"data":[]}"#)?, None);
    /// assert!(matches!(id.find(br#"{"data":{"object":{"id":1}},"data":{}}"#), Err(FindError::DuplicateMember)));
    /// assert!(matches!(id.find(b"{"), Err(FindError::NotJson(_))));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// **Hostile input**: one pass over the document, without recursion and without
    /// building a tree of it: time linear in its size, memory linear in its nesting, any
    /// depth safe on any thread (the pointer's length too). Only the member names of the
    /// objects on the pointer's path are decoded.
    ///
    /// # Errors
    /// - [`FindError::NotJson`] when `json` is not one JSON document (invalid UTF-8
    ///   included);
    /// - [`FindError::DuplicateMember`] when an object on the path has the member the
    ///   pointer names twice: parsers disagree on which one counts.
    pub fn find<'a>(&self, json: &'a [u8]) -> Result<Option<&'a str>, FindError> {
        serde_json::from_slice::<serde::de::IgnoredAny>(json).map_err(FindError::NotJson)?;
        // serde_json skips ignored strings without checking their UTF-8.
        let text = std::str::from_utf8(json).map_err(|e| {
            FindError::NotJson(serde::de::Error::custom(format_args!("invalid UTF-8 in a JSON document: {e}")))
        })?;
        find(text, &self.tokens)
    }
}

/// One reference token of the text starting at byte `offset` of the pointer, unescaped.
fn unescape(raw: &str, offset: usize) -> Result<Box<str>, JsonPointerError> {
    if !raw.contains('~') {
        return Ok(Box::from(raw));
    }
    let mut token = String::with_capacity(raw.len());
    let mut chars = raw.char_indices();
    while let Some((i, c)) = chars.next() {
        if c != '~' {
            token.push(c);
            continue;
        }
        match chars.next() {
            Some((_, '0')) => token.push('~'),
            Some((_, '1')) => token.push('/'),
            _ => return Err(JsonPointerError::InvalidEscape { position: offset + i }),
        }
    }
    Ok(token.into_boxed_str())
}

impl FromStr for JsonPointer {
    type Err = JsonPointerError;

    fn from_str(pointer: &str) -> Result<Self, Self::Err> {
        Self::new(pointer)
    }
}

impl TryFrom<&str> for JsonPointer {
    type Error = JsonPointerError;

    fn try_from(pointer: &str) -> Result<Self, Self::Error> {
        Self::new(pointer)
    }
}

impl fmt::Display for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JsonPointer({:?})", self.text)
    }
}

/// Why [`JsonPointer::find`] cannot say what a pointer names.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FindError {
    /// The text is not one JSON document.
    #[error("not a JSON document: {0}")]
    NotJson(serde_json::Error),
    /// An object on the pointer's path has the member the pointer names twice.
    #[error("an object on the JSON pointer's path has the member it names twice")]
    DuplicateMember,
}

/// A container [`find`] has open.
struct Open {
    object: bool,
    /// Objects: whether the next string is a member name.
    expecting_name: bool,
    /// Objects on the path: whether the current member's name is the path's token.
    name_matches: bool,
    /// Arrays: the index of the next item.
    index: usize,
    /// On the path: whether a member or item on it was seen already.
    matched: bool,
}

/// [`JsonPointer::find`] in `text`, valid JSON: one pass left to right with a stack of
/// the open containers. The containers on the path (the values at `path[..i]`, `i` their
/// depth) are always the outermost `on_path` of those open, so a value is on the path
/// when its container is the innermost of them and the member or item it is matches.
fn find<'a>(text: &'a str, path: &[Box<str>]) -> Result<Option<&'a str>, FindError> {
    let bytes = text.as_bytes();
    let mut stack: Vec<Open> = Vec::new();
    let mut on_path = 0;
    let mut found: Option<&'a str> = None;
    // The value found, when it is a container: where it starts, and the stack's length
    // while it is open.
    let mut found_open: Option<(usize, usize)> = None;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        let (opens, end) = match bytes[i] {
            b' ' | b'\t' | b'\n' | b'\r' | b',' | b':' => {
                i += 1;
                continue;
            }
            b']' | b'}' => {
                i += 1;
                if stack.pop().is_none() {
                    break;
                }
                if let Some((from, depth)) = found_open
                    && depth == stack.len() + 1
                {
                    found = Some(&text[from..i]);
                    found_open = None;
                }
                on_path = on_path.min(stack.len());
                completed(&mut stack);
                continue;
            }
            b'[' | b'{' => (true, i + 1),
            b'"' => (false, super::canonical::string_end(bytes, i)),
            _ => {
                let mut end = i;
                while end < bytes.len() && !matches!(bytes[end], b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r') {
                    end += 1;
                }
                (false, end)
            }
        };
        i = end;
        let depth = stack.len();
        if let Some(container) = stack.last_mut()
            && container.object
            && container.expecting_name
        {
            container.expecting_name = false;
            if depth == on_path {
                let name = &text[start..end];
                container.name_matches = if name.contains('\\') {
                    serde_json::from_str::<std::borrow::Cow<'_, str>>(name).map_err(FindError::NotJson)?
                        == *path[depth - 1]
                } else {
                    name.strip_prefix('"').and_then(|name| name.strip_suffix('"')) == Some(&*path[depth - 1])
                };
            }
            continue;
        }
        let here = match stack.last() {
            None => true,
            Some(_) if depth != on_path => false,
            Some(container) if container.object => container.name_matches,
            Some(container) => JsonPointer::array_index(&path[depth - 1]) == Some(container.index),
        };
        if here {
            if let Some(container) = stack.last_mut() {
                if container.matched {
                    return Err(FindError::DuplicateMember);
                }
                container.matched = true;
            }
            if depth == path.len() {
                if opens {
                    found_open = Some((start, depth + 1));
                } else {
                    found = Some(&text[start..end]);
                }
            } else if opens {
                on_path = depth + 1;
            }
        }
        if opens {
            let object = bytes[start] == b'{';
            stack.push(Open { object, expecting_name: object, name_matches: false, index: 0, matched: false });
        } else {
            completed(&mut stack);
        }
        if stack.is_empty() {
            break;
        }
    }
    Ok(found)
}

/// A value of the innermost open container is complete.
fn completed(stack: &mut [Open]) {
    if let Some(container) = stack.last_mut() {
        if container.object {
            container.expecting_name = true;
            container.name_matches = false;
        } else {
            container.index += 1;
        }
    }
}

/// A node id of [`Ignored`]; [`Ignored::NONE`] is "no pointer goes on from here".
pub(super) type Trie = u32;

/// The pointers to leave out, as a tree of their reference tokens.
pub(super) struct Ignored<'p> {
    nodes: Vec<TrieNode<'p>>,
}

struct TrieNode<'p> {
    /// A pointer ends here: the value here is left out, whatever lies below.
    leaf: bool,
    /// The next tokens, sorted by their bytes (unique), each with its node.
    members: Vec<(&'p str, Trie)>,
    /// The next tokens that are array indices, sorted by index, each with its node.
    indices: Vec<(usize, Trie)>,
}

impl<'p> Ignored<'p> {
    /// No pointer: the root of a document with nothing to leave out.
    pub(super) const NONE: Trie = Trie::MAX;

    /// The tree of `pointers`, in time O(total tokens × log(pointers)), whatever their
    /// number and order (duplicates are harmless).
    pub(super) fn new(pointers: &'p [JsonPointer]) -> Self {
        if pointers.is_empty() {
            return Self { nodes: Vec::new() };
        }
        let mut sorted: Vec<&[Box<str>]> = pointers.iter().map(|p| &*p.tokens).collect();
        // Sorted, the pointers sharing a prefix are adjacent and each node's children
        // arrive in order: a new token is either the last child or a new last child.
        sorted.sort_unstable();
        sorted.dedup();
        let mut nodes = vec![TrieNode { leaf: false, members: Vec::new(), indices: Vec::new() }];
        for tokens in sorted {
            let mut node = 0;
            for token in tokens.iter() {
                let next = match nodes[node].members.last() {
                    Some(&(last, next)) if last == &**token => next,
                    _ => {
                        let next = nodes.len() as Trie;
                        nodes.push(TrieNode { leaf: false, members: Vec::new(), indices: Vec::new() });
                        nodes[node].members.push((token, next));
                        next
                    }
                };
                node = next as usize;
            }
            nodes[node].leaf = true;
        }
        for node in &mut nodes {
            node.indices = node
                .members
                .iter()
                .filter_map(|&(token, next)| JsonPointer::array_index(token).map(|index| (index, next)))
                .collect();
            node.indices.sort_unstable();
        }
        Self { nodes }
    }

    /// The node of the document's root: [`Self::NONE`] when nothing is left out.
    pub(super) fn root(&self) -> Trie {
        if self.nodes.is_empty() { Self::NONE } else { 0 }
    }

    /// Whether the value at `node` is left out.
    pub(super) fn is_leaf(&self, node: Trie) -> bool {
        node != Self::NONE && self.nodes[node as usize].leaf
    }

    /// The node of the member named `name` of the object at `node`.
    pub(super) fn member(&self, node: Trie, name: &[u8]) -> Trie {
        if node == Self::NONE {
            return Self::NONE;
        }
        let members = &self.nodes[node as usize].members;
        members.binary_search_by(|(token, _)| token.as_bytes().cmp(name)).map_or(Self::NONE, |found| members[found].1)
    }

    /// The node of item `index` of the array at `node`.
    pub(super) fn item(&self, node: Trie, index: usize) -> Trie {
        if node == Self::NONE {
            return Self::NONE;
        }
        let indices = &self.nodes[node as usize].indices;
        indices.binary_search_by_key(&index, |&(i, _)| i).map_or(Self::NONE, |found| indices[found].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pointers(texts: &[&str]) -> Vec<JsonPointer> {
        texts.iter().map(|text| JsonPointer::new(text).expect("valid pointer")).collect()
    }

    #[test]
    fn parses_rfc_6901_examples() {
        let tokens = |text: &str| JsonPointer::new(text).map(|p| p.tokens().map(String::from).collect::<Vec<_>>());
        assert_eq!(tokens(""), Ok(vec![]));
        assert_eq!(tokens("/"), Ok(vec![String::new()]));
        assert_eq!(tokens("/a~1b"), Ok(vec!["a/b".to_owned()]));
        assert_eq!(tokens("/m~0n"), Ok(vec!["m~n".to_owned()]));
        assert_eq!(tokens("/~01"), Ok(vec!["~1".to_owned()]), "~01 is ~ then 1, not /");
        assert_eq!(tokens("/é/ /%"), Ok(vec!["é".to_owned(), " ".to_owned(), "%".to_owned()]));
        assert_eq!(tokens("a"), Err(JsonPointerError::NoLeadingSlash));
        assert_eq!(tokens("#/a"), Err(JsonPointerError::NoLeadingSlash));
        assert_eq!(tokens("/a/b~"), Err(JsonPointerError::InvalidEscape { position: 4 }));
        assert_eq!(tokens("/~é"), Err(JsonPointerError::InvalidEscape { position: 1 }));
        let pointer = JsonPointer::new("/a~1b").expect("valid");
        assert_eq!(pointer.to_string(), "/a~1b");
        assert_eq!(format!("{pointer:?}"), r#"JsonPointer("/a~1b")"#);
    }

    #[test]
    fn array_indices_are_canonical_decimals() {
        assert_eq!(JsonPointer::array_index("7"), Some(7));
        for not_index in ["", "-", "00", "01", "+1", "-1", "1a", " 1", "99999999999999999999999"] {
            assert_eq!(JsonPointer::array_index(not_index), None, "{not_index:?}");
        }
    }

    #[test]
    fn the_tree_finds_every_pointer_and_nothing_else() {
        let list = pointers(&["/b/1", "/a/x", "/a", "/b/0/c", "/b/x", "/a/x"]);
        let ignored = Ignored::new(&list);
        let root = ignored.root();
        assert!(!ignored.is_leaf(root));
        let a = ignored.member(root, b"a");
        assert!(ignored.is_leaf(a));
        let b = ignored.member(root, b"b");
        assert!(!ignored.is_leaf(b));
        assert!(ignored.is_leaf(ignored.item(b, 1)));
        assert!(ignored.is_leaf(ignored.member(b, b"1")), "the same token read as a name");
        assert!(!ignored.is_leaf(ignored.item(b, 0)));
        assert!(ignored.is_leaf(ignored.member(ignored.item(b, 0), b"c")));
        assert_eq!(ignored.item(b, 2), Ignored::NONE);
        assert_eq!(ignored.member(root, b"c"), Ignored::NONE);
        assert_eq!(ignored.member(Ignored::NONE, b"a"), Ignored::NONE);
        assert_eq!(Ignored::new(&[]).root(), Ignored::NONE);
        let whole = pointers(&[""]);
        assert!(Ignored::new(&whole).is_leaf(0));
    }

    #[test]
    fn a_huge_pointer_list_builds_in_linearithmic_time() {
        // 200,000 siblings in reverse order, then 200,000 levels down one path: with a
        // sorted insert or a per-pointer walk of its siblings, this would not finish.
        let mut list: Vec<JsonPointer> =
            (0..200_000).rev().map(|i| JsonPointer::new(format!("/k{i}"))).collect::<Result<_, _>>().expect("valid");
        list.push(JsonPointer::new("/d".repeat(200_000)).expect("valid"));
        let ignored = Ignored::new(&list);
        assert!(ignored.is_leaf(ignored.member(ignored.root(), b"k123456")));
        assert_eq!(ignored.member(ignored.root(), b"k200000"), Ignored::NONE);
        let mut node = ignored.root();
        for _ in 0..200_000 {
            node = ignored.member(node, b"d");
        }
        assert!(ignored.is_leaf(node));
    }

    fn found<'a>(json: &'a str, pointer: &str) -> Result<Option<&'a str>, FindError> {
        JsonPointer::new(pointer).expect("valid pointer").find(json.as_bytes())
    }

    #[test]
    fn finds_the_value_a_pointer_names_as_written() {
        let doc = r#" { "id" : "evt_1", "data": {"object": {"id": 42, "tags": ["a", {"k": [1, 2]}]}},
            "a/b": {"m~n": true}, "": {"": null}, "esc\"aped": 1.50, "\u0069d2": "x\u0041" } "#;
        for (pointer, value) in [
            ("/id", Some(r#""evt_1""#)),
            ("/data/object/id", Some("42")),
            ("/data/object/tags/0", Some(r#""a""#)),
            ("/data/object/tags/1", Some(r#"{"k": [1, 2]}"#)),
            ("/data/object/tags/1/k", Some("[1, 2]")),
            ("/data/object/tags/1/k/1", Some("2")),
            ("/a~1b/m~0n", Some("true")),
            ("/", Some(r#"{"": null}"#)),
            ("//", Some("null")),
            ("/esc\"aped", Some("1.50")),
            ("/id2", Some(r#""x\u0041""#)),
            ("/nope", None),
            ("/id/0", None),
            ("/data/object/tags/2", None),
            ("/data/object/tags/01", None),
            ("/data/object/tags/-", None),
            ("/data/object/tags/k", None),
            ("/data/object/id/x", None),
            ("/a~1b/m~0n/x", None),
        ] {
            assert_eq!(found(doc, pointer).expect("valid JSON"), value, "{pointer}");
        }
        assert_eq!(found(doc, "").expect("valid JSON"), Some(doc.trim()));
        assert_eq!(found("7", "").expect("valid JSON"), Some("7"));
        assert_eq!(found("7", "/0").expect("valid JSON"), None);
        // Strings holding brackets, quotes and escapes do not confuse the scan.
        assert_eq!(found(r#"{"x":"}]{[\"\\","id":{"y":"]"}}"#, "/id/y").expect("valid JSON"), Some(r#""]""#));
    }

    #[test]
    fn duplicates_matter_on_the_path_only() {
        let dup = |json: &str, pointer: &str| matches!(found(json, pointer), Err(FindError::DuplicateMember));
        assert!(dup(r#"{"id":1,"id":2}"#, "/id"));
        assert!(dup(r#"{"id":1,"\u0069d":1}"#, "/id"));
        assert!(dup(r#"{"data":{"id":1},"data":{}}"#, "/data/id"));
        assert!(dup(r#"{"data":{"id":1,"x":{},"id":null}}"#, "/data/id"));
        assert!(dup(r#"[{"a":1,"a":2}]"#, "/0/a"));
        assert_eq!(
            found(r#"{"x":1,"x":2,"id":3,"o":{"id":1,"id":2},"l":[{"id":1,"id":1}]}"#, "/id").ok(),
            Some(Some("3"))
        );
        assert_eq!(found(r#"[{"a":1,"a":2},{"a":3}]"#, "/1/a").ok(), Some(Some("3")));
    }

    #[test]
    fn not_json_is_an_error() {
        for bad in ["", "{", r#"{"id":1"#, r#"{"id":1} 2"#, r#"{"id":1,}"#, "\u{feff}{}", r#"{"\ud800":1}"#] {
            assert!(matches!(found(bad, "/id"), Err(FindError::NotJson(_))), "{bad:?}");
        }
        let pointer = JsonPointer::new("/id").expect("valid");
        assert!(matches!(pointer.find(b"{\"x\":\"\xff\",\"id\":1}"), Err(FindError::NotJson(_))), "invalid UTF-8");
    }

    #[test]
    fn any_depth_and_any_pointer_length_on_a_small_stack() {
        let handle = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let levels = 300_000;
                let doc = format!("{}\"k\"{}", "[{\"a\":".repeat(levels), "}]".repeat(levels));
                let pointer = JsonPointer::new("/0/a".repeat(levels)).expect("valid");
                let beside = format!(r#"{{"deep":{doc},"id":1}}"#);
                let id = JsonPointer::new("/id").expect("valid");
                (
                    pointer.find(doc.as_bytes()).map(|v| v.map(str::to_owned)),
                    id.find(beside.as_bytes()).map(|v| v.map(str::to_owned)),
                )
            })
            .expect("thread starts");
        let (along, beside) = handle.join().expect("no stack overflow");
        assert_eq!(along.expect("valid JSON"), Some("\"k\"".to_owned()));
        assert_eq!(beside.expect("valid JSON"), Some("1".to_owned()));
    }
}
