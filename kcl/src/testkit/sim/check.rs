//! The invariants of DESIGN §2, checked over the event log of a run.
//!
//! A **tenure** is one incarnation's hold on one lease: it begins with an applied `take` and
//! ends with the next applied `take` of that lease by anyone (a *forced* end: the lease expired
//! or was reclaimed), or with the holder's own applied `release` / `complete_handoff` (a
//! *planned* end). Since every write is fenced by the lease counter, tenures of one lease are
//! totally ordered, and:
//!
//! - every batch of a shard must be delivered inside a live tenure of the delivering
//!   incarnation (§2.4: the owner stops delivering at `last write start + lease_duration`, before
//!   anyone can see the lease expire, so no delivery ever falls inside someone else's tenure —
//!   with one virtual clock there is no skew to excuse one);
//! - a batch still being processed when the next holder delivers is allowed only after a forced
//!   end (the bounded window of §2.4); after a planned end it is a violation;
//! - after a planned end the next tenure re-delivers nothing the previous one delivered (§2.5);
//! - every checkpoint written comes from the tenure's holder and is at or behind what that
//!   tenure delivered (§2.2), and a lease's checkpoint never goes backwards, not even through a
//!   deletion and re-creation (§2.2);
//! - no record of a child shard is delivered before every parent's `SHARD_END` checkpoint (§2.3);
//! - per partition key, first deliveries follow put order (what §2.3 is for);
//! - every record put is delivered (§2.1; checked after the fleet settled).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use super::log::{Entry, Event, Inc, IncInfo, Op, Outcome};
use crate::lease::LeaseKey;
use crate::record::ExtendedSequenceNumber;
use crate::shard::ShardId;

/// Which guarantee a violation breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Invariant {
    /// §2.1: a record put was never delivered.
    AtLeastOnce,
    /// §2.2: a lease's checkpoint went backwards.
    CheckpointRegressed,
    /// §2.2: a checkpoint beyond what its writer's tenure delivered.
    CheckpointNotDelivered,
    /// §2.2: a checkpoint written by an incarnation that did not hold the lease.
    CheckpointByNonHolder,
    /// §2.3: a child record delivered before a parent's `SHARD_END`.
    ParentsFirst,
    /// §2.3: first deliveries of one partition key out of put order.
    KeyOrder,
    /// §2.4: a batch delivered outside the deliverer's tenure.
    ExclusiveDelivery,
    /// §2.4: processing overlapped the next holder's after a planned move.
    ExclusiveProcessing,
    /// §2.5: records delivered again after a planned move.
    PlannedMoveDuplicate,
    /// Balance: a live worker outside `[floor, ceil]` of active leases per live worker once
    /// the fleet is stable.
    Balance,
    /// Graceful shutdown left a lease owned.
    ShutdownRelease,
    /// A worker's `run()` panicked.
    WorkerPanic,
}

/// One broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which.
    pub invariant: Invariant,
    /// Virtual time of the offending event, when there is one.
    pub at: Option<Duration>,
    /// What happened.
    pub detail: String,
}

impl Violation {
    pub(crate) fn new(
        invariant: Invariant,
        at: Option<Duration>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            invariant,
            at,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some(at) => write!(
                f,
                "{:?} at {:.3}s: {}",
                self.invariant,
                at.as_secs_f64(),
                self.detail
            ),
            None => write!(f, "{:?}: {}", self.invariant, self.detail),
        }
    }
}

/// What the checks count besides violations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Records put.
    pub produced: usize,
    /// Record deliveries (with repeats).
    pub deliveries: usize,
    /// Distinct records delivered.
    pub distinct: usize,
    /// `deliveries - distinct`.
    pub duplicates: usize,
    /// Batches still in flight when the next holder (after a forced move) delivered.
    pub expiry_overlaps: usize,
    /// Tenures (applied takes).
    pub tenures: usize,
    /// Tenures that ended with a release or a completed handoff.
    pub planned_moves: usize,
}

#[derive(Debug)]
struct Tenure {
    inc: Inc,
    acquired: usize,
    /// Index of the holder's release / completed handoff, if it ended so.
    planned_end: Option<usize>,
    /// (entry index of the batch, batch id).
    batches: Vec<(usize, u64)>,
    delivered: BTreeSet<u64>,
    max_delivered: Option<ExtendedSequenceNumber>,
}

fn shard_of(key: &LeaseKey) -> ShardId {
    key.shard_id()
}

/// Checks a finished run's log. `parents` is the lineage listed at the end of the run.
pub(crate) fn check(
    entries: &[Entry],
    incs: &[IncInfo],
    parents: &BTreeMap<ShardId, Vec<ShardId>>,
) -> (Vec<Violation>, Counts) {
    let mut v = Vec::new();
    let mut counts = Counts::default();
    let worker = |inc: Inc| {
        incs.get(inc as usize)
            .map_or_else(|| format!("#{inc}"), |i| format!("{}#{inc}", i.worker))
    };

    // Puts, batch ends, SHARD_END times.
    let mut produced: BTreeMap<u64, (u32, usize)> = BTreeMap::new();
    let mut done_at: BTreeMap<u64, usize> = BTreeMap::new();
    let mut shard_end: BTreeMap<ShardId, usize> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        match &e.event {
            Event::Put { idx, key, .. } => {
                produced.insert(*idx, (*key, i));
            }
            Event::BatchDone { id, .. } => {
                done_at.insert(*id, i);
            }
            Event::Write {
                op: Op::Checkpoint,
                key,
                outcome: Outcome::Applied(l),
                ..
            } if l.checkpoint == ExtendedSequenceNumber::ShardEnd => {
                shard_end.entry(shard_of(key)).or_insert(i);
            }
            _ => {}
        }
    }
    counts.produced = produced.len();

    let mut tenures: BTreeMap<LeaseKey, Vec<Tenure>> = BTreeMap::new();
    let mut max_checkpoint: BTreeMap<LeaseKey, ExtendedSequenceNumber> = BTreeMap::new();
    // idx → (entry index, position in batch) of its first delivery.
    let mut first: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    let mut distinct = BTreeSet::new();

    for (i, e) in entries.iter().enumerate() {
        let at = Some(e.at);
        match &e.event {
            Event::Write {
                inc,
                op,
                key,
                outcome,
                ..
            } => {
                let ts = tenures.entry(key.clone()).or_default();
                // §2.2: checkpoints never go backwards, even through delete + create.
                if let Outcome::Applied(l) = outcome {
                    let max = max_checkpoint
                        .entry(key.clone())
                        .or_insert_with(|| l.checkpoint.clone());
                    if l.checkpoint < *max {
                        v.push(Violation::new(
                            Invariant::CheckpointRegressed,
                            at,
                            format!(
                                "{key}: {op:?} by {} left checkpoint {} behind {}",
                                worker(*inc),
                                l.checkpoint,
                                max
                            ),
                        ));
                    } else {
                        *max = l.checkpoint.clone();
                    }
                }
                let Outcome::Applied(l) = outcome else {
                    continue;
                };
                let current = ts.last_mut().filter(|t| t.planned_end.is_none());
                match op {
                    Op::Take => {
                        ts.push(Tenure {
                            inc: *inc,
                            acquired: i,
                            planned_end: None,
                            batches: Vec::new(),
                            delivered: BTreeSet::new(),
                            max_delivered: None,
                        });
                        counts.tenures += 1;
                    }
                    Op::Release | Op::CompleteHandoff => match current {
                        Some(t) if t.inc == *inc => {
                            t.planned_end = Some(i);
                            counts.planned_moves += 1;
                        }
                        // A worker shutting down releases a lease that names it without any
                        // tenure open (a handoff completed to it that it never took): the
                        // store only applies it while the lease names that worker, so no one
                        // else can be holding it.
                        None if matches!(op, Op::Release) => {}
                        _ => v.push(Violation::new(
                            Invariant::ExclusiveDelivery,
                            at,
                            format!(
                                "{key}: {op:?} applied for {} which did not hold it",
                                worker(*inc)
                            ),
                        )),
                    },
                    Op::Checkpoint => match current {
                        Some(t) if t.inc == *inc => {
                            let ok = l.checkpoint == ExtendedSequenceNumber::ShardEnd
                                || t.max_delivered.as_ref().is_some_and(|d| l.checkpoint <= *d);
                            if !ok {
                                v.push(Violation::new(
                                    Invariant::CheckpointNotDelivered,
                                    at,
                                    format!(
                                        "{key}: {} checkpointed {} but its tenure delivered up to {:?}",
                                        worker(*inc),
                                        l.checkpoint,
                                        t.max_delivered
                                    ),
                                ));
                            }
                        }
                        _ => v.push(Violation::new(
                            Invariant::CheckpointByNonHolder,
                            at,
                            format!(
                                "{key}: checkpoint {} applied for {} which did not hold it",
                                l.checkpoint,
                                worker(*inc)
                            ),
                        )),
                    },
                    _ => {}
                }
            }
            Event::Batch {
                id,
                inc,
                shard,
                records,
            } => {
                let key = LeaseKey::for_shard(shard);
                let ts = tenures.entry(key.clone()).or_default();
                match ts.last_mut() {
                    Some(t) if t.inc == *inc && t.planned_end.is_none() => {
                        t.batches.push((i, *id));
                        for r in records {
                            t.delivered.insert(r.idx);
                            if t.max_delivered.as_ref().is_none_or(|m| r.pos > *m) {
                                t.max_delivered = Some(r.pos.clone());
                            }
                        }
                    }
                    last => {
                        let why = match last {
                            None => "it never took the lease".to_owned(),
                            Some(t) if t.inc == *inc => "it had released it".to_owned(),
                            Some(t) => format!(
                                "{} took it at {:.3}s",
                                worker(t.inc),
                                entries[t.acquired].at.as_secs_f64()
                            ),
                        };
                        v.push(Violation::new(
                            Invariant::ExclusiveDelivery,
                            at,
                            format!(
                                "{shard}: batch {id} ({} records) delivered to {} after {why}",
                                records.len(),
                                worker(*inc)
                            ),
                        ));
                    }
                }
                // §2.3: parents finished first.
                for p in parents.get(shard).into_iter().flatten() {
                    if shard_end.get(p).is_none_or(|&end| end > i) {
                        v.push(Violation::new(
                            Invariant::ParentsFirst,
                            at,
                            format!(
                                "{shard}: batch {id} delivered to {} before parent {p} reached SHARD_END{}",
                                worker(*inc),
                                shard_end.get(p).map_or(" (never)".to_owned(), |&end| format!(
                                    " (at {:.3}s)",
                                    entries[end].at.as_secs_f64()
                                ))
                            ),
                        ));
                    }
                }
                for (k, r) in records.iter().enumerate() {
                    counts.deliveries += 1;
                    distinct.insert(r.idx);
                    first.entry(r.idx).or_insert((i, k));
                }
            }
            _ => {}
        }
    }
    counts.distinct = distinct.len();
    counts.duplicates = counts.deliveries - counts.distinct;

    // §2.4 processing and §2.5 planned moves.
    for (key, ts) in &tenures {
        for (n, t) in ts.iter().enumerate() {
            let next_first = ts[n + 1..]
                .iter()
                .find_map(|t2| t2.batches.first().map(|b| b.0));
            if let Some(end) = t.planned_end {
                for &(bi, id) in &t.batches {
                    if done_at.get(&id).is_none_or(|&d| d > end) {
                        v.push(Violation::new(
                            Invariant::ExclusiveProcessing,
                            Some(entries[bi].at),
                            format!(
                                "{key}: {} gave the lease up while batch {id} was still being processed",
                                worker(t.inc)
                            ),
                        ));
                    }
                }
                if let Some(t2) = ts.get(n + 1) {
                    let again: Vec<u64> =
                        t2.delivered.intersection(&t.delivered).copied().collect();
                    if !again.is_empty() {
                        v.push(Violation::new(
                            Invariant::PlannedMoveDuplicate,
                            Some(entries[t2.acquired].at),
                            format!(
                                "{key}: {} records delivered to {} were delivered again to {} after a planned move (e.g. record {})",
                                again.len(),
                                worker(t.inc),
                                worker(t2.inc),
                                again[0]
                            ),
                        ));
                    }
                }
            } else if let Some(nf) = next_first {
                counts.expiry_overlaps += t
                    .batches
                    .iter()
                    .filter(|&&(bi, id)| bi < nf && done_at.get(&id).is_none_or(|&d| d > nf))
                    .count();
            }
        }
    }

    // §2.1: at least once.
    let missing: Vec<u64> = produced
        .keys()
        .filter(|idx| !distinct.contains(*idx))
        .copied()
        .collect();
    if !missing.is_empty() {
        let examples: Vec<String> = missing
            .iter()
            .take(8)
            .map(|idx| {
                let shard = entries[produced[idx].1].event.clone();
                match shard {
                    Event::Put { shard, .. } => format!("{idx} ({shard})"),
                    _ => idx.to_string(),
                }
            })
            .collect();
        v.push(Violation::new(
            Invariant::AtLeastOnce,
            None,
            format!(
                "{} of {} records never delivered, e.g. {}",
                missing.len(),
                produced.len(),
                examples.join(", ")
            ),
        ));
    }

    // Per-key order of first deliveries.
    let mut by_key: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (idx, (key, _)) in &produced {
        by_key.entry(*key).or_default().push(*idx);
    }
    for (key, idxs) in by_key {
        let firsts: Vec<(u64, (usize, usize))> = idxs
            .iter()
            .filter_map(|idx| first.get(idx).map(|f| (*idx, *f)))
            .collect();
        if let Some(w) = firsts.windows(2).find(|w| w[1].1 < w[0].1) {
            v.push(Violation::new(
                Invariant::KeyOrder,
                Some(entries[w[1].1 .0].at),
                format!(
                    "key-{key}: record {} first delivered before record {} put earlier",
                    w[1].0, w[0].0
                ),
            ));
        }
    }
    (condense(v), counts)
}

/// Keeps the first violation of each invariant per shard (the text before the first `:`), with
/// a count of the others.
fn condense(v: Vec<Violation>) -> Vec<Violation> {
    let mut out: Vec<(Violation, usize)> = Vec::new();
    let mut seen: BTreeMap<(Invariant, String), usize> = BTreeMap::new();
    for x in v {
        let subject = x.detail.split(':').next().unwrap_or_default().to_owned();
        match seen.get(&(x.invariant, subject.clone())) {
            Some(&i) => out[i].1 += 1,
            None => {
                seen.insert((x.invariant, subject), out.len());
                out.push((x, 0));
            }
        }
    }
    out.into_iter()
        .map(|(mut x, more)| {
            if more > 0 {
                x.detail.push_str(&format!(" (and {more} more like it)"));
            }
            x
        })
        .collect()
}
