//! `LeaseTableOptions` applied by `DynamoLeaseStore::ensure_table` when it creates the lease
//! and worker tables — tags, encryption at rest with a customer key, deletion protection,
//! point-in-time recovery — checked through `DescribeTable`, `ListTagsOfResource` and
//! `DescribeContinuousBackups` on moto. An existing table is left as it is. On dynalite only
//! that `ensure_table` with every option succeeds.

use aws_sdk_dynamodb::types::{PointInTimeRecoveryStatus, SseType};
use kcl::config::{LeaseTableOptions, TableEncryption};
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::LeaseStore;
use kcl_integration_tests::dynamo_servers::start_moto;
use kcl_integration_tests::{sdk_config, unique_name};

/// What DynamoDB says about one table's options.
#[derive(Debug, PartialEq)]
struct Applied {
    tags: Vec<(String, String)>,
    kms_key: Option<String>,
    deletion_protection: bool,
    pitr: bool,
}

async fn applied(client: &aws_sdk_dynamodb::Client, table: &str) -> Applied {
    let t = client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .expect("DescribeTable")
        .table
        .expect("a table");
    let sse = t.sse_description();
    let kms_key = sse
        .filter(|d| d.sse_type() == Some(&SseType::Kms))
        .map(|d| {
            d.kms_master_key_arn()
                .unwrap_or("(no key reported)")
                .to_owned()
        });
    let mut tags: Vec<_> = client
        .list_tags_of_resource()
        .resource_arn(t.table_arn().expect("an ARN"))
        .send()
        .await
        .expect("ListTagsOfResource")
        .tags()
        .iter()
        .map(|t| (t.key().to_owned(), t.value().to_owned()))
        .collect();
    tags.sort();
    let pitr = client
        .describe_continuous_backups()
        .table_name(table)
        .send()
        .await
        .expect("DescribeContinuousBackups")
        .continuous_backups_description
        .and_then(|d| d.point_in_time_recovery_description)
        .and_then(|p| p.point_in_time_recovery_status)
        == Some(PointInTimeRecoveryStatus::Enabled);
    Applied {
        tags,
        kms_key,
        deletion_protection: t.deletion_protection_enabled().unwrap_or(false),
        pitr,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_tables_get_the_options_and_existing_ones_are_left_alone() {
    let server = start_moto().await.expect("moto");
    let conf = sdk_config(&server.endpoint()).await;
    let client = aws_sdk_dynamodb::Client::new(&conf);
    let key = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555";

    let mut options = LeaseTableOptions::default();
    options.tags.insert("team".into(), "orders".into());
    options.tags.insert("env".into(), "test".into());
    options.encryption = TableEncryption::CustomerKey(key.into());
    options.point_in_time_recovery = true;
    options.deletion_protection = true;
    let table = unique_name("leases-opts");
    let store = DynamoLeaseStore::from_conf(&conf, table.clone()).table_options(options);
    store.ensure_table().await.expect("ensure_table");
    let want = Applied {
        tags: vec![
            ("env".into(), "test".into()),
            ("team".into(), "orders".into()),
        ],
        kms_key: Some(key.into()),
        deletion_protection: true,
        pitr: true,
    };
    assert_eq!(applied(&client, &table).await, want, "the lease table");
    assert_eq!(
        applied(&client, &store.worker_table()).await,
        want,
        "the worker table"
    );

    // The AWS-managed key: KMS without a key of ours.
    let mut managed = LeaseTableOptions::default();
    managed.encryption = TableEncryption::AwsManaged;
    let managed_table = unique_name("leases-managed");
    DynamoLeaseStore::from_conf(&conf, managed_table.clone())
        .table_options(managed)
        .ensure_table()
        .await
        .expect("ensure_table (AWS-managed key)");
    let got = applied(&client, &managed_table).await;
    assert!(got.kms_key.is_some(), "AWS-managed key: {got:?}");
    assert_ne!(got.kms_key.as_deref(), Some(key));

    // Defaults: nothing of the above.
    let plain = unique_name("leases-plain");
    DynamoLeaseStore::from_conf(&conf, plain.clone())
        .ensure_table()
        .await
        .expect("ensure_table (defaults)");
    let nothing = Applied {
        tags: vec![],
        kms_key: None,
        deletion_protection: false,
        pitr: false,
    };
    assert_eq!(applied(&client, &plain).await, nothing);

    // An existing table is used as it is: the options only apply to tables created.
    let mut other = LeaseTableOptions::default();
    other.point_in_time_recovery = true;
    other.tags.insert("team".into(), "payments".into());
    DynamoLeaseStore::from_conf(&conf, plain.clone())
        .table_options(other)
        .ensure_table()
        .await
        .expect("ensure_table on an existing table with other options");
    assert_eq!(
        applied(&client, &plain).await,
        nothing,
        "an existing table was changed"
    );
}

/// The options reach the store through the builder (`WorkerConfig::lease_table`) and the
/// AWS backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builder_passes_the_options_to_the_aws_backends() {
    let server = start_moto().await.expect("moto");
    let conf = sdk_config(&server.endpoint()).await;
    let client = aws_sdk_dynamodb::Client::new(&conf);
    let table = unique_name("leases-built");
    let config = kcl::WorkerConfig::from_json(&format!(
        r#"{{"application_name": "{table}", "stream": "orders",
            "lease_table": {{"tags": {{"team": "orders"}}, "deletion_protection": true}}}}"#
    ))
    .expect("configuration");
    let worker = kcl::Worker::builder()
        .config(config)
        .backends(kcl::Aws::from_conf(&conf))
        .processor(|| kcl::testkit::NoopProcessor)
        .build()
        .expect("build");
    // `run()` would start with `ensure_table`; the stream does not exist, so it then fails.
    let _ = worker.run().await;
    let got = applied(&client, &table).await;
    assert_eq!(got.tags, vec![("team".to_owned(), "orders".to_owned())]);
    assert!(got.deletion_protection);
}

/// dynalite accepts a `CreateTable` with the options (what it keeps of them is not checked:
/// it has no tagging or continuous-backup API to read them back; a failing
/// `UpdateContinuousBackups` is logged, not fatal), so the same configuration runs against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynalite_accepts_the_options() {
    let server = kcl_integration_tests::dynamo_servers::start_dynalite()
        .await
        .expect("dynalite");
    let conf = sdk_config(&server.endpoint()).await;
    let mut options = LeaseTableOptions::default();
    options.tags.insert("team".into(), "orders".into());
    options.encryption = TableEncryption::AwsManaged;
    options.point_in_time_recovery = true;
    options.deletion_protection = true;
    let store =
        DynamoLeaseStore::from_conf(&conf, unique_name("leases-dynalite")).table_options(options);
    store
        .ensure_table()
        .await
        .expect("ensure_table with options on dynalite");
    store
        .list_workers(true)
        .await
        .expect("the worker table is in use");
}
