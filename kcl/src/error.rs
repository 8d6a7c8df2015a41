//! The crate's top-level error: one variant per seam, so users can `?` everything into it.

use crate::checkpoint::CheckpointError;
use crate::config::ConfigError;
use crate::lease::LeaseStoreError;
use crate::processor::ProcessorError;
use crate::retrieval::KinesisApiError;

/// A boxed error from a backend (SDK errors never appear in public signatures).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

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
}
