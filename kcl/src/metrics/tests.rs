//! Handles are registered once per worker and per shard consumer, never per batch: a counting
//! recorder (`metrics::with_local_recorder` on a current-thread runtime) sees the
//! registrations of a worker that processes many batches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

use super::*;

/// Counts registrations per key (name and labels), and keeps the last value of each counter.
#[derive(Default)]
struct Counting {
    registrations: Mutex<HashMap<String, u64>>,
    values: Mutex<HashMap<String, Arc<Value>>>,
}

#[derive(Default, Debug)]
struct Value(AtomicU64);

impl CounterFn for Value {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

impl GaugeFn for Value {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, value: f64) {
        self.0.store(value as u64, Ordering::Relaxed);
    }
}

impl HistogramFn for Value {
    fn record(&self, _: f64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn render(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl Counting {
    fn register(&self, key: &Key) -> Arc<Value> {
        let k = render(key);
        *self
            .registrations
            .lock()
            .unwrap()
            .entry(k.clone())
            .or_default() += 1;
        self.values.lock().unwrap().entry(k).or_default().clone()
    }

    fn registered(&self, name: &str) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .registrations
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{name}{{")))
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        v.sort();
        v
    }

    fn value(&self, key: &str) -> u64 {
        self.values
            .lock()
            .unwrap()
            .get(key)
            .map_or(0, |v| v.0.load(Ordering::Relaxed))
    }
}

impl Recorder for Counting {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.register(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.register(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.register(key))
    }
}

/// Runs a worker at `level` over 2 shards of 60 records read 3 at a time (at least 40
/// batches) until every record was processed.
fn run_worker(recorder: &Counting, level: MetricsLevel) -> usize {
    use crate::testkit::MemBackends;
    use crate::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor};

    struct Count(Arc<AtomicU64>, Arc<AtomicU64>);
    #[async_trait]
    impl RecordProcessor for Count {
        async fn process_records(
            &mut self,
            b: &RecordBatch,
            cp: &mut Checkpointer,
        ) -> Result<(), ProcessorError> {
            self.0.fetch_add(b.len() as u64, Ordering::SeqCst);
            self.1.fetch_add(1, Ordering::SeqCst);
            cp.checkpoint().await.map_err(ProcessorError::retryable)
        }
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let processed = Arc::new(AtomicU64::new(0));
    let batches = Arc::new(AtomicU64::new(0));
    metrics::with_local_recorder(recorder, || {
        rt.block_on(async {
            let backends = MemBackends::new();
            backends.kinesis().create_stream("orders", 2);
            for i in 0..120 {
                backends
                    .kinesis()
                    .put("orders", &format!("key-{i}"), vec![b'x'; 10]);
            }
            let polling = crate::PollingConfig {
                max_records: 3,
                min_interval: std::time::Duration::from_millis(1),
                ..Default::default()
            };
            let (p, b) = (processed.clone(), batches.clone());
            let worker = crate::Worker::builder()
                .application_name("app")
                .stream("orders")
                .backends(backends.clone())
                .heartbeat(crate::config::Heartbeat::Task)
                .taker_interval(std::time::Duration::from_millis(50))
                .polling(polling)
                .metrics_level(level)
                .metrics_refresh_interval(std::time::Duration::from_millis(100))
                .processor(move || Count(p.clone(), b.clone()))
                .build()
                .unwrap();
            let stop = worker.shutdown_handle();
            let run = tokio::spawn(worker.run());
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
            while processed.load(Ordering::SeqCst) < 120 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "records not processed"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            // A refresh or two.
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            stop.shutdown();
            run.await.unwrap().unwrap();
        })
    });
    batches.load(Ordering::SeqCst) as usize
}

#[test]
fn per_shard_handles_are_registered_once_per_shard_not_per_batch() {
    let recorder = Counting::default();
    let batches = run_worker(&recorder, MetricsLevel::Detailed);
    assert!(batches >= 40, "only {batches} batches");
    // One registration per shard consumer, whatever the number of batches.
    for name in [
        SHARD_RECORDS_PROCESSED,
        SHARD_BYTES_PROCESSED,
        SHARD_MILLIS_BEHIND_LATEST,
    ] {
        let got = recorder.registered(name);
        assert_eq!(got.len(), 2, "{name}: {got:?}");
        for (key, n) in &got {
            assert!(
                key.contains("stream=orders") && key.contains("shard=shardId-"),
                "{key}"
            );
            assert_eq!(*n, 1, "{key} registered {n} times over {batches} batches");
        }
    }
    // Summary handles: once per worker.
    for name in [
        RECORDS_PROCESSED,
        BYTES_PROCESSED,
        PROCESSOR_LATENCY,
        CHECKPOINTS,
        MILLIS_BEHIND_LATEST,
    ] {
        assert_eq!(
            recorder.registered(name),
            vec![(format!("{name}{{stream=orders}}"), 1)],
            "{name}"
        );
    }
    assert_eq!(
        recorder.value("kcl_records_processed_total{stream=orders}"),
        120
    );
    let per_shard: u64 = recorder
        .registered(SHARD_RECORDS_PROCESSED)
        .iter()
        .map(|(k, _)| recorder.value(k))
        .sum();
    assert_eq!(per_shard, 120);
}

#[test]
fn summary_level_has_no_shard_series() {
    let recorder = Counting::default();
    run_worker(&recorder, MetricsLevel::Summary);
    let keys: Vec<String> = recorder
        .registrations
        .lock()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(
        keys.iter().all(|k| !k.contains("shard=")),
        "per-shard series at the summary level: {keys:?}"
    );
    assert_eq!(
        recorder.value("kcl_records_processed_total{stream=orders}"),
        120
    );
}

#[test]
fn the_largest_lag_and_given_up_shards() {
    let recorder = Counting::default();
    let worker = metrics::with_local_recorder(&recorder, || {
        let w = WorkerMetrics::new(MetricsLevel::Detailed, "s");
        let a = w.shard(&ShardId::from("a"));
        let b = w.shard(&ShardId::from("b"));
        a.handles().millis_behind(10);
        b.handles().millis_behind(500);
        w.refresh();
        assert_eq!(recorder.value("kcl_millis_behind_latest{stream=s}"), 500);
        drop(b); // given up: no longer counted nor refreshed
        w.refresh();
        assert_eq!(recorder.value("kcl_millis_behind_latest{stream=s}"), 10);
        assert_eq!(w.lock_shards().len(), 1);
        drop(a);
        w
    });
    assert!(worker.lock_shards().is_empty());
}
