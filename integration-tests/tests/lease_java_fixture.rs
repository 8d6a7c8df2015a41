//! A lease table written by the Java KCL: items as the Java KCL 3.x `DynamoDBLeaseSerializer`
//! writes them (attribute names and DynamoDB types; `throughputKBps`, which kcl reads and carries
//! on with its checkpoints; the binary `pendingCheckpointState` of a two-phase checkpoint; no
//! `entityType`), planted as raw items in moto, dynalite and the in-memory store. kcl must read every one of them as the
//! Java KCL means it, take over from the Java workers through the usual conditional writes,
//! and leave the attributes it does not know in place, so a fleet can move from the Java KCL to
//! kcl (or back) on the same table.

use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::lease::item::{AttrValue, Item};
use kcl::lease::{LeaseCounter, LeaseKey};
use kcl::shard::HashKeyRange;
use kcl::testkit::conformance::RawItems;
use kcl::testkit::MemLeaseStore;
use kcl::{ExtendedSequenceNumber, Lease, LeaseStore, SequenceNumber, ShardId, WorkerId};
use kcl_integration_tests::dynamo_servers::{start_dynalite, start_moto};
use kcl_integration_tests::{sdk_config, unique_name};

const MAX_HASH: &str = "340282366920938463463374607431768211455";
const MID_HASH: &str = "170141183460469231731687303715884105727";
const SEQ: &str = "49590338271490256608559692538361571095921575989136588898";
const PENDING_SEQ: &str = "49590338271490256608559692540925702759324208523137515618";

fn s(v: &str) -> AttrValue {
    AttrValue::S(v.to_owned())
}

fn n(v: &str) -> AttrValue {
    AttrValue::N(v.to_owned())
}

fn ss(v: &[&str]) -> AttrValue {
    AttrValue::Ss(v.iter().map(|x| (*x).to_owned()).collect())
}

fn item(pairs: &[(&str, AttrValue)]) -> Item {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// The Java KCL's items: a finished parent, its two children (one owned mid-stream with a
/// pending two-phase checkpoint, one in a graceful handoff), and a fresh unowned lease.
fn java_items() -> Vec<Item> {
    vec![
        // Parent, read to its end by the Java KCL.
        item(&[
            ("leaseKey", s("shardId-000000000000")),
            ("leaseCounter", n("5731")),
            ("ownerSwitchesSinceCheckpoint", n("0")),
            ("checkpoint", s("SHARD_END")),
            ("checkpointSubSequenceNumber", n("0")),
            (
                "childShardIds",
                ss(&["shardId-000000000001", "shardId-000000000002"]),
            ),
            ("startingHashKey", s("0")),
            ("endingHashKey", s(MAX_HASH)),
        ]),
        // Child 1: owned by a Java worker, checkpointed inside a KPL aggregate, with a pending
        // checkpoint and the Java KCL 3.x throughput figure.
        item(&[
            ("leaseKey", s("shardId-000000000001")),
            ("leaseOwner", s("java-worker-1")),
            ("leaseCounter", n("1234")),
            ("ownerSwitchesSinceCheckpoint", n("2")),
            ("checkpoint", s(SEQ)),
            ("checkpointSubSequenceNumber", n("3")),
            ("pendingCheckpoint", s(PENDING_SEQ)),
            ("pendingCheckpointSubSequenceNumber", n("0")),
            ("pendingCheckpointState", AttrValue::B(vec![1, 2, 3])),
            ("parentShardId", ss(&["shardId-000000000000"])),
            ("startingHashKey", s("0")),
            ("endingHashKey", s(MID_HASH)),
            ("throughputKBps", n("12.5")),
        ]),
        // Child 2: a graceful handoff in progress from java-worker-1 to java-worker-2.
        item(&[
            ("leaseKey", s("shardId-000000000002")),
            ("leaseOwner", s("java-worker-2")),
            ("checkpointOwner", s("java-worker-1")),
            ("leaseCounter", n("77")),
            ("ownerSwitchesSinceCheckpoint", n("0")),
            ("checkpoint", s("TRIM_HORIZON")),
            ("checkpointSubSequenceNumber", n("0")),
            ("parentShardId", ss(&["shardId-000000000000"])),
            (
                "startingHashKey",
                s("170141183460469231731687303715884105728"),
            ),
            ("endingHashKey", s(MAX_HASH)),
        ]),
        // Another stream's shard, never taken (Java writes LATEST and no hash range for
        // leases created before 2.3).
        item(&[
            ("leaseKey", s("shardId-000000000009")),
            ("leaseCounter", n("0")),
            ("ownerSwitchesSinceCheckpoint", n("0")),
            ("checkpoint", s("LATEST")),
            ("checkpointSubSequenceNumber", n("0")),
        ]),
    ]
}

fn seq(v: &str) -> SequenceNumber {
    SequenceNumber::parse(v).expect("fixture sequence number")
}

fn expected_leases() -> Vec<Lease> {
    let shard = |i: u32| ShardId::new(format!("shardId-{i:012}"));
    let range = |a: &str, b: &str| Some(HashKeyRange::parse(a, b).expect("fixture range"));

    let mut parent = Lease::new(&shard(0), ExtendedSequenceNumber::ShardEnd);
    parent.counter = LeaseCounter(5731);
    parent.child_shard_ids = vec![shard(1), shard(2)];
    parent.hash_range = range("0", MAX_HASH);

    let mut child1 = Lease::new(&shard(1), ExtendedSequenceNumber::at(seq(SEQ), 3));
    child1.owner = Some(WorkerId::new("java-worker-1"));
    child1.counter = LeaseCounter(1234);
    child1.owner_switches_since_checkpoint = 2;
    child1.pending_checkpoint = Some(ExtendedSequenceNumber::at(seq(PENDING_SEQ), 0));
    child1.pending_checkpoint_state = Some(bytes::Bytes::from_static(&[1, 2, 3]));
    // `throughputKBps` 12.5 KiB/s.
    child1.throughput = Some(12_800);
    child1.parent_shard_ids = vec![shard(0)];
    child1.hash_range = range("0", MID_HASH);

    let mut child2 = Lease::new(&shard(2), ExtendedSequenceNumber::TrimHorizon);
    child2.owner = Some(WorkerId::new("java-worker-2"));
    child2.checkpoint_owner = Some(WorkerId::new("java-worker-1"));
    child2.counter = LeaseCounter(77);
    child2.parent_shard_ids = vec![shard(0)];
    child2.hash_range = range("170141183460469231731687303715884105728", MAX_HASH);

    let mut other = Lease::new(&shard(9), ExtendedSequenceNumber::Latest);
    other.counter = LeaseCounter(0);

    vec![parent, child1, child2, other]
}

async fn reads_and_takes_over_a_java_table<S: LeaseStore + RawItems>(store: &S, name: &str) {
    store.ensure_table().await.expect("ensure_table");
    for it in java_items() {
        store.put_raw(it).await.expect("put_raw");
    }

    // Every item reads as the Java KCL means it; nothing is reported malformed.
    let table = store.list().await.expect("list");
    assert!(table.malformed.is_empty(), "{name}: {:?}", table.malformed);
    let mut leases = table.leases.clone();
    leases.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(leases, expected_leases(), "{name}");

    // A kcl worker takes child 1 over from the expired Java worker, checkpoints further into
    // the shard, and releases it.
    let me = WorkerId::new("kcl-worker");
    let child1 = leases[1].clone();
    let taken = store.take(&child1, &me).await.expect("take");
    assert_eq!(taken.counter, LeaseCounter(1235), "{name}");
    assert_eq!(taken.owner_switches_since_checkpoint, 3, "{name}");
    let further = ExtendedSequenceNumber::at(seq(PENDING_SEQ), 1);
    let checkpointed = store
        .checkpoint(&taken, &further, &[])
        .await
        .expect("checkpoint");
    store.release(&checkpointed).await.expect("release");

    // A single read decodes the handoff in progress between the two Java workers too.
    let child2 = store
        .get(&LeaseKey::new("shardId-000000000002"))
        .await
        .expect("get")
        .expect("present");
    assert_eq!(child2, expected_leases()[2], "{name}");

    let Some(raw) = store.get_raw("shardId-000000000001") else {
        return; // the in-memory store keeps leases, not items
    };
    let raw = raw.await.expect("get_raw").expect("present");
    // Written with the Java KCL's names and types.
    assert_eq!(raw.get("leaseCounter"), Some(&n("1237")), "{name}: {raw:?}");
    assert_eq!(raw.get("checkpoint"), Some(&s(PENDING_SEQ)), "{name}");
    assert_eq!(
        raw.get("checkpointSubSequenceNumber"),
        Some(&n("1")),
        "{name}"
    );
    assert_eq!(
        raw.get("ownerSwitchesSinceCheckpoint"),
        Some(&n("0")),
        "{name}"
    );
    assert_eq!(raw.get("leaseOwner"), None, "{name}: released");
    // The checkpoint superseded the two-phase pending checkpoint, as the Java KCL's does.
    for gone in [
        "pendingCheckpoint",
        "pendingCheckpointSubSequenceNumber",
        "pendingCheckpointState",
    ] {
        assert_eq!(raw.get(gone), None, "{name}: {gone}");
    }
    // The checkpoint carries the throughput on (the lease's, as read: this store call measured
    // none of its own), in the Java KCL's type.
    assert_eq!(raw.get("throughputKBps"), Some(&n("12.5")), "{name}");
    assert_eq!(
        raw.get("parentShardId"),
        Some(&ss(&["shardId-000000000000"])),
        "{name}"
    );
    assert_eq!(raw.get("endingHashKey"), Some(&s(MID_HASH)), "{name}");
}

#[tokio::test]
async fn java_table_in_memory() {
    reads_and_takes_over_a_java_table(&MemLeaseStore::new(), "memory").await;
}

#[tokio::test]
async fn java_table_on_dynalite() {
    let server = start_dynalite().await.expect("dynalite");
    let conf = sdk_config(&server.endpoint()).await;
    let store = DynamoLeaseStore::from_conf(&conf, unique_name("java-fixture"));
    reads_and_takes_over_a_java_table(&store, "dynalite").await;
}

#[tokio::test]
async fn java_table_on_moto() {
    let server = start_moto().await.expect("moto");
    let conf = sdk_config(&server.endpoint()).await;
    let store = DynamoLeaseStore::from_conf(&conf, unique_name("java-fixture"));
    reads_and_takes_over_a_java_table(&store, "moto").await;
}

/// A Java KCL worker's lease, as it writes one: owned, counter moving, no worker item.
fn java_owned(shard: &str, counter: u64) -> Item {
    item(&[
        ("leaseKey", s(shard)),
        ("leaseOwner", s("java-worker")),
        ("leaseCounter", n(&counter.to_string())),
        ("checkpoint", s("TRIM_HORIZON")),
        ("checkpointSubSequenceNumber", n("0")),
        ("ownerSwitchesSinceCheckpoint", n("0")),
        ("startingHashKey", s("0")),
        ("endingHashKey", s(MAX_HASH)),
        ("throughputKBps", n("3.5")),
    ])
}

/// A rolling migration: a kcl worker (per-worker liveness, the default) joins a table where a
/// Java KCL worker holds two of four leases and renews them, as the Java KCL does, per lease.
/// The kcl worker must leave those leases alone while their counters move, renew its own per
/// lease as well (the Java worker judges them by their counters), and take the Java worker's
/// leases once they stop moving.
async fn beside_a_java_worker<S: LeaseStore + RawItems + Clone>(store: S, name: &str) {
    use std::sync::Arc;
    use std::time::Duration;
    store.ensure_table().await.expect("ensure_table");
    let kinesis = kcl::testkit::MemKinesis::new();
    kinesis.create_stream("migrating", 4);
    let shards: Vec<String> = kinesis
        .open_shard_ids("migrating")
        .into_iter()
        .map(|s| s.to_string())
        .collect();
    for shard in &shards[..2] {
        store.put_raw(java_owned(shard, 7)).await.expect("put_raw");
    }
    // The Java worker: renews its leases every second.
    let java = {
        let store = store.clone();
        let keys: Vec<LeaseKey> = shards[..2].iter().map(LeaseKey::new).collect();
        tokio::spawn(async move {
            loop {
                for key in &keys {
                    if let Ok(Some(l)) = store.get(key).await {
                        if l.owner.as_ref().map(WorkerId::as_str) == Some("java-worker") {
                            let _ = store.renew(&l).await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let worker = kcl::Worker::builder()
        .application_name("migrating-app")
        .stream("migrating")
        .worker_id("kcl-worker")
        .lease_duration(Duration::from_secs(3))
        .taker_interval(Duration::from_millis(500))
        .kinesis(Arc::new(kinesis.clone()))
        .lease_store(Arc::new(store.clone()))
        .processor(|| kcl::testkit::NoopProcessor)
        .build()
        .expect("worker");
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());

    // For three lease durations: the Java leases stay Java's; ours are renewed per lease.
    let mine = |t: &kcl::lease::LeaseTable| -> Vec<Lease> {
        t.leases
            .iter()
            .filter(|l| l.owner.as_ref().map(WorkerId::as_str) == Some("kcl-worker"))
            .cloned()
            .collect()
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = store.list().await.expect("list");
    assert_eq!(mine(&before).len(), 2, "{name}: kcl took the free leases");
    let workers = store.list_workers(true).await.expect("list_workers");
    assert!(
        workers
            .workers
            .iter()
            .any(|w| w.worker.as_str() == "kcl-worker"),
        "{name}: the kcl worker keeps a liveness item"
    );
    tokio::time::sleep(Duration::from_secs(9)).await;
    let after = store.list().await.expect("list");
    for l in &after.leases {
        if shards[..2].contains(&l.key.to_string()) {
            assert_eq!(
                l.owner.as_ref().map(WorkerId::as_str),
                Some("java-worker"),
                "{name}: a Java lease whose counter moves was taken: {l:?}"
            );
        }
    }
    for (b, a) in mine(&before).iter().zip(mine(&after)) {
        assert!(
            a.counter.0 >= b.counter.0 + 3,
            "{name}: with a Java worker in the table, kcl must renew its leases per lease \
             (the Java worker judges them by their counters): {} went from {} to {} in 9 s",
            a.key,
            b.counter,
            a.counter
        );
    }

    // The Java worker dies: its leases stop moving, and kcl takes them.
    java.abort();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let t = store.list().await.expect("list");
        if mine(&t).len() == 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: the dead Java worker's leases were not taken: {:?}",
            t.leases
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.shutdown();
    run.await.expect("join").expect("run");
}

#[tokio::test]
async fn beside_a_java_worker_in_memory() {
    beside_a_java_worker(MemLeaseStore::new(), "memory").await;
}

#[tokio::test]
async fn beside_a_java_worker_on_dynalite() {
    let server = start_dynalite().await.expect("dynalite");
    let conf = sdk_config(&server.endpoint()).await;
    let store = DynamoLeaseStore::from_conf(&conf, unique_name("java-migration"));
    beside_a_java_worker(store, "dynalite").await;
}

#[tokio::test]
async fn beside_a_java_worker_on_moto() {
    let server = start_moto().await.expect("moto");
    let conf = sdk_config(&server.endpoint()).await;
    let store = DynamoLeaseStore::from_conf(&conf, unique_name("java-migration"));
    beside_a_java_worker(store, "moto").await;
}

/// How the fake Java KCL 2.x worker renews a lease whose counter it last wrote as `seen`:
/// `SET leaseCounter = seen + 1` expecting `leaseCounter = seen`, whatever the item's owner.
/// True when it still holds the lease.
type Renew = std::sync::Arc<
    dyn Fn(LeaseKey, u64) -> futures::future::BoxFuture<'static, bool> + Send + Sync,
>;

/// A Java KCL 2.x worker renews by the lease counter alone (as [`Renew`]) and knows nothing of
/// graceful handoffs. A kcl worker joining a table where such a worker holds every lease may
/// ask it for some (it cannot tell a 2.x worker from a 3.x one, which hands leases over), but
/// must withdraw the request once the owner renews on — otherwise the lease would count as the
/// kcl worker's, never come and never expire — and not ask that owner again; and it takes the
/// leases once they stop moving.
async fn beside_a_java_2x_worker<S: LeaseStore + RawItems + Clone>(
    store: S,
    renew: Renew,
    name: &str,
) {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;
    store.ensure_table().await.expect("ensure_table");
    let kinesis = kcl::testkit::MemKinesis::new();
    kinesis.create_stream("migrating-2x", 4);
    let keys: Vec<LeaseKey> = kinesis
        .open_shard_ids("migrating-2x")
        .into_iter()
        .map(|s| LeaseKey::new(s.as_str()))
        .collect();
    for key in &keys {
        store
            .put_raw(java_owned(key.as_str(), 7))
            .await
            .expect("put_raw");
    }
    let java = {
        let keys = keys.clone();
        tokio::spawn(async move {
            let mut counters: BTreeMap<LeaseKey, u64> =
                keys.iter().map(|k| (k.clone(), 7)).collect();
            loop {
                for key in &keys {
                    let Some(seen) = counters.get(key).copied() else {
                        continue;
                    };
                    if renew(key.clone(), seen).await {
                        counters.insert(key.clone(), seen + 1);
                    } else {
                        counters.remove(key);
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let worker = kcl::Worker::builder()
        .application_name("migrating-2x-app")
        .stream("migrating-2x")
        .worker_id("kcl-worker")
        .lease_duration(Duration::from_secs(3))
        .taker_interval(Duration::from_millis(500))
        .kinesis(Arc::new(kinesis.clone()))
        .lease_store(Arc::new(store.clone()))
        .processor(|| kcl::testkit::NoopProcessor)
        .build()
        .expect("worker");
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());

    // Requests (if any) are withdrawn within about two lease durations; then, for two more,
    // every lease is the Java worker's and none is being handed to the kcl worker.
    tokio::time::sleep(Duration::from_secs(8)).await;
    for _ in 0..12 {
        let t = store.list().await.expect("list");
        for l in &t.leases {
            assert_eq!(
                (
                    l.owner.as_ref().map(WorkerId::as_str),
                    l.checkpoint_owner.as_ref().map(WorkerId::as_str)
                ),
                (Some("java-worker"), None),
                "{name}: a handoff asked of a Java 2.x worker (which renews on and never \
                 completes it) was left pending, or asked again: {l:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The Java worker stops: its leases stop moving, and kcl takes them.
    java.abort();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let t = store.list().await.expect("list");
        let mine = t
            .leases
            .iter()
            .filter(|l| {
                l.owner.as_ref().map(WorkerId::as_str) == Some("kcl-worker")
                    && l.checkpoint_owner.is_none()
            })
            .count();
        if mine == keys.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: the stopped Java worker's leases were not taken: {:?}",
            t.leases
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.shutdown();
    run.await.expect("join").expect("run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_a_java_2x_worker_in_memory() {
    let store = MemLeaseStore::new();
    let renew: Renew = {
        let store = store.clone();
        std::sync::Arc::new(move |key: LeaseKey, seen: u64| {
            let store = store.clone();
            Box::pin(async move {
                // Read and written back at once: nothing else runs on the item in between
                // (the in-memory store answers without waiting).
                match store.get(&key).await {
                    Ok(Some(mut l)) if l.counter.0 == seen => {
                        l.counter = LeaseCounter(seen + 1);
                        store.put_raw_item(kcl::lease::item::encode(&l));
                        true
                    }
                    _ => false,
                }
            })
        })
    };
    beside_a_java_2x_worker(store, renew, "memory").await;
}

#[tokio::test]
async fn beside_a_java_2x_worker_on_dynalite() {
    use aws_sdk_dynamodb::types::AttributeValue;
    let server = start_dynalite().await.expect("dynalite");
    let conf = sdk_config(&server.endpoint()).await;
    let table = unique_name("java-2x");
    let store = DynamoLeaseStore::from_conf(&conf, table.clone());
    let client = aws_sdk_dynamodb::Client::new(&conf);
    let renew: Renew = std::sync::Arc::new(move |key: LeaseKey, seen: u64| {
        let (client, table) = (client.clone(), table.clone());
        Box::pin(async move {
            client
                .update_item()
                .table_name(table)
                .key("leaseKey", AttributeValue::S(key.as_str().to_owned()))
                .update_expression("SET leaseCounter = :next")
                .condition_expression("leaseCounter = :seen")
                .expression_attribute_values(":next", AttributeValue::N((seen + 1).to_string()))
                .expression_attribute_values(":seen", AttributeValue::N(seen.to_string()))
                .send()
                .await
                .is_ok()
        })
    });
    beside_a_java_2x_worker(store, renew, "dynalite").await;
}
