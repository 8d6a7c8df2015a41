//! `Worker::status_handle()`: what a health check sees of a running worker — each shard's
//! state, last checkpoint, lag, records processed and last error, and a processor callback that
//! runs too long (stuck: the worker is not ready).
//!
//! Run with: `cargo test -p kcl --features testkit --test worker_status`
#![cfg(feature = "testkit")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kcl::testkit::MemBackends;
use kcl::worker::status::{ShardState, WorkerPhase, WorkerStatus};
use kcl::{
    async_trait, Checkpointer, ExtendedSequenceNumber, ProcessorError, RecordBatch,
    RecordProcessor, Worker,
};

/// Checkpoints every batch; fails its first batch once (retryable); blocks on a batch holding
/// the payload `block` until `release` is set.
struct Processor {
    failed_once: bool,
    release: Arc<AtomicBool>,
}

#[async_trait]
impl RecordProcessor for Processor {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        if !self.failed_once {
            self.failed_once = true;
            return Err(ProcessorError::retryable("first batch fails once"));
        }
        if batch.records.iter().any(|r| &r.data[..] == b"block") {
            while !self.release.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        cp.checkpoint().await?;
        Ok(())
    }
}

async fn wait_for(
    status: &kcl::StatusHandle,
    what: &str,
    ok: impl Fn(&WorkerStatus) -> bool,
) -> WorkerStatus {
    for _ in 0..500 {
        let now = status.status();
        if ok(&now) {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: {:#?}", status.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_shows_checkpoints_lag_errors_and_a_stuck_processor() {
    let backends = MemBackends::new();
    backends.kinesis().create_stream("orders", 1);
    let mut last = None;
    for i in 0..10 {
        last = Some(backends.kinesis().put("orders", "k", format!("r{i}")).1);
    }
    let release = Arc::new(AtomicBool::new(false));
    let worker = Worker::builder()
        .application_name("status-app")
        .stream("orders")
        .backends(backends.clone())
        .error_policy(kcl::ErrorPolicy::Retry {
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
        })
        .processor({
            let release = release.clone();
            move || Processor {
                failed_once: false,
                release: release.clone(),
            }
        })
        .build()
        .expect("valid config");
    let status = worker.status_handle();
    assert_eq!(status.status().phase, WorkerPhase::Starting);
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());

    let last = ExtendedSequenceNumber::at(last.expect("records put"), 0);
    let seen = wait_for(&status, "the checkpoint reaches the last record", |s| {
        s.shards
            .first()
            .is_some_and(|sh| sh.checkpoint.as_ref() == Some(&last))
    })
    .await;
    let shard = &seen.shards[0];
    assert_eq!(seen.phase, WorkerPhase::Running);
    assert_eq!(shard.state, ShardState::Processing);
    assert_eq!(shard.records_processed, 10);
    assert!(shard.checkpointed_at.is_some());
    assert!(shard.millis_behind_latest.is_some());
    let (_, error) = shard.last_error.clone().expect("the failed batch is shown");
    assert!(error.contains("first batch fails once"), "{error}");
    assert!(seen.is_ready(Duration::from_millis(200)));
    assert!(!seen.draining);

    // A batch that does not return: stuck once it has run for the threshold.
    backends.kinesis().put("orders", "k", "block");
    let stuck = wait_for(&status, "the blocked batch shows as stuck", |s| {
        !s.stuck(Duration::from_millis(300)).is_empty()
    })
    .await;
    assert!(!stuck.is_ready(Duration::from_millis(300)));
    assert!(stuck.is_ready(Duration::from_secs(3600)));
    release.store(true, Ordering::SeqCst);
    wait_for(&status, "ready again", |s| {
        s.is_ready(Duration::from_millis(300))
    })
    .await;

    stop.shutdown();
    run.await.expect("no panic").expect("clean stop");
    let end = status.status();
    assert_eq!(end.phase, WorkerPhase::Stopped);
    assert!(end.shards.is_empty(), "{end:#?}");
    assert!(!end.is_live());
}

/// A processor that never returns keeps a graceful shutdown from finishing: after
/// `shutdown_timeout`, `run()` fails naming the abandoned shard (a service exits non-zero).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_cut_short_by_its_timeout_names_the_abandoned_shards() {
    let backends = MemBackends::new();
    backends.kinesis().create_stream("orders", 1);
    backends.kinesis().put("orders", "k", "block");
    let never = Arc::new(AtomicBool::new(false));
    let worker = Worker::builder()
        .application_name("abandon-app")
        .stream("orders")
        .backends(backends.clone())
        .shutdown_timeout(Duration::from_millis(300))
        .processor({
            let never = never.clone();
            move || Processor {
                failed_once: true,
                release: never.clone(),
            }
        })
        .build()
        .expect("valid config");
    let status = worker.status_handle();
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    wait_for(&status, "the batch is running", |s| {
        !s.stuck(Duration::ZERO).is_empty()
    })
    .await;
    stop.shutdown();
    match run.await.expect("no panic") {
        Err(kcl::Error::Abandoned { shards }) => {
            assert_eq!(shards, vec![kcl::ShardId::new("shardId-000000000000")]);
        }
        other => panic!("expected Abandoned, got {other:?}"),
    }
}

/// Under the `Handoff` error policy a fatal error outside a batch (`initialize`) has no batch to
/// hand over: it stops the shard (shown as failed), as under `Retry`, instead of being retried
/// for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_initialize_error_under_the_handoff_policy_stops_the_shard() {
    struct FailsToStart(Arc<std::sync::atomic::AtomicUsize>);
    #[async_trait]
    impl RecordProcessor for FailsToStart {
        async fn initialize(&mut self, _: &kcl::ShardContext) -> Result<(), ProcessorError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err(ProcessorError::fatal("the database is gone"))
        }
        async fn process_records(
            &mut self,
            _: &RecordBatch,
            _: &mut Checkpointer,
        ) -> Result<(), ProcessorError> {
            Ok(())
        }
    }
    let backends = MemBackends::new();
    backends.kinesis().create_stream("orders", 1);
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let worker = Worker::builder()
        .application_name("handoff-app")
        .stream("orders")
        .backends(backends.clone())
        .error_policy(kcl::ErrorPolicy::handoff(|_, _| {}))
        .processor({
            let calls = calls.clone();
            move || FailsToStart(calls.clone())
        })
        .build()
        .expect("valid config");
    let status = worker.status_handle();
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    let failed = wait_for(&status, "the shard is set aside as failed", |s| {
        s.shards.iter().any(|sh| sh.state == ShardState::Failed)
    })
    .await;
    assert_eq!(failed.held().count(), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "initialize was retried");
    stop.shutdown();
    run.await.expect("no panic").expect("clean stop");
}
