//! Multi-stream workers: on the in-memory backends, and on kinesis-local with the lease table
//! on dynalite and moto (through the real SDK clients).

use std::sync::Arc;

use kcl::testkit::{MemKinesis, MemLeaseStore};
use kcl_integration_tests::dynamo_servers::{lease_table, Table};
use kcl_integration_tests::multi_stream;
use kcl_integration_tests::scenarios::{LocalKinesis, MemStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_resharded_in_memory() -> anyhow::Result<()> {
    multi_stream::two_streams_resharded(
        &MemStream(MemKinesis::new()),
        Arc::new(MemLeaseStore::new()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_resharded_dynalite() -> anyhow::Result<()> {
    let kinesis = LocalKinesis::start().await?;
    let (_server, leases) = lease_table(Table::Dynalite).await?;
    multi_stream::two_streams_resharded(&kinesis, leases).await
}
