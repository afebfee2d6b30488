//! SQLx errors to store errors: by the error's variant and, for an error the server
//! reported, by its SQLSTATE code (PostgreSQL's documented, stable error codes), never by
//! its message, which changes with the server's version and `lc_messages`.
//!
//! | what failed | kind | why |
//! |---|---|---|
//! | `57014` query_canceled (the session's `statement_timeout`), `55P03` lock_not_available (a `lock_timeout`) | [`Timeout`] | the statement was sent and ran out of time |
//! | class `08` connection exception, `53` insufficient resources (disk full, out of memory, too many connections), `57` operator intervention but `57014` (shutdown, crash, cannot connect now, database dropped), `40` transaction rollback (serialization failure, deadlock), `25006` a read-only standby, `42501` insufficient privilege, any other code or none | [`Unavailable`] | the server refused for a reason a retry later (or an operator) mends; the HTTP layer answers 503 |
//! | I/O and TLS errors, a closed pool, a protocol error | [`Unavailable`] | the connection failed or was lost |
//! | the pool had no connection within its acquire timeout (`PoolTimedOut`) | [`Unavailable`] | nothing was sent, so the call certainly did not take effect: the database is unreachable or the pool saturated, which is what "unavailable" says; "timeout" would claim an unknown outcome |
//! | `42P01` undefined table, `42703` undefined column, `42804` datatype mismatch, `42809` wrong object type; class `23` integrity violation; `XX001`/`XX002` data or index corrupted | [`Corrupt`] | the table is not the one this version created and checked at start (dropped, altered, or another application's), or its data is damaged: no retry mends it, and the statements themselves are fixed, not the caller's |
//! | any other code of class `42` (`42601` syntax error, `42883` undefined function, …) | [`Unsupported`] | the statements are fixed and tested, so the server does not speak them: an older PostgreSQL (`gen_random_uuid` needs 13) or a PostgreSQL-compatible database lacking a feature |
//! | class `22` data exception (a time out of range), `54` program limit exceeded | [`InvalidRequest`] | the request's values, not the database, are at fault |
//! | a column that does not decode, is missing or has an unknown type; a statement that returned no row where it always returns one | [`Corrupt`] | a row this version cannot read |
//! | a malformed URL or option, an argument or value the driver cannot encode | [`InvalidRequest`] | the caller's input |
//!
//! [`Timeout`]: StoreError::Timeout
//! [`Unavailable`]: StoreError::Unavailable
//! [`Corrupt`]: StoreError::Corrupt
//! [`Unsupported`]: StoreError::Unsupported
//! [`InvalidRequest`]: StoreError::InvalidRequest

use oncely::StoreError;
use oncely::store::StoreErrorKind;

/// Maps an SQLx error to a store error; see the [module docs](self).
pub(crate) fn pg_error(error: sqlx_core::Error) -> StoreError {
    use sqlx_core::Error as E;
    let kind = match &error {
        E::Database(db) => sqlstate_kind(db.code().as_deref().unwrap_or("")),
        E::ColumnDecode { .. }
        | E::Decode(_)
        | E::ColumnNotFound(_)
        | E::ColumnIndexOutOfBounds { .. }
        | E::TypeNotFound { .. }
        | E::RowNotFound => StoreErrorKind::Corrupt,
        E::Configuration(_) | E::InvalidArgument(_) | E::Encode(_) => StoreErrorKind::InvalidRequest,
        // Io, Tls, PoolTimedOut, PoolClosed, WorkerCrashed, Protocol, BeginFailed, and
        // whatever later versions of SQLx add.
        _ => StoreErrorKind::Unavailable,
    };
    match kind {
        StoreErrorKind::Timeout => StoreError::timeout(error),
        StoreErrorKind::Corrupt => StoreError::Corrupt(error.to_string()),
        StoreErrorKind::Unsupported => StoreError::Unsupported(error.to_string()),
        StoreErrorKind::InvalidRequest => StoreError::InvalidRequest(error.to_string()),
        _ => StoreError::unavailable(error),
    }
}

/// The kind of an error the server reported with `code` (empty when it gave none).
fn sqlstate_kind(code: &str) -> StoreErrorKind {
    let class = code.get(..2).unwrap_or("");
    match (class, code) {
        (_, "57014" | "55P03") => StoreErrorKind::Timeout,
        ("42", "42501") => StoreErrorKind::Unavailable,
        ("42", "42P01" | "42703" | "42804" | "42809") | ("23", _) | ("XX", "XX001" | "XX002") => {
            StoreErrorKind::Corrupt
        }
        ("42", _) => StoreErrorKind::Unsupported,
        ("22" | "54", _) => StoreErrorKind::InvalidRequest,
        // 08, 53, 57, 40, 25006 and every other code: the server could not do it now.
        _ => StoreErrorKind::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use sqlx_core::executor::Executor;
    use sqlx_core::pool::PoolOptions;
    use sqlx_core::query_scalar::query_scalar;
    use sqlx_postgres::{PgPool, Postgres};

    use super::*;

    #[test]
    fn sqlstate_codes_have_their_kinds() {
        use StoreErrorKind::*;
        for (code, kind) in [
            ("57014", Timeout),
            ("55P03", Timeout),
            ("08006", Unavailable),
            ("08001", Unavailable),
            ("53100", Unavailable),
            ("53300", Unavailable),
            ("57P01", Unavailable),
            ("57P03", Unavailable),
            ("40001", Unavailable),
            ("40P01", Unavailable),
            ("25006", Unavailable),
            ("42501", Unavailable),
            ("XX000", Unavailable),
            ("", Unavailable),
            ("42P01", Corrupt),
            ("42703", Corrupt),
            ("23514", Corrupt),
            ("XX001", Corrupt),
            ("42601", Unsupported),
            ("42883", Unsupported),
            ("22008", InvalidRequest),
            ("54000", InvalidRequest),
        ] {
            assert_eq!(sqlstate_kind(code), kind, "{code}");
        }
    }

    #[test]
    fn client_side_errors_have_their_kinds() {
        use sqlx_core::Error as E;
        let io = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        for (error, kind) in [
            (E::PoolTimedOut, StoreErrorKind::Unavailable),
            (E::PoolClosed, StoreErrorKind::Unavailable),
            (E::Io(io()), StoreErrorKind::Unavailable),
            (E::Tls(io().into()), StoreErrorKind::Unavailable),
            (E::Protocol("garbled".into()), StoreErrorKind::Unavailable),
            (E::Configuration("bad".into()), StoreErrorKind::InvalidRequest),
            (E::Encode("too big".into()), StoreErrorKind::InvalidRequest),
            (E::ColumnNotFound("x".into()), StoreErrorKind::Corrupt),
            (E::RowNotFound, StoreErrorKind::Corrupt),
        ] {
            let shown = error.to_string();
            assert_eq!(pg_error(error).kind(), kind, "{shown}");
        }
    }

    async fn pool() -> PgPool {
        let url = oncely_testkit::postgres::PostgresServer::shared().await.fresh_database().await;
        PoolOptions::<Postgres>::new().max_connections(3).connect(&url).await.expect("the test server")
    }

    async fn kind_of(pool: &PgPool, statements: &[&'static str]) -> StoreErrorKind {
        let mut tx = pool.begin().await.expect("begin");
        for statement in statements {
            if let Err(error) = (&mut *tx).execute(*statement).await {
                return pg_error(error).kind();
            }
        }
        panic!("{statements:?} did not fail");
    }

    /// Real errors from the test server, each mapped by its code.
    #[tokio::test]
    async fn errors_the_server_reports_are_classified_by_their_code() {
        let pool = pool().await;
        let statement_timeout = ["SET LOCAL statement_timeout = '50ms'", "SELECT pg_sleep(5)"];
        assert_eq!(kind_of(&pool, &statement_timeout).await, StoreErrorKind::Timeout);
        assert_eq!(kind_of(&pool, &["SELECT 1 / 0"]).await, StoreErrorKind::InvalidRequest);
        assert_eq!(kind_of(&pool, &["SELECT * FROM oncely_no_such_table"]).await, StoreErrorKind::Corrupt);
        assert_eq!(kind_of(&pool, &["SELECT oncely_no_such_function()"]).await, StoreErrorKind::Unsupported);

        // A lock_timeout: another transaction holds the lock.
        let mut holder = pool.begin().await.expect("begin");
        (&mut *holder).execute("SELECT pg_advisory_xact_lock(7340)").await.expect("lock");
        let lock_timeout = ["SET LOCAL lock_timeout = '50ms'", "SELECT pg_advisory_xact_lock(7340)"];
        assert_eq!(kind_of(&pool, &lock_timeout).await, StoreErrorKind::Timeout);
        drop(holder);
    }

    /// A connection the server ends under a caller: an administrator's
    /// `pg_terminate_backend`, as in a failover or a restart.
    #[tokio::test]
    async fn a_dropped_connection_is_unavailable() {
        let pool = pool().await;
        let mut victim = pool.acquire().await.expect("a connection");
        let pid: i32 = query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *victim).await.expect("pid");
        let ended: bool =
            query_scalar("SELECT pg_terminate_backend($1, 5000)").bind(pid).fetch_one(&pool).await.expect("end");
        assert!(ended);
        let error = (&mut *victim).execute("SELECT 1").await.expect_err("the connection is gone");
        let shown = error.to_string();
        assert_eq!(pg_error(error).kind(), StoreErrorKind::Unavailable, "{shown}");
    }
}
