//! RFC 9457 problem details: every error this layer answers with.
//!
//! Each error has a stable `type`, a URN that clients can match on:
//!
//! | `type` | status | when |
//! |---|---|---|
//! | `urn:oncely:problem:unauthenticated` | 401 | the route's scope source found no principal (no or a bad token, no trusted header); nothing ran (`WWW-Authenticate: Bearer` when a token is expected) |
//! | `urn:oncely:problem:missing-key` | 400 | the route requires a key and the request has none |
//! | `urn:oncely:problem:invalid-key` | 400 | empty, over 255 characters, not visible ASCII, a malformed sf-string, or two key fields |
//! | `urn:oncely:problem:body-unreadable` | 400 | the request body failed while being read |
//! | `urn:oncely:problem:body-too-large` | 413 | the request body (or, with `Content-Encoding: gzip`, the decoded body) is over the layer's limit; nothing was stored |
//! | `urn:oncely:problem:key-reused` | 422 (or the layer's [`mismatch_status`](crate::IdempotencyLayer::mismatch_status)) | the key was first used for a request with another fingerprint |
//! | `urn:oncely:problem:request-in-progress` | 409 | a request with this key is running (with `Retry-After`) |
//! | `urn:oncely:problem:too-many-in-progress` | 429 | the request's principal already holds the layer's maximum of running operations; nothing ran (with `Retry-After`) |
//! | `urn:oncely:problem:store-unavailable` | 503 | the idempotency store failed; fail-closed (with `Retry-After`) |
//! | `urn:oncely:problem:store-full` | 503 | the store is at its bound (records or bytes) and takes no new key until records expire; nothing ran (with `Retry-After`) |
//! | `urn:oncely:problem:response-not-stored` | 500 | replay of an operation that completed but whose response could not be kept (over the size cap) |
//! | `urn:oncely:problem:handler-failed` | 500 | the inner service panicked or its response body failed |
//! | `urn:oncely:problem:upstream-timeout` | 504 | the inner service gave no response within the layer's [`answer_within`](crate::IdempotencyLayer::answer_within); it goes on, and a retry gets its result |
//! | `urn:oncely:problem:outcome-unknown` | 502 | replay of an operation whose outcome nobody knows (its connection broke after the request was sent, or it ran past its limit); held until an operator deletes the key |
//!
//! # For clients that retry by themselves
//!
//! Beside the RFC 9457 members (`type`, `title`, `status`, `detail`) every body has an
//! `error` member, `{"type", "code", "message"}` (and `doc_url` when the layer has a
//! [documentation URL](crate::IdempotencyLayer::documentation_url)), because SDKs such as
//! Stripe's raise an error only for a body that has one: without it a 409 or 422 would
//! come back to the caller as if it were the result. `error.type` is `idempotency_error`
//! for a reused key, a conflict and an unknown outcome (Stripe's SDKs raise their
//! `IdempotencyError` for it), `invalid_request_error` for the other 4xx answers, and
//! `api_error` for the rest; `error.code` is the problem's name with `_`
//! (`key_reused`).
//!
//! The `Stripe-Should-Retry` header says whether trying again can help: `true` on 409,
//! 429, 503 and 504, `false` on the other 4xx answers, on unknown outcomes and on
//! replayed errors (a retry would get the same answer).

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
    /// 401: the scope source found no principal.
    Unauthenticated,
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
    /// 504: no response within the layer's time to answer; the operation goes on.
    UpstreamTimeout,
    /// 502: nobody knows whether the operation took effect; held for an operator.
    OutcomeUnknown,
}

impl ProblemKind {
    /// The stable `type` URI.
    pub const fn type_uri(self) -> &'static str {
        match self {
            Self::Unauthenticated => "urn:oncely:problem:unauthenticated",
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
            Self::UpstreamTimeout => "urn:oncely:problem:upstream-timeout",
            Self::OutcomeUnknown => "urn:oncely:problem:outcome-unknown",
        }
    }

    /// The HTTP status.
    pub const fn status(self) -> StatusCode {
        match self {
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::MissingKey | Self::InvalidKey | Self::BodyUnreadable => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RequestInProgress => StatusCode::CONFLICT,
            Self::TooManyInProgress => StatusCode::TOO_MANY_REQUESTS,
            Self::StoreUnavailable | Self::StoreFull => StatusCode::SERVICE_UNAVAILABLE,
            Self::ResponseNotStored | Self::HandlerFailed => StatusCode::INTERNAL_SERVER_ERROR,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::OutcomeUnknown => StatusCode::BAD_GATEWAY,
        }
    }

    /// The short human title.
    pub const fn title(self) -> &'static str {
        match self {
            Self::Unauthenticated => "The request's principal could not be established",
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
            Self::UpstreamTimeout => "The request did not finish in time; it goes on, and a retry gets its result",
            Self::OutcomeUnknown => "The outcome of the request with this Idempotency-Key is unknown",
        }
    }

    /// The `error.type` an SDK reads: `idempotency_error` for a reused key, a conflict
    /// and an unknown outcome, `invalid_request_error` for the other 4xx, else `api_error`.
    pub const fn error_type(self) -> &'static str {
        match self {
            Self::KeyReused | Self::RequestInProgress | Self::OutcomeUnknown => "idempotency_error",
            Self::Unauthenticated | Self::MissingKey | Self::InvalidKey | Self::BodyUnreadable | Self::BodyTooLarge => {
                "invalid_request_error"
            }
            _ => "api_error",
        }
    }

    /// The `error.code`: the name in the `type` URI, with `_` (`key_reused`).
    pub fn error_code(self) -> String {
        code_of(self.type_uri())
    }

    /// Whether trying again can help, for `Stripe-Should-Retry`: `Some(false)` when a
    /// retry would get the same answer.
    pub const fn should_retry(self) -> Option<bool> {
        match self {
            Self::RequestInProgress
            | Self::TooManyInProgress
            | Self::StoreUnavailable
            | Self::StoreFull
            | Self::UpstreamTimeout => Some(true),
            Self::Unauthenticated
            | Self::MissingKey
            | Self::InvalidKey
            | Self::BodyUnreadable
            | Self::BodyTooLarge
            | Self::KeyReused
            | Self::OutcomeUnknown
            | Self::ResponseNotStored
            | Self::HandlerFailed => Some(false),
        }
    }
}

/// `urn:oncely:problem:key-reused` → `key_reused`.
fn code_of(type_uri: &str) -> String {
    type_uri.rsplit(':').next().unwrap_or(type_uri).replace(['-', '/', '.'], "_")
}

/// The response header that tells an SDK whether trying again can help.
pub const SHOULD_RETRY: http::HeaderName = http::HeaderName::from_static("stripe-should-retry");

#[derive(Serialize)]
struct Body<'a> {
    r#type: &'a str,
    title: &'a str,
    status: u16,
    detail: &'a str,
    error: ErrorMember<'a>,
}

#[derive(Serialize)]
struct ErrorMember<'a> {
    r#type: &'a str,
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    doc_url: Option<&'a str>,
}

/// A problem response of one of this layer's kinds, with its status, `error.type` and
/// `Stripe-Should-Retry` as [`ProblemKind`] says, and no documentation link.
pub(crate) fn problem(kind: ProblemKind, detail: &str, retry_after: Option<Duration>) -> http::Response<ResponseBody> {
    Problem::of(kind, detail).retry_after(retry_after).response()
}

/// A problem response being put together: for services around the layer (the gateway's
/// upstream errors) to answer in the layer's form.
///
/// ```
/// use http::StatusCode;
/// use oncely_http::problem::Problem;
///
/// let response = Problem::new("urn:example:problem:upstream-timeout", "The upstream did not answer in time")
///     .status(StatusCode::GATEWAY_TIMEOUT)
///     .detail("no response within 30s")
///     .should_retry(true)
///     .response();
/// assert_eq!(response.headers()["stripe-should-retry"], "true");
/// ```
#[derive(Clone, Debug)]
pub struct Problem<'a> {
    type_uri: &'a str,
    title: &'a str,
    status: StatusCode,
    detail: &'a str,
    retry_after: Option<Duration>,
    error_type: Option<&'a str>,
    should_retry: Option<bool>,
    doc_url: Option<&'a str>,
}

impl<'a> Problem<'a> {
    /// A 500 problem of this `type` and `title`; `error.type` follows the status
    /// (`invalid_request_error` for 4xx, else `api_error`) unless set.
    pub fn new(type_uri: &'a str, title: &'a str) -> Self {
        Self {
            type_uri,
            title,
            status: StatusCode::INTERNAL_SERVER_ERROR,
            detail: "",
            retry_after: None,
            error_type: None,
            should_retry: None,
            doc_url: None,
        }
    }

    /// One of the layer's own problems.
    pub fn of(kind: ProblemKind, detail: &'a str) -> Self {
        metrics::counter!("oncely_http_problems_total", "type" => kind.type_uri()).increment(1);
        Self {
            status: kind.status(),
            detail,
            error_type: Some(kind.error_type()),
            should_retry: kind.should_retry(),
            ..Self::new(kind.type_uri(), kind.title())
        }
    }

    /// The status.
    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The human explanation of this occurrence (`detail`, and `error.message`).
    pub fn detail(mut self, detail: &'a str) -> Self {
        self.detail = detail;
        self
    }

    /// `Retry-After` in whole seconds, at least one.
    pub fn retry_after(mut self, after: Option<Duration>) -> Self {
        self.retry_after = after;
        self
    }

    /// `error.type`.
    pub fn error_type(mut self, error_type: &'a str) -> Self {
        self.error_type = Some(error_type);
        self
    }

    /// `Stripe-Should-Retry: true|false`.
    pub fn should_retry(mut self, retry: bool) -> Self {
        self.should_retry = Some(retry);
        self
    }

    /// A documentation URL: `error.doc_url` and `Link: <url>; rel="describedby"`.
    pub fn documentation(mut self, url: Option<&'a str>) -> Self {
        self.doc_url = url;
        self
    }

    /// The response.
    pub fn response(self) -> http::Response<ResponseBody> {
        let code = code_of(self.type_uri);
        let error_type = self.error_type.unwrap_or(if self.status.is_client_error() {
            "invalid_request_error"
        } else {
            "api_error"
        });
        let body = Body {
            r#type: self.type_uri,
            title: self.title,
            status: self.status.as_u16(),
            detail: self.detail,
            error: ErrorMember { r#type: error_type, code: &code, message: self.detail, doc_url: self.doc_url },
        };
        let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = Response::new(Full::new(Bytes::from(json)).map_err(|never| match never {}).boxed_unsync());
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        let should_retry = self.should_retry.or(match self.status.as_u16() {
            409 | 429 | 503 | 504 => Some(true),
            400..=499 => Some(false),
            _ => None,
        });
        if let Some(retry) = should_retry {
            headers.insert(SHOULD_RETRY, HeaderValue::from_static(if retry { "true" } else { "false" }));
        }
        if let Some(link) =
            self.doc_url.and_then(|url| HeaderValue::try_from(format!("<{url}>; rel=\"describedby\"")).ok())
        {
            headers.insert(header::LINK, link);
        }
        response
    }
}

/// Any problem response: `application/problem+json` with `type`, `title`, `status`,
/// `detail` and the `error` member, `Retry-After` in whole seconds (at least one) when
/// given, and `Stripe-Should-Retry` by the status (`true` on 409, 429, 503 and 504,
/// `false` on the other 4xx). For services around the layer (the gateway's upstream
/// errors) to answer in the same form; [`Problem`] sets the rest.
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
    Problem::new(type_uri, title).status(status).detail(detail).retry_after(retry_after).response()
}
