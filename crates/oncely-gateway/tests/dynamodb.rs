//! The gateway on DynamoDB, black-box, on moto's emulator (started by `oncely-testkit`):
//! two `oncely` processes sharing one table execute a key once between them; throttling
//! and an emulator that is down turn into 503s, never into a second execution; and
//! `oncely dynamodb create-table`, `keys` and `stats` work on a table.

mod support;

use std::time::Duration;

use oncely_testkit::dynamodb::{DynamoDbServer, FaultProxy, unique_table};

use support::*;

/// moto serves a request at a time, some hundreds a second, and the test with 200
/// waiters queues on it: the timeouts bound a hung call, not the latency.
const PATIENT: &str = "&timeout=20s&connect_timeout=10s";

/// `oncely ARGS…`, its exit code and output.
async fn oncely(args: &[&str]) -> (i32, String, String) {
    let output =
        tokio::process::Command::new(env!("CARGO_BIN_EXE_oncely")).args(args).output().await.expect("oncely runs");
    let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
    (output.status.code().unwrap_or(-1), text(output.stdout), text(output.stderr))
}

/// A new table on `endpoint`, created with the command line; its store URL.
async fn create_table(server: &DynamoDbServer) -> String {
    let url = server.store_url(&unique_table());
    let (code, out, err) = oncely(&["dynamodb", "create-table", "--store", &url]).await;
    assert_eq!(code, 0, "create-table: {out}{err}");
    assert!(out.contains("created, TTL enabled"), "{out}");
    url
}

/// 200 concurrent requests with one key, alternating between two gateways on one table,
/// on a wait-mode route whose upstream holds the first request until every request is
/// inside a gateway: one upstream execution, and 200 identical successful answers (the
/// waiters poll the table: DynamoDB has no push).
///
/// The lease is 30 s here, not the 2 s of the other tests: the 200 arrivals make 400
/// claims in a burst, and moto, serving one call at a time on two busy cores, took
/// longer than the 2 s lease to answer them all. The holder's renewals queued behind
/// them, its lease lapsed and waiters took it over, as a lease allows (see the
/// `oncely-dynamodb` docs on choosing a lease). What this test checks is contention,
/// not lapsed leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_one_table_execute_a_key_once() {
    let store = format!("{}{PATIENT}", create_table(DynamoDbServer::shared()).await);
    let (addr, upstream) = start_upstream().await;
    let config = CONFIG.replace(r#"lease = "2s""#, r#"lease = "30s""#);
    assert_ne!(config, CONFIG, "the lease is set");
    let (a, dir) = start_gateway(&format!("http://{addr}"), &store, &config, &[]).await;
    let b = spawn_gateway(&format!("http://{addr}"), &store, &dir.path().join("oncely.toml"), &[]).await;

    // moto answers the 200 arrivals one call at a time: a longer wait for all of them.
    one_key_through_two_gateways(&a, &b, &upstream, Duration::from_secs(60), async {}).await;

    // The admin commands read the same table (a scan).
    let (code, out, err) = oncely(&["stats", "--store", &store]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("records: 1") && out.contains("completed: 1"), "{out}");
    let (code, out, err) = oncely(&["keys", "list", "--store", &store]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("one-key-two-gateways"), "{out}");
}

/// DynamoDB throttling the gateway's calls (past the SDK's attempts) is a 503
/// `store-unavailable` and reaches no upstream; an operation that ran before its
/// completion was throttled is kept by the gateway and replayed, never run again; once
/// the throttling stops, every key runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throttling_is_503_and_never_a_second_execution() {
    let server = DynamoDbServer::shared();
    let direct = create_table(server).await;
    let proxy = FaultProxy::start(&server.endpoint());
    let store = direct.replace(&server.endpoint(), &proxy.endpoint()) + "&max_attempts=2";
    let (addr, upstream) = start_upstream().await;
    let calls = || upstream.calls.load(std::sync::atomic::Ordering::SeqCst);
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), &store, CONFIG, &[]).await;

    assert_eq!(send_post(&gw, "/payments", Some("before"), "{}").await.status(), 201);
    assert_eq!(calls(), 1);

    for code in ["ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded"] {
        proxy.fail_with(code);
        for key in ["before", "during"] {
            let r = send_post(&gw, "/payments", Some(key), "{}").await;
            assert_eq!(r.status(), 503, "{code}, {key}");
            assert!(r.headers().contains_key("retry-after"));
            assert_eq!(problem_type(r).await, "urn:oncely:problem:store-unavailable");
        }
        assert_eq!(calls(), 1, "{code}: nothing reached the upstream");
    }
    let ready = client().get(format!("{}/readyz", gw.admin)).send().await.expect("readyz");
    assert_eq!(ready.status(), 503, "not ready while throttled");

    // Throttled between the claim and the completion: the operation ran, its answer is
    // returned and kept, and retries replay it while the table still refuses writes.
    proxy.pass();
    let started = upstream.started.notified();
    let running = tokio::spawn({
        let url = gw.url.clone();
        async move {
            let r = post_to(&url, "/slow", Some("ran-then-throttled"), "{}").await;
            (r.status().as_u16(), r.text().await.expect("body"))
        }
    });
    started.await;
    proxy.fail_with("ThrottlingException");
    upstream.gate.notify_one();
    let (status, body) = running.await.expect("task");
    assert_eq!(status, 201, "the upstream's answer reaches the client");
    assert_eq!(calls(), 2);
    let retry = send_post(&gw, "/slow", Some("ran-then-throttled"), "{}").await;
    assert_eq!(retry.status(), 201, "replayed from what the gateway kept");
    assert!(replayed(&retry));
    assert_eq!(retry.text().await.expect("body"), body);

    proxy.pass();
    assert_eq!(send_post(&gw, "/payments", Some("during"), "{}").await.status(), 201, "runs once throttling stops");
    for key in ["before", "during"] {
        let r = send_post(&gw, "/payments", Some(key), "{}").await;
        assert!(replayed(&r), "{key} replays");
    }
    // The kept result reaches the table (the gateway's background writer), and a retry
    // then replays it from there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, out, _) = oncely(&["keys", "list", "--store", &direct]).await;
        if code == 0 && out.contains("ran-then-throttled") && !out.contains("in_progress") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the kept result was written: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let retry = send_post(&gw, "/slow", Some("ran-then-throttled"), "{}").await;
    assert!(replayed(&retry));
    assert_eq!(calls(), 3, "before, ran-then-throttled and during: once each");
    assert!(proxy.faults_answered() > 0);
}

/// An emulator that is down: 503 `store-unavailable`, not ready, nothing forwarded; the
/// command line exits 1 (unreachable), not 2 (bad usage).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_emulator_that_is_down_is_503_and_nothing_runs() {
    let server = DynamoDbServer::start();
    let store = format!("{}&max_attempts=1&timeout=2s", create_table(&server).await);
    let (addr, upstream) = start_upstream().await;
    let calls = || upstream.calls.load(std::sync::atomic::Ordering::SeqCst);
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), &store, CONFIG, &[]).await;
    assert_eq!(send_post(&gw, "/payments", Some("up"), "{}").await.status(), 201);

    server.kill();
    for key in ["up", "new"] {
        let r = send_post(&gw, "/payments", Some(key), "{}").await;
        assert_eq!(r.status(), 503, "{key}");
        assert_eq!(problem_type(r).await, "urn:oncely:problem:store-unavailable");
    }
    assert_eq!(calls(), 1, "nothing was forwarded while the emulator was down");
    let ready = client().get(format!("{}/readyz", gw.admin)).send().await.expect("readyz");
    assert_eq!(ready.status(), 503);
    let (code, _, err) = oncely(&["stats", "--store", &store]).await;
    assert_eq!(code, 1, "unreachable: {err}");
    let (code, _, err) = oncely(&["dynamodb", "create-table", "--store", &store]).await;
    assert_eq!(code, 1, "unreachable: {err}");
    let (code, _, err) = oncely(&["dynamodb", "create-table", "--store", &format!("{store}&colour=blue")]).await;
    assert_eq!(code, 2, "a URL the store refuses: {err}");
    assert!(err.contains("colour"), "{err}");
}

/// A response larger than a DynamoDB item holds (400 KB) but under the gateway's 1 MiB
/// stored-response cap: the store states its bound, the gateway caps stored responses
/// below it, and the operation is completed as "not kept" instead of being refused by
/// the store (which would let its key lapse and a retry run it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_response_larger_than_an_item_is_never_run_twice() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let store = format!("{}{PATIENT}", create_table(DynamoDbServer::shared()).await);
    let runs = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/reports",
        axum::routing::post({
            let runs = runs.clone();
            move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                vec![b'r'; 600 * 1024]
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), &store, CONFIG, &[]).await;
    let first = send_post(&gw, "/reports", Some("k-large"), "{}").await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.bytes().await.expect("body").len(), 600 * 1024, "the first client gets it whole");
    let retry = send_post(&gw, "/reports", Some("k-large"), "{}").await;
    assert!(replayed(&retry));
    assert_eq!(problem_type(retry).await, "urn:oncely:problem:response-not-stored");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
