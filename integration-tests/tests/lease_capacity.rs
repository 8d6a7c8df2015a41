//! What the lease protocol costs, as a DynamoDB-compatible server reports it
//! (`ReturnConsumedCapacity`, read by `DynamoLeaseStore::capacity`), beside what
//! `MemLeaseStore` charges by its model of DynamoDB's rules (`kcl::lease::capacity`): the same
//! requests must cost the same units, or the fleet benchmark's figures (which use the model)
//! would not be what AWS bills.
//!
//! dynalite computes consumed capacity from item sizes as DynamoDB does, with one known
//! deviation: it charges a strongly consistent `Scan` the eventually consistent rate (DynamoDB
//! charges twice that). moto does not model capacity (a flat 0.5 unit per write, 1 per read),
//! so it is only printed.

use std::collections::BTreeMap;

use kcl::lease::capacity::CapacityMeter;
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::lease::liveness::{Beat, WorkerItem};
use kcl::lease::LeaseStore;
use kcl::shard::HashKeyRange;
use kcl::testkit::MemLeaseStore;
use kcl::{ExtendedSequenceNumber, Lease, ShardId, WorkerId};
use kcl_integration_tests::dynamo_servers::{start_dynalite, start_moto};
use kcl_integration_tests::{sdk_config, unique_name};

const LEASES: usize = 40;

fn lease(i: usize) -> Lease {
    let width = u128::MAX / LEASES as u128;
    let range = HashKeyRange::new(width * i as u128, width * i as u128 + width - 1).expect("range");
    let mut l = Lease::new(
        &ShardId::new(format!("shardId-{i:012}")),
        ExtendedSequenceNumber::TrimHorizon,
    )
    .with_hash_range(range);
    l.checkpoint = ExtendedSequenceNumber::at(
        format!("4959{:052}", 7_000_003u64 * (i as u64 + 1))
            .parse()
            .expect("sequence number"),
        0,
    );
    l
}

/// One worker's protocol, in the order a fleet runs it; returns (reads, writes) per step.
async fn script(
    store: &dyn LeaseStore,
    meter: &CapacityMeter,
) -> BTreeMap<&'static str, (f64, f64)> {
    let mut steps = BTreeMap::new();
    let mut mark = |name: &'static str, m: &CapacityMeter, before: (f64, f64)| {
        let t = m.total();
        steps.insert(name, (t.read_units - before.0, t.write_units - before.1));
        (t.read_units, t.write_units)
    };
    let mut at = (meter.total().read_units, meter.total().write_units);
    for i in 0..LEASES {
        assert!(store.create_if_absent(&lease(i)).await.expect("create"));
    }
    at = mark("create", meter, at);
    let me = WorkerId::new("capacity-worker-0001");
    let mut held = Vec::new();
    for i in 0..LEASES / 2 {
        held.push(store.take(&lease(i), &me).await.expect("take"));
    }
    at = mark("take", meter, at);
    for l in &mut held {
        *l = store.renew(l).await.expect("renew");
    }
    at = mark("renew", meter, at);
    let table = store.list().await.expect("list");
    assert_eq!(table.leases.len(), LEASES);
    at = mark("list (consistent)", meter, at);
    store.list_eventually().await.expect("list_eventually");
    at = mark("list (eventually consistent)", meter, at);
    store.get(&held[0].key).await.expect("get");
    at = mark("get", meter, at);
    store
        .register_worker(&WorkerItem::new(me.clone(), 77))
        .await
        .expect("register");
    for _ in 0..3 {
        store
            .heartbeat(&Beat::new(me.clone(), 77).lease_count(20))
            .await
            .expect("heartbeat");
    }
    at = mark("register + 3 heartbeats", meter, at);
    store.list_workers(false).await.expect("list_workers");
    mark("list workers", meter, at);
    steps
}

async fn compare(dynamo: DynamoLeaseStore, name: &str) -> Vec<(String, f64, f64, f64, f64)> {
    dynamo.ensure_table().await.expect("ensure_table");
    let mem = MemLeaseStore::new();
    let model = script(&mem, mem.capacity()).await;
    let reported = script(&dynamo, dynamo.capacity()).await;
    let rows: Vec<_> = model
        .iter()
        .map(|(step, (r, w))| {
            let (rr, rw) = reported[step];
            ((*step).to_owned(), *r, *w, rr, rw)
        })
        .collect();
    for (step, r, w, rr, rw) in &rows {
        println!("{name}: {step}: model {r} read / {w} write units, reported {rr} / {rw}");
    }
    rows
}

#[tokio::test]
async fn dynalite_reports_what_the_model_charges() {
    let server = start_dynalite().await.expect("dynalite");
    let conf = sdk_config(&server.endpoint()).await;
    let rows = compare(
        DynamoLeaseStore::from_conf(&conf, unique_name("capacity")),
        "dynalite",
    )
    .await;
    assert_eq!(rows.len(), 8, "every step compared");
    for (step, r, w, rr, rw) in rows {
        // dynalite's known deviation: a consistent scan at the eventually consistent rate.
        let r = if step == "list (consistent)" {
            r / 2.0
        } else {
            r
        };
        assert!(
            (r - rr).abs() < 1e-9 && (w - rw).abs() < 1e-9,
            "dynalite: {step}: the model charges {r} read and {w} write units, dynalite reported {rr} and {rw}"
        );
    }
}

#[tokio::test]
async fn moto_reports_consumed_capacity() {
    let server = start_moto().await.expect("moto");
    let conf = sdk_config(&server.endpoint()).await;
    let rows = compare(
        DynamoLeaseStore::from_conf(&conf, unique_name("capacity")),
        "moto",
    )
    .await;
    // moto reports something for every request (its own flat figures): the SDK path reads it.
    for (step, _, _, rr, rw) in rows {
        assert!(rr + rw > 0.0, "moto: {step}: no consumed capacity reported");
    }
}
