//! Run with: `cargo run -p kcl-examples --example multi_stream`
//!
//! One application, two streams, one lease table, no set-up: two in-memory streams (`orders`
//! and `refunds`, whose shards have the same ids) are read by two workers sharing an in-memory
//! lease table. `orders` is split and `refunds` merged while they run. The report shows, per
//! stream: every record processed, per-key order kept across the reshards, and every lease
//! named `account:stream:creationEpoch:shardId` as the Java KCL's multi-stream mode names it.
//! It exits non-zero if a check fails; the test suite runs it too
//! (`integration-tests/tests/multi_stream/example.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use kcl::testkit::MemBackends;
use kcl::{
    async_trait, Checkpointer, Lease, ProcessorError, RecordBatch, RecordProcessor, ShardContext,
    Worker,
};
use tokio::time::Instant;

const STREAMS: [&str; 2] = ["orders", "refunds"];
const KEYS: usize = 20;
const RECORDS: usize = 4_000;

/// One delivery: the record `n` of key `key` of `stream`, in global delivery order.
#[derive(Debug, Clone)]
struct Delivery {
    stream: String,
    key: usize,
    n: usize,
}

type Log = Arc<Mutex<Vec<Delivery>>>;

/// One processor per shard of either stream: `initialize` says which stream.
struct Recorder {
    stream: String,
    log: Log,
}

impl Recorder {
    fn record(&self, batch: &RecordBatch) -> Result<(), ProcessorError> {
        let mut log = self
            .log
            .lock()
            .map_err(|_| ProcessorError::fatal("log poisoned"))?;
        for r in batch {
            let text = std::str::from_utf8(&r.data).map_err(ProcessorError::fatal)?;
            let (key, n) = text
                .split_once('/')
                .ok_or_else(|| ProcessorError::fatal(format!("bad payload {text:?}")))?;
            log.push(Delivery {
                stream: self.stream.clone(),
                key: key.parse().map_err(ProcessorError::fatal)?,
                n: n.parse().map_err(ProcessorError::fatal)?,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl RecordProcessor for Recorder {
    async fn initialize(&mut self, shard: &ShardContext) -> Result<(), ProcessorError> {
        self.stream = shard.stream.clone();
        Ok(())
    }

    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        self.record(batch)?;
        cp.checkpoint().await.map_err(ProcessorError::retryable)
    }
}

fn worker(backends: &MemBackends, name: &str, log: &Log) -> anyhow::Result<Worker> {
    let log = log.clone();
    Ok(Worker::builder()
        .application_name("billing")
        .streams(STREAMS)
        .worker_id(name)
        .backends(backends.clone())
        .lease_duration(Duration::from_secs(3))
        .taker_interval(Duration::from_millis(250))
        .parent_poll_interval(Duration::from_millis(100))
        .processor(move || Recorder {
            stream: String::new(),
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
    report.check()
}

/// Runs the demo; returns the report.
pub async fn run() -> anyhow::Result<Report> {
    let started = Instant::now();
    let backends = MemBackends::new();
    let kinesis = backends.kinesis().clone();
    for stream in STREAMS {
        kinesis.create_stream(stream, 2);
    }
    let log: Log = Arc::default();
    let producer = {
        let kinesis = kinesis.clone();
        tokio::spawn(async move {
            for i in 0..RECORDS {
                let key = i % KEYS;
                for stream in STREAMS {
                    kinesis.put(
                        stream,
                        &format!("customer-{key}"),
                        format!("{key}/{}", i / KEYS),
                    );
                }
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
    let run_b = tokio::spawn(b.run());

    // Reshard both streams while they are read.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut orders = kcl::KinesisApi::list_shards(&kinesis, "orders").await?;
    orders.sort_by_key(|s| s.hash_range.start());
    let s0 = &orders[0];
    kinesis.split(
        "orders",
        &s0.id,
        s0.hash_range.start() + (s0.hash_range.end() - s0.hash_range.start()) / 2,
    );
    let mut refunds = kcl::KinesisApi::list_shards(&kinesis, "refunds").await?;
    refunds.sort_by_key(|s| s.hash_range.start());
    kinesis.merge("refunds", &refunds[0].id, &refunds[1].id);

    producer.await.context("producer")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let distinct = distinct(&log.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
        if STREAMS
            .iter()
            .all(|s| distinct.get(s).copied() == Some(RECORDS))
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("after 60 s only {distinct:?} of {RECORDS} records per stream");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_a.shutdown();
    stop_b.shutdown();
    run_a.await??;
    run_b.await??;
    let log = log.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    Ok(Report::new(
        &log,
        backends.leases().leases(),
        started.elapsed(),
    ))
}

/// Distinct records processed, per stream.
fn distinct(log: &[Delivery]) -> BTreeMap<&'static str, usize> {
    STREAMS
        .iter()
        .map(|s| {
            let records: BTreeSet<(usize, usize)> = log
                .iter()
                .filter(|d| d.stream == *s)
                .map(|d| (d.key, d.n))
                .collect();
            (*s, records.len())
        })
        .collect()
}

/// What the demo saw.
pub struct Report {
    /// Distinct records processed, per stream.
    pub distinct: BTreeMap<&'static str, usize>,
    /// Records delivered before an earlier record of their key (of the same stream).
    pub order_violations: usize,
    /// The lease table after shutdown.
    pub leases: Vec<Lease>,
    /// How long the demo ran.
    pub elapsed: Duration,
}

impl Report {
    fn new(log: &[Delivery], leases: Vec<Lease>, elapsed: Duration) -> Self {
        let mut first: BTreeMap<(&str, usize, usize), usize> = BTreeMap::new();
        for (i, d) in log.iter().enumerate() {
            first.entry((&d.stream, d.key, d.n)).or_insert(i);
        }
        let order_violations = first
            .iter()
            .filter(|((s, k, n), i)| {
                *n > 0 && first.get(&(*s, *k, n - 1)).is_none_or(|prev| prev > *i)
            })
            .count();
        Self {
            distinct: distinct(log),
            order_violations,
            leases,
            elapsed,
        }
    }

    /// The guarantees the demo shows: (what, held).
    pub fn checks(&self) -> Vec<(&'static str, bool)> {
        let names: BTreeSet<String> = self
            .leases
            .iter()
            .filter_map(|l| l.key.stream().map(|s| s.name().to_owned()))
            .collect();
        vec![
            (
                "every record of both streams processed",
                STREAMS
                    .iter()
                    .all(|s| self.distinct.get(s) == Some(&RECORDS)),
            ),
            (
                "per-key order held in each stream",
                self.order_violations == 0,
            ),
            (
                "every lease named account:stream:epoch:shardId",
                self.leases.iter().all(|l| l.key.stream().is_some()),
            ),
            (
                "both streams have leases in the one table",
                names.len() == STREAMS.len(),
            ),
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
        println!("kcl multi-stream: 2 in-memory streams, 1 lease table, 2 workers, a split and a merge\n");
        for (stream, n) in &self.distinct {
            println!("  {stream:<10} records processed {n:>6} of {RECORDS}");
        }
        println!("\n  leases:");
        for l in &self.leases {
            println!("    {:<55} {}", l.key.as_str(), l.checkpoint);
        }
        println!();
        for (what, ok) in self.checks() {
            println!("  [{}] {what}", if ok { "ok" } else { "FAILED" });
        }
        println!("\n  took {:.1?}", self.elapsed);
    }
}
