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
        self.inner.get_records(iterator, limit).await
    }
}
