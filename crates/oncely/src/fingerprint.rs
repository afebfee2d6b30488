//! Request fingerprints: what makes a retry "the same request".
//!
//! A record keeps the fingerprint of the request that created it. A later request with the
//! same key but another fingerprint is a client error (the key was reused for a different
//! operation) and is refused instead of replayed.
//!
//! JSON bodies are compared in canonical form ([`Fingerprint::from_json`]), optionally
//! with some members left out, named by [`JsonPointer`]s
//! ([`Fingerprint::from_json_ignoring`]): a webhook redelivery or a queue retry that
//! changed only its `sent_at` or `attempt` is still the same request.

use std::fmt;

use serde::Serialize;
use sha2::{Digest, Sha256};

mod canonical;
mod pointer;

use canonical::Canonical;
use pointer::Ignored;
pub use pointer::{FindError, JsonPointer, JsonPointerError};

/// A 32-byte SHA-256 digest of a request's content.
///
/// ```
/// use oncely::Fingerprint;
///
/// // Re-serialised JSON still matches: keys are sorted, whitespace dropped.
/// let a = Fingerprint::from_json(br#"{"amount": 1999, "currency": "eur"}"#)?;
/// let b = Fingerprint::from_json(br#"{"currency":"eur","amount":1999}"#)?;
/// assert_eq!(a, b);
///
/// // Raw bytes are hashed as they are.
/// assert_ne!(Fingerprint::from_bytes(b"a"), Fingerprint::from_bytes(b"a "));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The SHA-256 of `bytes`, hashed as they are.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// A fingerprint built from several labelled parts (method, path, content type, body…)
    /// so that moving bytes from one part to another changes the fingerprint.
    ///
    /// ```
    /// use oncely::Fingerprint;
    ///
    /// let a = Fingerprint::from_parts(&[b"POST", b"/payments", b"{}"]);
    /// let b = Fingerprint::from_parts(&[b"POST", b"/payments{}", b""]);
    /// assert_ne!(a, b);
    /// ```
    pub fn from_parts(parts: &[&[u8]]) -> Self {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        Self(hasher.finalize().into())
    }

    /// The SHA-256 of the canonical form of a JSON document.
    ///
    /// Canonical form: object keys sorted by their UTF-8 bytes, no insignificant
    /// whitespace, strings re-escaped minimally. What that means in detail:
    ///
    /// - **Unicode escapes** are decoded before hashing, so `"\u00e9"` and `"é"` are the
    ///   same string and give the same fingerprint.
    /// - **Numbers** are compared by their text, exactly: nothing is rounded through a
    ///   float, so two documents with different numbers never match (and `1.5`, `1.50`
    ///   and `15e-1` are three different requests; clients that re-serialise write
    ///   numbers the same way each time).
    /// - **Duplicate object keys**: a document that has any is hashed as raw bytes, since
    ///   parsers disagree on which one wins.
    /// - **Nesting deeper than 10,000 levels**: hashed as raw bytes too (a retry must then
    ///   send the same bytes; no real API nests this deep).
    ///
    /// So a match means the two documents have the same meaning to any JSON parser.
    ///
    /// **Hostile input**: the document is read without recursion, in time linear in its
    /// size (plus sorting each object's members) and memory linear in it (about ten times
    /// the document at worst), so any nesting depth is safe on any thread. It is still CPU work proportional to the body: HTTP
    /// callers run large bodies off the async worker threads (`oncely-http` does).
    ///
    /// # Errors
    /// The parse error when `json` is not a JSON document.
    pub fn from_json(json: &[u8]) -> Result<Self, serde_json::Error> {
        Self::from_json_ignoring(json, &[])
    }

    /// [`Fingerprint::from_json`] of the document with the values `ignore` names left
    /// out: object members (wherever duplicated) and array items, as if they were not
    /// there. A webhook or queue message whose retry changes only a timestamp or an
    /// attempt counter still matches, and so does one without those members at all.
    ///
    /// ```
    /// use oncely::Fingerprint;
    /// use oncely::fingerprint::JsonPointer;
    ///
    /// let ignore: Vec<JsonPointer> = ["/metadata/sent_at", "/delivery/attempt"]
    ///     .into_iter()
    ///     .map(str::parse)
    ///     .collect::<Result<_, _>>()?;
    /// let first = br#"{"id":"evt_1","metadata":{"sent_at":"12:00:00"},"delivery":{"attempt":1}}"#;
    /// let retry = br#"{"delivery":{"attempt":2},"id":"evt_1","metadata":{"sent_at":"12:05:00"}}"#;
    /// let other = br#"{"id":"evt_2","metadata":{"sent_at":"12:00:00"},"delivery":{"attempt":1}}"#;
    /// assert_eq!(Fingerprint::from_json_ignoring(first, &ignore)?, Fingerprint::from_json_ignoring(retry, &ignore)?);
    /// assert_ne!(Fingerprint::from_json_ignoring(first, &ignore)?, Fingerprint::from_json_ignoring(other, &ignore)?);
    /// // Nothing to ignore: the same as `from_json`.
    /// assert_eq!(Fingerprint::from_json_ignoring(first, &[])?, Fingerprint::from_json(first)?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// What the pointers mean:
    ///
    /// - Each is resolved against the document as received, independently of the others:
    ///   `/items/0` and `/items/1` leave out the first two items, whose removal does not
    ///   shift the other pointers.
    /// - A pointer that names nothing (an absent member, a path through a string, an index
    ///   past the end, `-`) changes nothing. A token is a member name in an object and an
    ///   index in an array, so `/0` names the member `"0"` of an object too.
    /// - The empty pointer names the whole document: every JSON document then matches.
    /// - The fingerprint is that of the document with the values removed. So a document
    ///   that has none of them keeps the fingerprint [`Fingerprint::from_json`] gives it:
    ///   adding pointers to a route turns only the in-flight retries that have those
    ///   members into mismatches.
    /// - **Duplicate keys** are only looked for among the members kept: a duplicated
    ///   `sent_at` left out does not matter; a duplicate elsewhere still means the raw
    ///   bytes are hashed, and so does nesting past the depth cap. The pointers are then
    ///   not applied: a retry must send the same bytes.
    ///
    /// The cost stays linear: the pointers are arranged as a tree of their tokens
    /// (O(t log p) for `p` pointers of `t` tokens in all), each member of a container on
    /// a pointer's path costs one lookup in it, and containers off every path none.
    ///
    /// # Errors
    /// The parse error when `json` is not a JSON document.
    pub fn from_json_ignoring(json: &[u8], ignore: &[JsonPointer]) -> Result<Self, serde_json::Error> {
        let ignored = Ignored::new(ignore);
        canonical::with_canonical(json, &ignored, |canonical, written| match canonical {
            Canonical::Written => Self::from_bytes(written),
            Canonical::DuplicateKeys => Self::from_parts(&[b"json with duplicate keys", json]),
            Canonical::TooDeep => Self::from_parts(&[b"json nested too deep", json]),
        })
    }

    /// The fingerprint of any serializable value, through the same canonical JSON as
    /// [`Fingerprint::from_json`].
    ///
    /// ```
    /// use oncely::Fingerprint;
    /// use serde::Serialize;
    ///
    /// #[derive(Serialize)]
    /// struct Charge { amount: u64, currency: &'static str }
    ///
    /// let fp = Fingerprint::from_serialize(&Charge { amount: 1999, currency: "eur" })?;
    /// assert_eq!(fp, Fingerprint::from_json(br#"{"currency":"eur","amount":1999}"#)?);
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    ///
    /// # Errors
    /// The serializer's error when `value` cannot be represented as JSON (a map with
    /// non-string keys, say).
    pub fn from_serialize<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        // Through `Value`, as before this used the text form: `f32`s widened to `f64`,
        // duplicate map keys merged, so fingerprints stored by earlier versions still match.
        Self::from_json(&serde_json::to_vec(&serde_json::to_value(value)?)?)
    }

    /// Wraps a digest read back from a store.
    pub const fn from_digest(digest: [u8; 32]) -> Self {
        Self(digest)
    }

    /// The digest.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        Hex32::new(&self.0).as_str().to_owned()
    }
}

/// A 32-byte digest's 64 lowercase hex digits, on the stack: `hex::encode_to_slice`'s
/// table look-up, where `hex::encode` goes through a `char` iterator (measured: the
/// larger part of writing a storage key into an access line).
pub(crate) struct Hex32([u8; 64]);

impl Hex32 {
    pub(crate) fn new(digest: &[u8; 32]) -> Self {
        let mut digits = [0u8; 64];
        // Cannot fail: the output is exactly twice the input.
        let _ = hex::encode_to_slice(digest, &mut digits);
        Self(digits)
    }

    pub(crate) fn as_str(&self) -> &str {
        // Hex digits are ASCII, so this always borrows.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", Hex32::new(&self.0).as_str())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Hex32::new(&self.0).as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(json: &str) -> Fingerprint {
        Fingerprint::from_json(json.as_bytes()).expect("test JSON parses")
    }

    #[test]
    fn canonical_json_ignores_order_and_whitespace_at_every_depth() {
        assert_eq!(
            fp(r#"{"b":[1,{"y":2,"x":1}],"a":null}"#),
            fp("{ \"a\" : null ,\n \"b\" : [ 1 , { \"x\":1, \"y\":2 } ] }")
        );
    }

    #[test]
    fn canonical_json_keeps_array_order_and_values() {
        assert_ne!(fp("[1,2]"), fp("[2,1]"));
        assert_ne!(fp(r#"{"a":1}"#), fp(r#"{"a":2}"#));
    }

    #[test]
    fn unicode_escapes_match_literal_characters() {
        assert_eq!(fp(r#"{"name":"\u00e9"}"#), fp(r#"{"name":"é"}"#));
    }

    #[test]
    fn numbers_are_compared_by_their_exact_text() {
        assert_ne!(fp("1.50"), fp("1.5"));
        assert_ne!(fp("1e2"), fp("100"));
        assert_ne!(fp("1"), fp("1.0"));
        // Beyond f64 precision, still different requests.
        assert_ne!(fp(r#"{"amount":100000000000000000001}"#), fp(r#"{"amount":100000000000000000000}"#));
        assert_ne!(fp("0.10000000000000000001"), fp("0.1"));
        assert_eq!(fp(r#"{ "amount" : 1999 }"#), fp(r#"{"amount":1999}"#));
    }

    #[test]
    fn duplicate_keys_never_match_a_document_without_them() {
        assert_ne!(fp(r#"{"amount":1,"amount":2}"#), fp(r#"{"amount":2}"#));
        assert_ne!(fp(r#"{"a":{"x":1,"x":2}}"#), fp(r#"{"a":{"x":2}}"#));
        assert_eq!(fp(r#"{"amount":1,"amount":2}"#), fp(r#"{"amount":1,"amount":2}"#));
    }

    #[test]
    fn typed_values_and_their_json_text_agree() {
        #[derive(Serialize)]
        struct Charge {
            amount: u64,
            currency: &'static str,
            tags: Vec<&'static str>,
        }
        let typed = Fingerprint::from_serialize(&Charge { amount: 1999, currency: "eur", tags: vec!["a"] });
        assert_eq!(typed.ok(), Some(fp(r#"{"tags":["a"],"currency":"eur","amount":1999}"#)));
    }

    #[test]
    fn bad_json_is_an_error_not_a_panic() {
        assert!(Fingerprint::from_json(b"{").is_err());
        assert!(Fingerprint::from_json(b"").is_err());
        assert!(Fingerprint::from_json(&[0xff, 0xfe]).is_err());
    }

    fn ignoring(json: &str, pointers: &[&str]) -> Fingerprint {
        let pointers: Vec<JsonPointer> = pointers.iter().map(|p| p.parse().expect("valid pointer")).collect();
        Fingerprint::from_json_ignoring(json.as_bytes(), &pointers).expect("test JSON parses")
    }

    #[test]
    fn ignored_members_do_not_count_and_the_rest_still_does() {
        let rules = ["/metadata/sent_at", "/delivery/attempt", "/items/0/ts"];
        let first = r#"{"id":"evt_1","metadata":{"sent_at":1},"delivery":{"attempt":1},"items":[{"ts":1,"n":1}]}"#;
        let retry = r#"{"items":[{"n":1,"ts":9}],"delivery":{"attempt":2},"metadata":{"sent_at":2},"id":"evt_1"}"#;
        let without = r#"{"id":"evt_1","metadata":{},"delivery":{},"items":[{"n":1}]}"#;
        assert_eq!(ignoring(first, &rules), ignoring(retry, &rules));
        assert_eq!(ignoring(first, &rules), ignoring(without, &rules));
        assert_eq!(ignoring(first, &rules), fp(without), "the document with the values removed");
        for changed in [
            r#"{"id":"evt_2","metadata":{"sent_at":1},"delivery":{"attempt":1},"items":[{"ts":1,"n":1}]}"#,
            r#"{"id":"evt_1","metadata":{"sent_at":1,"x":0},"delivery":{"attempt":1},"items":[{"ts":1,"n":1}]}"#,
            r#"{"id":"evt_1","metadata":{"sent_at":1},"delivery":{"attempt":1},"items":[{"ts":1,"n":2}]}"#,
            r#"{"id":"evt_1","metadata":{"sent_at":1},"delivery":{"attempt":1},"items":[{"ts":1,"n":1},{}]}"#,
            r#"{"id":"evt_1","metadata":{"sent_at":1},"delivery":{"attempt":1},"items":[{"ts":1,"n":1}],"x":1}"#,
            r#"{"id":"evt_1","metadata":null,"delivery":{"attempt":1},"items":[{"ts":1,"n":1}]}"#,
        ] {
            assert_ne!(ignoring(changed, &rules), ignoring(first, &rules), "{changed}");
        }
        // Only the first item's `ts` is ignored.
        assert_ne!(ignoring(r#"{"items":[{},{"ts":1}]}"#, &rules), ignoring(r#"{"items":[{},{"ts":2}]}"#, &rules));
    }

    #[test]
    fn ignoring_keeps_the_raw_fallbacks() {
        let dup = r#"{"a":1,"a":2,"sent_at":1}"#;
        assert_eq!(ignoring(dup, &["/sent_at"]), fp(dup), "duplicates kept: raw bytes, pointers not applied");
        assert_ne!(ignoring(dup, &["/sent_at"]), ignoring(r#"{"a":1,"a":2,"sent_at":2}"#, &["/sent_at"]));
        assert_eq!(ignoring(r#"{"a":1,"sent_at":1,"sent_at":2}"#, &["/sent_at"]), fp(r#"{"a":1}"#));
        let pointers = [JsonPointer::new("/a").expect("valid")];
        assert!(Fingerprint::from_json_ignoring(b"{\"a\":", &pointers).is_err(), "not JSON: the parse error");
        assert!(Fingerprint::from_json_ignoring(b"{\"a\":\"\xff\"}", &pointers).is_err(), "invalid UTF-8");
    }

    #[test]
    fn the_empty_pointer_ignores_the_whole_document_but_not_its_validity() {
        assert_eq!(ignoring(r#"{"a":1}"#, &[""]), ignoring("[2]", &[""]));
        assert_ne!(ignoring("[2]", &[""]), fp("[2]"));
        assert!(Fingerprint::from_json_ignoring(b"[", &[JsonPointer::new("").expect("valid")]).is_err());
    }
}
