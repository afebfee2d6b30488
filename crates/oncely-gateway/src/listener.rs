//! Listeners: the accept loop, and the limits that keep slow, idle or numerous clients
//! from holding the gateway's connections (the `[server]` table; see
//! [`ServerLimits`]).
//!
//! Each accepted connection is served by hyper's auto builder (HTTP/1.1, and HTTP/2 with
//! prior knowledge, h2c), watched for graceful shutdown, and watched by a per-connection
//! watchdog that closes it when a limit is reached:
//!
//! | the connection | closed after |
//! |---|---|
//! | opened, no complete request head yet (either protocol, including hyper's protocol sniffing) | `header_read_timeout` from the accept |
//! | HTTP/1.1 keep-alive, between requests, nothing received | `idle_timeout` from the end of the last response |
//! | HTTP/1.1, a later request head started but not complete | `header_read_timeout` from its first byte |
//! | HTTP/2, no stream in flight (pings and other frames do not count) | `idle_timeout` from the end of the last response |
//! | a request in flight, its response not read by the client (a write stuck) | `idle_timeout` from when the write stalled |
//! | a request body that delivers nothing | the body fails after `body_read_timeout` between chunks (the layer answers 400 `body-unreadable`; a streamed pass-through body is cut off) |
//!
//! A request in flight is otherwise bounded by `upstream.timeout` and the routes' wait
//! timeouts, not by these. Closing is abrupt (the socket is dropped): no request is in
//! flight when it happens, except for the stuck writer.
//!
//! Why a watchdog and not only hyper's `http1().header_read_timeout`: in hyper 1.12 that
//! timer starts whenever hyper begins to read a head, which on a keep-alive connection is
//! as soon as the previous response is written, so it would close every idle keep-alive
//! connection after the header timeout, and it does nothing for HTTP/2 or for the auto
//! builder's protocol sniffing (a client that connects and sends nothing). hyper's timer
//! is off: the watchdog covers every case it would, and as a backstop it cost a timer
//! armed, polled and dropped on every HTTP/1.1 request, some 1,000 instructions of a
//! replay's 49,000 (`bench/instructions.sh`).
//!
//! Connection caps: `max_connections` open connections per listener (a semaphore) and
//! `max_connections_per_client` per client IP address (IPv4-mapped IPv6 addresses count
//! as IPv4). A connection over a cap is accepted and closed at once, without a response:
//! the client sees the close immediately and can back off or go elsewhere, instead of
//! waiting unseen in the kernel's backlog; and the accept loop keeps draining the backlog,
//! so a client under the cap is never queued behind a flood. The admin listener has its
//! own cap (`admin.max_connections`), so a flood on the proxy port cannot take it.
//!
//! Descriptors: every connection is a file descriptor, and a proxied request may hold
//! another to the upstream. At start [`fit_descriptors`] raises the soft
//! `RLIMIT_NOFILE` towards the hard limit as far as the caps need, and if that is not
//! enough lowers the caps (with a warning) so that a flood on the proxy port runs into
//! `max_connections`, not into `EMFILE`, and the admin listener can still accept.
//!
//! HTTP/2: at most `max_concurrent_streams` streams per connection; keep-alive pings every
//! 20 s while a connection is open, closing it if one is not answered within 20 s; hyper's
//! defaults bound reset floods and the header list (16 KiB). HTTP/1.1 heads are bounded
//! by hyper's read buffer (about 400 KiB) and 100 fields. Past any of these the answer
//! is 431.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::Service;
use tower::ServiceExt;

use crate::config::ServerLimits;
use crate::idle_timeout::IdleTimeout;
use crate::when_woken::WhenWoken;
use crate::workers::Workers;

/// How often an HTTP/2 connection is pinged, and how long an answer may take.
const H2_PING: Duration = Duration::from_secs(20);

/// A service a listener serves: the proxy's [`Routes`](crate::routing::Routes), called
/// directly, or the admin API's axum `Router`.
pub trait App:
    Service<Request<axum::body::Body>, Response = Response<Self::Body>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static
{
    /// The response body.
    type Body: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static;

    /// The service as it serves one connection, from `peer`: made once per connection,
    /// cloned per request.
    fn for_connection(&self, peer: SocketAddr) -> Self;
}

/// The proxy: its requests are forwarded with the peer's address.
impl App for crate::routing::Routes {
    type Body = oncely_http::ResponseBody;

    fn for_connection(&self, peer: SocketAddr) -> Self {
        self.for_client(peer)
    }
}

/// The admin API: it does not use the peer's address.
impl App for axum::Router {
    type Body = axum::body::Body;

    fn for_connection(&self, _peer: SocketAddr) -> Self {
        self.clone()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves `app` on `listener` under `limits` until `stop` is cancelled, then stops
/// accepting and returns once every connection has finished (running requests complete;
/// idle connections close). Each connection is served by [`App::for_connection`]. `name`
/// labels logs and metrics (`proxy`, `admin`). Connections are served on `workers`, in
/// turn, when given; on the caller's runtime otherwise.
pub async fn serve<A: App>(
    listener: TcpListener,
    name: &'static str,
    app: A,
    limits: ServerLimits,
    tls: Option<TlsAcceptor>,
    workers: Option<&Workers>,
    stop: CancellationToken,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No timer for HTTP/1.1: the watchdog bounds the heads (see the module docs).
    builder.http1().header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(H2_PING)
        .keep_alive_timeout(H2_PING);
    let builder = Arc::new(builder);
    let caps = Arc::new(Caps::new(name, &limits));
    // Graceful shutdown: each connection holds a receiver, told to finish its requests
    // and close when a value is sent; `closed` resolves when every receiver is gone.
    let (shutdown, _) = watch::channel(());
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            // The peer gave up before the accept: nothing to do but go on.
            Err(e) if is_connection_error(&e) => continue,
            // Out of descriptors, most likely: wait a little rather than spin, and keep
            // the connections already open working.
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "accept failed; retrying shortly");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let admission = match caps.admit(peer.ip()) {
            Ok(admission) => admission,
            Err(limit) => {
                metrics::counter!("oncely_connections_refused_total", "listener" => name, "limit" => limit)
                    .increment(1);
                tracing::debug!(listener = name, %peer, limit, "connection closed at once: over the cap");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (app, builder, limits, tls, watcher) =
            (app.clone(), Arc::clone(&builder), limits.clone(), tls.clone(), shutdown.subscribe());
        let Some(workers) = workers else {
            let connection = Connection { stream, peer, name, admission };
            tokio::spawn(serve_connection(connection, app, builder, limits, tls, watcher));
            continue;
        };
        // The socket moves to the worker's reactor: out of this runtime's, into its own.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(listener = name, %peer, error = %e, "accepted connection lost before its hand-off");
                continue;
            }
        };
        workers.spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => {
                    let connection = Connection { stream, peer, name, admission };
                    serve_connection(connection, app, builder, limits, tls, watcher).await;
                }
                Err(e) => {
                    tracing::debug!(listener = name, %peer, error = %e, "accepted connection lost at its hand-off")
                }
            }
        });
    }
    drop(listener);
    // Err only when no connection is open: nothing to wait for then.
    let _ = shutdown.send(());
    shutdown.closed().await;
}

/// Descriptors kept for everything but client and upstream connections: standard
/// streams, the listeners, store files and connections, logs.
const RESERVED_DESCRIPTORS: u64 = 32;

/// Makes the caps fit the process's descriptor limit. Each proxy connection is counted
/// as 1.25 descriptors (a quarter more for upstream connections of requests in flight),
/// each admin connection as one, plus a reserve of 32. The soft limit is raised as far as
/// that needs (no further than the hard limit); if it is still short, the admin cap is
/// lowered to at most a quarter of the limit and the proxy cap to 80% of what is left.
#[cfg(unix)]
pub fn fit_descriptors(proxy: &mut ServerLimits, admin: &mut ServerLimits) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let Some(mut soft) = limit.current else { return };
    let (proxy_cap, admin_cap) = (proxy.max_connections as u64, admin.max_connections as u64);
    let needed = proxy_cap.saturating_add(proxy_cap / 4).saturating_add(admin_cap).saturating_add(RESERVED_DESCRIPTORS);
    if soft < needed {
        let raised = limit.maximum.map_or(needed, |hard| hard.min(needed));
        if raised > soft
            && setrlimit(Resource::Nofile, Rlimit { current: Some(raised), maximum: limit.maximum }).is_ok()
        {
            soft = raised;
        }
    }
    if soft >= needed {
        return;
    }
    let admin_fit = admin_cap.min(soft / 4).max(1);
    let proxy_fit = (soft.saturating_sub(admin_fit + RESERVED_DESCRIPTORS) * 4 / 5).clamp(1, proxy_cap.max(1));
    tracing::warn!(
        descriptors = soft,
        max_connections = proxy_fit,
        admin_max_connections = admin_fit,
        "the descriptor limit (ulimit -n) is too low for the connection caps; lowering the caps to fit"
    );
    proxy.max_connections = usize::try_from(proxy_fit).unwrap_or(proxy.max_connections);
    admin.max_connections = usize::try_from(admin_fit).unwrap_or(admin.max_connections);
}

/// Without descriptor limits to read, the caps stay as configured.
#[cfg(not(unix))]
pub fn fit_descriptors(_proxy: &mut ServerLimits, _admin: &mut ServerLimits) {}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// One accepted connection and its place under the caps.
struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    name: &'static str,
    admission: Admission,
}

async fn serve_connection<A: App>(
    connection: Connection,
    app: A,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: ServerLimits,
    tls: Option<TlsAcceptor>,
    watcher: watch::Receiver<()>,
) {
    let Connection { stream, peer, name, admission } = connection;
    let activity = Arc::new(Activity::new());
    let tracked = Tracked { stream, activity: Arc::clone(&activity) };
    let Some(acceptor) = tls else {
        serve_io(TokioIo::new(tracked), peer, name, app, &builder, &limits, watcher, &activity).await;
        drop(admission);
        return;
    };
    // The handshake counts against `header_read_timeout` from the accept, like the
    // first request head: a client that connects and stalls the handshake is closed.
    let handshake = tokio::select! {
        handshake = acceptor.accept(tracked) => handshake,
        limit = activity.expired(&limits) => {
            metrics::counter!("oncely_connections_closed_total", "listener" => name, "limit" => limit).increment(1);
            tracing::debug!(listener = name, %peer, limit, "connection closed during the TLS handshake");
            return;
        }
    };
    match handshake {
        Ok(stream) => serve_io(TokioIo::new(stream), peer, name, app, &builder, &limits, watcher, &activity).await,
        Err(e) => {
            metrics::counter!("oncely_tls_handshake_failures_total", "listener" => name).increment(1);
            tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed");
        }
    }
    drop(admission);
}

/// Serves requests on one connection (plain or TLS) until it ends or its watchdog
/// closes it.
#[allow(clippy::too_many_arguments)]
async fn serve_io<I, A: App>(
    io: TokioIo<I>,
    peer: SocketAddr,
    name: &'static str,
    app: A,
    builder: &auto::Builder<TokioExecutor>,
    limits: &ServerLimits,
    watcher: watch::Receiver<()>,
    activity: &Arc<Activity>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let body_timeout = limits.body_read_timeout;
    let app = app.for_connection(peer);
    let service = hyper::service::service_fn({
        let activity = Arc::clone(activity);
        move |request: Request<Incoming>| {
            let guard = activity.begin(request.version() == Version::HTTP_2);
            let request = request.map(|body| axum::body::Body::new(IdleTimeout::request(body, body_timeout)));
            let app = app.clone();
            async move {
                let response = match app.oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(response.map(|body| InFlightBody { body, _guard: guard }))
            }
        }
    });
    let mut watcher = watcher;
    // The shutdown signal and the watchdog are polled only on the wake-ups they cause,
    // not on every read and write of the connection (see `WhenWoken`).
    let mut shutdown = std::pin::pin!(WhenWoken::new(async move {
        let _ = watcher.changed().await;
        watcher
    }));
    let mut watchdog = std::pin::pin!(WhenWoken::new(activity.expired(limits)));
    // The receiver, once the signal came. Declared before the connection, so dropped
    // after it (locals drop in reverse order): the listener's shutdown, which waits for
    // every receiver, ends only once this connection's socket is closed.
    let mut draining = None;
    let mut conn = std::pin::pin!(builder.serve_connection(io, service));
    let ended = std::future::poll_fn(|cx| {
        if draining.is_none()
            && let Poll::Ready(watcher) = shutdown.as_mut().poll(cx)
        {
            draining = Some(watcher);
            conn.as_mut().graceful_shutdown();
        }
        if let Poll::Ready(result) = conn.as_mut().poll(cx) {
            return Poll::Ready(Ok(result));
        }
        watchdog.as_mut().poll(cx).map(Err)
    })
    .await;
    match ended {
        Ok(Err(e)) => tracing::debug!(listener = name, %peer, error = %e, "connection ended with an error"),
        Ok(Ok(())) => {}
        Err(limit) => {
            metrics::counter!("oncely_connections_closed_total", "listener" => name, "limit" => limit).increment(1);
            tracing::debug!(listener = name, %peer, limit, "connection closed by a limit");
        }
    }
}

/// The connection caps of one listener.
struct Caps {
    name: &'static str,
    total: Arc<Semaphore>,
    per_client: Option<usize>,
    clients: Mutex<HashMap<IpAddr, usize>>,
}

/// A connection's place under the caps, given back on drop.
struct Admission {
    _permit: OwnedSemaphorePermit,
    caps: Arc<Caps>,
    client: Option<IpAddr>,
}

impl Caps {
    fn new(name: &'static str, limits: &ServerLimits) -> Self {
        Self {
            name,
            total: Arc::new(Semaphore::new(limits.max_connections.min(Semaphore::MAX_PERMITS))),
            per_client: limits.max_connections_per_client,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// A place for a connection from `ip`, or the name of the cap it is over.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, &'static str> {
        let permit = Arc::clone(&self.total).try_acquire_owned().map_err(|_| "max_connections")?;
        let client = match self.per_client {
            Some(cap) => {
                let ip = ip.to_canonical();
                let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
                let open = clients.entry(ip).or_insert(0);
                if *open >= cap {
                    return Err("max_connections_per_client");
                }
                *open += 1;
                Some(ip)
            }
            None => None,
        };
        metrics::gauge!("oncely_connections", "listener" => self.name).increment(1.0);
        Ok(Admission { _permit: permit, caps: Arc::clone(self), client })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        metrics::gauge!("oncely_connections", "listener" => self.caps.name).decrement(1.0);
        if let Some(ip) = self.client {
            let mut clients = self.caps.clients.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(open) = clients.get_mut(&ip) {
                *open -= 1;
                if *open == 0 {
                    clients.remove(&ip);
                }
            }
        }
    }
}

/// What a connection has been doing, for its watchdog. Times are milliseconds since the
/// accept, plus one (0 means never).
struct Activity {
    start: Instant,
    /// Requests whose responses are not yet fully written.
    in_flight: AtomicUsize,
    /// When the last response was fully written (0: none yet).
    quiet_since: AtomicU64,
    /// The first read after `quiet_since` (HTTP/1.1: the next head has begun).
    head_started: AtomicU64,
    /// Since when a write has been waiting for the client to read (0: none waits).
    write_blocked: AtomicU64,
    /// Whether the connection speaks HTTP/2.
    h2: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            quiet_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
            h2: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// A request head has been read: the request is in flight until its response body
    /// (which holds the returned guard) is dropped.
    fn begin(self: &Arc<Self>, h2: bool) -> InFlight {
        if h2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(self))
    }

    fn on_read(&self) {
        if self.head_started.load(Ordering::Relaxed) <= self.quiet_since.load(Ordering::Relaxed) {
            self.head_started.store(self.now(), Ordering::Relaxed);
        }
    }

    fn on_write(&self, pending: bool) {
        let blocked = self.write_blocked.load(Ordering::Relaxed);
        if pending && blocked == 0 {
            self.write_blocked.store(self.now(), Ordering::Relaxed);
        } else if !pending && blocked != 0 {
            self.write_blocked.store(0, Ordering::Relaxed);
        }
    }

    /// When the connection must be closed if nothing changes, and which limit that is.
    fn deadline(&self, limits: &ServerLimits) -> Option<(u64, &'static str)> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 4);
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            let blocked = self.write_blocked.load(Ordering::Relaxed);
            return (blocked != 0).then(|| (blocked.saturating_add(ms(limits.idle_timeout)), "idle_timeout"));
        }
        let quiet = self.quiet_since.load(Ordering::SeqCst);
        if quiet == 0 {
            return Some((1 + ms(limits.header_read_timeout), "header_read_timeout"));
        }
        let head = self.head_started.load(Ordering::Relaxed);
        if head > quiet && !self.h2.load(Ordering::Relaxed) {
            return Some((head.saturating_add(ms(limits.header_read_timeout)), "header_read_timeout"));
        }
        Some((quiet.saturating_add(ms(limits.idle_timeout)), "idle_timeout"))
    }

    /// Resolves, with the limit's name, once the connection has passed a deadline.
    ///
    /// Nothing wakes the watchdog when the connection's activity changes: that cost a
    /// wake-up and a timer per request. Instead it sleeps until the earlier of the current
    /// deadline and one `step` (the shorter of the two timeouts) from now, and looks
    /// again. No change brings a deadline before the watchdog's next look, with one
    /// exception: each change starts a deadline at least `step` from when it happens (a
    /// head begun: `header_read_timeout`; a response written or a write stalled:
    /// `idle_timeout`), and a request beginning removes one. The exception: a write that
    /// stalled while a response was in flight, and is still stalled when the next request
    /// begins (HTTP/2: the client stopped reading but opens a stream), brings its old
    /// deadline back, which the watchdog acts on at its next look, at most one `step`
    /// late. Only a client that does not read can cause it, and the bound holds.
    async fn expired(&self, limits: &ServerLimits) -> &'static str {
        let step = limits.header_read_timeout.min(limits.idle_timeout).max(Duration::from_millis(1));
        loop {
            let now = self.now();
            let wait = match self.deadline(limits) {
                Some((at, limit)) if at <= now => return limit,
                Some((at, _)) => Duration::from_millis(at - now).min(step),
                None => step,
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// Held by a request's response body: the request is in flight until it is dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        // Quiet from now, recorded before the count drops so that the watchdog never
        // sees no request in flight with an older quiet time.
        activity.quiet_since.store(activity.now(), Ordering::SeqCst);
        activity.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request in flight until it is written or dropped.
struct InFlightBody<B> {
    body: B,
    _guard: InFlight,
}

impl<B: Body<Data = Bytes> + Unpin> Body for InFlightBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The socket, noting reads and stuck writes for the watchdog.
struct Tracked {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.on_read();
        }
        result
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.activity.on_write(result.is_pending());
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.activity.on_write(result.is_pending());
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
