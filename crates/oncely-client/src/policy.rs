//! When a failed attempt is retried, and how long the client waits first.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, StatusCode};
use rand::Rng;

/// The `Stripe-Should-Retry` response header: `true` or `false`, the server's own word on
/// whether a retry can help.
pub const STRIPE_SHOULD_RETRY: &str = "stripe-should-retry";

/// How many attempts one logical call may make, how long it waits between them, and how
/// long it may take in all.
///
/// The wait before retry number `n` (0 for the second attempt) is drawn uniformly from
/// `[0, min(max_delay, base_delay × 2ⁿ)]` ("full jitter", so that clients that failed
/// together do not retry together), unless the server sent `Retry-After`, which is then
/// waited exactly. No attempt starts, and no wait begins, that would end past the
/// `deadline`; an attempt still running at the deadline is abandoned.
///
/// ```
/// use std::time::Duration;
/// use oncely_client::RetryPolicy;
///
/// let policy = RetryPolicy::default()
///     .with_max_attempts(3)
///     .with_base_delay(Duration::from_millis(100))
///     .with_deadline(Duration::from_secs(10));
/// assert_eq!(policy.backoff_cap(0), Duration::from_millis(100));
/// assert_eq!(policy.backoff_cap(1), Duration::from_millis(200));
/// assert!(policy.backoff(1, &mut rand::rng()) <= Duration::from_millis(200));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in all, the first included (default 5; at least 1).
    pub max_attempts: u32,
    /// The cap of the first wait (default 250 ms).
    pub base_delay: Duration,
    /// The largest cap of any wait drawn by backoff (default 5 s). A `Retry-After` is
    /// waited as sent, bounded only by the deadline.
    pub max_delay: Duration,
    /// The time one logical call may take, attempts and waits included (default 30 s).
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(5),
            deadline: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retries: the key is still attached, so the caller can retry later.
    pub fn no_retries() -> Self {
        Self::default().with_max_attempts(1)
    }

    /// Sets [`max_attempts`](Self::max_attempts) (0 is taken as 1).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Sets [`base_delay`](Self::base_delay).
    pub fn with_base_delay(mut self, delay: Duration) -> Self {
        self.base_delay = delay;
        self
    }

    /// Sets [`max_delay`](Self::max_delay).
    pub fn with_max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// Sets [`deadline`](Self::deadline).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The upper bound of the wait before retry number `retry` (0 before the second
    /// attempt): `min(max_delay, base_delay × 2^retry)`, without overflow.
    pub fn backoff_cap(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry).unwrap_or(u32::MAX);
        self.base_delay.checked_mul(factor).unwrap_or(Duration::MAX).min(self.max_delay)
    }

    /// A wait before retry number `retry`, drawn uniformly from `[0, backoff_cap(retry)]`.
    pub fn backoff(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let cap = self.backoff_cap(retry);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }
}

/// Reads a `Retry-After` value: delta-seconds (`120`) or an HTTP-date
/// (`Wed, 21 Oct 2015 07:28:00 GMT`, and the two obsolete forms), as a wait from `now`.
/// A date in the past is no wait; anything else is `None`.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use http::HeaderValue;
/// use oncely_client::parse_retry_after;
///
/// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 07:28:00
/// assert_eq!(parse_retry_after(&HeaderValue::from_static("2"), now), Some(Duration::from_secs(2)));
/// let date = HeaderValue::from_static("Wed, 21 Oct 2015 07:28:30 GMT");
/// assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(30)));
/// assert_eq!(parse_retry_after(&HeaderValue::from_static("soon"), now), None);
/// ```
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still "a very long time", not "no header".
        return Some(text.parse::<u64>().map_or(Duration::MAX, Duration::from_secs));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `Stripe-Should-Retry`: `Some(true)`, `Some(false)`, or `None` when absent or neither.
pub(crate) fn should_retry_header(headers: &HeaderMap) -> Option<bool> {
    let value = headers.get(STRIPE_SHOULD_RETRY)?.to_str().ok()?.trim();
    if value.eq_ignore_ascii_case("true") {
        Some(true)
    } else if value.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// What one answer means for the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The answer is final: return it.
    Final,
    /// The server said `Stripe-Should-Retry: false` to a status that would be retried.
    ServerSaidNo,
    /// A retry can help.
    Retry,
}

/// The status rules, in order:
///
/// 1. below 400: final (whatever else the headers say);
/// 2. a replay (`Idempotent-Replayed: true`): final, as the server would replay it again;
/// 3. 4xx other than 409, 425 and 429: final, even with `Stripe-Should-Retry: true` (the
///    request itself is refused; sending it again cannot change that);
/// 4. `Stripe-Should-Retry: false` / `true`: the server's word decides;
/// 5. 409 (in progress), 425, 429, and 5xx other than 501 and 505: retry;
/// 6. anything else: final.
pub(crate) fn judge_status(status: StatusCode, headers: &HeaderMap, replayed: bool) -> Verdict {
    let code = status.as_u16();
    if code < 400 || replayed {
        return Verdict::Final;
    }
    let retryable_4xx = matches!(code, 409 | 425 | 429);
    if code < 500 && !retryable_4xx {
        return Verdict::Final;
    }
    let by_status = retryable_4xx || (code >= 500 && code != 501 && code != 505);
    match should_retry_header(headers) {
        Some(true) => Verdict::Retry,
        Some(false) if by_status => Verdict::ServerSaidNo,
        Some(false) => Verdict::Final,
        None if by_status => Verdict::Retry,
        None => Verdict::Final,
    }
}

/// Whether a transport failure can be retried: failures to connect, time-outs, and
/// failures while sending or before the response head (a connection reset or closed
/// after the request went out). Not: a request that could not be built, a redirect loop,
/// or an error from another middleware.
pub(crate) fn retryable_transport(error: &reqwest_middleware::Error) -> bool {
    match error {
        reqwest_middleware::Error::Reqwest(e) => {
            !(e.is_builder() || e.is_redirect() || e.is_status() || e.is_decode())
                && (e.is_connect() || e.is_timeout() || e.is_request() || e.is_body())
        }
        reqwest_middleware::Error::Middleware(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn backoff_caps_double_from_the_base_and_stop_at_the_maximum() {
        let policy =
            RetryPolicy::default().with_base_delay(Duration::from_millis(250)).with_max_delay(Duration::from_secs(5));
        let caps: Vec<_> = (0..7).map(|n| policy.backoff_cap(n).as_millis()).collect();
        assert_eq!(caps, [250, 500, 1000, 2000, 4000, 5000, 5000]);
        // No overflow for absurd retry numbers or delays.
        assert_eq!(policy.backoff_cap(63), Duration::from_secs(5));
        assert_eq!(policy.backoff_cap(u32::MAX), Duration::from_secs(5));
        let huge = RetryPolicy::default().with_base_delay(Duration::MAX).with_max_delay(Duration::MAX);
        assert_eq!(huge.backoff_cap(40), Duration::MAX);
    }

    #[test]
    fn full_jitter_spans_zero_to_the_cap_and_never_past_it() {
        let policy = RetryPolicy::default();
        let mut rng = StdRng::seed_from_u64(7);
        for retry in 0..6 {
            let cap = policy.backoff_cap(retry);
            let draws: Vec<_> = (0..2000).map(|_| policy.backoff(retry, &mut rng)).collect();
            assert!(draws.iter().all(|d| *d <= cap), "retry {retry}: within [0, {cap:?}]");
            // Uniform over the whole range: some draws in the lowest and the highest tenth.
            assert!(draws.iter().any(|d| *d < cap / 10), "retry {retry}: low draws exist");
            assert!(draws.iter().any(|d| *d > cap / 10 * 9), "retry {retry}: high draws exist");
        }
        let zero = RetryPolicy::default().with_base_delay(Duration::ZERO);
        assert_eq!(zero.backoff(3, &mut rng), Duration::ZERO);
    }

    #[test]
    fn max_attempts_is_at_least_one() {
        assert_eq!(RetryPolicy::default().with_max_attempts(0).max_attempts, 1);
        assert_eq!(RetryPolicy::no_retries().max_attempts, 1);
    }

    #[test]
    fn retry_after_in_delta_seconds() {
        let now = SystemTime::now();
        let parse = |v: &'static str| parse_retry_after(&HeaderValue::from_static(v), now);
        assert_eq!(parse("0"), Some(Duration::ZERO));
        assert_eq!(parse("1"), Some(Duration::from_secs(1)));
        assert_eq!(parse(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(parse("99999999999999999999999"), Some(Duration::MAX));
        assert_eq!(parse("-1"), None);
        assert_eq!(parse("1.5"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("soon"), None);
    }

    #[test]
    fn retry_after_as_an_http_date() {
        // Wed, 21 Oct 2015 07:28:00 GMT
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        let parse = |v: &'static str| parse_retry_after(&HeaderValue::from_static(v), now);
        assert_eq!(parse("Wed, 21 Oct 2015 07:28:10 GMT"), Some(Duration::from_secs(10)));
        assert_eq!(parse("Wednesday, 21-Oct-15 07:29:00 GMT"), Some(Duration::from_secs(60)), "RFC 850 form");
        assert_eq!(parse("Wed Oct 21 07:28:05 2015"), Some(Duration::from_secs(5)), "asctime form");
        assert_eq!(parse("Wed, 21 Oct 2015 07:27:00 GMT"), Some(Duration::ZERO), "a past date is no wait");
        assert_eq!(parse("Wed, 21 Oct 2015 07:28:10"), None, "no zone");
    }

    #[test]
    fn statuses_that_are_retried() {
        let none = HeaderMap::new();
        for code in [409, 425, 429, 500, 502, 503, 504, 599] {
            let status = StatusCode::from_u16(code).expect("status");
            assert_eq!(judge_status(status, &none, false), Verdict::Retry, "{code}");
        }
        for code in [200, 201, 204, 301, 400, 401, 403, 404, 408, 410, 422, 501, 505] {
            let status = StatusCode::from_u16(code).expect("status");
            assert_eq!(judge_status(status, &none, false), Verdict::Final, "{code}");
        }
    }

    #[test]
    fn a_replay_is_final_whatever_its_status() {
        for code in [500, 502, 409, 201] {
            let status = StatusCode::from_u16(code).expect("status");
            assert_eq!(judge_status(status, &HeaderMap::new(), true), Verdict::Final, "{code}");
        }
    }

    #[test]
    fn stripe_should_retry_takes_precedence_over_the_status_rules() {
        let yes = headers(&[(STRIPE_SHOULD_RETRY, "true")]);
        let no = headers(&[(STRIPE_SHOULD_RETRY, "false")]);
        let odd = headers(&[(STRIPE_SHOULD_RETRY, "maybe")]);
        // `false` stops what the status would retry; `true` retries what it would not.
        assert_eq!(judge_status(StatusCode::SERVICE_UNAVAILABLE, &no, false), Verdict::ServerSaidNo);
        assert_eq!(judge_status(StatusCode::CONFLICT, &no, false), Verdict::ServerSaidNo);
        assert_eq!(judge_status(StatusCode::NOT_IMPLEMENTED, &yes, false), Verdict::Retry);
        assert_eq!(judge_status(StatusCode::NOT_IMPLEMENTED, &no, false), Verdict::Final);
        // Case-insensitive; anything else is ignored.
        let upper = headers(&[(STRIPE_SHOULD_RETRY, "FALSE")]);
        assert_eq!(judge_status(StatusCode::BAD_GATEWAY, &upper, false), Verdict::ServerSaidNo);
        assert_eq!(judge_status(StatusCode::BAD_GATEWAY, &odd, false), Verdict::Retry);
        // But never over the rules that come first: a refused request, a replay, a success.
        assert_eq!(judge_status(StatusCode::BAD_REQUEST, &yes, false), Verdict::Final);
        assert_eq!(judge_status(StatusCode::UNPROCESSABLE_ENTITY, &yes, false), Verdict::Final);
        assert_eq!(judge_status(StatusCode::INTERNAL_SERVER_ERROR, &yes, true), Verdict::Final);
        assert_eq!(judge_status(StatusCode::OK, &yes, false), Verdict::Final);
    }
}
