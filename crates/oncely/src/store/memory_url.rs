//! The memory store's URL, `memory://[?max_entries=N&max_bytes=SIZE&evict_completed_when_full=BOOL]`,
//! parsed into a [`MemoryStoreBuilder`], and the memory store's abilities.

use std::str::FromStr;

use super::abilities::StoreAbilities;
use super::memory::{DEFAULT_MAX_BYTES, MemoryStore, MemoryStoreBuilder};
use super::url::{self, UrlError};

/// The bound in records of a memory store opened from a URL without `max_entries`: 1
/// million. A URL names a store for a server (the gateway, an example), where unique
/// keys are client input, so it is always bounded in records as well as in bytes.
pub const URL_DEFAULT_MAX_ENTRIES: usize = 1_000_000;

const KNOWN: &str = "max_entries=N, max_bytes=SIZE, evict_completed_when_full=true|false";

impl FromStr for MemoryStoreBuilder {
    type Err = UrlError;

    /// Parses `memory://` with these options:
    ///
    /// - `max_entries=N`: at most N records (default [`URL_DEFAULT_MAX_ENTRIES`]);
    /// - `max_bytes=SIZE`: at most SIZE bytes, as `512MiB` (default
    ///   [`DEFAULT_MAX_BYTES`], 1 GiB);
    /// - `evict_completed_when_full=true|false` (default `false`): see
    ///   [`MemoryStoreBuilder::evict_completed_when_full`].
    ///
    /// ```
    /// use oncely::MemoryStoreBuilder;
    ///
    /// let store = "memory://?max_entries=1000&max_bytes=64MiB".parse::<MemoryStoreBuilder>()?.build();
    /// # let _ = store;
    /// # Ok::<(), oncely::store::UrlError>(())
    /// ```
    fn from_str(text: &str) -> Result<Self, UrlError> {
        let (base, options) = url::split_options(text);
        match base.strip_prefix("memory://") {
            Some("") => {}
            Some(_) => return Err(UrlError::Malformed("memory:// takes no path; options go after `?`".into())),
            None => return Err(UrlError::Scheme { expected: "memory://" }),
        }
        let mut builder =
            MemoryStoreBuilder::default().max_entries(URL_DEFAULT_MAX_ENTRIES).max_bytes(DEFAULT_MAX_BYTES);
        for (name, value) in options {
            builder = match name {
                "max_entries" => builder.max_entries(url::count("max_entries", value)?),
                "max_bytes" => {
                    let bytes = url::size("max_bytes", value)?;
                    let bytes = usize::try_from(bytes)
                        .map_err(|_| UrlError::invalid("max_bytes", format!("{value:?} is too large")))?;
                    builder.max_bytes(bytes)
                }
                "evict_completed_when_full" => {
                    builder.evict_completed_when_full(url::flag("evict_completed_when_full", value)?)
                }
                _ => return Err(UrlError::UnknownOption { option: name.to_string(), known: KNOWN }),
            };
        }
        Ok(builder)
    }
}

impl MemoryStore {
    /// What this store can do: count and list its records cheaply (they are in this
    /// process); not shared with other processes, not durable.
    pub fn abilities(&self) -> StoreAbilities {
        StoreAbilities::NONE.counts_records_cheaply(true).lists_records(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MemoryStoreBuilder, UrlError> {
        text.parse()
    }

    /// The builder's fields are private to `memory`; its `Debug` shows them.
    fn bounds(builder: &MemoryStoreBuilder) -> String {
        let shown = format!("{builder:?}");
        shown[shown.find("max_entries").expect("shown")..shown.find(", shards").expect("shown")].to_string()
    }

    #[test]
    fn bounds_come_from_the_url_with_the_server_defaults() {
        assert_eq!(
            bounds(&parse("memory://").expect("memory://")),
            format!("max_entries: {URL_DEFAULT_MAX_ENTRIES}, max_bytes: {DEFAULT_MAX_BYTES}, evict_completed: false")
        );
        let set = parse("memory://?max_bytes=512MiB&max_entries=10&evict_completed_when_full=true").expect("parses");
        assert_eq!(bounds(&set), format!("max_entries: 10, max_bytes: {}, evict_completed: true", 512 << 20));
    }

    #[test]
    fn bad_urls_name_what_is_wrong() {
        for (bad, option) in [
            ("memory://?max_entries=0", "max_entries"),
            ("memory://?max_entries=-1", "max_entries"),
            ("memory://?max_entries=lots", "max_entries"),
            ("memory://?max_bytes=0", "max_bytes"),
            ("memory://?max_bytes=12 parsecs", "max_bytes"),
            ("memory://?max_size=1", "max_size"),
            ("memory://?evict_completed_when_full=yes", "evict_completed_when_full"),
        ] {
            let error = parse(bad).err().unwrap_or_else(|| panic!("{bad} is refused"));
            assert_eq!(error.option(), Some(option), "{bad}: {error}");
            assert!(error.to_string().contains(option), "{bad}: {error}");
        }
        assert!(matches!(parse("memory://somewhere"), Err(UrlError::Malformed(_))));
        assert!(matches!(parse("sqlite://x"), Err(UrlError::Scheme { .. })));
    }
}
