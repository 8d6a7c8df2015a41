//! The crate's top-level error: one variant per seam, so users can `?` everything into it.

use crate::checkpoint::CheckpointError;
use crate::config::ConfigError;
use crate::lease::LeaseStoreError;
use crate::processor::ProcessorError;
use crate::retrieval::KinesisApiError;

/// A boxed error from a backend (SDK errors never appear in public signatures).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error and its sources, joined by `: ` — for logs and reports (an SDK error's cause,
/// such as DynamoDB's message, is in its sources, not in its own text).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop a [`crate::Worker`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The lease table failed.
    #[error(transparent)]
    LeaseStore(#[from] LeaseStoreError),
    /// Kinesis failed.
    #[error(transparent)]
    Kinesis(#[from] KinesisApiError),
    /// A checkpoint was refused.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A record processor failed fatally.
    #[error(transparent)]
    Processor(#[from] ProcessorError),
    /// The signal handlers could not be installed ([`crate::Worker::run_until_signal`]).
    #[error("installing the signal handlers failed")]
    Signal(#[source] std::io::Error),
    /// A graceful shutdown did not finish within `shutdown_timeout`: the processors of these
    /// shards were still running and were abandoned. Their leases were not released: peers
    /// take them once they expire (after `lease_duration`), from their last checkpoint.
    #[error(
        "shutdown_timeout passed with {} processor(s) still running (shards {}); abandoned them: \
         their leases expire after the lease duration",
        .shards.len(),
        .shards.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
    )]
    Abandoned {
        /// The shards whose processors were abandoned.
        shards: Vec<crate::shard::ShardId>,
    },
    /// The lease table holds leases of the other mode (single-stream leases for a
    /// multi-stream worker, or the reverse): taking them would mistake other streams' shards
    /// for this worker's.
    #[error("lease table {table}: {found}")]
    TableMode {
        /// The lease table.
        table: String,
        /// What was found, with an example key.
        found: String,
    },
    /// A stream of a multi-stream worker could not be named (`DescribeStreamSummary` failed
    /// or returned no usable ARN), or the stream discovery callback failed at start.
    #[error("stream {stream}: {reason}")]
    Stream {
        /// The stream.
        stream: String,
        /// Why.
        reason: String,
    },
}

#[cfg(test)]
mod chain_tests {
    use crate::lease::LeaseStoreError;

    #[test]
    fn a_chain_shows_the_cause_behind_the_error() {
        let e = LeaseStoreError::Other("ResourceNotFoundException: table kcl-app not found".into());
        assert_eq!(
            super::chain(&e),
            "lease table request failed: ResourceNotFoundException: table kcl-app not found"
        );
    }
}
