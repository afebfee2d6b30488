//! A Redis/Valkey [`Store`] for Oncely, on a standalone server or a Redis Cluster.
//!
//! Several instances of an API (or of the `oncely` gateway) that share one Redis keep
//! every promise of the store contract across processes: among any number of concurrent
//! duplicates in any number of processes, exactly one runs.
//!
//! ```no_run
//! use oncely::Oncely;
//! use oncely_redis::RedisStore;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::open("redis://127.0.0.1:6379?prefix=payments").await?;
//! // or: RedisStore::open("redis+cluster://10.0.0.1:7000,10.0.0.2:7000,10.0.0.3:7000").await?
//! let oncely = Oncely::new(store);
//! # let _ = oncely;
//! # Ok(())
//! # }
//! ```
//!
//! # How it keeps the contract
//!
//! - **One script call per state change.** Claim (create, take over a lapsed lease, count a
//!   hit, or return the existing record), complete, release and touch are each one Lua
//!   script run with `EVALSHA`; Redis runs a script to its end before serving anything
//!   else, so each is atomic. The scripts are loaded once at connect and reloaded
//!   automatically on `NOSCRIPT` (a restarted or failed-over server). See [`scripts`].
//! - **Round trips.** A new operation costs two (claim, complete), a replay one: the hit is
//!   counted inside the claim script. `tests/redis_store.rs` proves it with
//!   `INFO commandstats`.
//! - **Time** comes from `TIME` inside the scripts, never from the client's clock.
//! - **Fencing.** complete/release/touch compare the record's claim id inside the script.
//! - **Expiry.** Every script treats a record past its `expires_at` as absent; the record's
//!   `PEXPIREAT` at that instant is only garbage collection, so [`Store::purge_expired`]
//!   has nothing to do and answers 0.
//! - **Cluster.** A record is one hash, `PREFIX:{<storage key hex>}`, and its wake-up
//!   channel is `PREFIX:{<storage key hex>}:w`: the hash tag puts both in one slot, so
//!   every script runs on one node and `MOVED` redirections are followed by the client.
//! - **Waiting.** The scripts publish on the channel when a record is completed, released,
//!   deleted or taken over (`PUBLISH`, or sharded `SPUBLISH` on Cluster), and
//!   [`Store::subscribe`] subscribes (`SSUBSCRIBE` on Cluster) for as long as a task waits.
//!   A lost message only delays a waiter until the engine's poll.
//! - **Failures.** A refused connection, a timeout, `READONLY` (a replica after failover),
//!   `OOM`, `CLUSTERDOWN`, `LOADING` … are all [`StoreError::Unavailable`]: the HTTP
//!   layer answers 503, and nothing is reported as executed that was not.
//!
//! # The client
//!
//! [`redis`](https://docs.rs/redis) (redis-rs) 1.x: the most used Rust client, maintained
//! by the Redis organisation, with a multiplexed connection that reconnects by itself
//! ([`ConnectionManager`](redis::aio::ConnectionManager)), an async Cluster client that
//! follows `MOVED`/`ASK` and supports sharded pub/sub, a response timeout on every
//! command, and `Script`, which does the `EVALSHA`-then-`NOSCRIPT`-reload dance. `fred`
//! would also have served; redis-rs is the one more users already depend on.
//!
//! # Persistence: what Redis can lose
//!
//! Records are only as durable as Redis is configured to be. Run the store's Redis with:
//!
//! ```text
//! appendonly yes
//! appendfsync everysec      # or `always`: every write fsynced before the reply
//! maxmemory-policy noeviction
//! ```
//!
//! - **`maxmemory-policy noeviction`** is required. Any evicting policy may delete a
//!   completed record before its retention ends, and the next retry then runs the
//!   operation again. With `noeviction` a full Redis answers `OOM`, which is a 503.
//! - **`appendfsync everysec`** (Redis's default with AOF): a crash of the Redis *machine*
//!   (or of the process before the background fsync) loses up to about one second of
//!   acknowledged writes. A lost claim means a concurrent duplicate arriving after the
//!   restart can run while the first is still running; a lost completion means a retry
//!   runs the operation a second time. `appendfsync always` closes this window at the
//!   cost of an fsync per write; `appendonly no` with RDB snapshots widens it to the
//!   snapshot interval, and no persistence at all loses everything on restart.
//! - **Failover** (Sentinel or Cluster): replication is asynchronous, so writes
//!   acknowledged by the old primary but not yet replicated are lost when a replica is
//!   promoted: the same two consequences as above, for the replication lag (usually
//!   milliseconds). `WAIT`/`WAITAOF` after each write would narrow this; the store does not
//!   issue them because they cost a round trip each. A client still talking to a demoted
//!   primary gets `READONLY`, which is a 503, never a silent success.
//!
//! If an operation must never run twice even across these failures, use a store whose
//! acknowledgement is a durable commit (SQLite in sync mode, PostgreSQL).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use oncely::store::Notified;
use oncely::{
    ClaimId, ClaimOutcome, ClaimRequest, IdempotencyKey, Record, Scope, StorageKey, Store, StoreError, StoreStats,
};
use redis::{RedisError, Value};

mod codec;
mod connection;
pub mod scripts;
mod waiters;
/// Fuzzing only: decodes a claim script's reply, records included.
#[cfg(fuzzing)]
#[doc(hidden)]
pub fn fuzz_claim_outcome(key: &StorageKey, reply: Value) -> Result<ClaimOutcome, StoreError> {
    codec::claim_outcome(key, reply)
}

pub use connection::Topology;

use connection::Connection;
use scripts::*;
use waiters::Waiters;

/// How admin scans ([`Store::stats`], [`Store::list`]) read records: this many at once.
const SCAN_CONCURRENCY: usize = 32;

/// Settings of a [`RedisStore`].
///
/// ```
/// use std::time::Duration;
/// use oncely_redis::RedisOptions;
///
/// let options = RedisOptions::default().prefix("payments").unwrap().response_timeout(Duration::from_millis(500));
/// assert_eq!(options.prefix_str(), "payments");
/// ```
#[derive(Clone, Debug)]
pub struct RedisOptions {
    prefix: String,
    pub(crate) response_timeout: Duration,
    pub(crate) connection_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            prefix: "oncely".into(),
            response_timeout: Duration::from_secs(1),
            connection_timeout: Duration::from_secs(1),
        }
    }
}

impl RedisOptions {
    /// The key prefix, so that several stores (or applications) share one Redis: records
    /// are `PREFIX:{…}`. Letters, digits and `_-.:` only, at most 64 characters; default
    /// `oncely`.
    ///
    /// # Errors
    /// [`OpenError::InvalidUrl`] for an empty, long or otherwise unusable prefix (a `{`
    /// would move the hash tag, a `*` would break the admin scan pattern).
    pub fn prefix(mut self, prefix: &str) -> Result<Self, OpenError> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 64
            && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
        if !valid {
            return Err(OpenError::InvalidUrl(format!(
                "prefix {prefix:?}: use 1 to 64 letters, digits or _-.: characters"
            )));
        }
        self.prefix = prefix.to_string();
        Ok(self)
    }

    /// The key prefix in use.
    pub fn prefix_str(&self) -> &str {
        &self.prefix
    }

    /// How long any one command may take before it fails as unavailable (default 1 s).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long a connection attempt may take (default 1 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The URL or an option in it is malformed.
    #[error("invalid Redis store URL: {0}")]
    InvalidUrl(String),
    /// The server (or no node of the cluster) could be reached, or refused the scripts.
    #[error("cannot connect to Redis: {0}")]
    Connect(#[source] RedisError),
    /// The server lacks something the store needs.
    #[error("this Redis cannot hold the store: {0}")]
    Unsupported(&'static str),
}

/// The Redis/Valkey store. Cloning is cheap and clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    connection: Connection,
    prefix: Arc<str>,
    waiters: Arc<Waiters>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("cluster", &self.connection.is_cluster())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Opens a store from a URL; see [`Topology::parse`] for the grammar.
    ///
    /// # Errors
    /// [`OpenError`] for a bad URL or an unreachable server.
    pub async fn open(url: &str) -> Result<Self, OpenError> {
        let (topology, options) = Topology::parse(url)?;
        Self::connect(&topology, options).await
    }

    /// Connects, and loads the scripts on every primary.
    ///
    /// # Errors
    /// [`OpenError::Connect`] when no connection can be made or the scripts cannot be
    /// loaded.
    pub async fn connect(topology: &Topology, options: RedisOptions) -> Result<Self, OpenError> {
        let waiters = Arc::new(Waiters::default());
        let dispatch = waiters.clone();
        let push = move |push: redis::PushInfo| {
            dispatch.dispatch(push);
            Ok::<(), redis::aio::SendError>(())
        };
        let connection = Connection::open(topology, &options, push).await?;
        let store = RedisStore { connection, prefix: options.prefix.into(), waiters };
        store.check_server().await?;
        // Loaded once here (on Cluster, `SCRIPT LOAD` goes to every primary); later
        // `NOSCRIPT` answers reload them on demand.
        for script in scripts::all() {
            store.connection.load(script).await.map_err(OpenError::Connect)?;
        }
        Ok(store)
    }

    /// Refuses a Cluster without sharded pub/sub (before Redis 7.0 a script's `SPUBLISH`
    /// would fail after its writes), and warns when the server may evict records.
    async fn check_server(&self) -> Result<(), OpenError> {
        if self.connection.is_cluster() {
            let info = self
                .connection
                .query(redis::cmd("COMMAND").arg("INFO").arg("SPUBLISH"))
                .await
                .map_err(OpenError::Connect)?;
            let known = matches!(&info, Value::Array(entries) if entries.first().is_some_and(|e| *e != Value::Nil));
            if !known {
                return Err(OpenError::Unsupported("the cluster has no SPUBLISH: Redis 7.0 or Valkey 7.2 is required"));
            }
        }
        if let Ok(info) = self.connection.query(redis::cmd("INFO").arg("memory")).await {
            fn text(value: Value) -> String {
                match value {
                    Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                    Value::VerbatimString { text, .. } => text,
                    // On Cluster: one answer per node.
                    Value::Map(nodes) => nodes.into_iter().map(|(_, v)| text(v) + "\n").collect(),
                    _ => String::new(),
                }
            }
            let text = text(info);
            if let Some(policy) = text.split(['\r', '\n']).find_map(|l| l.strip_prefix("maxmemory_policy:"))
                && policy.trim() != "noeviction"
            {
                tracing::warn!(
                    policy = policy.trim(),
                    "Redis may evict records before their retention ends (a retry would then run the operation \
                     again); set maxmemory-policy noeviction"
                );
            }
        }
        Ok(())
    }

    /// The key prefix records live under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis key of a record: `PREFIX:{hex}`; the braces are the Cluster hash tag.
    pub fn record_key(&self, key: &StorageKey) -> String {
        format!("{}:{{{}}}", self.prefix, key.to_hex())
    }

    /// The channel a record's changes are published on: `PREFIX:{hex}:w`, in the record's
    /// slot.
    pub fn channel(&self, key: &StorageKey) -> String {
        format!("{}:{{{}}}:w", self.prefix, key.to_hex())
    }

    fn mode(&self) -> &'static str {
        if self.connection.is_cluster() { "s" } else { "p" }
    }

    /// Runs `script` on the record at `key`, its only `KEYS`; the channel and the pub/sub
    /// mode follow the script's own arguments.
    async fn run(
        &self,
        script: &redis::Script,
        key: &StorageKey,
        args: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) -> Result<Value, StoreError> {
        let mut invocation = script.key(self.record_key(key));
        args(&mut invocation);
        invocation.arg(self.channel(key)).arg(self.mode());
        self.connection.invoke(&invocation).await.map_err(unavailable)
    }

    /// Whether a live in-progress record is at `key` (one script call).
    async fn state(&self, key: &StorageKey) -> Result<Option<u8>, StoreError> {
        let value = self.run(&STATE_SCRIPT, key, |_| {}).await?;
        match value {
            Value::BulkString(state) => Ok(state.first().copied()),
            Value::Nil => Ok(None),
            other => Err(StoreError::Corrupt(format!("unexpected state reply {other:?}"))),
        }
    }

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
                let reply = self.connection.query_node(cmd, &host, port).await.map_err(unavailable)?;
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
        let reply = self.connection.query(&redis::cmd("CLUSTER").arg("NODES").clone()).await.map_err(unavailable)?;
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
}

/// A client error is "unavailable": whether the command took effect is unknown, and the
/// HTTP layer answers 503 (connection refused or reset, timeouts, `READONLY`, `OOM`,
/// `CLUSTERDOWN`, `TRYAGAIN`, `LOADING`, `MASTERDOWN`). Except `WRONGTYPE`: something else
/// wrote a value of another type at a record's key, which no retry mends; that is a
/// corrupt record (still refused by the HTTP layer, but not as the store being down).
fn unavailable(error: RedisError) -> StoreError {
    if error.code() == Some("WRONGTYPE") {
        return StoreError::Corrupt(format!("a record's key holds another kind of value: {error}"));
    }
    StoreError::unavailable(error)
}

fn lease_lost_unless(held: bool) -> Result<(), StoreError> {
    if held { Ok(()) } else { Err(StoreError::LeaseLost) }
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        let (lease, retention) = (codec::millis(request.lease)?, codec::millis(request.retention)?);
        let fingerprint: &[u8] = match &request.fingerprint {
            Some(fingerprint) => fingerprint.as_bytes(),
            None => b"",
        };
        let reply = self
            .run(&CLAIM_SCRIPT, &request.storage_key, |i| {
                i.arg(&request.claim_id.to_bytes()[..])
                    .arg(fingerprint)
                    .arg(request.key.as_str())
                    .arg(request.scope.as_str())
                    .arg(lease)
                    .arg(retention);
            })
            .await?;
        codec::claim_outcome(&request.storage_key, reply)
    }

    async fn complete(
        &self,
        key: &StorageKey,
        claim_id: ClaimId,
        payload: Bytes,
        retention: Duration,
    ) -> Result<(), StoreError> {
        let retention = codec::millis(retention)?;
        let reply = self
            .run(&COMPLETE_SCRIPT, key, |i| {
                i.arg(&claim_id.to_bytes()[..]).arg(&payload[..]).arg(retention);
            })
            .await?;
        lease_lost_unless(codec::flag(reply)?)
    }

    async fn release(&self, key: &StorageKey, claim_id: ClaimId) -> Result<(), StoreError> {
        let reply = self.run(&RELEASE_SCRIPT, key, |i| {
            i.arg(&claim_id.to_bytes()[..]);
        });
        lease_lost_unless(codec::flag(reply.await?)?)
    }

    async fn touch(&self, key: &StorageKey, claim_id: ClaimId, lease: Duration) -> Result<(), StoreError> {
        let lease = codec::millis(lease)?;
        let reply = self.run(&TOUCH_SCRIPT, key, |i| {
            i.arg(&claim_id.to_bytes()[..]).arg(lease);
        });
        lease_lost_unless(codec::flag(reply.await?)?)
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        let fields = codec::array(self.run(&GET_SCRIPT, key, |_| {}).await?)?;
        if fields.is_empty() { Ok(None) } else { codec::record(key, fields).map(Some) }
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        codec::flag(self.run(&DELETE_SCRIPT, key, |_| {}).await?)
    }

    /// Redis removes each record itself at its `expires_at` (`PEXPIREAT`, on the same clock
    /// the scripts read), so there is nothing to purge: answers 0.
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Scans the key space: an admin call, not for the request path.
    async fn stats(&self) -> Result<StoreStats, StoreError> {
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

    /// `PING` (on Cluster, every node): never a scan.
    async fn ping(&self) -> Result<(), StoreError> {
        self.connection.query(&redis::cmd("PING")).await.map(|_| ()).map_err(unavailable)
    }

    async fn first_seen(
        &self,
        storage_key: &StorageKey,
        key: &IdempotencyKey,
        scope: &Scope,
        window: Duration,
    ) -> Result<bool, StoreError> {
        let window = codec::millis(window)?;
        // Tells a re-delivery of this call (the Cluster client resends after a dropped
        // connection) from another delivery of the same message id.
        let token = ClaimId::random().to_bytes();
        let reply = self.run(&FIRST_SEEN_SCRIPT, storage_key, |i| {
            i.arg(key.as_str()).arg(scope.as_str()).arg(window).arg(&token[..]);
        });
        codec::flag(reply.await?)
    }

    /// Scans the key space and sorts it: an admin call, not for the request path.
    async fn list(&self, after: Option<StorageKey>, limit: usize) -> Result<Vec<Record>, StoreError> {
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

    /// Subscribes to the record's channel, then checks the record once more: a change
    /// made after this method returned either happened before the subscription was active
    /// (the check sees it and the future resolves) or is published after (the message
    /// wakes it). Resolves at once when nothing is in progress, and never resolves if the
    /// subscription fails (the engine's poll takes over).
    fn subscribe(&self, key: &StorageKey) -> Notified {
        let store = self.clone();
        let key = *key;
        let channel = self.channel(&key).into_bytes();
        let registration = self.waiters.register(channel, self.connection.clone());
        Box::pin(async move {
            let notified = registration.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Err(error) = registration.subscribe().await {
                tracing::debug!(%error, "subscribing to a wake-up channel failed; waiting falls back to polling");
                return std::future::pending().await;
            }
            if let Ok(Some(b'p')) = store.state(&key).await {
                notified.await;
            }
        })
    }
}
