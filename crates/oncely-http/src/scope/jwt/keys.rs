//! The keys a [`JwtScope`](super::JwtScope) verifies with: one secret or PEM key, or a
//! JWK set that a background task reads again (on a schedule, and soon after a token
//! names a `kid` the set lacks), from a file or over http(s).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::JwtConfigError;
use super::JwtRejection;
use super::token::{ClaimSet, Verdict, verdict};

/// A JWK set larger than this is refused, not buffered.
const MAX_JWKS_LEN: usize = 1024 * 1024;

/// Redirects a JWKS URL may take (reqwest's default allows ten).
const MAX_REDIRECTS: usize = 5;

/// The accepted algorithms by name, as the builder resolved them.
pub(super) type Algorithms = [(&'static str, Algorithm)];

/// Where the keys come from, and the keys.
pub(super) struct Keys(Source);

enum Source {
    /// A secret or a PEM key: one key, whatever the token's `kid`.
    Static { setting: &'static str, set: KeySet },
    /// A JWK set, read again now and then.
    Jwks(Arc<Jwks>),
}

impl Keys {
    /// An HMAC secret: `secret`, or `secret_file` once read.
    pub(super) fn secret(
        secret: Vec<u8>,
        setting: &'static str,
        algorithms: &Algorithms,
    ) -> Result<Self, JwtConfigError> {
        if let Some(&(algorithm, _)) = algorithms.iter().find(|(_, a)| a.family() != AlgorithmFamily::Hmac) {
            return Err(JwtConfigError::AlgorithmDoesNotFitKey { algorithm, key_setting: setting });
        }
        for &(name, algorithm) in algorithms {
            let wanted = match algorithm {
                Algorithm::HS384 => 48,
                Algorithm::HS512 => 64,
                _ => 32,
            };
            if !secret.is_empty() && secret.len() < wanted {
                tracing::warn!(
                    setting,
                    algorithm = name,
                    bytes = secret.len(),
                    "the JWT secret is shorter than RFC 7518 asks for ({wanted} bytes)"
                );
            }
        }
        // jsonwebtoken refuses an empty secret, and only that.
        let decoding = DecodingKey::from_secret(&secret).map_err(|_| JwtConfigError::EmptySecret { setting })?;
        Ok(Self(Source::Static { setting, set: KeySet::single(AlgorithmFamily::Hmac, decoding) }))
    }

    /// `secret_file`: the file's bytes less one trailing newline.
    pub(super) fn secret_file(path: &Path, algorithms: &Algorithms) -> Result<Self, JwtConfigError> {
        let mut secret = read_file("secret_file", path)?;
        if secret.last() == Some(&b'\n') {
            secret.pop();
            if secret.last() == Some(&b'\r') {
                secret.pop();
            }
        }
        Self::secret(secret, "secret_file", algorithms)
    }

    /// `pem_file`: one public key, of the family all the algorithms share.
    pub(super) fn pem_file(path: &Path, algorithms: &Algorithms) -> Result<Self, JwtConfigError> {
        let misfit = |algorithm| JwtConfigError::AlgorithmDoesNotFitKey { algorithm, key_setting: "pem_file" };
        if let Some(&(algorithm, _)) = algorithms.iter().find(|(_, a)| a.family() == AlgorithmFamily::Hmac) {
            return Err(misfit(algorithm));
        }
        let family = algorithms.first().map_or(AlgorithmFamily::Rsa, |(_, a)| a.family());
        if let Some(&(algorithm, _)) = algorithms.iter().find(|(_, a)| a.family() != family) {
            return Err(misfit(algorithm));
        }
        type Parse = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;
        let (expected, parse): (&str, Parse) = match family {
            AlgorithmFamily::Rsa => ("RSA", DecodingKey::from_rsa_pem),
            AlgorithmFamily::Ec => ("EC", DecodingKey::from_ec_pem),
            AlgorithmFamily::Ed => ("Ed25519", DecodingKey::from_ed_pem),
            AlgorithmFamily::Hmac => return Err(misfit("HS256")), // refused above
        };
        let decoding = parse(&read_file("pem_file", path)?).map_err(|error| JwtConfigError::InvalidPem {
            path: path.to_owned(),
            expected,
            reason: error.to_string(),
        })?;
        Ok(Self(Source::Static { setting: "pem_file", set: KeySet::single(family, decoding) }))
    }

    /// `jwks_file`: reads the set, and spawns its refresher.
    pub(super) async fn jwks_file(
        path: PathBuf,
        algorithms: &Algorithms,
        refresh: Refresh,
    ) -> Result<Self, JwtConfigError> {
        Jwks::start(JwksLocation::File(path), algorithms, refresh).await
    }

    /// `jwks_url`: fetches the set, and spawns its refresher.
    pub(super) async fn jwks_url(url: &str, algorithms: &Algorithms, refresh: Refresh) -> Result<Self, JwtConfigError> {
        Jwks::start(JwksLocation::url(url, refresh.fetch_timeout)?, algorithms, refresh).await
    }

    /// `secret`, `pem_file`, or the JWK set's setting and location.
    pub(super) fn describe(&self) -> String {
        match &self.0 {
            Source::Static { setting, .. } => (*setting).to_owned(),
            Source::Jwks(jwks) => format!("{} {}", jwks.location.setting(), jwks.location),
        }
    }

    /// Verifies `token` (whose header named `kid` and `algorithm`) with each key that
    /// fits, until one verifies its signature, and checks its claims by `validation`.
    pub(super) fn verify(
        &self,
        token: &str,
        kid: Option<&str>,
        algorithm: Algorithm,
        validation: &Validation,
    ) -> Result<ClaimSet, JwtRejection> {
        let set = match &self.0 {
            Source::Static { set, .. } => KeyRef::Borrowed(set),
            Source::Jwks(jwks) => KeyRef::Shared(jwks.current()),
        };
        let mut refused = None;
        for key in set.candidates(kid, algorithm) {
            match jsonwebtoken::decode::<ClaimSet>(token, &key.decoding, validation) {
                Ok(data) => return Ok(data.claims),
                Err(error) => match verdict(error.into_kind()) {
                    Verdict::TryAnotherKey(rejection) => refused = Some(rejection),
                    Verdict::Final(rejection) => return Err(rejection),
                },
            }
        }
        match refused {
            Some(rejection) => Err(rejection),
            None => {
                if let Source::Jwks(jwks) = &self.0 {
                    jwks.unknown_key();
                }
                Err(JwtRejection::UnknownKey)
            }
        }
    }

    /// Reads a JWK set again now; nothing for a static key.
    pub(super) async fn refresh(&self) -> Result<(), JwtConfigError> {
        match &self.0 {
            Source::Static { .. } => Ok(()),
            Source::Jwks(jwks) => jwks.load().await.map(drop),
        }
    }
}

/// When a JWK set is read again, and how long one fetch may take.
#[derive(Clone, Copy)]
pub(super) struct Refresh {
    pub(super) every: Duration,
    pub(super) unknown_key_every: Duration,
    pub(super) fetch_timeout: Duration,
}

/// The keys in use, and whether a token's `kid` chooses among them.
struct KeySet {
    keys: Vec<Key>,
    by_kid: bool,
}

/// One key, and what it may verify.
struct Key {
    kid: Option<String>,
    /// The JWK's `alg`, when it names one: the key verifies that algorithm only.
    algorithm: Option<Algorithm>,
    family: AlgorithmFamily,
    curve: Option<EllipticCurve>,
    decoding: DecodingKey,
}

impl KeySet {
    fn single(family: AlgorithmFamily, decoding: DecodingKey) -> Self {
        Self { keys: vec![Key { kid: None, algorithm: None, family, curve: None, decoding }], by_kid: false }
    }

    /// The usable keys of a JWK set; an error when it is not one or none is usable.
    fn parse_jwks(bytes: &[u8], accepted: &Algorithms) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct RawSet {
            keys: Vec<Value>,
        }
        let raw: RawSet = serde_json::from_slice(bytes).map_err(|e| format!("not a JWK set: {e}"))?;
        let total = raw.keys.len();
        // One key that does not parse leaves the others usable.
        let keys: Vec<Key> = raw
            .keys
            .into_iter()
            .filter_map(|value| serde_json::from_value::<Jwk>(value).ok())
            .filter_map(|jwk| Key::from_jwk(&jwk, accepted))
            .collect();
        if keys.is_empty() {
            let names: Vec<&str> = accepted.iter().map(|(name, _)| *name).collect();
            return Err(format!("none of its {total} keys can verify {}", names.join(", ")));
        }
        Ok(Self { keys, by_kid: true })
    }

    /// The keys to try for a token, those that fit its algorithm: in a JWK set, the keys
    /// with the token's `kid`, or all of them for a token without one; a static key
    /// whatever the `kid`.
    fn candidates<'a>(&'a self, kid: Option<&'a str>, algorithm: Algorithm) -> impl Iterator<Item = &'a Key> {
        self.keys
            .iter()
            .filter(move |key| key.fits(algorithm) && (!self.by_kid || kid.is_none() || key.kid.as_deref() == kid))
    }
}

impl Key {
    fn from_jwk(jwk: &Jwk, accepted: &Algorithms) -> Option<Self> {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))) {
            return None;
        }
        if jwk.common.key_operations.as_ref().is_some_and(|ops| !ops.contains(&KeyOperations::Verify)) {
            return None;
        }
        let algorithm = match jwk.common.key_algorithm {
            Some(named) => Some(Algorithm::try_from(named).ok()?),
            None => None,
        };
        let (family, curve) = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => (AlgorithmFamily::Rsa, None),
            AlgorithmParameters::EllipticCurve(params) => (AlgorithmFamily::Ec, Some(params.curve.clone())),
            AlgorithmParameters::OctetKeyPair(params) => (AlgorithmFamily::Ed, Some(params.curve.clone())),
            AlgorithmParameters::OctetKey(_) => (AlgorithmFamily::Hmac, None),
            _ => return None,
        };
        let decoding = DecodingKey::from_jwk(jwk).ok()?;
        let key = Self { kid: jwk.common.key_id.clone(), algorithm, family, curve, decoding };
        accepted.iter().any(|&(_, a)| key.fits(a)).then_some(key)
    }

    /// Whether this key can verify `algorithm`: its family, its curve, and its JWK `alg`
    /// if it names one (so an RSA key published for `RS256` is not tried for `PS256`).
    fn fits(&self, algorithm: Algorithm) -> bool {
        self.algorithm.is_none_or(|a| a == algorithm)
            && self.family == algorithm.family()
            && match &self.curve {
                None => true,
                Some(EllipticCurve::P256) => algorithm == Algorithm::ES256,
                Some(EllipticCurve::P384) => algorithm == Algorithm::ES384,
                Some(EllipticCurve::Ed25519) => algorithm == Algorithm::EdDSA,
                Some(_) => false,
            }
    }
}

/// A static key set borrowed, or a JWK set's current one held while a token is checked.
enum KeyRef<'a> {
    Borrowed(&'a KeySet),
    Shared(Arc<KeySet>),
}

impl std::ops::Deref for KeyRef<'_> {
    type Target = KeySet;

    fn deref(&self) -> &KeySet {
        match self {
            Self::Borrowed(set) => set,
            Self::Shared(set) => set,
        }
    }
}

/// A JWK set that is read again now and then, and the state of its refresher.
struct Jwks {
    location: JwksLocation,
    accepted: Vec<(&'static str, Algorithm)>,
    current: RwLock<Arc<KeySet>>,
    /// One read at a time, so an older read never replaces a newer one.
    reading: tokio::sync::Mutex<()>,
    wake: Arc<Notify>,
    last_wake: Mutex<Option<Instant>>,
    wake_every: Duration,
    /// Stops the refresher when the last `JwtScope` goes.
    _stop: DropGuard,
}

impl Jwks {
    async fn start(location: JwksLocation, accepted: &Algorithms, refresh: Refresh) -> Result<Keys, JwtConfigError> {
        let setting = location.setting();
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(JwtConfigError::NoRuntime { setting });
        }
        let first = KeySet::parse_jwks(&location.read().await?, accepted).map_err(|reason| location.invalid(reason))?;
        let stop = CancellationToken::new();
        let wake = Arc::new(Notify::new());
        let jwks = Arc::new(Self {
            location,
            accepted: accepted.to_vec(),
            current: RwLock::new(Arc::new(first)),
            reading: tokio::sync::Mutex::new(()),
            wake: Arc::clone(&wake),
            last_wake: Mutex::new(None),
            wake_every: refresh.unknown_key_every,
            _stop: stop.clone().drop_guard(),
        });
        tokio::spawn(refresher(Arc::downgrade(&jwks), wake, stop, refresh.every));
        Ok(Keys(Source::Jwks(jwks)))
    }

    fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// A token named a `kid` the set lacks: wake the refresher, unless it was woken so
    /// less than `wake_every` ago.
    fn unknown_key(&self) {
        let mut last = self.last_wake.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if last.is_none_or(|at| now.duration_since(at) >= self.wake_every) {
            *last = Some(now);
            self.wake.notify_one();
        }
    }

    /// Reads the set and puts it in use; on failure the keys in use stay.
    async fn load(&self) -> Result<usize, JwtConfigError> {
        let _one_at_a_time = self.reading.lock().await;
        let bytes = self.location.read().await?;
        let set = KeySet::parse_jwks(&bytes, &self.accepted).map_err(|reason| self.location.invalid(reason))?;
        let count = set.keys.len();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
        Ok(count)
    }
}

/// Reads the set again every `every`, and when a token with an unknown `kid` wakes it;
/// ends when the last `JwtScope` goes (through `stop`, or when `jwks` is gone).
async fn refresher(jwks: Weak<Jwks>, wake: Arc<Notify>, stop: CancellationToken, every: Duration) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
            () = wake.notified() => {}
        }
        let Some(jwks) = jwks.upgrade() else { return };
        match jwks.load().await {
            Ok(keys) => tracing::debug!(jwks = %jwks.location, keys, "JWK set refreshed"),
            Err(error) => tracing::warn!(jwks = %jwks.location, %error, "JWK set refresh failed; the keys in use stay"),
        }
    }
}

/// Where a JWK set is read from.
enum JwksLocation {
    File(PathBuf),
    Url {
        url: reqwest::Url,
        /// The URL as logs and errors show it.
        shown: String,
        client: reqwest::Client,
    },
}

impl fmt::Display for JwksLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Url { shown, .. } => f.write_str(shown),
        }
    }
}

impl JwksLocation {
    fn url(text: &str, timeout: Duration) -> Result<Self, JwtConfigError> {
        let invalid = |reason: String| JwtConfigError::InvalidUrl { url: text.to_owned(), reason };
        let url = reqwest::Url::parse(text).map_err(|e| invalid(e.to_string()))?;
        let https = match url.scheme() {
            "https" => true,
            "http" => false,
            _ => return Err(invalid("the scheme must be http or https".to_owned())),
        };
        if url.host().is_none() {
            return Err(invalid("the URL has no host".to_owned()));
        }
        // A password in the URL is never shown: not in logs, not in errors.
        let shown = match url.password() {
            Some(_) => {
                let mut hidden = url.clone();
                let _ = hidden.set_password(Some("***"));
                hidden.to_string()
            }
            None => url.to_string(),
        };
        if !https && !is_loopback(&url) {
            tracing::warn!(
                jwks_url = %shown,
                "the JWK set is fetched over plain http: anyone on the path can substitute keys and forge principals"
            );
        }
        let fetch = |reason: String| JwtConfigError::Fetch { url: shown.clone(), reason };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| fetch(format!("cannot set up TLS: {e}")))?;
        // The system's CA certificates: for https, and for an http URL that redirects to
        // https. Without them an https URL is an error; an http one fetches all the same.
        let tls = match rustls_platform_verifier::Verifier::new(provider) {
            Ok(verifier) => tls.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth(),
            Err(e) if https => return Err(fetch(format!("cannot load the system's CA certificates: {e}"))),
            Err(_) => tls.with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth(),
        };
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    attempt.error("too many redirects")
                } else if attempt.url().scheme() != "https" && attempt.previous().iter().any(|u| u.scheme() == "https")
                {
                    // An https set must not come back over http, where it can be substituted.
                    attempt.error("a redirect from https to plain http")
                } else {
                    attempt.follow()
                }
            }))
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| fetch(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Self::Url { url, shown, client })
    }

    fn setting(&self) -> &'static str {
        match self {
            Self::File(_) => "jwks_file",
            Self::Url { .. } => "jwks_url",
        }
    }

    fn invalid(&self, reason: String) -> JwtConfigError {
        JwtConfigError::InvalidJwks { setting: self.setting(), location: self.to_string(), reason }
    }

    async fn read(&self) -> Result<Vec<u8>, JwtConfigError> {
        match self {
            Self::File(path) => {
                let owned = path.clone();
                match tokio::task::spawn_blocking(move || std::fs::read(owned)).await {
                    Ok(read) => read.map_err(|cause| JwtConfigError::ReadFile {
                        setting: "jwks_file",
                        path: path.clone(),
                        cause,
                    }),
                    Err(join) => Err(JwtConfigError::ReadFile {
                        setting: "jwks_file",
                        path: path.clone(),
                        cause: std::io::Error::other(join.to_string()),
                    }),
                }
            }
            Self::Url { url, shown, client } => {
                let fetch = |reason: String| JwtConfigError::Fetch { url: shown.clone(), reason };
                let mut response =
                    client.get(url.clone()).send().await.map_err(|e| fetch(error_chain(&e.without_url())))?;
                if !response.status().is_success() {
                    return Err(fetch(format!("answered {}", response.status())));
                }
                let mut body = Vec::new();
                while let Some(chunk) = response.chunk().await.map_err(|e| fetch(error_chain(&e.without_url())))? {
                    if body.len() + chunk.len() > MAX_JWKS_LEN {
                        return Err(fetch(format!("the JWK set is larger than {MAX_JWKS_LEN} bytes")));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(body)
            }
        }
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let ip = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || ip.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// reqwest's own message is often just "error sending request": the causes say why.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn read_file(setting: &'static str, path: &Path) -> Result<Vec<u8>, JwtConfigError> {
    std::fs::read(path).map_err(|cause| JwtConfigError::ReadFile { setting, path: path.to_owned(), cause })
}
