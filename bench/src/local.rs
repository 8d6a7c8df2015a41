//! Benchmarks on the local servers: worker vs a plain GetRecords loop on kinesis-local
//! (benchmark 2) and time from `run()` to the first record (benchmark 3), plus the helpers the
//! CLI benchmark shares (keys routed to chosen shards, loading).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use aws_sdk_kinesis::types::ShardIteratorType;
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::retrieval::aws::AwsKinesis;
use kcl::shard::{hash_key, HashKeyRange};
use kcl::{Backends, KinesisApi, LeaseStore, PollingConfig, SequenceNumber, ShardId, Worker};
use kcl_integration_tests::kinesis_server::{self, Put};
use kcl_integration_tests::{dynamo_servers, sdk_config, unique_name, ServerProcess};

use crate::probe::{fmt_dur, fmt_rate, Probe, Recorder, TimedKinesis, TimedStore};

/// A stream's shards with their hash ranges, in listing order.
pub async fn shard_ranges(
    kc: &aws_sdk_kinesis::Client,
    stream: &str,
) -> anyhow::Result<Vec<(ShardId, HashKeyRange)>> {
    let shards = AwsKinesis::new(kc.clone()).list_shards(stream).await?;
    Ok(shards.into_iter().map(|s| (s.id, s.hash_range)).collect())
}

/// `per_shard` partition keys for each shard (keys whose MD5 falls in the shard's range), so
/// every shard gets exactly the same number of records.
pub fn keys_per_shard(
    ranges: &[(ShardId, HashKeyRange)],
    per_shard: usize,
    prefix: &str,
) -> Vec<Vec<String>> {
    let mut keys: Vec<Vec<String>> = vec![Vec::with_capacity(per_shard); ranges.len()];
    let mut full = 0;
    let mut n = 0u64;
    while full < ranges.len() {
        let key = format!("{prefix}-{n}");
        n += 1;
        let h = hash_key(&key);
        if let Some(i) = ranges.iter().position(|(_, r)| r.contains(h)) {
            if keys[i].len() < per_shard {
                keys[i].push(key);
                if keys[i].len() == per_shard {
                    full += 1;
                }
            }
        }
    }
    keys
}

/// Records `from..to` of every shard (interleaved across shards), `size` bytes each.
pub fn records_for(
    keys: &[Vec<String>],
    from: usize,
    to: usize,
    size: usize,
) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::with_capacity((to - from) * keys.len());
    for j in from..to {
        for (i, shard_keys) in keys.iter().enumerate() {
            out.push((
                shard_keys[j].clone(),
                crate::probe::payload(size, (j * keys.len() + i) as u64 + 1),
            ));
        }
    }
    out
}

/// The highest sequence number stored per shard.
pub fn last_sequences(puts: &[Put], into: &mut BTreeMap<ShardId, SequenceNumber>) {
    for p in puts {
        let e = into
            .entry(p.shard_id.clone())
            .or_insert_with(|| p.sequence_number.clone());
        if p.sequence_number > *e {
            *e = p.sequence_number.clone();
        }
    }
}

pub async fn dynamo_client(server: &ServerProcess) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&sdk_config(&server.endpoint()).await)
}

/// Reads every shard from TRIM_HORIZON with the SDK directly (one task per shard, GetRecords
/// with Limit `limit` back to back) until `per_shard` records each or caught up. Returns the
/// records read and the time until the last one arrived.
pub async fn plain_loop(
    kc: &aws_sdk_kinesis::Client,
    stream: &str,
    shards: &[ShardId],
    per_shard: u64,
    limit: u32,
) -> anyhow::Result<(u64, Duration)> {
    let t0 = Instant::now();
    let reads = shards.iter().map(|id| async move {
        let mut it = kc
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(id.as_str())
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .context("GetShardIterator")?
            .shard_iterator;
        let mut n = 0u64;
        while let Some(i) = it {
            let out = kc
                .get_records()
                .shard_iterator(i)
                .limit(i32::try_from(limit).unwrap_or(10_000))
                .send()
                .await
                .context("GetRecords")?;
            n += out.records.len() as u64;
            if n >= per_shard || (out.records.is_empty() && out.millis_behind_latest == Some(0)) {
                break;
            }
            it = out.next_shard_iterator;
        }
        anyhow::Ok((n, t0.elapsed()))
    });
    let results = futures::future::try_join_all(reads).await?;
    let n = results.iter().map(|r| r.0).sum();
    let last = results.iter().map(|r| r.1).max().unwrap_or_default();
    Ok((n, last))
}

/// One worker run on `app`'s lease table until `total` records are checkpointed.
#[derive(Debug, Clone, Copy)]
pub struct WorkerRun {
    /// `run()` to the first record delivered.
    pub first: Duration,
    /// `run()` to the last record checkpointed.
    pub elapsed: Duration,
    /// `run()` to the first GetShardIterator call (start-up: lease table, ListShards, takes).
    pub startup: Duration,
}

impl WorkerRun {
    /// From the first GetShardIterator to the last checkpoint: the part a plain loop also does.
    pub fn reading(&self) -> Duration {
        self.elapsed.saturating_sub(self.startup)
    }
}

#[allow(clippy::too_many_arguments)]
pub async fn worker_run(
    kc: &aws_sdk_kinesis::Client,
    dc: &aws_sdk_dynamodb::Client,
    stream: &str,
    app: &str,
    total: u64,
    polling: Option<PollingConfig>,
    rec: &Arc<Recorder>,
    timeout: Duration,
) -> anyhow::Result<WorkerRun> {
    let aws = kcl::Aws::from_clients(kc.clone(), dc.clone());
    let probe = Probe::new(total);
    let mut builder = Worker::builder()
        .application_name(app)
        .stream(stream)
        .kinesis(Arc::new(TimedKinesis {
            inner: aws.kinesis(),
            rec: rec.clone(),
        }))
        .lease_store(Arc::new(TimedStore {
            inner: aws.lease_store(app),
            rec: rec.clone(),
        }))
        .processor(probe.processor());
    if let Some(p) = polling {
        builder = builder.polling(p);
    }
    let worker = builder.build()?;
    let stop = worker.shutdown_handle();
    let t0 = Instant::now();
    rec.reset(t0);
    let running = tokio::spawn(worker.run());
    let waited = tokio::time::timeout(timeout, probe.all_records()).await;
    stop.shutdown();
    let joined = running.await.context("worker panicked")?;
    if waited.is_err() {
        bail!(
            "worker delivered {} of {total} records in {timeout:?} (run: {joined:?})",
            probe.records()
        );
    }
    joined?;
    let first = probe.first().context("no first record")? - t0;
    let elapsed = probe.last().context("no last record")? - t0;
    let startup = rec
        .summary()
        .get("kinesis.get_shard_iterator")
        .map_or(Duration::ZERO, |s| s.first_start);
    Ok(WorkerRun {
        first,
        elapsed,
        startup,
    })
}

pub fn print_calls(prefix: &str, rec: &Recorder) {
    for (op, s) in rec.summary() {
        println!(
            "{prefix}   {op:<28} {:>5} calls {:>7} items  busy {:>8}  max {:>7}  [{} .. {}]",
            s.calls,
            s.items,
            fmt_dur(s.total),
            fmt_dur(s.max),
            fmt_dur(s.first_start),
            fmt_dur(s.last_end)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Benchmark 2: worker vs plain loop on kinesis-local.

#[derive(Debug, Clone)]
pub struct LocalOpts {
    pub shards: u32,
    pub per_shard: usize,
    pub record_size: usize,
    pub rounds: usize,
    pub put_parallelism: usize,
    /// `None`: the library's default polling settings.
    pub min_interval: Option<Duration>,
    /// GetRecords limit of the plain loop and the worker's `polling.max_records`.
    pub max_records: u32,
    /// The worker's `polling.prefetch_bytes` (`None`: the library's default).
    pub prefetch_bytes: Option<usize>,
}

#[derive(Debug)]
pub struct LocalResult {
    pub records: u64,
    pub load: Duration,
    pub plain: Vec<Duration>,
    pub worker: Vec<WorkerRun>,
}

impl LocalResult {
    pub fn best_plain(&self) -> Duration {
        self.plain.iter().copied().min().unwrap_or_default()
    }
    pub fn best_worker(&self) -> Duration {
        self.worker
            .iter()
            .map(|w| w.elapsed)
            .min()
            .unwrap_or_default()
    }
    pub fn best_worker_reading(&self) -> Duration {
        self.worker
            .iter()
            .map(|w| w.reading())
            .min()
            .unwrap_or_default()
    }
    pub fn rate(&self, d: Duration) -> f64 {
        self.records as f64 / d.as_secs_f64()
    }
}

pub async fn throughput(opts: &LocalOpts) -> anyhow::Result<LocalResult> {
    let kinesis = kinesis_server::start_kinesis_local().await?;
    let dynalite = dynamo_servers::start_dynalite().await?;
    let kc = kinesis_server::kinesis_client(&kinesis).await;
    let dc = dynamo_client(&dynalite).await;
    let stream = "bench-throughput";
    kinesis_server::create_stream(&kc, stream, opts.shards).await?;
    let ranges = shard_ranges(&kc, stream).await?;
    let keys = keys_per_shard(&ranges, opts.per_shard, "k");
    let records = records_for(&keys, 0, opts.per_shard, opts.record_size);
    let total = records.len() as u64;
    let t = Instant::now();
    let puts =
        kinesis_server::put_records_with_parallelism(&kc, stream, records, opts.put_parallelism)
            .await?;
    let load = t.elapsed();
    ensure!(
        puts.len() as u64 == total,
        "loaded {} of {total}",
        puts.len()
    );
    println!(
        "local: loaded {} shards x {} records of {} B into kinesis-local in {} ({}, {} PutRecords in flight)",
        opts.shards,
        opts.per_shard,
        opts.record_size,
        fmt_dur(load),
        fmt_rate(total as f64 / load.as_secs_f64()),
        opts.put_parallelism
    );
    let shard_ids: Vec<ShardId> = ranges.iter().map(|(id, _)| id.clone()).collect();
    let polling = {
        let mut p = PollingConfig::default();
        if let Some(d) = opts.min_interval {
            p.min_interval = d;
        }
        p.max_records = opts.max_records;
        if let Some(b) = opts.prefetch_bytes {
            p.prefetch_bytes = b;
        }
        Some(p)
    };
    // ListShards on the loaded stream (the worker lists shards at start; the plain loop is
    // given the shard ids).
    let t = Instant::now();
    AwsKinesis::new(kc.clone()).list_shards(stream).await?;
    println!(
        "local: ListShards on the loaded stream took {}",
        fmt_dur(t.elapsed())
    );
    let mut result = LocalResult {
        records: total,
        load,
        plain: Vec::new(),
        worker: Vec::new(),
    };
    let rec = Recorder::new();
    for round in 0..opts.rounds {
        // Alternate the order so neither side always runs on a warmer server.
        for side in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            settle(&kc, stream).await;
            if side == 0 {
                let (n, d) = plain_loop(
                    &kc,
                    stream,
                    &shard_ids,
                    opts.per_shard as u64,
                    opts.max_records,
                )
                .await?;
                ensure!(n == total, "plain loop read {n} of {total}");
                println!(
                    "local: round {round}: plain GetRecords loop: {n} records in {} ({})",
                    fmt_dur(d),
                    fmt_rate(n as f64 / d.as_secs_f64())
                );
                result.plain.push(d);
            } else {
                let app = unique_name("bench-tp");
                // The table exists before the clock starts (as for a worker restarted on an
                // existing application); run() still checks it.
                DynamoLeaseStore::new(dc.clone(), &app)
                    .ensure_table()
                    .await?;
                let w = worker_run(
                    &kc,
                    &dc,
                    stream,
                    &app,
                    total,
                    polling.clone(),
                    &rec,
                    Duration::from_secs(600),
                )
                .await?;
                println!(
                    "local: round {round}: worker: {total} records in {} ({}); first record after {}; \
                     start-up (to the first GetShardIterator) {}, reading {} ({})",
                    fmt_dur(w.elapsed),
                    fmt_rate(total as f64 / w.elapsed.as_secs_f64()),
                    fmt_dur(w.first),
                    fmt_dur(w.startup),
                    fmt_dur(w.reading()),
                    fmt_rate(total as f64 / w.reading().as_secs_f64()),
                );
                print_calls("local:", &rec);
                result.worker.push(w);
            }
        }
    }
    Ok(result)
}

/// Waits until kinesis-local is idle again: after serving tens of megabytes it stays busy for
/// seconds (garbage collection), and whichever run comes next would pay for it. Idle = a
/// ListShards answered within 150 ms, three times in a row (at most 30 s).
async fn settle(kc: &aws_sdk_kinesis::Client, stream: &str) {
    let api = AwsKinesis::new(kc.clone());
    let t = Instant::now();
    let mut quick = 0;
    while quick < 3 && t.elapsed() < Duration::from_secs(30) {
        let call = Instant::now();
        let _ = api.list_shards(stream).await;
        if call.elapsed() < Duration::from_millis(150) {
            quick += 1;
        } else {
            quick = 0;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("local: server settled in {}", fmt_dur(t.elapsed()));
}

// ---------------------------------------------------------------------------------------------
// Benchmark 3: time from run() to the first record.

#[derive(Debug, Clone)]
pub struct StartupOpts {
    pub shards: u32,
    pub repeats: usize,
    pub moto: bool,
}

#[derive(Debug, Clone)]
pub struct StartupRow {
    pub backend: &'static str,
    pub case: StartupCase,
    pub samples: Vec<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartupCase {
    /// No table: `ensure_table` creates it.
    Cold,
    /// The table exists, empty.
    TableEmpty,
    /// The table exists with this application's leases, released by a previous graceful run.
    Restart,
}

impl StartupCase {
    pub fn label(self) -> &'static str {
        match self {
            Self::Cold => "cold (table created)",
            Self::TableEmpty => "table present, no leases",
            Self::Restart => "table present, released leases (restart)",
        }
    }
    pub fn target(self) -> Duration {
        match self {
            Self::Cold => Duration::from_secs(3),
            _ => Duration::from_secs(1),
        }
    }
}

impl StartupRow {
    pub fn median(&self) -> Duration {
        let mut s = self.samples.clone();
        s.sort();
        s.get(s.len() / 2).copied().unwrap_or_default()
    }
    pub fn max(&self) -> Duration {
        self.samples.iter().copied().max().unwrap_or_default()
    }
}

pub async fn startup(opts: &StartupOpts) -> anyhow::Result<Vec<StartupRow>> {
    let kinesis = kinesis_server::start_kinesis_local().await?;
    let kc = kinesis_server::kinesis_client(&kinesis).await;
    let mut rows = Vec::new();
    let mut backends: Vec<&'static str> = vec!["dynalite"];
    if opts.moto {
        backends.push("moto");
    }
    for backend in backends {
        let server = match backend {
            "dynalite" => dynamo_servers::start_dynalite().await?,
            _ => dynamo_servers::start_moto().await?,
        };
        let dc = dynamo_client(&server).await;
        // A stream per backend: a few 1 KiB records in every shard.
        let stream = unique_name("bench-startup");
        kinesis_server::create_stream(&kc, &stream, opts.shards).await?;
        let ranges = shard_ranges(&kc, &stream).await?;
        let keys = keys_per_shard(&ranges, 64, "s");
        let mut next_key = 0;
        let mut put_round = |n: usize| {
            let r = records_for(&keys, next_key, next_key + n, 1024);
            next_key += n;
            r
        };
        let mut in_stream = 0u64;
        let first = put_round(4);
        in_stream += first.len() as u64;
        kinesis_server::put_records(&kc, &stream, first).await?;

        let mut samples: BTreeMap<u8, Vec<Duration>> = BTreeMap::new();
        let rec = Recorder::new();
        let timeout = Duration::from_secs(120);
        for rep in 0..opts.repeats {
            // Cold: nothing exists; run() creates the table.
            let app = unique_name("bench-st");
            let w = worker_run(&kc, &dc, &stream, &app, in_stream, None, &rec, timeout).await?;
            println!(
                "startup: {backend}: rep {rep}: {}: first record after {}",
                StartupCase::Cold.label(),
                fmt_dur(w.first)
            );
            if rep == 0 {
                print_calls(&format!("startup: {backend}:"), &rec);
            }
            samples.entry(0).or_default().push(w.first);

            // Restart on the same table: new records after the checkpoints.
            let more = put_round(1);
            let n_more = more.len() as u64;
            in_stream += n_more;
            kinesis_server::put_records(&kc, &stream, more).await?;
            let w = worker_run(&kc, &dc, &stream, &app, n_more, None, &rec, timeout).await?;
            println!(
                "startup: {backend}: rep {rep}: {}: first record after {}",
                StartupCase::Restart.label(),
                fmt_dur(w.first)
            );
            if rep == 0 {
                print_calls(&format!("startup: {backend}:"), &rec);
            }
            samples.entry(2).or_default().push(w.first);

            // Table present, no leases yet.
            let app = unique_name("bench-st");
            DynamoLeaseStore::new(dc.clone(), &app)
                .ensure_table()
                .await?;
            let w = worker_run(&kc, &dc, &stream, &app, in_stream, None, &rec, timeout).await?;
            println!(
                "startup: {backend}: rep {rep}: {}: first record after {}",
                StartupCase::TableEmpty.label(),
                fmt_dur(w.first)
            );
            samples.entry(1).or_default().push(w.first);
        }
        for (i, case) in [
            StartupCase::Restart,
            StartupCase::TableEmpty,
            StartupCase::Cold,
        ]
        .into_iter()
        .enumerate()
        {
            let idx = [2u8, 1, 0][i];
            rows.push(StartupRow {
                backend,
                case,
                samples: samples.remove(&idx).unwrap_or_default(),
            });
        }
    }
    Ok(rows)
}
