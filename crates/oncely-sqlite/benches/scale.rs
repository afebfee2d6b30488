//! Scale: does the SQLite store's cost stay flat from a thousand to ten million records?
//!
//! The companion of `crates/oncely/benches/scale.rs` (the memory store). For each record
//! count N (env `SCALE_RECORDS`, default `1000,10000000`) it builds a database file of N
//! completed records, then for each durability (env `SCALE_DURABILITY`, default
//! `sync,relaxed`) opens a copy of that file through [`SqliteStore`], sweeper running,
//! and measures, for `SCALE_SECONDS` (default 5) each, after a 1 s warm-up:
//!
//! - `replay`: `Oncely::run` on preloaded keys drawn uniformly at random over all N, from
//!   32 concurrent tasks: one point read per replay on a reader thread. Uniform over N is
//!   the point: 1000 rows sit in SQLite's page cache, 10 million rows (gigabytes) do
//!   not, and each look-up descends the primary-key index and then the table. Replays
//!   run first, so that the next phase's new keys do not grow the table they read.
//! - `store_claim_replay`: the same look-ups through `Store::claim` alone, without the
//!   engine: no hit counted (so no flush through the writer), no JSON decode. Beside
//!   `replay`, it tells the store's share of a change from the engine's.
//! - `new_key`: `Oncely::run` on keys never seen before, from 32 concurrent tasks: a
//!   reader look-up, the claim and the completion through the single writer (group
//!   commit; in `sync` every completion batch is fsynced).
//!
//! And the disk one record costs: the file (database plus WAL, after a
//! `wal_checkpoint(TRUNCATE)`) divided by N, beside what the store counts against its
//! byte bound (`records_usage`, see `RECORD_OVERHEAD`). And the time of one
//! `StoreAdmin::stats` call (the usage row less the expired rows not yet swept): the
//! gateway calls it on each `/metrics` scrape.
//!
//! # The preload
//!
//! Through the store's one writer a preload runs at about 10,000 records a second (a
//! claim and a completion each, the second fsynced in `sync`), so 10 million would take
//! a quarter of an hour or more. Instead the file is created by opening the store once
//! (which creates the schema), closed, and filled with rusqlite directly, in
//! transactions of 100,000 rows, with the rows `complete` leaves (see `src/writer.rs`):
//! `state = 1`, `claim_id` and `lease_until` NULL, the payload, a 32-byte fingerprint,
//! `completed_at` = `created_at` = now and `expires_at` = now + 24 h in integer
//! milliseconds, `hits = 0`, keyed by `StorageKey::derive(&scope, &key)`. The
//! `records_usage` triggers run for every row, so the counts the store checks its bounds
//! against are right when it opens. Rows go in by record number, so their storage keys
//! (SHA-256) reach the primary-key index in random order, as a live store's do, and its
//! pages are as full as in a file that grew by claims. The fill is only setup: its
//! connection runs without a journal (`journal_mode = OFF`, set back to WAL at the end)
//! or syncs, with a 1 GiB page cache. Each durability runs on a copy of the filled file,
//! so that both start from the same N rows.
//!
//! ```text
//! cargo bench -p oncely-sqlite --bench scale                                            # 1k and 10M: ~7 GB of disk
//! SCALE_RECORDS=1000,100000 SCALE_SECONDS=2 cargo bench -p oncely-sqlite --bench scale  # a quick check
//! SCALE_DURABILITY=relaxed SCALE_DIR=/var/tmp cargo bench -p oncely-sqlite --bench scale # one durability, files elsewhere
//! SCALE_MMAP_SIZE=1073741824 cargo bench -p oncely-sqlite --bench scale                 # with a 1 GiB memory map (`SqliteOptions::mmap_size`)
//! ```
//!
//! Files go in a temporary directory under `SCALE_DIR` (default the system's temporary
//! directory), removed at the end. Records: 36-character UUID-shaped keys, the global
//! scope, one fingerprint, a ~100-byte JSON payload, 24 h retention. The store's bounds
//! are raised above what the run creates: its defaults (10 million rows, 1 GiB) would
//! refuse new keys in a file of 10 million such records.
//!
//! Also counted: the replay counts the engine flushes through the writer (`record_hits`,
//! one `UPDATE` per distinct key per flush interval) and drops (past 100,000 distinct
//! keys pending), read from the `metrics` counters by a minimal recorder. Replays of
//! 1000 keys cost the writer at most 1000 updates a second; replays spread over 10
//! million cost one random-row update per replay, up to the cap.
//!
//! The record shape, the phases and the counters are shared with the memory store's
//! bench, in `oncely_testkit::scale`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use oncely::{Scope, StorageKey, StoreAdmin};
use oncely_sqlite::{Durability, SqliteOptions, SqliteStore};
use oncely_testkit::scale::{
    HitCounters, Phase, RETENTION, TASKS, WARMUP, fingerprint, key, payload, phases, records_from_env, seconds_from_env,
};
use rusqlite::{Connection, params};

/// The sweeper's interval. The default (60 s) would never run inside a measured
/// window; every second, its delete of expired rows (by `records_by_expiry`) is part of
/// what is measured.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Room left for the records the `new_key` phase creates, above N.
const NEW_KEY_ROOM: u64 = 100_000_000;
/// Rows per transaction of the preload.
const FILL_BATCH: u64 = 100_000;

/// The store's options for a run on a file of `n` records.
fn options(n: u64, durability: Durability) -> SqliteOptions {
    SqliteOptions::default()
        .durability(durability)
        .max_records(n.saturating_add(NEW_KEY_ROOM))
        .max_bytes(u64::MAX)
        .sweep_interval(SWEEP_INTERVAL)
        .mmap_size(mmap_size_from_env())
}

/// [`SqliteOptions::mmap_size`] from env `SCALE_MMAP_SIZE` (bytes; `0` for none), else
/// the store's default (none): to compare the two.
fn mmap_size_from_env() -> u64 {
    std::env::var("SCALE_MMAP_SIZE").ok().and_then(|v| v.parse().ok()).unwrap_or(oncely_sqlite::DEFAULT_MMAP_SIZE)
}

/// The bytes of the database file and its WAL.
fn file_bytes(path: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    size(path) + size(Path::new(&wal))
}

/// Creates `path` holding `n` completed records (see the module docs); the seconds the
/// fill took.
fn build_file(path: &Path, n: u64) -> f64 {
    // Opening the store creates the schema (and its usage triggers); closing it folds
    // the WAL back and leaves the file to this connection alone.
    drop(SqliteStore::open(path, options(n, Durability::Sync)).expect("the store creates its file"));
    let started = Instant::now();
    let mut conn = Connection::open(path).expect("the preload opens the file");
    // Setup only, so no journal and no syncs: in WAL mode each commit would write the
    // index pages it dirtied twice (to the WAL, then back), and late in a 10M fill a
    // 100k-row commit dirties a good part of the primary-key index's leaves.
    let journal: String =
        conn.pragma_update_and_check(None, "journal_mode", "OFF", |row| row.get(0)).expect("journal_mode = OFF");
    assert!(journal.eq_ignore_ascii_case("off"), "the fill runs without a journal, not {journal}");
    conn.pragma_update(None, "synchronous", "OFF").expect("synchronous = OFF");
    conn.pragma_update(None, "cache_size", -(1 << 20)).expect("a 1 GiB page cache");
    let now_ms = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).expect("a sane clock").as_millis())
        .expect("milliseconds fit");
    let expires_at = now_ms + i64::try_from(RETENTION.as_millis()).expect("milliseconds fit");
    let (scope, fingerprint) = (Scope::global(), fingerprint());
    let mut index = 0;
    while index < n {
        let tx = conn.transaction().expect("a preload transaction");
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO records (storage_key, key, scope, fingerprint, created_at, expires_at, state, \
                     claim_id, lease_until, payload, completed_at, hits) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, NULL, NULL, ?7, ?5, 0)",
                )
                .expect("the preload insert prepares");
            for i in index..(index + FILL_BATCH).min(n) {
                let key = key(0, i);
                insert
                    .execute(params![
                        StorageKey::derive(&scope, &key).as_bytes(),
                        key.as_str(),
                        scope.as_str(),
                        fingerprint.as_bytes(),
                        now_ms,
                        expires_at,
                        payload(i),
                    ])
                    .expect("a preload row inserts");
            }
        }
        tx.commit().expect("a preload transaction commits");
        index = (index + FILL_BATCH).min(n);
        if n >= 1_000_000 && index % (n / 10).max(FILL_BATCH) < FILL_BATCH {
            let rate = index as f64 / started.elapsed().as_secs_f64();
            eprintln!("  preloaded {index} of {n} ({rate:.0}/s)");
        }
    }
    // Back to WAL, as the store left the file (it would set it again at its open), and
    // an empty WAL, so that the file's size is all records.
    let journal: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)).expect("journal_mode = WAL");
    assert!(journal.eq_ignore_ascii_case("wal"), "the file is back in WAL mode, not {journal}");
    let (busy, _, _): (i64, i64, i64) = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .expect("the checkpoint runs");
    assert_eq!(busy, 0, "nothing else holds the file during the checkpoint");
    let usage: (i64, i64) = conn
        .query_row("SELECT records, bytes FROM records_usage WHERE id = 0", [], |row| Ok((row.get(0)?, row.get(1)?)))
        .expect("the usage row reads");
    assert_eq!(usage.0, i64::try_from(n).expect("fits"), "the usage triggers counted every row");
    drop(conn);
    started.elapsed().as_secs_f64()
}

/// One line of the final table: a phase at one N and durability.
struct Row {
    records: u64,
    durability: &'static str,
    phase: Phase,
}

/// What the preload of N records cost.
struct Footprint {
    records: u64,
    seconds: f64,
    file_per_record: f64,
    counted_per_record: f64,
    /// One `StoreAdmin::stats` call after the preload, in milliseconds.
    stats_ms: f64,
}

fn durability_name(durability: Durability) -> &'static str {
    match durability {
        Durability::Sync => "sync",
        Durability::Relaxed { .. } => "relaxed",
    }
}

/// Opens a copy of `base` (`n` records) through the store and measures both phases.
async fn run_store(
    base: &Path,
    run: &Path,
    n: u64,
    durability: Durability,
    duration: Duration,
    counters: &HitCounters,
) -> Vec<Row> {
    std::fs::copy(base, run).expect("the preloaded file copies");
    let path = run.to_path_buf();
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(path, options(n, durability)))
        .await
        .expect("opening does not panic")
        .expect("the store opens the preloaded file");
    let name = durability_name(durability);
    let records = async || store.usage().await.expect("the usage row reads").records;
    let label = format!("sqlite {name}");
    let rows = phases(&label, &store, n, duration, counters, records).await;
    let rows = rows.into_iter().map(|phase| Row { records: n, durability: name, phase }).collect();

    // Dropping the store joins its threads: off the runtime's workers.
    tokio::task::spawn_blocking(move || drop(store)).await.expect("closing does not panic");
    std::fs::remove_file(run).expect("the run's file is removed");
    rows
}

/// `SCALE_DURABILITY`: `sync`, `relaxed` (WAL synced every second, the URL's default
/// `sync_interval`), or both, comma-separated.
fn durabilities_from_env() -> Vec<Durability> {
    let text = std::env::var("SCALE_DURABILITY").unwrap_or_else(|_| "sync,relaxed".to_owned());
    text.split(',')
        .map(|d| match d.trim() {
            "sync" => Durability::Sync,
            "relaxed" => Durability::Relaxed { interval: Duration::from_secs(1) },
            other => panic!("SCALE_DURABILITY: {other:?} is neither sync nor relaxed"),
        })
        .collect()
}

fn main() {
    let (counts, duration, durabilities) = (records_from_env(), seconds_from_env(), durabilities_from_env());
    let parent = std::env::var_os("SCALE_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = tempfile::Builder::new().prefix("oncely-scale-").tempdir_in(&parent).expect("a temporary directory");
    let counters = HitCounters::install();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a Tokio runtime");
    println!(
        "sqlite store scale: N = {counts:?}, {durabilities:?}, {} s per phase after a {} s warm-up, {TASKS} tasks, \
         {} workers, files in {}",
        duration.as_secs_f64(),
        WARMUP.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        dir.path().display(),
    );
    let mut footprints = Vec::new();
    let mut rows = Vec::new();
    for n in counts {
        let base = dir.path().join(format!("base-{n}.db"));
        let seconds = build_file(&base, n);
        let bytes = file_bytes(&base);
        // The usage row as the store reads it: what it counts against `max_bytes`. And
        // one `stats` call (the usage row less the expired rows not yet swept, on a reader
        // thread): the gateway calls it on every `/metrics` scrape.
        let (counted, stats_ms) = {
            let store = SqliteStore::open(&base, options(n, Durability::Sync)).expect("the store opens its file");
            let usage = runtime.block_on(store.usage()).expect("the usage row reads");
            assert_eq!(usage.records, n, "the store sees every preloaded row");
            let started = Instant::now();
            let stats = runtime.block_on(store.stats()).expect("the store counts");
            assert_eq!(stats.completed, n, "every preloaded row is counted");
            // A preloaded row reads back through the store's own decoder (which checks
            // that the columns make a valid record) as the record `complete` leaves.
            let last = key(0, n - 1);
            let record = runtime
                .block_on(store.get(&StorageKey::derive(&Scope::global(), &last)))
                .expect("a preloaded row reads")
                .expect("the last preloaded row is there");
            assert!(record.is_completed() && record.fingerprint == Some(fingerprint()), "{record:?}");
            assert_eq!(record.key, last);
            (usage.bytes, started.elapsed().as_secs_f64() * 1e3)
        };
        let footprint = Footprint {
            records: n,
            seconds,
            file_per_record: bytes as f64 / n as f64,
            counted_per_record: counted as f64 / n as f64,
            stats_ms,
        };
        println!(
            "sqlite N={n}: preloaded in {seconds:.2} s ({:.0}/s); file {:.1} MiB after a checkpoint: {:.0} B/record \
             (the store counts {:.0} B/record); stats() {stats_ms:.1} ms",
            n as f64 / seconds,
            bytes as f64 / (1 << 20) as f64,
            footprint.file_per_record,
            footprint.counted_per_record,
        );
        footprints.push(footprint);
        for &durability in &durabilities {
            let run = dir.path().join(format!("run-{n}.db"));
            rows.extend(runtime.block_on(run_store(&base, &run, n, durability, duration, &counters)));
        }
        std::fs::remove_file(&base).expect("the preloaded file is removed");
    }

    println!(
        "\n| store | records preloaded | mode | ops/s | vs smallest N | table during phase | hit counts flushed / dropped |"
    );
    println!("|---|---:|---|---:|---:|---|---:|");
    for Row { records, durability, phase: row } in &rows {
        let base = rows
            .iter()
            .find(|r| r.phase.mode == row.mode && r.durability == *durability)
            .map_or(row.ops_per_sec, |r| r.phase.ops_per_sec);
        println!(
            "| sqlite {durability} | {records} | {} | {:.0} | {:.2}× | {} → {} | {} / {} |",
            row.mode,
            row.ops_per_sec,
            row.ops_per_sec / base,
            row.len.0,
            row.len.1,
            row.hits.0,
            row.hits.1
        );
    }
    println!(
        "\n| store | records | preload (direct inserts) | preload rate | file per record | counted per record | stats() |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for f in &footprints {
        println!(
            "| sqlite | {} | {:.2} s | {:.0}/s | {:.0} B | {:.0} B | {:.1} ms |",
            f.records,
            f.seconds,
            f.records as f64 / f.seconds,
            f.file_per_record,
            f.counted_per_record,
            f.stats_ms
        );
    }
}
