//! The AWS backends: Kinesis through `aws-sdk-kinesis`, the lease table in DynamoDB through
//! `aws-sdk-dynamodb`, both from one shared `SdkConfig` (endpoints, region and credentials
//! come from the standard AWS configuration: environment, profiles, IMDS…).

use std::sync::Arc;

use crate::lease::dynamo::DynamoLeaseStore;
use crate::lease::LeaseStore;
use crate::retrieval::aws::AwsKinesis;
use crate::retrieval::KinesisApi;
use crate::worker::Backends;

/// Kinesis and DynamoDB clients built from one `SdkConfig`.
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
}
