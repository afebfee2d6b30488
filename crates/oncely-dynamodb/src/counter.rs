//! Counts the HTTP requests the store's client sends, by DynamoDB operation: an SDK
//! interceptor that sees every attempt (retries included) as it is transmitted. Tests use
//! it to prove the round trips per operation (a new key 2, a replay 1).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use oncely::store::BoxError;

/// Requests a store has sent to DynamoDB since it was opened, by operation; see
/// [`DynamoDbStore::requests_sent`](crate::DynamoDbStore::requests_sent). Each attempt
/// counts, so a retried call counts once per attempt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestsSent {
    /// `PutItem`: claims and message-dedup marks.
    pub put_item: u64,
    /// `UpdateItem`: completions, lease renewals and hit flushes.
    pub update_item: u64,
    /// `DeleteItem`: releases, admin deletes and purges.
    pub delete_item: u64,
    /// `GetItem`: admin reads, waiters' polls and pings.
    pub get_item: u64,
    /// `Scan` and `Query`: admin listings and counts (one per page).
    pub scan: u64,
    /// Anything else (`DescribeTable` at open, table creation).
    pub other: u64,
}

impl RequestsSent {
    /// Every request, whatever its operation.
    pub fn total(&self) -> u64 {
        self.put_item + self.update_item + self.delete_item + self.get_item + self.scan + self.other
    }

    /// The requests sent since `earlier`, a count taken before.
    pub fn since(&self, earlier: &RequestsSent) -> RequestsSent {
        RequestsSent {
            put_item: self.put_item - earlier.put_item,
            update_item: self.update_item - earlier.update_item,
            delete_item: self.delete_item - earlier.delete_item,
            get_item: self.get_item - earlier.get_item,
            scan: self.scan - earlier.scan,
            other: self.other - earlier.other,
        }
    }
}

/// The interceptor: one counter per kind of operation, shared by the store's clones.
#[derive(Clone, Debug, Default)]
pub(crate) struct RequestCounter(Arc<[AtomicU64; 6]>);

impl RequestCounter {
    pub(crate) fn snapshot(&self) -> RequestsSent {
        let n = |i: usize| self.0[i].load(Ordering::Relaxed);
        RequestsSent { put_item: n(0), update_item: n(1), delete_item: n(2), get_item: n(3), scan: n(4), other: n(5) }
    }
}

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "oncely-request-counter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        // DynamoDB's JSON protocol names the operation in `X-Amz-Target`:
        // `DynamoDB_20120810.PutItem`.
        let target = context.request().headers().get("x-amz-target").unwrap_or_default();
        let index = match target.rsplit('.').next() {
            Some("PutItem") => 0,
            Some("UpdateItem") => 1,
            Some("DeleteItem") => 2,
            Some("GetItem") => 3,
            Some("Scan" | "Query") => 4,
            _ => 5,
        };
        self.0[index].fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
