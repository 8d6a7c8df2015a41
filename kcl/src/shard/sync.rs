//! Shard sync: leases for new shards, and clean-up of finished ones.
//!
//! [`plan_new_leases`] decides which shards get a lease and where it starts:
//! - a shard descending from a shard that has (or gets) a lease starts at `TRIM_HORIZON`, so
//!   nothing between the parent's end and the child's start is lost;
//! - otherwise with `TRIM_HORIZON` / `AT_TIMESTAMP` every shard gets a lease at that position
//!   (children then wait for their parents);
//! - with `LATEST` only open shards get one (closed shards' data is all older than "latest").
//!
//! [`plan_deletions`] removes finished leases once every child has a lease that started, and
//! leases of shards that left the stream.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{InitialPosition, WorkerConfig};
use crate::error::Error;
use crate::lease::coordinator::Liveness;
use crate::lease::{Lease, LeaseStore};
use crate::record::ExtendedSequenceNumber;
use crate::retrieval::KinesisApi;
use crate::shard::{Shard, ShardId};
use crate::stream::StreamIdentifier;
use crate::worker::streams::StreamTracker;

/// Leases to create for shards that have none.
pub(crate) fn plan_new_leases(
    shards: &[Shard],
    leases: &[Lease],
    initial: InitialPosition,
) -> Vec<Lease> {
    let by_id: BTreeMap<&ShardId, &Shard> = shards.iter().map(|s| (&s.id, s)).collect();
    let leased: BTreeSet<ShardId> = leases.iter().map(|l| l.shard_id()).collect();
    let started: BTreeSet<ShardId> = leases
        .iter()
        .filter(|l| !l.checkpoint.is_initial())
        .map(|l| l.shard_id())
        .collect();
    let mut memo: BTreeMap<ShardId, bool> = BTreeMap::new();
    let mut children: BTreeMap<&ShardId, Vec<&ShardId>> = BTreeMap::new();
    for s in shards {
        for p in s.parents() {
            children.entry(p).or_default().push(&s.id);
        }
    }
    let mut superseded: BTreeMap<ShardId, bool> = BTreeMap::new();
    let mut out = Vec::new();
    // Listing order is parent-first on Kinesis; sort by id for determinism anyway.
    let mut ordered: Vec<&Shard> = shards.iter().collect();
    ordered.sort_by(|a, b| a.id.cmp(&b.id));
    for shard in ordered {
        // A shard with a descendant whose lease has started was processed already (its
        // finished lease may have been cleaned up): leasing it again would re-deliver it.
        if leased.contains(&shard.id)
            || has_started_descendant(&shard.id, &children, &started, &mut superseded)
        {
            continue;
        }
        let descendant = shard
            .parents()
            .any(|p| has_leased_ancestor_or_self(p, &by_id, &leased, initial, &mut memo));
        let checkpoint = if descendant {
            ExtendedSequenceNumber::TrimHorizon
        } else {
            match initial {
                InitialPosition::TrimHorizon => ExtendedSequenceNumber::TrimHorizon,
                InitialPosition::AtTimestamp(_) => ExtendedSequenceNumber::AtTimestamp,
                InitialPosition::Latest if shard.is_closed() => continue,
                InitialPosition::Latest => ExtendedSequenceNumber::Latest,
            }
        };
        out.push(
            Lease::new(&shard.id, checkpoint)
                .with_parents(shard.parents().cloned())
                .with_hash_range(shard.hash_range),
        );
    }
    out
}

/// True if a descendant of `id` (through the listed shards) has a lease that has started.
fn has_started_descendant(
    id: &ShardId,
    children: &BTreeMap<&ShardId, Vec<&ShardId>>,
    leased: &BTreeSet<ShardId>,
    memo: &mut BTreeMap<ShardId, bool>,
) -> bool {
    if let Some(&v) = memo.get(id) {
        return v;
    }
    memo.insert(id.clone(), false); // guards against malformed cycles
    let result = children.get(id).is_some_and(|cs| {
        cs.iter()
            .any(|c| leased.contains(*c) || has_started_descendant(c, children, leased, memo))
    });
    memo.insert(id.clone(), result);
    result
}

/// True if `id` has a lease, or will get one in this sync (so its descendants must start at
/// `TRIM_HORIZON`), looking through the listed ancestry.
fn has_leased_ancestor_or_self(
    id: &ShardId,
    by_id: &BTreeMap<&ShardId, &Shard>,
    leased: &BTreeSet<ShardId>,
    initial: InitialPosition,
    memo: &mut BTreeMap<ShardId, bool>,
) -> bool {
    if leased.contains(id) {
        return true;
    }
    if let Some(&v) = memo.get(id) {
        return v;
    }
    memo.insert(id.clone(), false); // guards against malformed cycles
    let result = match by_id.get(id) {
        None => false,
        Some(shard) => {
            // A listed shard gets a lease in this sync unless LATEST skips it (closed).
            let gets_lease = !(matches!(initial, InitialPosition::Latest) && shard.is_closed());
            gets_lease
                || shard
                    .parents()
                    .any(|p| has_leased_ancestor_or_self(p, by_id, leased, initial, memo))
        }
    };
    memo.insert(id.clone(), result);
    result
}

/// Leases that can be deleted: finished leases whose children all have started leases, and
/// finished or unowned leases of shards no longer listed.
pub(crate) fn plan_deletions(shards: &[Shard], leases: &[Lease]) -> Vec<Lease> {
    let listed: BTreeSet<&ShardId> = shards.iter().map(|s| &s.id).collect();
    let by_shard: BTreeMap<ShardId, &Lease> = leases.iter().map(|l| (l.shard_id(), l)).collect();
    leases
        .iter()
        .filter(|l| {
            let shard = l.shard_id();
            if !listed.contains(&shard) {
                return l.is_finished() || l.owner.is_none();
            }
            l.is_finished()
                && !l.child_shard_ids.is_empty()
                && l.child_shard_ids.iter().all(|c| {
                    by_shard
                        .get(c)
                        .is_some_and(|cl| !cl.checkpoint.is_initial())
                })
        })
        .cloned()
        .collect()
}

/// A lease [`plan_deletions`] allows to delete.
struct Deletable {
    lease: Lease,
    /// Its shard is no longer listed: deleted at once, not after the retention period.
    gone: bool,
}

/// The periodic shard-sync task.
pub(crate) struct ShardSyncer {
    kinesis: Arc<dyn KinesisApi>,
    store: Arc<dyn LeaseStore>,
    config: Arc<WorkerConfig>,
    /// When each lease was first seen deletable (deleted after `finished_lease_retention`).
    deletable_since: std::sync::Mutex<BTreeMap<crate::lease::LeaseKey, Instant>>,
    /// With per-worker liveness: only the leader syncs periodically (others when their own
    /// shards end), and peers learn of created or deleted leases through it.
    liveness: Option<Arc<Liveness>>,
    /// Leases created or deleted before the liveness item existed (the first sync): handed
    /// to it, so peers that read the table before then learn of them.
    changes_before_liveness: std::sync::atomic::AtomicU64,
    /// Shard-sync results, leases created and deleted.
    metrics: Option<Arc<crate::metrics::WorkerMetrics>>,
    /// Multi-stream mode: the streams to sync (single-stream mode: `config.stream`).
    streams: Option<Arc<StreamTracker>>,
}

impl ShardSyncer {
    pub(crate) fn new(
        kinesis: Arc<dyn KinesisApi>,
        store: Arc<dyn LeaseStore>,
        config: Arc<WorkerConfig>,
    ) -> Self {
        Self {
            kinesis,
            store,
            config,
            deletable_since: std::sync::Mutex::new(BTreeMap::new()),
            liveness: None,
            changes_before_liveness: std::sync::atomic::AtomicU64::new(0),
            metrics: None,
            streams: None,
        }
    }

    /// Multi-stream mode: syncs the streams `streams` holds, and deletes the leases of those
    /// that left it.
    pub(crate) fn with_streams(mut self, streams: Option<Arc<StreamTracker>>) -> Self {
        self.streams = streams;
        self
    }

    /// Records the syncs' results in `metrics`.
    pub(crate) fn with_metrics(mut self, metrics: Arc<crate::metrics::WorkerMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Syncs periodically only while this worker leads the fleet, and records the leases it
    /// creates or deletes in `liveness`.
    pub(crate) fn with_liveness(mut self, liveness: Option<Arc<Liveness>>) -> Self {
        if let Some(l) = &liveness {
            for _ in 0..self
                .changes_before_liveness
                .swap(0, std::sync::atomic::Ordering::SeqCst)
            {
                l.table_changed();
            }
        }
        self.liveness = liveness;
        self
    }

    /// The first sync: retried with backoff while failures are retryable.
    pub(crate) async fn sync_at_start(&self, stop: &CancellationToken) -> Result<(), Error> {
        let seed = crate::backoff::seed(&[self.config.worker_id.as_str(), "shard-sync"]);
        let mut delays =
            crate::backoff::exponential(Duration::from_millis(200), Duration::from_secs(5), seed)
                .with_max_times(8)
                .build();
        loop {
            let err = match self.sync_once().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let retryable = match &err {
                Error::Kinesis(e) => e.is_retryable(),
                Error::LeaseStore(e) => e.is_retryable(),
                _ => false,
            };
            match delays.next() {
                Some(d) if retryable && !stop.is_cancelled() => {
                    warn!(error = %err, "shard sync failed; retrying");
                    tokio::time::sleep(d).await;
                }
                _ => return Err(err),
            }
        }
    }

    /// Runs a sync every `shard_sync_interval`, and whenever `now` is notified.
    pub(crate) async fn run(self, now: Arc<Notify>, stop: CancellationToken) {
        loop {
            let periodic = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = now.notified() => false,
                _ = tokio::time::sleep(self.config.shard_sync_interval) => true,
            };
            if periodic && self.liveness.as_ref().is_some_and(|l| !l.is_leader()) {
                continue;
            }
            if let Err(e) = self.sync_once().await {
                warn!(error = %e, "shard sync failed");
            }
        }
    }

    fn table_changed(&self) {
        match &self.liveness {
            Some(l) => l.table_changed(),
            None => {
                self.changes_before_liveness
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    /// Lists shards, creates missing leases and deletes finished ones (counted).
    pub(crate) async fn sync_once(&self) -> Result<(), Error> {
        let result = self.sync().await;
        if let Some(m) = &self.metrics {
            m.shard_sync(result.as_ref().ok().copied());
        }
        result.map(|_| ())
    }

    /// [`ShardSyncer::sync_once`]: the number of shards listed.
    async fn sync(&self) -> Result<usize, Error> {
        // The table is read *before* the shards are listed: every lease in the snapshot then
        // predates the listing, so a lease whose shard is missing from it really belongs to a
        // shard that left the stream — not to one created after the listing (deleting that
        // one would let its children start before it).
        // Eventually consistent with per-worker liveness: creates and deletes are conditional,
        // so a stale read costs a refused write, never a wrong one.
        let table = match &self.liveness {
            Some(_) => self.store.list_eventually().await?,
            None => self.store.list().await?,
        };
        crate::stream::check_table_mode(
            self.streams.is_some(),
            table.leases.iter().map(|l| &l.key),
        )
        .map_err(|found| Error::TableMode {
            table: self.config.table_name.clone(),
            found,
        })?;
        let Some(streams) = &self.streams else {
            let (listed, deletable) = self
                .sync_stream(None, &self.config.stream, &table.leases)
                .await?;
            self.delete_due(deletable).await?;
            return Ok(listed);
        };
        // Each stream on its own: one that cannot be listed (deleted, access denied) does not
        // hold the others back; its error is returned once the others are synced.
        let mut listed = 0;
        let mut deletable = Vec::new();
        let mut first_error = None;
        for id in streams.active() {
            let leases: Vec<Lease> = table
                .leases
                .iter()
                .filter(|l| l.key.stream().as_ref() == Some(&id))
                .cloned()
                .collect();
            match self.sync_stream(Some(&id), id.name(), &leases).await {
                Ok((n, due)) => {
                    listed += n;
                    deletable.extend(due);
                }
                Err(e) => {
                    warn!(stream = %id, error = %e, "shard sync of a stream failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        self.delete_due(deletable).await?;
        self.delete_former_streams(streams, &table.leases).await?;
        match first_error {
            Some(e) => Err(e),
            None => Ok(listed),
        }
    }

    /// Lists the shards of `name` (whose leases are `leases`), creates the missing leases and
    /// returns the number of shards listed with the leases due for deletion.
    async fn sync_stream(
        &self,
        id: Option<&StreamIdentifier>,
        name: &str,
        leases: &[Lease],
    ) -> Result<(usize, Vec<Deletable>), Error> {
        let shards = self.kinesis.list_shards(name).await?;
        for mut lease in plan_new_leases(&shards, leases, self.config.initial_position) {
            if let Some(id) = id {
                lease.key = id.lease_key(&lease.key.shard_id());
            }
            if self.store.create_if_absent(&lease).await? {
                debug!(lease = %lease.key, checkpoint = %lease.checkpoint, "created lease");
                if let Some(m) = &self.metrics {
                    m.leases_created.increment(1);
                }
                self.table_changed();
            }
        }
        let listed_now: BTreeSet<ShardId> = shards.iter().map(|s| s.id.clone()).collect();
        let deletable = plan_deletions(&shards, leases)
            .into_iter()
            .map(|lease| Deletable {
                gone: !listed_now.contains(&lease.shard_id()),
                lease,
            })
            .collect();
        Ok((shards.len(), deletable))
    }

    /// Deletes the deletable leases that are due: those of shards gone from their stream at
    /// once, finished ones after the retention period (so the lineage can still be seen).
    async fn delete_due(&self, deletable: Vec<Deletable>) -> Result<(), Error> {
        let now = Instant::now();
        let due: Vec<Lease> = {
            let mut since = self
                .deletable_since
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            since.retain(|k, _| deletable.iter().any(|d| &d.lease.key == k));
            deletable
                .into_iter()
                .filter_map(|d| {
                    let first = *since.entry(d.lease.key.clone()).or_insert(now);
                    (d.gone
                        || now.saturating_duration_since(first)
                            >= self.config.finished_lease_retention)
                        .then_some(d.lease)
                })
                .collect()
        };
        for lease in due {
            self.delete(&lease).await?;
        }
        Ok(())
    }

    async fn delete(&self, lease: &Lease) -> Result<(), Error> {
        match self.store.delete(lease).await {
            Ok(()) => {
                debug!(lease = %lease.key, "deleted lease");
                if let Some(m) = &self.metrics {
                    m.leases_deleted.increment(1);
                }
                self.table_changed();
                Ok(())
            }
            Err(e) if e.is_condition_failed() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the leases of streams out of the set for `former_stream_retention`. A lease
    /// another worker still holds is left alone (that worker may still have the stream in its
    /// set); the stream is forgotten once none of its leases is left.
    async fn delete_former_streams(
        &self,
        streams: &StreamTracker,
        leases: &[Lease],
    ) -> Result<(), Error> {
        let due = streams.former_due(Instant::now(), self.config.former_stream_retention);
        for id in due {
            let mut left = 0;
            for lease in leases
                .iter()
                .filter(|l| l.key.stream().as_ref() == Some(&id))
            {
                if lease.owner.is_some() && !lease.is_owned_by(&self.config.worker_id) {
                    left += 1;
                    continue;
                }
                self.delete(lease).await?;
            }
            if left == 0 {
                info!(stream = %id, "deleted the leases of a stream that left the set");
                streams.forget(&id);
            } else {
                debug!(stream = %id, held = left, "leases of a former stream are still held by peers");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SequenceNumber;
    use crate::shard::HashKeyRange;

    fn shard(id: &str, parents: &[&str], closed: bool) -> Shard {
        Shard::new(
            ShardId::new(id),
            parents.iter().map(|p| ShardId::new(*p)).collect(),
            HashKeyRange::FULL,
            SequenceNumber::from_u128(1),
            closed.then(|| SequenceNumber::from_u128(2)),
        )
    }

    fn ids(leases: &[Lease]) -> Vec<(String, ExtendedSequenceNumber)> {
        leases
            .iter()
            .map(|l| (l.key.to_string(), l.checkpoint.clone()))
            .collect()
    }

    #[test]
    fn trim_horizon_leases_every_shard() {
        let shards = [
            shard("a", &[], true),
            shard("b", &["a"], false),
            shard("c", &["a"], false),
        ];
        let out = plan_new_leases(&shards, &[], InitialPosition::TrimHorizon);
        assert_eq!(out.len(), 3);
        assert!(out
            .iter()
            .all(|l| l.checkpoint == ExtendedSequenceNumber::TrimHorizon));
        assert_eq!(out[1].parent_shard_ids, vec![ShardId::new("a")]);
    }

    #[test]
    fn latest_skips_closed_shards_and_children_of_leased_start_at_trim_horizon() {
        let shards = [
            shard("a", &[], true),
            shard("b", &["a"], false),
            shard("c", &[], false),
        ];
        let out = plan_new_leases(&shards, &[], InitialPosition::Latest);
        assert_eq!(
            ids(&out),
            vec![
                ("b".into(), ExtendedSequenceNumber::Latest),
                ("c".into(), ExtendedSequenceNumber::Latest)
            ]
        );
        // "a" is leased (e.g. created before it closed): its child is a descendant.
        let a = Lease::new(&ShardId::new("a"), ExtendedSequenceNumber::Latest);
        let out = plan_new_leases(&shards, &[a], InitialPosition::Latest);
        assert_eq!(
            ids(&out)[0],
            ("b".into(), ExtendedSequenceNumber::TrimHorizon)
        );
    }

    #[test]
    fn parents_whose_children_are_leased_are_not_leased_again() {
        // The parent's finished lease was deleted after its children started.
        let shards = [
            shard("a", &[], true),
            shard("b", &["a"], false),
            shard("c", &["b"], false),
        ];
        let mut c = Lease::new(&ShardId::new("c"), ExtendedSequenceNumber::TrimHorizon);
        // Not started yet: its ancestors still get leases (and it waits for them).
        let out = plan_new_leases(&shards, &[c.clone()], InitialPosition::TrimHorizon);
        assert_eq!(out.len(), 2, "{:?}", ids(&out));
        c.checkpoint = ExtendedSequenceNumber::at(SequenceNumber::from_u128(9), 0);
        let out = plan_new_leases(&shards, &[c], InitialPosition::TrimHorizon);
        assert!(out.is_empty(), "{:?}", ids(&out));
    }

    #[test]
    fn deletes_finished_parents_once_children_started() {
        let shards = [shard("a", &[], true), shard("b", &["a"], false)];
        let mut a = Lease::new(&ShardId::new("a"), ExtendedSequenceNumber::ShardEnd);
        a.child_shard_ids = vec![ShardId::new("b")];
        let mut b = Lease::new(&ShardId::new("b"), ExtendedSequenceNumber::TrimHorizon);
        assert!(plan_deletions(&shards, &[a.clone(), b.clone()]).is_empty());
        b.checkpoint = ExtendedSequenceNumber::at(SequenceNumber::from_u128(5), 0);
        assert_eq!(plan_deletions(&shards, &[a.clone(), b]).len(), 1);
        // A lease whose shard left the stream, unowned: deleted.
        let gone = Lease::new(&ShardId::new("z"), ExtendedSequenceNumber::TrimHorizon);
        assert_eq!(plan_deletions(&shards, &[gone]).len(), 1);
    }
}
