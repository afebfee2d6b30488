//! Oncely makes retried operations run once.
//!
//! Clients retry: timeouts, load balancers, double clicks, webhook redelivery. Give each
//! mutation an [`IdempotencyKey`]; the first call with a key runs the operation and
//! stores its outcome, every retry within the retention window gets that outcome back,
//! and concurrent duplicates never run it twice.
//!
//! ```
//! use oncely::{Failure, Fingerprint, IdempotencyKey, MemoryStore, Oncely};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct Charge { id: String, amount: u64 }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let oncely = Oncely::new(MemoryStore::new());
//! let key = IdempotencyKey::new("8e03978e-40d5-43e8-bc93-6894a57f9324")?;
//! let request = serde_json::json!({ "amount": 1999, "currency": "eur" });
//! let fingerprint = Fingerprint::from_serialize(&request)?;
//!
//! let first = oncely
//!     .run(&key, Some(fingerprint), || async {
//!         Ok::<_, Failure<String>>(Charge { id: "ch_1".into(), amount: 1999 })
//!     })
//!     .await?;
//! let retry = oncely
//!     .run(&key, Some(fingerprint), || async {
//!         Ok::<_, Failure<String>>(Charge { id: "ch_2".into(), amount: 1999 })
//!     })
//!     .await?;
//!
//! assert!(!first.replayed);
//! assert!(retry.replayed);
//! assert_eq!(retry.value, first.value); // the second closure never ran
//! # Ok(()) }
//! ```
//!
//! # Where things are
//!
//! - [`key`]: [`IdempotencyKey`], [`Scope`], the hashed [`StorageKey`], key generation.
//! - [`fingerprint`]: [`Fingerprint`], canonical JSON.
//! - [`record`]: [`Record`], its [`RecordState`] and the fencing [`ClaimId`].
//! - [`store`]: the [`Store`] (request path) and [`StoreAdmin`] traits and their
//!   contract; [`DynStore`] for a store picked at run time; [`MemoryStore`].
//! - [`engine`]: [`Oncely`] (`run`, `acquire`, `first_seen`), its builder, the
//!   [`ClaimGuard`].
//! - [`error`]: [`Error`], [`RunError`], the per-error [`Failure`] policy.
//!
//! # Observability
//!
//! Every outcome increments the `metrics` counter `oncely_outcomes_total` with an
//! `outcome` label (`executed`, `replayed`, `takeover`, `conflict`, `mismatch`,
//! `failure_stored`, `failure_released`, `store_error`, `first_seen`,
//! `duplicate_seen`); `run` opens a `tracing` span `oncely.run`. Lost leases, abandoned
//! claims and results that could not be stored have counters of their own
//! (`oncely_leases_lost_total`, `oncely_claims_abandoned_total`,
//! `oncely_unrecorded_total`) and a log line.

pub mod engine;
pub mod error;
pub mod fingerprint;
pub mod key;
pub mod record;
pub mod store;

pub use engine::{
    Acquired, ClaimGuard, Config, ConflictMode, DEFAULT_WAIT_TIMEOUT, Executed, Oncely, OncelyBuilder, PreparedClaim,
};
pub use error::{ConfigError, Error, Failure, RunError, Setting};
pub use fingerprint::Fingerprint;
pub use key::{IdempotencyKey, KeyError, Scope, StorageKey};
pub use record::{ClaimId, Record, RecordState};
pub use store::memory::{MemoryStore, MemoryStoreBuilder};
pub use store::{Claim, ClaimOutcome, ClaimRequest, DynStore, Replay, Store, StoreAdmin, StoreError, StoreStats};
