//! Instruments shared by the benchmarks: a counting wrapper around `NoopProcessor`, and timing
//! decorators for the two seams (`KinesisApi`, `LeaseStore`) that record every call.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kcl::lease::{LeaseKey, LeaseTable};
use kcl::retrieval::{GetRecordsOutput, IteratorPosition, ShardIterator};
use kcl::shard::Shard;
use kcl::testkit::NoopProcessor;
use kcl::{
    Checkpointer, ExtendedSequenceNumber, KinesisApi, KinesisApiError, Lease, LeaseStore,
    LeaseStoreError, ProcessorError, RecordBatch, RecordProcessor, ShardId, WorkerId,
};
use tokio::sync::Notify;

/// What the processors of one run report: records delivered (and checkpointed), when the
/// first one arrived, and when `total` were reached.
#[derive(Debug)]
pub struct Probe {
    total: u64,
    records: AtomicU64,
    batches: AtomicU64,
    /// Time spent inside `NoopProcessor::process_records` (the checkpoint write).
    process_nanos: AtomicU64,
    first: OnceLock<Instant>,
    last: OnceLock<Instant>,
    done_notify: Notify,
}

impl Probe {
    pub fn new(total: u64) -> Arc<Self> {
        Arc::new(Self {
            total,
            records: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            process_nanos: AtomicU64::new(0),
            first: OnceLock::new(),
            last: OnceLock::new(),
            done_notify: Notify::new(),
        })
    }

    /// A processor factory: `NoopProcessor` (checkpoints every batch), counted.
    pub fn processor(self: &Arc<Self>) -> impl Fn() -> Counting + Send + Sync + 'static {
        let probe = self.clone();
        move || Counting {
            inner: NoopProcessor,
            probe: probe.clone(),
        }
    }

    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    pub fn process_time(&self) -> Duration {
        Duration::from_nanos(self.process_nanos.load(Ordering::Relaxed))
    }

    pub fn first(&self) -> Option<Instant> {
        self.first.get().copied()
    }

    /// When the `total`-th record was checkpointed.
    pub fn last(&self) -> Option<Instant> {
        self.last.get().copied()
    }

    /// Waits until `total` records were delivered and checkpointed.
    pub async fn all_records(&self) {
        let notified = self.done_notify.notified();
        if self.last.get().is_some() {
            return;
        }
        notified.await;
    }
}

/// `NoopProcessor` plus a few atomic counters per batch.
#[derive(Debug)]
pub struct Counting {
    inner: NoopProcessor,
    probe: Arc<Probe>,
}

#[async_trait]
impl RecordProcessor for Counting {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        let started = Instant::now();
        let _ = self.probe.first.set(started);
        let result = self.inner.process_records(batch, cp).await;
        let p = &self.probe;
        p.process_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        p.batches.fetch_add(1, Ordering::Relaxed);
        let n = p.records.fetch_add(batch.len() as u64, Ordering::Relaxed) + batch.len() as u64;
        if n >= p.total && p.last.set(Instant::now()).is_ok() {
            p.done_notify.notify_waiters();
        }
        result
    }
}

/// Every call through a timed seam: operation, start and duration relative to `t0`.
#[derive(Debug)]
pub struct Recorder {
    t0: Mutex<Instant>,
    calls: Mutex<Vec<Call>>,
}

#[derive(Debug, Clone)]
pub struct Call {
    pub op: &'static str,
    pub start: Duration,
    pub took: Duration,
    /// CPU time of the calling thread during the call (meaningful on a current-thread
    /// runtime, where a call starts and ends on the same thread).
    pub cpu: Duration,
    pub items: u64,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            t0: Mutex::new(Instant::now()),
            calls: Mutex::new(Vec::new()),
        })
    }

    /// Starts a new timeline at `t0` (forgets earlier calls).
    pub fn reset(&self, t0: Instant) {
        *self.t0.lock().unwrap() = t0;
        self.calls.lock().unwrap().clear();
    }

    fn record(&self, op: &'static str, started: (Instant, Duration), items: u64) {
        let took = started.0.elapsed();
        let cpu = thread_cpu_time().saturating_sub(started.1);
        let t0 = *self.t0.lock().unwrap();
        self.calls.lock().unwrap().push(Call {
            op,
            start: started.0.saturating_duration_since(t0),
            took,
            cpu,
            items,
        });
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// Per operation: calls, items, total time, first start, last end.
    pub fn summary(&self) -> BTreeMap<&'static str, OpSummary> {
        let mut out: BTreeMap<&'static str, OpSummary> = BTreeMap::new();
        for c in self.calls() {
            let s = out.entry(c.op).or_insert(OpSummary {
                calls: 0,
                items: 0,
                total: Duration::ZERO,
                cpu: Duration::ZERO,
                max: Duration::ZERO,
                first_start: c.start,
                last_end: Duration::ZERO,
            });
            s.calls += 1;
            s.items += c.items;
            s.total += c.took;
            s.cpu += c.cpu;
            s.max = s.max.max(c.took);
            s.first_start = s.first_start.min(c.start);
            s.last_end = s.last_end.max(c.start + c.took);
        }
        out
    }
}

#[derive(Debug, Clone, Copy)]
pub struct OpSummary {
    pub calls: u64,
    pub items: u64,
    pub total: Duration,
    pub cpu: Duration,
    pub max: Duration,
    pub first_start: Duration,
    pub last_end: Duration,
}

/// A `KinesisApi` that records every call.
#[derive(Debug)]
pub struct TimedKinesis {
    pub inner: Arc<dyn KinesisApi>,
    pub rec: Arc<Recorder>,
}

#[async_trait]
impl KinesisApi for TimedKinesis {
    fn now(&self) -> std::time::SystemTime {
        self.inner.now()
    }
    async fn list_shards(&self, stream: &str) -> Result<Vec<Shard>, KinesisApiError> {
        let t = now();
        let r = self.inner.list_shards(stream).await;
        let n = r.as_ref().map_or(0, |s| s.len() as u64);
        self.rec.record("kinesis.list_shards", t, n);
        r
    }

    async fn get_shard_iterator(
        &self,
        stream: &str,
        shard: &ShardId,
        position: &IteratorPosition,
    ) -> Result<ShardIterator, KinesisApiError> {
        let t = now();
        let r = self.inner.get_shard_iterator(stream, shard, position).await;
        self.rec.record("kinesis.get_shard_iterator", t, 1);
        r
    }

    async fn get_records(
        &self,
        iterator: &ShardIterator,
        limit: u32,
    ) -> Result<GetRecordsOutput, KinesisApiError> {
        // A call the caller gives up on (its future dropped: a timeout) is recorded too.
        let mut guard = Abandoned {
            rec: &self.rec,
            op: "kinesis.get_records ABANDONED",
            started: Some(now()),
        };
        let r = self.inner.get_records(iterator, limit).await;
        let t = guard.started.take().unwrap_or_else(now);
        let op = match &r {
            Ok(_) => "kinesis.get_records",
            Err(_) => "kinesis.get_records ERROR",
        };
        let n = r.as_ref().map_or(0, |o| o.records.len() as u64);
        self.rec.record(op, t, n);
        r
    }
}

/// Records a call whose future was dropped before it finished.
struct Abandoned<'a> {
    rec: &'a Recorder,
    op: &'static str,
    started: Option<(Instant, Duration)>,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.started.take() {
            self.rec.record(self.op, t, 0);
        }
    }
}

/// A `LeaseStore` that records every call.
#[derive(Debug)]
pub struct TimedStore {
    pub inner: Arc<dyn LeaseStore>,
    pub rec: Arc<Recorder>,
}

macro_rules! timed {
    ($self:ident, $op:literal, $call:expr) => {{
        let t = now();
        let r = $call.await;
        $self.rec.record($op, t, 1);
        r
    }};
}

#[async_trait]
impl LeaseStore for TimedStore {
    async fn ensure_table(&self) -> Result<(), LeaseStoreError> {
        timed!(self, "store.ensure_table", self.inner.ensure_table())
    }
    async fn list(&self) -> Result<LeaseTable, LeaseStoreError> {
        let t = now();
        let r = self.inner.list().await;
        let n = r.as_ref().map_or(0, |l| l.leases.len() as u64);
        self.rec.record("store.list", t, n);
        r
    }
    async fn get(&self, key: &LeaseKey) -> Result<Option<Lease>, LeaseStoreError> {
        timed!(self, "store.get", self.inner.get(key))
    }
    async fn create_if_absent(&self, lease: &Lease) -> Result<bool, LeaseStoreError> {
        timed!(
            self,
            "store.create_if_absent",
            self.inner.create_if_absent(lease)
        )
    }
    async fn renew(&self, lease: &Lease) -> Result<Lease, LeaseStoreError> {
        timed!(self, "store.renew", self.inner.renew(lease))
    }
    async fn take(&self, lease: &Lease, owner: &WorkerId) -> Result<Lease, LeaseStoreError> {
        timed!(self, "store.take", self.inner.take(lease, owner))
    }
    async fn checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
        child_shard_ids: &[ShardId],
    ) -> Result<Lease, LeaseStoreError> {
        timed!(
            self,
            "store.checkpoint",
            self.inner.checkpoint(lease, checkpoint, child_shard_ids)
        )
    }
    async fn release(&self, lease: &Lease) -> Result<Lease, LeaseStoreError> {
        timed!(self, "store.release", self.inner.release(lease))
    }
    async fn delete(&self, lease: &Lease) -> Result<(), LeaseStoreError> {
        timed!(self, "store.delete", self.inner.delete(lease))
    }
    async fn request_handoff(
        &self,
        lease: &Lease,
        new_owner: &WorkerId,
    ) -> Result<Lease, LeaseStoreError> {
        timed!(
            self,
            "store.request_handoff",
            self.inner.request_handoff(lease, new_owner)
        )
    }
    async fn complete_handoff(
        &self,
        lease: &Lease,
        new_owner: &WorkerId,
    ) -> Result<Lease, LeaseStoreError> {
        timed!(
            self,
            "store.complete_handoff",
            self.inner.complete_handoff(lease, new_owner)
        )
    }
    async fn withdraw_handoff(&self, lease: &Lease) -> Result<Lease, LeaseStoreError> {
        timed!(
            self,
            "store.withdraw_handoff",
            self.inner.withdraw_handoff(lease)
        )
    }
}

fn now() -> (Instant, Duration) {
    (Instant::now(), thread_cpu_time())
}

/// CPU time of the calling thread.
pub fn thread_cpu_time() -> Duration {
    // SAFETY: clock_gettime only writes into the struct we pass.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time (user + system) of this process so far.
pub fn process_cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

pub fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// A 1 KiB-ish payload that is not all zeros (xorshift).
pub fn payload(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 10.0 {
        format!("{s:.1} s")
    } else if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.0} ms", s * 1000.0)
    }
}

pub fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M rec/s", r / 1e6)
    } else if r >= 1e4 {
        format!("{:.0} k rec/s", r / 1e3)
    } else {
        format!("{r:.0} rec/s")
    }
}
