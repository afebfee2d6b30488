//! The engine: claims, leases, waiting, and `run`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::store::{ClaimOutcome, ClaimRequest, FirstSeen, Notified, Replay, StoreAdmin};
use crate::{
    Error, Failure, Fingerprint, IdempotencyKey, Record, RecordState, RunError, Scope, StorageKey, Store, StoreError,
};

mod config;
mod deferred;
mod guard;
mod hits;
mod waiting;

pub use config::{Config, ConflictMode, DEFAULT_WAIT_TIMEOUT, MAX_RETENTION, MAX_WAIT, OncelyBuilder};
pub use deferred::DeferredCompletions;
pub use guard::ClaimGuard;

use config::Hooks;

/// The idempotency engine: makes each keyed operation run once.
///
/// Cheap to clone (the store and settings are shared). Each engine value acts for one
/// [`Scope`]; [`scoped`](Self::scoped) gives a view for another.
///
/// ```
/// use oncely::{Failure, IdempotencyKey, MemoryStore, Oncely};
/// use std::sync::atomic::{AtomicU32, Ordering};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let oncely = Oncely::new(MemoryStore::new());
/// let charges = AtomicU32::new(0);
/// let key = IdempotencyKey::new("charge-7f3a")?;
///
/// for _ in 0..3 {
///     let charged = oncely
///         .run(&key, None, || async {
///             charges.fetch_add(1, Ordering::SeqCst);
///             Ok::<_, Failure<String>>(format!("ch_{}", 1999))
///         })
///         .await?;
///     assert_eq!(charged.value, "ch_1999");
/// }
/// assert_eq!(charges.load(Ordering::SeqCst), 1);
/// # Ok(()) }
/// ```
pub struct Oncely<S> {
    shared: Arc<Shared<S>>,
    scope: Scope,
}

pub(crate) struct Shared<S> {
    pub(crate) store: S,
    pub(crate) config: Config,
    pub(crate) hooks: Hooks,
    /// Where background work (a completion the store could not take at once) runs, when
    /// the caller wants to wait for it at shutdown.
    pub(crate) background: Option<tokio_util::task::TaskTracker>,
    pub(crate) deferred: DeferredCompletions,
    /// Replays counted in the process, not yet flushed to the store.
    pub(crate) hits: hits::HitCounts,
    /// The duplicates waiting on each key (wait mode), which poll the store together.
    pub(crate) waiting: waiting::WaitGroups,
    /// `oncely_outcomes_total{outcome}`, registered when the engine is built.
    pub(crate) outcomes: Outcomes,
}

/// One counter handle per outcome label, registered once with the `metrics` recorder
/// installed when the engine is built (install it first), not looked up per request.
#[derive(Debug)]
pub(crate) struct Outcomes {
    store_error: metrics::Counter,
    replayed: metrics::Counter,
    mismatch: metrics::Counter,
    conflict: metrics::Counter,
    replayed_kept: metrics::Counter,
    failure_stored: metrics::Counter,
    failure_released: metrics::Counter,
    takeover: metrics::Counter,
    executed: metrics::Counter,
    first_seen: metrics::Counter,
    duplicate_seen: metrics::Counter,
}

impl Default for Outcomes {
    fn default() -> Self {
        let outcome = |label: &'static str| metrics::counter!("oncely_outcomes_total", "outcome" => label);
        Self {
            store_error: outcome("store_error"),
            replayed: outcome("replayed"),
            mismatch: outcome("mismatch"),
            conflict: outcome("conflict"),
            replayed_kept: outcome("replayed_kept"),
            failure_stored: outcome("failure_stored"),
            failure_released: outcome("failure_released"),
            takeover: outcome("takeover"),
            executed: outcome("executed"),
            first_seen: outcome("first_seen"),
            duplicate_seen: outcome("duplicate_seen"),
        }
    }
}

impl<S> Clone for Oncely<S> {
    fn clone(&self) -> Self {
        Self { shared: Arc::clone(&self.shared), scope: self.scope.clone() }
    }
}

impl<S> std::fmt::Debug for Oncely<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oncely")
            .field("scope", &self.scope)
            .field("config", &self.shared.config)
            .field("hooks", &self.shared.hooks)
            .finish_non_exhaustive()
    }
}

/// The result of [`Oncely::acquire`]: run the operation, or replay its stored result.
#[derive(Debug)]
pub enum Acquired<S: Store> {
    /// The key is now held by this guard: run the operation, then complete or release.
    Execute(ClaimGuard<S>),
    /// The operation completed before: its stored result (the hit count includes this
    /// replay).
    Replay(Replay),
}

/// A claim prepared by [`Oncely::claim_request`], sent by [`Oncely::acquire_request`]:
/// the claim [`Oncely::acquire`] would send, with its storage key readable before it is
/// sent. Neither `Clone` nor built any other way, so each is sent at most once, under
/// its own claim id.
#[derive(Debug)]
pub struct PreparedClaim<'a>(ClaimRequest<'a>);

impl PreparedClaim<'_> {
    /// The storage key of the record the claim is for.
    pub fn storage_key(&self) -> &StorageKey {
        self.0.storage_key()
    }
}

/// A value produced by [`Oncely::run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Executed<T> {
    /// The operation's result.
    pub value: T,
    /// True when the value is a stored result from an earlier run.
    pub replayed: bool,
}

/// How `run` stores an outcome: `{"Ok": value}` or `{"Err": error}` in JSON.
#[derive(Serialize)]
enum StoredRef<'a, T, E> {
    Ok(&'a T),
    Err(&'a E),
}

#[derive(Deserialize)]
enum Stored<T, E> {
    Ok(T),
    Err(E),
    /// The operation ran but its outcome could not be encoded: retries get
    /// [`Error::NotStored`] instead of running it again.
    Unencodable(String),
}

/// The marker stored when an outcome does not encode.
#[derive(Serialize)]
enum UnencodableRef<'a> {
    Unencodable(&'a str),
}

impl<S: Store> Oncely<S> {
    /// An engine with the default settings: 24 h retention, 30 s lease renewed for up to
    /// 10 min, reject mode.
    pub fn new(store: S) -> Self {
        Self::from_shared(Shared {
            store,
            config: Config::default(),
            hooks: Hooks::default(),
            background: None,
            deferred: DeferredCompletions::new(),
            hits: Default::default(),
            waiting: Default::default(),
            outcomes: Outcomes::default(),
        })
    }

    /// A builder for the settings and hooks.
    pub fn builder(store: S) -> OncelyBuilder<S> {
        OncelyBuilder::new(store)
    }

    pub(crate) fn from_shared(shared: Shared<S>) -> Self {
        Self { shared: Arc::new(shared), scope: Scope::global() }
    }

    /// The same engine acting for `scope`: keys of different scopes never meet.
    pub fn scoped(&self, scope: Scope) -> Self {
        Self { shared: Arc::clone(&self.shared), scope }
    }

    /// The scope this engine acts for.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.shared.store
    }

    /// The tracker background work runs on, if the builder was given one.
    pub(crate) fn background(&self) -> Option<&tokio_util::task::TaskTracker> {
        self.shared.background.as_ref()
    }

    /// The results that ran but wait to be stored: empty unless the store failed to take
    /// a completion. Readiness probes should report not ready while it is not empty.
    pub fn deferred_completions(&self) -> &DeferredCompletions {
        &self.shared.deferred
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The storage key of `key` in this engine's scope.
    pub fn storage_key(&self, key: &IdempotencyKey) -> StorageKey {
        StorageKey::derive(&self.scope, key)
    }

    /// Claims `key`, or finds its stored result, in one store call when the key is
    /// uncontended. Meeting a live claim, it rejects or waits as configured.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe. Dropping the future while a claim is in flight can leave a claim
    /// the store committed with no [`ClaimGuard`] to finish it: the key then stays in
    /// progress until its lease lapses (one lease, never the retention), and the next
    /// claim takes it over with [`ClaimGuard::is_takeover`] set. Nothing runs twice
    /// because of it, but a retry waits a lease. Servers that may drop the caller (a
    /// client that hangs up) run `acquire` and the operation in a task of their own, as
    /// `oncely-http` does. Dropping it while it waits for a duplicate (wait mode) or
    /// before the claim is sent is harmless.
    ///
    /// # Errors
    /// [`Error::Conflict`] on a live claim (reject mode, or wait timed out),
    /// [`Error::Mismatch`] when the key was used with another fingerprint, and
    /// [`Error::Store`] when the store fails.
    pub async fn acquire(&self, key: &IdempotencyKey, fingerprint: Option<Fingerprint>) -> Result<Acquired<S>, Error> {
        self.acquire_request(self.claim_request(key, fingerprint)).await
    }

    /// The claim [`acquire`](Self::acquire) sends for `key`, prepared: in this engine's
    /// scope, under a fresh claim id, with its lease and retention. Its
    /// [`storage_key`](PreparedClaim::storage_key) is the record's, derived once here,
    /// for a caller that names the record (in a log line, say) before sending the claim
    /// with [`acquire_request`](Self::acquire_request).
    ///
    /// ```
    /// use oncely::{Acquired, IdempotencyKey, MemoryStore, Oncely, Scope};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let engine = Oncely::new(MemoryStore::new()).scoped(Scope::new("alice"));
    /// let key = IdempotencyKey::new("order-1")?;
    /// let claim = engine.claim_request(&key, None);
    /// let record = *claim.storage_key();
    /// assert_eq!(record, engine.storage_key(&key));
    /// let Acquired::Execute(guard) = engine.acquire_request(claim).await? else { panic!("a new key") };
    /// assert_eq!(*guard.storage_key(), record);
    /// # Ok(()) }
    /// ```
    pub fn claim_request<'a>(&'a self, key: &'a IdempotencyKey, fingerprint: Option<Fingerprint>) -> PreparedClaim<'a> {
        let config = &self.shared.config;
        PreparedClaim(ClaimRequest::new(&self.scope, key, fingerprint, config.lease, config.retention))
    }

    /// [`acquire`](Self::acquire) for a claim prepared by
    /// [`claim_request`](Self::claim_request).
    ///
    /// A claim prepared by another engine, whose scope, lease or retention differ from
    /// this one's, is prepared again here for the same key and fingerprint: a guard
    /// renews at this engine's lease, and a claim under a shorter one could lapse
    /// between renewals.
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire).
    pub async fn acquire_request(&self, claim: PreparedClaim<'_>) -> Result<Acquired<S>, Error> {
        let config = &self.shared.config;
        let hooks = &self.shared.hooks;
        let PreparedClaim(mut request) = claim;
        if !scope_is(request.scope(), &self.scope)
            || request.lease() != config.lease
            || request.retention() != config.retention
        {
            request = ClaimRequest::new(
                &self.scope,
                request.key(),
                request.fingerprint().copied(),
                config.lease,
                config.retention,
            );
        }
        let key = request.key();
        let storage_key = *request.storage_key();
        let wait_until = match config.conflict {
            ConflictMode::Wait { timeout } => Some(tokio::time::Instant::now() + timeout),
            ConflictMode::Reject => None,
        };
        // In wait mode, a waiter subscribes *before* its next claim, so a completion
        // landing between the claim and the wait still wakes it.
        let mut subscription: Option<Notified> = None;
        // Joined at the first conflict in wait mode: this task's place among the waiters
        // of the key in this process (see `waiting`).
        let mut member: Option<waiting::Member<'_>> = None;
        let mut met_conflict = false;
        let deferred = &self.shared.deferred;
        loop {
            // Checked before every claim, a waiter's included: one atomic load when
            // nothing is kept.
            if !deferred.is_empty() {
                // A result this process could not store wins over anything the store
                // says: its operation ran, and the store may no longer fence a retry off.
                if let Some(record) = deferred.replay(&storage_key) {
                    return self.replay_kept(key, record, &request);
                }
                // Kept results are written before any new claim (see
                // `DeferredCompletions`); one the store still refuses does not hold this
                // claim up, which fails by itself while the store is down.
                // Boxed: only a process that could not store a result gets here.
                if let Err(e) = Box::pin(deferred.flush(&self.shared.store)).await {
                    tracing::debug!(error = %e, "kept results not stored before a claim");
                }
            }
            if let Some(member) = &mut member {
                member.catch_up();
            }
            let outcome = match self.shared.store.claim(&request).await {
                Ok(outcome) => outcome,
                // A failing store is not news for the other waiters: their own turns
                // find out, one per poll interval, rather than a burst on a store that
                // may be throttling.
                Err(e) => {
                    self.shared.outcomes.store_error.increment(1);
                    return Err(e.into());
                }
            };
            if let Some(member) = &member {
                match &outcome {
                    // The key is settled: the other waiters re-claim for their answers.
                    ClaimOutcome::Replay(_) | ClaimOutcome::Mismatch => member.announce_change(),
                    // This task holds the key now; the others would only find it in
                    // progress. They wait on, timed on this claim's lease.
                    ClaimOutcome::Acquired { .. } => {
                        member.lease_seen(SystemTime::now() + config.lease);
                    }
                    ClaimOutcome::InProgress { .. } => {}
                }
            }
            match outcome {
                ClaimOutcome::Acquired { takeover } => {
                    let outcomes = &self.shared.outcomes;
                    if takeover { &outcomes.takeover } else { &outcomes.executed }.increment(1);
                    if takeover {
                        tracing::info!(%key, "took over a key whose lease lapsed");
                        if let Some(hook) = &hooks.takeover {
                            hook(key);
                        }
                    }
                    if let Some(hook) = &hooks.miss {
                        hook(key);
                    }
                    let guard = ClaimGuard::new(self.clone(), &request, takeover);
                    return Ok(Acquired::Execute(guard));
                }
                ClaimOutcome::Replay(mut replay) => {
                    self.shared.outcomes.replayed.increment(1);
                    replay.hits = replay.hits.saturating_add(self.count_hit(&storage_key));
                    if let Some(hook) = &hooks.hit {
                        hook(key, &replay);
                    }
                    return Ok(Acquired::Replay(replay));
                }
                ClaimOutcome::Mismatch => {
                    self.shared.outcomes.mismatch.increment(1);
                    if let Some(hook) = &hooks.mismatch {
                        hook(key);
                    }
                    return Err(Error::Mismatch);
                }
                ClaimOutcome::InProgress { lease_until } => {
                    if !met_conflict {
                        met_conflict = true;
                        if let Some(hook) = &hooks.conflict {
                            hook(key, lease_until);
                        }
                    }
                    let remaining = |lease_until: SystemTime| {
                        lease_until.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO)
                    };
                    let conflict = || {
                        self.shared.outcomes.conflict.increment(1);
                        Error::Conflict { retry_after: retry_after(remaining(lease_until)) }
                    };
                    let Some(wait_until) = wait_until else { return Err(conflict()) };
                    if tokio::time::Instant::now() >= wait_until {
                        return Err(conflict());
                    }
                    let member = member.get_or_insert_with(|| self.shared.waiting.join(storage_key));
                    member.lease_seen(lease_until);
                    let Some(mut notified) = subscription.take() else {
                        // Subscribed before the next claim, so a completion landing
                        // between that claim and the wait still wakes this task.
                        subscription = Some(self.shared.store.subscribe(&storage_key));
                        continue;
                    };
                    // Wake on the store's notification or another waiter's news; on the
                    // timer at the latest when the lease could lapse, at the poll
                    // interval, or at the deadline. Of this process's waiters on the key,
                    // one claims per poll interval on its timer (`waiting`); the others
                    // wait on. The lease's end is the store's clock read against ours:
                    // when ours runs ahead, the remainder is zero for a live claim, and
                    // the floor keeps the waiter from spinning.
                    let floor = config.poll_interval.min(Duration::from_millis(50));
                    // Boxed: waiting is the rare path, and its timer and notifications inline
                    // would make every claim's future larger, copied wherever it is moved.
                    Box::pin(async {
                        // Not before the next turn, once a turn was missed.
                        let mut next_turn = None;
                        loop {
                            let lease_until = member.latest_lease().unwrap_or(lease_until);
                            let now = tokio::time::Instant::now();
                            let mut wake = (now + config.poll_interval).min(now + remaining(lease_until).max(floor));
                            if let Some(turn) = next_turn {
                                wake = wake.max(turn);
                            }
                            let wake = wake.min(wait_until);
                            tokio::select! {
                                () = &mut notified => break,
                                () = member.changed() => break,
                                () = tokio::time::sleep_until(wake) => {
                                    let now = tokio::time::Instant::now();
                                    if now >= wait_until {
                                        break;
                                    }
                                    match member.take_turn(now, config.poll_interval) {
                                        Ok(()) => break,
                                        Err(turn) => next_turn = Some(turn),
                                    }
                                }
                            }
                        }
                    })
                    .await;
                    subscription = Some(self.shared.store.subscribe(&storage_key));
                }
            }
        }
    }

    /// Answers a claim from a result this process keeps for the store, as the store
    /// would: a replay, or a mismatch for another fingerprint.
    fn replay_kept(
        &self,
        key: &IdempotencyKey,
        record: Record,
        request: &ClaimRequest<'_>,
    ) -> Result<Acquired<S>, Error> {
        let hooks = &self.shared.hooks;
        if record.fingerprint.as_ref() != request.fingerprint() {
            self.shared.outcomes.mismatch.increment(1);
            if let Some(hook) = &hooks.mismatch {
                hook(key);
            }
            return Err(Error::Mismatch);
        }
        let RecordState::Completed { payload, completed_at, hits } = record.state else {
            return Err(Error::Store(StoreError::Corrupt("a kept result is not completed".into())));
        };
        self.shared.outcomes.replayed_kept.increment(1);
        let replay = Replay { payload, completed_at, hits, expires_at: record.expires_at };
        if let Some(hook) = &hooks.hit {
            hook(key, &replay);
        }
        Ok(Acquired::Replay(replay))
    }

    /// Counts a replay of `key` in the process; its unflushed count, this one included.
    /// Starts the flusher when none runs.
    fn count_hit(&self, key: &StorageKey) -> u64 {
        let pending = self.shared.hits.add(key, 1);
        // Loaded before it is swapped: a running flusher (the usual case under replays)
        // costs a read of a shared cache line, not a write to it. The load is `SeqCst`
        // like the swap, so `HitCounts`'s ordering argument holds: a load that sees the
        // flag set is ordered before the flusher's clearing of it, and so the flusher's
        // check for keys, which follows that clearing, sees this replay's count.
        let running = &self.shared.hits.flusher_running;
        if !running.load(std::sync::atomic::Ordering::SeqCst)
            && !running.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            start_flusher(&self.shared);
        }
        pending
    }

    /// Writes the replay counts this process holds to the store, in one
    /// [`Store::record_hits`] call. A flusher does this by itself within
    /// [`Config::hit_flush_interval`] of a replay; call it at a graceful shutdown so that
    /// no count is lost.
    ///
    /// # Errors
    /// [`Error::Store`] when the store fails; the counts are kept for the next flush.
    pub async fn flush_hits(&self) -> Result<(), Error> {
        Ok(flush_hits(&self.shared).await?)
    }

    /// Runs `operation` once for `key`: the first call runs it and stores its outcome;
    /// every retry within the retention gets the stored outcome back (`replayed: true`).
    ///
    /// The value (and a failure returned as [`Failure::Store`]) is stored as JSON. One
    /// that does not encode is still returned to this caller; retries get
    /// [`Error::NotStored`] rather than running the operation again.
    /// The operation runs inside this future, with its lease renewed as it goes; dropping
    /// the future cancels it and leaves the key to lapse with its lease (see
    /// [`ClaimGuard`]). So a caller-side timeout should not wrap `run` itself: spawn the
    /// `run` (the operation then finishes and stores its result whatever the caller
    /// does) and put the timeout around the join handle, as a server does for a client
    /// that hangs up. `examples/retry_timeout.rs` shows both. If the result cannot be stored (the store is down, or a lapsed
    /// lease was taken over), the value is still returned, since the operation did run,
    /// and the failure is logged and counted in `oncely_unrecorded_total`.
    ///
    /// # Errors
    /// [`RunError::Failed`] with the operation's failure (now or replayed), and
    /// [`RunError::Idempotency`] with what [`acquire`](Self::acquire) can fail with, or a
    /// stored outcome that does not decode as `T`/`E`.
    pub async fn run<T, E, F, Fut>(
        &self,
        key: &IdempotencyKey,
        fingerprint: Option<Fingerprint>,
        operation: F,
    ) -> Result<Executed<T>, RunError<E>>
    where
        T: Serialize + DeserializeOwned,
        E: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, Failure<E>>>,
    {
        let span = tracing::debug_span!("oncely.run", key = %key);
        async move {
            let guard = match self.acquire(key, fingerprint).await? {
                Acquired::Replay(stored) => return replay(&stored),
                Acquired::Execute(guard) => guard,
            };
            match guard.keep_alive(operation()).await {
                Ok(value) => {
                    record_completion(guard, encode(&StoredRef::<T, E>::Ok(&value))).await;
                    Ok(Executed { value, replayed: false })
                }
                Err(Failure::Store(error)) => {
                    self.shared.outcomes.failure_stored.increment(1);
                    record_completion(guard, encode(&StoredRef::<T, E>::Err(&error))).await;
                    Err(RunError::Failed { error, replayed: false })
                }
                Err(Failure::Release(error)) => {
                    self.shared.outcomes.failure_released.increment(1);
                    let key = guard.key().clone();
                    if let Err(e) = guard.release().await {
                        tracing::warn!(%key, error = %e, "release failed; the key stays blocked until its lease lapses");
                    }
                    Err(RunError::Failed { error, replayed: false })
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Message dedup: true the first time `id` is seen in this scope within `window`,
    /// false for every repeat inside it. One atomic store call; no result is stored.
    ///
    /// The mark is set before the message is handled: if handling then fails and the
    /// message should be handled on redelivery, call [`forget_seen`](Self::forget_seen).
    /// For at-most-once-with-result semantics use [`run`](Self::run) instead.
    ///
    /// ```
    /// use oncely::{IdempotencyKey, MemoryStore, Oncely};
    /// use std::time::Duration;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let oncely = Oncely::new(MemoryStore::new());
    /// let id = IdempotencyKey::new("msg-81")?;
    /// assert!(oncely.first_seen(&id, Duration::from_secs(3600)).await?);
    /// assert!(!oncely.first_seen(&id, Duration::from_secs(3600)).await?);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero or absurd window, [`Error::Store`] when the
    /// store fails.
    pub async fn first_seen(&self, id: &IdempotencyKey, window: Duration) -> Result<bool, Error> {
        if window.is_zero() || window > MAX_RETENTION {
            return Err(Error::InvalidArgument(format!(
                "first_seen window {window:?} is outside 0..={MAX_RETENTION:?}"
            )));
        }
        let first = self.shared.store.first_seen(&FirstSeen::new(&self.scope, id, window)).await?;
        let outcomes = &self.shared.outcomes;
        if first { &outcomes.first_seen } else { &outcomes.duplicate_seen }.increment(1);
        Ok(first)
    }
}

/// Reading and deleting records: for stores that offer administration.
impl<S: Store + StoreAdmin> Oncely<S> {
    /// Forgets that `id` was seen, so its next [`first_seen`](Self::first_seen) is true
    /// again: for a consumer whose handling failed after `first_seen` said true and
    /// which wants the redelivery handled. True when there was a mark to remove.
    ///
    /// # Errors
    /// [`Error::Store`] when the store fails.
    pub async fn forget_seen(&self, id: &IdempotencyKey) -> Result<bool, Error> {
        let marker = FirstSeen::new(&self.scope, id, Duration::ZERO);
        Ok(self.shared.store.delete(marker.storage_key()).await?)
    }

    /// The record of `key` in this scope, if any (no hit is counted): a result kept for
    /// the store (see [`DeferredCompletions`]) as it will be stored, else the store's,
    /// with the replays this engine counted and has not flushed yet added to its hits.
    ///
    /// # Errors
    /// [`Error::Store`] when the store fails.
    pub async fn get(&self, key: &IdempotencyKey) -> Result<Option<Record>, Error> {
        let storage_key = self.storage_key(key);
        if let Some(kept) = self.shared.deferred.get(&storage_key) {
            return Ok(Some(kept));
        }
        let mut record = self.shared.store.get(&storage_key).await?;
        if let Some(Record { state: RecordState::Completed { hits, .. }, .. }) = &mut record {
            *hits = hits.saturating_add(self.shared.hits.peek(&storage_key));
        }
        Ok(record)
    }

    /// Deletes the record of `key` in this scope whatever its state, and a result kept
    /// for the store; true when there was one. The next request with the key runs the
    /// operation again.
    ///
    /// # Errors
    /// [`Error::Store`] when the store fails.
    pub async fn delete(&self, key: &IdempotencyKey) -> Result<bool, Error> {
        let storage_key = self.storage_key(key);
        let kept = self.shared.deferred.forget(&storage_key);
        Ok(self.shared.store.delete(&storage_key).await? || kept)
    }
}

/// The stored form of an outcome. The operation has already run, so an outcome that
/// does not encode (a map with non-string keys, say) is stored as an `Unencodable` marker:
/// retries get [`Error::NotStored`], never a second run.
fn encode<T: Serialize, E: Serialize>(outcome: &StoredRef<'_, T, E>) -> Vec<u8> {
    serde_json::to_vec(outcome).unwrap_or_else(|e| {
        tracing::error!(error = %e, "the operation's outcome does not encode as JSON; retries will get NotStored");
        metrics::counter!("oncely_unencodable_total").increment(1);
        let reason = format!("the outcome could not be encoded: {e}");
        serde_json::to_vec(&UnencodableRef::Unencodable(&reason)).unwrap_or_default()
    })
}

fn replay<T: DeserializeOwned, E: DeserializeOwned>(stored: &Replay) -> Result<Executed<T>, RunError<E>> {
    match serde_json::from_slice::<Stored<T, E>>(&stored.payload).map_err(Error::Decode)? {
        Stored::Ok(value) => Ok(Executed { value, replayed: true }),
        Stored::Err(error) => Err(RunError::Failed { error, replayed: true }),
        Stored::Unencodable(reason) => Err(Error::NotStored(reason).into()),
    }
}

async fn record_completion<S: Store>(guard: ClaimGuard<S>, payload: Vec<u8>) {
    let key = guard.key().clone();
    if let Err(e) = guard.complete(Bytes::from(payload)).await {
        tracing::error!(%key, error = %e, "the operation ran but its result could not be stored");
        metrics::counter!("oncely_unrecorded_total").increment(1);
    }
}

/// The lease time left, rounded up to whole seconds, at least one.
fn retry_after(remaining: Duration) -> Duration {
    let secs = remaining.as_secs() + u64::from(remaining.subsec_nanos() > 0);
    Duration::from_secs(secs.max(1))
}

/// Writes the counted hits to the store; a batch the store refuses is kept for the next.
async fn flush_hits<S: Store>(shared: &Shared<S>) -> Result<(), StoreError> {
    let batch = shared.hits.take();
    if batch.is_empty() {
        return Ok(());
    }
    match shared.store.record_hits(&batch).await {
        Ok(()) => {
            metrics::counter!("oncely_hits_flushed_total").increment(batch.len() as u64);
            Ok(())
        }
        Err(e) => {
            shared.hits.restore(&batch);
            Err(e)
        }
    }
}

/// Starts the task that flushes hits every `hit_flush_interval` while any are counted.
/// It holds the engine weakly: a dropped engine's flusher ends (call
/// [`Oncely::flush_hits`] before dropping it). Outside a Tokio runtime none starts, and
/// the next replay inside one tries again.
fn start_flusher<S: Store>(shared: &Arc<Shared<S>>) {
    use std::sync::atomic::Ordering::SeqCst;

    /// Marks the flusher stopped however its task ends (its runtime may drop it).
    struct Running<S>(std::sync::Weak<Shared<S>>, bool);
    impl<S> Running<S> {
        fn disarm(mut self) {
            self.1 = false;
        }
    }
    impl<S> Drop for Running<S> {
        fn drop(&mut self) {
            if let Some(shared) = self.0.upgrade().filter(|_| self.1) {
                shared.hits.flusher_running.store(false, SeqCst);
            }
        }
    }

    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        shared.hits.flusher_running.store(false, SeqCst);
        return;
    };
    let running = Running(Arc::downgrade(shared), true);
    let interval = shared.config.hit_flush_interval;
    runtime.spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let Some(shared) = running.0.upgrade() else { return };
            if let Err(e) = flush_hits(&shared).await {
                tracing::debug!(error = %e, "replay counts not flushed; kept for the next round");
            }
            if shared.hits.is_empty() {
                shared.hits.flusher_running.store(false, SeqCst);
                // A hit counted between the check and the store found the flusher still
                // running and started none: look again, and go on if one did.
                if shared.hits.is_empty() || shared.hits.flusher_running.swap(true, SeqCst) {
                    running.disarm();
                    return;
                }
            }
        }
    });
}

/// Whether a claim prepared against `prepared` is a claim in `scope`: by address first,
/// which is every claim this engine prepared itself, then by content.
fn scope_is(prepared: &Scope, scope: &Scope) -> bool {
    std::ptr::eq(prepared, scope) || prepared == scope
}
