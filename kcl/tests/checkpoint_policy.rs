//! Checkpoint policies, idle ticks and two-phase checkpoints through the `Worker` (issue 9).
//!
//! Run with: `cargo test -p kcl --features testkit --test checkpoint_policy`
#![cfg(feature = "testkit")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kcl::testkit::MemBackends;
use kcl::{
    async_trait, CheckpointPolicy, Checkpointer, ExtendedSequenceNumber, Heartbeat,
    PendingCheckpoint, ProcessorError, RecordBatch, RecordProcessor, ShardContext, Worker,
};

/// Every record each worker was handed, and what each processor saw at `initialize`.
#[derive(Clone, Default)]
struct Log {
    records: Arc<Mutex<Vec<(String, String)>>>,
    idle_calls: Arc<Mutex<u32>>,
    pending_seen: Arc<Mutex<Vec<Option<PendingCheckpoint>>>>,
}

impl Log {
    fn delivered(&self) -> Vec<(String, String)> {
        self.records.lock().expect("not poisoned").clone()
    }
}

/// Never checkpoints by itself: the policy does.
struct Passive {
    worker: String,
    log: Log,
}

#[async_trait]
impl RecordProcessor for Passive {
    async fn initialize(&mut self, shard: &ShardContext) -> Result<(), ProcessorError> {
        self.log
            .pending_seen
            .lock()
            .expect("not poisoned")
            .push(shard.pending_checkpoint.clone());
        Ok(())
    }

    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        _cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        let mut log = self.log.records.lock().expect("not poisoned");
        for r in batch {
            log.push((
                self.worker.clone(),
                String::from_utf8_lossy(&r.data).into_owned(),
            ));
        }
        Ok(())
    }

    fn idle_interval(&self) -> Option<Duration> {
        Some(Duration::from_secs(3))
    }

    async fn idle(&mut self, _cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        *self.log.idle_calls.lock().expect("not poisoned") += 1;
        Ok(())
    }
}

fn worker(backends: &MemBackends, id: &str, policy: CheckpointPolicy, log: &Log) -> Worker {
    let log = log.clone();
    let name = id.to_owned();
    Worker::builder()
        .application_name("policy-app")
        .stream("orders")
        .worker_id(id)
        .backends(backends.clone())
        .heartbeat(Heartbeat::Task)
        .checkpoint_policy(policy)
        .processor(move || Passive {
            worker: name.clone(),
            log: log.clone(),
        })
        .build()
        .expect("valid config")
}

fn checkpoint(backends: &MemBackends) -> ExtendedSequenceNumber {
    backends.leases().leases()[0].checkpoint.clone()
}

#[tokio::test(start_paused = true)]
async fn an_automatic_policy_checkpoints_what_was_processed_before_a_graceful_stop() {
    let backends = MemBackends::new();
    backends.kinesis().create_stream("orders", 1);
    for i in 0..10 {
        backends.kinesis().put("orders", "k", format!("r{i}"));
    }
    let log = Log::default();
    // Neither limit is reached: only the final checkpoint can store anything.
    let w1 = worker(
        &backends,
        "w1",
        CheckpointPolicy::every(1_000, Duration::from_secs(3600)),
        &log,
    );
    let stop = w1.shutdown_handle();
    let run = tokio::spawn(w1.run());
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(log.delivered().len(), 10);
    assert!(checkpoint(&backends).is_initial(), "no limit reached yet");
    stop.shutdown();
    run.await.expect("no panic").expect("clean stop");
    assert!(
        !checkpoint(&backends).is_initial(),
        "the final checkpoint covers the processed records: {:?}",
        checkpoint(&backends)
    );

    // The next worker starts after them: nothing is delivered twice.
    let w2 = worker(&backends, "w2", CheckpointPolicy::after_every_batch(), &log);
    let stop = w2.shutdown_handle();
    let run = tokio::spawn(w2.run());
    backends.kinesis().put("orders", "k", "r10");
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.shutdown();
    run.await.expect("no panic").expect("clean stop");
    let texts: Vec<String> = log.delivered().into_iter().map(|(_, t)| t).collect();
    let expected: Vec<String> = (0..11).map(|i| format!("r{i}")).collect();
    assert_eq!(texts, expected, "every record once");
}

#[tokio::test(start_paused = true)]
async fn a_handoff_with_an_automatic_policy_delivers_nothing_twice() {
    let backends = MemBackends::new();
    backends.kinesis().create_stream("orders", 4);
    let log = Log::default();
    let policy = CheckpointPolicy::every(1_000, Duration::from_secs(3600));
    let w1 = worker(&backends, "w1", policy, &log);
    let stop1 = w1.shutdown_handle();
    let run1 = tokio::spawn(w1.run());
    for i in 0..40 {
        backends
            .kinesis()
            .put("orders", &format!("k{i}"), format!("r{i}"));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(log.delivered().len(), 40);
    // A second worker joins: half of the leases are handed over to it.
    let w2 = worker(&backends, "w2", policy, &log);
    let stop2 = w2.shutdown_handle();
    let run2 = tokio::spawn(w2.run());
    tokio::time::sleep(Duration::from_secs(30)).await;
    let owners: Vec<_> = backends
        .leases()
        .leases()
        .into_iter()
        .filter_map(|l| l.owner)
        .collect();
    assert!(
        owners.iter().any(|o| o.as_str() == "w2"),
        "w2 took leases: {owners:?}"
    );
    for i in 40..80 {
        backends
            .kinesis()
            .put("orders", &format!("k{i}"), format!("r{i}"));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop1.shutdown();
    stop2.shutdown();
    run1.await.expect("no panic").expect("clean stop");
    run2.await.expect("no panic").expect("clean stop");
    let mut texts: Vec<String> = log.delivered().into_iter().map(|(_, t)| t).collect();
    let total = texts.len();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len(), 80, "every record delivered");
    assert_eq!(total, 80, "no record delivered twice across the handoff");
}

#[tokio::test(start_paused = true)]
async fn an_interval_policy_checkpoints_a_quiet_shard_and_idle_is_called() {
    let backends = MemBackends::new();
    backends.kinesis().create_stream("orders", 1);
    let log = Log::default();
    let w = worker(
        &backends,
        "w1",
        CheckpointPolicy::every_interval(Duration::from_secs(10)),
        &log,
    );
    let stop = w.shutdown_handle();
    let run = tokio::spawn(w.run());
    tokio::time::sleep(Duration::from_secs(2)).await;
    backends.kinesis().put("orders", "k", "only");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(log.delivered().len(), 1);
    assert!(checkpoint(&backends).is_initial(), "interval not reached");
    // No more records: the interval alone triggers the checkpoint.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        !checkpoint(&backends).is_initial(),
        "checkpointed on a quiet shard"
    );
    let idle = *log.idle_calls.lock().expect("not poisoned");
    assert!(
        (3..=6).contains(&idle),
        "idle called every 3 quiet seconds: {idle}"
    );
    stop.shutdown();
    run.await.expect("no panic").expect("clean stop");
}

/// Prepares a checkpoint for every batch and "crashes" before committing.
struct PreparesOnly;

#[async_trait]
impl RecordProcessor for PreparesOnly {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        if let Some(last) = batch.records.last() {
            let key = format!("objects/{}", last.sequence_number);
            cp.prepare(last.position(), Some(key.into())).await?;
        }
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn the_next_owner_receives_the_pending_checkpoint_a_crashed_owner_left() {
    let backends = MemBackends::new();
    backends.kinesis().create_stream("orders", 1);
    for i in 0..3 {
        backends.kinesis().put("orders", "k", format!("r{i}"));
    }
    let w1 = Worker::builder()
        .application_name("policy-app")
        .stream("orders")
        .worker_id("w1")
        .backends(backends.clone())
        .heartbeat(Heartbeat::Task)
        .processor(|| PreparesOnly)
        .build()
        .expect("valid config");
    let crashed = tokio::spawn(w1.run());
    tokio::time::sleep(Duration::from_secs(3)).await;
    crashed.abort(); // no shutdown_requested, no release: a crash
    let lease = backends.leases().leases()[0].clone();
    let pending = PendingCheckpoint::of(&lease).expect("prepared");
    assert!(lease.checkpoint.is_initial(), "not committed: {lease:?}");
    let state = pending.state().expect("state stored").clone();
    assert!(state.starts_with(b"objects/"), "{state:?}");

    let log = Log::default();
    let w2 = worker(&backends, "w2", CheckpointPolicy::after_every_batch(), &log);
    let stop = w2.shutdown_handle();
    let run = tokio::spawn(w2.run());
    tokio::time::sleep(Duration::from_secs(20)).await;
    stop.shutdown();
    run.await.expect("no panic").expect("clean stop");
    let seen = log.pending_seen.lock().expect("not poisoned").clone();
    assert_eq!(seen, vec![Some(pending.clone())], "initialize saw it");
    assert_eq!(log.delivered().len(), 3, "the range is delivered again");
    let after = backends.leases().leases()[0].clone();
    assert_eq!(after.checkpoint, pending.position, "{after:?}");
    assert_eq!(after.pending_checkpoint, None, "a checkpoint clears it");
    assert_eq!(after.pending_checkpoint_state, None);
}
