//! DESIGN §2.6 on the real SDK path: a lease-table write that was applied but whose answer was
//! lost is not a lost lease.
//!
//! An SDK interceptor replaces the answers of some *successful* `UpdateItem` calls (renewals,
//! checkpoints) with a 500. The SDK retries them; the retry's condition fails, because the
//! first attempt already moved the lease counter. A lone, healthy worker must carry on: no
//! `lease_lost`, no record delivered twice, every record delivered, every lease released at
//! the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::lease::LeaseStore;
use kcl::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor, Worker};
use kcl_integration_tests::dynamo_servers::start_dynalite;
use kcl_integration_tests::scenarios::{records, LocalKinesis, StreamFixture};
use kcl_integration_tests::sdk_faults::LoseUpdateAnswers;
use kcl_integration_tests::{sdk_config, unique_name};

#[derive(Default)]
struct Tally {
    /// Deliveries per record payload.
    deliveries: Mutex<BTreeMap<Vec<u8>, usize>>,
    leases_lost: AtomicUsize,
}

struct Counting(Arc<Tally>);

#[async_trait]
impl RecordProcessor for Counting {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        {
            let mut d = self
                .0
                .deliveries
                .lock()
                .map_err(|_| ProcessorError::fatal("poisoned"))?;
            for r in batch {
                *d.entry(r.data.to_vec()).or_default() += 1;
            }
        }
        cp.checkpoint().await.map_err(ProcessorError::retryable)
    }

    async fn lease_lost(&mut self) {
        self.0.leases_lost.fetch_add(1, Ordering::Relaxed);
    }

    async fn shutdown_requested(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        cp.checkpoint().await.map_err(ProcessorError::retryable)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_update_answers_are_not_lost_leases() -> anyhow::Result<()> {
    const SHARDS: u32 = 2;
    const RECORDS: u32 = 120;
    let kinesis = LocalKinesis::start().await?;
    let table_server = start_dynalite().await?;
    let conf = sdk_config(&table_server.endpoint()).await;
    let (lose, lost) = LoseUpdateAnswers::every(3);
    let dynamo_conf = aws_sdk_dynamodb::config::Builder::from(&conf)
        .interceptor(lose)
        .build();
    let table = unique_name("lost-answers");
    let store: Arc<dyn LeaseStore> = Arc::new(DynamoLeaseStore::new(
        aws_sdk_dynamodb::Client::from_conf(dynamo_conf),
        &table,
    ));

    let stream = unique_name("lost-answers");
    kinesis.create_stream(&stream, SHARDS).await?;
    kinesis.put(&stream, records(0, RECORDS / 2, 8)).await?;

    let tally = Arc::new(Tally::default());
    let mut polling = kcl::PollingConfig::default();
    polling.min_interval = Duration::from_millis(50);
    polling.idle_interval = Duration::from_millis(100);
    let worker = Worker::builder()
        .application_name("lost-answers-app")
        .table_name(&table)
        .stream(&stream)
        .worker_id("lone")
        .kinesis(kinesis.kinesis())
        .lease_store(store.clone())
        // Renewals every second: a dozen per lease over the run, a third of them answered
        // with a 500 after they were applied.
        .lease_duration(Duration::from_secs(3))
        .taker_interval(Duration::from_millis(300))
        .polling(polling)
        .processor({
            let tally = tally.clone();
            move || Counting(tally.clone())
        })
        .build()?;
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());

    tokio::time::sleep(Duration::from_secs(4)).await;
    kinesis
        .put(&stream, records(RECORDS / 2, RECORDS, 8))
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let delivered = tally.deliveries.lock().map(|d| d.len()).unwrap_or(0);
        if delivered >= RECORDS as usize {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "only {delivered} of {RECORDS} records delivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few more renewals with lost answers while idle.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.shutdown();
    running.await.context("worker task")??;

    let lost = lost.load(Ordering::Relaxed);
    ensure!(
        lost >= 5,
        "only {lost} answers were lost: the test did not test anything"
    );
    let leases_lost = tally.leases_lost.load(Ordering::Relaxed);
    ensure!(
        leases_lost == 0,
        "{leases_lost} leases lost by a lone worker ({lost} answers lost)"
    );
    let deliveries = tally
        .deliveries
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let twice: Vec<_> = deliveries.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(
        twice.is_empty(),
        "{} records delivered more than once, e.g. {:?}",
        twice.len(),
        twice.first().map(|(d, n)| (String::from_utf8_lossy(d), *n))
    );
    ensure!(deliveries.len() == RECORDS as usize);
    // Released at shutdown: nothing owned.
    let table = store.list().await?;
    ensure!(table.leases.len() == SHARDS as usize);
    for l in &table.leases {
        ensure!(l.owner.is_none(), "{} still owned by {:?}", l.key, l.owner);
    }
    println!("{lost} UpdateItem answers lost; 0 leases lost; {RECORDS} records delivered once");
    Ok(())
}
