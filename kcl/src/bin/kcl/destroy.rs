//! `kcl destroy`: deletes an application's lease table and worker table, and deregisters its
//! enhanced fan-out consumer.

use std::time::Duration;

use anyhow::{bail, Context};
use aws_sdk_dynamodb::error::ProvideErrorMetadata as _;
use kcl::admin::summary::{worker_summary, Heartbeat};
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::lease::LeaseStore;
use tokio::time::Instant;

use crate::output::{confirm, print_json, progress};
use crate::{parse_duration, AppArgs, Aws};

/// How often the tables are read while watching for live workers, and while waiting for a
/// deletion.
const POLL: Duration = Duration::from_millis(500);
/// How long a table may take to disappear after `DeleteTable`.
const DELETE_TIMEOUT: Duration = Duration::from_secs(120);

/// `kcl destroy`'s flags.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    app: AppArgs,
    /// The stream of the enhanced fan-out consumer to deregister (with --fan-out).
    #[arg(long, requires = "fan_out")]
    stream: Option<String>,
    /// The enhanced fan-out consumer to deregister (with --stream).
    #[arg(long, requires = "stream")]
    fan_out: Option<String>,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    /// Delete even while worker heartbeats (or lease counters) move: live workers then fail.
    #[arg(long)]
    force: bool,
    /// The fleet's lease duration: how long heartbeats and lease counters are watched for
    /// movement before the workers are judged gone.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// Print JSON: what was deleted.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let aws = Aws::load().await;
    let dynamo = aws.dynamodb();
    let store = DynamoLeaseStore::new(dynamo.clone(), args.app.table());
    let (lease_table, worker_table) = store
        .open_existing()
        .await
        .with_context(|| format!("reading the lease table {:?}", args.app.table()))?;
    let worker_table_exists = worker_table || table_exists(&dynamo, &store.worker_table()).await?;
    let consumer = match (&args.stream, &args.fan_out) {
        (Some(stream), Some(name)) => Some(find_consumer(&aws, stream, name).await?),
        _ => None,
    };
    let mut what = Vec::new();
    let leases = if lease_table {
        let t = store.list().await.context("reading the lease table")?;
        what.push(format!(
            "the lease table {:?} ({} leases)",
            args.app.table(),
            t.leases.len() + t.malformed.len()
        ));
        Some(t)
    } else {
        None
    };
    if worker_table_exists {
        what.push(format!("the worker table {:?}", store.worker_table()));
    }
    if let Some(c) = &consumer {
        match &c.arn {
            Some(_) => what.push(format!(
                "the enhanced fan-out consumer {:?} of the stream {:?}",
                c.name, c.stream
            )),
            None => progress(&format!(
                "the stream {:?} has no consumer {:?} (from --fan-out): nothing to deregister",
                c.stream, c.name
            )),
        }
    }
    if what.is_empty() {
        bail!(
            "nothing to delete: there is no table {:?} (from {}) nor {:?}",
            args.app.table(),
            args.app.table_flag(),
            store.worker_table()
        );
    }
    progress(&format!("will delete:\n  {}", what.join("\n  ")));
    if let Some(t) = &leases {
        let live = watch_for_live(&store, worker_table, t, args.lease_duration).await?;
        if let Some(why) = live {
            if !args.force {
                bail!(
                    "{why}: workers still run on this table; stop them first, or pass --force \
                     to delete it under them (they then fail)"
                );
            }
            progress(&format!("warning: {why}; deleting anyway (--force)"));
        }
    }
    if !confirm("Delete all of the above?", args.yes)? {
        bail!("not confirmed: nothing was deleted");
    }
    let mut deleted = serde_json::Map::new();
    if let Some(c) = &consumer {
        if let Some(arn) = &c.arn {
            progress(&format!("deregistering the consumer {:?}", c.name));
            aws.kinesis()
                .deregister_stream_consumer()
                .consumer_arn(arn)
                .send()
                .await
                .with_context(|| format!("deregistering --fan-out {}", c.name))?;
            deleted.insert("consumer".into(), serde_json::Value::from(c.name.as_str()));
        }
    }
    if worker_table_exists {
        delete_table(&dynamo, &store.worker_table()).await?;
        deleted.insert(
            "workerTable".into(),
            serde_json::Value::from(store.worker_table()),
        );
    }
    if lease_table {
        delete_table(&dynamo, args.app.table()).await?;
        deleted.insert(
            "leaseTable".into(),
            serde_json::Value::from(args.app.table()),
        );
    }
    if args.json {
        return print_json(&serde_json::json!({ "deleted": deleted }));
    }
    println!("deleted {}", what.join(", "));
    Ok(())
}

/// Watches the worker heartbeats and the lease counters of owners without a worker item for
/// up to `lease_duration`; says what moved, if anything did.
async fn watch_for_live(
    store: &DynamoLeaseStore,
    worker_table: bool,
    first: &kcl::lease::LeaseTable,
    lease_duration: Duration,
) -> anyhow::Result<Option<String>> {
    let workers_first = match worker_table {
        true => store.list_workers(true).await.ok(),
        false => None,
    };
    let owned = first.leases.iter().any(|l| l.owner.is_some());
    let items = workers_first
        .as_ref()
        .is_some_and(|w| w.workers.iter().any(|i| i.fenced_by.is_none()));
    if !owned && !items {
        return Ok(None);
    }
    progress(&format!(
        "watching for live workers for up to {lease_duration:?}"
    ));
    let started = Instant::now();
    while started.elapsed() < lease_duration {
        tokio::time::sleep(POLL.min(lease_duration.saturating_sub(started.elapsed()))).await;
        let workers_now = match worker_table {
            true => store.list_workers(true).await.ok(),
            false => None,
        };
        let summary = worker_summary(&first.leases, workers_first.as_ref(), workers_now.as_ref());
        if let Some(w) = summary
            .iter()
            .find(|w| matches!(w.heartbeat, Heartbeat::Moving(_)))
        {
            return Ok(Some(format!("the heartbeat of worker {} moves", w.worker)));
        }
        let now = store.list().await.context("reading the lease table")?;
        for l in &now.leases {
            let before = first.leases.iter().find(|b| b.key == l.key);
            if l.owner.is_some() && before.is_some_and(|b| b.counter != l.counter) {
                return Ok(Some(format!(
                    "the lease {} is being renewed (by {})",
                    l.key,
                    l.owner.as_ref().map_or("?", |o| o.as_str())
                )));
            }
        }
    }
    Ok(None)
}

async fn table_exists(client: &aws_sdk_dynamodb::Client, name: &str) -> anyhow::Result<bool> {
    match client.describe_table().table_name(name).send().await {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context(format!("DescribeTable {name:?}"))),
    }
}

/// `DeleteTable`, then waits until the table is gone.
async fn delete_table(client: &aws_sdk_dynamodb::Client, name: &str) -> anyhow::Result<()> {
    progress(&format!("deleting the table {name:?}"));
    match client.delete_table().table_name(name).send().await {
        Ok(_) => {}
        Err(e) if e.code() == Some("ResourceNotFoundException") => return Ok(()),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("DeleteTable {name:?}"))),
    }
    let started = Instant::now();
    while table_exists(client, name).await? {
        if started.elapsed() > DELETE_TIMEOUT {
            bail!("the table {name:?} was still there {DELETE_TIMEOUT:?} after DeleteTable");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// An enhanced fan-out consumer, found or not.
struct Consumer {
    stream: String,
    name: String,
    arn: Option<String>,
}

async fn find_consumer(aws: &Aws, stream: &str, name: &str) -> anyhow::Result<Consumer> {
    let kinesis = aws.kinesis();
    let summary = kinesis
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .with_context(|| format!("describing --stream {stream}"))?;
    let stream_arn = summary
        .stream_description_summary()
        .map(|s| s.stream_arn().to_owned())
        .with_context(|| format!("DescribeStreamSummary of --stream {stream} returned no ARN"))?;
    let arn = match kinesis
        .describe_stream_consumer()
        .stream_arn(&stream_arn)
        .consumer_name(name)
        .send()
        .await
    {
        Ok(out) => out
            .consumer_description()
            .map(|c| c.consumer_arn().to_owned()),
        Err(e) if e.code() == Some("ResourceNotFoundException") => None,
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "describing the consumer --fan-out {name} of --stream {stream}"
            )))
        }
    };
    Ok(Consumer {
        stream: stream.to_owned(),
        name: name.to_owned(),
        arn,
    })
}
