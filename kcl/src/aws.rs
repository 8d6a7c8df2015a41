//! The AWS backends: Kinesis through `aws-sdk-kinesis`, the lease table in DynamoDB through
//! `aws-sdk-dynamodb`, both from one shared `SdkConfig` (endpoints, region and credentials
//! come from the standard AWS configuration: environment, profiles, IMDS…).
//!
//! **Timeouts.** The SDK sets no operation timeout by default, so a call on a half-open
//! connection would wait forever. Every call kcl makes has one: where the client's
//! configuration leaves the SDK's operation timeout or operation-attempt timeout unset, kcl
//! sets it (see [`Aws`] for the values). A timeout set in the configuration (or explicitly
//! disabled, e.g. with `TimeoutConfigBuilder::disable_operation_timeout`) is kept as it is.
//! An attempt that times out is retried by the SDK's retry policy; a call that times out
//! fails with a retryable (transient) error.

use std::sync::Arc;
use std::time::Duration;

use aws_smithy_types::timeout::TimeoutConfig;

use crate::lease::dynamo::DynamoLeaseStore;
use crate::lease::LeaseStore;
use crate::retrieval::aws::AwsKinesis;
use crate::retrieval::KinesisApi;
use crate::worker::Backends;

/// Kinesis and DynamoDB clients built from one `SdkConfig`.
///
/// Calls get these timeouts unless the configuration sets its own (per attempt / per call,
/// SDK retries included):
///
/// | calls | attempt | call |
/// |---|---|---|
/// | the lease table (every DynamoDB call: taking, renewing, checkpointing, listing) | 5 s | 15 s |
/// | `ListShards`, `GetShardIterator`, `DescribeStreamSummary`, `RegisterStreamConsumer`, `DescribeStreamConsumer` | 5 s | 15 s |
/// | `GetRecords` (up to 10 MB) | 15 s | 25 s |
/// | `SubscribeToShard`, until its initial response (the event stream itself has none: it lives for 5 minutes) | 10 s | 15 s |
/// | `PutRecords` (the producer; up to 5 MiB) | 10 s | 25 s |
///
/// To change them, set a `TimeoutConfig` on the `SdkConfig` (or on the clients given to
/// [`Aws::from_clients`]):
///
/// ```no_run
/// # async fn demo() {
/// use std::time::Duration;
/// use aws_config::timeout::TimeoutConfig;
///
/// let sdk_config = aws_config::defaults(aws_config::BehaviorVersion::latest())
///     .timeout_config(
///         TimeoutConfig::builder()
///             .operation_attempt_timeout(Duration::from_secs(2))
///             .operation_timeout(Duration::from_secs(10))
///             .build(),
///     )
///     .load()
///     .await;
/// let backends = kcl::Aws::from_conf(&sdk_config);
/// # let _ = backends;
/// # }
/// ```
///
/// ```no_run
/// # use kcl::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor};
/// # struct MyProcessor;
/// # #[async_trait]
/// # impl RecordProcessor for MyProcessor {
/// #     async fn process_records(&mut self, _: &RecordBatch, _: &mut Checkpointer)
/// #         -> Result<(), ProcessorError> { Ok(()) }
/// # }
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let sdk_config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
/// let worker = kcl::Worker::builder()
///     .application_name("orders-app")
///     .stream("orders")
///     .backends(kcl::Aws::from_conf(&sdk_config))
///     .processor(|| MyProcessor)
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Aws {
    kinesis: aws_sdk_kinesis::Client,
    dynamodb: aws_sdk_dynamodb::Client,
}

impl Aws {
    /// Clients for both services from one shared configuration.
    pub fn from_conf(conf: &aws_config::SdkConfig) -> Self {
        Self {
            kinesis: aws_sdk_kinesis::Client::new(conf),
            dynamodb: aws_sdk_dynamodb::Client::new(conf),
        }
    }

    /// From clients configured separately (e.g. a different region or endpoint for the table).
    /// Their timeouts are used; those they leave unset get kcl's defaults.
    pub fn from_clients(
        kinesis: aws_sdk_kinesis::Client,
        dynamodb: aws_sdk_dynamodb::Client,
    ) -> Self {
        Self { kinesis, dynamodb }
    }
}

impl Backends for Aws {
    fn kinesis(&self) -> Arc<dyn KinesisApi> {
        Arc::new(AwsKinesis::new(self.kinesis.clone()))
    }

    fn lease_store(&self, table: &str) -> Arc<dyn LeaseStore> {
        Arc::new(DynamoLeaseStore::new(self.dynamodb.clone(), table))
    }

    fn lease_store_with(
        &self,
        table: &str,
        options: &crate::config::LeaseTableOptions,
    ) -> Arc<dyn LeaseStore> {
        Arc::new(DynamoLeaseStore::new(self.dynamodb.clone(), table).table_options(options.clone()))
    }
}

/// The SDK's two operation timeouts for one kind of call: per attempt, and for the whole call
/// (retries and their backoff included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CallTimeouts {
    /// One attempt (`operation_attempt_timeout`).
    pub(crate) attempt: Duration,
    /// The call (`operation_timeout`).
    pub(crate) call: Duration,
}

/// Lease-table calls (every DynamoDB call).
pub(crate) const DYNAMODB_TIMEOUTS: CallTimeouts = CallTimeouts {
    attempt: Duration::from_secs(5),
    call: Duration::from_secs(15),
};

/// Kinesis control-plane calls (`ListShards`, `GetShardIterator`, consumer registration).
pub(crate) const KINESIS_TIMEOUTS: CallTimeouts = CallTimeouts {
    attempt: Duration::from_secs(5),
    call: Duration::from_secs(15),
};

/// `GetRecords`: an answer can hold 10 MB.
pub(crate) const GET_RECORDS_TIMEOUTS: CallTimeouts = CallTimeouts {
    attempt: Duration::from_secs(15),
    call: Duration::from_secs(25),
};

/// `SubscribeToShard` until its initial response (not the event stream).
pub(crate) const SUBSCRIBE_TIMEOUTS: CallTimeouts = CallTimeouts {
    attempt: Duration::from_secs(10),
    call: Duration::from_secs(15),
};

/// The producer's `PutRecords`: a request can hold 5 MiB.
pub(crate) const PUT_RECORDS_TIMEOUTS: CallTimeouts = CallTimeouts {
    attempt: Duration::from_secs(10),
    call: Duration::from_secs(25),
};

/// `configured` (a client's timeout configuration) with `defaults` filling the operation and
/// operation-attempt timeouts it leaves unset; a timeout it sets or explicitly disables is kept.
/// `None` when there is nothing to fill.
pub(crate) fn with_default_timeouts(
    configured: Option<&TimeoutConfig>,
    defaults: CallTimeouts,
) -> Option<TimeoutConfig> {
    let configured = configured
        .cloned()
        .unwrap_or_else(|| TimeoutConfig::builder().build());
    let filled = configured
        .to_builder()
        .take_unset_from(
            TimeoutConfig::builder()
                .operation_attempt_timeout(defaults.attempt)
                .operation_timeout(defaults.call),
        )
        .build();
    (filled != configured).then_some(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: CallTimeouts = CallTimeouts {
        attempt: Duration::from_secs(5),
        call: Duration::from_secs(15),
    };

    #[test]
    fn unset_timeouts_get_the_defaults_and_the_rest_is_kept() {
        // What `aws_config::load_defaults` gives: a connect timeout only.
        let loaded = TimeoutConfig::builder()
            .connect_timeout(Duration::from_millis(3100))
            .build();
        let filled = with_default_timeouts(Some(&loaded), D).expect("filled");
        assert_eq!(filled.operation_attempt_timeout(), Some(D.attempt));
        assert_eq!(filled.operation_timeout(), Some(D.call));
        assert_eq!(filled.connect_timeout(), Some(Duration::from_millis(3100)));
        // No timeout configuration at all.
        let filled = with_default_timeouts(None, D).expect("filled");
        assert_eq!(filled.operation_attempt_timeout(), Some(D.attempt));
        assert_eq!(filled.operation_timeout(), Some(D.call));
        assert_eq!(filled.connect_timeout(), None);
    }

    #[test]
    fn timeouts_set_or_disabled_by_the_user_are_kept() {
        let set = TimeoutConfig::builder()
            .operation_timeout(Duration::from_secs(60))
            .build();
        let filled = with_default_timeouts(Some(&set), D).expect("the attempt is filled");
        assert_eq!(filled.operation_timeout(), Some(Duration::from_secs(60)));
        assert_eq!(filled.operation_attempt_timeout(), Some(D.attempt));

        let disabled = TimeoutConfig::builder()
            .disable_operation_timeout()
            .operation_attempt_timeout(Duration::from_secs(1))
            .build();
        let filled = with_default_timeouts(Some(&disabled), D);
        assert_eq!(filled, None, "both were configured: nothing to fill");

        let all_disabled = TimeoutConfig::disabled();
        assert_eq!(with_default_timeouts(Some(&all_disabled), D), None);
    }
}
