//! `kcl shards`: the stream's shard tree, each shard's state, and the lease covering it.

use anyhow::Context;
use kcl::admin::shards::{shard_tree, ShardNode, ShardState};
use kcl::retrieval::aws::AwsKinesis;
use kcl::retrieval::KinesisApi;
use kcl::shard::HashKeyRange;

use crate::output::{elided, fixed, print_json, print_table};
use crate::Aws;

/// `kcl shards`'s flags.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The stream.
    #[arg(long)]
    stream: String,
    /// The application whose leases to show (its lease table, unless --table is given).
    #[arg(long)]
    app: Option<String>,
    /// The lease table (default: the application name).
    #[arg(long, requires = "app")]
    table: Option<String>,
    /// Print JSON: an array of shards, parents before children.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let aws = Aws::load().await;
    let shards = AwsKinesis::new(aws.kinesis())
        .list_shards(&args.stream)
        .await
        .with_context(|| format!("listing the shards of --stream {}", args.stream))?;
    let leases = match &args.app {
        Some(app) => {
            let app = crate::AppArgs {
                app: app.clone(),
                table: args.table.clone(),
            };
            let (store, _) = aws.existing_store(&app).await?;
            let table = crate::read_leases(&store).await?;
            Some(kcl::admin::of_stream(table.leases, &args.stream))
        }
        None => None,
    };
    let nodes = shard_tree(&shards, leases.as_deref().unwrap_or_default());
    if args.json {
        let items: Vec<serde_json::Value> = nodes
            .iter()
            .map(|n| node_json(n, leases.is_some()))
            .collect();
        return print_json(&serde_json::Value::Array(items));
    }
    let mut columns = vec![elided("SHARD"), fixed("STATE"), fixed("HASH RANGE")];
    if leases.is_some() {
        columns.push(elided("OWNER"));
        columns.push(elided("CHECKPOINT"));
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let indent = "  ".repeat(n.depth.min(8));
            let mut row = vec![
                format!("{indent}{}", n.id),
                n.state.label().to_owned(),
                n.hash_range.map_or("?".into(), percent_range),
            ];
            if leases.is_some() {
                let (owner, checkpoint) = match &n.lease {
                    Some(l) => (
                        l.owner.as_ref().map_or("-".into(), |o| o.to_string()),
                        l.checkpoint.to_string(),
                    ),
                    None => ("(no lease)".into(), String::new()),
                };
                row.push(owner);
                row.push(checkpoint);
            }
            row
        })
        .collect();
    print_table(&columns, &rows);
    Ok(())
}

/// A hash-key range as shares of the key space: `0.0-50.0%`.
fn percent_range(r: HashKeyRange) -> String {
    let pct = |v: u128| v as f64 / u128::MAX as f64 * 100.0;
    format!("{:.1}-{:.1}%", pct(r.start()), pct(r.end()))
}

fn node_json(n: &ShardNode, with_leases: bool) -> serde_json::Value {
    let mut v = serde_json::json!({
        "shardId": n.id.as_str(),
        "state": n.state.label(),
        "parentShardIds": n.parents.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        "childShardIds": n.children.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
        "endingSequenceNumber": match &n.state {
            ShardState::Closed { ending } => serde_json::Value::from(ending.as_str()),
            _ => serde_json::Value::Null,
        },
        "startingHashKey": n.hash_range.map(|r| r.start().to_string()),
        "endingHashKey": n.hash_range.map(|r| r.end().to_string()),
        "depth": n.depth,
    });
    if let (true, Some(map)) = (with_leases, v.as_object_mut()) {
        map.insert(
            "lease".into(),
            n.lease
                .as_ref()
                .map_or(serde_json::Value::Null, crate::leases::lease_json),
        );
    }
    v
}
