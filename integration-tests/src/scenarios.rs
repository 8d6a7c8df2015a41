//! The end-to-end scenarios, written once against the seams and run on both the in-memory
//! backends and the real local servers (kinesis-local + moto / dynalite).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use async_trait::async_trait;
use kcl::lease::{LeaseCounter, LeaseKey, LeaseStore};
use kcl::retrieval::{
    GetRecordsOutput, IteratorPosition, KinesisApi, KinesisApiError, ShardIterator,
    SubscriptionStream,
};
use kcl::shard::{HashKeyRange, Shard};
use kcl::testkit::MemKinesis;
use kcl::{
    Checkpointer, ExtendedSequenceNumber, Lease, ProcessorError, RecordBatch, RecordProcessor,
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
    /// Scales to `target` open shards (`UpdateShardCount`, uniform scaling) and waits until the
    /// stream is usable.
    async fn update_shard_count(&self, stream: &str, target: u32) -> anyhow::Result<()>;
    /// Puts KPL aggregates, in order: each inner list of user records (partition key, payload)
    /// becomes one Kinesis record, put under the partition key of its first user record.
    async fn put_aggregates(
        &self,
        stream: &str,
        aggregates: Vec<Vec<(String, Vec<u8>)>>,
    ) -> anyhow::Result<()>;
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
    async fn update_shard_count(&self, stream: &str, target: u32) -> anyhow::Result<()> {
        self.0.update_shard_count(stream, target as usize);
        Ok(())
    }
    async fn put_aggregates(
        &self,
        stream: &str,
        aggregates: Vec<Vec<(String, Vec<u8>)>>,
    ) -> anyhow::Result<()> {
        for (key, data) in aggregated(aggregates)? {
            self.0.put(stream, &key, data);
        }
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
    async fn update_shard_count(&self, stream: &str, target: u32) -> anyhow::Result<()> {
        crate::kinesis_server::update_shard_count(&self.client, stream, target).await
    }
    async fn put_aggregates(
        &self,
        stream: &str,
        aggregates: Vec<Vec<(String, Vec<u8>)>>,
    ) -> anyhow::Result<()> {
        let records = aggregated(aggregates)?
            .into_iter()
            .map(|(k, v)| (k, v.to_vec()))
            .collect();
        // One call at a time: the aggregates reach the stream in order.
        crate::kinesis_server::put_records_with_parallelism(&self.client, stream, records, 1)
            .await?;
        Ok(())
    }
}

/// Each list of user records as one KPL aggregate, keyed by its first user record's key.
fn aggregated(
    aggregates: Vec<Vec<(String, Vec<u8>)>>,
) -> anyhow::Result<Vec<(String, bytes::Bytes)>> {
    aggregates
        .into_iter()
        .map(|users| {
            let key = users
                .first()
                .map(|(k, _)| k.clone())
                .context("an empty aggregate")?;
            let users: Vec<kcl::producer::UserRecord> = users
                .into_iter()
                .map(|(k, v)| kcl::producer::UserRecord::new(k, v))
                .collect();
            Ok((key, kcl::producer::aggregate(&users)))
        })
        .collect()
}

/// A `KinesisApi` that notes every shard iterator and fan-out subscription it hands out (the
/// moment a `LATEST` position is fixed), and otherwise passes every call through.
#[derive(Debug, Clone)]
pub struct ObservedKinesis {
    inner: Arc<dyn KinesisApi>,
    positions: Arc<Mutex<Vec<(ShardId, IteratorPosition)>>>,
}

impl ObservedKinesis {
    /// Observes `inner`.
    pub fn new(inner: Arc<dyn KinesisApi>) -> Self {
        Self {
            inner,
            positions: Arc::default(),
        }
    }

    /// Every (shard, position) an iterator or subscription was obtained for, in order.
    pub fn positions(&self) -> Vec<(ShardId, IteratorPosition)> {
        self.positions.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Waits until an iterator or subscription was obtained for each of `shards`.
    pub async fn wait_for_reads(
        &self,
        shards: &[ShardId],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen: BTreeSet<ShardId> = self.positions().into_iter().map(|(s, _)| s).collect();
            if shards.iter().all(|s| seen.contains(s)) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "no read started on some of {shards:?} after {timeout:?} (started: {seen:?})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn note(&self, shard: &ShardId, position: &IteratorPosition) {
        if let Ok(mut p) = self.positions.lock() {
            p.push((shard.clone(), position.clone()));
        }
    }
}

#[async_trait]
impl KinesisApi for ObservedKinesis {
    fn now(&self) -> std::time::SystemTime {
        self.inner.now()
    }
    async fn list_shards(&self, stream: &str) -> Result<Vec<Shard>, KinesisApiError> {
        self.inner.list_shards(stream).await
    }
    async fn get_shard_iterator(
        &self,
        stream: &str,
        shard: &ShardId,
        position: &IteratorPosition,
    ) -> Result<ShardIterator, KinesisApiError> {
        let it = self
            .inner
            .get_shard_iterator(stream, shard, position)
            .await?;
        self.note(shard, position);
        Ok(it)
    }
    async fn get_records(
        &self,
        iterator: &ShardIterator,
        limit: u32,
    ) -> Result<GetRecordsOutput, KinesisApiError> {
        self.inner.get_records(iterator, limit).await
    }
    async fn describe_stream(
        &self,
        stream: &str,
    ) -> Result<kcl::retrieval::StreamSummary, KinesisApiError> {
        self.inner.describe_stream(stream).await
    }
    async fn register_stream_consumer(
        &self,
        stream: &str,
        consumer_name: &str,
    ) -> Result<String, KinesisApiError> {
        self.inner
            .register_stream_consumer(stream, consumer_name)
            .await
    }
    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard: &ShardId,
        position: &IteratorPosition,
    ) -> Result<SubscriptionStream, KinesisApiError> {
        let sub = self
            .inner
            .subscribe_to_shard(consumer_arn, shard, position)
            .await?;
        self.note(shard, position);
        Ok(sub)
    }
}

/// One delivery of one record to a processor.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The worker whose processor got it.
    pub worker: String,
    /// The stream (its name, as the processor's `ShardContext` gave it).
    pub stream: String,
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

    /// Appends deliveries (from a processor).
    ///
    /// # Errors
    /// A fatal processor error if the log's lock was poisoned.
    pub fn extend(
        &self,
        deliveries: impl IntoIterator<Item = Delivery>,
    ) -> Result<(), ProcessorError> {
        self.0
            .lock()
            .map_err(|_| ProcessorError::fatal("log poisoned"))?
            .extend(deliveries);
        Ok(())
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
    stream: String,
    log: DeliveryLog,
}

#[async_trait]
impl RecordProcessor for Recorder {
    async fn initialize(&mut self, shard: &kcl::ShardContext) -> Result<(), ProcessorError> {
        self.stream = shard.stream.clone();
        Ok(())
    }

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
                    stream: self.stream.clone(),
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
            stream: String::new(),
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
    timed_worker(app, id, fixture, leases, log).stream(stream)
}

/// [`worker`] without its stream (for multi-stream workers).
pub fn timed_worker(
    app: &str,
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
    let before = owned_by(&*leases, "w1").await?;
    ensure!(before.len() == 4, "w1 holds {} of 4 leases", before.len());
    stop.shutdown();
    run.await??;
    check_released(&*leases, "w1", &before, None).await?;
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
    check_parents_first(&log, &all)?;
    check_parent_leases_finished(&leases.list().await?.leases, &all)?;
    Ok(())
}

/// Children after parents: no child shard's record was delivered before the last delivery of
/// each of its parents (`shards` as listed after the reshards, with their lineage).
pub fn check_parents_first(log: &[Delivery], shards: &[Shard]) -> anyhow::Result<()> {
    for child in shards.iter().filter(|s| s.parent.is_some()) {
        let Some(c) = log.iter().position(|d| d.shard == child.id) else {
            continue;
        };
        for parent in child.parents() {
            if let Some(p) = log.iter().rposition(|d| &d.shard == parent) {
                ensure!(
                    p < c,
                    "{} delivered a record (delivery #{c}) before its parent {parent} ended \
                     (its last delivery is #{p})",
                    child.id
                );
            }
        }
    }
    Ok(())
}

/// Every parent shard's lease is finished (`SHARD_END`) and names its children.
pub fn check_parent_leases_finished(leases: &[Lease], shards: &[Shard]) -> anyhow::Result<()> {
    for child in shards.iter().filter(|s| s.parent.is_some()) {
        for parent in child.parents() {
            let lease = leases
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

    // A stops gracefully: right after its run() returns, the table shows its leases released
    // (or already taken by B), then B holds all four.
    let before = owned_by(&*leases, "worker-a").await?;
    ensure!(!before.is_empty(), "A holds no lease before it stops");
    stop_a.shutdown();
    run_a.await??;
    check_released(&*leases, "worker-a", &before, Some("worker-b")).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let owners = owners(&*leases).await?;
        if owners.get("worker-b") == Some(&4) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "B did not take A's released leases: {owners:?}"
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

/// Three workers share six shards; an operator drains one ([`kcl::lease::drain`]) while it keeps
/// running: within a few taker rounds it holds nothing and its peers hold everything, it takes
/// nothing back while it stays up, and no record is delivered twice (each lease moved by a
/// graceful handoff). Cancelling the drain lets it take leases again.
pub async fn drain_a_worker(
    fixture: &dyn StreamFixture,
    leases: Arc<dyn LeaseStore>,
) -> anyhow::Result<()> {
    use kcl::lease::drain;
    const KEYS: u32 = 64;
    const WAVE: u32 = 1_500;
    let stream = crate::unique_name("drain");
    fixture.create_stream(&stream, 6).await?;
    fixture.put(&stream, records(0, WAVE, KEYS)).await?;
    let log = DeliveryLog::default();
    let mut stops = Vec::new();
    let mut runs = Vec::new();
    for id in ["worker-a", "worker-b", "worker-c"] {
        let w = worker("drain-app", &stream, id, fixture, leases.clone(), &log).build()?;
        stops.push(w.shutdown_handle());
        runs.push(tokio::spawn(w.run()));
    }
    log.wait_for(WAVE as usize, Duration::from_secs(60)).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while owned_by(&*leases, "worker-b").await?.is_empty() {
        ensure!(Instant::now() < deadline, "worker-b never got a lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let b = kcl::WorkerId::new("worker-b");
    let item = drain::start_drain(&*leases, &b, Duration::from_secs(10), false).await?;
    drain::wait_drained(
        &*leases,
        &b,
        item.incarnation,
        Duration::from_millis(100),
        Duration::from_secs(60),
        |_| {},
    )
    .await?;
    let drained_at = log.snapshot().len();
    // Still running, still draining: it takes nothing back over several taker rounds.
    fixture.put(&stream, records(WAVE, 2 * WAVE, KEYS)).await?;
    log.wait_for(2 * WAVE as usize, Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = drain::drain_status(&leases.list().await?.leases, &b);
    ensure!(
        after.is_done(),
        "worker-b took leases while draining: {after:?}"
    );
    let owners = owners(&*leases).await?;
    ensure!(
        owners.get("worker-a").copied().unwrap_or(0) + owners.get("worker-c").copied().unwrap_or(0)
            == 6,
        "the peers do not hold every lease: {owners:?}"
    );
    let by_b: Vec<_> = log.snapshot()[drained_at..]
        .iter()
        .filter(|d| d.worker == "worker-b")
        .map(|d| format!("{} {}", d.shard, d.seq.as_str()))
        .collect();
    ensure!(
        by_b.is_empty(),
        "worker-b processed records after it was drained: {by_b:?}"
    );

    // Cancelled: it takes its share again.
    drain::cancel_drain(&*leases, &b).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while owned_by(&*leases, "worker-b").await?.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "worker-b took nothing after the drain was cancelled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fixture
        .put(&stream, records(2 * WAVE, 3 * WAVE, KEYS))
        .await?;
    log.wait_for(3 * WAVE as usize, Duration::from_secs(60))
        .await?;
    for stop in &stops {
        stop.shutdown();
    }
    for run in runs {
        run.await??;
    }
    let log = log.snapshot();
    check_all_delivered(&log, 3 * WAVE, KEYS)?;
    check_no_duplicates_or_overlap(&log)?;
    Ok(())
}

/// The leases `worker` owns now, with their counters (not those only being handed to it: the
/// old owner still processes them).
pub async fn owned_by(
    leases: &dyn LeaseStore,
    worker: &str,
) -> anyhow::Result<BTreeMap<LeaseKey, LeaseCounter>> {
    Ok(leases
        .list()
        .await?
        .leases
        .into_iter()
        .filter(|l| {
            l.owner.as_ref().is_some_and(|o| o.as_str() == worker) && l.checkpoint_owner.is_none()
        })
        .map(|l| (l.key, l.counter))
        .collect())
}

/// Called right after `worker`'s `run()` returned from a graceful shutdown: each lease it
/// owned before (`before`, from [`owned_by`]) was released in the table: its owner is cleared
/// (or, if `taken_by` is given, is that worker, which took it after the release) and its
/// counter moved past its value in `before`. A lease abandoned instead would still name
/// `worker` as its owner: nobody may take it before it expires, `lease_duration` after its
/// last renewal, and the worker renews its leases until it releases them. And no lease of the
/// table names `worker` as its owner any more: a handoff it asked for and had not received
/// was withdrawn (the lease is back with its old owner), one completed to it and not taken yet
/// was released.
pub async fn check_released(
    leases: &dyn LeaseStore,
    worker: &str,
    before: &BTreeMap<LeaseKey, LeaseCounter>,
    taken_by: Option<&str>,
) -> anyhow::Result<()> {
    let table = leases.list().await?;
    let still: Vec<String> = table
        .leases
        .iter()
        .filter(|l| l.owner.as_ref().is_some_and(|o| o.as_str() == worker))
        .map(|l| {
            format!(
                "{} (checkpointOwner {:?})",
                l.key.as_str(),
                l.checkpoint_owner
            )
        })
        .collect();
    ensure!(
        still.is_empty(),
        "{worker} stopped gracefully but leases still name it as owner: {still:?}"
    );
    for (key, counter) in before {
        let lease = table
            .leases
            .iter()
            .find(|l| &l.key == key)
            .with_context(|| format!("lease {key:?} vanished from the table"))?;
        let owner = lease.owner.as_ref().map(|o| o.as_str());
        ensure!(
            owner.is_none() || (owner.is_some() && owner == taken_by),
            "{worker} stopped gracefully but lease {} is owned by {owner:?} (expected released{})",
            key.as_str(),
            taken_by
                .map(|t| format!(" or taken by {t}"))
                .unwrap_or_default()
        );
        ensure!(
            lease.counter > *counter,
            "lease {}: counter {} after {worker}'s graceful stop, {counter} before: not released",
            key.as_str(),
            lease.counter
        );
    }
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

/// Waits until `check` returns `Some`, polling every 50 ms for up to `timeout`; `what` names
/// the condition in the error.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        ensure!(Instant::now() < deadline, "{what}: not after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the lease of every shard that received a delivery in `log` is checkpointed at
/// that shard's last delivered record; returns the table then.
async fn wait_checkpointed_at_last_delivery(
    leases: &dyn LeaseStore,
    log: &[Delivery],
    timeout: Duration,
) -> anyhow::Result<Vec<Lease>> {
    let mut last: BTreeMap<ShardId, SequenceNumber> = BTreeMap::new();
    for d in log {
        let e = last.entry(d.shard.clone()).or_insert_with(|| d.seq.clone());
        if *e < d.seq {
            *e = d.seq.clone();
        }
    }
    poll(
        "every lease checkpointed at its shard's last delivered record",
        timeout,
        || async {
            let table = leases.list().await?.leases;
            let done = last.iter().all(|(shard, seq)| {
                table.iter().any(|l| {
                    &l.shard_id() == shard && l.checkpoint.sequence().is_some_and(|s| s == seq)
                })
            });
            Ok(done.then_some(table))
        },
    )
    .await
    .with_context(|| format!("last deliveries per shard: {last:?}"))
}

/// Scenario: `LATEST` through the worker. Records put before the worker's first read of each
/// shard are never delivered; every record put after is, once.
pub async fn latest_skips_earlier_records(
    fixture: &dyn StreamFixture,
    leases: Arc<dyn LeaseStore>,
) -> anyhow::Result<()> {
    const KEYS: u32 = 16;
    const WAVE: u32 = 200;
    let stream = crate::unique_name("latest");
    fixture.create_stream(&stream, 2).await?;
    fixture.put(&stream, records(0, WAVE, KEYS)).await?;
    let log = DeliveryLog::default();
    let observed = ObservedKinesis::new(fixture.kinesis());
    let w = worker("latest-app", &stream, "w1", fixture, leases.clone(), &log)
        .kinesis(Arc::new(observed.clone()))
        .initial_position(kcl::InitialPosition::Latest)
        .build()?;
    let stop = w.shutdown_handle();
    let run = tokio::spawn(w.run());
    let shards: Vec<ShardId> = sorted_shards(fixture, &stream)
        .await?
        .into_iter()
        .map(|s| s.id)
        .collect();
    observed
        .wait_for_reads(&shards, Duration::from_secs(60))
        .await?;
    ensure!(
        observed
            .positions()
            .iter()
            .all(|(_, p)| *p == IteratorPosition::Latest),
        "a shard was read from elsewhere than LATEST: {:?}",
        observed.positions()
    );
    fixture.put(&stream, records(WAVE, 2 * WAVE, KEYS)).await?;
    log.wait_for(WAVE as usize, Duration::from_secs(60)).await?;
    // Per shard, records are delivered in order: an earlier record would have come first.
    let table =
        wait_checkpointed_at_last_delivery(&*leases, &log.snapshot(), Duration::from_secs(30))
            .await?;
    stop.shutdown();
    run.await??;
    let log = log.snapshot();
    let early: Vec<(u32, u32)> = log
        .iter()
        .filter(|d| d.key + d.n * KEYS < WAVE)
        .map(|d| (d.key, d.n))
        .take(5)
        .collect();
    ensure!(
        early.is_empty(),
        "records put before the first read were delivered, e.g. (key, n) {early:?}"
    );
    let got: BTreeSet<(u32, u32)> = log.iter().map(|d| (d.key, d.n)).collect();
    let missing: Vec<u32> = (WAVE..2 * WAVE)
        .filter(|i| !got.contains(&(i % KEYS, i / KEYS)))
        .take(5)
        .collect();
    ensure!(
        missing.is_empty(),
        "records put after the first read never delivered, e.g. {missing:?}"
    );
    check_no_duplicates_or_overlap(&log)?;
    ensure!(
        log.len() == WAVE as usize,
        "{} deliveries for {WAVE} records",
        log.len()
    );
    ensure!(
        table.iter().all(|l| l.checkpoint.sequence().is_some()),
        "a lease is not checkpointed at a record: {table:?}"
    );
    Ok(())
}

/// Scenario: enhanced fan-out through the worker (`.fan_out(name)`): records put before and
/// while it runs all arrive, each lease is checkpointed at its shard's last record, and a
/// restarted worker delivers only what came after.
pub async fn fan_out_checkpoints(
    fixture: &dyn StreamFixture,
    leases: Arc<dyn LeaseStore>,
) -> anyhow::Result<()> {
    const KEYS: u32 = 16;
    const WAVE: u32 = 150;
    let stream = crate::unique_name("efo");
    fixture.create_stream(&stream, 2).await?;
    fixture.put(&stream, records(0, WAVE, KEYS)).await?;
    let log = DeliveryLog::default();
    let observed = ObservedKinesis::new(fixture.kinesis());
    let w = worker("efo-app", &stream, "w1", fixture, leases.clone(), &log)
        .kinesis(Arc::new(observed.clone()))
        .fan_out("efo-app-consumer")
        .build()?;
    let stop = w.shutdown_handle();
    let run = tokio::spawn(w.run());
    fixture.put(&stream, records(WAVE, 2 * WAVE, KEYS)).await?;
    log.wait_for(2 * WAVE as usize, Duration::from_secs(90))
        .await?;
    let table =
        wait_checkpointed_at_last_delivery(&*leases, &log.snapshot(), Duration::from_secs(30))
            .await?;
    ensure!(table.len() == 2, "{} leases for 2 shards", table.len());
    stop.shutdown();
    run.await??;
    ensure!(
        !observed.positions().is_empty(),
        "the worker never subscribed"
    );

    // A restart resumes after the checkpoints, through a new subscription.
    fixture
        .put(&stream, records(2 * WAVE, 3 * WAVE, KEYS))
        .await?;
    let w = worker("efo-app", &stream, "w2", fixture, leases.clone(), &log)
        .fan_out("efo-app-consumer")
        .build()?;
    let stop = w.shutdown_handle();
    let run = tokio::spawn(w.run());
    log.wait_for(3 * WAVE as usize, Duration::from_secs(90))
        .await?;
    wait_checkpointed_at_last_delivery(&*leases, &log.snapshot(), Duration::from_secs(30)).await?;
    stop.shutdown();
    run.await??;
    let log = log.snapshot();
    check_all_delivered(&log, 3 * WAVE, KEYS)?;
    check_per_key_order(&log)?;
    check_no_duplicates_or_overlap(&log)?;
    ensure!(
        log.len() == 3 * WAVE as usize,
        "{} deliveries for {} records",
        log.len(),
        3 * WAVE
    );
    Ok(())
}

/// Scenario: KPL aggregates through the worker. 10 aggregates of 10 user records on one shard
/// are delivered as 100 user records (sub-sequence numbers 0..9 under each aggregate's sequence
/// number); a processor checkpoints the 35th (inside the 4th aggregate, sub-record 4) and
/// ignores the rest; a restarted worker then delivers exactly records 35..99, once each.
pub async fn kpl_resume_inside_an_aggregate(
    fixture: &dyn StreamFixture,
    leases: Arc<dyn LeaseStore>,
) -> anyhow::Result<()> {
    const KEYS: u32 = 7;
    const PER_AGGREGATE: u32 = 10;
    const AGGREGATES: u32 = 10;
    const CHECKPOINT_AT: usize = 35;
    let total = PER_AGGREGATE * AGGREGATES;
    let stream = crate::unique_name("kpl");
    fixture.create_stream(&stream, 1).await?;
    let all = records(0, total, KEYS);
    fixture
        .put_aggregates(
            &stream,
            all.chunks(PER_AGGREGATE as usize)
                .map(<[_]>::to_vec)
                .collect(),
        )
        .await?;

    let seen: Arc<Mutex<Vec<(ExtendedSequenceNumber, String)>>> = Arc::default();
    let log = DeliveryLog::default();
    let first = {
        let seen = seen.clone();
        worker("kpl-app", &stream, "w1", fixture, leases.clone(), &log)
            .processor(move || CheckpointNth {
                n: CHECKPOINT_AT,
                seen: seen.clone(),
            })
            .build()?
    };
    let stop = first.shutdown_handle();
    let run = tokio::spawn(first.run());
    let seen = poll(
        "the first worker saw 35 user records",
        Duration::from_secs(60),
        || async {
            let s = seen
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .clone();
            Ok((s.len() >= CHECKPOINT_AT).then_some(s))
        },
    )
    .await?;
    let want = seen[CHECKPOINT_AT - 1].0.clone();
    poll(
        "the checkpoint inside the 4th aggregate is stored",
        Duration::from_secs(30),
        || async {
            let table = leases.list().await?.leases;
            Ok((table.len() == 1 && table[0].checkpoint == want).then_some(()))
        },
    )
    .await?;
    stop.shutdown();
    run.await??;

    // Deaggregated: user records with their own payloads, sub-sequence numbers 0..9 under one
    // sequence number per aggregate.
    for (i, (pos, payload)) in seen.iter().enumerate() {
        let i = i as u32;
        ensure!(
            *payload == format!("{}/{}", i % KEYS, i / KEYS),
            "user record {i} has payload {payload:?}"
        );
        ensure!(
            pos.sub_sequence() == u64::from(i % PER_AGGREGATE),
            "user record {i} at {pos}: expected sub-sequence {}",
            i % PER_AGGREGATE
        );
        let first_of_aggregate = &seen[(i - i % PER_AGGREGATE) as usize].0;
        ensure!(
            pos.sequence() == first_of_aggregate.sequence(),
            "user record {i} at {pos} is not under its aggregate's sequence number {first_of_aggregate}"
        );
    }
    let table = leases.list().await?.leases;
    ensure!(
        table[0].checkpoint.sub_sequence() == 4 && table[0].owner.is_none(),
        "checkpointed at sub-record 4 and released: {:?}",
        table[0]
    );

    let second = worker("kpl-app", &stream, "w2", fixture, leases.clone(), &log).build()?;
    let stop = second.shutdown_handle();
    let run = tokio::spawn(second.run());
    log.wait_for(total as usize - CHECKPOINT_AT, Duration::from_secs(60))
        .await?;
    wait_checkpointed_at_last_delivery(&*leases, &log.snapshot(), Duration::from_secs(30)).await?;
    stop.shutdown();
    run.await??;
    let log = log.snapshot();
    let delivered: Vec<u32> = log.iter().map(|d| d.key + KEYS * d.n).collect();
    ensure!(
        delivered == (CHECKPOINT_AT as u32..total).collect::<Vec<_>>(),
        "the restart delivered {delivered:?}, expected exactly records {CHECKPOINT_AT}..{total} in order"
    );
    Ok(())
}

/// Sees user records until it has `n`, checkpoints the n-th, and ignores everything after.
struct CheckpointNth {
    n: usize,
    seen: Arc<Mutex<Vec<(ExtendedSequenceNumber, String)>>>,
}

#[async_trait]
impl RecordProcessor for CheckpointNth {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        let mut to_checkpoint = None;
        {
            let mut seen = self
                .seen
                .lock()
                .map_err(|_| ProcessorError::fatal("poisoned"))?;
            for r in batch {
                if seen.len() == self.n {
                    break;
                }
                let payload = String::from_utf8_lossy(&r.data).into_owned();
                seen.push((r.position(), payload));
                if seen.len() == self.n {
                    to_checkpoint = Some(r.clone());
                }
            }
        }
        if let Some(r) = to_checkpoint {
            cp.checkpoint_record(&r)
                .await
                .map_err(ProcessorError::retryable)?;
        }
        Ok(())
    }
}

/// Scenario: `UpdateShardCount` 2 → 4 while a worker consumes. Every record delivered once,
/// per-key order held, no child record before its parents ended, every parent's lease at
/// `SHARD_END` naming its children.
pub async fn update_shard_count_while_consuming(
    fixture: &dyn StreamFixture,
    leases: Arc<dyn LeaseStore>,
) -> anyhow::Result<()> {
    const KEYS: u32 = 32;
    const WAVE: u32 = 400;
    let stream = crate::unique_name("scale");
    fixture.create_stream(&stream, 2).await?;
    let log = DeliveryLog::default();
    let w = worker("scale-app", &stream, "w1", fixture, leases.clone(), &log).build()?;
    let stop = w.shutdown_handle();
    let run = tokio::spawn(w.run());
    fixture.put(&stream, records(0, WAVE, KEYS)).await?;
    log.wait_for(WAVE as usize / 4, Duration::from_secs(60))
        .await?;
    fixture.update_shard_count(&stream, 4).await?;
    fixture.put(&stream, records(WAVE, 2 * WAVE, KEYS)).await?;
    log.wait_for(2 * WAVE as usize, Duration::from_secs(120))
        .await?;
    let all = sorted_shards(fixture, &stream).await?;
    let open = all.iter().filter(|s| !s.is_closed()).count();
    ensure!(open == 4, "{open} open shards after scaling to 4: {all:?}");
    // The parents' leases reach SHARD_END when their consumers see the shards' ends.
    poll(
        "every parent lease at SHARD_END with its children",
        Duration::from_secs(30),
        || async {
            let table = leases.list().await?.leases;
            Ok(check_parent_leases_finished(&table, &all).ok())
        },
    )
    .await?;
    stop.shutdown();
    run.await??;
    let log = log.snapshot();
    check_all_delivered(&log, 2 * WAVE, KEYS)?;
    check_per_key_order(&log)?;
    check_no_duplicates_or_overlap(&log)?;
    check_parents_first(&log, &all)?;
    check_parent_leases_finished(&leases.list().await?.leases, &all)?;
    ensure!(
        log.iter()
            .any(|d| all.iter().any(|s| s.id == d.shard && s.parent.is_some())),
        "no record was delivered from a child shard"
    );
    ensure!(
        log.len() == 2 * WAVE as usize,
        "{} deliveries for {} records",
        log.len(),
        2 * WAVE
    );
    Ok(())
}
