//! The metrics a worker exports in CloudWatch Embedded Metric Format, through
//! `metrics_cloudwatch_embedded`: every documented metric of the detailed level (a superset
//! of the summary level) is found in the emitted JSON documents, with its documented
//! dimensions, and nothing undocumented is.
//!
//! Real local servers through the real AWS SDK clients (kinesis-local, dynalite).

use std::time::{Duration, Instant};

use kcl::metrics::MetricsLevel;
use kcl_integration_tests::metrics_doc::{compare, doc_table, from_emf};
use kcl_integration_tests::metrics_sweep;
use kcl_integration_tests::scenarios::LocalKinesis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emf_documents_hold_every_documented_metric() -> anyhow::Result<()> {
    let started = Instant::now();
    let collector = metrics_cloudwatch_embedded::Builder::new()
        .cloudwatch_namespace("kcl-tests")
        // A counter that did not move since the last flush is emitted too (as 0).
        .emit_zeros(true)
        .init()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let doc = doc_table();
    let kinesis = LocalKinesis::start().await?;
    let dynalite = kcl_integration_tests::dynamo_servers::start_dynalite().await?;
    let conf = kcl_integration_tests::sdk_config(&dynalite.endpoint()).await;
    let clients = metrics_sweep::faulty_clients(&kinesis, &conf);
    let flush = move || {
        let mut out = Vec::new();
        collector.flush(&mut out).expect("flushed to memory");
        String::from_utf8(out).expect("EMF is UTF-8")
    };
    let run = metrics_sweep::run(
        MetricsLevel::Detailed,
        &kinesis,
        clients,
        &flush,
        Duration::ZERO,
    )
    .await?;
    let seen = from_emf(&run.during)?;
    let sweep = compare(&doc, &seen, MetricsLevel::Detailed.name())
        .map_err(|e| e.context(format!("EMF documents:\n{}", run.during)))?;
    // Left out only: a histogram that had no sample (EMF emits none for it).
    for (name, _) in &sweep.absent_conditional {
        anyhow::ensure!(
            name == "kcl_prefetch_budget_wait_seconds",
            "{name} absent from the EMF documents:\n{}",
            run.during
        );
    }
    println!(
        "{} documented metrics found in {} EMF documents; absent by their condition: {:?}; took {:.1?}",
        sweep.found.len(),
        run.during.lines().count(),
        sweep.absent_conditional,
        started.elapsed()
    );
    Ok(())
}
