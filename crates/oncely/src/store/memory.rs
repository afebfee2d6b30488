//! The in-memory store: sharded, bounded in records and bytes, swept, with in-process
//! notifications.
//!
//! # Guarantees
//!
//! - **Atomicity.** Records are spread over shards by their storage key; each shard is a
//!   map behind its own mutex. Every method that changes a record does all of its reading
//!   and writing under that one shard's lock, so a claim is one atomic step. No method
//!   takes two shard locks at once, and no lock is held across an `.await`.
//! - **No global lock on the hot path.** Claims, replays and completions of different
//!   keys contend only when their keys share a shard. The only state shared by all shards
//!   is two atomic counters (records and bytes), touched when a record is created,
//!   completed or removed.
//! - **Durability: none.** Records live as long as the process. Use a durable store for
//!   anything that must survive a restart.
//! - **Time** is the process's wall clock (`SystemTime::now()`), read once per call.
//! - **Bounds.** At most [`MemoryStoreBuilder::max_entries`] records and
//!   [`MemoryStoreBuilder::max_bytes`] bytes, counted as [`RECORD_OVERHEAD`] says. A call
//!   that must create a record (a claim or a `first_seen` of an absent or expired key)
//!   and finds no room first drops expired records (they are absent to every read
//!   anyway), in its own shard and then in the next shards in turn. When that leaves no
//!   room it fails with [`StoreError::Capacity`], naming the bound, and changes nothing:
//!   **an unexpired record, completed or in progress, is never dropped to make room**, so
//!   a retry never runs an operation again because a flood of new keys pushed its result
//!   out. [`MemoryStoreBuilder::evict_completed_when_full`] opts into evicting unexpired
//!   completed records (the one that expires first, per shard) instead; in-progress
//!   records are never evicted.
//! - **Completions are never refused for room.** A claim reserves only the record's fixed
//!   part (overhead, key and scope); the payload is counted when `complete` stores it,
//!   always: the operation has run, and dropping its result would let a retry run it
//!   again. The byte count can therefore pass `max_bytes` by at most the payloads of the
//!   records that were in progress when the bound was reached; from then on every new
//!   record is refused until expiry, `delete` or `release` brings the count back under.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::Notify;

use super::{
    CapacityBound, Claim, ClaimOutcome, ClaimRequest, FirstSeen, Notified, Replay, Store, StoreAdmin, StoreError,
    StoreStats,
};
use crate::{ClaimId, Record, RecordState, StorageKey};

/// Expired records removed per shard-lock acquisition while purging, so that a sweep
/// never holds a shard for long.
const PURGE_BATCH: usize = 256;

/// The bytes a record counts against [`MemoryStoreBuilder::max_bytes`] beyond its payload,
/// raw key and scope (which count at their length in bytes).
///
/// It estimates what the store spends per record besides those: the slot in the shard's
/// hash map (key and the entry's box, counted twice because a map that has just grown
/// keeps up to half of its slots spare), the boxed entry, the element of the expiry
/// index (counted twice: a B-tree node may be half empty), and three allocator
/// headers, for the key's and scope's heap strings and the entry's box: 450 bytes on
/// 64-bit targets today (the size of `Entry` decides).
///
/// A payload counts at its length. The store keeps the `Bytes` it is given, so a payload
/// sliced from a larger buffer keeps all of that buffer alive; the HTTP layer stores a
/// buffer encoded for the purpose.
pub const RECORD_OVERHEAD: usize = 2 * (size_of::<StorageKey>() + size_of::<Box<Entry>>() + 1)
    + size_of::<Entry>()
    + 2 * size_of::<(SystemTime, StorageKey)>()
    + 3 * 16;

/// The default [`MemoryStoreBuilder::max_bytes`]: 1 GiB.
pub const DEFAULT_MAX_BYTES: usize = 1 << 30;

/// What a record counts against the byte bound: see [`RECORD_OVERHEAD`].
fn record_cost(record: &Record) -> usize {
    let payload = match &record.state {
        RecordState::Completed { payload, .. } => payload.len(),
        RecordState::InProgress { .. } => 0,
    };
    RECORD_OVERHEAD
        .saturating_add(record.key.as_str().len())
        .saturating_add(record.scope.as_str().len())
        .saturating_add(payload)
}

/// An in-process store. Cloning shares the records.
///
/// ```
/// use oncely::MemoryStore;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryStore::builder()
///     .max_entries(100_000)
///     .max_bytes(256 << 20)
///     .sweep_interval(Duration::from_secs(30))
///     .build();
/// # let _ = store; }
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    /// Records in all shards, expired-but-unswept ones included.
    len: AtomicUsize,
    /// The sum of [`Entry::cost`] over all shards.
    bytes: AtomicUsize,
    max_entries: usize,
    max_bytes: usize,
    /// [`MemoryStoreBuilder::evict_completed_when_full`]. It also decides how the
    /// shards' expiry indexes file records (see [`Shard::by_expiry`]).
    evict_completed: bool,
}

#[derive(Default)]
struct Shard {
    /// The records, each in a box of its own: a slot holds the key and a pointer (40
    /// bytes), so that a growing table moves 40 bytes a record rather than the entry's
    /// 224, and a record never moves once stored.
    map: crate::key::KeyMap<Box<Entry>>,
    /// Every record of the shard, once, by `(filed_at, key)`: the sweep and eviction
    /// order. **A record is filed at or before its expiry** (`Entry::filed_at <=
    /// record.expires_at`), and re-filed lazily: an expiry moved later (a completion,
    /// whose retention counts from a moment after its claim's; a renewal; a takeover)
    /// leaves the record where it is filed, sparing the index a removal and an insertion
    /// on every completion; one moved earlier re-files it at once ([`Shard::set_expiry`]).
    /// So whoever reads the index from its front for what has expired (the sweep,
    /// eviction, `stats`) checks each record's own expiry, and re-files one that is not
    /// due yet at its expiry ([`Shard::refile`]): each record is re-filed at most once
    /// per change of its expiry. Where the order among unexpired records decides what is
    /// evicted ([`Inner::evict_completed`], passed as `exact_order`), every change
    /// re-files at once, and each record is filed at its expiry.
    by_expiry: BTreeSet<(SystemTime, StorageKey)>,
    /// How many records of `map` are completed, expired ones included, so that `stats`
    /// reads counts rather than every record. **Kept exact where a record enters, leaves
    /// or changes state:** [`Shard::insert`], [`Shard::remove`] and `complete` (the only
    /// change of state to completed; a takeover or a renewal stays in progress).
    completed: usize,
}

/// A record and what the shard keeps beside it: 224 bytes on 64-bit targets. One more
/// field would put its box in the allocator's next size class (mimalloc, the gateway's,
/// rounds 232 bytes up to 256), so what can be derived is not kept (`cost`).
struct Entry {
    record: Record,
    /// How long before `record.expires_at` [`Shard::by_expiry`] files this record, in
    /// nanoseconds: zero when it is filed at its expiry (see [`Entry::filed_at`]).
    filed_early_by: u64,
    /// Waiters for this in-progress record, created by the first `subscribe`.
    waiters: Option<Arc<Notify>>,
}

impl Entry {
    fn new(record: Record) -> Self {
        Self { record, filed_early_by: 0, waiters: None }
    }

    /// What this record adds to [`Inner::bytes`]. Derived from the record, not kept: the
    /// fields it reads change only in `complete`, which counts the change, so removing a
    /// record gives back exactly what was counted.
    fn cost(&self) -> usize {
        record_cost(&self.record)
    }

    /// Where [`Shard::by_expiry`] files this record: never after `record.expires_at`.
    fn filed_at(&self) -> SystemTime {
        // `filed_early_by` is at most the time from a filing, a valid `SystemTime`, to
        // the expiry: subtracting it gives that filing back exactly, and cannot fail.
        let filed_at = self.record.expires_at.checked_sub(Duration::from_nanos(self.filed_early_by));
        debug_assert!(filed_at.is_some(), "a filing is a valid time");
        filed_at.unwrap_or(self.record.expires_at)
    }

    /// Sets the record's expiry; the filing to move from when the index must re-file it
    /// now (the expiry moved before where it is filed, or moved at all with
    /// `exact_order`, or more than 584 years later), else `None` (see
    /// [`Shard::by_expiry`]). The caller passes that to [`Shard::set_expiry`]'s
    /// re-filing.
    fn set_expiry(&mut self, expires_at: SystemTime, exact_order: bool) -> Option<SystemTime> {
        let filed_at = self.filed_at();
        self.record.expires_at = expires_at;
        let early = expires_at.duration_since(filed_at).ok().and_then(|by| u64::try_from(by.as_nanos()).ok());
        match early {
            Some(by) if by == 0 || !exact_order => {
                self.filed_early_by = by;
                None
            }
            _ => {
                self.filed_early_by = 0;
                Some(filed_at)
            }
        }
    }

    fn wake(&mut self) {
        if let Some(waiters) = self.waiters.take() {
            waiters.notify_waiters();
        }
    }
}

/// Builds a [`MemoryStore`].
#[derive(Clone, Debug)]
pub struct MemoryStoreBuilder {
    max_entries: usize,
    max_bytes: usize,
    evict_completed: bool,
    shards: usize,
    sweep_interval: Option<Duration>,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self {
            max_entries: usize::MAX,
            max_bytes: DEFAULT_MAX_BYTES,
            evict_completed: false,
            shards: 64,
            sweep_interval: Some(Duration::from_secs(60)),
        }
    }
}

impl MemoryStoreBuilder {
    /// The most records the store holds (default: no bound of its own; the byte bound
    /// keeps the count under `max_bytes / RECORD_OVERHEAD`). Must be at least 1.
    pub fn max_entries(mut self, max: usize) -> Self {
        self.max_entries = max.max(1);
        self
    }

    /// The most bytes the store holds, counted as [`RECORD_OVERHEAD`] says (default
    /// [`DEFAULT_MAX_BYTES`], 1 GiB). Must be at least 1. A new record that would pass it
    /// is refused with [`StoreError::Capacity`]; a completion never is (see the
    /// [module docs](self)).
    pub fn max_bytes(mut self, max: usize) -> Self {
        self.max_bytes = max.max(1);
        self
    }

    /// Whether a full store may evict unexpired *completed* records to make room for a
    /// new one, the one that expires first (per shard) going first (default `false`).
    /// With this on, every change of a record's expiry re-files it in the expiry index at
    /// once (off, a later expiry is re-filed lazily), so that order is exact.
    ///
    /// Off, a full store refuses new records instead, and every completed record is
    /// replayed until its retention ends. On, a retry of an evicted key runs its operation
    /// again: choose it only for operations where that is acceptable and staying
    /// available under a flood of new keys matters more. In-progress records are never
    /// evicted either way.
    pub fn evict_completed_when_full(mut self, evict: bool) -> Self {
        self.evict_completed = evict;
        self
    }

    /// How many shards (default 64; rounded up to a power of two). More shards mean less
    /// lock contention between keys; one shard makes eviction order exact.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards.max(1).next_power_of_two();
        self
    }

    /// How often a background task removes expired records (default 60 s). The task is
    /// spawned on the current Tokio runtime, if there is one, and stops when the last
    /// clone of the store is dropped.
    pub fn sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_interval = (!every.is_zero()).then_some(every);
        self
    }

    /// No background sweeping: expired records are still invisible to every read and are
    /// removed when room is needed or by [`Store::purge_expired`].
    pub fn no_sweeper(mut self) -> Self {
        self.sweep_interval = None;
        self
    }

    /// Builds the store and starts its sweeper.
    pub fn build(self) -> MemoryStore {
        let shards = (0..self.shards).map(|_| Mutex::new(Shard::default())).collect();
        let inner = Arc::new(Inner {
            shards,
            len: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            evict_completed: self.evict_completed,
        });
        if let (Some(every), Ok(runtime)) = (self.sweep_interval, tokio::runtime::Handle::try_current()) {
            runtime.spawn(sweep(Arc::downgrade(&inner), every));
        }
        MemoryStore { inner }
    }
}

async fn sweep(inner: Weak<Inner>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let purged = inner.purge_expired(SystemTime::now());
        if purged > 0 {
            tracing::debug!(purged, "memory store swept expired records");
        }
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("len", &self.len())
            .field("bytes", &self.bytes())
            .field("max_entries", &self.inner.max_entries)
            .field("max_bytes", &self.inner.max_bytes)
            .field("evict_completed_when_full", &self.inner.evict_completed)
            .field("shards", &self.inner.shards.len())
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with the builder's defaults: at most 1 GiB, 64 shards, no eviction of
    /// unexpired records, and a sweeper every 60 s (when created inside a Tokio runtime).
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder to set the bounds, the shards and the sweeper.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// Records held, expired-but-unswept ones included.
    pub fn len(&self) -> usize {
        self.inner.len.load(Ordering::Relaxed)
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held as counted against [`MemoryStoreBuilder::max_bytes`] (see
    /// [`RECORD_OVERHEAD`]), expired-but-unswept records included.
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Relaxed)
    }
}

fn deadline(now: SystemTime, after: Duration) -> Result<SystemTime, StoreError> {
    now.checked_add(after).ok_or_else(|| StoreError::InvalidRequest(format!("{after:?} from now overflows the clock")))
}

impl Inner {
    fn shard_index(&self, key: &StorageKey) -> usize {
        (key.prefix_u64() as usize) & (self.shards.len() - 1)
    }

    fn shard(&self, key: &StorageKey) -> MutexGuard<'_, Shard> {
        self.lock(self.shard_index(key))
    }

    fn lock(&self, index: usize) -> MutexGuard<'_, Shard> {
        // A panic while a shard was held cannot leave a record half-written: every
        // mutation below is a handful of infallible assignments. So the poison flag
        // carries no information here and is ignored.
        self.shards[index].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes room for one new record of `cost` bytes under both bounds, or names the
    /// bound that has none. Each counter moves by a compare-and-swap against its bound,
    /// so no number of racing callers takes either past it: the record is counted first
    /// and given back when its bytes do not fit.
    fn try_reserve(&self, cost: usize) -> Result<(), CapacityBound> {
        self.len
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |len| (len < self.max_entries).then_some(len + 1))
            .map_err(|_| CapacityBound::Records)?;
        let fits = self.bytes.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |bytes| {
            bytes.checked_add(cost).filter(|total| *total <= self.max_bytes)
        });
        if fits.is_err() {
            self.len.fetch_sub(1, Ordering::AcqRel);
            return Err(CapacityBound::Bytes);
        }
        Ok(())
    }

    /// Whether a new record of `cost` bytes would fit now (racy: a hint for how long to
    /// keep making room, never a reservation).
    fn has_room(&self, cost: usize) -> bool {
        self.len.load(Ordering::Relaxed) < self.max_entries
            && self.bytes.load(Ordering::Relaxed).checked_add(cost).is_some_and(|total| total <= self.max_bytes)
    }

    /// Gives back what a removed record of `cost` bytes counted.
    fn give_back(&self, cost: usize) {
        self.len.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(cost, Ordering::AcqRel);
    }

    /// Counts the change of a record's cost from `old` to `new` bytes.
    fn recount(&self, old: usize, new: usize) {
        if new >= old {
            self.bytes.fetch_add(new - old, Ordering::AcqRel);
        } else {
            self.bytes.fetch_sub(old - new, Ordering::AcqRel);
        }
    }

    /// Takes room for a new record of `cost` bytes, dropping from `shard` (which the
    /// caller holds) what a full store may drop (see [`Shard::evict_one`]) until there is
    /// room or nothing droppable is left.
    fn reserve(&self, shard: &mut Shard, cost: usize, now: SystemTime) -> Result<(), CapacityBound> {
        loop {
            match self.try_reserve(cost) {
                Ok(()) => return Ok(()),
                Err(bound) => match shard.evict_one(now, self.evict_completed) {
                    Some(freed) => self.give_back(freed),
                    None => return Err(bound),
                },
            }
        }
    }

    /// Drops what a full store may drop from the shards other than `skip`, locking one
    /// at a time, until a new record of `cost` bytes fits; false when no shard had
    /// enough.
    fn make_room_elsewhere(&self, skip: usize, cost: usize, now: SystemTime) -> bool {
        let n = self.shards.len();
        for offset in 1..n {
            let mut shard = self.lock((skip + offset) & (n - 1));
            while !self.has_room(cost) {
                match shard.evict_one(now, self.evict_completed) {
                    Some(freed) => self.give_back(freed),
                    None => break,
                }
            }
            if self.has_room(cost) {
                return true;
            }
        }
        false
    }

    /// The error of a store whose `bound` refused a new record.
    fn full(&self, bound: CapacityBound) -> StoreError {
        let limit = match bound {
            CapacityBound::Records => self.max_entries,
            CapacityBound::Bytes => self.max_bytes,
        };
        StoreError::Capacity { bound, limit: limit as u64 }
    }

    /// The shape shared by `claim` and `first_seen`: under the lock of `key`'s shard,
    /// `existing` answers from a live record at the key. When it does not, the key holds
    /// nothing live: an expired record there is dropped (giving its room back), room for
    /// `record` is reserved, and `record` is inserted, answering `created`.
    ///
    /// Making room drops only what [`Shard::evict_one`] may drop, first in this shard
    /// and then in the others (one lock at a time, never two at once). Each pass is
    /// atomic under the shard lock; a next pass happens only when room was made in
    /// another shard in between, and another caller may take that room first, so after
    /// three passes the store is reported full.
    fn answer_or_create<T>(
        &self,
        key: &StorageKey,
        now: SystemTime,
        mut existing: impl FnMut(&mut Shard) -> Option<T>,
        record: impl Fn() -> Record,
        created: T,
    ) -> Result<T, StoreError> {
        let index = self.shard_index(key);
        let mut refused = CapacityBound::Records;
        for _ in 0..3 {
            let mut shard = self.lock(index);
            if let Some(answer) = existing(&mut shard) {
                return Ok(answer);
            }
            // Built only when the key holds nothing live: a replay copies nothing.
            let record = record();
            let cost = record_cost(&record);
            if shard.map.get(key).is_some_and(|entry| entry.record.is_expired(now))
                && let Some(freed) = shard.remove(key)
            {
                self.give_back(freed);
            }
            match self.reserve(&mut shard, cost, now) {
                Ok(()) => {
                    if let Some(replaced) = shard.insert(record) {
                        // Unreachable: the key held nothing live and its expired record
                        // was removed above. Counted right all the same.
                        self.give_back(replaced);
                    }
                    return Ok(created);
                }
                Err(bound) => refused = bound,
            }
            drop(shard);
            if !self.make_room_elsewhere(index, cost, now) {
                break;
            }
        }
        Err(self.full(refused))
    }

    fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        let now = SystemTime::now();
        let lease_until = deadline(now, request.lease())?;
        let expires_at = deadline(now, request.retention())?.max(lease_until);
        let record = || Record {
            storage_key: *request.storage_key(),
            key: request.key().clone(),
            scope: request.scope().clone(),
            fingerprint: request.fingerprint().copied(),
            created_at: now,
            expires_at,
            state: RecordState::InProgress { claim_id: request.claim_id(), lease_until },
        };
        self.answer_or_create(
            request.storage_key(),
            now,
            |shard| shard.claim_existing(request, now, lease_until, expires_at, self.evict_completed),
            record,
            ClaimOutcome::Acquired { takeover: false },
        )
    }

    fn purge_expired(&self, now: SystemTime) -> u64 {
        let mut purged = 0;
        for index in 0..self.shards.len() {
            loop {
                let (read, removed, freed) = self.lock(index).remove_expired(now, PURGE_BATCH);
                self.len.fetch_sub(removed, Ordering::AcqRel);
                self.bytes.fetch_sub(freed, Ordering::AcqRel);
                purged += removed as u64;
                if read < PURGE_BATCH {
                    break;
                }
            }
        }
        purged
    }

    /// [`StoreAdmin::stats`] at `now`.
    fn stats(&self, now: SystemTime) -> StoreStats {
        let mut stats = StoreStats::default();
        for index in 0..self.shards.len() {
            let mut shard = self.lock(index);
            let (mut records, mut completed) = (shard.map.len(), shard.completed);
            // The expired records are not removed here (a read), but records filed
            // before their expiry and not due are re-filed (see `Shard::by_expiry`), so
            // that the next call does not read them again.
            let (_, expired) = shard.due(now, usize::MAX);
            for entry in expired.iter().filter_map(|key| shard.map.get(key)) {
                records -= 1;
                completed -= usize::from(entry.record.is_completed());
            }
            stats.records += records as u64;
            stats.completed += completed as u64;
            stats.in_progress += (records - completed) as u64;
        }
        stats
    }

    fn first_seen(&self, request: &FirstSeen<'_>) -> Result<bool, StoreError> {
        let now = SystemTime::now();
        let expires_at = deadline(now, request.window())?;
        let storage_key = request.storage_key();
        let marker = || Record {
            storage_key: *storage_key,
            key: request.key().clone(),
            scope: request.scope().clone(),
            fingerprint: None,
            created_at: now,
            expires_at,
            state: RecordState::Completed { payload: Bytes::new(), completed_at: now, hits: 0 },
        };
        let seen = |shard: &mut Shard| {
            let entry = shard.live_mut(storage_key, now)?;
            if let RecordState::Completed { hits, .. } = &mut entry.record.state {
                *hits += 1;
            }
            Some(false)
        };
        self.answer_or_create(storage_key, now, seen, marker, true)
    }
}

impl Shard {
    /// The unexpired entry at `key`, if any.
    fn live_mut(&mut self, key: &StorageKey, now: SystemTime) -> Option<&mut Entry> {
        self.map.get_mut(key).map(|entry| &mut **entry).filter(|entry| !entry.record.is_expired(now))
    }

    /// Answers a claim from the existing live record; `None` when a record must be
    /// created (the key is absent or its record expired).
    fn claim_existing(
        &mut self,
        request: &ClaimRequest<'_>,
        now: SystemTime,
        lease_until: SystemTime,
        expires_at: SystemTime,
        exact_order: bool,
    ) -> Option<ClaimOutcome> {
        let entry = self.live_mut(request.storage_key(), now)?;
        if entry.record.fingerprint.as_ref() != request.fingerprint() {
            return Some(ClaimOutcome::Mismatch);
        }
        match &entry.record.state {
            RecordState::Completed { payload, completed_at, hits } => {
                // A read: the hit is counted by the engine and flushed by `record_hits`.
                Some(ClaimOutcome::Replay(Replay {
                    payload: payload.clone(),
                    completed_at: *completed_at,
                    hits: *hits,
                    expires_at: entry.record.expires_at,
                }))
            }
            RecordState::InProgress { lease_until: held_until, .. } if now < *held_until => {
                Some(ClaimOutcome::InProgress { lease_until: *held_until })
            }
            RecordState::InProgress { .. } => {
                entry.record.state = RecordState::InProgress { claim_id: request.claim_id(), lease_until };
                entry.wake();
                let moved = entry.set_expiry(expires_at, exact_order);
                self.set_expiry(request.storage_key(), moved, expires_at);
                Some(ClaimOutcome::Acquired { takeover: true })
            }
        }
    }

    /// The live in-progress entry at `key` held by `claim_id`, or `LeaseLost`.
    fn held_mut(&mut self, key: &StorageKey, claim_id: ClaimId, now: SystemTime) -> Result<&mut Entry, StoreError> {
        match self.live_mut(key, now) {
            Some(entry) if matches!(entry.record.state, RecordState::InProgress { claim_id: holder, .. } if holder == claim_id) => {
                Ok(entry)
            }
            _ => Err(StoreError::LeaseLost),
        }
    }

    /// Inserts `record`; the cost of a record it replaced, if any (callers remove the
    /// key's record first, so none).
    fn insert(&mut self, record: Record) -> Option<usize> {
        let (key, expires_at) = (record.storage_key, record.expires_at);
        self.completed += usize::from(record.is_completed());
        let old = self.map.insert(key, Box::new(Entry::new(record)));
        // The replaced record's index entry goes before the new one is added: filed at
        // the same time they are the same entry, and removing after adding would unindex
        // the new record (never swept, never taken out of `stats`).
        let replaced = old.map(|mut old| {
            self.by_expiry.remove(&(old.filed_at(), key));
            self.completed -= usize::from(old.record.is_completed());
            old.wake();
            old.cost()
        });
        self.by_expiry.insert((expires_at, key));
        replaced
    }

    /// Removes the record at `key` and wakes its waiters; its cost when there was one.
    fn remove(&mut self, key: &StorageKey) -> Option<usize> {
        let mut entry = self.map.remove(key)?;
        self.by_expiry.remove(&(entry.filed_at(), *key));
        self.completed -= usize::from(entry.record.is_completed());
        entry.wake();
        Some(entry.cost())
    }

    /// Finishes [`Entry::set_expiry`] for the record at `key`, whose expiry is now
    /// `expires_at`: re-files it there when `moved` names the filing it moved before.
    fn set_expiry(&mut self, key: &StorageKey, moved: Option<SystemTime>, expires_at: SystemTime) {
        if let Some(filed_at) = moved {
            self.by_expiry.remove(&(filed_at, *key));
            self.by_expiry.insert((expires_at, *key));
        }
    }

    /// Reads the index entry `(filed_at, key)`, found due at `now`: true when its record
    /// has expired. One filed early and not due yet is re-filed at its expiry (see
    /// [`Shard::by_expiry`]), so that no reader from the front meets it again before then.
    fn refile(&mut self, filed_at: SystemTime, key: &StorageKey, now: SystemTime) -> bool {
        let Some(entry) = self.map.get_mut(key) else {
            // Unreachable: the index holds the records of the map, each once. A stray
            // entry would otherwise stay at the front for good.
            self.by_expiry.remove(&(filed_at, *key));
            return false;
        };
        debug_assert_eq!(entry.filed_at(), filed_at, "each record is filed once, where its entry says");
        if entry.record.is_expired(now) {
            return true;
        }
        let expires_at = entry.record.expires_at;
        entry.filed_early_by = 0;
        self.set_expiry(key, Some(filed_at), expires_at);
        false
    }

    /// The index entries due at `now` (at most `limit`), the records filed early among
    /// them re-filed ([`Shard::refile`]): how many entries were read, and the keys of the
    /// records that have expired, in the index's order.
    fn due(&mut self, now: SystemTime, limit: usize) -> (usize, Vec<StorageKey>) {
        let mut due: Vec<(SystemTime, StorageKey)> =
            self.by_expiry.iter().take_while(|(filed_at, _)| *filed_at <= now).take(limit).copied().collect();
        let read = due.len();
        due.retain(|(filed_at, key)| self.refile(*filed_at, key, now));
        (read, due.into_iter().map(|(_, key)| key).collect())
    }

    /// Drops one record to make room; its cost, or `None` when the shard holds nothing
    /// it may drop.
    ///
    /// This is where the store keeps its promise that a full store refuses new records
    /// rather than forgetting results: the victim is an expired record (absent to every
    /// read already), the one that expired first. Only with `evict_completed` (see
    /// [`MemoryStoreBuilder::evict_completed_when_full`]) may it instead be the unexpired
    /// completed record that expires first. An in-progress record is never a victim.
    ///
    /// Records filed before their expiry (see [`Shard::by_expiry`]) are re-filed as they
    /// are met, so an expired record is always found. Which expired record goes first may
    /// then differ from their expiries' order, which nothing observes: each is absent to
    /// every read. Among unexpired completed records the order is exact: with
    /// `evict_completed` every record is filed at its expiry.
    fn evict_one(&mut self, now: SystemTime, evict_completed: bool) -> Option<usize> {
        // Each turn removes a record or re-files one past `now`, which this call then
        // never meets again: the loop ends.
        while let Some(&(filed_at, key)) = self.by_expiry.first().filter(|(filed_at, _)| *filed_at <= now) {
            if self.refile(filed_at, &key, now) {
                return self.remove(&key);
            }
        }
        if !evict_completed {
            return None;
        }
        // Nothing has expired: the completed record filed first.
        let victim = self
            .by_expiry
            .iter()
            .find(|(_, key)| self.map.get(key).is_some_and(|entry| entry.record.is_completed()))
            .map(|(_, key)| *key)?;
        self.remove(&victim)
    }

    /// Reads up to `limit` index entries due at `now`, removing the expired records and
    /// re-filing the others (see [`Shard::by_expiry`]): how many entries were read, and
    /// how many records were removed with the bytes they counted.
    fn remove_expired(&mut self, now: SystemTime, limit: usize) -> (usize, usize, usize) {
        let (read, expired) = self.due(now, limit);
        let (removed, freed) =
            expired.iter().filter_map(|key| self.remove(key)).fold((0, 0), |(n, bytes), cost| (n + 1, bytes + cost));
        (read, removed, freed)
    }
}

impl Store for MemoryStore {
    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        self.inner.claim(request)
    }

    /// Never refused for room: the payload is counted whatever the byte bound says (see
    /// the [module docs](self)), because the operation has run and losing its result
    /// would let a retry run it again.
    async fn complete(&self, claim: Claim, payload: Bytes, retention: Duration) -> Result<(), StoreError> {
        let Claim { storage_key: ref key, claim_id } = claim;
        let now = SystemTime::now();
        let expires_at = deadline(now, retention)?;
        let mut shard = self.inner.shard(key);
        let entry = shard.held_mut(key, claim_id, now)?;
        // In progress (`held_mut`), now completed: one more for `Shard::completed`. The
        // payload is the only change of what the record counts (`Entry::cost`).
        let old_cost = entry.cost();
        entry.record.state = RecordState::Completed { payload, completed_at: now, hits: 0 };
        entry.wake();
        self.inner.recount(old_cost, entry.cost());
        // Usually later than the claim's expiry: the record stays where it is filed.
        let moved = entry.set_expiry(expires_at, self.inner.evict_completed);
        shard.completed += 1;
        shard.set_expiry(key, moved, expires_at);
        Ok(())
    }

    async fn release(&self, claim: Claim) -> Result<(), StoreError> {
        let Claim { storage_key: ref key, claim_id } = claim;
        let now = SystemTime::now();
        let mut shard = self.inner.shard(key);
        shard.held_mut(key, claim_id, now)?;
        if let Some(freed) = shard.remove(key) {
            self.inner.give_back(freed);
        }
        Ok(())
    }

    async fn touch(&self, claim: Claim, lease: Duration) -> Result<(), StoreError> {
        let Claim { storage_key: ref key, claim_id } = claim;
        let now = SystemTime::now();
        let lease_until = deadline(now, lease)?;
        let mut shard = self.inner.shard(key);
        let entry = shard.held_mut(key, claim_id, now)?;
        entry.record.state = RecordState::InProgress { claim_id, lease_until };
        // A renewed lease never outlives the record: the expiry only moves later.
        if lease_until > entry.record.expires_at {
            let moved = entry.set_expiry(lease_until, self.inner.evict_completed);
            shard.set_expiry(key, moved, lease_until);
        }
        Ok(())
    }

    async fn first_seen(&self, request: &FirstSeen<'_>) -> Result<bool, StoreError> {
        self.inner.first_seen(request)
    }

    async fn record_hits(&self, hits: &[(StorageKey, u64)]) -> Result<(), StoreError> {
        let now = SystemTime::now();
        for (key, n) in hits {
            let mut shard = self.inner.shard(key);
            if let Some(Entry { record: Record { state: RecordState::Completed { hits, .. }, .. }, .. }) =
                shard.live_mut(key, now)
            {
                *hits = hits.saturating_add(*n);
            }
        }
        Ok(())
    }

    fn subscribe(&self, key: &StorageKey) -> Notified {
        let now = SystemTime::now();
        let mut shard = self.inner.shard(key);
        match shard.live_mut(key, now) {
            Some(entry) if !entry.record.is_completed() => {
                let waiters = entry.waiters.get_or_insert_with(|| Arc::new(Notify::new())).clone();
                // Created under the shard lock: every change made after this point calls
                // `notify_waiters` under the same lock, and a `Notified` future receives
                // every `notify_waiters` issued after its creation, polled or not.
                Box::pin(waiters.notified_owned())
            }
            _ => Box::pin(std::future::ready(())),
        }
    }
}

impl StoreAdmin for MemoryStore {
    async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        let now = SystemTime::now();
        Ok(self.inner.shard(key).live_mut(key, now).map(|entry| entry.record.clone()))
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let now = SystemTime::now();
        let mut shard = self.inner.shard(key);
        let live = shard.live_mut(key, now).is_some();
        if let Some(freed) = shard.remove(key) {
            self.inner.give_back(freed);
        }
        Ok(live)
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        Ok(self.inner.purge_expired(SystemTime::now()))
    }

    /// Reads each shard's counts (one lock at a time) and takes out the records that
    /// have expired but are not swept yet, found from the front of the expiry index: the
    /// cost is the number of shards and of such records (and, once each, of records
    /// filed before their expiry that it re-files: see `Shard::by_expiry`), not of all
    /// records (a scrape of `/metrics` calls this).
    async fn stats(&self) -> Result<StoreStats, StoreError> {
        Ok(self.inner.stats(SystemTime::now()))
    }

    /// Scans every shard (one lock at a time) and sorts: for admin use.
    async fn list(&self, after: Option<StorageKey>, limit: usize) -> Result<Vec<Record>, StoreError> {
        let now = SystemTime::now();
        let mut found = Vec::new();
        for index in 0..self.inner.shards.len() {
            let shard = self.inner.lock(index);
            found.extend(
                shard
                    .map
                    .values()
                    .filter(|entry| !entry.record.is_expired(now))
                    .filter(|entry| after.is_none_or(|after| entry.record.storage_key > after))
                    .map(|entry| entry.record.clone()),
            );
        }
        found.sort_unstable_by_key(|record| record.storage_key);
        found.truncate(limit);
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IdempotencyKey, Scope};

    const HOUR: Duration = Duration::from_secs(3600);

    /// A one-shard store without a sweeper, evicting completed records or not.
    fn one_shard(evict_completed: bool) -> MemoryStore {
        MemoryStore::builder().shards(1).no_sweeper().evict_completed_when_full(evict_completed).build()
    }

    /// Claims `name` in `store` (lease a second, retention `claimed_for`) and completes it
    /// with retention `completed_for`: the record's storage key, and its expiry as the
    /// claim set it and as the completion did.
    async fn claimed_then_completed(
        store: &MemoryStore,
        name: &str,
        claimed_for: Duration,
        completed_for: Duration,
    ) -> (StorageKey, SystemTime, SystemTime) {
        let (scope, key) = (Scope::global(), IdempotencyKey::new(name).expect("a valid key"));
        let request = ClaimRequest::new(&scope, &key, None, Duration::from_secs(1), claimed_for);
        store.claim(&request).await.expect("claim");
        let claimed = store.get(request.storage_key()).await.expect("get").expect("a record").expires_at;
        store.complete(request.claim(), Bytes::from_static(b"r"), completed_for).await.expect("complete");
        let completed = store.get(request.storage_key()).await.expect("get").expect("a record").expires_at;
        (*request.storage_key(), claimed, completed)
    }

    /// What the shard holds: records, index entries, and where the one at `key` is filed.
    fn filing(store: &MemoryStore, key: &StorageKey) -> (usize, usize, Option<SystemTime>) {
        let shard = store.inner.lock(0);
        (shard.map.len(), shard.by_expiry.len(), shard.map.get(key).map(|entry| entry.filed_at()))
    }

    /// A completion that moves the expiry later leaves the record filed at its claim's
    /// expiry; `stats` and a sweep between the two do not count or remove it, and re-file
    /// it; it is removed once its own expiry is due.
    #[tokio::test]
    async fn a_record_filed_before_its_expiry_is_swept_at_its_expiry_not_its_filing() {
        let store = one_shard(false);
        let (key, claimed, completed) = claimed_then_completed(&store, "later", HOUR, 2 * HOUR).await;
        assert!(completed > claimed);
        assert_eq!(filing(&store, &key), (1, 1, Some(claimed)), "filed where the claim put it");

        let between = claimed + Duration::from_secs(60);
        let stats = store.inner.stats(between);
        assert_eq!((stats.records, stats.completed), (1, 1), "not expired before its own expiry");
        assert_eq!(filing(&store, &key), (1, 1, Some(completed)), "re-filed at its expiry, once");
        assert_eq!(store.inner.purge_expired(between), 0, "not removed at its filing");
        assert!(store.inner.lock(0).evict_one(between, false).is_none(), "nothing expired to evict");

        assert_eq!(store.inner.purge_expired(completed), 1, "removed when its expiry is due");
        assert_eq!(filing(&store, &key), (0, 0, None));
        assert_eq!((store.len(), store.bytes()), (0, 0), "its room given back");
    }

    /// A completion that moves the expiry earlier re-files the record at once, so that it
    /// is swept, evicted and left out of `stats` on time.
    #[tokio::test]
    async fn a_record_whose_expiry_moves_earlier_is_re_filed_at_once() {
        let store = one_shard(false);
        let (key, claimed, completed) = claimed_then_completed(&store, "earlier", 2 * HOUR, HOUR).await;
        assert!(completed < claimed);
        assert_eq!(filing(&store, &key), (1, 1, Some(completed)));
        assert_eq!(store.inner.stats(completed).records, 0, "expired at its own expiry");
        assert!(store.inner.lock(0).evict_one(completed, false).is_some(), "an expired record is evicted");
        assert_eq!(filing(&store, &key), (0, 0, None));
    }

    /// Eviction finds an expired record filed after one filed before its expiry, re-filing
    /// that one on the way, and never evicts it while eviction of completed records is off.
    #[tokio::test]
    async fn eviction_reaches_an_expired_record_past_one_filed_early() {
        let store = one_shard(false);
        let (early, claimed, completed) = claimed_then_completed(&store, "early", HOUR, 2 * HOUR).await;
        // Filed half a minute after "early", and due by `between` (unless a minute passes
        // between the two claims).
        let retention = HOUR + Duration::from_secs(30);
        let (expired, ..) = claimed_then_completed(&store, "expired", retention, retention).await;
        let between = claimed + Duration::from_secs(90);
        let mut shard = store.inner.lock(0);
        assert!(shard.evict_one(between, false).is_some(), "the expired record is found");
        assert!(!shard.map.contains_key(&expired) && shard.map.contains_key(&early));
        assert_eq!(shard.map.get(&early).map(|entry| entry.filed_at()), Some(completed), "re-filed on the way");
        assert!(shard.evict_one(between, false).is_none(), "an unexpired record is kept");
        assert_eq!((shard.map.len(), shard.by_expiry.len()), (1, 1));
    }

    /// Where unexpired completed records may be evicted, earliest expiry first, every
    /// record is filed at its expiry: a long operation's record does not go before one
    /// that expires earlier.
    #[tokio::test]
    async fn with_eviction_on_every_record_is_filed_at_its_expiry() {
        let store = one_shard(true);
        let (long, claimed, completed) = claimed_then_completed(&store, "long", HOUR, 3 * HOUR).await;
        assert_eq!(filing(&store, &long), (1, 1, Some(completed)), "re-filed at the completion");
        let (sooner, ..) = claimed_then_completed(&store, "sooner", HOUR, 2 * HOUR).await;
        let mut shard = store.inner.lock(0);
        assert!(shard.evict_one(claimed, true).is_some());
        assert!(!shard.map.contains_key(&sooner) && shard.map.contains_key(&long), "the earliest expiry went first");
    }

    /// The figure `RECORD_OVERHEAD`'s documentation gives, kept true: an entry that grows
    /// changes what a record counts against the byte bound.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn the_record_overhead_is_the_documented_figure() {
        assert_eq!(size_of::<Entry>(), 224);
        assert_eq!(RECORD_OVERHEAD, 450);
    }
}
