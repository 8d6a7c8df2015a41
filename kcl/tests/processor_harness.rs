//! The testkit's `ProcessorHarness`: a processor unit-tested without a `Worker`, under the
//! worker's checkpoint rules.
//!
//! Run with: `cargo test -p kcl --features testkit --test processor_harness`
#![cfg(feature = "testkit")]

use kcl::checkpoint::CheckpointError;
use kcl::testkit::{ProcessorHarness, Stored};
use kcl::{
    async_trait, CheckpointPolicy, Checkpointer, ExtendedSequenceNumber, Lease, PendingCheckpoint,
    ProcessorError, RecordBatch, RecordProcessor, ShardContext, ShardId,
};

/// Fails every batch containing "bad"; checkpoints what it processed when asked to stop.
struct FailsOnBad;

#[async_trait]
impl RecordProcessor for FailsOnBad {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        _cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        if batch.iter().any(|r| &r.data[..] == b"bad") {
            return Err(ProcessorError::retryable("downstream refused"));
        }
        Ok(())
    }

    async fn shutdown_requested(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        cp.checkpoint().await?;
        Ok(())
    }
}

#[tokio::test]
async fn a_failed_batch_is_never_covered_by_the_checkpoint_at_shutdown() {
    let mut h = ProcessorHarness::new(FailsOnBad);
    h.initialize().await.expect("initialized");
    let good = h.records(["a", "b"]);
    let good_end = good[1].position();
    h.process(good).await.expect("processed");
    let bad = h.records(["c", "bad"]);
    assert!(h.process(bad).await.is_err());
    h.shutdown().await.expect("shut down");
    assert_eq!(h.checkpoint().await, good_end);
    assert_eq!(h.stored(), vec![Stored::Checkpoint(good_end)]);
}

/// Prepares, "uploads", commits; on initialize, remembers a previous owner's pending range.
#[derive(Default)]
struct TwoPhase {
    inherited: Option<PendingCheckpoint>,
}

#[async_trait]
impl RecordProcessor for TwoPhase {
    async fn initialize(&mut self, shard: &ShardContext) -> Result<(), ProcessorError> {
        self.inherited = shard.pending_checkpoint.clone();
        Ok(())
    }

    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        let last = batch.records.last().expect("non-empty").position();
        cp.prepare(last, Some("key-1".into())).await?;
        cp.commit().await?;
        Ok(())
    }
}

#[tokio::test]
async fn prepare_then_commit_moves_the_checkpoint_and_clears_the_pending_one() {
    let mut h = ProcessorHarness::new(TwoPhase::default());
    h.initialize().await.expect("initialized");
    let batch = h.records(["a", "b", "c"]);
    let end = batch[2].position();
    h.process(batch).await.expect("processed");
    assert_eq!(
        h.stored(),
        vec![
            Stored::Prepared(PendingCheckpoint::new(end.clone(), Some("key-1".into()))),
            Stored::Checkpoint(end.clone()),
        ]
    );
    assert_eq!(h.checkpoint().await, end);
    assert_eq!(h.pending().await, None);
}

#[tokio::test]
async fn a_new_owner_sees_the_pending_checkpoint_and_may_commit_or_cancel_it() {
    let shard = ShardId::new("shardId-000000000007");
    let start = ExtendedSequenceNumber::at(kcl::SequenceNumber::from_u128(10), 0);
    let upto = ExtendedSequenceNumber::at(kcl::SequenceNumber::from_u128(15), 0);
    let mut lease = Lease::new(&shard, start.clone());
    lease.pending_checkpoint = Some(upto.clone());
    lease.pending_checkpoint_state = Some("objects/a".into());

    let mut h = ProcessorHarness::resuming(TwoPhase::default(), lease.clone());
    h.initialize().await.expect("initialized");
    let inherited = h.processor().inherited.clone().expect("seen at initialize");
    assert_eq!(inherited.position, upto);
    // The side effect is known to be complete: commit it without reprocessing.
    h.checkpointer().commit().await.expect("committed");
    assert_eq!(h.checkpoint().await, upto);

    let mut h = ProcessorHarness::resuming(TwoPhase::default(), lease);
    h.initialize().await.expect("initialized");
    // Rolled back instead: the checkpoint stays.
    h.checkpointer().cancel_prepared().await.expect("cancelled");
    assert_eq!(h.checkpoint().await, start);
    assert_eq!(h.pending().await, None);
    assert_eq!(h.stored(), vec![Stored::PreparedCleared]);
}

#[tokio::test]
async fn prepare_is_refused_beyond_what_may_be_checkpointed_and_after_a_lost_lease() {
    let mut h = ProcessorHarness::new(TwoPhase::default());
    h.initialize().await.expect("initialized");
    let batch = h.records(["a"]);
    let end = batch[0].position();
    h.process(batch).await.expect("processed");
    let beyond = ExtendedSequenceNumber::at(kcl::SequenceNumber::from_u128(1_000), 0);
    let refused = h.checkpointer().prepare(beyond, None).await;
    assert!(
        matches!(refused, Err(CheckpointError::NotProcessed { .. })),
        "{refused:?}"
    );
    h.lose_lease().await;
    let lost = h.checkpointer().prepare(end, None).await;
    assert!(
        matches!(lost, Err(CheckpointError::LeaseLost { .. })),
        "{lost:?}"
    );
    let nothing = h.checkpointer().commit().await;
    assert!(nothing.is_err(), "{nothing:?}");
}

/// Never checkpoints by itself.
struct Passive;

#[async_trait]
impl RecordProcessor for Passive {
    async fn process_records(
        &mut self,
        _batch: &RecordBatch,
        _cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        Ok(())
    }
}

#[tokio::test]
async fn the_harness_applies_an_automatic_policy_as_the_worker_does() {
    let mut h =
        ProcessorHarness::new(Passive).checkpoint_policy(CheckpointPolicy::every_records(3));
    h.initialize().await.expect("initialized");
    let first = h.records(["a", "b"]);
    h.process(first).await.expect("processed");
    assert!(h.checkpoint().await.is_initial(), "2 of 3 records");
    let second = h.records(["c"]);
    let third_end = second[0].position();
    h.process(second).await.expect("processed");
    assert_eq!(h.checkpoint().await, third_end);
    let last = h.records(["d"]);
    let last_end = last[0].position();
    h.process(last).await.expect("processed");
    h.shutdown().await.expect("final checkpoint");
    assert_eq!(h.checkpoint().await, last_end);
    assert_eq!(
        h.stored(),
        vec![Stored::Checkpoint(third_end), Stored::Checkpoint(last_end)]
    );
}
