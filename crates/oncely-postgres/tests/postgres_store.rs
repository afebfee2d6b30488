//! What the PostgreSQL store adds to the conformance suite: options and their errors, an
//! outage, expiry in batches, the transactional API and recovery points, and waiters
//! woken across stores (as across processes).

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use oncely::store::{Claim, FirstSeen, StoreErrorKind};
use oncely::{
    Acquired, ClaimOutcome, ConflictMode, Error, IdempotencyKey, Oncely, RecordState, Scope, StorageKey, Store,
    StoreAdmin, StoreError,
};
use oncely_postgres::{PostgresOptions, PostgresStore};
use oncely_testkit::claim_request;
use oncely_testkit::postgres::{PostgresServer, unique_name};
use sqlx_core::executor::Executor;
use sqlx_core::query::query;
use sqlx_core::query_scalar::query_scalar;
use sqlx_core::sql_str::AssertSqlSafe;

const LONG: Duration = Duration::from_secs(60);

fn storage_key(key: &IdempotencyKey) -> StorageKey {
    StorageKey::derive(&Scope::global(), key)
}

/// A new key, claimed: the key and the claim holding it.
async fn claimed(store: &PostgresStore, lease: Duration) -> (IdempotencyKey, Claim) {
    let key = IdempotencyKey::uuid_v4();
    let request = claim_request(&key, None, lease);
    assert_eq!(store.claim(&request).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });
    let claim = request.claim();
    (key, claim)
}

#[tokio::test]
async fn invalid_table_names_are_refused_before_connecting() {
    for bad in ["", "1records", "records; DROP TABLE users", "a-b", "\"quoted\"", "schema.table", &"x".repeat(51)] {
        // Port 1: nothing listens there, so reaching the network would fail differently.
        let result =
            PostgresStore::connect("postgres://postgres@127.0.0.1:1/x", PostgresOptions::default().table(bad)).await;
        assert!(matches!(result, Err(StoreError::InvalidRequest(_))), "{bad:?}: {result:?}");
    }
    let result = PostgresStore::connect("mysql://nope", PostgresOptions::default()).await;
    assert!(matches!(result, Err(StoreError::InvalidRequest(_))), "{result:?}");
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable_not_a_panic() {
    let options = PostgresOptions::default().acquire_timeout(Duration::from_millis(500));
    let result = PostgresStore::connect("postgres://postgres@127.0.0.1:1/x", options).await;
    assert!(matches!(result, Err(StoreError::Unavailable(_))), "{result:?}");
}

#[tokio::test]
async fn a_table_of_another_application_is_refused() {
    let url = common::database_url().await;
    let table = unique_name("other");
    let store = common::fresh_store().await;
    store.pool().execute(AssertSqlSafe(format!("CREATE TABLE {table} (id int)"))).await.expect("create");
    let result = PostgresStore::connect(url, common::fresh_options().table(&table)).await;
    assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
}

#[tokio::test]
async fn connecting_twice_to_one_table_is_repeatable_and_shares_records() {
    let a = common::fresh_store().await;
    let b = PostgresStore::connect(common::database_url().await, common::fresh_options().table(a.table()))
        .await
        .expect("the migration is repeatable");
    let (key, claim) = claimed(&a, LONG).await;
    a.complete(claim, Bytes::from_static(b"r"), LONG).await.expect("complete");
    let outcome = b.claim(&claim_request(&key, None, LONG)).await.expect("claim");
    assert!(matches!(outcome, ClaimOutcome::Replay(ref r) if r.payload == "r"), "{outcome:?}");
}

/// The server goes away under a running store: calls fail with `Unavailable` within the
/// acquire timeout; once it is back, the same store works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_unavailable_and_the_store_recovers() {
    let server = PostgresServer::start().await;
    let url = server.fresh_database().await;
    let options = common::fresh_options().acquire_timeout(Duration::from_secs(1));
    let store = PostgresStore::connect(&url, options).await.expect("connect");
    let (_, claim) = claimed(&store, LONG).await;

    server.stop();
    let started = std::time::Instant::now();
    let new = store.claim(&claim_request(&IdempotencyKey::uuid_v4(), None, LONG)).await;
    assert!(matches!(new, Err(StoreError::Unavailable(_))), "{new:?}");
    assert_eq!(new.map_err(|e| e.kind()).err(), Some(StoreErrorKind::Unavailable), "no connection: nothing was sent");
    let complete = store.complete(claim, Bytes::from_static(b"r"), LONG).await;
    assert!(matches!(complete, Err(StoreError::Unavailable(_))), "{complete:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "failures are prompt: {:?}", started.elapsed());

    server.start_again().await;
    store.complete(claim, Bytes::from_static(b"r"), LONG).await.expect("the claim survived");
    assert_eq!(store.stats().await.expect("stats").completed, 1);
}

/// A claim that finds the holder's lease lapsed would take the key over, so it waits for
/// the row lock of the holder's transaction; past the statement timeout the server
/// cancels it, and the call is a `Timeout` (read from the error's SQLSTATE, 57014), not
/// `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_past_the_statement_timeout_is_a_timeout() {
    let holder = common::fresh_store().await;
    let (key, claim) = claimed(&holder, Duration::from_millis(100)).await;
    let mut tx = holder.pool().begin().await.expect("begin");
    holder.lock_claim(&mut tx, claim).await.expect("the row is locked until the transaction ends");
    tokio::time::sleep(Duration::from_millis(300)).await; // the lease lapses meanwhile

    let options = common::fresh_options().table(holder.table()).statement_timeout(Some(Duration::from_millis(200)));
    let impatient = PostgresStore::connect(common::database_url().await, options).await.expect("connect");
    let started = std::time::Instant::now();
    let claim = impatient.claim(&claim_request(&key, None, LONG)).await;
    assert!(matches!(claim, Err(StoreError::Timeout(_))), "{claim:?}");
    assert_eq!(claim.map_err(|e| e.kind()).err(), Some(StoreErrorKind::Timeout));
    assert!(started.elapsed() < Duration::from_secs(5), "cancelled by the timeout: {:?}", started.elapsed());
    tx.rollback().await.expect("rollback");
}

/// A claim that waited for the row lock (here a holder's `lock_claim` transaction) for
/// longer than a lease, then took the key over, holds it for a whole lease from when it
/// got the row: a lease counted from when it asked would already be over when it answers
/// Acquired, and the next claim would take the key over and run the operation a second
/// time while this one runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_waited_for_the_row_gets_a_whole_lease() {
    let store = common::fresh_store().await;
    let lease = Duration::from_millis(400);
    let (key, claim) = claimed(&store, Duration::from_millis(100)).await;
    let mut tx = store.pool().begin().await.expect("begin");
    store.lock_claim(&mut tx, claim).await.expect("the row is locked until the transaction ends");
    tokio::time::sleep(Duration::from_millis(300)).await; // the holder's lease lapses meanwhile

    let waiting = {
        let (store, key) = (store.clone(), key.clone());
        tokio::spawn(async move { store.claim(&claim_request(&key, None, lease)).await })
    };
    common::until_a_statement_on_waits_for_a_lock(&store).await;
    // The contender waits on the row for longer than its own lease (time passing is what
    // is under test here).
    tokio::time::sleep(lease * 2).await;
    tx.rollback().await.expect("rollback");
    let outcome = waiting.await.expect("task").expect("claim");
    assert_eq!(outcome, ClaimOutcome::Acquired { takeover: true });
    let answered_at = std::time::SystemTime::now();

    let Some(record) = store.get(&storage_key(&key)).await.expect("get") else { panic!("the record is there") };
    let RecordState::InProgress { lease_until, .. } = record.state else { panic!("in progress: {record:?}") };
    assert!(lease_until > answered_at, "the new holder's lease runs from when it got the row, not from when it asked");
    let duplicate = store.claim(&claim_request(&key, None, lease)).await.expect("claim");
    assert!(matches!(duplicate, ClaimOutcome::InProgress { .. }), "the key is held: {duplicate:?}");
}

#[tokio::test]
async fn purge_deletes_in_batches_until_none_is_left() {
    let store =
        PostgresStore::connect(common::database_url().await, common::fresh_options().no_sweeper().sweep_batch(7))
            .await
            .expect("connect");
    let mut live = Vec::new();
    for i in 0..30 {
        let (_, claim) = claimed(&store, LONG).await;
        let retention = if i < 25 { Duration::from_millis(1) } else { LONG };
        store.complete(claim, Bytes::from_static(b"r"), retention).await.expect("complete");
        if retention == LONG {
            live.push(claim.storage_key);
        }
    }
    tokio::time::sleep(Duration::from_millis(20)).await; // the 1 ms retentions pass
    assert_eq!(store.purge_expired().await.expect("purge"), 25, "four batches of 7 and one of 4");
    assert_eq!(store.purge_expired().await.expect("purge"), 0);
    let rows: i64 = query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {}", store.table())))
        .fetch_one(store.pool())
        .await
        .expect("count");
    assert_eq!(rows, 5, "only live rows are left in the table");
    for key in live {
        assert!(store.get(&key).await.expect("get").is_some());
    }
}

#[tokio::test]
async fn the_sweeper_removes_expired_rows_by_itself() {
    let options = common::fresh_options().sweep_interval(Duration::from_millis(100)).sweep_batch(3);
    let store = PostgresStore::connect(common::database_url().await, options).await.expect("connect");
    for _ in 0..10 {
        let (_, claim) = claimed(&store, LONG).await;
        store.complete(claim, Bytes::from_static(b"r"), Duration::from_millis(1)).await.expect("ok");
    }
    let count = AssertSqlSafe(format!("SELECT count(*) FROM {}", store.table()));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rows: i64 = query_scalar(AssertSqlSafe(count.0.clone())).fetch_one(store.pool()).await.expect("count");
        if rows == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{rows} expired rows were never swept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn durations_past_a_thousand_years_are_invalid() {
    let store = common::fresh_store().await;
    let key = IdempotencyKey::uuid_v4();
    let request = claim_request(&key, None, Duration::MAX);
    assert!(matches!(store.claim(&request).await, Err(StoreError::InvalidRequest(_))));
}

/// A rolled-back transaction leaves neither the effect nor the completion; a committed
/// one leaves both.
#[tokio::test]
async fn complete_in_commits_or_rolls_back_with_the_callers_writes() {
    let store = common::fresh_store().await;
    let effects = format!("{}_effects", store.table());
    store.pool().execute(AssertSqlSafe(format!("CREATE TABLE {effects} (k text)"))).await.expect("create");
    let (_, claim) = claimed(&store, LONG).await;

    let mut tx = store.pool().begin().await.expect("begin");
    let locked = store.lock_claim(&mut tx, claim).await.expect("lock");
    assert_eq!((locked.attempt, locked.recovery_point), (1, None));
    query(AssertSqlSafe(format!("INSERT INTO {effects} VALUES ('x')"))).execute(&mut *tx).await.expect("insert");
    store.complete_in(&mut tx, claim, Bytes::from_static(b"r"), LONG).await.expect("complete");
    tx.rollback().await.expect("rollback");
    let rows: i64 = query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {effects}")))
        .fetch_one(store.pool())
        .await
        .expect("count");
    assert_eq!(rows, 0);
    let record = store.get(&claim.storage_key).await.expect("get").expect("record");
    assert!(matches!(record.state, RecordState::InProgress { .. }), "rolled back: still in progress");

    let mut tx = store.pool().begin().await.expect("begin");
    store.lock_claim(&mut tx, claim).await.expect("lock");
    query(AssertSqlSafe(format!("INSERT INTO {effects} VALUES ('x')"))).execute(&mut *tx).await.expect("insert");
    store.complete_in(&mut tx, claim, Bytes::from_static(b"r"), LONG).await.expect("complete");
    tx.commit().await.expect("commit");
    let record = store.get(&claim.storage_key).await.expect("get").expect("record");
    assert!(matches!(record.state, RecordState::Completed { ref payload, .. } if payload == "r"));
}

/// A holder whose lease lapsed and was taken over cannot lock, mark progress or complete
/// in a transaction.
#[tokio::test]
async fn a_fenced_off_holder_gets_lease_lost_in_its_transaction() {
    let store = common::fresh_store().await;
    let (key, old) = claimed(&store, Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        store.claim(&claim_request(&key, None, LONG)).await.expect("claim"),
        ClaimOutcome::Acquired { takeover: true }
    );
    let mut tx = store.pool().begin().await.expect("begin");
    assert!(matches!(store.lock_claim(&mut tx, old).await, Err(StoreError::LeaseLost)));
    assert!(matches!(store.set_recovery_point(&mut tx, old, "x").await, Err(StoreError::LeaseLost)));
    let late = store.complete_in(&mut tx, old, Bytes::from_static(b"late"), LONG).await;
    assert!(matches!(late, Err(StoreError::LeaseLost)), "{late:?}");
}

/// While the holder's transaction holds the record's lock, a claim whose lease check
/// would take the key over waits for the commit and then sees the completion; and the
/// engine's lease renewal does not wait for that transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locked_claim_cannot_be_taken_over_and_renewal_does_not_wait_for_it() {
    let store = common::fresh_store().await;
    let (key, claim) = claimed(&store, Duration::from_millis(100)).await;
    let mut tx = store.pool().begin().await.expect("begin");
    store.lock_claim(&mut tx, claim).await.expect("lock");
    tokio::time::sleep(Duration::from_millis(300)).await; // the lease lapses meanwhile

    let renewal = tokio::time::timeout(Duration::from_secs(5), store.touch(claim, LONG)).await;
    assert!(matches!(renewal, Ok(Ok(()))), "touch skips the locked row: {renewal:?}");

    let (blocked_tx, mut blocked) = tokio::sync::oneshot::channel();
    let contender = {
        let store = store.clone();
        tokio::spawn(async move {
            let outcome = store.claim(&claim_request(&key, None, LONG)).await;
            let _ = blocked_tx.send(());
            outcome
        })
    };
    common::until_a_statement_on_waits_for_a_lock(&store).await;
    assert!(blocked.try_recv().is_err(), "the takeover waits for the holder's transaction");
    store.complete_in(&mut tx, claim, Bytes::from_static(b"mine"), LONG).await.expect("complete");
    tx.commit().await.expect("commit");
    let outcome = contender.await.expect("task").expect("claim");
    assert!(
        matches!(outcome, ClaimOutcome::Replay(ref r) if r.payload == "mine"),
        "the contender replays the holder's result: {outcome:?}"
    );
}

/// A step's transaction that holds the record past the lease is not taken over at its
/// commit: the renewal the engine's keep-alive could not make while the row was locked is
/// made by the step itself (`set_recovery_point` renews the lease), so a claim queued
/// behind the lock finds a live holder. Before, every skipped `touch` answered "renewed"
/// and the queued claim took the key over the moment the step committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_that_outlasts_the_lease_is_not_taken_over_at_its_commit() {
    let store = common::fresh_store().await;
    let (key, claim) = claimed(&store, Duration::from_millis(500)).await;
    let mut tx = store.pool().begin().await.expect("begin");
    store.lock_claim(&mut tx, claim).await.expect("lock");
    tokio::time::sleep(Duration::from_millis(700)).await; // the step runs past the lease

    let contender = {
        let store = store.clone();
        tokio::spawn(async move { store.claim(&claim_request(&key, None, LONG)).await })
    };
    // The contender's claim is queued on the row lock (seen by the server, not guessed).
    common::until_a_statement_on_waits_for_a_lock(&store).await;
    store.set_recovery_point(&mut tx, claim, "step-1").await.expect("recovery point");
    tx.commit().await.expect("commit");
    let outcome = contender.await.expect("task").expect("claim");
    assert!(matches!(outcome, ClaimOutcome::InProgress { .. }), "the holder is alive between steps: {outcome:?}");
    store.touch(claim, LONG).await.expect("still the holder");
}

/// A multi-step operation: step one commits with a recovery point, the process "dies"
/// (its guard is abandoned), and the retry takes over and resumes at step two.
#[tokio::test]
async fn recovery_points_let_a_takeover_resume() {
    let store = common::fresh_store().await;
    let oncely = Oncely::builder(store.clone())
        .lease(Duration::from_millis(200))
        .conflict_mode(ConflictMode::Wait { timeout: Duration::from_secs(10) })
        .poll_interval(Duration::from_millis(50))
        .build()
        .expect("valid settings");
    let key = IdempotencyKey::uuid_v4();

    let Acquired::Execute(first) = oncely.acquire(&key, None).await.expect("acquire") else { panic!("new key") };
    let mut tx = store.pool().begin().await.expect("begin");
    assert_eq!(store.lock_claim(&mut tx, first.claim()).await.expect("lock").recovery_point, None);
    store.set_recovery_point(&mut tx, first.claim(), "stock_reserved").await.expect("point");
    tx.commit().await.expect("commit");
    first.abandon(); // the process dies here

    let Acquired::Execute(retry) = oncely.acquire(&key, None).await.expect("acquire") else {
        panic!("the retry runs the rest of the operation")
    };
    assert!(retry.is_takeover());
    let mut tx = store.pool().begin().await.expect("begin");
    let locked = store.lock_claim(&mut tx, retry.claim()).await.expect("lock");
    assert_eq!(locked.attempt, 2);
    assert_eq!(locked.recovery_point.as_deref(), Some("stock_reserved"));
    let retention = oncely.config().retention;
    store.complete_in(&mut tx, retry.claim(), Bytes::from_static(b"\"confirmed\""), retention).await.expect("complete");
    tx.commit().await.expect("commit");
    retry.finished_elsewhere();
    let Acquired::Replay(replay) = oncely.acquire(&key, None).await.expect("acquire") else {
        panic!("completed: a further retry replays")
    };
    assert_eq!(replay.payload, "\"confirmed\"");
}

/// Releasing a claim that committed a recovery point does not forget the progress: the
/// key is left to the next claim, which takes it over and resumes.
#[tokio::test]
async fn release_after_progress_keeps_the_recovery_point_for_the_next_claim() {
    let store = common::fresh_store().await;
    let (key, claim) = claimed(&store, LONG).await;
    let mut tx = store.pool().begin().await.expect("begin");
    store.set_recovery_point(&mut tx, claim, "charged").await.expect("point");
    tx.commit().await.expect("commit");
    store.release(claim).await.expect("release");
    assert!(matches!(store.release(claim).await, Err(StoreError::LeaseLost)), "released once");

    let request = claim_request(&key, None, LONG);
    assert_eq!(store.claim(&request).await.expect("claim"), ClaimOutcome::Acquired { takeover: true });
    let mut tx = store.pool().begin().await.expect("begin");
    let locked = store.lock_claim(&mut tx, request.claim()).await.expect("lock");
    assert_eq!(locked.recovery_point.as_deref(), Some("charged"));
}

/// Two stores on one table stand for two processes: a waiter on one is woken by the
/// other's completion through NOTIFY, not by polling (its poll interval is an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiter_is_woken_by_another_stores_completion() {
    let a = common::fresh_store().await;
    let b = Arc::new(
        PostgresStore::connect(common::database_url().await, common::fresh_options().table(a.table()))
            .await
            .expect("connect"),
    );
    let (table, pool) = (a.table().to_string(), a.pool().clone());
    let holder = Oncely::builder(a).lease(Duration::from_secs(600)).build().expect("valid");
    let (conflict_tx, mut conflict_rx) = tokio::sync::mpsc::unbounded_channel();
    let waiter = Oncely::builder(b)
        .lease(Duration::from_secs(600))
        .conflict_mode(ConflictMode::Wait { timeout: Duration::from_secs(600) })
        .poll_interval(Duration::from_secs(3600))
        .on_conflict(move |_, _| {
            let _ = conflict_tx.send(());
        })
        .build()
        .expect("valid");
    let key = IdempotencyKey::uuid_v4();
    let Acquired::Execute(guard) = holder.acquire(&key, None).await.expect("acquire") else { panic!("new key") };
    let waiting = {
        let key = key.clone();
        tokio::spawn(async move { waiter.acquire(&key, None).await })
    };
    conflict_rx.recv().await.expect("the waiter met the claim");
    // The waiter's subscription marks the record as waited for once it listens; from
    // then on only a notification can wake it.
    let waited = AssertSqlSafe(format!("SELECT waited FROM {} WHERE storage_key = $1", table));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !query_scalar::<_, bool>(AssertSqlSafe(waited.0.clone()))
        .bind(storage_key(&key).as_bytes().as_slice())
        .fetch_one(&pool)
        .await
        .expect("read the flag")
    {
        assert!(std::time::Instant::now() < deadline, "the waiter never subscribed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    guard.complete(Bytes::from_static(b"from a")).await.expect("complete");
    let woken = tokio::time::timeout(Duration::from_secs(10), waiting).await;
    match woken.expect("woken by NOTIFY, not by the hourly poll").expect("task") {
        Ok(Acquired::Replay(replay)) => assert_eq!(replay.payload, "from a"),
        other => panic!("expected the replay, got {:?}", other.map(|_| ()).map_err(|e: Error| e.to_string())),
    }
}

/// A waiter in wait mode on store `b` (polling only hourly) meets a key held through store
/// `a`; once the waiter has marked the record (before that, a completion would not
/// notify), `a` completes it, and the waiter must be woken and replay: by NOTIFY, or by
/// `b`'s listener waking everyone after a reconnect, never by its poll.
async fn a_waiter_on_b_is_woken_by_a_completion_on_a(a: PostgresStore, b: PostgresStore) {
    let holder = Oncely::builder(a.clone()).lease(Duration::from_secs(600)).build().expect("valid");
    let waiter = Oncely::builder(b)
        .lease(Duration::from_secs(600))
        .conflict_mode(ConflictMode::Wait { timeout: Duration::from_secs(600) })
        .poll_interval(Duration::from_secs(3600))
        .build()
        .expect("valid");
    let key = IdempotencyKey::uuid_v4();
    let Acquired::Execute(guard) = holder.acquire(&key, None).await.expect("acquire") else { panic!("new key") };
    let waiting = {
        let key = key.clone();
        tokio::spawn(async move { waiter.acquire(&key, None).await.map(|a| matches!(a, Acquired::Replay(_))) })
    };
    let table = a.table().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let waited: bool = query_scalar(AssertSqlSafe(format!("SELECT waited FROM {table} WHERE storage_key = $1")))
            .bind(guard.storage_key().as_bytes().as_slice())
            .fetch_one(a.pool())
            .await
            .expect("read the flag");
        if waited {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the waiter never subscribed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    guard.complete(Bytes::from_static(b"done")).await.expect("complete");
    let replayed = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiter is woken without its hourly poll")
        .expect("task")
        .expect("acquire");
    assert!(replayed, "the waiter replays the completion");
}

/// The waiter's listener loses its connection when the server restarts; it reconnects
/// and listens again by itself, so a waiter that subscribes after the restart is still
/// woken by NOTIFY (or by the listener's wake-up of every waiter after reconnecting),
/// not by its hourly poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_are_woken_after_the_listener_reconnects() {
    let server = PostgresServer::start().await;
    let url = server.fresh_database().await;
    let options = common::fresh_options().acquire_timeout(Duration::from_secs(2));
    let a = PostgresStore::connect(&url, options.clone()).await.expect("connect");
    let b = PostgresStore::connect(&url, options.table(a.table())).await.expect("connect");
    // Start b's listener: a subscription on a key nobody holds resolves at once.
    tokio::time::timeout(Duration::from_secs(10), b.subscribe(&storage_key(&IdempotencyKey::uuid_v4())))
        .await
        .expect("the listener starts");

    server.stop();
    server.start_again().await;

    a_waiter_on_b_is_woken_by_a_completion_on_a(a, b).await;
}

/// A flush of hit counts and a repeated first sighting commit without waiting for their
/// WAL flush (counts need not survive a server crash), but the relaxed setting is local
/// to that one statement's transaction: the next statement on the same connection, a
/// completion say, waits for it again.
#[tokio::test]
async fn the_relaxed_commit_of_a_count_does_not_outlive_its_statement() {
    let options = common::fresh_options().max_connections(1);
    let store = PostgresStore::connect(common::database_url().await, options).await.expect("connect");
    let synchronous_commit = || async {
        let setting: String =
            query_scalar("SELECT current_setting('synchronous_commit')").fetch_one(store.pool()).await.expect("show");
        setting
    };
    let (_, claim) = claimed(&store, LONG).await;
    store.complete(claim, Bytes::from_static(b"r"), LONG).await.expect("complete");
    store.record_hits(&[(claim.storage_key, 2)]).await.expect("record_hits");
    assert_eq!(store.get(&claim.storage_key).await.expect("get").expect("record").hits(), 2);
    assert_eq!(synchronous_commit().await, "on", "the one pooled connection is back to the server's setting");

    let (scope, id) = (Scope::new("relaxed"), IdempotencyKey::uuid_v4());
    let seen = FirstSeen::new(&scope, &id, LONG);
    assert!(store.first_seen(&seen).await.expect("first"));
    assert!(!store.first_seen(&seen).await.expect("repeat"));
    assert_eq!(synchronous_commit().await, "on");
}

/// The listener's connection is reset (an RST, not an orderly close): the listener
/// reconnects and the waiter is woken, by the completion's NOTIFY or by the wake-up of
/// every waiter after reconnecting, not by its hourly poll. Before, the dead listener kept
/// the listen pool's only connection and every reconnect timed out, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_are_woken_after_the_listeners_connection_is_reset() {
    use tokio::net::{TcpListener, TcpStream};
    let url = common::database_url().await.to_string();
    let port: u16 = url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("the URL's port");
    let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy_port = proxy.local_addr().expect("addr").port();
    let (reset_tx, reset_rx) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = proxy.accept().await {
            let mut reset = reset_rx.clone();
            reset.borrow_and_update();
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", port)).await else { return };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = reset.changed() => {
                        // Linger zero: closing sends an RST.
                        let _ = client.set_zero_linger();
                    }
                }
            });
        }
    });
    let proxied = url.replace(&format!(":{port}/"), &format!(":{proxy_port}/"));
    let a = common::fresh_store().await;
    let options = common::fresh_options().table(a.table()).acquire_timeout(Duration::from_secs(1));
    let b = PostgresStore::connect(&proxied, options).await.expect("connect through the proxy");
    tokio::time::timeout(Duration::from_secs(10), b.subscribe(&storage_key(&IdempotencyKey::uuid_v4())))
        .await
        .expect("the listener starts");
    reset_tx.send(1).expect("reset every proxied connection");

    a_waiter_on_b_is_woken_by_a_completion_on_a(a, b).await;
}

/// Completing through the guard (the pool) while the holder's own transaction holds the
/// record is refused as a mistake at once, not reported as "unavailable": the engine would
/// have retried that in the background and completed the record after the transaction,
/// and its effect, rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completing_beside_the_holders_own_transaction_is_refused() {
    let store = common::fresh_store().await;
    let effects = format!("{}_fx", store.table());
    store.pool().execute(AssertSqlSafe(format!("CREATE TABLE {effects} (k text)"))).await.expect("create");
    let oncely = Oncely::new(store.clone());
    let key = IdempotencyKey::uuid_v4();
    let Acquired::Execute(guard) = oncely.acquire(&key, None).await.expect("acquire") else { panic!("new key") };
    let claim = guard.claim();
    let mut tx = store.pool().begin().await.expect("begin");
    store.lock_claim(&mut tx, claim).await.expect("lock");
    query(AssertSqlSafe(format!("INSERT INTO {effects} VALUES ('x')"))).execute(&mut *tx).await.expect("effect");
    let wrong = guard.complete(Bytes::from_static(b"\"placed\"")).await; // should be complete_in
    assert!(matches!(wrong, Err(Error::Store(StoreError::InvalidRequest(_)))), "{wrong:?}");
    tx.rollback().await.expect("the caller's `?` rolls back");
    let record = store.get(&claim.storage_key).await.expect("get").expect("the record");
    assert!(matches!(record.state, RecordState::InProgress { .. }), "nothing completed: {record:?}");
    // No background retry was started: the claim is still the holder's to complete.
    store.complete(claim, Bytes::from_static(b"\"placed\""), LONG).await.expect("now it can");
}

/// A reserved word passes the identifier check but cannot name a table: refused as an
/// invalid request at connect, not a syntax error reported as "unavailable".
#[tokio::test]
async fn a_reserved_word_is_refused_as_a_table_name() {
    for reserved in ["order", "user", "select"] {
        let result =
            PostgresStore::connect(common::database_url().await, common::fresh_options().table(reserved)).await;
        assert!(
            matches!(&result, Err(StoreError::InvalidRequest(m)) if m.contains("reserved")),
            "{reserved}: {result:?}"
        );
    }
}

/// A role that may only read and write an existing table starts the store: an existing
/// table and index are checked, not created again (no DDL, so no ownership needed and no
/// table lock queued behind running transactions).
#[tokio::test]
async fn a_role_without_ddl_rights_starts_on_an_existing_table() {
    let owner = common::fresh_store().await;
    let role = unique_name("app");
    let table = owner.table().to_string();
    for statement in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {role}"),
        format!("REVOKE CREATE ON SCHEMA public FROM {role}"),
    ] {
        owner.pool().execute(AssertSqlSafe(statement)).await.expect("set up the role");
    }
    let url = common::database_url().await.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let store = PostgresStore::connect(&url, common::fresh_options().table(&table)).await.expect("the role connects");
    let key = IdempotencyKey::uuid_v4();
    let request = claim_request(&key, None, LONG);
    assert_eq!(store.claim(&request).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });
}
