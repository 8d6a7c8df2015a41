//! Worker configuration: plain data with defaults, validated by [`WorkerConfig::validate`].

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::checkpoint::CheckpointPolicy;
use crate::lease::WorkerId;
pub use crate::metrics::MetricsLevel;

#[cfg(feature = "service")]
mod data;
#[cfg(feature = "service")]
pub use data::ConfigLoadError;

/// Where a shard with no checkpoint starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum InitialPosition {
    /// The oldest record still in the stream.
    #[default]
    TrimHorizon,
    /// Only records written after the worker first reads the shard.
    Latest,
    /// The first record written at or after this time.
    AtTimestamp(SystemTime),
}

/// How records are read from the shards.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Retrieval {
    /// `GetRecords` polling (the default), tuned by [`WorkerConfig::polling`]. Every polling
    /// consumer of a stream shares each shard's 5 reads/s and 2 MB/s.
    #[default]
    Polling,
    /// Enhanced fan-out: `SubscribeToShard` through the named stream consumer (registered if
    /// absent). Each consumer gets its own 2 MB/s per shard and records are pushed (~70 ms
    /// latency on AWS). The prefetch limits of [`WorkerConfig::polling`] still apply.
    FanOut {
        /// The stream consumer's name (1–128 characters: a-z, A-Z, 0-9, `_`, `.`, `-`).
        consumer_name: String,
    },
}

/// Where the heartbeat (the renewal of held leases) runs.
///
/// A processor that blocks its runtime thread — synchronous CPU work, blocking I/O — must not
/// cost the worker its leases: on a runtime whose threads are all blocked no task runs, the
/// lease counters stand still, and peers take the leases. So by default the heartbeat runs on
/// a thread of its own, with a small single-threaded runtime.
///
/// ```
/// use kcl::config::Heartbeat;
/// # fn demo(builder: kcl::WorkerBuilder) -> kcl::WorkerBuilder {
/// // Tests under tokio's paused clock (`start_paused`), where time must be the test's own:
/// builder.heartbeat(Heartbeat::Task)
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Heartbeat {
    /// On a dedicated thread (the default): renewals go on whatever the processors do.
    #[default]
    Thread,
    /// As a task on the caller's runtime. Use it under tokio's paused clock (the simulation,
    /// `#[tokio::test(start_paused = true)]`): another runtime's clock is not paused, so a
    /// heartbeat thread would see leases expire that the test's clock says are alive.
    Task,
}

/// Polling retrieval (`GetRecords`) settings.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PollingConfig {
    /// Records asked for per `GetRecords` call (1–10 000).
    pub max_records: u32,
    /// Minimum time between two `GetRecords` calls on one shard. Kinesis allows 5 reads per
    /// second per shard, shared by every polling consumer of the stream: the default, 200 ms,
    /// keeps one worker within that.
    pub min_interval: Duration,
    /// Pause after a call that returned nothing at the tip of the shard, counted from its
    /// answer (so a slow server is asked less often). Each further empty answer in a row
    /// doubles the pause, up to `idle_max_interval`; the first answer with records restores
    /// the `min_interval` pace. Raise it to leave read capacity to other polling consumers of
    /// an idle stream, at the cost of latency.
    pub idle_interval: Duration,
    /// The longest pause between two calls on a shard that stays quiet (default 1 s, the Java
    /// KCL's idle time between reads): a record written to a quiet shard is read at most this
    /// long after it arrived. A worker holding many quiet shards makes about one call per
    /// shard per `idle_max_interval`. Never less than `idle_interval` in effect; at most
    /// 4 minutes (a shard iterator expires after 5).
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut polling = kcl::PollingConfig::default();
    /// // Quiet shards are polled every 200 ms, 400 ms, 800 ms, then every 2 s.
    /// polling.idle_max_interval = Duration::from_secs(2);
    /// let builder = kcl::Worker::builder().polling(polling);
    /// # let _ = builder;
    /// ```
    pub idle_max_interval: Duration,
    /// Batches read ahead of the processor per shard.
    pub prefetch_batches: usize,
    /// Memory for records read ahead of the processors, shared by every shard of the worker.
    ///
    /// Before each `GetRecords` call a fetcher reserves room for the answer while it arrives
    /// (4 × the expected data: the base64 JSON body, the SDK's copy of it and the decoded
    /// records); as soon as the answer is decoded it keeps only the records' footprint (data,
    /// partition key, sequence number and per-record overhead, grown after KPL
    /// deaggregation), until its processor is done with them. Until a shard's record size is
    /// known its calls are sized for 1 MiB records.
    ///
    /// **Bound.** Room is only ever reserved out of the free part of the budget, so what is
    /// held — in flight, queued and with the processors — stays within `prefetch_bytes`, plus
    /// at most one record (1 MiB) and answers whose records were much larger than the ones
    /// before them, however many shards a worker holds and however slow its processors are.
    /// Add the worker's own memory (a few MiB, plus about 10 KiB per shard) for its RSS.
    ///
    /// **Fairness.** A shard makes a new call only while it holds less than its fair share
    /// (`prefetch_bytes / (shards + 1)`): a processor that is stuck or slow holds at most its
    /// share plus one call, and cannot stall the others.
    ///
    /// **Catching up.** A shard behind its tip whose processor keeps up asks in each call for
    /// what the shard delivers since its previous call at Kinesis' 2 MiB/s read limit (about
    /// 420 KiB of data per call at the default 200 ms pace, 1.7 MiB reserved while in flight)
    /// even when its share is smaller: the reservation is held for the call's duration, and
    /// the records only until they are processed. So the budget limits the read rate only when
    /// the calls in flight at once (shards × call latency × 5/s) need more than it holds, or
    /// processors are slow; the metric [`crate::metrics::PREFETCH_BUDGET_LIMITED_CALLS`] and
    /// a warning (at most once a minute) then say so: raise it. With the default 24 MiB and
    /// calls answered in 50 ms, about 56 shards catch up at the full 2 MiB/s at once.
    pub prefetch_bytes: usize,
}

/// The longest pause between two calls on a shard: shard iterators expire after 5 minutes.
const MAX_IDLE_INTERVAL: Duration = Duration::from_secs(4 * 60);

impl Default for PollingConfig {
    fn default() -> Self {
        Self {
            max_records: 10_000,
            min_interval: Duration::from_millis(200),
            idle_interval: Duration::from_millis(200),
            idle_max_interval: Duration::from_secs(1),
            prefetch_batches: 3,
            prefetch_bytes: 24 * 1024 * 1024,
        }
    }
}

/// How peers tell that a worker's leases are alive.
///
/// ```
/// use kcl::config::LeaseLiveness;
/// assert_eq!(LeaseLiveness::default(), LeaseLiveness::PerWorker);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseLiveness {
    /// One small heartbeat item per worker in the worker table (`<lease table>-workers`):
    /// the table's cost grows with the workers, not the shards. Leases of owners without such
    /// an item (Java KCL workers) are still judged, and ours renewed, per lease, detected
    /// automatically. Falls back to `PerLease` when the store keeps no worker table.
    #[default]
    PerWorker,
    /// Every lease renewed every `renew_interval`, as the Java KCL 2.x does. Choose it while
    /// Java KCL workers that hold no lease yet may join (they cannot see worker items, and
    /// would take leases whose counters stand still).
    PerLease,
}

/// How the lease table's encryption at rest is keyed (DynamoDB always encrypts tables).
///
/// ```
/// use kcl::config::TableEncryption;
/// assert_eq!(TableEncryption::default(), TableEncryption::AwsOwned);
/// let cmk = TableEncryption::CustomerKey("alias/orders-leases".into());
/// # let _ = cmk;
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TableEncryption {
    /// A key owned by DynamoDB (the default, free, no KMS permissions needed).
    #[default]
    AwsOwned,
    /// The AWS-managed KMS key `aws/dynamodb` of the account (KMS charges apply).
    AwsManaged,
    /// A customer-managed KMS key: its id, ARN, alias name (`alias/…`) or alias ARN. The
    /// worker's role needs `kms:Encrypt`, `kms:Decrypt`, `kms:ReEncrypt*`,
    /// `kms:GenerateDataKey*`, `kms:DescribeKey` and `kms:CreateGrant` on it.
    CustomerKey(String),
}

/// How the lease table and the worker table (`<table>-workers`) are created when they do not
/// exist yet. A table that already exists is left as it is (a log line says so when its
/// encryption or deletion protection differ). Billing is always on-demand.
///
/// ```
/// use kcl::config::{LeaseTableOptions, TableEncryption};
///
/// let mut options = LeaseTableOptions::default();
/// options.tags.insert("team".into(), "orders".into());
/// options.encryption = TableEncryption::AwsManaged;
/// options.point_in_time_recovery = true;
/// options.deletion_protection = true;
/// let builder = kcl::Worker::builder().lease_table_options(options);
/// # let _ = builder;
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseTableOptions {
    /// Tags given to both tables (`CreateTable` `Tags`): at most 50; keys 1–128 characters,
    /// not starting with `aws:`; values at most 256 characters.
    pub tags: BTreeMap<String, String>,
    /// Encryption at rest (`SSESpecification`).
    pub encryption: TableEncryption,
    /// Point-in-time recovery, turned on (`UpdateContinuousBackups`) once a new table is
    /// active. Not being able to turn it on is logged, not fatal.
    pub point_in_time_recovery: bool,
    /// Deletion protection (`DeletionProtectionEnabled`): the tables cannot be deleted until
    /// it is turned off.
    pub deletion_protection: bool,
}

impl LeaseTableOptions {
    /// Checks the tags and the key id; errors name `lease_table.tags` or
    /// `lease_table.encryption`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field.
    ///
    /// ```
    /// let mut options = kcl::config::LeaseTableOptions::default();
    /// options.tags.insert("aws:owner".into(), "me".into());
    /// assert_eq!(options.validate().unwrap_err().field(), "lease_table.tags");
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tags.len() > 50 {
            return Err(ConfigError::new(
                "lease_table.tags",
                format!("at most 50 tags, got {}", self.tags.len()),
            ));
        }
        for (k, v) in &self.tags {
            if k.is_empty() || k.chars().count() > 128 {
                return Err(ConfigError::new(
                    "lease_table.tags",
                    format!("tag key {k:?} must be 1 to 128 characters"),
                ));
            }
            if k.starts_with("aws:") {
                return Err(ConfigError::new(
                    "lease_table.tags",
                    format!("tag key {k:?} must not start with \"aws:\" (reserved)"),
                ));
            }
            if v.chars().count() > 256 {
                return Err(ConfigError::new(
                    "lease_table.tags",
                    format!("the value of tag {k:?} must be at most 256 characters"),
                ));
            }
        }
        if let TableEncryption::CustomerKey(id) = &self.encryption {
            if id.trim().is_empty() || id.len() > 2048 {
                return Err(ConfigError::new(
                    "lease_table.encryption",
                    "the KMS key id must be 1 to 2048 characters",
                ));
            }
        }
        Ok(())
    }
}

/// All of a worker's settings. Build it through [`crate::Worker::builder`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// The application name: also the default lease-table name.
    pub application_name: String,
    /// The stream to consume (single-stream mode). In multi-stream mode (`streams` not
    /// empty) unused: leave it empty.
    pub stream: String,
    /// Multi-stream mode: the streams to consume, by name (resolved to
    /// `account:name:creationEpoch` at start) or by identifier. Empty: single-stream mode.
    /// See [`crate::stream`].
    pub streams: Vec<String>,
    /// Multi-stream mode: how long the leases of a stream that left the set stay in the table
    /// (its shards stop at once, checkpointed; a stream added back within this time resumes
    /// from its checkpoints).
    pub former_stream_retention: Duration,
    /// Multi-stream mode with a discovery callback: how often it is asked for the streams.
    pub stream_discovery_interval: Duration,
    /// The lease table (defaults to the application name).
    pub table_name: String,
    /// This worker's id in the lease table.
    pub worker_id: WorkerId,
    /// Where shards without a checkpoint start.
    pub initial_position: InitialPosition,
    /// A lease not renewed for this long may be taken by another worker.
    pub lease_duration: Duration,
    /// How often held leases are renewed (at most a third of `lease_duration`).
    pub renew_interval: Duration,
    /// How often the worker looks for leases to take.
    pub taker_interval: Duration,
    /// How often shards are listed to find new ones (shard ends also trigger a sync).
    pub shard_sync_interval: Duration,
    /// How often a child shard checks whether its parents are finished.
    pub parent_poll_interval: Duration,
    /// How long a finished lease stays in the table after it became deletable (all its
    /// children started), so operators and tools can still see the lineage.
    pub finished_lease_retention: Duration,
    /// The most leases this worker holds.
    pub max_leases_per_worker: usize,
    /// The most leases taken from other live workers in one taker round.
    pub max_leases_to_steal: usize,
    /// Polling (`GetRecords`) or enhanced fan-out.
    pub retrieval: Retrieval,
    /// Polling settings (the prefetch limits also apply to fan-out).
    pub polling: PollingConfig,
    /// How long a graceful shutdown waits for processors before abandoning them.
    pub shutdown_timeout: Duration,
    /// How long a shard that could not be read (access denied, a disabled KMS key, …) is set
    /// aside after its lease was released, before this worker tries it again; doubled after
    /// each further failure, up to 32 times as long. Other workers may try it meanwhile.
    pub quarantine: Duration,
    /// Where held leases are renewed.
    pub heartbeat: Heartbeat,
    /// How peers tell that this worker's leases are alive (default: one heartbeat item per
    /// worker; see [`LeaseLiveness`]).
    pub lease_liveness: LeaseLiveness,
    /// Whether workers also even out bytes per second, not only lease counts (default true;
    /// needs per-worker liveness). See `docs/fleet.md`, "Balancing by load".
    pub balance_by_load: bool,
    /// Who checkpoints, and how often (default: the processor, by itself).
    pub checkpoint_policy: CheckpointPolicy,
    /// Which metrics are recorded (default [`MetricsLevel::Summary`]: per worker and stream;
    /// [`MetricsLevel::Detailed`] adds per-shard series). See `docs/metrics.md`.
    pub metrics_level: MetricsLevel,
    /// How often the worker sets its gauges again and touches the counters it holds (default
    /// 5 s; 100 ms to 60 s), and computes the largest `millis_behind_latest` of its shards.
    /// An exporter idle timeout longer than three of these removes exactly the series of the
    /// shards this worker gave up (see [`crate::metrics`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = kcl::Worker::builder().metrics_refresh_interval(Duration::from_secs(10));
    /// # let _ = builder;
    /// ```
    pub metrics_refresh_interval: Duration,
    /// How the lease and worker tables are created when missing: tags, encryption,
    /// point-in-time recovery, deletion protection (see [`LeaseTableOptions`]).
    pub lease_table: LeaseTableOptions,
}

/// A configuration value that is out of range; names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    field: &'static str,
    reason: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }

    /// The field at fault, as named by the builder method.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// Why it was rejected.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl WorkerConfig {
    /// A configuration with the defaults for everything but the names.
    pub fn new(application_name: impl Into<String>, stream: impl Into<String>) -> Self {
        Self::with_streams(application_name, stream, Vec::new())
    }

    /// A multi-stream configuration (see [`WorkerConfig::streams`]) with the defaults for
    /// everything else.
    ///
    /// ```
    /// let c = kcl::WorkerConfig::multi_stream("app", ["orders", "123456789012:refunds:1700000000"]);
    /// assert!(c.is_multi_stream());
    /// c.validate()?;
    /// # Ok::<(), kcl::ConfigError>(())
    /// ```
    pub fn multi_stream(
        application_name: impl Into<String>,
        streams: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self::with_streams(
            application_name,
            String::new(),
            streams.into_iter().map(Into::into).collect(),
        )
    }

    /// True in multi-stream mode (`streams` set).
    pub fn is_multi_stream(&self) -> bool {
        !self.streams.is_empty()
    }

    fn with_streams(
        application_name: impl Into<String>,
        stream: impl Into<String>,
        streams: Vec<String>,
    ) -> Self {
        let application_name = application_name.into();
        Self {
            table_name: application_name.clone(),
            application_name,
            stream: stream.into(),
            streams,
            former_stream_retention: Duration::from_secs(300),
            stream_discovery_interval: Duration::from_secs(60),
            worker_id: WorkerId::generate(),
            initial_position: InitialPosition::default(),
            lease_duration: Duration::from_secs(10),
            renew_interval: Duration::from_secs(10) / 3,
            taker_interval: Duration::from_secs(2),
            shard_sync_interval: Duration::from_secs(60),
            parent_poll_interval: Duration::from_millis(500),
            finished_lease_retention: Duration::from_secs(300),
            max_leases_per_worker: usize::MAX,
            max_leases_to_steal: 4,
            retrieval: Retrieval::default(),
            polling: PollingConfig::default(),
            shutdown_timeout: Duration::from_secs(30),
            quarantine: Duration::from_secs(10),
            heartbeat: Heartbeat::default(),
            lease_liveness: LeaseLiveness::default(),
            balance_by_load: true,
            checkpoint_policy: CheckpointPolicy::default(),
            metrics_level: MetricsLevel::default(),
            metrics_refresh_interval: Duration::from_secs(5),
            lease_table: LeaseTableOptions::default(),
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// The first [`ConfigError`] found, naming its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_name("application_name", &self.application_name, 1, 255)?;
        if self.streams.is_empty() {
            check_stream_name("stream", &self.stream)?;
        } else {
            let mut seen = std::collections::BTreeSet::new();
            for s in &self.streams {
                check_stream_entry(s)?;
                if !seen.insert(s.as_str()) {
                    return Err(ConfigError::new(
                        "streams",
                        format!("{s:?} is listed twice"),
                    ));
                }
            }
        }
        if self.former_stream_retention > Duration::from_secs(7 * 24 * 3600) {
            return Err(ConfigError::new(
                "former_stream_retention",
                "must be at most 7 days",
            ));
        }
        if self.stream_discovery_interval < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "stream_discovery_interval",
                "must be at least 1s",
            ));
        }
        check_table_name(&self.table_name)?;
        if self.worker_id.as_str().is_empty() {
            return Err(ConfigError::new("worker_id", "must not be empty"));
        }
        if self.worker_id.as_str().len() > 1024 {
            return Err(ConfigError::new("worker_id", "must be at most 1024 bytes"));
        }
        if self.lease_duration < Duration::from_millis(100) {
            return Err(ConfigError::new("lease_duration", "must be at least 100ms"));
        }
        if self.renew_interval.is_zero() || self.renew_interval > self.lease_duration / 3 {
            return Err(ConfigError::new(
                "renew_interval",
                format!(
                    "must be positive and at most a third of lease_duration ({:?})",
                    self.lease_duration / 3
                ),
            ));
        }
        for (field, d) in [
            ("taker_interval", self.taker_interval),
            ("shard_sync_interval", self.shard_sync_interval),
            ("parent_poll_interval", self.parent_poll_interval),
            ("shutdown_timeout", self.shutdown_timeout),
            ("quarantine", self.quarantine),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(field, "must be positive"));
            }
        }
        self.checkpoint_policy.validate()?;
        if !(Duration::from_millis(100)..=Duration::from_secs(60))
            .contains(&self.metrics_refresh_interval)
        {
            return Err(ConfigError::new(
                "metrics_refresh_interval",
                "must be between 100ms and 60s",
            ));
        }
        if self.max_leases_per_worker == 0 {
            return Err(ConfigError::new(
                "max_leases_per_worker",
                "must be at least 1",
            ));
        }
        if self.max_leases_to_steal == 0 {
            return Err(ConfigError::new(
                "max_leases_to_steal",
                "must be at least 1",
            ));
        }
        if let Retrieval::FanOut { consumer_name } = &self.retrieval {
            check_name("retrieval.consumer_name", consumer_name, 1, 128)?;
            if !consumer_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            {
                return Err(ConfigError::new(
                    "retrieval.consumer_name",
                    format!(
                        "{consumer_name:?} has characters other than a-z, A-Z, 0-9, '_', '.', '-'"
                    ),
                ));
            }
        }
        let p = &self.polling;
        if !(1..=10_000).contains(&p.max_records) {
            return Err(ConfigError::new(
                "polling.max_records",
                "must be between 1 and 10000",
            ));
        }
        // A paused shard's iterator must still be valid when it is used.
        if p.idle_max_interval > MAX_IDLE_INTERVAL {
            return Err(ConfigError::new(
                "polling.idle_max_interval",
                format!(
                    "must be at most {MAX_IDLE_INTERVAL:?} (a shard iterator expires after 5 minutes), got {:?}",
                    p.idle_max_interval
                ),
            ));
        }
        if p.idle_interval > MAX_IDLE_INTERVAL {
            return Err(ConfigError::new(
                "polling.idle_interval",
                format!(
                    "must be at most {MAX_IDLE_INTERVAL:?} (a shard iterator expires after 5 minutes), got {:?}",
                    p.idle_interval
                ),
            ));
        }
        if p.prefetch_batches == 0 {
            return Err(ConfigError::new(
                "polling.prefetch_batches",
                "must be at least 1",
            ));
        }
        // A record can be 1 MiB: the budget must hold at least one.
        if p.prefetch_bytes < 1024 * 1024 {
            return Err(ConfigError::new(
                "polling.prefetch_bytes",
                "must be at least 1 MiB (the largest record)",
            ));
        }
        self.lease_table.validate()
    }
}

fn check_name(field: &'static str, v: &str, min: usize, max: usize) -> Result<(), ConfigError> {
    if v.len() < min || v.len() > max {
        return Err(ConfigError::new(
            field,
            format!("must be {min} to {max} characters, got {}", v.len()),
        ));
    }
    Ok(())
}

fn check_stream_name(field: &'static str, v: &str) -> Result<(), ConfigError> {
    check_name(field, v, 1, 128)?;
    if !v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(ConfigError::new(
            field,
            format!("{v:?} has characters other than a-z, A-Z, 0-9, '_', '.', '-'"),
        ));
    }
    Ok(())
}

/// A stream of `streams`: a name, or an `account:name:creationEpoch` identifier.
pub(crate) fn check_stream_entry(v: &str) -> Result<(), ConfigError> {
    if v.contains(':') {
        let id = v
            .parse::<crate::stream::StreamIdentifier>()
            .map_err(|e| ConfigError::new("streams", e.to_string()))?;
        check_stream_name("streams", id.name())
    } else {
        check_stream_name("streams", v)
    }
}

fn check_table_name(v: &str) -> Result<(), ConfigError> {
    check_name("table_name", v, 3, 255)?;
    if !v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(ConfigError::new(
            "table_name",
            format!("{v:?} has characters other than a-z, A-Z, 0-9, '_', '.', '-'"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Mutation = Box<dyn Fn(&mut WorkerConfig)>;

    #[test]
    fn defaults_are_valid() {
        WorkerConfig::new("app", "stream").validate().unwrap();
    }

    #[test]
    fn bad_values_name_their_field() {
        let base = WorkerConfig::new("app", "stream");
        let cases: Vec<(&str, Mutation)> = vec![
            ("application_name", Box::new(|c| c.application_name.clear())),
            ("stream", Box::new(|c| c.stream = "bad name".into())),
            ("table_name", Box::new(|c| c.table_name = "ab".into())),
            (
                "lease_duration",
                Box::new(|c| c.lease_duration = Duration::ZERO),
            ),
            (
                "renew_interval",
                Box::new(|c| c.renew_interval = Duration::from_secs(9)),
            ),
            (
                "taker_interval",
                Box::new(|c| c.taker_interval = Duration::ZERO),
            ),
            (
                "max_leases_per_worker",
                Box::new(|c| c.max_leases_per_worker = 0),
            ),
            (
                "polling.max_records",
                Box::new(|c| c.polling.max_records = 10_001),
            ),
            (
                "polling.idle_max_interval",
                Box::new(|c| c.polling.idle_max_interval = Duration::from_secs(301)),
            ),
            (
                "polling.idle_interval",
                Box::new(|c| c.polling.idle_interval = Duration::from_secs(3600)),
            ),
            (
                "polling.prefetch_bytes",
                Box::new(|c| c.polling.prefetch_bytes = 1),
            ),
        ];
        for (field, mutate) in cases {
            let mut c = base.clone();
            mutate(&mut c);
            assert_eq!(c.validate().unwrap_err().field(), field);
        }
    }
}
