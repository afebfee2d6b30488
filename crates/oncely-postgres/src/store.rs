//! The store itself: [`PostgresStore`], its connection pool and background tasks, and
//! its [`Store`] and [`StoreAdmin`] implementations, one SQL statement per call.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use oncely::store::waiters::Waiters;
use oncely::store::{Claim, FirstSeen, Notified, Replay, StoreAdmin};
use oncely::{ClaimOutcome, ClaimRequest, Record, StorageKey, Store, StoreError, StoreStats};
use sqlx_core::executor::Executor;
use sqlx_core::pool::PoolOptions;
use sqlx_core::query::query;
use sqlx_core::row::Row;
use sqlx_core::sql_str::SqlStr;
use sqlx_postgres::{PgConnectOptions, PgPool, PgRow, Postgres};
use tokio::task::JoinHandle;

use crate::PostgresOptions;
use crate::codec::{micros, read_record, to_time, uuid};
use crate::error::pg_error;
use crate::migrate::migrate;
use crate::sql::{Sql, TableName};
use crate::sweeper::{purge, sweep};

/// The PostgreSQL store. Cloning is cheap and shares the pool, the listener and the
/// sweeper, which stop when the last clone is dropped.
#[derive(Clone)]
pub struct PostgresStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) pool: PgPool,
    pub(crate) sql: Arc<Sql>,
    pub(crate) waiters: Arc<Waiters>,
    /// One connection of its own for `LISTEN`, opened at the first subscription.
    pub(crate) listen_pool: PgPool,
    /// Serialises starting the listener.
    pub(crate) listen_start: tokio::sync::Mutex<()>,
    pub(crate) listener: Mutex<Option<JoinHandle<()>>>,
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

/// Installs rustls's ring provider as the process default, unless one is installed.
///
/// SQLx builds its TLS configuration with ring explicitly, except in one place: with
/// `sslmode=verify-ca` its verifier (a `WebPkiServerVerifier` that skips the name check)
/// takes rustls's process-default provider. rustls picks that by itself only when one
/// provider is compiled in; a binary that also holds the AWS SDK (aws-lc-rs) has two, and
/// the connection attempt would panic. A provider the application installed first is kept.
/// Called before the pool opens its first connection (it connects lazily, in
/// [`PostgresStore::from_pool`]'s migration at the earliest).
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
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
        install_crypto_provider();
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

    pub(crate) fn sql(&self) -> &Sql {
        &self.inner.sql
    }
}

/// The completion statement on any executor: the pool, or the caller's transaction.
pub(crate) async fn complete_on<'e, E: Executor<'e, Database = Postgres>>(
    executor: E,
    statement: SqlStr,
    claim: Claim,
    payload: Bytes,
    retention: Duration,
) -> Result<Fenced, StoreError> {
    let row = query(statement)
        .bind(claim.storage_key.as_bytes().as_slice())
        .bind(uuid(claim.claim_id))
        .bind(payload.as_ref())
        .bind(micros(retention)?)
        .fetch_one(executor)
        .await
        .map_err(pg_error)?;
    fenced(&row)
}

/// What a statement fenced by the claim id did, when the claim still holds the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fenced {
    /// The change was made.
    Done,
    /// Nothing changed: another transaction holds the row's lock (the statement skips
    /// locked rows rather than wait for them).
    Locked,
}

impl Fenced {
    /// `Ok` when done; a row still locked is [`StoreError::Unavailable`], with
    /// [`RecordLocked`] as its source.
    pub(crate) fn done(self) -> Result<(), StoreError> {
        match self {
            Self::Done => Ok(()),
            Self::Locked => Err(StoreError::unavailable(RecordLocked)),
        }
    }
}

/// The record is locked by another transaction.
#[derive(Debug)]
pub(crate) struct RecordLocked;

impl fmt::Display for RecordLocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the record is locked by another transaction")
    }
}

impl std::error::Error for RecordLocked {}

/// Reads a fenced statement's answer: its first column is the rows changed; `LeaseLost`
/// unless that is 1 or the third column (when the statement has one) says the claim
/// still holds the record, which was then locked.
fn fenced(row: &PgRow) -> Result<Fenced, StoreError> {
    let changed: i64 = row.try_get(0).map_err(pg_error)?;
    if changed == 1 {
        return Ok(Fenced::Done);
    }
    match row.try_get::<bool, _>(2) {
        Ok(true) => Ok(Fenced::Locked),
        _ => Err(StoreError::LeaseLost),
    }
}

impl Store for PostgresStore {
    /// One statement (see `Sql::claim`): a plain read that answers a replay, a mismatch
    /// or a live claim without writing, and an upsert only when the key may be acquired.
    /// The outcome is read off the one row it returns.
    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        let lease = micros(request.lease().max(Duration::from_millis(1)))?;
        let retention = micros(request.retention())?.max(lease);
        let row = query(self.sql().claim.clone())
            .bind(request.storage_key().as_bytes().as_slice())
            .bind(request.key().as_str())
            .bind(request.scope().as_str())
            .bind(request.fingerprint().map(|fingerprint| fingerprint.as_bytes().as_slice()))
            .bind(uuid(request.claim_id()))
            .bind(lease)
            .bind(retention)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(pg_error)?;
        let column = |index: usize| row.try_get::<bool, _>(index).map_err(pg_error);
        let (mine, same, completed) = (column(0)?, column(1)?, column(2)?);
        let time = |index: usize| -> Result<SystemTime, StoreError> {
            let micros: Option<i64> = row.try_get(index).map_err(pg_error)?;
            to_time(micros.ok_or_else(|| StoreError::Corrupt(format!("a claim's column {index} is null")))?)
        };
        Ok(if mine {
            let attempt: i32 = row.try_get(7).map_err(pg_error)?;
            ClaimOutcome::Acquired { takeover: attempt > 1 }
        } else if !same {
            ClaimOutcome::Mismatch
        } else if completed {
            let payload: Option<Vec<u8>> = row.try_get(3).map_err(pg_error)?;
            let hits: i64 = row.try_get(5).map_err(pg_error)?;
            ClaimOutcome::Replay(Replay {
                payload: Bytes::from(
                    payload.ok_or_else(|| StoreError::Corrupt("a completed record with no payload".into()))?,
                ),
                completed_at: time(4)?,
                hits: u64::try_from(hits).map_err(|_| StoreError::Corrupt(format!("a hit count of {hits}")))?,
                expires_at: time(9)?,
            })
        } else {
            ClaimOutcome::InProgress { lease_until: time(6)? }
        })
    }

    async fn complete(&self, claim: Claim, payload: Bytes, retention: Duration) -> Result<(), StoreError> {
        // A claim that found the lease lapsed, or a waiter's mark, locks the row for
        // microseconds: a few short retries. A row still locked after them is held by a transaction, the
        // holder's own: completing beside it is a mistake, reported as one (not as
        // "unavailable", which the engine would retry in the background).
        let mut pause = Duration::from_millis(1);
        for _ in 0..7 {
            match complete_on(&self.inner.pool, self.sql().complete.clone(), claim, payload.clone(), retention).await? {
                Fenced::Done => return Ok(()),
                Fenced::Locked => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
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
    async fn release(&self, claim: Claim) -> Result<(), StoreError> {
        let row = query(self.sql().release.clone())
            .bind(claim.storage_key.as_bytes().as_slice())
            .bind(uuid(claim.claim_id))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(pg_error)?;
        fenced(&row)?.done()
    }

    /// Renews the lease. A record locked by its holder's own transaction (see
    /// [`PostgresStore::lock_claim`]) is not waited for: after a few short retries (a
    /// claim racing a takeover locks the row for microseconds) this answers Ok without
    /// renewing. That is safe because no claim can take over a locked record, and the
    /// holder's transaction renews the lease itself (`lock_claim` and
    /// `set_recovery_point` extend it by the lease length from their own clock), so the
    /// row a queued claim re-reads at the commit has a live lease.
    async fn touch(&self, claim: Claim, lease: Duration) -> Result<(), StoreError> {
        let lease = micros(lease.max(Duration::from_millis(1)))?;
        let mut pause = Duration::from_millis(1);
        for _ in 0..6 {
            let row = query(self.sql().touch.clone())
                .bind(claim.storage_key.as_bytes().as_slice())
                .bind(uuid(claim.claim_id))
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

    async fn first_seen(&self, request: &FirstSeen<'_>) -> Result<bool, StoreError> {
        let row = query(self.sql().first_seen.clone())
            .bind(request.storage_key().as_bytes().as_slice())
            .bind(request.key().as_str())
            .bind(request.scope().as_str())
            .bind(micros(request.window())?)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(pg_error)?;
        row.try_get(0).map_err(pg_error)
    }

    /// The whole batch in one statement (see `Sql::record_hits`); an empty batch sends
    /// nothing.
    async fn record_hits(&self, hits: &[(StorageKey, u64)]) -> Result<(), StoreError> {
        if hits.is_empty() {
            return Ok(());
        }
        let keys: Vec<&[u8]> = hits.iter().map(|(key, _)| key.as_bytes().as_slice()).collect();
        let counts: Vec<i64> = hits.iter().map(|(_, n)| i64::try_from(*n).unwrap_or(i64::MAX)).collect();
        query(self.sql().record_hits.clone())
            .bind(keys)
            .bind(counts)
            .execute(&self.inner.pool)
            .await
            .map(|_| ())
            .map_err(pg_error)
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

impl StoreAdmin for PostgresStore {
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
}
