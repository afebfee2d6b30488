//! Criterion benchmarks for the engine and the in-memory store.
//!
//! Every benchmark runs on a Tokio multi-thread runtime with 1 and with 2 worker threads,
//! and the timed work runs *on a worker* (spawned onto the runtime), never on the
//! benchmark thread. Keys, stores and completed records are prepared outside the timed
//! section. See `docs/benchmarks.md` for the results and what they mean.
//!
//! ```text
//! cargo bench -p oncely --bench engine
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use oncely::{Acquired, ClaimId, Error, Failure, IdempotencyKey, MemoryStore, Oncely, RunError, Scope, StorageKey};
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;

/// Worker-thread counts every benchmark runs with.
const WORKERS: [usize; 2] = [1, 2];
/// Tasks racing for one key in `run/contended_one_key`.
const CONTENDERS: usize = 64;
/// Untimed batches run first to report the outcome mix of `run/contended_one_key`.
const MIX_BATCHES: usize = 1000;
/// Completed keys each task cycles through in the parallel replay benchmarks.
const KEYS_PER_TASK: usize = 1024;

/// The small value every operation produces and every replay decodes.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Receipt {
    id: u64,
    amount_cents: u64,
    currency: String,
    captured: bool,
}

fn receipt() -> Receipt {
    Receipt { id: 42, amount_cents: 1999, currency: "eur".to_owned(), captured: true }
}

type Engine = Oncely<MemoryStore>;

fn engine() -> Engine {
    Oncely::new(MemoryStore::builder().no_sweeper().build())
}

fn key(text: String) -> IdempotencyKey {
    IdempotencyKey::new(text).expect("benchmark keys are valid")
}

fn runtime(workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("tokio runtime builds")
}

/// Runs `fut` on a worker of `rt` and returns its output.
fn on_worker<T: Send + 'static>(rt: &Runtime, fut: impl Future<Output = T> + Send + 'static) -> T {
    rt.block_on(rt.spawn(fut)).expect("benchmark task panicked")
}

/// One `run` of the benchmark operation.
async fn run_once(oncely: &Engine, key: &IdempotencyKey) -> Result<oncely::Executed<Receipt>, RunError<String>> {
    oncely.run(key, None, || async { Ok::<_, Failure<String>>(receipt()) }).await
}

/// Completes every key in `keys` (outside any timed section).
fn complete_all(rt: &Runtime, oncely: &Engine, keys: &[IdempotencyKey]) {
    let (oncely, keys) = (oncely.clone(), keys.to_vec());
    on_worker(rt, async move {
        for key in &keys {
            let first = run_once(&oncely, key).await.expect("first run succeeds");
            assert!(!first.replayed);
        }
    });
}

fn group_name(workers: usize) -> String {
    format!("{workers}w")
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
}

/// `run/new_key`: `run` with a key never seen before (claim + operation + encode + complete).
/// `run/replay`: `run` on a completed key (claim that finds it completed + JSON decode).
/// `acquire/replay`: `acquire` on a completed key, raw record, no decode.
fn single_task(c: &mut Criterion) {
    for workers in WORKERS {
        let rt = runtime(workers);

        let mut group = c.benchmark_group("run");
        configure(&mut group);
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("new_key", group_name(workers)), |b| {
            b.iter_custom(|iters| {
                // A fresh store per sample, so the map size stays comparable between samples.
                let oncely = engine();
                let keys: Vec<IdempotencyKey> = (0..iters).map(|i| key(format!("new-{i}"))).collect();
                on_worker(&rt, async move {
                    let start = Instant::now();
                    for key in &keys {
                        let executed = run_once(&oncely, key).await.expect("new key executes");
                        black_box(executed);
                    }
                    let elapsed = start.elapsed();
                    drop((keys, oncely));
                    elapsed
                })
            });
        });

        let oncely = engine();
        let hot = key("replayed-key".to_owned());
        complete_all(&rt, &oncely, std::slice::from_ref(&hot));
        group.bench_function(BenchmarkId::new("replay", group_name(workers)), |b| {
            b.iter_custom(|iters| {
                let (oncely, hot) = (oncely.clone(), hot.clone());
                on_worker(&rt, async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let replayed = run_once(&oncely, &hot).await.expect("replay succeeds");
                        black_box(replayed);
                    }
                    start.elapsed()
                })
            });
        });
        group.finish();

        let mut group = c.benchmark_group("acquire");
        configure(&mut group);
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("replay", group_name(workers)), |b| {
            b.iter_custom(|iters| {
                let (oncely, hot) = (oncely.clone(), hot.clone());
                on_worker(&rt, async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        match oncely.acquire(&hot, None).await.expect("acquire succeeds") {
                            Acquired::Replay(record) => {
                                black_box(record);
                            }
                            Acquired::Execute(_) => panic!("a completed key must replay"),
                        }
                    }
                    start.elapsed()
                })
            });
        });
        group.finish();
    }
}

/// How one contender of a batch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Executed,
    Replayed,
    Conflict,
}

/// Spawns `CONTENDERS` tasks that all `run` `key` at once; waits for all of them.
async fn contended_batch(oncely: &Engine, key: &IdempotencyKey) -> [usize; 3] {
    let handles: Vec<_> = (0..CONTENDERS)
        .map(|_| {
            let (oncely, key) = (oncely.clone(), key.clone());
            tokio::spawn(async move {
                match run_once(&oncely, &key).await {
                    Ok(executed) if executed.replayed => Outcome::Replayed,
                    Ok(_) => Outcome::Executed,
                    Err(RunError::Idempotency(Error::Conflict { .. })) => Outcome::Conflict,
                    Err(e) => panic!("unexpected outcome under contention: {e:?}"),
                }
            })
        })
        .collect();
    let mut counts = [0; 3];
    for handle in handles {
        counts[handle.await.expect("contender panicked") as usize] += 1;
    }
    counts
}

/// `run/contended_one_key`: 64 tasks hit one fresh key at once; one executes, the rest
/// replay (or get `Conflict` if they claim while the first still holds the key).
fn contended(c: &mut Criterion) {
    for workers in WORKERS {
        let rt = runtime(workers);

        // Not timed: the outcome mix, and the promise itself (exactly one execution).
        let oncely = engine();
        let mix = on_worker(&rt, async move {
            let mut total = [0; 3];
            for i in 0..MIX_BATCHES {
                let counts = contended_batch(&oncely, &key(format!("mix-{i}"))).await;
                assert_eq!(counts[Outcome::Executed as usize], 1, "exactly one execution per key");
                for (t, n) in total.iter_mut().zip(counts) {
                    *t += n;
                }
            }
            total
        });
        eprintln!(
            "run/contended_one_key/{}: outcome mix over {MIX_BATCHES} batches of {CONTENDERS}: \
             executed {}, replayed {}, conflict {}",
            group_name(workers),
            mix[0],
            mix[1],
            mix[2]
        );

        let mut group = c.benchmark_group("run");
        configure(&mut group);
        group.throughput(Throughput::Elements(CONTENDERS as u64));
        group.bench_function(BenchmarkId::new("contended_one_key", group_name(workers)), |b| {
            b.iter_custom(|iters| {
                let oncely = engine();
                let keys: Vec<IdempotencyKey> = (0..iters).map(|i| key(format!("hot-{i}"))).collect();
                on_worker(&rt, async move {
                    let mut elapsed = Duration::ZERO;
                    for key in &keys {
                        let start = Instant::now();
                        black_box(contended_batch(&oncely, key).await);
                        elapsed += start.elapsed();
                    }
                    elapsed
                })
            });
        });
        group.finish();
    }
}

/// Runs `tasks` copies of `body` at once, one per worker, and returns the wall time from
/// the first task's start to the last task's end. Each task is spawned from outside the
/// runtime and spins until all have started, so that each holds its own worker.
fn parallel<F, Fut>(rt: &Runtime, tasks: usize, body: F) -> Duration
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let ready = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let ready = Arc::clone(&ready);
            let work = body(i);
            rt.spawn(async move {
                // A blocking spin, not a yield: a task that yields can be picked up again
                // by the same worker, and then the tasks run one after the other.
                ready.fetch_add(1, Ordering::AcqRel);
                let gate = Instant::now();
                while ready.load(Ordering::Acquire) < tasks {
                    if gate.elapsed() > Duration::from_millis(200) {
                        eprintln!("warning: parallel tasks did not start together; this sample ran serially");
                        break;
                    }
                    std::hint::spin_loop();
                }
                let start = Instant::now();
                work.await;
                (start, Instant::now())
            })
        })
        .collect();
    let spans = rt.block_on(join_all(handles));
    let first = spans.iter().map(|s| s.0).min().expect("at least one task");
    let last = spans.iter().map(|s| s.1).max().expect("at least one task");
    last - first
}

async fn join_all<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.expect("parallel task panicked"));
    }
    out
}

/// A task body for the parallel benchmarks: `iters` acquires that replay, cycling `keys`.
async fn acquire_loop(oncely: Engine, keys: Arc<Vec<IdempotencyKey>>, iters: u64) {
    for key in keys.iter().cycle().take(iters as usize) {
        let Acquired::Replay(record) = oncely.acquire(key, None).await.expect("acquire succeeds") else {
            panic!("a completed key must replay")
        };
        black_box(record);
    }
}

/// `KEYS_PER_TASK` keys for task `t` of `tasks` whose records land in the `t`-th slice of
/// the memory store's 64 shards. This mirrors the store's current shard choice (the low
/// bits of [`StorageKey::prefix_u64`], `store/memory.rs`); were that to change, the keys
/// would simply spread over all shards again.
fn keys_in_own_shards(engine: &Engine, t: usize, tasks: usize) -> Vec<IdempotencyKey> {
    (0..)
        .map(|i| key(format!("own-{t}-{i}")))
        .filter(|k| (engine.storage_key(k).prefix_u64() & 63) as usize * tasks / 64 == t)
        .take(KEYS_PER_TASK)
        .collect()
}

/// The parallel benchmarks: one task per worker, each working in a tight loop on keys of
/// its own (no two tasks share a key). One iteration is one operation *per task*, so if
/// the work scales, the time per iteration stays flat and the ops/s doubles from 1 to 2
/// workers.
///
/// - `replay/parallel`: `run` replays (JSON decode included), all tasks through one engine
///   (the global scope), keys spread over all shards: the common deployment.
/// - `replay/parallel_acquire`: the same with `acquire` (no decode).
/// - `replay/parallel_acquire_own_scope`: each task's engine acts for its own `Scope`, so
///   the tasks share no reference-counted value: isolates the cost of every call cloning
///   the one engine scope's `Arc`.
/// - `replay/parallel_acquire_own_scope_own_shards`: as above, and each task's keys live
///   in its own half of the shards: nothing is shared at all, the best case.
/// - `baseline/parallel_global_mutex`: one `Mutex<HashMap>` shared by all tasks (what a
///   global lock does); `baseline/parallel_sharded_mutex`: 64 of them, keys spread (what
///   a plain sharded map does); `baseline/parallel_private_maps`: one map per task, the
///   control (if it does not scale, the machine was short of cores during the run).
fn parallel_replays(c: &mut Criterion) {
    for workers in WORKERS {
        let rt = runtime(workers);
        let oncely = engine();
        let tenants: Vec<Engine> = (0..workers).map(|t| oncely.scoped(Scope::new(format!("tenant-{t}")))).collect();
        let key_sets: Vec<Arc<Vec<IdempotencyKey>>> =
            (0..workers).map(|t| Arc::new((0..KEYS_PER_TASK).map(|i| key(format!("par-{t}-{i}"))).collect())).collect();
        let own_shard_sets: Vec<Arc<Vec<IdempotencyKey>>> =
            (0..workers).map(|t| Arc::new(keys_in_own_shards(&tenants[t], t, workers))).collect();
        for t in 0..workers {
            complete_all(&rt, &oncely, &key_sets[t]);
            complete_all(&rt, &tenants[t], &key_sets[t]);
            complete_all(&rt, &tenants[t], &own_shard_sets[t]);
        }

        let mut group = c.benchmark_group("replay");
        configure(&mut group);
        group.throughput(Throughput::Elements(workers as u64));
        group.bench_function(BenchmarkId::new("parallel", group_name(workers)), |b| {
            b.iter_custom(|iters| {
                parallel(&rt, workers, |t| {
                    let (oncely, keys) = (oncely.clone(), Arc::clone(&key_sets[t]));
                    async move {
                        for key in keys.iter().cycle().take(iters as usize) {
                            black_box(run_once(&oncely, key).await.expect("replay succeeds"));
                        }
                    }
                })
            });
        });
        group.bench_function(BenchmarkId::new("parallel_acquire", group_name(workers)), |b| {
            b.iter_custom(|iters| {
                parallel(&rt, workers, |t| acquire_loop(oncely.clone(), Arc::clone(&key_sets[t]), iters))
            });
        });
        group.bench_function(BenchmarkId::new("parallel_acquire_own_scope", group_name(workers)), |b| {
            b.iter_custom(|iters| {
                parallel(&rt, workers, |t| acquire_loop(tenants[t].clone(), Arc::clone(&key_sets[t]), iters))
            });
        });
        group.bench_function(BenchmarkId::new("parallel_acquire_own_scope_own_shards", group_name(workers)), |b| {
            b.iter_custom(|iters| {
                parallel(&rt, workers, |t| acquire_loop(tenants[t].clone(), Arc::clone(&own_shard_sets[t]), iters))
            });
        });
        group.finish();

        let mut group = c.benchmark_group("baseline");
        configure(&mut group);
        group.throughput(Throughput::Elements(workers as u64));
        let keys: Vec<Arc<Vec<[u8; 32]>>> = (0..workers).map(baseline_keys).collect();
        let global = Arc::new(baseline_map(keys.iter().flat_map(|k| k.iter())));
        let sharded: Arc<Vec<BaselineMap>> = Arc::new(
            (0..64)
                .map(|shard| baseline_map(keys.iter().flat_map(|k| k.iter()).filter(|k| baseline_shard(k) == shard)))
                .collect(),
        );
        let private: Vec<Arc<BaselineMap>> = keys.iter().map(|k| Arc::new(baseline_map(k.iter()))).collect();
        group.bench_function(BenchmarkId::new("parallel_global_mutex", group_name(workers)), |b| {
            b.iter_custom(|iters| {
                parallel(&rt, workers, |t| {
                    let (map, keys) = (Arc::clone(&global), Arc::clone(&keys[t]));
                    async move {
                        for key in keys.iter().cycle().take(iters as usize) {
                            black_box(lookup(&map, key));
                        }
                    }
                })
            });
        });
        group.bench_function(BenchmarkId::new("parallel_sharded_mutex", group_name(workers)), |b| {
            b.iter_custom(|iters| {
                parallel(&rt, workers, |t| {
                    let (maps, keys) = (Arc::clone(&sharded), Arc::clone(&keys[t]));
                    async move {
                        for key in keys.iter().cycle().take(iters as usize) {
                            black_box(lookup(&maps[baseline_shard(key)], key));
                        }
                    }
                })
            });
        });
        group.bench_function(BenchmarkId::new("parallel_private_maps", group_name(workers)), |b| {
            b.iter_custom(|iters| {
                parallel(&rt, workers, |t| {
                    let (map, keys) = (Arc::clone(&private[t]), Arc::clone(&keys[t]));
                    async move {
                        for key in keys.iter().cycle().take(iters as usize) {
                            black_box(lookup(&map, key));
                        }
                    }
                })
            });
        });
        group.finish();
    }
}

type BaselineMap = Mutex<HashMap<[u8; 32], Bytes>>;

/// Task `t`'s baseline keys: SHA-256 digests, like storage keys, computed outside the
/// timed loops (as the engine benchmarks' keys are).
fn baseline_keys(t: usize) -> Arc<Vec<[u8; 32]>> {
    Arc::new((0..KEYS_PER_TASK).map(|i| *StorageKey::derive_raw("baseline", &format!("{t}-{i}")).as_bytes()).collect())
}

fn baseline_map<'a>(keys: impl IntoIterator<Item = &'a [u8; 32]>) -> BaselineMap {
    let payload = Bytes::from(serde_json::to_vec(&receipt()).expect("receipt encodes"));
    Mutex::new(keys.into_iter().map(|k| (*k, payload.clone())).collect())
}

/// The shard of a baseline key in `baseline/parallel_sharded_mutex`.
fn baseline_shard(key: &[u8; 32]) -> usize {
    usize::from(key[0] & 63)
}

fn lookup(map: &BaselineMap, key: &[u8; 32]) -> Option<Bytes> {
    map.lock().expect("baseline mutex poisoned").get(key).cloned()
}

/// `baseline/mutex_hashmap_get`: the cheapest in-process lookup: a `Mutex<HashMap>` get
/// and a `Bytes` clone, on a worker, one task.
fn baseline(c: &mut Criterion) {
    for workers in WORKERS {
        let rt = runtime(workers);
        let keys = baseline_keys(0);
        let map = Arc::new(baseline_map(keys.iter()));
        let hot = keys[7];
        let mut group = c.benchmark_group("baseline");
        configure(&mut group);
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("mutex_hashmap_get", group_name(workers)), |b| {
            b.iter_custom(|iters| {
                let map = Arc::clone(&map);
                on_worker(&rt, async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        black_box(lookup(&map, black_box(&hot)));
                    }
                    start.elapsed()
                })
            });
        });
        group.finish();
    }
}

/// `parts/*`: the pieces one replay is made of, measured alone on the benchmark thread, to
/// explain where the time of `acquire/replay` goes.
fn parts(c: &mut Criterion) {
    let mut group = c.benchmark_group("parts");
    group.warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_millis(700));
    group.throughput(Throughput::Elements(1));
    let scope = Scope::global();
    let k = key("8e03978e-40d5-43e8-bc93-6894a57f9324".to_owned());
    group.bench_function("storage_key_sha256", |b| b.iter(|| StorageKey::derive(black_box(&scope), black_box(&k))));
    group.bench_function("claim_id_random", |b| b.iter(ClaimId::random));
    group.bench_function("system_time_now", |b| b.iter(SystemTime::now));
    // The engine stores `{"Ok": value}`; this mirrors its private decoding type.
    #[derive(Deserialize)]
    #[allow(dead_code, reason = "only decoded, as the engine decodes a replay")]
    enum Stored {
        Ok(Receipt),
        Err(String),
    }
    let payload = serde_json::to_vec(&serde_json::json!({ "Ok": receipt() })).expect("encodes");
    group.bench_function("json_decode_receipt", |b| {
        b.iter(|| serde_json::from_slice::<Stored>(black_box(&payload)).expect("decodes"))
    });
    group.finish();
}

criterion_group!(benches, single_task, contended, parallel_replays, baseline, parts);
criterion_main!(benches);
