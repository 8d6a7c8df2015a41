//! What a run reports: [`SimReport`] (violations, counts, the log and its hash) and [`Stats`]
//! (the faults and lifecycle events of the run), and how much of each kind of chaos actually
//! happened ([`SimReport::chaos`]): a run without violations proves little if nothing went
//! wrong in it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::check::{Counts, Violation};
use super::log::Entry;
use super::sweep::replay_command;

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
    /// Splits (of the reshards).
    pub splits: usize,
    /// Merges (of the reshards).
    pub merges: usize,
    /// `UpdateShardCount`s (of the reshards).
    pub scales: usize,
    /// Times a machine's processors started failing.
    pub processor_faults: usize,
    /// Graceful handoffs the chaos asked for.
    pub handoff_requests: usize,
    /// Processor failures followed by a graceful stop of the machine.
    pub follow_stops: usize,
    /// Processor failures followed by a handoff of one of the machine's leases.
    pub follow_handoffs: usize,
    /// Processor failures followed by a crash of the machine.
    pub follow_crashes: usize,
    /// Workers an operator asked to drain.
    pub drains: usize,
    /// Lease writes whose response was lost.
    pub lost_responses: usize,
    /// `lease_lost` callbacks.
    pub leases_lost: usize,
    /// `process_records` calls that never returned (a crash, or the end of the run).
    pub aborted_batches: usize,
    /// Faults that hit a call, by kind (throttled and partitioned calls, broken
    /// subscriptions).
    pub injected: BTreeMap<String, usize>,
    /// Calls made by tasks of aborted workers (they should have stopped with `run()`).
    pub zombie_calls: usize,
    /// Zombie calls per operation.
    pub zombie_ops: BTreeMap<String, usize>,
    /// Backend calls per operation (the load a run put on the backends).
    pub calls: BTreeMap<String, usize>,
}

/// The kinds of chaos a sweep must have exercised (see [`SimReport::chaos`]).
pub const CHAOS_KINDS: &[&str] = &[
    "crashes",
    "partitioned calls",
    "lost answers",
    "throttled calls",
    "splits",
    "merges",
    "UpdateShardCount",
    "planned moves (handoffs)",
    "forced moves",
    "processor errors",
    "fatal processor errors",
    "processor panics",
    "dead letters",
    "failure then stop",
    "failure then handoff",
    "failure then crash",
    "fan-out runs",
    "fan-out crashes",
    "fan-out reshards",
    "broken subscriptions",
    "automatic-checkpoint runs",
    "automatic-checkpoint handoffs",
    "mixed Java/kcl fleet runs",
    "mixed-fleet forced moves",
    "drained workers",
];

/// The result of [`Sim::run`](super::Sim::run).
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// The run's shape.
    pub scenario: String,
    /// True if the workers read with enhanced fan-out.
    pub fan_out: bool,
    /// True if the workers checkpointed for the processors (an automatic policy).
    pub automatic: bool,
    /// Workers that ran as Java KCL workers (per-lease renewals, no worker item) at first.
    pub java_workers: usize,
    /// Broken invariants.
    pub violations: Vec<Violation>,
    /// Records, deliveries, duplicates, moves, processor outcomes.
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

    /// How often each kind of [`CHAOS_KINDS`] happened in this run.
    pub fn chaos(&self) -> BTreeMap<&'static str, usize> {
        let (s, c) = (&self.stats, &self.counts);
        let injected = |k: &str| s.injected.get(k).copied().unwrap_or(0);
        let fan_out = |n: usize| if self.fan_out { n } else { 0 };
        let automatic = |n: usize| if self.automatic { n } else { 0 };
        let mixed = |n: usize| if self.java_workers > 0 { n } else { 0 };
        let counts = [
            s.crashes,
            injected("partitioned lease call"),
            s.lost_responses,
            injected("throttled lease call") + injected("throttled kinesis call"),
            s.splits,
            s.merges,
            s.scales,
            c.handoffs,
            c.forced_moves,
            c.failed_batches,
            c.fatal_batches,
            c.panicked_batches,
            c.dead_letters,
            s.follow_stops,
            s.follow_handoffs,
            s.follow_crashes,
            fan_out(1),
            fan_out(s.crashes),
            fan_out(s.reshards),
            injected("broken subscription"),
            automatic(1),
            automatic(c.handoffs),
            mixed(1),
            mixed(c.forced_moves),
            s.drains,
        ];
        CHAOS_KINDS.iter().copied().zip(counts).collect()
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
        writeln!(
            f,
            "  processor faults {} (then stop {} handoff {} crash {}), handoff requests {}, drains {}; batches failed {} fatal {} panicked {} dead-lettered {} aborted {}; handoffs {} forced moves {}",
            s.processor_faults,
            s.follow_stops,
            s.follow_handoffs,
            s.follow_crashes,
            s.handoff_requests,
            s.drains,
            c.failed_batches,
            c.fatal_batches,
            c.panicked_batches,
            c.dead_letters,
            s.aborted_batches,
            c.handoffs,
            c.forced_moves
        )?;
        writeln!(f, "  faults that hit calls: {:?}", s.injected)?;
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
