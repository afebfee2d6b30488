//! The store the gateway runs on: opened from its URL by [`oncely_stores::open`] (whose
//! docs list the URLs and their options), and the instrumented wrapper every store is
//! used through.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use metrics::Histogram;
use oncely::store::{Claim, ClaimOutcome, ClaimRequest, DynStore, FirstSeen, Notified, ReplayCache, StoreAdmin};
use oncely::{Record, StorageKey, Store, StoreError, StoreStats};
pub use oncely_stores::{OpenError, OpenedStore, redacted};

use crate::config::ReplayCacheSettings;

/// The store the gateway runs on: chosen at start from a URL, its type erased once
/// ([`DynStore`]), timed by [`Instrumented`], and, when the replay cache is on, behind
/// it ([`ReplayCache`]): a replay answered from memory is no store call and is not
/// timed. One boxed future per store call.
pub type GatewayStore = ReplayCache<Instrumented<DynStore>>;

/// The default store URL.
pub const DEFAULT_STORE: &str = "sqlite://oncely.db";

/// Opens the store a URL names, wrapped so that every call is timed in the
/// `oncely_store_seconds` histogram; its abilities are the store's own.
/// Without a replay cache: for the admin commands, which must read the store itself.
/// The third value says whether the store counts its deletes for other processes, so
/// that their replay caches see a delete made here at once (SQLite).
pub async fn open(url: &str) -> Result<(GatewayStore, oncely::store::StoreAbilities, bool), OpenError> {
    let opened = oncely_stores::open(url).await?;
    let counts_deletes = opened.erasures.is_some();
    Ok((ReplayCache::disabled(Instrumented::new(opened.store)), opened.abilities, counts_deletes))
}

/// [`open`], with the replay cache `cache` configures when it is on for this store
/// ([`ReplayCacheSettings::enabled_for`]). A store that counts its deletes for every
/// process (SQLite) hands the cache that count, so that deletes made elsewhere are seen
/// at once.
pub async fn open_cached(
    url: &str,
    cache: &ReplayCacheSettings,
) -> Result<(GatewayStore, oncely::store::StoreAbilities), OpenError> {
    let opened = oncely_stores::open(url).await?;
    let store = Instrumented::new(opened.store);
    let store = if cache.enabled_for(url, opened.erasures.is_some()) {
        let builder = ReplayCache::builder(store)
            .time_to_live(cache.ttl)
            .max_entries(cache.max_entries)
            .max_bytes(cache.max_bytes);
        match opened.erasures {
            Some(erasures) => builder.erasures(erasures).build(),
            None => builder.build(),
        }
    } else {
        ReplayCache::disabled(store)
    };
    Ok((store, opened.abilities))
}

/// Times every store call into `oncely_store_seconds{op}`, and bounds the request path's
/// calls by [`CALL_TIMEOUT`].
#[derive(Clone, Debug)]
pub struct Instrumented<S> {
    store: S,
    timers: Arc<Timers>,
}

/// One histogram handle per operation, registered when the store is opened (with the
/// metrics recorder installed then), not looked up by label on every call.
#[derive(Debug)]
struct Timers {
    claim: Histogram,
    complete: Histogram,
    release: Histogram,
    touch: Histogram,
    first_seen: Histogram,
    record_hits: Histogram,
    get: Histogram,
    delete: Histogram,
    ping: Histogram,
}

impl<S> Instrumented<S> {
    fn new(store: S) -> Self {
        let op = |op: &'static str| metrics::histogram!("oncely_store_seconds", "op" => op);
        let timers = Timers {
            claim: op("claim"),
            complete: op("complete"),
            release: op("release"),
            touch: op("touch"),
            first_seen: op("first_seen"),
            record_hits: op("record_hits"),
            get: op("get"),
            delete: op("delete"),
            ping: op("ping"),
        };
        Self { store, timers: Arc::new(timers) }
    }
}

/// The longest a request-path store call may take, whatever the store's own timeouts: a
/// connection that went silent (a half-open TCP connection, which no server-side
/// statement timeout notices) answers 503 after this, not after the kernel gives up on it
/// minutes later. Above every store's own bound (PostgreSQL: 5 s to get a connection plus
/// a 5 s statement timeout; Redis: 1 s per command; SQLite: a 5 s busy timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

async fn timed<T>(op: &Histogram, call: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    let started = tokio::time::Instant::now();
    let mut call = std::pin::pin!(call);
    // A call that answers when first polled (memory://, most of all) cannot hang and
    // arms no timer, which would cost a clock read, a runtime look-up and a timer entry
    // on every replay. One that waits is bounded from `started`, as if the timer had been
    // armed before the first poll.
    let result = match std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await {
        Poll::Ready(result) => result,
        Poll::Pending => match tokio::time::timeout_at(started + CALL_TIMEOUT, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::timeout(format!("no answer within {CALL_TIMEOUT:?}"))),
        },
    };
    op.record(started.elapsed().as_secs_f64());
    result
}

impl<S: Store> Store for Instrumented<S> {
    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        timed(&self.timers.claim, self.store.claim(request)).await
    }

    async fn complete(&self, claim: Claim, payload: Bytes, retention: Duration) -> Result<(), StoreError> {
        timed(&self.timers.complete, self.store.complete(claim, payload, retention)).await
    }

    async fn release(&self, claim: Claim) -> Result<(), StoreError> {
        timed(&self.timers.release, self.store.release(claim)).await
    }

    async fn touch(&self, claim: Claim, lease: Duration) -> Result<(), StoreError> {
        timed(&self.timers.touch, self.store.touch(claim, lease)).await
    }

    async fn first_seen(&self, request: &FirstSeen<'_>) -> Result<bool, StoreError> {
        timed(&self.timers.first_seen, self.store.first_seen(request)).await
    }

    async fn record_hits(&self, hits: &[(StorageKey, u64)]) -> Result<(), StoreError> {
        timed(&self.timers.record_hits, self.store.record_hits(hits)).await
    }

    fn subscribe(&self, key: &StorageKey) -> Notified {
        self.store.subscribe(key)
    }
}

/// `get`, `delete` and `ping` are timed and bounded like the request path; `stats`,
/// `purge_expired` and `list` may scan the store and are neither.
impl<S: StoreAdmin> StoreAdmin for Instrumented<S> {
    async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        timed(&self.timers.get, self.store.get(key)).await
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        timed(&self.timers.delete, self.store.delete(key)).await
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.store.purge_expired().await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.store.stats().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        timed(&self.timers.ping, self.store.ping()).await
    }

    async fn list(&self, after: Option<StorageKey>, limit: usize) -> Result<Vec<Record>, StoreError> {
        self.store.list(after, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_store_call_that_never_answers_times_out() {
        let silent = std::future::pending::<Result<(), StoreError>>();
        let started = tokio::time::Instant::now();
        assert!(matches!(timed(&Histogram::noop(), silent).await, Err(StoreError::Timeout(_))));
        assert_eq!(started.elapsed(), CALL_TIMEOUT, "bounded from the call's start");
        let slow = async {
            tokio::time::sleep(CALL_TIMEOUT - Duration::from_millis(1)).await;
            Ok::<_, StoreError>(7)
        };
        assert_eq!(timed(&Histogram::noop(), slow).await.ok(), Some(7), "an answer within the bound is kept");
    }

    #[tokio::test]
    async fn the_store_is_instrumented_and_states_its_abilities() {
        let (store, abilities, counts_deletes) = open("memory://?max_entries=3").await.expect("memory://");
        assert!(abilities.counts_records_cheaply);
        assert!(!counts_deletes, "one process: nobody else to tell");
        store.ping().await.expect("ping through the wrapper");
        let error = open("memory://?max_entries=0").await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.starts_with("memory://?max_entries=0: `max_entries`"), "{error}");
    }
}
