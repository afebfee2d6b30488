//! The [`Store`] trait: the contract between the engine and where records live.
//!
//! Every store passes the conformance suite in `oncely-testkit`. What it promises:
//!
//! - **Claim is one atomic step that returns the existing record when there is one.** A
//!   store never implements it as get-then-set, and the caller never needs a second read
//!   to learn what blocked its claim.
//! - **Atomic under any number of concurrent callers** (and processes, for shared stores):
//!   among any number of simultaneous claims of one absent key, exactly one is acquired.
//! - **Fencing.** `complete`, `release` and `touch` succeed only for the record's current
//!   claim id and answer [`StoreError::LeaseLost`] otherwise.
//! - **Expiry on every read.** A record past its `expires_at` is absent to every method,
//!   whether or not the store has collected it yet.
//! - **Time from one place** per store: the process clock for in-process stores, the
//!   server's clock for shared ones, so that callers' clock skew cannot shorten a lease.
//! - **Round trips**: a new operation costs two store calls (claim, complete), a replay one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{ClaimId, Fingerprint, IdempotencyKey, Record, Scope, StorageKey};

pub mod abilities;
pub mod memory;
mod memory_url;
pub mod url;
pub mod waiters;

pub use abilities::StoreAbilities;
pub use memory_url::URL_DEFAULT_MAX_ENTRIES;
pub use url::UrlError;

/// A boxed error from a store's client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A future that resolves when a key's in-progress record may have changed: completed,
/// released, deleted or taken over. It may also resolve spuriously; waiters re-check.
pub type Notified = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What a store failed at.
///
/// Match on [`kind`](Self::kind) to decide what to do (retry later, report, refuse);
/// the variants carry what each failure knows, and [`Unavailable`](Self::Unavailable)
/// and [`Timeout`](Self::Timeout) carry the client library's error as their source.
/// Stores choose the variant from structured data (an error's type, variant or code),
/// never from its message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The caller's claim is not the record's current one: its lease lapsed and another
    /// claim took the key over, or the record was released, deleted or expired. The
    /// caller's write was rejected so that it cannot overwrite the new holder.
    #[error("the claim no longer holds the key (lease taken over, released, deleted or expired)")]
    LeaseLost,
    /// A bounded store is full: a new record would take it past one of its bounds, and
    /// it holds no record it may drop to make room. Expired records are dropped first
    /// (they are absent anyway); an unexpired record, completed or in progress, is never
    /// dropped to make room unless the store was told it may evict completed ones.
    /// Nothing was changed; the HTTP layer answers 503 with `Retry-After`.
    ///
    /// Only the creation of a record is refused this way. A claim or `first_seen` that
    /// meets an existing record, and every `complete`, are answered as usual: an
    /// operation that ran keeps its result even when that takes the store past its bound.
    #[error("the store is full: it holds at most {limit} {bound} and has no expired record to drop")]
    Capacity {
        /// The bound a new record would pass.
        bound: CapacityBound,
        /// That bound, in records or in bytes as `bound` says.
        limit: u64,
    },
    /// The store could not be reached, or refused for a passing reason (its connection
    /// was lost, it is shutting down, out of resources, a read-only replica). A call that
    /// failed after its request was sent may have taken effect. A retry later may
    /// succeed; the HTTP layer answers 503.
    #[error("the store is unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The store did not answer in time: the request was sent (or was being sent) and
    /// the caller stopped waiting. Whether the call took effect is unknown. A retry
    /// later may succeed; the HTTP layer answers 503, as for
    /// [`Unavailable`](Self::Unavailable).
    #[error("the store did not answer in time: {0}")]
    Timeout(#[source] BoxError),
    /// The store holds data this version cannot read.
    #[error("the store returned a malformed record: {0}")]
    Corrupt(String),
    /// The store cannot do this at all: a store that cannot list its records asked to
    /// list them, or a server lacking a feature the store needs. No retry mends it.
    #[error("the store does not support this: {0}")]
    Unsupported(String),
    /// The request cannot be carried out as asked (a duration that overflows the clock).
    #[error("invalid store request: {0}")]
    InvalidRequest(String),
}

/// What kind of failure a [`StoreError`] is: a small `Copy` value to match on, in the
/// manner of [`std::io::ErrorKind`]. More kinds may be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// [`StoreError::Unavailable`]: not reached, or refused for a passing reason.
    Unavailable,
    /// [`StoreError::Timeout`]: no answer in time; whether the call took effect is unknown.
    Timeout,
    /// [`StoreError::Corrupt`]: stored data this version cannot read.
    Corrupt,
    /// [`StoreError::LeaseLost`]: the caller's claim no longer holds the key.
    LeaseLost,
    /// [`StoreError::Capacity`]: a bounded store is full.
    Capacity,
    /// [`StoreError::Unsupported`]: the store cannot do this.
    Unsupported,
    /// [`StoreError::InvalidRequest`]: the request cannot be carried out as asked.
    InvalidRequest,
}

impl std::fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::Corrupt => "corrupt",
            Self::LeaseLost => "lease lost",
            Self::Capacity => "capacity",
            Self::Unsupported => "unsupported",
            Self::InvalidRequest => "invalid request",
        })
    }
}

/// Which bound of a full store refused a new record; see [`StoreError::Capacity`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CapacityBound {
    /// The most records the store holds.
    Records,
    /// The most bytes the store holds, as the store counts them (its docs say how).
    Bytes,
}

impl std::fmt::Display for CapacityBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Records => "records",
            Self::Bytes => "bytes",
        })
    }
}

impl StoreError {
    /// Wraps a client library's error as [`StoreError::Unavailable`].
    pub fn unavailable(error: impl Into<BoxError>) -> Self {
        Self::Unavailable(error.into())
    }

    /// Wraps a client library's error as [`StoreError::Timeout`].
    pub fn timeout(error: impl Into<BoxError>) -> Self {
        Self::Timeout(error.into())
    }

    /// What kind of failure this is.
    ///
    /// ```
    /// use oncely::StoreError;
    /// use oncely::store::StoreErrorKind;
    ///
    /// let error = StoreError::timeout("no answer within 1s");
    /// assert_eq!(error.kind(), StoreErrorKind::Timeout);
    /// assert_eq!(StoreError::LeaseLost.kind(), StoreErrorKind::LeaseLost);
    /// ```
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            Self::LeaseLost => StoreErrorKind::LeaseLost,
            Self::Capacity { .. } => StoreErrorKind::Capacity,
            Self::Unavailable(_) => StoreErrorKind::Unavailable,
            Self::Timeout(_) => StoreErrorKind::Timeout,
            Self::Corrupt(_) => StoreErrorKind::Corrupt,
            Self::Unsupported(_) => StoreErrorKind::Unsupported,
            Self::InvalidRequest(_) => StoreErrorKind::InvalidRequest,
        }
    }
}

/// A request to claim a key.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    /// The key the record is indexed by: `StorageKey::derive(&scope, &key)`.
    pub storage_key: StorageKey,
    /// The raw key, kept in the record for inspection.
    pub key: IdempotencyKey,
    /// The owning scope, kept in the record for inspection.
    pub scope: Scope,
    /// The fingerprint of the request; a record with another one is a mismatch.
    pub fingerprint: Option<Fingerprint>,
    /// The claim id this claim will hold the key under (callers use [`ClaimId::random`]).
    pub claim_id: ClaimId,
    /// How long the claim holds the key without a renewal.
    pub lease: Duration,
    /// How long the record lives: `expires_at` is set to now + retention at claim (and
    /// again at completion).
    pub retention: Duration,
}

/// What a claim found, decided in the same atomic step as the claim itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The key was absent (or expired), or held by a lapsed lease with the same
    /// fingerprint: the request's claim id now holds it and the caller runs the operation.
    Acquired {
        /// True when a lapsed claim was taken over rather than a new record created.
        takeover: bool,
    },
    /// The operation already completed with the same fingerprint. The store counted this
    /// as a hit in the same step; the record shows the new count.
    Completed(Record),
    /// A live claim with the same fingerprint holds the key.
    InProgress(Record),
    /// The record was created by a request with a different fingerprint (completed, in
    /// progress or lapsed alike). Nothing was changed and no hit was counted.
    Mismatch(Record),
}

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

/// Where records live. See the [module docs](self) for the contract every store keeps.
///
/// Implemented with [`async_trait`] so that `Arc<dyn Store>` works: the gateway picks its
/// store from a URL at start.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Claims a key in one atomic step.
    ///
    /// - absent or expired → a new in-progress record held by `request.claim_id`:
    ///   [`ClaimOutcome::Acquired`] `{ takeover: false }`;
    /// - in progress with another fingerprint, or completed with another fingerprint →
    ///   [`ClaimOutcome::Mismatch`], nothing changed;
    /// - in progress, lease lapsed → taken over by `request.claim_id` with a fresh lease:
    ///   [`ClaimOutcome::Acquired`] `{ takeover: true }`;
    /// - in progress, lease live → [`ClaimOutcome::InProgress`];
    /// - completed → hit count incremented, [`ClaimOutcome::Completed`].
    async fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome, StoreError>;

    /// Stores the result of the operation held by `claim_id`; the record lives for
    /// `retention` from now. [`StoreError::LeaseLost`] when `claim_id` no longer holds it.
    async fn complete(
        &self,
        key: &StorageKey,
        claim_id: ClaimId,
        payload: Bytes,
        retention: Duration,
    ) -> Result<(), StoreError>;

    /// Removes the in-progress record held by `claim_id` so the operation may run again.
    /// [`StoreError::LeaseLost`] when `claim_id` no longer holds it.
    async fn release(&self, key: &StorageKey, claim_id: ClaimId) -> Result<(), StoreError>;

    /// Renews the lease of `claim_id` to now + `lease`.
    /// [`StoreError::LeaseLost`] when `claim_id` no longer holds it.
    async fn touch(&self, key: &StorageKey, claim_id: ClaimId, lease: Duration) -> Result<(), StoreError>;

    /// The record at `key`, unless absent or expired. Counts no hit.
    async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError>;

    /// Removes the record at `key` whatever its state; true when there was one. A holder
    /// of a deleted in-progress record gets [`StoreError::LeaseLost`] on its next call.
    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError>;

    /// Removes expired records; returns how many. Stores that sweep by themselves need
    /// not be called, but must accept the call.
    async fn purge_expired(&self) -> Result<u64, StoreError>;

    /// Counts of unexpired records.
    async fn stats(&self) -> Result<StoreStats, StoreError>;

    /// Whether the store answers, in one cheap call: for readiness probes. The default
    /// asks for [`stats`](Self::stats); stores whose `stats` reads every record (Redis
    /// scans its key space) answer with something cheaper.
    async fn ping(&self) -> Result<(), StoreError> {
        self.stats().await.map(|_| ())
    }

    /// Message dedup in one atomic step: true when `key` was not seen in `scope` within
    /// the last `window` (and marks it seen for `window` from now), false for a repeat
    /// (whose hit count goes up). A marker is a completed record with an empty payload.
    async fn first_seen(
        &self,
        storage_key: &StorageKey,
        key: &IdempotencyKey,
        scope: &Scope,
        window: Duration,
    ) -> Result<bool, StoreError>;

    /// Up to `limit` unexpired records in storage-key order, starting after `after`: for
    /// admin tools, not for the request path (stores may scan to answer it). Counts no
    /// hit. The default answers [`StoreError::Unsupported`] for stores that cannot list.
    async fn list(&self, after: Option<StorageKey>, limit: usize) -> Result<Vec<Record>, StoreError> {
        let _ = (after, limit);
        Err(StoreError::Unsupported("this store cannot list its records".into()))
    }

    /// A future that resolves when the in-progress record at `key` may have changed.
    ///
    /// Contract: any change made after this method returns resolves the future. It
    /// resolves at once when the record is not in progress. The default never resolves,
    /// for stores with no notification mechanism; the engine then falls back to polling.
    fn subscribe(&self, key: &StorageKey) -> Notified {
        let _ = key;
        Box::pin(std::future::pending())
    }
}

#[async_trait]
impl<S: Store + ?Sized> Store for Arc<S> {
    async fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        (**self).claim(request).await
    }

    async fn complete(
        &self,
        key: &StorageKey,
        claim_id: ClaimId,
        payload: Bytes,
        retention: Duration,
    ) -> Result<(), StoreError> {
        (**self).complete(key, claim_id, payload, retention).await
    }

    async fn release(&self, key: &StorageKey, claim_id: ClaimId) -> Result<(), StoreError> {
        (**self).release(key, claim_id).await
    }

    async fn touch(&self, key: &StorageKey, claim_id: ClaimId, lease: Duration) -> Result<(), StoreError> {
        (**self).touch(key, claim_id, lease).await
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        (**self).get(key).await
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        (**self).delete(key).await
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        (**self).purge_expired().await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        (**self).stats().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        (**self).ping().await
    }

    async fn first_seen(
        &self,
        storage_key: &StorageKey,
        key: &IdempotencyKey,
        scope: &Scope,
        window: Duration,
    ) -> Result<bool, StoreError> {
        (**self).first_seen(storage_key, key, scope, window).await
    }

    async fn list(&self, after: Option<StorageKey>, limit: usize) -> Result<Vec<Record>, StoreError> {
        (**self).list(after, limit).await
    }

    fn subscribe(&self, key: &StorageKey) -> Notified {
        (**self).subscribe(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_kind_and_the_client_error_as_source() {
        use std::error::Error as _;
        let io = || std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer");
        let cases = [
            (StoreError::LeaseLost, StoreErrorKind::LeaseLost),
            (StoreError::Capacity { bound: CapacityBound::Records, limit: 1 }, StoreErrorKind::Capacity),
            (StoreError::unavailable(io()), StoreErrorKind::Unavailable),
            (StoreError::timeout(io()), StoreErrorKind::Timeout),
            (StoreError::Corrupt("x".into()), StoreErrorKind::Corrupt),
            (StoreError::Unsupported("x".into()), StoreErrorKind::Unsupported),
            (StoreError::InvalidRequest("x".into()), StoreErrorKind::InvalidRequest),
        ];
        for (error, kind) in cases {
            assert_eq!(error.kind(), kind, "{error}");
            let has_source = matches!(kind, StoreErrorKind::Unavailable | StoreErrorKind::Timeout);
            assert_eq!(error.source().is_some(), has_source, "{error}");
        }
        assert_eq!(StoreErrorKind::LeaseLost.to_string(), "lease lost");
    }

    #[tokio::test]
    async fn a_store_that_cannot_list_says_unsupported() {
        // Only `list` is called; the rest answer as a store that does nothing would.
        fn unused() -> StoreError {
            StoreError::Unsupported("not used by this test".into())
        }
        struct Unlisted;
        #[async_trait]
        impl Store for Unlisted {
            async fn claim(&self, _: ClaimRequest) -> Result<ClaimOutcome, StoreError> {
                Err(unused())
            }
            async fn complete(&self, _: &StorageKey, _: ClaimId, _: Bytes, _: Duration) -> Result<(), StoreError> {
                Err(unused())
            }
            async fn release(&self, _: &StorageKey, _: ClaimId) -> Result<(), StoreError> {
                Err(unused())
            }
            async fn touch(&self, _: &StorageKey, _: ClaimId, _: Duration) -> Result<(), StoreError> {
                Err(unused())
            }
            async fn get(&self, _: &StorageKey) -> Result<Option<Record>, StoreError> {
                Err(unused())
            }
            async fn delete(&self, _: &StorageKey) -> Result<bool, StoreError> {
                Err(unused())
            }
            async fn purge_expired(&self) -> Result<u64, StoreError> {
                Err(unused())
            }
            async fn stats(&self) -> Result<StoreStats, StoreError> {
                Err(unused())
            }
            async fn first_seen(
                &self,
                _: &StorageKey,
                _: &IdempotencyKey,
                _: &Scope,
                _: Duration,
            ) -> Result<bool, StoreError> {
                Err(unused())
            }
        }
        let listed = Unlisted.list(None, 10).await;
        assert_eq!(listed.map_err(|e| e.kind()).err(), Some(StoreErrorKind::Unsupported));
    }
}
