//! The SQLite store passes the store conformance suite, in both durability modes and with
//! claims' look-ups on the caller's thread, each test on a fresh database file in a
//! temporary directory.

use std::time::Duration;

use bytes::Bytes;
use oncely::store::{Claim, ClaimOutcome, ClaimRequest, FirstSeen, Notified, StoreAdmin, StoreStats};
use oncely::{Record, StorageKey, Store, StoreError};
use oncely_sqlite::{Durability, SqliteOptions, SqliteStore};
use tempfile::TempDir;

/// A store on a database in its own temporary directory, removed when the store is
/// dropped (the store's fields drop in order: the store first, closing the file).
struct TempStore {
    store: SqliteStore,
    _dir: TempDir,
}

fn temp_store(durability: Durability) -> TempStore {
    temp_store_with(SqliteOptions::default().durability(durability))
}

fn temp_store_with(options: SqliteOptions) -> TempStore {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = SqliteStore::open(dir.path().join("oncely.db"), options).expect("the store opens");
    TempStore { store, _dir: dir }
}

impl Store for TempStore {
    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        self.store.claim(request).await
    }

    async fn complete(&self, claim: Claim, payload: Bytes, retention: Duration) -> Result<(), StoreError> {
        self.store.complete(claim, payload, retention).await
    }

    async fn release(&self, claim: Claim) -> Result<(), StoreError> {
        self.store.release(claim).await
    }

    async fn touch(&self, claim: Claim, lease: Duration) -> Result<(), StoreError> {
        self.store.touch(claim, lease).await
    }

    async fn first_seen(&self, request: &FirstSeen<'_>) -> Result<bool, StoreError> {
        self.store.first_seen(request).await
    }

    async fn record_hits(&self, hits: &[(StorageKey, u64)]) -> Result<(), StoreError> {
        self.store.record_hits(hits).await
    }

    fn subscribe(&self, key: &StorageKey) -> Notified {
        self.store.subscribe(key)
    }
}

impl StoreAdmin for TempStore {
    async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        self.store.get(key).await
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        self.store.delete(key).await
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.store.purge_expired().await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.store.stats().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    async fn list(&self, after: Option<StorageKey>, limit: usize) -> Result<Vec<Record>, StoreError> {
        self.store.list(after, limit).await
    }
}

/// Sync mode: every completion fsynced before it is acknowledged.
mod sync {
    oncely_testkit::store_conformance!(async { super::temp_store(oncely_sqlite::Durability::Sync) });
}

/// Relaxed mode: the WAL synced every 100 ms.
mod relaxed {
    oncely_testkit::store_conformance!(async {
        super::temp_store(oncely_sqlite::Durability::Relaxed { interval: std::time::Duration::from_millis(100) })
    });
}

/// Sync mode, with each claim's look-up on the caller's thread when a reader's connection
/// is free (`SqliteOptions::inline_look_ups`).
mod inline_look_ups {
    oncely_testkit::store_conformance!(async {
        super::temp_store_with(oncely_sqlite::SqliteOptions::default().inline_look_ups(true))
    });
}
