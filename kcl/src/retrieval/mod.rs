//! Reading records from a shard.
//!
//! **Polling** (`polling`) calls `GetRecords` in a task per shard that reads ahead of the
//! processor into a bounded queue (a number of batches *and* a byte budget shared by the
//! worker's shards, so neither a slow processor nor large records make the worker buffer
//! without bound: [`prefetch_usage`] reports what is held). It keeps within Kinesis' 5 reads/s
//! per shard (`PollingConfig::min_interval`), backs off with jitter when throttled, and gets a
//! fresh iterator after the last record it read when one expires.
//!
//! The [`KinesisApi`] seam is all it needs from Kinesis.

pub mod deagg;
pub(crate) mod fanout;
pub mod kinesis;
pub(crate) mod polling;

#[cfg(feature = "aws")]
pub mod aws;

pub use kinesis::{
    GetRecordsOutput, IteratorPosition, KinesisApi, KinesisApiError, ShardIterator,
    SubscriptionEvent, SubscriptionStream,
};
pub use polling::{prefetch_usage, reset_prefetch_peak, PrefetchUsage};

use crate::config::InitialPosition;
use crate::record::ExtendedSequenceNumber;

/// The iterator position that resumes after `checkpoint`. Record checkpoints resume *at* the
/// checkpointed record and filter what was already processed, so a restart inside a KPL
/// aggregate re-delivers none of its checkpointed sub-records.
pub(crate) fn resume_position(
    checkpoint: &ExtendedSequenceNumber,
    initial: InitialPosition,
) -> Option<IteratorPosition> {
    Some(match checkpoint {
        ExtendedSequenceNumber::TrimHorizon => IteratorPosition::TrimHorizon,
        ExtendedSequenceNumber::Latest => IteratorPosition::Latest,
        ExtendedSequenceNumber::AtTimestamp => match initial {
            InitialPosition::AtTimestamp(t) => IteratorPosition::AtTimestamp(t),
            // A table written with AT_TIMESTAMP read by a worker configured otherwise: the
            // timestamp is not stored in the lease (as in the Java KCL), so start at the oldest
            // record rather than lose any.
            _ => IteratorPosition::TrimHorizon,
        },
        ExtendedSequenceNumber::Sequence { sequence, .. } => {
            IteratorPosition::AtSequence(sequence.clone())
        }
        ExtendedSequenceNumber::ShardEnd => return None,
    })
}
