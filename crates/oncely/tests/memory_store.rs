//! What the memory store promises beyond the conformance suite: its bounds in records and
//! bytes (refusing new keys, never dropping unexpired results), its opt-in eviction order,
//! its sweeper, and typed errors for requests it cannot honour.

use std::time::Duration;

use bytes::Bytes;
use oncely::store::{CapacityBound, FirstSeen};
use oncely::{
    ClaimOutcome, Error, Failure, IdempotencyKey, MemoryStore, Oncely, RunError, Scope, StorageKey, Store, StoreAdmin,
    StoreError,
};
use oncely_testkit::{claim_request, claim_request_in, unique_key};

const LONG: Duration = Duration::from_secs(60);

/// A key that lives for the whole test, so requests can borrow it from a temporary.
fn key(name: &str) -> &'static IdempotencyKey {
    Box::leak(Box::new(IdempotencyKey::new(name).expect("valid test key")))
}

fn storage(key: &IdempotencyKey) -> StorageKey {
    StorageKey::derive(&Scope::global(), key)
}

/// Claims and completes `key` with the given retention.
async fn complete(store: &MemoryStore, key: &IdempotencyKey, retention: Duration) {
    let request = claim_request_in(&oncely_testkit::GLOBAL, key, None, LONG, LONG);
    let claim = request.claim();
    assert_eq!(store.claim(&request).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });
    store.complete(claim, Bytes::from_static(b"r"), retention).await.expect("complete");
}

/// Claims and completes `key` with `payload` and the given retention.
async fn complete_with(store: &MemoryStore, key: &IdempotencyKey, payload: Bytes, retention: Duration) {
    let request = claim_request_in(&oncely_testkit::GLOBAL, key, None, LONG, LONG);
    let claim = request.claim();
    assert_eq!(store.claim(&request).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });
    store.complete(claim, payload, retention).await.expect("complete");
}

/// A claim of `key` replays its completed record.
async fn replays(store: &MemoryStore, key: &IdempotencyKey) -> bool {
    matches!(store.claim(&claim_request(key, None, LONG)).await, Ok(ClaimOutcome::Replay(_)))
}

fn is_full(result: &Result<ClaimOutcome, StoreError>, bound: CapacityBound, limit: usize) -> bool {
    matches!(result, Err(StoreError::Capacity { bound: b, limit: l }) if *b == bound && *l == limit as u64)
}

#[tokio::test]
async fn a_full_store_refuses_a_new_key_and_replays_every_completed_record() {
    let store = MemoryStore::builder().max_entries(3).build();
    for name in ["a", "b", "c"] {
        complete(&store, key(name), LONG).await;
    }
    for _ in 0..5 {
        let refused = store.claim(&claim_request(&unique_key(), None, LONG)).await;
        assert!(is_full(&refused, CapacityBound::Records, 3), "{refused:?}");
    }
    for name in ["a", "b", "c"] {
        assert!(replays(&store, key(name)).await, "{name} is still replayed, not evicted");
    }
    assert_eq!(store.len(), 3);
}

#[tokio::test]
async fn the_byte_bound_trips_before_the_entry_bound_with_large_payloads() {
    const PAYLOAD: usize = 64 * 1024;
    let max_bytes = 10 * PAYLOAD;
    let store = MemoryStore::builder().max_entries(1000).max_bytes(max_bytes).build();
    let mut stored = Vec::new();
    let refused = loop {
        let key = unique_key();
        let request = claim_request_in(&oncely_testkit::GLOBAL, &key, None, LONG, LONG);
        let claim = request.claim();
        match store.claim(&request).await {
            Ok(ClaimOutcome::Acquired { .. }) => {
                store.complete(claim, Bytes::from(vec![7; PAYLOAD]), LONG).await.expect("complete");
                stored.push(key);
            }
            other => break other,
        }
        assert!(stored.len() <= 11, "the byte bound never tripped");
    };
    assert!(is_full(&refused, CapacityBound::Bytes, max_bytes), "{refused:?}");
    assert!((9..=10).contains(&stored.len()), "about 10 payloads of 64 KiB fit 640 KiB: {}", stored.len());
    assert!(store.bytes() >= stored.len() * PAYLOAD);
    // A claim reserves no payload, so the last completion may pass the bound by its own.
    assert!(store.bytes() <= max_bytes + PAYLOAD, "{} bytes", store.bytes());
    for key in &stored {
        assert!(replays(&store, key).await, "every completed record is kept");
    }
}

#[tokio::test]
async fn expired_records_are_reclaimed_from_any_shard_but_unexpired_ones_never() {
    // The entry bound, with records spread over 64 shards.
    let store = MemoryStore::builder().max_entries(4).shards(64).no_sweeper().build();
    for i in 0..4 {
        complete(&store, key(&format!("short{i}")), Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(120)).await;
    for i in 0..4 {
        complete(&store, key(&format!("long{i}")), LONG).await;
    }
    assert_eq!(store.len(), 4, "each new record took the room of an expired one");
    let refused = store.claim(&claim_request(key("one-more"), None, LONG)).await;
    assert!(is_full(&refused, CapacityBound::Records, 4), "{refused:?}");

    // The byte bound: big expired payloads make room for new ones.
    let payload = || Bytes::from(vec![1; 32 * 1024]);
    let store = MemoryStore::builder().max_bytes(96 * 1024).shards(64).no_sweeper().build();
    for i in 0..3 {
        complete_with(&store, key(&format!("short{i}")), payload(), Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(120)).await;
    for i in 0..3 {
        complete_with(&store, key(&format!("long{i}")), payload(), LONG).await;
    }
    assert_eq!(store.stats().await.expect("stats").records, 3);
    let refused = store.claim(&claim_request(key("one-more"), None, LONG)).await;
    assert!(is_full(&refused, CapacityBound::Bytes, 96 * 1024), "{refused:?}");
    assert_eq!(store.len(), 3, "every expired record was dropped before refusing");
    for i in 0..3 {
        assert!(replays(&store, key(&format!("long{i}"))).await);
    }
}

#[tokio::test]
async fn an_expired_record_at_the_claimed_key_gives_its_room_to_the_new_claim() {
    let store = MemoryStore::builder().max_entries(1).no_sweeper().build();
    complete(&store, key("k"), Duration::from_millis(20)).await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    let outcome = store.claim(&claim_request(key("k"), None, LONG)).await.expect("the expired record is replaced");
    assert_eq!(outcome, ClaimOutcome::Acquired { takeover: false });
    assert_eq!(store.len(), 1);
}

#[tokio::test]
async fn a_completion_past_the_byte_bound_is_kept_and_new_keys_wait_for_room() {
    let store = MemoryStore::builder().max_bytes(8 * 1024).build();
    let request = claim_request_in(&oncely_testkit::GLOBAL, key("big"), None, LONG, LONG);
    let claim = request.claim();
    store.claim(&request).await.expect("a claim reserves only the record's fixed part");
    let big = Bytes::from(vec![9; 64 * 1024]);
    store.complete(claim, big.clone(), LONG).await.expect("a completion is never refused");
    assert!(store.bytes() > 8 * 1024);
    match store.claim(&claim_request(key("big"), None, LONG)).await.expect("replay") {
        ClaimOutcome::Replay(replay) => assert_eq!(replay.payload, big),
        other => panic!("expected the big result replayed, got {other:?}"),
    }
    let refused = store.claim(&claim_request(key("next"), None, LONG)).await;
    assert!(is_full(&refused, CapacityBound::Bytes, 8 * 1024), "{refused:?}");
    assert!(store.delete(&storage(key("big"))).await.expect("delete"));
    store.claim(&claim_request(key("next"), None, LONG)).await.expect("room again once it is gone");
}

#[tokio::test]
async fn first_seen_markers_count_against_the_bound_and_are_never_evicted() {
    let store = MemoryStore::builder().max_entries(2).build();
    for name in ["m1", "m2"] {
        assert!(store.first_seen(&FirstSeen::new(&oncely_testkit::GLOBAL, key(name), LONG)).await.expect("mark"));
    }
    let full = store.first_seen(&FirstSeen::new(&oncely_testkit::GLOBAL, key("m3"), LONG)).await;
    assert!(matches!(full, Err(StoreError::Capacity { bound: CapacityBound::Records, limit: 2 })), "{full:?}");
    for name in ["m1", "m2"] {
        let repeat = store.first_seen(&FirstSeen::new(&oncely_testkit::GLOBAL, key(name), LONG)).await.expect("repeat");
        assert!(!repeat, "{name} is still a repeat: its marker was kept");
    }
}

#[tokio::test]
async fn the_counters_come_back_to_zero_however_records_leave() {
    let store = MemoryStore::builder().no_sweeper().build();
    // released
    let request = claim_request(key("released"), None, LONG);
    let claim = request.claim();
    store.claim(&request).await.expect("claim");
    store.release(claim).await.expect("release");
    // deleted while completed, and while in progress
    complete_with(&store, key("deleted"), Bytes::from(vec![0; 1000]), LONG).await;
    assert!(store.delete(&storage(key("deleted"))).await.expect("delete"));
    store.claim(&claim_request(key("deleted-held"), None, LONG)).await.expect("claim");
    assert!(store.delete(&storage(key("deleted-held"))).await.expect("delete"));
    // purged, and replaced while expired
    complete_with(&store, key("purged"), Bytes::from(vec![0; 500]), Duration::from_millis(10)).await;
    complete_with(&store, key("replaced"), Bytes::from(vec![0; 700]), Duration::from_millis(10)).await;
    store
        .first_seen(&FirstSeen::new(&oncely_testkit::GLOBAL, key("marker"), Duration::from_millis(10)))
        .await
        .expect("mark");
    tokio::time::sleep(Duration::from_millis(40)).await;
    let request = claim_request(key("replaced"), None, LONG);
    let claim = request.claim();
    store.claim(&request).await.expect("claim replaces the expired record");
    store.release(claim).await.expect("release");
    assert_eq!(store.purge_expired().await.expect("purge"), 2);
    assert_eq!((store.len(), store.bytes()), (0, 0));
}

/// `stats` from a full scan of the live records, to check the store's own counts against.
async fn counted(store: &MemoryStore) -> oncely::StoreStats {
    let records = store.list(None, usize::MAX).await.expect("list");
    let completed = records.iter().filter(|record| record.is_completed()).count() as u64;
    oncely::StoreStats { records: records.len() as u64, in_progress: records.len() as u64 - completed, completed }
}

/// `stats` reads counts kept per shard, not every record: they agree with a scan however
/// records come, change state, expire and leave.
#[tokio::test]
async fn stats_agree_with_a_scan_of_the_records_however_they_come_and_go() {
    let store = MemoryStore::builder().shards(4).no_sweeper().build();
    let check = async |store: &MemoryStore, step: &str| {
        assert_eq!(store.stats().await.expect("stats"), counted(store).await, "after {step}");
    };
    // Long enough that no short record expires between the steps before the wait, even on
    // a loaded machine: `stats` and the scan read the clock separately.
    let short = Duration::from_millis(500);
    let mut held = Vec::new();
    for i in 0..20 {
        let request = claim_request(key(&format!("stats-{i}")), None, LONG);
        let claim = request.claim();
        store.claim(&request).await.expect("claim");
        held.push(claim);
    }
    check(&store, "claims").await;
    for (i, claim) in held.drain(..10).enumerate() {
        let retention = if i % 3 == 0 { short } else { LONG };
        store.complete(claim, Bytes::from_static(b"r"), retention).await.expect("complete");
    }
    check(&store, "completions").await;
    for claim in held.drain(..3) {
        store.release(claim).await.expect("release");
    }
    for name in ["stats-1", "stats-2", "stats-15"] {
        assert!(store.delete(&storage(key(name))).await.expect("delete"));
    }
    check(&store, "releases and deletes").await;
    // A lapsed claim taken over stays in progress; then it completes.
    let lapsing = claim_request(key("stats-lapsing"), None, Duration::from_millis(10));
    store.claim(&lapsing).await.expect("claim");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let takeover = claim_request(key("stats-lapsing"), None, LONG);
    let claim = takeover.claim();
    assert_eq!(store.claim(&takeover).await.expect("claim"), ClaimOutcome::Acquired { takeover: true });
    check(&store, "a takeover").await;
    store.complete(claim, Bytes::from_static(b"r"), LONG).await.expect("complete");
    for name in ["stats-marker-a", "stats-marker-b"] {
        store.first_seen(&FirstSeen::new(&oncely_testkit::GLOBAL, key(name), short)).await.expect("mark");
    }
    check(&store, "first-seen markers").await;
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    let live = store.stats().await.expect("stats");
    assert_eq!(live, counted(&store).await, "expired records are not counted before a sweep");
    assert_eq!(live.records as usize + 6, store.len(), "four completions and two markers expired, unswept");
    let request = claim_request(key("stats-0"), None, LONG);
    store.claim(&request).await.expect("a claim replaces an expired record");
    check(&store, "a claim over an expired record").await;
    store.purge_expired().await.expect("purge");
    check(&store, "a purge").await;

    // Eviction of unexpired completed records, when opted in.
    let store = MemoryStore::builder().max_entries(5).evict_completed_when_full(true).no_sweeper().build();
    for i in 0..5 {
        complete(&store, key(&format!("stats-evicted-{i}")), LONG).await;
    }
    for i in 0..3 {
        store.claim(&claim_request(key(&format!("stats-evicting-{i}")), None, LONG)).await.expect("claim");
    }
    check(&store, "evictions").await;
    assert_eq!(store.stats().await.expect("stats"), oncely::StoreStats { records: 5, in_progress: 3, completed: 2 });
}

#[tokio::test]
async fn evicting_unexpired_completed_records_is_an_opt_in_taking_the_earliest_expiry() {
    let store = MemoryStore::builder().max_entries(3).shards(1).evict_completed_when_full(true).build();
    complete(&store, key("a"), Duration::from_secs(30)).await;
    complete(&store, key("b"), Duration::from_secs(10)).await;
    complete(&store, key("c"), Duration::from_secs(20)).await;

    let outcome = store.claim(&claim_request(key("d"), None, LONG)).await.expect("claim makes room");
    assert_eq!(outcome, ClaimOutcome::Acquired { takeover: false });
    assert_eq!(store.len(), 3);
    assert!(store.get(&storage(key("b"))).await.expect("get").is_none(), "b expired first and was evicted");
    for kept in ["a", "c", "d"] {
        assert!(store.get(&storage(key(kept))).await.expect("get").is_some(), "{kept} is kept");
    }

    // The byte bound evicts as many as it takes, earliest expiry first.
    let store = MemoryStore::builder().max_bytes(100 * 1024).shards(1).evict_completed_when_full(true).build();
    for i in 0..3 {
        complete_with(&store, key(&format!("k{i}")), Bytes::from(vec![0; 30 * 1024]), LONG).await;
    }
    complete_with(&store, key("huge"), Bytes::from(vec![0; 90 * 1024]), LONG).await;
    complete(&store, key("after"), LONG).await;
    for gone in ["k0", "k1", "k2"] {
        assert!(store.get(&storage(key(gone))).await.expect("get").is_none(), "{gone} was evicted");
    }
    for kept in ["huge", "after"] {
        assert!(store.get(&storage(key(kept))).await.expect("get").is_some(), "{kept} is kept");
    }
}

#[tokio::test]
async fn in_progress_records_are_never_evicted_even_with_eviction_on() {
    let store = MemoryStore::builder().max_entries(2).shards(1).evict_completed_when_full(true).build();
    let a = claim_request(key("a"), None, LONG);
    let a_claim = a.claim();
    store.claim(&a).await.expect("claim a");
    store.claim(&claim_request(key("b"), None, LONG)).await.expect("claim b");

    let full = store.claim(&claim_request(key("c"), None, LONG)).await;
    assert!(is_full(&full, CapacityBound::Records, 2), "{full:?}");
    assert_eq!(store.len(), 2);

    store.complete(a_claim, Bytes::from_static(b"r"), LONG).await.expect("complete a");
    store.claim(&claim_request(key("c"), None, LONG)).await.expect("room made by evicting completed a");
    assert!(store.get(&storage(key("a"))).await.expect("get").is_none());
    assert!(store.get(&storage(key("b"))).await.expect("get").is_some(), "in-progress b survives");
}

#[tokio::test]
async fn capacity_reaches_the_caller_as_a_typed_error() {
    let oncely = Oncely::new(MemoryStore::builder().max_entries(1).build());
    let Ok(oncely::Acquired::Execute(_held)) = oncely.acquire(key("held"), None).await else {
        panic!("first key is executed")
    };
    let result = oncely.run(key("other"), None, || async { Ok::<_, Failure<String>>(1) }).await;
    assert!(
        matches!(
            result,
            Err(RunError::Idempotency(Error::Store(StoreError::Capacity { bound: CapacityBound::Records, limit: 1 })))
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn with_eviction_on_room_is_made_in_other_shards_when_the_own_shard_has_none() {
    let store = MemoryStore::builder().max_entries(1).shards(64).evict_completed_when_full(true).build();
    for i in 0..50 {
        complete(&store, key(&format!("k{i}")), LONG).await;
        assert_eq!(store.len(), 1, "the bound holds whichever shard the key lands in");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_eviction_on_the_bound_holds_under_concurrent_load() {
    let oncely = Oncely::new(MemoryStore::builder().max_entries(100).evict_completed_when_full(true).build());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_new_keys_fill_a_store_exactly_to_its_bound_and_no_further() {
    let store = MemoryStore::builder().max_entries(100).build();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut acquired = Vec::new();
            for _ in 0..50 {
                let key = unique_key();
                let request = claim_request_in(&oncely_testkit::GLOBAL, &key, None, LONG, LONG);
                let claim = request.claim();
                match store.claim(&request).await {
                    Ok(ClaimOutcome::Acquired { .. }) => {
                        store.complete(claim, Bytes::from_static(b"r"), LONG).await.expect("complete");
                        acquired.push(key);
                    }
                    Err(StoreError::Capacity { .. }) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            acquired
        }));
    }
    let mut acquired = Vec::new();
    for task in tasks {
        acquired.extend(task.await.expect("task completes"));
    }
    assert_eq!(acquired.len(), 100, "exactly the bound was admitted");
    for key in &acquired {
        assert!(replays(&store, key).await);
    }
}

#[tokio::test]
async fn the_sweeper_removes_expired_records() {
    let store = MemoryStore::builder().sweep_interval(Duration::from_millis(50)).build();
    for i in 0..20 {
        complete(&store, key(&format!("k{i}")), Duration::from_millis(100)).await;
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
        complete(&store, key(&format!("short{i}")), Duration::from_millis(100)).await;
        complete(&store, key(&format!("long{i}")), LONG).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    complete(&store, key("short0"), LONG).await;
    assert_eq!(store.len(), 10, "the expired record was replaced, not added beside");
    assert_eq!(store.purge_expired().await.expect("purge"), 4);
    assert_eq!(store.len(), 6);
}

#[tokio::test]
async fn durations_that_overflow_the_clock_are_typed_errors() {
    let store = MemoryStore::new();
    let request = oncely_testkit::claim_request_in(&oncely_testkit::GLOBAL, key("k"), None, LONG, Duration::MAX);
    assert!(matches!(store.claim(&request).await, Err(StoreError::InvalidRequest(_))));
    assert!(store.is_empty(), "nothing stored");
}

#[tokio::test]
async fn list_pages_through_live_records_in_storage_key_order() {
    let store = MemoryStore::new();
    for i in 0..25 {
        complete(&store, key(&format!("k{i}")), LONG).await;
    }
    complete(&store, key("gone"), Duration::from_millis(1)).await;
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
