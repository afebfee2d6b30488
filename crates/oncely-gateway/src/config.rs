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
//! [[routes]]                 # longest path prefix wins; unset keys come from [defaults]
//! path = "/payments"
//! required = true
//!
//! [upstream]
//! timeout = "60s"            # no answer by then: 504, and the key lapses with its lease
//!
//! [admin]
//! token = "…"                # bearer token for /keys on the admin listener
//! ```

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
        Ok(Self { defaults, routes, upstream_timeout, admin_token })
    }

    /// The settings for `path`: the longest route prefix that matches whole segments
    /// (`/payments` matches `/payments` and `/payments/1`, not `/paymentsx`), else the
    /// defaults.
    pub fn route_for(&self, path: &str) -> &RouteSettings {
        self.routes.iter().find(|r| prefix_matches(&r.path, path)).unwrap_or(&self.defaults)
    }
}

/// Whether `prefix` matches `path` on a segment boundary.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
        None => false,
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

            [[routes]]
            path = "/payments"
            required = true
            on_conflict = "wait"

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
        ];
        for (text, key) in cases {
            let message = resolve(text).expect_err(text).0;
            assert!(message.contains(key), "{text:?} gave {message:?}, which does not name {key}");
        }
    }
}
