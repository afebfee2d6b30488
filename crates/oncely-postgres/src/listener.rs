//! Waking waiters across processes: the `LISTEN` connection and the task that turns
//! notifications into wakes.
//!
//! A subscription resolves on every change committed to its key, by any process
//! sharing the table, after the subscription's check (see `PostgresStore::subscribe`)
//! marked the record as waited for: the change's statement sends `pg_notify` in its own
//! transaction, PostgreSQL delivers it at commit to every session that `LISTEN`s on the
//! table's channel, and this store's listener task calls `Waiters::wake` for its key.
//! The check runs only after the listener's `LISTEN` is in effect, and a `Notified`
//! receives every `notify_waiters` issued after its creation, polled or not, so no wake
//! can fall between a subscription and its first poll.
//!
//! Notifications are not queued for a session that is not connected: when the
//! listener's connection is lost, the listener reconnects, `LISTEN`s again and then wakes
//! every waiter (`Waiters::wake_all`), which re-checks its key; a change committed in
//! the gap is seen then. The engine also polls, so a waiter is never stranded.
//!
//! The map holds an entry only while someone subscribes: a wake removes it, and the last
//! subscription of a key to be dropped removes it too.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use oncely::store::waiters::Waiters;
use oncely::{StorageKey, StoreError};
use sqlx_postgres::{PgListener, PgPool};

use crate::error::pg_error;
use crate::store::{Inner, PostgresStore};

impl PostgresStore {
    /// Starts the listener unless it runs; afterwards, every notification on the table's
    /// channel committed from now on reaches [`Waiters`].
    pub(crate) async fn ensure_listening(&self) -> Result<(), StoreError> {
        let running = |inner: &Inner| {
            inner.listener.lock().unwrap_or_else(PoisonError::into_inner).as_ref().is_some_and(|h| !h.is_finished())
        };
        if running(&self.inner) {
            return Ok(());
        }
        let _starting = self.inner.listen_start.lock().await;
        if running(&self.inner) {
            return Ok(());
        }
        let channel = self.table().to_string();
        let listener = listen(&self.inner.listen_pool, &channel).await?;
        let task =
            tokio::spawn(dispatch(listener, self.inner.listen_pool.clone(), channel, self.inner.waiters.clone()));
        *self.inner.listener.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        Ok(())
    }
}

/// A listener on `channel`, its `LISTEN` in effect.
async fn listen(pool: &PgPool, channel: &str) -> Result<PgListener, StoreError> {
    let mut listener = PgListener::connect_with(pool).await.map_err(pg_error)?;
    listener.listen(channel).await.map_err(pg_error)?;
    Ok(listener)
}

/// The listener task: wakes the waiters of each key notified; after the connection was
/// lost, reconnects, listens again, and wakes every waiter (notifications in between are
/// lost, so each re-checks its key).
async fn dispatch(listener: PgListener, pool: PgPool, channel: String, waiters: Arc<Waiters>) {
    let mut backoff = Duration::from_millis(50);
    let mut listener = Some(listener);
    while let Some(current) = listener.as_mut() {
        match current.try_recv().await {
            Ok(Some(notification)) => {
                backoff = Duration::from_millis(50);
                if let Some(key) = StorageKey::from_hex(notification.payload()) {
                    waiters.wake(&[key]);
                }
            }
            // The connection was lost and has been re-established (LISTEN included).
            Ok(None) => waiters.wake_all(),
            Err(error) => {
                tracing::warn!(%error, %channel, "the PostgreSQL store's listener lost its connection; reconnecting");
                waiters.wake_all();
                // The old listener may still hold the listen pool's only connection (sqlx
                // keeps it after a connection reset): drop it before asking for a new one,
                // or every reconnect would time out waiting for that connection.
                drop(listener.take());
                loop {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    match listen(&pool, &channel).await {
                        Ok(fresh) => {
                            listener = Some(fresh);
                            break;
                        }
                        Err(error) => tracing::debug!(%error, "the listener cannot reconnect yet"),
                    }
                }
                waiters.wake_all();
            }
        }
    }
}
