//! The writer thread: the one connection that writes, batching every pending request into
//! one transaction (group commit), keeping new records within the store's bounds,
//! sweeping expired records between batches, answering readiness probes, and, in relaxed
//! mode, syncing the WAL on an interval.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use oncely::store::{CapacityBound, Claim, ClaimRequest};
use oncely::{ClaimId, ClaimOutcome, Fingerprint, IdempotencyKey, Scope, StorageKey, StoreError};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, named_params};

use crate::codec::{Millis, after, copy_error, now_ms, sqlite_error};
use crate::erasures::ErasureFile;
use crate::reader::{Reply, found, usage};
use crate::{Durability, RECORD_OVERHEAD, Usage};
use oncely::store::waiters::Waiters;

/// The most requests one transaction carries. Bounds a batch's latency and memory when
/// requests arrive faster than commits finish; what is left waits for the next batch.
const MAX_BATCH: usize = 1024;

/// What the writer is asked to do.
pub(crate) enum Command {
    /// A change, run inside the next batch's transaction.
    Write(Write),
    /// Remove every expired record, in sweep-sized batches, and answer how many.
    Purge(Reply<u64>),
    /// A readiness probe: answered `Ok` once a write transaction commits (see
    /// [`Writer::probe`]).
    Probe(Reply<()>),
}

/// The bounds a new record must fit, and how many expired rows a claim in a full store
/// deletes per round to make room.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    max_records: u64,
    max_bytes: u64,
    purge_batch: usize,
}

/// Rounds of deleting expired rows one claim may run in a full store before it is refused
/// (and the sweep is started at once, to delete the rest between batches).
const MAKE_ROOM_ROUNDS: usize = 4;

/// What a write needs beside its connection, and what it leaves for after the commit.
struct Context<'a> {
    limits: Limits,
    /// Keys whose waiters must be woken once the transaction commits.
    woken: &'a mut Vec<StorageKey>,
    /// Set when a claim found more expired rows than it could delete: sweep now.
    sweep_now: bool,
    /// Set when a delete removed a row: the count of deletes goes up after the commit.
    erased: bool,
}

/// A claim as the writer thread takes it: [`ClaimRequest`]'s fields, owned (the key and
/// the scope are shared strings; cloning them copies no text).
pub(crate) struct ClaimJob {
    storage_key: StorageKey,
    key: IdempotencyKey,
    scope: Scope,
    fingerprint: Option<Fingerprint>,
    claim_id: ClaimId,
    lease: Duration,
    retention: Duration,
}

impl From<&ClaimRequest<'_>> for ClaimJob {
    fn from(request: &ClaimRequest<'_>) -> Self {
        Self {
            storage_key: *request.storage_key(),
            key: request.key().clone(),
            scope: request.scope().clone(),
            fingerprint: request.fingerprint().copied(),
            claim_id: request.claim_id(),
            lease: request.lease(),
            retention: request.retention(),
        }
    }
}

/// A change to the records, with where to send its answer.
pub(crate) enum Write {
    Claim {
        request: ClaimJob,
        reply: Reply<ClaimOutcome>,
    },
    Complete {
        claim: Claim,
        payload: Bytes,
        retention: Duration,
        reply: Reply<()>,
    },
    Release {
        claim: Claim,
        reply: Reply<()>,
    },
    Touch {
        claim: Claim,
        lease: Duration,
        reply: Reply<()>,
    },
    Delete {
        key: StorageKey,
        reply: Reply<bool>,
    },
    FirstSeen {
        storage_key: StorageKey,
        key: IdempotencyKey,
        scope: Scope,
        window: Duration,
        reply: Reply<bool>,
    },
    /// The engine's flush of the replays it counted: the whole batch in one request, so
    /// in one transaction (see [`record_hits`]).
    RecordHits {
        hits: Vec<(StorageKey, u64)>,
        reply: Reply<()>,
    },
}

impl Write {
    /// Whether an acknowledged write of this kind must survive a power loss in
    /// [`Durability::Sync`]: a completion (a replay depends on it), a `first_seen` mark (a
    /// dedup verdict depends on it) and a delete (an operator expects it to stay done).
    ///
    /// The others may be lost with the last unsynced commits on a power loss (never on a
    /// process crash; see [`Writer::run_batch`]): a claim or a touch (the key comes back
    /// as it was before it; the holder died with the machine, so a durable claim would
    /// only have made the retry wait for its lease to lapse before running the operation
    /// again), a release (the key then stays blocked until the released lease lapses: one
    /// lease, as for a crashed holder) and a flush of hit counts (a counter, never an
    /// answer).
    fn needs_fsync(&self) -> bool {
        matches!(self, Self::Complete { .. } | Self::FirstSeen { .. } | Self::Delete { .. })
    }
}

/// `PRAGMA synchronous` levels the writer switches between.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Synchronous {
    /// WAL: no fsync at commit; the WAL is synced before each checkpoint.
    Normal,
    /// WAL: the WAL is fsynced at every commit.
    Full,
}

/// The writer thread's state.
pub(crate) struct Writer {
    conn: Connection,
    commands: Receiver<Command>,
    waiters: Arc<Waiters>,
    durability: Durability,
    sweep_interval: Option<Duration>,
    sweep_batch: usize,
    /// The connection's current `PRAGMA synchronous`.
    synchronous: Synchronous,
    /// When the next periodic sweep starts.
    next_sweep: Option<Instant>,
    /// A sweep in progress, with the purges waiting for it.
    sweep: Option<Sweep>,
    /// Relaxed mode: when the WAL holding commits not yet synced must be synced.
    sync_due: Option<Instant>,
    limits: Limits,
    /// Whether the last write failed as the store's failure (not a request's own, like
    /// `LeaseLost` or `Capacity`): then [`Writer::probe`] writes a row to tell whether
    /// writes work again, instead of only taking the lock.
    writes_failing: bool,
    /// The count of deletes shared with other processes, bumped after each commit that
    /// deleted a row (`None` when its file could not be opened).
    erasures: Option<Arc<ErasureFile>>,
}

/// A sweep in progress. Each `purge_expired` caller counts what was removed after it asked.
#[derive(Default)]
struct Sweep {
    purges: Vec<(Reply<u64>, u64)>,
}

/// What the writer took from its queue.
enum Next {
    Command(Command),
    /// Nothing is waiting: time for background work.
    Idle,
    /// Every sender is gone: the store was dropped.
    Closed,
}

impl Writer {
    pub(crate) fn new(
        conn: Connection,
        commands: Receiver<Command>,
        waiters: Arc<Waiters>,
        erasures: Option<Arc<ErasureFile>>,
        options: &crate::SqliteOptions,
    ) -> Self {
        let synchronous = match options.durability {
            Durability::Sync => Synchronous::Full,
            Durability::Relaxed { .. } => Synchronous::Normal,
        };
        Self {
            conn,
            commands,
            waiters,
            durability: options.durability,
            sweep_interval: options.sweep_interval,
            sweep_batch: options.sweep_batch,
            synchronous,
            next_sweep: options.sweep_interval.and_then(from_now),
            sweep: None,
            sync_due: None,
            limits: Limits {
                max_records: options.max_records,
                max_bytes: options.max_bytes,
                purge_batch: options.sweep_batch,
            },
            writes_failing: false,
            erasures,
        }
    }

    /// Runs until the store is dropped, then hands its connection back to be closed.
    pub(crate) fn run(mut self) -> Connection {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            match self.next_command() {
                Next::Command(first) => {
                    batch.push(first);
                    while batch.len() < MAX_BATCH {
                        match self.commands.try_recv() {
                            Ok(command) => batch.push(command),
                            Err(_) => break,
                        }
                    }
                    self.run_batch(&mut batch);
                }
                Next::Idle => {}
                Next::Closed => break,
            }
            self.background_work();
        }
        if self.sync_due.is_some() {
            // A clean shutdown leaves nothing unsynced, even in relaxed mode.
            self.sync_wal();
        }
        self.conn
    }

    /// Waits for a command, but not past the next timer, and not at all while a sweep is
    /// running (the sweep goes on between batches instead).
    fn next_command(&self) -> Next {
        if self.sweep.is_some() {
            return match self.commands.try_recv() {
                Ok(command) => Next::Command(command),
                Err(TryRecvError::Empty) => Next::Idle,
                Err(TryRecvError::Disconnected) => Next::Closed,
            };
        }
        match self.next_sweep.into_iter().chain(self.sync_due).min() {
            None => self.commands.recv().map_or(Next::Closed, Next::Command),
            Some(at) => match self.commands.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(command) => Next::Command(command),
                Err(RecvTimeoutError::Timeout) => Next::Idle,
                Err(RecvTimeoutError::Disconnected) => Next::Closed,
            },
        }
    }

    /// Runs every request of `batch` in one transaction and answers them after it commits.
    ///
    /// # Atomicity
    ///
    /// This thread owns the only connection of this store that writes, and each request
    /// runs inside one `BEGIN IMMEDIATE … COMMIT`: `IMMEDIATE` takes SQLite's write lock
    /// before the first read, so no other writer (another process on the same file
    /// included) changes a record between a request's read and its write. Every request
    /// is a single statement (a claim whose statement changed nothing adds a read of the
    /// row it met; a flush of hit counts runs one statement per key inside a savepoint of
    /// its own, see [`record_hits`]), and a statement that fails is rolled back by SQLite
    /// alone, so a failing request has no effect and the others in the batch still commit. Should
    /// SQLite roll the whole transaction back (an I/O error, a full disk), or the commit
    /// fail, every request of the batch is answered with the error, none with success.
    ///
    /// # Durability and group commit
    ///
    /// Nobody is answered before the commit returns, and waiters are woken only after
    /// it. All the requests that queued up while the previous batch committed share this
    /// one commit, and so, in [`Durability::Sync`], one fsync of the WAL: `PRAGMA
    /// synchronous = FULL`, under which SQLite in WAL mode syncs the WAL at every commit.
    /// A completion is therefore on disk before `complete` returns. A batch holding no
    /// write that [needs it](Write::needs_fsync) commits with `synchronous = NORMAL`
    /// (written to the WAL, not synced). That is safe for the completions: the WAL is
    /// append-only and the next FULL commit syncs the whole file, the earlier frames with
    /// it, and a commit is durable against a process crash as soon as it returns in
    /// either mode (the data is in the OS page cache); only a power loss or an OS crash
    /// can lose unsynced commits, and it cannot corrupt the database.
    ///
    /// In [`Durability::Relaxed`], every commit is NORMAL and the WAL is synced on the
    /// interval (see [`Writer::sync_wal`]).
    ///
    /// # Readiness probes
    ///
    /// A probe in a batch that holds writes shares its fate: it is answered with the
    /// store's failure when the transaction failed or one of its writes failed as the
    /// store (an I/O error, a full disk), else `Ok`. A batch of probes alone runs
    /// [`Writer::probe`].
    fn run_batch(&mut self, batch: &mut Vec<Command>) {
        let mut writes = Vec::with_capacity(batch.len());
        let mut probes = Vec::new();
        for command in batch.drain(..) {
            match command {
                Command::Write(write) => writes.push(write),
                Command::Purge(reply) => self.sweep.get_or_insert_with(Sweep::default).purges.push((reply, 0)),
                Command::Probe(reply) => probes.push(reply),
            }
        }
        if writes.is_empty() {
            if !probes.is_empty() {
                let probed = self.probe();
                for reply in probes {
                    let _ = reply.send(probed.as_ref().map(|_| ()).map_err(copy_error));
                }
            }
            return;
        }
        let fsync = matches!(self.durability, Durability::Sync) && writes.iter().any(Write::needs_fsync);
        let mut answers = Vec::with_capacity(writes.len());
        let mut woken = Vec::new();
        let (mut sweep_now, mut erased) = (false, false);
        let transacted = self.transact(fsync, writes, &mut answers, &mut woken, &mut sweep_now, &mut erased);
        // Committed or not (a commit that failed may still have reached the file): a
        // spurious bump costs other processes' caches a miss, a missing one a stale replay.
        if erased {
            self.erased();
        }
        let outcome = match transacted {
            Ok(()) => {
                self.committed();
                self.waiters.wake(&woken);
                answers.iter().find_map(Answer::store_failure).map_or(Ok(()), Err)
            }
            Err(error) => {
                tracing::warn!(%error, requests = answers.len(), "the SQLite store failed a batch of writes");
                for answer in &mut answers {
                    answer.fail(&error);
                }
                Err(error)
            }
        };
        self.writes_failing = outcome.is_err();
        if sweep_now && self.sweep.is_none() {
            self.next_sweep = Some(Instant::now());
        }
        for answer in answers {
            answer.send();
        }
        for reply in probes {
            let _ = reply.send(outcome.as_ref().map(|_| ()).map_err(copy_error));
        }
    }

    /// A readiness probe with no write to ride on: takes SQLite's write lock in a
    /// transaction (`BEGIN IMMEDIATE`, waiting up to the busy timeout for a lock another
    /// process holds) and commits. Taking the lock writes nothing, so a probe costs no
    /// disk I/O while writes succeed. While the last write failed, the probe also writes
    /// a row (the usage row, unchanged), so a store whose writes fail (a full disk, a
    /// file made read-only) is reported unavailable until one succeeds again.
    fn probe(&mut self) -> Result<(), StoreError> {
        let write = self.writes_failing;
        let probed = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).and_then(|tx| {
            if write {
                tx.execute("UPDATE records_usage SET records = records WHERE id = 0", [])?;
            }
            tx.commit()
        });
        match probed {
            Ok(()) => {
                self.writes_failing = false;
                Ok(())
            }
            Err(error) => {
                self.writes_failing = true;
                Err(sqlite_error(error))
            }
        }
    }

    /// The transaction of [`Writer::run_batch`]: one answer per write, in order, whatever
    /// happens; `Err` when the transaction did not commit.
    fn transact(
        &mut self,
        fsync: bool,
        writes: Vec<Write>,
        answers: &mut Vec<Answer>,
        woken: &mut Vec<StorageKey>,
        sweep_now: &mut bool,
        erased: &mut bool,
    ) -> Result<(), StoreError> {
        let level = if fsync { Synchronous::Full } else { Synchronous::Normal };
        let begun = self
            .set_synchronous(level)
            .and_then(|()| self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite_error));
        let tx = match begun {
            Ok(tx) => tx,
            Err(error) => {
                answers.extend(writes.into_iter().map(|write| Answer::failed(write, copy_error(&error))));
                return Err(error);
            }
        };
        let mut context = Context { limits: self.limits, woken, sweep_now: false, erased: false };
        let mut writes = writes.into_iter();
        for write in writes.by_ref() {
            answers.push(execute(&tx, write, &mut context));
            *sweep_now |= context.sweep_now;
            *erased |= context.erased;
            if tx.is_autocommit() {
                // SQLite rolled the whole transaction back after a failed statement (an
                // I/O error, a full disk). The rest must not run: outside a transaction,
                // each would commit on its own.
                let error = StoreError::unavailable("SQLite rolled back the transaction after an error");
                answers.extend(writes.map(|write| Answer::failed(write, copy_error(&error))));
                return Err(error);
            }
        }
        tx.commit().map_err(sqlite_error)
    }

    fn set_synchronous(&mut self, level: Synchronous) -> Result<(), StoreError> {
        if self.synchronous != level {
            let value = match level {
                Synchronous::Normal => "NORMAL",
                Synchronous::Full => "FULL",
            };
            self.conn.pragma_update(None, "synchronous", value).map_err(sqlite_error)?;
            self.synchronous = level;
        }
        Ok(())
    }

    /// Bumps the count of deletes that other processes read (see `erasures.rs`): after
    /// the commit, before any caller of the batch is answered or waiter woken, so that
    /// it has changed by the time a delete returns, and even when its caller has gone.
    /// Should the bump fail, other processes' caches see the delete only when their
    /// entries end.
    fn erased(&self) {
        if let Some(Err(error)) = self.erasures.as_ref().map(|erasures| erasures.bump()) {
            tracing::warn!(%error, "a record was deleted, but the count of deletes other processes read could not be bumped");
        }
    }

    /// Notes a commit: in relaxed mode, the WAL must be synced within the interval.
    fn committed(&mut self) {
        if let Durability::Relaxed { interval } = self.durability
            && self.sync_due.is_none()
        {
            self.sync_due = from_now(interval);
        }
    }

    /// Starts a periodic sweep when one is due, runs one sweep batch if a sweep is in
    /// progress, and syncs the WAL when that is due.
    fn background_work(&mut self) {
        let now = Instant::now();
        if self.sweep.is_none() && self.next_sweep.is_some_and(|at| at <= now) {
            self.sweep = Some(Sweep::default());
        }
        if self.sweep.is_some() {
            self.sweep_once();
        }
        if self.sync_due.is_some_and(|at| at <= Instant::now()) {
            self.sync_wal();
        }
    }

    /// Deletes one batch of at most `sweep_batch` expired records, in a transaction of its
    /// own (with `synchronous = NORMAL`: a lost sweep is redone by the next one). The
    /// writer takes new requests between two sweep batches, so no request waits behind
    /// more than one of them; the sweep ends when a batch finds fewer than it may take.
    fn sweep_once(&mut self) {
        let removed = self.set_synchronous(Synchronous::Normal).and_then(|()| now_ms()).and_then(|now| {
            let limit = i64::try_from(self.sweep_batch).unwrap_or(i64::MAX);
            let mut statement = self.conn.prepare_cached(SWEEP).map_err(sqlite_error)?;
            statement.execute(named_params! { ":now": now, ":limit": limit }).map_err(sqlite_error)
        });
        let finished = match removed {
            Ok(removed) => {
                if let Some(sweep) = self.sweep.as_mut() {
                    for (_, count) in &mut sweep.purges {
                        *count += removed as u64;
                    }
                }
                if removed > 0 {
                    tracing::debug!(removed, "the SQLite store swept expired records");
                    self.committed();
                }
                removed < self.sweep_batch
            }
            Err(error) => {
                tracing::warn!(%error, "the SQLite store failed to sweep expired records");
                self.writes_failing = matches!(error, StoreError::Unavailable(_));
                if let Some(sweep) = self.sweep.as_mut() {
                    for (reply, _) in std::mem::take(&mut sweep.purges) {
                        let _ = reply.send(Err(copy_error(&error)));
                    }
                }
                true
            }
        };
        if finished {
            if let Some(sweep) = self.sweep.take() {
                for (reply, count) in sweep.purges {
                    let _ = reply.send(Ok(count));
                }
            }
            self.next_sweep = self.sweep_interval.and_then(from_now);
        }
    }

    /// Relaxed mode: syncs the WAL with `PRAGMA wal_checkpoint(PASSIVE)`, which fsyncs
    /// the WAL before copying its frames into the database file (and fsyncs that after).
    /// Commits are therefore on disk at most `interval` after they were answered, plus
    /// the batch the writer is running when the sync comes due; a reader holding a
    /// snapshot older than those commits (a long read in another process) can hold the
    /// copy back, and with it this sync, until a later interval.
    fn sync_wal(&mut self) {
        self.sync_due = None;
        let checkpoint = self.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        match checkpoint {
            Ok((_, wal_frames, copied)) => tracing::trace!(wal_frames, copied, "synced the SQLite store's WAL"),
            Err(error) => {
                tracing::warn!(%error, "the SQLite store failed to sync its WAL; retrying at the next interval");
                self.committed();
            }
        }
    }
}

/// Deletes up to `:limit` rows expired at `:now`, by `records_by_expiry`.
const SWEEP: &str =
    "DELETE FROM records WHERE rowid IN (SELECT rowid FROM records WHERE expires_at <= :now LIMIT :limit)";

/// `after` from now; `None` (never) past what `Instant` can represent.
fn from_now(after: Duration) -> Option<Instant> {
    Instant::now().checked_add(after)
}

/// One request's answer, held until its transaction commits.
enum Answer {
    Claim(Reply<ClaimOutcome>, Result<ClaimOutcome, StoreError>),
    Unit(Reply<()>, Result<(), StoreError>),
    Flag(Reply<bool>, Result<bool, StoreError>),
}

impl Answer {
    fn failed(write: Write, error: StoreError) -> Self {
        match write {
            Write::Claim { reply, .. } => Self::Claim(reply, Err(error)),
            Write::Complete { reply, .. }
            | Write::Release { reply, .. }
            | Write::Touch { reply, .. }
            | Write::RecordHits { reply, .. } => Self::Unit(reply, Err(error)),
            Write::Delete { reply, .. } | Write::FirstSeen { reply, .. } => Self::Flag(reply, Err(error)),
        }
    }

    /// The transaction did not commit: a success becomes `error`. A request that failed
    /// on its own keeps its own error (a `LeaseLost` read under the write lock is true
    /// whatever became of the others).
    fn fail(&mut self, error: &StoreError) {
        fn fail<T>(result: &mut Result<T, StoreError>, error: &StoreError) {
            if result.is_ok() {
                *result = Err(copy_error(error));
            }
        }
        match self {
            Self::Claim(_, result) => fail(result, error),
            Self::Unit(_, result) => fail(result, error),
            Self::Flag(_, result) => fail(result, error),
        }
    }

    /// The request's error when it is the store's failure (SQLite could not write, or
    /// the clock failed), not an answer about the record.
    fn store_failure(&self) -> Option<StoreError> {
        let error = match self {
            Self::Claim(_, Err(error)) | Self::Unit(_, Err(error)) | Self::Flag(_, Err(error)) => error,
            _ => return None,
        };
        matches!(error, StoreError::Unavailable(_)).then(|| copy_error(error))
    }

    fn send(self) {
        // A caller that gave up has dropped its receiver; the write stands regardless,
        // which is what `StoreError::Unavailable`'s "whether it took effect is unknown"
        // tells a caller that timed out.
        match self {
            Self::Claim(reply, result) => drop(reply.send(result)),
            Self::Unit(reply, result) => drop(reply.send(result)),
            Self::Flag(reply, result) => drop(reply.send(result)),
        }
    }
}

/// Runs one write inside the batch's transaction; notes in the context the keys whose
/// waiters must be woken once it commits.
fn execute(conn: &Connection, write: Write, context: &mut Context<'_>) -> Answer {
    match write {
        Write::Claim { request, reply } => Answer::Claim(reply, claim(conn, &request, context)),
        Write::Complete { claim, payload, retention, reply } => {
            Answer::Unit(reply, complete(conn, &claim.storage_key, claim.claim_id, &payload, retention, context.woken))
        }
        Write::Release { claim, reply } => {
            Answer::Unit(reply, release(conn, &claim.storage_key, claim.claim_id, context.woken))
        }
        Write::Touch { claim, lease, reply } => {
            Answer::Unit(reply, touch(conn, &claim.storage_key, claim.claim_id, lease))
        }
        Write::Delete { key, reply } => Answer::Flag(reply, delete(conn, &key, context)),
        Write::FirstSeen { storage_key, key, scope, window, reply } => {
            Answer::Flag(reply, first_seen(conn, &storage_key, &key, &scope, window, context))
        }
        Write::RecordHits { hits, reply } => Answer::Unit(reply, record_hits(conn, &hits)),
    }
}

/// The bytes a new row counts before its payload, as the `records_usage` triggers count
/// them (see `schema::MIGRATIONS`).
fn new_row_cost(key: &IdempotencyKey, scope: &Scope) -> u64 {
    RECORD_OVERHEAD.saturating_add(key.as_str().len() as u64).saturating_add(scope.as_str().len() as u64)
}

/// The bound a new row of `cost` bytes would pass, if any.
fn over(limits: &Limits, usage: Usage, cost: u64) -> Option<CapacityBound> {
    if usage.records >= limits.max_records {
        Some(CapacityBound::Records)
    } else if usage.bytes.saturating_add(cost) > limits.max_bytes {
        Some(CapacityBound::Bytes)
    } else {
        None
    }
}

/// Makes sure a claim or `first_seen` at `key` may go ahead, in the batch's transaction
/// (under SQLite's write lock, so the counts cannot change before the write that
/// follows): `Ok` when the store has room for a new row of `cost` bytes, or when a row
/// is already at `key` (the statement then updates it, live or expired, and adds no row).
///
/// Otherwise the store is full. Expired rows are deleted to make room, a batch at a time
/// for up to [`MAKE_ROOM_ROUNDS`] rounds; when that does not make enough,
/// [`StoreError::Capacity`] and nothing else changes. Unexpired rows are never deleted
/// here: a full store refuses new keys, it does not forget results. When expired rows
/// are left over, the sweep is started at once to delete them between batches.
fn make_room(conn: &Connection, key: &StorageKey, cost: u64, context: &mut Context<'_>) -> Result<(), StoreError> {
    let limits = context.limits;
    let Some(mut bound) = over(&limits, usage(conn)?, cost) else { return Ok(()) };
    let mut statement = conn.prepare_cached("SELECT 1 FROM records WHERE storage_key = :key").map_err(sqlite_error)?;
    if statement.exists(named_params! { ":key": key.as_bytes() }).map_err(sqlite_error)? {
        return Ok(());
    }
    let now = now_ms()?;
    let limit = i64::try_from(limits.purge_batch).unwrap_or(i64::MAX);
    let mut purge = conn.prepare_cached(SWEEP).map_err(sqlite_error)?;
    for _ in 0..MAKE_ROOM_ROUNDS {
        let removed = purge.execute(named_params! { ":now": now, ":limit": limit }).map_err(sqlite_error)?;
        match over(&limits, usage(conn)?, cost) {
            None => return Ok(()),
            Some(still) => bound = still,
        }
        if removed < limits.purge_batch {
            return Err(full(&limits, bound));
        }
    }
    context.sweep_now = true;
    Err(full(&limits, bound))
}

fn full(limits: &Limits, bound: CapacityBound) -> StoreError {
    let limit = match bound {
        CapacityBound::Bytes => limits.max_bytes,
        _ => limits.max_records,
    };
    StoreError::Capacity { bound, limit }
}

/// The claim, in one statement: insert a new in-progress record, or replace the one in
/// the way when the claim may, and return the holder it now has.
///
/// Conditions on the existing row (`E` = it expired: `expires_at <= :now`):
/// - `E` → replaced by the new claim, every column (`created_at` = now);
/// - live, same fingerprint, in progress with `lease_until <= :now` → taken over: new
///   `claim_id`, `lease_until`, `expires_at`; `created_at` kept;
/// - otherwise (another fingerprint, a live lease, or completed) → the `WHERE` is false:
///   nothing is written and nothing returned. A completed record in particular is never
///   touched: a replay writes nothing, not even its hit count.
///
/// All `SET` expressions read the row as it was before the update. The columns of a
/// completed state are cleared for a replaced row; a taken-over one has none. `hits = 0`
/// also ends the replaced record's `hit_counts` row (the `hit_counts_reset` trigger,
/// `schema::MIGRATIONS` version 4), in this statement.
const CLAIM: &str = "
    INSERT INTO records (storage_key, key, scope, fingerprint, created_at, expires_at, state, claim_id,
        lease_until, payload, completed_at, hits)
    VALUES (:storage_key, :key, :scope, :fingerprint, :now, :expires_at, 0, :claim_id, :lease_until,
        NULL, NULL, 0)
    ON CONFLICT (storage_key) DO UPDATE SET
        key          = iif(expires_at <= :now, excluded.key, key),
        scope        = iif(expires_at <= :now, excluded.scope, scope),
        fingerprint  = iif(expires_at <= :now, excluded.fingerprint, fingerprint),
        created_at   = iif(expires_at <= :now, excluded.created_at, created_at),
        state        = 0,
        claim_id     = excluded.claim_id,
        lease_until  = excluded.lease_until,
        expires_at   = excluded.expires_at,
        payload      = NULL,
        completed_at = NULL,
        hits         = 0
    WHERE expires_at <= :now
       OR (state = 0 AND lease_until <= :now AND fingerprint IS excluded.fingerprint)";

/// The holder [`CLAIM`] left at a key, read back in the same transaction when it wrote.
///
/// Not a `RETURNING` clause on [`CLAIM`]: SQLite gathers `RETURNING` rows in an ephemeral
/// table, which opens and closes a pager of its own on every statement (4% of the
/// gateway's CPU on SQLite new keys in a profile; `docs/benchmarks.md`). This is a point
/// read of the row the statement just wrote, on a page the writer's cache holds.
const HOLDER: &str = "SELECT created_at, claim_id FROM records WHERE storage_key = :storage_key";

/// Reads back, with `sql` (a point `SELECT` by `:storage_key`), the row a statement of this
/// transaction has just written at `key`: under the write lock it is there, so its absence
/// is corruption.
fn written_row<T>(
    conn: &Connection,
    sql: &str,
    key: &StorageKey,
    read: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<T, StoreError> {
    let mut statement = conn.prepare_cached(sql).map_err(sqlite_error)?;
    statement
        .query_row(named_params! { ":storage_key": key.as_bytes() }, read)
        .optional()
        .map_err(sqlite_error)?
        .ok_or_else(|| StoreError::Corrupt(format!("record {key}: written, then not found in the same transaction")))
}

/// The writer's claim: [`CLAIM`], then the outcome.
///
/// The caller ([`SqliteStore::claim`](crate::SqliteStore)) has already looked the key up
/// on a reader and sends here only claims that found nothing to answer without a write.
/// That look-up is a shortcut and decides nothing: this runs under the write lock and
/// decides again from the row as it is now.
///
/// - the statement wrote the row ([`HOLDER`] reads it back, under the same write lock)
///   → held by the request's claim id: acquired; a takeover when `created_at` is not
///   this call's `now` (a new or replaced record gets `created_at = now`; a taken-over
///   one keeps its own, which is earlier, because leases are at least 1 ms and a lease
///   lapsed before `now`; only a wall clock stepped back to that very millisecond could
///   make the two equal, and the label alone would then be wrong, never who holds the
///   key);
/// - it wrote nothing → it met a live record it must not change (something committed
///   since the reader looked: a completion, another claim): it is read back with
///   [`found`] in the same transaction (under the write lock, so it is the record the
///   claim met): a mismatch, a replay (nothing written) or a live lease.
fn claim(conn: &Connection, request: &ClaimJob, context: &mut Context<'_>) -> Result<ClaimOutcome, StoreError> {
    make_room(conn, &request.storage_key, new_row_cost(&request.key, &request.scope), context)?;
    let now = now_ms()?;
    let lease_until = after(now, request.lease.max(Duration::from_millis(1)))?;
    let expires_at = after(now, request.retention)?.max(lease_until);
    let mut statement = conn.prepare_cached(CLAIM).map_err(sqlite_error)?;
    let changed = statement
        .execute(named_params! {
            ":storage_key": request.storage_key.as_bytes(),
            ":key": request.key.as_str(),
            ":scope": request.scope.as_str(),
            ":fingerprint": request.fingerprint.as_ref().map(|fingerprint| fingerprint.as_bytes()),
            ":now": now,
            ":expires_at": expires_at,
            ":claim_id": request.claim_id.to_bytes(),
            ":lease_until": lease_until,
        })
        .map_err(sqlite_error)?;
    let holder: Option<(Millis, Option<[u8; 16]>)> = match changed {
        0 => None,
        _ => Some(written_row(conn, HOLDER, &request.storage_key, |row| Ok((row.get(0)?, row.get(1)?)))?),
    };
    match holder {
        Some((created_at, Some(claim_id))) if ClaimId::from_bytes(claim_id) == request.claim_id => {
            // A takeover changes the holder under any waiter; a new record may replace an
            // expired one that had waiters.
            context.woken.push(request.storage_key);
            Ok(ClaimOutcome::Acquired { takeover: created_at != now })
        }
        Some(_) => Err(StoreError::Corrupt("a claim changed a record it does not hold".into())),
        None => found(conn, &request.storage_key, request.fingerprint.as_ref(), now)?
            .ok_or_else(|| StoreError::Corrupt("a claim met a record it cannot read back".into())),
    }
}

/// Stores the result of the live in-progress record held by `claim_id`.
///
/// `hits` is left as it is: a record in progress has 0 and no `hit_counts` row, because
/// every statement that puts one in progress ([`CLAIM`]) sets `hits = 0`, which ends any
/// counts row (the `hit_counts_reset` trigger). Not setting it here keeps that trigger
/// off the path of every completion.
fn complete(
    conn: &Connection,
    key: &StorageKey,
    claim_id: ClaimId,
    payload: &Bytes,
    retention: Duration,
    woken: &mut Vec<StorageKey>,
) -> Result<(), StoreError> {
    let now = now_ms()?;
    let expires_at = after(now, retention)?;
    let sql = "UPDATE records SET state = 1, claim_id = NULL, lease_until = NULL, payload = :payload, \
                   completed_at = :now, expires_at = :expires_at \
               WHERE storage_key = :key AND state = 0 AND claim_id = :claim_id AND expires_at > :now";
    let mut statement = conn.prepare_cached(sql).map_err(sqlite_error)?;
    let changed = statement
        .execute(named_params! {
            ":payload": payload.as_ref(),
            ":now": now,
            ":expires_at": expires_at,
            ":key": key.as_bytes(),
            ":claim_id": claim_id.to_bytes(),
        })
        .map_err(sqlite_error)?;
    held(changed)?;
    woken.push(*key);
    Ok(())
}

/// Removes the live in-progress record held by `claim_id`.
fn release(
    conn: &Connection,
    key: &StorageKey,
    claim_id: ClaimId,
    woken: &mut Vec<StorageKey>,
) -> Result<(), StoreError> {
    let now = now_ms()?;
    let sql =
        "DELETE FROM records WHERE storage_key = :key AND state = 0 AND claim_id = :claim_id AND expires_at > :now";
    let mut statement = conn.prepare_cached(sql).map_err(sqlite_error)?;
    let changed = statement
        .execute(named_params! { ":key": key.as_bytes(), ":claim_id": claim_id.to_bytes(), ":now": now })
        .map_err(sqlite_error)?;
    held(changed)?;
    woken.push(*key);
    Ok(())
}

/// Renews the lease held by `claim_id`; a renewed lease never outlives the record.
fn touch(conn: &Connection, key: &StorageKey, claim_id: ClaimId, lease: Duration) -> Result<(), StoreError> {
    let now = now_ms()?;
    let lease_until = after(now, lease.max(Duration::from_millis(1)))?;
    let sql = "UPDATE records SET lease_until = :lease_until, expires_at = max(expires_at, :lease_until) \
               WHERE storage_key = :key AND state = 0 AND claim_id = :claim_id AND expires_at > :now";
    let mut statement = conn.prepare_cached(sql).map_err(sqlite_error)?;
    let changed = statement
        .execute(named_params! {
            ":lease_until": lease_until,
            ":key": key.as_bytes(),
            ":claim_id": claim_id.to_bytes(),
            ":now": now,
        })
        .map_err(sqlite_error)?;
    held(changed)
}

/// `LeaseLost` unless the fenced statement (which names the holder's claim id) changed
/// the row.
fn held(changed: usize) -> Result<(), StoreError> {
    if changed == 1 { Ok(()) } else { Err(StoreError::LeaseLost) }
}

/// Removes the record at `key` whatever its state; true when it was live. A removed row,
/// live or not, wakes its waiters and bumps the count of deletes after the commit.
fn delete(conn: &Connection, key: &StorageKey, context: &mut Context<'_>) -> Result<bool, StoreError> {
    let now = now_ms()?;
    let sql = "DELETE FROM records WHERE storage_key = :key RETURNING expires_at > :now";
    let mut statement = conn.prepare_cached(sql).map_err(sqlite_error)?;
    let live: Option<bool> = statement
        .query_row(named_params! { ":key": key.as_bytes(), ":now": now }, |row| row.get(0))
        .optional()
        .map_err(sqlite_error)?;
    if live.is_some() {
        context.woken.push(*key);
        context.erased = true;
    }
    Ok(live.unwrap_or(false))
}

/// Message dedup in one statement: a marker (a completed record with an empty payload)
/// is inserted, or replaces an expired record; a live completed record gets `hits + 1`; a
/// live in-progress record is left alone (the `WHERE` is false, nothing written).
/// First seen exactly when the statement wrote a row that has no hit.
const FIRST_SEEN: &str = "
    INSERT INTO records (storage_key, key, scope, fingerprint, created_at, expires_at, state, claim_id,
        lease_until, payload, completed_at, hits)
    VALUES (:storage_key, :key, :scope, NULL, :now, :expires_at, 1, NULL, NULL, X'', :now, 0)
    ON CONFLICT (storage_key) DO UPDATE SET
        key          = iif(expires_at <= :now, excluded.key, key),
        scope        = iif(expires_at <= :now, excluded.scope, scope),
        fingerprint  = iif(expires_at <= :now, NULL, fingerprint),
        created_at   = iif(expires_at <= :now, excluded.created_at, created_at),
        expires_at   = iif(expires_at <= :now, excluded.expires_at, expires_at),
        state        = 1,
        claim_id     = NULL,
        lease_until  = NULL,
        payload      = iif(expires_at <= :now, excluded.payload, payload),
        completed_at = iif(expires_at <= :now, excluded.completed_at, completed_at),
        hits         = iif(expires_at <= :now, 0, hits + 1)
    WHERE expires_at <= :now OR state = 1";

/// The hit count [`FIRST_SEEN`] left at a key, read back in the same transaction when it
/// wrote (not a `RETURNING` clause, for the reason given at [`HOLDER`]).
const FIRST_SEEN_HITS: &str = "SELECT hits FROM records WHERE storage_key = :storage_key";

fn first_seen(
    conn: &Connection,
    storage_key: &StorageKey,
    key: &IdempotencyKey,
    scope: &Scope,
    window: Duration,
    context: &mut Context<'_>,
) -> Result<bool, StoreError> {
    make_room(conn, storage_key, new_row_cost(key, scope), context)?;
    let now = now_ms()?;
    let expires_at = after(now, window)?;
    let mut statement = conn.prepare_cached(FIRST_SEEN).map_err(sqlite_error)?;
    let changed = statement
        .execute(named_params! {
            ":storage_key": storage_key.as_bytes(),
            ":key": key.as_str(),
            ":scope": scope.as_str(),
            ":now": now,
            ":expires_at": expires_at,
        })
        .map_err(sqlite_error)?;
    let first = changed != 0 && written_row::<i64>(conn, FIRST_SEEN_HITS, storage_key, |row| row.get(0))? == 0;
    if first {
        context.woken.push(*storage_key);
    }
    Ok(first)
}

/// Adds one key's replays to its `hit_counts` row when it has one: the row's existence
/// is the proof that its record is still the completed record it was created for (see
/// `schema::MIGRATIONS`, version 4: a counts row ends with its record's life, in the
/// statement that ends it). Neither `records` B-tree is read, so a key flushed again
/// costs one descent of the small counts table, not of a table that may hold millions of
/// rows (in a 10-million-row file those pages are rarely cached: the look-up was a fifth
/// of the gateway's CPU while only replays arrived, docs/benchmarks.md). Replays of a
/// record that has expired since are added to its row, which no read returns any more
/// (an expired record is absent to reads) and which goes with the record's row (the
/// sweep, making room, a delete, or the next record at the key). Saturates at
/// `i64::MAX` (a STRICT `INTEGER` column would refuse the float SQLite turns an
/// overflowing sum into).
const ADD_HITS: &str = "UPDATE hit_counts SET \
                        hits = iif(hits > 9223372036854775807 - :hits, 9223372036854775807, hits + :hits) \
                        WHERE storage_key = :key";

/// A key's first counts row, when [`ADD_HITS`] found none: created only for a live
/// completed record (the `SELECT` reads it), so a key absent, expired or in progress
/// gets no row, and a counts row never precedes or outlives its record.
const FIRST_HITS: &str = "INSERT INTO hit_counts (storage_key, hits) \
                          SELECT storage_key, :hits FROM records \
                          WHERE storage_key = :key AND state = 1 AND expires_at > :now";

/// The engine's flush of replay counts, in the batch's transaction: [`ADD_HITS`] per
/// entry, and [`FIRST_HITS`] for a key that has no counts row yet (a key listed twice
/// gets both counts).
///
/// # Atomicity
///
/// All of it or none of it: the statements run inside `SAVEPOINT record_hits`, released
/// when all succeed and rolled back to when one fails, so a failed flush (which the
/// engine may send again) has added nothing, and the other requests of the batch still
/// commit. A hit count changes no counted byte: `hit_counts` is outside `records_usage`
/// (see `schema::MIGRATIONS`), so the flush never needs room. Not fsynced on its own in
/// [`Durability::Sync`] (see [`Write::needs_fsync`]).
fn record_hits(conn: &Connection, hits: &[(StorageKey, u64)]) -> Result<(), StoreError> {
    conn.execute_batch("SAVEPOINT record_hits").map_err(sqlite_error)?;
    let applied = now_ms().and_then(|now| {
        let mut add = conn.prepare_cached(ADD_HITS).map_err(sqlite_error)?;
        let mut first = conn.prepare_cached(FIRST_HITS).map_err(sqlite_error)?;
        for (key, n) in hits {
            let n = i64::try_from(*n).unwrap_or(i64::MAX);
            let added = add.execute(named_params! { ":hits": n, ":key": key.as_bytes() }).map_err(sqlite_error)?;
            if added == 0 {
                first
                    .execute(named_params! { ":hits": n, ":key": key.as_bytes(), ":now": now })
                    .map_err(sqlite_error)?;
            }
        }
        Ok(())
    });
    // When SQLite has rolled the whole transaction back, the savepoint went with it and
    // both statements below fail; the batch sees the rollback and answers every request.
    match applied {
        Ok(()) => conn.execute_batch("RELEASE record_hits").map_err(sqlite_error),
        Err(error) => {
            let _ = conn.execute_batch("ROLLBACK TO record_hits; RELEASE record_hits");
            Err(error)
        }
    }
}
