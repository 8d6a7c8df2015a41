//! Worker liveness: one small item per worker instead of a renewal per lease.
//!
//! Each worker keeps an item in the *worker table* (`<lease table>-workers`, hash key
//! `workerId`) and bumps its `heartbeat` every `renew_interval`. A lease owned by a worker
//! that has an item is alive while that heartbeat moves, observed on the observer's own
//! monotonic clock exactly as lease counters are ([`WorkerView`]). So the table costs one small
//! write per worker per interval, whatever the number of shards; the lease items are written
//! only when something happens to them (take, checkpoint, handoff, release).
//!
//! **Fencing.** Before taking the leases of a worker whose heartbeat stood still for
//! `lease_duration`, the taker writes `fencedBy` into that worker's item, on condition that the
//! heartbeat (and the item's `incarnation`) are still those it saw. A heartbeat is conditional
//! on `fencedBy` being absent. So a worker's heartbeat and its fencing exclude each other: a
//! slow worker whose heartbeat lands late finds itself fenced (and drops every lease) instead of
//! carrying on beside the new owners. Until it is fenced nobody takes its leases, so a late
//! heartbeat that succeeds revives nothing that was taken.
//!
//! **Owners without an item** (Java KCL workers in a rolling migration, or stores without a
//! worker table) are judged per lease, by the lease counter, as before; while such owners are in
//! the table every worker of ours renews its leases per lease as well.
//!
//! The item also carries what peers need to plan without reading the lease table: the number of
//! leases the worker holds (`leaseCount`), a counter of the changes it made to the set of
//! leases (`tableChanges`: created or deleted leases), and the leases peers asked it to hand
//! over (`handoffs`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use super::item::{AttrValue, Item};
use super::store::MalformedLease;
use super::{LeaseKey, WorkerId};

/// One handoff request told to a lease's owner: the lease and a nonce of the request, stored
/// as `<nonce>/<leaseKey>` in the owner's `handoffs` set. The owner removes exactly the
/// notices it dealt with, so a newer request for the same lease is never lost with them.
///
/// ```
/// use kcl::lease::liveness::HandoffNotice;
/// use kcl::lease::LeaseKey;
///
/// let n = HandoffNotice::new(LeaseKey::new("shardId-1"), 0xab);
/// assert_eq!(n.to_string(), "ab/shardId-1");
/// assert_eq!("ab/shardId-1".parse::<HandoffNotice>().unwrap(), n);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HandoffNotice {
    /// The lease asked for.
    pub key: LeaseKey,
    /// Tells this request from earlier ones for the same lease.
    pub nonce: u64,
}

impl HandoffNotice {
    /// A notice for `key`.
    pub fn new(key: LeaseKey, nonce: u64) -> Self {
        Self { key, nonce }
    }
}

impl std::fmt::Display for HandoffNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}/{}", self.nonce, self.key)
    }
}

impl std::str::FromStr for HandoffNotice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (nonce, key) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not <nonce>/<leaseKey>"))?;
        let nonce = u64::from_str_radix(nonce, 16)
            .map_err(|e| format!("{s:?}: the nonce is not hexadecimal ({e})"))?;
        if key.is_empty() {
            return Err(format!("{s:?} names no lease"));
        }
        Ok(Self::new(LeaseKey::new(key), nonce))
    }
}

/// Attribute names of worker items.
pub mod attr {
    /// The hash key: the worker id.
    pub const WORKER_ID: &str = "workerId";
    /// Random per registration: a restarted worker is a new incarnation.
    pub const INCARNATION: &str = "incarnation";
    /// Bumped by every heartbeat.
    pub const HEARTBEAT: &str = "heartbeat";
    /// The leases the worker holds.
    pub const LEASE_COUNT: &str = "leaseCount";
    /// Changes the worker made to the set of leases (absent while 0).
    pub const TABLE_CHANGES: &str = "tableChanges";
    /// The worker that fenced this one (declared it dead).
    pub const FENCED_BY: &str = "fencedBy";
    /// Leases peers asked this worker to hand over (string set).
    pub const HANDOFFS: &str = "handoffs";
    /// The throughput of all the worker's leases together, KiB per second (absent while 0).
    pub const THROUGHPUT: &str = "throughputKBps";
    /// Set by an operator (`kcl drain`): the worker hands its leases to its peers and takes
    /// none. Milliseconds since the Unix epoch when it was asked. A new incarnation (a restart)
    /// writes a fresh item without it.
    pub const DRAINING: &str = "drainingSince";
}

/// A worker's liveness item.
///
/// ```
/// use kcl::lease::liveness::WorkerItem;
/// use kcl::WorkerId;
///
/// let item = WorkerItem::new(WorkerId::new("pod-1"), 42);
/// assert_eq!(item.heartbeat, 0);
/// assert!(item.fenced_by.is_none());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerItem {
    /// `workerId`.
    pub worker: WorkerId,
    /// `incarnation`: random per registration.
    pub incarnation: u64,
    /// `heartbeat`: bumped by every heartbeat.
    pub heartbeat: u64,
    /// `leaseCount`: the leases the worker holds.
    pub lease_count: u64,
    /// `tableChanges`: leases the worker created or deleted so far.
    pub table_changes: u64,
    /// `fencedBy`: set once a peer declared the worker dead.
    pub fenced_by: Option<WorkerId>,
    /// `handoffs`: leases peers asked the worker to hand over.
    pub handoffs: Vec<HandoffNotice>,
    /// `throughputKBps`, here in bytes per second: what all its leases carry together.
    pub throughput: u64,
    /// `drainingSince`: when an operator asked the worker to drain (milliseconds since the
    /// Unix epoch). A draining worker takes no lease, and its peers ask for all of its leases.
    pub draining_since: Option<u64>,
}

impl WorkerItem {
    /// A freshly registered worker.
    pub fn new(worker: WorkerId, incarnation: u64) -> Self {
        Self {
            worker,
            incarnation,
            heartbeat: 0,
            lease_count: 0,
            table_changes: 0,
            fenced_by: None,
            handoffs: Vec::new(),
            throughput: 0,
            draining_since: None,
        }
    }

    /// Whether an operator asked this worker to drain.
    ///
    /// ```
    /// use kcl::lease::liveness::WorkerItem;
    /// use kcl::WorkerId;
    ///
    /// let mut item = WorkerItem::new(WorkerId::new("pod-1"), 42);
    /// assert!(!item.is_draining());
    /// item.draining_since = Some(1_764_633_600_000);
    /// assert!(item.is_draining());
    /// ```
    pub fn is_draining(&self) -> bool {
        self.draining_since.is_some()
    }
}

/// What one heartbeat writes.
///
/// ```
/// use kcl::lease::liveness::Beat;
/// use kcl::WorkerId;
///
/// let beat = Beat::new(WorkerId::new("pod-1"), 42).lease_count(3);
/// assert_eq!(beat.lease_count, 3);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Beat {
    /// The worker.
    pub worker: WorkerId,
    /// Its incarnation (the heartbeat fails if the item is another one's).
    pub incarnation: u64,
    /// `leaseCount` to publish.
    pub lease_count: u64,
    /// `tableChanges` to publish.
    pub table_changes: u64,
    /// Handoff requests dealt with: removed from `handoffs`.
    pub handled: Vec<HandoffNotice>,
    /// `throughputKBps` to publish, in bytes per second.
    pub throughput: u64,
}

impl Beat {
    /// A heartbeat of `worker`'s incarnation `incarnation`.
    pub fn new(worker: WorkerId, incarnation: u64) -> Self {
        Self {
            worker,
            incarnation,
            lease_count: 0,
            table_changes: 0,
            handled: Vec::new(),
            throughput: 0,
        }
    }

    /// Sets `throughputKBps` (given in bytes per second).
    pub fn throughput(mut self, bytes_per_sec: u64) -> Self {
        self.throughput = bytes_per_sec;
        self
    }

    /// Sets `leaseCount`.
    pub fn lease_count(mut self, n: u64) -> Self {
        self.lease_count = n;
        self
    }

    /// Sets `tableChanges`.
    pub fn table_changes(mut self, n: u64) -> Self {
        self.table_changes = n;
        self
    }

    /// Handoff requests to remove.
    pub fn handled(mut self, keys: Vec<HandoffNotice>) -> Self {
        self.handled = keys;
        self
    }
}

/// Everything read from the worker table.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct WorkerTable {
    /// The items that decoded, sorted by worker id.
    pub workers: Vec<WorkerItem>,
    /// Items that did not decode: reported, never used or overwritten.
    pub malformed: Vec<MalformedLease>,
}

impl WorkerTable {
    /// A worker table snapshot.
    pub fn new(mut workers: Vec<WorkerItem>, malformed: Vec<MalformedLease>) -> Self {
        workers.sort_by(|a, b| a.worker.cmp(&b.worker));
        Self { workers, malformed }
    }
}

/// Encodes a worker item.
///
/// ```
/// use kcl::lease::liveness::{decode, encode, WorkerItem};
/// use kcl::WorkerId;
///
/// let item = WorkerItem::new(WorkerId::new("pod-1"), 7);
/// assert_eq!(decode(&encode(&item)).unwrap(), item);
/// ```
pub fn encode(w: &WorkerItem) -> Item {
    let mut item = Item::new();
    let n = |v: u64| AttrValue::N(v.to_string());
    item.insert(attr::WORKER_ID.into(), AttrValue::S(w.worker.to_string()));
    item.insert(attr::INCARNATION.into(), n(w.incarnation));
    item.insert(attr::HEARTBEAT.into(), n(w.heartbeat));
    item.insert(attr::LEASE_COUNT.into(), n(w.lease_count));
    if w.table_changes > 0 {
        item.insert(attr::TABLE_CHANGES.into(), n(w.table_changes));
    }
    if let Some(f) = &w.fenced_by {
        item.insert(attr::FENCED_BY.into(), AttrValue::S(f.to_string()));
    }
    if w.throughput > 0 {
        item.insert(
            attr::THROUGHPUT.into(),
            crate::lease::item::throughput_kbps(w.throughput),
        );
    }
    if !w.handoffs.is_empty() {
        item.insert(
            attr::HANDOFFS.into(),
            AttrValue::Ss(w.handoffs.iter().map(|k| k.to_string()).collect()),
        );
    }
    if let Some(since) = w.draining_since {
        item.insert(attr::DRAINING.into(), n(since));
    }
    item
}

/// Decodes a worker item.
///
/// # Errors
/// [`MalformedLease`] naming the first missing or malformed attribute.
pub fn decode(item: &Item) -> Result<WorkerItem, MalformedLease> {
    let worker = match item.get(attr::WORKER_ID) {
        Some(AttrValue::S(w)) if !w.is_empty() => WorkerId::new(w.clone()),
        other => {
            return Err(MalformedLease::new(
                None,
                attr::WORKER_ID,
                format!("expected a non-empty string, got {other:?}"),
            ))
        }
    };
    let bad = |a: &'static str, why: String| MalformedLease::new(Some(worker.to_string()), a, why);
    let number = |a: &'static str, required: bool| -> Result<u64, MalformedLease> {
        match item.get(a) {
            None if !required => Ok(0),
            None => Err(bad(a, "missing".into())),
            Some(AttrValue::N(v)) => v
                .parse::<u64>()
                .map_err(|e| bad(a, format!("not a whole number: {v:?} ({e})"))),
            Some(other) => Err(bad(a, format!("expected a number, got {other:?}"))),
        }
    };
    let fenced_by = match item.get(attr::FENCED_BY) {
        None => None,
        Some(AttrValue::S(f)) => Some(WorkerId::new(f.clone())),
        Some(other) => {
            return Err(bad(
                attr::FENCED_BY,
                format!("expected a string, got {other:?}"),
            ))
        }
    };
    let handoffs = match item.get(attr::HANDOFFS) {
        None => Vec::new(),
        Some(AttrValue::Ss(notices)) => notices
            .iter()
            .map(|n| n.parse::<HandoffNotice>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|why| bad(attr::HANDOFFS, why))?,
        Some(other) => {
            return Err(bad(
                attr::HANDOFFS,
                format!("expected a string set, got {other:?}"),
            ))
        }
    };
    let throughput = match item.get(attr::THROUGHPUT) {
        None => 0,
        Some(AttrValue::N(v)) => {
            crate::lease::item::parse_throughput(v).map_err(|why| bad(attr::THROUGHPUT, why))?
        }
        Some(other) => {
            return Err(bad(
                attr::THROUGHPUT,
                format!("expected a number, got {other:?}"),
            ))
        }
    };
    let draining_since = match item.get(attr::DRAINING) {
        None => None,
        Some(_) => Some(number(attr::DRAINING, true)?),
    };
    Ok(WorkerItem {
        throughput,
        draining_since,
        incarnation: number(attr::INCARNATION, true)?,
        heartbeat: number(attr::HEARTBEAT, true)?,
        lease_count: number(attr::LEASE_COUNT, false)?,
        table_changes: number(attr::TABLE_CHANGES, false)?,
        fenced_by,
        handoffs,
        worker,
    })
}

/// How an observer judges the owner of a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Owner {
    /// Its heartbeat moves: its leases are valid.
    Live,
    /// Its heartbeat stood still for `lease_duration`: its leases may be taken once it is
    /// fenced (`Some`: the item to fence, as seen; `None`: already fenced, or its item is gone
    /// after we saw it — a worker removes its item only after releasing its leases).
    Dead(Option<WorkerItem>),
    /// No worker item: judged per lease, by the lease counter.
    PerLease,
}

/// What this worker has seen of the worker table: when each heartbeat last moved, by our
/// monotonic clock.
#[derive(Debug, Default)]
pub(crate) struct WorkerView {
    items: BTreeMap<WorkerId, (WorkerItem, Instant)>,
    /// Workers whose item we saw, then saw gone.
    departed: BTreeSet<WorkerId>,
}

impl WorkerView {
    /// Records a read of the worker table made at `now`.
    pub(crate) fn observe(&mut self, workers: &[WorkerItem], now: Instant) {
        let mut next = BTreeMap::new();
        for w in workers {
            let since = match self.items.get(&w.worker) {
                Some((seen, since))
                    if seen.incarnation == w.incarnation && seen.heartbeat == w.heartbeat =>
                {
                    *since
                }
                _ => now,
            };
            self.departed.remove(&w.worker);
            next.insert(w.worker.clone(), (w.clone(), since));
        }
        for gone in self.items.keys().filter(|k| !next.contains_key(*k)) {
            self.departed.insert(gone.clone());
        }
        self.items = next;
    }

    /// Whether the owner `w` is live at `now`, without cloning its item (taker rounds ask it for
    /// every lease of the table): `Some(true)` live, `Some(false)` dead, `None` judged per lease.
    pub(crate) fn is_live(
        &self,
        w: &WorkerId,
        now: Instant,
        lease_duration: Duration,
    ) -> Option<bool> {
        match self.items.get(w) {
            Some((item, since)) => Some(
                item.fenced_by.is_none() && now.saturating_duration_since(*since) < lease_duration,
            ),
            None if self.departed.contains(w) => Some(false),
            None => None,
        }
    }

    /// [`Self::is_live`] for every worker seen (live or dead; owners not in the map are judged
    /// per lease), for a round that asks it for every lease.
    pub(crate) fn judge_all(
        &self,
        now: Instant,
        lease_duration: Duration,
    ) -> crate::lease::taker::WorkerJudgments<'_> {
        let mut out = crate::lease::taker::WorkerJudgments::default();
        for w in self.items.keys().chain(self.departed.iter()) {
            if let Some(live) = self.is_live(w, now, lease_duration) {
                out.insert(w, live);
            }
        }
        out
    }

    /// How the owner `w` stands at `now`.
    pub(crate) fn judge(&self, w: &WorkerId, now: Instant, lease_duration: Duration) -> Owner {
        match self.items.get(w) {
            Some((item, _)) if item.fenced_by.is_some() => Owner::Dead(None),
            Some((item, since)) if now.saturating_duration_since(*since) >= lease_duration => {
                Owner::Dead(Some(item.clone()))
            }
            Some(_) => Owner::Live,
            None if self.departed.contains(w) => Owner::Dead(None),
            None => Owner::PerLease,
        }
    }

    /// When `w` is judged dead if its heartbeat does not move again.
    pub(crate) fn due(&self, w: &WorkerId, lease_duration: Duration) -> Option<Instant> {
        match self.items.get(w) {
            Some((item, since)) if item.fenced_by.is_none() => Some(*since + lease_duration),
            _ => None,
        }
    }

    /// The live workers and the lease counts they publish.
    pub(crate) fn live(&self, now: Instant, lease_duration: Duration) -> BTreeMap<WorkerId, usize> {
        self.items
            .iter()
            .filter(|(w, _)| self.judge(w, now, lease_duration) == Owner::Live)
            .map(|(w, (item, _))| (w.clone(), item.lease_count as usize))
            .collect()
    }

    /// The item of `w`, as last read.
    pub(crate) fn item(&self, w: &WorkerId) -> Option<&WorkerItem> {
        self.items.get(w).map(|(i, _)| i)
    }

    /// Every item, as last read.
    pub(crate) fn items(&self) -> impl Iterator<Item = &WorkerItem> {
        self.items.values().map(|(i, _)| i)
    }

    /// What peers published that says the lease table changed: each worker's incarnation and
    /// `tableChanges`.
    pub(crate) fn table_marks(&self) -> BTreeMap<WorkerId, (u64, u64)> {
        self.items
            .iter()
            .map(|(w, (i, _))| (w.clone(), (i.incarnation, i.table_changes)))
            .collect()
    }

    /// Who may change the set of leases (periodic shard sync, removing dead workers' items):
    /// the live worker with the lowest id, so that one worker does it, not all — a worker that
    /// is not draining, if there is one (a drained worker is about to stop).
    pub(crate) fn leader(&self, now: Instant, lease_duration: Duration) -> Option<WorkerId> {
        let live = self.live(now, lease_duration);
        let draining = self.draining(now, lease_duration);
        live.keys()
            .find(|w| !draining.contains(*w))
            .or_else(|| live.keys().next())
            .cloned()
    }

    /// The live workers an operator asked to drain: they take nothing, their peers ask for
    /// their leases, and they do not count when the fleet divides the leases.
    pub(crate) fn draining(&self, now: Instant, lease_duration: Duration) -> BTreeSet<WorkerId> {
        self.items
            .iter()
            .filter(|(_, (item, _))| item.is_draining())
            .filter(|(w, _)| self.judge(w, now, lease_duration) == Owner::Live)
            .map(|(w, _)| w.clone())
            .collect()
    }
}

/// Why the taker reads the whole lease table this round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScanReason {
    /// No snapshot yet.
    First,
    /// A peer created or deleted leases since our snapshot.
    TableChanged,
    /// We are below target and our snapshot offers nothing to take, but the fleet changed
    /// since the snapshot was taken.
    Stale,
    /// The slow safety net: the snapshot is `safety_interval` old.
    SafetyNet,
    /// Owners without a worker item are in the table: their leases are judged by their
    /// counters, which only a fresh read shows.
    PerLeaseOwners,
}

impl ScanReason {
    /// The metric label.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::First => "first",
            Self::TableChanged => "table-changed",
            Self::Stale => "stale",
            Self::SafetyNet => "safety-net",
            Self::PerLeaseOwners => "per-lease-owners",
        }
    }
}

/// The inputs of [`scan_reason`].
#[derive(Debug)]
pub(crate) struct ScanInputs<'a> {
    /// When our snapshot was taken (`None`: no snapshot).
    pub(crate) snapshot_at: Option<Instant>,
    /// Peers' table marks when the snapshot was taken, and now.
    pub(crate) marks_at_snapshot: &'a BTreeMap<WorkerId, (u64, u64)>,
    pub(crate) marks_now: &'a BTreeMap<WorkerId, (u64, u64)>,
    /// We hold fewer than the target, and the snapshot offers no free lease to take.
    pub(crate) short: bool,
    /// Active leases that no live worker accounts for (the snapshot's active leases less the
    /// counts live workers publish): free or dead workers' leases exist somewhere.
    pub(crate) unaccounted: usize,
    /// How old a snapshot must be before `short` and `unaccounted` can call for another read
    /// (the counts peers publish lag by up to a heartbeat).
    pub(crate) min_age: Duration,
    pub(crate) now: Instant,
    pub(crate) safety_interval: Duration,
}

/// Whether to read the whole lease table this round, and why: only when something says the
/// snapshot is missing something that matters.
pub(crate) fn scan_reason(s: &ScanInputs<'_>) -> Option<ScanReason> {
    let Some(at) = s.snapshot_at else {
        return Some(ScanReason::First);
    };
    // A peer that created or deleted leases bumped its mark (a new incarnation's marks start
    // over, and count only when not 0).
    let changed = s.marks_now.iter().any(|(w, (inc, n))| {
        *n > 0
            && s.marks_at_snapshot
                .get(w)
                .is_none_or(|(inc0, n0)| inc0 != inc || n0 != n)
    });
    if changed {
        return Some(ScanReason::TableChanged);
    }
    let age = s.now.saturating_duration_since(at);
    if s.short && s.unaccounted > 0 && age >= s.min_age {
        return Some(ScanReason::Stale);
    }
    if age >= s.safety_interval {
        return Some(ScanReason::SafetyNet);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: &str, inc: u64, hb: u64) -> WorkerItem {
        let mut i = WorkerItem::new(WorkerId::new(id), inc);
        i.heartbeat = hb;
        i
    }

    #[test]
    fn items_round_trip_and_malformed_ones_name_the_attribute() {
        let mut item = w("pod-1", 9, 3);
        item.lease_count = 12;
        item.table_changes = 2;
        item.fenced_by = Some(WorkerId::new("pod-2"));
        item.handoffs = vec![HandoffNotice::new(LeaseKey::new("shardId-1"), 7)];
        assert_eq!(decode(&encode(&item)).unwrap(), item);
        type Spoil = Box<dyn Fn(&mut Item)>;
        let table: [(&str, Spoil); 5] = [
            (
                attr::WORKER_ID,
                Box::new(|i| {
                    i.remove(attr::WORKER_ID);
                }),
            ),
            (
                attr::HEARTBEAT,
                Box::new(|i| {
                    i.insert(attr::HEARTBEAT.into(), AttrValue::N("-1".into()));
                }),
            ),
            (
                attr::INCARNATION,
                Box::new(|i| {
                    i.remove(attr::INCARNATION);
                }),
            ),
            (
                attr::HANDOFFS,
                Box::new(|i| {
                    i.insert(attr::HANDOFFS.into(), AttrValue::S("x".into()));
                }),
            ),
            (
                attr::HANDOFFS,
                Box::new(|i| {
                    i.insert(
                        attr::HANDOFFS.into(),
                        AttrValue::Ss(vec!["shardId-1".into()]),
                    );
                }),
            ),
        ];
        for (attribute, spoil) in table {
            let mut raw = encode(&item);
            spoil(&mut raw);
            let err = decode(&raw).unwrap_err();
            assert_eq!(err.attribute(), attribute, "{err}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_is_dead_once_its_heartbeat_stood_still_for_the_lease_duration() {
        let d = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut v = WorkerView::default();
        let (a, java) = (WorkerId::new("a"), WorkerId::new("java"));
        v.observe(&[w("a", 1, 5)], t0);
        assert_eq!(v.judge(&a, t0 + Duration::from_secs(9), d), Owner::Live);
        // It moved at t0+5: the clock restarts.
        v.observe(&[w("a", 1, 6)], t0 + Duration::from_secs(5));
        assert_eq!(v.judge(&a, t0 + Duration::from_secs(14), d), Owner::Live);
        assert_eq!(
            v.judge(&a, t0 + Duration::from_secs(15), d),
            Owner::Dead(Some(w("a", 1, 6)))
        );
        assert_eq!(v.due(&a, d), Some(t0 + Duration::from_secs(15)));
        // A new incarnation with the same heartbeat is a change too.
        v.observe(&[w("a", 2, 6)], t0 + Duration::from_secs(15));
        assert_eq!(v.judge(&a, t0 + Duration::from_secs(15), d), Owner::Live);
        // Fenced: dead at once.
        let mut fenced = w("a", 2, 6);
        fenced.fenced_by = Some(WorkerId::new("b"));
        v.observe(&[fenced], t0 + Duration::from_secs(16));
        assert_eq!(
            v.judge(&a, t0 + Duration::from_secs(16), d),
            Owner::Dead(None)
        );
        assert_eq!(v.due(&a, d), None);
        // An owner that never had an item is judged per lease; one whose item went away
        // (it released its leases first) is gone.
        assert_eq!(v.judge(&java, t0, d), Owner::PerLease);
        v.observe(&[w("a", 3, 0)], t0 + Duration::from_secs(17));
        v.observe(&[], t0 + Duration::from_secs(18));
        assert_eq!(
            v.judge(&a, t0 + Duration::from_secs(18), d),
            Owner::Dead(None)
        );
        assert!(v.live(t0 + Duration::from_secs(18), d).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_table_is_read_only_when_something_says_so() {
        let t0 = Instant::now();
        let (safety, min_age) = (Duration::from_secs(300), Duration::from_secs(3));
        let marks = |n: u64| BTreeMap::from([(WorkerId::new("a"), (1, n))]);
        let (m0, m1) = (marks(0), marks(1));
        let inputs = |snapshot_at, marks_now, short, unaccounted, now| ScanInputs {
            snapshot_at,
            marks_at_snapshot: &m0,
            marks_now,
            short,
            unaccounted,
            min_age,
            now,
            safety_interval: safety,
        };
        let later = t0 + Duration::from_secs(10);
        let soon = t0 + Duration::from_secs(1);
        let table = [
            (inputs(None, &m0, false, 0, t0), Some(ScanReason::First)),
            (inputs(Some(t0), &m0, false, 0, later), None),
            (
                inputs(Some(t0), &m1, false, 0, soon),
                Some(ScanReason::TableChanged),
            ),
            // Leases nobody live accounts for, but we have what we need: no read.
            (inputs(Some(t0), &m0, false, 5, later), None),
            (
                inputs(Some(t0), &m0, true, 5, later),
                Some(ScanReason::Stale),
            ),
            // Short, but every lease is accounted for: nothing new to find.
            (inputs(Some(t0), &m0, true, 0, later), None),
            // Too soon after the last read: the counts may not be published yet.
            (inputs(Some(t0), &m0, true, 5, soon), None),
            (
                inputs(Some(t0), &m0, false, 0, t0 + safety),
                Some(ScanReason::SafetyNet),
            ),
        ];
        for (i, (input, want)) in table.into_iter().enumerate() {
            assert_eq!(scan_reason(&input), want, "case {i}");
        }
    }
}
