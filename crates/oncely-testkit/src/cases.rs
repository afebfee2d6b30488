//! The conformance cases, one public function each. [`store_conformance!`](crate::store_conformance)
//! runs them all; each takes a fresh, empty store.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use oncely::{
    Acquired, ClaimOutcome, ConflictMode, Error, Failure, Fingerprint, Oncely, RecordState, RunError, Scope,
    StorageKey, Store, StoreAdmin, StoreError,
};
use tokio::sync::{Barrier, mpsc};

use crate::{claim_request, claim_request_in, unique_key};

/// A lease long enough that no test machine's stall lets it lapse by accident.
const LONG: Duration = Duration::from_secs(60);
/// A lease or retention short enough to wait out in a test. A loaded machine can take
/// longer than this between two store calls, so no case asserts that something given
/// `SHORT` is still live unless it timed the calls (see [`touch_extends_the_lease`]).
const SHORT: Duration = Duration::from_millis(400);
/// Sleeping this long lets a [`SHORT`] lease or retention lapse (time passing is the
/// thing under test here; nothing signals it).
const PAST_SHORT: Duration = Duration::from_millis(700);
/// The longest any signalled wait may take before the case fails instead of hanging.
const HANG: Duration = Duration::from_secs(20);

fn fp(text: &str) -> Option<Fingerprint> {
    Some(Fingerprint::from_bytes(text.as_bytes()))
}

async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(HANG, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what} did not happen within {HANG:?}"),
    }
}

fn payload_of(outcome: &ClaimOutcome) -> Bytes {
    match outcome {
        ClaimOutcome::Replay(replay) => replay.payload.clone(),
        other => panic!("expected a replay, got {other:?}"),
    }
}

/// 64 tasks claim one absent key at the same instant: exactly one acquires, every other
/// sees it in progress; after completion all 64 see the one result.
pub async fn concurrent_claimers_acquire_once<S: Store + StoreAdmin>(store: S) {
    const TASKS: usize = 64;
    let store = Arc::new(store);
    let key = unique_key();
    let start = Arc::new(Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (store, start, key) = (store.clone(), start.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let request = claim_request(&key, fp("same"), LONG);
            start.wait().await;
            (request.claim(), store.claim(&request).await.expect("claim succeeds"))
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.expect("task completes") {
            (claim, ClaimOutcome::Acquired { takeover: false }) => winners.push(claim),
            (_, ClaimOutcome::InProgress { .. }) => {}
            (_, other) => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one of {TASKS} concurrent claims acquires the key");

    store.complete(winners[0], Bytes::from_static(b"the one result"), LONG).await.expect("winner completes");
    for _ in 0..TASKS {
        let outcome = store.claim(&claim_request(&key, fp("same"), LONG)).await.expect("claim succeeds");
        assert_eq!(payload_of(&outcome), Bytes::from_static(b"the one result"));
    }
}

/// 100 callers of `Oncely::run` with one key at once (reject mode): the operation runs
/// once; every caller either gets its value (run or replayed) or a conflict.
pub async fn engine_runs_once_among_concurrent_callers<S: Store + StoreAdmin>(store: S) {
    const TASKS: usize = 100;
    let oncely = Oncely::builder(store).conflict_mode(ConflictMode::Reject).build().expect("valid settings");
    let key = unique_key();
    let executions = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (oncely, key, executions, start) = (oncely.clone(), key.clone(), executions.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            oncely
                .run(&key, None, || async {
                    executions.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    Ok::<_, Failure<String>>(42u32)
                })
                .await
        }));
    }
    for task in tasks {
        match task.await.expect("task completes") {
            Ok(executed) => assert_eq!(executed.value, 42),
            Err(RunError::Idempotency(Error::Conflict { retry_after })) => {
                assert!(retry_after >= Duration::from_secs(1))
            }
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(executions.load(Ordering::SeqCst), 1);
}

/// 1,000 tasks over 10 keys in wait mode: exactly 10 operations run, and every task sees
/// its key's one result.
pub async fn thousand_tasks_over_ten_keys_run_ten_operations<S: Store + StoreAdmin>(store: S) {
    const TASKS: usize = 1000;
    const KEYS: usize = 10;
    let oncely =
        Oncely::builder(store).conflict_mode(ConflictMode::Wait { timeout: HANG }).build().expect("valid settings");
    let keys: Vec<_> = (0..KEYS).map(|_| unique_key()).collect();
    let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    let start = Arc::new(Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let slot = i % KEYS;
        let (oncely, key, runs, start) = (oncely.clone(), keys[slot].clone(), runs.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let executed = oncely
                .run(&key, None, || async move {
                    runs[slot].fetch_add(1, Ordering::SeqCst);
                    // Stay in progress across a few scheduler turns so duplicates meet it.
                    for _ in 0..10 {
                        tokio::task::yield_now().await;
                    }
                    Ok::<_, Failure<String>>(format!("result of key {slot}: {}", uuid::Uuid::new_v4()))
                })
                .await
                .expect("every task gets its key's result");
            (slot, executed.value)
        }));
    }
    let mut seen: HashMap<usize, String> = HashMap::new();
    for task in tasks {
        let (slot, value) = task.await.expect("task completes");
        let first = seen.entry(slot).or_insert_with(|| value.clone());
        assert_eq!(*first, value, "every task with key {slot} sees the same result");
    }
    assert_eq!(seen.len(), KEYS);
    for (slot, count) in runs.iter().enumerate() {
        assert_eq!(count.load(Ordering::SeqCst), 1, "key {slot} ran exactly once");
    }
}

/// A replay hands back the stored payload byte for byte: every byte value, an empty
/// payload, and a large one (1 MiB).
pub async fn replay_returns_stored_bytes_exactly<S: Store + StoreAdmin>(store: S) {
    replay_returns_stored_bytes_exactly_up_to(store, 1 << 20).await
}

/// [`replay_returns_stored_bytes_exactly`] with the large payload `large` bytes long: for
/// a store whose results are bounded, at its bound.
pub async fn replay_returns_stored_bytes_exactly_up_to<S: Store + StoreAdmin>(store: S, large: usize) {
    let every_byte: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let large: Vec<u8> = (0..large as u32).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    for payload in [Bytes::from(every_byte), Bytes::new(), Bytes::from(large)] {
        let key = unique_key();
        let request = claim_request(&key, None, LONG);
        let claim = request.claim();
        assert_eq!(store.claim(&request).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });
        store.complete(claim, payload.clone(), LONG).await.expect("complete");
        let replayed = payload_of(&store.claim(&claim_request(&key, None, LONG)).await.expect("claim"));
        assert_eq!(replayed.len(), payload.len());
        assert!(replayed == payload, "replayed bytes equal stored bytes");
    }
}

/// A replay reports the record's own expiry: the retention its holder completed with (two
/// minutes here), not the retention the replaying claim asks for (an hour). A replay
/// cache relies on it to end its copy with the record.
pub async fn replay_reports_the_expiry_its_holder_completed_with<S: Store + StoreAdmin>(store: S) {
    let retention = Duration::from_secs(120);
    let key = unique_key();
    let request = claim_request(&key, None, LONG);
    let (storage_key, claim) = (*request.storage_key(), request.claim());
    store.claim(&request).await.expect("claim");
    store.complete(claim, Bytes::from_static(b"done"), retention).await.expect("complete");
    let ClaimOutcome::Replay(replay) = store.claim(&claim_request(&key, None, LONG)).await.expect("claim") else {
        panic!("a completed record replays");
    };
    let record = store.get(&storage_key).await.expect("get").expect("record exists");
    assert_eq!(replay.expires_at, record.expires_at, "the replay's expiry is the record's");
    let lived = replay.expires_at.duration_since(replay.completed_at).expect("expires after completing");
    // The stores' clocks and their resolution (DynamoDB and Redis keep milliseconds) leave a
    // little slack; the claimer's hour is far outside it.
    assert!(lived.abs_diff(retention) < Duration::from_secs(5), "lived {lived:?}, completed with {retention:?}");
}

/// A key reused with another fingerprint is a mismatch, whether the record is in
/// progress or completed, and no hit is counted.
pub async fn fingerprint_mismatch_is_reported_without_a_hit<S: Store + StoreAdmin>(store: S) {
    let key = unique_key();
    let request = claim_request(&key, fp("A"), LONG);
    let (storage_key, claim) = (*request.storage_key(), request.claim());
    store.claim(&request).await.expect("claim");

    let in_progress = store.claim(&claim_request(&key, fp("B"), LONG)).await.expect("claim");
    assert!(matches!(in_progress, ClaimOutcome::Mismatch), "{in_progress:?}");

    store.complete(claim, Bytes::from_static(b"A's result"), LONG).await.expect("complete");
    for other in [fp("B"), None] {
        let outcome = store.claim(&claim_request(&key, other, LONG)).await.expect("claim");
        assert!(matches!(outcome, ClaimOutcome::Mismatch), "{outcome:?}");
    }
    let record = store.get(&storage_key).await.expect("get").expect("record exists");
    assert_eq!(record.hits(), 0, "a mismatch counts no hit");
    assert_eq!(payload_of(&store.claim(&claim_request(&key, fp("A"), LONG)).await.expect("claim")), "A's result");
}

/// Once a holder's lease lapses, the next claim takes the key over with a new claim id,
/// and the old holder's complete, release and touch are all rejected.
pub async fn lapsed_lease_is_taken_over_and_old_holder_fenced<S: Store + StoreAdmin>(store: S) {
    let key = unique_key();
    let old = claim_request(&key, fp("x"), SHORT);
    let (storage_key, old_claim) = (*old.storage_key(), old.claim());
    store.claim(&old).await.expect("claim");

    tokio::time::sleep(PAST_SHORT).await;
    let new = claim_request(&key, fp("x"), LONG);
    let new_id = new.claim_id();
    assert_eq!(store.claim(&new).await.expect("claim"), ClaimOutcome::Acquired { takeover: true });

    assert!(matches!(store.touch(old_claim, LONG).await, Err(StoreError::LeaseLost)));
    assert!(matches!(store.complete(old_claim, Bytes::from_static(b"late"), LONG).await, Err(StoreError::LeaseLost)));
    assert!(matches!(store.release(old_claim).await, Err(StoreError::LeaseLost)));

    let record = store.get(&storage_key).await.expect("get").expect("the new holder's record");
    assert!(matches!(record.state, RecordState::InProgress { claim_id, .. } if claim_id == new_id));
    store.complete(new.claim(), Bytes::from_static(b"new"), LONG).await.expect("new holder completes");
    assert_eq!(payload_of(&store.claim(&claim_request(&key, fp("x"), LONG)).await.expect("claim")), "new");
}

/// An operation that runs for several leases keeps its key: the engine renews the lease,
/// so every duplicate meanwhile is a conflict, and the operation runs once.
pub async fn keep_alive_prevents_takeover_of_live_holder<S: Store + StoreAdmin>(store: S) {
    let lease = Duration::from_millis(900);
    // Reject mode: each probe must find the key held at once, not wait for it.
    let oncely = Oncely::builder(Arc::new(store))
        .lease(lease)
        .conflict_mode(ConflictMode::Reject)
        .build()
        .expect("valid settings");
    let key = unique_key();
    let executions = Arc::new(AtomicUsize::new(0));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = {
        let (oncely, key, executions) = (oncely.clone(), key.clone(), executions.clone());
        tokio::spawn(async move {
            oncely
                .run(&key, None, || async move {
                    executions.fetch_add(1, Ordering::SeqCst);
                    let _ = started_tx.send(());
                    let _ = finish_rx.await;
                    Ok::<_, Failure<String>>("slow result".to_string())
                })
                .await
        })
    };
    within("the slow operation starting", started_rx).await.expect("operation started");
    // Probe for four leases' worth of time: every probe must find the key held.
    let probes_until = tokio::time::Instant::now() + lease * 4;
    while tokio::time::Instant::now() < probes_until {
        let probe = oncely.run(&key, None, || async { Ok::<_, Failure<String>>("duplicate".to_string()) }).await;
        assert!(
            matches!(probe, Err(RunError::Idempotency(Error::Conflict { .. }))),
            "a duplicate during a live operation is a conflict, got {probe:?}"
        );
        tokio::time::sleep(lease / 6).await;
    }
    finish_tx.send(()).expect("holder waits");
    let executed = within("the slow operation", holder).await.expect("task").expect("holder succeeds");
    assert_eq!(executed.value, "slow result");
    assert_eq!(executions.load(Ordering::SeqCst), 1);
}

/// `touch` renews a lease: a key touched with a long lease is not taken over after its
/// first, short lease would have lapsed.
///
/// The touch must land inside the short lease. When the machine is too slow for that
/// (the claim and the touch took longer than [`SHORT`]), the attempt proves nothing and
/// is made again with a new key.
pub async fn touch_extends_the_lease<S: Store + StoreAdmin>(store: S) {
    for _ in 0..5 {
        let key = unique_key();
        let request = claim_request(&key, None, SHORT);
        let claim = request.claim();
        let started = tokio::time::Instant::now();
        store.claim(&request).await.expect("claim");
        let touched = store.touch(claim, LONG).await;
        if started.elapsed() >= SHORT {
            continue;
        }
        touched.expect("holder touches inside its lease");
        tokio::time::sleep(PAST_SHORT).await;
        let outcome = store.claim(&claim_request(&key, None, LONG)).await.expect("claim");
        assert!(matches!(outcome, ClaimOutcome::InProgress { .. }), "touched lease still holds: {outcome:?}");
        return;
    }
    panic!("five claims and touches each took longer than {SHORT:?}");
}

/// A released key is claimable at once; through the engine, a released failure lets the
/// next call run the operation again.
pub async fn release_lets_the_next_caller_run<S: Store + StoreAdmin>(store: S) {
    let store = Arc::new(store);
    let key = unique_key();
    let request = claim_request(&key, None, LONG);
    let (storage_key, claim) = (*request.storage_key(), request.claim());
    store.claim(&request).await.expect("claim");
    store.release(claim).await.expect("release");
    assert!(store.get(&storage_key).await.expect("get").is_none(), "a released record is gone");
    assert_eq!(
        store.claim(&claim_request(&key, None, LONG)).await.expect("claim"),
        ClaimOutcome::Acquired { takeover: false }
    );

    let oncely = Oncely::new(store);
    let key = unique_key();
    let attempts = AtomicUsize::new(0);
    for expected in 1..=2 {
        let result = oncely
            .run(&key, None, || async {
                attempts.fetch_add(1, Ordering::SeqCst);
                Err::<u32, _>(Failure::Release("provider down".to_string()))
            })
            .await;
        assert!(matches!(result, Err(RunError::Failed { replayed: false, .. })));
        assert_eq!(attempts.load(Ordering::SeqCst), expected);
    }
}

/// A completed record lives for its retention and not longer: after it, the key is new.
///
/// The read inside the retention must land inside it. When the machine is too slow for
/// that (the completion and the read took longer than [`SHORT`]), the attempt proves
/// nothing and is made again with a new key, as in [`touch_extends_the_lease`].
pub async fn retention_expiry_makes_the_key_new_again<S: Store + StoreAdmin>(store: S) {
    for _ in 0..5 {
        let key = unique_key();
        let request = claim_request(&key, None, LONG);
        let (storage_key, claim) = (*request.storage_key(), request.claim());
        store.claim(&request).await.expect("claim");
        let completed = tokio::time::Instant::now();
        store.complete(claim, Bytes::from_static(b"r"), SHORT).await.expect("complete");
        let present = store.get(&storage_key).await.expect("get").is_some();
        if completed.elapsed() >= SHORT {
            continue;
        }
        assert!(present, "a record inside its retention is read");
        tokio::time::sleep(PAST_SHORT).await;
        assert!(store.get(&storage_key).await.expect("get").is_none(), "an expired record is absent to reads");
        assert_eq!(
            store.claim(&claim_request(&key, None, LONG)).await.expect("claim"),
            ClaimOutcome::Acquired { takeover: false }
        );
        return;
    }
    panic!("five completions and reads each took longer than {SHORT:?}");
}

/// A replay is a read: the claim that finds a completed record changes nothing (its
/// hit count stays), `get` counts nothing, and the hits the engine counted reach the store
/// through `record_hits`, summed, once flushed.
pub async fn replays_write_nothing_and_hits_are_flushed<S: Store + StoreAdmin>(store: S) {
    let key = unique_key();
    let request = claim_request(&key, None, LONG);
    let (storage_key, claim) = (*request.storage_key(), request.claim());
    store.claim(&request).await.expect("claim");
    store.complete(claim, Bytes::from_static(b"r"), LONG).await.expect("complete");
    for _ in 0..5 {
        match store.claim(&claim_request(&key, None, LONG)).await.expect("claim") {
            ClaimOutcome::Replay(replay) => assert_eq!(replay.hits, 0, "a replay counts nothing in the store"),
            other => panic!("expected a replay, got {other:?}"),
        }
    }
    assert_eq!(store.get(&storage_key).await.expect("get").expect("record").hits(), 0);

    store.record_hits(&[(storage_key, 3), (storage_key, 2)]).await.expect("record_hits");
    let absent = StorageKey::derive(&Scope::global(), &unique_key());
    store.record_hits(&[(absent, 7)]).await.expect("hits of an absent key are skipped");
    assert!(store.get(&absent).await.expect("get").is_none(), "record_hits creates nothing");
    assert_eq!(store.get(&storage_key).await.expect("get").expect("record").hits(), 5);
    match store.claim(&claim_request(&key, None, LONG)).await.expect("claim") {
        ClaimOutcome::Replay(replay) => assert_eq!(replay.hits, 5),
        other => panic!("expected a replay, got {other:?}"),
    }

    // In progress: nothing to count.
    let held = unique_key();
    let request = claim_request(&held, None, LONG);
    store.claim(&request).await.expect("claim");
    store.record_hits(&[(*request.storage_key(), 4)]).await.expect("record_hits");
    assert_eq!(store.get(request.storage_key()).await.expect("get").expect("record").hits(), 0);
}

/// The engine counts replays in the process and flushes them: within the flush
/// interval by itself, and at once on `flush_hits` (what a graceful shutdown calls), so
/// that a second engine on the same store (another process) sees every replay.
pub async fn engine_hits_reach_the_store<S: Store + StoreAdmin>(store: S) {
    let store = Arc::new(store);
    let oncely =
        Oncely::builder(store.clone()).hit_flush_interval(Duration::from_millis(50)).build().expect("valid settings");
    let key = unique_key();
    let run = || oncely.run(&key, None, || async { Ok::<_, Failure<String>>(1) });
    run().await.expect("first run");
    for _ in 0..3 {
        assert!(run().await.expect("replay").replayed);
    }
    // Flushed by the interval, without any call: wait for the store to show it.
    let storage_key = StorageKey::derive(&Scope::global(), &key);
    within("the flusher writing 3 hits", async {
        loop {
            if store.get(&storage_key).await.expect("get").expect("record").hits() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // A graceful shutdown: counts flushed on demand, long before the interval.
    let slow = Oncely::builder(store.clone()).hit_flush_interval(Duration::from_secs(3600)).build().expect("valid");
    let (tx, rx) = std::sync::mpsc::channel();
    let hooked = Oncely::builder(store.clone())
        .hit_flush_interval(Duration::from_secs(3600))
        .on_hit(move |_, replay| {
            let _ = tx.send(replay.hits);
        })
        .build()
        .expect("valid settings");
    for _ in 0..2 {
        assert!(slow.run(&key, None, || async { Ok::<_, Failure<String>>(2) }).await.expect("replay").replayed);
    }
    assert_eq!(store.get(&storage_key).await.expect("get").expect("record").hits(), 3, "not flushed yet");
    slow.flush_hits().await.expect("flush");
    assert_eq!(store.get(&storage_key).await.expect("get").expect("record").hits(), 5);
    assert!(hooked.run(&key, None, || async { Ok::<_, Failure<String>>(3) }).await.expect("replay").replayed);
    assert_eq!(rx.recv().expect("the hook ran"), 6, "the hook sees the stored count plus this replay");
}

/// Set up a holder and a waiter in wait mode whose only wake-up can be the store's
/// notification (the poll interval and the lease are far longer than the test).
async fn holder_and_waiter<S: Store + StoreAdmin>(
    store: S,
) -> (oncely::ClaimGuard<Arc<S>>, tokio::task::JoinHandle<Result<Acquired<Arc<S>>, Error>>) {
    let store = Arc::new(store);
    let holder = Oncely::builder(store.clone()).lease(Duration::from_secs(600)).build().expect("valid settings");
    let (conflict_tx, mut conflict_rx) = mpsc::unbounded_channel();
    let waiter = Oncely::builder(store)
        .lease(Duration::from_secs(600))
        .conflict_mode(ConflictMode::Wait { timeout: Duration::from_secs(600) })
        .poll_interval(Duration::from_secs(3600))
        .on_conflict(move |_, _| {
            let _ = conflict_tx.send(());
        })
        .build()
        .expect("valid settings");
    let key = unique_key();
    let Acquired::Execute(guard) = holder.acquire(&key, None).await.expect("acquire") else {
        panic!("a new key is executed")
    };
    let waiting = tokio::spawn(async move { waiter.acquire(&key, None).await });
    within("the waiter meeting the claim", conflict_rx.recv()).await.expect("hook fires");
    (guard, waiting)
}

/// A waiter in wait mode is woken by the completion, not by polling, and replays it.
pub async fn waiters_are_woken_on_completion<S: Store + StoreAdmin>(store: S) {
    let (guard, waiting) = holder_and_waiter(store).await;
    guard.complete(Bytes::from_static(b"done")).await.expect("complete");
    match within("the waiter being woken by completion", waiting).await.expect("task").expect("acquire") {
        Acquired::Replay(replay) => assert_eq!(replay.payload, "done"),
        Acquired::Execute(_) => panic!("the waiter must replay the completed result"),
    }
}

/// A waiter in wait mode is woken by a release and then runs the operation itself.
pub async fn waiters_are_woken_on_release<S: Store + StoreAdmin>(store: S) {
    let (guard, waiting) = holder_and_waiter(store).await;
    guard.release().await.expect("release");
    match within("the waiter being woken by release", waiting).await.expect("task").expect("acquire") {
        Acquired::Execute(guard) => guard.release().await.expect("release"),
        Acquired::Replay(_) => panic!("nothing was completed"),
    }
}

/// `first_seen` is true once per window and false for repeats inside it; after the
/// window the id is new again.
///
/// The repeats use a long window and the lapse a short one, so a slow machine can only
/// make the short window lapse sooner, never break an assertion.
pub async fn first_seen_inside_and_outside_its_window<S: Store + StoreAdmin>(store: S) {
    let oncely = Oncely::new(store);
    let repeated = unique_key();
    assert!(oncely.first_seen(&repeated, LONG).await.expect("first_seen"));
    assert!(!oncely.first_seen(&repeated, LONG).await.expect("first_seen"));
    assert!(!oncely.first_seen(&repeated, LONG).await.expect("first_seen"));
    assert!(oncely.first_seen(&unique_key(), LONG).await.expect("first_seen"), "another id is new");

    let id = unique_key();
    assert!(oncely.first_seen(&id, SHORT).await.expect("first_seen"));
    tokio::time::sleep(PAST_SHORT).await;
    assert!(oncely.first_seen(&id, LONG).await.expect("first_seen"), "seen again after the window");
    assert!(oncely.forget_seen(&id).await.expect("forget_seen"), "the mark is removed");
    assert!(!oncely.forget_seen(&id).await.expect("forget_seen"), "nothing left to forget");
    assert!(oncely.first_seen(&id, LONG).await.expect("first_seen"), "a forgotten id is new");
    // A message id and an idempotency key with the same text never meet.
    let executed = oncely.run(&id, None, || async { Ok::<_, Failure<String>>(1u8) }).await.expect("run");
    assert!(!executed.replayed);
}

/// `purge_expired` removes expired records and leaves live ones.
pub async fn purge_removes_only_expired_records<S: Store + StoreAdmin>(store: S) {
    let mut live = Vec::new();
    for i in 0..10 {
        let key = unique_key();
        let request = claim_request(&key, None, LONG);
        let (storage_key, claim) = (*request.storage_key(), request.claim());
        store.claim(&request).await.expect("claim");
        let retention = if i % 2 == 0 { SHORT } else { LONG };
        store.complete(claim, Bytes::from_static(b"r"), retention).await.expect("complete");
        if retention == LONG {
            live.push(storage_key);
        }
    }
    tokio::time::sleep(PAST_SHORT).await;
    let purged = store.purge_expired().await.expect("purge");
    assert!(purged <= 5, "purged {purged} records but only 5 had expired");
    assert_eq!(store.stats().await.expect("stats").records, 5);
    for storage_key in live {
        assert!(store.get(&storage_key).await.expect("get").is_some(), "a live record survives the purge");
    }
}

/// `stats` counts unexpired records by state.
pub async fn stats_count_records_by_state<S: Store + StoreAdmin>(store: S) {
    for i in 0..5 {
        let key = unique_key();
        let request = claim_request(&key, None, LONG);
        let claim = request.claim();
        store.claim(&request).await.expect("claim");
        if i < 2 {
            store.complete(claim, Bytes::from_static(b"r"), LONG).await.expect("complete");
        }
    }
    let key = unique_key();
    let request = claim_request(&key, None, LONG);
    let claim = request.claim();
    store.claim(&request).await.expect("claim");
    store.complete(claim, Bytes::from_static(b"r"), SHORT).await.expect("complete");
    tokio::time::sleep(PAST_SHORT).await;
    let stats = store.stats().await.expect("stats");
    assert_eq!(stats, oncely::StoreStats { records: 5, in_progress: 3, completed: 2 });
}

/// `delete` removes a record whatever its state; its holder is fenced off and the key is
/// new again.
pub async fn delete_removes_and_fences_the_holder<S: Store + StoreAdmin>(store: S) {
    let key = unique_key();
    let request = claim_request(&key, None, LONG);
    let (storage_key, claim) = (*request.storage_key(), request.claim());
    store.claim(&request).await.expect("claim");
    assert!(store.delete(&storage_key).await.expect("delete"));
    assert!(!store.delete(&storage_key).await.expect("delete"), "nothing left to delete");
    assert!(matches!(store.complete(claim, Bytes::from_static(b"r"), LONG).await, Err(StoreError::LeaseLost)));
    assert_eq!(
        store.claim(&claim_request(&key, None, LONG)).await.expect("claim"),
        ClaimOutcome::Acquired { takeover: false }
    );
}

/// A record keeps the raw key, the scope and the fingerprint for inspection.
pub async fn records_keep_raw_key_and_scope<S: Store + StoreAdmin>(store: S) {
    let scope = Scope::new("tenant-7");
    let key = unique_key();
    let request = claim_request_in(&scope, &key, fp("body"), LONG, LONG);
    let storage_key = *request.storage_key();
    store.claim(&request).await.expect("claim");
    let record = store.get(&storage_key).await.expect("get").expect("record");
    assert_eq!(record.storage_key, storage_key);
    assert_eq!(record.key, key);
    assert_eq!(record.scope, scope);
    assert_eq!(record.fingerprint, fp("body"));
    assert!(record.created_at <= record.expires_at);
    assert!(matches!(record.state, RecordState::InProgress { .. }));
    assert!(store.get(&StorageKey::derive(&Scope::new("tenant-8"), &key)).await.expect("get").is_none());
}

/// Two scopes using the same key run two operations and never see each other's results.
pub async fn scopes_never_share_records<S: Store + StoreAdmin>(store: S) {
    let oncely = Oncely::new(store);
    let key = unique_key();
    let alice = oncely.scoped(Scope::new("alice"));
    let bob = oncely.scoped(Scope::new("bob"));
    let a = alice.run(&key, None, || async { Ok::<_, Failure<String>>("alice's".to_string()) }).await.expect("run");
    let b = bob.run(&key, None, || async { Ok::<_, Failure<String>>("bob's".to_string()) }).await.expect("run");
    assert!(!a.replayed && !b.replayed, "each scope runs its own operation");
    let again = alice.run(&key, None, || async { Ok::<_, Failure<String>>("never".to_string()) }).await.expect("run");
    assert_eq!(again.value, "alice's");
    assert!(again.replayed);
}

/// `subscribe` resolves at once when the record is absent or completed (nothing to wait
/// for), and stays pending while a live claim holds the key.
///
/// The contract lets a subscription wake when the record only *may* have changed (a
/// dropped connection wakes every waiter so each re-checks), so an early wake under a
/// loaded machine is tolerated, twice at most and only while the record is still in
/// progress: a store that resolves every subscription at once still fails.
pub async fn subscribe_resolves_at_once_when_nothing_is_in_progress<S: Store + StoreAdmin>(store: S) {
    const SPURIOUS_WAKES_ALLOWED: usize = 2;
    let key = unique_key();
    let request = claim_request(&key, None, LONG);
    let (storage_key, claim) = (*request.storage_key(), request.claim());
    within("subscribe on an absent key", store.subscribe(&storage_key)).await;

    store.claim(&request).await.expect("claim");
    let mut early_wakes = 0;
    let held = loop {
        let mut held = store.subscribe(&storage_key);
        if tokio::time::timeout(Duration::from_millis(50), &mut held).await.is_err() {
            break held;
        }
        let record = store.get(&storage_key).await.expect("get").expect("the claim's record");
        assert!(matches!(record.state, RecordState::InProgress { .. }), "nothing changed the record");
        early_wakes += 1;
        assert!(early_wakes <= SPURIOUS_WAKES_ALLOWED, "a live claim: nothing to wake for yet");
    };

    store.complete(claim, Bytes::from_static(b"r"), LONG).await.expect("complete");
    within("the earlier subscription after completion", held).await;
    within("subscribe on a completed key", store.subscribe(&storage_key)).await;
}
