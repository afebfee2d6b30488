//! What the memory store promises beyond the conformance suite: its bound, its eviction
//! order, its sweeper, and typed errors for requests it cannot honour.

use std::time::Duration;

use bytes::Bytes;
use oncely::{
    ClaimOutcome, Error, Failure, IdempotencyKey, MemoryStore, Oncely, RunError, Scope, StorageKey, Store, StoreError,
};
use oncely_testkit::{claim_request, claim_request_in, unique_key};

const LONG: Duration = Duration::from_secs(60);

fn key(name: &str) -> IdempotencyKey {
    IdempotencyKey::new(name).expect("valid test key")
}

fn storage(key: &IdempotencyKey) -> StorageKey {
    StorageKey::derive(&Scope::global(), key)
}

/// Claims and completes `key` with the given retention.
async fn complete(store: &MemoryStore, key: &IdempotencyKey, retention: Duration) {
    let request = claim_request_in(&Scope::global(), key, None, LONG, LONG);
    let claim_id = request.claim_id;
    assert_eq!(store.claim(request).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });
    store.complete(&storage(key), claim_id, Bytes::from_static(b"r"), retention).await.expect("complete");
}

#[tokio::test]
async fn full_store_evicts_the_completed_record_that_expires_first() {
    let store = MemoryStore::builder().max_entries(3).shards(1).build();
    complete(&store, &key("a"), Duration::from_secs(30)).await;
    complete(&store, &key("b"), Duration::from_secs(10)).await;
    complete(&store, &key("c"), Duration::from_secs(20)).await;

    let outcome = store.claim(claim_request(&key("d"), None, LONG)).await.expect("claim makes room");
    assert_eq!(outcome, ClaimOutcome::Acquired { takeover: false });
    assert_eq!(store.len(), 3);
    assert!(store.get(&storage(&key("b"))).await.expect("get").is_none(), "b expired first and was evicted");
    for kept in ["a", "c", "d"] {
        assert!(store.get(&storage(&key(kept))).await.expect("get").is_some(), "{kept} is kept");
    }
}

#[tokio::test]
async fn in_progress_records_are_never_evicted() {
    let store = MemoryStore::builder().max_entries(2).shards(1).build();
    let a = claim_request(&key("a"), None, LONG);
    let a_claim = a.claim_id;
    store.claim(a).await.expect("claim a");
    store.claim(claim_request(&key("b"), None, LONG)).await.expect("claim b");

    let full = store.claim(claim_request(&key("c"), None, LONG)).await;
    assert!(matches!(full, Err(StoreError::Capacity { capacity: 2 })), "{full:?}");
    assert_eq!(store.len(), 2);

    store.complete(&storage(&key("a")), a_claim, Bytes::from_static(b"r"), LONG).await.expect("complete a");
    store.claim(claim_request(&key("c"), None, LONG)).await.expect("room made by evicting completed a");
    assert!(store.get(&storage(&key("a"))).await.expect("get").is_none());
    assert!(store.get(&storage(&key("b"))).await.expect("get").is_some(), "in-progress b survives");
}

#[tokio::test]
async fn capacity_reaches_the_caller_as_a_typed_error() {
    let oncely = Oncely::new(MemoryStore::builder().max_entries(1).build());
    let Ok(oncely::Acquired::Execute(_held)) = oncely.acquire(&key("held"), None).await else {
        panic!("first key is executed")
    };
    let result = oncely.run(&key("other"), None, || async { Ok::<_, Failure<String>>(1) }).await;
    assert!(
        matches!(result, Err(RunError::Idempotency(Error::Store(StoreError::Capacity { capacity: 1 })))),
        "{result:?}"
    );
}

#[tokio::test]
async fn room_is_made_in_other_shards_when_the_own_shard_has_none() {
    let store = MemoryStore::builder().max_entries(1).shards(64).build();
    for i in 0..50 {
        complete(&store, &key(&format!("k{i}")), LONG).await;
        assert_eq!(store.len(), 1, "the bound holds whichever shard the key lands in");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bound_holds_under_concurrent_load() {
    let oncely = Oncely::new(MemoryStore::builder().max_entries(100).build());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let oncely = oncely.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..500 {
                let key = unique_key();
                oncely.run(&key, None, || async { Ok::<_, Failure<String>>(0u8) }).await.expect("room is always made");
                assert!(oncely.store().len() <= 100);
            }
        }));
    }
    for task in tasks {
        task.await.expect("task completes");
    }
    assert!(oncely.store().len() <= 100);
}

#[tokio::test]
async fn the_sweeper_removes_expired_records() {
    let store = MemoryStore::builder().sweep_interval(Duration::from_millis(50)).build();
    for i in 0..20 {
        complete(&store, &key(&format!("k{i}")), Duration::from_millis(100)).await;
    }
    assert_eq!(store.len(), 20);
    // Nothing signals a sweep; poll the count with a deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !store.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "sweeper left {} records", store.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn purge_counts_exactly_what_expired_and_claiming_an_expired_key_reuses_its_room() {
    let store = MemoryStore::builder().no_sweeper().build();
    for i in 0..5 {
        complete(&store, &key(&format!("short{i}")), Duration::from_millis(100)).await;
        complete(&store, &key(&format!("long{i}")), LONG).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    complete(&store, &key("short0"), LONG).await;
    assert_eq!(store.len(), 10, "the expired record was replaced, not added beside");
    assert_eq!(store.purge_expired().await.expect("purge"), 4);
    assert_eq!(store.len(), 6);
}

#[tokio::test]
async fn durations_that_overflow_the_clock_are_typed_errors() {
    let store = MemoryStore::new();
    let mut request = claim_request(&key("k"), None, LONG);
    request.retention = Duration::MAX;
    assert!(matches!(store.claim(request).await, Err(StoreError::InvalidRequest(_))));
    assert!(store.is_empty(), "nothing stored");
}

#[tokio::test]
async fn list_pages_through_live_records_in_storage_key_order() {
    let store = MemoryStore::new();
    for i in 0..25 {
        complete(&store, &key(&format!("k{i}")), LONG).await;
    }
    complete(&store, &key("gone"), Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.list(after, 10).await.expect("list");
        let Some(last) = page.last() else { break };
        after = Some(last.storage_key);
        seen.extend(page.into_iter().map(|r| r.storage_key));
    }
    assert_eq!(seen.len(), 25, "every live record once, the expired one not at all");
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
}
