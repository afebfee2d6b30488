//! The DynamoDB store's URL parsed into its [`DynamoDbOptions`], the way every store
//! crate parses its own; and the store's abilities.

use std::str::FromStr;

use oncely::store::StoreAbilities;
use oncely::store::url::{self, UrlError};

use crate::{DynamoDbOptions, DynamoDbStore, OpenError};

const KNOWN: &str = "region=NAME, endpoint=URL, partition_key=NAME, sort_key=NAME, prefix=NAME, ttl_attribute=NAME, \
                     timeout=DURATION, connect_timeout=DURATION, max_attempts=N";

/// A parsed `dynamodb://TABLE?…` URL: the table and the store's options. Unknown
/// options are refused, and every error names the option at fault ([`UrlError`]).
///
/// | option | default | meaning |
/// |---|---|---|
/// | `region=eu-west-1` | the AWS chain's (`AWS_REGION`, profile, instance metadata) | the region |
/// | `endpoint=http://127.0.0.1:8000` | the region's | an explicit endpoint (emulators, VPC endpoints) |
/// | `partition_key=NAME` | `id` | the partition key attribute (a string) |
/// | `sort_key=NAME` | none | a sort key attribute (a string): records share the partition key `PREFIX` and are sorted by storage key |
/// | `prefix=NAME` | none (`oncely` with a sort key) | a static prefix: partition keys `PREFIX#<hex>`, or the shared partition key with a sort key |
/// | `ttl_attribute=NAME` | `ttl` | the table's TTL attribute (epoch seconds) |
/// | `timeout=2s` | 2 s | how long one attempt of a call may take |
/// | `connect_timeout=1s` | 1 s | how long a connection attempt may take |
/// | `max_attempts=3` | 3 | attempts per call (1: no retry) |
///
/// ```
/// use oncely_dynamodb::DynamoDbUrl;
///
/// let url: DynamoDbUrl = "dynamodb://idempotency?region=eu-west-1&sort_key=sk&prefix=payments".parse()?;
/// assert_eq!(url.options().table_name(), "idempotency");
/// assert!("dynamodb://idempotency?regoin=eu-west-1".parse::<DynamoDbUrl>().is_err());
/// # Ok::<(), oncely::store::UrlError>(())
/// ```
#[derive(Clone, Debug)]
pub struct DynamoDbUrl {
    options: DynamoDbOptions,
}

impl DynamoDbUrl {
    /// The options the URL set.
    pub fn options(&self) -> &DynamoDbOptions {
        &self.options
    }

    /// The options, for [`DynamoDbStore::connect`] or [`DynamoDbStore::create_table`].
    pub fn into_options(self) -> DynamoDbOptions {
        self.options
    }

    /// Connects ([`DynamoDbStore::connect`]).
    ///
    /// # Errors
    /// As [`DynamoDbStore::connect`].
    pub async fn open(self) -> Result<DynamoDbStore, OpenError> {
        DynamoDbStore::connect(self.options).await
    }
}

impl FromStr for DynamoDbUrl {
    type Err = UrlError;

    fn from_str(text: &str) -> Result<Self, UrlError> {
        let (base, pairs) = url::split_options(text);
        let Some(table) = base.strip_prefix("dynamodb://") else {
            return Err(UrlError::Scheme { expected: "dynamodb://TABLE" });
        };
        if table.is_empty() {
            return Err(UrlError::Malformed("no table: use dynamodb://TABLE".into()));
        }
        let mut options = DynamoDbOptions::new(table).map_err(|e| UrlError::Malformed(reason(e)))?;
        for (name, value) in pairs {
            let invalid = |option: &'static str| move |e: OpenError| UrlError::invalid(option, reason(e));
            options = match name {
                "region" if !value.is_empty() => options.region(value),
                "region" => return Err(UrlError::invalid("region", "must not be empty")),
                "endpoint" if value.starts_with("http://") || value.starts_with("https://") => options.endpoint(value),
                "endpoint" => {
                    return Err(UrlError::invalid("endpoint", format!("{value:?}: use http://HOST:PORT or https://…")));
                }
                "partition_key" => options.partition_key(value).map_err(invalid("partition_key"))?,
                "sort_key" => options.sort_key(value).map_err(invalid("sort_key"))?,
                "prefix" => options.prefix(value).map_err(invalid("prefix"))?,
                "ttl_attribute" => options.ttl_attribute(value).map_err(invalid("ttl_attribute"))?,
                "timeout" => options.timeout(url::duration("timeout", value)?),
                "connect_timeout" => options.connect_timeout(url::duration("connect_timeout", value)?),
                "max_attempts" => options.max_attempts(url::count("max_attempts", value)?),
                _ => return Err(UrlError::UnknownOption { option: name.to_string(), known: KNOWN }),
            };
        }
        if options.sort_key.as_deref() == Some(options.partition_key.as_str())
            || options.ttl_attribute == options.partition_key
            || options.sort_key.as_deref() == Some(options.ttl_attribute.as_str())
        {
            return Err(UrlError::Malformed(
                "partition_key, sort_key and ttl_attribute must be three different attributes".into(),
            ));
        }
        Ok(DynamoDbUrl { options })
    }
}

/// What an [`OpenError::InvalidUrl`] says, without the "invalid DynamoDB store URL" its
/// `Display` puts first.
fn reason(error: OpenError) -> String {
    match error {
        OpenError::InvalidUrl(why) => why,
        other => other.to_string(),
    }
}

impl DynamoDbStore {
    /// What this store can do: list its records (by scanning the table: an admin tool's
    /// call, not a metrics scrape's), but not count them cheaply (a count is the same
    /// scan); shared by every process with access to the table; durable (DynamoDB
    /// acknowledges a write once it is stored in several availability zones); results of
    /// at most [`MAX_PAYLOAD_BYTES`](crate::MAX_PAYLOAD_BYTES).
    pub fn abilities(&self) -> StoreAbilities {
        StoreAbilities::NONE
            .counts_records_cheaply(false)
            .lists_records(true)
            .shared_between_processes(true)
            .durable(true)
            .max_payload(crate::MAX_PAYLOAD_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(text: &str) -> Result<DynamoDbUrl, UrlError> {
        text.parse()
    }

    #[test]
    fn options_come_from_the_url() {
        let url = parse(
            "dynamodb://idem.table-1?region=eu-west-1&endpoint=http://127.0.0.1:8000&partition_key=pk&sort_key=sk\
             &prefix=pay&ttl_attribute=expires&timeout=250ms&connect_timeout=2s&max_attempts=5",
        )
        .expect("parses");
        let options = url.options();
        assert_eq!(options.table_name(), "idem.table-1");
        assert_eq!(options.region.as_deref(), Some("eu-west-1"));
        assert_eq!(options.endpoint.as_deref(), Some("http://127.0.0.1:8000"));
        assert_eq!((options.partition_key.as_str(), options.sort_key.as_deref()), ("pk", Some("sk")));
        assert_eq!((options.prefix.as_deref(), options.ttl_attribute.as_str()), (Some("pay"), "expires"));
        assert_eq!((options.timeout, options.connect_timeout), (Duration::from_millis(250), Duration::from_secs(2)));
        assert_eq!(options.max_attempts, 5);

        let plain = parse("dynamodb://oncely").expect("parses");
        let options = plain.options();
        assert_eq!((options.partition_key.as_str(), options.sort_key.as_deref()), ("id", None));
        assert_eq!((options.prefix.as_deref(), options.ttl_attribute.as_str()), (None, "ttl"));
        assert_eq!((options.region.as_deref(), options.endpoint.as_deref()), (None, None));
    }

    #[test]
    fn bad_urls_name_what_is_wrong() {
        for (bad, option) in [
            ("dynamodb://t12?regoin=x", "regoin"),
            ("dynamodb://t12?region=", "region"),
            ("dynamodb://t12?endpoint=127.0.0.1:8000", "endpoint"),
            ("dynamodb://t12?partition_key=a b", "partition_key"),
            ("dynamodb://t12?sort_key=", "sort_key"),
            ("dynamodb://t12?sort_key=state", "sort_key"),
            ("dynamodb://t12?prefix=a#b", "prefix"),
            ("dynamodb://t12?ttl_attribute=payload", "ttl_attribute"),
            ("dynamodb://t12?timeout=soon", "timeout"),
            ("dynamodb://t12?connect_timeout=0s", "connect_timeout"),
            ("dynamodb://t12?max_attempts=0", "max_attempts"),
        ] {
            let error = parse(bad).err().unwrap_or_else(|| panic!("{bad} is refused"));
            assert_eq!(error.option(), Some(option), "{bad}: {error}");
            assert!(error.to_string().contains(option), "{bad}: {error}");
        }
        assert!(matches!(parse("dynamodb://"), Err(UrlError::Malformed(_))));
        assert!(
            matches!(parse("dynamodb://ab"), Err(UrlError::Malformed(_))),
            "DynamoDB names have 3 characters or more"
        );
        assert!(matches!(parse("dynamodb://a/b"), Err(UrlError::Malformed(_))));
        assert!(matches!(parse("dynamodb://t12?sort_key=id"), Err(UrlError::Malformed(_))));
        assert!(matches!(parse("redis://t12"), Err(UrlError::Scheme { .. })));
    }
}
