//! Counting instruments for the catch-up and many-shards benchmarks: a recorder of the
//! `metrics` facade that sums each counter over its labels, and a `KinesisApi` wrapper that
//! counts `GetRecords` calls (cheaply: an atomic add, no per-call log).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use kcl::retrieval::{GetRecordsOutput, IteratorPosition, ShardIterator};
use kcl::shard::Shard;
use kcl::{KinesisApi, KinesisApiError, ShardId};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// `kcl::metrics::PREFETCH_BUDGET_LIMITED_CALLS`, spelled out so this benchmark also builds
/// against a kcl that predates it (its count is then 0).
pub const BUDGET_LIMITED: &str = "kcl_prefetch_budget_limited_calls_total";
/// Counted by [`CountingKinesis`], not by kcl.
pub const GET_RECORDS: &str = "bench_get_records_calls_total";
/// Nanoseconds spent in `GetRecords` calls (start to answer), counted by [`CountingKinesis`].
pub const GET_RECORDS_NANOS: &str = "bench_get_records_nanos_total";

#[derive(Debug, Default)]
struct Sums {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl Sums {
    fn counter(&self, name: &str) -> Arc<AtomicU64> {
        let mut m = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(name.to_owned()).or_default().clone()
    }
}

fn sums() -> &'static Arc<Sums> {
    static SUMS: OnceLock<Arc<Sums>> = OnceLock::new();
    SUMS.get_or_init(Default::default)
}

struct SumRecorder(Arc<Sums>);

impl Recorder for SumRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.0.counter(key.name()))
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Installs the summing recorder (once per process; later calls do nothing).
pub fn install() {
    let _ = metrics::set_global_recorder(SumRecorder(sums().clone()));
}

/// A counter's sum over all its labels so far.
pub fn get(name: &str) -> u64 {
    sums().counter(name).load(Ordering::Relaxed)
}

/// A `KinesisApi` that counts `GetRecords` calls into [`GET_RECORDS`].
#[derive(Debug)]
pub struct CountingKinesis {
    pub inner: Arc<dyn KinesisApi>,
}

#[async_trait]
impl KinesisApi for CountingKinesis {
    fn now(&self) -> std::time::SystemTime {
        self.inner.now()
    }

    async fn list_shards(&self, stream: &str) -> Result<Vec<Shard>, KinesisApiError> {
        self.inner.list_shards(stream).await
    }

    async fn get_shard_iterator(
        &self,
        stream: &str,
        shard: &ShardId,
        position: &IteratorPosition,
    ) -> Result<ShardIterator, KinesisApiError> {
        self.inner.get_shard_iterator(stream, shard, position).await
    }

    async fn get_records(
        &self,
        iterator: &ShardIterator,
        limit: u32,
    ) -> Result<GetRecordsOutput, KinesisApiError> {
        sums().counter(GET_RECORDS).fetch_add(1, Ordering::Relaxed);
        let t = std::time::Instant::now();
        let r = self.inner.get_records(iterator, limit).await;
        sums()
            .counter(GET_RECORDS_NANOS)
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
}

/// CPU time (user + system) of the process whose command line holds `name` and `--port
/// <port>` (a server this benchmark started), if found.
pub fn server_cpu(name: &str, port: u16) -> Option<std::time::Duration> {
    let port = port.to_string();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let named = args
            .first()
            .is_some_and(|a| String::from_utf8_lossy(a).ends_with(name));
        let on_port = args
            .windows(2)
            .any(|w| w[0] == b"--port" && w[1] == port.as_bytes());
        if !(named && on_port) {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        // Fields after the command name (which may hold spaces): state is field 3.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
        // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state (field 3).
        let total = ticks(11)? + ticks(12)?;
        // SAFETY: sysconf only reads a configuration value.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        return Some(std::time::Duration::from_millis(total * 1000 / hz));
    }
    None
}
