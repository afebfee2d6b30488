//! The PostgreSQL Oncely store: a shared store on the database you already run, with
//! exactly-once for database side effects.
//!
//! ```no_run
//! use oncely::Oncely;
//! use oncely_postgres::{PostgresOptions, PostgresStore};
//!
//! # async fn start() -> Result<(), oncely::StoreError> {
//! let store = PostgresStore::connect("postgres://app@db.internal/app", PostgresOptions::default()).await?;
//! let oncely = Oncely::new(store);
//! # let _ = oncely; Ok(()) }
//! ```
//!
//! Any number of processes (gateways, workers) may share one table: they see one set of
//! records, one clock (the server's), and each other's completions through
//! `LISTEN/NOTIFY`.
//!
//! # Exactly once for database side effects
//!
//! When the operation's own effect is a write to the same database, no key-value store
//! can close the gap between "did it" and "recorded it": a crash after the effect's commit
//! and before the completion leaves an effect with no record, and the retry does it again.
//! Here the two commit together: the caller runs its writes and the completion in **one
//! transaction of its own** ([`PostgresStore::complete_in`]). If the process dies before
//! the commit, neither exists, and the retry (once the lease lapses) runs the operation
//! again cleanly; after the commit, the retry replays. There is no third case.
//!
//! ```no_run
//! use oncely::{Acquired, IdempotencyKey, Oncely};
//! use oncely_postgres::{PostgresOptions, PostgresStore};
//! use sqlx_core::query::query;
//!
//! # async fn order(pool: sqlx_postgres::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let store = PostgresStore::from_pool(pool.clone(), PostgresOptions::default()).await?;
//! let oncely = Oncely::new(store.clone());
//! let key = IdempotencyKey::new("order-17")?;
//!
//! match oncely.acquire(&key, None).await? {
//!     Acquired::Execute(guard) => {
//!         let mut tx = pool.begin().await?;
//!         // Fenced: fails with LeaseLost if another claim took the key over; from here
//!         // to the commit, nobody can.
//!         store.lock_claim(&mut tx, guard.storage_key(), guard.claim_id()).await?;
//!         query("INSERT INTO orders (id, total) VALUES ('order-17', 1999)").execute(&mut *tx).await?;
//!         let retention = oncely.config().retention;
//!         store.complete_in(&mut tx, guard.storage_key(), guard.claim_id(), "order 17 placed".into(), retention).await?;
//!         tx.commit().await?; // the order and its completion, or neither
//!         guard.finished_elsewhere();
//!     }
//!     Acquired::Replay(record) => { /* the stored result */ let _ = record; }
//! }
//! # Ok(()) }
//! ```
//!
//! With the `sqlx` facade, `&mut tx` is a `&mut sqlx::Transaction<'_, sqlx::Postgres>`:
//! the same type ([`PgTransaction`]). With tokio-postgres or another driver, run the
//! statements of [`PostgresStore::lock_claim`], [`PostgresStore::set_recovery_point`] and
//! [`PostgresStore::complete_in`] (in `src/sql.rs`; the table's schema is documented
//! below) in your own transaction: nothing else is needed.
//!
//! # Recovery points: resuming a multi-step operation
//!
//! An operation of several steps (reserve stock, charge a card through an HTTP API,
//! confirm the order) cannot be one transaction, because a step calls out. Each local
//! step instead commits its writes together with a *recovery point*, a label naming the
//! last step done, in its own transaction ([`PostgresStore::set_recovery_point`], fenced
//! by the claim id). After a crash, the retry's claim takes the key over once the lease
//! lapses (keeping the recovery point) and [`PostgresStore::lock_claim`] hands the label
//! back: the retry skips the steps already committed and resumes at the next. The
//! external call between two local steps should itself be idempotent (pass the provider
//! an idempotency key derived from yours), since a crash after it and before the next
//! commit repeats it. Stripe's engineers describe the pattern for Postgres as "atomic
//! phases"; `examples/order_recovery.rs` runs it against a crash.
//!
//! A record with a recovery point is never deleted by [`Store::release`]: some steps
//! committed, so running the operation from the start would repeat them. Release then
//! lapses the lease at once instead, and the next claim resumes.
//!
//! # Guarantees
//!
//! - **Atomicity.** Every [`Store`] method is one SQL statement in its own transaction
//!   (autocommit), so PostgreSQL's row locks order it against every other call on the
//!   key, from any process. A claim is one `INSERT … ON CONFLICT DO UPDATE … RETURNING`
//!   that decides and applies the outcome under the row's lock and returns the row it
//!   left, including the one that blocked it (the statement is documented at
//!   `Sql::claim` in `src/sql.rs`). `complete`, `release` and `touch` name the claim id
//!   in their `WHERE`, so a fenced-off holder changes nothing and gets
//!   [`StoreError::LeaseLost`].
//! - **Durability.** A call returns after its transaction committed, with the server's
//!   `synchronous_commit` (default `on`: the WAL is flushed to disk first). Killing the
//!   calling process loses nothing acknowledged; with `synchronous_commit = on`, neither
//!   does a crash of the server or its machine. Two outcomes are committed without
//!   waiting for the flush, because nothing depends on them surviving a server crash: a
//!   replay's hit count, and a claim that found the key held and changed nothing (see
//!   `relaxed_unless` in `src/sql.rs`). A new claim, a takeover, a completion, a release
//!   and a first sighting always wait for it. A completion made with
//!   [`PostgresStore::complete_in`] is exactly as durable as the caller's transaction.
//! - **Expiry on every read.** Every statement compares `expires_at` with `now()`; the
//!   sweeper only collects the garbage, in bounded batches.
//! - **Time** is the server's `now()` (the start of the statement's transaction, in
//!   microseconds), so the clocks of the processes sharing the table do not matter.
//!   Durations are rounded up to whole microseconds.
//! - **Waiting.** [`Store::subscribe`] marks the in-progress record as waited for; its
//!   completion, release or deletion then sends `pg_notify` in the same transaction, which
//!   PostgreSQL delivers at commit to the listener of every store on the table, in every
//!   process. Records nobody waits for send nothing: `NOTIFY` makes committing
//!   transactions take turns, cluster-wide. Notifications lost while the listener
//!   reconnects are made up by waking every waiter; the engine polls as the fallback.
//! - **Failures are typed.** An unreachable database, a pool that has no connection to
//!   give within the acquire timeout, a statement timeout: [`StoreError::Unavailable`]
//!   (the HTTP layer answers 503). A row this version cannot read:
//!   [`StoreError::Corrupt`]. Nothing from the network is unwrapped.
//!
//! # Schema
//!
//! One table per store (default `oncely_records`), created by [`PostgresStore::connect`]
//! and [`PostgresStore::from_pool`] with `CREATE TABLE IF NOT EXISTS` (repeatable;
//! concurrent starts take turns on an advisory lock), with an index on `expires_at`:
//!
//! | column | type | |
//! |---|---|---|
//! | `storage_key` | `bytea` primary key | SHA-256 of scope and key |
//! | `key`, `scope` | `text` | for inspection |
//! | `fingerprint` | `bytea` | null when the request had none |
//! | `created_at`, `expires_at` | `timestamptz` | |
//! | `claim_id`, `lease_until` | `uuid`, `timestamptz` | set while in progress |
//! | `payload`, `completed_at` | `bytea`, `timestamptz` | set once completed |
//! | `hits` | `bigint` | replays counted |
//! | `attempt` | `integer` | 1, plus one per takeover |
//! | `recovery_point` | `text` | the last step a multi-step operation committed |
//! | `waited` | `boolean` | someone subscribed: changes notify |

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use oncely::store::Notified;
use oncely::{
    ClaimId, ClaimOutcome, ClaimRequest, IdempotencyKey, Record, RecordState, Scope, StorageKey, Store, StoreError,
    StoreStats,
};
use sqlx_core::executor::Executor;
use sqlx_core::pool::PoolOptions;
use sqlx_core::query::query;
use sqlx_core::query_scalar::query_scalar;
use sqlx_core::row::Row;
use sqlx_core::sql_str::SqlStr;
use sqlx_postgres::{PgConnectOptions, PgListener, PgRow};
pub use sqlx_postgres::{PgPool, PgTransaction, Postgres};
use tokio::task::JoinHandle;

mod codec;
mod sql;
/// Fuzzing only: the table-name check and the time and duration conversions of the codec.
#[cfg(fuzzing)]
#[doc(hidden)]
pub fn fuzz_parts(table: &str, us: i64, d: Duration) -> (Option<String>, Option<std::time::SystemTime>, Option<f64>) {
    (TableName::new(table).ok().map(|t| t.as_str().to_owned()), codec::to_time(us).ok(), micros(d).ok())
}

use codec::{micros, pg_error, read_record, uuid};
use oncely::store::waiters::Waiters;
use sql::{Sql, TableName};

/// The default table.
pub const DEFAULT_TABLE: &str = "oncely_records";

/// Settings for [`PostgresStore::connect`] and [`PostgresStore::from_pool`].
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    table: String,
    max_connections: u32,
    min_connections: u32,
    acquire_timeout: Duration,
    statement_timeout: Option<Duration>,
    sweep_interval: Option<Duration>,
    sweep_batch: u32,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            table: DEFAULT_TABLE.to_string(),
            max_connections: 16,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Some(Duration::from_secs(5)),
            sweep_interval: Some(Duration::from_secs(60)),
            sweep_batch: 1000,
        }
    }
}

impl PostgresOptions {
    /// The table records live in (default `oncely_records`): 1 to 50 letters, digits and
    /// underscores, not starting with a digit; folded to lower case. Stores on different
    /// tables share nothing. An invalid name fails `connect` with
    /// [`StoreError::InvalidRequest`].
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The most connections the pool opens (default 16, at least 1). [`connect`] only:
    /// [`from_pool`] uses the pool as it is. The listener for waiters has a connection of
    /// its own besides, opened at the first wait.
    ///
    /// [`connect`]: PostgresStore::connect
    /// [`from_pool`]: PostgresStore::from_pool
    pub fn max_connections(mut self, connections: u32) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// Connections kept open while idle (default 0). [`connect`](PostgresStore::connect) only.
    pub fn min_connections(mut self, connections: u32) -> Self {
        self.min_connections = connections;
        self
    }

    /// How long a call waits for a connection (including opening one) before failing with
    /// [`StoreError::Unavailable`] (default 5 s). [`connect`](PostgresStore::connect) only.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// The server-side `statement_timeout` of the pool's sessions (default 5 s): a
    /// statement running longer is cancelled and the call fails with
    /// [`StoreError::Unavailable`]. `None` leaves the server's setting; zero, as in
    /// PostgreSQL, disables the timeout (rather than cancelling every statement at once);
    /// anything else is rounded up to whole milliseconds.
    /// [`connect`](PostgresStore::connect) only.
    pub fn statement_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// How often a background task deletes expired records (default 60 s; zero means
    /// never, as [`no_sweeper`](Self::no_sweeper)). Expired records are invisible to every
    /// read whether swept or not.
    pub fn sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_interval = (!every.is_zero()).then_some(every);
        self
    }

    /// No background sweep: expired records stay (invisible) until
    /// [`Store::purge_expired`] or a claim of the same key replaces them.
    pub fn no_sweeper(mut self) -> Self {
        self.sweep_interval = None;
        self
    }

    /// How many expired records one sweep statement deletes (default 1000, at least 1).
    /// Each batch is its own short transaction that skips rows in use, so the sweep never
    /// holds many locks or blocks a request for long.
    pub fn sweep_batch(mut self, records: u32) -> Self {
        self.sweep_batch = records.max(1);
        self
    }
}

/// The PostgreSQL store. Cloning is cheap and shares the pool, the listener and the
/// sweeper, which stop when the last clone is dropped.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    sql: Arc<Sql>,
    waiters: Arc<Waiters>,
    /// One connection of its own for `LISTEN`, opened at the first subscription.
    listen_pool: PgPool,
    /// Serialises starting the listener.
    listen_start: tokio::sync::Mutex<()>,
    listener: Mutex<Option<JoinHandle<()>>>,
    sweeper: Option<JoinHandle<()>>,
    sweep_batch: u32,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.lock().unwrap_or_else(PoisonError::into_inner).take() {
            listener.abort();
        }
        if let Some(sweeper) = self.sweeper.take() {
            sweeper.abort();
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore").field("table", &self.inner.sql.table.as_str()).finish_non_exhaustive()
    }
}

/// The holder's view of its record inside its own transaction, from
/// [`PostgresStore::lock_claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockedClaim {
    /// 1 for the claim that created the record, plus one for each takeover of a lapsed
    /// lease: above 1, an earlier attempt may have done some of the work.
    pub attempt: u32,
    /// The last step an earlier attempt committed with
    /// [`PostgresStore::set_recovery_point`], or `None` to start from the beginning.
    pub recovery_point: Option<String>,
}

impl PostgresStore {
    /// Connects a pool to `url` (`postgres://user:password@host:port/database`, any
    /// option SQLx's `PgConnectOptions` parses), creates the table when missing and starts
    /// the sweeper. Call it inside a Tokio runtime.
    ///
    /// # Errors
    ///
    /// - [`StoreError::InvalidRequest`]: not a `postgres://` or `postgresql://` URL, a
    ///   malformed one, or an invalid table name;
    /// - [`StoreError::Unavailable`]: the server cannot be reached within the acquire
    ///   timeout, or refused the migration (no right to create the table, say);
    /// - [`StoreError::Corrupt`]: a table of that name exists and is not an Oncely table.
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(StoreError::InvalidRequest("not a postgres:// or postgresql:// URL".into()));
        }
        let mut connect: PgConnectOptions = url.parse().map_err(pg_error)?;
        if let Some(timeout) = options.statement_timeout {
            // PostgreSQL reads 0 as "no timeout"; a sub-millisecond one would round down to it.
            let ms = if timeout.is_zero() { 0 } else { timeout.as_nanos().div_ceil(1_000_000) };
            connect = connect.options([("statement_timeout", format!("{ms}ms"))]);
        }
        connect = connect.application_name("oncely");
        let pool = PoolOptions::<Postgres>::new()
            .max_connections(options.max_connections)
            .min_connections(options.min_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect);
        Self::from_pool(pool, options).await
    }

    /// Uses an existing pool (the application's own, say): creates the table when
    /// missing and starts the sweeper. The pool's size and timeouts are the pool's; the
    /// options' pool settings are ignored. Call it inside a Tokio runtime.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn from_pool(pool: PgPool, options: PostgresOptions) -> Result<Self, StoreError> {
        let sql = Arc::new(Sql::new(TableName::new(&options.table)?));
        migrate(&pool, &sql).await?;
        let listen_pool = PoolOptions::<Postgres>::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(pool.options().get_acquire_timeout())
            .connect_lazy_with((*pool.connect_options()).clone());
        let sweeper = options.sweep_interval.map(|every| {
            let (pool, sql, batch) = (pool.clone(), Arc::clone(&sql), options.sweep_batch);
            tokio::spawn(sweep(pool, sql, every, batch))
        });
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                sql,
                waiters: Arc::new(Waiters::default()),
                listen_pool,
                listen_start: tokio::sync::Mutex::new(()),
                listener: Mutex::new(None),
                sweeper,
                sweep_batch: options.sweep_batch,
            }),
        })
    }

    /// The pool the store runs its statements on.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The table the records live in (lower case), which is also the `LISTEN` channel.
    pub fn table(&self) -> &str {
        self.inner.sql.table.as_str()
    }

    fn sql(&self) -> &Sql {
        &self.inner.sql
    }

    /// Locks the record held by `claim_id` in the caller's transaction, until it commits
    /// or rolls back, and returns the attempt number and the last recovery point.
    ///
    /// Call it first in every transaction that does some of the operation's work: it is
    /// the fence. After it returned, no other claim can take the key over until the
    /// transaction ends (a takeover waits for the lock, then finds the completion or a
    /// renewed state), so the writes that follow cannot race a second holder. A claim of
    /// the same key by a duplicate request waits for the transaction too: keep such
    /// transactions short. The engine's lease renewal ([`oncely::ClaimGuard::keep_alive`])
    /// does not wait for this lock (it skips a locked record, which nobody can take over
    /// anyway); instead this call renews the lease, by its length, from the moment it runs,
    /// and so does [`set_recovery_point`](Self::set_recovery_point): call that last in a
    /// step's transaction, so the record a queued claim re-reads at the commit has a live
    /// lease.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] when `claim_id` no longer holds the key (taken over,
    /// released, deleted or expired): roll back, since another holder may be doing the
    /// work. [`StoreError::Unavailable`] when the statement fails.
    pub async fn lock_claim(
        &self,
        tx: &mut PgTransaction<'_>,
        key: &StorageKey,
        claim_id: ClaimId,
    ) -> Result<LockedClaim, StoreError> {
        let row = query(self.sql().hold.clone())
            .bind(key.as_bytes().as_slice())
            .bind(uuid(claim_id))
            .fetch_optional(&mut **tx)
            .await
            .map_err(pg_error)?
            .ok_or(StoreError::LeaseLost)?;
        let attempt: i32 = row.try_get(0).map_err(pg_error)?;
        Ok(LockedClaim {
            attempt: u32::try_from(attempt).map_err(|_| StoreError::Corrupt(format!("attempt {attempt}")))?,
            recovery_point: row.try_get(1).map_err(pg_error)?,
        })
    }

    /// Records that the steps up to `point` are done, in the caller's transaction, so it
    /// commits (or not) with the writes of those steps. A retry that takes the key over
    /// gets `point` back from [`lock_claim`](Self::lock_claim). Any text will do: a step's
    /// name, or JSON carrying what the next step needs. Renews the lease, as `lock_claim`
    /// does.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] when `claim_id` no longer holds the key: roll back.
    pub async fn set_recovery_point(
        &self,
        tx: &mut PgTransaction<'_>,
        key: &StorageKey,
        claim_id: ClaimId,
        point: &str,
    ) -> Result<(), StoreError> {
        let done = query(self.sql().set_recovery_point.clone())
            .bind(key.as_bytes().as_slice())
            .bind(uuid(claim_id))
            .bind(point)
            .execute(&mut **tx)
            .await
            .map_err(pg_error)?;
        if done.rows_affected() == 1 { Ok(()) } else { Err(StoreError::LeaseLost) }
    }

    /// Completes the operation held by `claim_id` inside the caller's transaction: the
    /// result is stored, and waiters notified, when the transaction commits, together
    /// with every other write in it; if it rolls back or the process dies first, the
    /// record stays in progress (and its lease lapses) as if the operation never ran.
    ///
    /// The completion's times are the transaction's `now()`: its start. After the
    /// commit, finish the engine's guard with [`oncely::ClaimGuard::finished_elsewhere`].
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] when `claim_id` no longer holds the key: roll back, since
    /// another holder owns the operation now.
    pub async fn complete_in(
        &self,
        tx: &mut PgTransaction<'_>,
        key: &StorageKey,
        claim_id: ClaimId,
        payload: Bytes,
        retention: Duration,
    ) -> Result<(), StoreError> {
        complete_on(&mut **tx, self.sql().complete.clone(), key, claim_id, payload, retention).await
    }

    /// The recovery point of the live record at `key`, for inspection. Holders read it
    /// with [`lock_claim`](Self::lock_claim), inside their transaction.
    pub async fn recovery_point(&self, key: &StorageKey) -> Result<Option<String>, StoreError> {
        let row = query(self.sql().recovery_point.clone())
            .bind(key.as_bytes().as_slice())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(pg_error)?;
        match row {
            Some(row) => row.try_get(0).map_err(pg_error),
            None => Ok(None),
        }
    }

    /// Starts the listener unless it runs; afterwards, every notification on the table's
    /// channel committed from now on reaches [`Waiters`].
    async fn ensure_listening(&self) -> Result<(), StoreError> {
        let running = |inner: &Inner| {
            inner.listener.lock().unwrap_or_else(PoisonError::into_inner).as_ref().is_some_and(|h| !h.is_finished())
        };
        if running(&self.inner) {
            return Ok(());
        }
        let _starting = self.inner.listen_start.lock().await;
        if running(&self.inner) {
            return Ok(());
        }
        let channel = self.table().to_string();
        let listener = listen(&self.inner.listen_pool, &channel).await?;
        let task =
            tokio::spawn(dispatch(listener, self.inner.listen_pool.clone(), channel, self.inner.waiters.clone()));
        *self.inner.listener.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        Ok(())
    }
}

/// Creates the table and its index when missing, in one transaction under an advisory
/// lock, checking on the way that a table already there has the columns this version uses.
async fn migrate(pool: &PgPool, sql: &Sql) -> Result<(), StoreError> {
    // A reserved word (`order`, `user`) passes the identifier check but cannot name a table
    // unquoted: say so, rather than fail the migration with a syntax error (a 503).
    let reserved: bool =
        query_scalar("SELECT EXISTS (SELECT 1 FROM pg_get_keywords() WHERE word = $1 AND catcode IN ('R', 'T'))")
            .bind(sql.table.as_str())
            .fetch_one(pool)
            .await
            .map_err(pg_error)?;
    if reserved {
        return Err(StoreError::InvalidRequest(format!(
            "table name {:?} is a reserved word in PostgreSQL; choose another",
            sql.table.as_str()
        )));
    }
    // Already there (the usual start): check the columns and change nothing. No DDL, so no
    // table lock queued behind running transactions, and a role with only the rights to
    // read and write the table can start the store.
    let t = sql.table.as_str();
    let present: bool = query_scalar("SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL")
        .bind(t)
        .bind(format!("{t}_by_expiry"))
        .fetch_one(pool)
        .await
        .map_err(pg_error)?;
    if present {
        return match pool.execute(sql.check_columns.clone()).await {
            Ok(_) => Ok(()),
            Err(sqlx_core::Error::Database(e)) if e.code().as_deref() == Some("42703") => {
                Err(StoreError::Corrupt(format!("table {t} exists but is not an Oncely records table: {e}")))
            }
            Err(e) => Err(pg_error(e)),
        };
    }
    let mut tx = pool.begin().await.map_err(pg_error)?;
    for statement in &sql.migrate {
        match (&mut *tx).execute(statement.clone()).await {
            Ok(_) => {}
            Err(sqlx_core::Error::Database(e)) if e.code().as_deref() == Some("42703") => {
                return Err(StoreError::Corrupt(format!(
                    "table {} exists but is not an Oncely records table: {e}",
                    sql.table.as_str()
                )));
            }
            Err(e) => return Err(pg_error(e)),
        }
    }
    tx.commit().await.map_err(pg_error)
}

/// The completion statement on any executor: the pool, or the caller's transaction.
async fn complete_on<'e, E: Executor<'e, Database = Postgres>>(
    executor: E,
    statement: SqlStr,
    key: &StorageKey,
    claim_id: ClaimId,
    payload: Bytes,
    retention: Duration,
) -> Result<(), StoreError> {
    let row = query(statement)
        .bind(key.as_bytes().as_slice())
        .bind(uuid(claim_id))
        .bind(payload.as_ref())
        .bind(micros(retention)?)
        .fetch_one(executor)
        .await
        .map_err(pg_error)?;
    held(&row)
}

/// `LeaseLost` unless the fenced statement's first column (rows changed) is 1.
fn held(row: &PgRow) -> Result<(), StoreError> {
    let changed: i64 = row.try_get(0).map_err(pg_error)?;
    if changed == 1 {
        return Ok(());
    }
    // The completion's third column: not changed, yet still held → the row was locked.
    match row.try_get::<bool, _>(2) {
        Ok(true) => Err(StoreError::unavailable(LOCKED)),
        _ => Err(StoreError::LeaseLost),
    }
}

/// What `complete_on` answers for a row locked by another transaction.
const LOCKED: &str = "the record is locked by another transaction";

/// A listener on `channel`, its `LISTEN` in effect.
async fn listen(pool: &PgPool, channel: &str) -> Result<PgListener, StoreError> {
    let mut listener = PgListener::connect_with(pool).await.map_err(pg_error)?;
    listener.listen(channel).await.map_err(pg_error)?;
    Ok(listener)
}

/// The listener task: wakes the waiters of each key notified; after the connection was
/// lost, reconnects, listens again, and wakes every waiter (notifications in between are
/// lost, so each re-checks its key).
// How waiters are woken across processes. A subscription resolves on every change committed to its key, by any process
// sharing the table, after the subscription's check (see `PostgresStore::subscribe`)
// marked the record as waited for: the change's statement sends `pg_notify` in its own
// transaction, PostgreSQL delivers it at commit to every session that `LISTEN`s on the
// table's channel, and this store's listener task calls `Waiters::wake` for its key.
// The check runs only after the listener's `LISTEN` is in effect, and a `Notified`
// receives every `notify_waiters` issued after its creation, polled or not, so no wake
// can fall between a subscription and its first poll.
//
// Notifications are not queued for a session that is not connected: when the
// listener's connection is lost, the listener reconnects, `LISTEN`s again and then wakes
// every waiter (`Waiters::wake_all`), which re-checks its key; a change committed in
// the gap is seen then. The engine also polls, so a waiter is never stranded.
//
// The map holds an entry only while someone subscribes: a wake removes it, and the last
// subscription of a key to be dropped removes it too.
async fn dispatch(listener: PgListener, pool: PgPool, channel: String, waiters: Arc<Waiters>) {
    let mut backoff = Duration::from_millis(50);
    let mut listener = Some(listener);
    while let Some(current) = listener.as_mut() {
        match current.try_recv().await {
            Ok(Some(notification)) => {
                backoff = Duration::from_millis(50);
                if let Some(key) = StorageKey::from_hex(notification.payload()) {
                    waiters.wake(&[key]);
                }
            }
            // The connection was lost and has been re-established (LISTEN included).
            Ok(None) => waiters.wake_all(),
            Err(error) => {
                tracing::warn!(%error, %channel, "the PostgreSQL store's listener lost its connection; reconnecting");
                waiters.wake_all();
                // The old listener may still hold the listen pool's only connection (sqlx
                // keeps it after a connection reset): drop it before asking for a new one,
                // or every reconnect would time out waiting for that connection.
                drop(listener.take());
                loop {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    match listen(&pool, &channel).await {
                        Ok(fresh) => {
                            listener = Some(fresh);
                            break;
                        }
                        Err(error) => tracing::debug!(%error, "the listener cannot reconnect yet"),
                    }
                }
                waiters.wake_all();
            }
        }
    }
}

/// Deletes expired records, a bounded batch per statement, until a batch finds fewer
/// than it may take. Returns how many were deleted.
async fn purge(pool: &PgPool, sql: &Sql, batch: u32) -> Result<u64, StoreError> {
    let mut purged = 0;
    loop {
        let done = query(sql.purge_batch.clone()).bind(i64::from(batch)).execute(pool).await.map_err(pg_error)?;
        purged += done.rows_affected();
        if done.rows_affected() < u64::from(batch) {
            return Ok(purged);
        }
        // Let other work at the pool between two batches.
        tokio::task::yield_now().await;
    }
}

/// The sweeper task.
async fn sweep(pool: PgPool, sql: Arc<Sql>, every: Duration, batch: u32) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match purge(&pool, &sql, batch).await {
            Ok(0) => {}
            Ok(purged) => tracing::debug!(purged, table = sql.table.as_str(), "swept expired records"),
            Err(error) => tracing::warn!(%error, table = sql.table.as_str(), "sweeping expired records failed"),
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    /// One statement (see `Sql::claim`); the outcome is read off the row it returns.
    async fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        let lease = micros(request.lease.max(Duration::from_millis(1)))?;
        let retention = micros(request.retention)?.max(lease);
        let row = query(self.sql().claim.clone())
            .bind(request.storage_key.as_bytes().as_slice())
            .bind(request.key.as_str())
            .bind(request.scope.as_str())
            .bind(request.fingerprint.as_ref().map(|fingerprint| fingerprint.as_bytes().as_slice()))
            .bind(uuid(request.claim_id))
            .bind(lease)
            .bind(retention)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(pg_error)?;
        let (record, attempt) = read_record(&row)?;
        Ok(match record.state {
            RecordState::InProgress { claim_id, .. } if claim_id == request.claim_id => {
                ClaimOutcome::Acquired { takeover: attempt > 1 }
            }
            _ if record.fingerprint != request.fingerprint => ClaimOutcome::Mismatch(record),
            RecordState::Completed { .. } => ClaimOutcome::Completed(record),
            RecordState::InProgress { .. } => ClaimOutcome::InProgress(record),
        })
    }

    async fn complete(
        &self,
        key: &StorageKey,
        claim_id: ClaimId,
        payload: Bytes,
        retention: Duration,
    ) -> Result<(), StoreError> {
        // A duplicate's claim or a waiter's mark locks the row for microseconds: a few
        // short retries. A row still locked after them is held by a transaction, the
        // holder's own: completing beside it is a mistake, reported as one (not as
        // "unavailable", which the engine would retry in the background).
        let mut pause = Duration::from_millis(1);
        for _ in 0..7 {
            match complete_on(&self.inner.pool, self.sql().complete.clone(), key, claim_id, payload.clone(), retention)
                .await
            {
                Err(StoreError::Unavailable(e)) if e.to_string() == LOCKED => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                other => return other,
            }
        }
        Err(StoreError::InvalidRequest(
            "the record is locked by a transaction (the holder's own, from lock_claim): complete it inside that \
             transaction with complete_in"
                .into(),
        ))
    }

    /// Removes the record; one with a recovery point is kept with its lease lapsed, so
    /// the next claim takes it over and resumes (see the crate docs).
    async fn release(&self, key: &StorageKey, claim_id: ClaimId) -> Result<(), StoreError> {
        let row = query(self.sql().release.clone())
            .bind(key.as_bytes().as_slice())
            .bind(uuid(claim_id))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(pg_error)?;
        held(&row)
    }

    /// Renews the lease. A record locked by its holder's own transaction (see
    /// [`PostgresStore::lock_claim`]) is not waited for: after a few short retries (a
    /// duplicate's claim locks the row for microseconds) this answers Ok without renewing.
    /// That is safe because no claim can take over a locked record, and the holder's
    /// transaction renews the lease itself (`lock_claim` and `set_recovery_point` extend it
    /// by the lease length from their own clock), so the row a queued claim re-reads at
    /// the commit has a live lease.
    async fn touch(&self, key: &StorageKey, claim_id: ClaimId, lease: Duration) -> Result<(), StoreError> {
        let lease = micros(lease.max(Duration::from_millis(1)))?;
        let mut pause = Duration::from_millis(1);
        for _ in 0..6 {
            let row = query(self.sql().touch.clone())
                .bind(key.as_bytes().as_slice())
                .bind(uuid(claim_id))
                .bind(lease)
                .fetch_one(&self.inner.pool)
                .await
                .map_err(pg_error)?;
            let renewed: i64 = row.try_get(0).map_err(pg_error)?;
            let still_held: bool = row.try_get(1).map_err(pg_error)?;
            match (renewed, still_held) {
                (1, _) => return Ok(()),
                (_, false) => return Err(StoreError::LeaseLost),
                _ => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
        Ok(())
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        let row = query(self.sql().get.clone())
            .bind(key.as_bytes().as_slice())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(pg_error)?;
        row.map(|row| read_record(&row).map(|(record, _)| record)).transpose()
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let row = query(self.sql().delete.clone())
            .bind(key.as_bytes().as_slice())
            .fetch_one(&self.inner.pool)
            .await
            .map_err(pg_error)?;
        row.try_get(0).map_err(pg_error)
    }

    /// Deletes expired records now, in batches of the sweep batch size.
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        purge(&self.inner.pool, self.sql(), self.inner.sweep_batch).await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let row = query(self.sql().stats.clone()).fetch_one(&self.inner.pool).await.map_err(pg_error)?;
        let records: i64 = row.try_get(0).map_err(pg_error)?;
        let in_progress: i64 = row.try_get(1).map_err(pg_error)?;
        let count = |n: i64| u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("a count of {n}")));
        Ok(StoreStats {
            records: count(records)?,
            in_progress: count(in_progress)?,
            completed: count(records - in_progress)?,
        })
    }

    /// `SELECT 1` on a pooled connection: never a count of the table.
    async fn ping(&self) -> Result<(), StoreError> {
        query("SELECT 1").execute(&self.inner.pool).await.map(|_| ()).map_err(pg_error)
    }

    async fn first_seen(
        &self,
        storage_key: &StorageKey,
        key: &IdempotencyKey,
        scope: &Scope,
        window: Duration,
    ) -> Result<bool, StoreError> {
        let row = query(self.sql().first_seen.clone())
            .bind(storage_key.as_bytes().as_slice())
            .bind(key.as_str())
            .bind(scope.as_str())
            .bind(micros(window)?)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(pg_error)?;
        row.try_get(0).map_err(pg_error)
    }

    /// One indexed range scan in storage-key order.
    async fn list(&self, after: Option<StorageKey>, limit: usize) -> Result<Vec<Record>, StoreError> {
        let after = after.map(|key| key.as_bytes().to_vec()).unwrap_or_default();
        let rows = query(self.sql().list.clone())
            .bind(after)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(pg_error)?;
        rows.iter().map(|row| read_record(row).map(|(record, _)| record)).collect()
    }

    /// Registers the waiter at once; when first polled, makes sure the listener is
    /// listening, then marks the record as waited for in one statement that also tells
    /// whether a live claim holds it. A change committed before that statement shows in
    /// its answer (the future resolves at once when nothing is in progress, or when the
    /// statement fails: waiters re-check); a change committed after it notifies, and the
    /// listener, listening already, wakes the waiter. If the listener cannot be started,
    /// the future never resolves and the engine polls.
    fn subscribe(&self, key: &StorageKey) -> Notified {
        let subscription = self.inner.waiters.subscribe(*key);
        let store = self.clone();
        let key = *key;
        Box::pin(async move {
            if let Err(error) = store.ensure_listening().await {
                tracing::debug!(%error, "no PostgreSQL listener; the engine polls instead");
                return std::future::pending().await;
            }
            let waiting = query(store.sql().subscribe.clone())
                .bind(key.as_bytes().as_slice())
                .fetch_optional(&store.inner.pool)
                .await;
            if let Ok(Some(_)) = waiting {
                subscription.await;
            }
        })
    }
}
