//! Draining a worker before maintenance: its leases move to its peers gracefully, and it
//! takes none, while it keeps running.
//!
//! An operator (`kcl drain`) sets `drainingSince` on the worker's item in the worker table
//! ([`LeaseStore::set_draining`], conditional on the item's incarnation). From then on:
//! - the worker's taker takes nothing (a handoff completed to it is released, one it asked
//!   for is withdrawn);
//! - its peers no longer count it when they divide the leases, and ask for its leases through
//!   graceful handoffs before any other steal, beyond the per-round steal limit;
//! - it hands each lease over as it would to any peer that asks: its processor gets
//!   `shutdown_requested`, checkpoints, and the lease moves — no record is processed twice.
//!
//! The drain lasts as long as that incarnation: a restarted worker registers a fresh item and
//! takes leases again ([`LeaseStore::set_draining`] with `None` ends a drain without one).
//! Java KCL workers do not read the worker table: in a mixed fleet only kcl workers take the
//! drained leases.
//!
//! ```
//! use kcl::lease::drain::drain_status;
//! use kcl::lease::{Lease, WorkerId};
//! use kcl::{ExtendedSequenceNumber, ShardId};
//!
//! let mut held = Lease::new(&ShardId::new("shardId-0"), ExtendedSequenceNumber::TrimHorizon);
//! held.owner = Some(WorkerId::new("pod-1"));
//! let mut moving = Lease::new(&ShardId::new("shardId-1"), ExtendedSequenceNumber::TrimHorizon);
//! moving.owner = Some(WorkerId::new("pod-2"));
//! moving.checkpoint_owner = Some(WorkerId::new("pod-1"));
//! let status = drain_status(&[held, moving], &WorkerId::new("pod-1"));
//! assert_eq!(status.held.len(), 1);
//! assert_eq!(status.handing_over.len(), 1);
//! assert!(!status.is_done());
//! ```

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::liveness::WorkerItem;
use super::{Lease, LeaseKey, LeaseStore, LeaseStoreError, WorkerId};

/// Where a drain stands: the leases that still name the worker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainStatus {
    /// Leases it owns (not finished shards: those are not processed), a handoff it asked a
    /// peer for before the drain included until its taker withdraws it.
    pub held: Vec<LeaseKey>,
    /// Leases a peer asked for that it has not handed over yet (it is still their checkpoint
    /// owner).
    pub handing_over: Vec<LeaseKey>,
}

impl DrainStatus {
    /// True once no active lease names the worker.
    pub fn is_done(&self) -> bool {
        self.held.is_empty() && self.handing_over.is_empty()
    }
}

/// Which of `leases` still name `worker` (as owner, or as the old owner of a pending
/// handoff). Finished (`SHARD_END`) leases are left out: nobody processes them.
pub fn drain_status(leases: &[Lease], worker: &WorkerId) -> DrainStatus {
    let mut status = DrainStatus::default();
    for lease in leases.iter().filter(|l| !l.is_finished()) {
        if lease.checkpoint_owner.as_ref() == Some(worker) {
            status.handing_over.push(lease.key.clone());
        } else if lease.owner.as_ref() == Some(worker) {
            status.held.push(lease.key.clone());
        }
    }
    status
}

/// Why a drain could not be asked for or did not finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DrainError {
    /// The worker table has no item for the worker.
    #[error(
        "worker {0} has no item in the worker table (is it running? worker ids are case-sensitive)"
    )]
    NoSuchWorker(WorkerId),
    /// A peer declared the worker dead; its leases move by expiry, not by drain.
    #[error("worker {0} was declared dead by {1}: its leases are taken over without a drain")]
    Fenced(WorkerId, WorkerId),
    /// No other worker whose heartbeat moves, and not draining itself, could take the leases.
    #[error("no other live worker (heartbeat moving, not draining) to take the leases of {0}")]
    NoPeer(WorkerId),
    /// The worker restarted (a new incarnation, not draining) while we waited.
    #[error("worker {0} restarted during the drain; its new incarnation is not draining")]
    Restarted(WorkerId),
    /// The leases did not all move in time.
    #[error(
        "{worker} still holds {held} lease(s) and is handing over {handing_over} after {waited:?}"
    )]
    TimedOut {
        /// The worker.
        worker: WorkerId,
        /// Leases it still owns.
        held: usize,
        /// Leases it is still handing over.
        handing_over: usize,
        /// How long we waited.
        waited: Duration,
    },
    /// The lease or worker table could not be read or written.
    #[error("lease table: {0}")]
    Store(#[from] LeaseStoreError),
}

/// Whether a worker other than `worker`, not fenced and not draining, moves its heartbeat
/// within `observe` (the worker table read every half second until one does).
async fn a_peer_is_live(
    store: &dyn LeaseStore,
    worker: &WorkerId,
    observe: Duration,
) -> Result<bool, LeaseStoreError> {
    let started = Instant::now();
    let first = store.list_workers(true).await?.workers;
    loop {
        let now = store.list_workers(true).await?.workers;
        let moved = now.iter().any(|w| {
            &w.worker != worker
                && w.fenced_by.is_none()
                && !w.is_draining()
                && first.iter().any(|f| {
                    f.worker == w.worker
                        && (f.incarnation != w.incarnation || f.heartbeat != w.heartbeat)
                })
        });
        if moved {
            return Ok(true);
        }
        if started.elapsed() >= observe {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(500).min(observe)).await;
    }
}

/// Asks `worker` to drain: checks that it has an item and is not fenced, and — unless
/// `alone_ok` — that another live worker, not draining, will take its leases (a heartbeat
/// seen to move within `observe`, which should exceed the fleet's `renew_interval`). Returns
/// the item as it was before the drain was set.
///
/// # Errors
/// [`DrainError::NoSuchWorker`], [`DrainError::Fenced`], [`DrainError::NoPeer`], or the
/// store's error (a condition failure: the worker restarted or was fenced meanwhile).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use kcl::lease::drain::{start_drain, DrainError};
/// use kcl::lease::WorkerId;
/// use kcl::testkit::MemLeaseStore;
///
/// let store = MemLeaseStore::new();
/// let asked = start_drain(&store, &WorkerId::new("pod-1"), Duration::ZERO, false).await;
/// assert!(matches!(asked, Err(DrainError::NoSuchWorker(_))));
/// # }
/// ```
pub async fn start_drain(
    store: &dyn LeaseStore,
    worker: &WorkerId,
    observe: Duration,
    alone_ok: bool,
) -> Result<WorkerItem, DrainError> {
    let items = store.list_workers(true).await?.workers;
    let item = items
        .iter()
        .find(|w| &w.worker == worker)
        .cloned()
        .ok_or_else(|| DrainError::NoSuchWorker(worker.clone()))?;
    if let Some(by) = &item.fenced_by {
        return Err(DrainError::Fenced(worker.clone(), by.clone()));
    }
    if !alone_ok && !a_peer_is_live(store, worker, observe).await? {
        return Err(DrainError::NoPeer(worker.clone()));
    }
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    store
        .set_draining(worker, item.incarnation, Some(since))
        .await?;
    Ok(item)
}

/// Ends a drain: the worker takes leases again (its peers then balance the fleet as usual).
///
/// # Errors
/// [`DrainError::NoSuchWorker`], or the store's error.
pub async fn cancel_drain(store: &dyn LeaseStore, worker: &WorkerId) -> Result<(), DrainError> {
    let items = store.list_workers(true).await?.workers;
    let item = items
        .iter()
        .find(|w| &w.worker == worker)
        .ok_or_else(|| DrainError::NoSuchWorker(worker.clone()))?;
    store.set_draining(worker, item.incarnation, None).await?;
    Ok(())
}

/// Waits until no active lease names `worker` (reading the lease table every `poll`), calling
/// `progress` after each read; gives up after `timeout`. `incarnation` is the one
/// [`start_drain`] asked: if the worker's item then shows another one, not draining, it
/// restarted and the wait fails. A worker that stopped (its item gone) is done once no lease
/// names it.
///
/// # Errors
/// [`DrainError::TimedOut`], [`DrainError::Restarted`], or the store's error.
pub async fn wait_drained(
    store: &dyn LeaseStore,
    worker: &WorkerId,
    incarnation: u64,
    poll: Duration,
    timeout: Duration,
    mut progress: impl FnMut(&DrainStatus),
) -> Result<(), DrainError> {
    let started = Instant::now();
    loop {
        let status = drain_status(&store.list().await?.leases, worker);
        progress(&status);
        if status.is_done() {
            return Ok(());
        }
        let items = store.list_workers(true).await?.workers;
        if let Some(item) = items.iter().find(|w| &w.worker == worker) {
            if item.incarnation != incarnation && !item.is_draining() {
                return Err(DrainError::Restarted(worker.clone()));
            }
        }
        if started.elapsed() >= timeout {
            return Err(DrainError::TimedOut {
                worker: worker.clone(),
                held: status.held.len(),
                handing_over: status.handing_over.len(),
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{ExtendedSequenceNumber, SequenceNumber};
    use crate::shard::ShardId;

    fn lease(i: u32, owner: Option<&str>, old_owner: Option<&str>, finished: bool) -> Lease {
        let mut l = Lease::new(
            &ShardId::new(format!("shardId-{i}")),
            if finished {
                ExtendedSequenceNumber::ShardEnd
            } else {
                ExtendedSequenceNumber::at(SequenceNumber::from_u128(1), 0)
            },
        );
        l.owner = owner.map(WorkerId::new);
        l.checkpoint_owner = old_owner.map(WorkerId::new);
        l
    }

    #[test]
    fn a_drain_is_done_once_no_active_lease_names_the_worker() {
        let me = WorkerId::new("d");
        // (owner, checkpoint owner, finished) → (held, handing over)
        let table = [
            (Some("d"), None, false, (1, 0)),
            // A peer asked, d has not handed it over yet.
            (Some("p"), Some("d"), false, (0, 1)),
            // d asked a peer for it before the drain: it names d until d's taker withdraws it.
            (Some("d"), Some("p"), false, (1, 0)),
            (Some("p"), None, false, (0, 0)),
            (None, None, false, (0, 0)),
            // Finished shards are nobody's work.
            (Some("d"), None, true, (0, 0)),
            (Some("p"), Some("d"), true, (0, 0)),
        ];
        for (i, (owner, old, finished, want)) in table.into_iter().enumerate() {
            let s = drain_status(&[lease(i as u32, owner, old, finished)], &me);
            assert_eq!(
                (s.held.len(), s.handing_over.len()),
                want,
                "{owner:?} {old:?} {finished}"
            );
            assert_eq!(s.is_done(), want == (0, 0));
        }
    }
}
