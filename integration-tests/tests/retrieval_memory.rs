//! Retrieval under Kinesis' limits and faults, on the in-memory backend with paused time:
//! read-limit enforcement, throttling, expired iterators, AT_TIMESTAMP.

use std::sync::Arc;
use std::time::Duration;

use kcl::testkit::{Fault, FaultKind, MemKinesis, MemLeaseStore};
use kcl::PollingConfig;
use kcl_integration_tests::scenarios::{
    check_all_delivered, check_no_duplicates_or_overlap, records, DeliveryLog, MemStream, Recorder,
    StreamFixture,
};

const KEYS: u32 = 32;

async fn run_until_delivered(
    kinesis: &MemKinesis,
    log: &DeliveryLog,
    n: usize,
    customize: impl FnOnce(kcl::WorkerBuilder) -> kcl::WorkerBuilder,
) -> anyhow::Result<()> {
    let fixture = MemStream(kinesis.clone());
    let builder = kcl::Worker::builder()
        // Paused clock: the heartbeat must run on this runtime.
        .heartbeat(kcl::Heartbeat::Task)
        .application_name("retrieval-app")
        .stream("s")
        .worker_id("w1")
        .kinesis(fixture.kinesis())
        .lease_store(Arc::new(MemLeaseStore::new()))
        .processor(Recorder::factory("w1", log));
    let worker = customize(builder).build()?;
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    log.wait_for(n, Duration::from_secs(600)).await?;
    stop.shutdown();
    run.await??;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn one_worker_stays_within_the_per_shard_read_limits() -> anyhow::Result<()> {
    let kinesis = MemKinesis::new();
    kinesis.create_stream("s", 4);
    kinesis.enforce_read_limits(true);
    let log = DeliveryLog::default();
    let producer = {
        let k = kinesis.clone();
        tokio::spawn(async move {
            for wave in 0..20 {
                for (key, data) in records(wave * 500, (wave + 1) * 500, KEYS) {
                    k.put("s", &key, data);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    run_until_delivered(&kinesis, &log, 10_000, |b| b).await?;
    producer.await?;
    assert_eq!(
        kinesis.throttled_reads(),
        0,
        "the default polling exceeded 5 reads/s"
    );
    let log = log.snapshot();
    check_all_delivered(&log, 10_000, KEYS)?;
    check_no_duplicates_or_overlap(&log)
}

#[tokio::test(start_paused = true)]
async fn polling_faster_than_the_limits_is_throttled_and_loses_nothing() -> anyhow::Result<()> {
    let kinesis = MemKinesis::new();
    kinesis.create_stream("s", 2);
    kinesis.enforce_read_limits(true);
    for (key, data) in records(0, 5_000, KEYS) {
        kinesis.put("s", &key, data);
    }
    let log = DeliveryLog::default();
    // Ask for 100 records per call with no pause: the shard limit (5 calls/s) must throttle,
    // and the backoff must still deliver everything exactly once.
    let mut polling = PollingConfig::default();
    polling.max_records = 100;
    polling.min_interval = Duration::ZERO;
    polling.idle_interval = Duration::ZERO;
    run_until_delivered(&kinesis, &log, 5_000, |b| b.polling(polling)).await?;
    assert!(kinesis.throttled_reads() > 0, "expected throttling");
    let log = log.snapshot();
    check_all_delivered(&log, 5_000, KEYS)?;
    check_no_duplicates_or_overlap(&log)
}

#[tokio::test(start_paused = true)]
async fn injected_throttles_and_expired_iterators_lose_nothing() -> anyhow::Result<()> {
    let kinesis = MemKinesis::new();
    kinesis.create_stream("s", 4);
    for (key, data) in records(0, 8_000, KEYS) {
        kinesis.put("s", &key, data);
    }
    kinesis
        .faults()
        .inject(Fault::new(FaultKind::Throttle).on("get_records").times(25));
    kinesis.faults().inject(
        Fault::new(FaultKind::ExpiredIterator)
            .on("get_records")
            .times(10),
    );
    kinesis.faults().inject(
        Fault::new(FaultKind::Transient)
            .on("get_shard_iterator")
            .times(5),
    );
    let log = DeliveryLog::default();
    let mut polling = PollingConfig::default();
    polling.max_records = 250;
    run_until_delivered(&kinesis, &log, 8_000, |b| b.polling(polling)).await?;
    let log = log.snapshot();
    check_all_delivered(&log, 8_000, KEYS)?;
    check_no_duplicates_or_overlap(&log)?;
    assert_eq!(log.len(), 8_000, "an expired iterator re-delivered records");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn at_timestamp_starts_at_the_first_record_at_or_after_it() -> anyhow::Result<()> {
    let kinesis = MemKinesis::new();
    kinesis.create_stream("s", 2);
    for (key, data) in records(0, 1_000, KEYS) {
        kinesis.put("s", &key, data);
    }
    tokio::time::advance(Duration::from_secs(60)).await;
    let start = kinesis.now();
    for (key, data) in records(1_000, 2_000, KEYS) {
        kinesis.put("s", &key, data);
    }
    let log = DeliveryLog::default();
    run_until_delivered(&kinesis, &log, 1_000, |b| b.start_at(start)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = log.snapshot();
    assert_eq!(log.len(), 1_000);
    assert!(
        log.iter().all(|d| d.key + d.n * KEYS >= 1_000),
        "a record from before the timestamp was delivered"
    );
    Ok(())
}
