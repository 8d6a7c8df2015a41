//! Checkpoints: how far a shard was processed, stored in its lease.
//!
//! A [`Checkpointer`] is handed to every processor callback. It only accepts positions the
//! processor was given (never beyond the last delivered record) and never behind the current
//! checkpoint, and only while this worker holds the lease: the write is conditional on the
//! lease counter, so a worker that lost its lease cannot move the checkpoint.

use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;

use crate::lease::coordinator::HeldLease;
use crate::lease::{LeaseStore, LeaseStoreError};
use crate::metrics as m;
use crate::record::{ExtendedSequenceNumber, InvalidSequenceNumber, Record};
use crate::shard::{ChildShard, ShardId};

/// A refused or failed checkpoint. The rejected position comes back inside the error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// This worker no longer holds the lease; the processor must stop (it will get
    /// `lease_lost`).
    #[error("shard {shard}: the lease is no longer held by this worker")]
    LeaseLost {
        /// The shard.
        shard: ShardId,
    },
    /// The position is behind the stored checkpoint; checkpoints never go backwards.
    #[error("checkpoint {requested} is behind the current checkpoint {current}")]
    Behind {
        /// What was asked for.
        requested: ExtendedSequenceNumber,
        /// The stored checkpoint.
        current: ExtendedSequenceNumber,
    },
    /// The position is beyond the last record delivered to this processor.
    #[error("checkpoint {requested} is beyond the last delivered record ({delivered:?})")]
    NotDelivered {
        /// What was asked for.
        requested: ExtendedSequenceNumber,
        /// The last delivered position, if any.
        delivered: Option<ExtendedSequenceNumber>,
    },
    /// A sequence number that does not parse.
    #[error(transparent)]
    InvalidSequence(#[from] InvalidSequenceNumber),
    /// The lease table failed (after retries).
    #[error("checkpoint could not be stored")]
    Store(#[source] LeaseStoreError),
}

/// Stores checkpoints for one shard lease. Handed to each processor callback.
#[derive(Debug)]
pub struct Checkpointer {
    shard: ShardId,
    held: Arc<HeldLease>,
    store: Arc<dyn LeaseStore>,
    delivered: Option<ExtendedSequenceNumber>,
    /// Set once the shard's end was delivered: `SHARD_END` is then accepted.
    children: Option<Vec<ChildShard>>,
}

impl Checkpointer {
    pub(crate) fn new(shard: ShardId, held: Arc<HeldLease>, store: Arc<dyn LeaseStore>) -> Self {
        Self {
            shard,
            held,
            store,
            delivered: None,
            children: None,
        }
    }

    pub(crate) fn set_delivered(&mut self, pos: ExtendedSequenceNumber) {
        self.delivered = Some(pos);
    }

    pub(crate) fn set_shard_ended(&mut self, children: Vec<ChildShard>) {
        self.children = Some(children);
    }

    /// The shard this checkpointer writes for.
    pub fn shard_id(&self) -> &ShardId {
        &self.shard
    }

    /// The last position delivered to the processor, if any.
    pub fn last_delivered(&self) -> Option<&ExtendedSequenceNumber> {
        self.delivered.as_ref()
    }

    /// The stored checkpoint.
    pub async fn current(&self) -> ExtendedSequenceNumber {
        self.held.snapshot().await.checkpoint
    }

    /// Checkpoints the last delivered record (or `SHARD_END` inside `shard_ended`).
    ///
    /// # Errors
    /// [`CheckpointError::LeaseLost`] once the lease is lost; [`CheckpointError::Store`] if the
    /// table keeps failing; [`CheckpointError::NotDelivered`] if nothing was delivered yet.
    ///
    /// # Cancel safety
    /// Not cancel safe: a dropped call may or may not have stored the checkpoint.
    pub async fn checkpoint(&mut self) -> Result<(), CheckpointError> {
        if self.children.is_some() {
            return self.checkpoint_at(ExtendedSequenceNumber::ShardEnd).await;
        }
        match self.delivered.clone() {
            Some(pos) => self.checkpoint_at(pos).await,
            None => Err(CheckpointError::NotDelivered {
                requested: ExtendedSequenceNumber::ShardEnd,
                delivered: None,
            }),
        }
    }

    /// Checkpoints `record` (everything up to and including it is processed).
    ///
    /// # Errors
    /// As [`Checkpointer::checkpoint_at`].
    pub async fn checkpoint_record(&mut self, record: &Record) -> Result<(), CheckpointError> {
        self.checkpoint_at(record.position()).await
    }

    /// Checkpoints a sequence number given as a string (e.g. one stored by your application).
    ///
    /// # Errors
    /// [`CheckpointError::InvalidSequence`] if `sequence` is not a decimal number; otherwise as
    /// [`Checkpointer::checkpoint_at`].
    pub async fn checkpoint_sequence(
        &mut self,
        sequence: &str,
        sub_sequence: u64,
    ) -> Result<(), CheckpointError> {
        let seq = crate::record::SequenceNumber::parse(sequence)?;
        self.checkpoint_at(ExtendedSequenceNumber::at(seq, sub_sequence))
            .await
    }

    /// Checkpoints `pos`: a delivered record position, or `SHARD_END` once the shard ended.
    ///
    /// # Errors
    /// [`CheckpointError::Behind`] / [`CheckpointError::NotDelivered`] for positions out of
    /// range, [`CheckpointError::LeaseLost`] once the lease is lost, [`CheckpointError::Store`]
    /// if the table keeps failing for as long as the lease is valid.
    ///
    /// # Cancel safety
    /// Not cancel safe: a dropped call may or may not have stored the checkpoint.
    pub async fn checkpoint_at(
        &mut self,
        pos: ExtendedSequenceNumber,
    ) -> Result<(), CheckpointError> {
        let limit_ok = match (&pos, &self.delivered) {
            (ExtendedSequenceNumber::ShardEnd, _) => self.children.is_some(),
            (p, Some(d)) => !p.is_initial() && p <= d,
            _ => false,
        };
        if !limit_ok {
            return Err(CheckpointError::NotDelivered {
                requested: pos,
                delivered: self.delivered.clone(),
            });
        }
        let current = self.held.snapshot().await.checkpoint;
        if pos < current {
            return Err(CheckpointError::Behind {
                requested: pos,
                current,
            });
        }
        if pos == current {
            return Ok(());
        }
        let children: Vec<ShardId> = match (&pos, &self.children) {
            (ExtendedSequenceNumber::ShardEnd, Some(c)) => c.iter().map(|c| c.id.clone()).collect(),
            _ => Vec::new(),
        };
        let store = &self.store;
        let held = &self.held;
        let write = || async {
            held.write(|lease| {
                let pos = &pos;
                let children = &children;
                async move {
                    // Re-check under the lock: the stored checkpoint may have moved.
                    if *pos < lease.checkpoint {
                        return Ok(lease);
                    }
                    store.checkpoint(&lease, pos, children).await
                }
            })
            .await
        };
        let result = write
            .retry(crate::backoff::exponential(
                Duration::from_millis(50),
                Duration::from_secs(2),
                crate::backoff::seed(&[self.held.key().as_str(), "checkpoint"]),
            ))
            .sleep(tokio::time::sleep)
            .when(|e: &LeaseStoreError| e.is_retryable() && held.is_valid())
            .await;
        match result {
            Ok(_) => {
                metrics::counter!(m::CHECKPOINTS).increment(1);
                Ok(())
            }
            Err(e) if e.is_condition_failed() || !self.held.is_valid() => {
                self.held.mark_lost();
                Err(CheckpointError::LeaseLost {
                    shard: self.shard.clone(),
                })
            }
            Err(e) => Err(CheckpointError::Store(e)),
        }
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::lease::{Lease, WorkerId};
    use crate::record::SequenceNumber;
    use crate::testkit::MemLeaseStore;
    use tokio::time::Instant;

    fn pos(n: u128) -> ExtendedSequenceNumber {
        ExtendedSequenceNumber::at(SequenceNumber::from_u128(n), 0)
    }

    async fn setup() -> (MemLeaseStore, Checkpointer) {
        let store = MemLeaseStore::new();
        let shard = ShardId::new("shardId-000000000000");
        let lease = Lease::new(&shard, ExtendedSequenceNumber::TrimHorizon);
        assert!(store.create_if_absent(&lease).await.unwrap());
        let taken = store.take(&lease, &WorkerId::new("w1")).await.unwrap();
        let held = Arc::new(HeldLease::new(
            taken,
            Instant::now(),
            Duration::from_secs(10),
        ));
        let cp = Checkpointer::new(shard, held, Arc::new(store.clone()));
        (store, cp)
    }

    #[tokio::test(start_paused = true)]
    async fn accepts_delivered_positions_only_moving_forward() {
        let (store, mut cp) = setup().await;
        // Nothing delivered yet.
        assert!(matches!(
            cp.checkpoint().await,
            Err(CheckpointError::NotDelivered { .. })
        ));
        cp.set_delivered(pos(20));
        cp.checkpoint_at(pos(10)).await.unwrap();
        assert_eq!(store.leases()[0].checkpoint, pos(10));
        // Beyond what was delivered.
        match cp.checkpoint_at(pos(21)).await {
            Err(CheckpointError::NotDelivered {
                requested,
                delivered,
            }) => {
                assert_eq!(requested, pos(21));
                assert_eq!(delivered, Some(pos(20)));
            }
            other => panic!("expected NotDelivered, got {other:?}"),
        }
        // Behind the stored checkpoint.
        match cp.checkpoint_at(pos(9)).await {
            Err(CheckpointError::Behind { requested, current }) => {
                assert_eq!((requested, current), (pos(9), pos(10)));
            }
            other => panic!("expected Behind, got {other:?}"),
        }
        // SHARD_END only once the shard ended.
        assert!(cp
            .checkpoint_at(ExtendedSequenceNumber::ShardEnd)
            .await
            .is_err());
        cp.checkpoint().await.unwrap();
        assert_eq!(store.leases()[0].checkpoint, pos(20));
        assert_eq!(store.leases()[0].owner_switches_since_checkpoint, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_non_numeric_sequence_is_a_typed_error_and_changes_nothing() {
        let (store, mut cp) = setup().await;
        cp.set_delivered(pos(20));
        match cp.checkpoint_sequence("12abc", 0).await {
            Err(CheckpointError::InvalidSequence(e)) => assert_eq!(e.input(), "12abc"),
            other => panic!("expected InvalidSequence, got {other:?}"),
        }
        assert_eq!(
            store.leases()[0].checkpoint,
            ExtendedSequenceNumber::TrimHorizon
        );
        cp.checkpoint_sequence("0000020", 0).await.unwrap();
        assert_eq!(store.leases()[0].checkpoint, pos(20));
    }

    #[tokio::test(start_paused = true)]
    async fn refused_once_the_lease_is_lost() {
        let (store, mut cp) = setup().await;
        cp.set_delivered(pos(5));
        // Another worker takes the lease.
        let current = store.leases()[0].clone();
        store.take(&current, &WorkerId::new("w2")).await.unwrap();
        assert!(matches!(
            cp.checkpoint().await,
            Err(CheckpointError::LeaseLost { .. })
        ));
        assert_eq!(
            store.leases()[0].checkpoint,
            ExtendedSequenceNumber::TrimHorizon
        );
        // And after local expiry, without touching the store.
        let (_store, mut cp) = setup().await;
        cp.set_delivered(pos(5));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(matches!(
            cp.checkpoint().await,
            Err(CheckpointError::LeaseLost { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn transient_store_errors_are_retried() {
        use crate::testkit::{Fault, FaultKind};
        let (store, mut cp) = setup().await;
        cp.set_delivered(pos(7));
        store
            .faults()
            .inject(Fault::new(FaultKind::Throttle).on("checkpoint").times(3));
        cp.checkpoint().await.unwrap();
        assert_eq!(store.leases()[0].checkpoint, pos(7));
    }
}
