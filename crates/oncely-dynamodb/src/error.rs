//! SDK errors as store errors, by the SDK's error variant and DynamoDB's error code,
//! never by a message.

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use oncely::StoreError;

/// The error codes of throttling and passing server trouble: retried by the SDK, and
/// [`StoreError::Unavailable`] once its attempts are spent.
pub(crate) const THROTTLING: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "LimitExceededException",
];

/// A failed call as a store error:
///
/// - no answer in time (an attempt or the whole operation timed out):
///   [`StoreError::Timeout`]; the write may have landed;
/// - throttling (`ProvisionedThroughputExceededException`, `ThrottlingException`,
///   `RequestLimitExceeded`), a refused or broken connection, credentials that cannot be
///   had or are refused, a missing table, `InternalServerError`, and anything else the
///   service answers: [`StoreError::Unavailable`] (503 at the HTTP edge);
/// - `ValidationException` (a table whose key schema does not match the options, an
///   item the service finds too large): [`StoreError::InvalidRequest`], which no retry
///   mends.
pub(crate) fn store_error<E, R>(error: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    if is_throttling(&error) {
        tracing::debug!(code = error.code().unwrap_or_default(), "DynamoDB throttled the call past the SDK's attempts");
    }
    match &error {
        SdkError::TimeoutError(_) => StoreError::timeout(Call::from(error)),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => StoreError::timeout(Call::from(error)),
        SdkError::ServiceError(service) if service.err().code() == Some("ValidationException") => {
            let message = service.err().message().unwrap_or("the request was refused").to_string();
            StoreError::InvalidRequest(format!("DynamoDB refused the request: {message}"))
        }
        _ => StoreError::unavailable(Call::from(error)),
    }
}

/// A failed call, shown with the causes the SDK's own `Display` leaves out ("dispatch
/// failure" alone says nothing of a refused connection); the SDK's error is its source.
#[derive(Debug)]
struct Call {
    shown: String,
    error: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl<E, R> From<SdkError<E, R>> for Call
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    fn from(error: SdkError<E, R>) -> Self {
        // Each cause's own text, outermost first, without the SDK's `Debug` dump of the
        // raw response that its `DisplayErrorContext` appends.
        let mut shown = error.to_string();
        let mut cause = std::error::Error::source(&error);
        while let Some(next) = cause {
            let text = next.to_string();
            if !shown.ends_with(&text) {
                shown = format!("{shown}: {text}");
            }
            cause = next.source();
        }
        Call { shown, error: Box::new(error) }
    }
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::error::Error for Call {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.error.as_ref())
    }
}

/// Whether a call failed because of throttling.
pub(crate) fn is_throttling<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>) -> bool {
    error.code().is_some_and(|code| THROTTLING.contains(&code))
}

#[cfg(test)]
mod tests {
    use aws_sdk_dynamodb::operation::put_item::PutItemError;
    use aws_sdk_dynamodb::types::error::{ProvisionedThroughputExceededException, ThrottlingException};
    use oncely::store::StoreErrorKind;

    use super::*;

    /// What the SDK's deserializer attaches to an error from a response.
    fn code(code: &str) -> aws_sdk_dynamodb::error::ErrorMetadata {
        aws_sdk_dynamodb::error::ErrorMetadata::builder().code(code).build()
    }

    /// A service error; the raw response plays no part in the classification.
    fn service(error: PutItemError) -> SdkError<PutItemError, ()> {
        SdkError::service_error(error, ())
    }

    #[test]
    fn throttling_and_timeouts_have_their_kinds() {
        let throttled = service(PutItemError::ThrottlingException(
            ThrottlingException::builder().message("slow down").meta(code("ThrottlingException")).build(),
        ));
        assert!(is_throttling(&throttled));
        assert_eq!(store_error(throttled).kind(), StoreErrorKind::Unavailable);
        let exceeded = service(PutItemError::ProvisionedThroughputExceededException(
            ProvisionedThroughputExceededException::builder()
                .message("over")
                .meta(code("ProvisionedThroughputExceededException"))
                .build(),
        ));
        assert!(is_throttling(&exceeded));
        assert_eq!(store_error(exceeded).kind(), StoreErrorKind::Unavailable);
        let timeout: SdkError<PutItemError, ()> = SdkError::timeout_error("no answer");
        assert_eq!(store_error(timeout).kind(), StoreErrorKind::Timeout);
        let construction: SdkError<PutItemError, ()> = SdkError::construction_failure("no credentials");
        assert_eq!(store_error(construction).kind(), StoreErrorKind::Unavailable);
    }
}
