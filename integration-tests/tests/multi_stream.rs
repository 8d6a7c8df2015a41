//! Multi-stream workers: on the in-memory backends, and on kinesis-local with the lease table
//! on dynalite and moto (through the real SDK clients); a Java multi-stream table; the example.

#[path = "multi_stream/example.rs"]
mod example;
#[path = "multi_stream/java_fixture.rs"]
mod java_fixture;

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
    let w = Worker::builder()
        .application_name("app")
        .streams(["orders", "refunds"])
        .kinesis(Arc::new(kinesis.clone()))
        .lease_store(multi_table.clone())
        .processor(|| Nothing)
        .build()?;
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

/// Streams found by the discovery callback: one that appears starts at the initial position;
/// one that disappears stops (nothing of it is read afterwards) and its leases are deleted
/// after `former_stream_retention`; the others go on untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_streams_come_and_go() -> anyhow::Result<()> {
    use kcl::Worker;
    use kcl_integration_tests::scenarios::{poll, records, DeliveryLog, Recorder};
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    use std::time::Duration;

    let kinesis = MemKinesis::new();
    for s in ["a", "b", "c"] {
        kinesis.create_stream(s, 2);
    }
    let put = |stream: &str, from: u32, to: u32| {
        for (k, v) in records(from, to, 8) {
            kinesis.put(stream, &k, v);
        }
    };
    let listed: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(vec!["a".into(), "b".into()]));
    let store = Arc::new(MemLeaseStore::new());
    let log = DeliveryLog::default();
    let mut polling = kcl::PollingConfig::default();
    polling.min_interval = Duration::from_millis(50);
    polling.idle_interval = Duration::from_millis(50);
    let worker = Worker::builder()
        .application_name("discovering")
        .stream_discovery({
            let listed = listed.clone();
            move || {
                let now = listed.lock().map(|l| l.clone()).unwrap_or_default();
                async move { Ok(now) }
            }
        })
        .stream_discovery_interval(Duration::from_secs(1))
        .former_stream_retention(Duration::from_secs(2))
        .taker_interval(Duration::from_millis(200))
        .polling(polling)
        .kinesis(Arc::new(kinesis.clone()))
        .lease_store(store.clone())
        .processor(Recorder::factory("w1", &log))
        .build()?;
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    let count = |log: &DeliveryLog, stream: &str| {
        log.snapshot()
            .iter()
            .filter(|d| d.stream == stream)
            .map(|d| (d.key, d.n))
            .collect::<BTreeSet<_>>()
            .len()
    };

    put("a", 0, 100);
    put("b", 0, 100);
    put("c", 0, 100);
    poll("a and b read", Duration::from_secs(20), || {
        let done = count(&log, "a") == 100 && count(&log, "b") == 100;
        async move { Ok(done.then_some(())) }
    })
    .await?;
    assert_eq!(count(&log, "c"), 0, "c is not in the set yet");

    // b leaves the set, c joins it.
    *listed.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = vec!["a".into(), "c".into()];
    poll("c read from its start", Duration::from_secs(20), || {
        let done = count(&log, "c") == 100;
        async move { Ok(done.then_some(())) }
    })
    .await?;
    let b_before = count(&log, "b");
    put("a", 100, 200);
    put("b", 100, 200);
    poll(
        "b's leases deleted after the retention",
        Duration::from_secs(20),
        || {
            let store = store.clone();
            async move {
                let left = store
                    .list()
                    .await?
                    .leases
                    .iter()
                    .filter(|l| l.key.stream().is_some_and(|s| s.name() == "b"))
                    .count();
                Ok((left == 0).then_some(()))
            }
        },
    )
    .await?;
    poll("a goes on", Duration::from_secs(20), || {
        let done = count(&log, "a") == 200;
        async move { Ok(done.then_some(())) }
    })
    .await?;
    assert_eq!(
        count(&log, "b"),
        b_before,
        "b was read after it left the set"
    );
    stop.shutdown();
    run.await??;
    let names: BTreeSet<String> = store
        .list()
        .await?
        .leases
        .iter()
        .filter_map(|l| l.key.stream().map(|s| s.name().to_owned()))
        .collect();
    assert_eq!(names, BTreeSet::from(["a".to_owned(), "c".to_owned()]));
    Ok(())
}
