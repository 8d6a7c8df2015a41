//! The prefetch budget bounds what a worker holds, whatever the record sizes and however many
//! leases arrive at once; and a shard whose processor is stuck does not stall the others.
//!
//! Measured two ways, through a real `Worker` on the in-memory backends:
//! - the process's heap, by a counting global allocator (this test binary's own): the in-memory
//!   Kinesis is told to hand out *copies* of its records' data, as a network client allocates
//!   them, so what the worker holds shows up as live heap above the baseline taken before the
//!   worker started (the stream's own storage is part of the baseline);
//! - the budgets' own accounting (`kcl::retrieval::prefetch_usage`).
//!
//! The tests share the process-wide allocator counters, so they run one at a time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use async_trait::async_trait;
use bytes::Bytes;
use kcl::testkit::{MemKinesis, MemLeaseStore};
use kcl::{
    Checkpointer, KinesisApi, PollingConfig, ProcessorError, RecordBatch, RecordProcessor,
    ShardContext, ShardId, Worker,
};
use tokio::sync::watch;
use tokio::time::Instant;

/// Counts the bytes allocated and not yet freed, and their peak.
struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are updated.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// One test at a time: they share the allocator's counters.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `test` alone in this process, on a runtime of its own that is shut down before the next
/// test starts (so no task of one test allocates during another's measurement).
fn serial<F: std::future::Future<Output = anyhow::Result<()>>>(test: F) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcome = rt.block_on(test);
    rt.shutdown_timeout(Duration::from_secs(10));
    outcome
}

/// Live heap now, and the peak since the last reset; the reset makes the current level the
/// peak.
fn heap() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn reset_heap_peak() -> usize {
    let now = heap();
    PEAK.store(now, Ordering::Relaxed);
    now
}

fn heap_peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

const MIB: usize = 1 << 20;

/// How a shard's processor behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// Takes `delay` per batch.
    Slow(Duration),
    /// Does not return from its first batch until released.
    Stuck,
}

/// Counts the records delivered per shard; behaves per shard as `plan` says.
#[derive(Clone)]
struct Shared {
    plan: Arc<dyn Fn(&ShardId) -> Behaviour + Send + Sync>,
    release: watch::Receiver<bool>,
    delivered: Arc<Mutex<BTreeMap<ShardId, usize>>>,
}

impl Shared {
    fn delivered(&self, shard: &ShardId) -> usize {
        self.delivered
            .lock()
            .map(|d| d.get(shard).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.delivered.lock().map(|d| d.values().sum()).unwrap_or(0)
    }
}

struct Processor {
    shared: Shared,
    shard: Option<ShardId>,
}

#[async_trait]
impl RecordProcessor for Processor {
    async fn initialize(&mut self, shard: &ShardContext) -> Result<(), ProcessorError> {
        self.shard = Some(shard.shard_id.clone());
        Ok(())
    }

    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        match (self.shared.plan)(&batch.shard_id) {
            Behaviour::Slow(d) => tokio::time::sleep(d).await,
            Behaviour::Stuck => {
                let mut release = self.shared.release.clone();
                release
                    .wait_for(|released| *released)
                    .await
                    .map_err(ProcessorError::fatal)?;
            }
        }
        self.shared
            .delivered
            .lock()
            .map_err(|_| ProcessorError::fatal("poisoned"))?
            .entry(batch.shard_id.clone())
            .and_modify(|n| *n += batch.len())
            .or_insert(batch.len());
        cp.checkpoint().await.map_err(ProcessorError::retryable)
    }
}

/// A stream of `shards` shards holding `per_shard` records of `size` bytes each (routed by
/// hash key to each shard in turn). Returns its shards, in order.
async fn stream_of(
    kinesis: &MemKinesis,
    name: &str,
    shards: usize,
    per_shard: usize,
    size: usize,
) -> anyhow::Result<Vec<ShardId>> {
    kinesis.create_stream(name, shards);
    let listed = kinesis.list_shards(name).await?;
    for shard in &listed {
        for i in 0..per_shard {
            let mut data = format!("{}/{i}/", shard.id).into_bytes();
            data.resize(size, b'.');
            kinesis.put_with_hash(name, "key", shard.hash_range.start(), Bytes::from(data));
        }
    }
    Ok(listed.into_iter().map(|s| s.id).collect())
}

fn worker(
    kinesis: &MemKinesis,
    stream: &str,
    budget: usize,
    shared: &Shared,
) -> anyhow::Result<Worker> {
    let mut polling = PollingConfig::default();
    polling.prefetch_bytes = budget;
    polling.min_interval = Duration::from_millis(20);
    polling.idle_interval = Duration::from_millis(100);
    let shared = shared.clone();
    Ok(Worker::builder()
        .application_name(format!("{stream}-app"))
        .stream(stream)
        .worker_id("w1")
        .kinesis(Arc::new(kinesis.clone()))
        .lease_store(Arc::new(MemLeaseStore::new()))
        .lease_duration(Duration::from_secs(20))
        .taker_interval(Duration::from_millis(200))
        .polling(polling)
        .shutdown_timeout(Duration::from_secs(5))
        .processor(move || Processor {
            shared: shared.clone(),
            shard: None,
        })
        .build()?)
}

async fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        ensure!(Instant::now() < deadline, "{what}: not after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The worker's own memory at 100 shards beside the records it holds: its tasks, leases,
/// channels and the processors' bookkeeping. Measured with an empty stream (below 1.5 MiB);
/// the margin covers allocator noise and the runtime's buffers.
const WORKER_OVERHEAD: usize = 4 * MIB;
/// The most a budget may be exceeded by: one call made with less room than one record (a
/// reader of unknown record sizes that found less free room than a 1 MiB record needs in
/// flight), i.e. one record of at most 1 MiB with its key, sequence number and overhead.
const ONE_RECORD: usize = MIB + 4096;

/// 100 leases taken at once on a stream of 500 KiB records, with the default 24 MiB budget:
/// 10 shards' processors are stuck on their first batch, the 90 others are slow (50 ms per
/// batch). Every fresh reader used to assume 1 KiB records and ask for what a 1 KiB-record
/// share holds: each took its whole shard (4 records, 2 MB) at once, far beyond the budget.
#[test]
fn hundred_fresh_leases_of_500_kib_records_stay_within_the_budget() -> anyhow::Result<()> {
    serial(hundred_fresh_leases())
}

async fn hundred_fresh_leases() -> anyhow::Result<()> {
    const SHARDS: usize = 100;
    const PER_SHARD: usize = 4;
    const SIZE: usize = 500 * 1024;
    const BUDGET: usize = 24 * MIB;
    let kinesis = MemKinesis::new();
    kinesis.copy_reads(true);
    let shards = stream_of(&kinesis, "big", SHARDS, PER_SHARD, SIZE).await?;
    let stuck: Vec<ShardId> = shards[..10].to_vec();
    let (release, released) = watch::channel(false);
    let shared = Shared {
        plan: Arc::new({
            let stuck = stuck.clone();
            move |s| {
                if stuck.contains(s) {
                    Behaviour::Stuck
                } else {
                    Behaviour::Slow(Duration::from_millis(50))
                }
            }
        }),
        release: released,
        delivered: Arc::default(),
    };
    let w = worker(&kinesis, "big", BUDGET, &shared)?;
    let stop = w.shutdown_handle();

    let baseline = reset_heap_peak();
    kcl::retrieval::reset_prefetch_peak();
    let started = Instant::now();
    let run = tokio::spawn(w.run());
    // Every shard that is not stuck delivers everything, while the stuck ones hold what they
    // read.
    let moving = (SHARDS - stuck.len()) * PER_SHARD;
    wait_until("the slow shards delivered", Duration::from_secs(60), || {
        shared.total() >= moving
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let peak = heap_peak().saturating_sub(baseline);
    let counted = kcl::retrieval::prefetch_usage().peak;
    println!(
        "after {:.1?}: heap above baseline: peak {:.1} MiB; budget's count: peak {:.1} MiB \
         (budget {} MiB; limits {:.1} MiB of heap, {:.1} MiB counted)",
        started.elapsed(),
        peak as f64 / MIB as f64,
        counted as f64 / MIB as f64,
        BUDGET / MIB,
        (BUDGET + ONE_RECORD + WORKER_OVERHEAD) as f64 / MIB as f64,
        (BUDGET + ONE_RECORD) as f64 / MIB as f64,
    );
    let _ = release.send(true);
    wait_until("every record delivered", Duration::from_secs(60), || {
        shared.total() >= SHARDS * PER_SHARD
    })
    .await?;
    stop.shutdown();
    run.await.context("worker task")??;
    for s in &shards {
        ensure!(
            shared.delivered(s) == PER_SHARD,
            "{s}: {}",
            shared.delivered(s)
        );
    }
    ensure!(
        counted <= BUDGET + ONE_RECORD,
        "the budget counted {counted} bytes held at its peak: more than {BUDGET} + {ONE_RECORD}"
    );
    ensure!(
        peak <= BUDGET + ONE_RECORD + WORKER_OVERHEAD,
        "the worker held {peak} bytes above the baseline: more than the {BUDGET}-byte budget + \
         {ONE_RECORD} + {WORKER_OVERHEAD}"
    );
    Ok(())
}

/// The worker's memory beside records, at 100 shards (the `WORKER_OVERHEAD` figure): the same
/// worker on an empty stream.
#[test]
fn the_workers_own_memory_at_100_shards() -> anyhow::Result<()> {
    serial(own_memory())
}

async fn own_memory() -> anyhow::Result<()> {
    let kinesis = MemKinesis::new();
    stream_of(&kinesis, "empty", 100, 0, 0).await?;
    let shared = Shared {
        plan: Arc::new(|_| Behaviour::Slow(Duration::ZERO)),
        release: watch::channel(true).1,
        delivered: Arc::default(),
    };
    let w = worker(&kinesis, "empty", 24 * MIB, &shared)?;
    let stop = w.shutdown_handle();
    let baseline = reset_heap_peak();
    let run = tokio::spawn(w.run());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peak = heap_peak().saturating_sub(baseline);
    println!(
        "worker's own memory at 100 shards: peak {:.2} MiB",
        peak as f64 / MIB as f64
    );
    stop.shutdown();
    run.await.context("worker task")??;
    ensure!(peak <= WORKER_OVERHEAD, "{peak} bytes");
    Ok(())
}

/// Two shards, a 2 MiB budget, 100 KiB records. The first shard's processor is stuck on its
/// first batch while 500 records wait in its shard: its reader fills its queue. Then 60 records
/// arrive on the second shard: its reader must find room and deliver them all (the stuck shard
/// holds at most its fair share plus one call). Its reader used to wait forever: the stuck one
/// had taken the whole budget, a batch at a time, as room came free.
#[test]
fn a_stuck_shard_does_not_stall_the_other() -> anyhow::Result<()> {
    serial(stuck_shard())
}

async fn stuck_shard() -> anyhow::Result<()> {
    const LATER: usize = 60;
    const SIZE: usize = 100 * 1024;
    let kinesis = MemKinesis::new();
    let shards = stream_of(&kinesis, "stuck", 2, 0, 0).await?;
    let listed = kinesis.list_shards("stuck").await?;
    let put = |shard: usize, n: usize| {
        for i in 0..n {
            let mut data = format!("{i}/").into_bytes();
            data.resize(SIZE, b'.');
            kinesis.put_with_hash(
                "stuck",
                "key",
                listed[shard].hash_range.start(),
                data.into(),
            );
        }
    };
    put(0, 500);
    let (release, released) = watch::channel(false);
    let stuck = shards[0].clone();
    let shared = Shared {
        plan: Arc::new(move |s| {
            if *s == stuck {
                Behaviour::Stuck
            } else {
                Behaviour::Slow(Duration::from_millis(5))
            }
        }),
        release: released,
        delivered: Arc::default(),
    };
    let w = worker(&kinesis, "stuck", 2 * MIB, &shared)?;
    let stop = w.shutdown_handle();
    let run = tokio::spawn(w.run());
    // The stuck shard's reader reads ahead until it may not.
    tokio::time::sleep(Duration::from_secs(2)).await;
    put(1, LATER);
    let other = shards[1].clone();
    let outcome = wait_until(
        "the shard that is not stuck delivered everything",
        Duration::from_secs(20),
        || shared.delivered(&other) >= LATER,
    )
    .await;
    println!(
        "delivered: stuck shard {}, other shard {} of {LATER}",
        shared.delivered(&shards[0]),
        shared.delivered(&other)
    );
    let _ = release.send(true);
    stop.shutdown();
    run.await.context("worker task")??;
    outcome
}
