//! Ordered parallelism by partition key: [`OrderedParallel`] runs a per-record
//! [`RecordHandler`] on up to `concurrency` records of one shard at once, never two records of
//! the same partition key at once, each key's records in shard order, and checkpoints only the
//! **contiguous prefix** of completed records: a crash re-delivers from the oldest record not
//! completed (records after it that did complete are delivered again too).
//!
//! ```
//! use std::sync::Arc;
//! use kcl::processor::parallel::{OrderedParallel, RecordContext, RecordHandler};
//! use kcl::{async_trait, ProcessorError, Record};
//!
//! struct Enrich;
//!
//! #[async_trait]
//! impl RecordHandler for Enrich {
//!     async fn handle(&self, record: &Record, ctx: &RecordContext) -> Result<(), ProcessorError> {
//!         // … one call to a slow service per record …
//!         let _ = (record, ctx);
//!         Ok(())
//!     }
//! }
//!
//! // One processor per shard, each running up to 64 records at once.
//! let factory = OrderedParallel::builder(Arc::new(Enrich)).concurrency(64).factory()?;
//! # let _ = factory;
//! # Ok::<(), kcl::config::ConfigError>(())
//! ```
//!
//! See `docs/parallel.md` for ordering, backpressure, checkpoints and failures.

mod prefix;
mod schedule;
#[cfg(all(test, feature = "testkit"))]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::FutureExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use super::policy::{DeadLetter, Failure, FailureAction};
use super::{ErrorPolicy, ProcessorError, ProcessorFactory, RecordProcessor, ShardContext};
use crate::checkpoint::Checkpointer;
use crate::config::ConfigError;
use crate::record::{ExtendedSequenceNumber, Record, RecordBatch};
use crate::shard::ShardId;

use prefix::Prefix;
use schedule::Scheduler;

/// What a [`RecordHandler`] learns about the record it handles: its shard, and which attempt
/// this is (see [`RecordContext::new`] for an example).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RecordContext {
    /// The record's shard.
    pub shard_id: ShardId,
    /// Which attempt this is (1 for the first; retries after a failure count up).
    pub attempt: u32,
}

impl RecordContext {
    /// A context (the adapter builds them; tests may too).
    ///
    /// ```
    /// let ctx = kcl::processor::parallel::RecordContext::new(kcl::ShardId::new("shardId-0"), 1);
    /// assert_eq!(ctx.attempt, 1);
    /// ```
    pub fn new(shard_id: ShardId, attempt: u32) -> Self {
        Self { shard_id, attempt }
    }
}

/// Handles one record. Runs concurrently with other records of the shard (never with another
/// record of the same partition key), hence `&self` and `Sync`.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use kcl::processor::parallel::{RecordContext, RecordHandler};
/// use kcl::{async_trait, ProcessorError, Record};
///
/// #[derive(Default)]
/// struct Count(AtomicU64);
///
/// #[async_trait]
/// impl RecordHandler for Count {
///     async fn handle(&self, _record: &Record, _ctx: &RecordContext) -> Result<(), ProcessorError> {
///         self.0.fetch_add(1, Ordering::Relaxed);
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait RecordHandler: Send + Sync + 'static {
    /// Handles `record`. `Ok` completes it; an error goes to the adapter's [`ErrorPolicy`],
    /// applied to this record alone (a panic is a fatal error).
    ///
    /// # Errors
    /// Retried, dead-lettered or fatal as the error policy decides; other keys go on
    /// meanwhile, this key's later records wait.
    async fn handle(&self, record: &Record, ctx: &RecordContext) -> Result<(), ProcessorError>;
}

/// Told of every checkpoint [`OrderedParallel`] stored (shard, position); set with
/// [`ParallelBuilder::on_checkpoint`].
///
/// ```
/// let observer: kcl::processor::parallel::CheckpointObserver =
///     std::sync::Arc::new(|shard, pos| println!("{shard} checkpointed at {pos}"));
/// # let _ = observer;
/// ```
pub type CheckpointObserver = Arc<dyn Fn(&ShardId, &ExtendedSequenceNumber) + Send + Sync>;

/// [`OrderedParallel`]'s settings, checked by [`ParallelBuilder::build`].
#[derive(Clone)]
struct Settings {
    concurrency: usize,
    max_buffered: Option<usize>,
    error_policy: ErrorPolicy,
    drain_timeout: Duration,
    checkpoint_every: Option<Duration>,
    tick: Duration,
    observer: Option<CheckpointObserver>,
}

/// Builds an [`OrderedParallel`] (or a factory of them, one per shard).
///
/// ```
/// use std::{sync::Arc, time::Duration};
/// use kcl::processor::parallel::{OrderedParallel, RecordContext, RecordHandler};
/// use kcl::{async_trait, ErrorPolicy, ProcessorError, Record};
///
/// struct Nothing;
/// #[async_trait]
/// impl RecordHandler for Nothing {
///     async fn handle(&self, _: &Record, _: &RecordContext) -> Result<(), ProcessorError> { Ok(()) }
/// }
///
/// let adapter = OrderedParallel::builder(Arc::new(Nothing))
///     .concurrency(32)
///     .max_buffered_records(2_000)
///     .error_policy(ErrorPolicy::default())
///     .drain_timeout(Duration::from_secs(10))
///     .checkpoint_every(Some(Duration::from_secs(5)))
///     .build()?;
/// # let _ = adapter;
/// // Out of range: the field is named.
/// let err = OrderedParallel::builder(Arc::new(Nothing)).concurrency(0).build().unwrap_err();
/// assert_eq!(err.field(), "concurrency");
/// # Ok::<(), kcl::config::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct ParallelBuilder {
    handler: Arc<dyn RecordHandler>,
    settings: Settings,
}

impl fmt::Debug for ParallelBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParallelBuilder")
            .field("concurrency", &self.settings.concurrency)
            .field("max_buffered_records", &self.settings.max_buffered)
            .field("error_policy", &self.settings.error_policy)
            .field("drain_timeout", &self.settings.drain_timeout)
            .field("checkpoint_every", &self.settings.checkpoint_every)
            .finish_non_exhaustive()
    }
}

/// The default bound on records accepted but not completed.
const DEFAULT_MAX_BUFFERED: usize = 1_000;

impl ParallelBuilder {
    /// At most `n` records run at once (at least 1; default 16).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.settings.concurrency = n;
        self
    }

    /// Backpressure: `process_records` returns once at most `n` accepted records are not
    /// completed, so the worker fetches more only then (at least `concurrency`; default the
    /// larger of 1 000 and `concurrency`).
    pub fn max_buffered_records(mut self, n: usize) -> Self {
        self.settings.max_buffered = Some(n);
        self
    }

    /// What a failed record meets, applied to that record alone (default: retry with backoff,
    /// a fatal error stops the shard). [`ErrorPolicy::DeadLetter`] hands a record that keeps
    /// failing to its handler in a one-record letter.
    pub fn error_policy(mut self, policy: ErrorPolicy) -> Self {
        self.settings.error_policy = policy;
        self
    }

    /// At a graceful stop or handoff, how long the records accepted may finish (queued ones
    /// still start) before the rest is abandoned (default 20 s; keep it below the worker's
    /// `shutdown_timeout`). The checkpoint stops before the oldest unfinished record.
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.settings.drain_timeout = d;
        self
    }

    /// How often the adapter checkpoints the completed prefix while it moves (default every
    /// second; `Some(Duration::ZERO)`: at every callback where it moved). `None`: the adapter
    /// never checkpoints by itself, leave it to an automatic
    /// [`CheckpointPolicy`](crate::CheckpointPolicy), which then covers the completed prefix
    /// only. Either way `shard_ended` stores `SHARD_END` once everything completed.
    pub fn checkpoint_every(mut self, every: Option<Duration>) -> Self {
        self.settings.checkpoint_every = every;
        self
    }

    /// The idle interval asked of the worker (default 1 s): on a quiet shard, how often the
    /// completed prefix is reported and checkpointed. Must be positive.
    pub fn tick(mut self, every: Duration) -> Self {
        self.settings.tick = every;
        self
    }

    /// Calls `f` after every checkpoint the adapter stored (e.g. for a metric, or a test
    /// that checks what was stored against what completed).
    pub fn on_checkpoint(
        mut self,
        f: impl Fn(&ShardId, &ExtendedSequenceNumber) + Send + Sync + 'static,
    ) -> Self {
        self.settings.observer = Some(Arc::new(f));
        self
    }

    fn validated(&self) -> Result<Settings, ConfigError> {
        let mut s = self.settings.clone();
        if s.concurrency == 0 {
            return Err(ConfigError::new("concurrency", "must be at least 1"));
        }
        match s.max_buffered {
            Some(n) if n < s.concurrency => {
                return Err(ConfigError::new(
                    "max_buffered_records",
                    format!("must be at least concurrency ({})", s.concurrency),
                ))
            }
            Some(_) => {}
            None => s.max_buffered = Some(DEFAULT_MAX_BUFFERED.max(s.concurrency)),
        }
        if s.tick.is_zero() {
            return Err(ConfigError::new("tick", "must be positive"));
        }
        Ok(s)
    }

    /// One adapter (for one shard).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the setting out of range.
    pub fn build(&self) -> Result<OrderedParallel, ConfigError> {
        Ok(OrderedParallel::with(
            self.handler.clone(),
            self.validated()?,
        ))
    }

    /// A [`ProcessorFactory`] making one adapter per shard, all sharing the handler.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the setting out of range.
    pub fn factory(&self) -> Result<ParallelFactory, ConfigError> {
        Ok(ParallelFactory {
            handler: self.handler.clone(),
            settings: self.validated()?,
        })
    }
}

/// Makes one [`OrderedParallel`] per shard ([`ParallelBuilder::factory`]); give it to
/// [`WorkerBuilder::processor`](crate::WorkerBuilder::processor).
///
/// ```
/// use std::sync::Arc;
/// use kcl::processor::parallel::{OrderedParallel, ParallelFactory, RecordContext, RecordHandler};
/// use kcl::{async_trait, ProcessorError, ProcessorFactory, Record, ShardId};
///
/// struct Nothing;
/// #[async_trait]
/// impl RecordHandler for Nothing {
///     async fn handle(&self, _: &Record, _: &RecordContext) -> Result<(), ProcessorError> { Ok(()) }
/// }
///
/// let factory: ParallelFactory = OrderedParallel::builder(Arc::new(Nothing)).factory()?;
/// let _processor = factory.create(&ShardId::new("shardId-000000000000"));
/// # Ok::<(), kcl::config::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct ParallelFactory {
    handler: Arc<dyn RecordHandler>,
    settings: Settings,
}

impl fmt::Debug for ParallelFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParallelFactory")
            .field("concurrency", &self.settings.concurrency)
            .finish_non_exhaustive()
    }
}

impl ProcessorFactory for ParallelFactory {
    fn create(&self, _shard: &ShardId) -> Box<dyn RecordProcessor> {
        Box::new(OrderedParallel::with(
            self.handler.clone(),
            self.settings.clone(),
        ))
    }
}

/// A [`RecordProcessor`] that runs a [`RecordHandler`] on many records of its shard at once,
/// in order per partition key, checkpointing only the contiguous prefix of completed records.
///
/// - `process_records` queues the batch per key and returns as soon as at most
///   `max_buffered_records` accepted records are unfinished: the worker keeps fetching while
///   records run (pipelining across batches).
/// - The worker's processed watermark is what completed
///   ([`Checkpointer::processed_through`]): neither the adapter, nor an automatic checkpoint
///   policy, nor a final checkpoint ever covers a record not completed.
/// - `shard_ended` waits for every record, then stores `SHARD_END`; `shutdown_requested`
///   lets the accepted records finish for up to the drain timeout (a planned move then causes
///   no duplicates), abandons the rest, then checkpoints the prefix; `lease_lost` abandons
///   everything without a checkpoint.
/// - A failed record follows the error policy (retry with backoff, dead letter, or stop)
///   without holding up other keys; the prefix waits for it. After a stop, the next callback
///   returns a fatal error.
///
/// Use it with the worker's default error policy (or `StopShard`): the adapter applies its
/// own policy per record, and returns only fatal errors.
///
/// ```
/// use std::sync::Arc;
/// use kcl::processor::parallel::{OrderedParallel, RecordContext, RecordHandler};
/// use kcl::{async_trait, ProcessorError, Record};
///
/// struct Nothing;
/// #[async_trait]
/// impl RecordHandler for Nothing {
///     async fn handle(&self, _: &Record, _: &RecordContext) -> Result<(), ProcessorError> { Ok(()) }
/// }
///
/// let p: OrderedParallel = OrderedParallel::builder(Arc::new(Nothing)).build()?;
/// # let _ = p;
/// # Ok::<(), kcl::config::ConfigError>(())
/// ```
pub struct OrderedParallel {
    shared: Arc<Shared>,
    /// The last position the adapter stored, and when.
    last_checkpoint: Option<ExtendedSequenceNumber>,
    last_checkpoint_at: Instant,
}

impl fmt::Debug for OrderedParallel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("OrderedParallel")
            .field("shard", &state.shard)
            .field("unfinished", &state.prefix.unfinished())
            .field("running", &state.sched.running())
            .field("through", &state.prefix.through())
            .finish_non_exhaustive()
    }
}

struct Shared {
    handler: Arc<dyn RecordHandler>,
    settings: Settings,
    state: Mutex<State>,
    /// Woken on every completion, failure and stop.
    changed: Notify,
    /// Cancels running records and pending retries.
    cancel: CancellationToken,
}

struct State {
    shard: ShardId,
    /// The shard's stream (from `initialize`), for dead letters.
    stream: String,
    sched: Scheduler,
    prefix: Prefix<ExtendedSequenceNumber>,
    /// Records accepted and not completed.
    records: HashMap<u64, Pending>,
    /// No new record starts (graceful stop).
    draining: bool,
    /// The error policy stopped the shard: the reason.
    fatal: Option<String>,
}

struct Pending {
    record: Record,
    /// Failed attempts so far.
    failures: u32,
    first_failure: Option<(Instant, SystemTime)>,
}

impl OrderedParallel {
    /// A builder around `handler`.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use kcl::processor::parallel::{OrderedParallel, RecordContext, RecordHandler};
    /// # use kcl::{async_trait, ProcessorError, Record};
    /// # struct H;
    /// # #[async_trait]
    /// # impl RecordHandler for H {
    /// #     async fn handle(&self, _: &Record, _: &RecordContext) -> Result<(), ProcessorError> { Ok(()) }
    /// # }
    /// let builder = OrderedParallel::builder(Arc::new(H)).concurrency(8);
    /// # let _ = builder;
    /// ```
    pub fn builder<H: RecordHandler>(handler: Arc<H>) -> ParallelBuilder {
        ParallelBuilder {
            handler,
            settings: Settings {
                concurrency: 16,
                max_buffered: None,
                error_policy: ErrorPolicy::default(),
                drain_timeout: Duration::from_secs(20),
                checkpoint_every: Some(Duration::from_secs(1)),
                tick: Duration::from_secs(1),
                observer: None,
            },
        }
    }

    fn with(handler: Arc<dyn RecordHandler>, settings: Settings) -> Self {
        let concurrency = settings.concurrency;
        Self {
            shared: Arc::new(Shared {
                handler,
                settings,
                state: Mutex::new(State {
                    shard: ShardId::new(""),
                    stream: String::new(),
                    sched: Scheduler::new(concurrency),
                    prefix: Prefix::new(),
                    records: HashMap::new(),
                    draining: false,
                    fatal: None,
                }),
                changed: Notify::new(),
                cancel: CancellationToken::new(),
            }),
            last_checkpoint: None,
            last_checkpoint_at: Instant::now(),
        }
    }

    /// The last record of the contiguous completed prefix (what a checkpoint may cover);
    /// `None` before the first record completed.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use kcl::processor::parallel::{OrderedParallel, RecordContext, RecordHandler};
    /// # use kcl::{async_trait, ProcessorError, Record};
    /// # struct H;
    /// # #[async_trait]
    /// # impl RecordHandler for H {
    /// #     async fn handle(&self, _: &Record, _: &RecordContext) -> Result<(), ProcessorError> { Ok(()) }
    /// # }
    /// let p = OrderedParallel::builder(Arc::new(H)).build()?;
    /// assert_eq!(p.completed_through(), None);
    /// assert_eq!(p.unfinished(), 0);
    /// # Ok::<(), kcl::config::ConfigError>(())
    /// ```
    pub fn completed_through(&self) -> Option<ExtendedSequenceNumber> {
        self.shared.lock().prefix.through().cloned()
    }

    /// Records accepted and not completed yet.
    pub fn unfinished(&self) -> usize {
        self.shared.lock().prefix.unfinished()
    }

    fn fatal(&self) -> Result<(), ProcessorError> {
        match &self.shared.lock().fatal {
            Some(reason) => Err(ProcessorError::fatal(format!(
                "a record failed and the error policy stopped the shard: {reason}"
            ))),
            None => Ok(()),
        }
    }

    /// Reports the completed prefix as the processed watermark; checkpoints it if it moved
    /// and a checkpoint is due (`force`: whenever it moved).
    async fn report(&mut self, cp: &mut Checkpointer, force: bool) -> Result<(), ProcessorError> {
        let through = self.completed_through();
        cp.processed_through(through.clone()).await?;
        let (Some(every), Some(pos)) = (self.shared.settings.checkpoint_every, through) else {
            return Ok(());
        };
        if self.last_checkpoint.as_ref() == Some(&pos)
            || !(force || self.last_checkpoint_at.elapsed() >= every)
        {
            return Ok(());
        }
        cp.checkpoint_at(pos.clone()).await?;
        debug!(through = %pos, "checkpointed the completed prefix");
        if let Some(observer) = &self.shared.settings.observer {
            observer(cp.shard_id(), &pos);
        }
        self.last_checkpoint = Some(pos);
        self.last_checkpoint_at = Instant::now();
        Ok(())
    }
}

impl Drop for OrderedParallel {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic never happens while the lock is held (handlers run outside it).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `done` holds (checked after every change), or `deadline` passes. Returns
    /// whether it held.
    async fn wait(&self, deadline: Option<Instant>, done: impl Fn(&State) -> bool) -> bool {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(&self.lock()) {
                return true;
            }
            match deadline {
                Some(at) => {
                    if tokio::time::timeout_at(at, notified).await.is_err() {
                        return done(&self.lock());
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Starts every record that may start now.
    fn pump(self: &Arc<Self>, state: &mut State) {
        if state.draining || state.fatal.is_some() || self.cancel.is_cancelled() {
            return;
        }
        while let Some(index) = state.sched.start() {
            let Some(pending) = state.records.get(&index) else {
                continue;
            };
            let record = pending.record.clone();
            let ctx = RecordContext::new(state.shard.clone(), pending.failures + 1);
            let span = tracing::debug_span!(
                "record",
                key = %record.partition_key,
                seq = %record.sequence_number,
                attempt = ctx.attempt,
            );
            tokio::spawn(self.clone().run(index, record, ctx).instrument(span));
        }
    }

    /// Runs one attempt of record `index`.
    async fn run(self: Arc<Self>, index: u64, record: Record, ctx: RecordContext) {
        let outcome = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return,
            r = AssertUnwindSafe(self.handler.handle(&record, &ctx)).catch_unwind() => r,
        };
        let error = match outcome {
            Ok(Ok(())) => {
                debug!("record completed");
                return self.complete(index);
            }
            Ok(Err(e)) => e,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "<non-string panic payload>".to_owned());
                ProcessorError::fatal(format!("the record handler panicked: {message}"))
            }
        };
        self.failed(index, &record, error).await;
    }

    fn complete(self: &Arc<Self>, index: u64) {
        let mut state = self.lock();
        state.sched.finish(index);
        state.prefix.complete(index);
        state.records.remove(&index);
        self.pump(&mut state);
        drop(state);
        self.changed.notify_waiters();
    }

    async fn failed(self: Arc<Self>, index: u64, record: &Record, error: ProcessorError) {
        let policy = &self.settings.error_policy;
        let (action, failure, first_failure) = {
            let mut state = self.lock();
            let Some(p) = state.records.get_mut(&index) else {
                return;
            };
            p.failures += 1;
            let first = *p
                .first_failure
                .get_or_insert((Instant::now(), SystemTime::now()));
            let failure = Failure {
                attempts: p.failures,
                since_first: first.0.elapsed(),
                retryable: error.is_retryable(),
                has_records: true,
            };
            (policy.decide(&failure), failure, first.1)
        };
        warn!(error = %error, source = ?std::error::Error::source(&error), attempts = failure.attempts, ?action, "record failed");
        match action {
            FailureAction::Retry => {
                self.lock().sched.pause(index);
                let delay = retry_delay(policy, failure.attempts);
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                let mut state = self.lock();
                state.sched.resume(index);
                self.pump(&mut state);
            }
            FailureAction::DeadLetter => {
                let ErrorPolicy::DeadLetter(dl) = policy else {
                    return self.stop(index, &error);
                };
                let (shard, stream) = {
                    let state = self.lock();
                    (state.shard.clone(), state.stream.clone())
                };
                let records = std::slice::from_ref(record);
                let mut attempt = 0;
                loop {
                    let letter = DeadLetter::new(
                        &stream,
                        &shard,
                        records,
                        &error,
                        failure.attempts,
                        first_failure,
                    );
                    let handled = tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        r = dl.handler.handle(&letter) => r,
                    };
                    match handled {
                        Ok(()) => break,
                        Err(e) => {
                            attempt += 1;
                            let delay = retry_delay(policy, attempt);
                            warn!(error = %e, ?delay, "the dead-letter handler failed; retrying");
                            tokio::select! {
                                _ = self.cancel.cancelled() => return,
                                _ = tokio::time::sleep(delay) => {}
                            }
                        }
                    }
                }
                debug!("record dead-lettered");
                self.complete(index);
            }
            _ => self.stop(index, &error),
        }
    }

    /// The error policy stopped the shard: nothing starts any more; the next callback fails.
    fn stop(&self, index: u64, error: &ProcessorError) {
        let mut state = self.lock();
        state.sched.pause(index);
        let reason = match std::error::Error::source(error) {
            Some(source) => format!("{error}: {source}"),
            None => error.to_string(),
        };
        state.fatal.get_or_insert(reason);
        drop(state);
        self.changed.notify_waiters();
    }
}

/// The `attempts`-th retry delay: exponential from the policy's first delay to its largest.
fn retry_delay(policy: &ErrorPolicy, attempts: u32) -> Duration {
    let (min, max) = policy.delays();
    let factor = 1u32 << attempts.saturating_sub(1).min(16);
    min.saturating_mul(factor).min(max)
}

#[async_trait]
impl RecordProcessor for OrderedParallel {
    async fn initialize(&mut self, shard: &ShardContext) -> Result<(), ProcessorError> {
        let mut state = self.shared.lock();
        state.shard = shard.shard_id.clone();
        state.stream = shard.stream.clone();
        Ok(())
    }

    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        self.fatal()?;
        {
            let mut guard = self.shared.lock();
            let state = &mut *guard;
            for record in &batch.records {
                let pos = record.position();
                // A batch delivered again (after a retryable error) is accepted once.
                if state
                    .prefix
                    .last_accepted()
                    .is_some_and(|last| &pos <= last)
                {
                    continue;
                }
                let index = state.prefix.accept(pos);
                state.sched.push(index, &record.partition_key);
                state.records.insert(
                    index,
                    Pending {
                        record: record.clone(),
                        failures: 0,
                        first_failure: None,
                    },
                );
            }
            self.shared.pump(state);
        }
        let max = self
            .shared
            .settings
            .max_buffered
            .unwrap_or(DEFAULT_MAX_BUFFERED);
        self.shared
            .wait(None, |s| s.prefix.unfinished() <= max || s.fatal.is_some())
            .await;
        self.fatal()?;
        self.report(cp, false).await
    }

    fn idle_interval(&self) -> Option<Duration> {
        Some(self.shared.settings.tick)
    }

    async fn idle(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        self.fatal()?;
        self.report(cp, false).await
    }

    async fn shard_ended(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        self.shared
            .wait(None, |s| s.prefix.unfinished() == 0 || s.fatal.is_some())
            .await;
        self.fatal()?;
        cp.processed_through(self.completed_through()).await?;
        // Inside `shard_ended`: asks for SHARD_END, stored once this returns.
        cp.checkpoint().await?;
        Ok(())
    }

    async fn shutdown_requested(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        // Finish what was accepted (so that a planned move causes no duplicates), for up to
        // the drain timeout; after a stop, only what is running.
        let deadline = Instant::now() + self.shared.settings.drain_timeout;
        let drained = self
            .shared
            .wait(Some(deadline), |s| {
                s.prefix.unfinished() == 0 || (s.fatal.is_some() && s.sched.running() == 0)
            })
            .await;
        self.shared.lock().draining = true;
        if !drained {
            let state = self.shared.lock();
            warn!(
                unfinished = state.prefix.unfinished(),
                running = state.sched.running(),
                "records unfinished after the drain timeout; abandoned (the next owner gets them again)"
            );
        }
        self.shared.cancel.cancel();
        self.report(cp, true).await
    }

    async fn lease_lost(&mut self) {
        self.shared.cancel.cancel();
    }
}
