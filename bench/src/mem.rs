//! Benchmark 1: records/s through the whole worker on the in-memory backends, one core.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use kcl::retrieval::IteratorPosition;
use kcl::testkit::{MemBackends, MemLeaseStore};
use kcl::{KinesisApi, PollingConfig, Worker};

use crate::probe::{
    fmt_dur, fmt_rate, process_cpu_time, Probe, Recorder, TimedKinesis, TimedStore,
};

#[derive(Debug, Clone)]
pub struct MemOpts {
    pub shards: usize,
    pub per_shard: usize,
    pub record_size: usize,
    pub min_interval: Duration,
    pub idle_interval: Duration,
    pub max_records: u32,
    /// Also time a plain MemKinesis GetRecords loop on the same data.
    pub plain: bool,
    /// Worker runs over the same data (the one with the least CPU time is reported).
    pub repeats: usize,
}

#[derive(Debug)]
pub struct MemResult {
    pub records: u64,
    pub load: Duration,
    /// `run()` to the last record checkpointed.
    pub elapsed: Duration,
    /// First record delivered to the last one checkpointed.
    pub steady: Duration,
    /// CPU time of the process during the run.
    pub cpu: Duration,
    /// CPU time inside `MemKinesis::get_records` (the in-memory backend building records).
    pub backend_cpu: Duration,
    /// The plain MemKinesis loop: records/s by wall time, records per CPU-second, wall time.
    pub plain: Option<(f64, f64, Duration)>,
}

impl MemResult {
    pub fn rate(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }
    pub fn cpu_rate(&self) -> f64 {
        self.records as f64 / self.cpu.as_secs_f64()
    }
}

/// Runs on a current-thread runtime (one core).
pub fn run(opts: &MemOpts) -> anyhow::Result<MemResult> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the current-thread runtime")?;
    rt.block_on(run_async(opts))
}

async fn run_async(opts: &MemOpts) -> anyhow::Result<MemResult> {
    let stream = "bench";
    let backends = MemBackends::new();
    let k = backends.kinesis().clone();
    k.create_stream(stream, opts.shards);
    let shards = k.list_shards(stream).await?;
    // One payload buffer shared by every record (MemKinesis hands out `Bytes` clones anyway,
    // so the worker's per-record work is the same; it keeps 800 MB out of RSS).
    let data = Bytes::from(crate::probe::payload(opts.record_size, 7));
    let total = (opts.shards * opts.per_shard) as u64;
    let t = Instant::now();
    for j in 0..opts.per_shard {
        for s in &shards {
            // An explicit hash key inside the shard: exactly `per_shard` records each.
            k.put_with_hash(
                stream,
                &format!("key-{j}"),
                s.hash_range.start(),
                data.clone(),
            );
        }
    }
    let load = t.elapsed();
    ensure!(k.record_count(stream) as u64 == total, "preload count");
    println!(
        "mem: preloaded {} shards x {} records of {} B in {}",
        opts.shards,
        opts.per_shard,
        opts.record_size,
        fmt_dur(load)
    );

    let mut polling = PollingConfig::default();
    polling.min_interval = opts.min_interval;
    polling.idle_interval = opts.idle_interval;
    polling.max_records = opts.max_records;
    // Each repeat reads the same stream from TRIM_HORIZON with a fresh lease table; the run
    // with the least CPU time is reported (the others were disturbed more by the machine).
    let mut best: Option<(Duration, Duration, Duration, Duration)> = None;
    for rep in 0..opts.repeats.max(1) {
        let rec = Recorder::new();
        let kinesis = Arc::new(TimedKinesis {
            inner: Arc::new(k.clone()),
            rec: rec.clone(),
        });
        let store = Arc::new(TimedStore {
            inner: Arc::new(MemLeaseStore::new()),
            rec: rec.clone(),
        });
        let probe = Probe::new(total);
        let worker = Worker::builder()
            .application_name("bench-app")
            .stream(stream)
            .worker_id("bench-worker")
            .kinesis(kinesis)
            .lease_store(store)
            .polling(polling.clone())
            .processor(probe.processor())
            .build()?;
        let stop = worker.shutdown_handle();
        let cpu0 = process_cpu_time();
        let t0 = Instant::now();
        rec.reset(t0);
        let running = tokio::spawn(worker.run());
        tokio::time::timeout(Duration::from_secs(600), probe.all_records())
            .await
            .context("the worker did not deliver every record within 600 s")?;
        let cpu = process_cpu_time() - cpu0;
        let last = probe.last().context("done without a last record")?;
        let first = probe.first().context("done without a first record")?;
        let calls = rec.summary();
        stop.shutdown();
        running.await.context("worker panicked")??;
        ensure!(
            probe.records() == total,
            "delivered {} of {total}",
            probe.records()
        );

        let elapsed = last - t0;
        let steady = last - first;
        println!(
            "mem: run {rep}: worker delivered {total} records in {} ({}); first record after {}; \
             {} batches; CPU {} ({} per CPU-second)",
            fmt_dur(elapsed),
            fmt_rate(total as f64 / elapsed.as_secs_f64()),
            fmt_dur(first - t0),
            probe.batches(),
            fmt_dur(cpu),
            fmt_rate(total as f64 / cpu.as_secs_f64()),
        );
        println!(
            "mem:   time inside NoopProcessor::process_records (checkpoint): {} wall",
            fmt_dur(probe.process_time())
        );
        for (op, s) in &calls {
            println!(
                "mem:   {op:<28} {:>5} calls {:>8} items  wall {:>8}  CPU {:>8}  max {:>7}",
                s.calls,
                s.items,
                fmt_dur(s.total),
                fmt_dur(s.cpu),
                fmt_dur(s.max)
            );
        }
        let backend_cpu = calls
            .get("kinesis.get_records")
            .map_or(Duration::ZERO, |s| s.cpu);
        if best.is_none_or(|b| cpu < b.1) {
            best = Some((elapsed, cpu, steady, backend_cpu));
        }
    }
    let (elapsed, cpu, steady, backend_cpu) = best.context("no run")?;

    if !opts.plain {
        return Ok(MemResult {
            records: total,
            load,
            elapsed,
            steady,
            cpu,
            backend_cpu,
            plain: None,
        });
    }
    // The backend alone: the same GetRecords calls in a plain loop, shard after shard.
    let cpu0 = process_cpu_time();
    let t = Instant::now();
    let mut n = 0u64;
    for s in &shards {
        let mut it = k
            .get_shard_iterator(stream, &s.id, &IteratorPosition::TrimHorizon)
            .await?;
        loop {
            let out = k.get_records(&it, opts.max_records).await?;
            n += out.records.len() as u64;
            if out.records.is_empty() {
                break;
            }
            match out.next_iterator {
                Some(next) => it = next,
                None => break,
            }
        }
    }
    let plain_elapsed = t.elapsed();
    let plain_cpu = process_cpu_time() - cpu0;
    ensure!(n == total, "plain loop read {n} of {total}");
    let plain_rate = n as f64 / plain_elapsed.as_secs_f64();
    let plain_cpu_rate = n as f64 / plain_cpu.as_secs_f64();
    println!(
        "mem: plain MemKinesis GetRecords loop (no worker, limit {}): {n} records in {} ({}); \
         CPU {} ({} per CPU-second)",
        opts.max_records,
        fmt_dur(plain_elapsed),
        fmt_rate(plain_rate),
        fmt_dur(plain_cpu),
        fmt_rate(plain_cpu_rate)
    );
    Ok(MemResult {
        records: total,
        load,
        elapsed,
        steady,
        cpu,
        backend_cpu,
        plain: Some((plain_rate, plain_cpu_rate, plain_elapsed)),
    })
}
