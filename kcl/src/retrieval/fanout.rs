//! Enhanced fan-out retrieval: a task per shard holds a `SubscribeToShard` subscription and
//! fills the same bounded prefetch queue as polling ([`super::polling`]), with the same
//! contract ([`Fetched`]), so the consumer does not know which one feeds it.
//!
//! **Positions.** The first subscription starts at the position it is given (a checkpoint
//! resumes *at* the checkpointed record). Records come as read, KPL aggregates included: the
//! consumer deaggregates them and drops what the checkpoint already covers, as with polling.
//! Every event carries a `ContinuationSequenceNumber`; the next subscription starts
//! `AFTER_SEQUENCE_NUMBER` the last one received (as the Java KCL does), and records at or
//! before the last one delivered are dropped, so a resubscription neither loses nor repeats a
//! record.
//!
//! **Resubscribing.** Kinesis ends every subscription after 5 minutes: the subscriber then
//! subscribes again at once. A subscription that cannot be made, breaks, ends without an event
//! or goes quiet for [`EVENT_TIMEOUT`] is made again after a jittered exponential backoff
//! (100 ms doubling to 10 s, reset by every event). That includes `ResourceInUseException`,
//! which Kinesis returns to a `SubscribeToShard` made within 5 s of the previous successful one
//! for the same consumer and shard (so a subscription that broke at once is retried until those
//! 5 s have passed), and `LimitExceededException` (one call per second per consumer and shard).
//! Errors that are not retryable (the shard does not exist, access denied) end the task with
//! [`Fetched::Failed`].
//!
//! **A deregistered stream consumer is registered again.** `ResourceNotFoundException` names
//! either the stream consumer or the shard. The subscriber asks for an iterator of the shard (a
//! call limited per shard, unlike `ListShards`, whose 100 calls/s per stream every subscriber
//! of a large stream would share at once): if the shard exists, the consumer was deregistered
//! (by an operator or a script), and it registers it again ([`StreamConsumer::reregister`],
//! once for all the subscribers sharing the handle) and subscribes with the new ARN. If the
//! shard is gone, the shard is reported gone, as before. A consumer that is still not found
//! after [`MAX_REREGISTRATIONS`] registrations in a row is reported as not found.
//!
//! **Back-pressure.** The task takes the next event from the subscription only once the
//! previous event's records are in the queue (a free slot in the bounded channel), and only
//! while this subscriber holds less than its fair share of the worker's [`PrefetchBudget`] and
//! the budget is not over its total. Events are pushed, of sizes not known in advance, so room
//! cannot be reserved before one is taken: its records are counted once it is here (over the
//! total if there is no room, which then holds every other reader back until enough is
//! released). Meanwhile unread events wait in the connection's HTTP/2 flow-control window,
//! which stops Kinesis from pushing more. A subscriber therefore holds at most its share of the
//! budget plus one event, and at most `prefetch_batches` batches, as a polling fetcher holds at
//! most its share plus one call.
//!
//! **Shard end.** The last event of a closed shard has no continuation sequence number and
//! lists the child shards: the task sends [`Fetched::ShardEnd`] with them and stops.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::BackoffBuilder;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::kinesis::SubscriptionEvent;
use super::polling::{latest_at, Fetched, PrefetchBudget, Reader, Reading};
use super::{restart_position, IteratorPosition, KinesisApi, KinesisApiError};
use crate::config::{PollingConfig, Retrieval, WorkerConfig};
use crate::record::{Record, SequenceNumber};
use crate::shard::ShardId;

/// A `SubscribeToShard` call that has not answered after this long is abandoned and retried.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);
/// A subscription with no event for this long is dropped and made again (Kinesis sends an
/// event at least every few seconds, with no records if there are none: a longer silence is a
/// dead connection).
const EVENT_TIMEOUT: Duration = Duration::from_secs(35);
/// The longest pause between two subscription attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Registrations of the stream consumer in a row (without an event between them) after which
/// a subscriber gives up and reports the consumer as not found.
const MAX_REREGISTRATIONS: u32 = 3;

/// The enhanced fan-out stream consumer subscribers read through: its current ARN, and what it
/// takes to register it again if it is deregistered. One handle can be shared by every
/// subscriber of a worker: the first that finds the consumer gone registers it again, the
/// others then use the new ARN without registering.
#[derive(Debug)]
pub(crate) struct StreamConsumer {
    stream: String,
    name: String,
    arn: std::sync::Mutex<String>,
    /// Held while registering, so that subscribers finding the consumer gone at the same time
    /// register it once.
    registering: tokio::sync::Mutex<()>,
}

impl StreamConsumer {
    /// The consumer `name` of `stream`, registered as `arn`.
    pub(crate) fn new(stream: String, name: String, arn: String) -> Arc<Self> {
        Arc::new(Self {
            stream,
            name,
            arn: std::sync::Mutex::new(arn),
            registering: tokio::sync::Mutex::new(()),
        })
    }

    /// The worker's stream consumer (`config.retrieval` names it), registered as `arn`.
    pub(crate) fn of(config: &WorkerConfig, arn: &str) -> Arc<Self> {
        let name = match &config.retrieval {
            Retrieval::FanOut { consumer_name } => consumer_name.clone(),
            // Not a fan-out worker: nothing to register again (a registration would fail).
            _ => String::new(),
        };
        Self::new(config.stream.clone(), name, arn.to_owned())
    }

    /// The current ARN.
    pub(crate) fn arn(&self) -> String {
        self.arn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Registers the consumer again (`RegisterStreamConsumer` is idempotent: it finds the
    /// consumer or registers it, and waits until it is `ACTIVE`), unless another subscriber
    /// already did since `stale` was read; returns the ARN to subscribe with.
    pub(crate) async fn reregister(
        &self,
        kinesis: &dyn KinesisApi,
        stale: &str,
    ) -> Result<String, KinesisApiError> {
        let _one = self.registering.lock().await;
        let current = self.arn();
        if current != stale {
            return Ok(current);
        }
        let arn = kinesis
            .register_stream_consumer(&self.stream, &self.name)
            .await?;
        *self.arn.lock().unwrap_or_else(|p| p.into_inner()) = arn.clone();
        Ok(arn)
    }
}

/// What a subscriber does after Kinesis said its stream consumer or its shard does not exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterNotFound {
    /// The shard exists: the consumer was deregistered. Register it again and resubscribe.
    Reregister,
    /// The shard could not be looked up (throttled, unavailable): try again after a pause.
    Retry,
    /// Report the error as it is: the shard is gone, or the consumer cannot be kept registered.
    Report,
}

/// The decision after a `ResourceNotFoundException`: `shard` is the outcome of looking the
/// shard up; `reregistered` counts the registrations in a row without an event since.
fn after_not_found(shard: Result<(), &KinesisApiError>, reregistered: u32) -> AfterNotFound {
    match shard {
        Ok(()) if reregistered >= MAX_REREGISTRATIONS => AfterNotFound::Report,
        Ok(()) => AfterNotFound::Reregister,
        Err(e) if e.is_retryable() => AfterNotFound::Retry,
        // Gone (not found), or the lookup itself is refused: reported as before.
        Err(_) => AfterNotFound::Report,
    }
}

/// Starts the subscriber task for `shard` with the registered stream `consumer` (registered
/// again if it is deregistered meanwhile), from `position`. Returns the receiving end of the prefetch queue (`cfg.prefetch_batches`
/// batches, bytes from `budget`), with the contract of `polling::spawn_fetcher`: records come
/// as read (KPL aggregates included; the consumer deaggregates them and drops what the
/// checkpoint covers). The task stops when `stop` is cancelled, the receiver is dropped, the
/// shard ends or an error is not retryable.
// Each input is distinct (the fetcher and the subscriber take the same ones).
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn_subscriber(
    kinesis: Arc<dyn KinesisApi>,
    consumer: Arc<StreamConsumer>,
    shard: ShardId,
    position: IteratorPosition,
    cfg: PollingConfig,
    budget: Arc<PrefetchBudget>,
    metrics: Arc<crate::metrics::ShardMetrics>,
    stop: CancellationToken,
) -> Reading {
    let (tx, rx) = mpsc::channel(cfg.prefetch_batches);
    let latest_at = latest_at(kinesis.as_ref(), &position);
    let subscriber = Subscriber {
        kinesis,
        consumer_arn: consumer.arn(),
        consumer,
        reregistered: 0,
        shard,
        reader: budget.reader(),
        position,
        latest_at,
        last_read: None,
        metrics,
    };
    tokio::spawn(async move {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {}
            _ = subscriber.run(tx) => {}
        }
    });
    Reading {
        records: rx,
        latest_at,
    }
}

struct Subscriber {
    kinesis: Arc<dyn KinesisApi>,
    consumer: Arc<StreamConsumer>,
    /// The ARN this subscriber subscribes with.
    consumer_arn: String,
    /// Registrations of the consumer in a row, without an event since.
    reregistered: u32,
    shard: ShardId,
    /// This subscriber's place in the worker's prefetch budget.
    reader: Reader,
    /// Where the next subscription starts: the initial position, then after the last
    /// continuation sequence number received. A `LATEST` is asked for once: the subscriptions
    /// made again before an event came start `AT_TIMESTAMP` the moment it was first asked for
    /// (less a margin), not at a later `LATEST` that would skip what came in between.
    position: IteratorPosition,
    /// Started at `LATEST`: the stream's time right before the first subscription.
    latest_at: Option<SystemTime>,
    /// The last (outer) record delivered: records at or before it are dropped (a resubscription
    /// that repeats them).
    last_read: Option<SequenceNumber>,
    /// The shard's metric handles.
    metrics: Arc<crate::metrics::ShardMetrics>,
}

/// How one subscription ended.
enum Ended {
    /// Its stream ended after delivering events (the 5-minute limit): subscribe again at once.
    Expired,
    /// It could not be made, broke, ended without an event or went quiet: subscribe again
    /// after a backoff.
    Retry(KinesisApiError),
    /// The shard ended, the receiver is gone, or an error that is not retryable was reported.
    Stop,
}

impl Subscriber {
    fn backoff(&self) -> impl Iterator<Item = Duration> {
        let seed = crate::backoff::seed(&[&self.consumer_arn, self.shard.as_str()]);
        crate::backoff::exponential(Duration::from_millis(100), MAX_BACKOFF, seed).build()
    }

    async fn run(mut self, tx: mpsc::Sender<Fetched>) {
        let mut delays = self.backoff();
        loop {
            let (ended, had_events) = self.subscription(&tx).await;
            if had_events {
                delays = self.backoff();
                self.reregistered = 0;
            }
            match ended {
                Ended::Stop => return,
                Ended::Expired => {
                    debug!(shard = %self.shard, position = ?self.position, "subscription ended; resubscribing");
                }
                Ended::Retry(e) => {
                    if matches!(e, KinesisApiError::Throttled(_)) {
                        self.metrics.read_throttled();
                    } else {
                        self.metrics.read_error();
                    }
                    let d = delays.next().unwrap_or(MAX_BACKOFF);
                    debug!(shard = %self.shard, error = %e, delay = ?d, "subscription failed; resubscribing after a pause");
                    tokio::time::sleep(d).await;
                }
            }
        }
    }

    /// Makes one subscription and delivers its events until it ends. Also says whether it
    /// delivered any event.
    async fn subscription(&mut self, tx: &mpsc::Sender<Fetched>) -> (Ended, bool) {
        let position = self.position.clone();
        let call = self
            .kinesis
            .subscribe_to_shard(&self.consumer_arn, &self.shard, &position);
        // Until an event moves it to a continuation, any later subscription restarts where
        // this one starts, `LATEST` as of the first time it was asked for.
        self.position = restart_position(&self.position, self.latest_at);
        let result = tokio::time::timeout(SUBSCRIBE_TIMEOUT, call)
            .await
            .unwrap_or_else(|_| {
                Err(KinesisApiError::Transient(
                    "SubscribeToShard timed out".into(),
                ))
            });
        let mut events = match result {
            Ok(events) => events,
            Err(e) => return (self.failed(e, tx).await, false),
        };
        let mut had_events = false;
        loop {
            // The next event is taken only when this subscriber may hold more (its share of
            // the budget is not full and the budget is not over): meanwhile unread events
            // wait in the connection's flow-control window.
            self.reader.turn().await;
            let event = match tokio::time::timeout(EVENT_TIMEOUT, events.next()).await {
                Ok(Some(Ok(event))) => event,
                Ok(Some(Err(e))) => return (self.failed(e, tx).await, had_events),
                Ok(None) if had_events => return (Ended::Expired, true),
                Ok(None) => {
                    let e = "the subscription ended without an event";
                    return (Ended::Retry(KinesisApiError::Transient(e.into())), false);
                }
                Err(_) => {
                    let e = format!("no subscription event for {EVENT_TIMEOUT:?}");
                    return (
                        Ended::Retry(KinesisApiError::Transient(e.into())),
                        had_events,
                    );
                }
            };
            had_events = true;
            if !self.deliver(event, tx).await {
                return (Ended::Stop, true);
            }
        }
    }

    /// A retryable error is retried; a deregistered consumer is registered again; any other
    /// error is reported to the consumer and stops the task.
    async fn failed(&mut self, e: KinesisApiError, tx: &mpsc::Sender<Fetched>) -> Ended {
        if e.is_retryable() {
            return Ended::Retry(e);
        }
        let e = match e {
            KinesisApiError::NotFound(_) => match self.not_found(e).await {
                Ok(ended) => return ended,
                Err(e) => e,
            },
            e => e,
        };
        warn!(shard = %self.shard, error = %e, "SubscribeToShard failed");
        let _ = tx.send(Fetched::Failed(e)).await;
        Ended::Stop
    }

    /// After `ResourceNotFoundException`: if the shard exists, the stream consumer was
    /// deregistered: registers it again (or takes the ARN another subscriber registered) and
    /// subscribes again after the usual pause. Gives the error back when it is to be reported.
    async fn not_found(&mut self, e: KinesisApiError) -> Result<Ended, KinesisApiError> {
        // An iterator is asked for only to learn whether the shard exists (see the module's
        // documentation); it is not used.
        let shard = self
            .kinesis
            .get_shard_iterator(
                &self.consumer.stream,
                &self.shard,
                &IteratorPosition::TrimHorizon,
            )
            .await
            .map(|_| ());
        match after_not_found(shard.as_ref().map(|_| ()), self.reregistered) {
            AfterNotFound::Report => Err(e),
            AfterNotFound::Retry => Ok(Ended::Retry(match shard {
                Err(lookup) => lookup,
                Ok(()) => e,
            })),
            AfterNotFound::Reregister => {
                let stale = std::mem::take(&mut self.consumer_arn);
                match self
                    .consumer
                    .reregister(self.kinesis.as_ref(), &stale)
                    .await
                {
                    Ok(arn) => {
                        info!(shard = %self.shard, old = %stale, new = %arn, error = %e,
                            "the stream consumer was not found but the shard exists: it was deregistered; registered it again");
                        self.consumer_arn = arn;
                        self.reregistered += 1;
                        Ok(Ended::Retry(e))
                    }
                    Err(r) if r.is_retryable() => {
                        self.consumer_arn = stale;
                        Ok(Ended::Retry(r))
                    }
                    Err(r) => {
                        self.consumer_arn = stale;
                        warn!(shard = %self.shard, error = %r, "registering the stream consumer again failed");
                        Err(r)
                    }
                }
            }
        }
    }

    /// Queues the event's new records (waiting for budget and a free slot: the back-pressure),
    /// then moves the resume position to its continuation, or reports the shard's end. False
    /// once the task must stop.
    async fn deliver(&mut self, event: SubscriptionEvent, tx: &mpsc::Sender<Fetched>) -> bool {
        let records: Vec<Record> = event
            .records
            .into_iter()
            .filter(|r| self.last_read.as_ref() < Some(&r.sequence_number))
            .collect();
        if let Some(last) = records.last() {
            self.last_read = Some(last.sequence_number.clone());
            // Counted as it is: the event is in memory already (taken when there was room).
            let room = self.reader.hold(&records);
            let batch = Fetched::Records {
                records,
                millis_behind_latest: event.millis_behind_latest,
                room,
            };
            if tx.send(batch).await.is_err() {
                return false;
            }
        }
        match event.continuation_sequence_number {
            Some(continuation) => {
                self.position = IteratorPosition::AfterSequence(continuation);
                true
            }
            None => {
                let _ = tx
                    .send(Fetched::ShardEnd {
                        children: event.child_shards,
                    })
                    .await;
                false
            }
        }
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use bytes::Bytes;
    use tokio::time::Instant;

    use super::*;
    use crate::retrieval::kinesis::SubscriptionStream;
    use crate::retrieval::{GetRecordsOutput, ShardIterator};
    use crate::shard::Shard;
    use crate::testkit::{Fault, FaultKind, MemKinesis};

    /// [`MemKinesis`], counting the subscriptions made and refused and the events taken from
    /// them.
    #[derive(Debug, Clone, Default)]
    struct Counting {
        inner: MemKinesis,
        made: Arc<AtomicUsize>,
        refused: Arc<AtomicUsize>,
        registered: Arc<AtomicUsize>,
        events: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl KinesisApi for Counting {
        async fn list_shards(&self, stream: &str) -> Result<Vec<Shard>, KinesisApiError> {
            self.inner.list_shards(stream).await
        }

        async fn get_shard_iterator(
            &self,
            stream: &str,
            shard: &ShardId,
            position: &IteratorPosition,
        ) -> Result<ShardIterator, KinesisApiError> {
            self.inner.get_shard_iterator(stream, shard, position).await
        }

        async fn get_records(
            &self,
            iterator: &ShardIterator,
            limit: u32,
        ) -> Result<GetRecordsOutput, KinesisApiError> {
            self.inner.get_records(iterator, limit).await
        }

        async fn register_stream_consumer(
            &self,
            stream: &str,
            consumer_name: &str,
        ) -> Result<String, KinesisApiError> {
            self.registered.fetch_add(1, Ordering::SeqCst);
            self.inner
                .register_stream_consumer(stream, consumer_name)
                .await
        }

        fn now(&self) -> std::time::SystemTime {
            self.inner.now()
        }

        async fn subscribe_to_shard(
            &self,
            consumer_arn: &str,
            shard: &ShardId,
            position: &IteratorPosition,
        ) -> Result<SubscriptionStream, KinesisApiError> {
            match self
                .inner
                .subscribe_to_shard(consumer_arn, shard, position)
                .await
            {
                Ok(events) => {
                    self.made.fetch_add(1, Ordering::SeqCst);
                    let counter = self.events.clone();
                    Ok(Box::pin(events.inspect(move |_| {
                        counter.fetch_add(1, Ordering::SeqCst);
                    })))
                }
                Err(e) => {
                    self.refused.fetch_add(1, Ordering::SeqCst);
                    Err(e)
                }
            }
        }
    }

    struct Setup {
        kinesis: Counting,
        shard: ShardId,
        arn: String,
    }

    impl Setup {
        /// A handle on the consumer `app` of stream `s`.
        fn consumer(&self) -> Arc<StreamConsumer> {
            StreamConsumer::new("s".into(), "app".into(), self.arn.clone())
        }
    }

    async fn setup() -> Setup {
        let kinesis = Counting::default();
        kinesis.inner.create_stream("s", 1);
        let shard = kinesis.inner.open_shard_ids("s")[0].clone();
        let arn = kinesis
            .register_stream_consumer("s", "app")
            .await
            .expect("registered");
        Setup {
            kinesis,
            shard,
            arn,
        }
    }

    fn cfg(prefetch_batches: usize) -> PollingConfig {
        PollingConfig {
            prefetch_batches,
            ..PollingConfig::default()
        }
    }

    fn start(
        s: &Setup,
        position: IteratorPosition,
        prefetch_batches: usize,
        budget_bytes: usize,
    ) -> mpsc::Receiver<Fetched> {
        spawn_subscriber(
            Arc::new(s.kinesis.clone()),
            s.consumer(),
            s.shard.clone(),
            position,
            cfg(prefetch_batches),
            PrefetchBudget::new(budget_bytes),
            crate::metrics::ShardMetrics::detached(),
            CancellationToken::new(),
        )
        .records
    }

    /// Receives batches until `n` records arrived; panics on anything else.
    async fn take(rx: &mut mpsc::Receiver<Fetched>, n: usize) -> Vec<Record> {
        let mut out = Vec::new();
        while out.len() < n {
            match rx.recv().await {
                Some(Fetched::Records { records, .. }) => {
                    assert!(!records.is_empty(), "empty batch");
                    out.extend(records);
                }
                other => panic!("after {} records: unexpected {other:?}", out.len()),
            }
        }
        assert_eq!(out.len(), n, "more records than expected");
        out
    }

    fn data(records: &[Record]) -> Vec<String> {
        records
            .iter()
            .map(|r| String::from_utf8_lossy(&r.data).into_owned())
            .collect()
    }

    /// Puts `n` records named `{prefix}-{i}`, one every `every`, in a task.
    fn produce(k: &MemKinesis, prefix: &'static str, n: usize, every: Duration) {
        let k = k.clone();
        tokio::spawn(async move {
            for i in 0..n {
                tokio::time::sleep(every).await;
                k.put("s", "key", format!("{prefix}-{i}"));
            }
        });
    }

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}-{i}")).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn delivers_records_as_they_arrive_in_order() {
        let s = setup().await;
        for i in 0..3 {
            s.kinesis.inner.put("s", "key", format!("early-{i}"));
        }
        let mut rx = start(&s, IteratorPosition::TrimHorizon, 3, 1 << 20);
        produce(&s.kinesis.inner, "late", 20, Duration::from_millis(300));
        let got = take(&mut rx, 23).await;
        let mut want = names("early", 3);
        want.extend(names("late", 20));
        assert_eq!(data(&got), want);
        assert_eq!(s.kinesis.made.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn starts_at_the_position_given() {
        let s = setup().await;
        s.kinesis.inner.put("s", "key", "r-0");
        let (_, second) = s.kinesis.inner.put("s", "key", "r-1");
        s.kinesis.inner.put("s", "key", "r-2");
        // At a checkpoint: the checkpointed record comes again (the consumer drops what the
        // checkpoint covers, which inside a KPL aggregate is only some of its sub-records).
        let mut rx = start(&s, IteratorPosition::AtSequence(second.clone()), 3, 1 << 20);
        assert_eq!(data(&take(&mut rx, 2).await), ["r-1", "r-2"]);
        // After a sequence number (another consumer: one subscription per consumer and shard).
        let other = s
            .kinesis
            .register_stream_consumer("s", "other")
            .await
            .expect("registered");
        let mut rx = spawn_subscriber(
            Arc::new(s.kinesis.clone()),
            StreamConsumer::new("s".into(), "other".into(), other),
            s.shard.clone(),
            IteratorPosition::AfterSequence(second),
            cfg(3),
            PrefetchBudget::new(1 << 20),
            crate::metrics::ShardMetrics::detached(),
            CancellationToken::new(),
        )
        .records;
        assert_eq!(data(&take(&mut rx, 1).await), ["r-2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn resubscribes_after_the_five_minute_end_without_loss_or_duplicates() {
        let s = setup().await;
        let mut rx = start(&s, IteratorPosition::TrimHorizon, 3, 1 << 20);
        // 16 minutes of records, one every 7 s: the subscription ends 3 times meanwhile.
        let n = 16 * 60 / 7;
        produce(&s.kinesis.inner, "r", n, Duration::from_secs(7));
        let got = take(&mut rx, n).await;
        assert_eq!(data(&got), names("r", n));
        assert!(got
            .windows(2)
            .all(|w| w[0].sequence_number < w[1].sequence_number));
        assert!(s.kinesis.made.load(Ordering::SeqCst) >= 4);
        // Each resubscription came 5 minutes after the previous one: none was refused.
        assert_eq!(s.kinesis.refused.load(Ordering::SeqCst), 0);
        // Nothing more arrives (no duplicates) while the subscriptions go on.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_shard_ends_with_its_children() {
        let s = setup().await;
        let k = &s.kinesis.inner;
        for i in 0..5 {
            k.put("s", "key", format!("r-{i}"));
        }
        let mut rx = start(&s, IteratorPosition::TrimHorizon, 3, 1 << 20);
        assert_eq!(data(&take(&mut rx, 5).await), names("r", 5));
        // Closed while subscribed: the rest of the parent, then its end.
        k.put("s", "key", "r-5");
        let (lo, hi) = k.split("s", &s.shard, 1 << 127);
        k.put("s", "key", "child-0");
        assert_eq!(data(&take(&mut rx, 1).await), ["r-5"]);
        match rx.recv().await {
            Some(Fetched::ShardEnd { children }) => {
                let ids: Vec<_> = children.iter().map(|c| c.id.clone()).collect();
                assert_eq!(ids, [lo, hi]);
                assert!(children.iter().all(|c| c.parents == [s.shard.clone()]));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(rx.recv().await.is_none(), "the subscriber stops at the end");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_does_not_read_stops_the_subscription() {
        let s = setup().await;
        // 2 batches and a 4 KiB budget; 10 records of 1 KiB arrive every 100 ms for 10 s.
        let mut rx = start(&s, IteratorPosition::TrimHorizon, 2, 4 * 1024);
        let k = s.kinesis.inner.clone();
        tokio::spawn(async move {
            for round in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                for i in 0..10 {
                    let mut payload = format!("r-{}", round * 10 + i).into_bytes();
                    payload.resize(1024, b' ');
                    k.put("s", "key", Bytes::from(payload));
                }
            }
        });
        // Nobody reads for 10 minutes (the subscription expires meanwhile).
        tokio::time::sleep(Duration::from_secs(600)).await;
        let pulled = s.kinesis.events.load(Ordering::SeqCst);
        assert!(
            pulled <= 3,
            "{pulled} events taken while the queue was full"
        );
        // Then everything arrives, once, in order.
        let got = take(&mut rx, 1000).await;
        let want: Vec<String> = names("r", 1000);
        let got: Vec<String> = data(&got).iter().map(|d| d.trim_end().to_owned()).collect();
        assert_eq!(got, want);
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_subscription_is_made_again_after_backing_off_resource_in_use() {
        let s = setup().await;
        let k = &s.kinesis.inner;
        for i in 0..5 {
            k.put("s", "key", format!("r-{i}"));
        }
        let started = Instant::now();
        let mut rx = start(&s, IteratorPosition::TrimHorizon, 3, 1 << 20);
        let mut got = take(&mut rx, 5).await;
        // The next event breaks the connection; resubscribing within 5 s of the first
        // subscription is refused (ResourceInUseException) until the 5 s have passed.
        k.faults().inject(
            Fault::new(FaultKind::Transient)
                .on("subscription_event")
                .times(1),
        );
        for i in 5..10 {
            k.put("s", "key", format!("r-{i}"));
        }
        got.extend(take(&mut rx, 5).await);
        assert_eq!(data(&got), names("r", 10));
        assert!(started.elapsed() >= Duration::from_secs(5));
        assert!(started.elapsed() < Duration::from_secs(20));
        assert_eq!(s.kinesis.made.load(Ordering::SeqCst), 2);
        assert!(s.kinesis.refused.load(Ordering::SeqCst) >= 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscription_broken_before_its_first_event_restarts_where_latest_was() {
        let s = setup().await;
        let k = &s.kinesis.inner;
        k.put("s", "key", "old");
        tokio::time::advance(Duration::from_secs(10)).await;
        // The first event breaks the subscription: it is made again (after Kinesis' 5 s
        // guard) before any event arrived.
        k.faults().inject(
            Fault::new(FaultKind::Transient)
                .on("subscription_event")
                .times(1),
        );
        let t0 = k.now();
        let Reading {
            records: mut rx,
            latest_at,
        } = spawn_subscriber(
            Arc::new(s.kinesis.clone()),
            s.consumer(),
            s.shard.clone(),
            IteratorPosition::Latest,
            cfg(3),
            PrefetchBudget::new(1 << 20),
            crate::metrics::ShardMetrics::detached(),
            CancellationToken::new(),
        );
        assert_eq!(
            latest_at,
            Some(t0),
            "LATEST is the stream's time at the start"
        );
        // Written after the first subscription, carried by the event that broke it: a
        // resubscription at a fresh LATEST skipped it.
        tokio::time::sleep(Duration::from_secs(1)).await;
        k.put("s", "key", "new");
        let got = tokio::time::timeout(Duration::from_secs(60), take(&mut rx, 1)).await;
        // Back a second before t0 (clock skew), not to "old" (10 s before).
        assert_eq!(
            data(&got.expect("the record put after LATEST arrives")),
            ["new"]
        );
        assert!(s.kinesis.made.load(Ordering::SeqCst) >= 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deregistered_consumer_is_registered_again_and_nothing_is_lost() {
        let s = setup().await;
        let k = &s.kinesis.inner;
        for i in 0..5 {
            k.put("s", "key", format!("r-{i}"));
        }
        let consumer = s.consumer();
        let mut rx = spawn_subscriber(
            Arc::new(s.kinesis.clone()),
            consumer.clone(),
            s.shard.clone(),
            IteratorPosition::TrimHorizon,
            cfg(3),
            PrefetchBudget::new(1 << 20),
            crate::metrics::ShardMetrics::detached(),
            CancellationToken::new(),
        )
        .records;
        let mut got = take(&mut rx, 5).await;
        // An operator deregisters the consumer (its ARN carries its creation second: the new
        // one differs); records keep coming.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(k.deregister_stream_consumer(&s.arn));
        for i in 5..10 {
            k.put("s", "key", format!("r-{i}"));
        }
        let rest = tokio::time::timeout(Duration::from_secs(60), take(&mut rx, 5)).await;
        got.extend(rest.expect("the records after the deregistration arrive"));
        assert_eq!(data(&got), names("r", 10));
        // Registered once more (setup registered it first), under a new ARN.
        assert_eq!(s.kinesis.registered.load(Ordering::SeqCst), 2);
        assert_ne!(consumer.arn(), s.arn);
        // Nothing more arrives (no duplicates).
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn subscribers_sharing_a_consumer_register_it_once() {
        let s = setup().await;
        let consumer = s.consumer();
        let kinesis: Arc<dyn KinesisApi> = Arc::new(s.kinesis.clone());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(s.kinesis.inner.deregister_stream_consumer(&s.arn));
        let (a, b) = tokio::join!(
            consumer.reregister(kinesis.as_ref(), &s.arn),
            consumer.reregister(kinesis.as_ref(), &s.arn),
        );
        let (a, b) = (a.expect("registered"), b.expect("registered"));
        assert_eq!(a, b);
        assert_ne!(a, s.arn);
        assert_eq!(s.kinesis.registered.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shard_that_is_gone_fails_without_registering_the_consumer() {
        let s = setup().await;
        let k = &s.kinesis.inner;
        k.put("s", "key", "r-0");
        let mut rx = start(&s, IteratorPosition::TrimHorizon, 3, 1 << 20);
        assert_eq!(data(&take(&mut rx, 1).await), ["r-0"]);
        // Closed and trimmed away at once (before its last event): the shard no longer exists.
        k.split("s", &s.shard, 1 << 127);
        k.trim_before("s", k.now() + Duration::from_millis(1));
        match rx.recv().await {
            Some(Fetched::Failed(KinesisApiError::NotFound(what))) => {
                assert!(what.contains("shard"), "{what}")
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(rx.recv().await.is_none());
        assert_eq!(s.kinesis.registered.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn not_found_is_a_deregistered_consumer_only_while_the_shard_exists() {
        let gone = KinesisApiError::NotFound("shard shardId-000000000000".into());
        let throttled = KinesisApiError::Throttled("slow down".into());
        let denied = KinesisApiError::Other("access denied".into());
        let cases = [
            (Ok(()), 0, AfterNotFound::Reregister),
            (Ok(()), MAX_REREGISTRATIONS - 1, AfterNotFound::Reregister),
            // Registered again and again without an event: reported.
            (Ok(()), MAX_REREGISTRATIONS, AfterNotFound::Report),
            (Err(&gone), 0, AfterNotFound::Report),
            (Err(&throttled), 0, AfterNotFound::Retry),
            (Err(&denied), 0, AfterNotFound::Report),
        ];
        for (shard, reregistered, want) in cases {
            assert_eq!(
                after_not_found(shard, reregistered),
                want,
                "{shard:?} after {reregistered}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stops_when_cancelled() {
        let s = setup().await;
        let stop = CancellationToken::new();
        let mut rx = spawn_subscriber(
            Arc::new(s.kinesis.clone()),
            s.consumer(),
            s.shard.clone(),
            IteratorPosition::Latest,
            cfg(3),
            PrefetchBudget::new(1 << 20),
            crate::metrics::ShardMetrics::detached(),
            stop.clone(),
        )
        .records;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        assert!(rx.recv().await.is_none());
    }
}
