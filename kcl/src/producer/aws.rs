//! [`AwsPutRecords`]: the [`PutRecords`] seam over `aws-sdk-kinesis`.
//!
//! Errors of the whole call are classified like [`crate::retrieval::aws::AwsKinesis`]'s:
//! throttling (`ProvisionedThroughputExceededException`, `KMSThrottlingException`,
//! `LimitExceededException`) → [`KinesisApiError::Throttled`]; timeouts, connection failures,
//! HTTP 5xx, `InternalFailure` and `ResourceInUseException` (the stream is being created or
//! resharded) → [`KinesisApiError::Transient`]; `ResourceNotFoundException` →
//! [`KinesisApiError::NotFound`]; anything else (validation, credentials, KMS configuration) →
//! [`KinesisApiError::Other`], which ends a flush. The SDK client's own retry policy applies
//! underneath.
//!
//! Every `PutRecords` call has a timeout, so that `flush` and `close` cannot hang on a
//! half-open connection: where the client's configuration leaves the SDK's operation or
//! operation-attempt timeout unset, the call sets it (10 s per attempt, 25 s per call, see
//! [`crate::Aws`]). A call that times out is [`KinesisApiError::Transient`]: the producer
//! sends it again, up to [`max_attempts`](super::ProducerBuilder::max_attempts).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kcl::producer::aws::AwsPutRecords;
//! use kcl::producer::Producer;
//!
//! let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
//! let producer = Producer::builder(AwsPutRecords::from_conf(&conf), "orders")
//!     .aggregation(true)
//!     .build()?;
//! producer.put("customer-1", "hello").await?;
//! producer.close().await?;
//! # Ok(())
//! # }
//! ```

use async_trait::async_trait;
use aws_sdk_kinesis::config::http::HttpResponse;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;

use aws_sdk_kinesis::config::timeout::TimeoutConfig;

use super::{PutRecords, PutRecordsEntry, PutRecordsResult};
use crate::aws::{with_default_timeouts, PUT_RECORDS_TIMEOUTS};
use crate::record::SequenceNumber;
use crate::retrieval::aws::timeout_override;
use crate::retrieval::KinesisApiError;
use crate::shard::ShardId;

/// `PutRecords` over `aws-sdk-kinesis` (AWS, or any endpoint the SDK config points at).
///
/// Cheap to clone: clones share the SDK client and its connection pool.
#[derive(Clone, Debug)]
pub struct AwsPutRecords {
    client: aws_sdk_kinesis::Client,
    /// The timeouts each call sets over the client's (`None`: it sets them all already).
    timeouts: Option<TimeoutConfig>,
}

impl AwsPutRecords {
    /// Wraps an SDK client (its endpoint, region, credentials, retry and timeout settings are
    /// used as they are; the operation and operation-attempt timeouts it leaves unset get
    /// kcl's defaults, see [`crate::Aws`]).
    pub fn new(client: aws_sdk_kinesis::Client) -> Self {
        let timeouts =
            with_default_timeouts(client.config().timeout_config(), PUT_RECORDS_TIMEOUTS);
        Self { client, timeouts }
    }

    /// Builds the SDK client from a shared SDK config.
    pub fn from_conf(conf: &aws_config::SdkConfig) -> Self {
        Self::new(aws_sdk_kinesis::Client::new(conf))
    }
}

#[async_trait]
impl PutRecords for AwsPutRecords {
    async fn put_records(
        &self,
        stream: &str,
        entries: &[PutRecordsEntry],
    ) -> Result<Vec<PutRecordsResult>, KinesisApiError> {
        let request = entries
            .iter()
            .map(|e| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(e.data.to_vec()))
                    .partition_key(e.partition_key.clone())
                    .set_explicit_hash_key(e.explicit_hash_key.map(|h| h.to_string()))
                    .build()
                    .map_err(|err| KinesisApiError::Other(Box::new(err)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = self
            .client
            .put_records()
            .stream_name(stream)
            .set_records(Some(request))
            .customize()
            .config_override(timeout_override(&self.timeouts))
            .send()
            .await
            .map_err(|e| classify(e, stream))?;
        if out.records.len() != entries.len() {
            return Err(KinesisApiError::Malformed(format!(
                "PutRecords to {stream} answered {} results for {} records",
                out.records.len(),
                entries.len()
            )));
        }
        out.records.into_iter().map(convert_result).collect()
    }
}

fn convert_result(
    r: aws_sdk_kinesis::types::PutRecordsResultEntry,
) -> Result<PutRecordsResult, KinesisApiError> {
    match (r.shard_id, r.sequence_number, r.error_code) {
        (Some(shard), Some(seq), None) => Ok(PutRecordsResult::Accepted {
            shard_id: ShardId::new(shard),
            sequence_number: SequenceNumber::parse(&seq)
                .map_err(|e| KinesisApiError::Malformed(format!("PutRecords result {e}")))?,
        }),
        (_, _, code) => Ok(PutRecordsResult::Rejected {
            error_code: code.unwrap_or_else(|| "Unknown".to_owned()),
            message: r.error_message.unwrap_or_default(),
        }),
    }
}

/// Classifies an SDK error of `PutRecords` to `stream` (as every Kinesis call's error is).
fn classify<E>(err: SdkError<E, HttpResponse>, stream: &str) -> KinesisApiError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    crate::retrieval::aws::classify(err, &format!("stream {stream}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_kinesis::operation::put_records::PutRecordsError;
    use aws_sdk_kinesis::types::error::{
        ProvisionedThroughputExceededException, ResourceNotFoundException,
    };
    use aws_sdk_kinesis::types::PutRecordsResultEntry;
    use aws_smithy_types::body::SdkBody;

    fn service(err: PutRecordsError, status: u16) -> SdkError<PutRecordsError, HttpResponse> {
        let response =
            HttpResponse::new(status.try_into().expect("valid status"), SdkBody::empty());
        SdkError::service_error(err, response)
    }

    fn meta(code: &str) -> aws_sdk_kinesis::error::ErrorMetadata {
        aws_sdk_kinesis::error::ErrorMetadata::builder()
            .code(code)
            .message("m")
            .build()
    }

    #[test]
    fn classifies_errors() {
        let throttled = PutRecordsError::ProvisionedThroughputExceededException(
            ProvisionedThroughputExceededException::builder()
                .meta(meta("ProvisionedThroughputExceededException"))
                .build(),
        );
        assert!(matches!(
            classify(service(throttled, 400), "s"),
            KinesisApiError::Throttled(_)
        ));
        let missing = PutRecordsError::ResourceNotFoundException(
            ResourceNotFoundException::builder()
                .meta(meta("ResourceNotFoundException"))
                .build(),
        );
        match classify(service(missing, 400), "s") {
            KinesisApiError::NotFound(m) => assert_eq!(m, "stream s: m"),
            other => panic!("unexpected {other:?}"),
        }
        let other = || PutRecordsError::generic(meta("ValidationException"));
        assert!(matches!(
            classify(service(other(), 400), "s"),
            KinesisApiError::Other(_)
        ));
        assert!(matches!(
            classify(service(other(), 503), "s"),
            KinesisApiError::Transient(_)
        ));
        let timeout: SdkError<PutRecordsError, HttpResponse> = SdkError::timeout_error("slow");
        assert!(matches!(
            classify(timeout, "s"),
            KinesisApiError::Transient(_)
        ));
    }

    #[test]
    fn converts_results() {
        let ok = PutRecordsResultEntry::builder()
            .shard_id("shardId-000000000001")
            .sequence_number("00042")
            .build();
        assert_eq!(
            convert_result(ok).expect("valid"),
            PutRecordsResult::Accepted {
                shard_id: ShardId::new("shardId-000000000001"),
                sequence_number: SequenceNumber::from_u128(42),
            }
        );
        let rejected = PutRecordsResultEntry::builder()
            .error_code("ProvisionedThroughputExceededException")
            .error_message("slow down")
            .build();
        assert_eq!(
            convert_result(rejected).expect("valid"),
            PutRecordsResult::Rejected {
                error_code: "ProvisionedThroughputExceededException".into(),
                message: "slow down".into(),
            }
        );
        let bad = PutRecordsResultEntry::builder()
            .shard_id("s")
            .sequence_number("x1")
            .build();
        assert!(matches!(
            convert_result(bad),
            Err(KinesisApiError::Malformed(_))
        ));
    }
}
