//! Run with: `cargo run --example quickstart`
//!
//! Zero set-up: an in-memory Kinesis stream with 4 shards and an in-memory lease table. A
//! producer writes records for 40 partition keys while two workers share the stream; the stream
//! is split and merged while they run. The report shows the library's guarantees holding (see docs/architecture.md):
//! every produced record processed (at least once), per-key order kept across the reshards, and
//! child shards started only after their parents finished; it exits non-zero if a check
//! fails. The test suite runs it too (`integration-tests/tests/quickstart.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use kcl::testkit::MemBackends;
use kcl::{
    async_trait, Checkpointer, ExtendedSequenceNumber, Lease, ProcessorError, RecordBatch,
    RecordProcessor, ShardId, Worker,
};
use tokio::time::Instant;

const KEYS: usize = 40;
const RECORDS: usize = 20_000;

/// One delivery: which worker saw which record of which shard, in global delivery order.
#[derive(Debug, Clone)]
struct Delivery {
    worker: &'static str,
    shard: ShardId,
    key: usize,
    n: usize,
}

type Log = Arc<Mutex<Vec<Delivery>>>;

struct Recorder {
    worker: &'static str,
    log: Log,
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
                .lock()
                .map_err(|_| ProcessorError::fatal("log poisoned"))?;
            for r in batch {
                // Payload "key/n": the n-th record produced for that key.
                let text = std::str::from_utf8(&r.data).map_err(ProcessorError::fatal)?;
                let (key, n) = text
                    .split_once('/')
                    .ok_or_else(|| ProcessorError::fatal(format!("bad payload {text:?}")))?;
                log.push(Delivery {
                    worker: self.worker,
                    shard: batch.shard_id.clone(),
                    key: key.parse().map_err(ProcessorError::fatal)?,
                    n: n.parse().map_err(ProcessorError::fatal)?,
                });
            }
        }
        cp.checkpoint().await.map_err(ProcessorError::retryable)
    }
}

fn worker(backends: &MemBackends, name: &'static str, log: &Log) -> anyhow::Result<Worker> {
    let log = log.clone();
    Ok(Worker::builder()
        .application_name("quickstart")
        .stream("orders")
        .worker_id(name)
        .backends(backends.clone())
        .lease_duration(Duration::from_secs(3))
        .taker_interval(Duration::from_millis(250))
        .parent_poll_interval(Duration::from_millis(100))
        .max_leases_to_steal(2)
        .processor(move || Recorder {
            worker: name,
            log: log.clone(),
        })
        .build()?)
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
    // Exits non-zero when a check fails (the test suite runs this too: tests/quickstart.rs).
    report.check()
}

/// Runs the demo: produce, consume with two workers, reshard, shut down; returns the report.
pub async fn run() -> anyhow::Result<Report> {
    let started = Instant::now();
    let backends = MemBackends::new();
    let kinesis = backends.kinesis().clone();
    kinesis.create_stream("orders", 4);
    let log: Log = Arc::default();

    // Producer: RECORDS records over ~3 s, round-robin over the keys.
    let producer = {
        let kinesis = kinesis.clone();
        tokio::spawn(async move {
            for i in 0..RECORDS {
                let key = i % KEYS;
                kinesis.put(
                    "orders",
                    &format!("customer-{key}"),
                    format!("{key}/{}", i / KEYS),
                );
                if i % 200 == 199 {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            }
        })
    };

    let a = worker(&backends, "worker-a", &log)?;
    let b = worker(&backends, "worker-b", &log)?;
    let (stop_a, stop_b) = (a.shutdown_handle(), b.shutdown_handle());
    let run_a = tokio::spawn(a.run());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let run_b = tokio::spawn(b.run());

    // Reshard while both run: split shard 0, then merge shards 2 and 3.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let shards = kcl::KinesisApi::list_shards(&kinesis, "orders").await?;
    let s0 = &shards[0];
    let (c1, c2) = kinesis.split(
        "orders",
        &s0.id,
        s0.hash_range.start() + (s0.hash_range.end() - s0.hash_range.start()) / 2,
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let merged = kinesis.merge("orders", &shards[2].id, &shards[3].id);

    producer.await.context("producer")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let distinct: BTreeSet<(usize, usize)> = log
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .iter()
            .map(|d| (d.key, d.n))
            .collect();
        if distinct.len() == RECORDS {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {RECORDS} records processed after 60 s",
                distinct.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_a.shutdown();
    stop_b.shutdown();
    run_a.await??;
    run_b.await??;

    let log = log.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let lineage = [
        (c1.clone(), vec![s0.id.clone()]),
        (c2.clone(), vec![s0.id.clone()]),
        (
            merged.clone(),
            vec![shards[2].id.clone(), shards[3].id.clone()],
        ),
    ];
    Ok(Report::new(
        &log,
        &lineage,
        backends.leases().leases(),
        started.elapsed(),
    ))
}

/// What the demo saw.
pub struct Report {
    /// Distinct records processed.
    pub distinct: usize,
    /// Deliveries, duplicates included.
    pub deliveries: usize,
    /// Records delivered before an earlier record of their key.
    pub order_violations: usize,
    /// Child shards whose first record came before a parent's last.
    pub child_before_parent: usize,
    /// Deliveries per worker.
    pub per_worker: BTreeMap<&'static str, usize>,
    /// The lease table after shutdown.
    pub leases: Vec<Lease>,
    /// How long the demo ran.
    pub elapsed: Duration,
}

impl Report {
    /// The guarantees the demo shows: (what, held).
    pub fn checks(&self) -> Vec<(&'static str, bool)> {
        vec![
            ("every produced record processed", self.distinct == RECORDS),
            ("per-key order held", self.order_violations == 0),
            ("children after parents", self.child_before_parent == 0),
            (
                "every lease released at shutdown",
                self.leases.iter().all(|l| l.owner.is_none()),
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
            bail!("a guarantee was violated (see the report above): {failed:?}");
        }
        Ok(())
    }

    /// Prints the report.
    pub fn print(&self) {
        println!(
            "kcl quickstart: in-memory stream, 4 shards, 2 workers, 1 split + 1 merge while running\n"
        );
        println!("  records produced           {RECORDS:>8}");
        println!(
            "  records processed          {:>8}  (distinct)",
            self.distinct
        );
        println!(
            "  deliveries                 {:>8}  ({} duplicates, allowed by at-least-once)",
            self.deliveries,
            self.deliveries - self.distinct
        );
        println!("  per-key order violations   {:>8}", self.order_violations);
        println!(
            "  child-before-parent        {:>8}",
            self.child_before_parent
        );
        println!(
            "  records per worker         {}",
            self.per_worker
                .iter()
                .map(|(w, n)| format!("{w}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("\n  lease table after shutdown:");
        for l in &self.leases {
            let parents: Vec<_> = l.parent_shard_ids.iter().map(|p| p.as_str()).collect();
            let children: Vec<_> = l.child_shard_ids.iter().map(|p| p.as_str()).collect();
            let cp = match &l.checkpoint {
                ExtendedSequenceNumber::Sequence { sequence, .. } => format!(
                    "…{}",
                    &sequence.as_str()[sequence.as_str().len().saturating_sub(8)..]
                ),
                other => other.to_string(),
            };
            println!(
                "    {:<22} owner={:<8} checkpoint={:<12} parents={:?} children={:?}",
                l.key.as_str(),
                l.owner.as_ref().map_or("-", |o| o.as_str()),
                cp,
                parents,
                children
            );
        }
        println!("\n  finished in {:.1} s", self.elapsed.as_secs_f64());
        for (what, ok) in self.checks() {
            println!("  {} {what}", if ok { "ok    " } else { "FAILED" });
        }
    }
}

impl Report {
    fn new(
        log: &[Delivery],
        lineage: &[(ShardId, Vec<ShardId>)],
        leases: Vec<Lease>,
        elapsed: Duration,
    ) -> Self {
        // Per-key order: the first delivery of record n of a key comes after the first delivery
        // of record n-1 (redeliveries after a lease move are duplicates, not reorderings).
        let mut first_seen: BTreeMap<(usize, usize), usize> = BTreeMap::new();
        let mut per_worker = BTreeMap::new();
        for (i, d) in log.iter().enumerate() {
            first_seen.entry((d.key, d.n)).or_insert(i);
            *per_worker.entry(d.worker).or_insert(0) += 1;
        }
        let order_violations = first_seen
            .iter()
            .filter(|((k, n), i)| *n > 0 && first_seen.get(&(*k, n - 1)).is_none_or(|p| p > i))
            .count();
        // Children after parents: a child's first delivery comes after its parents' last.
        let first = |s: &ShardId| log.iter().position(|d| &d.shard == s);
        let last = |s: &ShardId| log.iter().rposition(|d| &d.shard == s);
        let child_before_parent = lineage
            .iter()
            .filter(|(child, parents)| {
                let Some(c) = first(child) else { return false };
                parents.iter().any(|p| last(p).is_some_and(|l| l > c))
            })
            .count();
        Self {
            distinct: first_seen.len(),
            deliveries: log.len(),
            order_violations,
            child_before_parent,
            per_worker,
            leases,
            elapsed,
        }
    }
}
