//! Reading records from a shard.
//!
//! **Polling** (`polling`) calls `GetRecords` in a task per shard that reads ahead of the
//! processor into a bounded queue (a number of batches *and* a byte budget shared by the
//! worker's shards, so neither a slow processor nor large records make the worker buffer
//! without bound: [`prefetch_usage`] reports what is held). It keeps within Kinesis' 5 reads/s
//! per shard (`PollingConfig::min_interval`), backs off with jitter when throttled, and gets a
//! fresh iterator after the last record it read when one expires.
//!
//! A shard behind its tip asks in each call for what it delivers since the previous call at
//! Kinesis' 2 MiB/s read limit, even when its share of the byte budget is smaller: the budget
//! reserves that room only while the call is in flight and the records only until they are
//! processed, so a worker holding many shards catches up at the shards' pace, and the total
//! stays bounded. When the budget is what limits the pace, the
//! [`PREFETCH_BUDGET_LIMITED_CALLS`](crate::metrics::PREFETCH_BUDGET_LIMITED_CALLS) metric and
//! a warning say so. A quiet shard (empty answers at its tip) is asked less and less often, from
//! `PollingConfig::idle_interval` up to `PollingConfig::idle_max_interval`, and at the pace
//! again as soon as an answer carries records.
//!
//! The [`KinesisApi`] seam is all it needs from Kinesis.

pub mod deagg;
pub(crate) mod fanout;
pub mod kinesis;
pub(crate) mod polling;
pub(crate) mod reader;

#[cfg(feature = "aws")]
pub mod aws;

pub use kinesis::{
    GetRecordsOutput, IteratorPosition, KinesisApi, KinesisApiError, ShardIterator, StreamSummary,
    SubscriptionEvent, SubscriptionStream,
};
pub use polling::{prefetch_usage, reset_prefetch_peak, PrefetchUsage};

use std::time::{Duration, SystemTime};

use crate::config::InitialPosition;
use crate::record::ExtendedSequenceNumber;

/// How far before the moment a reader took its first `LATEST` position it restarts, when its
/// iterator or subscription must be made again before it read a record. `LATEST` is resolved
/// by Kinesis on its clock, while that moment is read from [`KinesisApi::now`], this machine's
/// clock for AWS: the margin covers the skew between the two. Re-delivering a second's worth of
/// older records is harmless for at-least-once processing; skipping records is not.
pub(crate) const LATEST_RESTART_MARGIN: Duration = Duration::from_secs(1);

/// Where a reader that started at `initial` makes its iterator or subscription again when it
/// has not read a record yet. `latest_at` is the stream's time ([`KinesisApi::now`]) taken
/// right before its first `LATEST` position: a fresh `LATEST` would skip what was written
/// since, so it restarts `AT_TIMESTAMP` that moment less [`LATEST_RESTART_MARGIN`]. Any other
/// position is taken again as it is.
pub(crate) fn restart_position(
    initial: &IteratorPosition,
    latest_at: Option<SystemTime>,
) -> IteratorPosition {
    match (initial, latest_at) {
        (IteratorPosition::Latest, Some(t0)) => IteratorPosition::AtTimestamp(
            t0.checked_sub(LATEST_RESTART_MARGIN)
                .map_or(SystemTime::UNIX_EPOCH, |t| t.max(SystemTime::UNIX_EPOCH)),
        ),
        _ => initial.clone(),
    }
}

/// The iterator position that resumes after `checkpoint`. Record checkpoints resume *at* the
/// checkpointed record and filter what was already processed, so a restart inside a KPL
/// aggregate re-delivers none of its checkpointed sub-records. A `LATEST` checkpoint whose
/// meaning a previous owner stored (`latest_resolved_at`, the stream's time it stood for)
/// resumes there, as that owner's own restart would; a fresh `LATEST` would skip what arrived
/// in between.
pub(crate) fn resume_position(
    checkpoint: &ExtendedSequenceNumber,
    latest_resolved_at: Option<SystemTime>,
    initial: InitialPosition,
) -> Option<IteratorPosition> {
    Some(match checkpoint {
        ExtendedSequenceNumber::TrimHorizon => IteratorPosition::TrimHorizon,
        ExtendedSequenceNumber::Latest => {
            restart_position(&IteratorPosition::Latest, latest_resolved_at)
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SequenceNumber;

    #[test]
    fn a_restart_before_the_first_record_never_skips() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let seq = SequenceNumber::from_u128(42);
        let at = |t: SystemTime| IteratorPosition::AtTimestamp(t);
        let cases = [
            // LATEST, once taken at t0: at t0 less the margin.
            (
                IteratorPosition::Latest,
                Some(t0),
                at(t0 - LATEST_RESTART_MARGIN),
            ),
            // Too close to the epoch for the margin: from the epoch.
            (
                IteratorPosition::Latest,
                Some(SystemTime::UNIX_EPOCH),
                at(SystemTime::UNIX_EPOCH),
            ),
            // LATEST not taken yet: LATEST.
            (IteratorPosition::Latest, None, IteratorPosition::Latest),
            // Other positions are fixed already: taken again as they are.
            (
                IteratorPosition::TrimHorizon,
                Some(t0),
                IteratorPosition::TrimHorizon,
            ),
            (at(t0), Some(t0), at(t0)),
            (
                IteratorPosition::AtSequence(seq.clone()),
                None,
                IteratorPosition::AtSequence(seq.clone()),
            ),
            (
                IteratorPosition::AfterSequence(seq.clone()),
                Some(t0),
                IteratorPosition::AfterSequence(seq),
            ),
        ];
        for (initial, latest_at, want) in cases {
            assert_eq!(
                restart_position(&initial, latest_at),
                want,
                "{initial:?} at {latest_at:?}"
            );
        }
    }
}
