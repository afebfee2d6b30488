//! The count of deletes that every process opening one database file shares: a file
//! beside the database (`PATH-erasures`), holding one little-endian `u64`.
//!
//! It is what lets a process that keeps copies of completed records (a
//! `oncely::store::ReplayCache` given [`SqliteStore::erasures`](crate::SqliteStore::erasures))
//! see a delete made through another process (`oncely keys delete`, another gateway on
//! the same file) at once, at the cost of one `pread` of 8 bytes per cached replay.
//!
//! # Guarantees, and where they are kept
//!
//! - **Bumped after the commit, before the answer.** The writer thread bumps the count
//!   once for every batch of writes that deleted a row, after that transaction commits
//!   and before any caller of the batch is answered (`Writer::run_batch` in
//!   `src/writer.rs`). So once a `delete` has returned, or even once its transaction has
//!   committed and its caller has gone away, every later read of the count, in any
//!   process, sees a value it never saw before the commit: the contract of
//!   [`oncely::store::Erasures`]. A caller that read the count before the commit and
//!   caches a record it read before the commit has that record disowned by the change.
//! - **Increments do not get lost between processes**: [`ErasureFile::bump`] holds an
//!   exclusive `flock` on the file across its read and its write.
//! - **Reads take no lock.** A read that overlaps a bump may see the old value (the bump
//!   has not returned, so neither has its delete) or a mix of old and new bytes; a mix is
//!   a value that differs from the old one, so the worst it costs is one trip to the
//!   store. A file shorter than 8 bytes (being created) reads as `None`: no cached answer.
//! - **Not durable, and need not be.** The count is never synced: it lives in the page
//!   cache that every process on the machine shares, and after a crash of the machine
//!   no process holds a copy to disown. Removing the file while processes have it open
//!   hides later bumps from them (they read the old file); their caches then fall back to
//!   the time-to-live. Leave it beside the database, as with SQLite's own `-wal` and
//!   `-shm`.
//! - **Shared only on one machine**, as the database itself is (WAL mode needs shared
//!   memory): processes on other machines would not see the page cache's value.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The open counter file of one database; see the [module docs](self).
#[derive(Debug)]
pub(crate) struct ErasureFile {
    file: File,
}

impl ErasureFile {
    /// Where the count of the database at `db` lives: `db` with `-erasures` appended.
    pub(crate) fn path_for(db: &Path) -> PathBuf {
        let mut path = db.as_os_str().to_owned();
        path.push("-erasures");
        PathBuf::from(path)
    }

    /// Opens (creating it when missing, at 8 zero bytes) the count of the database at
    /// `db`. Two processes creating it at once both end with one 8-byte file: the length
    /// is set under the exclusive lock and only when shorter.
    pub(crate) fn open(db: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(Self::path_for(db))?;
        if file.metadata()?.len() < 8 {
            file.lock()?;
            let grown = if file.metadata()?.len() < 8 { file.set_len(8) } else { Ok(()) };
            file.unlock()?;
            grown?;
        }
        Ok(Self { file })
    }

    /// The count now: one `pread`, no lock.
    pub(crate) fn read(&self) -> io::Result<u64> {
        let mut bytes = [0; 8];
        self.file.read_exact_at(&mut bytes, 0)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Adds one to the count, under an exclusive `flock` so that bumps from several
    /// processes all count. Not synced (see the module docs).
    pub(crate) fn bump(&self) -> io::Result<()> {
        self.file.lock()?;
        let bumped = self.read().and_then(|n| self.file.write_all_at(&n.wrapping_add(1).to_le_bytes(), 0));
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
    use super::*;

    #[test]
    fn bumps_from_every_opener_count_and_every_opener_sees_them() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("oncely.db");
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
        assert_eq!(std::fs::metadata(ErasureFile::path_for(&db)).expect("meta").len(), 8);
        // Opening an existing count keeps it.
        assert_eq!(ErasureFile::open(&db).expect("reopen").read().expect("read"), 1000);
    }

    #[test]
    fn a_short_file_reads_as_no_count() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("oncely.db");
        let file = ErasureFile::open(&db).expect("open");
        std::fs::OpenOptions::new()
            .write(true)
            .open(ErasureFile::path_for(&db))
            .expect("open")
            .set_len(3)
            .expect("cut");
        assert_eq!(oncely::store::Erasures::generation(&file), None);
    }
}
