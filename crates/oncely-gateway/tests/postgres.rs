//! The gateway on PostgreSQL (`--store postgres://…`), black-box: real `oncely`
//! processes sharing one database on the test server the testkit starts.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use oncely_testkit::postgres::PostgresServer;
use support::*;

/// Two gateway instances on one database: 200 concurrent requests with one key, split
/// between them, make exactly one upstream call, and every answer is that call's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_one_database_execute_a_key_once() {
    let database = PostgresServer::shared().await.fresh_database().await;
    let (addr, upstream) = start_upstream().await;
    let upstream_url = format!("http://{addr}");
    let (a, _dir_a) = start_gateway(&upstream_url, &database, CONFIG, &[]).await;
    let (b, _dir_b) = start_gateway(&upstream_url, &database, CONFIG, &[]).await;

    const REQUESTS: usize = 200;
    let barrier = Arc::new(tokio::sync::Barrier::new(REQUESTS));
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let url = if i % 2 == 0 { a.url.clone() } else { b.url.clone() };
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                // Wait mode: a duplicate meeting the running request waits for its result.
                let response = post_to(&url, "/wait/pay", Some("one-key-two-gateways"), r#"{"amount":1999}"#).await;
                (response.status(), replayed(&response), response.text().await.expect("body"))
            })
        })
        .collect();
    let mut bodies = HashSet::new();
    let mut executed = 0;
    for task in tasks {
        let (status, was_replayed, body) = task.await.expect("task");
        assert_eq!(status, 201, "every request gets the one result: {body}");
        executed += usize::from(!was_replayed);
        bodies.insert(body);
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1, "200 requests on two gateways, one upstream call");
    assert_eq!(executed, 1, "one answer is the execution, 199 are replays");
    assert_eq!(bodies.len(), 1, "every answer carries the same body: {bodies:?}");

    // Reject mode across the gateways: duplicates of a running request get 409.
    let first = tokio::spawn({
        let url = a.url.clone();
        async move { post_to(&url, "/slow", Some("slow-key"), "{}").await.status() }
    });
    upstream.started.notified().await;
    let duplicate = post_to(&b.url, "/slow", Some("slow-key"), "{}").await;
    assert_eq!(duplicate.status(), 409, "the other gateway sees the running request");
    upstream.gate.notify_one();
    assert_eq!(first.await.expect("task"), 201);
    let retry = post_to(&b.url, "/slow", Some("slow-key"), "{}").await;
    assert_eq!(retry.status(), 201);
    assert!(replayed(&retry), "the other gateway replays the result");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 2);
}

/// The database goes away: the gateway answers 503 (fail-closed) and forwards nothing;
/// when it is back, the same gateway serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_is_503_and_the_gateway_recovers() {
    let server = PostgresServer::start().await;
    let database = format!("{}?acquire_timeout=1s", server.fresh_database().await);
    let (addr, upstream) = start_upstream().await;
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), &database, CONFIG, &[]).await;
    assert_eq!(send_post(&gw, "/payments", Some("before"), "{}").await.status(), 201);

    server.stop();
    let r = send_post(&gw, "/payments", Some("during"), "{}").await;
    assert_eq!(r.status(), 503);
    assert_eq!(problem_type(r).await, "urn:oncely:problem:store-unavailable");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1, "fail-closed: nothing was forwarded");

    server.start_again().await;
    let r = send_post(&gw, "/payments", Some("during"), "{}").await;
    assert_eq!(r.status(), 201, "the database answers again; the key was never stored");
    let r = send_post(&gw, "/payments", Some("before"), "{}").await;
    assert!(replayed(&r), "what was completed before the outage is still replayed");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 2);
}

/// Bad PostgreSQL store URLs are refused at start with a usage error.
#[tokio::test]
async fn bad_postgres_store_urls_are_refused_at_start() {
    for store in ["postgres://postgres@127.0.0.1:1/x?table=no-dashes", "postgres://postgres@127.0.0.1:1/x?pool=0"] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncely"))
            .args(["stats", "--store", store])
            .output()
            .await
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{store}: {out:?}");
    }
}
