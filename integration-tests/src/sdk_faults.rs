//! SDK interceptors that plant faults on the real SDK path: answers lost after the server
//! applied a write, throttled attempts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeDeserializationInterceptorContextMut;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::config_bag::ConfigBag;

fn operation(cfg: &ConfigBag) -> Option<&str> {
    cfg.load::<Metadata>().map(|m| m.name())
}

/// Turns every `every`-th successful `UpdateItem` answer into a 500 after the server applied
/// the write, as a load balancer or a dropped connection would (DynamoDB clients).
///
/// ```
/// let (lose, lost) = kcl_integration_tests::sdk_faults::LoseUpdateAnswers::every(3);
/// let conf = aws_sdk_dynamodb::config::Builder::new().interceptor(lose).build();
/// # let _ = (conf, lost);
/// ```
#[derive(Debug)]
pub struct LoseUpdateAnswers {
    every: u64,
    seen: AtomicU64,
    lost: Arc<AtomicU64>,
    /// Leave alone the writes to tables whose name ends so (e.g. `-workers`).
    spare: Option<&'static str>,
}

/// Set for an `UpdateItem` the interceptor leaves alone (see [`LoseUpdateAnswers::sparing`]).
#[derive(Debug, Clone, Copy)]
struct Spared;

impl aws_smithy_types::config_bag::Storable for Spared {
    type Storer = aws_smithy_types::config_bag::StoreReplace<Self>;
}

impl LoseUpdateAnswers {
    /// Loses every `every`-th answer (the first included); the counter tells how many.
    pub fn every(every: u64) -> (Self, Arc<AtomicU64>) {
        let lost = Arc::new(AtomicU64::new(0));
        let this = Self {
            every,
            seen: AtomicU64::new(0),
            lost: lost.clone(),
            spare: None,
        };
        (this, lost)
    }

    /// Leaves alone the writes to tables whose name ends with `suffix` (`"-workers"`: only the
    /// lease table's writes lose answers, so a lease write is sure to lose some).
    pub fn sparing(mut self, suffix: &'static str) -> Self {
        self.spare = Some(suffix);
        self
    }
}

impl Intercept for LoseUpdateAnswers {
    fn name(&self) -> &'static str {
        "LoseUpdateAnswers"
    }

    fn read_before_execution(
        &self,
        context: &aws_smithy_runtime_api::client::interceptors::context::BeforeSerializationInterceptorContextRef<'_>,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let spared = self.spare.is_some_and(|suffix| {
            context
                .input()
                .downcast_ref::<aws_sdk_dynamodb::operation::update_item::UpdateItemInput>()
                .and_then(|i| i.table_name())
                .is_some_and(|t| t.ends_with(suffix))
        });
        if spared {
            cfg.interceptor_state().store_put(Spared);
        }
        Ok(())
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let is_update = operation(cfg) == Some("UpdateItem") && cfg.load::<Spared>().is_none();
        let response = context.response_mut();
        if !is_update || !response.status().is_success() {
            return Ok(());
        }
        if self.seen.fetch_add(1, Ordering::Relaxed) % self.every != 0 {
            return Ok(());
        }
        self.lost.fetch_add(1, Ordering::Relaxed);
        *response.status_mut() = 500.try_into()?;
        *response.body_mut() = SdkBody::from(
            r#"{"__type":"com.amazonaws.dynamodb.v20120810#InternalServerError","message":"injected: answer lost"}"#,
        );
        Ok(())
    }
}

/// Replaces the answers of the first `count` attempts of an operation (Kinesis clients):
/// [`ReplaceFirst::throttle`] answers with Kinesis' throttling error,
/// [`ReplaceFirst::reject_put_records`] with a `PutRecords` answer that rejects its one record.
///
/// ```
/// use kcl_integration_tests::sdk_faults::ReplaceFirst;
/// let conf = aws_sdk_kinesis::config::Builder::new()
///     .interceptor(ReplaceFirst::throttle("GetRecords", 3))
///     .build();
/// # let _ = conf;
/// ```
#[derive(Debug)]
pub struct ReplaceFirst {
    operation: &'static str,
    left: AtomicU64,
    status: u16,
    body: &'static str,
}

impl ReplaceFirst {
    /// The first `count` attempts of `operation` are throttled
    /// (`ProvisionedThroughputExceededException`, a 400), whatever the server answered.
    pub fn throttle(operation: &'static str, count: u64) -> Self {
        Self {
            operation,
            left: AtomicU64::new(count),
            status: 400,
            body: r#"{"__type":"ProvisionedThroughputExceededException","message":"injected: throttled"}"#,
        }
    }

    /// The first `count` `PutRecords` answers say their one record was throttled (a 200 with
    /// `FailedRecordCount` 1): for producers that put one record per call.
    pub fn reject_put_records(count: u64) -> Self {
        Self {
            operation: "PutRecords",
            left: AtomicU64::new(count),
            status: 200,
            body: r#"{"FailedRecordCount":1,"Records":[{"ErrorCode":"ProvisionedThroughputExceededException","ErrorMessage":"injected: rejected"}]}"#,
        }
    }
}

impl Intercept for ReplaceFirst {
    fn name(&self) -> &'static str {
        "ReplaceFirst"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if operation(cfg) != Some(self.operation) {
            return Ok(());
        }
        let taken = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if taken.is_err() {
            return Ok(());
        }
        let response = context.response_mut();
        *response.status_mut() = self.status.try_into()?;
        *response.body_mut() = SdkBody::from(self.body);
        Ok(())
    }
}
