//! `kcl leases`: the lease table, each lease's lag behind its shard's tip, and each worker.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use kcl::admin::summary::{lag_position, worker_summary, WorkerSummary};
use kcl::lease::LeaseStore;
use kcl::retrieval::aws::AwsKinesis;
use kcl::retrieval::{KinesisApi, KinesisApiError};
use kcl::{Lease, ShardId};

use crate::output::{elided, fixed, print_json, print_table, progress};
use crate::{parse_duration, AppArgs, Aws};

/// `kcl leases`'s flags.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    app: AppArgs,
    /// The stream the leases are for: adds each lease's lag behind its shard's tip
    /// (`lagMillis` in JSON).
    #[arg(long)]
    stream: Option<String>,
    /// Print only the per-worker summary.
    #[arg(long)]
    workers: bool,
    /// Read the worker table twice this far apart, to tell moving heartbeats from still ones
    /// (e.g. `5s`; default: read once).
    #[arg(long, value_parser = parse_duration)]
    observe: Option<Duration>,
    /// Print JSON: an array of leases with the table's attribute names (or, with --workers, an
    /// array of workers).
    #[arg(long)]
    json: bool,
}

/// A lease's lag, as measured.
enum Lag {
    /// `MillisBehindLatest` after the checkpoint.
    Millis(u64),
    /// Finished (`SHARD_END`): nothing left.
    Finished,
    /// The shard is no longer listed (past retention).
    Expired,
    /// It could not be measured.
    Unknown(String),
}

impl Lag {
    fn cell(&self) -> String {
        match self {
            Self::Millis(ms) => format_millis(*ms),
            Self::Finished => "done".into(),
            Self::Expired => "expired".into(),
            Self::Unknown(_) => "?".into(),
        }
    }
}

/// `1234` → `1.2s`, `0` → `0s`, `93000` → `1m33s`.
fn format_millis(ms: u64) -> String {
    match ms {
        0 => "0s".into(),
        1..=999 => format!("{ms}ms"),
        1000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let aws = Aws::load().await;
    let (store, worker_table) = aws.existing_store(&args.app).await?;
    let table = crate::read_leases(&store).await?;
    let workers = if worker_table {
        match store.list_workers(true).await {
            Ok(w) => Some(w),
            Err(e) => {
                progress(&format!("warning: the worker table could not be read: {e}"));
                None
            }
        }
    } else {
        None
    };
    let workers_later = match (&workers, args.observe) {
        (Some(_), Some(d)) => {
            progress(&format!("observing the worker heartbeats for {d:?}"));
            tokio::time::sleep(d).await;
            store.list_workers(true).await.ok()
        }
        _ => None,
    };
    let summary = worker_summary(&table.leases, workers.as_ref(), workers_later.as_ref());
    if args.workers {
        return print_workers(&summary, args.json);
    }
    let lags = match &args.stream {
        Some(stream) => Some(
            measure_lags(
                &aws,
                stream,
                &kcl::admin::of_stream(table.leases.clone(), stream),
            )
            .await?,
        ),
        None => None,
    };
    if args.json {
        let items: Vec<serde_json::Value> = table
            .leases
            .iter()
            .map(|l| {
                let mut v = lease_json(l);
                if let (Some(lags), Some(map)) = (&lags, v.as_object_mut()) {
                    let lag = lags.get(&l.key);
                    map.insert(
                        "lagMillis".into(),
                        match lag {
                            Some(Lag::Millis(ms)) => serde_json::Value::from(*ms),
                            Some(Lag::Finished) => serde_json::Value::from(0),
                            _ => serde_json::Value::Null,
                        },
                    );
                    map.insert(
                        "lagState".into(),
                        serde_json::Value::from(match lag {
                            Some(Lag::Millis(_)) => "measured",
                            Some(Lag::Finished) => "finished",
                            Some(Lag::Expired) => "expired",
                            _ => "unknown",
                        }),
                    );
                    if let Some(Lag::Unknown(e)) = lag {
                        map.insert("lagError".into(), serde_json::Value::from(e.as_str()));
                    }
                }
                v
            })
            .collect();
        return print_json(&serde_json::Value::Array(items));
    }
    print_leases(&table.leases, lags.as_ref());
    println!();
    print_workers(&summary, false)
}

/// `MillisBehindLatest` of one `GetRecords` (limit 1) just after each lease's checkpoint.
async fn measure_lags(
    aws: &Aws,
    stream: &str,
    leases: &[Lease],
) -> anyhow::Result<BTreeMap<kcl::lease::LeaseKey, Lag>> {
    let kinesis = AwsKinesis::new(aws.kinesis());
    let listed = kinesis
        .list_shards(stream)
        .await
        .with_context(|| format!("listing the shards of --stream {stream}"))?;
    let listed: std::collections::BTreeSet<ShardId> = listed.into_iter().map(|s| s.id).collect();
    let mut out = BTreeMap::new();
    if leases.len() > 20 {
        progress(&format!("measuring the lag of {} leases", leases.len()));
    }
    for (i, l) in leases.iter().enumerate() {
        let shard = l.shard_id();
        let lag = if !listed.contains(&shard) {
            Lag::Expired
        } else {
            match lag_position(&l.checkpoint) {
                None => Lag::Finished,
                Some(pos) => match lag_of(&kinesis, stream, &shard, &pos).await {
                    Ok(Some(ms)) => Lag::Millis(ms),
                    Ok(None) => Lag::Unknown("no MillisBehindLatest in the answer".into()),
                    Err(e) => {
                        progress(&format!(
                            "warning: the lag of {shard} could not be measured: {e}"
                        ));
                        Lag::Unknown(e.to_string())
                    }
                },
            }
        };
        out.insert(l.key.clone(), lag);
        if leases.len() > 20 && (i + 1) % 50 == 0 {
            progress(&format!("  {} of {}", i + 1, leases.len()));
        }
    }
    Ok(out)
}

async fn lag_of(
    kinesis: &AwsKinesis,
    stream: &str,
    shard: &ShardId,
    pos: &kcl::retrieval::IteratorPosition,
) -> Result<Option<u64>, KinesisApiError> {
    let it = kinesis.get_shard_iterator(stream, shard, pos).await?;
    Ok(kinesis.get_records(&it, 1).await?.millis_behind_latest)
}

fn print_leases(leases: &[Lease], lags: Option<&BTreeMap<kcl::lease::LeaseKey, Lag>>) {
    let mut columns = vec![
        elided("LEASE"),
        elided("OWNER"),
        fixed("COUNTER"),
        elided("CHECKPOINT"),
    ];
    if lags.is_some() {
        columns.push(fixed("LAG"));
    }
    columns.push(elided("PARENTS"));
    let rows: Vec<Vec<String>> = leases
        .iter()
        .map(|l| {
            let owner = match (&l.owner, &l.checkpoint_owner) {
                (None, _) => "-".to_owned(),
                (Some(o), None) => o.to_string(),
                (Some(o), Some(from)) => format!("{from}>{o}"),
            };
            let mut row = vec![
                l.key.to_string(),
                owner,
                l.counter.to_string(),
                l.checkpoint.to_string(),
            ];
            if let Some(lags) = lags {
                row.push(lags.get(&l.key).map_or("?".into(), Lag::cell));
            }
            row.push(
                l.parent_shard_ids
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            );
            row
        })
        .collect();
    print_table(&columns, &rows);
}

fn print_workers(summary: &[WorkerSummary], json: bool) -> anyhow::Result<()> {
    if json {
        let items: Vec<serde_json::Value> = summary
            .iter()
            .map(|w| {
                serde_json::json!({
                    "workerId": w.worker.as_str(),
                    "leases": w.leases,
                    "handingOver": w.handing_over,
                    "receiving": w.receiving,
                    "heartbeatState": w.heartbeat.label(),
                    "heartbeat": w.heartbeat.value(),
                    "handoffNotices": w.notices,
                    "draining": w.draining,
                })
            })
            .collect();
        return print_json(&serde_json::Value::Array(items));
    }
    let columns = [
        elided("WORKER"),
        fixed("LEASES"),
        fixed("HANDING-OVER"),
        fixed("RECEIVING"),
        fixed("HEARTBEAT"),
        fixed("NOTICES"),
    ];
    let rows: Vec<Vec<String>> = summary
        .iter()
        .map(|w| {
            let mut hb = match w.heartbeat.value() {
                Some(v) => format!("{} {v}", w.heartbeat.label()),
                None => w.heartbeat.label().to_owned(),
            };
            if w.draining {
                hb.push_str(" draining");
            }
            vec![
                w.worker.to_string(),
                w.leases.to_string(),
                w.handing_over.to_string(),
                w.receiving.to_string(),
                hb,
                w.notices.to_string(),
            ]
        })
        .collect();
    print_table(&columns, &rows);
    Ok(())
}

/// A lease as JSON, with the lease table's attribute names and types.
pub(crate) fn lease_json(l: &Lease) -> serde_json::Value {
    use kcl::lease::item::{encode, AttrValue};
    let mut map = serde_json::Map::new();
    for (name, value) in encode(l) {
        let v = match value {
            AttrValue::S(s) => serde_json::Value::String(s),
            AttrValue::N(n) => n
                .parse::<u64>()
                .map(serde_json::Value::from)
                .unwrap_or(serde_json::Value::String(n)),
            AttrValue::Ss(v) => serde_json::Value::from(v),
            AttrValue::B(b) => {
                serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
            AttrValue::Other(t) => serde_json::Value::String(format!("<{t}>")),
        };
        map.insert(name, v);
    }
    serde_json::Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lags_read_as_durations() {
        for (ms, want) in [(0, "0s"), (850, "850ms"), (1234, "1.2s"), (93_000, "1m33s")] {
            assert_eq!(format_millis(ms), want);
        }
    }
}
