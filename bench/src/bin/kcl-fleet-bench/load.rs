//! Balancing by load (issue 10, item 4): 16 shards of which 4 carry 10× the traffic, 4 workers
//! started together, the lease protocol alone ([`ProtocolFleet`]) with stand-in consumers that
//! receive their shard's bytes; balancing by count alone beside balancing by load.

use std::collections::BTreeMap;
use std::time::Duration;

use kcl::lease::{Lease, LeaseKey, LeaseStore};
use kcl::testkit::{MemLeaseStore, ProtocolFleet};
use kcl::{ExtendedSequenceNumber, ShardId, WorkerConfig};
use tokio::time::Instant;

/// What one run measured.
pub struct Measured {
    /// Busiest / idlest worker's bytes per second at the end.
    pub ratio: f64,
    /// The first time the ratio was ≤ 1.3 and stayed so to the end.
    pub settled_after: Option<Duration>,
    /// Owner changes after the first minute.
    pub moves: usize,
    /// The fewest seconds between two moves of one lease (after the first minute).
    pub shortest_stay: Option<Duration>,
}

pub async fn run(by_load: bool, minutes: u64) -> anyhow::Result<Measured> {
    let store = MemLeaseStore::new();
    let mut traffic = BTreeMap::new();
    for i in 0..16 {
        let lease = Lease::new(
            &ShardId::new(format!("shardId-{i:012}")),
            ExtendedSequenceNumber::TrimHorizon,
        );
        // 1 MB/s on 4 shards, 100 KB/s on the others.
        traffic.insert(
            lease.key.clone(),
            if i % 4 == 0 { 1_000_000 } else { 100_000 },
        );
        store.create_if_absent(&lease).await?;
    }
    let mut cfg = WorkerConfig::new("bench", "stream");
    cfg.balance_by_load = by_load;
    let mut fleet = ProtocolFleet::new(store, cfg).with_traffic(traffic);
    for w in 0..4 {
        fleet.start(&format!("worker-{w}")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let started = Instant::now();
    let mut owners: BTreeMap<LeaseKey, (Option<kcl::WorkerId>, Instant)> = BTreeMap::new();
    let (mut moves, mut shortest_stay) = (0, None::<Duration>);
    let mut settled_at = None;
    let mut ratio = f64::INFINITY;
    while started.elapsed() < Duration::from_secs(60 * minutes) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (key, owner) in fleet.owners() {
            match owners.get(&key) {
                Some((o, _)) if *o == owner => {}
                Some((_, since)) => {
                    if started.elapsed() > Duration::from_secs(60) {
                        moves += 1;
                        let stay = since.elapsed();
                        shortest_stay = Some(shortest_stay.map_or(stay, |s| s.min(stay)));
                    }
                    owners.insert(key, (owner, Instant::now()));
                }
                None => {
                    owners.insert(key, (owner, Instant::now()));
                }
            }
        }
        let load = fleet.load();
        let max = load.values().copied().max().unwrap_or(0);
        let min = load.values().copied().min().unwrap_or(0);
        ratio = max as f64 / min.max(1) as f64;
        match (ratio <= 1.3, settled_at) {
            (true, None) => settled_at = Some(started.elapsed()),
            (false, Some(_)) => settled_at = None,
            _ => {}
        }
    }
    fleet.stop_all().await;
    Ok(Measured {
        ratio,
        settled_after: settled_at,
        moves,
        shortest_stay,
    })
}
