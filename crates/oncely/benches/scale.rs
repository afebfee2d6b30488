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
//! per replay, up to the cap. Installing the recorder costs every outcome a counter
//! look-up, the same at every N.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use oncely::store::ClaimRequest;
use oncely::{ClaimOutcome, Failure, Fingerprint, IdempotencyKey, MemoryStore, Oncely, Scope, Store, StoreAdmin};
use serde::{Deserialize, Serialize};

/// Concurrent tasks in each measured phase.
const TASKS: usize = 32;
/// Tasks that preload records (more than the cores, so that none idles).
const PRELOAD_TASKS: usize = 8;
/// Run before each measured window, not counted.
const WARMUP: Duration = Duration::from_secs(1);
/// How long records live: the engine's default.
const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// The lease of a preload claim (completed at once).
const LEASE: Duration = Duration::from_secs(30);
/// The sweeper's interval. The default (60 s) would never run inside a measured
/// window; every second, its pass over the shards is part of what is measured.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Room left for the records the `new_key` phase creates, above N.
const NEW_KEY_ROOM: usize = 100_000_000;
/// The text of the `note` field, sized so that a stored payload is about 100 bytes.
const NOTE: &str = "captured by the scale benchmark, 100-byte payload";

/// The value every operation returns and every replay decodes.
#[derive(Serialize, Deserialize, Debug)]
struct Receipt {
    id: u64,
    status: String,
    note: String,
}

impl Receipt {
    fn new(id: u64) -> Self {
        Self { id, status: "captured".to_owned(), note: NOTE.to_owned() }
    }
}

/// The engine's stored form of a success, `{"Ok": value}`, so that the preloaded records
/// replay through `Oncely::run` as if `run` had stored them.
#[derive(Serialize)]
enum Stored<'a> {
    Ok(&'a Receipt),
}

fn payload(id: u64) -> Bytes {
    Bytes::from(serde_json::to_vec(&Stored::Ok(&Receipt::new(id))).expect("a receipt encodes"))
}

/// The key of preloaded record `index`; `space` 0 is the preload's, task `t` of the
/// `new_key` phase makes its keys in space `t + 1`.
fn key(space: u64, index: u64) -> IdempotencyKey {
    IdempotencyKey::new(format!("{space:08x}-0000-4000-8000-{index:012x}")).expect("benchmark keys are valid")
}

/// The request fingerprint of every record (one body, as for retries of one request).
fn fingerprint() -> Fingerprint {
    Fingerprint::from_bytes(br#"{"amount":1999,"currency":"eur"}"#)
}

/// A stateless uniform draw: the `i`-th random number of task `t` (splitmix64).
fn draw(t: usize, i: u64) -> u64 {
    let mut z = ((t as u64) << 40 ^ i).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

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

/// The `oncely_hits_*` counters, kept by a recorder that ignores every other metric.
#[derive(Default)]
struct HitCounters {
    flushed: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

impl metrics::Recorder for HitCounters {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        match key.name() {
            "oncely_hits_flushed_total" => metrics::Counter::from_arc(Arc::clone(&self.flushed)),
            "oncely_hits_dropped_total" => metrics::Counter::from_arc(Arc::clone(&self.dropped)),
            _ => metrics::Counter::noop(),
        }
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

impl HitCounters {
    /// The counters' values now: (flushed, dropped).
    fn now(&self) -> (u64, u64) {
        (self.flushed.load(Ordering::Relaxed), self.dropped.load(Ordering::Relaxed))
    }
}

/// The measured window of a phase: operations that finish inside it are counted.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    /// Counts an operation that just finished, if inside the window; false once the
    /// window has closed (the task stops).
    fn tick(&self, count: &mut u64) -> bool {
        let now = Instant::now();
        if now >= self.end {
            return false;
        }
        if now >= self.start {
            *count += 1;
        }
        true
    }
}

/// Runs `TASKS` copies of `body` (task index, window → operations counted) through a
/// warm-up and a window of `duration`; operations per second in the window.
async fn drive<F, Fut>(duration: Duration, body: F) -> f64
where
    F: Fn(usize, Window) -> Fut,
    Fut: Future<Output = u64> + Send + 'static,
{
    let start = Instant::now() + WARMUP;
    let window = Window { start, end: start + duration };
    let handles: Vec<_> = (0..TASKS).map(|t| tokio::spawn(body(t, window))).collect();
    let mut total = 0;
    for handle in handles {
        total += handle.await.expect("a benchmark task panicked");
    }
    total as f64 / duration.as_secs_f64()
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
                    store.complete(request.claim(), payload(index), RETENTION).await.expect("a preload completes");
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

/// One line of the final table.
struct Row {
    records: u64,
    mode: &'static str,
    ops_per_sec: f64,
    /// The table's size before and after the phase.
    len: (usize, usize),
    /// Replay counts flushed and dropped during the phase (warm-up included).
    hits: (u64, u64),
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

    let oncely = Oncely::new(store.clone());
    let mut rows = Vec::new();

    let (len, hits) = (store.len(), counters.now());
    let engine = oncely.clone();
    let ops_per_sec = drive(duration, move |t, window| {
        let oncely = engine.clone();
        async move {
            let (fingerprint, mut count) = (fingerprint(), 0);
            for i in 0.. {
                let index = draw(t, i) % n;
                let executed = oncely
                    .run(&key(0, index), Some(fingerprint), || async { Ok::<_, Failure<String>>(Receipt::new(index)) })
                    .await
                    .expect("a replay succeeds");
                assert!(executed.replayed, "a preloaded key replays");
                // The memory store never makes a task wait, so without a yield one task
                // would hold its worker for the whole window (the others, the engine's
                // hit flusher and the sweeper would wait for it). A server runs each
                // request as a task of its own; yielding after each operation gives the
                // same interleaving.
                tokio::task::yield_now().await;
                if !window.tick(&mut count) {
                    break;
                }
            }
            count
        }
    })
    .await;
    // The counts of the last interval: flushed within it, so that they are in this row.
    oncely.flush_hits().await.expect("the memory store takes hit counts");
    rows.push(row(n, "replay", ops_per_sec, len, store.len(), hits, counters));

    // The same look-ups through `Store::claim` alone: no engine, so no hit counted, no
    // flush, no JSON decode. Tells the store's share of a change in `replay` from the
    // engine's (its hit counts grow with the number of distinct keys replayed).
    let (len, hits) = (store.len(), counters.now());
    let raw = store.clone();
    let ops_per_sec = drive(duration, move |t, window| {
        let store = raw.clone();
        async move {
            let (scope, fingerprint, mut count) = (Scope::global(), fingerprint(), 0);
            for i in 0.. {
                let key = key(0, draw(t, i) % n);
                let request = ClaimRequest::new(&scope, &key, Some(fingerprint), LEASE, RETENTION);
                match store.claim(&request).await.expect("a claim succeeds") {
                    ClaimOutcome::Replay(replay) => drop(replay),
                    other => panic!("a preloaded key must replay: {other:?}"),
                }
                tokio::task::yield_now().await;
                if !window.tick(&mut count) {
                    break;
                }
            }
            count
        }
    })
    .await;
    rows.push(row(n, "store_claim_replay", ops_per_sec, len, store.len(), hits, counters));

    let (len, hits) = (store.len(), counters.now());
    let engine = oncely.clone();
    let ops_per_sec = drive(duration, move |t, window| {
        let oncely = engine.clone();
        async move {
            let (fingerprint, mut count) = (fingerprint(), 0);
            for i in 0.. {
                let executed = oncely
                    .run(&key(t as u64 + 1, i), Some(fingerprint), || async {
                        Ok::<_, Failure<String>>(Receipt::new(i))
                    })
                    .await
                    .expect("a new key runs");
                assert!(!executed.replayed, "a new key executes");
                tokio::task::yield_now().await;
                if !window.tick(&mut count) {
                    break;
                }
            }
            count
        }
    })
    .await;
    rows.push(row(n, "new_key", ops_per_sec, len, store.len(), hits, counters));
    (footprint, rows)
}

fn row(
    records: u64,
    mode: &'static str,
    ops_per_sec: f64,
    len_before: usize,
    len_after: usize,
    hits_before: (u64, u64),
    counters: &HitCounters,
) -> Row {
    let now = counters.now();
    let row = Row {
        records,
        mode,
        ops_per_sec,
        len: (len_before, len_after),
        hits: (now.0 - hits_before.0, now.1 - hits_before.1),
    };
    println!(
        "memory N={records} {mode}: {ops_per_sec:.0} ops/s ({TASKS} tasks; table {} -> {} records; \
         hit counts flushed {}, dropped {})",
        row.len.0, row.len.1, row.hits.0, row.hits.1
    );
    row
}

/// `SCALE_RECORDS`: comma-separated counts (`_` allowed as a digit separator), run in
/// ascending order: a smaller run after a larger one would reuse memory the allocator
/// kept, and its RSS growth would read near zero.
fn records_from_env() -> Vec<u64> {
    let text = std::env::var("SCALE_RECORDS").unwrap_or_else(|_| "1000,10000000".to_owned());
    let mut counts: Vec<u64> = text
        .split(',')
        .map(|n| n.trim().replace('_', "").parse().expect("SCALE_RECORDS: comma-separated counts"))
        .filter(|n| *n > 0)
        .collect();
    counts.sort_unstable();
    counts.dedup();
    counts
}

fn seconds_from_env() -> Duration {
    let text = std::env::var("SCALE_SECONDS").unwrap_or_else(|_| "5".to_owned());
    Duration::from_secs_f64(text.trim().parse().expect("SCALE_SECONDS: a number of seconds"))
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
                    mode: match fields[2] {
                        "replay" => "replay",
                        "store_claim_replay" => "store_claim_replay",
                        _ => "new_key",
                    },
                    ops_per_sec: number(3),
                    len: (number(4) as usize, number(5) as usize),
                    hits: (number(6) as u64, number(7) as u64),
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
        let base = rows.iter().find(|r| r.mode == row.mode).map_or(row.ops_per_sec, |r| r.ops_per_sec);
        println!(
            "| memory | {} | {} | {:.0} | {:.2}× | {} → {} | {} / {} |",
            row.records,
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
    let counters = HitCounters::default();
    let recorder = HitCounters { flushed: Arc::clone(&counters.flushed), dropped: Arc::clone(&counters.dropped) };
    metrics::set_global_recorder(recorder).map_err(|_| "a recorder was set").expect("the hit counters install");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a Tokio runtime");
    let (footprint, rows) = runtime.block_on(run_records(n, seconds_from_env(), &counters));
    let f = footprint;
    println!("#footprint {} {} {} {} {}", f.records, f.seconds, f.rss_per_record, f.counted_per_record, f.stats_ms);
    for r in rows {
        println!("#row {} {} {} {} {} {} {}", r.records, r.mode, r.ops_per_sec, r.len.0, r.len.1, r.hits.0, r.hits.1);
    }
}
