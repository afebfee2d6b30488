//! `oncely_stores::open` on every kind of store, against real servers where the store
//! needs one (started by `oncely-testkit`), and the typed errors of bad URLs.

use std::time::Duration;

use oncely::store::{FirstSeen, UrlError};
use oncely::{ClaimId, ClaimOutcome, ClaimRequest, IdempotencyKey, Scope, Store, StoreAdmin};
use oncely_stores::{OpenError, OpenedStore, open};
use oncely_testkit::dynamodb::{DynamoDbServer, unique_table};
use oncely_testkit::postgres::PostgresServer;
use oncely_testkit::redis::RedisServer;

/// The opened store works: a claim, its completion, a replay, a count and a listing.
async fn round_trip(opened: &OpenedStore) {
    let store = &opened.store;
    let key = IdempotencyKey::new(format!("open-{}", ClaimId::random())).expect("key");
    let scope = Scope::new("tests");
    let request = ClaimRequest::new(&scope, &key, None, Duration::from_secs(30), Duration::from_secs(60));
    let first = store.claim(&request).await.expect("claim");
    assert_eq!(first, ClaimOutcome::Acquired { takeover: false });
    store.complete(request.claim(), "done".into(), Duration::from_secs(60)).await.expect("complete");
    let again = ClaimRequest::new(&scope, &key, None, Duration::from_secs(30), Duration::from_secs(60));
    assert!(matches!(store.claim(&again).await.expect("replay"), ClaimOutcome::Replay(_)));
    store.ping().await.expect("ping");
    assert!(store.stats().await.expect("stats").completed >= 1);
    if opened.abilities.lists_records {
        assert!(!store.list(None, 10).await.expect("list").is_empty());
    }
}

#[tokio::test]
async fn memory_opens_with_its_bounds_and_abilities() {
    for url in ["memory://", "memory://?max_entries=3&max_bytes=1MiB&evict_completed_when_full=true"] {
        let opened = open(url).await.unwrap_or_else(|e| panic!("{url}: {e}"));
        let a = opened.abilities;
        assert!(a.counts_records_cheaply && a.lists_records && !a.shared_between_processes && !a.durable, "{a:?}");
        round_trip(&opened).await;
    }
    let bounded = open("memory://?max_entries=1").await.expect("opens");
    round_trip(&bounded).await;
    let (key, scope) = (IdempotencyKey::new("second").expect("key"), Scope::new("t"));
    let full = bounded.store.first_seen(&FirstSeen::new(&scope, &key, Duration::from_secs(60))).await;
    assert!(full.is_err(), "max_entries=1 was applied: a second record is refused");
}

#[tokio::test]
async fn sqlite_opens_a_file_with_its_options() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let url = format!("sqlite://{}?max_records=10&max_bytes=1MiB&durability=relaxed&busy_timeout=1s", path.display());
    let opened = open(&url).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let a = opened.abilities;
    assert!(a.counts_records_cheaply && a.lists_records && a.shared_between_processes && a.durable, "{a:?}");
    round_trip(&opened).await;
    assert!(path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_opens_on_the_test_server() {
    let server = RedisServer::shared();
    let url = format!("{}?prefix=open_test_{}&timeout=2s", server.url(), std::process::id());
    let opened = open(&url).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let a = opened.abilities;
    assert!(!a.counts_records_cheaply && a.lists_records && a.shared_between_processes && a.durable, "{a:?}");
    round_trip(&opened).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_opens_on_the_test_server() {
    let database = PostgresServer::shared().await.fresh_database().await;
    let url = format!("{database}?table=opened_records&pool=2&acquire_timeout=5s&sweep_interval=1h");
    let opened = open(&url).await.unwrap_or_else(|e| panic!("{}: {e}", oncely_stores::redacted(&url)));
    let a = opened.abilities;
    assert!(a.counts_records_cheaply && a.lists_records && a.shared_between_processes && a.durable, "{a:?}");
    round_trip(&opened).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_opens_on_the_test_emulator() {
    let url = DynamoDbServer::shared().store_url(&unique_table());
    let missing = open(&url).await.expect_err("no table yet");
    assert!(matches!(missing, OpenError::Open { .. }) && !missing.is_unreachable(), "{missing:?}");
    let options = url.parse::<oncely_dynamodb::DynamoDbUrl>().expect("a valid URL").into_options();
    oncely_dynamodb::DynamoDbStore::create_table(options).await.expect("the table is created");
    let url = format!("{url}&timeout=5s&max_attempts=2");
    let opened = open(&url).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let a = opened.abilities;
    assert!(!a.counts_records_cheaply && a.lists_records && a.shared_between_processes && a.durable, "{a:?}");
    round_trip(&opened).await;

    // Nothing listens on port 1.
    let down = open("dynamodb://oncely?endpoint=http://127.0.0.1:1&max_attempts=1").await.expect_err("no emulator");
    assert!(down.is_unreachable(), "{down:?}");
}

#[tokio::test]
async fn bad_urls_are_typed_errors_naming_the_option() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("o.db");
    let sqlite = |query: &str| format!("sqlite://{}?{query}", db.display());
    let cases = [
        ("memory://?max_entries=0".to_string(), "max_entries"),
        ("memory://?max_bytes=12 parsecs".to_string(), "max_bytes"),
        ("memory://?max_size=1".to_string(), "max_size"),
        ("memory://?evict_completed_when_full=yes".to_string(), "evict_completed_when_full"),
        (sqlite("max_records=0"), "max_records"),
        (sqlite("max_bytes=1 furlong"), "max_bytes"),
        (sqlite("durability=sometimes"), "durability"),
        (sqlite("busy_timeout=never"), "busy_timeout"),
        ("redis://127.0.0.1:1?timeout=soon".to_string(), "timeout"),
        ("redis://127.0.0.1:1?prefix=a*b".to_string(), "prefix"),
        ("redis+cluster://127.0.0.1:1?database=2".to_string(), "database"),
        ("rediss://127.0.0.1:1?cert_file=/client.pem".to_string(), "cert_file"),
        ("redis://127.0.0.1:1?ca_file=/ca.pem".to_string(), "ca_file"),
        ("postgres://app:s3cret@127.0.0.1:1/app?sslkey=/client.key".to_string(), "sslkey"),
        ("postgres://app:s3cret@127.0.0.1:1/app?pool=0".to_string(), "pool"),
        ("postgres://app:s3cret@127.0.0.1:1/app?statement_timeout=0s".to_string(), "statement_timeout"),
        ("postgres://app:s3cret@127.0.0.1:1/app?table=1st".to_string(), "table"),
        ("dynamodb://oncely?regoin=eu-west-1".to_string(), "regoin"),
        ("dynamodb://oncely?timeout=soon".to_string(), "timeout"),
        ("dynamodb://oncely?endpoint=127.0.0.1:8000".to_string(), "endpoint"),
    ];
    for (url, option) in &cases {
        let error = open(url).await.err().unwrap_or_else(|| panic!("{url} is refused"));
        assert!(matches!(error, OpenError::BadUrl { .. }), "{url}: {error:?}");
        assert_eq!(error.option(), Some(*option), "{url}: {error}");
        let message = error.to_string();
        assert!(message.contains(option), "the message names the option: {message}");
        assert!(message.starts_with(&oncely_stores::redacted(url)), "the message names the URL: {message}");
        assert!(!message.contains("s3cret"), "no password in {message}");
    }
    assert!(!db.exists(), "a refused URL opens nothing");

    for malformed in ["sqlite://", "memory://somewhere", "redis://", "rediss://", "dynamodb://", "dynamodb://a/b"] {
        let error = open(malformed).await.err().unwrap_or_else(|| panic!("{malformed} is refused"));
        assert!(matches!(&error, OpenError::BadUrl { source: UrlError::Malformed(_), .. }), "{malformed}: {error:?}");
    }
    for unknown in ["mysql://x", "dynamo://table", "oncely.db", ""] {
        let error = open(unknown).await.err().unwrap_or_else(|| panic!("{unknown} is refused"));
        assert!(matches!(error, OpenError::UnknownScheme { .. }), "{unknown}: {error:?}");
        assert!(error.to_string().contains("sqlite://PATH"), "the message lists the stores: {error}");
    }
}

#[tokio::test]
async fn a_store_that_cannot_open_is_an_open_error_without_the_password() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = format!("sqlite://{}", dir.path().join("no/such/dir/o.db").display());
    let error = open(&missing).await.expect_err("a file in a missing directory cannot be opened");
    assert!(matches!(error, OpenError::Open { .. }), "{error:?}");

    // Nothing listens on port 1.
    let url = "postgres://app:s3cret@127.0.0.1:1/app?acquire_timeout=1s";
    let error = open(url).await.expect_err("no server");
    assert!(matches!(error, OpenError::Open { .. }), "{error:?}");
    assert_eq!(error.url(), "postgres://app:***@127.0.0.1:1/app?acquire_timeout=1s");
    assert!(!format!("{error} {error:?}").contains("s3cret"), "{error:?}");

    let error = open("redis://127.0.0.1:1?connect_timeout=200ms").await.expect_err("no server");
    assert!(matches!(error, OpenError::Open { .. }), "{error:?}");
}
