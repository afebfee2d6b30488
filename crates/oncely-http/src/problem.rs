//! RFC 9457 problem details: every error this layer answers with.
//!
//! Each error has a stable `type`, a URN that clients can match on:
//!
//! | `type` | status | when |
//! |---|---|---|
//! | `urn:oncely:problem:missing-key` | 400 | the route requires a key and the request has none |
//! | `urn:oncely:problem:invalid-key` | 400 | empty, over 255 characters, not visible ASCII, a malformed sf-string, or two key fields |
//! | `urn:oncely:problem:body-unreadable` | 400 | the request body failed while being read |
//! | `urn:oncely:problem:body-too-large` | 413 | the request body (or, with `Content-Encoding: gzip`, the decoded body) is over the layer's limit; nothing was stored |
//! | `urn:oncely:problem:key-reused` | 422 | the key was first used for a request with another fingerprint |
//! | `urn:oncely:problem:request-in-progress` | 409 | a request with this key is running (with `Retry-After`) |
//! | `urn:oncely:problem:too-many-in-progress` | 429 | the request's principal already holds the layer's maximum of running operations; nothing ran (with `Retry-After`) |
//! | `urn:oncely:problem:store-unavailable` | 503 | the idempotency store failed; fail-closed (with `Retry-After`) |
//! | `urn:oncely:problem:store-full` | 503 | the store is at its bound (records or bytes) and takes no new key until records expire; nothing ran (with `Retry-After`) |
//! | `urn:oncely:problem:response-not-stored` | 500 | replay of an operation that completed but whose response could not be kept (over the size cap) |
//! | `urn:oncely:problem:handler-failed` | 500 | the inner service panicked or its response body failed |

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde::Serialize;

use crate::ResponseBody;

/// One kind of problem this layer reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// 400: required key absent.
    MissingKey,
    /// 400: key field malformed.
    InvalidKey,
    /// 400: the body failed while being read.
    BodyUnreadable,
    /// 413: body over the limit.
    BodyTooLarge,
    /// 422: key reused with another request.
    KeyReused,
    /// 409: the first request is still running.
    RequestInProgress,
    /// 429: the principal already holds as many running operations as it may.
    TooManyInProgress,
    /// 503: the store failed.
    StoreUnavailable,
    /// 503: the store is at its bound and takes no new key until records expire.
    StoreFull,
    /// 500: completed, response over the storage cap.
    ResponseNotStored,
    /// 500: the inner service failed unexpectedly.
    HandlerFailed,
}

impl ProblemKind {
    /// The stable `type` URI.
    pub const fn type_uri(self) -> &'static str {
        match self {
            Self::MissingKey => "urn:oncely:problem:missing-key",
            Self::InvalidKey => "urn:oncely:problem:invalid-key",
            Self::BodyUnreadable => "urn:oncely:problem:body-unreadable",
            Self::BodyTooLarge => "urn:oncely:problem:body-too-large",
            Self::KeyReused => "urn:oncely:problem:key-reused",
            Self::RequestInProgress => "urn:oncely:problem:request-in-progress",
            Self::TooManyInProgress => "urn:oncely:problem:too-many-in-progress",
            Self::StoreUnavailable => "urn:oncely:problem:store-unavailable",
            Self::StoreFull => "urn:oncely:problem:store-full",
            Self::ResponseNotStored => "urn:oncely:problem:response-not-stored",
            Self::HandlerFailed => "urn:oncely:problem:handler-failed",
        }
    }

    /// The HTTP status.
    pub const fn status(self) -> StatusCode {
        match self {
            Self::MissingKey | Self::InvalidKey | Self::BodyUnreadable => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RequestInProgress => StatusCode::CONFLICT,
            Self::TooManyInProgress => StatusCode::TOO_MANY_REQUESTS,
            Self::StoreUnavailable | Self::StoreFull => StatusCode::SERVICE_UNAVAILABLE,
            Self::ResponseNotStored | Self::HandlerFailed => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The short human title.
    pub const fn title(self) -> &'static str {
        match self {
            Self::MissingKey => "Idempotency-Key is missing",
            Self::InvalidKey => "Idempotency-Key is invalid",
            Self::BodyUnreadable => "The request body could not be read",
            Self::BodyTooLarge => "The request body is too large",
            Self::KeyReused => "Idempotency-Key was used for a different request",
            Self::RequestInProgress => "A request with this Idempotency-Key is in progress",
            Self::TooManyInProgress => "Too many requests of this client are in progress",
            Self::StoreUnavailable => "The idempotency store is unavailable",
            Self::StoreFull => "The idempotency store is full",
            Self::ResponseNotStored => "The original response was not stored",
            Self::HandlerFailed => "The request failed",
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    r#type: &'a str,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

/// A problem response of one of this layer's kinds.
pub(crate) fn problem(kind: ProblemKind, detail: &str, retry_after: Option<Duration>) -> http::Response<ResponseBody> {
    metrics::counter!("oncely_http_problems_total", "type" => kind.type_uri()).increment(1);
    problem_response(kind.type_uri(), kind.title(), kind.status(), detail, retry_after)
}

/// Any problem response: `application/problem+json` with `type`, `title`, `status` and
/// `detail`, and `Retry-After` in whole seconds (at least one) when given. For services
/// around the layer (the gateway's upstream errors) to answer in the same form.
///
/// ```
/// use http::StatusCode;
/// use oncely_http::problem::problem_response;
///
/// let response = problem_response(
///     "urn:example:problem:upstream-timeout",
///     "The upstream did not answer in time",
///     StatusCode::GATEWAY_TIMEOUT,
///     "no response within 30s",
///     None,
/// );
/// assert_eq!(response.headers()["content-type"], "application/problem+json");
/// ```
pub fn problem_response(
    type_uri: &str,
    title: &str,
    status: StatusCode,
    detail: &str,
    retry_after: Option<Duration>,
) -> http::Response<ResponseBody> {
    let body = Body { r#type: type_uri, title, status: status.as_u16(), detail };
    let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(json)).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    if let Some(after) = retry_after {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    response
}
