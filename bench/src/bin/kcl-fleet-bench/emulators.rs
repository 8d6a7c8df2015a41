//! Issue 10, item 2's small fleet on the emulators: 32 idle shards on kinesis-local, 4 workers
//! sharing one lease table on dynalite through the real SDK clients; the lease table's capacity
//! units per lease-hour as dynalite reports them (`ReturnConsumedCapacity`, read by
//! `DynamoLeaseStore::capacity`), per-lease renewals (this library before) beside per-worker
//! liveness. dynalite charges a strongly consistent scan the eventually consistent rate, so the
//! per-lease figure's scans are corrected ×2 (as DynamoDB would charge them).

use std::sync::Arc;
use std::time::Duration;

use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::retrieval::aws::AwsKinesis;
use kcl::LeaseLiveness;
use kcl_integration_tests::{dynamo_servers, kinesis_server, sdk_config, unique_name};

const SHARDS: u32 = 32;
const WORKERS: usize = 4;

async fn one(
    liveness: LeaseLiveness,
    kinesis: &kcl_integration_tests::ServerProcess,
    dynalite: &kcl_integration_tests::ServerProcess,
    window: Duration,
) -> anyhow::Result<(f64, String)> {
    let kc = kinesis_server::kinesis_client(kinesis).await;
    let stream = unique_name("idle");
    kinesis_server::create_stream(&kc, &stream, SHARDS).await?;
    let conf = sdk_config(&dynalite.endpoint()).await;
    let store = DynamoLeaseStore::from_conf(&conf, unique_name("idle-fleet"));
    let mut stops = Vec::new();
    let mut runs = Vec::new();
    for w in 0..WORKERS {
        let worker = kcl::Worker::builder()
            .application_name("idle-fleet")
            .stream(stream.as_str())
            .worker_id(format!("idle-worker-{w}"))
            .lease_liveness(liveness)
            .kinesis(Arc::new(AwsKinesis::new(kc.clone())))
            .lease_store(Arc::new(store.clone()))
            .processor(|| kcl::testkit::NoopProcessor)
            .build()?;
        stops.push(worker.shutdown_handle());
        runs.push(tokio::spawn(worker.run()));
    }
    // Balanced and steady.
    tokio::time::sleep(Duration::from_secs(45)).await;
    let before = store.capacity().snapshot();
    tokio::time::sleep(window).await;
    let after = store.capacity().snapshot();
    for s in &stops {
        s.shutdown();
    }
    for r in runs {
        let _ = r.await;
    }
    let lease_hours = f64::from(SHARDS) * window.as_secs_f64() / 3600.0;
    let mut total = 0.0;
    let mut parts = Vec::new();
    for (op, a) in &after {
        let b = before.get(op).copied().unwrap_or_default();
        let mut units = a.units() - b.units();
        if op == "list" {
            units *= 2.0; // dynalite's consistent-scan deviation, corrected
        }
        if units > 0.0 {
            parts.push(format!("{op} {:.0}", units / lease_hours));
        }
        total += units / lease_hours;
    }
    Ok((total, parts.join(", ")))
}

pub fn run(window: Duration) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let kinesis = kinesis_server::start_kinesis_local().await?;
        let dynalite = dynamo_servers::start_dynalite().await?;
        println!("\nSmall idle fleet on the emulators: {SHARDS} idle shards (kinesis-local), {WORKERS} workers, one lease table (dynalite), default timings; capacity units per lease-hour as dynalite reports them over {} s of steady state\n", window.as_secs());
        println!("| liveness | CU / lease-hour | by operation |");
        println!("|---|---|---|");
        for liveness in [LeaseLiveness::PerLease, LeaseLiveness::PerWorker] {
            let (total, parts) = one(liveness, &kinesis, &dynalite, window).await?;
            println!("| {liveness:?} | {total:.0} | {parts} |");
        }
        Ok(())
    })
}
