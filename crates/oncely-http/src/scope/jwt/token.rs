//! A bearer token read before and after verification: the `Authorization` field, the
//! header that chooses the algorithm and key, jsonwebtoken's errors as rejections, and
//! the verified claims as the principal's text.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use http::{HeaderMap, header};
use jsonwebtoken::errors::ErrorKind;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use super::JwtRejection;

/// Longer than any bearer token an issuer mints (large group claims included): a longer
/// one is refused before it is decoded.
pub(super) const MAX_TOKEN_LEN: usize = 64 * 1024;

/// What a token's header says before anything is verified: only enough to choose the
/// algorithm's checks and the key. jsonwebtoken reads the header again, strictly.
#[derive(Deserialize)]
pub(super) struct RawHeader {
    pub(super) alg: String,
    #[serde(default)]
    pub(super) kid: Option<String>,
}

/// The token of the request's one `Authorization` field, whose scheme must be `Bearer` in
/// any case (RFC 9110 §11.1), followed by one or more spaces and the token.
pub(super) fn bearer_token(headers: &HeaderMap) -> Result<&str, JwtRejection> {
    let mut fields = headers.get_all(header::AUTHORIZATION).iter();
    let field = match (fields.next(), fields.next()) {
        (None, _) => return Err(JwtRejection::Missing),
        (Some(field), None) => field,
        (Some(_), Some(_)) => return Err(JwtRejection::MultipleAuthorization),
    };
    let value = field.as_bytes().trim_ascii();
    let (scheme, credentials) = match value.iter().position(|&b| b == b' ') {
        Some(space) => (&value[..space], &value[space..]),
        None => (value, &b""[..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(JwtRejection::NotBearer);
    }
    let token = credentials.trim_ascii_start();
    if token.is_empty() {
        return Err(JwtRejection::Malformed);
    }
    // The token is checked character by character in `parse_header`.
    std::str::from_utf8(token).map_err(|_| JwtRejection::Malformed)
}

/// The header of a compact JWS: three base64url parts, the first a JSON object with a
/// string `alg`.
pub(super) fn parse_header(token: &str) -> Result<RawHeader, JwtRejection> {
    if token.len() > MAX_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(JwtRejection::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtRejection::Malformed);
    };
    if header.is_empty() || payload.is_empty() {
        return Err(JwtRejection::Malformed);
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).map_err(|_| JwtRejection::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| JwtRejection::Malformed)
}

/// What one key's failure to verify a token means.
pub(super) enum Verdict {
    /// This key did not verify the signature; another key of the set might.
    TryAnotherKey(JwtRejection),
    /// The signature verified (or the token is malformed whatever the key): this is the
    /// answer.
    Final(JwtRejection),
}

/// jsonwebtoken's error for one key, as a rejection: a signature or key error lets the
/// next key try; any other error came after the signature verified, or holds for every
/// key, so it is the answer.
pub(super) fn verdict(error: ErrorKind) -> Verdict {
    match error {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::InvalidAlgorithm
        | ErrorKind::UnsupportedAlgorithm => Verdict::TryAnotherKey(JwtRejection::BadSignature),
        ErrorKind::ExpiredSignature => Verdict::Final(JwtRejection::Expired),
        ErrorKind::ImmatureSignature => Verdict::Final(JwtRejection::NotYetValid),
        ErrorKind::InvalidIssuer => Verdict::Final(JwtRejection::WrongIssuer),
        ErrorKind::InvalidAudience => Verdict::Final(JwtRejection::WrongAudience),
        ErrorKind::MissingRequiredClaim(claim) => Verdict::Final(JwtRejection::MissingClaim(claim)),
        ErrorKind::InvalidClaimFormat(claim) => Verdict::Final(JwtRejection::InvalidClaim(claim)),
        ErrorKind::InvalidSubject => Verdict::Final(JwtRejection::InvalidClaim("sub".to_owned())),
        _ => Verdict::Final(JwtRejection::Malformed),
    }
}

/// A token's claims, every member; a member named twice is refused (JSON parsers
/// disagree on which one counts).
pub(super) struct ClaimSet(BTreeMap<String, Value>);

impl<'de> Deserialize<'de> for ClaimSet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;

        impl<'de> Visitor<'de> for Members {
            type Value = ClaimSet;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of claims")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ClaimSet, A::Error> {
                let mut claims = BTreeMap::new();
                while let Some((name, value)) = map.next_entry::<String, Value>()? {
                    if claims.insert(name, value).is_some() {
                        return Err(de::Error::custom("a claim is named twice"));
                    }
                }
                Ok(ClaimSet(claims))
            }
        }

        deserializer.deserialize_map(Members)
    }
}

/// The principal's text: `name=value` for each claim of `names`, in order, joined by
/// `;`. Strings are escaped by [`escape_into`], numbers written `#` and their JSON text,
/// so the text tells every claim set apart.
pub(super) fn principal(claims: &ClaimSet, names: &[String]) -> Result<String, JwtRejection> {
    let mut text = String::new();
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            text.push(';');
        }
        escape_into(&mut text, name);
        text.push('=');
        match claims.0.get(name) {
            None | Some(Value::Null) => return Err(JwtRejection::MissingClaim(name.clone())),
            Some(Value::String(value)) if !value.is_empty() => escape_into(&mut text, value),
            // A number's text is digits, `.`, `e`, `E`, `+` and `-`: never a delimiter.
            Some(Value::Number(value)) => {
                text.push('#');
                text.push_str(&value.to_string());
            }
            Some(_) => return Err(JwtRejection::InvalidClaim(name.clone())),
        }
    }
    Ok(text)
}

/// Appends `text` percent-encoded outside a readable safe set that holds none of the
/// principal's delimiters (`;`, `=`), its number mark (`#`) or `%` itself.
fn escape_into(out: &mut String, text: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &byte in text.as_bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~@:+/|".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xF)]));
        }
    }
}
