//! The access log of keyed requests: what a line says ([`Access`]) and who writes it
//! ([`AccessLog`]; by default [`TracingAccessLog`], a `tracing` event).
//!
//! The layer writes one line per keyed request that reached its claim, when the request
//! is done (also for a client that hung up). It asks [`AccessLog::enabled`] before the
//! request, so a log that is off costs the request nothing but that question, and calls
//! [`AccessLog::log`] once at the end.

use std::fmt;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use oncely::StorageKey;

/// One keyed request's access line, handed to an [`AccessLog`] when the request is done.
///
/// The fields are those of the default line (target `oncely::access`). More may be
/// added, so outside this crate it is built with [`Access::new`] and its fields set after.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Access<'a> {
    /// The request's method.
    pub method: &'a Method,
    /// The request's path, without its query.
    pub path: &'a str,
    /// The storage key the request claimed: a hash of the scope and the key, never the
    /// key itself. `None` when the request was refused before its key was derived.
    pub key: Option<&'a StorageKey>,
    /// What became of it, as in [`KeyedOutcome`](crate::KeyedOutcome): `executed`,
    /// `replayed`, `waited`, `conflict`, `mismatch`, `unknown`, `released`,
    /// `still_running`, `refused` or `failed_open`.
    pub outcome: &'static str,
    /// The status answered, or `None` when the inner service failed (the `tracing` line
    /// writes 0).
    pub status: Option<StatusCode>,
    /// From the request's arrival at the layer to its answer.
    pub elapsed: Duration,
    /// When the answer was ready (`elapsed` after the arrival): a log that stamps its
    /// lines can take their time from this rather than read a clock again.
    pub finished: Instant,
}

impl<'a> Access<'a> {
    /// The line of a `method` request for `path` that ended as `outcome` now, with no
    /// key, no status and no time elapsed: for an [`AccessLog`]'s tests, which set the
    /// other fields after.
    ///
    /// ```
    /// use http::{Method, StatusCode};
    /// use oncely_http::Access;
    ///
    /// let mut access = Access::new(&Method::POST, "/payments", "executed");
    /// access.status = Some(StatusCode::CREATED);
    /// ```
    pub fn new(method: &'a Method, path: &'a str, outcome: &'static str) -> Self {
        Self { method, path, key: None, outcome, status: None, elapsed: Duration::ZERO, finished: Instant::now() }
    }
}

/// Writes the access lines of keyed requests (see [`IdempotencyLayer::access_log`]).
///
/// [`IdempotencyLayer::access_log`]: crate::IdempotencyLayer::access_log
///
/// ```
/// use oncely_http::{Access, AccessLog};
///
/// /// Counts replays instead of writing lines.
/// #[derive(Default)]
/// struct Replays(std::sync::atomic::AtomicU64);
///
/// impl AccessLog for Replays {
///     fn log(&self, access: &Access<'_>) {
///         if access.outcome == "replayed" {
///             self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///         }
///     }
/// }
/// ```
pub trait AccessLog: Send + Sync + 'static {
    /// Whether the next request's line is wanted; asked before the request, so a log
    /// that is off costs no clock read and no copy of the path. Default: always.
    fn enabled(&self) -> bool {
        true
    }

    /// Writes one request's line. Called on the request's task when it is done: what
    /// this costs, every keyed request pays.
    fn log(&self, access: &Access<'_>);
}

/// The default [`AccessLog`]: an `INFO` event with target `oncely::access` and the fields
/// `method`, `path`, `key` (the storage key's hex digits, empty when none), `outcome`,
/// `status` (0 when the inner service failed) and `micros`; enabled when the current
/// subscriber wants that event.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingAccessLog;

impl AccessLog for TracingAccessLog {
    fn enabled(&self) -> bool {
        tracing::enabled!(target: "oncely::access", tracing::Level::INFO)
    }

    fn log(&self, access: &Access<'_>) {
        let method = access.method;
        tracing::info!(
            target: "oncely::access",
            %method,
            path = access.path,
            // Hex digits need no quoting: written as they are, without a copy; empty
            // when no key was derived.
            key = %KeyHash(access.key),
            outcome = access.outcome,
            status = access.status.map_or(0, |status| status.as_u16()),
            micros = access.elapsed.as_micros() as u64,
        );
    }
}

/// The `tracing` line's `key`: the storage key's hex digits, or nothing.
struct KeyHash<'a>(Option<&'a StorageKey>);

impl fmt::Display for KeyHash<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(key) => fmt::Display::fmt(key, f),
            None => Ok(()),
        }
    }
}
