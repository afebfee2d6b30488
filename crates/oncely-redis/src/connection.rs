//! Connections: a multiplexed, self-reconnecting connection to a standalone server, or a
//! cluster connection that follows `MOVED`/`ASK` redirections; and the store URL grammar.

use std::time::Duration;

use redis::aio::AsyncPushSender;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, ProtocolVersion, RedisResult, Script, ScriptInvocation, Value};

use crate::{OpenError, RedisOptions};

/// Where the records live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topology {
    /// One server (or a primary behind a failover proxy): a `redis://` URL.
    Standalone(String),
    /// A Redis Cluster: the URLs of some of its nodes (`redis://host:port`); the client
    /// discovers the rest.
    Cluster(Vec<String>),
}

impl Topology {
    /// Parses a store URL into its topology and options:
    ///
    /// - `redis://[user:password@]host:port[/db]`: standalone;
    /// - `redis+cluster://[user:password@]host:port,host:port,…`: Cluster;
    /// - options in the query: `prefix=NAME` (the key prefix, default `oncely`),
    ///   `timeout=DURATION` (each command, default `1s`), `connect_timeout=DURATION`
    ///   (default `1s`), `replica=redis://HOST:PORT` (standalone only: serve replays from
    ///   that replica, see [`RedisOptions::replica`]). Durations are humantime: `250ms`,
    ///   `2s`. Any other option is refused, so that a misspelt `prefix` cannot silently
    ///   share the default one.
    ///
    /// ```
    /// use oncely_redis::Topology;
    /// let (topology, options) = Topology::parse("redis+cluster://10.0.0.1:7000,10.0.0.2:7000?prefix=pay").unwrap();
    /// assert_eq!(topology, Topology::Cluster(vec!["redis://10.0.0.1:7000".into(), "redis://10.0.0.2:7000".into()]));
    /// assert_eq!(options.prefix_str(), "pay");
    /// ```
    ///
    /// # Errors
    /// [`OpenError::InvalidUrl`] for another scheme, no host, or an unknown or bad option.
    pub fn parse(url: &str) -> Result<(Topology, RedisOptions), OpenError> {
        let shown = redact(url);
        let invalid = |why: &str| OpenError::InvalidUrl(format!("{shown}: {why}"));
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut options = RedisOptions::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "prefix" => options = options.prefix(value).map_err(|e| invalid(&e.to_string()))?,
                "timeout" => {
                    options.response_timeout = duration(value).map_err(|e| invalid(&format!("timeout: {e}")))?
                }
                "connect_timeout" => {
                    options.connection_timeout =
                        duration(value).map_err(|e| invalid(&format!("connect_timeout: {e}")))?
                }
                "replica" => options = options.replica(value).map_err(|e| invalid(&e.to_string()))?,
                _ => {
                    return Err(invalid(&format!(
                        "unknown option {name:?}; use prefix, timeout, connect_timeout, replica"
                    )));
                }
            }
        }
        let (scheme, rest) = base.split_once("://").ok_or_else(|| invalid("not a URL"))?;
        let topology = match scheme {
            "rediss" | "rediss+cluster" => {
                return Err(invalid("TLS (rediss://) is not enabled in this build; use redis:// on a trusted network"));
            }
            "redis" => {
                if rest.is_empty() || rest.starts_with('/') {
                    return Err(invalid("no host"));
                }
                Topology::Standalone(base.to_string())
            }
            "redis+cluster" => {
                let node_scheme = "redis";
                let (userinfo, hosts) = match rest.rsplit_once('@') {
                    Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
                    None => (String::new(), rest),
                };
                let hosts = hosts.trim_end_matches('/');
                let nodes: Vec<String> = hosts
                    .split(',')
                    .filter(|h| !h.is_empty())
                    .map(|host| format!("{node_scheme}://{userinfo}{host}"))
                    .collect();
                if nodes.is_empty() {
                    return Err(invalid("no nodes"));
                }
                Topology::Cluster(nodes)
            }
            _ => return Err(invalid("use redis:// or redis+cluster://")),
        };
        Ok((topology, options))
    }
}

/// The URL with its password replaced by `***`, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                let hidden = if userinfo.contains(':') { format!("{user}:***") } else { user.to_string() };
                format!("{scheme}://{hidden}@{hosts}")
            }
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| e.to_string())
        .and_then(|d| if d.is_zero() { Err("must be more than zero".into()) } else { Ok(d) })
}

/// A connection of either topology. Both are multiplexed: one socket per server carries
/// every concurrent command, and cloning is cheap.
#[derive(Clone)]
pub(crate) enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    /// Connects with RESP3 (needed for pub/sub pushes on the same connection), a timeout
    /// on every command and on every connection attempt, and pushes sent to `push`.
    pub(crate) async fn open(
        topology: &Topology,
        options: &RedisOptions,
        push: impl AsyncPushSender,
    ) -> Result<Self, OpenError> {
        match topology {
            Topology::Standalone(url) => {
                let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                    .map_err(|e| OpenError::InvalidUrl(format!("{}: {e}", redact(url))))?;
                let redis_settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
                let info = info.set_redis_settings(redis_settings);
                let client =
                    redis::Client::open(info).map_err(|e| OpenError::InvalidUrl(format!("{}: {e}", redact(url))))?;
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(options.response_timeout))
                    .set_connection_timeout(Some(options.connection_timeout))
                    .set_number_of_retries(1)
                    .set_push_sender(push)
                    .set_automatic_resubscription();
                let manager = client.get_connection_manager_with_config(config).await.map_err(OpenError::Connect)?;
                Ok(Connection::Standalone(manager))
            }
            Topology::Cluster(nodes) => {
                let client = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                    .use_protocol(ProtocolVersion::RESP3)
                    .response_timeout(options.response_timeout)
                    .connection_timeout(options.connection_timeout)
                    .retries(2)
                    .push_sender(push)
                    .build()
                    .map_err(|e| OpenError::InvalidUrl(format!("{}: {e}", redact(&nodes.join(",")))))?;
                let connection = client.get_async_connection().await.map_err(OpenError::Connect)?;
                Ok(Connection::Cluster(connection))
            }
        }
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Connection::Cluster(_))
    }

    /// `EVALSHA`, and on `NOSCRIPT` (a restarted or failed-over server) `SCRIPT LOAD` and
    /// `EVALSHA` again. On Cluster the call goes to the node owning `KEYS[1]`'s slot.
    pub(crate) async fn invoke(&self, invocation: &ScriptInvocation<'_>) -> RedisResult<Value> {
        match self {
            Connection::Standalone(c) => invocation.invoke_async(&mut c.clone()).await,
            Connection::Cluster(c) => invocation.invoke_async(&mut c.clone()).await,
        }
    }

    /// Several runs of `script` in one pipeline on a standalone server: one round trip.
    /// Runs answered `NOSCRIPT` (a restarted or failed-over server; none of them ran) are
    /// sent again, once, after `SCRIPT LOAD`. Any other error answers the whole call with
    /// it, though the other runs did run. Cluster has no pipeline across slots: there, each
    /// run goes on its own, all at once, and the first error answers the call.
    pub(crate) async fn invoke_all(
        &self,
        script: &Script,
        invocations: &[ScriptInvocation<'_>],
    ) -> RedisResult<Vec<Value>> {
        let Connection::Standalone(c) = self else {
            let runs = invocations.iter().map(|invocation| self.invoke(invocation));
            return futures_util::future::try_join_all(runs).await;
        };
        let pipeline = |runs: &mut dyn Iterator<Item = &ScriptInvocation<'_>>| {
            let mut pipeline = redis::pipe();
            pipeline.ignore_errors();
            for invocation in runs {
                pipeline.invoke_script(invocation);
            }
            pipeline
        };
        let no_script = |value: &Value| matches!(value, Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::NoScript));
        let mut replies: Vec<Value> = pipeline(&mut invocations.iter()).query_async(&mut c.clone()).await?;
        let again: Vec<usize> = (0..replies.len()).filter(|&i| no_script(&replies[i])).collect();
        if !again.is_empty() {
            self.load(script).await?;
            let retried: Vec<Value> =
                pipeline(&mut again.iter().filter_map(|&i| invocations.get(i))).query_async(&mut c.clone()).await?;
            for (i, reply) in again.into_iter().zip(retried) {
                replies[i] = reply;
            }
        }
        replies
            .into_iter()
            .map(|reply| match reply {
                Value::ServerError(error) => Err(error.into()),
                reply => Ok(reply),
            })
            .collect()
    }

    /// `SCRIPT LOAD`: on Cluster, on every primary.
    pub(crate) async fn load(&self, script: &Script) -> RedisResult<String> {
        match self {
            Connection::Standalone(c) => script.load_async(&mut c.clone()).await,
            Connection::Cluster(c) => script.load_async(&mut c.clone()).await,
        }
    }

    /// Any other command, routed by its key on Cluster.
    pub(crate) async fn query(&self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Connection::Standalone(c) => cmd.query_async(&mut c.clone()).await,
            Connection::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }

    /// A command sent to one node of a cluster, by address.
    pub(crate) async fn query_node(&self, cmd: Cmd, host: &str, port: u16) -> RedisResult<Value> {
        match self {
            Connection::Standalone(c) => cmd.query_async(&mut c.clone()).await,
            Connection::Cluster(c) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: host.into(), port });
                c.clone().route_command(cmd, routing).await
            }
        }
    }

    /// Subscribes to a record's wake-up channel: `SUBSCRIBE` on a standalone server,
    /// sharded `SSUBSCRIBE` on Cluster (sent to the node owning the channel's slot, so a
    /// publish reaches only the clients that wait on that key's shard).
    pub(crate) async fn subscribe(&self, channel: &[u8]) -> RedisResult<()> {
        match self {
            Connection::Standalone(c) => c.clone().subscribe(channel).await,
            Connection::Cluster(c) => c.clone().ssubscribe(channel).await,
        }
    }

    pub(crate) async fn unsubscribe(&self, channel: &[u8]) -> RedisResult<()> {
        match self {
            Connection::Standalone(c) => c.clone().unsubscribe(channel).await,
            Connection::Cluster(c) => c.clone().sunsubscribe(channel).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("redis://:secret@h:1"), "redis://:***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        let error = Topology::parse("redis://u:secret@h:1?nope=1").expect_err("unknown option");
        assert!(!error.to_string().contains("secret"), "{error}");
    }

    #[test]
    fn urls_are_parsed_with_their_options() {
        let (t, o) = Topology::parse("redis://127.0.0.1:6379/2?timeout=250ms").expect("valid");
        assert_eq!(t, Topology::Standalone("redis://127.0.0.1:6379/2".into()));
        assert_eq!(o.response_timeout, Duration::from_millis(250));
        assert_eq!(o.prefix_str(), "oncely");
        let (_, o) = Topology::parse("redis://h:1?replica=redis://r:2").expect("valid");
        assert_eq!(o.replica_url(), Some("redis://r:2"));
        let (t, _) = Topology::parse("redis+cluster://u:p@a:1,b:2/").expect("valid");
        assert_eq!(t, Topology::Cluster(vec!["redis://u:p@a:1".into(), "redis://u:p@b:2".into()]));
        for bad in [
            "memcached://x",
            "rediss://h:1",
            "redis://",
            "redis+cluster://",
            "redis://h:1?prefix=a{b}",
            "redis://h:1?timeout=soon",
            "redis://h:1?timeout=0s",
            "redis://h:1?prefx=payments",
            "redis://h:1?replica=rediss://r:1",
        ] {
            assert!(matches!(Topology::parse(bad), Err(OpenError::InvalidUrl(_))), "{bad}");
        }
    }
}
