//! kinesis-local (npm `kinesis-local@0.6.2`): starting it, and the producer-side helpers tests
//! need (create a stream, load records, split, merge), all through the real `aws-sdk-kinesis`.
//!
//! kinesis-local is slow to write to, and the more so the more records a shard already holds
//! (its appends cost grows with the shard's size) and the larger the records: it spends one
//! core of CPU on it. [`put_records`] keeps a few 500-record calls in flight so the server is
//! never idle. Measured on 2 cores (debug build of the client, which is not the bottleneck):
//! 10 000 records of 1 KiB load in ~12 s into 16 shards (~800 records/s, 4 calls in flight;
//! 2 or 8 make no difference), ~20 s into 4 shards (falling from 650 to 400 records/s as the
//! shards fill), ~47 s into 1 shard (falling to 130 records/s); 10 000 records of 100 bytes
//! into 16 shards take ~4 s. Size test data accordingly: many shards, small records.

use std::time::Duration;

use anyhow::{bail, ensure, Context};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ScalingType, StreamStatus};
use aws_sdk_kinesis::Client;
use futures::stream::{StreamExt, TryStreamExt};
use kcl::{SequenceNumber, ShardId};
use tokio::process::Command;

use crate::{emulators_dir, free_port, ServerProcess};

/// How often the helpers poll `DescribeStreamSummary` while waiting for `ACTIVE`.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long the helpers wait for a stream to become `ACTIVE`.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// The most entries one `PutRecords` call takes.
const MAX_BATCH_RECORDS: usize = 500;
/// The most bytes (data + partition keys) one `PutRecords` call takes.
const MAX_BATCH_BYTES: usize = 5 * 1024 * 1024;
/// `PutRecords` calls [`put_records`] keeps in flight.
pub const DEFAULT_PUT_PARALLELISM: usize = 4;
/// How many times a record a `PutRecords` call rejected is sent again.
const MAX_PUT_ATTEMPTS: u32 = 20;

/// Starts kinesis-local on a free plain (HTTP/1.1) port and another free TLS port, with short
/// stream-state transitions (100 ms) and a 1000-shard account limit. The returned process's
/// [`port`](ServerProcess::port) / [`endpoint`](ServerProcess::endpoint) is the plain one.
pub async fn start_kinesis_local() -> anyhow::Result<ServerProcess> {
    let cert = emulators_dir()
        .join("node_modules")
        .join("kinesis-local")
        .join("server.json");
    ServerProcess::spawn_retrying("kinesis-local", || {
        let (cmd, plain, _tls) = kinesis_local_command(&cert)?;
        Ok((cmd, plain))
    })
    .await
}

/// The kinesis-local command both starters run: free plain and TLS ports, the certificate
/// file `cert`, short stream-state transitions, a 1000-shard account limit, in memory only.
/// Returns the command and its (plain, TLS) ports.
fn kinesis_local_command(cert: &std::path::Path) -> anyhow::Result<(Command, u16, u16)> {
    let main = emulators_dir()
        .join("node_modules")
        .join("kinesis-local")
        .join("main.js");
    ensure!(
        main.exists(),
        "kinesis-local is not installed at {} (run scripts/test.sh, or \
         `npm install --prefix .emulators kinesis-local@0.6.2`)",
        main.display()
    );
    ensure!(cert.exists(), "no certificate file at {}", cert.display());
    let plain = free_port()?;
    let mut tls = free_port()?;
    while tls == plain {
        tls = free_port()?;
    }
    let mut cmd = Command::new("node");
    cmd.arg(&main)
        // Required even when only the plain port is used.
        .env("KINESIS_MOCK_CERT_PATH", cert)
        .env("KINESIS_MOCK_PLAIN_PORT", plain.to_string())
        .env("KINESIS_MOCK_TLS_PORT", tls.to_string())
        .env("CREATE_STREAM_DURATION", "100ms")
        .env("DELETE_STREAM_DURATION", "100ms")
        .env("SPLIT_SHARD_DURATION", "100ms")
        .env("MERGE_SHARDS_DURATION", "100ms")
        .env("UPDATE_SHARD_COUNT_DURATION", "100ms")
        .env("REGISTER_STREAM_CONSUMER_DURATION", "100ms")
        .env("DEREGISTER_STREAM_CONSUMER_DURATION", "100ms")
        .env("SHARD_LIMIT", "1000")
        // In memory only: never load or write a data file from the working directory.
        .env("SHOULD_PERSIST_DATA", "false")
        .env("LOAD_DATA_IF_EXISTS", "false")
        .env("LOG_LEVEL", "WARN");
    Ok((cmd, plain, tls))
}

/// An `aws-sdk-kinesis` client for `server` (dummy credentials, `us-east-1`).
pub async fn kinesis_client(server: &ServerProcess) -> Client {
    Client::new(&crate::sdk_config(&server.endpoint()).await)
}

/// Creates a stream with `shards` shards and waits until it is `ACTIVE`.
pub async fn create_stream(client: &Client, name: &str, shards: u32) -> anyhow::Result<()> {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(i32::try_from(shards).context("shard count")?)
        .send()
        .await
        .with_context(|| format!("CreateStream {name}"))?;
    wait_active(client, name, None).await
}

/// Waits until the stream is `ACTIVE` (and, if given, has `open_shards` open shards), polling
/// `DescribeStreamSummary` every 50 ms for up to 30 s.
pub async fn wait_active(
    client: &Client,
    name: &str,
    open_shards: Option<i32>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + ACTIVE_TIMEOUT;
    loop {
        let summary = client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .with_context(|| format!("DescribeStreamSummary {name}"))?;
        let summary = summary
            .stream_description_summary
            .context("DescribeStreamSummary without a summary")?;
        let open = summary.open_shard_count;
        if summary.stream_status == StreamStatus::Active
            && open_shards.is_none_or(|want| want == open)
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "stream {name} is {:?} with {open} open shards after {ACTIVE_TIMEOUT:?}",
                summary.stream_status
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The number of open shards of a stream.
pub async fn open_shard_count(client: &Client, name: &str) -> anyhow::Result<i32> {
    let summary = client
        .describe_stream_summary()
        .stream_name(name)
        .send()
        .await
        .with_context(|| format!("DescribeStreamSummary {name}"))?;
    Ok(summary
        .stream_description_summary
        .context("DescribeStreamSummary without a summary")?
        .open_shard_count)
}

/// Where `PutRecords` stored one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Put {
    /// The shard the record went to.
    pub shard_id: ShardId,
    /// Its sequence number.
    pub sequence_number: SequenceNumber,
}

/// Puts `records` (partition key, data) with `PutRecords` in calls of at most 500 records
/// (and 5 MiB), [`DEFAULT_PUT_PARALLELISM`] calls in flight, sending again the records a call
/// rejected. Returns where each record went, in the order of `records`.
///
/// Records of one call keep their order within a shard; across calls that run in parallel
/// (and for a retried record) there is no order: use [`put_records_with_parallelism`] with 1
/// when a test needs per-key order over more than 500 records.
pub async fn put_records(
    client: &Client,
    stream: &str,
    records: Vec<(String, Vec<u8>)>,
) -> anyhow::Result<Vec<Put>> {
    put_records_with_parallelism(client, stream, records, DEFAULT_PUT_PARALLELISM).await
}

/// [`put_records`] with `parallelism` calls in flight (at least 1).
pub async fn put_records_with_parallelism(
    client: &Client,
    stream: &str,
    records: Vec<(String, Vec<u8>)>,
    parallelism: usize,
) -> anyhow::Result<Vec<Put>> {
    let mut batches: Vec<Vec<PutRecordsRequestEntry>> = Vec::new();
    let mut batch_bytes = 0;
    for (key, data) in records {
        let size = key.len() + data.len();
        let full = batches
            .last()
            .is_none_or(|b| b.len() >= MAX_BATCH_RECORDS || batch_bytes + size > MAX_BATCH_BYTES);
        if full {
            batches.push(Vec::new());
            batch_bytes = 0;
        }
        batch_bytes += size;
        let entry = PutRecordsRequestEntry::builder()
            .partition_key(key)
            .data(Blob::new(data))
            .build()
            .context("building a PutRecords entry")?;
        batches.last_mut().expect("pushed above").push(entry);
    }
    let results: Vec<Vec<Put>> = futures::stream::iter(batches)
        .map(|batch| put_batch(client, stream, batch))
        .buffered(parallelism.max(1))
        .try_collect()
        .await?;
    Ok(results.into_iter().flatten().collect())
}

/// One `PutRecords` call, then again for the entries it rejected, until all are stored.
async fn put_batch(
    client: &Client,
    stream: &str,
    batch: Vec<PutRecordsRequestEntry>,
) -> anyhow::Result<Vec<Put>> {
    let mut done: Vec<Option<Put>> = vec![None; batch.len()];
    let mut pending: Vec<usize> = (0..batch.len()).collect();
    let mut backoff = Duration::from_millis(50);
    for attempt in 1..=MAX_PUT_ATTEMPTS {
        let out = client
            .put_records()
            .stream_name(stream)
            .set_records(Some(pending.iter().map(|&i| batch[i].clone()).collect()))
            .send()
            .await
            .with_context(|| format!("PutRecords to {stream} ({} records)", pending.len()))?;
        ensure!(
            out.records.len() == pending.len(),
            "PutRecords answered {} results for {} records",
            out.records.len(),
            pending.len()
        );
        let mut rejected = Vec::new();
        let mut last_error = None;
        for (&i, result) in pending.iter().zip(out.records) {
            match (result.shard_id, result.sequence_number, result.error_code) {
                (Some(shard), Some(seq), None) => {
                    let sequence_number = SequenceNumber::parse(&seq)
                        .with_context(|| format!("PutRecords returned sequence {seq:?}"))?;
                    done[i] = Some(Put {
                        shard_id: ShardId::new(shard),
                        sequence_number,
                    });
                }
                (_, _, code) => {
                    last_error = Some(format!(
                        "{}: {}",
                        code.unwrap_or_default(),
                        result.error_message.unwrap_or_default()
                    ));
                    rejected.push(i);
                }
            }
        }
        if rejected.is_empty() {
            return Ok(done.into_iter().flatten().collect());
        }
        tracing::debug!(
            attempt,
            rejected = rejected.len(),
            ?last_error,
            "PutRecords rejected records; sending them again"
        );
        pending = rejected;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    bail!(
        "PutRecords to {stream}: {} records still rejected after {MAX_PUT_ATTEMPTS} attempts",
        pending.len()
    )
}

/// Splits `shard` at `new_starting_hash_key` and waits until the stream is `ACTIVE` with one
/// more open shard.
pub async fn split_shard(
    client: &Client,
    stream: &str,
    shard: &str,
    new_starting_hash_key: u128,
) -> anyhow::Result<()> {
    let before = open_shard_count(client, stream).await?;
    client
        .split_shard()
        .stream_name(stream)
        .shard_to_split(shard)
        .new_starting_hash_key(new_starting_hash_key.to_string())
        .send()
        .await
        .with_context(|| format!("SplitShard {stream} {shard}"))?;
    wait_active(client, stream, Some(before + 1)).await
}

/// Merges two adjacent open shards and waits until the stream is `ACTIVE` with one open shard
/// fewer.
pub async fn merge_shards(
    client: &Client,
    stream: &str,
    shard: &str,
    adjacent: &str,
) -> anyhow::Result<()> {
    let before = open_shard_count(client, stream).await?;
    client
        .merge_shards()
        .stream_name(stream)
        .shard_to_merge(shard)
        .adjacent_shard_to_merge(adjacent)
        .send()
        .await
        .with_context(|| format!("MergeShards {stream} {shard} + {adjacent}"))?;
    wait_active(client, stream, Some(before - 1)).await
}

/// Scales to `target` open shards (`UpdateShardCount`, uniform scaling) and waits until the
/// stream is `ACTIVE` with that many open shards.
pub async fn update_shard_count(client: &Client, stream: &str, target: u32) -> anyhow::Result<()> {
    let target = i32::try_from(target).context("shard count")?;
    client
        .update_shard_count()
        .stream_name(stream)
        .target_shard_count(target)
        .scaling_type(ScalingType::UniformScaling)
        .send()
        .await
        .with_context(|| format!("UpdateShardCount {stream} to {target}"))?;
    wait_active(client, stream, Some(target)).await
}

/// kinesis-local serving its TLS port with a certificate of the caller's: HTTP/2 over TLS, as
/// AWS serves `SubscribeToShard`.
#[derive(Debug)]
pub struct TlsKinesisLocal {
    /// The process (stopped when dropped); its [`port`](ServerProcess::port) is the TLS port.
    pub server: ServerProcess,
    /// The plain (HTTP/1.1) port.
    pub plain_port: u16,
}

impl TlsKinesisLocal {
    /// `https://127.0.0.1:<TLS port>` (the certificate must name `IP:127.0.0.1`).
    pub fn https_endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.server.port)
    }
}

/// Starts kinesis-local as [`start_kinesis_local`] does, with its TLS port serving the
/// certificate in `cert_path`: a JSON file `{"server":{"key":"<PEM>","cert":"<PEM>"}}` (the
/// bundled certificate names no subject alternative name, so rustls refuses it). Waits until
/// the TLS port accepts connections.
pub async fn start_kinesis_local_tls(
    cert_path: &std::path::Path,
) -> anyhow::Result<TlsKinesisLocal> {
    let (cmd, plain, tls) = kinesis_local_command(cert_path)?;
    let server = ServerProcess::spawn("kinesis-local-tls", cmd, tls).await?;
    Ok(TlsKinesisLocal {
        server,
        plain_port: plain,
    })
}
