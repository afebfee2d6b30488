//! Conversions: records to and from rows, times to and from milliseconds, SQLite errors to
//! store errors.
//!
//! # Time
//!
//! Every time in the database is an `INTEGER` of milliseconds since the Unix epoch, read
//! from the process's wall clock (`SystemTime::now()`) once per store call, by the thread
//! that runs the call. Durations are rounded *up* to whole milliseconds, so a lease or a
//! retention is never shorter than asked. Several processes sharing one file must keep
//! their clocks in step (NTP): a process whose clock runs ahead sees leases lapse early.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use oncely::record::{RecordParts, RecordStateKind};
use oncely::{ClaimId, Record, StoreError};
use rusqlite::{ErrorCode, Row};

/// Milliseconds since the Unix epoch, as stored.
pub(crate) type Millis = i64;

/// `records.state` of a record held by a claim.
pub(crate) const IN_PROGRESS: i64 = 0;
/// `records.state` of a record holding a result.
pub(crate) const COMPLETED: i64 = 1;

/// The columns [`read_record`] expects, in its order, for a `SELECT … FROM records`: the
/// hit count is [`total_hits!`].
macro_rules! record_columns {
    () => {
        concat!(
            "storage_key, key, scope, fingerprint, created_at, expires_at, state, claim_id, lease_until, payload, \
             completed_at, ",
            $crate::codec::total_hits!()
        )
    };
}
pub(crate) use record_columns;

/// A record's hit count, as SQL over a row of `records` in a `SELECT … FROM records`: its
/// own `hits` plus its `hit_counts` row's, if any (schema version 4, see
/// `schema::MIGRATIONS`), saturating at `i64::MAX` as the flush does: the writer never
/// stores a negative count (`hit_counts` checks it), so `i64::MAX - c.hits` cannot
/// overflow and the sum is at most `i64::MAX`, where a plain sum could turn into a float.
macro_rules! total_hits {
    () => {
        "coalesce((SELECT min(records.hits, 9223372036854775807 - c.hits) + c.hits FROM hit_counts AS c \
                   WHERE c.storage_key = records.storage_key), records.hits)"
    };
}
pub(crate) use total_hits;

/// The process clock now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> Result<Millis, StoreError> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|since| i64::try_from(since.as_millis()).ok())
        .ok_or_else(|| StoreError::unavailable("the system clock reads before the Unix epoch or past year 292 million"))
}

/// `now` plus `duration` rounded up to whole milliseconds;
/// [`StoreError::InvalidRequest`] when that overflows.
pub(crate) fn after(now: Millis, duration: Duration) -> Result<Millis, StoreError> {
    i64::try_from(duration.as_nanos().div_ceil(1_000_000))
        .ok()
        .and_then(|millis| now.checked_add(millis))
        .ok_or_else(|| StoreError::InvalidRequest(format!("{duration:?} from now overflows the clock")))
}

/// A stored time back as a `SystemTime`.
pub(crate) fn to_time(millis: Millis) -> Result<SystemTime, StoreError> {
    u64::try_from(millis)
        .ok()
        .and_then(|millis| UNIX_EPOCH.checked_add(Duration::from_millis(millis)))
        .ok_or_else(|| StoreError::Corrupt(format!("a stored time of {millis} ms since the epoch is out of range")))
}

/// Reads a record from a row of [`record_columns!`]; whether the columns make a valid
/// record is [`Record::from_parts`]'s rule.
pub(crate) fn read_record(row: &Row<'_>) -> Result<Record, StoreError> {
    fn column<T: rusqlite::types::FromSql>(row: &Row<'_>, index: usize) -> Result<T, StoreError> {
        row.get(index).map_err(sqlite_error)
    }
    let time = |index| column(row, index).and_then(to_time);
    let optional_time = |index| column::<Option<Millis>>(row, index)?.map(to_time).transpose();
    let state = match column(row, 6)? {
        IN_PROGRESS => RecordStateKind::InProgress,
        COMPLETED => RecordStateKind::Completed,
        state => return Err(StoreError::Corrupt(format!("a record in the unknown state {state}"))),
    };
    Record::from_parts(RecordParts {
        storage_key: column(row, 0)?,
        key: column(row, 1)?,
        scope: column(row, 2)?,
        fingerprint: column(row, 3)?,
        created_at: time(4)?,
        expires_at: time(5)?,
        state: Some(state),
        claim_id: column::<Option<[u8; 16]>>(row, 7)?.map(ClaimId::from_bytes),
        lease_until: optional_time(8)?,
        payload: column::<Option<Vec<u8>>>(row, 9)?.map(Bytes::from),
        completed_at: optional_time(10)?,
        hits: Some(column(row, 11)?),
    })
}

/// Maps a SQLite error to a store error: data this version cannot read is
/// [`StoreError::Corrupt`]; everything else (I/O, a full disk, a lock held too long by
/// another process) is [`StoreError::Unavailable`].
pub(crate) fn sqlite_error(error: rusqlite::Error) -> StoreError {
    let corrupt = matches!(
        error,
        rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
    ) || matches!(error.sqlite_error_code(), Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase));
    if corrupt { StoreError::Corrupt(error.to_string()) } else { StoreError::Unavailable(Box::new(error)) }
}

/// A copy of `error` for another caller (store errors are not `Clone`): one failed
/// transaction answers every request in it.
pub(crate) fn copy_error(error: &StoreError) -> StoreError {
    match error {
        StoreError::LeaseLost => StoreError::LeaseLost,
        StoreError::Capacity { bound, limit } => StoreError::Capacity { bound: *bound, limit: *limit },
        StoreError::Corrupt(message) => StoreError::Corrupt(message.clone()),
        StoreError::InvalidRequest(message) => StoreError::InvalidRequest(message.clone()),
        StoreError::Unsupported(message) => StoreError::Unsupported(message.clone()),
        StoreError::Timeout(source) => StoreError::timeout(source.to_string()),
        other => StoreError::unavailable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_up_to_whole_milliseconds() {
        assert_eq!(after(1_000, Duration::from_micros(1)).ok(), Some(1_001));
        assert_eq!(after(1_000, Duration::from_millis(400)).ok(), Some(1_400));
        assert_eq!(after(1_000, Duration::ZERO).ok(), Some(1_000));
        assert!(matches!(after(1_000, Duration::MAX), Err(StoreError::InvalidRequest(_))));
        assert!(matches!(after(i64::MAX - 1, Duration::from_millis(2)), Err(StoreError::InvalidRequest(_))));
    }

    #[test]
    fn times_round_trip_and_negative_ones_are_corrupt() {
        let now = now_ms().expect("a sane clock");
        let time = to_time(now).expect("in range");
        assert_eq!(time.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).ok(), Some(now));
        assert!(matches!(to_time(-1), Err(StoreError::Corrupt(_))));
    }
}
