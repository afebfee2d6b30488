//! TLS to PostgreSQL (`sslmode`, `sslrootcert`, `sslcert`, `sslkey` in the store URL),
//! against real servers with `ssl=on` and certificates from the testkit's throwaway CA:
//! the conformance suite over `sslmode=verify-full`, mutual TLS, and each refused
//! connection told by its cause.

mod common;

use std::path::Path;

use oncely::StoreError;
use oncely_postgres::{PostgresStore, PostgresUrl};
use oncely_testkit::postgres::PostgresServer;
use oncely_testkit::tls::{ClientAuth, Pki};
use sqlx_core::query_scalar::query_scalar;
use tokio::sync::OnceCell;

/// `url` without its query, and `query` instead.
fn with_query(url: &str, query: &str) -> String {
    let base = url.split_once('?').map_or(url, |(base, _)| base);
    format!("{base}?{query}")
}

/// `sslmode=verify-full&sslrootcert=CA`.
fn verify_full(ca: &Path) -> String {
    format!("sslmode=verify-full&sslrootcert={}", ca.display())
}

/// A database of this process's own on the shared TLS server, as a URL that verifies
/// the server's certificate and name.
async fn verified_database() -> &'static str {
    static URL: OnceCell<String> = OnceCell::const_new();
    URL.get_or_init(|| async {
        let server = PostgresServer::shared_tls().await;
        let ca = server.ca_file().expect("a TLS server has a CA");
        with_query(&server.fresh_database().await, &verify_full(&ca))
    })
    .await
}

/// An empty store on a table of its own, over verified TLS.
async fn verified_store() -> PostgresStore {
    PostgresStore::connect(verified_database().await, common::fresh_options()).await.expect("connects over TLS")
}

mod conformance {
    oncely_testkit::store_conformance!(super::verified_store());
}

/// Whether the store's connection is encrypted, by the server's own account.
async fn encrypted(store: &PostgresStore) -> bool {
    query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(store.pool())
        .await
        .expect("pg_stat_ssl")
}

/// Opening a store at `url` fails as unavailable; its message.
async fn refused(url: &str) -> String {
    let store = url.parse::<PostgresUrl>().expect("a valid URL").open().await;
    match store {
        Ok(_) => panic!("{url} connected"),
        Err(error @ StoreError::Unavailable(_)) => error.to_string(),
        Err(other) => panic!("{url}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_is_encrypted_and_disable_is_not() {
    let store = verified_store().await;
    assert!(encrypted(&store).await, "verify-full connects over TLS");

    let plain = PostgresServer::shared().await.fresh_database().await;
    let store = PostgresStore::connect(&with_query(&plain, "sslmode=disable"), common::fresh_options())
        .await
        .expect("sslmode=disable connects to a plain-text server");
    assert!(!encrypted(&store).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_from_an_unknown_ca_is_refused() {
    let server = PostgresServer::shared_tls().await;
    let stranger = Pki::new();
    let (_, other_ca) = stranger.untrusted_server_cert();
    let message = refused(&with_query(server.url(), &verify_full(&other_ca))).await;
    assert!(message.contains("invalid peer certificate: UnknownIssuer"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_for_another_name_is_refused_by_verify_full_only() {
    let pki = Pki::new();
    let other = pki.server_cert("other", &["other.example"]);
    let server = PostgresServer::start_tls(&pki, &other, ClientAuth::Optional).await;
    let message = refused(&with_query(server.url(), &verify_full(&pki.ca_file()))).await;
    assert!(message.contains("certificate not valid for name \"127.0.0.1\""), "{message}");
    assert!(message.contains("other.example"), "{message}");

    // verify-ca checks the chain, not the name.
    let url = with_query(server.url(), &format!("sslmode=verify-ca&sslrootcert={}", pki.ca_file().display()));
    let store = PostgresStore::connect(&url, common::fresh_options()).await.expect("verify-ca ignores the name");
    assert!(encrypted(&store).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn require_refuses_a_server_without_tls() {
    let plain = PostgresServer::shared().await.url();
    let message = refused(&with_query(plain, "sslmode=require")).await;
    assert!(message.contains("server does not support TLS"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_takes_the_client_certificate_and_refuses_a_client_without_one() {
    let pki = Pki::new();
    let server = PostgresServer::start_tls(&pki, &pki.server, ClientAuth::Required).await;
    let client = format!("&sslcert={}&sslkey={}", pki.client.cert.display(), pki.client.key.display());
    let url = with_query(server.url(), &(verify_full(&pki.ca_file()) + &client));
    let store = PostgresStore::connect(&url, common::fresh_options()).await.expect("a client with a certificate");
    assert!(encrypted(&store).await);

    let message = refused(&with_query(server.url(), &verify_full(&pki.ca_file()))).await;
    assert!(message.contains("connection requires a valid client certificate"), "{message}");
}
