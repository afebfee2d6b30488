//! What the DynamoDB store promises beyond the conformance suite, on moto's emulator
//! (started by `oncely-testkit`): requests per operation counted as they are sent,
//! results too large for an item refused before any call, throttling and an emulator
//! that is down as typed errors, the table's creation, and a table shared with other
//! data.

use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use bytes::Bytes;
use oncely::store::StoreErrorKind;
use oncely::{ClaimOutcome, Failure, Oncely, StorageKey, Store, StoreAdmin, StoreError};
use oncely_dynamodb::{DynamoDbStore, DynamoDbUrl, MAX_PAYLOAD_BYTES, OpenError, RequestsSent, TableCreated};
use oncely_testkit::dynamodb::{DynamoDbServer, FaultProxy, unique_table};
use oncely_testkit::{claim_request, unique_key};

/// The options of `url` with test timeouts: moto can be slow under the suite's load.
fn options(url: &str) -> oncely_dynamodb::DynamoDbOptions {
    let url: DynamoDbUrl = format!("{url}&timeout=10s&connect_timeout=5s").parse().expect("a valid URL");
    url.into_options()
}

/// A store on a new table on the shared emulator.
async fn fresh_store(extra: &str) -> DynamoDbStore {
    let url = format!("{}{extra}", DynamoDbServer::shared().store_url(&unique_table()));
    DynamoDbStore::create_table(options(&url)).await.expect("the table is created").0
}

/// An engine whose hit flusher stays out of the counts: it flushes only when told.
fn engine(store: DynamoDbStore) -> Oncely<DynamoDbStore> {
    Oncely::builder(store).hit_flush_interval(Duration::from_secs(3600)).build().expect("valid settings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_costs_two_requests_and_a_replay_one() {
    let store = fresh_store("").await;
    let oncely = engine(store.clone());
    let op = || async { Ok::<_, Failure<String>>("charged".to_string()) };
    let key = unique_key();

    let before = store.requests_sent();
    let first = oncely.run(&key, None, op).await.expect("first run");
    assert!(!first.replayed);
    let new_key = store.requests_sent().since(&before);
    assert_eq!(new_key, RequestsSent { put_item: 1, update_item: 1, ..RequestsSent::default() }, "claim, complete");
    assert_eq!(new_key.total(), 2);

    let before = store.requests_sent();
    let retry = oncely.run(&key, None, op).await.expect("replay");
    assert!(retry.replayed);
    assert_eq!(retry.value, "charged");
    let replay = store.requests_sent().since(&before);
    assert_eq!(replay, RequestsSent { put_item: 1, ..RequestsSent::default() }, "the claim's failed condition");
    assert_eq!(replay.total(), 1);

    // A mismatch and a live holder are answered by the claim alone too.
    let held = unique_key();
    let request = claim_request(&held, None, Duration::from_secs(60));
    store.claim(&request).await.expect("claim");
    let before = store.requests_sent();
    let blocked = store.claim(&claim_request(&held, None, Duration::from_secs(60))).await.expect("claim");
    assert!(matches!(blocked, ClaimOutcome::InProgress { .. }), "{blocked:?}");
    assert_eq!(store.requests_sent().since(&before).total(), 1);

    // Hits reach the record in one UpdateItem per replayed record.
    let before = store.requests_sent();
    oncely.flush_hits().await.expect("flush");
    assert_eq!(store.requests_sent().since(&before), RequestsSent { update_item: 1, ..RequestsSent::default() });
    let record = store.get(&oncely.storage_key(&key)).await.expect("get").expect("the record");
    assert_eq!(record.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_too_large_for_an_item_is_refused_before_the_call() {
    let store = fresh_store("").await;
    let key = unique_key();
    let request = claim_request(&key, None, Duration::from_secs(60));
    store.claim(&request).await.expect("claim");
    let before = store.requests_sent();
    let too_large = Bytes::from(vec![7u8; MAX_PAYLOAD_BYTES + 1]);
    let refused = store.complete(request.claim(), too_large, Duration::from_secs(60)).await;
    match refused {
        Err(StoreError::InvalidRequest(why)) => assert!(why.contains("400 KB"), "a clear reason: {why}"),
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
    assert_eq!(store.requests_sent().since(&before).total(), 0, "nothing was sent");
    // The claim still holds the key, and a result that fits is stored.
    store.complete(request.claim(), Bytes::from_static(b"fits"), Duration::from_secs(60)).await.expect("complete");

    // A key and scope that leave no room for a result are refused at the claim.
    let scope = oncely::Scope::new("s".repeat(8 * 1024));
    let key = unique_key();
    let request = oncely::ClaimRequest::new(&scope, &key, None, Duration::from_secs(60), Duration::from_secs(60));
    let before = store.requests_sent();
    assert!(matches!(store.claim(&request).await, Err(StoreError::InvalidRequest(_))));
    assert_eq!(store.requests_sent().since(&before).total(), 0, "nothing was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_unavailable_after_the_sdks_attempts() {
    let server = DynamoDbServer::shared();
    let proxy = FaultProxy::start(&server.endpoint());
    let table = unique_table();
    let url = format!("dynamodb://{table}?endpoint={}&region=us-east-1&max_attempts=2", proxy.endpoint());
    let (store, _) = DynamoDbStore::create_table(options(&url)).await.expect("the table is created");
    let key = unique_key();
    let request = claim_request(&key, None, Duration::from_secs(60));
    store.claim(&request).await.expect("claim through the proxy");

    for code in ["ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded"] {
        proxy.fail_with(code);
        let before = (store.requests_sent(), proxy.faults_answered());
        let error = store.touch(request.claim(), Duration::from_secs(60)).await.expect_err("throttled");
        assert_eq!(error.kind(), StoreErrorKind::Unavailable, "{code}: {error:?}");
        assert!(format!("{error:?}").contains(code), "{code}: the SDK's error is the source: {error:?}");
        assert_eq!(store.requests_sent().since(&before.0).update_item, 2, "{code}: retried by the SDK, then given up");
        assert_eq!(proxy.faults_answered() - before.1, 2);
        let claimed = store.claim(&claim_request(&unique_key(), None, Duration::from_secs(60))).await;
        assert_eq!(claimed.map_err(|e| e.kind()).err(), Some(StoreErrorKind::Unavailable), "{code}");
    }
    proxy.pass();
    store.complete(request.claim(), Bytes::from_static(b"done"), Duration::from_secs(60)).await.expect("complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emulator_that_is_down_is_unavailable_and_nothing_is_acquired() {
    let server = DynamoDbServer::start();
    let url = format!("{}&max_attempts=1", server.store_url(&unique_table()));
    let (store, _) = DynamoDbStore::create_table(options(&url)).await.expect("the table is created");
    let oncely = engine(store.clone());
    oncely.run(&unique_key(), None, || async { Ok::<_, Failure<String>>(1) }).await.expect("runs while up");

    server.kill();
    let ran = std::sync::atomic::AtomicUsize::new(0);
    let result = oncely
        .run(&unique_key(), None, || async {
            ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, Failure<String>>(2)
        })
        .await;
    assert!(result.is_err(), "no store, no run");
    assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0, "the operation did not run");
    assert_eq!(store.ping().await.map_err(|e| e.kind()).err(), Some(StoreErrorKind::Unavailable));
    let claimed = store.claim(&claim_request(&unique_key(), None, Duration::from_secs(60))).await;
    assert_eq!(claimed.map_err(|e| e.kind()).err(), Some(StoreErrorKind::Unavailable));
    let reopened = DynamoDbStore::connect(options(&url)).await.expect_err("cannot open");
    assert!(matches!(reopened, OpenError::Connect(ref e) if e.kind() == StoreErrorKind::Unavailable), "{reopened:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_is_created_once_and_checked_at_open() {
    let server = DynamoDbServer::shared();
    let table = unique_table();
    let url = server.store_url(&table);
    let missing = DynamoDbStore::connect(options(&url)).await.expect_err("no table yet");
    assert!(matches!(missing, OpenError::NoTable(ref name) if *name == table), "{missing:?}");

    let (_, created) = DynamoDbStore::create_table(options(&url)).await.expect("created");
    assert_eq!(created, TableCreated::Created);
    let (_, again) = DynamoDbStore::create_table(options(&url)).await.expect("already there");
    assert_eq!(again, TableCreated::AlreadyThere);
    let store = DynamoDbStore::connect(options(&url)).await.expect("opens");
    let ttl = store.client().describe_time_to_live().table_name(&table).send().await.expect("describe TTL");
    let description = ttl.time_to_live_description().expect("a TTL description");
    assert_eq!(description.attribute_name(), Some("ttl"));

    // Another key schema, or another TTL attribute, is refused by name.
    let shaped = DynamoDbStore::connect(options(&format!("{url}&sort_key=sk"))).await.expect_err("another shape");
    assert!(matches!(shaped, OpenError::WrongTable { .. }), "{shaped:?}");
    assert!(shaped.to_string().contains("sort_key"), "{shaped}");
    let ttl = DynamoDbStore::create_table(options(&format!("{url}&ttl_attribute=expiry"))).await.expect_err("TTL");
    assert!(ttl.to_string().contains("ttl_attribute=ttl"), "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_table_keeps_its_other_items() {
    let store = fresh_store("&prefix=payments").await;
    // Another application's item, and an item of the table that only looks like a key.
    for id in ["orders#17", "payments#not-hex"] {
        let put = store.client().put_item().table_name(store.table_name()).item("id", AttributeValue::S(id.into()));
        put.item("state", AttributeValue::S("completed".into())).send().await.expect("put");
    }
    let oncely = engine(store.clone());
    oncely.run(&unique_key(), None, || async { Ok::<_, Failure<String>>(1) }).await.expect("run");
    assert_eq!(store.stats().await.expect("stats").records, 1, "only the store's records count");
    assert_eq!(store.list(None, 10).await.expect("list").len(), 1);
    assert_eq!(store.purge_expired().await.expect("purge"), 0);
    let scan = store.client().scan().table_name(store.table_name()).send().await.expect("scan");
    assert_eq!(scan.count(), 3, "the other items are still there");
    let absent = store.get(&StorageKey::from_bytes([1; 32])).await.expect("get");
    assert!(absent.is_none());
}
