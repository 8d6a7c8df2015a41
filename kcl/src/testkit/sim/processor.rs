//! The recording processor: logs every batch and callback, takes a random (virtual) time to
//! process, and checkpoints after every batch or every other batch (sometimes at a record
//! inside the batch), so that re-delivery after a failover is exercised.
//!
//! While its machine has a [`ProcessorFault`](super::ProcessorFault), a batch fails (before
//! it is checkpointed) with a retryable or fatal error, or panics; every outcome is logged, so
//! the checker can tell which batches a checkpoint may cover (DESIGN §2.7). Like a careless
//! user, it checkpoints "what was delivered" in `shutdown_requested` whatever happened before:
//! the library must not let that cover a failed batch.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::log::{BatchOutcome, Callback, Delivered, Event, Recorder};
use super::net::{FailKind, Net};
use std::error::Error as _;

use crate::checkpoint::{CheckpointError, Checkpointer};
use crate::processor::parallel::{OrderedParallel, RecordContext, RecordHandler};
use crate::processor::{ProcessorError, RecordProcessor, ShardContext};
use crate::record::{Record, RecordBatch};
use crate::shard::ShardId;

/// How processors of a run behave.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Work {
    /// Largest time one batch takes (uniform from zero).
    pub batch_time: Duration,
    /// Probability that a batch is slow.
    pub slow_batch: f64,
    /// How long a slow batch takes (longer than a lease, to show renewals go on).
    pub slow_time: Duration,
    /// The workers' error policy.
    pub on_failure: OnFailure,
    /// The workers checkpoint for the processor (`CheckpointPolicy::every`, this many
    /// records or one second): the processor then never checkpoints by itself, and the worker's
    /// final checkpoint alone must keep planned moves free of duplicates.
    pub automatic: Option<u64>,
}

/// The error policy of a run's workers ([`crate::processor::ErrorPolicy`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnFailure {
    /// Retry the batch with backoff; a fatal error stops the shard (the default policy).
    #[default]
    Retry,
    /// Stop the shard and release its lease at any error.
    StopShard,
    /// Hand the failed batch to a dead-letter handler and go on.
    DeadLetter,
}

/// The payload of a simulated processor panic (the sim's panic hook keeps it quiet).
#[derive(Debug)]
pub(crate) struct SimPanic;

/// Installs, once, a panic hook that silences simulated processor panics and passes every
/// other panic to the hook in place before.
pub(crate) fn quiet_simulated_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<SimPanic>().is_none() {
                previous(info);
            }
        }));
    });
}

/// One processor (one shard lease of one incarnation).
pub(crate) struct SimProcessor {
    pub(crate) net: Net,
    pub(crate) shard: ShardId,
    pub(crate) rng: ChaCha8Rng,
    pub(crate) work: Work,
    /// Checkpoint after every `every`-th batch.
    pub(crate) every: u32,
    pub(crate) batches: u32,
}

impl SimProcessor {
    /// A processor whose RNG is forked from the incarnation's.
    pub(crate) fn new(net: Net, shard: &ShardId, rng: &Arc<Mutex<ChaCha8Rng>>, work: Work) -> Self {
        let mut rng = {
            let mut parent = rng.lock().unwrap_or_else(|p| p.into_inner());
            ChaCha8Rng::from_rng(&mut *parent)
        };
        let every = if rng.random_bool(0.3) { 2 } else { 1 };
        Self {
            net,
            shard: shard.clone(),
            rng,
            work,
            every,
            batches: 0,
        }
    }

    fn rec(&self) -> &Recorder {
        &self.net.rec
    }

    fn callback(&self, what: Callback) {
        self.rec().push(Event::Callback {
            inc: self.net.inc,
            shard: self.shard.clone(),
            what,
        });
    }

    /// Logs that a checkpoint told the processor its lease is lost.
    fn note_lease_lost(&self, r: &Result<(), CheckpointError>) {
        if matches!(r, Err(CheckpointError::LeaseLost { .. })) {
            self.callback(Callback::CheckpointLeaseLost);
        }
    }

    /// Fails batch `id` as `kind` says (logged first: a panic logs nothing after).
    fn fail(&mut self, id: u64, kind: FailKind) -> Result<(), ProcessorError> {
        // The worker refuses the shard after a fatal error or a panic (unless dead-lettered), or
        // any error under `StopShard`, until it restarts.
        let refused = match kind {
            FailKind::Panic | FailKind::Fatal => self.work.on_failure != OnFailure::DeadLetter,
            FailKind::Retryable => self.work.on_failure == OnFailure::StopShard,
        };
        if refused {
            self.net.tainted.store(true, Ordering::SeqCst);
        }
        match kind {
            FailKind::Retryable => {
                self.rec()
                    .batch_done(id, BatchOutcome::Failed { fatal: false });
                Err(ProcessorError::retryable("simulated downstream outage"))
            }
            FailKind::Fatal => {
                self.rec()
                    .batch_done(id, BatchOutcome::Failed { fatal: true });
                Err(ProcessorError::fatal("simulated poison record"))
            }
            FailKind::Panic => {
                self.rec().batch_done(id, BatchOutcome::Panicked);
                std::panic::panic_any(SimPanic)
            }
        }
    }

    fn batch_time(&mut self) -> Duration {
        if self.work.slow_batch > 0.0 && self.rng.random_bool(self.work.slow_batch.min(1.0)) {
            return self.work.slow_time;
        }
        let max = u64::try_from(self.work.batch_time.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(self.rng.random_range(0..=max))
    }
}

/// The producer writes each record's index as its payload.
fn payload_index(data: &[u8]) -> u64 {
    std::str::from_utf8(data)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Logs the delivery of `batch` (each record by its payload index); returns the batch's id.
fn log_batch(net: &Net, shard: &ShardId, batch: &RecordBatch) -> u64 {
    let records = batch
        .records
        .iter()
        .map(|r| Delivered {
            idx: payload_index(&r.data),
            pos: r.position(),
        })
        .collect();
    net.rec.batch(net.inc, shard.clone(), records)
}

/// A checkpoint behind the stored one is refused, not lost: the records are re-processed.
fn tolerate_behind(r: Result<(), CheckpointError>) -> Result<(), CheckpointError> {
    match r {
        Err(CheckpointError::Behind { .. }) => Ok(()),
        other => other,
    }
}

#[async_trait]
impl RecordProcessor for SimProcessor {
    async fn initialize(&mut self, shard: &ShardContext) -> Result<(), ProcessorError> {
        self.net.halt_if_dead("initialize").await;
        self.callback(Callback::Initialize(shard.checkpoint.clone()));
        Ok(())
    }

    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        self.net.halt_if_dead("process_records").await;
        let id = log_batch(&self.net, &self.shard, batch);
        let t = self.batch_time();
        if !t.is_zero() {
            tokio::time::sleep(t).await;
        }
        self.net.halt_if_dead("process_records").await;
        if let Some(f) = self.net.processor_fault() {
            // Drawn only while a fault is in force: runs without one draw as before.
            if f.p > 0.0 && self.rng.random_bool(f.p.min(1.0)) {
                return self.fail(id, f.kind);
            }
        }
        self.batches += 1;
        let result = if self.work.automatic.is_some() {
            Ok(())
        } else if self.batches % self.every == 0 {
            let r = if batch.len() > 1 && self.rng.random_bool(0.1) {
                // Checkpoint inside the batch: the rest is delivered again after a move.
                let i = self.rng.random_range(0..batch.len());
                cp.checkpoint_record(&batch.records[i]).await
            } else {
                cp.checkpoint().await
            };
            tolerate_behind(r)
        } else {
            Ok(())
        };
        self.net.halt_if_dead("process_records").await;
        self.note_lease_lost(&result);
        let outcome = match result {
            Ok(()) => BatchOutcome::Ok,
            Err(_) => BatchOutcome::Failed { fatal: false },
        };
        if result.is_err() && self.work.on_failure == OnFailure::StopShard {
            self.net.tainted.store(true, Ordering::SeqCst);
        }
        self.net.rec.batch_done(id, outcome);
        result.map_err(ProcessorError::retryable)
    }

    async fn shard_ended(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        self.net.halt_if_dead("shard_ended").await;
        let r = cp.checkpoint().await;
        self.net.halt_if_dead("shard_ended").await;
        self.note_lease_lost(&r);
        self.callback(Callback::ShardEnded(r.is_ok()));
        r.map_err(ProcessorError::retryable)
    }

    async fn lease_lost(&mut self) {
        self.net.halt_if_dead("lease_lost").await;
        self.callback(Callback::LeaseLost);
    }

    async fn shutdown_requested(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        self.net.halt_if_dead("shutdown_requested").await;
        self.callback(Callback::ShutdownRequested);
        if cp.last_delivered().is_none() || self.work.automatic.is_some() {
            return Ok(());
        }
        let r = tolerate_behind(cp.checkpoint().await);
        self.net.halt_if_dead("shutdown_requested").await;
        self.note_lease_lost(&r);
        r.map_err(ProcessorError::retryable)
    }
}

/// The per-record handler of `OrderedParallel` runs: logs each attempt, takes a random
/// (virtual) time.
pub(crate) struct SimHandler {
    net: Net,
    rng: Mutex<ChaCha8Rng>,
    max: Duration,
}

#[async_trait]
impl RecordHandler for SimHandler {
    async fn handle(&self, record: &Record, ctx: &RecordContext) -> Result<(), ProcessorError> {
        self.net.halt_if_dead("handle").await;
        let idx = payload_index(&record.data);
        let t = {
            let max = u64::try_from(self.max.as_millis()).unwrap_or(u64::MAX);
            let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            Duration::from_millis(rng.random_range(0..=max))
        };
        self.net.rec.push(Event::RecordStart {
            inc: self.net.inc,
            shard: ctx.shard_id.clone(),
            idx,
        });
        if !t.is_zero() {
            tokio::time::sleep(t).await;
        }
        self.net.halt_if_dead("handle").await;
        self.net.rec.push(Event::RecordEnd {
            inc: self.net.inc,
            shard: ctx.shard_id.clone(),
            idx,
            ok: true,
        });
        Ok(())
    }
}

/// An `OrderedParallel` whose batches and callbacks are logged as [`SimProcessor`]'s are.
pub(crate) struct SimParallel {
    net: Net,
    shard: ShardId,
    work: Work,
    inner: OrderedParallel,
}

impl SimParallel {
    pub(crate) fn new(
        net: Net,
        shard: &ShardId,
        rng: &Arc<Mutex<ChaCha8Rng>>,
        work: Work,
        concurrency: usize,
    ) -> Self {
        let rng = {
            let mut parent = rng.lock().unwrap_or_else(|p| p.into_inner());
            ChaCha8Rng::from_rng(&mut *parent)
        };
        let handler = Arc::new(SimHandler {
            net: net.clone(),
            rng: Mutex::new(rng),
            max: work.batch_time,
        });
        let inner = OrderedParallel::builder(handler)
            .concurrency(concurrency.max(1))
            .max_buffered_records(64.max(concurrency))
            .checkpoint_every(if work.automatic.is_some() {
                None
            } else {
                Some(Duration::ZERO)
            })
            .tick(Duration::from_millis(200))
            .drain_timeout(Duration::from_secs(10))
            .build()
            .expect("the sim's adapter settings are valid");
        Self {
            net,
            shard: shard.clone(),
            work,
            inner,
        }
    }

    fn callback(&self, what: Callback) {
        self.net.rec.push(Event::Callback {
            inc: self.net.inc,
            shard: self.shard.clone(),
            what,
        });
    }

    /// Logs a checkpoint's `LeaseLost` coming back through a callback's error; marks the
    /// shard refused where the worker will refuse it (as [`SimProcessor`] does).
    fn note(&self, r: &Result<(), ProcessorError>) {
        let Err(e) = r else { return };
        let lost = e
            .source()
            .and_then(|s| s.downcast_ref::<CheckpointError>())
            .is_some_and(|c| matches!(c, CheckpointError::LeaseLost { .. }));
        if lost {
            self.callback(Callback::CheckpointLeaseLost);
        }
        let refused = match self.work.on_failure {
            OnFailure::StopShard => true,
            OnFailure::DeadLetter => false,
            OnFailure::Retry => !e.is_retryable(),
        };
        if refused {
            self.net.tainted.store(true, Ordering::SeqCst);
        }
    }
}

#[async_trait]
impl RecordProcessor for SimParallel {
    async fn initialize(&mut self, shard: &ShardContext) -> Result<(), ProcessorError> {
        self.net.halt_if_dead("initialize").await;
        self.callback(Callback::Initialize(shard.checkpoint.clone()));
        self.inner.initialize(shard).await
    }

    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        self.net.halt_if_dead("process_records").await;
        let id = log_batch(&self.net, &self.shard, batch);
        let result = self.inner.process_records(batch, cp).await;
        self.net.halt_if_dead("process_records").await;
        self.note(&result);
        let outcome = match &result {
            Ok(()) => BatchOutcome::Ok,
            Err(e) => BatchOutcome::Failed {
                fatal: !e.is_retryable(),
            },
        };
        self.net.rec.batch_done(id, outcome);
        result
    }

    fn idle_interval(&self) -> Option<Duration> {
        self.inner.idle_interval()
    }

    async fn idle(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        self.net.halt_if_dead("idle").await;
        let r = self.inner.idle(cp).await;
        self.net.halt_if_dead("idle").await;
        self.note(&r);
        r
    }

    async fn shard_ended(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        self.net.halt_if_dead("shard_ended").await;
        let r = self.inner.shard_ended(cp).await;
        self.net.halt_if_dead("shard_ended").await;
        self.note(&r);
        self.callback(Callback::ShardEnded(r.is_ok()));
        r
    }

    async fn lease_lost(&mut self) {
        self.net.halt_if_dead("lease_lost").await;
        self.callback(Callback::LeaseLost);
        self.inner.lease_lost().await;
    }

    async fn shutdown_requested(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        self.net.halt_if_dead("shutdown_requested").await;
        self.callback(Callback::ShutdownRequested);
        let r = self.inner.shutdown_requested(cp).await;
        self.net.halt_if_dead("shutdown_requested").await;
        self.note(&r);
        r
    }
}

/// Makes a run's processors: [`SimProcessor`]s, or [`SimParallel`]s when the run draws the
/// adapter.
pub(crate) struct SimFactory {
    pub(crate) net: Net,
    pub(crate) procs: Arc<Mutex<ChaCha8Rng>>,
    pub(crate) work: Work,
    /// `OrderedParallel` processors with this concurrency ([`Sim::parallel`](super::Sim)).
    pub(crate) parallel: Option<usize>,
}

impl crate::processor::ProcessorFactory for SimFactory {
    fn create(&self, shard: &ShardId) -> Box<dyn RecordProcessor> {
        if let Some(concurrency) = self.parallel {
            Box::new(SimParallel::new(
                self.net.clone(),
                shard,
                &self.procs,
                self.work,
                concurrency,
            ))
        } else {
            Box::new(SimProcessor::new(
                self.net.clone(),
                shard,
                &self.procs,
                self.work,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::testkit::sim::{Event, FaultRates, Sim};

    /// Fleets of `OrderedParallel` processors, calm and under chaos: every invariant holds,
    /// and the per-record invariants had records to check.
    #[test]
    fn parallel_fleets_keep_every_invariant() {
        // Fast arrivals (30 records/s) against up to 100 ms per record: records complete out of
        // order, so a checkpoint past the completed prefix would show.
        for (seed, faults) in [(11, FaultRates::none()), (12, FaultRates::default())] {
            let report = Sim::new(seed)
                .workers(2)
                .shards(2)
                .records(600)
                .keys(64)
                .duration(std::time::Duration::from_secs(20))
                .faults(faults)
                .parallel(Some(8))
                .run();
            assert!(report.is_ok(), "{report}");
            assert_eq!(report.counts.distinct, 600, "{report}");
            assert!(
                report
                    .log
                    .iter()
                    .any(|e| matches!(e.event, Event::RecordEnd { ok: true, .. })),
                "no record events"
            );
        }
    }
}
