//! The SQLite store's bounds and readiness: a full file refuses new keys and keeps every
//! record, expired rows make room, the counts survive restarts and stay right for every
//! store sharing the file, and `ping` reports writes that cannot proceed.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use oncely::store::{CapacityBound, FirstSeen};
use oncely::{ClaimOutcome, IdempotencyKey, Scope, StorageKey, Store, StoreAdmin, StoreError, StoreStats};
use oncely_sqlite::{SqliteOptions, SqliteStore, Usage};
use oncely_testkit::{claim_request, claim_request_in, unique_key};

const LONG: Duration = Duration::from_secs(3600);

fn open(path: &Path, options: SqliteOptions) -> SqliteStore {
    SqliteStore::open(path, options).expect("the store opens")
}

fn storage_key(key: &IdempotencyKey) -> StorageKey {
    StorageKey::derive(&Scope::global(), key)
}

/// Claims and completes `key` with `payload`.
async fn complete(store: &SqliteStore, key: &IdempotencyKey, payload: Bytes, retention: Duration) {
    let scope = Scope::global();
    let request = claim_request_in(&scope, key, None, LONG, LONG);
    assert_eq!(store.claim(&request).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });
    store.complete(request.claim(), payload, retention).await.expect("complete");
}

async fn replays(store: &SqliteStore, key: &IdempotencyKey) -> bool {
    matches!(store.claim(&claim_request(key, None, LONG)).await, Ok(ClaimOutcome::Replay(_)))
}

fn is_full<T: std::fmt::Debug>(result: &Result<T, StoreError>, bound: CapacityBound, limit: u64) -> bool {
    matches!(result, Err(StoreError::Capacity { bound: b, limit: l }) if *b == bound && *l == limit)
}

/// The counts recomputed from the rows, past the store, the way the triggers count.
fn recount(path: &Path) -> Usage {
    let conn = rusqlite::Connection::open(path).expect("open the file directly");
    let (records, bytes): (i64, i64) = conn
        .query_row(
            "SELECT count(*), coalesce(sum(?1 + octet_length(key) + octet_length(scope) \
                 + coalesce(octet_length(payload), 0)), 0) FROM records",
            [oncely_sqlite::RECORD_OVERHEAD as i64],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .expect("recount");
    Usage { records: records as u64, bytes: bytes as u64 }
}

/// `stats()` recomputed from the rows, past the store: the unexpired ones, by state.
fn restat(path: &Path) -> StoreStats {
    let conn = rusqlite::Connection::open(path).expect("open the file directly");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("a sane clock").as_millis() as i64;
    let (records, in_progress): (i64, i64) = conn
        .query_row("SELECT count(*), coalesce(sum(state = 0), 0) FROM records WHERE expires_at > ?1", [now], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .expect("restat");
    let (records, in_progress) = (records as u64, in_progress as u64);
    StoreStats { records, in_progress, completed: records - in_progress }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_store_refuses_a_new_key_and_keeps_every_record() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let store = open(&path, SqliteOptions::default().max_records(3));
    let (a, b, held) = (unique_key(), unique_key(), unique_key());
    complete(&store, &a, Bytes::from_static(b"result a"), LONG).await;
    complete(&store, &b, Bytes::from_static(b"result b"), LONG).await;
    store.claim(&claim_request(&held, None, LONG)).await.expect("claim");

    for _ in 0..3 {
        let refused = store.claim(&claim_request(&unique_key(), None, LONG)).await;
        assert!(is_full(&refused, CapacityBound::Records, 3), "{refused:?}");
    }
    let new = unique_key();
    let refused = store.first_seen(&FirstSeen::new(&Scope::global(), &new, LONG)).await;
    assert!(is_full(&refused, CapacityBound::Records, 3), "{refused:?}");

    assert!(replays(&store, &a).await && replays(&store, &b).await, "every completed record is kept");
    let still = store.claim(&claim_request(&held, None, LONG)).await.expect("claim");
    assert!(matches!(still, ClaimOutcome::InProgress { .. }), "the in-progress record is kept: {still:?}");
    assert_eq!(store.usage().await.expect("usage").records, 3);
    assert_eq!(recount(&path).records, 3, "nothing was added or dropped");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_byte_bound_trips_before_the_record_bound_with_large_payloads() {
    const PAYLOAD: usize = 64 * 1024;
    let max_bytes = 10 * PAYLOAD as u64;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir.path().join("oncely.db"), SqliteOptions::default().max_records(1000).max_bytes(max_bytes));
    let mut stored = Vec::new();
    let refused = loop {
        let key = unique_key();
        let scope = Scope::global();
        let request = claim_request_in(&scope, &key, None, LONG, LONG);
        match store.claim(&request).await {
            Ok(ClaimOutcome::Acquired { .. }) => {
                let payload = Bytes::from(vec![7; PAYLOAD]);
                store.complete(request.claim(), payload, LONG).await.expect("complete");
                stored.push(key);
            }
            other => break other,
        }
        assert!(stored.len() <= 11, "the byte bound never tripped");
    };
    assert!(is_full(&refused, CapacityBound::Bytes, max_bytes), "{refused:?}");
    assert!((9..=10).contains(&stored.len()), "about 10 payloads of 64 KiB fit 640 KiB: {}", stored.len());
    let usage = store.usage().await.expect("usage");
    assert!(usage.bytes <= max_bytes + PAYLOAD as u64, "a completion passes the bound by its payload at most");
    for key in &stored {
        assert!(replays(&store, key).await, "every completed record is kept");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_rows_are_deleted_to_make_room_and_unexpired_ones_never() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let store = open(&path, SqliteOptions::default().max_records(3).no_sweeper().sweep_batch(2));
    for _ in 0..3 {
        complete(&store, &unique_key(), Bytes::from_static(b"short"), Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(120)).await;
    let long: Vec<_> = (0..3).map(|_| unique_key()).collect();
    for key in &long {
        complete(&store, key, Bytes::from_static(b"long"), LONG).await;
    }
    assert_eq!(recount(&path).records, 3, "each new row took the room of expired ones");
    let refused = store.claim(&claim_request(&unique_key(), None, LONG)).await;
    assert!(is_full(&refused, CapacityBound::Records, 3), "{refused:?}");
    for key in &long {
        assert!(replays(&store, key).await);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_completion_past_the_byte_bound_is_kept_and_new_keys_wait_for_room() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir.path().join("oncely.db"), SqliteOptions::default().max_bytes(8 * 1024));
    let big = unique_key();
    complete(&store, &big, Bytes::from(vec![9; 64 * 1024]), LONG).await;
    assert!(replays(&store, &big).await, "a completion is never refused for room");
    let refused = store.claim(&claim_request(&unique_key(), None, LONG)).await;
    assert!(is_full(&refused, CapacityBound::Bytes, 8 * 1024), "{refused:?}");
    assert!(store.delete(&storage_key(&big)).await.expect("delete"));
    store.claim(&claim_request(&unique_key(), None, LONG)).await.expect("room again once it is gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_keeps_the_counts_and_the_bound() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let options = || SqliteOptions::default().max_records(3);
    let kept: Vec<_> = (0..3).map(|_| unique_key()).collect();
    let before = {
        let store = open(&path, options());
        for (i, key) in kept.iter().enumerate() {
            complete(&store, key, Bytes::from(vec![1; 1000 * (i + 1)]), LONG).await;
        }
        store.usage().await.expect("usage")
    };
    assert_eq!(before, recount(&path));
    assert_eq!(before.records, 3);

    let store = open(&path, options());
    assert_eq!(store.usage().await.expect("usage"), before, "the counts are in the file");
    let refused = store.claim(&claim_request(&unique_key(), None, LONG)).await;
    assert!(is_full(&refused, CapacityBound::Records, 3), "{refused:?}");
    for key in &kept {
        assert!(replays(&store, key).await);
    }
    drop(store);

    let store = open(&path, SqliteOptions::default().max_records(4));
    store.claim(&claim_request(&unique_key(), None, LONG)).await.expect("a larger bound makes room");
}

/// Two stores on one file stand for two processes: the counts are kept by the file's
/// triggers, so they stay right whoever writes.
#[tokio::test(flavor = "multi_thread")]
async fn the_counts_match_a_recount_after_every_kind_of_write_from_two_stores() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    // The second store has a sweeper, first due a day after it opens: the rows counted
    // below change only by the test's own writes and purges, however slow the machine.
    let stores = [
        open(&path, SqliteOptions::default().no_sweeper()),
        open(&path, SqliteOptions::default().sweep_interval(Duration::from_secs(86_400))),
    ];
    let scope = Scope::new("tenant-ü");
    for (i, store) in stores.iter().enumerate() {
        // completed, replayed, its hits flushed, and completed with an empty payload
        let key = unique_key();
        complete(store, &key, Bytes::from(vec![3; 500 + i]), LONG).await;
        assert!(replays(store, &key).await);
        store.record_hits(&[(storage_key(&key), 2)]).await.expect("record_hits");
        complete(store, &unique_key(), Bytes::new(), LONG).await;
        // released, deleted, touched
        let held = unique_key();
        let request = claim_request_in(&scope, &held, None, LONG, LONG);
        store.claim(&request).await.expect("claim");
        store.touch(request.claim(), LONG).await.expect("touch");
        store.release(request.claim()).await.expect("release");
        complete(store, &key_for_delete(i), Bytes::from_static(b"gone"), LONG).await;
        assert!(store.delete(&storage_key(&key_for_delete(i))).await.expect("delete"));
        // markers, repeated
        let marker = unique_key();
        for _ in 0..2 {
            store.first_seen(&FirstSeen::new(&scope, &marker, LONG)).await.expect("mark");
        }
        // expired, then replaced by a claim of the same key, then purged
        let expiring = unique_key();
        complete(store, &expiring, Bytes::from(vec![4; 300]), Duration::from_millis(20)).await;
        complete(store, &unique_key(), Bytes::from(vec![5; 200]), Duration::from_millis(20)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        complete(store, &expiring, Bytes::from(vec![6; 100]), LONG).await;
        store.purge_expired().await.expect("purge");
        assert_eq!(store.usage().await.expect("usage"), recount(&path), "after the writes of store {i}");
        // held, and held until its record expired, unswept: counted by `stats` only while live
        store.claim(&claim_request_in(&scope, &unique_key(), None, LONG, LONG)).await.expect("claim");
        let (lapsing, short) = (unique_key(), Duration::from_millis(20));
        store.claim(&claim_request_in(&scope, &lapsing, None, short, short)).await.expect("claim");
        tokio::time::sleep(Duration::from_millis(50)).await;
        // a completed record whose key is claimed again once expired: completed → in progress
        let again = unique_key();
        complete(store, &again, Bytes::from_static(b"once"), Duration::from_millis(20)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        store.claim(&claim_request(&again, None, LONG)).await.expect("claim again");
        assert_eq!(store.usage().await.expect("usage"), recount(&path), "after the claims of store {i}");
        for (j, other) in stores.iter().enumerate() {
            assert_eq!(other.stats().await.expect("stats"), restat(&path), "store {j} after the writes of store {i}");
        }
    }
    assert_eq!(recount(&path).records, 13, "store 1's purge swept store 0's lapsed claim, not its own");
    assert_eq!(restat(&path), StoreStats { records: 12, in_progress: 4, completed: 8 });
}

fn key_for_delete(i: usize) -> IdempotencyKey {
    IdempotencyKey::new(format!("to-delete-{i}")).expect("valid key")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_from_before_the_bounds_is_counted_once_at_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    {
        let store = open(&path, SqliteOptions::default());
        for i in 0..5 {
            complete(&store, &unique_key(), Bytes::from(vec![0; 100 * i]), LONG).await;
        }
        store.claim(&claim_request(&unique_key(), None, LONG)).await.expect("one held");
    }
    {
        // Take the file back to schema version 1: no usage row, no triggers.
        let conn = rusqlite::Connection::open(&path).expect("open the file directly");
        conn.execute_batch(
            "DROP TRIGGER records_usage_insert; DROP TRIGGER records_usage_delete; \
             DROP TRIGGER records_usage_update; DROP TRIGGER records_usage_state; DROP TABLE records_usage; \
             DROP TRIGGER hit_counts_delete; DROP TRIGGER hit_counts_reset; DROP TABLE hit_counts; \
             PRAGMA user_version = 1;",
        )
        .expect("downgrade");
    }
    let store = open(&path, SqliteOptions::default().max_records(6));
    assert_eq!(store.usage().await.expect("usage"), recount(&path));
    assert_eq!(store.usage().await.expect("usage").records, 6);
    assert_eq!(store.stats().await.expect("stats"), StoreStats { records: 6, in_progress: 1, completed: 5 });
    let refused = store.claim(&claim_request(&unique_key(), None, LONG)).await;
    assert!(is_full(&refused, CapacityBound::Records, 6), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ping_is_unavailable_while_another_connection_holds_the_write_lock() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let store = open(&path, SqliteOptions::default().busy_timeout(Duration::from_millis(200)));
    store.ping().await.expect("a healthy store answers");

    let other = rusqlite::Connection::open(&path).expect("a second connection");
    other.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
    let pinged = store.ping().await;
    assert!(matches!(pinged, Err(StoreError::Unavailable(_))), "reads still work, writes do not: {pinged:?}");
    let claimed = store.claim(&claim_request(&unique_key(), None, LONG)).await;
    assert!(matches!(claimed, Err(StoreError::Unavailable(_))), "{claimed:?}");
    assert!(matches!(store.ping().await, Err(StoreError::Unavailable(_))));

    other.execute_batch("COMMIT").expect("release the lock");
    store.ping().await.expect("ready again once the lock is free");
    store.claim(&claim_request(&unique_key(), None, LONG)).await.expect("writes work again");
}

/// A failing write with the lock free (as on a full disk) is simulated by triggers that
/// abort every insert into `records` and every update of `records_usage`.
#[tokio::test(flavor = "multi_thread")]
async fn ping_is_unavailable_after_a_failed_write_until_a_write_succeeds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let store = open(&path, SqliteOptions::default());
    let other = rusqlite::Connection::open(&path).expect("a second connection");
    other
        .execute_batch(
            "CREATE TRIGGER fail_insert BEFORE INSERT ON records BEGIN SELECT RAISE(ABORT, 'simulated full disk'); END;
             CREATE TRIGGER fail_usage BEFORE UPDATE ON records_usage BEGIN SELECT RAISE(ABORT, 'simulated full disk'); END;",
        )
        .expect("simulate failing writes");
    store.ping().await.expect("no write has failed yet, and the lock is free");

    let claimed = store.claim(&claim_request(&unique_key(), None, LONG)).await;
    assert!(matches!(claimed, Err(StoreError::Unavailable(_))), "{claimed:?}");
    for _ in 0..2 {
        let pinged = store.ping().await;
        assert!(matches!(pinged, Err(StoreError::Unavailable(_))), "writes are failing: {pinged:?}");
    }

    other.execute_batch("DROP TRIGGER fail_insert; DROP TRIGGER fail_usage;").expect("writes work again");
    store.ping().await.expect("the probe's write succeeded");
    store.claim(&claim_request(&unique_key(), None, LONG)).await.expect("claims work again");
}
