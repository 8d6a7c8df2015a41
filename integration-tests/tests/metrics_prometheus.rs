//! The metrics a worker exports, scraped from `metrics-exporter-prometheus`, against
//! `docs/metrics.md` at each level, both ways; and a shard's gauge gone once the worker gave
//! the shard up (the exporter's idle timeout, the library's refresher).
//!
//! Real local servers through the real AWS SDK clients (kinesis-local, dynalite), so the
//! requests-by-operation series exist. Each level records into its own exporter
//! (`metrics::with_local_recorder` on a current-thread runtime, heartbeat as a task).

use std::time::{Duration, Instant};

use kcl::metrics::MetricsLevel;
use kcl_integration_tests::metrics_doc::{compare, doc_table, from_prometheus};
use kcl_integration_tests::metrics_sweep;
use kcl_integration_tests::scenarios::LocalKinesis;
use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_util::MetricKindMask;

/// Series idle this long are dropped: ten refresh intervals.
const IDLE: Duration = Duration::from_secs(2);

fn series(scrape: &str, name: &str, shard: &str) -> bool {
    scrape
        .lines()
        .any(|l| l.starts_with(&format!("{name}{{")) && l.contains(&format!("shard=\"{shard}\"")))
}

#[test]
fn prometheus_scrape_matches_the_docs_at_each_level() -> anyhow::Result<()> {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let doc = doc_table();
    let kinesis = rt.block_on(LocalKinesis::start())?;
    let dynalite = rt.block_on(kcl_integration_tests::dynamo_servers::start_dynalite())?;
    let conf = rt.block_on(kcl_integration_tests::sdk_config(&dynalite.endpoint()));
    for level in [MetricsLevel::Summary, MetricsLevel::Detailed] {
        let recorder = PrometheusBuilder::new()
            .idle_timeout(MetricKindMask::COUNTER | MetricKindMask::GAUGE, Some(IDLE))
            .build_recorder();
        let handle = recorder.handle();
        let clients = metrics_sweep::faulty_clients(&kinesis, &conf);
        let scrape = move || handle.render();
        let run = metrics::with_local_recorder(&recorder, || {
            rt.block_on(metrics_sweep::run(
                level,
                &kinesis,
                clients,
                &scrape,
                IDLE + Duration::from_secs(1),
            ))
        })?;
        let sweep = compare(&doc, &from_prometheus(&run.during, &doc), level.name())
            .map_err(|e| e.context(format!("{} scrape:\n{}", level.name(), run.during)))?;
        println!(
            "{}: {} documented metrics found; absent by their condition: {:?}",
            level.name(),
            sweep.found.len(),
            sweep.absent_conditional
        );
        // The workload triggers every conditional metric too.
        assert!(
            sweep.absent_conditional.is_empty(),
            "absent: {:?}\n{}",
            sweep.absent_conditional,
            run.during
        );
        // What the workload planted is counted.
        for planted in [
            "kcl_processor_errors_total{stream=",
            "kcl_processor_panics_total{stream=",
            "kcl_records_dead_lettered_total{stream=",
            "kcl_dead_letter_failures_total{stream=",
            "kcl_invalid_aggregates_total{stream=",
            "kcl_read_throttles_total{stream=",
            "kcl_lease_lost_answers_total{op=",
        ] {
            let line = run.during.lines().find(|l| l.starts_with(planted));
            assert!(
                line.is_some_and(|l| !l.ends_with(" 0")),
                "{planted}: {line:?}"
            );
        }
        let throttled = run.during.lines().any(|l| {
            l.starts_with("kcl_aws_requests_total{")
                && l.contains("operation=\"GetRecords\"")
                && l.contains("outcome=\"throttled\"")
                && !l.ends_with(" 0")
        });
        assert!(
            throttled,
            "no throttled GetRecords attempt counted:\n{}",
            run.during
        );
        for op in [
            "service=\"kinesis\"",
            "operation=\"GetRecords\"",
            "service=\"dynamodb\"",
            "operation=\"UpdateItem\"",
        ] {
            assert!(
                run.during
                    .lines()
                    .any(|l| l.starts_with("kcl_aws_requests_total{") && l.contains(op)),
                "no request series with {op}"
            );
        }
        if level == MetricsLevel::Detailed {
            let gauge = "kcl_shard_millis_behind_latest";
            assert!(series(&run.during, gauge, &run.given_up), "{}", run.during);
            assert!(series(&run.during, gauge, &run.kept), "{}", run.during);
            // Given up by worker b (and not taken: worker a holds at most one): gone.
            assert!(
                !series(&run.after_give_up, gauge, &run.given_up),
                "{gauge} of {} still exported after it was given up:\n{}",
                run.given_up,
                run.after_give_up
            );
            // Still held by worker a: refreshed, so kept.
            assert!(
                series(&run.after_give_up, gauge, &run.kept),
                "{gauge} of the held shard {} dropped:\n{}",
                run.kept,
                run.after_give_up
            );
        }
    }
    println!("took {:.1?}", started.elapsed());
    Ok(())
}
