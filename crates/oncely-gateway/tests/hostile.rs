//! The hostile-input report's findings that concern the request path, each as an attacker
//! or a crash would trigger it, against the spawned gateway: nested JSON, gzip bodies, one
//! principal holding many claims, and a takeover after `kill -9`.

mod support;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use support::*;

const CONFIG: &str = r#"
[defaults]
max_body = "1MiB"
lease = "1s"
max_in_progress_per_scope = 2
"#;

async fn post_raw(url: &str, path: &str, key: &str, headers: &[(&str, &str)], body: Vec<u8>) -> reqwest::Response {
    let mut request = client().post(format!("{url}{path}")).header("idempotency-key", key).body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("the gateway answers")
}

/// Finding 1: `[` × 20,000 with a JSON content type aborted the process (stack overflow
/// in the fingerprint), and every request in flight with it. Over HTTP/1.1 and h2c.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deeply_nested_json_is_served_and_the_gateway_lives_on() {
    let (addr, upstream) = start_upstream().await;
    let (mut gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &[]).await;
    let json = [("content-type", "application/json")];
    for (key, depth) in [("deep-arrays", 20_000), ("deeper-arrays", 500_000)] {
        let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes();
        let response = post_raw(&gw.url, "/payments", key, &json, body).await;
        assert_eq!(response.status(), 201, "{key}");
    }
    let objects = format!("{}1{}", r#"{"a":"#.repeat(100_000), "}".repeat(100_000)).into_bytes();
    let h2c = reqwest::Client::builder().http2_prior_knowledge().build().expect("h2c client");
    let response = h2c
        .post(format!("{}/payments", gw.url))
        .header("idempotency-key", "deep-objects")
        .header("content-type", "application/problem+json")
        .body(objects.clone())
        .send()
        .await
        .expect("h2c");
    assert_eq!(response.status(), 201);
    let retry =
        post_raw(&gw.url, "/payments", "deep-objects", &[("content-type", "application/problem+json")], objects).await;
    assert!(replayed(&retry), "the deep body's fingerprint is stable");

    let normal = post_raw(&gw.url, "/payments", "normal", &json, br#"{"amount":1}"#.to_vec()).await;
    assert_eq!(normal.status(), 201);
    assert!(gw.child.try_wait().expect("status").is_none(), "the gateway is still running");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 4);
}

fn gzip(data: &[u8], mtime: u32) -> Vec<u8> {
    let mut encoder = flate2::GzBuilder::new().mtime(mtime).write(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).expect("in memory");
    encoder.finish().expect("in memory")
}

/// Finding 8: a gzip body compressed again for the retry (another timestamp) got 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_retry_compressed_again_replays_and_a_zip_bomb_is_413() {
    let (addr, upstream) = start_upstream().await;
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &[]).await;
    let headers = [("content-type", "application/json"), ("content-encoding", "gzip")];
    let body = br#"{"amount":1999}"#;
    let first = post_raw(&gw.url, "/payments", "gz", &headers, gzip(body, 1)).await;
    assert_eq!(first.status(), 201);
    let retry = post_raw(&gw.url, "/payments", "gz", &headers, gzip(body, 99)).await;
    assert_eq!(retry.status(), 201);
    assert!(replayed(&retry));

    let bomb = gzip(&vec![b' '; 64 << 20], 0);
    assert!(bomb.len() < 1 << 20, "under max_body: {} bytes", bomb.len());
    let response = post_raw(&gw.url, "/payments", "bomb", &headers, bomb).await;
    assert_eq!(response.status(), 413);
    assert_eq!(problem_type(response).await, "urn:oncely:problem:body-too-large");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
}

/// One principal cannot hold more than `max_in_progress_per_scope` running operations;
/// another principal is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_principal_cannot_hold_more_than_its_share_of_claims() {
    let (addr, upstream) = start_upstream().await;
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &[]).await;
    let mallory = [("authorization", "Bearer mallory")];
    let mut held = Vec::new();
    for key in ["m1", "m2"] {
        let started = upstream.started.notified();
        let url = gw.url.clone();
        held.push(tokio::spawn(async move { post_raw(&url, "/slow", key, &mallory, Vec::new()).await.status() }));
        started.await;
    }
    let refused = post_raw(&gw.url, "/slow", "m3", &mallory, Vec::new()).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(problem_type(refused).await, "urn:oncely:problem:too-many-in-progress");
    let alice = post_raw(&gw.url, "/payments", "a1", &[("authorization", "Bearer alice")], Vec::new()).await;
    assert_eq!(alice.status(), 201);
    upstream.gate.notify_waiters();
    for task in held {
        assert_eq!(task.await.expect("request"), 201);
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 3, "m1, m2 and alice's; never m3");
}

/// Finding 9: after `kill -9`, the keys in flight are taken over once their lease lapses
/// and forwarded again. The upstream now hears that this request may repeat one it saw,
/// and a client cannot say so itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_after_kill_9_is_announced_to_the_upstream() {
    let (addr, upstream) = start_upstream().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("oncely.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let store = format!("sqlite://{}", dir.path().join("oncely.db").display());
    let upstream_url = format!("http://{addr}");

    let mut first_gw = spawn_gateway(&upstream_url, &store, &config, &[]).await;
    let started = upstream.started.notified();
    let url = first_gw.url.clone();
    let lost =
        tokio::spawn(
            async move { client().post(format!("{url}/slow-echo")).header("idempotency-key", "k").send().await },
        );
    started.await;
    first_gw.child.kill().await.expect("kill -9");
    assert!(lost.await.expect("task").is_err(), "the first attempt's client lost its connection");

    let second_gw = spawn_gateway(&upstream_url, &store, &config, &[]).await;
    // A forged announcement on a new key is removed.
    let forged = [("idempotency-takeover", "true")];
    let fresh = post_raw(&second_gw.url, "/echo", "fresh", &forged, Vec::new()).await;
    let seen: Value = fresh.json().await.expect("echo");
    assert!(seen.get("idempotency-takeover").is_none(), "{seen}");
    let unkeyed = client().post(format!("{}/echo", second_gw.url)).header("idempotency-takeover", "true").send();
    let seen: Value = unkeyed.await.expect("echo").json().await.expect("echo");
    assert!(seen.get("idempotency-takeover").is_none(), "removed from requests without a key too: {seen}");

    // Retry after the dead gateway's lease lapsed (lease 1 s).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let started = upstream.started.notified();
    let url = second_gw.url.clone();
    let retry =
        tokio::spawn(
            async move { client().post(format!("{url}/slow-echo")).header("idempotency-key", "k").send().await },
        );
    started.await;
    upstream.gate.notify_waiters();
    let retry = retry.await.expect("task").expect("the retry is answered");
    assert_eq!(retry.status(), 201);
    let seen: Value = retry.json().await.expect("echo");
    assert_eq!(seen["idempotency-takeover"], "true", "{seen}");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 2, "the lapsed claim was taken over and forwarded");
}
