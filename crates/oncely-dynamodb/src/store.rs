//! The store on the request path: [`DynamoDbStore`], its client, and its [`Store`]
//! implementation, one conditional write per state change.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::config::{Region, StalledStreamProtectionConfig};
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::delete_item::DeleteItemError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
use aws_smithy_http_client::tls;
use bytes::Bytes;
use futures_util::StreamExt;
use oncely::store::{Claim, FirstSeen, Notified, Replay};
use oncely::{ClaimId, ClaimOutcome, ClaimRequest, RecordState, StorageKey, Store, StoreError};

use crate::codec::{self, *};
use crate::counter::{RequestCounter, RequestsSent};
use crate::error::store_error;
use crate::{DynamoDbOptions, OpenError};

/// The DynamoDB store. Cloning is cheap and clones share the client.
#[derive(Clone)]
pub struct DynamoDbStore {
    pub(crate) client: Client,
    pub(crate) table: Arc<str>,
    pub(crate) layout: Arc<Layout>,
    counter: RequestCounter,
    /// The pollers of keys that tasks wait on.
    pub(crate) watches: Arc<crate::watch::Watches>,
}

impl std::fmt::Debug for DynamoDbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoDbStore")
            .field("table", &self.table)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// What a claim says of an item at its key that its condition could not read.
const NOT_ITEM: &str = "the table holds an item at a record's key that is not one of the store's records";

impl DynamoDbStore {
    /// Opens a store from a `dynamodb://TABLE?…` URL; see
    /// [`DynamoDbUrl`](crate::DynamoDbUrl) for the options.
    ///
    /// # Errors
    /// [`OpenError`] for a bad URL, an unreachable service or a missing table.
    pub async fn open(url: &str) -> Result<Self, OpenError> {
        let url: crate::DynamoDbUrl =
            url.parse().map_err(|e: oncely::store::UrlError| OpenError::InvalidUrl(e.to_string()))?;
        Self::connect(url.into_options()).await
    }

    /// Builds the client (credentials and, unless set, the region from the usual AWS
    /// chain: environment, profile, container or instance role; for an endpoint on
    /// loopback, an emulator, the environment's or the profile's credentials or else a
    /// static pair, and `us-east-1` unless set), then checks that the
    /// table exists with the key schema the options describe (`DescribeTable`; a role
    /// that may not describe tables skips the check with a warning).
    ///
    /// # Errors
    /// [`OpenError::Connect`] when DynamoDB cannot be reached or refuses the call,
    /// [`OpenError::NoTable`] and [`OpenError::WrongTable`] for a table that is missing
    /// or of another shape, [`OpenError::InvalidUrl`] when no region can be found.
    pub async fn connect(options: DynamoDbOptions) -> Result<Self, OpenError> {
        let store = Self::client_only(options).await?;
        match crate::table::check(&store).await {
            Err(OpenError::Connect(StoreError::Unavailable(error)))
                if crate::table::is_access_denied(error.as_ref()) =>
            {
                tracing::warn!(table = %store.table, "not allowed to describe the table; its key schema is not checked");
                Ok(store)
            }
            Err(error) => Err(error),
            Ok(()) => Ok(store),
        }
    }

    /// The client and the store, without a call to DynamoDB: for creating the table.
    pub(crate) async fn client_only(options: DynamoDbOptions) -> Result<Self, OpenError> {
        let retry = RetryConfig::standard()
            .with_max_attempts(options.max_attempts)
            .with_initial_backoff(Duration::from_millis(25))
            .with_max_backoff(Duration::from_secs(1));
        let timeouts = TimeoutConfig::builder()
            .operation_attempt_timeout(options.timeout)
            .connect_timeout(options.connect_timeout)
            .build();
        // A client of the store's own: the SDK's default is one client shared by the whole
        // process, whose pooled connections die with the Tokio runtime that opened them.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::AwsLc))
            .build_https();
        // The attempt timeout bounds every call; the SDK's stalled-stream protection (a
        // response that sends nothing for its grace period) would only add a second,
        // looser bound on responses of a few hundred bytes.
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(retry)
            .timeout_config(timeouts)
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .http_client(http);
        if let Some(endpoint) = &options.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        let emulator = options.endpoint.as_deref().is_some_and(is_loopback);
        match (&options.region, emulator) {
            (Some(region), _) => loader = loader.region(Region::new(region.clone())),
            // An emulator on this machine ignores the region, but requests are signed for
            // one; and the default chain would ask the instance metadata service for it.
            (None, true) => loader = loader.region(Region::from_static("us-east-1")),
            (None, false) => {}
        }
        if emulator {
            loader = loader.credentials_provider(emulator_credentials());
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(OpenError::InvalidUrl("no AWS region: add ?region=… to the URL or set AWS_REGION".into()));
        }
        let counter = RequestCounter::default();
        let config = aws_sdk_dynamodb::config::Builder::from(&sdk).interceptor(counter.clone()).build();
        let layout = Layout {
            partition_key: options.partition_key,
            sort_key: options.sort_key,
            prefix: options.prefix,
            ttl: options.ttl_attribute,
        };
        Ok(DynamoDbStore {
            client: Client::from_conf(config),
            table: options.table.into(),
            layout: Arc::new(layout),
            counter,
            watches: Arc::default(),
        })
    }

    /// The table's name.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// The SDK client the store uses, for calls of the application's own on the same
    /// table (it counts in [`requests_sent`](Self::requests_sent)).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// How many requests this store (all its clones) has sent to DynamoDB, by operation:
    /// for tests that prove the round trips of each operation, and for cost estimates.
    pub fn requests_sent(&self) -> RequestsSent {
        self.counter.snapshot()
    }

    /// Reads the item at `key` with a strongly consistent `GetItem`.
    pub(crate) async fn read(&self, key: &StorageKey) -> Result<Option<Item>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(self.layout.key(key)))
            .consistent_read(true)
            .send()
            .await
            .map_err(store_error)?;
        Ok(output.item)
    }

    /// The live in-progress holder at `key`, if any: what a waiter polls.
    pub(crate) async fn holder(&self, key: &StorageKey) -> Result<Option<ClaimId>, StoreError> {
        let Some(item) = self.read(key).await? else { return Ok(None) };
        let record = codec::record(key, &item)?;
        Ok(match record.state {
            RecordState::InProgress { claim_id, .. } if !record.is_expired(SystemTime::now()) => Some(claim_id),
            _ => None,
        })
    }
}

/// Whether an endpoint is on this machine (`http://127.0.0.1:…`, `http://localhost:…`,
/// `http://[::1]:…`): a local emulator.
fn is_loopback(endpoint: &str) -> bool {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(host, _)| host),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Credentials for an emulator on this machine: the environment's or the profile's when
/// set, and otherwise a static pair (emulators accept any). Never the container or
/// instance metadata endpoints, which a developer's machine does not have (asking them
/// costs seconds of timeouts).
fn emulator_credentials() -> aws_config::meta::credentials::CredentialsProviderChain {
    use aws_config::environment::EnvironmentVariableCredentialsProvider;
    use aws_config::profile::ProfileFileCredentialsProvider;
    use aws_sdk_dynamodb::config::Credentials;
    aws_config::meta::credentials::CredentialsProviderChain::first_try(
        "Environment",
        EnvironmentVariableCredentialsProvider::new(),
    )
    .or_else("Profile", ProfileFileCredentialsProvider::builder().build())
    .or_else("Emulator", Credentials::new("oncely-emulator", "oncely-emulator", None, None, "oncely-emulator"))
}

/// Expression attribute names: the table's key and the store's attributes as `#name`
/// placeholders, since several are DynamoDB reserved words (`state`, `ttl`, …).
fn names(store: &DynamoDbStore, attributes: &[&str]) -> HashMap<String, String> {
    attributes
        .iter()
        .map(|name| match *name {
            "pk" => ("#pk".to_string(), store.layout.partition_key.clone()),
            name => (format!("#{name}"), name.to_string()),
        })
        .collect()
}

fn values(pairs: impl IntoIterator<Item = (&'static str, AttributeValue)>) -> HashMap<String, AttributeValue> {
    pairs.into_iter().map(|(name, value)| (name.to_string(), value)).collect()
}

fn text(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_string())
}

/// What a claim's item takes past the in-progress one once completed, without its
/// payload: the completion time, the hit count and their names.
const COMPLETION_EXTRA: usize = 64;

/// Why a holder's conditional write failed: the item as it was, when DynamoDB returned
/// it (`ReturnValuesOnConditionCheckFailure = ALL_OLD`).
fn failed_condition<E>(error: &SdkError<E, HttpResponse>) -> Option<Option<&Item>>
where
    E: ConditionFailure,
{
    error.as_service_error().and_then(ConditionFailure::old_item)
}

/// The operation errors that carry a failed condition's item.
trait ConditionFailure {
    /// `Some(item)` when the error is a failed condition (`item` is `None` when there was
    /// no item), `None` for any other error.
    fn old_item(&self) -> Option<Option<&Item>>;
}

impl ConditionFailure for PutItemError {
    fn old_item(&self) -> Option<Option<&Item>> {
        match self {
            PutItemError::ConditionalCheckFailedException(e) => Some(e.item()),
            _ => None,
        }
    }
}

impl ConditionFailure for UpdateItemError {
    fn old_item(&self) -> Option<Option<&Item>> {
        match self {
            UpdateItemError::ConditionalCheckFailedException(e) => Some(e.item()),
            _ => None,
        }
    }
}

impl ConditionFailure for DeleteItemError {
    fn old_item(&self) -> Option<Option<&Item>> {
        match self {
            DeleteItemError::ConditionalCheckFailedException(e) => Some(e.item()),
            _ => None,
        }
    }
}

/// A holder's write as the contract answers it: done, [`StoreError::LeaseLost`] when its
/// fence (the condition) failed, or the call's failure.
fn fenced<T, E>(sent: Result<T, SdkError<E, HttpResponse>>) -> Result<(), StoreError>
where
    E: ConditionFailure + ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match sent {
        Ok(_) => Ok(()),
        Err(error) if failed_condition(&error).is_some() => Err(StoreError::LeaseLost),
        Err(error) => Err(store_error(error)),
    }
}

/// The condition every holder's write is fenced by: the record is held by this claim id,
/// still in progress, and not expired.
const HELD: &str = "#claim_id = :claim_id AND #state = :in_progress AND #expires_at > :now";

impl DynamoDbStore {
    /// The in-progress item a claim writes.
    fn claim_item(&self, request: &ClaimRequest<'_>, now: SystemTime) -> Result<Item, StoreError> {
        let lease_until = after(now, request.lease())?;
        let expires_at = after(now, request.retention())?;
        let mut item = self.layout.key(request.storage_key());
        item.insert(STATE.into(), text(IN_PROGRESS));
        item.insert(CLAIM_ID.into(), blob(request.claim_id().to_bytes()));
        item.insert(LEASE_UNTIL.into(), millis(lease_until));
        if let Some(fingerprint) = request.fingerprint() {
            item.insert(FINGERPRINT.into(), blob(*fingerprint.as_bytes()));
        }
        item.insert(KEY.into(), text(request.key().as_str()));
        item.insert(SCOPE.into(), text(request.scope().as_str()));
        item.insert(CREATED_AT.into(), millis(now));
        item.insert(EXPIRES_AT.into(), millis(expires_at));
        item.insert(self.layout.ttl.clone(), self.layout.ttl_value(expires_at));
        fits(&item, COMPLETION_EXTRA)?;
        Ok(item)
    }
}

/// Refuses an item whose key and scope leave less than [`MAX_PAYLOAD_BYTES`] for its
/// result, before any call.
fn fits(item: &Item, extra: usize) -> Result<(), StoreError> {
    let size = item_size(item) + extra;
    if size > RECORD_HEADROOM_BYTES {
        return Err(StoreError::InvalidRequest(format!(
            "the record's key, scope and attributes take {size} bytes; the DynamoDB store keeps at most \
             {RECORD_HEADROOM_BYTES} beside a result, so that every result up to {MAX_PAYLOAD_BYTES} bytes fits in \
             a 400 KB item"
        )));
    }
    Ok(())
}

/// What a claim's failed condition found, from the item as it was (the request's own
/// `now` decided the condition, so the item is read against the same instant).
fn blocked(request: &ClaimRequest<'_>, item: &Item) -> Result<ClaimOutcome, StoreError> {
    let record = codec::record(request.storage_key(), item)?;
    if let RecordState::InProgress { claim_id, .. } = record.state
        && claim_id == request.claim_id()
    {
        // An SDK retry of this very claim, whose first attempt landed and whose answer was
        // lost: the key is this request's.
        return Ok(ClaimOutcome::Acquired { takeover: false });
    }
    if record.fingerprint.as_ref() != request.fingerprint() {
        return Ok(ClaimOutcome::Mismatch);
    }
    Ok(match record.state {
        RecordState::Completed { payload, completed_at, hits } => {
            ClaimOutcome::Replay(Replay { payload, completed_at, hits, expires_at: record.expires_at })
        }
        // A lapsed lease here lost the race to another claim a moment ago, or read a
        // record the same instant: the engine asks again at once.
        RecordState::InProgress { lease_until, .. } => ClaimOutcome::InProgress { lease_until },
    })
}

/// How many hit flushes are in flight at once: DynamoDB has no batch update, so each
/// record's count is its own `UpdateItem`.
const HIT_FLUSHES_IN_FLIGHT: usize = 16;

impl Store for DynamoDbStore {
    /// One `PutItem` of the in-progress record, conditional on the key being absent,
    /// expired, or held by a lapsed lease with the same fingerprint. When the condition
    /// fails, DynamoDB returns the blocking item in the same answer
    /// (`ReturnValuesOnConditionCheckFailure = ALL_OLD`): a replay, a live holder or a
    /// mismatch costs this one request and writes nothing. On success the replaced item
    /// (`ReturnValues = ALL_OLD`) tells a takeover from a new record.
    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        let now = SystemTime::now();
        let item = self.claim_item(request, now)?;
        let condition = match request.fingerprint() {
            Some(_) => {
                "attribute_not_exists(#pk) OR #expires_at <= :now OR \
                 (#state = :in_progress AND #lease_until <= :now AND #fingerprint = :fingerprint)"
            }
            None => {
                "attribute_not_exists(#pk) OR #expires_at <= :now OR \
                 (#state = :in_progress AND #lease_until <= :now AND attribute_not_exists(#fingerprint))"
            }
        };
        let attributes = ["pk", EXPIRES_AT, STATE, LEASE_UNTIL, FINGERPRINT];
        let mut values = values([(":now", millis(now)), (":in_progress", text(IN_PROGRESS))]);
        if let Some(fingerprint) = request.fingerprint() {
            values.insert(":fingerprint".into(), blob(*fingerprint.as_bytes()));
        }
        let sent = self
            .client
            .put_item()
            .table_name(&*self.table)
            .set_item(Some(item))
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names(self, &attributes)))
            .set_expression_attribute_values(Some(values))
            .return_values(ReturnValue::AllOld)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match sent {
            Ok(output) => {
                // The key is this request's now, whatever the replaced item held: one that
                // cannot be read (it was overwritten) is not called a takeover.
                let takeover = output
                    .attributes()
                    .filter(|old| !old.is_empty())
                    .and_then(|old| codec::record(request.storage_key(), old).ok())
                    .is_some_and(|record| !record.is_completed() && !record.is_expired(now));
                Ok(ClaimOutcome::Acquired { takeover })
            }
            Err(error) => match failed_condition(&error) {
                Some(Some(old)) => blocked(request, old),
                Some(None) => Err(StoreError::Corrupt(format!("record {}: {NOT_ITEM}", request.storage_key()))),
                None => Err(store_error(error)),
            },
        }
    }

    /// One `UpdateItem` fenced by the claim id (`claim_id = :mine AND state = in_progress AND
    /// expires_at > :now`): the state, the payload, the
    /// completion time and the new expiry (and TTL) in one atomic write. A result over
    /// [`MAX_PAYLOAD_BYTES`] is refused before the call. A repeated completion by the
    /// same holder (an SDK retry whose first attempt landed) succeeds.
    async fn complete(&self, claim: Claim, payload: Bytes, retention: Duration) -> Result<(), StoreError> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(StoreError::InvalidRequest(format!(
                "the result is {} bytes; a DynamoDB item holds at most 400 KB, so the DynamoDB store keeps results of \
                 at most {MAX_PAYLOAD_BYTES} bytes",
                payload.len()
            )));
        }
        let now = SystemTime::now();
        let expires_at = after(now, retention)?;
        let values = values([
            (":claim_id", blob(claim.claim_id.to_bytes())),
            (":in_progress", text(IN_PROGRESS)),
            (":completed", text(COMPLETED)),
            (":now", millis(now)),
            (":payload", blob(payload.to_vec())),
            (":expires_at", millis(expires_at)),
            (":ttl", self.layout.ttl_value(expires_at)),
            (":zero", AttributeValue::N("0".into())),
        ]);
        let mut names = names(self, &[CLAIM_ID, STATE, EXPIRES_AT, PAYLOAD, COMPLETED_AT, HITS, LEASE_UNTIL]);
        names.insert("#ttl_attribute".into(), self.layout.ttl.clone());
        let sent = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(self.layout.key(&claim.storage_key)))
            .update_expression(
                "SET #state = :completed, #payload = :payload, #completed_at = :now, #expires_at = :expires_at, \
                 #ttl_attribute = :ttl, #hits = :zero REMOVE #lease_until",
            )
            .condition_expression(HELD)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match sent {
            Ok(_) => Ok(()),
            Err(error) => match failed_condition(&error) {
                Some(Some(old)) if is_completed(old) && claim_id_of(old) == Some(claim.claim_id) => Ok(()),
                Some(_) => Err(StoreError::LeaseLost),
                None => Err(store_error(error)),
            },
        }
    }

    /// One `DeleteItem` fenced by the claim id, as `complete` is.
    async fn release(&self, claim: Claim) -> Result<(), StoreError> {
        let sent = self
            .client
            .delete_item()
            .table_name(&*self.table)
            .set_key(Some(self.layout.key(&claim.storage_key)))
            .condition_expression(HELD)
            .set_expression_attribute_names(Some(names(self, &[CLAIM_ID, STATE, EXPIRES_AT])))
            .set_expression_attribute_values(Some(held_values(claim.claim_id, SystemTime::now())))
            .send()
            .await;
        fenced(sent)
    }

    /// One `UpdateItem` of the lease end, fenced by the claim id, as `complete` is.
    async fn touch(&self, claim: Claim, lease: Duration) -> Result<(), StoreError> {
        let now = SystemTime::now();
        let mut values = held_values(claim.claim_id, now);
        values.insert(":lease_until".into(), millis(after(now, lease)?));
        let sent = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(self.layout.key(&claim.storage_key)))
            .update_expression("SET #lease_until = :lease_until")
            .condition_expression(HELD)
            .set_expression_attribute_names(Some(names(self, &[CLAIM_ID, STATE, EXPIRES_AT, LEASE_UNTIL])))
            .set_expression_attribute_values(Some(values))
            .send()
            .await;
        fenced(sent)
    }

    /// One `PutItem` of a marker (a completed record with an empty payload), conditional
    /// on the key being absent or expired. The marker carries a token of this call, so
    /// an SDK retry whose first attempt landed still answers true.
    async fn first_seen(&self, request: &FirstSeen<'_>) -> Result<bool, StoreError> {
        let now = SystemTime::now();
        let expires_at = after(now, request.window())?;
        let token = ClaimId::random();
        let mut item = self.layout.key(request.storage_key());
        item.insert(STATE.into(), text(COMPLETED));
        item.insert(CLAIM_ID.into(), blob(token.to_bytes()));
        item.insert(KEY.into(), text(request.key().as_str()));
        item.insert(SCOPE.into(), text(request.scope().as_str()));
        item.insert(CREATED_AT.into(), millis(now));
        item.insert(EXPIRES_AT.into(), millis(expires_at));
        item.insert(PAYLOAD.into(), blob(Vec::new()));
        item.insert(COMPLETED_AT.into(), millis(now));
        item.insert(HITS.into(), AttributeValue::N("0".into()));
        item.insert(self.layout.ttl.clone(), self.layout.ttl_value(expires_at));
        fits(&item, 0)?;
        let sent = self
            .client
            .put_item()
            .table_name(&*self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#pk) OR #expires_at <= :now")
            .set_expression_attribute_names(Some(names(self, &["pk", EXPIRES_AT])))
            .set_expression_attribute_values(Some(values([(":now", millis(now))])))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match sent {
            Ok(_) => Ok(true),
            Err(error) => match failed_condition(&error) {
                Some(old) => Ok(old.and_then(claim_id_of) == Some(token)),
                None => Err(store_error(error)),
            },
        }
    }

    /// One `UpdateItem` (`ADD hits :n`) per record, conditional on the record being
    /// completed and unexpired, up to 16 in flight: DynamoDB has no conditional batch
    /// update. Each is atomic; a batch that fails part-way may have counted some
    /// records, and the engine retries the whole batch, so a failure can count some
    /// replays twice. Hits are statistics; nothing decides on them.
    async fn record_hits(&self, hits: &[(StorageKey, u64)]) -> Result<(), StoreError> {
        let now = SystemTime::now();
        let mut flushes = Vec::with_capacity(hits.len());
        for (key, n) in hits.iter().filter(|(_, n)| *n > 0) {
            let values = values([
                (":n", AttributeValue::N(n.to_string())),
                (":completed", text(COMPLETED)),
                (":now", millis(now)),
            ]);
            let update = self
                .client
                .update_item()
                .table_name(&*self.table)
                .set_key(Some(self.layout.key(key)))
                .update_expression("ADD #hits :n")
                .condition_expression("#state = :completed AND #expires_at > :now")
                .set_expression_attribute_names(Some(names(self, &[HITS, STATE, EXPIRES_AT])))
                .set_expression_attribute_values(Some(values));
            flushes.push(update.send());
        }
        let mut results = futures_util::stream::iter(flushes).buffer_unordered(HIT_FLUSHES_IN_FLIGHT);
        let mut first_error = None;
        while let Some(result) = results.next().await {
            match result {
                Ok(_) => {}
                // Absent, expired or in progress: skipped, as the contract says.
                Err(error) if failed_condition(&error).is_some() => {}
                Err(error) => {
                    first_error.get_or_insert(store_error(error));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Polling, since DynamoDB has no cheap push: a strongly consistent `GetItem` at
    /// once, then after 50 ms, 100 ms, 200 ms … up to once a second, until the record is
    /// no longer held by the claim first seen (completed, released, deleted, expired or
    /// taken over). One poller per key, shared by every task of the process waiting on
    /// it (see `src/watch.rs`). A failed read resolves the future, so that the engine's
    /// claim answers with the real state (or the error).
    fn subscribe(&self, key: &StorageKey) -> Notified {
        Box::pin(crate::watch::changed(self.clone(), *key))
    }
}

/// The values [`HELD`] reads.
fn held_values(claim_id: ClaimId, now: SystemTime) -> HashMap<String, AttributeValue> {
    values([(":claim_id", blob(claim_id.to_bytes())), (":in_progress", text(IN_PROGRESS)), (":now", millis(now))])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulators_are_told_by_a_loopback_endpoint() {
        for local in ["http://127.0.0.1:5000", "http://localhost:8000/", "http://[::1]:8000", "http://127.1.2.3"] {
            assert!(is_loopback(local), "{local}");
        }
        for remote in ["https://dynamodb.eu-west-1.amazonaws.com", "http://10.0.0.1:8000", "http://localhost.example"] {
            assert!(!is_loopback(remote), "{remote}");
        }
    }
}
