//! A replay is a read, observed from the server: it takes no row lock (it answers while
//! another transaction holds the record's lock), leaves the row's version as it was (no
//! update, no lock recorded in the tuple), assigns no transaction id and writes no WAL.
//! And the round trips: a new key costs two statements, a replay one, counted on the wire
//! by a proxy that reads what the client sends.
//!
//! Each probe has a control that shows it can fail: the hit flush (`record_hits`, a write)
//! queues on the lock, changes the row's version and moves the WAL.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use oncely::store::Claim;
use oncely::{ClaimOutcome, Fingerprint, IdempotencyKey, Store, StoreAdmin};
use oncely_postgres::PostgresStore;
use oncely_testkit::claim_request;
use oncely_testkit::postgres::PostgresServer;
use sqlx_core::pool::PoolOptions;
use sqlx_core::query::query;
use sqlx_core::query_scalar::query_scalar;
use sqlx_core::sql_str::AssertSqlSafe;
use sqlx_postgres::Postgres;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LONG: Duration = Duration::from_secs(60);
/// How long a claim that must not wait for a lock may take: far more than a statement
/// needs, far less than the lock is held.
const PROMPT: Duration = Duration::from_secs(5);

fn fingerprint(text: &str) -> Option<Fingerprint> {
    Some(Fingerprint::from_bytes(text.as_bytes()))
}

/// A new key, claimed: the key and the claim holding it.
async fn claimed(store: &PostgresStore) -> (IdempotencyKey, Claim) {
    let key = IdempotencyKey::uuid_v4();
    let request = claim_request(&key, None, LONG);
    assert_eq!(store.claim(&request).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });
    let claim = request.claim();
    (key, claim)
}

/// A new key, claimed and completed with the payload "r".
async fn completed(store: &PostgresStore) -> (IdempotencyKey, Claim) {
    let (key, claim) = claimed(store).await;
    store.complete(claim, Bytes::from_static(b"r"), LONG).await.expect("complete");
    (key, claim)
}

async fn replay(store: &PostgresStore, key: &IdempotencyKey) -> oncely::Replay {
    match store.claim(&claim_request(key, None, LONG)).await.expect("claim") {
        ClaimOutcome::Replay(replay) => replay,
        other => panic!("expected a replay, got {other:?}"),
    }
}

/// The row's version as the server keeps it: the transaction that wrote it (`xmin`), the
/// one that last locked or deleted it (`xmax`: set by `FOR UPDATE`, `ON CONFLICT DO
/// UPDATE` and every update), and where it lies (`ctid`: moves with every update).
async fn row_version(store: &PostgresStore, claim: Claim) -> (String, String, String) {
    query_scalar::<_, String>(AssertSqlSafe(format!(
        "SELECT concat_ws(' ', xmin, xmax, ctid) FROM {} WHERE storage_key = $1",
        store.table()
    )))
    .bind(claim.storage_key.as_bytes().as_slice())
    .fetch_one(store.pool())
    .await
    .map(|version| {
        let mut parts = version.split(' ').map(str::to_owned);
        let mut next = || parts.next().unwrap_or_default();
        (next(), next(), next())
    })
    .expect("the row")
}

/// Another transaction holds the lock of a completed record and of a held one
/// (`SELECT … FOR UPDATE`, as a holder's `lock_claim` or any writer would): a replay, a
/// mismatch and an "in progress" still answer at once, since they only read. A write on
/// the row (the hit flush) queues on the lock meanwhile, which shows the probe can fail:
/// the claim's old `INSERT … ON CONFLICT DO UPDATE` locked the row for every replay and
/// waited here until the lock was released.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_waits_for_no_row_lock() {
    let store = common::fresh_store().await;
    let (key, done) = completed(&store).await;
    let (held_key, held) = claimed(&store).await;

    let mut locker = store.pool().begin().await.expect("begin");
    let keys = vec![done.storage_key.as_bytes().to_vec(), held.storage_key.as_bytes().to_vec()];
    let locked =
        query(AssertSqlSafe(format!("SELECT 1 FROM {} WHERE storage_key = ANY($1) FOR UPDATE", store.table())))
            .bind(keys)
            .fetch_all(&mut *locker)
            .await
            .expect("lock both rows");
    assert_eq!(locked.len(), 2);

    let replayed = tokio::time::timeout(PROMPT, replay(&store, &key)).await.expect("the replay does not wait");
    assert_eq!(replayed.payload, "r");
    let mismatch = tokio::time::timeout(PROMPT, store.claim(&claim_request(&key, fingerprint("other"), LONG)))
        .await
        .expect("a mismatch does not wait");
    assert_eq!(mismatch.expect("claim"), ClaimOutcome::Mismatch);
    let busy = tokio::time::timeout(PROMPT, store.claim(&claim_request(&held_key, None, LONG)))
        .await
        .expect("meeting a live claim does not wait");
    assert!(matches!(busy, Ok(ClaimOutcome::InProgress { .. })), "{busy:?}");

    // The control: a write does queue on the lock, and replays still answer beside it.
    let flush = {
        let store = store.clone();
        tokio::spawn(async move { store.record_hits(&[(done.storage_key, 1)]).await })
    };
    common::until_a_statement_on_waits_for_a_lock(&store).await;
    assert!(!flush.is_finished(), "the flush waits for the lock");
    let replayed = tokio::time::timeout(PROMPT, replay(&store, &key)).await.expect("the replay does not wait");
    assert_eq!(replayed.hits, 0);
    locker.rollback().await.expect("release the locks");
    flush.await.expect("task").expect("the flush goes through once the lock is released");
    assert_eq!(replay(&store, &key).await.hits, 1);
}

/// Replays, mismatches and claims that meet a live holder leave the row's version
/// exactly as it was: no update and no row lock was recorded in it. The hit flush, a
/// write, changes it (the control).
#[tokio::test]
async fn answers_that_change_nothing_leave_the_row_untouched() {
    let store = common::fresh_store().await;
    let (key, done) = completed(&store).await;
    let (held_key, held) = claimed(&store).await;
    let (done_before, held_before) = (row_version(&store, done).await, row_version(&store, held).await);

    for _ in 0..10 {
        assert_eq!(replay(&store, &key).await.hits, 0);
        let mismatch = store.claim(&claim_request(&key, fingerprint("other"), LONG)).await.expect("claim");
        assert_eq!(mismatch, ClaimOutcome::Mismatch);
        let busy = store.claim(&claim_request(&held_key, None, LONG)).await.expect("claim");
        assert!(matches!(busy, ClaimOutcome::InProgress { .. }), "{busy:?}");
    }
    assert_eq!(row_version(&store, done).await, done_before, "replays and mismatches wrote nothing");
    assert_eq!(row_version(&store, held).await, held_before, "meeting a live claim wrote nothing");

    store.record_hits(&[(done.storage_key, 1)]).await.expect("record_hits");
    assert_ne!(row_version(&store, done).await, done_before, "the probe sees a write");
}

/// The WAL insert position and the next transaction id stay where they are across a
/// batch of replays, on a server of the test's own (so no other test writes to it).
///
/// The server's own background work (a checkpoint, the background writer's snapshot
/// record, autovacuum) may write WAL at any moment, so a batch is retried a few times: it
/// passes when one batch of replays leaves both in place. Every replay that wrote (the
/// old claim locked and updated the row each time) would move both in every batch. The
/// control: a hit flush moves both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_write_no_wal_and_take_no_transaction_id() {
    let server = PostgresServer::start().await;
    let url = server.fresh_database().await;
    let store = PostgresStore::connect(&url, common::fresh_options().no_sweeper()).await.expect("connect");
    let (key, done) = completed(&store).await;
    for _ in 0..10 {
        replay(&store, &key).await; // every pooled connection has the statement prepared
    }
    let position = || async {
        query_scalar::<_, String>(
            "SELECT pg_current_wal_insert_lsn()::text || ' ' || pg_snapshot_xmax(pg_current_snapshot())::text",
        )
        .fetch_one(store.pool())
        .await
        .expect("the WAL position and the next transaction id")
    };

    let mut moved = Vec::new();
    let mut quiet = false;
    for _ in 0..5 {
        let before = position().await;
        for _ in 0..100 {
            assert_eq!(replay(&store, &key).await.payload, "r");
        }
        let after = position().await;
        if before == after {
            quiet = true;
            break;
        }
        moved.push(format!("{before} → {after}"));
    }
    assert!(quiet, "every batch of replays moved the WAL or took a transaction id: {moved:?}");

    let before = position().await;
    store.record_hits(&[(done.storage_key, 100)]).await.expect("record_hits");
    let after = position().await;
    let (lsn_before, xid_before) = before.split_once(' ').expect("two parts");
    let (lsn_after, xid_after) = after.split_once(' ').expect("two parts");
    assert!(lsn_before != lsn_after && xid_before != xid_after, "the probe sees a write: {before} → {after}");
}

/// What the client sent, message by message, read off the wire.
#[derive(Debug, Default)]
struct Sent {
    /// `Execute` and `Query` messages: statements run.
    statements: AtomicU64,
    /// `Sync` messages that end a request carrying work (a statement to prepare or run):
    /// the client sends it and waits for the answer, one round trip.
    round_trips: AtomicU64,
    /// `Parse` messages: statements prepared (none once the connection's cache is warm).
    prepares: AtomicU64,
}

impl Sent {
    /// (statements, round trips, prepares) since the last call.
    fn take(&self) -> (u64, u64, u64) {
        (
            self.statements.swap(0, Ordering::SeqCst),
            self.round_trips.swap(0, Ordering::SeqCst),
            self.prepares.swap(0, Ordering::SeqCst),
        )
    }

    /// Counts one message of the frontend protocol by its type byte; `work` tells
    /// whether a message other than `Sync` came since the last `Sync`. A `Sync` alone is
    /// SQLx's ping, which its pool sends when a connection goes back to it (after the
    /// caller has its answer) and, unless `test_before_acquire(false)`, before handing
    /// one out: not counted.
    fn count(&self, kind: u8, work: bool) {
        match kind {
            b'E' | b'Q' => self.statements.fetch_add(1, Ordering::SeqCst),
            b'S' if work => self.round_trips.fetch_add(1, Ordering::SeqCst),
            b'P' => self.prepares.fetch_add(1, Ordering::SeqCst),
            _ => 0,
        };
    }
}

/// Reads the frontend protocol from a byte stream: the untyped start-up messages (an
/// SSL or GSS request, then the startup message), then typed messages (a type byte, a
/// 4-byte length that counts itself, the body).
#[derive(Default)]
struct Frontend {
    buffer: Vec<u8>,
    started: bool,
    /// A message other than `Sync` came since the last `Sync`.
    work: bool,
}

impl Frontend {
    fn feed(&mut self, bytes: &[u8], sent: &Sent) {
        self.buffer.extend_from_slice(bytes);
        loop {
            let (header, offset) = if self.started { (5, 1) } else { (8, 0) };
            if self.buffer.len() < header {
                return;
            }
            let length = u32::from_be_bytes([
                self.buffer[offset],
                self.buffer[offset + 1],
                self.buffer[offset + 2],
                self.buffer[offset + 3],
            ]) as usize;
            let total = offset + length;
            if self.buffer.len() < total {
                return;
            }
            if self.started {
                let kind = self.buffer[0];
                sent.count(kind, self.work);
                self.work = kind != b'S';
            } else if self.buffer[4..8] == 196_608u32.to_be_bytes() {
                self.started = true; // the startup message of protocol 3.0
            }
            self.buffer.drain(..total);
        }
    }
}

/// A proxy to the server of `url` that counts what clients send; the URL through it.
async fn counting_proxy(url: &str) -> (String, Arc<Sent>) {
    let port: u16 = url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("the URL's port");
    let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy_port = proxy.local_addr().expect("addr").port();
    let sent = Arc::new(Sent::default());
    let counts = Arc::clone(&sent);
    tokio::spawn(async move {
        while let Ok((client, _)) = proxy.accept().await {
            let sent = Arc::clone(&counts);
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(("127.0.0.1", port)).await else { return };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut server_read, &mut client_write).await });
                let mut frontend = Frontend::default();
                let mut chunk = vec![0; 64 * 1024];
                while let Ok(n @ 1..) = client_read.read(&mut chunk).await {
                    frontend.feed(&chunk[..n], &sent);
                    if server_write.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url.replace(&format!(":{port}/"), &format!(":{proxy_port}/")), sent)
}

/// A new key costs two statements (claim, complete), a replay one, and so do a mismatch
/// and meeting a live claim; a hit flush is one statement for the whole batch. Each is
/// one round trip: counted on the wire, on a pool of one connection that does not ping
/// before each use (a pool built by `PostgresStore::connect` does: SQLx's
/// `test_before_acquire`, one more round trip with no statement; see [`Sent::count`]).
#[tokio::test]
async fn a_new_key_costs_two_statements_and_a_replay_one() {
    let (url, sent) = counting_proxy(common::database_url().await).await;
    let pool = PoolOptions::<Postgres>::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect(&url)
        .await
        .expect("connect through the proxy");
    let store = PostgresStore::from_pool(pool, common::fresh_options().no_sweeper()).await.expect("the store");
    // Warm up: every statement once, so that the connection has each one prepared.
    let (warm, warm_claim) = completed(&store).await;
    replay(&store, &warm).await;
    store.record_hits(&[(warm_claim.storage_key, 1)]).await.expect("record_hits");
    sent.take();

    let key = IdempotencyKey::uuid_v4();
    let request = claim_request(&key, None, LONG);
    assert_eq!(store.claim(&request).await.expect("claim"), ClaimOutcome::Acquired { takeover: false });
    store.complete(request.claim(), Bytes::from_static(b"r"), LONG).await.expect("complete");
    assert_eq!(sent.take(), (2, 2, 0), "a new key: claim and complete (statements, round trips, prepares)");

    assert_eq!(replay(&store, &key).await.payload, "r");
    assert_eq!(sent.take(), (1, 1, 0), "a replay");

    let mismatch = store.claim(&claim_request(&key, fingerprint("other"), LONG)).await.expect("claim");
    assert_eq!(mismatch, ClaimOutcome::Mismatch);
    assert_eq!(sent.take(), (1, 1, 0), "a mismatch");

    let held = IdempotencyKey::uuid_v4();
    store.claim(&claim_request(&held, None, LONG)).await.expect("claim");
    sent.take();
    let busy = store.claim(&claim_request(&held, None, LONG)).await.expect("claim");
    assert!(matches!(busy, ClaimOutcome::InProgress { .. }), "{busy:?}");
    assert_eq!(sent.take(), (1, 1, 0), "meeting a live claim");

    let storage_key = request.claim().storage_key;
    store.record_hits(&[(storage_key, 2), (warm_claim.storage_key, 1), (storage_key, 3)]).await.expect("hits");
    assert_eq!(sent.take(), (1, 1, 0), "a hit flush, however many keys");
    assert_eq!(replay(&store, &key).await.hits, 5, "the batch was summed per key");
    assert_eq!(replay(&store, &warm).await.hits, 2);
    sent.take();
    store.record_hits(&[]).await.expect("an empty flush");
    assert_eq!(sent.take(), (0, 0, 0), "an empty flush sends nothing");
}

/// Hit counts saturate at the largest count the column holds rather than fail the flush
/// (which the engine would retry forever).
#[tokio::test]
async fn hit_counts_saturate_instead_of_failing_the_flush() {
    let store = common::fresh_store().await;
    let (key, done) = completed(&store).await;
    store.record_hits(&[(done.storage_key, u64::MAX), (done.storage_key, u64::MAX)]).await.expect("record_hits");
    store.record_hits(&[(done.storage_key, 1)]).await.expect("record_hits");
    assert_eq!(replay(&store, &key).await.hits, i64::MAX as u64);
    assert_eq!(store.get(&done.storage_key).await.expect("get").expect("record").hits(), i64::MAX as u64);
}
