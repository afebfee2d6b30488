//! The schema and every statement the store sends, for one table.
//!
//! The table name is the only text spliced into SQL, and only after [`TableName::new`]
//! accepted it as a plain identifier (letters, digits, underscores); every value is a bound
//! parameter. Statements are built once per store and prepared once per connection (SQLx
//! caches them).
//!
//! # Conventions
//!
//! - Times are `timestamptz` from the server's `now()`, the start of the statement's
//!   transaction: one clock for every process sharing the table. They are read back as
//!   integer microseconds since the epoch ([`us`]).
//! - Durations are bound as microseconds (`float8`, exact below 2^53 µs, about 285
//!   years) and added as `$n * interval '1 microsecond'`.
//! - A record is in progress exactly when `claim_id` is set; completed exactly when
//!   `payload` is. The table's `CHECK` ties the columns to the state, so a bug cannot store
//!   a record that reads back as something else.
//! - `waited` is set by [`Sql::subscribe`] on a record someone waits for; only such
//!   records `pg_notify` when they change (NOTIFY serialises committing transactions
//!   cluster-wide, so a completion nobody waits for does not pay for it).

use std::sync::Arc;

use oncely::StoreError;
use sqlx_core::sql_str::{AssertSqlSafe, SqlSafeStr, SqlStr};

/// A validated table name: an unquoted PostgreSQL identifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TableName(String);

/// The longest table name accepted: PostgreSQL's identifiers hold 63 bytes, and the index
/// name adds `_by_expiry`.
pub(crate) const MAX_TABLE_NAME: usize = 50;

impl TableName {
    /// Accepts `[A-Za-z_][A-Za-z0-9_]*` of at most [`MAX_TABLE_NAME`] bytes, folded to lower
    /// case (as PostgreSQL folds unquoted names), so the name is safe to splice into SQL.
    pub(crate) fn new(name: &str) -> Result<Self, StoreError> {
        let valid = !name.is_empty()
            && name.len() <= MAX_TABLE_NAME
            && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if valid {
            Ok(Self(name.to_ascii_lowercase()))
        } else {
            Err(StoreError::InvalidRequest(format!(
                "{name:?} is not a valid table name: use 1 to {MAX_TABLE_NAME} letters, digits and underscores, \
                 not starting with a digit"
            )))
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// `col` as integer microseconds since the Unix epoch.
fn us(col: &str) -> String {
    format!("(extract(epoch FROM {col}) * 1000000)::int8")
}

/// `$n` microseconds from now.
fn from_now(param: &str) -> String {
    format!("now() + {param}::float8 * interval '1 microsecond'")
}

/// A statement built here from a validated table name (see the module docs): shared, so
/// that handing it to a query clones a pointer.
fn stmt(text: String) -> SqlStr {
    AssertSqlSafe(Arc::<str>::from(text)).into_sql_str()
}

/// An output column that makes the statement's own (autocommit) transaction commit
/// without waiting for its WAL to reach the disk (`synchronous_commit = off`, local to
/// the transaction) unless `durable` holds for the returned row.
///
/// Used where a statement's outcome need not survive a crash of the *server*: a repeated
/// `first_seen` (a marker's hit count), or a claim that met a record changed since its
/// snapshot and changed nothing (see `Sql::claim`). Those then release the row's lock as
/// soon as they commit instead of one WAL flush later. A new claim or a takeover
/// (someone now runs the operation: a lost claim would let a retry run it again while the
/// holder lives) and a first sighting keep the server's setting. Nothing changes for the
/// calling process: the commit is visible to everyone at once, and is lost only if the
/// server itself crashes within `wal_writer_delay` (× 3) of it.
fn relaxed_unless(durable: &str) -> String {
    format!(
        "set_config('synchronous_commit', \
         CASE WHEN {durable} THEN current_setting('synchronous_commit') ELSE 'off' END, true)"
    )
}

/// The columns `codec::read_record` reads, in its order.
fn record_columns() -> String {
    format!(
        "storage_key, key, scope, fingerprint, {}, {}, claim_id, {}, payload, {}, hits, attempt",
        us("created_at"),
        us("expires_at"),
        us("lease_until"),
        us("completed_at")
    )
}

/// Every statement, for one table.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) table: TableName,
    pub(crate) migrate: Vec<SqlStr>,
    /// The migration's column check alone, for a table and index that already exist.
    pub(crate) check_columns: SqlStr,
    pub(crate) claim: SqlStr,
    pub(crate) record_hits: SqlStr,
    pub(crate) complete: SqlStr,
    pub(crate) release: SqlStr,
    pub(crate) touch: SqlStr,
    pub(crate) get: SqlStr,
    pub(crate) delete: SqlStr,
    pub(crate) purge_batch: SqlStr,
    pub(crate) stats: SqlStr,
    pub(crate) first_seen: SqlStr,
    pub(crate) list: SqlStr,
    pub(crate) subscribe: SqlStr,
    pub(crate) hold: SqlStr,
    pub(crate) set_recovery_point: SqlStr,
    pub(crate) recovery_point: SqlStr,
}

impl Sql {
    pub(crate) fn new(table: TableName) -> Self {
        let t = table.as_str();
        let record = record_columns();
        // The notification channel is the table's name; the payload is the storage key in hex.
        let notify = format!("pg_notify('{t}', encode(storage_key, 'hex'))");
        // Conditions on the existing row `r` in the claim's upsert (the `SET` expressions
        // all read the row as the conflict locked it, before the update).
        let expired = "r.expires_at <= now()";
        let same = "r.fingerprint IS NOT DISTINCT FROM excluded.fingerprint";
        let lapsed = format!("(r.claim_id IS NOT NULL AND r.lease_until <= now() AND {same})");
        let held = "storage_key = $1 AND claim_id = $2 AND expires_at > now()";
        let renewed = "clock_timestamp() + lease_us * interval '1 microsecond'";

        Self {
            migrate: vec![
                // Two processes creating the table at once would collide in the catalog:
                // they take turns on an advisory lock ("oncl", the table's hash), held to
                // the end of the migration's transaction.
                stmt(format!("SELECT pg_advisory_xact_lock(1869505388, hashtext('{t}'))")),
                stmt(format!(
                    "CREATE TABLE IF NOT EXISTS {t} (
                        storage_key    bytea       PRIMARY KEY CHECK (octet_length(storage_key) = 32),
                        key            text        NOT NULL,
                        scope          text        NOT NULL,
                        fingerprint    bytea       CHECK (fingerprint IS NULL OR octet_length(fingerprint) = 32),
                        created_at     timestamptz NOT NULL,
                        expires_at     timestamptz NOT NULL,
                        claim_id       uuid,
                        lease_until    timestamptz,
                        lease_us       bigint      NOT NULL DEFAULT 0,
                        payload        bytea,
                        completed_at   timestamptz,
                        hits           bigint      NOT NULL DEFAULT 0,
                        attempt        integer     NOT NULL DEFAULT 1,
                        recovery_point text,
                        waited         boolean     NOT NULL DEFAULT false,
                        CHECK ((claim_id IS NOT NULL AND lease_until IS NOT NULL AND payload IS NULL)
                            OR (claim_id IS NULL AND lease_until IS NULL AND payload IS NOT NULL
                                AND completed_at IS NOT NULL))
                    ) WITH (fillfactor = 80)"
                )),
                // A table of that name made by someone else fails here (code 42703,
                // undefined column), before anything is added to it.
                stmt(format!(
                    "SELECT storage_key, key, scope, fingerprint, created_at, expires_at, claim_id, lease_until, \
                     payload, completed_at, hits, attempt, recovery_point, waited FROM {t} LIMIT 0"
                )),
                stmt(format!("CREATE INDEX IF NOT EXISTS {t}_by_expiry ON {t} (expires_at)")),
                stmt(format!("COMMENT ON TABLE {t} IS 'Oncely idempotency records (schema 1)'")),
            ],
            // The claim in one statement (one round trip), which writes only when the
            // claim may acquire the key. The outcome is read off the one row it returns.
            //
            // 1. `found` reads the live record with a plain SELECT: the statement's
            //    snapshot, no row lock (not even FOR SHARE).
            // 2. `settled` keeps that row when the snapshot alone decides the outcome:
            //    - another fingerprint → mismatch. A live record's fingerprint never
            //      changes (only a new record after its expiry or deletion has another),
            //      and `now()` is fixed for the statement, so at the snapshot's instant the
            //      key held a live record of another request: the answer is that instant's;
            //    - completed, same fingerprint → replay. A completed record changes only
            //      by expiry, deletion or `record_hits`: the snapshot's record is the
            //      answer at that instant, hits as counted by then;
            //    - in progress, same fingerprint, lease live (`lease_until > now()`) →
            //      in progress, the holder's lease as the snapshot had it.
            //    These write nothing: no row lock, no transaction id, no WAL record (a
            //    read-only transaction's commit writes none either), so replays of a hot
            //    key never queue on its row, not even behind a holder's transaction that
            //    holds the row's lock (`lock_claim`).
            // 3. Only otherwise (no live record, or a lapsed lease of the same
            //    fingerprint: the claim may acquire) does `claimed` run the insert. With
            //    `settled` non-empty its SELECT yields no row, so nothing is inserted and
            //    ON CONFLICT never runs.
            //
            // The insert is the concurrency guard, exactly as when it was the whole
            // claim: it either creates the record or meets the one in the way, waits for
            // and locks its newest committed version (newer than the snapshot when a
            // transaction committed in between), and always updates it, so that RETURNING
            // hands back the row as the claim left it in every case (a record the claim
            // must not change is "updated" to itself). Every SET reads that locked row,
            // not the snapshot, so what happened since the snapshot decides:
            //
            // - expired → replaced by the new claim, every column (attempt 1);
            // - same fingerprint, in progress, lease lapsed → taken over: new claim id,
            //   lease and expiry, attempt + 1; created_at and recovery_point kept;
            // - otherwise (completed since the snapshot, another fingerprint, a live lease,
            //   or a concurrent claim of an absent key that inserted first) → unchanged.
            //
            // So two claims of an absent key give one acquired (the second insert meets the
            // first's row and leaves it as it is), and a record completed or taken over
            // between the snapshot and the insert is never overwritten. Only in that race
            // does a claim that did not acquire write (the row to itself), and it commits
            // relaxed (`relaxed_unless`). Hits are never counted here: the engine counts
            // replays and flushes them with `record_hits`.
            //
            // Exactly one branch yields the one row: `settled`, or else `claimed`. The
            // caller reads the outcome off it: the request's claim id holds it → acquired
            // (a takeover when attempt > 1); else another fingerprint → mismatch; else
            // completed → replay; else in progress.
            claim: stmt(format!(
                "WITH found AS (
                     SELECT claim_id, fingerprint, lease_until, payload, completed_at, hits, attempt, expires_at
                     FROM {t} WHERE storage_key = $1 AND expires_at > now()),
                 settled AS (
                     SELECT * FROM found
                     WHERE fingerprint IS DISTINCT FROM $4 OR claim_id IS NULL OR lease_until > now()),
                 claimed AS (
                     INSERT INTO {t} AS r (storage_key, key, scope, fingerprint, created_at, expires_at, claim_id,
                         lease_until, lease_us, hits, attempt, waited)
                     SELECT $1, $2, $3, $4, now(), {exp}, $5, {lease}, $6::float8::bigint, 0, 1, false
                     WHERE NOT EXISTS (SELECT FROM settled)
                     ON CONFLICT (storage_key) DO UPDATE SET
                         key            = CASE WHEN {expired} THEN excluded.key ELSE r.key END,
                         scope          = CASE WHEN {expired} THEN excluded.scope ELSE r.scope END,
                         fingerprint    = CASE WHEN {expired} THEN excluded.fingerprint ELSE r.fingerprint END,
                         created_at     = CASE WHEN {expired} THEN excluded.created_at ELSE r.created_at END,
                         claim_id       = CASE WHEN {expired} OR {lapsed} THEN excluded.claim_id ELSE r.claim_id END,
                         lease_until    = CASE WHEN {expired} OR {lapsed} THEN {taken_lease}
                                               ELSE r.lease_until END,
                         lease_us       = CASE WHEN {expired} OR {lapsed} THEN excluded.lease_us ELSE r.lease_us END,
                         expires_at     = CASE WHEN {expired} OR {lapsed} THEN {taken_expiry}
                                               ELSE r.expires_at END,
                         payload        = CASE WHEN {expired} THEN NULL ELSE r.payload END,
                         completed_at   = CASE WHEN {expired} THEN NULL ELSE r.completed_at END,
                         hits           = CASE WHEN {expired} THEN 0 ELSE r.hits END,
                         attempt        = CASE WHEN {expired} THEN 1 WHEN {lapsed} THEN r.attempt + 1
                                               ELSE r.attempt END,
                         recovery_point = CASE WHEN {expired} THEN NULL ELSE r.recovery_point END,
                         waited         = CASE WHEN {expired} THEN false ELSE r.waited END
                     RETURNING claim_id, fingerprint, lease_until, payload, completed_at, hits, attempt,
                         expires_at, {relaxed} AS relaxed),
                 answer AS (
                     SELECT claim_id, fingerprint, lease_until, payload, completed_at, hits, attempt, expires_at,
                         relaxed
                     FROM claimed
                     UNION ALL
                     SELECT claim_id, fingerprint, lease_until, payload, completed_at, hits, attempt, expires_at, NULL
                     FROM settled)
                 SELECT coalesce(claim_id = $5, false), fingerprint IS NOT DISTINCT FROM $4, claim_id IS NULL,
                     CASE WHEN claim_id IS NULL AND fingerprint IS NOT DISTINCT FROM $4 THEN payload END,
                     {completed_at}, hits, {lease_until}, attempt, relaxed, {expires_at}
                 FROM answer",
                relaxed = relaxed_unless("claim_id = $5"),
                exp = from_now("$7"),
                lease = from_now("$6"),
                // A claim that takes a record over may have waited for its row lock (a
                // holder's `lock_claim` transaction, a concurrent claim) for longer than a
                // lease: `now()` is the statement's start, so a lease counted from it
                // could be over before the claim answers Acquired, and the next claim
                // would take the key over while this one runs. Counted from the moment the
                // row is locked instead.
                taken_lease = "clock_timestamp() + excluded.lease_us * interval '1 microsecond'",
                taken_expiry = "clock_timestamp() + $7::float8 * interval '1 microsecond'",
                completed_at = us("completed_at"),
                lease_until = us("lease_until"),
                expires_at = us("expires_at"),
            )),
            // Replay counts flushed by the engine, for the whole batch in one statement.
            // A key may appear more than once: the batch is summed per key first. Only
            // live completed records count; absent, expired and in-progress keys are
            // skipped. Counts saturate at the largest bigint rather than fail the batch.
            //
            // The rows are locked in storage-key order (`locked`), so two processes
            // flushing overlapping batches at once take turns instead of deadlocking. The
            // UPDATE re-checks the conditions on the row it updates (the newest version,
            // when a transaction changed it while the lock was awaited).
            //
            // Committed without waiting for the WAL flush: a hit count need not survive a
            // crash of the server (counts are statistics; nothing decides on them).
            record_hits: stmt(format!(
                "WITH batch AS (
                     SELECT k, least(sum(n), {max}) AS n
                     FROM unnest($1::bytea[], $2::int8[]) AS b(k, n) GROUP BY k),
                 locked AS (
                     SELECT r.storage_key, batch.n FROM {t} r JOIN batch ON r.storage_key = batch.k
                     WHERE r.claim_id IS NULL AND r.expires_at > now()
                     ORDER BY r.storage_key FOR UPDATE OF r),
                 counted AS (
                     UPDATE {t} r SET hits = least(r.hits + locked.n, {max})::int8
                     FROM locked
                     WHERE r.storage_key = locked.storage_key AND r.claim_id IS NULL AND r.expires_at > now()
                     RETURNING 1)
                 SELECT count(*), set_config('synchronous_commit', 'off', true) FROM counted",
                max = i64::MAX,
            )),
            // Fenced by the claim id; notifies waiters in the same transaction (delivered
            // at its commit).
            //
            // A row locked by another transaction is skipped, not waited for, and the third
            // column says it is still ours: outside `complete_in`, the transaction that
            // holds it is the holder's own (`lock_claim`), which this call would otherwise
            // wait for until a timeout, and then be retried in the background after that
            // transaction rolled back (a completed record with its effect undone).
            complete: stmt(format!(
                "WITH mine AS (SELECT storage_key FROM {t} WHERE {held} FOR UPDATE SKIP LOCKED),
                 done AS (
                     UPDATE {t} SET claim_id = NULL, lease_until = NULL, payload = $3, completed_at = now(),
                         expires_at = {exp}, hits = 0
                     WHERE storage_key IN (SELECT storage_key FROM mine)
                     RETURNING storage_key, waited),
                 woken AS (SELECT {notify} FROM done WHERE waited)
                 SELECT (SELECT count(*) FROM done), (SELECT count(*) FROM woken),
                     EXISTS (SELECT 1 FROM {t} WHERE {held})",
                exp = from_now("$4"),
            )),
            // Fenced by the claim id. A record without a recovery point is removed; one
            // with a recovery point (a multi-step operation committed some steps) is kept
            // with its lease lapsed now, so the next claim takes it over and resumes; its
            // claim id is replaced by one nobody holds, so the releaser is fenced off.
            release: stmt(format!(
                "WITH gone AS (
                     DELETE FROM {t} WHERE {held} AND recovery_point IS NULL
                     RETURNING storage_key, waited),
                 lapsed AS (
                     UPDATE {t} SET lease_until = now(), claim_id = gen_random_uuid()
                     WHERE {held} AND recovery_point IS NOT NULL
                     RETURNING storage_key, waited),
                 changed AS (SELECT * FROM gone UNION ALL SELECT * FROM lapsed),
                 woken AS (SELECT {notify} FROM changed WHERE waited)
                 SELECT (SELECT count(*) FROM changed), (SELECT count(*) FROM woken)"
            )),
            // Fenced by the claim id. A row locked by another transaction is skipped
            // rather than waited for: the holder's own transaction may hold it (see
            // `PostgresStore::hold`), and the renewal must not wait for the operation it
            // keeps alive. The second column tells "locked, still ours" from "lost".
            touch: stmt(format!(
                "WITH mine AS (SELECT storage_key FROM {t} WHERE {held} FOR UPDATE SKIP LOCKED),
                 renewed AS (
                     UPDATE {t} SET lease_until = {lease}, expires_at = greatest(expires_at, {lease}),
                         lease_us = $3::float8::bigint
                     WHERE storage_key IN (SELECT storage_key FROM mine)
                     RETURNING 1)
                 SELECT (SELECT count(*) FROM renewed), EXISTS (SELECT 1 FROM {t} WHERE {held})",
                lease = from_now("$3"),
            )),
            get: stmt(format!("SELECT {record} FROM {t} WHERE storage_key = $1 AND expires_at > now()")),
            delete: stmt(format!(
                "WITH gone AS (DELETE FROM {t} WHERE storage_key = $1
                               RETURNING storage_key, waited, expires_at > now() AS live),
                 woken AS (SELECT {notify} FROM gone WHERE waited)
                 SELECT coalesce((SELECT bool_or(live) FROM gone), false), (SELECT count(*) FROM woken)"
            )),
            // One bounded batch: rows found through the expiry index, locked without
            // waiting (a row in use is left for the next batch), deleted by their ctid.
            purge_batch: stmt(format!(
                "DELETE FROM {t} WHERE ctid = ANY (ARRAY (
                     SELECT ctid FROM {t} WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED))
                 AND expires_at <= now()"
            )),
            stats: stmt(format!(
                "SELECT count(*), count(*) FILTER (WHERE claim_id IS NOT NULL) FROM {t} WHERE expires_at > now()"
            )),
            // Message dedup in one statement: a marker (a completed record with an empty
            // payload) is inserted, or replaces an expired record; a live completed record
            // gets hits + 1; a live in-progress record is left as it is. First seen exactly
            // when the row returned is a completed record with no hit.
            first_seen: stmt(format!(
                "INSERT INTO {t} AS r (storage_key, key, scope, fingerprint, created_at, expires_at, claim_id,
                     lease_until, payload, completed_at, hits, attempt, waited)
                 VALUES ($1, $2, $3, NULL, now(), {exp}, NULL, NULL, '\\x'::bytea, now(), 0, 1, false)
                 ON CONFLICT (storage_key) DO UPDATE SET
                     key            = CASE WHEN {expired} THEN excluded.key ELSE r.key END,
                     scope          = CASE WHEN {expired} THEN excluded.scope ELSE r.scope END,
                     fingerprint    = CASE WHEN {expired} THEN NULL ELSE r.fingerprint END,
                     created_at     = CASE WHEN {expired} THEN excluded.created_at ELSE r.created_at END,
                     expires_at     = CASE WHEN {expired} THEN excluded.expires_at ELSE r.expires_at END,
                     claim_id       = CASE WHEN {expired} THEN NULL ELSE r.claim_id END,
                     lease_until    = CASE WHEN {expired} THEN NULL ELSE r.lease_until END,
                     payload        = CASE WHEN {expired} THEN excluded.payload ELSE r.payload END,
                     completed_at   = CASE WHEN {expired} THEN excluded.completed_at ELSE r.completed_at END,
                     hits           = CASE WHEN {expired} THEN 0 WHEN r.claim_id IS NULL THEN r.hits + 1
                                           ELSE r.hits END,
                     attempt        = CASE WHEN {expired} THEN 1 ELSE r.attempt END,
                     recovery_point = CASE WHEN {expired} THEN NULL ELSE r.recovery_point END,
                     waited         = CASE WHEN {expired} THEN false ELSE r.waited END
                 RETURNING claim_id IS NULL AND hits = 0, {relaxed}",
                relaxed = relaxed_unless("claim_id IS NULL AND hits = 0"),
                exp = from_now("$4"),
            )),
            // `$1` is the last storage key seen, or the empty bytea (which sorts first).
            list: stmt(format!(
                "SELECT {record} FROM {t} WHERE expires_at > now() AND storage_key > $1
                 ORDER BY storage_key LIMIT $2"
            )),
            // Marks a live in-progress record as waited for (so its change notifies) and
            // tells whether there is one to wait for.
            //
            // Committed without waiting for the WAL flush: a mark lost with a server crash
            // costs nothing (the listener's reconnect wakes every waiter), and the flush
            // would hold the hot row's lock that the holder's completion needs.
            subscribe: stmt(format!(
                "UPDATE {t} SET waited = true
                 WHERE storage_key = $1 AND claim_id IS NOT NULL AND lease_until > now() AND expires_at > now()
                 RETURNING 1, set_config('synchronous_commit', 'off', true)"
            )),
            // Inside the caller's transaction: the holder's record, locked until commit. Both
            // renew the lease (by the length of the last claim or touch, from the statement's
            // own clock): while the caller's transaction holds the row, the engine's
            // keep-alive cannot renew it (its `touch` skips locked rows), and a claim queued
            // behind the lock re-reads the row at commit. Renewed here, the row it re-reads
            // has a live lease and the holder is not taken over between two steps.
            hold: stmt(format!(
                "UPDATE {t} SET lease_until = greatest(lease_until, {renewed}),
                     expires_at = greatest(expires_at, {renewed})
                 WHERE {held} RETURNING attempt, recovery_point"
            )),
            set_recovery_point: stmt(format!(
                "UPDATE {t} SET recovery_point = $3, lease_until = greatest(lease_until, {renewed}),
                     expires_at = greatest(expires_at, {renewed})
                 WHERE {held}"
            )),
            recovery_point: stmt(format!(
                "SELECT recovery_point FROM {t} WHERE storage_key = $1 AND expires_at > now()"
            )),
            check_columns: stmt(check_columns(t)),
            table,
        }
    }
}

fn check_columns(t: &str) -> String {
    format!(
        "SELECT storage_key, key, scope, fingerprint, created_at, expires_at, claim_id, lease_until, \
         lease_us, payload, completed_at, hits, attempt, recovery_point, waited FROM {t} LIMIT 0"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        for good in ["oncely_records", "_x", "Records2", &"a".repeat(MAX_TABLE_NAME)] {
            assert!(TableName::new(good).is_ok(), "{good}");
        }
        assert_eq!(TableName::new("Records").map(|t| t.as_str().to_string()).ok().as_deref(), Some("records"));
        for bad in ["", "1abc", "a-b", "a b", "x;DROP TABLE y", "\"q\"", "s.t", "é", &"a".repeat(MAX_TABLE_NAME + 1)] {
            assert!(matches!(TableName::new(bad), Err(StoreError::InvalidRequest(_))), "{bad:?}");
        }
    }
}
