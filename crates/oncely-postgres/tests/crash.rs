//! Exactly once for database side effects, across a process kill.
//!
//! The test re-runs its own binary as a child, selecting only [`child`] and telling it
//! through environment variables where to connect and where to stop. The child claims a
//! key, writes an *effect row* (the operation's own database write) and completes the key
//! in the same transaction, prints a line at the chosen point, and waits to be killed.
//! The parent SIGKILLs it there, retries the key as a new process would, and counts the
//! effect rows:
//!
//! - killed **before the commit**: neither the effect nor the completion exists; the retry
//!   takes the key over once the child's lease lapses and runs the operation: one row;
//! - killed **after the commit**: both exist; the retry replays the child's result and
//!   writes nothing: one row;
//! - killed **between two steps** of a multi-step operation: the first step's writes and
//!   its recovery point exist; the retry resumes at the second step: one row per step.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use oncely::{Acquired, ConflictMode, IdempotencyKey, Oncely, RecordState, StoreAdmin};
use oncely_postgres::{PgPool, PostgresStore};
use sqlx_core::query::query;
use sqlx_core::query_scalar::query_scalar;
use sqlx_core::sql_str::AssertSqlSafe;

const CHILD_URL: &str = "ONCELY_PG_CRASH_URL";
const CHILD_TABLE: &str = "ONCELY_PG_CRASH_TABLE";
const CHILD_KEY: &str = "ONCELY_PG_CRASH_KEY";
const CHILD_STOP: &str = "ONCELY_PG_CRASH_STOP";
/// The child's lease: how long the parent's retry waits before it may take over.
const CHILD_LEASE: Duration = Duration::from_millis(800);

fn engine(store: PostgresStore, lease: Duration) -> Oncely<PostgresStore> {
    Oncely::builder(store)
        .lease(lease)
        .conflict_mode(ConflictMode::Wait { timeout: Duration::from_secs(30) })
        .poll_interval(Duration::from_millis(100))
        .build()
        .expect("valid settings")
}

/// Inserts one effect row for `key` and `step` in the caller's transaction.
async fn effect(tx: &mut oncely_postgres::PgTransaction<'_>, table: &str, key: &str, step: &str) {
    query(AssertSqlSafe(format!("INSERT INTO {table}_effects (key, step) VALUES ($1, $2)")))
        .bind(key)
        .bind(step)
        .execute(&mut **tx)
        .await
        .expect("effect row");
}

/// The child: does nothing unless [`CHILD_URL`] is set.
#[test]
fn child() {
    let Ok(url) = std::env::var(CHILD_URL) else { return };
    let table = std::env::var(CHILD_TABLE).expect("table");
    let key = IdempotencyKey::new(std::env::var(CHILD_KEY).expect("key")).expect("valid key");
    let stop = std::env::var(CHILD_STOP).expect("stop point");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let store =
            PostgresStore::connect(&url, common::fresh_options().table(&table)).await.expect("the store connects");
        let pool = store.pool().clone();
        let oncely = engine(store.clone(), CHILD_LEASE);
        let Acquired::Execute(guard) = oncely.acquire(&key, None).await.expect("acquire") else {
            panic!("the child is the first to use the key")
        };
        let mut tx = pool.begin().await.expect("begin");
        store.lock_claim(&mut tx, guard.claim()).await.expect("lock");
        effect(&mut tx, &table, key.as_str(), "one").await;
        if stop == "between_steps" {
            store.set_recovery_point(&mut tx, guard.claim(), "one").await.expect("point");
            tx.commit().await.expect("commit step one");
        } else {
            let result = Bytes::from(format!("done by the child, {stop}"));
            store.complete_in(&mut tx, guard.claim(), result, oncely.config().retention).await.expect("complete");
            if stop == "after_commit" {
                tx.commit().await.expect("commit");
            }
        }
        println!("STOPPED {stop}");
        std::future::pending::<()>().await;
    });
}

/// Kills the child if the parent fails before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the child up to `stop` and SIGKILLs it there.
fn run_child_and_kill(url: &str, table: &str, key: &str, stop: &str) {
    let exe = std::env::current_exe().expect("the test binary");
    let child = Command::new(exe)
        .args(["child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_URL, url)
        .env(CHILD_TABLE, table)
        .env(CHILD_KEY, key)
        .env(CHILD_STOP, stop)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let expected = format!("STOPPED {stop}");
    loop {
        match lines.recv_timeout(Duration::from_secs(60)) {
            // libtest writes "test child ... " before the test runs, on the same line.
            Ok(line) if line.ends_with(&expected) => break,
            Ok(_) => {}
            Err(_) => panic!("the child did not reach {stop}"),
        }
    }
    child.0.kill().expect("SIGKILL the child");
    let status = child.0.wait().expect("reap the child");
    assert!(!status.success(), "the child was killed, not finished: {status:?}");
}

struct Setup {
    url: &'static str,
    table: String,
    pool: PgPool,
    store: PostgresStore,
}

async fn setup() -> Setup {
    let url = common::database_url().await;
    let options = common::fresh_options();
    let store = PostgresStore::connect(url, options.clone()).await.expect("connect");
    let table = store.table().to_string();
    let pool = store.pool().clone();
    query(AssertSqlSafe(format!(
        "CREATE TABLE {table}_effects (id serial PRIMARY KEY, key text NOT NULL, step text NOT NULL)"
    )))
    .execute(&pool)
    .await
    .expect("effects table");
    Setup { url, table, pool, store }
}

async fn effects(setup: &Setup, key: &str, step: &str) -> i64 {
    query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {}_effects WHERE key = $1 AND step = $2", setup.table)))
        .bind(key)
        .bind(step)
        .fetch_one(&setup.pool)
        .await
        .expect("count")
}

/// The retry of a new process: completes the key with the effect in one transaction if
/// it gets to run, resuming after `recovery point "one"` when there is one. Returns the
/// key's stored result: the replayed one, or the one it stored.
async fn retry(setup: &Setup, key: &IdempotencyKey) -> Bytes {
    let oncely = engine(setup.store.clone(), Duration::from_secs(30));
    let guard = match oncely.acquire(key, None).await.expect("the retry acquires or replays") {
        Acquired::Replay(replay) => return replay.payload,
        Acquired::Execute(guard) => guard,
    };
    assert!(guard.is_takeover(), "the child's claim is taken over once its lease lapsed");
    let mut tx = setup.pool.begin().await.expect("begin");
    let locked = setup.store.lock_claim(&mut tx, guard.claim()).await.expect("lock");
    assert_eq!(locked.attempt, 2);
    if locked.recovery_point.as_deref() != Some("one") {
        effect(&mut tx, &setup.table, key.as_str(), "one").await;
    }
    effect(&mut tx, &setup.table, key.as_str(), "two").await;
    let result = Bytes::from_static(b"done by the retry");
    setup.store.complete_in(&mut tx, guard.claim(), result, Duration::from_secs(60)).await.expect("complete");
    tx.commit().await.expect("commit");
    guard.finished_elsewhere();
    match oncely.get(key).await.expect("get").expect("the completed record").state {
        RecordState::Completed { payload, .. } => payload,
        RecordState::InProgress { .. } => panic!("not completed"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_before_commit_neither_exists_and_the_retry_runs_once() {
    if std::env::var_os(CHILD_URL).is_some() {
        return;
    }
    let setup = setup().await;
    let key = IdempotencyKey::uuid_v4();
    let (url, table, k) = (setup.url.to_string(), setup.table.clone(), key.as_str().to_string());
    tokio::task::spawn_blocking(move || run_child_and_kill(&url, &table, &k, "before_commit")).await.expect("child");

    assert_eq!(effects(&setup, key.as_str(), "one").await, 0, "the uncommitted effect is gone with the child");
    let record = setup.store.get(&oncely::StorageKey::derive(&oncely::Scope::global(), &key)).await.expect("get");
    assert!(matches!(record.map(|r| r.state), Some(RecordState::InProgress { .. })), "the child's claim remains");

    let outcome = retry(&setup, &key).await;
    assert_eq!(outcome, "done by the retry", "the retry ran the operation");
    assert_eq!(effects(&setup, key.as_str(), "one").await, 1, "the effect exists exactly once");
    let again = retry(&setup, &key).await;
    assert_eq!(again, "done by the retry", "a further retry replays");
    assert_eq!(effects(&setup, key.as_str(), "one").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_commit_the_retry_replays_and_writes_nothing() {
    if std::env::var_os(CHILD_URL).is_some() {
        return;
    }
    let setup = setup().await;
    let key = IdempotencyKey::uuid_v4();
    let (url, table, k) = (setup.url.to_string(), setup.table.clone(), key.as_str().to_string());
    tokio::task::spawn_blocking(move || run_child_and_kill(&url, &table, &k, "after_commit")).await.expect("child");

    let outcome = retry(&setup, &key).await;
    assert_eq!(outcome, "done by the child, after_commit", "the retry replays the child's result");
    assert_eq!(effects(&setup, key.as_str(), "one").await, 1, "the effect exists exactly once");
    assert_eq!(effects(&setup, key.as_str(), "two").await, 0, "the retry did no work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_steps_the_retry_resumes_at_the_next_step() {
    if std::env::var_os(CHILD_URL).is_some() {
        return;
    }
    let setup = setup().await;
    let key = IdempotencyKey::uuid_v4();
    let (url, table, k) = (setup.url.to_string(), setup.table.clone(), key.as_str().to_string());
    tokio::task::spawn_blocking(move || run_child_and_kill(&url, &table, &k, "between_steps")).await.expect("child");

    let storage_key = oncely::StorageKey::derive(&oncely::Scope::global(), &key);
    assert_eq!(setup.store.recovery_point(&storage_key).await.expect("point").as_deref(), Some("one"));
    let outcome = retry(&setup, &key).await;
    assert_eq!(outcome, "done by the retry");
    assert_eq!(effects(&setup, key.as_str(), "one").await, 1, "step one ran once, in the child");
    assert_eq!(effects(&setup, key.as_str(), "two").await, 1, "step two ran once, in the retry");
}
