//! Processor failures through the worker on the in-memory backends: a retryable error, a
//! fatal error or a panic on a batch, then a graceful shutdown, a handoff to a joining worker,
//! the `StopShard` policy, or the dead-letter (`Handoff`) policy. The next owner must receive
//! every record of the failed batch (see `kcl_integration_tests::failures`).

use std::sync::Arc;

use kcl::testkit::{MemKinesis, MemLeaseStore};
use kcl_integration_tests::failures::{processor_failure_timed, Failure, Then};
use kcl_integration_tests::scenarios::MemStream;

macro_rules! failure_tests {
    ($($name:ident: $failure:ident then $then:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> anyhow::Result<()> {
            processor_failure_timed(
                &MemStream(MemKinesis::new()),
                Arc::new(MemLeaseStore::new()),
                Failure::$failure,
                Then::$then,
            )
            .await
        }
    )*};
}

failure_tests! {
    retryable_error_then_shutdown: Retryable then Shutdown;
    retryable_error_then_handoff_to_joining_worker: Retryable then Steal;
    retryable_error_with_stop_shard_policy: Retryable then StopShardPolicy;
    retryable_error_with_dead_letter_policy: Retryable then DeadLetter;
    fatal_error_then_shutdown: Fatal then Shutdown;
    fatal_error_then_worker_joins: Fatal then Steal;
    fatal_error_with_stop_shard_policy: Fatal then StopShardPolicy;
    fatal_error_with_dead_letter_policy: Fatal then DeadLetter;
    panic_then_shutdown: Panic then Shutdown;
    panic_then_worker_joins: Panic then Steal;
    panic_with_stop_shard_policy: Panic then StopShardPolicy;
    panic_with_dead_letter_policy: Panic then DeadLetter;
}
