//! Waking the waiters of in-progress records: a registry of which task waits for which key,
//! shared by the stores that hear of changes themselves (SQLite's writer thread,
//! PostgreSQL's `LISTEN` connection).
//!
//! A [`Subscription`] resolves on every [`Waiters::wake`] of its key made after
//! [`Waiters::subscribe`] returned: `wake` notifies under the same lock that `subscribe`
//! creates its `Notified` under, and a `Notified` created before a `notify_waiters` call
//! is woken by it even if it was never polled. Wake only after the change committed, so
//! that the woken waiter's re-check sees it. [`Waiters::wake_all`] wakes everyone, for
//! when notifications may have been lost (a reconnect); each waiter then re-checks.
//!
//! An entry lives while some subscription of its key is alive: a wake removes it, and the
//! last subscription of a key to be dropped removes it too, so keys that never change do
//! not accumulate.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use crate::StorageKey;
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

/// Who waits for which key, for stores that learn of changes by themselves (a writer
/// thread, a `LISTEN` connection) and want [`Store::subscribe`](crate::Store::subscribe)
/// futures woken by them.
///
/// ```
/// use std::sync::Arc;
/// use oncely::store::waiters::Waiters;
/// use oncely::{IdempotencyKey, Scope, StorageKey};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let waiters = Arc::new(Waiters::default());
/// let key = StorageKey::derive(&Scope::global(), &IdempotencyKey::new("order-1").unwrap());
/// let woken = waiters.subscribe(key);   // what `subscribe` returns, boxed
/// waiters.wake(&[key]);                  // after the change to `key` committed
/// woken.await;
/// # }
/// ```
#[derive(Default)]
pub struct Waiters {
    map: Mutex<crate::key::KeyMap<Arc<Notify>>>,
}

impl Waiters {
    fn lock(&self) -> MutexGuard<'_, crate::key::KeyMap<Arc<Notify>>> {
        // The map is only ever inserted into and removed from: a panic elsewhere while it
        // was held cannot leave it inconsistent, so poisoning carries no information.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A future that resolves on the next wake of `key`.
    pub fn subscribe(self: &Arc<Self>, key: StorageKey) -> Subscription {
        let mut map = self.lock();
        let notify = Arc::clone(map.entry(key).or_default());
        // Created under the lock that `wake` notifies under (see the module docs).
        let notified = Box::pin(Arc::clone(&notify).notified_owned());
        drop(map);
        Subscription { notified, _registration: Registration { waiters: Arc::clone(self), key, notify: Some(notify) } }
    }

    /// Wakes every subscription of `keys`. Called after the changes to them committed.
    pub fn wake(&self, keys: &[StorageKey]) {
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
    pub fn wake_all(&self) {
        let map = std::mem::take(&mut *self.lock());
        for notify in map.values() {
            notify.notify_waiters();
        }
    }

    /// Keys with live subscriptions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nobody waits for anything.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// A pending wake-up of one key.
///
/// Field order matters: `notified` (which holds a reference to the `Notify`) is dropped
/// before `_registration` looks whether anyone else still uses the entry.
pub struct Subscription {
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

    use crate::{IdempotencyKey, Scope};

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
