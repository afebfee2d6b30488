//! The engine's behaviour beyond the store contract: failure policies, hooks, decoding,
//! cancellation, conflict handling and settings validation.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oncely::{
    Acquired, ConflictMode, Error, Failure, Fingerprint, IdempotencyKey, MemoryStore, Oncely, RunError, StoreError,
};
use serde::{Deserialize, Serialize};

fn key(name: &str) -> IdempotencyKey {
    IdempotencyKey::new(name).expect("valid test key")
}

/// The guard of a first claim of the key `name`, which executes.
async fn executes<S: oncely::Store>(oncely: &Oncely<S>, name: &str) -> oncely::ClaimGuard<S> {
    match oncely.acquire(&key(name), None).await.expect("claim") {
        Acquired::Execute(guard) => guard,
        Acquired::Replay(_) => panic!("{name}: a new key executes"),
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum PaymentError {
    Declined { reason: String },
    ProviderDown,
}

#[tokio::test]
async fn a_stored_failure_is_replayed_and_not_run_again() {
    let oncely = Oncely::new(MemoryStore::new());
    let attempts = AtomicUsize::new(0);
    for replayed in [false, true, true] {
        let result = oncely
            .run(&key("pay-1"), None, || async {
                attempts.fetch_add(1, Ordering::SeqCst);
                Err::<String, _>(Failure::Store(PaymentError::Declined { reason: "insufficient funds".into() }))
            })
            .await;
        match result {
            Err(RunError::Failed { error, replayed: was }) => {
                assert_eq!(error, PaymentError::Declined { reason: "insufficient funds".into() });
                assert_eq!(was, replayed);
            }
            other => panic!("expected the stored decline, got {other:?}"),
        }
    }
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn question_mark_releases_by_default() {
    async fn provider() -> Result<String, PaymentError> {
        Err(PaymentError::ProviderDown)
    }
    let oncely = Oncely::new(MemoryStore::new());
    let attempts = AtomicUsize::new(0);
    for _ in 0..3 {
        let result = oncely
            .run(&key("pay-2"), None, || async {
                attempts.fetch_add(1, Ordering::SeqCst);
                let charge = provider().await?;
                Ok(charge)
            })
            .await;
        assert!(matches!(result, Err(RunError::Failed { error: PaymentError::ProviderDown, replayed: false })));
    }
    assert_eq!(attempts.load(Ordering::SeqCst), 3, "a released failure runs again on every retry");
}

#[tokio::test]
async fn a_result_of_another_type_is_a_decode_error_not_a_panic() {
    let oncely = Oncely::new(MemoryStore::new());
    oncely.run(&key("k"), None, || async { Ok::<_, Failure<String>>("text".to_string()) }).await.expect("first run");
    let wrong = oncely.run(&key("k"), None, || async { Ok::<u64, Failure<String>>(1) }).await;
    assert!(matches!(wrong, Err(RunError::Idempotency(Error::Decode(_)))), "{wrong:?}");
}

#[tokio::test]
async fn reuse_with_another_fingerprint_is_a_mismatch() {
    let oncely = Oncely::new(MemoryStore::new());
    let a = Fingerprint::from_json(br#"{"amount":1}"#).expect("json");
    let b = Fingerprint::from_json(br#"{"amount":2}"#).expect("json");
    oncely.run(&key("k"), Some(a), || async { Ok::<_, Failure<String>>(1) }).await.expect("first run");
    let reused = oncely.run(&key("k"), Some(b), || async { Ok::<_, Failure<String>>(2) }).await;
    assert!(matches!(reused, Err(RunError::Idempotency(Error::Mismatch))), "{reused:?}");
}

#[tokio::test]
async fn hooks_see_every_outcome_with_hit_counts() {
    let hits = Arc::new(Mutex::new(Vec::new()));
    let misses = Arc::new(AtomicU64::new(0));
    let mismatches = Arc::new(AtomicU64::new(0));
    let conflicts = Arc::new(AtomicU64::new(0));
    let oncely = {
        let (hits, misses, mismatches, conflicts) =
            (hits.clone(), misses.clone(), mismatches.clone(), conflicts.clone());
        Oncely::builder(MemoryStore::new())
            .on_hit(move |_, replay| hits.lock().expect("lock").push(replay.hits))
            .on_miss(move |_| {
                misses.fetch_add(1, Ordering::SeqCst);
            })
            .on_mismatch(move |_| {
                mismatches.fetch_add(1, Ordering::SeqCst);
            })
            .on_conflict(move |_, _| {
                conflicts.fetch_add(1, Ordering::SeqCst);
            })
            .build()
            .expect("valid settings")
    };
    for _ in 0..3 {
        oncely.run(&key("k"), None, || async { Ok::<_, Failure<String>>(1) }).await.expect("run");
    }
    assert_eq!(*hits.lock().expect("lock"), vec![1, 2]);
    assert_eq!(misses.load(Ordering::SeqCst), 1);

    let other = Some(Fingerprint::from_bytes(b"other"));
    let _ = oncely.run(&key("k"), other, || async { Ok::<_, Failure<String>>(1) }).await;
    assert_eq!(mismatches.load(Ordering::SeqCst), 1);

    let guard = executes(&oncely, "busy").await;
    assert!(matches!(oncely.acquire(&key("busy"), None).await, Err(Error::Conflict { .. })));
    assert_eq!(conflicts.load(Ordering::SeqCst), 1);
    guard.release().await.expect("release");
}

#[tokio::test]
async fn a_dropped_guard_blocks_its_key_for_one_lease_then_is_taken_over() {
    let takeovers = Arc::new(AtomicU64::new(0));
    let oncely = {
        let takeovers = takeovers.clone();
        Oncely::builder(MemoryStore::new())
            .lease(Duration::from_millis(300))
            .conflict_mode(ConflictMode::Reject)
            .on_takeover(move |_| {
                takeovers.fetch_add(1, Ordering::SeqCst);
            })
            .build()
            .expect("valid settings")
    };
    let guard = executes(&oncely, "k").await;
    drop(guard);
    match oncely.acquire(&key("k"), None).await {
        Err(Error::Conflict { retry_after }) => assert_eq!(retry_after, Duration::from_secs(1), "rounded up"),
        other => panic!("a dropped guard keeps the key blocked, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let guard = executes(&oncely, "k").await;
    assert!(guard.is_takeover());
    assert_eq!(takeovers.load(Ordering::SeqCst), 1);
    guard.complete(bytes::Bytes::from_static(b"done")).await.expect("complete");
}

#[tokio::test]
async fn a_cancelled_run_leaves_the_key_to_lapse_not_to_rerun_at_once() {
    let oncely = Oncely::builder(MemoryStore::new())
        .lease(Duration::from_millis(300))
        .conflict_mode(ConflictMode::Reject)
        .build()
        .expect("settings");
    let runs = AtomicUsize::new(0);
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        oncely.run(&key("k"), None, || async {
            runs.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
            Ok::<_, Failure<String>>(1)
        }),
    )
    .await;
    assert!(cancelled.is_err(), "the caller's timeout fired");
    let retry = oncely.run(&key("k"), None, || async { Ok::<_, Failure<String>>(2) }).await;
    assert!(matches!(retry, Err(RunError::Idempotency(Error::Conflict { .. }))), "{retry:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = oncely.run(&key("k"), None, || async { Ok::<_, Failure<String>>(3) }).await.expect("taken over");
    assert_eq!(later.value, 3);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_waiter_gives_up_with_a_conflict_at_its_timeout() {
    let oncely = Oncely::builder(MemoryStore::new())
        .conflict_mode(ConflictMode::Wait { timeout: Duration::from_millis(100) })
        .build()
        .expect("settings");
    let guard = executes(&oncely, "k").await;
    assert!(matches!(oncely.acquire(&key("k"), None).await, Err(Error::Conflict { .. })));
    guard.release().await.expect("release");
}

#[tokio::test]
async fn a_completion_after_takeover_is_rejected() {
    let oncely = Oncely::builder(MemoryStore::new()).lease(Duration::from_millis(200)).build().expect("settings");
    let Acquired::Execute(old) = oncely.acquire(&key("k"), None).await.expect("acquire") else { panic!() };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let Acquired::Execute(new) = oncely.acquire(&key("k"), None).await.expect("acquire") else { panic!() };
    let late = old.complete(bytes::Bytes::from_static(b"late")).await;
    assert!(matches!(late, Err(Error::Store(StoreError::LeaseLost))), "{late:?}");
    new.complete(bytes::Bytes::from_static(b"current")).await.expect("new holder completes");
}

#[tokio::test]
async fn bad_settings_are_refused_naming_the_setting() {
    let cases: Vec<(&str, oncely::OncelyBuilder<MemoryStore>)> = vec![
        ("retention", Oncely::builder(MemoryStore::new()).retention(Duration::ZERO)),
        ("retention", Oncely::builder(MemoryStore::new()).retention(Duration::from_secs(400 * 24 * 3600))),
        ("lease", Oncely::builder(MemoryStore::new()).lease(Duration::ZERO)),
        (
            "lease",
            Oncely::builder(MemoryStore::new()).retention(Duration::from_secs(10)).lease(Duration::from_secs(20)),
        ),
        ("poll_interval", Oncely::builder(MemoryStore::new()).poll_interval(Duration::ZERO)),
        (
            "wait_timeout",
            Oncely::builder(MemoryStore::new()).conflict_mode(ConflictMode::Wait { timeout: Duration::ZERO }),
        ),
        ("keep_alive_ceiling", Oncely::builder(MemoryStore::new()).keep_alive_ceiling(Duration::MAX)),
    ];
    for (setting, builder) in cases {
        match builder.build() {
            Err(e) => assert_eq!(e.setting.name(), setting, "{e}"),
            Ok(_) => panic!("{setting} should be refused"),
        }
    }
}

#[tokio::test]
async fn a_zero_or_absurd_dedup_window_is_refused() {
    let oncely = Oncely::new(MemoryStore::new());
    for window in [Duration::ZERO, Duration::MAX] {
        assert!(matches!(oncely.first_seen(&key("m"), window).await, Err(Error::InvalidArgument(_))));
    }
}

#[tokio::test]
async fn a_short_retention_alone_is_accepted() {
    let oncely = Oncely::builder(MemoryStore::new()).retention(Duration::from_secs(60)).build().expect("valid");
    assert_eq!(oncely.config().keep_alive_ceiling, Duration::from_secs(60), "the ceiling follows a short retention");
}

#[tokio::test]
async fn an_outcome_that_does_not_encode_is_returned_once_and_never_run_again() {
    use std::collections::HashMap;
    let oncely = Oncely::builder(MemoryStore::new()).lease(Duration::from_millis(100)).build().expect("settings");
    let runs = AtomicUsize::new(0);
    let operation = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        let mut value = HashMap::new();
        value.insert((1u8, 2u8), 3u8); // JSON object keys must be strings
        Ok::<_, Failure<String>>(value)
    };
    let first = oncely.run(&key("k"), None, operation).await.expect("the caller gets its value");
    assert_eq!(first.value.get(&(1, 2)), Some(&3));
    tokio::time::sleep(Duration::from_millis(300)).await; // well past the lease
    let retry = oncely.run(&key("k"), None, operation).await;
    assert!(matches!(retry, Err(RunError::Idempotency(Error::NotStored(_)))), "{retry:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A memory store whose `complete` is unreachable until `outage` is switched off (and its
/// `claim` too, with `claims_fail`). `log` records the calls that reached the store.
#[derive(Default)]
struct CompleteOutage {
    inner: MemoryStore,
    outage: std::sync::atomic::AtomicBool,
    claims_fail: std::sync::atomic::AtomicBool,
    attempts: AtomicUsize,
    landed: tokio::sync::Notify,
    log: Mutex<Vec<(&'static str, oncely::StorageKey)>>,
}

impl oncely::Store for CompleteOutage {
    async fn claim(&self, request: &oncely::ClaimRequest<'_>) -> Result<oncely::ClaimOutcome, StoreError> {
        if self.claims_fail.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable("connection refused"));
        }
        self.log.lock().expect("log").push(("claim", *request.storage_key()));
        self.inner.claim(request).await
    }
    async fn complete(
        &self,
        claim: oncely::Claim,
        payload: bytes::Bytes,
        retention: Duration,
    ) -> Result<(), StoreError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.outage.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable("connection refused"));
        }
        self.log.lock().expect("log").push(("complete", claim.storage_key));
        let result = self.inner.complete(claim, payload, retention).await;
        self.landed.notify_one();
        result
    }
    async fn release(&self, claim: oncely::Claim) -> Result<(), StoreError> {
        self.inner.release(claim).await
    }
    async fn touch(&self, claim: oncely::Claim, lease: Duration) -> Result<(), StoreError> {
        self.inner.touch(claim, lease).await
    }
    async fn first_seen(&self, request: &oncely::store::FirstSeen<'_>) -> Result<bool, StoreError> {
        self.inner.first_seen(request).await
    }
    async fn record_hits(&self, hits: &[(oncely::StorageKey, u64)]) -> Result<(), StoreError> {
        self.inner.record_hits(hits).await
    }
}

impl oncely::StoreAdmin for CompleteOutage {
    async fn get(&self, key: &oncely::StorageKey) -> Result<Option<oncely::Record>, StoreError> {
        self.inner.get(key).await
    }
    async fn delete(&self, key: &oncely::StorageKey) -> Result<bool, StoreError> {
        self.inner.delete(key).await
    }
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.inner.purge_expired().await
    }
    async fn stats(&self) -> Result<oncely::StoreStats, StoreError> {
        self.inner.stats().await
    }
}

/// An operation that ran while the store could not record it is recorded once the store
/// answers again, before its lease lapses: the retry replays instead of running it twice.
#[tokio::test]
async fn a_result_the_store_could_not_take_is_stored_when_it_answers_again() {
    let store = Arc::new(CompleteOutage { outage: true.into(), ..CompleteOutage::default() });
    let oncely = Oncely::builder(store.clone()).lease(Duration::from_secs(60)).build().expect("settings");
    let runs = AtomicUsize::new(0);
    let op = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Failure<String>>("charged".to_string())
    };
    let first = oncely.run(&key("outage"), None, op).await.expect("the operation ran and its value is returned");
    assert!(!first.replayed);
    assert_eq!(store.attempts.load(Ordering::SeqCst), 3, "three quick attempts before handing over");

    let landed = store.landed.notified();
    store.outage.store(false, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(10), landed).await.expect("the background retry lands");
    let again = oncely.run(&key("outage"), None, op).await.expect("retry");
    assert!(again.replayed, "the retry replays the result stored late");
    assert_eq!(again.value, "charged");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A store outage longer than the lease: the result the store could not take answers
/// every retry through this engine, and is written before any new claim once the store
/// is back, so a retry can never take the lapsed claim over and run the operation again.
#[tokio::test]
async fn an_outage_longer_than_the_lease_never_runs_an_operation_twice() {
    let store = Arc::new(CompleteOutage { outage: true.into(), ..CompleteOutage::default() });
    let lease = Duration::from_millis(400);
    let oncely = Oncely::builder(store.clone()).lease(lease).build().expect("settings");
    let runs = AtomicUsize::new(0);
    let op = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Failure<String>>("charged".to_string())
    };
    let first = oncely.run(&key("a"), None, op).await.expect("the operation ran and its value is returned");
    assert!(!first.replayed);
    assert_eq!(oncely.deferred_completions().len(), 1, "the result is kept for the store");
    store.claims_fail.store(true, Ordering::SeqCst);

    // While the store is down, the retry is answered from the kept result; other work is
    // refused without running.
    let retry = oncely.run(&key("a"), None, op).await.expect("answered from the kept result");
    assert!(retry.replayed);
    assert_eq!(retry.value, "charged");
    let other = oncely.run(&key("b"), None, op).await;
    assert!(matches!(other, Err(RunError::Idempotency(Error::Store(StoreError::Unavailable(_))))), "{other:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // The outage outlasts the lease: the store alone would let a claim take "a" over.
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    store.outage.store(false, Ordering::SeqCst);
    store.claims_fail.store(false, Ordering::SeqCst);
    let after = oncely.run(&key("a"), None, op).await.expect("retry after the outage");
    assert!(after.replayed, "never run twice");
    let b = oncely.run(&key("b"), None, op).await.expect("new work runs once the store answers");
    assert!(!b.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "a once, b once");
    assert!(oncely.deferred_completions().is_empty());

    let a = oncely.storage_key(&key("a"));
    let b = oncely.storage_key(&key("b"));
    let log = store.log.lock().expect("log").clone();
    let stored_a = log.iter().position(|call| *call == ("complete", a)).expect("a's result reached the store");
    let claimed_b = log.iter().position(|call| *call == ("claim", b)).expect("b was claimed");
    assert!(stored_a < claimed_b, "the kept result is written before any new claim: {log:?}");
    let later_claims_of_a: Vec<usize> =
        log.iter().enumerate().filter(|(_, call)| **call == ("claim", a)).map(|(i, _)| i).skip(1).collect();
    assert!(later_claims_of_a.iter().all(|&i| i > stored_a), "no claim of a before its result landed: {log:?}");
}

/// Duplicates that wait on one key in one process poll the store together: on their
/// timers, one claim per poll interval between them, not one each. Each waiter still
/// claims when it arrives, once more after subscribing, and once when the holder's
/// completion wakes it. Without the sharing, 100 waiters over a 2 s hold at a 100 ms
/// poll interval make about 2,000 timer claims, a load that on a slow store queues the
/// holder's lease renewals until the lease lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_on_one_key_poll_the_store_together() {
    const WAITERS: usize = 100;
    let store = Arc::new(CompleteOutage::default());
    let poll = Duration::from_millis(100);
    let hold = Duration::from_secs(2);
    let oncely = Oncely::builder(store.clone())
        .conflict_mode(ConflictMode::Wait { timeout: Duration::from_secs(30) })
        .poll_interval(poll)
        .build()
        .expect("settings");
    let runs = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(tokio::sync::Notify::new());
    let holder = tokio::spawn({
        let (oncely, runs, started) = (oncely.clone(), runs.clone(), started.clone());
        async move {
            oncely
                .run(&key("busy"), None, || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    started.notify_one();
                    tokio::time::sleep(hold).await;
                    Ok::<_, Failure<String>>("charged".to_string())
                })
                .await
        }
    });
    started.notified().await;
    let waiters: Vec<_> = (0..WAITERS)
        .map(|_| {
            let (oncely, runs) = (oncely.clone(), runs.clone());
            tokio::spawn(async move {
                oncely
                    .run(&key("busy"), None, || async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Failure<String>>("again".to_string())
                    })
                    .await
            })
        })
        .collect();
    assert!(!holder.await.expect("holder").expect("holder runs").replayed);
    for waiter in waiters {
        let answer = waiter.await.expect("waiter").expect("a waiter gets the result");
        assert!(answer.replayed);
        assert_eq!(answer.value, "charged");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let claims = store.log.lock().expect("log").iter().filter(|(call, _)| *call == "claim").count();
    // 1 for the holder, 3 per waiter, and about one timer claim per poll interval.
    let timer_claims = (hold.as_millis() / poll.as_millis()) as usize;
    assert!(claims <= 1 + 3 * WAITERS + 2 * timer_claims, "{claims} claims");
}

#[tokio::test]
async fn a_claim_prepared_by_another_engine_is_sent_with_this_engines_lease() {
    use oncely::{RecordState, Scope, StoreAdmin as _};
    use std::time::SystemTime;

    let store = MemoryStore::new();
    let short = Oncely::builder(store.clone()).lease(Duration::from_secs(1)).build().expect("settings");
    let long = Oncely::builder(store.clone()).lease(Duration::from_secs(600)).build().expect("settings");
    let (alice, bob) = (short.scoped(Scope::new("alice")), long.scoped(Scope::new("bob")));
    let order = key("order-prepared-elsewhere");
    let claim = alice.claim_request(&order, None);
    let Acquired::Execute(guard) = bob.acquire_request(claim).await.expect("claims") else {
        panic!("a new key executes")
    };
    assert_eq!(*guard.storage_key(), bob.storage_key(&order), "claimed in the scope of the engine that sent it");
    let record = store.get(guard.storage_key()).await.expect("reads").expect("the claim's record");
    let RecordState::InProgress { lease_until, .. } = record.state else { panic!("in progress") };
    assert!(lease_until > SystemTime::now() + Duration::from_secs(60), "held for the sending engine's lease");
}

/// A memory store that counts the lease renewals it is sent, and, when told, never
/// answers one (a store that hangs).
struct CountingTouches {
    store: MemoryStore,
    touches: Arc<AtomicUsize>,
    hang_touches: bool,
}

impl oncely::Store for CountingTouches {
    async fn claim(
        &self,
        request: &oncely::store::ClaimRequest<'_>,
    ) -> Result<oncely::store::ClaimOutcome, StoreError> {
        self.store.claim(request).await
    }

    async fn complete(
        &self,
        claim: oncely::store::Claim,
        payload: bytes::Bytes,
        retention: Duration,
    ) -> Result<(), StoreError> {
        self.store.complete(claim, payload, retention).await
    }

    async fn release(&self, claim: oncely::store::Claim) -> Result<(), StoreError> {
        self.store.release(claim).await
    }

    async fn touch(&self, claim: oncely::store::Claim, lease: Duration) -> Result<(), StoreError> {
        self.touches.fetch_add(1, Ordering::SeqCst);
        if self.hang_touches {
            std::future::pending::<()>().await;
        }
        self.store.touch(claim, lease).await
    }

    async fn first_seen(&self, request: &oncely::store::FirstSeen<'_>) -> Result<bool, StoreError> {
        self.store.first_seen(request).await
    }

    async fn record_hits(&self, hits: &[(oncely::StorageKey, u64)]) -> Result<(), StoreError> {
        self.store.record_hits(hits).await
    }

    fn subscribe(&self, key: &oncely::StorageKey) -> oncely::store::Notified {
        self.store.subscribe(key)
    }
}

/// An engine with a 3 s lease (renewed every second) and a 6 s keep-alive ceiling, so
/// `held_until` is 7.5 s after the claim; and the count of its renewals.
fn renewing_engine() -> (Oncely<CountingTouches>, Arc<AtomicUsize>) {
    renewing_engine_with(false)
}

fn renewing_engine_with(hang_touches: bool) -> (Oncely<CountingTouches>, Arc<AtomicUsize>) {
    let touches = Arc::new(AtomicUsize::new(0));
    let store = CountingTouches { store: MemoryStore::new(), touches: Arc::clone(&touches), hang_touches };
    let oncely = Oncely::builder(store)
        .lease(Duration::from_secs(3))
        .keep_alive_ceiling(Duration::from_secs(6))
        .build()
        .expect("settings");
    (oncely, touches)
}

#[tokio::test(start_paused = true)]
async fn a_bounded_keep_alive_renews_until_the_ceiling_and_gives_up_at_held_until() {
    let (oncely, touches) = renewing_engine();
    let guard = executes(&oncely, "slow").await;
    let claimed = tokio::time::Instant::now();
    assert_eq!(guard.held_until(), claimed + Duration::from_millis(7_500));
    let outcome = guard.keep_alive_bounded(std::future::pending::<()>()).await;
    assert_eq!(outcome, None, "an operation still running at held_until is given up");
    assert_eq!(claimed.elapsed(), Duration::from_millis(7_500), "given up at held_until, not before or after");
    assert_eq!(
        touches.load(Ordering::SeqCst),
        5,
        "renewed at 1, 2, 3, 4 and 5 s: every third of a lease before the ceiling"
    );
    guard.abandon();

    // An operation that ends first is waited for, and its output returned.
    let guard = executes(&oncely, "quick").await;
    let started = tokio::time::Instant::now();
    let output = guard.keep_alive_bounded(async {
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        "done"
    });
    assert_eq!(output.await, Some("done"));
    assert_eq!(started.elapsed(), Duration::from_millis(2_500));
    assert_eq!(touches.load(Ordering::SeqCst), 7, "two more renewals, at 1 and 2 s");
    guard.release().await.expect("release");
}

#[tokio::test(start_paused = true)]
async fn an_unbounded_keep_alive_waits_past_held_until_for_its_operation() {
    let (oncely, touches) = renewing_engine();
    let guard = executes(&oncely, "slower").await;
    let claimed = tokio::time::Instant::now();
    let output = guard
        .keep_alive(async {
            tokio::time::sleep(Duration::from_secs(20)).await;
            "late"
        })
        .await;
    assert_eq!(output, "late");
    assert_eq!(claimed.elapsed(), Duration::from_secs(20));
    assert_eq!(touches.load(Ordering::SeqCst), 5, "renewals stop at the ceiling; the wait does not");
    guard.complete("late".into()).await.expect("complete");
}

/// A renewal still running at `held_until` does not hold the bound up: the keep-alive
/// gives up there, as `timeout_at(held_until, ..)` did.
#[tokio::test(start_paused = true)]
async fn a_bounded_keep_alive_gives_up_at_held_until_even_inside_a_hung_renewal() {
    let (oncely, touches) = renewing_engine_with(true);
    let guard = executes(&oncely, "hung").await;
    let claimed = tokio::time::Instant::now();
    // A bound for a failure: without the fix the first renewal hangs forever.
    let outcome = tokio::time::timeout(Duration::from_secs(60), guard.keep_alive_bounded(std::future::pending::<()>()))
        .await
        .expect("the keep-alive gave up at its bound");
    assert_eq!(outcome, None);
    assert_eq!(claimed.elapsed(), Duration::from_millis(7_500));
    assert_eq!(touches.load(Ordering::SeqCst), 1, "the first renewal hung");
    guard.abandon();
}

/// An operation that spends the task's cooperative budget on every poll cannot put the
/// bound off: its timer is polled outside the budget, as `tokio::time::Timeout`'s is.
#[tokio::test]
async fn a_bounded_keep_alive_gives_up_even_when_the_operation_spends_the_budget() {
    let oncely = Oncely::builder(MemoryStore::new())
        .lease(Duration::from_millis(30))
        .keep_alive_ceiling(Duration::from_millis(60))
        .build()
        .expect("settings");
    let guard = executes(&oncely, "busy").await;
    let busy = async {
        loop {
            tokio::task::consume_budget().await;
        }
    };
    let outcome = tokio::time::timeout(Duration::from_secs(30), guard.keep_alive_bounded(busy))
        .await
        .expect("the keep-alive gave up at its bound (75 ms)");
    assert_eq!(outcome, None);
    guard.abandon();
}
