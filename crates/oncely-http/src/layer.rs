//! [`IdempotencyLayer`]: the builder methods named for behaviour. The settings they write
//! are in [`crate::settings`].

use std::fmt;
use std::sync::Arc;

use http::{HeaderName, Method, StatusCode};
use oncely::{ConflictMode, Oncely, Scope, Store};
use tower_layer::Layer;

use crate::access::AccessLog;
use crate::scope::ScopeSource;
use crate::service::Idempotency;
use crate::settings::Settings;
use oncely::fingerprint::JsonPointer;

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

/// The default stored statuses: every status but 408, 425, 429 and 503, which say that
/// the request was not processed, so they release the key and a retry runs again.
///
/// A 500 is stored: the handler may have acted before it failed (charged the card, then
/// failed to write its own record), and a client that retries every 5xx must not make it
/// act twice. Stripe replays 500s for the same reason.
///
/// ```
/// use http::StatusCode;
/// use oncely_http::default_stored_status;
///
/// assert!(default_stored_status(StatusCode::INTERNAL_SERVER_ERROR));
/// assert!(!default_stored_status(StatusCode::SERVICE_UNAVAILABLE));
/// ```
pub fn default_stored_status(status: StatusCode) -> bool {
    !matches!(status.as_u16(), 408 | 425 | 429 | 503)
}

impl<St: Store> IdempotencyLayer<St> {
    /// A layer over `oncely` with the defaults: POST and PATCH covered, key optional, the
    /// `Idempotency-Key` header, 1 MiB request bodies, 1 MiB stored responses, scope from
    /// `Authorization` and `Cookie`, fail-closed.
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

    /// Lowers the stored-response cap to fit a store that takes payloads of at most
    /// `payload_bytes` ([`StoreAbilities::max_payload`](oncely::store::StoreAbilities::max_payload)):
    /// the body cap becomes at most `payload_bytes` less 64 KiB for the status and
    /// headers. A larger body is then completed as "not kept" (a retry gets
    /// `response-not-stored`, never a second run) rather than refused by the store.
    pub fn fit_store_payload(self, payload_bytes: usize) -> Self {
        let cap = payload_bytes.saturating_sub(64 * 1024);
        self.with(|s| s.max_stored_response = s.max_stored_response.min(cap))
    }

    /// The response header that marks a replay (default `Idempotent-Replayed: true`).
    pub fn replayed_header(self, name: HeaderName) -> Self {
        self.with(|s| s.replayed_header = name)
    }

    /// Who owns a key: where the scope (the principal) of a request comes from (default
    /// the raw `Authorization` and `Cookie` fields). Two principals never see each
    /// other's records. See the [`scope`](crate::scope) module for each source and what
    /// it protects against; a request whose source cannot find its principal is 401.
    ///
    /// ```
    /// use oncely::{MemoryStore, Oncely};
    /// use oncely_http::{IdempotencyLayer, ScopeSource};
    ///
    /// let layer = IdempotencyLayer::new(Oncely::new(MemoryStore::new())).scope(ScopeSource::cookies(["session"]));
    /// # let _ = layer;
    /// ```
    pub fn scope(self, source: ScopeSource) -> Self {
        self.with(|s| s.scope = source)
    }

    /// The request headers whose values, hashed, are the scope: shorthand for
    /// [`scope`](Self::scope)`(ScopeSource::headers(names))`.
    pub fn scope_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.scope(ScopeSource::headers(names))
    }

    /// The scope from a function of the request head, for principals established by an
    /// earlier layer: shorthand for [`scope`](Self::scope)`(ScopeSource::function(f))`.
    ///
    /// An axum application that authenticates its users in a middleware (a session
    /// lookup, its own token check) puts the user in the request extensions; the layer,
    /// added after it, scopes by that user:
    ///
    /// ```
    /// use axum::{Extension, Router, extract::Request, middleware::{self, Next}, response::Response, routing::post};
    /// use oncely::{MemoryStore, Oncely, Scope};
    /// use oncely_http::IdempotencyLayer;
    ///
    /// #[derive(Clone)]
    /// struct User { id: u64 }
    ///
    /// async fn authenticate(mut request: Request, next: Next) -> Response {
    ///     // Look the session up; here every request is user 7.
    ///     request.extensions_mut().insert(User { id: 7 });
    ///     next.run(request).await
    /// }
    ///
    /// async fn pay(Extension(user): Extension<User>) -> String {
    ///     format!("charged user {}", user.id)
    /// }
    ///
    /// let idempotency = IdempotencyLayer::new(Oncely::new(MemoryStore::new())).scope_with(|parts| {
    ///     match parts.extensions.get::<User>() {
    ///         Some(user) => Scope::new(format!("user:{}", user.id)),
    ///         None => Scope::global(), // unreachable behind `authenticate`
    ///     }
    /// });
    /// // Layers added later run first: authenticate, then idempotency, then the handler.
    /// let app: Router = Router::new()
    ///     .route("/payments", post(pay))
    ///     .route_layer(idempotency)
    ///     .route_layer(middleware::from_fn(authenticate));
    /// ```
    pub fn scope_with(self, scope: impl Fn(&http::request::Parts) -> Scope + Send + Sync + 'static) -> Self {
        self.scope(ScopeSource::function(scope))
    }

    /// Whether every request gets the same scope (a key is shared by all clients).
    pub fn scope_is_shared_by_all(&self) -> bool {
        self.settings.scope.is_shared_by_all()
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

    /// The status of the `key-reused` problem, for a key sent again with another request
    /// (default 422, as the draft says). Stripe's SDKs raise their `IdempotencyError`
    /// only for a 400 whose `error.type` is `idempotency_error`: set 400 for them. A
    /// status outside 400..=499 is ignored.
    pub fn mismatch_status(self, status: StatusCode) -> Self {
        if !status.is_client_error() {
            return self;
        }
        self.with(|s| s.mismatch_status = status)
    }

    /// A page that documents this API's idempotency policy: problem answers link to it
    /// (`Link: <url>; rel="describedby"`, and `error.doc_url`). Default none.
    pub fn documentation_url(self, url: impl Into<String>) -> Self {
        let url: String = url.into();
        self.with(|s| s.documentation_url = (!url.is_empty()).then(|| Arc::from(url)))
    }

    /// What happens to a key whose operation's outcome nobody knows: the inner service
    /// returned an error, its response body broke off, or it said so with
    /// [`OutcomeUnknown`](crate::OutcomeUnknown) (a proxy whose upstream connection broke
    /// after the request was sent).
    ///
    /// `true` (the default): the key holds an "outcome unknown" record for the retention,
    /// and every retry gets at once a 502 `outcome-unknown` problem with
    /// `Stripe-Should-Retry: false`, until an operator who has checked what happened
    /// deletes the key. Nothing runs twice.
    ///
    /// `false`: the key is neither stored nor released; it lapses with its lease, and a
    /// retry after that runs the operation again (at most once more per lease).
    pub fn hold_unknown_outcomes(self, hold: bool) -> Self {
        self.with(|s| s.hold_unknown = hold)
    }

    /// How long a client waits for a keyed operation's response (default: as long as it
    /// takes). Past it, the client gets 504 `upstream-timeout` with `Stripe-Should-Retry:
    /// true`, while the operation goes on in its own task with its lease kept alive; its
    /// response is stored when it comes, so the retry (which waits, in wait mode) gets it.
    /// Bound the operation itself inside the inner service (the gateway's completion
    /// limit); an answer that never comes is an unknown outcome
    /// ([`hold_unknown_outcomes`](Self::hold_unknown_outcomes)).
    pub fn answer_within(self, limit: std::time::Duration) -> Self {
        self.with(|s| s.answer_within = Some(limit))
    }

    /// Takes the key from the request body instead of a header: the JSON member at
    /// `pointer` (a string or an integer), for webhook deliveries and queue messages that
    /// carry their id (`/id`, `/data/object/id`). A body without it, or not JSON, has no
    /// key (400 `missing-key` when [required](Self::require_key), else passed through);
    /// a member that is not a valid key is 400 `invalid-key`. The header is not read.
    ///
    /// ```
    /// use oncely::{MemoryStore, Oncely};
    /// use oncely_http::IdempotencyLayer;
    ///
    /// let pointer = "/id".parse().expect("a JSON pointer");
    /// let layer = IdempotencyLayer::new(Oncely::new(MemoryStore::new())).key_from_body(pointer);
    /// # let _ = layer;
    /// ```
    pub fn key_from_body(self, pointer: JsonPointer) -> Self {
        self.with(|s| s.key_pointer = Some(pointer))
    }

    /// JSON members the fingerprint leaves out (`/metadata/sent_at`, a delivery's attempt
    /// counter): a retry that differs only there is the same request.
    pub fn fingerprint_ignore(self, pointers: impl IntoIterator<Item = JsonPointer>) -> Self {
        self.with(|s| s.fingerprint_rules.ignore = pointers.into_iter().collect())
    }

    /// Request headers the fingerprint takes in (`X-Api-Version`): the same key sent with
    /// another value is a reused key.
    pub fn fingerprint_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.with(|s| s.fingerprint_rules.headers = names.into_iter().collect())
    }

    /// Who writes the access line of each keyed request that reached its claim (default
    /// [`TracingAccessLog`](crate::TracingAccessLog): an `INFO` event with target
    /// `oncely::access`). A server with a writer of its own hands it here, and the layer
    /// writes no event.
    ///
    /// ```
    /// use oncely::{MemoryStore, Oncely};
    /// use oncely_http::{Access, AccessLog, IdempotencyLayer};
    ///
    /// struct Stdout;
    /// impl AccessLog for Stdout {
    ///     fn log(&self, access: &Access<'_>) {
    ///         println!("{} {} {}", access.method, access.path, access.outcome);
    ///     }
    /// }
    ///
    /// let layer = IdempotencyLayer::new(Oncely::new(MemoryStore::new())).access_log(Stdout);
    /// # let _ = layer;
    /// ```
    pub fn access_log(self, log: impl AccessLog) -> Self {
        self.with(|s| s.access_log = Arc::new(log))
    }

    /// Whether requests with this method are covered (others pass through untouched).
    pub fn covers(&self, method: &Method) -> bool {
        self.settings.methods.contains(method)
    }

    /// The policy this layer applies, for publishing (the draft asks servers to document
    /// it): serialise it as JSON.
    ///
    /// ```
    /// use oncely::{MemoryStore, Oncely};
    /// use oncely_http::IdempotencyLayer;
    ///
    /// let policy = IdempotencyLayer::new(Oncely::new(MemoryStore::new())).require_key(true).policy();
    /// let json = serde_json::to_value(&policy).expect("serialises");
    /// assert_eq!(json["required"], true);
    /// assert_eq!(json["on_conflict"], "wait");
    /// ```
    pub fn policy(&self) -> Policy {
        let s = &self.settings;
        let engine = self.oncely.config();
        let (on_conflict, wait_timeout) = match engine.conflict {
            ConflictMode::Reject => ("reject", None),
            ConflictMode::Wait { timeout } => ("wait", Some(timeout.as_secs_f64())),
        };
        let released: Vec<u16> = (100..=599u16)
            .filter(|code| StatusCode::from_u16(*code).is_ok_and(|status| !(s.stores_status)(status)))
            .collect();
        Policy {
            header: match &s.key_pointer {
                Some(pointer) => format!("body:{pointer}"),
                None => s.header.as_str().to_string(),
            },
            methods: s.methods.iter().map(|m| m.as_str().to_string()).collect(),
            required: s.required,
            scope: format!("{:?}", s.scope),
            key_format: "an sf-string or a bare token of 1 to 255 visible ASCII characters",
            retention_seconds: engine.retention.as_secs_f64(),
            lease_seconds: engine.lease.as_secs_f64(),
            on_conflict,
            wait_timeout_seconds: wait_timeout,
            fingerprint: "method, path and query, media type and body (JSON canonicalised)",
            fingerprint_ignores: s.fingerprint_rules.ignore.iter().map(|p| p.as_str().to_string()).collect(),
            fingerprint_headers: s.fingerprint_rules.headers.iter().map(|h| h.as_str().to_string()).collect(),
            released_statuses: released,
            mismatch_status: s.mismatch_status.as_u16(),
            unknown_outcomes: if s.hold_unknown { "held" } else { "lapse with the lease" },
            max_body: s.max_body,
            documentation_url: s.documentation_url.as_deref().map(str::to_string),
        }
    }
}

/// The idempotency policy of one [`IdempotencyLayer`], as published (JSON).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Policy {
    /// The request header carrying the key, or `body:POINTER` when it is taken from the body.
    pub header: String,
    /// The methods covered.
    pub methods: Vec<String>,
    /// Whether a covered request without a key is refused.
    pub required: bool,
    /// Who owns a key: the scope's sources (names only, never values).
    pub scope: String,
    /// What a key may be.
    pub key_format: &'static str,
    /// How long a result is replayed, in seconds.
    pub retention_seconds: f64,
    /// How long a crashed request blocks its key, in seconds.
    pub lease_seconds: f64,
    /// `wait` or `reject`.
    pub on_conflict: &'static str,
    /// In wait mode, how long a duplicate waits, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_timeout_seconds: Option<f64>,
    /// What the fingerprint covers.
    pub fingerprint: &'static str,
    /// JSON members the fingerprint leaves out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fingerprint_ignores: Vec<String>,
    /// Request headers the fingerprint takes in.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fingerprint_headers: Vec<String>,
    /// The statuses that release the key instead of being stored (all others are stored
    /// and replayed).
    pub released_statuses: Vec<u16>,
    /// The status of a reused key.
    pub mismatch_status: u16,
    /// What happens to a key whose outcome is unknown.
    pub unknown_outcomes: &'static str,
    /// The largest request body, in bytes.
    pub max_body: usize,
    /// Where the policy is documented.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub documentation_url: Option<String>,
}

/// How many operations each scope runs at the moment, for
/// [`IdempotencyLayer::max_in_progress_per_scope`].
///
/// Hashed with foldhash (seeded per map, minimally resistant to crafted collisions): every
/// keyed request takes and gives back a place, two to four look-ups that SipHash made cost
/// some 150 instructions each. The map holds only the scopes with a request in progress,
/// at most the connection caps' worth, so a client that crafted colliding scopes could
/// lengthen only look-ups in a map that small.
#[derive(Clone, Debug, Default)]
pub(crate) struct InProgressCounts(
    Arc<std::sync::Mutex<std::collections::HashMap<Scope, usize, foldhash::quality::RandomState>>>,
);

impl InProgressCounts {
    /// Takes one of `scope`'s `max` places; `None` when all are taken. The place is given
    /// back when the returned value drops.
    pub(crate) fn take(&self, scope: &Scope, max: usize) -> Option<InProgressPlace> {
        let mut counts = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match counts.get_mut(scope) {
            Some(count) if *count >= max => return None,
            Some(count) => *count += 1,
            None if max == 0 => return None,
            None => {
                counts.insert(scope.clone(), 1);
            }
        }
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
        Idempotency::new(inner, self)
    }
}
