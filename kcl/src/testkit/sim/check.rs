//! The invariants of DESIGN §2, checked over the event log of a run.
//!
//! A **tenure** is one incarnation's hold on one lease: it begins with an applied `take` and
//! ends with the next applied `take` of that lease by anyone (a *forced* end: the lease expired
//! or was reclaimed), or with the holder's own applied `release` / `complete_handoff` (a
//! *planned* end). A release is no planned end when the holder's processing had already ended
//! without a final checkpoint — it was told its lease was lost (`lease_lost`, or a checkpoint
//! refused with `CheckpointError::LeaseLost`: it saw the lease expire by its own clock) — or
//! when it is a restarted incarnation of the same worker id releasing what its dead
//! predecessor held (`release_unheld` at shutdown): those are forced ends that happened to be
//! cleaned up. (A processor panic is no excuse: the worker handles it as a fatal error, and
//! the release that follows is planned.) (A holder is also told its lease is lost when a
//! checkpoint returns `CheckpointError::LeaseLost`.) Since every write is fenced by the lease
//! counter,
//! tenures of one lease are totally ordered, and:
//!
//! - every batch of a shard must be delivered inside a live tenure of the delivering
//!   incarnation (§2.4: the owner stops delivering at `last write start + lease_duration`, before
//!   anyone can see the lease expire, so no delivery ever falls inside someone else's tenure —
//!   with one virtual clock there is no skew to excuse one);
//! - a batch still being processed when the next holder delivers is allowed only after a forced
//!   end (the bounded window of §2.4); after a planned end it is a violation;
//! - after a planned end the next tenure re-delivers nothing the previous one *processed*
//!   (§2.5): what failed there must come again (§2.7);
//! - every checkpoint written comes from the tenure's holder and is at or behind what that
//!   tenure delivered (§2.2), and a lease's checkpoint never goes backwards, not even through a
//!   deletion and re-creation (§2.2);
//! - a checkpoint written outside `process_records` covers only records of the tenure whose
//!   `process_records` returned `Ok` or that the error policy dead-lettered; one written from
//!   inside may also cover the batch being processed (§2.7; `SHARD_END` covers everything the
//!   tenure delivered);
//! - no record of a child shard is delivered before every parent's `SHARD_END` checkpoint (§2.3);
//! - per partition key, over *every* delivery (see [`Invariant::KeyOrder`]): first deliveries
//!   follow put order; within a tenure a key never goes back, except that a batch retried after
//!   it failed comes again as it was; and no record is delivered again once a later record of
//!   its key came from another (a descendant) shard;
//! - a holder is told its lease is lost only if it may be: once another worker wrote the
//!   lease, or once its own clock said the lease may have expired (`lease_duration` after it
//!   sent its last write whose answer it got; a loss is for good, so once is enough) — never
//!   while the lease has been its own by both accounts all along, e.g. after its own write was
//!   refused because an earlier one was applied but its answer lost (§2.6: that is recognised
//!   by reading the item back);
//! - every record put is delivered (§2.1; checked after the fleet settled);
//! - with `OrderedParallel` processors (per-record events): per key within one processor of a
//!   shard, one record at a time, each key's records in order without a gap; and every
//!   checkpoint at most the contiguous prefix of completed records of its shard;
//! - no worker's `run()` panics.
//!
//! Balance and the release of every lease at shutdown are judged by the driver from the lease
//! table, with [`imbalance`] and [`still_owned`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use super::log::{BatchOutcome, Callback, Entry, Event, Exit, Inc, IncInfo, Op, Outcome};
use crate::lease::{Lease, LeaseKey, WorkerId};
use crate::record::ExtendedSequenceNumber;
use crate::shard::ShardId;

#[cfg(test)]
mod tests;

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
    /// §2.7: a checkpoint covering a record whose `process_records` failed (or never
    /// returned), written outside that `process_records` call.
    CheckpointCoversFailed,
    /// §2.3: a child record delivered before a parent's `SHARD_END`.
    ParentsFirst,
    /// §2.3, per partition key over every delivery:
    /// 1. first deliveries follow put order (nothing skipped ahead);
    /// 2. within one tenure, a key's records come in put order: a re-delivery there is only a
    ///    batch retried as it was after it failed (a replay after a move is a new tenure that
    ///    starts again from the checkpoint, in order);
    /// 3. a record is never delivered again after a record of its key put later was delivered
    ///    from another shard (a key lives on one shard at a time, so that shard is a
    ///    descendant, which starts only after this one ended: re-reading the ancestor then
    ///    replays the key's history out of order).
    KeyOrder,
    /// §2.4: a batch delivered outside the deliverer's tenure.
    ExclusiveDelivery,
    /// §2.4: processing overlapped the next holder's after a planned move.
    ExclusiveProcessing,
    /// §2.5: records processed before a planned move delivered again after it.
    PlannedMoveDuplicate,
    /// §2.6: a holder told its lease was lost (`lease_lost`, or a checkpoint refused with
    /// `CheckpointError::LeaseLost`) although nobody else had written the lease since its own
    /// last applied write, and its own clock had said all along that the lease was valid
    /// (`lease_duration` after it sent its last write whose answer it got). Typically a write
    /// refused because an earlier one was applied but its answer lost, taken for a lost lease.
    FalseLeaseLoss,
    /// Balance: a live worker outside `[floor, ceil]` of active leases per live worker once
    /// the fleet is stable.
    Balance,
    /// Graceful shutdown left a lease owned (or a worker did not stop).
    ShutdownRelease,
    /// `OrderedParallel` runs, per partition key within one processor of a shard: an attempt
    /// started while another record of the key was running, or not at the key's next record
    /// (a record skipped, or one gone back to; a failed attempt may be repeated).
    RecordKeyOrder,
    /// `OrderedParallel` runs: a checkpoint stored beyond the contiguous prefix of completed
    /// records of its shard (a record at or before it had not completed when it was written).
    CheckpointPastPrefix,
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
    /// Graceful handoffs completed (planned moves to a worker that asked).
    pub handoffs: usize,
    /// Takes that ended another incarnation's tenure (its lease expired, or its restarted
    /// worker reclaimed it).
    pub forced_moves: usize,
    /// `process_records` calls that returned a retryable error.
    pub failed_batches: usize,
    /// `process_records` calls that returned a fatal error.
    pub fatal_batches: usize,
    /// `process_records` calls that panicked.
    pub panicked_batches: usize,
    /// Batches handed to the dead-letter handler.
    pub dead_letters: usize,
}

#[derive(Debug)]
struct Tenure {
    inc: Inc,
    acquired: usize,
    /// Index of the holder's release / completed handoff, if it ended so.
    planned_end: Option<usize>,
    /// Processing ended without a final checkpoint (the holder was told the lease is lost, or
    /// died): a release after that is no planned move.
    lost: bool,
    /// Until when the holder's own clock says the lease is valid: `lease_duration` after it
    /// sent its last write whose answer it got.
    valid_until: Option<Duration>,
    /// The holder's clock said the lease may have expired at some point (an answer came
    /// after `valid_until`): it may have given the lease up then, for good.
    lapsed: bool,
    /// The holder renewed the lease itself (per-lease renewals: beside owners without a
    /// worker item it is valid by both its heartbeat and its lease writes).
    renewed: bool,
    /// (entry index of the batch, batch id).
    batches: Vec<(usize, u64)>,
    delivered: BTreeSet<u64>,
    max_delivered: Option<ExtendedSequenceNumber>,
    /// Every record delivered in the tenure, by position.
    records: BTreeMap<ExtendedSequenceNumber, u64>,
    /// Records of batches that returned `Ok` or were dead-lettered.
    processed: BTreeSet<u64>,
    /// Per key, the last record delivered (KeyOrder rule 2).
    last_of_key: BTreeMap<u32, u64>,
    /// The previous batch: its records and how it ended (a retry repeats a failed one).
    previous: Option<(Vec<u64>, Option<BatchOutcome>)>,
}

impl Tenure {
    fn new(inc: Inc, acquired: usize) -> Self {
        Self {
            inc,
            acquired,
            planned_end: None,
            lost: false,
            valid_until: None,
            lapsed: false,
            renewed: false,
            batches: Vec::new(),
            delivered: BTreeSet::new(),
            max_delivered: None,
            records: BTreeMap::new(),
            processed: BTreeSet::new(),
            last_of_key: BTreeMap::new(),
            previous: None,
        }
    }
}

/// A delivered batch, for applying its outcome later.
struct BatchInfo {
    /// The lease and the index of the tenure it was delivered in (none if outside any).
    tenure: Option<(LeaseKey, usize)>,
    records: Vec<u64>,
}

/// Checks a finished run's log. `parents` is the lineage listed at the end of the run;
/// `lease_duration` the workers'.
pub(crate) fn check(
    entries: &[Entry],
    incs: &[IncInfo],
    parents: &BTreeMap<ShardId, Vec<ShardId>>,
    lease_duration: Duration,
) -> (Vec<Violation>, Counts) {
    let mut v = Vec::new();
    let mut counts = Counts::default();
    let worker = |inc: Inc| {
        incs.get(inc as usize)
            .map_or_else(|| format!("#{inc}"), |i| format!("{}#{inc}", i.worker))
    };
    let worker_id = |inc: Inc| incs.get(inc as usize).map(|i| &i.worker);
    // Incarnations that crashed or whose run() returned.
    let mut dead: BTreeSet<Inc> = BTreeSet::new();

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
                shard_end.entry(key.shard_id()).or_insert(i);
            }
            _ => {}
        }
    }
    counts.produced = produced.len();
    let key_of = |idx: u64| produced.get(&idx).map(|p| p.0);

    let mut tenures: BTreeMap<LeaseKey, Vec<Tenure>> = BTreeMap::new();
    let mut batches: BTreeMap<u64, BatchInfo> = BTreeMap::new();
    let mut max_checkpoint: BTreeMap<LeaseKey, ExtendedSequenceNumber> = BTreeMap::new();
    // The incarnation of the last applied write of each lease.
    let mut last_writer: BTreeMap<LeaseKey, Inc> = BTreeMap::new();
    // Per incarnation that beats (per-worker liveness): until when its heartbeat says it is valid.
    let mut beats: BTreeMap<Inc, Duration> = BTreeMap::new();
    // idx → (entry index, position in batch) of its first delivery.
    let mut first: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    let mut distinct = BTreeSet::new();
    // Per key, per shard: the highest record delivered from it (KeyOrder rule 3).
    let mut key_high: BTreeMap<u32, BTreeMap<ShardId, u64>> = BTreeMap::new();

    for (i, e) in entries.iter().enumerate() {
        let at = Some(e.at);
        match &e.event {
            Event::Write {
                inc,
                op,
                key,
                outcome,
                batch,
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
                    if matches!(outcome, Outcome::Deleted) {
                        last_writer.remove(key);
                    }
                    continue;
                };
                last_writer.insert(key.clone(), *inc);
                let open = ts.last().filter(|t| t.planned_end.is_none()).map(|t| t.inc);
                let current = ts.last_mut().filter(|t| t.planned_end.is_none());
                // A restarted worker releasing what its dead predecessor (same id) held.
                let predecessor = |t: &Tenure| {
                    t.inc != *inc
                        && dead.contains(&t.inc)
                        && worker_id(t.inc).is_some_and(|w| Some(w) == worker_id(*inc))
                };
                match op {
                    Op::Take => {
                        if open.is_some_and(|o| o != *inc) {
                            counts.forced_moves += 1;
                        }
                        ts.push(Tenure::new(*inc, i));
                        counts.tenures += 1;
                    }
                    Op::Release | Op::CompleteHandoff => match current {
                        Some(t) if t.inc == *inc => {
                            t.planned_end = Some(i);
                            if !t.lost {
                                counts.planned_moves += 1;
                                if *op == Op::CompleteHandoff {
                                    counts.handoffs += 1;
                                }
                            }
                        }
                        Some(t) if *op == Op::Release && predecessor(t) => {
                            t.planned_end = Some(i);
                            t.lost = true;
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
                    Op::Renew => {
                        if let Some(t) = current.filter(|t| t.inc == *inc) {
                            t.renewed = true;
                        }
                    }
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
                            let running: BTreeSet<u64> = batch
                                .and_then(|b| batches.get(&b))
                                .map(|b| b.records.iter().copied().collect())
                                .unwrap_or_default();
                            if let Some(idx) =
                                uncovered(&t.records, &t.processed, &running, &l.checkpoint)
                            {
                                v.push(Violation::new(
                                    Invariant::CheckpointCoversFailed,
                                    at,
                                    format!(
                                        "{key}: {} checkpointed {} {}, covering record {idx} whose process_records did not return Ok",
                                        worker(*inc),
                                        l.checkpoint,
                                        match batch {
                                            Some(b) => format!("inside process_records of batch {b}"),
                                            None => "outside process_records".to_owned(),
                                        }
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
                let n = ts.len().saturating_sub(1);
                let idxs: Vec<u64> = records.iter().map(|r| r.idx).collect();
                let mut tenure = None;
                match ts.last_mut() {
                    Some(t) if t.inc == *inc && t.planned_end.is_none() => {
                        // KeyOrder rule 2: a retry repeats the failed batch before it.
                        let retry = matches!(
                            &t.previous,
                            Some((prev, Some(BatchOutcome::Failed { .. }))) if *prev == idxs
                        );
                        for r in records {
                            let Some(k) = key_of(r.idx) else { continue };
                            match t.last_of_key.get(&k) {
                                Some(&last) if r.idx <= last && !retry => v.push(Violation::new(
                                    Invariant::KeyOrder,
                                    at,
                                    format!(
                                        "key-{k}: record {} delivered to {} after record {last} in the same tenure of {shard} (not a retry of a failed batch)",
                                        r.idx,
                                        worker(*inc)
                                    ),
                                )),
                                _ => {}
                            }
                            let last = t.last_of_key.entry(k).or_insert(r.idx);
                            *last = (*last).max(r.idx);
                        }
                        t.previous = Some((idxs.clone(), None));
                        t.batches.push((i, *id));
                        for r in records {
                            t.delivered.insert(r.idx);
                            t.records.insert(r.pos.clone(), r.idx);
                            if t.max_delivered.as_ref().is_none_or(|m| r.pos > *m) {
                                t.max_delivered = Some(r.pos.clone());
                            }
                        }
                        tenure = Some((key.clone(), n));
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
                batches.insert(
                    *id,
                    BatchInfo {
                        tenure,
                        records: idxs,
                    },
                );
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
                    // KeyOrder rule 3: not again once a later record came from another shard.
                    let Some(key) = key_of(r.idx) else { continue };
                    let high = key_high.entry(key).or_default();
                    if let Some((s, h)) = high
                        .iter()
                        .find(|(s, h)| *s != shard && **h > r.idx)
                        .map(|(s, h)| (s.clone(), *h))
                    {
                        v.push(Violation::new(
                            Invariant::KeyOrder,
                            at,
                            format!(
                                "key-{key}: record {} delivered again from {shard} to {} after record {h}, put later, was delivered from {s}",
                                r.idx,
                                worker(*inc)
                            ),
                        ));
                    }
                    let h = high.entry(shard.clone()).or_insert(r.idx);
                    *h = (*h).max(r.idx);
                }
            }
            Event::BatchDone { id, outcome } => {
                match outcome {
                    BatchOutcome::Failed { fatal: false } => counts.failed_batches += 1,
                    BatchOutcome::Failed { fatal: true } => counts.fatal_batches += 1,
                    BatchOutcome::Panicked => counts.panicked_batches += 1,
                    BatchOutcome::Ok | BatchOutcome::Aborted => {}
                }
                if let Some((t, b)) = tenure_of(&mut tenures, &batches, *id) {
                    if let Some(prev) = t.previous.as_mut().filter(|p| p.0 == b.records) {
                        prev.1 = Some(*outcome);
                    }
                    if outcome.is_ok() {
                        t.processed.extend(b.records.iter().copied());
                    }
                }
            }
            Event::DeadLetter { id } => {
                counts.dead_letters += 1;
                if let Some((t, b)) = tenure_of(&mut tenures, &batches, *id) {
                    t.processed.extend(b.records.iter().copied());
                }
            }
            Event::Exited { inc, outcome } => {
                dead.insert(*inc);
                if *outcome == Exit::Panic {
                    v.push(Violation::new(
                        Invariant::WorkerPanic,
                        at,
                        format!("{}: run() panicked", worker(*inc)),
                    ));
                }
            }
            Event::Crash { inc } => {
                dead.insert(*inc);
            }
            Event::Callback {
                inc,
                shard,
                what: Callback::LeaseLost | Callback::CheckpointLeaseLost,
            } => {
                let holder = tenures
                    .get_mut(&LeaseKey::for_shard(shard))
                    .and_then(|ts| ts.last_mut())
                    .filter(|t| t.inc == *inc && t.planned_end.is_none());
                if let Some(t) = holder {
                    let key = LeaseKey::for_shard(shard);
                    let own = last_writer.get(&key) == Some(inc) && !t.lapsed && !t.lost;
                    // A worker that beats is valid by its heartbeat, not its lease writes.
                    let valid_until = match (beats.get(inc), t.valid_until) {
                        (Some(b), Some(w)) if t.renewed => Some((*b).min(w)),
                        (Some(b), _) => Some(*b),
                        (None, w) => w,
                    };
                    if let Some(until) = valid_until.filter(|u| own && e.at < *u) {
                        v.push(Violation::new(
                            Invariant::FalseLeaseLoss,
                            at,
                            format!(
                                "{shard}: {} was told its lease is lost, but nobody else had written it since its own last write and its own clock said it was valid until {:.3}s{}",
                                worker(*inc),
                                until.as_secs_f64(),
                                refusal(entries, i, *inc, &key)
                            ),
                        ));
                    }
                    t.lost = true;
                }
            }
            // A peer asked for the lease through the owner's worker item: the owner may lose
            // it without any lease write by others (it cannot renew to refuse the request).
            Event::Notice { inc, key } => {
                last_writer.insert(key.clone(), *inc);
            }
            Event::Beat { inc, sent } => {
                let until = *sent + lease_duration;
                let lapsed = beats.get(inc).is_some_and(|u| e.at >= *u);
                if lapsed {
                    // Peers may have judged it dead meanwhile: what it held is not its own
                    // any more, whatever it believes.
                    for t in tenures.values_mut().filter_map(|ts| ts.last_mut()) {
                        if t.inc == *inc {
                            t.lapsed = true;
                        }
                    }
                }
                let b = beats.entry(*inc).or_insert(until);
                *b = (*b).max(until);
            }
            Event::Acked { inc, key, sent } => {
                let holder = tenures
                    .get_mut(key)
                    .and_then(|ts| ts.last_mut())
                    .filter(|t| t.inc == *inc && t.planned_end.is_none());
                if let Some(t) = holder {
                    // A worker that beats is kept alive by its heartbeat; its lease writes
                    // count only while it renews the lease itself too.
                    if !beats.contains_key(inc) || t.renewed {
                        t.lapsed |= t.valid_until.is_some_and(|u| e.at >= u);
                    }
                    let until = *sent + lease_duration;
                    t.valid_until = Some(t.valid_until.map_or(until, |u| u.max(until)));
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
            if let Some(end) = t.planned_end.filter(|_| !t.lost) {
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
                        t2.delivered.intersection(&t.processed).copied().collect();
                    if !again.is_empty() {
                        v.push(Violation::new(
                            Invariant::PlannedMoveDuplicate,
                            Some(entries[t2.acquired].at),
                            format!(
                                "{key}: {} records processed by {} were delivered again to {} after a planned move (e.g. record {})",
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
            .map(|idx| match &entries[produced[idx].1].event {
                Event::Put { shard, .. } => format!("{idx} ({shard})"),
                _ => idx.to_string(),
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

    // KeyOrder rule 1: first deliveries in put order.
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
    v.extend(record_checks(entries));
    (condense(v), counts)
}

/// The per-record invariants of `OrderedParallel` runs ([`Invariant::RecordKeyOrder`],
/// [`Invariant::CheckpointPastPrefix`]); nothing to check in logs without record events.
fn record_checks(entries: &[Entry]) -> Vec<Violation> {
    let mut v = Vec::new();
    if !entries
        .iter()
        .any(|e| matches!(e.event, Event::RecordStart { .. }))
    {
        return v;
    }
    // Puts: each record's key, and per shard its records by position.
    let mut key_of: BTreeMap<u64, u32> = BTreeMap::new();
    let mut on_shard: BTreeMap<ShardId, Vec<(ExtendedSequenceNumber, u64)>> = BTreeMap::new();
    // Per shard and key, the key's records on it in put order.
    let mut key_records: BTreeMap<(ShardId, u32), Vec<u64>> = BTreeMap::new();
    for e in entries {
        if let Event::Put {
            idx,
            key,
            shard,
            seq,
        } = &e.event
        {
            key_of.insert(*idx, *key);
            on_shard
                .entry(shard.clone())
                .or_default()
                .push((ExtendedSequenceNumber::at(seq.clone(), 0), *idx));
            key_records
                .entry((shard.clone(), *key))
                .or_default()
                .push(*idx);
        }
    }
    for records in on_shard.values_mut() {
        records.sort();
    }
    // Per processor (incarnation, shard) and key: the last record started, whether it is
    // running, whether its last attempt failed.
    let mut keys: BTreeMap<(Inc, ShardId, u32), (u64, bool, bool)> = BTreeMap::new();
    let mut completed: BTreeSet<u64> = BTreeSet::new();
    // Per shard: how many of its records (by position) are known completed, from the first.
    let mut prefix: BTreeMap<ShardId, usize> = BTreeMap::new();
    for e in entries {
        let at = Some(e.at);
        match &e.event {
            Event::Callback {
                inc,
                shard,
                what: Callback::Initialize(_),
            } => {
                // A new processor: it starts again from the checkpoint.
                keys.retain(|(i, s, _), _| !(i == inc && s == shard));
            }
            Event::RecordStart { inc, shard, idx } => {
                let Some(&key) = key_of.get(idx) else {
                    continue;
                };
                let list = key_records
                    .get(&(shard.clone(), key))
                    .map_or(&[][..], Vec::as_slice);
                let problem = match keys.get(&(*inc, shard.clone(), key)) {
                    Some(&(last, true, _)) => {
                        Some(format!("record {idx} started while record {last} ran"))
                    }
                    Some(&(last, false, failed)) => {
                        let next = list.iter().find(|&&i| i > last).copied();
                        if *idx == last && failed || Some(*idx) == next {
                            None
                        } else {
                            Some(format!(
                                "record {idx} started after record {last} (next: {next:?})"
                            ))
                        }
                    }
                    None => None,
                };
                if let Some(p) = problem {
                    v.push(Violation::new(
                        Invariant::RecordKeyOrder,
                        at,
                        format!("key-{key} on {shard} (#{inc}): {p}"),
                    ));
                }
                keys.insert((*inc, shard.clone(), key), (*idx, true, false));
            }
            Event::RecordEnd {
                inc,
                shard,
                idx,
                ok,
            } => {
                if let Some(&key) = key_of.get(idx) {
                    if let Some(k) = keys.get_mut(&(*inc, shard.clone(), key)) {
                        *k = (k.0, false, !ok);
                    }
                }
                if *ok {
                    completed.insert(*idx);
                }
            }
            Event::Write {
                inc,
                op: Op::Checkpoint,
                key,
                outcome: Outcome::Applied(l),
                ..
            } if matches!(l.checkpoint, ExtendedSequenceNumber::Sequence { .. }) => {
                let shard = key.shard_id();
                let Some(records) = on_shard.get(&shard) else {
                    continue;
                };
                let n = prefix.entry(shard.clone()).or_default();
                while records.get(*n).is_some_and(|(_, i)| completed.contains(i)) {
                    *n += 1;
                }
                if let Some((_, first_unfinished)) =
                    records.get(*n).filter(|(pos, _)| *pos <= l.checkpoint)
                {
                    v.push(Violation::new(
                        Invariant::CheckpointPastPrefix,
                        at,
                        format!(
                            "{key}: checkpoint {} by #{inc} while record {first_unfinished} had not completed",
                            l.checkpoint
                        ),
                    ));
                }
            }
            _ => {}
        }
    }
    v
}

/// Describes the last refused write of `inc` on `key` before entry `upto`, with the applied
/// write of its own whose answer was lost before it, if there are such.
fn refusal(entries: &[Entry], upto: usize, inc: Inc, key: &LeaseKey) -> String {
    let mine = |e: &Entry| match &e.event {
        Event::Write {
            inc: i,
            key: k,
            op,
            outcome,
            response_lost,
            ..
        } if *i == inc && k == key => Some((*op, outcome.clone(), *response_lost)),
        _ => None,
    };
    let refused = entries[..upto]
        .iter()
        .enumerate()
        .rev()
        .find_map(|(n, e)| match mine(e) {
            Some((op, Outcome::Refused, _)) => Some((n, op, e.at)),
            _ => None,
        });
    let Some((n, op, at)) = refused else {
        return String::new();
    };
    let lost = entries[..n].iter().rev().find_map(|e| match mine(e) {
        Some((op, Outcome::Applied(_), true)) => Some((op, e.at)),
        _ => None,
    });
    match lost {
        Some((lop, lat)) => format!(
            " (its {op:?} refused at {:.3}s: its {lop:?} at {:.3}s was applied, but its answer lost)",
            at.as_secs_f64(),
            lat.as_secs_f64()
        ),
        None => format!(" (its {op:?} refused at {:.3}s)", at.as_secs_f64()),
    }
}

/// The tenure batch `id` was delivered in, with the batch.
fn tenure_of<'a>(
    tenures: &'a mut BTreeMap<LeaseKey, Vec<Tenure>>,
    batches: &'a BTreeMap<u64, BatchInfo>,
    id: u64,
) -> Option<(&'a mut Tenure, &'a BatchInfo)> {
    let b = batches.get(&id)?;
    let (key, n) = b.tenure.as_ref()?;
    let t = tenures.get_mut(key)?.get_mut(*n)?;
    Some((t, b))
}

/// §2.7: the first record of a tenure that a checkpoint at `upto` covers although it was not
/// processed (`running`: the records of the `process_records` call the checkpoint was written
/// from, which it may cover). `SHARD_END` covers every record the tenure delivered.
fn uncovered(
    records: &BTreeMap<ExtendedSequenceNumber, u64>,
    processed: &BTreeSet<u64>,
    running: &BTreeSet<u64>,
    upto: &ExtendedSequenceNumber,
) -> Option<u64> {
    records
        .range(..=upto.clone())
        .map(|(_, idx)| *idx)
        .find(|idx| !processed.contains(idx) && !running.contains(idx))
}

/// Why the fleet is not balanced, if it is not: every active (unfinished) lease must be owned
/// by a live worker with no handoff pending, and each live worker must hold between the floor
/// and the ceiling of active leases per live worker.
pub fn imbalance(live: &BTreeSet<WorkerId>, leases: &[Lease]) -> Option<String> {
    if live.is_empty() {
        return None;
    }
    let active: Vec<_> = leases.iter().filter(|l| !l.is_finished()).collect();
    let mut load: BTreeMap<&WorkerId, usize> = live.iter().map(|w| (w, 0)).collect();
    for l in &active {
        match (&l.owner, &l.checkpoint_owner) {
            (_, Some(from)) => return Some(format!("{}: handoff from {from} pending", l.key)),
            (Some(o), None) => match load.get_mut(o) {
                Some(n) => *n += 1,
                None => return Some(format!("{} owned by {o}, not a live worker", l.key)),
            },
            (None, None) => return Some(format!("{} unowned", l.key)),
        }
    }
    let lo = active.len() / live.len();
    let hi = active.len().div_ceil(live.len());
    if load.values().all(|&n| (lo..=hi).contains(&n)) {
        None
    } else {
        Some(format!(
            "{} active leases over {} live workers (want {lo}..={hi} each): {:?}",
            active.len(),
            live.len(),
            load
        ))
    }
}

/// Leases still owned (or with a handoff pending) once every worker stopped gracefully. A
/// finished lease whose release failed stays owned (nobody takes finished leases): that is
/// harmless. An unfinished one must have been released.
pub fn still_owned(leases: &[Lease]) -> Vec<String> {
    leases
        .iter()
        .filter(|l| !l.is_finished() && (l.owner.is_some() || l.checkpoint_owner.is_some()))
        .map(|l| format!("{} ({:?})", l.key, l.owner))
        .collect()
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
