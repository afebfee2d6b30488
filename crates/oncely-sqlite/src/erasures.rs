//! The count of deletes that every process opening one database file shares: the length
//! of a file beside the database (`PATH-erasures`), which grows by one byte per commit
//! that deleted a row. (A sparse file: the bytes are a hole and take no disk.)
//!
//! It is what lets a process that keeps copies of completed records (a
//! `oncely::store::ReplayCache` given [`SqliteStore::erasures`](crate::SqliteStore::erasures))
//! see a delete made through another process (`oncely keys delete`, another gateway on
//! the same file) at once, at the cost of one `lseek` per cached replay (on a descriptor
//! of the reading thread's own: see [`ErasureFile`]).
//!
//! # Guarantees, and where they are kept
//!
//! - **Bumped after the commit, before the answer.** The writer thread bumps the count
//!   once for every batch of writes that deleted a row, after that transaction commits
//!   (or fails: a spurious bump costs a cache miss, nothing more) and before any caller
//!   of the batch is answered (`Writer::run_batch` in `src/writer.rs`). So once a
//!   `delete` has returned, or even once its transaction has committed and its caller has
//!   gone away, every later read of the count, in any process, sees a value it never saw
//!   before the commit: the contract of [`oncely::store::Erasures`]. A caller that read
//!   the count before the commit and caches a record it read before the commit has that
//!   record disowned by the change.
//! - **A read is atomic.** The count is the file's length, which the kernel updates and
//!   reports as one 64-bit value: a read that overlaps a bump sees the length before it or
//!   after it, never a mix. (A counter kept in the file's bytes would not be: a `pread`
//!   racing a `pwrite` can return some bytes of each, a value that may equal an old one.)
//! - **Increments do not get lost between processes**: [`ErasureFile::bump`] holds an
//!   exclusive `flock` on the file across its read and its growth. It waits at most
//!   [`LOCK_WAIT`] for a lock someone else holds, then fails.
//! - **A failed bump is logged, not hidden**: the delete has committed and is answered
//!   as done; other processes' caches then see it only when their entries end (their
//!   time-to-live). So does a process that could not open the file at all
//!   ([`SqliteStore::erasures`](crate::SqliteStore::erasures) is then `None`, and
//!   `oncely keys delete` says so).
//! - **Not durable, and need not be.** The count is never synced: after a crash of the
//!   machine no process holds a copy to disown. Truncating or removing the file while
//!   processes use it can hand back old values (or hide later bumps from them, which
//!   keep the old file open); their caches may then answer up to their time-to-live.
//!   Leave it beside the database, as with SQLite's own `-wal` and `-shm`. It is created
//!   with the database's permissions and, where the process may, its owner, so that a
//!   gateway running as the database's owner can open a count that `sudo oncely keys
//!   delete` created.
//! - **Shared only on one machine**, as the database itself is (WAL mode needs shared
//!   memory).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The longest [`ErasureFile::bump`] waits for another holder of the file's lock. Bumps
/// hold it for two system calls, so only a stranger holding it makes this matter.
pub(crate) const LOCK_WAIT: Duration = Duration::from_secs(1);

/// The open counter file of one database; see the [module docs](self).
#[derive(Debug)]
pub(crate) struct ErasureFile {
    /// Bumps (and their lock) go through this descriptor.
    file: File,
    /// Reads go through one of these, picked by the reading thread ([`reader_slot`]):
    /// opens of their own, so that threads reading at once on different cores do not
    /// contend on one open file's reference count and position lock (`lseek` takes both).
    readers: Box<[File]>,
}

/// The most read descriptors a count keeps: one per core, up to this many.
const MAX_READERS: usize = 16;

/// Which of a count's read descriptors this thread uses: threads are numbered as they
/// first read, so the async workers (the threads that read on every cached replay) get
/// descriptors of their own. A bump reads through the locked descriptor instead, so the
/// writer thread takes no slot from a worker.
fn reader_slot() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static READER_SLOT: usize = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    READER_SLOT.with(|slot| *slot)
}

impl ErasureFile {
    /// Where the count of the database at `db` lives: `db` with `-erasures` appended.
    pub(crate) fn path_for(db: &Path) -> PathBuf {
        let mut path = db.as_os_str().to_owned();
        path.push("-erasures");
        PathBuf::from(path)
    }

    /// Opens the count of the database at `db` (which exists), creating it empty, with
    /// the database's permissions and owner (as far as this process may set them), when
    /// missing.
    pub(crate) fn open(db: &Path) -> io::Result<Self> {
        let path = Self::path_for(db);
        let file = match OpenOptions::new().read(true).write(true).create_new(true).open(&path) {
            Ok(file) => {
                let database = std::fs::metadata(db)?;
                file.set_permissions(database.permissions())?;
                // Only root may give a file away; anyone else already owns it as the
                // database's owner would, or shares its group.
                let _ = std::os::unix::fs::fchown(&file, Some(database.uid()), Some(database.gid()));
                file
            }
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                OpenOptions::new().read(true).write(true).open(&path)?
            }
            Err(error) => return Err(error),
        };
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        let readers = (0..cores.min(MAX_READERS)).map(|_| File::open(&path)).collect::<io::Result<_>>()?;
        Ok(Self { file, readers })
    }

    /// The count now: the file's length, read with one `lseek` to the end (the handle's
    /// position is used for nothing else), no lock. `lseek` is the cheapest call that
    /// reports the length: `fstat`, which std's `metadata` makes as a `statx`, fills a
    /// whole structure, and cost a cached replay 13% of its CPU in the gateway
    /// (`bench/ab.sh replays`, docs/benchmarks.md, stop 40).
    pub(crate) fn read(&self) -> io::Result<u64> {
        let reader = &self.readers[reader_slot() % self.readers.len()];
        (&*reader).seek(SeekFrom::End(0))
    }

    /// Adds one to the count (grows the file by a byte of hole), under an exclusive
    /// `flock` so that bumps from several processes all count; waits at most
    /// [`LOCK_WAIT`] for it. Not synced (see the module docs).
    pub(crate) fn bump(&self) -> io::Result<()> {
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match self.file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "the count's lock is held elsewhere"));
                }
                Err(std::fs::TryLockError::Error(error)) => return Err(error),
            }
        }
        let bumped = (&self.file).seek(SeekFrom::End(0)).and_then(|n| self.file.set_len(n.saturating_add(1)));
        let unlocked = self.file.unlock();
        bumped.and(unlocked)
    }
}

impl oncely::store::Erasures for ErasureFile {
    fn generation(&self) -> Option<u64> {
        self.read().ok()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A file standing for the database, in a directory of its own (kept alive by the
    /// returned guard).
    fn database() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("oncely.db");
        std::fs::write(&db, b"").expect("a database");
        (dir, db)
    }

    #[test]
    fn bumps_from_every_opener_count_and_every_opener_sees_them() {
        let (_dir, db) = database();
        let a = ErasureFile::open(&db).expect("open");
        let b = ErasureFile::open(&db).expect("open again");
        assert_eq!(a.read().expect("read"), 0);
        std::thread::scope(|scope| {
            for file in [&a, &b] {
                scope.spawn(move || {
                    for _ in 0..500 {
                        file.bump().expect("bump");
                    }
                });
            }
        });
        assert_eq!(a.read().expect("read"), 1000, "no bump lost between two openers");
        assert_eq!(b.read().expect("read"), 1000);
        // Every thread reads through a descriptor of its own choosing: all see the count.
        std::thread::scope(|scope| {
            for _ in 0..2 * MAX_READERS {
                scope.spawn(|| assert_eq!(a.read().expect("read"), 1000));
            }
        });
        // Opening an existing count keeps it.
        assert_eq!(ErasureFile::open(&db).expect("reopen").read().expect("read"), 1000);
    }

    #[test]
    fn the_count_is_created_with_the_database_permissions() {
        let (_dir, db) = database();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        ErasureFile::open(&db).expect("open");
        let mode = std::fs::metadata(ErasureFile::path_for(&db)).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
    }

    #[test]
    fn a_bump_gives_up_on_a_lock_held_elsewhere() {
        let (_dir, db) = database();
        let file = ErasureFile::open(&db).expect("open");
        let stranger = File::open(ErasureFile::path_for(&db)).expect("open");
        stranger.lock().expect("lock");
        assert_eq!(file.bump().expect_err("held").kind(), io::ErrorKind::TimedOut);
        stranger.unlock().expect("unlock");
        file.bump().expect("bump");
        assert_eq!(file.read().expect("read"), 1);
    }
}
