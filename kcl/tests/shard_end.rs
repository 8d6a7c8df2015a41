//! A shard end that arrives without child shards is confirmed — the shard listed closed, with
//! an ending sequence number — before `SHARD_END` is written (DESIGN §5).
//!
//! Run with: `cargo test -p kcl --features testkit --test shard_end`
#![cfg(feature = "testkit")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kcl::retrieval::{
    GetRecordsOutput, IteratorPosition, KinesisApi, KinesisApiError, ShardIterator,
};
use kcl::shard::Shard;
use kcl::testkit::MemBackends;
use kcl::{
    async_trait, Checkpointer, ExtendedSequenceNumber, Heartbeat, ProcessorError, RecordBatch,
    RecordProcessor, ShardId, Worker,
};

/// A Kinesis that drops `ChildShards` from every answer and, while `early_end` is set, ends
/// every iterator at once (no next iterator), as if the open shard had ended.
#[derive(Debug)]
struct Forgetful {
    inner: Arc<dyn KinesisApi>,
    early_end: AtomicBool,
}

#[async_trait]
impl KinesisApi for Forgetful {
    fn now(&self) -> std::time::SystemTime {
        self.inner.now()
    }
    async fn list_shards(&self, stream: &str) -> Result<Vec<Shard>, KinesisApiError> {
        self.inner.list_shards(stream).await
    }
    async fn get_shard_iterator(
        &self,
        stream: &str,
        shard: &ShardId,
        position: &IteratorPosition,
    ) -> Result<ShardIterator, KinesisApiError> {
        self.inner.get_shard_iterator(stream, shard, position).await
    }
    async fn get_records(
        &self,
        iterator: &ShardIterator,
        limit: u32,
    ) -> Result<GetRecordsOutput, KinesisApiError> {
        let mut out = self.inner.get_records(iterator, limit).await?;
        out.child_shards.clear();
        if self.early_end.load(Ordering::Relaxed) {
            out.records.clear();
            out.next_iterator = None;
        }
        Ok(out)
    }
}

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

fn worker(backends: &MemBackends, kinesis: Arc<dyn KinesisApi>, log: &Log) -> Worker {
    let log = log.clone();
    Worker::builder()
        .application_name("shard-end-app")
        .stream("orders")
        .worker_id("w1")
        .kinesis(kinesis)
        .lease_store(Arc::new(backends.leases().clone()))
        .heartbeat(Heartbeat::Task)
        .quarantine(Duration::from_secs(2))
        .processor(move || Recorder(log.clone()))
        .build()
        .expect("valid config")
}

fn lease_of(backends: &MemBackends, shard: &str) -> Option<kcl::Lease> {
    backends
        .leases()
        .leases()
        .into_iter()
        .find(|l| l.key.as_str() == shard)
}

/// An iterator ended on an open shard: no `SHARD_END`, the shard is read again later.
#[tokio::test(start_paused = true)]
async fn an_early_end_on_an_open_shard_is_not_a_shard_end() {
    let backends = MemBackends::new();
    backends.kinesis().create_stream("orders", 1);
    let kinesis = Arc::new(Forgetful {
        inner: Arc::new(backends.kinesis().clone()),
        early_end: AtomicBool::new(true),
    });
    let log = Log::default();
    let w = worker(&backends, kinesis.clone(), &log);
    let stop = w.shutdown_handle();
    let run = tokio::spawn(w.run());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let shard = "shardId-000000000000";
    let lease = lease_of(&backends, shard).expect("lease");
    assert_ne!(
        lease.checkpoint,
        ExtendedSequenceNumber::ShardEnd,
        "an open shard was checkpointed at SHARD_END"
    );
    // The server behaves again: the shard is read after its quarantine.
    kinesis.early_end.store(false, Ordering::Relaxed);
    for i in 0..5 {
        backends.kinesis().put("orders", "k", format!("{i}"));
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    stop.shutdown();
    run.await.expect("no panic").expect("run");
    assert_eq!(log.0.lock().expect("not poisoned").len(), 5);
}

/// A split whose parent's end came without `ChildShards`: confirmed from the listing, with the
/// children it names.
#[tokio::test(start_paused = true)]
async fn a_shard_end_without_children_is_confirmed_and_completed_from_the_listing() {
    let backends = MemBackends::new();
    backends.kinesis().create_stream("orders", 1);
    let parent = ShardId::new("shardId-000000000000");
    for i in 0..5 {
        backends
            .kinesis()
            .put("orders", &format!("k{i}"), format!("{i}"));
    }
    let kinesis = Arc::new(Forgetful {
        inner: Arc::new(backends.kinesis().clone()),
        early_end: AtomicBool::new(false),
    });
    let log = Log::default();
    let w = worker(&backends, kinesis, &log);
    let stop = w.shutdown_handle();
    let run = tokio::spawn(w.run());
    tokio::time::sleep(Duration::from_secs(3)).await;
    backends.kinesis().split("orders", &parent, u128::MAX / 2);
    for i in 5..10 {
        backends
            .kinesis()
            .put("orders", &format!("k{i}"), format!("{i}"));
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    stop.shutdown();
    run.await.expect("no panic").expect("run");
    let lease = lease_of(&backends, parent.as_str()).expect("parent lease");
    assert_eq!(lease.checkpoint, ExtendedSequenceNumber::ShardEnd);
    assert_eq!(lease.child_shard_ids.len(), 2, "{lease:?}");
    assert_eq!(log.0.lock().expect("not poisoned").len(), 10);
}
