//! The client against an axum app with the `oncely-http` layer, on loopback: the same
//! misbehaviours as against the gateway, and the client's own rules (Retry-After,
//! Stripe-Should-Retry, streamed bodies, keys, typed problems). The spans are checked in
//! `tests/spans.rs`, a binary of their own.

mod support;

use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use oncely::{ConflictMode, IdempotencyKey, MemoryStore, Oncely};
use oncely_client::{CallOutcome, Error, IdempotencyMiddleware, KeyFormat, RetryCause, StopReason};
use oncely_http::IdempotencyLayer;
use support::*;

const ATTEMPT: Duration = Duration::from_secs(1);
const BODY: &str = r#"{"amount":1999,"currency":"eur"}"#;

/// The payments routes twice: under `/wait` with a wait-mode layer (the default), and at
/// the root with a reject-mode layer. Both store 500 (the default): a payments API may
/// have charged before it failed.
fn app(shared: &Shared) -> Router {
    let wait = Oncely::builder(MemoryStore::new())
        .conflict_mode(ConflictMode::Wait { timeout: Duration::from_secs(20) })
        .build()
        .expect("valid settings");
    let reject = Oncely::builder(MemoryStore::new())
        .lease(Duration::from_secs(2))
        .conflict_mode(ConflictMode::Reject)
        .build()
        .expect("valid settings");
    Router::new()
        .nest("/wait", payments_routes(shared.clone()).route_layer(IdempotencyLayer::new(wait)))
        .merge(payments_routes(shared.clone()).route_layer(IdempotencyLayer::new(reject)))
}

async fn start() -> (String, Shared) {
    let shared = Shared::default();
    let addr = serve(app(&shared)).await;
    (format!("http://{addr}"), shared)
}

async fn post(
    client: &reqwest_middleware::ClientWithMiddleware,
    url: &str,
) -> Result<reqwest::Response, reqwest_middleware::Error> {
    client.post(url).header("content-type", "application/json").body(BODY).timeout(ATTEMPT).send().await
}

fn outcome(response: &reqwest::Response) -> CallOutcome {
    response.extensions().get::<CallOutcome>().cloned().expect("a covered call reports its outcome")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handler_runs_once_and_the_retry_waits_for_its_answer() {
    let (url, shared) = start().await;
    let (middleware, retries) = middleware(&shared, after_timeout);
    let response = post(&client(middleware), &format!("{url}/wait/slow")).await.expect("success");
    let outcome = outcome(&response);
    assert_eq!(response.status(), 201);
    assert!(outcome.attempts >= 2 && outcome.replayed, "{outcome:?}");
    assert_eq!(causes(&retries)[0], RetryCause::Timeout);
    assert_eq!(response.text().await.expect("body"), r#"{"charge":"ch_1","amount":1999}"#);
    assert_eq!(shared.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_while_running_is_retried_after_retry_after_until_the_replay() {
    let (url, shared) = start().await;
    let (middleware, retries) = middleware(&shared, after_conflict);
    let response = post(&client(middleware), &format!("{url}/busy")).await.expect("success");
    assert_eq!(response.status(), 201);
    assert!(outcome(&response).replayed);
    assert!(causes(&retries).contains(&RetryCause::Status(StatusCode::CONFLICT)), "{:?}", causes(&retries));
    assert_eq!(shared.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_500_after_acting_is_replayed_when_the_server_stores_it() {
    let (url, shared) = start().await;
    let (middleware, _) = middleware(&shared, |_| false);
    let response = post(&client(middleware), &format!("{url}/fail-after")).await.expect("an answer");
    let outcome = outcome(&response);
    assert_eq!(response.status(), 500);
    assert_eq!((outcome.attempts, outcome.replayed, outcome.stop), (2, true, StopReason::Answered));
    assert_eq!(shared.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_503_before_acting_is_retried_with_one_key() {
    let (url, shared) = start().await;
    let (middleware, _) = middleware(&shared, |_| false);
    let response = post(&client(middleware), &format!("{url}/unavailable-first")).await.expect("success");
    let outcome = outcome(&response);
    assert_eq!(response.status(), 201);
    assert_eq!((outcome.attempts, outcome.replayed), (2, false));
    let keys = shared.keys.lock().expect("keys").clone();
    assert_eq!(keys, vec![format!("\"{}\"", outcome.key); 2], "the same key, as an sf-string, on both attempts");
    assert_eq!(shared.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_broken_after_the_answer_is_retried_and_replayed() {
    let (url, shared) = start().await;
    let backend = url.trim_start_matches("http://").parse().expect("addr");
    let relay = start_relay(backend).await;
    let (middleware, retries) = middleware(&shared, |_| false);
    let response = post(&client(middleware), &format!("http://{}/pay", relay.addr)).await.expect("success");
    let outcome = outcome(&response);
    assert_eq!(response.status(), 201);
    assert!(outcome.attempts >= 2 && outcome.replayed, "{outcome:?}");
    assert!(matches!(causes(&retries)[0], RetryCause::Connection(_)), "{:?}", causes(&retries));
    assert_eq!(shared.executions(), 1);
    // The relay did break a connection (the notification is stored if nobody waited).
    tokio::time::timeout(Duration::from_secs(5), relay.broken.notified()).await.expect("a connection was broken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_should_retry_false_stops_at_once() {
    let (url, shared) = start().await;
    let (middleware, retries) = middleware(&shared, |_| false);
    let response = post(&client(middleware), &format!("{url}/no-retry")).await.expect("the 503 as it is");
    let outcome = outcome(&response);
    assert_eq!(response.status(), 503);
    assert_eq!((outcome.attempts, outcome.stop), (1, StopReason::ServerSaidNo));
    assert!(causes(&retries).is_empty());
    assert_eq!(shared.arrivals(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_in_seconds_is_waited_exactly() {
    let (url, shared) = start().await;
    let (middleware, retries) = middleware(&shared, |_| false);
    let response = post(&client(middleware), &format!("{url}/retry-after-first")).await.expect("success");
    assert_eq!(response.status(), 201);
    let delays: Vec<_> = retries.lock().expect("retries").iter().map(|e| e.delay).collect();
    assert_eq!(delays, [Duration::from_secs(1)], "Retry-After: 1, not the 20 ms backoff");
    assert!(outcome(&response).elapsed >= Duration::from_secs(1));
    assert_eq!(shared.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_is_sent_once_and_the_outcome_says_why() {
    let (url, shared) = start().await;
    let (middleware, retries) = middleware(&shared, |_| false);
    let body = reqwest::Body::wrap(http_body_util::Full::new(bytes::Bytes::from_static(BODY.as_bytes())));
    let response = client(middleware)
        .post(format!("{url}/unavailable-first"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the 503 as it is");
    let outcome = outcome(&response);
    assert_eq!(response.status(), 503);
    assert_eq!((outcome.attempts, outcome.stop), (1, StopReason::BodyNotReplayable));
    assert!(causes(&retries).is_empty());
    assert_eq!(shared.arrivals(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_key_sent_again_after_a_crash_gets_the_first_answer() {
    let (url, shared) = start().await;
    let key = IdempotencyKey::uuid_v7(); // what the caller stores before sending
    let send = |format: KeyFormat| {
        let client = client(IdempotencyMiddleware::new().key_format(format));
        let (url, key) = (url.clone(), key.clone());
        async move {
            client
                .post(format!("{url}/pay"))
                .header("content-type", "application/json")
                .body(BODY)
                .with_extension(key)
                .send()
                .await
                .expect("success")
        }
    };
    let first = send(KeyFormat::SfString).await;
    assert_eq!(outcome(&first).key, key);
    assert!(!outcome(&first).replayed);
    let first_body = first.text().await.expect("body");
    // "After the crash", from a client that sends bare keys: the same key to the server.
    let again = send(KeyFormat::Token).await;
    assert!(outcome(&again).replayed);
    assert_eq!(again.text().await.expect("body"), first_body);
    assert_eq!(shared.executions(), 1);
    assert_eq!(*shared.keys.lock().expect("keys"), [format!("\"{key}\"")], "only the first reached the handler");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_problem_is_a_typed_error_with_its_type() {
    let (url, shared) = start().await;
    let key = IdempotencyKey::new("order-42").expect("key");
    let client = client(IdempotencyMiddleware::new());
    let send = |body: &'static str| {
        client
            .post(format!("{url}/pay"))
            .header("content-type", "application/json")
            .body(body)
            .with_extension(key.clone())
            .send()
    };
    assert_eq!(send(BODY).await.expect("first").status(), 201);
    let error = send(r#"{"amount":5000}"#).await.expect_err("the key was used for another request");
    let error = Error::from_middleware(error).expect("the client's error");
    let problem = error.problem().expect("a problem");
    assert_eq!(
        (problem.status, problem.type_uri.as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "urn:oncely:problem:key-reused")
    );
    assert_eq!((error.attempts(), error.stop(), error.key()), (1, StopReason::Answered, Some(&key)));
    assert!(!error.to_string().contains("order-42"), "the message names the key's hash, not the key: {error}");
    assert_eq!(shared.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_function_does_the_same_without_middleware() {
    let (url, shared) = start().await;
    let client = reqwest::Client::new();
    let request = client.post(format!("{url}/unavailable-first")).body(BODY).build().expect("request");
    let response = oncely_client::send(&client, request).await.expect("success");
    let outcome = outcome(&response);
    assert_eq!(response.status(), 201);
    assert_eq!(outcome.attempts, 2);
    assert_eq!(shared.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncovered_methods_pass_through_without_a_key() {
    let (url, shared) = start().await;
    let response = client(IdempotencyMiddleware::new()).put(format!("{url}/pay")).send().await.expect("an answer");
    assert_eq!(response.status(), 405);
    assert!(response.extensions().get::<CallOutcome>().is_none());
    assert_eq!(shared.arrivals(), 0);
}
