//! Records: what a store keeps per key, and the claim ids that fence their holders.
//!
//! ```text
//! absent --claim--> InProgress{claim_id, lease_until, fingerprint}
//! InProgress --complete(claim_id)--> Completed{payload, fingerprint, completed_at, hits}
//! InProgress --release(claim_id)--> absent          (the operation may run again)
//! InProgress --lease_until passes--> claimable: the next claim takes it over (new claim_id)
//! Completed --expires_at passes--> absent
//! ```

use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::{Fingerprint, IdempotencyKey, Scope, StorageKey};

/// The id of one claim on a key: 128 random bits, fresh for every claim and takeover.
///
/// `complete`, `release` and `touch` name the claim they act for; a store accepts them only
/// while that claim is the record's current one. A holder whose lease lapsed and was taken
/// over therefore cannot overwrite the new holder's work: it is fenced off.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClaimId(u128);

impl ClaimId {
    /// A fresh random claim id.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// Wraps a claim id read back from a store.
    pub const fn from_u128(id: u128) -> Self {
        Self(id)
    }

    /// The id as a number, for stores to persist.
    pub const fn as_u128(&self) -> u128 {
        self.0
    }

    /// The id as 16 big-endian bytes, for stores to persist.
    pub const fn to_bytes(&self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// Reads an id written by [`ClaimId::to_bytes`].
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(u128::from_be_bytes(bytes))
    }
}

impl fmt::Debug for ClaimId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClaimId({:032x})", self.0)
    }
}

impl fmt::Display for ClaimId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Where a record is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordState {
    /// An operation holds the key. Nobody else may run it until the holder completes or
    /// releases it, or until `lease_until` passes without a renewal.
    InProgress {
        /// The current holder.
        claim_id: ClaimId,
        /// When the holder's lease lapses and the key becomes claimable again.
        lease_until: SystemTime,
    },
    /// The operation finished and its result is kept for replay until the record expires.
    Completed {
        /// The stored result, exactly as the holder handed it over.
        payload: Bytes,
        /// When the holder completed.
        completed_at: SystemTime,
        /// How many times the result was replayed (claims that found it completed).
        hits: u64,
    },
}

/// One stored record, as a store hands it back.
///
/// Stores index records by [`StorageKey`]; the raw key and scope are kept only so that
/// admin tools can show what a record is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The hashed key the store indexes by.
    pub storage_key: StorageKey,
    /// The key as the client sent it (for message-dedup markers, the message id).
    pub key: IdempotencyKey,
    /// The scope that owns the key.
    pub scope: Scope,
    /// The fingerprint of the request that created the record, if it had one.
    pub fingerprint: Option<Fingerprint>,
    /// When the first claim created the record.
    pub created_at: SystemTime,
    /// When the record stops existing: set from the retention at claim and again at
    /// completion. Every read treats a record past this time as absent; a store's own
    /// TTL mechanism only collects the garbage.
    pub expires_at: SystemTime,
    /// In progress or completed.
    pub state: RecordState,
}

impl Record {
    /// Whether the record is past its `expires_at` at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.expires_at
    }

    /// Whether an in-progress record's lease has lapsed at `now`, so a claim may take it
    /// over. Always false for completed records.
    pub fn lease_lapsed(&self, now: SystemTime) -> bool {
        matches!(self.state, RecordState::InProgress { lease_until, .. } if now >= lease_until)
    }

    /// Whether the record holds a completed result.
    pub fn is_completed(&self) -> bool {
        matches!(self.state, RecordState::Completed { .. })
    }

    /// The number of replays of a completed record (0 while in progress).
    pub fn hits(&self) -> u64 {
        match self.state {
            RecordState::Completed { hits, .. } => hits,
            RecordState::InProgress { .. } => 0,
        }
    }

    /// How long until an in-progress record's lease lapses at `now` (zero once it has,
    /// and for completed records): the natural `Retry-After` for a conflicting request.
    pub fn lease_remaining(&self, now: SystemTime) -> Duration {
        match self.state {
            RecordState::InProgress { lease_until, .. } => lease_until.duration_since(now).unwrap_or(Duration::ZERO),
            RecordState::Completed { .. } => Duration::ZERO,
        }
    }
}
