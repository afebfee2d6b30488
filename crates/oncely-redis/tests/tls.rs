//! TLS (`rediss://`, `rediss+cluster://`) against real TLS-only `redis-server` processes
//! with certificates from the testkit's throwaway CA: the conformance suite on a standalone
//! server and on a 3-master cluster, mutual TLS, and every refused handshake told by its
//! cause (never a fall back to plain text).

use std::path::Path;
use std::time::Duration;

use oncely::{ClaimOutcome, Store};
use oncely_redis::{OpenError, RedisStore};
use oncely_testkit::redis::{ClientAuth, RedisCluster, RedisServer};
use oncely_testkit::tls::Pki;
use oncely_testkit::{claim_request, unique_key};

/// A store on the TLS `url` trusting `ca_file`, under a fresh prefix.
async fn store_at(url: String, ca_file: Option<std::path::PathBuf>) -> RedisStore {
    let prefix = oncely::IdempotencyKey::uuid_v4().as_str().replace('-', "");
    let ca = ca_file.map(|ca| format!("&ca_file={}", ca.display())).unwrap_or_default();
    RedisStore::open(&format!("{url}?prefix=t{prefix}{ca}")).await.expect("the store connects over TLS")
}

mod standalone {
    use oncely_testkit::redis::RedisServer;
    oncely_testkit::store_conformance!(super::store_at(
        RedisServer::shared_tls().url(),
        RedisServer::shared_tls().ca_file()
    ));
}

mod cluster {
    use oncely_testkit::redis::RedisCluster;
    // The two load cases run on the plain cluster; TLS changes nothing they measure.
    oncely_testkit::store_conformance!(
        super::store_at(RedisCluster::shared_tls().url(), RedisCluster::shared_tls().nodes()[0].ca_file()),
        max_payload = 1 << 20,
        load_cases = false
    );
}

/// `url` with its options.
fn with(url: &str, options: &[(&str, &Path)]) -> String {
    let query: Vec<String> = options.iter().map(|(name, path)| format!("{name}={}", path.display())).collect();
    format!("{url}?{}", query.join("&"))
}

/// Opening `url` fails with a TLS handshake error; its message.
async fn refused(url: &str) -> String {
    match RedisStore::open(url).await {
        Ok(_) => panic!("{url} connected"),
        Err(error @ OpenError::Tls { .. }) => error.to_string(),
        Err(other) => panic!("{url}: not a TLS error: {other:?}"),
    }
}

/// One claim: the connection carries commands.
async fn claims(store: &RedisStore) {
    let key = unique_key();
    let outcome = store.claim(&claim_request(&key, None, Duration::from_secs(5))).await.expect("claim");
    assert!(matches!(outcome, ClaimOutcome::Acquired { .. }), "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_takes_the_client_certificate_and_refuses_a_client_without_one() {
    let pki = Pki::new();
    let server = RedisServer::start_tls(&pki, &pki.server, ClientAuth::Required, &[]);
    let ca = pki.ca_file();
    let url = with(&server.url(), &[("ca_file", &ca), ("cert_file", &pki.client.cert), ("key_file", &pki.client.key)]);
    let store = RedisStore::open(&url).await.expect("a client with a certificate connects");
    claims(&store).await;

    let message = refused(&with(&server.url(), &[("ca_file", &ca)])).await;
    assert!(message.contains("client certificate"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_from_an_unknown_ca_is_refused() {
    let pki = Pki::new();
    let (untrusted, _) = pki.untrusted_server_cert();
    let server = RedisServer::start_tls(&pki, &untrusted, ClientAuth::Optional, &[]);
    let message = refused(&with(&server.url(), &[("ca_file", &pki.ca_file())])).await;
    assert!(message.contains("certificate verify failed: UnknownIssuer"), "{message}");
    // The platform's roots do not know the test CA either.
    let message = refused(&server.url()).await;
    assert!(message.contains("certificate verify failed: UnknownIssuer"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_certificate_is_refused() {
    let pki = Pki::new();
    let server = RedisServer::start_tls(&pki, &pki.expired_server_cert(), ClientAuth::Optional, &[]);
    let message = refused(&with(&server.url(), &[("ca_file", &pki.ca_file())])).await;
    assert!(message.contains("certificate verify failed: Expired"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_for_another_name_is_refused() {
    let pki = Pki::new();
    let other = pki.server_cert("other", &["other.example"]);
    let server = RedisServer::start_tls(&pki, &other, ClientAuth::Optional, &[]);
    let message = refused(&with(&server.url(), &[("ca_file", &pki.ca_file())])).await;
    assert!(message.contains("certificate verify failed: NotValidForName"), "{message}");
    assert!(message.contains("other.example"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_text_server_behind_rediss_is_refused() {
    let pki = Pki::new();
    let plain = RedisServer::shared().url().replacen("redis://", "rediss://", 1);
    let message = refused(&with(&plain, &[("ca_file", &pki.ca_file())])).await;
    assert!(message.contains("does not speak TLS"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_cluster_names_the_cause_too() {
    let cluster = RedisCluster::shared_tls();
    // Trusting another CA only: the cluster's certificates are from an unknown issuer.
    let stranger = Pki::new();
    let (_, other_ca) = stranger.untrusted_server_cert();
    let message = refused(&with(&cluster.url(), &[("ca_file", &other_ca)])).await;
    assert!(message.contains("certificate verify failed: UnknownIssuer"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreadable_certificate_files_are_named() {
    let server = RedisServer::shared_tls();
    let missing = Path::new("/nonexistent/ca.pem");
    let error = RedisStore::open(&with(&server.url(), &[("ca_file", missing)])).await.expect_err("no such file");
    assert!(matches!(error, OpenError::TlsFiles(_)), "{error:?}");
    assert!(error.to_string().contains("ca_file /nonexistent/ca.pem"), "{error}");
}

/// Replays carry stored responses: a `rediss://` primary refuses a plain-text replica
/// before connecting to either.
#[tokio::test(flavor = "multi_thread")]
async fn a_tls_primary_refuses_a_plain_text_replica() {
    let server = RedisServer::shared_tls();
    let ca = server.ca_file().expect("a TLS server has a CA");
    let url = format!("{}?ca_file={}&replica={}", server.url(), ca.display(), RedisServer::shared().url());
    let error = RedisStore::open(&url).await.expect_err("a plain replica is refused");
    assert!(matches!(error, OpenError::InvalidUrl(_)), "{error:?}");
    assert!(error.to_string().contains("needs a rediss:// replica"), "{error}");
}
