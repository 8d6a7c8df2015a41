//! The `kcl` command-line tool: consume a stream as JSON lines, inspect a lease table.
//!
//! Endpoints, region and credentials come from the standard AWS configuration
//! (`AWS_ENDPOINT_URL_KINESIS`, `AWS_ENDPOINT_URL_DYNAMODB`, `AWS_REGION`, profiles, …).

use std::io::Write as _;
use std::sync::Arc;

use anyhow::Context;
use base64::Engine as _;
use clap::{Parser, Subcommand};
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::lease::LeaseStore;
use kcl::{
    async_trait, Checkpointer, InitialPosition, ProcessorError, RecordBatch, RecordProcessor,
    Worker,
};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::Mutex;

#[derive(Parser)]
#[command(name = "kcl", version, about = "Kinesis consumer and lease-table tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume a stream, writing each record to stdout as one JSON object per line.
    Consume {
        /// The stream to read.
        #[arg(long)]
        stream: String,
        /// The application name (also the lease table, unless --table is given).
        #[arg(long)]
        app: String,
        /// The lease table (default: the application name).
        #[arg(long)]
        table: Option<String>,
        /// This worker's id (default: host name plus a random suffix).
        #[arg(long)]
        worker_id: Option<String>,
        /// Where shards without a checkpoint start: `trim-horizon`, `latest`, or
        /// `at-timestamp=<RFC 3339>` (e.g. `at-timestamp=2026-11-25T10:00:00Z`).
        #[arg(long, default_value = "trim-horizon", value_parser = parse_position)]
        position: InitialPosition,
    },
    /// Show the lease table.
    Leases {
        /// The application name (the lease table, unless --table is given).
        #[arg(long)]
        app: String,
        /// The lease table (default: the application name).
        #[arg(long)]
        table: Option<String>,
        /// Print a JSON array with the table's attribute names.
        #[arg(long)]
        json: bool,
    },
}

fn parse_position(s: &str) -> Result<InitialPosition, String> {
    match s {
        "trim-horizon" => Ok(InitialPosition::TrimHorizon),
        "latest" => Ok(InitialPosition::Latest),
        other => match other.strip_prefix("at-timestamp=") {
            Some(t) => humantime::parse_rfc3339_weak(t)
                .map(InitialPosition::AtTimestamp)
                .map_err(|e| format!("invalid RFC 3339 timestamp {t:?}: {e}")),
            None => Err(format!(
                "expected trim-horizon, latest or at-timestamp=<RFC 3339>, got {other:?}"
            )),
        },
    }
}

/// Writes records as JSON lines; one lock per batch keeps lines whole.
struct JsonLines {
    out: Arc<Mutex<BufWriter<tokio::io::Stdout>>>,
    /// One line at a time is encoded here (a batch is never encoded whole: 16 shards' worth of
    /// encoded batches waiting for the lock would double the memory the prefetch budget bounds).
    line: Vec<u8>,
    /// The base64 of one record's data.
    data: String,
}

#[async_trait]
impl RecordProcessor for JsonLines {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        let shard =
            serde_json::to_string(batch.shard_id.as_str()).map_err(ProcessorError::fatal)?;
        {
            let mut out = self.out.lock().await;
            for r in batch {
                self.line.clear();
                self.data.clear();
                let key = serde_json::to_string(&r.partition_key).map_err(ProcessorError::fatal)?;
                let _ = write!(
                    self.line,
                    "{{\"shard\":{shard},\"seq\":\"{}\",\"subseq\":{},\"key\":{key},\"data\":\"",
                    r.sequence_number, r.sub_sequence_number
                );
                base64::engine::general_purpose::STANDARD.encode_string(&r.data, &mut self.data);
                self.line.extend_from_slice(self.data.as_bytes());
                self.line.extend_from_slice(b"\"}\n");
                out.write_all(&self.line)
                    .await
                    .map_err(ProcessorError::retryable)?;
            }
            // Written out before the checkpoint says the batch is done.
            out.flush().await.map_err(ProcessorError::retryable)?;
        }
        cp.checkpoint().await.map_err(ProcessorError::retryable)
    }

    async fn shutdown_requested(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        // Everything delivered was written before its batch returned: checkpoint it.
        if cp.last_delivered().is_some() {
            cp.checkpoint().await.map_err(ProcessorError::retryable)?;
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    match cli.command {
        Command::Consume {
            stream,
            app,
            table,
            worker_id,
            position,
        } => {
            let out = Arc::new(Mutex::new(BufWriter::with_capacity(
                64 * 1024,
                tokio::io::stdout(),
            )));
            let mut builder = Worker::builder()
                .application_name(app)
                .stream(stream)
                .backends(kcl::Aws::from_conf(&sdk))
                .initial_position(position)
                .processor(move || JsonLines {
                    out: out.clone(),
                    line: Vec::new(),
                    data: String::new(),
                });
            if let Some(t) = table {
                builder = builder.table_name(t);
            }
            if let Some(id) = worker_id {
                builder = builder.worker_id(id);
            }
            let worker = builder.build()?;
            worker.run_until(shutdown_signal()).await?;
        }
        Command::Leases { app, table, json } => {
            let store = DynamoLeaseStore::from_conf(&sdk, table.unwrap_or(app));
            let table = store.list().await.context("reading the lease table")?;
            for bad in &table.malformed {
                eprintln!("warning: {bad}");
            }
            if json {
                let items: Vec<serde_json::Value> = table.leases.iter().map(lease_json).collect();
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else {
                print_table(&table.leases);
            }
        }
    }
    Ok(())
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("signal received; shutting down gracefully");
}

fn lease_json(l: &kcl::Lease) -> serde_json::Value {
    use kcl::lease::item::{encode, AttrValue};
    let mut map = serde_json::Map::new();
    for (name, value) in encode(l) {
        let v = match value {
            AttrValue::S(s) => serde_json::Value::String(s),
            AttrValue::N(n) => n
                .parse::<u64>()
                .map(serde_json::Value::from)
                .unwrap_or(serde_json::Value::String(n)),
            AttrValue::Ss(v) => serde_json::Value::from(v),
            AttrValue::B(b) => {
                serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
            AttrValue::Other(t) => serde_json::Value::String(format!("<{t}>")),
        };
        map.insert(name, v);
    }
    serde_json::Value::Object(map)
}

fn print_table(leases: &[kcl::Lease]) {
    let rows: Vec<[String; 5]> = leases
        .iter()
        .map(|l| {
            [
                l.key.to_string(),
                l.owner.as_ref().map_or("-".into(), |o| o.to_string()),
                l.counter.to_string(),
                l.checkpoint.to_string(),
                l.parent_shard_ids
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    let header = ["LEASE", "OWNER", "COUNTER", "CHECKPOINT", "PARENTS"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
}
