//! Every network call has a timeout. Against a server that accepts connections and never
//! answers (a half-open connection, as after a network partition), each call fails with a
//! retryable error within a bounded time, after the SDK retried the attempts that timed out:
//!
//! - with the default timeouts (the configuration sets none, as `aws_config::load_defaults`
//!   gives it): a lease-table call fails after 15 s, Kinesis control-plane calls and
//!   `SubscribeToShard` after 15 s, `GetRecords` and the producer's `PutRecords` (and so
//!   `flush`) after 25 s;
//! - timeouts set in the `SdkConfig` are used instead of the defaults.
//!
//! The tests wait concurrently: the whole file takes about 25 s with `--test-threads=5`, about
//! 45 s with two.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use aws_config::timeout::TimeoutConfig;
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::lease::{LeaseKey, LeaseStore, LeaseStoreError};
use kcl::producer::aws::AwsPutRecords;
use kcl::producer::{Producer, ProducerError};
use kcl::retrieval::aws::AwsKinesis;
use kcl::retrieval::{IteratorPosition, KinesisApi, KinesisApiError, ShardIterator};
use kcl::{Backends, ShardId};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Slack over a timeout for the SDK's retry backoff, scheduling and a loaded machine.
const SLACK: Duration = Duration::from_secs(5);

/// A TCP server that accepts every connection and holds it open without ever answering.
struct SilentServer {
    endpoint: String,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl SilentServer {
    async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                // Never read, never answer, never close.
                held.push(socket);
            }
        });
        Ok(Self {
            endpoint,
            accepted,
            task,
        })
    }

    /// Connections accepted so far (one per attempt: a timed-out attempt's connection is not
    /// reused).
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An SDK config pointing every service at `endpoint`, as `aws_config::load_defaults` builds it
/// (its only timeout is the connect timeout), plus `timeouts` if given.
async fn config(endpoint: &str, timeouts: Option<TimeoutConfig>) -> aws_config::SdkConfig {
    let mut loader = kcl_integration_tests::sdk_loader(endpoint);
    if let Some(t) = timeouts {
        loader = loader.timeout_config(t);
    }
    loader.load().await
}

/// Runs `call`; checks it fails within `limit` (and not before `at_least`), and returns the
/// error and how long it took.
async fn timed<T, E: std::fmt::Debug>(
    what: &str,
    at_least: Duration,
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> anyhow::Result<(E, Duration)> {
    let started = Instant::now();
    let result = tokio::time::timeout(limit, call)
        .await
        .with_context(|| format!("{what} did not fail within {limit:?}: no timeout"))?;
    let took = started.elapsed();
    let Err(e) = result else {
        anyhow::bail!("{what} succeeded against a server that never answers");
    };
    eprintln!("{what}: failed after {took:.1?}: {e:?}");
    ensure!(
        took >= at_least,
        "{what} failed after {took:?}, before its timeout ({at_least:?}): {e:?}"
    );
    Ok((e, took))
}

/// The error's text says it was a timeout (not, say, a refused connection).
fn is_timeout(e: &impl std::fmt::Debug) -> bool {
    let text = format!("{e:?}").to_lowercase();
    text.contains("timeout") || text.contains("timed out")
}

fn transient_lease_error(what: &str, e: &LeaseStoreError) -> anyhow::Result<()> {
    ensure!(
        matches!(e, LeaseStoreError::Transient(_)) && e.is_retryable() && is_timeout(e),
        "{what}: expected a transient timeout, got {e:?}"
    );
    Ok(())
}

fn transient_kinesis_error(what: &str, e: &KinesisApiError) -> anyhow::Result<()> {
    ensure!(
        matches!(e, KinesisApiError::Transient(_)) && e.is_retryable() && is_timeout(e),
        "{what}: expected a transient timeout, got {e:?}"
    );
    Ok(())
}

/// Lease-table calls (through the backends the worker uses) time out after 15 s, each
/// attempt after 5 s (the SDK retried: more than one connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_table_calls_time_out_by_default() -> anyhow::Result<()> {
    let server = SilentServer::start().await?;
    let conf = config(&server.endpoint, None).await;
    let store = kcl::Aws::from_conf(&conf).lease_store("lease-table");
    let call = Duration::from_secs(15);
    let key = LeaseKey::new("shardId-000000000000");
    let (list, get) = tokio::join!(
        timed("list", call, call + SLACK, store.list()),
        timed("get", call, call + SLACK, store.get(&key)),
    );
    transient_lease_error("list", &list?.0)?;
    transient_lease_error("get", &get?.0)?;
    ensure!(
        server.accepted() >= 4,
        "{} connections for 2 calls: the timed-out attempts were not retried",
        server.accepted()
    );
    Ok(())
}

/// Kinesis calls time out: `ListShards`, `GetShardIterator` and `SubscribeToShard` after
/// 15 s, `GetRecords` after 25 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_calls_time_out_by_default() -> anyhow::Result<()> {
    let server = SilentServer::start().await?;
    let conf = config(&server.endpoint, None).await;
    let kinesis = kcl::Aws::from_conf(&conf).kinesis();
    let shard = ShardId::new("shardId-000000000000");
    let control = Duration::from_secs(15);
    let get_records = Duration::from_secs(25);
    let iterator = ShardIterator::new("AAAAAAAAAAAAAAAA");
    let arn = "arn:aws:kinesis:us-east-1:000000000000:stream/s/consumer/c:1";
    let (list, get_iterator, records, subscribe) = tokio::join!(
        timed(
            "ListShards",
            control,
            control + SLACK,
            kinesis.list_shards("s")
        ),
        timed(
            "GetShardIterator",
            control,
            control + SLACK,
            kinesis.get_shard_iterator("s", &shard, &IteratorPosition::TrimHorizon),
        ),
        timed(
            "GetRecords",
            get_records,
            get_records + SLACK,
            kinesis.get_records(&iterator, 100),
        ),
        timed(
            "SubscribeToShard",
            control,
            control + SLACK,
            kinesis.subscribe_to_shard(arn, &shard, &IteratorPosition::TrimHorizon),
        ),
    );
    transient_kinesis_error("ListShards", &list?.0)?;
    transient_kinesis_error("GetShardIterator", &get_iterator?.0)?;
    transient_kinesis_error("GetRecords", &records?.0)?;
    transient_kinesis_error("SubscribeToShard", &subscribe?.0)?;
    ensure!(
        server.accepted() >= 8,
        "{} connections for 4 calls: the timed-out attempts were not retried",
        server.accepted()
    );
    Ok(())
}

/// The producer's `flush` cannot hang: its `PutRecords` call times out after 25 s (a
/// transient error, sent again up to `max_attempts`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_flush_times_out_by_default() -> anyhow::Result<()> {
    let server = SilentServer::start().await?;
    let conf = config(&server.endpoint, None).await;
    let call = Duration::from_secs(25);
    let put = AwsPutRecords::from_conf(&conf);
    let producer = Producer::builder(put.clone(), "s")
        .max_attempts(1)
        .build()?;
    producer.put("key", "data").await?;
    let entry =
        kcl::producer::PutRecordsEntry::new(bytes::Bytes::from_static(b"direct"), "key", None);
    let (flush, direct) = tokio::join!(
        timed("flush", call, call + SLACK, producer.flush()),
        timed(
            "PutRecords",
            call,
            call + SLACK,
            kcl::producer::PutRecords::put_records(&put, "s", std::slice::from_ref(&entry)),
        ),
    );
    transient_kinesis_error("PutRecords", &direct?.0)?;
    match flush?.0 {
        ProducerError::Unsent(u) => ensure!(u.count() == 1, "unsent: {u:?}"),
        other => anyhow::bail!("flush: expected Unsent, got {other:?}"),
    }
    Ok(())
}

/// Timeouts set in the `SdkConfig` are kept: here 300 ms per attempt and 1 s per call, so
/// every call fails after about 1 s instead of the defaults' 15–25 s; and `close` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_timeouts_replace_the_defaults() -> anyhow::Result<()> {
    let server = SilentServer::start().await?;
    let timeouts = TimeoutConfig::builder()
        .operation_attempt_timeout(Duration::from_millis(300))
        .operation_timeout(Duration::from_secs(1))
        .build();
    let conf = config(&server.endpoint, Some(timeouts)).await;
    let at_least = Duration::from_secs(1);
    let limit = Duration::from_secs(4);
    let store = DynamoLeaseStore::from_conf(&conf, "lease-table");
    let kinesis = AwsKinesis::from_conf(&conf);
    let producer = Producer::builder(AwsPutRecords::from_conf(&conf), "s")
        .max_attempts(2)
        .build()?;
    producer.put("key", "data").await?;
    let iterator = ShardIterator::new("AAAAAAAAAAAAAAAA");
    let (list, records, close) = tokio::join!(
        timed("list", at_least, limit, store.list()),
        timed(
            "GetRecords",
            at_least,
            limit,
            kinesis.get_records(&iterator, 100)
        ),
        timed("close", at_least, limit * 2, producer.close()),
    );
    transient_lease_error("list", &list?.0)?;
    transient_kinesis_error("GetRecords", &records?.0)?;
    match close?.0 {
        ProducerError::Unsent(u) => ensure!(u.records().len() == 1, "unsent: {u:?}"),
        other => anyhow::bail!("close: expected Unsent, got {other:?}"),
    }
    Ok(())
}

/// The operation timeout bounds `SubscribeToShard` until its initial response, not the event
/// stream: with a 2 s operation timeout a subscription still delivers events for 6 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_outlives_the_operation_timeout() -> anyhow::Result<()> {
    use futures::StreamExt;
    use kcl_integration_tests::kinesis_server::{create_stream, put_records, start_kinesis_local};

    let server = start_kinesis_local().await?;
    let timeouts = TimeoutConfig::builder()
        .operation_attempt_timeout(Duration::from_secs(2))
        .operation_timeout(Duration::from_secs(2))
        .build();
    let conf = config(&server.endpoint(), Some(timeouts)).await;
    let client = aws_sdk_kinesis::Client::new(&conf);
    let stream = kcl_integration_tests::unique_name("subscribe-timeout");
    create_stream(&client, &stream, 1).await?;
    let kinesis = AwsKinesis::from_conf(&conf);
    let arn = kinesis.register_stream_consumer(&stream, "c").await?;
    let shard = kinesis.list_shards(&stream).await?[0].id.clone();
    let mut events = kinesis
        .subscribe_to_shard(&arn, &shard, &IteratorPosition::TrimHorizon)
        .await?;
    let started = Instant::now();
    let mut received = 0;
    let mut event_count = 0;
    while started.elapsed() < Duration::from_secs(6) {
        put_records(&client, &stream, vec![("k".into(), b"v".to_vec())]).await?;
        match tokio::time::timeout(Duration::from_secs(5), events.next()).await {
            Ok(Some(Ok(event))) => {
                event_count += 1;
                received += event.records.len();
            }
            Ok(Some(Err(e))) => {
                anyhow::bail!(
                    "the subscription failed after {:?}: {e:?}",
                    started.elapsed()
                )
            }
            Ok(None) => anyhow::bail!("the subscription ended after {:?}", started.elapsed()),
            Err(_) => anyhow::bail!("no event for 5 s"),
        }
    }
    eprintln!(
        "{event_count} events, {received} records in {:.1?}",
        started.elapsed()
    );
    ensure!(received > 0, "no record arrived");
    Ok(())
}
