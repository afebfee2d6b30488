//! The store's settings ([`RedisOptions`]) and why a store could not be opened
//! ([`OpenError`]).

use std::time::Duration;

use redis::RedisError;

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
#[derive(Clone, Debug)]
pub struct RedisOptions {
    pub(crate) prefix: String,
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
