//! Requests written by an attacker, and a crashed first attempt, against an axum app whose
//! handlers count their executions: deep JSON, compressed bodies, one principal holding
//! many claims, and the news of a takeover.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::routing;
use oncely::{MemoryStore, Oncely};
use oncely_http::{IdempotencyLayer, Takeover};
use tokio::sync::Notify;
use tower::ServiceExt;

#[derive(Default)]
struct Counters {
    executions: AtomicUsize,
    started: Notify,
    gate: Notify,
    takeover_headers: std::sync::Mutex<Vec<Option<String>>>,
}

type Shared = Arc<Counters>;

/// Counts, records the takeover news it was given, and answers with its execution number.
async fn create(
    State(c): State<Shared>,
    takeover: Option<axum::Extension<Takeover>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let n = c.executions.fetch_add(1, Ordering::SeqCst) + 1;
    let header = headers.get("idempotency-takeover").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    assert_eq!(header.is_some(), takeover.is_some(), "header and extension tell the same");
    c.takeover_headers.lock().expect("lock").push(header);
    (StatusCode::CREATED, format!("execution {n}, {} bytes", body.len()))
}

/// Signals that it started, then waits for the gate.
async fn slow(State(c): State<Shared>) -> (StatusCode, String) {
    let n = c.executions.fetch_add(1, Ordering::SeqCst) + 1;
    let opened = c.gate.notified();
    c.started.notify_one();
    opened.await;
    (StatusCode::CREATED, format!("slow execution {n}"))
}

fn app(layer: IdempotencyLayer<MemoryStore>) -> (Router, Shared) {
    let counters = Shared::default();
    let router = Router::new()
        .route("/payments", routing::post(create))
        .route("/slow", routing::post(slow))
        .with_state(counters.clone())
        .layer(layer);
    (router, counters)
}

fn post(uri: &str, key: &str, headers: &[(&str, &str)], body: impl Into<Body>) -> Request<Body> {
    let mut builder = Request::post(uri).header("idempotency-key", key);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(body.into()).expect("test request")
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
    let response = app.clone().oneshot(request).await.expect("infallible");
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, axum::body::to_bytes(body, usize::MAX).await.expect("body reads"))
}

fn problem_type(body: &Bytes) -> String {
    let json: serde_json::Value = serde_json::from_slice(body).expect("problem+json");
    json["type"].as_str().expect("type").to_string()
}

fn gzip(data: &[u8], mtime: u32) -> Vec<u8> {
    let mut encoder = flate2::GzBuilder::new().mtime(mtime).write(Vec::new(), flate2::Compression::best());
    encoder.write_all(data).expect("in memory");
    encoder.finish().expect("in memory")
}

/// Finding 1 of the hostile-input report: JSON nested deeper than a worker's stack allows
/// used to abort the process. Now it is fingerprinted like any body, and the app (and
/// every other request in it) goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_nested_a_million_deep_is_served_and_replayed() {
    let (app, counters) = app(IdempotencyLayer::new(Oncely::new(MemoryStore::new())).max_body(4 << 20));
    let depth = 1_000_000;
    let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let json = [("content-type", "application/json")];
    let (status, _, _) = send(&app, post("/payments", "deep", &json, deep.clone())).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, headers, _) = send(&app, post("/payments", "deep", &json, deep)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    // Deep objects too, and an ordinary request after them.
    let objects = format!("{}1{}", "{\"a\":".repeat(depth / 4), "}".repeat(depth / 4));
    let (status, _, _) = send(&app, post("/payments", "deep-objects", &json, objects)).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _, _) = send(&app, post("/payments", "normal", &json, r#"{"amount":1}"#)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(counters.executions.load(Ordering::SeqCst), 3);
}

/// Finding 8: a retry whose gzip body was compressed again (another timestamp in the gzip
/// header) is the same request, not a reused key.
#[tokio::test]
async fn a_gzip_body_compressed_again_replays_and_a_zip_bomb_is_413() {
    let (app, counters) = app(IdempotencyLayer::new(Oncely::new(MemoryStore::new())));
    let body = br#"{"amount":1999,"currency":"eur"}"#;
    let headers = [("content-type", "application/json"), ("content-encoding", "gzip")];
    let (status, _, first) = send(&app, post("/payments", "gz", &headers, gzip(body, 1))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, replay_headers, again) = send(&app, post("/payments", "gz", &headers, gzip(body, 2))).await;
    assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&again));
    assert_eq!(replay_headers["idempotent-replayed"], "true");
    assert_eq!(first, again);

    // 64 MiB of zeros in about 64 KiB: refused before anything is stored or run.
    let bomb = {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            encoder.write_all(&zeros).expect("in memory");
        }
        encoder.finish().expect("in memory")
    };
    assert!(bomb.len() < 1 << 20);
    let (status, _, problem) = send(&app, post("/payments", "bomb", &headers, bomb.clone())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(problem_type(&problem), "urn:oncely:problem:body-too-large");
    assert_eq!(counters.executions.load(Ordering::SeqCst), 1, "the bomb never ran");
    let (status, _, _) = send(&app, post("/payments", "bomb", &[("content-type", "application/json")], "{}")).await;
    assert_eq!(status, StatusCode::CREATED, "and left no record behind: the key is new");
}

/// One principal cannot hold more than its share of running operations; others are
/// unaffected, and its places come back as its operations finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_principal_is_capped_in_running_operations() {
    let layer = IdempotencyLayer::new(Oncely::new(MemoryStore::new())).max_in_progress_per_scope(2);
    let (app, counters) = app(layer);
    let as_mallory = [("authorization", "Bearer mallory")];
    let mut running = Vec::new();
    for key in ["m1", "m2"] {
        let started = counters.started.notified();
        let app = app.clone();
        running.push(tokio::spawn(async move { send(&app, post("/slow", key, &as_mallory, "")).await }));
        started.await;
    }
    let (status, headers, body) = send(&app, post("/slow", "m3", &as_mallory, "")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(problem_type(&body), "urn:oncely:problem:too-many-in-progress");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(counters.executions.load(Ordering::SeqCst), 2, "the third never ran");

    // Another principal is served meanwhile.
    let (status, _, _) = send(&app, post("/payments", "a1", &[("authorization", "Bearer alice")], "")).await;
    assert_eq!(status, StatusCode::CREATED);

    counters.gate.notify_waiters();
    for task in running {
        assert_eq!(task.await.expect("no panic").0, StatusCode::CREATED);
    }
    let started = counters.started.notified();
    let retry = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post("/slow", "m3", &as_mallory, "")).await }
    });
    started.await;
    counters.gate.notify_waiters();
    assert_eq!(retry.await.expect("no panic").0, StatusCode::CREATED, "the refused key was never claimed");
}

/// Finding 9: a request that takes over a lapsed claim tells the handler, which may have
/// seen the first attempt; a client cannot forge that news on a request of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_is_announced_to_the_handler_and_cannot_be_forged() {
    let store = MemoryStore::new();
    let oncely = Oncely::builder(store).lease(Duration::from_millis(300)).build().expect("settings");
    // A first attempt that crashed after claiming: its guard is dropped unfinished.
    let key = oncely::IdempotencyKey::new("crashed").expect("key");
    let scoped = oncely.scoped(oncely::Scope::global());
    let head = Request::post("/payments").body(()).expect("request").into_parts().0;
    let fingerprint = oncely_http::request_fingerprint(&head, b"", 1 << 20).expect("fingerprint");
    match scoped.acquire(&key, Some(fingerprint)).await.expect("claim") {
        oncely::Acquired::Execute(guard) => guard.abandon(),
        oncely::Acquired::Replay(_) => unreachable!("a new key"),
    }
    let (app, counters) = app(IdempotencyLayer::new(oncely));

    let forged = [("idempotency-takeover", "true")];
    let (status, _, _) = send(&app, post("/payments", "fresh", &forged, "")).await;
    assert_eq!(status, StatusCode::CREATED);

    // Wait out the abandoned claim's lease; the retry then takes it over.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, _, body) = send(&app, post("/payments", "crashed", &[], "")).await;
    assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));
    let seen = counters.takeover_headers.lock().expect("lock").clone();
    assert_eq!(seen, [None, Some("true".to_string())], "forged news removed; the takeover announced");
}

/// A handler that panics (a bug, or input it did not expect) runs in the request's own
/// task: the panic is caught there, the client gets 500 `handler-failed`, the app goes on
/// serving, and the key stays claimed until its lease lapses, so a retry meanwhile does
/// not run the handler again.
#[tokio::test]
async fn a_panicking_handler_is_500_and_the_app_goes_on() {
    async fn explode() -> StatusCode {
        panic!("a handler bug");
    }
    let executions = Arc::new(AtomicUsize::new(0));
    let counted = executions.clone();
    let reject = oncely::ConflictMode::Reject;
    let oncely = Oncely::builder(MemoryStore::new()).conflict_mode(reject).build().expect("settings");
    let app = Router::new()
        .route(
            "/explode",
            routing::post(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                explode()
            }),
        )
        .route("/payments", routing::post(|| async { (StatusCode::CREATED, "ok") }))
        .layer(IdempotencyLayer::new(oncely));
    let (status, _, body) = send(&app, post("/explode", "boom", &[], "{}")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(problem_type(&body), "urn:oncely:problem:handler-failed");
    let (status, _, _) = send(&app, post("/explode", "boom", &[], "{}")).await;
    assert_eq!(status, StatusCode::CONFLICT, "the key is held until its lease lapses");
    assert_eq!(executions.load(Ordering::SeqCst), 1, "the retry did not run the handler");
    let (status, _, _) = send(&app, post("/payments", "after", &[], "{}")).await;
    assert_eq!(status, StatusCode::CREATED, "the app goes on");
}
