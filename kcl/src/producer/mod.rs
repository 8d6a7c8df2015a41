//! A Kinesis producer: batching into `PutRecords`, optional KPL aggregation, retries that keep
//! per-key order.
//!
//! [`Producer::put`] buffers a user record; [`Producer::flush`] sends everything buffered and
//! returns once Kinesis stored it (or the retries ran out); [`Producer::close`] flushes and
//! stops taking records. A producer is a cheap `Clone` handle: tasks can share one.
//!
//! **Batching.** A flush sends `PutRecords` calls of at most 500 records and 5 MiB (data plus
//! partition keys), one call at a time. `put` flushes by itself when the buffer is full
//! ([`ProducerBuilder::max_buffered_records`], [`ProducerBuilder::max_buffered_bytes`]), which
//! makes a fast writer wait for Kinesis instead of growing memory; and a background task
//! flushes every [`ProducerBuilder::flush_interval`] if one is set.
//!
//! **Aggregation** ([`ProducerBuilder::aggregation`], off by default). User records with the
//! same hash key (the same partition key, or the same explicit hash key) are packed into KPL
//! aggregates of at most [`ProducerBuilder::max_aggregate_bytes`] (1 MiB by default, Kinesis'
//! record limit), in the KPL's format: the Java KCL, the KPL's deaggregation libraries and
//! [`crate::retrieval::deagg`] read them. An aggregate's partition key is its first record's,
//! and its explicit hash key is set when its records were put with one. Grouping by hash key
//! rather than by predicted shard needs no shard map: every sub-record routes exactly like its
//! aggregate, so no reader ever drops one as outside its shard after a split or merge, and no
//! aggregate is ever written to the wrong shard. It pays off when keys repeat (many small
//! records per key); with all-distinct keys aggregates hold one record and are sent as plain
//! records, as the KPL does.
//!
//! **Retries and order.** Entries a `PutRecords` call rejected (`FailedRecordCount`, an
//! `ErrorCode` per entry, typically `ProvisionedThroughputExceededException`), and calls that
//! failed as a whole with a retryable error, are sent again with exponential backoff and jitter,
//! up to [`ProducerBuilder::max_attempts`] times per entry. Per-key order holds: a call carries
//! at most one entry per partition key (its oldest; with aggregation, that entry holds as many
//! of the key's records as fit in an aggregate), so a key's later records are never sent before
//! its earlier ones are stored. Records of one key are therefore stored in the order they were
//! put, across flushes too (one flush sends at a time). The price: without aggregation a key
//! gets one record per call, that is per round trip; aggregate hot keys. When an entry runs out
//! of attempts, the flush goes on with the other keys, then fails with
//! [`ProducerError::Unsent`]; the unsent records stay buffered, first in line, for the next
//! flush (or come back from [`Producer::close`]).
//!
//! **Delivery** is at least once: a call whose answer is lost (a timeout, a cancelled flush) is
//! sent again, and Kinesis may then store its records twice.
//!
//! **Drop.** Dropping the last handle without [`close`](Producer::close) flushes what is left in
//! a task spawned on the current tokio runtime (errors are logged; nobody waits for it, and a
//! runtime that shuts down first ends it). Outside a runtime the records are lost, with a
//! warning. Call `close()` to know that everything was sent.
//!
//! **Metrics** (label `stream`): [`RECORDS_PUT`], [`KINESIS_RECORDS_PUT`], [`RETRIES`],
//! [`FAILURES`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use kcl::producer::Producer;
//! use kcl::testkit::MemKinesis;
//!
//! let kinesis = MemKinesis::new();
//! kinesis.create_stream("orders", 2);
//! let producer = Producer::builder(kinesis.clone(), "orders")
//!     .aggregation(true)
//!     .build()?;
//! for i in 0..100 {
//!     producer.put(format!("customer-{}", i % 4), format!("order {i}")).await?;
//! }
//! producer.close().await?; // flushes; the 100 records went out as 4 aggregates
//! assert_eq!(kinesis.record_count("orders"), 4);
//! # Ok(())
//! # }
//! ```

mod aggregate;
#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "testkit")]
mod mem;
mod put;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use backon::BackoffBuilder;
use bytes::Bytes;
use tracing::{debug, error, warn};

pub use aggregate::aggregate;
pub use put::{PutRecords, PutRecordsEntry, PutRecordsResult};

use crate::config::ConfigError;
use crate::retrieval::KinesisApiError;
use crate::shard::hash_key;
use aggregate::AggregateBuilder;

/// Counter: user records Kinesis stored (label `stream`).
pub const RECORDS_PUT: &str = "kcl_producer_records_put_total";
/// Counter: Kinesis records stored: aggregates and plain records (label `stream`).
pub const KINESIS_RECORDS_PUT: &str = "kcl_producer_kinesis_records_put_total";
/// Counter: entries sent again after a rejection or a failed call (label `stream`).
pub const RETRIES: &str = "kcl_producer_retries_total";
/// Counter: user records a flush gave up on after the retries (label `stream`).
pub const FAILURES: &str = "kcl_producer_failures_total";

/// The most bytes (data plus partition key) one Kinesis record may hold.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// The most records one `PutRecords` call may hold.
pub const MAX_BATCH_RECORDS: usize = 500;
/// The most bytes (data plus partition keys) one `PutRecords` call may hold.
pub const MAX_BATCH_BYTES: usize = 5 * 1024 * 1024;
/// The longest partition key, in Unicode characters.
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// One record to put.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UserRecord {
    /// The partition key (1 to 256 Unicode characters).
    pub partition_key: String,
    /// The payload.
    pub data: Bytes,
    /// Routes the record by this hash key instead of the MD5 of the partition key.
    pub explicit_hash_key: Option<u128>,
}

impl UserRecord {
    /// A record routed by its partition key.
    pub fn new(partition_key: impl Into<String>, data: impl Into<Bytes>) -> Self {
        Self {
            partition_key: partition_key.into(),
            data: data.into(),
            explicit_hash_key: None,
        }
    }

    /// Routes the record by `hash_key` instead.
    #[must_use]
    pub fn with_explicit_hash_key(mut self, hash_key: u128) -> Self {
        self.explicit_hash_key = Some(hash_key);
        self
    }

    /// The hash key Kinesis routes the record by.
    pub fn hash_key(&self) -> u128 {
        self.explicit_hash_key
            .unwrap_or_else(|| hash_key(&self.partition_key))
    }

    /// What the record counts for in Kinesis' limits: data plus partition key.
    pub fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }

    fn check(&self) -> Result<(), &'static str> {
        if self.partition_key.is_empty() {
            return Err("the partition key is empty");
        }
        if self.partition_key.chars().count() > MAX_PARTITION_KEY_CHARS {
            return Err("the partition key is longer than 256 characters");
        }
        if self.size() > MAX_RECORD_BYTES {
            return Err("data plus partition key exceed 1 MiB");
        }
        Ok(())
    }
}

impl fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRecord")
            .field("partition_key", &self.partition_key)
            .field("explicit_hash_key", &self.explicit_hash_key)
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// Errors of the producer.
///
/// ```
/// # use kcl::producer::ProducerError;
/// # fn f(e: ProducerError) {
/// match e {
///     ProducerError::InvalidRecord(r)
///     | ProducerError::Closed(r)
///     | ProducerError::BufferFull(r) => {
///         let record = r.into_record(); // not taken: yours again
///     }
///     ProducerError::Unsent(u) => eprintln!("{} records not sent yet: {u}", u.count()),
///     _ => {}
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProducerError {
    /// `put`: Kinesis would refuse the record (empty or too long key, over 1 MiB).
    #[error("invalid record: {0}")]
    InvalidRecord(RecordRefused),
    /// `put`: the producer was closed.
    #[error("the producer is closed: {0}")]
    Closed(RecordRefused),
    /// `put`: the buffer is full and flushing did not make room (the flush's error is the
    /// source).
    #[error("the buffer is full: {0}")]
    BufferFull(RecordRefused),
    /// `flush` / `close`: records Kinesis did not accept within the retries.
    #[error(transparent)]
    Unsent(Unsent),
}

/// A record `put` did not take, with the reason; [`into_record`](Self::into_record) gives it
/// back.
#[derive(Debug, thiserror::Error)]
#[error("{reason} (partition key {key:?})", key = record.partition_key)]
pub struct RecordRefused {
    record: Box<UserRecord>,
    reason: &'static str,
    #[source]
    source: Option<Box<ProducerError>>,
}

impl RecordRefused {
    fn new(record: UserRecord, reason: &'static str) -> Self {
        Self {
            record: Box::new(record),
            reason,
            source: None,
        }
    }

    /// The refused record.
    pub fn record(&self) -> &UserRecord {
        &self.record
    }

    /// Takes the refused record back.
    pub fn into_record(self) -> UserRecord {
        *self.record
    }
}

/// Records a flush could not get Kinesis to accept.
#[derive(Debug, thiserror::Error)]
#[error("{count} records not accepted by Kinesis{}", last_error_suffix(.last_error))]
pub struct Unsent {
    count: usize,
    records: Vec<UserRecord>,
    last_error: Option<String>,
    #[source]
    source: Option<KinesisApiError>,
}

fn last_error_suffix(last_error: &Option<String>) -> String {
    last_error
        .as_ref()
        .map(|e| format!(" (last error: {e})"))
        .unwrap_or_default()
}

impl Unsent {
    /// How many user records were not sent.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The records, in the order they were put: filled by [`Producer::close`] (after a failed
    /// `flush` they stay buffered instead, and this is empty).
    pub fn records(&self) -> &[UserRecord] {
        &self.records
    }

    /// Takes the records (see [`records`](Self::records)).
    pub fn into_records(self) -> Vec<UserRecord> {
        self.records
    }

    /// The last rejection (`ErrorCode: ErrorMessage`) or call error seen.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

/// The producer's settings (see the [`ProducerBuilder`] methods of the same names).
#[derive(Clone, Debug)]
struct Config {
    aggregation: bool,
    max_aggregate_bytes: usize,
    max_batch_records: usize,
    max_batch_bytes: usize,
    max_buffered_records: usize,
    max_buffered_bytes: usize,
    max_attempts: u32,
    min_backoff: Duration,
    max_backoff: Duration,
    flush_interval: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            aggregation: false,
            max_aggregate_bytes: MAX_RECORD_BYTES,
            max_batch_records: MAX_BATCH_RECORDS,
            max_batch_bytes: MAX_BATCH_BYTES,
            max_buffered_records: 10_000,
            max_buffered_bytes: 32 * 1024 * 1024,
            max_attempts: 10,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            flush_interval: None,
        }
    }
}

impl Config {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_RECORD_BYTES).contains(&self.max_aggregate_bytes) {
            return Err(ConfigError::new(
                "max_aggregate_bytes",
                "must be between 1 and 1 MiB",
            ));
        }
        if !(1..=MAX_BATCH_RECORDS).contains(&self.max_batch_records) {
            return Err(ConfigError::new(
                "max_batch_records",
                "must be between 1 and 500",
            ));
        }
        if !(1..=MAX_BATCH_BYTES).contains(&self.max_batch_bytes) {
            return Err(ConfigError::new(
                "max_batch_bytes",
                "must be between 1 and 5 MiB",
            ));
        }
        if self.max_buffered_records == 0 {
            return Err(ConfigError::new("max_buffered_records", "must be positive"));
        }
        if self.max_buffered_bytes == 0 {
            return Err(ConfigError::new("max_buffered_bytes", "must be positive"));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::new("max_attempts", "must be positive"));
        }
        if self.min_backoff > self.max_backoff {
            return Err(ConfigError::new(
                "min_backoff",
                "must not exceed max_backoff",
            ));
        }
        if self.flush_interval.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new("flush_interval", "must be positive"));
        }
        Ok(())
    }
}

/// Builds a [`Producer`]; every setting has a default. [`build`](Self::build) validates them.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kcl::ConfigError> {
/// use std::time::Duration;
/// use kcl::producer::Producer;
/// use kcl::testkit::MemKinesis;
///
/// let producer = Producer::builder(MemKinesis::new(), "orders")
///     .aggregation(true)
///     .max_aggregate_bytes(50 * 1024) // the KPL's default
///     .flush_interval(Duration::from_millis(100))
///     .max_attempts(20)
///     .build()?;
/// # drop(producer);
/// # Ok(())
/// # }
/// ```
#[must_use]
pub struct ProducerBuilder<P> {
    api: P,
    stream: String,
    cfg: Config,
}

impl<P> fmt::Debug for ProducerBuilder<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProducerBuilder")
            .field("stream", &self.stream)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl<P: PutRecords> ProducerBuilder<P> {
    /// Packs records of the same hash key into KPL aggregates (default: off).
    pub fn aggregation(mut self, on: bool) -> Self {
        self.cfg.aggregation = on;
        self
    }

    /// The largest aggregate, data plus partition key (default and most: 1 MiB).
    pub fn max_aggregate_bytes(mut self, bytes: usize) -> Self {
        self.cfg.max_aggregate_bytes = bytes;
        self
    }

    /// The most records per `PutRecords` call (default and most: 500).
    pub fn max_batch_records(mut self, records: usize) -> Self {
        self.cfg.max_batch_records = records;
        self
    }

    /// The most bytes (data plus partition keys) per `PutRecords` call (default and most:
    /// 5 MiB). A single record larger than this is still sent, alone.
    pub fn max_batch_bytes(mut self, bytes: usize) -> Self {
        self.cfg.max_batch_bytes = bytes;
        self
    }

    /// `put` flushes first when this many user records wait (default 10 000).
    pub fn max_buffered_records(mut self, records: usize) -> Self {
        self.cfg.max_buffered_records = records;
        self
    }

    /// `put` flushes first when this many bytes wait (default 32 MiB).
    pub fn max_buffered_bytes(mut self, bytes: usize) -> Self {
        self.cfg.max_buffered_bytes = bytes;
        self
    }

    /// How many times a flush sends one entry before giving up on it (default 10).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.cfg.max_attempts = attempts;
        self
    }

    /// The first retry delay (default 100 ms); delays double up to
    /// [`max_backoff`](Self::max_backoff), with jitter.
    pub fn min_backoff(mut self, delay: Duration) -> Self {
        self.cfg.min_backoff = delay;
        self
    }

    /// The longest retry delay (default 5 s).
    pub fn max_backoff(mut self, delay: Duration) -> Self {
        self.cfg.max_backoff = delay;
        self
    }

    /// Flushes in a background task this often (default: never; flush yourself, or rely on
    /// `put` flushing a full buffer). The task stops when the producer is closed or dropped.
    pub fn flush_interval(mut self, every: Duration) -> Self {
        self.cfg.flush_interval = Some(every);
        self
    }

    /// The producer.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first setting out of range, or `flush_interval` when there
    /// is no tokio runtime to run the flushing task on.
    pub fn build(self) -> Result<Producer<P>, ConfigError> {
        self.cfg.validate()?;
        let interval = self.cfg.flush_interval;
        let inner = Arc::new(Inner {
            api: Arc::new(self.api),
            stream: self.stream,
            cfg: self.cfg,
            state: Mutex::new(State::default()),
            send: tokio::sync::Mutex::new(()),
            flush_on_drop: true,
        });
        if let Some(every) = interval {
            let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
                ConfigError::new("flush_interval", "needs a tokio runtime to flush on")
            })?;
            runtime.spawn(flush_every(Arc::downgrade(&inner), every));
        }
        Ok(Producer { inner })
    }
}

/// A Kinesis producer; see the [module docs](self).
pub struct Producer<P: PutRecords> {
    inner: Arc<Inner<P>>,
}

impl<P: PutRecords> Clone for Producer<P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<P: PutRecords> fmt::Debug for Producer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("stream", &self.inner.stream)
            .field("buffered", &self.buffered())
            .finish_non_exhaustive()
    }
}

impl<P: PutRecords> Producer<P> {
    /// A producer with the default settings (no aggregation, no background flushing).
    pub fn new(api: P, stream: impl Into<String>) -> Self {
        Self::builder(api, stream)
            .build()
            .expect("the default settings are valid and need no runtime")
    }

    /// A builder, to change the settings.
    pub fn builder(api: P, stream: impl Into<String>) -> ProducerBuilder<P> {
        ProducerBuilder {
            api,
            stream: stream.into(),
            cfg: Config::default(),
        }
    }

    /// The stream records are put to.
    pub fn stream(&self) -> &str {
        &self.inner.stream
    }

    /// User records buffered or being sent.
    pub fn buffered(&self) -> usize {
        self.inner.lock().records
    }

    /// Buffers a record routed by `partition_key`; see [`put_record`](Self::put_record).
    ///
    /// # Errors
    /// As [`put_record`](Self::put_record).
    ///
    /// # Cancel safety
    /// As [`put_record`](Self::put_record).
    pub async fn put(
        &self,
        partition_key: impl Into<String>,
        data: impl Into<Bytes>,
    ) -> Result<(), ProducerError> {
        self.put_record(UserRecord::new(partition_key, data)).await
    }

    /// Buffers a record. When the buffer is full it first flushes (so it waits for Kinesis).
    ///
    /// # Errors
    /// The record comes back inside the error: [`ProducerError::InvalidRecord`] if Kinesis
    /// would refuse it, [`ProducerError::Closed`] after [`close`](Self::close),
    /// [`ProducerError::BufferFull`] if the buffer is full and a flush did not make room.
    ///
    /// # Cancel safety
    /// Cancelling it while it flushes leaves the record not buffered (and the flush as after a
    /// cancelled [`flush`](Self::flush)); otherwise it does not wait.
    pub async fn put_record(&self, record: UserRecord) -> Result<(), ProducerError> {
        if let Err(reason) = record.check() {
            return Err(ProducerError::InvalidRecord(RecordRefused::new(
                record, reason,
            )));
        }
        let mut flushed = None;
        loop {
            {
                let mut st = self.inner.lock();
                if st.closed {
                    return Err(ProducerError::Closed(RecordRefused::new(
                        record,
                        "records cannot be put after close()",
                    )));
                }
                let cfg = &self.inner.cfg;
                let fits = st.records < cfg.max_buffered_records
                    && st.bytes + record.size() <= cfg.max_buffered_bytes;
                if fits || st.records == 0 {
                    st.push(record);
                    return Ok(());
                }
            }
            if let Some(result) = flushed {
                let mut refused = RecordRefused::new(record, "flushing did not make room");
                if let Err(e) = result {
                    refused.source = Some(Box::new(e));
                }
                return Err(ProducerError::BufferFull(refused));
            }
            flushed = Some(self.inner.flush().await);
        }
    }

    /// Sends every record buffered so far, and returns once Kinesis stored them all.
    ///
    /// # Errors
    /// [`ProducerError::Unsent`] when some entries were still rejected after
    /// [`max_attempts`](ProducerBuilder::max_attempts), or a call failed with an error that is
    /// not retryable. The unsent records stay buffered, ahead of newer ones, for the next
    /// flush.
    ///
    /// # Cancel safety
    /// Cancelling it loses no record: what was not yet acknowledged stays buffered. Records of
    /// the call in flight may have been stored and are then sent again (at least once).
    pub async fn flush(&self) -> Result<(), ProducerError> {
        self.inner.flush().await
    }

    /// Stops taking records (on every clone), then flushes.
    ///
    /// # Errors
    /// [`ProducerError::Unsent`] holding the records that were not sent, in the order they
    /// were put ([`Unsent::into_records`]).
    ///
    /// # Cancel safety
    /// As [`flush`](Self::flush); the producer stays closed.
    pub async fn close(self) -> Result<(), ProducerError> {
        self.inner.lock().closed = true;
        match self.inner.flush().await {
            Ok(()) => Ok(()),
            Err(ProducerError::Unsent(mut unsent)) => {
                let _sending = self.inner.send.lock().await;
                let mut st = self.inner.lock();
                let mut left = std::mem::take(&mut st.buffer);
                left.extend(st.entries.drain(..).flat_map(|e| e.records));
                left.sort_by_key(|b| b.seq);
                st.records = 0;
                st.bytes = 0;
                unsent.count = left.len();
                unsent.records = left.into_iter().map(|b| b.record).collect();
                Err(ProducerError::Unsent(unsent))
            }
            Err(other) => Err(other),
        }
    }
}

/// A user record waiting, numbered in put order.
#[derive(Debug)]
struct Buffered {
    seq: u64,
    record: UserRecord,
}

/// One Kinesis record to send: a plain user record or an aggregate.
#[derive(Debug)]
struct Entry {
    id: u64,
    request: PutRecordsEntry,
    records: Vec<Buffered>,
    attempts: u32,
    given_up: bool,
}

#[derive(Debug, Default)]
struct State {
    /// Records not yet packed into entries, in put order.
    buffer: Vec<Buffered>,
    /// Entries packed and not yet stored, oldest first per key.
    entries: Vec<Entry>,
    /// User records in `buffer` and `entries`.
    records: usize,
    /// Their bytes.
    bytes: usize,
    next_seq: u64,
    next_id: u64,
    closed: bool,
}

impl State {
    fn push(&mut self, record: UserRecord) {
        self.records += 1;
        self.bytes += record.size();
        self.buffer.push(Buffered {
            seq: self.next_seq,
            record,
        });
        self.next_seq += 1;
    }

    fn entry(&mut self, request: PutRecordsEntry, records: Vec<Buffered>) -> Entry {
        self.next_id += 1;
        Entry {
            id: self.next_id,
            request,
            records,
            attempts: 0,
            given_up: false,
        }
    }

    /// Packs the buffer into entries, after those already waiting.
    fn pack(&mut self, cfg: &Config) {
        let buffer = std::mem::take(&mut self.buffer);
        if !cfg.aggregation {
            for b in buffer {
                let r = &b.record;
                let request = PutRecordsEntry::new(
                    r.data.clone(),
                    r.partition_key.clone(),
                    r.explicit_hash_key,
                );
                let entry = self.entry(request, vec![b]);
                self.entries.push(entry);
            }
            return;
        }
        // Groups in the order of their first record; a full group is closed and a new one
        // for the same hash key starts after every group opened so far.
        let mut groups: Vec<(AggregateBuilder, Vec<Buffered>)> = Vec::new();
        let mut open: HashMap<u128, usize> = HashMap::new();
        for b in buffer {
            let hash = b.record.hash_key();
            let fits = open
                .get(&hash)
                .is_some_and(|&g| groups[g].0.size_with(&b.record) <= cfg.max_aggregate_bytes);
            let g = if fits {
                open[&hash]
            } else {
                groups.push((AggregateBuilder::default(), Vec::new()));
                open.insert(hash, groups.len() - 1);
                groups.len() - 1
            };
            groups[g].0.push(&b.record);
            groups[g].1.push(b);
        }
        for (builder, records) in groups {
            let first = &records[0].record;
            let request = if builder.len() == 1 {
                // A lone record goes as it is, as with the KPL.
                PutRecordsEntry::new(
                    first.data.clone(),
                    first.partition_key.clone(),
                    first.explicit_hash_key,
                )
            } else {
                PutRecordsEntry::new(
                    builder.encode(),
                    first.partition_key.clone(),
                    first.explicit_hash_key,
                )
            };
            let entry = self.entry(request, records);
            self.entries.push(entry);
        }
    }

    /// The entries of the next call: in order, at most one per partition key (the oldest:
    /// none behind an entry of the same key that waits or was given up), within the call's
    /// limits.
    fn next_call(&self, cfg: &Config) -> (Vec<u64>, Vec<PutRecordsEntry>) {
        let mut keys: HashSet<&str> = HashSet::new();
        let mut ids = Vec::new();
        let mut call = Vec::new();
        let mut bytes = 0;
        for e in &self.entries {
            if ids.len() == cfg.max_batch_records {
                break;
            }
            let own: HashSet<&str> = e
                .records
                .iter()
                .map(|b| b.record.partition_key.as_str())
                .collect();
            let blocked = own.iter().any(|k| keys.contains(k));
            keys.extend(own);
            let size = e.request.size();
            if blocked || e.given_up || (!ids.is_empty() && bytes + size > cfg.max_batch_bytes) {
                continue;
            }
            bytes += size;
            ids.push(e.id);
            call.push(e.request.clone());
        }
        (ids, call)
    }
}

struct Inner<P: PutRecords> {
    api: Arc<P>,
    stream: String,
    cfg: Config,
    state: Mutex<State>,
    /// Held by the flush that is sending: one at a time, so per-key order holds across flushes.
    send: tokio::sync::Mutex<()>,
    /// False for the inner a dropped producer's last flush runs on (it does not respawn).
    flush_on_drop: bool,
}

/// What one call did to its entries.
struct Outcome {
    failed: usize,
    fatal: Option<KinesisApiError>,
}

impl<P: PutRecords> Inner<P> {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> {
        // Producers run in many processes: each draws its own seed.
        crate::backoff::exponential(self.cfg.min_backoff, self.cfg.max_backoff, rand::random())
            .build()
    }

    async fn flush(&self) -> Result<(), ProducerError> {
        let _sending = self.send.lock().await;
        {
            let mut st = self.lock();
            st.pack(&self.cfg);
            for e in &mut st.entries {
                e.attempts = 0;
                e.given_up = false;
            }
        }
        let mut delays = self.backoff();
        let mut last_error: Option<String> = None;
        loop {
            let (ids, call) = self.lock().next_call(&self.cfg);
            if ids.is_empty() {
                break;
            }
            let result = self.api.put_records(&self.stream, &call).await;
            let outcome = self.apply(&ids, result, &mut last_error);
            if let Some(fatal) = outcome.fatal {
                return Err(self.unsent(last_error, Some(fatal)));
            }
            if outcome.failed > 0 {
                let delay = delays.next().unwrap_or(self.cfg.max_backoff);
                tokio::time::sleep(delay).await;
            } else {
                delays = self.backoff();
            }
        }
        if self.lock().entries.is_empty() {
            Ok(())
        } else {
            Err(self.unsent(last_error, None))
        }
    }

    /// The error of a flush that leaves records behind (they stay buffered).
    fn unsent(&self, last_error: Option<String>, source: Option<KinesisApiError>) -> ProducerError {
        let mut st = self.lock();
        let count: usize = st.entries.iter().map(|e| e.records.len()).sum();
        for e in &mut st.entries {
            e.attempts = 0;
            e.given_up = false;
        }
        drop(st);
        metrics::counter!(FAILURES, "stream" => self.stream.clone()).increment(count as u64);
        warn!(
            stream = %self.stream,
            count,
            last_error = last_error.as_deref().unwrap_or("none"),
            "records not accepted by Kinesis; they stay buffered"
        );
        ProducerError::Unsent(Unsent {
            count,
            records: Vec::new(),
            last_error: last_error.or_else(|| source.as_ref().map(ToString::to_string)),
            source,
        })
    }

    /// Applies a call's answer to its entries.
    fn apply(
        &self,
        ids: &[u64],
        result: Result<Vec<PutRecordsResult>, KinesisApiError>,
        last_error: &mut Option<String>,
    ) -> Outcome {
        let stream = || self.stream.clone();
        let results = match result {
            Ok(results) if results.len() == ids.len() => results,
            Ok(results) => {
                *last_error = Some(format!(
                    "PutRecords answered {} results for {} records",
                    results.len(),
                    ids.len()
                ));
                Vec::new()
            }
            Err(e) if e.is_retryable() => {
                debug!(stream = %self.stream, error = %e, "PutRecords failed; retrying");
                *last_error = Some(e.to_string());
                Vec::new()
            }
            Err(e) => {
                error!(stream = %self.stream, error = %e, "PutRecords failed");
                return Outcome {
                    failed: ids.len(),
                    fatal: Some(e),
                };
            }
        };
        let mut st = self.lock();
        let position: HashMap<u64, usize> = st
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id, i))
            .collect();
        let mut accepted: HashSet<u64> = HashSet::new();
        let mut failed = 0;
        for (i, &id) in ids.iter().enumerate() {
            match results.get(i) {
                Some(PutRecordsResult::Accepted { .. }) => {
                    accepted.insert(id);
                }
                other => {
                    if let Some(PutRecordsResult::Rejected {
                        error_code,
                        message,
                    }) = other
                    {
                        *last_error = Some(format!("{error_code}: {message}"));
                    }
                    failed += 1;
                    let Some(e) = position.get(&id).map(|&p| &mut st.entries[p]) else {
                        continue;
                    };
                    e.attempts += 1;
                    if e.attempts >= self.cfg.max_attempts {
                        e.given_up = true;
                    } else {
                        metrics::counter!(RETRIES, "stream" => stream()).increment(1);
                    }
                }
            }
        }
        if !accepted.is_empty() {
            let mut user_records = 0;
            let mut bytes = 0;
            st.entries.retain(|e| {
                let keep = !accepted.contains(&e.id);
                if !keep {
                    user_records += e.records.len();
                    bytes += e.records.iter().map(|b| b.record.size()).sum::<usize>();
                }
                keep
            });
            st.records -= user_records;
            st.bytes -= bytes;
            drop(st);
            metrics::counter!(RECORDS_PUT, "stream" => stream()).increment(user_records as u64);
            metrics::counter!(KINESIS_RECORDS_PUT, "stream" => stream())
                .increment(accepted.len() as u64);
        }
        if failed > 0 {
            debug!(
                stream = %self.stream,
                failed,
                last_error = ?last_error,
                "PutRecords rejected entries"
            );
        }
        Outcome {
            failed,
            fatal: None,
        }
    }
}

impl<P: PutRecords> Drop for Inner<P> {
    fn drop(&mut self) {
        let state = std::mem::take(self.state.get_mut().unwrap_or_else(|p| p.into_inner()));
        let pending = state.records;
        if pending == 0 {
            return;
        }
        if !self.flush_on_drop {
            error!(stream = %self.stream, pending, "records lost: the flush on drop failed");
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!(
                stream = %self.stream,
                pending,
                "producer dropped outside a tokio runtime: records lost (call close())"
            );
            return;
        };
        let last = Arc::new(Inner {
            api: self.api.clone(),
            stream: std::mem::take(&mut self.stream),
            cfg: self.cfg.clone(),
            state: Mutex::new(state),
            send: tokio::sync::Mutex::new(()),
            flush_on_drop: false,
        });
        debug!(stream = %last.stream, pending, "producer dropped: flushing in the background");
        runtime.spawn(async move {
            // On failure the records are logged as lost when `last` drops.
            let _ = last.flush().await;
        });
    }
}

/// The background flushing task: stops once the producer is closed or dropped.
async fn flush_every<P: PutRecords>(inner: Weak<Inner<P>>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let (closed, pending) = {
            let st = inner.lock();
            (st.closed, st.records)
        };
        if closed {
            return;
        }
        if pending > 0 {
            // Failures are logged by the flush; the records stay buffered for the next tick.
            let _ = inner.flush().await;
        }
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests;
