//! When the worker checkpoints on the processor's behalf.

use std::time::Duration;

use crate::config::ConfigError;

/// Who checkpoints, and how often. Set with
/// [`WorkerBuilder::checkpoint_policy`](crate::WorkerBuilder::checkpoint_policy).
///
/// - [`CheckpointPolicy::Manual`] (the default): the processor checkpoints through its
///   [`Checkpointer`](crate::Checkpointer). For a planned move (graceful shutdown, handoff) to
///   cause no duplicates, `shutdown_requested` must checkpoint.
/// - Automatic ([`CheckpointPolicy::after_every_batch`], [`CheckpointPolicy::every`]): the
///   worker checkpoints the processed watermark (the last batch whose `process_records`
///   returned `Ok`) after every batch, or once `records` records or `interval` have passed
///   since the last checkpoint, whichever comes first (the interval also on a quiet shard);
///   and always once more after `shutdown_requested`, before the lease is released or handed
///   over. The processor may still checkpoint by itself.
///
/// An automatic policy suits processors whose work is done when `process_records` returns.
/// One that buffers records for a sink (S3, a database) must checkpoint itself once they are
/// durable: keep the manual policy.
///
/// ```
/// use std::time::Duration;
/// use kcl::checkpoint::CheckpointPolicy;
///
/// let policy = CheckpointPolicy::every(10_000, Duration::from_secs(5));
/// assert!(policy.is_automatic());
/// assert!(policy.is_due(10_000, Duration::from_secs(1))); // enough records
/// assert!(policy.is_due(1, Duration::from_secs(5)));      // long enough
/// assert!(!policy.is_due(0, Duration::from_secs(60)));    // nothing new to checkpoint
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckpointPolicy {
    /// The processor checkpoints by itself.
    #[default]
    Manual,
    /// The worker checkpoints after `records` records or `interval`, whichever comes first;
    /// after every batch when both are `None`.
    Automatic {
        /// Checkpoint once this many records were processed since the last checkpoint.
        records: Option<u64>,
        /// Checkpoint once this long has passed since the last checkpoint.
        interval: Option<Duration>,
    },
}

impl CheckpointPolicy {
    /// The processor checkpoints by itself (the default).
    pub const fn manual() -> Self {
        Self::Manual
    }

    /// The worker checkpoints after every batch processed successfully.
    pub const fn after_every_batch() -> Self {
        Self::Automatic {
            records: None,
            interval: None,
        }
    }

    /// The worker checkpoints after `records` records or `interval`, whichever comes first.
    pub const fn every(records: u64, interval: Duration) -> Self {
        Self::Automatic {
            records: Some(records),
            interval: Some(interval),
        }
    }

    /// The worker checkpoints after every `records` records processed.
    pub const fn every_records(records: u64) -> Self {
        Self::Automatic {
            records: Some(records),
            interval: None,
        }
    }

    /// The worker checkpoints every `interval` while there is something new to checkpoint.
    pub const fn every_interval(interval: Duration) -> Self {
        Self::Automatic {
            records: None,
            interval: Some(interval),
        }
    }

    /// True unless [`CheckpointPolicy::Manual`].
    pub fn is_automatic(&self) -> bool {
        matches!(self, Self::Automatic { .. })
    }

    /// Whether the worker checkpoints now, with `unsaved` records processed and `elapsed`
    /// since the last checkpoint.
    pub fn is_due(&self, unsaved: u64, elapsed: Duration) -> bool {
        match *self {
            Self::Manual => false,
            _ if unsaved == 0 => false,
            Self::Automatic {
                records: None,
                interval: None,
            } => true,
            Self::Automatic { records, interval } => {
                records.is_some_and(|n| unsaved >= n) || interval.is_some_and(|t| elapsed >= t)
            }
        }
    }

    /// The interval after which a checkpoint is due even on a quiet shard.
    pub(crate) fn interval(&self) -> Option<Duration> {
        match *self {
            Self::Automatic { interval, .. } => interval,
            Self::Manual => None,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if let Self::Automatic { records, interval } = *self {
            if records == Some(0) {
                return Err(ConfigError::new(
                    "checkpoint_policy",
                    "records must be at least 1",
                ));
            }
            if interval.is_some_and(|t| t.is_zero()) {
                return Err(ConfigError::new(
                    "checkpoint_policy",
                    "interval must be positive",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_is_due_at_whichever_limit_comes_first() {
        let s = Duration::from_secs;
        #[rustfmt::skip]
        let table = [
            // policy, unsaved records, since the last checkpoint, due
            (CheckpointPolicy::Manual, 1_000_000, s(3600), false),
            (CheckpointPolicy::after_every_batch(), 1, s(0), true),
            (CheckpointPolicy::after_every_batch(), 0, s(3600), false),
            (CheckpointPolicy::every(100, s(10)), 99, s(9), false),
            (CheckpointPolicy::every(100, s(10)), 100, s(0), true),
            (CheckpointPolicy::every(100, s(10)), 1, s(10), true),
            (CheckpointPolicy::every(100, s(10)), 0, s(10), false),
            (CheckpointPolicy::every_records(5), 4, s(3600), false),
            (CheckpointPolicy::every_records(5), 5, s(0), true),
            (CheckpointPolicy::every_interval(s(2)), 1_000_000, s(1), false),
            (CheckpointPolicy::every_interval(s(2)), 1, s(2), true),
        ];
        for (policy, unsaved, elapsed, due) in table {
            assert_eq!(
                policy.is_due(unsaved, elapsed),
                due,
                "{policy:?} with {unsaved} unsaved after {elapsed:?}"
            );
        }
    }

    #[test]
    fn out_of_range_policies_name_the_field() {
        for bad in [
            CheckpointPolicy::every_records(0),
            CheckpointPolicy::every_interval(Duration::ZERO),
            CheckpointPolicy::every(0, Duration::from_secs(1)),
        ] {
            let e = bad.validate().expect_err("invalid");
            assert_eq!(e.field(), "checkpoint_policy", "{bad:?}");
        }
        assert!(CheckpointPolicy::after_every_batch().validate().is_ok());
        assert!(CheckpointPolicy::Manual.validate().is_ok());
    }
}
