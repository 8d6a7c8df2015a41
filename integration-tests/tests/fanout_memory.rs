//! The worker reading with enhanced fan-out on the in-memory backend (paused time): every
//! record delivered once, in order per shard, across a split (shard end via the subscription's
//! child shards) and across the 5-minute subscription renewals.

use std::sync::Arc;
use std::time::Duration;

use kcl::testkit::{MemKinesis, MemLeaseStore};
use kcl_integration_tests::scenarios::{
    check_all_delivered, check_no_duplicates_or_overlap, check_per_key_order, records, DeliveryLog,
    Recorder,
};

#[tokio::test(start_paused = true)]
async fn fan_out_delivers_everything_across_a_split_and_resubscriptions() -> anyhow::Result<()> {
    const KEYS: u32 = 16;
    let kinesis = MemKinesis::new();
    kinesis.create_stream("s", 2);
    let log = DeliveryLog::default();
    let worker = kcl::Worker::builder()
        // Paused clock: the heartbeat must run on this runtime.
        .heartbeat(kcl::Heartbeat::Task)
        .application_name("fanout-app")
        .stream("s")
        .worker_id("w1")
        .kinesis(Arc::new(kinesis.clone()))
        .lease_store(Arc::new(MemLeaseStore::new()))
        .fan_out("fanout-app-consumer")
        .processor(Recorder::factory("w1", &log))
        .build()?;
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    let mut n = 0;
    // 12 minutes of traffic: more than two subscription lifetimes.
    for minute in 0..12u32 {
        for _ in 0..6 {
            for (k, v) in records(n, n + 50, KEYS) {
                kinesis.put("s", &k, v);
            }
            n += 50;
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        if minute == 5 {
            let shard = kinesis.open_shard_ids("s")[0].clone();
            kinesis.split("s", &shard, 1u128 << 126);
        }
    }
    log.wait_for(n as usize, Duration::from_secs(120)).await?;
    stop.shutdown();
    run.await??;
    let log = log.snapshot();
    check_all_delivered(&log, n, KEYS)?;
    check_per_key_order(&log)?;
    check_no_duplicates_or_overlap(&log)?;
    assert_eq!(log.len(), n as usize);
    Ok(())
}
