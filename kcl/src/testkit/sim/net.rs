//! The simulated network between one worker and the backends: a [`LeaseStore`] and a
//! [`KinesisApi`] per worker incarnation, delegating to the shared in-memory backends after
//! applying that machine's faults.
//!
//! Faults belong to a slot (a machine) and outlive its incarnations: a partition from the lease
//! table (every call fails at once, or hangs and then fails), throttling, latency, lost
//! responses (the write is applied, the caller is told it failed — as a DynamoDB timeout can),
//! Kinesis throttling (which also breaks fan-out subscriptions), and failing processors (read
//! by [`super::processor`]). Every draw comes from the slot's own RNG, a fork of the sim's.
//!
//! Enhanced fan-out goes through here too: the worker registers its stream consumer and
//! subscribes to shards of the in-memory Kinesis. The consumer ARN the worker sees is a fixed
//! alias: the in-memory one embeds the wall-clock registration time, and the subscriber seeds
//! its retry jitter from the ARN, which would make two runs of one seed differ.
//!
//! A crash marks the incarnation dead: from then on every call it makes is logged as a
//! [`Event::Zombie`] and never returns, so whatever tasks of the aborted worker are still
//! alive cannot touch the world — as after a real process death.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::log::{Event, Inc, LeaseView, Op, Outcome, Recorder};
use crate::lease::liveness::{Beat, HandoffNotice, WorkerItem, WorkerTable};
use crate::lease::{Lease, LeaseKey, LeaseStore, LeaseStoreError, LeaseTable, WorkerId};
use crate::record::ExtendedSequenceNumber;
use crate::retrieval::kinesis::SubscriptionStream;
use crate::retrieval::{
    GetRecordsOutput, IteratorPosition, KinesisApi, KinesisApiError, ShardIterator,
};
use crate::shard::{Shard, ShardId};
use crate::testkit::{MemKinesis, MemLeaseStore};

/// A partition from the lease table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partition {
    /// Every call fails at once (connection refused).
    Fail,
    /// Every call hangs this long, then fails (a timeout).
    Hang(Duration),
}

/// How a failing processor fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailKind {
    /// `process_records` returns a retryable error.
    Retryable,
    /// `process_records` returns a fatal error.
    Fatal,
    /// `process_records` panics.
    Panic,
}

/// Processors of a machine failing (a downstream outage, a poison record, a bug).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessorFault {
    /// How they fail.
    pub kind: FailKind,
    /// Probability that one `process_records` call fails (after taking its time, before
    /// checkpointing).
    pub p: f64,
}

/// The faults currently applied to one machine: its network, and its processors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkFaults {
    /// Cut off from the lease table.
    pub partition: Option<Partition>,
    /// Probability that a lease-table call is throttled.
    pub throttle: f64,
    /// Largest extra latency of a lease-table call (uniform from zero).
    pub latency: Duration,
    /// Probability that an applied lease write reports a failure.
    pub response_loss: f64,
    /// Probability that a Kinesis call is throttled (and that a fan-out subscription breaks
    /// at an event).
    pub kinesis_throttle: f64,
    /// Processors failing.
    pub processor: Option<ProcessorFault>,
}

impl LinkFaults {
    /// True if no fault is active.
    pub fn is_clear(&self) -> bool {
        *self == Self::default()
    }
}

/// One machine's network: its faults and the RNG they are drawn from.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) faults: LinkFaults,
    rng: ChaCha8Rng,
    /// Lost responses so far: every other one is reported as the SDK's retry of the write
    /// would report it (a failed condition), the others as a timeout (a transient error).
    lost: u64,
}

impl Link {
    pub(crate) fn new(rng: ChaCha8Rng) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            faults: LinkFaults::default(),
            rng,
            lost: 0,
        }))
    }
}

/// What one incarnation's calls go through.
#[derive(Clone, Debug)]
pub(crate) struct Net {
    pub(crate) link: Arc<Mutex<Link>>,
    pub(crate) dead: Arc<AtomicBool>,
    /// Set once the aborted `run()` future was dropped: a call after that comes from a task
    /// `run()` left behind.
    pub(crate) run_dropped: Arc<AtomicBool>,
    pub(crate) inc: Inc,
    pub(crate) rec: Recorder,
    /// Set when a processor of this incarnation failed in a way that makes the worker refuse
    /// the shard until it restarts (a fatal error, a panic, any error under `StopShard`).
    pub(crate) tainted: Arc<AtomicBool>,
}

/// What to do with a lease-table call, drawn before it runs.
struct Draw {
    partition: Option<Partition>,
    throttled: bool,
    delay: Duration,
}

impl Net {
    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Never returns once the incarnation is dead.
    pub(crate) async fn halt_if_dead(&self, op: &'static str) {
        if self.dead.load(Ordering::SeqCst) {
            if self.run_dropped.load(Ordering::SeqCst) {
                self.rec.push(Event::Zombie { inc: self.inc, op });
            }
            std::future::pending::<()>().await;
        }
    }

    /// Applies the faults of a lease-table call before it reaches the table. Returns when
    /// the call was made (its caller's clock starts there).
    async fn before_lease_call(&self, op: &'static str) -> Result<Duration, LeaseStoreError> {
        self.halt_if_dead(op).await;
        let sent = self.rec.now();
        self.rec.count_call(op);
        let draw = {
            let mut link = self.link();
            let f = link.faults.clone();
            let throttled = f.throttle > 0.0 && link.rng.random_bool(f.throttle.min(1.0));
            let delay = if f.latency.is_zero() {
                Duration::ZERO
            } else {
                let max = u64::try_from(f.latency.as_micros()).unwrap_or(u64::MAX);
                Duration::from_micros(link.rng.random_range(0..=max))
            };
            Draw {
                partition: f.partition,
                throttled,
                delay,
            }
        };
        match draw.partition {
            Some(Partition::Fail) => {
                self.rec.count_injected("partitioned lease call");
                return Err(transient("partitioned from the lease table"));
            }
            Some(Partition::Hang(d)) => {
                self.rec.count_injected("partitioned lease call");
                tokio::time::sleep(d).await;
                self.halt_if_dead(op).await;
                return Err(transient("lease table call timed out (partition)"));
            }
            None => {}
        }
        if draw.throttled {
            self.rec.count_injected("throttled lease call");
            return Err(LeaseStoreError::Throttled("simulated throttle".into()));
        }
        if !draw.delay.is_zero() {
            tokio::time::sleep(draw.delay).await;
        }
        // A crash during the delay: the request never leaves the dead machine.
        self.halt_if_dead(op).await;
        Ok(sent)
    }

    /// The response travels back: a random part of the link's latency (so a write is applied
    /// some time before its caller learns it was).
    async fn after_lease_call(&self, op: &'static str) {
        let delay = {
            let mut link = self.link();
            let f = link.faults.latency;
            if f.is_zero() {
                Duration::ZERO
            } else {
                let max = u64::try_from(f.as_micros()).unwrap_or(u64::MAX);
                Duration::from_micros(link.rng.random_range(0..=max))
            }
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.halt_if_dead(op).await;
    }

    /// If the response of an applied write is lost: the error its caller gets instead — a
    /// timeout, or (every other time) the failed condition of the SDK's retry of the write.
    fn lose_response(&self, key: &LeaseKey) -> Option<LeaseStoreError> {
        let mut link = self.link();
        let p = link.faults.response_loss;
        if !(p > 0.0 && link.rng.random_bool(p.min(1.0))) {
            return None;
        }
        link.lost += 1;
        Some(if link.lost % 2 == 0 {
            LeaseStoreError::ConditionFailed { key: key.clone() }
        } else {
            transient("simulated lost response (the write was applied)")
        })
    }

    async fn before_kinesis_call(&self, op: &'static str) -> Result<(), KinesisApiError> {
        self.halt_if_dead(op).await;
        self.rec.count_call(op);
        let throttled = {
            let mut link = self.link();
            let p = link.faults.kinesis_throttle;
            p > 0.0 && link.rng.random_bool(p.min(1.0))
        };
        if throttled {
            self.rec.count_injected("throttled kinesis call");
            return Err(if op == "get_records" {
                KinesisApiError::Throttled("simulated throttle".into())
            } else {
                KinesisApiError::Transient("simulated transient error".into())
            });
        }
        Ok(())
    }

    /// True if a fan-out subscription breaks at this event (drawn like a Kinesis throttle).
    fn break_subscription(&self) -> bool {
        let mut link = self.link();
        let p = link.faults.kinesis_throttle;
        p > 0.0 && link.rng.random_bool(p.min(1.0))
    }

    /// The processor fault in force, if any.
    pub(crate) fn processor_fault(&self) -> Option<ProcessorFault> {
        self.link().faults.processor
    }
}

fn transient(msg: &'static str) -> LeaseStoreError {
    LeaseStoreError::Transient(msg.into())
}

/// The lease store one incarnation sees.
#[derive(Debug)]
pub(crate) struct SimLeaseStore {
    pub(crate) inner: MemLeaseStore,
    pub(crate) net: Net,
}

impl SimLeaseStore {
    /// The answer of a worker-table write on its way back: maybe lost. A lost answer of a
    /// write whose retry would fail its condition (`conditional`: fence, remove) may come
    /// back as that failure; others (heartbeat, notify, register) succeed when retried, so
    /// only a timeout can stand for their lost answer.
    async fn worker_answer<T>(
        &self,
        worker: &WorkerId,
        result: Result<T, LeaseStoreError>,
        conditional: bool,
    ) -> Result<T, LeaseStoreError> {
        let result = match result {
            Ok(v) => match self.net.lose_response(&LeaseKey::new(worker.as_str())) {
                Some(e) if conditional || !e.is_condition_failed() => Err(e),
                Some(_) => Err(transient("simulated lost response (the write was applied)")),
                None => Ok(v),
            },
            e => e,
        };
        self.net.after_lease_call("worker").await;
        result
    }

    /// Logs a write that reached the table, then maybe loses its response.
    fn after_write<T>(
        &self,
        sent: Duration,
        op: Op,
        key: &LeaseKey,
        result: Result<T, LeaseStoreError>,
        outcome: impl FnOnce(&T) -> Outcome,
    ) -> Result<T, LeaseStoreError> {
        let (outcome, applied) = match &result {
            Ok(v) => {
                let o = outcome(v);
                let applied = !matches!(o, Outcome::Refused);
                (o, applied)
            }
            Err(e) if e.is_condition_failed() => (Outcome::Refused, false),
            // The in-memory table fails only through its own fault rules, which the sim
            // leaves empty.
            Err(_) => return result,
        };
        let lost = if applied {
            self.net.lose_response(key)
        } else {
            None
        };
        let response_lost = lost.is_some();
        // Which `process_records` call (if any) a checkpoint was written from.
        let batch = match op {
            Op::Checkpoint => self.net.rec.running_batch(self.net.inc, &key.shard_id()),
            _ => None,
        };
        self.net.rec.push(Event::Write {
            inc: self.net.inc,
            op,
            key: key.clone(),
            outcome,
            response_lost,
            batch,
            sent,
        });
        if let Some(error) = lost {
            return Err(error);
        }
        result
    }

    async fn lease_write(
        &self,
        sent: Duration,
        op: Op,
        key: &LeaseKey,
        result: impl std::future::Future<Output = Result<Lease, LeaseStoreError>>,
    ) -> Result<Lease, LeaseStoreError> {
        let result = result.await;
        let r = self.after_write(sent, op, key, result, |l| {
            Outcome::Applied(LeaseView::from(l))
        });
        self.net.after_lease_call("write").await;
        if r.is_ok() {
            self.net.rec.push(Event::Acked {
                inc: self.net.inc,
                key: key.clone(),
                sent,
            });
        }
        r
    }
}

#[async_trait]
impl LeaseStore for SimLeaseStore {
    async fn ensure_table(&self) -> Result<(), LeaseStoreError> {
        self.net.before_lease_call("ensure_table").await?;
        self.inner.ensure_table().await
    }

    async fn list(&self) -> Result<LeaseTable, LeaseStoreError> {
        self.net.before_lease_call("list").await?;
        let r = self.inner.list().await;
        self.net.after_lease_call("list").await;
        r
    }

    async fn list_eventually(&self) -> Result<LeaseTable, LeaseStoreError> {
        self.net.before_lease_call("list").await?;
        let r = self.inner.list_eventually().await;
        self.net.after_lease_call("list").await;
        r
    }

    async fn register_worker(&self, item: &WorkerItem) -> Result<(), LeaseStoreError> {
        let sent = self.net.before_lease_call("register_worker").await?;
        let r = self.inner.register_worker(item).await;
        let r = self.worker_answer(&item.worker, r, false).await;
        if r.is_ok() {
            // A fresh item counts as the first heartbeat: the worker is valid from there.
            self.net.rec.push(Event::Beat {
                inc: self.net.inc,
                sent,
            });
        }
        r
    }

    async fn heartbeat(&self, beat: &Beat) -> Result<WorkerItem, LeaseStoreError> {
        let sent = self.net.before_lease_call("heartbeat").await?;
        let r = self.inner.heartbeat(beat).await;
        let r = self.worker_answer(&beat.worker, r, false).await;
        if r.is_ok() {
            self.net.rec.push(Event::Beat {
                inc: self.net.inc,
                sent,
            });
        }
        r
    }

    async fn list_workers(&self, consistent: bool) -> Result<WorkerTable, LeaseStoreError> {
        self.net.before_lease_call("list_workers").await?;
        let r = self.inner.list_workers(consistent).await;
        self.net.after_lease_call("list_workers").await;
        r
    }

    async fn fence_worker(&self, seen: &WorkerItem, by: &WorkerId) -> Result<(), LeaseStoreError> {
        self.net.before_lease_call("fence_worker").await?;
        let r = self.inner.fence_worker(seen, by).await;
        self.worker_answer(&seen.worker, r, true).await
    }

    async fn notify_handoff(
        &self,
        worker: &WorkerId,
        incarnation: u64,
        notice: &HandoffNotice,
    ) -> Result<(), LeaseStoreError> {
        self.net.before_lease_call("notify_handoff").await?;
        let r = self.inner.notify_handoff(worker, incarnation, notice).await;
        if r.is_ok() {
            self.net.rec.push(Event::Notice {
                inc: self.net.inc,
                key: notice.key.clone(),
            });
        }
        self.worker_answer(worker, r, false).await
    }

    async fn remove_worker(
        &self,
        worker: &WorkerId,
        incarnation: u64,
    ) -> Result<(), LeaseStoreError> {
        self.net.before_lease_call("remove_worker").await?;
        let r = self.inner.remove_worker(worker, incarnation).await;
        self.worker_answer(worker, r, true).await
    }

    async fn set_draining(
        &self,
        worker: &WorkerId,
        incarnation: u64,
        since: Option<u64>,
    ) -> Result<(), LeaseStoreError> {
        self.net.before_lease_call("set_draining").await?;
        let r = self.inner.set_draining(worker, incarnation, since).await;
        self.worker_answer(worker, r, false).await
    }

    async fn get(&self, key: &LeaseKey) -> Result<Option<Lease>, LeaseStoreError> {
        self.net.before_lease_call("get").await?;
        let r = self.inner.get(key).await;
        self.net.after_lease_call("get").await;
        r
    }

    async fn create_if_absent(&self, lease: &Lease) -> Result<bool, LeaseStoreError> {
        let sent = self.net.before_lease_call("create_if_absent").await?;
        let result = self.inner.create_if_absent(lease).await;
        let r = self.after_write(sent, Op::Create, &lease.key, result, |created| {
            if *created {
                Outcome::Applied(LeaseView::from(lease))
            } else {
                Outcome::Refused
            }
        });
        self.net.after_lease_call("create_if_absent").await;
        r
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, LeaseStoreError> {
        let sent = self.net.before_lease_call("renew").await?;
        self.lease_write(sent, Op::Renew, &lease.key, self.inner.renew(lease))
            .await
    }

    async fn take(&self, lease: &Lease, owner: &WorkerId) -> Result<Lease, LeaseStoreError> {
        let sent = self.net.before_lease_call("take").await?;
        self.lease_write(sent, Op::Take, &lease.key, self.inner.take(lease, owner))
            .await
    }

    async fn checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
        child_shard_ids: &[ShardId],
    ) -> Result<Lease, LeaseStoreError> {
        let sent = self.net.before_lease_call("checkpoint").await?;
        self.lease_write(
            sent,
            Op::Checkpoint,
            &lease.key,
            self.inner.checkpoint(lease, checkpoint, child_shard_ids),
        )
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<Lease, LeaseStoreError> {
        let sent = self.net.before_lease_call("release").await?;
        self.lease_write(sent, Op::Release, &lease.key, self.inner.release(lease))
            .await
    }

    async fn delete(&self, lease: &Lease) -> Result<(), LeaseStoreError> {
        let sent = self.net.before_lease_call("delete").await?;
        let result = self.inner.delete(lease).await;
        let r = self.after_write(sent, Op::Delete, &lease.key, result, |_| Outcome::Deleted);
        self.net.after_lease_call("delete").await;
        r
    }

    async fn request_handoff(
        &self,
        lease: &Lease,
        new_owner: &WorkerId,
    ) -> Result<Lease, LeaseStoreError> {
        let sent = self.net.before_lease_call("request_handoff").await?;
        self.lease_write(
            sent,
            Op::RequestHandoff,
            &lease.key,
            self.inner.request_handoff(lease, new_owner),
        )
        .await
    }

    async fn complete_handoff(
        &self,
        lease: &Lease,
        new_owner: &WorkerId,
    ) -> Result<Lease, LeaseStoreError> {
        let sent = self.net.before_lease_call("complete_handoff").await?;
        self.lease_write(
            sent,
            Op::CompleteHandoff,
            &lease.key,
            self.inner.complete_handoff(lease, new_owner),
        )
        .await
    }

    async fn withdraw_handoff(&self, lease: &Lease) -> Result<Lease, LeaseStoreError> {
        let sent = self.net.before_lease_call("withdraw_handoff").await?;
        self.lease_write(
            sent,
            Op::WithdrawHandoff,
            &lease.key,
            self.inner.withdraw_handoff(lease),
        )
        .await
    }
}

/// The Kinesis one incarnation sees.
#[derive(Debug)]
pub(crate) struct SimKinesis {
    pub(crate) inner: MemKinesis,
    pub(crate) net: Net,
}

#[async_trait]
impl KinesisApi for SimKinesis {
    fn now(&self) -> std::time::SystemTime {
        self.inner.now()
    }

    async fn list_shards(&self, stream: &str) -> Result<Vec<Shard>, KinesisApiError> {
        self.net.before_kinesis_call("list_shards").await?;
        self.inner.list_shards(stream).await
    }

    async fn get_shard_iterator(
        &self,
        stream: &str,
        shard: &ShardId,
        position: &IteratorPosition,
    ) -> Result<ShardIterator, KinesisApiError> {
        self.net.before_kinesis_call("get_shard_iterator").await?;
        self.inner.get_shard_iterator(stream, shard, position).await
    }

    async fn get_records(
        &self,
        iterator: &ShardIterator,
        limit: u32,
    ) -> Result<GetRecordsOutput, KinesisApiError> {
        self.net.before_kinesis_call("get_records").await?;
        self.inner.get_records(iterator, limit).await
    }

    async fn register_stream_consumer(
        &self,
        stream: &str,
        consumer_name: &str,
    ) -> Result<String, KinesisApiError> {
        self.net
            .before_kinesis_call("register_stream_consumer")
            .await?;
        self.inner
            .register_stream_consumer(stream, consumer_name)
            .await?;
        Ok(consumer_alias(stream, consumer_name))
    }

    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard: &ShardId,
        position: &IteratorPosition,
    ) -> Result<SubscriptionStream, KinesisApiError> {
        self.net.before_kinesis_call("subscribe_to_shard").await?;
        let (stream, name) = parse_consumer_alias(consumer_arn)
            .ok_or_else(|| KinesisApiError::NotFound(format!("consumer {consumer_arn}")))?;
        // Registering is idempotent: this is the lookup of the real ARN.
        let arn = self.inner.register_stream_consumer(stream, name).await?;
        let events = self.inner.subscribe_to_shard(&arn, shard, position).await?;
        let net = self.net.clone();
        Ok(Box::pin(futures::stream::unfold(
            (events, net),
            |(mut events, net)| async move {
                let event = events.next().await?;
                // A dead machine receives nothing more.
                net.halt_if_dead("subscription_event").await;
                let event = match event {
                    Ok(_) if net.break_subscription() => {
                        net.rec.count_injected("broken subscription");
                        Err(KinesisApiError::Transient(
                            "simulated broken subscription".into(),
                        ))
                    }
                    other => other,
                };
                Some((event, (events, net)))
            },
        )))
    }
}

const ALIAS_PREFIX: &str = "arn:sim:kinesis:stream/";

/// The consumer ARN workers see: fixed, unlike the in-memory one (see the module docs).
fn consumer_alias(stream: &str, name: &str) -> String {
    format!("{ALIAS_PREFIX}{stream}/consumer/{name}")
}

fn parse_consumer_alias(arn: &str) -> Option<(&str, &str)> {
    arn.strip_prefix(ALIAS_PREFIX)?.split_once("/consumer/")
}
