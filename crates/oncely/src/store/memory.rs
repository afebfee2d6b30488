//! The in-memory store: sharded, bounded, swept, with in-process notifications.
//!
//! # Guarantees
//!
//! - **Atomicity.** Records are spread over shards by their storage key; each shard is a
//!   map behind its own mutex. Every method that changes a record does all of its reading
//!   and writing under that one shard's lock, so a claim is one atomic step. No method
//!   takes two shard locks at once, and no lock is held across an `.await`.
//! - **No global lock on the hot path.** Claims, replays and completions of different
//!   keys contend only when their keys share a shard. The only state shared by all shards
//!   is an atomic record count, touched when a record is created or removed.
//! - **Durability: none.** Records live as long as the process. Use a durable store for
//!   anything that must survive a restart.
//! - **Time** is the process's wall clock (`SystemTime::now()`), read once per call.
//! - **Bound.** At most [`MemoryStoreBuilder::max_entries`] records. A claim that needs
//!   room evicts an expired record, else the completed record with the earliest expiry,
//!   first in its own shard and then in the next shards in turn (with one shard the order
//!   is exact; with many it is per shard). An in-progress record is never evicted: when
//!   nothing can be evicted, the claim fails with [`StoreError::Capacity`].

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

use super::{ClaimOutcome, ClaimRequest, Notified, Store, StoreError, StoreStats};
use crate::{ClaimId, IdempotencyKey, Record, RecordState, Scope, StorageKey};

/// Expired records removed per shard-lock acquisition while purging, so that a sweep
/// never holds a shard for long.
const PURGE_BATCH: usize = 256;

/// An in-process store. Cloning shares the records.
///
/// ```
/// use oncely::MemoryStore;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryStore::builder()
///     .max_entries(100_000)
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
    max_entries: usize,
}

#[derive(Default)]
struct Shard {
    map: HashMap<StorageKey, Entry>,
    /// Every record of the shard by `(expires_at, key)`: the sweep and eviction order.
    by_expiry: BTreeSet<(SystemTime, StorageKey)>,
}

struct Entry {
    record: Record,
    /// Waiters for this in-progress record, created by the first `subscribe`.
    waiters: Option<Arc<Notify>>,
}

impl Entry {
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
    shards: usize,
    sweep_interval: Option<Duration>,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self { max_entries: usize::MAX, shards: 64, sweep_interval: Some(Duration::from_secs(60)) }
    }
}

impl MemoryStoreBuilder {
    /// The most records the store holds (default: unbounded). Must be at least 1.
    pub fn max_entries(mut self, max: usize) -> Self {
        self.max_entries = max.max(1);
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
    /// removed by eviction or [`Store::purge_expired`].
    pub fn no_sweeper(mut self) -> Self {
        self.sweep_interval = None;
        self
    }

    /// Builds the store and starts its sweeper.
    pub fn build(self) -> MemoryStore {
        let shards = (0..self.shards).map(|_| Mutex::new(Shard::default())).collect();
        let inner = Arc::new(Inner { shards, len: AtomicUsize::new(0), max_entries: self.max_entries });
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
            .field("max_entries", &self.inner.max_entries)
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
    /// An unbounded store with 64 shards and a sweeper every 60 s (when created inside a
    /// Tokio runtime).
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder to set the bound, the shards and the sweeper.
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

    /// Takes one unit of room under the bound, evicting from `shard` (which the caller
    /// holds) when full. False when the full shard had nothing evictable.
    fn reserve(&self, shard: &mut Shard, now: SystemTime) -> bool {
        loop {
            let len = self.len.load(Ordering::Relaxed);
            if len < self.max_entries {
                if self.len.compare_exchange_weak(len, len + 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    return true;
                }
                continue;
            }
            if !shard.evict_one(now) {
                return false;
            }
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Inserts into a shard the caller holds, with room already reserved.
    fn insert(&self, shard: &mut Shard, record: Record) {
        if shard.insert(record) {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Evicts one record from some shard other than `skip`, locking one shard at a time.
    fn make_room_elsewhere(&self, skip: usize, now: SystemTime) -> bool {
        let n = self.shards.len();
        for offset in 1..n {
            let index = (skip + offset) & (n - 1);
            if self.lock(index).evict_one(now) {
                self.len.fetch_sub(1, Ordering::AcqRel);
                return true;
            }
        }
        false
    }

    fn claim(&self, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        let now = SystemTime::now();
        let lease_until = deadline(now, request.lease)?;
        let expires_at = deadline(now, request.retention)?.max(lease_until);
        let index = self.shard_index(&request.storage_key);
        // Each pass is atomic under the shard lock. A second pass happens only when the
        // store was full and room was made in another shard in between.
        for _ in 0..3 {
            let mut shard = self.lock(index);
            if let Some(outcome) = shard.claim_existing(request, now, lease_until, expires_at) {
                return Ok(outcome);
            }
            if self.reserve(&mut shard, now) {
                self.insert(
                    &mut shard,
                    Record {
                        storage_key: request.storage_key,
                        key: request.key.clone(),
                        scope: request.scope.clone(),
                        fingerprint: request.fingerprint,
                        created_at: now,
                        expires_at,
                        state: RecordState::InProgress { claim_id: request.claim_id, lease_until },
                    },
                );
                return Ok(ClaimOutcome::Acquired { takeover: false });
            }
            drop(shard);
            if !self.make_room_elsewhere(index, now) {
                break;
            }
        }
        Err(StoreError::Capacity { capacity: self.max_entries })
    }

    fn purge_expired(&self, now: SystemTime) -> u64 {
        let mut purged = 0;
        for index in 0..self.shards.len() {
            loop {
                let removed = self.lock(index).remove_expired(now, PURGE_BATCH);
                self.len.fetch_sub(removed, Ordering::AcqRel);
                purged += removed as u64;
                if removed < PURGE_BATCH {
                    break;
                }
            }
        }
        purged
    }

    fn first_seen(
        &self,
        storage_key: &StorageKey,
        key: &IdempotencyKey,
        scope: &Scope,
        window: Duration,
    ) -> Result<bool, StoreError> {
        let now = SystemTime::now();
        let expires_at = deadline(now, window)?;
        let index = self.shard_index(storage_key);
        for _ in 0..3 {
            let mut shard = self.lock(index);
            if let Some(entry) = shard.live_mut(storage_key, now) {
                if let RecordState::Completed { hits, .. } = &mut entry.record.state {
                    *hits += 1;
                }
                return Ok(false);
            }
            if self.reserve(&mut shard, now) {
                self.insert(
                    &mut shard,
                    Record {
                        storage_key: *storage_key,
                        key: key.clone(),
                        scope: scope.clone(),
                        fingerprint: None,
                        created_at: now,
                        expires_at,
                        state: RecordState::Completed { payload: Bytes::new(), completed_at: now, hits: 0 },
                    },
                );
                return Ok(true);
            }
            drop(shard);
            if !self.make_room_elsewhere(index, now) {
                break;
            }
        }
        Err(StoreError::Capacity { capacity: self.max_entries })
    }
}

impl Shard {
    /// The unexpired entry at `key`, if any.
    fn live_mut(&mut self, key: &StorageKey, now: SystemTime) -> Option<&mut Entry> {
        self.map.get_mut(key).filter(|entry| !entry.record.is_expired(now))
    }

    /// Answers a claim from the existing record; `None` when a record must be created.
    fn claim_existing(
        &mut self,
        request: &ClaimRequest,
        now: SystemTime,
        lease_until: SystemTime,
        expires_at: SystemTime,
    ) -> Option<ClaimOutcome> {
        let entry = self.map.get_mut(&request.storage_key)?;
        if entry.record.is_expired(now) {
            // Absent to the claim; `insert` replaces it.
            return None;
        }
        if entry.record.fingerprint != request.fingerprint {
            return Some(ClaimOutcome::Mismatch(entry.record.clone()));
        }
        match &mut entry.record.state {
            RecordState::Completed { hits, .. } => {
                *hits += 1;
                Some(ClaimOutcome::Completed(entry.record.clone()))
            }
            RecordState::InProgress { lease_until: held_until, .. } if now < *held_until => {
                Some(ClaimOutcome::InProgress(entry.record.clone()))
            }
            RecordState::InProgress { .. } => {
                entry.record.state = RecordState::InProgress { claim_id: request.claim_id, lease_until };
                entry.wake();
                let old_expiry = std::mem::replace(&mut entry.record.expires_at, expires_at);
                self.reindex(&request.storage_key, old_expiry, expires_at);
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

    /// Inserts `record`, replacing an expired one at its key; true when it replaced one
    /// (the caller then gives back the room it reserved).
    fn insert(&mut self, record: Record) -> bool {
        self.by_expiry.insert((record.expires_at, record.storage_key));
        let key = record.storage_key;
        match self.map.insert(key, Entry { record, waiters: None }) {
            Some(mut old) => {
                self.by_expiry.remove(&(old.record.expires_at, key));
                old.wake();
                true
            }
            None => false,
        }
    }

    /// Removes the record at `key` and wakes its waiters; true when there was one.
    fn remove(&mut self, key: &StorageKey) -> bool {
        match self.map.remove(key) {
            Some(mut entry) => {
                self.by_expiry.remove(&(entry.record.expires_at, *key));
                entry.wake();
                true
            }
            None => false,
        }
    }

    fn reindex(&mut self, key: &StorageKey, old: SystemTime, new: SystemTime) {
        if old != new {
            self.by_expiry.remove(&(old, *key));
            self.by_expiry.insert((new, *key));
        }
    }

    /// Evicts an expired record, else the completed one that expires first.
    fn evict_one(&mut self, now: SystemTime) -> bool {
        let victim = self.by_expiry.iter().find_map(|(expires_at, key)| {
            let expired = *expires_at <= now;
            let completed = self.map.get(key).is_some_and(|entry| entry.record.is_completed());
            (expired || completed).then_some(*key)
        });
        victim.is_some_and(|key| self.remove(&key))
    }

    fn remove_expired(&mut self, now: SystemTime, limit: usize) -> usize {
        let expired: Vec<StorageKey> = self
            .by_expiry
            .iter()
            .take_while(|(expires_at, _)| *expires_at <= now)
            .take(limit)
            .map(|(_, key)| *key)
            .collect();
        expired.iter().filter(|key| self.remove(key)).count()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        self.inner.claim(&request)
    }

    async fn complete(
        &self,
        key: &StorageKey,
        claim_id: ClaimId,
        payload: Bytes,
        retention: Duration,
    ) -> Result<(), StoreError> {
        let now = SystemTime::now();
        let expires_at = deadline(now, retention)?;
        let mut shard = self.inner.shard(key);
        let entry = shard.held_mut(key, claim_id, now)?;
        entry.record.state = RecordState::Completed { payload, completed_at: now, hits: 0 };
        entry.wake();
        let old_expiry = std::mem::replace(&mut entry.record.expires_at, expires_at);
        shard.reindex(key, old_expiry, expires_at);
        Ok(())
    }

    async fn release(&self, key: &StorageKey, claim_id: ClaimId) -> Result<(), StoreError> {
        let now = SystemTime::now();
        let mut shard = self.inner.shard(key);
        shard.held_mut(key, claim_id, now)?;
        shard.remove(key);
        drop(shard);
        self.inner.len.fetch_sub(1, Ordering::AcqRel);
        Ok(())
    }

    async fn touch(&self, key: &StorageKey, claim_id: ClaimId, lease: Duration) -> Result<(), StoreError> {
        let now = SystemTime::now();
        let lease_until = deadline(now, lease)?;
        let mut shard = self.inner.shard(key);
        let entry = shard.held_mut(key, claim_id, now)?;
        entry.record.state = RecordState::InProgress { claim_id, lease_until };
        // A renewed lease never outlives the record.
        let old_expiry = entry.record.expires_at;
        if lease_until > old_expiry {
            entry.record.expires_at = lease_until;
            shard.reindex(key, old_expiry, lease_until);
        }
        Ok(())
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        let now = SystemTime::now();
        Ok(self.inner.shard(key).live_mut(key, now).map(|entry| entry.record.clone()))
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let now = SystemTime::now();
        let mut shard = self.inner.shard(key);
        let live = shard.live_mut(key, now).is_some();
        let removed = shard.remove(key);
        drop(shard);
        if removed {
            self.inner.len.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(live)
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        Ok(self.inner.purge_expired(SystemTime::now()))
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let now = SystemTime::now();
        let mut stats = StoreStats::default();
        for index in 0..self.inner.shards.len() {
            let shard = self.inner.lock(index);
            for entry in shard.map.values().filter(|entry| !entry.record.is_expired(now)) {
                stats.records += 1;
                match entry.record.state {
                    RecordState::InProgress { .. } => stats.in_progress += 1,
                    RecordState::Completed { .. } => stats.completed += 1,
                }
            }
        }
        Ok(stats)
    }

    async fn first_seen(
        &self,
        storage_key: &StorageKey,
        key: &IdempotencyKey,
        scope: &Scope,
        window: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.first_seen(storage_key, key, scope, window)
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
