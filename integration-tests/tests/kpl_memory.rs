//! KPL-aggregated records through the worker on the in-memory backend (paused time):
//! sub-sequence checkpoints, restart inside an aggregate, hash-range filtering.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kcl::producer::{aggregate, UserRecord};
use kcl::testkit::{MemKinesis, MemLeaseStore};
use kcl::{
    async_trait, Checkpointer, ExtendedSequenceNumber, ProcessorError, RecordBatch, RecordProcessor,
};
use kcl_integration_tests::scenarios::{DeliveryLog, Recorder};

/// Processes the first `n` user records, checkpoints the n-th, and ignores everything after.
struct Partial {
    n: usize,
    seen: Arc<Mutex<Vec<ExtendedSequenceNumber>>>,
}

#[async_trait]
impl RecordProcessor for Partial {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        let mut to_checkpoint = None;
        {
            let mut seen = self
                .seen
                .lock()
                .map_err(|_| ProcessorError::fatal("poisoned"))?;
            for r in batch {
                if seen.len() == self.n {
                    break;
                }
                seen.push(r.position());
                if seen.len() == self.n {
                    to_checkpoint = Some(r.clone());
                }
            }
        }
        if let Some(r) = to_checkpoint {
            cp.checkpoint_record(&r)
                .await
                .map_err(ProcessorError::retryable)?;
        }
        Ok(())
    }
}

fn worker(
    kinesis: &MemKinesis,
    leases: &MemLeaseStore,
    id: &str,
    processor: impl kcl::ProcessorFactory,
) -> anyhow::Result<kcl::Worker> {
    Ok(kcl::Worker::builder()
        // Paused clock: the heartbeat must run on this runtime.
        .heartbeat(kcl::Heartbeat::Task)
        .application_name("kpl-app")
        .stream("s")
        .worker_id(id)
        .kinesis(Arc::new(kinesis.clone()))
        .lease_store(Arc::new(leases.clone()))
        .processor(processor)
        .build()?)
}

#[tokio::test(start_paused = true)]
async fn a_restart_resumes_inside_an_aggregate_without_redelivering() -> anyhow::Result<()> {
    let kinesis = MemKinesis::new();
    kinesis.create_stream("s", 1);
    // 10 aggregates of 10 user records: payload "key/n" as the Recorder expects.
    for a in 0..10u32 {
        let users: Vec<UserRecord> = (0..10u32)
            .map(|i| {
                let n = a * 10 + i;
                UserRecord::new(format!("key-{}", n % 7), format!("{}/{}", n % 7, n / 7))
            })
            .collect();
        kinesis.put("s", "agg", aggregate(&users));
    }
    let leases = MemLeaseStore::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let first = {
        let seen = seen.clone();
        worker(&kinesis, &leases, "w1", move || Partial {
            n: 35,
            seen: seen.clone(),
        })?
    };
    let stop = first.shutdown_handle();
    let run = tokio::spawn(first.run());
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.shutdown();
    run.await??;
    let checkpoint = leases.leases()[0].checkpoint.clone();
    let seen = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    assert_eq!(seen.len(), 35);
    assert_eq!(
        checkpoint, seen[34],
        "checkpointed at sub-record granularity"
    );
    assert_eq!(checkpoint.sub_sequence(), 4);

    let log = DeliveryLog::default();
    let second = worker(&kinesis, &leases, "w2", Recorder::factory("w2", &log))?;
    let stop = second.shutdown_handle();
    let run = tokio::spawn(second.run());
    log.wait_for(65, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.shutdown();
    run.await??;
    let log = log.snapshot();
    let mut delivered: Vec<u32> = log.iter().map(|d| d.key + 7 * d.n).collect();
    delivered.sort_unstable();
    assert_eq!(
        delivered,
        (35..100).collect::<Vec<_>>(),
        "exactly the unprocessed sub-records"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn sub_records_outside_the_shards_hash_range_are_filtered() -> anyhow::Result<()> {
    let kinesis = MemKinesis::new();
    kinesis.create_stream("s", 2);
    let shards = kcl::KinesisApi::list_shards(&kinesis, "s").await?;
    let low = shards[0].hash_range;
    // One aggregate, put into the low shard, whose sub-records hash all over the key space
    // (as when an aggregate built before a split lands on one child).
    let users: Vec<UserRecord> = (0..40u32)
        .map(|n| UserRecord::new(format!("key-{n}"), format!("{n}/0")))
        .collect();
    let expected: Vec<u32> = (0..40u32)
        .filter(|n| low.contains(kcl::shard::hash_key(&format!("key-{n}"))))
        .collect();
    assert!(!expected.is_empty() && expected.len() < 40);
    kinesis.put_with_hash("s", "agg", low.start(), aggregate(&users));

    let leases = MemLeaseStore::new();
    let log = DeliveryLog::default();
    let w = worker(&kinesis, &leases, "w1", Recorder::factory("w1", &log))?;
    let stop = w.shutdown_handle();
    let run = tokio::spawn(w.run());
    log.wait_for(expected.len(), Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.shutdown();
    run.await??;
    let mut got: Vec<u32> = log.snapshot().iter().map(|d| d.key).collect();
    got.sort_unstable();
    assert_eq!(got, expected);
    Ok(())
}
