//! Opens any Oncely store from a URL: the one function the gateway, its command line and
//! the examples use, so that each runs on every store.
//!
//! ```no_run
//! use oncely::Oncely;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let opened = oncely_stores::open("sqlite://oncely.db?durability=relaxed").await?;
//! if opened.abilities.counts_records_cheaply { /* export record counts */ }
//! let oncely = Oncely::new(opened.store);
//! # let _ = oncely; Ok(()) }
//! ```
//!
//! Each store crate parses its own URL (`oncely::MemoryStoreBuilder`,
//! [`oncely_sqlite::SqliteUrl`], [`oncely_redis::RedisUrl`],
//! [`oncely_postgres::PostgresUrl`], [`oncely_dynamodb::DynamoDbUrl`], all `FromStr`) and states its abilities; this crate
//! only picks the store by the scheme. Options a store does not know are refused, and
//! every error names the option at fault and shows the URL with its password as `***`.
//!
//! # Store URLs
//!
//! | URL | store |
//! |---|---|
//! | `memory://` | in-process, lost on restart ([`oncely::MemoryStore`]); at most 1,000,000 records and 1 GiB (`?max_entries=N&max_bytes=SIZE` to change; sizes like `512MiB`); `?evict_completed_when_full=true` lets a full store evict unexpired results instead of refusing new keys |
//! | `sqlite://PATH` | embedded, durable ([`oncely_sqlite::SqliteStore`]; the gateway's default is `sqlite://oncely.db`); `?durability=relaxed` syncs on an interval (`sync_interval=1s`) instead of per completion; at most 10,000,000 records and 1 GiB (`?max_records=N&max_bytes=SIZE` to change); `?busy_timeout=5s`: how long a write waits for another process's lock before the store answers unavailable |
//! | `redis://[user:pass@]HOST:PORT[/DB]` | a shared Redis/Valkey server ([`oncely_redis::RedisStore`]); `?prefix=NAME` (default `oncely`), `?timeout=1s`, `?connect_timeout=1s`, `?replica=redis://HOST:PORT` (replays served by a replica; standalone only) |
//! | `redis+cluster://HOST:PORT,HOST:PORT,…` | a Redis Cluster, same options |
//! | `rediss://…`, `rediss+cluster://…` | the same over TLS (rustls; the platform's root certificates); `?ca_file=PATH` trusts that CA bundle instead, `?cert_file=PATH&key_file=PATH` presents a client certificate (mutual TLS); see [`oncely_redis`'s TLS section](oncely_redis#tls) |
//! | `postgres://USER:PASSWORD@HOST:PORT/DATABASE` (or `postgresql://`) | shared by every process on the database ([`oncely_postgres::PostgresStore`]); options `table=NAME` (default `oncely_records`), `pool=N` connections (default 16), `acquire_timeout=5s`, `statement_timeout=5s`, `sweep_interval=60s`; other query parameters go to the driver, among them TLS as libpq spells it: `sslmode=verify-full` (the default, `prefer`, may fall back to plain text), `sslrootcert=PATH`, `sslcert=PATH&sslkey=PATH`; see [`oncely_postgres`'s TLS section](oncely_postgres#tls) |
//! | `dynamodb://TABLE` | a DynamoDB table shared by every process with access to it ([`oncely_dynamodb::DynamoDbStore`]; create it with `oncely dynamodb create-table`); credentials and region from the usual AWS chain; options `region=NAME`, `endpoint=URL` (emulators; on loopback any credentials), `partition_key=NAME` (default `id`), `sort_key=NAME` and `prefix=NAME` (a table shared with other data), `ttl_attribute=NAME` (default `ttl`), `timeout=2s` per attempt, `connect_timeout=1s`, `max_attempts=3` |
//!
//! Durations are humantime (`250ms`, `30s`, `1h`), sizes bytesize (`1000`, `512KiB`,
//! `1GiB`), counts positive whole numbers; zero is refused for each.
//!
//! A bounded store that is full refuses new keys (the HTTP layer answers 503 with
//! `Retry-After`) and keeps every record until its retention ends: it never forgets a
//! result to make room. Bytes are counted as each store documents
//! ([`oncely::store::memory::RECORD_OVERHEAD`], [`oncely_sqlite::RECORD_OVERHEAD`]); the
//! defaults keep the memory store near 1 GiB of the process and the SQLite file near
//! 1 GiB of disk, safe on a machine of a few GiB.
//!
//! # Abilities
//!
//! [`OpenedStore::abilities`] is what the store stated ([`StoreAbilities`]):
//!
//! | store | counts records cheaply | lists records | shared between processes | durable |
//! |---|---|---|---|---|
//! | `memory://` | yes | yes | no | no |
//! | `sqlite://` | yes | yes | yes (one machine) | yes |
//! | `redis://` | no (a count scans the key space) | yes (by scanning) | yes | as the server's persistence |
//! | `postgres://` | yes | yes | yes | yes |
//! | `dynamodb://` | no (a count scans the table) | yes (by scanning) | yes | yes |

use std::fmt;
use std::sync::Arc;

use oncely::store::StoreErrorKind;
use oncely::store::{BoxError, Erasures, StoreAbilities, UrlError};
use oncely::{DynStore, MemoryStoreBuilder};
use oncely_dynamodb::DynamoDbUrl;
use oncely_postgres::PostgresUrl;
use oncely_redis::RedisUrl;
use oncely_sqlite::SqliteUrl;

/// The URL forms [`open`] takes, for help texts and messages.
pub const STORE_URLS: &str = "memory://, sqlite://PATH, redis://HOST:PORT, rediss://HOST:PORT (TLS), redis+cluster://HOST:PORT,…, \
                              postgres://USER@HOST/DATABASE, dynamodb://TABLE?region=…";

/// A store opened from a URL, its type erased once, with what it can do.
#[derive(Clone)]
pub struct OpenedStore {
    /// The store, its type erased once: a [`DynStore`] is itself a [`Store`](oncely::Store) and a
    /// [`StoreAdmin`](oncely::StoreAdmin), so it goes to `Oncely::new`, the HTTP layer
    /// or a wrapper as it is, at one boxed future per call.
    pub store: DynStore,
    /// What the store stated it can do.
    pub abilities: StoreAbilities,
    /// The store's count of deletes made through any process sharing it, when it keeps
    /// one cheap enough to read on every cached replay (SQLite: `SqliteStore::erasures`):
    /// a replay cache given it (`oncely::store::ReplayCacheBuilder::erasures`) sees such deletes at once
    /// instead of up to its time-to-live late.
    pub erasures: Option<Arc<dyn Erasures>>,
}

impl OpenedStore {
    fn new(abilities: StoreAbilities, store: DynStore) -> Self {
        Self { store, abilities, erasures: None }
    }
}

impl fmt::Debug for OpenedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenedStore")
            .field("abilities", &self.abilities)
            .field("erasures", &self.erasures.is_some())
            .finish_non_exhaustive()
    }
}

/// Why [`open`] failed. Every variant carries the URL as [`redacted`] shows it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The URL names a store of this build but is malformed, or an option is unknown or
    /// has a bad value ([`UrlError::option`] names it).
    #[error("{url}: {source}")]
    BadUrl {
        /// The URL, password hidden.
        url: String,
        /// What is wrong with it.
        #[source]
        source: UrlError,
    },
    /// The URL's scheme names no store of this build (`mysql://`, or no scheme at all).
    #[error("{url}: not a store URL of this build; use {STORE_URLS}")]
    UnknownScheme {
        /// The URL, password hidden.
        url: String,
    },
    /// The URL is good but the store could not be opened: a server that cannot be
    /// reached, a file that cannot be opened, a table that is not Oncely's.
    #[error("{url}: {source}")]
    Open {
        /// The URL, password hidden.
        url: String,
        /// The store's error (`oncely::StoreError`, `oncely_redis::OpenError` or
        /// `oncely_dynamodb::OpenError`).
        #[source]
        source: BoxError,
    },
}

impl OpenError {
    /// The URL, password hidden.
    pub fn url(&self) -> &str {
        match self {
            Self::BadUrl { url, .. } | Self::UnknownScheme { url } | Self::Open { url, .. } => url,
        }
    }

    /// Whether the URL was fine and its store could not be reached (a server down or
    /// refusing connections, no answer in time): a passing failure, worth a retry later,
    /// unlike a malformed URL or a store that refuses its settings. A command line exits
    /// with a runtime error for it, not a usage error.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let down = oncely_stores::open("postgres://app@127.0.0.1:1/app?acquire_timeout=200ms").await.err();
    /// assert!(down.is_some_and(|e| e.is_unreachable()));
    /// let malformed = oncely_stores::open("postgres://app@127.0.0.1:1/app?pool=0").await.err();
    /// assert!(malformed.is_some_and(|e| !e.is_unreachable()));
    /// # }
    /// ```
    pub fn is_unreachable(&self) -> bool {
        let Self::Open { source, .. } = self else { return false };
        if let Some(error) = source.downcast_ref::<oncely::StoreError>() {
            return matches!(error.kind(), StoreErrorKind::Unavailable | StoreErrorKind::Timeout);
        }
        if let Some(oncely_dynamodb::OpenError::Connect(error)) = source.downcast_ref::<oncely_dynamodb::OpenError>() {
            return matches!(error.kind(), StoreErrorKind::Unavailable | StoreErrorKind::Timeout);
        }
        matches!(source.downcast_ref::<oncely_redis::OpenError>(), Some(oncely_redis::OpenError::Connect(_)))
    }

    /// The option at fault, when the URL was refused for one.
    pub fn option(&self) -> Option<&str> {
        match self {
            Self::BadUrl { source, .. } => source.option(),
            Self::UnknownScheme { .. } | Self::Open { .. } => None,
        }
    }
}

/// Opens the store `url` names (see the [crate docs](crate) for the URLs and their
/// options): parses it with the store crate's own parser, then opens or connects. Call
/// it inside a Tokio runtime (stores start background tasks).
///
/// # Errors
/// [`OpenError::UnknownScheme`] when no store of this build takes the URL,
/// [`OpenError::BadUrl`] when its store refuses it, [`OpenError::Open`] when the store
/// cannot be opened.
pub async fn open(url: &str) -> Result<OpenedStore, OpenError> {
    let bad = |source: UrlError| OpenError::BadUrl { url: redacted(url), source };
    let failed = |source: BoxError| OpenError::Open { url: redacted(url), source };
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    Ok(match scheme {
        Some("memory") => {
            let store = url.parse::<MemoryStoreBuilder>().map_err(bad)?.build();
            OpenedStore::new(store.abilities(), DynStore::new(store))
        }
        Some("sqlite") => {
            let store = url.parse::<SqliteUrl>().map_err(bad)?.open().await.map_err(|e| failed(e.into()))?;
            let erasures = store.erasures();
            OpenedStore { erasures, ..OpenedStore::new(store.abilities(), DynStore::new(store)) }
        }
        Some("redis" | "rediss" | "redis+cluster" | "rediss+cluster") => {
            let store = url.parse::<RedisUrl>().map_err(bad)?.open().await.map_err(|e| failed(e.into()))?;
            OpenedStore::new(store.abilities(), DynStore::new(store))
        }
        Some("postgres" | "postgresql") => {
            let store = url.parse::<PostgresUrl>().map_err(bad)?.open().await.map_err(|e| failed(e.into()))?;
            OpenedStore::new(store.abilities(), DynStore::new(store))
        }
        Some("dynamodb") => {
            let store = url.parse::<DynamoDbUrl>().map_err(bad)?.open().await.map_err(|e| failed(e.into()))?;
            OpenedStore::new(store.abilities(), DynStore::new(store))
        }
        _ => return Err(OpenError::UnknownScheme { url: redacted(url) }),
    })
}

/// `url` with its password replaced by `***`, for messages and logs: in the user
/// information (`postgres://app:***@db/app`) and in a `password=` option.
///
/// ```
/// assert_eq!(oncely_stores::redacted("redis://:s3cret@127.0.0.1:6379"), "redis://:***@127.0.0.1:6379");
/// ```
pub fn redacted(url: &str) -> String {
    oncely::store::url::redacted(url)
}
