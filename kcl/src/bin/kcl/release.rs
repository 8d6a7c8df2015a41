//! `kcl release`: clears a lease's owner, so that another worker takes it.

use anyhow::{bail, Context};
use kcl::admin::owner::{decide, Action};
use kcl::admin::takeover::{observe, Takeover};
use kcl::ShardId;

use crate::output::{print_json, progress};
use crate::{AppArgs, Aws};

/// `kcl release`'s flags.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    app: AppArgs,
    /// The shard whose lease to release.
    #[arg(long)]
    shard: String,
    #[command(flatten)]
    takeover: crate::TakeoverArgs,
    /// Print JSON: what was found and done.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let aws = Aws::load().await;
    let (store, worker_table) = aws.existing_store(&args.app).await?;
    let shard = ShardId::new(args.shard.as_str());
    let table = crate::read_leases(&store).await?;
    // A shard id, or (in a multi-stream table, where shard ids repeat) a whole lease key.
    let matching: Vec<&kcl::Lease> = table
        .leases
        .iter()
        .filter(|l| l.key.as_str() == args.shard || l.shard_id() == shard)
        .collect();
    let lease = match matching.as_slice() {
        [one] => *one,
        [] => bail!(
            "the lease table {:?} has no lease for --shard {shard}",
            args.app.table()
        ),
        several => bail!(
            "--shard {shard} is a shard of several streams ({}); give the whole lease key",
            several
                .iter()
                .map(|l| l.key.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let seen = observe(
        &store,
        std::slice::from_ref(&lease.key),
        worker_table,
        args.takeover.lease_duration,
        &|p| progress(p),
    )
    .await
    .context("observing the lease's owner")?;
    let Some(seen) = seen.into_iter().next() else {
        bail!("the lease of --shard {shard} was deleted meanwhile");
    };
    let action = decide(&seen.state, args.takeover.force);
    let owner = seen.lease.owner.clone();
    let report = |done: &str| -> anyhow::Result<()> {
        if args.json {
            print_json(&serde_json::json!({
                "leaseKey": seen.lease.key.as_str(),
                "leaseOwner": owner.as_ref().map(|o| o.as_str()),
                "ownerState": seen.state.label(),
                "result": done,
            }))
        } else {
            println!("{}: {done}", seen.lease.key);
            Ok(())
        }
    };
    if let Action::Refuse(why) = &action {
        bail!("lease {}: {why}", seen.lease.key);
    }
    let takeover = Takeover::new("kcl-release", args.takeover.handoff_timeout);
    match takeover
        .clear(&store, &seen, &action, &|p| progress(p))
        .await?
    {
        None => report("already unowned"),
        Some(l) => {
            let how = match (&l.owner, &owner) {
                (None, Some(o)) => format!("released (was {o}, {})", seen.state.label()),
                (Some(to), _) => format!("handed over to {to}, which had asked for it"),
                (None, None) => "released".to_owned(),
            };
            report(&how)
        }
    }
}
