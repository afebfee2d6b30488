//! The client's spans, in a test binary of their own: `tracing` caches whether a callsite
//! is enabled process-wide, computed by the first thread to reach it. With the
//! subscriber this test installs for its own thread as the only one registered, a
//! sibling test reaching `oncely_client.call` first, on a thread without a subscriber,
//! would cache it as never enabled, and this test would see no span (tracing-core
//! 0.1.36, `Rebuilder::JustOne`; tokio-rs/tracing#3611). It failed that way once in
//! CI among the other client tests; alone in its process nothing can race it.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use oncely::{ConflictMode, IdempotencyKey, MemoryStore, Oncely};
use oncely_client::{IdempotencyMiddleware, key_hash};
use oncely_http::IdempotencyLayer;
use support::*;

const BODY: &str = r#"{"amount":1999,"currency":"eur"}"#;

/// The payments routes behind a reject-mode layer, as at the root of `tests/axum.rs`.
async fn start() -> (String, Shared) {
    let shared = Shared::default();
    let oncely = Oncely::builder(MemoryStore::new())
        .lease(Duration::from_secs(2))
        .conflict_mode(ConflictMode::Reject)
        .build()
        .expect("valid settings");
    let addr = serve(payments_routes(shared.clone()).route_layer(IdempotencyLayer::new(oncely))).await;
    (format!("http://{addr}"), shared)
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut all) = self.0.lock() {
            all.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn one_span_per_call_with_the_key_hash_and_each_attempt_never_the_key() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::DEBUG)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (url, shared) = start().await;
    let key = IdempotencyKey::new("secret-key-7").expect("key");
    let response = client(IdempotencyMiddleware::new().retry(policy()))
        .post(format!("{url}/unavailable-first"))
        .body(BODY)
        .with_extension(key.clone())
        .send()
        .await
        .expect("success");
    assert_eq!(response.status(), 201);
    assert_eq!(shared.executions(), 1);

    let log = String::from_utf8(captured.0.lock().expect("log").clone()).expect("utf-8");
    let call_closes: Vec<_> = log.lines().filter(|l| l.contains("oncely_client.call") && l.contains("close")).collect();
    let mine: Vec<_> = call_closes.iter().filter(|l| !l.contains("oncely_client.attempt")).collect();
    assert_eq!(mine.len(), 1, "one call span: {log}");
    assert!(mine[0].contains(&format!("key_hash={}", key_hash(&key))), "{}", mine[0]);
    assert!(mine[0].contains("attempts=2"), "{}", mine[0]);
    let attempts = log.lines().filter(|l| l.contains("oncely_client.attempt") && l.contains("close")).count();
    assert_eq!(attempts, 2, "one span per attempt: {log}");
    assert!(log.contains("retrying"), "{log}");
    assert!(!log.contains("secret-key-7"), "the raw key is never logged: {log}");
}
