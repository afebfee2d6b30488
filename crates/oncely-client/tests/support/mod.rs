//! Helpers for the black-box tests: a counting payments upstream, the real `oncely`
//! gateway binary, a TCP relay that breaks a connection after the server answered, and
//! a client whose retries release a gate (tests synchronise on these signals, not on
//! sleeps). Each test file uses a subset.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use oncely_client::{IdempotencyMiddleware, RetryCause, RetryEvent, RetryPolicy};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

/// What reached the payments API.
#[derive(Default)]
pub struct Upstream {
    /// Requests that reached a handler.
    pub arrivals: AtomicUsize,
    /// Charges made: what must be one at the end of every test.
    pub executions: AtomicUsize,
    /// The key of every request that reached a handler.
    pub keys: Mutex<Vec<String>>,
    /// `/slow` and `/busy` hold until this is notified.
    pub gate: Notify,
    /// Notified when `/slow` or `/busy` has charged and waits at the gate.
    pub started: Notify,
}

pub type Shared = Arc<Upstream>;

impl Upstream {
    pub fn executions(&self) -> usize {
        self.executions.load(Ordering::SeqCst)
    }

    pub fn arrivals(&self) -> usize {
        self.arrivals.load(Ordering::SeqCst)
    }

    fn arrive(&self, headers: &HeaderMap) -> usize {
        let key = headers.get("idempotency-key").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if let Ok(mut keys) = self.keys.lock() {
            keys.push(key.unwrap_or_default());
        }
        self.arrivals.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn charge(&self) -> String {
        let n = self.executions.fetch_add(1, Ordering::SeqCst) + 1;
        format!(r#"{{"charge":"ch_{n}","amount":1999}}"#)
    }
}

type Answer = (StatusCode, [(&'static str, &'static str); 1], String);

fn json(status: StatusCode, body: String) -> Answer {
    (status, [("content-type", "application/json")], body)
}

/// Charges, then holds the answer until the gate opens: a slow upstream.
async fn slow(State(u): State<Shared>, headers: HeaderMap) -> Answer {
    u.arrive(&headers);
    let body = u.charge();
    let opened = u.gate.notified();
    u.started.notify_one();
    opened.await;
    json(StatusCode::CREATED, body)
}

/// Charges, then answers 500: the failure happened after the side effect.
async fn fail_after(State(u): State<Shared>, headers: HeaderMap) -> Answer {
    u.arrive(&headers);
    let body = u.charge();
    json(StatusCode::INTERNAL_SERVER_ERROR, body)
}

/// The first request gets 503 before anything happens; later ones charge.
async fn unavailable_first(State(u): State<Shared>, headers: HeaderMap) -> Answer {
    if u.arrive(&headers) == 1 {
        return json(StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"warming up"}"#.into());
    }
    json(StatusCode::CREATED, u.charge())
}

/// Charges and answers 201.
async fn pay(State(u): State<Shared>, headers: HeaderMap) -> Answer {
    u.arrive(&headers);
    json(StatusCode::CREATED, u.charge())
}

/// 503 with `Stripe-Should-Retry: false`: the server says a retry cannot help.
async fn no_retry(State(u): State<Shared>, headers: HeaderMap) -> (StatusCode, [(&'static str, &'static str); 1]) {
    u.arrive(&headers);
    (StatusCode::SERVICE_UNAVAILABLE, [("stripe-should-retry", "false")])
}

/// 503 with `Retry-After: 1` the first time, then a charge.
async fn retry_after_first(
    State(u): State<Shared>,
    headers: HeaderMap,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    if u.arrive(&headers) == 1 {
        return (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "1")], String::new());
    }
    (StatusCode::CREATED, [("retry-after", "0")], u.charge())
}

/// The payments API's routes, without idempotency of their own.
pub fn payments_routes(shared: Shared) -> Router {
    Router::new()
        .route("/slow", post(slow))
        .route("/busy", post(slow))
        .route("/fail-after", post(fail_after))
        .route("/unavailable-first", post(unavailable_first))
        .route("/pay", post(pay))
        .route("/no-retry", post(no_retry))
        .route("/retry-after-first", post(retry_after_first))
        .with_state(shared)
}

/// Serves `app` on a free loopback port.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// An upstream that reads one request (head and `Content-Length` body), counts it as
/// executed, and closes the connection without a word: it acted, then the connection
/// broke.
pub async fn start_dropping_upstream() -> (SocketAddr, Shared) {
    let shared = Shared::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = shared.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let state = state.clone();
            tokio::spawn(async move {
                if read_request(&mut stream).await {
                    state.arrivals.fetch_add(1, Ordering::SeqCst);
                    state.executions.fetch_add(1, Ordering::SeqCst);
                }
                drop(stream);
            });
        }
    });
    (addr, shared)
}

/// Reads one HTTP/1.1 request; false if the connection ended first.
async fn read_request(stream: &mut TcpStream) -> bool {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if data.len() >= end + 4 + length {
                return true;
            }
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
}

/// A TCP relay in front of `backend`. While `break_next` is set, the next connection that
/// gets an answer from the backend is closed instead of passing it on: the server acted
/// and answered, and the client never heard.
pub struct Relay {
    pub addr: SocketAddr,
    pub break_next: Arc<AtomicBool>,
    pub broken: Arc<Notify>,
}

pub async fn start_relay(backend: SocketAddr) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = listener.local_addr().expect("addr");
    let break_next = Arc::new(AtomicBool::new(true));
    let broken = Arc::new(Notify::new());
    let (flag, signal) = (break_next.clone(), broken.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (flag, signal) = (flag.clone(), signal.clone());
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(backend).await else { return };
                relay(client, server, &flag, &signal).await;
            });
        }
    });
    Relay { addr, break_next, broken }
}

async fn relay(mut client: TcpStream, mut server: TcpStream, break_next: &AtomicBool, broken: &Notify) {
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let upstream = tokio::io::copy(&mut client_read, &mut server_write);
    let downstream = async {
        let mut buf = [0u8; 8192];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if break_next.swap(false, Ordering::SeqCst) {
                broken.notify_one();
                return; // drop the answer and, below, both connections
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = upstream => {}
        () = downstream => {}
    }
}

/// Where the `oncely` binary is: `ONCELY_GATEWAY_BIN` if set, else built now.
///
/// `env!("CARGO_BIN_EXE_oncely")` exists only inside the gateway's own package, and a
/// dev-dependency on a package without a library target builds nothing. So the tests run
/// `cargo build -p oncely-gateway --bin oncely` once per test process, in the same
/// workspace, target directory and profile as this test, and take the executable's path
/// from Cargo's JSON messages. Under `cargo test --workspace` the binary is already built
/// and the build is a no-op; Cargo's own lock serialises concurrent test processes.
pub fn gateway_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("ONCELY_GATEWAY_BIN") {
            return PathBuf::from(path);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
        // target/<profile>/deps/<this test>: the profile is the directory above `deps`.
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe.parent().and_then(Path::parent).and_then(Path::file_name);
        let profile = match profile_dir.and_then(|p| p.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(other) => other.to_string(),
        };
        let output = std::process::Command::new(cargo)
            .args(["build", "--locked", "-p", "oncely-gateway", "--bin", "oncely", "--message-format=json"])
            .args(["--profile", &profile])
            .arg("--manifest-path")
            .arg(&manifest)
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo build for the gateway");
        assert!(output.status.success(), "cargo build -p oncely-gateway failed");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "oncely")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo reports the oncely executable")
    })
}

/// A running `oncely serve`; killed on drop.
pub struct Gateway {
    pub child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

/// Starts the gateway on `memory://` in front of `upstream` with `config`.
pub async fn start_gateway(upstream: SocketAddr, config: &str) -> Gateway {
    let binary = tokio::task::spawn_blocking(gateway_binary).await.expect("build task");
    let dir = tempfile::tempdir().expect("temp dir");
    let config_path = dir.path().join("oncely.toml");
    std::fs::write(&config_path, config).expect("write config");
    let mut child = Command::new(binary)
        .args(["serve", "--upstream", &format!("http://{upstream}"), "--listen", "127.0.0.1:0"])
        .args(["--store", "memory://", "--log-level", "warn", "--config"])
        .arg(&config_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn oncely");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let url = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addr) = line.strip_prefix("oncely listening on ") {
                return Some(addr.to_string());
            }
        }
        None
    })
    .await
    .expect("the gateway starts within a minute")
    .expect("the gateway prints its address");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Gateway { child, url, _dir: dir }
}

/// The retry policy of the tests: short waits, bounded well inside the test's patience.
pub fn policy() -> RetryPolicy {
    RetryPolicy::default()
        .with_max_attempts(6)
        .with_base_delay(Duration::from_millis(20))
        .with_max_delay(Duration::from_millis(200))
        .with_deadline(Duration::from_secs(20))
}

/// Every retry the client made.
pub type Retries = Arc<Mutex<Vec<RetryEvent>>>;

/// The middleware with [`policy`], recording each retry and opening the upstream's gate
/// on the retry `opens_gate` picks: the first attempt has certainly failed by then.
pub fn middleware(
    upstream: &Shared,
    opens_gate: impl Fn(&RetryEvent) -> bool + Send + Sync + 'static,
) -> (IdempotencyMiddleware, Retries) {
    let retries = Retries::default();
    let (record, gate_of) = (retries.clone(), upstream.clone());
    let middleware = IdempotencyMiddleware::new().retry(policy()).on_retry(move |event| {
        if let Ok(mut all) = record.lock() {
            all.push(event.clone());
        }
        if opens_gate(event) {
            gate_of.gate.notify_one();
        }
    });
    (middleware, retries)
}

/// Opens the gate on the first retry after a time-out.
pub fn after_timeout(event: &RetryEvent) -> bool {
    event.cause == RetryCause::Timeout
}

/// Opens the gate on a retry after a 409, or from the third retry on whatever it was.
pub fn after_conflict(event: &RetryEvent) -> bool {
    event.cause == RetryCause::Status(StatusCode::CONFLICT) || event.attempt >= 3
}

/// A client through the middleware; each attempt may take `attempt_timeout`.
pub fn client(middleware: IdempotencyMiddleware) -> reqwest_middleware::ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new()).with(middleware).build()
}

/// The causes of the recorded retries.
pub fn causes(retries: &Retries) -> Vec<RetryCause> {
    retries.lock().map(|all| all.iter().map(|e| e.cause.clone()).collect()).unwrap_or_default()
}
