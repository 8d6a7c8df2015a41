//! Processor failures through the worker on kinesis-local, the lease table on moto or
//! dynalite, all through the real AWS SDK clients: a retryable error, a fatal error or a panic
//! on a batch, then a graceful shutdown, a handoff to a joining worker, the `StopShard` policy,
//! or the dead-letter (`Handoff`) policy. The next owner must receive every record of the
//! failed batch (see `kcl_integration_tests::failures`).

use kcl_integration_tests::dynamo_servers::{lease_table, Table};
use kcl_integration_tests::failures::{processor_failure_timed, Failure, Then};
use kcl_integration_tests::scenarios::LocalKinesis;

macro_rules! failure_tests {
    ($($name:ident: $failure:ident then $then:ident on $table:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> anyhow::Result<()> {
            let kinesis = LocalKinesis::start().await?;
            let (_table_server, leases) = lease_table(Table::$table).await?;
            processor_failure_timed(&kinesis, leases, Failure::$failure, Then::$then).await
        }
    )*};
}

failure_tests! {
    retryable_error_then_shutdown_dynalite: Retryable then Shutdown on Dynalite;
    retryable_error_then_handoff_to_joining_worker_moto: Retryable then Steal on Moto;
    retryable_error_with_stop_shard_policy_dynalite: Retryable then StopShardPolicy on Dynalite;
    retryable_error_with_dead_letter_policy_moto: Retryable then DeadLetter on Moto;
    fatal_error_then_shutdown_moto: Fatal then Shutdown on Moto;
    fatal_error_then_worker_joins_dynalite: Fatal then Steal on Dynalite;
    fatal_error_with_stop_shard_policy_moto: Fatal then StopShardPolicy on Moto;
    fatal_error_with_dead_letter_policy_dynalite: Fatal then DeadLetter on Dynalite;
    panic_then_shutdown_dynalite: Panic then Shutdown on Dynalite;
    panic_then_worker_joins_moto: Panic then Steal on Moto;
    panic_with_stop_shard_policy_dynalite: Panic then StopShardPolicy on Dynalite;
    panic_with_dead_letter_policy_moto: Panic then DeadLetter on Moto;
}
