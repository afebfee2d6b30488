//! What the layer derives from a request: its fingerprint, and a key carried in its body.

use http::request::Parts;
use http::{HeaderName, HeaderValue, header};
use oncely::fingerprint::{FindError, JsonPointer};
use oncely::{Fingerprint, IdempotencyKey, KeyError};

/// The fingerprint of a request: method, path and query, media type and body.
///
/// A JSON body (`application/json` or any `+json` type) is canonicalised first (see
/// [`Fingerprint::from_json`]), so a client that re-serialises its retry with other key
/// order or whitespace still matches. A body that claims JSON but does not parse is
/// hashed as raw bytes: a false mismatch (422) is safe, a false match would not be.
///
/// The media type is the `Content-Type` in a normal form (RFC 9110 §8.3.1): type,
/// subtype and parameter names lowercased, parameters sorted, quoted values unquoted,
/// `charset` values lowercased, and `charset=utf-8` dropped from JSON types (UTF-8 is
/// JSON's only encoding). So `application/json`, `Application/JSON;charset=UTF-8` and
/// `application/json; charset="utf-8"` match, and `a=1; b=2` matches `b=2;a=1`;
/// another type, or another value of any other parameter, does not. A parameter list
/// that does not parse (or names a parameter twice) is kept as it came, after the type.
///
/// A body sent with `Content-Encoding: gzip` (or `x-gzip`) is fingerprinted decoded, so
/// a retry compressed again (another timestamp or level in the gzip header) still
/// matches, and so does the same body sent uncompressed. Decoding stops past
/// `max_decoded_body` bytes: a small body that inflates beyond it (a zip bomb) is
/// refused rather than expanded. A body that is not valid gzip, or another encoding, is
/// hashed as it came.
///
/// This is CPU work proportional to the body (linear, never recursive): the layer runs it
/// off the async worker threads for bodies over 32 KiB.
///
/// This is [`request_fingerprint_with`] with no [`FingerprintRules`].
///
/// ```
/// use http::Request;
/// use oncely_http::request_fingerprint;
///
/// let head = |ct: &str| Request::post("/payments").header("content-type", ct).body(()).unwrap().into_parts().0;
/// let a = request_fingerprint(&head("application/json"), br#"{"amount":1,"currency":"eur"}"#, 1 << 20)?;
/// let b = request_fingerprint(&head("application/json; charset=utf-8"), br#"{ "currency": "eur", "amount": 1 }"#, 1 << 20)?;
/// assert_eq!(a, b);
/// # Ok::<(), oncely_http::DecodedBodyTooLarge>(())
/// ```
///
/// # Errors
/// [`DecodedBodyTooLarge`] when a gzip body decodes to more than `max_decoded_body` bytes.
pub fn request_fingerprint(
    parts: &Parts,
    body: &[u8],
    max_decoded_body: usize,
) -> Result<Fingerprint, DecodedBodyTooLarge> {
    request_fingerprint_with(parts, body, max_decoded_body, &FingerprintRules::NONE)
}

/// What a route adds to, or leaves out of, its requests' fingerprints, beyond method,
/// path and query, media type and body. The default is nothing either way.
///
/// - `ignore`: members of a JSON body that do not count, named by JSON pointers
///   (RFC 6901), for senders whose retries change them: a webhook's `sent_at`, a queue
///   message's delivery attempt. See [`Fingerprint::from_json_ignoring`] for what the
///   pointers mean; bodies that are not JSON are unaffected.
/// - `headers`: request headers whose values count too (`X-Api-Version`, say): every
///   field of each name, in the order received. A header that is absent and one that is
///   present but empty differ. The names' order and repeats in the list do not matter.
///
/// A request that has none of the ignored members and none of the headers keeps the
/// fingerprint it has without rules, so adding rules to a route does not turn retries
/// of such requests into mismatches.
///
/// ```
/// use http::{HeaderName, Request};
/// use oncely_http::{FingerprintRules, request_fingerprint_with};
///
/// let rules = FingerprintRules {
///     ignore: vec!["/metadata/sent_at".parse()?],
///     headers: vec![HeaderName::from_static("x-api-version")],
/// };
/// let request = |version: &str, body: &'static [u8]| {
///     let head = Request::post("/hooks")
///         .header("content-type", "application/json")
///         .header("x-api-version", version)
///         .body(())
///         .unwrap()
///         .into_parts()
///         .0;
///     request_fingerprint_with(&head, body, 1 << 20, &rules).unwrap()
/// };
/// let first = request("2024-06-01", br#"{"id":"evt_1","metadata":{"sent_at":"12:00"}}"#);
/// let retry = request("2024-06-01", br#"{"id":"evt_1","metadata":{"sent_at":"12:05"}}"#);
/// let upgraded = request("2025-01-01", br#"{"id":"evt_1","metadata":{"sent_at":"12:00"}}"#);
/// assert_eq!(first, retry);
/// assert_ne!(first, upgraded);
/// # Ok::<(), oncely::fingerprint::JsonPointerError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FingerprintRules {
    /// JSON body members left out of the fingerprint.
    pub ignore: Vec<JsonPointer>,
    /// Request headers whose values are part of the fingerprint.
    pub headers: Vec<HeaderName>,
}

impl FingerprintRules {
    /// No rules: what [`request_fingerprint`] uses.
    const NONE: Self = Self { ignore: Vec::new(), headers: Vec::new() };
}

/// [`request_fingerprint`] with `rules`: some JSON body members left out, some request
/// headers' values taken in.
///
/// The example at [`FingerprintRules`] shows both.
///
/// # Errors
/// [`DecodedBodyTooLarge`] when a gzip body decodes to more than `max_decoded_body` bytes.
pub fn request_fingerprint_with(
    parts: &Parts,
    body: &[u8],
    max_decoded_body: usize,
    rules: &FingerprintRules,
) -> Result<Fingerprint, DecodedBodyTooLarge> {
    fingerprint_gzip_known(parts, is_gzip(parts), body, max_decoded_body, rules)
}

/// [`request_fingerprint_with`] for a caller that has already read whether the body is
/// gzip ([`is_gzip`]), so that the header is looked up once per request.
pub(crate) fn fingerprint_gzip_known(
    parts: &Parts,
    gzip: bool,
    body: &[u8],
    max_decoded_body: usize,
    rules: &FingerprintRules,
) -> Result<Fingerprint, DecodedBodyTooLarge> {
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let media_type =
        parts.headers.get(header::CONTENT_TYPE).map(|v| MediaType::parse(v.as_bytes())).unwrap_or_default();
    let decoded = if gzip { gunzip(body, max_decoded_body)? } else { None };
    let body = decoded.as_deref().unwrap_or(body);
    let canonical = if media_type.is_json() { Fingerprint::from_json_ignoring(body, &rules.ignore).ok() } else { None };
    let body_part: &[u8] = match &canonical {
        Some(json) => json.as_bytes(),
        None => body,
    };
    let kind: &[u8] = if canonical.is_some() { b"json" } else { b"raw" };
    let mut names: Vec<&HeaderName> = rules.headers.iter().collect();
    names.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    // Each header present adds its name, its number of fields and their values, so the
    // parts read back one way only; an absent one adds nothing.
    let present: Vec<(&HeaderName, [u8; 8])> = names
        .into_iter()
        .filter_map(|name| {
            let count = parts.headers.get_all(name).iter().count() as u64;
            (count > 0).then_some((name, count.to_be_bytes()))
        })
        .collect();
    let head: [&[u8]; 5] =
        [parts.method.as_str().as_bytes(), path_and_query.as_bytes(), &media_type.text, kind, body_part];
    if present.is_empty() {
        // No header covered (the default): the five parts alone, without a vector.
        return Ok(Fingerprint::from_parts(&head));
    }
    let mut fields: Vec<&[u8]> = head.to_vec();
    for (name, count) in &present {
        fields.push(name.as_str().as_bytes());
        fields.push(count);
        fields.extend(parts.headers.get_all(*name).iter().map(HeaderValue::as_bytes));
    }
    Ok(Fingerprint::from_parts(&fields))
}

/// A `Content-Type` value in the normal form the fingerprint hashes.
#[derive(Debug, Default, PartialEq, Eq)]
struct MediaType {
    /// `type/subtype`, then `;name=value` for each parameter kept, sorted by name; or,
    /// when the parameters do not parse, `type/subtype`, a NUL (which no header value
    /// holds) and the parameters as they came.
    text: Vec<u8>,
    /// The length of `type/subtype` in `text`.
    essence: usize,
}

impl MediaType {
    /// Normalises a `Content-Type` value (RFC 9110 §8.3.1). Without parameters, or with
    /// only a `charset=utf-8` on a JSON type, the result is the lowercased type alone:
    /// what earlier versions hashed, so their stored fingerprints still match.
    fn parse(value: &[u8]) -> Self {
        let (essence, params) = match value.iter().position(|&b| b == b';') {
            Some(semicolon) => (&value[..semicolon], &value[semicolon + 1..]),
            None => (value, &b""[..]),
        };
        let mut text = essence.trim_ascii().to_ascii_lowercase();
        let essence = text.len();
        let is_json = Self::json_essence(&text);
        match parse_parameters(params) {
            Some(mut params) => {
                if is_json {
                    params.retain(|(name, value)| !(name == b"charset" && value == b"utf-8"));
                }
                for (name, value) in params {
                    text.push(b';');
                    text.extend_from_slice(&name);
                    text.push(b'=');
                    if !value.is_empty() && value.iter().copied().all(is_tchar) {
                        text.extend_from_slice(&value);
                    } else {
                        text.push(b'"');
                        for byte in value {
                            if matches!(byte, b'"' | b'\\') {
                                text.push(b'\\');
                            }
                            text.push(byte);
                        }
                        text.push(b'"');
                    }
                }
            }
            None => {
                text.push(0);
                text.extend_from_slice(params.trim_ascii());
            }
        }
        Self { text, essence }
    }

    fn json_essence(essence: &[u8]) -> bool {
        essence == b"application/json" || essence.ends_with(b"+json")
    }

    fn is_json(&self) -> bool {
        Self::json_essence(&self.text[..self.essence])
    }
}

/// The parameters after a media type's first `;`, names lowercased (and `charset`
/// values, which are case-insensitive), quoted values unquoted, sorted by name; `None`
/// when they do not follow the grammar or name a parameter twice (recipients disagree
/// on which one counts).
fn parse_parameters(mut rest: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut params = Vec::new();
    loop {
        // parameters = *( OWS ";" OWS [ parameter ] ): empty ones are allowed.
        rest = rest.trim_ascii_start();
        if let [b';', tail @ ..] = rest {
            rest = tail;
            continue;
        }
        if rest.is_empty() {
            break;
        }
        let name_len = rest.iter().position(|&b| !is_tchar(b)).unwrap_or(rest.len());
        let (name, tail) = rest.split_at(name_len);
        let [b'=', tail @ ..] = tail else { return None };
        if name.is_empty() {
            return None;
        }
        let mut value = Vec::new();
        rest = if let Some(mut quoted) = tail.strip_prefix(b"\"") {
            // quoted-string: `\` escapes the next byte; an unclosed quote fails.
            loop {
                match quoted {
                    [b'"', after @ ..] => break after,
                    [b'\\', escaped, after @ ..] => {
                        value.push(*escaped);
                        quoted = after;
                    }
                    [b'\\'] | [] => return None,
                    [byte, after @ ..] => {
                        value.push(*byte);
                        quoted = after;
                    }
                }
            }
        } else {
            let len = tail.iter().position(|&b| !is_tchar(b)).unwrap_or(tail.len());
            if len == 0 {
                return None;
            }
            value.extend_from_slice(&tail[..len]);
            &tail[len..]
        };
        rest = rest.trim_ascii_start();
        if !matches!(rest.first(), None | Some(b';')) {
            return None;
        }
        let name = name.to_ascii_lowercase();
        if name == b"charset" {
            value.make_ascii_lowercase();
        }
        params.push((name, value));
    }
    params.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    if params.windows(2).any(|w| w[0].0 == w[1].0) {
        return None;
    }
    Some(params)
}

/// A `tchar` of RFC 9110 §5.6.2: what a token (a parameter name or bare value) is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A gzip request body that decodes to more than the layer's limit: answered 413, with
/// nothing stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request body decodes to more than {limit} bytes")]
pub struct DecodedBodyTooLarge {
    /// The limit it went past.
    pub limit: usize,
}

/// Whether the body is sent with exactly one coding, gzip.
pub(crate) fn is_gzip(parts: &Parts) -> bool {
    let mut codings = parts.headers.get_all(header::CONTENT_ENCODING).iter();
    match (codings.next(), codings.next()) {
        (Some(coding), None) => {
            let coding = coding.as_bytes().trim_ascii();
            coding.eq_ignore_ascii_case(b"gzip") || coding.eq_ignore_ascii_case(b"x-gzip")
        }
        _ => false,
    }
}

/// The decoded body, `None` when it is not valid gzip (then hashed as it came), or the
/// error once the output passes `limit`: the decoder is read at most `limit + 1` bytes
/// far, so no input can make it allocate more.
pub(crate) fn gunzip(body: &[u8], limit: usize) -> Result<Option<Vec<u8>>, DecodedBodyTooLarge> {
    use std::io::Read;
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    let decoder = flate2::read::MultiGzDecoder::new(body);
    match decoder.take(limit as u64 + 1).read_to_end(&mut out) {
        Ok(_) if out.len() > limit => Err(DecodedBodyTooLarge { limit }),
        Ok(_) => Ok(Some(out)),
        Err(_) => Ok(None),
    }
}

/// The idempotency key a JSON body carries at `pointer`: a webhook event's `/id`, a
/// queue message's `/data/object/id`, for senders that put the key in the body rather
/// than in an `Idempotency-Key` header.
///
/// A JSON string member is the key as it decodes; an integer member is the key as
/// written (`{"id": 42}` gives `42`, however many digits). Either must then be a valid
/// [`IdempotencyKey`] (1 to 255 visible ASCII characters). Pass the body decoded (not
/// gzipped).
///
/// ```
/// use oncely::fingerprint::JsonPointer;
/// use oncely_http::{KeyFromBodyError, key_from_json_body};
///
/// let id: JsonPointer = "/data/object/id".parse()?;
/// let key = key_from_json_body(br#"{"data":{"object":{"id":"ch_1"}}}"#, &id)?;
/// assert_eq!(key.map(|k| k.as_str().to_owned()).as_deref(), Some("ch_1"));
///
/// assert_eq!(key_from_json_body(br#"{"data":{}}"#, &id)?, None);
/// assert_eq!(key_from_json_body(b"not json", &id)?, None);
/// assert_eq!(
///     key_from_json_body(br#"{"data":{"object":{"id":1.5}}}"#, &id),
///     Err(KeyFromBodyError::NotAKey { found: "a number that is not an integer" })
/// );
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// `Ok(None)` when the body is not a JSON object or array (not JSON at all, included),
/// or the pointer names nothing in it, or names `null`. The whole body is still checked
/// to be one JSON document, so that a truncated body yields no key.
///
/// **Hostile input**: the body is read by [`JsonPointer::find`]: twice (validated, then
/// scanned), without recursion and without building a tree of it, so neither its size
/// nor its nesting nor the pointer's length can exhaust the stack.
///
/// # Errors
/// - [`KeyFromBodyError::NotAKey`] when the member is an object, an array, a boolean
///   or a number that is not an integer;
/// - [`KeyFromBodyError::DuplicateMember`] when an object on the pointer's path has the
///   member the pointer names twice (JSON parsers disagree on which one counts);
/// - [`KeyFromBodyError::InvalidKey`] when the text is not a valid key.
pub fn key_from_json_body(body: &[u8], pointer: &JsonPointer) -> Result<Option<IdempotencyKey>, KeyFromBodyError> {
    if !matches!(body.trim_ascii_start().first(), Some(b'{' | b'[')) {
        return Ok(None);
    }
    let raw = match pointer.find(body) {
        Ok(Some(raw)) => raw,
        Err(FindError::DuplicateMember) => return Err(KeyFromBodyError::DuplicateMember),
        // Nothing there, or not JSON after all.
        Ok(None) | Err(_) => return Ok(None),
    };
    let text = match raw.as_bytes().first() {
        Some(b'"') => match serde_json::from_str::<String>(raw) {
            Ok(text) => text,
            // A lone surrogate escape, which the validation pass lets by in skipped strings.
            Err(_) => return Ok(None),
        },
        Some(b'{') => return Err(KeyFromBodyError::NotAKey { found: "an object" }),
        Some(b'[') => return Err(KeyFromBodyError::NotAKey { found: "an array" }),
        Some(b't' | b'f') => return Err(KeyFromBodyError::NotAKey { found: "a boolean" }),
        Some(b'n') | None => return Ok(None),
        Some(_) if raw.contains(['.', 'e', 'E']) => {
            return Err(KeyFromBodyError::NotAKey { found: "a number that is not an integer" });
        }
        Some(_) => raw.to_owned(),
    };
    IdempotencyKey::new(text).map(Some).map_err(KeyFromBodyError::InvalidKey)
}

/// Why the member of a JSON body that should hold the idempotency key cannot be one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFromBodyError {
    /// The member is not a string or an integer.
    #[error("the key member of the body is {found}; an idempotency key must be a string or an integer")]
    NotAKey {
        /// What it is instead: "an object", "an array", "a boolean" or "a number that is
        /// not an integer".
        found: &'static str,
    },
    /// An object on the path to the key has the member the path names twice: JSON
    /// parsers disagree on which one counts, so neither does.
    #[error("an object on the path to the body's key member has that member twice")]
    DuplicateMember,
    /// The member's text is not a valid idempotency key.
    #[error("the key member of the body is not a valid idempotency key: {0}")]
    InvalidKey(KeyError),
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    const LIMIT: usize = 1 << 20;

    fn gzip(data: &[u8], mtime: u32, level: u32) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::GzBuilder::new().mtime(mtime).write(Vec::new(), flate2::Compression::new(level));
        encoder.write_all(data).expect("in memory");
        encoder.finish().expect("in memory")
    }

    #[test]
    fn gzip_bodies_are_compared_decoded() {
        let head = parts("POST", "/pay", &[("content-type", "application/json"), ("content-encoding", "gzip")]);
        let plain = parts("POST", "/pay", &[("content-type", "application/json")]);
        let body = br#"{"amount":1999,"currency":"eur"}"#;
        let first = request_fingerprint(&head, &gzip(body, 1, 6), LIMIT);
        assert_eq!(first, request_fingerprint(&head, &gzip(body, 2, 9), LIMIT), "recompressed retry");
        assert_eq!(first, request_fingerprint(&plain, body, LIMIT), "the same body uncompressed");
        assert_ne!(first, request_fingerprint(&head, &gzip(br#"{"amount":2000}"#, 1, 6), LIMIT));
        // Not gzip after all: hashed as it came, never an error.
        assert!(request_fingerprint(&head, b"not gzip", LIMIT).is_ok());
    }

    #[test]
    fn a_zip_bomb_is_refused_without_inflating_it() {
        let head = parts("POST", "/pay", &[("content-encoding", "gzip")]);
        let bomb = gzip(&vec![0u8; 64 << 20], 0, 9);
        assert!(bomb.len() < 128 << 10, "64 MiB of zeros compress to {} bytes", bomb.len());
        assert_eq!(request_fingerprint(&head, &bomb, LIMIT), Err(DecodedBodyTooLarge { limit: LIMIT }));
        assert!(request_fingerprint(&head, &gzip(&vec![0u8; LIMIT], 0, 9), LIMIT).is_ok(), "exactly the limit");
    }

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("test request").into_parts().0
    }

    #[test]
    fn json_bodies_are_compared_canonically() {
        let head = parts("POST", "/pay", &[("content-type", "application/json; charset=utf-8")]);
        let other_head = parts("POST", "/pay", &[("content-type", "Application/JSON")]);
        assert_eq!(
            request_fingerprint(&head, br#"{"a":1,"b":2}"#, LIMIT),
            request_fingerprint(&other_head, b"{ \"b\": 2, \"a\": 1 }", LIMIT)
        );
    }

    #[test]
    fn every_part_changes_the_fingerprint() {
        let base = request_fingerprint(&parts("POST", "/pay?x=1", &[("content-type", "text/plain")]), b"body", LIMIT);
        for (head, body) in [
            (parts("PATCH", "/pay?x=1", &[("content-type", "text/plain")]), &b"body"[..]),
            (parts("POST", "/pay?x=2", &[("content-type", "text/plain")]), b"body"),
            (parts("POST", "/paid?x=1", &[("content-type", "text/plain")]), b"body"),
            (parts("POST", "/pay?x=1", &[("content-type", "text/csv")]), b"body"),
            (parts("POST", "/pay?x=1", &[("content-type", "text/plain")]), b"body "),
        ] {
            assert_ne!(request_fingerprint(&head, body, LIMIT), base);
        }
    }

    fn media(value: &str) -> String {
        String::from_utf8(MediaType::parse(value.as_bytes()).text)
            .expect("test values are UTF-8")
            .replace('\0', "<raw>")
    }

    #[test]
    fn media_types_are_normalised() {
        for same in ["application/json", "Application/JSON;charset=UTF-8", "application/json; charset=utf-8"] {
            assert_eq!(media(same), "application/json", "{same}");
        }
        assert_eq!(media(r#" application/json ;; charset="utf-8" ; "#), "application/json");
        assert_eq!(media("application/vnd.api+json; charset=utf-8"), "application/vnd.api+json");
        assert_eq!(media("text/plain; b=2;a=1"), "text/plain;a=1;b=2");
        assert_eq!(media("text/plain;A=1 ;\tB=2"), "text/plain;a=1;b=2");
        assert_eq!(media(r#"text/plain; a="1""#), "text/plain;a=1", "quoted values unquoted");
        assert_eq!(media(r#"text/plain; a="x\"y\\z w""#), r#"text/plain;a="x\"y\\z w""#, "re-quoted when needed");
        assert_eq!(media(r#"text/plain; a="""#), r#"text/plain;a="""#);
        assert_eq!(media("text/plain; charset=UTF-8"), "text/plain;charset=utf-8", "kept: not JSON");
        assert_eq!(media("application/json; charset=latin1"), "application/json;charset=latin1");
        assert_eq!(media("multipart/form-data; boundary=AbC"), "multipart/form-data;boundary=AbC", "values keep case");
        // Parameters that do not parse are kept as they came.
        for (bad, kept) in [
            ("text/plain; a", "text/plain<raw>a"),
            ("text/plain; a=", "text/plain<raw>a="),
            ("text/plain; =1", "text/plain<raw>=1"),
            ("text/plain; a = 1", "text/plain<raw>a = 1"),
            ("text/plain; a=1 b", "text/plain<raw>a=1 b"),
            (r#"text/plain; a="1"#, r#"text/plain<raw>a="1"#),
            (r#"text/plain; a="1\"#, r#"text/plain<raw>a="1\"#),
            ("text/plain; a=1; A=2", "text/plain<raw>a=1; A=2"),
            ("text/plain; a=1; a=1", "text/plain<raw>a=1; a=1"),
        ] {
            assert_eq!(media(bad), kept, "{bad}");
        }
        assert_eq!(MediaType::parse(b""), MediaType::default());
        assert!(MediaType::parse(b"Application/Problem+JSON; charset=utf-8").is_json());
        assert!(!MediaType::parse(b"application/jsonx").is_json());
    }

    #[test]
    fn media_types_count_in_the_fingerprint_once_normalised() {
        let fingerprint = |ct: &str| request_fingerprint(&parts("POST", "/pay", &[("content-type", ct)]), b"{}", LIMIT);
        let json = fingerprint("application/json");
        assert_eq!(json, fingerprint("APPLICATION/json ; Charset=\"UTF-8\""));
        assert_ne!(json, fingerprint("application/json; charset=utf-16"));
        assert_ne!(json, fingerprint("application/json; v=1"));
        assert_ne!(json, fingerprint("application/problem+json"));
        assert_eq!(fingerprint("text/plain; a=1; b=2"), fingerprint("text/plain;B=2;a=\"1\""));
        assert_ne!(fingerprint("text/plain; a=1; b=2"), fingerprint("text/plain; a=1; b=3"));
        assert_ne!(fingerprint("text/plain; a=x"), fingerprint("text/plain; a=X"));
        assert_ne!(fingerprint("text/plain; a=1"), fingerprint("text/plain"));
        assert_ne!(fingerprint("text/plain; a=1"), fingerprint("text/plain; a"), "malformed is not well-formed");
        assert_ne!(json, request_fingerprint(&parts("POST", "/pay", &[]), b"{}", LIMIT));
    }

    #[test]
    fn fingerprints_without_parameters_are_those_of_earlier_versions() {
        // Earlier versions hashed the lowercased type with its parameters dropped.
        let legacy = |head: &Parts, media_type: &str, kind: &[u8], body: &[u8]| {
            Fingerprint::from_parts(&[head.method.as_str().as_bytes(), b"/pay?x=1", media_type.as_bytes(), kind, body])
        };
        let head = parts("POST", "/pay?x=1", &[("content-type", "Application/JSON; charset=utf-8")]);
        let canonical = Fingerprint::from_json(br#"{"a":1}"#).expect("JSON");
        assert_eq!(
            request_fingerprint(&head, br#"{ "a": 1 }"#, LIMIT),
            Ok(legacy(&head, "application/json", b"json", canonical.as_bytes()))
        );
        let head = parts("POST", "/pay?x=1", &[("content-type", "text/csv")]);
        assert_eq!(request_fingerprint(&head, b"a,b", LIMIT), Ok(legacy(&head, "text/csv", b"raw", b"a,b")));
        let head = parts("POST", "/pay?x=1", &[]);
        assert_eq!(request_fingerprint(&head, b"a,b", LIMIT), Ok(legacy(&head, "", b"raw", b"a,b")));
    }

    fn rules(ignore: &[&str], headers: &[&str]) -> FingerprintRules {
        FingerprintRules {
            ignore: ignore.iter().map(|p| p.parse().expect("valid pointer")).collect(),
            headers: headers.iter().map(|h| HeaderName::try_from(*h).expect("valid name")).collect(),
        }
    }

    #[test]
    fn named_headers_count_every_field_in_order() {
        let version = rules(&[], &["x-api-version", "X-Tenant"]);
        let fingerprint = |headers: &[(&str, &str)]| {
            request_fingerprint_with(&parts("POST", "/pay", headers), b"body", LIMIT, &version).expect("no gzip")
        };
        let none = fingerprint(&[]);
        assert_eq!(none, request_fingerprint(&parts("POST", "/pay", &[]), b"body", LIMIT).expect("no gzip"));
        let v1 = fingerprint(&[("x-api-version", "1")]);
        assert_eq!(v1, fingerprint(&[("X-Api-Version", "1"), ("x-other", "2")]), "other headers do not count");
        let distinct = [
            none,
            v1,
            fingerprint(&[("x-api-version", "")]),
            fingerprint(&[("x-api-version", "2")]),
            fingerprint(&[("x-api-version", "1"), ("x-api-version", "2")]),
            fingerprint(&[("x-api-version", "2"), ("x-api-version", "1")]),
            fingerprint(&[("x-api-version", "1, 2")]),
            fingerprint(&[("x-api-version", "1"), ("x-api-version", "")]),
            fingerprint(&[("x-tenant", "1")]),
            fingerprint(&[("x-api-version", "1"), ("x-tenant", "1")]),
            fingerprint(&[("x-api-version", "1x-tenant"), ("x-tenant", "")]),
        ];
        for (i, a) in distinct.iter().enumerate() {
            for b in &distinct[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // The list's order and repeats do not matter.
        let reordered = rules(&[], &["x-tenant", "x-api-version", "X-TENANT"]);
        let head = parts("POST", "/pay", &[("x-api-version", "1"), ("x-tenant", "t")]);
        assert_eq!(
            request_fingerprint_with(&head, b"body", LIMIT, &reordered),
            request_fingerprint_with(&head, b"body", LIMIT, &version)
        );
    }

    #[test]
    fn ignored_members_apply_to_json_bodies_only() {
        let webhook = rules(&["/metadata/sent_at", "/delivery/attempt"], &[]);
        let json = parts("POST", "/hooks", &[("content-type", "application/json")]);
        let fingerprint = |head: &Parts, body: &[u8]| request_fingerprint_with(head, body, LIMIT, &webhook);
        let first = br#"{"id":"evt_1","metadata":{"sent_at":"12:00"},"delivery":{"attempt":1}}"#;
        let retry = br#"{"delivery":{"attempt":2},"metadata":{"sent_at":"12:05"},"id":"evt_1"}"#;
        assert_eq!(fingerprint(&json, first), fingerprint(&json, retry));
        assert_ne!(fingerprint(&json, first), fingerprint(&json, br#"{"id":"evt_2","metadata":{"sent_at":"12:00"}}"#));
        let gzipped = parts("POST", "/hooks", &[("content-type", "application/json"), ("content-encoding", "gzip")]);
        assert_eq!(fingerprint(&gzipped, &gzip(retry, 0, 6)), fingerprint(&json, first), "decoded, then canonical");
        // Not JSON, or JSON that does not parse: the raw bytes, as without rules.
        let text = parts("POST", "/hooks", &[("content-type", "text/plain")]);
        assert_ne!(fingerprint(&text, first), fingerprint(&text, retry));
        assert_eq!(fingerprint(&text, first), request_fingerprint(&text, first, LIMIT));
        let broken = br#"{"id":"evt_1","metadata":{"sent_at":"12:00"}"#;
        assert_eq!(fingerprint(&json, broken), request_fingerprint(&json, broken, LIMIT));
        assert_eq!(FingerprintRules::default(), FingerprintRules::NONE);
    }

    fn key(body: &str, pointer: &str) -> Result<Option<String>, KeyFromBodyError> {
        let pointer: JsonPointer = pointer.parse().expect("valid pointer");
        key_from_json_body(body.as_bytes(), &pointer).map(|key| key.map(|k| k.as_str().to_owned()))
    }

    #[test]
    fn keys_come_from_string_and_integer_members() {
        let some = |text: &str| Ok(Some(text.to_owned()));
        assert_eq!(key(r#"{"id":"evt_1"}"#, "/id"), some("evt_1"));
        assert_eq!(key(r#" {"type":"x", "data":{"object":{"id":"ch_1"}}} "#, "/data/object/id"), some("ch_1"));
        assert_eq!(key(r#"{"id":"ch\u005f1\/2"}"#, "/id"), some("ch_1/2"), "escapes decoded");
        assert_eq!(key(r#"{"id":42}"#, "/id"), some("42"));
        assert_eq!(key(r#"{"id":-7}"#, "/id"), some("-7"));
        assert_eq!(key(r#"{"id":123456789012345678901234567890}"#, "/id"), some("123456789012345678901234567890"));
        assert_eq!(key(r#"{"items":[{"id":"a"},{"id":"b"}]}"#, "/items/1/id"), some("b"));
        assert_eq!(key(r#"[["x","y"]]"#, "/0/1"), some("y"));
        assert_eq!(key(r#"{"a/b":{"m~n":"k"}}"#, "/a~1b/m~0n"), some("k"));
        assert_eq!(key(r#"{"\u0069d":"k"}"#, "/id"), some("k"), "member names compared decoded");
        assert_eq!(key(r#"{"0":"k"}"#, "/0"), some("k"), "an index token names an object member too");
        assert_eq!(key(r#"{"id":"k","id2":"x","other":{"id":"y"}}"#, "/id"), some("k"));
    }

    #[test]
    fn no_key_when_the_body_has_none() {
        for (body, pointer) in [
            (r#"{"id":"k"}"#, "/other"),
            (r#"{"id":null}"#, "/id"),
            (r#"{"id":"k"}"#, "/id/x"),
            (r#"{"data":"k"}"#, "/data/id"),
            (r#"["k"]"#, "/1"),
            (r#"["k"]"#, "/01"),
            (r#"["k"]"#, "/-"),
            (r#"["k"]"#, "/id"),
            (r#""k""#, ""),
            (r#""k""#, "/id"),
            ("42", "/id"),
            ("", "/id"),
            ("not json", "/id"),
            (r#"{"id":"k""#, "/id"),
            (r#"{"id":"k"} trailing"#, "/id"),
            (r#"{"id":"k",}"#, "/id"),
            (r#"{"id":"\ud800"}"#, "/id"),
            ("\u{feff}{\"id\":\"k\"}", "/id"),
        ] {
            assert_eq!(key(body, pointer), Ok(None), "{body} at {pointer:?}");
        }
        assert_eq!(key_from_json_body(b"{\"id\":\"\xff\"}", &"/id".parse().expect("valid")), Ok(None));
    }

    #[test]
    fn members_that_cannot_be_keys_are_typed_errors() {
        let not_a_key = |found| Err(KeyFromBodyError::NotAKey { found });
        assert_eq!(key(r#"{"id":{"x":1}}"#, "/id"), not_a_key("an object"));
        assert_eq!(key(r#"{"id":[1]}"#, "/id"), not_a_key("an array"));
        assert_eq!(key(r#"{"id":true}"#, "/id"), not_a_key("a boolean"));
        for float in ["1.5", "1e3", "1E3", "-0.0", "10.0"] {
            assert_eq!(key(&format!(r#"{{"id":{float}}}"#), "/id"), not_a_key("a number that is not an integer"));
        }
        assert_eq!(key(r#"{"id":"k"}"#, ""), not_a_key("an object"), "the empty pointer names the body");
        assert_eq!(key(r#"{"id":""}"#, "/id"), Err(KeyFromBodyError::InvalidKey(KeyError::Empty)));
        assert!(matches!(key(r#"{"id":"has space"}"#, "/id"), Err(KeyFromBodyError::InvalidKey(_))));
        assert!(matches!(key(r#"{"id":"é"}"#, "/id"), Err(KeyFromBodyError::InvalidKey(_))));
        assert!(matches!(
            key(&format!(r#"{{"id":"{}"}}"#, "k".repeat(256)), "/id"),
            Err(KeyFromBodyError::InvalidKey(_))
        ));
        assert!(matches!(
            key(&format!(r#"{{"id":{}}}"#, "9".repeat(256)), "/id"),
            Err(KeyFromBodyError::InvalidKey(_))
        ));
        let message = key(r#"{"id":1.5}"#, "/id").expect_err("a float").to_string();
        assert!(message.contains("a number that is not an integer") && message.contains("string or an integer"));
    }

    #[test]
    fn duplicate_members_on_the_path_are_refused() {
        assert_eq!(key(r#"{"id":"a","id":"b"}"#, "/id"), Err(KeyFromBodyError::DuplicateMember));
        assert_eq!(key(r#"{"id":"a","id":"a"}"#, "/id"), Err(KeyFromBodyError::DuplicateMember));
        assert_eq!(key(r#"{"data":{"id":"a"},"data":{}}"#, "/data/id"), Err(KeyFromBodyError::DuplicateMember));
        assert_eq!(key(r#"{"data":{"id":"a","id":null}}"#, "/data/id"), Err(KeyFromBodyError::DuplicateMember));
        // Duplicates elsewhere are not the key's business.
        assert_eq!(key(r#"{"x":1,"x":2,"id":"a","o":{"id":1,"id":2}}"#, "/id"), Ok(Some("a".to_owned())));
    }

    #[test]
    fn hostile_bodies_find_keys_without_recursion_or_panics() {
        let handle = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let deep = format!(r#"{{"deep":{}{},"id":"k"}}"#, "[{\"a\":".repeat(200_000), "}]".repeat(200_000))
                    .replace(":}", ":1}");
                let along_path = format!("{}\"k\"{}", "[".repeat(100_000), "]".repeat(100_000));
                let long_pointer = "/0".repeat(100_000);
                let huge =
                    format!(r#"{{"pad":"{}","items":[{}],"id":7}}"#, "x".repeat(1 << 20), "0,".repeat(1 << 18) + "0");
                (
                    key(&deep, "/id"),
                    key(&deep, "/deep/0/a/0/a/0/a"),
                    key(&along_path, &long_pointer),
                    key(&along_path, "/0/0/0"),
                    key(&huge, "/id"),
                    key(&huge, &format!("/items/{}", 1 << 18)),
                )
            })
            .expect("thread starts");
        let (beside, into, too_deep, shallow, huge, last_item) = handle.join().expect("no stack overflow");
        assert_eq!(beside, Ok(Some("k".to_owned())));
        assert_eq!(into, Err(KeyFromBodyError::NotAKey { found: "an array" }));
        assert_eq!(too_deep, Ok(Some("k".to_owned())), "any pointer length");
        assert_eq!(shallow, Err(KeyFromBodyError::NotAKey { found: "an array" }));
        assert_eq!(huge, Ok(Some("7".to_owned())));
        assert_eq!(last_item, Ok(Some("0".to_owned())));
    }
}
