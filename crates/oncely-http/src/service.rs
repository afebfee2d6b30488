//! [`Idempotency`]: the service, and its response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt, stream};
use http::{HeaderValue, Request, Response, header};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, BodyStream, Either, Full, LengthLimitError, Limited, StreamBody};
use oncely::{Acquired, ClaimGuard, Error, Fingerprint, IdempotencyKey, Oncely, Replay, StorageKey, Store, StoreError};
use tower_service::Service;

use crate::access::Access;
use crate::detach::Detachable;
use crate::hop_by_hop::HopByHop;
use crate::layer::{IdempotencyLayer, InProgressPlace};
use crate::problem::{Problem, ProblemKind};
use crate::request::{
    DecodedBodyTooLarge, FingerprintRules, fingerprint_gzip_known, gunzip, is_gzip, key_from_json_body,
    request_fingerprint_with,
};
use crate::settings::Settings;
use crate::stored::{self, StoredBody, StoredResponse};
use crate::{
    BoxError, KeyedOutcome, NotProcessed, OutcomeUnknown, RequestBody, ResponseBody, Takeover, parse_key_header,
};

/// How long a client is told to wait after a 503 from a failing store.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The service [`IdempotencyLayer`] wraps around an inner service.
///
/// The inner service sees the request with a buffered body ([`RequestBody::Left`]) on
/// keyed requests, or the untouched body ([`RequestBody::Right`]) on passed-through ones,
/// and the parsed [`IdempotencyKey`] in the request extensions.
pub struct Idempotency<S, St> {
    inner: S,
    oncely: Oncely<St>,
    settings: Arc<Settings>,
}

impl<S: Clone, St> Clone for Idempotency<S, St> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), oncely: self.oncely.clone(), settings: Arc::clone(&self.settings) }
    }
}

impl<S: fmt::Debug, St> fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("oncely", &self.oncely)
            .field("settings", &self.settings)
            .finish()
    }
}

impl<S, St> Idempotency<S, St> {
    pub(crate) fn new(inner: S, layer: &IdempotencyLayer<St>) -> Self {
        Self { inner, oncely: layer.oncely.clone(), settings: Arc::clone(&layer.settings) }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, the layer's settings dropped.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The engine the layer claims keys with: for a server that flushes its replay
    /// counts at shutdown ([`Oncely::flush_hits`]).
    pub fn engine(&self) -> &Oncely<St> {
        &self.oncely
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Idempotency`]. It allocates nothing for a request passed
    /// through (it polls the inner service's future in place) or answered at once (a
    /// missing or invalid key); a keyed request's work is one boxed future.
    pub struct ResponseFuture<F, E> {
        #[pin]
        kind: Kind<F, E>,
    }
}

pin_project_lite::pin_project! {
    #[project = KindProj]
    enum Kind<F, E> {
        /// Answered without the inner service; taken when polled.
        Ready { response: Option<Response<ResponseBody>> },
        /// Passed through: the inner service's own future, its body boxed at the end.
        PassThrough { #[pin] future: F },
        /// A keyed request: reading the body, claiming, replaying or executing.
        Keyed { future: Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, E>> + Send>> },
    }
}

impl<F, E> ResponseFuture<F, E> {
    fn keyed(future: impl Future<Output = Result<Response<ResponseBody>, E>> + Send + 'static) -> Self {
        Self { kind: Kind::Keyed { future: Box::pin(future) } }
    }

    fn ready(response: Response<ResponseBody>) -> Self {
        Self { kind: Kind::Ready { response: Some(response) } }
    }

    fn pass_through(future: F) -> Self {
        Self { kind: Kind::PassThrough { future } }
    }
}

impl<F, E, B> Future for ResponseFuture<F, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Ready { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => panic!("ResponseFuture polled after it completed"),
            },
            KindProj::PassThrough { future } => future.poll(cx).map_ok(|response| response.map(boxed)),
            KindProj::Keyed { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, E> fmt::Debug for ResponseFuture<F, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S, St>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let settings = &self.settings;
        if let Some(name) = &settings.takeover_header {
            // Only the layer says that a request takes over a lapsed claim: a client's
            // own claim to it is dropped, on every request the layer sees.
            request.headers_mut().remove(name);
        }
        if !settings.methods.contains(request.method()) {
            settings.counters.passed_through.increment(1);
            return ResponseFuture::pass_through(self.inner.call(request.map(Either::Right)));
        }
        let key = match parse_key_header(request.headers(), &settings.header) {
            // The key is in the body: read it first.
            _ if settings.key_pointer.is_some() => None,
            Ok(Some(key)) => Some(key),
            Ok(None) if settings.required => {
                let detail =
                    format!("{} requests to this resource need an {} header", request.method(), settings.header);
                return ResponseFuture::ready(answer(settings, ProblemKind::MissingKey, &detail, None));
            }
            Ok(None) => {
                settings.counters.passed_through.increment(1);
                return ResponseFuture::pass_through(self.inner.call(request.map(Either::Right)));
            }
            Err(e) => return ResponseFuture::ready(answer(settings, ProblemKind::InvalidKey, &e.to_string(), None)),
        };
        // The readied service goes with this request; the clone stays for the next
        // (tower's usual pattern).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::keyed(keyed(inner, self.oncely.clone(), Arc::clone(settings), key, request))
    }
}

/// A keyed request: read the body, claim the key, then replay, refuse, or execute. `key`
/// is `None` when it is to be found in the body.
async fn keyed<S, St, ReqBody, ResBody>(
    mut inner: S,
    oncely: Oncely<St>,
    settings: Arc<Settings>,
    key: Option<IdempotencyKey>,
    request: Request<ReqBody>,
) -> Result<Response<ResponseBody>, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();
    let too_large = || {
        let detail = format!("the request body is over the limit of {} bytes", settings.max_body);
        answer(&settings, ProblemKind::BodyTooLarge, &detail, None)
    };
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > settings.max_body as u64) {
        return Ok(too_large());
    }
    let body = match Limited::new(body, settings.max_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Ok(too_large()),
        Err(e) => return Ok(answer(&settings, ProblemKind::BodyUnreadable, &e.to_string(), None)),
    };
    let key = match (key, &settings.key_pointer) {
        (Some(key), _) => key,
        // `call` sends a request without a key here only when the key is in the body.
        (None, None) => {
            let response = inner.call(Request::from_parts(parts, Either::Left(Full::new(body)))).await?;
            return Ok(response.map(boxed));
        }
        (None, Some(pointer)) => match key_in_body(&parts, &body, pointer, settings.max_decoded_body) {
            Ok(Some(key)) => key,
            Ok(None) if settings.required => {
                let detail = format!("{} requests to this resource need a key at {pointer} in the body", parts.method);
                return Ok(answer(&settings, ProblemKind::MissingKey, &detail, None));
            }
            Ok(None) => {
                settings.counters.passed_through.increment(1);
                let response = inner.call(Request::from_parts(parts, Either::Left(Full::new(body)))).await?;
                return Ok(response.map(boxed));
            }
            Err(KeyInBodyError::TooLarge(e)) => {
                return Ok(answer(&settings, ProblemKind::BodyTooLarge, &e.to_string(), None));
            }
            Err(KeyInBodyError::Invalid(e)) => {
                let detail = format!("the body's {pointer}: {e}");
                return Ok(answer(&settings, ProblemKind::InvalidKey, &detail, None));
            }
        },
    };

    // From the claim on, the work must finish whatever the client does: a client that
    // disconnects drops this future, never a claim half made (a store may commit a claim
    // whose caller has gone) nor the operation, whose result is stored for the retry. It
    // runs here, and moves into a task of its own only if this future is dropped.
    let settings_for_task = Arc::clone(&settings);
    let claim_and_run = Box::pin(claim_and_run(inner, oncely, settings_for_task, key, parts, body));
    match Detachable::new(claim_and_run, settings.tracker.as_ref()).await {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %message, "the inner service panicked; its key lapses with its lease");
            Ok(answer(&settings, ProblemKind::HandlerFailed, "the request handler failed", None))
        }
    }
}

enum KeyInBodyError {
    TooLarge(DecodedBodyTooLarge),
    Invalid(crate::KeyFromBodyError),
}

/// The key at `pointer` in the body, decoded first when it is gzip (bounded, as for the
/// fingerprint).
fn key_in_body(
    parts: &http::request::Parts,
    body: &Bytes,
    pointer: &oncely::fingerprint::JsonPointer,
    max_decoded: usize,
) -> Result<Option<IdempotencyKey>, KeyInBodyError> {
    let decoded = if is_gzip(parts) { gunzip(body, max_decoded).map_err(KeyInBodyError::TooLarge)? } else { None };
    key_from_json_body(decoded.as_deref().unwrap_or(body), pointer).map_err(KeyInBodyError::Invalid)
}

/// Claims the key, then replays, refuses, or executes: the part of a keyed request that
/// must finish whatever happens to the client's connection. Writes the request's access
/// line when it is done, so a request whose client hung up has one too.
async fn claim_and_run<S, St, ReqBody, ResBody>(
    inner: S,
    oncely: Oncely<St>,
    settings: Arc<Settings>,
    key: IdempotencyKey,
    parts: http::request::Parts,
    body: Bytes,
) -> Result<Response<ResponseBody>, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    // The line's fields, its clock read included, are gathered only when it is written.
    // The URI's clone shares its bytes: the path is not copied.
    let log =
        settings.access_log.enabled().then(|| (parts.method.clone(), parts.uri.clone(), std::time::Instant::now()));
    // The storage key for the line only when the line is written.
    let mut storage_key = log.is_some().then_some(None);
    let result = decide(inner, oncely, &settings, key, parts, body, &mut storage_key).await;
    if let Some((method, uri, started)) = log {
        let (status, outcome) = match &result {
            Ok((response, outcome)) => (Some(response.status()), outcome.as_str()),
            Err(_) => (None, Outcome::Unknown.as_str()),
        };
        let finished = std::time::Instant::now();
        settings.access_log.log(&Access {
            method: &method,
            path: uri.path(),
            key: storage_key.flatten().as_ref(),
            outcome,
            status,
            elapsed: finished.saturating_duration_since(started),
            finished,
        });
    }
    result.map(|(mut response, outcome)| {
        response.extensions_mut().insert(KeyedOutcome(outcome.as_str()));
        response
    })
}

/// What became of a keyed request, for its access line and the response extension
/// [`KeyedOutcome`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The operation ran and its response was stored (or, past the storage cap, marked).
    Executed,
    /// A stored response was replayed at once.
    Replayed,
    /// The request met the operation running, waited, and got its response.
    Waited,
    /// The operation was still running (reject mode, or the wait timed out): 409.
    Conflict,
    /// The key was used for another request.
    Mismatch,
    /// Nobody knows whether the operation took effect (now, or replayed).
    Unknown,
    /// The operation ran and answered a status that releases the key, or did not run.
    Released,
    /// The client got 504; the operation goes on in the background.
    StillRunning,
    /// Refused before claiming: too many in progress, the store failed or is full, the
    /// body could not be fingerprinted.
    Refused,
    /// The store failed and the request was passed through (fail-open).
    FailedOpen,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Executed => "executed",
            Self::Replayed => "replayed",
            Self::Waited => "waited",
            Self::Conflict => "conflict",
            Self::Mismatch => "mismatch",
            Self::Unknown => "unknown",
            Self::Released => "released",
            Self::StillRunning => "still_running",
            Self::Refused => "refused",
            Self::FailedOpen => "failed_open",
        }
    }
}

/// A problem answer of this layer, with its documentation link and the configured
/// reused-key status.
fn answer(
    settings: &Settings,
    kind: ProblemKind,
    detail: &str,
    retry_after: Option<Duration>,
) -> Response<ResponseBody> {
    let mut problem =
        Problem::of(kind, detail).retry_after(retry_after).documentation(settings.documentation_url.as_deref());
    if kind == ProblemKind::KeyReused {
        problem = problem.status(settings.mismatch_status);
    }
    problem.response()
}

/// How long a duplicate that met a running operation is told to wait before trying again:
/// short, because the retry waits (wait mode) or the operation is usually quick, and an
/// SDK with a retry budget of a few seconds must not be told to give up.
const CONFLICT_RETRY_AFTER: Duration = Duration::from_secs(1);

async fn decide<S, St, ReqBody, ResBody>(
    mut inner: S,
    oncely: Oncely<St>,
    settings: &Arc<Settings>,
    key: IdempotencyKey,
    mut parts: http::request::Parts,
    body: Bytes,
    storage_key: &mut Option<Option<StorageKey>>,
) -> Result<(Response<ResponseBody>, Outcome), S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let fingerprint = match fingerprint(&parts, &body, settings.max_decoded_body, &settings.fingerprint_rules).await {
        Ok(fingerprint) => fingerprint,
        Err(e) => return Ok((answer(settings, ProblemKind::BodyTooLarge, &e.to_string(), None), Outcome::Refused)),
    };
    let scope = match settings.scope.scope(&parts) {
        Ok(scope) => scope,
        Err(rejection) => {
            settings.counters.unauthenticated.increment(1);
            let mut problem = answer(settings, ProblemKind::Unauthenticated, &rejection.to_string(), None);
            if rejection.bearer {
                problem.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            return Ok((problem, Outcome::Refused));
        }
    };
    let engine = oncely.scoped(scope.clone());
    // The line names the record by the storage key the claim derived. (In a block: a
    // local borrowed here would keep its room in this future across the awaits below.)
    let claim = {
        let claim = engine.claim_request(&key, Some(fingerprint));
        if let Some(slot) = storage_key {
            *slot = Some(*claim.storage_key());
        }
        claim
    };
    // Taken before the claim (a claim given back after a takeover would lose the news
    // that its first attempt may have acted); a replay or refusal gives it back at once.
    let Some(place) = settings.in_progress.take(&scope, settings.max_in_progress_per_scope) else {
        settings.counters.too_many_in_progress.increment(1);
        let detail = format!(
            "this client already has {} requests in progress; retry when one has finished",
            settings.max_in_progress_per_scope
        );
        let problem = answer(settings, ProblemKind::TooManyInProgress, &detail, Some(STORE_RETRY_AFTER));
        return Ok((problem, Outcome::Refused));
    };
    // Only a request that may wait can have waited (a clock read saved on every replay
    // in reject mode).
    let waits = matches!(engine.config().conflict, oncely::ConflictMode::Wait { .. });
    let asked_at = waits.then(std::time::SystemTime::now);
    let guard = match engine.acquire_request(claim).await {
        Ok(Acquired::Execute(guard)) => guard,
        Ok(Acquired::Replay(stored)) => {
            settings.counters.replayed.increment(1);
            // Completed after this request asked: it met the operation running and waited.
            let waited = asked_at.is_some_and(|asked_at| stored.completed_at > asked_at);
            let (response, unknown) = replay(&key, stored, settings);
            let outcome = match (unknown, waited) {
                (true, _) => Outcome::Unknown,
                (false, true) => Outcome::Waited,
                (false, false) => Outcome::Replayed,
            };
            return Ok((response, outcome));
        }
        Err(Error::Conflict { .. }) => {
            let detail = "a request with this key is still being processed; retry later";
            let problem = answer(settings, ProblemKind::RequestInProgress, detail, Some(CONFLICT_RETRY_AFTER));
            return Ok((problem, Outcome::Conflict));
        }
        Err(Error::Mismatch) => {
            let detail = "this key was used for a request with another method, path, content type or body";
            return Ok((answer(settings, ProblemKind::KeyReused, detail, None), Outcome::Mismatch));
        }
        // Fail-open passes requests through only while the store cannot answer (or is
        // full); a store that answered with a damaged record may hold a completion.
        Err(e @ Error::Store(StoreError::Unavailable(_) | StoreError::Timeout(_) | StoreError::Capacity { .. }))
            if settings.fail_open =>
        {
            tracing::warn!(%key, error = %e, "idempotency store failed; passing the request through (fail-open)");
            settings.counters.failed_open.increment(1);
            parts.extensions.insert(key);
            // Boxed, as `execute` below: this future stays small for the replays.
            let response = Box::pin(inner.call(Request::from_parts(parts, Either::Left(Full::new(body))))).await?;
            return Ok((response.map(boxed), Outcome::FailedOpen));
        }
        Err(e @ Error::Store(StoreError::Capacity { .. })) => {
            // A flood of new keys must not become a flood of error logs.
            tracing::warn!(%key, error = %e, "idempotency store full; refusing the request");
            let detail = "the idempotency store is full; the request was not processed";
            return Ok((answer(settings, ProblemKind::StoreFull, detail, Some(STORE_RETRY_AFTER)), Outcome::Refused));
        }
        Err(e) => {
            tracing::error!(%key, error = %e, "idempotency store failed; refusing the request (fail-closed)");
            let detail = "the idempotency store could not be reached; the request was not processed";
            let problem = answer(settings, ProblemKind::StoreUnavailable, detail, Some(STORE_RETRY_AFTER));
            return Ok((problem, Outcome::Refused));
        }
    };
    // Handlers read the key through the extensions, whichever header the layer reads.
    parts.extensions.insert(key);
    if guard.is_takeover() {
        parts.extensions.insert(Takeover);
        if let Some(name) = &settings.takeover_header {
            parts.headers.insert(name.clone(), HeaderValue::from_static("true"));
        }
    }
    // Boxed: the operation's future (the inner service's, its settling, the renewal) is
    // large, and inline it would make every replay's future as large, copied on each
    // move. One allocation for an execution, none for a replay.
    Box::pin(execute(
        inner,
        Request::from_parts(parts, Either::Left(Full::new(body))),
        guard,
        Arc::clone(settings),
        place,
    ))
    .await
}

/// Bodies at least this large are fingerprinted on the blocking pool: hashing and
/// canonicalising them takes long enough (a quarter of a millisecond and up) to stall
/// the other requests on an async worker.
const BLOCKING_FINGERPRINT: usize = 32 * 1024;

/// The request's fingerprint, computed off the async workers for large or compressed
/// bodies (compression hides the work a body costs).
async fn fingerprint(
    parts: &http::request::Parts,
    body: &Bytes,
    max_decoded: usize,
    rules: &FingerprintRules,
) -> Result<Fingerprint, DecodedBodyTooLarge> {
    let gzip = is_gzip(parts);
    if body.len() < BLOCKING_FINGERPRINT && !gzip {
        return fingerprint_gzip_known(parts, false, body, max_decoded, rules);
    }
    // Boxed: inline, this rare path's future would make every keyed request's larger.
    Box::pin(fingerprint_off_the_workers(parts, body, max_decoded, rules)).await
}

/// [`fingerprint`] on the blocking pool.
async fn fingerprint_off_the_workers(
    parts: &http::request::Parts,
    body: &Bytes,
    max_decoded: usize,
    rules: &FingerprintRules,
) -> Result<Fingerprint, DecodedBodyTooLarge> {
    let mut head = Request::new(());
    *head.method_mut() = parts.method.clone();
    *head.uri_mut() = parts.uri.clone();
    *head.headers_mut() = parts.headers.clone();
    let (head, _) = head.into_parts();
    let owned = body.clone();
    // At most one large fingerprint per core at a time: each costs CPU and memory in
    // proportion to its (decoded) body, and the blocking pool alone would run hundreds.
    let permit = blocking_fingerprints().acquire().await;
    let owned_rules = rules.clone();
    let result =
        tokio::task::spawn_blocking(move || request_fingerprint_with(&head, &owned, max_decoded, &owned_rules)).await;
    drop(permit);
    match result {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The blocking pool is gone (the runtime shuts down): do the work here.
        Err(_) => request_fingerprint_with(parts, body, max_decoded, rules),
    }
}

/// The permits for fingerprints on the blocking pool: one per core, for the process.
fn blocking_fingerprints() -> &'static tokio::sync::Semaphore {
    static PERMITS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    PERMITS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        tokio::sync::Semaphore::new(cores)
    })
}

/// What the inner service produced, once its body is read as far as it will be stored.
enum Produced<ResBody> {
    /// A status that is not stored, or an operation that did not run: release the key,
    /// hand the response on as it is.
    Release(Response<ResBody>),
    /// The inner service cannot tell whether the operation took effect.
    Unknown(Response<ResBody>),
    /// A status that is stored, with its body read up to the storage cap.
    Store(http::response::Parts, Capped<ResBody>),
    /// Still running when the claim's renewal ran out ([`ClaimGuard::held_until`]).
    Expired,
}

enum Capped<B> {
    Whole(Bytes),
    TooLarge { prefix: Bytes, rest: Pin<Box<B>> },
    Failed(BoxError),
}

/// Runs the operation under its claim, and settles the claim by what it produced. With
/// [`answer_within`](crate::IdempotencyLayer::answer_within), a client still waiting at
/// the limit gets 504 while the operation (and then its settling) goes on in a task of
/// its own, holding the claim and its place in the scope's count.
async fn execute<S, St, ReqBody, ResBody>(
    mut inner: S,
    request: Request<RequestBody<ReqBody>>,
    guard: ClaimGuard<St>,
    settings: Arc<Settings>,
    place: InProgressPlace,
) -> Result<(Response<ResponseBody>, Outcome), S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let cap = settings.max_stored_response;
    let stores = Arc::clone(&settings.stores_status);
    let key = guard.key().clone();
    let mut work = Box::pin(async move {
        // Past `held_until` the lease is no longer renewed and a retry could take the key
        // over: an operation (or a response body) still running then has an unknown
        // outcome, held as such, rather than a claim left to lapse.
        let produced = guard
            .keep_alive_bounded(async {
                let response = inner.call(request).await?;
                if response.extensions().get::<OutcomeUnknown>().is_some() {
                    return Ok(Produced::Unknown(response));
                }
                if response.extensions().get::<NotProcessed>().is_some() || !stores(response.status()) {
                    return Ok(Produced::Release(response));
                }
                let (parts, body) = response.into_parts();
                Ok(Produced::Store(parts, read_capped(body, cap).await))
            })
            .await
            .unwrap_or(Ok(Produced::Expired));
        (guard, produced)
    });
    let (guard, produced) = match settings.answer_within {
        None => work.await,
        Some(limit) => match tokio::time::timeout(limit, &mut work).await {
            Ok(done) => done,
            Err(_) => {
                settings.counters.still_running.increment(1);
                tracing::warn!(%key, ?limit, "no response in time; the client gets 504, the operation goes on");
                let background = {
                    let settings = Arc::clone(&settings);
                    async move {
                        let (guard, produced) = work.await;
                        let _ = settle(guard, produced, &settings).await;
                        drop(place);
                    }
                };
                match &settings.tracker {
                    Some(tracker) => drop(tracker.spawn(background)),
                    None => drop(tokio::spawn(background)),
                }
                let detail = format!(
                    "no response within {}; the request goes on, and a retry with the same key gets its result",
                    humantime_secs(limit)
                );
                return Ok((answer(&settings, ProblemKind::UpstreamTimeout, &detail, None), Outcome::StillRunning));
            }
        },
    };
    let settled = settle(guard, produced, &settings).await;
    drop(place);
    settled
}

fn humantime_secs(limit: Duration) -> String {
    format!("{:.3}s", limit.as_secs_f64()).replace(".000s", "s")
}

/// Stores, releases or holds the claim by what the operation produced, and makes the
/// response for the client that is still there.
async fn settle<St, ResBody, E>(
    guard: ClaimGuard<St>,
    produced: Result<Produced<ResBody>, E>,
    settings: &Settings,
) -> Result<(Response<ResponseBody>, Outcome), E>
where
    St: Store,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    match produced {
        Err(e) => {
            // An error says nothing about whether the operation took effect (a timeout
            // layer inside this one cancels a handler midway).
            hold_unknown(guard, settings, "the inner service failed").await;
            Err(e)
        }
        Ok(Produced::Release(response)) => {
            settings.counters.released.increment(1);
            release(guard).await;
            Ok((response.map(boxed), Outcome::Released))
        }
        Ok(Produced::Unknown(response)) => {
            let held = hold_unknown(guard, settings, "the inner service cannot tell whether it acted").await;
            if held {
                // This client gets what every retry will get.
                return Ok((outcome_unknown(settings, "the answer to this request never came"), Outcome::Unknown));
            }
            Ok((response.map(boxed), Outcome::Unknown))
        }
        Ok(Produced::Store(parts, Capped::Whole(body))) => {
            settings.counters.executed.increment(1);
            let stored = stored_form(&parts, &StoredBody::Kept(body.clone()), settings);
            complete(guard, stored, settings).await;
            Ok((Response::from_parts(parts, full(body)), Outcome::Executed))
        }
        Ok(Produced::Store(parts, Capped::TooLarge { prefix, rest })) => {
            settings.counters.executed_not_stored.increment(1);
            tracing::warn!(key = %guard.key(), cap = settings.max_stored_response, "response over the storage cap; retries get a response-not-stored problem");
            let stored = stored_form(&parts, &StoredBody::NotKept, settings);
            complete(guard, stored, settings).await;
            let head = stream::once(std::future::ready(Ok::<_, BoxError>(Frame::data(prefix))));
            let tail = TryStreamExt::map_err(BodyStream::new(rest), Into::into);
            Ok((Response::from_parts(parts, StreamBody::new(head.chain(tail)).boxed_unsync()), Outcome::Executed))
        }
        Ok(Produced::Expired) => {
            if hold_unknown(guard, settings, "still running when the lease renewal ran out").await {
                return Ok((outcome_unknown(settings, "the request ran past its limit"), Outcome::Unknown));
            }
            Ok((answer(settings, ProblemKind::HandlerFailed, "the request ran past its limit", None), Outcome::Unknown))
        }
        Ok(Produced::Store(_, Capped::Failed(e))) => {
            // The operation ran but its response broke off: nobody knows its outcome.
            tracing::error!(key = %guard.key(), error = %e, "response body failed");
            if hold_unknown(guard, settings, "the response body failed").await {
                return Ok((outcome_unknown(settings, "the response to this request broke off"), Outcome::Unknown));
            }
            Ok((answer(settings, ProblemKind::HandlerFailed, "the response body failed", None), Outcome::Unknown))
        }
    }
}

/// The answer for a key held as an unknown outcome: to the first client, `what` happened;
/// then the same to every retry.
fn outcome_unknown(settings: &Settings, what: &str) -> Response<ResponseBody> {
    let detail = format!(
        "{what}: the request may or may not have been processed; it is not processed again until an operator \
         who has checked deletes the key"
    );
    answer(settings, ProblemKind::OutcomeUnknown, &detail, None)
}

/// Settles a claim whose operation's outcome nobody knows: held as an unknown outcome
/// (the default; `true`), or left to lapse with its lease (`false`).
async fn hold_unknown<St: Store>(guard: ClaimGuard<St>, settings: &Settings, why: &str) -> bool {
    settings.counters.outcome_unknown.increment(1);
    if settings.hold_unknown {
        let hash = guard.storage_key().to_hex();
        tracing::warn!(key = %guard.key(), hash, why, "outcome unknown; the key is held until an operator deletes it (keys delete HASH)");
        complete(guard, StoredResponse::outcome_unknown().encode(), settings).await;
    } else {
        tracing::warn!(key = %guard.key(), why, "outcome unknown; the key lapses with its lease");
        guard.abandon();
    }
    settings.hold_unknown
}

/// Reads `body` up to `cap` bytes, keeping a single-frame body without a copy.
async fn read_capped<B>(body: B, cap: usize) -> Capped<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = Box::pin(body);
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Capped::Failed(e.into()),
            Some(Ok(frame)) => {
                // Trailers are not stored (see the crate docs).
                let Ok(data) = frame.into_data() else { continue };
                len += data.len();
                chunks.push(data);
                if len > cap {
                    return Capped::TooLarge { prefix: concat(chunks, len), rest: body };
                }
            }
        }
    }
    Capped::Whole(concat(chunks, len))
}

fn concat(mut chunks: Vec<Bytes>, len: usize) -> Bytes {
    if chunks.len() == 1 {
        return chunks.pop().unwrap_or_default();
    }
    let mut out = BytesMut::with_capacity(len);
    for chunk in chunks {
        out.extend_from_slice(&chunk);
    }
    out.freeze()
}

/// The stored form of an executed request's response, with `body`. A replay repeats
/// every field in the order sent but the hop-by-hop ones, `Date` (the replay's own is set
/// by the server) and the configured exclusions (`Set-Cookie` by default): they are
/// skipped as the fields are written, with no copy of the header map.
fn stored_form(parts: &http::response::Parts, body: &StoredBody, settings: &Settings) -> Bytes {
    let hop_by_hop = HopByHop::of(&parts.headers);
    let replayed = || {
        parts.headers.iter().filter(|(name, _)| {
            *name != header::DATE && !hop_by_hop.contains(name) && !settings.not_replayed.contains(name)
        })
    };
    stored::encode(parts.status, replayed, body)
}

/// The replay of a stored response, and whether it is an unknown outcome.
fn replay(key: &IdempotencyKey, stored: Replay, settings: &Settings) -> (Response<ResponseBody>, bool) {
    let mut unknown = false;
    let mut response = match StoredResponse::decode_for_replay(stored.payload, &settings.replayed_header) {
        Ok(StoredResponse { status, headers, body: StoredBody::Kept(body) }) => {
            // Marked as a replay already (`Should-Retry`, the marker).
            let mut response = Response::new(full(body));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            return (response, false);
        }
        Ok(StoredResponse { body: StoredBody::NotKept, .. }) => answer(
            settings,
            ProblemKind::ResponseNotStored,
            "the request was processed, but its response was too large to keep for replay; it is not processed again",
            None,
        ),
        Ok(StoredResponse { body: StoredBody::OutcomeUnknown, .. }) => {
            unknown = true;
            outcome_unknown(settings, "the answer to the first request with this key never came")
        }
        Err(reason) => {
            tracing::error!(%key, reason, "stored response does not decode");
            answer(
                settings,
                ProblemKind::ResponseNotStored,
                "the request was processed, but its stored response is unreadable",
                None,
            )
        }
    };
    response.headers_mut().insert(settings.replayed_header.clone(), HeaderValue::from_static("true"));
    (response, unknown)
}

async fn complete<St: Store>(guard: ClaimGuard<St>, payload: Bytes, settings: &Settings) {
    let key = guard.key().clone();
    if let Err(e) = guard.complete(payload).await {
        tracing::error!(%key, error = %e, "the request ran but its response could not be stored");
        settings.counters.unrecorded.increment(1);
    }
}

async fn release<St: Store>(guard: ClaimGuard<St>) {
    let key = guard.key().clone();
    if let Err(e) = guard.release().await {
        tracing::warn!(%key, error = %e, "release failed; the key lapses with its lease");
    }
}

fn full(bytes: Bytes) -> ResponseBody {
    Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}

/// `body` as a [`ResponseBody`]; one that already is one (the gateway's proxy answers with
/// one) is handed on as it is, not boxed again: a second box would cost an allocation per
/// response and a second dynamic call per frame.
fn boxed<B>(body: B) -> ResponseBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut slot = Some(body);
    if let Some(boxed) = (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<ResponseBody>>() {
        // `slot` is `Some` until here: the take succeeds.
        return boxed.take().expect("the body was just put in its slot");
    }
    let body = slot.expect("the body is still in its slot");
    body.map_err(Into::into).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored copy of a response keeps the fields a replay repeats, in the order sent,
    /// and none of the others: hop-by-hop ones (the nine, and those `Connection` names),
    /// `Date`, and the configured exclusions.
    #[test]
    fn the_stored_form_skips_what_a_replay_does_not_repeat() {
        let mut response = Response::builder()
            .status(201)
            .header("content-type", "application/json")
            .header("connection", "keep-alive, X-Private")
            .header("x-multi", "a")
            .header("keep-alive", "timeout=5")
            .header("x-private", "1")
            .header("date", "Sun, 22 Nov 2026 10:00:00 GMT")
            .header("set-cookie", "session=abc")
            .header("x-other", "2")
            .header("transfer-encoding", "chunked")
            .body(())
            .expect("a valid response");
        response.headers_mut().append("x-multi", HeaderValue::from_static("b"));
        let (parts, ()) = response.into_parts();
        let settings = Settings::default();
        let body = StoredBody::Kept(Bytes::from_static(b"{}"));

        let decoded = StoredResponse::decode(stored_form(&parts, &body, &settings)).expect("it decodes");
        let fields: Vec<(&str, &str)> = decoded
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.to_str().expect("visible ASCII")))
            .collect();
        assert_eq!(
            fields,
            [("content-type", "application/json"), ("x-multi", "a"), ("x-multi", "b"), ("x-other", "2")]
        );
        assert_eq!(decoded.status, http::StatusCode::CREATED);
        assert_eq!(decoded.body, body);

        // The exclusions are the configured ones: `Set-Cookie` is kept when not excluded.
        let settings = Settings { not_replayed: vec![header::CONTENT_TYPE], ..Settings::default() };
        let decoded = StoredResponse::decode(stored_form(&parts, &StoredBody::NotKept, &settings)).expect("it decodes");
        let names: Vec<&str> = decoded.headers.keys().map(|name| name.as_str()).collect();
        assert_eq!(names, ["x-multi", "set-cookie", "x-other"]);
        assert_eq!(decoded.body, StoredBody::NotKept);
    }
}
