//! `#[kcl::handler]` processors on the in-memory backends: every record handled once and
//! checkpointed; a handler error retried from the record that failed; a record that does not
//! decode stops the shard after the records before it, checkpointed just before it, and
//! reaches a dead-letter callback with its position.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kcl::service::DecodeError;
use kcl::testkit::MemBackends;
use kcl::{ErrorPolicy, ExtendedSequenceNumber, ProcessorFactory, Record, SequenceNumber, Worker};

#[derive(serde::Deserialize, Debug)]
struct Order {
    id: u64,
}

const STREAM: &str = "orders";

fn order(id: u64) -> String {
    format!(r#"{{"id": {id}, "item": "thing {id}"}}"#)
}

/// One shard holding `payloads`, in order; their sequence numbers.
fn stream_with(payloads: &[&str]) -> (MemBackends, Vec<SequenceNumber>) {
    let backends = MemBackends::new();
    backends.kinesis().create_stream(STREAM, 1);
    let seqs = payloads
        .iter()
        .map(|p| backends.kinesis().put(STREAM, "key", p.to_string()).1)
        .collect();
    (backends, seqs)
}

fn retry_fast() -> ErrorPolicy {
    ErrorPolicy::Retry {
        min_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
    }
}

/// Runs a worker with `factory` until `done()` holds (10 s at most), then stops it gracefully.
async fn run_until(
    backends: &MemBackends,
    factory: impl ProcessorFactory,
    policy: ErrorPolicy,
    done: impl Fn(&MemBackends) -> bool,
) {
    let worker = Worker::builder()
        .application_name("app")
        .stream(STREAM)
        .backends(backends.clone())
        .error_policy(policy)
        .processor(factory)
        .build()
        .expect("valid");
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done(backends) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the condition did not hold within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.shutdown();
    running.await.expect("no panic").expect("the worker ran");
}

/// The checkpoint of the stream's one lease (`TRIM_HORIZON` until the lease exists).
fn checkpoint(backends: &MemBackends) -> ExtendedSequenceNumber {
    let leases = backends.leases().leases();
    assert!(leases.len() <= 1, "{leases:?}");
    leases
        .first()
        .map_or(ExtendedSequenceNumber::TrimHorizon, |l| {
            l.checkpoint.clone()
        })
}

fn at(seq: &SequenceNumber) -> ExtendedSequenceNumber {
    ExtendedSequenceNumber::at(seq.clone(), 0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

static PER_RECORD: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());

#[kcl::handler]
async fn per_record(order: Order, record: &Record) -> Result<(), std::io::Error> {
    lock(&PER_RECORD).push((order.id, record.sequence_number.to_string()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_is_handled_once_and_checkpointed() {
    let (backends, seqs) = stream_with(&[&order(1), &order(2), &order(3)]);
    run_until(&backends, per_record::factory(), retry_fast(), |b| {
        lock(&PER_RECORD).len() == 3 && checkpoint(b) == at(&seqs[2])
    })
    .await;
    let handled = lock(&PER_RECORD).clone();
    let expected: Vec<(u64, String)> = (1..=3).zip(seqs.iter().map(|s| s.to_string())).collect();
    assert_eq!(handled, expected);
}

static FLAKY: Mutex<(Vec<u64>, bool)> = Mutex::new((Vec::new(), false));

/// Fails once on order 2.
#[kcl::handler(json)]
async fn flaky(order: Order) -> Result<(), String> {
    let mut state = lock(&FLAKY);
    state.0.push(order.id);
    if order.id == 2 && !state.1 {
        state.1 = true;
        return Err("downstream unavailable".into());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_error_is_retried_from_the_record_that_failed() {
    let (backends, seqs) = stream_with(&[&order(1), &order(2), &order(3)]);
    run_until(&backends, flaky::factory(), retry_fast(), |b| {
        checkpoint(b) == at(&seqs[2])
    })
    .await;
    // Order 1 was handled once: the retry started at order 2.
    assert_eq!(lock(&FLAKY).0, [1, 2, 2, 3]);
}

static BEFORE_BAD: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[kcl::handler]
async fn before_bad(order: Order) {
    lock(&BEFORE_BAD).push(order.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_does_not_decode_stops_the_shard_checkpointed_before_it() {
    let (backends, seqs) = stream_with(&[&order(1), &order(2), "{not json", &order(4)]);
    // The default policy: fatal errors stop the shard, and its lease is released.
    run_until(&backends, before_bad::factory(), retry_fast(), |b| {
        b.leases()
            .leases()
            .first()
            .is_some_and(|l| l.owner.is_none())
            && checkpoint(b) == at(&seqs[1])
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*lock(&BEFORE_BAD), [1, 2], "nothing after the bad record");
    assert_eq!(checkpoint(&backends), at(&seqs[1]));
}

static BATCHES: Mutex<Vec<(Vec<u64>, Vec<String>)>> = Mutex::new(Vec::new());

#[kcl::handler]
async fn batches(orders: &[Order], records: &[Record]) -> anyhow_like::Result {
    lock(&BATCHES).push((
        orders.iter().map(|o| o.id).collect(),
        records
            .iter()
            .map(|r| r.sequence_number.to_string())
            .collect(),
    ));
    Ok(())
}

/// A `Result` alias with another error type, as `anyhow::Result<()>` would be.
mod anyhow_like {
    pub type Result = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_handler_gets_the_records_before_one_that_does_not_decode() {
    // One batch: everything is in the stream before the worker starts.
    let (backends, seqs) = stream_with(&[&order(1), &order(2), "[]", &order(4)]);
    type Dead = (
        Vec<ExtendedSequenceNumber>,
        String,
        ExtendedSequenceNumber,
        String,
        Option<ExtendedSequenceNumber>,
    );
    let dead: Arc<Mutex<Vec<Dead>>> = Arc::default();
    let policy = ErrorPolicy::handoff({
        let dead = dead.clone();
        move |batch, e| {
            let bad = std::error::Error::source(e)
                .and_then(|s| s.downcast_ref::<DecodeError>())
                .expect("a DecodeError");
            lock(&dead).push((
                batch.iter().map(Record::position).collect(),
                bad.shard_id().to_string(),
                bad.position().clone(),
                bad.partition_key().to_owned(),
                bad.handled().cloned(),
            ));
        }
    });
    run_until(&backends, batches::factory(), policy, |_| {
        !lock(&dead).is_empty()
    })
    .await;
    let seq = |i: usize| seqs[i].to_string();
    assert_eq!(*lock(&BATCHES), [(vec![1, 2], vec![seq(0), seq(1)])]);
    let dead = lock(&dead).clone();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let (batch, shard, position, key, handled) = &dead[0];
    assert_eq!((position, key.as_str()), (&at(&seqs[2]), "key"));
    // The callback gets the whole batch: the bad record and the one after it, not handled.
    assert!(batch.ends_with(&[at(&seqs[2]), at(&seqs[3])]), "{batch:?}");
    assert!(shard.starts_with("shardId-"), "{shard}");
    assert_eq!(handled.as_ref(), Some(&at(&seqs[1])));
    // The callback took the batch: it counts as processed, and the graceful stop
    // (shutdown_requested) checkpointed it.
    assert_eq!(checkpoint(&backends), at(&seqs[3]));
}

static RAW: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

#[kcl::handler]
async fn raw(data: &[u8]) {
    lock(&RAW).push(data.to_vec());
}

static TEXT: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[kcl::handler(text)]
async fn text(lines: Vec<String>) {
    lock(&TEXT).extend(lines);
}

fn stream_of_bytes(payloads: &[&[u8]]) -> (MemBackends, Vec<SequenceNumber>) {
    let backends = MemBackends::new();
    backends.kinesis().create_stream(STREAM, 1);
    let seqs = payloads
        .iter()
        .map(|p| backends.kinesis().put(STREAM, "k", p.to_vec()).1)
        .collect();
    (backends, seqs)
}

const PAYLOADS: [&[u8]; 3] = [b"caf\xc3\xa9", b"\xff\xfe", b"after"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_are_handed_over_as_they_are() {
    let (backends, seqs) = stream_of_bytes(&PAYLOADS);
    run_until(&backends, raw::factory(), retry_fast(), |b| {
        checkpoint(b) == at(&seqs[2])
    })
    .await;
    assert_eq!(*lock(&RAW), PAYLOADS.map(<[u8]>::to_vec));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_stops_at_invalid_utf8() {
    let (backends, seqs) = stream_of_bytes(&PAYLOADS);
    run_until(&backends, text::factory(), retry_fast(), |b| {
        checkpoint(b) == at(&seqs[0])
            && b.leases()
                .leases()
                .first()
                .is_some_and(|l| l.owner.is_none())
    })
    .await;
    assert_eq!(*lock(&TEXT), ["café"]);
    assert_eq!(checkpoint(&backends), at(&seqs[0]));
}
