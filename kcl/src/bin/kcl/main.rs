//! The `kcl` command-line tool: consume a stream as JSON lines, inspect and administer a lease
//! table (`docs/cli.md`).
//!
//! Endpoints, region and credentials come from the standard AWS configuration
//! (`AWS_ENDPOINT_URL_KINESIS`, `AWS_ENDPOINT_URL_DYNAMODB`, `AWS_REGION`, profiles, …).
//! Results go to stdout (a table, or JSON with `--json`); progress, warnings and errors to
//! stderr.

mod consume;
mod destroy;
mod drain;
mod leases;
mod output;
mod release;
mod reset;
mod shards;

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use kcl::lease::dynamo::DynamoLeaseStore;

#[derive(Parser)]
#[command(name = "kcl", version, about = "Kinesis consumer and lease-table tool")]
struct Cli {
    /// How log lines are written to stderr: `text` (colours only on a terminal without
    /// NO_COLOR) or `json` (one object per line). RUST_LOG filters them (default: info).
    #[arg(long, global = true, default_value = "text", value_parser = parse_log_format)]
    log_format: kcl::service::LogFormat,
    #[command(subcommand)]
    command: Command,
}

fn parse_log_format(s: &str) -> Result<kcl::service::LogFormat, String> {
    s.parse()
}

#[derive(Subcommand)]
enum Command {
    /// Consume a stream, writing each record to stdout as one JSON object per line.
    Consume(consume::Args),
    /// Show the lease table: each lease (with its lag behind the shard's tip, given --stream)
    /// and each worker.
    Leases(leases::Args),
    /// Show the stream's shard tree, each shard's state and (given --app) its lease.
    Shards(shards::Args),
    /// Move checkpoints back (or forward) to replay a stream within its retention.
    Reset(reset::Args),
    /// Clear a lease's owner (a stuck or dead worker), so another worker takes it.
    Release(release::Args),
    /// Hand every lease of one running worker to its peers (before maintenance) and wait
    /// until it holds none.
    Drain(drain::Args),
    /// Delete an application's lease table and worker table (and its fan-out consumer).
    Destroy(destroy::Args),
}

/// `--app` and `--table`: which lease table.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct AppArgs {
    /// The application name (the lease table, unless --table is given).
    #[arg(long)]
    app: String,
    /// The lease table (default: the application name).
    #[arg(long)]
    table: Option<String>,
}

impl AppArgs {
    /// The lease table's name.
    pub(crate) fn table(&self) -> &str {
        self.table.as_deref().unwrap_or(&self.app)
    }

    /// Which flag named the table, for messages.
    pub(crate) fn table_flag(&self) -> &'static str {
        if self.table.is_some() {
            "--table"
        } else {
            "--app"
        }
    }
}

/// How `reset` and `release` deal with an owner.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct TakeoverArgs {
    /// Also act on leases held by live workers of this library: each is asked to hand its
    /// lease over gracefully (its processor checkpoints and stops) first.
    #[arg(long)]
    force: bool,
    /// The fleet's lease duration: an owner is judged gone once its heartbeat (or lease
    /// counter) stood still this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// How long a live owner gets to hand a lease over (--force).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    handoff_timeout: Duration,
}

/// Reads the whole lease table (strongly consistent); malformed items are warned about on
/// stderr and left as they are.
pub(crate) async fn read_leases(
    store: &DynamoLeaseStore,
) -> anyhow::Result<kcl::lease::LeaseTable> {
    use kcl::lease::LeaseStore as _;
    let table = store.list().await.context("reading the lease table")?;
    for bad in &table.malformed {
        output::progress(&format!("warning: {bad} (left as it is)"));
    }
    Ok(table)
}

/// The AWS configuration, loaded once.
pub(crate) struct Aws {
    sdk: aws_config::SdkConfig,
}

impl Aws {
    pub(crate) async fn load() -> Self {
        Self {
            sdk: aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await,
        }
    }

    pub(crate) fn dynamodb(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::new(&self.sdk)
    }

    pub(crate) fn kinesis(&self) -> aws_sdk_kinesis::Client {
        aws_sdk_kinesis::Client::new(&self.sdk)
    }

    /// The lease store of `app`, using its worker table if that exists; never creates a table.
    /// Returns whether the worker table exists.
    ///
    /// Errors when the lease table does not exist (naming the flag that named it).
    pub(crate) async fn existing_store(
        &self,
        app: &AppArgs,
    ) -> anyhow::Result<(DynamoLeaseStore, bool)> {
        let store = DynamoLeaseStore::new(self.dynamodb(), app.table());
        let (leases, workers) = store
            .open_existing()
            .await
            .with_context(|| format!("reading the lease table {:?}", app.table()))?;
        if !leases {
            bail!(
                "there is no lease table {:?} (from {}): check the name, the region and \
                 AWS_ENDPOINT_URL_DYNAMODB",
                app.table(),
                app.table_flag()
            );
        }
        Ok((store, workers))
    }
}

/// Parses a duration such as `10s`, `500ms`, `2m` (flags name themselves in clap's error).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("expected a duration such as 10s or 500ms: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Never a record payload in a log line, whatever RUST_LOG asks (kcl::service::logging).
    kcl::service::init_logging_as(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "Error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // A write stuck on a stdout nobody reads must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: a closed stderr must not turn the error into a panic.
            let _ = writeln!(std::io::stderr(), "Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Consume(args) => consume::run(args).await,
        Command::Leases(args) => leases::run(args).await,
        Command::Shards(args) => shards::run(args).await,
        Command::Reset(args) => reset::run(args).await,
        Command::Release(args) => release::run(args).await,
        Command::Destroy(args) => destroy::run(args).await,
        Command::Drain(args) => drain::run(args).await,
    }
}
