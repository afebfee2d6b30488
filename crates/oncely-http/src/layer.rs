//! [`IdempotencyLayer`]: the settings, and the builder methods named for behaviour.

use std::fmt;
use std::sync::Arc;

use http::{HeaderName, Method, StatusCode, header};
use oncely::{Oncely, Scope, Store};
use tower_layer::Layer;

use crate::request::ScopeSource;
use crate::service::Idempotency;

/// Wraps a service so that each keyed request runs once. See the [crate docs](crate).
///
/// The engine ([`Oncely`]) supplies the store, the retention, the lease and whether a
/// duplicate of a running request is rejected (409) or waits for its result.
///
/// ```
/// use axum::{Router, routing::post};
/// use oncely::{MemoryStore, Oncely};
/// use oncely_http::IdempotencyLayer;
///
/// let app: Router = Router::new()
///     .route("/payments", post(|| async { "charged" }))
///     .route_layer(IdempotencyLayer::new(Oncely::new(MemoryStore::new())).require_key(true));
/// ```
pub struct IdempotencyLayer<St> {
    pub(crate) oncely: Oncely<St>,
    pub(crate) settings: Arc<Settings>,
}

impl<St> Clone for IdempotencyLayer<St> {
    fn clone(&self) -> Self {
        Self { oncely: self.oncely.clone(), settings: Arc::clone(&self.settings) }
    }
}

impl<St> fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer").field("oncely", &self.oncely).field("settings", &self.settings).finish()
    }
}

type StatusFilter = dyn Fn(StatusCode) -> bool + Send + Sync;

/// The layer's settings; shared by every clone of the service.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) header: HeaderName,
    pub(crate) methods: Vec<Method>,
    pub(crate) required: bool,
    pub(crate) max_body: usize,
    pub(crate) max_stored_response: usize,
    pub(crate) replayed_header: HeaderName,
    pub(crate) scope: ScopeSource,
    pub(crate) stores_status: Arc<StatusFilter>,
    pub(crate) not_replayed: Vec<HeaderName>,
    pub(crate) fail_open: bool,
    pub(crate) tracker: Option<tokio_util::task::TaskTracker>,
    pub(crate) max_decoded_body: usize,
    pub(crate) takeover_header: Option<HeaderName>,
    pub(crate) max_in_progress_per_scope: usize,
    /// Shared by every clone of the layer (and kept by `Arc::make_mut` copies).
    pub(crate) in_progress: InProgressCounts,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("header", &self.header)
            .field("methods", &self.methods)
            .field("required", &self.required)
            .field("max_body", &self.max_body)
            .field("max_stored_response", &self.max_stored_response)
            .field("replayed_header", &self.replayed_header)
            .field("scope", &self.scope)
            .field("not_replayed", &self.not_replayed)
            .field("fail_open", &self.fail_open)
            .field("max_decoded_body", &self.max_decoded_body)
            .field("takeover_header", &self.takeover_header)
            .field("max_in_progress_per_scope", &self.max_in_progress_per_scope)
            .finish_non_exhaustive()
    }
}

/// The default stored statuses: every status but 5xx, 408 and 429, which release the key
/// so that the retry runs again.
pub fn default_stored_status(status: StatusCode) -> bool {
    !(status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS)
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            header: HeaderName::from_static("idempotency-key"),
            methods: vec![Method::POST, Method::PATCH],
            required: false,
            max_body: 1024 * 1024,
            max_stored_response: 1024 * 1024,
            replayed_header: HeaderName::from_static("idempotent-replayed"),
            scope: ScopeSource::default(),
            stores_status: Arc::new(default_stored_status),
            not_replayed: vec![header::SET_COOKIE],
            fail_open: false,
            tracker: None,
            max_decoded_body: 8 * 1024 * 1024,
            takeover_header: Some(HeaderName::from_static("idempotency-takeover")),
            max_in_progress_per_scope: 1000,
            in_progress: InProgressCounts::default(),
        }
    }
}

impl<St: Store> IdempotencyLayer<St> {
    /// A layer over `oncely` with the defaults: POST and PATCH covered, key optional, the
    /// `Idempotency-Key` header, 1 MiB request bodies, 1 MiB stored responses, scope from
    /// `Authorization`, fail-closed.
    pub fn new(oncely: Oncely<St>) -> Self {
        Self { oncely, settings: Arc::new(Settings::default()) }
    }

    fn with(mut self, change: impl FnOnce(&mut Settings)) -> Self {
        change(Arc::make_mut(&mut self.settings));
        self
    }

    /// The request header carrying the key (default `Idempotency-Key`).
    pub fn header_name(self, name: HeaderName) -> Self {
        self.with(|s| s.header = name)
    }

    /// The methods covered (default POST and PATCH); requests with others pass through
    /// untouched.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.with(|s| s.methods = methods.into_iter().collect())
    }

    /// Whether a covered request without a key is refused with 400 (`true`) or passed
    /// through untouched (`false`, the default).
    pub fn require_key(self, required: bool) -> Self {
        self.with(|s| s.required = required)
    }

    /// The largest request body read (default 1 MiB). A larger one is answered 413 before
    /// anything is stored; bodies are never read beyond this.
    pub fn max_body(self, bytes: usize) -> Self {
        self.with(|s| s.max_body = bytes)
    }

    /// The largest response body stored for replay (default 1 MiB).
    ///
    /// Past it, the first client still gets the whole response (streamed on), and the key
    /// is completed with a marker: a retry gets a 500 `response-not-stored` problem
    /// marked replayed. A completed operation is never silently run again.
    pub fn max_stored_response(self, bytes: usize) -> Self {
        self.with(|s| s.max_stored_response = bytes)
    }

    /// The response header that marks a replay (default `Idempotent-Replayed: true`).
    pub fn replayed_header(self, name: HeaderName) -> Self {
        self.with(|s| s.replayed_header = name)
    }

    /// The request headers whose values, hashed, are the scope (default
    /// `Authorization`). Two principals never see each other's records.
    pub fn scope_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let names: Arc<[HeaderName]> = names.into_iter().collect();
        self.with(|s| s.scope = ScopeSource::Headers(names))
    }

    /// The scope from a function of the request head, for principals established by an
    /// earlier layer.
    pub fn scope_with(self, scope: impl Fn(&http::request::Parts) -> Scope + Send + Sync + 'static) -> Self {
        self.with(|s| s.scope = ScopeSource::Function(Arc::new(scope)))
    }

    /// Which response statuses are stored for replay; the others release the key so a
    /// retry runs again (default [`default_stored_status`]).
    pub fn store_statuses(self, stores: impl Fn(StatusCode) -> bool + Send + Sync + 'static) -> Self {
        self.with(|s| s.stores_status = Arc::new(stores))
    }

    /// Response headers not stored for replay (default `Set-Cookie`). Hop-by-hop headers
    /// and `Date` are never stored.
    pub fn not_replayed_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.with(|s| s.not_replayed = names.into_iter().collect())
    }

    /// Spawns each keyed operation on `tracker`, so that a graceful shutdown can wait for
    /// operations whose clients hung up: `tracker.close(); tracker.wait().await` returns
    /// once every running operation has stored its result.
    pub fn track_operations(self, tracker: tokio_util::task::TaskTracker) -> Self {
        self.with(|s| s.tracker = Some(tracker))
    }

    /// When the store fails: `false` (default) answers 503 with `Retry-After`; `true`
    /// passes the request through without idempotency, and logs it, while the store cannot
    /// answer (unavailable, or full). A store that answers with a damaged record is never
    /// passed through: the operation may have completed.
    pub fn fail_open(self, open: bool) -> Self {
        self.with(|s| s.fail_open = open)
    }

    /// The largest decoded size of a `Content-Encoding: gzip` request body (default
    /// 8 MiB). The body is decoded only to fingerprint it (the inner service gets it as it
    /// came); one that inflates past this is answered 413 before anything is stored.
    pub fn max_decoded_body(self, bytes: usize) -> Self {
        self.with(|s| s.max_decoded_body = bytes)
    }

    /// The request header that tells the inner service its request takes over a claim
    /// whose holder's lease lapsed (default `Idempotency-Takeover: true`; `None` sends
    /// nothing). Such a request may repeat one the service already saw (its first
    /// attempt crashed or lost its connection), so a service that can check its own state
    /// before acting again should. The same header sent by a client is removed from every
    /// request the layer sees. Handlers also find the [`Takeover`](crate::Takeover)
    /// extension.
    pub fn takeover_header(self, name: Option<HeaderName>) -> Self {
        self.with(|s| s.takeover_header = name)
    }

    /// How many operations one principal (scope) may run at once through this layer in
    /// this process (default 1,000). A keyed request past it is answered 429
    /// `too-many-in-progress` with `Retry-After: 1` before it claims anything, so one
    /// client cannot fill the store with in-progress records or hold every worker.
    ///
    /// A place is held from the claim until the operation's response is produced (so a
    /// waiter in wait mode holds one while it waits, and a replay holds one for its
    /// claim). Every request without a scope shares one scope (the global one): raise
    /// this when anonymous clients may legitimately run many operations at once.
    pub fn max_in_progress_per_scope(self, max: usize) -> Self {
        self.with(|s| s.max_in_progress_per_scope = max)
    }
}

/// How many operations each scope runs at the moment, for
/// [`IdempotencyLayer::max_in_progress_per_scope`].
#[derive(Clone, Debug, Default)]
pub(crate) struct InProgressCounts(Arc<std::sync::Mutex<std::collections::HashMap<Scope, usize>>>);

impl InProgressCounts {
    /// Takes one of `scope`'s `max` places; `None` when all are taken. The place is given
    /// back when the returned value drops.
    pub(crate) fn take(&self, scope: &Scope, max: usize) -> Option<InProgressPlace> {
        let mut counts = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = counts.entry(scope.clone()).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(InProgressPlace { counts: self.clone(), scope: scope.clone() })
    }
}

/// One running operation's place in its scope's count.
pub(crate) struct InProgressPlace {
    counts: InProgressCounts,
    scope: Scope,
}

impl Drop for InProgressPlace {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.scope) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.scope);
            }
        }
    }
}

impl<S, St: Store> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::new(inner, self.clone())
    }
}
