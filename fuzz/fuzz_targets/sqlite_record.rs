//! The SQLite store's codec: `read_record`, which turns a row of the records table into a
//! record. A database file can be damaged, edited by hand or written by another version,
//! so any column may hold any SQLite value (NULL, integer, real, text, blob, text that is
//! not UTF-8).
//!
//! Input: for each of the 12 columns a tag byte (value kind) and the value (8 bytes for
//! numbers; a length byte and bytes for text and blobs). Checks: no panic; a record that
//! decodes has the row's storage key, key, state and hit count.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use oncely::RecordState;
use rusqlite::types::Value;

const COLUMNS: usize = 12;

/// One column's value, and whether it is a blob to be read back as (maybe invalid) text.
fn column(data: &mut &[u8]) -> (Value, bool) {
    let Some((&tag, rest)) = data.split_first() else { return (Value::Null, false) };
    *data = rest;
    let mut take = |n: usize| {
        let n = n.min(data.len());
        let (taken, rest) = data.split_at(n);
        *data = rest;
        taken
    };
    let eight = |bytes: &[u8]| {
        let mut out = [0u8; 8];
        out[..bytes.len()].copy_from_slice(bytes);
        out
    };
    match tag % 6 {
        0 => (Value::Null, false),
        1 => (Value::Integer(i64::from_le_bytes(eight(take(8)))), false),
        2 => (Value::Real(f64::from_le_bytes(eight(take(8)))), false),
        3 => {
            let len = take(1).first().copied().unwrap_or(0) as usize;
            (Value::Text(String::from_utf8_lossy(take(len)).into_owned()), false)
        }
        4 => {
            let len = take(1).first().copied().unwrap_or(0) as usize;
            (Value::Blob(take(len).to_vec()), false)
        }
        _ => {
            let len = take(1).first().copied().unwrap_or(0) as usize;
            (Value::Blob(take(len).to_vec()), true)
        }
    }
}

thread_local! {
    static DB: RefCell<rusqlite::Connection> =
        RefCell::new(rusqlite::Connection::open_in_memory().expect("an in-memory database"));
}

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let columns: Vec<(Value, bool)> = (0..COLUMNS).map(|_| column(&mut input)).collect();
    // `SELECT ?1, CAST(?2 AS TEXT), …`: a row holding exactly these values.
    let select: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, (_, as_text))| if *as_text { format!("CAST(?{} AS TEXT)", i + 1) } else { format!("?{}", i + 1) })
        .collect();
    let sql = format!("SELECT {}", select.join(", "));
    let values: Vec<Value> = columns.into_iter().map(|(v, _)| v).collect();

    DB.with(|db| {
        let db = db.borrow();
        let mut statement = db.prepare_cached(&sql).expect("a valid SELECT");
        let decoded = statement
            .query_row(rusqlite::params_from_iter(values.iter()), |row| Ok(oncely_sqlite::fuzz_read_record(row)))
            .expect("one row");
        let Ok(record) = decoded else { return };
        let bytes = |value: &Value| match value {
            Value::Text(text) => Some(text.as_bytes().to_vec()),
            Value::Blob(blob) => Some(blob.clone()),
            _ => None,
        };
        assert_eq!(bytes(&values[0]).as_deref(), Some(&record.storage_key.as_bytes()[..]), "storage key");
        assert_eq!(bytes(&values[1]).as_deref(), Some(record.key.as_str().as_bytes()), "key");
        match (&record.state, &values[6], &values[11]) {
            (RecordState::InProgress { .. }, Value::Integer(0), _) => {}
            (RecordState::Completed { hits, .. }, Value::Integer(1), Value::Integer(stored)) => {
                assert_eq!(*hits as i64, *stored, "hits");
            }
            (state, stored, _) => panic!("state column {stored:?} decoded as {state:?}"),
        }
    });
});
