//! TLS, black-box, with certificates from a throwaway CA (`oncely_testkit::tls`): an
//! `https://` upstream (HTTP/2 by ALPN, or HTTP/1.1), verified against `--upstream-ca-file`,
//! with a client certificate when it asks for one; an upstream whose certificate is
//! untrusted, expired, for another host, or that speaks plain text gets a 502 naming the
//! cause and is never sent the request; the gateway's own HTTPS listeners, and their
//! certificates replaced on SIGHUP and on a file change.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use oncely_testkit::tls::{CertFiles, Pki};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use tokio::net::TcpListener;
use tower::ServiceExt;

use support::*;

const CONFIG: &str = r#"
[[routes]]
path = "/payments"
required = true
"#;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path).expect("read certs").collect::<Result<_, _>>().expect("certs")
}

fn roots(ca: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(ca) {
        roots.add(cert).expect("root");
    }
    roots
}

/// An `https://` upstream on loopback serving the shared test routes plus `/version`
/// (the HTTP version it was reached with) over `cert`, offering `alpn`; requiring a
/// client certificate from `client_ca` when given.
async fn start_tls_upstream(cert: &CertFiles, alpn: &[&[u8]], client_ca: Option<&Path>) -> (SocketAddr, Shared) {
    start_tls_upstream_at(0, cert, alpn, client_ca).await
}

/// A free loopback port, for an upstream that starts after the gateway.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// [`start_tls_upstream`] on `port` (0: any).
async fn start_tls_upstream_at(
    port: u16,
    cert: &CertFiles,
    alpn: &[&[u8]],
    client_ca: Option<&Path>,
) -> (SocketAddr, Shared) {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)), provider())
                .build()
                .expect("client verifier"),
        ),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs(&cert.cert), PrivateKeyDer::from_pem_file(&cert.key).expect("key"))
        .expect("server config");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let shared = Shared::default();
    let app: Router = upstream_app(shared.clone()).route(
        "/version",
        axum::routing::post(|request: Request| async move {
            let proto =
                request.headers().get("x-forwarded-proto").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            format!("{:?} {proto}", request.version())
        }),
    );
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else { return };
                let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    app.clone().oneshot(request.map(axum::body::Body::new))
                });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    (addr, shared)
}

/// A gateway (memory store, [`CONFIG`]) in front of `https://127.0.0.1:PORT`, trusting
/// `ca` only.
async fn gateway_to_https(port: u16, ca: &Path) -> (Gateway, tempfile::TempDir) {
    let ca = ca.to_str().expect("path");
    start_gateway(&format!("https://127.0.0.1:{port}"), "memory://", CONFIG, &["--upstream-ca-file", ca]).await
}

/// A client that trusts only `ca`.
fn https_client(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).expect("ca");
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("ca pem")])
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

async fn post(client: &reqwest::Client, url: &str, key: &str) -> reqwest::Response {
    client
        .post(url)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .expect("the gateway answers")
}

async fn problem(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let json: Value = response.json().await.expect("problem json");
    (status, json["type"].as_str().unwrap_or("").to_string(), json["detail"].as_str().unwrap_or("").to_string())
}

#[tokio::test]
async fn an_https_upstream_is_verified_and_spoken_to_over_h2_or_http1() {
    let pki = Pki::new();
    let ca = pki.ca_file();
    for (alpn, version) in
        [(&[b"h2".as_slice(), b"http/1.1"][..], "HTTP/2.0"), (&[b"http/1.1".as_slice()][..], "HTTP/1.1")]
    {
        let (addr, upstream) = start_tls_upstream(&pki.server, alpn, None).await;
        let (gw, _dir) = gateway_to_https(addr.port(), &ca).await;
        let first = send_post(&gw, "/payments", Some("tls-1"), "{}").await;
        assert_eq!(first.status(), 201);
        let body = first.text().await.expect("body");
        let again = send_post(&gw, "/payments", Some("tls-1"), "{}").await;
        assert_eq!(again.status(), 201);
        assert!(replayed(&again));
        assert_eq!(again.text().await.expect("body"), body);
        assert_eq!(upstream.calls.load(Ordering::SeqCst), 1, "one execution");
        let seen = send_post(&gw, "/version", None, "{}").await.text().await.expect("version");
        assert_eq!(seen, format!("{version} http"), "ALPN {alpn:?}");
    }
}

#[tokio::test]
async fn an_upstream_asking_for_a_client_certificate_gets_the_configured_one() {
    let pki = Pki::new();
    let (addr, upstream) = start_tls_upstream(&pki.server, &[b"h2", b"http/1.1"], Some(&pki.ca_file())).await;
    let url = format!("https://localhost:{}", addr.port());
    let ca = pki.ca_file();
    let ca = ca.to_str().expect("path");

    // Without one, the gateway does not start: under TLS 1.3 the refusal comes after the
    // client's handshake, so a request would only learn of it once written.
    let (code, err) = serve_and_exit(&url, &["--upstream-ca-file", ca]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("CertificateRequired"), "{err}");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 0);

    let cert = pki.client.cert.to_str().expect("path");
    let key = pki.client.key.to_str().expect("path");
    let (with, _d2) = start_gateway(
        &url,
        "memory://",
        CONFIG,
        &["--upstream-ca-file", ca, "--upstream-client-cert-file", cert, "--upstream-client-key-file", key],
    )
    .await;
    assert_eq!(send_post(&with, "/payments", Some("m-1"), "{}").await.status(), 201);
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
}

/// `oncely serve` in front of `upstream` with `extra` flags, expected to exit: its exit
/// code and standard error.
async fn serve_and_exit(upstream: &str, extra: &[&str]) -> (Option<i32>, String) {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncely"))
        .args(["serve", "--upstream", upstream, "--listen", "127.0.0.1:0", "--store", "memory://"])
        .args(extra)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), run).await.expect("oncely exits").expect("oncely runs");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Each broken upstream: the gateway refuses to start, naming the cause; and when the
/// upstream turns bad after the start, 502 `upstream-unreachable` naming the cause,
/// nothing sent, and the key released (the same key gets the same 502 again, never a
/// stored answer).
#[tokio::test]
async fn a_bad_upstream_certificate_or_a_plain_server_is_named_and_nothing_is_sent() {
    let pki = Pki::new();
    let ca = pki.ca_file();
    let (untrusted, _) = pki.untrusted_server_cert();
    // What the operator is told at start, in full; what a client is told, its kind only
    // (never the certificate's names: they may be internal hosts).
    let cases = [
        ("untrusted", untrusted, "UnknownIssuer", "not from a trusted CA"),
        ("expired", pki.expired_server_cert(), "certificate expired", "has expired"),
        (
            "other host",
            pki.server_cert("other", &["other.example"]),
            "not valid for name",
            "not valid for its host name",
        ),
    ];
    for (what, cert, cause, kind_of_failure) in cases {
        let (addr, _first) = start_tls_upstream(&cert, &[b"http/1.1"], None).await;
        let url = format!("https://127.0.0.1:{}", addr.port());
        let (code, err) = serve_and_exit(&url, &["--upstream-ca-file", ca.to_str().expect("path")]).await;
        assert_eq!(code, Some(1), "{what}: {err}");
        assert!(err.contains(cause), "{what}: {err}");

        // Started while the upstream is down; the bad one comes up afterwards.
        let port = free_port();
        let (gw, _dir) = gateway_to_https(port, &ca).await;
        let (_, upstream) = start_tls_upstream_at(port, &cert, &[b"http/1.1"], None).await;
        for _ in 0..2 {
            let (status, kind, detail) = problem(send_post(&gw, "/payments", Some("bad"), "{}").await).await;
            assert_eq!((status, kind.as_str()), (502, "urn:oncely:problem:upstream-unreachable"), "{what}");
            assert!(detail.contains(kind_of_failure) && detail.contains("not sent"), "{what}: {detail}");
            assert!(!detail.contains("other.example"), "{what}: no certificate names in a client's detail: {detail}");
        }
        assert_eq!(upstream.calls.load(Ordering::SeqCst), 0, "{what}: nothing reached the upstream");
    }

    // A plain-text server behind an https:// URL: never a fallback to plain text.
    let (addr, _plain) = start_upstream().await;
    let (code, err) = serve_and_exit(&format!("https://127.0.0.1:{}", addr.port()), &[]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not a TLS server"), "{err}");
    let port = free_port();
    let (gw, _dir) = gateway_to_https(port, &ca).await;
    let upstream = Shared::default();
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    tokio::spawn(axum::serve(listener, upstream_app(upstream.clone())).into_future());
    let (status, kind, detail) = problem(send_post(&gw, "/payments", Some("plain"), "{}").await).await;
    assert_eq!((status, kind.as_str()), (502, "urn:oncely:problem:upstream-unreachable"));
    assert!(detail.contains("does not speak TLS"), "{detail}");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 0, "the plain server got no request");
}

/// An HTTP/2 upstream that starts asking for a client certificate after the gateway
/// started. Under TLS 1.3 the refusal comes after the client's handshake, and it races
/// the request: when it wins, hyper gives the request back unsent and the key is
/// released (502 `upstream-unreachable`); when the request was written first, the
/// connection breaks under it and the outcome is unknown (502 `outcome-unknown`, the key
/// held). Both runs happen on loopback. What never happens is the request running.
#[tokio::test]
async fn a_client_certificate_refused_at_run_time_never_runs_the_request() {
    let pki = Pki::new();
    let port = free_port();
    let (gw, _dir) = gateway_to_https(port, &pki.ca_file()).await;
    let (_, upstream) = start_tls_upstream_at(port, &pki.server, &[b"h2"], Some(&pki.ca_file())).await;
    for attempt in 0..4 {
        let key = format!("needs-cert-{attempt}");
        let (status, kind, detail) = problem(send_post(&gw, "/payments", Some(&key), "{}").await).await;
        assert_eq!(status, 502, "{detail}");
        assert!(
            kind == "urn:oncely:problem:upstream-unreachable" || kind == "urn:oncely:problem:outcome-unknown",
            "{kind}: {detail}"
        );
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 0);
}

/// An upstream that accepts TCP and never answers the TLS handshake: 502 after the
/// connector's bound (10 s), the key released, nothing held open until the upstream
/// timeout.
#[tokio::test]
async fn an_upstream_that_never_answers_the_handshake_is_unreachable_not_unknown() {
    let pki = Pki::new();
    let port = free_port();
    let (gw, _dir) = start_gateway(
        &format!("https://127.0.0.1:{port}"),
        "memory://",
        CONFIG,
        &["--upstream-ca-file", pki.ca_file().to_str().expect("path"), "--upstream-timeout", "60s"],
    )
    .await;
    let silent = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let started = tokio::time::Instant::now();
    let (status, kind, detail) = problem(send_post(&gw, "/payments", Some("silent"), "{}").await).await;
    assert_eq!((status, kind.as_str()), (502, "urn:oncely:problem:upstream-unreachable"), "{detail}");
    assert!(started.elapsed() < Duration::from_secs(30), "bounded by the connector, not the 60 s timeout");
    held.abort();
}

/// The serial of the certificate a TLS server on `addr` presents, verified against `ca`.
async fn served_cert(addr: SocketAddr, ca: &Path) -> Option<CertificateDer<'static>> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots(ca))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let tls = connector.connect(ServerName::try_from("localhost").expect("name"), stream).await.ok()?;
    tls.get_ref().1.peer_certificates().and_then(|c| c.first().cloned()).map(|c| c.into_owned())
}

fn addr_of(url: &str) -> SocketAddr {
    url.rsplit("://").next().expect("host:port").parse().expect("addr")
}

#[tokio::test]
async fn the_listeners_serve_https_and_tell_the_upstream() {
    let pki = Pki::new();
    let (addr, upstream) = start_upstream().await;
    let admin = pki.server_cert("admin", &["localhost"]);
    let config = format!(
        "{CONFIG}\n[listen]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n\n[admin]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        pki.server.cert, pki.server.key, admin.cert, admin.key
    );
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", &config, &[]).await;
    assert!(gw.url.starts_with("https://") && gw.admin.starts_with("https://"), "{} {}", gw.url, gw.admin);
    let client = https_client(&pki.ca_file());
    let url = gw.url.replace("127.0.0.1", "localhost");
    let first = post(&client, &format!("{url}/payments"), "h-1").await;
    assert_eq!(first.status(), 201);
    assert!(!replayed(&first));
    let again = post(&client, &format!("{url}/payments"), "h-1").await;
    assert!(replayed(&again));
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
    let echoed: Value = post(&client, &format!("{url}/echo"), "h-2").await.json().await.expect("echo");
    assert_eq!(echoed["x-forwarded-proto"], "https");
    assert!(echoed["forwarded"].as_str().is_some_and(|f| f.contains("proto=https")), "{echoed}");

    let health =
        client.get(format!("{}/healthz", gw.admin.replace("127.0.0.1", "localhost"))).send().await.expect("admin");
    assert_eq!(health.status(), 200);
    assert_eq!(served_cert(addr_of(&gw.admin), &pki.ca_file()).await, Some(certs(&admin.cert).remove(0)));

    // A plain-text client on the HTTPS port gets no HTTP answer.
    let plain = reqwest::Client::new().post(format!("http://{}/payments", addr_of(&gw.url))).send().await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() == 400), "no plain-text answer from the proxy");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1, "the echo does not count");
}

/// Copies `from` over the listener's files, through a temporary file and a rename, as
/// certificate tools do.
fn install(from: &CertFiles, to: &CertFiles) {
    for (source, target) in [(&from.cert, &to.cert), (&from.key, &to.key)] {
        let temporary = target.with_extension("new");
        std::fs::copy(source, &temporary).expect("copy");
        std::fs::rename(&temporary, target).expect("rename");
    }
}

/// Polls the served certificate (a TLS handshake each time) until it is `want`.
async fn await_cert(addr: SocketAddr, ca: &Path, want: &CertificateDer<'static>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while served_cert(addr, ca).await.as_ref() != Some(want) {
        assert!(tokio::time::Instant::now() < deadline, "the new certificate is served within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_rotated_certificate_is_served_after_sighup_or_a_file_change() {
    let pki = Pki::new();
    let (addr, _upstream) = start_upstream().await;
    let live = CertFiles { cert: pki.dir().join("live.pem"), key: pki.dir().join("live.key") };
    install(&pki.server, &live);
    let config = format!("{CONFIG}\n[listen]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n", live.cert, live.key);
    let (gw, _dir) = start_gateway(&format!("http://{addr}"), "memory://", &config, &[]).await;
    let listen = addr_of(&gw.url);
    let ca = pki.ca_file();
    assert_eq!(served_cert(listen, &ca).await, Some(certs(&pki.server.cert).remove(0)));

    // A file change: the next check picks it up.
    let second = pki.server_cert("second", &["localhost", "127.0.0.1"]);
    install(&second, &live);
    await_cert(listen, &ca, &certs(&second.cert).remove(0)).await;

    // A broken pair (the key of another certificate) is refused; the last good one stays.
    let third = pki.server_cert("third", &["localhost", "127.0.0.1"]);
    std::fs::copy(&third.cert, &live.cert).expect("copy");
    let pid = gw.child.id().expect("pid").to_string();
    let hup = std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill");
    assert!(hup.success());
    // Serving still works, with the second certificate (checked repeatedly: the reload
    // attempt happens at some point in this window, and must never break serving).
    for _ in 0..5 {
        assert_eq!(served_cert(listen, &ca).await, Some(certs(&second.cert).remove(0)));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGHUP after the pair is whole again.
    std::fs::copy(&third.key, &live.key).expect("copy");
    let hup = std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill");
    assert!(hup.success());
    await_cert(listen, &ca, &certs(&third.cert).remove(0)).await;
}

#[tokio::test]
async fn listener_certificate_errors_are_named_at_start() {
    let pki = Pki::new();
    let (addr, _upstream) = start_upstream().await;
    let run = |config: String, upstream: String| async move {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("oncely.toml");
        std::fs::write(&path, config).expect("write");
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncely"))
            .args(["serve", "--upstream", &upstream, "--listen", "127.0.0.1:0", "--store", "memory://"])
            .arg("--config")
            .arg(&path)
            .output()
            .await
            .expect("oncely runs");
        (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let plain = format!("http://{addr}");
    let (code, err) = run(format!("[listen]\ntls_cert_file = {:?}\n", pki.server.cert), plain.clone()).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("listen.tls_key_file") && err.contains("needed with"), "{err}");

    let (code, err) = run(
        format!("[listen]\ntls_cert_file = \"/nonexistent/cert.pem\"\ntls_key_file = {:?}\n", pki.server.key),
        plain.clone(),
    )
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("listen.tls_cert_file") && err.contains("/nonexistent/cert.pem"), "{err}");

    let (code, err) =
        run(format!("[listen]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n", pki.server.cert, pki.client.key), plain)
            .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("does not fit"), "{err}");

    // An https:// upstream's CA file that holds no certificate (a key file).
    let (code, err) = run(format!("[upstream]\nca_file = {:?}\n", pki.server.key), format!("https://{addr}")).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("upstream.ca_file") && err.contains("no PEM certificate"), "{err}");
}
