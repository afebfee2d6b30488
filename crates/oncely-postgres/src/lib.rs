//! The PostgreSQL Oncely store: a shared store on the database you already run, with
//! exactly-once for database side effects.
//!
//! ```no_run
//! use oncely::Oncely;
//! use oncely_postgres::{PostgresOptions, PostgresStore};
//!
//! # async fn start() -> Result<(), oncely::StoreError> {
//! let store = PostgresStore::connect("postgres://app@db.internal/app?sslmode=verify-full", PostgresOptions::default()).await?;
//! let oncely = Oncely::new(store);
//! # let _ = oncely; Ok(()) }
//! ```
//!
//! Any number of processes (gateways, workers) may share one table: they see one set of
//! records, one clock (the server's), and each other's completions through
//! `LISTEN/NOTIFY`.
//!
//! # TLS
//!
//! TLS is rustls with the ring crypto provider, which the driver (SQLx) chooses itself
//! except for `sslmode=verify-ca`, whose verifier takes rustls's process-default provider.
//! rustls cannot choose a default when a binary holds two providers (the AWS SDK brings
//! aws-lc-rs), so the store installs ring as the process default before it connects,
//! unless the application installed one first (which is then kept). TLS is set in the
//! URL with libpq's parameters, passed to the driver as written:
//!
//! ```text
//! postgres://app@db.example.com/app?sslmode=verify-full
//! postgres://app@10.0.0.7/app?sslmode=verify-full&sslrootcert=/etc/oncely/db-ca.pem
//! postgres://app@db/app?sslmode=verify-full&sslrootcert=/etc/ca.pem&sslcert=/etc/client.pem&sslkey=/etc/client.key
//! ```
//!
//! | `sslmode` | encrypted | the server's certificate checked | its name checked |
//! |---|---|---|---|
//! | `disable` (and `allow`, which SQLx treats as `disable`) | no | | |
//! | `prefer` | if the server agrees, **else plain text, silently** | no | no |
//! | `require` | yes, or the connection fails | no | no |
//! | `verify-ca` | yes | yes | no |
//! | `verify-full` | yes | yes | yes |
//!
//! - **The default is `prefer`**, libpq's (or whatever the `PGSSLMODE` environment
//!   variable says): it protects against a passive eavesdropper on a server that offers
//!   TLS, but an attacker in the path can simply decline TLS, and a server without it is
//!   used in plain text without a word. **For a managed database use `verify-full`.**
//!   Unlike libpq, SQLx's `require` does not turn into `verify-ca` when a root certificate
//!   is given: it never checks the certificate.
//! - **Which servers are trusted** (`verify-ca`, `verify-full`): the platform's root
//!   certificates (rustls-native-certs: the system store, `SSL_CERT_FILE`/`SSL_CERT_DIR`)
//!   **plus** the CAs in `sslrootcert=PATH` (PEM), which are added to them, not put in their
//!   place. Name the provider's CA bundle there when it is not publicly trusted (Amazon RDS's
//!   `global-bundle.pem`, say).
//! - **Mutual TLS**: `sslcert=PATH&sslkey=PATH`, the client certificate and its key
//!   (PEM), for a server whose `pg_hba.conf` says `clientcert=verify-ca` or `verify-full`.
//!   One without the other is refused when the URL is parsed ([`PostgresUrl`]).
//! - **Failures** are [`StoreError::Unavailable`] at connect, with the driver's message,
//!   which names the cause: `invalid peer certificate: UnknownIssuer`, `invalid peer
//!   certificate: certificate expired: …`, `invalid peer certificate: certificate not valid
//!   for name "10.0.0.7"; certificate is only valid for …`, `server does not support TLS`
//!   (`require` or stricter to a server without TLS), `connection requires a valid client
//!   certificate` (the server's answer to a client without one). `tests/tls.rs` checks
//!   each against a real server.
//!
//! # Exactly once for database side effects
//!
//! When the operation's own effect is a write to the same database, no key-value store
//! can close the gap between "did it" and "recorded it": a crash after the effect's commit
//! and before the completion leaves an effect with no record, and the retry does it again.
//! Here the two commit together: the caller runs its writes and the completion in **one
//! transaction of its own** ([`PostgresStore::complete_in`]). If the process dies before
//! the commit, neither exists, and the retry (once the lease lapses) runs the operation
//! again cleanly; after the commit, the retry replays. There is no third case.
//!
//! ```no_run
//! use oncely::{Acquired, IdempotencyKey, Oncely};
//! use oncely_postgres::{PostgresOptions, PostgresStore};
//! use sqlx_core::query::query;
//!
//! # async fn order(pool: sqlx_postgres::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let store = PostgresStore::from_pool(pool.clone(), PostgresOptions::default()).await?;
//! let oncely = Oncely::new(store.clone());
//! let key = IdempotencyKey::new("order-17")?;
//!
//! match oncely.acquire(&key, None).await? {
//!     Acquired::Execute(guard) => {
//!         let mut tx = pool.begin().await?;
//!         // Fenced: fails with LeaseLost if another claim took the key over; from here
//!         // to the commit, nobody can.
//!         store.lock_claim(&mut tx, guard.claim()).await?;
//!         query("INSERT INTO orders (id, total) VALUES ('order-17', 1999)").execute(&mut *tx).await?;
//!         let retention = oncely.config().retention;
//!         store.complete_in(&mut tx, guard.claim(), "order 17 placed".into(), retention).await?;
//!         tx.commit().await?; // the order and its completion, or neither
//!         guard.finished_elsewhere();
//!     }
//!     Acquired::Replay(replay) => { /* the stored result */ let _ = replay.payload; }
//! }
//! # Ok(()) }
//! ```
//!
//! With the `sqlx` facade, `&mut tx` is a `&mut sqlx::Transaction<'_, sqlx::Postgres>`:
//! the same type ([`PgTransaction`]). With tokio-postgres or another driver, run the
//! statements of [`PostgresStore::lock_claim`], [`PostgresStore::set_recovery_point`] and
//! [`PostgresStore::complete_in`] (in `src/sql.rs`; the table's schema is documented
//! below) in your own transaction: nothing else is needed.
//!
//! # Recovery points: resuming a multi-step operation
//!
//! An operation of several steps (reserve stock, charge a card through an HTTP API,
//! confirm the order) cannot be one transaction, because a step calls out. Each local
//! step instead commits its writes together with a *recovery point*, a label naming the
//! last step done, in its own transaction ([`PostgresStore::set_recovery_point`], fenced
//! by the claim id). After a crash, the retry's claim takes the key over once the lease
//! lapses (keeping the recovery point) and [`PostgresStore::lock_claim`] hands the label
//! back: the retry skips the steps already committed and resumes at the next. The
//! external call between two local steps should itself be idempotent (pass the provider
//! an idempotency key derived from yours), since a crash after it and before the next
//! commit repeats it. Stripe's engineers describe the pattern for Postgres as "atomic
//! phases"; `examples/order_recovery.rs` runs it against a crash.
//!
//! A record with a recovery point is never deleted by [`Store::release`]: some steps
//! committed, so running the operation from the start would repeat them. Release then
//! lapses the lease at once instead, and the next claim resumes.
//!
//! # Guarantees
//!
//! - **Atomicity.** Every [`Store`] method is one SQL statement in its own transaction
//!   (autocommit), so PostgreSQL's row locks order its writes against every other call
//!   on the key, from any process. A claim is one statement (the statement and why it is
//!   safe are documented at `Sql::claim` in `src/sql.rs`): a plain `SELECT` of the live
//!   record, which answers a replay, a mismatch and a live claim from the statement's
//!   snapshot, and only otherwise an `INSERT … ON CONFLICT DO UPDATE … RETURNING` that
//!   decides and applies the outcome under the row's lock (so among concurrent claims of
//!   an absent key exactly one acquires, and a record completed after the snapshot is
//!   never overwritten). `complete`, `release` and `touch` name the claim id in their
//!   `WHERE`, so a fenced-off holder changes nothing and gets [`StoreError::LeaseLost`].
//! - **A replay is a read.** The claim that finds a completed record takes no row lock
//!   (not even behind a holder's open transaction), gets no transaction id and writes no
//!   WAL: one read-only round trip. The engine counts replays in the process and flushes
//!   them with [`Store::record_hits`], one `UPDATE` for the whole batch.
//! - **Durability.** A call returns after its transaction committed, with the server's
//!   `synchronous_commit` (default `on`: the WAL is flushed to disk first). Killing the
//!   calling process loses nothing acknowledged; with `synchronous_commit = on`, neither
//!   does a crash of the server or its machine. Three outcomes are committed without
//!   waiting for the flush, because nothing depends on them surviving a server crash: a
//!   flush of hit counts, a repeated first sighting, and a claim that met a record
//!   changed since its snapshot and left it unchanged (see `relaxed_unless` in
//!   `src/sql.rs`). A new claim, a takeover, a completion, a release and a first sighting
//!   always wait for it. A completion made with [`PostgresStore::complete_in`] is exactly
//!   as durable as the caller's transaction.
//! - **Expiry on every read.** Every statement compares `expires_at` with `now()`; the
//!   sweeper only collects the garbage, in bounded batches.
//! - **Time** is the server's `now()` (the start of the statement's transaction, in
//!   microseconds), so the clocks of the processes sharing the table do not matter.
//!   Durations are rounded up to whole microseconds.
//! - **Waiting.** [`Store::subscribe`] marks the in-progress record as waited for; its
//!   completion, release or deletion then sends `pg_notify` in the same transaction, which
//!   PostgreSQL delivers at commit to the listener of every store on the table, in every
//!   process. Records nobody waits for send nothing: `NOTIFY` makes committing
//!   transactions take turns, cluster-wide. Notifications lost while the listener
//!   reconnects are made up by waking every waiter; the engine polls as the fallback.
//! - **Failures are typed**, by the error's SQLSTATE code and the driver's error variant,
//!   never by message text (the table is in `src/error.rs`). An unreachable database, a
//!   pool that has no connection to give within the acquire timeout, a lost connection, a
//!   server shutting down or out of resources: [`StoreError::Unavailable`]. A statement
//!   cancelled by the statement timeout (or a lock timeout): [`StoreError::Timeout`].
//!   The HTTP layer answers 503 for both. A row or table this version cannot read:
//!   [`StoreError::Corrupt`]. A server that does not understand the store's statements
//!   (too old): [`StoreError::Unsupported`]. Nothing from the network is unwrapped.
//!
//! # Schema
//!
//! One table per store (default `oncely_records`), created by [`PostgresStore::connect`]
//! and [`PostgresStore::from_pool`] with `CREATE TABLE IF NOT EXISTS` (repeatable;
//! concurrent starts take turns on an advisory lock), with an index on `expires_at`:
//!
//! | column | type | |
//! |---|---|---|
//! | `storage_key` | `bytea` primary key | SHA-256 of scope and key |
//! | `key`, `scope` | `text` | for inspection |
//! | `fingerprint` | `bytea` | null when the request had none |
//! | `created_at`, `expires_at` | `timestamptz` | |
//! | `claim_id`, `lease_until` | `uuid`, `timestamptz` | set while in progress |
//! | `payload`, `completed_at` | `bytea`, `timestamptz` | set once completed |
//! | `hits` | `bigint` | replays counted (flushed by the engine in batches) |
//! | `attempt` | `integer` | 1, plus one per takeover |
//! | `recovery_point` | `text` | the last step a multi-step operation committed |
//! | `waited` | `boolean` | someone subscribed: changes notify |

#[cfg(doc)]
use oncely::{Store, StoreError};

mod codec;
mod error;
mod listener;
mod migrate;
mod options;
mod sql;
mod store;
mod sweeper;
mod transaction;
mod url;

/// Fuzzing only: the table-name check and the time and duration conversions of the codec.
#[cfg(fuzzing)]
#[doc(hidden)]
pub fn fuzz_parts(
    table: &str,
    us: i64,
    d: std::time::Duration,
) -> (Option<String>, Option<std::time::SystemTime>, Option<f64>) {
    (sql::TableName::new(table).ok().map(|t| t.as_str().to_owned()), codec::to_time(us).ok(), codec::micros(d).ok())
}

pub use url::PostgresUrl;

pub use options::{DEFAULT_TABLE, PostgresOptions};
pub use sqlx_postgres::{PgPool, PgTransaction, Postgres};
pub use store::PostgresStore;
pub use transaction::LockedClaim;
