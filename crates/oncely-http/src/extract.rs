//! The axum extractor for the key.

use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, Response};
use http::HeaderName;
use http::request::Parts;
use oncely::IdempotencyKey;

use crate::problem::{ProblemKind, problem};
use crate::{KeyHeaderError, parse_key_header};

/// The request's idempotency key, for handlers that want it (to pass on to a payment
/// provider, say).
///
/// Behind [`IdempotencyLayer`](crate::IdempotencyLayer) it is the key the layer parsed
/// (whatever header name the layer reads); without the layer it is parsed from the
/// `Idempotency-Key` header. `Option<Idempotent>` accepts requests without one.
///
/// It reads the key; it does not say the request is protected. A request the layer
/// passed through (a method it does not cover, or a route it does not wrap) still has its
/// key read from the header.
///
/// ```
/// use axum::{Router, routing::post};
/// use oncely_http::Idempotent;
///
/// async fn pay(Idempotent(key): Idempotent) -> String {
///     format!("charged under {key}")
/// }
/// let app: Router = Router::new().route("/payments", post(pay));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotent(pub IdempotencyKey);

/// Why [`Idempotent`] rejected a request: a 400 problem.
#[derive(Debug)]
pub enum KeyRejection {
    /// No key field.
    Missing,
    /// The key field is invalid.
    Invalid(KeyHeaderError),
}

impl IntoResponse for KeyRejection {
    fn into_response(self) -> Response {
        let response = match self {
            Self::Missing => problem(ProblemKind::MissingKey, "this request needs an Idempotency-Key header", None),
            Self::Invalid(e) => problem(ProblemKind::InvalidKey, &e.to_string(), None),
        };
        response.map(axum_core::body::Body::new)
    }
}

fn read(parts: &Parts) -> Result<Option<IdempotencyKey>, KeyRejection> {
    if let Some(key) = parts.extensions.get::<IdempotencyKey>() {
        return Ok(Some(key.clone()));
    }
    parse_key_header(&parts.headers, &HeaderName::from_static("idempotency-key")).map_err(KeyRejection::Invalid)
}

impl<S: Send + Sync> FromRequestParts<S> for Idempotent {
    type Rejection = KeyRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        read(parts)?.map(Self).ok_or(KeyRejection::Missing)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Idempotent {
    type Rejection = KeyRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(read(parts)?.map(Self))
    }
}
