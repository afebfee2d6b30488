//! Request fingerprints: what makes a retry "the same request".
//!
//! A record keeps the fingerprint of the request that created it. A later request with the
//! same key but another fingerprint is a client error (the key was reused for a different
//! operation) and is refused instead of replayed.

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

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
    ///
    /// So a match means the two documents have the same meaning to any JSON parser.
    ///
    /// # Errors
    /// The parse error when `json` is not a JSON document.
    pub fn from_json(json: &[u8]) -> Result<Self, serde_json::Error> {
        let document: &RawValue = serde_json::from_slice(json)?;
        let mut canonical = Vec::with_capacity(json.len());
        if write_canonical_text(document, &mut canonical)? {
            Ok(Self::from_bytes(&canonical))
        } else {
            Ok(Self::from_parts(&[b"json with duplicate keys", json]))
        }
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
        let value = serde_json::to_value(value)?;
        let mut canonical = Vec::with_capacity(128);
        write_canonical(&value, &mut canonical)?;
        Ok(Self::from_bytes(&canonical))
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
        hex::encode(self.0)
    }
}

/// Writes the document `raw` with object keys sorted, no whitespace, strings re-escaped
/// and every number as written. False when an object has a duplicate key.
fn write_canonical_text(raw: &RawValue, out: &mut Vec<u8>) -> Result<bool, serde_json::Error> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'{') => {
            let Entries(mut entries) = serde_json::from_str(text)?;
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            if entries.windows(2).any(|w| w[0].0 == w[1].0) {
                return Ok(false);
            }
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, &key)?;
                out.push(b':');
                if !write_canonical_text(item, out)? {
                    return Ok(false);
                }
            }
            out.push(b'}');
        }
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(text)?;
            out.push(b'[');
            for (i, item) in items.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                if !write_canonical_text(item, out)? {
                    return Ok(false);
                }
            }
            out.push(b']');
        }
        Some(b'"') => {
            let string: String = serde_json::from_str(text)?;
            serde_json::to_writer(&mut *out, &string)?;
        }
        // Numbers, true, false, null: exactly as written (RawValue holds no whitespace).
        _ => out.extend_from_slice(text.as_bytes()),
    }
    Ok(true)
}

/// An object's members in document order, duplicates kept.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Entries<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Members<'a> {
            type Value = Entries<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(Members(std::marker::PhantomData))
    }
}

/// Writes `value` with object keys sorted and no whitespace.
///
/// Keys are sorted here rather than trusting `serde_json::Map` to be a `BTreeMap`: any
/// crate in a build that enables serde_json's `preserve_order` feature turns it into an
/// insertion-ordered map for everyone, which would silently change fingerprints.
fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    use serde_json::Value;
    match value {
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key)?;
                out.push(b':');
                write_canonical(item, out)?;
            }
            out.push(b'}');
        }
        leaf => serde_json::to_writer(&mut *out, leaf)?,
    }
    Ok(())
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
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
}
