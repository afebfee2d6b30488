//! What the SQLite store promises beyond the conformance suite: records survive a
//! restart, bad files are typed errors, several stores on one file stay atomic, expired
//! records are swept, and the schema stores what its docs say.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use oncely::{ClaimOutcome, IdempotencyKey, RecordState, Scope, StorageKey, Store, StoreError};
use oncely_sqlite::{Durability, SqliteOptions, SqliteStore};
use oncely_testkit::{claim_request, unique_key};
use tokio::sync::Barrier;

const LONG: Duration = Duration::from_secs(3600);

fn relaxed() -> Durability {
    Durability::Relaxed { interval: Duration::from_millis(50) }
}

fn open(path: &Path, durability: Durability) -> SqliteStore {
    SqliteStore::open(path, SqliteOptions::default().durability(durability)).expect("the store opens")
}

/// Claims and completes `key` with `payload`.
async fn complete(store: &impl Store, key: &IdempotencyKey, payload: &'static [u8], retention: Duration) {
    let request = claim_request(key, None, LONG);
    let (storage_key, claim_id) = (request.storage_key, request.claim_id);
    assert_eq!(store.claim(request).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });
    store.complete(&storage_key, claim_id, Bytes::from_static(payload), retention).await.expect("complete");
}

fn storage_key(key: &IdempotencyKey) -> StorageKey {
    StorageKey::derive(&Scope::global(), key)
}

/// Rows in the file, expired ones included, read past the store.
fn raw_rows(path: &Path) -> i64 {
    let conn = rusqlite::Connection::open(path).expect("open the file directly");
    conn.query_row("SELECT count(*) FROM records", [], |row| row.get(0)).expect("count rows")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_keeps_completed_records_and_their_hit_counts() {
    for durability in [Durability::Sync, relaxed()] {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("oncely.db");
        let key = unique_key();
        let in_progress = unique_key();
        {
            let store = open(&path, durability);
            complete(&store, &key, b"the result", LONG).await;
            for _ in 0..2 {
                assert!(matches!(store.claim(claim_request(&key, None, LONG)).await, Ok(ClaimOutcome::Completed(_))));
            }
            store.claim(claim_request(&in_progress, None, LONG)).await.expect("claim");
        }
        let store = open(&path, durability);
        let record = store.get(&storage_key(&key)).await.expect("get").expect("the record survived");
        assert!(matches!(record.state, RecordState::Completed { ref payload, hits: 2, .. } if payload == "the result"));
        match store.claim(claim_request(&key, None, LONG)).await.expect("claim") {
            ClaimOutcome::Completed(record) => assert_eq!(record.hits(), 3, "{durability:?}"),
            other => panic!("expected a replay after the restart, got {other:?}"),
        }
        let held = store.claim(claim_request(&in_progress, None, LONG)).await.expect("claim");
        assert!(matches!(held, ClaimOutcome::InProgress(_)), "a live claim survives a restart: {held:?}");
        assert_eq!(store.stats().await.expect("stats").records, 2);
    }
}

#[tokio::test]
async fn a_directory_is_an_unavailable_store_not_a_panic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let error = SqliteStore::open(dir.path(), SqliteOptions::default()).expect_err("a directory is no database");
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    assert!(error.to_string().contains(&dir.path().display().to_string()), "the error names the path: {error}");

    let missing_parent = dir.path().join("no/such/dir/oncely.db");
    let error = SqliteStore::open(&missing_parent, SqliteOptions::default()).expect_err("no parent directory");
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_corrupt_and_left_untouched() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect();
    std::fs::write(&path, &garbage).expect("write garbage");
    let error = SqliteStore::open(&path, SqliteOptions::default()).expect_err("garbage is no database");
    assert!(matches!(error, StoreError::Corrupt(_)), "{error:?}");
    assert_eq!(std::fs::read(&path).expect("read back"), garbage, "the file is not modified");
}

#[tokio::test]
async fn another_applications_database_and_a_newer_schema_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let foreign = dir.path().join("foreign.db");
    {
        let conn = rusqlite::Connection::open(&foreign).expect("create");
        conn.execute_batch("CREATE TABLE invoices (id INTEGER PRIMARY KEY)").expect("a table of its own");
    }
    let error = SqliteStore::open(&foreign, SqliteOptions::default()).expect_err("not ours");
    assert!(matches!(error, StoreError::Corrupt(ref why) if why.contains("another application")), "{error:?}");

    let newer = dir.path().join("newer.db");
    drop(open(&newer, Durability::Sync));
    {
        let conn = rusqlite::Connection::open(&newer).expect("open");
        conn.pragma_update(None, "user_version", 99).expect("pretend a newer version wrote it");
    }
    let error = SqliteStore::open(&newer, SqliteOptions::default()).expect_err("too new");
    assert!(matches!(error, StoreError::Corrupt(ref why) if why.contains("newer")), "{error:?}");
}

#[tokio::test]
async fn an_in_memory_path_is_an_invalid_request() {
    let error = SqliteStore::open(":memory:", SqliteOptions::default()).expect_err("no WAL in memory");
    assert!(matches!(error, StoreError::InvalidRequest(_)), "{error:?}");
}

#[tokio::test]
async fn opening_is_repeatable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let key = unique_key();
    complete(&open(&path, Durability::Sync), &key, b"r", LONG).await;
    for _ in 0..3 {
        let store = open(&path, relaxed());
        assert!(store.get(&storage_key(&key)).await.expect("get").is_some());
    }
}

/// Two stores on one file stand for two processes: each has its own writer connection,
/// so only SQLite's lock keeps them atomic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_on_one_file_acquire_a_key_once() {
    const TASKS: usize = 32;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let stores = [open(&path, Durability::Sync), open(&path, Durability::Sync)];
    for round in 0..5 {
        let key = unique_key();
        let start = Arc::new(Barrier::new(TASKS));
        let mut tasks = Vec::new();
        for i in 0..TASKS {
            let (store, start, request) = (stores[i % 2].clone(), start.clone(), claim_request(&key, None, LONG));
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                store.claim(request).await.expect("claim")
            }));
        }
        let mut acquired = 0;
        for task in tasks {
            match task.await.expect("task") {
                ClaimOutcome::Acquired { takeover: false } => acquired += 1,
                ClaimOutcome::InProgress(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(acquired, 1, "round {round}: exactly one claim acquires across both stores");
    }
    let key = unique_key();
    complete(&stores[0], &key, b"from the first", LONG).await;
    match stores[1].claim(claim_request(&key, None, LONG)).await.expect("claim") {
        ClaimOutcome::Completed(record) => assert_eq!(record.hits(), 1),
        other => panic!("the other store sees the completion, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sweeper_removes_expired_records_in_batches() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let options = SqliteOptions::default().sweep_interval(Duration::from_millis(50)).sweep_batch(3);
    let store = SqliteStore::open(&path, options).expect("open");
    let live = unique_key();
    complete(&store, &live, b"live", LONG).await;
    for _ in 0..10 {
        complete(&store, &unique_key(), b"short", Duration::from_millis(1)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while raw_rows(&path) > 1 {
        assert!(tokio::time::Instant::now() < deadline, "the sweeper removed the expired rows in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(store.get(&storage_key(&live)).await.expect("get").is_some(), "the live record stays");
    assert_eq!(store.purge_expired().await.expect("purge"), 0, "nothing left to purge");
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_removes_every_expired_record_across_many_batches() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let store = SqliteStore::open(&path, SqliteOptions::default().no_sweeper().sweep_batch(7)).expect("open");
    for i in 0..50 {
        let retention = if i % 5 == 0 { LONG } else { Duration::from_millis(1) };
        complete(&store, &unique_key(), b"r", retention).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(raw_rows(&path), 50, "expired rows stay on disk without a sweeper");
    assert_eq!(store.stats().await.expect("stats").records, 10, "but are invisible");
    assert_eq!(store.purge_expired().await.expect("purge"), 40);
    assert_eq!(raw_rows(&path), 10);
}

#[tokio::test]
async fn times_are_stored_as_milliseconds_since_the_epoch() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let store = open(&path, Durability::Sync);
    let before = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as i64;
    complete(&store, &IdempotencyKey::new("k-1").expect("key"), b"r", Duration::from_secs(60)).await;
    let after = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as i64;
    let conn = rusqlite::Connection::open(&path).expect("open directly");
    let (key, state, created_at, expires_at, completed_at): (String, i64, i64, i64, i64) = conn
        .query_row("SELECT key, state, created_at, expires_at, completed_at FROM records", [], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
        })
        .expect("one row");
    assert_eq!((key.as_str(), state), ("k-1", 1));
    assert!((before..=after).contains(&created_at), "{before} <= {created_at} <= {after}");
    assert!((before..=after).contains(&completed_at));
    assert!((before + 60_000..=after + 60_000).contains(&expires_at));
}

#[tokio::test]
async fn durations_that_overflow_the_clock_are_typed_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir.path().join("oncely.db"), Durability::Sync);
    let mut request = claim_request(&unique_key(), None, LONG);
    request.retention = Duration::MAX;
    assert!(matches!(store.claim(request).await, Err(StoreError::InvalidRequest(_))));
    assert_eq!(store.stats().await.expect("stats").records, 0, "nothing stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribe_resolves_at_once_unless_in_progress_and_then_on_completion() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir.path().join("oncely.db"), Durability::Sync);
    let soon = |future| tokio::time::timeout(Duration::from_secs(10), future);

    let absent = unique_key();
    soon(store.subscribe(&storage_key(&absent))).await.expect("absent: resolves at once");
    let done = unique_key();
    complete(&store, &done, b"r", LONG).await;
    soon(store.subscribe(&storage_key(&done))).await.expect("completed: resolves at once");

    let key = unique_key();
    let request = claim_request(&key, None, LONG);
    let (storage_key, claim_id) = (request.storage_key, request.claim_id);
    store.claim(request).await.expect("claim");
    let mut waiting = store.subscribe(&storage_key);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut waiting).await.is_err(),
        "in progress: waits for a change"
    );
    store.complete(&storage_key, claim_id, Bytes::from_static(b"r"), LONG).await.expect("complete");
    soon(waiting).await.expect("woken by the completion");
}

#[tokio::test]
async fn list_pages_through_live_records_in_storage_key_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir.path().join("oncely.db"), Durability::Sync);
    for i in 0..25 {
        complete(&store, &IdempotencyKey::new(format!("k{i}")).expect("key"), b"r", LONG).await;
    }
    complete(&store, &IdempotencyKey::new("gone").expect("key"), b"r", Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.list(after, 10).await.expect("list");
        assert!(page.len() <= 10);
        let Some(last) = page.last() else { break };
        after = Some(last.storage_key);
        seen.extend(page.into_iter().map(|r| r.storage_key));
    }
    assert_eq!(seen.len(), 25, "every live record once, the expired one not at all");
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test]
async fn a_clone_shares_the_writer_and_a_dropped_store_closes_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let store = open(&path, relaxed());
    let clone = store.clone();
    let key = unique_key();
    complete(&store, &key, b"r", LONG).await;
    drop(store);
    assert!(clone.get(&storage_key(&key)).await.expect("get").is_some());
    drop(clone);
    // Every connection is closed once the last clone is gone: SQLite then checkpoints and
    // removes the WAL.
    assert!(!dir.path().join("oncely.db-wal").exists(), "the WAL was folded in and removed at close");
}
