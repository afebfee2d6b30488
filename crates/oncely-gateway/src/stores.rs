//! Store URLs, and the instrumented wrapper every store is used through.
//!
//! | URL | store |
//! |---|---|
//! | `memory://` | in-process, lost on restart ([`oncely::MemoryStore`]); at most 1,000,000 records and 1 GiB (`?max_entries=N&max_bytes=SIZE` to change; sizes like `512MiB`); `?evict_completed_when_full=true` lets a full store evict unexpired results instead of refusing new keys |
//! | `sqlite://PATH` | embedded, durable (the default: `sqlite://oncely.db`); `?durability=relaxed` syncs on an interval instead of per completion; at most 10,000,000 records and 1 GiB (`?max_records=N&max_bytes=SIZE` to change); `?busy_timeout=5s`: how long a write waits for another process's lock before the store answers unavailable |
//! | `redis://[user:pass@]HOST:PORT[/DB]` | a shared Redis/Valkey server ([`oncely_redis`]); `?prefix=NAME` (default `oncely`), `?timeout=1s`, `?connect_timeout=1s` |
//! | `redis+cluster://HOST:PORT,HOST:PORT,…` | a Redis Cluster, same options |
//! | `postgres://USER:PASSWORD@HOST:PORT/DATABASE` (or `postgresql://`) | shared by every gateway on the database ([`oncely_postgres::PostgresStore`]); options `table=NAME` (default `oncely_records`), `pool=N` connections (default 16), `acquire_timeout=5s`, `statement_timeout=5s`, `sweep_interval=60s`; other query parameters (`sslmode`, …) go to the driver |
//!
//! A bounded store that is full refuses new keys (503 with `Retry-After`) and keeps every
//! record until its retention ends: it never forgets a result to make room. Bytes are
//! counted as each store documents ([`oncely::store::memory::RECORD_OVERHEAD`],
//! [`oncely_sqlite::RECORD_OVERHEAD`]); the defaults keep the memory store near 1 GiB of
//! the process and the SQLite file near 1 GiB of disk, safe on a machine of a few GiB.
//!
//! Further stores plug in here, in [`open`], without touching the proxy.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use oncely::store::Notified;
use oncely::{
    ClaimId, ClaimOutcome, ClaimRequest, IdempotencyKey, MemoryStore, Record, Scope, StorageKey, Store, StoreError,
    StoreStats,
};
use oncely_postgres::{PostgresOptions, PostgresStore};
use oncely_redis::RedisStore;
use oncely_sqlite::{Durability, SqliteOptions, SqliteStore};

/// The store the gateway runs on, chosen at start from a URL.
pub type DynStore = Arc<dyn Store>;

/// The default store URL.
pub const DEFAULT_STORE: &str = "sqlite://oncely.db";

/// Whether counting the store's records is cheap enough to do on every metrics scrape:
/// not on Redis, whose count scans the key space.
pub fn counts_records_cheaply(url: &str) -> bool {
    !url.starts_with("redis")
}

/// Opens the store a URL names, wrapped so that every call is timed in the
/// `oncely_store_seconds` histogram.
pub async fn open(url: &str) -> Result<DynStore, String> {
    let store: DynStore = match url.split_once("://") {
        Some(("memory", rest)) => open_memory(rest)?,
        Some(("sqlite", path)) if !path.is_empty() => open_sqlite(path).await?,
        Some(("redis" | "rediss" | "redis+cluster" | "rediss+cluster", _)) => {
            Arc::new(RedisStore::open(url).await.map_err(|e| e.to_string())?)
        }
        Some(("postgres" | "postgresql", _)) => open_postgres(url).await?,
        Some(("dynamodb", _)) => {
            return Err(format!(
                "{url}: this store is not part of this build yet; available: memory://, sqlite://PATH, redis://…, redis+cluster://…, postgres://…"
            ));
        }
        _ => {
            return Err(format!(
                "{url}: not a store URL; use memory://, sqlite://PATH, redis://HOST:PORT, redis+cluster://HOST:PORT,… or postgres://…"
            ));
        }
    };
    Ok(Arc::new(Instrumented(store)))
}

/// The memory store's default bound in records.
const MEMORY_MAX_ENTRIES: usize = 1_000_000;
/// The memory store's default bound in bytes: 1 GiB.
const MEMORY_MAX_BYTES: usize = 1 << 30;

/// `memory://[?max_entries=N&max_bytes=SIZE&evict_completed_when_full=BOOL]`. Always
/// bounded, in records and in bytes: unique keys and response sizes are client input, and
/// an unbounded map would let any client grow the process until it is killed. Full, it
/// refuses new keys (503) unless `evict_completed_when_full=true`, which trades the
/// replay of the results it evicts (their retries run again) for staying available.
fn open_memory(rest: &str) -> Result<DynStore, String> {
    let (mut max_entries, mut max_bytes, mut evict) = (MEMORY_MAX_ENTRIES, MEMORY_MAX_BYTES, false);
    for pair in rest.strip_prefix('?').unwrap_or(rest).split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("max_entries", n)) => max_entries = count(n).ok_or_else(|| not_a_count("memory", rest, pair))?,
            Some(("max_bytes", text)) => {
                max_bytes = crate::config::size("max_bytes", text).map_err(|e| format!("memory://{rest}: {e}"))?;
            }
            Some(("evict_completed_when_full", "true")) => evict = true,
            Some(("evict_completed_when_full", "false")) => evict = false,
            _ => {
                return Err(format!(
                    "memory://{rest}: unknown option {pair:?}; use max_entries=N, max_bytes=SIZE, \
                     evict_completed_when_full=true|false"
                ));
            }
        }
    }
    let builder = MemoryStore::builder().max_entries(max_entries).max_bytes(max_bytes);
    Ok(Arc::new(builder.evict_completed_when_full(evict).build()))
}

/// A positive whole number.
fn count<N: std::str::FromStr + Default + PartialOrd>(text: &str) -> Option<N> {
    text.parse().ok().filter(|n| *n > N::default())
}

fn not_a_count(scheme: &str, rest: &str, pair: &str) -> String {
    let name = pair.split_once('=').map_or(pair, |(name, _)| name);
    format!("{scheme}://{rest}: {name} must be a positive whole number")
}

/// `sqlite://PATH[?durability=sync|relaxed&sync_interval=1s&max_records=N&max_bytes=SIZE&busy_timeout=5s]`.
/// The bounds default to [`oncely_sqlite::DEFAULT_MAX_RECORDS`] and
/// [`oncely_sqlite::DEFAULT_MAX_BYTES`].
async fn open_sqlite(rest: &str) -> Result<DynStore, String> {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut durability = Durability::Sync;
    let mut interval = Duration::from_secs(1);
    let mut relaxed = false;
    let mut options = SqliteOptions::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("durability", "sync")) => relaxed = false,
            Some(("durability", "relaxed")) => relaxed = true,
            Some(("sync_interval", text)) => {
                interval =
                    crate::config::duration("sync_interval", text).map_err(|e| format!("sqlite://{rest}: {e}"))?;
            }
            Some(("max_records", n)) => {
                options = options.max_records(count(n).ok_or_else(|| not_a_count("sqlite", rest, pair))?);
            }
            Some(("max_bytes", text)) => {
                let bytes = crate::config::size("max_bytes", text).map_err(|e| format!("sqlite://{rest}: {e}"))?;
                options = options.max_bytes(bytes as u64);
            }
            Some(("busy_timeout", text)) => {
                let timeout =
                    crate::config::duration("busy_timeout", text).map_err(|e| format!("sqlite://{rest}: {e}"))?;
                options = options.busy_timeout(timeout);
            }
            _ => {
                return Err(format!(
                    "sqlite://{rest}: unknown option {pair:?}; use durability=sync|relaxed, sync_interval=DURATION, \
                     max_records=N, max_bytes=SIZE, busy_timeout=DURATION"
                ));
            }
        }
    }
    if relaxed {
        durability = Durability::Relaxed { interval };
    }
    let path = path.to_string();
    let options = options.durability(durability);
    // Opening does file I/O and may wait on another process's lock: off the runtime.
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path, options))
        .await
        .map_err(|e| format!("opening the SQLite store: {e}"))?
        .map_err(|e| format!("sqlite://{rest}: {e}"))?;
    Ok(Arc::new(store))
}

/// `postgres://…[?table=NAME&pool=N&acquire_timeout=D&statement_timeout=D&sweep_interval=D]`:
/// the options named here are the store's; every other query parameter stays in the URL
/// for the driver. Connecting creates the table when missing.
async fn open_postgres(url: &str) -> Result<DynStore, String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut options = PostgresOptions::default();
    let mut driver = Vec::new();
    let bad = |e: crate::config::ConfigError| format!("{}: {e}", redacted(url));
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("table", name)) => options = options.table(name),
            Some(("pool", n)) => {
                let n: u32 = n
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{}: pool must be a positive number", redacted(url)))?;
                options = options.max_connections(n);
            }
            Some(("acquire_timeout", text)) => {
                options = options.acquire_timeout(crate::config::duration("acquire_timeout", text).map_err(bad)?);
            }
            Some(("statement_timeout", text)) => {
                options =
                    options.statement_timeout(Some(crate::config::duration("statement_timeout", text).map_err(bad)?));
            }
            Some(("sweep_interval", text)) => {
                options = options.sweep_interval(crate::config::duration("sweep_interval", text).map_err(bad)?);
            }
            _ => driver.push(pair),
        }
    }
    let url = if driver.is_empty() { base.to_string() } else { format!("{base}?{}", driver.join("&")) };
    let store = PostgresStore::connect(&url, options).await.map_err(|e| format!("{}: {e}", redacted(&url)))?;
    Ok(Arc::new(store))
}

/// `url` with its password replaced by `***`, for messages.
pub fn redacted(url: &str) -> String {
    let url = &redact_password_parameter(url);
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{}", &rest[authority_end..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// `?password=…` (which the PostgreSQL driver also accepts) as `password=***`.
fn redact_password_parameter(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else { return url.to_string() };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{base}?{}", pairs.join("&"))
}

/// Times every store call into `oncely_store_seconds{op}`, and bounds the request path's
/// calls by [`CALL_TIMEOUT`].
struct Instrumented(DynStore);

/// The longest a request-path store call may take, whatever the store's own timeouts: a
/// connection that went silent (a half-open TCP connection, which no server-side
/// statement timeout notices) answers 503 after this, not after the kernel gives up on it
/// minutes later. Above every store's own bound (PostgreSQL: 5 s to get a connection plus
/// a 5 s statement timeout; Redis: 1 s per command; SQLite: a 5 s busy timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

async fn timed<T>(op: &'static str, call: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::timeout(format!("no answer within {CALL_TIMEOUT:?}"))),
    };
    metrics::histogram!("oncely_store_seconds", "op" => op).record(started.elapsed().as_secs_f64());
    result
}

#[async_trait]
impl Store for Instrumented {
    async fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        timed("claim", self.0.claim(request)).await
    }

    async fn complete(
        &self,
        key: &StorageKey,
        claim_id: ClaimId,
        payload: Bytes,
        retention: Duration,
    ) -> Result<(), StoreError> {
        timed("complete", self.0.complete(key, claim_id, payload, retention)).await
    }

    async fn release(&self, key: &StorageKey, claim_id: ClaimId) -> Result<(), StoreError> {
        timed("release", self.0.release(key, claim_id)).await
    }

    async fn touch(&self, key: &StorageKey, claim_id: ClaimId, lease: Duration) -> Result<(), StoreError> {
        timed("touch", self.0.touch(key, claim_id, lease)).await
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        timed("get", self.0.get(key)).await
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        timed("delete", self.0.delete(key)).await
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.0.purge_expired().await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.0.stats().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        timed("ping", self.0.ping()).await
    }

    async fn first_seen(
        &self,
        storage_key: &StorageKey,
        key: &IdempotencyKey,
        scope: &Scope,
        window: Duration,
    ) -> Result<bool, StoreError> {
        timed("first_seen", self.0.first_seen(storage_key, key, scope, window)).await
    }

    async fn list(&self, after: Option<StorageKey>, limit: usize) -> Result<Vec<Record>, StoreError> {
        self.0.list(after, limit).await
    }

    fn subscribe(&self, key: &StorageKey) -> Notified {
        self.0.subscribe(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_store_call_that_never_answers_times_out() {
        let silent = std::future::pending::<Result<(), StoreError>>();
        assert!(matches!(timed("claim", silent).await, Err(StoreError::Timeout(_))));
    }

    #[tokio::test]
    async fn store_bounds_are_parsed_from_the_url_and_bad_ones_refused() {
        for good in [
            "memory://",
            "memory://?max_entries=3",
            "memory://?max_bytes=512MiB&max_entries=10",
            "memory://?max_entries=3&evict_completed_when_full=true",
        ] {
            assert!(open(good).await.is_ok(), "{good}");
        }
        for bad in [
            "memory://?max_entries=0",
            "memory://?max_entries=-1",
            "memory://?max_entries=lots",
            "memory://?max_bytes=0",
            "memory://?max_bytes=12 parsecs",
            "memory://?max_size=1",
            "memory://?evict_completed_when_full=yes",
        ] {
            let error = open(bad).await.err().unwrap_or_else(|| panic!("{bad} is refused"));
            assert!(error.starts_with(bad), "the message names the URL: {error}");
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("oncely.db");
        let url = format!("sqlite://{}?max_records=10&max_bytes=1MiB&durability=relaxed", path.display());
        assert!(open(&url).await.is_ok(), "{url}");
        for bad in ["max_records=0", "max_records=x", "max_bytes=0", "max_bytes=1 furlong"] {
            let url = format!("sqlite://{}?{bad}", path.display());
            assert!(open(&url).await.is_err(), "{url} is refused");
        }
    }

    #[test]
    fn passwords_are_redacted_from_messages() {
        assert_eq!(
            redacted("postgres://app:s3cret@db:5432/app?sslmode=require"),
            "postgres://app:***@db:5432/app?sslmode=require"
        );
        assert_eq!(redacted("postgres://app@db/app"), "postgres://app@db/app");
        assert_eq!(redacted("postgres://db/app"), "postgres://db/app");
        assert_eq!(redacted("postgres://app@db/app?password=s3cret&x=1"), "postgres://app@db/app?password=***&x=1");
        assert_eq!(redacted("redis://:s3cret@127.0.0.1:6379"), "redis://:***@127.0.0.1:6379");
    }
}
