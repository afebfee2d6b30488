//! The claim guard: a held key, for callers who complete or release by hand.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::store::{Claim, ClaimRequest, StoreErrorKind};
use crate::{ClaimId, Error, Fingerprint, IdempotencyKey, Oncely, Record, RecordState, StorageKey, Store, StoreError};

/// A claim on a key, held while the caller runs the operation.
///
/// Finish it with [`complete`](Self::complete) (the result is stored for replay) or
/// [`release`](Self::release) (the operation may run again). Wrap the operation in
/// [`keep_alive`](Self::keep_alive) so a slow one is not taken over while it runs.
///
/// **Dropping an unfinished guard** neither completes nor releases: the record stays in
/// progress until its lease lapses, then the next claim takes it over. That is the safe
/// choice when the operation was cancelled midway, since its effect may have happened;
/// call [`release`](Self::release) when you know it had none.
///
/// ```
/// use bytes::Bytes;
/// use oncely::{Acquired, IdempotencyKey, MemoryStore, Oncely};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), oncely::Error> {
/// let oncely = Oncely::new(MemoryStore::new());
/// let key = IdempotencyKey::new("order-17").expect("valid key");
///
/// match oncely.acquire(&key, None).await? {
///     Acquired::Execute(guard) => {
///         let receipt = guard.keep_alive(async { Bytes::from_static(b"order 17 placed") }).await;
///         guard.complete(receipt).await?;
///     }
///     Acquired::Replay(_) => unreachable!("first use of the key"),
/// }
///
/// let Acquired::Replay(replay) = oncely.acquire(&key, None).await? else { unreachable!() };
/// assert_eq!(replay.payload, "order 17 placed");
/// assert_eq!(replay.hits, 1);
/// # Ok(()) }
/// ```
#[must_use = "a dropped guard leaves its key blocked until the lease lapses"]
pub struct ClaimGuard<S: Store> {
    engine: Oncely<S>,
    claim: Claim,
    key: IdempotencyKey,
    fingerprint: Option<Fingerprint>,
    takeover: bool,
    claimed_at: Instant,
    finished: bool,
}

impl<S: Store> std::fmt::Debug for ClaimGuard<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimGuard")
            .field("key", &self.key)
            .field("claim_id", &self.claim.claim_id)
            .field("takeover", &self.takeover)
            .finish_non_exhaustive()
    }
}

impl<S: Store> ClaimGuard<S> {
    pub(crate) fn new(engine: Oncely<S>, request: &ClaimRequest<'_>, takeover: bool) -> Self {
        Self {
            engine,
            claim: request.claim(),
            key: request.key().clone(),
            fingerprint: request.fingerprint().copied(),
            takeover,
            claimed_at: Instant::now(),
            finished: false,
        }
    }

    /// The key held.
    pub fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    /// The storage key of the record held.
    pub fn storage_key(&self) -> &StorageKey {
        &self.claim.storage_key
    }

    /// The id this guard holds the key under.
    pub fn claim_id(&self) -> ClaimId {
        self.claim.claim_id
    }

    /// The holder, as the store's fenced calls take it: for completing the record by
    /// other means (`oncely-postgres`'s transactional API).
    pub fn claim(&self) -> Claim {
        self.claim
    }

    /// True when this claim took over a holder whose lease lapsed: that holder may have
    /// had its effect already, so operations that can check should.
    pub fn is_takeover(&self) -> bool {
        self.takeover
    }

    /// Renews the lease to the engine's lease from now.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] (inside [`Error::Store`]) when the claim was taken over.
    pub async fn touch(&self) -> Result<(), Error> {
        let lease = self.engine.config().lease;
        Ok(self.engine.store().touch(self.claim, lease).await?)
    }

    /// Stores `payload` as the operation's result for every retry in the retention window.
    ///
    /// When the store does not take it (unreachable, or its write lock held elsewhere),
    /// the engine keeps the result at once in its
    /// [`DeferredCompletions`](crate::engine::DeferredCompletions): from then on, retries
    /// through this engine are answered from it and every claim first writes it. This
    /// call then tries twice more, 20 ms then 100 ms later, and a background task (inside
    /// a Tokio runtime; on the tracker given to
    /// [`OncelyBuilder::track_background`](crate::OncelyBuilder::track_background), if
    /// any) keeps writing about every 250 ms until the result lands, the key turns out to
    /// be someone else's, or the retention passes. The operation has run: a retry must
    /// never take its key over and run it a second time because the store was down for
    /// longer than the lease.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] when the claim was taken over (its write is rejected so
    /// it cannot overwrite the new holder), or the store's failure (the result is then
    /// kept, as above).
    pub async fn complete(mut self, payload: Bytes) -> Result<(), Error> {
        self.finished = true;
        let retention = self.engine.config().retention;
        let store = self.engine.store();
        // A timed-out completion may or may not have landed; writing it again is safe
        // (the holder's repeated completion changes nothing), so it is kept like one that
        // never reached the store.
        let error = match store.complete(self.claim, payload.clone(), retention).await {
            Err(e) if matches!(e.kind(), StoreErrorKind::Unavailable | StoreErrorKind::Timeout) => e,
            other => return Ok(other?),
        };
        // Boxed: the retries' futures (two sleeps, two flushes) would otherwise make every
        // completion's future several times larger, copied wherever it is moved.
        Box::pin(self.complete_after_failure(payload, retention, error)).await
    }

    /// The rest of [`complete`](Self::complete) when the store did not take the result:
    /// keep it, and try twice more.
    async fn complete_after_failure(
        &self,
        payload: Bytes,
        retention: Duration,
        error: StoreError,
    ) -> Result<(), Error> {
        tracing::warn!(key = %self.key, error = %error, "completion failed; the result is kept until the store takes it");
        self.keep_until_stored(payload, retention);
        let (store, deferred) = (self.engine.store(), self.engine.deferred_completions());
        let mut last = error;
        for pause in [Duration::from_millis(20), Duration::from_millis(100)] {
            tokio::time::sleep(pause).await;
            match deferred.flush(store).await {
                // Written, or dropped by the registry with an error logged.
                Ok(()) if deferred.get(&self.claim.storage_key).is_none() => return Ok(()),
                Ok(()) => {}
                Err(e) => last = e,
            }
        }
        Err(last.into())
    }

    /// Keeps the result of an operation that ran while the store was unreachable, and
    /// makes sure a background writer stores it; see [`complete`](Self::complete).
    fn keep_until_stored(&self, payload: Bytes, retention: Duration) {
        let record = Record {
            storage_key: self.claim.storage_key,
            key: self.key.clone(),
            scope: self.engine.scope().clone(),
            fingerprint: self.fingerprint,
            created_at: std::time::SystemTime::now() - self.claimed_at.elapsed(),
            expires_at: std::time::SystemTime::now() + retention,
            state: RecordState::InProgress { claim_id: self.claim.claim_id, lease_until: std::time::SystemTime::now() },
        };
        let deferred = self.engine.deferred_completions();
        let start_writer = deferred.keep(record, self.claim.claim_id, payload, retention);
        metrics::counter!("oncely_completions_deferred_total").increment(1);
        if !start_writer {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            deferred.writer_gone();
            return;
        };
        let engine = self.engine.clone();
        let writer = async move {
            /// Marks the writer gone if its task is dropped before it stops by itself.
            struct Running(Option<super::DeferredCompletions>);
            impl Drop for Running {
                fn drop(&mut self) {
                    if let Some(deferred) = self.0.take() {
                        deferred.writer_gone();
                    }
                }
            }
            let deferred = engine.deferred_completions();
            let mut running = Running(Some(deferred.clone()));
            loop {
                // 125–375 ms apart, jittered so that the processes cut off by one outage
                // do not all hit the store in the same instant when it returns.
                let pause = Duration::from_millis(125 + rand::random::<u64>() % 250);
                tokio::time::sleep(pause).await;
                if let Err(e) = deferred.flush(engine.store()).await {
                    tracing::debug!(error = %e, waiting = deferred.len(), "kept results still cannot be stored");
                    continue;
                }
                if deferred.writer_may_stop() {
                    running.0 = None;
                    return;
                }
            }
        };
        match self.engine.background() {
            Some(tracker) => drop(tracker.spawn_on(writer, &runtime)),
            None => drop(runtime.spawn(writer)),
        }
    }

    /// Releases the key so the operation may run again.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] when the claim was already taken over, or the store's
    /// failure (the claim then lapses with its lease).
    pub async fn release(mut self) -> Result<(), Error> {
        self.finished = true;
        Ok(self.engine.store().release(self.claim).await?)
    }

    /// Gives the claim up without completing or releasing it: the key stays in progress
    /// until its lease lapses, then the next claim takes it over. For callers that know
    /// the operation's outcome is unknown (it may have had its effect). Unlike dropping
    /// the guard, this is not logged as a mistake.
    pub fn abandon(mut self) {
        self.finished = true;
        metrics::counter!("oncely_claims_abandoned_total").increment(1);
    }

    /// Marks the claim finished by the caller, who completed the record with the store
    /// directly: for a completion committed inside the caller's own database transaction
    /// (`oncely-postgres`'s `complete_in`), after that transaction committed. Nothing is
    /// sent to the store and, unlike [`abandon`](Self::abandon), nothing is counted.
    pub fn finished_elsewhere(mut self) {
        self.finished = true;
    }

    /// Until when [`keep_alive`](Self::keep_alive) keeps this claim safely held: the
    /// keep-alive ceiling (counted from the claim) plus half a lease, which leaves the
    /// other half for the completion to reach the store before the last renewal runs out.
    /// An operation still running then may be taken over by a retry: a caller that can
    /// bound its operation should stop waiting for it by this moment and settle the
    /// claim (the HTTP layer holds it as an unknown outcome).
    /// [`keep_alive_bounded`](Self::keep_alive_bounded) does this with one timer.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), oncely::Error> {
    /// use oncely::{Acquired, IdempotencyKey, MemoryStore, Oncely};
    ///
    /// let oncely = Oncely::new(MemoryStore::new());
    /// let key = IdempotencyKey::new("k").expect("key");
    /// if let Acquired::Execute(guard) = oncely.acquire(&key, None).await? {
    ///     let work = async { "done" };
    ///     match tokio::time::timeout_at(guard.held_until(), guard.keep_alive(work)).await {
    ///         Ok(done) => guard.complete(done.into()).await?,
    ///         Err(_) => guard.abandon(), // or record that the outcome is unknown
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn held_until(&self) -> Instant {
        let config = self.engine.config();
        self.claimed_at + config.keep_alive_ceiling + config.lease / 2
    }

    /// Runs `operation` to completion while renewing the lease every third of it, until
    /// the engine's keep-alive ceiling (counted from the claim) is reached.
    ///
    /// A renewal that finds the claim taken over stops renewing and is logged; the
    /// operation still runs to completion (it cannot be safely interrupted), and the
    /// completion that follows is then rejected with [`StoreError::LeaseLost`].
    pub fn keep_alive<F: Future>(&self, operation: F) -> impl Future<Output = F::Output> {
        // A plain function around the loop's future, not an `async fn`: one would keep
        // its own copy of `operation` beside the loop's.
        let renewing = self.renew_while(operation, None);
        async move {
            match renewing.await {
                Some(output) => output,
                // Without a bound the renewal loop waits for the operation alone.
                None => unreachable!("an unbounded keep-alive ends only with its operation"),
            }
        }
    }

    /// [`keep_alive`](Self::keep_alive), waiting for the operation no longer than
    /// [`held_until`](Self::held_until): `None` when that moment came first (the
    /// operation is dropped there; its outcome is unknown). One timer serves both the
    /// renewals and the bound, where `timeout_at(held_until, keep_alive(..))` arms two.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), oncely::Error> {
    /// use oncely::{Acquired, IdempotencyKey, MemoryStore, Oncely};
    ///
    /// let oncely = Oncely::new(MemoryStore::new());
    /// let key = IdempotencyKey::new("k").expect("key");
    /// if let Acquired::Execute(guard) = oncely.acquire(&key, None).await? {
    ///     match guard.keep_alive_bounded(async { "done" }).await {
    ///         Some(done) => guard.complete(done.into()).await?,
    ///         None => guard.abandon(), // or record that the outcome is unknown
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn keep_alive_bounded<F: Future>(&self, operation: F) -> impl Future<Output = Option<F::Output>> {
        // Not an `async fn`, which would keep a copy of `operation` beside the loop's.
        self.renew_while(operation, Some(self.held_until()))
    }

    /// The renewal loop of [`keep_alive`](Self::keep_alive) and
    /// [`keep_alive_bounded`](Self::keep_alive_bounded): one `Sleep`, armed for the next
    /// renewal while there is one before the ceiling, then for `bound` (if any).
    ///
    /// Invariant: `bound`, when given, is `held_until()`, which lies half a lease past
    /// the ceiling, so every renewal comes before it and the sleep's deadline only moves
    /// forward. The bound holds as `timeout_at` would hold it: a renewal still running
    /// at the bound is dropped there, and the timer is polled outside the task's
    /// cooperative budget, so an operation that spends the budget on every poll cannot
    /// put it off.
    async fn renew_while<F: Future>(&self, operation: F, bound: Option<Instant>) -> Option<F::Output> {
        let config = self.engine.config();
        let every = config.lease / 3;
        let stop_at = self.claimed_at + config.keep_alive_ceiling;
        let mut operation = std::pin::pin!(operation);
        let mut next = Instant::now() + every;
        let mut renewing = !every.is_zero() && next < stop_at;
        let deadline = |renewing: bool, next: Instant| if renewing { Some(next) } else { bound };
        let Some(first) = deadline(renewing, next) else {
            return Some(operation.await);
        };
        let mut sleep = std::pin::pin!(tokio::time::sleep_until(first));
        loop {
            tokio::select! {
                biased;
                output = &mut operation => return Some(output),
                // Unconstrained, as `tokio::time::Timeout` polls its timer: a `Sleep`
                // polled after an operation that spent the budget would never fire.
                () = tokio::task::unconstrained(sleep.as_mut()) => {
                    if !renewing {
                        // The bound: the sleep is armed for it only once renewals stopped.
                        return None;
                    }
                    // Boxed: a renewal is rare (every third of a lease), and its future,
                    // through the store's layers, is most of this loop's size otherwise,
                    // copied with it whenever the operation's future is moved or boxed.
                    let renewal = Box::pin(self.touch());
                    let renewed = match bound {
                        Some(bound) => match tokio::time::timeout_at(bound, renewal).await {
                            Ok(renewed) => renewed,
                            // The renewal outlasted the bound (a store that hangs).
                            Err(_) => return None,
                        },
                        None => renewal.await,
                    };
                    match renewed {
                        Ok(()) => {}
                        Err(Error::Store(StoreError::LeaseLost)) => {
                            tracing::warn!(key = %self.key, "lease lost while the operation runs; its result will be rejected");
                            metrics::counter!("oncely_leases_lost_total").increment(1);
                            renewing = false;
                        }
                        Err(e) => tracing::warn!(key = %self.key, error = %e, "lease renewal failed; retrying at the next interval"),
                    }
                    next += every;
                    renewing = renewing && next < stop_at;
                    match deadline(renewing, next) {
                        Some(at) => sleep.as_mut().reset(at),
                        None => return Some(operation.await),
                    }
                }
            }
        }
    }
}

impl<S: Store> Drop for ClaimGuard<S> {
    fn drop(&mut self) {
        if !self.finished {
            tracing::warn!(key = %self.key, "claim dropped unfinished; the key stays blocked until its lease lapses");
            metrics::counter!("oncely_claims_abandoned_total").increment(1);
        }
    }
}
