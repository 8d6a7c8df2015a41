//! A Java KCL multi-stream lease table: items as the Java KCL's
//! `DynamoDBMultiStreamLeaseSerializer` writes them (`leaseKey` =
//! `account:stream:creationEpoch:shardId`, plus `streamName` = `account:stream:creationEpoch` and
//! `shardId`; parent and child shard ids as bare shard ids), planted as raw items in dynalite,
//! moto and the in-memory store. A multi-stream kcl worker must go on from the Java
//! checkpoints (the finished parent is not read again, its children start), write its
//! checkpoints with Java's names, and name the leases it creates as Java would.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::lease::item::{AttrValue, Item};
use kcl::lease::LeaseKey;
use kcl::testkit::conformance::RawItems;
use kcl::testkit::{MemKinesis, MemLeaseStore};
use kcl::{
    async_trait, Checkpointer, ExtendedSequenceNumber, LeaseStore, ProcessorError, RecordBatch,
    RecordProcessor, ShardContext, ShardId,
};
use kcl_integration_tests::dynamo_servers::{start_dynalite, start_moto};
use kcl_integration_tests::scenarios::poll;
use kcl_integration_tests::{sdk_config, unique_name};

const ORDERS: &str = "123456789012:orders:1700000000";

fn s(v: &str) -> AttrValue {
    AttrValue::S(v.to_owned())
}

fn n(v: &str) -> AttrValue {
    AttrValue::N(v.to_owned())
}

fn ss(v: &[&str]) -> AttrValue {
    AttrValue::Ss(v.iter().map(|x| (*x).to_owned()).collect())
}

/// A Java multi-stream lease of `shard` of `orders`.
fn java_item(shard: &str, checkpoint: &str, extra: &[(&str, AttrValue)]) -> Item {
    let mut item: Item = [
        ("leaseKey", s(&format!("{ORDERS}:{shard}"))),
        ("streamName", s(ORDERS)),
        ("shardId", s(shard)),
        ("leaseCounter", n("42")),
        ("checkpoint", s(checkpoint)),
        ("checkpointSubSequenceNumber", n("0")),
        ("ownerSwitchesSinceCheckpoint", n("0")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    item.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    item
}

type Log = Arc<Mutex<Vec<(String, ShardId, String)>>>;

struct Recorder {
    stream: String,
    log: Log,
}

impl Recorder {
    fn record(&self, batch: &RecordBatch) -> Result<(), ProcessorError> {
        let mut log = self
            .log
            .lock()
            .map_err(|_| ProcessorError::fatal("poisoned"))?;
        for r in batch {
            let data = String::from_utf8_lossy(&r.data).into_owned();
            log.push((self.stream.clone(), batch.shard_id.clone(), data));
        }
        Ok(())
    }
}

#[async_trait]
impl RecordProcessor for Recorder {
    async fn initialize(&mut self, shard: &ShardContext) -> Result<(), ProcessorError> {
        self.stream = shard.stream.clone();
        Ok(())
    }

    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        self.record(batch)?;
        cp.checkpoint().await.map_err(ProcessorError::retryable)
    }
}

async fn goes_on_from_a_java_multi_stream_table<S: LeaseStore + RawItems + Clone>(
    store: S,
    name: &str,
) {
    store.ensure_table().await.expect("ensure_table");
    // The stream as the Java application left it: shard 0 read to its end, then split.
    let kinesis = MemKinesis::new();
    kinesis.create_stream("orders", 1);
    kinesis.create_stream("refunds", 1);
    for i in 0..20 {
        kinesis.put("orders", &format!("k{i}"), format!("before/{i}"));
    }
    let parent = ShardId::new("shardId-000000000000");
    let (c1, c2) = kinesis.split("orders", &parent, u128::MAX / 2);
    for i in 0..20 {
        kinesis.put("orders", &format!("k{i}"), format!("after/{i}"));
        kinesis.put("refunds", &format!("k{i}"), format!("refund/{i}"));
    }
    store
        .put_raw(java_item(
            parent.as_str(),
            "SHARD_END",
            &[("childShardIds", ss(&[c1.as_str(), c2.as_str()]))],
        ))
        .await
        .expect("put_raw");
    for child in [&c1, &c2] {
        store
            .put_raw(java_item(
                child.as_str(),
                "TRIM_HORIZON",
                &[("parentShardId", ss(&[parent.as_str()]))],
            ))
            .await
            .expect("put_raw");
    }

    let log: Log = Arc::default();
    let worker = kcl::Worker::builder()
        .application_name("java-multi")
        .streams([ORDERS, "refunds"])
        .worker_id("kcl-worker")
        .taker_interval(Duration::from_millis(200))
        .kinesis(Arc::new(kinesis.clone()))
        .lease_store(Arc::new(store.clone()))
        .processor({
            let log = log.clone();
            move || Recorder {
                stream: String::new(),
                log: log.clone(),
            }
        })
        .build()
        .expect("worker");
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    poll("both streams read", Duration::from_secs(20), || {
        let n = log.lock().map(|l| l.len()).unwrap_or(0);
        async move { Ok((n >= 40).then_some(())) }
    })
    .await
    .expect("records");
    stop.shutdown();
    run.await.expect("join").expect("run");

    let log = log.lock().expect("log").clone();
    let mut by_stream: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (stream, _, data) in &log {
        by_stream.entry(stream).or_default().push(data);
    }
    assert_eq!(log.len(), 40, "{name}: {log:?}");
    assert!(
        by_stream["orders"].iter().all(|d| d.starts_with("after/")),
        "{name}: the parent the Java worker finished was read again: {:?}",
        by_stream["orders"]
    );
    assert_eq!(by_stream["refunds"].len(), 20, "{name}");

    // Checkpoints went into the Java leases; the leases kcl created are named as Java names
    // them.
    let table = store.list().await.expect("list").leases;
    let refunds_key = table
        .iter()
        .find(|l| l.key.stream().is_some_and(|s| s.name() == "refunds"))
        .map(|l| l.key.clone())
        .expect("a lease for refunds");
    for child in [&c1, &c2] {
        let key = LeaseKey::new(format!("{ORDERS}:{child}"));
        let lease = store.get(&key).await.expect("get").expect("present");
        assert!(
            matches!(lease.checkpoint, ExtendedSequenceNumber::Sequence { .. }),
            "{name}: {key} at {}",
            lease.checkpoint
        );
        assert_eq!(lease.parent_shard_ids, vec![parent.clone()], "{name}");
    }
    assert_eq!(table.len(), 4, "{name}: {table:?}");
    let Some(raw) = store.get_raw(refunds_key.as_str()) else {
        return; // the in-memory store keeps leases, not items
    };
    let raw = raw.await.expect("get_raw").expect("present");
    let stream = refunds_key.stream().expect("multi-stream key").to_string();
    assert_eq!(raw.get("streamName"), Some(&s(&stream)), "{name}: {raw:?}");
    assert_eq!(
        raw.get("shardId"),
        Some(&s("shardId-000000000000")),
        "{name}"
    );
    let child = store
        .get_raw(&format!("{ORDERS}:{c1}"))
        .expect("raw reads")
        .await
        .expect("get_raw")
        .expect("present");
    assert_eq!(
        child.get("streamName"),
        Some(&s(ORDERS)),
        "{name}: {child:?}"
    );
    assert_eq!(child.get("shardId"), Some(&s(c1.as_str())), "{name}");
    assert_eq!(
        child.get("parentShardId"),
        Some(&ss(&[parent.as_str()])),
        "{name}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_multi_stream_table_in_memory() {
    goes_on_from_a_java_multi_stream_table(MemLeaseStore::new(), "memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_multi_stream_table_on_dynalite() {
    let server = start_dynalite().await.expect("dynalite");
    let conf = sdk_config(&server.endpoint()).await;
    let store = DynamoLeaseStore::from_conf(&conf, unique_name("java-multi"));
    goes_on_from_a_java_multi_stream_table(store, "dynalite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_multi_stream_table_on_moto() {
    let server = start_moto().await.expect("moto");
    let conf = sdk_config(&server.endpoint()).await;
    let store = DynamoLeaseStore::from_conf(&conf, unique_name("java-multi"));
    goes_on_from_a_java_multi_stream_table(store, "moto").await;
}

/// An item whose `streamName` and `shardId` do not make its key is reported, not read as
/// something else.
#[tokio::test]
async fn a_multi_stream_item_that_contradicts_its_key_is_reported() {
    let mut item = java_item("shardId-000000000001", "TRIM_HORIZON", &[]);
    item.insert("shardId".into(), s("shardId-000000000009"));
    let err = kcl::lease::item::decode(&item).expect_err("contradiction");
    assert_eq!(err.attribute(), "streamName", "{err}");
}
