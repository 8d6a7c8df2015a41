//! [`AwsKinesis`]: the [`KinesisApi`] seam over `aws-sdk-kinesis`.
//!
//! It maps the SDK's types to the crate's ([`Shard`], [`Record`], [`ChildShard`],
//! [`SequenceNumber`], [`HashKeyRange`]) and classifies the SDK's errors into
//! [`KinesisApiError`] so the retrieval layer can act on them:
//!
//! | Kinesis / SDK error | [`KinesisApiError`] |
//! |---|---|
//! | `ExpiredIteratorException` | [`ExpiredIterator`](KinesisApiError::ExpiredIterator) |
//! | `ProvisionedThroughputExceededException`, `KMSThrottlingException`, `LimitExceededException` (also: more than one `SubscribeToShard` per second per consumer and shard) | [`Throttled`](KinesisApiError::Throttled) |
//! | `ResourceNotFoundException` | [`NotFound`](KinesisApiError::NotFound) |
//! | timeouts, connection and I/O failures, undecodable responses, HTTP 5xx, `InternalFailureException`, `ResourceInUseException` (stream not active yet; a `SubscribeToShard` within 5 s of the previous one for the same consumer and shard; a subscription another one took over), `ExpiredNextTokenException` | [`Transient`](KinesisApiError::Transient) |
//! | a sequence number or hash-key range that does not decode | [`Malformed`](KinesisApiError::Malformed) |
//! | anything else (credentials, access denied, validation, KMS configuration) | [`Other`](KinesisApiError::Other) |
//!
//! Errors *inside* a fan-out subscription's event stream use the same table, except that an
//! error code it does not know is [`Transient`](KinesisApiError::Transient): the subscription
//! broke, and subscribing again (whose own errors are classified as above) is the way to tell
//! whether the cause lasts.
//!
//! Enhanced fan-out: [`register_stream_consumer`](KinesisApi::register_stream_consumer)
//! finds the stream consumer with `DescribeStreamConsumer` (by the stream's ARN, from
//! `DescribeStreamSummary`) or registers it (`ResourceInUseException` there means another
//! worker registered it first: it is described again), then polls `DescribeStreamConsumer`
//! every 100 ms until it is `ACTIVE` (for up to 2 minutes). [`subscribe_to_shard`](
//! KinesisApi::subscribe_to_shard) maps the `SubscribeToShard` event stream into
//! [`SubscriptionEvent`]s (records converted as `GetRecords` converts them; an empty or absent
//! `ContinuationSequenceNumber` becomes `None`, the shard's end). The SDK's stalled-stream
//! protection is turned off for that call: a quiet subscription is normal, and the retrieval
//! layer has its own timeout between events.
//!
//! The SDK client's own retry policy still applies underneath (by default the standard mode:
//! up to 3 attempts with jittered backoff for throttling and transient errors); the retrieval
//! layer retries on top of that what is still retryable.
//!
//! Every call has a timeout (see [`crate::Aws`] for the values): where the client's
//! configuration leaves the SDK's operation or operation-attempt timeout unset, each call sets
//! it (`GetRecords` gets longer ones than the control-plane calls); a call that times out is
//! [`Transient`](KinesisApiError::Transient). `SubscribeToShard` is bounded until its initial
//! response (the SDK's operation timeout does not cover the wait for the event stream's first
//! message, so a tokio timeout of the same length does); the event stream itself is not.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kcl::retrieval::aws::AwsKinesis;
//! use kcl::KinesisApi;
//!
//! let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
//! let kinesis = AwsKinesis::from_conf(&conf);
//! for shard in kinesis.list_shards("orders").await? {
//!     println!("{} {:?}", shard.id, shard.hash_range);
//! }
//! # Ok(())
//! # }
//! ```

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_kinesis::config::http::HttpResponse;
use aws_sdk_kinesis::config::timeout::TimeoutConfig;
use aws_sdk_kinesis::config::StalledStreamProtectionConfig;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::error::SubscribeToShardEventStreamError;
use aws_sdk_kinesis::types::{
    ConsumerStatus, ShardIteratorType, StartingPosition, SubscribeToShardEventStream,
};
use aws_smithy_types::event_stream::RawMessage;
use bytes::Bytes;
use tracing::debug;

use crate::aws::{
    with_default_timeouts, CallTimeouts, GET_RECORDS_TIMEOUTS, KINESIS_TIMEOUTS, SUBSCRIBE_TIMEOUTS,
};
use crate::record::{Record, SequenceNumber};
use crate::retrieval::kinesis::{SubscriptionEvent, SubscriptionStream};
use crate::retrieval::{
    GetRecordsOutput, IteratorPosition, KinesisApi, KinesisApiError, ShardIterator, StreamSummary,
};
use crate::shard::{ChildShard, HashKeyRange, Shard, ShardId};

/// The page size of the first `ListShards` call unless
/// [`AwsKinesis::with_list_shards_page_size`] says otherwise (the service's default).
const DEFAULT_LIST_SHARDS_PAGE_SIZE: u32 = 1000;
/// The most shards one `ListShards` page may hold.
const MAX_LIST_SHARDS_PAGE_SIZE: u32 = 10_000;
/// The most records one `GetRecords` call may return.
const MAX_GET_RECORDS_LIMIT: u32 = 10_000;
/// How often `register_stream_consumer` asks whether the consumer is `ACTIVE`.
const CONSUMER_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long `register_stream_consumer` waits for the consumer to be `ACTIVE`.
const CONSUMER_ACTIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// The [`KinesisApi`] over `aws-sdk-kinesis` (AWS, or any endpoint the SDK config points at).
///
/// Cheap to clone: clones share the SDK client and its connection pool.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use kcl::retrieval::aws::AwsKinesis;
/// use kcl::retrieval::IteratorPosition;
/// use kcl::{KinesisApi, ShardId};
///
/// let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
/// let kinesis = AwsKinesis::from_conf(&conf);
/// let shard = ShardId::new("shardId-000000000000");
/// let it = kinesis
///     .get_shard_iterator("orders", &shard, &IteratorPosition::TrimHorizon)
///     .await?;
/// let out = kinesis.get_records(&it, 1000).await?;
/// println!("{} records, {:?} ms behind", out.records.len(), out.millis_behind_latest);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct AwsKinesis {
    client: aws_sdk_kinesis::Client,
    /// The same client with `GetRecords`' timeouts in its configuration: the hot call (once a
    /// second per quiet shard) pays for no per-call configuration override (the SDK assembles
    /// a new configuration layer and runtime components for every overridden call).
    get_records_client: aws_sdk_kinesis::Client,
    list_shards_page_size: u32,
    timeouts: Timeouts,
}

/// The timeouts each kind of call sets over the client's configuration (`None`: the
/// configuration sets them all already).
#[derive(Clone, Debug)]
struct Timeouts {
    control: Option<TimeoutConfig>,
    get_records: Option<TimeoutConfig>,
    subscribe: Option<TimeoutConfig>,
    /// How long `SubscribeToShard` may take until its initial response (`None`: the
    /// configuration disabled the operation timeout).
    subscribe_bound: Option<Duration>,
}

impl Timeouts {
    fn of(client: &aws_sdk_kinesis::Client) -> Self {
        let configured = client.config().timeout_config();
        let fill = |defaults: CallTimeouts| with_default_timeouts(configured, defaults);
        let subscribe = fill(SUBSCRIBE_TIMEOUTS);
        let subscribe_bound = subscribe
            .as_ref()
            .or(configured)
            .and_then(TimeoutConfig::operation_timeout);
        Self {
            control: fill(KINESIS_TIMEOUTS),
            get_records: fill(GET_RECORDS_TIMEOUTS),
            subscribe,
            subscribe_bound,
        }
    }
}

/// A per-call configuration override with `timeouts` (empty for `None`).
pub(crate) fn timeout_override(
    timeouts: &Option<TimeoutConfig>,
) -> aws_sdk_kinesis::config::Builder {
    let mut b = aws_sdk_kinesis::config::Builder::default();
    b.set_timeout_config(timeouts.clone());
    b
}

impl AwsKinesis {
    /// Wraps an SDK client (its endpoint, region, credentials, retry and timeout settings are
    /// used as they are; the operation and operation-attempt timeouts it leaves unset get
    /// kcl's defaults, see [`crate::Aws`]).
    ///
    /// ```no_run
    /// # async fn demo() {
    /// use kcl::retrieval::aws::AwsKinesis;
    ///
    /// let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    /// let client = aws_sdk_kinesis::Client::new(&conf);
    /// let kinesis = AwsKinesis::new(client);
    /// # let _ = kinesis;
    /// # }
    /// ```
    pub fn new(client: aws_sdk_kinesis::Client) -> Self {
        // Every attempt counted by operation and outcome (`kcl_aws_requests_total`).
        let client = aws_sdk_kinesis::Client::from_conf(
            client
                .config()
                .to_builder()
                .interceptor(crate::metrics::requests::RequestMetrics::new("kinesis"))
                .build(),
        );
        let timeouts = Timeouts::of(&client);
        let get_records_client = match &timeouts.get_records {
            Some(t) => aws_sdk_kinesis::Client::from_conf(
                client
                    .config()
                    .to_builder()
                    .timeout_config(t.clone())
                    .build(),
            ),
            None => client.clone(),
        };
        Self {
            timeouts,
            get_records_client,
            client,
            list_shards_page_size: DEFAULT_LIST_SHARDS_PAGE_SIZE,
        }
    }

    /// Builds the SDK client from a shared SDK config.
    ///
    /// ```no_run
    /// # async fn demo() {
    /// use kcl::retrieval::aws::AwsKinesis;
    ///
    /// let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    /// let kinesis = AwsKinesis::from_conf(&conf);
    /// # let _ = kinesis;
    /// # }
    /// ```
    pub fn from_conf(conf: &aws_config::SdkConfig) -> Self {
        Self::new(aws_sdk_kinesis::Client::new(conf))
    }

    /// The `MaxResults` of the first `ListShards` page (default 1000, clamped to 1..=10 000).
    ///
    /// Later pages send only the `NextToken` (the API rejects a stream name together with a
    /// token), so their size is the service's default. Services may also cap pages lower
    /// (kinesis-local returns at most 100 shards per page).
    ///
    /// ```no_run
    /// # async fn demo() {
    /// use kcl::retrieval::aws::AwsKinesis;
    ///
    /// let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    /// let kinesis = AwsKinesis::from_conf(&conf).with_list_shards_page_size(100);
    /// # let _ = kinesis;
    /// # }
    /// ```
    #[must_use]
    pub fn with_list_shards_page_size(mut self, page_size: u32) -> Self {
        self.list_shards_page_size = page_size.clamp(1, MAX_LIST_SHARDS_PAGE_SIZE);
        self
    }
}

#[async_trait]
impl KinesisApi for AwsKinesis {
    async fn list_shards(&self, stream: &str) -> Result<Vec<Shard>, KinesisApiError> {
        let mut shards = Vec::new();
        let mut next_token: Option<String> = None;
        let mut previous_token: Option<String> = None;
        loop {
            let request = self.client.list_shards();
            let request = match next_token.take() {
                // With a token, send nothing else: StreamName + NextToken is rejected.
                Some(token) => request.next_token(token),
                None => request
                    .stream_name(stream)
                    .max_results(to_i32(self.list_shards_page_size)),
            };
            let page = request
                .customize()
                .config_override(timeout_override(&self.timeouts.control))
                .send()
                .await
                .map_err(|e| classify(e, &format!("stream {stream}")))?;
            let token = page.next_token;
            for shard in page.shards.unwrap_or_default() {
                shards.push(convert_shard(shard)?);
            }
            match token {
                Some(token) if !token.is_empty() => {
                    // A service that hands back the token it was given would loop forever.
                    if previous_token.as_deref() == Some(token.as_str()) {
                        return Err(KinesisApiError::Malformed(format!(
                            "ListShards of stream {stream} returned the same NextToken twice"
                        )));
                    }
                    previous_token = Some(token.clone());
                    next_token = Some(token);
                }
                _ => return Ok(shards),
            }
        }
    }

    async fn get_shard_iterator(
        &self,
        stream: &str,
        shard: &ShardId,
        position: &IteratorPosition,
    ) -> Result<ShardIterator, KinesisApiError> {
        let request = self
            .client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard.as_str());
        let request = match position {
            IteratorPosition::TrimHorizon => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            IteratorPosition::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            IteratorPosition::AtTimestamp(t) => request
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(DateTime::from(*t)),
            IteratorPosition::AtSequence(s) => request
                .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                .starting_sequence_number(s.as_str()),
            IteratorPosition::AfterSequence(s) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(s.as_str()),
        };
        let out = request
            .customize()
            .config_override(timeout_override(&self.timeouts.control))
            .send()
            .await
            .map_err(|e| classify(e, &format!("stream {stream} shard {shard}")))?;
        out.shard_iterator.map(ShardIterator::new).ok_or_else(|| {
            KinesisApiError::Malformed(format!(
                "GetShardIterator for stream {stream} shard {shard} returned no iterator"
            ))
        })
    }

    async fn get_records(
        &self,
        iterator: &ShardIterator,
        limit: u32,
    ) -> Result<GetRecordsOutput, KinesisApiError> {
        let out = self
            .get_records_client
            .get_records()
            .shard_iterator(iterator.as_str())
            .limit(to_i32(limit.clamp(1, MAX_GET_RECORDS_LIMIT)))
            .send()
            .await
            .map_err(|e| classify(e, "shard iterator"))?;
        let records = out
            .records
            .into_iter()
            .map(convert_record)
            .collect::<Result<Vec<_>, _>>()?;
        let child_shards = out
            .child_shards
            .unwrap_or_default()
            .into_iter()
            .map(convert_child)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GetRecordsOutput::new(
            records,
            out.next_shard_iterator
                .filter(|it| !it.is_empty())
                .map(ShardIterator::new),
            out.millis_behind_latest
                .map(|ms| u64::try_from(ms).unwrap_or(0)),
            child_shards,
        ))
    }

    async fn describe_stream(&self, stream: &str) -> Result<StreamSummary, KinesisApiError> {
        let what = format!("stream {stream}");
        let summary = self
            .client
            .describe_stream_summary()
            .stream_name(stream)
            .customize()
            .config_override(timeout_override(&self.timeouts.control))
            .send()
            .await
            .map_err(|e| classify(e, &what))?
            .stream_description_summary
            .ok_or_else(|| {
                KinesisApiError::Malformed(format!(
                    "DescribeStreamSummary of stream {stream} returned no description"
                ))
            })?;
        let created = SystemTime::try_from(summary.stream_creation_timestamp).map_err(|e| {
            KinesisApiError::Malformed(format!(
                "DescribeStreamSummary of stream {stream}: creation time {e}"
            ))
        })?;
        Ok(StreamSummary::new(summary.stream_arn, created))
    }

    async fn register_stream_consumer(
        &self,
        stream: &str,
        consumer_name: &str,
    ) -> Result<String, KinesisApiError> {
        let what = format!("stream {stream}");
        let summary = self
            .client
            .describe_stream_summary()
            .stream_name(stream)
            .customize()
            .config_override(timeout_override(&self.timeouts.control))
            .send()
            .await
            .map_err(|e| classify(e, &what))?;
        let stream_arn = summary
            .stream_description_summary
            .map(|s| s.stream_arn)
            .filter(|arn| !arn.is_empty())
            .ok_or_else(|| {
                KinesisApiError::Malformed(format!(
                    "DescribeStreamSummary of stream {stream} returned no stream ARN"
                ))
            })?;
        let deadline = tokio::time::Instant::now() + CONSUMER_ACTIVE_TIMEOUT;
        loop {
            let status = match self.describe_consumer(&stream_arn, consumer_name).await {
                Ok(Some((arn, ConsumerStatus::Active))) => return Ok(arn),
                Ok(Some((_, status))) => status.as_str().to_owned(),
                Ok(None) => match self.register_consumer(&stream_arn, consumer_name).await {
                    Ok(Some((arn, ConsumerStatus::Active))) => return Ok(arn),
                    Ok(Some((_, status))) => status.as_str().to_owned(),
                    // Registered by someone else meanwhile: describe it again.
                    Ok(None) => "registered elsewhere".to_owned(),
                    Err(e) if e.is_retryable() => e.to_string(),
                    Err(e) => return Err(e),
                },
                Err(e) if e.is_retryable() => e.to_string(),
                Err(e) => return Err(e),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(KinesisApiError::Transient(
                    format!(
                        "stream consumer {consumer_name} of stream {stream} is not ACTIVE after \
                         {CONSUMER_ACTIVE_TIMEOUT:?} (last seen: {status})"
                    )
                    .into(),
                ));
            }
            debug!(
                stream,
                consumer_name, status, "waiting for the stream consumer"
            );
            tokio::time::sleep(CONSUMER_POLL_INTERVAL).await;
        }
    }

    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard: &ShardId,
        position: &IteratorPosition,
    ) -> Result<SubscriptionStream, KinesisApiError> {
        let what = format!("consumer {consumer_arn} shard {shard}");
        // A subscription may be quiet for seconds, and the reader may stop reading (its
        // back-pressure): neither is a stalled download. The retrieval layer times out between
        // events itself.
        // The operation timeouts bound the call until the response's headers; the initial
        // response (the event stream's first message) comes after them, so the whole `send`
        // gets a timeout of the same length too. The event stream itself has none.
        let no_stall_protection = timeout_override(&self.timeouts.subscribe)
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled());
        let call = self
            .client
            .subscribe_to_shard()
            .consumer_arn(consumer_arn)
            .shard_id(shard.as_str())
            .starting_position(starting_position(position)?)
            .customize()
            .config_override(no_stall_protection)
            .send();
        let result = match self.timeouts.subscribe_bound {
            Some(bound) => tokio::time::timeout(bound, call).await.map_err(|_| {
                KinesisApiError::Transient(
                    format!("SubscribeToShard for {what} timed out: no initial response within {bound:?}")
                        .into(),
                )
            })?,
            None => call.await,
        };
        let out = result.map_err(|e| classify(e, &what))?;
        let events = futures::stream::unfold(Some((out.event_stream, what)), |state| async move {
            let (mut receiver, what) = state?;
            loop {
                match receiver.recv().await {
                    Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(event))) => {
                        return match convert_event(event) {
                            Ok(event) => Some((Ok(event), Some((receiver, what)))),
                            Err(e) => Some((Err(e), None)),
                        };
                    }
                    Ok(Some(other)) => {
                        debug!(?other, "skipping an unknown SubscribeToShard event");
                    }
                    Ok(None) => return None,
                    Err(e) => return Some((Err(classify_event_error(e, &what)), None)),
                }
            }
        });
        Ok(Box::pin(events))
    }
}

impl AwsKinesis {
    /// `DescribeStreamConsumer` by name: the consumer's ARN and status, or `None` if there is
    /// no such consumer.
    async fn describe_consumer(
        &self,
        stream_arn: &str,
        name: &str,
    ) -> Result<Option<(String, ConsumerStatus)>, KinesisApiError> {
        let result = self
            .client
            .describe_stream_consumer()
            .stream_arn(stream_arn)
            .consumer_name(name)
            .customize()
            .config_override(timeout_override(&self.timeouts.control))
            .send()
            .await;
        match result {
            Ok(out) => {
                let consumer = out.consumer_description.ok_or_else(|| {
                    KinesisApiError::Malformed(format!(
                        "DescribeStreamConsumer of {name} returned no description"
                    ))
                })?;
                Ok(Some((consumer.consumer_arn, consumer.consumer_status)))
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                Ok(None)
            }
            Err(e) => Err(classify(
                e,
                &format!("stream consumer {name} of {stream_arn}"),
            )),
        }
    }

    /// `RegisterStreamConsumer`: the new consumer's ARN and status, or `None` if a consumer of
    /// that name exists already (`ResourceInUseException`).
    async fn register_consumer(
        &self,
        stream_arn: &str,
        name: &str,
    ) -> Result<Option<(String, ConsumerStatus)>, KinesisApiError> {
        let result = self
            .client
            .register_stream_consumer()
            .stream_arn(stream_arn)
            .consumer_name(name)
            .customize()
            .config_override(timeout_override(&self.timeouts.control))
            .send()
            .await;
        match result {
            Ok(out) => {
                let consumer = out.consumer.ok_or_else(|| {
                    KinesisApiError::Malformed(format!(
                        "RegisterStreamConsumer of {name} returned no consumer"
                    ))
                })?;
                Ok(Some((consumer.consumer_arn, consumer.consumer_status)))
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_in_use_exception()) =>
            {
                Ok(None)
            }
            Err(e) => Err(classify(e, &format!("stream {stream_arn}"))),
        }
    }
}

/// The `StartingPosition` of a `SubscribeToShard` call.
fn starting_position(position: &IteratorPosition) -> Result<StartingPosition, KinesisApiError> {
    let builder = StartingPosition::builder();
    let builder = match position {
        IteratorPosition::TrimHorizon => builder.r#type(ShardIteratorType::TrimHorizon),
        IteratorPosition::Latest => builder.r#type(ShardIteratorType::Latest),
        IteratorPosition::AtTimestamp(t) => builder
            .r#type(ShardIteratorType::AtTimestamp)
            .timestamp(DateTime::from(*t)),
        IteratorPosition::AtSequence(s) => builder
            .r#type(ShardIteratorType::AtSequenceNumber)
            .sequence_number(s.as_str()),
        IteratorPosition::AfterSequence(s) => builder
            .r#type(ShardIteratorType::AfterSequenceNumber)
            .sequence_number(s.as_str()),
    };
    builder
        .build()
        .map_err(|e| KinesisApiError::Other(Box::new(e)))
}

/// One `SubscribeToShardEvent`, converted as `GetRecords` output is.
fn convert_event(
    event: aws_sdk_kinesis::types::SubscribeToShardEvent,
) -> Result<SubscriptionEvent, KinesisApiError> {
    let records = event
        .records
        .into_iter()
        .map(convert_record)
        .collect::<Result<Vec<_>, _>>()?;
    let child_shards = event
        .child_shards
        .unwrap_or_default()
        .into_iter()
        .map(convert_child)
        .collect::<Result<Vec<_>, _>>()?;
    // The SDK turns an absent continuation (a closed shard's end) into "".
    let continuation = Some(event.continuation_sequence_number)
        .filter(|c| !c.is_empty())
        .map(|c| {
            SequenceNumber::parse(&c)
                .map_err(|e| KinesisApiError::Malformed(format!("continuation {e}")))
        })
        .transpose()?;
    Ok(SubscriptionEvent::new(
        records,
        continuation,
        Some(u64::try_from(event.millis_behind_latest).unwrap_or(0)),
        child_shards,
    ))
}

fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn convert_shard(shard: aws_sdk_kinesis::types::Shard) -> Result<Shard, KinesisApiError> {
    let id = shard.shard_id;
    let malformed = |what: &str| KinesisApiError::Malformed(format!("shard {id}: {what}"));
    let range = shard
        .hash_key_range
        .ok_or_else(|| malformed("no hash key range"))?;
    let hash_range = HashKeyRange::parse(&range.starting_hash_key, &range.ending_hash_key)
        .map_err(|e| malformed(&e.to_string()))?;
    let seqs = shard
        .sequence_number_range
        .ok_or_else(|| malformed("no sequence number range"))?;
    let starting = SequenceNumber::parse(&seqs.starting_sequence_number)
        .map_err(|e| malformed(&format!("starting {e}")))?;
    let ending = seqs
        .ending_sequence_number
        .as_deref()
        .map(SequenceNumber::parse)
        .transpose()
        .map_err(|e| malformed(&format!("ending {e}")))?;
    let parents = [shard.parent_shard_id, shard.adjacent_parent_shard_id]
        .into_iter()
        .flatten()
        .filter(|p| !p.is_empty())
        .map(ShardId::new)
        .collect();
    Ok(Shard::new(
        ShardId::new(id),
        parents,
        hash_range,
        starting,
        ending,
    ))
}

fn convert_record(record: aws_sdk_kinesis::types::Record) -> Result<Record, KinesisApiError> {
    let sequence = SequenceNumber::parse(&record.sequence_number)
        .map_err(|e| KinesisApiError::Malformed(format!("record {e}")))?;
    // A time outside SystemTime's range is dropped rather than failing the whole batch.
    let arrival = record
        .approximate_arrival_timestamp
        .and_then(|t| SystemTime::try_from(t).ok());
    Ok(Record::new(
        Bytes::from(record.data.into_inner()),
        // Always set by Kinesis; the SDK models it as optional.
        record.partition_key.unwrap_or_default(),
        sequence,
        arrival,
    ))
}

fn convert_child(child: aws_sdk_kinesis::types::ChildShard) -> Result<ChildShard, KinesisApiError> {
    let id = child.shard_id;
    let malformed = |what: &str| KinesisApiError::Malformed(format!("child shard {id}: {what}"));
    let range = child
        .hash_key_range
        .ok_or_else(|| malformed("no hash key range"))?;
    let hash_range = HashKeyRange::parse(&range.starting_hash_key, &range.ending_hash_key)
        .map_err(|e| malformed(&e.to_string()))?;
    let parents = child.parent_shards.into_iter().map(ShardId::new).collect();
    Ok(ChildShard::new(ShardId::new(id), parents, hash_range))
}

/// Classifies an SDK error; `what` names the resource for `NotFound`. The producer's
/// `PutRecords` errors go through it too.
pub(crate) fn classify<E>(err: SdkError<E, HttpResponse>, what: &str) -> KinesisApiError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (service, server_error) = match err {
        SdkError::ServiceError(ctx) => {
            let server_error = ctx.raw().status().is_server_error();
            (ctx.into_err(), server_error)
        }
        err @ (SdkError::TimeoutError(_)
        | SdkError::DispatchFailure(_)
        | SdkError::ResponseError(_)) => return KinesisApiError::Transient(Box::new(err)),
        // A request that could not be built (e.g. a missing required field): not retryable.
        err => return KinesisApiError::Other(Box::new(err)),
    };
    classify_service(service, server_error, what)
}

/// Classifies an error inside a subscription's event stream: as [`classify`], but by the
/// modeled exception (an event-stream error carries its type in a header, and the SDK leaves
/// the error code empty), and an error it does not know is transient (the subscription broke;
/// subscribing again tells whether the cause lasts).
fn classify_event_error(
    err: SdkError<SubscribeToShardEventStreamError, RawMessage>,
    what: &str,
) -> KinesisApiError {
    use SubscribeToShardEventStreamError as E;
    let service = match err {
        SdkError::ServiceError(ctx) => ctx.into_err(),
        err @ (SdkError::TimeoutError(_)
        | SdkError::DispatchFailure(_)
        | SdkError::ResponseError(_)) => return KinesisApiError::Transient(Box::new(err)),
        err => return KinesisApiError::Other(Box::new(err)),
    };
    match service {
        // The SDK puts an event-stream error's message into the exception, not its metadata.
        E::ResourceNotFoundException(ref e) => {
            KinesisApiError::NotFound(match e.message().or(service.message()) {
                Some(message) => format!("{what}: {message}"),
                None => what.to_owned(),
            })
        }
        E::KmsThrottlingException(_) => KinesisApiError::Throttled(Box::new(service)),
        E::KmsDisabledException(_)
        | E::KmsInvalidStateException(_)
        | E::KmsAccessDeniedException(_)
        | E::KmsNotFoundException(_)
        | E::KmsOptInRequired(_) => KinesisApiError::Other(Box::new(service)),
        // Another subscription took over, or the service failed.
        E::ResourceInUseException(_) | E::InternalFailureException(_) => {
            KinesisApiError::Transient(Box::new(service))
        }
        other => classify_service(other, true, what),
    }
}

/// Classifies a service error by its code; `server_error` makes unknown codes transient.
fn classify_service<E>(service: E, server_error: bool, what: &str) -> KinesisApiError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match service.code() {
        Some("ExpiredIteratorException") => KinesisApiError::ExpiredIterator,
        Some(
            "ProvisionedThroughputExceededException"
            | "KMSThrottlingException"
            | "LimitExceededException"
            | "ThrottlingException",
        ) => KinesisApiError::Throttled(Box::new(service)),
        Some("ResourceNotFoundException") => KinesisApiError::NotFound(match service.message() {
            Some(message) => format!("{what}: {message}"),
            None => what.to_owned(),
        }),
        // The stream is still being created or resharded, a ListShards token expired
        // (listing again starts over), or the service failed: all may succeed when retried.
        Some(
            "InternalFailureException"
            | "InternalFailure"
            | "ServiceUnavailable"
            | "ResourceInUseException"
            | "ExpiredNextTokenException",
        ) => KinesisApiError::Transient(Box::new(service)),
        // Access and KMS key configuration problems last until someone fixes them.
        Some(code)
            if code == "AccessDeniedException"
                || (code.starts_with("KMS") && code != "KMSThrottlingException") =>
        {
            KinesisApiError::Other(Box::new(service))
        }
        _ if server_error => KinesisApiError::Transient(Box::new(service)),
        _ => KinesisApiError::Other(Box::new(service)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_kinesis::operation::get_records::GetRecordsError;
    use aws_sdk_kinesis::types::error::{
        ExpiredIteratorException, ProvisionedThroughputExceededException, ResourceNotFoundException,
    };
    use aws_smithy_types::body::SdkBody;

    fn response(status: u16) -> HttpResponse {
        HttpResponse::new(status.try_into().expect("valid status"), SdkBody::empty())
    }

    /// What the SDK's deserializer attaches to every modeled error.
    fn meta(code: &str, message: &str) -> aws_sdk_kinesis::error::ErrorMetadata {
        aws_sdk_kinesis::error::ErrorMetadata::builder()
            .code(code)
            .message(message)
            .build()
    }

    fn service(err: GetRecordsError, status: u16) -> SdkError<GetRecordsError, HttpResponse> {
        SdkError::service_error(err, response(status))
    }

    #[test]
    fn classifies_service_errors() {
        let expired = GetRecordsError::ExpiredIteratorException(
            ExpiredIteratorException::builder()
                .meta(meta("ExpiredIteratorException", "old"))
                .build(),
        );
        assert!(matches!(
            classify(service(expired, 400), "it"),
            KinesisApiError::ExpiredIterator
        ));

        let throttled = GetRecordsError::ProvisionedThroughputExceededException(
            ProvisionedThroughputExceededException::builder()
                .meta(meta("ProvisionedThroughputExceededException", "slow down"))
                .build(),
        );
        assert!(matches!(
            classify(service(throttled, 400), "it"),
            KinesisApiError::Throttled(_)
        ));

        let missing = GetRecordsError::ResourceNotFoundException(
            ResourceNotFoundException::builder()
                .meta(meta("ResourceNotFoundException", "no shard"))
                .build(),
        );
        match classify(service(missing, 400), "stream s shard x") {
            KinesisApiError::NotFound(m) => assert_eq!(m, "stream s shard x: no shard"),
            other => panic!("unexpected {other:?}"),
        }

        let unhandled = || {
            GetRecordsError::generic(
                aws_sdk_kinesis::error::ErrorMetadata::builder()
                    .code("SomethingNew")
                    .build(),
            )
        };
        assert!(matches!(
            classify(service(unhandled(), 500), "it"),
            KinesisApiError::Transient(_)
        ));
        assert!(matches!(
            classify(service(unhandled(), 400), "it"),
            KinesisApiError::Other(_)
        ));
    }

    #[test]
    fn classifies_transport_errors() {
        let timeout: SdkError<GetRecordsError, HttpResponse> =
            SdkError::timeout_error("took too long");
        assert!(matches!(
            classify(timeout, "it"),
            KinesisApiError::Transient(_)
        ));
        let construction: SdkError<GetRecordsError, HttpResponse> =
            SdkError::construction_failure("bad input");
        assert!(matches!(
            classify(construction, "it"),
            KinesisApiError::Other(_)
        ));
    }

    #[test]
    fn malformed_shards_are_errors_naming_the_shard() {
        use aws_sdk_kinesis::types::{HashKeyRange as Hkr, SequenceNumberRange};
        let shard = |start: &str, seq: &str| {
            aws_sdk_kinesis::types::Shard::builder()
                .shard_id("shardId-000000000007")
                .hash_key_range(
                    Hkr::builder()
                        .starting_hash_key(start)
                        .ending_hash_key("100")
                        .build()
                        .expect("complete"),
                )
                .sequence_number_range(
                    SequenceNumberRange::builder()
                        .starting_sequence_number(seq)
                        .build()
                        .expect("complete"),
                )
                .build()
                .expect("complete")
        };
        let ok = convert_shard(shard(
            "0",
            "49590338271490256608559692538361571095921575989136588898",
        ))
        .expect("valid");
        assert_eq!(ok.hash_range, HashKeyRange::new(0, 100).expect("range"));
        assert!(!ok.is_closed());
        for bad in [shard("x", "1"), shard("101", "1"), shard("0", "12a")] {
            match convert_shard(bad) {
                Err(KinesisApiError::Malformed(m)) => {
                    assert!(m.contains("shardId-000000000007"), "{m}")
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn records_convert_and_reject_bad_sequence_numbers() {
        let record = |seq: &str| {
            aws_sdk_kinesis::types::Record::builder()
                .sequence_number(seq)
                .data(aws_sdk_kinesis::primitives::Blob::new(b"hello".to_vec()))
                .partition_key("k")
                .approximate_arrival_timestamp(DateTime::from_millis(1_700_000_000_000))
                .build()
                .expect("complete")
        };
        let r = convert_record(record("00042")).expect("valid");
        assert_eq!(&r.data[..], b"hello");
        assert_eq!(r.partition_key, "k");
        assert_eq!(r.sequence_number.as_str(), "42");
        assert_eq!(
            r.approximate_arrival,
            Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_000))
        );
        assert!(matches!(
            convert_record(record("4x2")),
            Err(KinesisApiError::Malformed(_))
        ));
    }

    #[test]
    fn starting_positions_map_to_the_subscribe_to_shard_types() {
        let seq = SequenceNumber::parse("42").expect("valid");
        let at = starting_position(&IteratorPosition::AtSequence(seq.clone())).expect("valid");
        assert_eq!(at.r#type(), &ShardIteratorType::AtSequenceNumber);
        assert_eq!(at.sequence_number(), Some("42"));
        let after = starting_position(&IteratorPosition::AfterSequence(seq)).expect("valid");
        assert_eq!(after.r#type(), &ShardIteratorType::AfterSequenceNumber);
        assert_eq!(after.sequence_number(), Some("42"));
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let ts = starting_position(&IteratorPosition::AtTimestamp(t)).expect("valid");
        assert_eq!(ts.r#type(), &ShardIteratorType::AtTimestamp);
        assert_eq!(ts.timestamp(), Some(&DateTime::from(t)));
        let trim = starting_position(&IteratorPosition::TrimHorizon).expect("valid");
        assert_eq!(trim.r#type(), &ShardIteratorType::TrimHorizon);
        assert_eq!(trim.sequence_number(), None);
        let latest = starting_position(&IteratorPosition::Latest).expect("valid");
        assert_eq!(latest.r#type(), &ShardIteratorType::Latest);
    }

    #[test]
    fn subscription_events_convert_and_an_empty_continuation_is_the_shard_end() {
        use aws_sdk_kinesis::types::{ChildShard as SdkChild, HashKeyRange as Hkr};
        let record = aws_sdk_kinesis::types::Record::builder()
            .sequence_number("7")
            .data(aws_sdk_kinesis::primitives::Blob::new(b"x".to_vec()))
            .partition_key("k")
            .build()
            .expect("complete");
        let event = aws_sdk_kinesis::types::SubscribeToShardEvent::builder()
            .records(record)
            .continuation_sequence_number("7")
            .millis_behind_latest(12)
            .build()
            .expect("complete");
        let converted = convert_event(event).expect("valid");
        assert_eq!(converted.records.len(), 1);
        assert_eq!(converted.records[0].sequence_number.as_str(), "7");
        assert_eq!(
            converted
                .continuation_sequence_number
                .as_ref()
                .map(|c| c.as_str()),
            Some("7")
        );
        assert_eq!(converted.millis_behind_latest, Some(12));
        assert!(converted.child_shards.is_empty());

        let child = SdkChild::builder()
            .shard_id("shardId-000000000002")
            .parent_shards("shardId-000000000000")
            .hash_key_range(
                Hkr::builder()
                    .starting_hash_key("0")
                    .ending_hash_key("99")
                    .build()
                    .expect("complete"),
            )
            .build()
            .expect("complete");
        let last = aws_sdk_kinesis::types::SubscribeToShardEvent::builder()
            .set_records(Some(Vec::new()))
            .continuation_sequence_number("")
            .millis_behind_latest(0)
            .child_shards(child)
            .build()
            .expect("complete");
        let converted = convert_event(last).expect("valid");
        assert_eq!(converted.continuation_sequence_number, None);
        assert_eq!(converted.child_shards.len(), 1);
        assert_eq!(
            converted.child_shards[0].id.as_str(),
            "shardId-000000000002"
        );
        assert_eq!(
            converted.child_shards[0].parents,
            [ShardId::new("shardId-000000000000")]
        );

        let bad = aws_sdk_kinesis::types::SubscribeToShardEvent::builder()
            .set_records(Some(Vec::new()))
            .continuation_sequence_number("12x")
            .millis_behind_latest(0)
            .build()
            .expect("complete");
        assert!(matches!(
            convert_event(bad),
            Err(KinesisApiError::Malformed(_))
        ));
    }

    #[test]
    fn classifies_subscription_errors() {
        use aws_sdk_kinesis::operation::subscribe_to_shard::SubscribeToShardError;
        use aws_sdk_kinesis::types::error::{
            KmsDisabledException, ResourceInUseException, SubscribeToShardEventStreamError,
        };
        // SubscribeToShard within 5 s of the previous one: retried after a backoff.
        let too_soon = SubscribeToShardError::ResourceInUseException(
            ResourceInUseException::builder()
                .meta(meta("ResourceInUseException", "too soon"))
                .build(),
        );
        let too_soon: SdkError<_, HttpResponse> = SdkError::service_error(too_soon, response(400));
        assert!(matches!(
            classify(too_soon, "c"),
            KinesisApiError::Transient(_)
        ));

        let in_stream = |err: SubscribeToShardEventStreamError| {
            classify_event_error(SdkError::service_error(err, RawMessage::invalid(None)), "c")
        };
        // Another subscription took over.
        let taken_over = SubscribeToShardEventStreamError::ResourceInUseException(
            ResourceInUseException::builder()
                .meta(meta("ResourceInUseException", "taken over"))
                .build(),
        );
        assert!(matches!(
            in_stream(taken_over),
            KinesisApiError::Transient(_)
        ));
        // As the SDK parses them from an event stream: no error code, only the type.
        let codeless = SubscribeToShardEventStreamError::ResourceInUseException(
            ResourceInUseException::builder()
                .message("Another active subscription exists")
                .build(),
        );
        assert!(matches!(in_stream(codeless), KinesisApiError::Transient(_)));
        let gone = SubscribeToShardEventStreamError::ResourceNotFoundException(
            ResourceNotFoundException::builder()
                .message("no shard")
                .build(),
        );
        match in_stream(gone) {
            KinesisApiError::NotFound(m) => assert_eq!(m, "c: no shard"),
            other => panic!("unexpected {other:?}"),
        }
        let unknown = SubscribeToShardEventStreamError::generic(meta("SomethingNew", "?"));
        assert!(matches!(in_stream(unknown), KinesisApiError::Transient(_)));
        let kms = SubscribeToShardEventStreamError::KmsDisabledException(
            KmsDisabledException::builder()
                .meta(meta("KMSDisabledException", "key disabled"))
                .build(),
        );
        assert!(matches!(in_stream(kms), KinesisApiError::Other(_)));
        let dropped: SdkError<SubscribeToShardEventStreamError, RawMessage> =
            SdkError::timeout_error("connection dropped");
        assert!(matches!(
            classify_event_error(dropped, "c"),
            KinesisApiError::Transient(_)
        ));
    }
}
