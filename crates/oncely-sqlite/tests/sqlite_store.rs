//! What the SQLite store promises beyond the conformance suite: a replay is a read that
//! never reaches the writer, records survive a restart, bad files are typed errors,
//! several stores on one file stay atomic, expired records are swept, and the schema
//! stores what its docs say.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use oncely::store::FirstSeen;
use oncely::{
    ClaimOutcome, Fingerprint, IdempotencyKey, RecordState, Scope, StorageKey, Store, StoreAdmin, StoreError,
};
use oncely_sqlite::{Durability, RequestsSent, SqliteOptions, SqliteStore};
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
    assert_eq!(store.claim(&request).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });
    store.complete(request.claim(), Bytes::from_static(payload), retention).await.expect("complete");
}

/// The hit count a replay of `key` reports.
async fn replay_hits(store: &impl Store, key: &IdempotencyKey) -> u64 {
    match store.claim(&claim_request(key, None, LONG)).await.expect("claim") {
        ClaimOutcome::Replay(replay) => replay.hits,
        other => panic!("expected a replay, got {other:?}"),
    }
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
                assert_eq!(replay_hits(&store, &key).await, 0, "a replay counts nothing in the store");
            }
            store.record_hits(&[(storage_key(&key), 2)]).await.expect("the engine's flush");
            store.claim(&claim_request(&in_progress, None, LONG)).await.expect("claim");
        }
        let store = open(&path, durability);
        let record = store.get(&storage_key(&key)).await.expect("get").expect("the record survived");
        assert!(matches!(record.state, RecordState::Completed { ref payload, hits: 2, .. } if payload == "the result"));
        assert_eq!(replay_hits(&store, &key).await, 2, "{durability:?}");
        let held = store.claim(&claim_request(&in_progress, None, LONG)).await.expect("claim");
        assert!(matches!(held, ClaimOutcome::InProgress { .. }), "a live claim survives a restart: {held:?}");
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
            let (store, start, key) = (stores[i % 2].clone(), start.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let request = claim_request(&key, None, LONG);
                start.wait().await;
                store.claim(&request).await.expect("claim")
            }));
        }
        let mut acquired = 0;
        for task in tasks {
            match task.await.expect("task") {
                ClaimOutcome::Acquired { takeover: false } => acquired += 1,
                ClaimOutcome::InProgress { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(acquired, 1, "round {round}: exactly one claim acquires across both stores");
    }
    let key = unique_key();
    complete(&stores[0], &key, b"from the first", LONG).await;
    match stores[1].claim(&claim_request(&key, None, LONG)).await.expect("claim") {
        ClaimOutcome::Replay(replay) => assert_eq!(replay.payload, "from the first"),
        other => panic!("the other store sees the completion, got {other:?}"),
    }
    stores[1].record_hits(&[(storage_key(&key), 1)]).await.expect("record_hits");
    assert_eq!(replay_hits(&stores[0], &key).await, 1, "a flush through one store shows through the other");
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
    let key = unique_key();
    let request = oncely_testkit::claim_request_in(&oncely_testkit::GLOBAL, &key, None, LONG, Duration::MAX);
    assert!(matches!(store.claim(&request).await, Err(StoreError::InvalidRequest(_))));
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
    store.claim(&request).await.expect("claim");
    let mut waiting = store.subscribe(request.storage_key());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut waiting).await.is_err(),
        "in progress: waits for a change"
    );
    store.complete(request.claim(), Bytes::from_static(b"r"), LONG).await.expect("complete");
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

/// Also with claims' look-ups on the caller's thread, whose connections the store and
/// the reader threads share until it is dropped.
#[tokio::test]
async fn a_clone_shares_the_writer_and_a_dropped_store_closes_the_file() {
    for inline in [false, true] {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("oncely.db");
        let options = SqliteOptions::default().durability(relaxed()).inline_look_ups(inline);
        let store = SqliteStore::open(&path, options).expect("the store opens");
        let clone = store.clone();
        let key = unique_key();
        complete(&store, &key, b"r", LONG).await;
        assert_eq!(replay_hits(&store, &key).await, 0);
        drop(store);
        assert!(clone.get(&storage_key(&key)).await.expect("get").is_some());
        drop(clone);
        // Every connection is closed once the last clone is gone: SQLite then checkpoints
        // and removes the WAL.
        assert!(!dir.path().join("oncely.db-wal").exists(), "the WAL was folded in and removed at close ({inline})");
    }
}

/// Requests `store` sent to its threads, and look-ups it ran on the caller's thread,
/// since `before`.
fn sent_since(store: &SqliteStore, before: RequestsSent) -> RequestsSent {
    let now = store.requests_sent();
    RequestsSent {
        writer: now.writer - before.writer,
        reader: now.reader - before.reader,
        inline: now.inline - before.inline,
    }
}

/// `reads` read-only statements, all on the caller's thread with `inline` look-ups (one
/// caller at a time always finds a reader's connection free), all on reader threads
/// without; and `writer` writer requests.
fn sent(inline: bool, reads: u64, writer: u64) -> RequestsSent {
    if inline {
        RequestsSent { writer, reader: 0, inline: reads }
    } else {
        RequestsSent { writer, reader: reads, inline: 0 }
    }
}

/// `PRAGMA data_version` of a connection of the test's own: it changes exactly when
/// another connection commits a change to the file.
fn data_version(conn: &rusqlite::Connection) -> i64 {
    conn.query_row("PRAGMA data_version", [], |row| row.get(0)).expect("data_version")
}

/// A new key costs the claim's look-up on a reader's connection, then two writer
/// requests (claim, complete); a replay, a mismatch and a claim of a key held by a live
/// lease cost one read each, never reach the writer, and commit nothing to the file.
/// The look-ups run on reader threads by default, on the caller's thread with
/// `inline_look_ups`.
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_is_one_read_that_never_reaches_the_writer_and_commits_nothing() {
    for inline in [true, false] {
        a_replay_is_one_read(inline).await;
    }
}

async fn a_replay_is_one_read(inline: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let store = SqliteStore::open(&path, SqliteOptions::default().no_sweeper().inline_look_ups(inline)).expect("open");
    let fingerprint = Some(Fingerprint::from_bytes(b"the request"));
    let (key, held) = (unique_key(), unique_key());

    let before = store.requests_sent();
    let request = claim_request(&key, fingerprint, LONG);
    assert_eq!(store.claim(&request).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });
    store.complete(request.claim(), Bytes::from_static(b"the result"), LONG).await.expect("complete");
    assert_eq!(sent_since(&store, before), sent(inline, 1, 2), "a new key");
    store.claim(&claim_request(&held, fingerprint, LONG)).await.expect("claim");

    let watcher = rusqlite::Connection::open(&path).expect("a connection of the test's own");
    let version = data_version(&watcher);
    let before = store.requests_sent();
    for _ in 0..10 {
        match store.claim(&claim_request(&key, fingerprint, LONG)).await.expect("claim") {
            ClaimOutcome::Replay(replay) => assert_eq!((replay.payload.as_ref(), replay.hits), (&b"the result"[..], 0)),
            other => panic!("expected a replay, got {other:?}"),
        }
    }
    let other = Some(Fingerprint::from_bytes(b"another request"));
    assert_eq!(store.claim(&claim_request(&key, other, LONG)).await.expect("claim"), ClaimOutcome::Mismatch);
    let in_progress = store.claim(&claim_request(&held, fingerprint, LONG)).await.expect("claim");
    assert!(matches!(in_progress, ClaimOutcome::InProgress { .. }), "{in_progress:?}");
    assert_eq!(sent_since(&store, before), sent(inline, 12, 0), "one read each, no write");
    assert_eq!(data_version(&watcher), version, "nothing was committed to the file");

    // The probe sees a write when there is one: the engine's flush commits.
    store.record_hits(&[(storage_key(&key), 10)]).await.expect("record_hits");
    assert_eq!(sent_since(&store, before).writer, 1, "the whole batch is one writer request");
    assert_ne!(data_version(&watcher), version, "a flush commits");
    assert_eq!(store.get(&storage_key(&key)).await.expect("get").expect("record").hits(), 10);
}

/// Another connection holds SQLite's write lock (as another process in a transaction
/// would): the writer cannot begin a transaction, so a new key's claim waits for the
/// lock, while replays, mismatches and live leases are answered at once from a reader,
/// on a reader thread or (`inline_look_ups`) on the caller's.
#[tokio::test(flavor = "multi_thread")]
async fn replays_are_answered_while_another_connection_holds_the_write_lock() {
    for inline in [false, true] {
        replays_are_answered_under_the_write_lock(inline).await;
    }
}

async fn replays_are_answered_under_the_write_lock(inline: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    // Far longer than the test: a request that needs the write lock waits for it.
    let options = SqliteOptions::default().busy_timeout(Duration::from_secs(120)).no_sweeper().inline_look_ups(inline);
    let store = SqliteStore::open(&path, options).expect("open");
    let (key, held, new) = (unique_key(), unique_key(), unique_key());
    complete(&store, &key, b"the result", LONG).await;
    store.claim(&claim_request(&held, None, LONG)).await.expect("claim");

    let other = rusqlite::Connection::open(&path).expect("a second connection");
    other.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
    let mut blocked = tokio::spawn({
        let store = store.clone();
        async move { store.claim(&claim_request(&new, None, LONG)).await }
    });

    let promptly = |what: &'static str| {
        move |answered: Result<Result<ClaimOutcome, StoreError>, tokio::time::error::Elapsed>| {
            answered.unwrap_or_else(|_| panic!("{what} waited for the write lock")).expect(what)
        }
    };
    let within = Duration::from_secs(5);
    let before = store.requests_sent();
    for _ in 0..20 {
        let replay = tokio::time::timeout(within, store.claim(&claim_request(&key, None, LONG))).await;
        assert!(matches!(promptly("a replay")(replay), ClaimOutcome::Replay(r) if r.payload == "the result"));
    }
    let fingerprint = Some(Fingerprint::from_bytes(b"another request"));
    let mismatch = tokio::time::timeout(within, store.claim(&claim_request(&key, fingerprint, LONG))).await;
    assert_eq!(promptly("a mismatch")(mismatch), ClaimOutcome::Mismatch);
    let in_progress = tokio::time::timeout(within, store.claim(&claim_request(&held, None, LONG))).await;
    assert!(matches!(promptly("a live lease")(in_progress), ClaimOutcome::InProgress { .. }));
    let reads = sent_since(&store, before);
    // The blocked claim's look-up and its writer request may fall in this window too.
    assert!(reads.reader + reads.inline >= 22 && reads.writer <= 1, "{reads:?}");
    assert_eq!(reads.inline > 0, inline, "where the look-ups ran: {reads:?}");

    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut blocked).await.is_err(),
        "a new key's claim needs the write lock, and waits for it"
    );
    other.execute_batch("COMMIT").expect("release the lock");
    let acquired = tokio::time::timeout(Duration::from_secs(20), blocked).await;
    let acquired = acquired.expect("the claim goes on once the lock is free").expect("task").expect("claim");
    assert_eq!(acquired, ClaimOutcome::Acquired { takeover: false });
}

/// `record_hits` adds every count of a batch (a key twice gets both), skips what is not
/// a live completed record, saturates, and is all or nothing: a batch with one failing
/// entry adds nothing.
#[tokio::test(flavor = "multi_thread")]
async fn record_hits_applies_a_batch_all_or_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let store = open(&path, Durability::Sync);
    let (a, poison, expired) = (unique_key(), IdempotencyKey::new("poison").expect("key"), unique_key());
    complete(&store, &a, b"a", LONG).await;
    complete(&store, &poison, b"p", LONG).await;
    complete(&store, &expired, b"e", Duration::from_millis(1)).await;

    let other = rusqlite::Connection::open(&path).expect("a second connection");
    let hex: String = storage_key(&poison).as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    other
        .execute_batch(&format!(
            "CREATE TRIGGER fail_hits BEFORE INSERT ON hit_counts WHEN new.storage_key = x'{hex}'
             BEGIN SELECT RAISE(ABORT, 'simulated failure'); END;"
        ))
        .expect("make the poison key's count fail");
    let failed = store.record_hits(&[(storage_key(&a), 1), (storage_key(&poison), 1)]).await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(replay_hits(&store, &a).await, 0, "the failed batch added nothing, not even before the failure");

    other.execute_batch("DROP TRIGGER fail_hits").expect("drop the trigger");
    let batch = [(storage_key(&a), 2), (storage_key(&poison), 1), (storage_key(&a), 3), (storage_key(&expired), 4)];
    store.record_hits(&batch).await.expect("record_hits");
    assert_eq!((replay_hits(&store, &a).await, replay_hits(&store, &poison).await), (5, 1));
    let (expired_rows, expired_counts): (i64, i64) = other
        .query_row(
            "SELECT (SELECT count(*) FROM records WHERE storage_key = ?1), \
                    (SELECT count(*) FROM hit_counts WHERE storage_key = ?1)",
            [storage_key(&expired).as_bytes().as_slice()],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .expect("count the expired record's rows");
    assert_eq!((expired_rows, expired_counts), (1, 0), "an expired record, still on disk, is not counted");

    store.record_hits(&[(storage_key(&a), u64::MAX), (storage_key(&a), 1)]).await.expect("record_hits");
    assert_eq!(replay_hits(&store, &a).await, i64::MAX as u64, "the count saturates");
}

/// A key's `records.hits` and `hit_counts` rows, read past the store.
fn raw_hits(path: &Path, key: &IdempotencyKey) -> (Option<i64>, Option<i64>) {
    raw_hits_at(path, &storage_key(key))
}

/// [`raw_hits`] by storage key.
fn raw_hits_at(path: &Path, storage_key: &StorageKey) -> (Option<i64>, Option<i64>) {
    let conn = rusqlite::Connection::open(path).expect("open the file directly");
    let key = storage_key.as_bytes().as_slice();
    conn.query_row(
        "SELECT (SELECT hits FROM records WHERE storage_key = ?1), (SELECT hits FROM hit_counts WHERE storage_key = ?1)",
        [key],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )
    .expect("read the counts")
}

/// Flushed replay counts go to `hit_counts`, never to the record's own row, and end with
/// the record: a delete, a release, the sweep, and a claim that replaces the expired
/// record all leave the next record at the key with no hits.
#[tokio::test(flavor = "multi_thread")]
async fn replay_counts_live_beside_the_record_and_end_with_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let store = open(&path, Durability::Sync);
    let short = Duration::from_millis(300);

    let deleted = unique_key();
    complete(&store, &deleted, b"d", LONG).await;
    store.record_hits(&[(storage_key(&deleted), 3)]).await.expect("record_hits");
    assert_eq!(replay_hits(&store, &deleted).await, 3);
    let record = store.get(&storage_key(&deleted)).await.expect("get").expect("record");
    assert!(matches!(record.state, RecordState::Completed { hits: 3, .. }), "{record:?}");
    assert_eq!(raw_hits(&path, &deleted), (Some(0), Some(3)), "the flush wrote the counts row, not the record's");
    assert!(store.delete(&storage_key(&deleted)).await.expect("delete"));
    assert_eq!(raw_hits(&path, &deleted), (None, None), "the delete took the counts with it");
    complete(&store, &deleted, b"d2", LONG).await;
    assert_eq!(replay_hits(&store, &deleted).await, 0, "a new record at the key starts at 0");

    let (replaced, swept) = (unique_key(), unique_key());
    let started = tokio::time::Instant::now();
    complete(&store, &replaced, b"r", short).await;
    complete(&store, &swept, b"s", short).await;
    store.record_hits(&[(storage_key(&replaced), 4), (storage_key(&swept), 5)]).await.expect("record_hits");
    let counted = (raw_hits(&path, &replaced).1, raw_hits(&path, &swept).1);
    if started.elapsed() < short {
        // The flush landed inside the retention (a slower machine may miss it, and then
        // there is nothing to end: what follows still holds).
        assert_eq!(counted, (Some(4), Some(5)));
    }
    // Time passing is what is under test: nothing signals a retention's end.
    tokio::time::sleep(short + Duration::from_millis(200)).await;
    // A flush that arrives after the record expired adds to a row nothing reads.
    store.record_hits(&[(storage_key(&replaced), 1)]).await.expect("record_hits");
    if counted.0 == Some(4) {
        assert_eq!(raw_hits(&path, &replaced).1, Some(5), "added to the expired record's own row");
    }
    assert!(store.get(&storage_key(&replaced)).await.expect("get").is_none(), "an expired record is absent");
    let request = claim_request(&replaced, None, LONG);
    assert_eq!(store.claim(&request).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });
    assert_eq!(raw_hits(&path, &replaced), (Some(0), None), "the claim that replaced the record ended its counts");
    store.complete(request.claim(), Bytes::from_static(b"r2"), LONG).await.expect("complete");
    assert_eq!(replay_hits(&store, &replaced).await, 0);
    assert!(store.purge_expired().await.expect("purge") >= 1);
    assert_eq!(raw_hits(&path, &swept), (None, None), "the sweep took the counts with the record");

    let released = unique_key();
    let request = claim_request(&released, None, LONG);
    store.claim(&request).await.expect("claim");
    store.record_hits(&[(storage_key(&released), 6)]).await.expect("record_hits");
    assert_eq!(raw_hits(&path, &released), (Some(0), None), "a record in progress gets no counts row");
    store.release(request.claim()).await.expect("release");
    assert_eq!(raw_hits(&path, &released), (None, None));

    // A first-seen mark given counts (only a direct caller of record_hits could) loses
    // them when a new mark replaces it after its window.
    let (scope, id) = (Scope::global(), unique_key());
    let mark = FirstSeen::new(&scope, &id, short);
    let started = tokio::time::Instant::now();
    assert!(store.first_seen(&mark).await.expect("first_seen"));
    store.record_hits(&[(*mark.storage_key(), 2)]).await.expect("record_hits");
    let counted = raw_hits_at(&path, mark.storage_key());
    if started.elapsed() < short {
        assert_eq!(counted, (Some(0), Some(2)), "the live mark was counted");
    }
    tokio::time::sleep(short + Duration::from_millis(200)).await;
    assert!(store.first_seen(&FirstSeen::new(&scope, &id, LONG)).await.expect("first_seen"), "new after its window");
    assert_eq!(raw_hits_at(&path, mark.storage_key()), (Some(0), None), "the new mark ended the old one's counts");
}

/// A file from before `hit_counts` (schema version 3) keeps the counts its records hold,
/// and the counts flushed after the migration add to them, saturating.
/// A file as version 1 left it (one table, hit counts in its rows, no usage row) is
/// brought through every migration when a current store opens it: its completed record
/// replays with its count, its claim is still held, the usage row counts every row as
/// the triggers would have (the expired one included), and flushes add to the old count.
#[tokio::test(flavor = "multi_thread")]
async fn a_version_1_file_is_migrated_with_its_records_and_counts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let (done, held, expired) = (unique_key(), unique_key(), unique_key());
    let usage = {
        let store = open(&path, Durability::Sync);
        complete(&store, &done, b"the result", LONG).await;
        complete(&store, &expired, b"gone", LONG).await;
        store.claim(&claim_request(&held, None, LONG)).await.expect("claim");
        store.usage().await.expect("usage")
    };
    {
        let conn = rusqlite::Connection::open(&path).expect("open the file directly");
        conn.execute_batch(
            "DROP TRIGGER hit_counts_delete; DROP TRIGGER hit_counts_reset; DROP TABLE hit_counts; \
             DROP TRIGGER records_usage_insert; DROP TRIGGER records_usage_delete; \
             DROP TRIGGER records_usage_update; DROP TRIGGER records_usage_state; DROP TABLE records_usage; \
             PRAGMA user_version = 1;",
        )
        .expect("take the file back to version 1");
        conn.execute("UPDATE records SET hits = 5 WHERE storage_key = ?1", [storage_key(&done).as_bytes().as_slice()])
            .expect("a count flushed by version 1");
        conn.execute(
            "UPDATE records SET expires_at = 1 WHERE storage_key = ?1",
            [storage_key(&expired).as_bytes().as_slice()],
        )
        .expect("a record that expired, not yet swept");
    }

    let store = SqliteStore::open(&path, SqliteOptions::default().no_sweeper()).expect("opens and migrates");
    let conn = rusqlite::Connection::open(&path).expect("open the file directly");
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0)).expect("user_version");
    assert!(version >= 4, "migrated to the current schema, not {version}");
    assert_eq!(replay_hits(&store, &done).await, 5, "the completed record, with its count");
    let claim = store.claim(&claim_request(&held, None, LONG)).await.expect("claim");
    assert!(matches!(claim, ClaimOutcome::InProgress { .. }), "the claim is still held: {claim:?}");
    assert_eq!(store.usage().await.expect("usage"), usage, "counted as the triggers had counted");
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.records, stats.in_progress, stats.completed), (2, 1, 1), "the expired record is absent");
    store.record_hits(&[(storage_key(&done), 2)]).await.expect("record_hits");
    assert_eq!(replay_hits(&store, &done).await, 7, "a flush adds to the count version 1 kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn counts_from_before_the_counts_table_are_kept_and_added_to() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let (old, full) = (unique_key(), unique_key());
    {
        let store = open(&path, Durability::Sync);
        complete(&store, &old, b"o", LONG).await;
        complete(&store, &full, b"f", LONG).await;
    }
    {
        let conn = rusqlite::Connection::open(&path).expect("open the file directly");
        conn.execute_batch(
            "DROP TRIGGER hit_counts_delete; DROP TRIGGER hit_counts_reset; DROP TABLE hit_counts; \
             PRAGMA user_version = 3;",
        )
        .expect("take the file back to version 3");
        conn.execute("UPDATE records SET hits = 7 WHERE storage_key = ?1", [storage_key(&old).as_bytes().as_slice()])
            .expect("a count flushed by version 3");
        conn.execute(
            "UPDATE records SET hits = 9223372036854775806 WHERE storage_key = ?1",
            [storage_key(&full).as_bytes().as_slice()],
        )
        .expect("a count near the top");
    }
    let store = open(&path, Durability::Sync);
    assert_eq!(replay_hits(&store, &old).await, 7, "the migration kept the count");
    store.record_hits(&[(storage_key(&old), 2), (storage_key(&full), 5)]).await.expect("record_hits");
    assert_eq!(replay_hits(&store, &old).await, 9);
    assert_eq!(replay_hits(&store, &full).await, i64::MAX as u64, "the sum saturates");
    let record = store.get(&storage_key(&full)).await.expect("get").expect("record");
    assert!(matches!(record.state, RecordState::Completed { hits, .. } if hits == i64::MAX as u64), "{record:?}");
}
