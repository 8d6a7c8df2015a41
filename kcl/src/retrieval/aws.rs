//! [`AwsKinesis`]: the [`KinesisApi`] seam over `aws-sdk-kinesis`.
//!
//! It maps the SDK's types to the crate's ([`Shard`], [`Record`], [`ChildShard`],
//! [`SequenceNumber`], [`HashKeyRange`]) and classifies the SDK's errors into
//! [`KinesisApiError`] so the retrieval layer can act on them:
//!
//! | Kinesis / SDK error | [`KinesisApiError`] |
//! |---|---|
//! | `ExpiredIteratorException` | [`ExpiredIterator`](KinesisApiError::ExpiredIterator) |
//! | `ProvisionedThroughputExceededException`, `KMSThrottlingException`, `LimitExceededException` | [`Throttled`](KinesisApiError::Throttled) |
//! | `ResourceNotFoundException` | [`NotFound`](KinesisApiError::NotFound) |
//! | timeouts, connection and I/O failures, undecodable responses, HTTP 5xx, `InternalFailureException`, `ResourceInUseException` (stream not active yet), `ExpiredNextTokenException` | [`Transient`](KinesisApiError::Transient) |
//! | a sequence number or hash-key range that does not decode | [`Malformed`](KinesisApiError::Malformed) |
//! | anything else (credentials, access denied, validation, KMS configuration) | [`Other`](KinesisApiError::Other) |
//!
//! The SDK client's own retry policy still applies underneath (by default the standard mode:
//! up to 3 attempts with jittered backoff for throttling and transient errors); the retrieval
//! layer retries on top of that what is still retryable.
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

use std::time::SystemTime;

use async_trait::async_trait;
use aws_sdk_kinesis::config::http::HttpResponse;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::ShardIteratorType;
use bytes::Bytes;

use crate::record::{Record, SequenceNumber};
use crate::retrieval::{
    GetRecordsOutput, IteratorPosition, KinesisApi, KinesisApiError, ShardIterator,
};
use crate::shard::{ChildShard, HashKeyRange, Shard, ShardId};

/// The page size of the first `ListShards` call unless
/// [`AwsKinesis::with_list_shards_page_size`] says otherwise (the service's default).
const DEFAULT_LIST_SHARDS_PAGE_SIZE: u32 = 1000;
/// The most shards one `ListShards` page may hold.
const MAX_LIST_SHARDS_PAGE_SIZE: u32 = 10_000;
/// The most records one `GetRecords` call may return.
const MAX_GET_RECORDS_LIMIT: u32 = 10_000;

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
    list_shards_page_size: u32,
}

impl AwsKinesis {
    /// Wraps an SDK client (its endpoint, region, credentials, retry and timeout settings are
    /// used as they are).
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
        Self {
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
            .client
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

/// Classifies an SDK error; `what` names the resource for `NotFound`.
fn classify<E>(err: SdkError<E, HttpResponse>, what: &str) -> KinesisApiError
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
}
