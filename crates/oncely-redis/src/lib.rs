//! A Redis/Valkey [`Store`] for Oncely, on a standalone server or a Redis Cluster.
//!
//! Several instances of an API (or of the `oncely` gateway) that share one Redis keep
//! every promise of the store contract across processes: among any number of concurrent
//! duplicates in any number of processes, exactly one runs.
//!
//! ```no_run
//! use oncely::Oncely;
//! use oncely_redis::RedisStore;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::open("redis://127.0.0.1:6379?prefix=payments").await?;
//! // or: RedisStore::open("redis+cluster://10.0.0.1:7000,10.0.0.2:7000,10.0.0.3:7000").await?
//! // or, over TLS: RedisStore::open("rediss://redis.example.com:6380?prefix=payments").await?
//! let oncely = Oncely::new(store);
//! # let _ = oncely;
//! # Ok(())
//! # }
//! ```
//!
//! # TLS
//!
//! Managed Redis (and any Redis off a trusted network) wants TLS: `rediss://` for a
//! standalone server, `rediss+cluster://host:port,host:port,…` for a Cluster (every node,
//! and every node the client discovers, over TLS). TLS is rustls with the ring crypto
//! provider; there is never a fall back to plain text.
//!
//! ```text
//! rediss://:PASSWORD@redis.example.com:6380?prefix=payments
//! rediss://10.0.0.5:6380?ca_file=/etc/oncely/redis-ca.pem
//! rediss+cluster://10.0.0.1:7000,10.0.0.2:7000?ca_file=/etc/ca.pem&cert_file=/etc/client.pem&key_file=/etc/client.key
//! ```
//!
//! - **Which servers are trusted.** By default the platform's root certificates
//!   (rustls-native-certs: the system store, `SSL_CERT_FILE`/`SSL_CERT_DIR`), which is
//!   right for a managed service with a publicly issued certificate. `ca_file=PATH` (PEM,
//!   one or more certificates; [`RedisOptions::ca_file`]) trusts those CAs **instead of**
//!   the platform's roots, not in addition to them: redis-rs builds its root store from that
//!   file alone. The server's certificate must name the host in the URL (a DNS name or an
//!   IP address); there is no option to skip that check.
//! - **Mutual TLS.** `cert_file=PATH&key_file=PATH` ([`RedisOptions::client_cert`]): the
//!   client certificate (PEM, with its chain) and its private key (PEM), for a server
//!   with `tls-auth-clients yes`. One without the other is refused when the URL is parsed.
//! - The three options are refused on a `redis://` URL, where they would be ignored. A
//!   `replica=rediss://…` uses the same files.
//! - **Failures are named** at connect, as [`OpenError::Tls`] (a file that cannot be read
//!   or parsed: [`OpenError::TlsFiles`]):
//!   - `certificate verify failed: UnknownIssuer …`: not from a trusted CA;
//!   - `certificate verify failed: Expired …` (and `NotValidYet`);
//!   - `certificate verify failed: NotValidForName: certificate not valid for name
//!     "10.0.0.5"; certificate is only valid for …`;
//!   - `the server does not speak TLS (it answered a plain-text PING with "+PONG") …`: a
//!     plain-text server behind `rediss://`. Such a server takes the TLS hello for the start
//!     of a command and waits, so the handshake can only time out; the store then sends one
//!     `PING` over plain TCP to tell this case from a slow server;
//!   - `the server requires a client certificate …`: mutual TLS without `cert_file`.
//!
//!   On Cluster the client reports its nodes' failures as text only, so after a failed
//!   start the store connects to the first node alone to learn the cause.
//!
//! **The crypto provider.** redis-rs builds its TLS configuration with rustls's
//! process-default crypto provider. rustls chooses one by itself only when a single
//! provider is compiled in, and a binary that also holds the AWS SDK (DynamoDB) has
//! aws-lc-rs besides ring. So before building a TLS client the store installs ring as the
//! process default, unless the application installed a provider first (which is then
//! kept): call `rustls::crypto::…::install_default()` yourself before opening the store to
//! choose another.
//!
//! # How it keeps the contract
//!
//! - **One script call per state change.** Claim (create, take over a lapsed lease, or
//!   return what holds the key), complete, release and touch are each one Lua script run
//!   with `EVALSHA`; Redis runs a script to its end before serving anything else, so each
//!   is atomic. The scripts are loaded once at connect and reloaded automatically on
//!   `NOSCRIPT` (a restarted or failed-over server). See [`scripts`].
//! - **A replay writes nothing.** The claim script that finds a completed record reads it
//!   and returns; Redis 7 replicates a script's effects, so it sends nothing to the AOF or
//!   the replicas and leaves the server's dirty counter alone. Hits are counted by the
//!   engine and flushed with [`Store::record_hits`]: one pipeline of hits-script runs on
//!   a standalone server, one run per slot, sent at once, on Cluster.
//! - **Round trips.** A new operation costs two (claim, complete), a replay one (the
//!   claim). `tests/redis_store.rs` proves both with `INFO commandstats`, and that a
//!   replay writes nothing with the server's dirty counter (`INFO persistence`).
//! - **Time** comes from `TIME` inside the scripts, never from the client's clock.
//! - **Fencing.** complete/release/touch compare the record's claim id inside the script.
//! - **Expiry.** Every script treats a record past its `expires_at` as absent; the record's
//!   `PEXPIREAT` at that instant is only garbage collection, so [`StoreAdmin::purge_expired`]
//!   has nothing to do and answers 0.
//! - **Cluster.** A record is one hash, `PREFIX:{<storage key hex>}`, and its wake-up
//!   channel is `PREFIX:{<storage key hex>}:w`: the hash tag puts both in one slot, so
//!   every script runs on one node and `MOVED` redirections are followed by the client.
//! - **Waiting.** The scripts publish on the channel when a record is completed, released,
//!   deleted or taken over (`PUBLISH`, or sharded `SPUBLISH` on Cluster), and
//!   [`Store::subscribe`] subscribes (`SSUBSCRIBE` on Cluster) for as long as a task waits.
//!   A lost message only delays a waiter until the engine's poll.
//! - **Failures.** A refused connection, `READONLY` (a replica after failover), `OOM`,
//!   `CLUSTERDOWN`, `LOADING` … are [`StoreError::Unavailable`]; no answer within the
//!   response timeout is [`StoreError::Timeout`] (the command may still run). The HTTP
//!   layer answers 503 for both, and nothing is reported as executed that was not.
//!
//! # The client
//!
//! [`redis`](https://docs.rs/redis) (redis-rs) 1.x: the most used Rust client, maintained
//! by the Redis organisation, with a multiplexed connection that reconnects by itself
//! ([`ConnectionManager`](redis::aio::ConnectionManager)), an async Cluster client that
//! follows `MOVED`/`ASK` and supports sharded pub/sub, a response timeout on every
//! command, and `Script`, which does the `EVALSHA`-then-`NOSCRIPT`-reload dance. `fred`
//! would also have served; redis-rs is the one more users already depend on.
//!
//! # Persistence: what Redis can lose
//!
//! Records are only as durable as Redis is configured to be. Run the store's Redis with:
//!
//! ```text
//! appendonly yes
//! appendfsync everysec      # or `always`: every write fsynced before the reply
//! maxmemory-policy noeviction
//! ```
//!
//! - **`maxmemory-policy noeviction`** is required. Any evicting policy may delete a
//!   completed record before its retention ends, and the next retry then runs the
//!   operation again. With `noeviction` a full Redis answers `OOM`, which is a 503.
//! - **`appendfsync everysec`** (Redis's default with AOF): a crash of the Redis *machine*
//!   (or of the process before the background fsync) loses up to about one second of
//!   acknowledged writes. A lost claim means a concurrent duplicate arriving after the
//!   restart can run while the first is still running; a lost completion means a retry
//!   runs the operation a second time. `appendfsync always` closes this window at the
//!   cost of an fsync per write; `appendonly no` with RDB snapshots widens it to the
//!   snapshot interval, and no persistence at all loses everything on restart.
//! - **Failover** (Sentinel or Cluster): replication is asynchronous, so writes
//!   acknowledged by the old primary but not yet replicated are lost when a replica is
//!   promoted: the same two consequences as above, for the replication lag (usually
//!   milliseconds). `WAIT`/`WAITAOF` after each write would narrow this; the store does not
//!   issue them because they cost a round trip each. A client still talking to a demoted
//!   primary gets `READONLY`, which is a 503, never a silent success.
//!
//! If an operation must never run twice even across these failures, use a store whose
//! acknowledgement is a durable commit (SQLite in sync mode, PostgreSQL).
//!
//! # Replays from a replica (opt-in)
//!
//! [`RedisOptions::replica`] (`?replica=redis://HOST:PORT` in the URL) reads each claim's
//! record on a replica first (`EVALSHA_RO`) and answers a replay from there, so replays
//! take no capacity on the primary; anything else goes on to the primary's claim. A new key
//! then costs three round trips instead of two. A lagging replica only sends requests on to
//! the primary; after a failover to a replica that missed a completion the key runs again,
//! exactly as it would without the option, since the completion was lost with the old
//! primary. Its documentation lists what else the lag means (a deleted or expired record
//! may be replayed from the replica for the lag). Standalone only.

#[cfg(doc)]
use oncely::{Store, StoreAdmin, StoreError};

mod codec;
mod connection;
mod options;
mod replica;
mod scan;
pub mod scripts;
mod store;
mod subscriptions;
mod tls;
mod url;

pub use url::RedisUrl;

/// Fuzzing only: decodes a claim script's reply.
#[cfg(fuzzing)]
#[doc(hidden)]
pub fn fuzz_claim_outcome(
    key: &oncely::StorageKey,
    reply: redis::Value,
) -> Result<oncely::ClaimOutcome, oncely::StoreError> {
    codec::claim_outcome(key, reply)
}

/// Fuzzing only: decodes the get script's reply, a record's fields (or none).
#[cfg(fuzzing)]
#[doc(hidden)]
pub fn fuzz_record(
    key: &oncely::StorageKey,
    reply: redis::Value,
) -> Result<Option<oncely::Record>, oncely::StoreError> {
    codec::found_record(key, reply)
}

pub use connection::Topology;
pub use options::{OpenError, RedisOptions};
pub use store::RedisStore;
