//! Administration: reads, deletes, and the calls that scan the table (`stats`, `list`,
//! `purge_expired`). A scan reads every item of the table (on a table with a sort key, a
//! query reads every item of the records' partition): admin tools' calls, never the
//! request path's.

use std::time::SystemTime;

use aws_sdk_dynamodb::operation::delete_item::DeleteItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use oncely::{Record, StorageKey, StoreAdmin, StoreError, StoreStats};

use crate::DynamoDbStore;
use crate::codec::{self, EXPIRES_AT, Item, millis};
use crate::error::store_error;

impl DynamoDbStore {
    /// Every record of the store as `(storage key, item)`, one strongly consistent page
    /// after another: a `Scan` of the table, or on a table with a sort key a `Query` of
    /// the records' partition. Items that are not the store's records are skipped.
    pub(crate) async fn all_items(&self) -> Result<Vec<(StorageKey, Item)>, StoreError> {
        let mut found = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let (items, next) = match &self.layout.sort_key {
                None => {
                    let page = self
                        .client
                        .scan()
                        .table_name(&*self.table)
                        .consistent_read(true)
                        .set_exclusive_start_key(start.take())
                        .send()
                        .await
                        .map_err(store_error)?;
                    (page.items, page.last_evaluated_key)
                }
                Some(_) => {
                    let page = self
                        .client
                        .query()
                        .table_name(&*self.table)
                        .consistent_read(true)
                        .key_condition_expression("#pk = :partition")
                        .expression_attribute_names("#pk", &self.layout.partition_key)
                        .expression_attribute_values(
                            ":partition",
                            AttributeValue::S(self.layout.shared_partition().to_string()),
                        )
                        .set_exclusive_start_key(start.take())
                        .send()
                        .await
                        .map_err(store_error)?;
                    (page.items, page.last_evaluated_key)
                }
            };
            for item in items.unwrap_or_default() {
                if let Some(key) = self.layout.storage_key_of(&item) {
                    found.push((key, item));
                }
            }
            match next {
                Some(next) if !next.is_empty() => start = Some(next),
                _ => return Ok(found),
            }
        }
    }

    /// Every unexpired record, decoded.
    async fn live_records(&self) -> Result<Vec<Record>, StoreError> {
        let now = SystemTime::now();
        let mut records = Vec::new();
        for (key, item) in self.all_items().await? {
            let record = codec::record(&key, &item)?;
            if !record.is_expired(now) {
                records.push(record);
            }
        }
        Ok(records)
    }
}

impl StoreAdmin for DynamoDbStore {
    /// One strongly consistent `GetItem`; an expired record is absent.
    async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        let Some(item) = self.read(key).await? else { return Ok(None) };
        let record = codec::record(key, &item)?;
        Ok(Some(record).filter(|record| !record.is_expired(SystemTime::now())))
    }

    /// One `DeleteItem`, whatever the state; the old item (`ReturnValues = ALL_OLD`) says
    /// whether there was an unexpired record.
    async fn delete(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let output = self
            .client
            .delete_item()
            .table_name(&*self.table)
            .set_key(Some(self.layout.key(key)))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(store_error)?;
        let Some(old) = output.attributes.filter(|old| !old.is_empty()) else { return Ok(false) };
        let expired = codec::record(key, &old).map(|record| record.is_expired(SystemTime::now()));
        Ok(matches!(expired, Ok(false)))
    }

    /// Scans for expired records and deletes each with a `DeleteItem` conditional on it
    /// still being expired (a record claimed anew in between is left alone). DynamoDB's
    /// TTL deletes them too, at no cost but up to days late; every read already treats
    /// them as absent, so calling this is optional.
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        let now = SystemTime::now();
        let mut purged = 0;
        for (key, item) in self.all_items().await? {
            let expired = codec::record(&key, &item).map(|record| record.is_expired(now)).unwrap_or(false);
            if !expired {
                continue;
            }
            let deleted = self
                .client
                .delete_item()
                .table_name(&*self.table)
                .set_key(Some(self.layout.key(&key)))
                .condition_expression("#expires_at <= :now")
                .expression_attribute_names("#expires_at", EXPIRES_AT)
                .expression_attribute_values(":now", millis(now))
                .send()
                .await;
            match deleted {
                Ok(_) => purged += 1,
                Err(error)
                    if matches!(
                        error.as_service_error(),
                        Some(DeleteItemError::ConditionalCheckFailedException(_))
                    ) => {}
                Err(error) => return Err(store_error(error)),
            }
        }
        Ok(purged)
    }

    /// A scan: reads every item (see the module docs).
    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let records = self.live_records().await?;
        let completed = records.iter().filter(|record| record.is_completed()).count() as u64;
        let total = records.len() as u64;
        Ok(StoreStats { records: total, in_progress: total - completed, completed })
    }

    /// One eventually consistent `GetItem` of a key no record has: never a scan.
    async fn ping(&self) -> Result<(), StoreError> {
        self.client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(self.layout.key(&StorageKey::from_bytes([0; 32]))))
            .send()
            .await
            .map(drop)
            .map_err(store_error)
    }

    /// A scan, sorted by storage key: reads every item for each page (see the module
    /// docs).
    async fn list(&self, after: Option<StorageKey>, limit: usize) -> Result<Vec<Record>, StoreError> {
        let mut records = self.live_records().await?;
        records.retain(|record| after.is_none_or(|after| record.storage_key > after));
        records.sort_by_key(|record| record.storage_key);
        records.truncate(limit);
        Ok(records)
    }
}
