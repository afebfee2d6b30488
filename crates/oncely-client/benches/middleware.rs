//! The middleware's added cost per request, in process.
//!
//! A trivial axum server on loopback (answers `201` with a small JSON body) and a
//! `reqwest` client on the same Tokio current-thread runtime; each iteration sends one
//! POST with a ~100-byte JSON body and reads the whole response. Cases:
//!
//! - `reqwest`: a plain `reqwest::Client` (the baseline);
//! - `reqwest_middleware_empty`: a `ClientWithMiddleware` with no middleware (the cost of
//!   the middleware chain itself);
//! - `idempotency`: with `IdempotencyMiddleware` (a UUID v7 key per call, sf-string
//!   header, the `tracing` spans with no subscriber, the retry loop's bookkeeping);
//! - `idempotency_plain_send`: `oncely_client::send` without reqwest-middleware.
//!
//! The middleware's cost is `idempotency` minus `reqwest_middleware_empty`.
//!
//! ```text
//! cargo bench -p oncely-client --bench middleware
//! ```

use std::hint::black_box;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use criterion::{Criterion, criterion_group, criterion_main};
use oncely_client::IdempotencyMiddleware;
use reqwest_middleware::ClientBuilder;
use tokio::runtime::Runtime;

const BODY: &str = r#"{"amount":1999,"currency":"eur","customer":"cus_9s6XKzkNRiz8i3","description":"bench order 42"}"#;

async fn charge() -> (StatusCode, &'static str) {
    (StatusCode::CREATED, r#"{"id":"ch_1","amount":1999}"#)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let url = start_server(&rt);
    let plain = reqwest::Client::new();
    let empty = ClientBuilder::new(plain.clone()).build();
    let with = ClientBuilder::new(plain.clone()).with(IdempotencyMiddleware::new()).build();
    let middleware = IdempotencyMiddleware::new();

    let mut group = c.benchmark_group("client_post_loopback");
    group.bench_function("reqwest", |b| {
        b.to_async(&rt).iter(|| async {
            let r = plain.post(&url).header("content-type", "application/json").body(BODY).send().await;
            black_box(r.expect("response").bytes().await.expect("body"));
        });
    });
    group.bench_function("reqwest_middleware_empty", |b| {
        b.to_async(&rt).iter(|| async {
            let r = empty.post(&url).header("content-type", "application/json").body(BODY).send().await;
            black_box(r.expect("response").bytes().await.expect("body"));
        });
    });
    group.bench_function("idempotency", |b| {
        b.to_async(&rt).iter(|| async {
            let r = with.post(&url).header("content-type", "application/json").body(BODY).send().await;
            black_box(r.expect("response").bytes().await.expect("body"));
        });
    });
    group.bench_function("idempotency_plain_send", |b| {
        b.to_async(&rt).iter(|| async {
            let request =
                plain.post(&url).header("content-type", "application/json").body(BODY).build().expect("request");
            let r = middleware.send(&plain, request).await;
            black_box(r.expect("response").bytes().await.expect("body"));
        });
    });
    group.finish();
}

fn start_server(rt: &Runtime) -> String {
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route("/payments", post(charge));
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/payments")
    })
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(6));
    targets = bench
}
criterion_main!(benches);
