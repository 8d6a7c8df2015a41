//! The driver of one run: starts, stops and crashes workers, runs the agenda of the chaos
//! phase (puts, faults, reshards, scripted verbs: see [`super::chaos`]), then lets the fleet
//! settle, waits for balance, shuts it down and checks the log.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::check::{self, imbalance, still_owned, Invariant, Violation};
use super::log::{self, BatchOutcome, Event, Exit, Inc, Recorder};
use super::net::{Link, LinkFaults, Net, SimKinesis, SimLeaseStore};
use super::processor::{OnFailure, SimFactory};
use super::report::{SimReport, Stats};
use super::scenario::Sim;
use super::{APP, CONSUMER, STREAM};
use crate::config::PollingConfig;
use crate::lease::WorkerId;
use crate::processor::ErrorPolicy;
use crate::retrieval::KinesisApi;
use crate::shard::ShardId;
use crate::testkit::{MemKinesis, MemLeaseStore};
use crate::worker::{ShutdownHandle, Worker};

/// Salt of the random stream of the processor-failure / handoff chaos (independent of the
/// main stream, so that runs without it draw exactly as before it existed).
const EXTRA_SALT: u64 = 0x4558_5452_4100_0000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Heal {
    Partition,
    Throttle,
    Latency,
    ResponseLoss,
    Kinesis,
    Processor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Action {
    Produce,
    /// The main chaos stream (crash … reshard).
    Chaos,
    /// The processor-failure / handoff stream.
    Extra,
    Start(usize),
    Heal(usize, Heal),
    Script(usize),
    /// What follows a processor failure on a slot.
    Follow(usize),
    /// An operator cancels the drain of a slot's worker.
    Undrain(usize),
}

/// Sets its flag when dropped (with the future that owns it).
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

pub(crate) struct Running {
    pub(crate) inc: Inc,
    task: JoinHandle<crate::Result<()>>,
    stop: ShutdownHandle,
    dead: Arc<AtomicBool>,
    pub(crate) stopping: bool,
    /// A processor failed so that the worker refuses its shard until restarted.
    tainted: Arc<AtomicBool>,
}

pub(crate) struct Slot {
    base: String,
    pub(crate) id: WorkerId,
    restarts: u32,
    rng: ChaCha8Rng,
    pub(crate) link: Arc<Mutex<Link>>,
    pub(crate) run: Option<Running>,
    /// Kept down by a scripted `Crash` / `Stop` until a scripted `Start`.
    pub(crate) scripted_down: bool,
    /// Runs as a Java KCL worker would: renews every lease, keeps and reads no worker item.
    /// Its first start only: a rolling migration replaces a stopped Java worker by one of
    /// ours.
    pub(crate) java: bool,
}

pub(crate) struct Driver {
    pub(crate) sim: Sim,
    pub(crate) rng: ChaCha8Rng,
    /// Draws of the processor-failure / handoff chaos.
    pub(crate) extra: ChaCha8Rng,
    producer: ChaCha8Rng,
    pub(crate) rec: Recorder,
    pub(crate) kinesis: MemKinesis,
    pub(crate) leases: MemLeaseStore,
    pub(crate) slots: Vec<Slot>,
    agenda: BTreeMap<(Duration, u64), Action>,
    seq: u64,
    produced: u64,
    pub(crate) stats: Stats,
    violations: Vec<Violation>,
}

impl Driver {
    pub(crate) fn new(sim: Sim) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(sim.seed);
        let extra = ChaCha8Rng::seed_from_u64(sim.seed ^ EXTRA_SALT);
        let producer = ChaCha8Rng::from_rng(&mut rng);
        let slots = (0..sim.workers)
            .map(|i| {
                let mut slot_rng = ChaCha8Rng::from_rng(&mut rng);
                let link = Link::new(ChaCha8Rng::from_rng(&mut slot_rng));
                Slot {
                    base: format!("w{i}"),
                    id: WorkerId::new(format!("w{i}")),
                    restarts: 0,
                    rng: slot_rng,
                    link,
                    run: None,
                    scripted_down: false,
                    java: i < sim.java_workers,
                }
            })
            .collect();
        Self {
            sim,
            rng,
            extra,
            producer,
            rec: Recorder::new(),
            kinesis: MemKinesis::new(),
            leases: MemLeaseStore::new(),
            slots,
            agenda: BTreeMap::new(),
            seq: 0,
            produced: 0,
            stats: Stats::default(),
            violations: Vec::new(),
        }
    }

    pub(crate) fn schedule(&mut self, after: Duration, action: Action) {
        let at = self.rec.now() + after;
        self.seq += 1;
        self.agenda.insert((at, self.seq), action);
    }

    pub(crate) async fn run(mut self) -> SimReport {
        let started = Instant::now();
        self.kinesis.create_stream(STREAM, self.sim.shards);
        self.rec.push(Event::Phase("chaos"));
        // With Java workers (a rolling migration), ours join once the Java workers hold the
        // leases.
        let ours_after = if self.sim.java_workers > 0 {
            self.sim.timing.lease_duration + self.sim.timing.taker_interval * 2
        } else {
            Duration::ZERO
        };
        for i in 0..self.slots.len() {
            let within = u64::try_from(self.sim.start_within.as_millis()).unwrap_or(u64::MAX);
            let d = self.millis(0, within);
            let d = if self.slots[i].java {
                d
            } else {
                d + ours_after
            };
            self.schedule(d, Action::Start(i));
        }
        if self.sim.records > 0 {
            self.schedule(Duration::ZERO, Action::Produce);
        }
        if self.sim.faults.events_per_minute > 0.0 {
            let d = self.chaos_gap();
            self.schedule(d, Action::Chaos);
        }
        for k in 0..self.sim.script.len() {
            let at = self.sim.script[k].0;
            self.schedule(at, Action::Script(k));
        }
        if self.sim.faults.extra_per_minute() > 0.0 {
            let d = self.extra_gap();
            self.schedule(d, Action::Extra);
        }

        // Chaos: run the agenda until the chaos phase is over and every record is put.
        while let Some((&(at, seq), &action)) = self.agenda.iter().next() {
            if at > self.sim.duration && self.produced >= self.sim.records {
                break;
            }
            self.agenda.remove(&(at, seq));
            tokio::time::sleep_until(started + at).await;
            self.reap(true);
            self.act(action).await;
        }
        self.agenda.clear();

        self.settle().await;
        self.balance().await;
        self.shutdown().await;
        self.finish(started).await
    }

    async fn act(&mut self, action: Action) {
        match action {
            Action::Produce => self.produce(),
            Action::Chaos => {
                self.chaos().await;
                let d = self.chaos_gap();
                if self.rec.now() + d <= self.sim.duration {
                    self.schedule(d, Action::Chaos);
                }
            }
            Action::Extra => {
                self.chaos_extra().await;
                let d = self.extra_gap();
                if self.rec.now() + d <= self.sim.duration {
                    self.schedule(d, Action::Extra);
                }
            }
            Action::Start(i) => match &self.slots[i].run {
                Some(r) if r.stopping => self.schedule(Duration::from_secs(1), Action::Start(i)),
                Some(_) => {}
                None if self.slots[i].scripted_down => {}
                None => self.start(i, None),
            },
            Action::Heal(i, what) => self.heal(i, what),
            Action::Script(k) => {
                let verb = self.sim.script[k].1.clone();
                self.verb(verb);
            }
            Action::Follow(i) => self.follow(i),
            Action::Undrain(i) => self.undrain(i).await,
        }
    }

    fn produce(&mut self) {
        let n = self
            .producer
            .random_range(1..=8u64)
            .min(self.sim.records - self.produced);
        for _ in 0..n {
            let idx = self.produced;
            self.produced += 1;
            let key = self.producer.random_range(0..self.sim.keys);
            let (shard, seq) = self
                .kinesis
                .put(STREAM, &format!("key-{key}"), idx.to_string());
            self.rec.push(Event::Put {
                idx,
                key,
                shard,
                seq,
            });
        }
        if self.produced < self.sim.records {
            // Spread the puts over 80% of the chaos phase (4.5 records per put on average).
            let puts = (self.sim.records as f64 / 4.5).max(1.0);
            let mean = self.sim.duration.as_secs_f64() * 0.8 / puts;
            let d = Duration::from_secs_f64(self.producer.random_range(0.0..=2.0 * mean));
            self.schedule(d, Action::Produce);
        }
    }

    /// Asks slot `i` to stop gracefully.
    pub(crate) fn stop(&mut self, i: usize) {
        if let Some(r) = self.slots[i].run.as_mut() {
            if !r.stopping {
                r.stopping = true;
                r.stop.shutdown();
                self.rec.push(Event::Stop { inc: r.inc });
            }
        }
    }

    /// Starts slot `i`. `fresh`: `Some(true)` takes a fresh worker id, `Some(false)` keeps
    /// it, `None` draws (chaos restarts).
    pub(crate) fn start(&mut self, i: usize, fresh: Option<bool>) {
        let fresh = match fresh {
            Some(f) => f,
            None => {
                let p = self.sim.faults.fresh_id;
                let slot = &mut self.slots[i];
                slot.restarts > 0 && p > 0.0 && slot.rng.random_bool(p.min(1.0))
            }
        };
        let slot = &mut self.slots[i];
        if fresh {
            slot.id = WorkerId::new(format!("{}-{}", slot.base, slot.restarts));
            self.stats.fresh_ids += 1;
        }
        let java = std::mem::take(&mut slot.java) && slot.restarts == 0;
        slot.restarts += 1;
        self.stats.starts += 1;
        let inc = self.rec.new_inc(i, slot.id.clone());
        let dead = Arc::new(AtomicBool::new(false));
        let run_dropped = Arc::new(AtomicBool::new(false));
        let tainted = Arc::new(AtomicBool::new(false));
        let net = Net {
            link: slot.link.clone(),
            dead: dead.clone(),
            run_dropped: run_dropped.clone(),
            inc,
            rec: self.rec.clone(),
            tainted: tainted.clone(),
        };
        let procs = Arc::new(Mutex::new(ChaCha8Rng::from_rng(&mut slot.rng)));
        let t = &self.sim.timing;
        let polling = PollingConfig {
            max_records: t.max_records,
            idle_interval: t.idle_interval,
            prefetch_batches: t.prefetch_batches,
            ..PollingConfig::default()
        };
        let work = self.sim.work;
        let policy = match work.on_failure {
            OnFailure::Retry => ErrorPolicy::default(),
            OnFailure::StopShard => ErrorPolicy::StopShard,
            OnFailure::DeadLetter => {
                let rec = self.rec.clone();
                ErrorPolicy::handoff(move |batch, _| rec.dead_letter(inc, &batch.shard_id))
            }
        };
        let factory_net = net.clone();
        let mut builder = Worker::builder()
            // Paused clock: the heartbeat must run on this runtime.
            .heartbeat(crate::config::Heartbeat::Task)
            .application_name(APP)
            .stream(STREAM)
            .worker_id(slot.id.as_str())
            .kinesis(Arc::new(SimKinesis {
                inner: self.kinesis.clone(),
                net: net.clone(),
            }))
            .lease_store(Arc::new(SimLeaseStore {
                inner: if java {
                    self.leases.sharing_without_worker_table()
                } else {
                    self.leases.clone()
                },
                net,
            }))
            .lease_liveness(if java {
                crate::config::LeaseLiveness::PerLease
            } else {
                crate::config::LeaseLiveness::PerWorker
            })
            .lease_duration(t.lease_duration)
            .taker_interval(t.taker_interval)
            .shard_sync_interval(t.shard_sync_interval)
            .parent_poll_interval(t.parent_poll_interval)
            .finished_lease_retention(t.finished_lease_retention)
            .max_leases_to_steal(t.max_leases_to_steal)
            .polling(polling)
            .error_policy(policy)
            .checkpoint_policy(match work.automatic {
                Some(n) => crate::checkpoint::CheckpointPolicy::every(n, Duration::from_secs(1)),
                None => crate::checkpoint::CheckpointPolicy::Manual,
            })
            .processor(SimFactory {
                net: factory_net,
                procs,
                work,
                parallel: self.sim.parallel,
            });
        if self.sim.fan_out {
            builder = builder.fan_out(CONSUMER);
        }
        let worker = builder
            .build()
            .expect("the sim's worker configuration is valid");
        let stop = worker.shutdown_handle();
        let task = tokio::spawn(async move {
            let _dropped = SetOnDrop(run_dropped);
            worker.run().await
        });
        slot.run = Some(Running {
            inc,
            task,
            stop,
            dead,
            stopping: false,
            tainted,
        });
    }

    /// Collects workers whose `run()` returned; during chaos they are restarted later (by a
    /// supervisor, as in production).
    fn reap(&mut self, chaos: bool) {
        for i in 0..self.slots.len() {
            let finished = self.slots[i]
                .run
                .as_ref()
                .is_some_and(|r| r.task.is_finished());
            if !finished {
                continue;
            }
            let Some(r) = self.slots[i].run.take() else {
                continue;
            };
            let outcome = match futures::FutureExt::now_or_never(r.task) {
                Some(Ok(Ok(()))) => Exit::Ok,
                Some(Ok(Err(e))) => {
                    self.stats.worker_errors += 1;
                    Exit::Error(e.to_string())
                }
                Some(Err(e)) if e.is_panic() => Exit::Panic,
                Some(Err(_)) | None => Exit::Cancelled,
            };
            self.rec.push(Event::Exited {
                inc: r.inc,
                outcome,
            });
            if chaos && !r.stopping && !self.slots[i].scripted_down {
                let d = self.millis(500, 5000);
                self.schedule(d, Action::Start(i));
            }
        }
    }

    /// Slots running and not stopping.
    pub(crate) fn running(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].run.as_ref().is_some_and(|r| !r.stopping))
            .collect()
    }

    /// Kills slot `i`'s incarnation.
    pub(crate) fn crash(&mut self, i: usize) {
        if let Some(r) = self.slots[i].run.take() {
            r.dead.store(true, Ordering::SeqCst);
            r.task.abort();
            self.rec.crash(r.inc);
            self.stats.crashes += 1;
        }
    }

    /// Faults stop, every worker runs; waits until every record was delivered.
    async fn settle(&mut self) {
        self.rec.push(Event::Phase("settle"));
        for i in 0..self.slots.len() {
            // Drains still in force end (their cancellations were on the agenda).
            self.undrain(i).await;
            let clear = {
                let link = self.slots[i].link.lock().unwrap_or_else(|p| p.into_inner());
                link.faults.is_clear()
            };
            if !clear {
                self.set_fault(i, "heal all".to_owned(), |l| *l = LinkFaults::default());
            }
            // A worker refuses a shard whose processor failed fatally or panicked until it
            // restarts: an operator restarts it (gracefully).
            let tainted = self.slots[i]
                .run
                .as_ref()
                .is_some_and(|r| !r.stopping && r.tainted.load(Ordering::SeqCst));
            if tainted {
                self.stop(i);
            }
        }
        // Done when every record was delivered; stuck when nothing new was delivered for a
        // while (a slow fleet with a backlog keeps going).
        let patience = Duration::from_secs(60).max(self.sim.timing.lease_duration * 10);
        let give_up = self.rec.now() + Duration::from_secs(3600);
        let (mut seen, mut progress_at) = (0, self.rec.now());
        loop {
            self.reap(false);
            for i in 0..self.slots.len() {
                if self.slots[i].run.is_none() {
                    self.start(i, Some(false));
                }
            }
            let delivered = self.rec.distinct_delivered();
            let now = self.rec.now();
            if delivered > seen {
                (seen, progress_at) = (delivered, now);
            }
            if delivered as u64 >= self.produced || now > progress_at + patience || now > give_up {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Waits until the fleet is stable for three rounds in a row: balanced, no lease changed
    /// hands, and every active lease renewed since the previous round, or its owner's
    /// heartbeat moved and publishes what the table says it owns (its owner really holds it). A round is longer than both the taker and the renewal intervals.
    async fn balance(&mut self) {
        self.rec.push(Event::Phase("balance"));
        let t = &self.sim.timing;
        let round = t.taker_interval.max(t.lease_duration / 3 * 3 / 2);
        let deadline = self.rec.now() + Duration::from_secs(120).max(t.lease_duration * 12);
        let (mut stable, mut still) = (0, 0);
        let mut last: BTreeMap<crate::lease::LeaseKey, (Option<WorkerId>, u64)> = BTreeMap::new();
        let mut last_workers: BTreeMap<WorkerId, (u64, u64, u64)> = BTreeMap::new();
        loop {
            self.reap(false);
            for i in 0..self.slots.len() {
                if self.slots[i].run.is_none() {
                    self.start(i, Some(false));
                }
            }
            let now: BTreeMap<_, _> = self
                .leases
                .leases()
                .into_iter()
                .filter(|l| !l.is_finished())
                .map(|l| (l.key, (l.owner, l.counter.0)))
                .collect();
            let moved = now.len() != last.len()
                || now
                    .iter()
                    .any(|(k, (owner, _))| last.get(k).is_none_or(|l| l.0 != *owner));
            // With per-worker liveness an owner renews its item, not its leases: it really
            // holds them if its heartbeat moved and the count it publishes is what it owns.
            let workers: BTreeMap<WorkerId, (u64, u64, u64)> = self
                .leases
                .workers()
                .into_iter()
                .filter(|w| w.fenced_by.is_none())
                .map(|w| (w.worker, (w.incarnation, w.heartbeat, w.lease_count)))
                .collect();
            let mut owned: BTreeMap<&WorkerId, u64> = BTreeMap::new();
            for (owner, _) in now.values() {
                if let Some(o) = owner {
                    *owned.entry(o).or_default() += 1;
                }
            }
            let beating = |o: &WorkerId| {
                let (Some(w), Some(w0)) = (workers.get(o), last_workers.get(o)) else {
                    return false;
                };
                (w.0, w.1) != (w0.0, w0.1) && w.2 == owned.get(o).copied().unwrap_or(0)
            };
            let stale: Vec<String> = now
                .iter()
                .filter(|(k, (owner, counter))| {
                    last.get(*k).is_some_and(|l| l.1 == *counter)
                        && !owner.as_ref().is_some_and(beating)
                })
                .map(|(k, (owner, _))| format!("{k} ({owner:?})"))
                .collect();
            last_workers = workers;
            last = now;
            still = if moved { 0 } else { still + 1 };
            let live: BTreeSet<WorkerId> = self
                .running()
                .into_iter()
                .map(|i| self.slots[i].id.clone())
                .collect();
            let verdict = match imbalance(&live, &self.leases.leases()) {
                None if moved => Some("leases are still moving".to_owned()),
                None if !stale.is_empty() => Some(format!(
                    "owned but not renewed (nobody holds them): {}",
                    stale.join(", ")
                )),
                other => other,
            };
            match verdict {
                None => {
                    stable += 1;
                    if stable >= 3 {
                        return;
                    }
                }
                Some(why) => {
                    stable = 0;
                    // Nothing moved for 10 rounds (more than a lease duration): stuck.
                    if self.rec.now() > deadline || still >= 10 {
                        self.violations.push(Violation::new(
                            Invariant::Balance,
                            Some(self.rec.now()),
                            why,
                        ));
                        return;
                    }
                }
            }
            tokio::time::sleep(round).await;
        }
    }

    /// Graceful shutdown of the whole fleet; every lease must end up released.
    async fn shutdown(&mut self) {
        self.rec.push(Event::Phase("shutdown"));
        for i in 0..self.slots.len() {
            self.stop(i);
        }
        let deadline =
            self.rec.now() + Duration::from_secs(60) + self.sim.timing.lease_duration * 2;
        while self.slots.iter().any(|s| s.run.is_some()) && self.rec.now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.reap(false);
        }
        for s in &self.slots {
            if s.run.is_some() {
                self.violations.push(Violation::new(
                    Invariant::ShutdownRelease,
                    Some(self.rec.now()),
                    format!("{} did not stop within the shutdown deadline", s.id),
                ));
            }
        }
        let owned = still_owned(&self.leases.leases());
        if !owned.is_empty() {
            self.violations.push(Violation::new(
                Invariant::ShutdownRelease,
                Some(self.rec.now()),
                format!(
                    "still owned after every worker stopped: {}",
                    owned.join(", ")
                ),
            ));
        }
    }

    async fn finish(mut self, started: Instant) -> SimReport {
        let virtual_time = started.elapsed();
        self.rec.close_open_batches();
        let parents: BTreeMap<ShardId, Vec<ShardId>> = self
            .kinesis
            .list_shards(STREAM)
            .await
            .unwrap_or_default()
            .iter()
            .map(|s| (s.id.clone(), s.parents().cloned().collect()))
            .collect();
        let entries = self.rec.entries();
        let incs = self.rec.incarnations();
        let lease_duration = self.sim.timing.lease_duration;
        let (mut violations, counts) = check::check(&entries, &incs, &parents, lease_duration);
        violations.extend(self.violations);
        for e in &entries {
            match &e.event {
                Event::Zombie { op, .. } => {
                    self.stats.zombie_calls += 1;
                    *self.stats.zombie_ops.entry((*op).to_owned()).or_default() += 1;
                }
                Event::Write {
                    response_lost: true,
                    ..
                } => self.stats.lost_responses += 1,
                Event::Callback {
                    what: log::Callback::LeaseLost,
                    ..
                } => self.stats.leases_lost += 1,
                Event::BatchDone {
                    outcome: BatchOutcome::Aborted,
                    ..
                } => self.stats.aborted_batches += 1,
                _ => {}
            }
        }
        self.stats.calls = self
            .rec
            .calls()
            .into_iter()
            .map(|(op, n)| (op.to_owned(), n))
            .collect();
        self.stats.injected = self
            .rec
            .injected()
            .into_iter()
            .map(|(op, n)| (op.to_owned(), n))
            .collect();
        // Stop any task left (a zombie) before the runtime is dropped.
        for s in &self.slots {
            if let Some(r) = &s.run {
                r.task.abort();
            }
        }
        let final_table = self
            .leases
            .leases()
            .iter()
            .map(|l| {
                format!(
                    "{} owner={:?} counter={} checkpoint={} checkpoint_owner={:?} parents={:?} children={:?}",
                    l.key,
                    l.owner,
                    l.counter,
                    l.checkpoint,
                    l.checkpoint_owner,
                    l.parent_shard_ids,
                    l.child_shard_ids
                )
            })
            .collect();
        SimReport {
            final_table,
            seed: self.sim.seed,
            scenario: self.sim.describe(),
            fan_out: self.sim.fan_out,
            automatic: self.sim.work.automatic.is_some(),
            java_workers: self.sim.java_workers,
            violations,
            counts,
            stats: self.stats,
            hash: self.rec.hash(),
            log: entries,
            virtual_time,
            real_time: Duration::ZERO,
        }
    }
}
