//! Certificates for TLS tests: a throwaway certificate authority, server certificates
//! for loopback, a client certificate for mutual TLS, and the wrong ones (another CA, an
//! expired certificate, a certificate for another host), written as PEM files in a
//! temporary directory that lives as long as the [`Pki`].
//!
//! ```
//! let pki = oncely_testkit::tls::Pki::new();
//! let pem = std::fs::read_to_string(pki.ca_file()).unwrap();
//! assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
//! ```

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Whether a TLS test server asks its clients for a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client may present a certificate (verified if it does) or not: plain TLS.
    Optional,
    /// Every client must present a certificate from the test CA: mutual TLS.
    Required,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM).
    pub key: PathBuf,
}

/// A certificate authority and the certificates it issued for a test, in a temporary
/// directory.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// `localhost` and `127.0.0.1`, for servers on loopback.
    pub server: CertFiles,
    /// A client certificate (`CN=oncely-test-client`), for mutual TLS.
    pub client: CertFiles,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("dir", &self.dir.path()).finish_non_exhaustive()
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    /// A new authority with a server certificate for `localhost`/`127.0.0.1` and a client
    /// certificate.
    ///
    /// # Panics
    /// When the temporary directory cannot be written.
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("a temporary directory for certificates");
        let ca = authority("Oncely Test CA");
        write(dir.path(), "ca.pem", &ca.pem());
        let server = issue(dir.path(), "server", &ca, &["localhost", "127.0.0.1"], Usage::Server, false);
        let client = issue(dir.path(), "client", &ca, &["oncely-test-client"], Usage::Client, false);
        Pki { dir, ca, server, client }
    }

    /// The authority's certificate (PEM): what a client trusts.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Another server certificate from this authority, for `names`, written as
    /// `NAME.pem` and `NAME.key`: a rotated certificate, or one for another host.
    pub fn server_cert(&self, name: &str, names: &[&str]) -> CertFiles {
        issue(self.dir.path(), name, &self.ca, names, Usage::Server, false)
    }

    /// A server certificate for loopback from this authority that expired in 2001.
    pub fn expired_server_cert(&self) -> CertFiles {
        issue(self.dir.path(), "expired", &self.ca, &["localhost", "127.0.0.1"], Usage::Server, true)
    }

    /// A server certificate for loopback from another authority, which clients of this
    /// one do not trust; and that authority's certificate file.
    pub fn untrusted_server_cert(&self) -> (CertFiles, PathBuf) {
        let other = authority("Some Other CA");
        write(self.dir.path(), "other-ca.pem", &other.pem());
        let files = issue(self.dir.path(), "untrusted", &other, &["localhost", "127.0.0.1"], Usage::Server, false);
        (files, self.dir.path().join("other-ca.pem"))
    }
}

#[derive(Clone, Copy)]
enum Usage {
    Server,
    Client,
}

fn authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("a CA key")).expect("a CA certificate")
}

fn issue(
    dir: &Path,
    file: &str,
    ca: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: Usage,
    expired: bool,
) -> CertFiles {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names.clone()).expect("certificate parameters");
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
    params.extended_key_usages = vec![match usage {
        Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    if expired {
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    }
    let key = KeyPair::generate().expect("a key");
    let cert = params.signed_by(&key, ca).expect("a certificate");
    let files = CertFiles { cert: dir.join(format!("{file}.pem")), key: dir.join(format!("{file}.key")) };
    write(dir, &format!("{file}.pem"), &cert.pem());
    write(dir, &format!("{file}.key"), &key.serialize_pem());
    files
}

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    // PostgreSQL refuses a key file others can read; the tests run as the file's owner
    // or as root.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
}
