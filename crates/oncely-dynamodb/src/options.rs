//! The store's settings ([`DynamoDbOptions`]): where the table is, how its items are
//! keyed, and the client's timeouts and retries; and why a store could not be opened
//! ([`OpenError`]).

use std::time::Duration;

#[cfg(doc)]
use crate::DynamoDbStore;

/// The default partition key attribute: `id`, as AWS Powertools' idempotency tables use.
pub const DEFAULT_PARTITION_KEY: &str = "id";

/// The default TTL attribute (epoch seconds), the one `create-table` enables.
pub const DEFAULT_TTL_ATTRIBUTE: &str = "ttl";

/// The default key prefix on a table with a sort key: the partition every record shares.
pub const DEFAULT_SORT_KEY_PREFIX: &str = "oncely";

/// Settings of a [`DynamoDbStore`].
///
/// ```
/// use std::time::Duration;
/// use oncely_dynamodb::DynamoDbOptions;
///
/// let options = DynamoDbOptions::new("idempotency")
///     .unwrap()
///     .region("eu-west-1")
///     .sort_key("sk")
///     .unwrap()
///     .timeout(Duration::from_millis(500));
/// assert_eq!(options.table_name(), "idempotency");
/// ```
#[derive(Clone, Debug)]
pub struct DynamoDbOptions {
    pub(crate) table: String,
    pub(crate) region: Option<String>,
    pub(crate) endpoint: Option<String>,
    pub(crate) partition_key: String,
    pub(crate) sort_key: Option<String>,
    pub(crate) prefix: Option<String>,
    pub(crate) ttl_attribute: String,
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_attempts: u32,
}

impl DynamoDbOptions {
    /// The store on table `table`, with every other setting at its default: region and
    /// credentials from the usual AWS chain, the partition key `id`, no sort key, no
    /// prefix, TTL attribute `ttl`, a 2 s attempt timeout, 3 attempts.
    ///
    /// # Errors
    /// [`OpenError::InvalidUrl`] for a name DynamoDB would refuse (3 to 255 letters,
    /// digits, `_`, `-` and `.`).
    pub fn new(table: &str) -> Result<Self, OpenError> {
        let valid =
            (3..=255).contains(&table.len()) && table.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if !valid {
            return Err(OpenError::InvalidUrl(format!(
                "table {table:?}: use 3 to 255 letters, digits or _-. characters"
            )));
        }
        Ok(Self {
            table: table.to_string(),
            region: None,
            endpoint: None,
            partition_key: DEFAULT_PARTITION_KEY.into(),
            sort_key: None,
            prefix: None,
            ttl_attribute: DEFAULT_TTL_ATTRIBUTE.into(),
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            max_attempts: 3,
        })
    }

    /// The table's name.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// The AWS region (`eu-west-1`); by default the usual chain decides (`AWS_REGION`,
    /// the profile, the instance metadata).
    pub fn region(mut self, region: &str) -> Self {
        self.region = Some(region.to_string());
        self
    }

    /// An explicit endpoint, for local emulators (`http://127.0.0.1:8000`) or VPC
    /// endpoints; by default the region's.
    pub fn endpoint(mut self, endpoint: &str) -> Self {
        self.endpoint = Some(endpoint.to_string());
        self
    }

    /// The partition key attribute's name (default `id`), a string attribute.
    ///
    /// # Errors
    /// [`OpenError::InvalidUrl`] for a name that is not 1 to 255 letters, digits or `_-.`.
    pub fn partition_key(mut self, name: &str) -> Result<Self, OpenError> {
        self.partition_key = attribute_name("partition_key", name)?;
        Ok(self)
    }

    /// A sort key attribute (a string), for a table shared with other data the way
    /// Powertools shares one: every record's partition key is then the
    /// [prefix](Self::prefix) (default `oncely`) and its sort key is the hex storage key.
    /// All records then share one partition key, so all their traffic goes to the items of
    /// one partition key: DynamoDB splits a busy partition by sort key ranges, but a
    /// table without a sort key spreads records from the first request on.
    ///
    /// # Errors
    /// [`OpenError::InvalidUrl`] for a name that is not 1 to 255 letters, digits or `_-.`.
    pub fn sort_key(mut self, name: &str) -> Result<Self, OpenError> {
        self.sort_key = Some(attribute_name("sort_key", name)?);
        Ok(self)
    }

    /// A static prefix, so that records can share a table with other items: without a
    /// sort key the partition key is `PREFIX#<hex storage key>`; with one, the partition
    /// key is `PREFIX` itself. Letters, digits and `_-.:` only, at most 64 characters.
    ///
    /// # Errors
    /// [`OpenError::InvalidUrl`] for an empty, long or otherwise unusable prefix.
    pub fn prefix(mut self, prefix: &str) -> Result<Self, OpenError> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 64
            && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
        if !valid {
            return Err(OpenError::InvalidUrl(format!(
                "prefix {prefix:?}: use 1 to 64 letters, digits or _-.: characters"
            )));
        }
        self.prefix = Some(prefix.to_string());
        Ok(self)
    }

    /// The TTL attribute (default `ttl`): epoch seconds at which DynamoDB may delete the
    /// item. A table has one TTL attribute, so a shared table's may have another name.
    ///
    /// # Errors
    /// [`OpenError::InvalidUrl`] for a name that is not 1 to 255 letters, digits or `_-.`,
    /// or one of the store's own attribute names.
    pub fn ttl_attribute(mut self, name: &str) -> Result<Self, OpenError> {
        self.ttl_attribute = attribute_name("ttl_attribute", name)?;
        Ok(self)
    }

    /// How long one attempt of a call may take before it is abandoned (default 2 s); the
    /// call fails with [`StoreError::Timeout`](oncely::StoreError::Timeout) once every
    /// attempt has.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long a connection attempt may take (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How many attempts the SDK makes per call (default 3; 1: no retry). Throttling,
    /// connection failures and timed-out attempts are retried with jittered exponential
    /// backoff from 25 ms; every call is safe to repeat (see the [crate docs](crate)).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }
}

/// A DynamoDB attribute name this store accepts in its settings: plain names only, so
/// they need no escaping in messages and are easy to write in IaC.
fn attribute_name(option: &str, name: &str) -> Result<String, OpenError> {
    let valid =
        (1..=255).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if !valid {
        return Err(OpenError::InvalidUrl(format!(
            "{option} {name:?}: use 1 to 255 letters, digits or _-. characters"
        )));
    }
    if crate::codec::RECORD_ATTRIBUTES.contains(&name) {
        return Err(OpenError::InvalidUrl(format!("{option} {name:?}: the store names one of its own attributes so")));
    }
    Ok(name.to_string())
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The URL or an option in it is malformed.
    #[error("invalid DynamoDB store URL: {0}")]
    InvalidUrl(String),
    /// DynamoDB could not be reached, or refused the call (credentials, throttling).
    #[error("cannot reach DynamoDB: {0}")]
    Connect(#[source] oncely::StoreError),
    /// The table does not exist (create it with `oncely dynamodb create-table`, or see
    /// the README for its definition).
    #[error("DynamoDB table {0:?} does not exist; create it with `oncely dynamodb create-table --store …`")]
    NoTable(String),
    /// The table exists with another key schema than the options describe.
    #[error("DynamoDB table {table:?} has another shape: {why}")]
    WrongTable {
        /// The table's name.
        table: String,
        /// What differs.
        why: String,
    },
}
