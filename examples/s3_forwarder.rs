//! Forwards a Kinesis stream to S3, **exactly once**: every record ends up in exactly one
//! object, even when the process is killed at any moment.
//!
//! ```text
//! cargo run -p kcl-examples --features aws --example s3_forwarder -- \
//!     --stream S --app A --bucket B [--prefix P] [--max-bytes N] [--max-age SECS] [--gzip] \
//!     [--worker-id ID] [--lease-duration SECS]
//! ```
//!
//! Endpoints, region and credentials come from the standard AWS variables
//! (`AWS_ENDPOINT_URL_S3` also switches on path-style addressing, for local servers such as
//! moto). SIGINT/SIGTERM flush what was read, checkpoint, release the leases and exit 0.
//!
//! **Objects.** One object per shard and flush (when `--max-bytes` of lines are buffered, when
//! the oldest buffered record is `--max-age` old, at shutdown, handoff and shard end), named
//! `P/YYYY/MM/DD/HH/<shard>/<first seq>-<last seq>.jsonl[.gz]` (the time is the first record's
//! arrival time, UTC; a KPL sub-record's position is written `seq.subseq`). Each line is a
//! record in the `kcl consume` format: `{"shard","seq","subseq","key","data"(base64)}`.
//!
//! **Exactly once**, with the two-phase checkpoint: before uploading the records from the
//! checkpoint up to `last`, the forwarder *prepares* a checkpoint at `last` with the object's
//! key as its state; it uploads; then it *commits* (the checkpoint moves to `last`). A worker
//! killed in between leaves the pending checkpoint in the lease. The next owner resumes after
//! the checkpoint, so it reads exactly the same records again, and writes them under the
//! stored key (a PUT that overwrites, with the same content) before committing and going on.
//! A worker killed before preparing uploaded nothing; one killed after committing lost
//! nothing. A worker that lost its lease cannot prepare or commit (the writes are fenced), and
//! an upload it still had in flight has the same key and content as the new owner's.
#![cfg_attr(not(unix), allow(unused))]

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use clap::Parser;
use kcl::worker::signal::SignalOutcome;
use kcl::{
    async_trait, Checkpointer, ExtendedSequenceNumber, ProcessorError, Record, RecordBatch,
    RecordProcessor, ShardContext, ShardId, Worker,
};
use tracing::{info, warn};

/// Forward a Kinesis stream to S3, exactly once.
#[derive(Debug, Parser)]
#[command(name = "s3_forwarder")]
struct Args {
    /// The stream to read.
    #[arg(long)]
    stream: String,
    /// The application name (also the lease table's name).
    #[arg(long)]
    app: String,
    /// The bucket to write to.
    #[arg(long)]
    bucket: String,
    /// The key prefix (without a trailing slash).
    #[arg(long, default_value = "")]
    prefix: String,
    /// Flush a shard's object once its lines reach this many bytes (before compression).
    #[arg(long, default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    max_bytes: u64,
    /// Flush a shard's object once its oldest record was read this many seconds ago.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    max_age: u64,
    /// Compress objects with gzip (`.jsonl.gz`).
    #[arg(long)]
    gzip: bool,
    /// This worker's id in the lease table (default: host name and a random suffix).
    #[arg(long)]
    worker_id: Option<String>,
    /// Seconds after which a dead worker's leases are taken over.
    #[arg(long)]
    lease_duration: Option<u64>,
}

/// Where and how objects are written: shared by every shard's processor.
struct Sink {
    s3: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    gzip: bool,
    max_bytes: u64,
    max_age: Duration,
}

/// The key of the object holding the records `first..=last` of `shard`, the first of which
/// arrived at `arrival`.
fn object_key(
    prefix: &str,
    shard: &ShardId,
    arrival: SystemTime,
    first: &ExtendedSequenceNumber,
    last: &ExtendedSequenceNumber,
    gzip: bool,
) -> String {
    // "2026-12-01T15:06:56Z" → "2026/12/01/15"
    let stamp = humantime::format_rfc3339_seconds(arrival).to_string();
    let hour = format!(
        "{}/{}/{}/{}",
        &stamp[0..4],
        &stamp[5..7],
        &stamp[8..10],
        &stamp[11..13]
    );
    let position = |p: &ExtendedSequenceNumber| match p.sub_sequence() {
        0 => p.checkpoint_str().to_owned(),
        sub => format!("{}.{sub}", p.checkpoint_str()),
    };
    let ext = if gzip { "jsonl.gz" } else { "jsonl" };
    let name = format!(
        "{hour}/{shard}/{}-{}.{ext}",
        position(first),
        position(last)
    );
    if prefix.is_empty() {
        name
    } else {
        format!("{}/{name}", prefix.trim_end_matches('/'))
    }
}

/// The state stored with a prepared checkpoint: the key of the object being uploaded.
fn encode_state(key: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "key": key }).to_string())
}

/// The key in a prepared checkpoint's state.
fn decode_state(state: &[u8]) -> anyhow::Result<String> {
    let v: serde_json::Value = serde_json::from_slice(state).context("not JSON")?;
    v["key"]
        .as_str()
        .map(str::to_owned)
        .context("no \"key\" string")
}

/// Lines waiting for one object.
#[derive(Default)]
struct Buffer {
    lines: Vec<u8>,
    first: Option<(ExtendedSequenceNumber, SystemTime)>,
    last: Option<ExtendedSequenceNumber>,
    /// When the first record was added (by this process's clock: `--max-age`).
    opened: Option<tokio::time::Instant>,
}

impl Buffer {
    fn push(&mut self, shard: &ShardId, r: &Record) -> Result<(), ProcessorError> {
        r.write_json_line(shard, &mut self.lines)
            .map_err(ProcessorError::fatal)?;
        if self.first.is_none() {
            let arrival = r.approximate_arrival.unwrap_or_else(SystemTime::now);
            self.first = Some((r.position(), arrival));
            self.opened = Some(tokio::time::Instant::now());
        }
        self.last = Some(r.position());
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.last.is_none()
    }

    fn older_than(&self, age: Duration) -> bool {
        self.opened.is_some_and(|t| t.elapsed() >= age)
    }
}

/// A range a previous owner prepared but did not commit: uploaded again under `key`.
struct Replay {
    key: String,
    upto: ExtendedSequenceNumber,
    buffer: Buffer,
}

/// One shard's forwarder.
struct Forwarder {
    sink: Arc<Sink>,
    shard: ShardId,
    buffer: Buffer,
    replay: Option<Replay>,
    /// The last record added to a buffer: a batch retried by the error policy skips the
    /// records it already added.
    queued: Option<ExtendedSequenceNumber>,
}

impl Forwarder {
    fn new(sink: Arc<Sink>, shard: &ShardId) -> Self {
        Self {
            sink,
            shard: shard.clone(),
            buffer: Buffer::default(),
            replay: None,
            queued: None,
        }
    }

    /// The object's body: the lines, gzipped if asked.
    fn body(&self, lines: &[u8]) -> Result<Vec<u8>, ProcessorError> {
        if !self.sink.gzip {
            return Ok(lines.to_vec());
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(lines).map_err(ProcessorError::fatal)?;
        gz.finish().map_err(ProcessorError::fatal)
    }

    async fn put(&self, key: &str, lines: &[u8]) -> Result<(), ProcessorError> {
        let body = self.body(lines)?;
        self.sink
            .s3
            .put_object()
            .bucket(&self.sink.bucket)
            .key(key)
            .content_type("application/x-ndjson")
            .set_content_encoding(self.sink.gzip.then(|| "gzip".to_owned()))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| {
                ProcessorError::retryable(anyhow::anyhow!(
                    "PutObject {key}: {}",
                    aws_sdk_s3::error::DisplayErrorContext(e)
                ))
            })?;
        Ok(())
    }

    /// Uploads the buffer as one object, two-phase: prepare (the key as state), upload,
    /// commit. The buffer is kept until the commit succeeded, so a retry uploads the same
    /// object again.
    async fn flush(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        let (Some((first, arrival)), Some(last)) = (&self.buffer.first, &self.buffer.last) else {
            return Ok(());
        };
        let key = object_key(
            &self.sink.prefix,
            &self.shard,
            *arrival,
            first,
            last,
            self.sink.gzip,
        );
        cp.prepare(last.clone(), Some(encode_state(&key))).await?;
        info!(shard = %self.shard, %key, "prepared; uploading");
        self.put(&key, &self.buffer.lines).await?;
        cp.commit().await?;
        info!(shard = %self.shard, %key, bytes = self.buffer.lines.len(), "object written");
        self.buffer = Buffer::default();
        Ok(())
    }

    /// Finishes a previous owner's upload: the same records, under the same key.
    async fn finish_replay(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        let Some(replay) = &self.replay else {
            return Ok(());
        };
        self.put(&replay.key, &replay.buffer.lines).await?;
        cp.commit().await?;
        info!(shard = %self.shard, key = %replay.key, "object of the previous owner written again");
        self.replay = None;
        Ok(())
    }

    async fn add(&mut self, r: &Record, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        let position = r.position();
        if self.queued.as_ref().is_some_and(|q| position <= *q) {
            return Ok(());
        }
        if let Some(replay) = &mut self.replay {
            if position > replay.upto {
                // Records up to the prepared position are gone (trimmed by retention):
                // the object gets what is left of them.
                warn!(shard = %self.shard, key = %replay.key, "the prepared range ended early; writing what was read");
                self.finish_replay(cp).await?;
            } else {
                replay.buffer.push(&self.shard, r)?;
                self.queued = Some(position.clone());
                if position == replay.upto {
                    self.finish_replay(cp).await?;
                }
                return Ok(());
            }
        }
        self.buffer.push(&self.shard, r)?;
        self.queued = Some(position);
        if self.buffer.lines.len() as u64 >= self.sink.max_bytes {
            self.flush(cp).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl RecordProcessor for Forwarder {
    async fn initialize(&mut self, shard: &ShardContext) -> Result<(), ProcessorError> {
        let Some(pending) = &shard.pending_checkpoint else {
            return Ok(());
        };
        let state = pending.state().ok_or_else(|| {
            ProcessorError::fatal(format!(
                "shard {}: a pending checkpoint without state (not written by this forwarder?)",
                self.shard
            ))
        })?;
        let key = decode_state(state).map_err(|e| {
            ProcessorError::fatal(format!(
                "shard {}: the pending checkpoint's state is not this forwarder's: {e:#}",
                self.shard
            ))
        })?;
        info!(shard = %self.shard, %key, upto = %pending.position, "a previous owner was uploading; writing that object again");
        self.replay = Some(Replay {
            key,
            upto: pending.position.clone(),
            buffer: Buffer::default(),
        });
        Ok(())
    }

    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        for r in batch {
            self.add(r, cp).await?;
        }
        if self.buffer.older_than(self.sink.max_age) {
            self.flush(cp).await?;
        }
        Ok(())
    }

    fn idle_interval(&self) -> Option<Duration> {
        Some(self.sink.max_age.min(Duration::from_secs(1)))
    }

    async fn idle(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        if self.buffer.older_than(self.sink.max_age) {
            self.flush(cp).await?;
        }
        Ok(())
    }

    async fn shard_ended(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        if self.replay.is_some() {
            self.finish_replay(cp).await?;
        }
        self.flush(cp).await?;
        cp.checkpoint().await?; // SHARD_END: the children may start
        Ok(())
    }

    async fn shutdown_requested(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        // An unfinished replay stays pending for the next owner.
        if self.replay.is_none() && !self.buffer.is_empty() {
            self.flush(cp).await?;
        }
        Ok(())
    }

    async fn lease_lost(&mut self) {
        // The next owner reads these records again.
        self.buffer = Buffer::default();
        self.replay = None;
    }
}

async fn run(args: Args) -> anyhow::Result<SignalOutcome> {
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let s3_conf = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(std::env::var_os("AWS_ENDPOINT_URL_S3").is_some())
        .build();
    let s3 = aws_sdk_s3::Client::from_conf(s3_conf);
    s3.head_bucket()
        .bucket(&args.bucket)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "--bucket {}: cannot reach the bucket: {}",
                args.bucket,
                aws_sdk_s3::error::DisplayErrorContext(e)
            )
        })?;
    let sink = Arc::new(Sink {
        s3,
        bucket: args.bucket,
        prefix: args.prefix,
        gzip: args.gzip,
        max_bytes: args.max_bytes,
        max_age: Duration::from_secs(args.max_age),
    });
    let mut builder = Worker::builder()
        .application_name(args.app)
        .stream(args.stream)
        .backends(kcl::Aws::from_conf(&sdk))
        .processor(kcl::processor::ProcessorFactoryFn(
            move |shard: &ShardId| Forwarder::new(sink.clone(), shard),
        ));
    if let Some(id) = args.worker_id {
        builder = builder.worker_id(id);
    }
    if let Some(secs) = args.lease_duration {
        builder = builder.lease_duration(Duration::from_secs(secs));
    }
    let worker = builder.build()?;
    Ok(worker.run_until_signal().await?)
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(SignalOutcome::Abandoned(signal)) => {
            eprintln!("{signal} received twice: stopped without waiting; pending uploads are finished by the next owner");
            ExitCode::FAILURE
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kcl::SequenceNumber;

    fn at(n: u128, sub: u64) -> ExtendedSequenceNumber {
        ExtendedSequenceNumber::at(SequenceNumber::from_u128(n), sub)
    }

    #[test]
    fn object_keys_follow_the_documented_layout() {
        let shard = ShardId::new("shardId-000000000001");
        // 2026-12-01T15:06:56Z
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_137_616);
        #[rustfmt::skip]
        let table = [
            ("logs", false, at(100, 0), at(200, 0),
                "logs/2026/12/01/15/shardId-000000000001/100-200.jsonl"),
            ("logs/", true, at(100, 0), at(200, 0),
                "logs/2026/12/01/15/shardId-000000000001/100-200.jsonl.gz"),
            ("", false, at(7, 2), at(7, 5),
                "2026/12/01/15/shardId-000000000001/7.2-7.5.jsonl"),
        ];
        for (prefix, gzip, first, last, expected) in table {
            assert_eq!(object_key(prefix, &shard, t, &first, &last, gzip), expected);
        }
    }

    #[test]
    fn the_state_round_trips_and_foreign_state_is_refused() {
        let key = "p/2026/12/01/15/shardId-0/1-2.jsonl";
        assert_eq!(decode_state(&encode_state(key)).expect("ours"), key);
        assert!(decode_state(b"not json").is_err());
        assert!(decode_state(br#"{"other":1}"#).is_err());
    }
}
