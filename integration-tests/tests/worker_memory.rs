//! The worker scenarios on the in-memory backends.

use std::sync::Arc;

use kcl::testkit::{MemKinesis, MemLeaseStore};
use kcl_integration_tests::scenarios::{self, MemStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_resume() -> anyhow::Result<()> {
    scenarios::drain_and_resume(
        &MemStream(MemKinesis::new()),
        Arc::new(MemLeaseStore::new()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge() -> anyhow::Result<()> {
    scenarios::split_and_merge(
        &MemStream(MemKinesis::new()),
        Arc::new(MemLeaseStore::new()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_graceful_handoff() -> anyhow::Result<()> {
    scenarios::two_workers_graceful_handoff(
        &MemStream(MemKinesis::new()),
        Arc::new(MemLeaseStore::new()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_a_worker() -> anyhow::Result<()> {
    scenarios::drain_a_worker(
        &MemStream(MemKinesis::new()),
        Arc::new(MemLeaseStore::new()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_timestamp() -> anyhow::Result<()> {
    scenarios::at_timestamp(
        &MemStream(MemKinesis::new()),
        Arc::new(MemLeaseStore::new()),
    )
    .await
}

macro_rules! memory_scenarios {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> anyhow::Result<()> {
            scenarios::$name(
                &MemStream(MemKinesis::new()),
                Arc::new(MemLeaseStore::new()),
            )
            .await
        }
    )*};
}

memory_scenarios! {
    latest_skips_earlier_records,
    fan_out_checkpoints,
    kpl_resume_inside_an_aggregate,
    update_shard_count_while_consuming,
}
