//! The store's settings ([`RedisOptions`]) and why a store could not be opened
//! ([`OpenError`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use redis::RedisError;

use crate::tls::TlsFiles;

#[cfg(doc)]
use crate::RedisStore;

/// Settings of a [`RedisStore`].
///
/// ```
/// use std::time::Duration;
/// use oncely_redis::RedisOptions;
///
/// let options = RedisOptions::default().prefix("payments").unwrap().response_timeout(Duration::from_millis(500));
/// assert_eq!(options.prefix_str(), "payments");
/// ```
#[derive(Clone)]
pub struct RedisOptions {
    pub(crate) prefix: String,
    pub(crate) response_timeout: Duration,
    pub(crate) connection_timeout: Duration,
    pub(crate) replica: Option<String>,
    pub(crate) tls: TlsFiles,
}

impl std::fmt::Debug for RedisOptions {
    /// The replica's password shown as `***`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("prefix", &self.prefix)
            .field("response_timeout", &self.response_timeout)
            .field("connection_timeout", &self.connection_timeout)
            .field("replica", &self.replica.as_deref().map(crate::connection::redact))
            .field("ca_file", &self.tls.ca_file)
            .field("client_cert", &self.tls.client)
            .finish()
    }
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            prefix: "oncely".into(),
            response_timeout: Duration::from_secs(1),
            connection_timeout: Duration::from_secs(1),
            replica: None,
            tls: TlsFiles::default(),
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

    /// How long any one command may take before it fails with
    /// [`StoreError::Timeout`](oncely::StoreError::Timeout) (default 1 s).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long a connection attempt may take (default 1 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Opt-in: serve replays from a replica of the (standalone) primary, at `url`
    /// (`redis://[user:password@]host:port[/db]`, the primary's database; `rediss://`
    /// with the store's TLS files). Off by default.
    ///
    /// Each claim first reads the record on the replica with a read-only script
    /// (`EVALSHA_RO`); a live completed record with the request's fingerprint is replayed
    /// from there and the primary never hears of the request. Anything else (absent, in
    /// progress, another fingerprint, or the replica failing or timing out) goes on to the
    /// primary's claim script, which decides as it always does. Round trips: a replay
    /// costs one, on the replica; a new key costs three (the replica read, then claim and
    /// complete on the primary).
    ///
    /// What it means, since replication is asynchronous:
    ///
    /// - **A lagging replica** may not have a completion yet: the request falls through to
    ///   the primary, which replays it. Nothing runs twice because of the lag.
    /// - **Expiry and deletion** are judged by the replica's copy and clock: a record
    ///   deleted on the primary, or expired by the primary's clock, may still be replayed
    ///   from the replica for the replication lag (or the clocks' skew). **A replica cut
    ///   off from its primary** keeps answering with what it has (Redis's default
    ///   `replica-serve-stale-data yes`): an operator's delete is then ignored by replays
    ///   until the link returns or the record expires by the replica's clock. Configure the
    ///   replica with `replica-serve-stale-data no`, so that it refuses reads while cut off
    ///   and every claim falls through to the primary.
    /// - **After a failover** to a replica that had not received a completion, the key
    ///   runs again. That is the same as without this option: the completion was lost with
    ///   the old primary either way (see the [crate docs](crate#persistence-what-redis-can-lose)).
    ///   A replica promoted to primary answers the replica reads too, which stays correct.
    /// - **A replica that does not answer** costs each claim up to the
    ///   [response timeout](Self::response_timeout) before the primary is asked (a refused
    ///   connection costs nothing noticeable); its failures are logged at debug level.
    ///
    /// Only for a standalone topology: on Cluster the store refuses to open
    /// ([`OpenError::Unsupported`]).
    ///
    /// # Errors
    /// [`OpenError::InvalidUrl`] for a URL that is not `redis://` or `rediss://` with a
    /// host.
    pub fn replica(mut self, url: &str) -> Result<Self, OpenError> {
        match url.strip_prefix("redis://").or_else(|| url.strip_prefix("rediss://")) {
            Some(rest) if !rest.is_empty() && !rest.starts_with('/') => {
                self.replica = Some(url.to_string());
                Ok(self)
            }
            _ => Err(OpenError::InvalidUrl(format!(
                "replica {:?}: use redis://host:port or rediss://host:port",
                crate::connection::redact(url)
            ))),
        }
    }

    /// The replica replays are served from, if any (see [`replica`](Self::replica)).
    pub fn replica_url(&self) -> Option<&str> {
        self.replica.as_deref()
    }

    /// TLS only (`rediss://`): trust the CA certificates in this PEM file (a bundle may
    /// hold several) **instead of** the platform's root certificates. Without it, a
    /// `rediss://` store trusts the platform's roots (see the [crate docs](crate#tls)).
    /// The file is read when the store connects; on a plain `redis://` topology the store
    /// refuses to open ([`OpenError::InvalidUrl`]).
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca_file = Some(path.into());
        self
    }

    /// TLS only (`rediss://`): present this client certificate (PEM, the chain) and its
    /// private key (PEM: PKCS#8, PKCS#1 or SEC1), for a server that authenticates its
    /// clients (mutual TLS, Redis's `tls-auth-clients yes`). Read when the store connects.
    pub fn client_cert(mut self, cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> Self {
        self.tls.client = Some((cert_file.into(), key_file.into()));
        self
    }

    /// The CA file set with [`ca_file`](Self::ca_file), if any.
    pub fn ca_file_path(&self) -> Option<&Path> {
        self.tls.ca_file.as_deref()
    }

    /// The client certificate and key files set with [`client_cert`](Self::client_cert),
    /// if any.
    pub fn client_cert_files(&self) -> Option<(&Path, &Path)> {
        self.tls.client.as_ref().map(|(cert, key)| (cert.as_path(), key.as_path()))
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
    /// The TLS handshake failed (`rediss://`): the server's certificate was refused
    /// (`reason` starts with `certificate verify failed: ` and the cause: `UnknownIssuer`,
    /// `Expired`, `NotValidForName`, …), the server does not speak TLS, or it refused the
    /// client (no or an unknown client certificate). Never followed by a plain-text attempt.
    #[error("TLS handshake with Redis failed: {reason}")]
    Tls {
        /// The cause, in words.
        reason: String,
        /// The client's error.
        #[source]
        source: RedisError,
    },
    /// A TLS file (`ca_file`, `cert_file`, `key_file`) cannot be read or holds no usable
    /// PEM.
    #[error("unusable TLS file for Redis: {0}")]
    TlsFiles(String),
}
