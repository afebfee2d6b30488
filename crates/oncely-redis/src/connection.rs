//! Connections: a multiplexed, self-reconnecting connection to a standalone server, or a
//! cluster connection that follows `MOVED`/`ASK` redirections; and the store URL grammar.

use std::time::Duration;

use redis::aio::AsyncPushSender;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, ProtocolVersion, RedisResult, Script, ScriptInvocation, Value};

use crate::{OpenError, RedisOptions, tls};

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
    /// - `rediss://…` and `rediss+cluster://…`: the same over TLS (see the
    ///   [crate docs](crate#tls)), with `ca_file=PATH` (trust this CA bundle instead of the
    ///   platform's roots) and `cert_file=PATH&key_file=PATH` (a client certificate, for
    ///   mutual TLS; one without the other is refused). These three options are refused on
    ///   a plain-text URL, where they would be ignored;
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
    /// [`OpenError::InvalidUrl`] for another scheme, no host, or an unknown or bad option
    /// (including `cert_file` without `key_file` and TLS files on a plain-text URL).
    pub fn parse(url: &str) -> Result<(Topology, RedisOptions), OpenError> {
        let shown = redact(url);
        let invalid = |why: &str| OpenError::InvalidUrl(format!("{shown}: {why}"));
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut options = RedisOptions::default();
        let (mut cert_file, mut key_file) = (None, None);
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
                "ca_file" => options = options.ca_file(value),
                "cert_file" => cert_file = Some(value),
                "key_file" => key_file = Some(value),
                _ => {
                    return Err(invalid(&format!(
                        "unknown option {name:?}; use prefix, timeout, connect_timeout, replica, ca_file, cert_file, \
                         key_file"
                    )));
                }
            }
        }
        options = client_cert(options, cert_file, key_file).map_err(&invalid)?;
        let (scheme, rest) = base.split_once("://").ok_or_else(|| invalid("not a URL"))?;
        let topology = match scheme {
            "redis" | "rediss" => {
                if rest.is_empty() || rest.starts_with('/') {
                    return Err(invalid("no host"));
                }
                Topology::Standalone(base.to_string())
            }
            "redis+cluster" | "rediss+cluster" => {
                let node_scheme = scheme.trim_end_matches("+cluster");
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
            _ => return Err(invalid("use redis://, rediss://, redis+cluster:// or rediss+cluster://")),
        };
        check_tls(&topology, &options).map_err(invalid)?;
        Ok((topology, options))
    }

    /// Whether the connections use TLS: `rediss://` (and `rediss+cluster://`, whose nodes
    /// are `rediss://`).
    pub fn is_tls(&self) -> bool {
        match self {
            Topology::Standalone(url) => tls::is_tls(url),
            Topology::Cluster(nodes) => nodes.first().is_some_and(|node| tls::is_tls(node)),
        }
    }
}

/// The URL's `cert_file` and `key_file`, which go together.
pub(crate) fn client_cert(
    options: RedisOptions,
    cert_file: Option<&str>,
    key_file: Option<&str>,
) -> Result<RedisOptions, &'static str> {
    match (cert_file, key_file) {
        (Some(cert), Some(key)) => Ok(options.client_cert(cert, key)),
        (None, None) => Ok(options),
        _ => Err(CERT_AND_KEY),
    }
}

/// Why a client certificate without its key (or the other way round) is refused.
pub(crate) const CERT_AND_KEY: &str =
    "cert_file and key_file go together (the client certificate and its key, for mutual TLS): give both or neither";

/// Refuses certificate files on a plain-text topology, where they would be ignored.
pub(crate) fn check_tls(topology: &Topology, options: &RedisOptions) -> Result<(), &'static str> {
    if !options.tls.is_empty() && !topology.is_tls() {
        return Err("ca_file, cert_file and key_file are for TLS: use rediss:// or rediss+cluster://");
    }
    Ok(())
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

/// A client for one server, RESP3, with the TLS files of `options` for a `rediss://` URL.
pub(crate) fn client(url: &str, options: &RedisOptions) -> Result<redis::Client, OpenError> {
    let invalid = |e: redis::RedisError| OpenError::InvalidUrl(format!("{}: {e}", redact(url)));
    let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(invalid)?;
    let redis_settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
    let info = info.set_redis_settings(redis_settings);
    if !tls::is_tls(url) {
        if !options.tls.is_empty() {
            return Err(OpenError::InvalidUrl(format!(
                "{}: ca_file, cert_file and key_file are for TLS: use rediss://",
                redact(url)
            )));
        }
        return redis::Client::open(info).map_err(invalid);
    }
    tls::install_crypto_provider();
    redis::Client::build_with_tls(info, options.tls.read()?)
        .map_err(|e| OpenError::TlsFiles(format!("{}: {e}", redact(url))))
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
                let client = client(url, options)?;
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(options.response_timeout))
                    .set_connection_timeout(Some(options.connection_timeout))
                    .set_number_of_retries(1)
                    .set_push_sender(push)
                    .set_automatic_resubscription();
                let manager = match client.get_connection_manager_with_config(config).await {
                    Ok(manager) => manager,
                    Err(error) => return Err(tls::connect_failure(error, url, options).await),
                };
                Ok(Connection::Standalone(manager))
            }
            Topology::Cluster(nodes) => {
                check_tls(topology, options).map_err(|why| OpenError::InvalidUrl(why.into()))?;
                let mut builder = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                    .use_protocol(ProtocolVersion::RESP3)
                    .response_timeout(options.response_timeout)
                    .connection_timeout(options.connection_timeout)
                    .retries(2)
                    .push_sender(push);
                if topology.is_tls() {
                    tls::install_crypto_provider();
                    builder = builder.certs(options.tls.read()?);
                }
                let shown = || redact(&nodes.join(","));
                let client = builder.build().map_err(|e| {
                    if topology.is_tls() {
                        OpenError::TlsFiles(format!("{}: {e}", shown()))
                    } else {
                        OpenError::InvalidUrl(format!("{}: {e}", shown()))
                    }
                })?;
                match client.get_async_connection().await {
                    Ok(connection) => Ok(Connection::Cluster(connection)),
                    // The cluster client reports its nodes' failures as text: a TLS cause is
                    // learnt, typed, from one node on its own.
                    Err(error) if topology.is_tls() => Err(match nodes.first() {
                        Some(node) => match Self::probe(node, options).await {
                            Err(tls @ OpenError::Tls { .. }) => tls,
                            _ => OpenError::Connect(error),
                        },
                        None => OpenError::Connect(error),
                    }),
                    Err(error) => Err(OpenError::Connect(error)),
                }
            }
        }
    }

    /// One plain connection to `node`, to see why a TLS cluster could not be reached.
    async fn probe(node: &str, options: &RedisOptions) -> Result<(), OpenError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.connection_timeout))
            .set_response_timeout(Some(options.response_timeout));
        let client = client(node, options)?;
        match client.get_multiplexed_async_connection_with_config(&config).await {
            Ok(_) => Ok(()),
            Err(error) => Err(tls::connect_failure(error, node, options).await),
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
        let (t, o) = Topology::parse("rediss+cluster://a:1,b:2?ca_file=/ca.pem").expect("valid");
        assert_eq!(t, Topology::Cluster(vec!["rediss://a:1".into(), "rediss://b:2".into()]));
        assert_eq!(o.ca_file_path(), Some(std::path::Path::new("/ca.pem")));
        let (t, o) = Topology::parse("rediss://h:1?cert_file=/c.pem&key_file=/c.key").expect("valid");
        assert!(t.is_tls() && o.client_cert_files().is_some());
        for bad in [
            "memcached://x",
            "rediss://",
            "rediss://h:1?cert_file=/c.pem",
            "rediss://h:1?key_file=/c.key",
            "redis://h:1?ca_file=/ca.pem",
            "redis://",
            "redis+cluster://",
            "redis://h:1?prefix=a{b}",
            "redis://h:1?timeout=soon",
            "redis://h:1?timeout=0s",
            "redis://h:1?prefx=payments",
            "redis://h:1?replica=http://r:1",
        ] {
            assert!(matches!(Topology::parse(bad), Err(OpenError::InvalidUrl(_))), "{bad}");
        }
    }
}
