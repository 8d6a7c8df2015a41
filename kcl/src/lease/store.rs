//! The `LeaseStore` seam: the lease table's operations, each conditional on the lease counter.
//!
//! Implementations: [`crate::lease::dynamo::DynamoLeaseStore`] (DynamoDB and compatible servers)
//! and `testkit::MemLeaseStore` (in memory). Both pass the conformance suite in
//! `testkit::conformance`, which is what makes the in-memory one trustworthy.

use std::fmt;

use async_trait::async_trait;

use super::liveness::{Beat, HandoffNotice, WorkerItem, WorkerTable};
use super::{Lease, LeaseKey, WorkerId};
use crate::checkpoint::PendingCheckpoint;
use crate::error::BoxError;
use crate::record::ExtendedSequenceNumber;
use crate::shard::ShardId;

/// Everything read from the lease table by [`LeaseStore::list`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct LeaseTable {
    /// The leases that decoded, sorted by key.
    pub leases: Vec<Lease>,
    /// Items that are leases (no `entityType`, or `LEASE`) but could not be decoded. They are
    /// reported, never dropped silently or overwritten.
    pub malformed: Vec<MalformedLease>,
}

impl LeaseTable {
    /// A table snapshot.
    pub fn new(mut leases: Vec<Lease>, malformed: Vec<MalformedLease>) -> Self {
        leases.sort_by(|a, b| a.key.cmp(&b.key));
        Self { leases, malformed }
    }
}

/// A lease item with missing or malformed attributes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed lease item {key:?}: attribute {attribute}: {reason}")]
pub struct MalformedLease {
    key: Option<String>,
    attribute: &'static str,
    reason: String,
}

impl MalformedLease {
    /// Describes a malformed item.
    pub fn new(key: Option<String>, attribute: &'static str, reason: impl Into<String>) -> Self {
        Self {
            key,
            attribute,
            reason: reason.into(),
        }
    }

    /// The item's `leaseKey`, if it had a readable one.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The attribute at fault.
    pub fn attribute(&self) -> &'static str {
        self.attribute
    }

    /// What is wrong with it.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// Errors of the lease table.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseStoreError {
    /// The conditional write failed: the lease changed since it was read (another worker took
    /// it, or it was renewed/checkpointed/deleted), or the item already exists (create).
    #[error("lease {key}: the lease changed since it was read")]
    ConditionFailed {
        /// The lease whose condition failed.
        key: LeaseKey,
    },
    /// The table throttled the request; retry with backoff.
    #[error("the lease table throttled the request")]
    Throttled(#[source] BoxError),
    /// A timeout, a dropped connection or a 5xx: retry with backoff.
    #[error("the lease table is unavailable")]
    Transient(#[source] BoxError),
    /// An item could not be decoded.
    #[error(transparent)]
    Malformed(#[from] MalformedLease),
    /// Any other failure (bad credentials, missing table, validation error): not retried.
    #[error("lease table request failed")]
    Other(#[source] BoxError),
}

impl LeaseStoreError {
    /// True for failures that may succeed when retried (throttling, transient faults).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Throttled(_) | Self::Transient(_))
    }

    /// True if a conditional write failed because the lease changed.
    pub fn is_condition_failed(&self) -> bool {
        matches!(self, Self::ConditionFailed { .. })
    }
}

/// The lease table. Every write is conditional on the counter of the `lease` passed in (the
/// caller's last view of it) and returns the lease as it is after the write.
///
/// Implement it to keep leases somewhere other than DynamoDB; run `testkit::conformance` against
/// your implementation.
#[async_trait]
pub trait LeaseStore: Send + Sync + fmt::Debug + 'static {
    /// Creates the table if it does not exist and waits until it can be used.
    async fn ensure_table(&self) -> Result<(), LeaseStoreError>;

    /// Reads every lease. Items that are not leases (`entityType` other than `LEASE`) are
    /// skipped; leases that do not decode are returned in [`LeaseTable::malformed`].
    async fn list(&self) -> Result<LeaseTable, LeaseStoreError>;

    /// Reads one lease (strongly consistent).
    async fn get(&self, key: &LeaseKey) -> Result<Option<Lease>, LeaseStoreError>;

    /// Creates `lease` if no item has its key. Returns false if one already exists.
    async fn create_if_absent(&self, lease: &Lease) -> Result<bool, LeaseStoreError>;

    /// Heartbeat: counter + 1, if the counter and owner are still those of `lease`.
    async fn renew(&self, lease: &Lease) -> Result<Lease, LeaseStoreError>;

    /// Takes `lease` for `owner`: owner set, counter + 1, owner switches + 1, if the counter
    /// is still that of `lease`.
    async fn take(&self, lease: &Lease, owner: &WorkerId) -> Result<Lease, LeaseStoreError>;

    /// Stores a checkpoint (and, at shard end, the child shard ids): counter + 1, owner
    /// switches reset, if the counter is still that of `lease` and its owner is `lease.owner`
    /// or, during a graceful handoff, its `checkpointOwner` is `lease.owner` (the old owner
    /// may store its final checkpoint).
    async fn checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
        child_shard_ids: &[ShardId],
    ) -> Result<Lease, LeaseStoreError>;

    /// Gives the lease up: owner removed, counter + 1, if the counter and owner are still
    /// those of `lease`.
    async fn release(&self, lease: &Lease) -> Result<Lease, LeaseStoreError>;

    /// Deletes the lease if its counter is still that of `lease`.
    async fn delete(&self, lease: &Lease) -> Result<(), LeaseStoreError>;

    /// Records the stream time `at` that a `LATEST` checkpoint stood for when the shard was
    /// first read (`latestResolvedAt`): counter + 1, if the counter and owner are still those
    /// of `lease` and the checkpoint is still `LATEST`. A new owner then resumes at `at`
    /// instead of a fresh `LATEST`, which would skip what arrived in between.
    ///
    /// The default refuses ([`LeaseStoreError::Other`]): a store that does not implement it
    /// works, with a crash before the first checkpoint skipping what arrived meanwhile, as in
    /// other KCLs.
    async fn resolve_latest(
        &self,
        lease: &Lease,
        at: std::time::SystemTime,
    ) -> Result<Lease, LeaseStoreError> {
        let _ = (lease, at);
        Err(LeaseStoreError::Other(
            format!("{self:?} does not store latestResolvedAt").into(),
        ))
    }

    /// Two-phase checkpoints: stores `pending` as the prepared checkpoint
    /// (`pendingCheckpoint`, `pendingCheckpointSubSequenceNumber`, `pendingCheckpointState`),
    /// or removes it when `None`, without moving the checkpoint: counter + 1, if the counter is
    /// still that of `lease` and its owner (or, during a handoff, `checkpointOwner`) is
    /// `lease.owner`. A later [`LeaseStore::checkpoint`] removes it.
    ///
    /// The default refuses ([`LeaseStoreError::Other`]): two-phase checkpoints then fail with
    /// that error, everything else works.
    async fn set_pending_checkpoint(
        &self,
        lease: &Lease,
        pending: Option<&PendingCheckpoint>,
    ) -> Result<Lease, LeaseStoreError> {
        let _ = (lease, pending);
        Err(LeaseStoreError::Other(
            format!("{self:?} does not store pending checkpoints").into(),
        ))
    }

    /// Reads every lease, eventually consistent (half the read cost). Used where a conditional
    /// write follows, which fails on a stale view. The default reads strongly consistent.
    async fn list_eventually(&self) -> Result<LeaseTable, LeaseStoreError> {
        self.list().await
    }

    /// Worker liveness ([`crate::lease::liveness`]): writes `item` as this worker's item,
    /// replacing any earlier one of the same worker id (a new incarnation).
    ///
    /// The default refuses ([`LeaseStoreError::Other`]): workers then renew every lease, as
    /// the Java KCL 2.x does.
    async fn register_worker(&self, item: &WorkerItem) -> Result<(), LeaseStoreError> {
        let _ = item;
        Err(no_worker_table::<Self>())
    }

    /// Heartbeat: `heartbeat` + 1, `leaseCount` and `tableChanges` set, the `handled` keys
    /// removed from `handoffs` — if the item's `incarnation` is `beat.incarnation` and it is
    /// not fenced ([`LeaseStoreError::ConditionFailed`] otherwise, with the worker id as key).
    /// Returns the item after the write.
    async fn heartbeat(&self, beat: &Beat) -> Result<WorkerItem, LeaseStoreError> {
        let _ = beat;
        Err(no_worker_table::<Self>())
    }

    /// Reads every worker item (strongly consistent if `consistent`).
    async fn list_workers(&self, consistent: bool) -> Result<WorkerTable, LeaseStoreError> {
        let _ = consistent;
        Err(no_worker_table::<Self>())
    }

    /// Declares a worker dead: `fencedBy` = `by`, if the item's `incarnation` and `heartbeat`
    /// are still those of `seen` and it is not fenced yet.
    async fn fence_worker(&self, seen: &WorkerItem, by: &WorkerId) -> Result<(), LeaseStoreError> {
        let _ = (seen, by);
        Err(no_worker_table::<Self>())
    }

    /// Asks a worker to hand a lease over: adds `notice` to `handoffs`, if the item's
    /// `incarnation` is `incarnation` and it is not fenced.
    async fn notify_handoff(
        &self,
        worker: &WorkerId,
        incarnation: u64,
        notice: &HandoffNotice,
    ) -> Result<(), LeaseStoreError> {
        let _ = (worker, incarnation, notice);
        Err(no_worker_table::<Self>())
    }

    /// Deletes a worker's item, if its `incarnation` is still `incarnation`.
    async fn remove_worker(
        &self,
        worker: &WorkerId,
        incarnation: u64,
    ) -> Result<(), LeaseStoreError> {
        let _ = (worker, incarnation);
        Err(no_worker_table::<Self>())
    }

    /// Asks a worker to drain (`since`: milliseconds since the Unix epoch), or to stop
    /// draining (`None`): sets or removes `drainingSince`, if the item's `incarnation` is
    /// `incarnation` and it is not fenced. A draining worker takes no lease and its peers ask
    /// for all of its leases, through graceful handoffs (see `kcl drain`). Its heartbeats keep
    /// the attribute; a restart registers a fresh item without it.
    ///
    /// The default refuses, as every worker-table method does without a worker table.
    async fn set_draining(
        &self,
        worker: &WorkerId,
        incarnation: u64,
        since: Option<u64>,
    ) -> Result<(), LeaseStoreError> {
        let _ = (worker, incarnation, since);
        Err(no_worker_table::<Self>())
    }

    /// Graceful handoff, step 1 (the new owner): `leaseOwner` = `new_owner`,
    /// `checkpointOwner` = the current owner, counter unchanged — if the counter and owner are
    /// still those of `lease` and no handoff is pending. The old owner notices on its next
    /// renewal, lets its processor checkpoint, then calls [`LeaseStore::complete_handoff`].
    async fn request_handoff(
        &self,
        lease: &Lease,
        new_owner: &WorkerId,
    ) -> Result<Lease, LeaseStoreError>;

    /// Graceful handoff, step 2 (the old owner, after its final checkpoint): `checkpointOwner`
    /// removed, counter + 1 — if the counter is still that of `lease`, `checkpointOwner` is
    /// `lease.owner` and `leaseOwner` is `new_owner`. The new owner then takes the lease.
    async fn complete_handoff(
        &self,
        lease: &Lease,
        new_owner: &WorkerId,
    ) -> Result<Lease, LeaseStoreError>;

    /// Graceful handoff withdrawn (the new owner, stopping before the old owner completed
    /// it): `leaseOwner` = the old owner (`checkpointOwner`), `checkpointOwner` removed, counter
    /// unchanged — if the counter, `leaseOwner` and `checkpointOwner` are still those of
    /// `lease`. The lease is then as it was before [`LeaseStore::request_handoff`]: the old
    /// owner, which never stopped processing, keeps it, and nobody waits for it to expire.
    ///
    /// The default refuses (a store written before this method existed): a worker that
    /// stops then leaves the request in place, and the lease expires instead.
    async fn withdraw_handoff(&self, lease: &Lease) -> Result<Lease, LeaseStoreError> {
        let _ = lease;
        Err(LeaseStoreError::Other(
            format!(
                "{} cannot withdraw a handoff",
                std::any::type_name::<Self>()
            )
            .into(),
        ))
    }
}

fn no_worker_table<S: ?Sized>() -> LeaseStoreError {
    LeaseStoreError::Other(format!("{} keeps no worker table", std::any::type_name::<S>()).into())
}

/// Applies the effect of a successful write to the caller's copy: what every implementation
/// returns. Kept here so all stores agree on it.
pub(crate) mod effect {
    use super::*;

    pub(crate) fn renewed(lease: &Lease) -> Lease {
        let mut l = lease.clone();
        l.counter = l.counter.next();
        l
    }

    pub(crate) fn taken(lease: &Lease, owner: &WorkerId) -> Lease {
        let mut l = lease.clone();
        l.counter = l.counter.next();
        l.owner_switches_since_checkpoint += 1;
        l.owner = Some(owner.clone());
        l.checkpoint_owner = None;
        l
    }

    pub(crate) fn handoff_requested(lease: &Lease, new_owner: &WorkerId) -> Lease {
        let mut l = lease.clone();
        l.checkpoint_owner = l.owner.take();
        l.owner = Some(new_owner.clone());
        l
    }

    pub(crate) fn handoff_withdrawn(lease: &Lease) -> Lease {
        let mut l = lease.clone();
        l.owner = l.checkpoint_owner.take();
        l
    }

    pub(crate) fn handoff_completed(lease: &Lease, new_owner: &WorkerId) -> Lease {
        let mut l = lease.clone();
        l.counter = l.counter.next();
        l.owner = Some(new_owner.clone());
        l.checkpoint_owner = None;
        l
    }

    pub(crate) fn checkpointed(
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
        children: &[ShardId],
    ) -> Lease {
        let mut l = lease.clone();
        l.counter = l.counter.next();
        l.checkpoint = checkpoint.clone();
        l.owner_switches_since_checkpoint = 0;
        l.pending_checkpoint = None;
        l.pending_checkpoint_state = None;
        if !children.is_empty() {
            let mut c = children.to_vec();
            c.sort();
            c.dedup();
            l.child_shard_ids = c;
        }
        l
    }

    pub(crate) fn pending_set(lease: &Lease, pending: Option<&PendingCheckpoint>) -> Lease {
        let mut l = lease.clone();
        l.counter = l.counter.next();
        l.pending_checkpoint = pending.map(|p| p.position.clone());
        // An empty state is stored as none (DynamoDB-compatible servers differ on empty
        // binary values).
        l.pending_checkpoint_state = pending
            .and_then(|p| p.state.clone())
            .filter(|s| !s.is_empty());
        l
    }

    pub(crate) fn latest_resolved(lease: &Lease, at: std::time::SystemTime) -> Lease {
        let mut l = lease.clone();
        l.counter = l.counter.next();
        // Stored in whole milliseconds.
        let ms = crate::lease::item::epoch_millis(at);
        l.latest_resolved_at = Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms));
        l
    }

    pub(crate) fn released(lease: &Lease) -> Lease {
        let mut l = lease.clone();
        l.counter = l.counter.next();
        l.owner = None;
        l
    }
}
