//! Multi-stream workers: on the in-memory backends, and on kinesis-local with the lease table
//! on dynalite and moto (through the real SDK clients).

use std::sync::Arc;

use kcl::testkit::{MemKinesis, MemLeaseStore};
use kcl::LeaseStore as _;
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

/// A worker must never take leases of the other mode for its own: a single-stream worker
/// would read another stream's `shardId-…` leases as shards of its stream (and delete them as
/// gone), a multi-stream worker would do the same to a single-stream table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_of_the_other_mode_is_refused_with_what_was_found() -> anyhow::Result<()> {
    use kcl::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor, Worker};
    struct Nothing;
    #[async_trait]
    impl RecordProcessor for Nothing {
        async fn process_records(
            &mut self,
            _: &RecordBatch,
            _: &mut Checkpointer,
        ) -> Result<(), ProcessorError> {
            Ok(())
        }
    }
    let kinesis = MemKinesis::new();
    kinesis.create_stream("orders", 1);
    kinesis.create_stream("refunds", 1);
    let run = |store: Arc<MemLeaseStore>, multi: bool| {
        let builder = Worker::builder()
            .application_name("app")
            .kinesis(Arc::new(kinesis.clone()))
            .lease_store(store)
            .processor(|| Nothing);
        let builder = if multi {
            builder.streams(["orders", "refunds"])
        } else {
            builder.stream("orders")
        };
        async move {
            let worker = builder.build()?;
            let stop = worker.shutdown_handle();
            let result =
                tokio::time::timeout(std::time::Duration::from_secs(5), worker.run()).await;
            stop.shutdown();
            anyhow::Ok(result)
        }
    };

    // A multi-stream table, met by a single-stream worker.
    let multi_table = Arc::new(MemLeaseStore::new());
    let w = {
        let store = multi_table.clone();
        let builder = Worker::builder()
            .application_name("app")
            .streams(["orders", "refunds"])
            .kinesis(Arc::new(kinesis.clone()))
            .lease_store(store)
            .processor(|| Nothing)
            .build()?;
        builder
    };
    let stop = w.shutdown_handle();
    let running = tokio::spawn(w.run());
    kcl_integration_tests::scenarios::poll(
        "multi-stream leases",
        std::time::Duration::from_secs(10),
        || {
            let store = multi_table.clone();
            async move { Ok((store.list().await?.leases.len() == 2).then_some(())) }
        },
    )
    .await?;
    stop.shutdown();
    running.await??;
    let keys: Vec<String> = multi_table
        .list()
        .await?
        .leases
        .iter()
        .map(|l| l.key.to_string())
        .collect();
    assert!(
        keys.iter().all(|k| k.starts_with("000000000000:")),
        "{keys:?}"
    );
    let err = run(multi_table.clone(), false)
        .await?
        .expect("refused at start, not running")
        .expect_err("a single-stream worker must refuse a multi-stream table");
    let text = err.to_string();
    assert!(
        text.contains("holds multi-stream leases (e.g. \"000000000000:"),
        "{text}"
    );
    assert_eq!(
        multi_table.list().await?.leases.len(),
        2,
        "nothing deleted or added"
    );

    // A single-stream table, met by a multi-stream worker.
    let single_table = Arc::new(MemLeaseStore::new());
    single_table
        .create_if_absent(&kcl::Lease::new(
            &kcl::ShardId::new("shardId-000000000000"),
            kcl::ExtendedSequenceNumber::TrimHorizon,
        ))
        .await?;
    let err = run(single_table.clone(), true)
        .await?
        .expect("refused at start, not running")
        .expect_err("a multi-stream worker must refuse a single-stream table");
    let text = err.to_string();
    assert!(
        text.contains("holds single-stream leases (e.g. \"shardId-000000000000\")"),
        "{text}"
    );
    assert_eq!(
        single_table.list().await?.leases.len(),
        1,
        "nothing deleted or added"
    );
    Ok(())
}
