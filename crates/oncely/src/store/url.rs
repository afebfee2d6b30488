//! What every store URL shares: the error that names the option at fault, and the one
//! parser per kind of option value, so that `30s`, `512MiB` and `max_records=0` read
//! (and are refused) the same way in every store crate.
//!
//! A store URL is `SCHEME://WHERE?name=value&name=value`. Each store crate parses its
//! own (`"memory://?max_entries=10".parse::<MemoryStoreBuilder>()`, `SqliteUrl`,
//! `PostgresUrl`, `RedisUrl`), in the manner of SQLx's `PgConnectOptions: FromStr`, and
//! refuses options it does not know: a misspelt bound must not silently leave the
//! default in place.
//!
//! [`MemoryStoreBuilder`]: crate::MemoryStoreBuilder

use std::time::Duration;

/// Why a store URL was refused. Values never carry a password: [`redacted`] the URL
/// before showing it beside one of these.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// The URL is not one of the store's schemes.
    #[error("not a store URL of this kind; use {expected}")]
    Scheme {
        /// The schemes the store takes, as `memory://`.
        expected: &'static str,
    },
    /// The part before the options is unusable: no path, no host.
    #[error("{0}")]
    Malformed(String),
    /// An option the store does not know.
    #[error("unknown option {option:?}; use {known}")]
    UnknownOption {
        /// The option's name as written.
        option: String,
        /// The options the store knows, with the form of their values.
        known: &'static str,
    },
    /// A known option with a value it cannot take.
    #[error("`{option}`: {message}")]
    InvalidOption {
        /// The option's name.
        option: &'static str,
        /// What is wrong with the value.
        message: String,
    },
}

impl UrlError {
    /// The option at fault, when an option is.
    pub fn option(&self) -> Option<&str> {
        match self {
            Self::UnknownOption { option, .. } => Some(option),
            Self::InvalidOption { option, .. } => Some(option),
            Self::Scheme { .. } | Self::Malformed(_) => None,
        }
    }

    /// An [`UrlError::InvalidOption`].
    pub fn invalid(option: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidOption { option, message: message.into() }
    }
}

/// Splits a URL into what comes before `?` and its `name=value` options, in order. An
/// option without `=` has the empty value; empty pieces (`&&`, a trailing `?`) are
/// skipped. Nothing is percent-decoded: option values are names, numbers, durations and
/// sizes.
pub fn split_options(url: &str) -> (&str, impl Iterator<Item = (&str, &str)>) {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let options =
        query.split('&').filter(|pair| !pair.is_empty()).map(|pair| pair.split_once('=').unwrap_or((pair, "")));
    (base, options)
}

/// A duration in humantime (`250ms`, `5s`, `1h`), more than zero.
///
/// # Errors
/// [`UrlError::InvalidOption`] naming `option`.
pub fn duration(option: &'static str, text: &str) -> Result<Duration, UrlError> {
    let value = humantime::parse_duration(text)
        .map_err(|e| UrlError::invalid(option, format!("{text:?} is not a duration ({e})")))?;
    if value.is_zero() {
        return Err(UrlError::invalid(option, "must be longer than zero"));
    }
    Ok(value)
}

/// A size in bytes (`1000`, `512KiB`, `1MiB`, `1GB`), more than zero.
///
/// # Errors
/// [`UrlError::InvalidOption`] naming `option`.
pub fn size(option: &'static str, text: &str) -> Result<u64, UrlError> {
    let value: bytesize::ByteSize =
        text.parse().map_err(|e| UrlError::invalid(option, format!("{text:?} is not a size ({e})")))?;
    if value.as_u64() == 0 {
        return Err(UrlError::invalid(option, "must be larger than zero"));
    }
    Ok(value.as_u64())
}

/// A positive whole number.
///
/// # Errors
/// [`UrlError::InvalidOption`] naming `option`.
pub fn count<N: std::str::FromStr + Default + PartialOrd>(option: &'static str, text: &str) -> Result<N, UrlError> {
    text.parse()
        .ok()
        .filter(|n| *n > N::default())
        .ok_or_else(|| UrlError::invalid(option, "must be a positive whole number"))
}

/// `true` or `false`.
///
/// # Errors
/// [`UrlError::InvalidOption`] naming `option`.
pub fn flag(option: &'static str, text: &str) -> Result<bool, UrlError> {
    match text {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(UrlError::invalid(option, format!("{text:?}: use true or false"))),
    }
}

/// `url` with its password replaced by `***`, for messages and logs: the one in the
/// user information (`postgres://app:***@db/app`) and a `password=` option (which the
/// PostgreSQL driver also takes).
///
/// ```
/// use oncely::store::url::redacted;
/// assert_eq!(redacted("postgres://app:s3cret@db:5432/app?sslmode=require"), "postgres://app:***@db:5432/app?sslmode=require");
/// assert_eq!(redacted("postgres://app@db/app?password=s3cret"), "postgres://app@db/app?password=***");
/// ```
pub fn redacted(url: &str) -> String {
    let url = &redact_password_option(url);
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

/// `?password=…` as `password=***`, and an option whose value is itself a URL (Redis's
/// `replica=redis://user:pass@host`) redacted as a URL.
fn redact_password_option(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else { return url.to_string() };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
            Some((name, value)) if value.contains("://") => format!("{name}={}", redacted(value)),
            _ => pair.to_string(),
        })
        .collect();
    format!("{base}?{}", pairs.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_inside_an_option_is_redacted_too() {
        assert_eq!(
            redacted("redis://:a@10.0.0.1:6379?replica=redis://:s3cret@10.0.0.2:6379/0&prefix=p"),
            "redis://:***@10.0.0.1:6379?replica=redis://:***@10.0.0.2:6379/0&prefix=p"
        );
    }

    #[test]
    fn values_parse_and_bad_ones_name_their_option() {
        assert_eq!(duration("timeout", "250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(size("max_bytes", "512MiB"), Ok(512 << 20));
        assert_eq!(count::<u32>("pool", "16"), Ok(16));
        assert_eq!(flag("evict", "true"), Ok(true));
        for (error, option) in [
            (duration("timeout", "soon").expect_err("refused"), "timeout"),
            (duration("timeout", "0s").expect_err("refused"), "timeout"),
            (size("max_bytes", "0").expect_err("refused"), "max_bytes"),
            (size("max_bytes", "12 parsecs").expect_err("refused"), "max_bytes"),
        ] {
            assert_eq!(error.option(), Some(option));
            assert!(error.to_string().starts_with(&format!("`{option}`: ")), "{error}");
        }
        for bad in ["0", "-1", "lots", ""] {
            let error = count::<usize>("max_entries", bad).expect_err("refused");
            assert_eq!(error.to_string(), "`max_entries`: must be a positive whole number");
        }
        assert_eq!(flag("evict", "yes").expect_err("refused").option(), Some("evict"));
    }

    #[test]
    fn options_are_split_in_order() {
        let (base, options) = split_options("sqlite://a.db?x=1&&flag&y=2=3");
        assert_eq!(base, "sqlite://a.db");
        assert_eq!(options.collect::<Vec<_>>(), [("x", "1"), ("flag", ""), ("y", "2=3")]);
        assert_eq!(split_options("memory://").1.count(), 0);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redacted("postgres://app:s3cret@db:5432/app?sslmode=require"),
            "postgres://app:***@db:5432/app?sslmode=require"
        );
        assert_eq!(redacted("postgres://app@db/app"), "postgres://app@db/app");
        assert_eq!(redacted("postgres://db/app"), "postgres://db/app");
        assert_eq!(redacted("postgres://app@db/app?password=s3cret&x=1"), "postgres://app@db/app?password=***&x=1");
        assert_eq!(redacted("redis://:s3cret@127.0.0.1:6379"), "redis://:***@127.0.0.1:6379");
        assert_eq!(redacted("memory://"), "memory://");
    }
}
