//! The checker checked: every invariant gets a log with a planted violation, which it must
//! report, and a matching clean log, which it must accept (Jepsen's known-bad histories).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::*;
use crate::lease::{Lease, LeaseKey, WorkerId};
use crate::record::{ExtendedSequenceNumber, SequenceNumber};
use crate::shard::ShardId;
use crate::testkit::sim::log::{
    BatchOutcome, Callback, Delivered, Entry, Event, Exit, IncInfo, LeaseView,
};

fn shard(n: u32) -> ShardId {
    ShardId::new(format!("shardId-{n:012}"))
}

/// Record `idx`'s position: records are put in index order, so positions follow it.
fn pos(idx: u64) -> ExtendedSequenceNumber {
    ExtendedSequenceNumber::at(SequenceNumber::from_u128(u128::from(idx) + 1), 0)
}

/// Builds a synthetic event log, one millisecond per event. Incarnation `i` is worker `w{i}`.
struct Log {
    entries: Vec<Entry>,
    incs: Vec<IncInfo>,
    parents: BTreeMap<ShardId, Vec<ShardId>>,
    /// Each lease's stored checkpoint (what other writes leave in place).
    stored: BTreeMap<u32, ExtendedSequenceNumber>,
    counter: u64,
    next_batch: u64,
    /// Time skipped by `wait`.
    skipped: Duration,
}

impl Log {
    fn new(incarnations: usize) -> Self {
        let ids: Vec<String> = (0..incarnations).map(|i| format!("w{i}")).collect();
        Self::with_workers(&ids.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Incarnation `i` runs worker id `ids[i]` (a restart may reuse an id).
    fn with_workers(ids: &[&str]) -> Self {
        Self {
            entries: Vec::new(),
            incs: ids
                .iter()
                .enumerate()
                .map(|(i, id)| IncInfo {
                    slot: i,
                    worker: WorkerId::new(*id),
                    crashed_at: None,
                })
                .collect(),
            parents: BTreeMap::new(),
            stored: BTreeMap::new(),
            counter: 0,
            next_batch: 0,
            skipped: Duration::ZERO,
        }
    }

    /// The time of the next event.
    fn now(&self) -> Duration {
        Duration::from_millis(self.entries.len() as u64) + self.skipped
    }

    /// Lets `d` pass before the next event.
    fn wait(&mut self, d: Duration) -> &mut Self {
        self.skipped += d;
        self
    }

    fn push(&mut self, event: Event) -> &mut Self {
        let at = self.now();
        self.entries.push(Entry { at, event });
        self
    }

    /// `child` was split or merged from `parents`.
    fn lineage(&mut self, child: u32, parents: &[u32]) -> &mut Self {
        self.parents
            .insert(shard(child), parents.iter().map(|&p| shard(p)).collect());
        self
    }

    /// Puts records `idxs` with partition key `key` on shard `s`.
    fn put(&mut self, s: u32, key: u32, idxs: &[u64]) -> &mut Self {
        for &idx in idxs {
            self.push(Event::Put {
                idx,
                key,
                shard: shard(s),
                seq: SequenceNumber::from_u128(u128::from(idx) + 1),
            });
        }
        self
    }

    /// An applied write; `checkpoint` is stored by checkpoints and creates, the others leave
    /// the stored one.
    fn write(
        &mut self,
        inc: Inc,
        op: Op,
        s: u32,
        checkpoint: ExtendedSequenceNumber,
        batch: Option<u64>,
    ) -> &mut Self {
        self.counter += 1;
        let checkpoint = match op {
            Op::Checkpoint | Op::Create => {
                self.stored.insert(s, checkpoint.clone());
                checkpoint
            }
            _ => self
                .stored
                .get(&s)
                .cloned()
                .unwrap_or(ExtendedSequenceNumber::TrimHorizon),
        };
        let owner =
            matches!(op, Op::Take | Op::Checkpoint).then(|| self.incs[inc as usize].worker.clone());
        self.push(Event::Write {
            inc,
            op,
            key: LeaseKey::for_shard(&shard(s)),
            outcome: Outcome::Applied(LeaseView {
                owner,
                counter: self.counter,
                checkpoint,
                checkpoint_owner: None,
            }),
            response_lost: false,
            batch,
            sent: self.now(),
        })
    }

    fn take(&mut self, inc: Inc, s: u32) -> &mut Self {
        self.write(inc, Op::Take, s, ExtendedSequenceNumber::TrimHorizon, None)
    }

    fn release(&mut self, inc: Inc, s: u32) -> &mut Self {
        self.write(
            inc,
            Op::Release,
            s,
            ExtendedSequenceNumber::TrimHorizon,
            None,
        )
    }

    fn handoff(&mut self, inc: Inc, s: u32) -> &mut Self {
        self.write(
            inc,
            Op::CompleteHandoff,
            s,
            ExtendedSequenceNumber::TrimHorizon,
            None,
        )
    }

    /// A checkpoint at record `idx` (outside `process_records` unless `inside` names a batch).
    fn checkpoint(&mut self, inc: Inc, s: u32, idx: u64, inside: Option<u64>) -> &mut Self {
        self.write(inc, Op::Checkpoint, s, pos(idx), inside)
    }

    fn shard_end(&mut self, inc: Inc, s: u32) -> &mut Self {
        self.write(
            inc,
            Op::Checkpoint,
            s,
            ExtendedSequenceNumber::ShardEnd,
            None,
        )
    }

    /// Delivers records `idxs` of shard `s` to `inc`; returns the batch id.
    fn batch(&mut self, inc: Inc, s: u32, idxs: &[u64]) -> u64 {
        let id = self.next_batch;
        self.next_batch += 1;
        self.push(Event::Batch {
            id,
            inc,
            shard: shard(s),
            records: idxs
                .iter()
                .map(|&idx| Delivered { idx, pos: pos(idx) })
                .collect(),
        });
        id
    }

    fn done(&mut self, id: u64, outcome: BatchOutcome) -> &mut Self {
        self.push(Event::BatchDone { id, outcome })
    }

    /// A batch delivered and processed with `outcome`.
    fn processed(&mut self, inc: Inc, s: u32, idxs: &[u64], outcome: BatchOutcome) -> u64 {
        let id = self.batch(inc, s, idxs);
        self.done(id, outcome);
        id
    }

    fn violations(&self) -> Vec<Violation> {
        check(&self.entries, &self.incs, &self.parents, LEASE).0
    }

    fn counts(&self) -> Counts {
        check(&self.entries, &self.incs, &self.parents, LEASE).1
    }

    /// The invariants broken (each once).
    fn broken(&self) -> BTreeSet<Invariant> {
        self.violations().iter().map(|v| v.invariant).collect()
    }

    #[track_caller]
    fn assert_clean(&self) {
        let v = self.violations();
        assert!(v.is_empty(), "a clean log was flagged: {v:#?}");
    }

    #[track_caller]
    fn assert_only(&self, invariant: Invariant) {
        let v = self.violations();
        assert_eq!(
            self.broken(),
            BTreeSet::from([invariant]),
            "expected {invariant:?} alone, got {v:#?}"
        );
    }
}

/// The workers' lease duration in these logs (events are a millisecond apart).
const LEASE: Duration = Duration::from_secs(10);

const OK: BatchOutcome = BatchOutcome::Ok;
const FAILED: BatchOutcome = BatchOutcome::Failed { fatal: false };

#[test]
fn at_least_once() {
    let mut log = Log::new(1);
    log.put(0, 0, &[0, 1]).take(0, 0);
    log.processed(0, 0, &[0], OK);
    log.assert_only(Invariant::AtLeastOnce);

    let mut log = Log::new(1);
    log.put(0, 0, &[0, 1]).take(0, 0);
    log.processed(0, 0, &[0, 1], OK);
    log.assert_clean();
}

#[test]
fn checkpoints_do_not_regress() {
    let run = |second: u64| {
        let mut log = Log::new(1);
        log.put(0, 0, &[0, 1, 2]).take(0, 0);
        log.processed(0, 0, &[0, 1, 2], OK);
        log.checkpoint(0, 0, 1, None).checkpoint(0, 0, second, None);
        log
    };
    run(0).assert_only(Invariant::CheckpointRegressed);
    run(2).assert_clean();
}

#[test]
fn checkpoints_do_not_regress_through_deletion() {
    // A finished lease deleted and created again at TRIM_HORIZON (re-reading the shard).
    let mut log = Log::new(1);
    log.put(0, 0, &[0]).take(0, 0);
    log.processed(0, 0, &[0], OK);
    log.shard_end(0, 0);
    log.push(Event::Write {
        inc: 0,
        op: Op::Delete,
        key: LeaseKey::for_shard(&shard(0)),
        outcome: Outcome::Deleted,
        response_lost: false,
        batch: None,
        sent: Duration::ZERO,
    });
    log.write(0, Op::Create, 0, ExtendedSequenceNumber::TrimHorizon, None);
    log.assert_only(Invariant::CheckpointRegressed);
}

#[test]
fn checkpoints_cover_only_delivered_records() {
    let run = |at: u64| {
        let mut log = Log::new(1);
        log.put(0, 0, &[0, 1, 2]).take(0, 0);
        log.processed(0, 0, &[0, 1], OK);
        log.checkpoint(0, 0, at, None);
        log.processed(0, 0, &[2], OK);
        log
    };
    run(2).assert_only(Invariant::CheckpointNotDelivered);
    run(1).assert_clean();
}

#[test]
fn checkpoints_come_from_the_holder() {
    let run = |late: bool| {
        let mut log = Log::new(2);
        log.put(0, 0, &[0]).take(0, 0);
        log.processed(0, 0, &[0], OK);
        if !late {
            log.checkpoint(0, 0, 0, None);
        }
        log.take(1, 0);
        if late {
            log.checkpoint(0, 0, 0, None);
        }
        log.processed(1, 0, &[0], OK);
        log
    };
    run(true).assert_only(Invariant::CheckpointByNonHolder);
    run(false).assert_clean();
}

#[test]
fn parents_first() {
    let run = |early: bool| {
        let mut log = Log::new(2);
        log.lineage(1, &[0]);
        // Different keys: a child record of the parent's key before the parent's would break
        // the key's order too.
        log.put(0, 0, &[0]).put(1, 1, &[1]).take(0, 0).take(1, 1);
        if early {
            log.processed(1, 1, &[1], OK);
        }
        log.processed(0, 0, &[0], OK);
        log.shard_end(0, 0);
        if !early {
            log.processed(1, 1, &[1], OK);
        }
        log
    };
    run(true).assert_only(Invariant::ParentsFirst);
    run(false).assert_clean();
}

#[test]
fn delivery_within_tenure() {
    let run = |late: bool| {
        let mut log = Log::new(2);
        log.put(0, 0, &[0, 1]).take(0, 0);
        log.processed(0, 0, &[0], OK);
        if !late {
            log.processed(0, 0, &[1], OK);
        }
        log.take(1, 0);
        if late {
            log.processed(0, 0, &[1], OK);
        }
        log.processed(1, 0, &[0, 1], OK);
        log
    };
    run(true).assert_only(Invariant::ExclusiveDelivery);
    run(false).assert_clean();
}

#[test]
fn no_overlap_after_planned_moves() {
    // The holder releases while its batch is still in process_records.
    let run = |overlap: bool| {
        let mut log = Log::new(2);
        log.put(0, 0, &[0, 1]).take(0, 0);
        let b = log.batch(0, 0, &[0]);
        if !overlap {
            log.done(b, OK);
            log.checkpoint(0, 0, 0, None);
        }
        log.release(0, 0).take(1, 0);
        if overlap {
            log.done(b, OK);
            log.checkpoint(0, 0, 0, None);
        }
        log.processed(1, 0, &[1], OK);
        log
    };
    // (The late checkpoint is also one by a non-holder.)
    let broken = run(true).broken();
    assert!(
        broken.contains(&Invariant::ExclusiveProcessing),
        "{broken:?}"
    );
    run(false).assert_clean();

    // The same overlap after a forced move is the bounded window of §2.4: counted, allowed.
    let mut log = Log::new(2);
    log.put(0, 0, &[0]).take(0, 0);
    let b = log.batch(0, 0, &[0]);
    log.take(1, 0);
    log.processed(1, 0, &[0], OK);
    log.done(b, OK);
    log.assert_clean();
    assert_eq!(log.counts().expiry_overlaps, 1);
    assert_eq!(log.counts().forced_moves, 1);
}

#[test]
fn no_duplicates_after_planned_moves() {
    let run = |planned: bool, outcome: BatchOutcome| {
        let mut log = Log::new(2);
        log.put(0, 0, &[0, 1]).take(0, 0);
        log.processed(0, 0, &[0, 1], outcome);
        if planned {
            log.handoff(0, 0);
        }
        log.take(1, 0);
        log.processed(1, 0, &[0, 1], OK);
        log
    };
    run(true, OK).assert_only(Invariant::PlannedMoveDuplicate);
    assert_eq!(run(true, OK).counts().handoffs, 1);
    // After a forced move, duplicates are expected.
    run(false, OK).assert_clean();
    // What failed before the move must come again (§2.7): not a duplicate.
    run(true, FAILED).assert_clean();
}

#[test]
fn key_order_of_first_deliveries() {
    // Record 1 is delivered before record 0 of the same key was ever delivered.
    let run = |skip: bool| {
        let mut log = Log::new(2);
        log.put(0, 7, &[0, 1]).take(0, 0);
        log.processed(0, 0, if skip { &[1] } else { &[0, 1] }, OK);
        log.take(1, 0);
        log.processed(1, 0, &[0, 1], OK);
        log
    };
    run(true).assert_only(Invariant::KeyOrder);
    // A replay in order after a forced move.
    run(false).assert_clean();
}

#[test]
fn key_order_of_redeliveries_within_a_tenure() {
    // After a move, the new holder replays the key out of order (its first deliveries were in
    // order: only the replay is wrong).
    let run = |replay: &[&[u64]]| {
        let mut log = Log::new(2);
        log.put(0, 7, &[0, 1, 2]).take(0, 0);
        log.processed(0, 0, &[0, 1, 2], OK);
        log.take(1, 0);
        for idxs in replay {
            log.processed(1, 0, idxs, OK);
        }
        log
    };
    run(&[&[1, 2], &[0]]).assert_only(Invariant::KeyOrder);
    run(&[&[0, 2, 1]]).assert_only(Invariant::KeyOrder);
    run(&[&[0, 1], &[2]]).assert_clean();
    run(&[&[1], &[2]]).assert_clean();

    // A batch repeated is a retry only if it failed.
    let run = |first: BatchOutcome| {
        let mut log = Log::new(1);
        log.put(0, 7, &[0, 1]).take(0, 0);
        log.processed(0, 0, &[0, 1], first);
        log.processed(0, 0, &[0, 1], OK);
        log
    };
    run(OK).assert_only(Invariant::KeyOrder);
    run(FAILED).assert_clean();
}

#[test]
fn key_order_never_goes_back_to_an_ancestor() {
    // Key 7 lives on shard 0, then on its child shard 1. Once the child delivered, shard 0 is
    // read again (its lease was re-created at TRIM_HORIZON, say).
    let run = |again: u32| {
        let mut log = Log::new(3);
        log.lineage(1, &[0]);
        log.put(0, 7, &[0, 1]).put(1, 7, &[2, 3]).take(0, 0);
        log.processed(0, 0, &[0, 1], OK);
        log.shard_end(0, 0).take(1, 1);
        log.processed(1, 1, &[2, 3], OK);
        log.take(2, again);
        let idxs: &[u64] = if again == 0 { &[0, 1] } else { &[2, 3] };
        log.processed(2, again, idxs, OK);
        log
    };
    run(0).assert_only(Invariant::KeyOrder);
    // The child replayed after a forced move (going back below what it delivered): fine.
    run(1).assert_clean();
}

#[test]
fn worker_panic() {
    let run = |outcome: Exit| {
        let mut log = Log::new(1);
        log.push(Event::Exited { inc: 0, outcome });
        log
    };
    run(Exit::Panic).assert_only(Invariant::WorkerPanic);
    run(Exit::Ok).assert_clean();
    run(Exit::Error("table unreachable".into())).assert_clean();
}

#[test]
fn no_checkpoint_covers_a_failed_record() {
    // batch [0, 1] fails, then: `then` happens, then a checkpoint at record 1 from outside
    // process_records (e.g. shutdown_requested).
    let run = |then: &dyn Fn(&mut Log, u64)| {
        let mut log = Log::new(1);
        log.put(0, 0, &[0, 1]).take(0, 0);
        let b = log.processed(0, 0, &[0, 1], FAILED);
        then(&mut log, b);
        log.checkpoint(0, 0, 1, None).release(0, 0);
        log
    };
    run(&|_, _| {}).assert_only(Invariant::CheckpointCoversFailed);
    // Retried until it returned Ok.
    run(&|log, _| {
        log.processed(0, 0, &[0, 1], OK);
    })
    .assert_clean();
    // Handed to the dead-letter handler by the error policy.
    run(&|log, b| {
        log.push(Event::DeadLetter { id: b });
    })
    .assert_clean();
    // A fatal error, a panic or a batch still running count as failed too.
    for outcome in [
        BatchOutcome::Failed { fatal: true },
        BatchOutcome::Panicked,
        BatchOutcome::Aborted,
    ] {
        let mut log = Log::new(1);
        log.put(0, 0, &[0, 1]).take(0, 0);
        log.processed(0, 0, &[0], OK);
        log.processed(0, 0, &[1], outcome);
        log.checkpoint(0, 0, 1, None);
        log.assert_only(Invariant::CheckpointCoversFailed);
    }
}

#[test]
fn a_checkpoint_from_inside_process_records_may_cover_its_batch_only() {
    let run = |earlier: BatchOutcome| {
        let mut log = Log::new(1);
        log.put(0, 0, &[0, 1, 2]).take(0, 0);
        log.processed(0, 0, &[0], earlier);
        let b = log.batch(0, 0, &[1, 2]);
        log.checkpoint(0, 0, 2, Some(b));
        log.done(b, OK);
        log
    };
    run(OK).assert_clean();
    // An earlier failed batch is not covered by the running one's exemption (and skipping it
    // breaks nothing else in this log).
    run(FAILED).assert_only(Invariant::CheckpointCoversFailed);
}

#[test]
fn shard_end_covers_everything_delivered() {
    let run = |outcome: BatchOutcome| {
        let mut log = Log::new(1);
        log.put(0, 0, &[0]).take(0, 0);
        log.processed(0, 0, &[0], outcome);
        log.shard_end(0, 0);
        log
    };
    run(FAILED).assert_only(Invariant::CheckpointCoversFailed);
    run(OK).assert_clean();
}

fn lease(s: u32, owner: Option<&str>, finished: bool) -> Lease {
    let mut l = Lease::new(
        &shard(s),
        if finished {
            ExtendedSequenceNumber::ShardEnd
        } else {
            ExtendedSequenceNumber::TrimHorizon
        },
    );
    l.owner = owner.map(WorkerId::new);
    l
}

#[test]
fn balance() {
    let live: BTreeSet<WorkerId> = ["a", "b"].into_iter().map(WorkerId::new).collect();
    let balanced = [
        lease(0, Some("a"), false),
        lease(1, Some("b"), false),
        lease(2, Some("a"), false),
        // Finished leases do not count.
        lease(3, Some("a"), true),
        lease(4, None, true),
    ];
    assert_eq!(imbalance(&live, &balanced), None);
    let lopsided = [
        lease(0, Some("a"), false),
        lease(1, Some("a"), false),
        lease(2, Some("a"), false),
    ];
    assert!(imbalance(&live, &lopsided).is_some());
    let unowned = [lease(0, Some("a"), false), lease(1, None, false)];
    assert!(imbalance(&live, &unowned).is_some());
    let dead_owner = [lease(0, Some("a"), false), lease(1, Some("c"), false)];
    assert!(imbalance(&live, &dead_owner).is_some());
    let mut pending = lease(1, Some("b"), false);
    pending.checkpoint_owner = Some(WorkerId::new("a"));
    assert!(imbalance(&live, &[lease(0, Some("a"), false), pending]).is_some());
    assert_eq!(
        imbalance(&BTreeSet::new(), &lopsided),
        None,
        "no live worker"
    );
}

#[test]
fn release_on_shutdown() {
    assert!(still_owned(&[lease(0, None, false), lease(1, Some("a"), true)]).is_empty());
    assert_eq!(still_owned(&[lease(0, Some("a"), false)]).len(), 1);
    let mut pending = lease(0, None, false);
    pending.checkpoint_owner = Some(WorkerId::new("a"));
    assert_eq!(still_owned(&[pending]).len(), 1);
}

#[test]
fn counts_of_moves_and_outcomes() {
    let mut log = Log::new(3);
    log.put(0, 0, &[0, 1]).take(0, 0);
    let b = log.processed(0, 0, &[0], FAILED);
    log.push(Event::DeadLetter { id: b });
    log.processed(0, 0, &[1], BatchOutcome::Failed { fatal: true });
    log.take(1, 0);
    log.processed(1, 0, &[1], BatchOutcome::Panicked);
    log.take(2, 0);
    log.processed(2, 0, &[1], OK);
    log.handoff(2, 0);
    let c = log.counts();
    assert_eq!(
        (
            c.tenures,
            c.forced_moves,
            c.planned_moves,
            c.handoffs,
            c.failed_batches,
            c.fatal_batches,
            c.panicked_batches,
            c.dead_letters
        ),
        (3, 2, 1, 1, 1, 1, 1, 1)
    );
}

#[test]
fn a_release_after_the_lease_was_lost_is_no_planned_move() {
    // The holder saw its lease expire by its own clock (lease_lost: no final checkpoint),
    // nobody took it, and it released it at shutdown: what follows may repeat records.
    let run = |lost: bool| {
        let mut log = Log::new(2);
        log.put(0, 0, &[0, 1]).take(0, 0);
        log.processed(0, 0, &[0, 1], OK);
        if lost {
            log.push(Event::Callback {
                inc: 0,
                shard: shard(0),
                what: Callback::LeaseLost,
            });
        }
        log.release(0, 0).take(1, 0);
        log.processed(1, 0, &[0, 1], OK);
        log
    };
    run(true).assert_clean();
    assert_eq!(run(true).counts().planned_moves, 0);
    run(false).assert_only(Invariant::PlannedMoveDuplicate);

    // A panic is handled as a fatal error: the release after it is planned, so what was
    // processed before must not come again (what panicked must).
    let run = |again: &[u64]| {
        let mut log = Log::new(2);
        log.put(0, 0, &[0, 1]).take(0, 0);
        log.processed(0, 0, &[0], OK);
        log.processed(0, 0, &[1], BatchOutcome::Panicked);
        log.checkpoint(0, 0, 0, None).release(0, 0).take(1, 0);
        log.processed(1, 0, again, OK);
        log
    };
    run(&[1]).assert_clean();
    run(&[0, 1]).assert_only(Invariant::PlannedMoveDuplicate);
}

#[test]
fn a_restarted_worker_may_release_what_its_dead_predecessor_held() {
    // Incarnations 0 and 1 are the same worker id; 0 finished the shard but its release
    // failed, then it crashed; 1 releases the lease at its shutdown.
    let run = |ids: &[&str], crashed: bool| {
        let mut log = Log::with_workers(ids);
        log.put(0, 0, &[0]).take(0, 0);
        log.processed(0, 0, &[0], OK);
        log.shard_end(0, 0);
        if crashed {
            log.push(Event::Crash { inc: 0 });
        }
        log.release(1, 0);
        log
    };
    run(&["w0", "w0"], true).assert_clean();
    // The holder still alive, or another worker: not its release to make.
    run(&["w0", "w0"], false).assert_only(Invariant::ExclusiveDelivery);
    run(&["w0", "w1"], true).assert_only(Invariant::ExclusiveDelivery);
}

#[test]
fn a_lost_answer_is_not_a_lost_lease() {
    // The holder's renewal is applied but its answer lost; its next checkpoint, written on
    // the old counter, is refused; and it takes that for a lost lease although its own clock
    // says the lease is valid.
    let run = |other_wrote: Option<Op>, told: Callback| {
        let mut log = Log::new(2);
        log.put(0, 0, &[0]).take(0, 0).acked(0, 0);
        log.processed(0, 0, &[0], OK);
        log.write(0, Op::Renew, 0, ExtendedSequenceNumber::TrimHorizon, None)
            .answer_lost();
        if let Some(op) = other_wrote {
            log.write(1, op, 0, ExtendedSequenceNumber::TrimHorizon, None);
        }
        log.refused(0, Op::Checkpoint, 0).told_lost(0, 0, told);
        if other_wrote == Some(Op::Take) {
            log.processed(1, 0, &[0], OK);
        }
        log
    };
    run(None, Callback::LeaseLost).assert_only(Invariant::FalseLeaseLoss);
    run(None, Callback::CheckpointLeaseLost).assert_only(Invariant::FalseLeaseLoss);
    // Another worker took the lease, or asked for it: the refusal is not the holder's doing.
    run(Some(Op::Take), Callback::LeaseLost).assert_clean();
    run(Some(Op::RequestHandoff), Callback::CheckpointLeaseLost).assert_clean();

    // Told lost once its own clock says the lease may have expired: a legitimate stop (its
    // renewals were too slow, or never answered).
    let run = |after: Duration| {
        let mut log = Log::new(1);
        log.put(0, 0, &[0]).take(0, 0).acked(0, 0);
        log.processed(0, 0, &[0], OK);
        log.write(0, Op::Renew, 0, ExtendedSequenceNumber::TrimHorizon, None)
            .answer_lost();
        log.wait(after).told_lost(0, 0, Callback::LeaseLost);
        log
    };
    run(LEASE).assert_clean();
    run(LEASE / 2).assert_only(Invariant::FalseLeaseLoss);
    // An answer that came after the holder's clock ran out: it may have let the lease go
    // then (for good), whatever the answer says later.
    let mut log = Log::new(1);
    log.put(0, 0, &[0]).take(0, 0).acked(0, 0);
    log.processed(0, 0, &[0], OK);
    log.wait(LEASE / 2)
        .write(0, Op::Checkpoint, 0, pos(0), None);
    log.wait(LEASE / 2)
        .acked(0, 0)
        .told_lost(0, 0, Callback::LeaseLost);
    log.assert_clean();
    // Never an answer at all (the take's was lost too): no clock to contradict.
    let mut log = Log::new(1);
    log.put(0, 0, &[0]).take(0, 0);
    log.processed(0, 0, &[0], OK);
    log.told_lost(0, 0, Callback::LeaseLost);
    log.assert_clean();
}

/// Per-worker liveness: a worker that beats is valid by its heartbeat, not by its lease
/// writes; beside owners without a worker item (it renews per lease too), by both.
#[test]
fn false_lease_loss_by_heartbeat() {
    // Beats every third of the lease; told lost long after its last lease write but while its
    // heartbeat still held: a false loss.
    let beating = |beats: u32, renewed: bool| {
        let mut log = Log::new(1);
        let start = log.now();
        log.push(Event::Beat {
            inc: 0,
            sent: start,
        });
        log.put(0, 0, &[0]).take(0, 0).acked(0, 0);
        log.processed(0, 0, &[0], OK);
        if renewed {
            log.write(0, Op::Renew, 0, ExtendedSequenceNumber::TrimHorizon, None)
                .acked(0, 0);
        }
        for _ in 0..beats {
            log.wait(LEASE / 3);
            let sent = log.now();
            log.push(Event::Beat { inc: 0, sent });
        }
        log.wait(LEASE / 3).told_lost(0, 0, Callback::LeaseLost);
        log
    };
    beating(6, false).assert_only(Invariant::FalseLeaseLoss);
    // Renewing per lease as well, its lease writes ran out long ago: a legitimate stop.
    beating(6, true).assert_clean();
    // Its heartbeat ran out (no beat for a lease duration): a legitimate stop, and one after
    // the gap does not make the earlier loss false.
    let mut log = Log::new(1);
    let start = log.now();
    log.push(Event::Beat {
        inc: 0,
        sent: start,
    });
    log.put(0, 0, &[0]).take(0, 0).acked(0, 0);
    log.processed(0, 0, &[0], OK);
    log.wait(LEASE * 2);
    let late = log.now();
    log.push(Event::Beat { inc: 0, sent: late });
    log.told_lost(0, 0, Callback::LeaseLost);
    log.assert_clean();
}

impl Log {
    /// The last write's answer was lost (it was applied all the same).
    fn answer_lost(&mut self) -> &mut Self {
        if let Some(Entry {
            event: Event::Write { response_lost, .. },
            ..
        }) = self.entries.last_mut()
        {
            *response_lost = true;
        }
        self
    }

    /// The answer of `inc`'s last write of shard `s`'s lease reached it.
    fn acked(&mut self, inc: Inc, s: u32) -> &mut Self {
        let sent = self
            .entries
            .iter()
            .rev()
            .find_map(|e| match &e.event {
                Event::Write { inc: i, key, .. } if *i == inc && key.shard_id() == shard(s) => {
                    Some(e.at)
                }
                _ => None,
            })
            .unwrap_or_default();
        self.push(Event::Acked {
            inc,
            key: LeaseKey::for_shard(&shard(s)),
            sent,
        })
    }

    /// A write of `inc` the table refused.
    fn refused(&mut self, inc: Inc, op: Op, s: u32) -> &mut Self {
        self.push(Event::Write {
            inc,
            op,
            key: LeaseKey::for_shard(&shard(s)),
            outcome: Outcome::Refused,
            response_lost: false,
            batch: None,
            sent: self.now(),
        })
    }

    fn told_lost(&mut self, inc: Inc, s: u32, what: Callback) -> &mut Self {
        self.push(Event::Callback {
            inc,
            shard: shard(s),
            what,
        })
    }
}

/// `OrderedParallel` runs: a record attempt of `inc` on shard `s`.
fn record(log: &mut Log, inc: Inc, s: u32, idx: u64, ok: bool) {
    log.push(Event::RecordStart {
        inc,
        shard: shard(s),
        idx,
    });
    log.push(Event::RecordEnd {
        inc,
        shard: shard(s),
        idx,
        ok,
    });
}

#[test]
fn record_key_order() {
    // Key 0: records 0, 2, 4; key 1: records 1, 3. Attempts in the order given.
    let run = |attempts: &[(u64, bool)]| {
        let mut log = Log::new(1);
        log.put(0, 0, &[0])
            .put(0, 1, &[1])
            .put(0, 0, &[2])
            .put(0, 1, &[3])
            .put(0, 0, &[4]);
        log.take(0, 0);
        log.processed(0, 0, &[0, 1, 2, 3, 4], OK);
        for &(idx, ok) in attempts {
            record(&mut log, 0, 0, idx, ok);
        }
        log
    };
    // Keys interleave freely; a failed attempt is repeated.
    run(&[
        (1, true),
        (0, false),
        (0, true),
        (3, true),
        (2, true),
        (4, true),
    ])
    .assert_clean();
    // Key 0 out of order.
    run(&[(0, true), (4, true), (2, true), (1, true), (3, true)])
        .assert_only(Invariant::RecordKeyOrder);
    // A completed record run again.
    run(&[
        (0, true),
        (0, true),
        (1, true),
        (2, true),
        (3, true),
        (4, true),
    ])
    .assert_only(Invariant::RecordKeyOrder);

    // Two records of one key at once.
    let mut log = Log::new(1);
    log.put(0, 0, &[0, 1]).take(0, 0);
    log.processed(0, 0, &[0, 1], OK);
    for idx in [0, 1] {
        log.push(Event::RecordStart {
            inc: 0,
            shard: shard(0),
            idx,
        });
    }
    for idx in [0, 1] {
        log.push(Event::RecordEnd {
            inc: 0,
            shard: shard(0),
            idx,
            ok: true,
        });
    }
    log.assert_only(Invariant::RecordKeyOrder);

    // A new processor (the lease taken again, initialize) starts again from the checkpoint:
    // not a violation.
    let mut log = Log::new(1);
    log.put(0, 0, &[0, 1]).take(0, 0);
    log.processed(0, 0, &[0, 1], OK);
    record(&mut log, 0, 0, 0, true);
    record(&mut log, 0, 0, 1, true);
    log.wait(LEASE * 2).take(0, 0);
    log.push(Event::Callback {
        inc: 0,
        shard: shard(0),
        what: Callback::Initialize(ExtendedSequenceNumber::TrimHorizon),
    });
    log.processed(0, 0, &[0, 1], OK);
    record(&mut log, 0, 0, 0, true);
    record(&mut log, 0, 0, 1, true);
    log.assert_clean();
}

#[test]
fn checkpoint_within_the_completed_prefix() {
    // Records 0, 1, 2 (keys 0, 1, 2) accepted; 1 and 2 completed, then the checkpoint.
    let run = |checkpoint_at: u64, first_done: bool| {
        let mut log = Log::new(1);
        log.put(0, 0, &[0])
            .put(0, 1, &[1])
            .put(0, 2, &[2])
            .take(0, 0);
        log.processed(0, 0, &[0, 1, 2], OK);
        record(&mut log, 0, 0, 1, true);
        record(&mut log, 0, 0, 2, true);
        record(&mut log, 0, 0, 0, first_done);
        log.checkpoint(0, 0, checkpoint_at, None);
        log
    };
    // Record 0 failed: the largest completed record (2) is past the prefix.
    run(2, false).assert_only(Invariant::CheckpointPastPrefix);
    run(0, false).assert_only(Invariant::CheckpointPastPrefix);
    // Record 0 done: the prefix is 0..=2.
    run(2, true).assert_clean();
}
