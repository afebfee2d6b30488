//! The transactional API: a holder's work and its completion committed together in the
//! caller's own transaction ([`PostgresStore::lock_claim`],
//! [`PostgresStore::set_recovery_point`], [`PostgresStore::complete_in`]), and the
//! recovery points that let a retry resume a multi-step operation.

use std::time::Duration;

use bytes::Bytes;
use oncely::store::Claim;
use oncely::{StorageKey, StoreError};
use sqlx_core::query::query;
use sqlx_core::row::Row;
use sqlx_postgres::PgTransaction;

use crate::PostgresStore;
use crate::codec::uuid;
use crate::error::pg_error;
use crate::store::complete_on;

/// The holder's view of its record inside its own transaction, from
/// [`PostgresStore::lock_claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockedClaim {
    /// 1 for the claim that created the record, plus one for each takeover of a lapsed
    /// lease: above 1, an earlier attempt may have done some of the work.
    pub attempt: u32,
    /// The last step an earlier attempt committed with
    /// [`PostgresStore::set_recovery_point`], or `None` to start from the beginning.
    pub recovery_point: Option<String>,
}

impl PostgresStore {
    /// Locks the record `claim` holds in the caller's transaction, until it commits
    /// or rolls back, and returns the attempt number and the last recovery point.
    ///
    /// Call it first in every transaction that does some of the operation's work: it is
    /// the fence. After it returned, no other claim can take the key over until the
    /// transaction ends (a takeover waits for the lock, then finds the completion or a
    /// renewed state), so the writes that follow cannot race a second holder. A duplicate
    /// request that finds the lease live answers "in progress" from its snapshot without
    /// waiting (and replays, after the commit, never wait); only a claim that found the
    /// lease lapsed waits for the transaction: keep such transactions short. The engine's lease renewal ([`oncely::ClaimGuard::keep_alive`])
    /// does not wait for this lock (it skips a locked record, which nobody can take over
    /// anyway); instead this call renews the lease, by its length, from the moment it runs,
    /// and so does [`set_recovery_point`](Self::set_recovery_point): call that last in a
    /// step's transaction, so the record a queued claim re-reads at the commit has a live
    /// lease.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] when `claim` no longer holds the key (taken over,
    /// released, deleted or expired): roll back, since another holder may be doing the
    /// work. [`StoreError::Timeout`] when the statement timeout passed first (waiting for
    /// a claim that is taking the key over, say), [`StoreError::Unavailable`] when the database failed.
    pub async fn lock_claim(&self, tx: &mut PgTransaction<'_>, claim: Claim) -> Result<LockedClaim, StoreError> {
        let row = query(self.sql().hold.clone())
            .bind(claim.storage_key.as_bytes().as_slice())
            .bind(uuid(claim.claim_id))
            .fetch_optional(&mut **tx)
            .await
            .map_err(pg_error)?
            .ok_or(StoreError::LeaseLost)?;
        let attempt: i32 = row.try_get(0).map_err(pg_error)?;
        Ok(LockedClaim {
            attempt: u32::try_from(attempt).map_err(|_| StoreError::Corrupt(format!("attempt {attempt}")))?,
            recovery_point: row.try_get(1).map_err(pg_error)?,
        })
    }

    /// Records that the steps up to `point` are done, in the caller's transaction, so it
    /// commits (or not) with the writes of those steps. A retry that takes the key over
    /// gets `point` back from [`lock_claim`](Self::lock_claim). Any text will do: a step's
    /// name, or JSON carrying what the next step needs. Renews the lease, as `lock_claim`
    /// does.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] when `claim` no longer holds the key: roll back.
    pub async fn set_recovery_point(
        &self,
        tx: &mut PgTransaction<'_>,
        claim: Claim,
        point: &str,
    ) -> Result<(), StoreError> {
        let done = query(self.sql().set_recovery_point.clone())
            .bind(claim.storage_key.as_bytes().as_slice())
            .bind(uuid(claim.claim_id))
            .bind(point)
            .execute(&mut **tx)
            .await
            .map_err(pg_error)?;
        if done.rows_affected() == 1 { Ok(()) } else { Err(StoreError::LeaseLost) }
    }

    /// Completes the operation `claim` holds inside the caller's transaction: the
    /// result is stored, and waiters notified, when the transaction commits, together
    /// with every other write in it; if it rolls back or the process dies first, the
    /// record stays in progress (and its lease lapses) as if the operation never ran.
    ///
    /// The completion's times are the transaction's `now()`: its start. After the
    /// commit, finish the engine's guard with [`oncely::ClaimGuard::finished_elsewhere`].
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] when `claim` no longer holds the key: roll back, since
    /// another holder owns the operation now.
    pub async fn complete_in(
        &self,
        tx: &mut PgTransaction<'_>,
        claim: Claim,
        payload: Bytes,
        retention: Duration,
    ) -> Result<(), StoreError> {
        complete_on(&mut **tx, self.sql().complete.clone(), claim, payload, retention).await?.done()
    }

    /// The recovery point of the live record at `key`, for inspection. Holders read it
    /// with [`lock_claim`](Self::lock_claim), inside their transaction.
    pub async fn recovery_point(&self, key: &StorageKey) -> Result<Option<String>, StoreError> {
        let row = query(self.sql().recovery_point.clone())
            .bind(key.as_bytes().as_slice())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(pg_error)?;
        match row {
            Some(row) => row.try_get(0).map_err(pg_error),
            None => Ok(None),
        }
    }
}
