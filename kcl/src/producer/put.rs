//! The `PutRecords` seam: the one Kinesis call a producer needs.
//!
//! Implementations: [`crate::producer::aws::AwsPutRecords`] over `aws-sdk-kinesis` (feature
//! `aws`), and `testkit::MemKinesis` in memory (feature `testkit`).

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;

use crate::record::SequenceNumber;
use crate::retrieval::KinesisApiError;
use crate::shard::{hash_key, ShardId};

/// One record of a `PutRecords` call.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PutRecordsEntry {
    /// The payload.
    pub data: Bytes,
    /// The partition key (1 to 256 Unicode characters).
    pub partition_key: String,
    /// Routes the record by this hash key instead of the MD5 of the partition key.
    pub explicit_hash_key: Option<u128>,
}

impl PutRecordsEntry {
    /// An entry routed by its partition key's hash unless `explicit_hash_key` is set.
    pub fn new(
        data: Bytes,
        partition_key: impl Into<String>,
        explicit_hash_key: Option<u128>,
    ) -> Self {
        Self {
            data,
            partition_key: partition_key.into(),
            explicit_hash_key,
        }
    }

    /// The hash key Kinesis routes the entry by.
    pub fn hash_key(&self) -> u128 {
        self.explicit_hash_key
            .unwrap_or_else(|| hash_key(&self.partition_key))
    }

    /// The bytes the entry counts for in Kinesis' limits: data plus partition key.
    pub fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

impl fmt::Debug for PutRecordsEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutRecordsEntry")
            .field("partition_key", &self.partition_key)
            .field("explicit_hash_key", &self.explicit_hash_key)
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// The outcome of one entry of a `PutRecords` call.
///
/// ```
/// # use kcl::producer::PutRecordsResult;
/// # fn f(r: &PutRecordsResult) {
/// match r {
///     PutRecordsResult::Accepted { shard_id, sequence_number } => {}
///     PutRecordsResult::Rejected { error_code, message } => {}
///     _ => {}
/// }
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PutRecordsResult {
    /// Stored.
    Accepted {
        /// The shard it went to.
        shard_id: ShardId,
        /// Its sequence number.
        sequence_number: SequenceNumber,
    },
    /// Not stored (`ProvisionedThroughputExceededException`, `InternalFailure`, a KMS error…):
    /// the producer sends it again.
    Rejected {
        /// The entry's `ErrorCode`.
        error_code: String,
        /// The entry's `ErrorMessage`.
        message: String,
    },
}

/// The `PutRecords` operation.
///
/// Errors use the Kinesis seam's [`KinesisApiError`]: an error of the whole call
/// ([`is_retryable`](KinesisApiError::is_retryable) decides whether the producer tries again);
/// entries refused one by one come back as [`PutRecordsResult::Rejected`].
#[async_trait]
pub trait PutRecords: Send + Sync + fmt::Debug + 'static {
    /// Puts `entries` (at most 500, at most 5 MiB of data and partition keys) to `stream`.
    ///
    /// Returns one result per entry, in the order of `entries`. Entries that go to the same
    /// shard and are accepted get increasing sequence numbers in the order of `entries`.
    ///
    /// # Errors
    /// [`KinesisApiError`] when the call as a whole failed (then no entry is known to be stored).
    async fn put_records(
        &self,
        stream: &str,
        entries: &[PutRecordsEntry],
    ) -> Result<Vec<PutRecordsResult>, KinesisApiError>;
}

#[async_trait]
impl<P: PutRecords + ?Sized> PutRecords for std::sync::Arc<P> {
    async fn put_records(
        &self,
        stream: &str,
        entries: &[PutRecordsEntry],
    ) -> Result<Vec<PutRecordsResult>, KinesisApiError> {
        (**self).put_records(stream, entries).await
    }
}
