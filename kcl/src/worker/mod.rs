//! The [`Worker`]: builds from a [`WorkerBuilder`], then runs the lease coordinator, the shard
//! syncer and one consumer task per held lease until shut down.

mod shutdown;
#[cfg(all(feature = "signal", unix))]
pub mod signal;
pub mod status;
pub(crate) mod streams;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, JoinMap};
use tracing::{error, info, Instrument};

pub use shutdown::ShutdownHandle;
pub use status::{StatusHandle, WorkerStatus};
pub use streams::StreamDiscovery;

use status::{ShardState, StatusBoard, WorkerPhase};

use crate::checkpoint::CheckpointPolicy;
use crate::config::{
    ConfigError, Heartbeat, InitialPosition, PollingConfig, Retrieval, WorkerConfig,
};
use crate::error::Result;
use crate::lease::coordinator::LeaseCoordinator;
use crate::lease::{LeaseKey, LeaseStore, WorkerId};
use crate::processor::consumer::{self, ConsumerEnv, ConsumerExit};
use crate::processor::{ErrorPolicy, ProcessorFactory};
use crate::retrieval::polling::PrefetchBudget;
use crate::retrieval::KinesisApi;
use crate::shard::sync::ShardSyncer;

/// Where a worker reads records and keeps leases: implemented by `Aws` (the AWS SDK clients)
/// and by the testkit's in-memory backends.
pub trait Backends: Send + Sync {
    /// The Kinesis client.
    fn kinesis(&self) -> Arc<dyn KinesisApi>;
    /// The lease store for `table`.
    fn lease_store(&self, table: &str) -> Arc<dyn LeaseStore>;

    /// The lease store for `table`, creating missing tables with `options` (tags,
    /// encryption, …). The default ignores `options` and calls
    /// [`Backends::lease_store`]: stores that create no tables have nothing to apply.
    ///
    /// ```
    /// # #[cfg(feature = "testkit")] {
    /// use kcl::Backends;
    /// let backends = kcl::testkit::MemBackends::new();
    /// let store = backends.lease_store_with("orders-app", &Default::default());
    /// # let _ = store; }
    /// ```
    fn lease_store_with(
        &self,
        table: &str,
        options: &crate::config::LeaseTableOptions,
    ) -> Arc<dyn LeaseStore> {
        let _ = options;
        self.lease_store(table)
    }
}

/// Consumes one Kinesis stream as a member of a fleet sharing a lease table.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kcl::Error> {
/// use kcl::testkit::{MemBackends, MemKinesis};
/// use kcl::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor, Worker};
///
/// struct Count(usize);
/// #[async_trait]
/// impl RecordProcessor for Count {
///     async fn process_records(&mut self, b: &RecordBatch, cp: &mut Checkpointer)
///         -> Result<(), ProcessorError> {
///         self.0 += b.len();
///         cp.checkpoint().await.map_err(ProcessorError::retryable)
///     }
/// }
///
/// let backends = MemBackends::new();
/// backends.kinesis().create_stream("orders", 2);
/// let worker = Worker::builder()
///     .application_name("orders-app")
///     .stream("orders")
///     .backends(backends.clone())
///     .processor(|| Count(0))
///     .build()?;
/// let stop = worker.shutdown_handle();
/// let run = tokio::spawn(worker.run());
/// stop.shutdown(); // graceful: processors checkpoint, leases are released
/// run.await.expect("no panic")?;
/// # Ok(())
/// # }
/// ```
#[must_use = "a worker does nothing until `run()` is awaited"]
pub struct Worker {
    config: Arc<WorkerConfig>,
    kinesis: Arc<dyn KinesisApi>,
    store: Arc<dyn LeaseStore>,
    factory: Arc<dyn ProcessorFactory>,
    error_policy: ErrorPolicy,
    shutdown: CancellationToken,
    status: Arc<StatusBoard>,
    /// Multi-stream mode: the callback naming the streams, asked periodically.
    discovery: Option<StreamDiscovery>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.config)
            .field("kinesis", &self.kinesis)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Starts building a worker.
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder::default()
    }

    /// The configuration in force.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// A handle that stops this worker gracefully (see [`ShutdownHandle`]).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle::new(self.shutdown.clone())
    }

    /// A handle that reads this worker's status (held shards, their state, checkpoints, lag,
    /// errors) at any time, from any task: for health checks (see [`status`]).
    pub fn status_handle(&self) -> StatusHandle {
        StatusHandle::new(self.status.clone())
    }

    /// This worker's status now (before `run()`: starting, no shards).
    pub fn status(&self) -> WorkerStatus {
        self.status_handle().status()
    }

    /// Runs until `signal` completes, then shuts down gracefully.
    ///
    /// # Errors
    /// As [`Worker::run`].
    pub async fn run_until(self, signal: impl Future<Output = ()> + Send) -> Result<()> {
        let token = self.shutdown.clone();
        let run = self.run();
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => r,
            _ = signal => {
                token.cancel();
                run.await
            }
        }
    }

    /// Runs the worker until it is shut down through its [`ShutdownHandle`].
    ///
    /// # Errors
    /// Fails if the lease table cannot be created or reached at start, or the stream cannot
    /// be listed at start (after retries). Failures later on are retried and logged. After a
    /// graceful shutdown that did not finish within `shutdown_timeout`,
    /// [`crate::Error::Abandoned`] names the shards whose processors were abandoned (a process
    /// exiting on it should exit non-zero: those leases expire instead of moving at once).
    ///
    /// # Cancel safety
    /// Dropping the future abandons held leases without releasing them: they expire after
    /// `lease_duration`. Prefer the shutdown handle.
    pub async fn run(self) -> Result<()> {
        let span = tracing::info_span!("worker", worker_id = %self.config.worker_id);
        let status = self.status.clone();
        let result = self.run_inner().instrument(span).await;
        status.set_phase(WorkerPhase::Stopped);
        result
    }

    /// The streams to consume now: the configured ones and the discovered ones, named.
    async fn current_streams(&self) -> Result<Vec<crate::stream::StreamIdentifier>> {
        current_streams(&self.config, self.kinesis.as_ref(), self.discovery.as_ref()).await
    }
}

/// The streams to consume now: the configured ones and the discovered ones, named.
async fn current_streams(
    config: &WorkerConfig,
    kinesis: &dyn KinesisApi,
    discovery: Option<&StreamDiscovery>,
) -> Result<Vec<crate::stream::StreamIdentifier>> {
    let mut entries = config.streams.clone();
    if let Some(discover) = discovery {
        let found = discover().await.map_err(|e| crate::Error::Stream {
            stream: "(discovery)".into(),
            reason: crate::error::chain(e.as_ref()),
        })?;
        for entry in found {
            crate::config::check_stream_entry(&entry)?;
            if !entries.contains(&entry) {
                entries.push(entry);
            }
        }
    }
    streams::resolve(kinesis, &entries).await
}

/// Asks the discovery callback for the streams every `stream_discovery_interval`; a failure
/// keeps the streams as they were.
async fn discover_streams(
    config: Arc<WorkerConfig>,
    kinesis: Arc<dyn KinesisApi>,
    discovery: StreamDiscovery,
    tracker: Arc<streams::StreamTracker>,
    sync_now: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(config.stream_discovery_interval) => {}
        }
        match current_streams(&config, kinesis.as_ref(), Some(&discovery)).await {
            Ok(ids) => {
                let now = tokio::time::Instant::now();
                let changes = tracker.set(&ids, now);
                let changed = !changes.added.is_empty() || !changes.removed.is_empty();
                if changed {
                    info!(added = ?changes.added, removed = ?changes.removed, "the streams changed");
                }
                // A sync creates the leases of new streams and deletes those of streams out
                // of the set for long enough.
                if changed
                    || !tracker
                        .former_due(now, config.former_stream_retention)
                        .is_empty()
                {
                    sync_now.notify_one();
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "stream discovery failed; keeping the current streams");
            }
        }
    }
}

impl Worker {
    async fn run_inner(self) -> Result<()> {
        let cfg = self.config.clone();
        let streams = match cfg.is_multi_stream() || self.discovery.is_some() {
            false => {
                info!(stream = %cfg.stream, table = %cfg.table_name, "starting worker");
                None
            }
            true => {
                let tracker = streams::StreamTracker::new(self.shutdown.clone());
                let ids = self.current_streams().await?;
                info!(streams = ?ids, table = %cfg.table_name, "starting multi-stream worker");
                tracker.set(&ids, tokio::time::Instant::now());
                Some(tracker)
            }
        };
        self.store.ensure_table().await?;

        let coordinator = Arc::new(LeaseCoordinator::new(
            self.store.clone(),
            cfg.worker_id.clone(),
            &cfg,
        ));
        coordinator.report_to(self.status.clone());
        if let Some(tracker) = &streams {
            // Leases of streams this worker does not consume (any more, or yet) stay with
            // whoever does.
            let tracker = tracker.clone();
            coordinator.take_only(crate::lease::coordinator::KeyFilter(Arc::new(
                move |key: &LeaseKey| tracker.is_active(key),
            )));
        }
        let sync_now = Arc::new(Notify::new());
        // The first sync must succeed before any lease is taken.
        let syncer = ShardSyncer::new(self.kinesis.clone(), self.store.clone(), cfg.clone())
            .with_metrics(coordinator.metrics().clone())
            .with_streams(streams.clone());
        syncer.sync_at_start(&self.shutdown).await?;
        coordinator.start_liveness(&self.shutdown).await;
        let syncer = syncer.with_liveness(coordinator.liveness());
        let consumer_arn = match &cfg.retrieval {
            Retrieval::FanOut { consumer_name } => Some(
                self.kinesis
                    .register_stream_consumer(&cfg.stream, consumer_name)
                    .await?,
            ),
            _ => None,
        };

        let background = CancellationToken::new();
        let renewer_stop = CancellationToken::new();
        let (acquired_tx, mut acquired_rx) = mpsc::channel(64);
        // Stopped if `run()` is dropped: a cancelled worker must stop renewing its leases.
        let _stop_renewer = renewer_stop.clone().drop_guard();
        let renewer = spawn_renewer(cfg.heartbeat, coordinator.clone(), renewer_stop.clone());
        let taker = AbortOnDropHandle::new(tokio::spawn(
            coordinator
                .clone()
                .run_taker(acquired_tx, background.clone())
                .in_current_span(),
        ));
        // Stopped when `run()` returns (or is dropped): gauges of a stopped worker go idle.
        let _metrics_refresher = AbortOnDropHandle::new(tokio::spawn(
            coordinator
                .metrics()
                .clone()
                .run_refresher(cfg.metrics_refresh_interval),
        ));
        let syncer_task = AbortOnDropHandle::new(tokio::spawn(
            syncer
                .run(sync_now.clone(), background.clone())
                .in_current_span(),
        ));
        let _discovery_task = match (&streams, &self.discovery) {
            (Some(tracker), Some(discovery)) => Some(AbortOnDropHandle::new(tokio::spawn(
                discover_streams(
                    cfg.clone(),
                    self.kinesis.clone(),
                    discovery.clone(),
                    tracker.clone(),
                    sync_now.clone(),
                    background.clone(),
                )
                .in_current_span(),
            ))),
            _ => None,
        };

        let env = ConsumerEnv {
            config: cfg.clone(),
            store: self.store.clone(),
            kinesis: self.kinesis.clone(),
            factory: self.factory.clone(),
            error_policy: self.error_policy.clone(),
            sync_now,
            shutdown: self.shutdown.clone(),
            prefetch: PrefetchBudget::new(cfg.polling.prefetch_bytes),
            reader: match consumer_arn {
                Some(arn) => Arc::new(crate::retrieval::reader::FanOut(
                    crate::retrieval::fanout::StreamConsumer::of(&cfg, &arn),
                )),
                None => Arc::new(crate::retrieval::reader::Polling),
            },
            status: self.status.clone(),
            metrics: streams::StreamMetrics::new(
                coordinator.metrics().clone(),
                streams.is_some(),
                cfg.metrics_level,
                cfg.metrics_refresh_interval,
            ),
        };
        // Each consumer stops with the worker, and in multi-stream mode with its stream.
        let env_for = |key: &LeaseKey| -> ConsumerEnv {
            let mut env = env.clone();
            if let Some(tracker) = &streams {
                env.shutdown = tracker.token(key).unwrap_or_else(|| {
                    // Taken just as its stream left the set: released at once.
                    let gone = CancellationToken::new();
                    gone.cancel();
                    gone
                });
            }
            env
        };
        self.status.set_phase(WorkerPhase::Running);
        let mut consumers: JoinMap<LeaseKey, ConsumerExit> = JoinMap::new();
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                Some(held) = acquired_rx.recv() => {
                    let key = held.key().clone();
                    consumers.spawn(key.clone(), consumer::run(env_for(&key), held).in_current_span());
                }
                Some((key, exit)) = consumers.join_next(), if !consumers.is_empty() => {
                    on_consumer_exit(&coordinator, &self.status, &key, exit);
                }
            }
        }

        // Graceful shutdown: stop taking leases; consumers see the shutdown token, let their
        // processors checkpoint, and release their leases; the renewer keeps them alive until
        // then.
        info!(held = consumers.len(), "shutting down");
        self.status.set_phase(WorkerPhase::ShuttingDown);
        background.cancel();
        let mut taker = taker;
        loop {
            tokio::select! {
                biased;
                _ = &mut taker => break,
                Some(held) = acquired_rx.recv() => {
                    let key = held.key().clone();
                    consumers.spawn(key.clone(), consumer::run(env_for(&key), held).in_current_span());
                }
            }
        }
        while let Ok(held) = acquired_rx.try_recv() {
            let key = held.key().clone();
            consumers.spawn(
                key.clone(),
                consumer::run(env_for(&key), held).in_current_span(),
            );
        }
        let drained = tokio::time::timeout(cfg.shutdown_timeout, async {
            while let Some((key, exit)) = consumers.join_next().await {
                on_consumer_exit(&coordinator, &self.status, &key, exit);
            }
        })
        .await;
        let mut abandoned = Vec::new();
        match drained {
            // Every consumer has released its lease; a handoff completed to this worker but
            // not taken yet would otherwise keep its shard idle until it expires.
            Ok(()) => coordinator.release_unheld().await,
            Err(_) => {
                abandoned = consumers.keys().map(LeaseKey::shard_id).collect();
                abandoned.sort();
                error!(
                    remaining = consumers.len(),
                    "shutdown_timeout passed; abandoning processors (their leases will expire)"
                );
                consumers.abort_all();
            }
        }
        renewer_stop.cancel();
        let _ = renewer.await;
        if drained.is_ok() {
            // Every lease was released: peers may count this worker gone at once.
            coordinator.deregister().await;
        }
        let _ = syncer_task.await;
        if !abandoned.is_empty() {
            return Err(crate::Error::Abandoned { shards: abandoned });
        }
        info!("worker stopped");
        Ok(())
    }
}

/// Starts the renewer where `heartbeat` says; the future completes when it has stopped.
fn spawn_renewer(
    heartbeat: Heartbeat,
    coordinator: Arc<LeaseCoordinator>,
    stop: CancellationToken,
) -> futures::future::BoxFuture<'static, ()> {
    use futures::FutureExt as _;
    let span = tracing::Span::current();
    if heartbeat == Heartbeat::Thread {
        let (done, stopped) = tokio::sync::oneshot::channel::<()>();
        let (c, s, sp) = (coordinator.clone(), stop.clone(), span.clone());
        let spawned = std::thread::Builder::new()
            .name("kcl-heartbeat".into())
            .spawn(move || {
                let _done = done; // `stopped` completes when this thread ends
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(c.run_renewer(s).instrument(sp)),
                    Err(e) => error!(error = %e, "cannot start the heartbeat runtime"),
                }
            });
        match spawned {
            Ok(_) => return stopped.map(|_| ()).boxed(),
            // Not fatal: renew from the caller's runtime instead.
            Err(e) => {
                error!(error = %e, "cannot start the heartbeat thread; renewing on the runtime")
            }
        }
    }
    AbortOnDropHandle::new(tokio::spawn(coordinator.run_renewer(stop).instrument(span)))
        .map(|_| ())
        .boxed()
}

fn on_consumer_exit(
    coordinator: &LeaseCoordinator,
    status: &StatusBoard,
    key: &LeaseKey,
    exit: Result<ConsumerExit, tokio::task::JoinError>,
) {
    let shard = key;
    match exit {
        // The processor cannot go on with this shard: another worker may (its lease was
        // released), this one only after a restart.
        Ok(ConsumerExit::ProcessorFailed) => {
            coordinator.refuse(key);
            status.set_aside(shard, ShardState::Failed, None, None);
        }
        // Infrastructure (IAM, KMS, a vanished consumer): retried here after a quarantine.
        Ok(ConsumerExit::ReadFailed(error)) => {
            let until = coordinator.quarantine(key, &error);
            status.set_aside(shard, ShardState::Quarantined, Some(error), Some(until));
        }
        Ok(_) => coordinator.clear_quarantine(key),
        Err(e) if e.is_panic() => {
            // Processor panics are caught inside the consumer; this is the library's own.
            error!(lease = %key, "shard consumer panicked; this worker will not take the shard again");
            coordinator.refuse(key);
            status.set_aside(
                shard,
                ShardState::Failed,
                Some("the shard consumer panicked".into()),
                None,
            );
        }
        Err(_) => {}
    }
    coordinator.forget(key);
}

/// Builds a [`Worker`]; [`WorkerBuilder::build`] validates every field.
#[must_use]
#[derive(Default)]
pub struct WorkerBuilder {
    application_name: Option<String>,
    stream: Option<String>,
    streams: Option<Vec<String>>,
    discovery: Option<StreamDiscovery>,
    table_name: Option<String>,
    worker_id: Option<String>,
    initial_position: Option<InitialPosition>,
    lease_duration: Option<Duration>,
    renew_interval: Option<Duration>,
    taker_interval: Option<Duration>,
    shard_sync_interval: Option<Duration>,
    parent_poll_interval: Option<Duration>,
    finished_lease_retention: Option<Duration>,
    former_stream_retention: Option<Duration>,
    stream_discovery_interval: Option<Duration>,
    max_leases_per_worker: Option<usize>,
    max_leases_to_steal: Option<usize>,
    polling: Option<PollingConfig>,
    retrieval: Option<Retrieval>,
    shutdown_timeout: Option<Duration>,
    quarantine: Option<Duration>,
    heartbeat: Option<Heartbeat>,
    lease_liveness: Option<crate::config::LeaseLiveness>,
    balance_by_load: Option<bool>,
    checkpoint_policy: Option<CheckpointPolicy>,
    metrics_level: Option<crate::metrics::MetricsLevel>,
    metrics_refresh_interval: Option<Duration>,
    lease_table_options: Option<crate::config::LeaseTableOptions>,
    base: Option<WorkerConfig>,
    error_policy: ErrorPolicy,
    backends: Option<Box<dyn Backends>>,
    kinesis: Option<Arc<dyn KinesisApi>>,
    store: Option<Arc<dyn LeaseStore>>,
    factory: Option<Arc<dyn ProcessorFactory>>,
}

impl fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("application_name", &self.application_name)
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.$name = Some(value);
                self
            }
        )*
    };
}

impl WorkerBuilder {
    setters! {
        /// Where shards without a checkpoint start (default `TrimHorizon`).
        initial_position: InitialPosition,
        /// A lease not renewed for this long may be taken (default 10 s).
        lease_duration: Duration,
        /// How often held leases are renewed (default a third of `lease_duration`).
        renew_interval: Duration,
        /// How often the worker looks for leases to take (default 2 s).
        taker_interval: Duration,
        /// How often shards are listed (default 60 s; shard ends also trigger a sync).
        shard_sync_interval: Duration,
        /// How often a child shard checks whether its parents finished (default 500 ms).
        parent_poll_interval: Duration,
        /// How long finished leases stay in the table once deletable (default 5 min).
        finished_lease_retention: Duration,
        /// Multi-stream mode: how long the leases of a stream that left the set stay in the
        /// table (default 5 min).
        former_stream_retention: Duration,
        /// Multi-stream mode: how often the discovery callback is asked (default 60 s).
        stream_discovery_interval: Duration,
        /// The most leases this worker holds (default unlimited).
        max_leases_per_worker: usize,
        /// The most leases asked from other workers per taker round (default 4).
        max_leases_to_steal: usize,
        /// Polling retrieval settings.
        polling: PollingConfig,
        /// How long a graceful shutdown waits for processors (default 30 s).
        shutdown_timeout: Duration,
        /// How long a shard that could not be read is set aside before this worker tries it
        /// again (default 10 s, doubled per further failure up to 32 ×).
        quarantine: Duration,
        /// Where held leases are renewed (default: a thread of their own; use
        /// [`Heartbeat::Task`] under tokio's paused clock).
        heartbeat: Heartbeat,
        /// How peers tell this worker's leases are alive (default
        /// [`LeaseLiveness::PerWorker`](crate::config::LeaseLiveness::PerWorker): one
        /// heartbeat item per worker; `PerLease` while Java KCL workers may join the fleet).
        lease_liveness: crate::config::LeaseLiveness,
        /// Whether leases also move to even out bytes per second between workers, not only
        /// lease counts (default true; a lease moves by load at most once per 5 minutes).
        balance_by_load: bool,
        /// Who checkpoints, and how often (default [`CheckpointPolicy::Manual`]: the
        /// processor, by itself). With an automatic policy the worker also checkpoints what
        /// was processed before a graceful shutdown or handoff releases the lease.
        checkpoint_policy: CheckpointPolicy,
        /// Which metrics are recorded (default
        /// [`MetricsLevel::Summary`](crate::metrics::MetricsLevel::Summary), per worker and
        /// stream; `Detailed` adds per-shard series). See `docs/metrics.md`.
        ///
        /// ```
        /// use kcl::metrics::MetricsLevel;
        /// let builder = kcl::Worker::builder().metrics_level(MetricsLevel::Detailed);
        /// # let _ = builder;
        /// ```
        metrics_level: crate::metrics::MetricsLevel,
        /// How often gauges are set again and held counters touched (default 5 s; 100 ms to
        /// 60 s): keep an exporter's idle timeout above three of these (see
        /// [`crate::metrics`]).
        ///
        /// ```
        /// use std::time::Duration;
        /// let builder = kcl::Worker::builder().metrics_refresh_interval(Duration::from_secs(10));
        /// # let _ = builder;
        /// ```
        metrics_refresh_interval: Duration,
        /// How the lease and worker tables are created when missing: tags, encryption at
        /// rest, point-in-time recovery, deletion protection (default: none of them, the
        /// AWS-owned key). Applied by the AWS backends; ignored with
        /// [`lease_store`](Self::lease_store), whose store has its own
        /// (`DynamoLeaseStore::table_options`).
        ///
        /// ```
        /// let mut options = kcl::config::LeaseTableOptions::default();
        /// options.deletion_protection = true;
        /// let builder = kcl::Worker::builder().lease_table_options(options);
        /// # let _ = builder;
        /// ```
        lease_table_options: crate::config::LeaseTableOptions,
    }

    /// Every setting at once, e.g. read with `WorkerConfig::from_file` or
    /// `WorkerConfig::from_env` (feature `service`). Setters called on the builder (before or
    /// after) override its fields; `build()` still validates the result. With a base, the
    /// application name and stream are not required from the builder.
    ///
    /// ```
    /// let mut config = kcl::WorkerConfig::new("orders-app", "orders");
    /// config.max_leases_to_steal = 2;
    /// let builder = kcl::Worker::builder().config(config);
    /// # let _ = builder;
    /// ```
    pub fn config(mut self, config: WorkerConfig) -> Self {
        self.base = Some(config);
        self
    }

    /// Required. The application name; also the default lease-table name.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    /// Required. The stream to consume.
    pub fn stream(mut self, name: impl Into<String>) -> Self {
        self.stream = Some(name.into());
        self
    }

    /// Multi-stream mode: consume these streams (names, or `account:name:creationEpoch`
    /// identifiers) with one lease table, instead of [`WorkerBuilder::stream`]. Lease keys are
    /// then `account:name:creationEpoch:shardId`, as the Java KCL's multi-stream mode writes
    /// them (see [`crate::stream`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kcl::Error> {
    /// # use kcl::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor};
    /// # struct P;
    /// # #[async_trait] impl RecordProcessor for P {
    /// #   async fn process_records(&mut self, _: &RecordBatch, _: &mut Checkpointer) -> Result<(), ProcessorError> { Ok(()) }
    /// # }
    /// let backends = kcl::testkit::MemBackends::new();
    /// backends.kinesis().create_stream("orders", 2);
    /// backends.kinesis().create_stream("refunds", 1);
    /// let worker = kcl::Worker::builder()
    ///     .application_name("billing")
    ///     .streams(["orders", "refunds"])
    ///     .backends(backends)
    ///     .processor(|| P)
    ///     .build()?;
    /// # drop(worker); Ok(()) }
    /// ```
    pub fn streams(mut self, streams: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.streams = Some(streams.into_iter().map(Into::into).collect());
        self
    }

    /// Multi-stream mode: `discover` names the streams (besides any given to
    /// [`WorkerBuilder::streams`]); it is asked at start and every
    /// `stream_discovery_interval` (default 60 s). A stream that appears starts at the
    /// initial position; one that disappears stops at once (its processors checkpoint and its
    /// leases are released) and its leases are deleted after `former_stream_retention`. A
    /// failing callback keeps the streams as they were (it fails `run()` only at start).
    ///
    /// ```
    /// # use kcl::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor};
    /// # struct P;
    /// # #[async_trait] impl RecordProcessor for P {
    /// #   async fn process_records(&mut self, _: &RecordBatch, _: &mut Checkpointer) -> Result<(), ProcessorError> { Ok(()) }
    /// # }
    /// let backends = kcl::testkit::MemBackends::new();
    /// let worker = kcl::Worker::builder()
    ///     .application_name("billing")
    ///     .stream_discovery(|| async {
    ///         // e.g. ListStreams, filtered by a naming convention
    ///         Ok(vec!["orders".to_string(), "refunds".to_string()])
    ///     })
    ///     .backends(backends)
    ///     .processor(|| P)
    ///     .build()?;
    /// # drop(worker); Ok::<(), kcl::ConfigError>(())
    /// ```
    pub fn stream_discovery<F, Fut>(mut self, discover: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Vec<String>, crate::error::BoxError>>
            + Send
            + 'static,
    {
        self.discovery = Some(Arc::new(move || Box::pin(discover())));
        self
    }

    /// The lease table (default: the application name).
    pub fn table_name(mut self, name: impl Into<String>) -> Self {
        self.table_name = Some(name.into());
        self
    }

    /// This worker's id (default: host name plus a random suffix). A stable id lets a
    /// restarted worker reclaim its own leases at once instead of waiting for them to expire.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = Some(id.into());
        self
    }

    /// Start at `t` for shards without a checkpoint (shorthand for
    /// `initial_position(InitialPosition::AtTimestamp(t))`).
    pub fn start_at(self, t: SystemTime) -> Self {
        self.initial_position(InitialPosition::AtTimestamp(t))
    }

    /// Read with enhanced fan-out through the stream consumer `consumer_name` (registered if
    /// absent) instead of polling `GetRecords`.
    pub fn fan_out(mut self, consumer_name: impl Into<String>) -> Self {
        self.retrieval = Some(Retrieval::FanOut {
            consumer_name: consumer_name.into(),
        });
        self
    }

    /// What happens when the processor fails (default: retry with backoff).
    pub fn error_policy(mut self, policy: ErrorPolicy) -> Self {
        self.error_policy = policy;
        self
    }

    /// Required (or both `kinesis` and `lease_store`). Where records and leases live.
    pub fn backends(mut self, backends: impl Backends + 'static) -> Self {
        self.backends = Some(Box::new(backends));
        self
    }

    /// The Kinesis client (overrides `backends`).
    pub fn kinesis(mut self, kinesis: Arc<dyn KinesisApi>) -> Self {
        self.kinesis = Some(kinesis);
        self
    }

    /// The lease store (overrides `backends`).
    pub fn lease_store(mut self, store: Arc<dyn LeaseStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Required. Creates one processor per shard lease; any `Fn() -> impl RecordProcessor`.
    pub fn processor(mut self, factory: impl ProcessorFactory) -> Self {
        self.factory = Some(Arc::new(factory));
        self
    }

    /// Validates everything and builds the worker.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first missing or invalid field.
    pub fn build(self) -> Result<Worker, ConfigError> {
        let mut cfg = match self.base {
            Some(mut base) => {
                if let Some(app) = self.application_name {
                    base.application_name = app;
                }
                if let Some(stream) = self.stream {
                    base.stream = stream;
                }
                if let Some(streams) = self.streams {
                    base.streams = streams;
                }
                base
            }
            None => {
                let app = self
                    .application_name
                    .ok_or_else(|| ConfigError::new("application_name", "is required"))?;
                match (self.stream, self.streams) {
                    (Some(_), Some(_)) => {
                        return Err(ConfigError::new(
                            "streams",
                            "give either one stream (`stream`) or several (`streams`)",
                        ))
                    }
                    (Some(stream), None) => WorkerConfig::new(app, stream),
                    (None, Some(streams)) => WorkerConfig::multi_stream(app, streams),
                    (None, None) if self.discovery.is_some() => {
                        WorkerConfig::multi_stream(app, Vec::<String>::new())
                    }
                    (None, None) => return Err(ConfigError::new("stream", "is required")),
                }
            }
        };
        if let Some(t) = self.table_name {
            cfg.table_name = t;
        }
        if let Some(id) = self.worker_id {
            cfg.worker_id = WorkerId::new(id);
        }
        if let Some(v) = self.initial_position {
            cfg.initial_position = v;
        }
        if let Some(v) = self.lease_duration {
            cfg.lease_duration = v;
            cfg.renew_interval = v / 3;
        }
        macro_rules! apply {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { cfg.$f = v; } )* };
        }
        apply!(
            renew_interval,
            taker_interval,
            shard_sync_interval,
            parent_poll_interval,
            finished_lease_retention,
            former_stream_retention,
            stream_discovery_interval,
            max_leases_per_worker,
            max_leases_to_steal,
            polling,
            retrieval,
            shutdown_timeout,
            quarantine,
            heartbeat,
            lease_liveness,
            balance_by_load,
            checkpoint_policy,
            metrics_level,
            metrics_refresh_interval
        );
        if let Some(v) = self.lease_table_options {
            cfg.lease_table = v;
        }
        let multi_stream = cfg.is_multi_stream() || self.discovery.is_some();
        if multi_stream && !cfg.stream.is_empty() && cfg.streams.is_empty() {
            // A discovery callback with a single stream configured: it would be read under a
            // single-stream key and a multi-stream one.
            return Err(ConfigError::new(
                "stream",
                "stream discovery reads several streams: give the fixed ones to `streams`",
            ));
        }
        if multi_stream {
            cfg.stream.clear();
            if matches!(cfg.retrieval, Retrieval::FanOut { .. }) {
                return Err(ConfigError::new(
                    "retrieval",
                    "enhanced fan-out is not supported with several streams yet; use polling",
                ));
            }
        }
        if multi_stream && cfg.streams.is_empty() {
            // Validated as multi-stream; the discovery callback names the streams at start.
            let mut check = cfg.clone();
            check.streams = vec!["placeholder".into()];
            check.validate()?;
        } else {
            cfg.validate()?;
        }
        check_error_policy(&self.error_policy)?;
        let factory = self
            .factory
            .ok_or_else(|| ConfigError::new("processor", "is required"))?;
        let kinesis = match (self.kinesis, &self.backends) {
            (Some(k), _) => k,
            (None, Some(b)) => b.kinesis(),
            (None, None) => return Err(ConfigError::new("backends", "is required (or kinesis)")),
        };
        let store = match (self.store, &self.backends) {
            (Some(s), _) => s,
            (None, Some(b)) => b.lease_store_with(&cfg.table_name, &cfg.lease_table),
            (None, None) => {
                return Err(ConfigError::new("backends", "is required (or lease_store)"))
            }
        };
        Ok(Worker {
            status: StatusBoard::new(cfg.worker_id.clone()),
            config: Arc::new(cfg),
            kinesis,
            store,
            factory,
            error_policy: self.error_policy,
            shutdown: CancellationToken::new(),
            discovery: self.discovery,
        })
    }
}

/// Retry delays must be positive and in order: a zero delay would retry a failing batch in a
/// busy loop.
fn check_error_policy(policy: &ErrorPolicy) -> Result<(), ConfigError> {
    let (min, max) = policy.delays();
    if min.is_zero() {
        return Err(ConfigError::new(
            "error_policy",
            "the first retry delay must be above zero",
        ));
    }
    if min > max {
        return Err(ConfigError::new(
            "error_policy",
            format!("the first retry delay ({min:?}) is above the largest ({max:?})"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_policies_with_bad_delays_are_refused_naming_the_field() {
        let retry = |min: u64, max: u64| ErrorPolicy::Retry {
            min_delay: Duration::from_millis(min),
            max_delay: Duration::from_millis(max),
        };
        assert!(check_error_policy(&ErrorPolicy::default()).is_ok());
        assert!(check_error_policy(&ErrorPolicy::StopShard).is_ok());
        for bad in [retry(0, 10), retry(20, 10)] {
            let e = check_error_policy(&bad).expect_err("refused");
            assert_eq!(e.field(), "error_policy");
        }
        let e = Worker::builder()
            .application_name("app")
            .stream("s")
            .error_policy(retry(0, 0))
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "error_policy");
    }

    fn assert_send_static<T: Send + 'static>(_: &T) {}

    #[test]
    fn missing_fields_are_named() {
        let e = Worker::builder().stream("s").build().unwrap_err();
        assert_eq!(e.field(), "application_name");
        let e = Worker::builder()
            .application_name("app")
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "stream");
        let e = Worker::builder()
            .application_name("app")
            .stream("s")
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "processor");
    }

    #[test]
    fn a_whole_config_is_a_base_still_validated() {
        let mut base = WorkerConfig::new("app", "s");
        base.max_leases_to_steal = 0;
        let e = Worker::builder().config(base.clone()).build().unwrap_err();
        assert_eq!(e.field(), "max_leases_to_steal");
        // A setter overrides the base; the base's names satisfy `build()`.
        let e = Worker::builder()
            .config(base.clone())
            .max_leases_to_steal(2)
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "processor");
        base.lease_table.tags.insert("aws:x".into(), "y".into());
        let e = Worker::builder()
            .max_leases_to_steal(2)
            .config(base)
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "lease_table.tags");
    }

    #[cfg(feature = "testkit")]
    #[test]
    fn run_future_is_send_and_static() {
        let worker = Worker::builder()
            .application_name("app")
            .stream("s")
            .backends(crate::testkit::MemBackends::new())
            .processor(|| crate::testkit::NoopProcessor)
            .build()
            .unwrap();
        let fut = worker.run();
        assert_send_static(&fut);
    }
}
