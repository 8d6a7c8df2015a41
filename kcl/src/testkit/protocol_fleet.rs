//! A fleet that runs the lease protocol alone — each worker's heartbeat (or renewer), taker and
//! periodic shard-sync read, with leases held by stand-in consumers instead of processors — so
//! that fleets of thousands of shards and hundreds of workers can be measured under tokio's
//! paused clock: capacity units by purpose, the busiest second, failover times.
//!
//! A stand-in consumer holds its lease until it is lost, and hands it over at once when a peer
//! asks (a processor that checkpoints instantly). Nothing reads Kinesis. With
//! [`ProtocolFleet::with_traffic`] a stand-in also "receives" its shard's bytes every second
//! and checkpoints every 10 s, so the fleet balances by load as a real one would.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::MemLeaseStore;
use crate::config::WorkerConfig;
use crate::lease::capacity::CapacityMeter;
use crate::lease::coordinator::{HeldLease, LeaseCoordinator};
use crate::lease::write::LeaseWrite;
use crate::lease::{LeaseKey, LeaseStore, WorkerId};
use crate::record::{ExtendedSequenceNumber, SequenceNumber};

/// A stand-in consumer's traffic: `rate` bytes counted every second, a checkpoint every 10 s
/// (which stores the measured throughput in the lease). Never returns while traffic flows.
async fn receive(held: &HeldLease, store: &MemLeaseStore, rate: u64) {
    if rate == 0 {
        return std::future::pending().await;
    }
    let mut position = held
        .snapshot()
        .await
        .checkpoint
        .sequence()
        .map_or(1u128, |s| s.as_str().parse::<u128>().unwrap_or(1));
    let mut tick = 0u64;
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        held.count_bytes(rate);
        tick += 1;
        if tick % 10 == 0 {
            position += 1;
            let Ok(seq) = SequenceNumber::parse(&position.to_string()) else {
                continue;
            };
            let write = LeaseWrite::Checkpoint {
                position: ExtendedSequenceNumber::at(seq, 0),
                children: Vec::new(),
            };
            let _ = held.write(store, write).await;
        }
    }
}

/// A fleet of lease-protocol-only workers over one in-memory lease table.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// use kcl::lease::{Lease, LeaseStore};
/// use kcl::testkit::{MemLeaseStore, ProtocolFleet};
/// use kcl::{ExtendedSequenceNumber, ShardId, WorkerConfig};
///
/// let store = MemLeaseStore::new();
/// for i in 0..8 {
///     let shard = ShardId::new(format!("shardId-{i:012}"));
///     store.create_if_absent(&Lease::new(&shard, ExtendedSequenceNumber::TrimHorizon)).await.unwrap();
/// }
/// let mut fleet = ProtocolFleet::new(store, WorkerConfig::new("app", "stream"));
/// fleet.start("w1").await;
/// fleet.start("w2").await;
/// tokio::time::sleep(std::time::Duration::from_secs(30)).await;
/// assert_eq!(fleet.held().values().sum::<usize>(), 8);
/// fleet.stop_all().await;
/// # }
/// ```
#[derive(Debug)]
pub struct ProtocolFleet {
    store: MemLeaseStore,
    /// The shard-sync reads are metered apart.
    sync_meter: CapacityMeter,
    config: WorkerConfig,
    workers: BTreeMap<String, Running>,
    /// Bytes per second each lease's shard carries.
    traffic: Arc<BTreeMap<LeaseKey, u64>>,
}

#[derive(Debug)]
struct Running {
    coordinator: Arc<LeaseCoordinator>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl ProtocolFleet {
    /// A fleet over `store`; every worker gets `config` with its own id.
    pub fn new(store: MemLeaseStore, config: WorkerConfig) -> Self {
        Self {
            store,
            sync_meter: CapacityMeter::default(),
            config,
            workers: BTreeMap::new(),
            traffic: Arc::default(),
        }
    }

    /// Gives each lease's shard a traffic in bytes per second (the others carry none).
    pub fn with_traffic(mut self, traffic: BTreeMap<LeaseKey, u64>) -> Self {
        self.traffic = Arc::new(traffic);
        self
    }

    /// What the periodic shard-sync reads cost (apart from the store's own meter).
    pub fn sync_capacity(&self) -> &CapacityMeter {
        &self.sync_meter
    }

    /// Starts worker `id`: registers its liveness item, then runs its heartbeat, taker and
    /// shard-sync read.
    pub async fn start(&mut self, id: &str) {
        let mut cfg = self.config.clone();
        cfg.worker_id = WorkerId::new(id);
        let store: Arc<dyn LeaseStore> = Arc::new(self.store.clone());
        let coordinator = Arc::new(LeaseCoordinator::new(store, cfg.worker_id.clone(), &cfg));
        let stop = CancellationToken::new();
        coordinator.start_liveness(&stop).await;
        let (tx, mut rx) = mpsc::channel::<Arc<HeldLease>>(64);
        let mut tasks = vec![
            tokio::spawn(coordinator.clone().run_renewer(stop.clone())),
            tokio::spawn(coordinator.clone().run_taker(tx, stop.clone())),
        ];
        // Stand-in consumers: hold each lease until lost; hand it over when asked.
        let (c, s) = (coordinator.clone(), stop.clone());
        let store = self.store.clone();
        let traffic = self.traffic.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(held) = rx.recv().await {
                let (c, s, store) = (c.clone(), s.clone(), store.clone());
                let rate = traffic.get(held.key()).copied().unwrap_or(0);
                tokio::spawn(async move {
                    let receive = receive(&held, &store, rate);
                    tokio::select! {
                        _ = s.cancelled() => return,
                        _ = receive => {}
                        _ = held.lost_token().cancelled() => {}
                        _ = held.handoff_token().cancelled() => {
                            if let Some(to) = held.handoff_to() {
                                let _ = held.write_final(&store, LeaseWrite::CompleteHandoff { to }).await;
                            }
                        }
                    }
                    c.forget(held.key());
                });
            }
        }));
        // The periodic shard sync reads the lease table (on the leader only, with liveness).
        let sync_store = self.store.with_meter(self.sync_meter.clone());
        let (c, s, every) = (
            coordinator.clone(),
            stop.clone(),
            self.config.shard_sync_interval,
        );
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = s.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                match c.liveness() {
                    Some(l) if !l.is_leader() => {}
                    Some(_) => {
                        let _ = sync_store.list_eventually().await;
                    }
                    None => {
                        let _ = sync_store.list().await;
                    }
                }
            }
        }));
        self.workers.insert(
            id.to_owned(),
            Running {
                coordinator,
                stop,
                tasks,
            },
        );
    }

    /// Kills worker `id` (nothing released, its heartbeat stops).
    pub fn crash(&mut self, id: &str) {
        if let Some(w) = self.workers.remove(id) {
            w.stop.cancel();
            for t in w.tasks {
                t.abort();
            }
        }
    }

    /// Stops every worker gracefully: each releases its leases and removes its item.
    pub async fn stop_all(&mut self) {
        for (_, w) in std::mem::take(&mut self.workers) {
            w.stop.cancel();
            for t in &w.tasks {
                t.abort();
            }
            for held in w.coordinator.held() {
                let _ = held.write_final(&self.store, LeaseWrite::Release).await;
            }
            w.coordinator.deregister().await;
        }
    }

    /// Taker rounds of the running workers so far: how many, their total and their longest
    /// time (wall clock: under paused time with this in-memory store, the CPU they took).
    pub fn taker_rounds(&self) -> (u64, std::time::Duration, std::time::Duration) {
        self.workers.values().fold(Default::default(), |acc, w| {
            let (n, total, max) = w.coordinator.taker_rounds();
            (acc.0 + n, acc.1 + total, acc.2.max(max))
        })
    }

    /// Each running worker's leases.
    pub fn held_keys(&self) -> BTreeMap<String, Vec<LeaseKey>> {
        self.workers
            .iter()
            .map(|(id, w)| {
                let keys = w
                    .coordinator
                    .held()
                    .iter()
                    .map(|h| h.key().clone())
                    .collect();
                (id.clone(), keys)
            })
            .collect()
    }

    /// The leases each running worker holds.
    pub fn held(&self) -> BTreeMap<String, usize> {
        self.workers
            .iter()
            .map(|(id, w)| (id.clone(), w.coordinator.held().len()))
            .collect()
    }

    /// The leases the table shows that no running worker holds, as the table shows them.
    pub fn unheld(&self) -> Vec<crate::lease::Lease> {
        let held: std::collections::BTreeSet<crate::lease::LeaseKey> = self
            .workers
            .values()
            .flat_map(|w| w.coordinator.held())
            .map(|h| h.key().clone())
            .collect();
        self.store
            .leases()
            .into_iter()
            .filter(|l| !held.contains(&l.key))
            .collect()
    }

    /// Each lease's owner as the table shows it (during a handoff: the new owner).
    pub fn owners(&self) -> BTreeMap<LeaseKey, Option<WorkerId>> {
        self.store
            .leases()
            .into_iter()
            .map(|l| (l.key, l.owner))
            .collect()
    }

    /// The bytes per second each running worker's leases carry (by the table's owners and
    /// the fleet's traffic).
    pub fn load(&self) -> BTreeMap<String, u64> {
        let mut load: BTreeMap<String, u64> =
            self.workers.keys().map(|id| (id.clone(), 0)).collect();
        for (key, owner) in self.owners() {
            if let Some(l) = owner.and_then(|o| load.get_mut(o.as_str())) {
                *l += self.traffic.get(&key).copied().unwrap_or(0);
            }
        }
        load
    }

    /// The running workers' ids.
    pub fn running(&self) -> Vec<String> {
        self.workers.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::lease::Lease;
    use crate::shard::ShardId;

    /// 16 shards of which 4 carry 10× the traffic, 4 workers: once settled the busiest worker
    /// carries at most 1.3× the idlest's bytes per second, and no lease moved twice within
    /// 5 minutes.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_fleet_balances_bytes_not_only_leases() {
        let store = MemLeaseStore::new();
        let mut traffic = BTreeMap::new();
        for i in 0..16 {
            let lease = Lease::new(
                &ShardId::new(format!("shardId-{i:012}")),
                ExtendedSequenceNumber::TrimHorizon,
            );
            // Shards 0, 1, 2 and 3 are hot: the first workers to start take two each.
            traffic.insert(lease.key.clone(), if i < 4 { 100_000 } else { 10_000 });
            store.create_if_absent(&lease).await.unwrap();
        }
        let mut fleet =
            ProtocolFleet::new(store, WorkerConfig::new("app", "stream")).with_traffic(traffic);
        for w in 0..4 {
            fleet.start(&format!("w{w}")).await;
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        let started = Instant::now();
        let mut last_move: BTreeMap<LeaseKey, (String, Instant)> = BTreeMap::new();
        let mut moves = 0;
        let mut log = Vec::new();
        let mut ratio = f64::INFINITY;
        while started.elapsed() < Duration::from_secs(20 * 60) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for (key, owner) in fleet.owners() {
                let Some(worker) = owner.map(|o| o.to_string()) else {
                    continue;
                };
                {
                    match last_move.get(&key) {
                        Some((owner, _)) if *owner == worker => {}
                        Some((_, at)) => {
                            // The first placement (and the count balancing right after the
                            // start) aside, a lease moves at most once per 5 minutes.
                            assert!(
                                started.elapsed() < Duration::from_secs(60)
                                    || at.elapsed() >= Duration::from_secs(300),
                                "{key} moved twice within {:?}: {log:#?}",
                                at.elapsed()
                            );
                            moves += 1;
                            log.push(format!(
                                "{:>5.0} s {key}: {:?} -> {worker}",
                                started.elapsed().as_secs_f64(),
                                last_move.get(&key).map(|m| m.0.clone())
                            ));
                            last_move.insert(key, (worker.clone(), Instant::now()));
                        }
                        None => {
                            last_move.insert(key, (worker.clone(), Instant::now()));
                        }
                    }
                }
            }
            let load = fleet.load();
            let (max, min) = (
                load.values().copied().max().unwrap_or(0),
                load.values().copied().min().unwrap_or(0),
            );
            ratio = max as f64 / min.max(1) as f64;
        }
        let load = fleet.load();
        fleet.stop_all().await;
        assert!(
            ratio <= 1.3,
            "busiest / idlest = {ratio:.2}: {load:?} after {moves} moves: {log:#?}"
        );
    }
}
