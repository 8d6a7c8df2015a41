//! `OrderedParallel` against kinesis-local and a dynalite lease table, through the real SDK
//! clients: a few thousand records over many keys, a handler with small random delays. Every
//! record handled, each key one record at a time in order, every checkpoint the adapter stored
//! within the contiguous prefix of completed records of its shard; then the worker crashes
//! (its task aborted) and a new one resumes exactly after the stored checkpoints, without gaps.

//!
//! The in-memory example (`examples/parallel.rs`) runs here too.

#[path = "parallel/example.rs"]
mod example;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use kcl::processor::parallel::{OrderedParallel, RecordContext, RecordHandler};
use kcl::{
    async_trait, ExtendedSequenceNumber, LeaseStore, ProcessorError, Record, ShardId, Worker,
};
use kcl_integration_tests::dynamo_servers::{lease_table, Table};
use kcl_integration_tests::scenarios::{LocalKinesis, StreamFixture};

const RECORDS: u32 = 3_000;
const KEYS: u32 = 150;

#[derive(Default)]
struct Log {
    /// Per worker and key: the last record number started, and whether one is running.
    keys: HashMap<(&'static str, String), (Option<u64>, bool)>,
    violations: Vec<String>,
    /// Completions in order: (shard, position, record index).
    completions: Vec<(ShardId, ExtendedSequenceNumber, u32)>,
    /// Checkpoints stored: (shard, position, completions so far).
    checkpoints: Vec<(ShardId, ExtendedSequenceNumber, usize)>,
    /// Records started, per worker: (shard, position).
    started: Vec<(&'static str, ShardId, ExtendedSequenceNumber)>,
}

struct Handler {
    worker: &'static str,
    log: Arc<Mutex<Log>>,
}

#[async_trait]
impl RecordHandler for Handler {
    async fn handle(&self, record: &Record, ctx: &RecordContext) -> Result<(), ProcessorError> {
        let text = std::str::from_utf8(&record.data).map_err(ProcessorError::fatal)?;
        let parts: Vec<&str> = text.split('/').collect();
        let [key, n, i] = parts[..] else {
            return Err(ProcessorError::fatal(format!("bad payload {text:?}")));
        };
        let n: u64 = n.parse().map_err(ProcessorError::fatal)?;
        let i: u32 = i.parse().map_err(ProcessorError::fatal)?;
        {
            let mut log = self.log.lock().unwrap();
            log.started
                .push((self.worker, ctx.shard_id.clone(), record.position()));
            let entry = log
                .keys
                .entry((self.worker, key.to_owned()))
                .or_insert((None, false));
            let problem = if entry.1 {
                Some(format!("{key}/{n} started while {key} had one running"))
            } else if entry.0.is_some_and(|last| n != last + 1) {
                Some(format!("{key}/{n} started after {key}/{:?}", entry.0))
            } else {
                None
            };
            *entry = (Some(n), true);
            if let Some(p) = problem {
                log.violations.push(format!("{}: {p}", self.worker));
            }
        }
        // A small pseudo-random delay, 0..16 ms.
        let jitter = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60;
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        let mut log = self.log.lock().unwrap();
        if let Some(entry) = log.keys.get_mut(&(self.worker, key.to_owned())) {
            entry.1 = false;
        }
        log.completions
            .push((ctx.shard_id.clone(), record.position(), i));
        Ok(())
    }
}

fn worker(
    id: &'static str,
    stream: &str,
    fixture: &LocalKinesis,
    leases: Arc<dyn LeaseStore>,
    log: &Arc<Mutex<Log>>,
) -> anyhow::Result<Worker> {
    let handler = Arc::new(Handler {
        worker: id,
        log: log.clone(),
    });
    let observed = log.clone();
    let factory = OrderedParallel::builder(handler)
        .concurrency(32)
        .max_buffered_records(256)
        .checkpoint_every(Some(Duration::from_millis(100)))
        .tick(Duration::from_millis(100))
        .on_checkpoint(move |shard, pos| {
            let mut log = observed.lock().unwrap();
            let done = log.completions.len();
            log.checkpoints.push((shard.clone(), pos.clone(), done));
        })
        .factory()?;
    let mut polling = kcl::PollingConfig::default();
    polling.min_interval = Duration::from_millis(50);
    polling.idle_interval = Duration::from_millis(100);
    polling.max_records = 200;
    Ok(Worker::builder()
        .application_name("parallel-app")
        .stream(stream)
        .worker_id(id)
        .kinesis(fixture.kinesis())
        .lease_store(leases)
        .lease_duration(Duration::from_secs(3))
        .taker_interval(Duration::from_millis(200))
        .polling(polling)
        .processor(factory)
        .build()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_parallel_on_kinesis_local_and_dynalite() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let kinesis = LocalKinesis::start().await?;
    let (_table_server, leases) = lease_table(Table::Dynalite).await?;
    let stream = kcl_integration_tests::unique_name("parallel");
    kinesis.create_stream(&stream, 2).await?;
    let records: Vec<(String, Vec<u8>)> = (0..RECORDS)
        .map(|i| {
            let key = i % KEYS;
            (
                format!("key-{key}"),
                format!("key-{key}/{}/{i}", i / KEYS).into_bytes(),
            )
        })
        .collect();
    kinesis.put(&stream, records).await?;
    let log = Arc::new(Mutex::new(Log::default()));
    let distinct = |log: &Arc<Mutex<Log>>| {
        let log = log.lock().unwrap();
        log.completions
            .iter()
            .map(|c| c.2)
            .collect::<BTreeSet<_>>()
            .len()
    };

    // Phase 1: run until about half completed, then crash.
    let w1 = worker("w1", &stream, &kinesis, leases.clone(), &log)?;
    let run1 = tokio::spawn(w1.run());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while distinct(&log) < (RECORDS / 2) as usize {
        ensure!(tokio::time::Instant::now() < deadline, "phase 1 too slow");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run1.abort();
    let _ = run1.await;
    // A write already sent when the task died may still land: let it, then read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let crashed_at: BTreeMap<ShardId, ExtendedSequenceNumber> = leases
        .list()
        .await?
        .leases
        .iter()
        .map(|l| (l.shard_id(), l.checkpoint.clone()))
        .collect();
    let phase1_completions = log.lock().unwrap().completions.len();

    // Phase 2: a new worker takes the expired leases and finishes.
    let w2 = worker("w2", &stream, &kinesis, leases.clone(), &log)?;
    let stop = w2.shutdown_handle();
    let run2 = tokio::spawn(w2.run());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while distinct(&log) < RECORDS as usize {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} of {RECORDS} records completed",
            distinct(&log)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.shutdown();
    run2.await.context("w2")??;
    let final_leases = leases.list().await?.leases;

    let log = log.lock().unwrap();
    ensure!(
        log.violations.is_empty(),
        "{:?}",
        &log.violations[..log.violations.len().min(5)]
    );
    // Each shard's records in order (every record completed at least once).
    let mut per_shard: BTreeMap<ShardId, BTreeSet<ExtendedSequenceNumber>> = BTreeMap::new();
    for (shard, pos, _) in &log.completions {
        per_shard
            .entry(shard.clone())
            .or_default()
            .insert(pos.clone());
    }
    ensure!(
        per_shard.len() == 2,
        "records of {} shards",
        per_shard.len()
    );
    // Every checkpoint stored: each record of its shard up to it had completed by then.
    ensure!(!log.checkpoints.is_empty(), "no checkpoint stored");
    for (shard, pos, done) in &log.checkpoints {
        let completed: BTreeSet<&ExtendedSequenceNumber> = log.completions[..*done]
            .iter()
            .filter(|c| &c.0 == shard)
            .map(|c| &c.1)
            .collect();
        let missing = per_shard[shard]
            .range(..=pos.clone())
            .find(|p| !completed.contains(p));
        ensure!(
            missing.is_none(),
            "checkpoint {pos} of {shard} stored while {missing:?} had not completed"
        );
    }
    // The restart resumed right after the crash's checkpoint: w2's first record of each shard
    // is the first one after it (no gap, nothing before it handled again).
    for (shard, records) in &per_shard {
        let cp = &crashed_at[shard];
        let first_after = match cp {
            ExtendedSequenceNumber::Sequence { .. } => {
                records.range(cp.clone()..).find(|p| *p > cp)
            }
            _ => records.iter().next(),
        };
        let w2_min = log
            .started
            .iter()
            .filter(|(w, s, _)| *w == "w2" && s == shard)
            .map(|(_, _, p)| p)
            .min();
        ensure!(
            w2_min == first_after,
            "{shard}: checkpoint at the crash {cp}, w2 started at {w2_min:?}, expected {first_after:?}"
        );
    }
    ensure!(
        phase1_completions >= (RECORDS / 2) as usize && log.completions.len() >= RECORDS as usize,
        "completions {}",
        log.completions.len()
    );
    // After the graceful stop, each shard's checkpoint is its last record.
    for l in final_leases {
        let last = per_shard[&l.shard_id()].iter().next_back();
        ensure!(
            Some(&l.checkpoint) == last,
            "{} checkpoint {}",
            l.shard_id(),
            l.checkpoint
        );
    }
    println!(
        "{} checkpoints checked; {} completions for {RECORDS} records; took {:.1?}",
        log.checkpoints.len(),
        log.completions.len(),
        started.elapsed()
    );
    Ok(())
}
