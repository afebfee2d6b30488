//! What a store failed at: [`StoreError`] and its [`StoreErrorKind`].

/// A boxed error from a store's client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a store failed at.
///
/// Match on [`kind`](Self::kind) to decide what to do (retry later, report, refuse);
/// the variants carry what each failure knows, and [`Unavailable`](Self::Unavailable)
/// and [`Timeout`](Self::Timeout) carry the client library's error as their source.
/// Stores choose the variant from structured data (an error's type, variant or code),
/// never from its message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The caller's claim is not the record's current one: its lease lapsed and another
    /// claim took the key over, or the record was released, deleted or expired. The
    /// caller's write was rejected so that it cannot overwrite the new holder.
    #[error("the claim no longer holds the key (lease taken over, released, deleted or expired)")]
    LeaseLost,
    /// A bounded store is full: a new record would take it past one of its bounds, and
    /// it holds no record it may drop to make room. Expired records are dropped first
    /// (they are absent anyway); an unexpired record, completed or in progress, is never
    /// dropped to make room unless the store was told it may evict completed ones.
    /// Nothing was changed; the HTTP layer answers 503 with `Retry-After`.
    ///
    /// Only the creation of a record is refused this way. A claim or `first_seen` that
    /// meets an existing record, and every `complete`, are answered as usual: an
    /// operation that ran keeps its result even when that takes the store past its bound.
    #[error("the store is full: it holds at most {limit} {bound} and has no expired record to drop")]
    Capacity {
        /// The bound a new record would pass.
        bound: CapacityBound,
        /// That bound, in records or in bytes as `bound` says.
        limit: u64,
    },
    /// The store could not be reached, or refused for a passing reason (its connection
    /// was lost, it is shutting down, out of resources, a read-only replica). A call that
    /// failed after its request was sent may have taken effect. A retry later may
    /// succeed; the HTTP layer answers 503.
    #[error("the store is unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The store did not answer in time: the request was sent (or was being sent) and
    /// the caller stopped waiting. Whether the call took effect is unknown. A retry
    /// later may succeed; the HTTP layer answers 503, as for
    /// [`Unavailable`](Self::Unavailable).
    #[error("the store did not answer in time: {0}")]
    Timeout(#[source] BoxError),
    /// The store holds data this version cannot read.
    #[error("the store returned a malformed record: {0}")]
    Corrupt(String),
    /// The store cannot do this at all: a store that cannot list its records asked to
    /// list them, or a server lacking a feature the store needs. No retry mends it.
    #[error("the store does not support this: {0}")]
    Unsupported(String),
    /// The request cannot be carried out as asked (a duration that overflows the clock).
    #[error("invalid store request: {0}")]
    InvalidRequest(String),
}

/// What kind of failure a [`StoreError`] is: a small `Copy` value to match on, in the
/// manner of [`std::io::ErrorKind`]. More kinds may be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// [`StoreError::Unavailable`]: not reached, or refused for a passing reason.
    Unavailable,
    /// [`StoreError::Timeout`]: no answer in time; whether the call took effect is unknown.
    Timeout,
    /// [`StoreError::Corrupt`]: stored data this version cannot read.
    Corrupt,
    /// [`StoreError::LeaseLost`]: the caller's claim no longer holds the key.
    LeaseLost,
    /// [`StoreError::Capacity`]: a bounded store is full.
    Capacity,
    /// [`StoreError::Unsupported`]: the store cannot do this.
    Unsupported,
    /// [`StoreError::InvalidRequest`]: the request cannot be carried out as asked.
    InvalidRequest,
}

impl std::fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::Corrupt => "corrupt",
            Self::LeaseLost => "lease lost",
            Self::Capacity => "capacity",
            Self::Unsupported => "unsupported",
            Self::InvalidRequest => "invalid request",
        })
    }
}

/// Which bound of a full store refused a new record; see [`StoreError::Capacity`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CapacityBound {
    /// The most records the store holds.
    Records,
    /// The most bytes the store holds, as the store counts them (its docs say how).
    Bytes,
}

impl std::fmt::Display for CapacityBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Records => "records",
            Self::Bytes => "bytes",
        })
    }
}

impl StoreError {
    /// Wraps a client library's error as [`StoreError::Unavailable`].
    pub fn unavailable(error: impl Into<BoxError>) -> Self {
        Self::Unavailable(error.into())
    }

    /// Wraps a client library's error as [`StoreError::Timeout`].
    pub fn timeout(error: impl Into<BoxError>) -> Self {
        Self::Timeout(error.into())
    }

    /// What kind of failure this is.
    ///
    /// ```
    /// use oncely::StoreError;
    /// use oncely::store::StoreErrorKind;
    ///
    /// let error = StoreError::timeout("no answer within 1s");
    /// assert_eq!(error.kind(), StoreErrorKind::Timeout);
    /// assert_eq!(StoreError::LeaseLost.kind(), StoreErrorKind::LeaseLost);
    /// ```
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            Self::LeaseLost => StoreErrorKind::LeaseLost,
            Self::Capacity { .. } => StoreErrorKind::Capacity,
            Self::Unavailable(_) => StoreErrorKind::Unavailable,
            Self::Timeout(_) => StoreErrorKind::Timeout,
            Self::Corrupt(_) => StoreErrorKind::Corrupt,
            Self::Unsupported(_) => StoreErrorKind::Unsupported,
            Self::InvalidRequest(_) => StoreErrorKind::InvalidRequest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_kind_and_the_client_error_as_source() {
        use std::error::Error as _;
        let io = || std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer");
        let cases = [
            (StoreError::LeaseLost, StoreErrorKind::LeaseLost),
            (StoreError::Capacity { bound: CapacityBound::Records, limit: 1 }, StoreErrorKind::Capacity),
            (StoreError::unavailable(io()), StoreErrorKind::Unavailable),
            (StoreError::timeout(io()), StoreErrorKind::Timeout),
            (StoreError::Corrupt("x".into()), StoreErrorKind::Corrupt),
            (StoreError::Unsupported("x".into()), StoreErrorKind::Unsupported),
            (StoreError::InvalidRequest("x".into()), StoreErrorKind::InvalidRequest),
        ];
        for (error, kind) in cases {
            assert_eq!(error.kind(), kind, "{error}");
            let has_source = matches!(kind, StoreErrorKind::Unavailable | StoreErrorKind::Timeout);
            assert_eq!(error.source().is_some(), has_source, "{error}");
        }
        assert_eq!(StoreErrorKind::LeaseLost.to_string(), "lease lost");
    }
}
