//! Deterministic simulation of a fleet of workers (feature `testkit`).
//!
//! A [`Sim`] runs N workers over one in-memory Kinesis stream and one in-memory lease table, on
//! one current-thread tokio runtime with paused time, while a chaos schedule crashes and
//! restarts workers (with the same id, or sometimes a fresh one), stops them gracefully,
//! partitions them from the lease table (calls fail at once, or hang and then fail), throttles
//! and slows their lease calls, loses the responses of applied writes, throttles their reads, and
//! reshards the stream (split, merge, `UpdateShardCount`) while a producer writes. Then faults
//! stop, dead workers restart, the fleet settles, and the run checks the guarantees of DESIGN §2
//! over its event log (see [`check`] for the exact definitions): every record
//! delivered at least once; checkpoints never regress and only cover delivered records; no child
//! record before its parents ended; no two holders of one shard outside the expiry window; no
//! duplicates after planned moves; per-key order; balance once the fleet is stable; every lease
//! released after a graceful shutdown. Duplicates are counted.
//!
//! Everything random is drawn from one `ChaCha8Rng::seed_from_u64(seed)` owned by the run and
//! forked per worker, so a seed replays exactly: the report carries a hash of the event log.
//!
//! ```
//! use kcl::testkit::sim::{FaultRates, Sim};
//! let report = Sim::new(7).workers(2).shards(2).records(40).faults(FaultRates::none()).run();
//! assert!(report.is_ok(), "{report}");
//! assert_eq!(report.counts.distinct, 40);
//! // Sim::random(seed) draws the fleet, the load, the timings and the fault mix from the seed:
//! // what the seed sweep of `kcl/tests/sim.rs` runs.
//! ```
//!
//! Seeds (see [`SeedPlan::from_env`]): `KCL_SIM_SEED` replays one seed, `KCL_SIM_SEEDS=n` sweeps
//! n seeds starting from it, `KCL_SIM_CHECK=1` runs every seed twice and compares log hashes.

pub mod check;
pub mod log;
mod net;
mod processor;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use check::{Counts, Invariant, Violation};
pub use log::{Entry, Event};
pub use net::{LinkFaults, Partition};
pub use processor::Work;

use self::log::{Inc, Recorder};
use self::net::{Link, Net, SimKinesis, SimLeaseStore};
use self::processor::SimProcessor;
use crate::config::PollingConfig;
use crate::lease::WorkerId;
use crate::processor::ProcessorFactoryFn;
use crate::retrieval::KinesisApi;
use crate::shard::{HashKeyRange, ShardId};
use crate::testkit::{MemKinesis, MemLeaseStore};
use crate::worker::{ShutdownHandle, Worker};

const STREAM: &str = "sim-stream";
const APP: &str = "sim-app";

/// The command that replays `seed` alone.
pub fn replay_command(seed: u64) -> String {
    format!(
        "KCL_SIM_SEED={seed} cargo test -p kcl --features testkit --test sim -- --nocapture sweep"
    )
}

/// How often each kind of fault happens during the chaos phase.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultRates {
    /// Mean chaos events per minute of virtual time (0: none).
    pub events_per_minute: f64,
    /// Relative weight of a crash (the `run()` task aborted, no release).
    pub crash: u32,
    /// Relative weight of a graceful stop (and restart).
    pub stop: u32,
    /// Relative weight of a partition from the lease table.
    pub partition: u32,
    /// Relative weight of lease-table throttling.
    pub throttle: u32,
    /// Relative weight of lease-table latency.
    pub latency: u32,
    /// Relative weight of lost responses to applied lease writes.
    pub response_loss: u32,
    /// Relative weight of Kinesis read throttling.
    pub kinesis: u32,
    /// Relative weight of a reshard (split, merge or `UpdateShardCount`).
    pub reshard: u32,
    /// Probability that a restarted worker takes a fresh worker id (else it reuses its own).
    pub fresh_id: f64,
}

impl FaultRates {
    /// No faults at all (reshards neither).
    pub fn none() -> Self {
        Self {
            events_per_minute: 0.0,
            crash: 0,
            stop: 0,
            partition: 0,
            throttle: 0,
            latency: 0,
            response_loss: 0,
            kinesis: 0,
            reshard: 0,
            fresh_id: 0.0,
        }
    }
}

impl Default for FaultRates {
    fn default() -> Self {
        Self {
            events_per_minute: 12.0,
            crash: 3,
            stop: 2,
            partition: 3,
            throttle: 2,
            latency: 2,
            response_loss: 1,
            kinesis: 1,
            reshard: 3,
            fresh_id: 0.3,
        }
    }
}

/// Worker settings of a run (the rest are the library's defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// `lease_duration` (renewals every third of it).
    pub lease_duration: Duration,
    /// `taker_interval`.
    pub taker_interval: Duration,
    /// `shard_sync_interval`.
    pub shard_sync_interval: Duration,
    /// `parent_poll_interval`.
    pub parent_poll_interval: Duration,
    /// `finished_lease_retention`.
    pub finished_lease_retention: Duration,
    /// `max_leases_to_steal`.
    pub max_leases_to_steal: usize,
    /// `polling.max_records`.
    pub max_records: u32,
    /// `polling.idle_interval`.
    pub idle_interval: Duration,
    /// `polling.prefetch_batches`.
    pub prefetch_batches: usize,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(10),
            taker_interval: Duration::from_secs(2),
            shard_sync_interval: Duration::from_secs(60),
            parent_poll_interval: Duration::from_millis(500),
            finished_lease_retention: Duration::from_secs(300),
            max_leases_to_steal: 1,
            max_records: 25,
            idle_interval: Duration::from_millis(500),
            prefetch_batches: 3,
        }
    }
}

/// A simulation: a seed and the shape of the run. See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
#[must_use = "a Sim does nothing until `run()`"]
pub struct Sim {
    seed: u64,
    workers: usize,
    shards: usize,
    max_open_shards: usize,
    records: u64,
    keys: u32,
    duration: Duration,
    faults: FaultRates,
    timing: Timing,
    work: Work,
    script: Vec<(Duration, Verb)>,
}

/// A scripted event, for [`Sim::at`]. Worker numbers are slots `0..workers`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Verb {
    /// Kill worker `i`: its `run()` task is aborted and its network cut (no release; its
    /// leases expire). It stays down until [`Verb::Start`] (or the settle phase).
    Crash(usize),
    /// Stop worker `i` gracefully (checkpoint, release). It stays down until [`Verb::Start`].
    Stop(usize),
    /// Start worker `i` again with its worker id, if it is down.
    Start(usize),
    /// Start worker `i` again with a fresh worker id, if it is down.
    StartFresh(usize),
    /// Crash worker `i` and start it again at once with the same id.
    Bounce(usize),
    /// Replace the network faults of worker `i` (`LinkFaults::default()` heals it).
    Faults(usize, LinkFaults),
    /// Split an open shard at a hash key.
    Split(ShardId, u128),
    /// Merge two adjacent open shards.
    Merge(ShardId, ShardId),
    /// `UpdateShardCount` to this many open shards.
    ScaleTo(usize),
}

impl Sim {
    /// A run with fixed defaults: 3 workers, 4 shards, 300 records over 16 keys, 60 s of
    /// chaos with [`FaultRates::default`], the library's default timings.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            workers: 3,
            shards: 4,
            max_open_shards: 8,
            records: 300,
            keys: 16,
            duration: Duration::from_secs(60),
            faults: FaultRates::default(),
            timing: Timing::default(),
            work: Work {
                batch_time: Duration::from_millis(100),
                slow_batch: 0.01,
                slow_time: Duration::from_secs(15),
            },
            script: Vec::new(),
        }
    }

    /// A run whose shape (fleet size, shards, load, fault mix, timings) is drawn from the seed
    /// too: what the seed sweep runs.
    pub fn random(seed: u64) -> Self {
        let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x5348_4150_4500_0000);
        let mut sim = Self::new(seed);
        sim.workers = *pick(&mut r, &[1, 2, 2, 3, 3, 3, 4, 4, 5]);
        sim.shards = r.random_range(1..=6);
        sim.max_open_shards = r.random_range(sim.shards.max(2)..=8);
        sim.records = r.random_range(50..=400);
        sim.keys = *pick(&mut r, &[1, 4, 16, 64]);
        sim.duration = Duration::from_secs(r.random_range(15..=45));
        let lease = *pick(&mut r, &[2, 4, 10]);
        sim.timing = Timing {
            lease_duration: Duration::from_secs(lease),
            taker_interval: Duration::from_millis(*pick(&mut r, &[500, 1000, 2000, 2000])),
            shard_sync_interval: Duration::from_secs(*pick(&mut r, &[5, 20, 60])),
            parent_poll_interval: Duration::from_millis(*pick(&mut r, &[200, 500, 1000])),
            finished_lease_retention: Duration::from_secs(*pick(&mut r, &[1, 10, 60])),
            max_leases_to_steal: r.random_range(1..=3),
            max_records: *pick(&mut r, &[1, 5, 25, 100]),
            idle_interval: Duration::from_millis(*pick(&mut r, &[500, 1000, 2000])),
            prefetch_batches: r.random_range(1..=3),
        };
        sim.work = Work {
            batch_time: Duration::from_millis(*pick(&mut r, &[0, 50, 300])),
            slow_batch: *pick(&mut r, &[0.0, 0.005, 0.02]),
            slow_time: Duration::from_secs(lease) * r.random_range(1..=2),
        };
        sim.faults = if r.random_bool(0.1) {
            FaultRates {
                events_per_minute: 0.0,
                ..FaultRates::default()
            }
        } else {
            FaultRates {
                events_per_minute: *pick(&mut r, &[4.0, 12.0, 30.0]),
                crash: r.random_range(0..=4),
                stop: r.random_range(0..=3),
                partition: r.random_range(0..=4),
                throttle: r.random_range(0..=3),
                latency: r.random_range(0..=3),
                response_loss: r.random_range(0..=2),
                kinesis: r.random_range(0..=2),
                reshard: r.random_range(0..=4),
                fresh_id: *pick(&mut r, &[0.0, 0.3, 1.0]),
            }
        };
        sim
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Number of workers (machines) in the fleet.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// Shards of the stream at the start.
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = n.max(1);
        self.max_open_shards = self.max_open_shards.max(self.shards);
        self
    }

    /// The most open shards reshards may create.
    pub fn max_open_shards(mut self, n: usize) -> Self {
        self.max_open_shards = n.max(self.shards);
        self
    }

    /// Records put during the chaos phase.
    pub fn records(mut self, n: u64) -> Self {
        self.records = n;
        self
    }

    /// Distinct partition keys.
    pub fn keys(mut self, n: u32) -> Self {
        self.keys = n.max(1);
        self
    }

    /// Length of the chaos phase (virtual time).
    pub fn duration(mut self, d: Duration) -> Self {
        self.duration = d;
        self
    }

    /// The fault mix.
    pub fn faults(mut self, f: FaultRates) -> Self {
        self.faults = f;
        self
    }

    /// Worker timings.
    pub fn timing(mut self, t: Timing) -> Self {
        self.timing = t;
        self
    }

    /// How processors behave.
    pub fn work(mut self, w: Work) -> Self {
        self.work = w;
        self
    }

    /// Scripts `verb` at virtual time `at` (workers start within the first 3 s), on top of the
    /// random faults (use [`FaultRates::none`] for a purely scripted run).
    ///
    /// ```
    /// use std::time::Duration;
    /// use kcl::testkit::sim::{FaultRates, Sim, Verb};
    /// let report = Sim::new(1)
    ///     .workers(2)
    ///     .shards(2)
    ///     .records(60)
    ///     .duration(Duration::from_secs(30))
    ///     .faults(FaultRates::none())
    ///     .at(Duration::from_secs(10), Verb::Crash(0))
    ///     .at(Duration::from_secs(20), Verb::Start(0))
    ///     .run();
    /// assert_eq!(report.counts.distinct, 60);
    /// ```
    pub fn at(mut self, at: Duration, verb: Verb) -> Self {
        self.script.push((at, verb));
        self
    }

    /// Runs the simulation on a fresh current-thread runtime with paused time.
    ///
    /// # Panics
    /// If the runtime cannot be built.
    pub fn run(&self) -> SimReport {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime");
        let started = std::time::Instant::now();
        // Everything that reads the clock (the log's epoch, MemKinesis' epoch) is created inside
        // the runtime, on its paused clock.
        let sim = self.clone();
        let mut report = rt.block_on(async move { Driver::new(sim).run().await });
        drop(rt);
        report.real_time = started.elapsed();
        report
    }
}

fn pick<'a, T>(r: &mut ChaCha8Rng, xs: &'a [T]) -> &'a T {
    &xs[r.random_range(0..xs.len())]
}

/// What happened in a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Worker incarnations started.
    pub starts: usize,
    /// Crashes.
    pub crashes: usize,
    /// Graceful stops during chaos.
    pub stops: usize,
    /// Restarts that took a fresh worker id.
    pub fresh_ids: usize,
    /// `run()` returning an error (e.g. the table unreachable at start).
    pub worker_errors: usize,
    /// Partitions from the lease table.
    pub partitions: usize,
    /// Other network faults (throttling, latency, lost responses, Kinesis throttling).
    pub link_faults: usize,
    /// Reshards.
    pub reshards: usize,
    /// Lease writes whose response was lost.
    pub lost_responses: usize,
    /// `lease_lost` callbacks.
    pub leases_lost: usize,
    /// Calls made by tasks of aborted workers (they should have stopped with `run()`).
    pub zombie_calls: usize,
    /// Zombie calls per operation.
    pub zombie_ops: BTreeMap<String, usize>,
    /// Backend calls per operation (the load a run put on the backends).
    pub calls: BTreeMap<String, usize>,
}

/// The result of [`Sim::run`].
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// The run's shape.
    pub scenario: String,
    /// Broken invariants.
    pub violations: Vec<Violation>,
    /// Records, deliveries, duplicates.
    pub counts: Counts,
    /// Faults and lifecycle.
    pub stats: Stats,
    /// FNV-1a hash of the event log.
    pub hash: u64,
    /// The event log.
    pub log: Vec<Entry>,
    /// The lease table at the end (one line per lease).
    pub final_table: Vec<String>,
    /// Virtual time the run took.
    pub virtual_time: Duration,
    /// Real time the run took.
    pub real_time: Duration,
}

impl SimReport {
    /// True if no invariant was broken.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        replay_command(self.seed)
    }
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        let s = &self.stats;
        writeln!(
            f,
            "seed {}: {} — {} records, {} deliveries, {} duplicates; {} events, hash {:016x}; {:.0}s virtual, {} ms real",
            self.seed,
            if self.is_ok() { "ok" } else { "FAILED" },
            c.produced,
            c.deliveries,
            c.duplicates,
            self.log.len(),
            self.hash,
            self.virtual_time.as_secs_f64(),
            self.real_time.as_millis()
        )?;
        writeln!(f, "  scenario: {}", self.scenario)?;
        writeln!(
            f,
            "  starts {} crashes {} stops {} fresh-ids {} run-errors {} partitions {} link-faults {} lost-responses {} reshards {} leases-lost {} tenures {} planned-moves {} expiry-overlaps {} zombie-calls {}",
            s.starts,
            s.crashes,
            s.stops,
            s.fresh_ids,
            s.worker_errors,
            s.partitions,
            s.link_faults,
            s.lost_responses,
            s.reshards,
            s.leases_lost,
            c.tenures,
            c.planned_moves,
            c.expiry_overlaps,
            s.zombie_calls
        )?;
        writeln!(f, "  backend calls: {:?}", s.calls)?;
        if !s.zombie_ops.is_empty() {
            writeln!(f, "  zombie calls by operation: {:?}", s.zombie_ops)?;
        }
        for v in &self.violations {
            writeln!(f, "  VIOLATION {v}")?;
        }
        if !self.is_ok() {
            writeln!(f, "  lease table at the end:")?;
            for l in &self.final_table {
                writeln!(f, "    {l}")?;
            }
            writeln!(f, "  replay: {}", self.replay_command())?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The driver.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Heal {
    Partition,
    Throttle,
    Latency,
    ResponseLoss,
    Kinesis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    Produce,
    Chaos,
    Start(usize),
    Heal(usize, Heal),
    Script(usize),
}

/// Sets its flag when dropped (with the future that owns it).
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

struct Running {
    inc: Inc,
    task: JoinHandle<crate::Result<()>>,
    stop: ShutdownHandle,
    dead: Arc<AtomicBool>,
    stopping: bool,
}

struct Slot {
    base: String,
    id: WorkerId,
    restarts: u32,
    rng: ChaCha8Rng,
    link: Arc<Mutex<Link>>,
    run: Option<Running>,
    /// Kept down by a scripted `Crash` / `Stop` until a scripted `Start`.
    scripted_down: bool,
}

struct Driver {
    sim: Sim,
    rng: ChaCha8Rng,
    producer: ChaCha8Rng,
    rec: Recorder,
    kinesis: MemKinesis,
    leases: MemLeaseStore,
    slots: Vec<Slot>,
    agenda: BTreeMap<(Duration, u64), Action>,
    seq: u64,
    produced: u64,
    stats: Stats,
    violations: Vec<Violation>,
}

impl Driver {
    fn new(sim: Sim) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(sim.seed);
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
                }
            })
            .collect();
        Self {
            sim,
            rng,
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

    fn schedule(&mut self, after: Duration, action: Action) {
        let at = self.rec.now() + after;
        self.seq += 1;
        self.agenda.insert((at, self.seq), action);
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.rng.random_range(lo..=hi.max(lo)))
    }

    async fn run(mut self) -> SimReport {
        let started = Instant::now();
        self.kinesis.create_stream(STREAM, self.sim.shards);
        self.rec.push(Event::Phase("chaos"));
        for i in 0..self.slots.len() {
            let d = self.millis(0, 3000);
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

    fn chaos_gap(&mut self) -> Duration {
        // Exponential gaps with the configured mean.
        let mean = 60.0 / self.sim.faults.events_per_minute;
        let u: f64 = self.rng.random_range(1e-6..1.0);
        Duration::from_secs_f64((-u.ln() * mean).min(mean * 5.0))
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

    /// Runs a scripted verb.
    fn verb(&mut self, verb: Verb) {
        let n = self.slots.len();
        let slot = |i: usize| i.min(n - 1);
        match verb {
            Verb::Crash(i) => {
                self.crash(slot(i));
                self.slots[slot(i)].scripted_down = true;
            }
            Verb::Stop(i) => {
                self.stop(slot(i));
                self.slots[slot(i)].scripted_down = true;
            }
            Verb::Start(i) | Verb::StartFresh(i) => {
                let i = slot(i);
                self.slots[i].scripted_down = false;
                if self.slots[i].run.is_none() {
                    self.start(i, Some(matches!(verb, Verb::StartFresh(_))));
                }
            }
            Verb::Bounce(i) => {
                self.crash(slot(i));
                self.start(slot(i), Some(false));
            }
            Verb::Faults(i, f) => {
                self.set_fault(slot(i), format!("set {f:?}"), |l| *l = f);
            }
            Verb::Split(id, at) => {
                let (a, b) = self.kinesis.split(STREAM, &id, at);
                self.rec
                    .push(Event::Reshard(format!("split {id} -> {a}, {b}")));
                self.stats.reshards += 1;
            }
            Verb::Merge(a, b) => {
                let c = self.kinesis.merge(STREAM, &a, &b);
                self.rec
                    .push(Event::Reshard(format!("merge {a} + {b} -> {c}")));
                self.stats.reshards += 1;
            }
            Verb::ScaleTo(target) => {
                let n = self.kinesis.open_shard_ids(STREAM).len();
                self.kinesis.update_shard_count(STREAM, target.max(1));
                self.rec.push(Event::Reshard(format!(
                    "update_shard_count {n} -> {target}"
                )));
                self.stats.reshards += 1;
            }
        }
    }

    /// Asks slot `i` to stop gracefully.
    fn stop(&mut self, i: usize) {
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
    fn start(&mut self, i: usize, fresh: Option<bool>) {
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
        slot.restarts += 1;
        self.stats.starts += 1;
        let inc = self.rec.new_inc(i, slot.id.clone());
        let dead = Arc::new(AtomicBool::new(false));
        let run_dropped = Arc::new(AtomicBool::new(false));
        let net = Net {
            link: slot.link.clone(),
            dead: dead.clone(),
            run_dropped: run_dropped.clone(),
            inc,
            rec: self.rec.clone(),
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
        let factory_net = net.clone();
        let worker = Worker::builder()
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
                inner: self.leases.clone(),
                net,
            }))
            .lease_duration(t.lease_duration)
            .taker_interval(t.taker_interval)
            .shard_sync_interval(t.shard_sync_interval)
            .parent_poll_interval(t.parent_poll_interval)
            .finished_lease_retention(t.finished_lease_retention)
            .max_leases_to_steal(t.max_leases_to_steal)
            .polling(polling)
            .processor(ProcessorFactoryFn(move |shard: &ShardId| {
                SimProcessor::new(factory_net.clone(), shard, &procs, work)
            }))
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
                Some(Ok(Ok(()))) => "ok".to_owned(),
                Some(Ok(Err(e))) => {
                    self.stats.worker_errors += 1;
                    format!("error: {e}")
                }
                Some(Err(e)) if e.is_panic() => {
                    self.violations.push(Violation::new(
                        Invariant::WorkerPanic,
                        Some(self.rec.now()),
                        format!("{} panicked", self.slots[i].id),
                    ));
                    "panic".to_owned()
                }
                Some(Err(_)) => "cancelled".to_owned(),
                None => "unknown".to_owned(),
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

    fn running(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].run.as_ref().is_some_and(|r| !r.stopping))
            .collect()
    }

    async fn chaos(&mut self) {
        let f = self.sim.faults.clone();
        let weights = [
            f.crash,
            f.stop,
            f.partition,
            f.throttle,
            f.latency,
            f.response_loss,
            f.kinesis,
            f.reshard,
        ];
        let total: u32 = weights.iter().sum();
        if total == 0 {
            return;
        }
        let mut x = self.rng.random_range(0..total);
        let mut kind = 0;
        for (k, w) in weights.iter().enumerate() {
            if x < *w {
                kind = k;
                break;
            }
            x -= w;
        }
        let lease = self.sim.timing.lease_duration;
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        let slot = self.rng.random_range(0..self.slots.len());
        match kind {
            0 => {
                let running = self.running();
                if running.is_empty() {
                    return;
                }
                let i = running[self.rng.random_range(0..running.len())];
                self.crash(i);
                let d = self.millis(200, 2 * lease_ms);
                self.schedule(d, Action::Start(i));
            }
            1 => {
                let running = self.running();
                if running.is_empty() {
                    return;
                }
                let i = running[self.rng.random_range(0..running.len())];
                self.stop(i);
                self.stats.stops += 1;
                let d = self.millis(500, 10_000);
                self.schedule(d, Action::Start(i));
            }
            2 => {
                let mode = if self.rng.random_bool(0.5) {
                    Partition::Fail
                } else {
                    Partition::Hang(self.millis(100, lease_ms * 3 / 2))
                };
                let d = self.millis(lease_ms / 4, lease_ms * 3);
                self.set_fault(slot, format!("partition {mode:?} for {d:?}"), |l| {
                    l.partition = Some(mode)
                });
                self.stats.partitions += 1;
                self.schedule(d, Action::Heal(slot, Heal::Partition));
            }
            3 => {
                let p = self.rng.random_range(0.2..0.95);
                let d = self.millis(lease_ms / 4, lease_ms * 3);
                self.set_fault(slot, format!("throttle {p:.2} for {d:?}"), |l| {
                    l.throttle = p
                });
                self.stats.link_faults += 1;
                self.schedule(d, Action::Heal(slot, Heal::Throttle));
            }
            4 => {
                // Sometimes beyond the lease duration: writes then succeed after the lease could expire.
                let max = self.millis(5, lease_ms * 3 / 2);
                let d = self.millis(lease_ms / 4, lease_ms * 3);
                self.set_fault(slot, format!("latency up to {max:?} for {d:?}"), |l| {
                    l.latency = max
                });
                self.stats.link_faults += 1;
                self.schedule(d, Action::Heal(slot, Heal::Latency));
            }
            5 => {
                let p = self.rng.random_range(0.05..0.5);
                let d = self.millis(lease_ms / 4, lease_ms * 3);
                self.set_fault(slot, format!("lose responses {p:.2} for {d:?}"), |l| {
                    l.response_loss = p
                });
                self.stats.link_faults += 1;
                self.schedule(d, Action::Heal(slot, Heal::ResponseLoss));
            }
            6 => {
                let p = self.rng.random_range(0.2..0.9);
                let d = self.millis(1000, 20_000);
                self.set_fault(slot, format!("kinesis throttle {p:.2} for {d:?}"), |l| {
                    l.kinesis_throttle = p
                });
                self.stats.link_faults += 1;
                self.schedule(d, Action::Heal(slot, Heal::Kinesis));
            }
            _ => self.reshard().await,
        }
    }

    fn set_fault(&mut self, slot: usize, what: String, f: impl FnOnce(&mut LinkFaults)) {
        {
            let mut link = self.slots[slot]
                .link
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            f(&mut link.faults);
        }
        self.rec.push(Event::Fault { slot, what });
    }

    fn heal(&mut self, slot: usize, what: Heal) {
        self.set_fault(slot, format!("heal {what:?}"), |l| match what {
            Heal::Partition => l.partition = None,
            Heal::Throttle => l.throttle = 0.0,
            Heal::Latency => l.latency = Duration::ZERO,
            Heal::ResponseLoss => l.response_loss = 0.0,
            Heal::Kinesis => l.kinesis_throttle = 0.0,
        });
    }

    fn crash(&mut self, i: usize) {
        if let Some(r) = self.slots[i].run.take() {
            r.dead.store(true, Ordering::SeqCst);
            r.task.abort();
            self.rec.crash(r.inc);
            self.stats.crashes += 1;
        }
    }

    async fn reshard(&mut self) {
        let Ok(shards) = self.kinesis.list_shards(STREAM).await else {
            return;
        };
        let mut open: Vec<(ShardId, HashKeyRange)> = shards
            .iter()
            .filter(|s| !s.is_closed())
            .map(|s| (s.id.clone(), s.hash_range))
            .collect();
        open.sort_by_key(|(_, r)| r.start());
        let max = self.sim.max_open_shards;
        let what = match self.rng.random_range(0..3) {
            0 if open.len() < max => {
                let (id, r) = open[self.rng.random_range(0..open.len())].clone();
                if r.end() == r.start() {
                    return;
                }
                let at = self.rng.random_range(r.start() + 1..=r.end());
                let (a, b) = self.kinesis.split(STREAM, &id, at);
                format!("split {id} -> {a}, {b}")
            }
            1 if open.len() > 1 => {
                let k = self.rng.random_range(0..open.len() - 1);
                let (a, b) = (open[k].0.clone(), open[k + 1].0.clone());
                let c = self.kinesis.merge(STREAM, &a, &b);
                format!("merge {a} + {b} -> {c}")
            }
            2 => {
                let n = open.len();
                let lo = n.div_ceil(2).max(1);
                let hi = (2 * n).min(max);
                let target = self.rng.random_range(lo..=hi);
                if target == n {
                    return;
                }
                self.kinesis.update_shard_count(STREAM, target);
                format!("update_shard_count {n} -> {target}")
            }
            _ => return,
        };
        self.stats.reshards += 1;
        self.rec.push(Event::Reshard(what));
    }

    /// Faults stop, every worker runs; waits until every record was delivered.
    async fn settle(&mut self) {
        self.rec.push(Event::Phase("settle"));
        for i in 0..self.slots.len() {
            let clear = {
                let link = self.slots[i].link.lock().unwrap_or_else(|p| p.into_inner());
                link.faults.is_clear()
            };
            if !clear {
                self.set_fault(i, "heal all".to_owned(), |l| *l = LinkFaults::default());
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
    /// hands, and every active lease renewed since the previous round (its owner really holds
    /// it). A round is longer than both the taker and the renewal intervals.
    async fn balance(&mut self) {
        self.rec.push(Event::Phase("balance"));
        let t = &self.sim.timing;
        let round = t.taker_interval.max(t.lease_duration / 3 * 3 / 2);
        let deadline = self.rec.now() + Duration::from_secs(120).max(t.lease_duration * 12);
        let (mut stable, mut still) = (0, 0);
        let mut last: BTreeMap<crate::lease::LeaseKey, (Option<WorkerId>, u64)> = BTreeMap::new();
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
            let stale: Vec<String> = now
                .iter()
                .filter(|(k, (_, counter))| last.get(*k).is_some_and(|l| l.1 == *counter))
                .map(|(k, (owner, _))| format!("{k} ({owner:?})"))
                .collect();
            last = now;
            still = if moved { 0 } else { still + 1 };
            let verdict = match self.imbalance() {
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

    /// Why the fleet is not balanced, if it is not.
    fn imbalance(&self) -> Option<String> {
        let live: BTreeSet<WorkerId> = self
            .slots
            .iter()
            .filter(|s| s.run.as_ref().is_some_and(|r| !r.stopping))
            .map(|s| s.id.clone())
            .collect();
        let leases = self.leases.leases();
        let active: Vec<_> = leases.iter().filter(|l| !l.is_finished()).collect();
        if live.is_empty() {
            return None;
        }
        let mut load: BTreeMap<&WorkerId, usize> = live.iter().map(|w| (w, 0)).collect();
        for l in &active {
            match (&l.owner, &l.checkpoint_owner) {
                (_, Some(from)) => return Some(format!("{}: handoff from {from} pending", l.key)),
                (Some(o), None) => match load.get_mut(o) {
                    Some(n) => *n += 1,
                    None => return Some(format!("{} owned by {o}, not a live worker", l.key)),
                },
                (None, None) => return Some(format!("{} unowned", l.key)),
            }
        }
        let lo = active.len() / live.len();
        let hi = active.len().div_ceil(live.len());
        if load.values().all(|&n| (lo..=hi).contains(&n)) {
            None
        } else {
            Some(format!(
                "{} active leases over {} live workers (want {lo}..={hi} each): {:?}",
                active.len(),
                live.len(),
                load
            ))
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
        let owned: Vec<String> = self
            .leases
            .leases()
            .iter()
            // A finished lease whose release failed stays owned (nobody takes finished leases);
            // that is harmless. An unfinished one is taken over and released at shutdown.
            .filter(|l| !l.is_finished() && (l.owner.is_some() || l.checkpoint_owner.is_some()))
            .map(|l| format!("{} ({:?})", l.key, l.owner))
            .collect();
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
        let (mut violations, counts) = check::check(&entries, &incs, &parents);
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
                _ => {}
            }
        }
        self.stats.calls = self
            .rec
            .calls()
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
            scenario: scenario(&self.sim),
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

fn scenario(s: &Sim) -> String {
    let f = &s.faults;
    let t = &s.timing;
    format!(
        "{} workers, {} shards (max {}), {} records over {} keys, {}s chaos at {}/min [crash {} stop {} partition {} throttle {} latency {} lost-response {} kinesis {} reshard {}; fresh-id {}], lease {:?} taker {:?} sync {:?} retention {:?} steal {} max_records {} prefetch {}, batch {:?} slow {}",
        s.workers,
        s.shards,
        s.max_open_shards,
        s.records,
        s.keys,
        s.duration.as_secs(),
        f.events_per_minute,
        f.crash,
        f.stop,
        f.partition,
        f.throttle,
        f.latency,
        f.response_loss,
        f.kinesis,
        f.reshard,
        f.fresh_id,
        t.lease_duration,
        t.taker_interval,
        t.shard_sync_interval,
        t.finished_lease_retention,
        t.max_leases_to_steal,
        t.max_records,
        t.prefetch_batches,
        s.work.batch_time,
        s.work.slow_batch
    )
}

// ---------------------------------------------------------------------------------------------
// Seed sweeps.

/// Which seeds to run, from the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedPlan {
    /// First seed.
    pub start: u64,
    /// How many seeds.
    pub count: u64,
    /// Run each seed twice and compare log hashes.
    pub check: bool,
    /// True if `KCL_SIM_SEED` was given (a replay: print everything).
    pub replay: bool,
}

impl SeedPlan {
    /// `KCL_SIM_SEED` (first seed; alone: replay that seed), `KCL_SIM_SEEDS` (how many),
    /// `KCL_SIM_CHECK=1` (determinism check); `default_count` seeds from 0 otherwise.
    ///
    /// # Panics
    /// If a variable is set but is not a number.
    pub fn from_env(default_count: u64) -> Self {
        let num = |name: &str| {
            std::env::var(name).ok().map(|v| {
                v.trim()
                    .parse::<u64>()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
            })
        };
        let seed = num("KCL_SIM_SEED");
        let count = num("KCL_SIM_SEEDS");
        let check = std::env::var("KCL_SIM_CHECK").is_ok_and(|v| v != "0" && !v.is_empty());
        Self {
            start: seed.unwrap_or(0),
            count: count.unwrap_or(if seed.is_some() { 1 } else { default_count }),
            check,
            replay: seed.is_some() && count.is_none(),
        }
    }

    /// The seeds.
    pub fn seeds(&self) -> std::ops::Range<u64> {
        self.start..self.start.saturating_add(self.count)
    }
}

/// The outcome of a sweep.
#[derive(Debug, Default)]
pub struct SweepSummary {
    /// Reports of the seeds that failed, by seed.
    pub failed: Vec<SimReport>,
    /// Seeds whose two runs hashed differently (with `check`), with both hashes and the first
    /// differing log entries.
    pub nondeterministic: Vec<(u64, String)>,
    /// Seeds run.
    pub seeds: usize,
    /// Sum of real time over seeds.
    pub real_time: Duration,
    /// Slowest seed (seed, real time).
    pub slowest: (u64, Duration),
    /// Real time of every seed, sorted by time.
    pub times: Vec<(Duration, u64)>,
    /// Sum of counts.
    pub deliveries: usize,
    /// Sum of duplicates.
    pub duplicates: usize,
    /// Sum of zombie calls.
    pub zombie_calls: usize,
    /// Seeds with zombie calls.
    pub zombie_seeds: Vec<u64>,
}

impl fmt::Display for SweepSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = if self.seeds == 0 {
            Duration::ZERO
        } else {
            self.real_time / u32::try_from(self.seeds).unwrap_or(u32::MAX)
        };
        let pct = |p: usize| {
            self.times
                .get((self.times.len() * p / 100).min(self.times.len().saturating_sub(1)))
                .map_or(0, |t| t.0.as_millis())
        };
        writeln!(
            f,
            "{} seeds, {} failed, {} nondeterministic; {} deliveries, {} duplicates; real time per seed: mean {} ms, p50 {} ms, p90 {} ms, max {} ms (seed {}); {} zombie calls in {} seeds",
            self.seeds,
            self.failed.len(),
            self.nondeterministic.len(),
            self.deliveries,
            self.duplicates,
            per.as_millis(),
            pct(50),
            pct(90),
            self.slowest.1.as_millis(),
            self.slowest.0,
            self.zombie_calls,
            self.zombie_seeds.len()
        )?;
        if !self.zombie_seeds.is_empty() {
            writeln!(
                f,
                "seeds with zombie calls (tasks of aborted workers still running): {:?}",
                &self.zombie_seeds[..self.zombie_seeds.len().min(20)]
            )?;
        }
        for r in &self.failed {
            write!(f, "{r}")?;
        }
        for (seed, why) in &self.nondeterministic {
            writeln!(f, "seed {seed}: NONDETERMINISTIC: {why}")?;
        }
        Ok(())
    }
}

/// Runs `make(seed).run()` for every seed on `threads` OS threads (each run is still one
/// single-threaded runtime). A watchdog aborts the process, naming the seed, if one run takes
/// longer than `hang` of real time (a livelock freezes paused time, so it cannot time out).
pub fn sweep(
    seeds: impl IntoIterator<Item = u64>,
    threads: usize,
    check: bool,
    hang: Duration,
    make: impl Fn(u64) -> Sim + Sync,
) -> SweepSummary {
    let seeds: Vec<u64> = seeds.into_iter().collect();
    let next = AtomicU64::new(0);
    let summary = Mutex::new(SweepSummary::default());
    let threads = threads.max(1).min(seeds.len().max(1));
    // Per thread: (seed, start in ms since the sweep began) of the run in progress.
    let began = std::time::Instant::now();
    let busy: Vec<Mutex<Option<(u64, u128)>>> = (0..threads).map(|_| Mutex::new(None)).collect();
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                let now = began.elapsed().as_millis();
                for b in &busy {
                    let cur = *b.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some((seed, since)) = cur {
                        if now - since > hang.as_millis() {
                            eprintln!(
                                "seed {seed} has run for more than {hang:?} of real time: a livelock (paused time cannot advance)?\n  replay: {}",
                                replay_command(seed)
                            );
                            std::process::abort();
                        }
                    }
                }
            }
        });
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (next, summary, seeds, busy, make) = (&next, &summary, &seeds, &busy, &make);
                scope.spawn(move || loop {
                    let k = next.fetch_add(1, Ordering::SeqCst) as usize;
                    let Some(&seed) = seeds.get(k) else {
                        return;
                    };
                    *busy[t].lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((seed, began.elapsed().as_millis()));
                    let sim = make(seed);
                    let report = sim.run();
                    let twin = check.then(|| sim.run());
                    *busy[t].lock().unwrap_or_else(|p| p.into_inner()) = None;
                    let mut s = summary.lock().unwrap_or_else(|p| p.into_inner());
                    s.seeds += 1;
                    s.real_time += report.real_time;
                    s.times.push((report.real_time, seed));
                    if report.real_time > s.slowest.1 {
                        s.slowest = (seed, report.real_time);
                    }
                    s.deliveries += report.counts.deliveries;
                    s.duplicates += report.counts.duplicates;
                    if report.stats.zombie_calls > 0 {
                        s.zombie_calls += report.stats.zombie_calls;
                        s.zombie_seeds.push(seed);
                    }
                    if let Some(twin) = twin {
                        if let Some(why) = divergence(&report, &twin) {
                            s.nondeterministic.push((seed, why));
                        }
                    }
                    if !report.is_ok() {
                        s.failed.push(report);
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
        done.store(true, Ordering::SeqCst);
    });
    let mut s = summary.into_inner().unwrap_or_else(|p| p.into_inner());
    s.failed.sort_by_key(|r| r.seed);
    s.times.sort_unstable();
    s.zombie_seeds.sort_unstable();
    s.nondeterministic.sort_by_key(|(seed, _)| *seed);
    s
}

/// Where two runs of one seed first differ, if they do.
pub fn divergence(a: &SimReport, b: &SimReport) -> Option<String> {
    if a.hash == b.hash && a.log.len() == b.log.len() {
        return None;
    }
    let at = a
        .log
        .iter()
        .zip(&b.log)
        .position(|(x, y)| x != y)
        .unwrap_or(a.log.len().min(b.log.len()));
    let show = |r: &SimReport| {
        r.log
            .get(at)
            .map_or_else(|| "<end of log>".to_owned(), |e| format!("{e:?}"))
    };
    Some(format!(
        "hashes {:016x} / {:016x}; first difference at entry {at}:\n    {}\n    {}",
        a.hash,
        b.hash,
        show(a),
        show(b)
    ))
}
