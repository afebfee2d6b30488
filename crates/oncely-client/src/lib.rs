//! The client half of idempotency: [`reqwest`] middleware that attaches an
//! `Idempotency-Key` to each mutation and retries it, with the same key, while a retry
//! can help.
//!
//! A server with Oncely (the `oncely-http` layer, or the `oncely` gateway in front of any
//! API) runs the first request with a key and answers every retry with the stored
//! result. This crate is the other half: it makes the key, keeps it across the retries of
//! one logical call, retries only what a retry can fix, and says what happened.
//!
//! ```no_run
//! use oncely_client::{CallOutcome, IdempotencyMiddleware};
//! use reqwest_middleware::ClientBuilder;
//!
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let client = ClientBuilder::new(reqwest::Client::new()).with(IdempotencyMiddleware::new()).build();
//! let response = client.post("http://127.0.0.1:7100/payments").body(r#"{"amount":1999}"#).send().await?;
//! let outcome = response.extensions().get::<CallOutcome>().expect("POST is covered");
//! println!("{} after {} attempt(s), replayed: {}", response.status(), outcome.attempts, outcome.replayed);
//! # Ok(()) }
//! ```
//!
//! Without `reqwest-middleware`: [`send`] or [`IdempotencyMiddleware::send`] take a plain
//! `reqwest::Client` and a `reqwest::Request`.
//!
//! # What is retried
//!
//! | the attempt got | what the client does |
//! |---|---|
//! | a connection error, a time-out, a connection broken before the answer | retries |
//! | 409 (the first attempt still runs), 425, 429 | retries, after `Retry-After` if sent |
//! | 5xx other than 501 and 505 | retries, after `Retry-After` if sent |
//! | `Stripe-Should-Retry: false` | stops, whatever the status |
//! | `Stripe-Should-Retry: true` on a 5xx or other non-4xx error | retries |
//! | any other 4xx (400, 408, 422…), even with `Stripe-Should-Retry: true` | stops: sending it again cannot change a refusal |
//! | a replay (`Idempotent-Replayed: true`) | stops: the server would replay the same answer |
//! | a success | stops |
//!
//! Attempts are bounded ([`RetryPolicy::max_attempts`]) and so is the whole call
//! ([`RetryPolicy::deadline`]); waits grow exponentially with full jitter. A request whose
//! body is a stream cannot be sent twice: it gets one attempt, and the outcome says
//! [`StopReason::BodyNotReplayable`] (and a `tracing` warning says so).
//!
//! # What is reported
//!
//! - A response (whatever its status, unless it is a problem): the
//!   [`CallOutcome`] extension, with the key, the attempts, whether it was a replay and
//!   why the call stopped.
//! - A problem (`application/problem+json`, status 400 or more), a transport failure, or
//!   the deadline: an [`Error`] with the same report and, for a problem, its `type`,
//!   `title`, `detail` ([`Problem`]). Through the middleware it arrives inside
//!   `reqwest_middleware::Error::Middleware`: [`Error::find`] gets it.
//!
//! # Tracing
//!
//! One `oncely_client.call` span (INFO) per logical call, with the method, host, path, a
//! hash of the key ([`key_hash`], never the key itself), and at the end the attempts,
//! status, replay and stop reason; one `oncely_client.attempt` span (DEBUG) per attempt,
//! with its status; a DEBUG event before each retry.

mod call;
mod error;
mod key;
mod middleware;
mod policy;

pub use call::{RetryCause, RetryEvent};
pub use error::{CallOutcome, Error, ErrorKind, Problem, StopReason};
pub use key::{KeyFn, KeyFormat, KeySource, decode_key, encode_key, key_hash};
pub use middleware::{IdempotencyMiddleware, send};
pub use policy::{RetryPolicy, STRIPE_SHOULD_RETRY, parse_retry_after};

/// The key type, re-exported from `oncely`.
pub use oncely::IdempotencyKey;
