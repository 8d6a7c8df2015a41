//! Malformed lease items, against moto, dynalite and the in-memory store: a missing
//! `leaseCounter`, a non-numeric checkpoint (`12abc`), a `leaseCounter` stored as a string, a
//! `parentShardId` that is not a string set (and an `ownerSwitchesSinceCheckpoint` that is a
//! boolean). `list` reports each in `malformed`, naming the attribute, and still lists the
//! valid leases beside them; `get` fails with `Malformed`; nothing is deleted or overwritten.

use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::lease::item::{attr, AttrValue, Item};
use kcl::testkit::conformance::{self, RawItems};
use kcl::testkit::MemLeaseStore;
use kcl::{LeaseStore, LeaseStoreError};
use kcl_integration_tests::dynamo_servers::{start_dynalite, start_moto};
use kcl_integration_tests::{sdk_config, unique_name, ServerProcess};

/// In a fresh, empty table: plants the malformed items beside two valid leases (the shared
/// check in `kcl::testkit::conformance`), then checks the table as a whole.
async fn reports_malformed_items<S: LeaseStore + RawItems>(store: &S, name: &str) {
    store.ensure_table().await.expect("ensure_table");
    let bad = conformance::malformed_leases_are_reported(store, store, "bad-input").await;
    let attributes: Vec<&str> = bad.iter().map(|(_, a)| *a).collect();
    assert_eq!(
        attributes,
        [
            attr::LEASE_COUNTER,
            attr::CHECKPOINT,
            attr::LEASE_COUNTER,
            attr::PARENTS,
            attr::OWNER_SWITCHES
        ],
        "{name}"
    );

    // The table holds exactly the two valid leases and the five malformed items.
    let table = store.list().await.expect("list");
    let keys: Vec<&str> = table.leases.iter().map(|l| l.key.as_str()).collect();
    assert_eq!(keys, ["bad-input-good-0", "bad-input-good-1"], "{name}");
    let mut reported: Vec<(String, &str)> = table
        .malformed
        .iter()
        .map(|m| (m.key().unwrap_or("<none>").to_owned(), m.attribute()))
        .collect();
    reported.sort();
    let mut expected = bad.clone();
    expected.sort();
    assert_eq!(reported, expected, "{name}");
    for m in &table.malformed {
        assert!(
            !m.reason().is_empty() && m.to_string().contains(m.attribute()),
            "{name}: {m}"
        );
    }
    println!("{name}: malformed items reported as:");
    for m in &table.malformed {
        println!("  {m}");
    }

    // Writes through the protocol cannot turn them into leases either: a take needs the
    // counter, which these items do not have as a number.
    for key in [
        "bad-input-bad-missing-counter",
        "bad-input-bad-counter-type",
    ] {
        let mut guess = kcl::Lease::new(
            &kcl::ShardId::new(key),
            kcl::ExtendedSequenceNumber::TrimHorizon,
        );
        for counter in [0, 7] {
            guess.counter = kcl::lease::LeaseCounter(counter);
            match store.take(&guess, &kcl::WorkerId::new("w1")).await {
                Err(e) => assert!(
                    matches!(
                        e,
                        LeaseStoreError::ConditionFailed { .. } | LeaseStoreError::Malformed(_)
                    ),
                    "{name}: take of {key} with counter {counter}: {e:?}"
                ),
                Ok(l) => panic!("{name}: take of the malformed {key} succeeded: {l:?}"),
            }
        }
        match store.get(&kcl::lease::LeaseKey::new(key)).await {
            Err(LeaseStoreError::Malformed(m)) => assert_eq!(m.attribute(), attr::LEASE_COUNTER),
            other => panic!("{name}: get({key}) after the takes: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_reports_malformed_items() {
    let server = start_moto().await.expect("start moto");
    reports_malformed_items(&dynamo(&server, "bad-input-moto").await, "moto").await;
    raw_items_survive(&server, "moto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynalite_reports_malformed_items() {
    let server = start_dynalite().await.expect("start dynalite");
    reports_malformed_items(&dynamo(&server, "bad-input-dynalite").await, "dynalite").await;
    raw_items_survive(&server, "dynalite").await;
}

#[tokio::test]
async fn memory_reports_malformed_items() {
    reports_malformed_items(&MemLeaseStore::new(), "memory").await;
}

async fn dynamo(server: &ServerProcess, prefix: &str) -> DynamoLeaseStore {
    let conf = sdk_config(&server.endpoint()).await;
    DynamoLeaseStore::from_conf(&conf, unique_name(prefix)).scan_page_size(2)
}

/// Every malformed item is byte-for-byte what was written after `list`, `get` and a refused
/// `create_if_absent` (checked by the conformance helper through `get_raw_item`), and once more
/// here after everything else.
async fn raw_items_survive(server: &ServerProcess, name: &str) {
    let store = dynamo(server, "bad-input-raw").await;
    store.ensure_table().await.expect("ensure_table");
    let mut item = Item::new();
    item.insert(
        attr::LEASE_KEY.into(),
        AttrValue::S("shardId-000000000000".into()),
    );
    item.insert(attr::LEASE_COUNTER.into(), AttrValue::N("3".into()));
    item.insert(attr::CHECKPOINT.into(), AttrValue::S("12abc".into()));
    item.insert(
        attr::PENDING_CHECKPOINT_STATE.into(),
        AttrValue::B(vec![0, 1, 2, 255]),
    );
    store
        .put_raw_item(item.clone())
        .await
        .expect("put_raw_item");
    let table = store.list().await.expect("list");
    assert_eq!(table.malformed.len(), 1, "{name}");
    assert_eq!(table.malformed[0].attribute(), attr::CHECKPOINT, "{name}");
    assert!(matches!(
        store
            .get(&kcl::lease::LeaseKey::new("shardId-000000000000"))
            .await,
        Err(LeaseStoreError::Malformed(_))
    ));
    let stored = store
        .get_raw_item("shardId-000000000000")
        .await
        .expect("get_raw_item");
    assert_eq!(stored, Some(item), "{name}: the malformed item changed");
}
