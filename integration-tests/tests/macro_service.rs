//! `examples/macro_service.rs`, the 13-line service made with `#[kcl::handler]` and
//! `kcl::service!`, run as a process against kinesis-local and dynalite (configured through
//! its flags and the standard AWS environment variables):
//!
//! - every valid JSON order is handled: one stdout line each, exactly once;
//! - a malformed record after them is reported on stderr by shard, sequence number and
//!   partition key, and is not skipped: its shard stops there, checkpointed at the order
//!   before it, and the order after it is not handled;
//! - SIGTERM stops the service gracefully with exit code 0;
//! - `--help` exits 0; a missing or invalid flag exits 2 naming it.
//!
//! The binary is built with `cargo build --workspace --all-features --example
//! macro_service` (what `scripts/test.sh` builds).

use std::time::Duration;

use anyhow::{ensure, Context};
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::lease::LeaseStore;
use kcl::ExtendedSequenceNumber;
use kcl_integration_tests::cli::{example_binary, run_kcl, CliEnv, KclProcess};
use kcl_integration_tests::dynamo_servers::start_dynalite;
use kcl_integration_tests::kinesis_server::{
    create_stream, kinesis_client, put_records_with_parallelism, start_kinesis_local,
};
use kcl_integration_tests::{sdk_config, unique_name};

/// Valid orders before the malformed record.
const ORDERS: u64 = 25;

fn order(id: u64) -> Vec<u8> {
    format!(
        r#"{{"id":{id},"item":"widget {id}","quantity":{}}}"#,
        id % 4 + 1
    )
    .into_bytes()
}

/// The line the example prints for [`order`]`(id)`.
fn line(id: u64) -> String {
    format!("order {id}: {} x widget {id}", id % 4 + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn macro_service_handles_orders_stops_at_a_malformed_record_and_exits_on_sigterm(
) -> anyhow::Result<()> {
    let (bin, kinesis, dynamo) = tokio::try_join!(
        example_binary("macro_service"),
        start_kinesis_local(),
        start_dynalite()
    )?;
    let env = CliEnv::new(kinesis.endpoint(), dynamo.endpoint());

    // Flag errors first: no server is needed, nothing is read.
    let help = run_kcl(&bin, &env, ["--help"], Duration::from_secs(20)).await?;
    ensure!(help.status.success(), "--help: {:?}", help.status);
    for flag in [
        "--stream",
        "KCL_STREAM",
        "--app",
        "--table",
        "--worker-id",
        "--position",
    ] {
        ensure!(
            help.stdout.contains(flag),
            "{flag} not in --help:\n{}",
            help.stdout
        );
    }
    let missing = run_kcl(&bin, &env, ["--app", "orders-app"], Duration::from_secs(20)).await?;
    ensure!(
        missing.status.code() == Some(2),
        "missing --stream: {:?}",
        missing.status
    );
    ensure!(
        missing
            .stderr
            .contains("missing --stream (or the environment variable KCL_STREAM)"),
        "{}",
        missing.stderr
    );
    let args = [
        "--stream",
        "s",
        "--app",
        "orders-app",
        "--position",
        "oldest",
    ];
    let invalid = run_kcl(&bin, &env, args, Duration::from_secs(20)).await?;
    ensure!(
        invalid.status.code() == Some(2),
        "invalid --position: {:?}",
        invalid.status
    );
    ensure!(
        invalid.stderr.contains("invalid --position: expected"),
        "{}",
        invalid.stderr
    );
    let args = ["--stream", "bad stream", "--app", "orders-app"];
    let invalid = run_kcl(&bin, &env, args, Duration::from_secs(20)).await?;
    ensure!(
        invalid.status.code() == Some(2),
        "invalid --stream: {:?}",
        invalid.status
    );
    // Refused before the AWS configuration is loaded: the message is all there is.
    ensure!(
        invalid.stderr.starts_with("error: invalid --stream: "),
        "{}",
        invalid.stderr
    );

    // One shard: the orders, the malformed record, one more order.
    let client = kinesis_client(&kinesis).await;
    let stream = unique_name("macro-orders");
    let app = unique_name("macro-app");
    create_stream(&client, &stream, 1).await?;
    let mut records: Vec<(String, Vec<u8>)> = (1..=ORDERS)
        .map(|id| (format!("customer-{}", id % 5), order(id)))
        .collect();
    records.push(("bad-key".into(), br#"{"id": 999, "item": oops}"#.to_vec()));
    records.push(("customer-1".into(), order(ORDERS + 1)));
    // One call: the records keep their order in the shard.
    let puts = put_records_with_parallelism(&client, &stream, records, 1).await?;
    let bad = &puts[ORDERS as usize];
    let last_good = &puts[ORDERS as usize - 1];

    let mut service = KclProcess::spawn(
        &bin,
        "macro-service",
        &env,
        [
            "--stream",
            &stream,
            "--app",
            &app,
            "--worker-id",
            "macro-worker-1",
        ],
    )?;
    service
        .wait_for_lines(ORDERS as usize, Duration::from_secs(30))
        .await?;
    let seq = bad.sequence_number.to_string();
    service
        .wait_for_stderr(
            "the malformed record's report",
            Duration::from_secs(20),
            |s| {
                s.lines().any(|l| {
                    l.contains("could not be decoded")
                        && l.contains(bad.shard_id.as_str())
                        && l.contains(&seq)
                        && l.contains("bad-key")
                })
            },
        )
        .await?;

    // The checkpoint stops just before the malformed record.
    let store = DynamoLeaseStore::from_conf(&sdk_config(&dynamo.endpoint()).await, app.clone());
    let expected = ExtendedSequenceNumber::at(last_good.sequence_number.clone(), 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let lease = loop {
        let table = store.list().await.context("reading the lease table")?;
        ensure!(
            table.leases.len() == 1,
            "one lease per shard: {:?}",
            table.leases
        );
        let lease = table.leases[0].clone();
        if lease.checkpoint == expected && lease.owner.is_none() {
            break lease;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the lease is not released at {expected}: {lease:?}; stderr:\n{}",
            service.stderr_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ensure!(lease.key.as_str() == bad.shard_id.as_str(), "{lease:?}");

    // SIGTERM: a graceful stop, exit code 0.
    let (status, took) = service.terminate(Duration::from_secs(15)).await?;
    ensure!(
        status.success(),
        "exit {status:?} after SIGTERM; stderr:\n{}",
        service.stderr_tail(30)
    );
    ensure!(
        took < Duration::from_secs(10),
        "SIGTERM → exit took {took:?}"
    );

    // Every valid order exactly once, in order; nothing after the malformed record.
    let expected_lines: Vec<String> = (1..=ORDERS).map(line).collect();
    ensure!(
        service.texts() == expected_lines,
        "stdout:\n{}",
        service.texts().join("\n")
    );
    Ok(())
}
