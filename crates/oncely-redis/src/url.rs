//! The Redis store's URL parsed into its [`Topology`] and [`RedisOptions`], the way
//! every store crate parses its own; and the store's abilities.

use std::fmt;
use std::str::FromStr;

use oncely::store::StoreAbilities;
use oncely::store::url::{self, UrlError, redacted};

use crate::connection::{check_tls, client_cert};
use crate::{OpenError, RedisOptions, RedisStore, Topology};

const KNOWN: &str = "prefix=NAME, timeout=DURATION, connect_timeout=DURATION, replica=URL, ca_file=PATH, \
                     cert_file=PATH, key_file=PATH";

/// A parsed `redis://`, `rediss://`, `redis+cluster://` or `rediss+cluster://` URL: where
/// the records are and the store's options. The grammar is [`Topology::parse`]'s; the options' errors are typed
/// ([`UrlError`], naming the option) like every store's.
///
/// ```no_run
/// use oncely_redis::RedisUrl;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let store = "redis://127.0.0.1:6379?prefix=payments&timeout=500ms".parse::<RedisUrl>()?.open().await?;
/// # let _ = store; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisUrl {
    topology: Topology,
    options: RedisOptions,
}

impl RedisUrl {
    /// The server or the cluster's nodes.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The options the URL set.
    pub fn options(&self) -> &RedisOptions {
        &self.options
    }

    /// The topology and the options, for [`RedisStore::connect`].
    pub fn into_parts(self) -> (Topology, RedisOptions) {
        (self.topology, self.options)
    }

    /// Connects ([`RedisStore::connect`]).
    ///
    /// # Errors
    /// As [`RedisStore::connect`].
    pub async fn open(self) -> Result<RedisStore, OpenError> {
        RedisStore::connect(&self.topology, self.options).await
    }
}

impl fmt::Debug for RedisUrl {
    /// Passwords shown as `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, nodes) = match &self.topology {
            Topology::Standalone(url) => ("Standalone", vec![redacted(url)]),
            Topology::Cluster(nodes) => ("Cluster", nodes.iter().map(|node| redacted(node)).collect()),
        };
        f.debug_struct("RedisUrl").field(kind, &nodes).field("options", &self.options).finish()
    }
}

impl FromStr for RedisUrl {
    type Err = UrlError;

    fn from_str(text: &str) -> Result<Self, UrlError> {
        let (base, pairs) = url::split_options(text);
        let mut options = RedisOptions::default();
        let (mut cert_file, mut key_file) = (None, None);
        for (name, value) in pairs {
            options = match name {
                "prefix" => options.prefix(value).map_err(|e| UrlError::invalid("prefix", reason(e)))?,
                "timeout" => options.response_timeout(url::duration("timeout", value)?),
                "connect_timeout" => options.connection_timeout(url::duration("connect_timeout", value)?),
                "replica" => options.replica(value).map_err(|e| UrlError::invalid("replica", reason(e)))?,
                "ca_file" => options.ca_file(value),
                "cert_file" => {
                    cert_file = Some(value);
                    options
                }
                "key_file" => {
                    key_file = Some(value);
                    options
                }
                _ => return Err(UrlError::UnknownOption { option: name.to_string(), known: KNOWN }),
            };
        }
        let scheme = base.split_once("://").map(|(scheme, _)| scheme);
        if !matches!(scheme, Some("redis" | "redis+cluster" | "rediss" | "rediss+cluster")) {
            return Err(UrlError::Scheme { expected: "redis://, rediss://, redis+cluster:// or rediss+cluster://" });
        }
        let given = if cert_file.is_some() { "cert_file" } else { "key_file" };
        let options = client_cert(options, cert_file, key_file).map_err(|why| UrlError::invalid(given, why))?;
        // Without the options, `Topology::parse` reads only where the records are.
        let (topology, _) = Topology::parse(base).map_err(|e| {
            let shown = format!("{}: ", redacted(base));
            let why = reason(e);
            UrlError::Malformed(why.strip_prefix(&shown).unwrap_or(&why).to_string())
        })?;
        let given = if options.tls.ca_file.is_some() { "ca_file" } else { "cert_file" };
        check_tls(&topology, &options).map_err(|why| UrlError::invalid(given, why))?;
        Ok(RedisUrl { topology, options })
    }
}

/// What an [`OpenError::InvalidUrl`] says, without the "invalid Redis store URL" its
/// `Display` puts first.
fn reason(error: OpenError) -> String {
    match error {
        OpenError::InvalidUrl(why) => why,
        other => other.to_string(),
    }
}

impl RedisStore {
    /// What this store can do: list its records (by scanning the key space: an admin
    /// tool's call, not a metrics scrape's), but not count them cheaply (a count is the
    /// same scan); shared by every process on the server; durable as the server's
    /// persistence settings make it (see the [crate docs](crate)).
    pub fn abilities(&self) -> StoreAbilities {
        StoreAbilities::NONE
            .counts_records_cheaply(false)
            .lists_records(true)
            .shared_between_processes(true)
            .durable(true)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(text: &str) -> Result<RedisUrl, UrlError> {
        text.parse()
    }

    #[test]
    fn topology_and_options_come_from_the_url() {
        let url =
            parse("redis://:s3cret@127.0.0.1:6379/2?prefix=pay&timeout=250ms&connect_timeout=2s").expect("parses");
        assert_eq!(url.topology(), &Topology::Standalone("redis://:s3cret@127.0.0.1:6379/2".into()));
        assert_eq!(url.options().prefix_str(), "pay");
        assert_eq!(url.options().response_timeout, Duration::from_millis(250));
        assert_eq!(url.options().connection_timeout, Duration::from_secs(2));
        assert!(!format!("{url:?}").contains("s3cret"));

        let replicated = parse("redis://10.0.0.1:6379?replica=redis://:s3cret@10.0.0.2:6379/0").expect("parses");
        assert_eq!(replicated.options().replica_url(), Some("redis://:s3cret@10.0.0.2:6379/0"));
        assert_eq!(url.options().replica_url(), None, "replica reads are opt-in");
        assert!(!format!("{replicated:?}").contains("s3cret"), "{replicated:?}");

        let cluster = parse("redis+cluster://10.0.0.1:7000,10.0.0.2:7000").expect("parses");
        assert_eq!(
            cluster.topology(),
            &Topology::Cluster(vec!["redis://10.0.0.1:7000".into(), "redis://10.0.0.2:7000".into()])
        );
        assert_eq!(cluster.options().prefix_str(), "oncely");
    }

    #[test]
    fn tls_urls_take_their_files() {
        let url = parse("rediss://:s3cret@db.example:6380/0?prefix=pay&ca_file=/etc/ca.pem").expect("parses");
        assert_eq!(url.topology(), &Topology::Standalone("rediss://:s3cret@db.example:6380/0".into()));
        assert!(url.topology().is_tls());
        assert_eq!(url.options().ca_file_path(), Some(std::path::Path::new("/etc/ca.pem")));
        assert_eq!(url.options().client_cert_files(), None);
        assert!(!format!("{url:?}").contains("s3cret"), "{url:?}");

        let cluster = parse("rediss+cluster://10.0.0.1:7000,10.0.0.2:7000?cert_file=/c.pem&key_file=/c.key&prefix=p")
            .expect("parses");
        assert_eq!(
            cluster.topology(),
            &Topology::Cluster(vec!["rediss://10.0.0.1:7000".into(), "rediss://10.0.0.2:7000".into()])
        );
        let (cert, key) = cluster.options().client_cert_files().expect("a client certificate");
        assert_eq!((cert.to_str(), key.to_str()), (Some("/c.pem"), Some("/c.key")));
        assert_eq!(cluster.options().prefix_str(), "p");
        assert_eq!(parse("rediss://h").expect("no files: the platform's roots").options().ca_file_path(), None);
        assert!(!parse("redis://h").expect("parses").topology().is_tls());
    }

    #[test]
    fn bad_urls_name_what_is_wrong() {
        for (bad, option) in [
            ("redis://127.0.0.1?prefix=a{b}", "prefix"),
            ("redis://127.0.0.1?timeout=soon", "timeout"),
            ("redis://127.0.0.1?connect_timeout=0s", "connect_timeout"),
            ("redis://127.0.0.1?prefx=a", "prefx"),
            ("redis://127.0.0.1?replica=http://r:1", "replica"),
            ("redis://127.0.0.1?replica=redis://", "replica"),
            ("rediss://127.0.0.1?cert_file=/c.pem", "cert_file"),
            ("rediss://127.0.0.1?key_file=/c.key", "key_file"),
            ("redis://127.0.0.1?ca_file=/ca.pem", "ca_file"),
            ("redis+cluster://127.0.0.1:1?cert_file=/c.pem&key_file=/c.key", "cert_file"),
        ] {
            let error = parse(bad).err().unwrap_or_else(|| panic!("{bad} is refused"));
            assert_eq!(error.option(), Some(option), "{bad}: {error}");
            assert!(error.to_string().contains(option), "{bad}: {error}");
        }
        assert_eq!(parse("redis://").err(), Some(UrlError::Malformed("no host".into())));
        for half in ["rediss://h?cert_file=/c.pem", "rediss://h?key_file=/c.key"] {
            let error = parse(half).expect_err("half a client certificate").to_string();
            assert!(error.contains("cert_file and key_file go together"), "{half}: {error}");
        }
        assert!(matches!(parse("memory://"), Err(UrlError::Scheme { .. })));
        assert!(matches!(parse("127.0.0.1:6379"), Err(UrlError::Scheme { .. })));
    }
}
