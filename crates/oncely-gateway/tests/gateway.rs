//! Black-box tests: the real `oncely` binary, spawned, in front of a counting upstream,
//! over real sockets on loopback.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::mpsc;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_row_of_the_http_table_over_real_sockets() {
    let (addr, upstream) = start_upstream().await;
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &[]).await;
    let calls = || upstream.calls.load(Ordering::SeqCst);

    // Method not covered: passed through untouched, every time.
    for _ in 0..2 {
        let r =
            client().get(format!("{}/payments", gw.url)).header("idempotency-key", "k-get").send().await.expect("get");
        assert_eq!(r.status(), 201);
        assert!(!replayed(&r));
    }
    assert_eq!(calls(), 2);

    // No key on an optional route: passed through.
    for _ in 0..2 {
        assert_eq!(send_post(&gw, "/orders", None, "{}").await.status(), 201);
    }
    assert_eq!(calls(), 4);

    // No key on a required route: 400.
    let r = send_post(&gw, "/payments", None, "{}").await;
    assert_eq!(r.status(), 400);
    assert_eq!(problem_type(r).await, "urn:oncely:problem:missing-key");

    // Malformed keys: 400.
    for bad in ["", "\"unterminated", "a b"] {
        let r = send_post(&gw, "/payments", Some(bad), "{}").await;
        assert_eq!(r.status(), 400, "{bad:?}");
        assert_eq!(problem_type(r).await, "urn:oncely:problem:invalid-key");
    }

    // Body over the limit: 413, nothing stored.
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(2048));
    let r = send_post(&gw, "/payments", Some("k-big"), &big).await;
    assert_eq!(r.status(), 413);
    assert_eq!(problem_type(r).await, "urn:oncely:problem:body-too-large");
    assert_eq!(calls(), 4, "nothing reached the upstream");

    // New key, then its retries: replayed byte for byte, never reaching the upstream.
    let first = send_post(&gw, "/payments", Some("k-1"), r#"{"amount":1999,"currency":"eur"}"#).await;
    assert_eq!(first.status(), 201);
    assert!(!replayed(&first));
    assert_eq!(first.headers()["set-cookie"], "s=1", "the first response is passed on as produced");
    let first_body = first.bytes().await.expect("body");
    for _ in 0..3 {
        let retry = send_post(&gw, "/payments", Some("\"k-1\""), r#"{ "currency": "eur", "amount": 1999 }"#).await;
        assert_eq!(retry.status(), 201);
        assert!(replayed(&retry));
        assert_eq!(retry.headers()["x-upstream"], "yes");
        assert!(retry.headers().get("set-cookie").is_none());
        assert_eq!(retry.bytes().await.expect("body"), first_body);
    }
    assert_eq!(calls(), 5);

    // Same key, another request: 422.
    let r = send_post(&gw, "/payments", Some("k-1"), r#"{"amount":5000,"currency":"eur"}"#).await;
    assert_eq!(r.status(), 422);
    assert_eq!(problem_type(r).await, "urn:oncely:problem:key-reused");

    // A duplicate while the first runs, reject mode: 409 with Retry-After.
    let running = tokio::spawn({
        let (url, key) = (gw.url.clone(), "k-slow");
        async move { post_to(&url, "/slow", Some(key), "").await }
    });
    upstream.started.notified().await;
    let r = send_post(&gw, "/slow", Some("k-slow"), "").await;
    assert_eq!(r.status(), 409);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(problem_type(r).await, "urn:oncely:problem:request-in-progress");
    upstream.gate.notify_waiters();
    assert_eq!(running.await.expect("task").status(), 201);

    // Wait mode: duplicates wait and get the same answer.
    let first = tokio::spawn({
        let url = gw.url.clone();
        async move { post_to(&url, "/wait/slow", Some("k-wait"), "").await }
    });
    upstream.started.notified().await;
    let waiters: Vec<_> = (0..5)
        .map(|_| {
            let url = gw.url.clone();
            tokio::spawn(async move { post_to(&url, "/wait/slow", Some("k-wait"), "").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await; // let the waiters reach the gateway; correctness does not depend on it
    upstream.gate.notify_waiters();
    let expected = first.await.expect("task").text().await.expect("body");
    for waiter in waiters {
        let r = waiter.await.expect("task");
        assert_eq!(r.status(), 201);
        assert_eq!(r.text().await.expect("body"), expected);
    }
    assert_eq!(calls(), 7, "one call per slow key");

    // 5xx releases the key (the retry runs again); 4xx is stored.
    for _ in 0..2 {
        assert_eq!(send_post(&gw, "/status/503", Some("k-503"), "").await.status(), 503);
        assert_eq!(send_post(&gw, "/status/404", Some("k-404"), "").await.status(), 404);
    }
    assert_eq!(calls(), 7 + 3);
}

/// `n` clients, each on a connection of its own, released together, POST `/wait/pay`
/// (wait mode) with `key`: their statuses and bodies.
async fn duplicates(gw: &Gateway, key: &'static str, n: usize) -> Vec<(reqwest::StatusCode, String)> {
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (url, barrier) = (gw.url.clone(), barrier.clone());
            tokio::spawn(async move {
                let client = client();
                barrier.wait().await;
                let r = client.post(format!("{url}/wait/pay")).header("idempotency-key", key).body("{}").send().await;
                let r = r.expect("response");
                (r.status(), r.text().await.expect("body"))
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_duplicates_make_one_upstream_call() {
    let (addr, upstream) = start_upstream().await;
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &[]).await;
    let answers = duplicates(&gw, "one-key", 50).await;
    assert!(answers.iter().all(|(status, _)| *status == 201), "wait mode: every duplicate gets the one answer");
    assert!(answers.windows(2).all(|w| w[0].1 == w[1].1));
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1, "fifty duplicates, one upstream call");

    // Reject mode: duplicates of the running request get 409, still one call.
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let url = gw.url.clone();
            tokio::spawn(async move {
                client().post(format!("{url}/payments")).header("idempotency-key", "pay-once").body("{}").send().await
            })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        let r = task.await.expect("task").expect("response");
        if r.status() == 201 {
            created += 1;
        } else {
            assert_eq!(r.status(), 409, "reject mode: a duplicate of a running request");
        }
    }
    assert!(created >= 1);
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 2, "fifty duplicates, one more upstream call");
}

/// Connections land on different worker threads (`--workers 4`, more than the cores of
/// a CI machine), on one (`1`), or on the shared runtime (`0`): the claim is the only
/// arbiter, and sixty duplicates on sixty connections make one upstream call each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_spread_over_worker_threads_make_one_upstream_call() {
    let (addr, upstream) = start_upstream().await;
    for (round, workers) in ["4", "1", "0"].into_iter().enumerate() {
        let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &["--workers", workers]).await;
        let answers = duplicates(&gw, "spread-key", 60).await;
        assert!(
            answers.iter().all(|(status, _)| *status == 201),
            "--workers {workers}: every duplicate gets the one answer"
        );
        assert!(answers.windows(2).all(|w| w[0].1 == w[1].1), "--workers {workers}: one answer");
        assert_eq!(upstream.calls.load(Ordering::SeqCst), round + 1, "--workers {workers}: one upstream call");
    }
}

/// An operation whose client hung up runs on the worker thread that served the
/// connection; SIGTERM must let it store its result before the workers stop. On SQLite
/// the result outlives the process: the retry after a restart is a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_an_abandoned_operation_on_a_worker_store_its_result() {
    let (addr, upstream) = start_upstream().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("oncely.toml");
    std::fs::write(&config, CONFIG).expect("write config");
    let store = format!("sqlite://{}", dir.path().join("oncely.db").display());
    let mut gw = spawn_gateway(&format!("http://{addr}"), &store, &config, &["--workers", "2"]).await;
    let hung_up = tokio::spawn({
        let url = gw.url.clone();
        async move { post_to(&url, "/wait/slow", Some("k-abandoned"), "").await }
    });
    upstream.started.notified().await;
    hung_up.abort();
    let _ = hung_up.await;
    let pid = gw.child.id().expect("running");
    assert!(std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill").success());
    // The stop has begun once the listener refuses connections; the operation is still
    // waiting on the upstream.
    let proxy = proxy_addr(&gw);
    tokio::time::timeout(Duration::from_secs(20), async {
        while tokio::net::TcpStream::connect(&proxy).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the listener closes on SIGTERM");
    upstream.gate.notify_waiters();
    let exit = tokio::time::timeout(Duration::from_secs(20), gw.child.wait()).await.expect("exits").expect("status");
    assert!(exit.success(), "a graceful stop exits 0: {exit:?}");

    let gw = spawn_gateway(&format!("http://{addr}"), &store, &config, &[]).await;
    let retry = send_post(&gw, "/wait/slow", Some("k-abandoned"), "").await;
    assert_eq!(retry.status(), 201);
    assert!(replayed(&retry), "the abandoned operation stored its result during the stop");
    assert_eq!(retry.text().await.expect("body"), "slow call 1");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_principals_with_one_key_are_isolated() {
    let (addr, upstream) = start_upstream().await;
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &[]).await;
    let as_user = |token: &'static str| {
        client()
            .post(format!("{}/payments", gw.url))
            .header("idempotency-key", "shared")
            .header("authorization", token)
            .body("{}")
    };
    let alice = as_user("Bearer alice").send().await.expect("alice").text().await.expect("body");
    let bob = as_user("Bearer bob").send().await.expect("bob").text().await.expect("body");
    assert_ne!(alice, bob);
    assert!(alice.contains("alice") && bob.contains("bob"));
    let again = as_user("Bearer alice").send().await.expect("alice again");
    assert!(replayed(&again));
    assert_eq!(again.text().await.expect("body"), alice);
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_disconnects_mid_request_gets_its_replay_on_retry() {
    let (addr, upstream) = start_upstream().await;
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &[]).await;
    let hung_up = tokio::spawn({
        let url = gw.url.clone();
        async move { post_to(&url, "/wait/slow", Some("k-gone"), "").await }
    });
    upstream.started.notified().await;
    hung_up.abort(); // drops the connection while the upstream works
    let _ = hung_up.await;
    upstream.gate.notify_waiters();
    let retry = send_post(&gw, "/wait/slow", Some("k-gone"), "").await;
    assert_eq!(retry.status(), 201);
    assert!(replayed(&retry), "the abandoned request's response was stored");
    assert_eq!(retry.text().await.expect("body"), "slow call 1");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_upstream_is_502_and_releases_the_key() {
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &[]).await;
    for _ in 0..2 {
        let r = send_post(&gw, "/payments", Some("k"), "{}").await;
        assert_eq!(r.status(), 502, "released, so the retry is tried again rather than 409");
        assert_eq!(problem_type(r).await, "urn:oncely:problem:upstream-unreachable");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_timeout_is_504_then_the_call_goes_on_and_without_an_answer_the_key_is_held() {
    let (addr, upstream) = start_upstream().await;
    let flags = ["--upstream-timeout", "300ms", "--completion-limit", "1s"];
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &flags).await;
    let r = send_post(&gw, "/hang", Some("k-hang"), "").await;
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["stripe-should-retry"], "true", "the retry will get the answer, if one comes");
    assert_eq!(problem_type(r).await, "urn:oncely:problem:upstream-timeout");
    // The retry waits (the default) while the call goes on; at the completion limit no
    // answer has come, and the key is held as an unknown outcome.
    let retry = send_post(&gw, "/hang", Some("k-hang"), "").await;
    assert_eq!(retry.status(), 502);
    assert_eq!(retry.headers()["stripe-should-retry"], "false");
    assert_eq!(problem_type(retry).await, "urn:oncely:problem:outcome-unknown");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarding_headers_are_set_and_hop_by_hop_ones_dropped() {
    let (addr, _upstream) = start_upstream().await;
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &[]).await;
    let r = client()
        .post(format!("{}/echo", gw.url))
        .header("x-forwarded-for", "203.0.113.9")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "hop")
        .send()
        .await
        .expect("echo");
    let seen: Value = r.json().await.expect("json");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert!(seen["forwarded"].as_str().is_some_and(|f| f.contains("for=127.0.0.1")));
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert!(seen["x-forwarded-host"].as_str().is_some_and(|h| h.starts_with("127.0.0.1:")));
    assert!(seen.get("x-private").is_none(), "fields named by Connection are hop-by-hop");
    assert_eq!(seen["host"], addr.to_string(), "the upstream is sent its own authority as Host");
    // A keyed request reaches the upstream through the layer's own copy of the proxy,
    // made for this connection: it is forwarded as from the same client.
    let keyed = client()
        .post(format!("{}/echo", gw.url))
        .header("idempotency-key", "k-forwarded")
        .send()
        .await
        .expect("keyed echo");
    assert_eq!(keyed.status(), 200);
    let seen: Value = keyed.json().await.expect("json");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert!(seen["forwarded"].as_str().is_some_and(|f| f.contains("for=127.0.0.1")));
    assert_eq!(seen["host"], addr.to_string());
    assert!(seen["x-forwarded-host"].as_str().is_some_and(|h| h.starts_with("127.0.0.1:")));
}

/// The proxy hands its pool a label in place of an `http://` upstream's address (its
/// `POOL_LABEL`); the upstream must still be sent its own `Host` and the request target
/// in origin form, under the upstream URL's base path, with and without a key, and when
/// the client names `Host` as a hop-by-hop field.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_upstream_is_sent_its_own_host_and_the_target_in_origin_form() {
    let (addr, _upstream) = start_upstream().await;
    for (upstream, expected) in
        [(format!("http://{addr}"), "/target?x=1"), (format!("http://{addr}/base/"), "/base/target?x=1")]
    {
        let (gw, _dir) = start_gateway(&upstream, "memory://", CONFIG, &[]).await;
        // A client may name `Host` in `Connection`: the hop-by-hop removal must not leave
        // the request without the upstream's `Host`.
        for (key, connection) in
            [(None, None), (Some("k-target"), None), (None, Some("host")), (Some("k-conn"), Some("Host"))]
        {
            let mut request = client().post(format!("{}/target?x=1", gw.url));
            if let Some(key) = key {
                request = request.header("idempotency-key", key);
            }
            if let Some(connection) = connection {
                request = request.header("connection", connection);
            }
            let seen: Value = request.send().await.expect("target").json().await.expect("json");
            assert_eq!(seen["target"], expected, "{upstream}, key {key:?}, connection {connection:?}");
            assert_eq!(seen["host"], addr.to_string(), "{upstream}, key {key:?}, connection {connection:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2c_clients_are_served() {
    let (addr, upstream) = start_upstream().await;
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &[]).await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().expect("client");
    for _ in 0..2 {
        let r = h2
            .post(format!("{}/payments", gw.url))
            .header("idempotency-key", "k-h2")
            .body("{}")
            .send()
            .await
            .expect("h2c");
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 201);
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
}

/// A HEAD of what the gateway answers itself (the published policy, a problem) carries
/// no content, over HTTP/2 as over HTTP/1.1: an HTTP/2 client treats DATA on a HEAD
/// response as a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn head_answers_carry_no_body_over_h2_and_h1() {
    let (addr, _upstream) = start_upstream().await;
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &[]).await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().expect("client");
    for client in [&h2, &client()] {
        let get = client.get(format!("{}/.well-known/idempotency", gw.url)).send().await.expect("GET");
        let length = get.bytes().await.expect("body").len();
        assert!(length > 0);
        let head = client.head(format!("{}/.well-known/idempotency", gw.url)).send().await.expect("HEAD");
        assert_eq!(head.status(), 200);
        assert_eq!(head.headers().get("content-length").and_then(|v| v.to_str().ok()), Some(&*length.to_string()));
        assert!(head.bytes().await.expect("HEAD body").is_empty());
        // A problem the gateway writes: a bad Host.
        let problem = client.head(format!("{}/payments", gw.url)).header("host", "a,b").send().await;
        let problem = problem.expect("HEAD with a bad host");
        assert_eq!(problem.status(), 400);
        assert!(problem.bytes().await.expect("problem body").is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_a_running_operation_finish_and_store_its_result() {
    let (addr, upstream) = start_upstream().await;
    let (mut gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &[]).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn({
        let url = gw.url.clone();
        async move {
            let r = post_to(&url, "/wait/slow", Some("k-term"), "").await;
            let _ = tx.send(r.status());
        }
    });
    upstream.started.notified().await;
    let pid = gw.child.id().expect("running");
    let killed = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill");
    assert!(killed.success());
    upstream.gate.notify_waiters();
    let status = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("answer").expect("sent");
    assert_eq!(status.as_u16(), 201, "the running request finished");
    let exit = tokio::time::timeout(Duration::from_secs(20), gw.child.wait()).await.expect("exits").expect("status");
    assert!(exit.success(), "a graceful stop exits 0: {exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_api_shows_health_metrics_and_keys_behind_a_token() {
    let (addr, upstream) = start_upstream().await;
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &[]).await;
    let admin = |path: &str| client().get(format!("{}{path}", gw.admin));
    assert_eq!(admin("/healthz").send().await.expect("healthz").status(), 200);
    assert_eq!(admin("/readyz").send().await.expect("readyz").status(), 200);

    send_post(&gw, "/payments", Some("k-admin"), "{}").await;
    send_post(&gw, "/payments", Some("k-admin"), "{}").await;
    let metrics = admin("/metrics").send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains(r#"oncely_outcomes_total{outcome="replayed"} 1"#), "{metrics}");
    assert!(metrics.contains("oncely_store_seconds_bucket"), "store latency histogram");
    assert!(metrics.contains("oncely_operations_in_flight"));

    assert_eq!(admin("/keys").send().await.expect("keys").status(), 401);
    // The replay's hit is counted in the process and flushed within a second (a replay
    // writes nothing to the store): the listing shows it once flushed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let keys = loop {
        let keys: Vec<Value> =
            admin("/keys").bearer_auth("secret-token").send().await.expect("keys").json().await.expect("json");
        if keys.first().is_some_and(|k| k["hits"] == 1) || tokio::time::Instant::now() > deadline {
            break keys;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["key"], "k-admin");
    assert_eq!(keys[0]["hits"], 1, "the hit is flushed within the flush interval");
    let hash = keys[0]["hash"].as_str().expect("hash").to_string();
    let one: Value = admin(&format!("/keys/{hash}"))
        .bearer_auth("secret-token")
        .send()
        .await
        .expect("key")
        .json()
        .await
        .expect("json");
    assert_eq!(one["state"], "completed");
    let deleted =
        client().delete(format!("{}/keys/{hash}", gw.admin)).bearer_auth("secret-token").send().await.expect("delete");
    assert_eq!(deleted.status(), 204);
    assert!(!replayed(&send_post(&gw, "/payments", Some("k-admin"), "{}").await), "a deleted key runs again");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 2);
    assert_eq!(admin("/keys/zz").bearer_auth("secret-token").send().await.expect("bad").status(), 400);
}

#[tokio::test]
async fn check_config_names_the_bad_key_and_accepts_good_files() {
    let dir = tempfile::tempdir().expect("dir");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, CONFIG).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_oncely")).arg("check-config").arg(&good).output().await.expect("run");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (2 routes)"));

    for (text, key) in [
        ("[defaults]\nttl = \"forever\"", "defaults.ttl"),
        ("[[routes]]\npath = \"/a\"\nreqired = true", "reqired"),
        ("[server]\nidle_timeout = \"a while\"", "server.idle_timeout"),
        ("[server]\nmax_connections = 0", "server.max_connections"),
        ("[[routes]]\npath = \"/a\"\nmatch_suffixes = [\"json\"]", "routes[0].match_suffixes"),
    ] {
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, text).expect("write");
        let out = Command::new(env!("CARGO_BIN_EXE_oncely")).arg("check-config").arg(&bad).output().await.expect("run");
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{stderr}");
    }

    // `serve` refuses the same file at start, before binding anything.
    let bad = dir.path().join("bad.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_oncely"))
        .args(["serve", "--upstream", "http://127.0.0.1:9", "--store", "memory://", "--config"])
        .arg(&bad)
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_between_first_request_and_retry_still_replays_on_sqlite() {
    let (addr, upstream) = start_upstream().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("oncely.toml");
    std::fs::write(&config, CONFIG).expect("write config");
    let store = format!("sqlite://{}", dir.path().join("oncely.db").display());

    let mut first_gw = spawn_gateway(&format!("http://{addr}"), &store, &config, &[]).await;
    let first = send_post(&first_gw, "/payments", Some("k-durable"), r#"{"amount":1}"#).await;
    assert_eq!(first.status(), 201);
    let first_body = first.bytes().await.expect("body");
    // The harshest restart: SIGKILL, right after the answer was received.
    first_gw.child.kill().await.expect("kill");

    let second_gw = spawn_gateway(&format!("http://{addr}"), &store, &config, &[]).await;
    let retry = send_post(&second_gw, "/payments", Some("k-durable"), r#"{"amount":1}"#).await;
    assert_eq!(retry.status(), 201);
    assert!(replayed(&retry), "the completion survived the kill");
    assert_eq!(retry.bytes().await.expect("body"), first_body);
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
    // A graceful stop writes the replay's hit, counted in the process, to the store.
    let mut second_gw = second_gw;
    let pid = second_gw.child.id().expect("running");
    assert!(std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill").success());
    let exit =
        tokio::time::timeout(Duration::from_secs(20), second_gw.child.wait()).await.expect("exits").expect("status");
    assert!(exit.success(), "a graceful stop exits 0: {exit:?}");

    // The command line reads the same file.
    let oncely = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_oncely"));
        command.args(args).args(["--store", &store]);
        command
    };
    let stats = oncely(&["stats"]).output().await.expect("stats");
    assert!(stats.status.success(), "{stats:?}");
    assert!(String::from_utf8_lossy(&stats.stdout).contains("completed: 1"));
    let list = oncely(&["keys", "list"]).output().await.expect("list");
    let records: Vec<Value> = serde_json::from_slice(&list.stdout).expect("JSON list");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["key"], "k-durable");
    assert_eq!(records[0]["hits"], 1);
    let hash = records[0]["hash"].as_str().expect("hash");
    let shown = oncely(&["keys", "get", hash]).output().await.expect("get");
    assert!(String::from_utf8_lossy(&shown.stdout).contains("\"state\": \"completed\""));
    assert!(oncely(&["keys", "delete", hash]).output().await.expect("delete").status.success());
    let gone = oncely(&["keys", "get", hash]).output().await.expect("get");
    assert_eq!(gone.status.code(), Some(1));
    let bad = oncely(&["keys", "get", "not-a-hash"]).output().await.expect("get");
    assert_eq!(bad.status.code(), Some(2));
}

/// On SQLite the replay cache is on by default, and a delete through another process
/// (`oncely keys delete` on the same file) is seen by the next request after it
/// returned, not a time-to-live later: the key runs again at once, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_sqlite_replays_are_cached_and_a_delete_by_another_process_is_seen_at_once() {
    let (addr, upstream) = start_upstream().await;
    let dir = tempfile::tempdir().expect("dir");
    let store = format!("sqlite://{}", dir.path().join("oncely.db").display());
    // A time-to-live far longer than the test: only the count of deletes can end an entry.
    let (gw, _config_dir) =
        start_gateway(&format!("http://{addr}"), &store, CONFIG, &["--replay-cache-ttl", "1h"]).await;
    let cache_hits = || async {
        let metrics = client().get(format!("{}/metrics", gw.admin)).send().await.expect("metrics");
        let text = metrics.text().await.expect("text");
        text.lines()
            .find_map(|line| line.strip_prefix("oncely_replay_cache_hits_total "))
            .map_or(0, |n| n.trim().parse::<u64>().expect("a count"))
    };
    let calls = || upstream.calls.load(Ordering::SeqCst);

    for round in 1..=3 {
        // Executed, replayed from the file (which fills the cache), replayed from the cache.
        let first = send_post(&gw, "/payments", Some("k-cached"), "{}").await;
        assert_eq!(first.status(), 201);
        assert!(!replayed(&first), "round {round}: runs");
        let hits = cache_hits().await;
        for _ in 0..3 {
            assert!(replayed(&send_post(&gw, "/payments", Some("k-cached"), "{}").await));
        }
        assert_eq!(cache_hits().await, hits + 2, "round {round}: the second and third replays came from memory");
        assert_eq!(calls(), round);

        let list = Command::new(env!("CARGO_BIN_EXE_oncely"))
            .args(["keys", "list", "--store", &store])
            .output()
            .await
            .expect("list");
        let records: Vec<Value> = serde_json::from_slice(&list.stdout).expect("JSON list");
        let hash = records[0]["hash"].as_str().expect("hash").to_string();
        let deleted = Command::new(env!("CARGO_BIN_EXE_oncely"))
            .args(["keys", "delete", &hash, "--store", &store])
            .output()
            .await
            .expect("delete");
        assert!(deleted.status.success(), "{deleted:?}");
        assert!(deleted.stderr.is_empty(), "no note about the cache: it sees the delete ({deleted:?})");
        // The delete has returned: the cached copy answers nothing, the key runs again.
    }
    let last = send_post(&gw, "/payments", Some("k-cached"), "{}").await;
    assert!(!replayed(&last), "deleted by another process: runs again at once");
    assert_eq!(calls(), 4, "once per delete, never twice");
}

/// A good URL whose server is down is a runtime failure (exit 1: try again later), not
/// a usage error (exit 2: fix the command), and says which store it could not reach.
#[tokio::test]
async fn a_store_that_cannot_be_reached_exits_1_not_2() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    for store in [
        format!("redis://127.0.0.1:{closed}?connect_timeout=500ms"),
        format!("postgres://app@127.0.0.1:{closed}/app?acquire_timeout=500ms"),
    ] {
        let out =
            Command::new(env!("CARGO_BIN_EXE_oncely")).args(["stats", "--store", &store]).output().await.expect("run");
        assert_eq!(out.status.code(), Some(1), "{store}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("127.0.0.1:{closed}")), "{out:?}");
    }
}

#[tokio::test]
async fn unknown_store_urls_are_refused_at_start() {
    for store in ["mysql://x", "sqlite://", "sqlite:///tmp/x.db?durability=sometimes"] {
        let out =
            Command::new(env!("CARGO_BIN_EXE_oncely")).args(["stats", "--store", store]).output().await.expect("run");
        assert_eq!(out.status.code(), Some(2), "{store}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("sqlite")
                || String::from_utf8_lossy(&out.stderr).contains("store")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_cannot_answer_is_503_fail_closed() {
    let (addr, upstream) = start_upstream().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("oncely.toml");
    std::fs::write(&config, CONFIG).expect("write config");
    let db = dir.path().join("oncely.db");
    let gw = spawn_gateway(&format!("http://{addr}"), &format!("sqlite://{}", db.display()), &config, &[]).await;

    // Another process holds SQLite's write lock: the gateway's store cannot write, and
    // answers Unavailable once its busy timeout (5 s) passes.
    let locker = rusqlite::Connection::open(&db).expect("open");
    locker.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    let r = send_post(&gw, "/payments", Some("k-503"), "{}").await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(problem_type(r).await, "urn:oncely:problem:store-unavailable");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 0, "fail-closed: nothing was forwarded");

    locker.execute_batch("COMMIT").expect("unlock");
    drop(locker);
    let r = send_post(&gw, "/payments", Some("k-503"), "{}").await;
    assert_eq!(r.status(), 201, "the store answers again, and the key was never stored");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_body_that_stalls_is_cut_off_and_cannot_block_shutdown() {
    let (addr, upstream) = start_upstream().await;
    let flags = ["--upstream-timeout", "500ms", "--completion-limit", "1s"];
    let (mut gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &flags).await;
    let r = send_post(&gw, "/stall", Some("k-stall"), "").await;
    assert_eq!(r.status(), 504, "no whole response by the upstream timeout");
    let retry = send_post(&gw, "/stall", Some("k-stall"), "").await;
    assert_eq!(retry.status(), 502, "the body stalled past the completion limit: outcome unknown, held");
    assert_eq!(problem_type(retry).await, "urn:oncely:problem:outcome-unknown");

    // The gateway still serves other requests meanwhile.
    let other = client().get(format!("{}/payments", gw.url)).send().await.expect("answer");
    assert_eq!(other.status(), 201);

    let pid = gw.child.id().expect("running");
    std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill");
    let exit =
        tokio::time::timeout(Duration::from_secs(20), gw.child.wait()).await.expect("exits promptly").expect("status");
    assert!(exit.success());
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spellings_of_a_path_cannot_slip_past_its_route() {
    let (addr, upstream) = start_upstream().await;
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &[]).await;
    // (Dot segments are resolved by the client's URL parser before sending; the routing
    // unit test covers them.)
    for path in ["//payments", "/%70ayments", "/%70ay%6Dents/", "///payments//x"] {
        let r = send_post(&gw, path, None, "{}").await;
        assert_eq!(r.status(), 400, "{path}: the /payments route requires a key");
        assert_eq!(problem_type(r).await, "urn:oncely:problem:missing-key");
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 0);
}

/// Connects to the gateway from `source` (any 127.0.0.0/8 address is local on Linux), so
/// that one test can be several clients.
async fn connect_from(gw: &Gateway, source: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(format!("{source}:0").parse().expect("source")).expect("bind source");
    socket.connect(proxy_addr(gw).parse().expect("gateway addr")).await.expect("connect")
}

const GET_PAYMENTS: &str = "GET /payments HTTP/1.1\r\nhost: gw\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_and_slow_clients_are_closed_by_the_limits_while_others_are_served() {
    use tokio::io::AsyncWriteExt;
    let (addr, upstream) = start_upstream().await;
    // Set by variables (flags and `[server]` work alike; the check-config test covers them).
    let limits =
        [("ONCELY_HEADER_READ_TIMEOUT", "1s"), ("ONCELY_IDLE_TIMEOUT", "1s"), ("ONCELY_BODY_READ_TIMEOUT", "1s")];
    let (gw, _dir) = start_gateway_with_env(&format!("http://{addr}"), "memory://", CONFIG, &[], &limits).await;
    let connect = || tokio::net::TcpStream::connect(proxy_addr(&gw));
    let started = std::time::Instant::now();

    // Connects and says nothing.
    let mut silent = connect().await.expect("connect");
    // An HTTP/2 client that sends the preface and its settings, and no request.
    let mut h2 = connect().await.expect("connect");
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.expect("preface");
    // Slow loris: a head trickled one field every 200 ms, never finished.
    let (mut loris, mut loris_out) = connect().await.expect("connect").into_split();
    loris_out.write_all(b"POST /orders HTTP/1.1\r\nhost: gw\r\n").await.expect("head");
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if loris_out.write_all(b"x-slow: 1\r\n").await.is_err() {
                return;
            }
        }
    });
    // Keep-alive: one request answered, then nothing.
    let mut kept = connect().await.expect("connect");
    let answer = exchange(&mut kept, GET_PAYMENTS).await.expect("answered");
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    // HTTP/2: one request answered, then nothing; the connection's driver ends when the
    // gateway closes it.
    let (mut sender, h2_idle) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(connect().await.expect("connect")),
    )
    .await
    .expect("h2 handshake");
    let h2_idle = tokio::spawn(h2_idle);
    let request = http::Request::get(format!("{}/payments", gw.url))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    assert_eq!(sender.send_request(request).await.expect("h2 answer").status(), 201);
    // A keyed request whose body stops after 10 of its 100 bytes.
    let mut stalled = connect().await.expect("connect");
    stalled
        .write_all(
            b"POST /payments HTTP/1.1\r\nhost: gw\r\nidempotency-key: k-stalled\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"amount\":",
        )
        .await
        .expect("send");

    // Meanwhile another client is served.
    assert_eq!(send_post(&gw, "/orders", None, "{}").await.status(), 201);

    let limit = Duration::from_secs(10);
    let (data, closed) = read_until_closed(&mut silent, limit).await;
    assert!(closed && data.is_empty(), "a silent connection is closed by header_read_timeout");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed by the limit, not at once");
    assert!(read_until_closed(&mut h2, limit).await.1, "an HTTP/2 connection with no request is closed");
    assert!(read_until_closed(&mut loris, limit).await.1, "a trickled head is closed by header_read_timeout");
    assert!(read_until_closed(&mut kept, limit).await.1, "an idle keep-alive connection is closed by idle_timeout");
    let h2_closed = tokio::time::timeout(limit, h2_idle).await;
    assert!(h2_closed.is_ok(), "an idle HTTP/2 connection is closed by idle_timeout");
    let (data, closed) = read_until_closed(&mut stalled, limit).await;
    let text = String::from_utf8_lossy(&data);
    assert!(closed, "a stalled body ends its connection: {text}");
    assert!(text.starts_with("HTTP/1.1 400") && text.contains("body-unreadable"), "{text}");
    trickle.abort();

    // The gateway still serves, and nothing slow reached the upstream.
    assert_eq!(send_post(&gw, "/orders", None, "{}").await.status(), 201);
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 4, "two GET /payments and two POST /orders");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_does_not_read_its_response_is_closed_by_idle_timeout() {
    use tokio::io::AsyncWriteExt;
    let (addr, _upstream) = start_upstream().await;
    let limits = [("ONCELY_IDLE_TIMEOUT", "1s")];
    let (gw, _dir) = start_gateway_with_env(&format!("http://{addr}"), "memory://", CONFIG, &[], &limits).await;
    let mut reader = tokio::net::TcpStream::connect(proxy_addr(&gw)).await.expect("connect");
    reader.write_all(b"GET /big HTTP/1.1\r\nhost: gw\r\n\r\n").await.expect("send");
    // Not reading is what this client does: the gateway's writes stall meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (data, closed) = read_until_closed(&mut reader, Duration::from_secs(20)).await;
    assert!(closed);
    assert!(data.starts_with(b"HTTP/1.1 200"));
    assert!(data.len() < BIG, "the connection was closed before the whole response was written");
    // Others are served.
    assert_eq!(send_post(&gw, "/orders", None, "{}").await.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_the_connection_caps_new_connections_are_closed_while_existing_clients_work() {
    let (addr, upstream) = start_upstream().await;
    let caps = [("ONCELY_MAX_CONNECTIONS", "3"), ("ONCELY_MAX_CONNECTIONS_PER_CLIENT", "2")];
    let (gw, _dir) = start_gateway_with_env(&format!("http://{addr}"), "memory://", CONFIG, &[], &caps).await;
    let served = |answer: Option<String>| answer.is_some_and(|a| a.starts_with("HTTP/1.1 201"));

    // Client A holds two connections, one of them working, one idle.
    let mut working = connect_from(&gw, "127.0.0.1").await;
    assert!(served(exchange(&mut working, GET_PAYMENTS).await));
    let _idle = connect_from(&gw, "127.0.0.1").await;
    // A third from A is over the per-client cap: closed at once, before any timeout.
    let (data, closed) = read_until_closed(&mut connect_from(&gw, "127.0.0.1").await, Duration::from_secs(5)).await;
    assert!(closed && data.is_empty(), "over max_connections_per_client: closed at once");
    // Client B still gets a connection: the third and last.
    let mut other = connect_from(&gw, "127.0.0.2").await;
    assert!(served(exchange(&mut other, GET_PAYMENTS).await), "another client is under its own cap");
    // Client C is over the total cap.
    let (data, closed) = read_until_closed(&mut connect_from(&gw, "127.0.0.3").await, Duration::from_secs(5)).await;
    assert!(closed && data.is_empty(), "over max_connections: closed at once");
    // Existing clients keep working, and so does the admin listener.
    assert!(served(exchange(&mut working, GET_PAYMENTS).await));
    assert!(served(exchange(&mut other, GET_PAYMENTS).await));
    assert_eq!(client().get(format!("{}/healthz", gw.admin)).send().await.expect("admin").status(), 200);
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 4);

    // A closed connection gives its place back.
    drop(other);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = connect_from(&gw, "127.0.0.3").await;
        if served(exchange(&mut again, GET_PAYMENTS).await) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the place is given back once the connection closes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_on_the_proxy_port_leaves_the_admin_listener_reachable() {
    let (addr, _upstream) = start_upstream().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("oncely.toml");
    std::fs::write(&config, CONFIG).expect("write config");
    // 128 descriptors and the default caps (10000 connections): without the caps fitted
    // to the descriptors, the flood would use them all (for the 10 s header timeout, and
    // for ever before there was one) and neither listener could accept.
    let gw = spawn_gateway_with_descriptors(128, &format!("http://{addr}"), "memory://", &config, &[]).await;
    let mut flood = Vec::new();
    for _ in 0..200 {
        if let Ok(stream) = tokio::net::TcpStream::connect(proxy_addr(&gw)).await {
            flood.push(stream);
        }
    }
    let admin = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    let health = admin.get(format!("{}/healthz", gw.admin)).send().await.expect("the admin listener answers");
    assert_eq!(health.status(), 200);
    // The proxy is at its cap: a new connection is closed at once rather than queued.
    let (_, closed) = read_until_closed(&mut connect_from(&gw, "127.0.0.1").await, Duration::from_secs(5)).await;
    assert!(closed, "over the fitted max_connections: closed at once");
    // Once the flood goes, the proxy serves again.
    drop(flood);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = connect_from(&gw, "127.0.0.1").await;
        if exchange(&mut again, GET_PAYMENTS).await.is_some_and(|a| a.starts_with("HTTP/1.1 201")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the proxy serves again after the flood");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status line's code and the body of a raw answer.
fn status_and_body(answer: &str) -> (u16, &str) {
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, answer.split_once("\r\n\r\n").map_or("", |(_, body)| body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_that_is_not_a_plain_host_is_refused_before_forwarding() {
    let (addr, upstream) = start_upstream().await;
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &[]).await;
    let injection = r#"a", for=7.7.7.7;proto=https;host="evil"#;
    for hosts in [
        vec![injection],
        vec!["evil.com, gw.example"],
        vec!["user@gw.example"],
        vec!["gw.example:99999"],
        vec!["gw.example", "other.example"],
    ] {
        let fields: String = hosts.iter().map(|h| format!("host: {h}\r\n")).collect();
        for key in ["", "idempotency-key: k-host\r\n"] {
            let answer = raw_request(
                &gw,
                &format!("POST /orders HTTP/1.1\r\n{fields}{key}content-length: 2\r\nconnection: close\r\n\r\n{{}}"),
            )
            .await;
            let (status, body) = status_and_body(&answer);
            assert_eq!(status, 400, "{hosts:?}: {answer}");
            assert!(answer.to_ascii_lowercase().contains("content-type: application/problem+json"), "{answer}");
            assert!(body.contains("urn:oncely:problem:bad-host"), "{answer}");
        }
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 0, "nothing reached the upstream");

    // A plain host is passed on, whole, in one Forwarded element.
    let answer = raw_request(
        &gw,
        "POST /echo HTTP/1.1\r\nhost: gw.example:8080\r\ncontent-length: 3\r\nconnection: close\r\n\r\nabc",
    )
    .await;
    let (status, body) = status_and_body(&answer);
    assert_eq!(status, 200, "{answer}");
    let seen: Value = serde_json::from_str(body).expect("echoed headers");
    assert_eq!(seen["forwarded"], r#"for=127.0.0.1;proto=http;host="gw.example:8080""#);
    assert_eq!(seen["x-forwarded-host"], "gw.example:8080");
    assert_eq!(seen["content-length"], "3", "a streamed body keeps its framing through the body read timeout");
    assert!(seen.get("transfer-encoding").is_none());
    // And a request without a body is forwarded without one (not as an empty chunked body).
    let answer = raw_request(&gw, "POST /echo HTTP/1.1\r\nhost: gw.example\r\nconnection: close\r\n\r\n").await;
    let seen: Value = serde_json::from_str(status_and_body(&answer).1).expect("echoed headers");
    assert!(seen.get("transfer-encoding").is_none(), "{seen}");
    // Keyed requests are not stored when refused: the same key now runs.
    let answer = raw_request(
        &gw,
        "POST /orders HTTP/1.1\r\nhost: gw.example\r\nidempotency-key: k-host\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
    )
    .await;
    assert_eq!(status_and_body(&answer).0, 201, "{answer}");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_spellings_that_servers_read_as_a_required_route_are_refused_or_covered() {
    let (addr, upstream) = start_upstream().await;
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &[]).await;
    let post =
        |path: &str| format!("POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}");
    // Spellings a servlet container, or a framework that decodes %2F or trims, routes to
    // the handler of /payments.
    for path in [
        "/payments;jsessionid=1",
        "/payments%2F",
        "/payments%2f1",
        "/payments%5C",
        "/payments%20",
        "/payments%09",
        "/payments%00",
        "/x%2F..%2Fpayments",
        "/payments;a=b/refunds",
    ] {
        let answer = raw_request(&gw, &post(path)).await;
        let (status, body) = status_and_body(&answer);
        assert_eq!(status, 400, "{path}: {answer}");
        assert!(body.contains("urn:oncely:problem:ambiguous-path"), "{path}: {answer}");
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 0, "no spelling reached the upstream without a key");
    // A keyed request on an unambiguous path is served; an encoded slash where both
    // readings fall on the same route passes as it came (the upstream has no such path).
    assert_eq!(send_post(&gw, "/payments", Some("k-path"), "{}").await.status(), 201);
    assert_eq!(status_and_body(&raw_request(&gw, &post("/orders%2Fx")).await).0, 404);
    // Methods no route covers pass through, whatever the spelling.
    let get = "GET /payments;jsessionid=1 HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n";
    assert_eq!(status_and_body(&raw_request(&gw, get).await).0, 404, "axum's own router has no such path");

    // For upstreams that route /PAYMENTS and /payments.json to /payments.
    let config = format!(
        "{CONFIG}\n[[routes]]\npath = \"/orders\"\nrequired = true\ncase_insensitive = true\nmatch_suffixes = [\".json\"]\n"
    );
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", &config, &[]).await;
    let calls = upstream.calls.load(Ordering::SeqCst);
    for path in ["/ORDERS", "/Orders/1", "/orders.json", "/ORDERS.JSON/1"] {
        let r = send_post(&gw, path, None, "{}").await;
        assert_eq!(r.status(), 400, "{path}: the /orders route covers it and requires a key");
        assert_eq!(problem_type(r).await, "urn:oncely:problem:missing-key");
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), calls);
    let r = send_post(&gw, "/orders.xml", None, "{}").await;
    assert_eq!(r.status(), 404, "a suffix not listed is another path, passed through");
}

/// The fields of the access lines (target `oncely::access`) a gateway wrote to `path` in
/// `format` (`json` or `plain`), once `ready` holds for them (the gateway writes them as
/// requests finish; polled, as the lines come from another process).
async fn access_lines(path: &std::path::Path, format: &str, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<Value> = match format {
            "json" => text
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .filter(|line| line["target"] == "oncely::access")
                .map(|line| line["fields"].clone())
                .collect(),
            _ => text.lines().filter_map(plain_access_fields).collect(),
        };
        if ready(&lines) {
            return lines;
        }
        assert!(std::time::Instant::now() < deadline, "access lines so far: {lines:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fields of a plain access line (`2026-12-03T17:00:00.000001Z  INFO oncely::access:
/// method=POST path="/slow" key=… outcome="executed" status=201 micros=12`) as a JSON
/// object: quoted values as strings, bare ones as booleans, numbers or strings.
fn plain_access_fields(line: &str) -> Option<Value> {
    let (stamp, rest) = line.split_once("  INFO oncely::access: ")?;
    assert!(stamp.len() == 27 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T', "{line}");
    // The time the line was written (a minute's slack for a slow machine).
    let written = humantime::parse_rfc3339(stamp).unwrap_or_else(|e| panic!("{e}: {line}"));
    let now = std::time::SystemTime::now();
    let apart = match now.duration_since(written) {
        Ok(behind) => behind,
        Err(ahead) => ahead.duration(),
    };
    assert!(apart < Duration::from_secs(60), "{line} written {apart:?} from now");
    let mut fields = serde_json::Map::new();
    let mut rest = rest;
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=').unwrap_or_else(|| panic!("name=value: {line}"));
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            // Up to the closing quote; the paths here need no escaping.
            let end = quoted.find('"').unwrap_or_else(|| panic!("a closing quote: {line}"));
            (Value::from(&quoted[..end]), &quoted[end + 1..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            let bare = &after[..end];
            let value = match bare {
                "true" | "false" => Value::from(bare == "true"),
                _ => bare.parse::<i64>().map_or_else(|_| Value::from(bare), Value::from),
            };
            (value, &after[end..])
        };
        fields.insert(name.to_string(), value);
        rest = after.strip_prefix(' ').unwrap_or(after);
    }
    Some(Value::Object(fields))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_keyed_request_has_an_access_line_with_its_key_hash_and_outcome_even_when_its_client_hung_up() {
    keyed_requests_have_access_lines_in("json").await;
}

/// As above, in the default format: the gateway writes these lines itself, not through
/// `tracing` (`logs::access`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plain_access_lines_have_the_same_fields() {
    keyed_requests_have_access_lines_in("plain").await;
}

/// A gateway in reject mode in front of `upstream`, logging in `format` at `level` to the
/// file `log` (not a terminal: no colours); its child process and proxy URL.
async fn gateway_logging_to(
    upstream: std::net::SocketAddr,
    dir: &std::path::Path,
    format: &str,
    level: &str,
    log: &std::path::Path,
) -> (tokio::process::Child, String) {
    let config = dir.join("oncely.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let log = std::fs::File::create(log).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_oncely"))
        .args(["serve", "--upstream", &format!("http://{upstream}"), "--listen", "127.0.0.1:0", "--store", "memory://"])
        .args(["--log-format", format, "--log-level", level, "--on-conflict", "reject", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn oncely");
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line).await.expect("listen line");
    let url = line.trim().strip_prefix("oncely listening on ").expect("listen line").to_string();
    (child, url)
}

/// A directive that turns the access lines off turns off the ones the gateway writes
/// itself too, keyed and not; a graceful stop writes every buffered line before exiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_access_lines_follow_the_log_level() {
    let (addr, upstream) = start_upstream().await;
    let dir = tempfile::tempdir().expect("dir");
    for (level, lines) in [("info,oncely::access=off", 0), ("warn", 0), ("info", 3)] {
        let log_path = dir.path().join(format!("{level}.log"));
        let (mut child, url) = gateway_logging_to(addr, dir.path(), "plain", level, &log_path).await;
        for key in ["k-level-1", "k-level-1"] {
            let r = client().post(format!("{url}/payments")).header("idempotency-key", key).send().await;
            assert_eq!(r.expect("answer").status(), 201);
        }
        assert_eq!(client().get(format!("{url}/plain")).send().await.expect("answer").status(), 404);
        let pid = child.id().expect("running");
        assert!(std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill").success());
        let exit = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("exits").expect("status");
        assert!(exit.success(), "{exit:?}");
        let text = std::fs::read_to_string(&log_path).expect("log");
        assert_eq!(text.lines().filter(|l| l.contains(" oncely::access: ")).count(), lines, "{level}: {text}");
        assert_eq!(text.lines().filter_map(plain_access_fields).count(), lines, "{level}: {text}");
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 3, "one execution per gateway");
}

async fn keyed_requests_have_access_lines_in(format: &str) {
    let (addr, upstream) = start_upstream().await;
    let dir = tempfile::tempdir().expect("dir");
    let log_path = dir.path().join("gateway.log");
    let (child, url) = gateway_logging_to(addr, dir.path(), format, "info", &log_path).await;
    let _kill_on_drop = child;

    // A client that hangs up while its request runs.
    let started = upstream.started.notified();
    let gone = tokio::spawn(client().post(format!("{url}/slow")).header("idempotency-key", "k-gone").send());
    started.await;
    gone.abort();
    assert!(gone.await.is_err_and(|e| e.is_cancelled()), "the client hung up");
    // A duplicate meets it running (reject mode), then it finishes.
    let conflict = client().post(format!("{url}/slow")).header("idempotency-key", "k-gone").send().await;
    assert_eq!(conflict.expect("answer").status(), 409);
    upstream.gate.notify_one();
    // Its line is written when it finishes, with nobody left to answer.
    access_lines(&log_path, format, |lines| lines.iter().any(|l| l["outcome"] == "executed")).await;
    let replayed = client().post(format!("{url}/slow")).header("idempotency-key", "k-gone").send().await;
    assert_eq!(replayed.expect("replay").status(), 201);
    let mismatch = client().post(format!("{url}/slow")).header("idempotency-key", "k-gone").body("other").send();
    assert_eq!(mismatch.await.expect("answer").status(), 422);
    // A request no route covers, passed through (the upstream has no such path): the
    // gateway's own line, without key or outcome.
    assert_eq!(client().get(format!("{url}/plain")).send().await.expect("answer").status(), 404);
    let lines = access_lines(&log_path, format, |lines| lines.len() >= 5).await;
    let passed = lines.iter().find(|l| l["method"] == "GET").expect("the GET's line");
    assert_eq!(passed["path"], "/plain", "{passed}");
    assert_eq!(passed["status"], 404, "{passed}");
    assert_eq!(passed["replayed"], false, "{passed}");
    assert!(passed["micros"].is_u64() && passed.get("key").is_none(), "{passed}");
    let lines: Vec<Value> = lines.into_iter().filter(|l| l["method"] == "POST").collect();

    let outcomes: Vec<&str> = lines.iter().filter_map(|l| l["outcome"].as_str()).collect();
    assert_eq!(outcomes, ["conflict", "executed", "replayed", "mismatch"], "{lines:#?}");
    let executed = &lines[1];
    assert_eq!(executed["status"], 201, "the hung-up client's request has its line: {executed}");
    assert_eq!(executed["path"], "/slow");
    let hash = executed["key"].as_str().expect("key");
    assert_eq!(hash.len(), 64, "the storage key's hash, never the raw key: {hash}");
    assert!(lines.iter().all(|l| l["key"] == hash), "one key's history, by its hash: {lines:#?}");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_is_published_and_problems_link_to_the_documentation() {
    let (addr, upstream) = start_upstream().await;
    let config = format!(
        "{CONFIG}\n[policy]\ndocumentation_url = \"https://api.example.com/docs/idempotency\"\n\n\
         [[routes]]\npath = \"/orders\"\nkey_pointer = \"/order_id\"\nrequired = true\nmismatch_status = 400\n"
    );
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", &config, &[]).await;
    let policy = client().get(format!("{}/.well-known/idempotency", gw.url)).send().await.expect("policy");
    assert_eq!(policy.status(), 200);
    assert_eq!(policy.headers()["content-type"], "application/json");
    let policy: Value = policy.json().await.expect("JSON");
    let routes = policy["routes"].as_array().expect("routes");
    let payments = routes.iter().find(|r| r["path"] == "/payments").expect("the /payments route");
    assert_eq!(payments["required"], true);
    assert_eq!(payments["on_conflict"], "wait");
    assert_eq!(payments["methods"], serde_json::json!(["POST", "PATCH"]));
    let orders = routes.iter().find(|r| r["path"] == "/orders").expect("the /orders route");
    assert_eq!(orders["header"], "body:/order_id");
    assert_eq!(orders["mismatch_status"], 400);
    assert_eq!(policy["documentation_url"], "https://api.example.com/docs/idempotency");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 0, "the policy is the gateway's own answer");

    // A keyed route whose key is in the body: the same order id is the same request.
    for _ in 0..2 {
        let r = client().post(format!("{}/orders", gw.url)).body(r#"{"order_id":"o-1","qty":2}"#).send().await;
        assert_eq!(r.expect("answer").status(), 201);
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
    let reused = client().post(format!("{}/orders", gw.url)).body(r#"{"order_id":"o-1","qty":3}"#).send().await;
    let reused = reused.expect("answer");
    assert_eq!(reused.status(), 400);
    assert_eq!(reused.headers()["link"], "<https://api.example.com/docs/idempotency>; rel=\"describedby\"");
    let body: Value = reused.json().await.expect("problem");
    assert_eq!(body["error"]["type"], "idempotency_error");
    assert_eq!(body["error"]["doc_url"], "https://api.example.com/docs/idempotency");
    let missing = client().post(format!("{}/orders", gw.url)).body(r#"{"qty":3}"#).send().await.expect("answer");
    assert_eq!(missing.status(), 400);
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cookie_authenticated_users_with_one_key_each_run_once_and_see_only_their_own_result() {
    let (addr, upstream) = start_upstream().await;
    let config = format!("{CONFIG}\n[[routes]]\npath = \"/orders\"\nscope = {{ cookies = [\"session\"] }}\n");
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", &config, &[]).await;
    let post = |path: &'static str, cookie: &'static str| {
        client()
            .post(format!("{}{path}", gw.url))
            .header("idempotency-key", "same-key")
            .header("cookie", cookie)
            .header("content-type", "application/json")
            .body(r#"{"amount":100}"#)
            .send()
    };
    // The default scope reads the Cookie field: without an Authorization header, two
    // users are still apart.
    let a = post("/wait/pay", "session=alice").await.expect("answer");
    let b = post("/wait/pay", "session=bob").await.expect("answer");
    assert!(!replayed(&a) && !replayed(&b), "each user's request ran");
    let (a, b) = (a.text().await.expect("body"), b.text().await.expect("body"));
    assert_ne!(a, b, "bob never gets alice's stored response");
    assert_eq!(post("/wait/pay", "session=alice").await.expect("answer").text().await.expect("body"), a);
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 2);
    // A route scoped by the session cookie alone: other cookies may change between retries.
    assert!(!replayed(&post("/orders", "session=carol; theme=dark").await.expect("answer")));
    assert!(replayed(&post("/orders", "_ga=1; session=carol").await.expect("answer")));
    assert!(!replayed(&post("/orders", "session=dave").await.expect("answer")));
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_header_scope_refuses_requests_without_it() {
    let (addr, upstream) = start_upstream().await;
    let (gw, _dir) = start_gateway(
        &format!("http://{addr}"),
        "memory://",
        CONFIG,
        &["--scope", "{ trusted_header = \"x-authenticated-user\" }"],
    )
    .await;
    let r = send_post(&gw, "/orders", Some("k-t"), "{}").await;
    assert_eq!(r.status(), 401);
    assert_eq!(problem_type(r).await, "urn:oncely:problem:unauthenticated");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 0, "nothing ran under a weaker scope");
    let as_user = |user: &'static str| {
        client()
            .post(format!("{}/orders", gw.url))
            .header("idempotency-key", "k-t")
            .header("x-authenticated-user", user)
            .body("{}")
            .send()
    };
    assert!(!replayed(&as_user("alice").await.expect("answer")));
    assert!(replayed(&as_user("alice").await.expect("answer")));
    assert!(!replayed(&as_user("bob").await.expect("answer")));
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_accepts_the_connection_releases_the_key_not_an_unknown_outcome() {
    // A listener that never accepts, with a backlog of one: once the queue is full, a
    // connection attempt hangs (the kernel drops its SYN), so nothing is ever sent.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let listener = socket.listen(1).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut held = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => held.push(stream),
            _ => break, // the queue is full
        }
    }
    let flags = ["--upstream-timeout", "300ms", "--completion-limit", "600ms"];
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", CONFIG, &flags).await;
    for _ in 0..2 {
        let r = send_post(&gw, "/wait/pay", Some("k-never"), "{}").await;
        assert_ne!(r.status(), 502, "never held as an unknown outcome: nothing was sent");
        let kind = problem_type(r).await;
        assert!(
            kind == "urn:oncely:problem:upstream-timeout" || kind == "urn:oncely:problem:upstream-unreachable",
            "{kind}"
        );
    }
    // Once the first call gave up, the key was released: a third try is not refused as
    // held, and is not answered outcome-unknown.
    let r = send_post(&gw, "/wait/pay", Some("k-never"), "{}").await;
    assert_ne!(problem_type(r).await, "urn:oncely:problem:outcome-unknown");
    drop(held);
    drop(listener);
}

/// An HS256 token for `sub`, issued `issued` seconds ago and expiring in `expires_in`.
fn token(secret: &[u8], sub: &str, issued: u64, expires_in: i64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let claims = serde_json::json!({ "sub": sub, "iat": now - issued, "exp": now as i64 + expires_in });
    let key = jsonwebtoken::EncodingKey::from_secret(secret).expect("an HMAC key");
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key).expect("token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_jwt_claim_keeps_a_refreshed_tokens_retry_and_refuses_forged_ones() {
    let (addr, upstream) = start_upstream().await;
    let dir = tempfile::tempdir().expect("dir");
    let secret_file = dir.path().join("jwt.secret");
    std::fs::write(&secret_file, "test-secret-of-32-bytes-or-more!\n").expect("secret");
    let secret = b"test-secret-of-32-bytes-or-more!";
    let config = format!(
        "{CONFIG}\n[[routes]]\npath = \"/orders\"\nscope = {{ jwt = {{ algorithms = [\"HS256\"], secret_file = {:?} }} }}\n",
        secret_file.display().to_string()
    );
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", &config, &[]).await;
    let post = |path: &'static str, bearer: String, key: &'static str| {
        client()
            .post(format!("{}{path}", gw.url))
            .header("idempotency-key", key)
            .header("authorization", format!("Bearer {bearer}"))
            .body(r#"{"amount":100}"#)
            .send()
    };
    let first = post("/orders", token(secret, "alice", 600, 300), "k-jwt").await.expect("answer");
    assert_eq!(first.status(), 201);
    let first_body = first.text().await.expect("body");
    // The access token was refreshed between the try and the retry: the same principal.
    let refreshed = post("/orders", token(secret, "alice", 0, 900), "k-jwt").await.expect("answer");
    assert!(replayed(&refreshed), "the retry with a refreshed token is alice's retry");
    assert_eq!(refreshed.text().await.expect("body"), first_body);
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);

    // Forged or dead tokens are refused, and never answered with alice's record.
    let forged = token(b"another-secret-another-secret-!!", "alice", 0, 300);
    let header = base64_url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = base64_url(br#"{"sub":"alice","exp":4102444800}"#);
    let unsigned = format!("{header}.{payload}.");
    for bad in [forged, unsigned, token(secret, "alice", 7200, -3600), "garbage".to_string()] {
        let r = post("/orders", bad.clone(), "k-jwt").await.expect("answer");
        assert_eq!(r.status(), 401, "{bad}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        assert!(!replayed(&r));
        assert_eq!(problem_type(r).await, "urn:oncely:problem:unauthenticated");
    }
    // Bob with the same key has his own record.
    let bob = post("/orders", token(secret, "bob", 0, 300), "k-jwt").await.expect("answer");
    assert!(!replayed(&bob));
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 2);

    // With the raw header (the default scope), a refreshed token is another principal:
    // the retry runs again. This is why the JWT scope exists.
    let raw1 = post("/payments", token(secret, "carol", 600, 300), "k-raw").await.expect("answer");
    let raw2 = post("/payments", token(secret, "carol", 0, 900), "k-raw").await.expect("answer");
    assert!(!replayed(&raw1) && !replayed(&raw2));
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 4);
}

fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_names_an_unreadable_key_file_and_an_unknown_algorithm() {
    let dir = tempfile::tempdir().expect("dir");
    for (scope, named) in [
        (
            "{ jwt = { algorithms = [\"HS256\"], secret_file = \"/nonexistent/jwt.secret\" } }",
            "defaults.scope.jwt.secret_file",
        ),
        (
            "{ jwt = { algorithms = [\"HS257\"], secret_file = \"/nonexistent/jwt.secret\" } }",
            "defaults.scope.jwt.algorithms",
        ),
        ("{ jwt = { algorithms = [\"RS256\"] } }", "defaults.scope.jwt"),
    ] {
        let file = dir.path().join("oncely.toml");
        std::fs::write(&file, format!("[defaults]\nscope = {scope}\n")).expect("config");
        let out =
            Command::new(env!("CARGO_BIN_EXE_oncely")).arg("check-config").arg(&file).output().await.expect("run");
        assert_eq!(out.status.code(), Some(2), "{scope}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(named), "{scope}: {stderr}");
    }
}
