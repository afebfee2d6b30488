//! The store the gateway runs on: opened from its URL by [`oncely_stores::open`] (whose
//! docs list the URLs and their options), and the instrumented wrapper every store is
//! used through.

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use oncely::store::{Claim, ClaimOutcome, ClaimRequest, DynStore, FirstSeen, Notified, StoreAdmin};
use oncely::{Record, StorageKey, Store, StoreError, StoreStats};
pub use oncely_stores::{OpenError, OpenedStore, redacted};

/// The store the gateway runs on: chosen at start from a URL, its type erased once
/// ([`DynStore`]), and timed by [`Instrumented`]. One boxed future per store call.
pub type GatewayStore = Instrumented<DynStore>;

/// The default store URL.
pub const DEFAULT_STORE: &str = "sqlite://oncely.db";

/// Opens the store a URL names, wrapped so that every call is timed in the
/// `oncely_store_seconds` histogram; its abilities are the store's own.
pub async fn open(url: &str) -> Result<(GatewayStore, oncely::store::StoreAbilities), OpenError> {
    let opened = oncely_stores::open(url).await?;
    Ok((Instrumented(opened.store), opened.abilities))
}

/// Times every store call into `oncely_store_seconds{op}`, and bounds the request path's
/// calls by [`CALL_TIMEOUT`].
#[derive(Clone, Debug)]
pub struct Instrumented<S>(S);

/// The longest a request-path store call may take, whatever the store's own timeouts: a
/// connection that went silent (a half-open TCP connection, which no server-side
/// statement timeout notices) answers 503 after this, not after the kernel gives up on it
/// minutes later. Above every store's own bound (PostgreSQL: 5 s to get a connection plus
/// a 5 s statement timeout; Redis: 1 s per command; SQLite: a 5 s busy timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

async fn timed<T>(op: &'static str, call: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::timeout(format!("no answer within {CALL_TIMEOUT:?}"))),
    };
    metrics::histogram!("oncely_store_seconds", "op" => op).record(started.elapsed().as_secs_f64());
    result
}

impl<S: Store> Store for Instrumented<S> {
    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        timed("claim", self.0.claim(request)).await
    }

    async fn complete(&self, claim: Claim, payload: Bytes, retention: Duration) -> Result<(), StoreError> {
        timed("complete", self.0.complete(claim, payload, retention)).await
    }

    async fn release(&self, claim: Claim) -> Result<(), StoreError> {
        timed("release", self.0.release(claim)).await
    }

    async fn touch(&self, claim: Claim, lease: Duration) -> Result<(), StoreError> {
        timed("touch", self.0.touch(claim, lease)).await
    }

    async fn first_seen(&self, request: &FirstSeen<'_>) -> Result<bool, StoreError> {
        timed("first_seen", self.0.first_seen(request)).await
    }

    async fn record_hits(&self, hits: &[(StorageKey, u64)]) -> Result<(), StoreError> {
        timed("record_hits", self.0.record_hits(hits)).await
    }

    fn subscribe(&self, key: &StorageKey) -> Notified {
        self.0.subscribe(key)
    }
}

/// `get`, `delete` and `ping` are timed and bounded like the request path; `stats`,
/// `purge_expired` and `list` may scan the store and are neither.
impl<S: StoreAdmin> StoreAdmin for Instrumented<S> {
    async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        timed("get", self.0.get(key)).await
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        timed("delete", self.0.delete(key)).await
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.0.purge_expired().await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.0.stats().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        timed("ping", self.0.ping()).await
    }

    async fn list(&self, after: Option<StorageKey>, limit: usize) -> Result<Vec<Record>, StoreError> {
        self.0.list(after, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_store_call_that_never_answers_times_out() {
        let silent = std::future::pending::<Result<(), StoreError>>();
        assert!(matches!(timed("claim", silent).await, Err(StoreError::Timeout(_))));
    }

    #[tokio::test]
    async fn the_store_is_instrumented_and_states_its_abilities() {
        let (store, abilities) = open("memory://?max_entries=3").await.expect("memory://");
        assert!(abilities.counts_records_cheaply);
        store.ping().await.expect("ping through the wrapper");
        let error = open("memory://?max_entries=0").await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.starts_with("memory://?max_entries=0: `max_entries`"), "{error}");
    }
}
