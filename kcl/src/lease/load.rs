//! Balancing by load: how busy a shard is, and which lease to move so the busiest and the
//! idlest worker of a fleet carry similar bytes per second.
//!
//! Each owner measures the bytes per second its processor receives from each shard
//! ([`ThroughputMeter`], a decaying average over about a minute), stores it in the lease with
//! every checkpoint (`throughputKBps`, the Java KCL 3.x attribute) and publishes the sum for
//! all its leases in its worker item. Counting leases stays the first rule (the target); on top
//! of it a worker whose load is well below the busiest worker's asks that worker for the one
//! lease that best evens the pair out ([`plan_load_move`]), through the same graceful handoff
//! as any steal.
//!
//! Hysteresis, so that a fleet under steady load settles instead of shuffling:
//! - a pair is evened out only when the busier carries more than [`GAP_RATIO`] × its load
//!   above the other (busiest / idlest ≥ 1.25), and only by a move that cuts their gap by at
//!   least a fifth;
//! - a lease moves by load at most once per [`SETTLE`]: one whose owner changed less than that
//!   ago (as this worker saw it) is not asked for;
//! - one move per worker and round, and a worker never takes so many leases this way that it
//!   ends more than one above the count target.

use std::time::Duration;

use tokio::time::Instant;

use super::{LeaseKey, WorkerId};

/// How long a lease stays where a load move put it (or where it was taken) before it may
/// move by load again.
pub(crate) const SETTLE: Duration = Duration::from_secs(300);

/// The busier of two workers must carry this fraction of its load more than the other before
/// they are evened out.
pub(crate) const GAP_RATIO: f64 = 0.2;

/// The time constant of the throughput average: a shard whose traffic changes is seen at its
/// new rate within a few of these.
const TAU: Duration = Duration::from_secs(30);

/// Bytes per second received from one shard, as an exponentially decaying average.
///
/// Each `record(bytes)` adds `bytes / τ` to the rate, which decays by `e^(-Δt/τ)`: for a
/// steady stream of `r` bytes per second the rate converges to `r`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ThroughputMeter {
    rate: f64,
    at: Instant,
}

impl ThroughputMeter {
    pub(crate) fn new(now: Instant) -> Self {
        Self { rate: 0.0, at: now }
    }

    /// A meter that starts at `bytes_per_sec` (the lease's last stored rate), so a lease that
    /// just moved keeps its weight until its new owner measured it.
    pub(crate) fn starting_at(bytes_per_sec: u64, now: Instant) -> Self {
        Self {
            rate: bytes_per_sec as f64,
            at: now,
        }
    }

    fn decay_to(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.rate *= (-dt / TAU.as_secs_f64()).exp();
        self.at = self.at.max(now);
    }

    /// `bytes` received at `now`.
    pub(crate) fn record(&mut self, bytes: u64, now: Instant) {
        self.decay_to(now);
        self.rate += bytes as f64 / TAU.as_secs_f64();
    }

    /// Bytes per second at `now`.
    pub(crate) fn rate(&mut self, now: Instant) -> u64 {
        self.decay_to(now);
        self.rate.round() as u64
    }
}

/// A lease of the busiest worker, as a candidate for a load move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub(crate) key: LeaseKey,
    /// Its last stored throughput, bytes per second.
    pub(crate) load: u64,
    /// Its owner has held it for at least [`SETTLE`], as far as this worker saw.
    pub(crate) settled: bool,
}

/// The inputs of one load decision.
pub(crate) struct LoadInputs<'a> {
    /// This worker.
    pub(crate) me: &'a WorkerId,
    /// This worker's load (bytes per second) and lease count.
    pub(crate) my_load: u64,
    pub(crate) my_count: usize,
    /// The count target this round.
    pub(crate) target: usize,
    /// Live peers: published load and lease count.
    pub(crate) peers: &'a [(WorkerId, u64, usize)],
    /// The leases of each peer in the snapshot, by worker (only the busiest one's are read).
    pub(crate) leases_of: &'a dyn Fn(&WorkerId) -> Vec<Candidate>,
}

/// The lease to ask for, if evening out this worker and the busiest live peer is worth a move
/// (see the module docs).
pub(crate) fn plan_load_move(i: &LoadInputs<'_>) -> Option<(WorkerId, LeaseKey)> {
    if i.my_count > i.target {
        return None;
    }
    // Only the idlest worker acts (ties: the lowest id): peers that all went for the busiest
    // at once would overshoot and leave it short.
    if i.peers
        .iter()
        .any(|(w, load, _)| (*load, w) < (i.my_load, i.me))
    {
        return None;
    }
    let (victim, v_load, v_count) = i
        .peers
        .iter()
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))?;
    let gap = v_load.checked_sub(i.my_load)?;
    // The busiest keeps at least `target - 1` leases: one short, it takes one of our coldest
    // back by count, which completes a swap rather than undoing the move.
    if (gap as f64) <= GAP_RATIO * *v_load as f64 || *v_count <= 1 || *v_count < i.target {
        return None;
    }
    // The move that leaves the pair closest: |gap - 2t| smallest, and at least a fifth less
    // than the gap. Ties: the lighter lease, then the key.
    let best = (i.leases_of)(victim)
        .into_iter()
        .filter(|c| c.settled && c.load > 0)
        .map(|c| (gap.abs_diff(2 * c.load), c))
        .filter(|(after, _)| (*after as f64) <= 0.8 * gap as f64)
        .min_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| a.1.load.cmp(&b.1.load))
                .then_with(|| a.1.key.cmp(&b.1.key))
        })?;
    Some((victim.clone(), best.1.key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_stream_is_measured_at_its_rate_and_an_idle_one_decays() {
        let t0 = Instant::now();
        let mut m = ThroughputMeter::new(t0);
        // 1 000 bytes every 200 ms for five minutes: 5 000 bytes per second.
        for i in 1..=1_500u64 {
            m.record(1_000, t0 + Duration::from_millis(200 * i));
        }
        let end = t0 + Duration::from_secs(300);
        let r = m.rate(end);
        assert!((4_900..=5_100).contains(&r), "{r}");
        // Idle for three minutes: nearly nothing.
        assert!(m.rate(end + Duration::from_secs(180)) < 20);
        // A moved lease starts at its stored rate.
        let mut moved = ThroughputMeter::starting_at(5_000, end);
        assert_eq!(moved.rate(end), 5_000);
    }

    fn cands(loads: &[(u64, bool)]) -> Vec<Candidate> {
        loads
            .iter()
            .enumerate()
            .map(|(i, (load, settled))| Candidate {
                key: LeaseKey::new(format!("shardId-{i:012}")),
                load: *load,
                settled: *settled,
            })
            .collect()
    }

    #[test]
    fn the_move_that_evens_the_pair_out_best() {
        let w = |s: &str| WorkerId::new(s);
        // (my load, my count, target, busiest's load and count, its leases) → the lease index.
        #[allow(clippy::type_complexity)]
        let table: &[(
            &str,
            u64,
            usize,
            usize,
            u64,
            usize,
            &[(u64, bool)],
            Option<usize>,
        )] = &[
            // Two hot leases (10) and two cold (1) against four cold: one hot moves.
            (
                "one hot of two moves",
                4,
                4,
                4,
                22,
                4,
                &[(10, true), (10, true), (1, true), (1, true)],
                Some(0),
            ),
            // Within 20 %: nothing.
            (
                "small gaps stay",
                12,
                4,
                4,
                14,
                4,
                &[(10, true), (1, true), (1, true), (2, true)],
                None,
            ),
            // A lease that moved recently stays.
            (
                "unsettled stays",
                4,
                4,
                4,
                22,
                4,
                &[(10, false), (10, false), (1, true), (1, true)],
                None,
            ),
            // A move that would overshoot (the pair's gap grows or barely shrinks) is not made.
            (
                "no overshoot",
                20,
                2,
                2,
                30,
                2,
                &[(15, true), (15, true)],
                None,
            ),
            // A small lease that helps enough does move.
            (
                "small helps",
                10,
                2,
                2,
                16,
                2,
                &[(15, true), (1, true)],
                Some(1),
            ),
            // Above the count target: count balancing first.
            (
                "over target",
                4,
                5,
                4,
                22,
                4,
                &[(10, true), (10, true), (1, true), (1, true)],
                None,
            ),
            // The busiest's only lease is not taken from it.
            ("last lease", 0, 0, 1, 40, 1, &[(40, true)], None),
            // Nor one that leaves it two below the target.
            (
                "victim short",
                4,
                4,
                4,
                22,
                3,
                &[(10, true), (10, true), (2, true)],
                None,
            ),
            // Unmeasured leases are not moved by load.
            (
                "unmeasured",
                0,
                3,
                4,
                30,
                4,
                &[(0, true), (0, true), (0, true), (0, true)],
                None,
            ),
        ];
        for (name, my_load, my_count, target, v_load, v_count, leases, want) in table {
            let peers = vec![
                (w("busy"), *v_load, *v_count),
                (w("calm"), *my_load + 1, *my_count),
            ];
            let all = cands(leases);
            let leases_of = |who: &WorkerId| {
                assert_eq!(
                    who,
                    &w("busy"),
                    "{name}: only the busiest's leases are read"
                );
                all.clone()
            };
            let got = plan_load_move(&LoadInputs {
                me: &w("me"),
                my_load: *my_load,
                my_count: *my_count,
                target: *target,
                peers: &peers,
                leases_of: &leases_of,
            });
            let want = want.map(|i| (w("busy"), all[i].key.clone()));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn only_the_idlest_worker_acts() {
        let w = |s: &str| WorkerId::new(s);
        let all = cands(&[(10, true), (10, true), (1, true), (1, true)]);
        let leases_of = |_: &WorkerId| all.clone();
        for (others, acts) in [(5, true), (4, true), (3, false)] {
            let peers = vec![(w("busy"), 22, 4), (w("calm"), others, 4)];
            // Equal loads: the lower id acts ("calm" < "me").
            let got = plan_load_move(&LoadInputs {
                me: &w("me"),
                my_load: 4,
                my_count: 4,
                target: 4,
                peers: &peers,
                leases_of: &leases_of,
            });
            assert_eq!(got.is_some(), acts && others != 4, "others at {others}");
        }
    }
}
