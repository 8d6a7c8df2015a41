//! What happens when a processor fails. Records are never skipped silently.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::ProcessorError;
use crate::record::RecordBatch;

/// A user callback that takes a failed batch (e.g. to a dead-letter queue).
pub type FailedBatchHandler = Arc<dyn Fn(&RecordBatch, &ProcessorError) + Send + Sync>;

/// The worker's answer to a `process_records` error.
#[derive(Clone)]
#[non_exhaustive]
pub enum ErrorPolicy {
    /// Retry the same batch with exponential backoff (the default). Fatal errors stop the
    /// shard instead, as [`ErrorPolicy::StopShard`].
    Retry {
        /// First delay.
        min_delay: Duration,
        /// Largest delay.
        max_delay: Duration,
    },
    /// Stop processing the shard and release its lease; this worker will not take it again
    /// until restarted (another worker may).
    StopShard,
    /// Hand the batch to a callback, then go on with the next batch.
    Handoff(FailedBatchHandler),
}

impl Default for ErrorPolicy {
    fn default() -> Self {
        Self::Retry {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl ErrorPolicy {
    /// [`ErrorPolicy::Handoff`] from a closure.
    pub fn handoff(f: impl Fn(&RecordBatch, &ProcessorError) + Send + Sync + 'static) -> Self {
        Self::Handoff(Arc::new(f))
    }
}

impl fmt::Debug for ErrorPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retry {
                min_delay,
                max_delay,
            } => f
                .debug_struct("Retry")
                .field("min_delay", min_delay)
                .field("max_delay", max_delay)
                .finish(),
            Self::StopShard => f.write_str("StopShard"),
            Self::Handoff(_) => f.write_str("Handoff(..)"),
        }
    }
}
