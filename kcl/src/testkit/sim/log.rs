//! The event log of one simulation run, and its hash.
//!
//! Everything that happens in a run — puts, reshards, faults, crashes, every lease write that
//! reached the table, every batch a processor saw — is appended here with its virtual time, in
//! the one order the single-threaded runtime produced it. The invariant checks
//! ([`super::check`]) read the log after the run; its FNV-1a hash tells two runs of one seed
//! apart (`KCL_SIM_CHECK`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::lease::{Lease, LeaseKey, WorkerId};
use crate::record::{ExtendedSequenceNumber, SequenceNumber};
use crate::shard::ShardId;

/// One incarnation of a worker: a `run()` of one worker id (a restart is a new incarnation).
pub type Inc = u32;

/// What a lease-table write did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied: the lease as it is after the write.
    Applied(LeaseView),
    /// Refused (condition failed, or the item existed for a create).
    Refused,
    /// The lease was deleted.
    Deleted,
}

/// A lease-table write, as seen by the simulated network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    /// `create_if_absent` (applied only if it created the item).
    Create,
    /// `renew`.
    Renew,
    /// `take`.
    Take,
    /// `checkpoint`.
    Checkpoint,
    /// `release`.
    Release,
    /// `delete`.
    Delete,
    /// `request_handoff`.
    RequestHandoff,
    /// `complete_handoff`.
    CompleteHandoff,
    /// `withdraw_handoff` (by the worker that asked: the lease is the old owner's again).
    WithdrawHandoff,
}

/// The lease as it is after an applied write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    /// `leaseOwner`.
    pub owner: Option<WorkerId>,
    /// `leaseCounter`.
    pub counter: u64,
    /// `checkpoint`.
    pub checkpoint: ExtendedSequenceNumber,
    /// `checkpointOwner`.
    pub checkpoint_owner: Option<WorkerId>,
}

impl From<&Lease> for LeaseView {
    fn from(l: &Lease) -> Self {
        Self {
            owner: l.owner.clone(),
            counter: l.counter.0,
            checkpoint: l.checkpoint.clone(),
            checkpoint_owner: l.checkpoint_owner.clone(),
        }
    }
}

/// How one `process_records` call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchOutcome {
    /// It returned `Ok`.
    Ok,
    /// It returned an error (`fatal`: not retryable).
    Failed {
        /// True for a fatal (not retryable) error.
        fatal: bool,
    },
    /// It panicked.
    Panicked,
    /// It never returned: its worker crashed, or the run ended.
    Aborted,
}

impl BatchOutcome {
    /// True if the batch counts as processed: `process_records` returned `Ok`.
    pub fn is_ok(self) -> bool {
        matches!(self, Self::Ok)
    }
}

/// How an incarnation's `run()` ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It returned `Ok`.
    Ok,
    /// It returned an error.
    Error(String),
    /// It panicked.
    Panic,
    /// It was cancelled (aborted).
    Cancelled,
}

/// What a processor callback reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Callback {
    /// `initialize`, with the checkpoint processing resumes from.
    Initialize(ExtendedSequenceNumber),
    /// `shard_ended` (after its `SHARD_END` checkpoint, `true` if it was stored).
    ShardEnded(bool),
    /// `shutdown_requested` (graceful stop or handoff).
    ShutdownRequested,
    /// `lease_lost`.
    LeaseLost,
    /// A checkpoint returned `CheckpointError::LeaseLost`: the processor was told the lease
    /// is lost (in any callback).
    CheckpointLeaseLost,
}

/// One record of a delivered batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// The producer's index of the record (its payload).
    pub idx: u64,
    /// The record's position.
    pub pos: ExtendedSequenceNumber,
}

/// Something that happened in a run.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A phase of the run began (`chaos`, `settle`, `balance`, `shutdown`).
    Phase(&'static str),
    /// A worker incarnation started.
    Start {
        /// The fleet slot (a machine).
        slot: usize,
        /// The incarnation.
        inc: Inc,
        /// Its worker id.
        worker: WorkerId,
    },
    /// The incarnation was killed: its `run()` task aborted, its network cut.
    Crash {
        /// The incarnation.
        inc: Inc,
    },
    /// A graceful shutdown was asked for.
    Stop {
        /// The incarnation.
        inc: Inc,
    },
    /// The incarnation's `run()` returned (or panicked).
    Exited {
        /// The incarnation.
        inc: Inc,
        /// How.
        outcome: Exit,
    },
    /// A fault on a slot's network changed.
    Fault {
        /// The slot.
        slot: usize,
        /// What changed.
        what: String,
    },
    /// A record was put.
    Put {
        /// The producer's index (also the payload).
        idx: u64,
        /// The partition key.
        key: u32,
        /// Where it went.
        shard: ShardId,
        /// Its sequence number.
        seq: SequenceNumber,
    },
    /// The stream was resharded.
    Reshard(String),
    /// A batch was handed to a processor.
    Batch {
        /// Batch id (order of delivery).
        id: u64,
        /// The incarnation whose processor got it.
        inc: Inc,
        /// The shard.
        shard: ShardId,
        /// The records.
        records: Vec<Delivered>,
    },
    /// `process_records` returned (or panicked, or was dropped).
    BatchDone {
        /// Batch id.
        id: u64,
        /// How it ended.
        outcome: BatchOutcome,
    },
    /// The error policy handed a failed batch to the dead-letter handler (the worker moves
    /// on: the batch counts as processed).
    DeadLetter {
        /// Batch id (the last batch delivered to that processor).
        id: u64,
    },
    /// `OrderedParallel` runs (seeds drawn with the adapter): the handler started record `idx`
    /// (an attempt).
    RecordStart {
        /// The incarnation.
        inc: Inc,
        /// The shard.
        shard: ShardId,
        /// The producer's index of the record.
        idx: u64,
    },
    /// The handler's attempt at record `idx` ended: `ok` completes it.
    RecordEnd {
        /// The incarnation.
        inc: Inc,
        /// The shard.
        shard: ShardId,
        /// The producer's index of the record.
        idx: u64,
        /// The attempt succeeded.
        ok: bool,
    },
    /// A processor callback other than `process_records`.
    Callback {
        /// The incarnation.
        inc: Inc,
        /// The shard.
        shard: ShardId,
        /// Which.
        what: Callback,
    },
    /// A lease write reached the table.
    Write {
        /// The incarnation that sent it.
        inc: Inc,
        /// The operation.
        op: Op,
        /// The lease.
        key: LeaseKey,
        /// What the write did.
        outcome: Outcome,
        /// True if the write was applied but the caller was told it failed.
        response_lost: bool,
        /// For a checkpoint: the batch whose `process_records` was running on that
        /// incarnation's processor of that shard when it was written (`None`: written from
        /// another callback, e.g. `shutdown_requested`).
        batch: Option<u64>,
        /// When the caller made the call (a holder's lease is valid for `lease_duration` from
        /// the start of its last write it knows was applied).
        sent: Duration,
    },
    /// The answer of an applied lease write reached its caller, which then counts the lease
    /// valid for `lease_duration` from when it sent the write.
    Acked {
        /// The incarnation.
        inc: Inc,
        /// The lease.
        key: LeaseKey,
        /// When the write was sent.
        sent: Duration,
    },
    /// A heartbeat's answer reached its worker (per-worker liveness), which then counts every
    /// lease it holds valid for `lease_duration` from when it sent the heartbeat.
    Beat {
        /// The incarnation.
        inc: Inc,
        /// When the heartbeat was sent.
        sent: Duration,
    },
    /// A handoff notice for `key` was added to its owner's worker item (applied by the table,
    /// whether or not the answer reached the requester): the owner's next heartbeat answer
    /// makes it freeze the lease until it resolved the request.
    Notice {
        /// The requester.
        inc: Inc,
        /// The lease asked for.
        key: LeaseKey,
    },
    /// A dead incarnation's task tried to reach a backend (it is held forever).
    Zombie {
        /// The incarnation.
        inc: Inc,
        /// The call.
        op: &'static str,
    },
}

/// One log entry: when, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Virtual time since the run began.
    pub at: Duration,
    /// What happened.
    pub event: Event,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>10.3}s {:?}", self.at.as_secs_f64(), self.event)
    }
}

/// What is known about an incarnation.
#[derive(Clone, Debug)]
pub struct IncInfo {
    /// The slot it ran on.
    pub slot: usize,
    /// Its worker id.
    pub worker: WorkerId,
    /// When it was killed, if it was.
    pub crashed_at: Option<Duration>,
}

/// FNV-1a, 64 bits: stable across runs, platforms and Rust versions (unlike `DefaultHasher`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fnv(pub(crate) u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl fmt::Write for Fnv {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        Ok(())
    }
}

#[derive(Debug)]
struct State {
    epoch: Instant,
    entries: Vec<Entry>,
    hash: Fnv,
    incs: Vec<IncInfo>,
    next_batch: u64,
    /// Batches not yet done: id → (incarnation, shard).
    open: BTreeMap<u64, (Inc, ShardId)>,
    /// The last batch delivered to each processor (incarnation, shard).
    last: BTreeMap<(Inc, ShardId), u64>,
    /// Records delivered at least once.
    delivered: BTreeSet<u64>,
    /// Backend calls per operation (not part of the log: they only measure the load).
    calls: BTreeMap<&'static str, usize>,
    /// Faults that hit a call, by kind (not part of the log: evidence that chaos happened).
    injected: BTreeMap<&'static str, usize>,
}

/// The shared, append-only log of a run. Cheap to clone; never locked across `.await`.
#[derive(Clone, Debug)]
pub struct Recorder {
    state: Arc<Mutex<State>>,
}

impl Recorder {
    pub(crate) fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                epoch: Instant::now(),
                entries: Vec::new(),
                hash: Fnv::default(),
                incs: Vec::new(),
                next_batch: 0,
                open: BTreeMap::new(),
                last: BTreeMap::new(),
                delivered: BTreeSet::new(),
                calls: BTreeMap::new(),
                injected: BTreeMap::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Virtual time since the run began.
    pub fn now(&self) -> Duration {
        self.lock().epoch.elapsed()
    }

    /// Appends an event.
    pub fn push(&self, event: Event) {
        let mut st = self.lock();
        let at = st.epoch.elapsed();
        push_locked(&mut st, at, event);
    }

    /// Registers a new incarnation; returns its number.
    pub(crate) fn new_inc(&self, slot: usize, worker: WorkerId) -> Inc {
        let mut st = self.lock();
        let inc = Inc::try_from(st.incs.len()).unwrap_or(Inc::MAX);
        st.incs.push(IncInfo {
            slot,
            worker: worker.clone(),
            crashed_at: None,
        });
        let at = st.epoch.elapsed();
        push_locked(&mut st, at, Event::Start { slot, inc, worker });
        inc
    }

    /// Records a crash: batches in flight end now (their futures are dropped).
    pub(crate) fn crash(&self, inc: Inc) {
        let mut st = self.lock();
        let at = st.epoch.elapsed();
        if let Some(i) = st.incs.get_mut(inc as usize) {
            i.crashed_at = Some(at);
        }
        push_locked(&mut st, at, Event::Crash { inc });
        let open: Vec<u64> = st
            .open
            .iter()
            .filter(|(_, (i, _))| *i == inc)
            .map(|(id, _)| *id)
            .collect();
        for id in open {
            st.open.remove(&id);
            push_locked(
                &mut st,
                at,
                Event::BatchDone {
                    id,
                    outcome: BatchOutcome::Aborted,
                },
            );
        }
    }

    /// Records a delivered batch; returns its id.
    pub(crate) fn batch(&self, inc: Inc, shard: ShardId, records: Vec<Delivered>) -> u64 {
        let mut st = self.lock();
        let id = st.next_batch;
        st.next_batch += 1;
        st.open.insert(id, (inc, shard.clone()));
        st.last.insert((inc, shard.clone()), id);
        st.delivered.extend(records.iter().map(|r| r.idx));
        let at = st.epoch.elapsed();
        push_locked(
            &mut st,
            at,
            Event::Batch {
                id,
                inc,
                shard,
                records,
            },
        );
        id
    }

    /// Records the end of `process_records` for batch `id` (ignored once the batch was closed
    /// by a crash).
    pub(crate) fn batch_done(&self, id: u64, outcome: BatchOutcome) {
        let mut st = self.lock();
        if st.open.remove(&id).is_some() {
            let at = st.epoch.elapsed();
            push_locked(&mut st, at, Event::BatchDone { id, outcome });
        }
    }

    /// The batch whose `process_records` is running on `inc`'s processor of `shard`, if any.
    pub(crate) fn running_batch(&self, inc: Inc, shard: &ShardId) -> Option<u64> {
        let st = self.lock();
        let id = *st.last.get(&(inc, shard.clone()))?;
        st.open.contains_key(&id).then_some(id)
    }

    /// Records that the error policy handed `inc`'s last batch of `shard` to the dead-letter
    /// handler.
    pub(crate) fn dead_letter(&self, inc: Inc, shard: &ShardId) {
        let mut st = self.lock();
        if let Some(&id) = st.last.get(&(inc, shard.clone())) {
            let at = st.epoch.elapsed();
            push_locked(&mut st, at, Event::DeadLetter { id });
        }
    }

    /// Closes the batches still open at the end of the run.
    pub(crate) fn close_open_batches(&self) -> usize {
        let mut st = self.lock();
        let at = st.epoch.elapsed();
        let open: Vec<u64> = st.open.keys().copied().collect();
        st.open.clear();
        for &id in &open {
            push_locked(
                &mut st,
                at,
                Event::BatchDone {
                    id,
                    outcome: BatchOutcome::Aborted,
                },
            );
        }
        open.len()
    }

    /// Counts a backend call.
    pub(crate) fn count_call(&self, op: &'static str) {
        *self.lock().calls.entry(op).or_default() += 1;
    }

    /// Backend calls per operation so far.
    pub fn calls(&self) -> BTreeMap<&'static str, usize> {
        self.lock().calls.clone()
    }

    /// Counts a fault that hit a call (a throttle, a partition, a broken subscription).
    pub(crate) fn count_injected(&self, kind: &'static str) {
        *self.lock().injected.entry(kind).or_default() += 1;
    }

    /// Faults that hit calls so far, by kind.
    pub fn injected(&self) -> BTreeMap<&'static str, usize> {
        self.lock().injected.clone()
    }

    /// How many distinct records were delivered so far.
    pub fn distinct_delivered(&self) -> usize {
        self.lock().delivered.len()
    }

    /// The entries so far.
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().entries.clone()
    }

    /// The incarnations so far.
    pub fn incarnations(&self) -> Vec<IncInfo> {
        self.lock().incs.clone()
    }

    /// The hash of the log so far.
    pub fn hash(&self) -> u64 {
        self.lock().hash.0
    }
}

fn push_locked(st: &mut State, at: Duration, event: Event) {
    let entry = Entry { at, event };
    // Times are hashed in whole microseconds: the virtual clock is exact.
    let _ = write!(st.hash, "{}|{:?};", at.as_micros(), entry.event);
    st.entries.push(entry);
}
