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
//! | same key, different fingerprint | 422 `key-reused` |
//! | retry while the first runs, reject mode | 409 `request-in-progress`, `Retry-After` |
//! | same, wait mode | waits up to the engine's timeout, then the replay (or 409) |
//! | the principal already runs [`max_in_progress_per_scope`](IdempotencyLayer::max_in_progress_per_scope) operations | 429 `too-many-in-progress`, `Retry-After`, nothing ran |
//! | store unavailable | 503 `store-unavailable`, `Retry-After` (fail-closed); passed through if [`fail_open`](IdempotencyLayer::fail_open) |
//!
//! Every error is `application/problem+json` (RFC 9457); the [`problem`] module lists
//! the stable `type` of each.
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
//! - **Scope**: a hash of the `Authorization` header by default
//!   ([`scope_headers`](IdempotencyLayer::scope_headers),
//!   [`scope_with`](IdempotencyLayer::scope_with)).
//! - **What is stored**: every status but 5xx, 408 and 429, which release the key so a
//!   retry runs again ([`store_statuses`](IdempotencyLayer::store_statuses)).
//! - **Replayed headers**: all but hop-by-hop ones, `Date` and `Set-Cookie`
//!   ([`not_replayed_headers`](IdempotencyLayer::not_replayed_headers)). Response
//!   trailers are not stored.
//! - **Size cap** on stored responses: see
//!   [`max_stored_response`](IdempotencyLayer::max_stored_response).
//! - **Disconnects**: the inner service runs in its own task; a client that hangs up
//!   does not cancel it, and its response is stored for the retry.
//! - **Failures after the request ran**: if the response body fails midway, or the inner
//!   service panics, the outcome is unknown, so the key is neither stored nor released:
//!   it lapses with its lease (500 `handler-failed` for this request). An inner service
//!   can say the same of a response it produced with the [`OutcomeUnknown`] extension.
//!   An `Err` from the inner service is treated the same way. So is a status: put
//!   timeouts *outside* this layer, or the timeout's 408 (which releases the key) can
//!   let a retry run an operation that a cancelled handler had half done.

mod hop_by_hop;
mod key_header;
mod layer;
pub mod problem;
mod request;
mod service;
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

pub use hop_by_hop::strip_hop_by_hop;
pub use key_header::{KeyHeaderError, parse_key_header};
pub use layer::{IdempotencyLayer, default_stored_status};
pub use problem::ProblemKind;
pub use request::{DecodedBodyTooLarge, ScopeSource, request_fingerprint};
pub use service::{Idempotency, ResponseFuture};

#[cfg(feature = "axum")]
pub use extract::{Idempotent, KeyRejection};

/// A response extension by which the inner service says it cannot tell whether the
/// operation took effect (a proxy whose upstream timed out after the request was sent).
/// The layer then neither stores the response nor releases the key: the key stays in
/// progress until its lease lapses, and a retry after that runs the operation again.
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
