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

use crate::{Fingerprint, IdempotencyKey, Scope, StorageKey, StoreError};

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

/// Which state a store wrote down for a record, for stores that keep a state marker
/// beside the state's fields (SQLite's `state` column, Redis's `s` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordStateKind {
    /// [`RecordState::InProgress`].
    InProgress,
    /// [`RecordState::Completed`].
    Completed,
}

/// A record's fields as a store read them back, before anything says they make a valid
/// record: [`Record::from_parts`] decides, for every store.
///
/// A store decodes its own encoding (its column types, its units of time, its field
/// names) into these parts; what a valid record is does not depend on the store, so it
/// is not written in any store's decoder.
#[derive(Clone, Debug)]
pub struct RecordParts {
    /// The storage key's bytes (32 in a valid record).
    pub storage_key: Vec<u8>,
    /// The raw key (a valid [`IdempotencyKey`] in a valid record).
    pub key: String,
    /// The scope.
    pub scope: String,
    /// The fingerprint's bytes (32 in a valid record), or `None` for a request that had
    /// none.
    pub fingerprint: Option<Vec<u8>>,
    /// When the record was created.
    pub created_at: SystemTime,
    /// When the record expires.
    pub expires_at: SystemTime,
    /// The state the store wrote down, or `None` for a store that keeps no marker and
    /// lets the fields tell the state.
    pub state: Option<RecordStateKind>,
    /// The holder's claim id.
    pub claim_id: Option<ClaimId>,
    /// When the holder's lease lapses.
    pub lease_until: Option<SystemTime>,
    /// The stored result.
    pub payload: Option<Bytes>,
    /// When the operation completed.
    pub completed_at: Option<SystemTime>,
    /// The replay count, as a signed number since that is what databases store.
    pub hits: Option<i64>,
}

impl Record {
    /// The one rule of what a valid stored record is, shared by every store's decoder:
    ///
    /// - the storage key and the fingerprint (when there is one) are 32 bytes, and the
    ///   key is a valid [`IdempotencyKey`];
    /// - the state is the one the store wrote down; a store that keeps no marker has a
    ///   record in progress when it holds a claim id and no payload, completed when it
    ///   holds a payload and no claim id, and anything else is invalid;
    /// - a record in progress has a claim id and a lease end; a completed one has a
    ///   payload, a completion time and a hit count that is not negative. Fields of the
    ///   other state are ignored once the state is known (Redis keeps a completed
    ///   record's claim id, to recognise a repeated completion).
    ///
    /// # Errors
    /// [`StoreError::Corrupt`], saying what is wrong, when the parts break the rule.
    pub fn from_parts(parts: RecordParts) -> Result<Record, StoreError> {
        let storage_key = <[u8; 32]>::try_from(parts.storage_key.as_slice())
            .map(StorageKey::from_bytes)
            .map_err(|_| StoreError::Corrupt(format!("a storage key of {} bytes", parts.storage_key.len())))?;
        let corrupt = |what: String| StoreError::Corrupt(format!("record {storage_key}: {what}"));
        let missing = |field: &str, state: &str| corrupt(format!("{state} without {field}"));
        let kind = match parts.state {
            Some(kind) => kind,
            None => match (&parts.claim_id, &parts.payload) {
                (Some(_), None) => RecordStateKind::InProgress,
                (None, Some(_)) => RecordStateKind::Completed,
                _ => return Err(corrupt("holds the fields of both states or of neither".into())),
            },
        };
        let state = match kind {
            RecordStateKind::InProgress => RecordState::InProgress {
                claim_id: parts.claim_id.ok_or_else(|| missing("a claim id", "in progress"))?,
                lease_until: parts.lease_until.ok_or_else(|| missing("a lease end", "in progress"))?,
            },
            RecordStateKind::Completed => {
                let hits = parts.hits.ok_or_else(|| missing("a hit count", "completed"))?;
                RecordState::Completed {
                    payload: parts.payload.ok_or_else(|| missing("a payload", "completed"))?,
                    completed_at: parts.completed_at.ok_or_else(|| missing("a completion time", "completed"))?,
                    hits: u64::try_from(hits).map_err(|_| corrupt(format!("negative hit count {hits}")))?,
                }
            }
        };
        let fingerprint = parts
            .fingerprint
            .map(|bytes| {
                <[u8; 32]>::try_from(bytes.as_slice())
                    .map(Fingerprint::from_digest)
                    .map_err(|_| corrupt(format!("a fingerprint of {} bytes", bytes.len())))
            })
            .transpose()?;
        let key = IdempotencyKey::new(&parts.key).map_err(|e| corrupt(format!("stored key {:?}: {e}", parts.key)))?;
        Ok(Record {
            storage_key,
            key,
            scope: Scope::new(parts.scope),
            fingerprint,
            created_at: parts.created_at,
            expires_at: parts.expires_at,
            state,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    fn in_progress() -> RecordParts {
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        RecordParts {
            storage_key: vec![7; 32],
            key: "order-17".into(),
            scope: "tenant".into(),
            fingerprint: Some(vec![1; 32]),
            created_at: at,
            expires_at: at + Duration::from_secs(60),
            state: None,
            claim_id: Some(ClaimId::from_u128(9)),
            lease_until: Some(at + Duration::from_secs(5)),
            payload: None,
            completed_at: None,
            hits: Some(0),
        }
    }

    fn completed() -> RecordParts {
        let parts = in_progress();
        RecordParts {
            claim_id: None,
            lease_until: None,
            payload: Some(Bytes::from_static(b"done")),
            completed_at: Some(parts.created_at),
            hits: Some(3),
            ..parts
        }
    }

    fn corrupt(parts: RecordParts) -> bool {
        matches!(Record::from_parts(parts), Err(StoreError::Corrupt(_)))
    }

    #[test]
    fn valid_parts_make_the_record_and_the_fields_tell_the_state() {
        let record = Record::from_parts(in_progress()).expect("valid");
        assert_eq!(
            record.state,
            RecordState::InProgress {
                claim_id: ClaimId::from_u128(9),
                lease_until: record.created_at + Duration::from_secs(5),
            }
        );
        assert_eq!(record.fingerprint, Some(Fingerprint::from_digest([1; 32])));
        assert_eq!(record.key.as_str(), "order-17");
        let record = Record::from_parts(completed()).expect("valid");
        assert!(record.is_completed());
        assert_eq!(record.hits(), 3);
        let none = Record::from_parts(RecordParts { fingerprint: None, ..completed() }).expect("valid");
        assert_eq!(none.fingerprint, None);
    }

    #[test]
    fn a_written_state_decides_and_the_other_states_fields_are_ignored() {
        // Redis keeps a completed record's claim id.
        let both = RecordParts { claim_id: Some(ClaimId::from_u128(9)), ..completed() };
        assert!(corrupt(both.clone()), "no marker: both states' fields are ambiguous");
        let record = Record::from_parts(RecordParts { state: Some(RecordStateKind::Completed), ..both }).expect("ok");
        assert!(record.is_completed());
        let marked =
            RecordParts { state: Some(RecordStateKind::InProgress), payload: Some(Bytes::new()), ..in_progress() };
        assert!(!Record::from_parts(marked).expect("ok").is_completed());
    }

    #[test]
    fn parts_that_break_the_rule_are_corrupt() {
        assert!(corrupt(RecordParts { storage_key: vec![7; 31], ..in_progress() }));
        assert!(corrupt(RecordParts { fingerprint: Some(vec![1; 16]), ..in_progress() }));
        assert!(corrupt(RecordParts { key: String::new(), ..in_progress() }));
        assert!(corrupt(RecordParts { claim_id: None, ..in_progress() }), "neither state's fields");
        assert!(corrupt(RecordParts { lease_until: None, ..in_progress() }));
        assert!(corrupt(RecordParts { state: Some(RecordStateKind::InProgress), ..completed() }));
        assert!(corrupt(RecordParts { completed_at: None, ..completed() }));
        assert!(corrupt(RecordParts { hits: None, ..completed() }));
        assert!(corrupt(RecordParts { hits: Some(-1), ..completed() }));
        assert!(corrupt(RecordParts { state: Some(RecordStateKind::Completed), ..in_progress() }));
    }
}
