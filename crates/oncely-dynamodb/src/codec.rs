//! Records as DynamoDB items and back: the attribute names, the table's key layout, the
//! item size DynamoDB counts, and decoding. Everything here reads what the table (or an
//! emulator) sent, so a malformed item is a [`StoreError::Corrupt`], never a panic.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use bytes::Bytes;
use oncely::record::{RecordParts, RecordStateKind};
use oncely::{ClaimId, Record, StorageKey, StoreError};

use crate::options::DEFAULT_SORT_KEY_PREFIX;

/// An item as the SDK takes and gives it.
pub(crate) type Item = HashMap<String, AttributeValue>;

/// `in_progress` or `completed` (S).
pub(crate) const STATE: &str = "state";
/// The holder's 16-byte claim id (B); kept on completion, so a repeated completion by
/// the same holder is recognised. On a message-dedup marker: the call's own token.
pub(crate) const CLAIM_ID: &str = "claim_id";
/// When the holder's lease lapses, epoch milliseconds (N). Removed on completion.
pub(crate) const LEASE_UNTIL: &str = "lease_until";
/// The request's 32-byte fingerprint (B); absent for a request without one.
pub(crate) const FINGERPRINT: &str = "fingerprint";
/// The raw idempotency key (S), for inspection.
pub(crate) const KEY: &str = "idempotency_key";
/// The scope (S), for inspection.
pub(crate) const SCOPE: &str = "scope";
/// When the first claim created the record, epoch milliseconds (N).
pub(crate) const CREATED_AT: &str = "created_at";
/// When the record stops existing, epoch milliseconds (N): what every read checks.
pub(crate) const EXPIRES_AT: &str = "expires_at";
/// The stored result (B).
pub(crate) const PAYLOAD: &str = "payload";
/// When the holder completed, epoch milliseconds (N).
pub(crate) const COMPLETED_AT: &str = "completed_at";
/// Replays flushed so far (N).
pub(crate) const HITS: &str = "hits";

/// Every attribute the store writes besides the table's keys and the TTL attribute.
pub(crate) const RECORD_ATTRIBUTES: &[&str] =
    &[STATE, CLAIM_ID, LEASE_UNTIL, FINGERPRINT, KEY, SCOPE, CREATED_AT, EXPIRES_AT, PAYLOAD, COMPLETED_AT, HITS];

pub(crate) const IN_PROGRESS: &str = "in_progress";
pub(crate) const COMPLETED: &str = "completed";

/// DynamoDB's item size limit: 400 KB, names and values together.
pub const MAX_ITEM_BYTES: usize = 400 * 1024;

/// What a record's item may take besides its payload: the key attributes, the raw key
/// (at most 255 bytes), the scope, the ids, times and attribute names. A claim whose
/// item would take more is refused, so that every result up to [`MAX_PAYLOAD_BYTES`]
/// fits.
pub const RECORD_HEADROOM_BYTES: usize = 4 * 1024;

/// The largest result the store keeps: [`MAX_ITEM_BYTES`] less
/// [`RECORD_HEADROOM_BYTES`] (396 KiB). A larger one is refused before any call, with
/// [`StoreError::InvalidRequest`].
pub const MAX_PAYLOAD_BYTES: usize = MAX_ITEM_BYTES - RECORD_HEADROOM_BYTES;

/// How the table's key attributes hold a storage key, and the TTL attribute's name.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub(crate) partition_key: String,
    pub(crate) sort_key: Option<String>,
    pub(crate) prefix: Option<String>,
    pub(crate) ttl: String,
}

impl Layout {
    /// The partition key's value every record shares, on a table with a sort key.
    pub(crate) fn shared_partition(&self) -> &str {
        self.prefix.as_deref().unwrap_or(DEFAULT_SORT_KEY_PREFIX)
    }

    /// The item key of a record: `{pk: hex}`, `{pk: PREFIX#hex}`, or with a sort key
    /// `{pk: PREFIX, sk: hex}`.
    pub(crate) fn key(&self, storage_key: &StorageKey) -> Item {
        let hex = storage_key.to_hex();
        let mut key = HashMap::with_capacity(2);
        match (&self.sort_key, &self.prefix) {
            (Some(sort_key), _) => {
                key.insert(self.partition_key.clone(), AttributeValue::S(self.shared_partition().to_string()));
                key.insert(sort_key.clone(), AttributeValue::S(hex));
            }
            (None, Some(prefix)) => {
                key.insert(self.partition_key.clone(), AttributeValue::S(format!("{prefix}#{hex}")));
            }
            (None, None) => {
                key.insert(self.partition_key.clone(), AttributeValue::S(hex));
            }
        }
        key
    }

    /// The storage key an item of this store holds, or `None` for an item that is not
    /// one of its records (another application's, in a shared table).
    pub(crate) fn storage_key_of(&self, item: &Item) -> Option<StorageKey> {
        let text = |name: &str| match item.get(name) {
            Some(AttributeValue::S(text)) => Some(text.as_str()),
            _ => None,
        };
        let hex = match (&self.sort_key, &self.prefix) {
            (Some(sort_key), _) => {
                if text(&self.partition_key)? != self.shared_partition() {
                    return None;
                }
                text(sort_key)?
            }
            (None, Some(prefix)) => text(&self.partition_key)?.strip_prefix(prefix.as_str())?.strip_prefix('#')?,
            (None, None) => text(&self.partition_key)?,
        };
        if !item.contains_key(STATE) {
            return None;
        }
        StorageKey::from_hex(hex)
    }

    /// The TTL attribute's value for a record expiring at `expires_at`: epoch seconds,
    /// rounded up, so DynamoDB never collects a record before every read calls it expired.
    pub(crate) fn ttl_value(&self, expires_at: SystemTime) -> AttributeValue {
        let since = expires_at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        let seconds = since.as_secs() + u64::from(since.subsec_nanos() > 0);
        AttributeValue::N(seconds.to_string())
    }
}

/// Epoch milliseconds as a number attribute.
pub(crate) fn millis(time: SystemTime) -> AttributeValue {
    AttributeValue::N(epoch_millis(time).to_string())
}

/// Epoch milliseconds of `time` (0 before the epoch).
pub(crate) fn epoch_millis(time: SystemTime) -> u64 {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// `now + duration`, refusing durations beyond what a record can live.
pub(crate) fn after(now: SystemTime, duration: Duration) -> Result<SystemTime, StoreError> {
    now.checked_add(duration)
        .filter(|t| epoch_millis(*t) < (1 << 52))
        .ok_or_else(|| StoreError::InvalidRequest(format!("duration {duration:?} is too long for the store")))
}

/// A binary attribute.
pub(crate) fn blob(bytes: impl Into<Vec<u8>>) -> AttributeValue {
    AttributeValue::B(Blob::new(bytes))
}

/// The size DynamoDB counts for an item: each attribute's name plus its value. Numbers
/// are counted as their text plus one byte, at least what DynamoDB counts (about one
/// byte per two digits, plus one).
pub(crate) fn item_size(item: &Item) -> usize {
    item.iter().map(|(name, value)| name.len() + value_size(value)).sum()
}

fn value_size(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(text) => text.len(),
        AttributeValue::N(number) => number.len() + 1,
        AttributeValue::B(blob) => blob.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::Ss(items) => items.iter().map(String::len).sum(),
        AttributeValue::Ns(items) => items.iter().map(|n| n.len() + 1).sum(),
        AttributeValue::Bs(items) => items.iter().map(|b| b.as_ref().len()).sum(),
        AttributeValue::L(items) => 3 + items.iter().map(|v| 1 + value_size(v)).sum::<usize>(),
        AttributeValue::M(items) => 3 + items.iter().map(|(k, v)| 1 + k.len() + value_size(v)).sum::<usize>(),
        _ => 0,
    }
}

fn corrupt(storage_key: &StorageKey, what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("record {storage_key}: {what}"))
}

/// The record an item holds.
pub(crate) fn record(storage_key: &StorageKey, item: &Item) -> Result<Record, StoreError> {
    let text = |name: &str| match item.get(name) {
        Some(AttributeValue::S(text)) => Ok(Some(text.clone())),
        None => Ok(None),
        Some(_) => Err(corrupt(storage_key, format_args!("attribute {name:?} is not a string"))),
    };
    let bytes = |name: &str| match item.get(name) {
        Some(AttributeValue::B(blob)) => Ok(Some(blob.as_ref().to_vec())),
        None => Ok(None),
        Some(_) => Err(corrupt(storage_key, format_args!("attribute {name:?} is not binary"))),
    };
    let number = |name: &str| match item.get(name) {
        Some(AttributeValue::N(number)) => number
            .parse::<i64>()
            .map(Some)
            .map_err(|_| corrupt(storage_key, format_args!("attribute {name:?} is not a whole number: {number:?}"))),
        None => Ok(None),
        Some(_) => Err(corrupt(storage_key, format_args!("attribute {name:?} is not a number"))),
    };
    let time = |name: &str| -> Result<Option<SystemTime>, StoreError> {
        match number(name)? {
            None => Ok(None),
            Some(ms) => u64::try_from(ms)
                .ok()
                .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
                .map(Some)
                .ok_or_else(|| corrupt(storage_key, format_args!("attribute {name:?} is not a time: {ms}"))),
        }
    };
    let missing = |name: &str| corrupt(storage_key, format_args!("no attribute {name:?}"));
    let state = match text(STATE)?.as_deref() {
        Some(IN_PROGRESS) => RecordStateKind::InProgress,
        Some(COMPLETED) => RecordStateKind::Completed,
        Some(other) => return Err(corrupt(storage_key, format_args!("unknown state {other:?}"))),
        None => return Err(missing(STATE)),
    };
    let claim_id = match (state, bytes(CLAIM_ID)?) {
        (RecordStateKind::InProgress, Some(id)) => Some(
            <[u8; 16]>::try_from(id.as_slice())
                .map(ClaimId::from_bytes)
                .map_err(|_| corrupt(storage_key, "claim id is not 16 bytes"))?,
        ),
        // A completed record keeps its holder's id, which the record rule ignores.
        _ => None,
    };
    Record::from_parts(RecordParts {
        storage_key: storage_key.as_bytes().to_vec(),
        key: text(KEY)?.ok_or_else(|| missing(KEY))?,
        scope: text(SCOPE)?.ok_or_else(|| missing(SCOPE))?,
        fingerprint: bytes(FINGERPRINT)?,
        created_at: time(CREATED_AT)?.ok_or_else(|| missing(CREATED_AT))?,
        expires_at: time(EXPIRES_AT)?.ok_or_else(|| missing(EXPIRES_AT))?,
        state: Some(state),
        claim_id,
        lease_until: time(LEASE_UNTIL)?,
        payload: bytes(PAYLOAD)?.map(Bytes::from),
        completed_at: time(COMPLETED_AT)?,
        hits: number(HITS)?,
    })
}

/// The claim id an item holds, whatever its state (a completed record keeps its holder's).
pub(crate) fn claim_id_of(item: &Item) -> Option<ClaimId> {
    match item.get(CLAIM_ID) {
        Some(AttributeValue::B(blob)) => <[u8; 16]>::try_from(blob.as_ref()).ok().map(ClaimId::from_bytes),
        _ => None,
    }
}

/// Whether an item is a completed record.
pub(crate) fn is_completed(item: &Item) -> bool {
    matches!(item.get(STATE), Some(AttributeValue::S(state)) if state == COMPLETED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(sort_key: Option<&str>, prefix: Option<&str>) -> Layout {
        Layout {
            partition_key: "id".into(),
            sort_key: sort_key.map(Into::into),
            prefix: prefix.map(Into::into),
            ttl: "ttl".into(),
        }
    }

    #[test]
    fn keys_are_laid_out_and_read_back() {
        let storage_key = StorageKey::derive_raw("s", "k");
        let hex = storage_key.to_hex();
        for (layout, pk, sk) in [
            (layout(None, None), hex.clone(), None),
            (layout(None, Some("pay")), format!("pay#{hex}"), None),
            (layout(Some("sk"), None), "oncely".to_string(), Some(hex.clone())),
            (layout(Some("sk"), Some("pay")), "pay".to_string(), Some(hex.clone())),
        ] {
            let mut item = layout.key(&storage_key);
            assert_eq!(item.get("id"), Some(&AttributeValue::S(pk)));
            assert_eq!(item.get("sk"), sk.map(AttributeValue::S).as_ref());
            assert_eq!(layout.storage_key_of(&item), None, "not a record without its state");
            item.insert(STATE.into(), AttributeValue::S(COMPLETED.into()));
            assert_eq!(layout.storage_key_of(&item), Some(storage_key));
        }
        let mut other = layout(None, Some("pay")).key(&storage_key);
        other.insert(STATE.into(), AttributeValue::S(COMPLETED.into()));
        assert_eq!(layout(None, Some("other")).storage_key_of(&other), None, "another prefix's item");
    }

    #[test]
    fn ttl_is_rounded_up_to_whole_seconds() {
        let layout = layout(None, None);
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_001);
        assert_eq!(layout.ttl_value(at), AttributeValue::N("1700000001".into()));
        assert_eq!(layout.ttl_value(UNIX_EPOCH + Duration::from_secs(5)), AttributeValue::N("5".into()));
    }

    #[test]
    fn malformed_items_are_corrupt_not_panics() {
        let key = StorageKey::derive_raw("s", "k");
        let base: Item = [
            (STATE, AttributeValue::S(IN_PROGRESS.into())),
            (CLAIM_ID, blob(vec![7; 16])),
            (LEASE_UNTIL, AttributeValue::N("1000".into())),
            (KEY, AttributeValue::S("k".into())),
            (SCOPE, AttributeValue::S("s".into())),
            (CREATED_AT, AttributeValue::N("1".into())),
            (EXPIRES_AT, AttributeValue::N("5000".into())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert!(record(&key, &base).is_ok());
        let broken = |name: &str, value: Option<AttributeValue>| {
            let mut item = base.clone();
            match value {
                Some(value) => item.insert(name.into(), value),
                None => item.remove(name),
            };
            item
        };
        for item in [
            broken(STATE, Some(AttributeValue::S("gone".into()))),
            broken(STATE, None),
            broken(CLAIM_ID, Some(blob(vec![1; 3]))),
            broken(LEASE_UNTIL, Some(AttributeValue::N("soon".into()))),
            broken(LEASE_UNTIL, Some(AttributeValue::N("-5".into()))),
            broken(EXPIRES_AT, Some(AttributeValue::S("1".into()))),
            broken(KEY, None),
            broken(FINGERPRINT, Some(blob(vec![1; 5]))),
            broken(STATE, Some(AttributeValue::S(COMPLETED.into()))),
        ] {
            assert!(matches!(record(&key, &item), Err(StoreError::Corrupt(_))), "{item:?}");
        }
    }

    #[test]
    fn sizes_count_names_and_values() {
        let item: Item = [
            ("ab".to_string(), AttributeValue::S("xyz".into())),
            ("p".to_string(), blob(vec![0; 10])),
            ("n".to_string(), AttributeValue::N("123".into())),
        ]
        .into_iter()
        .collect();
        assert_eq!(item_size(&item), 2 + 3 + 1 + 10 + 1 + 4);
        assert_eq!(MAX_PAYLOAD_BYTES, 405_504);
    }
}
