//! Metric names. The library records through the [`metrics`](https://docs.rs/metrics) facade
//! only; install any exporter (Prometheus, StatsD, CloudWatch EMF…) in your application.
//!
//! Per-shard metrics carry a `shard` label; all carry no other labels, so the cardinality is
//! bounded by the number of shards a worker holds.

/// Counter: records handed to `process_records` (label `shard`).
pub const RECORDS_PROCESSED: &str = "kcl_records_processed_total";
/// Counter: payload bytes handed to `process_records` (label `shard`).
pub const BYTES_PROCESSED: &str = "kcl_bytes_processed_total";
/// Gauge: how far behind the tip of the shard the last batch was read, in ms (label `shard`).
pub const MILLIS_BEHIND_LATEST: &str = "kcl_millis_behind_latest";
/// Histogram: seconds spent in one `process_records` call (label `shard`).
pub const PROCESSOR_LATENCY: &str = "kcl_processor_seconds";
/// Counter: `process_records` errors (label `shard`).
pub const PROCESSOR_ERRORS: &str = "kcl_processor_errors_total";
/// Counter: processor callbacks (or failed-batch handlers) that panicked; each is handled
/// as a fatal error.
pub const PROCESSOR_PANICS: &str = "kcl_processor_panics_total";
/// Counter: shards released and set aside for a while because they could not be read.
pub const SHARDS_QUARANTINED: &str = "kcl_shards_quarantined_total";
/// Counter: lease-table writes recognised as applied after their answer was lost (a 5xx or
/// timeout on the way back, then a retry whose condition failed); label `op`.
pub const LOST_ANSWERS: &str = "kcl_lease_lost_answers_total";
/// Gauge: leases held by this worker.
pub const LEASES_HELD: &str = "kcl_leases_held";
/// Counter: leases taken (any reason).
pub const LEASES_TAKEN: &str = "kcl_leases_taken_total";
/// Counter: leases taken from a live worker to balance the fleet.
pub const LEASES_STOLEN: &str = "kcl_leases_stolen_total";
/// Counter: handoffs this worker asked for to even out load (bytes per second) with the busiest
/// worker, a subset of `kcl_leases_stolen_total`.
pub const LOAD_MOVES: &str = "kcl_lease_load_moves_total";
/// Counter: reads of the whole lease table by the taker; label `reason` (`first`,
/// `table-changed`, `stale`, `safety-net`, `per-lease-owners`).
pub const LEASE_TABLE_SCANS: &str = "kcl_lease_table_scans_total";
/// Histogram: seconds per lease-taker round (wall clock, lease-table requests included).
pub const TAKER_ROUND: &str = "kcl_lease_taker_round_seconds";
/// Counter: workers this worker declared dead (fenced) before taking their leases.
pub const WORKERS_FENCED: &str = "kcl_workers_fenced_total";
/// Counter: leases lost (taken by another worker, or not renewed in time).
pub const LEASES_LOST: &str = "kcl_leases_lost_total";
/// Histogram: seconds per successful renewal.
pub const RENEWAL_LATENCY: &str = "kcl_lease_renewal_seconds";
/// Counter: renewals that failed without losing the lease.
pub const RENEWAL_FAILURES: &str = "kcl_lease_renewal_failures_total";
/// Counter: malformed lease items seen in the table.
pub const MALFORMED_LEASES: &str = "kcl_malformed_leases_total";
/// Counter: checkpoints written.
pub const CHECKPOINTS: &str = "kcl_checkpoints_total";
/// Counter: reads throttled by Kinesis (label `shard`).
pub const THROTTLES: &str = "kcl_read_throttles_total";
/// Counter: Kinesis read errors other than throttling (label `shard`).
pub const READ_ERRORS: &str = "kcl_read_errors_total";
/// Counter: records with the KPL magic that are not valid aggregates (label `shard`).
pub const INVALID_AGGREGATES: &str = "kcl_invalid_aggregates_total";
/// Counter: `GetRecords` calls of a shard behind its tip that the prefetch budget held back —
/// they asked for fewer records than the shard could deliver, or waited for room in the
/// budget — so the budget, not the shard, limits the read rate: raise
/// `polling.prefetch_bytes` (label `shard`). A warning is logged too, at most once a minute.
pub const PREFETCH_BUDGET_LIMITED_CALLS: &str = "kcl_prefetch_budget_limited_calls_total";
/// Histogram: seconds such a call waited for room in the prefetch budget (label `shard`).
pub const PREFETCH_BUDGET_WAIT: &str = "kcl_prefetch_budget_wait_seconds";
