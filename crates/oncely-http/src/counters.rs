//! The layer's request counters, `oncely_http_requests_total{outcome}`, registered once
//! per layer rather than looked up by label on every request.
//!
//! Handles are taken from the `metrics` recorder installed when the layer is built: a
//! layer built before any recorder is installed counts nowhere. Install the recorder
//! first, as a server does at start.

use metrics::Counter;

/// One handle per outcome label.
#[derive(Clone, Debug)]
pub(crate) struct Counters {
    pub(crate) passed_through: Counter,
    pub(crate) unauthenticated: Counter,
    pub(crate) too_many_in_progress: Counter,
    pub(crate) replayed: Counter,
    pub(crate) failed_open: Counter,
    pub(crate) still_running: Counter,
    pub(crate) released: Counter,
    pub(crate) executed: Counter,
    pub(crate) executed_not_stored: Counter,
    pub(crate) outcome_unknown: Counter,
    pub(crate) unrecorded: Counter,
}

impl Counters {
    /// Registers every outcome's counter with the installed recorder.
    pub(crate) fn register() -> Self {
        let outcome = |label: &'static str| metrics::counter!("oncely_http_requests_total", "outcome" => label);
        Self {
            passed_through: outcome("passed_through"),
            unauthenticated: outcome("unauthenticated"),
            too_many_in_progress: outcome("too_many_in_progress"),
            replayed: outcome("replayed"),
            failed_open: outcome("failed_open"),
            still_running: outcome("still_running"),
            released: outcome("released"),
            executed: outcome("executed"),
            executed_not_stored: outcome("executed_not_stored"),
            outcome_unknown: outcome("outcome_unknown"),
            unrecorded: outcome("unrecorded"),
        }
    }
}
