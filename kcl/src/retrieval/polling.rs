//! Polling retrieval: a task per shard calls `GetRecords` and fills a bounded prefetch queue.

use std::sync::atomic::{AtomicUsize, Ordering};
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
use crate::record::{Record, SequenceNumber};
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

/// A `GetRecords` call that has not answered after this long is abandoned and retried (the SDK
/// sets no operation timeout by default; a hung connection must not stall a shard).
const GET_RECORDS_TIMEOUT: Duration = Duration::from_secs(30);

/// The read-ahead budget shared by every fetcher of one worker: a byte semaphore whose permits
/// travel with the batches, and the number of fetchers sharing it (for their fair shares).
#[derive(Debug)]
pub(crate) struct PrefetchBudget {
    bytes: Arc<Semaphore>,
    total: usize,
    fetchers: AtomicUsize,
}

impl PrefetchBudget {
    pub(crate) fn new(total: usize) -> Arc<Self> {
        Arc::new(Self {
            bytes: Arc::new(Semaphore::new(total)),
            total,
            fetchers: AtomicUsize::new(0),
        })
    }

    /// Records to ask for: at most `max_records`, and no more than this fetcher's share of the
    /// budget holds at the average record size seen.
    fn limit(&self, max_records: u32, avg_record_bytes: usize) -> u32 {
        let share = self.total / self.fetchers.load(Ordering::Relaxed).max(1);
        let fit = share / avg_record_bytes.max(1);
        u32::try_from(fit).unwrap_or(u32::MAX).clamp(1, max_records)
    }

    pub(crate) async fn acquire(self: &Arc<Self>, bytes: usize) -> Option<OwnedSemaphorePermit> {
        // A response larger than the whole budget waits for all of it (never forever).
        let want = u32::try_from(bytes.clamp(1, self.total)).unwrap_or(u32::MAX);
        self.bytes.clone().acquire_many_owned(want).await.ok()
    }
}

/// Counts a fetcher in its budget's fair shares while it lives.
struct Registered(Arc<PrefetchBudget>);

impl Registered {
    fn new(budget: Arc<PrefetchBudget>) -> Self {
        budget.fetchers.fetch_add(1, Ordering::Relaxed);
        Self(budget)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.fetchers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Starts the fetcher task for `shard`, from `position`. Returns the receiving end of the
/// prefetch queue. The task stops when `stop` is cancelled or the receiver is dropped. Records
/// come as read (KPL aggregates included): the consumer deaggregates them and drops what the
/// checkpoint already covers.
pub(crate) fn spawn_fetcher(
    kinesis: Arc<dyn KinesisApi>,
    stream: String,
    shard: ShardId,
    position: IteratorPosition,
    cfg: PollingConfig,
    budget: Arc<PrefetchBudget>,
    stop: CancellationToken,
) -> mpsc::Receiver<Fetched> {
    let (tx, rx) = mpsc::channel(cfg.prefetch_batches);
    let fetcher = Fetcher {
        budget: Registered::new(budget),
        avg_record_bytes: 1024,
        kinesis,
        stream,
        shard,
        cfg,
        last_read: None,
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
    budget: Registered,
    /// Moving average of record sizes, to size requests to the budget.
    avg_record_bytes: usize,
    /// The last (outer) record read: an expired iterator is renewed after it.
    last_read: Option<SequenceNumber>,
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
        match &self.last_read {
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
            let limit = self
                .budget
                .0
                .limit(self.cfg.max_records, self.avg_record_bytes);
            let call = self.kinesis.get_records(&iterator, limit);
            let result = tokio::time::timeout(GET_RECORDS_TIMEOUT, call)
                .await
                .unwrap_or_else(|_| Err(KinesisApiError::Transient("GetRecords timed out".into())));
            let out = match result {
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
            let records: Vec<Record> = out.records;
            if let Some(last) = records.last() {
                self.last_read = Some(last.sequence_number.clone());
                let bytes: usize = records.iter().map(|r| r.data.len()).sum();
                let avg = bytes / records.len();
                self.avg_record_bytes = (self.avg_record_bytes * 3 + avg.max(1)) / 4;
                let Some(permit) = self.budget.0.acquire(bytes).await else {
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
