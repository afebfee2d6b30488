//! The schema at start: the table and its index created when missing, or checked when
//! present (the statements themselves are in `sql.rs`).

use oncely::StoreError;
use sqlx_core::executor::Executor;
use sqlx_core::query_scalar::query_scalar;
use sqlx_postgres::PgPool;

use crate::error::pg_error;
use crate::sql::Sql;

/// Creates the table and its index when missing, in one transaction under an advisory
/// lock, checking on the way that a table already there has the columns this version uses.
pub(crate) async fn migrate(pool: &PgPool, sql: &Sql) -> Result<(), StoreError> {
    // A reserved word (`order`, `user`) passes the identifier check but cannot name a table
    // unquoted: say so, rather than fail the migration with a syntax error (a 503).
    let reserved: bool =
        query_scalar("SELECT EXISTS (SELECT 1 FROM pg_get_keywords() WHERE word = $1 AND catcode IN ('R', 'T'))")
            .bind(sql.table.as_str())
            .fetch_one(pool)
            .await
            .map_err(pg_error)?;
    if reserved {
        return Err(StoreError::InvalidRequest(format!(
            "table name {:?} is a reserved word in PostgreSQL; choose another",
            sql.table.as_str()
        )));
    }
    // Already there (the usual start): check the columns and change nothing. No DDL, so no
    // table lock queued behind running transactions, and a role with only the rights to
    // read and write the table can start the store.
    let t = sql.table.as_str();
    let present: bool = query_scalar("SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL")
        .bind(t)
        .bind(format!("{t}_by_expiry"))
        .fetch_one(pool)
        .await
        .map_err(pg_error)?;
    if present {
        return match pool.execute(sql.check_columns.clone()).await {
            Ok(_) => Ok(()),
            Err(sqlx_core::Error::Database(e)) if e.code().as_deref() == Some("42703") => {
                Err(StoreError::Corrupt(format!("table {t} exists but is not an Oncely records table: {e}")))
            }
            Err(e) => Err(pg_error(e)),
        };
    }
    let mut tx = pool.begin().await.map_err(pg_error)?;
    for statement in &sql.migrate {
        match (&mut *tx).execute(statement.clone()).await {
            Ok(_) => {}
            Err(sqlx_core::Error::Database(e)) if e.code().as_deref() == Some("42703") => {
                return Err(StoreError::Corrupt(format!(
                    "table {} exists but is not an Oncely records table: {e}",
                    sql.table.as_str()
                )));
            }
            Err(e) => return Err(pg_error(e)),
        }
    }
    tx.commit().await.map_err(pg_error)
}
