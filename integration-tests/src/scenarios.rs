//! The end-to-end scenarios, written once against the seams and run on both the in-memory
//! backends and the real local servers (kinesis-local + moto / dynalite).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use async_trait::async_trait;
use kcl::lease::LeaseStore;
use kcl::retrieval::KinesisApi;
use kcl::shard::{HashKeyRange, Shard};
use kcl::testkit::MemKinesis;
use kcl::{
    Checkpointer, ExtendedSequenceNumber, ProcessorError, RecordBatch, RecordProcessor,
    SequenceNumber, ShardId, Worker, WorkerBuilder,
};
use tokio::time::Instant;

/// A stream backend the scenarios can drive: create, put, split, merge.
#[async_trait]
pub trait StreamFixture: Send + Sync {
    /// The `KinesisApi` the workers read through.
    fn kinesis(&self) -> Arc<dyn KinesisApi>;
    /// Creates a stream and waits until it is usable.
    async fn create_stream(&self, name: &str, shards: u32) -> anyhow::Result<()>;
    /// Puts records (partition key, payload).
    async fn put(&self, stream: &str, records: Vec<(String, Vec<u8>)>) -> anyhow::Result<()>;
    /// Splits a shard at a hash key and waits until the stream is usable.
    async fn split(&self, stream: &str, shard: &ShardId, at: u128) -> anyhow::Result<()>;
    /// Merges two adjacent shards and waits until the stream is usable.
    async fn merge(&self, stream: &str, a: &ShardId, b: &ShardId) -> anyhow::Result<()>;
    /// The stream's wall clock (arrival timestamps are on it).
    fn now(&self) -> std::time::SystemTime {
        std::time::SystemTime::now()
    }
}

/// The in-memory Kinesis as a fixture.
#[derive(Debug, Clone, Default)]
pub struct MemStream(pub MemKinesis);

#[async_trait]
impl StreamFixture for MemStream {
    fn kinesis(&self) -> Arc<dyn KinesisApi> {
        Arc::new(self.0.clone())
    }
    async fn create_stream(&self, name: &str, shards: u32) -> anyhow::Result<()> {
        self.0.create_stream(name, shards as usize);
        Ok(())
    }
    async fn put(&self, stream: &str, records: Vec<(String, Vec<u8>)>) -> anyhow::Result<()> {
        for (k, v) in records {
            self.0.put(stream, &k, v);
        }
        Ok(())
    }
    async fn split(&self, stream: &str, shard: &ShardId, at: u128) -> anyhow::Result<()> {
        self.0.split(stream, shard, at);
        Ok(())
    }
    async fn merge(&self, stream: &str, a: &ShardId, b: &ShardId) -> anyhow::Result<()> {
        self.0.merge(stream, a, b);
        Ok(())
    }
    fn now(&self) -> std::time::SystemTime {
        self.0.now()
    }
}

/// kinesis-local through the real `aws-sdk-kinesis` client.
#[derive(Debug)]
pub struct LocalKinesis {
    /// The server (stopped on drop).
    pub server: crate::ServerProcess,
    /// An SDK client pointing at it.
    pub client: aws_sdk_kinesis::Client,
}

impl LocalKinesis {
    /// Starts a kinesis-local.
    pub async fn start() -> anyhow::Result<Self> {
        let server = crate::kinesis_server::start_kinesis_local().await?;
        let client = crate::kinesis_server::kinesis_client(&server).await;
        Ok(Self { server, client })
    }
}

#[async_trait]
impl StreamFixture for LocalKinesis {
    fn kinesis(&self) -> Arc<dyn KinesisApi> {
        Arc::new(kcl::retrieval::aws::AwsKinesis::new(self.client.clone()))
    }
    async fn create_stream(&self, name: &str, shards: u32) -> anyhow::Result<()> {
        crate::kinesis_server::create_stream(&self.client, name, shards).await
    }
    async fn put(&self, stream: &str, records: Vec<(String, Vec<u8>)>) -> anyhow::Result<()> {
        // kinesis-local is slow (~0.7 s per PutRecords), so calls go in parallel; but records
        // of one key must reach the stream in order: each key stays in one sequential lane.
        const LANES: usize = 4;
        let mut lanes: Vec<Vec<(String, Vec<u8>)>> = vec![Vec::new(); LANES];
        for r in records {
            let lane = (kcl::shard::hash_key(&r.0) % LANES as u128) as usize;
            lanes[lane].push(r);
        }
        let puts = lanes.into_iter().filter(|l| !l.is_empty()).map(|lane| {
            crate::kinesis_server::put_records_with_parallelism(&self.client, stream, lane, 1)
        });
        for result in futures::future::join_all(puts).await {
            result?;
        }
        Ok(())
    }
    async fn split(&self, stream: &str, shard: &ShardId, at: u128) -> anyhow::Result<()> {
        crate::kinesis_server::split_shard(&self.client, stream, shard.as_str(), at).await
    }
    async fn merge(&self, stream: &str, a: &ShardId, b: &ShardId) -> anyhow::Result<()> {
        crate::kinesis_server::merge_shards(&self.client, stream, a.as_str(), b.as_str()).await
    }
}

/// One delivery of one record to a processor.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The worker whose processor got it.
    pub worker: String,
    /// The shard.
    pub shard: ShardId,
    /// The record's sequence number.
    pub seq: SequenceNumber,
    /// Partition key number (payload `key/n`).
    pub key: u32,
    /// The record's index among its key's records.
    pub n: u32,
}

/// Every delivery of a run, in the order processors saw them.
#[derive(Debug, Clone, Default)]
pub struct DeliveryLog(Arc<Mutex<Vec<Delivery>>>);

impl DeliveryLog {
    /// A copy of the log.
    pub fn snapshot(&self) -> Vec<Delivery> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Distinct (key, n) records delivered.
    pub fn distinct(&self) -> usize {
        self.snapshot()
            .iter()
            .map(|d| (d.key, d.n))
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Waits until `n` distinct records were delivered.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.distinct();
            if got >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {got} of {n} records delivered after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A processor that logs every record and checkpoints after every batch.
#[derive(Debug)]
pub struct Recorder {
    worker: String,
    log: DeliveryLog,
}

#[async_trait]
impl RecordProcessor for Recorder {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        {
            let mut log = self
                .log
                .0
                .lock()
                .map_err(|_| ProcessorError::fatal("log poisoned"))?;
            for r in batch {
                let text = std::str::from_utf8(&r.data).map_err(ProcessorError::fatal)?;
                let (key, n) = text
                    .split_once('/')
                    .ok_or_else(|| ProcessorError::fatal(format!("bad payload {text:?}")))?;
                log.push(Delivery {
                    worker: self.worker.clone(),
                    shard: batch.shard_id.clone(),
                    seq: r.sequence_number.clone(),
                    key: key.parse().map_err(ProcessorError::fatal)?,
                    n: n.parse().map_err(ProcessorError::fatal)?,
                });
            }
        }
        cp.checkpoint().await.map_err(ProcessorError::retryable)
    }
}

impl Recorder {
    /// A processor factory for `worker` logging into `log`.
    pub fn factory(
        worker: &str,
        log: &DeliveryLog,
    ) -> impl Fn() -> Recorder + Send + Sync + 'static {
        let (worker, log) = (worker.to_owned(), log.clone());
        move || Recorder {
            worker: worker.clone(),
            log: log.clone(),
        }
    }
}

/// Records `from..to` of the scenario's data set: `keys` partition keys round-robin, payload
/// `key/n`.
pub fn records(from: u32, to: u32, keys: u32) -> Vec<(String, Vec<u8>)> {
    (from..to)
        .map(|i| {
            let key = i % keys;
            (
                format!("key-{key}"),
                format!("{key}/{}", i / keys).into_bytes(),
            )
        })
        .collect()
}

/// A worker builder with the scenario's timings (fast failover, fast polling).
pub fn worker(
    app: &str,
    stream: &str,
    id: &str,
    fixture: &dyn StreamFixture,
    leases: Arc<dyn LeaseStore>,
    log: &DeliveryLog,
) -> WorkerBuilder {
    let log = log.clone();
    let worker_id = id.to_owned();
    let polling = {
        let mut p = kcl::PollingConfig::default();
        p.min_interval = Duration::from_millis(50);
        p.idle_interval = Duration::from_millis(100);
        p
    };
    Worker::builder()
        .application_name(app)
        .stream(stream)
        .worker_id(id)
        .kinesis(fixture.kinesis())
        .lease_store(leases)
        .lease_duration(Duration::from_secs(6))
        .taker_interval(Duration::from_millis(300))
        .parent_poll_interval(Duration::from_millis(100))
        .shard_sync_interval(Duration::from_secs(2))
        .polling(polling)
        .processor(Recorder::factory(&worker_id, &log))
}

/// Per shard, delivered sequence numbers strictly increase over the whole run: no record
/// delivered twice, no two processors of one shard overlapping.
pub fn check_no_duplicates_or_overlap(log: &[Delivery]) -> anyhow::Result<()> {
    let mut last: BTreeMap<&ShardId, (&SequenceNumber, &str)> = BTreeMap::new();
    for d in log {
        if let Some((prev, who)) = last.get(&d.shard) {
            ensure!(
                *prev < &d.seq,
                "shard {}: {} delivered {} after {} delivered {}",
                d.shard,
                d.worker,
                d.seq,
                who,
                prev
            );
        }
        last.insert(&d.shard, (&d.seq, &d.worker));
    }
    Ok(())
}

/// Per key, the first delivery of record n comes after the first delivery of record n-1.
pub fn check_per_key_order(log: &[Delivery]) -> anyhow::Result<()> {
    let mut first: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    for (i, d) in log.iter().enumerate() {
        first.entry((d.key, d.n)).or_insert(i);
    }
    for (&(key, n), &i) in &first {
        if n > 0 {
            let prev = first
                .get(&(key, n - 1))
                .with_context(|| format!("key {key}: record {} never delivered", n - 1))?;
            ensure!(
                *prev < i,
                "key {key}: record {n} delivered before record {}",
                n - 1
            );
        }
    }
    Ok(())
}

/// Every record `0..n` was delivered.
pub fn check_all_delivered(log: &[Delivery], n: u32, keys: u32) -> anyhow::Result<()> {
    let got: BTreeSet<(u32, u32)> = log.iter().map(|d| (d.key, d.n)).collect();
    let missing: Vec<u32> = (0..n)
        .filter(|i| !got.contains(&(i % keys, i / keys)))
        .take(5)
        .collect();
    ensure!(
        missing.is_empty(),
        "records never delivered, e.g. {missing:?}"
    );
    Ok(())
}

/// Scenario: one worker drains 4 shards × 2 500 records; a restart resumes after the
/// checkpoint with no checkpointed record delivered again.
pub async fn drain_and_resume(
    fixture: &dyn StreamFixture,
    leases: Arc<dyn LeaseStore>,
) -> anyhow::Result<()> {
    const KEYS: u32 = 64;
    const HALF: u32 = 5_000;
    let stream = crate::unique_name("drain");
    fixture.create_stream(&stream, 4).await?;
    fixture.put(&stream, records(0, HALF, KEYS)).await?;
    let log = DeliveryLog::default();

    let w = worker("drain-app", &stream, "w1", fixture, leases.clone(), &log).build()?;
    let stop = w.shutdown_handle();
    let run = tokio::spawn(w.run());
    log.wait_for(HALF as usize, Duration::from_secs(120))
        .await?;
    stop.shutdown();
    run.await??;
    let table = leases.list().await?;
    ensure!(
        table.leases.len() == 4,
        "expected 4 leases, got {}",
        table.leases.len()
    );
    ensure!(
        table.leases.iter().all(|l| l.owner.is_none()
            && matches!(l.checkpoint, ExtendedSequenceNumber::Sequence { .. })),
        "after a graceful stop every lease is released and checkpointed: {:?}",
        table.leases
    );

    fixture.put(&stream, records(HALF, 2 * HALF, KEYS)).await?;
    let w = worker(
        "drain-app",
        &stream,
        "w1-restarted",
        fixture,
        leases.clone(),
        &log,
    )
    .build()?;
    let stop = w.shutdown_handle();
    let run = tokio::spawn(w.run());
    log.wait_for(2 * HALF as usize, Duration::from_secs(120))
        .await?;
    stop.shutdown();
    run.await??;

    let log = log.snapshot();
    check_all_delivered(&log, 2 * HALF, KEYS)?;
    check_no_duplicates_or_overlap(&log)?;
    ensure!(
        log.len() == 2 * HALF as usize,
        "{} deliveries for {} records",
        log.len(),
        2 * HALF
    );
    Ok(())
}

/// Scenario: split and merge while consuming. Every record delivered, per-key order held, no
/// child record before its parents ended, parents' leases at SHARD_END with `childShardIds`.
pub async fn split_and_merge(
    fixture: &dyn StreamFixture,
    leases: Arc<dyn LeaseStore>,
) -> anyhow::Result<()> {
    const KEYS: u32 = 32;
    const WAVE: u32 = 1_500;
    let stream = crate::unique_name("reshard");
    fixture.create_stream(&stream, 4).await?;
    let log = DeliveryLog::default();
    let w = worker("reshard-app", &stream, "w1", fixture, leases.clone(), &log).build()?;
    let stop = w.shutdown_handle();
    let run = tokio::spawn(w.run());

    fixture.put(&stream, records(0, WAVE, KEYS)).await?;
    let shards = sorted_shards(fixture, &stream).await?;
    let s0 = &shards[0];
    fixture
        .split(&stream, &s0.id, midpoint(s0.hash_range))
        .await?;
    fixture.put(&stream, records(WAVE, 2 * WAVE, KEYS)).await?;
    fixture.merge(&stream, &shards[2].id, &shards[3].id).await?;
    fixture
        .put(&stream, records(2 * WAVE, 3 * WAVE, KEYS))
        .await?;
    log.wait_for(3 * WAVE as usize, Duration::from_secs(180))
        .await?;
    stop.shutdown();
    run.await??;

    let all = sorted_shards(fixture, &stream).await?;
    let log = log.snapshot();
    check_all_delivered(&log, 3 * WAVE, KEYS)?;
    check_per_key_order(&log)?;
    check_no_duplicates_or_overlap(&log)?;
    let table = leases.list().await?;
    for child in all.iter().filter(|s| s.parent.is_some()) {
        let first_child = log.iter().position(|d| d.shard == child.id);
        for parent in child.parents() {
            let last_parent = log.iter().rposition(|d| &d.shard == parent);
            if let (Some(c), Some(p)) = (first_child, last_parent) {
                ensure!(
                    p < c,
                    "{} delivered a record before its parent {parent} ended",
                    child.id
                );
            }
            let lease = table
                .leases
                .iter()
                .find(|l| &l.shard_id() == parent)
                .with_context(|| format!("no lease for parent {parent}"))?;
            ensure!(
                lease.is_finished(),
                "parent {parent} is at {}",
                lease.checkpoint
            );
            ensure!(
                lease.child_shard_ids.contains(&child.id),
                "parent {parent} lease lacks child {} in {:?}",
                child.id,
                lease.child_shard_ids
            );
        }
    }
    Ok(())
}

/// Scenario: two workers on one stream: every shard processed, never by both at once; one
/// stops gracefully and the other takes its shards without waiting for expiry.
pub async fn two_workers_graceful_handoff(
    fixture: &dyn StreamFixture,
    leases: Arc<dyn LeaseStore>,
) -> anyhow::Result<()> {
    const KEYS: u32 = 64;
    const WAVE: u32 = 2_000;
    let stream = crate::unique_name("fleet");
    fixture.create_stream(&stream, 4).await?;
    fixture.put(&stream, records(0, WAVE, KEYS)).await?;
    let log = DeliveryLog::default();
    let a = worker(
        "fleet-app",
        &stream,
        "worker-a",
        fixture,
        leases.clone(),
        &log,
    )
    .build()?;
    let b = worker(
        "fleet-app",
        &stream,
        "worker-b",
        fixture,
        leases.clone(),
        &log,
    )
    .build()?;
    let lease_duration = a.config().lease_duration;
    let (stop_a, stop_b) = (a.shutdown_handle(), b.shutdown_handle());
    let run_a = tokio::spawn(a.run());
    log.wait_for(1, Duration::from_secs(60)).await?;
    let run_b = tokio::spawn(b.run());

    // Balanced: two leases each (B gets its two by graceful handoff from A).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let owners = owners(&*leases).await?;
        if owners.get("worker-a") == Some(&2) && owners.get("worker-b") == Some(&2) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "fleet never balanced: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fixture.put(&stream, records(WAVE, 2 * WAVE, KEYS)).await?;
    log.wait_for(2 * WAVE as usize, Duration::from_secs(120))
        .await?;

    // A stops gracefully: B holds all four well before A's leases could have expired.
    let stopped = Instant::now();
    stop_a.shutdown();
    run_a.await??;
    loop {
        let owners = owners(&*leases).await?;
        if owners.get("worker-b") == Some(&4) {
            break;
        }
        ensure!(
            stopped.elapsed() < lease_duration,
            "B did not take A's released leases within the lease duration: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fixture
        .put(&stream, records(2 * WAVE, 3 * WAVE, KEYS))
        .await?;
    log.wait_for(3 * WAVE as usize, Duration::from_secs(120))
        .await?;
    stop_b.shutdown();
    run_b.await??;

    let log = log.snapshot();
    check_all_delivered(&log, 3 * WAVE, KEYS)?;
    check_no_duplicates_or_overlap(&log)?;
    let workers: BTreeSet<&str> = log.iter().map(|d| d.worker.as_str()).collect();
    ensure!(
        workers.len() == 2,
        "both workers processed records: {workers:?}"
    );
    Ok(())
}

async fn owners(leases: &dyn LeaseStore) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut owners = BTreeMap::new();
    for l in leases.list().await?.leases {
        if let Some(o) = l.owner {
            *owners.entry(o.to_string()).or_insert(0) += 1;
        }
    }
    Ok(owners)
}

async fn sorted_shards(fixture: &dyn StreamFixture, stream: &str) -> anyhow::Result<Vec<Shard>> {
    let mut shards = fixture.kinesis().list_shards(stream).await?;
    shards.sort_by_key(|s| s.hash_range.start());
    shards.sort_by_key(|s| s.is_closed());
    shards.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(shards)
}

fn midpoint(r: HashKeyRange) -> u128 {
    r.start() + (r.end() - r.start()) / 2 + 1
}

/// Scenario: AT_TIMESTAMP starts every shard at the first record at or after the time.
pub async fn at_timestamp(
    fixture: &dyn StreamFixture,
    leases: Arc<dyn LeaseStore>,
) -> anyhow::Result<()> {
    const KEYS: u32 = 16;
    let stream = crate::unique_name("at-ts");
    fixture.create_stream(&stream, 2).await?;
    fixture.put(&stream, records(0, 400, KEYS)).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let start = fixture.now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fixture.put(&stream, records(400, 800, KEYS)).await?;
    let log = DeliveryLog::default();
    let w = worker("at-ts-app", &stream, "w1", fixture, leases, &log)
        .start_at(start)
        .build()?;
    let stop = w.shutdown_handle();
    let run = tokio::spawn(w.run());
    log.wait_for(400, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.shutdown();
    run.await??;
    let log = log.snapshot();
    ensure!(
        log.len() == 400,
        "{} deliveries, expected the 400 records after the timestamp",
        log.len()
    );
    ensure!(
        log.iter().all(|d| d.key + d.n * KEYS >= 400),
        "a record from before the timestamp was delivered"
    );
    Ok(())
}
