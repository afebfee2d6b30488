//! The command line: `oncely serve | demo | check-config | keys | stats | dynamodb`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use oncely::{StorageKey, StoreAdmin};

use crate::admin::RecordView;
use crate::config::{
    Config, ConfigError, RawAdmin, RawConfig, RawListen, RawPolicy, RawReplayCache, RawServer, RawSettings, RawUpstream,
};
use crate::logs::LogFormat;
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
    /// The upstream API, `http://host:port` or `https://host:port` (optionally with a base path).
    #[arg(long, env = "ONCELY_UPSTREAM")]
    upstream: String,
    /// Where the gateway listens.
    #[arg(long, env = "ONCELY_LISTEN", default_value = "127.0.0.1:7100")]
    listen: SocketAddr,
    /// Where the admin API (health, metrics, keys) listens; off when unset.
    #[arg(long, env = "ONCELY_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// The store: memory://, sqlite://PATH, redis://HOST:PORT, rediss://… (TLS), redis+cluster://…, postgres://…?sslmode=…, dynamodb://TABLE (options: the oncely-stores docs).
    #[arg(long, env = "ONCELY_STORE", default_value = DEFAULT_STORE)]
    store: String,
    /// The TOML configuration file; the flags below override its keys.
    #[arg(long, env = "ONCELY_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    defaults: RawSettings,
    #[command(flatten)]
    upstream_table: RawUpstream,
    #[command(flatten)]
    listen_table: RawListen,
    #[command(flatten)]
    server: RawServer,
    #[command(flatten)]
    admin: RawAdmin,
    #[command(flatten)]
    policy: RawPolicy,
    #[command(flatten)]
    replay_cache: RawReplayCache,
}

impl ServeArgs {
    /// The file (if any) with the flags and variables that are set laid over it, checked.
    fn resolve(&self) -> Result<Config, ConfigError> {
        let mut raw = match &self.config {
            Some(path) => RawConfig::load(path)?,
            None => RawConfig::default(),
        };
        raw.upstream = raw.upstream.overlaid(&self.upstream_table);
        raw.listen = raw.listen.overlaid(&self.listen_table);
        raw.server = raw.server.overlaid(&self.server);
        raw.admin = raw.admin.overlaid(&self.admin);
        raw.policy = raw.policy.overlaid(&self.policy);
        raw.replay_cache = raw.replay_cache.overlaid(&self.replay_cache);
        Config::resolve(&raw, &self.defaults)
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
    /// Delete one record: the next request with its key runs again (a gateway with the
    /// replay cache on sees it within the cache's ttl, 5s by default).
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

/// Parses the command line and runs it. Exit codes: 0 done, 1 failed at run time, 2
/// bad usage or configuration.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let _flush_logs_at_exit = crate::logs::init(cli.log_format, &cli.log_level);
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
            let mut config = args.resolve().map_err(|e| Failure::Usage(e.to_string()))?;
            config.load_keys().await.map_err(|e| Failure::Usage(e.to_string()))?;
            crate::server::check_tls_files(&config, Some(&args.upstream)).map_err(Failure::Usage)?;
            let options = ServeOptions {
                upstream: args.upstream,
                listen: args.listen,
                admin_listen: args.admin_listen,
                store: args.store,
            };
            serve(options, config, announce).await.map_err(Failure::Runtime)
        }
        Command::Demo(args) => crate::demo::run(args.listen, args.admin_listen, args.upstream_listen, args.store)
            .await
            .map_err(Failure::Runtime),
        Command::CheckConfig { file } => {
            let raw = RawConfig::load(&file).map_err(|e| Failure::Usage(e.to_string()))?;
            let mut config =
                Config::resolve(&raw, &RawSettings::default()).map_err(|e| Failure::Usage(e.to_string()))?;
            config.load_keys().await.map_err(|e| Failure::Usage(e.to_string()))?;
            crate::server::check_tls_files(&config, None).map_err(Failure::Usage)?;
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
    let scheme = |tls: bool| if tls { "https" } else { "http" };
    println!("oncely listening on {}://{}", scheme(bound.listen_tls), bound.listen);
    if let Some(admin) = bound.admin {
        println!("oncely admin on {}://{admin}", scheme(bound.admin_tls));
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
            let (store, _, counts_deletes) = stores::open(&store).await.map_err(open_failure)?;
            if store.delete(&key).await.map_err(runtime)? {
                println!("deleted {hash}");
                if !counts_deletes {
                    eprintln!(
                        "note: a gateway with the replay cache on replays it until its replay_cache.ttl has passed"
                    );
                }
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
