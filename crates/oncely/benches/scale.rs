//! Scale: does the engine's cost stay flat from a thousand to ten million records?
//!
//! The README's roadmap sets "cost flat to 10M records" as a budget: the cost of an
//! operation should not depend on how many records the store holds. Nothing measured
//! it. For each record count N (env `SCALE_RECORDS`, default `1000,10000000`), this
//! bench builds a fresh [`MemoryStore`] with its sweeper running, preloads N completed
//! records, and measures, for `SCALE_SECONDS` (default 5) each, after a 1 s warm-up:
//!
//! - `replay`: `Oncely::run` on preloaded keys drawn uniformly at random over all N, from
//!   32 concurrent tasks. Uniform over N is the point: with N = 1000 every record sits in
//!   the CPU caches, with N = 10 million almost none does, and a store whose look-up
//!   grows with its size (a scan, a tree much deeper than its cache) shows it here.
//!   Replays run first, so that the new keys of the next phase do not grow the table
//!   they read.
//! - `store_claim_replay`: the same look-ups through `Store::claim` alone, without the
//!   engine: no hit counted, no JSON decode. Beside `replay`, it tells the store's share
//!   of a change from the engine's.
//! - `new_key`: `Oncely::run` on keys never seen before, from 32 concurrent tasks: claim,
//!   operation, JSON encode, complete. The table grows during the phase (the output
//!   gives its size before and after).
//!
//! Every task yields after each operation, as requests running as tasks of their own
//! would: the memory store never makes a task wait, so without it one task would hold
//! its worker for the whole window, and the sweeper and the hit flusher with it.
//!
//! And the memory one record costs: the process's resident set (RSS, from
//! `/proc/self/statm`) before and after the preload, divided by N, beside what the store
//! counts against its byte bound (`MemoryStore::bytes`, see `RECORD_OVERHEAD`). Each N
//! runs in a process of its own, so that it starts from a clean heap. And the time of
//! one `StoreAdmin::stats` call, which reads every record: the gateway calls it on each
//! `/metrics` scrape.
//!
//! ```text
//! cargo bench -p oncely --bench scale                                            # 1k and 10M: ~8 GiB RSS
//! SCALE_RECORDS=1000,100000 SCALE_SECONDS=2 cargo bench -p oncely --bench scale  # a quick check
//! ```
//!
//! Linux only (it reads `/proc`). Records: 36-character UUID-shaped keys, the global
//! scope, one fingerprint, a ~100-byte JSON payload allocated per record (as the engine
//! encodes one per completion), 24 h retention. The store's bounds are raised above
//! what the run creates: the defaults (1 GiB) would refuse new records at about 1.4
//! million of these.
//!
//! Also counted: the replay counts the engine flushes to the store (`record_hits`, one
//! entry per distinct key per flush interval) and drops (past 100,000 distinct keys
//! pending), read from the `metrics` counters by a minimal recorder. Replays of 1000
//! keys flush at most 1000 entries a second; replays spread over 10 million flush one
//! per replay, up to the cap.
//!
//! The record shape, the phases and the counters are shared with the SQLite store's
//! bench, in `oncely_testkit::scale`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use oncely::store::ClaimRequest;
use oncely::{ClaimOutcome, MemoryStore, Scope, Store, StoreAdmin};
use oncely_testkit::scale::{
    HitCounters, LEASE, Phase, RETENTION, TASKS, WARMUP, fingerprint, key, payload, phases, records_from_env,
    seconds_from_env,
};

/// Tasks that preload records (more than the cores, so that none idles).
const PRELOAD_TASKS: usize = 8;
/// The sweeper's interval. The default (60 s) would never run inside a measured
/// window; every second, its pass over the shards is part of what is measured.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Room left for the records the `new_key` phase creates, above N.
const NEW_KEY_ROOM: usize = 100_000_000;

/// The process's resident set in bytes, from `/proc/self/statm` (in pages).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm is readable (Linux only)");
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|f| f.parse().ok()).expect("statm has a resident field");
    pages * page_size()
}

/// The page size, from the auxiliary vector's `AT_PAGESZ` (no libc needed; 64-bit
/// layout), 4096 when it cannot be read.
fn page_size() -> u64 {
    const AT_PAGESZ: u64 = 6;
    let auxv = std::fs::read("/proc/self/auxv").unwrap_or_default();
    auxv.chunks_exact(16)
        .map(|pair| {
            let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().expect("8 bytes"));
            (word(&pair[..8]), word(&pair[8..]))
        })
        .find(|(kind, _)| *kind == AT_PAGESZ)
        .map_or(4096, |(_, size)| size)
}

/// Preloads records `0..n` through the `Store` trait, claim then complete, in parallel.
async fn preload(store: &MemoryStore, n: u64) {
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let report_every = (n / 10).max(1);
    let handles: Vec<_> = (0..PRELOAD_TASKS as u64)
        .map(|t| {
            let (store, done) = (store.clone(), Arc::clone(&done));
            tokio::spawn(async move {
                let (scope, fingerprint) = (Scope::global(), fingerprint());
                let chunk = n.div_ceil(PRELOAD_TASKS as u64);
                for index in t * chunk..((t + 1) * chunk).min(n) {
                    let key = key(0, index);
                    let request = ClaimRequest::new(&scope, &key, Some(fingerprint), LEASE, RETENTION);
                    match store.claim(&request).await.expect("a preload claim succeeds") {
                        ClaimOutcome::Acquired { .. } => {}
                        other => panic!("a preload key was not new: {other:?}"),
                    }
                    store
                        .complete(request.claim(), Bytes::from(payload(index)), RETENTION)
                        .await
                        .expect("a preload completes");
                    let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if finished % report_every == 0 && n >= 1_000_000 {
                        let rate = finished as f64 / started.elapsed().as_secs_f64();
                        eprintln!("  preloaded {finished} of {n} ({rate:.0}/s)");
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.expect("a preload task panicked");
    }
}

/// One line of the final table: a phase at one N.
struct Row {
    records: u64,
    phase: Phase,
}

/// What the preload of N records cost.
struct Footprint {
    records: u64,
    seconds: f64,
    rss_per_record: f64,
    counted_per_record: f64,
    /// One `StoreAdmin::stats` call after the preload, in milliseconds.
    stats_ms: f64,
}

async fn run_records(n: u64, duration: Duration, counters: &HitCounters) -> (Footprint, Vec<Row>) {
    let store = MemoryStore::builder()
        .max_entries(usize::try_from(n).expect("N fits in usize").saturating_add(NEW_KEY_ROOM))
        .max_bytes(usize::MAX)
        .sweep_interval(SWEEP_INTERVAL)
        .build();
    let rss_before = rss_bytes();
    let started = Instant::now();
    preload(&store, n).await;
    let seconds = started.elapsed().as_secs_f64();
    let rss_after = rss_bytes();
    assert_eq!(store.len() as u64, n, "every preloaded record is held");
    // `stats` reads every record (shard by shard, each under its lock); the gateway
    // calls it on every `/metrics` scrape of a store that "counts records cheaply".
    let counted = Instant::now();
    let stats = StoreAdmin::stats(&store).await.expect("the memory store counts");
    let stats_ms = counted.elapsed().as_secs_f64() * 1e3;
    assert_eq!(stats.completed, n, "every preloaded record is counted");
    let footprint = Footprint {
        records: n,
        seconds,
        rss_per_record: rss_after.saturating_sub(rss_before) as f64 / n as f64,
        counted_per_record: store.bytes() as f64 / n as f64,
        stats_ms,
    };
    println!(
        "memory N={n}: preloaded in {seconds:.2} s ({:.0}/s); RSS {:.1} MiB -> {:.1} MiB: {:.0} B/record \
         (the store counts {:.0} B/record); stats() {stats_ms:.1} ms",
        n as f64 / seconds,
        rss_before as f64 / (1 << 20) as f64,
        rss_after as f64 / (1 << 20) as f64,
        footprint.rss_per_record,
        footprint.counted_per_record,
    );

    let records = async || store.len() as u64;
    let rows = phases("memory", &store, n, duration, counters, records).await;
    (footprint, rows.into_iter().map(|phase| Row { records: n, phase }).collect())
}

/// Set in the process that measures one N: see [`main`].
const CHILD_ENV: &str = "SCALE_CHILD_RECORDS";

/// Runs each N in a process of its own (this executable again, with [`CHILD_ENV`] set),
/// so that each starts from a clean heap: in one process, the RSS growth of a preload
/// reads the memory the allocator kept from the previous N's store, not the records'.
/// The child prints its lines and a machine-readable copy of its results (`#row`,
/// `#footprint`), which the parent gathers into the final tables.
fn main() {
    if let Ok(n) = std::env::var(CHILD_ENV) {
        return child(n.parse().expect("the child's record count"));
    }
    let counts = records_from_env();
    println!(
        "memory store scale: N = {counts:?}, {} s per phase after a {} s warm-up, {TASKS} tasks, {} cores, \
         one process per N",
        seconds_from_env().as_secs_f64(),
        WARMUP.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let exe = std::env::current_exe().expect("the bench's own executable");
    let mut rows = Vec::new();
    let mut footprints = Vec::new();
    for n in counts {
        let mut child = std::process::Command::new(&exe)
            .env(CHILD_ENV, n.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the bench starts itself for one N");
        let stdout = child.stdout.take().expect("the child's stdout is piped");
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let line = line.expect("the child's output reads");
            let fields: Vec<&str> = line.split_whitespace().collect();
            let number = |i: usize| -> f64 { fields[i].parse().expect("the child's results are numbers") };
            match fields.first() {
                Some(&"#row") => rows.push(Row {
                    records: number(1) as u64,
                    phase: Phase {
                        mode: match fields[2] {
                            "replay" => "replay",
                            "store_claim_replay" => "store_claim_replay",
                            _ => "new_key",
                        },
                        ops_per_sec: number(3),
                        len: (number(4) as u64, number(5) as u64),
                        hits: (number(6) as u64, number(7) as u64),
                    },
                }),
                Some(&"#footprint") => footprints.push(Footprint {
                    records: number(1) as u64,
                    seconds: number(2),
                    rss_per_record: number(3),
                    counted_per_record: number(4),
                    stats_ms: number(5),
                }),
                _ => println!("{line}"),
            }
        }
        let status = child.wait().expect("the child ends");
        assert!(status.success(), "the run for N = {n} failed: {status}");
    }

    println!(
        "\n| store | records preloaded | mode | ops/s | vs smallest N | table during phase | hit counts flushed / dropped |"
    );
    println!("|---|---:|---|---:|---:|---|---:|");
    for row in &rows {
        let (records, row) = (row.records, &row.phase);
        let base = rows.iter().find(|r| r.phase.mode == row.mode).map_or(row.ops_per_sec, |r| r.phase.ops_per_sec);
        println!(
            "| memory | {records} | {} | {:.0} | {:.2}× | {} → {} | {} / {} |",
            row.mode,
            row.ops_per_sec,
            row.ops_per_sec / base,
            row.len.0,
            row.len.1,
            row.hits.0,
            row.hits.1
        );
    }
    println!("\n| store | records | preload | preload rate | RSS per record | counted per record | stats() |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for f in &footprints {
        println!(
            "| memory | {} | {:.2} s | {:.0}/s | {:.0} B | {:.0} B | {:.1} ms |",
            f.records,
            f.seconds,
            f.records as f64 / f.seconds,
            f.rss_per_record,
            f.counted_per_record,
            f.stats_ms
        );
    }
}

/// Measures one N and prints its results, readable and machine-readable.
fn child(n: u64) {
    let counters = HitCounters::install();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a Tokio runtime");
    let (footprint, rows) = runtime.block_on(run_records(n, seconds_from_env(), &counters));
    let f = footprint;
    println!("#footprint {} {} {} {} {}", f.records, f.seconds, f.rss_per_record, f.counted_per_record, f.stats_ms);
    for Row { records, phase: p } in rows {
        println!("#row {records} {} {} {} {} {} {}", p.mode, p.ops_per_sec, p.len.0, p.len.1, p.hits.0, p.hits.1);
    }
}
