//! The worker scenarios against real local servers through the real AWS SDK clients:
//! kinesis-local for the stream, and the lease table on moto and on dynalite.

use kcl_integration_tests::dynamo_servers::{lease_table, Table};
use kcl_integration_tests::scenarios::{self, LocalKinesis};

macro_rules! scenario_tests {
    ($($name:ident: $scenario:ident on $table:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> anyhow::Result<()> {
            let started = std::time::Instant::now();
            let kinesis = LocalKinesis::start().await?;
            let (_table_server, leases) = lease_table($table).await?;
            let result = scenarios::$scenario(&kinesis, leases).await;
            println!("{} took {:.1?}", stringify!($name), started.elapsed());
            result
        }
    )*};
}

scenario_tests! {
    drain_and_resume_moto: drain_and_resume on Table::Moto;
    drain_and_resume_dynalite: drain_and_resume on Table::Dynalite;
    split_and_merge_moto: split_and_merge on Table::Moto;
    split_and_merge_dynalite: split_and_merge on Table::Dynalite;
    two_workers_graceful_handoff_moto: two_workers_graceful_handoff on Table::Moto;
    two_workers_graceful_handoff_dynalite: two_workers_graceful_handoff on Table::Dynalite;
    at_timestamp_dynalite: at_timestamp on Table::Dynalite;
    latest_skips_earlier_records_moto: latest_skips_earlier_records on Table::Moto;
    fan_out_checkpoints_dynalite: fan_out_checkpoints on Table::Dynalite;
    kpl_resume_inside_an_aggregate_moto: kpl_resume_inside_an_aggregate on Table::Moto;
    update_shard_count_while_consuming_dynalite:
        update_shard_count_while_consuming on Table::Dynalite;
}
