//! The process's pub/sub subscriptions to records' wake-up channels ([`Subscriptions`]),
//! and the dispatch of their messages to the local tasks that wait on a key. (Not to be
//! confused with core's `oncely::store::waiters::Waiters`, the in-process wake registry
//! of the memory and PostgreSQL stores: this one also subscribes and unsubscribes on the
//! server.)
//!
//! The scripts publish on a record's channel when it is completed, released, deleted or
//! taken over. Each process subscribes to a channel only while some task of its own waits
//! on that key, once however many tasks wait (a count per channel), and unsubscribes when
//! the last one leaves.
//!
//! Invariants, kept under the map's lock unless said otherwise:
//!
//! - A channel's entry has an id of its own; the background unsubscribe of a leaving
//!   waiter acts only on the entry it was registered with, never on a newer one.
//! - Subscribing and unsubscribing one entry are serialised by the entry's async lock, and
//!   the entry leaves the map only after its `UNSUBSCRIBE` was answered, so a waiter that
//!   arrives while the last one leaves subscribes *after* that unsubscribe.
//! - `subscribed` is set *before* `SUBSCRIBE` is sent: a waiter cancelled while its
//!   `SUBSCRIBE` is in flight still leaves the channel to be unsubscribed. It is cleared
//!   when the server ends the subscription by itself (a slot moved away on Cluster), so
//!   the next waiter subscribes again.
//!
//! A message can still be lost (a reconnect, a slot migrating). Every such loss only
//! delays a waiter: the engine also wakes at its poll interval and at the holder's lease
//! end, and a disconnect wakes every waiter at once so each re-checks the record.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use redis::{PushInfo, PushKind, Value};
use tokio::sync::Notify;

use crate::connection::Connection;

/// The channels this process waits on, each with its local waiters.
#[derive(Default)]
pub(crate) struct Subscriptions {
    channels: Mutex<HashMap<Vec<u8>, Channel>>,
    next_id: AtomicU64,
}

struct Channel {
    id: u64,
    notify: Arc<Notify>,
    waiting: usize,
    /// Held while subscribing or unsubscribing.
    changing: Arc<tokio::sync::Mutex<()>>,
    /// The server has (or may have) us subscribed.
    subscribed: Arc<AtomicBool>,
    /// Confirmations of our own `UNSUBSCRIBE`s still to come: not a reason to wake anybody.
    /// Counted up before the command is sent, so whichever of the reply and the push is
    /// seen first, the push is recognised.
    own_unsubscribes: usize,
}

impl Subscriptions {
    fn lock(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Channel>> {
        // Every critical section leaves the map consistent: poisoning carries nothing.
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers one more waiter on `channel`; the registration ends when the returned
    /// guard is dropped.
    pub(crate) fn register(self: &Arc<Self>, channel: Vec<u8>, connection: Connection) -> Registration {
        let mut channels = self.lock();
        let entry = channels.entry(channel.clone()).or_insert_with(|| Channel {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            notify: Arc::new(Notify::new()),
            waiting: 0,
            changing: Arc::new(tokio::sync::Mutex::new(())),
            subscribed: Arc::new(AtomicBool::new(false)),
            own_unsubscribes: 0,
        });
        entry.waiting += 1;
        Registration {
            id: entry.id,
            notify: entry.notify.clone(),
            changing: entry.changing.clone(),
            subscribed: entry.subscribed.clone(),
            subscriptions: self.clone(),
            channel,
            connection,
        }
    }

    /// Called by the client for every push: wakes the waiters of a message's channel, or
    /// every waiter when the connection dropped.
    pub(crate) fn dispatch(&self, push: PushInfo) {
        let mut channels = self.lock();
        let channel = match push.data.first() {
            Some(Value::BulkString(channel)) => Some(channel.as_slice()),
            _ => None,
        };
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                if let Some(entry) = channel.and_then(|c| channels.get(c)) {
                    entry.notify.notify_waiters();
                }
            }
            // Our own unsubscribe's confirmation, or the server ending the subscription
            // (a slot moved away): then the waiters re-check, and the next one subscribes
            // again, wherever the slot now lives.
            PushKind::Unsubscribe | PushKind::SUnsubscribe => {
                if let Some(entry) = channel.and_then(|c| channels.get_mut(c)) {
                    if entry.own_unsubscribes > 0 {
                        entry.own_unsubscribes -= 1;
                    } else {
                        entry.subscribed.store(false, Ordering::SeqCst);
                        entry.notify.notify_waiters();
                    }
                }
            }
            PushKind::Disconnection => channels.values().for_each(|entry| entry.notify.notify_waiters()),
            _ => {}
        }
    }

    /// Runs `f` on the entry of `channel` if it is still the one with `id`.
    fn with_entry<T>(&self, channel: &[u8], id: u64, f: impl FnOnce(&mut Channel) -> T) -> Option<T> {
        let mut channels = self.lock();
        channels.get_mut(channel).filter(|entry| entry.id == id).map(f)
    }
}

/// One waiter's interest in a channel. Dropping the last one unsubscribes, in the
/// background.
pub(crate) struct Registration {
    id: u64,
    notify: Arc<Notify>,
    changing: Arc<tokio::sync::Mutex<()>>,
    subscribed: Arc<AtomicBool>,
    subscriptions: Arc<Subscriptions>,
    channel: Vec<u8>,
    connection: Connection,
}

impl Registration {
    /// What wakes this waiter; enable a `notified()` before [`subscribe`](Self::subscribe).
    pub(crate) fn notify(&self) -> &Notify {
        &self.notify
    }

    /// Makes sure the server has this process subscribed to the channel.
    pub(crate) async fn subscribe(&self) -> redis::RedisResult<()> {
        let _changing = self.changing.lock().await;
        if !self.subscribed.swap(true, Ordering::SeqCst)
            && let Err(error) = self.connection.subscribe(&self.channel).await
        {
            self.subscribed.store(false, Ordering::SeqCst);
            return Err(error);
        }
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let last = self.subscriptions.with_entry(&self.channel, self.id, |entry| {
            entry.waiting -= 1;
            entry.waiting == 0
        });
        if last != Some(true) {
            return;
        }
        let (subscriptions, connection, id) = (self.subscriptions.clone(), self.connection.clone(), self.id);
        let (changing, subscribed) = (self.changing.clone(), self.subscribed.clone());
        let channel = self.channel.clone();
        let unsubscribe = async move {
            let _changing = changing.lock().await;
            if subscriptions.with_entry(&channel, id, |entry| entry.waiting) != Some(0) {
                return; // Somebody arrived meanwhile and keeps the subscription.
            }
            if subscribed.swap(false, Ordering::SeqCst) {
                subscriptions.with_entry(&channel, id, |entry| entry.own_unsubscribes += 1);
                if let Err(error) = connection.unsubscribe(&channel).await {
                    tracing::debug!(%error, "unsubscribing a wake-up channel failed");
                    // No confirmation will come for this one.
                    subscriptions.with_entry(&channel, id, |entry| entry.own_unsubscribes -= 1);
                }
            }
            let mut channels = subscriptions.lock();
            if channels.get(&channel).is_some_and(|entry| entry.id == id && entry.waiting == 0) {
                channels.remove(&channel);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(unsubscribe)),
            // Outside a runtime nothing can be sent; forget the entry so that it does not
            // stay in the map. The server-side subscription ends with the connection.
            Err(_) => {
                let mut channels = self.subscriptions.lock();
                if channels.get(&self.channel).is_some_and(|entry| entry.id == self.id && entry.waiting == 0) {
                    channels.remove(&self.channel);
                }
            }
        }
    }
}
