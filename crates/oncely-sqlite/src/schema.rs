//! Opening connections: the file, WAL mode, the schema and its migrations.
//!
//! The schema is embedded and versioned by `PRAGMA user_version`: [`MIGRATIONS`] holds
//! one script per version, and [`migrate`] runs the missing ones in one `BEGIN IMMEDIATE`
//! transaction (SQLite's DDL and `user_version` are transactional), so opening is
//! repeatable, two processes opening one new file at once create the schema once, and a
//! crash mid-migration leaves the previous version. A file written by a newer version, or
//! a SQLite file of another application, is refused with [`StoreError::Corrupt`] and left
//! untouched.

use std::fmt;
use std::path::{Path, PathBuf};

use oncely::StoreError;
use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};

use crate::{Durability, SqliteOptions};

/// `PRAGMA application_id` of an Oncely database: "oncl".
const APPLICATION_ID: i32 = 0x6f6e_636c;

/// What a row of `records` counts against [`crate::SqliteOptions::max_bytes`], as SQL
/// over the row named `$row`: [`crate::RECORD_OVERHEAD`] plus the bytes of its key, scope
/// and payload. Frozen into the version 2 migration's triggers: changing it needs a new
/// migration that recreates them and recounts.
macro_rules! cost {
    ($row:literal) => {
        concat!(
            "(256 + octet_length(",
            $row,
            ".key) + octet_length(",
            $row,
            ".scope) + coalesce(octet_length(",
            $row,
            ".payload), 0))"
        )
    };
}

/// The schema, one script per version: `MIGRATIONS[n]` takes `user_version` n to n + 1.
///
/// - `storage_key`: the 32-byte SHA-256 of scope and key; the primary key.
/// - `key`, `scope`: the raw key and scope, for inspection only.
/// - `state`: 0 in progress (`claim_id` and `lease_until` set, `payload` null), 1 completed
///   (`payload`, `completed_at` and `hits` meaningful, `claim_id` null).
/// - Times are integer milliseconds since the Unix epoch (see [`crate::codec`]).
/// - `records_by_expiry` serves the sweep (`expires_at <= now`) and `stats` (it covers
///   `state`, so counting never reads the rows and their payloads).
///
/// The table is `STRICT` and its `CHECK`s tie the columns to the state, so a bug cannot
/// store a record that reads back as something else.
///
/// Version 2 adds `records_usage`, the one row that counts what `records` holds against
/// the store's bounds ([`crate::SqliteOptions::max_records`] and
/// [`crate::SqliteOptions::max_bytes`]): `records` rows, expired ones included (they
/// take disk until swept), and `bytes` as [`crate::RECORD_OVERHEAD`] says. It is filled
/// once by the migration (one scan of an existing table) and from then on kept by
/// triggers on `records`, in the same transaction as every insert, update and delete:
/// so it is right for every process sharing the file, survives restarts, and a claim
/// reads one row to check the bounds instead of counting.
///
/// Version 3 adds `records_usage.in_progress`, the rows in progress (`state = 0`),
/// expired ones included, kept by the same triggers and one more on a change of `state`
/// (an upsert's update fires it as an update does). With it, `stats` counts the
/// unexpired records as the usage row's counts less the expired rows not yet swept, read
/// from `records_by_expiry`, instead of reading the whole index (1 s at 10 million
/// records, on every metrics scrape). The migration counts the rows in progress once,
/// reading the whole index under the write lock (about a second at 10 million rows):
/// other processes on the file wait for it within their busy timeout.
///
/// Version 4 adds `hit_counts`, where the engine's flushes of replay counts go
/// (`writer::record_hits`): one 40-byte row per completed record that was replayed, in a
/// table of its own. A record's hits are `records.hits` (the first-seen repeats, and any
/// count flushed before version 4) plus its `hit_counts` row. Before, each flush updated
/// `records.hits` in place, and in a large table every replayed key's row sits on a page
/// of its own: each flushed key dirtied a 4 KiB page of the table (5.2–5.6 KB of page cache
/// per replay at 10 million records, docs/benchmarks.md); the counts of every replayed
/// key now share a few pages. A counts row belongs to one life of its record, and two
/// triggers end it with that life, in the statement that ends it: `hit_counts_delete` when the
/// record's row is deleted (release, delete, the sweep, making room), `hit_counts_reset`
/// when a statement starts a new record at the key on an existing row (an expired
/// record replaced by a claim or a first-seen mark; a lapsed lease taken over), which
/// every such statement marks by setting `hits = 0`. So a key's counts row exists only
/// while the completed record it was created for does (expired, perhaps, but not yet
/// deleted or replaced), and the flush counts a key that has one without reading
/// `records` at all. Its rows are not counted in `records_usage`: a row is at most one
/// per record and within the per-record overhead that [`crate::RECORD_OVERHEAD`] charges.
/// The migration only creates; it moves no count (a count flushed before stays in
/// `records.hits`). A process of an older build that has the file open while another
/// migrates it reads `records.hits` alone, so it reports too few hits until restarted;
/// the triggers keep the counts right whoever writes.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE records (
        storage_key  BLOB    NOT NULL PRIMARY KEY CHECK (length(storage_key) = 32),
        key          TEXT    NOT NULL,
        scope        TEXT    NOT NULL,
        fingerprint  BLOB    CHECK (fingerprint IS NULL OR length(fingerprint) = 32),
        created_at   INTEGER NOT NULL,
        expires_at   INTEGER NOT NULL,
        state        INTEGER NOT NULL,
        claim_id     BLOB    CHECK (claim_id IS NULL OR length(claim_id) = 16),
        lease_until  INTEGER,
        payload      BLOB,
        completed_at INTEGER,
        hits         INTEGER NOT NULL DEFAULT 0,
        CHECK ((state = 0 AND claim_id IS NOT NULL AND lease_until IS NOT NULL AND payload IS NULL)
            OR (state = 1 AND claim_id IS NULL AND payload IS NOT NULL AND completed_at IS NOT NULL))
    ) STRICT;
    CREATE INDEX records_by_expiry ON records (expires_at, state);
",
    concat!(
        "
    CREATE TABLE records_usage (
        id      INTEGER NOT NULL PRIMARY KEY CHECK (id = 0),
        records INTEGER NOT NULL,
        bytes   INTEGER NOT NULL
    ) STRICT;
    INSERT INTO records_usage (id, records, bytes)
        SELECT 0, count(*), coalesce(sum(",
        cost!("records"),
        "), 0) FROM records;
    CREATE TRIGGER records_usage_insert AFTER INSERT ON records BEGIN
        UPDATE records_usage SET records = records + 1, bytes = bytes + ",
        cost!("new"),
        " WHERE id = 0;
    END;
    CREATE TRIGGER records_usage_delete AFTER DELETE ON records BEGIN
        UPDATE records_usage SET records = records - 1, bytes = bytes - ",
        cost!("old"),
        " WHERE id = 0;
    END;
    CREATE TRIGGER records_usage_update AFTER UPDATE OF key, scope, payload ON records
        WHEN ",
        cost!("new"),
        " IS NOT ",
        cost!("old"),
        " BEGIN
        UPDATE records_usage SET bytes = bytes + ",
        cost!("new"),
        " - ",
        cost!("old"),
        " WHERE id = 0;
    END;
"
    ),
    concat!(
        "
    ALTER TABLE records_usage ADD COLUMN in_progress INTEGER NOT NULL DEFAULT 0;
    UPDATE records_usage SET in_progress = (SELECT count(*) FROM records WHERE state = 0) WHERE id = 0;
    DROP TRIGGER records_usage_insert;
    CREATE TRIGGER records_usage_insert AFTER INSERT ON records BEGIN
        UPDATE records_usage SET records = records + 1, in_progress = in_progress + (new.state = 0), bytes = bytes + ",
        cost!("new"),
        " WHERE id = 0;
    END;
    DROP TRIGGER records_usage_delete;
    CREATE TRIGGER records_usage_delete AFTER DELETE ON records BEGIN
        UPDATE records_usage SET records = records - 1, in_progress = in_progress - (old.state = 0), bytes = bytes - ",
        cost!("old"),
        " WHERE id = 0;
    END;
    CREATE TRIGGER records_usage_state AFTER UPDATE OF state ON records WHEN new.state IS NOT old.state BEGIN
        UPDATE records_usage SET in_progress = in_progress + (new.state = 0) - (old.state = 0) WHERE id = 0;
    END;
"
    ),
    "
    CREATE TABLE hit_counts (
        storage_key BLOB    NOT NULL PRIMARY KEY CHECK (length(storage_key) = 32),
        hits        INTEGER NOT NULL CHECK (hits >= 0)
    ) STRICT, WITHOUT ROWID;
    CREATE TRIGGER hit_counts_delete AFTER DELETE ON records BEGIN
        DELETE FROM hit_counts WHERE storage_key = old.storage_key;
    END;
    CREATE TRIGGER hit_counts_reset AFTER UPDATE OF hits ON records WHEN new.hits = 0 BEGIN
        DELETE FROM hit_counts WHERE storage_key = new.storage_key;
    END;
",
];

/// The schema version this build reads and writes.
pub(crate) const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Opens (creating it if needed) the database for the writer thread: WAL mode, the
/// schema migrated, the durability settings of `options` applied.
pub(crate) fn open_writer(path: &Path, options: &SqliteOptions) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(|e| open_error(path, e))?;
    conn.busy_timeout(options.busy_timeout).map_err(|e| open_error(path, e))?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)).map_err(|e| open_error(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::InvalidRequest(format!(
            "{} cannot use write-ahead logging (journal mode {mode:?}); the SQLite store needs a file on a local disk",
            path.display()
        )));
    }
    migrate(&mut conn).map_err(|e| e.at(path))?;
    let synchronous = match options.durability {
        // FULL: in WAL mode, the WAL is fsynced at every commit (the writer lowers it to
        // NORMAL for batches that hold no completion; see `Writer::run_batch`).
        // `fullfsync` makes that fsync an F_FULLFSYNC on macOS, which a plain fsync is
        // not; SQLite ignores it elsewhere.
        Durability::Sync => "FULL",
        // NORMAL: no fsync at commit; the WAL is synced at checkpoints.
        Durability::Relaxed { .. } => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous).map_err(|e| open_error(path, e))?;
    if matches!(options.durability, Durability::Sync) {
        conn.pragma_update(None, "fullfsync", true).map_err(|e| open_error(path, e))?;
    }
    // Page cache: 64 MiB rather than SQLite's default 2 MiB. Keys are hashes, so claims
    // touch B-tree pages at random; with the default cache the writer re-read pages from
    // the file on most claims of a large table (`pread`: 10% of its CPU, docs/benchmarks.md).
    conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB).map_err(|e| open_error(path, e))?;
    map_file(&conn, path, options)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// The writer's page cache, in KiB (SQLite reads a negative `cache_size` as KiB).
const WRITER_CACHE_KIB: i64 = -64 * 1024;

/// Opens a read connection to a database [`open_writer`] prepared.
pub(crate) fn open_reader(path: &Path, options: &SqliteOptions) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| open_error(path, e))?;
    conn.busy_timeout(options.busy_timeout).map_err(|e| open_error(path, e))?;
    // Read connections never write: a bug that tries fails instead of bypassing the writer.
    conn.pragma_update(None, "query_only", true).map_err(|e| open_error(path, e))?;
    map_file(&conn, path, options)?;
    conn.set_prepared_statement_cache_capacity(16);
    Ok(conn)
}

/// Sets the connection's memory map of the file ([`SqliteOptions::mmap_size`]).
fn map_file(conn: &Connection, path: &Path, options: &SqliteOptions) -> Result<(), StoreError> {
    let bytes = i64::try_from(options.mmap_size).unwrap_or(i64::MAX);
    conn.pragma_update(None, "mmap_size", bytes).map_err(|e| open_error(path, e))
}

/// Why opening failed.
enum MigrateError {
    Sqlite(rusqlite::Error),
    Refused(String),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(error: rusqlite::Error) -> Self {
        Self::Sqlite(error)
    }
}

impl MigrateError {
    fn at(self, path: &Path) -> StoreError {
        match self {
            Self::Sqlite(error) => open_error(path, error),
            Self::Refused(why) => StoreError::Corrupt(format!("{}: {why}", path.display())),
        }
    }
}

/// Brings the schema to [`SCHEMA_VERSION`] in one immediate transaction.
fn migrate(conn: &mut Connection) -> Result<(), MigrateError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let application_id: i32 = tx.pragma_query_value(None, "application_id", |row| row.get(0))?;
    let version: i32 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if application_id != APPLICATION_ID && application_id != 0 {
        return Err(MigrateError::Refused(format!("not an Oncely database (application_id {application_id:#x})")));
    }
    if version > SCHEMA_VERSION {
        return Err(MigrateError::Refused(format!(
            "the schema is version {version}, newer than this build reads ({SCHEMA_VERSION}); upgrade Oncely"
        )));
    }
    if version == 0 {
        let tables: i64 = tx.query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))?;
        if tables > 0 {
            return Err(MigrateError::Refused(
                "not an Oncely database (it holds tables of another application)".into(),
            ));
        }
    }
    let start = usize::try_from(version).unwrap_or(0);
    for script in &MIGRATIONS[start..] {
        tx.execute_batch(script)?;
    }
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        tracing::info!(from = version, to = SCHEMA_VERSION, "migrated the SQLite store's schema");
    }
    Ok(())
}

/// An error from opening `path`, naming it.
#[derive(Debug)]
struct OpenError {
    path: PathBuf,
    source: rusqlite::Error,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot open the SQLite store at {}: {}", self.path.display(), self.source)
    }
}

impl std::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A file that is not a database (or a damaged one) is [`StoreError::Corrupt`]; a path
/// that cannot be opened (a directory, no permission, a missing parent) or a lock held
/// too long is [`StoreError::Unavailable`].
fn open_error(path: &Path, source: rusqlite::Error) -> StoreError {
    if matches!(source.sqlite_error_code(), Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt)) {
        StoreError::Corrupt(format!("{}: {source}", path.display()))
    } else {
        StoreError::Unavailable(Box::new(OpenError { path: path.to_path_buf(), source }))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_triggers_count_the_documented_overhead() {
        assert!(cost!("r").starts_with(&format!("({} + ", crate::RECORD_OVERHEAD)), "{}", cost!("r"));
    }
}
