//! The embedded durable Oncely store: one SQLite file, nothing to run beside it.
//!
//! ```no_run
//! use oncely::Oncely;
//! use oncely_sqlite::{Durability, SqliteOptions, SqliteStore};
//!
//! # fn main() -> Result<(), oncely::StoreError> {
//! let store = SqliteStore::open("oncely.db", SqliteOptions::default().durability(Durability::Sync))?;
//! let oncely = Oncely::new(store);
//! # let _ = oncely; Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! - **Atomicity.** One writer thread owns the only connection that writes and runs
//!   every request in a `BEGIN IMMEDIATE` transaction, which holds SQLite's write lock
//!   against other processes too. A claim that writes is one statement that decides and
//!   applies the outcome together. Details at `Writer::run_batch` in `src/writer.rs`.
//! - **A replay is a read.** A claim first looks its key up on a reader connection, in
//!   one read-only statement (`reader::found` in `src/reader.rs`), on a reader thread (or,
//!   with [`SqliteOptions::inline_look_ups`], on the caller's thread when it can start at
//!   once); a completed record with the same fingerprint is answered from there, as are
//!   a mismatch and a live lease. Those answers never enter the writer's queue, never
//!   take the write lock and write nothing, not even a hit count: the engine counts
//!   replays in the process and flushes them with [`Store::record_hits`], one writer
//!   request per batch. Each answer is true of the committed state it read. Any other claim goes on to the
//!   writer, which decides again under the write lock (the reader's view is only a
//!   shortcut), so exactly one of any number of concurrent claims of a key acquires it.
//! - **Durability.** In [`Durability::Sync`] (the default) a completion is fsynced before
//!   `complete` returns; concurrent completions share one fsync (group commit). In
//!   [`Durability::Relaxed`] commits are not fsynced one by one; the WAL is synced on an
//!   interval. In both modes an acknowledged write survives the process being killed;
//!   what a power loss can take is written at [`Durability`].
//! - **Expiry on every read.** Every statement compares `expires_at` with the time now;
//!   the sweep only collects the garbage, a batch at a time between requests.
//! - **Time** is the process's wall clock, as integer milliseconds since the Unix epoch,
//!   read once per request by the thread that runs it (a claim that goes on to the
//!   writer reads it again there); durations round up to whole milliseconds. Processes
//!   that share a file must keep their clocks in step.
//! - **Waiting.** [`Store::subscribe`] is woken in-process by the writer after the commit
//!   of a completion, release, delete or takeover. Other processes sharing the file (and
//!   other `SqliteStore::open`s of it) are not notified: their waiters fall back to the
//!   engine's polling.
//! - **Several processes** may open one file (on a local disk: WAL needs shared memory)
//!   and stay atomic; their writes take turns on SQLite's lock, waiting up to
//!   [`SqliteOptions::busy_timeout`] before answering [`StoreError::Unavailable`].
//! - **Bounds.** At most [`SqliteOptions::max_records`] rows and
//!   [`SqliteOptions::max_bytes`] bytes (counted as [`RECORD_OVERHEAD`] says), so that a
//!   flood of new keys cannot fill the disk, which would fail every write. A claim or
//!   `first_seen` that must create a row in a full store first deletes expired rows (they
//!   are absent anyway), and when that leaves no room answers [`StoreError::Capacity`]
//!   and changes nothing: an unexpired record, completed or in progress, is never
//!   dropped to make room. The counts live in the database, kept by triggers in the same
//!   transaction as each write, so they are right across restarts and for every process
//!   sharing the file, and checking them costs a claim one row read (see
//!   `schema::MIGRATIONS`). A completion is never refused for room: the operation has
//!   run and its result is kept, so the bytes can pass the bound by at most the payloads
//!   of the records in progress when it was reached. The file itself is larger than the
//!   counted bytes by SQLite's page slack and free pages, and the WAL beside it.
//! - **Readiness.** [`StoreAdmin::ping`] goes through the writer and takes SQLite's write
//!   lock, so it reports [`StoreError::Unavailable`] while writes cannot proceed: another
//!   process holding the lock past the busy timeout, or (after a failed write: a full
//!   disk, a read-only file) until a probe write succeeds again.
//!
//! # What a call costs
//!
//! A "request" below is one message to one of the store's threads and its answer, on
//! channels within the process; the file is local, so there is no network round trip.
//! A "read" is one read-only statement on a reader's connection: a request to a reader
//! thread, or with [`SqliteOptions::inline_look_ups`] a statement on the caller's thread
//! when a connection is free and SQLite is not busy.
//!
//! | call                                             | reads           | writer requests | writes          |
//! |--------------------------------------------------|-----------------|-----------------|-----------------|
//! | claim answered by a replay, mismatch, live lease | 1               | 0               | none            |
//! | claim of a new or expired key, or a takeover     | 1               | 1               | the claim       |
//! | complete, release, touch, `first_seen`, delete   | 0               | 1               | the change      |
//! | `record_hits`, a whole batch                     | 0               | 1               | one transaction |
//!
//! So an operation run for the first time costs two store calls (claim, complete), a
//! read and two writer requests (the claim's write, the completion); a replay costs one
//! store call and one read: one indexed point read of the row, payload included. It waits
//! for nothing the writer does: neither the writer's queue and group-commit fsyncs nor
//! another process holding the write lock. Readers are a small pool ([`SqliteOptions::readers`]) shared with the admin
//! reads; a slow admin read (`list` of a large page) occupies one of them while it runs.
//! `stats` is not one: it reads the counts the schema's triggers keep, less the expired
//! rows not yet swept.
//!
//! Where the caller waits, it awaits a channel: every SQLite statement runs on the store's
//! own threads, never on the async runtime's, but a claim's look-up with
//! [`SqliteOptions::inline_look_ups`], which runs on the caller's thread only when it can
//! start at once and never waits for a lock there (`reader::look_up_here` in
//! `src/reader.rs`).
//!
//! # Schema
//!
//! The records are in `records`, keyed by the 32-byte storage key, created and migrated
//! by [`SqliteStore::open`] (versioned by `PRAGMA user_version`). Inspect it with any
//! SQLite client; times are milliseconds since the epoch, `state` is 0 (in progress) or 1
//! (completed). A record's hit count is its `hits` plus its row in `hit_counts`, if any
//! (where the engine's flushes go). `records_usage` holds the counts the store's bounds
//! are checked against.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use oncely::store::{Claim, ClaimOutcome, ClaimRequest, FirstSeen, Notified, StoreAdmin, StoreStats};
use oncely::{Fingerprint, Record, StorageKey, Store, StoreError};
use tokio::sync::oneshot;

use crate::erasures::ErasureFile;

mod codec;
mod erasures;
mod reader;
mod schema;
mod url;
mod writer;
pub use url::SqliteUrl;

/// Fuzzing only: reads a record from a row of the record columns.
#[cfg(fuzzing)]
#[doc(hidden)]
pub fn fuzz_read_record(row: &rusqlite::Row<'_>) -> Result<oncely::Record, oncely::StoreError> {
    codec::read_record(row)
}

use oncely::store::waiters::Waiters;
use reader::{Query, Reply};
use writer::{ClaimJob, Command, Write, Writer};

/// When an acknowledged write is on disk.
///
/// Both modes keep every acknowledged write across a crash or kill of the process: a
/// commit is in the operating system's page cache when it returns, and the WAL is
/// recovered at the next open. They differ on a power loss or an operating-system crash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// A completion, a `first_seen` mark or a delete is fsynced before the call returns
    /// (`PRAGMA synchronous = FULL` for the transaction that carries it). Concurrent
    /// writes share one transaction and so one fsync (group commit), so throughput grows
    /// with concurrency while each caller waits about one fsync.
    ///
    /// On a power loss, nothing acknowledged is lost but claims, lease renewals, releases
    /// and hit counts committed since the last fsync: a lost claim or renewal leaves the
    /// key as before it (its holder died with the machine; a durable claim would only
    /// make the retry wait out the lease before running the operation again), a lost
    /// release leaves the key blocked for the rest of its lease, a lost hit count is a
    /// counter.
    #[default]
    Sync,
    /// No fsync per commit (`PRAGMA synchronous = NORMAL`); the writer syncs the WAL
    /// every `interval` when something was committed (`PRAGMA wal_checkpoint(PASSIVE)`,
    /// which fsyncs the WAL and then the database), and SQLite syncs it at its automatic
    /// checkpoints (every 1000 pages of WAL).
    ///
    /// On a power loss, the writes of about the last `interval` are lost: completions
    /// included, so a retry after the restart can run the operation again. Longer only
    /// while a reader holds a snapshot older than them (a long read in another process),
    /// which holds the checkpoint back. The database is never corrupted.
    Relaxed {
        /// How often the WAL is synced. Zero syncs after every batch.
        interval: Duration,
    },
}

/// The bytes a row counts against [`SqliteOptions::max_bytes`] beyond the bytes of its
/// payload, raw key and scope: an estimate of its fixed columns (storage key,
/// fingerprint, claim id, five integers), the row and cell headers, its entries in
/// the primary-key index and `records_by_expiry`, and its `hit_counts` row once replayed
/// (about 45 bytes).
pub const RECORD_OVERHEAD: u64 = 256;

/// The default [`SqliteOptions::max_records`]: 10 million.
pub const DEFAULT_MAX_RECORDS: u64 = 10_000_000;

/// The default [`SqliteOptions::max_bytes`]: 1 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

/// The default [`SqliteOptions::mmap_size`]: 0, no memory map (see there why).
pub const DEFAULT_MMAP_SIZE: u64 = 0;

/// Settings for [`SqliteStore::open`].
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    durability: Durability,
    sweep_interval: Option<Duration>,
    sweep_batch: usize,
    readers: usize,
    busy_timeout: Duration,
    max_records: u64,
    max_bytes: u64,
    mmap_size: u64,
    inline_look_ups: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Sync,
            sweep_interval: Some(Duration::from_secs(60)),
            sweep_batch: 500,
            readers: 2,
            busy_timeout: Duration::from_secs(5),
            max_records: DEFAULT_MAX_RECORDS,
            max_bytes: DEFAULT_MAX_BYTES,
            mmap_size: DEFAULT_MMAP_SIZE,
            inline_look_ups: false,
        }
    }
}

impl SqliteOptions {
    /// When acknowledged writes are on disk (default [`Durability::Sync`]).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// How often expired records are removed (default 60 s; zero means never, as
    /// [`no_sweeper`](Self::no_sweeper)). Expired records are invisible to every read
    /// whether swept or not; sweeping only gives the space back.
    pub fn sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_interval = (!every.is_zero()).then_some(every);
        self
    }

    /// No periodic sweep: expired records stay on disk (invisible) until
    /// [`StoreAdmin::purge_expired`] or a claim of the same key replaces them.
    pub fn no_sweeper(mut self) -> Self {
        self.sweep_interval = None;
        self
    }

    /// How many expired records one sweep transaction deletes (default 500, at least 1).
    /// The writer serves waiting requests between two such transactions, so this bounds
    /// how long a request can wait behind the sweep.
    pub fn sweep_batch(mut self, records: usize) -> Self {
        self.sweep_batch = records.max(1);
        self
    }

    /// How many reader threads, each with a connection, answer the look-up every claim
    /// starts with (which answers replays; on the caller's thread instead, on one of these
    /// connections, with [`inline_look_ups`](Self::inline_look_ups)), `get`, `list`,
    /// `stats` and the check behind `subscribe` (default 2, at least 1). Claims that must
    /// write and every other change go through the one writer.
    pub fn readers(mut self, readers: usize) -> Self {
        self.readers = readers.max(1);
        self
    }

    /// How long a statement waits for a lock held by another process sharing the file
    /// before failing with [`StoreError::Unavailable`] (default 5 s; at most
    /// `i32::MAX` milliseconds, about 24 days, which is what SQLite takes).
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout.min(Duration::from_millis(i32::MAX as u64));
        self
    }

    /// The most rows the file holds, expired-but-unswept ones included (default
    /// [`DEFAULT_MAX_RECORDS`], 10 million; at least 1). A new record past it is refused
    /// with [`StoreError::Capacity`] once expired rows are deleted (see the
    /// [crate docs](crate)). The bound is the file's, checked by every process that opens
    /// it with its own options.
    pub fn max_records(mut self, max: u64) -> Self {
        self.max_records = max.max(1);
        self
    }

    /// The most bytes the rows hold, counted as [`RECORD_OVERHEAD`] says (default
    /// [`DEFAULT_MAX_BYTES`], 1 GiB; at least 1). A new record that would pass it is
    /// refused with [`StoreError::Capacity`] once expired rows are deleted; a completion
    /// never is (see the [crate docs](crate)).
    pub fn max_bytes(mut self, max: u64) -> Self {
        self.max_bytes = max.max(1);
        self
    }

    /// How much of the database file each connection reads through a memory map rather
    /// than with `pread` (SQLite's `PRAGMA mmap_size`; default [`DEFAULT_MMAP_SIZE`],
    /// none). SQLite caps it at 2 GiB in this build (`SQLITE_MAX_MMAP_SIZE`); the rest
    /// of a larger file is read as before.
    ///
    /// A trade, measured in `docs/benchmarks.md`, which is why it is off by default:
    ///
    /// - **Replays gain.** A reader's page cache is emptied whenever another connection
    ///   has committed, so without a map each look-up reads its B-tree pages again, a
    ///   system call and a copy each. Through the map they are read in place from the OS
    ///   page cache: +14% replays through the engine at 1 million records, and 10% less
    ///   CPU per replay in the gateway.
    /// - **New keys lose**, 10–25% more CPU per new key in the gateway: the file grows
    ///   at every checkpoint, and every connection then maps it again on its next read
    ///   (`munmap` and `mmap`, with the TLB shoot-downs that unmapping costs).
    ///
    /// So a map suits a file that has stopped growing (retention reached, the sweep
    /// freeing as much as new keys take) under a load of mostly replays. It does not
    /// make a file far larger than memory cheap to read: with the cap raised at build time
    /// and a map over a whole 3.4 GB, 10-million-row file, replays of records spread over
    /// it ran slower than without one (each connection takes its own page faults). It costs
    /// address space, not memory: the mapped pages are the OS page cache's, shared by
    /// every connection, and show in the process's RSS as file pages. An I/O error while
    /// reading a mapped page is a `SIGBUS` that ends the process, where `pread` would have
    /// returned an error that fails one request.
    pub fn mmap_size(mut self, bytes: u64) -> Self {
        self.mmap_size = bytes;
        self
    }

    /// Whether a claim's look-up (the read that answers a replay, and that every claim
    /// starts with) runs on the calling thread when a reader's connection is free, rather
    /// than on a reader thread (default `false`). The statement and the connections are
    /// the same; what changes is the hand-off to a reader thread and back.
    ///
    /// A trade, measured in `docs/benchmarks.md` (the gateway, replays, 2 cores), which is
    /// why it is off by default:
    ///
    /// - **Light load gains.** With one to four connections, a hand-off wakes an idle
    ///   reader thread and then the caller: on the caller's thread a replay cost 18–38%
    ///   less CPU, and 1.1–1.4× as many replays went through (two runs).
    /// - **Saturation loses.** With 32 connections keeping every core busy, reader threads
    ///   answer queued look-ups back to back and are seldom woken; on the callers' threads
    ///   the same statements, interleaved with HTTP work, cost a replay 22–45% more CPU
    ///   (fewer instructions, each slower), and 21–32% fewer replays went through.
    ///
    /// The caller's thread (an async runtime's worker, usually) runs one indexed point read
    /// of one row: a few microseconds from SQLite's or the operating system's page cache,
    /// the time of a few disk reads when its pages are in neither (a file far larger than
    /// memory). It never waits for a connection or a lock: when every reader connection is
    /// in use, or another process holds the file (`SQLITE_BUSY`), the claim goes to a
    /// reader thread as without this.
    pub fn inline_look_ups(mut self, inline: bool) -> Self {
        self.inline_look_ups = inline;
        self
    }
}

/// What the file holds, as counted against [`SqliteOptions::max_records`] and
/// [`SqliteOptions::max_bytes`]: expired rows not yet swept included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Rows in the file.
    pub records: u64,
    /// Their bytes, as [`RECORD_OVERHEAD`] says.
    pub bytes: u64,
}

/// The SQLite store. Cloning is cheap and shares the writer, the readers and the waiters.
///
/// Dropping the last clone stops the threads after the batch in hand (joining them, so
/// briefly blocking the dropping thread), syncs the WAL in relaxed mode, and closes the
/// file.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// The reader threads' connections, lent for claims' look-ups on the caller's thread
    /// (empty without [`SqliteOptions::inline_look_ups`]). Declared first, so dropped
    /// before the senders below close the threads' queues: a reader thread then holds its
    /// connection's last reference and closes it in turn with the others.
    look_ups: Box<[reader::Shared]>,
    /// The readers' busy timeout, restored after each look-up here.
    busy_timeout: Duration,
    commands: Sender<Command>,
    queries: Sender<Query>,
    waiters: Arc<Waiters>,
    path: PathBuf,
    durability: Durability,
    /// Requests sent to the writer and to the readers: see [`SqliteStore::requests_sent`].
    writer_requests: AtomicU64,
    reader_requests: AtomicU64,
    inline_reads: AtomicU64,
    /// The count of deletes shared with other processes on the file (`erasures.rs`).
    erasures: Option<Arc<ErasureFile>>,
    /// Declared last, so dropped last: the senders above are gone by then, which is what
    /// lets the threads it joins finish.
    threads: Threads,
}

/// Joins the store's threads on drop.
#[derive(Default)]
struct Threads(Vec<JoinHandle<()>>);

impl Threads {
    fn spawn(&mut self, name: String, body: impl FnOnce() + Send + 'static) -> Result<(), StoreError> {
        let handle = std::thread::Builder::new().name(name).spawn(body).map_err(StoreError::unavailable)?;
        self.0.push(handle);
        Ok(())
    }
}

/// Closes a thread's connection, one thread at a time. SQLite folds the WAL into the
/// database and removes it when the last connection closes, and a closing connection
/// knows it is the last by taking an exclusive lock: connections of this store closing
/// at the same instant would each see the others and all leave the WAL behind.
fn close_in_turn(turn: &Mutex<()>, conn: impl Sized) {
    let _turn = turn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    drop(conn);
}

impl Drop for Threads {
    fn drop(&mut self) {
        for handle in self.0.drain(..) {
            // A thread that panicked has already dropped the replies it held; there is
            // nothing left to clean up.
            let _ = handle.join();
        }
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("durability", &self.inner.durability)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens the store at `path`, creating the file and its schema when missing (not its
    /// directory), migrating an older schema, and starting the writer and reader threads.
    ///
    /// Opening does blocking file I/O (and waits up to the busy timeout for another
    /// process's lock): call it at start-up, or from `spawn_blocking`.
    ///
    /// # Errors
    ///
    /// - [`StoreError::Corrupt`]: the file is not a SQLite database, is damaged, belongs
    ///   to another application, or was written by a newer Oncely;
    /// - [`StoreError::InvalidRequest`]: the path cannot hold a WAL-mode database
    ///   (`:memory:`);
    /// - [`StoreError::Unavailable`]: the path cannot be opened (a directory, a missing
    ///   parent, no permission) or another process held the lock past the busy timeout.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let writer_conn = schema::open_writer(&path, &options)?;
        let erasures = match ErasureFile::open(&path) {
            Ok(file) => Some(Arc::new(file)),
            Err(error) => {
                let file = ErasureFile::path_for(&path);
                tracing::warn!(%error, file = %file.display(), "no count of deletes beside the database: other processes' replay caches will see this one's deletes late");
                None
            }
        };
        let reader_conns = (0..options.readers)
            .map(|_| schema::open_reader(&path, &options).map(|conn| Arc::new(Mutex::new(conn))))
            .collect::<Result<Vec<reader::Shared>, _>>()?;

        let (commands, command_queue) = mpsc::channel();
        let (queries, query_queue) = mpsc::channel();
        let waiters = Arc::new(Waiters::default());
        let look_ups = if options.inline_look_ups { reader_conns.clone().into() } else { Box::default() };
        let mut inner = Inner {
            look_ups,
            busy_timeout: options.busy_timeout,
            commands,
            queries,
            waiters: Arc::clone(&waiters),
            path,
            durability: options.durability,
            writer_requests: AtomicU64::new(0),
            reader_requests: AtomicU64::new(0),
            inline_reads: AtomicU64::new(0),
            erasures: erasures.clone(),
            threads: Threads::default(),
        };
        // Should a spawn fail, dropping `inner` drops the senders and then joins the
        // threads already started, which see their queue closed and stop.
        let writer = Writer::new(writer_conn, command_queue, waiters, erasures, &options);
        let closing = Arc::new(Mutex::new(()));
        let turn = Arc::clone(&closing);
        inner.threads.spawn("oncely-sqlite-writer".into(), move || close_in_turn(&turn, writer.run()))?;
        let query_queue = Arc::new(Mutex::new(query_queue));
        for (n, conn) in reader_conns.into_iter().enumerate() {
            let queue = Arc::clone(&query_queue);
            let turn = Arc::clone(&closing);
            inner
                .threads
                .spawn(format!("oncely-sqlite-reader-{n}"), move || close_in_turn(&turn, reader::run(conn, queue)))?;
        }
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The count of deletes that every process opening this file shares, for a replay
    /// cache (`oncely::store::ReplayCache`, feature `cache`) to see deletes made through
    /// other processes (`oncely keys delete`, another gateway) as soon as they return:
    /// give it to `ReplayCacheBuilder::erasures`.
    /// The count is the length of a file beside the database (`PATH-erasures`), one
    /// `lseek` per read; the store bumps it after every commit that deleted a row, before
    /// answering (the guarantees and their limits are in `src/erasures.rs`). `None` when
    /// that file could not be opened (a read-only directory, no permission): this
    /// process's deletes then do not bump it, and a cache here cannot see other
    /// processes' deletes before its time-to-live.
    ///
    /// ```no_run
    /// use oncely::store::ReplayCache;
    /// use oncely_sqlite::{SqliteOptions, SqliteStore};
    ///
    /// # fn main() -> Result<(), oncely::StoreError> {
    /// let store = SqliteStore::open("oncely.db", SqliteOptions::default())?;
    /// let cache = match store.erasures() {
    ///     Some(erasures) => ReplayCache::builder(store).erasures(erasures).build(),
    ///     None => ReplayCache::disabled(store),
    /// };
    /// # let _ = cache; Ok(()) }
    /// ```
    pub fn erasures(&self) -> Option<Arc<dyn oncely::store::Erasures>> {
        self.inner.erasures.clone().map(|file| file as Arc<dyn oncely::store::Erasures>)
    }

    /// The durability the store was opened with.
    pub fn durability(&self) -> Durability {
        self.inner.durability
    }

    /// What the file holds, as counted against its bounds: one row read.
    pub async fn usage(&self) -> Result<Usage, StoreError> {
        self.read(|reply| Query::Usage { reply }).await
    }

    /// How many requests this store (all its clones) has sent to its writer thread and to
    /// its reader threads, and how many look-ups it ran on callers' threads, since it was
    /// opened: for tests that prove which path a call takes (a replay: one read, a reader
    /// request or an inline look-up, and no writer request).
    #[doc(hidden)]
    pub fn requests_sent(&self) -> RequestsSent {
        RequestsSent {
            inline: self.inner.inline_reads.load(Ordering::Relaxed),
            writer: self.inner.writer_requests.load(Ordering::Relaxed),
            reader: self.inner.reader_requests.load(Ordering::Relaxed),
        }
    }

    /// Sends a change to the writer and waits for its answer, which comes after the
    /// transaction carrying it commits.
    async fn write<T>(&self, write: impl FnOnce(Reply<T>) -> Write) -> Result<T, StoreError> {
        self.send_to_writer(|reply| Command::Write(write(reply))).await
    }

    /// Sends a command to the writer thread's queue and waits for its answer. The only
    /// way into that queue. Awaiting the answer holds no runtime thread: the writer runs
    /// on its own thread and answers on a oneshot channel.
    async fn send_to_writer<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.inner.writer_requests.fetch_add(1, Ordering::Relaxed);
        self.inner.commands.send(command(reply)).map_err(|_| stopped("writer"))?;
        answer.await.map_err(|_| stopped("writer"))?
    }

    /// Sends a query to a reader and waits for its answer. The query runs on a reader
    /// thread; the caller's task only awaits a oneshot channel, so no runtime thread is
    /// held while SQLite reads.
    async fn read<T>(&self, query: impl FnOnce(Reply<T>) -> Query) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.inner.reader_requests.fetch_add(1, Ordering::Relaxed);
        self.inner.queries.send(query(reply)).map_err(|_| stopped("reader"))?;
        answer.await.map_err(|_| stopped("reader"))?
    }
}

impl SqliteStore {
    /// A claim's look-up on this thread, if a reader's connection is free and SQLite is
    /// not busy (see `reader::look_up_here`); `None` sends it to a reader thread. Each
    /// thread starts at a connection of its own (the threads that call it first take
    /// turns), so that two runtime workers seldom reach for the same one.
    fn look_up_here(&self, key: &StorageKey, fingerprint: Option<&Fingerprint>) -> Option<Option<ClaimOutcome>> {
        if self.inner.look_ups.is_empty() {
            return None;
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static FIRST: usize = NEXT.fetch_add(1, Ordering::Relaxed);
        }
        let first = FIRST.try_with(|first| *first).unwrap_or(0);
        let found = reader::look_up_here(&self.inner.look_ups, first, self.inner.busy_timeout, key, fingerprint)?;
        self.inner.inline_reads.fetch_add(1, Ordering::Relaxed);
        Some(found)
    }
}

/// Requests a store has sent to its threads: see [`SqliteStore::requests_sent`].
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestsSent {
    /// To the writer thread: each is part of a write transaction.
    pub writer: u64,
    /// To the reader threads: each is one read-only statement.
    pub reader: u64,
    /// Claims' look-ups run on the caller's thread instead
    /// ([`SqliteOptions::inline_look_ups`]): one read-only statement each.
    pub inline: u64,
}

fn stopped(which: &str) -> StoreError {
    StoreError::unavailable(format!("the SQLite store's {which} thread stopped"))
}

impl Store for SqliteStore {
    /// Looks the key up on a reader first: a replay, a mismatch or a live lease is
    /// answered there, in one read-only statement that never reaches the writer and
    /// writes nothing (see `reader::found` in `src/reader.rs`). Only a claim that must write (the key is
    /// absent, expired, or held by a lapsed lease) goes on to the writer, which decides
    /// again under the write lock (see `writer::claim`).
    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        let (key, fingerprint) = (*request.storage_key(), request.fingerprint().copied());
        let found = match self.look_up_here(&key, fingerprint.as_ref()) {
            Some(found) => found,
            None => self.read(|reply| Query::Claim { key, fingerprint, reply }).await?,
        };
        if let Some(outcome) = found {
            return Ok(outcome);
        }
        let request = ClaimJob::from(request);
        self.write(|reply| Write::Claim { request, reply }).await
    }

    async fn complete(&self, claim: Claim, payload: Bytes, retention: Duration) -> Result<(), StoreError> {
        self.write(|reply| Write::Complete { claim, payload, retention, reply }).await
    }

    async fn release(&self, claim: Claim) -> Result<(), StoreError> {
        self.write(|reply| Write::Release { claim, reply }).await
    }

    async fn touch(&self, claim: Claim, lease: Duration) -> Result<(), StoreError> {
        self.write(|reply| Write::Touch { claim, lease, reply }).await
    }

    async fn first_seen(&self, request: &FirstSeen<'_>) -> Result<bool, StoreError> {
        let (storage_key, key, scope, window) =
            (*request.storage_key(), request.key().clone(), request.scope().clone(), request.window());
        self.write(|reply| Write::FirstSeen { storage_key, key, scope, window, reply }).await
    }

    /// One writer request for the whole batch, applied in one transaction, all or
    /// nothing (see `writer::record_hits`). An empty batch costs nothing.
    async fn record_hits(&self, hits: &[(StorageKey, u64)]) -> Result<(), StoreError> {
        if hits.is_empty() {
            return Ok(());
        }
        let hits = hits.to_vec();
        self.write(|reply| Write::RecordHits { hits, reply }).await
    }

    /// Registers the waiter first, then reads the record: a change committed before the
    /// read shows in it (the future resolves at once when the record is not in progress,
    /// or when the read fails: waiters re-check), and a change committed after it wakes
    /// the registration. Only changes made through this store (any clone) wake it.
    fn subscribe(&self, key: &StorageKey) -> Notified {
        let subscription = self.inner.waiters.subscribe(*key);
        let (store, key) = (self.clone(), *key);
        Box::pin(async move {
            let in_progress = store.read(|reply| Query::InProgress { key, reply }).await;
            if matches!(in_progress, Ok(true)) {
                subscription.await;
            }
        })
    }
}

impl StoreAdmin for SqliteStore {
    async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        let key = *key;
        self.read(|reply| Query::Get { key, reply }).await
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let key = *key;
        self.write(|reply| Write::Delete { key, reply }).await
    }

    /// Runs the sweep now, a batch per transaction between other requests, until no
    /// expired record is left; answers how many were removed after the call.
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.send_to_writer(Command::Purge).await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.read(|reply| Query::Stats { reply }).await
    }

    /// Asks the writer for a probe (see `Writer::probe`: it takes SQLite's write lock,
    /// and writes a row while the last write failed), then reads the usage row through a
    /// reader. Unavailable while writes cannot proceed, not only while reads fail: a
    /// gateway whose store can only read should not be sent requests. Costs no disk
    /// write while writes succeed; waits up to the busy timeout for another process's
    /// lock.
    async fn ping(&self) -> Result<(), StoreError> {
        self.send_to_writer(Command::Probe).await?;
        self.usage().await.map(|_| ())
    }

    async fn list(&self, after: Option<StorageKey>, limit: usize) -> Result<Vec<Record>, StoreError> {
        self.read(|reply| Query::List { after, limit, reply }).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use oncely::{ClaimRequest, Scope};

    use super::*;

    const RETENTION: Duration = Duration::from_secs(3600);

    /// A store with inline look-ups on two readers, and a key in it completed with `b"done"`.
    async fn store_with_a_completed_key() -> (tempfile::TempDir, SqliteStore, ClaimRequest<'static>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = SqliteOptions::default().readers(2).no_sweeper().inline_look_ups(true);
        let store = SqliteStore::open(dir.path().join("oncely.db"), options).expect("open");
        // Leaked: the request borrows them, and it goes to a spawned task.
        let key = Box::leak(Box::new(oncely_testkit::unique_key()));
        let scope = Box::leak(Box::new(Scope::global()));
        let request = ClaimRequest::new(scope, key, None, RETENTION, RETENTION);
        let ClaimOutcome::Acquired { .. } = store.claim(&request).await.expect("claim") else { panic!("a new key") };
        store.complete(request.claim(), Bytes::from_static(b"done"), RETENTION).await.expect("complete");
        (dir, store, request)
    }

    /// Returns once a request beyond the first `sent` has gone to a reader thread: the
    /// signal that a claim's look-up did not run on the caller's thread. (The bound is for
    /// a failure: a look-up that waited here for a connection would never be sent.)
    async fn sent_to_a_reader(store: &SqliteStore, sent: u64) {
        tokio::time::timeout(Duration::from_secs(60), async {
            while store.requests_sent().reader == sent {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the look-up was sent to a reader thread");
    }

    fn replayed(outcome: &ClaimOutcome) -> bool {
        matches!(outcome, ClaimOutcome::Replay(replay) if replay.payload == "done")
    }

    /// A claim whose look-up finds no connection free here (each in use by another
    /// thread) goes to a reader thread, which answers once a connection is free; one
    /// poisoned connection is passed over for the next free one, and when none is free
    /// the reader thread, which clears the poison, answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[expect(clippy::await_holding_lock, reason = "the test holds connections while a claim runs, on purpose")]
    async fn a_claim_whose_look_up_cannot_run_here_is_answered_by_a_reader_thread() {
        let (_dir, store, request) = store_with_a_completed_key().await;
        let before = store.requests_sent();

        // Every connection in use: the claim waits for a reader thread, not for a lock here.
        let held: Vec<_> = store.inner.look_ups.iter().map(|conn| conn.lock().expect("lock")).collect();
        let claim = tokio::spawn({
            let store = store.clone();
            async move { store.claim(&request).await }
        });
        sent_to_a_reader(&store, before.reader).await;
        assert!(!claim.is_finished(), "the reader thread waits for a connection too");
        drop(held);
        let outcome = claim.await.expect("task").expect("claim");
        assert!(replayed(&outcome), "{outcome:?}");
        let after = store.requests_sent();
        assert_eq!(
            (after.inline, after.writer),
            (before.inline, before.writer),
            "nothing ran here, nothing was written"
        );

        // The first connection poisoned (a thread panicked holding it): the next one serves.
        let first = Arc::clone(&store.inner.look_ups[0]);
        let poisoner = std::thread::spawn(move || {
            let _guard = first.lock().expect("lock");
            panic!("poison the connection's lock");
        });
        assert!(poisoner.join().is_err());
        assert!(store.inner.look_ups[0].is_poisoned());
        for _ in 0..4 {
            assert!(replayed(&store.claim(&request).await.expect("claim")));
        }
        let now = store.requests_sent();
        assert_eq!(now.inline, after.inline + 4, "each look-up ran here, on the connection not poisoned");
        assert_eq!(now.reader, after.reader);

        // The other one in use too: the look-up goes to a reader thread, which answers
        // on whichever connection its thread owns (clearing the poison on the first).
        let in_use = store.inner.look_ups[1].lock().expect("lock");
        let claim = tokio::spawn({
            let store = store.clone();
            async move { store.claim(&request).await }
        });
        sent_to_a_reader(&store, now.reader).await;
        drop(in_use);
        assert!(replayed(&claim.await.expect("task").expect("claim")));
        let last = store.requests_sent();
        assert_eq!((last.inline, last.reader), (now.inline, now.reader + 1));
    }
}
