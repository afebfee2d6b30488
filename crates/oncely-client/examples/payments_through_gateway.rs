//! An order service that charges a card through the `oncely` gateway, with
//! `oncely-client` keeping one key across its retries.
//!
//! The payments API is slow on the first charge (an injected fault: it holds its answer
//! until the client has given up on the first attempt), so the service's first attempt
//! times out. The client retries with the same key; the gateway, which saw that key
//! running, holds the retry until the first charge completes and answers it with the
//! stored result. At the end there is one charge, and the service has its answer.
//!
//! ```text
//! cargo run -p oncely-client --example payments_through_gateway
//! ```
//!
//! It builds and starts the real gateway binary (`cargo build -p oncely-gateway`) on
//! loopback, on the `memory://` store. It also runs as a test under
//! `cargo test -p oncely-client`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use oncely_client::{CallOutcome, IdempotencyKey, IdempotencyMiddleware, RetryPolicy};
use reqwest_middleware::ClientBuilder;
use tokio::sync::Notify;

/// The payments API: records charges; the first one is held until `recovered`.
#[derive(Default)]
struct Payments {
    charges: std::sync::Mutex<Vec<String>>,
    slow_first: AtomicBool,
    recovered: Notify,
}

async fn charge(State(api): State<Arc<Payments>>, body: String) -> (StatusCode, String) {
    let id = {
        let Ok(mut charges) = api.charges.lock() else { return (StatusCode::INTERNAL_SERVER_ERROR, String::new()) };
        charges.push(body);
        format!("ch_{}", charges.len())
    };
    if api.slow_first.swap(false, Ordering::SeqCst) {
        api.recovered.notified().await; // the injected fault: no answer in time
    }
    (StatusCode::CREATED, format!(r#"{{"id":"{id}","status":"succeeded"}}"#))
}

const GATEWAY_CONFIG: &str = r#"
[[routes]]
path = "/v1/charges"
required = true
on_conflict = "wait"   # a retry of a running charge waits for its answer
wait_timeout = "20s"
"#;

/// What the run ended with.
#[derive(Debug)]
struct Summary {
    status: u16,
    body: String,
    outcome: CallOutcome,
    charges: usize,
}

async fn run() -> Result<Summary, Box<dyn std::error::Error>> {
    let api = Arc::new(Payments { slow_first: AtomicBool::new(true), ..Payments::default() });
    let app = Router::new().route("/v1/charges", post(charge)).with_state(api.clone());
    let upstream = support::serve(app).await;
    let gateway = support::start_gateway(upstream, GATEWAY_CONFIG).await;
    println!("payments API on {upstream}, gateway on {}", gateway.url);

    // The order service's client: 1 s per attempt, retries with one key.
    let on_retry = api.clone();
    let middleware = IdempotencyMiddleware::new()
        .retry(RetryPolicy::default().with_base_delay(Duration::from_millis(50)).with_deadline(Duration::from_secs(20)))
        .on_retry(move |event| {
            println!(
                "attempt {} failed ({:?}); retrying in {:?} with the same key",
                event.attempt, event.cause, event.delay
            );
            on_retry.recovered.notify_one(); // the fault clears once the client has given up once
        });
    let client = ClientBuilder::new(reqwest::Client::new()).with(middleware).build();

    // The key is made and stored with the order *before* the call: after a crash, the
    // service sends the same key again and gets this charge's answer, not a second charge.
    let key = IdempotencyKey::uuid_v7();
    let order = (42, key.clone()); // stand-in for "INSERT INTO orders (id, payment_key)"
    println!("order {} stored with payment key {}", order.0, order.1);

    let response = client
        .post(format!("{}/v1/charges", gateway.url))
        .header("content-type", "application/json")
        .body(r#"{"amount":1999,"currency":"eur","order":42}"#)
        .timeout(Duration::from_secs(1))
        .with_extension(key)
        .send()
        .await?;
    let outcome = response.extensions().get::<CallOutcome>().cloned().ok_or("no call outcome")?;
    let status = response.status().as_u16();
    let body = response.text().await?;
    let charges = api.charges.lock().map_err(|_| "lock")?.len();
    println!(
        "{status} {body} after {} attempt(s), replayed: {}; charges made: {charges}",
        outcome.attempts, outcome.replayed
    );
    Ok(Summary { status, body, outcome, charges })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let summary = run().await?;
    if summary.charges != 1 || summary.status != 201 || summary.body.is_empty() || summary.outcome.attempts < 2 {
        return Err(format!("expected one charge after a retried timeout, got {summary:?}").into());
    }
    println!("one charge");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_order_is_charged_once_despite_the_timeout() {
        let summary = super::run().await.expect("the example runs");
        assert_eq!(summary.status, 201);
        assert_eq!(summary.body, r#"{"id":"ch_1","status":"succeeded"}"#);
        assert!(summary.outcome.attempts >= 2, "the first attempt timed out: {summary:?}");
        assert!(summary.outcome.replayed, "the retry got the first charge's stored answer");
        assert_eq!(summary.charges, 1);
    }
}
