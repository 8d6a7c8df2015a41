//! `kcl release`: clears a lease's owner, so that another worker takes it.

use std::time::Duration;

use anyhow::{bail, Context};
use kcl::admin::owner::{decide, Action};
use kcl::admin::takeover::{observe, Takeover};
use kcl::lease::LeaseStore;
use kcl::ShardId;

use crate::output::{print_json, progress};
use crate::{parse_duration, AppArgs, Aws};

/// `kcl release`'s flags.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    app: AppArgs,
    /// The shard whose lease to release.
    #[arg(long)]
    shard: String,
    /// Also release a lease held by a live worker of this library: it is asked to hand the
    /// lease over gracefully (its processor checkpoints and stops) first.
    #[arg(long)]
    force: bool,
    /// The fleet's lease duration: an owner is judged gone once its heartbeat (or lease
    /// counter) stood still this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// How long a live owner gets to hand the lease over (--force).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    handoff_timeout: Duration,
    /// Print JSON: what was found and done.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let aws = Aws::load().await;
    let (store, worker_table) = aws.existing_store(&args.app).await?;
    let shard = ShardId::new(args.shard.as_str());
    let table = store.list().await.context("reading the lease table")?;
    let Some(lease) = table.leases.iter().find(|l| l.shard_id() == shard) else {
        bail!(
            "the lease table {:?} has no lease for --shard {shard}",
            args.app.table()
        );
    };
    let seen = observe(
        &store,
        std::slice::from_ref(&lease.key),
        worker_table,
        args.lease_duration,
        &|p| progress(p),
    )
    .await
    .context("observing the lease's owner")?;
    let Some(seen) = seen.into_iter().next() else {
        bail!("the lease of --shard {shard} was deleted meanwhile");
    };
    let action = decide(&seen.state, args.force);
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
    let takeover = Takeover::new("kcl-release", args.handoff_timeout);
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
