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
    use oncely_testkit::cases;

    macro_rules! cases {
        ($($case:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    cases::$case(super::store_with(super::DynamoDbServer::shared(), "&sort_key=sk&prefix=payments").await).await;
                }
            )*
        };
    }

    cases!(
        engine_runs_once_among_concurrent_callers,
        fingerprint_mismatch_is_reported_without_a_hit,
        lapsed_lease_is_taken_over_and_old_holder_fenced,
        keep_alive_prevents_takeover_of_live_holder,
        touch_extends_the_lease,
        release_lets_the_next_caller_run,
        retention_expiry_makes_the_key_new_again,
        replays_write_nothing_and_hits_are_flushed,
        engine_hits_reach_the_store,
        waiters_are_woken_on_completion,
        waiters_are_woken_on_release,
        first_seen_inside_and_outside_its_window,
        purge_removes_only_expired_records,
        stats_count_records_by_state,
        delete_removes_and_fences_the_holder,
        records_keep_raw_key_and_scope,
        scopes_never_share_records,
        subscribe_resolves_at_once_when_nothing_is_in_progress,
    );

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replay_returns_stored_bytes_exactly() {
        let store = super::store_with(super::DynamoDbServer::shared(), "&sort_key=sk&prefix=payments").await;
        cases::replay_returns_stored_bytes_exactly_up_to(store, super::MOTO_MAX_PAYLOAD).await;
    }
}
