//! The gateway's configuration: the TOML file, its `[defaults]` and `[[routes]]`, and the
//! checks that name the key at fault.
//!
//! ```toml
//! [defaults]                 # every key optional
//! header = "Idempotency-Key"
//! methods = ["POST", "PATCH"]
//! required = false
//! ttl = "24h"
//! lease = "30s"
//! on_conflict = "reject"     # or "wait"
//! wait_timeout = "10s"
//! scope_headers = ["authorization"]
//! max_body = "1MiB"
//! store_statuses = "default" # or a list of statuses / ranges: [200, "4xx", "500-502"]
//!
//! case_insensitive = false  # true: the prefix matches ignoring ASCII case (`/PAYMENTS`)
//! match_suffixes = false     # true: `/payments.<ext>` matches `/payments`; or a list: [".json"]
//! max_in_progress_per_scope = 1000 # running operations per principal; more get 429
//! max_decoded_body = "8MiB"  # a gzip body decoding past this gets 413
//! takeover_header = "Idempotency-Takeover" # sent `true` on a takeover; "" sends none
//!
//! [[routes]]                 # longest path prefix wins; unset keys come from [defaults]
//! path = "/payments"
//! required = true
//!
//! [upstream]
//! timeout = "60s"            # no answer by then: 504, and the key lapses with its lease
//!
//! [server]                   # limits on client connections (see `listener`)
//! header_read_timeout = "10s" # a connection's first request head must arrive by then
//! idle_timeout = "60s"       # keep-alive: no request in flight for this long closes it
//! body_read_timeout = "30s"  # a request body that sends nothing for this long fails
//! max_connections = 10000    # open proxy connections; more are closed at once
//! max_connections_per_client = 256 # per client IP address; 0 turns the cap off
//! max_concurrent_streams = 100 # HTTP/2 streams per connection
//!
//! [admin]
//! token = "…"                # bearer token for /keys on the admin listener
//! max_connections = 64       # the admin listener's own cap
//! ```
//!
//! Matching: a route's `path` is a prefix that matches whole segments of the request
//! path as an upstream would read it (see [`crate::routing`]); `case_insensitive` and
//! `match_suffixes` widen it for upstreams that route `/PAYMENTS` or `/payments.json` to
//! the same handler as `/payments`.

use std::time::Duration;

use http::{HeaderName, Method, StatusCode};
use oncely::ConflictMode;
use serde::Deserialize;

/// A configuration error, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err(key: &str, message: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("`{key}`: {message}"))
}

/// The per-route settings as written: every key optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    /// The key header.
    pub header: Option<String>,
    /// The covered methods.
    pub methods: Option<Vec<String>>,
    /// Whether a key is required.
    pub required: Option<bool>,
    /// Retention of completed results.
    pub ttl: Option<String>,
    /// Lease of a running operation.
    pub lease: Option<String>,
    /// `reject` or `wait`.
    pub on_conflict: Option<String>,
    /// Wait mode's timeout.
    pub wait_timeout: Option<String>,
    /// Headers whose values are the scope.
    pub scope_headers: Option<Vec<String>>,
    /// Request body limit.
    pub max_body: Option<String>,
    /// Stored statuses.
    pub store_statuses: Option<StatusSpec>,
    /// Whether the path prefix matches ignoring ASCII case.
    pub case_insensitive: Option<bool>,
    /// Extensions (`.json`) that may follow the path prefix: `true` for any.
    pub match_suffixes: Option<SuffixSpec>,
    /// Running operations one principal may hold at once.
    pub max_in_progress_per_scope: Option<usize>,
    /// Decoded size limit of a gzip request body.
    pub max_decoded_body: Option<String>,
    /// The header announcing a takeover to the upstream; `""` for none.
    pub takeover_header: Option<String>,
}

impl RawSettings {
    /// `self` with every key `over` sets replacing this one's.
    pub fn overlaid(&self, over: &RawSettings) -> RawSettings {
        RawSettings {
            header: over.header.clone().or_else(|| self.header.clone()),
            methods: over.methods.clone().or_else(|| self.methods.clone()),
            required: over.required.or(self.required),
            ttl: over.ttl.clone().or_else(|| self.ttl.clone()),
            lease: over.lease.clone().or_else(|| self.lease.clone()),
            on_conflict: over.on_conflict.clone().or_else(|| self.on_conflict.clone()),
            wait_timeout: over.wait_timeout.clone().or_else(|| self.wait_timeout.clone()),
            scope_headers: over.scope_headers.clone().or_else(|| self.scope_headers.clone()),
            max_body: over.max_body.clone().or_else(|| self.max_body.clone()),
            store_statuses: over.store_statuses.clone().or_else(|| self.store_statuses.clone()),
            case_insensitive: over.case_insensitive.or(self.case_insensitive),
            match_suffixes: over.match_suffixes.clone().or_else(|| self.match_suffixes.clone()),
            max_in_progress_per_scope: over.max_in_progress_per_scope.or(self.max_in_progress_per_scope),
            max_decoded_body: over.max_decoded_body.clone().or_else(|| self.max_decoded_body.clone()),
            takeover_header: over.takeover_header.clone().or_else(|| self.takeover_header.clone()),
        }
    }
}

/// `store_statuses`: `"default"` or a list of statuses and ranges.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StatusSpec {
    /// `"default"`.
    Keyword(String),
    /// `[200, "4xx", "500-502"]`.
    List(Vec<StatusItem>),
}

/// One entry of a `store_statuses` list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StatusItem {
    /// A single status.
    Code(u16),
    /// `"4xx"` or `"500-502"` or `"201"`.
    Text(String),
}

/// `match_suffixes`: `true`/`false`, or a list of suffixes such as `[".json"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SuffixSpec {
    /// `true`: any `.<letters and digits>`; `false`: none.
    Flag(bool),
    /// Only these, each starting with `.`.
    List(Vec<String>),
}

/// Which suffixes may follow a route's path prefix in the same segment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Suffixes {
    /// None: `/payments` does not match `/payments.json`.
    #[default]
    None,
    /// Any `.` and one or more ASCII letters or digits.
    Any,
    /// These, each starting with `.`.
    Listed(Vec<String>),
}

/// A route as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// The path prefix.
    pub path: String,
    /// The rest of the keys.
    #[serde(flatten)]
    pub settings: RawSettings,
}

/// `[upstream]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// How long to wait for the upstream's response head.
    pub timeout: Option<String>,
}

/// `[admin]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// The bearer token for the key endpoints.
    pub token: Option<String>,
    /// The admin listener's connection cap.
    pub max_connections: Option<usize>,
}

/// `[server]`: limits on client connections.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// How long a new connection may take to send its first request head.
    pub header_read_timeout: Option<String>,
    /// How long a connection may stay open with no request in flight.
    pub idle_timeout: Option<String>,
    /// How long a request body may send nothing.
    pub body_read_timeout: Option<String>,
    /// Open proxy connections.
    pub max_connections: Option<usize>,
    /// Open proxy connections per client IP address; 0: no cap.
    pub max_connections_per_client: Option<usize>,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: Option<u32>,
}

/// The configuration file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[defaults]`.
    #[serde(default)]
    pub defaults: RawSettings,
    /// `[[routes]]`.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// `[upstream]`.
    #[serde(default)]
    pub upstream: RawUpstream,
    /// `[admin]`.
    #[serde(default)]
    pub admin: RawAdmin,
    /// `[server]`.
    #[serde(default)]
    pub server: RawServer,
}

impl RawConfig {
    /// Parses TOML text; unknown keys are errors.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError(e.to_string().trim_end().to_string()))
    }

    /// Reads and parses a file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }
}

/// Which response statuses are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredStatuses {
    /// Every status but 5xx, 408 and 429.
    Default,
    /// Statuses within these inclusive ranges.
    Ranges(Vec<(u16, u16)>),
}

impl StoredStatuses {
    /// Whether `status` is stored.
    pub fn contains(&self, status: StatusCode) -> bool {
        match self {
            Self::Default => oncely_http::default_stored_status(status),
            Self::Ranges(ranges) => ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status.as_u16())),
        }
    }
}

/// One route's checked settings.
#[derive(Debug, Clone)]
pub struct RouteSettings {
    /// The path prefix (`/` for the defaults).
    pub path: String,
    /// The key header.
    pub header: HeaderName,
    /// The covered methods.
    pub methods: Vec<Method>,
    /// Whether a key is required.
    pub required: bool,
    /// Retention.
    pub ttl: Duration,
    /// Lease.
    pub lease: Duration,
    /// Reject or wait.
    pub on_conflict: ConflictMode,
    /// Scope headers.
    pub scope_headers: Vec<HeaderName>,
    /// Body limit.
    pub max_body: usize,
    /// Stored statuses.
    pub store_statuses: StoredStatuses,
    /// Whether the prefix matches ignoring ASCII case.
    pub case_insensitive: bool,
    /// Suffixes that may follow the prefix.
    pub match_suffixes: Suffixes,
    /// Running operations one principal may hold at once (429 past it).
    pub max_in_progress_per_scope: usize,
    /// Decoded size limit of a gzip request body (413 past it).
    pub max_decoded_body: usize,
    /// The request header announcing a takeover to the upstream, if any.
    pub takeover_header: Option<HeaderName>,
}

impl RouteSettings {
    /// Whether this route's prefix matches `path` (already [normalised](crate::routing::normalize)).
    pub fn matches(&self, path: &str) -> bool {
        route_matches(&self.path, self.case_insensitive, &self.match_suffixes, path)
    }
}

/// The limits of one listener's connections (see [`crate::listener`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// A new connection's first request head must be complete by then; on HTTP/1.1 the
    /// same bound runs again from the first byte of each later request head.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// A request body that delivers nothing for this long fails.
    pub body_read_timeout: Duration,
    /// Open connections; more are closed at once.
    pub max_connections: usize,
    /// Open connections per client IP address, if capped.
    pub max_connections_per_client: Option<usize>,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
}

/// The whole checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The settings for paths no route matches.
    pub defaults: RouteSettings,
    /// The routes, longest prefix first.
    pub routes: Vec<RouteSettings>,
    /// The upstream response timeout.
    pub upstream_timeout: Duration,
    /// The admin bearer token, if key endpoints are enabled.
    pub admin_token: Option<String>,
    /// The proxy listener's limits.
    pub server: ServerLimits,
    /// The admin listener's limits: the same timeouts, its own connection cap.
    pub admin_server: ServerLimits,
}

impl Config {
    /// Checks `raw` (with `overrides` from flags and `ONCELY_*` variables laid over its
    /// `[defaults]`), naming the key of the first error.
    pub fn resolve(raw: &RawConfig, overrides: &RawSettings) -> Result<Self, ConfigError> {
        let base = raw.defaults.overlaid(overrides);
        let defaults = resolve_settings("defaults", "/", &base)?;
        let mut routes = Vec::with_capacity(raw.routes.len());
        for (i, route) in raw.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            if !route.path.starts_with('/') {
                return Err(err(&format!("{at}.path"), format!("{:?} must start with `/`", route.path)));
            }
            if raw.routes[..i].iter().any(|r| r.path == route.path) {
                return Err(err(&format!("{at}.path"), format!("{:?} is configured twice", route.path)));
            }
            routes.push(resolve_settings(&at, &route.path, &base.overlaid(&route.settings))?);
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.path.len()));
        let upstream_timeout = match &raw.upstream.timeout {
            Some(text) => duration("upstream.timeout", text)?,
            None => Duration::from_secs(60),
        };
        let admin_token = raw.admin.token.clone().filter(|t| !t.is_empty());
        let server = resolve_server(&raw.server)?;
        let admin_server = ServerLimits {
            max_connections: positive("admin.max_connections", raw.admin.max_connections.unwrap_or(64))?,
            max_connections_per_client: None,
            ..server.clone()
        };
        Ok(Self { defaults, routes, upstream_timeout, admin_token, server, admin_server })
    }

    /// The settings for `path`: the longest route prefix that matches whole segments
    /// (`/payments` matches `/payments` and `/payments/1`, not `/paymentsx`), else the
    /// defaults.
    pub fn route_for(&self, path: &str) -> &RouteSettings {
        self.routes.iter().find(|r| r.matches(path)).unwrap_or(&self.defaults)
    }
}

/// Whether `prefix` matches `path` on a segment boundary.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    route_matches(prefix, false, &Suffixes::None, path)
}

/// Whether `prefix` matches `path` on a segment boundary, ignoring ASCII case if
/// `case_insensitive`, and allowing one of `suffixes` between the prefix and the
/// boundary (`/payments` + `.json` matches `/payments.json` and `/payments.json/1`).
pub fn route_matches(prefix: &str, case_insensitive: bool, suffixes: &Suffixes, path: &str) -> bool {
    let same = |a: &[u8], b: &[u8]| if case_insensitive { a.eq_ignore_ascii_case(b) } else { a == b };
    let Some(head) = path.as_bytes().get(..prefix.len()) else { return false };
    if !same(head, prefix.as_bytes()) {
        return false;
    }
    let Some(rest) = path.get(prefix.len()..) else { return false };
    let boundary = |rest: &str| rest.is_empty() || rest.starts_with('/');
    if boundary(rest) || prefix.ends_with('/') {
        return true;
    }
    match suffixes {
        Suffixes::None => false,
        Suffixes::Any => {
            let Some(ext) = rest.strip_prefix('.') else { return false };
            let len = ext.bytes().take_while(u8::is_ascii_alphanumeric).count();
            len > 0 && boundary(&ext[len..])
        }
        Suffixes::Listed(list) => list.iter().any(|suffix| {
            rest.as_bytes().get(..suffix.len()).is_some_and(|s| same(s, suffix.as_bytes()))
                && rest.get(suffix.len()..).is_some_and(boundary)
        }),
    }
}

fn positive<T: PartialEq + Default + std::fmt::Display>(key: &str, value: T) -> Result<T, ConfigError> {
    if value == T::default() {
        return Err(err(key, "must be larger than zero"));
    }
    Ok(value)
}

fn resolve_server(raw: &RawServer) -> Result<ServerLimits, ConfigError> {
    let timeout = |name: &str, value: &Option<String>, default: &str| {
        duration(&format!("server.{name}"), value.as_deref().unwrap_or(default))
    };
    Ok(ServerLimits {
        header_read_timeout: timeout("header_read_timeout", &raw.header_read_timeout, "10s")?,
        idle_timeout: timeout("idle_timeout", &raw.idle_timeout, "60s")?,
        body_read_timeout: timeout("body_read_timeout", &raw.body_read_timeout, "30s")?,
        max_connections: positive("server.max_connections", raw.max_connections.unwrap_or(10_000))?,
        max_connections_per_client: match raw.max_connections_per_client {
            Some(0) => None,
            other => Some(other.unwrap_or(256)),
        },
        max_concurrent_streams: positive("server.max_concurrent_streams", raw.max_concurrent_streams.unwrap_or(100))?,
    })
}

fn resolve_suffixes(key: &str, spec: Option<&SuffixSpec>) -> Result<Suffixes, ConfigError> {
    match spec {
        None | Some(SuffixSpec::Flag(false)) => Ok(Suffixes::None),
        Some(SuffixSpec::Flag(true)) => Ok(Suffixes::Any),
        Some(SuffixSpec::List(list)) if list.is_empty() => Ok(Suffixes::None),
        Some(SuffixSpec::List(list)) => {
            for suffix in list {
                let ext = suffix.strip_prefix('.').unwrap_or("");
                let valid = !ext.is_empty() && ext.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !valid {
                    return Err(err(key, format!("{suffix:?} is not a suffix like \".json\"")));
                }
            }
            Ok(Suffixes::Listed(list.clone()))
        }
    }
}

fn resolve_settings(at: &str, path: &str, raw: &RawSettings) -> Result<RouteSettings, ConfigError> {
    let key = |name: &str| format!("{at}.{name}");
    let header = match &raw.header {
        Some(h) => {
            HeaderName::try_from(h.as_str()).map_err(|_| err(&key("header"), format!("{h:?} is not a header name")))?
        }
        None => HeaderName::from_static("idempotency-key"),
    };
    let methods = match &raw.methods {
        Some(list) => list
            .iter()
            .map(|m| {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| err(&key("methods"), format!("{m:?} is not a method")))
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => vec![Method::POST, Method::PATCH],
    };
    let ttl = duration(&key("ttl"), raw.ttl.as_deref().unwrap_or("24h"))?;
    let lease = duration(&key("lease"), raw.lease.as_deref().unwrap_or("30s"))?;
    if lease > ttl {
        return Err(err(&key("lease"), format!("{lease:?} is longer than the ttl {ttl:?}")));
    }
    let wait_timeout = duration(&key("wait_timeout"), raw.wait_timeout.as_deref().unwrap_or("10s"))?;
    let on_conflict = match raw.on_conflict.as_deref().unwrap_or("reject") {
        "reject" => ConflictMode::Reject,
        "wait" => ConflictMode::Wait { timeout: wait_timeout },
        other => return Err(err(&key("on_conflict"), format!("{other:?} is neither \"reject\" nor \"wait\""))),
    };
    // The engine's own checks (retention and wait limits, lease within retention…),
    // so that check-config refuses what the engine would.
    let engine = oncely::Config {
        retention: ttl,
        lease,
        keep_alive_ceiling: oncely::Config::default().keep_alive_ceiling.min(ttl),
        conflict: on_conflict,
        ..oncely::Config::default()
    };
    engine.validate().map_err(|e| {
        let name = match e.setting {
            "lease" => "lease",
            "conflict_mode(Wait { timeout })" => "wait_timeout",
            _ => "ttl",
        };
        err(&key(name), e.reason)
    })?;
    let scope_headers = match &raw.scope_headers {
        Some(list) => list
            .iter()
            .map(|h| {
                HeaderName::try_from(h.as_str())
                    .map_err(|_| err(&key("scope_headers"), format!("{h:?} is not a header name")))
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => vec![http::header::AUTHORIZATION],
    };
    let max_body = match &raw.max_body {
        Some(text) => size(&key("max_body"), text)?,
        None => 1024 * 1024,
    };
    let store_statuses = match &raw.store_statuses {
        None => StoredStatuses::Default,
        Some(StatusSpec::Keyword(k)) if k == "default" => StoredStatuses::Default,
        Some(StatusSpec::Keyword(k)) => {
            return Err(err(&key("store_statuses"), format!("{k:?} is not \"default\" or a list of statuses")));
        }
        Some(StatusSpec::List(items)) => StoredStatuses::Ranges(
            items.iter().map(|item| status_range(&key("store_statuses"), item)).collect::<Result<_, _>>()?,
        ),
    };
    let match_suffixes = resolve_suffixes(&key("match_suffixes"), raw.match_suffixes.as_ref())?;
    let max_in_progress_per_scope = match raw.max_in_progress_per_scope {
        Some(0) => return Err(err(&key("max_in_progress_per_scope"), "must be at least 1")),
        Some(n) => n,
        None => 1000,
    };
    let max_decoded_body = match &raw.max_decoded_body {
        Some(text) => size(&key("max_decoded_body"), text)?,
        None => 8 * 1024 * 1024,
    };
    let takeover_header = match raw.takeover_header.as_deref() {
        None => Some(HeaderName::from_static("idempotency-takeover")),
        Some("") => None,
        Some(h) => Some(
            HeaderName::try_from(h).map_err(|_| err(&key("takeover_header"), format!("{h:?} is not a header name")))?,
        ),
    };
    Ok(RouteSettings {
        path: path.to_string(),
        header,
        methods,
        required: raw.required.unwrap_or(false),
        ttl,
        lease,
        on_conflict,
        scope_headers,
        max_body,
        store_statuses,
        case_insensitive: raw.case_insensitive.unwrap_or(false),
        match_suffixes,
        max_in_progress_per_scope,
        max_decoded_body,
        takeover_header,
    })
}

/// Parses a humantime duration (`30s`, `24h`, `1h 30m`), refusing zero.
pub fn duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    let value = humantime::parse_duration(text).map_err(|e| err(key, format!("{text:?} is not a duration ({e})")))?;
    if value.is_zero() {
        return Err(err(key, "must be longer than zero"));
    }
    Ok(value)
}

/// Parses a size (`1MiB`, `512KiB`, `1000`), refusing zero.
pub fn size(key: &str, text: &str) -> Result<usize, ConfigError> {
    let value: bytesize::ByteSize = text.parse().map_err(|e| err(key, format!("{text:?} is not a size ({e})")))?;
    let bytes = usize::try_from(value.as_u64()).map_err(|_| err(key, format!("{text:?} is too large")))?;
    if bytes == 0 {
        return Err(err(key, "must be larger than zero"));
    }
    Ok(bytes)
}

fn status_range(key: &str, item: &StatusItem) -> Result<(u16, u16), ConfigError> {
    let bad = |what: &str| {
        err(key, format!("{what:?} is not a status (100-599), a class like \"4xx\", or a range like \"500-502\""))
    };
    let valid = |code: u16| (100..=599).contains(&code);
    match item {
        StatusItem::Code(code) if valid(*code) => Ok((*code, *code)),
        StatusItem::Code(code) => Err(bad(&code.to_string())),
        StatusItem::Text(text) => {
            let t = text.trim().to_ascii_lowercase();
            if let Some(class) = t.strip_suffix("xx") {
                let digit: u16 = class.parse().map_err(|_| bad(text))?;
                return if (1..=5).contains(&digit) { Ok((digit * 100, digit * 100 + 99)) } else { Err(bad(text)) };
            }
            let (lo, hi) = t.split_once('-').unwrap_or((&t, &t));
            let lo: u16 = lo.trim().parse().map_err(|_| bad(text))?;
            let hi: u16 = hi.trim().parse().map_err(|_| bad(text))?;
            if valid(lo) && valid(hi) && lo <= hi { Ok((lo, hi)) } else { Err(bad(text)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(text: &str) -> Result<Config, ConfigError> {
        Config::resolve(&RawConfig::parse(text)?, &RawSettings::default())
    }

    #[test]
    fn the_documented_example_is_valid() {
        let config = resolve(
            r#"
            [defaults]
            header = "Idempotency-Key"
            methods = ["POST", "PATCH"]
            required = false
            ttl = "24h"
            lease = "30s"
            on_conflict = "reject"
            wait_timeout = "10s"
            scope_headers = ["authorization"]
            max_body = "1MiB"
            store_statuses = "default"
            case_insensitive = false
            match_suffixes = false

            [[routes]]
            path = "/payments"
            required = true
            on_conflict = "wait"
            case_insensitive = true
            match_suffixes = [".json"]

            [[routes]]
            path = "/payments/refunds"
            store_statuses = [200, "4xx", "500-502"]
            "#,
        )
        .expect("valid");
        assert_eq!(config.defaults.max_body, 1024 * 1024);
        let payments = config.route_for("/payments/ch_1");
        assert!(payments.required);
        assert_eq!(payments.on_conflict, ConflictMode::Wait { timeout: Duration::from_secs(10) });
        let refunds = config.route_for("/payments/refunds/7");
        assert!(!refunds.required, "unset keys come from [defaults], not from a shorter route");
        assert!(refunds.store_statuses.contains(StatusCode::BAD_GATEWAY));
        assert!(!refunds.store_statuses.contains(StatusCode::CREATED));
        assert!(!config.route_for("/paymentsx").required, "prefixes match whole segments");
        assert!(config.route_for("/PAYMENTS/ch_1").required, "case_insensitive");
        assert!(config.route_for("/payments.json").required, "match_suffixes");
        assert!(config.route_for("/Payments.JSON/ch_1").required);
        assert!(!config.route_for("/payments.xml").required, "only the listed suffixes");
        assert!(!config.route_for("/payments.jsonx").required, "a suffix ends on a segment boundary");
        assert_eq!(config.server.max_connections, 10_000);
        assert_eq!(config.server.max_connections_per_client, Some(256));
        assert_eq!(config.admin_server.max_connections, 64);
    }

    #[test]
    fn the_server_table_sets_the_limits() {
        let config = resolve(
            r#"
            [server]
            header_read_timeout = "10s"
            idle_timeout = "60s"
            body_read_timeout = "30s"
            max_connections = 10000
            max_connections_per_client = 0
            max_concurrent_streams = 100

            [admin]
            max_connections = 8
            "#,
        )
        .expect("valid");
        assert_eq!(config.server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(config.server.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.server.body_read_timeout, Duration::from_secs(30));
        assert_eq!(config.server.max_connections_per_client, None, "0 turns the per-client cap off");
        assert_eq!(config.admin_server.max_connections, 8);
        assert_eq!(config.admin_server.idle_timeout, Duration::from_secs(60), "the admin listener's timeouts");
    }

    #[test]
    fn any_suffix_is_letters_and_digits_after_a_dot() {
        let any = Suffixes::Any;
        assert!(route_matches("/payments", false, &any, "/payments.json"));
        assert!(route_matches("/payments", false, &any, "/payments.v2/x"));
        assert!(!route_matches("/payments", false, &any, "/payments."));
        assert!(!route_matches("/payments", false, &any, "/payments.j-s"));
        assert!(!route_matches("/payments", true, &Suffixes::None, "/PAYMENTSX"));
        assert!(!route_matches("/pay", false, &Suffixes::None, "/pa"));
    }

    #[test]
    fn a_short_ttl_is_valid() {
        let config = resolve("[defaults]\nttl = \"5m\"").expect("valid");
        assert_eq!(config.defaults.ttl, Duration::from_secs(300));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[defaults]\ntll = \"1h\"", "tll"),
            ("[defaults]\nttl = \"soon\"", "defaults.ttl"),
            ("[defaults]\nttl = \"0s\"", "defaults.ttl"),
            ("[defaults]\nlease = \"2h\"\nttl = \"1h\"", "defaults.lease"),
            ("[defaults]\non_conflict = \"queue\"", "defaults.on_conflict"),
            ("[defaults]\nmax_body = \"lots\"", "defaults.max_body"),
            ("[defaults]\nmethods = [\"PO ST\"]", "defaults.methods"),
            ("[defaults]\nstore_statuses = [\"6xx\"]", "defaults.store_statuses"),
            ("[defaults]\nstore_statuses = \"all\"", "defaults.store_statuses"),
            ("[[routes]]\npath = \"payments\"", "routes[0].path"),
            ("[[routes]]\npath = \"/a\"\n[[routes]]\npath = \"/b\"\nwait_timeout = \"x\"", "routes[1].wait_timeout"),
            ("[upstream]\ntimeout = \"-1s\"", "upstream.timeout"),
            ("[defaults]\nttl = \"400days\"", "defaults.ttl"),
            ("[defaults]\non_conflict = \"wait\"\nwait_timeout = \"2days\"", "defaults.wait_timeout"),
            ("[nonsense]\na = 1", "nonsense"),
            ("[server]\nidle_timeout = \"soon\"", "server.idle_timeout"),
            ("[server]\nheader_read_timeout = \"0s\"", "server.header_read_timeout"),
            ("[server]\nbody_read_timeout = \"x\"", "server.body_read_timeout"),
            ("[server]\nmax_connections = 0", "server.max_connections"),
            ("[server]\nmax_connections = -1", "max_connections"),
            ("[server]\nmax_concurrent_streams = 0", "server.max_concurrent_streams"),
            ("[server]\nmax_conections = 1", "max_conections"),
            ("[admin]\nmax_connections = 0", "admin.max_connections"),
            ("[[routes]]\npath = \"/a\"\nmatch_suffixes = [\"json\"]", "routes[0].match_suffixes"),
            ("[[routes]]\npath = \"/a\"\nmatch_suffixes = [\".j/s\"]", "routes[0].match_suffixes"),
            ("[defaults]\nmatch_suffixes = \"yes\"", "match_suffixes"),
            ("[defaults]\ncase_insensitive = \"yes\"", "case_insensitive"),
            ("[defaults]\nmax_in_progress_per_scope = 0", "defaults.max_in_progress_per_scope"),
            ("[defaults]\nmax_decoded_body = \"huge\"", "defaults.max_decoded_body"),
            ("[defaults]\ntakeover_header = \"a b\"", "defaults.takeover_header"),
        ];
        for (text, key) in cases {
            let message = resolve(text).expect_err(text).0;
            assert!(message.contains(key), "{text:?} gave {message:?}, which does not name {key}");
        }
    }
}
