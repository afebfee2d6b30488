//! [`ReplayCache`]: completed records kept in the process, so that replays of a hot key
//! touch no store.
//!
//! A claim that the store answers with a replay puts that replay in the cache; the next
//! claims of the key, with the same fingerprint, are answered from it (a replay), or
//! with another fingerprint, refused ([`ClaimOutcome::Mismatch`]) as the store would.
//! Everything else (new keys, in-progress records, completions, releases, hit counts)
//! goes to the store as before. Only completed records are cached, and a completed record
//! changes only when it expires or is deleted, so what the cache answers is what the
//! store would have answered, with one exception:
//!
//! **A delete made elsewhere is seen late.** A delete through this wrapper
//! ([`StoreAdmin::delete`]) removes the key from this process's cache at once. A delete
//! made through another process (another gateway instance on a shared store, or
//! `oncely keys delete` on the same SQLite file) is seen here only when the cached entry
//! ends: at most [`time_to_live`](ReplayCacheBuilder::time_to_live) after it was cached.
//! Until then this process keeps replaying the deleted result. That matters for records
//! held as an unknown outcome, which an operator deletes to let a key run again: the
//! operator waits out the time-to-live, or deletes through every instance.
//!
//! **Unless the store counts its deletes for every process.** Given the store's
//! [`Erasures`] ([`erasures`](ReplayCacheBuilder::erasures)), the cache reads that count on
//! every hit and answers nothing from an entry cached before it changed: a delete made
//! through any process that keeps the count is seen by the next claim that starts after
//! the delete returned, as without a cache. The SQLite store offers one
//! (`oncely_sqlite::SqliteStore::erasures`: the length of a file beside the database, one
//! `lseek` a hit; a process that could not open that file deletes without bumping it, and
//! says so); stores behind a network hop do not, since reading their count would cost the
//! round trip the cache saves.
//!
//! **Bounds.** An entry lives for the time-to-live (5 s by default) and never past its
//! record's expiry as the store reported it ([`Replay::expires_at`]: the retention the
//! record was completed with, whichever process completed it). The cache holds at most
//! `max_entries` entries and `max_bytes` of payload; past either, the least useful
//! entries are evicted (moka's TinyLFU policy).
//!
//! **Clocks.** The expiry is read against this process's clock. For a store that judges
//! expiry by its server's clock (Redis, PostgreSQL), an entry can outlive its record by
//! as much as this clock lags the server's, and never by more than the time-to-live.
//!
//! **When it pays.** For a store behind a network hop (Redis, PostgreSQL, DynamoDB) a
//! cached replay saves a round trip. For [`MemoryStore`](crate::MemoryStore), whose
//! claim already is an in-process read, it saves nothing.
//!
//! ```
//! use std::time::Duration;
//! use oncely::store::ReplayCache;
//! use oncely::{IdempotencyKey, MemoryStore, Oncely};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In practice the store is a shared one; MemoryStore keeps the example self-contained.
//! let store = ReplayCache::builder(MemoryStore::new())
//!     .time_to_live(Duration::from_secs(2))
//!     .max_entries(10_000)
//!     .max_bytes(16 << 20)
//!     .build();
//! let oncely = Oncely::new(store);
//! let key = IdempotencyKey::new("order-17")?;
//! for _ in 0..3 {
//!     let charge = oncely.run(&key, None, || async { Ok::<_, oncely::Failure<()>>(1999) }).await?;
//!     assert_eq!(charge.value, 1999);
//! }
//! // The first run executed and the second found the record in the store; the third
//! // was answered from the cache.
//! assert_eq!(oncely.store().cache_hits(), 1);
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::{Claim, ClaimOutcome, ClaimRequest, Erasures, FirstSeen, Notified, Replay, Store, StoreAdmin, StoreStats};
use crate::{Fingerprint, Record, StorageKey, StoreError};

/// The default time an entry lives in the cache.
pub const DEFAULT_TIME_TO_LIVE: Duration = Duration::from_secs(5);
/// The default bound on the number of entries.
pub const DEFAULT_MAX_ENTRIES: u64 = 100_000;
/// The default bound on the bytes of payload held.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// The longest time-to-live taken (moka refuses more than 1,000 years); an entry ends
/// with its record's expiry anyway.
const MAX_TIME_TO_LIVE: Duration = Duration::from_secs(366 * 24 * 3600);

/// What an entry is charged beyond its payload: the key, the fingerprint, the times and
/// the map's own bookkeeping, roughly.
const ENTRY_OVERHEAD: u64 = 160;

/// A store wrapper that answers replays of recently replayed keys from the process.
/// See the [module docs](self) for what it changes (deletes made elsewhere are seen up to
/// one time-to-live late) and when it pays.
#[derive(Clone, Debug)]
pub struct ReplayCache<S> {
    inner: S,
    cache: Option<Entries>,
}

#[derive(Clone)]
struct Entries {
    map: moka::sync::Cache<StorageKey, Arc<Entry>>,
    hits: Arc<AtomicU64>,
    /// Deletes made through the wrapper so far: a claim that read the store before a
    /// delete must not cache what it read after it (see [`ReplayCache::remember`]).
    deletes: Arc<AtomicU64>,
    /// Deletes made through any process, when the store counts them.
    erasures: Option<Arc<dyn Erasures>>,
    counter: metrics::Counter,
}

impl std::fmt::Debug for Entries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entries").field("len", &self.map.entry_count()).finish_non_exhaustive()
    }
}

/// A completed record as the claim that found it saw it, with the hits this process has
/// flushed through the cache since.
struct Entry {
    fingerprint: Option<Fingerprint>,
    replay: Replay,
    hits: AtomicU64,
    /// The end of the entry: its time-to-live or its record's expiry ([`Replay::expires_at`]),
    /// the sooner.
    until: Instant,
    /// The store's [`Erasures`] count read before the claim that found the record (0
    /// without one): the entry answers only while the count still reads the same.
    generation: u64,
}

impl<S> ReplayCache<S> {
    /// A builder for a cache in front of `inner`, with the default bounds.
    pub fn builder(inner: S) -> ReplayCacheBuilder<S> {
        ReplayCacheBuilder {
            inner,
            time_to_live: DEFAULT_TIME_TO_LIVE,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
            erasures: None,
        }
    }

    /// `inner` with no cache: every call goes to it. For code that decides at run time
    /// whether to cache, and wants one type either way.
    pub fn disabled(inner: S) -> Self {
        Self { inner, cache: None }
    }

    /// Whether replays are cached.
    pub fn is_enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// The store behind the cache.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The store behind the cache, the cache dropped.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Claims answered from the cache so far.
    pub fn cache_hits(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| c.hits.load(Ordering::Relaxed))
    }

    /// The entries held now (after the cache's pending evictions have run).
    pub fn len(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| {
            c.map.run_pending_tasks();
            c.map.entry_count()
        })
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every cached entry: the next claim of each key goes to the store.
    pub fn clear(&self) {
        if let Some(cache) = &self.cache {
            cache.map.invalidate_all();
        }
    }

    fn cached(&self, request: &ClaimRequest<'_>) -> Option<ClaimOutcome> {
        let cache = self.cache.as_ref()?;
        let entry = cache.map.get(request.storage_key())?;
        // Read after the entry: a delete elsewhere that returned before this claim began
        // has changed the count, whatever the entry says (see `Erasures`).
        if Instant::now() >= entry.until || cache.generation() != Some(entry.generation) {
            cache.map.invalidate(request.storage_key());
            return None;
        }
        cache.hits.fetch_add(1, Ordering::Relaxed);
        cache.counter.increment(1);
        if entry.fingerprint.as_ref() != request.fingerprint() {
            return Some(ClaimOutcome::Mismatch);
        }
        let mut replay = entry.replay.clone();
        replay.hits = entry.hits.load(Ordering::Relaxed);
        Some(ClaimOutcome::Replay(replay))
    }

    /// Caches what a claim found, unless a delete through this wrapper may have come
    /// between the store's answer and now: the entry is put in first and then checked
    /// against the delete count read before the claim, so that a delete cannot slip
    /// between the check and the insert. A delete through another process is caught by
    /// `generation`, the store's [`Erasures`] count read before the claim: a later change
    /// of it makes the entry answer nothing (`cached`).
    fn remember(&self, request: &ClaimRequest<'_>, replay: &Replay, deletes_before: u64, generation: u64) {
        let Some(cache) = &self.cache else { return };
        // The entry never outlives its record: the store's `expires_at`, set by the
        // retention the holder completed with (which may be shorter than this claimer's:
        // another process, another configuration). Read against this process's clock;
        // a record already past it is not cached.
        let left = replay.expires_at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
        if left.is_zero() {
            return;
        }
        let Some(until) = Instant::now().checked_add(left.min(cache.time_to_live())) else { return };
        let hits = AtomicU64::new(replay.hits);
        let entry =
            Entry { fingerprint: request.fingerprint().copied(), replay: replay.clone(), hits, until, generation };
        cache.map.insert(*request.storage_key(), Arc::new(entry));
        if cache.deletes.load(Ordering::SeqCst) != deletes_before {
            cache.map.invalidate(request.storage_key());
        }
    }
}

impl Entries {
    fn time_to_live(&self) -> Duration {
        self.map.policy().time_to_live().unwrap_or(DEFAULT_TIME_TO_LIVE)
    }

    /// The store's [`Erasures`] count now: 0 without one, `None` when it cannot be read.
    fn generation(&self) -> Option<u64> {
        self.erasures.as_ref().map_or(Some(0), |erasures| erasures.generation())
    }
}

/// Builds a [`ReplayCache`]: `ReplayCache::builder(store)…build()`.
pub struct ReplayCacheBuilder<S> {
    inner: S,
    time_to_live: Duration,
    max_entries: u64,
    max_bytes: u64,
    erasures: Option<Arc<dyn Erasures>>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for ReplayCacheBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayCacheBuilder")
            .field("inner", &self.inner)
            .field("time_to_live", &self.time_to_live)
            .field("max_entries", &self.max_entries)
            .field("max_bytes", &self.max_bytes)
            .field("erasures", &self.erasures.is_some())
            .finish()
    }
}

impl<S> ReplayCacheBuilder<S> {
    /// How long an entry is answered from the cache, and so how late a delete made
    /// through another process is seen here. Default 5 s; at most a year is taken.
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.time_to_live = ttl;
        self
    }

    /// At most this many entries. Default 100,000.
    pub fn max_entries(mut self, n: u64) -> Self {
        self.max_entries = n;
        self
    }

    /// At most this many bytes of payload (each entry also counts a small overhead).
    /// Default 64 MiB.
    pub fn max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = n;
        self
    }

    /// Sees deletes made through other processes as soon as they return, through the
    /// store's count of them (see the [module docs](self)): every hit reads it, and an
    /// entry cached before it changed answers nothing. Without it (the default), such a
    /// delete is seen up to one time-to-live late.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use oncely::store::{Erasures, ReplayCache};
    /// use oncely::{IdempotencyKey, MemoryStore, Oncely};
    ///
    /// struct Counted(AtomicU64);
    /// impl Erasures for Counted {
    ///     fn generation(&self) -> Option<u64> {
    ///         Some(self.0.load(Ordering::SeqCst))
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let erasures = Arc::new(Counted(AtomicU64::new(0)));
    /// let store = ReplayCache::builder(MemoryStore::new()).erasures(erasures.clone()).build();
    /// let oncely = Oncely::new(store);
    /// let key = IdempotencyKey::new("order-18")?;
    /// for _ in 0..3 {
    ///     oncely.run(&key, None, || async { Ok::<_, oncely::Failure<()>>(1) }).await?;
    /// }
    /// assert_eq!(oncely.store().cache_hits(), 1);
    /// // Another process deleted a record: no entry cached before answers again.
    /// erasures.0.fetch_add(1, Ordering::SeqCst);
    /// oncely.run(&key, None, || async { Ok::<_, oncely::Failure<()>>(1) }).await?;
    /// assert_eq!(oncely.store().cache_hits(), 1, "asked the store");
    /// # Ok(()) }
    /// ```
    pub fn erasures(mut self, erasures: Arc<dyn Erasures>) -> Self {
        self.erasures = Some(erasures);
        self
    }

    /// The cache. A zero bound or time-to-live gives a cache that keeps nothing.
    pub fn build(self) -> ReplayCache<S> {
        // moka bounds one weight; charging every entry at least `max_bytes / max_entries`
        // makes that one bound keep both: n entries weigh at least n × max_bytes /
        // max_entries, so n ≤ max_entries, and each weighs at least its bytes.
        let floor = self.max_bytes.checked_div(self.max_entries).unwrap_or(u64::MAX);
        let map = moka::sync::Cache::builder()
            .max_capacity(if self.max_entries == 0 { 0 } else { self.max_bytes })
            .time_to_live(self.time_to_live.clamp(Duration::from_nanos(1), MAX_TIME_TO_LIVE))
            .weigher(move |_: &StorageKey, entry: &Arc<Entry>| {
                let bytes = entry.replay.payload.len() as u64 + ENTRY_OVERHEAD;
                u32::try_from(bytes.max(floor)).unwrap_or(u32::MAX)
            })
            .build();
        let counter = metrics::counter!("oncely_replay_cache_hits_total");
        let entries = Entries {
            map,
            hits: Arc::new(AtomicU64::new(0)),
            deletes: Arc::new(AtomicU64::new(0)),
            erasures: self.erasures,
            counter,
        };
        ReplayCache { inner: self.inner, cache: Some(entries) }
    }
}

impl<S: Store> Store for ReplayCache<S> {
    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        if let Some(outcome) = self.cached(request) {
            return Ok(outcome);
        }
        // Both counts read before the store is asked (see `remember`).
        let before = self.cache.as_ref().and_then(|c| Some((c.deletes.load(Ordering::SeqCst), c.generation()?)));
        let outcome = self.inner.claim(request).await?;
        if let (ClaimOutcome::Replay(replay), Some((deletes, generation))) = (&outcome, before) {
            self.remember(request, replay, deletes, generation);
        }
        Ok(outcome)
    }

    async fn complete(&self, claim: Claim, payload: Bytes, retention: Duration) -> Result<(), StoreError> {
        self.inner.complete(claim, payload, retention).await
    }

    async fn release(&self, claim: Claim) -> Result<(), StoreError> {
        self.inner.release(claim).await
    }

    async fn touch(&self, claim: Claim, lease: Duration) -> Result<(), StoreError> {
        self.inner.touch(claim, lease).await
    }

    async fn first_seen(&self, request: &FirstSeen<'_>) -> Result<bool, StoreError> {
        self.inner.first_seen(request).await
    }

    /// Written to the store, and added to the cached entries: a cached replay reports the
    /// hits the store holds, as far as this process knows. Hits other processes flush
    /// are seen when the entry is next read from the store.
    async fn record_hits(&self, hits: &[(StorageKey, u64)]) -> Result<(), StoreError> {
        self.inner.record_hits(hits).await?;
        if let Some(cache) = &self.cache {
            for (key, n) in hits {
                if let Some(entry) = cache.map.get(key) {
                    entry.hits.fetch_add(*n, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    fn subscribe(&self, key: &StorageKey) -> Notified {
        self.inner.subscribe(key)
    }
}

/// Reads go to the store; a delete also drops the key from this process's cache.
impl<S: StoreAdmin> StoreAdmin for ReplayCache<S> {
    async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        self.inner.get(key).await
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        // Counted before the entry is dropped: a claim that read the store before this
        // point and caches its answer later sees the count changed and drops it again
        // (`remember`). Dropped again after the store's delete, for a claim that cached
        // while it ran.
        if let Some(cache) = &self.cache {
            cache.deletes.fetch_add(1, Ordering::SeqCst);
            cache.map.invalidate(key);
        }
        let deleted = self.inner.delete(key).await;
        if let Some(cache) = &self.cache {
            cache.deletes.fetch_add(1, Ordering::SeqCst);
            cache.map.invalidate(key);
        }
        deleted
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.inner.purge_expired().await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.inner.stats().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn list(&self, after: Option<StorageKey>, limit: usize) -> Result<Vec<Record>, StoreError> {
        self.inner.list(after, limit).await
    }
}
