//! Benchmark 5: a worker catching up. Every shard of a stream on ferrokinesis holds a backlog
//! (2 MB × `seconds` of records), and one worker with the default settings drains it with
//! `NoopProcessor` (checkpoint after every batch; lease table on dynalite). Reports the read
//! rate per shard (each shard's data over its first-to-last record time), the peak RSS of this
//! process while draining (`VmHWM` reset after loading), and how many calls the prefetch budget
//! held back (`kcl_prefetch_budget_limited_calls_total`, counted by a recorder of the `metrics`
//! facade installed here).
//!
//! Kinesis allows 2 MB/s of reads per shard; ferrokinesis enforces no read limit, so a rate
//! above it only says that nothing else limits the worker.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use async_trait::async_trait;
use kcl::retrieval::aws::AwsKinesis;
use kcl::testkit::NoopProcessor;
use kcl::{
    Backends, Checkpointer, KinesisApi, ProcessorError, RecordBatch, RecordProcessor, ShardContext,
    ShardId, Worker,
};
use kcl_integration_tests::{dynamo_servers, kinesis_server};
use tokio::sync::Notify;

use crate::counters;
use crate::local::{dynamo_client, keys_per_shard, records_for, shard_ranges};
use crate::many::status_field;
use crate::probe::{fmt_dur, fmt_rate, process_cpu_time};

#[derive(Debug, Clone)]
pub struct CatchupOpts {
    pub shards: u32,
    /// Seconds of backlog per shard at 2 MB/s.
    pub seconds: f64,
    pub record_size: usize,
    pub put_parallelism: usize,
    /// Stop loading after this long (a smaller backlog than asked for).
    pub load_budget: Duration,
    /// Give up draining after this long.
    pub timeout: Duration,
}

#[derive(Debug)]
pub struct CatchupResult {
    pub per_shard_loaded: usize,
    pub bytes_per_shard: u64,
    pub load: Duration,
    /// `run()` to the last record.
    pub drain: Duration,
    /// Per shard, bytes per second from its first record to its last, sorted.
    pub rates: Vec<f64>,
    /// All the data over first record (any shard) to last record (any shard), per shard.
    pub overall_rate: f64,
    /// Peak RSS while draining, and RSS before the worker started, bytes.
    pub peak_rss: u64,
    pub baseline_rss: u64,
    pub cpu: Duration,
    pub limited_calls: u64,
    pub get_records_calls: u64,
    /// Mean time from a `GetRecords` call to its answer.
    pub get_records_latency: Duration,
    /// CPU time ferrokinesis spent while the worker drained (it shares the machine).
    pub server_cpu: Option<Duration>,
}

impl CatchupResult {
    pub fn min_rate(&self) -> f64 {
        self.rates.first().copied().unwrap_or(0.0)
    }

    pub fn median_rate(&self) -> f64 {
        self.rates.get(self.rates.len() / 2).copied().unwrap_or(0.0)
    }
}

/// What one shard's processors saw.
#[derive(Debug, Default, Clone, Copy)]
struct ShardStat {
    records: u64,
    bytes: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

#[derive(Debug)]
struct Stats {
    per_shard: u64,
    shards: usize,
    by_shard: Mutex<BTreeMap<ShardId, ShardStat>>,
    done: Notify,
}

impl Stats {
    fn finished(&self) -> usize {
        self.by_shard
            .lock()
            .map(|m| m.values().filter(|s| s.records >= self.per_shard).count())
            .unwrap_or(0)
    }
}

/// `NoopProcessor` (checkpoints every batch), counting per shard.
struct PerShard {
    inner: NoopProcessor,
    stats: Arc<Stats>,
    shard: Option<ShardId>,
}

#[async_trait]
impl RecordProcessor for PerShard {
    async fn initialize(&mut self, shard: &ShardContext) -> Result<(), ProcessorError> {
        self.shard = Some(shard.shard_id.clone());
        Ok(())
    }

    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        let now = Instant::now();
        let bytes: u64 = batch.iter().map(|r| r.data.len() as u64).sum();
        if let Some(shard) = &self.shard {
            let all_done = {
                let mut m = self
                    .stats
                    .by_shard
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let s = m.entry(shard.clone()).or_default();
                s.first.get_or_insert(now);
                s.last = Some(now);
                s.records += batch.len() as u64;
                s.bytes += bytes;
                m.len() == self.stats.shards
                    && m.values().all(|s| s.records >= self.stats.per_shard)
            };
            if all_done {
                self.stats.done.notify_waiters();
            }
        }
        self.inner.process_records(batch, cp).await
    }
}

/// Resets this process's peak RSS (`VmHWM`) to its current RSS.
fn reset_peak_rss() -> anyhow::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("resetting VmHWM")
}

pub async fn run(opts: &CatchupOpts) -> anyhow::Result<CatchupResult> {
    ensure!(
        crate::ferro::installed(),
        "ferrokinesis is not installed: cargo install --root .emulators/ferrokinesis ferrokinesis@0.7.0"
    );
    let kinesis = crate::ferro::start().await?;
    let dynalite = dynamo_servers::start_dynalite().await?;
    let kc = kinesis_server::kinesis_client(&kinesis).await;
    let dc = dynamo_client(&dynalite).await;
    let stream = "bench-catchup";
    kinesis_server::create_stream(&kc, stream, opts.shards).await?;
    let ranges = shard_ranges(&kc, stream).await?;
    let wanted = ((2e6 * opts.seconds) / opts.record_size as f64).ceil() as usize;
    let keys = keys_per_shard(&ranges, wanted, "c");

    // Load in steps of 200 records per shard until done or out of budget.
    let step = 200.min(wanted);
    let mut loaded = 0;
    let t = Instant::now();
    while loaded < wanted {
        if t.elapsed() > opts.load_budget {
            println!(
                "catchup: load budget of {} spent: stopping at {loaded} records per shard",
                fmt_dur(opts.load_budget)
            );
            break;
        }
        let to = (loaded + step).min(wanted);
        let records = records_for(&keys, loaded, to, opts.record_size);
        kinesis_server::put_records_with_parallelism(&kc, stream, records, opts.put_parallelism)
            .await?;
        loaded = to;
        if loaded % 2000 == 0 || loaded == wanted {
            let done = loaded * ranges.len();
            println!(
                "catchup: loaded {done} records ({loaded}/shard) in {} ({} so far)",
                fmt_dur(t.elapsed()),
                fmt_rate(done as f64 / t.elapsed().as_secs_f64())
            );
        }
    }
    let load = t.elapsed();
    drop(keys);

    let stats = Arc::new(Stats {
        per_shard: loaded as u64,
        shards: ranges.len(),
        by_shard: Mutex::new(BTreeMap::new()),
        done: Notify::new(),
    });
    let app = kcl_integration_tests::unique_name("catchup");
    let aws = kcl::Aws::from_clients(kc.clone(), dc.clone());
    let kinesis_api: Arc<dyn KinesisApi> = Arc::new(counters::CountingKinesis {
        inner: Arc::new(AwsKinesis::new(kc.clone()).with_list_shards_page_size(1000)),
    });
    let factory = {
        let stats = stats.clone();
        move || PerShard {
            inner: NoopProcessor,
            stats: stats.clone(),
            shard: None,
        }
    };
    let worker = Worker::builder()
        .application_name(&app)
        .stream(stream)
        .kinesis(kinesis_api)
        .lease_store(aws.lease_store(&app))
        .processor(factory)
        .build()?;
    let stop = worker.shutdown_handle();
    let baseline_limited = counters::get(counters::BUDGET_LIMITED);
    let baseline_calls = counters::get(counters::GET_RECORDS);
    let baseline_nanos = counters::get(counters::GET_RECORDS_NANOS);
    let server_cpu0 = counters::server_cpu("ferrokinesis", kinesis.port);
    reset_peak_rss()?;
    let baseline_rss = status_field("VmRSS:").unwrap_or(0);
    let cpu0 = process_cpu_time();
    let t0 = Instant::now();
    let running = tokio::spawn(worker.run());
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    let waited = tokio::time::timeout(opts.timeout, async {
        loop {
            let done = stats.done.notified();
            tokio::select! {
                _ = done => return,
                _ = ticker.tick() => {
                    let finished = stats.finished();
                    if finished == ranges.len() {
                        return;
                    }
                    println!(
                        "catchup: {} shards drained after {}, RSS {:.1} MiB",
                        finished,
                        fmt_dur(t0.elapsed()),
                        status_field("VmRSS:").unwrap_or(0) as f64 / 1048576.0
                    );
                }
            }
        }
    })
    .await;
    let drain = t0.elapsed();
    let cpu = process_cpu_time().saturating_sub(cpu0);
    let server_cpu = counters::server_cpu("ferrokinesis", kinesis.port)
        .zip(server_cpu0)
        .map(|(now, before)| now.saturating_sub(before));
    let peak_rss = status_field("VmHWM:").unwrap_or(0);
    stop.shutdown();
    let joined = running.await.context("worker panicked")?;
    if waited.is_err() {
        bail!(
            "{} of {} shards drained in {:?} (run: {joined:?})",
            stats.finished(),
            ranges.len(),
            opts.timeout
        );
    }
    joined?;
    let by_shard = stats.by_shard.lock().map(|m| m.clone()).unwrap_or_default();
    let mut rates: Vec<f64> = by_shard
        .values()
        .filter_map(|s| {
            let span = s.last?.duration_since(s.first?).as_secs_f64();
            (span > 0.0).then(|| s.bytes as f64 / span)
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    let first = by_shard.values().filter_map(|s| s.first).min();
    let last = by_shard.values().filter_map(|s| s.last).max();
    let bytes: u64 = by_shard.values().map(|s| s.bytes).sum();
    let overall_rate = match (first, last) {
        (Some(f), Some(l)) if l > f => {
            bytes as f64 / l.duration_since(f).as_secs_f64() / ranges.len() as f64
        }
        _ => 0.0,
    };
    Ok(CatchupResult {
        per_shard_loaded: loaded,
        bytes_per_shard: (loaded * opts.record_size) as u64,
        load,
        drain,
        rates,
        overall_rate,
        peak_rss,
        baseline_rss,
        cpu,
        limited_calls: counters::get(counters::BUDGET_LIMITED) - baseline_limited,
        get_records_calls: counters::get(counters::GET_RECORDS) - baseline_calls,
        get_records_latency: Duration::from_nanos(
            (counters::get(counters::GET_RECORDS_NANOS) - baseline_nanos)
                .checked_div(counters::get(counters::GET_RECORDS) - baseline_calls)
                .unwrap_or(0),
        ),
        server_cpu,
    })
}
