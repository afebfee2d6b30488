//! The admin listener: health, readiness, Prometheus metrics, and key inspection and
//! deletion behind a bearer token.
//!
//! | route | answer |
//! |---|---|
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 when the store answers (SQLite: can take a write), else 503; 503 too while results of operations that ran wait in memory for the store to take them |
//! | `GET /metrics` | Prometheus text: `oncely_outcomes_total{outcome}`, `oncely_http_requests_total{outcome}`, `oncely_store_seconds{op}` (histogram), `oncely_operations_in_flight`, `oncely_completions_kept` (results waiting for the store), `oncely_records{state}` (not on Redis, where counting scans the key space) |
//! | `GET /keys?after=HASH&limit=N` | records, in storage-key order (token) |
//! | `GET /keys/HASH` | one record (token) |
//! | `DELETE /keys/HASH` | deletes it: the next request with the key runs again (token) |
//! | `GET /stats` | record counts (token) |
//!
//! `HASH` is the record's storage key (64 hex digits), as `GET /keys` and
//! `oncely keys list` show it. Without `admin.token` configured, the key routes answer 404.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use oncely::{Record, RecordState, StorageKey, StoreAdmin};
use oncely_http::StoredKind;
use serde::{Deserialize, Serialize};
use tokio_util::task::TaskTracker;

use crate::stores::GatewayStore;

/// What the admin handlers share.
#[derive(Clone)]
pub struct AdminState {
    /// The gateway's store.
    pub store: GatewayStore,
    /// The Prometheus recorder's handle, if metrics are installed.
    pub metrics: Option<PrometheusHandle>,
    /// Running operations.
    pub tracker: TaskTracker,
    /// Results the store could not take yet: readiness is 503 while there are any.
    pub deferred: oncely::engine::DeferredCompletions,
    /// Whether `/metrics` refreshes `oncely_records{state}` from the store's counts on
    /// every scrape: the store says whether counting is cheap (Redis counts by scanning).
    pub count_records: bool,
    /// The bearer token for the key routes.
    pub token: Option<Arc<str>>,
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/keys", get(list))
        .route("/keys/{hash}", get(show).delete(remove))
        .route("/stats", get(stats))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let kept = state.deferred.len();
    if kept > 0 {
        let text = format!("not ready: {kept} results of operations that ran wait to be stored\n");
        return (StatusCode::SERVICE_UNAVAILABLE, text).into_response();
    }
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store unavailable: {e}\n")).into_response(),
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let Some(handle) = &state.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are not installed\n").into_response();
    };
    metrics::gauge!("oncely_operations_in_flight").set(state.tracker.len() as f64);
    metrics::gauge!("oncely_completions_kept").set(state.deferred.len() as f64);
    if state.count_records
        && let Ok(stats) = state.store.stats().await
    {
        metrics::gauge!("oncely_records", "state" => "in_progress").set(stats.in_progress as f64);
        metrics::gauge!("oncely_records", "state" => "completed").set(stats.completed as f64);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}

/// Why an admin request was refused.
enum AdminError {
    Disabled,
    Unauthorized,
    BadHash,
    NotFound,
    Store(oncely::StoreError),
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        match self {
            Self::Disabled => (StatusCode::NOT_FOUND, "key routes are disabled: set admin.token\n").into_response(),
            Self::Unauthorized => {
                (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "a valid bearer token is needed\n")
                    .into_response()
            }
            Self::BadHash => (StatusCode::BAD_REQUEST, "a key hash is 64 hex digits (see GET /keys)\n").into_response(),
            Self::NotFound => (StatusCode::NOT_FOUND, "no such record\n").into_response(),
            Self::Store(e @ (oncely::StoreError::Unsupported(_) | oncely::StoreError::InvalidRequest(_))) => {
                (StatusCode::NOT_IMPLEMENTED, format!("{e}\n")).into_response()
            }
            Self::Store(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
        }
    }
}

impl From<oncely::StoreError> for AdminError {
    fn from(e: oncely::StoreError) -> Self {
        Self::Store(e)
    }
}

/// Checks the bearer token.
fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), AdminError> {
    let Some(token) = &state.token else { return Err(AdminError::Disabled) };
    let presented =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // Compare digests, so the time taken says nothing about how much of the token matched.
    let digest = |t: &str| oncely::Fingerprint::from_bytes(t.as_bytes());
    match presented {
        Some(p) if digest(p) == digest(token) => Ok(()),
        _ => Err(AdminError::Unauthorized),
    }
}

/// A record as the admin API and the CLI show it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RecordView {
    /// The storage key, 64 hex digits.
    pub hash: String,
    /// The key as the client sent it.
    pub key: String,
    /// The scope (a hash of the principal headers, or empty).
    pub scope: String,
    /// `in_progress`, `completed`, or `outcome_unknown` (a completed record that answers
    /// 502 `outcome-unknown` until it is deleted: check what the upstream did, then
    /// delete it to let the key run again).
    pub state: String,
    /// The stored response's status, for a completed response.
    pub status: Option<u16>,
    /// The request fingerprint, hex.
    pub fingerprint: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    /// Replays so far.
    pub hits: u64,
    /// Size of the stored result.
    pub payload_bytes: usize,
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl From<&Record> for RecordView {
    fn from(record: &Record) -> Self {
        let (state, status, payload_bytes) = match &record.state {
            RecordState::InProgress { .. } => ("in_progress", None, 0),
            RecordState::Completed { payload, .. } => match oncely_http::stored_kind(payload) {
                Some(StoredKind::OutcomeUnknown) => ("outcome_unknown", None, payload.len()),
                Some(StoredKind::Response(status) | StoredKind::NotKept(status)) => {
                    ("completed", Some(status.as_u16()), payload.len())
                }
                None => ("completed", None, payload.len()),
            },
        };
        Self {
            hash: record.storage_key.to_hex(),
            key: record.key.to_string(),
            scope: record.scope.to_string(),
            state: state.to_string(),
            status,
            fingerprint: record.fingerprint.map(|f| f.to_hex()),
            created_at_ms: millis(record.created_at),
            expires_at_ms: millis(record.expires_at),
            hits: record.hits(),
            payload_bytes,
        }
    }
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

fn parse_hash(hash: &str) -> Result<StorageKey, AdminError> {
    StorageKey::from_hex(hash).ok_or(AdminError::BadHash)
}

async fn list(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Response, AdminError> {
    authorize(&state, &headers)?;
    let after = query.after.as_deref().map(parse_hash).transpose()?;
    let records = state.store.list(after, query.limit.unwrap_or(100).min(1000)).await?;
    Ok(axum::Json(records.iter().map(RecordView::from).collect::<Vec<_>>()).into_response())
}

async fn show(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(hash): Path<String>,
) -> Result<Response, AdminError> {
    authorize(&state, &headers)?;
    let key = parse_hash(&hash)?;
    // A result kept in memory for the store is what retries get: show that one.
    let record = match state.deferred.get(&key) {
        Some(kept) => kept,
        None => state.store.get(&key).await?.ok_or(AdminError::NotFound)?,
    };
    Ok(axum::Json(RecordView::from(&record)).into_response())
}

async fn remove(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(hash): Path<String>,
) -> Result<StatusCode, AdminError> {
    authorize(&state, &headers)?;
    let key = parse_hash(&hash)?;
    // A result kept in memory for the store goes too, or retries would still get it.
    let kept = state.deferred.forget(&key);
    if state.store.delete(&key).await? || kept { Ok(StatusCode::NO_CONTENT) } else { Err(AdminError::NotFound) }
}

async fn stats(State(state): State<AdminState>, headers: HeaderMap) -> Result<Response, AdminError> {
    authorize(&state, &headers)?;
    let s = state.store.stats().await?;
    Ok(axum::Json(serde_json::json!({ "records": s.records, "in_progress": s.in_progress, "completed": s.completed }))
        .into_response())
}
