//! Where a call's key comes from, and how it is written into the header.

use std::fmt;
use std::sync::Arc;

use http::HeaderValue;
use oncely::{Fingerprint, IdempotencyKey, KeyError};

/// How the key is written in the header field.
///
/// The IETF draft (draft-ietf-httpapi-idempotency-key-header) makes the field a
/// structured-field string, `Idempotency-Key: "0190…"`; Stripe's API and many others take
/// the key bare, `Idempotency-Key: 0190…`. Oncely's server side takes both. A server that
/// takes only one form needs that one: a strict structured-field parser refuses a bare
/// UUID (a token cannot start with a digit), and a server that reads the field as plain
/// text keeps the quotes as part of the key (harmless while every retry sends the same
/// quotes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyFormat {
    /// `"key"`, with `\` and `"` escaped: the draft's form (the default).
    #[default]
    SfString,
    /// `key`, as is: what Stripe's clients send.
    Token,
}

/// Writes `key` into a header value in `format`.
///
/// ```
/// use oncely::IdempotencyKey;
/// use oncely_client::{KeyFormat, encode_key};
///
/// let key = IdempotencyKey::new("0190-a")?;
/// assert_eq!(encode_key(&key, KeyFormat::SfString)?, "\"0190-a\"");
/// assert_eq!(encode_key(&key, KeyFormat::Token)?, "0190-a");
/// # Ok::<(), oncely::KeyError>(())
/// ```
///
/// # Errors
/// Never for a valid [`IdempotencyKey`] (visible ASCII is always a valid field value);
/// the `Result` guards the conversion rather than assuming it.
pub fn encode_key(key: &IdempotencyKey, format: KeyFormat) -> Result<HeaderValue, KeyError> {
    let text = key.as_str();
    let value = match format {
        KeyFormat::Token => HeaderValue::from_str(text),
        KeyFormat::SfString => {
            let mut quoted = String::with_capacity(text.len() + 2);
            quoted.push('"');
            for c in text.chars() {
                if c == '"' || c == '\\' {
                    quoted.push('\\');
                }
                quoted.push(c);
            }
            quoted.push('"');
            HeaderValue::from_str(&quoted)
        }
    };
    value.map_err(|_| KeyError::InvalidCharacter { position: 0 })
}

/// Reads a key from a header value in either form (an sf-string or a bare key), as
/// Oncely's server does. For keys a caller put in the header itself.
///
/// # Errors
/// [`KeyError`] when the value is not a valid key, or starts like an sf-string but is not
/// a well-formed one.
pub fn decode_key(value: &HeaderValue) -> Result<IdempotencyKey, KeyError> {
    let raw = value.as_bytes().trim_ascii();
    if raw.first() == Some(&b'"') {
        let malformed = || KeyError::Content("not a well-formed structured-field string".into());
        let item: sfv::Item = sfv::Parser::new(raw).parse().map_err(|_| malformed())?;
        let text = item.bare_item.as_string().ok_or_else(malformed)?;
        if !item.params.is_empty() {
            return Err(malformed());
        }
        return IdempotencyKey::new(text.as_str());
    }
    let text = std::str::from_utf8(raw).map_err(|e| KeyError::InvalidCharacter { position: e.valid_up_to() })?;
    IdempotencyKey::new(text)
}

/// A short, one-way name for a key, for logs and spans: the first 16 hex digits of its
/// SHA-256. The raw key never goes to a log. (A key built from guessable parts, such as
/// `payment:42`, can be guessed from its hash; a UUID cannot.)
///
/// ```
/// let key = oncely::IdempotencyKey::new("k-1")?;
/// assert_eq!(oncely_client::key_hash(&key).len(), 16);
/// # Ok::<(), oncely::KeyError>(())
/// ```
pub fn key_hash(key: &IdempotencyKey) -> String {
    let mut hex = Fingerprint::from_bytes(key.as_str().as_bytes()).to_hex();
    hex.truncate(16);
    hex
}

/// A function that derives a key from the request.
pub type KeyFn = dyn Fn(&reqwest::Request) -> Result<IdempotencyKey, KeyError> + Send + Sync;

/// Where a call's key comes from when the caller gave none (neither in the header nor as
/// an extension).
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum KeySource {
    /// A fresh UUID version 7 per logical call (the default): unique, and time-ordered,
    /// which keeps the indexes of stores that index raw keys compact.
    #[default]
    UuidV7,
    /// A fresh random UUID version 4 per logical call.
    UuidV4,
    /// Derived from the request's content: `namespace:` and the hex SHA-256 of the method,
    /// the URL and the body (JSON bodies canonicalised, so a re-serialised body gives the
    /// same key). Two identical requests then share one key, so an accidental
    /// resubmission is caught, and two *intended* identical operations collapse into one.
    /// A streamed body has no content to derive from: the call fails with a key error.
    FromContent {
        /// The key's prefix, naming the kind of operation (`"order"`).
        namespace: Arc<str>,
    },
    /// Any function of the request.
    Custom(Arc<KeyFn>),
}

impl KeySource {
    /// [`KeySource::FromContent`] with this namespace.
    pub fn from_content(namespace: impl Into<Arc<str>>) -> Self {
        Self::FromContent { namespace: namespace.into() }
    }

    /// [`KeySource::Custom`] with this function.
    pub fn custom(f: impl Fn(&reqwest::Request) -> Result<IdempotencyKey, KeyError> + Send + Sync + 'static) -> Self {
        Self::Custom(Arc::new(f))
    }

    /// A key for `request`.
    ///
    /// # Errors
    /// [`KeyError`] from a custom function, or when a content key cannot be derived (a
    /// streamed body, a namespace that makes the key invalid).
    pub fn key_for(&self, request: &reqwest::Request) -> Result<IdempotencyKey, KeyError> {
        match self {
            Self::UuidV7 => Ok(IdempotencyKey::uuid_v7()),
            Self::UuidV4 => Ok(IdempotencyKey::uuid_v4()),
            Self::FromContent { namespace } => content_key(namespace, request),
            Self::Custom(f) => f(request),
        }
    }
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UuidV7 => f.write_str("UuidV7"),
            Self::UuidV4 => f.write_str("UuidV4"),
            Self::FromContent { namespace } => f.debug_struct("FromContent").field("namespace", namespace).finish(),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

fn content_key(namespace: &str, request: &reqwest::Request) -> Result<IdempotencyKey, KeyError> {
    let body: &[u8] = match request.body() {
        None => b"",
        Some(body) => body
            .as_bytes()
            .ok_or_else(|| KeyError::Content("the body is streamed, so no key can be derived from it".into()))?,
    };
    let is_json = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")));
    let body_print = match is_json {
        true => Fingerprint::from_json(body).unwrap_or_else(|_| Fingerprint::from_bytes(body)),
        false => Fingerprint::from_bytes(body),
    };
    let body_hex = body_print.to_hex();
    let whole = Fingerprint::from_parts(&[
        request.method().as_str().as_bytes(),
        request.url().as_str().as_bytes(),
        body_hex.as_bytes(),
    ]);
    IdempotencyKey::new(format!("{namespace}:{}", whole.to_hex()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> IdempotencyKey {
        IdempotencyKey::new(text).expect("valid key")
    }

    #[test]
    fn sf_string_and_token_forms() {
        assert_eq!(encode_key(&key("abc-123"), KeyFormat::SfString).expect("encodes"), "\"abc-123\"");
        assert_eq!(encode_key(&key("abc-123"), KeyFormat::Token).expect("encodes"), "abc-123");
        // sf-string escapes the two characters it must.
        assert_eq!(encode_key(&key(r#"a"b\c"#), KeyFormat::SfString).expect("encodes"), r#""a\"b\\c""#);
        assert_eq!(KeyFormat::default(), KeyFormat::SfString);
    }

    #[test]
    fn what_is_encoded_decodes_to_the_same_key_in_both_forms() {
        for text in ["0190f3c1-7a2b-7c3d-8e4f-a1b2c3d4e5f6", r#"a"b\c"#, "payment:42:1999", "~!#$%&'*+-.^_`|"] {
            for format in [KeyFormat::SfString, KeyFormat::Token] {
                let value = encode_key(&key(text), format).expect("encodes");
                assert_eq!(decode_key(&value), Ok(key(text)), "{text} as {format:?}");
            }
        }
    }

    #[test]
    fn what_the_server_reads_is_what_the_client_sent() {
        let name = http::HeaderName::from_static("idempotency-key");
        for text in ["0190f3c1-7a2b", r#"q"uote\d"#] {
            for format in [KeyFormat::SfString, KeyFormat::Token] {
                let mut headers = http::HeaderMap::new();
                headers.insert(&name, encode_key(&key(text), format).expect("encodes"));
                let read = oncely_http::parse_key_header(&headers, &name).expect("server parses").expect("present");
                assert_eq!(read, key(text), "{text} as {format:?}");
            }
        }
    }

    #[test]
    fn bad_header_values_are_key_errors() {
        assert!(decode_key(&HeaderValue::from_static("\"unterminated")).is_err());
        assert!(decode_key(&HeaderValue::from_static("\"k\";p=1")).is_err());
        assert_eq!(decode_key(&HeaderValue::from_static("")), Err(KeyError::Empty));
        assert!(decode_key(&HeaderValue::from_static("a b")).is_err());
    }

    #[test]
    fn key_hash_is_short_stable_and_not_the_key() {
        let k = key("0190f3c1-7a2b-7c3d-8e4f-a1b2c3d4e5f6");
        assert_eq!(key_hash(&k), key_hash(&k));
        assert_ne!(key_hash(&k), key_hash(&key("other")));
        assert!(!key_hash(&k).contains("0190"));
        assert!(key_hash(&k).bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn generated_keys() {
        let request = reqwest::Request::new(http::Method::POST, "http://127.0.0.1/p".parse().expect("url"));
        let a = KeySource::UuidV7.key_for(&request).expect("key");
        let b = KeySource::UuidV7.key_for(&request).expect("key");
        assert_ne!(a, b);
        assert_eq!(a.as_str().as_bytes()[14], b'7', "a version 7 UUID");
        assert_eq!(KeySource::UuidV4.key_for(&request).expect("key").as_str().as_bytes()[14], b'4');
        let custom = KeySource::custom(|r| IdempotencyKey::from_parts(&[&"order", &r.url().path()]));
        assert_eq!(custom.key_for(&request).expect("key").as_str(), "order:/p");
    }

    #[test]
    fn content_keys_follow_the_content_and_canonical_json() {
        let build = |body: &'static str, path: &str| {
            let mut r =
                reqwest::Request::new(http::Method::POST, format!("http://127.0.0.1{path}").parse().expect("url"));
            r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            *r.body_mut() = Some(reqwest::Body::from(body));
            r
        };
        let source = KeySource::from_content("order");
        let a = source.key_for(&build(r#"{"sku":"A1","qty":2}"#, "/orders")).expect("key");
        let b = source.key_for(&build(r#"{ "qty": 2, "sku": "A1" }"#, "/orders")).expect("key");
        let c = source.key_for(&build(r#"{"sku":"A1","qty":3}"#, "/orders")).expect("key");
        let d = source.key_for(&build(r#"{"sku":"A1","qty":2}"#, "/other")).expect("key");
        assert_eq!(a, b, "re-serialised JSON gives the same key");
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert!(a.as_str().starts_with("order:"));
    }
}
