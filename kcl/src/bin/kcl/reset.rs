//! `kcl reset`: moves checkpoints for a replay within the stream's retention, safely while
//! workers run (`kcl::admin::reset` plans, `kcl::admin::takeover` writes).

use std::time::SystemTime;

use anyhow::{bail, Context};
use futures::StreamExt as _;
use kcl::admin::owner::{decide, Action};
use kcl::admin::reset::{plan_reset, ResetPlan, ResetScope, ResetStep, ResetTarget};
use kcl::admin::takeover::{observe, Takeover};
use kcl::lease::LeaseStore;
use kcl::retrieval::aws::AwsKinesis;
use kcl::retrieval::KinesisApi;
use kcl::{InitialPosition, SequenceNumber, ShardId};

use crate::output::{confirm, elided, fixed, print_json, print_table, progress, rfc3339};
use crate::{AppArgs, Aws};

/// `kcl reset`'s flags.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["shard", "all"])))]
pub(crate) struct Args {
    #[command(flatten)]
    app: AppArgs,
    /// The stream the leases are for.
    #[arg(long)]
    stream: String,
    /// The shard to reset (its descendants that started go back to trim-horizon, to wait for
    /// it).
    #[arg(long)]
    shard: Option<String>,
    /// Reset every lease of a shard still in the stream.
    #[arg(long)]
    all: bool,
    /// The new position: `trim-horizon`, `latest`, `at-timestamp=<RFC 3339>`, or `seq=<N>`
    /// (the records after N are delivered again; with --shard only).
    #[arg(long, value_parser = parse_target)]
    to: ResetTarget,
    /// Print the plan and stop.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    #[command(flatten)]
    takeover: crate::TakeoverArgs,
    /// Print JSON (the plan with --dry-run, else what was done).
    #[arg(long)]
    json: bool,
}

/// How many leases are reset at once (within one depth of the shard tree).
const PARALLEL: usize = 8;

/// `--to`'s values.
fn parse_target(s: &str) -> Result<ResetTarget, String> {
    if let Some(n) = s.strip_prefix("seq=") {
        return n
            .parse::<SequenceNumber>()
            .map(ResetTarget::Sequence)
            .map_err(|e| e.to_string());
    }
    match kcl::service::parse_position(s) {
        Ok(InitialPosition::TrimHorizon) => Ok(ResetTarget::TrimHorizon),
        Ok(InitialPosition::Latest) => Ok(ResetTarget::Latest),
        Ok(InitialPosition::AtTimestamp(t)) => Ok(ResetTarget::AtTimestamp(t)),
        Ok(_) => Err(format!("unsupported position {s:?}")),
        Err(_) => Err(format!(
            "expected trim-horizon, latest, at-timestamp=<RFC 3339> or seq=<N>, got {s:?}"
        )),
    }
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let aws = Aws::load().await;
    let (store, worker_table) = aws.existing_store(&args.app).await?;
    let mut table = crate::read_leases(&store).await?;
    // A multi-stream table: only this stream's leases.
    table.leases = kcl::admin::of_stream(std::mem::take(&mut table.leases), &args.stream);
    let shards = AwsKinesis::new(aws.kinesis())
        .list_shards(&args.stream)
        .await
        .with_context(|| format!("listing the shards of --stream {}", args.stream))?;
    let scope = match &args.shard {
        Some(s) => ResetScope::Shard(ShardId::new(s.as_str())),
        None => ResetScope::All,
    };
    let plan = plan_reset(&table.leases, &shards, &scope, &args.to, SystemTime::now())?;
    if args.dry_run {
        if args.json {
            return print_json(&plan_json(&plan, None));
        }
        print_plan(&plan);
        return Ok(());
    }
    if plan.steps.is_empty() {
        if args.json {
            return print_json(&plan_json(&plan, None));
        }
        print_plan(&plan);
        progress("nothing to reset");
        return Ok(());
    }
    if !args.json {
        print_plan(&plan);
    }
    if !confirm(
        &format!(
            "Move the checkpoints of {} lease(s) of {:?}?",
            plan.steps.len(),
            args.app.table()
        ),
        args.yes,
    )? {
        bail!("not confirmed: nothing was changed");
    }
    let keys: Vec<_> = plan.steps.iter().map(|s| s.lease.key.clone()).collect();
    let seen = observe(
        &store,
        &keys,
        worker_table,
        args.takeover.lease_duration,
        &|p| progress(p),
    )
    .await
    .context("observing the lease owners")?;
    // Every refusal before any write.
    let mut actions = Vec::new();
    let mut refusals = Vec::new();
    for step in &plan.steps {
        let Some(o) = seen.iter().find(|o| o.lease.key == step.lease.key) else {
            refusals.push(format!("lease {}: deleted meanwhile", step.lease.key));
            continue;
        };
        let action = decide(&o.state, args.takeover.force);
        if let Action::Refuse(why) = &action {
            refusals.push(format!("lease {}: {why}", step.lease.key));
        }
        actions.push((step, o, action));
    }
    if !refusals.is_empty() {
        bail!("nothing was changed:\n  {}", refusals.join("\n  "));
    }
    let takeover = Takeover::new("kcl-reset", args.takeover.handoff_timeout);
    progress(&format!("resetting as {}", takeover.pseudo_owner()));
    // Depth by depth (parents before their descendants), up to PARALLEL leases at once.
    let mut done = Vec::new();
    let mut failures = Vec::new();
    let mut rest = actions.as_slice();
    while let Some((first, _, _)) = rest.first() {
        let n = rest
            .iter()
            .take_while(|(s, _, _)| s.depth == first.depth)
            .count();
        let (level, next) = rest.split_at(n);
        rest = next;
        let results: Vec<_> = futures::stream::iter(level)
            .map(|(step, seen, action)| async {
                let r = reset_one(&store, &takeover, step, seen, action).await;
                match &r {
                    Ok(()) => progress(&format!("{}: reset to {}", step.lease.key, step.to)),
                    Err(e) => progress(&format!("{}: not reset: {e}", step.lease.key)),
                }
                (step.lease.key.clone(), r)
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        for (key, r) in results {
            match r {
                Ok(()) => done.push(key),
                Err(e) => failures.push(format!("{key}: {e}")),
            }
        }
        if !failures.is_empty() {
            break;
        }
    }
    if !failures.is_empty() {
        let left: Vec<&str> = actions
            .iter()
            .map(|(s, _, _)| s.lease.key.as_str())
            .filter(|k| !done.iter().any(|d| d.as_str() == *k))
            .collect();
        if args.json {
            let _ = print_json(&plan_json(&plan, Some(&done)));
        }
        bail!(
            "the reset stopped: {}\n{} lease(s) reset ({}); not reset: {}",
            failures.join("\n"),
            done.len(),
            done.iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            left.join(", ")
        );
    }
    if args.json {
        return print_json(&plan_json(&plan, Some(&done)));
    }
    println!("reset {} lease(s)", done.len());
    Ok(())
}

/// One lease: into the pseudo-owner's hands, checkpointed at the target, given back.
async fn reset_one(
    store: &dyn LeaseStore,
    takeover: &Takeover,
    step: &ResetStep,
    seen: &kcl::admin::takeover::Observed,
    action: &Action,
) -> Result<(), kcl::admin::takeover::TakeoverError> {
    let held = takeover
        .acquire(store, seen, action, &|p| progress(p))
        .await?;
    let written = match takeover
        .checkpoint(store, &held, &step.to, step.resolve_latest_at)
        .await
    {
        Ok(l) => l,
        Err(e) => {
            // Give it back unchanged rather than hold it until it expires.
            if let Ok(Some(now)) = store.get(&held.key).await {
                let _ = takeover.give_back(store, &now).await;
            }
            return Err(e);
        }
    };
    takeover.give_back(store, &written).await?;
    Ok(())
}

fn print_plan(plan: &ResetPlan) {
    let columns = [
        elided("LEASE"),
        elided("OWNER"),
        elided("FROM"),
        elided("TO"),
        fixed("WHY"),
    ];
    let rows: Vec<Vec<String>> = plan
        .steps
        .iter()
        .map(|s| {
            vec![
                s.lease.key.to_string(),
                s.lease.owner.as_ref().map_or("-".into(), |o| o.to_string()),
                s.lease.checkpoint.to_string(),
                target_cell(s),
                s.reason.label().to_owned(),
            ]
        })
        .collect();
    print_table(&columns, &rows);
    for (l, why) in &plan.skipped {
        progress(&format!("skipped {}: {why}", l.key));
    }
}

/// `LATEST` resolved at a time reads as that time (what the next owner resumes at).
fn target_cell(s: &ResetStep) -> String {
    match s.resolve_latest_at {
        Some(at) => {
            let t = at
                .checked_sub(kcl::admin::reset::RESUME_MARGIN)
                .unwrap_or(at);
            format!("@{}", rfc3339(t))
        }
        None => s.to.to_string(),
    }
}

fn plan_json(plan: &ResetPlan, done: Option<&[kcl::lease::LeaseKey]>) -> serde_json::Value {
    let steps: Vec<serde_json::Value> = plan
        .steps
        .iter()
        .map(|s| {
            let mut v = serde_json::json!({
                "leaseKey": s.lease.key.as_str(),
                "leaseOwner": s.lease.owner.as_ref().map(|o| o.as_str()),
                "from": s.lease.checkpoint.to_string(),
                "to": s.to.to_string(),
                "latestResolvedAt": s.resolve_latest_at.map(rfc3339),
                "reason": s.reason.label(),
            });
            if let (Some(done), Some(map)) = (done, v.as_object_mut()) {
                map.insert(
                    "reset".into(),
                    serde_json::Value::from(done.contains(&s.lease.key)),
                );
            }
            v
        })
        .collect();
    let skipped: Vec<serde_json::Value> = plan
        .skipped
        .iter()
        .map(|(l, why)| serde_json::json!({"leaseKey": l.key.as_str(), "why": why}))
        .collect();
    serde_json::json!({"steps": steps, "skipped": skipped})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(parse_target("trim-horizon"), Ok(ResetTarget::TrimHorizon));
        assert_eq!(parse_target("latest"), Ok(ResetTarget::Latest));
        assert_eq!(
            parse_target("seq=42"),
            Ok(ResetTarget::Sequence(SequenceNumber::from_u128(42)))
        );
        assert!(matches!(
            parse_target("at-timestamp=2026-11-25T10:00:00Z"),
            Ok(ResetTarget::AtTimestamp(_))
        ));
        assert!(parse_target("seq=x").is_err());
        assert!(parse_target("earliest").is_err_and(|e| e.contains("seq=<N>")));
    }
}
