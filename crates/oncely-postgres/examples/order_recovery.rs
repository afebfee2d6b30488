//! An order in three steps that survives a crash in the middle: reserve stock (a local
//! write), charge a payment provider over HTTP (an external call), confirm the order (a
//! local write). Each local step commits its writes together with a recovery point in one
//! transaction; the retry after a crash takes the order's key over and resumes from the
//! last committed step, so stock is reserved once, the card charged once and the order
//! confirmed once.
//!
//! The provider is a stub on loopback that, like Stripe, honours an `Idempotency-Key`
//! header: the charge step passes the order's key, so a crash after the charge and before
//! the step's commit (the one gap no transaction can close) repeats the call, not the
//! charge.
//!
//! Run it with `cargo run -p oncely-postgres --example order_recovery`. It uses the
//! database `ONCELY_POSTGRES_URL` names (it creates its own tables there), or else starts a
//! throwaway PostgreSQL server (the testkit's; needs `initdb` and `postgres`).

use std::collections::HashMap;
use std::error::Error;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::{Json, Router, routing::post};
use oncely::{Acquired, ConflictMode, IdempotencyKey, Oncely};
use oncely_postgres::{PgPool, PgTransaction, PostgresOptions, PostgresStore};
use serde::{Deserialize, Serialize};
// With the `sqlx` facade these are `sqlx::query` and `sqlx::query_scalar`.
use sqlx_core::query::query;
use sqlx_core::query_scalar::query_scalar;

/// The payment provider stub: one charge per idempotency key, however often it is asked.
#[derive(Default)]
struct Provider {
    calls: AtomicU32,
    charges: Mutex<HashMap<String, String>>,
}

#[derive(Deserialize, Serialize)]
struct ChargeRequest {
    amount_cents: i64,
}

#[derive(Deserialize, Serialize)]
struct Charge {
    id: String,
    amount_cents: i64,
}

async fn charge(
    State(provider): State<Arc<Provider>>,
    headers: HeaderMap,
    Json(req): Json<ChargeRequest>,
) -> Json<Charge> {
    provider.calls.fetch_add(1, SeqCst);
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let mut charges = provider.charges.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let next = charges.len() + 1;
    let id = charges.entry(key).or_insert_with(|| format!("ch_{next:04}")).clone();
    Json(Charge { id, amount_cents: req.amount_cents })
}

/// Where the first attempt "crashes" (the process dies: nothing after it runs, and its
/// claim is left to lapse).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Crash {
    Never,
    /// After step 1 committed.
    AfterReserving,
    /// After the provider charged the card, before step 2 recorded it.
    AfterChargingBeforeRecording,
}

/// What the order's key stores: the receipt every retry gets back.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Receipt {
    order: String,
    charge: String,
    status: String,
}

struct Shop {
    pool: PgPool,
    store: PostgresStore,
    oncely: Oncely<PostgresStore>,
    http: reqwest::Client,
    provider_url: String,
}

/// The recovery points, in order. Step 2's carries the charge id for step 3.
const STOCK_RESERVED: &str = "stock_reserved";
const CHARGED: &str = "charged:";

impl Shop {
    /// Places `order` for one unit of `sku` at `amount_cents`, exactly once per order id.
    async fn place_order(
        &self,
        order: &str,
        sku: &str,
        amount_cents: i64,
        crash: Crash,
    ) -> Result<Option<Receipt>, Box<dyn Error>> {
        let key = IdempotencyKey::new(order)?;
        let guard = match self.oncely.acquire(&key, None).await? {
            Acquired::Replay(replay) => {
                println!("  {order}: replayed, nothing done");
                return Ok(Some(serde_json::from_slice(&replay.payload)?));
            }
            Acquired::Execute(guard) => guard,
        };
        // What the transactional calls act for: the record and the claim id holding it.
        let claim = guard.claim();
        // Opens a step's transaction: the fence first (LeaseLost if another claim took
        // the order over), which also says where the last attempt got to.
        let begin = async || {
            let mut tx = self.pool.begin().await?;
            let locked = self.store.lock_claim(&mut tx, claim).await?;
            Ok::<_, Box<dyn Error>>((tx, locked))
        };

        let (mut tx, locked) = begin().await?;
        println!("  {order}: attempt {}, recovery point {:?}", locked.attempt, locked.recovery_point);
        let mut point = locked.recovery_point.unwrap_or_default();

        // Step 1, local: reserve the stock.
        if point.is_empty() {
            reserve(&mut tx, order, sku).await?;
            self.store.set_recovery_point(&mut tx, claim, STOCK_RESERVED).await?;
            tx.commit().await?;
            println!("  {order}: step 1 committed (stock reserved)");
            if crash == Crash::AfterReserving {
                println!("  {order}: CRASH after step 1");
                guard.abandon();
                return Ok(None);
            }
            point = STOCK_RESERVED.to_string();
            tx = begin().await?.0;
        }

        // Step 2, external: charge the card (idempotent at the provider: the order's key),
        // then record the charge id with the next recovery point.
        let charge_id = match point.strip_prefix(CHARGED) {
            Some(charge_id) => charge_id.to_string(),
            None => {
                // The transaction holds the order's lock; the call is made outside it.
                tx.rollback().await?;
                let charge: Charge = self
                    .http
                    .post(format!("{}/charges", self.provider_url))
                    .header("idempotency-key", order)
                    .json(&ChargeRequest { amount_cents })
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                println!("  {order}: provider charged {}", charge.id);
                if crash == Crash::AfterChargingBeforeRecording {
                    println!("  {order}: CRASH after the charge, before recording it");
                    guard.abandon();
                    return Ok(None);
                }
                let (mut record_tx, _) = begin().await?;
                query("UPDATE shop_orders SET charge_id = $2 WHERE order_id = $1")
                    .bind(order)
                    .bind(&charge.id)
                    .execute(&mut *record_tx)
                    .await?;
                let next = format!("{CHARGED}{}", charge.id);
                self.store.set_recovery_point(&mut record_tx, claim, &next).await?;
                record_tx.commit().await?;
                println!("  {order}: step 2 committed (charge recorded)");
                tx = begin().await?.0;
                charge.id
            }
        };

        // Step 3, local: confirm, and complete the key in the same transaction.
        query("UPDATE shop_orders SET status = 'confirmed' WHERE order_id = $1").bind(order).execute(&mut *tx).await?;
        let receipt = Receipt { order: order.to_string(), charge: charge_id, status: "confirmed".into() };
        let retention = self.oncely.config().retention;
        self.store.complete_in(&mut tx, claim, serde_json::to_vec(&receipt)?.into(), retention).await?;
        tx.commit().await?;
        guard.finished_elsewhere();
        println!("  {order}: step 3 committed (confirmed and completed)");
        Ok(Some(receipt))
    }
}

async fn reserve(tx: &mut PgTransaction<'_>, order: &str, sku: &str) -> Result<(), Box<dyn Error>> {
    let reserved = query("UPDATE shop_stock SET available = available - 1 WHERE sku = $1 AND available > 0")
        .bind(sku)
        .execute(&mut **tx)
        .await?;
    if reserved.rows_affected() != 1 {
        return Err(format!("{sku} is out of stock").into());
    }
    query("INSERT INTO shop_orders (order_id, sku, status) VALUES ($1, $2, 'reserved')")
        .bind(order)
        .bind(sku)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The database: `ONCELY_POSTGRES_URL`, or a throwaway server kept until the end.
async fn database() -> Result<(String, Option<oncely_testkit::postgres::PostgresServer>), Box<dyn Error>> {
    if let Ok(url) = std::env::var("ONCELY_POSTGRES_URL") {
        return Ok((url, None));
    }
    println!("ONCELY_POSTGRES_URL is not set: starting a throwaway PostgreSQL server");
    let server = oncely_testkit::postgres::PostgresServer::start().await;
    let url = server.fresh_database().await;
    Ok((url, Some(server)))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let (url, _server) = database().await?;
    // Tables of this run's own, so that the example can run again on the same database.
    let table = format!("order_keys_{}", std::process::id());
    let store = PostgresStore::connect(&url, PostgresOptions::default().table(&table)).await?;
    let pool = store.pool().clone();
    for ddl in [
        "DROP TABLE IF EXISTS shop_orders, shop_stock",
        "CREATE TABLE shop_stock (sku text PRIMARY KEY, available int NOT NULL CHECK (available >= 0))",
        "CREATE TABLE shop_orders (order_id text PRIMARY KEY, sku text NOT NULL, charge_id text, status text NOT NULL)",
        "INSERT INTO shop_stock VALUES ('kettle', 10)",
    ] {
        query(ddl).execute(&pool).await?;
    }

    let provider = Arc::new(Provider::default());
    let app = Router::new().route("/charges", post(charge)).with_state(provider.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let provider_url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    // A short lease, so that the retry after a crash waits only a moment; wait mode, so
    // that the retry waits for the lease to lapse instead of getting a conflict.
    let oncely = Oncely::builder(store.clone())
        .lease(Duration::from_millis(500))
        .conflict_mode(ConflictMode::Wait { timeout: Duration::from_secs(10) })
        .poll_interval(Duration::from_millis(50))
        .build()?;
    let shop = Shop { pool: pool.clone(), store, oncely, http: reqwest::Client::new(), provider_url };

    for (order, crash) in [
        ("order-1", Crash::Never),
        ("order-2", Crash::AfterReserving),
        ("order-3", Crash::AfterChargingBeforeRecording),
    ] {
        println!("{order}: first attempt (crash: {crash:?})");
        let first = shop.place_order(order, "kettle", 4999, crash).await?;
        assert_eq!(first.is_some(), crash == Crash::Never);
        println!("{order}: the client retries");
        let retry = shop.place_order(order, "kettle", 4999, Crash::Never).await?.expect("the retry finishes the order");
        assert_eq!(retry.status, "confirmed");
        println!("{order}: the client retries once more");
        let again = shop.place_order(order, "kettle", 4999, Crash::Never).await?.expect("a replay");
        assert_eq!(again, retry, "a completed order replays its receipt");
    }

    // Every order reserved one kettle, was charged once, and is confirmed once.
    let available: i32 = query_scalar("SELECT available FROM shop_stock WHERE sku = 'kettle'").fetch_one(&pool).await?;
    let confirmed: i64 =
        query_scalar("SELECT count(*) FROM shop_orders WHERE status = 'confirmed' AND charge_id IS NOT NULL")
            .fetch_one(&pool)
            .await?;
    let charges = provider.charges.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len();
    println!(
        "stock left {available} of 10; {confirmed} orders confirmed; {charges} charges from {} provider calls",
        provider.calls.load(SeqCst)
    );
    assert_eq!(available, 7, "three orders, three kettles: none reserved twice");
    assert_eq!(confirmed, 3);
    assert_eq!(charges, 3, "one charge per order, though order-3's charge call was made twice");
    assert_eq!(provider.calls.load(SeqCst), 4, "order-3's retry repeated the call the crash cut off");
    query("DROP TABLE shop_orders, shop_stock").execute(&pool).await?;
    query(sqlx_core::sql_str::AssertSqlSafe(format!("DROP TABLE {table}"))).execute(&pool).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn example_runs() {
        super::main().expect("example runs");
    }
}
