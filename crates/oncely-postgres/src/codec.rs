//! Rows to records, and durations and claim ids to parameters.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use oncely::record::RecordParts;
use oncely::{ClaimId, Record, StoreError};
use sqlx_core::row::Row;
use sqlx_postgres::PgRow;
use uuid::Uuid;

use crate::error::pg_error;

/// The longest lease, retention or window accepted: 1,000 years. Longer ones are
/// [`StoreError::InvalidRequest`] (PostgreSQL's timestamps end in the year 294276, and
/// durations are sent as `float8` microseconds, exact to 285 years and within 64 µs to
/// 1,000).
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(1000 * 365 * 24 * 3600);

/// `duration` in whole microseconds, rounded up (so a lease is never shorter than asked),
/// as the `float8` the statements take.
pub(crate) fn micros(duration: Duration) -> Result<f64, StoreError> {
    if duration > MAX_DURATION {
        return Err(StoreError::InvalidRequest(format!("{duration:?} from now overflows the clock")));
    }
    // At most 3.2e16: exact in u64, and within float8's precision as documented above.
    let us = duration.as_nanos().div_ceil(1_000);
    Ok(us as f64)
}

/// A claim id as the `uuid` it is stored as.
pub(crate) fn uuid(claim_id: ClaimId) -> Uuid {
    Uuid::from_u128(claim_id.as_u128())
}

/// Microseconds since the epoch back as a `SystemTime`.
pub(crate) fn to_time(micros: i64) -> Result<SystemTime, StoreError> {
    u64::try_from(micros)
        .ok()
        .and_then(|micros| UNIX_EPOCH.checked_add(Duration::from_micros(micros)))
        .ok_or_else(|| StoreError::Corrupt(format!("a stored time of {micros} µs since the epoch is out of range")))
}

fn column<'r, T>(row: &'r PgRow, index: usize) -> Result<T, StoreError>
where
    T: sqlx_core::decode::Decode<'r, sqlx_postgres::Postgres> + sqlx_core::types::Type<sqlx_postgres::Postgres>,
{
    row.try_get(index).map_err(pg_error)
}

/// Reads a record from a row of `sql::record_columns`; also returns its `attempt`. The
/// table keeps no state marker: [`Record::from_parts`] tells the state from the columns,
/// as the table's `CHECK` ties them.
pub(crate) fn read_record(row: &PgRow) -> Result<(Record, i32), StoreError> {
    let optional_time = |index| column::<Option<i64>>(row, index)?.map(to_time).transpose();
    let record = Record::from_parts(RecordParts {
        storage_key: column(row, 0)?,
        key: column(row, 1)?,
        scope: column(row, 2)?,
        fingerprint: column(row, 3)?,
        created_at: to_time(column(row, 4)?)?,
        expires_at: to_time(column(row, 5)?)?,
        state: None,
        claim_id: column::<Option<Uuid>>(row, 6)?.map(|id| ClaimId::from_u128(id.as_u128())),
        lease_until: optional_time(7)?,
        payload: column::<Option<Vec<u8>>>(row, 8)?.map(Bytes::from),
        completed_at: optional_time(9)?,
        hits: Some(column(row, 10)?),
    })?;
    Ok((record, column(row, 11)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_up_to_whole_microseconds() {
        assert_eq!(micros(Duration::from_nanos(1)).ok(), Some(1.0));
        assert_eq!(micros(Duration::from_millis(400)).ok(), Some(400_000.0));
        assert_eq!(micros(Duration::ZERO).ok(), Some(0.0));
        assert!(micros(MAX_DURATION).is_ok());
        assert!(matches!(micros(Duration::MAX), Err(StoreError::InvalidRequest(_))));
    }

    #[test]
    fn times_round_trip_and_negative_ones_are_corrupt() {
        let time = to_time(1_700_000_000_123_456).expect("in range");
        assert_eq!(time.duration_since(UNIX_EPOCH).map(|d| d.as_micros()).ok(), Some(1_700_000_000_123_456));
        assert!(matches!(to_time(-1), Err(StoreError::Corrupt(_))));
    }
}
