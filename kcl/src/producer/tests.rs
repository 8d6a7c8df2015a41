//! Producer tests on the in-memory Kinesis, with scripted partial failures.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use super::*;
use crate::record::Record;
use crate::retrieval::deagg::{deaggregate, Deaggregated};
use crate::retrieval::{IteratorPosition, KinesisApi};
use crate::testkit::{Fault, FaultKind, MemKinesis};

type RejectRule = Box<dyn Fn(usize, &PutRecordsEntry) -> bool + Send + Sync>;

/// `PutRecords` on a [`MemKinesis`] that records every call and rejects the entries `reject`
/// picks (by call number and entry) with `ProvisionedThroughputExceededException`.
struct Scripted {
    kinesis: MemKinesis,
    calls: Mutex<Vec<Vec<PutRecordsEntry>>>,
    reject: RejectRule,
}

impl fmt::Debug for Scripted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scripted").finish_non_exhaustive()
    }
}

impl Scripted {
    fn new(
        kinesis: &MemKinesis,
        reject: impl Fn(usize, &PutRecordsEntry) -> bool + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            kinesis: kinesis.clone(),
            calls: Mutex::new(Vec::new()),
            reject: Box::new(reject),
        })
    }

    fn calls(&self) -> Vec<Vec<PutRecordsEntry>> {
        self.calls.lock().expect("lock").clone()
    }
}

#[async_trait::async_trait]
impl PutRecords for Scripted {
    async fn put_records(
        &self,
        stream: &str,
        entries: &[PutRecordsEntry],
    ) -> Result<Vec<PutRecordsResult>, KinesisApiError> {
        let call = {
            let mut calls = self.calls.lock().expect("lock");
            calls.push(entries.to_vec());
            calls.len() - 1
        };
        let rejected: Vec<bool> = entries.iter().map(|e| (self.reject)(call, e)).collect();
        let accepted: Vec<PutRecordsEntry> = entries
            .iter()
            .zip(&rejected)
            .filter(|(_, r)| !**r)
            .map(|(e, _)| e.clone())
            .collect();
        let mut stored = self
            .kinesis
            .put_records(stream, &accepted)
            .await?
            .into_iter();
        Ok(rejected
            .iter()
            .map(|&r| {
                if r {
                    PutRecordsResult::Rejected {
                        error_code: "ProvisionedThroughputExceededException".into(),
                        message: "Rate exceeded for shard".into(),
                    }
                } else {
                    stored.next().expect("one result per accepted entry")
                }
            })
            .collect())
    }
}

/// Every record of every shard, in shard order (shards in listing order).
async fn read_all(k: &MemKinesis, stream: &str) -> Vec<Record> {
    let mut out = Vec::new();
    for shard in k.list_shards(stream).await.expect("shards") {
        let mut it = k
            .get_shard_iterator(stream, &shard.id, &IteratorPosition::TrimHorizon)
            .await
            .expect("iterator");
        loop {
            let r = k.get_records(&it, 10_000).await.expect("records");
            let done = r.records.is_empty();
            out.extend(r.records);
            match r.next_iterator {
                Some(next) if !done => it = next,
                _ => break,
            }
        }
    }
    out
}

/// The user records stored, deaggregated, grouped by key in stored order: key → payloads.
async fn stored_by_key(k: &MemKinesis, stream: &str) -> BTreeMap<String, Vec<String>> {
    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for record in read_all(k, stream).await {
        let d = deaggregate(record);
        assert!(d.invalid_reason().is_none(), "{d:?}");
        for sub in d.into_records() {
            by_key
                .entry(sub.partition_key.clone())
                .or_default()
                .push(String::from_utf8(sub.data.to_vec()).expect("utf-8"));
        }
    }
    by_key
}

fn payload(key: &str, i: usize) -> String {
    format!("{key}#{i:05}")
}

fn expected(keys: &[String], per_key: usize) -> BTreeMap<String, Vec<String>> {
    keys.iter()
        .map(|k| (k.clone(), (0..per_key).map(|i| payload(k, i)).collect()))
        .collect()
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("key-{i}")).collect()
}

fn stream(shards: usize) -> MemKinesis {
    let k = MemKinesis::new();
    k.create_stream("s", shards);
    k
}

/// In every call a partition key appears in at most one entry.
fn assert_one_entry_per_key(calls: &[Vec<PutRecordsEntry>]) {
    for (i, call) in calls.iter().enumerate() {
        let mut seen = HashSet::new();
        for e in call {
            let keys: HashSet<String> = match deaggregate(Record::new(
                e.data.clone(),
                e.partition_key.clone(),
                crate::SequenceNumber::from_u128(1),
                None,
            )) {
                Deaggregated::Aggregate(subs) => {
                    subs.into_iter().map(|s| s.partition_key).collect()
                }
                _ => [e.partition_key.clone()].into(),
            };
            for k in keys {
                assert!(seen.insert(k.clone()), "call {i} carries key {k} twice");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn batches_respect_the_record_and_byte_limits() {
    let k = stream(4);
    let api = Scripted::new(&k, |_, _| false);
    let producer = Producer::builder(api.clone(), "s")
        .max_buffered_records(100_000)
        .max_buffered_bytes(usize::MAX)
        .build()
        .expect("valid");
    // 1 200 small records with distinct keys: 500 + 500 + 200.
    for i in 0..1_200 {
        producer.put(format!("k{i}"), "x").await.expect("put");
    }
    producer.flush().await.expect("flush");
    let sizes: Vec<usize> = api.calls().iter().map(Vec::len).collect();
    assert_eq!(sizes, [500, 500, 200]);

    // 30 records of 700 KB: at most 7 fit under 5 MiB (data plus keys).
    let api = Scripted::new(&k, |_, _| false);
    let producer = Producer::builder(api.clone(), "s")
        .max_buffered_bytes(usize::MAX)
        .build()
        .expect("valid");
    for i in 0..30 {
        producer
            .put(format!("big-{i}"), vec![b'x'; 700_000])
            .await
            .expect("put");
    }
    producer.flush().await.expect("flush");
    let calls = api.calls();
    assert!(calls.len() >= 5);
    for call in &calls {
        let bytes: usize = call.iter().map(PutRecordsEntry::size).sum();
        assert!(bytes <= MAX_BATCH_BYTES, "{bytes} bytes in one call");
    }
    assert_eq!(calls.iter().map(Vec::len).sum::<usize>(), 30);
    assert_eq!(k.record_count("s"), 1_230);
}

#[tokio::test(start_paused = true)]
async fn aggregates_round_trip_in_order_within_the_size_limit() {
    let k = stream(3);
    let api = Scripted::new(&k, |_, _| false);
    let limit = 20_000;
    let producer = Producer::builder(api.clone(), "s")
        .aggregation(true)
        .max_aggregate_bytes(limit)
        .build()
        .expect("valid");
    let keys = keys(7);
    for i in 0..300 {
        for key in &keys {
            producer
                .put(key.clone(), payload(key, i))
                .await
                .expect("put");
        }
    }
    // A lone key's record goes as a plain record.
    producer.put("lonely", "alone").await.expect("put");
    producer.close().await.expect("close");

    let mut want = expected(&keys, 300);
    want.insert("lonely".into(), vec!["alone".into()]);
    assert_eq!(stored_by_key(&k, "s").await, want);
    let stored = read_all(&k, "s").await;
    // 300 records of ~9 + 10 bytes per key in aggregates of at most 20 000 bytes.
    assert!(stored.len() < 7 * 3 + 1, "{} Kinesis records", stored.len());
    for r in &stored {
        assert!(r.data.len() + r.partition_key.len() <= limit);
    }
    let plain: Vec<&Record> = stored
        .iter()
        .filter(|r| r.partition_key == "lonely")
        .collect();
    assert_eq!(plain.len(), 1);
    assert_eq!(&plain[0].data[..], b"alone");
    assert_one_entry_per_key(&api.calls());
}

#[tokio::test(start_paused = true)]
async fn explicit_hash_keys_route_aggregates_and_come_back() {
    let k = stream(4);
    let shards = k.list_shards("s").await.expect("shards");
    let last = shards.last().expect("a shard");
    let target = last.hash_range.start() + 5;
    let producer = Producer::builder(k.clone(), "s")
        .aggregation(true)
        .build()
        .expect("valid");
    for i in 0..10 {
        producer
            .put_record(
                UserRecord::new(format!("k{i}"), format!("v{i}")).with_explicit_hash_key(target),
            )
            .await
            .expect("put");
    }
    producer.flush().await.expect("flush");
    // One aggregate, in the shard that owns the explicit hash key.
    let it = k
        .get_shard_iterator("s", &last.id, &IteratorPosition::TrimHorizon)
        .await
        .expect("iterator");
    let records = k.get_records(&it, 100).await.expect("records").records;
    assert_eq!(records.len(), 1);
    let subs = deaggregate(records[0].clone()).into_records();
    assert_eq!(subs.len(), 10);
    for (i, s) in subs.iter().enumerate() {
        assert_eq!(s.partition_key, format!("k{i}"));
        assert_eq!(s.explicit_hash_key, Some(target));
        assert_eq!(s.sub_sequence_number, i as u64);
        assert!(crate::retrieval::deagg::in_range(s, last.hash_range));
    }
}

#[tokio::test(start_paused = true)]
async fn partial_failures_are_retried_without_reordering_a_key() {
    for aggregation in [false, true] {
        let k = stream(4);
        // Reject about a third of the entries of the first 40 calls, pseudo-randomly.
        let api = Scripted::new(&k, |call, e| {
            call < 40 && (hash_key(&e.partition_key) as usize + call * 7 + e.data.len()) % 3 == 0
        });
        let producer = Producer::builder(api.clone(), "s")
            .aggregation(aggregation)
            .max_aggregate_bytes(2_000)
            .max_batch_records(50)
            .max_buffered_records(400)
            .max_attempts(100)
            .build()
            .expect("valid");
        let keys = keys(25);
        for i in 0..120 {
            for key in &keys {
                producer
                    .put(key.clone(), payload(key, i))
                    .await
                    .expect("put");
            }
        }
        producer.close().await.expect("close");
        let calls = api.calls();
        let rejected = calls
            .iter()
            .enumerate()
            .flat_map(|(c, call)| call.iter().map(move |e| (c, e)))
            .filter(|(c, e)| (api.reject)(*c, e))
            .count();
        assert!(rejected > 20, "the script rejected {rejected} entries");
        // Every record exactly once, each key in put order.
        assert_eq!(
            stored_by_key(&k, "s").await,
            expected(&keys, 120),
            "aggregation {aggregation}"
        );
        assert_one_entry_per_key(&calls);
    }
}

#[tokio::test(start_paused = true)]
async fn whole_call_failures_are_retried_with_backoff() {
    let k = stream(2);
    k.faults()
        .inject(Fault::new(FaultKind::Throttle).on("put_records").times(3));
    let producer = Producer::builder(k.clone(), "s")
        .min_backoff(Duration::from_millis(100))
        .build()
        .expect("valid");
    for i in 0..10 {
        producer.put("a", payload("a", i)).await.expect("put");
    }
    let started = tokio::time::Instant::now();
    producer.flush().await.expect("flush");
    // 3 failed calls, then one record per call (one key): the backoff waited in between.
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(stored_by_key(&k, "s").await, expected(&["a".into()], 10));
}

#[tokio::test(start_paused = true)]
async fn a_key_that_keeps_failing_stays_buffered_first_in_line() {
    let k = stream(2);
    let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = healed.clone();
    let api = Scripted::new(&k, move |_, e| {
        !h.load(std::sync::atomic::Ordering::SeqCst) && e.partition_key == "bad"
    });
    let producer = Producer::builder(api.clone(), "s")
        .max_attempts(3)
        .min_backoff(Duration::from_millis(10))
        .build()
        .expect("valid");
    for i in 0..5 {
        producer.put("bad", payload("bad", i)).await.expect("put");
        producer.put("good", payload("good", i)).await.expect("put");
    }
    let err = producer.flush().await.expect_err("bad never gets through");
    let ProducerError::Unsent(unsent) = err else {
        panic!("unexpected {err:?}");
    };
    assert_eq!(unsent.count(), 5);
    assert!(unsent.records().is_empty());
    assert!(unsent
        .last_error()
        .is_some_and(|e| e.contains("ProvisionedThroughputExceededException")));
    // Only the first "bad" record was ever sent (3 times); "good" went through.
    let bad_sent: Vec<usize> = api
        .calls()
        .iter()
        .map(|c| c.iter().filter(|e| e.partition_key == "bad").count())
        .collect();
    assert_eq!(bad_sent.iter().sum::<usize>(), 3);
    assert_eq!(producer.buffered(), 5);
    let stored = stored_by_key(&k, "s").await;
    assert_eq!(stored.get("good").map(Vec::len), Some(5));
    assert!(!stored.contains_key("bad"));

    // Newer records of the key queue behind the old ones.
    for i in 5..8 {
        producer.put("bad", payload("bad", i)).await.expect("put");
    }
    healed.store(true, std::sync::atomic::Ordering::SeqCst);
    producer.flush().await.expect("healed");
    assert_eq!(
        stored_by_key(&k, "s").await.get("bad"),
        expected(&["bad".into()], 8).get("bad")
    );
    assert_eq!(producer.buffered(), 0);
}

#[tokio::test(start_paused = true)]
async fn close_returns_what_could_not_be_sent_in_put_order() {
    let k = stream(1);
    let api = Scripted::new(&k, |_, e| e.partition_key != "ok");
    let producer = Producer::builder(api, "s")
        .max_attempts(2)
        .min_backoff(Duration::from_millis(1))
        .max_backoff(Duration::from_millis(1))
        .build()
        .expect("valid");
    let other = producer.clone();
    producer.put("x", "1").await.expect("put");
    producer.put("ok", "2").await.expect("put");
    producer.put("y", "3").await.expect("put");
    producer.put("x", "4").await.expect("put");
    let err = producer.close().await.expect_err("x and y fail");
    let ProducerError::Unsent(unsent) = err else {
        panic!("unexpected {err:?}");
    };
    let back: Vec<(String, Bytes)> = unsent
        .into_records()
        .into_iter()
        .map(|r| (r.partition_key, r.data))
        .collect();
    assert_eq!(
        back,
        [
            ("x".to_owned(), Bytes::from("1")),
            ("y".to_owned(), Bytes::from("3")),
            ("x".to_owned(), Bytes::from("4")),
        ]
    );
    assert_eq!(k.record_count("s"), 1);
    // Every clone is closed; the record comes back.
    match other.put("z", "5").await {
        Err(ProducerError::Closed(r)) => assert_eq!(r.into_record().partition_key, "z"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_fatal_call_error_stops_the_flush_and_keeps_the_records() {
    let k = stream(1);
    k.faults()
        .inject(Fault::new(FaultKind::Fatal).on("put_records").times(1));
    let producer = Producer::new(k.clone(), "s");
    producer.put("a", "1").await.expect("put");
    match producer.flush().await {
        Err(ProducerError::Unsent(u)) => {
            assert_eq!(u.count(), 1);
            assert!(std::error::Error::source(&u).is_some());
        }
        other => panic!("unexpected {other:?}"),
    }
    producer.flush().await.expect("the fault is gone");
    assert_eq!(k.record_count("s"), 1);

    // A missing stream is not retryable either.
    let missing = Producer::new(k.clone(), "nope");
    missing.put("a", "1").await.expect("put");
    assert!(matches!(
        missing.flush().await,
        Err(ProducerError::Unsent(_))
    ));
    // Dropping it logs and flushes again in the background (and fails again): no panic.
    drop(missing);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn invalid_records_are_refused_and_returned() {
    let producer = Producer::new(stream(1), "s");
    let cases = [
        UserRecord::new("", "x"),
        UserRecord::new("k".repeat(257), "x"),
        UserRecord::new("k", vec![0u8; MAX_RECORD_BYTES]),
    ];
    for record in cases {
        match producer.put_record(record.clone()).await {
            Err(ProducerError::InvalidRecord(r)) => assert_eq!(r.into_record(), record),
            other => panic!("unexpected {other:?}"),
        }
    }
    // 256 characters (more bytes) and exactly 1 MiB are fine.
    let key = "é".repeat(256);
    producer
        .put(key.clone(), vec![0u8; MAX_RECORD_BYTES - key.len()])
        .await
        .expect("fits");
    assert_eq!(producer.buffered(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_buffer_flushes_and_then_pushes_back() {
    let k = stream(2);
    let producer = Producer::builder(k.clone(), "s")
        .max_buffered_records(10)
        .build()
        .expect("valid");
    for i in 0..25 {
        producer.put("a", payload("a", i)).await.expect("put");
    }
    assert_eq!(k.record_count("s"), 20);
    assert_eq!(producer.buffered(), 5);

    let never = Scripted::new(&k, |_, _| true);
    let producer = Producer::builder(never, "s")
        .max_buffered_records(2)
        .max_attempts(1)
        .build()
        .expect("valid");
    producer.put("a", "1").await.expect("put");
    producer.put("a", "2").await.expect("put");
    match producer.put("a", "3").await {
        Err(ProducerError::BufferFull(r)) => {
            assert!(std::error::Error::source(&r).is_some());
            assert_eq!(r.into_record().data, Bytes::from("3"));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(producer.buffered(), 2);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_last_handle_flushes_in_the_background() {
    let k = stream(2);
    let producer = Producer::builder(k.clone(), "s")
        .aggregation(true)
        .build()
        .expect("valid");
    let clone = producer.clone();
    for i in 0..50 {
        producer.put("a", payload("a", i)).await.expect("put");
    }
    drop(producer);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(k.record_count("s"), 0, "a clone is still alive");
    drop(clone);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(stored_by_key(&k, "s").await, expected(&["a".into()], 50));
}

#[test]
fn dropping_outside_a_runtime_does_not_panic() {
    let producer = Producer::new(stream(1), "s");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(producer.put("a", "1")).expect("put");
    drop(rt);
    drop(producer);
}

#[tokio::test(start_paused = true)]
async fn the_flush_interval_sends_without_being_asked() {
    let k = stream(1);
    let producer = Producer::builder(k.clone(), "s")
        .flush_interval(Duration::from_millis(100))
        .build()
        .expect("valid");
    producer.put("a", "1").await.expect("put");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(k.record_count("s"), 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(k.record_count("s"), 1);
    producer.close().await.expect("close");
}

#[test]
fn the_flush_interval_needs_a_runtime_and_settings_are_validated() {
    let err = Producer::builder(MemKinesis::new(), "s")
        .flush_interval(Duration::from_millis(100))
        .build()
        .expect_err("no runtime");
    assert_eq!(err.field(), "flush_interval");
    let invalid = [
        (
            "max_aggregate_bytes",
            Producer::builder(MemKinesis::new(), "s").max_aggregate_bytes(MAX_RECORD_BYTES + 1),
        ),
        (
            "max_batch_records",
            Producer::builder(MemKinesis::new(), "s").max_batch_records(501),
        ),
        (
            "max_batch_bytes",
            Producer::builder(MemKinesis::new(), "s").max_batch_bytes(0),
        ),
        (
            "max_attempts",
            Producer::builder(MemKinesis::new(), "s").max_attempts(0),
        ),
        (
            "min_backoff",
            Producer::builder(MemKinesis::new(), "s").min_backoff(Duration::from_secs(9)),
        ),
    ];
    for (field, builder) in invalid {
        assert_eq!(builder.build().expect_err(field).field(), field);
    }
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_flush_loses_nothing() {
    let k = stream(1);
    k.faults().inject(
        Fault::new(FaultKind::Latency(Duration::from_secs(10)))
            .on("put_records")
            .times(1),
    );
    let producer = Producer::new(k.clone(), "s");
    for i in 0..3 {
        producer.put("a", payload("a", i)).await.expect("put");
    }
    let cancelled = tokio::time::timeout(Duration::from_secs(1), producer.flush()).await;
    assert!(cancelled.is_err());
    assert_eq!(producer.buffered(), 3);
    producer.flush().await.expect("flush");
    assert_eq!(stored_by_key(&k, "s").await, expected(&["a".into()], 3));
}
