//! The adapter driven as a worker would (processor harness, paused time), and through a real
//! worker on the in-memory backends for the crash case.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::*;
use crate::processor::policy::{DeadLetterHandler, DeadLetterPolicy};
use crate::testkit::{ProcessorHarness, Stored};

type FailFn = dyn Fn(&str, u32) -> Option<ProcessorError> + Send + Sync;

/// Records starts and ends; sleeps per key; fails as told.
struct Probe {
    /// (key, n) in completion order.
    done: Mutex<Vec<(String, u64)>>,
    /// (key, n) in start order.
    started: Mutex<Vec<(String, u64)>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    running_keys: Mutex<HashMap<String, usize>>,
    same_key_overlap: AtomicBool,
    delay: Box<dyn Fn(&str) -> Duration + Send + Sync>,
    /// Given "key/n" and the attempt: an error to return.
    fail: Box<FailFn>,
    gate: Option<Arc<tokio::sync::Semaphore>>,
}

impl Probe {
    fn new(delay: impl Fn(&str) -> Duration + Send + Sync + 'static) -> Self {
        Self {
            done: Mutex::default(),
            started: Mutex::default(),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
            running_keys: Mutex::default(),
            same_key_overlap: AtomicBool::new(false),
            delay: Box::new(delay),
            fail: Box::new(|_, _| None),
            gate: None,
        }
    }

    fn failing(
        mut self,
        f: impl Fn(&str, u32) -> Option<ProcessorError> + Send + Sync + 'static,
    ) -> Self {
        self.fail = Box::new(f);
        self
    }

    fn done(&self) -> Vec<(String, u64)> {
        self.done.lock().unwrap().clone()
    }
}

fn parse(r: &Record) -> (String, u64) {
    let text = std::str::from_utf8(&r.data).unwrap();
    let (k, n) = text.split_once('/').unwrap();
    (k.to_owned(), n.parse().unwrap())
}

#[async_trait]
impl RecordHandler for Probe {
    async fn handle(&self, record: &Record, ctx: &RecordContext) -> Result<(), ProcessorError> {
        let (key, n) = parse(record);
        if let Some(gate) = &self.gate {
            let _ = gate.acquire().await.unwrap();
        }
        self.started.lock().unwrap().push((key.clone(), n));
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        {
            let mut keys = self.running_keys.lock().unwrap();
            let c = keys.entry(key.clone()).or_default();
            *c += 1;
            if *c > 1 {
                self.same_key_overlap.store(true, Ordering::SeqCst);
            }
        }
        tokio::time::sleep((self.delay)(&key)).await;
        *self.running_keys.lock().unwrap().get_mut(&key).unwrap() -= 1;
        self.running.fetch_sub(1, Ordering::SeqCst);
        if let Some(e) = (self.fail)(&format!("{key}/{n}"), ctx.attempt) {
            return Err(e);
        }
        self.done.lock().unwrap().push((key, n));
        Ok(())
    }
}

/// `count` records over `keys` keys, round robin from record `from`, payload "k{key}/{n}"
/// (n: per-key counter).
fn records_from<P: RecordProcessor>(
    h: &mut ProcessorHarness<P>,
    from: u64,
    count: u64,
    keys: u64,
) -> Vec<Record> {
    (from..from + count)
        .map(|i| {
            let key = format!("k{}", i % keys);
            h.record(&key, format!("{key}/{}", i / keys))
        })
        .collect()
}

fn records<P: RecordProcessor>(h: &mut ProcessorHarness<P>, count: u64, keys: u64) -> Vec<Record> {
    records_from(h, 0, count, keys)
}

/// Per key, the completion order is the production order, without gaps.
fn assert_in_order(done: &[(String, u64)]) {
    let mut next: HashMap<&str, u64> = HashMap::new();
    for (k, n) in done {
        let want = next.entry(k).or_default();
        assert_eq!(*n, *want, "key {k}: completed {n} while expecting {want}");
        *want += 1;
    }
}

fn adapter(probe: &Arc<Probe>) -> ParallelBuilder {
    OrderedParallel::builder(probe.clone()).checkpoint_every(Some(Duration::ZERO))
}

/// Waits (in paused time) until `f` holds.
async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..100_000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting for {what}");
}

fn checkpoints(stored: &[Stored]) -> Vec<ExtendedSequenceNumber> {
    stored
        .iter()
        .filter_map(|s| match s {
            Stored::Checkpoint(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn runs_keys_in_parallel_each_in_order_within_the_bound() {
    let probe = Arc::new(Probe::new(|key| {
        Duration::from_millis(1 + (key[1..].parse::<u64>().unwrap() % 7))
    }));
    let mut h = ProcessorHarness::new(adapter(&probe).concurrency(4).build().unwrap());
    h.initialize().await.unwrap();
    for i in 0..5 {
        let batch = records_from(&mut h, i * 40, 40, 10);
        h.process(batch).await.unwrap();
    }
    h.shard_end(Vec::new()).await.unwrap();
    assert_eq!(probe.done().len(), 200);
    assert_in_order(&probe.done());
    assert_eq!(probe.max_running.load(Ordering::SeqCst), 4);
    assert!(!probe.same_key_overlap.load(Ordering::SeqCst));
    assert_eq!(h.checkpoint().await, ExtendedSequenceNumber::ShardEnd);
}

#[tokio::test(start_paused = true)]
async fn process_records_returns_only_under_the_buffer_bound() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let mut probe = Probe::new(|_| Duration::ZERO);
    probe.gate = Some(gate.clone());
    let probe = Arc::new(probe);
    let mut h = ProcessorHarness::new(
        adapter(&probe)
            .concurrency(2)
            .max_buffered_records(8)
            .build()
            .unwrap(),
    );
    h.initialize().await.unwrap();
    let batch = records(&mut h, 8, 8);
    // At the bound: accepted, returns at once.
    h.process(batch).await.unwrap();
    assert_eq!(h.processor().unfinished(), 8);
    let batch = records_from(&mut h, 8, 4, 8);
    // Over it: waits until enough completed.
    let blocked = tokio::time::timeout(Duration::from_secs(60), h.process(batch)).await;
    assert!(blocked.is_err(), "returned with 12 unfinished records");
    gate.add_permits(1_000);
    until("all done", || probe.done().len() == 12).await;
    assert_in_order(&probe.done());
}

/// The planted-bug test: a checkpoint of the largest completed record instead of the
/// contiguous prefix fails here.
#[tokio::test(start_paused = true)]
async fn checkpoints_only_the_contiguous_completed_prefix() {
    let probe = Arc::new(Probe::new(|key| {
        if key == "k0" {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(1)
        }
    }));
    let mut h = ProcessorHarness::new(adapter(&probe).concurrency(8).build().unwrap());
    h.initialize().await.unwrap();
    let batch = records(&mut h, 16, 4);
    let first = batch[0].position();
    let second = batch[1].position();
    let last = batch[15].position();
    h.process(batch).await.unwrap();
    until("the fast keys", || probe.done().len() == 12).await;
    h.idle().await.unwrap();
    // k0's first record runs for 10 s: nothing may be covered.
    assert_eq!(h.processor().completed_through(), None);
    assert!(checkpoints(&h.stored()).is_empty(), "{:?}", h.stored());
    assert_eq!(h.checkpointer().last_processed(), None);
    until("k0/0", || {
        probe.done().iter().any(|(k, n)| k == "k0" && *n == 0)
    })
    .await;
    h.idle().await.unwrap();
    // k0/0 done, k0/1 (record 4) still running: the prefix is records 0..=3.
    let through = h.processor().completed_through().unwrap();
    assert!(through >= first && through > second && through < last);
    until("all", || probe.done().len() == 16).await;
    h.idle().await.unwrap();
    assert_eq!(h.checkpoint().await, last);
    // Every stored checkpoint: at most the prefix of what had completed.
    let cps = checkpoints(&h.stored());
    assert!(cps.windows(2).all(|w| w[0] < w[1]), "{cps:?}");
}

#[tokio::test(start_paused = true)]
async fn a_failing_record_blocks_its_key_and_the_prefix_only() {
    let probe = Arc::new(
        Probe::new(|_| Duration::from_millis(1)).failing(|id, attempt| {
            (id == "k0/0" && attempt <= 3).then(|| ProcessorError::retryable("downstream"))
        }),
    );
    let policy = ErrorPolicy::Retry {
        min_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(1),
    };
    let mut h = ProcessorHarness::new(
        adapter(&probe)
            .concurrency(4)
            .error_policy(policy)
            .build()
            .unwrap(),
    );
    h.initialize().await.unwrap();
    let batch = records(&mut h, 12, 3);
    h.process(batch).await.unwrap();
    // The other keys finish; k0 waits behind its first record.
    until("k1 and k2", || probe.done().len() == 8).await;
    assert!(probe.done().iter().all(|(k, _)| k != "k0"));
    h.idle().await.unwrap();
    assert!(checkpoints(&h.stored()).is_empty());
    // Fourth attempt succeeds, then k0's others, in order.
    until("all", || probe.done().len() == 12).await;
    assert_in_order(&probe.done());
    let started = probe.started.lock().unwrap().clone();
    let k0: Vec<u64> = started
        .iter()
        .filter(|(k, _)| k == "k0")
        .map(|(_, n)| *n)
        .collect();
    assert_eq!(k0, vec![0, 0, 0, 0, 1, 2, 3]);
    h.idle().await.unwrap();
    assert_eq!(h.processor().unfinished(), 0);
}

struct Letters(Mutex<Vec<(String, u32)>>, AtomicUsize);

#[async_trait]
impl DeadLetterHandler for Arc<Letters> {
    async fn handle(&self, letter: &DeadLetter<'_>) -> Result<(), crate::error::BoxError> {
        // The first hand-over fails: retried.
        if self.1.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err("dead-letter queue unavailable".into());
        }
        assert_eq!(letter.records.len(), 1);
        let (k, n) = parse(&letter.records[0]);
        self.0
            .lock()
            .unwrap()
            .push((format!("{k}/{n}"), letter.attempts));
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn retried_then_dead_lettered_then_its_key_goes_on() {
    let probe = Arc::new(
        Probe::new(|_| Duration::from_millis(1))
            .failing(|id, _| (id == "k1/0").then(|| ProcessorError::retryable("poison"))),
    );
    let letters = Arc::new(Letters(Mutex::default(), AtomicUsize::new(0)));
    let policy = ErrorPolicy::DeadLetter(
        DeadLetterPolicy::new(letters.clone())
            .attempts(3)
            .delays(Duration::from_millis(100), Duration::from_millis(100)),
    );
    let mut h = ProcessorHarness::new(
        adapter(&probe)
            .concurrency(4)
            .error_policy(policy)
            .build()
            .unwrap(),
    );
    h.initialize().await.unwrap();
    let batch = records(&mut h, 6, 2);
    let last = batch[5].position();
    h.process(batch).await.unwrap();
    until("the rest", || probe.done().len() == 5).await;
    assert_eq!(*letters.0.lock().unwrap(), vec![("k1/0".to_owned(), 3)]);
    // k1's later records ran after the letter was taken, in order.
    let k1: Vec<u64> = probe
        .done()
        .iter()
        .filter(|(k, _)| k == "k1")
        .map(|(_, n)| *n)
        .collect();
    assert_eq!(k1, vec![1, 2]);
    h.idle().await.unwrap();
    assert_eq!(h.checkpoint().await, last);
}

#[tokio::test(start_paused = true)]
async fn a_stop_fails_the_next_callback_and_keeps_the_prefix() {
    let probe = Arc::new(
        Probe::new(|_| Duration::from_millis(1))
            .failing(|id, _| (id == "k1/1").then(|| ProcessorError::fatal("bad record"))),
    );
    let mut h = ProcessorHarness::new(adapter(&probe).concurrency(2).build().unwrap());
    h.initialize().await.unwrap();
    let batch = records(&mut h, 6, 2);
    let before = batch[2].position(); // k0/1: the last record before k1/1
    h.process(batch).await.unwrap();
    until("the failure", || probe.done().len() >= 3).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = h.idle().await.unwrap_err();
    assert!(!err.is_retryable());
    let more = records_from(&mut h, 6, 1, 2);
    assert!(h.process(more).await.is_err());
    // The worker then stops the shard: shutdown_requested checkpoints the prefix.
    h.shutdown().await.unwrap();
    assert_eq!(h.checkpoint().await, before);
}

#[tokio::test(start_paused = true)]
async fn shutdown_finishes_the_accepted_records_within_the_drain_timeout() {
    for (drain, done, started, through) in [(5_000, 6, 6, 5), (1_500, 2, 4, 1)] {
        let probe = Arc::new(Probe::new(|_| Duration::from_secs(1)));
        let mut h = ProcessorHarness::new(
            adapter(&probe)
                .concurrency(2)
                .drain_timeout(Duration::from_millis(drain))
                .build()
                .unwrap(),
        );
        h.initialize().await.unwrap();
        let batch = records(&mut h, 6, 6);
        let want = batch[through].position();
        h.process(batch).await.unwrap();
        h.shutdown().await.unwrap();
        assert_eq!(probe.done().len(), done, "drain {drain} ms");
        assert_eq!(h.checkpoint().await, want, "drain {drain} ms");
        tokio::time::sleep(Duration::from_secs(10)).await;
        // Abandoned at the timeout: nothing starts or completes afterwards.
        assert_eq!(
            probe.started.lock().unwrap().len(),
            started,
            "drain {drain} ms"
        );
        assert_eq!(probe.done().len(), done, "drain {drain} ms");
    }
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_abandons_everything_without_a_checkpoint() {
    let probe = Arc::new(Probe::new(|_| Duration::from_secs(1)));
    let mut h = ProcessorHarness::new(adapter(&probe).concurrency(2).build().unwrap());
    h.initialize().await.unwrap();
    let batch = records(&mut h, 4, 4);
    h.process(batch).await.unwrap();
    h.lose_lease().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(probe.done().is_empty());
    assert!(h.stored().is_empty());
}

#[test]
fn settings_are_validated() {
    let probe = Arc::new(Probe::new(|_| Duration::ZERO));
    let b = || OrderedParallel::builder(probe.clone());
    assert_eq!(
        b().concurrency(0).build().unwrap_err().field(),
        "concurrency"
    );
    assert_eq!(
        b().concurrency(8)
            .max_buffered_records(7)
            .build()
            .unwrap_err()
            .field(),
        "max_buffered_records"
    );
    assert_eq!(
        b().tick(Duration::ZERO).build().unwrap_err().field(),
        "tick"
    );
    assert!(b().concurrency(5_000).build().is_ok());
    assert_eq!(
        retry_delay(&ErrorPolicy::default(), 1),
        Duration::from_millis(100)
    );
    assert_eq!(
        retry_delay(&ErrorPolicy::default(), 3),
        Duration::from_millis(400)
    );
    assert_eq!(
        retry_delay(&ErrorPolicy::default(), 99),
        Duration::from_secs(30)
    );
}

/// A worker on the in-memory backends stops dead (its task aborted, no shutdown) while one
/// record runs long: a new worker resumes at that record, the oldest unfinished one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_redelivers_from_the_oldest_unfinished_record() {
    use crate::testkit::MemBackends;
    use crate::Worker;

    let backends = MemBackends::new();
    backends.kinesis().create_stream("s", 1);
    for i in 0..60u64 {
        let key = format!("k{}", i % 6);
        backends
            .kinesis()
            .put("s", &key, format!("{key}/{}", i / 6));
    }
    // k3/2 (record 15) never finishes in the first worker.
    let first = Arc::new(Probe::new(|_| Duration::from_millis(5)).failing(|_, _| None));
    let stuck = Arc::new(StuckOn("k3/2", first.clone()));
    let worker = |name: &str, factory: ParallelFactory| {
        Worker::builder()
            .application_name("crash")
            .stream("s")
            .worker_id(name)
            .backends(backends.clone())
            .lease_duration(Duration::from_secs(2))
            .taker_interval(Duration::from_millis(100))
            .processor(factory)
            .build()
            .unwrap()
    };
    let f1 = OrderedParallel::builder(stuck.clone())
        .concurrency(8)
        .checkpoint_every(Some(Duration::ZERO))
        .tick(Duration::from_millis(50))
        .factory()
        .unwrap();
    let run1 = tokio::spawn(worker("w1", f1).run());
    tokio::time::timeout(Duration::from_secs(20), async {
        // k3/2 and k3's later records (8) wait.
        while first.done().len() < 52 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("52 records completed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The checkpoint stops right before k3/2.
    let lease = backends.leases().leases()[0].clone();
    run1.abort();
    let _ = run1.await;
    let before = lease.checkpoint.clone();
    assert_ne!(before, ExtendedSequenceNumber::TrimHorizon);

    // Second worker, after the first one's lease expired: its first record is k3/2.
    let second = Arc::new(Probe::new(|_| Duration::from_millis(1)));
    let f2 = OrderedParallel::builder(second.clone())
        .concurrency(8)
        .factory()
        .unwrap();
    let w2 = worker("w2", f2);
    let stop = w2.shutdown_handle();
    let run2 = tokio::spawn(w2.run());
    tokio::time::timeout(Duration::from_secs(20), async {
        while second.started.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("re-delivery");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.shutdown();
    run2.await.unwrap().unwrap();
    let started = second.started.lock().unwrap().clone();
    assert_eq!(started[0], ("k3".to_owned(), 2), "{started:?}");
    // Re-delivered: k3/2 and everything after it (45 records), nothing before it.
    assert_eq!(started.len(), 45, "{started:?}");
}

/// Delegates to a probe, except one record that never finishes.
struct StuckOn(&'static str, Arc<Probe>);

#[async_trait]
impl RecordHandler for StuckOn {
    async fn handle(&self, record: &Record, ctx: &RecordContext) -> Result<(), ProcessorError> {
        let (k, n) = parse(record);
        if format!("{k}/{n}") == self.0 {
            std::future::pending::<()>().await;
        }
        self.1.handle(record, ctx).await
    }
}
