//! The one trait users implement, [`RecordProcessor`], and what surrounds it.
//!
//! The worker creates one processor per shard lease it holds (through a [`ProcessorFactory`],
//! usually a closure) and drives it through: `initialize` → `process_records`* → one of
//! `shard_ended` (the shard was read to its end), `shutdown_requested` (graceful stop: last
//! chance to checkpoint) or `lease_lost` (another worker has the shard: do not checkpoint).
//!
//! Callbacks of one processor never run concurrently, and batches arrive in shard order. Keep
//! blocking work off the async runtime (`tokio::task::spawn_blocking`).

pub(crate) mod consumer;
pub mod parallel;
pub mod policy;

use std::fmt;

use async_trait::async_trait;

use std::time::Duration;

use crate::checkpoint::{CheckpointError, Checkpointer, PendingCheckpoint};
use crate::error::BoxError;
use crate::record::{ExtendedSequenceNumber, RecordBatch};
use crate::shard::ShardId;

pub use policy::ErrorPolicy;

/// What a processor learns about its shard at `initialize`.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ShardContext {
    /// The shard.
    pub shard_id: ShardId,
    /// The shard's stream (its name). A multi-stream worker hands one processor per shard of
    /// each stream: this tells them apart.
    pub stream: String,
    /// In multi-stream mode, the stream's identifier (`account:name:creationEpoch`).
    pub stream_identifier: Option<crate::stream::StreamIdentifier>,
    /// Where processing resumes (the stored checkpoint).
    pub checkpoint: ExtendedSequenceNumber,
    /// The shard's parents (already finished).
    pub parent_shard_ids: Vec<ShardId>,
    /// A checkpoint a previous owner prepared but did not commit
    /// ([`Checkpointer::prepare`]): its side effect (named by the state) may or may not have
    /// happened. Finish it (and [`Checkpointer::commit`]) or roll it back
    /// ([`Checkpointer::cancel_prepared`]) before going on; processing resumes at
    /// [`ShardContext::checkpoint`] either way.
    pub pending_checkpoint: Option<PendingCheckpoint>,
}

/// A processor's failure. Build it with [`ProcessorError::retryable`] or
/// [`ProcessorError::fatal`]; the worker's [`ErrorPolicy`] decides what follows.
#[derive(Debug, thiserror::Error)]
#[error("record processor failed ({})", if *.retryable { "retryable" } else { "fatal" })]
pub struct ProcessorError {
    retryable: bool,
    #[source]
    source: BoxError,
}

impl ProcessorError {
    /// A failure worth retrying (e.g. the downstream was unavailable).
    pub fn retryable(e: impl Into<BoxError>) -> Self {
        Self {
            retryable: true,
            source: e.into(),
        }
    }

    /// A failure that retrying will not fix; the error policy decides what happens next, the
    /// default stops the shard and releases its lease.
    pub fn fatal(e: impl Into<BoxError>) -> Self {
        Self {
            retryable: false,
            source: e.into(),
        }
    }

    /// True for [`ProcessorError::retryable`] errors.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

/// `?` on a checkpoint inside a callback: a lost lease or a failing table is retryable (the
/// worker notices a lost lease and stops the processor), a position out of range is a bug in
/// the processor and fatal.
impl From<CheckpointError> for ProcessorError {
    fn from(e: CheckpointError) -> Self {
        match e {
            CheckpointError::LeaseLost { .. } | CheckpointError::Store(_) => Self::retryable(e),
            _ => Self::fatal(e),
        }
    }
}

/// Processes the records of one shard. One instance per held shard lease.
///
/// ```
/// use kcl::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor};
///
/// struct Printer;
///
/// #[async_trait]
/// impl RecordProcessor for Printer {
///     async fn process_records(
///         &mut self,
///         batch: &RecordBatch,
///         cp: &mut Checkpointer,
///     ) -> Result<(), ProcessorError> {
///         for r in batch {
///             println!("{} {}", r.partition_key, r.sequence_number);
///         }
///         cp.checkpoint().await.map_err(ProcessorError::retryable)
///     }
/// }
/// ```
#[async_trait]
pub trait RecordProcessor: Send + 'static {
    /// Called once before the first batch.
    ///
    /// # Errors
    /// A failure is handled by the worker's [`ErrorPolicy`].
    async fn initialize(&mut self, shard: &ShardContext) -> Result<(), ProcessorError> {
        let _ = shard;
        Ok(())
    }

    /// Processes one batch. Checkpoint through `cp` when the records are durable downstream:
    /// here it may cover the whole batch. The batch is passed by reference so that the error
    /// policy can retry it as it was. A panic is caught and handled as a fatal error.
    ///
    /// # Errors
    /// A failure is handled by the worker's [`ErrorPolicy`]; records are never skipped
    /// silently.
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError>;

    /// The shard was read to its end. The default checkpoints `SHARD_END`, which lets the
    /// child shards start; an override must do so too (`cp.checkpoint()`), once everything it
    /// buffered is durable. `SHARD_END` is stored when this returns `Ok`, never before.
    ///
    /// # Errors
    /// A failure (or a return without checkpointing) is retried; children wait until
    /// `SHARD_END` is stored.
    async fn shard_ended(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        cp.checkpoint().await.map_err(ProcessorError::retryable)
    }

    /// How long the shard may stay quiet (no records) before [`RecordProcessor::idle`] is
    /// called, and then how often while it stays quiet. Asked once, after `initialize`.
    /// `None` (the default) never calls it. Processors that buffer records for a sink use it
    /// to flush and checkpoint on a quiet stream.
    fn idle_interval(&self) -> Option<Duration> {
        None
    }

    /// The shard was quiet for [`RecordProcessor::idle_interval`]. `cp` covers what was
    /// processed (as in `shutdown_requested`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use kcl::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor};
    ///
    /// /// Buffers records and writes them out every 1 000 records, or after 5 quiet seconds.
    /// struct Buffered(Vec<bytes::Bytes>);
    ///
    /// impl Buffered {
    ///     async fn flush(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
    ///         // … write self.0 to the sink …
    ///         self.0.clear();
    ///         cp.checkpoint().await?;
    ///         Ok(())
    ///     }
    /// }
    ///
    /// #[async_trait]
    /// impl RecordProcessor for Buffered {
    ///     async fn process_records(&mut self, batch: &RecordBatch, cp: &mut Checkpointer)
    ///         -> Result<(), ProcessorError> {
    ///         self.0.extend(batch.records.iter().map(|r| r.data.clone()));
    ///         if self.0.len() >= 1_000 { self.flush(cp).await?; }
    ///         Ok(())
    ///     }
    ///     fn idle_interval(&self) -> Option<Duration> { Some(Duration::from_secs(5)) }
    ///     async fn idle(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
    ///         self.flush(cp).await
    ///     }
    ///     async fn shutdown_requested(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
    ///         self.flush(cp).await
    ///     }
    /// }
    /// ```
    ///
    /// # Errors
    /// Handled by the worker's [`ErrorPolicy`] (a retryable error: called again at the next
    /// tick).
    async fn idle(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        let _ = cp;
        Ok(())
    }

    /// Another worker has the shard now. Do not checkpoint (it would be refused).
    async fn lease_lost(&mut self) {}

    /// The worker is shutting down gracefully, handing the shard over, or stopping it after a
    /// failure: checkpoint what was processed. `cp.checkpoint()` here covers the batches whose
    /// `process_records` returned `Ok`, never one that failed, so the next owner starts at the
    /// first record not processed. The lease is released afterwards.
    ///
    /// With the manual [`CheckpointPolicy`](crate::CheckpointPolicy) (the default), a planned
    /// move causes no duplicates only if this checkpoints: the default does nothing. With an
    /// automatic policy the worker checkpoints the processed watermark after this returns.
    ///
    /// # Errors
    /// Logged; the lease is released anyway.
    async fn shutdown_requested(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        let _ = cp;
        Ok(())
    }
}

/// Creates one processor per shard lease. Implemented for closures `Fn() -> P`.
pub trait ProcessorFactory: Send + Sync + 'static {
    /// A processor for `shard`.
    fn create(&self, shard: &ShardId) -> Box<dyn RecordProcessor>;
}

impl<F, P> ProcessorFactory for F
where
    F: Fn() -> P + Send + Sync + 'static,
    P: RecordProcessor,
{
    fn create(&self, _shard: &ShardId) -> Box<dyn RecordProcessor> {
        Box::new(self())
    }
}

/// A factory that sees the shard id: `ProcessorFactoryFn(|shard| …)`.
pub struct ProcessorFactoryFn<F>(pub F);

impl<F> fmt::Debug for ProcessorFactoryFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProcessorFactoryFn")
    }
}

impl<F, P> ProcessorFactory for ProcessorFactoryFn<F>
where
    F: Fn(&ShardId) -> P + Send + Sync + 'static,
    P: RecordProcessor,
{
    fn create(&self, shard: &ShardId) -> Box<dyn RecordProcessor> {
        Box::new((self.0)(shard))
    }
}
