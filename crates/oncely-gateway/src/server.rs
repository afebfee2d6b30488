//! Running the gateway: listeners (see [`crate::listener`] for their limits), metrics,
//! logs, and graceful shutdown.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use oncely::engine::DeferredCompletions;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::listener;
use crate::proxy::Proxy;
use crate::routing::Routes;
use crate::stores;
use crate::tls;
use crate::workers::Workers;

/// Where and on what the gateway runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The upstream, `http://host:port` or `https://host:port`.
    pub upstream: String,
    /// The proxy listener.
    pub listen: SocketAddr,
    /// The admin listener, if any.
    pub admin_listen: Option<SocketAddr>,
    /// The store URL.
    pub store: String,
}

/// The addresses the gateway is bound to, once it is.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The proxy listener.
    pub listen: SocketAddr,
    /// The admin listener.
    pub admin: Option<SocketAddr>,
    /// Whether the proxy listener serves HTTPS.
    pub listen_tls: bool,
    /// Whether the admin listener serves HTTPS.
    pub admin_tls: bool,
}

/// The listeners' certificates, loaded (errors name the key and the file), and the
/// acceptors serving them.
struct ListenerTls {
    proxy: Option<tokio_rustls::TlsAcceptor>,
    admin: Option<tokio_rustls::TlsAcceptor>,
    certs: Vec<Arc<tls::ServerCert>>,
}

impl ListenerTls {
    fn load(config: &Config) -> Result<Self, String> {
        let mut certs = Vec::new();
        let mut acceptor = |files: &Option<tls::CertFiles>, key: &str| -> Result<_, String> {
            let Some(files) = files else { return Ok(None) };
            let cert = tls::ServerCert::load(files.clone()).map_err(|e| format!("{key}: {e}"))?;
            let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config()?);
            certs.push(cert);
            Ok(Some(acceptor))
        };
        let proxy = acceptor(&config.listen_tls, "listen.tls_cert_file")?;
        let admin = acceptor(&config.admin_tls, "admin.tls_cert_file")?;
        Ok(Self { proxy, admin, certs })
    }
}

/// Checks what `serve` would load from files before it opens anything: the listeners'
/// certificates and an `https://` upstream's TLS files. For `check-config`.
///
/// # Errors
/// A message naming the key and the file at fault.
pub fn check_tls_files(config: &Config, upstream: Option<&str>) -> Result<(), String> {
    ListenerTls::load(config)?;
    if upstream.is_some_and(|u| u.starts_with("https://")) || config.upstream.tls != tls::UpstreamTls::default() {
        config.upstream.tls.client_config()?;
    }
    Ok(())
}

/// Installs the Prometheus recorder once per process and returns its handle.
fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets =
                [0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
            let builder =
                PrometheusBuilder::new().set_buckets_for_metric(Matcher::Full("oncely_store_seconds".into()), &buckets);
            match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .clone()
}

/// Resolves when SIGTERM or SIGINT arrives.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = interrupt => {}
            () = terminate => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

/// Runs the gateway until SIGTERM or SIGINT: stops accepting, lets running requests
/// finish, waits for operations whose clients hung up to store their results, then
/// returns. `on_ready` is called once both listeners are bound.
pub async fn serve(options: ServeOptions, mut config: Config, on_ready: impl FnOnce(Bound)) -> Result<(), String> {
    config.load_keys().await.map_err(|e| e.to_string())?;
    listener::fit_descriptors(&mut config.server, &mut config.admin_server);
    // Before anything builds a TLS configuration: the stores' drivers need a default.
    tls::install_provider();
    tls::warn_insecure(&config.upstream.tls);
    // Before the store and the routes are built: they register their metrics' handles
    // once, with the recorder installed then. Without an admin listener nothing reads
    // them, and no recorder is installed (each count is then a no-op).
    let metrics = options.admin_listen.and_then(|_| metrics_handle());
    let (store, abilities) =
        stores::open_cached(&options.store, &config.replay_cache).await.map_err(|e| e.to_string())?;
    if store.is_enabled() {
        tracing::info!(ttl = ?config.replay_cache.ttl, "replay cache on: replays of recently replayed keys are answered from memory");
    }
    let tracker = TaskTracker::new();
    let listener_tls = ListenerTls::load(&config)?;
    let mut proxy = Proxy::new(&options.upstream, config.upstream.timeout, &config.upstream.tls, config.workers)?;
    if let Some((host, port)) = proxy.https_upstream() {
        tls::probe_upstream(&host, port, config.upstream.tls.client_config()?).await?;
    }
    if listener_tls.proxy.is_some() {
        proxy = proxy.with_https_clients();
    }
    let deferred = DeferredCompletions::new();
    let routes = Routes::new(&config, &store, abilities, &proxy, &tracker, &deferred)?;

    let listener = TcpListener::bind(options.listen).await.map_err(|e| format!("--listen {}: {e}", options.listen))?;
    let listen = listener.local_addr().map_err(|e| e.to_string())?;
    let admin_listener = match options.admin_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| format!("--admin-listen {addr}: {e}"))?),
        None => None,
    };
    let admin = admin_listener.as_ref().and_then(|l| l.local_addr().ok());

    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down: no new connections; running operations finish");
            stop.cancel();
        }
    });

    let admin_task = admin_listener.map(|listener| {
        let state = AdminState {
            store: store.clone(),
            metrics: metrics.clone(),
            tracker: tracker.clone(),
            deferred: deferred.clone(),
            count_records: abilities.counts_records_cheaply,
            token: config.admin_token.as_deref().map(Arc::from),
        };
        let (stop, limits) = (stop.clone(), config.admin_server.clone());
        let router = admin::router(state);
        tokio::spawn(listener::serve(listener, "admin", router, limits, listener_tls.admin.clone(), None, stop))
    });
    tls::spawn_reloader(listener_tls.certs.clone(), stop.clone());

    // Before readiness is reported: a gateway that cannot start its workers never says it is ready.
    let workers = match config.workers {
        0 => None,
        n => Some(Workers::start(n).map_err(|e| format!("cannot start {n} proxy workers: {e}"))?),
    };
    tracing::info!(%listen, ?admin, upstream = %options.upstream, store = %stores::redacted(&options.store), routes = config.routes.len(), "oncely gateway ready");
    on_ready(Bound {
        listen,
        admin,
        listen_tls: listener_tls.proxy.is_some(),
        admin_tls: listener_tls.admin.is_some(),
    });
    let limits = config.server.clone();
    let tls = listener_tls.proxy.clone();
    listener::serve(listener, "proxy", routes.clone(), limits, tls, workers.as_ref(), stop.clone()).await;
    stop.cancel();
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    // Operations whose clients hung up are still running in their own tasks: let them
    // store their results before the process exits.
    // Each is bounded by its route's completion limit (head, and between body chunks);
    // the cap only guards against a store that never answers.
    tracker.close();
    let longest = config.routes.iter().chain([&config.defaults]).map(|r| r.completion_limit).max().unwrap_or_default();
    let drain = longest + Duration::from_secs(10);
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::error!(running = tracker.len(), "operations still running after {drain:?}; exiting without them");
    }
    routes.flush_hits().await;
    // Only now: the operations drained above ran on the workers' runtimes.
    if let Some(workers) = workers {
        workers.stop();
    }
    tracing::info!("stopped");
    Ok(())
}
