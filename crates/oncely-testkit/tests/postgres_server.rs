//! The PostgreSQL test server starts, hands out fresh databases, and survives a restart.
#![cfg(feature = "postgres")]

use oncely_testkit::postgres::PostgresServer;
use sqlx_core::connection::Connection;
use sqlx_core::executor::Executor;
use sqlx_core::query_scalar::query_scalar;
use sqlx_postgres::PgConnection;

#[tokio::test]
async fn fresh_databases_are_empty_and_distinct() {
    let server = PostgresServer::shared().await;
    let (a, b) = (server.fresh_database().await, server.fresh_database().await);
    assert_ne!(a, b);
    let mut conn = PgConnection::connect(&a).await.expect("connect");
    conn.execute("CREATE TABLE t (x int)").await.expect("create");
    let mut other = PgConnection::connect(&b).await.expect("connect");
    let tables: i64 = query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = 't'")
        .fetch_one(&mut other)
        .await
        .expect("count");
    assert_eq!(tables, 0, "another database does not see the table");
    let fsync: String = query_scalar("SHOW fsync").fetch_one(&mut conn).await.expect("show");
    assert_eq!(fsync, "on");
}

#[tokio::test]
async fn a_stopped_server_refuses_and_a_restarted_one_keeps_committed_data() {
    let server = PostgresServer::start().await;
    let url = server.fresh_database().await;
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (7)").await.expect("write");
    server.stop();
    assert!(PgConnection::connect(&url).await.is_err(), "a stopped server refuses connections");
    server.start_again().await;
    let mut conn = PgConnection::connect(&url).await.expect("connect again");
    let x: i32 = query_scalar("SELECT x FROM t").fetch_one(&mut conn).await.expect("read");
    assert_eq!(x, 7, "a commit survives an immediate shutdown");
}
