//! The ready-made dead-letter destinations through a worker, on the emulators (kinesis-local
//! for the streams, dynalite for the lease table, moto for S3), through the real SDK clients.
//!
//! A one-shard stream gets three waves of records; the second holds a record whose data starts
//! with `POISON`, and the processor fails every batch that holds one. Under
//! `ErrorPolicy::DeadLetter(DeadLetterPolicy::new(…).attempts(3))`:
//! - `KinesisDeadLetter`: the failed batches' records arrive in the dead-letter stream, keyed
//!   by their own partition keys, as envelopes naming the shard, the sequence numbers, the
//!   error and 3 attempts;
//! - `S3DeadLetter`: each failed batch is an object under
//!   `{prefix}{stream}/{shard}/{first}-{last}.jsonl` with the metadata and one envelope a line;
//! - a failing destination (the bucket is missing, created later): while the handler fails,
//!   the checkpoint stays before the failed batch and nothing after it is processed; once the
//!   bucket exists the batch is stored and the shard goes on.
//!
//! Every other record is processed, and in the end the checkpoint covers the whole stream.
//! Each time the handler is called, the checkpoint is still before the letter's records and
//! no later record was processed (the shard moves past them only once the handler succeeds).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use base64::Engine as _;
use kcl::dead_letter::{KinesisDeadLetter, S3DeadLetter};
use kcl::error::BoxError;
use kcl::lease::{LeaseKey, LeaseStore};
use kcl::processor::policy::{DeadLetter, DeadLetterHandler, DeadLetterPolicy};
use kcl::retrieval::aws::AwsKinesis;
use kcl::retrieval::IteratorPosition;
use kcl::{
    async_trait, Checkpointer, ErrorPolicy, ExtendedSequenceNumber, KinesisApi, ProcessorError,
    Record, RecordBatch, RecordProcessor, SequenceNumber, ShardId, Worker,
};
use kcl_integration_tests::dynamo_servers::{lease_table, start_moto, Table};
use kcl_integration_tests::scenarios::{self, poll, DeliveryLog, LocalKinesis, StreamFixture};
use kcl_integration_tests::{sdk_config, unique_name, ServerProcess};

const TIMEOUT: Duration = Duration::from_secs(60);

/// What the processor saw.
#[derive(Clone, Default)]
struct Seen {
    /// Records of batches that returned `Ok`, in order.
    processed: Arc<Mutex<Vec<Record>>>,
    /// Positions of records in batches that failed (every attempt).
    failed: Arc<Mutex<BTreeSet<ExtendedSequenceNumber>>>,
}

impl Seen {
    fn processed(&self) -> Vec<Record> {
        self.processed.lock().expect("lock").clone()
    }
    fn failed(&self) -> BTreeSet<ExtendedSequenceNumber> {
        self.failed.lock().expect("lock").clone()
    }
}

/// Fails every batch that holds a record starting with `POISON`; checkpoints the others.
struct Poisoned(Seen);

#[async_trait]
impl RecordProcessor for Poisoned {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        if let Some(bad) = batch.records.iter().find(|r| r.data.starts_with(b"POISON")) {
            self.0
                .failed
                .lock()
                .expect("lock")
                .extend(batch.records.iter().map(Record::position));
            return Err(ProcessorError::retryable(format!(
                "poison record {}",
                bad.sequence_number
            )));
        }
        self.0
            .processed
            .lock()
            .expect("lock")
            .extend(batch.records.iter().cloned());
        cp.checkpoint().await.map_err(ProcessorError::retryable)
    }

    async fn shutdown_requested(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        if cp.last_delivered().is_some() {
            cp.checkpoint().await.map_err(ProcessorError::retryable)?;
        }
        Ok(())
    }
}

/// Wraps the destination: checks, at every call, that the shard has not moved past the
/// letter (checkpoint before its first record, no later record processed); counts calls and
/// failures.
struct Observed {
    inner: Arc<dyn DeadLetterHandler>,
    leases: Arc<dyn LeaseStore>,
    seen: Seen,
    calls: Arc<AtomicU32>,
    failures: Arc<AtomicU32>,
    violations: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl DeadLetterHandler for Observed {
    async fn handle(&self, letter: &DeadLetter<'_>) -> Result<(), BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let first = letter.records.first().map(Record::position);
        let last = letter.records.last().map(Record::position);
        let lease = self
            .leases
            .get(&LeaseKey::for_shard(letter.shard_id))
            .await?;
        let mut violations = Vec::new();
        if let (Some(first), Some(lease)) = (&first, lease) {
            if lease.checkpoint >= *first {
                violations.push(format!(
                    "checkpoint {:?} already covers the dead letter at {first:?}",
                    lease.checkpoint
                ));
            }
        }
        if let Some(last) = &last {
            if let Some(r) = self.seen.processed().iter().find(|r| r.position() > *last) {
                violations.push(format!(
                    "record {} (after the dead letter ending at {last:?}) was processed before the handler took the letter",
                    r.sequence_number
                ));
            }
        }
        self.violations.lock().expect("lock").extend(violations);
        let result = self.inner.handle(letter).await;
        if result.is_err() {
            self.failures.fetch_add(1, Ordering::SeqCst);
        }
        result
    }
}

/// The stream, the lease table and a worker under a dead-letter policy.
struct Run {
    kinesis: LocalKinesis,
    _table: ServerProcess,
    leases: Arc<dyn LeaseStore>,
    stream: String,
    shard: ShardId,
    seen: Seen,
    calls: Arc<AtomicU32>,
    failures: Arc<AtomicU32>,
    violations: Arc<Mutex<Vec<String>>>,
    stop: kcl::ShutdownHandle,
    worker: tokio::task::JoinHandle<kcl::Result<()>>,
}

/// Three waves of 6 records: `ok-0..6`, then `POISON` and 5 more, then `ok-12..18`.
fn wave(n: u32) -> Vec<(String, Vec<u8>)> {
    (n * 6..n * 6 + 6)
        .map(|i| {
            let data = if i == 6 {
                "POISON-6".to_owned()
            } else {
                format!("ok-{i}")
            };
            (format!("key-{}", i % 3), data.into_bytes())
        })
        .collect()
}

impl Run {
    async fn start(
        app: &str,
        kinesis: LocalKinesis,
        handler: Arc<dyn DeadLetterHandler>,
    ) -> anyhow::Result<Self> {
        let (table, leases) = lease_table(Table::Dynalite).await?;
        let stream = unique_name(app);
        kinesis.create_stream(&stream, 1).await?;
        let shard = kinesis
            .kinesis()
            .list_shards(&stream)
            .await?
            .first()
            .map(|s| s.id.clone())
            .context("no shard")?;
        let seen = Seen::default();
        let (calls, failures) = (Arc::default(), Arc::default());
        let violations = Arc::default();
        let observed = Observed {
            inner: handler,
            leases: leases.clone(),
            seen: seen.clone(),
            calls: Arc::clone(&calls),
            failures: Arc::clone(&failures),
            violations: Arc::clone(&violations),
        };
        let policy = DeadLetterPolicy::new(observed)
            .attempts(3)
            .delays(Duration::from_millis(50), Duration::from_millis(400));
        let processor_seen = seen.clone();
        let worker: Worker = scenarios::worker(
            app,
            &stream,
            "w",
            &kinesis,
            leases.clone(),
            &DeliveryLog::default(),
        )
        .error_policy(ErrorPolicy::DeadLetter(policy))
        .processor(move || Poisoned(processor_seen.clone()))
        .build()?;
        let stop = worker.shutdown_handle();
        let worker = tokio::spawn(worker.run());
        Ok(Self {
            kinesis,
            _table: table,
            leases,
            stream,
            shard,
            seen,
            calls,
            failures,
            violations,
            stop,
            worker,
        })
    }

    async fn wait_processed(&self, n: usize) -> anyhow::Result<()> {
        poll(&format!("{n} records processed"), TIMEOUT, || {
            let got = self.seen.processed().len();
            async move { Ok((got >= n).then_some(())) }
        })
        .await
    }

    async fn checkpoint(&self) -> anyhow::Result<ExtendedSequenceNumber> {
        let lease = self
            .leases
            .get(&LeaseKey::for_shard(&self.shard))
            .await?
            .context("no lease")?;
        Ok(lease.checkpoint)
    }

    /// Puts the first wave and waits until it is processed, puts the second (with the
    /// poison) and waits until a batch failed, then puts the third: read after the failed
    /// batch, so never part of it.
    async fn three_waves(&self) -> anyhow::Result<()> {
        self.kinesis.put(&self.stream, wave(0)).await?;
        self.wait_processed(6).await?;
        self.kinesis.put(&self.stream, wave(1)).await?;
        poll("a failed batch", TIMEOUT, || {
            let failed = !self.seen.failed().is_empty();
            async move { Ok(failed.then_some(())) }
        })
        .await?;
        self.kinesis.put(&self.stream, wave(2)).await
    }

    /// Waits until every record was processed or dead-lettered, stops the worker, and
    /// checks: the handler never saw the shard past its letter, every record outside the
    /// failed batches was processed once, in order, and the checkpoint covers the stream.
    /// Returns the failed batches' records, in order, and the kinesis-local (still running).
    async fn finish(self) -> anyhow::Result<(Vec<Record>, LocalKinesis)> {
        let failed = poll("every record processed or dead-lettered", TIMEOUT, || {
            let (processed, failed) = (self.seen.processed().len(), self.seen.failed().len());
            async move { Ok((processed + failed == 18).then_some(failed)) }
        })
        .await?;
        let all = read_stream(&self.kinesis.client, &self.stream, 18).await?;
        let last = all.last().map(Record::position).context("empty stream")?;
        // The checkpoint covers the last record (the failed batch was taken).
        poll("the checkpoint at the last record", TIMEOUT, || async {
            Ok((self.checkpoint().await? == last).then_some(()))
        })
        .await?;
        self.stop.shutdown();
        self.worker.await??;

        let violations = self.violations.lock().expect("lock").clone();
        ensure!(violations.is_empty(), "{violations:#?}");
        let failed_set = self.seen.failed();
        let (dead, alive): (Vec<Record>, Vec<Record>) = all
            .into_iter()
            .partition(|r| failed_set.contains(&r.position()));
        ensure!(
            dead.len() == failed && dead.iter().any(|r| r.data.starts_with(b"POISON")),
            "failed batches: {dead:?}"
        );
        let processed: Vec<ExtendedSequenceNumber> =
            self.seen.processed().iter().map(Record::position).collect();
        let want: Vec<ExtendedSequenceNumber> = alive.iter().map(Record::position).collect();
        ensure!(
            processed == want,
            "processed {processed:?}, want every record outside the failed batches {want:?}"
        );
        println!(
            "{} records dead-lettered in {} handler calls ({} failed)",
            dead.len(),
            self.calls.load(Ordering::SeqCst),
            self.failures.load(Ordering::SeqCst)
        );
        Ok((dead, self.kinesis))
    }
}

/// Every record of a one-shard stream, once `n` are there.
async fn read_stream(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    n: usize,
) -> anyhow::Result<Vec<Record>> {
    let api = AwsKinesis::new(client.clone());
    let shard = api
        .list_shards(stream)
        .await?
        .first()
        .map(|s| s.id.clone())
        .context("no shard")?;
    poll(&format!("{n} records in {stream}"), TIMEOUT, || async {
        let mut it = api
            .get_shard_iterator(stream, &shard, &IteratorPosition::TrimHorizon)
            .await?;
        let mut out = Vec::new();
        loop {
            let page = api.get_records(&it, 10_000).await?;
            let empty = page.records.is_empty();
            out.extend(page.records);
            match page.next_iterator {
                Some(next) if !empty => it = next,
                _ => break,
            }
        }
        Ok((out.len() >= n).then_some(out))
    })
    .await
}

/// Checks one envelope against the record it stands for.
fn check_envelope(
    v: &serde_json::Value,
    record: &Record,
    stream: &str,
    shard: &ShardId,
) -> anyhow::Result<()> {
    let data = base64::engine::general_purpose::STANDARD
        .decode(v["data"].as_str().context("data")?)
        .context("data is not base64")?;
    ensure!(v["stream"] == stream, "{v}");
    ensure!(v["shardId"] == shard.as_str(), "{v}");
    ensure!(
        v["sequenceNumber"] == record.sequence_number.to_string(),
        "{v}"
    );
    ensure!(v["subSequenceNumber"] == 0, "{v}");
    ensure!(v["partitionKey"] == record.partition_key.as_str(), "{v}");
    ensure!(v["attempts"] == 3, "{v}");
    ensure!(v["firstFailure"].as_u64().is_some(), "{v}");
    ensure!(v["approximateArrivalTimestamp"].as_u64().is_some(), "{v}");
    let error = v["error"].as_str().context("error")?;
    ensure!(
        error.starts_with("record processor failed (retryable): poison record "),
        "{v}"
    );
    ensure!(data == record.data.as_ref(), "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_batch_goes_to_a_kinesis_stream() -> anyhow::Result<()> {
    let started = Instant::now();
    let kinesis = LocalKinesis::start().await?;
    let dlq = unique_name("dlq");
    kinesis.create_stream(&dlq, 1).await?;
    let handler = Arc::new(KinesisDeadLetter::from_client(kinesis.client.clone(), &dlq));
    let run = Run::start("dlq-kinesis", kinesis, handler).await?;
    let (stream, shard) = (run.stream.clone(), run.shard.clone());
    run.three_waves().await?;
    let (dead, kinesis) = run.finish().await?;

    let letters = read_stream(&kinesis.client, &dlq, dead.len()).await?;
    ensure!(
        letters.len() == dead.len(),
        "{} dead letters in the stream, {} records failed",
        letters.len(),
        dead.len()
    );
    // Each envelope once, keyed by its record's partition key; per key in shard order.
    let mut last_of_key: std::collections::HashMap<String, SequenceNumber> = Default::default();
    let mut found = BTreeSet::new();
    for letter in &letters {
        let v: serde_json::Value = serde_json::from_slice(&letter.data)?;
        let seq = v["sequenceNumber"].as_str().context("sequenceNumber")?;
        let record = dead
            .iter()
            .find(|r| r.sequence_number.to_string() == seq)
            .with_context(|| format!("an envelope of no failed record: {v}"))?;
        ensure!(found.insert(seq.to_owned()), "{seq} dead-lettered twice");
        ensure!(
            letter.partition_key == record.partition_key,
            "keyed by {}, not by the record's key {}",
            letter.partition_key,
            record.partition_key
        );
        check_envelope(&v, record, &stream, &shard)?;
        if let Some(prev) =
            last_of_key.insert(record.partition_key.clone(), record.sequence_number.clone())
        {
            ensure!(
                prev < record.sequence_number,
                "key {}: {} after {prev} in the dead-letter stream",
                record.partition_key,
                record.sequence_number
            );
        }
    }
    println!("took {:.1?}", started.elapsed());
    Ok(())
}

/// moto's S3, path-style.
async fn s3(moto: &ServerProcess) -> aws_sdk_s3::Client {
    let conf = sdk_config(&moto.endpoint()).await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&conf)
            .force_path_style(true)
            .build(),
    )
}

/// The objects under `prefix`, by key: their metadata and envelopes.
async fn objects(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
) -> anyhow::Result<
    Vec<(
        String,
        std::collections::HashMap<String, String>,
        Vec<serde_json::Value>,
    )>,
> {
    let listed = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .send()
        .await
        .context("ListObjectsV2")?;
    let mut out = Vec::new();
    for o in listed.contents() {
        let key = o.key().context("key")?.to_owned();
        let got = s3
            .get_object()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
            .context("GetObject")?;
        let meta = got.metadata().cloned().unwrap_or_default();
        ensure!(
            got.content_type() == Some("application/x-ndjson"),
            "content type {:?}",
            got.content_type()
        );
        let body = got.body.collect().await?.into_bytes();
        let lines = std::str::from_utf8(&body)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<Vec<serde_json::Value>, _>>()?;
        out.push((key, meta, lines));
    }
    Ok(out)
}

/// Checks that the objects hold exactly `dead` (each object one failed batch, keyed by its
/// first and last sequence numbers) with the documented metadata.
async fn check_objects(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    stream: &str,
    shard: &ShardId,
    dead: &[Record],
) -> anyhow::Result<()> {
    let objects = objects(s3, bucket, prefix).await?;
    ensure!(!objects.is_empty(), "no object under {prefix}");
    let mut seen = 0;
    for (key, meta, lines) in &objects {
        let first = lines.first().context("an empty object")?;
        let last = lines.last().context("an empty object")?;
        let (f, l) = (
            first["sequenceNumber"].as_str().context("seq")?,
            last["sequenceNumber"].as_str().context("seq")?,
        );
        ensure!(
            *key == format!("{prefix}{stream}/{shard}/{f}-{l}.jsonl"),
            "key {key}"
        );
        let m = |k: &str| meta.get(k).map(String::as_str);
        ensure!(m("stream") == Some(stream), "{meta:?}");
        ensure!(m("shard-id") == Some(shard.as_str()), "{meta:?}");
        ensure!(m("first-sequence-number") == Some(f), "{meta:?}");
        ensure!(m("last-sequence-number") == Some(l), "{meta:?}");
        ensure!(m("attempts") == Some("3"), "{meta:?}");
        ensure!(
            m("records") == Some(lines.len().to_string().as_str()),
            "{meta:?}"
        );
        ensure!(
            m("error").is_some_and(|e| e.contains("poison record")),
            "{meta:?}"
        );
        for v in lines {
            let record = dead
                .get(seen)
                .context("more envelopes than failed records")?;
            check_envelope(v, record, stream, shard)?;
            seen += 1;
        }
    }
    ensure!(
        seen == dead.len(),
        "{seen} envelopes, {} failed records",
        dead.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_batch_goes_to_s3() -> anyhow::Result<()> {
    let started = Instant::now();
    let moto = start_moto().await?;
    let s3 = s3(&moto).await;
    let bucket = unique_name("dlq").to_lowercase();
    s3.create_bucket().bucket(&bucket).send().await?;
    let handler = S3DeadLetter::builder(s3.clone())
        .bucket(&bucket)
        .prefix("dead/")
        .build()?;
    let kinesis = LocalKinesis::start().await?;
    let run = Run::start("dlq-s3", kinesis, Arc::new(handler)).await?;
    let (stream, shard) = (run.stream.clone(), run.shard.clone());
    run.three_waves().await?;
    let (dead, _) = run.finish().await?;
    check_objects(&s3, &bucket, "dead/", &stream, &shard, &dead).await?;
    println!("took {:.1?}", started.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_destination_holds_the_shard_until_it_succeeds() -> anyhow::Result<()> {
    let started = Instant::now();
    let moto = start_moto().await?;
    let s3 = s3(&moto).await;
    // Not created yet: every PutObject fails with NoSuchBucket.
    let bucket = unique_name("later").to_lowercase();
    let handler = S3DeadLetter::builder(s3.clone()).bucket(&bucket).build()?;
    let kinesis = LocalKinesis::start().await?;
    let run = Run::start("dlq-fail", kinesis, Arc::new(handler)).await?;
    let (stream, shard) = (run.stream.clone(), run.shard.clone());
    run.three_waves().await?;
    // The handler fails, again and again (retried every 50 to 400 ms); meanwhile the third
    // wave is in the stream.
    poll("a failed handler call", TIMEOUT, || {
        let n = run.failures.load(Ordering::SeqCst);
        async move { Ok((n >= 1).then_some(())) }
    })
    .await?;
    let failed = run.seen.failed();
    let first_failed = failed.first().cloned().context("no failure")?;
    let last_failed = failed.last().cloned().context("no failure")?;
    // Long enough for the third wave to be read and processed, were the shard not held.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let checkpoint = run.checkpoint().await?;
        ensure!(
            checkpoint < first_failed,
            "the checkpoint {checkpoint:?} moved past the failed batch at {first_failed:?} while the dead-letter handler failed"
        );
        let after: Vec<String> = run
            .seen
            .processed()
            .iter()
            .filter(|r| r.position() > last_failed)
            .map(|r| r.sequence_number.to_string())
            .collect();
        ensure!(
            after.is_empty(),
            "records {after:?} after the failed batch were processed while the dead-letter handler failed"
        );
    }
    ensure!(
        run.seen.failed() == failed,
        "the failed batch changed while its handler failed"
    );
    let calls = run.failures.load(Ordering::SeqCst);
    ensure!(
        calls >= 3,
        "the failing handler was called {calls} times in 3 s: not handed the letter again"
    );
    s3.create_bucket().bucket(&bucket).send().await?;
    let (dead, _) = run.finish().await?;
    check_objects(&s3, &bucket, "", &stream, &shard, &dead).await?;
    println!("took {:.1?}", started.elapsed());
    Ok(())
}

/// Takes every letter, noting its attempts and how long after the first failure it came.
#[derive(Clone, Default)]
struct Timed(Arc<Mutex<Vec<(u32, Duration, usize)>>>);

#[async_trait]
impl DeadLetterHandler for Timed {
    async fn handle(&self, letter: &DeadLetter<'_>) -> Result<(), BoxError> {
        let since = letter.first_failure.elapsed().unwrap_or_default();
        self.0
            .lock()
            .expect("lock")
            .push((letter.attempts, since, letter.records.len()));
        Ok(())
    }
}

/// `within(d)` without an attempt limit: the batch is retried for `d`, then dead-lettered,
/// and the shard goes on (in-memory backends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn within_a_duration_then_dead_lettered() -> anyhow::Result<()> {
    let started = Instant::now();
    let within = Duration::from_millis(800);
    let fixture = scenarios::MemStream(kcl::testkit::MemKinesis::new());
    let leases: Arc<dyn LeaseStore> = Arc::new(kcl::testkit::MemLeaseStore::new());
    let stream = unique_name("within");
    fixture.create_stream(&stream, 1).await?;
    let seen = Seen::default();
    let timed = Timed::default();
    let policy = DeadLetterPolicy::new(timed.clone())
        .unlimited_attempts()
        .within(within)
        .delays(Duration::from_millis(50), Duration::from_millis(100));
    let processor_seen = seen.clone();
    let worker: Worker = scenarios::worker(
        "within",
        &stream,
        "w",
        &fixture,
        leases,
        &DeliveryLog::default(),
    )
    .error_policy(ErrorPolicy::DeadLetter(policy))
    .processor(move || Poisoned(processor_seen.clone()))
    .build()?;
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());
    fixture.put(&stream, wave(1)).await?;
    poll("a failed batch", TIMEOUT, || {
        let failed = !seen.failed().is_empty();
        async move { Ok(failed.then_some(())) }
    })
    .await?;
    fixture.put(&stream, wave(2)).await?;
    let failed = poll("every record processed or dead-lettered", TIMEOUT, || {
        let (processed, failed) = (seen.processed().len(), seen.failed().len());
        async move { Ok((processed + failed == 12).then_some(failed)) }
    })
    .await?;
    stop.shutdown();
    running.await??;
    let letters = timed.0.lock().expect("lock").clone();
    ensure!(letters.len() == 1, "letters {letters:?}");
    let (attempts, since, records) = letters[0];
    ensure!(
        records == failed,
        "{records} records dead-lettered, {failed} failed"
    );
    // Retried every 50 to 100 ms until `within` passed: many more than 3 attempts.
    ensure!(attempts >= 5, "{attempts} attempts in {within:?}");
    ensure!(
        since >= within && since < within + Duration::from_secs(2),
        "dead-lettered {since:?} after the first failure (within {within:?})"
    );
    ensure!(seen.processed().len() == 12 - failed);
    println!(
        "dead-lettered after {attempts} attempts, {since:?}; took {:.1?}",
        started.elapsed()
    );
    Ok(())
}
