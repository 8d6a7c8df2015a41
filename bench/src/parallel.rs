//! Benchmark 7: ordered parallelism by partition key. One in-memory shard, records over
//! `keys` distinct partition keys, a handler that waits `delay` per record. The same handler
//! runs in a plain sequential `RecordProcessor` (one record after the other) and in
//! `OrderedParallel` with `concurrency`, each under a real `Worker`; records/s of both, and
//! their ratio. Every run checks per-key order (each key's records completed in production
//! order, one at a time) and, for the adapter, that every checkpoint it stored was at most the
//! contiguous prefix of completed records at the time; a violation fails the run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use async_trait::async_trait;
use kcl::processor::parallel::{OrderedParallel, RecordContext, RecordHandler};
use kcl::testkit::MemBackends;
use kcl::{
    Checkpointer, ExtendedSequenceNumber, PollingConfig, ProcessorError, ProcessorFactory, Record,
    RecordBatch, RecordProcessor, Worker,
};

#[derive(Debug, Clone)]
pub struct ParallelOpts {
    /// Records of the sequential run (it does 1 / delay records per second).
    pub sequential_records: usize,
    /// Records of the adapter's run.
    pub parallel_records: usize,
    pub keys: usize,
    pub delay: Duration,
    pub concurrency: usize,
}

#[derive(Debug)]
pub struct ParallelResult {
    pub sequential: Side,
    pub parallel: Side,
}

#[derive(Debug)]
pub struct Side {
    pub records: usize,
    /// First handler start to last completion.
    pub elapsed: Duration,
    pub checkpoints: u64,
    pub max_running: u64,
}

impl Side {
    pub fn rate(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }
}

impl ParallelResult {
    pub fn ratio(&self) -> f64 {
        self.parallel.rate() / self.sequential.rate()
    }
}

/// What the handler saw, checked as it goes.
#[derive(Default)]
struct Log {
    /// Per key: the next record number expected, and whether one is running.
    keys: HashMap<String, (u64, bool)>,
    /// Per record index: its position once seen, and whether it completed.
    seen: Vec<Option<ExtendedSequenceNumber>>,
    done: Vec<bool>,
    /// Records completed from the first, contiguously.
    prefix: usize,
    completed: usize,
    first_start: Option<Instant>,
    last_done: Option<Instant>,
    violations: Vec<String>,
}

impl Log {
    fn new(records: usize) -> Self {
        Self {
            seen: vec![None; records],
            done: vec![false; records],
            ..Self::default()
        }
    }

    fn start(&mut self, key: &str, n: u64, index: usize, pos: ExtendedSequenceNumber) {
        self.first_start.get_or_insert_with(Instant::now);
        let (next, running) = self.keys.entry(key.to_owned()).or_insert((0, false));
        if *running {
            self.violations.push(format!(
                "{key}/{n} started while {key} had a record running"
            ));
        }
        if *next != n {
            self.violations
                .push(format!("{key}/{n} started while {key}/{next} was expected"));
        }
        *running = true;
        if let Some(slot) = self.seen.get_mut(index) {
            *slot = Some(pos);
        }
    }

    fn finish(&mut self, key: &str, n: u64, index: usize) {
        if let Some((next, running)) = self.keys.get_mut(key) {
            *next = n + 1;
            *running = false;
        }
        if let Some(d) = self.done.get_mut(index) {
            if !*d {
                *d = true;
                self.completed += 1;
            }
        }
        while self.done.get(self.prefix).copied().unwrap_or(false) {
            self.prefix += 1;
        }
        self.last_done = Some(Instant::now());
    }

    /// A checkpoint was stored at `pos`: it must not pass the completed prefix.
    fn checkpointed(&mut self, pos: &ExtendedSequenceNumber) {
        let limit = self
            .prefix
            .checked_sub(1)
            .and_then(|i| self.seen[i].clone());
        let beyond = match &limit {
            Some(l) => pos > l,
            None => true,
        };
        if beyond {
            self.violations.push(format!(
                "checkpoint {pos} beyond the completed prefix ({} records, through {limit:?})",
                self.prefix
            ));
        }
    }
}

struct Handler {
    log: Arc<Mutex<Log>>,
    delay: Duration,
    running: AtomicU64,
    max_running: AtomicU64,
}

fn parse(r: &Record) -> anyhow::Result<(String, u64, usize)> {
    let text = std::str::from_utf8(&r.data)?;
    let mut parts = text.split('/');
    let (Some(k), Some(n), Some(i)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("bad payload {text:?}");
    };
    Ok((k.to_owned(), n.parse()?, i.parse()?))
}

#[async_trait]
impl RecordHandler for Handler {
    async fn handle(&self, record: &Record, _ctx: &RecordContext) -> Result<(), ProcessorError> {
        let (key, n, index) = parse(record).map_err(|e| ProcessorError::fatal(e.to_string()))?;
        self.log
            .lock()
            .map_err(|_| ProcessorError::fatal("poisoned"))?
            .start(&key, n, index, record.position());
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.log
            .lock()
            .map_err(|_| ProcessorError::fatal("poisoned"))?
            .finish(&key, n, index);
        Ok(())
    }
}

/// The same handler, one record after the other.
struct Sequential(Arc<Handler>);

#[async_trait]
impl RecordProcessor for Sequential {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        let ctx = RecordContext::new(batch.shard_id.clone(), 1);
        for r in batch {
            self.0.handle(r, &ctx).await?;
        }
        cp.checkpoint().await?;
        Ok(())
    }
}

async fn side(opts: &ParallelOpts, records: usize, parallel: bool) -> anyhow::Result<Side> {
    let backends = MemBackends::new();
    let stream = "bench-parallel";
    backends.kinesis().create_stream(stream, 1);
    for i in 0..records {
        let key = i % opts.keys;
        backends.kinesis().put(
            stream,
            &format!("key-{key}"),
            format!("key-{key}/{}/{i}", i / opts.keys),
        );
    }
    let log = Arc::new(Mutex::new(Log::new(records)));
    let handler = Arc::new(Handler {
        log: log.clone(),
        delay: opts.delay,
        running: AtomicU64::new(0),
        max_running: AtomicU64::new(0),
    });
    let checkpoints = Arc::new(AtomicU64::new(0));
    let factory: Box<dyn ProcessorFactory> = if parallel {
        let (log, checkpoints) = (log.clone(), checkpoints.clone());
        Box::new(
            OrderedParallel::builder(handler.clone())
                .concurrency(opts.concurrency)
                .max_buffered_records(4 * opts.concurrency)
                .checkpoint_every(Some(Duration::from_millis(200)))
                .tick(Duration::from_millis(100))
                .on_checkpoint(move |_, pos| {
                    checkpoints.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut l) = log.lock() {
                        l.checkpointed(pos);
                    }
                })
                .factory()?,
        )
    } else {
        let handler = handler.clone();
        Box::new(move || Sequential(handler.clone()))
    };
    let mut polling = PollingConfig::default();
    polling.min_interval = Duration::from_millis(5);
    polling.idle_interval = Duration::from_millis(5);
    polling.max_records = 1_000;
    let worker = Worker::builder()
        .application_name("bench-parallel")
        .stream(stream)
        .worker_id("bench-worker")
        .backends(backends.clone())
        .polling(polling)
        .processor(BoxedFactory(factory))
        .build()?;
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let completed = log
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .completed;
        if completed == records {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "only {completed} of {records} records completed after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.shutdown();
    running.await.context("worker panicked")??;
    let log = log.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    if !log.violations.is_empty() {
        bail!(
            "{} violations, e.g. {}",
            log.violations.len(),
            log.violations[..log.violations.len().min(3)].join("; ")
        );
    }
    // The final checkpoint covers everything: nothing is delivered again.
    let lease = backends.leases().leases();
    let last = log.seen.last().cloned().flatten();
    ensure!(
        lease.first().map(|l| l.checkpoint.clone()) == last,
        "final checkpoint {:?}, last record {last:?}",
        lease.first().map(|l| &l.checkpoint)
    );
    let (Some(first), Some(end)) = (log.first_start, log.last_done) else {
        bail!("no record handled");
    };
    Ok(Side {
        records,
        elapsed: end - first,
        checkpoints: checkpoints.load(Ordering::Relaxed),
        max_running: handler.max_running.load(Ordering::SeqCst),
    })
}

/// A boxed factory as a factory.
struct BoxedFactory(Box<dyn ProcessorFactory>);

impl ProcessorFactory for BoxedFactory {
    fn create(&self, shard: &kcl::ShardId) -> Box<dyn RecordProcessor> {
        self.0.create(shard)
    }
}

pub async fn run(opts: &ParallelOpts) -> anyhow::Result<ParallelResult> {
    let sequential = side(opts, opts.sequential_records, false).await?;
    println!(
        "   sequential: {} records in {:.2} s = {:.1} rec/s",
        sequential.records,
        sequential.elapsed.as_secs_f64(),
        sequential.rate()
    );
    let parallel = side(opts, opts.parallel_records, true).await?;
    println!(
        "   OrderedParallel x{}: {} records in {:.2} s = {:.1} rec/s, at most {} at once, {} checkpoints checked",
        opts.concurrency,
        parallel.records,
        parallel.elapsed.as_secs_f64(),
        parallel.rate(),
        parallel.max_running,
        parallel.checkpoints
    );
    Ok(ParallelResult {
        sequential,
        parallel,
    })
}
