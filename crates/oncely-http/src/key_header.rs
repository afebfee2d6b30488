//! Reading the `Idempotency-Key` header.
//!
//! The IETF draft (draft-ietf-httpapi-idempotency-key-header) makes the field an RFC 9651
//! Item whose value is a String: `Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`.
//! Stripe's clients send the key bare: `Idempotency-Key: 8e03978e-40d5-…`. Both are
//! accepted and mean the same key.

use http::{HeaderMap, HeaderName};
use oncely::{IdempotencyKey, KeyError};

/// Why the key field was refused (each is a 400 with an `invalid-key` problem).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyHeaderError {
    /// The field appears more than once, or holds a list.
    #[error("the idempotency key field must appear once, with one value")]
    Multiple,
    /// The value starts like an sf-string but is not a well-formed one (or has parameters).
    #[error("the idempotency key is not a well-formed structured-field string")]
    Malformed,
    /// The value is not an acceptable key.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Reads the key from `headers`: `Ok(None)` when the field is absent.
///
/// ```
/// use http::{HeaderMap, HeaderName, HeaderValue};
/// use oncely_http::parse_key_header;
///
/// let name = HeaderName::from_static("idempotency-key");
/// let mut headers = HeaderMap::new();
/// headers.insert(&name, HeaderValue::from_static("\"8e03-a\""));
/// let quoted = parse_key_header(&headers, &name).unwrap().unwrap();
/// headers.insert(&name, HeaderValue::from_static("8e03-a"));
/// let bare = parse_key_header(&headers, &name).unwrap().unwrap();
/// assert_eq!(quoted, bare);
/// ```
///
/// # Errors
/// [`KeyHeaderError`] for two fields, a malformed sf-string, or an invalid key (empty,
/// over 255 characters, not visible ASCII).
pub fn parse_key_header(headers: &HeaderMap, name: &HeaderName) -> Result<Option<IdempotencyKey>, KeyHeaderError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(KeyHeaderError::Multiple);
    }
    let raw = value.as_bytes();
    let trimmed = raw.trim_ascii();
    if trimmed.first() == Some(&b'"') {
        let item: sfv::Item = sfv::Parser::new(trimmed).parse().map_err(|_| {
            // `"a", "b"` parses as a list, not an item: say so rather than "malformed".
            if sfv::Parser::new(trimmed).parse::<sfv::List>().is_ok_and(|list| list.len() > 1) {
                KeyHeaderError::Multiple
            } else {
                KeyHeaderError::Malformed
            }
        })?;
        let Some(text) = item.bare_item.as_string() else { return Err(KeyHeaderError::Malformed) };
        if !item.params.is_empty() {
            return Err(KeyHeaderError::Malformed);
        }
        return Ok(Some(IdempotencyKey::new(text.as_str())?));
    }
    if trimmed.contains(&b',') {
        return Err(KeyHeaderError::Multiple);
    }
    let text = std::str::from_utf8(trimmed).map_err(|e| KeyError::InvalidCharacter { position: e.valid_up_to() })?;
    Ok(Some(IdempotencyKey::new(text)?))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn parse(values: &[&[u8]]) -> Result<Option<IdempotencyKey>, KeyHeaderError> {
        let name = HeaderName::from_static("idempotency-key");
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(&name, HeaderValue::from_bytes(value).expect("test header value"));
        }
        parse_key_header(&headers, &name)
    }

    fn key(text: &str) -> Option<IdempotencyKey> {
        Some(IdempotencyKey::new(text).expect("valid"))
    }

    #[test]
    fn sf_string_and_bare_token_mean_the_same_key() {
        assert_eq!(parse(&[b"\"abc-123\""]), Ok(key("abc-123")));
        assert_eq!(parse(&[b"abc-123"]), Ok(key("abc-123")));
        assert_eq!(parse(&[b"  abc-123 "]), Ok(key("abc-123")));
        assert_eq!(parse(&[b"\"a\\\"b\""]), Ok(key("a\"b")), "sf-string escapes are decoded");
        assert_eq!(parse(&[]), Ok(None));
    }

    #[test]
    fn bad_fields_are_typed_errors() {
        assert_eq!(parse(&[b"\"\""]), Err(KeyHeaderError::Key(KeyError::Empty)));
        assert_eq!(parse(&[b""]), Err(KeyHeaderError::Key(KeyError::Empty)));
        assert!(matches!(parse(&[&[b'k'; 256]]), Err(KeyHeaderError::Key(KeyError::TooLong { .. }))));
        assert!(matches!(parse(&[b"a\tb"]), Err(KeyHeaderError::Key(KeyError::InvalidCharacter { .. }))));
        assert!(matches!(parse(&[b"\"a b\""]), Err(KeyHeaderError::Key(KeyError::InvalidCharacter { .. }))));
        assert!(matches!(parse(&[b"caf\xc3\xa9"]), Err(KeyHeaderError::Key(KeyError::InvalidCharacter { .. }))));
        assert_eq!(parse(&[b"\"unterminated"]), Err(KeyHeaderError::Malformed));
        assert_eq!(parse(&[b"\"k\";p=1"]), Err(KeyHeaderError::Malformed));
        assert_eq!(parse(&[b"\"a\", \"b\""]), Err(KeyHeaderError::Multiple));
        assert_eq!(parse(&[b"a,b"]), Err(KeyHeaderError::Multiple));
        assert_eq!(parse(&[b"a", b"b"]), Err(KeyHeaderError::Multiple));
    }
}
