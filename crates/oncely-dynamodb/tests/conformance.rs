//! The DynamoDB store passes the store conformance suite on moto's DynamoDB emulator,
//! started on loopback by `oncely-testkit`: on a table keyed by the storage key alone,
//! and on a table shared the Powertools way (a sort key, every record under one
//! partition key). Each test gets a table of its own, which makes its store empty and
//! isolated.

use oncely_dynamodb::{DynamoDbStore, DynamoDbUrl};
use oncely_testkit::dynamodb::{DynamoDbServer, unique_table};

/// A store on a new table of its own on `server`, created with its TTL attribute, with
/// `options`. moto serves a request at a time, some hundreds a second: the 1,000-task case
/// queues on it for seconds, so the timeouts are generous (they bound a hung test, not
/// latency).
async fn store_with(server: &DynamoDbServer, options: &str) -> DynamoDbStore {
    let url = server.store_url(&unique_table());
    let url = format!("{url}&timeout=30s&connect_timeout=10s{options}");
    let url: DynamoDbUrl = url.parse().expect("a valid URL");
    DynamoDbStore::create_table(url.into_options()).await.expect("the table is created").0
}

/// The largest result moto keeps: it counts a binary attribute by its base64 text (4
/// bytes for 3), where DynamoDB counts its bytes, so it refuses results from about 300 KB
/// that DynamoDB takes up to [`oncely_dynamodb::MAX_PAYLOAD_BYTES`]. The store's own
/// refusal past that bound is tested in `dynamodb_store.rs`.
const MOTO_MAX_PAYLOAD: usize = oncely_dynamodb::MAX_PAYLOAD_BYTES / 4 * 3 - 4096;

mod partition_key {
    oncely_testkit::store_conformance!(
        super::store_with(super::DynamoDbServer::shared(), ""),
        max_payload = super::MOTO_MAX_PAYLOAD
    );
}

/// The suite again on a table shared the Powertools way, but for its two load cases
/// (1,000 tasks, concurrent claimers): the layout changes how items are keyed, listed and
/// counted, not how a claim's condition decides, and moto (a request at a time, some
/// hundreds a second, on the same two cores as the tests) would run both modules' load
/// cases at once too slowly for their time limits.
mod sort_key {
    oncely_testkit::store_conformance!(
        super::store_with(super::DynamoDbServer::shared(), "&sort_key=sk&prefix=payments"),
        max_payload = super::MOTO_MAX_PAYLOAD,
        load_cases = false
    );
}
