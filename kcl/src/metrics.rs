//! Metric names, levels and the handles the library records through.
//!
//! The library records through the [`metrics`](https://docs.rs/metrics) facade only; install
//! any exporter (Prometheus, StatsD, CloudWatch EMF…) in your application. Every name, its
//! type, unit, labels and level, and what to alert on, is listed in `docs/metrics.md`.
//!
//! **Levels** ([`MetricsLevel`], chosen with
//! [`WorkerBuilder::metrics_level`](crate::WorkerBuilder::metrics_level)):
//! - [`MetricsLevel::Summary`] (the default): per worker and stream, label `stream` — records,
//!   bytes, the largest `millis_behind_latest` over the held shards, processor time and errors,
//!   leases held/taken/stolen/lost/handed off, reads, checkpoints, shard syncs, and AWS
//!   requests by operation (labels `service`, `operation`, `outcome`). Its cardinality does not
//!   grow with the shards.
//! - [`MetricsLevel::Detailed`]: adds the per-shard series, named `kcl_shard_*`, labels
//!   `stream` and `shard` (counters and gauges only: a histogram per shard costs a dozen
//!   series per shard in Prometheus).
//!
//! There is no `worker` label: a Prometheus target (one process) already gets its `instance`
//! label from the scrape, and CloudWatch EMF aggregates the documents of every worker that
//! share a dimension set, which is the fleet-wide view you want; add a worker dimension in the
//! exporter (`metrics_cloudwatch_embedded::Builder::with_dimension`) if you need one.
//!
//! **Handles.** The worker's handles are registered once when it starts, a shard's
//! ([`metrics::Counter`], [`metrics::Gauge`]) once when its consumer starts, and kept:
//! recording a batch allocates nothing. (AWS requests are looked up per attempt, see
//! [`AWS_REQUESTS`].)
//!
//! **Series of shards given up.** The facade cannot delete a series. While the worker holds a
//! shard, a refresher sets every gauge it holds again (and touches every counter it holds)
//! every [`metrics_refresh_interval`](crate::config::WorkerConfig::metrics_refresh_interval)
//! (5 s by default); once the shard is given up (lease lost, handed off, shard ended,
//! quarantined, released) its handles are dropped and nothing refreshes them. So an exporter
//! with an idle timeout longer than the refresh interval drops exactly the series of shards
//! given up, e.g. for Prometheus (`metrics-exporter-prometheus` 0.18, in your application):
//!
//! ```text
//! use std::time::Duration;
//! use metrics_exporter_prometheus::PrometheusBuilder;
//! use metrics_util::MetricKindMask;
//!
//! PrometheusBuilder::new()
//!     // Three refresh intervals or more: held series are never idle that long.
//!     .idle_timeout(MetricKindMask::COUNTER | MetricKindMask::GAUGE, Some(Duration::from_secs(60)))
//!     .install()
//!     .expect("exporter installed");
//! ```
//!
//! Leave histograms out of the mask: the library cannot refresh a histogram without a sample,
//! and keeps none per shard. (Keep the idle timeout above the refresh interval: an exporter
//! that evicts a series whose handle is still held would not see that handle again,
//! metrics-rs issue 372. An exporter measures idleness between its renders: the series
//! disappears at the first scrape after the timeout.)
//!
//! ```
//! // The names are constants; `docs/metrics.md` lists each one's labels and level.
//! assert_eq!(kcl::metrics::SHARD_MILLIS_BEHIND_LATEST, "kcl_shard_millis_behind_latest");
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use metrics::{Counter, Gauge, Histogram, Label, SharedString};

use crate::shard::ShardId;

#[cfg(feature = "aws")]
pub(crate) mod requests;

/// Which series a worker records.
///
/// ```
/// use kcl::metrics::MetricsLevel;
/// # fn demo(builder: kcl::WorkerBuilder) -> kcl::WorkerBuilder {
/// // Per-shard series too (label `shard`): mind the cost with many shards.
/// builder.metrics_level(MetricsLevel::Detailed)
/// # }
/// assert_eq!(MetricsLevel::default(), MetricsLevel::Summary);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum MetricsLevel {
    /// Per worker and stream (label `stream`), like CloudWatch's basic monitoring: the
    /// number of series does not grow with the shards. The default.
    #[default]
    Summary,
    /// The summary series plus per-shard series (`kcl_shard_*`, labels `stream` and
    /// `shard`), like CloudWatch's enhanced (shard-level) monitoring: about six series per
    /// held shard.
    Detailed,
}

impl MetricsLevel {
    /// The level's name in `docs/metrics.md` and the service flags: `summary`, `detailed`.
    ///
    /// ```
    /// assert_eq!(kcl::metrics::MetricsLevel::Detailed.name(), "detailed");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Self::Summary => "summary",
            Self::Detailed => "detailed",
        }
    }
}

// ---- Summary level: label `stream` unless noted. ----

/// Counter (records): records handed to `process_records` that returned `Ok`.
pub const RECORDS_PROCESSED: &str = "kcl_records_processed_total";
/// Counter (bytes): payload bytes of those records.
pub const BYTES_PROCESSED: &str = "kcl_bytes_processed_total";
/// Gauge (milliseconds): the largest `millis_behind_latest` of the last batch read from each
/// held shard; set by the refresher.
pub const MILLIS_BEHIND_LATEST: &str = "kcl_millis_behind_latest";
/// Histogram (seconds): time spent in one `process_records` call (failed ones too).
pub const PROCESSOR_LATENCY: &str = "kcl_processor_seconds";
/// Counter: `process_records` calls that returned an error or panicked.
pub const PROCESSOR_ERRORS: &str = "kcl_processor_errors_total";
/// Counter: processor callbacks (or dead-letter handlers) that panicked; each is handled
/// as a fatal error.
pub const PROCESSOR_PANICS: &str = "kcl_processor_panics_total";
/// Counter (records): records handed to the dead-letter handler of
/// [`ErrorPolicy::DeadLetter`](crate::ErrorPolicy::DeadLetter) that took them (the shard moved
/// past them).
pub const RECORDS_DEAD_LETTERED: &str = "kcl_records_dead_lettered_total";
/// Counter: dead-letter handler calls that returned an error (the shard waits, and the same
/// records are handed over again after a delay).
pub const DEAD_LETTER_FAILURES: &str = "kcl_dead_letter_failures_total";
/// Counter: checkpoints written.
pub const CHECKPOINTS: &str = "kcl_checkpoints_total";
/// Histogram (seconds): when a checkpoint is written, the age of the oldest record it newly
/// covers: the time since the `ApproximateArrivalTimestamp` of the first record of the
/// oldest batch handed to the processor since the previous checkpoint of the shard.
pub const CHECKPOINT_RECORD_AGE: &str = "kcl_checkpoint_record_age_seconds";
/// Counter: reads throttled by Kinesis, each retried.
pub const THROTTLES: &str = "kcl_read_throttles_total";
/// Counter: Kinesis read errors other than throttling, retried in place.
pub const READ_ERRORS: &str = "kcl_read_errors_total";
/// Counter: records with the KPL magic that are not valid aggregates.
pub const INVALID_AGGREGATES: &str = "kcl_invalid_aggregates_total";
/// Counter: `GetRecords` calls of a shard behind its tip that the prefetch budget held back —
/// they asked for fewer records than the shard could deliver, or waited for room in the
/// budget — so the budget, not the shard, limits the read rate: raise
/// `polling.prefetch_bytes`. A warning is logged too, at most once a minute.
pub const PREFETCH_BUDGET_LIMITED_CALLS: &str = "kcl_prefetch_budget_limited_calls_total";
/// Histogram (seconds): how long such a call waited for room in the prefetch budget.
pub const PREFETCH_BUDGET_WAIT: &str = "kcl_prefetch_budget_wait_seconds";
/// Counter: shards released and set aside for a while because they could not be read.
pub const SHARDS_QUARANTINED: &str = "kcl_shards_quarantined_total";
/// Gauge: leases held by this worker.
pub const LEASES_HELD: &str = "kcl_leases_held";
/// Counter: leases taken (any reason).
pub const LEASES_TAKEN: &str = "kcl_leases_taken_total";
/// Counter: leases taken from a live worker to balance the fleet (graceful handoffs asked).
pub const LEASES_STOLEN: &str = "kcl_leases_stolen_total";
/// Counter: handoffs this worker asked for to even out load (bytes per second) with the busiest
/// worker, a subset of `kcl_leases_stolen_total`.
pub const LOAD_MOVES: &str = "kcl_lease_load_moves_total";
/// Counter: leases lost (taken by another worker, or not renewed in time).
pub const LEASES_LOST: &str = "kcl_leases_lost_total";
/// Counter: leases this worker handed over to a peer that asked for them.
pub const LEASES_HANDED_OFF: &str = "kcl_leases_handed_off_total";
/// Counter: workers this worker declared dead (fenced) before taking their leases.
pub const WORKERS_FENCED: &str = "kcl_workers_fenced_total";
/// Histogram (seconds): time per successful heartbeat or lease renewal.
pub const RENEWAL_LATENCY: &str = "kcl_lease_renewal_seconds";
/// Counter: heartbeats and renewals that failed without losing the leases (yet).
pub const RENEWAL_FAILURES: &str = "kcl_lease_renewal_failures_total";
/// Histogram (seconds): time per lease-taker round (wall clock, lease-table requests included).
pub const TAKER_ROUND: &str = "kcl_lease_taker_round_seconds";
/// Counter: reads of the whole lease table by the taker; labels `stream` and `reason`
/// (`first`, `table-changed`, `stale`, `safety-net`, `per-lease-owners`).
pub const LEASE_TABLE_SCANS: &str = "kcl_lease_table_scans_total";
/// Counter: malformed lease items seen in the table.
pub const MALFORMED_LEASES: &str = "kcl_malformed_leases_total";
/// Counter: lease-table writes recognised as applied after their answer was lost (a 5xx or
/// timeout on the way back, then a retry whose condition failed); label `op` only.
pub const LOST_ANSWERS: &str = "kcl_lease_lost_answers_total";
/// Counter: shard syncs (listing the shards, creating and deleting leases); labels `stream`
/// and `result` (`ok`, `error`).
pub const SHARD_SYNCS: &str = "kcl_shard_syncs_total";
/// Gauge: shards listed by the last successful shard sync.
pub const SHARDS_LISTED: &str = "kcl_shards_listed";
/// Counter: leases created by shard syncs (new shards).
pub const LEASES_CREATED: &str = "kcl_leases_created_total";
/// Counter: leases of finished or vanished shards deleted by shard syncs.
pub const LEASES_DELETED: &str = "kcl_leases_deleted_total";
/// Counter: attempts of AWS requests made by the clients the library wraps (`AwsKinesis`,
/// `DynamoLeaseStore`, `kcl::Aws`); labels `service` (`kinesis`, `dynamodb`), `operation`
/// (`GetRecords`, `UpdateItem`, …) and `outcome`: `success`; `throttled` (the SDK's retry
/// classifiers call it throttling); `client_error` (another 4xx answer: a failed condition,
/// an expired iterator, access denied, …); `server_error` (a 5xx, a timeout, no answer).
pub const AWS_REQUESTS: &str = "kcl_aws_requests_total";

// ---- Detailed level adds: labels `stream` and `shard`. ----

/// Counter (records, detailed): [`RECORDS_PROCESSED`] of one shard.
pub const SHARD_RECORDS_PROCESSED: &str = "kcl_shard_records_processed_total";
/// Counter (bytes, detailed): [`BYTES_PROCESSED`] of one shard.
pub const SHARD_BYTES_PROCESSED: &str = "kcl_shard_bytes_processed_total";
/// Gauge (milliseconds, detailed): how far behind the shard's tip its last batch was read.
pub const SHARD_MILLIS_BEHIND_LATEST: &str = "kcl_shard_millis_behind_latest";
/// Counter (detailed): [`PROCESSOR_ERRORS`] of one shard.
pub const SHARD_PROCESSOR_ERRORS: &str = "kcl_shard_processor_errors_total";
/// Counter (records, detailed): [`RECORDS_DEAD_LETTERED`] of one shard.
pub const SHARD_RECORDS_DEAD_LETTERED: &str = "kcl_shard_records_dead_lettered_total";
/// Counter (detailed): [`THROTTLES`] of one shard.
pub const SHARD_THROTTLES: &str = "kcl_shard_read_throttles_total";
/// Counter (detailed): [`READ_ERRORS`] of one shard.
pub const SHARD_READ_ERRORS: &str = "kcl_shard_read_errors_total";

/// `millis_behind_latest` not known yet.
const UNKNOWN: u64 = u64::MAX;

fn stream_labels(stream: &SharedString) -> Vec<Label> {
    vec![Label::new("stream", stream.clone())]
}

/// The handles of one worker's summary series (label `stream`), registered once, and the
/// per-shard metrics of the shards it holds (for the largest lag and the refresher).
pub(crate) struct WorkerMetrics {
    level: MetricsLevel,
    stream: SharedString,
    pub(crate) records: Counter,
    pub(crate) bytes: Counter,
    millis_behind: Gauge,
    pub(crate) processor_seconds: Histogram,
    pub(crate) processor_errors: Counter,
    pub(crate) processor_panics: Counter,
    dead_lettered: Counter,
    dead_letter_failures: Counter,
    pub(crate) checkpoints: Counter,
    pub(crate) checkpoint_age: Histogram,
    pub(crate) read_throttles: Counter,
    pub(crate) read_errors: Counter,
    pub(crate) invalid_aggregates: Counter,
    pub(crate) budget_limited: Counter,
    pub(crate) budget_wait: Histogram,
    pub(crate) quarantined: Counter,
    leases_held: Gauge,
    held: AtomicU64,
    pub(crate) leases_taken: Counter,
    pub(crate) leases_stolen: Counter,
    pub(crate) load_moves: Counter,
    pub(crate) leases_lost: Counter,
    pub(crate) leases_handed_off: Counter,
    pub(crate) workers_fenced: Counter,
    pub(crate) renewal_seconds: Histogram,
    pub(crate) renewal_failures: Counter,
    pub(crate) taker_round: Histogram,
    pub(crate) malformed_leases: Counter,
    pub(crate) leases_created: Counter,
    pub(crate) leases_deleted: Counter,
    syncs_ok: Counter,
    syncs_failed: Counter,
    shards_listed: Gauge,
    listed: AtomicU64,
    shards: Mutex<HashMap<ShardId, Arc<ShardMetrics>>>,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics")
            .field("level", &self.level)
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl WorkerMetrics {
    /// Registers the summary series of `stream`.
    pub(crate) fn new(level: MetricsLevel, stream: &str) -> Arc<Self> {
        let stream = SharedString::from(Arc::<str>::from(stream));
        let labels = stream_labels(&stream);
        let c = |name: &'static str| metrics::counter!(name, labels.iter());
        let g = |name: &'static str| metrics::gauge!(name, labels.iter());
        let h = |name: &'static str| metrics::histogram!(name, labels.iter());
        let sync = |result: &'static str| metrics::counter!(SHARD_SYNCS, "stream" => stream.clone(), "result" => result);
        Arc::new(Self {
            level,
            records: c(RECORDS_PROCESSED),
            bytes: c(BYTES_PROCESSED),
            millis_behind: g(MILLIS_BEHIND_LATEST),
            processor_seconds: h(PROCESSOR_LATENCY),
            processor_errors: c(PROCESSOR_ERRORS),
            processor_panics: c(PROCESSOR_PANICS),
            dead_lettered: c(RECORDS_DEAD_LETTERED),
            dead_letter_failures: c(DEAD_LETTER_FAILURES),
            checkpoints: c(CHECKPOINTS),
            checkpoint_age: h(CHECKPOINT_RECORD_AGE),
            read_throttles: c(THROTTLES),
            read_errors: c(READ_ERRORS),
            invalid_aggregates: c(INVALID_AGGREGATES),
            budget_limited: c(PREFETCH_BUDGET_LIMITED_CALLS),
            budget_wait: h(PREFETCH_BUDGET_WAIT),
            quarantined: c(SHARDS_QUARANTINED),
            leases_held: g(LEASES_HELD),
            held: AtomicU64::new(0),
            leases_taken: c(LEASES_TAKEN),
            leases_stolen: c(LEASES_STOLEN),
            load_moves: c(LOAD_MOVES),
            leases_lost: c(LEASES_LOST),
            leases_handed_off: c(LEASES_HANDED_OFF),
            workers_fenced: c(WORKERS_FENCED),
            renewal_seconds: h(RENEWAL_LATENCY),
            renewal_failures: c(RENEWAL_FAILURES),
            taker_round: h(TAKER_ROUND),
            malformed_leases: c(MALFORMED_LEASES),
            leases_created: c(LEASES_CREATED),
            leases_deleted: c(LEASES_DELETED),
            syncs_ok: sync("ok"),
            syncs_failed: sync("error"),
            shards_listed: g(SHARDS_LISTED),
            listed: AtomicU64::new(0),
            shards: Mutex::new(HashMap::new()),
            stream,
        })
    }

    /// Counts a whole-table read by the taker (per taker round at most: registered per call).
    pub(crate) fn table_scan(&self, reason: &'static str) {
        metrics::counter!(LEASE_TABLE_SCANS, "stream" => self.stream.clone(), "reason" => reason)
            .increment(1);
    }

    /// Sets the number of leases held (and keeps it for the refresher).
    pub(crate) fn set_leases_held(&self, n: usize) {
        self.held.store(n as u64, Ordering::Relaxed);
        self.leases_held.set(n as f64);
    }

    /// A shard sync's result: `Some(shards listed)` when it succeeded.
    pub(crate) fn shard_sync(&self, listed: Option<usize>) {
        match listed {
            Some(n) => {
                self.syncs_ok.increment(1);
                self.listed.store(n as u64, Ordering::Relaxed);
                self.shards_listed.set(n as f64);
            }
            None => self.syncs_failed.increment(1),
        }
    }

    /// Registers the per-shard handles of `shard` (once per shard consumer); they are kept
    /// until the returned guard is dropped, when the worker gave the shard up.
    pub(crate) fn shard(self: &Arc<Self>, shard: &ShardId) -> ShardMetricsGuard {
        let detailed = (self.level >= MetricsLevel::Detailed).then(|| {
            let labels = [
                Label::new("stream", self.stream.clone()),
                Label::new(
                    "shard",
                    SharedString::from(Arc::<str>::from(shard.as_str())),
                ),
            ];
            ShardSeries {
                records: metrics::counter!(SHARD_RECORDS_PROCESSED, labels.iter()),
                bytes: metrics::counter!(SHARD_BYTES_PROCESSED, labels.iter()),
                millis_behind: metrics::gauge!(SHARD_MILLIS_BEHIND_LATEST, labels.iter()),
                processor_errors: metrics::counter!(SHARD_PROCESSOR_ERRORS, labels.iter()),
                dead_lettered: metrics::counter!(SHARD_RECORDS_DEAD_LETTERED, labels.iter()),
                read_throttles: metrics::counter!(SHARD_THROTTLES, labels.iter()),
                read_errors: metrics::counter!(SHARD_READ_ERRORS, labels.iter()),
            }
        });
        let metrics = Arc::new(ShardMetrics {
            worker: self.clone(),
            detailed,
            behind: AtomicU64::new(UNKNOWN),
        });
        self.lock_shards().insert(shard.clone(), metrics.clone());
        ShardMetricsGuard {
            shard: shard.clone(),
            metrics,
        }
    }

    fn lock_shards(&self) -> std::sync::MutexGuard<'_, HashMap<ShardId, Arc<ShardMetrics>>> {
        self.shards.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets every gauge again and touches every counter this worker holds, so that an
    /// exporter's idle timeout removes only the series of shards given up; sets the largest
    /// lag over the held shards.
    pub(crate) fn refresh(&self) {
        let mut max = None;
        for shard in self.lock_shards().values() {
            let behind = shard.behind.load(Ordering::Relaxed);
            if behind != UNKNOWN {
                max = max.max(Some(behind));
            }
            if let Some(s) = &shard.detailed {
                s.refresh(behind);
            }
        }
        self.millis_behind.set(max.unwrap_or(0) as f64);
        self.leases_held
            .set(self.held.load(Ordering::Relaxed) as f64);
        self.shards_listed
            .set(self.listed.load(Ordering::Relaxed) as f64);
        for c in [
            &self.records,
            &self.bytes,
            &self.processor_errors,
            &self.processor_panics,
            &self.dead_lettered,
            &self.dead_letter_failures,
            &self.checkpoints,
            &self.read_throttles,
            &self.read_errors,
            &self.invalid_aggregates,
            &self.budget_limited,
            &self.quarantined,
            &self.leases_taken,
            &self.leases_stolen,
            &self.load_moves,
            &self.leases_lost,
            &self.leases_handed_off,
            &self.workers_fenced,
            &self.renewal_failures,
            &self.malformed_leases,
            &self.leases_created,
            &self.leases_deleted,
            &self.syncs_ok,
            &self.syncs_failed,
        ] {
            c.increment(0);
        }
    }

    /// Refreshes every `every`, for as long as the future is polled (see
    /// [`WorkerMetrics::refresh`]).
    pub(crate) async fn run_refresher(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.refresh();
        }
    }
}

/// The per-shard series of the detailed level.
struct ShardSeries {
    records: Counter,
    bytes: Counter,
    millis_behind: Gauge,
    processor_errors: Counter,
    dead_lettered: Counter,
    read_throttles: Counter,
    read_errors: Counter,
}

impl ShardSeries {
    fn refresh(&self, behind: u64) {
        if behind != UNKNOWN {
            self.millis_behind.set(behind as f64);
        }
        for c in [
            &self.records,
            &self.bytes,
            &self.processor_errors,
            &self.dead_lettered,
            &self.read_throttles,
            &self.read_errors,
        ] {
            c.increment(0);
        }
    }
}

/// What one shard consumer records: the worker's summary handles and, at the detailed level,
/// the shard's own. Registered once per shard consumer; recording allocates nothing per batch.
pub(crate) struct ShardMetrics {
    worker: Arc<WorkerMetrics>,
    detailed: Option<ShardSeries>,
    /// The shard's last `millis_behind_latest` ([`UNKNOWN`] before the first batch).
    behind: AtomicU64,
}

impl std::fmt::Debug for ShardMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardMetrics")
            .field("detailed", &self.detailed.is_some())
            .finish_non_exhaustive()
    }
}

impl ShardMetrics {
    /// Handles for tests of a reader alone: a summary worker of stream `test`, not refreshed.
    #[cfg(test)]
    pub(crate) fn detached() -> Arc<Self> {
        Arc::new(Self {
            worker: WorkerMetrics::new(MetricsLevel::Summary, "test"),
            detailed: None,
            behind: AtomicU64::new(UNKNOWN),
        })
    }

    /// The worker's summary handles.
    pub(crate) fn worker(&self) -> &WorkerMetrics {
        &self.worker
    }

    /// A batch the processor took (`Ok`).
    pub(crate) fn processed(&self, records: u64, bytes: u64) {
        self.worker.records.increment(records);
        self.worker.bytes.increment(bytes);
        if let Some(s) = &self.detailed {
            s.records.increment(records);
            s.bytes.increment(bytes);
        }
    }

    /// How far behind the tip the last batch was read.
    pub(crate) fn millis_behind(&self, ms: u64) {
        let ms = ms.min(UNKNOWN - 1);
        self.behind.store(ms, Ordering::Relaxed);
        if let Some(s) = &self.detailed {
            s.millis_behind.set(ms as f64);
        }
    }

    /// One `process_records` call's duration.
    pub(crate) fn processor_seconds(&self, seconds: f64) {
        self.worker.processor_seconds.record(seconds);
    }

    /// A `process_records` call failed.
    pub(crate) fn processor_error(&self) {
        self.worker.processor_errors.increment(1);
        if let Some(s) = &self.detailed {
            s.processor_errors.increment(1);
        }
    }

    /// The dead-letter handler took `records` failed records.
    pub(crate) fn dead_lettered(&self, records: u64) {
        self.worker.dead_lettered.increment(records);
        if let Some(s) = &self.detailed {
            s.dead_lettered.increment(records);
        }
    }

    /// The dead-letter handler returned an error.
    pub(crate) fn dead_letter_failed(&self) {
        self.worker.dead_letter_failures.increment(1);
    }

    /// A read was throttled.
    pub(crate) fn read_throttled(&self) {
        self.worker.read_throttles.increment(1);
        if let Some(s) = &self.detailed {
            s.read_throttles.increment(1);
        }
    }

    /// A read failed (not throttled) and is retried.
    pub(crate) fn read_error(&self) {
        self.worker.read_errors.increment(1);
        if let Some(s) = &self.detailed {
            s.read_errors.increment(1);
        }
    }

    /// A call held back by the prefetch budget, after waiting `waited` for room.
    pub(crate) fn budget_limited(&self, waited: Duration) {
        self.worker.budget_limited.increment(1);
        self.worker.budget_wait.record(waited.as_secs_f64());
    }

    /// A checkpoint was written; `oldest` is the arrival of the oldest record it newly covers.
    pub(crate) fn checkpointed(&self, oldest: Option<SystemTime>) {
        self.worker.checkpoints.increment(1);
        if let Some(t) = oldest {
            let age = SystemTime::now().duration_since(t).unwrap_or_default();
            self.worker.checkpoint_age.record(age.as_secs_f64());
        }
    }
}

/// Keeps a shard's handles registered with its worker; dropped when the shard is given up,
/// after which the shard's series are no longer refreshed.
pub(crate) struct ShardMetricsGuard {
    shard: ShardId,
    metrics: Arc<ShardMetrics>,
}

impl std::fmt::Debug for ShardMetricsGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardMetricsGuard")
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

impl ShardMetricsGuard {
    /// The shard's handles, to share with its reader.
    pub(crate) fn handles(&self) -> &Arc<ShardMetrics> {
        &self.metrics
    }
}

impl Drop for ShardMetricsGuard {
    fn drop(&mut self) {
        let mut shards = self.metrics.worker.lock_shards();
        if shards
            .get(&self.shard)
            .is_some_and(|m| Arc::ptr_eq(m, &self.metrics))
        {
            shards.remove(&self.shard);
        }
    }
}

#[cfg(test)]
mod tests;
