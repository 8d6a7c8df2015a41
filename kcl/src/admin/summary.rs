//! `kcl leases`: where to measure a lease's lag from, and one line per worker.

use std::collections::BTreeMap;

use crate::lease::liveness::{WorkerItem, WorkerTable};
use crate::lease::{Lease, WorkerId};
use crate::record::ExtendedSequenceNumber;
use crate::retrieval::IteratorPosition;

/// Where to read one record to learn how far a lease is behind the shard's tip
/// (`MillisBehindLatest` of a `GetRecords` with limit 1 there): just after its checkpoint, at
/// the trim horizon for a lease that has not started, at `LATEST` for one that starts there
/// (no lag). `None` for a finished lease (`SHARD_END`): nothing is left to read.
///
/// ```
/// use kcl::admin::summary::lag_position;
/// use kcl::retrieval::IteratorPosition;
/// use kcl::ExtendedSequenceNumber;
/// assert_eq!(lag_position(&ExtendedSequenceNumber::TrimHorizon), Some(IteratorPosition::TrimHorizon));
/// assert_eq!(lag_position(&ExtendedSequenceNumber::ShardEnd), None);
/// ```
pub fn lag_position(checkpoint: &ExtendedSequenceNumber) -> Option<IteratorPosition> {
    match checkpoint {
        ExtendedSequenceNumber::TrimHorizon | ExtendedSequenceNumber::AtTimestamp => {
            Some(IteratorPosition::TrimHorizon)
        }
        ExtendedSequenceNumber::Latest => Some(IteratorPosition::Latest),
        ExtendedSequenceNumber::Sequence { sequence, .. } => {
            Some(IteratorPosition::AfterSequence(sequence.clone()))
        }
        ExtendedSequenceNumber::ShardEnd => None,
    }
}

/// A worker's heartbeat as seen by `kcl leases`.
///
/// ```
/// use kcl::admin::summary::Heartbeat;
/// assert_eq!(Heartbeat::NoItem.label(), "no-item");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Heartbeat {
    /// The worker table could not be read (or does not exist).
    NoWorkerTable,
    /// The worker has no item (a Java KCL worker, a worker renewing per lease, a pseudo-owner).
    NoItem,
    /// Its item is fenced: declared dead.
    Fenced,
    /// Read once: its heartbeat value (not observed over time).
    Seen(u64),
    /// Read twice, `--observe` apart: the heartbeat moved.
    Moving(u64),
    /// Read twice, `--observe` apart: the heartbeat stood still.
    Still(u64),
}

impl Heartbeat {
    /// A short word for tables and JSON: `no-table`, `no-item`, `fenced`, `seen`, `moving`,
    /// `still`.
    ///
    /// ```
    /// use kcl::admin::summary::Heartbeat;
    /// assert_eq!(Heartbeat::Moving(3).label(), "moving");
    /// ```
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoWorkerTable => "no-table",
            Self::NoItem => "no-item",
            Self::Fenced => "fenced",
            Self::Seen(_) => "seen",
            Self::Moving(_) => "moving",
            Self::Still(_) => "still",
        }
    }

    /// The heartbeat value, when there is an item.
    ///
    /// ```
    /// use kcl::admin::summary::Heartbeat;
    /// assert_eq!(Heartbeat::Still(7).value(), Some(7));
    /// ```
    pub fn value(&self) -> Option<u64> {
        match self {
            Self::Seen(n) | Self::Moving(n) | Self::Still(n) => Some(*n),
            _ => None,
        }
    }
}

/// One worker of the lease table or the worker table.
///
/// ```
/// let rows = kcl::admin::summary::worker_summary(&[], None, None);
/// assert!(rows.is_empty());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerSummary {
    /// The worker id.
    pub worker: WorkerId,
    /// Leases whose `leaseOwner` it is (including those being handed to it).
    pub leases: usize,
    /// Leases it is handing over (`checkpointOwner` is it).
    pub handing_over: usize,
    /// Leases being handed to it (`leaseOwner` is it, `checkpointOwner` another).
    pub receiving: usize,
    /// Its heartbeat.
    pub heartbeat: Heartbeat,
    /// Handoff notices waiting in its item.
    pub notices: usize,
    /// An operator asked it to drain (`kcl drain`): it takes no lease.
    pub draining: bool,
}

/// One row per worker named by a lease (`leaseOwner`, `checkpointOwner`) or by an item of the
/// worker table, sorted by id. `workers` is the worker table as first read (`None`: none could
/// be read); `workers_later`, the same read again after an observation period, if any.
///
/// ```
/// use kcl::admin::summary::{worker_summary, Heartbeat};
/// use kcl::lease::WorkerId;
/// use kcl::{ExtendedSequenceNumber, Lease, ShardId};
/// let mut l = Lease::new(&ShardId::new("shardId-0"), ExtendedSequenceNumber::TrimHorizon);
/// l.owner = Some(WorkerId::new("java-1"));
/// let rows = worker_summary(&[l], None, None);
/// assert_eq!((rows[0].leases, &rows[0].heartbeat), (1, &Heartbeat::NoWorkerTable));
/// ```
pub fn worker_summary(
    leases: &[Lease],
    workers: Option<&WorkerTable>,
    workers_later: Option<&WorkerTable>,
) -> Vec<WorkerSummary> {
    let mut rows: BTreeMap<WorkerId, WorkerSummary> = BTreeMap::new();
    let row = |rows: &mut BTreeMap<WorkerId, WorkerSummary>, w: &WorkerId| {
        rows.entry(w.clone())
            .or_insert_with(|| WorkerSummary {
                worker: w.clone(),
                leases: 0,
                handing_over: 0,
                receiving: 0,
                heartbeat: Heartbeat::NoWorkerTable,
                notices: 0,
                draining: false,
            })
            .worker
            .clone()
    };
    for l in leases {
        if let Some(o) = &l.owner {
            let k = row(&mut rows, o);
            if let Some(r) = rows.get_mut(&k) {
                r.leases += 1;
                r.receiving += usize::from(l.checkpoint_owner.is_some());
            }
        }
        if let Some(c) = &l.checkpoint_owner {
            let k = row(&mut rows, c);
            if let Some(r) = rows.get_mut(&k) {
                r.handing_over += 1;
            }
        }
    }
    let items = |t: Option<&WorkerTable>| -> Option<BTreeMap<WorkerId, WorkerItem>> {
        t.map(|t| {
            t.workers
                .iter()
                .map(|w| (w.worker.clone(), w.clone()))
                .collect()
        })
    };
    let first = items(workers);
    let later = items(workers_later);
    if let Some(first) = &first {
        for w in first.keys() {
            row(&mut rows, w);
        }
    }
    for r in rows.values_mut() {
        let Some(first) = &first else { continue };
        let Some(a) = first.get(&r.worker) else {
            r.heartbeat = Heartbeat::NoItem;
            continue;
        };
        let b = later.as_ref().and_then(|l| l.get(&r.worker));
        r.notices = b.unwrap_or(a).handoffs.len();
        r.draining = b.unwrap_or(a).is_draining();
        r.heartbeat = match (later.as_ref(), b) {
            _ if b.unwrap_or(a).fenced_by.is_some() => Heartbeat::Fenced,
            (None, _) => Heartbeat::Seen(a.heartbeat),
            // Removed during the observation: it stopped.
            (Some(_), None) => Heartbeat::NoItem,
            (Some(_), Some(b)) if b.incarnation != a.incarnation || b.heartbeat != a.heartbeat => {
                Heartbeat::Moving(b.heartbeat)
            }
            (Some(_), Some(b)) => Heartbeat::Still(b.heartbeat),
        };
    }
    rows.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Name, worker table first and later, the rows expected.
    /// Worker, leases, handing over, receiving, heartbeat, notices.
    type Row<'a> = (&'a str, usize, usize, usize, &'static str, usize);
    type Case<'a> = (
        &'a str,
        Option<&'a WorkerTable>,
        Option<&'a WorkerTable>,
        Vec<Row<'a>>,
    );
    use crate::lease::liveness::HandoffNotice;
    use crate::lease::LeaseKey;
    use crate::record::SequenceNumber;
    use crate::shard::ShardId;

    fn lease(n: u32, owner: Option<&str>, from: Option<&str>) -> Lease {
        let mut l = Lease::new(
            &ShardId::new(format!("shardId-{n}")),
            ExtendedSequenceNumber::TrimHorizon,
        );
        l.owner = owner.map(WorkerId::new);
        l.checkpoint_owner = from.map(WorkerId::new);
        l
    }

    fn item(w: &str, incarnation: u64, heartbeat: u64, fenced: bool, notices: u64) -> WorkerItem {
        let mut i = WorkerItem::new(WorkerId::new(w), incarnation);
        i.heartbeat = heartbeat;
        i.fenced_by = fenced.then(|| WorkerId::new("x"));
        i.handoffs = (0..notices)
            .map(|n| HandoffNotice::new(LeaseKey::new("shardId-0"), n))
            .collect();
        i
    }

    fn table(items: Vec<WorkerItem>) -> WorkerTable {
        WorkerTable::new(items, Vec::new())
    }

    #[test]
    fn one_row_per_worker() {
        let leases = vec![
            lease(0, Some("a"), None),
            lease(1, Some("a"), None),
            lease(2, Some("b"), Some("a")),
            lease(3, None, None),
            lease(4, Some("java"), None),
        ];
        let before = table(vec![
            item("a", 1, 10, false, 1),
            item("b", 1, 5, false, 0),
            item("idle", 1, 7, false, 0),
            item("dead", 1, 3, false, 0),
            item("gone", 1, 3, false, 0),
        ]);
        let after = table(vec![
            item("a", 1, 11, false, 0),
            item("b", 2, 0, false, 0),
            item("idle", 1, 8, false, 0),
            item("dead", 1, 3, true, 0),
        ]);
        let view =
            |rows: Vec<WorkerSummary>| -> Vec<(String, usize, usize, usize, &'static str, usize)> {
                rows.into_iter()
                    .map(|r| {
                        (
                            r.worker.to_string(),
                            r.leases,
                            r.handing_over,
                            r.receiving,
                            r.heartbeat.label(),
                            r.notices,
                        )
                    })
                    .collect()
            };
        let own = |v: Vec<Row<'_>>| -> Vec<(String, usize, usize, usize, &'static str, usize)> {
            v.into_iter()
                .map(|(w, a, b, c, d, e)| (w.to_owned(), a, b, c, d, e))
                .collect()
        };
        #[rustfmt::skip]
        let cases: Vec<Case<'_>> = vec![
            ("no worker table", None, None, vec![
                ("a", 2, 1, 0, "no-table", 0), ("b", 1, 0, 1, "no-table", 0), ("java", 1, 0, 0, "no-table", 0)]),
            ("read once", Some(&before), None, vec![
                ("a", 2, 1, 0, "seen", 1), ("b", 1, 0, 1, "seen", 0), ("dead", 0, 0, 0, "seen", 0),
                ("gone", 0, 0, 0, "seen", 0), ("idle", 0, 0, 0, "seen", 0), ("java", 1, 0, 0, "no-item", 0)]),
            ("observed", Some(&before), Some(&after), vec![
                ("a", 2, 1, 0, "moving", 0), ("b", 1, 0, 1, "moving", 0), ("dead", 0, 0, 0, "fenced", 0),
                ("gone", 0, 0, 0, "no-item", 0), ("idle", 0, 0, 0, "moving", 0), ("java", 1, 0, 0, "no-item", 0)]),
            ("observed, still", Some(&before), Some(&before), vec![
                ("a", 2, 1, 0, "still", 1), ("b", 1, 0, 1, "still", 0), ("dead", 0, 0, 0, "still", 0),
                ("gone", 0, 0, 0, "still", 0), ("idle", 0, 0, 0, "still", 0), ("java", 1, 0, 0, "no-item", 0)]),
        ];
        for (name, a, b, want) in cases {
            assert_eq!(view(worker_summary(&leases, a, b)), own(want), "{name}");
        }
    }

    #[test]
    fn lag_is_measured_after_the_checkpoint() {
        let s = SequenceNumber::from_u128(42);
        #[rustfmt::skip]
        let table = vec![
            (ExtendedSequenceNumber::TrimHorizon, Some(IteratorPosition::TrimHorizon)),
            (ExtendedSequenceNumber::AtTimestamp, Some(IteratorPosition::TrimHorizon)),
            (ExtendedSequenceNumber::Latest, Some(IteratorPosition::Latest)),
            (ExtendedSequenceNumber::at(s.clone(), 3), Some(IteratorPosition::AfterSequence(s))),
            (ExtendedSequenceNumber::ShardEnd, None),
        ];
        for (cp, want) in table {
            assert_eq!(lag_position(&cp), want, "{cp}");
        }
    }
}
