//! The client against the real `oncely` gateway binary, in front of a payments upstream
//! that misbehaves in each of the ways a retry must survive. Every test counts the
//! upstream's executions: one charge, whatever happened on the way.

mod support;

use std::time::Duration;

use oncely_client::{CallOutcome, Error, RetryCause, RetryPolicy, StopReason};
use support::*;

/// Each attempt may take this long; `/slow` and `/busy` hold longer, until the gate opens.
const ATTEMPT: Duration = Duration::from_secs(1);
const BODY: &str = r#"{"amount":1999,"currency":"eur"}"#;

const CONFIG: &str = r#"
[defaults]
lease = "30s"

[[routes]]
path = "/slow"
on_conflict = "wait"
wait_timeout = "20s"

# Today a 409's `Retry-After` is the lease time left (rounded up), which the client
# honours; a short lease keeps it short. (The design asks for a short Retry-After
# whatever the lease; not the case yet.)
[[routes]]
path = "/busy"
on_conflict = "reject"
lease = "2s"

# Today the gateway releases the key on every 5xx by default, so a retry after "500 after
# the charge" would charge again (a later issue makes 500 stored by default). This route
# stores 500 as the design says a payments API should: the retry gets the 500 replayed.
[[routes]]
path = "/fail-after"
store_statuses = [200, 201, "4xx", 500]
"#;

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
async fn a_slow_upstream_is_charged_once_and_the_retry_gets_its_answer() {
    let shared = Shared::default();
    let upstream = serve(payments_routes(shared.clone())).await;
    let gateway = start_gateway(upstream, CONFIG).await;
    let (middleware, retries) = middleware(&shared, after_timeout);

    let response = post(&client(middleware), &format!("{}/slow", gateway.url)).await.expect("the call succeeds");
    let outcome = outcome(&response);
    assert_eq!(response.status(), 201);
    assert_eq!(response.text().await.expect("body"), r#"{"charge":"ch_1","amount":1999}"#);
    assert!(outcome.attempts >= 2, "the first attempt timed out: {outcome:?}");
    assert!(outcome.replayed, "the retry waited for the first request and got its stored answer");
    assert_eq!(causes(&retries)[0], RetryCause::Timeout);
    assert_eq!(shared.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_409_while_the_first_runs_is_retried_until_the_replay() {
    let shared = Shared::default();
    let upstream = serve(payments_routes(shared.clone())).await;
    let gateway = start_gateway(upstream, CONFIG).await;
    let (middleware, retries) = middleware(&shared, after_conflict);

    let response = post(&client(middleware), &format!("{}/busy", gateway.url)).await.expect("the call succeeds");
    let outcome = outcome(&response);
    assert_eq!(response.status(), 201);
    assert!(outcome.replayed);
    assert!(causes(&retries).contains(&RetryCause::Status(reqwest::StatusCode::CONFLICT)), "{:?}", causes(&retries));
    // The gateway's 409 says `Retry-After` (1 or 2 s with this lease); the client waited
    // exactly that, in whole seconds, not a backoff of tens of milliseconds.
    let waited = retries
        .lock()
        .expect("retries")
        .iter()
        .find(|e| e.cause == RetryCause::Status(reqwest::StatusCode::CONFLICT))
        .map(|e| e.delay);
    assert!(
        matches!(waited.map(|d| d.as_secs()), Some(1 | 2)) && waited.is_some_and(|d| d.subsec_nanos() == 0),
        "{waited:?}"
    );
    assert_eq!(shared.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_after_acting_is_replayed_not_run_again() {
    let shared = Shared::default();
    let upstream = serve(payments_routes(shared.clone())).await;
    let gateway = start_gateway(upstream, CONFIG).await;
    let (middleware, _) = middleware(&shared, |_| false);

    let response = post(&client(middleware), &format!("{}/fail-after", gateway.url)).await.expect("an answer");
    let outcome = outcome(&response);
    assert_eq!(response.status(), 500, "the first answer, as the upstream gave it");
    assert_eq!(outcome.attempts, 2, "retried once; the replay is final");
    assert!(outcome.replayed);
    assert_eq!(outcome.stop, StopReason::Answered);
    assert_eq!(response.text().await.expect("body"), r#"{"charge":"ch_1","amount":1999}"#);
    assert_eq!(shared.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_before_acting_is_retried_with_the_same_key_and_runs_once() {
    let shared = Shared::default();
    let upstream = serve(payments_routes(shared.clone())).await;
    let gateway = start_gateway(upstream, CONFIG).await;
    let (middleware, _) = middleware(&shared, |_| false);

    let response = post(&client(middleware), &format!("{}/unavailable-first", gateway.url)).await.expect("success");
    let outcome = outcome(&response);
    assert_eq!(response.status(), 201);
    assert_eq!((outcome.attempts, outcome.replayed), (2, false));
    assert_eq!(shared.arrivals(), 2, "the gateway released the key on 503, so the retry reached the upstream");
    assert_eq!(shared.executions(), 1);
    let keys = shared.keys.lock().expect("keys").clone();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1], "one key on every attempt");
    assert_eq!(keys[0], format!("\"{}\"", outcome.key), "sent as an sf-string, reported raw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_after_acting_ends_with_the_servers_clear_error() {
    let (upstream, shared) = start_dropping_upstream().await;
    let gateway = start_gateway(upstream, CONFIG).await;
    // The upstream may have acted before the connection broke: the gateway holds the key
    // as an unknown outcome and answers 502 `outcome-unknown` with
    // `Stripe-Should-Retry: false`, so the client stops at once with that clear error.
    let middleware = oncely_client::IdempotencyMiddleware::new()
        .retry(RetryPolicy::default().with_max_attempts(3).with_base_delay(Duration::from_millis(20)));

    let error = post(&client(middleware), &format!("{}/pay", gateway.url)).await.expect_err("no answer to give");
    let error = Error::find(&error).expect("the client's typed error");
    let problem = error.problem().expect("the server's problem");
    assert_eq!(problem.status.as_u16(), 502, "{error}");
    assert_eq!(problem.type_uri, "urn:oncely:problem:outcome-unknown", "{problem:?}");
    assert!(error.key().is_some(), "the key is reported, for the operator who reconciles");
    assert_eq!(error.stop(), StopReason::ServerSaidNo, "{error}");
    assert_eq!(shared.executions(), 1, "the retries never reached the upstream");
}
