//! Collecting expired records: [`purge`] in bounded batches, and the background task that
//! runs it every sweep interval. Expired records are invisible to reads whether swept or
//! not; this only frees the space.

use std::sync::Arc;
use std::time::Duration;

use oncely::StoreError;
use sqlx_core::query::query;
use sqlx_postgres::PgPool;

use crate::error::pg_error;
use crate::sql::Sql;

/// Deletes expired records, a bounded batch per statement, until a batch finds fewer
/// than it may take. Returns how many were deleted.
pub(crate) async fn purge(pool: &PgPool, sql: &Sql, batch: u32) -> Result<u64, StoreError> {
    let mut purged = 0;
    loop {
        let done = query(sql.purge_batch.clone()).bind(i64::from(batch)).execute(pool).await.map_err(pg_error)?;
        purged += done.rows_affected();
        if done.rows_affected() < u64::from(batch) {
            return Ok(purged);
        }
        // Let other work at the pool between two batches.
        tokio::task::yield_now().await;
    }
}

/// The sweeper task.
pub(crate) async fn sweep(pool: PgPool, sql: Arc<Sql>, every: Duration, batch: u32) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match purge(&pool, &sql, batch).await {
            Ok(0) => {}
            Ok(purged) => tracing::debug!(purged, table = sql.table.as_str(), "swept expired records"),
            Err(error) => tracing::warn!(%error, table = sql.table.as_str(), "sweeping expired records failed"),
        }
    }
}
