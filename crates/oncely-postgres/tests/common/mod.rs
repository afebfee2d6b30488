//! Shared by the test files: a database per test process on the test server, and a
//! store on a table of its own per test.
#![allow(dead_code, unreachable_pub)]

use oncely_postgres::{PostgresOptions, PostgresStore};
use oncely_testkit::postgres::{PostgresServer, unique_name};
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
