//! Waking waiters: pub/sub messages dispatched to the local tasks that wait on a key.
//!
//! The scripts publish on a record's channel when it is completed, released, deleted or
//! taken over. Each process subscribes to a channel only while some task of its own waits
//! on that key, once however many tasks wait (a count per channel), and unsubscribes when
//! the last one leaves.
//!
//! Subscribing and unsubscribing a channel are serialised by a per-channel async lock, and
//! the channel leaves the map only after its `UNSUBSCRIBE` was answered, so a waiter that
//! arrives while the last one leaves subscribes *after* that unsubscribe, never before it.
//!
//! A message can still be lost (a reconnect, a slot migrating on Cluster). Every such loss
//! only delays a waiter: the engine also wakes at its poll interval and at the holder's lease end, and a
//! disconnect wakes every waiter at once so each re-checks the record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use redis::{PushInfo, PushKind, Value};
use tokio::sync::Notify;

use crate::connection::Connection;

/// The channels this process waits on, each with its local waiters.
#[derive(Default)]
pub(crate) struct Waiters {
    channels: Mutex<HashMap<Vec<u8>, Channel>>,
}

struct Channel {
    notify: Arc<Notify>,
    waiting: usize,
    /// Held while subscribing or unsubscribing; true while the server has us subscribed.
    subscribed: Arc<tokio::sync::Mutex<bool>>,
    /// Confirmations of our own `UNSUBSCRIBE`s still to come: those are not a reason to
    /// wake anybody. Counted up before the command is sent, so whichever of the reply and
    /// the push is seen first, the push is recognised.
    own_unsubscribes: usize,
}

impl Waiters {
    /// Registers one more waiter on `channel`; the registration ends when the returned
    /// guard is dropped.
    pub(crate) fn register(self: &Arc<Self>, channel: Vec<u8>, connection: Connection) -> Registration {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = channels.entry(channel.clone()).or_insert_with(|| Channel {
            notify: Arc::new(Notify::new()),
            waiting: 0,
            subscribed: Arc::new(tokio::sync::Mutex::new(false)),
            own_unsubscribes: 0,
        });
        entry.waiting += 1;
        Registration {
            notify: entry.notify.clone(),
            subscribed: entry.subscribed.clone(),
            waiters: self.clone(),
            channel,
            connection,
        }
    }

    fn expect_own_unsubscribe(&self, channel: &[u8]) {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = channels.get_mut(channel) {
            entry.own_unsubscribes += 1;
        }
    }

    fn waiting(&self, channel: &[u8]) -> usize {
        let channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        channels.get(channel).map_or(0, |entry| entry.waiting)
    }

    /// Called by the client for every push: wakes the waiters of a message's channel, or
    /// every waiter when the connection dropped or the server ended a subscription.
    pub(crate) fn dispatch(&self, push: PushInfo) {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                if let Some(Value::BulkString(channel)) = push.data.first()
                    && let Some(entry) = channels.get(channel)
                {
                    entry.notify.notify_waiters();
                }
            }
            // The server ended a subscription we did not end (a slot moved away): the
            // waiters re-check and subscribe again.
            PushKind::Unsubscribe | PushKind::SUnsubscribe => {
                if let Some(Value::BulkString(channel)) = push.data.first()
                    && let Some(entry) = channels.get_mut(channel)
                {
                    if entry.own_unsubscribes > 0 {
                        entry.own_unsubscribes -= 1;
                    } else {
                        entry.notify.notify_waiters();
                    }
                }
            }
            PushKind::Disconnection => channels.values().for_each(|entry| entry.notify.notify_waiters()),
            _ => {}
        }
    }
}

/// One waiter's interest in a channel. Dropping the last one unsubscribes, in the
/// background.
pub(crate) struct Registration {
    notify: Arc<Notify>,
    subscribed: Arc<tokio::sync::Mutex<bool>>,
    waiters: Arc<Waiters>,
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
        let mut subscribed = self.subscribed.lock().await;
        if !*subscribed {
            self.connection.subscribe(&self.channel).await?;
            *subscribed = true;
        }
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut channels = self.waiters.channels.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = channels.get_mut(&self.channel) else { return };
        entry.waiting -= 1;
        if entry.waiting > 0 {
            return;
        }
        drop(channels);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (waiters, subscribed, connection) =
            (self.waiters.clone(), self.subscribed.clone(), self.connection.clone());
        let channel = std::mem::take(&mut self.channel);
        runtime.spawn(async move {
            let mut subscribed = subscribed.lock().await;
            if waiters.waiting(&channel) > 0 {
                return; // Somebody arrived meanwhile and keeps the subscription.
            }
            if *subscribed {
                waiters.expect_own_unsubscribe(&channel);
                if let Err(error) = connection.unsubscribe(&channel).await {
                    tracing::debug!(%error, "unsubscribing a wake-up channel failed");
                }
                *subscribed = false;
            }
            let mut channels = waiters.channels.lock().unwrap_or_else(PoisonError::into_inner);
            if channels.get(&channel).is_some_and(|entry| entry.waiting == 0) {
                channels.remove(&channel);
            }
        });
    }
}
