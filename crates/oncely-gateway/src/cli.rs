//! The command line: `oncely serve | demo | check-config | keys | stats | dynamodb`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use oncely::{StorageKey, StoreAdmin};

use crate::admin::RecordView;
use crate::config::{Config, RawConfig, RawSettings, StatusItem, StatusSpec, SuffixSpec};
use crate::server::{ServeOptions, serve};
use crate::stores::{self, DEFAULT_STORE};

/// Oncely: make retried operations run once, in front of any HTTP API.
#[derive(Debug, Parser)]
#[command(name = "oncely", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, env = "ONCELY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    log_format: LogFormat,
    /// Log filter (`info`, `warn`, `oncely=debug`…).
    #[arg(long, env = "ONCELY_LOG_LEVEL", default_value = "info", global = true)]
    log_level: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once at start")]
enum Command {
    /// Run the gateway in front of an upstream.
    Serve(ServeArgs),
    /// Run a built-in payments API with the gateway in front of it, and print curl commands.
    Demo(DemoArgs),
    /// Check a configuration file without starting.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// Inspect or delete stored records.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Count the records in a store.
    Stats {
        /// The store URL.
        #[arg(long, env = "ONCELY_STORE", default_value = DEFAULT_STORE)]
        store: String,
    },
    /// DynamoDB: set up the store's table.
    Dynamodb {
        #[command(subcommand)]
        action: DynamoDbAction,
    },
}

#[derive(Debug, Subcommand)]
enum DynamoDbAction {
    /// Create the table a dynamodb:// store URL names (on-demand capacity) with its TTL
    /// attribute enabled; a table that exists with the right key schema is fine.
    CreateTable {
        /// The store URL, as for `serve --store`: dynamodb://TABLE?region=…&endpoint=….
        #[arg(long, env = "ONCELY_STORE")]
        store: String,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The upstream API, `http://host:port`.
    #[arg(long, env = "ONCELY_UPSTREAM")]
    upstream: String,
    /// Where the gateway listens.
    #[arg(long, env = "ONCELY_LISTEN", default_value = "127.0.0.1:7100")]
    listen: SocketAddr,
    /// Where the admin API (health, metrics, keys) listens; off when unset.
    #[arg(long, env = "ONCELY_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// The store: memory://, sqlite://PATH, redis://HOST:PORT, redis+cluster://…, postgres://…, dynamodb://TABLE (options: the oncely-stores docs).
    #[arg(long, env = "ONCELY_STORE", default_value = DEFAULT_STORE)]
    store: String,
    /// The TOML configuration file.
    #[arg(long, env = "ONCELY_CONFIG")]
    config: Option<PathBuf>,
    /// The admin bearer token (overrides `admin.token`).
    #[arg(long, env = "ONCELY_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// How long to wait for the upstream's response head (overrides `upstream.timeout`).
    #[arg(long, env = "ONCELY_UPSTREAM_TIMEOUT")]
    upstream_timeout: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    defaults: DefaultsArgs,
}

/// Flags and variables that override the file's `[server]` (and `admin.max_connections`).
#[derive(Debug, Args, Default)]
struct ServerArgs {
    /// How long a new connection may take to send its first request head (`server.header_read_timeout`).
    #[arg(long, env = "ONCELY_HEADER_READ_TIMEOUT")]
    header_read_timeout: Option<String>,
    /// How long a connection may stay open with no request in flight (`server.idle_timeout`).
    #[arg(long, env = "ONCELY_IDLE_TIMEOUT")]
    idle_timeout: Option<String>,
    /// How long a request body may send nothing (`server.body_read_timeout`).
    #[arg(long, env = "ONCELY_BODY_READ_TIMEOUT")]
    body_read_timeout: Option<String>,
    /// Open proxy connections (`server.max_connections`).
    #[arg(long, env = "ONCELY_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Open proxy connections per client IP, 0 for no cap (`server.max_connections_per_client`).
    #[arg(long, env = "ONCELY_MAX_CONNECTIONS_PER_CLIENT")]
    max_connections_per_client: Option<usize>,
    /// HTTP/2 streams per connection (`server.max_concurrent_streams`).
    #[arg(long, env = "ONCELY_MAX_CONCURRENT_STREAMS")]
    max_concurrent_streams: Option<u32>,
    /// Open admin connections (`admin.max_connections`).
    #[arg(long, env = "ONCELY_ADMIN_MAX_CONNECTIONS")]
    admin_max_connections: Option<usize>,
}

impl ServerArgs {
    /// Lays the flags that are set over `raw`.
    fn apply(&self, raw: &mut RawConfig) {
        let server = &mut raw.server;
        let texts = [
            (&mut server.header_read_timeout, &self.header_read_timeout),
            (&mut server.idle_timeout, &self.idle_timeout),
            (&mut server.body_read_timeout, &self.body_read_timeout),
        ];
        for (slot, flag) in texts {
            if flag.is_some() {
                slot.clone_from(flag);
            }
        }
        server.max_connections = self.max_connections.or(server.max_connections);
        server.max_connections_per_client = self.max_connections_per_client.or(server.max_connections_per_client);
        server.max_concurrent_streams = self.max_concurrent_streams.or(server.max_concurrent_streams);
        raw.admin.max_connections = self.admin_max_connections.or(raw.admin.max_connections);
    }
}

/// Flags and variables that override the file's `[defaults]`.
#[derive(Debug, Args, Default)]
struct DefaultsArgs {
    /// The key header (`defaults.header`).
    #[arg(long, env = "ONCELY_HEADER")]
    header: Option<String>,
    /// Covered methods, comma-separated (`defaults.methods`).
    #[arg(long, env = "ONCELY_METHODS", value_delimiter = ',')]
    methods: Option<Vec<String>>,
    /// Whether requests without a key are refused (`defaults.required`).
    #[arg(long, env = "ONCELY_REQUIRED")]
    required: Option<bool>,
    /// How long results are replayed (`defaults.ttl`).
    #[arg(long, env = "ONCELY_TTL")]
    ttl: Option<String>,
    /// How long a crashed request blocks its key (`defaults.lease`).
    #[arg(long, env = "ONCELY_LEASE")]
    lease: Option<String>,
    /// `reject` or `wait` (`defaults.on_conflict`).
    #[arg(long, env = "ONCELY_ON_CONFLICT")]
    on_conflict: Option<String>,
    /// Wait mode's limit (`defaults.wait_timeout`).
    #[arg(long, env = "ONCELY_WAIT_TIMEOUT")]
    wait_timeout: Option<String>,
    /// Principal headers, comma-separated (`defaults.scope_headers`).
    #[arg(long, env = "ONCELY_SCOPE_HEADERS", value_delimiter = ',')]
    scope_headers: Option<Vec<String>>,
    /// Request body limit (`defaults.max_body`).
    #[arg(long, env = "ONCELY_MAX_BODY")]
    max_body: Option<String>,
    /// `default` or statuses/ranges, comma-separated (`defaults.store_statuses`).
    #[arg(long, env = "ONCELY_STORE_STATUSES")]
    store_statuses: Option<String>,
    /// Whether path prefixes match ignoring ASCII case (`defaults.case_insensitive`).
    #[arg(long, env = "ONCELY_CASE_INSENSITIVE")]
    case_insensitive: Option<bool>,
    /// `true`, `false`, or suffixes, comma-separated: `.json,.xml` (`defaults.match_suffixes`).
    #[arg(long, env = "ONCELY_MATCH_SUFFIXES")]
    match_suffixes: Option<String>,
    /// Running operations one principal may hold at once (`defaults.max_in_progress_per_scope`).
    #[arg(long, env = "ONCELY_MAX_IN_PROGRESS_PER_SCOPE")]
    max_in_progress_per_scope: Option<usize>,
    /// Decoded size limit of a gzip request body (`defaults.max_decoded_body`).
    #[arg(long, env = "ONCELY_MAX_DECODED_BODY")]
    max_decoded_body: Option<String>,
    /// The header announcing a takeover to the upstream, "" for none (`defaults.takeover_header`).
    #[arg(long, env = "ONCELY_TAKEOVER_HEADER")]
    takeover_header: Option<String>,
}

impl DefaultsArgs {
    fn to_raw(&self) -> RawSettings {
        RawSettings {
            header: self.header.clone(),
            methods: self.methods.clone(),
            required: self.required,
            ttl: self.ttl.clone(),
            lease: self.lease.clone(),
            on_conflict: self.on_conflict.clone(),
            wait_timeout: self.wait_timeout.clone(),
            scope_headers: self.scope_headers.clone(),
            max_body: self.max_body.clone(),
            store_statuses: self.store_statuses.as_ref().map(|s| match s.as_str() {
                "default" => StatusSpec::Keyword(s.clone()),
                list => {
                    StatusSpec::List(list.split(',').map(|item| StatusItem::Text(item.trim().to_string())).collect())
                }
            }),
            case_insensitive: self.case_insensitive,
            match_suffixes: self.match_suffixes.as_ref().map(|s| match s.trim() {
                "true" => SuffixSpec::Flag(true),
                "false" => SuffixSpec::Flag(false),
                list => SuffixSpec::List(list.split(',').map(|item| item.trim().to_string()).collect()),
            }),
            max_in_progress_per_scope: self.max_in_progress_per_scope,
            max_decoded_body: self.max_decoded_body.clone(),
            takeover_header: self.takeover_header.clone(),
        }
    }
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Where the gateway listens.
    #[arg(long, default_value = "127.0.0.1:7100")]
    listen: SocketAddr,
    /// Where the admin API listens.
    #[arg(long, default_value = "127.0.0.1:7101")]
    admin_listen: SocketAddr,
    /// Where the built-in payments API listens.
    #[arg(long, default_value = "127.0.0.1:7200")]
    upstream_listen: SocketAddr,
    /// The store.
    #[arg(long, default_value = "sqlite://oncely-demo.db")]
    store: String,
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Show one record by its hash.
    Get {
        /// The record's hash (64 hex digits, from `keys list`).
        hash: String,
        /// The store URL.
        #[arg(long, env = "ONCELY_STORE", default_value = DEFAULT_STORE)]
        store: String,
    },
    /// Delete one record: the next request with its key runs again.
    Delete {
        /// The record's hash.
        hash: String,
        /// The store URL.
        #[arg(long, env = "ONCELY_STORE", default_value = DEFAULT_STORE)]
        store: String,
    },
    /// List records in hash order.
    List {
        /// The store URL.
        #[arg(long, env = "ONCELY_STORE", default_value = DEFAULT_STORE)]
        store: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this hash.
        #[arg(long)]
        after: Option<String>,
    },
}

fn init_logs(format: LogFormat, level: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Parses the command line and runs it. Exit codes: 0 done, 1 failed at run time, 2
/// bad usage or configuration.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format, &cli.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("oncely: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("oncely: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(message)) => {
            eprintln!("oncely: {message}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Usage(String),
    Runtime(String),
}

/// A store that could not be reached is a runtime failure (exit 1: try again later); a
/// URL or setting the store refuses is a usage error (exit 2: fix the command).
fn open_failure(error: stores::OpenError) -> Failure {
    if error.is_unreachable() { Failure::Runtime(error.to_string()) } else { Failure::Usage(error.to_string()) }
}

async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Serve(args) => {
            let mut raw = match &args.config {
                Some(path) => RawConfig::load(path).map_err(|e| Failure::Usage(e.to_string()))?,
                None => RawConfig::default(),
            };
            if args.admin_token.is_some() {
                raw.admin.token = args.admin_token.clone();
            }
            if args.upstream_timeout.is_some() {
                raw.upstream.timeout = args.upstream_timeout.clone();
            }
            args.server.apply(&mut raw);
            let overrides = args.defaults.to_raw();
            Config::resolve(&raw, &overrides).map_err(|e| Failure::Usage(e.to_string()))?;
            let options = ServeOptions {
                upstream: args.upstream,
                listen: args.listen,
                admin_listen: args.admin_listen,
                store: args.store,
            };
            serve(options, raw, overrides, announce).await.map_err(Failure::Runtime)
        }
        Command::Demo(args) => crate::demo::run(args.listen, args.admin_listen, args.upstream_listen, args.store)
            .await
            .map_err(Failure::Runtime),
        Command::CheckConfig { file } => {
            let raw = RawConfig::load(&file).map_err(|e| Failure::Usage(e.to_string()))?;
            let config = Config::resolve(&raw, &RawSettings::default()).map_err(|e| Failure::Usage(e.to_string()))?;
            println!("{}: ok ({} routes)", file.display(), config.routes.len());
            Ok(())
        }
        Command::Keys { action } => keys(action).await,
        Command::Dynamodb { action: DynamoDbAction::CreateTable { store } } => create_table(&store).await,
        Command::Stats { store } => {
            let store = stores::open(&store).await.map_err(open_failure)?.0;
            let stats = store.stats().await.map_err(|e| Failure::Runtime(e.to_string()))?;
            println!("records: {}\nin_progress: {}\ncompleted: {}", stats.records, stats.in_progress, stats.completed);
            Ok(())
        }
    }
}

/// `oncely dynamodb create-table`: a URL the store refuses is a usage error, DynamoDB
/// unreachable or refusing a runtime failure.
async fn create_table(url: &str) -> Result<(), Failure> {
    use oncely_dynamodb::{DynamoDbStore, DynamoDbUrl, OpenError, TableCreated};
    let shown = stores::redacted(url);
    let parsed: DynamoDbUrl = url.parse().map_err(|e| Failure::Usage(format!("{shown}: {e}")))?;
    let table = parsed.options().table_name().to_string();
    match DynamoDbStore::create_table(parsed.into_options()).await {
        Ok((_, created)) => {
            let what = match created {
                TableCreated::Created => "created, TTL enabled",
                TableCreated::TtlEnabled => "already there; TTL enabled",
                _ => "already there with its TTL enabled",
            };
            println!("table {table}: {what}");
            Ok(())
        }
        Err(e @ OpenError::Connect(_)) => Err(Failure::Runtime(format!("{shown}: {e}"))),
        Err(e) => Err(Failure::Usage(format!("{shown}: {e}"))),
    }
}

/// Prints the bound addresses: one line each, for people and for scripts to read.
pub fn announce(bound: crate::server::Bound) {
    println!("oncely listening on http://{}", bound.listen);
    if let Some(admin) = bound.admin {
        println!("oncely admin on http://{admin}");
    }
}

fn hash_arg(hash: &str) -> Result<StorageKey, Failure> {
    StorageKey::from_hex(hash).ok_or_else(|| Failure::Usage(format!("{hash:?} is not a record hash (64 hex digits)")))
}

fn print_json(value: &impl serde::Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Failure::Runtime(e.to_string()))?;
    println!("{text}");
    Ok(())
}

async fn keys(action: KeysAction) -> Result<(), Failure> {
    let runtime = |e: oncely::StoreError| Failure::Runtime(e.to_string());
    match action {
        KeysAction::Get { hash, store } => {
            let key = hash_arg(&hash)?;
            let store = stores::open(&store).await.map_err(open_failure)?.0;
            match store.get(&key).await.map_err(runtime)? {
                Some(record) => print_json(&RecordView::from(&record)),
                None => Err(Failure::Runtime(format!("no record {hash}"))),
            }
        }
        KeysAction::Delete { hash, store } => {
            let key = hash_arg(&hash)?;
            let store = stores::open(&store).await.map_err(open_failure)?.0;
            if store.delete(&key).await.map_err(runtime)? {
                println!("deleted {hash}");
                Ok(())
            } else {
                Err(Failure::Runtime(format!("no record {hash}")))
            }
        }
        KeysAction::List { store, limit, after } => {
            let after = after.as_deref().map(hash_arg).transpose()?;
            let store = stores::open(&store).await.map_err(open_failure)?.0;
            let records = store.list(after, limit).await.map_err(runtime)?;
            print_json(&records.iter().map(RecordView::from).collect::<Vec<_>>())
        }
    }
}
