//! The route table: each configured path prefix gets its own idempotency layer (its own
//! methods, key rule, retention, lease, conflict mode…) around the one proxy; the longest
//! matching prefix wins.
//!
//! Routes are matched on the path as an upstream is likely to read it ([`normalize`]:
//! `//payments`, `/./payments`, `/%70ayments` are `/payments`). Some upstreams read more
//! spellings as the same path: Java servlet containers drop `;` matrix parameters
//! (`/payments;jsessionid=1`), many frameworks decode `%2F` and `%5C` to `/` or treat `\`
//! as `/`, and some trim trailing whitespace (`/payments%20`). Such a path is read both
//! ways, strictly and [leniently](lenient); when the two readings fall on different routes
//! and either route covers the request's method, the gateway cannot know which one the
//! upstream will run, and refuses the request with 400 `urn:oncely:problem:ambiguous-path`
//! (never forwarded, nothing stored). Paths whose readings agree pass as they came, so
//! an `%2F` inside an identifier on a route of its own (`/projects/a%2Fb`) still works.
//! Case (`/PAYMENTS`) and extension (`/payments.json`) spellings are matched per route
//! with `case_insensitive` and `match_suffixes`, for upstreams that route that way.
//!
//! Before routing, the request's `Host` (or HTTP/2 `:authority`) is checked: one that is
//! not a plain `host[:port]` ([`crate::proxy::valid_host`]), or more than one `Host`
//! field, is 400 `urn:oncely:problem:bad-host`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use oncely::Oncely;
use oncely::engine::DeferredCompletions;
use oncely::store::StoreAbilities;
use oncely_http::problem::problem_response;
use oncely_http::{Idempotency, IdempotencyLayer, KeyedOutcome, ResponseBody};
use tokio_util::task::TaskTracker;
use tower::Layer;
use tower::ServiceExt;
use tower::util::Oneshot;

use crate::config::{Config, RouteSettings};
use crate::logs::access::{AccessLines, Passed};
use crate::proxy::{ForwardedFor, Proxy, valid_host};
use crate::stores::GatewayStore;

type RouteService = Idempotency<Proxy, GatewayStore>;

/// Dispatches each request to its route's layered proxy, and logs one line per request.
#[derive(Clone)]
pub struct Routes {
    inner: Arc<Table>,
    /// The client of the connection this copy serves ([`Routes::for_client`]).
    client: Option<ForwardedFor>,
}

struct Table {
    routes: Vec<Route>,
    default: Route,
    /// Where the policy is published, and the JSON served there.
    policy: Option<(String, bytes::Bytes)>,
}

/// One route: its settings, its layer (for what it covers) and the layered proxy.
struct Route {
    settings: RouteSettings,
    layer: IdempotencyLayer<GatewayStore>,
    service: RouteService,
}

impl Routes {
    /// Builds one layer per route over `proxy`, all on `store`, spawning keyed operations
    /// on `tracker`.
    ///
    /// Stored responses are capped to fit the store's `abilities.max_payload`.
    ///
    /// Every route keeps the results its store could not take in `deferred`, so that one
    /// readiness check sees them all and each route writes them before its next claim.
    pub fn new(
        config: &Config,
        store: &GatewayStore,
        abilities: StoreAbilities,
        proxy: &Proxy,
        tracker: &TaskTracker,
        deferred: &DeferredCompletions,
    ) -> Result<Self, String> {
        let build = |route: &RouteSettings| -> Result<Route, String> {
            let engine =
                Oncely::builder(store.clone()).track_background(tracker.clone()).deferred_completions(deferred.clone());
            let mut layer = route.layer(engine).map_err(|e| e.to_string())?.track_operations(tracker.clone());
            if let Some(bytes) = abilities.max_payload {
                layer = layer.fit_store_payload(bytes);
            }
            let service = layer.layer(proxy.with_completion_limit(route.completion_limit));
            Ok(Route { settings: route.clone(), layer, service })
        };
        let routes = config.routes.iter().map(build).collect::<Result<_, String>>()?;
        let default = build(&config.defaults)?;
        let policy = config.policy.path.clone().map(|path| {
            let json = serde_json::to_vec_pretty(&config.published_policy()).unwrap_or_default();
            (path, bytes::Bytes::from(json))
        });
        Ok(Self { inner: Arc::new(Table { routes, default, policy }), client: None })
    }

    /// The routes as they serve one connection from `client`: its requests are forwarded
    /// with `client` in `X-Forwarded-For` and `Forwarded`. The listener makes one per
    /// connection, so that no request carries its peer in an extension (a map allocated
    /// and freed per request).
    pub fn for_client(&self, client: std::net::SocketAddr) -> Self {
        Self { inner: Arc::clone(&self.inner), client: Some(ForwardedFor::new(client)) }
    }

    /// Writes every route's unflushed replay counts to the store: at a graceful
    /// shutdown, so that no count is lost (each engine also flushes by itself within a
    /// second of a replay).
    pub async fn flush_hits(&self) {
        let table = &self.inner;
        for route in table.routes.iter().chain(std::iter::once(&table.default)) {
            if let Err(e) = route.service.engine().flush_hits().await {
                tracing::warn!(error = %e, "replay counts not written at shutdown");
            }
        }
    }

    /// The route for a request path, matched on its [normalised](normalize) form so that
    /// `//payments`, `/./payments` or `/%70ayments` cannot slip past a route that requires
    /// a key. The request itself is forwarded as it came.
    fn route(&self, path: &str) -> &Route {
        let table = &self.inner;
        table.routes.iter().find(|route| route.settings.matches(path)).unwrap_or(&table.default)
    }

    /// The published policy, for a `GET` or `HEAD` of its path.
    fn policy<B>(&self, request: &Request<B>) -> Option<Response<ResponseBody>> {
        let (path, json) = self.inner.policy.as_ref()?;
        if request.uri().path() != path || !matches!(*request.method(), http::Method::GET | http::Method::HEAD) {
            return None;
        }
        let body = http_body_util::Full::new(json.clone()).map_err(|never| match never {}).boxed_unsync();
        let mut response = Response::new(body);
        response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        response.headers_mut().insert(header::CACHE_CONTROL, http::HeaderValue::from_static("max-age=300"));
        Some(response)
    }

    /// The problem to answer instead of routing, if any: a bad host, or a path whose
    /// route depends on how the upstream reads it.
    fn refusal<B>(&self, request: &Request<B>) -> Option<Response<ResponseBody>> {
        if let Err(detail) = check_host(request) {
            return Some(problem_response(
                "urn:oncely:problem:bad-host",
                "Bad Host",
                StatusCode::BAD_REQUEST,
                &detail,
                None,
            ));
        }
        let raw = request.uri().path();
        let lenient = lenient(raw)?;
        let strict = self.route(&normalize(raw));
        let other = self.route(&lenient);
        let covered = |route: &Route| route.layer.covers(request.method());
        if strict.settings.path == other.settings.path || !(covered(strict) || covered(other)) {
            return None;
        }
        let (strict, other) = (&strict.settings, &other.settings);
        let detail = format!(
            "the path {raw:?} falls under the route {:?} as written, and under {:?} as some servers read it; \
             send it without matrix parameters, encoded slashes or backslashes, or trailing encoded whitespace",
            strict.path, other.path
        );
        Some(problem_response(
            "urn:oncely:problem:ambiguous-path",
            "Ambiguous path",
            StatusCode::BAD_REQUEST,
            &detail,
            None,
        ))
    }
}

/// Checks the request's host: one `Host` field at most, and it, or HTTP/2's
/// `:authority`, a plain `host[:port]`. An empty `Host` (allowed when the target has no
/// authority) passes, and is not forwarded.
fn check_host<B>(request: &Request<B>) -> Result<(), String> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err("more than one Host field".to_string()),
        (Some(value), None) => match value.to_str() {
            Ok("") => return Ok(()),
            Ok(text) => text,
            Err(_) => return Err("the Host field is not visible ASCII".to_string()),
        },
        (None, _) => match request.uri().authority() {
            Some(authority) => authority.as_str(),
            None => return Ok(()),
        },
    };
    if valid_host(host) { Ok(()) } else { Err(format!("{host:?} is not a host name or address with an optional port")) }
}

/// The path as a lenient upstream may read it, if it has anything such an upstream reads
/// differently: `%2F`, `%5C` and `\` as `/`; `;` matrix parameters dropped from each
/// segment; encoded whitespace and control characters (`%00`-`%20`, `%7F`) trimmed from
/// the end of each segment; then [`normalize`]d. `None` when the path has none of `;`,
/// `\` or `%`.
pub fn lenient(path: &str) -> Option<String> {
    if !path.bytes().any(|b| matches!(b, b';' | b'\\' | b'%')) {
        return None;
    }
    let bytes = path.as_bytes();
    let decoded_at = |i: usize| -> Option<u8> {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes.get(i), bytes.get(i + 1), bytes.get(i + 2)) {
            (Some(b'%'), Some(&h), Some(&l)) => Some((hex(h)? * 16 + hex(l)?) as u8),
            _ => None,
        }
    };
    let mut slashed = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            slashed.push(b'/');
        } else if let Some(b'/' | b'\\') = decoded_at(i) {
            slashed.push(b'/');
            i += 3;
            continue;
        } else {
            slashed.push(bytes[i]);
        }
        i += 1;
    }
    let mut out: Vec<u8> = Vec::with_capacity(slashed.len());
    for (n, segment) in slashed.split(|&b| b == b'/').enumerate() {
        if n > 0 {
            out.push(b'/');
        }
        let mut segment = segment.split(|&b| b == b';').next().unwrap_or_default();
        while let [rest @ .., b'%', h, l] = segment
            && let (Some(h), Some(l)) = ((*h as char).to_digit(16), (*l as char).to_digit(16))
            && (h * 16 + l <= 0x20 || h * 16 + l == 0x7f)
        {
            segment = rest;
        }
        out.extend_from_slice(segment);
    }
    let text = String::from_utf8_lossy(&out);
    Some(normalize(&text).into_owned())
}

/// A path as an upstream is likely to read it, for route matching: percent-encoded
/// unreserved characters decoded (RFC 3986 §6.2.2.2), `.` and `..` segments removed
/// (§5.2.4), and runs of `/` collapsed. Paths with none of these are borrowed as they are.
pub fn normalize(path: &str) -> std::borrow::Cow<'_, str> {
    // One pass over the bytes (this runs on every request): `%`, `//` or `/.`.
    let bytes = path.as_bytes();
    let plain = bytes
        .iter()
        .enumerate()
        .all(|(i, &b)| b != b'%' && !(b == b'/' && matches!(bytes.get(i + 1), Some(b'/' | b'.'))));
    if plain {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let unreserved = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2))
            && let (Some(h), Some(l)) = (hex(h), hex(l))
            && unreserved((h * 16 + l) as u8)
        {
            decoded.push((h * 16 + l) as u8 as char);
            i += 3;
            continue;
        }
        decoded.push(bytes[i] as char);
        i += 1;
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    std::borrow::Cow::Owned(out)
}

impl tower::Service<Request<axum::body::Body>> for Routes {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = RoutesFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Ready to route: each request's route service is readied on its own, by the
        // `Oneshot` its future drives.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<axum::body::Body>) -> Self::Future {
        // The access line's fields are gathered only when it will be written. The URI's
        // clone shares its bytes: the path is not copied.
        let log = AccessLines.enabled().then(|| (request.method().clone(), request.uri().clone(), Instant::now()));
        let head = request.method() == http::Method::HEAD;
        let next = match self.refusal(&request).or_else(|| self.policy(&request)) {
            Some(answer) => Next::Refused { answer: Some(answer) },
            None => {
                let route = self.route(&normalize(request.uri().path()));
                let mut service = route.service.clone();
                if let Some(client) = &self.client {
                    service.get_mut().set_client(client.clone());
                }
                Next::Routed { call: service.oneshot(request) }
            }
        };
        RoutesFuture { next, log, head }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Routes`]: the route's own call polled in place (no box),
    /// and the access line of a request the layer did not log written at the end.
    pub struct RoutesFuture {
        #[pin]
        next: Next,
        log: Option<(http::Method, http::Uri, Instant)>,
        // A HEAD request: the response goes out without its body. hyper drops it over
        // HTTP/1.1 but sends it over HTTP/2, where a HEAD response with content is a
        // protocol error; the gateway's own answers (the policy, problems) have one.
        head: bool,
    }
}

pin_project_lite::pin_project! {
    /// A request refused before routing, or on its way through its route.
    #[project = NextProj]
    enum Next {
        Refused { answer: Option<Response<ResponseBody>> },
        Routed { #[pin] call: Oneshot<RouteService, Request<axum::body::Body>> },
    }
}

impl Future for RoutesFuture {
    type Output = Result<Response<ResponseBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match this.next.project() {
            NextProj::Refused { answer } => match answer.take() {
                Some(answer) => answer,
                None => panic!("RoutesFuture polled after it completed"),
            },
            NextProj::Routed { call } => match call.poll(cx) {
                Poll::Ready(Ok(response)) => response,
                Poll::Ready(Err(never)) => match never {},
                Poll::Pending => return Poll::Pending,
            },
        };
        if let Some((method, uri, started)) = this.log.take()
            // A keyed request's line is the layer's, with its key and outcome.
            && response.extensions().get::<KeyedOutcome>().is_none()
        {
            let finished = Instant::now();
            AccessLines.passed(&Passed {
                method: &method,
                path: uri.path(),
                status: response.status(),
                replayed: response.headers().contains_key("idempotent-replayed"),
                elapsed: finished.saturating_duration_since(started),
                finished,
            });
        }
        if *this.head {
            // The headers a GET would get, Content-Length included (as axum does).
            let (mut parts, body) = response.into_parts();
            if let Some(len) = hyper::body::Body::size_hint(&body).exact()
                && !parts.headers.contains_key(header::CONTENT_LENGTH)
            {
                parts.headers.insert(header::CONTENT_LENGTH, http::HeaderValue::from(len));
            }
            let empty = http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync();
            return Poll::Ready(Ok(Response::from_parts(parts, empty)));
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::{lenient, normalize};

    #[test]
    fn lenient_readings_drop_what_some_upstreams_drop() {
        for (raw, read) in [
            ("/payments", None),
            ("/payments;jsessionid=1", Some("/payments")),
            ("/payments;a=1/refunds;b", Some("/payments/refunds")),
            ("/payments%2F", Some("/payments/")),
            ("/payments%2f1", Some("/payments/1")),
            ("/payments%5Cx", Some("/payments/x")),
            ("/payments%20", Some("/payments")),
            ("/payments%09%00/1", Some("/payments/1")),
            ("/x%2F..%2Fpayments", Some("/payments")),
            ("/pay%20ments", Some("/pay%20ments")),
            ("/a/%", Some("/a/%")),
            ("/a/%2", Some("/a/%2")),
        ] {
            assert_eq!(lenient(raw).as_deref(), read, "{raw}");
        }
    }

    #[test]
    fn paths_are_matched_as_an_upstream_would_read_them() {
        for (raw, normal) in [
            ("/payments", "/payments"),
            ("//payments", "/payments"),
            ("/./payments", "/payments"),
            ("/x/../payments/", "/payments/"),
            ("/%70ayments", "/payments"),
            ("/%2Fpayments", "/%2Fpayments"),
            ("/pay%2dments/%7e", "/pay-ments/~"),
            ("/a/%", "/a/%"),
            ("/..", "/"),
        ] {
            assert_eq!(normalize(raw), normal, "{raw}");
        }
    }
}
