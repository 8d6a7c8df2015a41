//! An in-memory lease table with the exact semantics of the DynamoDB store: the same item
//! codec, the same conditions. It passes the same conformance suite.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::fault::{FaultKind, Faults, Injected};
use crate::checkpoint::PendingCheckpoint;
use crate::lease::capacity::{self, CapacityMeter};
use crate::lease::item::{self, Item};
use crate::lease::liveness::{self, Beat, HandoffNotice, WorkerItem, WorkerTable};
use crate::lease::store::effect;
use crate::lease::{Lease, LeaseKey, LeaseStore, LeaseStoreError, LeaseTable, WorkerId};
use crate::record::ExtendedSequenceNumber;
use crate::shard::ShardId;

/// An in-memory lease table. Clones share the table.
#[derive(Clone, Debug)]
pub struct MemLeaseStore {
    items: Arc<Mutex<BTreeMap<String, Item>>>,
    /// The worker table (`None`: this store keeps none, as a Java KCL 2.x table).
    workers: Option<Arc<Mutex<BTreeMap<String, Item>>>>,
    faults: Faults,
    meter: CapacityMeter,
}

impl Default for MemLeaseStore {
    fn default() -> Self {
        Self {
            items: Arc::default(),
            workers: Some(Arc::default()),
            faults: Faults::default(),
            meter: CapacityMeter::default(),
        }
    }
}

impl MemLeaseStore {
    /// An empty table, with a worker table for per-worker liveness.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty table without a worker table: workers renew every lease (as with a store
    /// that does not implement worker liveness).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use kcl::testkit::MemLeaseStore;
    /// use kcl::LeaseStore;
    /// let store = MemLeaseStore::without_worker_table();
    /// assert!(store.list_workers(false).await.is_err());
    /// # }
    /// ```
    pub fn without_worker_table() -> Self {
        Self {
            workers: None,
            ..Self::default()
        }
    }

    /// This store, sharing its lease table, seen by a worker whose store keeps no worker
    /// table (a Java KCL worker, or an older version of this library).
    pub fn sharing_without_worker_table(&self) -> Self {
        Self {
            workers: None,
            ..self.clone()
        }
    }

    /// This store (the same tables), charging its requests to `meter` instead: to tell the
    /// cost of one part of a worker from the rest.
    pub fn with_meter(&self, meter: CapacityMeter) -> Self {
        Self {
            meter,
            ..self.clone()
        }
    }

    /// Every worker item, decoded (malformed items skipped).
    pub fn workers(&self) -> Vec<WorkerItem> {
        self.workers
            .as_ref()
            .map(|w| {
                w.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .filter_map(|i| liveness::decode(i).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn worker_table(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, Item>>, LeaseStoreError> {
        match &self.workers {
            Some(w) => Ok(w.lock().unwrap_or_else(|p| p.into_inner())),
            None => Err(LeaseStoreError::Other(
                "this in-memory store keeps no worker table".into(),
            )),
        }
    }

    /// A worker-table write after its faults: `f` on the stored item (if any), which returns
    /// the new item (or `None` to delete it), or `Err` when its condition fails.
    async fn worker_write(
        &self,
        op: &str,
        worker: &WorkerId,
        f: impl FnOnce(Option<WorkerItem>) -> Result<Option<WorkerItem>, ()>,
    ) -> Result<Option<WorkerItem>, LeaseStoreError> {
        let lose_answer = match self.faults.check(op).await {
            Ok(()) => false,
            Err(Injected::Fail(FaultKind::AnswerLost { .. })) => true,
            Err(Injected::Fail(kind)) => return Err(Self::injected(kind)),
        };
        let mut table = self.worker_table()?;
        let current = table.get(worker.as_str());
        let before = current.map_or(0, capacity::item_size);
        let decoded = match current.map(liveness::decode).transpose() {
            Ok(d) => d,
            Err(bad) => {
                self.meter.write(op, before);
                return Err(bad.into());
            }
        };
        let Ok(next) = f(decoded) else {
            self.meter.write(op, before);
            return Err(LeaseStoreError::ConditionFailed {
                key: LeaseKey::new(worker.as_str()),
            });
        };
        match &next {
            Some(item) => {
                let encoded = liveness::encode(item);
                self.meter
                    .write(op, before.max(capacity::item_size(&encoded)));
                table.insert(worker.to_string(), encoded);
            }
            None => {
                self.meter.write(op, before);
                table.remove(worker.as_str());
            }
        }
        if lose_answer {
            return Err(LeaseStoreError::Transient(
                "injected: the write was applied but its answer was lost".into(),
            ));
        }
        Ok(next)
    }

    /// The capacity units the requests so far would have consumed on DynamoDB, by operation
    /// (see [`crate::lease::capacity`]): scans and gets strongly consistent, as
    /// `DynamoLeaseStore` reads; a write charged the larger of the item before and after, a
    /// refused one the stored item; requests failed by an injected fault charged nothing.
    pub fn capacity(&self) -> &CapacityMeter {
        &self.meter
    }

    /// The fault rules of this table.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Writes a raw item, bypassing every check (to test malformed items).
    pub fn put_raw_item(&self, item: Item) {
        let key = match item.get(item::attr::LEASE_KEY) {
            Some(item::AttrValue::S(k)) => k.clone(),
            _ => format!("<no key #{}>", self.lock().len()),
        };
        self.lock().insert(key, item);
    }

    /// Every lease, decoded (malformed items skipped), sorted by key.
    pub fn leases(&self) -> Vec<Lease> {
        self.lock()
            .values()
            .filter_map(|i| item::decode(i).ok().flatten())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Item>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn faults_for(&self, op: &str) -> Result<(), LeaseStoreError> {
        match self.faults.check(op).await {
            Ok(()) => Ok(()),
            Err(Injected::Fail(kind)) => Err(Self::injected(kind)),
        }
    }

    /// A conditional write after its faults: `update`, unless a fault fails it first, or
    /// loses its answer after it was applied.
    async fn write(
        &self,
        op: &str,
        lease: &Lease,
        cond: impl FnOnce(&Lease) -> bool,
        f: impl FnOnce(&Lease) -> Lease,
    ) -> Result<Lease, LeaseStoreError> {
        let lose_answer = match self.faults.check(op).await {
            Ok(()) => None,
            Err(Injected::Fail(FaultKind::AnswerLost { retried })) => Some(retried),
            Err(Injected::Fail(kind)) => return Err(Self::injected(kind)),
        };
        let result = self.update(op, lease, cond, f);
        match (lose_answer, result) {
            // The SDK's retry of an applied write: its condition fails on the moved counter.
            (Some(true), Ok(_)) => Err(LeaseStoreError::ConditionFailed {
                key: lease.key.clone(),
            }),
            (Some(false), Ok(_)) => Err(LeaseStoreError::Transient(
                "injected: the write was applied but its answer was lost".into(),
            )),
            (_, result) => result,
        }
    }

    /// Every lease, charged to `op` as a scan of the whole table.
    fn scan(&self, op: &str, consistent: bool) -> LeaseTable {
        let (mut leases, mut malformed) = (Vec::new(), Vec::new());
        let items = self.lock();
        self.meter.read(
            op,
            items.values().map(capacity::item_size).sum(),
            consistent,
        );
        for i in items.values() {
            match item::decode(i) {
                Ok(Some(l)) => leases.push(l),
                Ok(None) => {}
                Err(e) => malformed.push(e),
            }
        }
        LeaseTable::new(leases, malformed)
    }

    fn injected(kind: FaultKind) -> LeaseStoreError {
        match kind {
            FaultKind::Throttle => LeaseStoreError::Throttled("injected throttle".into()),
            FaultKind::Fatal => LeaseStoreError::Other("injected fatal error".into()),
            _ => LeaseStoreError::Transient("injected transient error".into()),
        }
    }

    /// The conditional write: applies `f` to the stored lease if its counter is that of
    /// `lease` and `cond` accepts it.
    fn update(
        &self,
        op: &str,
        lease: &Lease,
        cond: impl FnOnce(&Lease) -> bool,
        f: impl FnOnce(&Lease) -> Lease,
    ) -> Result<Lease, LeaseStoreError> {
        let mut items = self.lock();
        let failed = || LeaseStoreError::ConditionFailed {
            key: lease.key.clone(),
        };
        let Some(current) = items.get(lease.key.as_str()) else {
            self.meter.write(op, 0);
            return Err(failed());
        };
        let before = capacity::item_size(current);
        let stored = item::decode(current)?.ok_or_else(failed)?;
        if stored.counter != lease.counter || !cond(&stored) {
            self.meter.write(op, before);
            return Err(failed());
        }
        // The write changes only the attributes the operation sets, as UpdateItem does:
        // apply the effect to the stored lease, not to the caller's copy.
        let updated = f(&stored);
        let encoded = item::encode(&updated);
        self.meter
            .write(op, before.max(capacity::item_size(&encoded)));
        items.insert(lease.key.as_str().to_owned(), encoded);
        Ok(updated)
    }
}

#[async_trait]
impl LeaseStore for MemLeaseStore {
    async fn ensure_table(&self) -> Result<(), LeaseStoreError> {
        self.faults_for("ensure_table").await
    }

    async fn list(&self) -> Result<LeaseTable, LeaseStoreError> {
        self.faults_for("list").await?;
        Ok(self.scan("list", true))
    }

    async fn list_eventually(&self) -> Result<LeaseTable, LeaseStoreError> {
        self.faults_for("list").await?;
        Ok(self.scan("list_eventually", false))
    }

    async fn register_worker(&self, item: &WorkerItem) -> Result<(), LeaseStoreError> {
        let fresh = item.clone();
        self.worker_write("register_worker", &item.worker, |_| Ok(Some(fresh)))
            .await
            .map(|_| ())
    }

    async fn heartbeat(&self, beat: &Beat) -> Result<WorkerItem, LeaseStoreError> {
        let written = self
            .worker_write("heartbeat", &beat.worker, |current| match current {
                Some(mut w) if w.incarnation == beat.incarnation && w.fenced_by.is_none() => {
                    w.heartbeat += 1;
                    w.lease_count = beat.lease_count;
                    w.throughput = beat.throughput;
                    w.table_changes = beat.table_changes;
                    w.handoffs.retain(|k| !beat.handled.contains(k));
                    Ok(Some(w))
                }
                _ => Err(()),
            })
            .await?;
        written.ok_or_else(|| LeaseStoreError::Other("heartbeat deleted the item".into()))
    }

    async fn list_workers(&self, consistent: bool) -> Result<WorkerTable, LeaseStoreError> {
        self.faults_for("list_workers").await?;
        let table = self.worker_table()?;
        self.meter.read(
            "list_workers",
            table.values().map(capacity::item_size).sum(),
            consistent,
        );
        let (mut workers, mut malformed) = (Vec::new(), Vec::new());
        for i in table.values() {
            match liveness::decode(i) {
                Ok(w) => workers.push(w),
                Err(e) => malformed.push(e),
            }
        }
        Ok(WorkerTable::new(workers, malformed))
    }

    async fn fence_worker(&self, seen: &WorkerItem, by: &WorkerId) -> Result<(), LeaseStoreError> {
        self.worker_write("fence_worker", &seen.worker, |current| match current {
            Some(mut w)
                if w.incarnation == seen.incarnation
                    && w.heartbeat == seen.heartbeat
                    && w.fenced_by.is_none() =>
            {
                w.fenced_by = Some(by.clone());
                Ok(Some(w))
            }
            _ => Err(()),
        })
        .await
        .map(|_| ())
    }

    async fn notify_handoff(
        &self,
        worker: &WorkerId,
        incarnation: u64,
        notice: &HandoffNotice,
    ) -> Result<(), LeaseStoreError> {
        self.worker_write("notify_handoff", worker, |current| match current {
            Some(mut w) if w.incarnation == incarnation && w.fenced_by.is_none() => {
                if !w.handoffs.contains(notice) {
                    w.handoffs.push(notice.clone());
                    w.handoffs.sort();
                }
                Ok(Some(w))
            }
            _ => Err(()),
        })
        .await
        .map(|_| ())
    }

    async fn set_draining(
        &self,
        worker: &WorkerId,
        incarnation: u64,
        since: Option<u64>,
    ) -> Result<(), LeaseStoreError> {
        self.worker_write("set_draining", worker, |current| match current {
            Some(mut w) if w.incarnation == incarnation && w.fenced_by.is_none() => {
                w.draining_since = since;
                Ok(Some(w))
            }
            _ => Err(()),
        })
        .await
        .map(|_| ())
    }

    async fn remove_worker(
        &self,
        worker: &WorkerId,
        incarnation: u64,
    ) -> Result<(), LeaseStoreError> {
        self.worker_write("remove_worker", worker, |current| match current {
            Some(w) if w.incarnation == incarnation => Ok(None),
            _ => Err(()),
        })
        .await
        .map(|_| ())
    }

    async fn get(&self, key: &LeaseKey) -> Result<Option<Lease>, LeaseStoreError> {
        self.faults_for("get").await?;
        let items = self.lock();
        let found = items.get(key.as_str());
        self.meter
            .read("get", found.map_or(0, capacity::item_size), true);
        match found {
            None => Ok(None),
            Some(i) => Ok(item::decode(i)?),
        }
    }

    async fn create_if_absent(&self, lease: &Lease) -> Result<bool, LeaseStoreError> {
        self.faults_for("create_if_absent").await?;
        let mut items = self.lock();
        if let Some(existing) = items.get(lease.key.as_str()) {
            self.meter
                .write("create_if_absent", capacity::item_size(existing));
            return Ok(false);
        }
        let encoded = item::encode(lease);
        self.meter
            .write("create_if_absent", capacity::item_size(&encoded));
        items.insert(lease.key.as_str().to_owned(), encoded);
        Ok(true)
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, LeaseStoreError> {
        self.write(
            "renew",
            lease,
            |s| s.owner.is_some() && s.owner == lease.owner,
            effect::renewed,
        )
        .await
    }

    async fn take(&self, lease: &Lease, owner: &WorkerId) -> Result<Lease, LeaseStoreError> {
        self.write("take", lease, |_| true, |l| effect::taken(l, owner))
            .await
    }

    async fn checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
        child_shard_ids: &[ShardId],
    ) -> Result<Lease, LeaseStoreError> {
        let me = lease.owner.clone();
        self.write(
            "checkpoint",
            lease,
            |s| me.is_some() && (s.owner == me || s.checkpoint_owner == me),
            |l| {
                let mut done = effect::checkpointed(l, checkpoint, child_shard_ids);
                // `throughputKBps` is written with the checkpoint when the caller measured it.
                done.throughput = lease.throughput.or(done.throughput);
                done
            },
        )
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<Lease, LeaseStoreError> {
        self.write(
            "release",
            lease,
            |s| s.owner.is_some() && s.owner == lease.owner,
            effect::released,
        )
        .await
    }

    async fn resolve_latest(
        &self,
        lease: &Lease,
        at: std::time::SystemTime,
    ) -> Result<Lease, LeaseStoreError> {
        self.write(
            "resolve_latest",
            lease,
            |s| {
                s.owner.is_some()
                    && s.owner == lease.owner
                    && s.checkpoint == ExtendedSequenceNumber::Latest
            },
            |l| effect::latest_resolved(l, at),
        )
        .await
    }

    async fn set_pending_checkpoint(
        &self,
        lease: &Lease,
        pending: Option<&PendingCheckpoint>,
    ) -> Result<Lease, LeaseStoreError> {
        let me = lease.owner.clone();
        self.write(
            "set_pending_checkpoint",
            lease,
            |s| me.is_some() && (s.owner == me || s.checkpoint_owner == me),
            |l| effect::pending_set(l, pending),
        )
        .await
    }

    async fn request_handoff(
        &self,
        lease: &Lease,
        new_owner: &WorkerId,
    ) -> Result<Lease, LeaseStoreError> {
        self.write(
            "request_handoff",
            lease,
            |s| s.owner.is_some() && s.owner == lease.owner && s.checkpoint_owner.is_none(),
            |l| effect::handoff_requested(l, new_owner),
        )
        .await
    }

    async fn complete_handoff(
        &self,
        lease: &Lease,
        new_owner: &WorkerId,
    ) -> Result<Lease, LeaseStoreError> {
        self.write(
            "complete_handoff",
            lease,
            |s| {
                lease.owner.is_some()
                    && s.checkpoint_owner == lease.owner
                    && s.owner.as_ref() == Some(new_owner)
            },
            |l| effect::handoff_completed(l, new_owner),
        )
        .await
    }

    async fn withdraw_handoff(&self, lease: &Lease) -> Result<Lease, LeaseStoreError> {
        self.write(
            "withdraw_handoff",
            lease,
            |s| {
                lease.owner.is_some()
                    && lease.checkpoint_owner.is_some()
                    && s.owner == lease.owner
                    && s.checkpoint_owner == lease.checkpoint_owner
            },
            effect::handoff_withdrawn,
        )
        .await
    }

    async fn delete(&self, lease: &Lease) -> Result<(), LeaseStoreError> {
        self.faults_for("delete").await?;
        let mut items = self.lock();
        let failed = || LeaseStoreError::ConditionFailed {
            key: lease.key.clone(),
        };
        let current = items.get(lease.key.as_str()).ok_or_else(failed)?;
        self.meter.write("delete", capacity::item_size(current));
        match item::decode(current) {
            Ok(Some(stored)) if stored.counter == lease.counter => {
                items.remove(lease.key.as_str());
                Ok(())
            }
            _ => Err(failed()),
        }
    }
}
