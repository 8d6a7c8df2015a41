//! Polling retrieval: a task per shard calls `GetRecords` and fills a bounded prefetch queue.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{IteratorPosition, KinesisApi, KinesisApiError, ShardIterator};
use crate::config::PollingConfig;
use crate::metrics as m;
use crate::record::{ExtendedSequenceNumber, Record};
use crate::shard::{ChildShard, ShardId};

/// One unit read ahead of the processor.
#[derive(Debug)]
pub(crate) enum Fetched {
    /// Records (never empty), with the byte-budget permit that travels with them.
    Records {
        records: Vec<Record>,
        millis_behind_latest: Option<u64>,
        _permit: OwnedSemaphorePermit,
    },
    /// The shard was read to its end.
    ShardEnd { children: Vec<ChildShard> },
    /// The shard cannot be read (deleted or trimmed away, or a non-retryable error).
    Failed(KinesisApiError),
}

/// Starts the fetcher task for `shard`, from `position`, skipping records at or before
/// `after` (the checkpoint). Returns the receiving end of the prefetch queue. The task stops
/// when `stop` is cancelled or the receiver is dropped.
pub(crate) fn spawn_fetcher(
    kinesis: Arc<dyn KinesisApi>,
    stream: String,
    shard: ShardId,
    position: IteratorPosition,
    after: ExtendedSequenceNumber,
    cfg: PollingConfig,
    stop: CancellationToken,
) -> mpsc::Receiver<Fetched> {
    let (tx, rx) = mpsc::channel(cfg.prefetch_batches);
    let fetcher = Fetcher {
        budget: Arc::new(Semaphore::new(cfg.prefetch_bytes)),
        kinesis,
        stream,
        shard,
        cfg,
        last_read: after,
    };
    tokio::spawn(async move {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {}
            _ = fetcher.run(position, tx) => {}
        }
    });
    rx
}

struct Fetcher {
    kinesis: Arc<dyn KinesisApi>,
    stream: String,
    shard: ShardId,
    cfg: PollingConfig,
    budget: Arc<Semaphore>,
    /// The last position read (or the checkpoint): records at or before it are dropped, and an
    /// expired iterator is renewed after it.
    last_read: ExtendedSequenceNumber,
}

impl Fetcher {
    fn backoff() -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .without_max_times()
            .build()
    }

    async fn iterator(
        &self,
        position: &IteratorPosition,
    ) -> Result<ShardIterator, KinesisApiError> {
        let mut delays = Self::backoff();
        loop {
            match self
                .kinesis
                .get_shard_iterator(&self.stream, &self.shard, position)
                .await
            {
                Err(e) if e.is_retryable() => {
                    let d = delays.next().unwrap_or(Duration::from_secs(10));
                    debug!(shard = %self.shard, error = %e, "GetShardIterator failed; retrying");
                    tokio::time::sleep(d).await;
                }
                other => return other,
            }
        }
    }

    /// Position to renew an expired iterator from.
    fn renew_position(&self, initial: &IteratorPosition) -> IteratorPosition {
        match self.last_read.sequence() {
            Some(seq) => IteratorPosition::AfterSequence(seq.clone()),
            None => initial.clone(),
        }
    }

    async fn run(mut self, position: IteratorPosition, tx: mpsc::Sender<Fetched>) {
        let mut iterator = match self.iterator(&position).await {
            Ok(it) => it,
            Err(e) => {
                let _ = tx.send(Fetched::Failed(e)).await;
                return;
            }
        };
        let mut delays = Self::backoff();
        let mut next_call = Instant::now();
        loop {
            tokio::time::sleep_until(next_call).await;
            let started = Instant::now();
            next_call = started + self.cfg.min_interval;
            let out = match self
                .kinesis
                .get_records(&iterator, self.cfg.max_records)
                .await
            {
                Ok(out) => {
                    delays = Self::backoff();
                    out
                }
                Err(KinesisApiError::ExpiredIterator) => {
                    debug!(shard = %self.shard, "shard iterator expired; renewing");
                    match self.iterator(&self.renew_position(&position)).await {
                        Ok(it) => iterator = it,
                        Err(e) => {
                            let _ = tx.send(Fetched::Failed(e)).await;
                            return;
                        }
                    }
                    continue;
                }
                Err(e) if e.is_retryable() => {
                    let label = self.shard.to_string();
                    if matches!(e, KinesisApiError::Throttled(_)) {
                        metrics::counter!(m::THROTTLES, "shard" => label).increment(1);
                    } else {
                        metrics::counter!(m::READ_ERRORS, "shard" => label).increment(1);
                    }
                    let d = delays.next().unwrap_or(Duration::from_secs(10));
                    debug!(shard = %self.shard, error = %e, delay = ?d, "GetRecords failed; backing off");
                    next_call = Instant::now() + d;
                    continue;
                }
                Err(e) => {
                    warn!(shard = %self.shard, error = %e, "GetRecords failed");
                    let _ = tx.send(Fetched::Failed(e)).await;
                    return;
                }
            };
            let at_tip = out.millis_behind_latest == Some(0);
            let records: Vec<Record> = out
                .records
                .into_iter()
                .filter(|r| r.position() > self.last_read)
                .collect();
            if let Some(last) = records.last() {
                self.last_read = last.position();
                let bytes: usize = records.iter().map(|r| r.data.len()).sum();
                // A single response is at most 10 MiB and the budget is at least that.
                let want =
                    u32::try_from(bytes.clamp(1, self.cfg.prefetch_bytes)).unwrap_or(u32::MAX);
                let Ok(permit) = self.budget.clone().acquire_many_owned(want).await else {
                    return;
                };
                let batch = Fetched::Records {
                    records,
                    millis_behind_latest: out.millis_behind_latest,
                    _permit: permit,
                };
                if tx.send(batch).await.is_err() {
                    return;
                }
            } else if at_tip {
                next_call = next_call.max(Instant::now() + self.cfg.idle_interval);
            }
            match out.next_iterator {
                Some(next) => iterator = next,
                None => {
                    let _ = tx
                        .send(Fetched::ShardEnd {
                            children: out.child_shards,
                        })
                        .await;
                    return;
                }
            }
        }
    }
}
