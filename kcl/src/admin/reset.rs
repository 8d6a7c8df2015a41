//! `kcl reset`: which leases move to which checkpoint.
//!
//! [`plan_reset`] turns a request (one shard or all, and a target position) into steps, one
//! per lease, parents before their descendants:
//!
//! - the target becomes a checkpoint the next owner resumes from: `TRIM_HORIZON`; a sequence
//!   number `N` (the records after `N` are delivered again); for `latest` and
//!   `at-timestamp=T`, the checkpoint `LATEST` with `latestResolvedAt` set so that the next
//!   owner (of this library) resumes `AT_TIMESTAMP` at exactly `T` (or the time of the reset);
//! - resetting a shard resets every descendant that has started (its checkpoint is past its
//!   initial position) to `TRIM_HORIZON`: a child at an initial position waits for its parents
//!   to finish, so the keys that moved from the parent to the child are delivered again in
//!   order, parent first;
//! - a shard `ListShards` no longer lists (past retention) cannot be reset: its records are
//!   gone. With `--all` its lease is skipped;
//! - a sequence number must lie within the shard's range, and names one shard only.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use crate::lease::Lease;
use crate::record::{ExtendedSequenceNumber, SequenceNumber};
use crate::shard::{Shard, ShardId};

/// How much earlier than `latestResolvedAt` a worker of this library resumes
/// (`retrieval::LATEST_RESTART_MARGIN`): the reset stores the target time plus this.
///
/// ```
/// assert_eq!(kcl::admin::reset::RESUME_MARGIN, std::time::Duration::from_secs(1));
/// ```
pub const RESUME_MARGIN: Duration = crate::retrieval::LATEST_RESTART_MARGIN;

/// Where `kcl reset --to` moves checkpoints.
///
/// ```
/// use kcl::admin::reset::ResetTarget;
/// assert_eq!(ResetTarget::TrimHorizon.to_string(), "trim-horizon");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResetTarget {
    /// The oldest record still in the shard.
    TrimHorizon,
    /// The records that arrive from now on (the time of the reset, on this machine's clock).
    Latest,
    /// The first record that arrived at or after this time.
    AtTimestamp(SystemTime),
    /// The records after this sequence number (one shard only).
    Sequence(SequenceNumber),
}

impl std::fmt::Display for ResetTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TrimHorizon => f.write_str("trim-horizon"),
            Self::Latest => f.write_str("latest"),
            Self::AtTimestamp(t) => {
                let ms = t
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                write!(f, "at-timestamp={ms}ms")
            }
            Self::Sequence(n) => write!(f, "seq={n}"),
        }
    }
}

/// Which leases a reset is for.
///
/// ```
/// use kcl::admin::reset::ResetScope;
/// let one = ResetScope::Shard(kcl::ShardId::new("shardId-000000000001"));
/// assert_ne!(one, ResetScope::All);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResetScope {
    /// One shard (and its descendants that started).
    Shard(ShardId),
    /// Every lease of a shard still listed.
    All,
}

/// Why a lease is in the plan.
///
/// ```
/// use kcl::admin::reset::StepReason;
/// assert_eq!(StepReason::Requested.label(), "requested");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StepReason {
    /// Named by the request.
    Requested,
    /// A descendant of a shard being reset, sent back to `TRIM_HORIZON` to wait for it.
    Descendant {
        /// The requested shard it descends from.
        of: ShardId,
    },
}

impl StepReason {
    /// `requested` or `descendant`.
    ///
    /// ```
    /// use kcl::admin::reset::StepReason;
    /// let r = StepReason::Descendant { of: kcl::ShardId::new("shardId-0") };
    /// assert_eq!(r.label(), "descendant");
    /// ```
    pub fn label(&self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Descendant { .. } => "descendant",
        }
    }
}

/// One lease of a reset plan.
///
/// ```
/// use kcl::admin::reset::{plan_reset, ResetScope, ResetTarget};
/// use kcl::{ExtendedSequenceNumber, Lease, ShardId};
/// let id = ShardId::new("shardId-0");
/// let lease = Lease::new(&id, ExtendedSequenceNumber::Latest);
/// let shard = kcl::shard::Shard::new(id.clone(), vec![], kcl::shard::HashKeyRange::FULL,
///     kcl::SequenceNumber::from_u128(1), None);
/// let plan = plan_reset(&[lease], &[shard], &ResetScope::Shard(id), &ResetTarget::TrimHorizon,
///     std::time::SystemTime::now()).unwrap();
/// assert_eq!(plan.steps[0].to, ExtendedSequenceNumber::TrimHorizon);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResetStep {
    /// The lease as read when planning.
    pub lease: Lease,
    /// The new checkpoint.
    pub to: ExtendedSequenceNumber,
    /// For a `LATEST` checkpoint: the `latestResolvedAt` to store with it (the target time
    /// plus [`RESUME_MARGIN`]).
    pub resolve_latest_at: Option<SystemTime>,
    /// Why it is in the plan.
    pub reason: StepReason,
    /// How many generations of known ancestors the shard has (0: none). Steps of one depth
    /// may run together; a depth starts once the shallower ones are done.
    pub depth: usize,
}

/// What [`plan_reset`] decided.
///
/// ```
/// let plan = kcl::admin::reset::ResetPlan::default();
/// assert!(plan.steps.is_empty() && plan.skipped.is_empty());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResetPlan {
    /// The leases to move, parents before descendants.
    pub steps: Vec<ResetStep>,
    /// Leases left as they are, each with the reason.
    pub skipped: Vec<(Lease, String)>,
}

/// Why a reset cannot be planned.
///
/// ```
/// use kcl::admin::reset::ResetPlanError;
/// let e = ResetPlanError::SequenceNeedsShard;
/// assert!(e.to_string().contains("--shard"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResetPlanError {
    /// The lease table has no lease for the shard.
    #[error("the lease table has no lease for --shard {0}")]
    NoLease(ShardId),
    /// The shard is no longer listed by `ListShards`: past the stream's retention.
    #[error(
        "--shard {0} is no longer listed by ListShards (past the stream's retention): its \
         records are gone and it cannot be read again"
    )]
    Expired(ShardId),
    /// `seq=N` with `--all`.
    #[error("--to seq=N names a position in one shard: use it with --shard, not --all")]
    SequenceNeedsShard,
    /// `seq=N` outside the shard's range.
    #[error("--to seq={seq} is not in --shard {shard} (its sequence numbers are {range})")]
    SequenceOutOfShard {
        /// The shard.
        shard: ShardId,
        /// The sequence number asked for.
        seq: SequenceNumber,
        /// The shard's range, as text.
        range: String,
    },
    /// `at-timestamp=T` with `T` in the future.
    #[error("--to at-timestamp is in the future")]
    FutureTimestamp,
}

/// Plans a reset of `scope` to `target`, on the lease table `leases` and the shards `shards`
/// listed by `ListShards` (open and closed), at time `now` (this machine's clock: what
/// `latest` stands for).
///
/// ```
/// use kcl::admin::reset::{plan_reset, ResetPlanError, ResetScope, ResetTarget};
/// use kcl::{ExtendedSequenceNumber, Lease, ShardId};
/// let id = ShardId::new("shardId-0");
/// let lease = Lease::new(&id, ExtendedSequenceNumber::TrimHorizon);
/// // Not listed any more: past retention.
/// let e = plan_reset(&[lease], &[], &ResetScope::Shard(id.clone()), &ResetTarget::Latest,
///     std::time::SystemTime::now());
/// assert_eq!(e, Err(ResetPlanError::Expired(id)));
/// ```
///
/// # Errors
/// [`ResetPlanError`]: the request names no lease, a shard past retention, or a position
/// outside the shard.
pub fn plan_reset(
    leases: &[Lease],
    shards: &[Shard],
    scope: &ResetScope,
    target: &ResetTarget,
    now: SystemTime,
) -> Result<ResetPlan, ResetPlanError> {
    let listed: BTreeMap<&ShardId, &Shard> = shards.iter().map(|s| (&s.id, s)).collect();
    let (to, resolve_latest_at) = match target {
        ResetTarget::TrimHorizon => (ExtendedSequenceNumber::TrimHorizon, None),
        ResetTarget::Latest => (ExtendedSequenceNumber::Latest, Some(now + RESUME_MARGIN)),
        ResetTarget::AtTimestamp(t) => {
            if *t > now {
                return Err(ResetPlanError::FutureTimestamp);
            }
            (ExtendedSequenceNumber::Latest, Some(*t + RESUME_MARGIN))
        }
        ResetTarget::Sequence(n) => (ExtendedSequenceNumber::at(n.clone(), 0), None),
    };
    // Parents of every shard known (listing and leases).
    let mut parents: BTreeMap<ShardId, BTreeSet<ShardId>> = BTreeMap::new();
    for s in shards {
        parents
            .entry(s.id.clone())
            .or_default()
            .extend(s.parents().cloned());
    }
    for l in leases {
        parents
            .entry(l.shard_id())
            .or_default()
            .extend(l.parent_shard_ids.iter().cloned());
    }
    let mut plan = ResetPlan::default();
    let push = |plan: &mut ResetPlan,
                lease: &Lease,
                to: ExtendedSequenceNumber,
                at: Option<SystemTime>,
                reason: StepReason| {
        if lease.checkpoint == to && at.is_none() {
            plan.skipped
                .push((lease.clone(), format!("already at {to}")));
        } else {
            plan.steps.push(ResetStep {
                lease: lease.clone(),
                to,
                resolve_latest_at: at,
                reason,
                depth: depth_of(&lease.shard_id(), &parents),
            });
        }
    };
    match scope {
        ResetScope::All => {
            if matches!(target, ResetTarget::Sequence(_)) {
                return Err(ResetPlanError::SequenceNeedsShard);
            }
            for l in leases {
                if listed.contains_key(&l.shard_id()) {
                    push(
                        &mut plan,
                        l,
                        to.clone(),
                        resolve_latest_at,
                        StepReason::Requested,
                    );
                } else {
                    plan.skipped.push((
                        l.clone(),
                        "shard no longer listed (past retention)".to_owned(),
                    ));
                }
            }
        }
        ResetScope::Shard(id) => {
            let lease = leases
                .iter()
                .find(|l| l.shard_id() == *id)
                .ok_or_else(|| ResetPlanError::NoLease(id.clone()))?;
            let shard = listed
                .get(id)
                .ok_or_else(|| ResetPlanError::Expired(id.clone()))?;
            if let ResetTarget::Sequence(n) = target {
                let after_start = *n >= shard.starting_sequence;
                let before_end = shard.ending_sequence.as_ref().is_none_or(|e| n <= e);
                if !(after_start && before_end) {
                    let range = match &shard.ending_sequence {
                        Some(e) => format!("{} to {e}", shard.starting_sequence),
                        None => format!("{} onwards", shard.starting_sequence),
                    };
                    return Err(ResetPlanError::SequenceOutOfShard {
                        shard: id.clone(),
                        seq: n.clone(),
                        range,
                    });
                }
            }
            push(
                &mut plan,
                lease,
                to,
                resolve_latest_at,
                StepReason::Requested,
            );
            for l in leases {
                let sid = l.shard_id();
                if sid == *id || !descends_from(&sid, id, &parents) {
                    continue;
                }
                if l.checkpoint.is_initial() {
                    plan.skipped.push((
                        l.clone(),
                        format!("descendant of {id} not started: it waits for its parents"),
                    ));
                } else {
                    push(
                        &mut plan,
                        l,
                        ExtendedSequenceNumber::TrimHorizon,
                        None,
                        StepReason::Descendant { of: id.clone() },
                    );
                }
            }
        }
    }
    plan.steps
        .sort_by(|a, b| (a.depth, &a.lease.key).cmp(&(b.depth, &b.lease.key)));
    Ok(plan)
}

/// The length of the longest chain of known ancestors of `id`.
fn depth_of(id: &ShardId, parents: &BTreeMap<ShardId, BTreeSet<ShardId>>) -> usize {
    let mut depth = 0;
    let mut level: BTreeSet<&ShardId> = BTreeSet::from([id]);
    // Bounded: a malformed table with a cycle must not loop forever.
    while depth <= parents.len() {
        let next: BTreeSet<&ShardId> = level
            .iter()
            .filter_map(|s| parents.get(*s))
            .flatten()
            .collect();
        if next.is_empty() {
            break;
        }
        depth += 1;
        level = next;
    }
    depth
}

/// True if `ancestor` is a (transitive) parent of `id`.
fn descends_from(
    id: &ShardId,
    ancestor: &ShardId,
    parents: &BTreeMap<ShardId, BTreeSet<ShardId>>,
) -> bool {
    let mut seen = BTreeSet::new();
    let mut todo = vec![id];
    while let Some(s) = todo.pop() {
        for p in parents.get(s).into_iter().flatten() {
            if p == ancestor {
                return true;
            }
            if seen.insert(p) {
                todo.push(p);
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Name, scope, target, the steps expected.
    type Case = (
        &'static str,
        ResetScope,
        ResetTarget,
        Result<Vec<Row>, ResetPlanError>,
    );
    use crate::shard::HashKeyRange;

    fn sid(n: u32) -> ShardId {
        ShardId::new(format!("shardId-{n:012}"))
    }

    fn seq(n: u128) -> SequenceNumber {
        SequenceNumber::from_u128(n)
    }

    fn at(n: u128) -> ExtendedSequenceNumber {
        ExtendedSequenceNumber::at(seq(n), 0)
    }

    fn shard(n: u32, parents: &[u32], start: u128, end: Option<u128>) -> Shard {
        Shard::new(
            sid(n),
            parents.iter().map(|p| sid(*p)).collect(),
            HashKeyRange::FULL,
            seq(start),
            end.map(seq),
        )
    }

    fn lease(n: u32, parents: &[u32], cp: ExtendedSequenceNumber) -> Lease {
        Lease::new(&sid(n), cp).with_parents(parents.iter().map(|p| sid(*p)))
    }

    /// 0 split into 1 and 2 (both started); 1 and 2 merged into 3 (not started); 4 has no
    /// relatives; 9 left the stream (past retention).
    fn fixture() -> (Vec<Lease>, Vec<Shard>) {
        let leases = vec![
            lease(0, &[], ExtendedSequenceNumber::ShardEnd),
            lease(1, &[0], at(150)),
            lease(2, &[0], ExtendedSequenceNumber::ShardEnd),
            lease(3, &[1, 2], ExtendedSequenceNumber::TrimHorizon),
            lease(4, &[], at(420)),
            lease(9, &[], at(900)),
        ];
        let shards = vec![
            shard(0, &[], 100, Some(199)),
            shard(1, &[0], 140, None),
            shard(2, &[0], 200, Some(299)),
            shard(3, &[1, 2], 300, None),
            shard(4, &[], 400, None),
        ];
        (leases, shards)
    }

    type Row = (
        u32,
        ExtendedSequenceNumber,
        Option<SystemTime>,
        &'static str,
    );

    fn rows(plan: &ResetPlan) -> Vec<Row> {
        plan.steps
            .iter()
            .map(|s| {
                let n: u32 = s
                    .lease
                    .shard_id()
                    .as_str()
                    .trim_start_matches("shardId-")
                    .parse()
                    .unwrap_or(u32::MAX);
                (n, s.to.clone(), s.resolve_latest_at, s.reason.label())
            })
            .collect()
    }

    #[test]
    fn plans() {
        let (leases, shards) = fixture();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let t = now - Duration::from_secs(3600);
        let th = ExtendedSequenceNumber::TrimHorizon;
        let latest = ExtendedSequenceNumber::Latest;
        let one = |n| ResetScope::Shard(sid(n));
        #[rustfmt::skip]
        let table: Vec<Case> = vec![
            ("a lone shard to trim-horizon", one(4), ResetTarget::TrimHorizon,
                Ok(vec![(4, th.clone(), None, "requested")])),
            ("latest resolves to now: the next owner starts at the reset, not at a stale latestResolvedAt",
                one(4), ResetTarget::Latest,
                Ok(vec![(4, latest.clone(), Some(now + RESUME_MARGIN), "requested")])),
            ("at-timestamp is LATEST resolved at T (plus the margin the reader takes off)",
                one(4), ResetTarget::AtTimestamp(t),
                Ok(vec![(4, latest.clone(), Some(t + RESUME_MARGIN), "requested")])),
            ("a sequence number in the shard", one(4), ResetTarget::Sequence(seq(410)),
                Ok(vec![(4, at(410), None, "requested")])),
            ("the parent: its started descendants go back to trim-horizon, parent first; the merge child that has not started is left waiting",
                one(0), ResetTarget::Sequence(seq(120)),
                Ok(vec![(0, at(120), None, "requested"), (1, th.clone(), None, "descendant"), (2, th.clone(), None, "descendant")])),
            ("a middle shard: only its own descendants", one(2), ResetTarget::TrimHorizon,
                Ok(vec![(2, th.clone(), None, "requested")])),
            ("all: every listed shard, parents (depth 0) before children, the expired one skipped", ResetScope::All, ResetTarget::TrimHorizon,
                Ok(vec![(0, th.clone(), None, "requested"), (4, th.clone(), None, "requested"), (1, th.clone(), None, "requested"), (2, th.clone(), None, "requested")])),
            ("all to a time", ResetScope::All, ResetTarget::AtTimestamp(t),
                Ok(vec![(0, latest.clone(), Some(t + RESUME_MARGIN), "requested"), (4, latest.clone(), Some(t + RESUME_MARGIN), "requested"), (1, latest.clone(), Some(t + RESUME_MARGIN), "requested"), (2, latest.clone(), Some(t + RESUME_MARGIN), "requested"), (3, latest.clone(), Some(t + RESUME_MARGIN), "requested")])),
            ("all with a sequence number", ResetScope::All, ResetTarget::Sequence(seq(1)),
                Err(ResetPlanError::SequenceNeedsShard)),
            ("a shard past retention", one(9), ResetTarget::TrimHorizon,
                Err(ResetPlanError::Expired(sid(9)))),
            ("a shard without a lease", one(7), ResetTarget::TrimHorizon,
                Err(ResetPlanError::NoLease(sid(7)))),
            ("a sequence number before the shard", one(4), ResetTarget::Sequence(seq(399)),
                Err(ResetPlanError::SequenceOutOfShard { shard: sid(4), seq: seq(399), range: "400 onwards".into() })),
            ("a sequence number after a closed shard's end", one(2), ResetTarget::Sequence(seq(300)),
                Err(ResetPlanError::SequenceOutOfShard { shard: sid(2), seq: seq(300), range: "200 to 299".into() })),
            ("a time in the future", one(4), ResetTarget::AtTimestamp(now + Duration::from_secs(1)),
                Err(ResetPlanError::FutureTimestamp)),
        ];
        for (name, scope, target, want) in table {
            let got = plan_reset(&leases, &shards, &scope, &target, now).map(|p| rows(&p));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn what_is_skipped_says_why() {
        let (leases, shards) = fixture();
        let now = SystemTime::now();
        let all = plan_reset(
            &leases,
            &shards,
            &ResetScope::All,
            &ResetTarget::TrimHorizon,
            now,
        )
        .map(|p| {
            p.skipped
                .iter()
                .map(|(l, why)| (l.shard_id(), why.clone()))
                .collect::<Vec<_>>()
        });
        assert_eq!(
            all,
            Ok(vec![
                (sid(3), "already at TRIM_HORIZON".to_owned()),
                (sid(9), "shard no longer listed (past retention)".to_owned()),
            ])
        );
        let parent = plan_reset(
            &leases,
            &shards,
            &ResetScope::Shard(sid(0)),
            &ResetTarget::TrimHorizon,
            now,
        )
        .map(|p| {
            p.skipped
                .iter()
                .map(|(l, _)| l.shard_id())
                .collect::<Vec<_>>()
        });
        assert_eq!(parent, Ok(vec![sid(3)]));
    }

    #[test]
    fn a_cycle_in_a_malformed_table_terminates() {
        let leases = vec![lease(1, &[2], at(1)), lease(2, &[1], at(2))];
        let shards = vec![shard(1, &[2], 1, None), shard(2, &[1], 1, None)];
        let plan = plan_reset(
            &leases,
            &shards,
            &ResetScope::Shard(sid(1)),
            &ResetTarget::TrimHorizon,
            SystemTime::now(),
        );
        assert!(plan.is_ok());
    }
}
