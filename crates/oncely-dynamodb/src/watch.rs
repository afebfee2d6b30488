//! Waiting for an in-progress record to change, by polling: DynamoDB has no cheap push
//! (Streams are per shard, seconds late, and cost a consumer). One poller per key and
//! store, shared by every task of the process that waits on the key, so a thousand
//! duplicates of one key cost one `GetItem` per poll, not a thousand.
//!
//! The poller reads the record at once, then after 50 ms, 100 ms, 200 ms … up to once a
//! second. It reports `Gone` (and stops) when the record is no longer held by the claim it
//! first saw: completed, released, deleted, expired, taken over, or unreadable (a failed
//! read resolves the waiters, whose next claim answers with the real state or the
//! error). It stops when no task waits any more.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use oncely::{ClaimId, StorageKey};
use tokio::sync::watch;

use crate::DynamoDbStore;

/// A waiter's first re-read of an in-progress record, and the longest between two.
const POLL_FIRST: Duration = Duration::from_millis(50);
const POLL_LONGEST: Duration = Duration::from_secs(1);

/// What a key's poller has seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    /// Not read yet.
    Unknown,
    /// Held by this claim.
    Held(ClaimId),
    /// No longer held by the claim first seen (or never held): waiters wake.
    Gone,
}

/// The pollers of one store (and its clones), by key: each poller's number, and a
/// receiver for tasks to clone.
#[derive(Debug, Default)]
pub(crate) struct Watches {
    pollers: Mutex<HashMap<StorageKey, (u64, watch::Receiver<Seen>)>>,
    next: AtomicU64,
}

impl Watches {
    /// A receiver of `key`'s poller, starting the poller when none runs.
    fn join(&self, store: &DynamoDbStore, key: StorageKey) -> watch::Receiver<Seen> {
        let mut pollers = self.pollers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, receiver)) = pollers.get(&key) {
            return receiver.clone();
        }
        let (sender, receiver) = watch::channel(Seen::Unknown);
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        pollers.insert(key, (number, receiver.clone()));
        tokio::spawn(poll(store.clone(), key, number, sender));
        receiver
    }

    /// Forgets `key`'s poller, if poller `number` is still the one on record.
    fn leave(&self, key: &StorageKey, number: u64) {
        let mut pollers = self.pollers.lock().unwrap_or_else(PoisonError::into_inner);
        if pollers.get(key).is_some_and(|(on_record, _)| *on_record == number) {
            pollers.remove(key);
        }
    }
}

/// Resolves when `key`'s record is no longer held by the claim its poller first saw.
pub(crate) async fn changed(store: DynamoDbStore, key: StorageKey) {
    let mut receiver = store.watches.join(&store, key);
    loop {
        if *receiver.borrow_and_update() == Seen::Gone {
            return;
        }
        // The poller ended without reporting (its task was dropped with the runtime):
        // wake, and let the engine's claim tell.
        if receiver.changed().await.is_err() {
            return;
        }
    }
}

/// The poller of one key: runs until the holder it first saw is gone or nobody waits.
async fn poll(store: DynamoDbStore, key: StorageKey, number: u64, sender: watch::Sender<Seen>) {
    let mut first = None;
    let mut pause = POLL_FIRST;
    loop {
        let holder = store.holder(&key).await;
        let gone = match (&holder, first) {
            (Ok(Some(holder)), None) => {
                first = Some(*holder);
                sender.send_replace(Seen::Held(*holder));
                false
            }
            (Ok(Some(holder)), Some(first)) => *holder != first,
            (Ok(None) | Err(_), _) => true,
        };
        if gone {
            // Off the map first, so that a task joining from now on starts a new poller
            // rather than wait on this finished one; then wake the waiters.
            store.watches.leave(&key, number);
            sender.send_replace(Seen::Gone);
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(POLL_LONGEST);
        // Only the map's own receiver is left: nobody waits.
        if sender.receiver_count() <= 1 {
            store.watches.leave(&key, number);
            if sender.receiver_count() <= 1 {
                return;
            }
            // A task joined between the count and the removal: it holds a receiver of
            // this channel, so keep polling for it (a later joiner starts its own poller).
        }
    }
}
