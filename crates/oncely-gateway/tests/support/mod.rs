//! Helpers shared by the gateway's black-box test files: a counting upstream, the
//! spawned `oncely` binary, and request helpers. Each test file uses a subset.
#![allow(dead_code, unreachable_pub)]
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::Notify;

/// The upstream: counts what reaches it; `/slow` holds requests until released.
#[derive(Default)]
pub struct Upstream {
    pub calls: AtomicUsize,
    pub started: Notify,
    pub gate: Notify,
}

pub type Shared = Arc<Upstream>;

pub async fn payments(
    State(u): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, [(&'static str, &'static str); 2], String) {
    let n = u.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let auth = headers.get("authorization").map(|v| v.to_str().unwrap_or("?").to_string());
    (
        StatusCode::CREATED,
        [("x-upstream", "yes"), ("set-cookie", "s=1")],
        json!({ "call": n, "auth": auth, "body_len": body.len() }).to_string(),
    )
}

pub async fn slow(State(u): State<Shared>) -> (StatusCode, String) {
    let n = u.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let released = u.gate.notified();
    u.started.notify_one();
    released.await;
    (StatusCode::CREATED, format!("slow call {n}"))
}

pub async fn status(State(u): State<Shared>, Path(code): Path<u16>) -> StatusCode {
    u.calls.fetch_add(1, Ordering::SeqCst);
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

pub async fn hang(State(u): State<Shared>) -> StatusCode {
    u.calls.fetch_add(1, Ordering::SeqCst);
    std::future::pending::<()>().await;
    StatusCode::OK
}

/// Sends its head and a first chunk, then stalls forever.
pub async fn stall(State(u): State<Shared>) -> axum::response::Response {
    u.calls.fetch_add(1, Ordering::SeqCst);
    let chunks =
        futures_util::stream::once(async { Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"{\"partial\":")) })
            .chain(futures_util::stream::pending());
    axum::response::Response::new(axum::body::Body::from_stream(chunks))
}

/// `slow`, answering with the request's headers as JSON.
pub async fn slow_echo(State(u): State<Shared>, headers: HeaderMap) -> (StatusCode, String) {
    slow(State(u)).await;
    (StatusCode::CREATED, echo_headers(headers).await)
}

/// The request target as the upstream received it (origin form: path and query) and its
/// `Host`, as JSON.
pub async fn echo_target(uri: axum::http::Uri, headers: HeaderMap) -> String {
    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("");
    serde_json::json!({ "target": uri.to_string(), "host": host }).to_string()
}

pub async fn echo_headers(headers: HeaderMap) -> String {
    let map: serde_json::Map<String, Value> =
        headers.iter().map(|(k, v)| (k.to_string(), Value::from(v.to_str().unwrap_or("?")))).collect();
    Value::Object(map).to_string()
}

/// 32 MiB: more than the socket buffers between a client that does not read and the
/// gateway hold.
pub const BIG: usize = 32 << 20;

pub async fn big() -> Vec<u8> {
    vec![b'x'; BIG]
}

pub async fn start_upstream() -> (SocketAddr, Shared) {
    let shared = Shared::default();
    let app = upstream_app(shared.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, shared)
}

/// The upstream's routes, on `shared`'s counters.
pub fn upstream_app(shared: Shared) -> Router {
    Router::new()
        .route("/payments", post(payments).get(payments).put(payments))
        .route("/orders", post(payments))
        .route("/slow", post(slow))
        .route("/wait/slow", post(slow))
        .route("/wait/pay", post(payments))
        .route("/status/{code}", post(status))
        .route("/hang", post(hang))
        .route("/stall", post(stall))
        .route("/echo", post(echo_headers))
        .route("/target", post(echo_target))
        .route("/base/target", post(echo_target))
        .route("/slow-echo", post(slow_echo))
        .route("/big", axum::routing::get(big))
        .with_state(shared)
}

/// A running `oncely serve`; killed on drop.
pub struct Gateway {
    pub child: Child,
    pub url: String,
    pub admin: String,
}

pub const CONFIG: &str = r#"
[defaults]
max_body = "1KiB"
lease = "2s"

[[routes]]
path = "/payments"
required = true

[[routes]]
path = "/wait"
on_conflict = "wait"
wait_timeout = "20s"

[admin]
token = "secret-token"
"#;

pub async fn start_gateway(upstream: &str, store: &str, config: &str, extra: &[&str]) -> (Gateway, tempfile::TempDir) {
    start_gateway_with_env(upstream, store, config, extra, &[]).await
}

/// Like [`start_gateway`], with `ONCELY_*` variables set for the process.
pub async fn start_gateway_with_env(
    upstream: &str,
    store: &str,
    config: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config_path = dir.path().join("oncely.toml");
    std::fs::write(&config_path, config).expect("write config");
    let mut command = Command::new(env!("CARGO_BIN_EXE_oncely"));
    command.envs(env.iter().copied());
    let gateway = spawn_gateway_with(command, upstream, store, &config_path, extra).await;
    (gateway, dir)
}

pub async fn spawn_gateway(upstream: &str, store: &str, config: &std::path::Path, extra: &[&str]) -> Gateway {
    spawn_gateway_with(Command::new(env!("CARGO_BIN_EXE_oncely")), upstream, store, config, extra).await
}

/// `oncely serve` run by bash with at most `descriptors` open files (`ulimit -n`, soft and
/// hard), so that the gateway cannot raise it.
pub async fn spawn_gateway_with_descriptors(
    descriptors: u32,
    upstream: &str,
    store: &str,
    config: &std::path::Path,
    extra: &[&str],
) -> Gateway {
    let mut command = Command::new("bash");
    command.arg("-c").arg(format!("ulimit -n {descriptors} && exec \"$0\" \"$@\"")).arg(env!("CARGO_BIN_EXE_oncely"));
    spawn_gateway_with(command, upstream, store, config, extra).await
}

async fn spawn_gateway_with(
    mut command: Command,
    upstream: &str,
    store: &str,
    config: &std::path::Path,
    extra: &[&str],
) -> Gateway {
    let mut child = command
        .args(["serve", "--upstream", upstream, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--store", store, "--log-level", "warn"])
        .arg("--config")
        .arg(config)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn oncely");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut url, mut admin) = (None, None);
    let read = async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(addr) = line.strip_prefix("oncely listening on ") {
                url = Some(addr.to_string());
            } else if let Some(addr) = line.strip_prefix("oncely admin on ") {
                admin = Some(addr.to_string());
            }
            if url.is_some() && admin.is_some() {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.expect("gateway starts");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Gateway { child, url: url.expect("listen line"), admin: admin.expect("admin line") }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client")
}

pub async fn send_post(gw: &Gateway, path: &str, key: Option<&str>, body: &str) -> reqwest::Response {
    post_to(&gw.url, path, key, body).await
}

/// Every POST of these tests goes through here, so that retries are identical requests.
pub async fn post_to(url: &str, path: &str, key: Option<&str>, body: &str) -> reqwest::Response {
    let mut request =
        client().post(format!("{url}{path}")).header("content-type", "application/json").body(body.to_string());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.expect("request reaches the gateway")
}

pub async fn problem_type(response: reqwest::Response) -> String {
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let json: Value = response.json().await.expect("problem JSON");
    json["type"].as_str().expect("type").to_string()
}

pub fn replayed(response: &reqwest::Response) -> bool {
    response.headers().get("idempotent-replayed").is_some_and(|v| v == "true")
}

/// The gateway's proxy address, `host:port`.
pub fn proxy_addr(gw: &Gateway) -> String {
    gw.url.trim_start_matches("http://").to_string()
}

/// Reads until the peer closes the connection (EOF or reset) or `limit` passes: what was
/// read, and whether it was closed.
pub async fn read_until_closed<R: tokio::io::AsyncRead + Unpin>(stream: &mut R, limit: Duration) -> (Vec<u8>, bool) {
    use tokio::io::AsyncReadExt;
    let mut data = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (data, closed)
}

/// Sends `head` (a request without a body, keep-alive) on `stream` and reads one
/// response: its head and `Content-Length` body, as text. None if the connection closed.
pub async fn exchange(stream: &mut tokio::net::TcpStream, head: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(head.as_bytes()).await.ok()?;
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
                let length = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if data.len() >= end + 4 + length {
                    return Some(String::from_utf8_lossy(&data[..end + 4 + length]).into_owned());
                }
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.ok().flatten()
}

/// Sends raw bytes on a new connection (the request should say `Connection: close`)
/// and returns everything the gateway answered.
pub async fn raw_request(gw: &Gateway, request: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(proxy_addr(gw)).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let (data, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(closed, "the gateway answers and closes: {}", String::from_utf8_lossy(&data));
    String::from_utf8_lossy(&data).into_owned()
}

/// The sum of `oncely_operations_in_flight` over the gateways' admin endpoints.
pub async fn in_flight(gateways: &[&Gateway]) -> usize {
    let mut total = 0;
    for gw in gateways {
        let text =
            client().get(format!("{}/metrics", gw.admin)).send().await.expect("metrics").text().await.expect("text");
        total += text
            .lines()
            .find_map(|l| l.strip_prefix("oncely_operations_in_flight "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as usize;
    }
    total
}

/// 200 concurrent requests with one key, alternating between gateways `a` and `b` on one
/// store, on the wait-mode route `/wait/slow`, whose upstream holds the first request.
/// Once every request is inside a gateway (within `within`: the contention is real, not
/// a queue of retries) and `before_release` is done, the first is let go. Asserts one
/// upstream execution and 200 identical stored 201s: one original, 199 replays.
pub async fn one_key_through_two_gateways(
    a: &Gateway,
    b: &Gateway,
    upstream: &Shared,
    within: Duration,
    before_release: impl std::future::Future<Output = ()>,
) {
    let started = upstream.started.notified();
    let requests: Vec<_> = (0..200)
        .map(|i| {
            let url = if i % 2 == 0 { a.url.clone() } else { b.url.clone() };
            tokio::spawn(async move {
                let r = post_to(&url, "/wait/slow", Some("one-key-two-gateways"), r#"{"amount":100}"#).await;
                let status = r.status().as_u16();
                let replayed = replayed(&r);
                (status, replayed, r.text().await.expect("body"))
            })
        })
        .collect();
    started.await;
    let deadline = tokio::time::Instant::now() + within;
    while in_flight(&[a, b]).await < 200 {
        assert!(tokio::time::Instant::now() < deadline, "all 200 requests reach the gateways");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    before_release.await;
    upstream.gate.notify_one();

    let mut answers = Vec::new();
    for request in requests {
        answers.push(request.await.expect("task"));
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1, "one execution across both gateways");
    let statuses: Vec<u16> = answers.iter().map(|(status, _, _)| *status).collect();
    assert!(statuses.iter().all(|status| *status == 201), "every answer is the stored 201: {statuses:?}");
    let body = &answers[0].2;
    assert!(answers.iter().all(|(_, _, b)| b == body), "all answers identical");
    assert_eq!(answers.iter().filter(|(_, replayed, _)| !replayed).count(), 1, "one original, 199 replays");
}
