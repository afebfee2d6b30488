//! What a call reports: the outcome on success, a typed error otherwise.

use std::fmt;
use std::time::Duration;

use http::StatusCode;
use oncely::{IdempotencyKey, KeyError};
use serde::Deserialize;

use crate::key::key_hash;

/// Why a call stopped making attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// The answer was final: a success, a refusal that a retry cannot change (4xx other
    /// than 409, 425 and 429), or a replay of a stored answer.
    Answered,
    /// The server said `Stripe-Should-Retry: false`.
    ServerSaidNo,
    /// The attempt failed in a way that retrying cannot fix (a request that could not be
    /// built, an error from another middleware).
    NotRetryable,
    /// Every allowed attempt was made.
    AttemptsExhausted,
    /// The next attempt (or the wait before it, `Retry-After` included) would have ended
    /// past the deadline, or an attempt was still running at the deadline.
    DeadlineReached,
    /// The request body is streamed and cannot be sent again, so the call made one
    /// attempt although a retry could have helped.
    BodyNotReplayable,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Answered => "answered",
            Self::ServerSaidNo => "the server said not to retry",
            Self::NotRetryable => "not retryable",
            Self::AttemptsExhausted => "attempts exhausted",
            Self::DeadlineReached => "deadline reached",
            Self::BodyNotReplayable => "the body is streamed and cannot be sent again",
        })
    }
}

/// What happened in a call that ended with a response: put in the response's extensions.
///
/// Store [`key`](Self::key) with whatever the call created: a caller that crashed before
/// it saw the answer sends the same key again to get the same answer.
///
/// ```no_run
/// # async fn f(client: reqwest_middleware::ClientWithMiddleware) -> Result<(), Box<dyn std::error::Error>> {
/// use oncely_client::CallOutcome;
///
/// let response = client.post("http://127.0.0.1:7100/payments").body("{}").send().await?;
/// let outcome = response.extensions().get::<CallOutcome>().expect("covered method");
/// println!("key {} after {} attempt(s), replayed: {}", outcome.key, outcome.attempts, outcome.replayed);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallOutcome {
    /// The key every attempt carried.
    pub key: IdempotencyKey,
    /// Attempts made, the first included.
    pub attempts: u32,
    /// Whether the final answer was a replay of a stored one (`Idempotent-Replayed: true`).
    pub replayed: bool,
    /// Why the call stopped (for a response: [`StopReason::Answered`], or a reason that a
    /// retryable answer was returned as it is).
    pub stop: StopReason,
    /// Time from the call's start to its final answer.
    pub elapsed: Duration,
}

/// An RFC 9457 problem the server answered with (`application/problem+json`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Problem {
    /// The response status.
    pub status: StatusCode,
    /// The problem's `type` (`about:blank` when absent, as RFC 9457 says), for example
    /// `urn:oncely:problem:request-in-progress`.
    pub type_uri: String,
    /// The problem's `title`.
    pub title: Option<String>,
    /// The problem's `detail`.
    pub detail: Option<String>,
    /// A Stripe-style `error.code`, when the body has one.
    pub code: Option<String>,
    /// The response's `Retry-After`, read as a wait.
    pub retry_after: Option<Duration>,
}

/// The largest problem body read; the rest is dropped.
pub(crate) const MAX_PROBLEM_BODY: usize = 64 * 1024;

#[derive(Deserialize)]
struct ProblemBody {
    #[serde(rename = "type")]
    type_uri: Option<String>,
    title: Option<String>,
    detail: Option<String>,
    error: Option<StripeError>,
}

#[derive(Deserialize)]
struct StripeError {
    code: Option<String>,
}

impl Problem {
    /// Reads a problem from a body, keeping what parses.
    pub(crate) fn parse(status: StatusCode, body: &[u8], retry_after: Option<Duration>) -> Self {
        let parsed: Option<ProblemBody> = serde_json::from_slice(body).ok();
        let (type_uri, title, detail, code) = match parsed {
            Some(p) => (p.type_uri, p.title, p.detail, p.error.and_then(|e| e.code)),
            None => (None, None, None, None),
        };
        Self { status, type_uri: type_uri.unwrap_or_else(|| "about:blank".into()), title, detail, code, retry_after }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.type_uri)?;
        match (&self.title, &self.detail) {
            (_, Some(detail)) => write!(f, ": {detail}"),
            (Some(title), None) => write!(f, ": {title}"),
            (None, None) => Ok(()),
        }
    }
}

/// What went wrong, without the call's report (see [`Error`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The server's final answer was a problem: its clear error, such as
    /// `request-in-progress` (409) when the attempts ran out while another request with
    /// the key was still running, or `key-reused` (422).
    Problem(Problem),
    /// The last attempt failed below HTTP: could not connect, timed out, the connection
    /// broke. The operation may or may not have run; send the key again to find out.
    Transport(reqwest_middleware::Error),
    /// The call's deadline passed while an attempt was still running.
    Deadline,
    /// The caller's key (header or extension) is not a valid key, or none could be
    /// derived. Nothing was sent.
    Key(KeyError),
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Problem(p) => write!(f, "the server answered with a problem: {p}"),
            Self::Transport(e) => write!(f, "transport error: {e}"),
            Self::Deadline => f.write_str("the deadline passed during an attempt"),
            Self::Key(e) => write!(f, "no usable idempotency key: {e}"),
        }
    }
}

/// A call that ended without a usable response, with what happened on the way.
///
/// Through [`reqwest_middleware`], this error arrives inside
/// `reqwest_middleware::Error::Middleware`; [`Error::from_middleware`] and
/// [`Error::find`] get it back.
///
/// ```no_run
/// # async fn f(client: reqwest_middleware::ClientWithMiddleware) {
/// match client.post("http://127.0.0.1:7100/payments").body("{}").send().await {
///     Ok(response) => println!("{}", response.status()),
///     Err(e) => match oncely_client::Error::find(&e) {
///         Some(e) => eprintln!("after {} attempts, key {:?}: {e}", e.attempts(), e.key()),
///         None => eprintln!("{e}"),
///     },
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct Error {
    pub(crate) kind: ErrorKind,
    pub(crate) key: Option<IdempotencyKey>,
    pub(crate) attempts: u32,
    pub(crate) replayed: bool,
    pub(crate) stop: StopReason,
    pub(crate) elapsed: Duration,
}

impl Error {
    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The key the attempts carried (none when the key itself was the problem, or the
    /// method is not covered). Send it again later to learn the operation's outcome.
    pub fn key(&self) -> Option<&IdempotencyKey> {
        self.key.as_ref()
    }

    /// Attempts made (0 when nothing was sent).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether the final answer was a replay of a stored one.
    pub fn replayed(&self) -> bool {
        self.replayed
    }

    /// Why the call stopped.
    pub fn stop(&self) -> StopReason {
        self.stop
    }

    /// Time from the call's start to its end.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// The server's problem, when that is what the call ended with.
    pub fn problem(&self) -> Option<&Problem> {
        match &self.kind {
            ErrorKind::Problem(p) => Some(p),
            _ => None,
        }
    }

    /// The final response status, when there was a response.
    pub fn status(&self) -> Option<StatusCode> {
        self.problem().map(|p| p.status)
    }

    /// Whether the call ended on a time-out (an attempt's or the deadline).
    pub fn is_timeout(&self) -> bool {
        match &self.kind {
            ErrorKind::Deadline => true,
            ErrorKind::Transport(e) => e.is_timeout(),
            _ => false,
        }
    }

    /// This crate's error inside a middleware error, if it is one.
    pub fn find(error: &reqwest_middleware::Error) -> Option<&Self> {
        match error {
            reqwest_middleware::Error::Middleware(e) => e.downcast_ref::<Self>(),
            reqwest_middleware::Error::Reqwest(_) => None,
        }
    }

    /// Takes this crate's error out of a middleware error, or gives the error back.
    ///
    /// # Errors
    /// The same error, when it is not one of this crate's.
    pub fn from_middleware(error: reqwest_middleware::Error) -> Result<Self, reqwest_middleware::Error> {
        match error {
            reqwest_middleware::Error::Middleware(e) => {
                e.downcast::<Self>().map_err(reqwest_middleware::Error::Middleware)
            }
            other => Err(other),
        }
    }

    pub(crate) fn key_error(error: KeyError) -> Self {
        Self {
            kind: ErrorKind::Key(error),
            key: None,
            attempts: 0,
            replayed: false,
            stop: StopReason::NotRetryable,
            elapsed: Duration::ZERO,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "idempotent call")?;
        if let Some(key) = &self.key {
            write!(f, " (key hash {})", key_hash(key))?;
        }
        write!(f, " failed after {} attempt(s), {}", self.attempts, self.stop)?;
        if self.replayed {
            f.write_str(", replayed")?;
        }
        write!(f, ": {}", self.kind)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ErrorKind::Transport(e) => Some(e),
            ErrorKind::Key(e) => Some(e),
            ErrorKind::Problem(_) | ErrorKind::Deadline => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_parse_what_is_there() {
        let body = br#"{"type":"urn:oncely:problem:request-in-progress","title":"In progress","status":409,
            "detail":"retry later","error":{"type":"idempotency_error","code":"in_progress","message":"m"}}"#;
        let p = Problem::parse(StatusCode::CONFLICT, body, Some(Duration::from_secs(1)));
        assert_eq!(p.type_uri, "urn:oncely:problem:request-in-progress");
        assert_eq!(p.title.as_deref(), Some("In progress"));
        assert_eq!(p.detail.as_deref(), Some("retry later"));
        assert_eq!(p.code.as_deref(), Some("in_progress"));
        assert_eq!(p.to_string(), "409 urn:oncely:problem:request-in-progress: retry later");

        let garbage = Problem::parse(StatusCode::BAD_GATEWAY, b"<html>", None);
        assert_eq!(garbage.type_uri, "about:blank");
        assert_eq!(garbage.title, None);
    }

    #[test]
    fn errors_come_back_out_of_middleware_errors() {
        let e = Error::key_error(KeyError::Empty);
        let wrapped = reqwest_middleware::Error::middleware(e);
        assert!(matches!(Error::find(&wrapped).map(Error::kind), Some(ErrorKind::Key(KeyError::Empty))));
        let back = Error::from_middleware(wrapped).expect("ours");
        assert_eq!(back.attempts(), 0);
        assert!(back.to_string().contains("no usable idempotency key"));
    }
}
