//! A deregistered enhanced fan-out consumer is registered again, on kinesis-local (fan-out over
//! HTTP/1.1 on its plain port): a worker reading a 2-shard stream through its stream consumer
//! delivers a first wave; an operator then deregisters the consumer (`DeregisterStreamConsumer`);
//! a second wave must still be delivered, through the consumer registered again (`ACTIVE`, a new
//! ARN), every record once. Before, a subscriber took `ResourceNotFoundException` for a vanished
//! shard: the worker released the shard's lease and, after its quarantine, subscribed again with
//! the stale ARN, forever.
//!
//! kinesis-local keeps pushing to a subscription opened before its consumer was deregistered;
//! AWS ends every subscription after 5 minutes, and the next `SubscribeToShard` then finds the
//! consumer gone. The worker here reads through [`ShortSubscriptions`], which ends every
//! subscription after a few events (kinesis-local pushes one about every second), so that
//! moment comes within seconds.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context};
use async_trait::async_trait;
use aws_sdk_kinesis::types::ConsumerStatus;
use futures::StreamExt;
use kcl::retrieval::{
    GetRecordsOutput, IteratorPosition, KinesisApi, KinesisApiError, ShardIterator,
    SubscriptionStream,
};
use kcl::shard::Shard;
use kcl::testkit::MemLeaseStore;
use kcl::ShardId;
use kcl_integration_tests::scenarios::{
    self, check_all_delivered, check_no_duplicates_or_overlap, check_per_key_order, DeliveryLog,
    LocalKinesis, StreamFixture,
};
use kcl_integration_tests::unique_name;

const KEYS: u32 = 8;
const WAVE: u32 = 40;
const CONSUMER: &str = "rereg-app-consumer";
/// Events per subscription before [`ShortSubscriptions`] ends it.
const EVENTS_PER_SUBSCRIPTION: usize = 3;

/// A `KinesisApi` whose subscriptions end after [`EVENTS_PER_SUBSCRIPTION`] events, as AWS's
/// end after 5 minutes; everything else passes through.
#[derive(Debug)]
struct ShortSubscriptions(Arc<dyn KinesisApi>);

#[async_trait]
impl KinesisApi for ShortSubscriptions {
    async fn list_shards(&self, stream: &str) -> Result<Vec<Shard>, KinesisApiError> {
        self.0.list_shards(stream).await
    }
    async fn get_shard_iterator(
        &self,
        stream: &str,
        shard: &ShardId,
        position: &IteratorPosition,
    ) -> Result<ShardIterator, KinesisApiError> {
        self.0.get_shard_iterator(stream, shard, position).await
    }
    async fn get_records(
        &self,
        iterator: &ShardIterator,
        limit: u32,
    ) -> Result<GetRecordsOutput, KinesisApiError> {
        self.0.get_records(iterator, limit).await
    }
    fn now(&self) -> SystemTime {
        self.0.now()
    }
    async fn register_stream_consumer(
        &self,
        stream: &str,
        consumer_name: &str,
    ) -> Result<String, KinesisApiError> {
        self.0.register_stream_consumer(stream, consumer_name).await
    }
    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard: &ShardId,
        position: &IteratorPosition,
    ) -> Result<SubscriptionStream, KinesisApiError> {
        let events = self
            .0
            .subscribe_to_shard(consumer_arn, shard, position)
            .await?;
        Ok(Box::pin(events.take(EVENTS_PER_SUBSCRIPTION)))
    }
}

/// The stream consumer's ARN and status, if it is registered.
async fn consumer(
    client: &aws_sdk_kinesis::Client,
    stream_arn: &str,
) -> anyhow::Result<Option<(String, ConsumerStatus)>> {
    let out = client
        .list_stream_consumers()
        .stream_arn(stream_arn)
        .send()
        .await
        .context("ListStreamConsumers")?;
    Ok(out
        .consumers
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.consumer_name == CONSUMER)
        .map(|c| (c.consumer_arn, c.consumer_status)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistered_consumer_is_registered_again() -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let local = LocalKinesis::start().await?;
    let stream = unique_name("rereg");
    local.create_stream(&stream, 2).await?;
    let stream_arn = local
        .client
        .describe_stream_summary()
        .stream_name(&stream)
        .send()
        .await?
        .stream_description_summary
        .map(|s| s.stream_arn)
        .context("no stream ARN")?;

    let log = DeliveryLog::default();
    let leases = Arc::new(MemLeaseStore::new());
    let w = scenarios::worker("rereg-app", &stream, "w1", &local, leases, &log)
        .kinesis(Arc::new(ShortSubscriptions(local.kinesis())))
        .fan_out(CONSUMER)
        .quarantine(Duration::from_secs(1))
        .build()?;
    let stop = w.shutdown_handle();
    let run = tokio::spawn(w.run());
    local
        .put(&stream, scenarios::records(0, WAVE, KEYS))
        .await?;
    log.wait_for(WAVE as usize, Duration::from_secs(60)).await?;
    let (first_arn, _) = consumer(&local.client, &stream_arn)
        .await?
        .context("the worker registered no consumer")?;
    println!("first wave delivered after {:.1?}", started.elapsed());

    local
        .client
        .deregister_stream_consumer()
        .stream_arn(&stream_arn)
        .consumer_name(CONSUMER)
        .send()
        .await
        .context("DeregisterStreamConsumer")?;
    let deregistered = tokio::time::Instant::now();
    // The subscriptions end within seconds; the next ones find the consumer gone.
    let registered_again = scenarios::poll(
        "the consumer registered again",
        Duration::from_secs(40),
        || async {
            Ok(match consumer(&local.client, &stream_arn).await? {
                Some((arn, ConsumerStatus::Active)) if arn != first_arn => Some(arn),
                _ => None,
            })
        },
    )
    .await;
    println!(
        "registered again: {:?} {:.1?} after the deregistration",
        registered_again.as_ref().map_err(|e| e.to_string()),
        deregistered.elapsed()
    );
    local
        .put(&stream, scenarios::records(WAVE, 2 * WAVE, KEYS))
        .await?;
    let outcome = match registered_again {
        Ok(_) => {
            log.wait_for(2 * WAVE as usize, Duration::from_secs(40))
                .await
        }
        Err(e) => Err(e),
    };
    println!(
        "second wave: {} of {} records {:.1?} after the deregistration",
        log.distinct(),
        2 * WAVE,
        deregistered.elapsed()
    );
    stop.shutdown();
    run.await.context("worker task")??;
    outcome?;

    let (arn, status) = consumer(&local.client, &stream_arn)
        .await?
        .context("the consumer was not registered again")?;
    ensure!(
        status == ConsumerStatus::Active,
        "the consumer is {status:?}"
    );
    ensure!(arn != first_arn, "the consumer kept its ARN {arn}");
    let log = log.snapshot();
    check_all_delivered(&log, 2 * WAVE, KEYS)?;
    check_per_key_order(&log)?;
    check_no_duplicates_or_overlap(&log)?;
    println!("total {:.1?}", started.elapsed());
    Ok(())
}
