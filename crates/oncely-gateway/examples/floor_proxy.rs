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
//! `201 Created` with `BODY` as JSON itself: the floor of a replay, which the gateway
//! answers without the upstream.
//!
//! ```text
//! cargo run --release -p oncely-gateway --example floor_proxy -- 127.0.0.1:7100 127.0.0.1:3000
//! cargo run --release -p oncely-gateway --example floor_proxy -- 127.0.0.1:7101 --answer '{"id":"ch_1"}'
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
        return Err("usage: floor_proxy LISTEN_ADDR (UPSTREAM_ADDR | --answer BODY)".into());
    };
    let listen: SocketAddr = listen.parse()?;
    let target = match (upstream.as_str(), args.next()) {
        ("--answer", Some(body)) => Target::Answer(Bytes::from(body)),
        ("--answer", None) => return Err("--answer needs a body".into()),
        (upstream, _) => Target::Upstream(upstream.parse()?),
    };
    let listener = std::net::TcpListener::bind(listen)?;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let mut workers = Vec::new();
    for _ in 0..cores {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        workers.push(runtime.handle().clone());
        std::thread::spawn(move || runtime.block_on(std::future::pending::<()>()));
    }
    println!("floor_proxy listening on {listen}");
    for (n, stream) in listener.incoming().enumerate() {
        let Ok(stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_nonblocking(true);
        drop(workers[n % workers.len()].spawn(serve(stream, target.clone())));
    }
    Ok(())
}

/// Where requests go: forwarded to an upstream, or answered here.
#[derive(Clone)]
enum Target {
    Upstream(http::uri::Authority),
    Answer(Bytes),
}

thread_local! {
    /// Each worker's own pool, so an upstream connection's task runs on its thread.
    static CLIENT: Client<HttpConnector, Incoming> = {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Client::builder(TokioExecutor::new()).build(connector)
    };
}

async fn serve(stream: std::net::TcpStream, target: Target) {
    let Ok(stream) = tokio::net::TcpStream::from_std(stream) else { return };
    let service = service_fn(move |request: Request<Incoming>| {
        let target = target.clone();
        async move {
            match target {
                Target::Upstream(upstream) => forward(request, upstream).await,
                Target::Answer(body) => answer(request, body).await,
            }
        }
    });
    let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
}

async fn answer(request: Request<Incoming>, body: Bytes) -> Result<Response<Body>, Infallible> {
    if request.into_body().collect().await.is_err() {
        return Ok(bad_gateway());
    }
    let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = StatusCode::CREATED;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    Ok(response)
}

async fn forward(request: Request<Incoming>, upstream: http::uri::Authority) -> Result<Response<Body>, Infallible> {
    let (mut parts, body) = request.into_parts();
    let mut uri = Uri::builder().scheme("http").authority(upstream);
    if let Some(pq) = parts.uri.path_and_query() {
        uri = uri.path_and_query(pq.clone());
    }
    let Ok(uri) = uri.build() else { return Ok(bad_gateway()) };
    parts.uri = uri;
    let sent = CLIENT.with(|client| client.request(Request::from_parts(parts, body)));
    Ok(match sent.await {
        Ok(response) => response.map(BodyExt::boxed_unsync),
        Err(_) => bad_gateway(),
    })
}

fn bad_gateway() -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
