//! The scope from a verified JWT: [`JwtScope`] checks a request's bearer token itself
//! (signature, expiry, issuer, audience) and names its principal by chosen claims (`sub`,
//! and `tenant_id` say). A refreshed access token of the same user has the same claims,
//! so its retry keeps its scope, where the raw `Authorization` text would not; a token
//! that does not verify is refused ([`JwtRejection`], answered 401) and never used with a
//! weaker scope.
//!
//! ```
//! use jsonwebtoken::{EncodingKey, Header, encode};
//! use oncely_http::scope::jwt::{JwtRejection, JwtScope};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! let secret = b"at least 32 bytes of shared secret";
//! let scope = JwtScope::builder().algorithms(["HS256"]).secret(*secret).build().await?;
//!
//! // Two access tokens of one user, the second a refresh of the first: one principal.
//! let now = jsonwebtoken::get_current_timestamp();
//! let token = |iat: u64| {
//!     let claims = serde_json::json!({ "sub": "alice", "iat": iat, "exp": iat + 600 });
//!     encode(&Header::default(), &claims, &EncodingKey::from_secret(secret).expect("a secret"))
//! };
//! let mut headers = http::HeaderMap::new();
//! headers.insert("authorization", format!("Bearer {}", token(now)?).parse()?);
//! let first = scope.principal(&headers)?;
//! headers.insert("authorization", format!("bearer {}", token(now + 300)?).parse()?);
//! assert_eq!(scope.principal(&headers)?, first);
//! assert_eq!(first, "sub=alice");
//!
//! headers.insert("authorization", "Bearer not.a.jwt".parse()?);
//! assert_eq!(scope.principal(&headers), Err(JwtRejection::Malformed));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Keys
//!
//! One source, named as a configuration file names it:
//!
//! | setting | key | algorithms |
//! |---|---|---|
//! | [`secret`](JwtScopeBuilder::secret), [`secret_file`](JwtScopeBuilder::secret_file) | an HMAC secret (a file's trailing newline is not part of it) | `HS256`, `HS384`, `HS512` |
//! | [`pem_file`](JwtScopeBuilder::pem_file) | one public key in PEM (or a certificate holding one) | one family: `RS*` and `PS*`, or `ES256`/`ES384`, or `EdDSA` |
//! | [`jwks_file`](JwtScopeBuilder::jwks_file), [`jwks_url`](JwtScopeBuilder::jwks_url) | a JWK set (RFC 7517), refreshed | any, each key by its type, curve and `alg` |
//!
//! A JWK set's key is chosen by the token's `kid`. A token without a `kid` is tried with
//! every key of the set that fits its algorithm, in the set's order. Keys marked for
//! encryption (`"use": "enc"`), keys whose `alg` is not accepted, and keys of types this
//! module cannot use are left out; a set with no usable key is an error.
//!
//! # Refreshing a JWK set
//!
//! The set is read again every [`refresh_every`](JwtScopeBuilder::refresh_every)
//! (5 minutes by default), and soon after a token names a `kid` the set lacks (a key
//! rotation), at most once per
//! [`unknown_key_refresh_every`](JwtScopeBuilder::unknown_key_refresh_every) (30 s) so
//! that made-up `kid`s cannot hammer the issuer. Refreshes run in a background task:
//! verification never waits on the network, so the token that revealed a new `kid` is
//! itself refused ([`JwtRejection::UnknownKey`]) and its retry, once the set is read,
//! verifies. A refresh that fails (unreachable, not JSON, no usable key) keeps the keys
//! in use and logs a `tracing` warning. [`JwtScope::refresh_keys`] refreshes at once.
//!
//! # Tokio
//!
//! [`JwtScopeBuilder::build`] is async. With a JWK set it reads the set before returning
//! (an unreadable or unusable set is an error, not a scope that refuses everyone) and
//! spawns the refresher, so it must run inside a Tokio runtime (with the time driver);
//! the refresher ends when the last clone of the [`JwtScope`] is dropped, or with the
//! runtime. With a secret or a PEM file, `build` reads its file synchronously and needs no
//! runtime.
//!
//! # The principal
//!
//! [`JwtScope::principal`] names the principal by the configured claims, in their
//! configured order: `sub=alice;tenant_id=t1`. Each claim must be a non-empty string or
//! a number. Strings are percent-encoded outside `A-Z a-z 0-9 - . _ ~ @ : + / |` and
//! numbers are written `#42`, so no two claim sets give the same text, and a string
//! `"42"` is not the number `42`. The text holds the claims as they are (an e-mail
//! address, say): hash it before storing it, as the scope does.
//!
//! With more than one accepted issuer that may reuse subjects, add `iss` to the claims.

mod keys;
mod token;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use jsonwebtoken::{Algorithm, Validation};

use keys::{Keys, Refresh};

/// Every algorithm this module verifies, by its JWA name (RFC 7518). `none` is not one.
const ALGORITHMS: [(&str, Algorithm); 12] = [
    ("HS256", Algorithm::HS256),
    ("HS384", Algorithm::HS384),
    ("HS512", Algorithm::HS512),
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("PS256", Algorithm::PS256),
    ("PS384", Algorithm::PS384),
    ("PS512", Algorithm::PS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
    ("EdDSA", Algorithm::EdDSA),
];

const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);
/// A leeway of days would make expiry meaningless (and one of decades would overflow).
const MAX_LEEWAY: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);
const DEFAULT_UNKNOWN_KEY_REFRESH_EVERY: Duration = Duration::from_secs(30);
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Verifies bearer JWTs and names their principal by chosen claims; see the
/// [module docs](self) for keys, refreshes and the principal's text.
///
/// Cheap to clone (one `Arc`); clones share the keys and their refresher.
///
/// ```
/// use oncely_http::scope::jwt::JwtScope;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// let scope = JwtScope::builder().algorithms(["HS256"]).secret(*b"at least 32 bytes of shared secret").build().await?;
/// let per_worker = scope.clone();
/// # let _ = per_worker;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct JwtScope {
    inner: Arc<Inner>,
}

struct Inner {
    accepted: Vec<Accepted>,
    claims: Vec<String>,
    keys: Keys,
}

/// An accepted algorithm with the checks for its tokens: jsonwebtoken wants every
/// algorithm of one `Validation` to fit the key, so each algorithm has its own.
struct Accepted {
    name: &'static str,
    algorithm: Algorithm,
    validation: Validation,
}

impl fmt::Debug for JwtScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let algorithms: Vec<&str> = self.inner.accepted.iter().map(|a| a.name).collect();
        f.debug_struct("JwtScope")
            .field("algorithms", &algorithms)
            .field("claims", &self.inner.claims)
            .field("keys", &self.inner.keys.describe())
            .finish()
    }
}

impl JwtScope {
    /// A builder with the defaults: claims `["sub"]`, leeway 60 s, JWK sets refreshed
    /// every 5 minutes and on an unknown `kid` at most every 30 s. The algorithms and
    /// the key source have no default.
    ///
    /// ```
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// let builder = JwtScope::builder().algorithms(["RS256"]).jwks_url("https://issuer.example/.well-known/jwks.json");
    /// # let _ = builder;
    /// ```
    pub fn builder() -> JwtScopeBuilder {
        JwtScopeBuilder::default()
    }

    /// The principal of a request: its `Authorization: Bearer <token>` field (one field;
    /// the scheme in any case), verified, named by the configured claims
    /// (`sub=alice;tenant_id=t1`).
    ///
    /// Never blocks: the keys in use are read under a lock held for a pointer copy; a
    /// token naming an unknown `kid` wakes the refresher and is refused.
    ///
    /// ```
    /// use oncely_http::scope::jwt::{JwtRejection, JwtScope};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let scope = JwtScope::builder().algorithms(["HS256"]).secret(*b"at least 32 bytes of shared secret").build().await?;
    /// let mut headers = http::HeaderMap::new();
    /// assert_eq!(scope.principal(&headers), Err(JwtRejection::Missing));
    /// headers.insert("authorization", "Basic YWxpY2U6c2VjcmV0".parse()?);
    /// assert_eq!(scope.principal(&headers), Err(JwtRejection::NotBearer));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`JwtRejection`]: no or several `Authorization` fields, another scheme, a token
    /// that is not a JWT, not signed by a known key with an accepted algorithm, expired,
    /// not yet valid, for another issuer or audience, or without the configured claims.
    pub fn principal(&self, headers: &HeaderMap) -> Result<String, JwtRejection> {
        self.principal_of_token(token::bearer_token(headers)?)
    }

    /// The principal of a bare token (what follows `Bearer `), for tokens that arrive
    /// elsewhere than in `Authorization`.
    ///
    /// ```
    /// use oncely_http::scope::jwt::{JwtRejection, JwtScope};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let scope = JwtScope::builder().algorithms(["HS256"]).secret(*b"at least 32 bytes of shared secret").build().await?;
    /// // An unsigned token (`"alg": "none"`) is never accepted.
    /// let unsigned = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
    /// assert_eq!(scope.principal_of_token(unsigned), Err(JwtRejection::AlgorithmNotAllowed));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`principal`](Self::principal), less those about the `Authorization` field.
    pub fn principal_of_token(&self, token: &str) -> Result<String, JwtRejection> {
        let header = token::parse_header(token)?;
        let accepted =
            self.inner.accepted.iter().find(|a| a.name == header.alg).ok_or(JwtRejection::AlgorithmNotAllowed)?;
        let claims = self.inner.keys.verify(token, header.kid.as_deref(), accepted.algorithm, &accepted.validation)?;
        token::principal(&claims, &self.inner.claims)
    }

    /// Reads the JWK set again now, whatever the refresh schedule, and waits for it:
    /// for an operator's reload. Does nothing for a secret or a PEM key (their files are
    /// read once, by [`build`](JwtScopeBuilder::build)).
    ///
    /// ```
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let scope = JwtScope::builder().algorithms(["HS256"]).secret(*b"at least 32 bytes of shared secret").build().await?;
    /// scope.refresh_keys().await?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`JwtConfigError`] naming `jwks_file` or `jwks_url` when the set cannot be read,
    /// parsed, or has no usable key; the keys in use are kept.
    pub async fn refresh_keys(&self) -> Result<(), JwtConfigError> {
        self.inner.keys.refresh().await
    }
}

/// Why a request's bearer token gives no principal. The caller answers 401; the
/// [`Display`](fmt::Display) text is short and safe to send to the client (it names a
/// claim at most, never a key or the token).
///
/// ```
/// use oncely_http::scope::jwt::JwtRejection;
///
/// let rejection = JwtRejection::MissingClaim("tenant_id".to_owned());
/// assert_eq!(rejection.to_string(), "the token has no tenant_id claim");
/// assert_eq!(rejection.code(), "missing_claim");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtRejection {
    /// No `Authorization` field.
    #[error("no bearer token: the request has no Authorization header")]
    Missing,
    /// More than one `Authorization` field: which one counts would be a guess.
    #[error("the request has more than one Authorization header")]
    MultipleAuthorization,
    /// The `Authorization` scheme is not `Bearer`.
    #[error("the Authorization scheme is not Bearer")]
    NotBearer,
    /// The bearer token is not a JWT: not three base64url parts, not JSON, too long.
    #[error("the bearer token is not a well-formed JWT")]
    Malformed,
    /// The token's `alg` is not one of the accepted algorithms (`none` never is).
    #[error("the token's signing algorithm is not accepted")]
    AlgorithmNotAllowed,
    /// No key of the set has the token's `kid` (and fits its algorithm). With a JWK set,
    /// the set is read again soon; a retry may verify.
    #[error("the token's signing key is not known")]
    UnknownKey,
    /// The signature does not verify with the key.
    #[error("the token's signature does not verify")]
    BadSignature,
    /// `exp` is past, beyond the leeway.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is ahead, beyond the leeway.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `iss` is not an accepted issuer.
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    /// `aud` names no accepted audience.
    #[error("the token's audience is not accepted")]
    WrongAudience,
    /// A required claim is absent (or `null`): a configured claim, `exp`, or `iss` and
    /// `aud` when issuers and audiences are configured.
    #[error("the token has no {0} claim")]
    MissingClaim(String),
    /// A claim is of the wrong type: a configured claim that is not a non-empty string or
    /// a number, an `exp` or `nbf` that is not a number.
    #[error("the token's {0} claim has the wrong type")]
    InvalidClaim(String),
}

impl JwtRejection {
    /// A stable snake_case code for logs and metrics: `missing`, `multiple_authorization`,
    /// `not_bearer`, `malformed`, `algorithm_not_allowed`, `unknown_key`, `bad_signature`,
    /// `expired`, `not_yet_valid`, `wrong_issuer`, `wrong_audience`, `missing_claim`,
    /// `invalid_claim`.
    ///
    /// ```
    /// use oncely_http::scope::jwt::JwtRejection;
    ///
    /// assert_eq!(JwtRejection::Expired.code(), "expired");
    /// ```
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::MultipleAuthorization => "multiple_authorization",
            Self::NotBearer => "not_bearer",
            Self::Malformed => "malformed",
            Self::AlgorithmNotAllowed => "algorithm_not_allowed",
            Self::UnknownKey => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::MissingClaim(_) => "missing_claim",
            Self::InvalidClaim(_) => "invalid_claim",
        }
    }
}

/// Why [`JwtScopeBuilder::build`] (or [`JwtScope::refresh_keys`]) failed. Each names its
/// setting as a configuration file does ([`setting`](Self::setting)) and the cause.
///
/// ```
/// use oncely_http::scope::jwt::{JwtConfigError, JwtScope};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// let error = JwtScope::builder().algorithms(["HS265"]).secret(*b"secret").build().await.expect_err("a typo");
/// assert!(matches!(&error, JwtConfigError::UnknownAlgorithm { name } if name == "HS265"));
/// assert_eq!(error.setting(), "algorithms");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtConfigError {
    /// No algorithm was named.
    #[error("jwt algorithms: name the accepted algorithms (HS256, RS256, ES256, EdDSA, …)")]
    NoAlgorithms,
    /// A name that is not an algorithm this module verifies.
    #[error(
        "jwt algorithms: unknown algorithm {name:?}; known: HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"
    )]
    UnknownAlgorithm {
        /// The name as it was given.
        name: String,
    },
    /// `none` was named: an unsigned token proves nothing.
    #[error("jwt algorithms: \"none\" is never accepted: a token must be signed")]
    UnsignedAlgorithm,
    /// An algorithm that the configured key cannot verify (an `RS256` with a secret, an
    /// `HS256` with a PEM key, or two families with one PEM key).
    #[error(
        "jwt algorithms: {algorithm} cannot be verified with the {key_setting} key (a secret serves HS*; a PEM key one family: RS*/PS*, ES*, or EdDSA)"
    )]
    AlgorithmDoesNotFitKey {
        /// The algorithm.
        algorithm: &'static str,
        /// The key's setting: `secret`, `secret_file` or `pem_file`.
        key_setting: &'static str,
    },
    /// No key source was set.
    #[error("jwt keys: set one of secret, secret_file, pem_file, jwks_file, jwks_url")]
    NoKeySource,
    /// Two key sources were set.
    #[error("jwt {second}: only one key source may be set, and {first} is set too")]
    SeveralKeySources {
        /// The one set first.
        first: &'static str,
        /// The other.
        second: &'static str,
    },
    /// The HMAC secret is empty.
    #[error("jwt {setting}: the secret is empty")]
    EmptySecret {
        /// `secret` or `secret_file`.
        setting: &'static str,
    },
    /// A file could not be read.
    #[error("jwt {setting} {}: cannot read it: {cause}", path.display())]
    ReadFile {
        /// `secret_file`, `pem_file` or `jwks_file`.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        cause: std::io::Error,
    },
    /// The PEM file holds no public key of the algorithms' family.
    #[error("jwt pem_file {}: not a PEM {expected} public key: {reason}", path.display())]
    InvalidPem {
        /// The file.
        path: PathBuf,
        /// The key type the algorithms call for: `RSA`, `EC` or `Ed25519`.
        expected: &'static str,
        /// jsonwebtoken's words (no key material).
        reason: String,
    },
    /// The JWK set is not JSON, not a set, or has no key usable with the algorithms.
    #[error("jwt {setting} {location}: {reason}")]
    InvalidJwks {
        /// `jwks_file` or `jwks_url`.
        setting: &'static str,
        /// The path or URL.
        location: String,
        /// What is wrong.
        reason: String,
    },
    /// The JWKS URL is not an `http://` or `https://` URL.
    #[error("jwt jwks_url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The JWKS URL could not be fetched (refused, timed out, not 2xx, TLS failed), or
    /// the HTTP client could not be set up (no CA certificates for `https`).
    #[error("jwt jwks_url {url}: {reason}")]
    Fetch {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The claims list is empty.
    #[error("jwt claims: name at least one claim (the default is [\"sub\"])")]
    NoClaims,
    /// A claim name is empty or named twice.
    #[error("jwt claims: {name:?} {reason}")]
    InvalidClaimName {
        /// The name.
        name: String,
        /// `is empty` or `is named twice`.
        reason: &'static str,
    },
    /// `issuers` or `audiences` was set to an empty list: no token would pass.
    #[error("jwt {setting}: the list is empty, so no token would be accepted; leave it unset to skip the check")]
    EmptyList {
        /// `issuers` or `audiences`.
        setting: &'static str,
    },
    /// A duration out of range: a zero interval or timeout, a leeway over a day.
    #[error("jwt {setting}: {reason}")]
    InvalidDuration {
        /// `leeway`, `refresh_every`, `unknown_key_refresh_every` or `fetch_timeout`.
        setting: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A JWK set needs a Tokio runtime for its refresher, and `build` ran outside one.
    #[error("jwt {setting}: refreshing the keys needs a Tokio runtime; call build() inside one")]
    NoRuntime {
        /// `jwks_file` or `jwks_url`.
        setting: &'static str,
    },
}

impl JwtConfigError {
    /// The setting at fault, as a configuration file names it: `algorithms`, `secret`,
    /// `secret_file`, `pem_file`, `jwks_file`, `jwks_url`, `claims`, `issuers`,
    /// `audiences`, `refresh_every`, `unknown_key_refresh_every`, `fetch_timeout`, or
    /// `keys` when no key source is set.
    ///
    /// ```
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let error = JwtScope::builder().algorithms(["HS256"]).secret_file("/nonexistent").build().await.expect_err("no file");
    /// assert_eq!(error.setting(), "secret_file");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn setting(&self) -> &'static str {
        match self {
            Self::NoAlgorithms
            | Self::UnknownAlgorithm { .. }
            | Self::UnsignedAlgorithm
            | Self::AlgorithmDoesNotFitKey { .. } => "algorithms",
            Self::NoKeySource => "keys",
            Self::SeveralKeySources { second: setting, .. }
            | Self::EmptySecret { setting }
            | Self::ReadFile { setting, .. }
            | Self::InvalidJwks { setting, .. }
            | Self::EmptyList { setting }
            | Self::InvalidDuration { setting, .. }
            | Self::NoRuntime { setting } => setting,
            Self::InvalidPem { .. } => "pem_file",
            Self::InvalidUrl { .. } | Self::Fetch { .. } => "jwks_url",
            Self::NoClaims | Self::InvalidClaimName { .. } => "claims",
        }
    }
}

/// Sets up a [`JwtScope`]; every setting is named as a configuration file names it.
/// Nothing is checked until [`build`](Self::build), which reports the first bad setting.
///
/// ```
/// use std::time::Duration;
/// use oncely_http::scope::jwt::JwtScope;
///
/// let builder = JwtScope::builder()
///     .algorithms(["RS256", "ES256"])
///     .jwks_url("https://login.example.com/.well-known/jwks.json")
///     .claims(["sub", "tenant_id"])
///     .issuers(["https://login.example.com/"])
///     .audiences(["payments-api"])
///     .leeway(Duration::from_secs(30))
///     .refresh_every(Duration::from_secs(600));
/// # let _ = builder;
/// ```
#[derive(Clone)]
pub struct JwtScopeBuilder {
    algorithms: Vec<String>,
    keys: Vec<KeySetting>,
    claims: Vec<String>,
    issuers: Option<Vec<String>>,
    audiences: Option<Vec<String>>,
    leeway: Duration,
    refresh_every: Duration,
    unknown_key_refresh_every: Duration,
    fetch_timeout: Duration,
}

#[derive(Clone)]
enum KeySetting {
    Secret(Vec<u8>),
    SecretFile(PathBuf),
    PemFile(PathBuf),
    JwksFile(PathBuf),
    JwksUrl(String),
}

impl KeySetting {
    fn name(&self) -> &'static str {
        match self {
            Self::Secret(_) => "secret",
            Self::SecretFile(_) => "secret_file",
            Self::PemFile(_) => "pem_file",
            Self::JwksFile(_) => "jwks_file",
            Self::JwksUrl(_) => "jwks_url",
        }
    }
}

impl Default for JwtScopeBuilder {
    fn default() -> Self {
        Self {
            algorithms: Vec::new(),
            keys: Vec::new(),
            claims: vec!["sub".to_owned()],
            issuers: None,
            audiences: None,
            leeway: DEFAULT_LEEWAY,
            refresh_every: DEFAULT_REFRESH_EVERY,
            unknown_key_refresh_every: DEFAULT_UNKNOWN_KEY_REFRESH_EVERY,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
        }
    }
}

impl fmt::Debug for JwtScopeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret itself.
        let keys: Vec<String> = self
            .keys
            .iter()
            .map(|k| match k {
                KeySetting::Secret(_) => "secret".to_owned(),
                KeySetting::SecretFile(p) | KeySetting::PemFile(p) | KeySetting::JwksFile(p) => {
                    format!("{} {}", k.name(), p.display())
                }
                KeySetting::JwksUrl(url) => format!("jwks_url {url}"),
            })
            .collect();
        f.debug_struct("JwtScopeBuilder")
            .field("algorithms", &self.algorithms)
            .field("keys", &keys)
            .field("claims", &self.claims)
            .field("issuers", &self.issuers)
            .field("audiences", &self.audiences)
            .field("leeway", &self.leeway)
            .field("refresh_every", &self.refresh_every)
            .field("unknown_key_refresh_every", &self.unknown_key_refresh_every)
            .field("fetch_timeout", &self.fetch_timeout)
            .finish()
    }
}

impl JwtScopeBuilder {
    /// `algorithms`: the accepted signing algorithms by their JWA names, `HS256`,
    /// `HS384`, `HS512`, `RS256`, `RS384`, `RS512`, `PS256`, `PS384`, `PS512`, `ES256`,
    /// `ES384`, `EdDSA` (in any case). Required. A token whose header names another is
    /// refused; `none` is never accepted.
    ///
    /// ```
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// let builder = JwtScope::builder().algorithms(["RS256", "PS256"]);
    /// # let _ = builder;
    /// ```
    pub fn algorithms<S: AsRef<str>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.algorithms = names.into_iter().map(|n| n.as_ref().to_owned()).collect();
        self
    }

    /// `secret`: the HMAC secret, for `HS256`, `HS384`, `HS512`. One key source only.
    /// RFC 7518 asks for at least as many bytes as the hash (32 for `HS256`); a shorter
    /// secret is accepted with a warning.
    ///
    /// ```
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// let builder = JwtScope::builder().algorithms(["HS256"]).secret(*b"at least 32 bytes of shared secret");
    /// # let _ = builder;
    /// ```
    pub fn secret(self, secret: impl Into<Vec<u8>>) -> Self {
        self.key(KeySetting::Secret(secret.into()))
    }

    /// `secret_file`: a file holding the HMAC secret; one trailing newline (`\n` or
    /// `\r\n`) is not part of it. Read by `build`.
    ///
    /// ```
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// let builder = JwtScope::builder().algorithms(["HS256"]).secret_file("/run/secrets/jwt");
    /// # let _ = builder;
    /// ```
    pub fn secret_file(self, path: impl Into<PathBuf>) -> Self {
        self.key(KeySetting::SecretFile(path.into()))
    }

    /// `pem_file`: a file holding one public key in PEM (`BEGIN PUBLIC KEY`, `BEGIN RSA
    /// PUBLIC KEY`, or a certificate), read as the algorithms' family calls for: RSA for
    /// `RS*`/`PS*`, EC for `ES*`, Ed25519 for `EdDSA`. Read by `build`, never refreshed.
    ///
    /// ```
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// let builder = JwtScope::builder().algorithms(["ES256"]).pem_file("/etc/oncely/issuer.pem");
    /// # let _ = builder;
    /// ```
    pub fn pem_file(self, path: impl Into<PathBuf>) -> Self {
        self.key(KeySetting::PemFile(path.into()))
    }

    /// `jwks_file`: a file holding a JWK set (`{"keys": [...]}`), read by `build` and
    /// again on the refresh schedule (see the [module docs](self)).
    ///
    /// ```
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// let builder = JwtScope::builder().algorithms(["RS256"]).jwks_file("/etc/oncely/jwks.json");
    /// # let _ = builder;
    /// ```
    pub fn jwks_file(self, path: impl Into<PathBuf>) -> Self {
        self.key(KeySetting::JwksFile(path.into()))
    }

    /// `jwks_url`: an `https://` (or `http://`) URL serving a JWK set, fetched by
    /// `build` and again on the refresh schedule. `https` trusts the system's CA
    /// certificates; up to 5 redirects are followed, never from `https` to `http`. Plain
    /// `http` lets anyone on the path substitute keys and so forge any principal: `build`
    /// warns unless the host is a loopback address.
    ///
    /// ```
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// let builder = JwtScope::builder().algorithms(["RS256"]).jwks_url("https://issuer.example/.well-known/jwks.json");
    /// # let _ = builder;
    /// ```
    pub fn jwks_url(self, url: impl Into<String>) -> Self {
        self.key(KeySetting::JwksUrl(url.into()))
    }

    fn key(mut self, setting: KeySetting) -> Self {
        // The same setting twice: the last wins; two settings are an error at build.
        self.keys.retain(|k| k.name() != setting.name());
        self.keys.push(setting);
        self
    }

    /// `claims`: the claims whose values name the principal, in this order. Default
    /// `["sub"]`. A token without one of them (or with one that is not a non-empty string
    /// or a number) is refused.
    ///
    /// ```
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// let builder = JwtScope::builder().claims(["sub", "tenant_id"]);
    /// # let _ = builder;
    /// ```
    pub fn claims<S: AsRef<str>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.claims = names.into_iter().map(|n| n.as_ref().to_owned()).collect();
        self
    }

    /// `issuers`: the accepted `iss` values. When set, a token must have an `iss` and it
    /// must be one of them; unset (the default), `iss` is not checked.
    ///
    /// ```
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// let builder = JwtScope::builder().issuers(["https://login.example.com/"]);
    /// # let _ = builder;
    /// ```
    pub fn issuers<S: AsRef<str>>(mut self, issuers: impl IntoIterator<Item = S>) -> Self {
        self.issuers = Some(issuers.into_iter().map(|n| n.as_ref().to_owned()).collect());
        self
    }

    /// `audiences`: the accepted `aud` values. When set, a token must have an `aud` that
    /// names one of them; unset (the default), `aud` is not checked, so a token minted
    /// for another service of the same issuer is accepted too: set it where that matters.
    ///
    /// ```
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// let builder = JwtScope::builder().audiences(["payments-api"]);
    /// # let _ = builder;
    /// ```
    pub fn audiences<S: AsRef<str>>(mut self, audiences: impl IntoIterator<Item = S>) -> Self {
        self.audiences = Some(audiences.into_iter().map(|n| n.as_ref().to_owned()).collect());
        self
    }

    /// `leeway`: the clock skew allowed on `exp` and `nbf`, in whole seconds. Default 60 s;
    /// at most a day.
    ///
    /// ```
    /// use std::time::Duration;
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// let builder = JwtScope::builder().leeway(Duration::from_secs(5));
    /// # let _ = builder;
    /// ```
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// `refresh_every`: how often a JWK set is read again. Default 5 minutes.
    ///
    /// ```
    /// use std::time::Duration;
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// let builder = JwtScope::builder().refresh_every(Duration::from_secs(3600));
    /// # let _ = builder;
    /// ```
    pub fn refresh_every(mut self, every: Duration) -> Self {
        self.refresh_every = every;
        self
    }

    /// `unknown_key_refresh_every`: the least time between two refreshes woken by tokens
    /// naming a `kid` the set lacks. Default 30 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// let builder = JwtScope::builder().unknown_key_refresh_every(Duration::from_secs(60));
    /// # let _ = builder;
    /// ```
    pub fn unknown_key_refresh_every(mut self, every: Duration) -> Self {
        self.unknown_key_refresh_every = every;
        self
    }

    /// `fetch_timeout`: how long one fetch of a JWKS URL may take, connection included.
    /// Default 10 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// let builder = JwtScope::builder().fetch_timeout(Duration::from_secs(3));
    /// # let _ = builder;
    /// ```
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout;
        self
    }

    /// Checks the settings, reads the key (fetching a JWKS URL), and with a JWK set
    /// spawns its refresher, which needs a Tokio runtime (see the [module docs](self)).
    ///
    /// ```
    /// use oncely_http::scope::jwt::JwtScope;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
    /// let scope = JwtScope::builder().algorithms(["HS256"]).secret(*b"at least 32 bytes of shared secret").build().await?;
    /// # let _ = scope;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`JwtConfigError`] naming the first bad setting: no or an unknown algorithm, no or
    /// two key sources, an algorithm the key cannot verify, an unreadable file, a PEM
    /// that holds no such key, a JWK set that is not JSON or has no usable key, a URL
    /// that is not `http(s)` or cannot be fetched, an empty or repeated claim, an empty
    /// issuer or audience list, a zero interval or a leeway over a day, no Tokio runtime for a JWK set.
    pub async fn build(self) -> Result<JwtScope, JwtConfigError> {
        let algorithms = parse_algorithms(&self.algorithms)?;
        check_claims(&self.claims)?;
        for (setting, list) in [("issuers", &self.issuers), ("audiences", &self.audiences)] {
            if list.as_ref().is_some_and(Vec::is_empty) {
                return Err(JwtConfigError::EmptyList { setting });
            }
        }
        for (setting, interval) in [
            ("refresh_every", self.refresh_every),
            ("unknown_key_refresh_every", self.unknown_key_refresh_every),
            ("fetch_timeout", self.fetch_timeout),
        ] {
            if interval.is_zero() {
                return Err(JwtConfigError::InvalidDuration { setting, reason: "must be more than zero" });
            }
        }
        if self.leeway > MAX_LEEWAY {
            return Err(JwtConfigError::InvalidDuration { setting: "leeway", reason: "must be a day or less" });
        }
        let source = match self.keys.as_slice() {
            [] => return Err(JwtConfigError::NoKeySource),
            [one] => one.clone(),
            [first, second, ..] => {
                return Err(JwtConfigError::SeveralKeySources { first: first.name(), second: second.name() });
            }
        };
        let refresh = Refresh {
            every: self.refresh_every,
            unknown_key_every: self.unknown_key_refresh_every,
            fetch_timeout: self.fetch_timeout,
        };
        let keys = match source {
            KeySetting::Secret(secret) => Keys::secret(secret, "secret", &algorithms)?,
            KeySetting::SecretFile(path) => Keys::secret_file(&path, &algorithms)?,
            KeySetting::PemFile(path) => Keys::pem_file(&path, &algorithms)?,
            KeySetting::JwksFile(path) => Keys::jwks_file(path, &algorithms, refresh).await?,
            KeySetting::JwksUrl(url) => Keys::jwks_url(&url, &algorithms, refresh).await?,
        };
        let accepted = algorithms
            .iter()
            .map(|&(name, algorithm)| Accepted { name, algorithm, validation: self.validation(algorithm) })
            .collect();
        Ok(JwtScope { inner: Arc::new(Inner { accepted, claims: self.claims, keys }) })
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(issuers) = &self.issuers {
            validation.set_issuer(issuers);
            required.push("iss");
        }
        match &self.audiences {
            Some(audiences) => {
                validation.set_audience(audiences);
                required.push("aud");
            }
            // jsonwebtoken refuses any token that has an `aud` when no audience is set.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        validation
    }
}

fn parse_algorithms(names: &[String]) -> Result<Vec<(&'static str, Algorithm)>, JwtConfigError> {
    if names.is_empty() {
        return Err(JwtConfigError::NoAlgorithms);
    }
    let mut accepted: Vec<(&'static str, Algorithm)> = Vec::new();
    for name in names {
        let trimmed = name.trim();
        if trimmed.eq_ignore_ascii_case("none") {
            return Err(JwtConfigError::UnsignedAlgorithm);
        }
        let Some(&found) = ALGORITHMS.iter().find(|(known, _)| known.eq_ignore_ascii_case(trimmed)) else {
            return Err(JwtConfigError::UnknownAlgorithm { name: name.clone() });
        };
        if !accepted.contains(&found) {
            accepted.push(found);
        }
    }
    Ok(accepted)
}

fn check_claims(names: &[String]) -> Result<(), JwtConfigError> {
    if names.is_empty() {
        return Err(JwtConfigError::NoClaims);
    }
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() {
            return Err(JwtConfigError::InvalidClaimName { name: name.clone(), reason: "is empty" });
        }
        if names[..i].contains(name) {
            return Err(JwtConfigError::InvalidClaimName { name: name.clone(), reason: "is named twice" });
        }
        if ["exp", "iat", "nbf", "jti"].contains(&name.as_str()) {
            tracing::warn!(
                claim = %name,
                "a JWT scope claim that changes with every token: a refreshed token is a new principal"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use http::header;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::{Value, json};

    use super::token::MAX_TOKEN_LEN;
    use super::*;

    const SECRET: &[u8] = b"a test secret of at least 32 bytes";

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
    }

    fn scope(claims: &[&str]) -> JwtScope {
        runtime()
            .block_on(JwtScope::builder().algorithms(["HS256"]).secret(SECRET).claims(claims).build())
            .expect("valid settings")
    }

    fn token(claims: &Value) -> String {
        encode(&Header::default(), claims, &EncodingKey::from_secret(SECRET).expect("secret")).expect("signs")
    }

    fn later() -> u64 {
        jsonwebtoken::get_current_timestamp() + 600
    }

    #[test]
    fn principals_are_escaped_so_that_claim_sets_never_collide() {
        let scope = scope(&["sub", "tenant_id"]);
        let principal = |sub: Value, tenant: Value| {
            scope.principal_of_token(&token(&json!({ "sub": sub, "tenant_id": tenant, "exp": later() })))
        };
        assert_eq!(principal(json!("alice"), json!("t1")).as_deref(), Ok("sub=alice;tenant_id=t1"));
        assert_eq!(principal(json!("a@b.example"), json!(7)).as_deref(), Ok("sub=a@b.example;tenant_id=#7"));
        let sets = [
            (json!("a;tenant_id=b"), json!("c")),
            (json!("a"), json!("b;tenant_id=c")),
            (json!("a"), json!("b")),
            (json!("a;"), json!("b")),
            (json!("a="), json!("b")),
            (json!("a%3B"), json!("b")),
            (json!("a#"), json!("b")),
            (json!("#1"), json!("b")),
            (json!(1), json!("b")),
            (json!("1"), json!("b")),
            (json!(1.5), json!("b")),
            (json!("1.5"), json!("b")),
            (json!("é"), json!("b")),
            (json!("%C3%A9"), json!("b")),
            (json!("a b"), json!("b")),
            (json!("a+b"), json!("b")),
        ];
        let texts: Vec<String> =
            sets.iter().map(|(s, t)| principal(s.clone(), t.clone()).expect("a principal")).collect();
        for (i, a) in texts.iter().enumerate() {
            for b in &texts[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn claims_must_be_non_empty_strings_or_numbers() {
        let sub = scope(&["sub"]);
        let tenant_scope = scope(&["tenant_id"]);
        let principal =
            |tenant: Value| tenant_scope.principal_of_token(&token(&json!({ "tenant_id": tenant, "exp": later() })));
        for bad in [json!(""), json!(true), json!(["a"]), json!({"id": "a"})] {
            assert_eq!(principal(bad.clone()), Err(JwtRejection::InvalidClaim("tenant_id".to_owned())), "{bad}");
        }
        assert_eq!(principal(Value::Null), Err(JwtRejection::MissingClaim("tenant_id".to_owned())));
        assert_eq!(principal(json!(-3)).as_deref(), Ok("tenant_id=#-3"));
        // jsonwebtoken reads `sub` itself, and refuses a token whose `sub` is an array.
        for bad in [json!(""), json!(true), json!(["a"]), json!({"id": "a"})] {
            assert!(sub.principal_of_token(&token(&json!({ "sub": bad, "exp": later() }))).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_claim_named_twice_is_refused() {
        let scope = scope(&["sub"]);
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let exp = later();
        for payload in [
            format!(r#"{{"sub":"alice","sub":"bob","exp":{exp}}}"#),
            format!(r#"{{"sub":"alice","tenant":"a","tenant":"b","exp":{exp}}}"#),
        ] {
            let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload);
            let message = format!("{header}.{payload}");
            let key = EncodingKey::from_secret(SECRET).expect("key");
            let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).expect("signs");
            let token = format!("{message}.{signature}");
            assert_eq!(scope.principal_of_token(&token), Err(JwtRejection::Malformed));
        }
    }

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(header::AUTHORIZATION, http::HeaderValue::from_bytes(value).expect("a header value"));
        }
        headers
    }

    #[test]
    fn the_bearer_scheme_is_read_strictly_but_in_any_case() {
        let scope = scope(&["sub"]);
        let token = token(&json!({ "sub": "alice", "exp": later() }));
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let value = format!("{scheme} {token}");
            assert_eq!(scope.principal(&headers(&[value.as_bytes()])).as_deref(), Ok("sub=alice"), "{scheme}");
        }
        let spaced = format!("Bearer   {token}  ");
        assert_eq!(scope.principal(&headers(&[spaced.as_bytes()])).as_deref(), Ok("sub=alice"));
        let once = format!("Bearer {token}");
        assert_eq!(scope.principal(&headers(&[])), Err(JwtRejection::Missing));
        assert_eq!(
            scope.principal(&headers(&[once.as_bytes(), once.as_bytes()])),
            Err(JwtRejection::MultipleAuthorization)
        );
        for (value, rejection) in [
            (&b"Basic YWxpY2U6cw=="[..], JwtRejection::NotBearer),
            (b"Bearertoken", JwtRejection::NotBearer),
            (b"", JwtRejection::NotBearer),
            (b"Bearer", JwtRejection::Malformed),
            (b"Bearer ", JwtRejection::Malformed),
            (b"Bearer a b", JwtRejection::Malformed),
            (b"Bearer \xff\xfe.a.b", JwtRejection::Malformed),
        ] {
            assert_eq!(scope.principal(&headers(&[value])), Err(rejection), "{}", value.escape_ascii());
        }
    }

    #[test]
    fn garbage_is_malformed_and_never_a_panic() {
        let scope = scope(&["sub", "tenant_id"]);
        let good = token(&json!({ "sub": "alice", "tenant_id": "t", "exp": later() }));
        let mut fixed = vec![
            String::new(),
            ".".to_owned(),
            "..".to_owned(),
            "...".to_owned(),
            "a.b.c".to_owned(),
            "e30.e30.".to_owned(),
            "e30.e30.e30".to_owned(),
            "eyJhbGciOiJIUzI1NiJ9..".to_owned(),
            "eyJhbGciOiJIUzI1NiJ9.e30".to_owned(),
            "eyJhbGciOjF9.e30.e30".to_owned(),
            "W10.e30.e30".to_owned(),
            "bnVsbA.e30.e30".to_owned(),
            format!("{good}."),
            format!(".{good}"),
            good.replace('.', ".."),
            "a".repeat(MAX_TOKEN_LEN + 1),
        ];
        for i in 0..good.len() {
            fixed.push(good[..i].to_owned());
        }
        for token in &fixed {
            let result = scope.principal_of_token(token);
            assert!(result.is_err(), "{token:?}");
        }
        // Random bytes, and the good token with bytes flipped: a small deterministic fuzz.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \t\"{}:,";
        for round in 0..3000 {
            let mut bytes: Vec<u8> = if round % 2 == 0 {
                (0..next() % 200).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]).collect()
            } else {
                good.as_bytes().to_vec()
            };
            for _ in 0..=(next() % 4) {
                if bytes.is_empty() {
                    break;
                }
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = alphabet[(next() % alphabet.len() as u64) as usize];
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let _ = scope.principal_of_token(&text);
            let mut value = b"Bearer ".to_vec();
            value.extend_from_slice(&bytes);
            if let Ok(value) = http::HeaderValue::from_bytes(&value) {
                let mut map = HeaderMap::new();
                map.insert(header::AUTHORIZATION, value);
                let _ = scope.principal(&map);
            }
        }
        // Every byte value in a header, every position.
        for byte in 0..=255u8 {
            let mut value = format!("Bearer {good}").into_bytes();
            let at = usize::from(byte) % value.len();
            value[at] = byte;
            if let Ok(value) = http::HeaderValue::from_bytes(&value) {
                let mut map = HeaderMap::new();
                map.insert(header::AUTHORIZATION, value);
                let _ = scope.principal(&map);
            }
        }
    }

    #[test]
    fn configuration_names_its_setting() {
        let build = |builder: JwtScopeBuilder| runtime().block_on(builder.build()).expect_err("refused");
        let hs = || JwtScope::builder().algorithms(["HS256"]).secret(SECRET);
        assert_eq!(build(JwtScope::builder().secret(SECRET)).setting(), "algorithms");
        assert!(matches!(build(hs().algorithms(["none"])), JwtConfigError::UnsignedAlgorithm));
        assert!(matches!(build(hs().algorithms(["RS256"])), JwtConfigError::AlgorithmDoesNotFitKey { .. }));
        assert!(matches!(build(hs().claims(Vec::<String>::new())), JwtConfigError::NoClaims));
        assert!(matches!(build(hs().claims(["sub", "sub"])), JwtConfigError::InvalidClaimName { .. }));
        assert!(matches!(build(hs().claims([""])), JwtConfigError::InvalidClaimName { .. }));
        assert_eq!(build(hs().issuers(Vec::<String>::new())).setting(), "issuers");
        assert_eq!(build(hs().refresh_every(Duration::ZERO)).setting(), "refresh_every");
        assert_eq!(build(hs().leeway(Duration::from_secs(u64::MAX))).setting(), "leeway");
        assert_eq!(build(JwtScope::builder().algorithms(["HS256"])).setting(), "keys");
        assert_eq!(build(JwtScope::builder().algorithms(["HS256"]).secret(Vec::new())).setting(), "secret");
        let two = build(hs().jwks_url("https://issuer.example/jwks"));
        assert!(matches!(two, JwtConfigError::SeveralKeySources { first: "secret", second: "jwks_url" }));
        let message = build(hs().algorithms(["HS256", "XS1"])).to_string();
        assert!(message.starts_with("jwt algorithms: unknown algorithm \"XS1\""), "{message}");
    }

    #[test]
    fn a_scope_is_shared_across_threads() {
        fn shared<T: Clone + Send + Sync + 'static>() {}
        shared::<JwtScope>();
        shared::<JwtScopeBuilder>();
        fn error<T: std::error::Error + Send + Sync + 'static>() {}
        error::<JwtRejection>();
        error::<JwtConfigError>();
    }

    #[test]
    fn the_same_key_setting_twice_keeps_the_last() {
        let scope = runtime()
            .block_on(JwtScope::builder().algorithms(["HS256"]).secret(b"first".to_vec()).secret(SECRET).build())
            .expect("one key source");
        let token = token(&json!({ "sub": "alice", "exp": later() }));
        assert_eq!(scope.principal_of_token(&token).as_deref(), Ok("sub=alice"));
    }

    #[test]
    fn algorithm_names_are_read_in_any_case_and_outside_a_runtime_for_static_keys() {
        let scope = futures_free_block_on(JwtScope::builder().algorithms(["hs256", "HS256"]).secret(SECRET).build())
            .expect("valid");
        assert_eq!(format!("{scope:?}"), r#"JwtScope { algorithms: ["HS256"], claims: ["sub"], keys: "secret" }"#);
        let jwks = futures_free_block_on(JwtScope::builder().algorithms(["RS256"]).jwks_file("/nonexistent").build());
        assert!(matches!(jwks, Err(JwtConfigError::NoRuntime { setting: "jwks_file" })));
    }

    /// Polls a future that never waits (a build without a JWK set) without a runtime.
    fn futures_free_block_on<F: std::future::Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut context) {
            std::task::Poll::Ready(output) => output,
            std::task::Poll::Pending => panic!("the build waited"),
        }
    }
}
