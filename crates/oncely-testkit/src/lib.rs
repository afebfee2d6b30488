//! The store conformance suite every Oncely store runs, and test helpers.
//!
//! A store proves it keeps the [`Store`](oncely::Store) contract with one line in an integration test:
//!
//! ```ignore
//! // crates/my-store/tests/conformance.rs
//! oncely_testkit::store_conformance!(async { my_store::MyStore::connect("…").await });
//! ```
//!
//! The expression is evaluated once per test and must produce a store that is **empty and
//! isolated** (its own database, key prefix or table): the `stats` and `purge` cases count
//! records. Every case runs on a multi-threaded Tokio runtime, so the test crate needs
//! `tokio` (with `macros` and `rt-multi-thread`) as a dev-dependency.
//!
//! Each case is also a public function in [`cases`], for stores that need a setup the
//! macro cannot express.
//!
//! With the feature `postgres`, the `postgres` module starts a throwaway PostgreSQL server
//! for tests (`initdb` into a temporary directory, on loopback).
//!
//! The `dynamodb` module starts moto's DynamoDB emulator on loopback (installed by
//! `scripts/test`), the `redis` module Redis servers.
//!
//! Time: cases that wait for a lease or a retention to pass use real durations (hundreds
//! of milliseconds), because shared stores take time from their server's clock, which a
//! test cannot pause. Every other wait is on a signal.

use std::time::Duration;

use std::sync::LazyLock;

use oncely::{ClaimRequest, Fingerprint, IdempotencyKey, Scope};

pub mod cases;
pub mod dynamodb;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod process;
pub mod redis;
pub mod scale;
pub mod tls;

/// Generates one `#[tokio::test]` per conformance case for the store that `$make_store`
/// (an expression of type `impl Future<Output = impl Store>`) produces.
#[macro_export]
macro_rules! store_conformance {
    ($make_store:expr) => {
        $crate::store_conformance!($make_store, max_payload = 1 << 20);
    };
    // A store whose results are bounded (DynamoDB's items hold 400 KB): the replay case
    // stores its large payload at that bound instead of 1 MiB.
    ($make_store:expr, max_payload = $max_payload:expr) => {
        $crate::__conformance_tests!($make_store;
            concurrent_claimers_acquire_once,
            thousand_tasks_over_ten_keys_run_ten_operations,
        );
        $crate::store_conformance!($make_store, max_payload = $max_payload, load_cases = false);
    };
    // Every case but the two load cases (many concurrent claimers, 1,000 tasks): for a
    // second run of a store in another configuration on a slow emulator, where the first
    // run has them.
    ($make_store:expr, max_payload = $max_payload:expr, load_cases = false) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn replay_returns_stored_bytes_exactly() {
            $crate::cases::replay_returns_stored_bytes_exactly_up_to(($make_store).await, $max_payload).await;
        }
        $crate::__conformance_tests!($make_store;
            engine_runs_once_among_concurrent_callers,
            fingerprint_mismatch_is_reported_without_a_hit,
            replay_reports_the_expiry_its_holder_completed_with,
            lapsed_lease_is_taken_over_and_old_holder_fenced,
            keep_alive_prevents_takeover_of_live_holder,
            touch_extends_the_lease,
            release_lets_the_next_caller_run,
            retention_expiry_makes_the_key_new_again,
            replays_write_nothing_and_hits_are_flushed,
            engine_hits_reach_the_store,
            waiters_are_woken_on_completion,
            waiters_are_woken_on_release,
            first_seen_inside_and_outside_its_window,
            purge_removes_only_expired_records,
            stats_count_records_by_state,
            delete_removes_and_fences_the_holder,
            records_keep_raw_key_and_scope,
            scopes_never_share_records,
            subscribe_resolves_at_once_when_nothing_is_in_progress,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($make_store:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                $crate::cases::$case(($make_store).await).await;
            }
        )*
    };
}

/// A fresh random key, so that cases never collide on a shared server.
pub fn unique_key() -> IdempotencyKey {
    IdempotencyKey::uuid_v4()
}

/// The global scope, as a `'static` value that requests can borrow.
pub static GLOBAL: LazyLock<Scope> = LazyLock::new(Scope::global);

/// A claim request for `key` in the global scope with a fresh claim id.
pub fn claim_request(key: &IdempotencyKey, fingerprint: Option<Fingerprint>, lease: Duration) -> ClaimRequest<'_> {
    claim_request_in(&GLOBAL, key, fingerprint, lease, Duration::from_secs(3600))
}

/// A claim request with every field chosen.
pub fn claim_request_in<'a>(
    scope: &'a Scope,
    key: &'a IdempotencyKey,
    fingerprint: Option<Fingerprint>,
    lease: Duration,
    retention: Duration,
) -> ClaimRequest<'a> {
    ClaimRequest::new(scope, key, fingerprint, lease, retention)
}
