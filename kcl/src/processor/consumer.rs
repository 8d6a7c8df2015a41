//! The per-shard consumer task: WaitingOnParents → Initializing → Processing → ShuttingDown →
//! Done.
//!
//! The user's `process_records` future is never a `select!` branch (dropping it mid-batch would
//! leave its side effects half done): cancellation is checked between batches.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use futures::FutureExt as _;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use super::policy::{DeadLetter, DeadLetterHandler, Failure, FailureAction};
use super::{ErrorPolicy, ProcessorError, ProcessorFactory, RecordProcessor, ShardContext};
use crate::checkpoint::PendingCheckpoint;
use crate::checkpoint::{CheckpointError, Checkpointer, Observer};
use crate::config::WorkerConfig;
use crate::lease::coordinator::HeldLease;
use crate::lease::write::LeaseWrite;
use crate::lease::{Lease, LeaseStore, WorkerId};
use crate::metrics as m;
use crate::record::{ExtendedSequenceNumber, RecordBatch};
use crate::retrieval::deagg::deaggregate_counted;
use crate::retrieval::polling::{Fetched, PrefetchBudget};
use crate::retrieval::reader::{ShardRead, ShardReader};
use crate::retrieval::{resume_position, KinesisApi, KinesisApiError};
use crate::shard::lineage::{can_start, ParentState};
use crate::shard::{ChildShard, ShardId};
use crate::worker::status::{ShardReport, ShardState, StatusBoard};

/// How a consumer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConsumerExit {
    /// The shard was read to its end and checkpointed at `SHARD_END`.
    Finished,
    /// The lease was lost.
    LeaseLost,
    /// Graceful shutdown: the lease was released.
    Released,
    /// Another worker asked for the lease: handed over after the final checkpoint.
    HandedOff,
    /// The processor failed for good (a fatal error, a panic, or the `StopShard` policy): the
    /// lease was released; this worker does not take the shard again until restarted.
    ProcessorFailed,
    /// The shard could not be read (access denied, KMS, the shard or the fan-out consumer is
    /// gone, …): the lease was released; this worker retries the shard after a quarantine.
    ReadFailed(String),
}

/// What every consumer of a worker shares.
#[derive(Clone)]
pub(crate) struct ConsumerEnv {
    pub(crate) config: Arc<WorkerConfig>,
    pub(crate) store: Arc<dyn LeaseStore>,
    pub(crate) kinesis: Arc<dyn KinesisApi>,
    pub(crate) factory: Arc<dyn ProcessorFactory>,
    pub(crate) error_policy: ErrorPolicy,
    /// Wakes the shard syncer (at shard end).
    pub(crate) sync_now: Arc<Notify>,
    /// Cancelled on graceful shutdown.
    pub(crate) shutdown: CancellationToken,
    /// The worker's read-ahead budget.
    pub(crate) prefetch: Arc<PrefetchBudget>,
    /// Starts each shard's reader: polling, or enhanced fan-out.
    pub(crate) reader: Arc<dyn ShardReader>,
    /// The worker's status board: each consumer reports its shard there.
    pub(crate) status: Arc<StatusBoard>,
    /// The worker's metric handles, per stream.
    pub(crate) metrics: Arc<crate::worker::streams::StreamMetrics>,
}

impl ConsumerEnv {
    /// The metric handles of `stream`.
    fn metrics_for(&self, stream: &str) -> Arc<m::WorkerMetrics> {
        self.metrics.of(stream)
    }
}

impl std::fmt::Debug for ConsumerEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerEnv").finish_non_exhaustive()
    }
}

/// Why processing stopped early.
#[derive(Debug)]
enum Stop {
    LeaseLost,
    Shutdown,
    Handoff,
    /// A fatal processor error, a panic, or the `StopShard` policy.
    ProcessorFailed,
    /// The shard could not be read.
    ReadFailed(String),
}

/// The failures of one callback's retries, and their delays.
struct Attempts {
    delays: Box<dyn Iterator<Item = Duration> + Send>,
    failed: u32,
    first_failure: Option<(Instant, std::time::SystemTime)>,
}

impl Attempts {
    fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(Duration::from_secs(30))
    }

    /// Counts one more failure, and describes it for the error policy.
    fn failed(&mut self, e: &ProcessorError, has_records: bool) -> Failure {
        self.failed = self.failed.saturating_add(1);
        let (first, _) = *self
            .first_failure
            .get_or_insert_with(|| (Instant::now(), std::time::SystemTime::now()));
        Failure {
            attempts: self.failed,
            since_first: first.elapsed(),
            retryable: e.is_retryable(),
            has_records,
        }
    }
}

/// What to do after a processor error.
enum Next {
    Retry,
    /// The dead-letter handler took the batch: go on with the next one.
    Skip,
}

/// A processor callback that panicked, as the error the error policy sees.
#[derive(Debug, thiserror::Error)]
#[error("the record processor panicked in {callback}: {message}")]
struct Panicked {
    callback: &'static str,
    message: String,
}

/// Runs one processor callback, turning a panic into a fatal error (counted in `panics`): a
/// panicking processor must neither take the worker down nor leave its lease to expire.
pub(crate) async fn guarded<T>(
    panics: &metrics::Counter,
    callback: &'static str,
    fut: impl std::future::Future<Output = Result<T, ProcessorError>>,
) -> Result<T, ProcessorError> {
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "<non-string panic payload>".to_owned());
            error!(callback, %message, "record processor panicked");
            panics.increment(1);
            Err(ProcessorError::fatal(Panicked { callback, message }))
        }
    }
}

/// Runs one shard lease until the shard ends, the lease is lost, or the worker shuts down.
pub(crate) async fn run(env: ConsumerEnv, held: Arc<HeldLease>) -> ConsumerExit {
    let lease = held.snapshot().await;
    let shard = lease.shard_id();
    // Multi-stream leases name their stream; single-stream ones are of the configured stream.
    let stream_id = lease.key.stream();
    let stream = stream_id
        .as_ref()
        .map_or_else(|| env.config.stream.clone(), |s| s.name().to_owned());
    let span = match &stream_id {
        Some(id) => tracing::info_span!("consumer", stream = %id, shard_id = %shard),
        None => tracing::info_span!("consumer", shard_id = %shard),
    };
    // Registered once for this consumer; dropped (no longer refreshed) when it ends.
    let metrics = env.metrics_for(&stream).shard(&shard);
    let mut cp = Checkpointer::new(shard.clone(), held.clone(), env.store.clone())
        .with_metrics(metrics.handles().clone());
    let report = env.status.enter(&lease.key, lease.checkpoint.clone());
    let checkpointed = report.observer();
    cp.observe(Observer(Arc::new(move |write| {
        if let LeaseWrite::Checkpoint { position, .. } = write {
            checkpointed(position);
        }
    })));
    Consumer {
        metrics,
        env,
        held,
        report,
        shard,
        stream,
        processor: None,
        cp,
        unsaved: 0,
        last_saved: Instant::now(),
        last_activity: Instant::now(),
        idle_every: None,
    }
    .run(lease)
    .instrument(span)
    .await
}

struct Consumer {
    /// This shard's metric handles, registered with the worker while it holds the shard.
    metrics: m::ShardMetricsGuard,
    env: ConsumerEnv,
    held: Arc<HeldLease>,
    /// This shard's entry in the worker's status.
    report: ShardReport,
    shard: ShardId,
    /// The shard's stream (its name).
    stream: String,
    processor: Option<Box<dyn RecordProcessor>>,
    cp: Checkpointer,
    /// Records processed since the last automatic checkpoint.
    unsaved: u64,
    /// When the last automatic checkpoint was stored (or processing started).
    last_saved: Instant,
    /// When the last batch (or idle call) was handed to the processor.
    last_activity: Instant,
    /// The processor's [`RecordProcessor::idle_interval`].
    idle_every: Option<Duration>,
}

impl Consumer {
    async fn run(mut self, lease: Lease) -> ConsumerExit {
        let processed = self.process(lease).await;
        self.report.state(ShardState::ShuttingDown);
        match processed {
            Ok(()) => {
                info!("shard finished");
                self.release().await;
                ConsumerExit::Finished
            }
            Err(Stop::LeaseLost) => {
                info!("lease lost; stopping");
                self.lease_lost().await;
                ConsumerExit::LeaseLost
            }
            Err(Stop::Handoff) => {
                info!(to = ?self.held.handoff_to(), "handing the lease over");
                self.final_checkpoint("handing over anyway").await;
                self.release().await;
                self.metrics
                    .handles()
                    .worker()
                    .leases_handed_off
                    .increment(1);
                ConsumerExit::HandedOff
            }
            Err(Stop::Shutdown) => {
                if self.held.is_valid() {
                    self.final_checkpoint("releasing the lease anyway").await;
                } else {
                    self.lease_lost().await;
                }
                self.release().await;
                ConsumerExit::Released
            }
            Err(Stop::ProcessorFailed) => {
                self.final_checkpoint("releasing the lease anyway").await;
                self.release().await;
                ConsumerExit::ProcessorFailed
            }
            Err(Stop::ReadFailed(error)) => {
                self.final_checkpoint("releasing the lease anyway").await;
                self.release().await;
                ConsumerExit::ReadFailed(error)
            }
        }
    }

    /// Stores in the lease the stream time `t0` that the `LATEST` this shard is read from
    /// stands for, so that a crash before the first checkpoint does not make the next owner
    /// start at a later `LATEST`, skipping what arrived meanwhile. Best effort: a failure is
    /// logged (the next owner then starts at its own `LATEST`, as other KCLs do).
    async fn store_latest(&mut self, t0: std::time::SystemTime) {
        debug!(at = ?t0, "reading from LATEST as of this time (the stream's clock)");
        let write = LeaseWrite::ResolveLatest { at: t0 };
        match self.held.write(self.env.store.as_ref(), write).await {
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "could not store the position LATEST stands for in the lease")
            }
        }
    }

    /// `shutdown_requested`: the processor's last chance to checkpoint what it processed
    /// (its checkpointer reaches no further than the processed watermark); with an automatic
    /// checkpoint policy, the worker checkpoints that watermark afterwards.
    async fn final_checkpoint(&mut self, otherwise: &str) {
        let Some(p) = self.processor.as_mut() else {
            return;
        };
        if !self.held.is_valid() {
            return;
        }
        let result = guarded(
            &self.metrics.handles().worker().processor_panics,
            "shutdown_requested",
            p.shutdown_requested(&mut self.cp),
        )
        .await;
        if let Err(e) = result {
            warn!(error = %e, source = ?std::error::Error::source(&e), "shutdown_requested failed; {otherwise}");
        }
        if self.env.config.checkpoint_policy.is_automatic() && self.held.is_valid() {
            if let Err(e) = self.cp.checkpoint().await {
                warn!(error = %e, "the final checkpoint failed; {otherwise}");
            }
        }
    }

    /// When the consumer must wake without records: for an automatic checkpoint on a quiet
    /// shard, or for the processor's idle callback.
    fn next_timer(&self) -> Option<Instant> {
        let checkpoint = match self.env.config.checkpoint_policy.interval() {
            Some(t) if self.unsaved > 0 => Some(self.last_saved + t),
            _ => None,
        };
        let idle = self.idle_every.map(|t| self.last_activity + t);
        match (checkpoint, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    async fn on_timer(&mut self) -> Result<(), Stop> {
        let policy = self.env.config.checkpoint_policy;
        if policy.is_due(self.unsaved, self.last_saved.elapsed()) {
            self.auto_checkpoint().await?;
        }
        let Some(every) = self.idle_every else {
            return Ok(());
        };
        if self.last_activity.elapsed() < every {
            return Ok(());
        }
        self.last_activity = Instant::now();
        let mut delays = self.delays();
        let p = self.processor.as_mut().ok_or(Stop::ProcessorFailed)?;
        if let Err(e) = guarded(
            &self.metrics.handles().worker().processor_panics,
            "idle",
            p.idle(&mut self.cp),
        )
        .await
        {
            // A retryable error: called again at the next tick.
            self.on_error("idle", e, None, &mut delays).await?;
        }
        Ok(())
    }

    /// The automatic checkpoint policy's checkpoint of the processed watermark.
    async fn auto_checkpoint(&mut self) -> Result<(), Stop> {
        match self.cp.checkpoint().await {
            Ok(()) => {
                self.unsaved = 0;
                self.last_saved = Instant::now();
                Ok(())
            }
            Err(CheckpointError::LeaseLost { .. }) => Err(Stop::LeaseLost),
            Err(e) => {
                // Tried again after the next batch or interval.
                warn!(error = %e, "automatic checkpoint failed");
                Ok(())
            }
        }
    }

    async fn lease_lost(&mut self) {
        if let Some(p) = self.processor.as_mut() {
            let _ = guarded(
                &self.metrics.handles().worker().processor_panics,
                "lease_lost",
                async {
                    p.lease_lost().await;
                    Ok(())
                },
            )
            .await;
        }
    }

    async fn process(&mut self, lease: Lease) -> Result<(), Stop> {
        self.wait_for_parents(&lease).await?;
        let Some(position) = resume_position(
            &lease.checkpoint,
            lease.latest_resolved_at,
            self.env.config.initial_position,
        ) else {
            return Ok(()); // already at SHARD_END
        };
        let ctx = ShardContext {
            shard_id: self.shard.clone(),
            stream: self.stream.clone(),
            stream_identifier: lease.key.stream(),
            checkpoint: lease.checkpoint.clone(),
            parent_shard_ids: lease.parent_shard_ids.clone(),
            pending_checkpoint: PendingCheckpoint::of(&lease),
        };
        self.report.state(ShardState::Initializing);
        let mut delays = self.delays();
        loop {
            let p = self
                .processor
                .get_or_insert_with(|| self.env.factory.create(&self.shard));
            self.report.callback_started();
            let initialized = guarded(
                &self.metrics.handles().worker().processor_panics,
                "initialize",
                p.initialize(&ctx),
            )
            .await;
            self.report.callback_ended(0);
            match initialized {
                Ok(()) => break,
                Err(e) => {
                    self.on_error("initialize", e, None, &mut delays).await?;
                }
            }
        }

        self.report.state(ShardState::Processing);
        self.idle_every = self.processor.as_ref().and_then(|p| p.idle_interval());
        self.last_saved = Instant::now();
        self.last_activity = Instant::now();

        let fetch_stop = CancellationToken::new();
        let _stop_fetcher = fetch_stop.clone().drop_guard();
        // `latest_at`: for a start at `LATEST`, the stream's time it stands for (see
        // `polling::Reading`).
        let reading = self.env.reader.start(ShardRead {
            kinesis: self.env.kinesis.clone(),
            stream: self.stream.clone(),
            shard: self.shard.clone(),
            position,
            config: self.env.config.polling.clone(),
            budget: self.env.prefetch.clone(),
            metrics: self.metrics.handles().clone(),
            stop: fetch_stop,
        });
        if let Some(t0) = reading.latest_at {
            self.store_latest(t0).await;
        }
        let mut rx = reading.records;
        let mut delivered_upto = lease.checkpoint.clone();
        loop {
            let timer = self.next_timer();
            let fetched = tokio::select! {
                biased;
                _ = self.held.lost_token().cancelled() => return Err(Stop::LeaseLost),
                _ = self.env.shutdown.cancelled() => return Err(Stop::Shutdown),
                _ = self.held.handoff_token().cancelled() => return Err(Stop::Handoff),
                f = rx.recv() => f,
                _ = sleep_until(timer) => {
                    self.on_timer().await?;
                    continue;
                }
            };
            match fetched {
                Some(Fetched::Records {
                    records,
                    millis_behind_latest,
                    mut room,
                }) => {
                    if !self.held.is_valid() {
                        return Err(Stop::LeaseLost);
                    }
                    // KPL aggregates become their user records (those in this shard's hash
                    // range); what the checkpoint covers is dropped (a resume starts *at* the
                    // checkpointed record, possibly inside an aggregate).
                    let mut records = deaggregate_counted(
                        records,
                        &self.shard,
                        lease.hash_range,
                        &self.metrics.handles().worker().invalid_aggregates,
                    );
                    // Sub-records each have their own key, sequence number and overhead: the
                    // batch's room in the prefetch budget (held until it is processed) grows to
                    // what it holds now, from free room only (never waiting while holding).
                    room.deaggregated(&records);
                    records.retain(|r| r.position() > delivered_upto);
                    let Some(last) = records.last() else { continue };
                    delivered_upto = last.position();
                    let batch = RecordBatch {
                        shard_id: self.shard.clone(),
                        records,
                        millis_behind_latest,
                    };
                    if let Some(ms) = millis_behind_latest {
                        self.report.lag(ms);
                        self.metrics.handles().millis_behind(ms);
                    }
                    // The batch's span: the sequence range and count, never the payloads.
                    let span = tracing::debug_span!(
                        "batch",
                        first = %batch.records[0].sequence_number,
                        last = %last_seq(&batch),
                        records = batch.len(),
                    );
                    self.deliver(&batch).instrument(span).await?;
                    self.last_activity = Instant::now();
                    self.unsaved += batch.len() as u64;
                    let policy = self.env.config.checkpoint_policy;
                    if policy.is_due(self.unsaved, self.last_saved.elapsed()) {
                        self.auto_checkpoint().await?;
                    }
                }
                Some(Fetched::ShardEnd { children }) => {
                    let children = if children.is_empty() {
                        self.confirm_shard_end().await?
                    } else {
                        children
                    };
                    return self.end_shard(children).await;
                }
                Some(Fetched::Failed(KinesisApiError::NotFound(what))) => {
                    // Trimmed away by retention (or the stream was deleted): nothing is left
                    // to read. The shard syncer deletes the lease of a shard that is gone.
                    warn!(%what, "the shard no longer exists; releasing its lease");
                    self.env.sync_now.notify_one();
                    return Err(Stop::ReadFailed(format!("not found: {what}")));
                }
                Some(Fetched::Failed(e)) => {
                    let error = crate::error::chain(&e);
                    self.report.error(error.clone());
                    error!(%error, "cannot read the shard; releasing its lease (retried after a quarantine)");
                    return Err(Stop::ReadFailed(error));
                }
                None => {
                    error!("record fetcher stopped unexpectedly");
                    return Err(Stop::ReadFailed("record fetcher stopped".into()));
                }
            }
        }
    }

    async fn deliver(&mut self, batch: &RecordBatch) -> Result<(), Stop> {
        let Some(last) = batch.records.last().map(|r| r.position()) else {
            return Ok(());
        };
        // The checkpoint age: from the oldest record handed over since the last checkpoint.
        self.cp
            .note_arrival(batch.records.first().and_then(|r| r.approximate_arrival));
        let mut delays = self.delays();
        loop {
            let started = Instant::now();
            let p = self.processor.as_mut().ok_or(Stop::ProcessorFailed)?;
            // Inside `process_records` the batch may be checkpointed; the processed watermark
            // moves past it only if it returns `Ok`.
            self.cp.begin_batch(last.clone());
            self.report.callback_started();
            let result = guarded(
                &self.metrics.handles().worker().processor_panics,
                "process_records",
                p.process_records(batch, &mut self.cp),
            )
            .await;
            self.cp.end_batch(result.is_ok());
            self.report.callback_ended(if result.is_ok() {
                batch.len() as u64
            } else {
                0
            });
            let metrics = self.metrics.handles();
            metrics.processor_seconds(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => {
                    metrics.processed(batch.len() as u64, batch.data_bytes() as u64);
                    self.held.count_bytes(batch.data_bytes() as u64);
                    return Ok(());
                }
                Err(e) => {
                    metrics.processor_error();
                    match self
                        .on_error("process_records", e, Some(batch), &mut delays)
                        .await?
                    {
                        Next::Retry => {
                            if !self.held.is_valid() {
                                return Err(Stop::LeaseLost);
                            }
                        }
                        Next::Skip => {
                            // The dead-letter handler has the batch: it counts as processed.
                            self.cp.begin_batch(last);
                            self.cp.end_batch(true);
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// A shard end that came without child shards (a server that omits them, or one that
    /// ends an iterator early) is believed only once the shard is listed closed, with an
    /// ending sequence number: `SHARD_END` on a shard still open would skip its records and
    /// start its children too early. Returns the children from the listing.
    async fn confirm_shard_end(&mut self) -> Result<Vec<ChildShard>, Stop> {
        let mut delays = self.delays();
        let shards = loop {
            match self.env.kinesis.list_shards(&self.stream).await {
                Ok(shards) => break shards,
                Err(e) if e.is_retryable() => {
                    let d = delays.next_delay();
                    debug!(error = %e, delay = ?d, "listing shards to confirm a shard end failed; retrying");
                    tokio::select! {
                        biased;
                        _ = self.held.lost_token().cancelled() => return Err(Stop::LeaseLost),
                        _ = self.env.shutdown.cancelled() => return Err(Stop::Shutdown),
                        _ = self.held.handoff_token().cancelled() => return Err(Stop::Handoff),
                        _ = tokio::time::sleep(d) => {}
                    }
                }
                Err(e) => return Err(Stop::ReadFailed(crate::error::chain(&e))),
            }
        };
        match shards.iter().find(|s| s.id == self.shard) {
            Some(shard) if shard.is_closed() => Ok(shards
                .iter()
                .filter(|c| c.parents().any(|p| *p == self.shard))
                .map(|c| {
                    ChildShard::new(c.id.clone(), c.parents().cloned().collect(), c.hash_range)
                })
                .collect()),
            Some(_) => {
                warn!("the shard end was reported for a shard listed open; reading it again later");
                Err(Stop::ReadFailed(
                    "shard end reported for an open shard".into(),
                ))
            }
            None => {
                warn!("the shard end was reported for a shard no longer listed");
                self.env.sync_now.notify_one();
                Err(Stop::ReadFailed(
                    "shard end of a shard no longer listed".into(),
                ))
            }
        }
    }

    async fn end_shard(&mut self, children: Vec<ChildShard>) -> Result<(), Stop> {
        info!(children = ?children.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), "reached shard end");
        let mut delays = self.delays();
        loop {
            if !self.held.is_valid() {
                return Err(Stop::LeaseLost);
            }
            let p = self.processor.as_mut().ok_or(Stop::ProcessorFailed)?;
            self.cp.begin_shard_end(children.clone());
            let result = guarded(
                &self.metrics.handles().worker().processor_panics,
                "shard_ended",
                p.shard_ended(&mut self.cp),
            )
            .await;
            let requested = self.cp.end_shard_end();
            let result: Result<(), ProcessorError> = match result {
                // SHARD_END is stored only now that `shard_ended` succeeded.
                Ok(()) if requested => match self.cp.write_shard_end().await {
                    Ok(()) => break,
                    Err(CheckpointError::LeaseLost { .. }) => return Err(Stop::LeaseLost),
                    Err(e) => Err(ProcessorError::retryable(e)),
                },
                Ok(())
                    if self.held.snapshot().await.checkpoint
                        == ExtendedSequenceNumber::ShardEnd =>
                {
                    break
                }
                Ok(()) => Err(ProcessorError::retryable(
                    "shard_ended returned without checkpointing SHARD_END",
                )),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                // A failed shard end is always retried: skipping it would strand the children.
                self.retry_delay("shard_ended", &e, &mut delays).await?;
            }
        }
        // The shard syncer creates the child leases at once, from a listing, parents first and
        // with their full lineage (a child of a merge must also wait for its other parent).
        self.env.sync_now.notify_one();
        Ok(())
    }

    async fn wait_for_parents(&mut self, lease: &Lease) -> Result<(), Stop> {
        // A child that has started (checkpoint past the initial position) had its parents done.
        if lease.parent_shard_ids.is_empty() || !lease.checkpoint.is_initial() {
            return Ok(());
        }
        loop {
            let mut states = Vec::with_capacity(lease.parent_shard_ids.len());
            for parent in &lease.parent_shard_ids {
                let state = match self.env.store.get(&self.held.key().sibling(parent)).await {
                    Ok(l) => ParentState::of(l.as_ref()),
                    Err(e) => {
                        debug!(parent = %parent, error = %e, "reading parent lease failed");
                        ParentState::Unfinished
                    }
                };
                states.push((parent.clone(), state));
            }
            if can_start(&states) {
                return Ok(());
            }
            debug!(parents = ?states, "waiting for parent shards to finish");
            tokio::select! {
                biased;
                _ = self.held.lost_token().cancelled() => return Err(Stop::LeaseLost),
                _ = self.env.shutdown.cancelled() => return Err(Stop::Shutdown),
                _ = self.held.handoff_token().cancelled() => return Err(Stop::Handoff),
                _ = tokio::time::sleep(self.env.config.parent_poll_interval) => {}
            }
        }
    }

    fn delays(&mut self) -> Attempts {
        let (min, max) = self.env.error_policy.delays();
        let seed = crate::backoff::seed(&[self.env.config.worker_id.as_str(), self.shard.as_str()]);
        Attempts {
            delays: Box::new(crate::backoff::exponential(min, max, seed).build()),
            failed: 0,
            first_failure: None,
        }
    }

    async fn retry_delay(
        &mut self,
        what: &str,
        e: &ProcessorError,
        delays: &mut Attempts,
    ) -> Result<(), Stop> {
        let d = delays.next_delay();
        warn!(error = %e, source = ?std::error::Error::source(e), delay = ?d, "{what} failed; retrying");
        self.pause(d).await
    }

    /// Sleeps `d` unless the lease is lost, the worker stops or a handoff is asked for.
    async fn pause(&mut self, d: Duration) -> Result<(), Stop> {
        tokio::select! {
            biased;
            _ = self.held.lost_token().cancelled() => Err(Stop::LeaseLost),
            _ = self.env.shutdown.cancelled() => Err(Stop::Shutdown),
            _ = self.held.handoff_token().cancelled() => Err(Stop::Handoff),
            _ = tokio::time::sleep(d) => Ok(()),
        }
    }

    async fn on_error(
        &mut self,
        what: &str,
        e: ProcessorError,
        batch: Option<&RecordBatch>,
        delays: &mut Attempts,
    ) -> Result<Next, Stop> {
        self.report
            .error(format!("{what}: {}", crate::error::chain(&e)));
        if !self.held.is_valid() {
            // Typically a checkpoint refused because the lease moved: not the processor's fault.
            debug!(error = %e, "{what} failed after the lease was lost");
            return Err(Stop::LeaseLost);
        }
        let failure = delays.failed(&e, batch.is_some_and(|b| !b.is_empty()));
        match self.env.error_policy.decide(&failure) {
            FailureAction::Retry => {
                self.retry_delay(what, &e, delays).await?;
                Ok(Next::Retry)
            }
            FailureAction::DeadLetter => {
                let (Some(batch), ErrorPolicy::DeadLetter(policy)) =
                    (batch, &self.env.error_policy)
                else {
                    return Err(Stop::ProcessorFailed);
                };
                let handler = policy.handler.clone();
                self.dead_letter(handler.as_ref(), batch, &e, delays).await
            }
            _ => {
                error!(error = %e, source = ?std::error::Error::source(&e), attempts = failure.attempts, "{what} failed; stopping the shard (error policy)");
                Err(Stop::ProcessorFailed)
            }
        }
    }

    /// Hands `batch` to the dead-letter handler until it takes it: only its success lets the
    /// shard move past the batch. A panicking handler stops the shard (the batch was not taken).
    async fn dead_letter(
        &mut self,
        handler: &dyn DeadLetterHandler,
        batch: &RecordBatch,
        e: &ProcessorError,
        delays: &mut Attempts,
    ) -> Result<Next, Stop> {
        let stream = self.stream.clone();
        let first_failure = delays
            .first_failure
            .map_or_else(std::time::SystemTime::now, |(_, wall)| wall);
        warn!(error = %e, records = batch.len(), attempts = delays.failed, "processing failed; handing the batch to the dead-letter handler");
        loop {
            // A lease lost while the handler failed: the next owner hands the batch over.
            if !self.held.is_valid() {
                return Err(Stop::LeaseLost);
            }
            let letter = DeadLetter::new(
                &stream,
                &batch.shard_id,
                &batch.records,
                e,
                delays.failed,
                first_failure,
            );
            match AssertUnwindSafe(handler.handle(&letter))
                .catch_unwind()
                .await
            {
                Ok(Ok(())) => {
                    self.metrics.handles().dead_lettered(batch.len() as u64);
                    return Ok(Next::Skip);
                }
                Ok(Err(he)) => {
                    self.metrics.handles().dead_letter_failed();
                    let error = crate::error::chain(he.as_ref());
                    self.report.error(format!("dead-letter handler: {error}"));
                    let d = delays.next_delay();
                    warn!(%error, delay = ?d, "the dead-letter handler failed; the shard waits and hands the batch over again");
                    self.pause(d).await?;
                }
                Err(_) => {
                    error!("the dead-letter handler panicked; stopping the shard");
                    self.metrics
                        .handles()
                        .worker()
                        .processor_panics
                        .increment(1);
                    return Err(Stop::ProcessorFailed);
                }
            }
        }
    }

    /// Gives the lease up: released, or — if a peer asked for it — handed over.
    async fn release(&mut self) {
        let store = self.env.store.clone();
        for attempt in 0..3u32 {
            if !self.held.is_valid() {
                break;
            }
            let write = match self.held.handoff_to() {
                Some(to) => LeaseWrite::CompleteHandoff { to },
                None => LeaseWrite::Release,
            };
            let releasing = self.held.handoff_to().is_none();
            match self.held.write_final(store.as_ref(), write).await {
                Ok(_) => {
                    debug!("lease released");
                    if releasing && !self.env.shutdown.is_cancelled() {
                        self.held.announce_release();
                    }
                    break;
                }
                Err(e) if e.is_condition_failed() && self.held.handoff_to().is_none() => {
                    // A handoff may have been requested since the last renewal.
                    let ours = self.held.snapshot().await;
                    match store.get(self.held.key()).await {
                        Ok(Some(now))
                            if now.counter == ours.counter
                                && now.checkpoint_owner.as_ref()
                                    == Some(&self.env.config.worker_id) =>
                        {
                            let to = now.owner.clone().unwrap_or_else(|| WorkerId::new(""));
                            let write = LeaseWrite::CompleteHandoff { to };
                            if let Err(e) = self.held.write_final(store.as_ref(), write).await {
                                warn!(error = %e, "completing the handoff failed; the lease will expire instead");
                            }
                        }
                        _ => debug!("lease changed before release; nothing to release"),
                    }
                    break;
                }
                Err(e) if e.is_condition_failed() => {
                    // The new owner withdrew its request (it stopped) before we completed the
                    // handoff: the lease is ours again, as before the request. Our processor
                    // has stopped, so it is released for whoever takes it next.
                    let ours = self.held.snapshot().await;
                    match store.get(self.held.key()).await {
                        Ok(Some(now))
                            if now.counter == ours.counter
                                && now.owner.as_ref() == Some(&self.env.config.worker_id)
                                && now.checkpoint_owner.is_none() =>
                        {
                            if let Err(e) = self
                                .held
                                .write_final(store.as_ref(), LeaseWrite::Release)
                                .await
                            {
                                warn!(error = %e, "releasing a lease whose handoff was withdrawn failed; it will expire instead");
                            } else {
                                debug!("handoff withdrawn by the new owner; lease released");
                                self.held.announce_release();
                            }
                        }
                        _ => {
                            debug!("lease changed before the handoff completed; nothing to release")
                        }
                    }
                    break;
                }
                Err(e) if e.is_retryable() => {
                    debug!(error = %e, attempt, "release failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                Err(e) => {
                    warn!(error = %e, "release failed; the lease will expire instead");
                    break;
                }
            }
        }
        self.held.mark_lost();
    }
}

/// Sleeps until `deadline`; forever without one.
/// The sequence number of a batch's last record (`batch` is never empty here).
fn last_seq(batch: &RecordBatch) -> &crate::record::SequenceNumber {
    &batch.records[batch.records.len() - 1].sequence_number
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
