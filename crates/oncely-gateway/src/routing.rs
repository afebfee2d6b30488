//! The route table: each configured path prefix gets its own idempotency layer (its own
//! methods, key rule, retention, lease, conflict mode…) around the one proxy; the longest
//! matching prefix wins.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use oncely::Oncely;
use oncely::engine::DeferredCompletions;
use oncely_http::{Idempotency, IdempotencyLayer, ResponseBody};
use tokio_util::task::TaskTracker;
use tower::Layer;

use crate::config::{Config, RouteSettings, prefix_matches};
use crate::proxy::Proxy;
use crate::stores::DynStore;

type RouteService = Idempotency<Proxy, DynStore>;

/// Dispatches each request to its route's layered proxy, and logs one line per request.
#[derive(Clone)]
pub struct Routes {
    inner: Arc<Table>,
}

struct Table {
    routes: Vec<(String, RouteService)>,
    default: RouteService,
}

impl Routes {
    /// Builds one layer per route over `proxy`, all on `store`, spawning keyed operations
    /// on `tracker`.
    ///
    /// Every route keeps the results its store could not take in `deferred`, so that one
    /// readiness check sees them all and each route writes them before its next claim.
    pub fn new(
        config: &Config,
        store: &DynStore,
        proxy: &Proxy,
        tracker: &TaskTracker,
        deferred: &DeferredCompletions,
    ) -> Result<Self, String> {
        let build = |route: &RouteSettings| -> Result<RouteService, String> {
            let oncely = Oncely::builder(Arc::clone(store))
                .retention(route.ttl)
                .lease(route.lease)
                .conflict_mode(route.on_conflict)
                .track_background(tracker.clone())
                .deferred_completions(deferred.clone())
                .build()
                .map_err(|e| format!("route {}: {e}", route.path))?;
            let statuses = route.store_statuses.clone();
            let layer = IdempotencyLayer::new(oncely)
                .header_name(route.header.clone())
                .methods(route.methods.clone())
                .require_key(route.required)
                .max_body(route.max_body)
                .scope_headers(route.scope_headers.clone())
                .store_statuses(move |status| statuses.contains(status))
                .track_operations(tracker.clone());
            Ok(layer.layer(proxy.clone()))
        };
        let routes = config.routes.iter().map(|r| Ok((r.path.clone(), build(r)?))).collect::<Result<_, String>>()?;
        Ok(Self { inner: Arc::new(Table { routes, default: build(&config.defaults)? }) })
    }

    /// The route for a request path, matched on its [normalised](normalize) form so that
    /// `//payments`, `/./payments` or `/%70ayments` cannot slip past a route that requires
    /// a key. The request itself is forwarded as it came.
    fn route(&self, path: &str) -> &RouteService {
        let table = &self.inner;
        let path = normalize(path);
        table.routes.iter().find(|(prefix, _)| prefix_matches(prefix, &path)).map_or(&table.default, |(_, s)| s)
    }
}

/// A path as an upstream is likely to read it, for route matching: percent-encoded
/// unreserved characters decoded (RFC 3986 §6.2.2.2), `.` and `..` segments removed
/// (§5.2.4), and runs of `/` collapsed. Paths with none of these are borrowed as they are.
pub fn normalize(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains('%') && !path.contains("//") && !path.contains("/.") {
        return std::borrow::Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
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
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Every route's service is always ready: the proxy is.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<axum::body::Body>) -> Self::Future {
        // The access line's fields are gathered only when it will be written.
        let log = tracing::enabled!(target: "oncely::access", tracing::Level::INFO)
            .then(|| (request.method().clone(), request.uri().path().to_string(), Instant::now()));
        // The route services need no `poll_ready` first: `Idempotency` is ready when its
        // inner service is, and the proxy always is (its pool queues internally).
        let response = self.route(request.uri().path()).clone().call(request);
        Box::pin(async move {
            let response = response.await?;
            let Some((method, path, started)) = log else { return Ok(response) };
            let replayed = response.headers().contains_key("idempotent-replayed");
            tracing::info!(
                target: "oncely::access",
                %method,
                path,
                status = response.status().as_u16(),
                replayed,
                micros = started.elapsed().as_micros() as u64,
            );
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::normalize;

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
