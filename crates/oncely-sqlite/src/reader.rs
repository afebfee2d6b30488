//! Reader threads: the look-up that answers a replay (and every other claim that changes
//! nothing), `get`, `list`, `stats`, the usage row and the check behind `subscribe`, each
//! on a connection of its own, so that a long read (counting ten million records) never
//! holds up the writer, and no read waits for it.
//!
//! # Consistency
//!
//! Each query is one statement, so one WAL snapshot: it sees every transaction that
//! committed before it started, and so every write whose reply a caller already has.
//! Expiry is applied in the query (`expires_at > now`): a record past its `expires_at`
//! is absent whether or not the sweep has removed it.
//!
//! A reader never takes SQLite's write lock (its connection is `query_only`) and, in WAL
//! mode, never waits for one: it answers while the writer, or another process, holds it.
//!
//! # A claim's look-up on the caller's thread
//!
//! Each reader's connection sits behind a mutex that its thread takes for each statement,
//! releasing it before it replies. With
//! [`SqliteOptions::inline_look_ups`](crate::SqliteOptions::inline_look_ups),
//! [`look_up_here`] takes a free one for a claim's look-up on the calling thread instead:
//! the same statement on the same connections, without the two thread hand-offs (the
//! query's and its answer's), which cost more than the read itself when they wake an idle
//! thread (a trade: see the option). A reader thread that takes a query while a caller
//! holds its connection waits for that one statement.
//!
//! On the calling thread nothing waits for a connection (all in use: the caller goes to
//! a reader thread) or in SQLite's busy handler (the connection's busy timeout is zero
//! while the statement runs, so `SQLITE_BUSY`, from another process holding the file,
//! sends the caller to a reader thread, which waits as long as
//! [`SqliteOptions::busy_timeout`](crate::SqliteOptions::busy_timeout) allows). What is
//! left is SQLite's own: a reader that meets the WAL index mid-change retries, sleeping
//! microseconds at first (`walTryBeginRead`), as it does on a reader thread; and pages in
//! no cache are read from disk.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use oncely::{ClaimOutcome, Fingerprint, Record, Replay, StorageKey, StoreError, StoreStats};
use rusqlite::{Connection, OptionalExtension, named_params};
use tokio::sync::oneshot;

use crate::Usage;
use crate::codec::{
    COMPLETED, IN_PROGRESS, Millis, now_ms, read_record, record_columns, sqlite_error, to_time, total_hits,
};

/// Where a reader sends its answer.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A read request.
pub(crate) enum Query {
    /// What a claim of `key` with `fingerprint` answers without writing, if anything:
    /// see [`found`].
    Claim {
        key: StorageKey,
        fingerprint: Option<Fingerprint>,
        reply: Reply<Option<ClaimOutcome>>,
    },
    Get {
        key: StorageKey,
        reply: Reply<Option<Record>>,
    },
    /// Whether the record at `key` is live and in progress.
    InProgress {
        key: StorageKey,
        reply: Reply<bool>,
    },
    Stats {
        reply: Reply<StoreStats>,
    },
    /// The `records_usage` row.
    Usage {
        reply: Reply<Usage>,
    },
    List {
        after: Option<StorageKey>,
        limit: usize,
        reply: Reply<Vec<Record>>,
    },
}

/// A reader's connection: its thread's, lent to [`look_up_here`] while the thread waits
/// for a query.
pub(crate) type Shared = Arc<Mutex<Connection>>;

/// Answers queries until every sender is gone, then hands the connection back to be
/// closed. The reader threads share one receiver; each holds its connection's lock only
/// while it answers.
pub(crate) fn run(conn: Shared, queries: Arc<Mutex<Receiver<Query>>>) -> Shared {
    loop {
        // A poisoned lock only means another reader panicked; the receiver is intact.
        let query = queries.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(query) = query else { return conn };
        answer(&conn, query);
    }
}

/// Runs `statement` on `conn`, holding its lock only meanwhile. A lock poisoned by a panic
/// while the connection was lent is taken anyway and cleared: a statement is reset when
/// its handle drops, and [`BusyTimeout`] restored the timeout, so the connection is as
/// before, and [`look_up_here`] may borrow it again.
fn locked<T>(conn: &Shared, statement: impl FnOnce(&Connection) -> T) -> T {
    let guard = conn.lock().unwrap_or_else(|poisoned| {
        conn.clear_poison();
        poisoned.into_inner()
    });
    statement(&guard)
}

/// Sets a connection's busy timeout to zero, and back to `restore` when dropped, even by
/// a panic.
struct BusyTimeout<'a> {
    conn: &'a Connection,
    restore: Duration,
}

impl<'a> BusyTimeout<'a> {
    /// Setting the timeout cannot fail (SQLite's `sqlite3_busy_timeout` returns OK); if it
    /// did, the statement would wait as a reader thread's does.
    fn zero(conn: &'a Connection, restore: Duration) -> Self {
        let _ = conn.busy_timeout(Duration::ZERO);
        Self { conn, restore }
    }
}

impl Drop for BusyTimeout<'_> {
    fn drop(&mut self) {
        let _ = self.conn.busy_timeout(self.restore);
    }
}

/// A claim's look-up ([`found`]) on the calling thread, on the first of `readers` that no
/// thread is using, starting at `first`: `None` when every one is in use or poisoned, or
/// when the statement failed (`SQLITE_BUSY` included: it is not waited for here). A
/// reader thread answers those, and reports a failure that persists. `busy_timeout` is
/// the connection's own, restored after the statement.
pub(crate) fn look_up_here(
    readers: &[Shared],
    first: usize,
    busy_timeout: Duration,
    key: &StorageKey,
    fingerprint: Option<&Fingerprint>,
) -> Option<Option<ClaimOutcome>> {
    let n = readers.len();
    let conn = (0..n).find_map(|i| readers[(first + i) % n].try_lock().ok())?;
    // Never wait in SQLite's busy handler on the caller's thread.
    let _zero = BusyTimeout::zero(&conn, busy_timeout);
    now_ms().and_then(|now| found(&conn, key, fingerprint, now)).ok()
}

/// Answers `query` on `conn`; the reply goes out after the connection's lock is
/// released, so that a caller it wakes finds the connection free.
fn answer(conn: &Shared, query: Query) {
    // A caller that gave up has dropped its receiver; its answer is not needed.
    match query {
        Query::Claim { key, fingerprint, reply } => {
            drop(reply.send(locked(conn, |conn| now_ms().and_then(|now| found(conn, &key, fingerprint.as_ref(), now)))))
        }
        Query::Get { key, reply } => {
            drop(reply.send(locked(conn, |conn| now_ms().and_then(|now| get(conn, &key, now)))))
        }
        Query::InProgress { key, reply } => {
            drop(reply.send(locked(conn, |conn| now_ms().and_then(|now| in_progress(conn, &key, now)))))
        }
        Query::Stats { reply } => drop(reply.send(locked(conn, |conn| now_ms().and_then(|now| stats(conn, now))))),
        Query::Usage { reply } => drop(reply.send(locked(conn, usage))),
        Query::List { after, limit, reply } => {
            drop(reply.send(locked(conn, |conn| now_ms().and_then(|now| list(conn, after, limit, now)))))
        }
    }
}

/// The live record at `key`. Shared with the writer, which reads inside its transaction.
pub(crate) fn get(conn: &Connection, key: &StorageKey, now: Millis) -> Result<Option<Record>, StoreError> {
    let sql = concat!("SELECT ", record_columns!(), " FROM records WHERE storage_key = :key AND expires_at > :now");
    let mut statement = conn.prepare_cached(sql).map_err(sqlite_error)?;
    statement
        .query_row(named_params! { ":key": key.as_bytes(), ":now": now }, |row| Ok(read_record(row)))
        .optional()
        .map_err(sqlite_error)?
        .transpose()
}

/// What a claim of `key` with `fingerprint` meets that it must not change, read in one
/// statement that writes nothing, as of `now`:
///
/// - a live record with another fingerprint → [`ClaimOutcome::Mismatch`];
/// - a live completed record → [`ClaimOutcome::Replay`] with its payload and the hits
///   it holds (the replay's own hit is the engine's to count and flush);
/// - a live in-progress record whose lease has not lapsed → [`ClaimOutcome::InProgress`];
/// - `None` when the claim must write: the key is absent, expired, or held by a lapsed
///   lease with the same fingerprint.
///
/// Every claim runs it first, on the caller's thread ([`look_up_here`]) or a reader's,
/// so that these answers never go through the writer: each is true of the snapshot it
/// read, a state that held at some instant during the call. Shared with the writer,
/// which runs it in its transaction (under the write lock) when its claim statement
/// changed nothing, to tell which of them it met.
pub(crate) fn found(
    conn: &Connection,
    key: &StorageKey,
    fingerprint: Option<&Fingerprint>,
    now: Millis,
) -> Result<Option<ClaimOutcome>, StoreError> {
    let sql = concat!(
        "SELECT fingerprint IS :fingerprint, state, lease_until, payload, completed_at, ",
        total_hits!(),
        ", expires_at FROM records WHERE storage_key = :key AND expires_at > :now"
    );
    let mut statement = conn.prepare_cached(sql).map_err(sqlite_error)?;
    let params = named_params! {
        ":fingerprint": fingerprint.map(|fingerprint| fingerprint.as_bytes()),
        ":key": key.as_bytes(),
        ":now": now,
    };
    let row = statement
        .query_row(params, |row| {
            Ok(match row.get::<_, i64>(1)? {
                _ if !row.get::<_, bool>(0)? => Ok(Some(ClaimOutcome::Mismatch)),
                // A NULL payload or completion time fails the conversion: corrupt (the
                // table's `CHECK` rules both out).
                COMPLETED => {
                    let payload = Bytes::from(row.get::<_, Vec<u8>>(3)?);
                    replay(key, payload, row.get(4)?, row.get(5)?, row.get(6)?).map(Some)
                }
                IN_PROGRESS => match row.get::<_, Option<Millis>>(2)? {
                    Some(lease_until) if lease_until > now => {
                        to_time(lease_until).map(|lease_until| Some(ClaimOutcome::InProgress { lease_until }))
                    }
                    Some(_) => Ok(None),
                    None => Err(StoreError::Corrupt(format!("record {key}: in progress without a lease"))),
                },
                state => Err(StoreError::Corrupt(format!("record {key}: in the unknown state {state}"))),
            })
        })
        .optional()
        .map_err(sqlite_error)?;
    row.transpose().map(Option::flatten)
}

/// A completed row's answer; a negative count (no write stores one) is corruption.
fn replay(
    key: &StorageKey,
    payload: Bytes,
    completed_at: Millis,
    hits: i64,
    expires_at: Millis,
) -> Result<ClaimOutcome, StoreError> {
    let (completed_at, expires_at) = (to_time(completed_at)?, to_time(expires_at)?);
    let hits = u64::try_from(hits).map_err(|_| StoreError::Corrupt(format!("record {key}: {hits} hits")))?;
    Ok(ClaimOutcome::Replay(Replay { payload, completed_at, hits, expires_at }))
}

fn in_progress(conn: &Connection, key: &StorageKey, now: Millis) -> Result<bool, StoreError> {
    let sql = "SELECT state FROM records WHERE storage_key = :key AND expires_at > :now";
    let mut statement = conn.prepare_cached(sql).map_err(sqlite_error)?;
    let state: Option<i64> = statement
        .query_row(named_params! { ":key": key.as_bytes(), ":now": now }, |row| row.get(0))
        .optional()
        .map_err(sqlite_error)?;
    Ok(state == Some(IN_PROGRESS))
}

/// Counts in one statement, so from one snapshot: the usage row's counts (kept exact by
/// the schema's triggers in every transaction that writes `records`) less the rows that
/// have expired but are not swept yet, found by a range of `records_by_expiry` (which
/// covers `state`). Its cost is that of the expired, unswept rows, not of the file: a
/// handful while the sweeper keeps up.
fn stats(conn: &Connection, now: Millis) -> Result<StoreStats, StoreError> {
    let sql = "SELECT u.records - e.records, u.in_progress - e.in_progress \
               FROM records_usage AS u, \
                    (SELECT count(*) AS records, coalesce(sum(state = 0), 0) AS in_progress \
                     FROM records WHERE expires_at <= :now) AS e \
               WHERE u.id = 0";
    let mut statement = conn.prepare_cached(sql).map_err(sqlite_error)?;
    let (records, in_progress): (i64, i64) = statement
        .query_row(named_params! { ":now": now }, |row| Ok((row.get(0)?, row.get(1)?)))
        .map_err(sqlite_error)?;
    let count = |n: i64| u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("a negative count {n}")));
    let (records, in_progress) = (count(records)?, count(in_progress)?);
    let completed = records
        .checked_sub(in_progress)
        .ok_or_else(|| StoreError::Corrupt(format!("{in_progress} records in progress of {records}")))?;
    Ok(StoreStats { records, in_progress, completed })
}

/// The `records_usage` row: what the file holds, counted against its bounds. Shared
/// with the writer, which reads it inside its transaction.
pub(crate) fn usage(conn: &Connection) -> Result<Usage, StoreError> {
    let sql = "SELECT records, bytes FROM records_usage WHERE id = 0";
    let mut statement = conn.prepare_cached(sql).map_err(sqlite_error)?;
    let (records, bytes): (i64, i64) =
        statement.query_row([], |row| Ok((row.get(0)?, row.get(1)?))).map_err(sqlite_error)?;
    let count = |n: i64| u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("a negative usage count {n}")));
    Ok(Usage { records: count(records)?, bytes: count(bytes)? })
}

/// A page of live records in storage-key order (blobs compare bytewise, as
/// `StorageKey`'s `Ord` does), walking the primary key.
fn list(conn: &Connection, after: Option<StorageKey>, limit: usize, now: Millis) -> Result<Vec<Record>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut records = Vec::new();
    match after {
        Some(after) => {
            let sql = concat!(
                "SELECT ",
                record_columns!(),
                " FROM records WHERE storage_key > :after AND expires_at > :now ORDER BY storage_key LIMIT :limit"
            );
            let mut statement = conn.prepare_cached(sql).map_err(sqlite_error)?;
            let mut rows = statement
                .query(named_params! { ":after": after.as_bytes(), ":now": now, ":limit": limit })
                .map_err(sqlite_error)?;
            while let Some(row) = rows.next().map_err(sqlite_error)? {
                records.push(read_record(row)?);
            }
        }
        None => {
            let sql = concat!(
                "SELECT ",
                record_columns!(),
                " FROM records WHERE expires_at > :now ORDER BY storage_key LIMIT :limit"
            );
            let mut statement = conn.prepare_cached(sql).map_err(sqlite_error)?;
            let mut rows = statement.query(named_params! { ":now": now, ":limit": limit }).map_err(sqlite_error)?;
            while let Some(row) = rows.next().map_err(sqlite_error)? {
                records.push(read_record(row)?);
            }
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::mpsc;

    use oncely::Scope;

    use super::*;
    use crate::SqliteOptions;

    const HOUR: Duration = Duration::from_secs(3600);

    /// A reader's connection on a file in rollback-journal mode, where a reader meets
    /// `SQLITE_BUSY` whenever another connection holds an exclusive lock. (In WAL mode, the
    /// store's, that happens only in rare moments, such as another process recovering
    /// the WAL after a crash.)
    fn reader_of_a_rollback_file(path: &Path) -> Shared {
        drop(crate::schema::open_writer(path, &SqliteOptions::default()).expect("the schema"));
        let conn = Connection::open(path).expect("open");
        let mode: String = conn.query_row("PRAGMA journal_mode = DELETE", [], |row| row.get(0)).expect("mode");
        assert_eq!(mode, "delete");
        drop(conn);
        let options = SqliteOptions::default().busy_timeout(HOUR);
        Arc::new(Mutex::new(crate::schema::open_reader(path, &options).expect("a reader")))
    }

    fn busy_timeout_ms(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA busy_timeout", [], |row| row.get(0)).expect("busy_timeout")
    }

    /// The caller's thread never waits: not for a lock another connection holds (where a
    /// reader thread would wait an hour), and not for a connection a reader thread is
    /// using. Both send the look-up to a reader thread (`None`); the connection keeps its
    /// own busy timeout.
    #[test]
    fn a_look_up_here_never_waits_for_a_lock_or_a_connection() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("oncely.db");
        let reader = reader_of_a_rollback_file(&path);
        let key = StorageKey::derive(&Scope::global(), &oncely_testkit::unique_key());
        assert_eq!(look_up_here(&[Arc::clone(&reader)], 0, HOUR, &key, None), Some(None), "absent: the claim writes");

        let locker = Connection::open(&path).expect("another connection");
        locker.execute_batch("BEGIN EXCLUSIVE").expect("hold the file");
        let (done, answered) = mpsc::channel();
        let readers = [Arc::clone(&reader)];
        std::thread::spawn(move || done.send(look_up_here(&readers, 0, HOUR, &key, None)));
        // A bound for a failure, not a synchronisation: waiting would take an hour.
        let answer = answered.recv_timeout(Duration::from_secs(60)).expect("the look-up waited for the lock");
        assert_eq!(answer, None, "a busy file sends the look-up to a reader thread");
        assert_eq!(busy_timeout_ms(&reader.lock().expect("lock")), 3_600_000, "its own busy timeout, restored");
        locker.execute_batch("COMMIT").expect("let go");

        let in_use = reader.lock().expect("a reader thread answering on it");
        assert_eq!(look_up_here(&[Arc::clone(&reader)], 0, HOUR, &key, None), None, "no free connection");
        drop(in_use);
        assert_eq!(look_up_here(&[Arc::clone(&reader)], 0, HOUR, &key, None), Some(None));
    }
}
