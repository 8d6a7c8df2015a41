//! [`ProcessorHarness`]: unit-test a [`RecordProcessor`] without a `Worker`.
//!
//! The harness drives one processor the way a worker's shard consumer does — `initialize`,
//! batches, `idle`, `shard_ended`, `shutdown_requested`, `lease_lost` — with a real
//! [`Checkpointer`] over an in-memory lease, under the same rules (inside `process_records` a
//! checkpoint may cover the batch; elsewhere only what was processed; `SHARD_END` is stored
//! once `shard_ended` returns `Ok`; panics become fatal errors), and records every checkpoint
//! write the processor made.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::MemLeaseStore;
use crate::checkpoint::{CheckpointPolicy, Checkpointer, Observer, PendingCheckpoint};
use crate::lease::coordinator::HeldLease;
use crate::lease::write::LeaseWrite;
use crate::lease::{Lease, LeaseStore, WorkerId};
use crate::processor::consumer::guarded;
use crate::processor::{ProcessorError, RecordProcessor, ShardContext};
use crate::record::{ExtendedSequenceNumber, Record, RecordBatch, SequenceNumber};
use crate::shard::{ChildShard, ShardId};

/// A checkpoint write the processor stored, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stored {
    /// The checkpoint moved here (`SHARD_END` included).
    Checkpoint(ExtendedSequenceNumber),
    /// A two-phase checkpoint was prepared.
    Prepared(PendingCheckpoint),
    /// The pending checkpoint was cleared without moving the checkpoint.
    PreparedCleared,
}

/// Drives one [`RecordProcessor`] as a worker would, and shows what it checkpointed.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use kcl::testkit::{ProcessorHarness, Stored};
/// use kcl::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor};
///
/// struct CheckpointEveryBatch;
/// #[async_trait]
/// impl RecordProcessor for CheckpointEveryBatch {
///     async fn process_records(&mut self, _: &RecordBatch, cp: &mut Checkpointer)
///         -> Result<(), ProcessorError> {
///         cp.checkpoint().await?;
///         Ok(())
///     }
/// }
///
/// let mut h = ProcessorHarness::new(CheckpointEveryBatch);
/// h.initialize().await?;
/// let batch = h.records(["a", "b", "c"]);
/// let last = batch.last().unwrap().position();
/// h.process(batch).await?;
/// assert_eq!(h.checkpoint().await, last);
/// assert_eq!(h.stored(), vec![Stored::Checkpoint(last)]);
/// # Ok(())
/// # }
/// ```
pub struct ProcessorHarness<P> {
    processor: P,
    store: MemLeaseStore,
    held: Arc<HeldLease>,
    cp: Checkpointer,
    shard: ShardId,
    stored: Arc<Mutex<Vec<Stored>>>,
    next_sequence: u128,
    policy: CheckpointPolicy,
    unsaved: u64,
    last_saved: Instant,
}

impl<P> std::fmt::Debug for ProcessorHarness<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessorHarness")
            .field("shard", &self.shard)
            .field("stored", &self.stored)
            .finish_non_exhaustive()
    }
}

/// The owner the harness's lease is held by.
const HARNESS_WORKER: &str = "processor-harness";

impl<P: RecordProcessor> ProcessorHarness<P> {
    /// A harness for `processor` on `shardId-000000000000`, starting at `TRIM_HORIZON`.
    pub fn new(processor: P) -> Self {
        let shard = ShardId::new("shardId-000000000000");
        Self::resuming(
            processor,
            Lease::new(&shard, ExtendedSequenceNumber::TrimHorizon),
        )
    }

    /// A harness for `processor` taking over `lease` as a previous owner left it (its
    /// checkpoint, a pending two-phase checkpoint, parents). Records made by
    /// [`ProcessorHarness::records`] continue after the lease's checkpoint.
    pub fn resuming(processor: P, mut lease: Lease) -> Self {
        let shard = lease.shard_id();
        let next_sequence = lease
            .checkpoint
            .sequence()
            .and_then(|s| s.as_str().parse::<u128>().ok())
            .map_or(1, |n| n + 1);
        lease.owner = Some(WorkerId::new(HARNESS_WORKER));
        let store = MemLeaseStore::new();
        store.put_raw_item(crate::lease::item::encode(&lease));
        // A lease that never expires while the harness holds it.
        let held = Arc::new(HeldLease::new(
            lease,
            Instant::now(),
            Duration::from_secs(365 * 24 * 3600),
            None,
        ));
        let stored = Arc::new(Mutex::new(Vec::new()));
        let mut cp = Checkpointer::new(
            shard.clone(),
            held.clone(),
            Arc::new(store.clone()) as Arc<dyn LeaseStore>,
        );
        let log = stored.clone();
        cp.observe(Observer(Arc::new(move |w: &LeaseWrite| {
            let entry = match w {
                LeaseWrite::Checkpoint { position, .. } => Stored::Checkpoint(position.clone()),
                LeaseWrite::SetPending { pending: Some(p) } => Stored::Prepared(p.clone()),
                LeaseWrite::SetPending { pending: None } => Stored::PreparedCleared,
                _ => return,
            };
            if let Ok(mut log) = log.lock() {
                log.push(entry);
            }
        })));
        Self {
            processor,
            store,
            held,
            cp,
            shard,
            stored,
            next_sequence,
            policy: CheckpointPolicy::Manual,
            unsaved: 0,
            last_saved: Instant::now(),
        }
    }

    /// Applies an automatic checkpoint policy, as the worker would.
    pub fn checkpoint_policy(mut self, policy: CheckpointPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Records with the next sequence numbers, one per payload, partition key `"key"`.
    pub fn records<I, D>(&mut self, payloads: I) -> Vec<Record>
    where
        I: IntoIterator<Item = D>,
        D: Into<Bytes>,
    {
        payloads
            .into_iter()
            .map(|d| self.record("key", d))
            .collect()
    }

    /// One record with the next sequence number.
    pub fn record(&mut self, partition_key: &str, data: impl Into<Bytes>) -> Record {
        let seq = SequenceNumber::from_u128(self.next_sequence);
        self.next_sequence += 1;
        Record::new(
            data.into(),
            partition_key,
            seq,
            Some(std::time::SystemTime::now()),
        )
    }

    /// `initialize`, with the lease's checkpoint and pending checkpoint.
    ///
    /// # Errors
    /// The processor's error (a panic becomes a fatal error).
    pub async fn initialize(&mut self) -> Result<(), ProcessorError> {
        let lease = self.held.snapshot().await;
        let ctx = ShardContext {
            shard_id: self.shard.clone(),
            stream: lease
                .key
                .stream()
                .map_or_else(|| "stream".to_owned(), |s| s.name().to_owned()),
            stream_identifier: lease.key.stream(),
            checkpoint: lease.checkpoint.clone(),
            parent_shard_ids: lease.parent_shard_ids.clone(),
            pending_checkpoint: PendingCheckpoint::of(&lease),
        };
        guarded(
            &metrics::Counter::noop(),
            "initialize",
            self.processor.initialize(&ctx),
        )
        .await
    }

    /// One `process_records` call with `records` (in order, non-empty). The processed
    /// watermark moves past them only if it returns `Ok`; with an automatic policy the
    /// harness then checkpoints as the worker would.
    ///
    /// # Errors
    /// The processor's error (a panic becomes a fatal error).
    pub async fn process(&mut self, records: Vec<Record>) -> Result<(), ProcessorError> {
        let Some(last) = records.last().map(Record::position) else {
            return Ok(());
        };
        let count = records.len() as u64;
        let batch = RecordBatch {
            shard_id: self.shard.clone(),
            records,
            millis_behind_latest: Some(0),
        };
        self.cp.begin_batch(last);
        let result = guarded(
            &metrics::Counter::noop(),
            "process_records",
            self.processor.process_records(&batch, &mut self.cp),
        )
        .await;
        self.cp.end_batch(result.is_ok());
        result?;
        self.unsaved += count;
        if self.policy.is_due(self.unsaved, self.last_saved.elapsed()) {
            self.cp.checkpoint().await?;
            self.unsaved = 0;
            self.last_saved = Instant::now();
        }
        Ok(())
    }

    /// `idle`: the shard was quiet.
    ///
    /// # Errors
    /// The processor's error.
    pub async fn idle(&mut self) -> Result<(), ProcessorError> {
        guarded(
            &metrics::Counter::noop(),
            "idle",
            self.processor.idle(&mut self.cp),
        )
        .await
    }

    /// `shard_ended` with `children`; stores `SHARD_END` if it asked for it and returned
    /// `Ok`.
    ///
    /// # Errors
    /// The processor's error, or the checkpoint's.
    pub async fn shard_end(&mut self, children: Vec<ChildShard>) -> Result<(), ProcessorError> {
        self.cp.begin_shard_end(children);
        let result = guarded(
            &metrics::Counter::noop(),
            "shard_ended",
            self.processor.shard_ended(&mut self.cp),
        )
        .await;
        let requested = self.cp.end_shard_end();
        result?;
        if requested {
            self.cp.write_shard_end().await?;
        }
        Ok(())
    }

    /// `shutdown_requested` (graceful shutdown, handoff, or a stop after a failure); with an
    /// automatic policy, then the worker's final checkpoint.
    ///
    /// # Errors
    /// The processor's error, or the final checkpoint's.
    pub async fn shutdown(&mut self) -> Result<(), ProcessorError> {
        let result = guarded(
            &metrics::Counter::noop(),
            "shutdown_requested",
            self.processor.shutdown_requested(&mut self.cp),
        )
        .await;
        if self.policy.is_automatic() {
            self.cp.checkpoint().await?;
        }
        result
    }

    /// The lease moves to another worker: later checkpoints fail with `LeaseLost`, then
    /// `lease_lost` is called.
    pub async fn lose_lease(&mut self) {
        self.held.mark_lost();
        self.processor.lease_lost().await;
    }

    /// The checkpoint stored in the lease.
    pub async fn checkpoint(&self) -> ExtendedSequenceNumber {
        self.lease().await.checkpoint
    }

    /// The pending (prepared, uncommitted) checkpoint stored in the lease.
    pub async fn pending(&self) -> Option<PendingCheckpoint> {
        PendingCheckpoint::of(&self.lease().await)
    }

    /// The lease as stored.
    pub async fn lease(&self) -> Lease {
        match self.store.get(self.held.key()).await {
            Ok(Some(l)) => l,
            _ => self.held.snapshot().await,
        }
    }

    /// Every checkpoint write stored so far, in order.
    pub fn stored(&self) -> Vec<Stored> {
        self.stored.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The processor.
    pub fn processor(&self) -> &P {
        &self.processor
    }

    /// The processor, mutably.
    pub fn processor_mut(&mut self) -> &mut P {
        &mut self.processor
    }

    /// The harness's checkpointer (e.g. to call a processor's own helpers directly).
    pub fn checkpointer(&mut self) -> &mut Checkpointer {
        &mut self.cp
    }
}
