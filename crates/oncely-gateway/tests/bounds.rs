//! Black-box tests of the store bounds set in the store URL: the spawned `oncely` binary
//! answers a new key in a full store with 503 and `Retry-After`, and still replays every
//! key it stored.

mod support;

use std::sync::atomic::Ordering;

use support::*;

/// Sends new keys until the gateway answers 503 (at most `limit`); the keys it stored.
async fn fill(gw: &Gateway, limit: usize) -> (Vec<String>, reqwest::Response) {
    let mut stored = Vec::new();
    for i in 0..limit {
        let key = format!("fill-{i}");
        let response = send_post(gw, "/payments", Some(&key), r#"{"amount":1}"#).await;
        if response.status() == 503 {
            return (stored, response);
        }
        assert_eq!(response.status(), 201, "key {key}");
        stored.push(key);
    }
    panic!("the store never filled up after {limit} new keys");
}

/// The 503 of a full store: problem+json, with `Retry-After`.
async fn assert_full(response: reqwest::Response) {
    assert_eq!(response.status(), 503);
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert!(retry_after.is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s > 0)), "Retry-After in seconds");
    assert_eq!(problem_type(response).await, "urn:oncely:problem:store-full");
}

/// Every stored key is replayed, without reaching the upstream.
async fn assert_replayed(gw: &Gateway, upstream: &Shared, keys: &[String]) {
    let calls = upstream.calls.load(Ordering::SeqCst);
    for key in keys {
        let response = send_post(gw, "/payments", Some(key), r#"{"amount":1}"#).await;
        assert_eq!(response.status(), 201, "key {key}");
        assert!(replayed(&response), "{key} is replayed, not run again");
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), calls, "no replay reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_memory_store_answers_503_to_a_new_key_and_replays_the_stored_ones() {
    let (addr, upstream) = start_upstream().await;
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://?max_entries=3", CONFIG, &[]).await;
    let (stored, refused) = fill(&gw, 10).await;
    assert_eq!(stored.len(), 3, "the 4th new key is refused");
    assert_full(refused).await;
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 3, "the refused request never reached the upstream");
    assert_replayed(&gw, &upstream, &stored).await;
    assert_full(send_post(&gw, "/payments", Some("yet-another"), r#"{"amount":1}"#).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_byte_bound_trips_before_the_entry_bound() {
    let (addr, upstream) = start_upstream().await;
    let store = "memory://?max_entries=1000&max_bytes=4KiB";
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), store, CONFIG, &[]).await;
    let (stored, refused) = fill(&gw, 50).await;
    assert!((1..10).contains(&stored.len()), "4 KiB holds a few records: {}", stored.len());
    assert_full(refused).await;
    assert_replayed(&gw, &upstream, &stored).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sqlite_store_answers_503_to_a_new_key_and_replays_the_stored_ones() {
    let (addr, upstream) = start_upstream().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = format!("sqlite://{}?max_records=3", dir.path().join("oncely.db").display());
    let (gw, _config_dir) = start_gateway(&format!("http://{addr}"), &store, CONFIG, &[]).await;
    let (stored, refused) = fill(&gw, 10).await;
    assert_eq!(stored.len(), 3);
    assert_full(refused).await;
    assert_replayed(&gw, &upstream, &stored).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_bound_in_the_store_url_stops_the_gateway_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("oncely.toml");
    std::fs::write(&config, CONFIG).expect("write config");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncely"))
        .args(["serve", "--upstream", "http://127.0.0.1:9", "--listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0", "--store", "memory://?max_bytes=0"])
        .arg("--config")
        .arg(&config)
        .output()
        .await
        .expect("run oncely");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_bytes"), "the error names the option: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_eviction_opted_into_a_full_memory_store_keeps_taking_new_keys() {
    let (addr, _upstream) = start_upstream().await;
    let store = "memory://?max_entries=3&evict_completed_when_full=true";
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), store, CONFIG, &[]).await;
    for i in 0..6 {
        let response = send_post(&gw, "/payments", Some(&format!("evicting-{i}")), r#"{"amount":1}"#).await;
        assert_eq!(response.status(), 201, "key {i}: room is made by evicting a completed record");
    }
}
