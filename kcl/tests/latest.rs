//! `LATEST` never skips (issue 8 A): the position `LATEST` stood for when a shard was first
//! read is stored in its lease, so a worker that crashes before its first checkpoint does not
//! make the next owner start at a later `LATEST`, skipping what arrived meanwhile.
//!
//! Run with: `cargo test -p kcl --features testkit --test latest`
#![cfg(feature = "testkit")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kcl::testkit::MemBackends;
use kcl::{
    async_trait, Checkpointer, ExtendedSequenceNumber, Heartbeat, InitialPosition, ProcessorError,
    RecordBatch, RecordProcessor, Worker,
};

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

struct Recorder(Log);

#[async_trait]
impl RecordProcessor for Recorder {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        self.0 .0.lock().expect("not poisoned").extend(
            batch
                .records
                .iter()
                .map(|r| String::from_utf8_lossy(&r.data).into_owned()),
        );
        cp.checkpoint().await.map_err(ProcessorError::retryable)
    }
}

fn worker(backends: &MemBackends, id: &str, log: &Log) -> Worker {
    let log = log.clone();
    Worker::builder()
        .application_name("latest-app")
        .stream("orders")
        .worker_id(id)
        .backends(backends.clone())
        .initial_position(InitialPosition::Latest)
        .heartbeat(Heartbeat::Task)
        .processor(move || Recorder(log.clone()))
        .build()
        .expect("valid config")
}

#[tokio::test(start_paused = true)]
async fn a_crash_before_the_first_checkpoint_skips_nothing_written_since_latest() {
    let backends = MemBackends::new();
    backends.kinesis().create_stream("orders", 1);
    backends.kinesis().put("orders", "k", "before");
    // More than the restart margin (1 s, for clock skew) before the first worker's LATEST.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let first = Log::default();
    // The first worker starts reading at LATEST, then dies before any record arrives.
    let w1 = tokio::spawn(worker(&backends, "w1", &first).run());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lease = backends.leases().leases()[0].clone();
    assert_eq!(lease.checkpoint, ExtendedSequenceNumber::Latest);
    assert!(
        lease.latest_resolved_at.is_some(),
        "the position LATEST stood for is stored at the first read: {lease:?}"
    );
    w1.abort();
    // Written while nobody reads the shard.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..5 {
        backends.kinesis().put("orders", "k", format!("after-{i}"));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The next owner takes the expired lease and starts where the first one stood.
    let second = Log::default();
    let w2 = worker(&backends, "w2", &second);
    let stop = w2.shutdown_handle();
    let running = tokio::spawn(w2.run());
    tokio::time::sleep(Duration::from_secs(30)).await;
    stop.shutdown();
    running.await.expect("no panic").expect("run");
    let got = second.0.lock().expect("not poisoned").clone();
    assert!(first.0.lock().expect("not poisoned").is_empty());
    assert_eq!(
        got,
        (0..5).map(|i| format!("after-{i}")).collect::<Vec<_>>(),
        "every record written after the first worker's LATEST, and nothing before it"
    );
}
