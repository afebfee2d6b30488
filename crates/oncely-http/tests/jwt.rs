//! `JwtScope` against real tokens: HMAC secrets, PEM keys, JWK sets in a file and behind
//! a URL, their rotation, and every way a token is refused. The RSA, EC and Ed25519 keys
//! are fixed test keys under `tests/keys/`.
#![cfg(feature = "jwt")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use http::HeaderMap;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use oncely_http::scope::jwt::{JwtConfigError, JwtRejection, JwtScope};
use serde_json::{Value, json};

const SECRET: &[u8] = b"a shared secret of at least 32 bytes";

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn key_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys").join(name)
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(key_path(name)).expect("a test key")
}

fn hmac() -> EncodingKey {
    EncodingKey::from_secret(SECRET).expect("a secret")
}

/// A signing key of the test keys, by file name.
fn signing_key(name: &str, algorithm: Algorithm) -> EncodingKey {
    let pem = pem(name);
    match algorithm {
        Algorithm::RS256 | Algorithm::PS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        _ => unreachable!("not a test key algorithm"),
    }
    .expect("a PEM private key")
}

fn sign(algorithm: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).expect("signs")
}

fn alice() -> Value {
    json!({ "sub": "alice", "iat": now(), "exp": now() + 600 })
}

fn bearer(token: &str) -> HeaderMap {
    bearer_as("Bearer", token)
}

fn bearer_as(scheme: &str, token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, format!("{scheme} {token}").parse().expect("a header value"));
    headers
}

async fn hs256() -> JwtScope {
    JwtScope::builder().algorithms(["HS256"]).secret(SECRET).build().await.expect("valid settings")
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact JWS from raw parts, for tokens jsonwebtoken would not mint.
fn raw_token(header: &str, claims: &Value, signature: &[u8]) -> String {
    format!("{}.{}.{}", b64(header), b64(claims.to_string()), b64(signature))
}

#[tokio::test]
async fn hs256_names_the_principal_by_sub_and_a_refresh_keeps_it() {
    let scope = hs256().await;
    let first =
        sign(Algorithm::HS256, None, &hmac(), &json!({ "sub": "alice", "iat": now() - 900, "exp": now() + 600 }));
    let refreshed =
        sign(Algorithm::HS256, None, &hmac(), &json!({ "sub": "alice", "iat": now(), "exp": now() + 3600 }));
    assert_ne!(first, refreshed, "two different tokens");
    assert_eq!(scope.principal(&bearer(&first)).as_deref(), Ok("sub=alice"));
    assert_eq!(
        scope.principal(&bearer(&refreshed)).as_deref(),
        Ok("sub=alice"),
        "a refreshed token: the same principal"
    );
    let bob = sign(Algorithm::HS256, None, &hmac(), &json!({ "sub": "bob", "exp": now() + 600 }));
    assert_eq!(scope.principal(&bearer(&bob)).as_deref(), Ok("sub=bob"));
}

#[tokio::test]
async fn the_scheme_is_case_insensitive() {
    let scope = hs256().await;
    let token = sign(Algorithm::HS256, None, &hmac(), &alice());
    for scheme in ["Bearer", "bearer", "BEARER"] {
        assert_eq!(scope.principal(&bearer_as(scheme, &token)).as_deref(), Ok("sub=alice"), "{scheme}");
    }
    assert_eq!(scope.principal(&bearer_as("Basic", &token)), Err(JwtRejection::NotBearer));
    assert_eq!(scope.principal(&HeaderMap::new()), Err(JwtRejection::Missing));
    let mut two = bearer(&token);
    two.append(http::header::AUTHORIZATION, format!("Bearer {token}").parse().expect("a header value"));
    assert_eq!(scope.principal(&two), Err(JwtRejection::MultipleAuthorization));
}

#[tokio::test]
async fn a_token_signed_with_another_secret_is_refused() {
    let scope = hs256().await;
    let other = EncodingKey::from_secret(b"another secret, also 32 bytes long").expect("a secret");
    let forged = sign(Algorithm::HS256, None, &other, &alice());
    assert_eq!(scope.principal(&bearer(&forged)), Err(JwtRejection::BadSignature));
    // The right signature over other claims.
    let genuine = sign(Algorithm::HS256, None, &hmac(), &alice());
    let signature = genuine.rsplit('.').next().expect("three parts");
    let claims = json!({ "sub": "mallory", "exp": now() + 600 });
    let tampered = format!("{}.{}.{signature}", b64(r#"{"alg":"HS256","typ":"JWT"}"#), b64(claims.to_string()));
    assert_eq!(scope.principal(&bearer(&tampered)), Err(JwtRejection::BadSignature));
}

#[tokio::test]
async fn unsigned_tokens_are_never_accepted() {
    let scope = hs256().await;
    let claims = json!({ "sub": "alice", "exp": now() + 600 });
    for header in [r#"{"alg":"none"}"#, r#"{"alg":"none","typ":"JWT"}"#, r#"{"alg":"None"}"#, r#"{"alg":"NONE"}"#] {
        let token = raw_token(header, &claims, b"");
        assert_eq!(scope.principal(&bearer(&token)), Err(JwtRejection::AlgorithmNotAllowed), "{header}");
    }
    // An accepted algorithm with no signature.
    let token = raw_token(r#"{"alg":"HS256"}"#, &claims, b"");
    assert_eq!(scope.principal(&bearer(&token)), Err(JwtRejection::BadSignature));
    // An algorithm that is not in the list.
    let hs512 = sign(Algorithm::HS512, None, &hmac(), &claims);
    assert_eq!(scope.principal(&bearer(&hs512)), Err(JwtRejection::AlgorithmNotAllowed));
}

#[tokio::test]
async fn expiry_and_not_before_are_checked_with_a_leeway() {
    let scope = hs256().await;
    let token = |claims: Value| sign(Algorithm::HS256, None, &hmac(), &claims);
    let expired = token(json!({ "sub": "alice", "exp": now() - 3600 }));
    assert_eq!(scope.principal(&bearer(&expired)), Err(JwtRejection::Expired));
    let just_expired = token(json!({ "sub": "alice", "exp": now() - 10 }));
    assert_eq!(scope.principal(&bearer(&just_expired)).as_deref(), Ok("sub=alice"), "within the 60 s leeway");
    let strict = JwtScope::builder()
        .algorithms(["HS256"])
        .secret(SECRET)
        .leeway(Duration::ZERO)
        .build()
        .await
        .expect("valid settings");
    assert_eq!(strict.principal(&bearer(&just_expired)), Err(JwtRejection::Expired));
    let early = token(json!({ "sub": "alice", "nbf": now() + 3600, "exp": now() + 7200 }));
    assert_eq!(scope.principal(&bearer(&early)), Err(JwtRejection::NotYetValid));
    let started = token(json!({ "sub": "alice", "nbf": now() - 5, "exp": now() + 600 }));
    assert_eq!(scope.principal(&bearer(&started)).as_deref(), Ok("sub=alice"));
    let no_exp = token(json!({ "sub": "alice" }));
    assert_eq!(scope.principal(&bearer(&no_exp)), Err(JwtRejection::MissingClaim("exp".to_owned())));
    let text_exp = token(json!({ "sub": "alice", "exp": "tomorrow" }));
    // jsonwebtoken reads an `exp` that is not a number as no `exp`.
    let refused = scope.principal(&bearer(&text_exp));
    assert!(
        matches!(&refused, Err(JwtRejection::MissingClaim(c) | JwtRejection::InvalidClaim(c)) if c == "exp"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_token_without_the_claims_is_refused() {
    let scope = hs256().await;
    let no_sub = sign(Algorithm::HS256, None, &hmac(), &json!({ "exp": now() + 600, "email": "alice@example.com" }));
    assert_eq!(scope.principal(&bearer(&no_sub)), Err(JwtRejection::MissingClaim("sub".to_owned())));
    assert_eq!(JwtRejection::MissingClaim("sub".to_owned()).to_string(), "the token has no sub claim");
}

#[tokio::test]
async fn tenants_with_one_subject_are_different_principals() {
    let scope = JwtScope::builder()
        .algorithms(["HS256"])
        .secret(SECRET)
        .claims(["sub", "tenant_id"])
        .build()
        .await
        .expect("valid settings");
    let token = |tenant: Value| {
        sign(Algorithm::HS256, None, &hmac(), &json!({ "sub": "alice", "tenant_id": tenant, "exp": now() + 600 }))
    };
    let t1 = scope.principal(&bearer(&token(json!("t1")))).expect("a principal");
    let t2 = scope.principal(&bearer(&token(json!("t2")))).expect("a principal");
    assert_eq!(t1, "sub=alice;tenant_id=t1");
    assert_ne!(t1, t2);
    assert_eq!(scope.principal(&bearer(&token(json!(42)))).as_deref(), Ok("sub=alice;tenant_id=#42"));
    let untenanted = sign(Algorithm::HS256, None, &hmac(), &alice());
    assert_eq!(scope.principal(&bearer(&untenanted)), Err(JwtRejection::MissingClaim("tenant_id".to_owned())));
}

#[tokio::test]
async fn issuers_and_audiences_when_configured() {
    let scope = JwtScope::builder()
        .algorithms(["HS256"])
        .secret(SECRET)
        .issuers(["https://login.example.com/"])
        .audiences(["payments"])
        .build()
        .await
        .expect("valid settings");
    let token = |extra: Value| {
        let mut claims = json!({ "sub": "alice", "exp": now() + 600 });
        claims.as_object_mut().expect("an object").extend(extra.as_object().expect("an object").clone());
        scope.principal(&bearer(&sign(Algorithm::HS256, None, &hmac(), &claims)))
    };
    let iss = "https://login.example.com/";
    assert_eq!(token(json!({ "iss": iss, "aud": "payments" })).as_deref(), Ok("sub=alice"));
    assert_eq!(token(json!({ "iss": iss, "aud": ["ledger", "payments"] })).as_deref(), Ok("sub=alice"));
    assert_eq!(token(json!({ "iss": "https://evil.example/", "aud": "payments" })), Err(JwtRejection::WrongIssuer));
    assert_eq!(token(json!({ "aud": "payments" })), Err(JwtRejection::MissingClaim("iss".to_owned())));
    assert_eq!(token(json!({ "iss": iss, "aud": "ledger" })), Err(JwtRejection::WrongAudience));
    assert_eq!(token(json!({ "iss": iss })), Err(JwtRejection::MissingClaim("aud".to_owned())));
    // Unconfigured, neither is checked.
    let open = hs256().await;
    let any =
        sign(Algorithm::HS256, None, &hmac(), &json!({ "sub": "alice", "iss": "x", "aud": "y", "exp": now() + 600 }));
    assert_eq!(open.principal(&bearer(&any)).as_deref(), Ok("sub=alice"));
}

#[tokio::test]
async fn garbage_is_malformed() {
    let scope = hs256().await;
    for garbage in ["x", "a.b", "a.b.c", "a.b.c.d", "!!!.???.***", "...", "e30.e30.e30"] {
        assert_eq!(scope.principal(&bearer(garbage)), Err(JwtRejection::Malformed), "{garbage}");
    }
    // The signature is checked before the claims are read: garbage claims unsigned are a
    // bad signature, signed they are malformed.
    let message = format!("{}.{}", b64(r#"{"alg":"HS256"}"#), b64("not json"));
    assert_eq!(scope.principal(&bearer(&format!("{message}.{}", b64("sig")))), Err(JwtRejection::BadSignature));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &hmac(), Algorithm::HS256).expect("signs");
    assert_eq!(scope.principal(&bearer(&format!("{message}.{signature}"))), Err(JwtRejection::Malformed));
    let good = sign(Algorithm::HS256, None, &hmac(), &alice());
    for cut in 0..good.len() {
        assert!(scope.principal(&bearer(&good[..cut])).is_err(), "{cut}");
    }
}

#[tokio::test]
async fn a_secret_file_loses_its_trailing_newline() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("secret");
    let mut contents = SECRET.to_vec();
    contents.extend_from_slice(b"\r\n");
    std::fs::write(&path, contents).expect("writes");
    let scope = JwtScope::builder().algorithms(["HS256"]).secret_file(&path).build().await.expect("valid settings");
    let token = sign(Algorithm::HS256, None, &hmac(), &alice());
    assert_eq!(scope.principal(&bearer(&token)).as_deref(), Ok("sub=alice"));
    let debug = format!("{:?}", JwtScope::builder().secret(SECRET));
    assert!(!debug.contains("shared secret") && !debug.contains("97, 32"), "{debug}");
}

#[tokio::test]
async fn pem_public_keys_for_rs256_ps256_es256_and_eddsa() {
    for (algorithm, name, private, public) in [
        (Algorithm::RS256, "RS256", "rsa1.pem", "rsa1.pub.pem"),
        (Algorithm::PS256, "PS256", "rsa1.pem", "rsa1.pub.pem"),
        (Algorithm::ES256, "ES256", "ec1.pem", "ec1.pub.pem"),
        (Algorithm::EdDSA, "EdDSA", "ed1.pem", "ed1.pub.pem"),
    ] {
        let scope = JwtScope::builder()
            .algorithms([name])
            .pem_file(key_path(public))
            .build()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let token = sign(algorithm, Some("ignored"), &signing_key(private, algorithm), &alice());
        assert_eq!(scope.principal(&bearer(&token)).as_deref(), Ok("sub=alice"), "{name}");
        let hs = sign(Algorithm::HS256, None, &hmac(), &alice());
        assert_eq!(scope.principal(&bearer(&hs)), Err(JwtRejection::AlgorithmNotAllowed), "{name}");
    }
    let rs = JwtScope::builder().algorithms(["RS256"]).pem_file(key_path("rsa1.pub.pem")).build().await.expect("valid");
    let other = sign(Algorithm::RS256, None, &signing_key("rsa2.pem", Algorithm::RS256), &alice());
    assert_eq!(rs.principal(&bearer(&other)), Err(JwtRejection::BadSignature));
}

#[tokio::test]
async fn an_hmac_token_keyed_with_the_public_key_is_refused() {
    // The classic confusion: sign HS256 with the RSA public key's PEM as the secret.
    let public = pem("rsa1.pub.pem");
    let confused = sign(Algorithm::HS256, None, &EncodingKey::from_secret(&public).expect("a secret"), &alice());
    let rs = JwtScope::builder().algorithms(["RS256"]).pem_file(key_path("rsa1.pub.pem")).build().await.expect("valid");
    assert_eq!(rs.principal(&bearer(&confused)), Err(JwtRejection::AlgorithmNotAllowed));
    let error = JwtScope::builder().algorithms(["RS256", "HS256"]).pem_file(key_path("rsa1.pub.pem")).build().await;
    assert!(
        matches!(error, Err(JwtConfigError::AlgorithmDoesNotFitKey { algorithm: "HS256", key_setting: "pem_file" })),
        "{error:?}"
    );
    // A JWK set that accepts both: the RSA key is never an HMAC secret.
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("jwks.json");
    write_jwks(&path, &[("k1", "rsa1.pem", Algorithm::RS256)]);
    let both = JwtScope::builder().algorithms(["RS256", "HS256"]).jwks_file(&path).build().await.expect("valid");
    let confused = sign(Algorithm::HS256, Some("k1"), &EncodingKey::from_secret(&public).expect("a secret"), &alice());
    assert_eq!(both.principal(&bearer(&confused)), Err(JwtRejection::UnknownKey));
}

/// The public JWK of a test key, with its `kid` and `alg`.
fn jwk(kid: &str, private: &str, algorithm: Algorithm) -> Jwk {
    let mut jwk = Jwk::from_encoding_key(&signing_key(private, algorithm), algorithm).expect("a public JWK");
    jwk.common.key_id = Some(kid.to_owned());
    jwk
}

fn jwks(keys: &[(&str, &str, Algorithm)]) -> String {
    let set = JwkSet { keys: keys.iter().map(|&(kid, private, algorithm)| jwk(kid, private, algorithm)).collect() };
    serde_json::to_string(&set).expect("serialises")
}

/// Replaces the file whole, so that a reader never sees half of it.
fn write_jwks(path: &Path, keys: &[(&str, &str, Algorithm)]) {
    write_atomically(path, jwks(keys).as_bytes());
}

fn write_atomically(path: &Path, bytes: &[u8]) {
    let next = path.with_extension("next");
    std::fs::write(&next, bytes).expect("writes");
    std::fs::rename(&next, path).expect("renames");
}

/// Polls `check` every 10 ms for up to 10 s.
async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

#[tokio::test]
async fn a_jwks_file_chooses_keys_by_kid() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("jwks.json");
    write_jwks(&path, &[("k1", "rsa1.pem", Algorithm::RS256), ("k2", "ec1.pem", Algorithm::ES256)]);
    let scope = JwtScope::builder().algorithms(["RS256", "ES256"]).jwks_file(&path).build().await.expect("valid");
    let rsa = signing_key("rsa1.pem", Algorithm::RS256);
    let ec = signing_key("ec1.pem", Algorithm::ES256);
    assert_eq!(
        scope.principal(&bearer(&sign(Algorithm::RS256, Some("k1"), &rsa, &alice()))).as_deref(),
        Ok("sub=alice")
    );
    assert_eq!(
        scope.principal(&bearer(&sign(Algorithm::ES256, Some("k2"), &ec, &alice()))).as_deref(),
        Ok("sub=alice")
    );
    // k1's kid on a token that another RSA key signed.
    let other = signing_key("rsa2.pem", Algorithm::RS256);
    assert_eq!(
        scope.principal(&bearer(&sign(Algorithm::RS256, Some("k1"), &other, &alice()))),
        Err(JwtRejection::BadSignature)
    );
    // The EC key's kid with an RSA algorithm: no key of that kid fits.
    assert_eq!(
        scope.principal(&bearer(&sign(Algorithm::RS256, Some("k2"), &rsa, &alice()))),
        Err(JwtRejection::UnknownKey)
    );
    assert_eq!(
        scope.principal(&bearer(&sign(Algorithm::RS256, Some("k9"), &rsa, &alice()))),
        Err(JwtRejection::UnknownKey)
    );
    // No kid: the set's keys for the algorithm are tried.
    assert_eq!(scope.principal(&bearer(&sign(Algorithm::ES256, None, &ec, &alice()))).as_deref(), Ok("sub=alice"));
    assert_eq!(scope.principal(&bearer(&sign(Algorithm::RS256, None, &rsa, &alice()))).as_deref(), Ok("sub=alice"));
    assert_eq!(
        scope.principal(&bearer(&sign(Algorithm::RS256, None, &other, &alice()))),
        Err(JwtRejection::BadSignature)
    );
}

#[tokio::test]
async fn a_rotated_jwks_file_is_read_again_on_an_unknown_kid() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("jwks.json");
    write_jwks(&path, &[("k1", "rsa1.pem", Algorithm::RS256)]);
    // Never on the schedule during the test: only the unknown kid can bring k2 in.
    let scope = JwtScope::builder()
        .algorithms(["RS256"])
        .jwks_file(&path)
        .refresh_every(Duration::from_secs(3600))
        .build()
        .await
        .expect("valid");
    write_jwks(&path, &[("k1", "rsa1.pem", Algorithm::RS256), ("k2", "rsa2.pem", Algorithm::RS256)]);
    let rotated = sign(Algorithm::RS256, Some("k2"), &signing_key("rsa2.pem", Algorithm::RS256), &alice());
    assert_eq!(scope.principal(&bearer(&rotated)), Err(JwtRejection::UnknownKey), "not read yet: refused at once");
    assert!(eventually(|| scope.principal(&bearer(&rotated)).is_ok()).await, "read again after the unknown kid");
    let old = sign(Algorithm::RS256, Some("k1"), &signing_key("rsa1.pem", Algorithm::RS256), &alice());
    assert_eq!(scope.principal(&bearer(&old)).as_deref(), Ok("sub=alice"));
}

#[tokio::test]
async fn a_jwks_file_is_read_again_on_schedule_and_a_bad_read_keeps_the_keys() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("jwks.json");
    write_jwks(&path, &[("k1", "ec1.pem", Algorithm::ES256)]);
    let scope = JwtScope::builder()
        .algorithms(["ES256", "EdDSA"])
        .jwks_file(&path)
        .refresh_every(Duration::from_millis(20))
        .build()
        .await
        .expect("valid");
    let ec = sign(Algorithm::ES256, Some("k1"), &signing_key("ec1.pem", Algorithm::ES256), &alice());
    let ed = sign(Algorithm::EdDSA, Some("k2"), &signing_key("ed1.pem", Algorithm::EdDSA), &alice());
    assert_eq!(scope.principal(&bearer(&ec)).as_deref(), Ok("sub=alice"));
    // k1 retired, k2 brought in: the schedule alone picks it up.
    write_jwks(&path, &[("k2", "ed1.pem", Algorithm::EdDSA)]);
    assert!(eventually(|| scope.principal(&bearer(&ed)).is_ok()).await, "k2 in use");
    assert_eq!(scope.principal(&bearer(&ec)), Err(JwtRejection::UnknownKey), "k1 retired");
    // A broken file: the refresh fails, and the keys in use stay.
    write_atomically(&path, b"{ not json");
    let error = scope.refresh_keys().await.expect_err("not JSON");
    assert!(matches!(&error, JwtConfigError::InvalidJwks { setting: "jwks_file", .. }), "{error}");
    std::fs::remove_file(&path).expect("removes");
    let error = scope.refresh_keys().await.expect_err("gone");
    assert!(matches!(&error, JwtConfigError::ReadFile { setting: "jwks_file", .. }), "{error}");
    tokio::time::sleep(Duration::from_millis(100)).await; // several failed scheduled reads
    assert_eq!(scope.principal(&bearer(&ed)).as_deref(), Ok("sub=alice"));
}

/// A JWKS endpoint on loopback that counts its fetches and can be made to fail.
struct Issuer {
    jwks: Mutex<String>,
    fetches: AtomicUsize,
    failing: AtomicBool,
}

async fn serve(issuer: Arc<Issuer>) -> String {
    let app = Router::new().route(
        "/.well-known/jwks.json",
        get(move || {
            let issuer = Arc::clone(&issuer);
            async move {
                issuer.fetches.fetch_add(1, Ordering::SeqCst);
                if issuer.failing.load(Ordering::SeqCst) {
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
                let body = issuer.jwks.lock().expect("not poisoned").clone();
                let response: Response = ([(http::header::CONTENT_TYPE, "application/json")], body).into_response();
                response
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let address: SocketAddr = listener.local_addr().expect("an address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}/.well-known/jwks.json")
}

#[tokio::test]
async fn a_jwks_url_is_fetched_and_refreshed_on_an_unknown_kid_at_most_so_often() {
    let issuer = Arc::new(Issuer {
        jwks: Mutex::new(jwks(&[("k1", "ec1.pem", Algorithm::ES256)])),
        fetches: AtomicUsize::new(0),
        failing: AtomicBool::new(false),
    });
    let url = serve(Arc::clone(&issuer)).await;
    let scope = JwtScope::builder()
        .algorithms(["ES256", "RS256"])
        .jwks_url(&url)
        .refresh_every(Duration::from_secs(3600))
        .build()
        .await
        .expect("valid");
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), 1, "fetched by build");
    let ec = sign(Algorithm::ES256, Some("k1"), &signing_key("ec1.pem", Algorithm::ES256), &alice());
    assert_eq!(scope.principal(&bearer(&ec)).as_deref(), Ok("sub=alice"));

    // The issuer rotates in an RSA key.
    *issuer.jwks.lock().expect("not poisoned") =
        jwks(&[("k1", "ec1.pem", Algorithm::ES256), ("k2", "rsa1.pem", Algorithm::RS256)]);
    let rsa = signing_key("rsa1.pem", Algorithm::RS256);
    let rotated = sign(Algorithm::RS256, Some("k2"), &rsa, &alice());
    assert!(eventually(|| scope.principal(&bearer(&rotated)).is_ok()).await, "fetched again after the unknown kid");
    let after_rotation = issuer.fetches.load(Ordering::SeqCst);
    assert_eq!(after_rotation, 2, "one fetch for the unknown kid");

    // A flood of made-up kids wakes at most one fetch per 30 s: none now.
    for i in 0..50 {
        let made_up = raw_token(&format!(r#"{{"alg":"RS256","kid":"made-up-{i}"}}"#), &alice(), b"signature");
        assert_eq!(scope.principal(&bearer(&made_up)), Err(JwtRejection::UnknownKey));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), after_rotation, "rate-limited");

    // The issuer fails: the refresh is an error, the keys in use stay.
    issuer.failing.store(true, Ordering::SeqCst);
    let error = scope.refresh_keys().await.expect_err("503");
    assert!(matches!(&error, JwtConfigError::Fetch { .. }) && error.to_string().contains("503"), "{error}");
    assert_eq!(scope.principal(&bearer(&rotated)).as_deref(), Ok("sub=alice"));
    assert_eq!(scope.principal(&bearer(&ec)).as_deref(), Ok("sub=alice"));
}

#[tokio::test]
async fn a_jwks_url_that_fails_at_build_is_an_error() {
    let issuer = Arc::new(Issuer {
        jwks: Mutex::new("{\"keys\": []}".to_owned()),
        fetches: AtomicUsize::new(0),
        failing: AtomicBool::new(false),
    });
    let url = serve(Arc::clone(&issuer)).await;
    let empty = JwtScope::builder().algorithms(["RS256"]).jwks_url(&url).build().await.expect_err("no keys");
    assert!(matches!(&empty, JwtConfigError::InvalidJwks { setting: "jwks_url", .. }), "{empty}");
    issuer.failing.store(true, Ordering::SeqCst);
    let failing = JwtScope::builder().algorithms(["RS256"]).jwks_url(&url).build().await.expect_err("503");
    assert_eq!(failing.setting(), "jwks_url");
    // Nothing listens on port 9 of loopback (discard is not run here).
    let refused = JwtScope::builder()
        .algorithms(["RS256"])
        .jwks_url("http://127.0.0.1:9/jwks.json")
        .build()
        .await
        .expect_err("refused");
    assert!(matches!(&refused, JwtConfigError::Fetch { .. }), "{refused}");
    let hidden = JwtScope::builder()
        .algorithms(["RS256"])
        .jwks_url("http://issuer:hunter2@127.0.0.1:9/jwks.json")
        .build()
        .await
        .expect_err("refused");
    assert!(!hidden.to_string().contains("hunter2") && hidden.to_string().contains("***"), "{hidden}");
    let scheme =
        JwtScope::builder().algorithms(["RS256"]).jwks_url("ftp://issuer.example/jwks").build().await.expect_err("ftp");
    assert!(matches!(&scheme, JwtConfigError::InvalidUrl { .. }), "{scheme}");
}

#[tokio::test]
async fn bad_key_settings_are_named_errors() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let missing = dir.path().join("missing.json");
    let build = |builder: oncely_http::scope::jwt::JwtScopeBuilder| builder.build();

    let error = build(JwtScope::builder().algorithms(["RS256"]).jwks_file(&missing)).await.expect_err("no file");
    assert!(matches!(&error, JwtConfigError::ReadFile { setting: "jwks_file", .. }), "{error}");
    assert!(error.to_string().contains("missing.json"), "{error}");

    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "[1, 2").expect("writes");
    let error = build(JwtScope::builder().algorithms(["RS256"]).jwks_file(&garbage)).await.expect_err("not JSON");
    assert!(matches!(&error, JwtConfigError::InvalidJwks { setting: "jwks_file", .. }), "{error}");

    let only_ec = dir.path().join("ec.json");
    write_jwks(&only_ec, &[("k1", "ec1.pem", Algorithm::ES256)]);
    let error = build(JwtScope::builder().algorithms(["RS256"]).jwks_file(&only_ec)).await.expect_err("no RSA key");
    assert!(error.to_string().contains("none of its 1 keys can verify RS256"), "{error}");

    let error =
        build(JwtScope::builder().algorithms(["RS256"]).pem_file(key_path("ec1.pub.pem"))).await.expect_err("EC");
    assert!(matches!(&error, JwtConfigError::InvalidPem { expected: "RSA", .. }), "{error}");
    let error = build(JwtScope::builder().algorithms(["HS256"]).secret_file(&missing)).await.expect_err("no file");
    assert_eq!(error.setting(), "secret_file");
    let error = build(JwtScope::builder().algorithms(["RS256", "ES256"]).pem_file(key_path("rsa1.pub.pem")))
        .await
        .expect_err("two families");
    assert!(matches!(&error, JwtConfigError::AlgorithmDoesNotFitKey { algorithm: "ES256", .. }), "{error}");
    let error = build(JwtScope::builder().algorithms(["RS256", "XS256"]).pem_file(key_path("rsa1.pub.pem")))
        .await
        .expect_err("unknown");
    assert!(matches!(&error, JwtConfigError::UnknownAlgorithm { name } if name == "XS256"), "{error}");
    assert!(error.to_string().contains("XS256"));
    let error = build(JwtScope::builder().algorithms(["none"]).secret(SECRET)).await.expect_err("none");
    assert!(matches!(error, JwtConfigError::UnsignedAlgorithm));
    let error =
        build(JwtScope::builder().algorithms(Vec::<String>::new()).secret(SECRET)).await.expect_err("no algorithm");
    assert!(matches!(error, JwtConfigError::NoAlgorithms));
    let error = build(JwtScope::builder().algorithms(["HS256"]).secret(SECRET).pem_file(key_path("rsa1.pub.pem")))
        .await
        .expect_err("two sources");
    assert!(matches!(error, JwtConfigError::SeveralKeySources { first: "secret", second: "pem_file" }));
}
