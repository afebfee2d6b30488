//! TLS (`rediss://`, `rediss+cluster://`): the certificate files a store trusts and
//! presents ([`TlsFiles`]), the process-wide crypto provider the client needs, and a failed
//! handshake told by its cause ([`OpenError::Tls`]).
//!
//! Which roots are trusted: the platform's (rustls-native-certs: `/etc/ssl/certs` and
//! `SSL_CERT_FILE`/`SSL_CERT_DIR` on Linux) unless `ca_file` names a bundle, which then
//! **replaces** them (redis-rs builds its root store from `root_cert` alone). A managed
//! server with a public certificate needs no `ca_file`; a private CA needs it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use redis::{ClientTlsConfig, RedisError, TlsCertificates};

use crate::{OpenError, RedisOptions};

/// The certificate files of a TLS connection, as named in the URL (`ca_file`, `cert_file`,
/// `key_file`) or set with [`RedisOptions::ca_file`](crate::RedisOptions::ca_file) and
/// [`RedisOptions::client_cert`](crate::RedisOptions::client_cert). Read when the store
/// connects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    pub(crate) ca_file: Option<PathBuf>,
    /// The client certificate (chain) and its private key, for mutual TLS.
    pub(crate) client: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    pub(crate) fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.client.is_none()
    }

    /// Reads the files into what redis-rs takes. Its own parse of the PEM happens when the
    /// client is built, and fails there with the file's kind named.
    pub(crate) fn read(&self) -> Result<TlsCertificates, OpenError> {
        let read = |option: &str, path: &Path| {
            std::fs::read(path).map_err(|e| OpenError::TlsFiles(format!("{option} {}: {e}", path.display())))
        };
        let root_cert = self.ca_file.as_deref().map(|path| read("ca_file", path)).transpose()?;
        let client_tls = match &self.client {
            Some((cert, key)) => {
                Some(ClientTlsConfig { client_cert: read("cert_file", cert)?, client_key: read("key_file", key)? })
            }
            None => None,
        };
        Ok(TlsCertificates { client_tls, root_cert })
    }
}

/// Whether a node URL (`rediss://…`) asks for TLS.
pub(crate) fn is_tls(url: &str) -> bool {
    url.starts_with("rediss://")
}

/// Installs rustls's ring provider as the process default, unless one is installed.
///
/// redis-rs builds its TLS configuration with `rustls::ClientConfig::builder()`, which
/// takes the process-default crypto provider. rustls picks one by itself only when exactly
/// one provider is compiled in; a binary that also holds the AWS SDK has both aws-lc-rs and
/// ring, and the builder would panic. The workspace's one TLS stack is rustls with ring,
/// so that is what is installed; a provider the application installed first is kept (the
/// `Err` of `install_default` says only that).
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The TLS failure inside `error`, as [`OpenError::Tls`] naming its cause; any other
/// error as [`OpenError::Connect`].
pub(crate) fn connect_error(error: RedisError) -> OpenError {
    match handshake_failure(&error) {
        Some(reason) => OpenError::Tls { reason, source: error },
        None => OpenError::Connect(error),
    }
}

/// Why connecting to the TLS server at `url` failed: as [`connect_error`], and a
/// connection that timed out is checked for a plain-text server (one `PING` over plain
/// TCP: a Redis that answers it does not speak TLS on that port). Such a server reads the
/// client's TLS hello as the start of a command and waits for the rest, so the handshake
/// itself only ever times out.
pub(crate) async fn connect_failure(error: RedisError, url: &str, options: &RedisOptions) -> OpenError {
    let error = match connect_error(error) {
        OpenError::Connect(error) if is_tls(url) && error.is_timeout() => error,
        other => return other,
    };
    match answers_plain_text(url, options.connection_timeout).await {
        Some(reply) => OpenError::Tls {
            reason: format!(
                "the server does not speak TLS (it answered a plain-text PING with {reply:?}): a plain-text server \
                 behind a rediss:// URL?"
            ),
            source: error,
        },
        None => OpenError::Connect(error),
    }
}

/// The first line of a plain-text Redis's answer to `PING` at `url`'s address, if it
/// answers one within `timeout`.
async fn answers_plain_text(url: &str, timeout: Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let info = redis::IntoConnectionInfo::into_connection_info(url).ok()?;
    let redis::ConnectionAddr::TcpTls { host, port, .. } = info.addr() else { return None };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut reply = [0u8; 64];
        let read = stream.read(&mut reply).await.ok()?;
        let reply = String::from_utf8_lossy(reply.get(..read)?).lines().next()?.to_string();
        reply.starts_with(['+', '-']).then_some(reply)
    };
    tokio::time::timeout(timeout, exchange).await.ok().flatten()
}

/// What a refused handshake means, read from the rustls error that tokio-rustls wraps in
/// the `io::Error` that redis-rs wraps; `None` for any other failure.
fn handshake_failure(error: &RedisError) -> Option<String> {
    use rustls::{AlertDescription, CertificateError, Error as Tls};
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    let tls = loop {
        let current = cause?;
        if let Some(tls) = current.downcast_ref::<Tls>() {
            break tls;
        }
        // redis-rs keeps the `io::Error` in an `Arc`, whose `source()` skips it.
        let io = current.downcast_ref::<std::io::Error>().or_else(|| {
            current
                .downcast_ref::<std::sync::Arc<dyn std::error::Error + Send + Sync>>()
                .and_then(|shared| shared.downcast_ref::<std::io::Error>())
        });
        if let Some(tls) = io.and_then(|io| io.get_ref()).and_then(|e| e.downcast_ref::<Tls>()) {
            break tls;
        }
        cause = current.source();
    };
    Some(match tls {
        Tls::InvalidCertificate(why) => {
            let name = match why {
                CertificateError::UnknownIssuer => "UnknownIssuer",
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => "Expired",
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => "NotValidYet",
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                    "NotValidForName"
                }
                _ => "",
            };
            let hint = match why {
                CertificateError::UnknownIssuer => {
                    " (the server's certificate is not from a CA this client trusts: the platform's roots, or the \
                     ca_file when one is set)"
                }
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                    " (connect by a name the certificate holds)"
                }
                _ => "",
            };
            let detail = why.to_string();
            match name {
                "" => format!("certificate verify failed: {detail}"),
                _ if detail == name => format!("certificate verify failed: {name}{hint}"),
                _ => format!("certificate verify failed: {name}: {detail}{hint}"),
            }
        }
        Tls::InvalidMessage(_) | Tls::InappropriateMessage { .. } | Tls::InappropriateHandshakeMessage { .. } => {
            format!("the server does not speak TLS ({tls}): a plain-text server behind a rediss:// URL?")
        }
        Tls::AlertReceived(AlertDescription::CertificateRequired) => {
            format!("the server requires a client certificate ({tls}): set cert_file and key_file")
        }
        Tls::AlertReceived(
            AlertDescription::UnknownCA | AlertDescription::BadCertificate | AlertDescription::CertificateUnknown,
        ) => format!("the server refused the client certificate ({tls})"),
        other => format!("TLS failed: {other}"),
    })
}
