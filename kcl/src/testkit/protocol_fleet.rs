//! A fleet that runs the lease protocol alone — each worker's heartbeat (or renewer), taker and
//! periodic shard-sync read, with leases held by stand-in consumers instead of processors — so
//! that fleets of thousands of shards and hundreds of workers can be measured under tokio's
//! paused clock: capacity units by purpose, the busiest second, failover times.
//!
//! A stand-in consumer holds its lease until it is lost, and hands it over at once when a peer
//! asks (a processor that checkpoints instantly). Nothing reads Kinesis.

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
use crate::lease::{LeaseStore, WorkerId};

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
        }
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
        tasks.push(tokio::spawn(async move {
            while let Some(held) = rx.recv().await {
                let (c, s, store) = (c.clone(), s.clone(), store.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = s.cancelled() => return,
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

    /// The running workers' ids.
    pub fn running(&self) -> Vec<String> {
        self.workers.keys().cloned().collect()
    }
}
