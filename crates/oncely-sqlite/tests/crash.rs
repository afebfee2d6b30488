//! No acknowledged completion is lost when the process is killed.
//!
//! The test re-runs its own binary as a child, selecting only
//! [`child_completes_keys_until_killed`] and pointing it at a database through
//! [`CHILD_DB`]. The child completes keys from several tasks at once and prints each key
//! only after `complete` returned `Ok`. The parent reads those acknowledgements, kills the
//! child with SIGKILL in the middle of its work, reopens the database and checks that
//! every acknowledged key is a completed record with its payload.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use oncely::{ClaimOutcome, IdempotencyKey, RecordState, Scope, StorageKey, Store, StoreAdmin};
use oncely_sqlite::{Durability, SqliteOptions, SqliteStore};
use oncely_testkit::{claim_request, unique_key};

/// The child's database path; set only in the child.
const CHILD_DB: &str = "ONCELY_SQLITE_CRASH_CHILD_DB";
/// Acknowledgements the parent waits for before it kills the child.
const ACKS_BEFORE_KILL: usize = 300;
/// Tasks completing keys at once in the child.
const CHILD_TASKS: usize = 8;
/// The child stops on its own after this long, should the parent be gone.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);
const ACK: &str = "ACK ";

fn payload_of(key: &str) -> Bytes {
    Bytes::from(format!("the result of {key}"))
}

/// The child: does nothing unless [`CHILD_DB`] is set.
#[test]
fn child_completes_keys_until_killed() {
    let Some(path) = std::env::var_os(CHILD_DB) else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let store = SqliteStore::open(&path, SqliteOptions::default().durability(Durability::Sync)).expect("open");
        let deadline = tokio::time::Instant::now() + CHILD_LIFETIME;
        let mut tasks = Vec::new();
        for _ in 0..CHILD_TASKS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                while tokio::time::Instant::now() < deadline {
                    let key = unique_key();
                    let request = claim_request(&key, None, Duration::from_secs(60));
                    let outcome = store.claim(&request).await.expect("claim");
                    assert_eq!(outcome, ClaimOutcome::Acquired { takeover: false });
                    store
                        .complete(request.claim(), payload_of(key.as_str()), Duration::from_secs(3600))
                        .await
                        .expect("complete");
                    // Acknowledged only now: one write of one short line, so the parent
                    // never reads half an acknowledgement.
                    let mut stdout = std::io::stdout().lock();
                    writeln!(stdout, "{ACK}{key}").expect("write the acknowledgement");
                    stdout.flush().expect("flush the acknowledgement");
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
    });
}

/// Kills the child if the parent test fails before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(path: &Path) -> KillOnDrop {
    let exe = std::env::current_exe().expect("the test binary");
    let child = Command::new(exe)
        .args(["child_completes_keys_until_killed", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB, path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    KillOnDrop(child)
}

#[test]
fn acknowledged_completions_survive_sigkill() {
    if std::env::var_os(CHILD_DB).is_some() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oncely.db");
    let mut child = spawn_child(&path);

    // Lines arrive on a channel so that a stalled child fails the test instead of hanging it.
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (lines_tx, lines) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        while stdout.read_line(&mut line).is_ok_and(|n| n > 0) {
            // A line cut short by the kill has no newline and is no acknowledgement.
            if line.ends_with('\n') && lines_tx.send(line.trim_end().to_string()).is_err() {
                return;
            }
            line.clear();
        }
    });
    let mut acked: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < ACKS_BEFORE_KILL {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => acked.extend(line.strip_prefix(ACK).map(str::to_string)),
            Err(_) => panic!("the child acknowledged only {} completions in time", acked.len()),
        }
    }
    child.0.kill().expect("SIGKILL the child");
    let status = child.0.wait().expect("reap the child");
    assert!(!status.success(), "the child was killed, not finished: {status:?}");
    // Whatever the child acknowledged before it died is still in the pipe.
    acked.extend(lines.iter().filter_map(|line| line.strip_prefix(ACK).map(str::to_string)));
    reader.join().expect("reader thread");

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let store = SqliteStore::open(&path, SqliteOptions::default()).expect("the database reopens after the kill");
        for key in &acked {
            let key = IdempotencyKey::new(key).expect("an acknowledged key");
            let record = store
                .get(&StorageKey::derive(&Scope::global(), &key))
                .await
                .expect("get")
                .unwrap_or_else(|| panic!("acknowledged key {key} was lost"));
            match record.state {
                RecordState::Completed { payload, .. } => assert_eq!(payload, payload_of(key.as_str()), "{key}"),
                RecordState::InProgress { .. } => panic!("acknowledged key {key} is not completed"),
            }
        }
        let stats = store.stats().await.expect("stats");
        eprintln!("{} acknowledged completions survived the kill; the store holds {stats:?}", acked.len());
        assert!(stats.completed >= acked.len() as u64, "{stats:?} holds the {} acknowledged", acked.len());
    });
    assert!(acked.len() >= ACKS_BEFORE_KILL);
}
