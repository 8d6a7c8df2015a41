//! Processor failures through the worker (DESIGN.md §2.1 and §2.7): a processor fails on a
//! batch — a retryable error, a fatal error, or a panic — and then the worker is shut down
//! gracefully, or a second worker joins and balancing asks for the lease, or the
//! [`ErrorPolicy::StopShard`] policy stops the shard, or the [`ErrorPolicy::handoff`] policy
//! hands the batch to a dead-letter callback. Afterwards a second worker of the same
//! application (same lease table) must receive every record of the failed batch — or, under
//! the dead-letter policy, the callback must have received the whole batch. Nothing skipped.
//!
//! The processors checkpoint in `shutdown_requested` with `cp.checkpoint()`, as the CLI's
//! does: a checkpoint there must not cover a batch whose `process_records` failed.
//!
//! Written once against the [`StreamFixture`] seam: run on the in-memory backends and on
//! kinesis-local + moto / dynalite.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use async_trait::async_trait;
use kcl::lease::LeaseStore;
use kcl::shard::hash_key;
use kcl::{
    Checkpointer, ErrorPolicy, ExtendedSequenceNumber, ProcessorError, RecordBatch,
    RecordProcessor, SequenceNumber, ShardContext, ShardId,
};
use tokio::time::Instant;

use crate::scenarios::{
    check_released, owned_by, poll, records, worker, Delivery, DeliveryLog, StreamFixture,
};

/// How the first worker's processor fails on the poisoned batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// `Err(ProcessorError::retryable(..))`.
    Retryable,
    /// `Err(ProcessorError::fatal(..))`.
    Fatal,
    /// `panic!` inside `process_records`.
    Panic,
}

/// What follows the failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Default (retry) policy; the failing worker is stopped through its `ShutdownHandle`, then
    /// the second worker starts.
    Shutdown,
    /// Default (retry) policy; the second worker joins while the failing one runs, and
    /// balancing asks for one of its leases (a graceful handoff); the failing worker is stopped
    /// gracefully afterwards.
    Steal,
    /// `ErrorPolicy::StopShard`; the second worker joins while the failing one runs.
    StopShardPolicy,
    /// `ErrorPolicy::handoff` with a dead-letter callback; the failing worker is stopped
    /// gracefully, then the second worker starts.
    DeadLetter,
}

/// The first worker's id: its processors fail.
const FAILING: &str = "w1-failing";
/// The second worker's id: its processors never fail.
const NEXT: &str = "w2-next";
const SHARDS: u32 = 2;
const KEYS: u32 = 16;
/// Records per wave: wave 0 is processed, wave 1 poisons w1, wave 2 comes afterwards.
const WAVE: u32 = 48;
const LEASE_DURATION: Duration = Duration::from_secs(4);
const TIMEOUT: Duration = Duration::from_secs(60);

/// One record of a batch: (key, n) payload and sequence number.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rec {
    key: u32,
    n: u32,
    seq: SequenceNumber,
}

impl Rec {
    fn index(&self) -> u32 {
        self.key + self.n * KEYS
    }
}

impl fmt::Display for Rec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.key, self.n, self.seq)
    }
}

/// A batch, as a processor or the dead-letter callback saw it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SeenBatch {
    shard: ShardId,
    records: Vec<Rec>,
}

fn parse_batch(batch: &RecordBatch) -> Result<SeenBatch, ProcessorError> {
    let mut records = Vec::with_capacity(batch.len());
    for r in batch {
        let text = std::str::from_utf8(&r.data).map_err(ProcessorError::fatal)?;
        let (key, n) = text
            .split_once('/')
            .ok_or_else(|| ProcessorError::fatal(format!("bad payload {text:?}")))?;
        records.push(Rec {
            key: key.parse().map_err(ProcessorError::fatal)?,
            n: n.parse().map_err(ProcessorError::fatal)?,
            seq: r.sequence_number.clone(),
        });
    }
    Ok(SeenBatch {
        shard: batch.shard_id.clone(),
        records,
    })
}

/// Batches seen by several tasks.
#[derive(Clone, Debug, Default)]
struct Batches(Arc<Mutex<Vec<SeenBatch>>>);

impl Batches {
    fn push(&self, b: SeenBatch) {
        if let Ok(mut v) = self.0.lock() {
            v.push(b);
        }
    }

    /// Distinct batches, in the order first seen.
    fn distinct(&self) -> Vec<SeenBatch> {
        let all = self.0.lock().map(|v| v.clone()).unwrap_or_default();
        let mut seen = BTreeSet::new();
        all.into_iter().filter(|b| seen.insert(b.clone())).collect()
    }
}

/// A processor's start: (worker, shard, checkpoint at `initialize`).
type Start = (&'static str, ShardId, ExtendedSequenceNumber);

/// Where each worker's processors started.
#[derive(Clone, Debug, Default)]
struct Starts(Arc<Mutex<Vec<Start>>>);

impl Starts {
    fn snapshot(&self) -> Vec<Start> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// Logs the records of every batch it processes, checkpoints after each, and — in the failing
/// worker — fails every batch holding a record of wave 1 or later. Checkpoints in
/// `shutdown_requested` like the CLI's processor.
struct FailingProcessor {
    worker: &'static str,
    fail: Option<Failure>,
    log: DeliveryLog,
    failed: Batches,
    starts: Starts,
}

#[async_trait]
impl RecordProcessor for FailingProcessor {
    async fn initialize(&mut self, shard: &ShardContext) -> Result<(), ProcessorError> {
        if let Ok(mut s) = self.starts.0.lock() {
            s.push((
                self.worker,
                shard.shard_id.clone(),
                shard.checkpoint.clone(),
            ));
        }
        Ok(())
    }

    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        let seen = parse_batch(batch)?;
        if let Some(failure) = self.fail {
            if seen.records.iter().any(|r| r.index() >= WAVE) {
                self.failed.push(seen);
                match failure {
                    Failure::Retryable => {
                        return Err(ProcessorError::retryable("downstream unavailable"))
                    }
                    Failure::Fatal => return Err(ProcessorError::fatal("poison record")),
                    Failure::Panic => panic!("processor panics on a poison batch (test)"),
                }
            }
        }
        self.log.extend(seen.records.iter().map(|r| Delivery {
            worker: self.worker.to_owned(),
            stream: String::new(),
            shard: seen.shard.clone(),
            seq: r.seq.clone(),
            key: r.key,
            n: r.n,
        }))?;
        cp.checkpoint().await.map_err(ProcessorError::retryable)
    }

    async fn shutdown_requested(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        // As the CLI: "everything delivered was handled: checkpoint it".
        if cp.last_delivered().is_some() {
            cp.checkpoint().await.map_err(ProcessorError::retryable)?;
        }
        Ok(())
    }
}

/// The scenario: see the module documentation. Fails with a message naming the failed
/// batch's records the next owner never received.
pub async fn processor_failure(
    fixture: &dyn StreamFixture,
    leases: Arc<dyn LeaseStore>,
    failure: Failure,
    then: Then,
) -> anyhow::Result<()> {
    let case = format!(
        "{}, then {}",
        match failure {
            Failure::Retryable => "retryable error",
            Failure::Fatal => "fatal error",
            Failure::Panic => "panic",
        },
        match then {
            Then::Shutdown => "graceful shutdown (retry policy)",
            Then::Steal => "a second worker joins (retry policy)",
            Then::StopShardPolicy => "StopShard policy",
            Then::DeadLetter => "dead-letter policy",
        }
    );
    let stream = crate::unique_name("fail");
    let app = format!("fail-{failure:?}-{then:?}").to_lowercase();
    fixture.create_stream(&stream, SHARDS).await?;
    let shards = fixture.kinesis().list_shards(&stream).await?;
    let shard_of = |key: u32| -> anyhow::Result<ShardId> {
        let h = hash_key(&format!("key-{key}"));
        shards
            .iter()
            .find(|s| s.hash_range.contains(h))
            .map(|s| s.id.clone())
            .with_context(|| format!("no shard for key {key}"))
    };
    let key_shards: BTreeSet<ShardId> = (0..KEYS).map(shard_of).collect::<Result<_, _>>()?;
    ensure!(
        key_shards.len() == SHARDS as usize,
        "the keys do not cover every shard: {key_shards:?}"
    );

    let log = DeliveryLog::default();
    let failed = Batches::default();
    let dead_lettered = Batches::default();
    let policy = match then {
        Then::Shutdown | Then::Steal => ErrorPolicy::default(),
        Then::StopShardPolicy => ErrorPolicy::StopShard,
        Then::DeadLetter => {
            let dlq = dead_lettered.clone();
            ErrorPolicy::handoff(move |batch, _e| {
                if let Ok(b) = parse_batch(batch) {
                    dlq.push(b);
                }
            })
        }
    };
    let starts = Starts::default();
    let processor = |worker: &'static str, fail: Option<Failure>| {
        let (log, failed, starts) = (log.clone(), failed.clone(), starts.clone());
        move || FailingProcessor {
            worker,
            fail,
            log: log.clone(),
            failed: failed.clone(),
            starts: starts.clone(),
        }
    };
    let w1 = worker(&app, &stream, FAILING, fixture, leases.clone(), &log)
        .lease_duration(LEASE_DURATION)
        .error_policy(policy)
        .processor(processor(FAILING, Some(failure)))
        .build()?;
    let stop1 = w1.shutdown_handle();
    let mut run1 = Some(tokio::spawn(w1.run()));

    // Wave 0 is processed; wave 1 makes w1's processors fail on both shards.
    fixture.put(&stream, records(0, WAVE, KEYS)).await?;
    log.wait_for(WAVE as usize, TIMEOUT).await?;
    fixture.put(&stream, records(WAVE, 2 * WAVE, KEYS)).await?;
    poll("w1 failed a batch on every shard", TIMEOUT, || async {
        let shards: BTreeSet<ShardId> = failed.distinct().into_iter().map(|b| b.shard).collect();
        Ok((shards.len() == SHARDS as usize).then_some(()))
    })
    .await
    .with_context(|| case.clone())?;
    // A panic is caught and handled as a fatal error, through the same error policy.
    let dead_letter = then == Then::DeadLetter;
    if dead_letter {
        // w1 goes on after each handoff to the callback: it dead-letters all of wave 1.
        poll(
            "the dead-letter callback received all of wave 1",
            TIMEOUT,
            || async {
                let got: BTreeSet<u32> = dead_lettered
                    .distinct()
                    .iter()
                    .flat_map(|b| b.records.iter().map(Rec::index))
                    .collect();
                Ok((WAVE..2 * WAVE).all(|i| got.contains(&i)).then_some(()))
            },
        )
        .await?;
    }

    let shard_stopped =
        !dead_letter && (failure != Failure::Retryable || then == Then::StopShardPolicy);
    let stop_first = matches!(then, Then::Shutdown) || dead_letter;
    if shard_stopped && !dead_letter {
        // The error policy stopped both shards: their leases are released in the table (an
        // expired lease would still name w1), and w1 does not take them again.
        poll(
            "both stopped shards' leases released by w1",
            TIMEOUT,
            || async {
                let table = leases.list().await?.leases;
                Ok(
                    (table.len() == SHARDS as usize && table.iter().all(|l| l.owner.is_none()))
                        .then_some(()),
                )
            },
        )
        .await
        .with_context(|| case.clone())?;
    }
    if stop_first {
        let before = owned_by(&*leases, FAILING).await?;
        stop1.shutdown();
        if let Some(run) = run1.take() {
            run.await??;
        }
        check_released(&*leases, FAILING, &before, None)
            .await
            .with_context(|| case.clone())?;
    }

    // The second worker of the application.
    let w2 = worker(&app, &stream, NEXT, fixture, leases.clone(), &log)
        .lease_duration(LEASE_DURATION)
        .processor(processor(NEXT, None))
        .build()?;
    let stop2 = w2.shutdown_handle();
    let run2 = tokio::spawn(w2.run());

    if then == Then::Steal && failure == Failure::Retryable {
        // w1 retries on both shards; balancing asks it for one (target: 1 each).
        let taken = poll("w2 was handed a lease", TIMEOUT, || async {
            let mine = owned_by(&*leases, NEXT).await?;
            Ok((!mine.is_empty()).then_some(mine))
        })
        .await?;
        let handed: BTreeSet<ShardId> = taken.keys().map(|k| k.shard_id()).collect();
        fixture
            .put(&stream, records(2 * WAVE, 3 * WAVE, KEYS))
            .await?;
        // Once w2 delivered a wave-2 record of a shard, it delivered everything before it
        // from where it started (a shard is delivered in order).
        poll(
            "w2 delivered wave 2 on the shard handed to it",
            TIMEOUT,
            || async {
                let log = log.snapshot();
                Ok(handed
                    .iter()
                    .all(|s| {
                        log.iter().any(|d| {
                            d.worker == NEXT && &d.shard == s && d.key + d.n * KEYS >= 2 * WAVE
                        })
                    })
                    .then_some(()))
            },
        )
        .await?;
        check_failed_batches_redelivered(
            &failed.distinct(),
            &log.snapshot(),
            Some(&handed),
            &starts.snapshot(),
        )
        .with_context(|| format!("{case}: after w1 handed {handed:?} over to w2"))?;
    } else {
        fixture
            .put(&stream, records(2 * WAVE, 3 * WAVE, KEYS))
            .await?;
    }
    if let Some(run) = run1.take() {
        if !shard_stopped {
            // Still retrying on the shard it kept: stopped gracefully now.
            stop1.shutdown();
            run.await??;
        } else {
            // It holds nothing (its leases were released): w2 takes them while w1 runs;
            // stopped at the end.
            poll("w2 holds every lease", TIMEOUT, || async {
                let mine = owned_by(&*leases, NEXT).await?;
                Ok((mine.len() == SHARDS as usize).then_some(()))
            })
            .await
            .with_context(|| case.clone())?;
            stop1.shutdown();
            run.await??;
        }
    }

    // w2 delivers wave 2 (after the failed batches, per shard).
    poll("w2 delivered all of wave 2", TIMEOUT, || async {
        let got: BTreeSet<u32> = log
            .snapshot()
            .iter()
            .filter(|d| d.worker == NEXT)
            .map(|d| d.key + d.n * KEYS)
            .filter(|&i| i >= 2 * WAVE)
            .collect();
        Ok((got.len() == WAVE as usize).then_some(()))
    })
    .await
    .with_context(|| case.clone())?;
    stop2.shutdown();
    run2.await??;

    let log = log.snapshot();
    let failed = failed.distinct();
    if dead_letter {
        // Every failed batch went whole to the callback; the checkpoint may cover them.
        let dlq = dead_lettered.distinct();
        for b in &failed {
            ensure!(
                dlq.contains(b),
                "{case}: the batch that failed on {} ({} records from {}) never reached the \
                 dead-letter callback (it got {} batches)",
                b.shard,
                b.records.len(),
                b.records
                    .first()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                dlq.len()
            );
        }
        for b in &dlq {
            ensure!(
                failed.contains(b),
                "{case}: the callback received a batch that did not fail: {b:?}"
            );
        }
        let got: BTreeSet<u32> = log
            .iter()
            .map(|d| d.key + d.n * KEYS)
            .chain(dlq.iter().flat_map(|b| b.records.iter().map(Rec::index)))
            .collect();
        let missing: Vec<u32> = (0..3 * WAVE).filter(|i| !got.contains(i)).take(5).collect();
        ensure!(
            missing.is_empty(),
            "{case}: records neither processed nor dead-lettered, e.g. {missing:?}"
        );
    } else {
        ensure!(
            dead_lettered.distinct().is_empty(),
            "{case}: the dead-letter callback was called"
        );
        check_failed_batches_redelivered(&failed, &log, None, &starts.snapshot())
            .with_context(|| case.clone())?;
        let got: BTreeSet<u32> = log.iter().map(|d| d.key + d.n * KEYS).collect();
        let missing: Vec<u32> = (0..3 * WAVE).filter(|i| !got.contains(i)).take(5).collect();
        ensure!(
            missing.is_empty(),
            "{case}: records never processed, e.g. {missing:?}"
        );
    }
    Ok(())
}

/// Every record of every batch that failed on w1 (on `shards` only, if given) was delivered to
/// w2. `starts` (where w2's processors started) is for the error message.
fn check_failed_batches_redelivered(
    failed: &[SeenBatch],
    log: &[Delivery],
    shards: Option<&BTreeSet<ShardId>>,
    starts: &[Start],
) -> anyhow::Result<()> {
    let next: BTreeSet<(u32, u32)> = log
        .iter()
        .filter(|d| d.worker == NEXT)
        .map(|d| (d.key, d.n))
        .collect();
    let mut missing: BTreeMap<ShardId, Vec<&Rec>> = BTreeMap::new();
    let mut total: BTreeMap<ShardId, usize> = BTreeMap::new();
    for b in failed {
        if shards.is_some_and(|s| !s.contains(&b.shard)) {
            continue;
        }
        *total.entry(b.shard.clone()).or_insert(0) += b.records.len();
        for r in &b.records {
            if !next.contains(&(r.key, r.n)) {
                missing.entry(b.shard.clone()).or_default().push(r);
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let mut msg = String::from(
        "records of a batch that failed on w1 never reached the next owner (skipped):",
    );
    for (shard, recs) in &missing {
        let started: Vec<String> = starts
            .iter()
            .filter(|(w, s, _)| *w == NEXT && s == shard)
            .map(|(_, _, cp)| cp.to_string())
            .collect();
        let last_failed = failed
            .iter()
            .filter(|b| &b.shard == shard)
            .flat_map(|b| b.records.last())
            .max()
            .map(ToString::to_string)
            .unwrap_or_default();
        msg.push_str(&format!(
            "\n  {shard}: {} of {} failed records missing, e.g. {} (key/n@seq); the failed \
             batch ends at {last_failed}; {NEXT} started the shard at checkpoint {}",
            recs.len(),
            total.get(shard).copied().unwrap_or(0),
            recs.iter()
                .take(3)
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            started.join(", then ")
        ));
    }
    bail!(msg)
}

/// How long one scenario may take before it is reported stuck.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(240);

/// Runs [`processor_failure`] within [`SCENARIO_TIMEOUT`] and prints how long it took.
pub async fn processor_failure_timed(
    fixture: &dyn StreamFixture,
    leases: Arc<dyn LeaseStore>,
    failure: Failure,
    then: Then,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let r = tokio::time::timeout(
        SCENARIO_TIMEOUT,
        processor_failure(fixture, leases, failure, then),
    )
    .await
    .with_context(|| format!("{failure:?} then {then:?}: stuck"))?;
    println!(
        "{failure:?} then {then:?}: {} in {:.1?}",
        if r.is_ok() { "ok" } else { "FAILED" },
        started.elapsed()
    );
    r
}
