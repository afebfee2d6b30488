//! Turning script replies back into claim outcomes and [`Record`]s. Everything here reads bytes a server sent,
//! so every malformed reply is a [`StoreError::Corrupt`], never a panic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use oncely::record::{RecordParts, RecordStateKind};
use oncely::store::Replay;
use oncely::{ClaimId, ClaimOutcome, Record, StorageKey, StoreError};
use redis::Value;

/// Milliseconds for a script argument; durations beyond what a record can live are refused.
pub(crate) fn millis(duration: Duration) -> Result<u64, StoreError> {
    u64::try_from(duration.as_millis())
        .ok()
        .filter(|ms| *ms < (1 << 52))
        .ok_or_else(|| StoreError::InvalidRequest(format!("duration {duration:?} is too long for the store")))
}

fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt(what.into())
}

fn bytes_of(value: Value) -> Result<Vec<u8>, StoreError> {
    match value {
        Value::BulkString(bytes) => Ok(bytes),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(n) => Ok(n.to_string().into_bytes()),
        other => Err(corrupt(format!("expected a string in the reply, got {other:?}"))),
    }
}

/// A script's integer answer (1/0).
pub(crate) fn flag(value: Value) -> Result<bool, StoreError> {
    match value {
        Value::Int(n) => Ok(n == 1),
        other => Err(corrupt(format!("expected 0 or 1 from the script, got {other:?}"))),
    }
}

/// The elements of an array reply.
pub(crate) fn array(value: Value) -> Result<Vec<Value>, StoreError> {
    match value {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(corrupt(format!("expected an array from the script, got {other:?}"))),
    }
}

/// The claim script's reply: a one-letter verdict, then what the outcome carries (a
/// replay's payload, completion time, hits and expiry; an in-progress record's lease end).
pub(crate) fn claim_outcome(storage_key: &StorageKey, value: Value) -> Result<ClaimOutcome, StoreError> {
    let mut items = array(value)?.into_iter();
    let verdict = items.next().map(bytes_of).transpose()?.ok_or_else(|| corrupt("empty claim reply"))?;
    let mut field = |name: &str| {
        items.next().map(bytes_of).transpose()?.ok_or_else(|| corrupt(format!("record {storage_key}: no {name}")))
    };
    Ok(match verdict.as_slice() {
        b"a" => ClaimOutcome::Acquired { takeover: false },
        b"t" => ClaimOutcome::Acquired { takeover: true },
        b"c" => {
            let payload = Bytes::from(field("payload")?);
            let completed_at = time(&field("completion time")?)?;
            let hits = signed(&field("hit count")?)?;
            let hits = u64::try_from(hits).map_err(|_| corrupt(format!("record {storage_key}: hit count {hits}")))?;
            let expires_at = time(&field("expiry")?)?;
            ClaimOutcome::Replay(Replay { payload, completed_at, hits, expires_at })
        }
        b"i" => ClaimOutcome::InProgress { lease_until: time(&field("lease end")?)? },
        b"m" => ClaimOutcome::Mismatch,
        other => return Err(corrupt(format!("unknown claim verdict {:?}", String::from_utf8_lossy(other)))),
    })
}

/// The get script's reply: the record's fields, or none for an absent or expired record.
pub(crate) fn found_record(storage_key: &StorageKey, value: Value) -> Result<Option<Record>, StoreError> {
    let fields = array(value)?;
    if fields.is_empty() { Ok(None) } else { record(storage_key, fields).map(Some) }
}

/// A record from `HGETALL`'s flat field/value list.
pub(crate) fn record(storage_key: &StorageKey, fields: Vec<Value>) -> Result<Record, StoreError> {
    let mut f = Fields::default();
    let mut items = fields.into_iter();
    while let (Some(name), Some(value)) = (items.next(), items.next()) {
        let value = bytes_of(value)?;
        match bytes_of(name)?.as_slice() {
            b"s" => f.state = Some(value),
            b"c" => f.claim = Some(value),
            b"l" => f.lease_until = Some(time(&value)?),
            b"f" => f.fingerprint = Some(value),
            b"k" => f.key = Some(value),
            b"o" => f.scope = Some(value),
            b"t" => f.created_at = Some(time(&value)?),
            b"e" => f.expires_at = Some(time(&value)?),
            b"p" => f.payload = Some(value),
            b"d" => f.completed_at = Some(time(&value)?),
            b"h" => f.hits = Some(signed(&value)?),
            _ => {}
        }
    }
    let missing = |field: &str| corrupt(format!("record {storage_key} has no field {field:?}"));
    let text = |bytes: Vec<u8>, field: &str| {
        String::from_utf8(bytes).map_err(|_| corrupt(format!("record {storage_key}: field {field:?} is not UTF-8")))
    };
    let state = match f.state.ok_or_else(|| missing("s"))?.as_slice() {
        b"p" => RecordStateKind::InProgress,
        b"c" => RecordStateKind::Completed,
        _ => return Err(corrupt(format!("record {storage_key} has an unknown state"))),
    };
    let claim_id = f
        .claim
        .map(|claim| {
            <[u8; 16]>::try_from(claim)
                .map(ClaimId::from_bytes)
                .map_err(|_| corrupt(format!("record {storage_key}: claim id is not 16 bytes")))
        })
        .transpose();
    Record::from_parts(RecordParts {
        storage_key: storage_key.as_bytes().to_vec(),
        key: text(f.key.ok_or_else(|| missing("k"))?, "k")?,
        scope: text(f.scope.ok_or_else(|| missing("o"))?, "o")?,
        // An empty `f`: the request had no fingerprint.
        fingerprint: Some(f.fingerprint.ok_or_else(|| missing("f"))?).filter(|bytes| !bytes.is_empty()),
        created_at: f.created_at.ok_or_else(|| missing("t"))?,
        expires_at: f.expires_at.ok_or_else(|| missing("e"))?,
        state: Some(state),
        // A completed record keeps its claim id, which the rule ignores; only a holder's
        // must be a claim id.
        claim_id: match state {
            RecordStateKind::InProgress => claim_id?,
            RecordStateKind::Completed => None,
        },
        lease_until: f.lease_until,
        payload: f.payload.map(Bytes::from),
        completed_at: f.completed_at,
        hits: f.hits,
    })
}

#[derive(Default)]
struct Fields {
    state: Option<Vec<u8>>,
    claim: Option<Vec<u8>>,
    lease_until: Option<SystemTime>,
    fingerprint: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    scope: Option<Vec<u8>>,
    created_at: Option<SystemTime>,
    expires_at: Option<SystemTime>,
    payload: Option<Vec<u8>>,
    completed_at: Option<SystemTime>,
    hits: Option<i64>,
}

fn number(bytes: &[u8]) -> Result<u64, StoreError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt(format!("expected a number, got {:?}", String::from_utf8_lossy(bytes))))
}

/// A hit count: `HINCRBY` keeps it a signed 64-bit number; the record rule refuses a
/// negative one.
fn signed(bytes: &[u8]) -> Result<i64, StoreError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt(format!("expected a number, got {:?}", String::from_utf8_lossy(bytes))))
}

fn time(bytes: &[u8]) -> Result<SystemTime, StoreError> {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(number(bytes)?))
        .ok_or_else(|| corrupt("a time beyond the clock's range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    #[test]
    fn malformed_replies_are_corrupt_not_panics() {
        let key = StorageKey::derive_raw("s", "k");
        for reply in [
            Value::Int(3),
            Value::Array(vec![]),
            Value::Array(vec![bulk(b"x")]),
            Value::Array(vec![bulk(b"c")]),
            Value::Array(vec![bulk(b"c"), bulk(b"r"), bulk(b"17")]),
            Value::Array(vec![bulk(b"c"), bulk(b"r"), bulk(b"17"), bulk(b"-1")]),
            Value::Array(vec![bulk(b"c"), Value::Nil, bulk(b"17"), bulk(b"0")]),
            Value::Array(vec![bulk(b"i"), bulk(b"soon")]),
            Value::Array(vec![bulk(b"i")]),
        ] {
            assert!(matches!(claim_outcome(&key, reply.clone()), Err(StoreError::Corrupt(_))), "{reply:?}");
        }
        for reply in [
            Value::Int(3),
            Value::Array(vec![bulk(b"s"), bulk(b"c"), bulk(b"k"), bulk(b"\xff")]),
            Value::Array(vec![bulk(b"s"), bulk(b"p"), bulk(b"l"), bulk(b"soon")]),
        ] {
            assert!(matches!(found_record(&key, reply.clone()), Err(StoreError::Corrupt(_))), "{reply:?}");
        }
    }

    #[test]
    fn claim_replies_decode_to_their_outcomes() {
        let key = StorageKey::derive_raw("s", "k");
        let reply = |items: &[&[u8]]| Value::Array(items.iter().map(|item| bulk(item)).collect());
        let at = |ms| UNIX_EPOCH + Duration::from_millis(ms);
        assert_eq!(claim_outcome(&key, reply(&[b"a"])).ok(), Some(ClaimOutcome::Acquired { takeover: false }));
        assert_eq!(claim_outcome(&key, reply(&[b"t"])).ok(), Some(ClaimOutcome::Acquired { takeover: true }));
        assert_eq!(claim_outcome(&key, reply(&[b"m"])).ok(), Some(ClaimOutcome::Mismatch));
        assert_eq!(
            claim_outcome(&key, reply(&[b"i", b"1700000000123"])).ok(),
            Some(ClaimOutcome::InProgress { lease_until: at(1_700_000_000_123) })
        );
        let replay =
            Replay { payload: Bytes::from_static(b"\x00r"), completed_at: at(42), hits: 7, expires_at: at(86_400_042) };
        let completed = reply(&[b"c", b"\x00r", b"42", b"7", b"86400042"]);
        assert_eq!(claim_outcome(&key, completed).ok(), Some(ClaimOutcome::Replay(replay)));
        // A reply without the expiry (a script of another version) is refused, not guessed.
        assert!(claim_outcome(&key, reply(&[b"c", b"\x00r", b"42", b"7"])).is_err());
        assert_eq!(found_record(&key, Value::Array(vec![])).ok(), Some(None));
    }

    #[test]
    fn durations_beyond_the_store_are_refused() {
        assert_eq!(millis(Duration::from_secs(2)).ok(), Some(2000));
        assert!(matches!(millis(Duration::MAX), Err(StoreError::InvalidRequest(_))));
    }
}
