//! Criterion benchmarks for the `Idempotency-Key` layer, in process.
//!
//! Each iteration sends one request through an axum `Router` with `tower::ServiceExt::oneshot`
//! on a Tokio current-thread runtime and reads the whole response body, as a server would.
//! Requests (headers, key, ~100-byte JSON body) are built outside the timed section
//! (`iter_batched`), so every case times the same work apart from the layer:
//!
//! - `bare_handler`: the router with no layer (the baseline);
//! - `new_key`: layer + `MemoryStore`, a fresh key every request (claim, execute, complete);
//! - `replay`: layer, the same completed key every request (one claim that finds the record);
//! - `method_not_covered`: layer, a PUT (not covered), passed through untouched.
//!
//! The layer's added cost is the difference to `bare_handler`. See
//! `docs/benchmarks-http-gateway.draft.md` for the results.
//!
//! ```text
//! cargo bench -p oncely-http --bench layer
//! ```

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use axum::routing::post;
use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::BodyExt;
use oncely::{MemoryStore, Oncely};
use oncely_http::IdempotencyLayer;
use tokio::runtime::Runtime;
use tower::ServiceExt;

/// The request body every case sends (~100 bytes of JSON).
const BODY: &str = r#"{"amount":1999,"currency":"eur","customer":"cus_9s6XKzkNRiz8i3","description":"bench order 42"}"#;
/// The response the handler produces.
const RESPONSE: &str = r#"{"id":"ch_1","amount":1999}"#;

async fn charge() -> (StatusCode, [(header::HeaderName, &'static str); 1], &'static str) {
    (StatusCode::CREATED, [(header::CONTENT_TYPE, "application/json")], RESPONSE)
}

fn bare_router() -> Router {
    Router::new().route("/payments", post(charge).put(charge))
}

fn layered_router() -> Router {
    let oncely = Oncely::new(MemoryStore::builder().no_sweeper().build());
    Router::new().route("/payments", post(charge).put(charge)).route_layer(IdempotencyLayer::new(oncely))
}

fn request(method: Method, key: Option<String>) -> Request<Body> {
    let mut builder = Request::builder()
        .method(method)
        .uri("/payments")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, BODY.len());
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(BODY)).expect("benchmark request builds")
}

/// Sends `request` through a clone of `router` and reads the whole response.
async fn send(router: &Router, request: Request<Body>) -> (StatusCode, Bytes) {
    let response = router.clone().oneshot(request).await.expect("routers are infallible");
    let status = response.status();
    let body = response.into_body().collect().await.expect("body reads").to_bytes();
    (status, body)
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime builds")
}

fn layer(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("layer");
    group.throughput(Throughput::Elements(1));
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(5));
    group.sample_size(50);

    // (1) The baseline: the same router, no layer.
    let bare = bare_router();
    group.bench_function("bare_handler", |b| {
        b.to_async(&rt).iter_batched(
            || request(Method::POST, None),
            |req| async { black_box(send(&bare, req).await) },
            BatchSize::SmallInput,
        );
    });

    // (2) A new key every request. Keys come from a counter in the (untimed) setup, so
    // none repeats across warm-up and samples; the store keeps every completed record.
    let layered = layered_router();
    let next = AtomicU64::new(0);
    group.bench_function("new_key", |b| {
        b.to_async(&rt).iter_batched(
            || request(Method::POST, Some(format!("new-{:016x}", next.fetch_add(1, Ordering::Relaxed)))),
            |req| async {
                let (status, body) = send(&layered, req).await;
                debug_assert_eq!(status, StatusCode::CREATED);
                black_box((status, body))
            },
            BatchSize::SmallInput,
        );
    });

    // (3) The replay of a completed key.
    let replayed = layered_router();
    let (status, first) = rt.block_on(send(&replayed, request(Method::POST, Some("replayed-key".into()))));
    assert_eq!((status, first.as_ref()), (StatusCode::CREATED, RESPONSE.as_bytes()));
    let (status, again) = rt.block_on(send(&replayed, request(Method::POST, Some("replayed-key".into()))));
    assert_eq!((status, again), (StatusCode::CREATED, first), "the second request is a replay");
    group.bench_function("replay", |b| {
        b.to_async(&rt).iter_batched(
            || request(Method::POST, Some("replayed-key".into())),
            |req| async { black_box(send(&replayed, req).await) },
            BatchSize::SmallInput,
        );
    });

    // (4) A method the layer does not cover (PUT), with a key: passed through untouched.
    let passed = layered_router();
    group.bench_function("method_not_covered", |b| {
        b.to_async(&rt).iter_batched(
            || request(Method::PUT, Some("put-key".into())),
            |req| async { black_box(send(&passed, req).await) },
            BatchSize::SmallInput,
        );
    });

    group.finish();
}

criterion_group!(benches, layer);
criterion_main!(benches);
