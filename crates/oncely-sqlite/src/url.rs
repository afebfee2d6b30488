//! The SQLite store's URL, `sqlite://PATH[?options]`, parsed into a path and
//! [`SqliteOptions`]; and the store's abilities.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use oncely::StoreError;
use oncely::store::StoreAbilities;
use oncely::store::url::{self, UrlError};

use crate::{Durability, SqliteOptions, SqliteStore};

const KNOWN: &str = "durability=sync|relaxed, sync_interval=DURATION, max_records=N, max_bytes=SIZE, busy_timeout=DURATION, mmap_size=SIZE, look_ups=threads|inline";

/// A parsed `sqlite://` URL: where the file is and how to open it.
///
/// `sqlite://PATH[?durability=sync|relaxed&sync_interval=1s&max_records=N&max_bytes=SIZE&busy_timeout=5s&mmap_size=SIZE&look_ups=threads|inline]`.
/// `PATH` is taken as written (`sqlite://oncely.db` is relative to the working
/// directory, `sqlite:///var/lib/oncely.db` absolute). The options, with
/// [`SqliteOptions`]' defaults when absent:
///
/// - `durability=sync|relaxed`: [`Durability::Sync`] (the default) or
///   [`Durability::Relaxed`], which syncs every `sync_interval` (default 1 s);
/// - `max_records=N`, `max_bytes=SIZE` (as `512MiB`): the bounds;
/// - `busy_timeout=DURATION`: how long a write waits for another process's lock;
/// - `mmap_size=SIZE` (as `1GiB`; `0`, the default, for none): how much of the file is
///   read through a memory map ([`SqliteOptions::mmap_size`]);
/// - `look_ups=threads|inline`: where a claim's look-up runs, on a reader thread (the
///   default) or on the caller's thread when it can start at once
///   ([`SqliteOptions::inline_look_ups`]: less CPU and latency under light load, more at
///   saturation).
///
/// ```no_run
/// use oncely_sqlite::SqliteUrl;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let store = "sqlite://oncely.db?durability=relaxed".parse::<SqliteUrl>()?.open().await?;
/// # let _ = store; Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct SqliteUrl {
    path: PathBuf,
    options: SqliteOptions,
}

impl SqliteUrl {
    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options the URL set.
    pub fn options(&self) -> &SqliteOptions {
        &self.options
    }

    /// The file and the options, for [`SqliteStore::open`].
    pub fn into_parts(self) -> (PathBuf, SqliteOptions) {
        (self.path, self.options)
    }

    /// Opens the store ([`SqliteStore::open`]) on a blocking thread: opening does file
    /// I/O and may wait for another process's lock.
    ///
    /// # Errors
    /// As [`SqliteStore::open`].
    pub async fn open(self) -> Result<SqliteStore, StoreError> {
        tokio::task::spawn_blocking(move || SqliteStore::open(&self.path, self.options))
            .await
            .map_err(|e| StoreError::unavailable(format!("opening the SQLite store: {e}")))?
    }
}

impl fmt::Display for SqliteUrl {
    /// The file, as `sqlite://PATH` (without the options).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sqlite://{}", self.path.display())
    }
}

impl FromStr for SqliteUrl {
    type Err = UrlError;

    fn from_str(text: &str) -> Result<Self, UrlError> {
        let (base, options) = url::split_options(text);
        let path = base.strip_prefix("sqlite://").ok_or(UrlError::Scheme { expected: "sqlite://PATH" })?;
        if path.is_empty() {
            return Err(UrlError::Malformed("no file: use sqlite://PATH, as sqlite://oncely.db".into()));
        }
        let mut relaxed = false;
        let mut interval = Duration::from_secs(1);
        let mut parsed = SqliteOptions::default();
        for (name, value) in options {
            match name {
                "durability" => {
                    relaxed = match value {
                        "sync" => false,
                        "relaxed" => true,
                        _ => return Err(UrlError::invalid("durability", format!("{value:?}: use sync or relaxed"))),
                    }
                }
                "sync_interval" => interval = url::duration("sync_interval", value)?,
                "max_records" => parsed = parsed.max_records(url::count("max_records", value)?),
                "max_bytes" => parsed = parsed.max_bytes(url::size("max_bytes", value)?),
                "busy_timeout" => parsed = parsed.busy_timeout(url::duration("busy_timeout", value)?),
                "mmap_size" if value == "0" => parsed = parsed.mmap_size(0),
                "mmap_size" => parsed = parsed.mmap_size(url::size("mmap_size", value)?),
                "look_ups" => {
                    parsed = parsed.inline_look_ups(match value {
                        "inline" => true,
                        "threads" => false,
                        _ => return Err(UrlError::invalid("look_ups", format!("{value:?}: use inline or threads"))),
                    })
                }
                _ => return Err(UrlError::UnknownOption { option: name.to_string(), known: KNOWN }),
            }
        }
        if relaxed {
            parsed = parsed.durability(Durability::Relaxed { interval });
        }
        Ok(SqliteUrl { path: PathBuf::from(path), options: parsed })
    }
}

impl SqliteStore {
    /// What this store can do: count and list its records with one local query each;
    /// share the file with other processes on the same machine (see the
    /// [crate docs](crate)); keep its records across restarts.
    pub fn abilities(&self) -> StoreAbilities {
        StoreAbilities::NONE
            .counts_records_cheaply(true)
            .lists_records(true)
            .shared_between_processes(true)
            .durable(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DEFAULT_MAX_BYTES, DEFAULT_MAX_RECORDS};

    fn parse(text: &str) -> Result<SqliteUrl, UrlError> {
        text.parse()
    }

    #[test]
    fn path_and_options_come_from_the_url() {
        let default = parse("sqlite://oncely.db").expect("parses");
        assert_eq!(default.path(), Path::new("oncely.db"));
        let o = default.options();
        assert_eq!(
            (o.durability, o.max_records, o.max_bytes),
            (Durability::Sync, DEFAULT_MAX_RECORDS, DEFAULT_MAX_BYTES)
        );
        assert_eq!((o.busy_timeout, o.mmap_size), (Duration::from_secs(5), crate::DEFAULT_MMAP_SIZE));
        assert!(!o.inline_look_ups);
        assert!(!parse("sqlite://o.db?look_ups=threads").expect("parses").options().inline_look_ups);
        assert!(parse("sqlite://o.db?look_ups=inline").expect("parses").options().inline_look_ups);

        let set = parse("sqlite:///var/lib/o.db?durability=relaxed&sync_interval=250ms&max_records=10&max_bytes=1MiB&busy_timeout=100ms&mmap_size=256MiB")
            .expect("parses");
        assert_eq!(set.path(), Path::new("/var/lib/o.db"));
        assert_eq!(set.to_string(), "sqlite:///var/lib/o.db");
        let o = set.options();
        assert_eq!(o.durability, Durability::Relaxed { interval: Duration::from_millis(250) });
        assert_eq!((o.max_records, o.max_bytes, o.busy_timeout), (10, 1 << 20, Duration::from_millis(100)));
        assert_eq!(o.mmap_size, 256 << 20);
        assert_eq!(parse("sqlite://o.db?mmap_size=0").expect("parses").options().mmap_size, 0);
        let relaxed = parse("sqlite://o.db?durability=relaxed").expect("parses");
        assert_eq!(relaxed.options().durability, Durability::Relaxed { interval: Duration::from_secs(1) });
    }

    #[test]
    fn bad_urls_name_what_is_wrong() {
        for (bad, option) in [
            ("sqlite://o.db?max_records=0", "max_records"),
            ("sqlite://o.db?max_records=x", "max_records"),
            ("sqlite://o.db?max_bytes=0", "max_bytes"),
            ("sqlite://o.db?max_bytes=1 furlong", "max_bytes"),
            ("sqlite://o.db?durability=sometimes", "durability"),
            ("sqlite://o.db?sync_interval=often", "sync_interval"),
            ("sqlite://o.db?busy_timeout=0s", "busy_timeout"),
            ("sqlite://o.db?mmap_size=lots", "mmap_size"),
            ("sqlite://o.db?journal=wal", "journal"),
            ("sqlite://o.db?look_ups=sometimes", "look_ups"),
        ] {
            let error = parse(bad).err().unwrap_or_else(|| panic!("{bad} is refused"));
            assert_eq!(error.option(), Some(option), "{bad}: {error}");
            assert!(error.to_string().contains(option), "{bad}: {error}");
        }
        assert!(matches!(parse("sqlite://"), Err(UrlError::Malformed(_))));
        assert!(matches!(parse("sqlite://?max_records=3"), Err(UrlError::Malformed(_))));
        assert!(matches!(parse("memory://"), Err(UrlError::Scheme { .. })));
    }

    #[tokio::test]
    async fn a_parsed_url_opens_the_store() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}?max_records=10", dir.path().join("o.db").display());
        let store = parse(&url).expect("parses").open().await.expect("opens");
        assert!(store.abilities().durable && store.abilities().counts_records_cheaply);
        assert_eq!(store.path(), dir.path().join("o.db"));
    }
}
