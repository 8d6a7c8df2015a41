//! Checkpoints: how far a shard was processed, stored in its lease.
//!
//! A [`Checkpointer`] is handed to every processor callback. It only accepts positions the
//! processor was given (never beyond the last delivered record) and never behind the current
//! checkpoint, and only while this worker holds the lease: the write is conditional on the
//! lease counter, so a worker that lost its lease cannot move the checkpoint.

mod policy;

pub use policy::CheckpointPolicy;

use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use bytes::Bytes;

use crate::lease::coordinator::HeldLease;
use crate::lease::write::LeaseWrite;
use crate::lease::{LeaseStore, LeaseStoreError};
use crate::record::{ExtendedSequenceNumber, InvalidSequenceNumber, Record};
use crate::shard::{ChildShard, ShardId};

/// A refused or failed checkpoint. The rejected position comes back inside the error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// This worker no longer holds the lease; the processor must stop (it will get
    /// `lease_lost`).
    #[error("shard {shard}: the lease is no longer held by this worker")]
    LeaseLost {
        /// The shard.
        shard: ShardId,
    },
    /// The position is behind the stored checkpoint; checkpoints never go backwards.
    #[error("checkpoint {requested} is behind the current checkpoint {current}")]
    Behind {
        /// What was asked for.
        requested: ExtendedSequenceNumber,
        /// The stored checkpoint.
        current: ExtendedSequenceNumber,
    },
    /// The position is beyond what may be checkpointed now: inside `process_records`, the
    /// current batch's last record; in any other callback, the last record processed
    /// successfully (a batch whose processing failed is never covered).
    #[error("checkpoint {requested} is beyond the last processed record ({limit:?})")]
    NotProcessed {
        /// What was asked for.
        requested: ExtendedSequenceNumber,
        /// The furthest position that may be checkpointed now, if any.
        limit: Option<ExtendedSequenceNumber>,
    },
    /// [`Checkpointer::commit`] found no prepared checkpoint in the lease.
    #[error("shard {shard}: no prepared checkpoint to commit")]
    NothingPrepared {
        /// The shard.
        shard: ShardId,
    },
    /// A sequence number that does not parse.
    #[error(transparent)]
    InvalidSequence(#[from] InvalidSequenceNumber),
    /// The lease table failed (after retries).
    #[error("checkpoint could not be stored")]
    Store(#[source] LeaseStoreError),
}

/// A checkpoint prepared but not committed yet (two-phase checkpoints): the position and the
/// application's state stored with it in the lease (`pendingCheckpoint*`).
///
/// Prepare before a side effect that cannot be undone by re-processing alone (an upload under
/// a chosen key, a transaction with a chosen id), commit once it is done. A new owner that
/// finds a pending checkpoint in [`ShardContext::pending_checkpoint`](crate::ShardContext)
/// knows the previous owner may have done the side effect, and what it was.
///
/// ```
/// use kcl::checkpoint::PendingCheckpoint;
/// use kcl::{ExtendedSequenceNumber, SequenceNumber};
///
/// let upto = ExtendedSequenceNumber::at(SequenceNumber::from_u128(42), 0);
/// let pending = PendingCheckpoint::new(upto, Some("logs/2026/12/01/obj-1.jsonl".into()));
/// assert_eq!(pending.state().map(|s| &s[..]), Some(&b"logs/2026/12/01/obj-1.jsonl"[..]));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PendingCheckpoint {
    /// The prepared position.
    pub position: ExtendedSequenceNumber,
    /// The application's state (binary; an empty state is stored as none).
    pub state: Option<Bytes>,
}

impl PendingCheckpoint {
    /// A pending checkpoint at `position` with `state`.
    pub fn new(position: ExtendedSequenceNumber, state: Option<Bytes>) -> Self {
        Self { position, state }
    }

    /// The prepared position.
    pub fn position(&self) -> &ExtendedSequenceNumber {
        &self.position
    }

    /// The application's state.
    pub fn state(&self) -> Option<&Bytes> {
        self.state.as_ref()
    }

    /// The pending checkpoint stored in `lease`, if any.
    pub fn of(lease: &crate::Lease) -> Option<Self> {
        lease.pending_checkpoint.clone().map(|position| Self {
            position,
            state: lease.pending_checkpoint_state.clone(),
        })
    }
}

/// Which processor callback is running: it decides how far a checkpoint may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// `process_records` of a batch: the batch may be checkpointed, up to its last record.
    Batch,
    /// `shard_ended`: `SHARD_END` may be requested.
    ShardEnd,
    /// Any other callback: only what was processed.
    Other,
}

/// Stores checkpoints for one shard lease. Handed to each processor callback.
///
/// A checkpoint never covers a record whose processing failed. Inside
/// [`RecordProcessor::process_records`](crate::RecordProcessor::process_records) it may reach
/// the last record of the batch being processed; in every other callback
/// (`shutdown_requested` at a graceful stop or handoff, `shard_ended`, …) only the **processed
/// watermark**: the last record of the last batch whose `process_records` returned `Ok` (or
/// that the [`ErrorPolicy`](crate::ErrorPolicy) handed to its dead-letter handler). So a
/// batch that failed, then met a shutdown, a handoff or a stop, is read again by the next owner.
#[derive(Debug)]
pub struct Checkpointer {
    shard: ShardId,
    held: Arc<HeldLease>,
    store: Arc<dyn LeaseStore>,
    scope: Scope,
    /// The last record handed to the processor (processed or not).
    delivered: Option<ExtendedSequenceNumber>,
    /// The last record of the last batch processed successfully.
    processed: Option<ExtendedSequenceNumber>,
    /// Set once the processor reported its own watermark ([`Checkpointer::processed_through`]):
    /// from then on the watermark moves only by its reports, never at the end of a batch.
    reported: bool,
    /// Set once the shard's end was reached: the children recorded with `SHARD_END`.
    children: Option<Vec<ChildShard>>,
    /// `SHARD_END` was asked for inside `shard_ended`; written once it returns `Ok`.
    shard_end_requested: bool,
    /// Told of every write stored (the testkit's processor harness records them).
    observer: Option<Observer>,
    /// Checkpoints written and their record age (none outside a worker).
    metrics: Option<Arc<crate::metrics::ShardMetrics>>,
    /// The arrival of the first record of the oldest batch handed over since the last
    /// checkpoint written (see [`crate::metrics::CHECKPOINT_RECORD_AGE`]).
    oldest_unsaved: Option<std::time::SystemTime>,
}

/// A callback told of every checkpoint write stored.
#[derive(Clone)]
pub(crate) struct Observer(pub(crate) Arc<dyn Fn(&LeaseWrite) + Send + Sync>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

impl Checkpointer {
    pub(crate) fn new(shard: ShardId, held: Arc<HeldLease>, store: Arc<dyn LeaseStore>) -> Self {
        Self {
            shard,
            held,
            store,
            scope: Scope::Other,
            delivered: None,
            processed: None,
            reported: false,
            children: None,
            shard_end_requested: false,
            observer: None,
            metrics: None,
            oldest_unsaved: None,
        }
    }

    /// Counts the checkpoints written in `metrics`.
    pub(crate) fn with_metrics(mut self, metrics: Arc<crate::metrics::ShardMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// A batch whose first record arrived at `arrival` is handed to the processor.
    pub(crate) fn note_arrival(&mut self, arrival: Option<std::time::SystemTime>) {
        if self.oldest_unsaved.is_none() {
            self.oldest_unsaved = arrival;
        }
    }

    /// Tells `observer` of every write stored from now on.
    pub(crate) fn observe(&mut self, observer: Observer) {
        self.observer = Some(observer);
    }

    /// `process_records` is about to run on a batch ending at `last`.
    pub(crate) fn begin_batch(&mut self, last: ExtendedSequenceNumber) {
        self.delivered = Some(last);
        self.scope = Scope::Batch;
    }

    /// `process_records` returned: `processed` if it returned `Ok` (or the dead-letter handler
    /// took the batch). Only then does the processed watermark move, and only for a
    /// processor that does not report its own ([`Checkpointer::processed_through`]).
    pub(crate) fn end_batch(&mut self, processed: bool) {
        if processed && self.scope == Scope::Batch && !self.reported {
            self.processed = self.delivered.clone();
        }
        self.scope = Scope::Other;
    }

    /// The shard was read to its end; `shard_ended` is about to run.
    pub(crate) fn begin_shard_end(&mut self, children: Vec<ChildShard>) {
        self.children = Some(children);
        self.shard_end_requested = false;
        self.scope = Scope::ShardEnd;
    }

    /// `shard_ended` returned; true if it asked for `SHARD_END`.
    pub(crate) fn end_shard_end(&mut self) -> bool {
        self.scope = Scope::Other;
        std::mem::take(&mut self.shard_end_requested)
    }

    /// The shard this checkpointer writes for.
    pub fn shard_id(&self) -> &ShardId {
        &self.shard
    }

    /// The last record handed to the processor, whether or not its batch was processed.
    pub fn last_delivered(&self) -> Option<&ExtendedSequenceNumber> {
        self.delivered.as_ref()
    }

    /// The processed watermark: the last record of the last batch whose `process_records`
    /// returned `Ok` (or that the error policy's dead-letter handler took). Outside
    /// `process_records`, checkpoints reach no further.
    pub fn last_processed(&self) -> Option<&ExtendedSequenceNumber> {
        self.processed.as_ref()
    }

    /// Tells how far the records handed over are really processed, for a processor that
    /// finishes records after `process_records` returned (one that works on them in the
    /// background, such as [`OrderedParallel`](crate::processor::parallel::OrderedParallel)):
    /// `Some(pos)`, everything up to and including `pos` is done and records after it are still
    /// in progress; `None`, nothing handed over since the stored checkpoint is done yet.
    ///
    /// Valid in any callback. Once called, the processor owns the **processed watermark**
    /// ([`Checkpointer::last_processed`]) for as long as it holds the lease: it is exactly what
    /// was reported last, and a batch whose `process_records` returns `Ok` no longer moves it.
    /// So neither [`Checkpointer::checkpoint`] outside `process_records` nor the worker's
    /// automatic [`CheckpointPolicy`] (which checkpoints that watermark) ever covers a record
    /// still in progress. Inside `process_records` an explicit checkpoint may still reach the
    /// batch's end: the processor knows what it did.
    ///
    /// ```
    /// # use kcl::{Checkpointer, ProcessorError, RecordBatch};
    /// // A processor that finished the batch's first half only.
    /// async fn half(batch: &RecordBatch, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
    ///     let done = batch.records.len() / 2;
    ///     let through = done.checked_sub(1).map(|i| batch.records[i].position());
    ///     cp.processed_through(through.clone()).await?;
    ///     if let Some(pos) = through {
    ///         cp.checkpoint_at(pos).await?;
    ///     }
    ///     Ok(())
    /// }
    /// ```
    ///
    /// # Errors
    /// [`CheckpointError::NotProcessed`] beyond the last record handed over (or for a
    /// sentinel position); [`CheckpointError::Behind`] behind the stored checkpoint. The
    /// watermark is unchanged then.
    pub async fn processed_through(
        &mut self,
        pos: Option<ExtendedSequenceNumber>,
    ) -> Result<(), CheckpointError> {
        let current = self.held.snapshot().await.checkpoint;
        let Some(pos) = pos else {
            self.reported = true;
            // The stored checkpoint is done (a sentinel such as TRIM_HORIZON covers nothing).
            self.processed = (current.sequence().is_some()).then_some(current);
            return Ok(());
        };
        let within = !pos.is_initial()
            && pos != ExtendedSequenceNumber::ShardEnd
            && self.delivered.as_ref().is_some_and(|d| &pos <= d);
        if !within {
            return Err(CheckpointError::NotProcessed {
                requested: pos,
                limit: self.delivered.clone(),
            });
        }
        if pos < current {
            return Err(CheckpointError::Behind {
                requested: pos,
                current,
            });
        }
        self.reported = true;
        self.processed = Some(pos);
        Ok(())
    }

    /// The stored checkpoint.
    pub async fn current(&self) -> ExtendedSequenceNumber {
        self.held.snapshot().await.checkpoint
    }

    /// The furthest position a checkpoint may cover now (`SHARD_END` aside).
    fn ceiling(&self) -> Option<&ExtendedSequenceNumber> {
        match self.scope {
            Scope::Batch => self.delivered.as_ref(),
            Scope::ShardEnd | Scope::Other => self.processed.as_ref(),
        }
    }

    /// Checkpoints everything processed so far: inside `process_records`, up to the last
    /// record of the current batch; inside `shard_ended`, `SHARD_END`; in any other callback,
    /// the processed watermark ([`Checkpointer::last_processed`]). Does nothing if nothing
    /// was processed yet.
    ///
    /// Inside `shard_ended`, `SHARD_END` is stored once `shard_ended` returns `Ok`, so a
    /// failed shard end never lets the child shards start.
    ///
    /// # Errors
    /// [`CheckpointError::LeaseLost`] once the lease is lost; [`CheckpointError::Store`] if the
    /// table keeps failing.
    ///
    /// # Cancel safety
    /// Not cancel safe: a dropped call may or may not have stored the checkpoint.
    pub async fn checkpoint(&mut self) -> Result<(), CheckpointError> {
        if self.scope == Scope::ShardEnd {
            return self.checkpoint_at(ExtendedSequenceNumber::ShardEnd).await;
        }
        match self.ceiling().cloned() {
            Some(pos) => self.checkpoint_at(pos).await,
            None => Ok(()),
        }
    }

    /// Checkpoints `record` (everything up to and including it is processed).
    ///
    /// # Errors
    /// As [`Checkpointer::checkpoint_at`].
    pub async fn checkpoint_record(&mut self, record: &Record) -> Result<(), CheckpointError> {
        self.checkpoint_at(record.position()).await
    }

    /// Checkpoints a sequence number given as a string (e.g. one stored by your application).
    ///
    /// # Errors
    /// [`CheckpointError::InvalidSequence`] if `sequence` is not a decimal number; otherwise as
    /// [`Checkpointer::checkpoint_at`].
    pub async fn checkpoint_sequence(
        &mut self,
        sequence: &str,
        sub_sequence: u64,
    ) -> Result<(), CheckpointError> {
        let seq = crate::record::SequenceNumber::parse(sequence)?;
        self.checkpoint_at(ExtendedSequenceNumber::at(seq, sub_sequence))
            .await
    }

    /// Checkpoints `pos`: a record of the current batch inside `process_records`, a processed
    /// record anywhere else, or `SHARD_END` inside `shard_ended` (stored once it returns `Ok`).
    ///
    /// # Errors
    /// [`CheckpointError::Behind`] / [`CheckpointError::NotProcessed`] for positions out of
    /// range, [`CheckpointError::LeaseLost`] once the lease is lost, [`CheckpointError::Store`]
    /// if the table keeps failing for as long as the lease is valid.
    ///
    /// # Cancel safety
    /// Not cancel safe: a dropped call may or may not have stored the checkpoint.
    pub async fn checkpoint_at(
        &mut self,
        pos: ExtendedSequenceNumber,
    ) -> Result<(), CheckpointError> {
        let limit_ok = match (&pos, self.ceiling()) {
            (ExtendedSequenceNumber::ShardEnd, _) => self.scope == Scope::ShardEnd,
            (p, Some(limit)) => !p.is_initial() && p <= limit,
            _ => false,
        };
        if !limit_ok {
            return Err(CheckpointError::NotProcessed {
                requested: pos,
                limit: self.ceiling().cloned(),
            });
        }
        if pos == ExtendedSequenceNumber::ShardEnd {
            // Stored by the consumer once `shard_ended` returns `Ok`.
            if !self.held.is_valid() {
                return Err(CheckpointError::LeaseLost {
                    shard: self.shard.clone(),
                });
            }
            self.shard_end_requested = true;
            return Ok(());
        }
        self.write(pos).await
    }

    /// Two-phase checkpoint, step 1: stores `pos` and `state` in the lease as the *pending*
    /// checkpoint (`pendingCheckpoint`, `pendingCheckpointState`) without moving the
    /// checkpoint. Then do the side effect (an upload, a transaction), then
    /// [`Checkpointer::commit`]. If this worker dies in between, the next owner finds the
    /// pending checkpoint in [`ShardContext::pending_checkpoint`](crate::ShardContext) and can
    /// finish the side effect (e.g. upload the same records under the same key again) or roll
    /// it back, before going on.
    ///
    /// `pos` follows the rules of [`Checkpointer::checkpoint_at`] (no `SHARD_END`). A second
    /// `prepare` replaces the first. Keep the state small: it lives in the lease item (400 KB
    /// in all for DynamoDB).
    ///
    /// ```
    /// # use kcl::{Checkpointer, ProcessorError, RecordBatch};
    /// # async fn upload(_key: &str, _batch: &RecordBatch) -> Result<(), std::io::Error> { Ok(()) }
    /// async fn flush(batch: &RecordBatch, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
    ///     let Some(last) = batch.records.last() else { return Ok(()) };
    ///     let key = format!("{}/{}", batch.shard_id, last.sequence_number);
    ///     cp.prepare(last.position(), Some(key.clone().into())).await?;
    ///     upload(&key, batch).await.map_err(ProcessorError::retryable)?; // an overwriting PUT
    ///     cp.commit().await?;
    ///     Ok(())
    /// }
    /// ```
    ///
    /// # Errors
    /// As [`Checkpointer::checkpoint_at`].
    pub async fn prepare(
        &mut self,
        pos: ExtendedSequenceNumber,
        state: Option<Bytes>,
    ) -> Result<(), CheckpointError> {
        let within = match self.ceiling() {
            Some(limit) => {
                !pos.is_initial() && pos != ExtendedSequenceNumber::ShardEnd && &pos <= limit
            }
            None => false,
        };
        if !within {
            return Err(CheckpointError::NotProcessed {
                requested: pos,
                limit: self.ceiling().cloned(),
            });
        }
        let current = self.held.snapshot().await.checkpoint;
        if pos < current {
            return Err(CheckpointError::Behind {
                requested: pos,
                current,
            });
        }
        self.send(LeaseWrite::SetPending {
            pending: Some(PendingCheckpoint::new(pos, state)),
        })
        .await
    }

    /// Two-phase checkpoint, step 2: moves the checkpoint to the pending one and clears it
    /// (one conditional write). Commits the checkpoint this processor prepared, or one a
    /// previous owner left (see [`ShardContext::pending_checkpoint`](crate::ShardContext)) once
    /// its side effect is known to be complete.
    ///
    /// # Errors
    /// [`CheckpointError::NothingPrepared`] without a pending checkpoint; otherwise as
    /// [`Checkpointer::checkpoint_at`].
    pub async fn commit(&mut self) -> Result<(), CheckpointError> {
        let lease = self.held.snapshot().await;
        let Some(pending) = lease.pending_checkpoint else {
            return Err(CheckpointError::NothingPrepared {
                shard: self.shard.clone(),
            });
        };
        if pending == lease.checkpoint {
            // Only the pending fields are left to clear.
            return self.send(LeaseWrite::SetPending { pending: None }).await;
        }
        self.write(pending).await
    }

    /// Clears the pending checkpoint without moving the checkpoint: the prepared side effect
    /// was rolled back (or found not to have happened). Any later checkpoint clears it too.
    ///
    /// # Errors
    /// As [`Checkpointer::checkpoint_at`].
    pub async fn cancel_prepared(&mut self) -> Result<(), CheckpointError> {
        if self.held.snapshot().await.pending_checkpoint.is_none() {
            return Ok(());
        }
        self.send(LeaseWrite::SetPending { pending: None }).await
    }

    /// The pending (prepared, not committed) checkpoint stored in the lease, if any.
    pub async fn pending(&self) -> Option<PendingCheckpoint> {
        PendingCheckpoint::of(&self.held.snapshot().await)
    }

    /// Stores `SHARD_END` with the child shard ids (the consumer, after `shard_ended`).
    pub(crate) async fn write_shard_end(&mut self) -> Result<(), CheckpointError> {
        self.write(ExtendedSequenceNumber::ShardEnd).await
    }

    async fn write(&mut self, pos: ExtendedSequenceNumber) -> Result<(), CheckpointError> {
        let current = self.held.snapshot().await.checkpoint;
        if pos < current {
            return Err(CheckpointError::Behind {
                requested: pos,
                current,
            });
        }
        if pos == current {
            return Ok(());
        }
        let children: Vec<ShardId> = match (&pos, &self.children) {
            (ExtendedSequenceNumber::ShardEnd, Some(c)) => c.iter().map(|c| c.id.clone()).collect(),
            _ => Vec::new(),
        };
        self.send(LeaseWrite::Checkpoint {
            position: pos,
            children,
        })
        .await?;
        let oldest = self.oldest_unsaved.take();
        if let Some(m) = &self.metrics {
            m.checkpointed(oldest);
        }
        Ok(())
    }

    /// Sends a checkpoint write, retrying transient failures while the lease is valid.
    async fn send(&mut self, write: LeaseWrite) -> Result<(), CheckpointError> {
        let store = self.store.as_ref();
        let held = &self.held;
        let attempt = || held.write(store, write.clone());
        let observer = self.observer.clone();
        let result = attempt
            .retry(crate::backoff::exponential(
                Duration::from_millis(50),
                Duration::from_secs(2),
                crate::backoff::seed(&[self.held.key().as_str(), "checkpoint"]),
            ))
            .sleep(tokio::time::sleep)
            .when(|e: &LeaseStoreError| e.is_retryable() && held.is_valid())
            .await;
        match result {
            Ok(_) => {
                if let Some(Observer(f)) = &observer {
                    f(&write);
                }
                Ok(())
            }
            Err(e) if e.is_condition_failed() || !self.held.is_valid() => {
                self.held.mark_lost();
                Err(CheckpointError::LeaseLost {
                    shard: self.shard.clone(),
                })
            }
            Err(e) => Err(CheckpointError::Store(e)),
        }
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::lease::{Lease, WorkerId};
    use crate::record::SequenceNumber;
    use crate::testkit::MemLeaseStore;
    use tokio::time::Instant;

    fn pos(n: u128) -> ExtendedSequenceNumber {
        ExtendedSequenceNumber::at(SequenceNumber::from_u128(n), 0)
    }

    async fn setup() -> (MemLeaseStore, Checkpointer) {
        let store = MemLeaseStore::new();
        let shard = ShardId::new("shardId-000000000000");
        let lease = Lease::new(&shard, ExtendedSequenceNumber::TrimHorizon);
        assert!(store.create_if_absent(&lease).await.unwrap());
        let taken = store.take(&lease, &WorkerId::new("w1")).await.unwrap();
        let held = Arc::new(HeldLease::new(
            taken,
            Instant::now(),
            Duration::from_secs(10),
            None,
        ));
        let cp = Checkpointer::new(shard, held, Arc::new(store.clone()));
        (store, cp)
    }

    #[tokio::test(start_paused = true)]
    async fn accepts_processed_positions_only_moving_forward() {
        let (store, mut cp) = setup().await;
        // Nothing processed yet: nothing to do.
        cp.checkpoint().await.unwrap();
        assert_eq!(
            store.leases()[0].checkpoint,
            ExtendedSequenceNumber::TrimHorizon
        );
        cp.begin_batch(pos(20));
        cp.checkpoint_at(pos(10)).await.unwrap();
        assert_eq!(store.leases()[0].checkpoint, pos(10));
        // Beyond the batch.
        match cp.checkpoint_at(pos(21)).await {
            Err(CheckpointError::NotProcessed { requested, limit }) => {
                assert_eq!(requested, pos(21));
                assert_eq!(limit, Some(pos(20)));
            }
            other => panic!("expected NotProcessed, got {other:?}"),
        }
        // Behind the stored checkpoint.
        match cp.checkpoint_at(pos(9)).await {
            Err(CheckpointError::Behind { requested, current }) => {
                assert_eq!((requested, current), (pos(9), pos(10)));
            }
            other => panic!("expected Behind, got {other:?}"),
        }
        // SHARD_END only inside shard_ended.
        assert!(cp
            .checkpoint_at(ExtendedSequenceNumber::ShardEnd)
            .await
            .is_err());
        cp.checkpoint().await.unwrap();
        assert_eq!(store.leases()[0].checkpoint, pos(20));
        assert_eq!(store.leases()[0].owner_switches_since_checkpoint, 0);
    }

    /// DESIGN §2.7: a batch whose processing failed is never covered from another callback
    /// (e.g. `shutdown_requested` after a failed batch met a graceful shutdown).
    #[tokio::test(start_paused = true)]
    async fn outside_process_records_only_the_processed_watermark_is_covered() {
        let (store, mut cp) = setup().await;
        cp.begin_batch(pos(10));
        cp.end_batch(true);
        cp.begin_batch(pos(20));
        cp.end_batch(false); // process_records failed
        assert_eq!(cp.last_processed(), Some(&pos(10)));
        assert_eq!(cp.last_delivered(), Some(&pos(20)));
        cp.checkpoint().await.unwrap();
        assert_eq!(store.leases()[0].checkpoint, pos(10));
        match cp.checkpoint_at(pos(20)).await {
            Err(CheckpointError::NotProcessed { limit, .. }) => assert_eq!(limit, Some(pos(10))),
            other => panic!("expected NotProcessed, got {other:?}"),
        }
        assert_eq!(store.leases()[0].checkpoint, pos(10));
        // The retry succeeds: now it is covered.
        cp.begin_batch(pos(20));
        cp.end_batch(true);
        cp.checkpoint().await.unwrap();
        assert_eq!(store.leases()[0].checkpoint, pos(20));
    }

    /// A processor that reports its own watermark: it is what the batch end no longer moves,
    /// and what checkpoints outside `process_records` (and the automatic policy) reach.
    #[tokio::test(start_paused = true)]
    async fn a_reported_watermark_is_never_passed() {
        let (store, mut cp) = setup().await;
        cp.begin_batch(pos(10));
        cp.processed_through(Some(pos(4))).await.unwrap();
        cp.end_batch(true);
        assert_eq!(cp.last_processed(), Some(&pos(4)));
        // Sticky: a later batch returning Ok without a report does not move it either.
        cp.begin_batch(pos(20));
        cp.end_batch(true);
        assert_eq!(cp.last_processed(), Some(&pos(4)));
        // What the automatic policy does after a batch: checkpoint the watermark.
        cp.checkpoint().await.unwrap();
        assert_eq!(store.leases()[0].checkpoint, pos(4));
        assert!(matches!(
            cp.checkpoint_at(pos(5)).await,
            Err(CheckpointError::NotProcessed { .. })
        ));
        // Beyond what was delivered: refused, unchanged.
        match cp.processed_through(Some(pos(21))).await {
            Err(CheckpointError::NotProcessed { limit, .. }) => assert_eq!(limit, Some(pos(20))),
            other => panic!("expected NotProcessed, got {other:?}"),
        }
        // Behind the stored checkpoint: refused, unchanged.
        assert!(matches!(
            cp.processed_through(Some(pos(3))).await,
            Err(CheckpointError::Behind { .. })
        ));
        assert_eq!(cp.last_processed(), Some(&pos(4)));
        // Outside process_records (idle, shutdown_requested): moves, then covers.
        cp.processed_through(Some(pos(15))).await.unwrap();
        cp.checkpoint().await.unwrap();
        assert_eq!(store.leases()[0].checkpoint, pos(15));
        // None: nothing beyond the stored checkpoint.
        cp.processed_through(None).await.unwrap();
        assert_eq!(cp.last_processed(), Some(&pos(15)));
    }

    /// Through the processor harness with an automatic policy after every batch: the worker's
    /// checkpoint never covers a record the processor still works on.
    #[tokio::test(start_paused = true)]
    async fn the_automatic_policy_stops_at_the_reported_watermark() {
        use crate::testkit::ProcessorHarness;
        use crate::{async_trait, ProcessorError, RecordBatch, RecordProcessor};
        /// Finishes every record but the batch's last.
        struct AllButLast;
        #[async_trait]
        impl RecordProcessor for AllButLast {
            async fn process_records(
                &mut self,
                batch: &RecordBatch,
                cp: &mut Checkpointer,
            ) -> Result<(), ProcessorError> {
                let n = batch.records.len();
                let done = n.checked_sub(2).map(|i| batch.records[i].position());
                cp.processed_through(done).await?;
                Ok(())
            }
        }
        let mut h = ProcessorHarness::new(AllButLast)
            .checkpoint_policy(CheckpointPolicy::after_every_batch());
        h.initialize().await.unwrap();
        let batch = h.records(["a", "b", "c"]);
        let second = batch[1].position();
        h.process(batch).await.unwrap();
        assert_eq!(h.checkpoint().await, second);
        h.shutdown().await.unwrap();
        assert_eq!(h.checkpoint().await, second);
    }

    #[tokio::test(start_paused = true)]
    async fn shard_end_is_stored_only_after_shard_ended_returns() {
        let (store, mut cp) = setup().await;
        cp.begin_batch(pos(5));
        cp.end_batch(true);
        cp.begin_shard_end(Vec::new());
        cp.checkpoint().await.unwrap();
        // Asked for, not yet stored: shard_ended may still fail.
        assert_eq!(
            store.leases()[0].checkpoint,
            ExtendedSequenceNumber::TrimHorizon
        );
        assert!(cp.end_shard_end());
        // Another callback cannot ask for it.
        assert!(matches!(
            cp.checkpoint_at(ExtendedSequenceNumber::ShardEnd).await,
            Err(CheckpointError::NotProcessed { .. })
        ));
        cp.checkpoint().await.unwrap();
        assert_eq!(store.leases()[0].checkpoint, pos(5));
        cp.write_shard_end().await.unwrap();
        assert_eq!(
            store.leases()[0].checkpoint,
            ExtendedSequenceNumber::ShardEnd
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_non_numeric_sequence_is_a_typed_error_and_changes_nothing() {
        let (store, mut cp) = setup().await;
        cp.begin_batch(pos(20));
        match cp.checkpoint_sequence("12abc", 0).await {
            Err(CheckpointError::InvalidSequence(e)) => assert_eq!(e.input(), "12abc"),
            other => panic!("expected InvalidSequence, got {other:?}"),
        }
        assert_eq!(
            store.leases()[0].checkpoint,
            ExtendedSequenceNumber::TrimHorizon
        );
        cp.checkpoint_sequence("0000020", 0).await.unwrap();
        assert_eq!(store.leases()[0].checkpoint, pos(20));
    }

    #[tokio::test(start_paused = true)]
    async fn refused_once_the_lease_is_lost() {
        let (store, mut cp) = setup().await;
        cp.begin_batch(pos(5));
        // Another worker takes the lease.
        let current = store.leases()[0].clone();
        store.take(&current, &WorkerId::new("w2")).await.unwrap();
        assert!(matches!(
            cp.checkpoint().await,
            Err(CheckpointError::LeaseLost { .. })
        ));
        assert_eq!(
            store.leases()[0].checkpoint,
            ExtendedSequenceNumber::TrimHorizon
        );
        // And after local expiry, without touching the store.
        let (_store, mut cp) = setup().await;
        cp.begin_batch(pos(5));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(matches!(
            cp.checkpoint().await,
            Err(CheckpointError::LeaseLost { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn transient_store_errors_are_retried() {
        use crate::testkit::{Fault, FaultKind};
        let (store, mut cp) = setup().await;
        cp.begin_batch(pos(7));
        store
            .faults()
            .inject(Fault::new(FaultKind::Throttle).on("checkpoint").times(3));
        cp.checkpoint().await.unwrap();
        assert_eq!(store.leases()[0].checkpoint, pos(7));
    }
}
