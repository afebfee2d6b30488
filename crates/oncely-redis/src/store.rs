//! The store on the request path: [`RedisStore`], its connection and key naming, and
//! its [`Store`] implementation, one script call per state change.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use oncely::store::Notified;
use oncely::{
    ClaimId, ClaimOutcome, ClaimRequest, IdempotencyKey, Record, Scope, StorageKey, Store, StoreError, StoreStats,
};
use redis::{RedisError, Value};

use crate::codec;
use crate::connection::Connection;
use crate::scripts::{self, *};
use crate::subscriptions::Subscriptions;
use crate::{OpenError, RedisOptions, Topology};

/// The Redis/Valkey store. Cloning is cheap and clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    pub(crate) connection: Connection,
    pub(crate) prefix: Arc<str>,
    subscriptions: Arc<Subscriptions>,
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
        let subscriptions = Arc::new(Subscriptions::default());
        let dispatch = subscriptions.clone();
        let push = move |push: redis::PushInfo| {
            dispatch.dispatch(push);
            Ok::<(), redis::aio::SendError>(())
        };
        let connection = Connection::open(topology, &options, push).await?;
        let store = RedisStore { connection, prefix: options.prefix.into(), subscriptions };
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
        self.connection.invoke(&invocation).await.map_err(store_error)
    }

    /// Whether a live in-progress record is at `key` (one script call).
    pub(crate) async fn state(&self, key: &StorageKey) -> Result<Option<u8>, StoreError> {
        let value = self.run(&STATE_SCRIPT, key, |_| {}).await?;
        match value {
            Value::BulkString(state) => Ok(state.first().copied()),
            Value::Nil => Ok(None),
            other => Err(StoreError::Corrupt(format!("unexpected state reply {other:?}"))),
        }
    }
}

/// A client error as a store error, by the client's error kind and the server's error
/// code, never by the message:
///
/// - no answer within the response timeout (an I/O `TimedOut`): [`StoreError::Timeout`].
///   The command was sent and may still run (a paused or busy server runs it later), so
///   whether it took effect is unknown. redis-rs reports a connection attempt that timed
///   out the same way; calling that a timeout too is only cautious;
/// - `WRONGTYPE`: something else wrote a value of another type at a record's key, which
///   no retry mends: [`StoreError::Corrupt`] (still refused by the HTTP layer, but not as
///   the store being down);
/// - anything else (connection refused or reset, `READONLY`, `OOM`, `CLUSTERDOWN`,
///   `TRYAGAIN`, `LOADING`, `MASTERDOWN`): [`StoreError::Unavailable`]. The HTTP layer
///   answers 503 for it and for a timeout.
pub(crate) fn store_error(error: RedisError) -> StoreError {
    if error.code() == Some("WRONGTYPE") {
        return StoreError::Corrupt(format!("a record's key holds another kind of value: {error}"));
    }
    if error.is_timeout() {
        return StoreError::timeout(error);
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
        self.stats_by_scan().await
    }

    /// `PING` (on Cluster, every node): never a scan.
    async fn ping(&self) -> Result<(), StoreError> {
        self.connection.query(&redis::cmd("PING")).await.map(|_| ()).map_err(store_error)
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
        self.list_by_scan(after, limit).await
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
        let registration = self.subscriptions.register(channel, self.connection.clone());
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

#[cfg(test)]
mod tests {
    use std::io;

    use oncely::store::StoreErrorKind;

    use super::*;

    #[test]
    fn client_errors_have_their_kinds() {
        let io = |kind| store_error(RedisError::from(io::Error::from(kind))).kind();
        assert_eq!(io(io::ErrorKind::TimedOut), StoreErrorKind::Timeout);
        assert_eq!(io(io::ErrorKind::ConnectionRefused), StoreErrorKind::Unavailable);
        assert_eq!(io(io::ErrorKind::ConnectionReset), StoreErrorKind::Unavailable);
        let client = RedisError::from((redis::ErrorKind::Client, "no connection"));
        assert_eq!(store_error(client).kind(), StoreErrorKind::Unavailable);
    }
}
