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
/// hashed as raw bytes.
pub fn request_fingerprint(parts: &Parts, body: &[u8]) -> Fingerprint {
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let media_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default();
    let is_json = media_type == "application/json" || media_type.ends_with("+json");
    let canonical = if is_json { Fingerprint::from_json(body).ok() } else { None };
    let body_part: &[u8] = match &canonical {
        Some(json) => json.as_bytes(),
        None => body,
    };
    let kind: &[u8] = if canonical.is_some() { b"json" } else { b"raw" };
    Fingerprint::from_parts(&[
        parts.method.as_str().as_bytes(),
        path_and_query.as_bytes(),
        media_type.as_bytes(),
        kind,
        body_part,
    ])
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
            request_fingerprint(&head, br#"{"a":1,"b":2}"#),
            request_fingerprint(&other_head, b"{ \"b\": 2, \"a\": 1 }")
        );
    }

    #[test]
    fn every_part_changes_the_fingerprint() {
        let base = request_fingerprint(&parts("POST", "/pay?x=1", &[("content-type", "text/plain")]), b"body");
        for (head, body) in [
            (parts("PATCH", "/pay?x=1", &[("content-type", "text/plain")]), &b"body"[..]),
            (parts("POST", "/pay?x=2", &[("content-type", "text/plain")]), b"body"),
            (parts("POST", "/paid?x=1", &[("content-type", "text/plain")]), b"body"),
            (parts("POST", "/pay?x=1", &[("content-type", "text/csv")]), b"body"),
            (parts("POST", "/pay?x=1", &[("content-type", "text/plain")]), b"body "),
        ] {
            assert_ne!(request_fingerprint(&head, body), base);
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
