//! Deterministic simulation of a fleet of workers (feature `testkit`).
//!
//! A [`Sim`] runs N workers over one in-memory Kinesis stream and one in-memory lease table, on
//! one current-thread tokio runtime with paused time, while a chaos schedule crashes and
//! restarts workers (with the same id, or sometimes a fresh one), stops them gracefully,
//! partitions them from the lease table (calls fail at once, or hang and then fail), throttles
//! and slows their lease calls, loses the responses of applied writes, throttles their reads
//! (and breaks their fan-out subscriptions), makes their processors fail (retryable and fatal
//! errors, panics) and follows that with stops, handoffs and crashes, asks for graceful
//! handoffs, and reshards the stream (split, merge, `UpdateShardCount`) while a producer
//! writes. Workers read by polling or with enhanced fan-out. Then faults stop, dead workers
//! restart, the fleet settles, and the run checks the guarantees of DESIGN §2 over its event
//! log (see [`check`] for the exact definitions): every record delivered at least once;
//! checkpoints never regress, only cover delivered records, and never cover a record whose
//! processing failed; a lease is not given up for a lost answer; no child record before its
//! parents ended; no two holders of one shard
//! outside the expiry window; no duplicates after planned moves; per-key order; balance once
//! the fleet is stable; every lease released after a graceful shutdown. Duplicates are
//! counted, and so is the chaos that actually happened ([`SimReport::chaos`]).
//!
//! Everything random is drawn from one `ChaCha8Rng::seed_from_u64(seed)` owned by the run and
//! forked per worker (and a second one, salted, for the processor-failure chaos), so a seed
//! replays exactly: the report carries a hash of the event log.
//!
//! The code: [`scenario`](Sim) (what a run is), `driver` (runs the workers and the phases),
//! `chaos` (the fault schedule and the scripted [`Verb`]s), `net` (the faulty network between
//! a worker and the backends), `processor` (the recording processor), [`log`] (the event log),
//! [`check`] (the invariants), `report` ([`SimReport`]) and `sweep` ([`sweep`], [`SeedPlan`]).
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

mod chaos;
pub mod check;
mod driver;
pub mod log;
mod net;
mod processor;
mod report;
mod scenario;
mod sweep;

pub use check::{imbalance, still_owned, Counts, Invariant, Violation};
pub use log::{BatchOutcome, Entry, Event, Exit};
pub use net::{FailKind, LinkFaults, Partition, ProcessorFault};
pub use processor::{OnFailure, Work};
pub use report::{SimReport, Stats, CHAOS_KINDS};
pub use scenario::{FaultRates, Sim, Timing, Verb};
pub use sweep::{divergence, replay_command, sweep, SeedPlan, SweepSummary};

const STREAM: &str = "sim-stream";
const APP: &str = "sim-app";
/// The enhanced fan-out consumer of fan-out runs.
const CONSUMER: &str = "sim-consumer";
