//! A replay cache in front of the SQLite store, given the store's count of deletes
//! (`SqliteStore::erasures`): a delete made through another opener of the file (another
//! process, `oncely keys delete`) is seen by the next claim that starts after it returned,
//! never replayed from the cache. Another opener here is a second `SqliteStore::open` of
//! the same file: its own connections, its own handle on the count's file. (The gateway's
//! tests do the same across processes: `tests/gateway.rs` in `oncely-gateway`.)

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use oncely::store::ReplayCache;
use oncely::{ClaimOutcome, IdempotencyKey, RecordState, Scope, StorageKey, Store, StoreAdmin};
use oncely_sqlite::{SqliteOptions, SqliteStore};
use oncely_testkit::{claim_request, unique_key};

const LONG: Duration = Duration::from_secs(3600);

fn open(path: &Path) -> SqliteStore {
    SqliteStore::open(path, SqliteOptions::default()).expect("the store opens")
}

/// A cache that would answer for an hour: only the count of deletes can end its entries.
fn cached(store: SqliteStore, see_deletes: bool) -> ReplayCache<SqliteStore> {
    let erasures = store.erasures().expect("the count's file opens beside the database");
    let builder = ReplayCache::builder(store).time_to_live(LONG);
    if see_deletes { builder.erasures(erasures).build() } else { builder.build() }
}

async fn claim(store: &impl Store, key: &IdempotencyKey) -> ClaimOutcome {
    store.claim(&claim_request(key, None, LONG)).await.expect("claim")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_through_another_opener_is_seen_by_the_next_claim() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let elsewhere = open(&path);
    for see_deletes in [true, false] {
        let here = cached(open(&path), see_deletes);
        let key = unique_key();
        let request = claim_request(&key, None, LONG);
        assert_eq!(here.claim(&request).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });
        here.complete(request.claim(), Bytes::from_static(b"first"), LONG).await.expect("complete");
        // The first replay reads the store and fills the cache; the second is a hit.
        assert!(matches!(claim(&here, &key).await, ClaimOutcome::Replay(_)));
        assert!(matches!(claim(&here, &key).await, ClaimOutcome::Replay(_)));
        assert_eq!(here.cache_hits(), 1);

        assert!(elsewhere.delete(&StorageKey::derive(&Scope::global(), &key)).await.expect("delete"));
        let after = claim(&here, &key).await;
        if see_deletes {
            assert_eq!(after, ClaimOutcome::Acquired { takeover: false }, "the key runs again at once");
            assert_eq!(here.cache_hits(), 1, "the stale entry answered nothing");
        } else {
            // The documented bound without the count: the entry answers until it ends.
            assert!(matches!(after, ClaimOutcome::Replay(_)), "{after:?}");
        }
    }
}

/// Real contention: claimers replay one key through the cache on every worker while a
/// deleter, through another opener, deletes the record again and again. Each completion
/// stores a new version number; once the delete of version `v` has returned, no claim
/// that starts afterwards may replay `v` or anything older. Executions are counted: at
/// most one per delete, plus the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_claim_after_a_delete_returned_replays_what_it_deleted() {
    const CLAIMERS: usize = 16;
    const DELETES: u64 = 150;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let here = cached(open(&path), true);
    let elsewhere = open(&path);
    let key = Arc::new(unique_key());
    let storage_key = StorageKey::derive(&Scope::global(), &key);
    let deleted_up_to = Arc::new(AtomicU64::new(0));
    let versions = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Replays of a version whose delete had returned when the claim began.
    let stale = Arc::new(AtomicU64::new(0));

    let mut claimers = Vec::new();
    for _ in 0..CLAIMERS {
        let (here, key, deleted_up_to, versions, stop, stale) = (
            here.clone(),
            Arc::clone(&key),
            Arc::clone(&deleted_up_to),
            Arc::clone(&versions),
            Arc::clone(&stop),
            Arc::clone(&stale),
        );
        claimers.push(tokio::spawn(async move {
            let mut replays = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let floor = deleted_up_to.load(Ordering::SeqCst);
                let request = claim_request(&key, None, LONG);
                match here.claim(&request).await.expect("claim") {
                    ClaimOutcome::Replay(replay) => {
                        let version: u64 = std::str::from_utf8(&replay.payload).expect("utf8").parse().expect("number");
                        if version <= floor {
                            stale.fetch_add(1, Ordering::SeqCst);
                        }
                        replays += 1;
                    }
                    ClaimOutcome::Acquired { .. } => {
                        let version = versions.fetch_add(1, Ordering::SeqCst) + 1;
                        // Only completed records are deleted: the claim holds.
                        here.complete(request.claim(), Bytes::from(version.to_string()), LONG).await.expect("complete");
                    }
                    ClaimOutcome::InProgress { .. } => {}
                    ClaimOutcome::Mismatch => panic!("one fingerprint throughout"),
                }
                // A cached replay never waits: without this the claimers would keep
                // every worker and starve the deleter.
                tokio::task::yield_now().await;
            }
            replays
        }));
    }

    let deleter = {
        let here = here.clone();
        tokio::spawn(async move {
            let mut deletes = 0;
            while deletes < DELETES {
                // The version about to be deleted: a completed record stays that version
                // until it is deleted (its retention is an hour).
                let Some(record) = elsewhere.get(&storage_key).await.expect("get") else {
                    tokio::task::yield_now().await;
                    continue;
                };
                let RecordState::Completed { payload, .. } = record.state else {
                    tokio::task::yield_now().await;
                    continue;
                };
                let version: u64 = std::str::from_utf8(&payload).expect("utf8").parse().expect("number");
                assert!(elsewhere.delete(&storage_key).await.expect("delete"));
                deleted_up_to.store(version, Ordering::SeqCst);
                deletes += 1;
                // The next delete waits for a cache hit: an entry in the cache to disown.
                let hits = here.cache_hits();
                while here.cache_hits() == hits {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    // Bounded for the failure this test is for: stale replays keep the key from running
    // again, and the deleter would wait for a record forever.
    let deleted = tokio::time::timeout(Duration::from_secs(120), deleter).await;
    stop.store(true, Ordering::SeqCst);
    let mut replays = 0;
    for claimer in claimers {
        replays += claimer.await.expect("claimer");
    }
    assert_eq!(stale.load(Ordering::SeqCst), 0, "replays of a version deleted before the claim began");
    deleted.expect("every delete done").expect("deleter");
    let executions = versions.load(Ordering::SeqCst);
    assert!((DELETES..=DELETES + 1).contains(&executions), "{executions} executions for {DELETES} deletes");
    assert!(replays > DELETES, "the key was replayed between the deletes ({replays})");
    assert!(here.cache_hits() > 0, "and some replays came from the cache");
}
