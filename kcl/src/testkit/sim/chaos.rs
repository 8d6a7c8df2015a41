//! The chaos schedule: what the driver does to the fleet during the chaos phase, drawn from
//! the run's RNG, and the scripted [`Verb`]s.
//!
//! Two streams of events, each with exponential gaps:
//! - the main one draws crashes, graceful stops, partitions from the lease table, throttling,
//!   latency, lost responses, Kinesis throttling and reshards from the sim's main RNG;
//! - the second draws failing processors and requested handoffs from its own RNG, and may
//!   follow a processor failure with a graceful stop, a handoff or a crash of that machine
//!   (what DESIGN §2.7 is about: whatever follows a failure, the next owner starts at the first
//!   record not processed).

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::driver::{Action, Driver, Heal};
use super::log::Event;
use super::net::{FailKind, LinkFaults, Net, Partition, ProcessorFault, SimLeaseStore};
use super::scenario::Verb;
use super::STREAM;
use crate::lease::{LeaseKey, LeaseStore, WorkerId};
use crate::retrieval::KinesisApi;
use crate::shard::{HashKeyRange, ShardId};

/// The kinds of the main stream, in the order of [`super::FaultRates`]' weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Crash,
    Stop,
    Partition,
    Throttle,
    Latency,
    ResponseLoss,
    Kinesis,
    Reshard,
}

const KINDS: [Kind; 8] = [
    Kind::Crash,
    Kind::Stop,
    Kind::Partition,
    Kind::Throttle,
    Kind::Latency,
    Kind::ResponseLoss,
    Kind::Kinesis,
    Kind::Reshard,
];

/// The index `x` (in `0..sum(weights)`) falls on, walking the weights in order; `None` if the
/// weights are all zero.
pub(crate) fn weighted(weights: &[u32], mut x: u32) -> Option<usize> {
    for (k, w) in weights.iter().enumerate() {
        if x < *w {
            return Some(k);
        }
        x -= w;
    }
    None
}

/// An exponential gap with mean `mean` seconds, capped at 5 means (`u` uniform in (0, 1)).
fn exponential_gap(mean: f64, u: f64) -> Duration {
    Duration::from_secs_f64((-u.ln() * mean).min(mean * 5.0))
}

fn millis(rng: &mut ChaCha8Rng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.random_range(lo..=hi.max(lo)))
}

impl Driver {
    pub(crate) fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        millis(&mut self.rng, lo, hi)
    }

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.sim.timing.lease_duration.as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn chaos_gap(&mut self) -> Duration {
        let u: f64 = self.rng.random_range(1e-6..1.0);
        exponential_gap(60.0 / self.sim.faults.events_per_minute, u)
    }

    pub(crate) fn extra_gap(&mut self) -> Duration {
        let u: f64 = self.extra.random_range(1e-6..1.0);
        exponential_gap(60.0 / self.sim.faults.extra_per_minute(), u)
    }

    /// One event of the main stream.
    pub(crate) async fn chaos(&mut self) {
        let weights = self.sim.faults.weights();
        let total: u32 = weights.iter().sum();
        if total == 0 {
            return;
        }
        let x = self.rng.random_range(0..total);
        let kind = weighted(&weights, x).map_or(Kind::Crash, |k| KINDS[k]);
        let lease_ms = self.lease_ms();
        let slot = self.rng.random_range(0..self.slots.len());
        match kind {
            Kind::Crash => {
                let running = self.running();
                if running.is_empty() {
                    return;
                }
                let i = running[self.rng.random_range(0..running.len())];
                self.crash(i);
                let d = self.millis(200, 2 * lease_ms);
                self.schedule(d, Action::Start(i));
            }
            Kind::Stop => {
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
            Kind::Partition => {
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
            Kind::Throttle => {
                let p = self.rng.random_range(0.2..0.95);
                let d = self.millis(lease_ms / 4, lease_ms * 3);
                self.set_fault(slot, format!("throttle {p:.2} for {d:?}"), |l| {
                    l.throttle = p
                });
                self.stats.link_faults += 1;
                self.schedule(d, Action::Heal(slot, Heal::Throttle));
            }
            Kind::Latency => {
                // Sometimes beyond the lease duration: writes then succeed after the lease could expire.
                let max = self.millis(5, lease_ms * 3 / 2);
                let d = self.millis(lease_ms / 4, lease_ms * 3);
                self.set_fault(slot, format!("latency up to {max:?} for {d:?}"), |l| {
                    l.latency = max
                });
                self.stats.link_faults += 1;
                self.schedule(d, Action::Heal(slot, Heal::Latency));
            }
            Kind::ResponseLoss => {
                let p = self.rng.random_range(0.05..0.5);
                let d = self.millis(lease_ms / 4, lease_ms * 3);
                self.set_fault(slot, format!("lose responses {p:.2} for {d:?}"), |l| {
                    l.response_loss = p
                });
                self.stats.link_faults += 1;
                self.schedule(d, Action::Heal(slot, Heal::ResponseLoss));
            }
            Kind::Kinesis => {
                let p = self.rng.random_range(0.2..0.9);
                let d = self.millis(1000, 20_000);
                self.set_fault(slot, format!("kinesis throttle {p:.2} for {d:?}"), |l| {
                    l.kinesis_throttle = p
                });
                self.stats.link_faults += 1;
                self.schedule(d, Action::Heal(slot, Heal::Kinesis));
            }
            Kind::Reshard => self.reshard().await,
        }
    }

    /// One event of the second stream: a machine's processors fail for a while (maybe followed
    /// by a stop, a handoff or a crash), or a lease is handed over gracefully.
    pub(crate) async fn chaos_extra(&mut self) {
        let f = &self.sim.faults;
        let (follow, weights) = (f.follow, [f.processor, f.handoff, f.drain]);
        let total: u32 = weights.iter().sum();
        if total == 0 {
            return;
        }
        let x = self.extra.random_range(0..total);
        let running = self.running();
        if running.is_empty() {
            return;
        }
        let slot = running[self.extra.random_range(0..running.len())];
        match weighted(&weights, x) {
            Some(1) => {
                self.random_handoff(None);
                return;
            }
            Some(2) => {
                self.drain(slot).await;
                return;
            }
            _ => {}
        }
        let kind = match self.extra.random_range(0..8) {
            0..=3 => FailKind::Retryable,
            4..=6 => FailKind::Fatal,
            _ => FailKind::Panic,
        };
        let p = self.extra.random_range(0.3..=1.0);
        let lease_ms = self.lease_ms();
        let d = millis(&mut self.extra, 500, (2 * lease_ms).max(3000));
        self.set_fault(
            slot,
            format!("processors fail ({kind:?}, {p:.2}) for {d:?}"),
            |l| l.processor = Some(ProcessorFault { kind, p }),
        );
        self.stats.processor_faults += 1;
        self.schedule(d, Action::Heal(slot, Heal::Processor));
        if follow > 0.0 && self.extra.random_bool(follow.min(1.0)) {
            let after = millis(&mut self.extra, 100, d.as_millis().min(3000) as u64);
            self.schedule(after, Action::Follow(slot));
        }
    }

    /// An operator drains `slot`'s worker (as `kcl drain` does: a write to its worker item,
    /// not through the worker's network), and cancels the drain one to four lease durations
    /// later. Java workers have no item to drain.
    async fn drain(&mut self, slot: usize) {
        let id = self.slots[slot].id.clone();
        let Some(item) = self.leases.workers().into_iter().find(|w| w.worker == id) else {
            return;
        };
        if item.fenced_by.is_some() || item.is_draining() {
            return;
        }
        let at = u64::try_from(self.rec.now().as_millis()).unwrap_or(u64::MAX);
        if self
            .leases
            .set_draining(&id, item.incarnation, Some(at.max(1)))
            .await
            .is_ok()
        {
            self.rec.push(Event::Fault {
                slot,
                what: format!("drained (incarnation {})", item.incarnation),
            });
            self.stats.drains += 1;
            let lease_ms = self.lease_ms();
            let d = millis(&mut self.extra, lease_ms, 4 * lease_ms);
            self.schedule(d, Action::Undrain(slot));
        }
    }

    /// Cancels any drain of `slot`'s worker (its current incarnation, if it restarted).
    pub(crate) async fn undrain(&mut self, slot: usize) {
        let id = self.slots[slot].id.clone();
        let Some(item) = self.leases.workers().into_iter().find(|w| w.worker == id) else {
            return;
        };
        if item.is_draining()
            && self
                .leases
                .set_draining(&id, item.incarnation, None)
                .await
                .is_ok()
        {
            self.rec.push(Event::Fault {
                slot,
                what: "drain cancelled".to_owned(),
            });
        }
    }

    /// What follows a processor failure on `slot`: a graceful stop, a handoff of one of its
    /// leases, or a crash.
    pub(crate) fn follow(&mut self, slot: usize) {
        if !self.running().contains(&slot) {
            return;
        }
        let lease_ms = self.lease_ms();
        match self.extra.random_range(0..3) {
            0 => {
                self.stop(slot);
                self.stats.follow_stops += 1;
                let d = millis(&mut self.extra, 500, 10_000);
                self.schedule(d, Action::Start(slot));
            }
            1 => {
                if self.random_handoff(Some(slot)) {
                    self.stats.follow_handoffs += 1;
                }
            }
            _ => {
                self.crash(slot);
                self.stats.follow_crashes += 1;
                let d = millis(&mut self.extra, 200, 2 * lease_ms);
                self.schedule(d, Action::Start(slot));
            }
        }
    }

    /// Hands a random active lease (of `from`'s worker, if given) owned by a running worker to
    /// another running worker. Returns whether a request was sent.
    fn random_handoff(&mut self, from: Option<usize>) -> bool {
        let running = self.running();
        let live: BTreeSet<WorkerId> = running.iter().map(|&i| self.slots[i].id.clone()).collect();
        let from_id = from.map(|i| self.slots[i].id.clone());
        let candidates: Vec<(LeaseKey, WorkerId)> = self
            .leases
            .leases()
            .into_iter()
            .filter(|l| !l.is_finished() && l.checkpoint_owner.is_none())
            .filter_map(|l| Some((l.key, l.owner?)))
            .filter(|(_, o)| live.contains(o) && from_id.as_ref().is_none_or(|f| f == o))
            .collect();
        if candidates.is_empty() {
            return false;
        }
        let (key, owner) = candidates[self.extra.random_range(0..candidates.len())].clone();
        let targets: Vec<usize> = running
            .into_iter()
            .filter(|&i| self.slots[i].id != owner)
            .collect();
        if targets.is_empty() {
            return false;
        }
        let to = targets[self.extra.random_range(0..targets.len())];
        self.request_handoff(&key, to)
    }

    /// Asks the owner of `key` to hand it over to slot `to`, as `to`'s taker does when it
    /// steals: a `request_handoff` through `to`'s network, logged as `to`'s write. It runs as
    /// a task, so that a slow or partitioned network does not hold the agenda up.
    pub(crate) fn request_handoff(&mut self, key: &LeaseKey, to: usize) -> bool {
        let Some(inc) = self.slots[to]
            .run
            .as_ref()
            .filter(|r| !r.stopping)
            .map(|r| r.inc)
        else {
            return false;
        };
        let to_id = self.slots[to].id.clone();
        let Some(lease) = self.leases.leases().into_iter().find(|l| l.key == *key) else {
            return false;
        };
        if lease.is_finished()
            || lease.checkpoint_owner.is_some()
            || lease.owner.as_ref().is_none_or(|o| *o == to_id)
        {
            return false;
        }
        // Not the incarnation's own network state: the request is not one of its tasks (it
        // must neither halt as a zombie nor count as one if `to` crashes meanwhile).
        let store = SimLeaseStore {
            inner: self.leases.clone(),
            net: Net {
                link: self.slots[to].link.clone(),
                dead: Arc::new(AtomicBool::new(false)),
                run_dropped: Arc::new(AtomicBool::new(false)),
                inc,
                rec: self.rec.clone(),
                tainted: Arc::new(AtomicBool::new(false)),
            },
        };
        self.rec.push(Event::Fault {
            slot: to,
            what: format!("asks for {key} (held by {:?})", lease.owner),
        });
        // As the taker does: the lease is read (above), the owner's liveness item is told
        // (it must not miss the request), then the lease as read is asked for — so the owner's
        // answer to the notice, a renewal, makes the request fail whenever it lands.
        let owner_item = lease
            .owner
            .as_ref()
            .and_then(|o| self.leases.workers().into_iter().find(|w| &w.worker == o));
        let nonce = self.extra.random::<u64>();
        tokio::spawn(async move {
            if let Some(item) = owner_item {
                let notice = crate::lease::liveness::HandoffNotice::new(lease.key.clone(), nonce);
                if store
                    .notify_handoff(&item.worker, item.incarnation, &notice)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = store.request_handoff(&lease, &to_id).await;
        });
        self.stats.handoff_requests += 1;
        true
    }

    pub(crate) fn set_fault(&mut self, slot: usize, what: String, f: impl FnOnce(&mut LinkFaults)) {
        {
            let mut link = self.slots[slot]
                .link
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            f(&mut link.faults);
        }
        self.rec.push(Event::Fault { slot, what });
    }

    pub(crate) fn heal(&mut self, slot: usize, what: Heal) {
        self.set_fault(slot, format!("heal {what:?}"), |l| match what {
            Heal::Partition => l.partition = None,
            Heal::Throttle => l.throttle = 0.0,
            Heal::Latency => l.latency = Duration::ZERO,
            Heal::ResponseLoss => l.response_loss = 0.0,
            Heal::Kinesis => l.kinesis_throttle = 0.0,
            Heal::Processor => l.processor = None,
        });
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
        match self.rng.random_range(0..3) {
            0 if open.len() < max => {
                let (id, r) = open[self.rng.random_range(0..open.len())].clone();
                if r.end() == r.start() {
                    return;
                }
                let at = self.rng.random_range(r.start() + 1..=r.end());
                self.split(&id, at);
            }
            1 if open.len() > 1 => {
                let k = self.rng.random_range(0..open.len() - 1);
                let (a, b) = (open[k].0.clone(), open[k + 1].0.clone());
                self.merge(&a, &b);
            }
            2 => {
                let n = open.len();
                let lo = n.div_ceil(2).max(1);
                let hi = (2 * n).min(max);
                let target = self.rng.random_range(lo..=hi);
                if target == n {
                    return;
                }
                self.scale_to(target);
            }
            _ => {}
        }
    }

    fn split(&mut self, id: &ShardId, at: u128) {
        let (a, b) = self.kinesis.split(STREAM, id, at);
        self.rec
            .push(Event::Reshard(format!("split {id} -> {a}, {b}")));
        self.stats.reshards += 1;
        self.stats.splits += 1;
    }

    fn merge(&mut self, a: &ShardId, b: &ShardId) {
        let c = self.kinesis.merge(STREAM, a, b);
        self.rec
            .push(Event::Reshard(format!("merge {a} + {b} -> {c}")));
        self.stats.reshards += 1;
        self.stats.merges += 1;
    }

    fn scale_to(&mut self, target: usize) {
        let n = self.kinesis.open_shard_ids(STREAM).len();
        self.kinesis.update_shard_count(STREAM, target);
        self.rec.push(Event::Reshard(format!(
            "update_shard_count {n} -> {target}"
        )));
        self.stats.reshards += 1;
        self.stats.scales += 1;
    }

    /// Runs a scripted verb.
    pub(crate) fn verb(&mut self, verb: Verb) {
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
            Verb::Split(id, at) => self.split(&id, at),
            Verb::Merge(a, b) => self.merge(&a, &b),
            Verb::ScaleTo(target) => self.scale_to(target.max(1)),
            Verb::Handoff(shard, i) => {
                self.request_handoff(&LeaseKey::for_shard(&shard), slot(i));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_walks_the_weights_in_order() {
        let w = [2, 0, 3];
        let picks: Vec<Option<usize>> = (0..6).map(|x| weighted(&w, x)).collect();
        assert_eq!(
            picks,
            [Some(0), Some(0), Some(2), Some(2), Some(2), None],
            "x beyond the total picks nothing"
        );
        assert_eq!(weighted(&[0, 0], 0), None);
    }

    #[test]
    fn gaps_are_capped_at_five_means() {
        assert_eq!(exponential_gap(2.0, 1e-9), Duration::from_secs(10));
        assert!(exponential_gap(2.0, 0.5) < Duration::from_secs(2));
    }
}
