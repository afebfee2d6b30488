//! [`DeferredCompletions`]: results that ran but could not be stored yet.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::store::Claim;
use crate::store::StoreErrorKind;
use crate::{ClaimId, Record, RecordState, StorageKey, Store, StoreError};

/// Results that ran but could not be stored yet: the process keeps them, answers retries
/// from them, and writes them before it takes any new claim.
///
/// An operation that ran while its store could not be written (disk full, a lock held by
/// another process, a network store down) has had its effect. If the outage outlasts the
/// lease, a retry would find the record's lease lapsed, take the key over and run the
/// operation a second time. [`DeferredCompletions`] closes that window for every retry
/// that reaches this process:
///
/// - **Retries are answered from the kept result.** [`Oncely::acquire`] looks here before
///   it asks the store, so a retry of a kept key is a replay (or a mismatch) whatever the
///   store would say.
/// - **Kept results are written before new claims.** While anything is kept, every
///   `acquire` first writes the kept results ([`DeferredCompletions::flush`], or waits
///   for the write already under way), then claims. So once the store answers again,
///   this process sends its kept results before any new claim. A result the store keeps
///   refusing does not hold other work up: the claim goes ahead after one attempt (and
///   fails by itself while the store is down).
/// - **Kept from the first failure.** A completion is kept as soon as the store fails to
///   take it, before any retry, so no retry through this process can slip into the gap.
/// - **Readiness**: [`DeferredCompletions::len`] is above zero while anything is kept;
///   the gateway's `/readyz` answers 503 then, so operators and orchestrators see that
///   results the clients were given live only in this process's memory.
/// - A background task writes the kept results every 125–375 ms (jittered) until they
///   are stored, a record turns out to be someone else's (its write is fenced off:
///   [`StoreError::LeaseLost`]), or the retention passes.
///
/// **What remains possible across instances**: another process sharing the store does
/// not see this process's kept results. Once the store answers again and the lease has
/// lapsed, a retry that reaches another instance *before* this process's next write
/// (at most one background interval, about 375 ms, or this process's next claim,
/// whichever comes first) can take the key over and run the operation again. Keep leases
/// longer than the outages you expect to ride out, and retries sticky where you can.
/// A crash of this process loses what it kept (the operation's effect stays; its retry
/// runs again after the lease).
///
/// [`Oncely::acquire`]: crate::Oncely::acquire
///
/// Shared by clones: give one registry to every engine on the same store (the gateway
/// shares one across its routes) so that readiness and the write-before-claim rule see
/// all of them.
///
/// ```
/// use oncely::{MemoryStore, Oncely};
/// use oncely::engine::DeferredCompletions;
///
/// let deferred = DeferredCompletions::new();
/// let payments = Oncely::builder(MemoryStore::new()).deferred_completions(deferred.clone()).build()?;
/// assert!(deferred.is_empty(), "nothing ran while the store was down");
/// # Ok::<(), oncely::ConfigError>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct DeferredCompletions {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The kept results and whether a background writer runs. Never held across an
    /// `await`; every decision about starting or stopping the writer is made under it,
    /// so a result kept just as the writer stops always finds a writer.
    state: Mutex<State>,
    /// `state.pending.len()`, readable without the lock on every `acquire`; written
    /// only under the lock.
    len: AtomicUsize,
    /// One writer at a time, so two callers never send the same completion twice (a
    /// repeated completion by the same claim is answered `LeaseLost` by some stores).
    flushing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct State {
    pending: crate::key::KeyMap<Pending>,
    writer_running: bool,
}

#[derive(Debug, Clone)]
struct Pending {
    claim_id: ClaimId,
    /// The completed record as a replay shows it.
    record: Record,
    retention: Duration,
    give_up_at: SystemTime,
}

impl DeferredCompletions {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many results wait to be stored.
    pub fn len(&self) -> usize {
        self.inner.len.load(Ordering::Acquire)
    }

    /// True when every result this process produced has reached the store.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn remove(&self, key: &StorageKey) -> bool {
        let mut state = self.lock();
        let removed = state.pending.remove(key).is_some();
        self.inner.len.store(state.pending.len(), Ordering::Release);
        removed
    }

    /// Keeps `payload` as the result of `claim_id`'s operation on `record`'s key.
    /// `record` is the in-progress record as the claim made it; it is kept as completed.
    /// True when the caller must start the background writer (none runs).
    #[must_use]
    pub(crate) fn keep(&self, mut record: Record, claim_id: ClaimId, payload: Bytes, retention: Duration) -> bool {
        let now = SystemTime::now();
        record.state = RecordState::Completed { payload, completed_at: now, hits: 0 };
        record.expires_at = now + retention;
        let pending = Pending { claim_id, give_up_at: record.expires_at, record, retention };
        let mut state = self.lock();
        state.pending.insert(pending.record.storage_key, pending);
        self.inner.len.store(state.pending.len(), Ordering::Release);
        !std::mem::replace(&mut state.writer_running, true)
    }

    /// The kept result for `key`, counted as a hit, if there is one. The hits counted
    /// here are not added to the store's count when the result lands.
    pub(crate) fn replay(&self, key: &StorageKey) -> Option<Record> {
        let mut state = self.lock();
        let pending = state.pending.get_mut(key)?;
        if let RecordState::Completed { hits, .. } = &mut pending.record.state {
            *hits += 1;
        }
        Some(pending.record.clone())
    }

    /// The kept result for `key`, if there is one, as a replay would show it (for admin
    /// tools: the store holds the key in progress meanwhile).
    pub fn get(&self, key: &StorageKey) -> Option<Record> {
        self.lock().pending.get(key).map(|p| p.record.clone())
    }

    /// Drops the kept result for `key` without storing it: for an operator who deletes
    /// the key (the next request with it runs again). True when one was kept.
    pub fn forget(&self, key: &StorageKey) -> bool {
        self.remove(key)
    }

    /// Writes every kept result to `store`, one writer at a time.
    ///
    /// A result is dropped once stored, once the store fences its write off
    /// ([`StoreError::LeaseLost`]: the key was deleted or is someone else's now; logged as
    /// an error) or once its retention has passed. The first `Unavailable` or `Timeout`
    /// ends the round: the store is down, and trying the rest would only wait on it again.
    ///
    /// When another caller is writing already, this waits for it instead of sending the
    /// same writes again (so callers queued behind a store that answers slowly wait for
    /// one round of writes, not one each), then reports whether anything is left.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Timeout`] when results remain kept;
    /// what the store took before failing is dropped from the registry.
    pub async fn flush<S: Store>(&self, store: &S) -> Result<(), StoreError> {
        let Ok(_writer) = self.inner.flushing.try_lock() else {
            drop(self.inner.flushing.lock().await);
            return match self.len() {
                0 => Ok(()),
                n => Err(StoreError::unavailable(format!("{n} results kept during a store outage are not stored yet"))),
            };
        };
        let snapshot: Vec<(StorageKey, Pending)> = self.lock().pending.iter().map(|(k, p)| (*k, p.clone())).collect();
        for (key, pending) in snapshot {
            let RecordState::Completed { payload, .. } = &pending.record.state else { continue };
            if SystemTime::now() >= pending.give_up_at {
                tracing::error!(key = %pending.record.key, "giving up storing the result of an operation that ran: its retention passed");
            } else {
                match store
                    .complete(
                        Claim { storage_key: key, claim_id: pending.claim_id },
                        payload.clone(),
                        pending.retention,
                    )
                    .await
                {
                    Ok(()) => {
                        tracing::info!(key = %pending.record.key, "the result was stored once the store answered again")
                    }
                    Err(e) if matches!(e.kind(), StoreErrorKind::Unavailable | StoreErrorKind::Timeout) => {
                        return Err(e);
                    }
                    Err(e) => {
                        tracing::error!(key = %pending.record.key, error = %e, "a kept result could not be stored (the key was deleted or taken over meanwhile, or a timed-out attempt stored it); dropping it");
                    }
                }
            }
            self.remove(&key);
        }
        Ok(())
    }

    /// Called by the background writer when a round left nothing kept: true when it must
    /// go on after all (a result was kept meanwhile), else it is marked stopped.
    pub(crate) fn writer_may_stop(&self) -> bool {
        let mut state = self.lock();
        if state.pending.is_empty() {
            state.writer_running = false;
            true
        } else {
            false
        }
    }

    /// Marks the writer stopped whatever is kept: for a writer task that is dropped (its
    /// runtime shuts down), so that the next kept result starts another.
    pub(crate) fn writer_gone(&self) {
        self.lock().writer_running = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IdempotencyKey, MemoryStore, Scope};

    fn record(key: &str) -> Record {
        let key = IdempotencyKey::new(key).expect("valid key");
        let scope = Scope::global();
        Record {
            storage_key: StorageKey::derive(&scope, &key),
            key,
            scope,
            fingerprint: None,
            created_at: SystemTime::now(),
            expires_at: SystemTime::now() + Duration::from_secs(60),
            state: RecordState::InProgress { claim_id: ClaimId::random(), lease_until: SystemTime::now() },
        }
    }

    #[tokio::test]
    async fn a_result_the_store_fences_off_is_dropped_not_kept_forever() {
        let deferred = DeferredCompletions::new();
        let r = record("k");
        let key = r.storage_key;
        assert!(deferred.keep(r, ClaimId::random(), Bytes::from_static(b"done"), Duration::from_secs(60)));
        assert_eq!(deferred.len(), 1);
        let replayed = deferred.replay(&key).expect("kept");
        assert_eq!(replayed.hits(), 1);
        assert!(replayed.is_completed());
        // The memory store holds no claim of this id: the write is fenced off.
        deferred.flush(&MemoryStore::new()).await.expect("the store answered");
        assert!(deferred.is_empty());
    }
}
