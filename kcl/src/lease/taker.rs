//! Which leases to take: a pure planner over one snapshot of the table.
//!
//! Target = ceil(active leases / live workers), capped by `max_leases_per_worker`. Finished
//! (`SHARD_END`) leases do not count. A worker below target takes, in order: its own leases it
//! does not hold (a restart with the same worker id reclaims them at once), unowned leases,
//! expired leases; then, if still below target, it steals from the most loaded live worker, at
//! most `max_leases_to_steal` per round and never so many that the victim drops below target
//! (which would make the fleet oscillate).
//!
//! Two rules keep a fleet that starts (or restarts) together from racing:
//! - Candidates are visited in an order of the worker's own (seeded from its id), so peers
//!   planning at the same moment go for different leases instead of all for the first one.
//! - A worker holding no lease takes at most one in a round (reclaims aside): it announces
//!   itself first. Workers started together then see each other at their next round, and
//!   divide the rest by the right target instead of the first one taking everything and
//!   handing it over lease by lease.
//! - After that a worker takes at most as many new leases in a round as it holds (or
//!   [`RAMP_FLOOR`], whichever is more): its holdings at most double per round. A worker that
//!   planned alone while its peers were still starting (10 000 leases, four workers started
//!   over two seconds) then holds a few hundred when it first sees them, not all 10 000 —
//!   which stealing, a few leases per round, would take an hour to even out.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use super::{Lease, LeaseKey, WorkerId};

/// FNV-1a: a round over 10 000 leases looks each up in several sets; hashing a short key
/// this way costs a fraction of comparing it against a B-tree's worth of similar keys (shard
/// ids share their first 16 bytes). Keys come from our own table, not from an attacker.
#[derive(Default)]
pub(crate) struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

/// A set of lease keys, as the planner looks them up.
pub(crate) type KeySet = HashSet<LeaseKey, BuildHasherDefault<Fnv>>;

/// Something that says whether it holds a lease key: a [`KeySet`], or the map of held leases
/// itself (no copy of its keys per round).
pub(crate) trait Keys: std::fmt::Debug {
    fn has(&self, key: &LeaseKey) -> bool;
}

impl Keys for KeySet {
    fn has(&self, key: &LeaseKey) -> bool {
        self.contains(key)
    }
}

impl<V: std::fmt::Debug> Keys for BTreeMap<LeaseKey, V> {
    fn has(&self, key: &LeaseKey) -> bool {
        self.contains_key(key)
    }
}

/// Whether each worker seen in the worker table is live (dead: `false`).
pub(crate) type WorkerJudgments<'a> = HashMap<&'a WorkerId, bool, BuildHasherDefault<Fnv>>;

/// Workers with a number each (their published lease counts).
pub(crate) type WorkerCounts = HashMap<WorkerId, usize, BuildHasherDefault<Fnv>>;

/// Why a lease is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum TakeReason {
    /// The lease names this worker but this process does not hold it (restart).
    Reclaim,
    /// Nobody owns it.
    Unowned,
    /// Its owner stopped renewing it.
    Expired,
    /// Asked from a live worker to balance the fleet (through a graceful handoff).
    Steal,
}

/// One planned take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Take {
    pub(crate) key: LeaseKey,
    pub(crate) reason: TakeReason,
}

/// The inputs of one planning round.
#[derive(Debug)]
pub(crate) struct Snapshot<'a> {
    /// Every lease in the table.
    pub(crate) leases: &'a [Lease],
    /// This worker.
    pub(crate) me: &'a WorkerId,
    /// Leases this process holds or is still winding down.
    pub(crate) held: &'a dyn Keys,
    /// Leases the expiry tracker considers expired (owned ones only matter).
    pub(crate) expired: &'a KeySet,
    /// Leases this worker does not take now (its processor failed on them, or their shard
    /// could not be read and is in quarantine).
    pub(crate) excluded: &'a KeySet,
    /// This worker's order of candidates (a seed from its id).
    pub(crate) order_seed: u64,
    /// Live workers that publish a liveness item, with the lease counts they publish: they
    /// count as live (even holding nothing) with that load.
    pub(crate) published: &'a WorkerCounts,
    /// Unowned leases nobody has taken for a lease duration.
    pub(crate) neglected: &'a KeySet,
    /// Leases whose owner changed lately: stolen last (a lease moves at most once per
    /// [`super::load::SETTLE`] when it can be helped).
    pub(crate) moved_lately: &'a KeySet,
    /// Live workers an operator asked to drain (not in `published`): they do not count when
    /// the leases are divided, and their leases are asked for before any steal.
    pub(crate) draining: &'a BTreeSet<WorkerId>,
}

/// Where `key` comes in the candidate order of the worker whose seed is `seed` (FNV-1a over
/// the seed and the key: no allocation, as it runs for every candidate).
fn rank(seed: u64, key: &LeaseKey) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().into_iter().chain(key.as_str().bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's high bits barely depend on the last bytes (where shard ids differ): mix them
    // (the splitmix64 finaliser).
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The fewest new leases a worker may take in one round once it holds some (see
/// [`plan_takes`]: at most this or what it holds, whichever is more).
pub(crate) const RAMP_FLOOR: usize = 64;

/// Limits of one round.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) max_leases_per_worker: usize,
    pub(crate) max_leases_to_steal: usize,
}

/// The load of each live worker, this worker's target, and what it holds toward it.
fn balance<'a>(
    s: &Snapshot<'a>,
    active: &[&'a Lease],
    limits: Limits,
) -> (BTreeMap<&'a WorkerId, usize>, usize, usize) {
    // Live workers: owners of active leases that are not expired, those that publish a
    // liveness item (with the count they publish), and this worker.
    let mut load: BTreeMap<&WorkerId, usize> = BTreeMap::new();
    load.insert(s.me, 0);
    for l in active {
        if let Some(owner) = &l.owner {
            if s.published.contains_key(owner)
                || (!s.draining.is_empty() && s.draining.contains(owner))
            {
                continue;
            }
            if !s.expired.contains(&l.key) || s.held.has(&l.key) {
                *load.entry(owner).or_default() += 1;
            }
        }
    }
    for (w, n) in s.published {
        if w != s.me {
            load.insert(w, *n);
        }
    }
    let target = active
        .len()
        .div_ceil(load.len())
        .min(limits.max_leases_per_worker);
    // Mine: held, or being handed over to me. (Held leases name us, as owner or, while we hand
    // them over, as checkpoint owner: the lookups are made for those only.)
    let mine = active
        .iter()
        .filter(|l| {
            let owner = l.owner.as_ref() == Some(s.me);
            (owner || l.checkpoint_owner.as_ref() == Some(s.me))
                && (s.held.has(&l.key) || (owner && l.checkpoint_owner.is_some()))
        })
        .count();
    (load, target, mine)
}

/// This worker's target and how many it holds toward it.
#[cfg(test)]
pub(crate) fn target(s: &Snapshot<'_>, limits: Limits) -> (usize, usize) {
    let active: Vec<&Lease> = s.leases.iter().filter(|l| !l.is_finished()).collect();
    let (_, target, mine) = balance(s, &active, limits);
    (target, mine)
}

/// One round's plan: the takes, this worker's target and what it holds toward it.
#[derive(Debug)]
pub(crate) struct Planned {
    pub(crate) takes: Vec<Take>,
    pub(crate) target: usize,
    pub(crate) mine: usize,
}

/// Plans this round's takes.
#[cfg(test)]
pub(crate) fn plan_takes(s: &Snapshot<'_>, limits: Limits) -> Vec<Take> {
    plan(s, limits).takes
}

/// Plans this round's takes, with the target they were planned toward.
pub(crate) fn plan(s: &Snapshot<'_>, limits: Limits) -> Planned {
    let active: Vec<&Lease> = s.leases.iter().filter(|l| !l.is_finished()).collect();
    let (load, target, mine) = balance(s, &active, limits);
    let mut wanted = target.saturating_sub(mine);

    let takeable = |l: &&&Lease| !s.held.has(&l.key) && !s.excluded.contains(&l.key);
    // Reclaims that are not handoffs to us (those are already counted in `mine`).
    let mut new_reclaims = 0;
    let mut candidates: Vec<Take> = active
        .iter()
        .filter_map(|l| {
            // The owner first (cheap), the set lookups only for possible candidates.
            let reason = match &l.owner {
                Some(o) if o == s.me => TakeReason::Reclaim,
                None => TakeReason::Unowned,
                Some(_) if s.expired.contains(&l.key) => TakeReason::Expired,
                Some(_) => return None,
            };
            if !takeable(&l) {
                return None;
            }
            if reason == TakeReason::Reclaim {
                // Handed over to us: ours once the old owner completed the handoff, or by
                // force once the lease expired (the old owner's clock has stopped it by then).
                if l.checkpoint_owner.is_some() && !s.expired.contains(&l.key) {
                    return None;
                }
                new_reclaims += usize::from(l.checkpoint_owner.is_none());
            }
            Some(Take {
                key: l.key.clone(),
                reason,
            })
        })
        .collect();
    // Ties (never in practice) keep the table's order: the sort is stable.
    candidates.sort_by_cached_key(|t| (t.reason, rank(s.order_seed, &t.key)));

    // Leases that name this worker are always taken back, whatever the target: nobody else
    // will take them before they expire. (Handoffs to us are already counted in `mine`.)
    let reclaims = candidates
        .iter()
        .take_while(|t| t.reason == TakeReason::Reclaim)
        .count();
    wanted = wanted.saturating_sub(new_reclaims);
    // Announce first, then at most double (see the module docs).
    let mut cap = if mine == 0 { 1 } else { mine.max(RAMP_FLOOR) };
    let others = (candidates.len() - reclaims).min(wanted).min(cap);
    cap -= others;
    // Leases nobody has taken for a lease duration are taken whatever the target: the live
    // workers at or below it may be unable to take them (a lease a worker's processor failed
    // on is never taken again by that worker).
    let neglected: Vec<Take> = candidates[reclaims + others..]
        .iter()
        .filter(|t| t.reason == TakeReason::Unowned && s.neglected.contains(&t.key))
        .take(cap)
        .cloned()
        .collect();
    candidates.truncate(reclaims + others);
    candidates.extend(neglected);
    wanted -= others;

    if wanted > 0 && !s.draining.is_empty() {
        // Leases of draining workers, asked for through graceful handoffs as steals are, but
        // before them and beyond the steal limit: the operator waits for them to move.
        let mut drained: Vec<&Lease> = active
            .iter()
            .filter(takeable)
            .filter(|l| {
                l.checkpoint_owner.is_none()
                    && !s.expired.contains(&l.key)
                    && l.owner.as_ref().is_some_and(|o| s.draining.contains(o))
            })
            .copied()
            .collect();
        drained.sort_by_cached_key(|l| rank(s.order_seed, &l.key));
        let n = drained.len().min(wanted).min(cap);
        candidates.extend(drained.into_iter().take(n).map(|l| Take {
            key: l.key.clone(),
            reason: TakeReason::Steal,
        }));
        wanted -= n;
    }

    if wanted > 0 {
        // Steal from the most loaded live worker (ties: lowest id, for determinism).
        let victim = load
            .iter()
            .filter(|(w, _)| **w != s.me)
            .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)));
        if let Some((victim, &count)) = victim {
            // A victim at the target still gives one lease to a worker two or more below it
            // (64 leases on 3 workers: 22/22/20 would otherwise never become 22/21/21).
            let surplus = match count.saturating_sub(target) {
                0 if wanted > 1 && count > mine + 1 => 1,
                s => s,
            };
            let n = wanted.min(surplus).min(limits.max_leases_to_steal);
            let mut steals: Vec<&Lease> = active
                .iter()
                .filter(takeable)
                .filter(|l| {
                    l.owner.as_ref() == Some(*victim)
                        && l.checkpoint_owner.is_none()
                        && !s.expired.contains(&l.key)
                })
                .copied()
                .collect();
            // Settled leases first, the coldest first: balancing by count moves little load (hot
            // leases move by load, see `load`).
            steals.sort_by_cached_key(|l| {
                (
                    s.moved_lately.contains(&l.key),
                    l.throughput.unwrap_or(0),
                    rank(s.order_seed, &l.key),
                )
            });
            candidates.extend(steals.into_iter().take(n).map(|l| Take {
                key: l.key.clone(),
                reason: TakeReason::Steal,
            }));
        }
    }
    Planned {
        takes: candidates,
        target,
        mine,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::record::ExtendedSequenceNumber;
    use crate::shard::ShardId;

    fn lease(i: usize, owner: Option<&str>) -> Lease {
        let mut l = Lease::new(
            &ShardId::new(format!("shardId-{i:012}")),
            ExtendedSequenceNumber::TrimHorizon,
        );
        l.owner = owner.map(WorkerId::new);
        l
    }

    fn plan(
        leases: &[Lease],
        me: &str,
        held: &[usize],
        expired: &[usize],
        steal: usize,
    ) -> Vec<Take> {
        let key = |i: &usize| leases[*i].key.clone();
        let me = WorkerId::new(me);
        let held: KeySet = held.iter().map(key).collect();
        let expired: KeySet = expired.iter().map(key).collect();
        let excluded = KeySet::default();
        plan_takes(
            &Snapshot {
                leases,
                me: &me,
                held: &held,
                expired: &expired,
                excluded: &excluded,
                order_seed: crate::backoff::seed(&[me.as_str()]),
                published: &WorkerCounts::default(),
                neglected: &KeySet::default(),
                moved_lately: &KeySet::default(),
                draining: &BTreeSet::new(),
            },
            Limits {
                max_leases_per_worker: usize::MAX,
                max_leases_to_steal: steal,
            },
        )
    }

    #[test]
    fn a_worker_holding_nothing_announces_itself_with_one_lease_then_takes_its_share() {
        let mut leases: Vec<_> = (0..4).map(|i| lease(i, None)).collect();
        let first = plan(&leases, "a", &[], &[], 1);
        assert_eq!(first.len(), 1);
        let i = leases.iter().position(|l| l.key == first[0].key).unwrap();
        leases[i].owner = Some(WorkerId::new("a"));
        // Alone: the rest at the next round.
        assert_eq!(plan(&leases, "a", &[i], &[], 1).len(), 3);
        // Reclaims are not held back.
        let own: Vec<_> = (0..4).map(|i| lease(i, Some("a"))).collect();
        assert_eq!(plan(&own, "a", &[], &[], 1).len(), 4);
    }

    #[test]
    fn a_worker_at_most_doubles_its_holdings_in_a_round() {
        // (held before, unowned leases) → new leases taken this round, alone in the table.
        for (held, unowned, want) in [
            (0, 1_000, 1),
            (1, 1_000, RAMP_FLOOR),
            (RAMP_FLOOR - 1, 1_000, RAMP_FLOOR),
            (100, 1_000, 100),
            (600, 1_000, 600),
            (600, 400, 400),
            (10, 20, 20),
        ] {
            let leases: Vec<_> = (0..held + unowned)
                .map(|i| lease(i, (i < held).then_some("a")))
                .collect();
            let holding: Vec<usize> = (0..held).collect();
            let takes = plan(&leases, "a", &holding, &[], 1);
            assert_eq!(takes.len(), want, "held {held}, unowned {unowned}");
        }
    }

    #[test]
    fn workers_order_candidates_differently() {
        let leases: Vec<_> = (0..64).map(|i| lease(i, None)).collect();
        let firsts: BTreeSet<LeaseKey> = (0..8)
            .map(|w| {
                plan(&leases, &format!("worker-{w}"), &[], &[], 1)[0]
                    .key
                    .clone()
            })
            .collect();
        // Eight workers planning at once go for (nearly) eight different leases.
        assert!(firsts.len() >= 6, "{firsts:?}");
        // And a worker's own order is stable.
        assert_eq!(
            plan(&leases, "worker-0", &[], &[], 1),
            plan(&leases, "worker-0", &[], &[], 1)
        );
    }

    #[test]
    fn reclaims_own_then_unowned_then_expired() {
        let leases = vec![
            lease(0, Some("b")),
            lease(1, None),
            lease(2, Some("a")),
            lease(3, Some("b")),
        ];
        let p = plan(&leases, "a", &[], &[0], 1);
        let reasons: Vec<_> = p.iter().map(|t| t.reason).collect();
        // b is live (lease 3) → 2 workers, target 2.
        assert_eq!(reasons, vec![TakeReason::Reclaim, TakeReason::Unowned]);
    }

    #[test]
    fn steals_toward_balance_without_overshooting() {
        let leases: Vec<_> = (0..8).map(|i| lease(i, Some("b"))).collect();
        // target 4: steal at most 3 per round when allowed.
        let p = plan(&leases, "a", &[], &[], 3);
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|t| t.reason == TakeReason::Steal));
        let p = plan(&leases, "a", &[], &[], 10);
        assert_eq!(p.len(), 4);
        // Balanced: nothing to do.
        let mut half = leases.clone();
        for l in half.iter_mut().take(4) {
            l.owner = Some(WorkerId::new("a"));
        }
        assert!(plan(&half, "a", &[0, 1, 2, 3], &[], 10).is_empty());
    }

    #[test]
    fn a_worker_two_below_target_takes_one_from_a_worker_at_target() {
        // 64 leases, 3 workers: a=22, b=22, c=20 → c takes one (22/21/21); then stable.
        let mut leases: Vec<_> = (0..64).map(|i| lease(i, Some("a"))).collect();
        for l in leases.iter_mut().skip(22).take(22) {
            l.owner = Some(WorkerId::new("b"));
        }
        for l in leases.iter_mut().skip(44) {
            l.owner = Some(WorkerId::new("c"));
        }
        let held_c: Vec<usize> = (44..64).collect();
        let p = plan(&leases, "c", &held_c, &[], 4);
        assert_eq!(p.len(), 1);
        leases[0].owner = Some(WorkerId::new("c"));
        let held_c: Vec<usize> = std::iter::once(0).chain(44..64).collect();
        assert!(plan(&leases, "c", &held_c, &[], 4).is_empty());
        // b at 21 does not take from a at 22: one below target is balanced enough.
        let held_b: Vec<usize> = (22..44).filter(|i| *i != 22).collect();
        let mut l2 = leases.clone();
        l2[22].owner = Some(WorkerId::new("c"));
        assert!(plan(&l2, "b", &held_b, &[], 4).is_empty());
    }

    #[test]
    fn an_expired_handoff_to_us_is_taken_even_at_target() {
        // b asked a for lease 0 (handoff pending), a died: b takes it once it expired, even
        // though the pending handoff already counts toward b's target.
        let mut leases = vec![lease(0, Some("b")), lease(1, Some("b"))];
        leases[0].checkpoint_owner = Some(WorkerId::new("a"));
        assert!(
            plan(&leases, "b", &[1], &[], 4).is_empty(),
            "not before it expired"
        );
        let p = plan(&leases, "b", &[1], &[0], 4);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].reason, TakeReason::Reclaim);
    }

    #[test]
    fn finished_leases_do_not_count() {
        let mut leases: Vec<_> = (0..4).map(|i| lease(i, Some("b"))).collect();
        leases[0].checkpoint = ExtendedSequenceNumber::ShardEnd;
        leases[1].checkpoint = ExtendedSequenceNumber::ShardEnd;
        // 2 active, 2 workers → target 1: steal one.
        assert_eq!(plan(&leases, "a", &[], &[], 5).len(), 1);
    }

    #[test]
    fn published_liveness_counts_stand_for_the_workers_load() {
        // 8 leases all owned by b in our (stale) snapshot; the liveness items say b holds 4
        // and c (which owns nothing in the snapshot) holds 4: three workers, target 3.
        let leases: Vec<_> = (0..8).map(|i| lease(i, Some("b"))).collect();
        let me = WorkerId::new("a");
        let (held, expired, excluded) = (KeySet::default(), KeySet::default(), KeySet::default());
        let table = [
            (vec![], 1, 4usize),
            (vec![("b", 4), ("c", 4)], 1, 3),
            (vec![("b", 8), ("c", 0)], 1, 3),
        ];
        for (published, takes, want_target) in table {
            let published: WorkerCounts = published
                .into_iter()
                .map(|(w, n)| (WorkerId::new(w), n))
                .collect();
            let snap = Snapshot {
                leases: &leases,
                me: &me,
                held: &held,
                expired: &expired,
                excluded: &excluded,
                order_seed: 1,
                published: &published,
                neglected: &KeySet::default(),
                moved_lately: &KeySet::default(),
                draining: &BTreeSet::new(),
            };
            let limits = Limits {
                max_leases_per_worker: usize::MAX,
                max_leases_to_steal: 1,
            };
            let (t, mine) = target(&snap, limits);
            assert_eq!((t, mine), (want_target, 0), "{published:?}");
            assert_eq!(plan_takes(&snap, limits).len(), takes, "{published:?}");
        }
    }

    #[test]
    fn a_lease_nobody_took_for_a_lease_duration_is_taken_beyond_the_target() {
        // Two unowned leases, two live workers: b (which will not take them: its processor
        // failed on both) and us, holding one of them already.
        let mut leases = vec![lease(0, Some("a")), lease(1, None)];
        leases[0].owner = Some(WorkerId::new("a"));
        let (me, held) = (
            WorkerId::new("a"),
            KeySet::from_iter([leases[0].key.clone()]),
        );
        let published = WorkerCounts::from_iter([(WorkerId::new("b"), 0)]);
        let (expired, excluded) = (KeySet::default(), KeySet::default());
        let limits = Limits {
            max_leases_per_worker: usize::MAX,
            max_leases_to_steal: 1,
        };
        for (neglected, want) in [
            (KeySet::default(), 0),
            (KeySet::from_iter([leases[1].key.clone()]), 1),
        ] {
            let snap = Snapshot {
                leases: &leases,
                me: &me,
                held: &held,
                expired: &expired,
                excluded: &excluded,
                order_seed: 1,
                published: &published,
                neglected: &neglected,
                moved_lately: &KeySet::default(),
                draining: &BTreeSet::new(),
            };
            assert_eq!(target(&snap, limits), (1, 1));
            assert_eq!(plan_takes(&snap, limits).len(), want, "{neglected:?}");
        }
    }
    #[test]
    fn the_leases_of_a_draining_worker_are_asked_for_first_and_beyond_the_steal_limit() {
        // d (draining) holds 6 leases, b holds 3, we (a) hold 3. d does not count when the
        // leases are divided: 12 leases on a and b, target 6 each.
        let mut leases: Vec<_> = (0..6).map(|i| lease(i, Some("d"))).collect();
        leases.extend((6..9).map(|i| lease(i, Some("b"))));
        leases.extend((9..12).map(|i| lease(i, Some("a"))));
        let me = WorkerId::new("a");
        let held: KeySet = leases[9..].iter().map(|l| l.key.clone()).collect();
        let (expired, excluded) = (KeySet::default(), KeySet::default());
        let limits = Limits {
            max_leases_per_worker: usize::MAX,
            max_leases_to_steal: 1,
        };
        let of = |takes: &[Take], owner: &str| {
            takes
                .iter()
                .filter(|t| {
                    let l = leases.iter().find(|l| l.key == t.key).unwrap();
                    l.owner.as_ref().map(|o| o.as_str()) == Some(owner)
                })
                .count()
        };
        // (published counts, draining) → (target, takes from d, takes from b)
        let table = [
            // Nobody draining: d is the busiest live worker; one steal (the limit).
            (vec![("b", 3), ("d", 6)], vec![], (4, 1, 0)),
            // d draining: its leases are asked for, three (to the target), beyond the limit.
            (vec![("b", 3)], vec!["d"], (6, 3, 0)),
            // b draining too: a is the only worker left and asks for all of them.
            (vec![], vec!["b", "d"], (12, 6, 3)),
        ];
        for (published, draining, (want_target, from_d, from_b)) in table {
            let published: WorkerCounts = published
                .into_iter()
                .map(|(w, n)| (WorkerId::new(w), n))
                .collect();
            let draining: BTreeSet<WorkerId> = draining.into_iter().map(WorkerId::new).collect();
            let snap = Snapshot {
                leases: &leases,
                me: &me,
                held: &held,
                expired: &expired,
                excluded: &excluded,
                order_seed: 1,
                published: &published,
                neglected: &KeySet::default(),
                moved_lately: &KeySet::default(),
                draining: &draining,
            };
            assert_eq!(target(&snap, limits).0, want_target, "{draining:?}");
            let takes = plan_takes(&snap, limits);
            assert!(takes.iter().all(|t| t.reason == TakeReason::Steal));
            assert_eq!(
                (of(&takes, "d"), of(&takes, "b")),
                (from_d, from_b),
                "{draining:?}: {takes:?}"
            );
        }
    }
}
