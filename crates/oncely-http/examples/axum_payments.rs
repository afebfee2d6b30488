//! A small payments API behind `IdempotencyLayer`: however often a client retries a
//! charge, the card is charged once.
//!
//! What it shows:
//!
//! - the layer on the mutating routes only (`POST /payments`, `POST /payments/{id}/refunds`),
//!   with a required `Idempotency-Key`, next to a read route it does not cover
//!   (`GET /payments`);
//! - a retry getting the first response back byte for byte, marked
//!   `Idempotent-Replayed: true`, without the handler running again;
//! - the same key with another body answered 422, and a missing key 400, both
//!   `application/problem+json`;
//! - concurrent duplicates in wait mode: the first runs (it takes ~200 ms, like a call to a
//!   card processor), the others wait for its result and replay it;
//! - a 4xx from the handler (amount 0) stored and replayed too: it is a final answer;
//! - keys scoped by `Authorization`: two API keys using the same idempotency key are two
//!   different requests;
//! - the handler reading the key with the `Idempotent` extractor;
//! - any store, picked by its URL through `oncely_stores::open`: the in-process
//!   `memory://` by default, or `sqlite://payments.db`, `redis://127.0.0.1:6379`,
//!   `postgres://app@127.0.0.1/app` (`--store URL`, or the `ONCELY_STORE` variable).
//!
//! Run it, then paste the curl commands it prints into another terminal:
//!
//! ```text
//! cargo run -p oncely-http --example axum_payments
//! cargo run -p oncely-http --example axum_payments -- --listen 127.0.0.1:8080 --store sqlite://payments.db
//! ONCELY_STORE=redis://127.0.0.1:6379 cargo run -p oncely-http --example axum_payments
//! ```
//!
//! Or let it check itself: `--self-test` serves on a free loopback port, sends real HTTP
//! requests to itself, checks every answer and exits 0 (`cargo test` runs the same check):
//!
//! ```text
//! cargo run -p oncely-http --example axum_payments -- --self-test
//! cargo run -p oncely-http --example axum_payments -- --self-test --store redis://127.0.0.1:6379
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use oncely::{ConflictMode, DynStore, Oncely};
use oncely_http::{IdempotencyLayer, Idempotent};
use serde::{Deserialize, Serialize};

const DEFAULT_LISTEN: &str = "127.0.0.1:3000";
const DEFAULT_STORE: &str = "memory://";
/// The variable naming the store when `--store` does not: the gateway's too.
const STORE_VARIABLE: &str = "ONCELY_STORE";

/// How long the pretend card processor takes: long enough to fire a duplicate from
/// another terminal while the first request is still running.
const PROCESSING_TIME: Duration = Duration::from_millis(200);

const USAGE: &str = "\
usage: cargo run -p oncely-http --example axum_payments -- [OPTIONS]

  --listen ADDR   where to serve (default 127.0.0.1:3000)
  --store URL     the idempotency store: memory://, sqlite://PATH, redis://HOST:PORT,
                  postgres://USER@HOST/DB, with options (default $ONCELY_STORE, or
                  memory://)
  --self-test     serve on a free loopback port, check the API over HTTP, exit
                  (0 when every check passes); --listen is ignored
  -h, --help      this text";

// ---------------------------------------------------------------------------------------
// The payments API: plain axum handlers. The only trace of idempotency in them is the
// `Idempotent` extractor, which hands them the key (to record it, or to pass it on to a
// payment provider). Running each request once is the layer's job.
// ---------------------------------------------------------------------------------------

/// The application state: a ledger behind a mutex. A real service would use a database.
#[derive(Clone)]
struct AppState {
    ledger: Arc<Mutex<Ledger>>,
    /// Print a line each time a handler really runs (off in the self-test).
    log: bool,
}

#[derive(Default)]
struct Ledger {
    charges: Vec<Charge>,
    refunds_created: u64,
}

impl AppState {
    fn new(log: bool) -> Self {
        Self { ledger: Arc::default(), log }
    }

    /// Locks the ledger. The lock is never held across an `.await`.
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // A handler that panicked while holding the lock poisons it; every update below
        // is complete before the guard drops, so the ledger is still consistent.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The body of `POST /payments`.
#[derive(Deserialize)]
struct NewCharge {
    /// In minor units (cents).
    amount: u64,
    /// An ISO 4217 code such as `eur`.
    currency: String,
}

/// The body of `POST /payments/{id}/refunds`.
#[derive(Deserialize)]
struct NewRefund {
    amount: u64,
}

#[derive(Clone, Serialize)]
struct Charge {
    id: String,
    amount: u64,
    currency: String,
    amount_refunded: u64,
    /// The key the charge was created under, as the `Idempotent` extractor gave it.
    idempotency_key: String,
}

#[derive(Serialize)]
struct Refund {
    id: String,
    charge: String,
    amount: u64,
    idempotency_key: String,
}

/// `POST /payments`: validates the body, "talks to the card processor", records a charge.
///
/// The `Json` extractor comes last because it consumes the body; taking its `Result`
/// lets us answer malformed JSON with our own 400 instead of axum's default.
async fn create_charge(
    State(state): State<AppState>,
    Idempotent(key): Idempotent,
    payload: Result<Json<NewCharge>, JsonRejection>,
) -> Response {
    let Json(new) = match payload {
        Ok(json) => json,
        Err(rejection) => return invalid_request(&rejection.body_text()),
    };
    // A 4xx is a final answer: the layer stores it, and a retry with this key gets the
    // same 400 back (marked replayed) without running this handler again.
    if new.amount == 0 {
        return invalid_request("amount must be a positive number of minor units (cents)");
    }
    if new.currency.len() != 3 || !new.currency.bytes().all(|b| b.is_ascii_alphabetic()) {
        return invalid_request("currency must be a three-letter ISO 4217 code such as \"eur\"");
    }

    // The slow, non-repeatable part: charging the card. A duplicate that arrives now
    // does not reach this handler; in wait mode the layer holds it until this response
    // is stored, then replays it.
    tokio::time::sleep(PROCESSING_TIME).await;

    let charge = {
        let mut ledger = state.ledger();
        let charge = Charge {
            id: format!("ch_{:06}", ledger.charges.len() + 1),
            amount: new.amount,
            currency: new.currency.to_ascii_lowercase(),
            amount_refunded: 0,
            idempotency_key: key.as_str().to_owned(),
        };
        ledger.charges.push(charge.clone());
        charge
    };
    if state.log {
        println!("charged {} {} as {} (key {key})", charge.amount, charge.currency, charge.id);
    }
    (StatusCode::CREATED, Json(charge)).into_response()
}

/// `POST /payments/{id}/refunds`: another covered mutation. Without idempotency a retried
/// refund would refund twice.
async fn create_refund(
    State(state): State<AppState>,
    Idempotent(key): Idempotent,
    Path(charge_id): Path<String>,
    payload: Result<Json<NewRefund>, JsonRejection>,
) -> Response {
    let Json(new) = match payload {
        Ok(json) => json,
        Err(rejection) => return invalid_request(&rejection.body_text()),
    };
    if new.amount == 0 {
        return invalid_request("amount must be a positive number of minor units (cents)");
    }
    let refund = {
        let mut guard = state.ledger();
        // Borrow the fields separately: the charge and the refund counter are both updated.
        let ledger = &mut *guard;
        let id = format!("re_{:06}", ledger.refunds_created + 1);
        let Some(charge) = ledger.charges.iter_mut().find(|c| c.id == charge_id) else {
            return api_problem(StatusCode::NOT_FOUND, "no-such-charge", &format!("no charge {charge_id:?}"));
        };
        let refundable = charge.amount - charge.amount_refunded;
        if new.amount > refundable {
            return invalid_request(&format!("only {refundable} of charge {charge_id} is left to refund"));
        }
        charge.amount_refunded += new.amount;
        ledger.refunds_created += 1;
        Refund { id, charge: charge_id, amount: new.amount, idempotency_key: key.as_str().to_owned() }
    };
    if state.log {
        println!("refunded {} of {} as {} (key {key})", refund.amount, refund.charge, refund.id);
    }
    (StatusCode::CREATED, Json(refund)).into_response()
}

/// `GET /payments`: every charge, and how many were created. Not behind the layer (and
/// GET is not a covered method anyway), so it needs no key.
async fn list_charges(State(state): State<AppState>) -> Json<serde_json::Value> {
    let ledger = state.ledger();
    Json(serde_json::json!({
        "charges_created": ledger.charges.len(),
        "refunds_created": ledger.refunds_created,
        "charges": ledger.charges,
    }))
}

fn invalid_request(detail: &str) -> Response {
    api_problem(StatusCode::BAD_REQUEST, "invalid-request", detail)
}

/// The application's own errors, in the same RFC 9457 shape as the layer's.
fn api_problem(status: StatusCode, slug: &str, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": format!("urn:example:payments:{slug}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    (status, [(header::CONTENT_TYPE, "application/problem+json")], body.to_string()).into_response()
}

// ---------------------------------------------------------------------------------------
// Wiring: the store, the engine, the layer, the router.
// ---------------------------------------------------------------------------------------

/// The idempotency store named by `url`: any store `oncely_stores::open` knows, with
/// the options its URL takes.
///
/// A `DynStore` is itself a `Store`, so the rest of the program does not care which
/// store it got.
async fn store_from_url(url: &str) -> Result<DynStore, String> {
    oncely_stores::open(url).await.map(|opened| opened.store).map_err(|e| e.to_string())
}

/// The app: the POST routes behind the idempotency layer, the GET route beside it.
fn app(store: DynStore, state: AppState) -> Router {
    // The engine: how long results are kept for replay, and what a duplicate does while
    // the first request still runs. Wait mode: it waits (up to 5 s) for the first
    // request's response and replays it; reject mode would answer 409 at once.
    let oncely = Oncely::builder(store)
        .retention(Duration::from_secs(24 * 3600))
        .conflict_mode(ConflictMode::Wait { timeout: Duration::from_secs(5) })
        .build()
        .expect("the engine settings above are in range");

    // The HTTP layer. Defaults kept: POST and PATCH covered, the `Idempotency-Key`
    // header, keys scoped by the `Authorization` header (two API keys never share
    // records), 5xx/408/429 not stored (a retry runs again), everything else stored.
    let idempotency = IdempotencyLayer::new(oncely).require_key(true);

    // `route_layer` wraps only the routes of this router, so an unknown path is still a
    // plain 404 rather than a "missing key" 400.
    let mutations = Router::new()
        .route("/payments", post(create_charge))
        .route("/payments/{id}/refunds", post(create_refund))
        .route_layer(idempotency);

    // `merge` joins `GET /payments` with the layered `POST /payments` on one path.
    Router::new().route("/payments", get(list_charges)).merge(mutations).with_state(state)
}

// ---------------------------------------------------------------------------------------
// main: arguments, serving, the curl cheat sheet.
// ---------------------------------------------------------------------------------------

struct Args {
    listen: String,
    store: String,
    self_test: bool,
    help: bool,
}

/// Parses `--listen ADDR`, `--store URL` (also as `--flag=value`), `--self-test`, `--help`;
/// the store is `default_store` unless `--store` is given.
fn parse_args(args: impl IntoIterator<Item = String>, default_store: String) -> Result<Args, String> {
    let mut parsed = Args { listen: DEFAULT_LISTEN.to_owned(), store: default_store, self_test: false, help: false };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline_value) = match arg.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_owned())),
            None => (arg.as_str(), None),
        };
        match flag {
            "--listen" | "--store" => {
                let value = match inline_value {
                    Some(value) => value,
                    None => args.next().ok_or_else(|| format!("{flag} needs a value"))?,
                };
                if flag == "--listen" {
                    parsed.listen = value;
                } else {
                    parsed.store = value;
                }
            }
            "--self-test" if inline_value.is_none() => parsed.self_test = true,
            "-h" | "--help" if inline_value.is_none() => parsed.help = true,
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    let default_store = std::env::var(STORE_VARIABLE).ok().filter(|url| !url.is_empty());
    let args = match parse_args(std::env::args().skip(1), default_store.unwrap_or_else(|| DEFAULT_STORE.to_owned())) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.help {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if args.self_test {
        return match self_test_blocking(&args.store) {
            Ok(()) => {
                println!("self-test passed");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("self-test FAILED: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves until Ctrl-C; requests in flight finish (and store their results) first.
async fn serve(args: &Args) -> Result<(), String> {
    let store = store_from_url(&args.store).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| format!("cannot read the listen address: {e}"))?;
    print_cheat_sheet(addr, &oncely_stores::redacted(&args.store));

    let shutdown = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No Ctrl-C handler could be installed: serve until killed.
            std::future::pending::<()>().await;
        }
        println!("\nshutting down: letting requests in flight finish");
    };
    axum::serve(listener, app(store, AppState::new(true)))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| format!("server error: {e}"))
}

/// Prints where the API is and curl commands that show each behaviour.
fn print_cheat_sheet(addr: SocketAddr, store: &str) {
    // Listening on 0.0.0.0 or [::]: curl the loopback address of the same family.
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    let url = format!("http://{target}/payments");
    // Every command: show the status and headers (-i), end the body with a newline.
    let post = format!("curl -si -w '\\n' {url} -H 'Authorization: Bearer sk_test_alice'");
    let json = "-H 'Content-Type: application/json'";
    let body = r#"-d '{"amount": 1999, "currency": "eur"}'"#;
    let other_body = r#"-d '{"amount": 5000, "currency": "eur"}'"#;
    let (key1, key2) = ("-H 'Idempotency-Key: order-1001'", "-H 'Idempotency-Key: order-1002'");

    println!("Oncely payments example listening on http://{addr} (store: {store})");
    println!();
    println!("  POST /payments               create a charge   (Idempotency-Key required)");
    println!("  POST /payments/{{id}}/refunds  refund a charge   (Idempotency-Key required)");
    println!("  GET  /payments               list the charges  (not covered by the layer)");
    println!();
    println!("Try it from another terminal (this one prints a line whenever a charge really runs):");
    println!();
    println!("# 1. Charge: 201 after ~200 ms, a new charge id");
    println!("{post} {key1} {json} {body}");
    println!();
    println!("# 2. Retry it: the same charge at once, Idempotent-Replayed: true, nothing charged");
    println!("{post} {key1} {json} {body}");
    println!();
    println!("# 3. Same key, another body: 422 application/problem+json (key-reused)");
    println!("{post} {key1} {json} {other_body}");
    println!();
    println!("# 4. No key: 400 application/problem+json (missing-key)");
    println!("{post} {json} {body}");
    println!();
    println!("# 5. Two duplicates at once: one charge; the second waits for it and replays it. Then the list.");
    println!("{post} {key2} {json} {body} & {post} {key2} {json} {body} & wait; curl -s -w '\\n' {url}");
    println!();
    println!("Ctrl-C stops the server.");
}

// ---------------------------------------------------------------------------------------
// --self-test: the same checks as the curl commands, over real HTTP on loopback.
// ---------------------------------------------------------------------------------------

/// Runs the self-test against a fresh server using the store at `store_url`, on a
/// runtime of its own; `--self-test` and `cargo test` both call this.
fn self_test_blocking(store_url: &str) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the Tokio runtime: {e}"))?;
    runtime.block_on(self_test(store_url))
}

/// Serves the app on a free loopback port, runs the checks against it, shuts it down.
async fn self_test(store_url: &str) -> Result<(), String> {
    let store = store_from_url(store_url).await?;
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("cannot bind a loopback port: {e}"))?;
    let addr = listener.local_addr().map_err(|e| format!("cannot read the listen address: {e}"))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app(store, AppState::new(false)))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    println!("self-test: serving on http://{addr} (store: {})", oncely_stores::redacted(store_url));

    let result = checks(TestClient::new(addr)).await;

    let _ = stop.send(());
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(format!("server error: {e}")),
        Ok(Err(e)) => return Err(format!("server task failed: {e}")),
        Err(_) => return Err("the server did not shut down within 5 s".to_owned()),
    }
    result
}

/// `return Err(...)` with a formatted message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($message:tt)+) => {
        if !$cond {
            return Err(format!($($message)+));
        }
    };
}

const ALICE: &str = "Bearer sk_test_alice";
const BOB: &str = "Bearer sk_test_bob";
const CHARGE: &str = r#"{"amount": 1999, "currency": "eur"}"#;

async fn checks(client: TestClient) -> Result<(), String> {
    // 1. The first request with a key runs the handler: 201 and a new charge.
    let first = client.post("/payments", ALICE, Some("selftest-1"), CHARGE).await?;
    ensure!(first.status == StatusCode::CREATED, "first request: expected 201, got {first}");
    ensure!(!first.replayed(), "first request: marked replayed: {first}");
    let charge = first.json()?;
    let charge_id = charge["id"].as_str().ok_or_else(|| format!("first request: no charge id in {first}"))?.to_owned();
    ensure!(charge["idempotency_key"] == client.key("selftest-1").as_str(), "the handler did not see the key: {first}");
    println!("  ok  first request: 201, charge {charge_id}");

    // 2. The retry: the stored response, byte for byte, marked replayed.
    let retry = client.post("/payments", ALICE, Some("selftest-1"), CHARGE).await?;
    ensure!(retry.status == StatusCode::CREATED, "retry: expected 201, got {retry}");
    ensure!(retry.body == first.body, "retry: body differs:\n  first {first}\n  retry {retry}");
    ensure!(retry.replayed(), "retry: no `idempotent-replayed: true`: {retry}");
    ensure!(retry.header("content-type") == first.header("content-type"), "retry: content-type differs");
    // A client that re-serialises its JSON (other key order, other spacing) still matches.
    let reordered = client.post("/payments", ALICE, Some("selftest-1"), r#"{"currency":"eur","amount":1999}"#).await?;
    ensure!(reordered.replayed() && reordered.body == first.body, "re-serialised retry not replayed: {reordered}");
    println!("  ok  retries: identical body, idempotent-replayed: true");

    // 3. The same key with another body: 422 problem+json.
    let reused = client.post("/payments", ALICE, Some("selftest-1"), r#"{"amount": 5000, "currency": "eur"}"#).await?;
    ensure!(reused.status == StatusCode::UNPROCESSABLE_ENTITY, "reused key: expected 422, got {reused}");
    ensure!(reused.is_problem(), "reused key: not application/problem+json: {reused}");
    ensure!(reused.json()?["type"] == "urn:oncely:problem:key-reused", "reused key: wrong problem type: {reused}");
    println!("  ok  same key, other body: 422 application/problem+json");

    // 4. No key on a route that requires one: 400 problem+json.
    let missing = client.post("/payments", ALICE, None, CHARGE).await?;
    ensure!(missing.status == StatusCode::BAD_REQUEST, "missing key: expected 400, got {missing}");
    ensure!(missing.is_problem(), "missing key: not application/problem+json: {missing}");
    ensure!(missing.json()?["type"] == "urn:oncely:problem:missing-key", "missing key: wrong type: {missing}");
    println!("  ok  no key: 400 application/problem+json");

    // 5. A 4xx from the handler is stored and replayed like a success.
    let zero = r#"{"amount": 0, "currency": "eur"}"#;
    let invalid = client.post("/payments", ALICE, Some("selftest-zero"), zero).await?;
    ensure!(invalid.status == StatusCode::BAD_REQUEST && !invalid.replayed(), "amount 0: expected 400, got {invalid}");
    let invalid_again = client.post("/payments", ALICE, Some("selftest-zero"), zero).await?;
    ensure!(
        invalid_again.status == StatusCode::BAD_REQUEST
            && invalid_again.replayed()
            && invalid_again.body == invalid.body,
        "amount 0 retry: expected the stored 400 replayed, got {invalid_again}"
    );
    println!("  ok  amount 0: 400, stored and replayed");

    // 6. Keys are scoped by Authorization: Bob's "selftest-1" is not Alice's.
    let bob = client.post("/payments", BOB, Some("selftest-1"), CHARGE).await?;
    ensure!(bob.status == StatusCode::CREATED && !bob.replayed(), "another principal: expected a new 201, got {bob}");
    ensure!(bob.json()?["id"] != charge_id.as_str(), "another principal got Alice's charge: {bob}");
    println!("  ok  same key, another Authorization: a charge of its own");

    // 7. Ten concurrent duplicates: one runs, nine wait for it and replay its response.
    let before = client.charges_created().await?;
    let mut duplicates = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let client = client.clone();
        duplicates.spawn(async move { client.post("/payments", ALICE, Some("selftest-burst"), CHARGE).await });
    }
    let mut replies = Vec::new();
    while let Some(joined) = duplicates.join_next().await {
        replies.push(joined.map_err(|e| format!("a duplicate's task failed: {e}"))??);
    }
    for reply in &replies {
        ensure!(reply.status == StatusCode::CREATED, "duplicate: expected 201, got {reply}");
        ensure!(reply.body == replies[0].body, "duplicates disagree:\n  {reply}\n  {}", replies[0]);
    }
    let executed = replies.iter().filter(|r| !r.replayed()).count();
    ensure!(executed == 1, "10 duplicates: {executed} ran, expected 1");
    let after = client.charges_created().await?;
    ensure!(after == before + 1, "10 duplicates created {} charges, expected 1", after - before);
    println!("  ok  10 concurrent duplicates: 1 charge, 9 replays");

    // 8. Refunds are covered too: a retried refund refunds once.
    let refunds = format!("/payments/{charge_id}/refunds");
    let refund = client.post(&refunds, ALICE, Some("selftest-refund"), r#"{"amount": 500}"#).await?;
    ensure!(refund.status == StatusCode::CREATED && !refund.replayed(), "refund: expected 201, got {refund}");
    let refund_retry = client.post(&refunds, ALICE, Some("selftest-refund"), r#"{"amount": 500}"#).await?;
    ensure!(refund_retry.replayed() && refund_retry.body == refund.body, "refund retry not replayed: {refund_retry}");
    let list = client.get("/payments").await?.json()?;
    ensure!(list["refunds_created"] == 1, "a retried refund refunded twice: {list}");
    println!("  ok  refund and its retry: 1 refund");

    // 9. GET is not covered: no key needed, nothing stored.
    let listing = client.get("/payments").await?;
    ensure!(listing.status == StatusCode::OK && !listing.replayed(), "GET /payments: expected 200, got {listing}");
    ensure!(listing.json()?["charges_created"] == 3, "expected 3 charges (Alice, Bob, the burst): {listing}");
    println!("  ok  GET /payments without a key: 200, 3 charges in all");
    Ok(())
}

/// A small HTTP/1.1 client for the self-test (hyper-util's pooled client).
#[derive(Clone)]
struct TestClient {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    base: String,
    /// Put before every key sent: a durable or shared store still holds the records of
    /// earlier runs, which this run's first requests must not replay.
    run: String,
}

/// A response, read whole.
struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: bytes::Bytes,
}

impl TestClient {
    fn new(addr: SocketAddr) -> Self {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let run = format!("{:x}-{}", started.as_nanos(), std::process::id());
        Self { client, base: format!("http://{addr}"), run }
    }

    /// The key sent for `key` in this run.
    fn key(&self, key: &str) -> String {
        format!("{}-{key}", self.run)
    }

    async fn post(&self, path: &str, authorization: &str, key: Option<&str>, json: &str) -> Result<Reply, String> {
        let mut request = axum::http::Request::post(format!("{}{path}", self.base))
            .header(header::AUTHORIZATION, authorization)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            request = request.header("idempotency-key", self.key(key));
        }
        self.send(request, json.to_owned()).await
    }

    async fn get(&self, path: &str) -> Result<Reply, String> {
        self.send(axum::http::Request::get(format!("{}{path}", self.base)), String::new()).await
    }

    async fn charges_created(&self) -> Result<u64, String> {
        let list = self.get("/payments").await?.json()?;
        list["charges_created"].as_u64().ok_or_else(|| format!("GET /payments: no charges_created in {list}"))
    }

    async fn send(&self, request: axum::http::request::Builder, body: String) -> Result<Reply, String> {
        use http_body_util::BodyExt as _;

        let request = request.body(http_body_util::Full::from(body)).map_err(|e| format!("bad request: {e}"))?;
        let (method, uri) = (request.method().clone(), request.uri().clone());
        // Every call is bounded, so a hang fails the self-test instead of blocking it.
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| format!("{method} {uri}: {e}"))?;
            let (head, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| format!("{method} {uri}: reading the body: {e}"))?;
            Ok::<_, String>(Reply { status: head.status, headers: head.headers, body: body.to_bytes() })
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| format!("{method} {uri}: no answer within 10 s"))?
    }
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    fn is_problem(&self) -> bool {
        self.header("content-type") == Some("application/problem+json")
    }

    fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("not JSON ({e}): {self}"))
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let replayed = if self.replayed() { " (replayed)" } else { "" };
        write!(f, "{}{replayed} {}", self.status, String::from_utf8_lossy(&self.body))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn self_test_passes() {
        super::self_test_blocking(super::DEFAULT_STORE).expect("self test");
    }

    /// A durable store, opened from its URL like any other; run twice on one file, since
    /// a durable store still holds the first run's records.
    #[test]
    fn self_test_passes_on_sqlite_twice() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}?durability=relaxed", dir.path().join("payments.db").display());
        super::self_test_blocking(&url).expect("self test on sqlite");
        super::self_test_blocking(&url).expect("self test again on the same file");
    }

    #[test]
    fn the_store_comes_from_the_flag_or_the_default() {
        let args = |list: &[&str]| list.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let parsed = super::parse_args(args(&[]), "sqlite://env.db".into()).expect("no flags");
        assert_eq!(parsed.store, "sqlite://env.db");
        let parsed = super::parse_args(args(&["--store", "redis://h:1"]), "sqlite://env.db".into()).expect("--store");
        assert_eq!(parsed.store, "redis://h:1");
    }

    #[tokio::test]
    async fn bad_store_urls_name_the_option() {
        assert!(super::store_from_url("memory://").await.is_ok());
        let bad = super::store_from_url("memory://?max_entries=none").await.err().unwrap_or_default();
        assert!(bad.contains("max_entries"), "the error names the option: {bad}");
        let unknown = super::store_from_url("mysql://db").await.err().unwrap_or_default();
        assert!(unknown.contains("sqlite://"), "the error names the stores that exist: {unknown}");
    }
}
