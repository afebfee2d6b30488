//! What the stores' scale benchmarks share (`cargo bench -p oncely --bench scale`,
//! `cargo bench -p oncely-sqlite --bench scale`): the preloaded records' shape, the
//! three measured phases, the engine's hit counters, and the `SCALE_*` settings. Each
//! bench keeps what is its store's own: how it preloads N records and what it reports of
//! their footprint.
//!
//! The phases, each for a window after a warm-up, from [`TASKS`] concurrent tasks:
//! - `replay`: `Oncely::run` on preloaded keys drawn uniformly at random over all N;
//! - `store_claim_replay`: the same look-ups through `Store::claim` alone (no engine: no
//!   hit counted, no JSON decode), which tells the store's share of a change in `replay`;
//! - `new_key`: `Oncely::run` on keys never seen before.
//!
//! Every task yields after each operation, as requests running as tasks of their own
//! would: a store that never makes a task wait (the memory store) would otherwise let
//! one task hold its worker for the whole window, and the sweeper and the hit flusher
//! with it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use oncely::store::ClaimRequest;
use oncely::{ClaimOutcome, Failure, Fingerprint, IdempotencyKey, Oncely, Scope, Store};
use serde::{Deserialize, Serialize};

/// Concurrent tasks in each measured phase.
pub const TASKS: usize = 32;
/// Run before each measured window, not counted.
pub const WARMUP: Duration = Duration::from_secs(1);
/// How long records live: the engine's default.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// The lease of a claim that is completed at once (a preload's), or never acquires.
pub const LEASE: Duration = Duration::from_secs(30);
/// The text of the `note` field, sized so that a stored payload is about 100 bytes.
const NOTE: &str = "captured by the scale benchmark, 100-byte payload";

/// The value every operation returns and every replay decodes.
#[derive(Serialize, Deserialize, Debug)]
pub struct Receipt {
    id: u64,
    status: String,
    note: String,
}

impl Receipt {
    /// The receipt of record `id`.
    pub fn new(id: u64) -> Self {
        Self { id, status: "captured".to_owned(), note: NOTE.to_owned() }
    }
}

/// The engine's stored form of a success, `{"Ok": value}`, so that preloaded records
/// replay through `Oncely::run` as if `run` had stored them.
#[derive(Serialize)]
enum Stored<'a> {
    Ok(&'a Receipt),
}

/// The stored payload of preloaded record `id` (about 100 bytes).
pub fn payload(id: u64) -> Vec<u8> {
    serde_json::to_vec(&Stored::Ok(&Receipt::new(id))).expect("a receipt encodes")
}

/// The key of preloaded record `index`; `space` 0 is the preload's, task `t` of the
/// `new_key` phase makes its keys in space `t + 1`.
pub fn key(space: u64, index: u64) -> IdempotencyKey {
    IdempotencyKey::new(format!("{space:08x}-0000-4000-8000-{index:012x}")).expect("benchmark keys are valid")
}

/// The request fingerprint of every record (one body, as for retries of one request).
pub fn fingerprint() -> Fingerprint {
    Fingerprint::from_bytes(br#"{"amount":1999,"currency":"eur"}"#)
}

/// A stateless uniform draw: the `i`-th random number of task `t` (splitmix64).
fn draw(t: usize, i: u64) -> u64 {
    let mut z = ((t as u64) << 40 ^ i).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The engine's `oncely_hits_flushed_total` and `oncely_hits_dropped_total`, kept by a
/// recorder that ignores every other metric.
#[derive(Clone, Default)]
pub struct HitCounters {
    flushed: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

impl HitCounters {
    /// Installs the counters as the process's recorder: before any engine is built,
    /// since engines take their metric handles then.
    pub fn install() -> Self {
        let counters = Self::default();
        metrics::set_global_recorder(counters.clone())
            .map_err(|_| "a recorder was set")
            .expect("the hit counters install");
        counters
    }

    /// The counters' values now: (flushed, dropped).
    pub fn now(&self) -> (u64, u64) {
        (self.flushed.load(Ordering::Relaxed), self.dropped.load(Ordering::Relaxed))
    }
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

/// Runs [`TASKS`] copies of `op` (task index, operation index) through a warm-up and a
/// window of `duration`, yielding after each operation; operations per second in the
/// window.
async fn drive<F, Fut>(duration: Duration, op: F) -> f64
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let start = Instant::now() + WARMUP;
    let window = Window { start, end: start + duration };
    let handles: Vec<_> = (0..TASKS)
        .map(|t| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut count = 0;
                for i in 0.. {
                    op(t, i).await;
                    tokio::task::yield_now().await;
                    if !window.tick(&mut count) {
                        break;
                    }
                }
                count
            })
        })
        .collect();
    let mut total = 0;
    for handle in handles {
        total += handle.await.expect("a benchmark task panicked");
    }
    total as f64 / duration.as_secs_f64()
}

/// One measured phase.
pub struct Phase {
    /// `replay`, `store_claim_replay` or `new_key`.
    pub mode: &'static str,
    /// Operations per second in the window.
    pub ops_per_sec: f64,
    /// The store's record count before and after the phase.
    pub len: (u64, u64),
    /// Replay counts flushed and dropped during the phase (warm-up included).
    pub hits: (u64, u64),
}

/// Runs the three phases on `store`, which holds records `0..n` ([`key`]`(0, i)`,
/// [`fingerprint`], [`payload`]`(i)`), for `duration` each. `records` reads the store's
/// record count; each phase is printed as `{label} N={n} {mode}: …`.
pub async fn phases<S, R>(
    label: &str,
    store: &S,
    n: u64,
    duration: Duration,
    counters: &HitCounters,
    records: R,
) -> Vec<Phase>
where
    S: Store + Clone,
    R: AsyncFn() -> u64,
{
    let oncely = Oncely::new(store.clone());
    let fingerprint = fingerprint();
    let mut rows = Vec::new();
    let mut measure = async |mode: &'static str, ops_per_sec: f64, len: u64, hits: (u64, u64)| {
        let (after, now) = (records().await, counters.now());
        let phase = Phase { mode, ops_per_sec, len: (len, after), hits: (now.0 - hits.0, now.1 - hits.1) };
        println!(
            "{label} N={n} {mode}: {ops_per_sec:.0} ops/s ({TASKS} tasks; table {len} -> {after} records; \
             hit counts flushed {}, dropped {})",
            phase.hits.0, phase.hits.1
        );
        rows.push(phase);
    };

    let (len, hits) = (records().await, counters.now());
    let engine = oncely.clone();
    let ops_per_sec = drive(duration, move |t, i| {
        let oncely = engine.clone();
        async move {
            let index = draw(t, i) % n;
            let executed = oncely
                .run(&key(0, index), Some(fingerprint), || async { Ok::<_, Failure<String>>(Receipt::new(index)) })
                .await
                .expect("a replay succeeds");
            assert!(executed.replayed, "a preloaded key replays");
        }
    })
    .await;
    // The counts of the last interval: flushed within it, so that they are in this row.
    oncely.flush_hits().await.expect("the store takes hit counts");
    measure("replay", ops_per_sec, len, hits).await;

    let (len, hits) = (records().await, counters.now());
    let raw = store.clone();
    let ops_per_sec = drive(duration, move |t, i| {
        let store = raw.clone();
        async move {
            let (scope, key) = (Scope::global(), key(0, draw(t, i) % n));
            let request = ClaimRequest::new(&scope, &key, Some(fingerprint), LEASE, RETENTION);
            match store.claim(&request).await.expect("a claim succeeds") {
                ClaimOutcome::Replay(replay) => drop(replay),
                other => panic!("a preloaded key must replay: {other:?}"),
            }
        }
    })
    .await;
    measure("store_claim_replay", ops_per_sec, len, hits).await;

    let (len, hits) = (records().await, counters.now());
    let engine = oncely.clone();
    let ops_per_sec = drive(duration, move |t, i| {
        let oncely = engine.clone();
        async move {
            let executed = oncely
                .run(&key(t as u64 + 1, i), Some(fingerprint), || async { Ok::<_, Failure<String>>(Receipt::new(i)) })
                .await
                .expect("a new key runs");
            assert!(!executed.replayed, "a new key executes");
        }
    })
    .await;
    measure("new_key", ops_per_sec, len, hits).await;
    rows
}

/// `SCALE_RECORDS`: comma-separated counts (`_` allowed as a digit separator), in
/// ascending order; default `1000,10000000`.
pub fn records_from_env() -> Vec<u64> {
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

/// `SCALE_SECONDS`: the window of each phase; default 5.
pub fn seconds_from_env() -> Duration {
    let text = std::env::var("SCALE_SECONDS").unwrap_or_else(|_| "5".to_owned());
    Duration::from_secs_f64(text.trim().parse().expect("SCALE_SECONDS: a number of seconds"))
}
