//! A consumer service as you would run it in production: its metrics scraped by Prometheus (or
//! emitted to CloudWatch in the Embedded Metric Format), and health endpoints for the
//! orchestrator.
//!
//! - `GET /metrics`: every `kcl_*` metric in the Prometheus text format (docs/metrics.md);
//! - `GET /healthz`: liveness, `200` while the worker has not stopped;
//! - `GET /readyz`: readiness, `200` while the worker is running and no processor callback has
//!   been running for `--stuck-after` (a batch that never returns); `503` otherwise, with the
//!   stuck shards in the JSON body. A worker holding no lease is ready (a fleet with more
//!   workers than shards has idle ones).
//!
//! Both health answers carry the worker's status as JSON: each shard's state, checkpoint, lag,
//! records processed and last error.
//!
//! Run with:
//! `cargo run -p kcl-examples --features aws --example prometheus_service -- --stream orders --app orders-app`
//! (endpoints, region and credentials come from the standard AWS configuration), then
//! `curl localhost:9090/readyz`. With `--metrics emf` the metrics are written to stdout as EMF
//! documents every `--emf-interval` (the CloudWatch agent or Lambda turns them into metrics)
//! and `/metrics` answers 404.
//!
//! The processor counts records and checkpoints every batch: put your own in its place.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use clap::{Parser, ValueEnum};
use kcl::metrics::MetricsLevel;
use kcl::worker::signal::StopSignals;
use kcl::worker::status::ShardStatus;
use kcl::{
    async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor, StatusHandle, Worker,
    WorkerStatus,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

#[derive(Parser, Debug)]
#[command(about = "A Kinesis consumer service with /metrics, /healthz and /readyz")]
struct Args {
    /// The stream to read.
    #[arg(long, env = "KCL_STREAM")]
    stream: String,
    /// The application name (also the lease table).
    #[arg(long, env = "KCL_APP")]
    app: String,
    /// This worker's id (default: host name plus a random suffix).
    #[arg(long, env = "KCL_WORKER_ID")]
    worker_id: Option<String>,
    /// Where the HTTP endpoints listen.
    #[arg(long, env = "KCL_LISTEN", default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// `prometheus` (served on /metrics) or `emf` (CloudWatch Embedded Metric Format on stdout).
    #[arg(long, value_enum, default_value = "prometheus")]
    metrics: Exporter,
    /// `summary` (per worker and stream) or `detailed` (adds per-shard series).
    #[arg(long, value_enum, default_value = "summary")]
    metrics_level: Level,
    /// How often EMF documents are written (with `--metrics emf`).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    emf_interval: Duration,
    /// A processor callback running this long makes the service unready.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    stuck_after: Duration,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Exporter {
    Prometheus,
    Emf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Level {
    Summary,
    Detailed,
}

/// Counts what it is given and checkpoints every batch.
struct Counting;

#[async_trait]
impl RecordProcessor for Counting {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        tracing::debug!(shard = %batch.shard_id, records = batch.len(), "batch");
        cp.checkpoint().await?;
        Ok(())
    }
}

#[derive(Clone)]
struct App {
    status: StatusHandle,
    prometheus: Option<PrometheusHandle>,
    stuck_after: Duration,
}

fn millis_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn shard_json(s: &ShardStatus, stuck_after: Duration) -> serde_json::Value {
    serde_json::json!({
        "shard": s.shard_id.as_str(),
        "state": s.state.name(),
        "checkpoint": s.checkpoint.as_ref().map(|c| c.to_string()),
        "checkpointed_at_ms": s.checkpointed_at.map(millis_since_epoch),
        "millis_behind_latest": s.millis_behind_latest,
        "records_processed": s.records_processed,
        "stuck": s.is_stuck(stuck_after, SystemTime::now()),
        "last_error": s.last_error.as_ref().map(|(_, e)| e),
    })
}

fn status_json(status: &WorkerStatus, stuck_after: Duration) -> serde_json::Value {
    serde_json::json!({
        "worker": status.worker_id.as_str(),
        "phase": status.phase.name(),
        "draining": status.draining,
        "shards": status.shards.iter().map(|s| shard_json(s, stuck_after)).collect::<Vec<_>>(),
    })
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    match &app.prometheus {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are written to stdout in the Embedded Metric Format (--metrics emf)\n".into(),
        ),
    }
}

async fn healthz(State(app): State<App>) -> impl IntoResponse {
    let status = app.status.status();
    let code = if status.is_live() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(status_json(&status, app.stuck_after)))
}

async fn readyz(State(app): State<App>) -> impl IntoResponse {
    let status = app.status.status();
    let code = if status.is_ready(app.stuck_after) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(status_json(&status, app.stuck_after)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut signals = StopSignals::install().context("installing signal handlers")?;

    // The exporter first: metrics recorded before it is installed are lost.
    let prometheus = match args.metrics {
        Exporter::Prometheus => {
            // Series of shards given up stop being updated; the exporter drops them after a
            // minute (the library refreshes the series of shards it holds).
            let recorder = PrometheusBuilder::new()
                .idle_timeout(
                    MetricKindMask::COUNTER | MetricKindMask::GAUGE,
                    Some(Duration::from_secs(60)),
                )
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
            let upkeep = handle.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        }
        Exporter::Emf => {
            let collector = metrics_cloudwatch_embedded::Builder::new()
                .cloudwatch_namespace(args.app.clone())
                .init()
                .map_err(|e| anyhow::anyhow!("installing the EMF collector: {e}"))?;
            let every = args.emf_interval;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let mut out = Vec::new();
                    match collector.flush(&mut out) {
                        Ok(()) => {
                            use std::io::Write as _;
                            let mut stdout = std::io::stdout().lock();
                            let _ = stdout.write_all(&out).and_then(|()| stdout.flush());
                        }
                        Err(e) => tracing::warn!(error = %e, "could not write EMF documents"),
                    }
                }
            });
            None
        }
    };

    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let mut builder = Worker::builder()
        .application_name(&args.app)
        .stream(&args.stream)
        .backends(kcl::Aws::from_conf(&sdk))
        .metrics_level(match args.metrics_level {
            Level::Summary => MetricsLevel::Summary,
            Level::Detailed => MetricsLevel::Detailed,
        })
        .processor(|| Counting);
    if let Some(id) = &args.worker_id {
        builder = builder.worker_id(id);
    }
    let worker = builder.build()?;
    let app = App {
        status: worker.status_handle(),
        prometheus,
        stuck_after: args.stuck_after,
    };
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(address = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    let signal = signals.recv().await;
    tracing::info!(%signal, "signal received; shutting down gracefully");
    stop.shutdown();
    let result = run.await.context("the worker task")?;
    server.abort();
    Ok(result?)
}
