//! A DynamoDB-compatible server for tests: moto's DynamoDB emulator (open source, from
//! PyPI), started on loopback and killed when the test process exits.
//!
//! ```no_run
//! let server = oncely_testkit::dynamodb::DynamoDbServer::shared();
//! let url = server.store_url(&oncely_testkit::dynamodb::unique_table());
//! // dynamodb://oncely_test_…?endpoint=http://127.0.0.1:PORT&region=us-east-1
//! # let _ = url;
//! ```
//!
//! # Where the server comes from
//!
//! - `ONCELY_TEST_DYNAMODB_URL` set (an endpoint, `http://127.0.0.1:8000`): that server;
//!   nothing is started, and [`DynamoDbServer::kill`] and
//!   [`DynamoDbServer::restart`] are refused.
//! - otherwise moto, run by a Python that has it: the virtual environment
//!   `ONCELY_MOTO_VENV` names, else `${XDG_CACHE_HOME:-$HOME/.cache}/oncely/moto-venv`
//!   (where `scripts/test` installs it), else the interpreter of a `moto_server` on
//!   `PATH`. It runs `moto_server.py` beside this file: moto's own server, applying one
//!   request at a time, since moto checks a write's condition and writes the item
//!   without a lock in between (see that file).
//!
//! Tests isolate themselves with a table of their own ([`unique_table`]), so one server
//! per test process is enough. moto keeps everything in memory: a restarted server is
//! empty.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::process::TiedProcess;

/// The variable naming an emulator to use instead of starting one.
pub const URL_VARIABLE: &str = "ONCELY_TEST_DYNAMODB_URL";

/// The variable naming the virtual environment moto is installed in.
pub const VENV_VARIABLE: &str = "ONCELY_MOTO_VENV";

/// The launcher, run with `python -c`.
const LAUNCHER: &str = include_str!("moto_server.py");

/// How long moto gets to start answering (its first import takes seconds).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A DynamoDB emulator on loopback: started here, or the one `ONCELY_TEST_DYNAMODB_URL`
/// names.
pub struct DynamoDbServer {
    // Dropped first: the server stops before its directory is removed.
    process: Mutex<Option<TiedProcess>>,
    port: u16,
    dir: Option<tempfile::TempDir>,
    external: Option<String>,
}

impl std::fmt::Debug for DynamoDbServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoDbServer").field("endpoint", &self.endpoint()).finish_non_exhaustive()
    }
}

impl DynamoDbServer {
    /// The server this test process shares: started on first use (or
    /// `ONCELY_TEST_DYNAMODB_URL`).
    pub fn shared() -> &'static DynamoDbServer {
        static SHARED: OnceLock<DynamoDbServer> = OnceLock::new();
        SHARED.get_or_init(|| match std::env::var(URL_VARIABLE) {
            Ok(url) if !url.is_empty() => {
                DynamoDbServer { process: Mutex::new(None), port: 0, dir: None, external: Some(url) }
            }
            _ => DynamoDbServer::start(),
        })
    }

    /// Starts a server of this test's own, always here (never the external one): for
    /// tests that kill it.
    ///
    /// # Panics
    /// When no Python with moto is found or moto does not answer within 60 s.
    pub fn start() -> DynamoDbServer {
        let dir = tempfile::tempdir().expect("a temporary directory for moto");
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let server = DynamoDbServer { process: Mutex::new(None), port, dir: Some(dir), external: None };
        server.restart();
        server
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        match &self.external {
            Some(url) => url.clone(),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// The store URL of `table` on this server:
    /// `dynamodb://TABLE?endpoint=http://127.0.0.1:PORT&region=us-east-1`.
    pub fn store_url(&self, table: &str) -> String {
        format!("dynamodb://{table}?endpoint={}&region=us-east-1", self.endpoint())
    }

    /// The port of a server started here.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server at once (SIGKILL), as a crash would. Its tables are gone with it.
    pub fn kill(&self) {
        if let Some(process) = self.process.lock().expect("lock").take() {
            process.kill();
        }
    }

    /// Starts the server again on the same port (after [`kill`](Self::kill)), empty, and
    /// waits until it accepts connections.
    ///
    /// # Panics
    /// For the external server, or when moto does not start.
    pub fn restart(&self) {
        let dir = self.dir.as_ref().expect("a server this test started").path();
        let python = moto_python().unwrap_or_else(|| {
            panic!(
                "no Python with moto found: run scripts/test, which installs it in {}, or set {VENV_VARIABLE} \
                 (a virtual environment with `moto[server]`) or {URL_VARIABLE}",
                default_venv().map(|p| p.display().to_string()).unwrap_or_else(|| "~/.cache/oncely/moto-venv".into())
            )
        });
        let log = dir.join("moto.log");
        let mut command = Command::new(&python);
        command.arg("-c").arg(LAUNCHER).arg("127.0.0.1").arg(self.port.to_string()).arg(&log);
        let process = TiedProcess::spawn_cleaning(command, Some(dir));
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!(
                    "moto ({}) did not listen on port {} within {START_TIMEOUT:?}:\n{log}",
                    python.display(),
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        *self.process.lock().expect("lock") = Some(process);
    }
}

/// A table name no other test of this run uses: `oncely_test_<pid>_<n>`.
pub fn unique_table() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("oncely_test_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/oncely/moto-venv`, where `scripts/test` installs moto.
pub fn default_venv() -> Option<PathBuf> {
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(cache.join("oncely").join("moto-venv"))
}

/// The Python that runs moto (see the [module docs](self)).
pub fn moto_python() -> Option<PathBuf> {
    let venvs =
        std::env::var_os(VENV_VARIABLE).filter(|v| !v.is_empty()).map(PathBuf::from).into_iter().chain(default_venv());
    for venv in venvs {
        let python = venv.join("bin").join("python");
        if venv.join("bin").join("moto_server").is_file() && python.is_file() {
            return Some(python);
        }
    }
    let path = std::env::var_os("PATH")?;
    let script = std::env::split_paths(&path).map(|dir| dir.join("moto_server")).find(|p| p.is_file())?;
    interpreter_of(&script)
}

/// The interpreter a console script's `#!` line names.
fn interpreter_of(script: &Path) -> Option<PathBuf> {
    let text = std::fs::read(script).ok()?;
    let line = text.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.strip_prefix("#!")?.trim();
    let mut words = line.split_whitespace();
    let first = words.next()?;
    // `#!/usr/bin/env python3`: the program after `env`.
    if first.ends_with("/env") {
        return words.next().map(PathBuf::from);
    }
    Some(PathBuf::from(first))
}

/// A loopback HTTP proxy in front of a DynamoDB endpoint that can answer every request
/// with a DynamoDB error instead of forwarding it: how tests make a store meet
/// throttling (`ThrottlingException`, `ProvisionedThroughputExceededException`,
/// `RequestLimitExceeded`), which no emulator produces on demand. One request per
/// connection; it lives until the test process exits.
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    fault: std::sync::Arc<Mutex<Option<String>>>,
    seen: std::sync::Arc<AtomicU64>,
}

impl FaultProxy {
    /// A proxy on a free loopback port forwarding to `upstream` (`http://127.0.0.1:PORT`).
    ///
    /// # Panics
    /// When `upstream` is not `http://HOST:PORT` or no port can be bound.
    pub fn start(upstream: &str) -> FaultProxy {
        let target = upstream.strip_prefix("http://").expect("an http:// endpoint").trim_end_matches('/').to_string();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = listener.local_addr().expect("addr").port();
        let fault = std::sync::Arc::new(Mutex::new(None::<String>));
        let seen = std::sync::Arc::new(AtomicU64::new(0));
        let (fault_, seen_) = (fault.clone(), seen.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (fault, seen, target) = (fault_.clone(), seen_.clone(), target.clone());
                std::thread::spawn(move || {
                    let _ = proxy_one(client, &target, &fault, &seen);
                });
            }
        });
        FaultProxy { port, fault, seen }
    }

    /// `http://127.0.0.1:PORT`: the endpoint to give a store.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// From now on, answer every request with HTTP 400 and the DynamoDB error `code`
    /// (`ThrottlingException`, …), forwarding nothing.
    pub fn fail_with(&self, code: &str) {
        *self.fault.lock().expect("lock") = Some(code.to_string());
    }

    /// From now on, forward every request again.
    pub fn pass(&self) {
        *self.fault.lock().expect("lock") = None;
    }

    /// How many requests were answered with the fault so far.
    pub fn faults_answered(&self) -> u64 {
        self.seen.load(Ordering::SeqCst)
    }
}

/// Reads one HTTP/1.1 request from `client`, then answers it with the fault or with the
/// upstream's answer.
fn proxy_one(
    mut client: TcpStream,
    target: &str,
    fault: &Mutex<Option<String>>,
    seen: &AtomicU64,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        let n = client.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
        if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&request[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while request.len() < head_end + length {
        let n = client.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let code = fault.lock().expect("lock").clone();
    if let Some(code) = code {
        seen.fetch_add(1, Ordering::SeqCst);
        let body =
            format!(r#"{{"__type":"com.amazonaws.dynamodb.v20120810#{code}","message":"injected by the test"}}"#);
        let response = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.0\r\nx-amzn-RequestId: fault\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return client.write_all(response.as_bytes());
    }
    let mut upstream = TcpStream::connect(target)?;
    upstream.write_all(&request)?;
    // moto closes each connection after its answer, so the answer is all until EOF.
    let mut answer = Vec::new();
    upstream.read_to_end(&mut answer)?;
    client.write_all(&answer)
}
