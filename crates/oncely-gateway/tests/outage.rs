//! A store that cannot be written for longer than a lease, under clients that retry by
//! themselves: the gateway on SQLite while another process holds the database's write
//! lock (as a backup tool, a migration or a stuck process would).

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::*;

const OUTAGE_CONFIG: &str = r#"
[defaults]
lease = "1s"
"#;

/// A client that retries as payment SDKs do: the same key and body on every try, again on
/// timeouts (5 s), 5xx, 409 and 429, every 50 ms, until it holds a 201; then it keeps
/// asking (a retry of a request it thinks was lost) until `stop`. Returns every 201 body.
async fn retrying_client(url: String, key: String, stop: tokio_util::sync::CancellationToken) -> Vec<String> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    let mut bodies = Vec::new();
    loop {
        let sent = client
            .post(format!("{url}/slow"))
            .header("content-type", "application/json")
            .header("idempotency-key", &key)
            .body("{}")
            .send()
            .await;
        let Ok(response) = sent else {
            // A second execution waits on the upstream's gate forever: a timeout, retried.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        match status {
            201 => bodies.push(text),
            409 | 429 | 500..=599 => {}
            other => panic!("{key}: unexpected {other}: {text}"),
        }
        if stop.is_cancelled() && !bodies.is_empty() {
            return bodies;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Finding 2 of the hostile-input report: with the write lock held past the lease, the
/// upstream acted, the client got its 201, and a retry after the lock was released took
/// the lapsed claim over and ran the operation again (17–20 of 20 keys). Now every retry
/// reaching this gateway is answered from the result it keeps, readiness says so, and
/// the kept results reach the database before anything else once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_outage_longer_than_the_lease_runs_nothing_twice() {
    let (addr, upstream) = start_upstream().await;
    let dir = tempfile::tempdir().expect("dir");
    let db = dir.path().join("oncely.db");
    let store = format!("sqlite://{}?busy_timeout=100ms", db.display());
    let (gw, _config_dir) = start_gateway(&format!("http://{addr}"), &store, OUTAGE_CONFIG, &[]).await;
    let keys: Vec<String> = (0..20).map(|i| format!("outage-{i}")).collect();

    // Every request is inside the upstream (claimed, forwarded) before the outage starts.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = Vec::new();
    for key in &keys {
        let started = upstream.started.notified();
        clients.push(tokio::spawn(retrying_client(gw.url.clone(), key.clone(), stop.clone())));
        started.await;
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), keys.len());

    // Another process takes the write lock; then the upstream answers.
    let locker = rusqlite::Connection::open(&db).expect("open the database");
    locker.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
    upstream.gate.notify_waiters();

    // Readiness reports every result held in memory (not merely that the store cannot
    // be written), while the clients keep retrying every 50 ms.
    let ready = |admin: String| async move {
        let response = client().get(format!("{admin}/readyz")).send().await.expect("admin answers");
        (response.status().as_u16(), response.text().await.unwrap_or_default())
    };
    let all_kept = format!("not ready: {} results of operations that ran wait to be stored", keys.len());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, text) = ready(gw.admin.clone()).await;
        if status == 503 && text.starts_with(&all_kept) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "readiness never reported the kept results: {status} {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every result is kept; hold the lock past the lease (1 s) so that the store alone
    // would let each retry take its key over.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    locker.execute_batch("ROLLBACK").expect("release the write lock");
    drop(locker);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ready(gw.admin.clone()).await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "the kept results were never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A few more rounds of retries against the recovered store.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    for (key, client) in keys.iter().zip(clients) {
        let bodies = tokio::time::timeout(Duration::from_secs(30), client)
            .await
            .unwrap_or_else(|_| panic!("{key}: the client never got its result"))
            .expect("client task");
        assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{key}: every answer is the first result: {bodies:?}");
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), keys.len(), "at most once per key");

    // The results are in the database, not only in the gateway's memory.
    drop(gw);
    let conn = rusqlite::Connection::open(&db).expect("open");
    let completed: i64 =
        conn.query_row("SELECT COUNT(*) FROM records WHERE payload IS NOT NULL", [], |row| row.get(0)).expect("count");
    assert_eq!(completed, keys.len() as i64);
}
