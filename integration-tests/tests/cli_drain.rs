//! `kcl drain`, run as a process against kinesis-local and dynalite, beside three in-process
//! workers with the real AWS backends:
//! - an unknown worker is refused, naming it;
//! - `kcl drain --worker w1` returns once w1 holds no lease; w1 keeps running and takes
//!   nothing back; every record is delivered, none twice (each lease moved by a graceful
//!   handoff);
//! - `kcl drain --cancel` lets w1 take its share again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::lease::LeaseStore;
use kcl_integration_tests::cli::{kcl_binary, run_kcl, CliEnv};
use kcl_integration_tests::dynamo_servers::start_dynalite;
use kcl_integration_tests::scenarios::{
    check_all_delivered, check_no_duplicates_or_overlap, poll, records, worker, DeliveryLog,
    LocalKinesis, StreamFixture,
};
use kcl_integration_tests::{sdk_config, unique_name};

const KEYS: u32 = 32;
const WAVE: u32 = 300;

async fn owners(store: &DynamoLeaseStore) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut owners = BTreeMap::new();
    for l in store.list().await?.leases {
        if let Some(o) = l.owner.as_ref().or(l.checkpoint_owner.as_ref()) {
            *owners.entry(o.to_string()).or_insert(0) += 1;
        }
    }
    Ok(owners)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_every_lease_of_a_running_worker_without_duplicates() -> anyhow::Result<()> {
    let (bin, kinesis, dynamo) =
        tokio::try_join!(kcl_binary(), LocalKinesis::start(), start_dynalite())?;
    let cli = CliEnv::new(kinesis.server.endpoint(), dynamo.endpoint());
    let conf = sdk_config(&dynamo.endpoint()).await;
    let stream = unique_name("drain");
    let app = unique_name("drain-app");
    kinesis.create_stream(&stream, 4).await?;
    kinesis.put(&stream, records(0, WAVE, KEYS)).await?;
    let store = Arc::new(DynamoLeaseStore::from_conf(&conf, &app));
    let log = DeliveryLog::default();
    let mut workers = Vec::new();
    for id in ["w1", "w2", "w3"] {
        let w = worker(&app, &stream, id, &kinesis, store.clone(), &log).build()?;
        workers.push((w.shutdown_handle(), tokio::spawn(w.run())));
    }
    log.wait_for(WAVE as usize, Duration::from_secs(90)).await?;
    poll("w1 holds a lease", Duration::from_secs(60), || async {
        Ok(owners(&store).await?.contains_key("w1").then_some(()))
    })
    .await?;

    let run = |args: Vec<String>| {
        let (bin, cli) = (bin.clone(), cli.clone());
        async move { run_kcl(&bin, &cli, &args, Duration::from_secs(120)).await }
    };
    let args = |extra: &[&str]| -> Vec<String> {
        ["drain", "--app", &app]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let unknown = run(args(&["--worker", "nobody"])).await?;
    ensure!(
        !unknown.status.success() && unknown.stderr.contains("nobody has no item"),
        "an unknown worker: {:?}\n{}",
        unknown.status,
        unknown.stderr
    );

    let bad_format = run(["--log-format", "xml", "leases", "--app", &app]
        .iter()
        .map(|s| s.to_string())
        .collect())
    .await?;
    ensure!(
        bad_format.status.code() == Some(2) && bad_format.stderr.contains("`text` or `json`"),
        "--log-format xml: {:?}\n{}",
        bad_format.status,
        bad_format.stderr
    );

    let mut json_logs = vec!["--log-format".to_owned(), "json".to_owned()];
    json_logs.extend(args(&["--worker", "w1", "--json"]));
    let drained = run(json_logs).await?;
    ensure!(
        drained.status.success(),
        "kcl drain failed ({}):\n{}",
        drained.status,
        drained.stderr
    );
    for line in drained.stderr.lines().filter(|l| l.starts_with('{')) {
        serde_json::from_str::<serde_json::Value>(line)
            .with_context(|| format!("a JSON log line: {line}"))?;
    }
    ensure!(
        !drained.stderr.contains('\u{1b}'),
        "colour codes in the logs"
    );
    let answer: serde_json::Value =
        serde_json::from_str(&drained.stdout).with_context(|| drained.stdout.clone())?;
    ensure!(answer["result"] == "drained", "{answer}");
    let after = owners(&store).await?;
    ensure!(!after.contains_key("w1"), "w1 still named: {after:?}");
    let drained_at = log.snapshot().len();
    let listed = run(["leases", "--app", &app, "--workers", "--json"]
        .iter()
        .map(|s| s.to_string())
        .collect())
    .await?;
    let summary: serde_json::Value =
        serde_json::from_str(&listed.stdout).with_context(|| listed.stderr.clone())?;
    let w1 = summary
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["workerId"] == "w1"))
        .with_context(|| format!("w1 in kcl leases --workers: {summary}"))?;
    ensure!(w1["draining"] == true && w1["leases"] == 0, "{w1}");

    // w1 runs on and takes nothing back, while more records come.
    kinesis.put(&stream, records(WAVE, 2 * WAVE, KEYS)).await?;
    log.wait_for(2 * WAVE as usize, Duration::from_secs(90))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = owners(&store).await?;
    ensure!(!still.contains_key("w1"), "w1 took leases back: {still:?}");
    let by_w1 = log.snapshot()[drained_at..]
        .iter()
        .filter(|d| d.worker == "w1")
        .count();
    ensure!(by_w1 == 0, "w1 processed {by_w1} records after the drain");

    let cancelled = run(args(&["--worker", "w1", "--cancel"])).await?;
    ensure!(cancelled.status.success(), "{}", cancelled.stderr);
    poll(
        "w1 takes leases again after --cancel",
        Duration::from_secs(60),
        || async { Ok(owners(&store).await?.contains_key("w1").then_some(())) },
    )
    .await?;

    for (stop, _) in &workers {
        stop.shutdown();
    }
    for (_, run) in workers {
        run.await??;
    }
    let log = log.snapshot();
    check_all_delivered(&log, 2 * WAVE, KEYS)?;
    check_no_duplicates_or_overlap(&log)?;
    Ok(())
}
