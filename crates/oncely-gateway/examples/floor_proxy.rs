//! The floor of the gateway's design, for `bench/gateway.sh`: the same HTTP stack as the
//! gateway (hyper-util's auto server builder, hyper-util's pooled client, mimalloc, a
//! worker thread per core with its own single-threaded Tokio runtime and its own pool,
//! connections handed to the workers in turn) forwarding every request to the upstream
//! unchanged, and nothing else: no routes, no forwarding headers, no limits, no
//! idempotency layer, no metrics, no logs.
//!
//! What the gateway costs above this row is ours to remove; what this row costs above an
//! nginx hop is the price of hyper and Tokio on this machine.
//!
//! With `--answer BODY` instead of an upstream it reads each request's body and answers
//! `201 Created` with `BODY` as JSON itself: what answering alone costs this stack.
//!
//! With `--replay BODY` it answers the same, after doing the work that this design requires
//! of every replay and nothing else: the request's fingerprint (`oncely_http::request_fingerprint`,
//! canonical JSON and SHA-256), the storage key (a SHA-256 of scope and key), one look-up
//! in a map of stored responses, the fingerprints compared, and the stored status, headers
//! and body sent with `Idempotent-Replayed: true`. The first request of a key stores the
//! answer; no store trait, lease, route, limit, hit count, metric or log. What the
//! gateway's replay costs above this row is what it does beside that work and how it does
//! it, not the work itself.
//!
//! With `--new-key UPSTREAM_ADDR` it does what this design requires of a request with a new
//! key and nothing else: the request's body read, its fingerprint and storage key as for
//! `--replay`, the key claimed in that map (an in-progress entry inserted under the map's
//! lock), the request forwarded with its body, the upstream's response read whole, the
//! claim replaced by the completed response (status, headers, body), and the response
//! sent. A key already claimed is answered `409`, a completed one replayed as `--replay`
//! does. The map is sharded as the memory store's is. No store trait, encoding, lease,
//! expiry, route, limit, forwarding header, metric or log. What the gateway's new key costs above this row is what it does beside that
//! work and how it does it.
//!
//! With `FLOOR_SPIN_NS=N` in the environment every request first spins for `N` ns (wall
//! clock, so less CPU when the thread is preempted meanwhile): the floor with about as
//! much user-space work per request as the gateway adds, to see what that work costs the
//! kernel on a box shared with the load tool.
//!
//! With `FLOOR_TIMER` set (to anything) each worker keeps one far timer pending (an hour's
//! sleep: longer than any benchmark), as the gateway's workers always have some (their
//! timeouts): Tokio then parks in `epoll_wait` with a finite timeout, which the kernel
//! arms as a timer on every park, instead of none.
//!
//! ```text
//! cargo run --release -p oncely-gateway --example floor_proxy -- 127.0.0.1:7100 127.0.0.1:3000
//! cargo run --release -p oncely-gateway --example floor_proxy -- 127.0.0.1:7101 --answer '{"id":"ch_1"}'
//! cargo run --release -p oncely-gateway --example floor_proxy -- 127.0.0.1:7102 --replay '{"id":"ch_1"}'
//! cargo run --release -p oncely-gateway --example floor_proxy -- 127.0.0.1:7103 --new-key 127.0.0.1:3000
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        return Err(
            "usage: floor_proxy LISTEN_ADDR (UPSTREAM_ADDR | --answer BODY | --replay BODY | --new-key UPSTREAM_ADDR)"
                .into(),
        );
    };
    let listen: SocketAddr = listen.parse()?;
    let target = match (upstream.as_str(), args.next()) {
        ("--answer", Some(body)) => Target::Answer(Bytes::from(body)),
        ("--replay", Some(body)) => Target::Replay(Bytes::from(body)),
        ("--new-key", Some(upstream)) => {
            upstream_root(&upstream)?;
            Target::NewKey
        }
        ("--answer" | "--replay", None) => return Err("--answer and --replay need a body".into()),
        ("--new-key", None) => return Err("--new-key needs an upstream".into()),
        (upstream, _) => {
            upstream_root(upstream)?;
            Target::Upstream
        }
    };
    let spin = match std::env::var("FLOOR_SPIN_NS") {
        Ok(ns) => std::time::Duration::from_nanos(ns.parse()?),
        Err(_) => std::time::Duration::ZERO,
    };
    let listener = std::net::TcpListener::bind(listen)?;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let mut workers = Vec::new();
    let far_timer = std::env::var_os("FLOOR_TIMER").is_some();
    for _ in 0..cores {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        workers.push(runtime.handle().clone());
        std::thread::spawn(move || {
            runtime.block_on(async move {
                if far_timer {
                    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                }
                std::future::pending::<()>().await
            })
        });
    }
    println!("floor_proxy listening on {listen}");
    for (n, stream) in listener.incoming().enumerate() {
        let Ok(stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_nonblocking(true);
        drop(workers[n % workers.len()].spawn(serve(stream, target.clone(), spin)));
    }
    Ok(())
}

/// Where requests go: forwarded to an upstream, or answered here.
#[derive(Clone)]
enum Target {
    /// Forwarded to [`UPSTREAM`].
    Upstream,
    Answer(Bytes),
    Replay(Bytes),
    /// Claimed, forwarded to [`UPSTREAM`], completed.
    NewKey,
}

/// An entry of the floor's map of keys: claimed by a request still at the upstream, or
/// completed with its response.
enum Record {
    InProgress,
    Completed(std::sync::Arc<Stored>),
}

/// A response as the replay floor keeps it: what a completed record holds.
struct Stored {
    fingerprint: oncely::Fingerprint,
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

thread_local! {
    /// Each worker's own pool, so an upstream connection's task runs on its thread.
    static CLIENT: Client<Connector, Incoming> = pool();
    /// The same for `--new-key`, which forwards a body it has already read.
    static BYTES_CLIENT: Client<Connector, Full<Bytes>> = pool();
}

/// TCP to [`UPSTREAM`], whatever URI the pool asks for: as the gateway does, requests
/// name the pool's key `u`, not the upstream's `host:port`, which the pool would hash
/// byte by byte three times a request (the gateway's `proxy::POOL_LABEL`).
type Connector = tower::util::MapRequest<HttpConnector, fn(Uri) -> Uri>;

/// The upstream's `http://host:port/`, set once before any request.
static UPSTREAM: std::sync::OnceLock<Uri> = std::sync::OnceLock::new();

/// Sets [`UPSTREAM`] to `http://ADDR/`.
fn upstream_root(addr: &str) -> Result<(), Box<dyn std::error::Error>> {
    let root = Uri::builder().scheme("http").authority(addr).path_and_query("/").build()?;
    UPSTREAM.set(root).map_err(|_| "one upstream only".into())
}

fn to_upstream(_pool_key: Uri) -> Uri {
    UPSTREAM.get().cloned().unwrap_or_default()
}

/// A connection pool to the upstream, without Nagle's delay.
fn pool<B: hyper::body::Body + Send>() -> Client<Connector, B>
where
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let connector = tower::util::MapRequest::new(connector, to_upstream as fn(Uri) -> Uri);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// `original`'s path and query, handed to the pool (see [`Connector`]).
fn upstream_uri(original: &Uri) -> Result<Uri, http::Error> {
    // A static authority: parsing `"u"` would copy it into a new allocation per request.
    const POOL_LABEL: http::uri::Authority = http::uri::Authority::from_static("u");
    let mut uri = Uri::builder().scheme(http::uri::Scheme::HTTP).authority(POOL_LABEL);
    if let Some(pq) = original.path_and_query() {
        uri = uri.path_and_query(pq.clone());
    }
    uri.build()
}

/// The keys of `--replay` and `--new-key`, by storage key, shared by the workers (a retry
/// may come on another connection, served by another worker). Sharded and hashed as the
/// memory store's map is (64 shards, foldhash), so that the workers rarely meet on a lock
/// and a map that grows under load rehashes a sixty-fourth of it at a time.
static STORED: std::sync::LazyLock<[std::sync::RwLock<KeyMap>; 64]> =
    std::sync::LazyLock::new(|| std::array::from_fn(|_| std::sync::RwLock::default()));

type KeyMap = std::collections::HashMap<[u8; 32], Record, foldhash::quality::RandomState>;

/// The shard of `STORED` that holds `storage_key`.
fn shard_of(storage_key: &[u8; 32]) -> &'static std::sync::RwLock<KeyMap> {
    &STORED[usize::from(storage_key[0]) % 64]
}

async fn serve(stream: std::net::TcpStream, target: Target, spin: std::time::Duration) {
    let Ok(stream) = tokio::net::TcpStream::from_std(stream) else { return };
    let service = service_fn(move |request: Request<Incoming>| {
        let target = target.clone();
        spin_for(spin);
        async move {
            match target {
                Target::Upstream => forward(request).await,
                Target::Answer(body) => answer(request, body).await,
                Target::Replay(body) => replay(request, body).await,
                Target::NewKey => new_key(request).await,
            }
        }
    });
    let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
}

async fn answer(request: Request<Incoming>, body: Bytes) -> Result<Response<Body>, Infallible> {
    if request.into_body().collect().await.is_err() {
        return Ok(bad_gateway());
    }
    answer_now(body)
}

fn answer_now(body: Bytes) -> Result<Response<Body>, Infallible> {
    let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = StatusCode::CREATED;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    Ok(response)
}

async fn replay(request: Request<Incoming>, body: Bytes) -> Result<Response<Body>, Infallible> {
    let (parts, incoming) = request.into_parts();
    let Ok(collected) = incoming.collect().await else { return Ok(bad_gateway()) };
    let Some(key) = parts.headers.get("idempotency-key") else { return Ok(bad_gateway()) };
    let Ok(fingerprint) = oncely_http::request_fingerprint(&parts, &collected.to_bytes(), 1 << 20) else {
        return Ok(bad_gateway());
    };
    let storage_key = *oncely::Fingerprint::from_parts(&[b"anonymous", key.as_bytes()]).as_bytes();
    let found = shard_of(&storage_key).read().ok().and_then(|stored| match stored.get(&storage_key) {
        Some(Record::Completed(stored)) => Some(std::sync::Arc::clone(stored)),
        _ => None,
    });
    let Some(stored) = found else {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        let stored = Stored { fingerprint, status: StatusCode::CREATED, headers, body: body.clone() };
        if let Ok(mut map) = shard_of(&storage_key).write() {
            map.insert(storage_key, Record::Completed(std::sync::Arc::new(stored)));
        }
        // The key's first request: stored, and answered as `--answer` does.
        return answer_now(body);
    };
    Ok(replayed(&stored, &fingerprint))
}

/// The stored answer, marked as a replay, or a `502` when the fingerprints differ.
fn replayed(stored: &Stored, fingerprint: &oncely::Fingerprint) -> Response<Body> {
    const REPLAYED: http::HeaderName = http::HeaderName::from_static("idempotent-replayed");
    if stored.fingerprint != *fingerprint {
        return bad_gateway();
    }
    let mut response = Response::new(Full::new(stored.body.clone()).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = stored.status;
    *response.headers_mut() = stored.headers.clone();
    response.headers_mut().insert(REPLAYED, http::HeaderValue::from_static("true"));
    response
}

async fn new_key(request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    use std::collections::hash_map::Entry;
    let (mut parts, incoming) = request.into_parts();
    let Ok(collected) = incoming.collect().await else { return Ok(bad_gateway()) };
    let body = collected.to_bytes();
    let Some(key) = parts.headers.get("idempotency-key") else { return Ok(bad_gateway()) };
    let Ok(fingerprint) = oncely_http::request_fingerprint(&parts, &body, 1 << 20) else {
        return Ok(bad_gateway());
    };
    let storage_key = *oncely::Fingerprint::from_parts(&[b"anonymous", key.as_bytes()]).as_bytes();
    // The claim: one look-up and insert under the map's lock.
    let refused = match shard_of(&storage_key).write() {
        Err(_) => Some(bad_gateway()),
        Ok(mut map) => match map.entry(storage_key) {
            Entry::Vacant(vacant) => {
                vacant.insert(Record::InProgress);
                None
            }
            Entry::Occupied(occupied) => Some(match occupied.get() {
                Record::Completed(stored) => replayed(stored, &fingerprint),
                Record::InProgress => status_only(StatusCode::CONFLICT),
            }),
        },
    };
    if let Some(answer) = refused {
        return Ok(answer);
    }
    let Ok(uri) = upstream_uri(&parts.uri) else { return Ok(bad_gateway()) };
    parts.uri = uri;
    let sent = BYTES_CLIENT.with(|client| client.request(Request::from_parts(parts, Full::new(body))));
    let Ok(response) = sent.await else { return Ok(bad_gateway()) };
    let (parts, incoming) = response.into_parts();
    let Ok(collected) = incoming.collect().await else { return Ok(bad_gateway()) };
    let body = collected.to_bytes();
    // The completion: the claim replaced by the response, under the map's lock. The
    // record owns copies, as a store's encoding does: the body and the header values
    // hyper parsed are slices of its read buffer, which keeping them would keep alive
    // (a buffer per record).
    let mut headers = http::HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        if let Ok(value) = http::HeaderValue::from_bytes(value.as_bytes()) {
            headers.append(name.clone(), value);
        }
    }
    let stored = Stored { fingerprint, status: parts.status, headers, body: Bytes::copy_from_slice(&body) };
    if let Ok(mut map) = shard_of(&storage_key).write() {
        map.insert(storage_key, Record::Completed(std::sync::Arc::new(stored)));
    }
    Ok(Response::from_parts(parts, Full::new(body).map_err(|never| match never {}).boxed_unsync()))
}

async fn forward(request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (mut parts, body) = request.into_parts();
    let Ok(uri) = upstream_uri(&parts.uri) else { return Ok(bad_gateway()) };
    parts.uri = uri;
    let sent = CLIENT.with(|client| client.request(Request::from_parts(parts, body)));
    Ok(match sent.await {
        Ok(response) => response.map(BodyExt::boxed_unsync),
        Err(_) => bad_gateway(),
    })
}

/// Spins on this thread until `spin` has passed on the clock (nothing when zero).
fn spin_for(spin: std::time::Duration) {
    if spin.is_zero() {
        return;
    }
    let start = std::time::Instant::now();
    while start.elapsed() < spin {
        std::hint::spin_loop();
    }
}

fn bad_gateway() -> Response<Body> {
    status_only(StatusCode::BAD_GATEWAY)
}

fn status_only(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    response
}
