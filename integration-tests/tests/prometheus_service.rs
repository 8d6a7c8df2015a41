//! `examples/prometheus_service.rs` as a process against kinesis-local and dynalite: its three
//! endpoints answer while it consumes —
//! - `/readyz` 200 once it runs, with each shard's state and its checkpoint at the last record;
//! - `/healthz` 200 while it runs;
//! - `/metrics` in the Prometheus text format, with the records it processed counted;
//!
//! and SIGTERM stops it gracefully with exit code 0.
//!
//! The binary is built with `cargo build --workspace --all-features --example
//! prometheus_service` (what `scripts/test.sh` builds).

use std::time::Duration;

use anyhow::{bail, ensure, Context};
use kcl_integration_tests::cli::{example_binary, CliEnv, KclProcess};
use kcl_integration_tests::dynamo_servers::start_dynalite;
use kcl_integration_tests::kinesis_server::{
    create_stream, kinesis_client, put_records_with_parallelism, start_kinesis_local,
};
use kcl_integration_tests::unique_name;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RECORDS: usize = 40;

/// `GET path` over plain HTTP/1.1: the status code and the body.
async fn get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw).context("an HTTP answer in UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("an HTTP answer has a head and a body")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("a status line: {head}"))?;
    Ok((code, body.to_owned()))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_answers_metrics_healthz_and_readyz_and_stops_on_sigterm() -> anyhow::Result<()>
{
    let (bin, kinesis, dynamo) = tokio::try_join!(
        example_binary("prometheus_service"),
        start_kinesis_local(),
        start_dynalite()
    )?;
    let env = CliEnv::new(kinesis.endpoint(), dynamo.endpoint());
    let client = kinesis_client(&kinesis).await;
    let stream = unique_name("prom-orders");
    let app = unique_name("prom-app");
    create_stream(&client, &stream, 2).await?;
    let records: Vec<(String, Vec<u8>)> = (0..RECORDS)
        .map(|i| (format!("key-{}", i % 7), format!("record {i}").into_bytes()))
        .collect();
    let puts = put_records_with_parallelism(&client, &stream, records, 1).await?;

    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let mut service = KclProcess::spawn(
        &bin,
        "prometheus-service",
        &env,
        [
            "--stream",
            &stream,
            "--app",
            &app,
            "--listen",
            &listen,
            "--metrics-level",
            "detailed",
        ],
    )?;

    // Ready once both shards are checkpointed at their last record.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let ready = loop {
        if let Ok((200, body)) = get(port, "/readyz").await {
            let status: serde_json::Value = serde_json::from_str(&body)?;
            let shards = status["shards"].as_array().cloned().unwrap_or_default();
            let done = shards.len() == 2
                && shards.iter().all(|s| {
                    puts.iter()
                        .filter(|p| Some(p.shard_id.as_str()) == s["shard"].as_str())
                        .max_by(|a, b| a.sequence_number.cmp(&b.sequence_number))
                        .is_some_and(|last| {
                            s["checkpoint"]
                                .as_str()
                                .is_some_and(|c| c.contains(last.sequence_number.as_str()))
                        })
                });
            if done {
                break status;
            }
        }
        if let Some(exit) = service.try_exit()? {
            bail!(
                "the service exited ({exit:?}):\n{}",
                service.stderr_tail(40)
            );
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "never ready with both shards checkpointed; last /readyz: {:?}\n{}",
            get(port, "/readyz").await,
            service.stderr_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ensure!(ready["phase"] == "running", "{ready}");
    for shard in ready["shards"].as_array().into_iter().flatten() {
        ensure!(shard["state"] == "processing", "{shard}");
        ensure!(shard["stuck"] == false, "{shard}");
        ensure!(shard["millis_behind_latest"].is_u64(), "{shard}");
    }

    let (code, body) = get(port, "/healthz").await?;
    ensure!(code == 200, "/healthz {code}: {body}");
    let health: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(health["phase"] == "running", "{health}");

    let (code, metrics) = get(port, "/metrics").await?;
    ensure!(code == 200, "/metrics {code}: {metrics}");
    let processed: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("kcl_records_processed_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    ensure!(
        processed >= RECORDS as f64,
        "kcl_records_processed_total: {processed}\n{metrics}"
    );
    // Detailed level: per-shard series.
    ensure!(
        metrics.contains("kcl_shard_records_processed_total{"),
        "{metrics}"
    );
    ensure!(metrics.contains("kcl_aws_requests_total{"), "{metrics}");

    let (code, _) = get(port, "/nothing-here").await?;
    ensure!(code == 404, "an unknown path: {code}");

    service.signal("TERM")?;
    let exit = service.wait_exit(Duration::from_secs(60)).await?;
    ensure!(
        exit.success(),
        "SIGTERM: {exit:?}\n{}",
        service.stderr_tail(40)
    );
    Ok(())
}
