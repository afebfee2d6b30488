//! Waiters on in-progress records, and the listener that wakes them.
//!
//! # Guarantee
//!
//! A [`Subscription`] resolves on every change committed to its key, by any process
//! sharing the table, after the subscription's check (see `PostgresStore::subscribe`)
//! marked the record as waited for: the change's statement sends `pg_notify` in its own
//! transaction, PostgreSQL delivers it at commit to every session that `LISTEN`s on the
//! table's channel, and this store's listener task calls [`Waiters::wake`] for its key.
//! The check runs only after the listener's `LISTEN` is in effect, and a `Notified`
//! receives every `notify_waiters` issued after its creation, polled or not, so no wake
//! can fall between a subscription and its first poll.
//!
//! Notifications are not queued for a session that is not connected: when the
//! listener's connection is lost, the listener reconnects, `LISTEN`s again and then wakes
//! every waiter ([`Waiters::wake_all`]), which re-checks its key; a change committed in
//! the gap is seen then. The engine also polls, so a waiter is never stranded.
//!
//! The map holds an entry only while someone subscribes: a wake removes it, and the last
//! subscription of a key to be dropped removes it too.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use oncely::StorageKey;
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

/// Who waits for which key.
#[derive(Default)]
pub(crate) struct Waiters {
    map: Mutex<HashMap<StorageKey, Arc<Notify>>>,
}

impl Waiters {
    fn lock(&self) -> MutexGuard<'_, HashMap<StorageKey, Arc<Notify>>> {
        // The map is only ever inserted into and removed from: a panic elsewhere while it
        // was held cannot leave it inconsistent, so poisoning carries no information.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A future that resolves on the next wake of `key`.
    pub(crate) fn subscribe(self: &Arc<Self>, key: StorageKey) -> Subscription {
        let mut map = self.lock();
        let notify = Arc::clone(map.entry(key).or_default());
        // Created under the lock that `wake` notifies under (see the module docs).
        let notified = Box::pin(Arc::clone(&notify).notified_owned());
        drop(map);
        Subscription { notified, _registration: Registration { waiters: Arc::clone(self), key, notify: Some(notify) } }
    }

    /// Wakes every subscription of `keys`. Called after the changes to them committed.
    pub(crate) fn wake(&self, keys: &[StorageKey]) {
        if keys.is_empty() {
            return;
        }
        let mut map = self.lock();
        if map.is_empty() {
            return;
        }
        for key in keys {
            if let Some(notify) = map.remove(key) {
                notify.notify_waiters();
            }
        }
    }

    /// Wakes every subscription: after notifications may have been lost.
    pub(crate) fn wake_all(&self) {
        let map = std::mem::take(&mut *self.lock());
        for notify in map.values() {
            notify.notify_waiters();
        }
    }

    /// Keys with live subscriptions.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// A pending wake-up of one key.
///
/// Field order matters: `notified` (which holds a reference to the `Notify`) is dropped
/// before `_registration` looks whether anyone else still uses the entry.
pub(crate) struct Subscription {
    notified: Pin<Box<OwnedNotified>>,
    _registration: Registration,
}

impl Future for Subscription {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().notified.as_mut().poll(cx)
    }
}

/// Removes a key's entry when its last subscription is dropped.
struct Registration {
    waiters: Arc<Waiters>,
    key: StorageKey,
    notify: Option<Arc<Notify>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.waiters.lock();
        // Released under the lock, so that of two subscriptions dropped at once, the
        // second to take the lock sees the first's reference gone.
        drop(self.notify.take());
        if map.get(&self.key).is_some_and(|notify| Arc::strong_count(notify) == 1) {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use oncely::{IdempotencyKey, Scope};

    use super::*;

    fn key(name: &str) -> StorageKey {
        StorageKey::derive(&Scope::global(), &IdempotencyKey::new(name).expect("valid key"))
    }

    #[tokio::test]
    async fn a_wake_after_subscribing_resolves_even_before_the_first_poll() {
        let waiters = Arc::new(Waiters::default());
        let subscription = waiters.subscribe(key("a"));
        waiters.wake(&[key("b")]);
        waiters.wake(&[key("a")]);
        tokio::time::timeout(Duration::from_secs(5), subscription).await.expect("woken");
        assert_eq!(waiters.len(), 0);
    }

    #[tokio::test]
    async fn dropped_subscriptions_leave_no_entry() {
        let waiters = Arc::new(Waiters::default());
        let first = waiters.subscribe(key("a"));
        let second = waiters.subscribe(key("a"));
        let other = waiters.subscribe(key("b"));
        assert_eq!(waiters.len(), 2);
        drop(first);
        assert_eq!(waiters.len(), 2, "the second subscription still uses the entry");
        drop(second);
        drop(other);
        assert_eq!(waiters.len(), 0);
    }

    #[tokio::test]
    async fn wake_all_resolves_every_subscription() {
        let waiters = Arc::new(Waiters::default());
        let a = waiters.subscribe(key("a"));
        let b = waiters.subscribe(key("b"));
        waiters.wake_all();
        tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(a, b) }).await.expect("woken");
        assert_eq!(waiters.len(), 0);
    }

    #[tokio::test]
    async fn a_wake_before_subscribing_does_not_resolve() {
        let waiters = Arc::new(Waiters::default());
        waiters.wake(&[key("a")]);
        let subscription = waiters.subscribe(key("a"));
        assert!(tokio::time::timeout(Duration::from_millis(50), subscription).await.is_err());
    }
}
