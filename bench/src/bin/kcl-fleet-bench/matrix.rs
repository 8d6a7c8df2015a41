//! The lease table's cost at scale (issue 10, item 1): the lease protocol alone
//! ([`ProtocolFleet`]) under tokio's paused clock, for 64 / 1 000 / 10 000 leases × 4 / 50 / 200
//! workers, beside the Java KCL 2.x computed from its defaults on the same items.
//!
//! Per cell: the fleet starts (workers spread over 2 s) and balances; over a window of steady
//! state every lease-table request is charged the capacity units DynamoDB would charge
//! ([`kcl::lease::capacity`]), split by purpose; the busiest second is the most units read and
//! written in one second of the window; then workers are killed (a different one per trial, at a
//! different point of the heartbeat cycle) and failover is the time until every lease is held
//! again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kcl::config::LeaseLiveness;
use kcl::lease::capacity::{self, CapacityMeter, Consumed};
use kcl::lease::{Lease, LeaseStore};
use kcl::shard::HashKeyRange;
use kcl::testkit::{MemLeaseStore, ProtocolFleet};
use kcl::{ExtendedSequenceNumber, SequenceNumber, ShardId, WorkerConfig};
use tokio::time::Instant;

/// One cell of the matrix.
#[derive(Clone, Copy, Debug)]
pub struct Cell {
    pub leases: usize,
    pub workers: usize,
    pub liveness: LeaseLiveness,
    pub window: Duration,
    pub trials: usize,
}

/// What one cell measured.
#[derive(Debug)]
pub struct Measured {
    pub item_bytes: usize,
    /// Capacity units per lease-hour by purpose.
    pub by_purpose: BTreeMap<&'static str, f64>,
    pub total: f64,
    /// The busiest second's read and write units.
    pub busiest_reads: f64,
    pub busiest_writes: f64,
    pub failovers: Vec<f64>,
    pub balanced_after: Option<Duration>,
    /// Process CPU over the window divided by the taker rounds in it: an upper bound on one
    /// round's CPU (it also carries the heartbeats and the stand-in consumers).
    pub cpu_per_round: Duration,
    /// Taker rounds over the window, timed one by one: mean and longest.
    pub round_mean: Duration,
    pub round_max: Duration,
}

/// CPU time of this process so far (user + system).
fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Taker rounds so far: each reads the worker table once (per-worker liveness) or the lease
/// table once (per lease).
fn rounds(m: &BTreeMap<String, Consumed>, liveness: LeaseLiveness) -> u64 {
    let op = match liveness {
        LeaseLiveness::PerLease => "list",
        _ => "list_workers",
    };
    m.get(op).map_or(0, |c| c.requests)
}

/// The purpose a lease-table operation serves.
fn purpose(op: &str) -> &'static str {
    match op {
        "register_worker" | "heartbeat" | "list_workers" | "fence_worker" | "remove_worker"
        | "renew" => "liveness",
        "checkpoint" | "set_pending_checkpoint" => "checkpoints",
        _ => "taking",
    }
}

fn lease(i: usize, n: usize) -> Lease {
    let width = u128::MAX / n as u128;
    let start = width * i as u128;
    let end = if i + 1 == n {
        u128::MAX
    } else {
        start + width - 1
    };
    let range = HashKeyRange::new(start, end).expect("a valid range");
    let mut l = Lease::new(
        &ShardId::new(format!("shardId-{i:012}")),
        ExtendedSequenceNumber::TrimHorizon,
    )
    .with_hash_range(range);
    // A real checkpoint: 56 digits.
    let seq: SequenceNumber = format!("4959{:052}", 1_000_000_007u64 * (i as u64 + 1))
        .parse()
        .expect("a sequence number");
    l.checkpoint = ExtendedSequenceNumber::at(seq, 0);
    l
}

fn sum(meter: &CapacityMeter) -> BTreeMap<String, Consumed> {
    meter.snapshot()
}

fn units(m: &BTreeMap<String, Consumed>) -> (f64, f64) {
    m.values().fold((0.0, 0.0), |(r, w), c| {
        (r + c.read_units, w + c.write_units)
    })
}

fn balanced(held: &BTreeMap<String, usize>, leases: usize) -> bool {
    let total: usize = held.values().sum();
    let (min, max) = (
        held.values().min().copied().unwrap_or(0),
        held.values().max().copied().unwrap_or(0),
    );
    total == leases && max - min <= 1
}

/// Runs one cell.
pub async fn run(cell: Cell) -> anyhow::Result<Measured> {
    let store = MemLeaseStore::new();
    for i in 0..cell.leases {
        store.create_if_absent(&lease(i, cell.leases)).await?;
    }
    let mut cfg = WorkerConfig::new("bench", "stream");
    cfg.lease_liveness = cell.liveness;
    let mut fleet = ProtocolFleet::new(store.clone(), cfg);
    let started = Instant::now();
    for w in 0..cell.workers {
        let offset = Duration::from_millis((w as u64 * 7919) % 2000);
        tokio::time::sleep_until(started + offset).await;
        fleet.start(&format!("worker-{w:03}")).await;
    }
    let mut balanced_after = None;
    while started.elapsed() < Duration::from_secs(900) {
        if balanced(&fleet.held(), cell.leases) {
            balanced_after = Some(started.elapsed());
            break;
        }
        if std::env::var_os("KCL_BENCH_TRACE").is_some() && started.elapsed().as_secs() % 10 == 0 {
            let held = fleet.held();
            let mut counts: Vec<usize> = held.values().copied().collect();
            counts.sort_unstable();
            eprintln!(
                "{:>4} s: {} held, counts {:?}",
                started.elapsed().as_secs(),
                counts.iter().sum::<usize>(),
                counts
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(30)).await;

    // Steady state: the window's units by purpose, and per second.
    let before = (sum(store.capacity()), sum(fleet.sync_capacity()));
    let per_second = Arc::new(Mutex::new(Vec::<(f64, f64)>::new()));
    let sampler = {
        let (store, sync, per_second) = (
            store.clone(),
            fleet.sync_capacity().clone(),
            per_second.clone(),
        );
        tokio::spawn(async move {
            let mut last = {
                let (a, b) = (units(&sum(store.capacity())), units(&sum(&sync)));
                (a.0 + b.0, a.1 + b.1)
            };
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (a, b) = (units(&sum(store.capacity())), units(&sum(&sync)));
                let now = (a.0 + b.0, a.1 + b.1);
                if let Ok(mut v) = per_second.lock() {
                    v.push((now.0 - last.0, now.1 - last.1));
                }
                last = now;
            }
        })
    };
    let cpu_before = process_cpu();
    let rounds_before = fleet.taker_rounds();
    tokio::time::sleep(cell.window).await;
    let cpu = process_cpu().saturating_sub(cpu_before);
    let rounds_after = fleet.taker_rounds();
    let timed = rounds_after.0.saturating_sub(rounds_before.0).max(1);
    let round_mean = rounds_after.1.saturating_sub(rounds_before.1) / timed as u32;
    let round_max = rounds_after.2;
    sampler.abort();
    let after = (sum(store.capacity()), sum(fleet.sync_capacity()));
    let rounds = rounds(&after.0, cell.liveness).saturating_sub(rounds(&before.0, cell.liveness));
    let cpu_per_round = cpu / rounds.max(1) as u32;
    let lease_hours = cell.leases as f64 * cell.window.as_secs_f64() / 3600.0;
    let mut by_purpose: BTreeMap<&'static str, f64> = BTreeMap::new();
    for (op, a) in &after.0 {
        let b = before.0.get(op).copied().unwrap_or_default();
        *by_purpose.entry(purpose(op)).or_default() += (a.units() - b.units()) / lease_hours;
    }
    let sync: f64 = after
        .1
        .iter()
        .map(|(op, a)| a.units() - before.1.get(op).copied().unwrap_or_default().units())
        .sum();
    *by_purpose.entry("shard sync").or_default() += sync / lease_hours;
    by_purpose.entry("parent checks").or_default();
    let total = by_purpose
        .iter()
        .filter(|(p, _)| **p != "checkpoints")
        .map(|(_, v)| v)
        .sum();
    let seconds = per_second.lock().map(|v| v.clone()).unwrap_or_default();
    let busiest_reads = seconds.iter().map(|s| s.0).fold(0.0, f64::max);
    let busiest_writes = seconds.iter().map(|s| s.1).fold(0.0, f64::max);

    // Crash failover.
    let mut failovers = Vec::new();
    for trial in 0..cell.trials {
        tokio::time::sleep(Duration::from_millis(1_000 + trial as u64 * 677)).await;
        let running = fleet.running();
        let victim = running[(trial * 7 + 1) % running.len()].clone();
        fleet.crash(&victim);
        let crashed = Instant::now();
        let mut recovered = None;
        while crashed.elapsed() < Duration::from_secs(120) {
            if fleet.held().values().sum::<usize>() == cell.leases {
                recovered = Some(crashed.elapsed());
                break;
            }
            if std::env::var_os("KCL_BENCH_TRACE").is_some() {
                eprintln!(
                    "  failover {trial} +{:.1} s: {:?}",
                    crashed.elapsed().as_secs_f64(),
                    fleet.held()
                );
                if crashed.elapsed() > Duration::from_secs(15) {
                    for l in fleet.unheld().iter().take(3) {
                        eprintln!(
                            "    unheld {} owner {:?} cp {:?} counter {}",
                            l.key, l.owner, l.checkpoint_owner, l.counter
                        );
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        failovers.push(recovered.map_or(f64::INFINITY, |d| d.as_secs_f64()));
        // Back to full strength, and balanced, before the next trial.
        fleet.start(&format!("{victim}-again-{trial}")).await;
        let restarted = Instant::now();
        while restarted.elapsed() < Duration::from_secs(600)
            && !balanced(&fleet.held(), cell.leases)
        {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    failovers.sort_by(f64::total_cmp);
    fleet.stop_all().await;
    let item_bytes = capacity::item_size(&kcl::lease::item::encode(&lease(1, cell.leases)));
    Ok(Measured {
        item_bytes,
        by_purpose,
        total,
        busiest_reads,
        busiest_writes,
        failovers,
        balanced_after,
        cpu_per_round,
        round_mean,
        round_max,
    })
}

/// The Java KCL 2.x at its defaults, computed on the same items: every lease renewed every
/// 10 s / 3, every worker scanning the table (eventually consistent) every 20 s. Per lease-hour,
/// and its busiest second (renewals spread evenly; every scan of the second at once).
pub fn java(leases: usize, workers: usize, item_bytes: usize) -> (f64, f64, f64) {
    let renew = 3600.0 / (10.0 / 3.0) * capacity::write_units(item_bytes);
    let scan_units = capacity::read_units(leases * item_bytes, false);
    let scans = workers as f64 * 180.0 * scan_units / leases as f64;
    let busiest_writes = leases as f64 * capacity::write_units(item_bytes) / (10.0 / 3.0);
    let busiest_reads = (workers as f64 / 20.0).ceil() * scan_units;
    (renew + scans, busiest_writes, busiest_reads)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
