//! What the engine asks a store for, and what a claim answers: the values of the request
//! path, kept small and borrowed so that a replay copies no record.

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::{ClaimId, Fingerprint, IdempotencyKey, Scope, StorageKey};

/// A request to claim a key, borrowed from the caller.
///
/// Built only by [`ClaimRequest::new`], which derives the storage key from the scope and
/// the key: a store can rely on `storage_key() == StorageKey::derive(scope(), key())`.
///
/// ```
/// use oncely::store::ClaimRequest;
/// use oncely::{IdempotencyKey, Scope, StorageKey};
/// use std::time::Duration;
///
/// let scope = Scope::new("tenant-9");
/// let key = IdempotencyKey::new("order-17").expect("a valid key");
/// let request = ClaimRequest::new(&scope, &key, None, Duration::from_secs(30), Duration::from_secs(86_400));
/// assert_eq!(*request.storage_key(), StorageKey::derive(&scope, &key));
/// assert_eq!(request.claim().claim_id, request.claim_id());
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ClaimRequest<'a> {
    storage_key: StorageKey,
    key: &'a IdempotencyKey,
    scope: &'a Scope,
    fingerprint: Option<Fingerprint>,
    claim_id: ClaimId,
    lease: Duration,
    retention: Duration,
}

impl<'a> ClaimRequest<'a> {
    /// A claim of `key` in `scope` under a fresh random claim id, holding the key for
    /// `lease` without a renewal; the record lives for `retention` from the claim (and
    /// again from its completion).
    pub fn new(
        scope: &'a Scope,
        key: &'a IdempotencyKey,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
        retention: Duration,
    ) -> Self {
        Self {
            storage_key: StorageKey::derive(scope, key),
            key,
            scope,
            fingerprint,
            claim_id: ClaimId::random(),
            lease,
            retention,
        }
    }

    /// The same request under `claim_id`: for a wrapper that rebuilds a request on
    /// another task (from owned copies of its key and scope) and must keep the caller's
    /// claim id, which the caller's later `complete`, `release` and `touch` name.
    pub fn with_claim_id(mut self, claim_id: ClaimId) -> Self {
        self.claim_id = claim_id;
        self
    }

    /// The key the record is indexed by: `StorageKey::derive(scope, key)`.
    pub fn storage_key(&self) -> &StorageKey {
        &self.storage_key
    }

    /// The raw key, kept in the record for inspection.
    pub fn key(&self) -> &'a IdempotencyKey {
        self.key
    }

    /// The owning scope, kept in the record for inspection.
    pub fn scope(&self) -> &'a Scope {
        self.scope
    }

    /// The fingerprint of the request; a record with another one is a mismatch.
    pub fn fingerprint(&self) -> Option<&Fingerprint> {
        self.fingerprint.as_ref()
    }

    /// The claim id this claim holds the key under.
    pub fn claim_id(&self) -> ClaimId {
        self.claim_id
    }

    /// How long the claim holds the key without a renewal.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// How long the record lives: `expires_at` is now + retention at the claim.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// The holder this request becomes once acquired.
    pub fn claim(&self) -> Claim {
        Claim { storage_key: self.storage_key, claim_id: self.claim_id }
    }
}

/// A message-dedup request ([`Store::first_seen`](crate::Store::first_seen)), borrowed
/// from the caller.
///
/// Built only by [`FirstSeen::new`], which derives its storage key in a key space of its
/// own, so a message id and an idempotency key with the same text never meet.
///
/// ```
/// use oncely::store::FirstSeen;
/// use oncely::{IdempotencyKey, Scope, StorageKey};
/// use std::time::Duration;
///
/// let scope = Scope::new("webhooks");
/// let id = IdempotencyKey::new("evt_81").expect("a valid id");
/// let seen = FirstSeen::new(&scope, &id, Duration::from_secs(3600));
/// assert_ne!(*seen.storage_key(), StorageKey::derive(&scope, &id));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct FirstSeen<'a> {
    storage_key: StorageKey,
    key: &'a IdempotencyKey,
    scope: &'a Scope,
    window: Duration,
}

impl<'a> FirstSeen<'a> {
    /// "Was `id` seen in `scope` within the last `window`?"
    pub fn new(scope: &'a Scope, id: &'a IdempotencyKey, window: Duration) -> Self {
        let storage_key = StorageKey::derive_raw(&format!("oncely.first_seen\u{0}{scope}"), id.as_str());
        Self { storage_key, key: id, scope, window }
    }

    /// The storage key of the marker.
    pub fn storage_key(&self) -> &StorageKey {
        &self.storage_key
    }

    /// The message id, kept in the marker for inspection.
    pub fn key(&self) -> &'a IdempotencyKey {
        self.key
    }

    /// The owning scope, kept in the marker for inspection.
    pub fn scope(&self) -> &'a Scope {
        self.scope
    }

    /// How long a marker lives.
    pub fn window(&self) -> Duration {
        self.window
    }
}

/// The holder of a key: the record's storage key and the claim id it holds it under.
/// `complete`, `release` and `touch` act for a `Claim`, and succeed only while it is the
/// record's current one (fencing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Claim {
    /// The record held.
    pub storage_key: StorageKey,
    /// The id the record is held under.
    pub claim_id: ClaimId,
}

/// A completed result found by a claim: what a replay needs, and no more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replay {
    /// The stored result, exactly as the holder handed it over.
    pub payload: Bytes,
    /// When the holder completed.
    pub completed_at: SystemTime,
    /// When the record expires, by the store's clock: the end of the retention its holder
    /// completed it with, which need not be the claimer's own. A copy of the replay (the
    /// [`ReplayCache`](crate::store::ReplayCache)) answers nothing past it. For a result
    /// the engine keeps while its store is unreachable, this process's estimate of it.
    pub expires_at: SystemTime,
    /// Replays counted so far. From a store: the count it holds (hits are flushed to it
    /// in batches, so recent replays may be missing). From the engine: that count plus
    /// the replays this process counted and has not flushed yet, this one included.
    pub hits: u64,
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
    /// The operation already completed with the same fingerprint. Nothing was written:
    /// the engine counts the hit and flushes it later with
    /// [`Store::record_hits`](crate::Store::record_hits).
    Replay(Replay),
    /// A live claim with the same fingerprint holds the key.
    InProgress {
        /// When the holder's lease lapses, by the store's clock.
        lease_until: SystemTime,
    },
    /// The record was created by a request with a different fingerprint (completed, in
    /// progress or lapsed alike). Nothing was changed.
    Mismatch,
}
