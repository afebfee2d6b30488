//! The store's settings: [`PostgresOptions`], and the default table's name.

use std::time::Duration;

#[cfg(doc)]
use crate::PostgresStore;
#[cfg(doc)]
use oncely::{Store, StoreError};

/// The default table.
pub const DEFAULT_TABLE: &str = "oncely_records";

/// Settings for [`PostgresStore::connect`] and [`PostgresStore::from_pool`].
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    pub(crate) table: String,
    pub(crate) max_connections: u32,
    pub(crate) min_connections: u32,
    pub(crate) acquire_timeout: Duration,
    pub(crate) statement_timeout: Option<Duration>,
    pub(crate) sweep_interval: Option<Duration>,
    pub(crate) sweep_batch: u32,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            table: DEFAULT_TABLE.to_string(),
            max_connections: 16,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Some(Duration::from_secs(5)),
            sweep_interval: Some(Duration::from_secs(60)),
            sweep_batch: 1000,
        }
    }
}

impl PostgresOptions {
    /// The table records live in (default `oncely_records`): 1 to 50 letters, digits and
    /// underscores, not starting with a digit; folded to lower case. Stores on different
    /// tables share nothing. An invalid name fails `connect` with
    /// [`StoreError::InvalidRequest`].
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The most connections the pool opens (default 16, at least 1). [`connect`] only:
    /// [`from_pool`] uses the pool as it is. The listener for waiters has a connection of
    /// its own besides, opened at the first wait.
    ///
    /// [`connect`]: PostgresStore::connect
    /// [`from_pool`]: PostgresStore::from_pool
    pub fn max_connections(mut self, connections: u32) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// Connections kept open while idle (default 0). [`connect`](PostgresStore::connect) only.
    pub fn min_connections(mut self, connections: u32) -> Self {
        self.min_connections = connections;
        self
    }

    /// How long a call waits for a connection (including opening one) before failing with
    /// [`StoreError::Unavailable`] (default 5 s). [`connect`](PostgresStore::connect) only.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// The server-side `statement_timeout` of the pool's sessions (default 5 s): a
    /// statement running longer is cancelled and the call fails with
    /// [`StoreError::Timeout`]. `None` leaves the server's setting; zero, as in
    /// PostgreSQL, disables the timeout (rather than cancelling every statement at once);
    /// anything else is rounded up to whole milliseconds.
    /// [`connect`](PostgresStore::connect) only.
    pub fn statement_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// How often a background task deletes expired records (default 60 s; zero means
    /// never, as [`no_sweeper`](Self::no_sweeper)). Expired records are invisible to every
    /// read whether swept or not.
    pub fn sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_interval = (!every.is_zero()).then_some(every);
        self
    }

    /// No background sweep: expired records stay (invisible) until
    /// [`Store::purge_expired`] or a claim of the same key replaces them.
    pub fn no_sweeper(mut self) -> Self {
        self.sweep_interval = None;
        self
    }

    /// How many expired records one sweep statement deletes (default 1000, at least 1).
    /// Each batch is its own short transaction that skips rows in use, so the sweep never
    /// holds many locks or blocks a request for long.
    pub fn sweep_batch(mut self, records: u32) -> Self {
        self.sweep_batch = records.max(1);
        self
    }
}
