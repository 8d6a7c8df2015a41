//! The `KinesisApi` seam: the few Kinesis calls a consumer needs.
//!
//! Implementations: [`crate::retrieval::aws::AwsKinesis`] over `aws-sdk-kinesis`, and
//! `testkit::MemKinesis` in memory.

use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::error::BoxError;
use crate::record::{Record, SequenceNumber};
use crate::shard::{ChildShard, Shard, ShardId};

/// Where a shard iterator starts.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IteratorPosition {
    /// The oldest record still in the shard.
    TrimHorizon,
    /// After the newest record.
    Latest,
    /// The first record that arrived at or after the time.
    AtTimestamp(SystemTime),
    /// At the record with this sequence number.
    AtSequence(SequenceNumber),
    /// Just after the record with this sequence number.
    AfterSequence(SequenceNumber),
}

/// An opaque shard iterator (valid for 5 minutes on AWS).
#[derive(Clone, PartialEq, Eq)]
pub struct ShardIterator(String);

impl ShardIterator {
    /// Wraps an iterator string.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The iterator string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ShardIterator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Iterators are long base64 blobs; a prefix is enough to tell them apart in logs.
        let shown: String = self.0.chars().take(16).collect();
        write!(f, "ShardIterator({shown}…)")
    }
}

/// The answer of one `GetRecords` call.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct GetRecordsOutput {
    /// The records, oldest first.
    pub records: Vec<Record>,
    /// Where to read next; `None` once a closed shard was read to its end.
    pub next_iterator: Option<ShardIterator>,
    /// How far behind the tip of the shard the response is.
    pub millis_behind_latest: Option<u64>,
    /// At a closed shard's end: its children.
    pub child_shards: Vec<ChildShard>,
}

impl GetRecordsOutput {
    /// A response.
    pub fn new(
        records: Vec<Record>,
        next_iterator: Option<ShardIterator>,
        millis_behind_latest: Option<u64>,
        child_shards: Vec<ChildShard>,
    ) -> Self {
        Self {
            records,
            next_iterator,
            millis_behind_latest,
            child_shards,
        }
    }
}

/// One event of an enhanced fan-out subscription (`SubscribeToShard`).
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct SubscriptionEvent {
    /// The records, oldest first (may be empty).
    pub records: Vec<Record>,
    /// Where to resubscribe from; `None` once the shard ended.
    pub continuation_sequence_number: Option<SequenceNumber>,
    /// How far behind the tip of the shard the event is.
    pub millis_behind_latest: Option<u64>,
    /// At a closed shard's end: its children.
    pub child_shards: Vec<ChildShard>,
}

impl SubscriptionEvent {
    /// An event.
    pub fn new(
        records: Vec<Record>,
        continuation_sequence_number: Option<SequenceNumber>,
        millis_behind_latest: Option<u64>,
        child_shards: Vec<ChildShard>,
    ) -> Self {
        Self {
            records,
            continuation_sequence_number,
            millis_behind_latest,
            child_shards,
        }
    }
}

/// The events of one subscription; it ends after about 5 minutes (then resubscribe from the
/// last continuation sequence number) or with an error.
pub type SubscriptionStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<SubscriptionEvent, KinesisApiError>> + Send>,
>;

/// Errors of the Kinesis seam, classified so the retrieval layer can act on them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KinesisApiError {
    /// The shard iterator is older than 5 minutes: get a new one from the last position.
    #[error("the shard iterator expired")]
    ExpiredIterator,
    /// The shard's read limits (5 calls/s, 2 MB/s) were exceeded: back off.
    #[error("read throughput exceeded")]
    Throttled(#[source] BoxError),
    /// The stream or shard does not exist (or no longer exists: trimmed away).
    #[error("not found: {0}")]
    NotFound(String),
    /// A timeout, a dropped connection or a 5xx: retry with backoff.
    #[error("kinesis is unavailable")]
    Transient(#[source] BoxError),
    /// A record or response that does not decode (e.g. a malformed sequence number).
    #[error("malformed response: {0}")]
    Malformed(String),
    /// Anything else (bad credentials, validation): not retried.
    #[error("kinesis request failed")]
    Other(#[source] BoxError),
}

impl KinesisApiError {
    /// True for failures that may succeed when retried.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Throttled(_) | Self::Transient(_))
    }
}

/// What [`KinesisApi::describe_stream`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamSummary {
    /// The stream's ARN (`arn:aws:kinesis:region:account:stream/name`).
    pub arn: String,
    /// When the stream was created.
    pub created: SystemTime,
}

impl StreamSummary {
    /// A summary (for implementations of [`KinesisApi`]).
    ///
    /// ```
    /// let s = kcl::retrieval::StreamSummary::new(
    ///     "arn:aws:kinesis:us-east-1:123456789012:stream/orders",
    ///     std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
    /// );
    /// assert!(s.arn.ends_with("/orders"));
    /// ```
    pub fn new(arn: impl Into<String>, created: SystemTime) -> Self {
        Self {
            arn: arn.into(),
            created,
        }
    }
}

/// The Kinesis operations a consumer needs.
#[async_trait]
pub trait KinesisApi: Send + Sync + fmt::Debug + 'static {
    /// Every shard of the stream (all pages), open and closed.
    async fn list_shards(&self, stream: &str) -> Result<Vec<Shard>, KinesisApiError>;

    /// A shard iterator at `position`.
    async fn get_shard_iterator(
        &self,
        stream: &str,
        shard: &ShardId,
        position: &IteratorPosition,
    ) -> Result<ShardIterator, KinesisApiError>;

    /// Up to `limit` records (at most 10 000) from `iterator`.
    async fn get_records(
        &self,
        iterator: &ShardIterator,
        limit: u32,
    ) -> Result<GetRecordsOutput, KinesisApiError>;

    /// The stream's wall clock: the clock Kinesis stamps records' arrival times with, which
    /// `AT_TIMESTAMP` positions are compared against. By default this machine's clock (AWS's
    /// clock differs from it by the clock skew, which callers allow for); the in-memory Kinesis
    /// overrides it with its own clock, which follows tokio's (virtual, under simulation).
    ///
    /// A reader that starts at `LATEST` notes this time right before its first position is
    /// taken, so that a restart before its first record (an iterator that expired, a
    /// subscription that broke) resumes `AT_TIMESTAMP` that moment instead of a later `LATEST`,
    /// which would skip what was written in between. Wrappers of another `KinesisApi` should
    /// forward it.
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    /// The stream's ARN and creation time (`DescribeStreamSummary`): a multi-stream worker
    /// names the stream `account:name:creationEpoch` from them.
    async fn describe_stream(&self, stream: &str) -> Result<StreamSummary, KinesisApiError> {
        let _ = stream;
        Err(KinesisApiError::Other(
            format!("{self:?} does not describe streams (multi-stream mode needs it)").into(),
        ))
    }

    /// Enhanced fan-out: finds the stream consumer `consumer_name` or registers it, waits
    /// until it is `ACTIVE`, and returns its ARN. Idempotent: an existing `ACTIVE` consumer of
    /// that name is returned as it is (it is how a deregistered consumer is registered again).
    async fn register_stream_consumer(
        &self,
        stream: &str,
        consumer_name: &str,
    ) -> Result<String, KinesisApiError> {
        let _ = (stream, consumer_name);
        Err(KinesisApiError::Other(
            format!("{self:?} does not support enhanced fan-out").into(),
        ))
    }

    /// Enhanced fan-out: subscribes `consumer_arn` to `shard` from `position` (only
    /// `AtSequence`, `AfterSequence`, `TrimHorizon`, `Latest`, `AtTimestamp`).
    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard: &ShardId,
        position: &IteratorPosition,
    ) -> Result<SubscriptionStream, KinesisApiError> {
        let _ = (consumer_arn, shard, position);
        Err(KinesisApiError::Other(
            format!("{self:?} does not support enhanced fan-out").into(),
        ))
    }
}
