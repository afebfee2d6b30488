//! The `Idempotency-Key` layer for Tower and axum.
//!
//! Add one layer and every covered request carrying an `Idempotency-Key` runs once: the
//! first request executes, a retry with the same key and the same request gets the
//! stored status, headers and body back byte for byte (with `Idempotent-Replayed: true`,
//! as Stripe does), and a concurrent duplicate never executes twice. The semantics are
//! those of the IETF draft draft-ietf-httpapi-idempotency-key-header.
//!
//! ```
//! use axum::{Router, routing::post};
//! use oncely::{ConflictMode, MemoryStore, Oncely};
//! use oncely_http::IdempotencyLayer;
//! use std::time::Duration;
//!
//! let oncely = Oncely::builder(MemoryStore::new())
//!     .retention(Duration::from_secs(24 * 3600))
//!     .conflict_mode(ConflictMode::Wait { timeout: Duration::from_secs(10) })
//!     .build()
//!     .expect("valid settings");
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(|| async { (axum::http::StatusCode::CREATED, "charged") }))
//!     .route_layer(IdempotencyLayer::new(oncely).require_key(true));
//! ```
//!
//! Prefer `Router::route_layer` to `Router::layer`: `layer` also wraps the router's
//! fallback, so with `require_key(true)` a POST to an unknown path is answered 400
//! instead of 404. Both work; the layer is a plain `tower::Layer` for any `http`
//! service (hyper, tonic) too.
//!
//! # What each request gets
//!
//! | the request | the answer |
//! |---|---|
//! | method not covered (default: all but POST and PATCH) | passed through untouched |
//! | no key, key optional (the default) | passed through untouched |
//! | no key, [`require_key(true)`](IdempotencyLayer::require_key) | 400 `missing-key` |
//! | malformed key: empty, over 255 chars, not visible ASCII, bad sf-string, two key fields | 400 `invalid-key` |
//! | body over [`max_body`](IdempotencyLayer::max_body), or a gzip body that decodes past [`max_decoded_body`](IdempotencyLayer::max_decoded_body) | 413 `body-too-large`, nothing stored |
//! | new key | executed once; the response as produced |
//! | retry of a completed key, same fingerprint | stored status, headers and body; `Idempotent-Replayed: true` |
//! | same key, different fingerprint | 422 `key-reused` ([`mismatch_status`](IdempotencyLayer::mismatch_status) to change) |
//! | retry while the first runs, wait mode (the engine's default) | waits up to the engine's timeout (10 s), then the replay (or 409) |
//! | same, reject mode | 409 `request-in-progress`, `Retry-After: 1` |
//! | the inner service answered 408, 425, 429 or 503, or marked its answer [`NotProcessed`] | the answer; the key is released, a retry runs again |
//! | it answered any other status (a 500 included: it may have acted first) | stored and replayed |
//! | no answer within [`answer_within`](IdempotencyLayer::answer_within) | 504 `upstream-timeout`; the operation goes on, and its answer is stored for the retry |
//! | the outcome is unknown: an `Err`, a response body that broke off, or [`OutcomeUnknown`] | 502 `outcome-unknown`, to this client and every retry, until the key is deleted ([`hold_unknown_outcomes`](IdempotencyLayer::hold_unknown_outcomes)) |
//! | the principal already runs [`max_in_progress_per_scope`](IdempotencyLayer::max_in_progress_per_scope) operations | 429 `too-many-in-progress`, `Retry-After`, nothing ran |
//! | store unavailable | 503 `store-unavailable`, `Retry-After` (fail-closed); passed through if [`fail_open`](IdempotencyLayer::fail_open) |
//!
//! Every error is `application/problem+json` (RFC 9457) with the `error` member and the
//! `Stripe-Should-Retry` header that retrying SDKs read; the [`problem`] module lists the
//! stable `type` of each. [`IdempotencyLayer::policy`] describes the layer for
//! publishing (the draft asks servers to document their policy).
//!
//! # Details
//!
//! - **Key field**: an sf-string (`"8e03…"`) or a bare token (`8e03…`), the same key.
//! - **Fingerprint**: method, path and query, media type and body; JSON bodies are
//!   canonicalised without recursion, gzip bodies decoded (bounded), bodies over 32 KiB
//!   fingerprinted off the async worker threads ([`request_fingerprint`]).
//! - **Takeovers**: a request that takes over a lapsed claim (its first attempt may have
//!   acted) reaches the inner service with `Idempotency-Takeover: true` and the
//!   [`Takeover`] extension.
//! - **Scope** (who owns a key): a hash of the `Authorization` and `Cookie` fields by
//!   default; named cookies, a verified JWT claim, a trusted proxy's header, or a
//!   function of the request ([`scope`](IdempotencyLayer::scope), and the [`scope`]
//!   module for what each protects against). A request whose source cannot find its
//!   principal is 401 `unauthenticated`.
//! - **Key from the body**: [`key_from_body`](IdempotencyLayer::key_from_body) takes the
//!   key from a JSON member (webhook deliveries, queue messages);
//!   [`fingerprint_ignore`](IdempotencyLayer::fingerprint_ignore) and
//!   [`fingerprint_headers`](IdempotencyLayer::fingerprint_headers) shape the
//!   fingerprint; media types are compared normalised (`application/json` and
//!   `application/json; charset=UTF-8` are the same).
//! - **What is stored**: every status but 408, 425, 429 and 503, which release the key so
//!   a retry runs again ([`store_statuses`](IdempotencyLayer::store_statuses)).
//! - **Access log**: one line per keyed request that reached its claim (target
//!   `oncely::access`: method, path, the storage key's hash, outcome, status,
//!   microseconds), written when it is done, also for a client that hung up; its
//!   answer carries the [`KeyedOutcome`] extension. A server that writes its own lines
//!   hands the layer an [`AccessLog`] ([`access_log`](IdempotencyLayer::access_log)).
//! - **Replayed headers**: all but hop-by-hop ones, `Date` and `Set-Cookie`
//!   ([`not_replayed_headers`](IdempotencyLayer::not_replayed_headers)). Response
//!   trailers are not stored.
//! - **Size cap** on stored responses: see
//!   [`max_stored_response`](IdempotencyLayer::max_stored_response).
//! - **Disconnects**: the inner service runs in its own task; a client that hangs up
//!   does not cancel it, and its response is stored for the retry.
//! - **Failures after the request ran**: if the response body fails midway, or the inner
//!   service returns an `Err` or marks its response [`OutcomeUnknown`], nobody knows
//!   whether the operation took effect: the key is held as an unknown outcome (or, with
//!   `hold_unknown_outcomes(false)`, left to lapse with its lease). A panic in the inner
//!   service leaves the key to lapse with its lease (500 `handler-failed`). Put timeouts
//!   *outside* this layer, or use [`answer_within`](IdempotencyLayer::answer_within): a
//!   timeout's 408 inside it releases the key, and a retry could run an operation that
//!   a cancelled handler had half done.

mod access;
mod counters;
mod detach;
mod hop_by_hop;
mod key_header;
mod layer;
pub mod problem;
mod request;
pub mod scope;
mod service;
mod settings;
mod stored;
/// Fuzzing only: decodes a stored response; `Ok(true)` when its encoding decodes to it again.
#[cfg(fuzzing)]
#[doc(hidden)]
pub fn fuzz_stored_response(bytes: Bytes) -> Result<bool, &'static str> {
    stored::StoredResponse::decode(bytes).map(|r| stored::StoredResponse::decode(r.encode()).as_ref() == Ok(&r))
}

#[cfg(feature = "axum")]
mod extract;

use bytes::Bytes;

pub use access::{Access, AccessLog, TracingAccessLog};
pub use hop_by_hop::strip_hop_by_hop;
pub use key_header::{KeyHeaderError, parse_key_header};
pub use layer::{IdempotencyLayer, Policy, default_stored_status};
pub use problem::ProblemKind;
pub use request::{
    DecodedBodyTooLarge, FingerprintRules, KeyFromBodyError, key_from_json_body, request_fingerprint,
    request_fingerprint_with,
};
pub use scope::{ScopeRejection, ScopeSource};
pub use service::{Idempotency, ResponseFuture};
pub use stored::{StoredKind, stored_kind};

#[cfg(feature = "axum")]
pub use extract::{Idempotent, KeyRejection};

/// A response extension by which the inner service says it cannot tell whether the
/// operation took effect (a proxy whose upstream connection broke after the request was
/// sent, or that gave up waiting). The layer then holds the key as an unknown outcome
/// (see [`IdempotencyLayer::hold_unknown_outcomes`]): retries get 502 `outcome-unknown`
/// until an operator deletes the key; it never runs twice.
///
/// ```
/// use http::{Response, StatusCode};
/// use oncely_http::OutcomeUnknown;
///
/// let mut response = Response::new(());
/// *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
/// response.extensions_mut().insert(OutcomeUnknown);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutcomeUnknown;

/// A response extension by which the inner service says the operation did not run (a
/// proxy whose upstream refused the connection, so nothing was sent): the layer releases
/// the key whatever the status, and a retry runs again.
///
/// ```
/// use http::{Response, StatusCode};
/// use oncely_http::NotProcessed;
///
/// let mut response = Response::new(());
/// *response.status_mut() = StatusCode::BAD_GATEWAY;
/// response.extensions_mut().insert(NotProcessed);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NotProcessed;

/// A response extension the layer adds to the answer of every keyed request that reached
/// its claim: what became of it (`executed`, `replayed`, `waited`, `conflict`,
/// `mismatch`, `unknown`, `released`, `still_running`, `refused`, `failed_open`). The
/// layer has written that request's access line (target `oncely::access`, with the
/// storage key's hash) by then, even for a client that hung up; a server that logs its
/// own lines can skip those.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyedOutcome(pub &'static str);

/// A request extension the layer adds when the request takes over a claim whose holder's
/// lease lapsed: the holder may have crashed after acting, so this request may repeat one
/// the handler already saw. A handler that can check its own state first should. The
/// same news goes out as the `Idempotency-Takeover: true` request header (see
/// [`IdempotencyLayer::takeover_header`]).
///
/// ```
/// use axum::Extension;
/// use oncely_http::Takeover;
///
/// async fn charge(takeover: Option<Extension<Takeover>>) -> &'static str {
///     if takeover.is_some() {
///         // look the charge up before creating it again
///     }
///     "charged"
/// }
/// # let _ = charge;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Takeover;

/// A boxed error, as the bodies here carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The body the inner service receives: the buffered body of a keyed request (`Left`),
/// or the untouched body of a passed-through one (`Right`).
pub type RequestBody<B> = http_body_util::Either<http_body_util::Full<Bytes>, B>;

/// The body of every response from the layer.
pub type ResponseBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// The README's snippets, compiled and run as doc tests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
