//! No record payload and no credential ever reaches a log line, at any level (`trace` for every
//! crate, the AWS SDK's included), over a whole run against kinesis-local and dynalite through
//! the real SDK clients: records read, a processor error retried, checkpoints, a graceful stop.
//! (Logged through `kcl::service::logging`: without its filter, the SDK's `trace` level dumps
//! whole `GetRecords` answers, payloads included — this test fails that way.)
//! And the log lines do carry what an operator needs: the worker, the shard and each batch's
//! sequence range (the spans).
//!
//! Its own test binary: it installs the process's global log subscriber.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::ensure;
use base64::Engine as _;
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::retrieval::aws::AwsKinesis;
use kcl::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor, Worker};
use kcl_integration_tests::dynamo_servers::start_dynalite;
use kcl_integration_tests::kinesis_server::{
    create_stream, put_records_with_parallelism, start_kinesis_local,
};
use kcl_integration_tests::unique_name;

const PAYLOAD: &str = "PAYLOAD-MARKER-7f3a";
const ACCESS_KEY: &str = "AKIDMARKER7F3A";
const SECRET_KEY: &str = "SECRET-MARKER-7f3a";
const SESSION_TOKEN: &str = "SESSION-MARKER-7f3a";
const RECORDS: usize = 30;

fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(Default::default)
}

struct Captured;

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        logs()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Fails its first batch (retryable), then checkpoints each batch; counts records.
struct Counting {
    failed: bool,
    seen: Arc<Mutex<usize>>,
}

#[async_trait]
impl RecordProcessor for Counting {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        if !self.failed {
            self.failed = true;
            return Err(ProcessorError::retryable("the first batch fails once"));
        }
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) += batch.len();
        cp.checkpoint().await?;
        Ok(())
    }
}

async fn conf(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new(
            ACCESS_KEY,
            SECRET_KEY,
            Some(SESSION_TOKEN.to_owned()),
            None,
            "marker",
        ))
        .load()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_payload_or_credential_reaches_a_log_line() -> anyhow::Result<()> {
    // The setup `kcl consume`, `kcl::service!` and the examples install, at `trace` for every
    // crate.
    tracing::subscriber::set_global_default(kcl::service::logging::subscriber(
        kcl::service::LogFormat::Text,
        Some("trace"),
        || Captured,
        false,
    ))?;
    let (kinesis, dynamo) = tokio::try_join!(start_kinesis_local(), start_dynalite())?;
    let (kinesis_url, dynamo_url) = (kinesis.endpoint(), dynamo.endpoint());
    let (kconf, dconf) = tokio::join!(conf(&kinesis_url), conf(&dynamo_url));
    let client = aws_sdk_kinesis::Client::new(&kconf);
    let stream = unique_name("logs");
    create_stream(&client, &stream, 1).await?;
    let records = (0..RECORDS)
        .map(|i| (format!("key-{i}"), format!("{PAYLOAD}-{i}").into_bytes()))
        .collect();
    put_records_with_parallelism(&client, &stream, records, 1).await?;

    let seen = Arc::new(Mutex::new(0));
    let app = unique_name("logs-app");
    let worker = Worker::builder()
        .application_name(&app)
        .stream(&stream)
        .worker_id("log-worker")
        .kinesis(Arc::new(AwsKinesis::new(client)))
        .lease_store(Arc::new(DynamoLeaseStore::from_conf(&dconf, &app)))
        .error_policy(kcl::ErrorPolicy::Retry {
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(100),
        })
        .processor({
            let seen = seen.clone();
            move || Counting {
                failed: false,
                seen: seen.clone(),
            }
        })
        .build()?;
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while *seen.lock().unwrap_or_else(|p| p.into_inner()) < RECORDS {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "not every record was processed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.shutdown();
    run.await??;

    let text =
        String::from_utf8_lossy(&logs().lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    let b64 = base64::engine::general_purpose::STANDARD;
    // The payload as bytes, and base64-encoded from its first byte (as in a JSON body).
    let payload_b64 = b64.encode(format!("{PAYLOAD}-0"));
    let forbidden = [
        PAYLOAD,
        &payload_b64[..16],
        SECRET_KEY,
        SESSION_TOKEN,
        &b64.encode(SECRET_KEY)[..16],
    ];
    for (n, line) in text.lines().enumerate() {
        for marker in forbidden {
            ensure!(
                !line.contains(marker),
                "log line {n} holds {marker:?}: {line}"
            );
        }
    }
    // What an operator needs is there: the spans and the failure.
    ensure!(
        text.lines().count() > 100,
        "too few log lines to mean anything"
    );
    ensure!(
        text.contains("worker{worker_id=log-worker}"),
        "no worker span"
    );
    ensure!(
        text.contains("consumer{shard_id=shardId-"),
        "no consumer span"
    );
    ensure!(
        text.lines()
            .any(|l| l.contains("batch{first=") && l.contains("the first batch fails once")),
        "the failed batch's log line shows no sequence range"
    );
    Ok(())
}
