//! The replay cache (`oncely::store::ReplayCache`, feature `cache`): it keeps the store
//! contract, answers replays of cached keys without a store call, and never outlives its
//! time-to-live, its record's retention or a delete made through it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use oncely::store::{Claim, ClaimOutcome, ClaimRequest, FirstSeen, Notified, ReplayCache, StoreAdmin, StoreStats};
use oncely::{Failure, IdempotencyKey, MemoryStore, Oncely, Record, StorageKey, Store, StoreError};

/// The wrapper keeps the contract every store keeps.
mod conformance {
    oncely_testkit::store_conformance!(async {
        oncely::store::ReplayCache::builder(oncely::MemoryStore::new()).build()
    });
}

/// A memory store that counts the claims that reach it: what the cache saves.
#[derive(Clone, Default)]
struct Counted {
    store: MemoryStore,
    claims: Arc<AtomicUsize>,
}

impl Counted {
    fn claims(&self) -> usize {
        self.claims.load(Ordering::SeqCst)
    }
}

impl Store for Counted {
    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        self.store.claim(request).await
    }
    async fn complete(&self, claim: Claim, payload: Bytes, retention: Duration) -> Result<(), StoreError> {
        self.store.complete(claim, payload, retention).await
    }
    async fn release(&self, claim: Claim) -> Result<(), StoreError> {
        self.store.release(claim).await
    }
    async fn touch(&self, claim: Claim, lease: Duration) -> Result<(), StoreError> {
        self.store.touch(claim, lease).await
    }
    async fn first_seen(&self, request: &FirstSeen<'_>) -> Result<bool, StoreError> {
        self.store.first_seen(request).await
    }
    async fn record_hits(&self, hits: &[(StorageKey, u64)]) -> Result<(), StoreError> {
        self.store.record_hits(hits).await
    }
    fn subscribe(&self, key: &StorageKey) -> Notified {
        self.store.subscribe(key)
    }
}

impl StoreAdmin for Counted {
    async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        self.store.get(key).await
    }
    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        self.store.delete(key).await
    }
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.store.purge_expired().await
    }
    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.store.stats().await
    }
}

/// Runs `key`, counting executions in `runs`; the value is the execution's number.
async fn run<S: Store>(oncely: &Oncely<S>, key: &IdempotencyKey, runs: &AtomicUsize) -> (usize, bool) {
    let done = oncely
        .run(key, None, || async { Ok::<_, Failure<()>>(runs.fetch_add(1, Ordering::SeqCst) + 1) })
        .await
        .expect("run");
    (done.value, done.replayed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replays_of_a_cached_key_make_no_store_call() {
    let counted = Counted::default();
    let oncely = Oncely::new(ReplayCache::builder(counted.clone()).build());
    let (key, runs) = (IdempotencyKey::new("order-1").expect("key"), AtomicUsize::new(0));
    assert_eq!(run(&oncely, &key, &runs).await, (1, false));
    assert_eq!(run(&oncely, &key, &runs).await, (1, true), "the first replay comes from the store");
    let before = counted.claims();
    // 64 tasks, 50 replays each, all from the cache.
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (oncely, key) = (oncely.clone(), key.clone());
            tokio::spawn(async move {
                let runs = AtomicUsize::new(100);
                for _ in 0..50 {
                    assert_eq!(run(&oncely, &key, &runs).await, (1, true));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    assert_eq!(counted.claims(), before, "no replay reached the store");
    assert_eq!(oncely.store().cache_hits(), 64 * 50);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_cached_key_with_another_fingerprint_is_a_mismatch_without_a_store_call() {
    let counted = Counted::default();
    let oncely = Oncely::new(ReplayCache::builder(counted.clone()).build());
    let key = IdempotencyKey::new("order-2").expect("key");
    let fingerprint = |body: &[u8]| Some(oncely::Fingerprint::from_bytes(body));
    let ok = || async { Ok::<_, Failure<()>>(7) };
    oncely.run(&key, fingerprint(b"a"), ok).await.expect("first");
    assert!(oncely.run(&key, fingerprint(b"a"), ok).await.expect("replay").replayed);
    let before = counted.claims();
    let other = oncely.run(&key, fingerprint(b"b"), ok).await;
    assert!(matches!(other, Err(oncely::RunError::Idempotency(oncely::Error::Mismatch))), "{other:?}");
    assert_eq!(counted.claims(), before);
}

#[tokio::test]
async fn a_delete_through_the_cache_is_seen_at_once() {
    let oncely = Oncely::new(ReplayCache::builder(MemoryStore::new()).build());
    let (key, runs) = (IdempotencyKey::new("order-3").expect("key"), AtomicUsize::new(0));
    run(&oncely, &key, &runs).await;
    assert_eq!(run(&oncely, &key, &runs).await, (1, true));
    assert!(oncely.delete(&key).await.expect("delete"));
    assert_eq!(run(&oncely, &key, &runs).await, (2, false), "runs again after the delete");
}

/// A delete made behind the cache (another process) is seen within the time-to-live, and
/// only then: the documented bound. Waiting out the time is what is tested.
#[tokio::test]
async fn a_delete_made_elsewhere_is_seen_after_the_time_to_live() {
    let ttl = Duration::from_millis(300);
    let cached = ReplayCache::builder(MemoryStore::new()).time_to_live(ttl).build();
    let elsewhere = Oncely::new(cached.get_ref().clone());
    let oncely = Oncely::new(cached);
    let (key, runs) = (IdempotencyKey::new("order-4").expect("key"), AtomicUsize::new(0));
    run(&oncely, &key, &runs).await;
    assert_eq!(run(&oncely, &key, &runs).await, (1, true));
    let deleted_at = std::time::Instant::now();
    assert!(elsewhere.delete(&key).await.expect("delete"));
    let stale = run(&oncely, &key, &runs).await;
    if deleted_at.elapsed() < ttl / 2 {
        assert_eq!(stale, (1, true), "within the time-to-live the cache still answers");
    }
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    assert!(!run(&oncely, &key, &runs).await.1, "seen after the time-to-live");
}

/// An entry never outlives its record: a retention shorter than the time-to-live ends it.
#[tokio::test]
async fn an_entry_ends_with_its_record() {
    let store = ReplayCache::builder(MemoryStore::new()).time_to_live(Duration::from_secs(60)).build();
    let oncely = Oncely::builder(store)
        .retention(Duration::from_millis(300))
        .lease(Duration::from_millis(100))
        .build()
        .expect("engine");
    let (key, runs) = (IdempotencyKey::new("order-5").expect("key"), AtomicUsize::new(0));
    run(&oncely, &key, &runs).await;
    assert_eq!(run(&oncely, &key, &runs).await, (1, true));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(run(&oncely, &key, &runs).await, (2, false), "the record expired: the key is new again");
}

/// The record's own expiry ends the entry, not the claimer's retention: a process whose
/// routes keep records for a day caches a record another process completed with a
/// retention of 300 ms, and must not replay it once the store has expired it (the other
/// process may have run the key again by then).
#[tokio::test]
async fn an_entry_ends_with_its_record_when_another_process_completed_it() {
    let store = MemoryStore::new();
    let short = Oncely::builder(store.clone())
        .retention(Duration::from_millis(300))
        .lease(Duration::from_millis(100))
        .build()
        .expect("engine");
    let cached = Oncely::new(ReplayCache::builder(store).time_to_live(Duration::from_secs(60)).build());
    assert_eq!(cached.config().retention, Duration::from_secs(24 * 3600), "the default: a day");
    let (key, runs) = (IdempotencyKey::new("order-5b").expect("key"), AtomicUsize::new(0));
    run(&short, &key, &runs).await;
    assert_eq!(run(&cached, &key, &runs).await, (1, true), "found in the store, then cached");
    assert_eq!(cached.store().len(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(run(&cached, &key, &runs).await, (2, false), "the record expired: the key is new again");
}

#[tokio::test]
async fn the_cache_holds_at_most_its_bounds() {
    let store = ReplayCache::builder(MemoryStore::new()).max_entries(10).max_bytes(1 << 20).build();
    let oncely = Oncely::new(store);
    let runs = AtomicUsize::new(0);
    for i in 0..200 {
        let key = IdempotencyKey::new(format!("k-{i}")).expect("key");
        run(&oncely, &key, &runs).await;
        run(&oncely, &key, &runs).await;
    }
    assert!(oncely.store().len() <= 10, "{} entries", oncely.store().len());
    // Bytes: 64 KiB payloads in a 256 KiB cache.
    let store = ReplayCache::builder(MemoryStore::new()).max_bytes(256 << 10).build();
    let oncely = Oncely::new(store);
    let big = "x".repeat(64 << 10);
    for i in 0..50 {
        let key = IdempotencyKey::new(format!("big-{i}")).expect("key");
        for _ in 0..2 {
            let big = big.clone();
            oncely.run(&key, None, || async move { Ok::<_, Failure<()>>(big) }).await.expect("run");
        }
    }
    assert!(oncely.store().len() <= 4, "{} entries of 64 KiB", oncely.store().len());
}

#[tokio::test]
async fn a_disabled_cache_passes_every_claim_through() {
    let counted = Counted::default();
    let oncely = Oncely::new(ReplayCache::disabled(counted.clone()));
    let (key, runs) = (IdempotencyKey::new("order-6").expect("key"), AtomicUsize::new(0));
    for _ in 0..5 {
        run(&oncely, &key, &runs).await;
    }
    assert_eq!(counted.claims(), 5);
    assert_eq!(oncely.store().cache_hits(), 0);
}
