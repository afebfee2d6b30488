//! The store on the request path: [`RedisStore`], its connection and key naming, and
//! its [`Store`] implementation, one script call per state change.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use oncely::store::{Claim, FirstSeen, Notified, StoreAdmin};
use oncely::{ClaimId, ClaimOutcome, ClaimRequest, Record, StorageKey, Store, StoreError, StoreStats};
use redis::cluster_routing::Slot;
use redis::{RedisError, Value};

use crate::codec;
use crate::connection::Connection;
use crate::replica::Replica;
use crate::scripts::{self, *};
use crate::subscriptions::Subscriptions;
use crate::{OpenError, RedisOptions, Topology};

/// The Redis/Valkey store. Cloning is cheap and clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    pub(crate) connection: Connection,
    pub(crate) prefix: Arc<str>,
    subscriptions: Arc<Subscriptions>,
    /// The replica replays are read from first, when [`RedisOptions::replica`] is set.
    replica: Option<Replica>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("cluster", &self.connection.is_cluster())
            .field("replica_reads", &self.replica.is_some())
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

    /// Connects, and loads the scripts on every primary (and the replica read on the
    /// replica, with [`RedisOptions::replica`]).
    ///
    /// # Errors
    /// [`OpenError::Connect`] when no connection can be made or the scripts cannot be
    /// loaded; [`OpenError::Tls`] when the TLS handshake fails (the cause named, see the
    /// [crate docs](crate#tls)); [`OpenError::TlsFiles`] for an unreadable certificate
    /// file; [`OpenError::Unsupported`] for a replica on Cluster;
    /// [`OpenError::InvalidUrl`] for a `redis://` replica of a `rediss://` primary.
    pub async fn connect(topology: &Topology, options: RedisOptions) -> Result<Self, OpenError> {
        let replica = match (&options.replica, topology) {
            (None, _) => None,
            // Replays carry stored response bodies: a TLS primary's replica must be
            // reached over TLS too.
            (Some(url), Topology::Standalone(_)) if topology.is_tls() && !crate::tls::is_tls(url) => {
                return Err(OpenError::InvalidUrl(format!(
                    "replica {:?}: a rediss:// primary needs a rediss:// replica (replays carry stored responses)",
                    crate::connection::redact(url)
                )));
            }
            (Some(url), Topology::Standalone(_)) => Some(Replica::open(url, &options).await?),
            (Some(_), Topology::Cluster(_)) => {
                return Err(OpenError::Unsupported("replica reads are for a standalone primary, not a Cluster"));
            }
        };
        let subscriptions = Arc::new(Subscriptions::default());
        let dispatch = subscriptions.clone();
        let push = move |push: redis::PushInfo| {
            dispatch.dispatch(push);
            Ok::<(), redis::aio::SendError>(())
        };
        let connection = Connection::open(topology, &options, push).await?;
        let store = RedisStore { connection, prefix: options.prefix.into(), subscriptions, replica };
        store.check_server().await?;
        // Loaded once here (on Cluster, `SCRIPT LOAD` goes to every primary); later
        // `NOSCRIPT` answers reload them on demand.
        for script in scripts::all() {
            store.connection.load(script).await.map_err(crate::tls::connect_error)?;
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
                .map_err(crate::tls::connect_error)?;
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

/// How many records one run of the hits script counts at most, so that a large flush
/// never holds the server for long (a run costs about a microsecond per record); a flush
/// of more is several runs, still in one pipeline.
const HITS_PER_RUN: usize = 512;

impl RedisStore {
    /// [`Store::record_hits`], in [`HITS_PER_RUN`]-record runs of the hits script.
    pub(crate) async fn add_hits(&self, hits: &[(StorageKey, u64)]) -> Result<(), StoreError> {
        // By slot on Cluster; one group (`None`) on a standalone server.
        let mut groups: HashMap<Option<Slot>, Vec<(String, i64)>> = HashMap::new();
        for (key, n) in hits.iter().filter(|(_, n)| *n > 0) {
            let record_key = self.record_key(key);
            let slot = self.connection.is_cluster().then(|| Slot::for_key(&record_key));
            // `HINCRBY` takes a signed 64-bit increment.
            groups.entry(slot).or_default().push((record_key, i64::try_from(*n).unwrap_or(i64::MAX)));
        }
        let invocations: Vec<redis::ScriptInvocation<'_>> = groups
            .values()
            .flat_map(|group| group.chunks(HITS_PER_RUN))
            .map(|run| {
                let mut invocation = HITS_SCRIPT.prepare_invoke();
                for (record_key, n) in run {
                    invocation.key(record_key).arg(n);
                }
                invocation
            })
            .collect();
        if invocations.is_empty() {
            return Ok(());
        }
        self.connection.invoke_all(&HITS_SCRIPT, &invocations).await.map(drop).map_err(store_error)
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

impl Store for RedisStore {
    /// One `EVALSHA` of the claim script. Atomic: Redis runs the script to its end before
    /// any other command. A replay (and an in-progress or mismatched record) is a read: the
    /// script writes nothing, so nothing reaches the AOF or the replicas.
    ///
    /// With [`RedisOptions::replica`], one `EVALSHA_RO` on the replica first: a replay it
    /// holds is answered from there; anything else, or a replica that fails, goes on to
    /// the claim script on the primary, which alone decides everything but a replay.
    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        let (lease, retention) = (codec::millis(request.lease())?, codec::millis(request.retention())?);
        if let Some(replica) = &self.replica {
            match replica.replay(&self.record_key(request.storage_key()), request).await {
                Ok(Some(replay)) => return Ok(ClaimOutcome::Replay(replay)),
                Ok(None) => {}
                Err(error) => tracing::debug!(%error, "the replica read failed; claiming on the primary"),
            }
        }
        let fingerprint: &[u8] = match request.fingerprint() {
            Some(fingerprint) => fingerprint.as_bytes(),
            None => b"",
        };
        let claim_id = request.claim_id().to_bytes();
        let reply = self
            .run(&CLAIM_SCRIPT, request.storage_key(), |i| {
                i.arg(&claim_id[..])
                    .arg(fingerprint)
                    .arg(request.key().as_str())
                    .arg(request.scope().as_str())
                    .arg(lease)
                    .arg(retention);
            })
            .await?;
        codec::claim_outcome(request.storage_key(), reply)
    }

    /// One `EVALSHA` of the complete script: fenced by the claim id inside the script.
    /// Acknowledged once the primary applied it; durable as the server's persistence
    /// settings make it (see the [crate docs](crate)).
    async fn complete(&self, claim: Claim, payload: Bytes, retention: Duration) -> Result<(), StoreError> {
        let retention = codec::millis(retention)?;
        let claim_id = claim.claim_id.to_bytes();
        let reply = self
            .run(&COMPLETE_SCRIPT, &claim.storage_key, |i| {
                i.arg(&claim_id[..]).arg(&payload[..]).arg(retention);
            })
            .await?;
        lease_lost_unless(codec::flag(reply)?)
    }

    async fn release(&self, claim: Claim) -> Result<(), StoreError> {
        let claim_id = claim.claim_id.to_bytes();
        let reply = self.run(&RELEASE_SCRIPT, &claim.storage_key, |i| {
            i.arg(&claim_id[..]);
        });
        lease_lost_unless(codec::flag(reply.await?)?)
    }

    async fn touch(&self, claim: Claim, lease: Duration) -> Result<(), StoreError> {
        let lease = codec::millis(lease)?;
        let claim_id = claim.claim_id.to_bytes();
        let reply = self.run(&TOUCH_SCRIPT, &claim.storage_key, |i| {
            i.arg(&claim_id[..]).arg(lease);
        });
        lease_lost_unless(codec::flag(reply.await?)?)
    }

    async fn first_seen(&self, request: &FirstSeen<'_>) -> Result<bool, StoreError> {
        let window = codec::millis(request.window())?;
        // Tells a re-delivery of this call (the Cluster client resends after a dropped
        // connection) from another delivery of the same message id.
        let token = ClaimId::random().to_bytes();
        let reply = self.run(&FIRST_SEEN_SCRIPT, request.storage_key(), |i| {
            i.arg(request.key().as_str()).arg(request.scope().as_str()).arg(window).arg(&token[..]);
        });
        codec::flag(reply.await?)
    }

    /// Adds each count to its record when the record is live and completed, by the
    /// server's clock (the hits script).
    ///
    /// **Round trips.** On a standalone server, one for the whole batch: runs of the hits
    /// script, up to 512 records each, in one pipeline. On Cluster no script or
    /// pipeline may span slots, so the batch is grouped by slot and the runs are sent all
    /// at once over the per-node connections (one round trip's time, one run per slot).
    ///
    /// **Atomicity.** Each run is atomic: a record is checked and incremented with nothing
    /// in between, so no count lands on a record that expired, was deleted or replaced.
    /// Runs are independent: a batch that fails part-way may have counted some records,
    /// and the engine retries the whole batch, so a failure can count some replays twice.
    /// Hits are statistics; nothing decides on them.
    async fn record_hits(&self, hits: &[(StorageKey, u64)]) -> Result<(), StoreError> {
        self.add_hits(hits).await
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

impl StoreAdmin for RedisStore {
    /// One `EVALSHA` of the get script: a read, counting nothing.
    async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        codec::found_record(key, self.run(&GET_SCRIPT, key, |_| {}).await?)
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

    /// Scans the key space and sorts it: an admin call, not for the request path.
    async fn list(&self, after: Option<StorageKey>, limit: usize) -> Result<Vec<Record>, StoreError> {
        self.list_by_scan(after, limit).await
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
