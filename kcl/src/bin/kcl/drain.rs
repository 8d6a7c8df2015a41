//! `kcl drain`: moves every lease of one running worker to its peers, before maintenance.

use std::time::Duration;

use anyhow::Context;
use kcl::lease::drain::{cancel_drain, start_drain, wait_drained, DrainStatus};
use kcl::WorkerId;

use crate::output::{print_json, progress};
use crate::{parse_duration, AppArgs, Aws};

/// `kcl drain`'s flags.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    app: AppArgs,
    /// The worker to drain (its worker id, as `kcl leases` shows it).
    #[arg(long)]
    worker: String,
    /// End a drain instead: the worker takes leases again.
    #[arg(long)]
    cancel: bool,
    /// Drain even when no other live worker is seen to take the leases.
    #[arg(long)]
    force: bool,
    /// How long to watch the worker table for a live peer (a heartbeat that moves): more than
    /// the fleet's renew interval (a third of its lease duration).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    observe: Duration,
    /// How long to wait for the worker to hold no lease.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,
    /// Ask for the drain and return at once, without waiting.
    #[arg(long)]
    no_wait: bool,
    /// Print JSON: what was asked and where the drain stands.
    #[arg(long)]
    json: bool,
}

fn status_json(worker: &WorkerId, status: &DrainStatus, result: &str) -> serde_json::Value {
    serde_json::json!({
        "worker": worker.as_str(),
        "result": result,
        "held": status.held.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
        "handingOver": status.handing_over.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
    })
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let aws = Aws::load().await;
    let (store, worker_table) = aws.existing_store(&args.app).await?;
    anyhow::ensure!(
        worker_table,
        "the lease table {:?} has no worker table ({:?}): its workers are not kcl-rs workers \
         with per-worker liveness, and cannot be drained",
        args.app.table(),
        format!("{}-workers", args.app.table())
    );
    let worker = WorkerId::new(args.worker.as_str());
    if args.cancel {
        cancel_drain(&store, &worker)
            .await
            .with_context(|| format!("ending the drain of --worker {worker}"))?;
        if args.json {
            return print_json(&status_json(&worker, &DrainStatus::default(), "cancelled"));
        }
        println!("{worker}: drain cancelled; it takes leases again");
        return Ok(());
    }
    progress(&format!(
        "checking that another live worker will take the leases of {worker} (up to {:?})",
        args.observe
    ));
    let item = start_drain(&store, &worker, args.observe, args.force)
        .await
        .with_context(|| format!("draining --worker {worker}"))?;
    progress(&format!(
        "{worker} is draining: its peers ask for its leases (graceful handoffs)"
    ));
    if args.no_wait {
        if args.json {
            return print_json(&status_json(&worker, &DrainStatus::default(), "asked"));
        }
        println!("{worker}: asked to drain");
        return Ok(());
    }
    let mut last = None;
    let waited = wait_drained(
        &store,
        &worker,
        item.incarnation,
        Duration::from_secs(1),
        args.timeout,
        |s| {
            let now = (s.held.len(), s.handing_over.len());
            if last != Some(now) {
                last = Some(now);
                progress(&format!(
                    "{worker}: {} lease(s) held, {} being handed over",
                    now.0, now.1
                ));
            }
        },
    )
    .await;
    match waited {
        Ok(()) => {
            if args.json {
                print_json(&status_json(&worker, &DrainStatus::default(), "drained"))
            } else {
                println!("{worker}: drained; it holds no lease (it stays drained until it restarts or `kcl drain --cancel`)");
                Ok(())
            }
        }
        Err(e) => Err(e).with_context(|| format!("draining --worker {worker}")),
    }
}
