//! The gateway's configuration: the TOML file, its `[defaults]` and `[[routes]]`, and the
//! checks that name the key at fault.
//!
//! ```toml
//! [defaults]                 # every key optional; unset keys keep the libraries' defaults
//! header = "Idempotency-Key"
//! key_pointer = "/id"        # the key from this JSON member of the body instead
//! methods = ["POST", "PATCH"]
//! required = false
//! ttl = "24h"
//! lease = "30s"
//! on_conflict = "wait"       # or "reject"
//! wait_timeout = "10s"
//! scope_headers = ["authorization"]
//! max_body = "1MiB"
//! store_statuses = "default" # all but 408, 425, 429, 503; or a list: [200, "4xx", "500-502"]
//! on_unknown = "hold"        # or "release"
//! completion_limit = "5m"    # an upstream call goes on this long after its client got 504
//! mismatch_status = 422      # or 400
//! fingerprint_ignore = ["/metadata/sent_at"]
//! fingerprint_headers = ["x-api-version"]
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
//! timeout = "60s"            # no answer by then: 504, and the call goes on
//!
//! [policy]
//! path = "/.well-known/idempotency" # "" publishes nothing
//! documentation_url = "https://api.example.com/docs/idempotency"
//!
//! [server]                   # limits on client connections (see `listener`)
//! header_read_timeout = "10s" # a connection's first request head must arrive by then
//! idle_timeout = "60s"       # keep-alive: no request in flight for this long closes it
//! body_read_timeout = "30s"  # a request body that sends nothing for this long fails
//! max_connections = 10000    # open proxy connections; more are closed at once
//! max_connections_per_client = 256 # per client IP address; 0 turns the cap off
//! max_concurrent_streams = 100 # HTTP/2 streams per connection
//! workers = 2                # threads serving proxy connections (default: one per core)
//!
//! [admin]
//! token = "…"                # bearer token for /keys on the admin listener
//! max_connections = 64       # the admin listener's own cap
//! ```
//!
//! Each key is defined once, by `settings_table!` below: its TOML key, its `serve` flag
//! and its `ONCELY_*` variable. [`Config::resolve`] hands each key that is set to the
//! builder method of the library that owns it (in `route_layer`), so a key left unset keeps
//! that library's default; the gateway's own defaults (upstream timeout, completion
//! limit, policy path) are in `defaults` here.
//!
//! Matching: a route's `path` is a prefix that matches whole segments of the request
//! path as an upstream would read it (see [`crate::routing`]); `case_insensitive` and
//! `match_suffixes` widen it for upstreams that route `/PAYMENTS` or `/payments.json` to
//! the same handler as `/payments`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode};
use oncely::fingerprint::JsonPointer;
use oncely::{ConflictMode, MemoryStore, Oncely, OncelyBuilder, Setting, Store};
use oncely_http::scope::jwt::JwtScope;
use oncely_http::{IdempotencyLayer, Policy, ScopeSource};
use serde::Deserialize;

use crate::tls::{CertFiles, UpstreamTls};

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

/// Two keys that go together (a certificate and its key): both or neither.
fn pair(
    first_key: &str,
    first: &Option<PathBuf>,
    second_key: &str,
    second: &Option<PathBuf>,
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    match (first, second) {
        (Some(a), Some(b)) => Ok(Some((a.clone(), b.clone()))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(err(second_key, format!("needed with `{first_key}`"))),
        (None, Some(_)) => Err(err(first_key, format!("needed with `{second_key}`"))),
    }
}

/// Defines a table of settings once. Each field is at the same time its TOML key (the
/// field's name), its command-line flag (the name in kebab case, from `#[arg(long)]`) and
/// its `ONCELY_*` variable (the `env` of its `#[arg]`); its doc comment is the flag's
/// help. Every field is optional: what is unset comes from the table beneath (a route's
/// from `[defaults]`, `[defaults]`'s from the flags' absence) and in the end from the
/// library that owns the setting (`oncely`, `oncely-http`), never from a copy here.
macro_rules! settings_table {
    (
        $(#[$meta:meta])*
        pub struct $name:ident { $( $(#[$field_meta:meta])* pub $field:ident : Option<$ty:ty>, )* }
    ) => {
        #[derive(Debug, Clone, Default, Deserialize, clap::Args)]
        #[serde(deny_unknown_fields)]
        $(#[$meta])*
        pub struct $name { $( $(#[$field_meta])* pub $field: Option<$ty>, )* }

        impl $name {
            /// `self` with every key `over` sets replacing this one's.
            pub fn overlaid(&self, over: &Self) -> Self {
                Self { $( $field: over.$field.clone().or_else(|| self.$field.clone()), )* }
            }
        }
    };
}

settings_table! {
    /// A route's settings as written (`[defaults]`, each `[[routes]]`, and the flags and
    /// variables that override `[defaults]`).
    #[command(next_help_heading = "Route settings (the file's [defaults]; routes override them)")]
    pub struct RawSettings {
        /// The key header (default `Idempotency-Key`; `X-GitHub-Delivery`, `Webhook-Id` for webhooks).
        #[arg(long, env = "ONCELY_HEADER")]
        pub header: Option<String>,
        /// A JSON pointer into the body to take the key from instead of the header (`/id`).
        #[arg(long, env = "ONCELY_KEY_POINTER")]
        pub key_pointer: Option<String>,
        /// Covered methods, comma-separated (default POST, PATCH).
        #[arg(long, env = "ONCELY_METHODS", value_delimiter = ',')]
        pub methods: Option<Vec<String>>,
        /// Whether a covered request without a key is refused with 400.
        #[arg(long, env = "ONCELY_REQUIRED", value_parser = clap::builder::BoolishValueParser::new())]
        pub required: Option<bool>,
        /// How long results are replayed (default 24h).
        #[arg(long, env = "ONCELY_TTL")]
        pub ttl: Option<String>,
        /// How long a crashed request blocks its key (default 30s).
        #[arg(long, env = "ONCELY_LEASE")]
        pub lease: Option<String>,
        /// `wait` (the default) or `reject`: what a duplicate of a running request gets.
        #[arg(long, env = "ONCELY_ON_CONFLICT")]
        pub on_conflict: Option<String>,
        /// How long a duplicate waits in wait mode before its 409 (default 10s).
        #[arg(long, env = "ONCELY_WAIT_TIMEOUT")]
        pub wait_timeout: Option<String>,
        /// Who owns a key, as a TOML inline table: `{ headers = ["authorization"], cookies = ["session"] }`, `{ trusted_header = "x-authenticated-user" }`, `{ jwt = { algorithms = ["HS256"], secret_file = "jwt.secret" } }` (default: the raw Authorization and Cookie fields).
        #[arg(long, env = "ONCELY_SCOPE")]
        pub scope: Option<ScopeSpec>,
        /// Principal headers, comma-separated: shorthand for `scope = { headers = [...] }`.
        #[arg(long, env = "ONCELY_SCOPE_HEADERS", value_delimiter = ',')]
        pub scope_headers: Option<Vec<String>>,
        /// Request body limit (default 1MiB).
        #[arg(long, env = "ONCELY_MAX_BODY")]
        pub max_body: Option<String>,
        /// Stored statuses: `default` (all but 408, 425, 429, 503) or statuses and ranges, comma-separated.
        #[arg(long, env = "ONCELY_STORE_STATUSES")]
        pub store_statuses: Option<StatusSpec>,
        /// `hold` (the default): a key whose outcome is unknown answers 502 until deleted; `release`: it lapses with its lease.
        #[arg(long, env = "ONCELY_ON_UNKNOWN")]
        pub on_unknown: Option<String>,
        /// How long an upstream call may go on after its client got 504 (default 5m).
        #[arg(long, env = "ONCELY_COMPLETION_LIMIT")]
        pub completion_limit: Option<String>,
        /// The status of a reused key: 422 (the default, as the draft says) or 400 (Stripe's SDKs).
        #[arg(long, env = "ONCELY_MISMATCH_STATUS")]
        pub mismatch_status: Option<u16>,
        /// JSON pointers the fingerprint leaves out, comma-separated (`/metadata/sent_at`).
        #[arg(long, env = "ONCELY_FINGERPRINT_IGNORE", value_delimiter = ',')]
        pub fingerprint_ignore: Option<Vec<String>>,
        /// Request headers the fingerprint takes in, comma-separated.
        #[arg(long, env = "ONCELY_FINGERPRINT_HEADERS", value_delimiter = ',')]
        pub fingerprint_headers: Option<Vec<String>>,
        /// Whether path prefixes match ignoring ASCII case.
        #[arg(long, env = "ONCELY_CASE_INSENSITIVE", value_parser = clap::builder::BoolishValueParser::new())]
        pub case_insensitive: Option<bool>,
        /// `true`, `false`, or suffixes that may follow the prefix, comma-separated: `.json,.xml`.
        #[arg(long, env = "ONCELY_MATCH_SUFFIXES")]
        pub match_suffixes: Option<SuffixSpec>,
        /// Running operations one principal may hold at once (default 1000; more get 429).
        #[arg(long, env = "ONCELY_MAX_IN_PROGRESS_PER_SCOPE")]
        pub max_in_progress_per_scope: Option<usize>,
        /// Decoded size limit of a gzip request body (default 8MiB).
        #[arg(long, env = "ONCELY_MAX_DECODED_BODY")]
        pub max_decoded_body: Option<String>,
        /// The header announcing a takeover to the upstream (default `Idempotency-Takeover`); "" for none.
        #[arg(long, env = "ONCELY_TAKEOVER_HEADER")]
        pub takeover_header: Option<String>,
    }
}

settings_table! {
    /// `[upstream]`.
    #[command(next_help_heading = "Upstream ([upstream])")]
    pub struct RawUpstream {
        /// When a client gets 504 if the upstream has not answered (default 60s); the call goes on up to `completion_limit`.
        #[arg(id = "upstream_timeout", long = "upstream-timeout", env = "ONCELY_UPSTREAM_TIMEOUT")]
        pub timeout: Option<String>,
        /// For an https:// upstream: trust only the CA certificates in this PEM file instead of the platform's roots.
        #[arg(id = "upstream_ca_file", long = "upstream-ca-file", env = "ONCELY_UPSTREAM_CA_FILE")]
        pub ca_file: Option<PathBuf>,
        /// For an https:// upstream: a client certificate chain to present (PEM; mutual TLS), with client_key_file.
        #[arg(id = "upstream_client_cert_file", long = "upstream-client-cert-file", env = "ONCELY_UPSTREAM_CLIENT_CERT_FILE")]
        pub client_cert_file: Option<PathBuf>,
        /// The client certificate's private key (PEM).
        #[arg(id = "upstream_client_key_file", long = "upstream-client-key-file", env = "ONCELY_UPSTREAM_CLIENT_KEY_FILE")]
        pub client_key_file: Option<PathBuf>,
        /// Accept any certificate from an https:// upstream. For tests only: logged as an error at start.
        #[arg(
            id = "upstream_insecure_skip_verify",
            long = "upstream-insecure-skip-verify",
            env = "ONCELY_UPSTREAM_INSECURE_SKIP_VERIFY",
            value_parser = clap::builder::BoolishValueParser::new()
        )]
        pub insecure_skip_verify: Option<bool>,
    }
}

settings_table! {
    /// `[listen]`: the proxy listener.
    #[command(next_help_heading = "Proxy listener ([listen])")]
    pub struct RawListen {
        /// Serve HTTPS with this certificate chain (PEM, leaf first), with tls_key_file; reloaded on SIGHUP and when the files change.
        #[arg(long, env = "ONCELY_TLS_CERT_FILE")]
        pub tls_cert_file: Option<PathBuf>,
        /// The certificate's private key (PEM).
        #[arg(long, env = "ONCELY_TLS_KEY_FILE")]
        pub tls_key_file: Option<PathBuf>,
    }
}

settings_table! {
    /// `[admin]`.
    #[command(next_help_heading = "Admin listener ([admin])")]
    pub struct RawAdmin {
        /// The bearer token for /keys on the admin listener; unset: no key endpoints.
        #[arg(id = "admin_token", long = "admin-token", env = "ONCELY_ADMIN_TOKEN", hide_env_values = true)]
        pub token: Option<String>,
        /// Open admin connections (default 64).
        #[arg(id = "admin_max_connections", long = "admin-max-connections", env = "ONCELY_ADMIN_MAX_CONNECTIONS")]
        pub max_connections: Option<usize>,
        /// Serve the admin listener over HTTPS with this certificate chain (PEM), with tls_key_file.
        #[arg(id = "admin_tls_cert_file", long = "admin-tls-cert-file", env = "ONCELY_ADMIN_TLS_CERT_FILE")]
        pub tls_cert_file: Option<PathBuf>,
        /// The admin certificate's private key (PEM).
        #[arg(id = "admin_tls_key_file", long = "admin-tls-key-file", env = "ONCELY_ADMIN_TLS_KEY_FILE")]
        pub tls_key_file: Option<PathBuf>,
    }
}

settings_table! {
    /// `[server]`: limits on client connections.
    #[command(next_help_heading = "Client connections ([server])")]
    pub struct RawServer {
        /// How long a new connection may take to send its first request head (default 10s).
        #[arg(long, env = "ONCELY_HEADER_READ_TIMEOUT")]
        pub header_read_timeout: Option<String>,
        /// How long a connection may stay open with no request in flight (default 60s).
        #[arg(long, env = "ONCELY_IDLE_TIMEOUT")]
        pub idle_timeout: Option<String>,
        /// How long a request body may send nothing (default 30s).
        #[arg(long, env = "ONCELY_BODY_READ_TIMEOUT")]
        pub body_read_timeout: Option<String>,
        /// Open proxy connections (default 10000).
        #[arg(long, env = "ONCELY_MAX_CONNECTIONS")]
        pub max_connections: Option<usize>,
        /// Open proxy connections per client IP address, 0 for no cap (default 256).
        #[arg(long, env = "ONCELY_MAX_CONNECTIONS_PER_CLIENT")]
        pub max_connections_per_client: Option<usize>,
        /// HTTP/2 streams per connection (default 100).
        #[arg(long, env = "ONCELY_MAX_CONCURRENT_STREAMS")]
        pub max_concurrent_streams: Option<u32>,
        /// Threads serving proxy connections, each with its own runtime (default: one per core); 0 serves them on the shared runtime.
        #[arg(long, env = "ONCELY_WORKERS")]
        pub workers: Option<usize>,
    }
}

settings_table! {
    /// `[policy]`: where the routes' idempotency policy is published.
    #[command(next_help_heading = "Published policy ([policy])")]
    pub struct RawPolicy {
        /// The path the policy is served at as JSON (default /.well-known/idempotency); "" for none.
        #[arg(id = "policy_path", long = "policy-path", env = "ONCELY_POLICY_PATH")]
        pub path: Option<String>,
        /// A page documenting the policy: problem answers link to it.
        #[arg(long, env = "ONCELY_DOCUMENTATION_URL")]
        pub documentation_url: Option<String>,
    }
}

settings_table! {
    /// `[replay_cache]`: completed records kept in the gateway's memory, so that replays of
    /// a hot key touch no store (see [`oncely::store::cache`]).
    #[command(next_help_heading = "Replay cache ([replay_cache])")]
    pub struct RawReplayCache {
        /// Answer replays of recently replayed keys from memory (default: on for sqlite, redis, postgres and dynamodb stores, off for memory).
        #[arg(
            id = "replay_cache",
            long = "replay-cache",
            env = "ONCELY_REPLAY_CACHE",
            value_parser = clap::builder::BoolishValueParser::new()
        )]
        pub enabled: Option<bool>,
        /// How long a cached record is answered from memory, and so how late a delete made through another instance is seen here; on sqlite such a delete is seen at once (default 5s).
        #[arg(id = "replay_cache_ttl", long = "replay-cache-ttl", env = "ONCELY_REPLAY_CACHE_TTL")]
        pub ttl: Option<String>,
        /// Records held at most (default 100000).
        #[arg(id = "replay_cache_max_entries", long = "replay-cache-max-entries", env = "ONCELY_REPLAY_CACHE_MAX_ENTRIES")]
        pub max_entries: Option<u64>,
        /// Bytes of stored responses held at most (default 64MiB).
        #[arg(id = "replay_cache_max_bytes", long = "replay-cache-max-bytes", env = "ONCELY_REPLAY_CACHE_MAX_BYTES")]
        pub max_bytes: Option<String>,
    }
}

/// `scope`: who owns a key (see [`oncely_http::scope`]). The sources that are set are
/// combined; `{}` is no source at all (every client shares every key).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeSpec {
    /// Raw values of these headers.
    pub headers: Option<Vec<String>>,
    /// Values of these cookies.
    pub cookies: Option<Vec<String>>,
    /// A header set by a trusted front proxy.
    pub trusted_header: Option<String>,
    /// Claims of a bearer token the gateway verifies.
    pub jwt: Option<JwtSpec>,
}

/// `scope.jwt`: the scope from claims of a verified bearer token (see
/// [`oncely_http::scope::jwt`]). One key source: `secret_file` (HS*), `pem_file`,
/// `jwks_file` or `jwks_url`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSpec {
    /// Accepted algorithms (`HS256`, `RS256`, `ES256`, `EdDSA`…); `none` never is.
    pub algorithms: Vec<String>,
    /// A file holding the HMAC secret.
    pub secret_file: Option<std::path::PathBuf>,
    /// A PEM public key.
    pub pem_file: Option<std::path::PathBuf>,
    /// A JSON Web Key Set file, read again every `refresh`.
    pub jwks_file: Option<std::path::PathBuf>,
    /// A JSON Web Key Set URL, fetched again every `refresh`.
    pub jwks_url: Option<String>,
    /// The claims whose values are the principal (default `["sub"]`).
    pub claims: Option<Vec<String>>,
    /// Accepted issuers (`iss`), if checked.
    pub issuers: Option<Vec<String>>,
    /// Accepted audiences (`aud`), if checked.
    pub audiences: Option<Vec<String>>,
    /// Clock leeway for `exp` and `nbf` (default 60s).
    pub leeway: Option<String>,
    /// How often a key set is read again (default 5m).
    pub refresh: Option<String>,
}

impl JwtSpec {
    /// The verifier, its keys read (and a key set's refresher started): errors name the
    /// setting at fault under `at` (`routes[0].scope.jwt`).
    async fn build(&self, at: &str) -> Result<JwtScope, ConfigError> {
        let mut builder = JwtScope::builder().algorithms(&self.algorithms);
        if let Some(path) = &self.secret_file {
            builder = builder.secret_file(path.clone());
        }
        if let Some(path) = &self.pem_file {
            builder = builder.pem_file(path.clone());
        }
        if let Some(path) = &self.jwks_file {
            builder = builder.jwks_file(path.clone());
        }
        if let Some(url) = &self.jwks_url {
            builder = builder.jwks_url(url.clone());
        }
        if let Some(claims) = &self.claims {
            builder = builder.claims(claims);
        }
        if let Some(issuers) = &self.issuers {
            builder = builder.issuers(issuers);
        }
        if let Some(audiences) = &self.audiences {
            builder = builder.audiences(audiences);
        }
        if let Some(text) = &self.leeway {
            builder = builder.leeway(duration(&format!("{at}.leeway"), text)?);
        }
        if let Some(text) = &self.refresh {
            builder = builder.refresh_every(duration(&format!("{at}.refresh"), text)?);
        }
        builder.build().await.map_err(|e| err(&format!("{at}.{}", e.setting()), e))
    }
}

impl std::str::FromStr for ScopeSpec {
    type Err = String;

    /// The flag's form: the TOML inline table, `{ cookies = ["session"] }`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        #[derive(Deserialize)]
        struct Wrapper {
            scope: ScopeSpec,
        }
        toml::from_str::<Wrapper>(&format!("scope = {text}"))
            .map(|w| w.scope)
            .map_err(|e| format!("{text:?} is not a scope table like {{ cookies = [\"session\"] }}: {}", e.message()))
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

impl std::str::FromStr for StatusSpec {
    type Err = std::convert::Infallible;

    /// The flag's form: `default`, or statuses and ranges, comma-separated; checked with
    /// the file's at resolution.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text.trim() {
            "default" => Self::Keyword(text.trim().to_string()),
            list => Self::List(list.split(',').map(|item| StatusItem::Text(item.trim().to_string())).collect()),
        })
    }
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

impl std::str::FromStr for SuffixSpec {
    type Err = std::convert::Infallible;

    /// The flag's form: `true`, `false`, or suffixes, comma-separated.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text.trim() {
            "true" => Self::Flag(true),
            "false" => Self::Flag(false),
            list => Self::List(list.split(',').map(|item| item.trim().to_string()).collect()),
        })
    }
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
    /// `[listen]`.
    #[serde(default)]
    pub listen: RawListen,
    /// `[admin]`.
    #[serde(default)]
    pub admin: RawAdmin,
    /// `[server]`.
    #[serde(default)]
    pub server: RawServer,
    /// `[policy]`.
    #[serde(default)]
    pub policy: RawPolicy,
    /// `[replay_cache]`.
    #[serde(default)]
    pub replay_cache: RawReplayCache,
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
    /// [`oncely_http::default_stored_status`].
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

/// One route's checked settings: how it is matched, its settings as written (with
/// `[defaults]` under them), and the policy its layer applies.
#[derive(Debug, Clone)]
pub struct RouteSettings {
    /// The path prefix (`/` for the defaults).
    pub path: String,
    /// Where errors name this route's keys (`defaults`, `routes[2]`).
    pub at: String,
    /// Whether the prefix matches ignoring ASCII case.
    pub case_insensitive: bool,
    /// Suffixes that may follow the prefix.
    pub match_suffixes: Suffixes,
    /// How long the upstream call may go on after its client got 504.
    pub completion_limit: Duration,
    /// The route's settings as written, `[defaults]` and flags laid under them.
    pub raw: RawSettings,
    /// What every route's layer shares.
    pub common: Common,
    /// What the route's layer does, as published.
    pub policy: Policy,
    /// The route's token verifier, once [`Config::load_keys`] has read its keys.
    pub jwt: Arc<std::sync::OnceLock<JwtScope>>,
}

impl RouteSettings {
    /// Whether this route's prefix matches `path` (already [normalised](crate::routing::normalize)).
    pub fn matches(&self, path: &str) -> bool {
        route_matches(&self.path, self.case_insensitive, &self.match_suffixes, path)
    }

    /// This route's layer over `engine` (a builder with the store and the gateway's
    /// background registries): the settings were checked by [`Config::resolve`].
    pub fn layer<S: Store>(&self, engine: OncelyBuilder<S>) -> Result<IdempotencyLayer<S>, ConfigError> {
        let jwt = self.jwt.get();
        if jwt.is_none() && self.raw.scope.as_ref().is_some_and(|s| s.jwt.is_some()) {
            return Err(err(&format!("{}.scope.jwt", self.at), "its keys were not loaded (Config::load_keys)"));
        }
        route_layer(&self.at, &self.raw, engine, &self.common, self.completion_limit, jwt)
    }
}

/// The settings outside `[defaults]` and `[[routes]]` that every route's layer takes.
#[derive(Debug, Clone)]
pub struct Common {
    /// When a client still waiting gets 504 (`upstream.timeout`).
    pub upstream_timeout: Duration,
    /// The page problems link to (`policy.documentation_url`).
    pub documentation_url: Option<String>,
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

/// The checked `[upstream]`.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// When a client still waiting gets 504 (the call goes on up to its route's
    /// completion limit).
    pub timeout: Duration,
    /// How an `https://` upstream is reached.
    pub tls: UpstreamTls,
}

/// The checked `[policy]`.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    /// Where the policy is served, if anywhere.
    pub path: Option<String>,
    /// The documentation page problems link to.
    pub documentation_url: Option<String>,
}

/// The whole checked configuration: what `serve` runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The settings for paths no route matches.
    pub defaults: RouteSettings,
    /// The routes, longest prefix first.
    pub routes: Vec<RouteSettings>,
    /// The upstream's timeouts.
    pub upstream: Upstream,
    /// The admin bearer token, if key endpoints are enabled.
    pub admin_token: Option<String>,
    /// The proxy listener's limits.
    pub server: ServerLimits,
    /// The admin listener's limits: the same timeouts, its own connection cap.
    pub admin_server: ServerLimits,
    /// Proxy worker threads (`server.workers`, see [`crate::workers`]); 0 serves proxy
    /// connections on the shared multi-threaded runtime.
    pub workers: usize,
    /// Where the policy is published.
    pub policy: PolicySettings,
    /// The proxy listener's certificate, when it serves HTTPS.
    pub listen_tls: Option<CertFiles>,
    /// The admin listener's certificate, when it serves HTTPS.
    pub admin_tls: Option<CertFiles>,
    /// The replay cache.
    pub replay_cache: ReplayCacheSettings,
}

/// `[replay_cache]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayCacheSettings {
    /// On, off, or (`None`) decided by the store: on for stores behind a network hop.
    pub enabled: Option<bool>,
    /// How long an entry is answered from memory.
    pub ttl: Duration,
    /// Entries held at most.
    pub max_entries: u64,
    /// Bytes of payload held at most.
    pub max_bytes: u64,
}

impl ReplayCacheSettings {
    /// Whether to cache for a store whose URL is `store_url`: as configured, or on for
    /// the stores a replay reaches over the network (Redis, PostgreSQL, DynamoDB) and for
    /// SQLite when it `sees_deletes_elsewhere` (its count of deletes could be opened, so
    /// that a delete through `oncely keys delete` or another gateway is seen at once).
    /// Off for `memory://`, whose claim already is an in-process read.
    pub fn enabled_for(&self, store_url: &str, sees_deletes_elsewhere: bool) -> bool {
        // `ttl` and `max_bytes` are never zero (`duration` and `size` refuse it).
        if self.max_entries == 0 {
            return false;
        }
        self.enabled.unwrap_or_else(|| {
            let scheme = store_url.split_once("://").map_or("", |(scheme, _)| scheme);
            match scheme {
                "memory" | "" => false,
                "sqlite" => sees_deletes_elsewhere,
                _ => true,
            }
        })
    }
}

/// The gateway's own defaults: settings no library owns.
mod defaults {
    /// When a client gets 504.
    pub(super) const UPSTREAM_TIMEOUT: &str = "60s";
    /// How long an upstream call goes on after that.
    pub(super) const COMPLETION_LIMIT: &str = "5m";
    /// Where the policy is served.
    pub(super) const POLICY_PATH: &str = "/.well-known/idempotency";
    /// How long the replay cache answers a record from memory.
    pub(super) const REPLAY_CACHE_TTL: &str = "5s";
}

impl Config {
    /// Checks `raw` (with `overrides` from flags and `ONCELY_*` variables laid over its
    /// `[defaults]`), naming the key of the first error. Each route's layer is built once
    /// here on a memory store, so that what the libraries refuse is refused now, named.
    pub fn resolve(raw: &RawConfig, overrides: &RawSettings) -> Result<Self, ConfigError> {
        let upstream = Upstream {
            timeout: duration(
                "upstream.timeout",
                raw.upstream.timeout.as_deref().unwrap_or(defaults::UPSTREAM_TIMEOUT),
            )?,
            tls: UpstreamTls {
                ca_file: raw.upstream.ca_file.clone(),
                client_cert: pair(
                    "upstream.client_cert_file",
                    &raw.upstream.client_cert_file,
                    "upstream.client_key_file",
                    &raw.upstream.client_key_file,
                )?,
                insecure_skip_verify: raw.upstream.insecure_skip_verify.unwrap_or(false),
            },
        };
        let listen_tls =
            pair("listen.tls_cert_file", &raw.listen.tls_cert_file, "listen.tls_key_file", &raw.listen.tls_key_file)?
                .map(|(cert, key)| CertFiles { cert, key });
        let admin_tls =
            pair("admin.tls_cert_file", &raw.admin.tls_cert_file, "admin.tls_key_file", &raw.admin.tls_key_file)?
                .map(|(cert, key)| CertFiles { cert, key });
        let policy = PolicySettings {
            path: match raw.policy.path.as_deref() {
                None => Some(defaults::POLICY_PATH.to_string()),
                Some("") => None,
                Some(path) if path.starts_with('/') => Some(path.to_string()),
                Some(path) => return Err(err("policy.path", format!("{path:?} must start with `/`"))),
            },
            documentation_url: match raw.policy.documentation_url.as_deref() {
                None | Some("") => None,
                Some(url) => {
                    let parsed: http::Uri = url
                        .parse()
                        .map_err(|e| err("policy.documentation_url", format!("{url:?} is not a URL ({e})")))?;
                    if parsed.scheme().is_none() {
                        return Err(err("policy.documentation_url", format!("{url:?} is not an absolute URL")));
                    }
                    Some(url.to_string())
                }
            },
        };
        let base = raw.defaults.overlaid(overrides);
        let common = Common { upstream_timeout: upstream.timeout, documentation_url: policy.documentation_url.clone() };
        let defaults = resolve_route("defaults", "/", &base, &common)?;
        let mut routes = Vec::with_capacity(raw.routes.len());
        for (i, route) in raw.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            if !route.path.starts_with('/') {
                return Err(err(&format!("{at}.path"), format!("{:?} must start with `/`", route.path)));
            }
            if raw.routes[..i].iter().any(|r| r.path == route.path) {
                return Err(err(&format!("{at}.path"), format!("{:?} is configured twice", route.path)));
            }
            routes.push(resolve_route(&at, &route.path, &base.overlaid(&route.settings), &common)?);
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.path.len()));
        let admin_token = raw.admin.token.clone().filter(|t| !t.is_empty());
        let server = resolve_server(&raw.server)?;
        let admin_server = ServerLimits {
            max_connections: positive("admin.max_connections", raw.admin.max_connections.unwrap_or(64))?,
            max_connections_per_client: None,
            ..server.clone()
        };
        let cache = &raw.replay_cache;
        let replay_cache = ReplayCacheSettings {
            enabled: cache.enabled,
            ttl: duration("replay_cache.ttl", cache.ttl.as_deref().unwrap_or(defaults::REPLAY_CACHE_TTL))?,
            max_entries: cache.max_entries.unwrap_or(oncely::store::cache::DEFAULT_MAX_ENTRIES),
            max_bytes: match cache.max_bytes.as_deref() {
                Some(text) => size("replay_cache.max_bytes", text)? as u64,
                None => oncely::store::cache::DEFAULT_MAX_BYTES,
            },
        };
        Ok(Self {
            defaults,
            routes,
            upstream,
            admin_token,
            server,
            admin_server,
            workers: raw.server.workers.unwrap_or_else(crate::workers::default_count),
            policy,
            listen_tls,
            admin_tls,
            replay_cache,
        })
    }

    /// The settings for `path`: the longest route prefix that matches whole segments
    /// (`/payments` matches `/payments` and `/payments/1`, not `/paymentsx`), else the
    /// defaults.
    pub fn route_for(&self, path: &str) -> &RouteSettings {
        self.routes.iter().find(|r| r.matches(path)).unwrap_or(&self.defaults)
    }

    /// Reads the keys of every route's JWT scope (and starts their key sets' refreshers):
    /// before the routes' layers are built. Errors name the setting
    /// (`routes[0].scope.jwt.secret_file`). Reading a route's keys again does nothing.
    pub async fn load_keys(&mut self) -> Result<(), ConfigError> {
        for route in std::iter::once(&mut self.defaults).chain(self.routes.iter_mut()) {
            let Some(spec) = route.raw.scope.as_ref().and_then(|s| s.jwt.as_ref()) else { continue };
            if route.jwt.get().is_some() {
                continue;
            }
            let verifier = spec.build(&format!("{}.scope.jwt", route.at)).await?;
            let _ = route.jwt.set(verifier);
            let engine = Oncely::builder(MemoryStore::builder().no_sweeper().build());
            route.policy = route.layer(engine)?.policy();
        }
        Ok(())
    }

    /// Every route's policy, as published at `[policy] path`.
    pub fn published_policy(&self) -> serde_json::Value {
        let route = |r: &RouteSettings| {
            let mut value = serde_json::to_value(&r.policy).unwrap_or_default();
            if let Some(object) = value.as_object_mut() {
                object.insert("path".into(), r.path.clone().into());
                object.insert("completion_limit_seconds".into(), r.completion_limit.as_secs_f64().into());
            }
            value
        };
        serde_json::json!({
            "specification": "https://datatracker.ietf.org/doc/draft-ietf-httpapi-idempotency-key-header/",
            "routes": self.routes.iter().map(route).collect::<Vec<_>>(),
            "default": route(&self.defaults),
            "documentation_url": self.policy.documentation_url,
        })
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

fn resolve_route(at: &str, path: &str, raw: &RawSettings, common: &Common) -> Result<RouteSettings, ConfigError> {
    let key = |name: &str| format!("{at}.{name}");
    let completion_limit = match &raw.completion_limit {
        Some(text) => duration(&key("completion_limit"), text)?,
        None => {
            // Unset, it is cut to a short retention (checked with the rest in `route_layer`).
            let retention = match &raw.ttl {
                Some(text) => duration(&key("ttl"), text)?,
                None => oncely::Config::default().retention,
            };
            duration("", defaults::COMPLETION_LIMIT).unwrap_or_default().min(retention)
        }
    };
    if completion_limit < common.upstream_timeout {
        return Err(err(
            &key("completion_limit"),
            format!("{completion_limit:?} is shorter than the upstream timeout {:?}", common.upstream_timeout),
        ));
    }
    let engine = Oncely::builder(MemoryStore::builder().no_sweeper().build());
    // A JWT scope's keys are read by `Config::load_keys`; until then the dry run has none.
    let layer = route_layer(at, raw, engine, common, completion_limit, None)?;
    let policy = layer.policy();
    if layer.scope_is_shared_by_all() && policy.required {
        tracing::warn!(
            route = path,
            "the route requires a key but has no scope source: every client shares every key, and one client's \
             request can be answered with another's stored response"
        );
    }
    Ok(RouteSettings {
        path: path.to_string(),
        at: at.to_string(),
        case_insensitive: raw.case_insensitive.unwrap_or(false),
        match_suffixes: resolve_suffixes(&key("match_suffixes"), raw.match_suffixes.as_ref())?,
        completion_limit,
        raw: raw.clone(),
        common: common.clone(),
        policy,
        jwt: Arc::default(),
    })
}

/// Builds a route's idempotency layer from its settings as written: each key that is set
/// is checked, named in its error, and handed to the builder method that owns it; each
/// key that is not keeps the library's default. The one place a setting is applied.
fn route_layer<S: Store>(
    at: &str,
    raw: &RawSettings,
    engine: OncelyBuilder<S>,
    common: &Common,
    completion_limit: Duration,
    jwt: Option<&JwtScope>,
) -> Result<IdempotencyLayer<S>, ConfigError> {
    let key = |name: &str| format!("{at}.{name}");
    let header_name = |name: &str, text: &str| {
        HeaderName::try_from(text).map_err(|_| err(&key(name), format!("{text:?} is not a header name")))
    };
    // The engine: retention, lease and conflict mode, checked by the engine itself.
    let mut config = oncely::Config::default();
    if let Some(text) = &raw.ttl {
        config.retention = duration(&key("ttl"), text)?;
    }
    if let Some(text) = &raw.lease {
        config.lease = duration(&key("lease"), text)?;
        if config.lease > config.retention {
            return Err(err(
                &key("lease"),
                format!("{:?} is longer than the ttl {:?}", config.lease, config.retention),
            ));
        }
    }
    let wait_timeout = raw.wait_timeout.as_deref().map(|text| duration(&key("wait_timeout"), text)).transpose()?;
    // Unset, the mode is the engine's default; `wait_timeout` alone sets the wait.
    let default_wait = match config.conflict {
        ConflictMode::Wait { timeout } => timeout,
        ConflictMode::Reject => oncely::DEFAULT_WAIT_TIMEOUT,
    };
    config.conflict = match (raw.on_conflict.as_deref(), config.conflict) {
        (Some("reject"), _) | (None, ConflictMode::Reject) => ConflictMode::Reject,
        (Some("wait"), _) | (None, ConflictMode::Wait { .. }) => {
            ConflictMode::Wait { timeout: wait_timeout.unwrap_or(default_wait) }
        }
        (Some(other), _) => {
            return Err(err(&key("on_conflict"), format!("{other:?} is neither \"wait\" nor \"reject\"")));
        }
    };
    // The lease is renewed while the upstream call goes on, up to its completion limit.
    config.keep_alive_ceiling = config.keep_alive_ceiling.max(completion_limit);
    if completion_limit > config.retention {
        return Err(err(
            &key("completion_limit"),
            format!("{completion_limit:?} is longer than the ttl {:?}", config.retention),
        ));
    }
    let oncely = engine.config(config).build().map_err(|e| {
        let name = match e.setting {
            Setting::Lease => "lease",
            Setting::WaitTimeout => "wait_timeout",
            Setting::KeepAliveCeiling => "completion_limit",
            _ => "ttl",
        };
        err(&key(name), format!("{:?} is outside {:?}..={:?}", e.value, e.min, e.max))
    })?;

    // The HTTP layer.
    let mut layer = IdempotencyLayer::new(oncely)
        .answer_within(common.upstream_timeout)
        .access_log(crate::logs::access::AccessLines);
    if let Some(text) = &raw.header {
        layer = layer.header_name(header_name("header", text)?);
    }
    if let Some(list) = &raw.methods {
        let methods = list
            .iter()
            .map(|m| {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| err(&key("methods"), format!("{m:?} is not a method")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        layer = layer.methods(methods);
    }
    if let Some(required) = raw.required {
        layer = layer.require_key(required);
    }
    match (&raw.scope, &raw.scope_headers) {
        (Some(_), Some(_)) => {
            return Err(err(&key("scope_headers"), "set either `scope` or its shorthand `scope_headers`, not both"));
        }
        (None, Some(list)) => {
            let names = list.iter().map(|h| header_name("scope_headers", h)).collect::<Result<Vec<_>, _>>()?;
            layer = layer.scope_headers(names);
        }
        (Some(spec), None) => layer = layer.scope(scope_source(&key("scope"), spec, jwt)?),
        (None, None) => {}
    }
    if let Some(text) = &raw.max_body {
        layer = layer.max_body(size(&key("max_body"), text)?);
    }
    match &raw.store_statuses {
        None => {}
        Some(StatusSpec::Keyword(k)) if k == "default" => {}
        Some(StatusSpec::Keyword(k)) => {
            return Err(err(&key("store_statuses"), format!("{k:?} is not \"default\" or a list of statuses")));
        }
        Some(StatusSpec::List(items)) => {
            let ranges =
                items.iter().map(|item| status_range(&key("store_statuses"), item)).collect::<Result<_, _>>()?;
            let statuses = StoredStatuses::Ranges(ranges);
            layer = layer.store_statuses(move |status| statuses.contains(status));
        }
    }
    match raw.on_unknown.as_deref() {
        None => {}
        Some("hold") => layer = layer.hold_unknown_outcomes(true),
        Some("release") => layer = layer.hold_unknown_outcomes(false),
        Some(other) => return Err(err(&key("on_unknown"), format!("{other:?} is neither \"hold\" nor \"release\""))),
    }
    if let Some(code) = raw.mismatch_status {
        match StatusCode::from_u16(code) {
            Ok(status) if status.is_client_error() => layer = layer.mismatch_status(status),
            _ => return Err(err(&key("mismatch_status"), format!("{code} is not a 4xx status (422 or 400)"))),
        }
    }
    match raw.max_in_progress_per_scope {
        Some(0) => return Err(err(&key("max_in_progress_per_scope"), "must be at least 1")),
        Some(n) => layer = layer.max_in_progress_per_scope(n),
        None => {}
    }
    if let Some(text) = &raw.max_decoded_body {
        layer = layer.max_decoded_body(size(&key("max_decoded_body"), text)?);
    }
    match raw.takeover_header.as_deref() {
        None => {}
        Some("") => layer = layer.takeover_header(None),
        Some(h) => layer = layer.takeover_header(Some(header_name("takeover_header", h)?)),
    }
    let pointer = |name: &str, text: &str| {
        text.parse::<JsonPointer>()
            .map_err(|e| err(&key(name), format!("{text:?} is not a JSON pointer like \"/id\" ({e})")))
    };
    if let Some(text) = &raw.key_pointer {
        layer = layer.key_from_body(pointer("key_pointer", text)?);
    }
    if let Some(list) = &raw.fingerprint_ignore {
        let pointers = list.iter().map(|p| pointer("fingerprint_ignore", p)).collect::<Result<Vec<_>, _>>()?;
        layer = layer.fingerprint_ignore(pointers);
    }
    if let Some(list) = &raw.fingerprint_headers {
        let names = list.iter().map(|h| header_name("fingerprint_headers", h)).collect::<Result<Vec<_>, _>>()?;
        layer = layer.fingerprint_headers(names);
    }
    if let Some(url) = &common.documentation_url {
        layer = layer.documentation_url(url.clone());
    }
    Ok(layer)
}

/// The scope source a `scope` table describes, its sources combined in the table's order.
fn scope_source(at: &str, spec: &ScopeSpec, jwt: Option<&JwtScope>) -> Result<ScopeSource, ConfigError> {
    let name = |field: &str, text: &str| {
        HeaderName::try_from(text).map_err(|_| err(&format!("{at}.{field}"), format!("{text:?} is not a header name")))
    };
    let mut sources = Vec::new();
    if let Some(list) = &spec.headers {
        sources.push(ScopeSource::headers(list.iter().map(|h| name("headers", h)).collect::<Result<Vec<_>, _>>()?));
    }
    if let Some(list) = &spec.cookies {
        if let Some(bad) = list
            .iter()
            .find(|c| c.is_empty() || !c.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b)))
        {
            return Err(err(&format!("{at}.cookies"), format!("{bad:?} is not a cookie name")));
        }
        sources.push(ScopeSource::cookies(list.clone()));
    }
    if let Some(header) = &spec.trusted_header {
        sources.push(ScopeSource::trusted_header(name("trusted_header", header)?));
    }
    if spec.jwt.is_some() {
        match jwt {
            Some(verifier) => sources.push(ScopeSource::jwt(verifier.clone())),
            // Before `Config::load_keys`: a stand-in for the checks, never served.
            None => sources.push(ScopeSource::function(|_| oncely::Scope::global())),
        }
    }
    Ok(sources.into_iter().reduce(ScopeSource::and).unwrap_or_else(|| ScopeSource::headers([])))
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
        assert_eq!(config.defaults.policy.max_body, 1024 * 1024);
        let payments = &config.route_for("/payments/ch_1").policy;
        assert!(payments.required);
        assert_eq!(payments.on_conflict, "wait");
        assert_eq!(payments.wait_timeout_seconds, Some(10.0));
        assert_eq!(config.defaults.policy.on_conflict, "reject");
        let refunds = &config.route_for("/payments/refunds/7").policy;
        assert!(!refunds.required, "unset keys come from [defaults], not from a shorter route");
        assert!(!refunds.released_statuses.contains(&502));
        assert!(refunds.released_statuses.contains(&201));
        assert!(!config.route_for("/paymentsx").policy.required, "prefixes match whole segments");
        assert!(config.route_for("/PAYMENTS/ch_1").policy.required, "case_insensitive");
        assert!(config.route_for("/payments.json").policy.required, "match_suffixes");
        assert!(config.route_for("/Payments.JSON/ch_1").policy.required);
        assert!(!config.route_for("/payments.xml").policy.required, "only the listed suffixes");
        assert!(!config.route_for("/payments.jsonx").policy.required, "a suffix ends on a segment boundary");
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
            workers = 3

            [admin]
            max_connections = 8
            "#,
        )
        .expect("valid");
        assert_eq!(config.workers, 3);
        assert_eq!(resolve("").expect("valid").workers, crate::workers::default_count(), "one per core by default");
        assert_eq!(resolve("[server]\nworkers = 0").expect("valid").workers, 0, "0: the shared runtime");
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
        assert_eq!(config.defaults.policy.retention_seconds, 300.0);
    }

    #[test]
    fn unset_keys_keep_the_libraries_defaults() {
        let config = resolve("").expect("valid");
        let policy = &config.defaults.policy;
        let layer = oncely_http::IdempotencyLayer::new(Oncely::new(MemoryStore::new())).policy();
        assert_eq!(policy.on_conflict, "wait", "seed 001's choice, and what retrying clients need");
        assert_eq!(policy.methods, layer.methods);
        assert_eq!(policy.max_body, layer.max_body);
        assert_eq!(policy.released_statuses, layer.released_statuses);
        assert_eq!(policy.mismatch_status, 422);
        assert_eq!(policy.unknown_outcomes, "held");
        assert_eq!(policy.retention_seconds, oncely::Config::default().retention.as_secs_f64());
        assert_eq!(config.policy.path.as_deref(), Some("/.well-known/idempotency"));
        assert_eq!(config.upstream.timeout, Duration::from_secs(60));
        assert_eq!(config.defaults.completion_limit, Duration::from_secs(300));
    }

    #[test]
    fn the_new_keys_of_retrying_clients_are_applied() {
        let config = resolve(
            r#"
            [defaults]
            on_conflict = "reject"
            on_unknown = "release"
            mismatch_status = 400
            completion_limit = "2m"

            [upstream]
            timeout = "30s"

            [policy]
            path = "/idempotency.json"
            documentation_url = "https://api.example.com/docs/idempotency"
            "#,
        )
        .expect("valid");
        let policy = &config.defaults.policy;
        assert_eq!(policy.on_conflict, "reject");
        assert_eq!(policy.unknown_outcomes, "lapse with the lease");
        assert_eq!(policy.mismatch_status, 400);
        assert_eq!(policy.documentation_url.as_deref(), Some("https://api.example.com/docs/idempotency"));
        assert_eq!(config.defaults.completion_limit, Duration::from_secs(120));
        let published = config.published_policy();
        assert_eq!(published["default"]["completion_limit_seconds"], 120.0);
        assert_eq!(published["default"]["path"], "/");
        assert!(resolve("[policy]\npath = \"\"").expect("valid").policy.path.is_none(), "\"\" publishes nothing");
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
            ("[defaults]\non_unknown = \"forget\"", "defaults.on_unknown"),
            ("[defaults]\nmismatch_status = 200", "defaults.mismatch_status"),
            ("[defaults]\ncompletion_limit = \"later\"", "defaults.completion_limit"),
            ("[defaults]\ncompletion_limit = \"1s\"", "defaults.completion_limit"),
            ("[defaults]\nttl = \"1m\"\ncompletion_limit = \"2m\"", "defaults.completion_limit"),
            ("[upstream]\ntimeout = \"10m\"", "defaults.completion_limit"),
            ("[policy]\npath = \"well-known\"", "policy.path"),
            ("[policy]\ndocumentation_url = \"/docs\"", "policy.documentation_url"),
            ("[policy]\nurl = \"x\"", "url"),
            ("[defaults]\nkey_pointer = \"id\"", "defaults.key_pointer"),
            ("[defaults]\nscope = { headers = [\"a b\"] }", "defaults.scope.headers"),
            ("[defaults]\nscope = { cookies = [\"a;b\"] }", "defaults.scope.cookies"),
            ("[defaults]\nscope = { trusted_header = \"\" }", "defaults.scope.trusted_header"),
            ("[defaults]\nscope = { cookie = [\"s\"] }", "cookie"),
            ("[defaults]\nscope = {}\nscope_headers = [\"x\"]", "defaults.scope_headers"),
            ("[defaults]\nfingerprint_ignore = [\"/a\", \"b\"]", "defaults.fingerprint_ignore"),
            ("[defaults]\nfingerprint_headers = [\"a b\"]", "defaults.fingerprint_headers"),
        ];
        for (text, key) in cases {
            let message = resolve(text).expect_err(text).0;
            assert!(message.contains(key), "{text:?} gave {message:?}, which does not name {key}");
        }
    }
}
