//! The settings an [`IdempotencyLayer`](crate::IdempotencyLayer) is built with, shared
//! (behind one `Arc`) by the layer and every service it makes: the layer's builder
//! methods write them, the service reads them on every request.

use std::fmt;
use std::sync::Arc;

use http::{HeaderName, Method, StatusCode, header};
use oncely::fingerprint::JsonPointer;

use crate::access::{AccessLog, TracingAccessLog};
use crate::counters::Counters;
use crate::layer::{InProgressCounts, default_stored_status};
use crate::request::FingerprintRules;
use crate::scope::ScopeSource;

pub(crate) type StatusFilter = dyn Fn(StatusCode) -> bool + Send + Sync;

/// The layer's settings; shared by every clone of the service.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) header: HeaderName,
    pub(crate) methods: Vec<Method>,
    pub(crate) required: bool,
    pub(crate) max_body: usize,
    pub(crate) max_stored_response: usize,
    pub(crate) replayed_header: HeaderName,
    pub(crate) scope: ScopeSource,
    pub(crate) stores_status: Arc<StatusFilter>,
    pub(crate) not_replayed: Vec<HeaderName>,
    pub(crate) fail_open: bool,
    pub(crate) tracker: Option<tokio_util::task::TaskTracker>,
    pub(crate) max_decoded_body: usize,
    pub(crate) takeover_header: Option<HeaderName>,
    pub(crate) max_in_progress_per_scope: usize,
    pub(crate) mismatch_status: StatusCode,
    pub(crate) documentation_url: Option<Arc<str>>,
    pub(crate) hold_unknown: bool,
    pub(crate) answer_within: Option<std::time::Duration>,
    pub(crate) fingerprint_rules: FingerprintRules,
    pub(crate) key_pointer: Option<JsonPointer>,
    pub(crate) access_log: Arc<dyn AccessLog>,
    /// Shared by every clone of the layer (and kept by `Arc::make_mut` copies).
    pub(crate) in_progress: InProgressCounts,
    /// Registered when the layer is built.
    pub(crate) counters: Counters,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("header", &self.header)
            .field("methods", &self.methods)
            .field("required", &self.required)
            .field("max_body", &self.max_body)
            .field("max_stored_response", &self.max_stored_response)
            .field("replayed_header", &self.replayed_header)
            .field("scope", &self.scope)
            .field("not_replayed", &self.not_replayed)
            .field("fail_open", &self.fail_open)
            .field("max_decoded_body", &self.max_decoded_body)
            .field("takeover_header", &self.takeover_header)
            .field("max_in_progress_per_scope", &self.max_in_progress_per_scope)
            .field("mismatch_status", &self.mismatch_status)
            .field("documentation_url", &self.documentation_url)
            .field("hold_unknown", &self.hold_unknown)
            .field("answer_within", &self.answer_within)
            .field("fingerprint_rules", &self.fingerprint_rules)
            .field("key_pointer", &self.key_pointer)
            .finish_non_exhaustive()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            header: HeaderName::from_static("idempotency-key"),
            methods: vec![Method::POST, Method::PATCH],
            required: false,
            max_body: 1024 * 1024,
            max_stored_response: 1024 * 1024,
            replayed_header: HeaderName::from_static("idempotent-replayed"),
            scope: ScopeSource::default(),
            stores_status: Arc::new(default_stored_status),
            not_replayed: vec![header::SET_COOKIE],
            fail_open: false,
            tracker: None,
            max_decoded_body: 8 * 1024 * 1024,
            takeover_header: Some(HeaderName::from_static("idempotency-takeover")),
            max_in_progress_per_scope: 1000,
            mismatch_status: StatusCode::UNPROCESSABLE_ENTITY,
            documentation_url: None,
            hold_unknown: true,
            answer_within: None,
            fingerprint_rules: FingerprintRules::default(),
            key_pointer: None,
            access_log: Arc::new(TracingAccessLog),
            in_progress: InProgressCounts::default(),
            counters: Counters::register(),
        }
    }
}
