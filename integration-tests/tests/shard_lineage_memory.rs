//! Resharding edge cases on the in-memory backend with paused time.

use std::sync::Arc;
use std::time::Duration;

use kcl::lease::LeaseStore;
use kcl::testkit::{MemKinesis, MemLeaseStore};
use kcl::{ExtendedSequenceNumber, Lease};
use kcl_integration_tests::scenarios::{records, DeliveryLog, Recorder};

#[tokio::test(start_paused = true)]
async fn a_parent_trimmed_away_unfinished_does_not_block_its_children() -> anyhow::Result<()> {
    let kinesis = MemKinesis::new();
    kinesis.create_stream("s", 1);
    let parent = kinesis.open_shard_ids("s")[0].clone();
    for (k, v) in records(0, 100, 8) {
        kinesis.put("s", &k, v);
    }
    // The parent has a lease that never got processed.
    let leases = MemLeaseStore::new();
    leases
        .create_if_absent(&Lease::new(&parent, ExtendedSequenceNumber::TrimHorizon))
        .await?;
    kinesis.split("s", &parent, 1u128 << 127);
    tokio::time::advance(Duration::from_secs(10)).await;
    for (k, v) in records(100, 300, 8) {
        kinesis.put("s", &k, v);
    }
    // Retention removes the parent's records: the closed, empty parent leaves the stream.
    kinesis.trim_before("s", kinesis.now() - Duration::from_secs(5));
    assert!(!kinesis.shard_ids("s").contains(&parent));

    let log = DeliveryLog::default();
    let worker = kcl::Worker::builder()
        // Paused clock: the heartbeat must run on this runtime.
        .heartbeat(kcl::Heartbeat::Task)
        .application_name("lineage-app")
        .stream("s")
        .worker_id("w1")
        .kinesis(Arc::new(kinesis.clone()))
        .lease_store(Arc::new(leases.clone()))
        .processor(Recorder::factory("w1", &log))
        .build()?;
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    log.wait_for(200, Duration::from_secs(120)).await?;
    stop.shutdown();
    run.await??;
    let log = log.snapshot();
    assert_eq!(log.len(), 200);
    assert!(log.iter().all(|d| d.shard != parent));
    // The gone parent's lease was cleaned up.
    assert!(leases.leases().iter().all(|l| l.shard_id() != parent));
    Ok(())
}
