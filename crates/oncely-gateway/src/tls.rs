//! TLS: the upstream client's (`https://` upstreams) and the listeners' (HTTPS).
//!
//! One stack for the whole gateway: rustls with the *ring* crypto provider, no OpenSSL.
//! The binary also links aws-lc-rs (the AWS SDK's provider), and with two providers in
//! the build rustls cannot pick a process default by itself; [`install_provider`] makes
//! ring the default at start, for the drivers that build their TLS configuration with
//! `ClientConfig::builder()` (the store crates install it themselves too).
//!
//! **Upstream** ([`UpstreamTls`]): the server certificate is verified against the
//! platform's root certificates (`rustls-native-certs`: the system store, such as
//! `/etc/ssl/certs` on Debian) or, when `ca_file` is set, against that bundle only: a
//! private CA is the usual reason to set one, and trusting the public roots as well
//! would let any public CA vouch for the private upstream. The name checked is the
//! upstream URL's host (SNI is sent for DNS names; an IP address must be in the
//! certificate's subject alternative names). ALPN offers `h2` and `http/1.1`.
//! `client_cert_file` and `client_key_file` present a client certificate (mutual TLS).
//! `insecure_skip_verify` accepts any certificate; it is logged as an error at start
//! ([`warn_insecure`]) and is for tests only. A connection, TCP and handshake together,
//! must be made within 10 s (the proxy's connector), so an upstream that accepts TCP and
//! never answers the handshake is a connect failure, not a request held open.
//!
//! At start, [`probe_upstream`] makes one handshake with an `https://` upstream and the
//! gateway refuses to start when it fails (the cause named in full). At run time a failed
//! handshake is a connect error: nothing was sent, 502 `upstream-unreachable`, the key
//! released; the log names the cause in full, the client's detail only its kind
//! ([`category`]: the certificate's names may be internal hosts). One failure cannot
//! always be told from an unknown outcome at run time: a TLS 1.3 server refuses a client
//! certificate only after the client's side of the handshake is done. When the refusal
//! arrives before the request was written, hyper gives the request back and the proxy
//! releases the key; when the request had been written, hyper reports a broken
//! connection and the outcome is unknown (502 `outcome-unknown`, the key held), although
//! the upstream's TLS layer never let the request through. On loopback both happen, by a
//! race. The start-time probe catches the usual cause, a missing or wrong client
//! certificate, before any request; a client certificate that expires or is revoked
//! while the gateway runs can leave keys held that an operator must release.
//!
//! **Listeners** ([`ServerCert`]): the proxy and the admin listener each serve HTTPS when
//! given a certificate chain and key (PEM). The files are read again on SIGHUP and when
//! either file's modification time or size changes (checked every
//! [`RELOAD_CHECK`]); a pair that does not load (a half-written file, a key that does
//! not match) is logged and the previous certificate stays in service. Connections
//! already open keep the certificate they were made with.
//!
//! Errors name the file and the cause: a missing file, no certificate in it, an
//! unreadable key, a key that does not match the certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio_util::sync::CancellationToken;

/// How often the listeners' certificate files are checked for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// The crypto provider every TLS configuration of the gateway uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's default crypto provider, unless one is installed already.
/// Drivers that build their TLS configuration with `ClientConfig::builder()` (Redis's)
/// need a default, which rustls cannot choose when the build has two providers.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The certificates in a PEM file, in order; an error naming the file when it cannot be
/// read or holds none.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{shown}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{shown}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{shown}: no PEM certificate in the file"));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: no usable private key: {e}", path.display()))
}

/// A certificate chain and its key, checked against each other.
fn certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, String> {
    let certs = read_certs(cert_file)?;
    let key = read_key(key_file)?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(|e| {
        format!("{} and {}: the key does not fit the certificate: {e}", cert_file.display(), key_file.display())
    })
}

/// How the gateway connects to an `https://` upstream (`[upstream]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// Trust only these CA certificates (PEM) instead of the platform's roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain and its key (PEM), for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Accept any server certificate. For tests only.
    pub insecure_skip_verify: bool,
}

impl UpstreamTls {
    /// The client configuration: roots and client certificate. ALPN is left to the
    /// connector, which offers `h2` and `http/1.1`.
    ///
    /// # Errors
    /// A message naming the file at fault, or the platform's roots when none load.
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = if self.insecure_skip_verify {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
        } else {
            builder.with_root_certificates(self.roots()?)
        };
        let config = match &self.client_cert {
            Some((cert_file, key_file)) => {
                let certs = read_certs(cert_file).map_err(|e| format!("upstream.client_cert_file: {e}"))?;
                let key = read_key(key_file).map_err(|e| format!("upstream.client_key_file: {e}"))?;
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    format!("upstream.client_cert_file and upstream.client_key_file do not fit together: {e}")
                })?
            }
            None => builder.with_no_client_auth(),
        };
        // ALPN (`h2`, `http/1.1`) is set by the connector (`enable_all_versions`).
        Ok(config)
    }

    /// A configuration for a connector that never makes TLS connections (an `http://`
    /// upstream): it trusts no certificate, so it could never connect by mistake.
    ///
    /// # Errors
    /// When the provider supports no safe protocol version (ring does).
    pub fn unused_config() -> Result<ClientConfig, String> {
        Ok(ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth())
    }

    fn roots(&self) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        if let Some(path) = &self.ca_file {
            for cert in read_certs(path).map_err(|e| format!("upstream.ca_file: {e}"))? {
                roots.add(cert).map_err(|e| format!("upstream.ca_file: {}: {e}", path.display()))?;
            }
            return Ok(roots);
        }
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::warn!(%error, "a platform root certificate could not be read");
        }
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err("no platform root certificates found (install ca-certificates, or set upstream.ca_file)".into());
        }
        Ok(roots)
    }
}

/// Says loudly, once at start, that the upstream's certificate is not verified.
pub fn warn_insecure(tls: &UpstreamTls) {
    if tls.insecure_skip_verify {
        tracing::error!(
            "upstream.insecure_skip_verify is set: the upstream's certificate is NOT verified; anyone on the path \
             can read and change the traffic. For tests only."
        );
    }
}

/// Verifies nothing: `insecure_skip_verify`. Signatures are still checked, so that the
/// handshake itself is sound; only the chain and the name are not.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A listener's certificate files (`[listen]` or `[admin]` `tls_cert_file`/`tls_key_file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// A listener's certificate, read again when its files change (see the module docs).
#[derive(Debug)]
pub struct ServerCert {
    files: CertFiles,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    stamp: Stamp,
}

/// What a change of the files is judged by: each file's modification time and size.
type Stamp = [Option<(SystemTime, u64)>; 2];

fn stamp(files: &CertFiles) -> Stamp {
    let of = |path: &Path| std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
    [of(&files.cert), of(&files.key)]
}

impl ServerCert {
    /// Reads `files`.
    ///
    /// # Errors
    /// A message naming the file at fault.
    pub fn load(files: CertFiles) -> Result<Arc<Self>, String> {
        let stamp = stamp(&files);
        let key = Arc::new(certified_key(&files.cert, &files.key)?);
        Ok(Arc::new(Self { files, current: RwLock::new(Loaded { key, stamp }) }))
    }

    /// The server configuration serving this certificate: ALPN `h2` and `http/1.1`.
    ///
    /// # Errors
    /// When the provider supports no safe protocol version (it does).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, String> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Reads the files again if they changed since the last read (or always, with
    /// `force`); keeps the certificate in service when they do not load. Whether a new
    /// certificate is in service.
    pub fn reload(&self, force: bool) -> bool {
        let now = stamp(&self.files);
        {
            let current = self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !force && current.stamp == now {
                return false;
            }
        }
        let cert = self.files.cert.display();
        match certified_key(&self.files.cert, &self.files.key) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Loaded { key: Arc::new(key), stamp: now };
                tracing::info!(%cert, "TLS certificate reloaded");
                metrics::counter!("oncely_tls_reloads_total", "result" => "ok").increment(1);
                true
            }
            Err(error) => {
                // Remember the stamp: a broken pair is reported once, not every check;
                // the next change (or SIGHUP) tries again.
                self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner).stamp = now;
                tracing::error!(%error, "TLS certificate not reloaded; the previous one stays in service");
                metrics::counter!("oncely_tls_reloads_total", "result" => "failed").increment(1);
                false
            }
        }
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).key))
    }
}

/// Reloads `certs` on SIGHUP and when their files change, until `stop`.
pub fn spawn_reloader(certs: Vec<Arc<ServerCert>>, stop: CancellationToken) {
    if certs.is_empty() {
        return;
    }
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut every = tokio::time::interval(RELOAD_CHECK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let signalled = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await.is_some(),
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let signalled = std::future::pending::<bool>();
            let force = tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => false,
                got = signalled => got,
            };
            for cert in &certs {
                cert.reload(force);
            }
        }
    });
}

/// The TLS error in an error chain, if any: rustls's own, found through the `io::Error`s
/// that wrap it.
pub fn tls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // An `io::Error`'s `source` skips the error it wraps; its `get_ref` does not
        // (the connector nests io errors two deep around rustls's).
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// Why a TLS handshake failed, in full, for the operator (logs, the start-time check):
/// rustls's text, which names the certificate's own names and dates
/// (`invalid peer certificate: UnknownIssuer`, `… certificate expired: …`, `… not valid
/// for name …`), or "not a TLS server" for a plain-text peer.
pub fn describe(tls: &rustls::Error) -> String {
    match tls {
        rustls::Error::InvalidMessage(_) => format!("not a TLS server ({tls})"),
        _ => tls.to_string(),
    }
}

/// Why a TLS handshake failed, in words that are safe to tell any client: the kind of
/// failure only, never the certificate's names (which may be internal hosts) or dates.
pub fn category(tls: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    match tls {
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the upstream's certificate has expired"
        }
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "the upstream's certificate is not valid yet"
        }
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the upstream's certificate is not valid for its host name"
        }
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature | C::UnhandledCriticalExtension) => {
            "the upstream's certificate is not from a trusted CA"
        }
        rustls::Error::InvalidCertificate(_) => "the upstream's certificate was refused",
        rustls::Error::InvalidMessage(_) => "the upstream does not speak TLS",
        rustls::Error::AlertReceived(_) => "the upstream refused the TLS session (a client certificate?)",
        _ => "the TLS handshake with the upstream failed",
    }
}

/// How long [`probe_upstream`] listens after the handshake for the upstream refusing it.
const PROBE_LISTEN: Duration = Duration::from_millis(300);

/// Checks at start that an `https://` upstream at `host:port` accepts a TLS session with
/// `config`: its certificate verifies for `host`, and it does not refuse the client
/// certificate (or its absence). A TLS 1.3 server checks the client's certificate after
/// the client's handshake is done and refuses with an alert, which a request would only
/// see once it was written (an unknown outcome): so the probe listens briefly after the
/// handshake for that alert.
///
/// # Errors
/// A message naming the cause, when the upstream answered but the session failed. An
/// upstream that cannot be reached is only logged: it may start after the gateway.
pub async fn probe_upstream(host: &str, port: u16, config: ClientConfig) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let name = host.trim_start_matches('[').trim_end_matches(']');
    let server_name =
        ServerName::try_from(name.to_string()).map_err(|e| format!("upstream host {host:?} is not a TLS name: {e}"))?;
    let stream = match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect((name, port))).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the upstream cannot be reached now; its TLS is checked on the first request");
            return Ok(());
        }
        Err(_) => {
            tracing::warn!("no connection to the upstream within 5 s; its TLS is checked on the first request");
            return Ok(());
        }
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let failed = |e: &std::io::Error| {
        let cause = tls_error(e).map_or_else(|| e.to_string(), describe);
        format!("TLS to the upstream {host}:{port} failed: {cause}")
    };
    let mut tls = match tokio::time::timeout(Duration::from_secs(10), connector.connect(server_name, stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(failed(&e)),
        Err(_) => return Err(format!("TLS to the upstream {host}:{port}: no handshake within 10 s")),
    };
    let mut byte = [0u8; 1];
    match tokio::time::timeout(PROBE_LISTEN, tls.read(&mut byte)).await {
        Ok(Err(e)) if tls_error(&e).is_some() => Err(failed(&e)),
        _ => Ok(()),
    }
}
