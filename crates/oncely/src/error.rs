//! The engine's errors, and how an operation says what its failure means.

use std::time::Duration;

use crate::StoreError;

/// Why the engine did not hand out a claim or a replay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another claim holds the key and is alive: in reject mode at once, in wait mode once
    /// the wait timed out. Retry after `retry_after`.
    #[error("the operation is already in progress; retry after {retry_after:?}")]
    Conflict {
        /// The time left on the holder's lease, rounded up to whole seconds and at least
        /// one second: by then the holder has completed, renewed or lost its claim.
        retry_after: Duration,
    },
    /// The key was first used for a request with another fingerprint.
    #[error("the idempotency key was already used for a different request")]
    Mismatch,
    /// The store failed (unreachable, timed out, full, or the claim was lost): see
    /// [`StoreError::kind`].
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored result could not be decoded as the requested type: written by another
    /// version of the program, or read with another type.
    #[error("the stored result does not decode as the requested type: {0}")]
    Decode(#[source] serde_json::Error),
    /// The operation ran, but its outcome could not be kept (it did not encode): the
    /// retry gets this instead of running the operation a second time.
    #[error("the operation ran but its outcome was not stored: {0}")]
    NotStored(String),
    /// An argument was out of range (a zero or absurd duration).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// What [`Oncely::run`](crate::Oncely::run) returns when it produced no value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError<E> {
    /// The operation failed. With [`Failure::Release`] the key was released and a retry
    /// runs the operation again; with [`Failure::Store`] the failure is the stored result
    /// and every retry gets it back with `replayed: true`.
    #[error("the operation failed{}: {error:?}", if *replayed { " (stored failure replayed)" } else { "" })]
    Failed {
        /// The operation's error.
        error: E,
        /// True when this is a stored failure replayed, not the operation running now.
        replayed: bool,
    },
    /// The engine did not run the operation or could not hand back its stored result.
    #[error(transparent)]
    Idempotency(#[from] Error),
}

/// How an operation's error is treated: the failure policy, chosen per error.
///
/// An operation given to [`Oncely::run`](crate::Oncely::run) returns
/// `Result<T, Failure<E>>`. The `?` operator turns any `E` into [`Failure::Release`], the
/// default; return [`Failure::Store`] for failures that are final answers (a declined
/// card), which every retry should get back instead of trying again.
///
/// ```
/// use oncely::Failure;
///
/// #[derive(Debug)]
/// enum PaymentError { Declined, ProviderDown }
///
/// fn policy(e: PaymentError) -> Failure<PaymentError> {
///     match e {
///         PaymentError::Declined => Failure::Store(e),       // replay the decline
///         PaymentError::ProviderDown => Failure::Release(e), // let the retry run again
///     }
/// }
/// assert!(matches!(policy(PaymentError::Declined), Failure::Store(_)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure<E> {
    /// Release the key: the operation may run again on retry. The default.
    Release(E),
    /// Store the failure as the operation's result; retries get it back.
    Store(E),
}

impl<E> Failure<E> {
    /// Wraps `error` as [`Failure::Store`].
    pub fn store(error: E) -> Self {
        Self::Store(error)
    }

    /// Wraps `error` as [`Failure::Release`].
    pub fn release(error: E) -> Self {
        Self::Release(error)
    }

    /// The error, whatever the policy.
    pub fn into_inner(self) -> E {
        match self {
            Self::Release(e) | Self::Store(e) => e,
        }
    }
}

impl<E> From<E> for Failure<E> {
    fn from(error: E) -> Self {
        Self::Release(error)
    }
}

/// A setting the engine's builder refused: which one, its value, and the range it must
/// be in.
///
/// ```
/// use std::time::Duration;
/// use oncely::{MemoryStore, Oncely, Setting};
///
/// let refused = Oncely::builder(MemoryStore::new())
///     .retention(Duration::from_secs(60))
///     .lease(Duration::from_secs(120))
///     .build()
///     .unwrap_err();
/// assert_eq!(refused.setting, Setting::Lease);
/// assert_eq!(refused.max, Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting `{setting}`: {value:?} is outside {min:?}..={max:?}")]
pub struct ConfigError {
    /// The setting at fault.
    pub setting: Setting,
    /// The value it was given.
    pub value: std::time::Duration,
    /// The smallest value accepted.
    pub min: std::time::Duration,
    /// The largest value accepted (for the lease and the keep-alive ceiling: the retention).
    pub max: std::time::Duration,
}

/// The engine's settings, as [`ConfigError`] names them: each is a method of
/// [`OncelyBuilder`](crate::OncelyBuilder) and a field of [`Config`](crate::Config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Setting {
    /// [`Config::retention`](crate::Config::retention).
    Retention,
    /// [`Config::lease`](crate::Config::lease).
    Lease,
    /// [`Config::keep_alive_ceiling`](crate::Config::keep_alive_ceiling).
    KeepAliveCeiling,
    /// [`Config::poll_interval`](crate::Config::poll_interval).
    PollInterval,
    /// [`Config::hit_flush_interval`](crate::Config::hit_flush_interval).
    HitFlushInterval,
    /// The timeout of [`ConflictMode::Wait`](crate::ConflictMode::Wait).
    WaitTimeout,
}

impl Setting {
    /// The builder method's name (`lease`, `wait_timeout`…).
    pub fn name(self) -> &'static str {
        match self {
            Self::Retention => "retention",
            Self::Lease => "lease",
            Self::KeepAliveCeiling => "keep_alive_ceiling",
            Self::PollInterval => "poll_interval",
            Self::HitFlushInterval => "hit_flush_interval",
            Self::WaitTimeout => "wait_timeout",
        }
    }
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
