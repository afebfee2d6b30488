//! Who owns a key: where a request's scope (its principal) comes from.
//!
//! Two principals never see each other's records: the storage key is derived from the
//! scope and the key together. The layer replays without asking the inner service, so
//! the scope must be something a client cannot forge, and should be stable across the
//! client's retries. Each source trades the two differently:
//!
//! | source | unforgeable because | stable across | costs |
//! |---|---|---|---|
//! | [raw headers](ScopeSource::headers) (default `Authorization` and `Cookie`) | a client can only send its own credentials | retries with the same credential; a refreshed token is a new principal (its retry runs again) | nothing |
//! | [named cookies](ScopeSource::cookies) (`session`) | the same, for one cookie | retries within one session, whatever other cookies change | nothing |
//! | [a verified JWT claim](ScopeSource::jwt) (`sub`, `tenant_id`) | the layer checks the signature and expiry itself | token refreshes: the claim stays | one signature check per keyed request |
//! | [a trusted header](ScopeSource::trusted_header) (`X-Authenticated-User`) | only the front proxy that sets it can reach this server: **a network promise** | whatever the proxy says | nothing; unsafe if clients can reach the server directly |
//! | [a function](ScopeSource::function) of the request head | whatever an earlier layer established (an authenticated user in the extensions) | as that layer decides | as that layer costs |
//!
//! Sources combine ([`ScopeSource::and`]): the scope is then every source's part
//! together, so `jwt(...).and(ScopeSource::headers(["x-tenant"]))` keeps tenants apart
//! even for one subject. Raw values are hashed, never kept: a scope does not reveal the
//! credential it came from.
//!
//! A source that must find its principal (a JWT, a trusted header) refuses a request
//! without one ([`ScopeRejection`]; the layer answers 401 `unauthenticated`), so that a
//! request is never run under a weaker scope than its route asks for. Raw headers and
//! cookies that are absent are the empty part: a request with none of them has the
//! global scope, shared with every other such request.
//!
//! ```
//! use oncely_http::ScopeSource;
//!
//! // Cookie-authenticated API: the session cookie is the principal; other cookies
//! // (analytics, preferences) may change between retries without changing it.
//! let source = ScopeSource::cookies(["session"]).and(ScopeSource::headers([http::header::AUTHORIZATION]));
//! # let _ = source;
//! ```

#[cfg(feature = "jwt")]
pub mod jwt;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::request::Parts;
use http::{HeaderName, header};
use oncely::{Fingerprint, Scope};

type ScopeFn = dyn Fn(&Parts) -> Scope + Send + Sync;

/// Where a request's scope (its principal) comes from: one source or several combined.
/// See the [module docs](self) for what each protects against.
#[derive(Clone)]
pub struct ScopeSource {
    sources: Arc<[Source]>,
}

#[derive(Clone)]
enum Source {
    /// Raw values of these headers; `Authorization`'s scheme compared case-insensitively.
    Headers(Arc<[HeaderName]>),
    /// Values of these cookies, from every `Cookie` field.
    Cookies(Arc<[String]>),
    /// The value of a header set by a trusted front proxy; required.
    TrustedHeader(HeaderName),
    /// Claims of a bearer token the layer verifies; required.
    #[cfg(feature = "jwt")]
    Jwt(jwt::JwtScope),
    /// A function of the request head.
    Function(Arc<ScopeFn>),
}

impl Default for ScopeSource {
    /// The raw `Authorization` and `Cookie` fields: an API that authenticates with
    /// cookies is not shared between its users by default.
    fn default() -> Self {
        Self::headers([header::AUTHORIZATION, header::COOKIE])
    }
}

impl fmt::Debug for ScopeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for source in self.sources.iter() {
            match source {
                Source::Headers(names) => list.entry(&format_args!("headers{names:?}")),
                Source::Cookies(names) => list.entry(&format_args!("cookies{names:?}")),
                Source::TrustedHeader(name) => list.entry(&format_args!("trusted_header({name})")),
                #[cfg(feature = "jwt")]
                Source::Jwt(_) => list.entry(&format_args!("jwt")),
                Source::Function(_) => list.entry(&format_args!("function")),
            };
        }
        list.finish()
    }
}

/// Why a request has no scope: a source that must find its principal did not. The layer
/// answers 401 `unauthenticated` and runs nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: {reason}")]
pub struct ScopeRejection {
    /// The source that refused (`trusted_header`, `jwt`).
    pub source_name: &'static str,
    /// Why, in words safe to send to the client.
    pub reason: String,
    /// Whether the client should present a bearer token (`WWW-Authenticate: Bearer`).
    pub bearer: bool,
}

impl ScopeSource {
    fn one(source: Source) -> Self {
        Self { sources: Arc::from([source]) }
    }

    /// The raw values of these request headers, hashed. `Authorization`'s scheme is
    /// compared case-insensitively (`bearer x` is `Bearer x`). A refreshed token is a new
    /// principal: use [`jwt`](Self::jwt) where tokens are refreshed.
    pub fn headers(names: impl IntoIterator<Item = HeaderName>) -> Self {
        Self::one(Source::Headers(names.into_iter().collect()))
    }

    /// The values of these cookies (from every `Cookie` field), hashed; other cookies
    /// do not count.
    pub fn cookies<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        Self::one(Source::Cookies(names.into_iter().map(Into::into).collect()))
    }

    /// The value of a header that a trusted front proxy sets after authenticating the
    /// client (`X-Authenticated-User`). A request without it is refused. Only as safe as
    /// the network: a client that can reach this server without passing the proxy can
    /// send any value, so use it only where the proxy is the only way in.
    pub fn trusted_header(name: HeaderName) -> Self {
        Self::one(Source::TrustedHeader(name))
    }

    /// The claims (`sub` by default) of the request's bearer token, which the layer
    /// verifies itself (signature, expiry): stable across token refreshes, and not
    /// forgeable. A request without a token that verifies is refused (401 with
    /// `WWW-Authenticate: Bearer`), never run under a weaker scope.
    #[cfg(feature = "jwt")]
    pub fn jwt(scope: jwt::JwtScope) -> Self {
        Self::one(Source::Jwt(scope))
    }

    /// A function of the request head, for principals established by an earlier layer
    /// (an authenticated user in the extensions, say).
    pub fn function(scope: impl Fn(&Parts) -> Scope + Send + Sync + 'static) -> Self {
        Self::one(Source::Function(Arc::new(scope)))
    }

    /// This source and `other` together: the scope is both parts.
    pub fn and(self, other: ScopeSource) -> Self {
        Self { sources: self.sources.iter().chain(other.sources.iter()).cloned().collect() }
    }

    /// Whether every request gets the same scope whatever it sends (no source at all):
    /// a key is then shared by all clients.
    pub fn is_shared_by_all(&self) -> bool {
        self.sources.is_empty()
            || self.sources.iter().all(|s| match s {
                Source::Headers(names) => names.is_empty(),
                Source::Cookies(names) => names.is_empty(),
                _ => false,
            })
    }

    /// The scope of a request, or why it has none. Values are hashed, never kept: the
    /// scope of a request with `Authorization: Bearer sk_live_…` does not reveal it.
    ///
    /// ```
    /// use http::Request;
    /// use oncely_http::ScopeSource;
    ///
    /// let (alice, _) = Request::post("/").header("authorization", "Bearer alice").body(()).unwrap().into_parts();
    /// let (again, _) = Request::post("/").header("authorization", "bearer alice").body(()).unwrap().into_parts();
    /// let source = ScopeSource::default();
    /// assert_eq!(source.scope(&alice), source.scope(&again), "the scheme's case does not matter");
    /// ```
    pub fn scope(&self, parts: &Parts) -> Result<Scope, ScopeRejection> {
        // One source that is a function gives its scope as it is.
        if let [Source::Function(f)] = &*self.sources {
            return Ok(f(parts));
        }
        // Each value goes in as (kind, name, value): the kind keeps a cookie named
        // `authorization` apart from the header. Header values are borrowed; only
        // `Authorization` (its scheme lowercased) and derived values are copied.
        let mut fields: Vec<Cow<'_, [u8]>> = Vec::new();
        for source in self.sources.iter() {
            match source {
                Source::Headers(names) => {
                    for name in names.iter() {
                        for value in parts.headers.get_all(name) {
                            let value = if name == header::AUTHORIZATION {
                                Cow::Owned(scheme_lowercased(value.as_bytes()))
                            } else {
                                Cow::Borrowed(value.as_bytes())
                            };
                            push(&mut fields, "header", Cow::Borrowed(name.as_str().as_bytes()), value);
                        }
                    }
                }
                Source::Cookies(names) => {
                    for (name, value) in cookies(parts, names) {
                        push(&mut fields, "cookie", Cow::Owned(name.into_bytes()), Cow::Owned(value.into_bytes()));
                    }
                }
                Source::TrustedHeader(name) => {
                    let mut values = parts.headers.get_all(name).iter();
                    let value = match (values.next(), values.next()) {
                        (Some(value), None) if !value.is_empty() => value,
                        (None, _) => return Err(rejection("trusted_header", format!("no {name} header"))),
                        _ => return Err(rejection("trusted_header", format!("{name} must be one non-empty field"))),
                    };
                    push(
                        &mut fields,
                        "trusted",
                        Cow::Borrowed(name.as_str().as_bytes()),
                        Cow::Borrowed(value.as_bytes()),
                    );
                }
                #[cfg(feature = "jwt")]
                Source::Jwt(verifier) => match verifier.principal(&parts.headers) {
                    Ok(principal) => push(&mut fields, "jwt", Cow::Borrowed(b""), Cow::Owned(principal.into_bytes())),
                    Err(e) => {
                        return Err(ScopeRejection { source_name: "jwt", reason: e.to_string(), bearer: true });
                    }
                },
                Source::Function(f) => {
                    push(
                        &mut fields,
                        "function",
                        Cow::Borrowed(b""),
                        Cow::Owned(f(parts).as_str().as_bytes().to_vec()),
                    );
                }
            }
        }
        if fields.is_empty() {
            return Ok(Scope::global());
        }
        let slices: Vec<&[u8]> = fields.iter().map(AsRef::as_ref).collect();
        Ok(Scope::new(Fingerprint::from_parts(&slices).to_hex()))
    }
}

/// One value of a scope: its source's kind, its name and the value.
fn push<'a>(fields: &mut Vec<Cow<'a, [u8]>>, kind: &'static str, name: Cow<'a, [u8]>, value: Cow<'a, [u8]>) {
    fields.extend([Cow::Borrowed(kind.as_bytes()), name, value]);
}

fn rejection(source_name: &'static str, reason: String) -> ScopeRejection {
    ScopeRejection { source_name, reason, bearer: false }
}

/// `Authorization`'s auth-scheme is case-insensitive (RFC 9110 §11.1): lowercase it, keep
/// the credentials as sent.
fn scheme_lowercased(value: &[u8]) -> Vec<u8> {
    let end = value.iter().position(|&b| b == b' ').unwrap_or(value.len());
    let mut out = value.to_vec();
    out[..end].make_ascii_lowercase();
    out
}

/// The named cookies of every `Cookie` field, sorted by name then value, so the order the
/// client sent them in does not matter.
fn cookies(parts: &Parts, names: &[String]) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for field in parts.headers.get_all(header::COOKIE) {
        let Ok(text) = field.to_str() else { continue };
        for cookie in cookie::Cookie::split_parse(text).flatten() {
            if names.iter().any(|n| n == cookie.name()) {
                found.push((cookie.name().to_string(), cookie.value().to_string()));
            }
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut request = Request::post("/");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).expect("request").into_parts().0
    }

    #[test]
    fn raw_headers_are_hashed_and_the_scheme_is_case_insensitive() {
        let source = ScopeSource::default();
        let alice = source.scope(&parts(&[("authorization", "Bearer alice")])).expect("scope");
        let bob = source.scope(&parts(&[("authorization", "Bearer bob")])).expect("scope");
        assert_ne!(alice, bob);
        assert!(!alice.as_str().contains("alice"), "credentials are hashed");
        assert_eq!(source.scope(&parts(&[("authorization", "BEARER alice")])).expect("scope"), alice);
        assert_ne!(
            source.scope(&parts(&[("authorization", "Bearer ALICE")])).expect("scope"),
            alice,
            "credentials keep their case"
        );
        assert_eq!(source.scope(&parts(&[])).expect("scope"), Scope::global());
    }

    #[test]
    fn cookie_users_are_apart_by_default_and_named_cookies_ignore_the_others() {
        let default = ScopeSource::default();
        let a = default.scope(&parts(&[("cookie", "session=a")])).expect("scope");
        let b = default.scope(&parts(&[("cookie", "session=b")])).expect("scope");
        assert_ne!(a, b, "two cookie-authenticated users never share a scope");
        let session = ScopeSource::cookies(["session"]);
        let one = session.scope(&parts(&[("cookie", "theme=dark; session=a")])).expect("scope");
        let two = session.scope(&parts(&[("cookie", "session=a; _ga=123")])).expect("scope");
        assert_eq!(one, two, "only the named cookie counts");
        assert_ne!(one, session.scope(&parts(&[("cookie", "session=b")])).expect("scope"));
    }

    #[test]
    fn a_trusted_header_is_required_and_sources_combine() {
        let source = ScopeSource::trusted_header(HeaderName::from_static("x-authenticated-user"));
        assert_eq!(source.scope(&parts(&[])).expect_err("refused").source_name, "trusted_header");
        assert!(source.scope(&parts(&[("x-authenticated-user", "")])).is_err());
        let alice = source.scope(&parts(&[("x-authenticated-user", "alice")])).expect("scope");
        let tenants = source.clone().and(ScopeSource::headers([HeaderName::from_static("x-tenant")]));
        let t1 = tenants.scope(&parts(&[("x-authenticated-user", "alice"), ("x-tenant", "1")])).expect("scope");
        let t2 = tenants.scope(&parts(&[("x-authenticated-user", "alice"), ("x-tenant", "2")])).expect("scope");
        assert_ne!(t1, t2);
        assert_ne!(alice, t1);
    }

    #[test]
    fn an_empty_source_is_shared_by_all() {
        assert!(ScopeSource::headers([]).is_shared_by_all());
        assert!(!ScopeSource::default().is_shared_by_all());
        assert!(!ScopeSource::function(|_| Scope::global()).is_shared_by_all());
    }
}
