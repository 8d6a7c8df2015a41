//! Run with: `cargo run --example parallel`
//!
//! Ordered parallelism by partition key, in memory (no AWS): one shard, 200 partition keys,
//! 3 000 records; a handler that waits 10 ms per record (a call to a slow service) runs
//! through `OrderedParallel` with concurrency 32 under a `Worker`. Some records fail once and
//! are retried by the error policy. The report shows every record handled, each key's records
//! handled one at a time in production order, every checkpoint within the contiguous prefix of
//! completed records, the final checkpoint at the last record, and the speed-up over handling
//! the records one at a time. Exits non-zero if a check fails; the test suite runs it too
//! (`integration-tests/tests/parallel/example.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use kcl::processor::parallel::{OrderedParallel, RecordContext, RecordHandler};
use kcl::testkit::MemBackends;
use kcl::{async_trait, ErrorPolicy, ExtendedSequenceNumber, ProcessorError, Record, Worker};
use tokio::time::Instant;

const KEYS: usize = 200;
const RECORDS: usize = 3_000;
const DELAY: Duration = Duration::from_millis(10);
const CONCURRENCY: usize = 32;

/// What the handler saw.
#[derive(Default)]
struct Seen {
    /// Per key: the next record number expected, and whether one is running.
    keys: HashMap<String, (usize, bool)>,
    /// Per record (production index): its position once seen, whether it completed.
    positions: Vec<Option<ExtendedSequenceNumber>>,
    done: Vec<bool>,
    /// Records completed from the first one on, without a gap.
    prefix: usize,
    completed: usize,
    order_violations: usize,
    checkpoint_violations: usize,
    checkpoints: usize,
    retries: usize,
}

struct SlowService {
    seen: Arc<Mutex<Seen>>,
    attempts: AtomicUsize,
}

#[async_trait]
impl RecordHandler for SlowService {
    async fn handle(&self, record: &Record, ctx: &RecordContext) -> Result<(), ProcessorError> {
        // Payload "key/n/i": the n-th record of the key, the i-th produced.
        let text = std::str::from_utf8(&record.data).map_err(ProcessorError::fatal)?;
        let parts: Vec<&str> = text.split('/').collect();
        let [key, n, i] = parts[..] else {
            return Err(ProcessorError::fatal(format!("bad payload {text:?}")));
        };
        let n: usize = n.parse().map_err(ProcessorError::fatal)?;
        let i: usize = i.parse().map_err(ProcessorError::fatal)?;
        {
            let mut seen = self
                .seen
                .lock()
                .map_err(|_| ProcessorError::fatal("poisoned"))?;
            let (next, running) = seen.keys.entry(key.to_owned()).or_default();
            if *running || *next != n {
                seen.order_violations += 1;
            }
            seen.keys.insert(key.to_owned(), (n, true));
            seen.positions[i] = Some(record.position());
        }
        self.attempts.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(DELAY).await;
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| ProcessorError::fatal("poisoned"))?;
        // Every 97th record fails at its first attempt: retried, its key waits meanwhile.
        if i % 97 == 13 && ctx.attempt == 1 {
            seen.retries += 1;
            seen.keys.insert(key.to_owned(), (n, false));
            return Err(ProcessorError::retryable("the service said: try again"));
        }
        seen.keys.insert(key.to_owned(), (n + 1, false));
        if !seen.done[i] {
            seen.done[i] = true;
            seen.completed += 1;
        }
        while seen.done.get(seen.prefix).copied().unwrap_or(false) {
            seen.prefix += 1;
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let report = run().await?;
    report.print();
    report.check()
}

/// Runs the demo and returns its report.
pub async fn run() -> anyhow::Result<Report> {
    let backends = MemBackends::new();
    backends.kinesis().create_stream("payments", 1);
    for i in 0..RECORDS {
        let key = i % KEYS;
        backends.kinesis().put(
            "payments",
            &format!("account-{key}"),
            format!("account-{key}/{}/{i}", i / KEYS),
        );
    }
    let seen = Arc::new(Mutex::new(Seen {
        positions: vec![None; RECORDS],
        done: vec![false; RECORDS],
        ..Seen::default()
    }));
    let service = Arc::new(SlowService {
        seen: seen.clone(),
        attempts: AtomicUsize::new(0),
    });
    let on_checkpoint = {
        let seen = seen.clone();
        move |_: &kcl::ShardId, pos: &ExtendedSequenceNumber| {
            if let Ok(mut s) = seen.lock() {
                s.checkpoints += 1;
                // The checkpoint may not pass the last record of the completed prefix.
                let limit = s.prefix.checked_sub(1).and_then(|i| s.positions[i].clone());
                if limit.is_none_or(|l| *pos > l) {
                    s.checkpoint_violations += 1;
                }
            }
        }
    };
    let factory = OrderedParallel::builder(service.clone())
        .concurrency(CONCURRENCY)
        .error_policy(ErrorPolicy::Retry {
            min_delay: Duration::from_millis(20),
            max_delay: Duration::from_secs(1),
        })
        .checkpoint_every(Some(Duration::from_millis(200)))
        .tick(Duration::from_millis(100))
        .on_checkpoint(on_checkpoint)
        .factory()?;
    let mut polling = kcl::PollingConfig::default();
    polling.min_interval = Duration::from_millis(10);
    polling.idle_interval = Duration::from_millis(10);
    let worker = Worker::builder()
        .application_name("parallel-demo")
        .stream("payments")
        .worker_id("worker-a")
        .backends(backends.clone())
        .polling(polling)
        .processor(factory)
        .build()?;
    let stop = worker.shutdown_handle();
    let started = Instant::now();
    let running = tokio::spawn(worker.run());
    let deadline = started + Duration::from_secs(60);
    loop {
        let completed = seen
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .completed;
        if completed == RECORDS {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {completed} of {RECORDS} records completed after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    stop.shutdown();
    running.await.context("worker")??;
    let lease = backends.leases().leases().remove(0);
    let seen = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    Ok(Report {
        completed: seen.completed,
        attempts: service.attempts.load(Ordering::Relaxed),
        retries: seen.retries,
        order_violations: seen.order_violations,
        checkpoints: seen.checkpoints,
        checkpoint_violations: seen.checkpoint_violations,
        final_at_last: seen.positions.last().cloned().flatten() == Some(lease.checkpoint),
        elapsed,
    })
}

/// What the demo saw.
pub struct Report {
    /// Records completed (distinct).
    pub completed: usize,
    /// Handler calls, retries included.
    pub attempts: usize,
    /// Failed first attempts, retried.
    pub retries: usize,
    /// Records started while their key had one running, or out of their key's order.
    pub order_violations: usize,
    /// Checkpoints the adapter stored.
    pub checkpoints: usize,
    /// Checkpoints beyond the contiguous completed prefix.
    pub checkpoint_violations: usize,
    /// The checkpoint after shutdown is the last record.
    pub final_at_last: bool,
    /// First record to last completion (start-up included).
    pub elapsed: Duration,
}

impl Report {
    /// How much faster than one record at a time (which takes at least `RECORDS × DELAY`).
    pub fn speed_up(&self) -> f64 {
        (RECORDS as f64 * DELAY.as_secs_f64()) / self.elapsed.as_secs_f64()
    }

    /// The guarantees the demo shows: (what, held).
    pub fn checks(&self) -> Vec<(&'static str, bool)> {
        vec![
            ("every record handled", self.completed == RECORDS),
            (
                "per-key order held, one record per key at a time",
                self.order_violations == 0,
            ),
            (
                "checkpoints within the completed prefix",
                self.checkpoint_violations == 0,
            ),
            ("final checkpoint at the last record", self.final_at_last),
            (
                "failed records retried",
                self.retries > 0 && self.attempts == RECORDS + self.retries,
            ),
            (
                "faster than one at a time by 10x or more",
                self.speed_up() >= 10.0,
            ),
        ]
    }

    /// `Err` naming the failed checks, if any.
    pub fn check(&self) -> anyhow::Result<()> {
        let failed: Vec<&str> = self
            .checks()
            .into_iter()
            .filter(|(_, ok)| !ok)
            .map(|(what, _)| what)
            .collect();
        if !failed.is_empty() {
            bail!("a check failed (see the report above): {failed:?}");
        }
        Ok(())
    }

    /// Prints the report.
    pub fn print(&self) {
        println!(
            "kcl OrderedParallel: in-memory stream, 1 shard, {KEYS} keys, {} ms per record, concurrency {CONCURRENCY}\n",
            DELAY.as_millis()
        );
        println!("  records produced             {RECORDS:>8}");
        println!("  records handled              {:>8}", self.completed);
        println!(
            "  handler calls                {:>8}  ({} failed once and were retried)",
            self.attempts, self.retries
        );
        println!(
            "  per-key order violations     {:>8}",
            self.order_violations
        );
        println!(
            "  checkpoints stored           {:>8}  ({} beyond the completed prefix)",
            self.checkpoints, self.checkpoint_violations
        );
        println!(
            "  elapsed                      {:>7.2}s  (one at a time: >= {:.1} s)",
            self.elapsed.as_secs_f64(),
            RECORDS as f64 * DELAY.as_secs_f64()
        );
        println!("  speed-up                     {:>7.1}x\n", self.speed_up());
        for (what, ok) in self.checks() {
            println!("  {} {what}", if ok { "ok    " } else { "FAILED" });
        }
    }
}
