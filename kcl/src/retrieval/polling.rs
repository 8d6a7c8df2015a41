//! Polling retrieval: a task per shard calls `GetRecords` and fills a bounded prefetch queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
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
    /// budget holds while in flight, at the average record size seen.
    fn limit(&self, max_records: u32, avg_record_bytes: usize) -> u32 {
        let share = self.total / self.fetchers.load(Ordering::Relaxed).max(1);
        let fit = share / in_flight_bytes(1, avg_record_bytes).max(1);
        u32::try_from(fit).unwrap_or(u32::MAX).clamp(1, max_records)
    }

    /// Room for a call of up to `fair` records: the fair share's worth if it is free, else
    /// whatever is free now, else (nothing free) waits for room for one record. Sizing calls
    /// to the free room instead of waiting for a full share keeps a shard at the tip from
    /// waiting on other shards' calls in flight: when every fetcher reserves its share, the
    /// last one would otherwise wait for someone's answer before it could even ask.
    async fn reserve(
        self: &Arc<Self>,
        fair: u32,
        avg_record_bytes: usize,
    ) -> Option<OwnedSemaphorePermit> {
        let want = self.clamp(in_flight_bytes(fair, avg_record_bytes));
        let least = self.clamp(in_flight_bytes(1, avg_record_bytes));
        let free = self.bytes.available_permits().min(want);
        if free >= least {
            let n = u32::try_from(free).unwrap_or(u32::MAX);
            if let Ok(p) = self.bytes.clone().try_acquire_many_owned(n) {
                return Some(p);
            }
        }
        self.acquire(least).await
    }

    /// Records a call may ask for with `reserved` room: at least 1, at most `fair`.
    fn records_in(
        &self,
        reserved: &OwnedSemaphorePermit,
        fair: u32,
        avg_record_bytes: usize,
    ) -> u32 {
        let per_record = in_flight_bytes(1, avg_record_bytes).max(1);
        u32::try_from(reserved.num_permits() / per_record)
            .unwrap_or(u32::MAX)
            .clamp(1, fair.max(1))
    }

    /// Waits for `bytes` of room (at least 1, at most the whole budget, so never forever).
    pub(crate) async fn acquire(self: &Arc<Self>, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let want = u32::try_from(self.clamp(bytes)).unwrap_or(u32::MAX);
        self.bytes.clone().acquire_many_owned(want).await.ok()
    }

    fn clamp(&self, bytes: usize) -> usize {
        bytes.clamp(1, self.total)
    }

    /// Resizes a reservation to the `bytes` a response actually holds: the excess goes back at
    /// once; a shortfall (records larger than the average the request was sized by) is taken
    /// if free, and otherwise carried over budget for this one batch rather than waited for,
    /// since fetchers that wait for more while holding part of the budget could deadlock.
    fn fit(&self, mut reserved: OwnedSemaphorePermit, bytes: usize) -> OwnedSemaphorePermit {
        let want = self.clamp(bytes);
        let have = reserved.num_permits();
        if want < have {
            drop(reserved.split(have - want));
        } else if want > have {
            let extra = u32::try_from(want - have).unwrap_or(u32::MAX);
            match self.bytes.clone().try_acquire_many_owned(extra) {
                Ok(more) => reserved.merge(more),
                Err(_) => debug!(
                    over = want - have,
                    "response larger than reserved; carried over the prefetch budget"
                ),
            }
        }
        reserved
    }
}

/// The memory a `GetRecords` answer takes while it is received, per byte of record data:
/// the body (base64 in JSON, about 1.4 × the data) arrives in the HTTP client's buffers, the
/// SDK copies it into one contiguous buffer, then decodes the records beside it. A heap
/// profile of `kcl consume` (heaptrack) showed about 3.8 × the data at the peak of a call.
const IN_FLIGHT_FACTOR: usize = 4;

/// The memory a `GetRecords` answer of `records` records takes while it is received.
/// Reserved before the call, and cut to the records' own bytes once they are decoded.
fn in_flight_bytes(records: u32, avg_record_bytes: usize) -> usize {
    (records as usize)
        .saturating_mul(avg_record_bytes)
        .saturating_mul(IN_FLIGHT_FACTOR)
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
    fn backoff(&self) -> impl Iterator<Item = Duration> {
        let seed = crate::backoff::seed(&[&self.stream, self.shard.as_str()]);
        crate::backoff::exponential(Duration::from_millis(100), Duration::from_secs(10), seed)
            .build()
    }

    async fn iterator(
        &self,
        position: &IteratorPosition,
    ) -> Result<ShardIterator, KinesisApiError> {
        let mut delays = self.backoff();
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
        let mut delays = self.backoff();
        let mut next_call = Instant::now();
        loop {
            tokio::time::sleep_until(next_call).await;
            let fair = self
                .budget
                .0
                .limit(self.cfg.max_records, self.avg_record_bytes);
            // Room for the answer is reserved before asking, so the budget bounds what is in
            // flight as well as what waits for the processor (a response held while waiting
            // for room would be outside it). The call asks for what the room reserved holds.
            let Some(reserved) = self.budget.0.reserve(fair, self.avg_record_bytes).await else {
                return;
            };
            let limit = self
                .budget
                .0
                .records_in(&reserved, fair, self.avg_record_bytes);
            let started = Instant::now();
            next_call = started + self.cfg.min_interval;
            let call = self.kinesis.get_records(&iterator, limit);
            let result = tokio::time::timeout(GET_RECORDS_TIMEOUT, call)
                .await
                .unwrap_or_else(|_| Err(KinesisApiError::Transient("GetRecords timed out".into())));
            let out = match result {
                Ok(out) => {
                    delays = self.backoff();
                    out
                }
                Err(KinesisApiError::ExpiredIterator) => {
                    drop(reserved);
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
                    drop(reserved);
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
                let permit = self.budget.0.fit(reserved, bytes);
                let batch = Fetched::Records {
                    records,
                    millis_behind_latest: out.millis_behind_latest,
                    _permit: permit,
                };
                if tx.send(batch).await.is_err() {
                    return;
                }
            } else {
                drop(reserved);
                if at_tip {
                    // Counted from the answer, not the call: a server that answers slowly
                    // (overloaded) is asked less often. Counting from the call's start was
                    // measured on kinesis-local at 16 shards: p50 337 ms instead of 129 ms.
                    next_call = next_call.max(Instant::now() + self.cfg.idle_interval);
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_sized_so_every_fetcher_fits_its_share_in_flight() {
        let budget = PrefetchBudget::new(10 << 20);
        let _fetchers: Vec<_> = (0..4).map(|_| Registered::new(budget.clone())).collect();
        // 2.5 MiB share, 1 KiB records, 4 KiB each in flight: 640 records.
        assert_eq!(budget.limit(10_000, 1024), 640);
        assert_eq!(in_flight_bytes(640, 1024), 10 << 20 >> 2);
        // Never more than asked for, never zero.
        assert_eq!(budget.limit(100, 1024), 100);
        assert_eq!(budget.limit(10_000, 64 << 20), 1);
    }

    #[tokio::test]
    async fn a_reservation_is_cut_to_the_answer_and_grown_only_from_free_room() {
        let budget = PrefetchBudget::new(1000);
        let reserved = budget.acquire(600).await.expect("open");
        // Smaller answer: the excess goes back at once.
        let held = budget.fit(reserved, 100);
        assert_eq!(held.num_permits(), 100);
        assert_eq!(budget.bytes.available_permits(), 900);
        // Larger answer with room free: the shortfall is taken.
        let held = budget.fit(held, 300);
        assert_eq!(held.num_permits(), 300);
        assert_eq!(budget.bytes.available_permits(), 700);
        // Larger answer without room: carried as is, never waited for.
        let other = budget.acquire(700).await.expect("open");
        let held = budget.fit(held, 500);
        assert_eq!(held.num_permits(), 300);
        drop((held, other));
        assert_eq!(budget.bytes.available_permits(), 1000);
    }

    #[tokio::test]
    async fn calls_are_sized_to_the_free_room_up_to_the_fair_share() {
        let budget = PrefetchBudget::new(40 << 10);
        // All free: the fair share's worth (4 records of 1 KiB: 16 KiB in flight).
        let a = budget.reserve(4, 1024).await.expect("open");
        assert_eq!(a.num_permits(), 16 << 10);
        assert_eq!(budget.records_in(&a, 4, 1024), 4);
        // 24 KiB free: again a full share.
        let b = budget.reserve(4, 1024).await.expect("open");
        assert_eq!(budget.records_in(&b, 4, 1024), 4);
        // 8 KiB free: only 2 records' room, taken at once instead of waiting.
        let c = budget.reserve(4, 1024).await.expect("open");
        assert_eq!(c.num_permits(), 8 << 10);
        assert_eq!(budget.records_in(&c, 4, 1024), 2);
        // Nothing free: waits for one record's room.
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(4, 1024).await.map(|p| p.num_permits()) }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(a);
        assert_eq!(waiting.await.expect("joined"), Some(4 << 10));
        drop((b, c));
    }

    #[tokio::test]
    async fn a_reservation_larger_than_the_budget_waits_for_all_of_it() {
        let budget = PrefetchBudget::new(1000);
        let held = budget.acquire(10).await.expect("open");
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.acquire(5000).await.map(|p| p.num_permits()) }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(held);
        assert_eq!(waiting.await.expect("joined"), Some(1000));
    }
}
