//! Administration by scanning: [`StoreAdmin::stats`] and [`StoreAdmin::list`] read the whole key
//! space (`SCAN` on the server, or on each primary of a cluster), so they are for admin
//! tools, never for the request path.

use futures_util::{StreamExt, TryStreamExt};
use oncely::store::StoreAdmin;
use oncely::{Record, StorageKey, StoreError, StoreStats};

use crate::RedisStore;
use crate::connection::Connection;
use crate::store::store_error;

/// How admin scans ([`StoreAdmin::stats`], [`StoreAdmin::list`]) read records: this many at once.
const SCAN_CONCURRENCY: usize = 32;

impl RedisStore {
    /// Every storage key under this store's prefix: `SCAN` on the server, or on each
    /// primary of the cluster. For admin calls only: it reads the whole key space.
    async fn scan(&self) -> Result<Vec<StorageKey>, StoreError> {
        let pattern = format!("{}:{{*}}", self.prefix);
        let nodes = match &self.connection {
            Connection::Standalone(_) => vec![(String::new(), 0)],
            Connection::Cluster(_) => self.primaries().await?,
        };
        let mut keys = Vec::new();
        for (host, port) in nodes {
            let mut cursor: u64 = 0;
            loop {
                let cmd = redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000).clone();
                let reply = self.connection.query_node(cmd, &host, port).await.map_err(store_error)?;
                let (next, batch): (u64, Vec<Vec<u8>>) =
                    redis::from_redis_value(reply).map_err(|e| StoreError::Corrupt(format!("SCAN reply: {e}")))?;
                keys.extend(batch.iter().filter_map(|name| self.storage_key_of(name)));
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        keys.sort_unstable();
        keys.dedup();
        Ok(keys)
    }

    fn storage_key_of(&self, name: &[u8]) -> Option<StorageKey> {
        let name = std::str::from_utf8(name).ok()?;
        let hex = name.strip_prefix(&*self.prefix)?.strip_prefix(":{")?.strip_suffix('}')?;
        StorageKey::from_hex(hex)
    }

    /// The primaries of the cluster, from `CLUSTER NODES`.
    async fn primaries(&self) -> Result<Vec<(String, u16)>, StoreError> {
        let reply = self.connection.query(&redis::cmd("CLUSTER").arg("NODES").clone()).await.map_err(store_error)?;
        let text: String =
            redis::from_redis_value(reply).map_err(|e| StoreError::Corrupt(format!("CLUSTER NODES reply: {e}")))?;
        let mut primaries = Vec::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(address), Some(flags)) = (fields.get(1), fields.get(2)) else { continue };
            if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                continue;
            }
            let address = address.split('@').next().unwrap_or(address);
            if let Some((host, port)) = address.rsplit_once(':')
                && let Ok(port) = port.parse()
            {
                primaries.push((host.to_string(), port));
            }
        }
        Ok(primaries)
    }

    /// [`StoreAdmin::stats`]: the state of every record, read [`SCAN_CONCURRENCY`] at a time.
    pub(crate) async fn stats_by_scan(&self) -> Result<StoreStats, StoreError> {
        let keys = self.scan().await?;
        let states: Vec<Option<u8>> = futures_util::stream::iter(keys)
            .map(|key| {
                let store = self.clone();
                async move { store.state(&key).await }
            })
            .buffer_unordered(SCAN_CONCURRENCY)
            .try_collect()
            .await?;
        let mut stats = StoreStats::default();
        for state in states.into_iter().flatten() {
            stats.records += 1;
            match state {
                b'p' => stats.in_progress += 1,
                _ => stats.completed += 1,
            }
        }
        Ok(stats)
    }

    /// [`StoreAdmin::list`]: the storage keys sorted, then the records after `after` read
    /// [`SCAN_CONCURRENCY`] at a time.
    pub(crate) async fn list_by_scan(
        &self,
        after: Option<StorageKey>,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let keys = self.scan().await?;
        let start = after.map_or(0, |after| keys.partition_point(|k| *k <= after));
        let mut records = Vec::new();
        for chunk in keys[start..].chunks(limit.max(1)) {
            let found: Vec<Option<Record>> = futures_util::stream::iter(chunk.to_vec())
                .map(|key| {
                    let store = self.clone();
                    async move { store.get(&key).await }
                })
                .buffered(SCAN_CONCURRENCY)
                .try_collect()
                .await?;
            records.extend(found.into_iter().flatten());
            if records.len() >= limit {
                break;
            }
        }
        records.truncate(limit);
        Ok(records)
    }
}
