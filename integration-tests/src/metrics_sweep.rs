//! The workload behind the metrics sweeps (`tests/metrics_prometheus.rs`,
//! `tests/metrics_emf.rs`): two workers over a 2-shard stream on the real SDK path, a
//! processor that fails once and panics once (dead-lettered, to a dead-letter handler that
//! fails its first call), an invalid KPL aggregate; then one worker, still running, gives its
//! shard up (its dead-letter handler panics: the shard is stopped and released, and nobody
//! takes it).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kcl::error::BoxError;
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::lease::LeaseStore;
use kcl::metrics::MetricsLevel;
use kcl::processor::policy::{DeadLetter, DeadLetterHandler, DeadLetterPolicy};
use kcl::producer::aws::AwsPutRecords;
use kcl::producer::Producer;
use kcl::retrieval::aws::AwsKinesis;
use kcl::retrieval::KinesisApi;
use kcl::{
    async_trait, Checkpointer, ErrorPolicy, ProcessorError, RecordBatch, RecordProcessor, Worker,
};

use crate::scenarios::{self, DeliveryLog, StreamFixture};
use crate::sdk_faults::{LoseUpdateAnswers, ReplaceFirst};

/// How often the sweep's workers refresh their metrics.
pub const REFRESH: Duration = Duration::from_millis(200);

/// What a sweep saw.
#[derive(Debug)]
pub struct SweepRun {
    /// The exporter's output while both workers ran and every record was processed.
    pub during: String,
    /// The output `wait_after_give_up` after worker `b` gave its shard up (still running).
    pub after_give_up: String,
    /// The shard worker `b` held, then gave up (nobody took it: `a` holds at most one, `b`
    /// does not take back a shard whose processor failed).
    pub given_up: String,
    /// The shard worker `a` kept.
    pub kept: String,
}

/// Fails its first call with an error and panics in its second (both dead-lettered by the
/// error policy), then processes and checkpoints; fails every call once `give_up` is set.
struct Planted {
    calls: Arc<AtomicU32>,
    processed: Arc<AtomicU64>,
    give_up: Option<Arc<AtomicBool>>,
}

#[async_trait]
impl RecordProcessor for Planted {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        if self
            .give_up
            .as_ref()
            .is_some_and(|g| g.load(Ordering::SeqCst))
        {
            return Err(ProcessorError::fatal("planted: give the shard up"));
        }
        match self.calls.fetch_add(1, Ordering::SeqCst) {
            0 => return Err(ProcessorError::retryable("planted error")),
            1 => panic!("planted panic"),
            _ => {}
        }
        self.processed
            .fetch_add(batch.len() as u64, Ordering::SeqCst);
        cp.checkpoint().await.map_err(ProcessorError::retryable)
    }
}

/// The dead-letter handler: fails its first call (of the whole sweep), counts the records it
/// takes, and panics once `panics` is set.
struct Destination {
    dead: Arc<AtomicU64>,
    panics: Option<Arc<AtomicBool>>,
    failed_once: Arc<AtomicBool>,
}

#[async_trait]
impl DeadLetterHandler for Destination {
    async fn handle(&self, letter: &DeadLetter<'_>) -> Result<(), BoxError> {
        if self
            .panics
            .as_ref()
            .is_some_and(|g| g.load(Ordering::SeqCst))
        {
            panic!("planted: the dead-letter handler stops the shard");
        }
        if !self.failed_once.swap(true, Ordering::SeqCst) {
            return Err("planted: the dead-letter destination fails once".into());
        }
        self.dead
            .fetch_add(letter.records.len() as u64, Ordering::SeqCst);
        Ok(())
    }
}

/// The clients of a sweep.
#[derive(Clone)]
pub struct Clients {
    /// What the workers read through.
    pub kinesis: Arc<dyn KinesisApi>,
    /// The lease table.
    pub leases: Arc<dyn LeaseStore>,
    /// What the producer puts through.
    pub producer: AwsPutRecords,
}

/// The clients with planted faults: the first 6 `GetRecords` attempts throttled (the SDK
/// gives up on a call after three: the library counts a read throttle and retries; two
/// shards read at once), every 2nd lease-table `UpdateItem` answer lost, the first 2 `PutRecords`
/// answers rejecting their record.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// use kcl_integration_tests::{metrics_sweep, scenarios::LocalKinesis};
/// let kinesis = LocalKinesis::start().await?;
/// let dynalite = kcl_integration_tests::dynamo_servers::start_dynalite().await?;
/// let conf = kcl_integration_tests::sdk_config(&dynalite.endpoint()).await;
/// let clients = metrics_sweep::faulty_clients(&kinesis, &conf);
/// # let _ = clients;
/// # Ok(())
/// # }
/// ```
pub fn faulty_clients(
    kinesis: &crate::scenarios::LocalKinesis,
    conf: &aws_config::SdkConfig,
) -> Clients {
    let client = aws_sdk_kinesis::Client::from_conf(
        kinesis
            .client
            .config()
            .to_builder()
            .interceptor(ReplaceFirst::throttle("GetRecords", 6))
            .build(),
    );
    let (lose, _lost) = LoseUpdateAnswers::every(2);
    // Only lease-table writes lose answers: heartbeats alone would never show a lost answer
    // found applied (`kcl_lease_lost_answers_total`), and they can take every lost slot.
    let lose = lose.sparing("-workers");
    let dynamo = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(conf)
            .interceptor(lose)
            .build(),
    );
    let leases = DynamoLeaseStore::new(dynamo, crate::unique_name("leases"));
    let producer = aws_sdk_kinesis::Client::from_conf(
        kinesis
            .client
            .config()
            .to_builder()
            .interceptor(ReplaceFirst::reject_put_records(2))
            .build(),
    );
    Clients {
        kinesis: Arc::new(AwsKinesis::new(client)),
        leases: Arc::new(leases),
        producer: AwsPutRecords::new(producer),
    }
}

/// Runs the workload at `level` on a stream of `fixture` through `clients` (with planted
/// faults, if any); `scrape` renders the exporter's output.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// use std::time::Duration;
/// use kcl::metrics::MetricsLevel;
/// use kcl_integration_tests::{metrics_sweep, scenarios::LocalKinesis};
/// let kinesis = LocalKinesis::start().await?;
/// let dynalite = kcl_integration_tests::dynamo_servers::start_dynalite().await?;
/// let conf = kcl_integration_tests::sdk_config(&dynalite.endpoint()).await;
/// let clients = metrics_sweep::faulty_clients(&kinesis, &conf);
/// let scrape = || String::new(); // the exporter's rendering
/// let run = metrics_sweep::run(MetricsLevel::Summary, &kinesis, clients, &scrape, Duration::ZERO)
///     .await?;
/// println!("{}", run.during);
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// When the stream cannot be set up, or records or leases do not arrive in time.
pub async fn run(
    level: MetricsLevel,
    fixture: &dyn StreamFixture,
    clients: Clients,
    scrape: &(dyn Fn() -> String + Sync),
    wait_after_give_up: Duration,
) -> anyhow::Result<SweepRun> {
    let leases = clients.leases.clone();
    let stream = crate::unique_name("metrics");
    fixture.create_stream(&stream, 2).await?;
    let mut records = scenarios::records(0, 20, 8);
    // The KPL magic with no valid aggregate after it.
    records.push((
        "key-bad".to_owned(),
        vec![0xF3, 0x89, 0x9A, 0xC2, 1, 2, 3, 4],
    ));
    fixture.put(&stream, records.clone()).await?;
    // The producer: by a producer that tries once, a record rejected and given up (put at
    // its close); then a record rejected once and put again. Both are delivered.
    let lossy = Producer::builder(clients.producer.clone(), &stream)
        .max_batch_records(1)
        .max_attempts(1)
        .build()?;
    lossy.put("key-lossy", b"lossy".to_vec()).await?;
    anyhow::ensure!(
        lossy.flush().await.is_err(),
        "the planted rejection did not fail the flush"
    );
    let retried = Producer::builder(clients.producer.clone(), &stream)
        .max_batch_records(1)
        .min_backoff(Duration::from_millis(10))
        .build()?;
    retried.put("key-retried", b"retried".to_vec()).await?;
    retried.close().await?;
    lossy.close().await?;
    let total = records.len() as u64 + 2;

    let calls = Arc::new(AtomicU32::new(0));
    let processed = Arc::new(AtomicU64::new(0));
    let log = DeliveryLog::default();
    // Worker b's processors fail from then on, and its dead-letter handler panics: the
    // shard is stopped and released.
    let give_up = Arc::new(AtomicBool::new(false));
    let failed_once = Arc::new(AtomicBool::new(false));
    let builder = |id: &str| {
        let (calls, p, dead) = (calls.clone(), processed.clone(), processed.clone());
        let give_up = (id == "b").then(|| give_up.clone());
        let panics = give_up.clone();
        scenarios::worker("metrics-app", &stream, id, fixture, leases.clone(), &log)
            .kinesis(clients.kinesis.clone())
            .max_leases_per_worker(1)
            .heartbeat(kcl::config::Heartbeat::Task)
            .metrics_level(level)
            .metrics_refresh_interval(REFRESH)
            .error_policy(ErrorPolicy::DeadLetter(
                DeadLetterPolicy::new(Destination {
                    dead,
                    panics,
                    failed_once: failed_once.clone(),
                })
                .attempts(1)
                .delays(Duration::from_millis(10), Duration::from_millis(100)),
            ))
            .processor(move || Planted {
                calls: calls.clone(),
                processed: p.clone(),
                give_up: give_up.clone(),
            })
            .build()
    };
    let a: Worker = builder("a")?;
    let b: Worker = builder("b")?;
    let (stop_a, stop_b) = (a.shutdown_handle(), b.shutdown_handle());
    let run_a = tokio::spawn(a.run());
    let run_b = tokio::spawn(b.run());

    scenarios::poll("every record processed", Duration::from_secs(60), || {
        let n = processed.load(Ordering::SeqCst);
        async move { Ok((n >= total).then_some(())) }
    })
    .await?;
    tokio::time::sleep(REFRESH * 3).await;
    let during = scrape();

    let owner_of = |id: &'static str| {
        let leases = leases.clone();
        async move {
            let listed = leases.list().await?;
            Ok(listed
                .leases
                .iter()
                .find(|l| l.owner.as_ref().map(|o| o.as_str()) == Some(id))
                .map(|l| l.shard_id().to_string()))
        }
    };
    let given_up = scenarios::poll("worker b's shard", Duration::from_secs(10), || {
        owner_of("b")
    })
    .await?;
    let kept = scenarios::poll("worker a's shard", Duration::from_secs(10), || {
        owner_of("a")
    })
    .await?;
    give_up.store(true, Ordering::SeqCst);
    // Records for both shards: worker b's next batch stops its shard.
    fixture.put(&stream, scenarios::records(20, 28, 8)).await?;
    let released = |shard: String| {
        let leases = leases.clone();
        async move {
            let listed = leases.list().await?;
            let lease = listed
                .leases
                .iter()
                .find(|l| l.shard_id().as_str() == shard);
            Ok(lease.is_some_and(|l| l.owner.is_none()).then_some(()))
        }
    };
    scenarios::poll(
        "worker b released its shard",
        Duration::from_secs(30),
        || released(given_up.clone()),
    )
    .await?;
    // Scraped as a collector would, every refresh interval: an exporter measures idleness
    // between its renders.
    let until = tokio::time::Instant::now() + wait_after_give_up;
    while tokio::time::Instant::now() < until {
        scrape();
        tokio::time::sleep(REFRESH).await;
    }
    let after_give_up = scrape();
    stop_b.shutdown();
    stop_a.shutdown();
    run_b.await??;
    run_a.await??;
    Ok(SweepRun {
        during,
        after_give_up,
        given_up,
        kept,
    })
}
