//! The lease-store conformance suite against moto, dynalite and the in-memory store, plus the
//! table set-up (`ensure_table`) and the errors of a table that is missing or is not a lease
//! table.

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::testkit::{conformance, MemLeaseStore};
use kcl::{LeaseStore, LeaseStoreError};
use kcl_integration_tests::dynamo_servers::{start_dynalite, start_moto};
use kcl_integration_tests::{sdk_config, unique_name, ServerProcess};

/// A small scan page, so `list` has to follow `LastEvaluatedKey` across many pages.
const SCAN_PAGE: i32 = 7;

/// `ensure_table` on a fresh table (timed), again on the now existing one, and concurrently
/// from two workers on another fresh table; then the whole suite.
async fn conforms(server: &ServerProcess, name: &str) {
    let conf = sdk_config(&server.endpoint()).await;
    let store = DynamoLeaseStore::from_conf(&conf, unique_name("leases")).scan_page_size(SCAN_PAGE);

    // The server's first request pays for its own start-up (moto loads its DynamoDB backend
    // lazily): keep that out of the measurement.
    let started = Instant::now();
    aws_sdk_dynamodb::Client::new(&conf)
        .list_tables()
        .send()
        .await
        .unwrap_or_else(|e| panic!("{name}: ListTables: {e:?}"));
    let warm_up = started.elapsed();

    let started = Instant::now();
    store
        .ensure_table()
        .await
        .unwrap_or_else(|e| panic!("{name}: ensure_table on a fresh table: {e:?}"));
    let first = started.elapsed();
    let started = Instant::now();
    store
        .ensure_table()
        .await
        .unwrap_or_else(|e| panic!("{name}: ensure_table on an existing table: {e:?}"));
    let second = started.elapsed();
    println!(
        "{name}: ensure_table took {first:?} on a fresh table, {second:?} on an existing one \
         (the server's first request took {warm_up:?})"
    );
    assert!(
        first < Duration::from_secs(10),
        "{name}: ensure_table took {first:?} (the SDK waiter's 20 s first delay?)"
    );

    // Two workers starting together: one creates, the other tolerates ResourceInUse.
    let shared = unique_name("leases-race");
    let a = DynamoLeaseStore::from_conf(&conf, shared.clone());
    let b = DynamoLeaseStore::from_conf(&conf, shared);
    let (ra, rb) = tokio::join!(a.ensure_table(), b.ensure_table());
    ra.unwrap_or_else(|e| panic!("{name}: concurrent ensure_table (a): {e:?}"));
    rb.unwrap_or_else(|e| panic!("{name}: concurrent ensure_table (b): {e:?}"));

    let started = Instant::now();
    if name == "moto" {
        // moto does not serialise concurrent conditional writes (see run_all_serial).
        conformance::run_all_serial(&store).await;
    } else {
        conformance::run_all(&store).await;
    }
    println!(
        "{name}: conformance suite passed in {:?}",
        started.elapsed()
    );
    // The worker-table cases ran, not skipped: a store without a worker table passes them
    // by refusing every call.
    store.list_workers(true).await.unwrap_or_else(|e| {
        panic!("{name}: the worker table is not in use, so worker_liveness was skipped: {e:?}")
    });

    // Another store on the same table, with DynamoDB's default page size, reads the same.
    let other = DynamoLeaseStore::from_conf(&conf, store.table_name());
    let (small, large) = (
        store.list().await.expect("list with small pages"),
        other.list().await.expect("list with default pages"),
    );
    assert_eq!(
        small.leases, large.leases,
        "{name}: paging changed the listing"
    );
    assert_eq!(small.malformed.len(), large.malformed.len());
}

/// A missing table and a table with another key schema are not retried.
async fn rejects_bad_tables(server: &ServerProcess, name: &str) {
    let conf = sdk_config(&server.endpoint()).await;
    let missing = DynamoLeaseStore::from_conf(&conf, unique_name("no-such-table"));
    match missing.list().await {
        Err(e @ LeaseStoreError::Other(_)) => assert!(!e.is_retryable()),
        other => panic!("{name}: list of a missing table returned {other:?}, expected Other"),
    }

    let table = unique_name("not-leases");
    let client = aws_sdk_dynamodb::Client::new(&conf);
    client
        .create_table()
        .table_name(&table)
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(KeyType::Hash)
                .build()
                .expect("key schema"),
        )
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("attribute definition"),
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .expect("CreateTable");
    let store = DynamoLeaseStore::from_conf(&conf, &table);
    match store.ensure_table().await {
        Err(e @ LeaseStoreError::Other(_)) => {
            let text = format!("{:?}", std::error::Error::source(&e));
            assert!(text.contains("not a lease table"), "{name}: {text}");
        }
        other => panic!("{name}: ensure_table on a table keyed by `id` returned {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_conforms() {
    let server = start_moto().await.expect("start moto");
    conforms(&server, "moto").await;
    rejects_bad_tables(&server, "moto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynalite_conforms() {
    let server = start_dynalite().await.expect("start dynalite");
    conforms(&server, "dynalite").await;
    rejects_bad_tables(&server, "dynalite").await;
}

#[tokio::test]
async fn memory_conforms() {
    let store = MemLeaseStore::new();
    let started = Instant::now();
    store.ensure_table().await.expect("ensure_table");
    store.ensure_table().await.expect("ensure_table again");
    println!("memory: ensure_table (twice) took {:?}", started.elapsed());
    conformance::run_all(&store).await;
}
