//! The opt-in replica that serves replays ([`RedisOptions::replica`]): a connection to it,
//! and the one read-only call made there before a claim goes to the primary.

use oncely::store::Replay;
use oncely::{ClaimOutcome, ClaimRequest, StoreError};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Value};

use crate::codec;
use crate::scripts::REPLICA_READ_SCRIPT;
use crate::{OpenError, RedisOptions};

/// A replica of the standalone primary. Multiplexed and self-reconnecting like the
/// primary's connection; cloning is cheap.
#[derive(Clone)]
pub(crate) struct Replica {
    connection: ConnectionManager,
}

impl Replica {
    /// Connects to `url` with the store's timeouts and loads the read script there.
    pub(crate) async fn open(url: &str, options: &RedisOptions) -> Result<Self, OpenError> {
        let client = crate::connection::client(url, options)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(options.response_timeout))
            .set_connection_timeout(Some(options.connection_timeout))
            .set_number_of_retries(1);
        let mut connection =
            client.get_connection_manager_with_config(config).await.map_err(crate::tls::connect_error)?;
        REPLICA_READ_SCRIPT.load_async(&mut connection).await.map_err(crate::tls::connect_error)?;
        Ok(Replica { connection })
    }

    /// The replay the replica holds for `request` (a live completed record with the
    /// request's fingerprint), or `None` for anything else, which the primary decides.
    ///
    /// One `EVALSHA_RO`: the server refuses any write from it, so the replica read is a
    /// read whatever the script says. On `NOSCRIPT` (a restarted replica) the script is
    /// loaded and the read made again.
    pub(crate) async fn replay(
        &self,
        record_key: &str,
        request: &ClaimRequest<'_>,
    ) -> Result<Option<Replay>, StoreError> {
        let fingerprint: &[u8] = request.fingerprint().map_or(b"", |f| f.as_bytes());
        let read = redis::cmd("EVALSHA_RO")
            .arg(REPLICA_READ_SCRIPT.get_hash())
            .arg(1)
            .arg(record_key)
            .arg(fingerprint)
            .clone();
        let mut connection = self.connection.clone();
        let reply: RedisResult<Value> = match read.query_async(&mut connection).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                REPLICA_READ_SCRIPT.load_async(&mut connection).await.map_err(crate::store::store_error)?;
                read.query_async(&mut connection).await
            }
            reply => reply,
        };
        let reply = reply.map_err(crate::store::store_error)?;
        if matches!(&reply, Value::Nil) || matches!(&reply, Value::Array(items) if items.is_empty()) {
            return Ok(None);
        }
        match codec::claim_outcome(request.storage_key(), reply)? {
            ClaimOutcome::Replay(replay) => Ok(Some(replay)),
            other => Err(StoreError::Corrupt(format!("the replica read answered {other:?}"))),
        }
    }
}
