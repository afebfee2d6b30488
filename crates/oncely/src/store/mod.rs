//! The store contract: [`Store`] (the request path) and [`StoreAdmin`] (administration),
//! the values they take and answer, and [`DynStore`] for a store picked at run time.
//!
//! Every store passes the conformance suite in `oncely-testkit`. What it promises:
//!
//! - **Claim is one atomic step that returns what blocked it.** A store never implements
//!   it as get-then-set, and the caller never needs a second read to learn what blocked
//!   its claim: the [`ClaimOutcome`] carries a replay's payload or a holder's lease end.
//! - **Atomic under any number of concurrent callers** (and processes, for shared stores):
//!   among any number of simultaneous claims of one absent key, exactly one is acquired.
//! - **A replay is a read.** A claim that finds a completed record writes nothing: no hit
//!   count, no lock held past the read, nothing replicated or logged. The engine counts
//!   hits in the process and flushes them in batches with [`Store::record_hits`].
//! - **Fencing.** `complete`, `release` and `touch` act for a [`Claim`] and succeed only
//!   while it is the record's current one; otherwise they answer
//!   [`StoreError::LeaseLost`].
//! - **Expiry on every read.** A record past its `expires_at` is absent to every method,
//!   whether or not the store has collected it yet.
//! - **Time from one place** per store: the process clock for in-process stores, the
//!   server's clock for shared ones, so that callers' clock skew cannot shorten a lease.
//! - **Round trips**: a new operation costs two store calls (claim, complete), a replay one.
//! - **Bounded stores refuse, never forget.** A full store answers a new claim with
//!   [`StoreError::Capacity`]; it never drops an unexpired completed record to make room
//!   unless told it may.
//!
//! The request is borrowed ([`ClaimRequest`], [`FirstSeen`]) and built by constructors
//! that derive the storage key, so no client input reaches a store's key space raw and a
//! replay copies no key, scope or record.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::{Record, StorageKey};

pub mod abilities;
#[cfg(feature = "cache")]
pub mod cache;
mod dynamic;
pub mod erasures;
mod error;
pub mod memory;
mod memory_url;
mod request;
pub mod url;
pub mod waiters;

pub use abilities::StoreAbilities;
#[cfg(feature = "cache")]
pub use cache::{ReplayCache, ReplayCacheBuilder};
pub use dynamic::DynStore;
pub use erasures::Erasures;
pub use error::{BoxError, CapacityBound, StoreError, StoreErrorKind};
pub use memory_url::URL_DEFAULT_MAX_ENTRIES;
pub use request::{Claim, ClaimOutcome, ClaimRequest, FirstSeen, Replay};
pub use url::UrlError;

/// A future that resolves when a key's in-progress record may have changed: completed,
/// released, deleted or taken over. It may also resolve spuriously; waiters re-check.
pub type Notified = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Counts of what a store holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Records not yet expired, in either state.
    pub records: u64,
    /// Records held by a claim.
    pub in_progress: u64,
    /// Records holding a result.
    pub completed: u64,
}

/// The request path: where the engine claims keys and stores results. See the
/// [module docs](self) for the contract every store keeps, and [`StoreAdmin`] for the
/// calls of admin tools.
///
/// Methods return `impl Future + Send` (a store writes them as `async fn`), so generic
/// code such as `Oncely<S>` calls a store with no box per call. Code that picks its store
/// at run time erases the type once with [`DynStore`].
///
/// # Implementing a store
///
/// A store keeps records by [`StorageKey`] and makes each method one atomic step. The
/// smallest complete one, a map behind a mutex (what [`MemoryStore`](crate::MemoryStore)
/// does, without its bounds, sweeping and notifications):
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use std::time::{Duration, SystemTime};
///
/// use bytes::Bytes;
/// use oncely::store::{Claim, ClaimOutcome, ClaimRequest, FirstSeen, Replay, StoreAdmin, StoreStats};
/// use oncely::{IdempotencyKey, Oncely, Record, RecordState, StorageKey, Store, StoreError};
///
/// #[derive(Default)]
/// struct MapStore(Mutex<HashMap<StorageKey, Record>>);
///
/// impl MapStore {
///     /// The unexpired record at `key`, under the lock: expiry is checked on every read.
///     fn live<'m>(map: &'m mut HashMap<StorageKey, Record>, key: &StorageKey, now: SystemTime) -> Option<&'m mut Record> {
///         map.get_mut(key).filter(|record| !record.is_expired(now))
///     }
///
///     /// Runs `change` on the record `claim` holds, or answers `LeaseLost` (fencing).
///     fn held(&self, claim: Claim, change: impl FnOnce(&mut HashMap<StorageKey, Record>, SystemTime)) -> Result<(), StoreError> {
///         let mut map = self.0.lock().unwrap();
///         let now = SystemTime::now();
///         match Self::live(&mut map, &claim.storage_key, now).map(|r| &r.state) {
///             Some(RecordState::InProgress { claim_id, .. }) if *claim_id == claim.claim_id => {
///                 change(&mut map, now);
///                 Ok(())
///             }
///             _ => Err(StoreError::LeaseLost),
///         }
///     }
/// }
///
/// impl Store for MapStore {
///     async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
///         let mut map = self.0.lock().unwrap();
///         let now = SystemTime::now();
///         let mut takeover = false;
///         if let Some(record) = Self::live(&mut map, request.storage_key(), now) {
///             if record.fingerprint.as_ref() != request.fingerprint() {
///                 return Ok(ClaimOutcome::Mismatch);
///             }
///             match &record.state {
///                 RecordState::Completed { payload, completed_at, hits } => {
///                     let replay = Replay {
///                         payload: payload.clone(),
///                         completed_at: *completed_at,
///                         hits: *hits,
///                         expires_at: record.expires_at,
///                     };
///                     return Ok(ClaimOutcome::Replay(replay));
///                 }
///                 RecordState::InProgress { lease_until, .. } if now < *lease_until => {
///                     return Ok(ClaimOutcome::InProgress { lease_until: *lease_until });
///                 }
///                 RecordState::InProgress { .. } => takeover = true,
///             }
///         }
///         let record = Record {
///             storage_key: *request.storage_key(),
///             key: request.key().clone(),
///             scope: request.scope().clone(),
///             fingerprint: request.fingerprint().copied(),
///             created_at: now,
///             expires_at: now + request.retention(),
///             state: RecordState::InProgress { claim_id: request.claim_id(), lease_until: now + request.lease() },
///         };
///         map.insert(*request.storage_key(), record);
///         Ok(ClaimOutcome::Acquired { takeover })
///     }
///
///     async fn complete(&self, claim: Claim, payload: Bytes, retention: Duration) -> Result<(), StoreError> {
///         self.held(claim, |map, now| {
///             if let Some(record) = map.get_mut(&claim.storage_key) {
///                 record.expires_at = now + retention;
///                 record.state = RecordState::Completed { payload, completed_at: now, hits: 0 };
///             }
///         })
///     }
///
///     async fn release(&self, claim: Claim) -> Result<(), StoreError> {
///         self.held(claim, |map, _| drop(map.remove(&claim.storage_key)))
///     }
///
///     async fn touch(&self, claim: Claim, lease: Duration) -> Result<(), StoreError> {
///         self.held(claim, |map, now| {
///             if let Some(Record { state: RecordState::InProgress { lease_until, .. }, .. }) = map.get_mut(&claim.storage_key) {
///                 *lease_until = now + lease;
///             }
///         })
///     }
///
///     async fn first_seen(&self, request: &FirstSeen<'_>) -> Result<bool, StoreError> {
///         let mut map = self.0.lock().unwrap();
///         let now = SystemTime::now();
///         if Self::live(&mut map, request.storage_key(), now).is_some() {
///             return Ok(false);
///         }
///         let marker = Record {
///             storage_key: *request.storage_key(),
///             key: request.key().clone(),
///             scope: request.scope().clone(),
///             fingerprint: None,
///             created_at: now,
///             expires_at: now + request.window(),
///             state: RecordState::Completed { payload: Bytes::new(), completed_at: now, hits: 0 },
///         };
///         map.insert(*request.storage_key(), marker);
///         Ok(true)
///     }
///
///     async fn record_hits(&self, hits: &[(StorageKey, u64)]) -> Result<(), StoreError> {
///         let mut map = self.0.lock().unwrap();
///         let now = SystemTime::now();
///         for (key, n) in hits {
///             if let Some(Record { state: RecordState::Completed { hits, .. }, .. }) = Self::live(&mut map, key, now) {
///                 *hits += n;
///             }
///         }
///         Ok(())
///     }
/// }
///
/// impl StoreAdmin for MapStore {
///     async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
///         Ok(Self::live(&mut self.0.lock().unwrap(), key, SystemTime::now()).map(|r| r.clone()))
///     }
///
///     async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
///         Ok(self.0.lock().unwrap().remove(key).is_some_and(|r| !r.is_expired(SystemTime::now())))
///     }
///
///     async fn purge_expired(&self) -> Result<u64, StoreError> {
///         let mut map = self.0.lock().unwrap();
///         let (before, now) = (map.len(), SystemTime::now());
///         map.retain(|_, record| !record.is_expired(now));
///         Ok((before - map.len()) as u64)
///     }
///
///     async fn stats(&self) -> Result<StoreStats, StoreError> {
///         let map = self.0.lock().unwrap();
///         let now = SystemTime::now();
///         let live = map.values().filter(|r| !r.is_expired(now));
///         let completed = live.clone().filter(|r| r.is_completed()).count() as u64;
///         let records = live.count() as u64;
///         Ok(StoreStats { records, in_progress: records - completed, completed })
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let oncely = Oncely::new(MapStore::default());
/// let key = IdempotencyKey::new("order-17")?;
/// let first = oncely.run(&key, None, || async { Ok::<_, oncely::Failure<()>>(17) }).await?;
/// let retry = oncely.run(&key, None, || async { Ok::<_, oncely::Failure<()>>(18) }).await?;
/// assert_eq!((first.value, retry.value, retry.replayed), (17, 17, true));
/// # Ok(()) }
/// ```
///
/// `oncely-testkit` runs the conformance suite against a store: call its cases from
/// the store crate's tests, as every store in this workspace does.
pub trait Store: Send + Sync + 'static {
    /// Claims a key in one atomic step.
    ///
    /// - absent or expired → a new in-progress record held by `request.claim_id()`:
    ///   [`ClaimOutcome::Acquired`] `{ takeover: false }`;
    /// - in progress or completed with another fingerprint → [`ClaimOutcome::Mismatch`],
    ///   nothing changed;
    /// - in progress, lease lapsed → taken over by `request.claim_id()` with a fresh
    ///   lease: [`ClaimOutcome::Acquired`] `{ takeover: true }`;
    /// - in progress, lease live → [`ClaimOutcome::InProgress`];
    /// - completed → [`ClaimOutcome::Replay`], **nothing written**: a replay is a read.
    fn claim(&self, request: &ClaimRequest<'_>) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send;

    /// Stores the result of the operation `claim` holds; the record lives for
    /// `retention` from now. [`StoreError::LeaseLost`] when `claim` no longer holds it.
    fn complete(
        &self,
        claim: Claim,
        payload: Bytes,
        retention: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Removes the in-progress record `claim` holds so the operation may run again.
    /// [`StoreError::LeaseLost`] when `claim` no longer holds it.
    fn release(&self, claim: Claim) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Renews the lease of `claim` to now + `lease`.
    /// [`StoreError::LeaseLost`] when `claim` no longer holds it.
    fn touch(&self, claim: Claim, lease: Duration) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Message dedup in one atomic step: true when the id was not seen within the last
    /// window (and marks it seen for the window from now), false for a repeat. A marker
    /// is a completed record with an empty payload.
    fn first_seen(&self, request: &FirstSeen<'_>) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Adds replay counts to completed records: the engine's batched flush of the hits it
    /// counted in the process (a replay itself writes nothing). A key that is absent,
    /// expired or in progress is skipped: no record a read returns gains those counts (a
    /// store may add them to an expired record that no read returns again). One call
    /// for the whole batch where the store allows.
    fn record_hits(&self, hits: &[(StorageKey, u64)]) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A future that resolves when the in-progress record at `key` may have changed.
    ///
    /// Contract: any change made after this method returns resolves the future. It
    /// resolves at once when the record is not in progress. It may also resolve when
    /// nothing changed (a store that lost its notification channel wakes every waiter):
    /// callers re-read the record after every wake. The default never resolves,
    /// for stores with no notification mechanism; the engine then falls back to polling.
    fn subscribe(&self, key: &StorageKey) -> Notified {
        let _ = key;
        Box::pin(std::future::pending())
    }
}

/// Administration: reading, listing, deleting and counting records, for admin tools,
/// readiness probes and sweepers. Never on the request path of a replay.
pub trait StoreAdmin: Send + Sync + 'static {
    /// The record at `key`, unless absent or expired.
    fn get(&self, key: &StorageKey) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;

    /// Removes the record at `key` whatever its state; true when there was one. A holder
    /// of a deleted in-progress record gets [`StoreError::LeaseLost`] on its next call.
    fn delete(&self, key: &StorageKey) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Removes expired records; returns how many. Stores that sweep by themselves need
    /// not be called, but must accept the call.
    fn purge_expired(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Counts of unexpired records.
    fn stats(&self) -> impl Future<Output = Result<StoreStats, StoreError>> + Send;

    /// Whether the store answers, in one cheap call: for readiness probes. The default
    /// asks for [`stats`](Self::stats); stores whose `stats` reads every record (Redis
    /// scans its key space) answer with something cheaper.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async { self.stats().await.map(|_| ()) }
    }

    /// Up to `limit` unexpired records in storage-key order, starting after `after`: for
    /// admin tools (stores may scan to answer it). The default answers
    /// [`StoreError::Unsupported`] for stores that cannot list.
    fn list(
        &self,
        after: Option<StorageKey>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Record>, StoreError>> + Send {
        let _ = (after, limit);
        async { Err(StoreError::Unsupported("this store cannot list its records".into())) }
    }
}

impl<S: Store> Store for Arc<S> {
    fn claim(&self, request: &ClaimRequest<'_>) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send {
        (**self).claim(request)
    }

    fn complete(
        &self,
        claim: Claim,
        payload: Bytes,
        retention: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).complete(claim, payload, retention)
    }

    fn release(&self, claim: Claim) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).release(claim)
    }

    fn touch(&self, claim: Claim, lease: Duration) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).touch(claim, lease)
    }

    fn first_seen(&self, request: &FirstSeen<'_>) -> impl Future<Output = Result<bool, StoreError>> + Send {
        (**self).first_seen(request)
    }

    fn record_hits(&self, hits: &[(StorageKey, u64)]) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).record_hits(hits)
    }

    fn subscribe(&self, key: &StorageKey) -> Notified {
        (**self).subscribe(key)
    }
}

impl<S: StoreAdmin> StoreAdmin for Arc<S> {
    fn get(&self, key: &StorageKey) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send {
        (**self).get(key)
    }

    fn delete(&self, key: &StorageKey) -> impl Future<Output = Result<bool, StoreError>> + Send {
        (**self).delete(key)
    }

    fn purge_expired(&self) -> impl Future<Output = Result<u64, StoreError>> + Send {
        (**self).purge_expired()
    }

    fn stats(&self) -> impl Future<Output = Result<StoreStats, StoreError>> + Send {
        (**self).stats()
    }

    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).ping()
    }

    fn list(
        &self,
        after: Option<StorageKey>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Record>, StoreError>> + Send {
        (**self).list(after, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_store_that_cannot_list_says_unsupported() {
        struct Unlisted;
        impl StoreAdmin for Unlisted {
            async fn get(&self, _: &StorageKey) -> Result<Option<Record>, StoreError> {
                Ok(None)
            }
            async fn delete(&self, _: &StorageKey) -> Result<bool, StoreError> {
                Ok(false)
            }
            async fn purge_expired(&self) -> Result<u64, StoreError> {
                Ok(0)
            }
            async fn stats(&self) -> Result<StoreStats, StoreError> {
                Ok(StoreStats::default())
            }
        }
        let listed = Unlisted.list(None, 10).await;
        assert_eq!(listed.map_err(|e| e.kind()).err(), Some(StoreErrorKind::Unsupported));
        assert!(Unlisted.ping().await.is_ok(), "ping defaults to stats");
    }
}
