//! Clients that retry by themselves, as Stripe's SDKs do, against the real `oncely`
//! binary in front of an upstream that misbehaves on purpose: it acts and then answers
//! 500, acts and then drops the connection, acts and answers after the gateway's
//! timeout, or answers 503 without acting. Whatever the upstream does, the operation
//! runs at most once per key, and the client ends holding a clear answer: the one
//! result, or an error that tells it to stop.
//!
//! The upstream here is raw TCP (one request per connection, `Connection: close`), so
//! that it can close a connection after reading a request without answering; it counts
//! requests and side effects per `Idempotency-Key` (which the gateway forwards).

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::{Barrier, Notify, mpsc, watch};

use support::{Gateway, post_to, start_gateway_with_env};

/// The admin token of [`BASE`].
const TOKEN: &str = "secret-token";

/// Every test's configuration starts with this; a test appends the routes it needs.
/// Everything else (`on_conflict`, `store_statuses`, `on_unknown`…) is the default.
const BASE: &str = r#"
[defaults]
max_body = "64KiB"

[admin]
token = "secret-token"
"#;

/// How long `/slow` takes to answer: well past [`UPSTREAM_TIMEOUT`].
const SLOW: Duration = Duration::from_millis(1500);
/// The gateway's `--upstream-timeout` in the tests that need one.
const UPSTREAM_TIMEOUT: &str = "300ms";
/// How many times `/503-then-ok` answers 503, without acting, before it acts.
const FAILS_BEFORE_OK: usize = 2;
/// The request body of the tests.
const BODY: &str = r#"{"amount":1999,"currency":"eur"}"#;
/// Well under the default `wait_timeout` (10 s): an answer that comes "at once".
const AT_ONCE: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------
// The upstream
// ---------------------------------------------------------------------------------------

/// What the upstream saw and did.
#[derive(Default)]
struct Counts {
    /// Requests received, per key, whatever the mode did with them.
    received: HashMap<String, usize>,
    /// Side effects ("charges"), per key: what "at most once" counts.
    executions: HashMap<String, usize>,
    /// Requests done with (answered, or their connection dropped), per key.
    finished: HashMap<String, usize>,
    /// The charge ids made, per key, in order.
    charges: HashMap<String, Vec<String>>,
    /// The last charge number, over all keys.
    last_charge: usize,
}

/// An upstream with a fault mode per path; the mode is the path's last segment, so that
/// `/reject/gated` is `gated` behind the gateway's `/reject` route:
///
/// | mode | what it does |
/// |---|---|
/// | `ok` | acts, answers 201 `{"id":"ch_N"}` |
/// | `acts-then-500` | acts, answers 500 (a body without an `error` member) |
/// | `acts-then-drop` | acts, closes the connection without answering |
/// | `slow` | acts at once, answers 201 after [`SLOW`] |
/// | `gated` | acts at once, answers 201 once [`Faulty::open_gate`] is called |
/// | `503-then-ok` | per key, answers 503 without acting [`FAILS_BEFORE_OK`] times, then acts and answers 201 |
struct Faulty {
    counts: Mutex<Counts>,
    /// Notified on every change of `counts`.
    changed: Notify,
    /// `gated` requests answer once this is true.
    gate: watch::Sender<bool>,
}

impl Faulty {
    fn update<T>(&self, change: impl FnOnce(&mut Counts) -> T) -> T {
        let out = change(&mut self.counts.lock().expect("counts"));
        self.changed.notify_waiters();
        out
    }

    fn read<T>(&self, look: impl FnOnce(&Counts) -> T) -> T {
        look(&self.counts.lock().expect("counts"))
    }

    /// Side effects made for `key`.
    fn executions(&self, key: &str) -> usize {
        self.read(|c| c.executions.get(key).copied().unwrap_or(0))
    }

    /// Requests with `key` that reached the upstream.
    fn received(&self, key: &str) -> usize {
        self.read(|c| c.received.get(key).copied().unwrap_or(0))
    }

    /// Requests that reached the upstream, any key or none.
    fn received_in_all(&self) -> usize {
        self.read(|c| c.received.values().sum())
    }

    /// The charge ids made for `key`.
    fn charges(&self, key: &str) -> Vec<String> {
        self.read(|c| c.charges.get(key).cloned().unwrap_or_default())
    }

    /// The side effect: a new charge for `key`.
    fn act(&self, key: &str) -> String {
        self.update(|c| {
            c.last_charge += 1;
            let id = format!("ch_{}", c.last_charge);
            *c.executions.entry(key.to_string()).or_default() += 1;
            c.charges.entry(key.to_string()).or_default().push(id.clone());
            id
        })
    }

    /// Waits (up to 15 s, then fails naming `what`) until `check` holds.
    async fn wait_until(&self, what: &str, check: impl Fn(&Counts) -> bool) {
        let waiting = async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.read(&check) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(15), waiting)
            .await
            .unwrap_or_else(|_| panic!("the upstream never saw {what}"));
    }

    /// Waits until `n` requests with `key` have reached the upstream.
    async fn wait_received(&self, key: &str, n: usize) {
        self.wait_until(&format!("{n} request(s) with key {key}"), |c| c.received.get(key).copied().unwrap_or(0) >= n)
            .await;
    }

    /// Waits until the upstream is done with `n` requests with `key`.
    async fn wait_finished(&self, key: &str, n: usize) {
        self.wait_until(&format!("{n} request(s) with key {key} answered"), |c| {
            c.finished.get(key).copied().unwrap_or(0) >= n
        })
        .await;
    }

    /// Lets every `gated` request answer, now and later.
    fn open_gate(&self) {
        self.gate.send_replace(true);
    }
}

/// Starts the upstream on loopback: its base URL, and what it counts.
async fn start_faulty() -> (String, Arc<Faulty>) {
    let faulty = Arc::new(Faulty {
        counts: Mutex::new(Counts::default()),
        changed: Notify::new(),
        gate: watch::channel(false).0,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the upstream");
    let addr = listener.local_addr().expect("upstream address");
    let shared = Arc::clone(&faulty);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_one(Arc::clone(&shared), stream));
        }
    });
    (format!("http://{addr}"), faulty)
}

/// A request as the upstream read it.
struct RawRequest {
    path: String,
    headers: Vec<(String, String)>,
}

impl RawRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The key the gateway forwarded (a bare token or an sf-string: the same key).
    fn key(&self) -> String {
        self.header("idempotency-key").unwrap_or("").trim_matches('"').to_string()
    }

    /// The fault mode: the path's last segment.
    fn mode(&self) -> &str {
        let path = self.path.split('?').next().unwrap_or("");
        path.rsplit('/').next().unwrap_or("")
    }
}

fn find(data: &[u8], needle: &[u8]) -> Option<usize> {
    data.windows(needle.len()).position(|w| w == needle)
}

/// Reads one whole request (head and `Content-Length` or chunked body); None if the
/// connection ends first or nothing comes for 10 s.
async fn read_request(stream: &mut TcpStream) -> Option<RawRequest> {
    let reading = async {
        let mut data = Vec::new();
        let head_end = loop {
            if let Some(end) = find(&data, b"\r\n\r\n") {
                break end;
            }
            read_more(stream, &mut data).await?;
        };
        let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let path = lines.next()?.split(' ').nth(1)?.to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
            .collect();
        let request = RawRequest { path, headers };
        let body_start = head_end + 4;
        if request.header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked")) {
            while !data[body_start..].ends_with(b"0\r\n\r\n") {
                read_more(stream, &mut data).await?;
            }
        } else {
            let length = request.header("content-length").and_then(|l| l.parse::<usize>().ok()).unwrap_or(0);
            while data.len() < body_start + length {
                read_more(stream, &mut data).await?;
            }
        }
        Some(request)
    };
    tokio::time::timeout(Duration::from_secs(10), reading).await.ok().flatten()
}

/// Reads what comes next onto `data`; None at the end of the connection.
async fn read_more(stream: &mut TcpStream, data: &mut Vec<u8>) -> Option<()> {
    let mut buf = [0u8; 8192];
    let n = stream.read(&mut buf).await.ok()?;
    if n == 0 {
        return None;
    }
    data.extend_from_slice(&buf[..n]);
    Some(())
}

/// Writes a whole response, `Connection: close`, and closes.
async fn respond(stream: &mut TcpStream, status: u16, body: &Value) {
    let reason = match status {
        201 => "Created",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Whatever",
    };
    let body = body.to_string();
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // The gateway may have given up on this request already: nothing to do about it.
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn serve_one(up: Arc<Faulty>, mut stream: TcpStream) {
    let Some(request) = read_request(&mut stream).await else { return };
    let key = request.key();
    let received = up.update(|c| {
        let n = c.received.entry(key.clone()).or_default();
        *n += 1;
        *n
    });
    match request.mode() {
        "ok" => {
            let id = up.act(&key);
            respond(&mut stream, 201, &json!({ "id": id, "object": "charge" })).await;
        }
        "acts-then-500" => {
            let id = up.act(&key);
            let body = json!({ "message": "the card was charged, then the server failed", "charge": id });
            respond(&mut stream, 500, &body).await;
        }
        "acts-then-drop" => {
            up.act(&key);
            // The whole request was read: closing now is a broken connection to the
            // gateway (no response head, no bytes), not a refused one.
            drop(stream);
        }
        "slow" => {
            let id = up.act(&key);
            tokio::time::sleep(SLOW).await;
            respond(&mut stream, 201, &json!({ "id": id, "object": "charge" })).await;
        }
        "gated" => {
            let id = up.act(&key);
            let mut open = up.gate.subscribe();
            let _ = open.wait_for(|open| *open).await;
            respond(&mut stream, 201, &json!({ "id": id, "object": "charge" })).await;
        }
        "503-then-ok" if received <= FAILS_BEFORE_OK => {
            respond(&mut stream, 503, &json!({ "message": "overloaded; nothing was done" })).await;
        }
        "503-then-ok" => {
            let id = up.act(&key);
            respond(&mut stream, 201, &json!({ "id": id, "object": "charge" })).await;
        }
        other => {
            let body = json!({ "message": format!("no mode {other:?}") });
            respond(&mut stream, 404, &body).await;
        }
    }
    up.update(|c| *c.finished.entry(key).or_default() += 1);
}

// ---------------------------------------------------------------------------------------
// A client that retries as Stripe's SDKs do
// ---------------------------------------------------------------------------------------

/// Stripe's backoff (0.5 s, then 0.5–1 s, then 1–2 s) is scaled by this to keep the suite
/// fast: 250 ms, then 250–500 ms, then 500–1000 ms. Every wait stays well over 100 ms, so
/// retries still come after the first answer and while background work goes on, as real
/// ones would.
const BACKOFF_SCALE: f64 = 0.5;
/// Stripe's SDKs retry at most this often (`max_network_retries`) here.
const MAX_RETRIES: u32 = 3;
/// The SDK's own timeout for one try.
const TRY_TIMEOUT: Duration = Duration::from_secs(5);

/// One answer the client got.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
    /// From sending the request to reading the whole body.
    elapsed: Duration,
}

impl Answer {
    async fn read(response: reqwest::Response, started: Instant) -> Result<Self, String> {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await.map_err(|e| format!("the body failed: {e:?}"))?;
        Ok(Self { status, headers, body, elapsed: started.elapsed() })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    fn should_retry(&self) -> Option<&str> {
        self.header("stripe-should-retry")
    }

    fn problem_type(&self) -> String {
        self.json()["type"].as_str().unwrap_or("").to_string()
    }

    /// What an SDK looks for to raise instead of returning the body.
    fn has_error_member(&self) -> bool {
        self.json().get("error").is_some()
    }

    /// One line for assertion messages.
    fn summary(&self) -> String {
        let body: String = self.body.chars().take(400).collect();
        format!(
            "{} in {} ms (Idempotent-Replayed: {:?}, Stripe-Should-Retry: {:?}, Retry-After: {:?}): {body}",
            self.status,
            self.elapsed.as_millis(),
            self.header("idempotent-replayed"),
            self.should_retry(),
            self.header("retry-after"),
        )
    }
}

/// What the SDK raises.
#[derive(Debug)]
enum SdkError {
    /// An answer with status >= 400 or an `error` member.
    Api(Answer),
    /// No answer: the last try timed out or its connection failed.
    Network(String),
}

/// One call of the SDK: every try, and what the caller finally gets.
#[derive(Debug)]
struct SdkCall {
    tries: Vec<Result<Answer, String>>,
    result: Result<Answer, SdkError>,
}

impl SdkCall {
    /// Every try, for assertion messages.
    fn describe(&self) -> String {
        let tries = self.tries.iter().enumerate().map(|(i, t)| match t {
            Ok(answer) => format!("\n  try {}: {}", i + 1, answer.summary()),
            Err(e) => format!("\n  try {}: no answer: {e}", i + 1),
        });
        tries.collect()
    }

    fn statuses(&self) -> Vec<Option<u16>> {
        self.tries.iter().map(|t| t.as_ref().ok().map(|a| a.status)).collect()
    }

    /// The first try's answer.
    #[track_caller]
    fn first(&self) -> &Answer {
        match self.tries.first() {
            Some(Ok(answer)) => answer,
            _ => panic!("the first try got no answer:{}", self.describe()),
        }
    }

    /// The result, which must be a success.
    #[track_caller]
    fn created(&self) -> &Answer {
        match &self.result {
            Ok(answer) => answer,
            Err(_) => panic!("the SDK raised instead of returning a result:{}", self.describe()),
        }
    }

    /// The error the SDK raised, which must be an API error.
    #[track_caller]
    fn api_error(&self) -> &Answer {
        match &self.result {
            Err(SdkError::Api(answer)) => answer,
            Err(SdkError::Network(e)) => panic!("the SDK ended without an answer ({e}):{}", self.describe()),
            Ok(_) => panic!("the SDK returned a result where an error was expected:{}", self.describe()),
        }
    }
}

/// A client that retries like Stripe's SDKs (stripe-node, stripe-python): the same key
/// and body on every try; retries on no answer (timeouts, connection errors), 409 and any
/// 5xx; `Stripe-Should-Retry: false` stops it and `true` retries whatever the status;
/// `Retry-After` is ignored; at most [`MAX_RETRIES`] retries with Stripe's jittered
/// backoff scaled by [`BACKOFF_SCALE`]. Returns the answer if its status is below 400 and
/// its body has no `error` member, else raises.
struct Sdk {
    http: reqwest::Client,
    base: String,
}

impl Sdk {
    fn new(gw: &Gateway) -> Self {
        let http = reqwest::Client::builder().timeout(TRY_TIMEOUT).build().expect("SDK client");
        Self { http, base: gw.url.clone() }
    }

    async fn post(&self, path: &str, key: &str, body: &str) -> SdkCall {
        self.post_observed(path, key, body, None).await
    }

    /// [`Sdk::post`], sending each try's outcome to `observer` as it comes.
    async fn post_observed(
        &self,
        path: &str,
        key: &str,
        body: &str,
        observer: Option<mpsc::UnboundedSender<Result<Answer, String>>>,
    ) -> SdkCall {
        let mut tries = Vec::new();
        let mut retry = 0;
        loop {
            if retry > 0 {
                tokio::time::sleep(backoff(retry)).await;
            }
            let outcome = self.try_once(path, key, body).await;
            if let Some(observer) = &observer {
                let _ = observer.send(outcome.clone());
            }
            tries.push(outcome.clone());
            if retry >= MAX_RETRIES || !should_retry(&outcome) {
                let result = match outcome {
                    Ok(answer) if answer.status < 400 && !answer.has_error_member() => Ok(answer),
                    Ok(answer) => Err(SdkError::Api(answer)),
                    Err(e) => Err(SdkError::Network(e)),
                };
                return SdkCall { tries, result };
            }
            retry += 1;
        }
    }

    async fn try_once(&self, path: &str, key: &str, body: &str) -> Result<Answer, String> {
        let started = Instant::now();
        let sent = self
            .http
            .post(format!("{}{path}", self.base))
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        let response = sent.map_err(|e| format!("{e:?} after {} ms", started.elapsed().as_millis()))?;
        Answer::read(response, started).await
    }
}

/// Stripe's decision: no answer, retry; `Stripe-Should-Retry` decides if present; else
/// 409 and 5xx are retried.
fn should_retry(outcome: &Result<Answer, String>) -> bool {
    match outcome {
        Err(_) => true,
        Ok(answer) => match answer.should_retry() {
            Some("true") => true,
            Some("false") => false,
            _ => answer.status == 409 || answer.status >= 500,
        },
    }
}

/// Stripe's sleep before retry `n` (1-based): min(0.5 s × 2^(n-1), 2 s), times a jitter
/// in [0.5, 1], at least 0.5 s; then scaled by [`BACKOFF_SCALE`].
fn backoff(n: u32) -> Duration {
    let base = (0.5 * f64::from(1u32 << (n - 1).min(8))).min(2.0);
    let jittered = (base * (0.5 + 0.5 * random_unit())).max(0.5);
    Duration::from_secs_f64(jittered * BACKOFF_SCALE)
}

/// A random number in [0, 1), from the standard library's randomly keyed hasher.
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new().build_hasher().finish() >> 11;
    bits as f64 / (1u64 << 53) as f64
}

// ---------------------------------------------------------------------------------------
// Gateway helpers
// ---------------------------------------------------------------------------------------

/// Starts the gateway with [`BASE`] and `routes` appended. First checks that the binary
/// knows every setting used (the config keys through `check-config`, the flags and
/// variables through `serve --help`), so that a missing one fails with a message naming
/// it rather than with a gateway that never starts.
async fn start(
    upstream: &str,
    store: &str,
    routes: &str,
    flags: &[&str],
    env: &[(&str, &str)],
) -> (Gateway, tempfile::TempDir) {
    let config = format!("{BASE}{routes}");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("check.toml");
    std::fs::write(&path, &config).expect("write config");
    let checked = oncely().arg("check-config").arg(&path).output().await.expect("run check-config");
    assert!(
        checked.status.success(),
        "the gateway refuses a setting this test needs (not implemented yet?):\n{}\n--- the configuration:{config}",
        String::from_utf8_lossy(&checked.stderr).trim()
    );
    if !flags.is_empty() || !env.is_empty() {
        let help = oncely().args(["serve", "--help"]).output().await.expect("run serve --help");
        let help = String::from_utf8_lossy(&help.stdout);
        for flag in flags.iter().filter(|f| f.starts_with("--")) {
            assert!(help.contains(flag), "`oncely serve` has no {flag} flag (not implemented yet?)");
        }
        for (name, _) in env {
            assert!(help.contains(name), "`oncely serve` reads no {name} variable (not implemented yet?)");
        }
    }
    start_gateway_with_env(upstream, store, &config, flags, env).await
}

fn oncely() -> Command {
    Command::new(env!("CARGO_BIN_EXE_oncely"))
}

/// One plain request (no retries), timed.
async fn once(url: &str, path: &str, key: Option<&str>, body: &str) -> Answer {
    let started = Instant::now();
    let response = post_to(url, path, key, body).await;
    Answer::read(response, started).await.expect("a whole answer")
}

/// Checks an `application/problem+json` answer: the RFC 9457 members, and, if
/// `error_type` is given, the `error` member SDKs look for (`code` is the kind with `_`).
/// `context` (an SDK call's tries) is added to the messages.
#[track_caller]
fn assert_problem(answer: &Answer, status: u16, kind: &str, error_type: Option<&str>, context: &str) {
    let what = format!("{}{context}", answer.summary());
    assert_eq!(answer.status, status, "status: {what}");
    assert_eq!(answer.header("content-type"), Some("application/problem+json"), "{what}");
    let json = answer.json();
    assert_eq!(json["type"], format!("urn:oncely:problem:{kind}"), "problem type: {what}");
    assert!(json["title"].as_str().is_some_and(|t| !t.is_empty()), "RFC 9457 `title` kept: {what}");
    assert_eq!(json["status"], status, "RFC 9457 `status` kept: {what}");
    assert!(json["detail"].is_string(), "RFC 9457 `detail` kept: {what}");
    if let Some(error_type) = error_type {
        let error = &json["error"];
        assert_eq!(error["type"], error_type, "`error.type`, which SDKs map to their error classes: {what}");
        assert_eq!(error["code"], kind.replace('-', "_"), "`error.code`: {what}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "`error.message`: {what}");
    }
}

/// Checks that `key` holds an unknown outcome: three retries, each answered at once
/// (no waiting, no 409) with 502 `outcome-unknown` and `Stripe-Should-Retry: false`.
async fn assert_unknown_outcome_held(gw: &Gateway, path: &str, key: &str) {
    for _ in 0..3 {
        let retry = once(&gw.url, path, Some(key), BODY).await;
        assert_problem(&retry, 502, "outcome-unknown", Some("idempotency_error"), "");
        assert_eq!(retry.should_retry(), Some("false"), "a retry cannot help: {}", retry.summary());
        assert!(retry.elapsed < AT_ONCE, "answered at once, not after a wait: {}", retry.summary());
    }
}

/// The storage hash of `key`, from the admin API's listing.
async fn admin_key_hash(gw: &Gateway, key: &str) -> String {
    let listing =
        support::client().get(format!("{}/keys", gw.admin)).bearer_auth(TOKEN).send().await.expect("GET /keys");
    assert_eq!(listing.status(), 200, "the admin API lists keys");
    let keys: Vec<Value> = listing.json().await.expect("key listing");
    let record = keys.iter().find(|k| k["key"] == key);
    if let Some(record) = record {
        assert_eq!(record["state"], "outcome_unknown", "the operator sees what to reconcile: {record}");
    }
    let found = record.and_then(|k| k["hash"].as_str());
    found.unwrap_or_else(|| panic!("the admin API lists {key}: {keys:?}")).to_string()
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_acts_then_answers_500_runs_once_and_the_sdk_holds_the_500() {
    let (upstream, up) = start_faulty().await;
    let (gw, _dir) = start(&upstream, "memory://", "", &[], &[]).await;
    let call = Sdk::new(&gw).post("/acts-then-500", "k-500", BODY).await;
    let log = call.describe();
    assert_eq!(up.executions("k-500"), 1, "a retry after the 500 charged again:{log}");
    assert_eq!(up.received("k-500"), 1, "retries are answered from the store:{log}");

    let first = call.first();
    assert_eq!(first.status, 500, "{log}");
    assert!(!first.replayed(), "{log}");
    let held = call.api_error();
    assert_eq!(held.status, 500, "the SDK holds the first result, the 500:{log}");
    assert_eq!(held.body, first.body, "the same 500:{log}");
    assert!(call.tries.len() <= 2, "a replayed 500 says Stripe-Should-Retry: false, so the SDK stops:{log}");
    for retry in call.tries.iter().skip(1) {
        let retry = retry.as_ref().expect("an answer");
        assert!(retry.replayed(), "the retry got the stored 500:{log}");
        assert_eq!(retry.should_retry(), Some("false"), "{log}");
    }

    // Any later retry: the same 500, replayed, not to be retried.
    let again = once(&gw.url, "/acts-then-500", Some("k-500"), BODY).await;
    assert_eq!(again.status, 500, "{}", again.summary());
    assert!(again.replayed(), "{}", again.summary());
    assert_eq!(again.should_retry(), Some("false"), "a replayed error says a retry cannot help: {}", again.summary());
    assert_eq!(again.body, first.body);
    assert_eq!(up.executions("k-500"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_acts_then_drops_the_connection_holds_an_unknown_outcome_until_an_operator_deletes_it() {
    let (upstream, up) = start_faulty().await;
    let (gw, _dir) = start(&upstream, "memory://", "", &[], &[]).await;
    let call = Sdk::new(&gw).post("/acts-then-drop", "k-drop", BODY).await;
    let log = call.describe();
    assert_eq!(up.executions("k-drop"), 1, "a retry after the broken connection charged again:{log}");

    // The first try gets what every retry will get: a clear error the SDK raises at once.
    let held = call.api_error();
    assert_problem(held, 502, "outcome-unknown", Some("idempotency_error"), &log);
    assert_eq!(held.should_retry(), Some("false"), "{log}");
    assert!(!held.replayed(), "{log}");
    assert_eq!(call.tries.len(), 1, "the SDK stops at outcome-unknown:{log}");

    // Every retry gets the same answer, at once, for as long as the key is kept.
    assert_unknown_outcome_held(&gw, "/acts-then-drop", "k-drop").await;
    assert_eq!(up.received("k-drop"), 1, "no retry reached the upstream");

    // An operator decides that it did not happen: the key is deleted, and runs again.
    let hash = admin_key_hash(&gw, "k-drop").await;
    let deleted = support::client()
        .delete(format!("{}/keys/{hash}", gw.admin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("DELETE /keys/HASH");
    assert_eq!(deleted.status(), 204);
    let rerun = once(&gw.url, "/acts-then-drop", Some("k-drop"), BODY).await;
    assert_problem(&rerun, 502, "outcome-unknown", Some("idempotency_error"), "");
    assert_eq!(up.executions("k-drop"), 2, "after the operator's delete the key runs again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_an_unknown_outcome_survives_a_restart_until_keys_delete() {
    let (upstream, up) = start_faulty().await;
    let dir = tempfile::tempdir().expect("dir");
    let store = format!("sqlite://{}", dir.path().join("oncely.db").display());
    let (mut gw, _config) = start(&upstream, &store, "", &[], &[]).await;
    let call = Sdk::new(&gw).post("/acts-then-drop", "k-sqlite", BODY).await;
    let log = call.describe();
    assert_eq!(up.executions("k-sqlite"), 1, "{log}");
    assert_problem(call.api_error(), 502, "outcome-unknown", Some("idempotency_error"), &log);

    // The record is in the store, not in the process: a new process answers the same.
    let pid = gw.child.id().expect("running");
    let stopped = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill");
    assert!(stopped.success());
    let exit = tokio::time::timeout(Duration::from_secs(20), gw.child.wait()).await.expect("stops").expect("status");
    assert!(exit.success(), "a graceful stop exits 0: {exit:?}");
    let (gw, _config) = start(&upstream, &store, "", &[], &[]).await;
    assert_unknown_outcome_held(&gw, "/acts-then-drop", "k-sqlite").await;
    assert_eq!(up.executions("k-sqlite"), 1);

    // The operator's command line.
    let list = oncely().args(["keys", "list", "--store", &store]).output().await.expect("keys list");
    assert!(list.status.success(), "{list:?}");
    let records: Vec<Value> = serde_json::from_slice(&list.stdout).expect("JSON list");
    let record = records.iter().find(|r| r["key"] == "k-sqlite");
    assert_eq!(record.map(|r| &r["state"]), Some(&Value::from("outcome_unknown")), "{records:?}");
    let hash = record.and_then(|r| r["hash"].as_str());
    let hash = hash.unwrap_or_else(|| panic!("`oncely keys list` shows the key: {records:?}"));
    let deleted = oncely().args(["keys", "delete", hash, "--store", &store]).output().await.expect("keys delete");
    assert!(deleted.status.success(), "{deleted:?}");

    let rerun = once(&gw.url, "/acts-then-drop", Some("k-sqlite"), BODY).await;
    assert_problem(&rerun, 502, "outcome-unknown", Some("idempotency_error"), "");
    assert_eq!(up.executions("k-sqlite"), 2, "after `oncely keys delete` the key runs again");
}

/// A route with `on_unknown = "release"` (in reject mode, to see the held key as 409).
const RELEASE_ROUTE: &str = r#"
[[routes]]
path = "/release"
on_unknown = "release"
on_conflict = "reject"
lease = "1s"
"#;

/// After a dropped connection on a gateway that releases unknown outcomes: the key is
/// held by its lease (409, not outcome-unknown) and runs again once the lease lapses.
async fn assert_released_with_the_lease(gw: &Gateway, up: &Faulty, path: &str, key: &str) {
    let first = once(&gw.url, path, Some(key), BODY).await;
    assert_problem(&first, 502, "upstream-failed", None, "");
    let retry = once(&gw.url, path, Some(key), BODY).await;
    assert_ne!(
        retry.problem_type(),
        "urn:oncely:problem:outcome-unknown",
        "on_unknown = \"release\": the key is not held as an unknown outcome"
    );
    assert_problem(&retry, 409, "request-in-progress", Some("idempotency_error"), "");
    assert_eq!(up.executions(key), 1);

    let deadline = Instant::now() + Duration::from_secs(10);
    let rerun = loop {
        let answer = once(&gw.url, path, Some(key), BODY).await;
        if answer.status != 409 {
            break answer;
        }
        assert!(Instant::now() < deadline, "the key lapses with its 1 s lease: {}", answer.summary());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_problem(&rerun, 502, "upstream-failed", None, "");
    assert_eq!(up.executions(key), 2, "once the lease lapsed, the retry ran again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_unknown_release_lets_a_dropped_call_lapse_with_its_lease() {
    let (upstream, up) = start_faulty().await;
    let (gw, _dir) = start(&upstream, "memory://", RELEASE_ROUTE, &[], &[]).await;
    assert_released_with_the_lease(&gw, &up, "/release/acts-then-drop", "k-release").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_unknown_release_can_be_set_by_flag() {
    let (upstream, up) = start_faulty().await;
    let flags = ["--on-unknown", "release", "--on-conflict", "reject", "--lease", "1s"];
    let (gw, _dir) = start(&upstream, "memory://", "", &flags, &[]).await;
    assert_released_with_the_lease(&gw, &up, "/acts-then-drop", "k-release-flag").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_slower_than_the_gateway_timeout_finishes_in_the_background_and_is_replayed() {
    let (upstream, up) = start_faulty().await;
    let (gw, _dir) = start(&upstream, "memory://", "", &["--upstream-timeout", UPSTREAM_TIMEOUT], &[]).await;
    let call = Sdk::new(&gw).post("/slow", "k-slow", BODY).await;
    let log = call.describe();
    assert_eq!(up.executions("k-slow"), 1, "{log}");
    let created = call.created();
    assert_eq!(created.status, 201, "{log}");
    assert_eq!(created.json()["id"], up.charges("k-slow")[0], "the client holds the one charge:{log}");

    let first = call.first();
    assert_problem(first, 504, "upstream-timeout", None, &log);
    assert_eq!(first.should_retry(), Some("true"), "{log}");

    // A plain retry once the upstream has finished: the 201, replayed.
    let again = once(&gw.url, "/slow", Some("k-slow"), BODY).await;
    assert_eq!(again.status, 201, "{}", again.summary());
    assert!(again.replayed(), "{}", again.summary());
    assert_eq!(again.body, created.body);

    // Nobody retries until the upstream has answered: its late answer is stored all
    // the same.
    let first = once(&gw.url, "/slow", Some("k-late"), BODY).await;
    assert_problem(&first, 504, "upstream-timeout", None, "");
    up.wait_finished("k-late", 1).await;
    let late = once(&gw.url, "/slow", Some("k-late"), BODY).await;
    assert_eq!(late.status, 201, "the upstream's late answer was stored: {}", late.summary());
    assert!(late.replayed(), "{}", late.summary());
    assert_eq!(late.json()["id"], up.charges("k-late")[0]);
    assert_eq!(up.executions("k-late"), 1);
}

/// A route whose background completions end 500 ms after the client's 504.
/// The completion limit may not be shorter than the upstream timeout, which is set here
/// too (rather than by flag) so that `check-config` sees both.
const LIMITED_ROUTE: &str = r#"
[upstream]
timeout = "300ms"

[[routes]]
path = "/limited"
completion_limit = "500ms"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_slower_than_the_completion_limit_leaves_an_unknown_outcome() {
    let (upstream, up) = start_faulty().await;
    let (gw, _dir) = start(&upstream, "memory://", LIMITED_ROUTE, &[], &[]).await;
    let call = Sdk::new(&gw).post("/limited/slow", "k-limit", BODY).await;
    let log = call.describe();
    assert_eq!(up.executions("k-limit"), 1, "{log}");
    assert_problem(call.first(), 504, "upstream-timeout", None, &log);
    let held = call.api_error();
    assert_problem(held, 502, "outcome-unknown", Some("idempotency_error"), &log);
    assert_eq!(held.should_retry(), Some("false"), "{log}");

    // The upstream answers after the limit: too late, the outcome stays unknown.
    up.wait_finished("k-limit", 1).await;
    assert_unknown_outcome_held(&gw, "/limited/slow", "k-limit").await;
    assert_eq!(up.executions("k-limit"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_503_without_acting_releases_the_key_until_the_retry_gets_the_201() {
    let (upstream, up) = start_faulty().await;
    let (gw, _dir) = start(&upstream, "memory://", "", &[], &[]).await;
    let call = Sdk::new(&gw).post("/503-then-ok", "k-503", BODY).await;
    let log = call.describe();
    assert_eq!(up.executions("k-503"), 1, "{log}");
    assert_eq!(call.statuses(), [Some(503), Some(503), Some(201)], "each 503 released the key:{log}");
    let created = call.created();
    assert_eq!(created.json()["id"], up.charges("k-503")[0], "{log}");
    assert!(call.tries.iter().flatten().all(|a| !a.replayed()), "nothing was replayed:{log}");
    assert_eq!(up.received("k-503"), 3, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_answer_is_503_with_should_retry_true_and_the_sdk_gets_through_after() {
    let (upstream, up) = start_faulty().await;
    let dir = tempfile::tempdir().expect("dir");
    let db = dir.path().join("oncely.db");
    let store = format!("sqlite://{}?busy_timeout=100ms", db.display());
    let (gw, _config) = start(&upstream, &store, "", &[], &[]).await;
    // Another process holds SQLite's write lock: the gateway cannot claim the key.
    let locker = rusqlite::Connection::open(&db).expect("open the database");
    locker.execute_batch("BEGIN EXCLUSIVE").expect("take the write lock");
    let (tries, mut observed) = mpsc::unbounded_channel();
    let sdk = Sdk::new(&gw);
    let call = tokio::spawn(async move { sdk.post_observed("/ok", "k-store", BODY, Some(tries)).await });
    let first_try = tokio::time::timeout(Duration::from_secs(10), observed.recv())
        .await
        .expect("the SDK's first try is answered")
        .expect("observed")
        .expect("an answer");
    assert_problem(&first_try, 503, "store-unavailable", None, "");
    assert_eq!(first_try.should_retry(), Some("true"), "a retry can help: {}", first_try.summary());
    assert_eq!(up.received_in_all(), 0, "fail-closed: nothing was forwarded");

    locker.execute_batch("COMMIT").expect("release the write lock");
    drop(locker);
    let call = call.await.expect("SDK task");
    let log = call.describe();
    assert_eq!(call.created().status, 201, "{log}");
    assert_eq!(up.executions("k-store"), 1, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retrying_clients_with_one_key_cause_one_execution_and_get_one_answer() {
    let (upstream, up) = start_faulty().await;
    let (gw, _dir) = start(&upstream, "memory://", "", &["--upstream-timeout", UPSTREAM_TIMEOUT], &[]).await;
    for (path, key, clients) in [("/slow", "k-herd-slow", 4), ("/ok", "k-herd-ok", 8)] {
        let barrier = Arc::new(Barrier::new(clients));
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (sdk, barrier) = (Sdk::new(&gw), Arc::clone(&barrier));
                tokio::spawn(async move {
                    barrier.wait().await;
                    sdk.post(path, key, BODY).await
                })
            })
            .collect();
        let mut calls = Vec::new();
        for task in tasks {
            calls.push(task.await.expect("client task"));
        }
        let log: String = calls.iter().map(|c| format!("\n client:{}", c.describe())).collect();
        assert_eq!(up.executions(key), 1, "{path}: {clients} clients, one execution:{log}");
        let charge = up.charges(key)[0].clone();
        for call in &calls {
            let created = call.created();
            assert_eq!(created.status, 201, "{path}:{log}");
            assert_eq!(created.json()["id"], charge, "{path}: every client holds the one charge:{log}");
        }
        assert!(calls.windows(2).all(|w| w[0].created().body == w[1].created().body), "{path}: one body:{log}");
    }
}

/// A route in reject mode.
const REJECT_ROUTE: &str = r#"
[[routes]]
path = "/reject"
on_conflict = "reject"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_mode_answers_409_with_retry_after_1_and_the_sdk_ends_with_the_replay() {
    let (upstream, up) = start_faulty().await;
    let (gw, _dir) = start(&upstream, "memory://", REJECT_ROUTE, &[], &[]).await;
    let running = tokio::spawn({
        let url = gw.url.clone();
        async move { once(&url, "/reject/gated", Some("k-reject"), BODY).await }
    });
    up.wait_received("k-reject", 1).await;

    let duplicate = once(&gw.url, "/reject/gated", Some("k-reject"), BODY).await;
    assert_problem(&duplicate, 409, "request-in-progress", Some("idempotency_error"), "");
    assert_eq!(
        duplicate.header("retry-after"),
        Some("1"),
        "a short Retry-After, never the remaining lease (30 s): {}",
        duplicate.summary()
    );
    assert_eq!(duplicate.should_retry(), Some("true"), "{}", duplicate.summary());

    // The SDK gets a 409 and retries; once the first request is done, the replay.
    let (tries, mut observed) = mpsc::unbounded_channel();
    let sdk = Sdk::new(&gw);
    let call = tokio::spawn(async move { sdk.post_observed("/reject/gated", "k-reject", BODY, Some(tries)).await });
    let first_try = tokio::time::timeout(Duration::from_secs(10), observed.recv())
        .await
        .expect("the SDK's first try is answered")
        .expect("observed");
    let first_try = first_try.expect("an answer");
    assert_eq!(first_try.status, 409, "the first request is still running: {}", first_try.summary());
    up.open_gate();
    let call = call.await.expect("SDK task");
    let first = running.await.expect("first request");
    let log = call.describe();
    assert_eq!(first.status, 201, "{}", first.summary());
    assert_eq!(up.executions("k-reject"), 1, "{log}");
    let created = call.created();
    assert!(created.replayed(), "{log}");
    assert_eq!(created.body, first.body, "{log}");
    for conflict in call.tries.iter().flatten().filter(|a| a.status == 409) {
        assert_eq!(conflict.header("retry-after"), Some("1"), "{log}");
    }
}

/// A route whose reused keys get 400, as Stripe's SDKs expect of an `IdempotencyError`.
const STRICT_ROUTE: &str = r#"
[[routes]]
path = "/strict"
mismatch_status = 400
"#;

/// The first request with `key` runs; the SDK's request with another body raises at
/// once with `status` `key-reused`.
async fn assert_reused_key_refused(gw: &Gateway, up: &Faulty, path: &str, key: &str, status: u16) {
    let first = once(&gw.url, path, Some(key), r#"{"amount":100}"#).await;
    assert_eq!(first.status, 201, "{}", first.summary());
    let call = Sdk::new(gw).post(path, key, r#"{"amount":200}"#).await;
    let log = call.describe();
    let refused = call.api_error();
    assert_problem(refused, status, "key-reused", Some("idempotency_error"), &log);
    assert_eq!(refused.should_retry(), Some("false"), "{log}");
    assert_eq!(call.tries.len(), 1, "a 4xx is not retried:{log}");
    assert_eq!(up.executions(key), 1, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_key_is_422_by_default_with_an_idempotency_error() {
    let (upstream, up) = start_faulty().await;
    let (gw, _dir) = start(&upstream, "memory://", "", &[], &[]).await;
    assert_reused_key_refused(&gw, &up, "/ok", "k-reuse", 422).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_key_is_400_where_mismatch_status_says_so() {
    let (upstream, up) = start_faulty().await;
    let (gw, _dir) = start(&upstream, "memory://", STRICT_ROUTE, &[], &[]).await;
    assert_reused_key_refused(&gw, &up, "/strict/ok", "k-strict", 400).await;
    // Other routes keep the default.
    assert_reused_key_refused(&gw, &up, "/ok", "k-default", 422).await;

    // The same for every route, by variable.
    let (gw, _dir) = start(&upstream, "memory://", "", &[], &[("ONCELY_MISMATCH_STATUS", "400")]).await;
    assert_reused_key_refused(&gw, &up, "/ok", "k-by-variable", 400).await;
}

/// A route that requires a key.
const REQUIRED_ROUTE: &str = r#"
[[routes]]
path = "/required"
required = true
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_malformed_key_is_an_invalid_request_error() {
    let (upstream, up) = start_faulty().await;
    let (gw, _dir) = start(&upstream, "memory://", REQUIRED_ROUTE, &[], &[]).await;
    let missing = once(&gw.url, "/required/ok", None, BODY).await;
    assert_problem(&missing, 400, "missing-key", Some("invalid_request_error"), "");
    assert_eq!(missing.should_retry(), Some("false"), "{}", missing.summary());

    let call = Sdk::new(&gw).post("/required/ok", "a b", BODY).await;
    let log = call.describe();
    let malformed = call.api_error();
    assert_problem(malformed, 400, "invalid-key", Some("invalid_request_error"), &log);
    assert_eq!(malformed.should_retry(), Some("false"), "{log}");
    assert_eq!(call.tries.len(), 1, "a 4xx is not retried:{log}");
    assert_eq!(up.received_in_all(), 0, "nothing reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_releases_the_key_on_every_retry() {
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let (gw, _dir) = start(&format!("http://{addr}"), "memory://", "", &[], &[]).await;
    let call = Sdk::new(&gw).post("/ok", "k-unreachable", BODY).await;
    let log = call.describe();
    for answer in &call.tries {
        let answer = answer.as_ref().unwrap_or_else(|e| panic!("no answer: {e}:{log}"));
        // Released each time: never a 409, never an unknown outcome.
        assert_problem(answer, 502, "upstream-unreachable", None, &log);
    }
    assert_problem(call.api_error(), 502, "upstream-unreachable", None, &log);
}
