//! Every row of the HTTP semantics table, against an axum app whose handlers count their
//! executions.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use oncely::store::{FirstSeen, Notified};
use oncely::{
    Claim, ClaimOutcome, ClaimRequest, ConflictMode, MemoryStore, Oncely, StorageKey, Store, StoreAdmin, StoreError,
};
use oncely_http::{IdempotencyLayer, Idempotent};
use tokio::sync::{Barrier, Notify, mpsc};
use tower::ServiceExt;

/// What the handlers share: execution counts and gates to hold a request in progress.
#[derive(Default)]
struct Counters {
    executions: AtomicUsize,
    started: Notify,
    gate: Notify,
    gate_open: std::sync::atomic::AtomicBool,
}

type Shared = Arc<Counters>;

async fn create(State(c): State<Shared>, headers: HeaderMap, body: Bytes) -> Response<Body> {
    let n = c.executions.fetch_add(1, Ordering::SeqCst) + 1;
    let mut response = (
        StatusCode::CREATED,
        [
            ("content-type", "application/json"),
            ("x-charge", "ch_1"),
            ("set-cookie", "session=abc"),
            ("date", "Sun, 22 Nov 2026 10:00:00 GMT"),
        ],
        format!(
            r#"{{"execution":{n},"auth":{:?},"body_len":{}}}"#,
            headers.get("authorization").map(|v| v.as_bytes().len()),
            body.len()
        ),
    )
        .into_response();
    response.headers_mut().append("x-multi", HeaderValue::from_static("a"));
    response.headers_mut().append("x-multi", HeaderValue::from_static("b"));
    response
}

async fn status(State(c): State<Shared>, body: Bytes) -> Response<Body> {
    c.executions.fetch_add(1, Ordering::SeqCst);
    let code = std::str::from_utf8(&body).ok().and_then(|s| s.parse::<u16>().ok()).unwrap_or(500);
    (StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), format!("status {code}")).into_response()
}

/// Signals that it started, then waits for the gate before answering.
async fn slow(State(c): State<Shared>) -> Response<Body> {
    let n = c.executions.fetch_add(1, Ordering::SeqCst) + 1;
    c.started.notify_one();
    let opened = c.gate.notified();
    if !c.gate_open.load(Ordering::SeqCst) {
        opened.await;
    }
    (StatusCode::CREATED, format!("slow execution {n}")).into_response()
}

async fn big(State(c): State<Shared>) -> Response<Body> {
    c.executions.fetch_add(1, Ordering::SeqCst);
    (StatusCode::OK, vec![b'x'; 64 * 1024]).into_response()
}

/// A handler that cannot tell whether its effect happened (an upstream that timed out).
async fn unknown(State(c): State<Shared>) -> Response<Body> {
    c.executions.fetch_add(1, Ordering::SeqCst);
    let mut response = (StatusCode::GATEWAY_TIMEOUT, "upstream timed out").into_response();
    response.extensions_mut().insert(oncely_http::OutcomeUnknown);
    response
}

async fn key_echo(State(c): State<Shared>, Idempotent(key): Idempotent) -> String {
    c.executions.fetch_add(1, Ordering::SeqCst);
    format!("key={key}")
}

fn open_gate(c: &Counters) {
    c.gate_open.store(true, Ordering::SeqCst);
    c.gate.notify_waiters();
}

fn routes(counters: &Shared) -> Router<()> {
    Router::new()
        .route("/payments", post(create).get(create).put(create).delete(create).patch(create))
        .route("/status", post(status))
        .route("/slow", post(slow))
        .route("/big", post(big))
        .route("/key", post(key_echo))
        .route("/unknown", post(unknown))
        .with_state(counters.clone())
}

fn engine() -> Oncely<MemoryStore> {
    Oncely::new(MemoryStore::new())
}

fn rejecting_engine() -> Oncely<MemoryStore> {
    Oncely::builder(MemoryStore::new()).conflict_mode(ConflictMode::Reject).build().expect("valid settings")
}

fn waiting_engine(timeout: Duration) -> Oncely<MemoryStore> {
    Oncely::builder(MemoryStore::new()).conflict_mode(ConflictMode::Wait { timeout }).build().expect("valid settings")
}

fn app(layer: IdempotencyLayer<MemoryStore>) -> (Router, Shared) {
    let counters = Shared::default();
    (routes(&counters).layer(layer), counters)
}

fn request(method: Method, uri: &str, key: Option<&str>, body: &'static str) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri).header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(body)).expect("test request")
}

fn post_with(key: &str, body: &'static str) -> Request<Body> {
    request(Method::POST, "/payments", Some(key), body)
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn replayed(&self) -> bool {
        self.headers.get("idempotent-replayed").is_some_and(|v| v == "true")
    }

    /// The problem body's `error` member, which SDKs read.
    fn error(&self) -> serde_json::Value {
        let json: serde_json::Value = serde_json::from_slice(&self.body).expect("problem body is JSON");
        assert_eq!(json["error"]["message"], json["detail"], "the message is the detail");
        json["error"].clone()
    }

    fn should_retry(&self) -> Option<&str> {
        self.headers.get("stripe-should-retry").map(|v| v.to_str().expect("ascii"))
    }

    fn problem_type(&self) -> String {
        assert_eq!(self.headers.get("content-type").map(|v| v.as_bytes()), Some(&b"application/problem+json"[..]));
        let json: serde_json::Value = serde_json::from_slice(&self.body).expect("problem body is JSON");
        assert_eq!(json["status"], self.status.as_u16(), "problem status matches");
        assert!(json["title"].is_string() && json["detail"].is_string());
        json["type"].as_str().expect("problem type").to_string()
    }
}

async fn send(app: &Router, request: Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.expect("infallible");
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.expect("body reads");
    Answer { status: parts.status, headers: parts.headers, body }
}

#[tokio::test]
async fn methods_not_covered_pass_through_untouched() {
    let (app, c) = app(IdempotencyLayer::new(engine()).require_key(true));
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        for _ in 0..2 {
            let answer = send(&app, request(method.clone(), "/payments", Some("k"), "{}")).await;
            assert_eq!(answer.status, StatusCode::CREATED);
            assert!(!answer.replayed());
        }
    }
    assert_eq!(c.executions.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn covered_methods_can_be_configured() {
    let (app, c) = app(IdempotencyLayer::new(engine()).methods([Method::PUT]));
    for _ in 0..3 {
        send(&app, request(Method::PUT, "/payments", Some("k"), "{}")).await;
        send(&app, request(Method::POST, "/payments", Some("k"), "{}")).await;
    }
    assert_eq!(c.executions.load(Ordering::SeqCst), 4, "PUT ran once, POST three times");
}

#[tokio::test]
async fn no_key_passes_through_when_optional_and_is_refused_when_required() {
    let (optional, c) = app(IdempotencyLayer::new(engine()));
    for _ in 0..2 {
        assert_eq!(send(&optional, request(Method::POST, "/payments", None, "{}")).await.status, StatusCode::CREATED);
    }
    assert_eq!(c.executions.load(Ordering::SeqCst), 2);

    let (required, c) = app(IdempotencyLayer::new(engine()).require_key(true));
    let answer = send(&required, request(Method::POST, "/payments", None, "{}")).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.problem_type(), "urn:oncely:problem:missing-key");
    assert_eq!(c.executions.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn malformed_keys_are_refused_and_nothing_is_stored() {
    let oncely = engine();
    let (app, c) = app(IdempotencyLayer::new(oncely.clone()));
    let too_long = "k".repeat(256);
    let bad: Vec<Vec<&[u8]>> = vec![
        vec![b""],
        vec![b"\"\""],
        vec![too_long.as_bytes()],
        vec![b"a\tb"],
        vec![b"\"unterminated"],
        vec![b"\"a\", \"b\""],
        vec![b"one", b"two"],
        vec![b"caf\xc3\xa9"],
    ];
    for values in bad {
        let mut req = request(Method::POST, "/payments", None, "{}");
        for value in &values {
            req.headers_mut().append("idempotency-key", HeaderValue::from_bytes(value).expect("header value"));
        }
        let answer = send(&app, req).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{values:?}");
        assert_eq!(answer.problem_type(), "urn:oncely:problem:invalid-key");
    }
    assert_eq!(c.executions.load(Ordering::SeqCst), 0);
    assert_eq!(oncely.store().stats().await.expect("stats").records, 0, "nothing stored");
}

#[tokio::test]
async fn sf_string_and_bare_keys_are_the_same_key() {
    let (app, c) = app(IdempotencyLayer::new(engine()));
    let first = send(&app, post_with("\"abc-1\"", "{}")).await;
    let retry = send(&app, post_with("abc-1", "{}")).await;
    assert!(!first.replayed() && retry.replayed());
    assert_eq!(c.executions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_before_anything_is_stored() {
    let oncely = engine();
    let (app, c) = app(IdempotencyLayer::new(oncely.clone()).max_body(16));
    let declared = send(&app, post_with("k", r#"{"padding":"0123456789abcdef"}"#)).await;
    assert_eq!(declared.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(declared.problem_type(), "urn:oncely:problem:body-too-large");

    // No Content-Length: the limit holds while streaming.
    let chunks = futures_util::stream::iter((0..8).map(|_| Ok::<_, std::io::Error>(Bytes::from_static(b"0123456789"))));
    let streamed =
        Request::post("/payments").header("idempotency-key", "k").body(Body::from_stream(chunks)).expect("req");
    assert_eq!(send(&app, streamed).await.status, StatusCode::PAYLOAD_TOO_LARGE);

    assert_eq!(c.executions.load(Ordering::SeqCst), 0);
    assert_eq!(oncely.store().stats().await.expect("stats").records, 0, "nothing stored");
    assert_eq!(send(&app, post_with("k", "{}")).await.status, StatusCode::CREATED, "the key is still new");
}

#[tokio::test]
async fn a_retry_gets_the_stored_response_byte_for_byte() {
    let (app, c) = app(IdempotencyLayer::new(engine()));
    let first = send(&app, post_with("k", r#"{"amount":1999}"#)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    for _ in 0..3 {
        let retry = send(&app, post_with("k", r#"{"amount":1999}"#)).await;
        assert_eq!(retry.status, first.status);
        assert_eq!(retry.body, first.body, "byte-identical body");
        assert!(retry.replayed());
        assert_eq!(retry.headers.get("x-charge"), first.headers.get("x-charge"));
        assert_eq!(retry.headers.get("content-type"), first.headers.get("content-type"));
        let multi: Vec<_> = retry.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"], "repeated headers keep their order");
        assert!(retry.headers.get("set-cookie").is_none(), "Set-Cookie is not replayed");
        assert!(retry.headers.get("date").is_none(), "Date is not replayed");
    }
    assert_eq!(c.executions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_replayed_header_name_is_configurable() {
    let layer = IdempotencyLayer::new(engine()).replayed_header(axum::http::HeaderName::from_static("x-replay"));
    let (app, _) = app(layer);
    send(&app, post_with("k", "{}")).await;
    let retry = send(&app, post_with("k", "{}")).await;
    assert_eq!(retry.headers.get("x-replay").map(|v| v.as_bytes()), Some(&b"true"[..]));
    assert!(!retry.replayed());
}

#[tokio::test]
async fn reuse_with_another_request_is_422_and_json_is_compared_canonically() {
    let (app, c) = app(IdempotencyLayer::new(engine()));
    send(&app, post_with("k", r#"{"amount":1999,"currency":"eur"}"#)).await;
    let reordered = send(&app, post_with("k", "{ \"currency\": \"eur\", \"amount\": 1999 }")).await;
    assert!(reordered.replayed(), "re-serialised JSON is the same request");

    let mut others = vec![
        post_with("k", r#"{"amount":2999,"currency":"eur"}"#),
        request(Method::PATCH, "/payments", Some("k"), r#"{"amount":1999,"currency":"eur"}"#),
        request(Method::POST, "/payments?dry_run=1", Some("k"), r#"{"amount":1999,"currency":"eur"}"#),
    ];
    let mut as_text = post_with("k", r#"{"amount":1999,"currency":"eur"}"#);
    as_text.headers_mut().insert("content-type", HeaderValue::from_static("text/plain"));
    others.push(as_text);
    for other in others {
        let answer = send(&app, other).await;
        assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(answer.problem_type(), "urn:oncely:problem:key-reused");
        assert_eq!(answer.error()["type"], "idempotency_error");
        assert_eq!(answer.error()["code"], "key_reused");
        assert_eq!(answer.should_retry(), Some("false"));
    }
    assert_eq!(c.executions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_reused_key_status_can_be_400_for_stripe_sdks_and_problems_link_to_the_docs() {
    let layer = IdempotencyLayer::new(engine())
        .mismatch_status(StatusCode::BAD_REQUEST)
        .documentation_url("https://api.example.com/docs/idempotency");
    let (app, c) = app(layer.clone().require_key(true));
    send(&app, post_with("k", r#"{"amount":1}"#)).await;
    let reused = send(&app, post_with("k", r#"{"amount":2}"#)).await;
    assert_eq!(reused.status, StatusCode::BAD_REQUEST);
    assert_eq!(reused.problem_type(), "urn:oncely:problem:key-reused");
    assert_eq!(reused.error()["type"], "idempotency_error");
    assert_eq!(reused.error()["doc_url"], "https://api.example.com/docs/idempotency");
    assert_eq!(reused.headers["link"], "<https://api.example.com/docs/idempotency>; rel=\"describedby\"");
    let missing = send(&app, request(Method::POST, "/payments", None, "{}")).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(missing.error()["type"], "invalid_request_error");
    assert_eq!(missing.error()["code"], "missing_key");
    assert_eq!(missing.should_retry(), Some("false"));
    let invalid = send(&app, post_with("", "{}")).await;
    assert_eq!(invalid.error()["type"], "invalid_request_error");
    assert_eq!(invalid.error()["code"], "invalid_key");
    assert_eq!(c.executions.load(Ordering::SeqCst), 1);

    let policy = serde_json::to_value(layer.policy()).expect("serialises");
    assert_eq!(policy["mismatch_status"], 400);
    assert_eq!(policy["on_conflict"], "wait");
    assert_eq!(policy["released_statuses"], serde_json::json!([408, 425, 429, 503]));
    assert_eq!(policy["documentation_url"], "https://api.example.com/docs/idempotency");
}

#[tokio::test]
async fn a_duplicate_of_a_running_request_is_409_with_retry_after_in_reject_mode() {
    let (app, c) = app(IdempotencyLayer::new(rejecting_engine()));
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Method::POST, "/slow", Some("k"), "")).await }
    });
    c.started.notified().await;
    let duplicate = send(&app, request(Method::POST, "/slow", Some("k"), "")).await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    assert_eq!(duplicate.problem_type(), "urn:oncely:problem:request-in-progress");
    assert_eq!(duplicate.headers["retry-after"], "1", "short: never the remaining lease");
    assert_eq!(duplicate.headers["stripe-should-retry"], "true");
    assert_eq!(duplicate.error()["type"], "idempotency_error");
    assert_eq!(duplicate.error()["code"], "request_in_progress");
    open_gate(&c);
    assert_eq!(first.await.expect("task").status, StatusCode::CREATED);
    assert_eq!(c.executions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn in_wait_mode_every_waiter_gets_the_same_response() {
    let (app, c) = app(IdempotencyLayer::new(waiting_engine(Duration::from_secs(20))));
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Method::POST, "/slow", Some("k"), "")).await }
    });
    c.started.notified().await;
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, request(Method::POST, "/slow", Some("k"), "")).await })
        })
        .collect();
    tokio::task::yield_now().await;
    open_gate(&c);
    let first = first.await.expect("task");
    for waiter in waiters {
        let answer = waiter.await.expect("task");
        assert_eq!(answer.status, StatusCode::CREATED);
        assert_eq!(answer.body, first.body);
    }
    assert_eq!(c.executions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_waiter_that_times_out_gets_409() {
    let (app, c) = app(IdempotencyLayer::new(waiting_engine(Duration::from_millis(100))));
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Method::POST, "/slow", Some("k"), "")).await }
    });
    c.started.notified().await;
    assert_eq!(send(&app, request(Method::POST, "/slow", Some("k"), "")).await.status, StatusCode::CONFLICT);
    open_gate(&c);
    first.await.expect("task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_requests_with_one_key_execute_once() {
    let (app, c) = app(IdempotencyLayer::new(waiting_engine(Duration::from_secs(20))));
    let start = Arc::new(Barrier::new(100));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (app, start) = (app.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                send(&app, post_with("one-key", r#"{"amount":5}"#)).await
            })
        })
        .collect();
    let mut bodies = Vec::new();
    for task in tasks {
        let answer = task.await.expect("task");
        assert_eq!(answer.status, StatusCode::CREATED);
        bodies.push(answer.body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "every caller gets the one response");
    assert_eq!(c.executions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_client_that_disconnects_mid_request_still_gets_its_replay() {
    let (app, c) = app(IdempotencyLayer::new(waiting_engine(Duration::from_secs(20))));
    let abandoned = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Method::POST, "/slow", Some("k"), "")).await }
    });
    c.started.notified().await;
    abandoned.abort(); // the client hangs up while the handler runs
    assert!(abandoned.await.expect_err("aborted").is_cancelled());
    open_gate(&c);
    let retry = send(&app, request(Method::POST, "/slow", Some("k"), "")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.body, "slow execution 1");
    assert!(retry.replayed(), "the abandoned request's result was stored");
    assert_eq!(c.executions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn two_principals_with_one_key_execute_twice() {
    let (app, c) = app(IdempotencyLayer::new(engine()));
    let as_user = |token: &'static str| {
        let mut req = post_with("shared-key", "{}");
        req.headers_mut().insert("authorization", HeaderValue::from_static(token));
        req
    };
    let alice = send(&app, as_user("Bearer alice")).await;
    let bob = send(&app, as_user("Bearer bob")).await;
    assert!(!alice.replayed() && !bob.replayed());
    assert_ne!(alice.body, bob.body);
    assert!(send(&app, as_user("Bearer alice")).await.replayed());
    assert_eq!(c.executions.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn statuses_that_say_not_processed_release_every_other_status_is_stored() {
    let (app, c) = app(IdempotencyLayer::new(engine()));
    let cases = [
        ("500", true),
        ("502", true),
        ("404", true),
        ("409", true),
        ("503", false),
        ("408", false),
        ("425", false),
        ("429", false),
    ];
    for (code, stored) in cases {
        let key = format!("key-{code}");
        let first = send(&app, request_status(&key, code)).await;
        let second = send(&app, request_status(&key, code)).await;
        assert_eq!(first.status.as_str(), code);
        assert_eq!(second.status.as_str(), code);
        assert_eq!(second.replayed(), stored, "status {code}");
        // A replayed error is the same answer on every retry: an SDK must stop.
        let expected = if stored { Some("false") } else { None };
        assert_eq!(second.should_retry(), expected, "status {code}");
    }
    assert_eq!(c.executions.load(Ordering::SeqCst), 4 + 2 * 4, "a 500 may follow a side effect: it ran once");
}

/// Answers 502 after saying the operation never ran (a proxy whose upstream refused the
/// connection).
async fn not_processed(State(c): State<Shared>) -> Response<Body> {
    c.executions.fetch_add(1, Ordering::SeqCst);
    let mut response = (StatusCode::BAD_GATEWAY, "upstream unreachable").into_response();
    response.extensions_mut().insert(oncely_http::NotProcessed);
    response
}

#[tokio::test]
async fn a_response_marked_not_processed_releases_the_key_whatever_its_status() {
    let counters = Shared::default();
    let app = Router::new()
        .route("/unreachable", post(not_processed))
        .with_state(counters.clone())
        .layer(IdempotencyLayer::new(engine()));
    for _ in 0..2 {
        let answer = send(&app, request(Method::POST, "/unreachable", Some("k"), "")).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
        assert!(!answer.replayed());
    }
    assert_eq!(counters.executions.load(Ordering::SeqCst), 2);
}

fn request_status(key: &str, code: &'static str) -> Request<Body> {
    Request::post("/status").header("idempotency-key", key).body(Body::from(code)).expect("req")
}

#[tokio::test]
async fn stored_statuses_are_configurable() {
    let (app, c) = app(IdempotencyLayer::new(engine()).store_statuses(|s| s.is_success() || s.is_server_error()));
    send(&app, request_status("a", "500")).await;
    assert!(send(&app, request_status("a", "500")).await.replayed(), "500 stored by this policy");
    send(&app, request_status("b", "404")).await;
    assert!(!send(&app, request_status("b", "404")).await.replayed(), "404 released by this policy");
    assert_eq!(c.executions.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_response_over_the_storage_cap_reaches_the_client_and_is_never_rerun() {
    let (app, c) = app(IdempotencyLayer::new(engine()).max_stored_response(1024));
    let first = send(&app, request(Method::POST, "/big", Some("k"), "")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body.len(), 64 * 1024, "the first client gets the whole response");
    let retry = send(&app, request(Method::POST, "/big", Some("k"), "")).await;
    assert_eq!(retry.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(retry.problem_type(), "urn:oncely:problem:response-not-stored");
    assert!(retry.replayed());
    assert_eq!(c.executions.load(Ordering::SeqCst), 1);
}

/// A store whose every call fails with one error (`down`: as an unreachable server
/// would): fault injection for the fail-closed/fail-open rows (not a stand-in for any
/// supported store).
struct Failing(fn() -> StoreError);

fn down() -> StoreError {
    StoreError::unavailable(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused"))
}

impl Store for Failing {
    async fn claim(&self, _: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        Err((self.0)())
    }
    async fn complete(&self, _: Claim, _: Bytes, _: Duration) -> Result<(), StoreError> {
        Err((self.0)())
    }
    async fn release(&self, _: Claim) -> Result<(), StoreError> {
        Err((self.0)())
    }
    async fn touch(&self, _: Claim, _: Duration) -> Result<(), StoreError> {
        Err((self.0)())
    }
    async fn first_seen(&self, _: &FirstSeen<'_>) -> Result<bool, StoreError> {
        Err((self.0)())
    }
    async fn record_hits(&self, _: &[(StorageKey, u64)]) -> Result<(), StoreError> {
        Err((self.0)())
    }
    fn subscribe(&self, _: &StorageKey) -> Notified {
        Box::pin(std::future::ready(()))
    }
}

#[tokio::test]
async fn an_unreachable_store_fails_closed_with_503_or_open_if_configured() {
    let counters = Shared::default();
    let closed = routes(&counters).layer(IdempotencyLayer::new(Oncely::new(Failing(down))));
    let answer = send(&closed, post_with("k", "{}")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.problem_type(), "urn:oncely:problem:store-unavailable");
    assert_eq!(answer.headers["retry-after"], "1");
    assert_eq!(counters.executions.load(Ordering::SeqCst), 0, "fail-closed runs nothing");

    let open = routes(&counters).layer(IdempotencyLayer::new(Oncely::new(Failing(down))).fail_open(true));
    let answer = send(&open, post_with("k", r#"{"amount":1}"#)).await;
    assert_eq!(answer.status, StatusCode::CREATED);
    assert!(String::from_utf8_lossy(&answer.body).contains("\"body_len\":12"), "the buffered body reaches the handler");
    assert_eq!(counters.executions.load(Ordering::SeqCst), 1);

    // Fail-open is for a store that cannot answer. One that answers with a damaged record
    // (the operation may have completed) is never passed through.
    let damaged = || StoreError::Corrupt("a record's key holds another kind of value".into());
    let open = routes(&counters).layer(IdempotencyLayer::new(Oncely::new(Failing(damaged))).fail_open(true));
    let answer = send(&open, post_with("k", r#"{"amount":1}"#)).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(counters.executions.load(Ordering::SeqCst), 1, "nothing more ran");
}

#[tokio::test]
async fn the_extractor_sees_the_parsed_key_with_or_without_the_layer() {
    let (app, _) = app(IdempotencyLayer::new(engine()));
    assert_eq!(send(&app, request(Method::POST, "/key", Some("\"quoted\""), "")).await.body, "key=quoted");

    let counters = Shared::default();
    let bare = routes(&counters);
    assert_eq!(send(&bare, request(Method::POST, "/key", Some("plain"), "")).await.body, "key=plain");
    let missing = send(&bare, request(Method::POST, "/key", None, "")).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(missing.problem_type(), "urn:oncely:problem:missing-key");
}

#[tokio::test]
async fn composes_with_tower_timeout_and_concurrency_limit() {
    let counters = Shared::default();
    let service = tower::ServiceBuilder::new()
        .concurrency_limit(8)
        .timeout(Duration::from_secs(30))
        .layer(IdempotencyLayer::new(engine()).require_key(true))
        .service(routes(&counters));
    let (tx, mut rx) = mpsc::unbounded_channel();
    for _ in 0..5 {
        let response = service.clone().oneshot(post_with("k", "{}")).await.expect("no timeout");
        tx.send(response.headers().get("idempotent-replayed").is_some()).expect("send");
    }
    drop(tx);
    let mut replays = 0;
    while let Some(replayed) = rx.recv().await {
        replays += usize::from(replayed);
    }
    assert_eq!(replays, 4);
    assert_eq!(counters.executions.load(Ordering::SeqCst), 1);

    // route_layer works too: the layer only wraps the routes it is given.
    let counters = Shared::default();
    let app = Router::new()
        .route("/payments", post(create))
        .route_layer(IdempotencyLayer::new(engine()))
        .route("/open", post(create))
        .with_state(counters.clone());
    send(&app, post_with("k", "{}")).await;
    assert!(send(&app, post_with("k", "{}")).await.replayed());
    send(&app, request(Method::POST, "/open", Some("k"), "{}")).await;
    send(&app, request(Method::POST, "/open", Some("k"), "{}")).await;
    assert_eq!(counters.executions.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn handlers_see_the_key_under_a_custom_header_even_when_failing_open() {
    let counters = Shared::default();
    let layer = IdempotencyLayer::new(Oncely::new(Failing(down)))
        .header_name(axum::http::HeaderName::from_static("x-request-key"))
        .fail_open(true);
    let app = routes(&counters).layer(layer);
    let req = Request::post("/key").header("x-request-key", "custom-1").body(Body::empty()).expect("req");
    assert_eq!(send(&app, req).await.body, "key=custom-1");
}

#[tokio::test]
async fn an_unknown_outcome_is_held_and_retries_get_502_at_once_until_the_key_is_deleted() {
    let oncely = engine();
    let (app, c) = app(IdempotencyLayer::new(oncely.clone()));
    let first = send(&app, request(Method::POST, "/unknown", Some("k"), "")).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY, "the first client gets what every retry will get");
    assert_eq!(first.problem_type(), "urn:oncely:problem:outcome-unknown");
    assert_eq!(first.should_retry(), Some("false"));
    assert!(!first.replayed());
    for _ in 0..3 {
        let retry =
            tokio::time::timeout(Duration::from_secs(1), send(&app, request(Method::POST, "/unknown", Some("k"), "")))
                .await
                .expect("answered at once, without waiting");
        assert_eq!(retry.status, StatusCode::BAD_GATEWAY);
        assert_eq!(retry.problem_type(), "urn:oncely:problem:outcome-unknown");
        assert_eq!(retry.error()["type"], "idempotency_error");
        assert_eq!(retry.should_retry(), Some("false"));
        assert!(retry.replayed());
    }
    assert_eq!(c.executions.load(Ordering::SeqCst), 1);
    // An operator who has checked what happened deletes the key: the next try runs.
    let hash = StorageKey::derive(&oncely::Scope::global(), &"k".parse().expect("key"));
    assert!(StoreAdmin::delete(oncely.store(), &hash).await.expect("delete"));
    send(&app, request(Method::POST, "/unknown", Some("k"), "")).await;
    assert_eq!(c.executions.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_unknown_outcome_not_held_lapses_with_the_lease() {
    let oncely = Oncely::builder(MemoryStore::new())
        .lease(Duration::from_millis(300))
        .conflict_mode(ConflictMode::Reject)
        .build()
        .expect("settings");
    let (app, c) = app(IdempotencyLayer::new(oncely).hold_unknown_outcomes(false));
    assert_eq!(send(&app, request(Method::POST, "/unknown", Some("k"), "")).await.status, StatusCode::GATEWAY_TIMEOUT);
    let during_lease = send(&app, request(Method::POST, "/unknown", Some("k"), "")).await;
    assert_eq!(during_lease.status, StatusCode::CONFLICT, "the key stays held: the effect may have happened");
    tokio::time::sleep(Duration::from_millis(500)).await; // the lease lapsing is the thing under test
    let after_lease = send(&app, request(Method::POST, "/unknown", Some("k"), "")).await;
    assert_eq!(after_lease.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(!after_lease.replayed(), "taken over and run again, not replayed");
    assert_eq!(c.executions.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_error_from_the_inner_service_holds_the_key_as_an_unknown_outcome() {
    // A timeout inside the layer cancels the handler after its effect: the retry must not run it again.
    let counters = Shared::default();
    let service = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::new(engine()))
        .timeout(Duration::from_millis(100))
        .service(routes(&counters));
    let first = service.clone().oneshot(request(Method::POST, "/slow", Some("k"), "")).await;
    assert!(first.is_err(), "the timeout fired inside the layer");
    let retry = service.clone().oneshot(request(Method::POST, "/slow", Some("k"), "")).await.expect("answer");
    assert_eq!(retry.status(), StatusCode::BAD_GATEWAY, "held as an unknown outcome");
    assert_eq!(counters.executions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn past_answer_within_the_client_gets_504_and_the_operation_goes_on_to_be_replayed() {
    let (app, c) = app(IdempotencyLayer::new(engine()).answer_within(Duration::from_millis(100)));
    let first = send(&app, request(Method::POST, "/slow", Some("k"), "")).await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(first.problem_type(), "urn:oncely:problem:upstream-timeout");
    assert_eq!(first.should_retry(), Some("true"));
    // A retry meets the operation still running, waits (the default), and gets its result.
    let retry = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Method::POST, "/slow", Some("k"), "")).await }
    });
    open_gate(&c);
    let retry = retry.await.expect("task");
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.body, "slow execution 1");
    assert!(retry.replayed());
    assert_eq!(c.executions.load(Ordering::SeqCst), 1);
}

/// A memory store whose claims commit on a task of their own and answer only once the
/// test opens a gate: the shape of a store with a writer thread (SQLite), where a caller
/// that goes away mid-claim does not stop the claim from committing.
#[derive(Clone)]
struct DetachedClaims {
    inner: MemoryStore,
    claiming: Arc<Notify>,
    gate: Arc<Notify>,
    open: Arc<std::sync::atomic::AtomicBool>,
}

impl Store for DetachedClaims {
    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        let inner = self.inner.clone();
        let (scope, key, fingerprint) =
            (request.scope().clone(), request.key().clone(), request.fingerprint().copied());
        let (lease, retention, claim_id) = (request.lease(), request.retention(), request.claim_id());
        let committed = tokio::spawn(async move {
            let request = ClaimRequest::new(&scope, &key, fingerprint, lease, retention).with_claim_id(claim_id);
            inner.claim(&request).await
        });
        let opened = self.gate.notified();
        self.claiming.notify_one();
        if !self.open.load(Ordering::SeqCst) {
            opened.await;
        }
        committed.await.map_err(StoreError::unavailable)?
    }
    async fn complete(&self, c: Claim, p: Bytes, r: Duration) -> Result<(), StoreError> {
        self.inner.complete(c, p, r).await
    }
    async fn release(&self, c: Claim) -> Result<(), StoreError> {
        self.inner.release(c).await
    }
    async fn touch(&self, c: Claim, l: Duration) -> Result<(), StoreError> {
        self.inner.touch(c, l).await
    }
    async fn first_seen(&self, request: &FirstSeen<'_>) -> Result<bool, StoreError> {
        self.inner.first_seen(request).await
    }
    async fn record_hits(&self, hits: &[(StorageKey, u64)]) -> Result<(), StoreError> {
        self.inner.record_hits(hits).await
    }
    fn subscribe(&self, k: &StorageKey) -> Notified {
        self.inner.subscribe(k)
    }
}

#[tokio::test]
async fn a_client_that_hangs_up_during_the_claim_does_not_strand_the_key() {
    let store = DetachedClaims {
        inner: MemoryStore::new(),
        claiming: Arc::default(),
        gate: Arc::default(),
        open: Arc::default(),
    };
    let oncely = Oncely::builder(store.clone())
        .conflict_mode(ConflictMode::Wait { timeout: Duration::from_secs(2) })
        .build()
        .expect("settings");
    let counters = Shared::default();
    let app = routes(&counters).layer(IdempotencyLayer::new(oncely));
    let hung_up = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("k", "{}")).await }
    });
    store.claiming.notified().await;
    hung_up.abort(); // the client goes away while its claim is being committed
    let _ = hung_up.await;
    store.open.store(true, Ordering::SeqCst);
    store.gate.notify_waiters();

    // The claim and the operation finish without the client: the retry waits for them
    // and replays, rather than meeting a claim nobody runs (409 after the wait).
    let retry = send(&app, post_with("k", "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed(), "the first request ran to completion without its client");
    assert_eq!(counters.executions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_webhook_redelivery_is_keyed_by_its_body_id_and_ignores_the_members_that_change() {
    let layer = IdempotencyLayer::new(engine())
        .key_from_body("/id".parse().expect("pointer"))
        .fingerprint_ignore(["/delivery/attempt".parse().expect("pointer")])
        .fingerprint_headers([axum::http::HeaderName::from_static("x-api-version")])
        .require_key(true);
    let (app, c) = app(layer);
    let delivery = |attempt: u32, version: &'static str| {
        let body = format!(r#"{{"id":"evt_1","type":"charge.succeeded","delivery":{{"attempt":{attempt}}}}}"#);
        Request::post("/payments")
            .header("content-type", "application/json; charset=UTF-8")
            .header("x-api-version", version)
            .body(Body::from(body))
            .expect("request")
    };
    let first = send(&app, delivery(1, "2026-01")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let redelivered = send(&app, delivery(2, "2026-01")).await;
    assert!(redelivered.replayed(), "same id, only the attempt counter changed: {redelivered:?}");
    let other_version = send(&app, delivery(3, "2027-01")).await;
    assert_eq!(other_version.problem_type(), "urn:oncely:problem:key-reused", "a header in the fingerprint");
    assert_eq!(c.executions.load(Ordering::SeqCst), 1);

    let no_id = Request::post("/payments").body(Body::from(r#"{"type":"ping"}"#)).expect("request");
    assert_eq!(send(&app, no_id).await.problem_type(), "urn:oncely:problem:missing-key");
    let bad_id = Request::post("/payments").body(Body::from(r#"{"id":{"nested":1}}"#)).expect("request");
    assert_eq!(send(&app, bad_id).await.problem_type(), "urn:oncely:problem:invalid-key");
    assert_eq!(c.executions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_media_type_written_another_way_is_the_same_request() {
    let (app, c) = app(IdempotencyLayer::new(engine()));
    let with_type = |media_type: &'static str| {
        Request::post("/payments")
            .header("idempotency-key", "k")
            .header("content-type", media_type)
            .body(Body::from(r#"{"amount":1}"#))
            .expect("request")
    };
    send(&app, with_type("application/json")).await;
    for same in
        ["application/json; charset=utf-8", "Application/JSON;charset=UTF-8", "application/json ; charset=\"utf-8\""]
    {
        assert!(send(&app, with_type(same)).await.replayed(), "{same}");
    }
    assert_eq!(send(&app, with_type("text/plain")).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(c.executions.load(Ordering::SeqCst), 1);
}

/// Sends its head at once, then a chunk every 200 ms for 2 s: a body slower than the
/// claim's renewal.
async fn trickle(State(c): State<Shared>) -> Response<Body> {
    c.executions.fetch_add(1, Ordering::SeqCst);
    let chunks = futures_util::stream::unfold(0u32, |n| async move {
        if n == 10 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Some((Ok::<_, std::io::Error>(Bytes::from_static(b"x")), n + 1))
    });
    Response::new(Body::from_stream(chunks))
}

#[tokio::test]
async fn an_operation_still_running_when_its_renewal_ends_is_held_as_unknown_not_run_again() {
    let oncely = Oncely::builder(MemoryStore::new())
        .lease(Duration::from_millis(300))
        .keep_alive_ceiling(Duration::from_millis(600))
        .build()
        .expect("settings");
    let counters = Shared::default();
    let app = Router::new()
        .route("/trickle", post(trickle))
        .with_state(counters.clone())
        .layer(IdempotencyLayer::new(oncely).answer_within(Duration::from_millis(100)));
    let first = send(&app, request(Method::POST, "/trickle", Some("k"), "")).await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    // The retry waits for the operation; at its renewal's end it is held as unknown.
    let retry = send(&app, request(Method::POST, "/trickle", Some("k"), "")).await;
    assert_eq!(retry.problem_type(), "urn:oncely:problem:outcome-unknown", "{retry:?}");
    tokio::time::sleep(Duration::from_millis(600)).await; // past the lease: a takeover would happen now
    let later = send(&app, request(Method::POST, "/trickle", Some("k"), "")).await;
    assert_eq!(later.problem_type(), "urn:oncely:problem:outcome-unknown");
    assert_eq!(counters.executions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_gzip_body_carries_its_key_too() {
    use std::io::Write;
    let gzip = |json: &str| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(json.as_bytes()).expect("gzip");
        encoder.finish().expect("gzip")
    };
    let (app, c) = app(IdempotencyLayer::new(engine()).key_from_body("/id".parse().expect("pointer")));
    for _ in 0..2 {
        let req = Request::post("/payments")
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(Body::from(gzip(r#"{"id":"evt_1"}"#)))
            .expect("request");
        send(&app, req).await;
    }
    assert_eq!(c.executions.load(Ordering::SeqCst), 1, "the second delivery was replayed");
}
