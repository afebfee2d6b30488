//! [`DynStore`]: a store whose type is chosen at run time, erased once.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{Claim, ClaimOutcome, ClaimRequest, FirstSeen, Notified, Store, StoreAdmin, StoreStats};
use crate::{Record, StorageKey, StoreError};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Any store behind one type, for code that picks its store at run time (from a URL, a
/// configuration file): the gateway, the CLI, `oncely_stores::open`.
///
/// In the spirit of tower's `BoxCloneService`: the store is wrapped once, each call
/// boxes one future, and cloning shares the store. Generic code (`Oncely<S>`) should take
/// the store's own type instead and pay no box at all.
///
/// ```
/// use oncely::store::DynStore;
/// use oncely::{IdempotencyKey, MemoryStore, Oncely};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = if std::env::var_os("ONCELY_BOUNDED").is_some() {
///     DynStore::new(MemoryStore::builder().max_entries(1_000).build())
/// } else {
///     DynStore::new(MemoryStore::new())
/// };
/// let oncely = Oncely::new(store);
/// assert!(oncely.first_seen(&IdempotencyKey::new("msg-1")?, std::time::Duration::from_secs(60)).await?);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DynStore(Arc<dyn Erased>);

impl DynStore {
    /// Erases `store`'s type.
    pub fn new<S: Store + StoreAdmin>(store: S) -> Self {
        Self(Arc::new(store))
    }
}

impl fmt::Debug for DynStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynStore").finish_non_exhaustive()
    }
}

/// The object-safe form of [`Store`] + [`StoreAdmin`]: every future boxed.
trait Erased: Send + Sync + 'static {
    fn claim<'a>(&'a self, request: &'a ClaimRequest<'_>) -> BoxFuture<'a, ClaimOutcome>;
    fn complete(&self, claim: Claim, payload: Bytes, retention: Duration) -> BoxFuture<'_, ()>;
    fn release(&self, claim: Claim) -> BoxFuture<'_, ()>;
    fn touch(&self, claim: Claim, lease: Duration) -> BoxFuture<'_, ()>;
    fn first_seen<'a>(&'a self, request: &'a FirstSeen<'_>) -> BoxFuture<'a, bool>;
    fn record_hits<'a>(&'a self, hits: &'a [(StorageKey, u64)]) -> BoxFuture<'a, ()>;
    fn subscribe(&self, key: &StorageKey) -> Notified;
    fn get<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Option<Record>>;
    fn delete<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, bool>;
    fn purge_expired(&self) -> BoxFuture<'_, u64>;
    fn stats(&self) -> BoxFuture<'_, StoreStats>;
    fn ping(&self) -> BoxFuture<'_, ()>;
    fn list(&self, after: Option<StorageKey>, limit: usize) -> BoxFuture<'_, Vec<Record>>;
}

impl<S: Store + StoreAdmin> Erased for S {
    fn claim<'a>(&'a self, request: &'a ClaimRequest<'_>) -> BoxFuture<'a, ClaimOutcome> {
        Box::pin(Store::claim(self, request))
    }
    fn complete(&self, claim: Claim, payload: Bytes, retention: Duration) -> BoxFuture<'_, ()> {
        Box::pin(Store::complete(self, claim, payload, retention))
    }
    fn release(&self, claim: Claim) -> BoxFuture<'_, ()> {
        Box::pin(Store::release(self, claim))
    }
    fn touch(&self, claim: Claim, lease: Duration) -> BoxFuture<'_, ()> {
        Box::pin(Store::touch(self, claim, lease))
    }
    fn first_seen<'a>(&'a self, request: &'a FirstSeen<'_>) -> BoxFuture<'a, bool> {
        Box::pin(Store::first_seen(self, request))
    }
    fn record_hits<'a>(&'a self, hits: &'a [(StorageKey, u64)]) -> BoxFuture<'a, ()> {
        Box::pin(Store::record_hits(self, hits))
    }
    fn subscribe(&self, key: &StorageKey) -> Notified {
        Store::subscribe(self, key)
    }
    fn get<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Option<Record>> {
        Box::pin(StoreAdmin::get(self, key))
    }
    fn delete<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, bool> {
        Box::pin(StoreAdmin::delete(self, key))
    }
    fn purge_expired(&self) -> BoxFuture<'_, u64> {
        Box::pin(StoreAdmin::purge_expired(self))
    }
    fn stats(&self) -> BoxFuture<'_, StoreStats> {
        Box::pin(StoreAdmin::stats(self))
    }
    fn ping(&self) -> BoxFuture<'_, ()> {
        Box::pin(StoreAdmin::ping(self))
    }
    fn list(&self, after: Option<StorageKey>, limit: usize) -> BoxFuture<'_, Vec<Record>> {
        Box::pin(StoreAdmin::list(self, after, limit))
    }
}

impl Store for DynStore {
    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        self.0.claim(request).await
    }
    async fn complete(&self, claim: Claim, payload: Bytes, retention: Duration) -> Result<(), StoreError> {
        self.0.complete(claim, payload, retention).await
    }
    async fn release(&self, claim: Claim) -> Result<(), StoreError> {
        self.0.release(claim).await
    }
    async fn touch(&self, claim: Claim, lease: Duration) -> Result<(), StoreError> {
        self.0.touch(claim, lease).await
    }
    async fn first_seen(&self, request: &FirstSeen<'_>) -> Result<bool, StoreError> {
        self.0.first_seen(request).await
    }
    async fn record_hits(&self, hits: &[(StorageKey, u64)]) -> Result<(), StoreError> {
        self.0.record_hits(hits).await
    }
    fn subscribe(&self, key: &StorageKey) -> Notified {
        self.0.subscribe(key)
    }
}

impl StoreAdmin for DynStore {
    async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        self.0.get(key).await
    }
    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        self.0.delete(key).await
    }
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.0.purge_expired().await
    }
    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.0.stats().await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.0.ping().await
    }
    async fn list(&self, after: Option<StorageKey>, limit: usize) -> Result<Vec<Record>, StoreError> {
        self.0.list(after, limit).await
    }
}
