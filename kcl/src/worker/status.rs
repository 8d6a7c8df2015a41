//! What a running worker is doing, for health checks and dashboards: [`StatusHandle`].
//!
//! Every shard consumer keeps its own entry up to date (its state, last checkpoint, lag, last
//! error, and whether a processor callback is running and since when); a snapshot copies the
//! entries. Updating an entry locks only that entry, so a status request never waits for a
//! batch, and a batch never waits for another shard.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), kcl::Error> {
//! use std::time::Duration;
//! use kcl::testkit::MemBackends;
//! use kcl::worker::status::WorkerPhase;
//! use kcl::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor, Worker};
//!
//! struct Noop;
//! #[async_trait]
//! impl RecordProcessor for Noop {
//!     async fn process_records(&mut self, _: &RecordBatch, _: &mut Checkpointer)
//!         -> Result<(), ProcessorError> { Ok(()) }
//! }
//!
//! let backends = MemBackends::new();
//! backends.kinesis().create_stream("orders", 1);
//! let worker = Worker::builder()
//!     .application_name("orders-app")
//!     .stream("orders")
//!     .backends(backends)
//!     .processor(|| Noop)
//!     .build()?;
//! let status = worker.status_handle();
//! assert_eq!(status.status().phase, WorkerPhase::Starting);
//! let stop = worker.shutdown_handle();
//! let run = tokio::spawn(worker.run());
//! while status.status().shards.is_empty() {
//!     tokio::time::sleep(Duration::from_millis(10)).await;
//! }
//! let now = status.status();
//! assert_eq!(now.phase, WorkerPhase::Running);
//! assert!(now.is_ready(Duration::from_secs(60)));
//! stop.shutdown();
//! run.await.expect("no panic")?;
//! assert_eq!(status.status().phase, WorkerPhase::Stopped);
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::lease::{LeaseKey, WorkerId};
use crate::record::ExtendedSequenceNumber;
use crate::shard::ShardId;

/// Where a shard consumer stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShardState {
    /// Waiting for its parent shards to be finished (after a split or merge).
    WaitingOnParents,
    /// The processor's `initialize` is running (or being retried).
    Initializing,
    /// Reading and processing records.
    Processing,
    /// Stopping: shutdown, a handoff to a peer, the shard's end, or the lease lost; the final
    /// checkpoint and the release follow.
    ShuttingDown,
    /// Given up after a read failure (access denied, KMS, …): this worker takes it again once
    /// the quarantine is over.
    Quarantined,
    /// The processor failed for good on this shard: this worker does not take it again until
    /// it restarts (another worker may).
    Failed,
}

impl ShardState {
    /// A short lower-case name (`waiting-on-parents`, `processing`, …) for logs and JSON.
    ///
    /// ```
    /// use kcl::worker::status::ShardState;
    /// assert_eq!(ShardState::WaitingOnParents.name(), "waiting-on-parents");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Self::WaitingOnParents => "waiting-on-parents",
            Self::Initializing => "initializing",
            Self::Processing => "processing",
            Self::ShuttingDown => "shutting-down",
            Self::Quarantined => "quarantined",
            Self::Failed => "failed",
        }
    }
}

/// One shard this worker holds (or set aside), as last reported by its consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShardStatus {
    /// The shard.
    pub shard_id: ShardId,
    /// Its stream, in multi-stream mode (`account:name:creationEpoch`); `None` for a
    /// single-stream worker.
    pub stream: Option<String>,
    /// Where its consumer stands.
    pub state: ShardState,
    /// Since when it has been in that state.
    pub state_since: SystemTime,
    /// The checkpoint in the lease: as taken, then as last stored by this worker.
    pub checkpoint: Option<ExtendedSequenceNumber>,
    /// When this worker last stored a checkpoint of the shard.
    pub checkpointed_at: Option<SystemTime>,
    /// How far behind the tip of the shard the last batch was read, in milliseconds.
    pub millis_behind_latest: Option<u64>,
    /// Records handed to `process_records` successfully since the lease was taken.
    pub records_processed: u64,
    /// When the processor callback now running started (`None`: none is running).
    pub in_callback_since: Option<SystemTime>,
    /// The last error (processor or read), with when it happened.
    pub last_error: Option<(SystemTime, String)>,
    /// For [`ShardState::Quarantined`]: when the quarantine ends.
    pub quarantined_until: Option<SystemTime>,
}

impl ShardStatus {
    fn new(key: &LeaseKey, checkpoint: Option<ExtendedSequenceNumber>) -> Self {
        Self {
            shard_id: key.shard_id(),
            stream: key.stream().map(|s| s.to_string()),
            state: ShardState::WaitingOnParents,
            state_since: SystemTime::now(),
            checkpoint,
            checkpointed_at: None,
            millis_behind_latest: None,
            records_processed: 0,
            in_callback_since: None,
            last_error: None,
            quarantined_until: None,
        }
    }

    /// True if a processor callback has been running for `after` or longer at `now`.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// # use kcl::worker::status::ShardStatus;
    /// # fn check(s: &ShardStatus) {
    /// let stuck = s.is_stuck(Duration::from_secs(300), SystemTime::now());
    /// # }
    /// ```
    pub fn is_stuck(&self, after: Duration, now: SystemTime) -> bool {
        self.in_callback_since
            .and_then(|since| now.duration_since(since).ok())
            .is_some_and(|running| running >= after)
    }
}

/// Where the worker as a whole stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkerPhase {
    /// Built, or `run()` is creating the lease table and syncing shards.
    Starting,
    /// Taking and processing leases.
    Running,
    /// Shutting down gracefully.
    ShuttingDown,
    /// `run()` returned.
    Stopped,
}

impl WorkerPhase {
    /// A short lower-case name (`starting`, `running`, `shutting-down`, `stopped`).
    ///
    /// ```
    /// assert_eq!(kcl::worker::status::WorkerPhase::ShuttingDown.name(), "shutting-down");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::ShuttingDown => "shutting-down",
            Self::Stopped => "stopped",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Starting,
            1 => Self::Running,
            2 => Self::ShuttingDown,
            _ => Self::Stopped,
        }
    }
}

/// A snapshot of a worker: see [`StatusHandle::status`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStatus {
    /// The worker's id.
    pub worker_id: WorkerId,
    /// Where it stands.
    pub phase: WorkerPhase,
    /// An operator asked it to drain (`kcl drain`): it takes no lease.
    pub draining: bool,
    /// Its shards, by shard id: those it holds, and those it set aside.
    pub shards: Vec<ShardStatus>,
}

impl WorkerStatus {
    /// The shards whose processor callback has been running for `after` or longer.
    pub fn stuck(&self, after: Duration) -> Vec<&ShardStatus> {
        let now = SystemTime::now();
        self.shards
            .iter()
            .filter(|s| s.is_stuck(after, now))
            .collect()
    }

    /// The shards it holds (not those set aside).
    pub fn held(&self) -> impl Iterator<Item = &ShardStatus> {
        self.shards
            .iter()
            .filter(|s| !matches!(s.state, ShardState::Quarantined | ShardState::Failed))
    }

    /// For a liveness probe: the worker has not stopped.
    pub fn is_live(&self) -> bool {
        self.phase != WorkerPhase::Stopped
    }

    /// For a readiness probe: the worker is running (its lease table reachable, its first
    /// shard sync done) and no processor callback has been running for `stuck_after`. A worker
    /// holding no lease is ready: a fleet with more workers than shards has idle ones.
    pub fn is_ready(&self, stuck_after: Duration) -> bool {
        self.phase == WorkerPhase::Running && self.stuck(stuck_after).is_empty()
    }
}

/// Reads a worker's status, from any task or thread, before, during and after `run()`.
/// Cheap to clone. Get one from [`crate::Worker::status_handle`].
#[derive(Clone, Debug)]
pub struct StatusHandle {
    board: Arc<StatusBoard>,
}

impl StatusHandle {
    pub(crate) fn new(board: Arc<StatusBoard>) -> Self {
        Self { board }
    }

    /// A snapshot of the worker now.
    pub fn status(&self) -> WorkerStatus {
        self.board.snapshot()
    }
}

type Entry = Arc<Mutex<ShardStatus>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the worker's tasks report to; read by [`StatusHandle`].
#[derive(Debug)]
pub(crate) struct StatusBoard {
    worker_id: WorkerId,
    phase: AtomicU8,
    draining: AtomicBool,
    shards: Mutex<BTreeMap<LeaseKey, Entry>>,
}

impl StatusBoard {
    pub(crate) fn new(worker_id: WorkerId) -> Arc<Self> {
        Arc::new(Self {
            worker_id,
            phase: AtomicU8::new(0),
            draining: AtomicBool::new(false),
            shards: Mutex::new(BTreeMap::new()),
        })
    }

    pub(crate) fn set_phase(&self, phase: WorkerPhase) {
        let v = match phase {
            WorkerPhase::Starting => 0,
            WorkerPhase::Running => 1,
            WorkerPhase::ShuttingDown => 2,
            WorkerPhase::Stopped => 3,
        };
        self.phase.store(v, Ordering::SeqCst);
    }

    pub(crate) fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::SeqCst);
    }

    fn snapshot(&self) -> WorkerStatus {
        self.expire(SystemTime::now());
        let entries: Vec<Entry> = lock(&self.shards).values().cloned().collect();
        WorkerStatus {
            worker_id: self.worker_id.clone(),
            phase: WorkerPhase::from_u8(self.phase.load(Ordering::SeqCst)),
            draining: self.draining.load(Ordering::SeqCst),
            shards: entries.iter().map(|e| lock(e).clone()).collect(),
        }
    }

    /// A consumer starts on `shard` (replacing what an earlier one left, e.g. a quarantine).
    pub(crate) fn enter(
        self: &Arc<Self>,
        shard: &LeaseKey,
        checkpoint: ExtendedSequenceNumber,
    ) -> ShardReport {
        let entry = Arc::new(Mutex::new(ShardStatus::new(shard, Some(checkpoint))));
        lock(&self.shards).insert(shard.clone(), entry.clone());
        ShardReport {
            board: self.clone(),
            key: shard.clone(),
            entry,
        }
    }

    /// A shard set aside after its consumer ended: shown until `until` (or, `None`, until a
    /// consumer starts on it again).
    pub(crate) fn set_aside(
        &self,
        shard: &LeaseKey,
        state: ShardState,
        error: Option<String>,
        until: Option<SystemTime>,
    ) {
        let mut status = ShardStatus::new(shard, None);
        status.state = state;
        status.last_error = error.map(|e| (SystemTime::now(), e));
        status.quarantined_until = until;
        lock(&self.shards).insert(shard.clone(), Arc::new(Mutex::new(status)));
    }

    /// Drops set-aside entries whose time is up.
    fn expire(&self, now: SystemTime) {
        lock(&self.shards).retain(|_, e| lock(e).quarantined_until.is_none_or(|t| t > now));
    }
}

/// One consumer's entry: updated as it goes, removed when it ends.
#[derive(Debug)]
pub(crate) struct ShardReport {
    board: Arc<StatusBoard>,
    key: LeaseKey,
    entry: Entry,
}

impl ShardReport {
    fn update(&self, f: impl FnOnce(&mut ShardStatus)) {
        f(&mut lock(&self.entry));
    }

    pub(crate) fn state(&self, state: ShardState) {
        self.update(|s| {
            if s.state != state {
                s.state = state;
                s.state_since = SystemTime::now();
            }
        });
    }

    pub(crate) fn callback_started(&self) {
        self.update(|s| s.in_callback_since = Some(SystemTime::now()));
    }

    pub(crate) fn callback_ended(&self, records: u64) {
        self.update(|s| {
            s.in_callback_since = None;
            s.records_processed += records;
        });
    }

    pub(crate) fn lag(&self, millis: u64) {
        self.update(|s| s.millis_behind_latest = Some(millis));
    }

    pub(crate) fn error(&self, error: String) {
        self.update(|s| s.last_error = Some((SystemTime::now(), error)));
    }

    /// A handle on the same entry, for the checkpointer's observer.
    pub(crate) fn observer(&self) -> impl Fn(&ExtendedSequenceNumber) + Send + Sync + 'static {
        let entry = self.entry.clone();
        move |at| {
            let mut s = lock(&entry);
            s.checkpoint = Some(at.clone());
            s.checkpointed_at = Some(SystemTime::now());
        }
    }
}

impl Drop for ShardReport {
    fn drop(&mut self) {
        let mut shards = lock(&self.board.shards);
        // Only our own entry: a newer consumer of the shard may have replaced it.
        if shards
            .get(&self.key)
            .is_some_and(|e| Arc::ptr_eq(e, &self.entry))
        {
            shards.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_lives_as_long_as_its_consumer_and_a_newer_one_is_never_removed_by_it() {
        let board = StatusBoard::new(WorkerId::new("w"));
        let shard = LeaseKey::new("shardId-1");
        let first = board.enter(&shard, ExtendedSequenceNumber::TrimHorizon);
        first.state(ShardState::Processing);
        assert_eq!(board.snapshot().shards[0].state, ShardState::Processing);
        // Taken again (a handoff back) before the first consumer's report was dropped.
        let second = board.enter(&shard, ExtendedSequenceNumber::TrimHorizon);
        drop(first);
        assert_eq!(board.snapshot().shards.len(), 1);
        assert_eq!(
            board.snapshot().shards[0].state,
            ShardState::WaitingOnParents
        );
        drop(second);
        assert!(board.snapshot().shards.is_empty());
    }

    #[test]
    fn a_callback_running_past_the_threshold_is_stuck_and_makes_the_worker_unready() {
        let board = StatusBoard::new(WorkerId::new("w"));
        board.set_phase(WorkerPhase::Running);
        let report = board.enter(&LeaseKey::new("shardId-1"), ExtendedSequenceNumber::Latest);
        report.state(ShardState::Processing);
        // (threshold, callback running for) → stuck
        for (after, running, stuck) in [
            (60, None, false),
            (60, Some(59), false),
            (60, Some(60), true),
            (60, Some(3600), true),
        ] {
            report.update(|s| {
                s.in_callback_since = running.map(|r| SystemTime::now() - Duration::from_secs(r));
            });
            let status = board.snapshot();
            let after = Duration::from_secs(after);
            assert_eq!(status.stuck(after).len(), usize::from(stuck), "{running:?}");
            assert_eq!(status.is_ready(after), !stuck, "{running:?}");
        }
        report.callback_ended(5);
        assert_eq!(board.snapshot().shards[0].records_processed, 5);
        board.set_phase(WorkerPhase::ShuttingDown);
        assert!(!board.snapshot().is_ready(Duration::from_secs(60)));
        assert!(board.snapshot().is_live());
        board.set_phase(WorkerPhase::Stopped);
        assert!(!board.snapshot().is_live());
    }

    #[test]
    fn a_set_aside_shard_is_shown_until_its_time_is_up() {
        let board = StatusBoard::new(WorkerId::new("w"));
        let now = SystemTime::now();
        let shard = LeaseKey::new("shardId-1");
        board.set_aside(
            &shard,
            ShardState::Quarantined,
            Some("AccessDenied".into()),
            Some(now + Duration::from_secs(10)),
        );
        board.set_aside(&LeaseKey::new("shardId-2"), ShardState::Failed, None, None);
        let status = board.snapshot();
        assert_eq!(status.shards.len(), 2);
        assert_eq!(status.held().count(), 0);
        board.expire(now + Duration::from_secs(10));
        let left = board.snapshot();
        assert_eq!(left.shards.len(), 1);
        assert_eq!(left.shards[0].state, ShardState::Failed);
    }
}
