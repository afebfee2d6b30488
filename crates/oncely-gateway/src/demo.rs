//! `oncely demo`: a small payments API with the gateway in front of it, so a new user can
//! see retries replayed, reused keys refused and concurrent duplicates run once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::config::{Config, RawConfig, RawRoute, RawSettings};
use crate::server::{Bound, ServeOptions, serve};

/// The built-in upstream: `POST /payments` charges (slowly, so duplicates overlap).
pub fn payments_api() -> Router {
    let charges = Arc::new(AtomicU64::new(0));
    Router::new().route("/payments", post(charge).get(count)).with_state(charges)
}

async fn charge(State(charges): State<Arc<AtomicU64>>, body: axum::body::Bytes) -> (StatusCode, axum::Json<Value>) {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    tokio::time::sleep(Duration::from_millis(500)).await; // a slow card network
    let n = charges.fetch_add(1, Ordering::SeqCst) + 1;
    println!("upstream: charge #{n} executed");
    (StatusCode::CREATED, axum::Json(json!({ "id": format!("ch_{n:06}"), "request": request })))
}

async fn count(State(charges): State<Arc<AtomicU64>>) -> axum::Json<Value> {
    axum::Json(json!({ "charges_executed": charges.load(Ordering::SeqCst) }))
}

/// Runs the demo until Ctrl-C.
pub async fn run(listen: SocketAddr, admin: SocketAddr, upstream: SocketAddr, store: String) -> Result<(), String> {
    let upstream = TcpListener::bind(upstream).await.map_err(|e| format!("demo upstream {upstream}: {e}"))?;
    let upstream_addr = upstream.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move { axum::serve(upstream, payments_api()).await });

    let config = RawConfig {
        routes: vec![RawRoute {
            path: "/payments".into(),
            settings: RawSettings { required: Some(true), ..RawSettings::default() },
        }],
        ..RawConfig::default()
    };
    let options = ServeOptions {
        upstream: format!("http://{upstream_addr}"),
        listen,
        admin_listen: Some(admin),
        store: store.clone(),
    };
    let config = Config::resolve(&config, &RawSettings::default()).map_err(|e| e.to_string())?;
    serve(options, config, move |bound| print_tour(bound, upstream_addr, &store)).await
}

fn print_tour(bound: Bound, upstream: SocketAddr, store: &str) {
    let gw = format!("http://{}", bound.listen);
    let key = format!("demo-{}", std::process::id());
    println!(
        r#"
oncely demo: the gateway on {gw} (store {store}) in front of a payments API on http://{upstream}
(admin: {admin})

1. Charge once (takes 0.5 s, the card network is slow):
   curl -i -X POST {gw}/payments -H 'Idempotency-Key: {key}' -H 'Content-Type: application/json' -d '{{"amount":1999,"currency":"eur"}}'

2. Retry it: the stored answer comes back at once, marked Idempotent-Replayed: true, and nothing is charged:
   curl -i -X POST {gw}/payments -H 'Idempotency-Key: {key}' -H 'Content-Type: application/json' -d '{{"currency":"eur","amount":1999}}'

3. Reuse the key for another amount: 422, nothing charged:
   curl -i -X POST {gw}/payments -H 'Idempotency-Key: {key}' -H 'Content-Type: application/json' -d '{{"amount":5000,"currency":"eur"}}'

4. Forget the key: 400, /payments requires one:
   curl -i -X POST {gw}/payments -d '{{"amount":1}}'

5. Five concurrent duplicates of a new request: one charge, five identical answers:
   for i in 1 2 3 4 5; do curl -s -X POST {gw}/payments -H 'Idempotency-Key: {key}-burst' -d '{{"amount":10}}' & done; wait; echo

6. Count what the upstream really executed:
   curl -s {gw}/payments

Ctrl-C stops both. Records survive a restart of the gateway ({store})."#,
        admin = bound.admin.map_or_else(|| "off".to_string(), |a| format!("http://{a}/metrics")),
    );
    crate::cli::announce(bound);
}
