//! [`RequestMetrics`]: an SDK interceptor counting every attempt of every request of the
//! clients the library wraps, by service, operation and outcome ([`super::AWS_REQUESTS`]).

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::FinalizerInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::retries::classifiers::{
    ClassifyRetry as _, RetryAction, RetryReason,
};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use aws_smithy_types::retry::ErrorKind;

/// How an attempt ended, the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Throttled,
    ClientError,
    ServerError,
}

impl Outcome {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Throttled => "throttled",
            Outcome::ClientError => "client_error",
            Outcome::ServerError => "server_error",
        }
    }
}

/// Counts attempts by operation and outcome. Installed by the library on the Kinesis and
/// DynamoDB clients it wraps. The counter is looked up per attempt rather than kept: a kept
/// handle of an operation made rarely (`CreateTable`) would be evicted by an exporter's idle
/// timeout and never seen again (metrics-rs issue 372); the lookup's small allocation is
/// nothing beside the request's own.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RequestMetrics {
    service: &'static str,
}

impl RequestMetrics {
    /// For the clients of `service` (`kinesis`, `dynamodb`).
    pub(crate) fn new(service: &'static str) -> Self {
        Self { service }
    }

    fn count(&self, operation: &str, outcome: Outcome) {
        metrics::counter!(
            super::AWS_REQUESTS,
            "service" => self.service,
            "operation" => operation.to_owned(),
            "outcome" => outcome.name()
        )
        .increment(1);
    }
}

/// What the SDK's own retry classifiers (in their order) make of a failed attempt.
fn classify(
    context: &FinalizerInterceptorContextRef<'_>,
    runtime_components: &RuntimeComponents,
) -> Outcome {
    let ctx = context.inner();
    let mut action = RetryAction::NoActionIndicated;
    for classifier in runtime_components.retry_classifiers() {
        let next = classifier.classify_retry_v2(ctx, &action);
        if next == RetryAction::NoActionIndicated {
            continue;
        }
        action = next;
        if action == RetryAction::RetryForbidden {
            break;
        }
    }
    if let RetryAction::RetryIndicated(RetryReason::RetryableError {
        kind: ErrorKind::ThrottlingError,
        ..
    }) = action
    {
        return Outcome::Throttled;
    }
    match ctx.response().map(|r| r.status().as_u16()) {
        Some(400..=499) => Outcome::ClientError,
        _ => Outcome::ServerError,
    }
}

impl Intercept for RequestMetrics {
    fn name(&self) -> &'static str {
        "kcl::RequestMetrics"
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Some(operation) = cfg.load::<Metadata>().map(|m| m.name()) else {
            return Ok(());
        };
        let outcome = match context.output_or_error() {
            Some(Ok(_)) => Outcome::Success,
            _ => classify(context, runtime_components),
        };
        self.count(operation, outcome);
        Ok(())
    }
}
