//! The table: checking its key schema at open, and creating it with its TTL attribute
//! enabled (`oncely dynamodb create-table`).

use std::time::Duration;

use aws_sdk_dynamodb::operation::create_table::CreateTableError;
use aws_sdk_dynamodb::operation::describe_table::DescribeTableError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableDescription, TableStatus,
    TimeToLiveSpecification, TimeToLiveStatus,
};
use oncely::StoreError;

use crate::error::store_error;
use crate::{DynamoDbOptions, DynamoDbStore, OpenError};

/// How long `create_table` waits for a new table to become active.
const ACTIVE_WITHIN: Duration = Duration::from_secs(300);

/// What [`DynamoDbStore::create_table`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TableCreated {
    /// The table was created, and its TTL attribute enabled.
    Created,
    /// The table existed with the right key schema; its TTL attribute was enabled now.
    TtlEnabled,
    /// The table existed with the right key schema and TTL attribute: nothing changed.
    AlreadyThere,
}

impl DynamoDbStore {
    /// Creates the store's table (on-demand capacity, the key schema the options
    /// describe) and enables its TTL attribute, then opens the store on it. A table that
    /// already exists with the right key schema is fine: its TTL attribute is enabled if
    /// it is not yet.
    ///
    /// # Errors
    /// [`OpenError::WrongTable`] for an existing table of another key schema, or whose
    /// TTL is enabled on another attribute; [`OpenError::Connect`] when DynamoDB cannot be
    /// reached or refuses (the role needs `dynamodb:CreateTable`, `DescribeTable`,
    /// `DescribeTimeToLive` and `UpdateTimeToLive`).
    pub async fn create_table(options: DynamoDbOptions) -> Result<(DynamoDbStore, TableCreated), OpenError> {
        let store = Self::client_only(options).await?;
        let layout = &store.layout;
        let mut key_schema = vec![key_element(&layout.partition_key, KeyType::Hash)?];
        let mut definitions = vec![definition(&layout.partition_key)?];
        if let Some(sort_key) = &layout.sort_key {
            key_schema.push(key_element(sort_key, KeyType::Range)?);
            definitions.push(definition(sort_key)?);
        }
        let created = store
            .client
            .create_table()
            .table_name(&*store.table)
            .set_key_schema(Some(key_schema))
            .set_attribute_definitions(Some(definitions))
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        let new = match created {
            Ok(_) => true,
            Err(error) if matches!(error.as_service_error(), Some(CreateTableError::ResourceInUseException(_))) => {
                false
            }
            Err(error) => return Err(OpenError::Connect(store_error(error))),
        };
        let deadline = tokio::time::Instant::now() + ACTIVE_WITHIN;
        loop {
            let table = describe(&store).await?;
            shape(&store, &table)?;
            if table.table_status() == Some(&TableStatus::Active) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(OpenError::Connect(StoreError::unavailable(format!(
                    "table {:?} did not become active within {ACTIVE_WITHIN:?}",
                    store.table
                ))));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let ttl = store
            .client
            .describe_time_to_live()
            .table_name(&*store.table)
            .send()
            .await
            .map_err(|e| OpenError::Connect(store_error(e)))?;
        let description = ttl.time_to_live_description();
        let status = description.and_then(|d| d.time_to_live_status());
        let attribute = description.and_then(|d| d.attribute_name());
        let enabled = matches!(status, Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling));
        if enabled {
            if attribute != Some(layout.ttl.as_str()) {
                return Err(OpenError::WrongTable {
                    table: store.table.to_string(),
                    why: format!(
                        "its TTL attribute is {:?}, not {:?}: a table has one, so pass ttl_attribute={}",
                        attribute.unwrap_or_default(),
                        layout.ttl,
                        attribute.unwrap_or_default()
                    ),
                });
            }
            let outcome = if new { TableCreated::Created } else { TableCreated::AlreadyThere };
            return Ok((store, outcome));
        }
        let specification = TimeToLiveSpecification::builder()
            .enabled(true)
            .attribute_name(&layout.ttl)
            .build()
            .map_err(|e| OpenError::InvalidUrl(e.to_string()))?;
        store
            .client
            .update_time_to_live()
            .table_name(&*store.table)
            .time_to_live_specification(specification)
            .send()
            .await
            .map_err(|e| OpenError::Connect(store_error(e)))?;
        Ok((store, if new { TableCreated::Created } else { TableCreated::TtlEnabled }))
    }
}

fn key_element(name: &str, kind: KeyType) -> Result<KeySchemaElement, OpenError> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .map_err(|e| OpenError::InvalidUrl(e.to_string()))
}

fn definition(name: &str) -> Result<AttributeDefinition, OpenError> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .map_err(|e| OpenError::InvalidUrl(e.to_string()))
}

async fn describe(store: &DynamoDbStore) -> Result<TableDescription, OpenError> {
    let described = store.client.describe_table().table_name(&*store.table).send().await;
    match described {
        Ok(output) => output.table.ok_or_else(|| OpenError::NoTable(store.table.to_string())),
        Err(error) if matches!(error.as_service_error(), Some(DescribeTableError::ResourceNotFoundException(_))) => {
            Err(OpenError::NoTable(store.table.to_string()))
        }
        Err(error) => Err(OpenError::Connect(store_error(error))),
    }
}

/// Checks that the table exists with the key schema the options describe.
pub(crate) async fn check(store: &DynamoDbStore) -> Result<(), OpenError> {
    shape(store, &describe(store).await?)
}

/// Whether the table's key schema is the store's: the partition key (and the sort key,
/// if any) as string attributes, and no other key.
fn shape(store: &DynamoDbStore, table: &TableDescription) -> Result<(), OpenError> {
    let layout = &store.layout;
    let wrong = |why: String| OpenError::WrongTable { table: store.table.to_string(), why };
    let keys: Vec<(&str, &KeyType)> = table.key_schema().iter().map(|k| (k.attribute_name(), k.key_type())).collect();
    let mut expected = vec![(layout.partition_key.as_str(), &KeyType::Hash)];
    if let Some(sort_key) = &layout.sort_key {
        expected.push((sort_key.as_str(), &KeyType::Range));
    }
    if keys != expected {
        let shown = |keys: &[(&str, &KeyType)]| {
            keys.iter().map(|(name, kind)| format!("{name} ({})", kind.as_str())).collect::<Vec<_>>().join(", ")
        };
        return Err(wrong(format!(
            "its key is {}, the store's is {} (set partition_key= and sort_key= to match)",
            shown(&keys),
            shown(&expected)
        )));
    }
    for (name, _) in &expected {
        let kind =
            table.attribute_definitions().iter().find(|d| d.attribute_name() == *name).map(|d| d.attribute_type());
        if kind != Some(&ScalarAttributeType::S) {
            return Err(wrong(format!("its key attribute {name:?} is not a string (S)")));
        }
    }
    Ok(())
}

/// Whether an error is DynamoDB's `AccessDeniedException` (a role without
/// `dynamodb:DescribeTable`).
pub(crate) fn is_access_denied(error: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    use aws_sdk_dynamodb::error::ProvideErrorMetadata;
    type Described =
        aws_sdk_dynamodb::error::SdkError<DescribeTableError, aws_sdk_dynamodb::config::http::HttpResponse>;
    error
        .source()
        .and_then(|source| source.downcast_ref::<Described>())
        .is_some_and(|e| e.code() == Some("AccessDeniedException"))
}
