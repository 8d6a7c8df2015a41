//! [`WorkerConfig`] as data: a JSON file ([`WorkerConfig::from_file`]), `KCL_*` environment
//! variables ([`WorkerConfig::from_env`]) and serde (`Serialize`, `Deserialize`).
//!
//! Every key is a field of [`WorkerConfig`], nested ones (`polling`, `lease_table`) as JSON
//! objects in a file and as `polling.max_records` in error messages. A variable is `KCL_` and
//! the key in upper case with `.` as `_` (`KCL_POLLING_MAX_RECORDS`). Values are the same
//! strings in both: durations in humantime form (`"10s"`, `"1m 30s"`, `"250ms"`), positions
//! `trim-horizon` / `latest` / `at-timestamp=<RFC 3339>`; numbers and booleans may also be
//! JSON numbers and booleans in a file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use super::{
    ConfigError, Heartbeat, InitialPosition, LeaseLiveness, Retrieval, TableEncryption,
    WorkerConfig,
};
use crate::checkpoint::CheckpointPolicy;
use crate::lease::WorkerId;
use crate::metrics::MetricsLevel;

/// Why a configuration could not be read from a file or the environment. Names the key (in a
/// file: `polling.max_records`) or the variable (`KCL_POLLING_MAX_RECORDS`) at fault.
///
/// ```
/// let err = kcl::WorkerConfig::from_json(r#"{"application_name": "a", "stream": "s", "lease_duraton": "5s"}"#)
///     .unwrap_err();
/// assert_eq!(err.key(), Some("lease_duraton"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigLoadError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not JSON, or not a JSON object.
    #[error("the configuration{} is not a JSON object: {reason}", in_file(.path))]
    Syntax {
        /// The file, if read from one.
        path: Option<PathBuf>,
        /// Why.
        reason: String,
    },
    /// A key (or `KCL_*` variable) that is not one of ours.
    #[error("unknown configuration {key}{}", in_file(.path))]
    Unknown {
        /// The key or variable.
        key: String,
        /// The file, if read from one.
        path: Option<PathBuf>,
    },
    /// A required key (`application_name`, `stream`) is missing.
    #[error("missing configuration {key}{}", in_file(.path))]
    Missing {
        /// The key or variable.
        key: String,
        /// The file, if read from one.
        path: Option<PathBuf>,
    },
    /// A value that cannot be parsed or is out of range.
    #[error("invalid configuration {key}{}: {reason}", in_file(.path))]
    Invalid {
        /// The key or variable.
        key: String,
        /// The file, if read from one.
        path: Option<PathBuf>,
        /// Why.
        reason: String,
    },
}

fn in_file(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

impl ConfigLoadError {
    /// The key or `KCL_*` variable at fault, if the error is about one.
    ///
    /// ```
    /// let vars = [("KCL_APPLICATION_NAME", "a"), ("KCL_STREAM", "s"), ("KCL_QUARANTINE", "soon")];
    /// let err = kcl::WorkerConfig::from_env_vars(vars).unwrap_err();
    /// assert_eq!(err.key(), Some("KCL_QUARANTINE"));
    /// ```
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Unknown { key, .. } | Self::Missing { key, .. } | Self::Invalid { key, .. } => {
                Some(key)
            }
            Self::Read { .. } | Self::Syntax { .. } => None,
        }
    }
}

/// Every key, in the order they are applied. `lease_duration` comes before `renew_interval`:
/// setting it resets `renew_interval` to a third of it, as the builder does.
const KEYS: &[&str] = &[
    "application_name",
    "stream",
    "streams",
    "former_stream_retention",
    "stream_discovery_interval",
    "table_name",
    "worker_id",
    "initial_position",
    "lease_duration",
    "renew_interval",
    "taker_interval",
    "shard_sync_interval",
    "parent_poll_interval",
    "finished_lease_retention",
    "max_leases_per_worker",
    "max_leases_to_steal",
    "retrieval",
    "polling.max_records",
    "polling.min_interval",
    "polling.idle_interval",
    "polling.idle_max_interval",
    "polling.prefetch_batches",
    "polling.prefetch_bytes",
    "shutdown_timeout",
    "quarantine",
    "heartbeat",
    "lease_liveness",
    "balance_by_load",
    "checkpoint_policy",
    "metrics_level",
    "metrics_refresh_interval",
    "lease_table.tags",
    "lease_table.encryption",
    "lease_table.point_in_time_recovery",
    "lease_table.deletion_protection",
];

/// `KCL_*` variables that kcl's tools and services read for themselves: never reported as
/// unknown.
const OTHER_VARIABLES: &[&str] = &[
    "KCL_APP",
    "KCL_TABLE",
    "KCL_POSITION",
    "KCL_EMULATORS_DIR",
    "KCL_LISTEN",
    "KCL_BIN",
    "KCL_CLI_LOG",
];

/// The variable for `key`: `polling.max_records` → `KCL_POLLING_MAX_RECORDS`.
fn variable(key: &str) -> String {
    format!("KCL_{}", key.to_ascii_uppercase().replace('.', "_"))
}

/// Where values come from: names keys in errors.
#[derive(Clone, Copy)]
enum Origin<'a> {
    File(Option<&'a Path>),
    Env,
}

impl Origin<'_> {
    fn name(self, key: &str) -> String {
        match self {
            Origin::File(_) => key.to_owned(),
            Origin::Env => variable(key),
        }
    }

    fn path(self) -> Option<PathBuf> {
        match self {
            Origin::File(p) => p.map(Path::to_path_buf),
            Origin::Env => None,
        }
    }

    fn invalid(self, key: &str, reason: impl Into<String>) -> ConfigLoadError {
        ConfigLoadError::Invalid {
            key: self.name(key),
            path: self.path(),
            reason: reason.into(),
        }
    }
}

impl WorkerConfig {
    /// Reads a configuration from a JSON file (keys: `docs/configuration.md`), then
    /// validates it. Unknown keys are errors. Feature `service`.
    ///
    /// # Errors
    /// A [`ConfigLoadError`] naming the file and the key at fault.
    ///
    /// ```no_run
    /// let config = kcl::WorkerConfig::from_file("/etc/orders/kcl.json")?;
    /// let builder = kcl::Worker::builder().config(config);
    /// # let _ = builder;
    /// # Ok::<(), kcl::config::ConfigLoadError>(())
    /// ```
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigLoadError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigLoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        parse_json(&text, Some(path))
    }

    /// Reads a configuration from JSON text (as [`WorkerConfig::from_file`]).
    ///
    /// # Errors
    /// A [`ConfigLoadError`] naming the key at fault.
    ///
    /// ```
    /// let config = kcl::WorkerConfig::from_json(r#"{
    ///     "application_name": "orders-app",
    ///     "stream": "orders",
    ///     "lease_duration": "20s",
    ///     "polling": { "max_records": 1000 },
    ///     "lease_table": { "tags": { "team": "orders" }, "point_in_time_recovery": true }
    /// }"#)?;
    /// assert_eq!(config.lease_duration, std::time::Duration::from_secs(20));
    /// # Ok::<(), kcl::config::ConfigLoadError>(())
    /// ```
    pub fn from_json(text: &str) -> Result<Self, ConfigLoadError> {
        parse_json(text, None)
    }

    /// Reads a configuration from the process's `KCL_*` environment variables, one per key
    /// (`KCL_APPLICATION_NAME`, `KCL_POLLING_MAX_RECORDS`, …), then validates it. Empty
    /// variables count as unset. An unknown variable that looks like ours (same section
    /// prefix, or a known name with a typo) is an error naming it; kcl's other variables
    /// (`KCL_APP`, `KCL_TABLE`, `KCL_POSITION`, …) are ignored.
    ///
    /// # Errors
    /// A [`ConfigLoadError`] naming the variable at fault.
    ///
    /// ```no_run
    /// // KCL_APPLICATION_NAME=orders-app KCL_STREAM=orders KCL_LEASE_DURATION=20s ./consumer
    /// let config = kcl::WorkerConfig::from_env()?;
    /// # Ok::<(), kcl::config::ConfigLoadError>(())
    /// ```
    pub fn from_env() -> Result<Self, ConfigLoadError> {
        Self::from_env_vars(std::env::vars_os().filter_map(|(k, v)| {
            // Only ours need be Unicode.
            let k = k.into_string().ok()?;
            let v = v.to_string_lossy().into_owned();
            Some((k, v))
        }))
    }

    /// As [`WorkerConfig::from_env`], from the given variables (others than `KCL_*` are
    /// ignored).
    ///
    /// # Errors
    /// A [`ConfigLoadError`] naming the variable at fault.
    ///
    /// ```
    /// let config = kcl::WorkerConfig::from_env_vars([
    ///     ("KCL_APPLICATION_NAME", "orders-app"),
    ///     ("KCL_STREAM", "orders"),
    ///     ("KCL_POLLING_MAX_RECORDS", "500"),
    ///     ("KCL_LEASE_TABLE_TAGS", "team=orders,env=prod"),
    /// ])?;
    /// assert_eq!(config.polling.max_records, 500);
    /// # Ok::<(), kcl::config::ConfigLoadError>(())
    /// ```
    pub fn from_env_vars<K, V>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, ConfigLoadError>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let known: BTreeMap<String, &str> = KEYS.iter().map(|k| (variable(k), *k)).collect();
        let mut values = BTreeMap::new();
        for (name, value) in vars {
            let (name, value) = (name.as_ref(), value.as_ref());
            if !name.starts_with("KCL_") || value.is_empty() {
                continue;
            }
            match known.get(name) {
                Some(key) => {
                    values.insert(*key, Value::String(value.to_owned()));
                }
                None if looks_like_ours(name, &known) => {
                    return Err(ConfigLoadError::Unknown {
                        key: name.to_owned(),
                        path: None,
                    })
                }
                None => {}
            }
        }
        from_values(values, Origin::Env)
    }
}

/// An unknown `KCL_*` variable is reported when it starts like a nested key's section
/// (`KCL_POLLING_`, `KCL_LEASE_TABLE_`) or is a known variable with up to two typos.
fn looks_like_ours(name: &str, known: &BTreeMap<String, &str>) -> bool {
    if OTHER_VARIABLES.contains(&name) {
        return false;
    }
    name.starts_with("KCL_POLLING_")
        || name.starts_with("KCL_LEASE_TABLE_")
        || known.keys().any(|k| edit_distance(k, name) <= 2)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn parse_json(text: &str, path: Option<&Path>) -> Result<WorkerConfig, ConfigLoadError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ConfigLoadError::Syntax {
        path: path.map(Path::to_path_buf),
        reason: e.to_string(),
    })?;
    from_value(value, Origin::File(path))
}

/// Flattens a JSON object into dotted keys (`polling.max_records`), rejecting unknown ones.
fn from_value(value: Value, origin: Origin<'_>) -> Result<WorkerConfig, ConfigLoadError> {
    let Value::Object(map) = value else {
        return Err(ConfigLoadError::Syntax {
            path: origin.path(),
            reason: "expected an object of keys".into(),
        });
    };
    let mut values = BTreeMap::new();
    flatten("", map, &mut values, origin)?;
    from_values(values, origin)
}

fn flatten(
    prefix: &str,
    map: Map<String, Value>,
    out: &mut BTreeMap<&'static str, Value>,
    origin: Origin<'_>,
) -> Result<(), ConfigLoadError> {
    for (k, v) in map {
        let key = format!("{prefix}{k}");
        if let Some(known) = KEYS.iter().find(|known| **known == key) {
            out.insert(known, v);
            continue;
        }
        let section = format!("{key}.");
        match v {
            Value::Object(inner) if KEYS.iter().any(|known| known.starts_with(&section)) => {
                flatten(&section, inner, out, origin)?;
            }
            _ => {
                return Err(ConfigLoadError::Unknown {
                    key,
                    path: origin.path(),
                })
            }
        }
    }
    Ok(())
}

/// Builds and validates a configuration from values by key.
fn from_values(
    mut values: BTreeMap<&'static str, Value>,
    origin: Origin<'_>,
) -> Result<WorkerConfig, ConfigLoadError> {
    let missing = |key: &'static str| ConfigLoadError::Missing {
        key: origin.name(key),
        path: origin.path(),
    };
    let app = match values.remove("application_name") {
        Some(v) => string(v, "application_name", origin)?,
        None => return Err(missing("application_name")),
    };
    // One stream, or several (multi-stream mode).
    let mut c = match (values.remove("stream"), values.remove("streams")) {
        (Some(_), Some(_)) => {
            return Err(origin.invalid("streams", "give either `stream` or `streams`"))
        }
        (Some(v), None) => WorkerConfig::new(app, string(v, "stream", origin)?),
        (None, Some(v)) => WorkerConfig::multi_stream(app, string_list(v, "streams", origin)?),
        (None, None) => return Err(missing("stream")),
    };
    for key in KEYS {
        if let Some(v) = values.remove(key) {
            set(&mut c, key, v, origin)?;
        }
    }
    c.validate().map_err(|e| invalid_config(&e, origin))?;
    Ok(c)
}

fn invalid_config(e: &ConfigError, origin: Origin<'_>) -> ConfigLoadError {
    // Validation names fields as the keys do, except the fan-out consumer's.
    let key = match e.field() {
        "retrieval.consumer_name" => "retrieval",
        f => f,
    };
    origin.invalid(key, e.reason())
}

fn set(
    c: &mut WorkerConfig,
    key: &'static str,
    v: Value,
    o: Origin<'_>,
) -> Result<(), ConfigLoadError> {
    let d = |v: Value| duration(v, key, o);
    match key {
        "table_name" => c.table_name = string(v, key, o)?,
        "former_stream_retention" => c.former_stream_retention = d(v)?,
        "stream_discovery_interval" => c.stream_discovery_interval = d(v)?,
        "worker_id" => c.worker_id = WorkerId::new(string(v, key, o)?),
        "initial_position" => {
            c.initial_position =
                parse_position(&string(v, key, o)?).map_err(|r| o.invalid(key, r))?
        }
        "lease_duration" => {
            c.lease_duration = d(v)?;
            c.renew_interval = c.lease_duration / 3;
        }
        "renew_interval" => c.renew_interval = d(v)?,
        "taker_interval" => c.taker_interval = d(v)?,
        "shard_sync_interval" => c.shard_sync_interval = d(v)?,
        "parent_poll_interval" => c.parent_poll_interval = d(v)?,
        "finished_lease_retention" => c.finished_lease_retention = d(v)?,
        "max_leases_per_worker" => {
            c.max_leases_per_worker = match &v {
                Value::String(s) if s == "unlimited" => usize::MAX,
                _ => number(v, key, o)?,
            }
        }
        "max_leases_to_steal" => c.max_leases_to_steal = number(v, key, o)?,
        "retrieval" => {
            let s = string(v, key, o)?;
            c.retrieval = match (s.as_str(), s.strip_prefix("fan-out=")) {
                ("polling", _) => Retrieval::Polling,
                (_, Some(name)) => Retrieval::FanOut {
                    consumer_name: name.to_owned(),
                },
                _ => {
                    return Err(o.invalid(
                        key,
                        format!("expected polling or fan-out=<consumer name>, got {s:?}"),
                    ))
                }
            }
        }
        "polling.max_records" => c.polling.max_records = number(v, key, o)?,
        "polling.min_interval" => c.polling.min_interval = d(v)?,
        "polling.idle_interval" => c.polling.idle_interval = d(v)?,
        "polling.idle_max_interval" => c.polling.idle_max_interval = d(v)?,
        "polling.prefetch_batches" => c.polling.prefetch_batches = number(v, key, o)?,
        "polling.prefetch_bytes" => c.polling.prefetch_bytes = number(v, key, o)?,
        "shutdown_timeout" => c.shutdown_timeout = d(v)?,
        "quarantine" => c.quarantine = d(v)?,
        "heartbeat" => {
            c.heartbeat = one_of(
                v,
                key,
                o,
                &[("thread", Heartbeat::Thread), ("task", Heartbeat::Task)],
            )?
        }
        "lease_liveness" => {
            c.lease_liveness = one_of(
                v,
                key,
                o,
                &[
                    ("per-worker", LeaseLiveness::PerWorker),
                    ("per-lease", LeaseLiveness::PerLease),
                ],
            )?
        }
        "balance_by_load" => c.balance_by_load = boolean(v, key, o)?,
        "checkpoint_policy" => {
            c.checkpoint_policy =
                parse_checkpoint_policy(&string(v, key, o)?).map_err(|r| o.invalid(key, r))?
        }
        "metrics_level" => {
            c.metrics_level = one_of(
                v,
                key,
                o,
                &[
                    ("summary", MetricsLevel::Summary),
                    ("detailed", MetricsLevel::Detailed),
                ],
            )?
        }
        "metrics_refresh_interval" => c.metrics_refresh_interval = d(v)?,
        "lease_table.tags" => c.lease_table.tags = tags(v, key, o)?,
        "lease_table.encryption" => {
            let s = string(v, key, o)?;
            c.lease_table.encryption = match (s.as_str(), s.strip_prefix("kms=")) {
                ("aws-owned", _) => TableEncryption::AwsOwned,
                ("aws-managed", _) => TableEncryption::AwsManaged,
                (_, Some(id)) => TableEncryption::CustomerKey(id.to_owned()),
                _ => {
                    return Err(o.invalid(
                        key,
                        format!("expected aws-owned, aws-managed or kms=<key id>, got {s:?}"),
                    ))
                }
            }
        }
        "lease_table.point_in_time_recovery" => {
            c.lease_table.point_in_time_recovery = boolean(v, key, o)?
        }
        "lease_table.deletion_protection" => {
            c.lease_table.deletion_protection = boolean(v, key, o)?
        }
        _ => unreachable!("every key in KEYS is handled: {key}"),
    }
    Ok(())
}

fn string(v: Value, key: &str, o: Origin<'_>) -> Result<String, ConfigLoadError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(o.invalid(key, format!("expected a string, got {other}"))),
    }
}

/// A list of strings: a JSON array, or (from an environment variable) comma-separated.
fn string_list(v: Value, key: &str, o: Origin<'_>) -> Result<Vec<String>, ConfigLoadError> {
    let list: Vec<String> = match v {
        Value::String(s) => s.split(',').map(|p| p.trim().to_owned()).collect(),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                other => Err(o.invalid(key, format!("expected strings, got {other}"))),
            })
            .collect::<Result<_, _>>()?,
        other => Err(o.invalid(key, format!("expected a list of strings, got {other}")))?,
    };
    if list.is_empty() || list.iter().any(String::is_empty) {
        return Err(o.invalid(key, "expected one or more stream names, none empty"));
    }
    Ok(list)
}

fn duration(v: Value, key: &str, o: Origin<'_>) -> Result<Duration, ConfigLoadError> {
    let s = string(v, key, o)?;
    humantime::parse_duration(&s).map_err(|e| {
        o.invalid(
            key,
            format!("expected a duration such as \"10s\" or \"250ms\", got {s:?}: {e}"),
        )
    })
}

fn number<T: std::str::FromStr + TryFrom<u64>>(
    v: Value,
    key: &str,
    o: Origin<'_>,
) -> Result<T, ConfigLoadError> {
    let parsed = match &v {
        Value::Number(n) => n.as_u64().and_then(|n| T::try_from(n).ok()),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    parsed.ok_or_else(|| o.invalid(key, format!("expected a whole number, got {v}")))
}

fn boolean(v: Value, key: &str, o: Origin<'_>) -> Result<bool, ConfigLoadError> {
    match &v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s == "true" => Ok(true),
        Value::String(s) if s == "false" => Ok(false),
        _ => Err(o.invalid(key, format!("expected true or false, got {v}"))),
    }
}

fn one_of<T: Copy>(
    v: Value,
    key: &str,
    o: Origin<'_>,
    choices: &[(&str, T)],
) -> Result<T, ConfigLoadError> {
    let s = string(v, key, o)?;
    choices
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<_> = choices.iter().map(|(n, _)| *n).collect();
            o.invalid(
                key,
                format!("expected one of {}, got {s:?}", names.join(", ")),
            )
        })
}

/// Tags: a JSON object of strings, or (in a variable) `key=value,key=value`.
fn tags(v: Value, key: &str, o: Origin<'_>) -> Result<BTreeMap<String, String>, ConfigLoadError> {
    match v {
        Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k, s)),
                other => Err(o.invalid(
                    key,
                    format!("the value of tag {k:?} must be a string, got {other}"),
                )),
            })
            .collect(),
        Value::String(s) => s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) => Ok((k.trim().to_owned(), v.trim().to_owned())),
                None => Err(o.invalid(
                    key,
                    format!("expected key=value pairs separated by commas, got {pair:?}"),
                )),
            })
            .collect(),
        other => Err(o.invalid(key, format!("expected an object of tags, got {other}"))),
    }
}

fn parse_position(s: &str) -> Result<InitialPosition, String> {
    crate::service::flags::parse_position(s).map_err(|e| e.to_string())
}

fn format_position(p: InitialPosition) -> String {
    match p {
        InitialPosition::TrimHorizon => "trim-horizon".into(),
        InitialPosition::Latest => "latest".into(),
        InitialPosition::AtTimestamp(t) => format!("at-timestamp={}", humantime::format_rfc3339(t)),
    }
}

/// `manual`, `after-every-batch`, `every-records=<n>`, `every-interval=<duration>` or
/// `every=<n>,<duration>`.
fn parse_checkpoint_policy(s: &str) -> Result<CheckpointPolicy, String> {
    let bad = || {
        format!(
            "expected manual, after-every-batch, every-records=<n>, every-interval=<duration> \
             or every=<n>,<duration>, got {s:?}"
        )
    };
    let records = |n: &str| n.trim().parse::<u64>().map_err(|_| bad());
    let interval = |t: &str| humantime::parse_duration(t.trim()).map_err(|_| bad());
    if s == "manual" {
        return Ok(CheckpointPolicy::Manual);
    }
    if s == "after-every-batch" {
        return Ok(CheckpointPolicy::after_every_batch());
    }
    if let Some(n) = s.strip_prefix("every-records=") {
        return Ok(CheckpointPolicy::every_records(records(n)?));
    }
    if let Some(t) = s.strip_prefix("every-interval=") {
        return Ok(CheckpointPolicy::every_interval(interval(t)?));
    }
    if let Some((n, t)) = s.strip_prefix("every=").and_then(|r| r.split_once(',')) {
        return Ok(CheckpointPolicy::every(records(n)?, interval(t)?));
    }
    Err(bad())
}

fn format_checkpoint_policy(p: CheckpointPolicy) -> String {
    let d = |t: Duration| humantime::format_duration(t).to_string();
    match p {
        CheckpointPolicy::Automatic {
            records: None,
            interval: None,
        } => "after-every-batch".into(),
        CheckpointPolicy::Automatic {
            records: Some(n),
            interval: None,
        } => format!("every-records={n}"),
        CheckpointPolicy::Automatic {
            records: None,
            interval: Some(t),
        } => format!("every-interval={}", d(t)),
        CheckpointPolicy::Automatic {
            records: Some(n),
            interval: Some(t),
        } => format!("every={n},{}", d(t)),
        _ => "manual".into(),
    }
}

/// The configuration as the JSON object [`WorkerConfig::from_json`] reads.
fn to_value(c: &WorkerConfig) -> Value {
    let d = |t: Duration| Value::String(humantime::format_duration(t).to_string());
    let s = |t: &str| Value::String(t.to_owned());
    let p = &c.polling;
    let lt = &c.lease_table;
    let mut value = serde_json::json!({
        "application_name": c.application_name,
        "stream": c.stream,
        "streams": c.streams,
        "former_stream_retention": d(c.former_stream_retention),
        "stream_discovery_interval": d(c.stream_discovery_interval),
        "table_name": c.table_name,
        "worker_id": c.worker_id.as_str(),
        "initial_position": format_position(c.initial_position),
        "lease_duration": d(c.lease_duration),
        "renew_interval": d(c.renew_interval),
        "taker_interval": d(c.taker_interval),
        "shard_sync_interval": d(c.shard_sync_interval),
        "parent_poll_interval": d(c.parent_poll_interval),
        "finished_lease_retention": d(c.finished_lease_retention),
        "max_leases_per_worker": if c.max_leases_per_worker == usize::MAX {
            s("unlimited")
        } else {
            Value::from(c.max_leases_per_worker)
        },
        "max_leases_to_steal": c.max_leases_to_steal,
        "retrieval": match &c.retrieval {
            Retrieval::FanOut { consumer_name } => format!("fan-out={consumer_name}"),
            _ => "polling".into(),
        },
        "polling": {
            "max_records": p.max_records,
            "min_interval": d(p.min_interval),
            "idle_interval": d(p.idle_interval),
            "idle_max_interval": d(p.idle_max_interval),
            "prefetch_batches": p.prefetch_batches,
            "prefetch_bytes": p.prefetch_bytes,
        },
        "shutdown_timeout": d(c.shutdown_timeout),
        "quarantine": d(c.quarantine),
        "heartbeat": if c.heartbeat == Heartbeat::Task { "task" } else { "thread" },
        "lease_liveness": if c.lease_liveness == LeaseLiveness::PerLease { "per-lease" } else { "per-worker" },
        "balance_by_load": c.balance_by_load,
        "checkpoint_policy": format_checkpoint_policy(c.checkpoint_policy),
        "metrics_level": c.metrics_level.name(),
        "metrics_refresh_interval": d(c.metrics_refresh_interval),
        "lease_table": {
            "tags": lt.tags,
            "encryption": match &lt.encryption {
                TableEncryption::AwsManaged => "aws-managed".to_owned(),
                TableEncryption::CustomerKey(id) => format!("kms={id}"),
                _ => "aws-owned".to_owned(),
            },
            "point_in_time_recovery": lt.point_in_time_recovery,
            "deletion_protection": lt.deletion_protection,
        },
    });
    // One of `stream` (single-stream mode) and `streams` (multi-stream mode).
    if let Some(object) = value.as_object_mut() {
        object.remove(if c.is_multi_stream() {
            "stream"
        } else {
            "streams"
        });
    }
    value
}

/// Writes every field, in the format [`WorkerConfig::from_json`] and `Deserialize` read.
///
/// ```
/// let config = kcl::WorkerConfig::new("orders-app", "orders");
/// let json = serde_json::to_string(&config).unwrap();
/// let back: kcl::WorkerConfig = serde_json::from_str(&json).unwrap();
/// assert_eq!(back.lease_duration, config.lease_duration);
/// ```
impl serde::Serialize for WorkerConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        to_value(self).serialize(serializer)
    }
}

/// Reads the keys of [`WorkerConfig::from_json`] from any self-describing format; unknown
/// keys and invalid values are errors naming the key, and the result is validated.
///
/// ```
/// let config: kcl::WorkerConfig =
///     serde_json::from_str(r#"{"application_name": "a-app", "stream": "s", "quarantine": "1m"}"#).unwrap();
/// assert_eq!(config.quarantine, std::time::Duration::from_secs(60));
/// ```
impl<'de> serde::Deserialize<'de> for WorkerConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        from_value(value, Origin::File(None)).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("application_name".into(), "app".into());
        m.insert("stream".into(), "orders".into());
        m
    }

    /// Sets the dotted `key` to `v` in a JSON object.
    fn with(key: &str, v: Value) -> Value {
        let mut m = base();
        match key.split_once('.') {
            Some((section, leaf)) => {
                m.insert(section.into(), serde_json::json!({ leaf: v }));
            }
            None => {
                m.insert(key.into(), v);
            }
        }
        Value::Object(m)
    }

    #[test]
    fn good_values_parse() {
        use serde_json::json;
        let t = |key: &str, v: Value| {
            WorkerConfig::from_json(&with(key, v).to_string())
                .unwrap_or_else(|e| panic!("{key}: {e}"))
        };
        assert_eq!(t("table_name", json!("leases")).table_name, "leases");
        assert_eq!(t("worker_id", json!("pod-1")).worker_id.as_str(), "pod-1");
        assert_eq!(
            t("initial_position", json!("latest")).initial_position,
            InitialPosition::Latest
        );
        assert!(matches!(
            t(
                "initial_position",
                json!("at-timestamp=2026-11-25T10:00:00Z")
            )
            .initial_position,
            InitialPosition::AtTimestamp(_)
        ));
        let c = t("lease_duration", json!("30s"));
        assert_eq!(
            (c.lease_duration, c.renew_interval),
            (Duration::from_secs(30), Duration::from_secs(10))
        );
        assert_eq!(
            t("taker_interval", json!("1s 500ms")).taker_interval,
            Duration::from_millis(1500)
        );
        assert_eq!(
            t("max_leases_per_worker", json!(8)).max_leases_per_worker,
            8
        );
        assert_eq!(
            t("max_leases_per_worker", json!("unlimited")).max_leases_per_worker,
            usize::MAX
        );
        assert_eq!(t("max_leases_to_steal", json!("2")).max_leases_to_steal, 2);
        assert_eq!(
            t("retrieval", json!("fan-out=orders-app")).retrieval,
            Retrieval::FanOut {
                consumer_name: "orders-app".into()
            }
        );
        assert_eq!(
            t("polling.max_records", json!(100)).polling.max_records,
            100
        );
        assert_eq!(
            t("polling.idle_max_interval", json!("2s"))
                .polling
                .idle_max_interval,
            Duration::from_secs(2)
        );
        assert_eq!(t("heartbeat", json!("task")).heartbeat, Heartbeat::Task);
        assert_eq!(
            t("lease_liveness", json!("per-lease")).lease_liveness,
            LeaseLiveness::PerLease
        );
        assert!(!t("balance_by_load", json!(false)).balance_by_load);
        assert_eq!(
            t("checkpoint_policy", json!("every=1000,10s")).checkpoint_policy,
            CheckpointPolicy::every(1000, Duration::from_secs(10))
        );
        assert_eq!(
            t("checkpoint_policy", json!("after-every-batch")).checkpoint_policy,
            CheckpointPolicy::after_every_batch()
        );
        assert_eq!(
            t("metrics_level", json!("detailed")).metrics_level,
            MetricsLevel::Detailed
        );
        assert_eq!(
            t("lease_table.tags", json!({"team": "orders"}))
                .lease_table
                .tags["team"],
            "orders"
        );
        assert_eq!(
            t("lease_table.encryption", json!("kms=alias/leases"))
                .lease_table
                .encryption,
            TableEncryption::CustomerKey("alias/leases".into())
        );
        assert!(
            t("lease_table.point_in_time_recovery", json!(true))
                .lease_table
                .point_in_time_recovery
        );
        assert!(
            t("lease_table.deletion_protection", json!("true"))
                .lease_table
                .deletion_protection
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        use serde_json::json;
        let cases = [
            ("table_name", json!("ab")),
            ("table_name", json!(7)),
            ("worker_id", json!("")),
            ("initial_position", json!("oldest")),
            ("lease_duration", json!("10")),
            ("lease_duration", json!(10)),
            ("renew_interval", json!("1h")),
            ("taker_interval", json!("0s")),
            ("max_leases_per_worker", json!(0)),
            ("max_leases_per_worker", json!(-1)),
            ("max_leases_to_steal", json!("many")),
            ("retrieval", json!("fanout")),
            ("retrieval", json!("fan-out=bad name")),
            ("polling.max_records", json!(10_001)),
            ("polling.idle_interval", json!("1h")),
            ("polling.prefetch_bytes", json!(1)),
            ("heartbeat", json!("fiber")),
            ("lease_liveness", json!("per-shard")),
            ("balance_by_load", json!("yes")),
            ("checkpoint_policy", json!("every=0,1s")),
            ("checkpoint_policy", json!("sometimes")),
            ("metrics_level", json!("verbose")),
            ("metrics_refresh_interval", json!("2m")),
            ("lease_table.tags", json!({"aws:x": "y"})),
            ("lease_table.tags", json!({"team": 1})),
            ("lease_table.encryption", json!("kms=")),
            ("lease_table.encryption", json!("aws")),
            ("lease_table.deletion_protection", json!(1)),
        ];
        for (key, v) in cases {
            let err = WorkerConfig::from_json(&with(key, v.clone()).to_string())
                .expect_err(&format!("{key} = {v} was accepted"));
            assert_eq!(err.key(), Some(key), "{key} = {v}: {err}");
            assert!(
                matches!(err, ConfigLoadError::Invalid { .. }),
                "{key} = {v}: {err}"
            );
        }
    }

    #[test]
    fn unknown_and_missing_keys_are_named() {
        let err =
            WorkerConfig::from_json(&with("lease_duraton", "5s".into()).to_string()).unwrap_err();
        assert!(
            matches!(&err, ConfigLoadError::Unknown { key, .. } if key == "lease_duraton"),
            "{err}"
        );
        let err =
            WorkerConfig::from_json(&with("polling.max_record", 5.into()).to_string()).unwrap_err();
        assert!(
            matches!(&err, ConfigLoadError::Unknown { key, .. } if key == "polling.max_record"),
            "{err}"
        );
        let err = WorkerConfig::from_json(r#"{"stream": "s"}"#).unwrap_err();
        assert!(
            matches!(&err, ConfigLoadError::Missing { key, .. } if key == "application_name"),
            "{err}"
        );
        assert!(matches!(
            WorkerConfig::from_json("[1]").unwrap_err(),
            ConfigLoadError::Syntax { .. }
        ));
    }

    #[test]
    fn file_errors_name_the_file_and_key() {
        let path = std::env::temp_dir().join(format!("kcl-config-{}.json", std::process::id()));
        std::fs::write(
            &path,
            r#"{"application_name": "app", "stream": "s", "quarantine": "soon"}"#,
        )
        .unwrap();
        let err = WorkerConfig::from_file(&path).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert_eq!(err.key(), Some("quarantine"));
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(matches!(
            WorkerConfig::from_file(&path).unwrap_err(),
            ConfigLoadError::Read { .. }
        ));
    }

    #[test]
    fn environment_variables() {
        let vars = |extra: &[(&str, &str)]| {
            let mut v = vec![
                ("KCL_APPLICATION_NAME", "app"),
                ("KCL_STREAM", "orders"),
                ("KCL_APP", "ignored"),
                ("KCL_EMULATORS_DIR", "/x"),
                ("KCL_SOMETHING_ELSE", "not ours"),
                ("KCL_QUARANTINE", ""),
                ("PATH", "/bin"),
            ];
            v.extend_from_slice(extra);
            WorkerConfig::from_env_vars(v)
        };
        let c = vars(&[
            ("KCL_LEASE_DURATION", "30s"),
            ("KCL_POLLING_MAX_RECORDS", "250"),
            ("KCL_LEASE_TABLE_TAGS", "team=orders, env=prod"),
            ("KCL_LEASE_TABLE_ENCRYPTION", "aws-managed"),
            ("KCL_LEASE_TABLE_POINT_IN_TIME_RECOVERY", "true"),
        ])
        .unwrap();
        assert_eq!(c.lease_duration, Duration::from_secs(30));
        assert_eq!(c.polling.max_records, 250);
        assert_eq!(c.lease_table.tags.len(), 2);
        assert_eq!(c.lease_table.tags["env"], "prod");
        assert_eq!(c.lease_table.encryption, TableEncryption::AwsManaged);
        assert!(c.lease_table.point_in_time_recovery);
        for (name, value) in [
            ("KCL_POLLING_MAX_RECORDS", "lots"),
            ("KCL_LEASE_TABLE_TAGS", "team"),
            ("KCL_RENEW_INTERVAL", "9s"),
            ("KCL_POLLING_MAX_RECORD", "5"),
            ("KCL_LEASE_DURATON", "5s"),
            ("KCL_LEASE_TABLE_PITR", "true"),
        ] {
            let err = vars(&[(name, value)]).expect_err(name);
            assert_eq!(err.key(), Some(name), "{err}");
        }
        let err = WorkerConfig::from_env_vars([("KCL_STREAM", "s")]).unwrap_err();
        assert_eq!(err.key(), Some("KCL_APPLICATION_NAME"));
    }

    #[test]
    fn serialize_round_trips_every_field() {
        let mut c = WorkerConfig::new("app", "orders");
        c.initial_position = InitialPosition::AtTimestamp(
            std::time::UNIX_EPOCH + Duration::from_secs(1_790_000_000),
        );
        c.lease_duration = Duration::from_millis(12_500);
        c.renew_interval = Duration::from_secs(4);
        c.max_leases_per_worker = 9;
        c.retrieval = Retrieval::FanOut {
            consumer_name: "c".into(),
        };
        c.polling.prefetch_bytes = 5 << 20;
        c.heartbeat = Heartbeat::Task;
        c.lease_liveness = LeaseLiveness::PerLease;
        c.balance_by_load = false;
        c.checkpoint_policy = CheckpointPolicy::every_interval(Duration::from_secs(3));
        c.metrics_level = MetricsLevel::Detailed;
        c.lease_table.tags.insert("a".into(), "b".into());
        c.lease_table.encryption = TableEncryption::CustomerKey("k".into());
        c.lease_table.deletion_protection = true;
        let json = serde_json::to_string(&c).unwrap();
        let back: WorkerConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&c).unwrap()
        );
        assert_eq!(back.initial_position, c.initial_position);
        assert_eq!(back.lease_table, c.lease_table);
        assert_eq!(back.worker_id, c.worker_id);
        // Every key is written.
        let mut written = BTreeMap::new();
        flatten(
            "",
            serde_json::from_str(&json).unwrap(),
            &mut written,
            Origin::File(None),
        )
        .unwrap();
        // Every key but `streams`, which only a multi-stream configuration writes (instead
        // of `stream`).
        assert_eq!(written.len(), KEYS.len() - 1);
    }

    #[test]
    fn multi_stream_configurations_round_trip_and_refuse_both_modes() {
        let mut c = WorkerConfig::multi_stream("app", ["orders", "1:refunds:2"]);
        c.former_stream_retention = Duration::from_secs(60);
        c.stream_discovery_interval = Duration::from_secs(30);
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("\"stream\":"), "{json}");
        let back = WorkerConfig::from_json(&json).unwrap();
        assert_eq!(back.streams, c.streams);
        assert_eq!(back.former_stream_retention, Duration::from_secs(60));
        assert_eq!(back.stream_discovery_interval, Duration::from_secs(30));

        let env = WorkerConfig::from_env_vars([
            ("KCL_APPLICATION_NAME", "app"),
            ("KCL_STREAMS", "orders, refunds"),
        ])
        .unwrap();
        assert_eq!(env.streams, ["orders", "refunds"]);

        let bad = [
            (
                r#"{"application_name":"a","stream":"s","streams":["t"]}"#,
                "streams",
            ),
            (r#"{"application_name":"a","streams":[]}"#, "streams"),
            (r#"{"application_name":"a","streams":["ok",1]}"#, "streams"),
            (
                r#"{"application_name":"a","streams":["x:orders:1"]}"#,
                "streams",
            ),
            (r#"{"application_name":"a","streams":["a","a"]}"#, "streams"),
            (
                r#"{"application_name":"a","streams":["a"],"stream_discovery_interval":"10ms"}"#,
                "stream_discovery_interval",
            ),
        ];
        for (json, key) in bad {
            let err = WorkerConfig::from_json(json).expect_err(json);
            assert_eq!(err.key(), Some(key), "{json}: {err}");
        }
    }
}
