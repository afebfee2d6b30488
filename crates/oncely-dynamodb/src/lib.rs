//! A DynamoDB [`Store`] for Oncely: teams on AWS Lambda, ECS or EKS share idempotency
//! records through a DynamoDB table instead of running a Redis.
//!
//! ```no_run
//! use oncely::Oncely;
//! use oncely_dynamodb::DynamoDbStore;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // Credentials (and the region, unless given) from the usual AWS chain: environment,
//! // profile, SSO, container or instance role.
//! let store = DynamoDbStore::open("dynamodb://idempotency?region=eu-west-1").await?;
//! // A local emulator: any static credentials work.
//! // DynamoDbStore::open("dynamodb://idempotency?endpoint=http://127.0.0.1:5000").await?
//! let oncely = Oncely::new(store);
//! # let _ = oncely;
//! # Ok(())
//! # }
//! ```
//!
//! The table is created with `oncely dynamodb create-table --store dynamodb://TABLE?…`
//! (or [`DynamoDbStore::create_table`]); the repository's README gives its definition for
//! CloudFormation and Terraform. The URL's options are [`DynamoDbUrl`]'s.
//!
//! # Items
//!
//! One item per record, keyed by the hex storage key (a SHA-256 of scope and key, so no
//! client input reaches the key space raw):
//!
//! | attribute | type | holds |
//! |---|---|---|
//! | `id` (`partition_key=`) | S | the hex storage key; `PREFIX#<hex>` with `prefix=`; with `sort_key=`, the prefix itself (default `oncely`) |
//! | the `sort_key=` attribute, if any | S | the hex storage key |
//! | `state` | S | `in_progress` or `completed` |
//! | `claim_id` | B | the holder's 16-byte claim id (kept on completion; a message-dedup marker's call token) |
//! | `lease_until` | N | when the holder's lease lapses, epoch milliseconds (in progress only) |
//! | `fingerprint` | B | the request's 32-byte fingerprint; absent when it had none |
//! | `idempotency_key` | S | the raw key, for inspection |
//! | `scope` | S | the scope, for inspection |
//! | `created_at` | N | when the first claim created the record, epoch milliseconds |
//! | `expires_at` | N | when the record stops existing, epoch milliseconds: what every read checks |
//! | `payload` | B | the stored result (completed only) |
//! | `completed_at` | N | when the holder completed, epoch milliseconds |
//! | `hits` | N | replays flushed so far |
//! | `ttl` (`ttl_attribute=`) | N | `expires_at` in epoch seconds, rounded up: DynamoDB's TTL, for garbage collection only |
//!
//! With `sort_key=` or `prefix=`, the table can hold other data too, as AWS Powertools'
//! idempotency tables can; `stats`, `list` and `purge_expired` skip items that are not
//! records of this store's layout. With a sort key all records share one partition key
//! value: DynamoDB splits a hot partition by sort key ranges, but a table keyed by the
//! storage key alone spreads its load from the first request.
//!
//! # How it keeps the contract
//!
//! - **Claim: one request.** A conditional `PutItem` of the in-progress record, on the
//!   condition that the key is absent, expired, or in progress with a lapsed lease and
//!   the same fingerprint. `ReturnValuesOnConditionCheckFailure = ALL_OLD` returns the
//!   blocking item in the failed call's answer: a replay, a live holder or a mismatch is
//!   decided from it, with no second request. On success `ReturnValues = ALL_OLD` tells a
//!   takeover from a new record.
//! - **Complete, release, touch: one request each**, a conditional `UpdateItem` or
//!   `DeleteItem` fenced by the claim id (`claim_id = :mine AND state = in_progress AND
//!   expires_at > :now`): a holder whose lease was taken over gets
//!   [`StoreError::LeaseLost`] and its write changes nothing.
//! - **Round trips.** A new key costs 2 requests (claim, complete), a replay 1 (the
//!   claim's failed condition carries the completed item), as on every store.
//!   [`DynamoDbStore::requests_sent`] counts them, and `tests/dynamodb_store.rs` proves it.
//! - **Atomicity.** DynamoDB applies a conditional write to one item atomically: the
//!   condition is evaluated and the write applied with no other write to the item in
//!   between. Every state change touches one item, so among any number of concurrent
//!   claims of a key in any number of processes, exactly one succeeds.
//! - **Expiry** is checked on every read and in every condition (`expires_at` against
//!   the caller's clock). The TTL attribute only lets DynamoDB collect expired items,
//!   which it does when it gets to them, typically within a few days; until then they are
//!   absent to every call, and [`StoreAdmin::purge_expired`] deletes them on demand (a
//!   scan).
//! - **Retries are safe.** The SDK retries throttling, connection failures and timed-out
//!   attempts (`max_attempts=3`, backoff from 25 ms). A claim whose first attempt landed
//!   finds its own claim id in the returned item and is acquired; a completion likewise
//!   finds its own completed record; a message-dedup mark carries a token of its call.
//! - **Waiting** is polling, since DynamoDB has no cheap push: while tasks wait on a key
//!   (wait mode), one poller per key and process re-reads the record with a strongly
//!   consistent `GetItem` at once, then after 50 ms, 100 ms, 200 ms … up to once a
//!   second, and wakes them all when it changes. Each waiter claims twice when it
//!   arrives (once more after subscribing) and once when woken; in between, the engine
//!   re-claims at its poll interval (500 ms by default) once per key and process, not
//!   once per waiter. A duplicate therefore learns of a completion up to about a second
//!   late.
//! - **Hits** are flushed by the engine in batches: one conditional `UpdateItem`
//!   (`ADD hits`) per replayed record per flush, up to 16 in flight, since DynamoDB has
//!   no conditional batch update.
//!
//! # Time: the process clock, and what skew does
//!
//! DynamoDB has no server clock a condition can read, so leases and expiry are judged
//! by the clock of the process that makes each call, sent as `:now` in the condition.
//! **Assumption: the clocks of all processes sharing a table agree within a few hundred
//! milliseconds** (NTP or the Amazon Time Sync Service keep EC2, ECS and Lambda hosts
//! within about a millisecond). What a skewed process can cause:
//!
//! - a clock running **ahead** by `d` sees other holders' leases lapse `d` early and takes
//!   a live key over: a duplicate runs while the first is still running (the first
//!   holder's completion is then refused with `LeaseLost`, but its side effect happened).
//!   It also sees completed records expire `d` early (a retry near the end of the
//!   retention runs again) and its own leases and records last `d` longer for others;
//! - a clock running **behind** by `d` takes lapsed keys over `d` late (a crashed holder
//!   blocks its key `d` longer) and replays records `d` past their retention.
//!
//! So skew must stay well below the lease. Keep leases at **5 seconds or more** (the
//! engine renews a running operation's lease every lease/3, so a live holder is safe
//! while skew plus a renewal's latency stays under two thirds of the lease); the engine's
//! default is 30 s.
//!
//! # Guarantees, and what DynamoDB can lose
//!
//! - A write is acknowledged once DynamoDB has stored it durably in several availability
//!   zones of the region: an acknowledged claim or completion survives the loss of a
//!   machine or a zone.
//! - Reads on the request path are strongly consistent (a conditional write sees the
//!   latest item; `GetItem` and scans ask for consistent reads).
//! - **Region failover** (an application moving to another region's table restored from
//!   a backup or point-in-time recovery) loses every write after the restore point: a
//!   lost completion lets a retry run the operation again.
//! - **Global tables** replicate asynchronously between regions (usually within a
//!   second) with last-writer-wins conflict resolution. Two processes claiming the same
//!   key in two regions at once can both succeed, and both run the operation; a claim or
//!   completion acknowledged in a region that fails before replicating it is lost. For
//!   exactly-once, route all requests for a key to one region (use global tables only for
//!   failover, accepting the replication lag as the loss window), or use a global table
//!   in multi-region strong consistency mode where it is offered.
//!
//! # Cost per operation
//!
//! In DynamoDB's units (a write unit per 1 KB of item written, rounded up, charged for the
//! larger of the item before and after; a strongly consistent read unit per 4 KB read).
//! A failed conditional write is charged as a write, by the size of the existing item.
//!
//! | operation | requests | units |
//! |---|---|---|
//! | new key (claim + complete) | 2 | 1 WCU for the claim + ⌈(result + ~0.5 KB) / 1 KB⌉ WCU for the completion |
//! | replay | 1 (a failed conditional `PutItem`) | ⌈item size / 1 KB⌉ WCU: a replay of a large result costs its size in write units |
//! | conflict (a live holder, reject mode) | 1 | 1 WCU |
//! | waiting (wait mode) | 2 claims per waiter on arrival, 1 when woken; 1 claim per key and process per engine poll; a `GetItem` per backoff step | 1 WCU per claim, 1 RCU per read |
//! | release / touch | 1 | 1 WCU |
//! | hit flush | 1 per replayed record per flush interval | ⌈item size / 1 KB⌉ WCU |
//! | `stats`, `list`, `purge_expired` | a scan of the table, one request per 1 MB page | 1 RCU per 4 KB of the table |
//!
//! # Failures
//!
//! Throttling (`ProvisionedThroughputExceededException`, `ThrottlingException`,
//! `RequestLimitExceeded`) once the SDK's attempts are spent, a refused or broken
//! connection, credentials that cannot be had or are refused, a missing table and any
//! other server error are [`StoreError::Unavailable`]; an attempt without an answer in
//! `timeout=` is [`StoreError::Timeout`] (the write may have landed). The HTTP layer
//! answers 503 for both, and nothing is reported as executed that was not. A result over
//! [`MAX_PAYLOAD_BYTES`] (DynamoDB's 400 KB item limit less the record's other
//! attributes) is refused before any call with [`StoreError::InvalidRequest`].
//!
//! # Tests, on moto
//!
//! The tests run on moto's DynamoDB emulator (open source, from PyPI; `scripts/test`
//! installs it), started on loopback by `oncely-testkit`. Checked with moto 5.2.5: it
//! honours condition expressions, `ReturnValuesOnConditionCheckFailure = ALL_OLD` (the
//! failed call carries the item) and `ReturnValues = ALL_OLD`, TTL settings and
//! `ADD`. Where it differs from DynamoDB, the tests work around it:
//!
//! - it checks a condition and writes the item without a lock in between, on threads, so
//!   two concurrent conditional writes of one item can both succeed; the testkit runs it
//!   applying one request at a time, as DynamoDB applies a conditional write to an item;
//! - it counts a binary attribute's size by its base64 text, so it refuses results from
//!   about 300 KB where DynamoDB takes [`MAX_PAYLOAD_BYTES`]: the conformance suite's large
//!   replay is 300 KB there;
//! - it never throttles: a loopback proxy in the testkit answers with DynamoDB's
//!   throttling errors instead;
//! - it closes the connection after each answer, so every request opens one (which makes
//!   it slow: some hundreds of requests a second).
//!
//! # Permissions
//!
//! The request path needs `dynamodb:PutItem`, `UpdateItem`, `DeleteItem` and `GetItem`
//! on the table; admin calls (`oncely keys`, `stats`) `Scan` (or `Query` with a sort
//! key); opening checks the key schema with `DescribeTable` (skipped with a warning when
//! not allowed); `create-table` needs `CreateTable`, `DescribeTable`,
//! `DescribeTimeToLive` and `UpdateTimeToLive`.

#[cfg(doc)]
use oncely::{Store, StoreAdmin, StoreError};

mod admin;
mod codec;
mod counter;
mod error;
mod options;
mod store;
mod table;
mod url;
mod watch;

pub use codec::{MAX_ITEM_BYTES, MAX_PAYLOAD_BYTES, RECORD_HEADROOM_BYTES};
pub use counter::RequestsSent;
pub use options::{DEFAULT_PARTITION_KEY, DEFAULT_SORT_KEY_PREFIX, DEFAULT_TTL_ATTRIBUTE, DynamoDbOptions, OpenError};
pub use store::DynamoDbStore;
pub use table::TableCreated;
pub use url::DynamoDbUrl;
