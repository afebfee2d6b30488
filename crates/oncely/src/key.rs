//! Idempotency keys, the scopes that own them, and the storage keys derived from both.
//!
//! A client names an operation with an [`IdempotencyKey`]. The same key sent by two
//! principals names two different operations, so every key lives in a [`Scope`]. Stores
//! never see either raw: they index records by the [`StorageKey`], a SHA-256 digest of the
//! scope and the key, so no client input reaches a store's key space unhashed.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::fingerprint::Hex32;

/// The longest key accepted, in characters (the IETF draft and Stripe both use 255).
pub const MAX_KEY_LEN: usize = 255;

/// Why a string is not a valid [`IdempotencyKey`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is the empty string.
    #[error("idempotency key is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`].
    #[error("idempotency key is {len} characters long; at most {max} are allowed", max = MAX_KEY_LEN)]
    TooLong {
        /// The length of the rejected key, in bytes.
        len: usize,
    },
    /// The key holds a byte outside visible ASCII (`0x21..=0x7E`): a space, a control
    /// character or a non-ASCII character.
    #[error("idempotency key has a character that is not visible ASCII at byte {position}")]
    InvalidCharacter {
        /// The byte offset of the first offending character.
        position: usize,
    },
    /// Content could not be serialized to derive a key from it.
    #[error("cannot derive an idempotency key from content: {0}")]
    Content(String),
}

/// A client-chosen name for one operation: 1 to 255 visible ASCII characters.
///
/// Cloning is cheap (the text is shared).
///
/// ```
/// use oncely::IdempotencyKey;
///
/// let key = IdempotencyKey::new("8e03978e-40d5-43e8-bc93-6894a57f9324")?;
/// assert_eq!(key.as_str(), "8e03978e-40d5-43e8-bc93-6894a57f9324");
///
/// assert!(IdempotencyKey::new("").is_err());
/// assert!(IdempotencyKey::new("has space").is_err());
/// assert!(IdempotencyKey::new("é").is_err());
/// # Ok::<(), oncely::KeyError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    /// Validates `key` and wraps it.
    ///
    /// # Errors
    /// [`KeyError`] when the key is empty, longer than [`MAX_KEY_LEN`], or holds anything
    /// but visible ASCII.
    pub fn new(key: impl AsRef<str>) -> Result<Self, KeyError> {
        let key = key.as_ref();
        validate(key)?;
        Ok(Self(Arc::from(key)))
    }

    /// A fresh random key (UUID version 4), the kind a client generates per intent.
    ///
    /// ```
    /// let a = oncely::IdempotencyKey::uuid_v4();
    /// let b = oncely::IdempotencyKey::uuid_v4();
    /// assert_ne!(a, b);
    /// assert_eq!(a.as_str().len(), 36);
    /// ```
    pub fn uuid_v4() -> Self {
        Self(Arc::from(uuid::Uuid::new_v4().hyphenated().to_string()))
    }

    /// A fresh time-ordered key (UUID version 7): sorts by creation time, which keeps
    /// B-tree indexes of stores that index raw keys compact.
    pub fn uuid_v7() -> Self {
        Self(Arc::from(uuid::Uuid::now_v7().hyphenated().to_string()))
    }

    /// A key built from the parts that identify an intent, joined with `:`, like the
    /// seeds' `generateKey('payment', userId, amount)`.
    ///
    /// ```
    /// use oncely::IdempotencyKey;
    ///
    /// let key = IdempotencyKey::from_parts(&[&"payment", &42, &"1999"])?;
    /// assert_eq!(key.as_str(), "payment:42:1999");
    /// # Ok::<(), oncely::KeyError>(())
    /// ```
    ///
    /// # Errors
    /// [`KeyError`] when the joined key is not valid (a part with a space, say, or too long).
    pub fn from_parts(parts: &[&dyn fmt::Display]) -> Result<Self, KeyError> {
        let mut key = String::new();
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                key.push(':');
            }
            fmt::write(&mut key, format_args!("{part}")).map_err(|e| KeyError::Content(e.to_string()))?;
        }
        Self::new(key)
    }

    /// A key derived from request content: `namespace:` followed by the hex SHA-256 of
    /// the content's canonical JSON (see [`Fingerprint::from_serialize`](crate::Fingerprint::from_serialize)).
    ///
    /// This is the seeds' "request fingerprinting" pattern, for callers whose clients send
    /// no key: two requests with equal content get the same key, so an accidental
    /// resubmission is caught. It also means two *intended* identical operations collapse
    /// into one; prefer client-generated keys where the client can send one.
    ///
    /// ```
    /// use oncely::IdempotencyKey;
    /// use serde_json::json;
    ///
    /// let a = IdempotencyKey::from_content("order", &json!({"sku": "A1", "qty": 2}))?;
    /// let b = IdempotencyKey::from_content("order", &json!({"qty": 2, "sku": "A1"}))?;
    /// assert_eq!(a, b);
    /// assert!(a.as_str().starts_with("order:"));
    /// # Ok::<(), oncely::KeyError>(())
    /// ```
    ///
    /// # Errors
    /// [`KeyError::Content`] when `content` does not serialize; [`KeyError`] when
    /// `namespace` makes the key invalid.
    pub fn from_content<T: Serialize + ?Sized>(namespace: &str, content: &T) -> Result<Self, KeyError> {
        let fingerprint = crate::Fingerprint::from_serialize(content).map_err(|e| KeyError::Content(e.to_string()))?;
        Self::new(format!("{namespace}:{}", fingerprint.to_hex()))
    }

    /// The key as the client sent it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong { len: key.len() });
    }
    // Every key is checked on every request: the test is a fold without an early exit,
    // which the compiler turns into a few vector instructions per 16 or 32 bytes; only a
    // key that fails is searched for its first bad byte.
    let visible = |b: u8| b.wrapping_sub(0x21) <= 0x7e - 0x21;
    if !key.bytes().fold(true, |all, b| all & visible(b)) {
        let position = key.bytes().position(|b| !visible(b)).unwrap_or_default();
        return Err(KeyError::InvalidCharacter { position });
    }
    Ok(())
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotencyKey").field(&&*self.0).finish()
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for IdempotencyKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<&str> for IdempotencyKey {
    type Error = KeyError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = KeyError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

/// Who owns a key: a tenant, a user, an API credential. Records of two scopes never mix,
/// so two principals that happen to send the same key get two operations.
///
/// The scope is free text (the HTTP layer uses a hash of the configured principal
/// headers). [`Scope::global`] is the empty scope, for callers with one principal.
///
/// ```
/// use oncely::{IdempotencyKey, Scope, StorageKey};
///
/// let key = IdempotencyKey::new("k-1")?;
/// let alice = StorageKey::derive(&Scope::new("alice"), &key);
/// let bob = StorageKey::derive(&Scope::new("bob"), &key);
/// assert_ne!(alice, bob);
/// # Ok::<(), oncely::KeyError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Scope(Arc<str>);

impl Scope {
    /// A scope named `name`.
    pub fn new(name: impl AsRef<str>) -> Self {
        Self(Arc::from(name.as_ref()))
    }

    /// The empty scope shared by every caller that names none.
    pub fn global() -> Self {
        Self::default()
    }

    /// The scope's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Scope").field(&&*self.0).finish()
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The 32-byte key a store indexes a record by: SHA-256 over the scope and the key,
/// each length-prefixed so that no two (scope, key) pairs share an input.
///
/// Displays as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageKey([u8; 32]);

/// A map keyed by storage key, as the engine and the memory store keep them. A storage
/// key is a SHA-256 digest; hashing it again with SipHash, the standard map's hasher,
/// cost some 270 instructions a look-up, and a replay from memory makes two (its record,
/// its hit count; `bench/instructions.sh`). foldhash (hashbrown's default hasher) does it
/// in a few dozen. Its per-map seed (from addresses and the time, not the OS's random
/// source) gives only minimal resistance to crafted collisions, which is enough here: a
/// client chooses keys, not digests, and could steer a digest only by brute force over
/// SHA-256 against a seed it does not know.
pub(crate) type KeyMap<V> = std::collections::HashMap<StorageKey, V, foldhash::quality::RandomState>;

impl StorageKey {
    /// Derives the storage key of `key` in `scope`.
    pub fn derive(scope: &Scope, key: &IdempotencyKey) -> Self {
        Self::derive_raw(scope.as_str(), key.as_str())
    }

    /// Derives a storage key from any scope and key text; [`StorageKey::derive`] is this
    /// for validated keys. Message dedup ids (which need not be idempotency keys) use it.
    pub fn derive_raw(scope: &str, key: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update((scope.len() as u64).to_be_bytes());
        hasher.update(scope.as_bytes());
        hasher.update((key.len() as u64).to_be_bytes());
        hasher.update(key.as_bytes());
        Self(hasher.finalize().into())
    }

    /// Wraps 32 bytes read back from a store.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        Hex32::new(&self.0).as_str().to_owned()
    }

    /// Parses 64 hex digits back into a storage key (for admin tools).
    pub fn from_hex(hex: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    /// The first eight bytes as a number: the digest is uniform, so this is a good hash
    /// for sharding without hashing again.
    pub fn prefix_u64(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(b)
    }
}

impl fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorageKey({})", Hex32::new(&self.0).as_str())
    }
}

impl fmt::Display for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Hex32::new(&self.0).as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_visible_ascii_up_to_255() {
        let longest = "k".repeat(MAX_KEY_LEN);
        assert!(IdempotencyKey::new(&longest).is_ok());
        assert!(IdempotencyKey::new("!~azAZ09-_.:").is_ok());
    }

    #[test]
    fn rejects_bad_keys_with_typed_errors() {
        assert_eq!(IdempotencyKey::new(""), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::new("k".repeat(256)), Err(KeyError::TooLong { len: 256 }));
        assert_eq!(IdempotencyKey::new("a b"), Err(KeyError::InvalidCharacter { position: 1 }));
        assert_eq!(IdempotencyKey::new("ab\t"), Err(KeyError::InvalidCharacter { position: 2 }));
        assert_eq!(IdempotencyKey::new("\u{7f}"), Err(KeyError::InvalidCharacter { position: 0 }));
        assert_eq!(IdempotencyKey::new("ké"), Err(KeyError::InvalidCharacter { position: 1 }));
    }

    /// Each ASCII byte, at the start, inside and at the end of keys of several lengths
    /// (the check works in vector-sized strides, then a tail): accepted exactly when it is
    /// visible ASCII, and refused at its position.
    #[test]
    fn every_byte_is_judged_at_every_stride_position() {
        for len in [1, 15, 16, 17, 31, 32, 33, 64, 255] {
            for at in [0, len / 2, len - 1] {
                // ASCII: the other bytes are not a `&str` alone ("ké" above covers them).
                for byte in 0..=0x7f_u8 {
                    let mut key = "k".repeat(len);
                    key.replace_range(at..=at, char::from(byte).encode_utf8(&mut [0; 4]));
                    let result = validate(&key);
                    let expected = if (0x21..=0x7e).contains(&byte) {
                        Ok(())
                    } else {
                        Err(KeyError::InvalidCharacter { position: at })
                    };
                    assert_eq!(result, expected, "byte {byte:#04x} at {at} of {len}");
                }
            }
        }
    }

    #[test]
    fn from_parts_rejects_what_new_rejects() {
        assert!(IdempotencyKey::from_parts(&[&"a b"]).is_err());
        assert_eq!(IdempotencyKey::from_parts(&[&"x"]).map(|k| k.to_string()), Ok("x".into()));
    }

    #[test]
    fn storage_key_separates_scope_from_key() {
        // Without length prefixes, ("ab", "c") and ("a", "bc") would collide.
        assert_ne!(StorageKey::derive_raw("ab", "c"), StorageKey::derive_raw("a", "bc"));
        let k = StorageKey::derive_raw("s", "k");
        assert_eq!(StorageKey::from_hex(&k.to_hex()), Some(k));
        assert_eq!(StorageKey::from_hex("zz"), None);
        assert_eq!(k.to_hex(), hex::encode(k.as_bytes()), "64 lowercase digits");
        assert_eq!(k.to_string(), k.to_hex());
        assert_eq!(format!("{k:?}"), format!("StorageKey({})", k.to_hex()));
    }

    #[test]
    fn uuid_keys_are_valid_keys() {
        assert!(IdempotencyKey::new(IdempotencyKey::uuid_v4().as_str()).is_ok());
        assert!(IdempotencyKey::new(IdempotencyKey::uuid_v7().as_str()).is_ok());
    }
}
