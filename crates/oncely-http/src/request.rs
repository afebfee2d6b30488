//! What the layer derives from a request: its fingerprint and its scope.

use std::fmt;
use std::sync::Arc;

use http::request::Parts;
use http::{HeaderName, header};
use oncely::{Fingerprint, Scope};

/// The fingerprint of a request: method, path and query, content type (its media type,
/// lowercased, parameters dropped) and body.
///
/// A JSON body (`application/json` or any `+json` type) is canonicalised first (see
/// [`Fingerprint::from_json`]), so a client that re-serialises its retry with other key
/// order or whitespace still matches. A body that claims JSON but does not parse is
/// hashed as raw bytes: a false mismatch (422) is safe, a false match would not be.
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
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let media_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default();
    let decoded = if is_gzip(parts) { gunzip(body, max_decoded_body)? } else { None };
    let body = decoded.as_deref().unwrap_or(body);
    let is_json = media_type == "application/json" || media_type.ends_with("+json");
    let canonical = if is_json { Fingerprint::from_json(body).ok() } else { None };
    let body_part: &[u8] = match &canonical {
        Some(json) => json.as_bytes(),
        None => body,
    };
    let kind: &[u8] = if canonical.is_some() { b"json" } else { b"raw" };
    Ok(Fingerprint::from_parts(&[
        parts.method.as_str().as_bytes(),
        path_and_query.as_bytes(),
        media_type.as_bytes(),
        kind,
        body_part,
    ]))
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
fn gunzip(body: &[u8], limit: usize) -> Result<Option<Vec<u8>>, DecodedBodyTooLarge> {
    use std::io::Read;
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    let decoder = flate2::read::MultiGzDecoder::new(body);
    match decoder.take(limit as u64 + 1).read_to_end(&mut out) {
        Ok(_) if out.len() > limit => Err(DecodedBodyTooLarge { limit }),
        Ok(_) => Ok(Some(out)),
        Err(_) => Ok(None),
    }
}

type ScopeFn = dyn Fn(&Parts) -> Scope + Send + Sync;

/// Where a request's scope (its principal) comes from.
#[derive(Clone)]
pub enum ScopeSource {
    /// A hash of these request headers' values (default: `Authorization`). A request
    /// with none of them has the global scope.
    Headers(Arc<[HeaderName]>),
    /// A function of the request head, for principals established by an earlier layer
    /// (an authenticated user in the extensions, say).
    Function(Arc<ScopeFn>),
}

impl Default for ScopeSource {
    fn default() -> Self {
        Self::Headers(Arc::from([header::AUTHORIZATION]))
    }
}

impl fmt::Debug for ScopeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Headers(names) => f.debug_tuple("Headers").field(names).finish(),
            Self::Function(_) => f.write_str("Function(..)"),
        }
    }
}

impl ScopeSource {
    /// The scope of a request. Header values are hashed, never kept: the scope of a
    /// request with `Authorization: Bearer sk_live_…` does not reveal the credential.
    pub fn scope(&self, parts: &Parts) -> Scope {
        match self {
            Self::Function(f) => f(parts),
            Self::Headers(names) => {
                let mut fields: Vec<&[u8]> = Vec::with_capacity(names.len() * 2);
                for name in names.iter() {
                    for value in parts.headers.get_all(name) {
                        fields.push(name.as_str().as_bytes());
                        fields.push(value.as_bytes());
                    }
                }
                if fields.is_empty() { Scope::global() } else { Scope::new(Fingerprint::from_parts(&fields).to_hex()) }
            }
        }
    }
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

    #[test]
    fn scope_hashes_the_principal_headers() {
        let source = ScopeSource::default();
        let alice = source.scope(&parts("POST", "/", &[("authorization", "Bearer alice")]));
        let bob = source.scope(&parts("POST", "/", &[("authorization", "Bearer bob")]));
        assert_ne!(alice, bob);
        assert!(!alice.as_str().contains("alice"), "credentials are hashed");
        assert_eq!(source.scope(&parts("POST", "/", &[])), Scope::global());
    }
}
