//! What the Redis store promises beyond the conformance suite, each on a real server of
//! the test's own (so that server-wide counters and outages touch nothing else): round
//! trips counted by the server, replays that write nothing by the server's dirty counter,
//! `MOVED` on a real cluster, and failures as typed errors.

use std::time::Duration;

use bytes::Bytes;
use oncely::{ClaimOutcome, Failure, Oncely, Scope, StorageKey, Store, StoreAdmin, StoreError};
use oncely_redis::{RedisOptions, RedisStore, Topology};
use oncely_testkit::redis::{RedisCluster, RedisServer};
use oncely_testkit::{GLOBAL, claim_request, claim_request_in, unique_key};

async fn store_at(url: &str) -> RedisStore {
    let (topology, _) = Topology::parse(url).expect("a valid URL");
    let options = RedisOptions::default().prefix("rt").expect("prefix").response_timeout(Duration::from_millis(500));
    RedisStore::connect(&topology, options).await.expect("the store connects")
}

/// `INFO commandstats` as (command, calls) pairs.
fn command_stats(server: &RedisServer) -> Vec<(String, u64)> {
    server
        .command(&["INFO", "commandstats"])
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.strip_prefix("calls=")?.split(',').next()?.parse().ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// What the client sent, by the server's own count: `EVALSHA` calls, and every command
/// that neither a script runs inside itself nor the test sends to read the counters.
fn client_commands(server: &RedisServer) -> (u64, Vec<String>) {
    const INSIDE_SCRIPTS: &[&str] =
        &["time", "hmget", "hget", "hset", "hdel", "hincrby", "hgetall", "pexpireat", "del", "publish", "spublish"];
    let stats = command_stats(server);
    let evalsha = stats.iter().find(|(name, _)| name == "evalsha").map_or(0, |(_, calls)| *calls);
    let others = stats
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name != "evalsha" && !name.starts_with("config") && name != "info")
        .filter(|name| !INSIDE_SCRIPTS.contains(&name.as_str()))
        .collect();
    (evalsha, others)
}

/// The server's dirty counter: writes since the last save (the server saves never), the
/// count every write command adds to and a read-only script leaves alone.
fn dirty(server: &RedisServer) -> u64 {
    let info = server.command(&["INFO", "persistence"]);
    info.lines()
        .find_map(|line| line.strip_prefix("rdb_changes_since_last_save:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rdb_changes_since_last_save in {info}"))
}

/// An engine whose hit flusher stays out of the counts: it flushes only when told.
fn engine(store: RedisStore) -> Oncely<RedisStore> {
    Oncely::builder(store).hit_flush_interval(Duration::from_secs(3600)).build().expect("valid settings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_operation_costs_two_round_trips_and_a_replay_one() {
    let server = RedisServer::start(&[]);
    let store = store_at(&server.url()).await;
    let oncely = engine(store.clone());
    let op = || async { Ok::<_, Failure<String>>("charged".to_string()) };
    // Warm up: the connection is open and the scripts loaded before counting starts.
    oncely.run(&unique_key(), None, op).await.expect("warm-up");

    let key = unique_key();
    server.command(&["CONFIG", "RESETSTAT"]);
    let first = oncely.run(&key, None, op).await.expect("first run");
    assert!(!first.replayed);
    let (evalsha, others) = client_commands(&server);
    assert_eq!(evalsha, 2, "a new operation: claim and complete");
    assert!(others.is_empty(), "no other command from the client: {others:?}");

    server.command(&["CONFIG", "RESETSTAT"]);
    let again = oncely.run(&key, None, op).await.expect("retry");
    assert!(again.replayed);
    assert_eq!(again.value, "charged");
    let (evalsha, others) = client_commands(&server);
    assert_eq!(evalsha, 1, "a replay: the claim, and nothing for its hit");
    assert!(others.is_empty(), "no other command from the client: {others:?}");

    // The hits of a batch go in one pipeline: one run of the hits script per 512 records.
    server.command(&["CONFIG", "RESETSTAT"]);
    oncely.flush_hits().await.expect("flush");
    let (evalsha, others) = client_commands(&server);
    assert_eq!(evalsha, 1, "the flush of one replay: one run of the hits script");
    assert!(others.is_empty(), "no other command from the client: {others:?}");
    let storage_key = StorageKey::derive(&Scope::global(), &key);
    assert_eq!(store.get(&storage_key).await.expect("get").expect("the record").hits(), 1);
}

/// A replay is a read: 20 replays leave the server's dirty counter where it was, so
/// nothing reaches the AOF or the replicas. The probe can fail: a new key's claim moves
/// it, and so does the flush of the replays' hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_writes_nothing() {
    let server = RedisServer::start(&[]);
    let store = store_at(&server.url()).await;
    let oncely = engine(store.clone());
    let op = || async { Ok::<_, Failure<String>>("charged".to_string()) };
    let key = unique_key();
    assert!(!oncely.run(&key, None, op).await.expect("first run").replayed);
    // A live claim and another fingerprint are reads too.
    let held = unique_key();
    let holder = claim_request(&held, None, Duration::from_secs(60));
    assert_eq!(store.claim(&holder).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });

    let before = dirty(&server);
    for _ in 0..20 {
        assert!(oncely.run(&key, None, op).await.expect("replay").replayed);
    }
    let fingerprint = Some(oncely::Fingerprint::from_digest([7; 32]));
    let mismatch = claim_request(&key, fingerprint, Duration::from_secs(60));
    assert_eq!(store.claim(&mismatch).await.expect("claim"), ClaimOutcome::Mismatch);
    let waiting = store.claim(&claim_request(&held, None, Duration::from_secs(60))).await.expect("claim");
    assert!(matches!(waiting, ClaimOutcome::InProgress { .. }), "{waiting:?}");
    assert_eq!(dirty(&server), before, "20 replays, a mismatch and an in-progress claim wrote nothing");

    let new_key = unique_key();
    assert_eq!(
        store.claim(&claim_request(&new_key, None, Duration::from_secs(60))).await.expect("claim"),
        ClaimOutcome::Acquired { takeover: false }
    );
    let after_claim = dirty(&server);
    assert!(after_claim > before, "a new key's claim is a write the probe sees");
    oncely.flush_hits().await.expect("flush");
    assert!(dirty(&server) > after_claim, "and so is the flush of the hits");
    let storage_key = StorageKey::derive(&Scope::global(), &key);
    assert_eq!(store.get(&storage_key).await.expect("get").expect("the record").hits(), 20);
}

/// A batch of hits larger than one script run: every live completed record gets its
/// count, in one pipeline of runs; records that are absent or in progress get nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_of_hits_is_one_pipeline_of_runs() {
    let server = RedisServer::start(&[]);
    let store = store_at(&server.url()).await;
    let mut batch = Vec::new();
    for i in 0..700u64 {
        let key = unique_key();
        let request = claim_request(&key, None, Duration::from_secs(60));
        store.claim(&request).await.expect("claim");
        store.complete(request.claim(), Bytes::from_static(b"r"), Duration::from_secs(60)).await.expect("complete");
        batch.push((*request.storage_key(), i % 5 + 1));
    }
    let held = unique_key();
    let holder = claim_request(&held, None, Duration::from_secs(60));
    store.claim(&holder).await.expect("claim");
    batch.push((*holder.storage_key(), 9));
    let absent = StorageKey::derive(&Scope::global(), &unique_key());
    batch.push((absent, 9));

    server.command(&["CONFIG", "RESETSTAT"]);
    store.record_hits(&batch).await.expect("record_hits");
    let (evalsha, others) = client_commands(&server);
    assert_eq!(evalsha, 2, "702 records: two runs of the hits script");
    assert!(others.is_empty(), "no other command from the client: {others:?}");
    for (key, n) in &batch[..700] {
        assert_eq!(store.get(key).await.expect("get").expect("the record").hits(), *n);
    }
    assert_eq!(store.get(holder.storage_key()).await.expect("get").expect("the record").hits(), 0);
    assert!(store.get(&absent).await.expect("get").is_none(), "record_hits creates nothing");

    // After a restart the server has no scripts: the runs answered NOSCRIPT are sent again.
    server.command(&["SCRIPT", "FLUSH"]);
    store.record_hits(&batch).await.expect("record_hits after SCRIPT FLUSH");
    for (key, n) in &batch[..700] {
        assert_eq!(store.get(key).await.expect("get").expect("the record").hits(), 2 * n, "counted once more");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_flushed_by_a_restart_are_reloaded() {
    let server = RedisServer::start(&[]);
    let oncely = Oncely::new(store_at(&server.url()).await);
    server.command(&["SCRIPT", "FLUSH"]);
    let run = oncely.run(&unique_key(), None, || async { Ok::<_, Failure<String>>(1u8) }).await;
    assert!(!run.expect("NOSCRIPT is answered by loading the script again").replayed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_follow_their_slot_to_another_node_after_moved() {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let (topology, _) = Topology::parse(&url).expect("URL");
    let store = RedisStore::connect(&topology, RedisOptions::default().prefix("moved").expect("prefix"))
        .await
        .expect("connects");
    let oncely = engine(store.clone());
    let key = unique_key();
    let op = || async { Ok::<_, Failure<String>>("once".to_string()) };
    assert!(!oncely.run(&key, None, op).await.expect("first").replayed);

    let storage_key = StorageKey::derive(&Scope::global(), &key);
    let slot: u16 = cluster.nodes()[0]
        .command(&["CLUSTER", "KEYSLOT", &store.record_key(&storage_key)])
        .trim()
        .parse()
        .expect("a slot number");
    let from = cluster.owner_of(slot);
    let to = (from + 1) % cluster.nodes().len();
    cluster.move_slot(slot, to);
    assert_eq!(cluster.owner_of(slot), to);
    cluster.nodes()[from].command(&["CONFIG", "RESETSTAT"]);

    // The client still maps the slot to the old node: it gets MOVED and follows it.
    let again = oncely.run(&key, None, op).await.expect("retry after the slot moved");
    assert!(again.replayed, "the record moved with its slot; the operation did not run again");
    let errors = cluster.nodes()[from].command(&["INFO", "errorstats"]);
    assert!(errors.contains("errorstat_MOVED"), "the old owner answered MOVED: {errors}");
    oncely.flush_hits().await.expect("the hit is flushed to the slot's new owner");
    let record = store.get(&storage_key).await.expect("get").expect("the record");
    assert_eq!(record.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_unavailable_and_the_store_recovers() {
    let server = RedisServer::start(&[]);
    let store = store_at(&server.url()).await;
    server.kill();
    let key = unique_key();
    let result =
        tokio::time::timeout(Duration::from_secs(10), store.claim(&claim_request(&key, None, Duration::from_secs(5))))
            .await
            .expect("a down server answers within the timeouts, never hangs");
    assert!(matches!(result, Err(StoreError::Unavailable(_))), "{result:?}");

    server.restart();
    // The connection manager reconnects by itself; the first attempts may still fail.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let key = unique_key();
        match store.claim(&claim_request(&key, None, Duration::from_secs(5))).await {
            Ok(outcome) => {
                assert_eq!(outcome, ClaimOutcome::Acquired { takeover: false });
                break;
            }
            Err(StoreError::Unavailable(_) | StoreError::Timeout(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("the store did not recover: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_and_oom_are_unavailable_not_success() {
    let primary = RedisServer::start(&[]);
    let replica_of = ["--replicaof", "127.0.0.1", &primary.port().to_string()].map(str::to_string);
    let replica = RedisServer::start(&replica_of.iter().map(String::as_str).collect::<Vec<_>>());
    let on_replica = store_at(&replica.url()).await;
    let key = unique_key();
    let result = on_replica.claim(&claim_request(&key, None, Duration::from_secs(5))).await;
    assert!(
        matches!(&result, Err(StoreError::Unavailable(e)) if e.to_string().to_lowercase().contains("read only")),
        "a write on a replica: {result:?}"
    );

    let store = store_at(&primary.url()).await;
    let key = unique_key();
    let request = claim_request(&key, None, Duration::from_secs(5));
    store.claim(&request).await.expect("claim");
    primary.command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    primary.command(&["CONFIG", "SET", "maxmemory", "1"]);
    let result = store.complete(request.claim(), Bytes::from_static(b"r"), Duration::from_secs(60)).await;
    assert!(
        matches!(&result, Err(StoreError::Unavailable(e)) if e.to_string().contains("OOM")),
        "a write on a full Redis: {result:?}"
    );
    primary.command(&["CONFIG", "SET", "maxmemory", "0"]);
    store
        .complete(request.claim(), Bytes::from_static(b"r"), Duration::from_secs(60))
        .await
        .expect("then it completes");
}

#[tokio::test]
async fn bad_urls_are_refused_with_the_reason() {
    for (url, why) in [
        ("redis://127.0.0.1:1?prefix=a*b", "prefix"),
        ("redis://127.0.0.1:1?timeout=forever", "timeout"),
        ("redis+cluster://", "no nodes"),
    ] {
        let error = RedisStore::open(url).await.expect_err("refused");
        assert!(error.to_string().contains(why), "{url}: {error}");
    }
    let error = RedisStore::open("redis://127.0.0.1:1").await.expect_err("nothing listens on port 1");
    assert!(matches!(error, oncely_redis::OpenError::Connect(_)), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_does_not_answer_in_time_is_a_timeout() {
    let server = RedisServer::start(&[]);
    let store = store_at(&server.url()).await; // response timeout: 500 ms
    server.command(&["CLIENT", "PAUSE", "3000", "ALL"]);
    let started = std::time::Instant::now();
    let key = unique_key();
    let request = claim_request(&key, None, Duration::from_secs(60));
    let storage_key = *request.storage_key();
    let result = store.claim(&request).await;
    // Not "unavailable": the claim was sent, so whether it took effect is unknown to
    // the caller.
    assert!(matches!(result, Err(StoreError::Timeout(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_millis(2500), "the command timed out instead of waiting out the pause");
    // And indeed it ran once the pause ended.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store.get(&storage_key).await {
            Ok(Some(record)) => {
                assert!(!record.is_completed());
                break;
            }
            _ if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("the timed-out claim never landed: {other:?}"),
        }
    }
}

/// A claim, a completion and a replay of a record whose slot is half-way through a
/// reshard: with the channel declared as a second key, Redis answered every script
/// `TRYAGAIN` for the whole migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_keeps_working_while_its_slot_is_being_resharded() {
    let cluster = RedisCluster::start();
    let (topology, _) = Topology::parse(&cluster.url()).expect("URL");
    let store = RedisStore::connect(&topology, RedisOptions::default().prefix("reshard").expect("prefix"))
        .await
        .expect("connects");
    let key = unique_key();
    let request = claim_request(&key, None, Duration::from_secs(30));
    let (storage_key, claim) = (*request.storage_key(), request.claim());
    assert_eq!(store.claim(&request).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });

    let slot: u16 = cluster.nodes()[0]
        .command(&["CLUSTER", "KEYSLOT", &store.record_key(&storage_key)])
        .trim()
        .parse()
        .expect("a slot number");
    let to = (cluster.owner_of(slot) + 1) % cluster.nodes().len();
    let from = cluster.begin_slot_move(slot, to).expect("another node");
    store.touch(claim, Duration::from_secs(30)).await.expect("touch while the slot is open");
    store.complete(claim, Bytes::from_static(b"r"), Duration::from_secs(60)).await.expect("complete");
    let again = claim_request(&key, None, Duration::from_secs(30));
    assert!(matches!(store.claim(&again).await.expect("replay"), ClaimOutcome::Replay(_)));
    store.record_hits(&[(storage_key, 1)]).await.expect("hits while the slot is open");
    cluster.finish_slot_move(slot, from, to);
    assert_eq!(store.get(&storage_key).await.expect("get").expect("the record").hits(), 1);
}

/// A subscription the server ends when the slot moves away is made again by the next
/// waiter, on the slot's new owner: the completion wakes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_are_woken_after_their_slot_moved() {
    let cluster = RedisCluster::start();
    let (topology, _) = Topology::parse(&cluster.url()).expect("URL");
    let store = RedisStore::connect(&topology, RedisOptions::default().prefix("wake").expect("prefix"))
        .await
        .expect("connects");
    let key = unique_key();
    let request = claim_request(&key, None, Duration::from_secs(30));
    let (storage_key, claim) = (*request.storage_key(), request.claim());
    store.claim(&request).await.expect("claim");
    // A waiter that stays subscribed across the move keeps the channel's entry alive.
    let mut early = store.subscribe(&storage_key);
    assert!(tokio::time::timeout(Duration::from_millis(100), &mut early).await.is_err(), "in progress: pending");

    let slot: u16 = cluster.nodes()[0]
        .command(&["CLUSTER", "KEYSLOT", &store.record_key(&storage_key)])
        .trim()
        .parse()
        .expect("a slot number");
    cluster.move_slot(slot, (cluster.owner_of(slot) + 1) % cluster.nodes().len());
    // The server ended the subscription (SUNSUBSCRIBE push): the early waiter is woken to
    // re-check, and a new waiter subscribes again on the new owner.
    tokio::time::timeout(Duration::from_secs(10), early).await.expect("woken by the slot moving away");
    let mut late = store.subscribe(&storage_key);
    assert!(tokio::time::timeout(Duration::from_millis(200), &mut late).await.is_err(), "still in progress");
    store.complete(claim, Bytes::from_static(b"r"), Duration::from_secs(60)).await.expect("complete");
    tokio::time::timeout(Duration::from_secs(10), late).await.expect("woken by the completion on the new owner");
}

/// Waiters dropped while their SUBSCRIBE is in flight (the engine's timer won) leave no
/// subscription behind on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_waiters_leave_no_subscription() {
    let server = RedisServer::start(&[]);
    let store = store_at(&server.url()).await;
    let mut keys = Vec::new();
    for _ in 0..200 {
        let key = unique_key();
        let request = claim_request(&key, None, Duration::from_secs(30));
        keys.push(*request.storage_key());
        store.claim(&request).await.expect("claim");
    }
    for key in &keys {
        let mut subscription = store.subscribe(key);
        // Polled once (the SUBSCRIBE is sent), then dropped.
        let _ = tokio::time::timeout(Duration::ZERO, &mut subscription).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let channels = server.command(&["PUBSUB", "CHANNELS", "rt:*"]);
        if channels.trim().is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "subscriptions left behind: {channels}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The same call delivered twice (the Cluster client resends after a dropped connection)
/// is answered as the first delivery was: a claim finds its own claim, not a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_claim_is_acquired_not_a_conflict() {
    let server = RedisServer::shared();
    let store = store_at(&server.url()).await;
    let key = unique_key();
    let request = claim_request(&key, None, Duration::from_secs(30));
    assert_eq!(store.claim(&request).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });
    assert!(matches!(store.claim(&request).await.expect("again"), ClaimOutcome::Acquired { .. }));
}

/// A record never expires under a live claim, even with a retention shorter than the
/// lease (the engine refuses such settings; the store does not rely on that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_outlives_its_lease_even_with_a_shorter_retention() {
    let server = RedisServer::shared();
    let store = store_at(&server.url()).await;
    let key = unique_key();
    let request = claim_request_in(&GLOBAL, &key, None, Duration::from_secs(30), Duration::from_millis(300));
    store.claim(&request).await.expect("claim");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = store.claim(&claim_request(&key, None, Duration::from_secs(30))).await.expect("claim");
    assert!(matches!(second, ClaimOutcome::InProgress { .. }), "{second:?}");
}

/// A record's key overwritten with another type (by something other than the store) is a
/// corrupt record, not "Redis is down".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_is_corrupt_not_unavailable() {
    let server = RedisServer::shared();
    let store = store_at(&server.url()).await;
    let key = unique_key();
    let request = claim_request(&key, None, Duration::from_secs(30));
    server.command(&["SET", &store.record_key(request.storage_key()), "not a hash"]);
    let result = store.claim(&request).await;
    assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
}

/// A field of `INFO replication`.
fn replication(server: &RedisServer, field: &str) -> Option<String> {
    let info = server.command(&["INFO", "replication"]);
    info.lines().find_map(|line| line.strip_prefix(field)?.strip_prefix(':')).map(|v| v.trim().to_string())
}

/// Waits until `replica` has applied everything `primary` wrote so far. Replication gives
/// no signal a test can wait on, so this polls the offsets, with a deadline.
fn wait_for_replica(primary: &RedisServer, replica: &RedisServer) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let written: Option<u64> = replication(primary, "master_repl_offset").and_then(|n| n.parse().ok());
        let applied: Option<u64> = replication(replica, "slave_repl_offset").and_then(|n| n.parse().ok());
        let up = replication(replica, "master_link_status").as_deref() == Some("up");
        if up && matches!((written, applied), (Some(w), Some(a)) if a >= w) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the replica did not catch up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Calls of `command` by the server's count.
fn calls(server: &RedisServer, command: &str) -> u64 {
    command_stats(server).into_iter().find(|(name, _)| name == command).map_or(0, |(_, calls)| calls)
}

/// With the opt-in replica, a replay is one read-only call on the replica and nothing on
/// the primary; a new key costs one more round trip (the replica read, then claim and
/// complete on the primary); whatever the replica lacks (a lagging or detached replica,
/// another fingerprint) is decided by the primary, and a dead replica only sends every
/// claim to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_served_by_the_replica_when_asked() {
    let primary = RedisServer::start(&[]);
    let replica_of = ["--replicaof", "127.0.0.1", &primary.port().to_string()].map(str::to_string);
    let replica = RedisServer::start(&replica_of.iter().map(String::as_str).collect::<Vec<_>>());
    wait_for_replica(&primary, &replica);
    let (topology, _) = Topology::parse(&primary.url()).expect("a valid URL");
    let options = RedisOptions::default().prefix("rr").expect("prefix").replica(&replica.url()).expect("replica");
    let store = RedisStore::connect(&topology, options).await.expect("the store connects to both");
    let oncely = engine(store.clone());
    let op = || async { Ok::<_, Failure<String>>("charged".to_string()) };
    oncely.run(&unique_key(), None, op).await.expect("warm-up");

    let key = unique_key();
    let reset = || [&primary, &replica].map(|server| server.command(&["CONFIG", "RESETSTAT"]));
    reset();
    assert!(!oncely.run(&key, None, op).await.expect("first run").replayed);
    assert_eq!(calls(&replica, "evalsha_ro"), 1, "a new key: the replica read first");
    assert_eq!(calls(&primary, "evalsha"), 2, "then claim and complete on the primary");

    wait_for_replica(&primary, &replica);
    reset();
    let before = dirty(&primary);
    let again = oncely.run(&key, None, op).await.expect("replay");
    assert!(again.replayed);
    assert_eq!(again.value, "charged");
    assert_eq!(calls(&replica, "evalsha_ro"), 1, "a replay: one read on the replica");
    assert_eq!(calls(&primary, "evalsha"), 0, "and nothing on the primary");
    assert_eq!(dirty(&primary), before);
    // The replica's replay carries the record's own expiry, as the primary's does.
    let request = claim_request(&key, None, Duration::from_secs(60));
    let ClaimOutcome::Replay(replay) = store.claim(&request).await.expect("claim") else {
        panic!("the replica replays the completed record");
    };
    let record = store.get(request.storage_key()).await.expect("get").expect("record");
    assert_eq!(replay.expires_at, record.expires_at);

    // A restarted replica has no scripts: the read loads it there and is made again.
    replica.command(&["SCRIPT", "FLUSH"]);
    reset();
    assert!(oncely.run(&key, None, op).await.expect("replay").replayed);
    assert_eq!(calls(&primary, "evalsha"), 0, "NOSCRIPT on the replica is answered on the replica");

    // Another fingerprint: the replica has no replay for it; the primary says mismatch.
    let fingerprint = Some(oncely::Fingerprint::from_digest([7; 32]));
    let other = claim_request(&key, fingerprint, Duration::from_secs(60));
    assert_eq!(store.claim(&other).await.expect("claim"), ClaimOutcome::Mismatch);

    // A replica that lags (here: detached, so it never gets the completion): the primary
    // replays.
    replica.command(&["REPLICAOF", "NO", "ONE"]);
    let late = unique_key();
    assert!(!oncely.run(&late, None, op).await.expect("first run").replayed);
    reset();
    let replayed = oncely.run(&late, None, op).await.expect("replay from the primary");
    assert!(replayed.replayed);
    assert_eq!(replayed.value, "charged");
    assert_eq!(calls(&replica, "evalsha_ro"), 1, "the replica was asked and had nothing");
    assert_eq!(calls(&primary, "evalsha"), 1, "so the primary's claim replayed it");

    // A dead replica: every claim goes to the primary.
    replica.kill();
    let replayed = oncely.run(&key, None, op).await.expect("replay without the replica");
    assert!(replayed.replayed);
    let fresh = unique_key();
    assert!(!oncely.run(&fresh, None, op).await.expect("a new key without the replica").replayed);
}

#[tokio::test]
async fn replica_reads_are_refused_on_cluster() {
    let topology = Topology::Cluster(vec!["redis://127.0.0.1:1".into()]);
    let options = RedisOptions::default().replica("redis://127.0.0.1:2").expect("a valid replica URL");
    let error = RedisStore::connect(&topology, options).await.expect_err("refused");
    assert!(matches!(error, oncely_redis::OpenError::Unsupported(_)), "{error}");
}
