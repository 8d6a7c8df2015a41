//! [`DynamoLeaseStore`]: the [`LeaseStore`] seam over `aws-sdk-dynamodb` (feature `aws`).
//!
//! The table uses the Java KCL 2.x schema (see [`crate::lease::item`]): HASH key `leaseKey`
//! (S), on-demand billing, one item per shard. Every write is a single conditional
//! `PutItem`/`UpdateItem`/`DeleteItem` fenced by `leaseCounter` (and `leaseOwner` where the
//! protocol says so); no transactions, no TTL and no `ReturnValues` are needed, so the store
//! also runs against DynamoDB-compatible servers such as dynalite and moto.
//!
//! | operation          | condition (besides `leaseCounter = :seen`, except for create)  | update                                                                       |
//! |--------------------|----------------------------------------------------------------|------------------------------------------------------------------------------|
//! | `create_if_absent` | `attribute_not_exists(leaseKey)`                               | the whole item (`PutItem`)                                                   |
//! | `renew`            | `leaseOwner = :me`                                             | `SET leaseCounter = :next`                                                   |
//! | `take`             | —                                                              | `SET leaseOwner, leaseCounter, ownerSwitchesSinceCheckpoint REMOVE checkpointOwner` |
//! | `checkpoint`       | `(leaseOwner = :me OR checkpointOwner = :me)`                  | `SET checkpoint, checkpointSubSequenceNumber, leaseCounter, ownerSwitchesSinceCheckpoint = 0 [, childShardIds] REMOVE pendingCheckpoint*` |
//! | `set_pending_checkpoint` | `(leaseOwner = :me OR checkpointOwner = :me)`            | `SET leaseCounter, pendingCheckpoint, pendingCheckpointSubSequenceNumber [, pendingCheckpointState]` or `REMOVE pendingCheckpoint*` |
//! | `release`          | `leaseOwner = :me`                                             | `SET leaseCounter = :next REMOVE leaseOwner`                                 |
//! | `request_handoff`  | `leaseOwner = :me AND attribute_not_exists(checkpointOwner)`   | `SET leaseOwner = :new, checkpointOwner = :me` (counter unchanged)           |
//! | `complete_handoff` | `checkpointOwner = :me AND leaseOwner = :new`                  | `SET leaseCounter = :next REMOVE checkpointOwner`                            |
//! | `delete`           | —                                                              | (`DeleteItem`)                                                               |
//!
//! `:me` is the owner in the caller's copy of the lease; a copy without an owner fails every
//! condition on `:me` without a request.
//!
//! The lease each write returns is the caller's copy with the write's effect applied (the
//! shared `store::effect` functions; the counter condition guarantees the copy was current).
//! The one exception is a checkpoint by the old owner during a graceful handoff: the stored
//! `leaseOwner`/`checkpointOwner` are then the new owner's and the old one's, while the
//! returned lease keeps the caller's view of them.
//!
//! Errors are classified into [`LeaseStoreError`]: a failed condition is
//! [`LeaseStoreError::ConditionFailed`]; `ProvisionedThroughputExceededException`,
//! `RequestLimitExceeded`, `ThrottlingException` (and `LimitExceededException` from
//! `CreateTable`) are [`LeaseStoreError::Throttled`]; timeouts, connection failures,
//! `InternalServerError`, other 5xx responses and the retry-safe write conflicts
//! (`TransactionConflictException`, `ReplicatedWriteConflictException`) are
//! [`LeaseStoreError::Transient`]; everything else (missing table, bad credentials, validation
//! errors) is [`LeaseStoreError::Other`]. SDK types never appear in the errors' signatures; the
//! SDK error is kept as the error's `source()`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kcl::LeaseStoreError> {
//! use kcl::lease::dynamo::DynamoLeaseStore;
//! use kcl::LeaseStore;
//!
//! let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
//! let store = DynamoLeaseStore::from_conf(&conf, "orders-app");
//! store.ensure_table().await?;
//! for lease in store.list().await?.leases {
//!     println!("{} held by {:?} at {}", lease.key, lease.owner, lease.checkpoint);
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::describe_table::DescribeTableError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ReturnConsumedCapacity, ScalarAttributeType, TableStatus,
};
use aws_smithy_types::Blob;

use super::capacity::CapacityMeter;
use super::item::{self, attr, AttrValue, Item};
use super::liveness::{self, Beat, HandoffNotice, WorkerItem, WorkerTable};
use super::store::effect;
use super::{Lease, LeaseKey, LeaseStore, LeaseStoreError, LeaseTable, WorkerId};
use crate::checkpoint::PendingCheckpoint;
use crate::error::BoxError;
use crate::record::ExtendedSequenceNumber;
use crate::shard::ShardId;

/// How often [`LeaseStore::ensure_table`] polls `DescribeTable` while the table is created.
const TABLE_POLL_INTERVAL: Duration = Duration::from_millis(75);

/// How long [`LeaseStore::ensure_table`] waits for the table to become `ACTIVE` by default.
const DEFAULT_TABLE_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A lease table in DynamoDB (or a DynamoDB-compatible server). Clones share the client.
///
/// ```no_run
/// # async fn demo(client: aws_sdk_dynamodb::Client) -> Result<(), kcl::LeaseStoreError> {
/// use kcl::lease::dynamo::DynamoLeaseStore;
/// use kcl::LeaseStore;
///
/// let store = DynamoLeaseStore::new(client, "orders-app");
/// store.ensure_table().await?; // creates it (on-demand billing) if it is missing
/// let table = store.list().await?;
/// for bad in &table.malformed {
///     eprintln!("lease item needs attention: {bad}");
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct DynamoLeaseStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
    ready_timeout: Duration,
    scan_page_size: Option<i32>,
    /// How missing tables are created (tags, encryption, PITR, deletion protection).
    options: crate::config::LeaseTableOptions,
    /// Set once `ensure_table` found (or created) the worker table.
    workers_ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// What DynamoDB reported each successful request consumed.
    meter: CapacityMeter,
}

/// Which side of a request's consumed capacity a total without a split belongs to.
#[derive(Clone, Copy)]
enum Charge {
    Read,
    Write,
}

impl DynamoLeaseStore {
    /// A store for the lease table `table`, using `client`.
    ///
    /// Every call has a timeout: those `client`'s configuration leaves unset (the SDK's
    /// operation and operation-attempt timeouts) default to 5 s per attempt and 15 s per call
    /// (see [`crate::Aws`]); a call that times out fails with [`LeaseStoreError::Transient`].
    ///
    /// ```no_run
    /// # async fn demo() {
    /// use kcl::lease::dynamo::DynamoLeaseStore;
    ///
    /// let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    /// let store = DynamoLeaseStore::new(aws_sdk_dynamodb::Client::new(&conf), "orders-app");
    /// assert_eq!(store.table_name(), "orders-app");
    /// # }
    /// ```
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        // Every attempt counted by operation and outcome (`kcl_aws_requests_total`).
        let client = aws_sdk_dynamodb::Client::from_conf(
            client
                .config()
                .to_builder()
                .interceptor(crate::metrics::requests::RequestMetrics::new("dynamodb"))
                .build(),
        );
        let client = match crate::aws::with_default_timeouts(
            client.config().timeout_config(),
            crate::aws::DYNAMODB_TIMEOUTS,
        ) {
            // The same configuration (connection pool, credentials cache…) with the timeouts.
            Some(timeouts) => aws_sdk_dynamodb::Client::from_conf(
                client
                    .config()
                    .to_builder()
                    .timeout_config(timeouts)
                    .build(),
            ),
            None => client,
        };
        Self {
            client,
            table: table.into(),
            ready_timeout: DEFAULT_TABLE_READY_TIMEOUT,
            scan_page_size: None,
            options: crate::config::LeaseTableOptions::default(),
            workers_ready: std::sync::Arc::default(),
            meter: CapacityMeter::default(),
        }
    }

    /// A store for the lease table `table`, with a client built from `conf` (region,
    /// credentials, endpoint, retry and timeout settings; timeouts `conf` leaves unset get
    /// defaults, as in [`DynamoLeaseStore::new`]).
    ///
    /// ```no_run
    /// # async fn demo() {
    /// use kcl::lease::dynamo::DynamoLeaseStore;
    ///
    /// let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    /// let store = DynamoLeaseStore::from_conf(&conf, "orders-app");
    /// # }
    /// ```
    pub fn from_conf(conf: &aws_config::SdkConfig, table: impl Into<String>) -> Self {
        Self::new(aws_sdk_dynamodb::Client::new(conf), table)
    }

    /// How long [`LeaseStore::ensure_table`] waits for a new table to become `ACTIVE` before
    /// it fails (default 60 s).
    ///
    /// ```no_run
    /// # async fn demo(client: aws_sdk_dynamodb::Client) {
    /// use std::time::Duration;
    /// use kcl::lease::dynamo::DynamoLeaseStore;
    ///
    /// let store = DynamoLeaseStore::new(client, "orders-app")
    ///     .table_ready_timeout(Duration::from_secs(120));
    /// # }
    /// ```
    pub fn table_ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// The maximum number of items each `Scan` page of [`LeaseStore::list`] reads (default:
    /// DynamoDB's own 1 MB page). Smaller pages spread the read load of a large table; values
    /// below 1 are treated as 1.
    ///
    /// ```no_run
    /// # async fn demo(client: aws_sdk_dynamodb::Client) {
    /// use kcl::lease::dynamo::DynamoLeaseStore;
    ///
    /// let store = DynamoLeaseStore::new(client, "orders-app").scan_page_size(100);
    /// # }
    /// ```
    pub fn scan_page_size(mut self, items: i32) -> Self {
        self.scan_page_size = Some(items.max(1));
        self
    }

    /// How [`LeaseStore::ensure_table`] creates the lease and worker tables when they are
    /// missing: tags, encryption at rest, point-in-time recovery (turned on once the table is
    /// active), deletion protection. Existing tables are left as they are. Not validated
    /// here: [`LeaseTableOptions::validate`](crate::config::LeaseTableOptions::validate).
    ///
    /// ```no_run
    /// # fn demo(client: aws_sdk_dynamodb::Client) {
    /// use kcl::config::{LeaseTableOptions, TableEncryption};
    /// use kcl::lease::dynamo::DynamoLeaseStore;
    ///
    /// let mut options = LeaseTableOptions::default();
    /// options.encryption = TableEncryption::CustomerKey("alias/leases".into());
    /// options.point_in_time_recovery = true;
    /// let store = DynamoLeaseStore::new(client, "orders-app").table_options(options);
    /// # }
    /// ```
    pub fn table_options(mut self, options: crate::config::LeaseTableOptions) -> Self {
        self.options = options;
        self
    }

    /// The table's name.
    ///
    /// ```no_run
    /// # fn demo(client: aws_sdk_dynamodb::Client) {
    /// use kcl::lease::dynamo::DynamoLeaseStore;
    /// assert_eq!(DynamoLeaseStore::new(client, "orders-app").table_name(), "orders-app");
    /// # }
    /// ```
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// The worker table's name: the lease table's, plus `-workers` (one liveness item per
    /// worker; see [`crate::lease::liveness`]).
    ///
    /// ```no_run
    /// # async fn demo(client: aws_sdk_dynamodb::Client) {
    /// use kcl::lease::dynamo::DynamoLeaseStore;
    /// assert_eq!(DynamoLeaseStore::new(client, "orders-app").worker_table(), "orders-app-workers");
    /// # }
    /// ```
    pub fn worker_table(&self) -> String {
        format!("{}-workers", self.table)
    }

    /// For tools that must not create anything (the `kcl` admin commands): whether the lease
    /// table and the worker table exist (`DescribeTable`), without creating either. A worker
    /// table that exists and is `ACTIVE` is used from then on, as after
    /// [`LeaseStore::ensure_table`].
    ///
    /// ```no_run
    /// # async fn demo(client: aws_sdk_dynamodb::Client) -> Result<(), kcl::LeaseStoreError> {
    /// use kcl::lease::dynamo::DynamoLeaseStore;
    /// let store = DynamoLeaseStore::new(client, "orders-app");
    /// let (leases, workers) = store.open_existing().await?;
    /// println!("lease table: {leases}, worker table: {workers}");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// `DescribeTable` failed, or a table of that name has another key schema.
    pub async fn open_existing(&self) -> Result<(bool, bool), LeaseStoreError> {
        let leases = self.describe(&self.table, attr::LEASE_KEY).await?;
        let workers = self
            .describe(&self.worker_table(), liveness::attr::WORKER_ID)
            .await?;
        let workers_active = workers
            .as_ref()
            .is_some_and(|t| t.table_status == Some(TableStatus::Active));
        if workers_active {
            self.workers_ready
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok((leases.is_some(), workers_active))
    }

    /// The capacity units DynamoDB reported for this store's successful requests, by
    /// operation (`ReturnConsumedCapacity`; requests refused by their condition are charged by
    /// DynamoDB too, but their errors carry no report). Clones share the sums.
    ///
    /// ```no_run
    /// # async fn demo(store: kcl::lease::dynamo::DynamoLeaseStore) {
    /// println!("{:?}", store.capacity().total());
    /// # }
    /// ```
    pub fn capacity(&self) -> &CapacityMeter {
        &self.meter
    }

    fn consumed(
        &self,
        op: &str,
        charge: Charge,
        c: Option<&aws_sdk_dynamodb::types::ConsumedCapacity>,
    ) {
        let Some(c) = c else { return };
        let total = c.capacity_units().unwrap_or(0.0);
        let (read, write) = match (c.read_capacity_units(), c.write_capacity_units(), charge) {
            (None, None, Charge::Read) => (total, 0.0),
            (None, None, Charge::Write) => (0.0, total),
            (r, w, _) => (r.unwrap_or(0.0), w.unwrap_or(0.0)),
        };
        self.meter.charge_units(op, read, write);
    }

    fn workers_ready(&self) -> Result<String, LeaseStoreError> {
        if self.workers_ready.load(std::sync::atomic::Ordering::SeqCst) {
            Ok(self.worker_table())
        } else {
            Err(LeaseStoreError::Other(
                format!(
                    "the worker table {:?} is not available",
                    self.worker_table()
                )
                .into(),
            ))
        }
    }

    /// Scans `table_name` whole, page by page.
    async fn scan_all(
        &self,
        op: &str,
        table_name: &str,
        consistent: bool,
    ) -> Result<Vec<Item>, LeaseStoreError> {
        let mut items = Vec::new();
        let mut start_key = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(table_name)
                .consistent_read(consistent)
                .set_limit(self.scan_page_size)
                .set_exclusive_start_key(start_key.take())
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(|e| classify("Scan", table_name, e))?;
            self.consumed(op, Charge::Read, out.consumed_capacity());
            items.extend(out.items.unwrap_or_default().into_iter().map(from_sdk_item));
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start_key = Some(k),
                _ => break,
            }
        }
        Ok(items)
    }

    async fn list_with(&self, consistent: bool) -> Result<LeaseTable, LeaseStoreError> {
        let (mut leases, mut malformed) = (Vec::new(), Vec::new());
        let op = if consistent {
            "list"
        } else {
            "list_eventually"
        };
        for raw in self.scan_all(op, &self.table, consistent).await? {
            match item::decode(&raw) {
                Ok(Some(lease)) => leases.push(lease),
                Ok(None) => {}
                Err(bad) => malformed.push(bad),
            }
        }
        Ok(LeaseTable::new(leases, malformed))
    }

    /// An `UpdateItem` on a worker item, conditional on `condition`.
    async fn update_worker(
        &self,
        op: &'static str,
        worker: &WorkerId,
        update: Update,
        condition: String,
        return_new: bool,
    ) -> Result<Option<Item>, LeaseStoreError> {
        let table = self.workers_ready()?;
        let expression = update.expression();
        let out = self
            .client
            .update_item()
            .table_name(&table)
            .key(
                liveness::attr::WORKER_ID,
                AttributeValue::S(worker.as_str().to_owned()),
            )
            .update_expression(expression)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(update.names))
            .set_expression_attribute_values(Some(update.values))
            .return_values(if return_new {
                aws_sdk_dynamodb::types::ReturnValue::AllNew
            } else {
                aws_sdk_dynamodb::types::ReturnValue::None
            })
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| fenced(op, &table, &LeaseKey::new(worker.as_str()), e))?;
        self.consumed(op, Charge::Write, out.consumed_capacity());
        Ok(out.attributes.map(from_sdk_item))
    }

    /// Writes `item` as it is, unconditionally, replacing any item with the same `leaseKey`.
    ///
    /// A test and operations helper (seeding tables, reproducing malformed items); the worker
    /// never calls it. [`AttrValue::Other`] values are written as a placeholder of the named
    /// type (`BOOL` true, `NULL`, an empty `L` or `M`, `NS` `[0]`, `BS` `[0x00]`).
    ///
    /// # Errors
    /// The request's failure, classified as for every other operation; [`LeaseStoreError::Other`]
    /// for an [`AttrValue::Other`] type it cannot write.
    ///
    /// ```no_run
    /// # async fn demo(store: kcl::lease::dynamo::DynamoLeaseStore) -> Result<(), kcl::LeaseStoreError> {
    /// use kcl::lease::item::{attr, AttrValue, Item};
    ///
    /// let mut item = Item::new();
    /// item.insert(attr::LEASE_KEY.into(), AttrValue::S("shardId-000000000000".into()));
    /// item.insert(attr::LEASE_COUNTER.into(), AttrValue::S("not a number".into()));
    /// store.put_raw_item(item).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn put_raw_item(&self, item: Item) -> Result<(), LeaseStoreError> {
        let item = to_sdk_item(item)?;
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("PutItem", &self.table, e))
    }

    /// Reads the item with `leaseKey` = `key` as it is stored (strongly consistent), without
    /// decoding it. A test and operations helper, like [`Self::put_raw_item`].
    ///
    /// # Errors
    /// The request's failure, classified as for every other operation.
    ///
    /// ```no_run
    /// # async fn demo(store: kcl::lease::dynamo::DynamoLeaseStore) -> Result<(), kcl::LeaseStoreError> {
    /// if let Some(item) = store.get_raw_item("shardId-000000000000").await? {
    ///     println!("{item:?}");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn get_raw_item(&self, key: &str) -> Result<Option<Item>, LeaseStoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key_of(key)))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| classify("GetItem", &self.table, e))?;
        self.consumed("get", Charge::Read, out.consumed_capacity());
        Ok(out.item.map(from_sdk_item))
    }

    /// `DescribeTable`: the table, `None` if it does not exist.
    async fn describe(
        &self,
        table_name: &str,
        key: &str,
    ) -> Result<Option<aws_sdk_dynamodb::types::TableDescription>, LeaseStoreError> {
        match self
            .client
            .describe_table()
            .table_name(table_name)
            .send()
            .await
        {
            Ok(out) => {
                let Some(table) = out.table else {
                    return Err(LeaseStoreError::Other(
                        format!("DescribeTable on {table_name:?} returned no table").into(),
                    ));
                };
                check_key_schema(table_name, key, &table)?;
                Ok(Some(table))
            }
            Err(SdkError::ServiceError(ctx))
                if matches!(ctx.err(), DescribeTableError::ResourceNotFoundException(_)) =>
            {
                Ok(None)
            }
            Err(e) => Err(classify("DescribeTable", table_name, e)),
        }
    }

    /// `CreateTable` with `key_attr` as hash key and the table options; a concurrent
    /// creator's table is fine. True if this call created it.
    async fn create_table(
        &self,
        table_name: &str,
        key_attr: &str,
    ) -> Result<bool, LeaseStoreError> {
        let build_err = |e: aws_sdk_dynamodb::error::BuildError| LeaseStoreError::Other(e.into());
        let key = KeySchemaElement::builder()
            .attribute_name(key_attr)
            .key_type(KeyType::Hash)
            .build()
            .map_err(build_err)?;
        let def = AttributeDefinition::builder()
            .attribute_name(key_attr)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(build_err)?;
        match self
            .client
            .create_table()
            .table_name(table_name)
            .key_schema(key)
            .attribute_definitions(def)
            .billing_mode(BillingMode::PayPerRequest)
            .set_tags(table_tags(&self.options)?)
            .set_sse_specification(sse_specification(&self.options)?)
            .set_deletion_protection_enabled(self.options.deletion_protection.then_some(true))
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(
                    table = %table_name,
                    tags = self.options.tags.len(),
                    encryption = ?self.options.encryption,
                    deletion_protection = self.options.deletion_protection,
                    "created the table"
                );
                Ok(true)
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_in_use_exception())
                    || e.code() == Some("ResourceInUseException") =>
            {
                tracing::debug!(table = %table_name, "the table is being created by another worker");
                Ok(false)
            }
            Err(e) => Err(classify("CreateTable", table_name, e)),
        }
    }

    /// Creates `table_name` (hash key `key`) if it does not exist and waits until it is
    /// active.
    async fn ensure(&self, table_name: &str, key: &str) -> Result<(), LeaseStoreError> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.ready_timeout;
        let mut last_status = None;
        let mut created = false;
        loop {
            let step = match self.describe(table_name, key).await {
                Ok(Some(table)) if table.table_status() == Some(&TableStatus::Active) => {
                    tracing::debug!(table = %table_name, waited = ?started.elapsed(), "the table is active");
                    if created {
                        self.enable_point_in_time_recovery(table_name).await;
                    } else {
                        self.compare_options(&table);
                    }
                    return Ok(());
                }
                Ok(Some(table)) => {
                    last_status = Some(
                        table
                            .table_status
                            .unwrap_or_else(|| TableStatus::from("(none reported)")),
                    );
                    Ok(())
                }
                Ok(None) => self.create_table(table_name, key).await.map(|c| {
                    created |= c;
                }),
                Err(e) => Err(e),
            };
            match step {
                Ok(()) => {}
                // The SDK already retried; keep trying until the deadline.
                Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(table = %table_name, error = %e, "setting up the table failed; retrying");
                }
                Err(e) => return Err(e),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LeaseStoreError::Other(
                    format!(
                        "the table {:?} did not become ACTIVE within {:?} (last status: {})",
                        table_name,
                        self.ready_timeout,
                        last_status.as_ref().map_or("not found", |s| s.as_str())
                    )
                    .into(),
                ));
            }
            tokio::time::sleep(TABLE_POLL_INTERVAL).await;
        }
    }

    /// Turns on point-in-time recovery of the new table `table_name` if the options ask for
    /// it. A failure (no `dynamodb:UpdateContinuousBackups` permission, …) is logged: the
    /// table works without it.
    async fn enable_point_in_time_recovery(&self, table_name: &str) {
        if !self.options.point_in_time_recovery {
            return;
        }
        let spec = aws_sdk_dynamodb::types::PointInTimeRecoverySpecification::builder()
            .point_in_time_recovery_enabled(true)
            .build();
        let spec = match spec {
            Ok(spec) => spec,
            Err(e) => {
                tracing::warn!(table = %table_name, error = %e, "cannot turn on point-in-time recovery");
                return;
            }
        };
        match self
            .client
            .update_continuous_backups()
            .table_name(table_name)
            .point_in_time_recovery_specification(spec)
            .send()
            .await
        {
            Ok(_) => tracing::info!(table = %table_name, "turned on point-in-time recovery"),
            Err(e) => tracing::warn!(
                table = %table_name,
                error = %DisplayErrorContext(&e),
                "cannot turn on point-in-time recovery (UpdateContinuousBackups); the table works without it"
            ),
        }
    }

    /// Logs where an existing table's encryption or deletion protection (both in the
    /// `DescribeTable` answer already read) differ from the options. Tags and point-in-time
    /// recovery would cost a call each and are not compared.
    fn compare_options(&self, table: &aws_sdk_dynamodb::types::TableDescription) {
        let name = table.table_name().unwrap_or_default();
        let sse = table.sse_description();
        let kms = sse.and_then(|d| d.kms_master_key_arn());
        // DynamoDB reports no SSEDescription for the AWS-owned key.
        let kms_in_use = sse.is_some_and(|d| {
            d.sse_type() == Some(&aws_sdk_dynamodb::types::SseType::Kms)
                && d.status()
                    .is_none_or(|s| s != &aws_sdk_dynamodb::types::SseStatus::Disabled)
        });
        use crate::config::TableEncryption as E;
        let differs = match &self.options.encryption {
            E::AwsOwned => kms_in_use,
            E::AwsManaged | E::CustomerKey(_) => !kms_in_use,
        };
        if differs {
            tracing::info!(
                table = %name,
                configured = ?self.options.encryption,
                kms_key = kms.unwrap_or("none"),
                "the existing table's encryption differs from lease_table.encryption; it is left as it is"
            );
        }
        let protected = table.deletion_protection_enabled().unwrap_or(false);
        if protected != self.options.deletion_protection {
            tracing::info!(
                table = %name,
                configured = self.options.deletion_protection,
                actual = protected,
                "the existing table's deletion protection differs from lease_table.deletion_protection; it is left as it is"
            );
        }
    }

    /// A conditional `UpdateItem` on `lease`'s item: `leaseCounter = :seen` and `fence`.
    async fn conditional_update(
        &self,
        op: &'static str,
        lease: &Lease,
        fence: Fence<'_>,
        update: Update,
    ) -> Result<(), LeaseStoreError> {
        let mut update = update;
        let condition = update.condition(lease, fence)?;
        let expression = update.expression();
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key_of(lease.key.as_str())))
            .update_expression(expression)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(update.names))
            .set_expression_attribute_values(Some(update.values))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map(|out| self.consumed(op, Charge::Write, out.consumed_capacity()))
            .map_err(|e| fenced(op, &self.table, &lease.key, e))
    }
}

/// `incarnation = :inc AND attribute_not_exists(fencedBy)`: the item is still that
/// incarnation's and nobody declared it dead.
fn worker_condition(u: &mut Update, incarnation: u64) -> String {
    let inc = u.name(liveness::attr::INCARNATION);
    let seen = u.value(number(incarnation));
    let fenced_by = u.name(liveness::attr::FENCED_BY);
    format!("{inc} = {seen} AND attribute_not_exists({fenced_by})")
}

/// `CreateTable` `Tags` from the options (`None` without tags).
fn table_tags(
    options: &crate::config::LeaseTableOptions,
) -> Result<Option<Vec<aws_sdk_dynamodb::types::Tag>>, LeaseStoreError> {
    if options.tags.is_empty() {
        return Ok(None);
    }
    options
        .tags
        .iter()
        .map(|(k, v)| {
            aws_sdk_dynamodb::types::Tag::builder()
                .key(k)
                .value(v)
                .build()
                .map_err(|e| LeaseStoreError::Other(e.into()))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// `CreateTable` `SSESpecification` from the options (`None`: the AWS-owned key).
fn sse_specification(
    options: &crate::config::LeaseTableOptions,
) -> Result<Option<aws_sdk_dynamodb::types::SseSpecification>, LeaseStoreError> {
    use crate::config::TableEncryption as E;
    use aws_sdk_dynamodb::types::{SseSpecification, SseType};
    Ok(match &options.encryption {
        E::AwsManaged => Some(
            SseSpecification::builder()
                .enabled(true)
                .sse_type(SseType::Kms)
                .build(),
        ),
        E::CustomerKey(key) => Some(
            SseSpecification::builder()
                .enabled(true)
                .sse_type(SseType::Kms)
                .kms_master_key_id(key)
                .build(),
        ),
        _ => None,
    })
}

/// Rejects an existing table whose hash key is not `key` alone (it is not one of ours).
fn check_key_schema(
    table_name: &str,
    key: &str,
    table: &aws_sdk_dynamodb::types::TableDescription,
) -> Result<(), LeaseStoreError> {
    let hash = table
        .key_schema()
        .iter()
        .find(|k| k.key_type() == &KeyType::Hash);
    match hash {
        // Nothing reported (some emulators omit it): nothing to check.
        None => Ok(()),
        Some(k) if k.attribute_name() == key && table.key_schema().len() == 1 => Ok(()),
        Some(_) => Err(LeaseStoreError::Other(
            format!(
                "table {:?} exists but is not a {}: its key must be the HASH key {:?} \
                 alone, found {:?}",
                table_name,
                if key == attr::LEASE_KEY {
                    "lease table"
                } else {
                    "worker table"
                },
                key,
                table
                    .key_schema()
                    .iter()
                    .map(|k| format!("{} {}", k.attribute_name(), k.key_type().as_str()))
                    .collect::<Vec<_>>()
            )
            .into(),
        )),
    }
}

#[async_trait]
impl LeaseStore for DynamoLeaseStore {
    async fn ensure_table(&self) -> Result<(), LeaseStoreError> {
        self.ensure(&self.table, attr::LEASE_KEY).await?;
        // The worker table: without it (no permission to create or use it) workers renew
        // every lease instead, which works, at the Java KCL's cost.
        let workers = self.worker_table();
        match self.ensure(&workers, liveness::attr::WORKER_ID).await {
            Ok(()) => self
                .workers_ready
                .store(true, std::sync::atomic::Ordering::SeqCst),
            Err(e) if !e.is_retryable() => {
                tracing::warn!(table = %workers, error = %e, "the worker table cannot be used: every lease will be renewed, at a higher cost");
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    async fn list(&self) -> Result<LeaseTable, LeaseStoreError> {
        self.list_with(true).await
    }

    async fn list_eventually(&self) -> Result<LeaseTable, LeaseStoreError> {
        self.list_with(false).await
    }

    async fn register_worker(&self, w: &WorkerItem) -> Result<(), LeaseStoreError> {
        let table = self.workers_ready()?;
        let item = to_sdk_item(liveness::encode(w))?;
        self.client
            .put_item()
            .table_name(&table)
            .set_item(Some(item))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map(|out| {
                self.consumed(
                    "PutItem(register worker)",
                    Charge::Write,
                    out.consumed_capacity(),
                )
            })
            .map_err(|e| classify("PutItem(register worker)", &table, e))
    }

    async fn heartbeat(&self, beat: &Beat) -> Result<WorkerItem, LeaseStoreError> {
        let mut u = Update::default();
        let hb = u.name(liveness::attr::HEARTBEAT);
        let one = u.value(number(1));
        u.set
            .push(format!("{hb} = if_not_exists({hb}, {one}) + {one}"));
        u.set(liveness::attr::LEASE_COUNT, number(beat.lease_count));
        if beat.throughput > 0 {
            u.set(
                liveness::attr::THROUGHPUT,
                to_sdk_value(item::throughput_kbps(beat.throughput))?,
            );
        } else {
            u.remove(liveness::attr::THROUGHPUT);
        }
        if beat.table_changes > 0 {
            u.set(liveness::attr::TABLE_CHANGES, number(beat.table_changes));
        }
        if !beat.handled.is_empty() {
            let ho = u.name(liveness::attr::HANDOFFS);
            let set = u.value(AttributeValue::Ss(
                beat.handled.iter().map(ToString::to_string).collect(),
            ));
            u.delete.push(format!("{ho} {set}"));
        }
        let condition = worker_condition(&mut u, beat.incarnation);
        let item = self
            .update_worker("UpdateItem(heartbeat)", &beat.worker, u, condition, true)
            .await?
            .ok_or_else(|| LeaseStoreError::Other("the heartbeat returned no item".into()))?;
        Ok(liveness::decode(&item)?)
    }

    async fn list_workers(&self, consistent: bool) -> Result<WorkerTable, LeaseStoreError> {
        let table = self.workers_ready()?;
        let (mut workers, mut malformed) = (Vec::new(), Vec::new());
        for raw in self.scan_all("list_workers", &table, consistent).await? {
            match liveness::decode(&raw) {
                Ok(w) => workers.push(w),
                Err(bad) => malformed.push(bad),
            }
        }
        Ok(WorkerTable::new(workers, malformed))
    }

    async fn fence_worker(&self, seen: &WorkerItem, by: &WorkerId) -> Result<(), LeaseStoreError> {
        let mut u = Update::default();
        u.set(
            liveness::attr::FENCED_BY,
            AttributeValue::S(by.as_str().to_owned()),
        );
        let mut condition = worker_condition(&mut u, seen.incarnation);
        let hb = u.name(liveness::attr::HEARTBEAT);
        let seen_hb = u.value(number(seen.heartbeat));
        condition.push_str(&format!(" AND {hb} = {seen_hb}"));
        self.update_worker(
            "UpdateItem(fence worker)",
            &seen.worker,
            u,
            condition,
            false,
        )
        .await
        .map(|_| ())
    }

    async fn notify_handoff(
        &self,
        worker: &WorkerId,
        incarnation: u64,
        notice: &HandoffNotice,
    ) -> Result<(), LeaseStoreError> {
        let mut u = Update::default();
        let ho = u.name(liveness::attr::HANDOFFS);
        let set = u.value(AttributeValue::Ss(vec![notice.to_string()]));
        u.add.push(format!("{ho} {set}"));
        let condition = worker_condition(&mut u, incarnation);
        self.update_worker("UpdateItem(notify handoff)", worker, u, condition, false)
            .await
            .map(|_| ())
    }

    async fn set_draining(
        &self,
        worker: &WorkerId,
        incarnation: u64,
        since: Option<u64>,
    ) -> Result<(), LeaseStoreError> {
        let mut u = Update::default();
        match since {
            Some(at) => u.set(liveness::attr::DRAINING, number(at)),
            None => u.remove(liveness::attr::DRAINING),
        }
        let condition = worker_condition(&mut u, incarnation);
        self.update_worker("UpdateItem(set draining)", worker, u, condition, false)
            .await
            .map(|_| ())
    }

    async fn remove_worker(
        &self,
        worker: &WorkerId,
        incarnation: u64,
    ) -> Result<(), LeaseStoreError> {
        let table = self.workers_ready()?;
        self.client
            .delete_item()
            .table_name(&table)
            .key(
                liveness::attr::WORKER_ID,
                AttributeValue::S(worker.as_str().to_owned()),
            )
            .condition_expression("#inc = :inc")
            .expression_attribute_names("#inc", liveness::attr::INCARNATION)
            .expression_attribute_values(":inc", number(incarnation))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map(|out| {
                self.consumed(
                    "DeleteItem(remove worker)",
                    Charge::Write,
                    out.consumed_capacity(),
                )
            })
            .map_err(|e| {
                fenced(
                    "DeleteItem(remove worker)",
                    &table,
                    &LeaseKey::new(worker.as_str()),
                    e,
                )
            })
    }

    async fn get(&self, key: &LeaseKey) -> Result<Option<Lease>, LeaseStoreError> {
        match self.get_raw_item(key.as_str()).await? {
            None => Ok(None),
            Some(item) => Ok(item::decode(&item)?),
        }
    }

    async fn create_if_absent(&self, lease: &Lease) -> Result<bool, LeaseStoreError> {
        let item = to_sdk_item(item::encode(lease))?;
        match self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#k)")
            .expression_attribute_names("#k", attr::LEASE_KEY)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
        {
            Ok(out) => {
                self.consumed("PutItem", Charge::Write, out.consumed_capacity());
                Ok(true)
            }
            Err(e) => match fenced("PutItem", &self.table, &lease.key, e) {
                LeaseStoreError::ConditionFailed { .. } => Ok(false),
                other => Err(other),
            },
        }
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, LeaseStoreError> {
        let mut u = Update::default();
        u.set(attr::LEASE_COUNTER, number(lease.counter.next().0));
        self.conditional_update("UpdateItem(renew)", lease, Fence::Owner, u)
            .await?;
        Ok(effect::renewed(lease))
    }

    async fn take(&self, lease: &Lease, owner: &WorkerId) -> Result<Lease, LeaseStoreError> {
        let taken = effect::taken(lease, owner);
        let mut u = Update::default();
        u.set(
            attr::LEASE_OWNER,
            AttributeValue::S(owner.as_str().to_owned()),
        );
        u.set(attr::LEASE_COUNTER, number(taken.counter.0));
        u.set(
            attr::OWNER_SWITCHES,
            number(taken.owner_switches_since_checkpoint),
        );
        // A take ends any pending handoff.
        u.remove(attr::CHECKPOINT_OWNER);
        self.conditional_update("UpdateItem(take)", lease, Fence::Counter, u)
            .await?;
        Ok(taken)
    }

    async fn checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
        child_shard_ids: &[ShardId],
    ) -> Result<Lease, LeaseStoreError> {
        let done = effect::checkpointed(lease, checkpoint, child_shard_ids);
        let mut u = Update::default();
        u.set(
            attr::CHECKPOINT,
            AttributeValue::S(checkpoint.checkpoint_str().to_owned()),
        );
        u.set(attr::CHECKPOINT_SUB, number(checkpoint.sub_sequence()));
        u.set(attr::LEASE_COUNTER, number(done.counter.0));
        u.set(attr::OWNER_SWITCHES, number(0));
        if let Some(bps) = lease.throughput {
            u.set(attr::THROUGHPUT, to_sdk_value(item::throughput_kbps(bps))?);
        }
        if !child_shard_ids.is_empty() {
            // Sorted and deduplicated by the effect: DynamoDB rejects duplicates in a set.
            u.set(
                attr::CHILDREN,
                to_sdk_value(item::ids(&done.child_shard_ids))?,
            );
        }
        u.remove(attr::PENDING_CHECKPOINT);
        u.remove(attr::PENDING_CHECKPOINT_SUB);
        u.remove(attr::PENDING_CHECKPOINT_STATE);
        self.conditional_update(
            "UpdateItem(checkpoint)",
            lease,
            Fence::OwnerOrCheckpointOwner,
            u,
        )
        .await?;
        Ok(done)
    }

    async fn release(&self, lease: &Lease) -> Result<Lease, LeaseStoreError> {
        let mut u = Update::default();
        u.set(attr::LEASE_COUNTER, number(lease.counter.next().0));
        u.remove(attr::LEASE_OWNER);
        self.conditional_update("UpdateItem(release)", lease, Fence::Owner, u)
            .await?;
        Ok(effect::released(lease))
    }

    async fn delete(&self, lease: &Lease) -> Result<(), LeaseStoreError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key_of(lease.key.as_str())))
            .condition_expression("#c = :seen")
            .expression_attribute_names("#c", attr::LEASE_COUNTER)
            .expression_attribute_values(":seen", number(lease.counter.0))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map(|out| self.consumed("DeleteItem", Charge::Write, out.consumed_capacity()))
            .map_err(|e| fenced("DeleteItem", &self.table, &lease.key, e))
    }

    async fn resolve_latest(
        &self,
        lease: &Lease,
        at: std::time::SystemTime,
    ) -> Result<Lease, LeaseStoreError> {
        let done = effect::latest_resolved(lease, at);
        let mut u = Update::default();
        u.set(attr::LEASE_COUNTER, number(done.counter.0));
        u.set(attr::LATEST_RESOLVED_AT, number(item::epoch_millis(at)));
        self.conditional_update("UpdateItem(resolve_latest)", lease, Fence::OwnerAtLatest, u)
            .await?;
        Ok(done)
    }

    async fn set_pending_checkpoint(
        &self,
        lease: &Lease,
        pending: Option<&PendingCheckpoint>,
    ) -> Result<Lease, LeaseStoreError> {
        let done = effect::pending_set(lease, pending);
        let mut u = Update::default();
        u.set(attr::LEASE_COUNTER, number(done.counter.0));
        match &done.pending_checkpoint {
            Some(p) => {
                u.set(
                    attr::PENDING_CHECKPOINT,
                    AttributeValue::S(p.checkpoint_str().to_owned()),
                );
                u.set(attr::PENDING_CHECKPOINT_SUB, number(p.sub_sequence()));
            }
            None => {
                u.remove(attr::PENDING_CHECKPOINT);
                u.remove(attr::PENDING_CHECKPOINT_SUB);
            }
        }
        match &done.pending_checkpoint_state {
            Some(state) => u.set(
                attr::PENDING_CHECKPOINT_STATE,
                AttributeValue::B(Blob::new(state.to_vec())),
            ),
            None => u.remove(attr::PENDING_CHECKPOINT_STATE),
        }
        self.conditional_update(
            "UpdateItem(set_pending_checkpoint)",
            lease,
            Fence::OwnerOrCheckpointOwner,
            u,
        )
        .await?;
        Ok(done)
    }

    async fn request_handoff(
        &self,
        lease: &Lease,
        new_owner: &WorkerId,
    ) -> Result<Lease, LeaseStoreError> {
        let Some(old_owner) = &lease.owner else {
            return Err(LeaseStoreError::ConditionFailed {
                key: lease.key.clone(),
            });
        };
        let mut u = Update::default();
        u.set(
            attr::LEASE_OWNER,
            AttributeValue::S(new_owner.as_str().to_owned()),
        );
        u.set(
            attr::CHECKPOINT_OWNER,
            AttributeValue::S(old_owner.as_str().to_owned()),
        );
        self.conditional_update(
            "UpdateItem(request_handoff)",
            lease,
            Fence::OwnerWithoutHandoff,
            u,
        )
        .await?;
        Ok(effect::handoff_requested(lease, new_owner))
    }

    async fn complete_handoff(
        &self,
        lease: &Lease,
        new_owner: &WorkerId,
    ) -> Result<Lease, LeaseStoreError> {
        let mut u = Update::default();
        u.set(attr::LEASE_COUNTER, number(lease.counter.next().0));
        u.remove(attr::CHECKPOINT_OWNER);
        self.conditional_update(
            "UpdateItem(complete_handoff)",
            lease,
            Fence::HandingOverTo(new_owner),
            u,
        )
        .await?;
        Ok(effect::handoff_completed(lease, new_owner))
    }

    async fn withdraw_handoff(&self, lease: &Lease) -> Result<Lease, LeaseStoreError> {
        let Some(old_owner) = &lease.checkpoint_owner else {
            return Err(LeaseStoreError::ConditionFailed {
                key: lease.key.clone(),
            });
        };
        let mut u = Update::default();
        u.set(
            attr::LEASE_OWNER,
            AttributeValue::S(old_owner.as_str().to_owned()),
        );
        u.remove(attr::CHECKPOINT_OWNER);
        self.conditional_update(
            "UpdateItem(withdraw_handoff)",
            lease,
            Fence::HandedOverBy(old_owner),
            u,
        )
        .await?;
        Ok(effect::handoff_withdrawn(lease))
    }
}

/// What a conditional update requires besides `leaseCounter = :seen` (`:me` is the caller's
/// `lease.owner`; a caller's lease without an owner fails every condition that names `:me`).
#[derive(Clone, Copy, Debug)]
enum Fence<'a> {
    /// Nothing more (take).
    Counter,
    /// `leaseOwner = :me` (renew, release).
    Owner,
    /// `(leaseOwner = :me OR checkpointOwner = :me)` (checkpoint: the old owner may store its
    /// final checkpoint during a graceful handoff).
    OwnerOrCheckpointOwner,
    /// `leaseOwner = :me AND attribute_not_exists(checkpointOwner)` (request a handoff).
    OwnerWithoutHandoff,
    /// `checkpointOwner = :me AND leaseOwner = :new` (complete a handoff to `:new`).
    HandingOverTo(&'a WorkerId),
    /// `leaseOwner = :me AND checkpointOwner = :old` (withdraw a handoff from `:old`).
    HandedOverBy(&'a WorkerId),
    /// `leaseOwner = :me AND checkpoint = LATEST` (record what `LATEST` stood for).
    OwnerAtLatest,
}

/// The pieces of an `UpdateItem` request: `SET`/`REMOVE` clauses and their placeholders.
#[derive(Default)]
struct Update {
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
    set: Vec<String>,
    remove: Vec<String>,
    /// `ADD` clauses (`#name :value`).
    add: Vec<String>,
    /// `DELETE` clauses (`#set :elements`).
    delete: Vec<String>,
}

impl Update {
    /// The `#name` placeholder of an attribute (the schema's names are alphanumeric).
    fn name(&mut self, attribute: &str) -> String {
        let placeholder = format!("#{attribute}");
        self.names.insert(placeholder.clone(), attribute.to_owned());
        placeholder
    }

    /// A fresh `:vN` placeholder for `value`.
    fn value(&mut self, value: AttributeValue) -> String {
        let placeholder = format!(":v{}", self.values.len());
        self.values.insert(placeholder.clone(), value);
        placeholder
    }

    fn set(&mut self, attribute: &str, value: AttributeValue) {
        let (n, v) = (self.name(attribute), self.value(value));
        self.set.push(format!("{n} = {v}"));
    }

    fn remove(&mut self, attribute: &str) {
        let n = self.name(attribute);
        self.remove.push(n);
    }

    /// The fencing condition. A caller's lease without an owner cannot satisfy a condition
    /// on `:me`: reported as a failed condition without a request.
    fn condition(&mut self, lease: &Lease, fence: Fence<'_>) -> Result<String, LeaseStoreError> {
        let counter = self.name(attr::LEASE_COUNTER);
        let seen = self.value(number(lease.counter.0));
        let mut condition = format!("{counter} = {seen}");
        if matches!(fence, Fence::Counter) {
            return Ok(condition);
        }
        let Some(me) = &lease.owner else {
            return Err(LeaseStoreError::ConditionFailed {
                key: lease.key.clone(),
            });
        };
        let me = self.value(AttributeValue::S(me.as_str().to_owned()));
        let owner = self.name(attr::LEASE_OWNER);
        // Only placeholders that the expressions use may be sent: add this one on demand.
        let mut checkpoint_owner = || self.name(attr::CHECKPOINT_OWNER);
        let extra = match fence {
            Fence::Counter | Fence::Owner => format!("{owner} = {me}"),
            Fence::OwnerOrCheckpointOwner => {
                format!("({owner} = {me} OR {} = {me})", checkpoint_owner())
            }
            Fence::OwnerWithoutHandoff => {
                format!(
                    "{owner} = {me} AND attribute_not_exists({})",
                    checkpoint_owner()
                )
            }
            Fence::HandingOverTo(new_owner) => {
                let checkpoint_owner = checkpoint_owner();
                let new_owner = self.value(AttributeValue::S(new_owner.as_str().to_owned()));
                format!("{checkpoint_owner} = {me} AND {owner} = {new_owner}")
            }
            Fence::HandedOverBy(old_owner) => {
                let checkpoint_owner = checkpoint_owner();
                let old_owner = self.value(AttributeValue::S(old_owner.as_str().to_owned()));
                format!("{owner} = {me} AND {checkpoint_owner} = {old_owner}")
            }
            Fence::OwnerAtLatest => {
                let checkpoint = self.name(attr::CHECKPOINT);
                let latest = self.value(AttributeValue::S(
                    ExtendedSequenceNumber::Latest.checkpoint_str().to_owned(),
                ));
                format!("{owner} = {me} AND {checkpoint} = {latest}")
            }
        };
        condition.push_str(" AND ");
        condition.push_str(&extra);
        Ok(condition)
    }

    fn expression(&self) -> String {
        let mut e = String::new();
        if !self.set.is_empty() {
            e.push_str("SET ");
            e.push_str(&self.set.join(", "));
        }
        if !self.remove.is_empty() {
            if !e.is_empty() {
                e.push(' ');
            }
            e.push_str("REMOVE ");
            e.push_str(&self.remove.join(", "));
        }
        for (clause, parts) in [("ADD", &self.add), ("DELETE", &self.delete)] {
            if !parts.is_empty() {
                if !e.is_empty() {
                    e.push(' ');
                }
                e.push_str(clause);
                e.push(' ');
                e.push_str(&parts.join(", "));
            }
        }
        e
    }
}

fn number(n: u64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

fn key_of(key: &str) -> HashMap<String, AttributeValue> {
    HashMap::from([(
        attr::LEASE_KEY.to_owned(),
        AttributeValue::S(key.to_owned()),
    )])
}

/// SDK attribute value → codec value. Types the codec does not use are kept by name only.
fn from_sdk_value(v: AttributeValue) -> AttrValue {
    match v {
        AttributeValue::S(s) => AttrValue::S(s),
        AttributeValue::N(n) => AttrValue::N(n),
        AttributeValue::Ss(ss) => AttrValue::Ss(ss),
        AttributeValue::B(b) => AttrValue::B(b.into_inner()),
        AttributeValue::Bool(_) => AttrValue::Other("BOOL"),
        AttributeValue::Null(_) => AttrValue::Other("NULL"),
        AttributeValue::L(_) => AttrValue::Other("L"),
        AttributeValue::M(_) => AttrValue::Other("M"),
        AttributeValue::Ns(_) => AttrValue::Other("NS"),
        AttributeValue::Bs(_) => AttrValue::Other("BS"),
        _ => AttrValue::Other("UNKNOWN"),
    }
}

fn from_sdk_item(item: HashMap<String, AttributeValue>) -> Item {
    item.into_iter()
        .map(|(k, v)| (k, from_sdk_value(v)))
        .collect()
}

/// Codec value → SDK attribute value; [`AttrValue::Other`] becomes a placeholder of its type.
fn to_sdk_value(v: AttrValue) -> Result<AttributeValue, LeaseStoreError> {
    Ok(match v {
        AttrValue::S(s) => AttributeValue::S(s),
        AttrValue::N(n) => AttributeValue::N(n),
        AttrValue::Ss(ss) => AttributeValue::Ss(ss),
        AttrValue::B(b) => AttributeValue::B(Blob::new(b)),
        AttrValue::Other("BOOL") => AttributeValue::Bool(true),
        AttrValue::Other("NULL") => AttributeValue::Null(true),
        AttrValue::Other("L") => AttributeValue::L(Vec::new()),
        AttrValue::Other("M") => AttributeValue::M(HashMap::new()),
        AttrValue::Other("NS") => AttributeValue::Ns(vec!["0".to_owned()]),
        AttrValue::Other("BS") => AttributeValue::Bs(vec![Blob::new(vec![0u8])]),
        AttrValue::Other(other) => {
            return Err(LeaseStoreError::Other(
                format!("cannot write an attribute value of type {other:?}").into(),
            ))
        }
    })
}

fn to_sdk_item(item: Item) -> Result<HashMap<String, AttributeValue>, LeaseStoreError> {
    item.into_iter()
        .map(|(k, v)| Ok((k, to_sdk_value(v)?)))
        .collect()
}

/// How a failed request is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    ConditionFailed,
    Throttled,
    Transient,
    Other,
}

/// The errors of the operations this store sends: modeled errors are recognised by variant
/// (their metadata may lack a code), the rest by code and HTTP status.
trait ServiceError: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static {
    /// The class of a modeled error, `None` for the others.
    fn modeled(&self) -> Option<Class>;
}

macro_rules! item_errors {
    ($($ty:ty => $conditional:expr),* $(,)?) => {$(
        impl ServiceError for $ty {
            fn modeled(&self) -> Option<Class> {
                #[allow(clippy::redundant_closure_call)]
                let condition_failed: bool = ($conditional)(self);
                if condition_failed {
                    Some(Class::ConditionFailed)
                } else if self.is_provisioned_throughput_exceeded_exception()
                    || self.is_request_limit_exceeded()
                    || self.is_throttling_exception()
                {
                    Some(Class::Throttled)
                } else if self.is_internal_server_error() {
                    Some(Class::Transient)
                } else {
                    None
                }
            }
        }
    )*};
}

item_errors! {
    aws_sdk_dynamodb::operation::get_item::GetItemError => |_: &_| false,
    aws_sdk_dynamodb::operation::scan::ScanError => |_: &_| false,
    aws_sdk_dynamodb::operation::put_item::PutItemError =>
        aws_sdk_dynamodb::operation::put_item::PutItemError::is_conditional_check_failed_exception,
    aws_sdk_dynamodb::operation::update_item::UpdateItemError =>
        aws_sdk_dynamodb::operation::update_item::UpdateItemError::is_conditional_check_failed_exception,
    aws_sdk_dynamodb::operation::delete_item::DeleteItemError =>
        aws_sdk_dynamodb::operation::delete_item::DeleteItemError::is_conditional_check_failed_exception,
}

impl ServiceError for DescribeTableError {
    fn modeled(&self) -> Option<Class> {
        self.is_internal_server_error().then_some(Class::Transient)
    }
}

impl ServiceError for aws_sdk_dynamodb::operation::create_table::CreateTableError {
    fn modeled(&self) -> Option<Class> {
        if self.is_internal_server_error() {
            Some(Class::Transient)
        } else if self.is_limit_exceeded_exception() {
            // Too many concurrent control-plane requests: retry later.
            Some(Class::Throttled)
        } else {
            None
        }
    }
}

/// Classifies an SDK error. The only place SDK error details are inspected.
fn class_of<E: ServiceError>(err: &SdkError<E, HttpResponse>) -> Class {
    match err {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => Class::Transient,
        SdkError::DispatchFailure(f) if f.is_user() => Class::Other,
        SdkError::DispatchFailure(_) => Class::Transient,
        SdkError::ServiceError(ctx) => ctx.err().modeled().unwrap_or_else(|| {
            match ctx.err().code() {
                Some("ConditionalCheckFailedException") => Class::ConditionFailed,
                Some(
                    "ProvisionedThroughputExceededException"
                    | "RequestLimitExceeded"
                    | "ThrottlingException"
                    | "LimitExceededException",
                ) => Class::Throttled,
                // Server faults, and conflicts with concurrent writers (transactions, other
                // regions of a global table) that the service documents as safe to retry.
                Some(
                    "InternalServerError"
                    | "InternalFailure"
                    | "ServiceUnavailable"
                    | "TransactionConflictException"
                    | "ReplicatedWriteConflictException",
                ) => Class::Transient,
                _ if ctx.raw().status().is_server_error() => Class::Transient,
                _ => Class::Other,
            }
        }),
        // Construction failures and variants added in later SDK versions.
        _ => Class::Other,
    }
}

/// A failed DynamoDB request: which operation on which table, and the SDK's description. The
/// SDK error is its `source()`.
#[derive(Debug)]
struct RequestFailed {
    op: &'static str,
    table: String,
    detail: String,
    source: BoxError,
}

impl fmt::Display for RequestFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DynamoDB {} on table {:?} failed: {}",
            self.op, self.table, self.detail
        )
    }
}

impl std::error::Error for RequestFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Classifies a failed request on the table (no lease key: a failed condition is `Other`).
fn classify<E>(op: &'static str, table: &str, err: SdkError<E, HttpResponse>) -> LeaseStoreError
where
    E: ServiceError,
{
    classify_for(op, table, None, err)
}

/// Classifies a failed conditional write on `key`'s lease.
fn fenced<E>(
    op: &'static str,
    table: &str,
    key: &LeaseKey,
    err: SdkError<E, HttpResponse>,
) -> LeaseStoreError
where
    E: ServiceError,
{
    classify_for(op, table, Some(key), err)
}

fn classify_for<E>(
    op: &'static str,
    table: &str,
    key: Option<&LeaseKey>,
    err: SdkError<E, HttpResponse>,
) -> LeaseStoreError
where
    E: ServiceError,
{
    let class = class_of(&err);
    if let (Class::ConditionFailed, Some(key)) = (class, key) {
        return LeaseStoreError::ConditionFailed { key: key.clone() };
    }
    let detail = DisplayErrorContext(&err).to_string();
    let source: BoxError = match err {
        // The modeled error itself (its message and code), not the SDK's "service error" wrapper.
        SdkError::ServiceError(ctx) => Box::new(ctx.into_err()),
        other => Box::new(other),
    };
    let boxed: BoxError = Box::new(RequestFailed {
        op,
        table: table.to_owned(),
        detail,
        source,
    });
    match class {
        Class::Throttled => LeaseStoreError::Throttled(boxed),
        Class::Transient => LeaseStoreError::Transient(boxed),
        Class::ConditionFailed | Class::Other => LeaseStoreError::Other(boxed),
    }
}

#[cfg(feature = "testkit")]
impl crate::testkit::conformance::RawItems for DynamoLeaseStore {
    fn put_raw(&self, item: Item) -> futures::future::BoxFuture<'_, Result<(), LeaseStoreError>> {
        Box::pin(self.put_raw_item(item))
    }

    fn get_raw<'a>(
        &'a self,
        key: &'a str,
    ) -> Option<futures::future::BoxFuture<'a, Result<Option<Item>, LeaseStoreError>>> {
        Some(Box::pin(self.get_raw_item(key)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
    use aws_sdk_dynamodb::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
    use aws_sdk_dynamodb::types::error::{
        ConditionalCheckFailedException, InternalServerError,
        ProvisionedThroughputExceededException, RequestLimitExceeded, ResourceNotFoundException,
        ThrottlingException,
    };
    use aws_smithy_types::body::SdkBody;

    fn response(status: u16) -> HttpResponse {
        HttpResponse::new(
            status.try_into().expect("a valid status code"),
            SdkBody::empty(),
        )
    }

    fn service(err: UpdateItemError, status: u16) -> SdkError<UpdateItemError, HttpResponse> {
        SdkError::service_error(err, response(status))
    }

    fn generic(code: &str, status: u16) -> SdkError<UpdateItemError, HttpResponse> {
        service(
            UpdateItemError::generic(ErrorMetadata::builder().code(code).message("m").build()),
            status,
        )
    }

    fn key() -> LeaseKey {
        LeaseKey::new("shardId-000000000001")
    }

    fn map(err: SdkError<UpdateItemError, HttpResponse>) -> LeaseStoreError {
        fenced("UpdateItem", "t", &key(), err)
    }

    #[test]
    fn conditional_check_failed_is_condition_failed() {
        let err = map(service(
            UpdateItemError::ConditionalCheckFailedException(
                ConditionalCheckFailedException::builder()
                    .message("The conditional request failed")
                    .build(),
            ),
            400,
        ));
        assert!(
            matches!(&err, LeaseStoreError::ConditionFailed { key: k } if *k == key()),
            "{err:?}"
        );
        // Without a lease to blame (e.g. a table operation) it is not a fencing failure.
        let err = classify(
            "PutItem",
            "t",
            generic("ConditionalCheckFailedException", 400),
        );
        assert!(matches!(err, LeaseStoreError::Other(_)), "{err:?}");
    }

    #[test]
    fn throttling_is_throttled() {
        let typed = [
            UpdateItemError::ProvisionedThroughputExceededException(
                ProvisionedThroughputExceededException::builder().build(),
            ),
            UpdateItemError::RequestLimitExceeded(RequestLimitExceeded::builder().build()),
            UpdateItemError::ThrottlingException(ThrottlingException::builder().build()),
        ];
        for e in typed {
            let err = map(service(e, 400));
            assert!(matches!(err, LeaseStoreError::Throttled(_)), "{err:?}");
            assert!(err.is_retryable());
        }
        let err = map(generic("ThrottlingException", 400));
        assert!(matches!(err, LeaseStoreError::Throttled(_)), "{err:?}");
    }

    #[test]
    fn server_faults_timeouts_and_io_are_transient() {
        let cases = [
            service(
                UpdateItemError::InternalServerError(InternalServerError::builder().build()),
                500,
            ),
            generic("ServiceUnavailable", 503),
            generic("SomethingNew", 502),
            SdkError::timeout_error("read timed out"),
            SdkError::dispatch_failure(ConnectorError::io("connection refused".into())),
            SdkError::dispatch_failure(ConnectorError::timeout("connect timed out".into())),
            SdkError::response_error("truncated body", response(200)),
        ];
        for e in cases {
            let err = map(e);
            assert!(matches!(err, LeaseStoreError::Transient(_)), "{err:?}");
            assert!(err.is_retryable());
        }
    }

    #[test]
    fn everything_else_is_other_and_described() {
        let cases = [
            service(
                UpdateItemError::ResourceNotFoundException(
                    ResourceNotFoundException::builder()
                        .message("Requested resource not found")
                        .build(),
                ),
                400,
            ),
            generic("ValidationException", 400),
            generic("UnrecognizedClientException", 400),
            SdkError::construction_failure("bad input"),
            SdkError::dispatch_failure(ConnectorError::user("bad connector config".into())),
        ];
        for e in cases {
            let err = map(e);
            assert!(matches!(err, LeaseStoreError::Other(_)), "{err:?}");
            assert!(!err.is_retryable());
        }
        let err = map(service(
            UpdateItemError::ResourceNotFoundException(
                ResourceNotFoundException::builder()
                    .message("Requested resource not found")
                    .build(),
            ),
            400,
        ));
        let source = std::error::Error::source(&err).map(ToString::to_string);
        let text = source.unwrap_or_default();
        assert!(
            text.contains("UpdateItem") && text.contains("\"t\"") && text.contains("not found"),
            "{text}"
        );
    }

    #[test]
    fn attribute_values_convert_both_ways() {
        let values = [
            AttrValue::S("x".into()),
            AttrValue::N("12".into()),
            AttrValue::Ss(vec!["a".into(), "b".into()]),
            AttrValue::B(vec![1, 2, 3]),
        ];
        for v in values {
            let back = from_sdk_value(to_sdk_value(v.clone()).expect("convertible"));
            assert_eq!(back, v);
        }
        for t in ["BOOL", "NULL", "L", "M", "NS", "BS"] {
            let back = from_sdk_value(to_sdk_value(AttrValue::Other(t)).expect("convertible"));
            assert_eq!(back, AttrValue::Other(t));
        }
        assert!(to_sdk_value(AttrValue::Other("??")).is_err());
    }

    #[test]
    fn update_expressions_are_fenced() {
        let mut lease = Lease::new(
            &ShardId::new("shardId-000000000001"),
            ExtendedSequenceNumber::TrimHorizon,
        );
        lease.counter = crate::lease::LeaseCounter(7);
        lease.owner = Some(WorkerId::new("w1"));
        let mut u = Update::default();
        u.set(attr::LEASE_COUNTER, number(8));
        u.remove(attr::LEASE_OWNER);
        let cond = u.condition(&lease, Fence::Owner).expect("owned");
        assert_eq!(cond, "#leaseCounter = :v1 AND #leaseOwner = :v2");
        assert_eq!(u.expression(), "SET #leaseCounter = :v0 REMOVE #leaseOwner");
        assert_eq!(u.values.get(":v1"), Some(&number(7)));
        assert_eq!(
            u.values.get(":v2"),
            Some(&AttributeValue::S("w1".to_owned()))
        );
        // Every placeholder sent is used, and every one used is sent.
        assert_eq!(u.names.len(), 2);

        let mut u = Update::default();
        let cond = u
            .condition(&lease, Fence::OwnerOrCheckpointOwner)
            .expect("owned");
        assert_eq!(
            cond,
            "#leaseCounter = :v0 AND (#leaseOwner = :v1 OR #checkpointOwner = :v1)"
        );
        let mut u = Update::default();
        let w2 = WorkerId::new("w2");
        let cond = u
            .condition(&lease, Fence::HandingOverTo(&w2))
            .expect("owned");
        assert_eq!(
            cond,
            "#leaseCounter = :v0 AND #checkpointOwner = :v1 AND #leaseOwner = :v2"
        );
        let mut u = Update::default();
        let cond = u
            .condition(&lease, Fence::HandedOverBy(&w2))
            .expect("owned");
        assert_eq!(
            cond,
            "#leaseCounter = :v0 AND #leaseOwner = :v1 AND #checkpointOwner = :v2"
        );
        let mut u = Update::default();
        let cond = u
            .condition(&lease, Fence::OwnerWithoutHandoff)
            .expect("owned");
        assert_eq!(
            cond,
            "#leaseCounter = :v0 AND #leaseOwner = :v1 AND attribute_not_exists(#checkpointOwner)"
        );

        lease.owner = None;
        for fence in [
            Fence::Owner,
            Fence::OwnerOrCheckpointOwner,
            Fence::OwnerWithoutHandoff,
            Fence::HandingOverTo(&w2),
            Fence::HandedOverBy(&w2),
        ] {
            let err = Update::default()
                .condition(&lease, fence)
                .expect_err("an unowned lease cannot pass an owner condition");
            assert!(err.is_condition_failed());
        }
        let mut u = Update::default();
        assert_eq!(
            u.condition(&lease, Fence::Counter)
                .expect("no owner needed"),
            "#leaseCounter = :v0"
        );
        assert_eq!(u.names.len(), 1);
    }

    #[test]
    fn every_call_has_a_timeout_unless_the_configuration_sets_its_own() {
        let config = |timeouts: Option<TimeoutConfig>| {
            let mut b = aws_sdk_dynamodb::Config::builder()
                .region(aws_sdk_dynamodb::config::Region::new("us-east-1"));
            b.set_timeout_config(timeouts);
            aws_sdk_dynamodb::Client::from_conf(b.build())
        };
        let store = DynamoLeaseStore::new(config(None), "t");
        let t = store
            .client
            .config()
            .timeout_config()
            .expect("timeouts set");
        assert_eq!(t.operation_attempt_timeout(), Some(Duration::from_secs(5)));
        assert_eq!(t.operation_timeout(), Some(Duration::from_secs(15)));

        let own = TimeoutConfig::builder()
            .operation_timeout(Duration::from_secs(42))
            .disable_operation_attempt_timeout()
            .build();
        let store = DynamoLeaseStore::new(config(Some(own)), "t");
        let t = store
            .client
            .config()
            .timeout_config()
            .expect("timeouts set");
        assert_eq!(t.operation_timeout(), Some(Duration::from_secs(42)));
        assert_eq!(t.operation_attempt_timeout(), None);
    }
}
