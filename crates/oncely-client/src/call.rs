//! One logical call: the key attached once, attempts until an answer is final, the report.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, StatusCode, header};
use oncely::{IdempotencyKey, KeyError};
use reqwest::{Request, Response};
use tracing::{Instrument, field};

use crate::error::{CallOutcome, Error, ErrorKind, MAX_PROBLEM_BODY, Problem, StopReason};
use crate::key::{decode_key, encode_key, key_hash};
use crate::middleware::Config;
use crate::policy::{Verdict, judge_status, parse_retry_after, retryable_transport};

/// A boxed, sendable future, as `reqwest_middleware` hands them out.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Sends one attempt: through the rest of a middleware chain, or straight with a client.
pub(crate) trait Attempt: Send {
    fn send(&mut self, request: Request) -> BoxFuture<'_, Result<Response, reqwest_middleware::Error>>;
}

/// Why a retry is about to happen, for [`RetryEvent`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryCause {
    /// The server answered with this retryable status (409, 425, 429, 5xx but 501/505, or
    /// any status it marked `Stripe-Should-Retry: true`).
    Status(StatusCode),
    /// The attempt timed out.
    Timeout,
    /// The connection could not be made, or broke before an answer came.
    Connection(String),
}

/// A retry about to be made, as given to [`on_retry`](crate::IdempotencyMiddleware::on_retry).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RetryEvent {
    /// The call's key (the same on every attempt).
    pub key: IdempotencyKey,
    /// The attempt that failed (1 for the first).
    pub attempt: u32,
    /// The wait before the next attempt (`Retry-After`, or backoff with jitter).
    pub delay: Duration,
    /// What went wrong.
    pub cause: RetryCause,
}

/// What one attempt produced.
enum Attempted {
    Response {
        response: Response,
        replayed: bool,
    },
    Failed(reqwest_middleware::Error),
    /// The call's deadline passed while the attempt ran; it was dropped.
    Deadline,
}

enum Judged {
    Final(Attempted, StopReason),
    Retryable { attempted: Attempted, retry_after: Option<Duration>, cause: RetryCause },
}

/// Puts the key in the request: the caller's header if there is one (left as it is), else
/// the caller's key, else a new one from the configured source.
fn attach_key(
    config: &Config,
    request: &mut Request,
    given: Option<IdempotencyKey>,
) -> Result<IdempotencyKey, KeyError> {
    let mut present = request.headers().get_all(&config.header).iter();
    if let Some(value) = present.next() {
        if present.next().is_some() {
            return Err(KeyError::Content("the request carries two idempotency key fields".into()));
        }
        return decode_key(value);
    }
    let key = match given {
        Some(key) => key,
        None => config.keys.key_for(request)?,
    };
    request.headers_mut().insert(config.header.clone(), encode_key(&key, config.format)?);
    Ok(key)
}

fn is_problem(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/problem+json"))
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers.get(header::RETRY_AFTER).and_then(|v| parse_retry_after(v, SystemTime::now()))
}

/// Runs one logical call of a covered method.
pub(crate) async fn run<A: Attempt>(
    config: &Config,
    mut request: Request,
    given: Option<IdempotencyKey>,
    via: &mut A,
) -> Result<Response, Error> {
    let key = attach_key(config, &mut request, given).map_err(Error::key_error)?;
    let span = tracing::info_span!(
        "oncely_client.call",
        method = %request.method(),
        host = request.url().host_str().unwrap_or(""),
        path = request.url().path(),
        key_hash = %key_hash(&key),
        attempts = field::Empty,
        status = field::Empty,
        replayed = field::Empty,
        stop = field::Empty,
    );
    let mut call = Call { config, key, started: Instant::now(), attempts: 0, span: span.clone() };
    call.run(request, via).instrument(span).await
}

struct Call<'c> {
    config: &'c Config,
    key: IdempotencyKey,
    started: Instant,
    attempts: u32,
    span: tracing::Span,
}

impl Call<'_> {
    async fn run<A: Attempt>(&mut self, template: Request, via: &mut A) -> Result<Response, Error> {
        let policy = &self.config.retry;
        loop {
            let Some(copy) = template.try_clone() else {
                // A streamed body goes out once; nothing can send it again.
                return match self.attempt(template, via).await {
                    Judged::Final(attempted, stop) => self.finish(attempted, stop).await,
                    Judged::Retryable { attempted, cause, .. } => {
                        tracing::warn!(?cause, "not retrying: the request body is streamed and cannot be sent again");
                        self.finish(attempted, StopReason::BodyNotReplayable).await
                    }
                };
            };
            let (attempted, retry_after, cause) = match self.attempt(copy, via).await {
                Judged::Final(attempted, stop) => return self.finish(attempted, stop).await,
                Judged::Retryable { attempted, retry_after, cause } => (attempted, retry_after, cause),
            };
            if self.attempts >= policy.max_attempts {
                return self.finish(attempted, StopReason::AttemptsExhausted).await;
            }
            let delay = retry_after.unwrap_or_else(|| policy.backoff(self.attempts - 1, &mut rand::rng()));
            if self.started.elapsed().saturating_add(delay) >= policy.deadline {
                return self.finish(attempted, StopReason::DeadlineReached).await;
            }
            // The failed answer is not needed any more; its connection can go back to the pool.
            drop(attempted);
            tracing::debug!(attempt = self.attempts, delay_ms = delay.as_millis() as u64, ?cause, "retrying");
            if let Some(hook) = &self.config.on_retry {
                hook(&RetryEvent { key: self.key.clone(), attempt: self.attempts, delay, cause });
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// Sends one attempt, bounded by what is left of the deadline, and judges it.
    async fn attempt<A: Attempt>(&mut self, request: Request, via: &mut A) -> Judged {
        self.attempts += 1;
        let remaining = self.config.retry.deadline.saturating_sub(self.started.elapsed());
        let span = tracing::debug_span!("oncely_client.attempt", attempt = self.attempts, status = field::Empty);
        let sent = tokio::time::timeout(remaining, via.send(request)).instrument(span.clone()).await;
        match sent {
            Err(_elapsed) => {
                tracing::debug!(parent: &span, "deadline passed during the attempt");
                Judged::Final(Attempted::Deadline, StopReason::DeadlineReached)
            }
            Ok(Err(error)) => {
                tracing::debug!(parent: &span, %error, "attempt failed");
                if retryable_transport(&error) {
                    let cause = if error.is_timeout() {
                        RetryCause::Timeout
                    } else {
                        RetryCause::Connection(error.to_string())
                    };
                    Judged::Retryable { attempted: Attempted::Failed(error), retry_after: None, cause }
                } else {
                    Judged::Final(Attempted::Failed(error), StopReason::NotRetryable)
                }
            }
            Ok(Ok(response)) => {
                let status = response.status();
                span.record("status", status.as_u16());
                let replayed = response
                    .headers()
                    .get(&self.config.replayed_header)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
                let verdict = judge_status(status, response.headers(), replayed);
                let retry_after = retry_after(response.headers());
                let attempted = Attempted::Response { response, replayed };
                match verdict {
                    Verdict::Final => Judged::Final(attempted, StopReason::Answered),
                    Verdict::ServerSaidNo => Judged::Final(attempted, StopReason::ServerSaidNo),
                    Verdict::Retry => Judged::Retryable { attempted, retry_after, cause: RetryCause::Status(status) },
                }
            }
        }
    }

    /// The call's result from its last attempt.
    async fn finish(&self, attempted: Attempted, stop: StopReason) -> Result<Response, Error> {
        let elapsed = self.started.elapsed();
        self.span.record("attempts", self.attempts);
        self.span.record("stop", field::display(stop));
        let error = |kind, replayed| Error {
            kind,
            key: Some(self.key.clone()),
            attempts: self.attempts,
            replayed,
            stop,
            elapsed,
        };
        match attempted {
            Attempted::Deadline => Err(error(ErrorKind::Deadline, false)),
            Attempted::Failed(e) => Err(error(ErrorKind::Transport(e), false)),
            Attempted::Response { mut response, replayed } => {
                let status = response.status();
                self.span.record("status", status.as_u16());
                self.span.record("replayed", replayed);
                if status.as_u16() >= 400 && is_problem(response.headers()) {
                    let retry_after = retry_after(response.headers());
                    let body = self.read_bounded(&mut response).await;
                    return Err(error(ErrorKind::Problem(Problem::parse(status, &body, retry_after)), replayed));
                }
                response.extensions_mut().insert(CallOutcome {
                    key: self.key.clone(),
                    attempts: self.attempts,
                    replayed,
                    stop,
                    elapsed,
                });
                Ok(response)
            }
        }
    }

    /// Up to [`MAX_PROBLEM_BODY`] bytes of a problem body, within what is left of the
    /// deadline (at least a second); what cannot be read is left out.
    async fn read_bounded(&self, response: &mut Response) -> Vec<u8> {
        let mut body = Vec::new();
        let read = async {
            while let Ok(Some(chunk)) = response.chunk().await {
                let room = MAX_PROBLEM_BODY - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if body.len() >= MAX_PROBLEM_BODY {
                    break;
                }
            }
        };
        let remaining = self.config.retry.deadline.saturating_sub(self.started.elapsed()).max(Duration::from_secs(1));
        let _ = tokio::time::timeout(remaining, read).await;
        body
    }
}
