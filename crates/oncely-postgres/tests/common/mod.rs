//! Shared by the test files: a database per test process on the test server, and a
//! store on a table of its own per test.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use oncely_postgres::{PostgresOptions, PostgresStore};
use oncely_testkit::postgres::{PostgresServer, unique_name};
use sqlx_core::query_scalar::query_scalar;
use tokio::sync::OnceCell;

/// A database of this test process's own (created on first use).
pub async fn database_url() -> &'static str {
    static URL: OnceCell<String> = OnceCell::const_new();
    URL.get_or_init(|| async { PostgresServer::shared().await.fresh_database().await }).await
}

/// Options naming a table no other test uses.
pub fn fresh_options() -> PostgresOptions {
    PostgresOptions::default().table(unique_name("t")).max_connections(8)
}

/// An empty store on a table of its own.
pub async fn fresh_store() -> PostgresStore {
    PostgresStore::connect(database_url().await, fresh_options()).await.expect("the store connects")
}

/// Returns once a statement on `store`'s table waits for a lock, as the server sees it:
/// a test knows a contender is queued rather than guessing with a sleep.
pub async fn until_a_statement_on_waits_for_a_lock(store: &PostgresStore) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE wait_event_type = 'Lock' AND datname = current_database() AND query LIKE '%' || $1 || '%'",
        )
        .bind(store.table())
        .fetch_one(store.pool())
        .await
        .expect("pg_stat_activity");
        if waiting > 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no statement on {} queued on the lock", store.table());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
