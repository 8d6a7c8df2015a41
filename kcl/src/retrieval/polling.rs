//! Polling retrieval: a task per shard calls `GetRecords` and fills a bounded prefetch queue.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use backon::BackoffBuilder;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{restart_position, IteratorPosition, KinesisApi, KinesisApiError, ShardIterator};
use crate::config::PollingConfig;
use crate::metrics as m;
use crate::record::{Record, SequenceNumber};
use crate::shard::{ChildShard, ShardId};

/// One unit read ahead of the processor.
#[derive(Debug)]
pub(crate) enum Fetched {
    /// Records (never empty), with the room they hold in the prefetch budget, which travels
    /// with them until the batch is dropped.
    Records {
        records: Vec<Record>,
        millis_behind_latest: Option<u64>,
        room: Room,
    },
    /// The shard was read to its end.
    ShardEnd { children: Vec<ChildShard> },
    /// The shard cannot be read (deleted or trimmed away, or a non-retryable error).
    Failed(KinesisApiError),
}

/// A `GetRecords` call that has not answered after this long is abandoned and retried (the SDK
/// sets no operation timeout by default; a hung connection must not stall a shard).
const GET_RECORDS_TIMEOUT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------------------------
// What a record costs.
// ------------------------------------------------------------------------------------------

/// The memory one record takes beyond its data, partition key and sequence number: the
/// `Record` itself (its slot in the batch's `Vec`, with the explicit hash key, a `u128`, inline:
/// `size_of::<Record>()` is 128 bytes on 64-bit targets), the allocator's headers of its two
/// heap strings (partition key, sequence number: 16 bytes each with glibc), and its share of
/// the header of the buffer its data lives in (32 bytes for `Bytes`' shared buffers). Rounded up
/// to leave room for allocator size classes; a test checks it against `size_of::<Record>()`.
pub(crate) const RECORD_OVERHEAD: usize = 256;

/// The largest record Kinesis stores: 1 MiB of data, a partition key of 256 bytes and a
/// sequence number of at most 128 digits.
pub(crate) const LARGEST_RECORD: usize = (1 << 20) + 256 + 128 + RECORD_OVERHEAD;

/// The memory a record holds while it waits for (or is with) its processor: what the prefetch
/// budget counts for it. Its data, partition key and sequence number (KPL sub-records each have
/// their own key and sequence number string, and slices of their aggregate's data), plus
/// [`RECORD_OVERHEAD`].
pub(crate) fn record_footprint(r: &Record) -> usize {
    r.data.len() + r.partition_key.len() + r.sequence_number.as_str().len() + RECORD_OVERHEAD
}

/// The memory a batch of records holds ([`record_footprint`] summed).
pub(crate) fn footprint(records: &[Record]) -> usize {
    records.iter().map(record_footprint).sum()
}

/// The memory a `GetRecords` answer takes while it is received, per byte of records: the body
/// (base64 in JSON, about 1.4 × the data) arrives in the HTTP client's buffers, the SDK copies
/// it into one contiguous buffer, then decodes the records beside it. A heap profile of `kcl
/// consume` (heaptrack) showed about 3.8 × the data at the peak of a call.
const IN_FLIGHT_FACTOR: usize = 4;

/// Expansion ratios are kept in thousandths.
const PER_MILLE: usize = 1000;

// ------------------------------------------------------------------------------------------
// Pacing.
// ------------------------------------------------------------------------------------------

/// The most a shard delivers to its readers: Kinesis' read limit, 2 MiB per second per shard
/// (shared by every polling consumer of the stream).
pub(crate) const SHARD_READ_RATE: usize = 2 << 20;

/// The most one `GetRecords` answer carries: 10 MiB (or 10 000 records).
pub(crate) const MAX_CALL_BYTES: usize = 10 << 20;

/// The records a call of a shard that is behind its tip asks for: what the shard delivers
/// at [`SHARD_READ_RATE`] over `period` (the time since the reader's previous call started,
/// never less than `min_interval`), within [`MAX_CALL_BYTES`] and `max_records`, for records
/// of `data_bytes` of data on average. So a reader keeps up with its shard's read limit
/// however many shards share the worker's budget, and a call made late (its reader waited for
/// its processor or for the budget) asks for the time it missed.
pub(crate) fn records_wanted(
    data_bytes: usize,
    period: Duration,
    min_interval: Duration,
    max_records: u32,
) -> u32 {
    let period = period.max(min_interval);
    let bytes = (SHARD_READ_RATE as f64 * period.as_secs_f64()).min(MAX_CALL_BYTES as f64);
    let records = (bytes / data_bytes.max(1) as f64).ceil();
    // `as` saturates (and maps NaN to 0).
    (records as u32).clamp(1, max_records.max(1))
}

/// The pause before the next call of a shard whose last `empty` answers in a row were empty
/// at its tip: `idle_interval` after the first, doubled after each further one, up to
/// `idle_max_interval` (never less than `idle_interval`); no pause of its own (`ZERO`: the
/// call pace, `min_interval`, applies) once an answer carried records.
pub(crate) fn idle_pause(
    idle_interval: Duration,
    idle_max_interval: Duration,
    empty: u32,
) -> Duration {
    if empty == 0 {
        return Duration::ZERO;
    }
    let doubled = 1u32.checked_shl(empty - 1).unwrap_or(u32::MAX);
    idle_interval
        .checked_mul(doubled)
        .unwrap_or(Duration::MAX)
        .min(idle_max_interval.max(idle_interval))
}

// ------------------------------------------------------------------------------------------
// The budget.
// ------------------------------------------------------------------------------------------

/// The read-ahead budget shared by every reader (polling fetcher or fan-out subscriber) of one
/// worker: the bytes their records hold — in flight, queued and with the processors — counted
/// against a total.
///
/// **Bounds.** A call reserves room for its answer before it is made, so what is in flight is
/// counted as well as what waits. Room is handed out only while the bytes held are below the
/// total; an answer larger than its reservation (records larger than expected) is kept (it is
/// in memory already) and counted over the total, which then blocks every new reservation until
/// enough is released. Each reader holds at most its fair share of the budget — `total /
/// (readers + 1)`, recomputed as readers come and go; the `+ 1` keeps room for a reader that
/// arrives after others filled their shares — plus one call, so a reader whose processor is
/// stuck cannot take the budget from the others.
///
/// **Catching up.** A call asks for the rest of its reader's share, or for what its shard can
/// deliver ([`records_wanted`]: Kinesis' 2 MiB/s since the previous call) if the shard is
/// behind and that is more, always out of the free room. The share therefore bounds what a
/// reader keeps queued, not how fast it reads: a reader whose processor keeps up holds its
/// call's room only while the call is in flight. When the free room makes such a call smaller
/// than wanted, or makes it wait, the budget — not the shard — limits the read rate: the
/// fetcher counts it ([`crate::metrics::PREFETCH_BUDGET_LIMITED_CALLS`]) and
/// [`PrefetchBudget::limited`] warns, at most once a minute.
///
/// **Record sizes.** A reader that has not yet seen its shard's records sizes its calls for the
/// largest ones (1 MiB), then by the average it sees. A reader whose share (or the free room)
/// is smaller than one record's worth still makes calls of one record with what room there is
/// — otherwise it could wait forever beside readers of smaller records — but only one such call
/// is made at a time in the whole worker: the total is therefore exceeded by at most one record
/// (1 MiB) plus answers whose records were more than [`IN_FLIGHT_FACTOR`] times larger than the
/// average their call was sized by.
///
/// **Waiting.** A reader that finds no room for its call registers what it needs (room for
/// one record) and sleeps; a release wakes, in the order they came, only the waiters whose need
/// fits in the room now free — not every waiter (with 1 000 quiet shards waiting, waking them
/// all on every release cost more CPU than their calls). A waiter that needs more than is free
/// is passed over, so it never holds up one that needs less (a FIFO semaphore would). A reader
/// whose own share is full sleeps until its own batches release room. A change of readers
/// (shares change) wakes everyone. Nobody waits while holding room.
#[derive(Debug)]
pub(crate) struct PrefetchBudget {
    total: usize,
    held: Mutex<Held>,
    /// Signalled when a reader comes or goes (every share changes).
    readers_changed: Notify,
    readers: AtomicUsize,
    /// The one call at a time made with less room than one record may need.
    undersized: Arc<Semaphore>,
    /// Calls the budget held back since the worker started (see [`PrefetchBudget::limited`]).
    limited_calls: AtomicU64,
    /// What the budget held back since the last warning about it.
    pressure: Mutex<Pressure>,
}

/// Calls held back by the budget since the last warning (see [`PrefetchBudget::limited`]).
#[derive(Debug, Default)]
struct Pressure {
    calls: u64,
    waited: Duration,
    warned_at: Option<Instant>,
}

/// At most one warning per this long that the budget limits the read rate.
const PRESSURE_WARNING_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Held {
    bytes: usize,
    peak: usize,
    /// Readers waiting for free room, in the order they came (see [`Held::wake_fitting`]).
    waiting: Vec<Waiter>,
}

/// A reader waiting for `need` bytes of free room.
#[derive(Debug)]
struct Waiter {
    need: usize,
    wake: Arc<Wake>,
}

/// How a reader is woken: by the release of its own room (its share was full), or by a
/// release that freed the room it registered for.
#[derive(Debug, Default)]
struct Wake {
    notify: Notify,
    /// Registered in [`Held::waiting`] (read and written under the budget's lock).
    queued: std::sync::atomic::AtomicBool,
}

impl Held {
    /// Registers `wake` as waiting for `need` bytes of free room (once: a reader woken for
    /// another reason keeps its place).
    fn wait_for_room(&mut self, wake: &Arc<Wake>, need: usize) {
        if !wake.queued.swap(true, Ordering::Relaxed) {
            self.waiting.push(Waiter {
                need,
                wake: wake.clone(),
            });
        }
    }

    /// Takes out of the queue, in order, the waiters whose need fits in the room free in a
    /// budget of `total`, counting each one's need as taken; returns them, to be woken once
    /// the lock is released.
    fn wake_fitting(&mut self, total: usize) -> Vec<Arc<Wake>> {
        let mut free = total.saturating_sub(self.bytes);
        if self.waiting.is_empty() || free == 0 {
            return Vec::new();
        }
        let mut woken = Vec::new();
        self.waiting.retain(|w| {
            if w.need <= free {
                free -= w.need;
                w.wake.queued.store(false, Ordering::Relaxed);
                woken.push(w.wake.clone());
                false
            } else {
                true
            }
        });
        woken
    }

    /// Takes `wake` out of the queue (its reader is gone).
    fn forget(&mut self, wake: &Arc<Wake>) {
        if wake.queued.swap(false, Ordering::Relaxed) {
            self.waiting.retain(|w| !Arc::ptr_eq(&w.wake, wake));
        }
    }
}

/// What every reader of this process holds in its budget (see [`prefetch_usage`]).
static PROCESS_HELD: AtomicUsize = AtomicUsize::new(0);
static PROCESS_PEAK: AtomicUsize = AtomicUsize::new(0);

/// The read-ahead memory of every worker of this process, as their prefetch budgets count it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PrefetchUsage {
    /// Bytes held now: records read ahead (until their batch is processed) and room reserved
    /// for `GetRecords` answers in flight.
    pub held: usize,
    /// The most held at once since the process started (or [`reset_prefetch_peak`]).
    pub peak: usize,
}

/// The read-ahead memory every worker of this process holds now, and its peak: the sum of the
/// workers' prefetch budgets' accounting (`PollingConfig::prefetch_bytes` bounds each).
pub fn prefetch_usage() -> PrefetchUsage {
    PrefetchUsage {
        held: PROCESS_HELD.load(Ordering::Relaxed),
        peak: PROCESS_PEAK.load(Ordering::Relaxed),
    }
}

/// Restarts [`PrefetchUsage::peak`] from what is held now (for measurements).
pub fn reset_prefetch_peak() {
    PROCESS_PEAK.store(PROCESS_HELD.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// What a reader may do now (see [`plan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// Its share is full: wait until its processor releases some.
    OwnShareFull,
    /// The budget has no room: wait until someone releases some.
    NoRoom,
    /// Call with `room` bytes reserved, for up to `records` records. `short`: fewer records
    /// than the reader wanted (what its shard can deliver), because the free room was less.
    Call {
        room: usize,
        records: u32,
        short: bool,
    },
    /// Free room, but less than one record may need: a call of one record with `room`
    /// reserved, only by the holder of the worker's single undersized-call slot.
    Undersized { room: usize },
}

/// The decision behind every reservation: a reader holding `mine` bytes, among `readers`
/// readers of a `total` budget of which `held` is held, whose records need `per_record` bytes
/// each while a call is in flight, wants `want` records (what its shard can deliver in this
/// call, see [`records_wanted`]) and may ask for up to `max_records`.
///
/// A reader whose share is not full (its processor keeps up) gets room for the rest of its
/// share, or for the records it wants if that is more (the "plus one call": a share can be
/// smaller than what a shard delivers in one call when a worker holds many shards), or for one
/// record if that is more still — always within the free room, so the total is never exceeded
/// by a reservation.
fn plan(
    total: usize,
    readers: usize,
    held: usize,
    mine: usize,
    per_record: usize,
    want: u32,
    max_records: u32,
) -> Plan {
    let share = total / (readers + 1);
    if mine >= share.max(1) {
        return Plan::OwnShareFull;
    }
    let free = total.saturating_sub(held);
    let per_record = per_record.max(1);
    let max_records = max_records.max(1);
    // Room for what the shard can deliver.
    let wanted = per_record
        .saturating_mul(want.clamp(1, max_records) as usize)
        .min(total);
    // A record needing more than the whole budget is given all of it.
    if free >= per_record.min(total) {
        let desired = (share - mine).max(wanted);
        let room = desired.min(free);
        let records = u32::try_from(room / per_record)
            .unwrap_or(u32::MAX)
            .clamp(1, max_records);
        let room = room.min((records as usize).saturating_mul(per_record));
        Plan::Call {
            room,
            records,
            short: room < wanted,
        }
    } else if free > 0 {
        Plan::Undersized { room: free }
    } else {
        Plan::NoRoom
    }
}

impl PrefetchBudget {
    pub(crate) fn new(total: usize) -> Arc<Self> {
        Arc::new(Self {
            total: total.max(1),
            held: Mutex::new(Held::default()),
            readers_changed: Notify::new(),
            readers: AtomicUsize::new(0),
            undersized: Arc::new(Semaphore::new(1)),
            limited_calls: AtomicU64::new(0),
            pressure: Mutex::new(Pressure::default()),
        })
    }

    /// Calls that the budget held back (see [`PrefetchBudget::limited`]) since it was made.
    #[cfg(test)]
    pub(crate) fn limited_calls(&self) -> u64 {
        self.limited_calls.load(Ordering::Relaxed)
    }

    /// Notes a call of a reader that is behind its shard's tip which the budget, not the
    /// reader's own processor, held back: it asked for fewer records than its shard could
    /// deliver, or waited `waited` for room. Warns — at most once per
    /// [`PRESSURE_WARNING_EVERY`] — that the budget limits the read rate.
    pub(crate) fn limited(&self, waited: Duration) {
        self.limited_calls.fetch_add(1, Ordering::Relaxed);
        let mut p = self.pressure.lock().unwrap_or_else(|p| p.into_inner());
        p.calls += 1;
        p.waited += waited;
        let now = Instant::now();
        if p.warned_at
            .is_none_or(|t| now.duration_since(t) >= PRESSURE_WARNING_EVERY)
        {
            warn!(
                calls = p.calls,
                waited = ?p.waited,
                prefetch_bytes = self.total,
                readers = self.readers.load(Ordering::Relaxed),
                "the prefetch budget limits the read rate of shards that are behind: their calls \
                 ask for less than the shards could deliver, or wait for room; raise \
                 polling.prefetch_bytes (the metric {} counts such calls)",
                m::PREFETCH_BUDGET_LIMITED_CALLS
            );
            *p = Pressure {
                warned_at: Some(now),
                ..Pressure::default()
            };
        }
    }

    /// Bytes held now (over the total while an answer larger than its room is held).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.lock().bytes
    }

    /// The most bytes held at once.
    #[cfg(test)]
    pub(crate) fn peak(&self) -> usize {
        self.lock().peak
    }

    /// Registers a reader: it counts in everyone's fair shares until it is dropped.
    pub(crate) fn reader(self: &Arc<Self>) -> Reader {
        self.readers.fetch_add(1, Ordering::Relaxed);
        self.readers_changed.notify_waiters();
        Reader(Arc::new(ReaderState {
            budget: self.clone(),
            held: AtomicUsize::new(0),
            expansion: AtomicUsize::new(PER_MILLE),
            wake: Arc::default(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, bytes: usize) {
        let mut held = self.lock();
        held.bytes += bytes;
        held.peak = held.peak.max(held.bytes);
        let now = PROCESS_HELD.fetch_add(bytes, Ordering::Relaxed) + bytes;
        PROCESS_PEAK.fetch_max(now, Ordering::Relaxed);
    }

    /// Gives back `bytes` held by the reader woken by `owner`: wakes that reader (its share
    /// may have room again) and the waiters whose need now fits.
    fn release(&self, bytes: usize, owner: &Wake) {
        if bytes == 0 {
            return;
        }
        let woken = {
            let mut held = self.lock();
            held.bytes = held.bytes.saturating_sub(bytes);
            held.wake_fitting(self.total)
        };
        PROCESS_HELD.fetch_sub(bytes, Ordering::Relaxed);
        owner.notify.notify_one();
        for wake in woken {
            wake.notify.notify_one();
        }
    }
}

/// A reader's registration in its budget: counted in the fair shares while it lives.
#[derive(Debug)]
pub(crate) struct Reader(Arc<ReaderState>);

#[derive(Debug)]
struct ReaderState {
    budget: Arc<PrefetchBudget>,
    /// Bytes held by this reader's rooms: in flight, queued and with the processor.
    held: AtomicUsize,
    /// How much larger (in thousandths) its batches became when deaggregated (KPL), as last
    /// measured by the consumer: calls are sized for what their records will hold.
    expansion: AtomicUsize,
    /// Wakes this reader when it waits for room.
    wake: Arc<Wake>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        let budget = &self.0.budget;
        budget.lock().forget(&self.0.wake);
        budget.readers.fetch_sub(1, Ordering::Relaxed);
        // Every share changes; and room this reader was woken for but never took is free.
        budget.readers_changed.notify_waiters();
    }
}

/// Room reserved for one call: the room, the records it may ask for, and — for a call with
/// less room than one record may need — the worker's undersized-call slot, to be given back
/// once the answer is counted.
pub(crate) struct Reservation {
    pub(crate) room: Room,
    pub(crate) records: u32,
    /// The budget, not the reader's own processor, held this call back: it asks for fewer
    /// records than wanted, or waited for room in the budget (see [`Reservation::waited`]).
    pub(crate) limited: bool,
    /// How long the reader waited for room in the budget (not for its own processor).
    pub(crate) waited: Duration,
    _undersized: Option<OwnedSemaphorePermit>,
}

impl Reader {
    /// How many times larger than the records as read their batches will be (deaggregated),
    /// at least 1.
    fn expansion(&self) -> usize {
        self.0.expansion.load(Ordering::Relaxed).max(PER_MILLE)
    }

    /// What one record of `record_bytes` average footprint needs while a call is in flight:
    /// [`IN_FLIGHT_FACTOR`] times what travels in the answer (its data, key and sequence
    /// number), plus [`RECORD_OVERHEAD`] once decoded; or what it holds once deaggregated, if
    /// that is more.
    pub(crate) fn per_record(&self, record_bytes: usize) -> usize {
        let wire = record_bytes.saturating_sub(RECORD_OVERHEAD);
        let in_flight = wire
            .saturating_mul(IN_FLIGHT_FACTOR)
            .saturating_add(RECORD_OVERHEAD);
        let held = record_bytes.saturating_mul(self.expansion()) / PER_MILLE;
        in_flight.max(held)
    }

    fn try_plan(&self, per_record: usize, want: u32, max_records: u32, undersized: bool) -> Plan {
        let budget = &self.0.budget;
        let mut held = budget.lock();
        let readers = budget.readers.load(Ordering::Relaxed);
        let mine = self.0.held.load(Ordering::Relaxed);
        let p = plan(
            budget.total,
            readers,
            held.bytes,
            mine,
            per_record,
            want,
            max_records,
        );
        let room = match p {
            Plan::Call { room, .. } => room,
            Plan::Undersized { room } if undersized => room,
            Plan::Undersized { .. } | Plan::NoRoom => {
                // Woken when room for one record is free (or the undersized slot, for an
                // undersized plan: see `reserve`).
                held.wait_for_room(&self.0.wake, per_record.max(1).min(budget.total));
                return p;
            }
            Plan::OwnShareFull => return p,
        };
        // Taken under the same lock the plan was made under: no one else took it meanwhile.
        // A place still queued (the reader got room another way) would take a later wake-up
        // from a reader that needs it.
        held.forget(&self.0.wake);
        held.bytes += room;
        held.peak = held.peak.max(held.bytes);
        drop(held);
        let now = PROCESS_HELD.fetch_add(room, Ordering::Relaxed) + room;
        PROCESS_PEAK.fetch_max(now, Ordering::Relaxed);
        self.0.held.fetch_add(room, Ordering::Relaxed);
        p
    }

    /// Waits for room for a call of `want` records (what the shard can deliver, see
    /// [`records_wanted`]; more if the reader's share has room for more, up to `max_records`)
    /// of `per_record` bytes each in flight (see [`Reader::per_record`]) and reserves it.
    pub(crate) async fn reserve(
        &self,
        per_record: usize,
        want: u32,
        max_records: u32,
    ) -> Reservation {
        let budget = self.0.budget.clone();
        let mut slot: Option<OwnedSemaphorePermit> = None;
        // Time spent waiting for the budget (not for this reader's own processor).
        let mut waited = Duration::ZERO;
        let mut budget_bound_since: Option<Instant> = None;
        loop {
            // Both registered before checking, so a release in between is not missed (a
            // release for this reader's queued need wakes it with a stored permit, too).
            let readers_changed = budget.readers_changed.notified();
            tokio::pin!(readers_changed);
            readers_changed.as_mut().enable();
            let woken = self.0.wake.notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let p = self.try_plan(per_record, want, max_records, slot.is_some());
            if let Some(since) = budget_bound_since.take() {
                waited += since.elapsed();
            }
            match p {
                Plan::Call {
                    room,
                    records,
                    short,
                } => {
                    return Reservation {
                        room: self.room(room),
                        records,
                        limited: short || !waited.is_zero(),
                        waited,
                        _undersized: None,
                    };
                }
                Plan::Undersized { room } if slot.is_some() => {
                    return Reservation {
                        room: self.room(room),
                        records: 1,
                        limited: true,
                        waited,
                        _undersized: slot,
                    };
                }
                Plan::Undersized { .. } => {
                    // Less free room than one record may need: wait for the worker's
                    // undersized-call slot, or for room to come free meanwhile.
                    budget_bound_since = Some(Instant::now());
                    tokio::select! {
                        permit = budget.undersized.clone().acquire_owned() => slot = permit.ok(),
                        _ = woken => {}
                        _ = readers_changed => {}
                    }
                }
                Plan::NoRoom => {
                    budget_bound_since = Some(Instant::now());
                    tokio::select! {
                        _ = woken => {}
                        _ = readers_changed => {}
                    }
                }
                Plan::OwnShareFull => tokio::select! {
                    _ = woken => {}
                    _ = readers_changed => {}
                },
            }
        }
    }

    /// Waits until this reader may read more: its share is not full and the budget is not
    /// over its total. For readers that cannot reserve before reading (fan-out: events are
    /// pushed, of sizes not known in advance); what they read is then counted with
    /// [`Reader::hold`].
    pub(crate) async fn turn(&self) {
        let budget = &self.0.budget;
        loop {
            let readers_changed = budget.readers_changed.notified();
            tokio::pin!(readers_changed);
            readers_changed.as_mut().enable();
            let woken = self.0.wake.notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            {
                let mut held = budget.lock();
                let readers = budget.readers.load(Ordering::Relaxed);
                let mine = self.0.held.load(Ordering::Relaxed);
                let share = budget.total / (readers + 1);
                if mine < share.max(1) {
                    if held.bytes < budget.total {
                        held.forget(&self.0.wake);
                        return;
                    }
                    // Any free byte will do: what is read is counted after it arrives.
                    held.wait_for_room(&self.0.wake, 1);
                }
            }
            tokio::select! {
                _ = woken => {}
                _ = readers_changed => {}
            }
        }
    }

    /// Counts `records`, already in memory, as held by this reader (over the total if there is
    /// no room: they are here anyway), with the expansion their deaggregation is expected to
    /// add.
    pub(crate) fn hold(&self, records: &[Record]) -> Room {
        let mut room = self.room(0);
        room.read(records);
        room
    }

    fn room(&self, bytes: usize) -> Room {
        Room {
            bytes,
            owner: self.0.clone(),
            read: 0,
        }
    }
}

/// Bytes held in the prefetch budget by one call or batch, given back when dropped.
pub(crate) struct Room {
    bytes: usize,
    owner: Arc<ReaderState>,
    /// The footprint of the records as read (before deaggregation).
    read: usize,
}

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room").field("bytes", &self.bytes).finish()
    }
}

impl Room {
    /// Bytes held.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Resizes to `bytes` without waiting: the excess goes back at once; a shortfall is taken
    /// if free, and otherwise carried over the total (the records are in memory already), which
    /// holds every new reservation back until enough is released. Waiting for more while
    /// holding room could deadlock readers that each hold part of the budget.
    pub(crate) fn fit(&mut self, bytes: usize) {
        let budget = &self.owner.budget;
        if bytes < self.bytes {
            let excess = self.bytes - bytes;
            self.owner.held.fetch_sub(excess, Ordering::Relaxed);
            self.bytes = bytes;
            budget.release(excess, &self.owner.wake);
        } else if bytes > self.bytes {
            let extra = bytes - self.bytes;
            let free = budget.total.saturating_sub(budget.lock().bytes);
            if extra > free {
                debug!(
                    over = extra - free,
                    "records larger than their reservation; carried over the prefetch budget"
                );
            }
            budget.take(extra);
            self.owner.held.fetch_add(extra, Ordering::Relaxed);
            self.bytes = bytes;
        }
    }

    /// Resizes to what `records`, just read, will hold: their footprint, times the expansion
    /// deaggregation added to this reader's previous batches (so the consumer's resize after
    /// deaggregation is small).
    pub(crate) fn read(&mut self, records: &[Record]) {
        self.read = footprint(records);
        let expected = self.read.saturating_mul(self.owner_expansion()) / PER_MILLE;
        self.fit(expected);
    }

    fn owner_expansion(&self) -> usize {
        self.owner.expansion.load(Ordering::Relaxed).max(PER_MILLE)
    }

    /// Resizes to what the batch holds once deaggregated into `records` (KPL sub-records each
    /// get their own key, sequence number string and overhead), without waiting (see
    /// [`Room::fit`]). Never below what was read: sub-records' data are slices that keep their
    /// aggregate's whole buffer alive. The ratio is remembered for the reader's next calls.
    pub(crate) fn deaggregated(&mut self, records: &[Record]) {
        let held = footprint(records).max(self.read);
        if let Some(ratio) = held.saturating_mul(PER_MILLE).checked_div(self.read) {
            // A moving average: one odd batch does not resize every later call.
            let old = self.owner_expansion();
            self.owner
                .expansion
                .store((old * 3 + ratio) / 4, Ordering::Relaxed);
        }
        self.fit(held);
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        self.owner.held.fetch_sub(self.bytes, Ordering::Relaxed);
        self.owner.budget.release(self.bytes, &self.owner.wake);
    }
}

/// A reader task just started: its prefetch queue, and where `LATEST` was for it.
#[derive(Debug)]
pub(crate) struct Reading {
    /// The receiving end of the prefetch queue.
    pub(crate) records: mpsc::Receiver<Fetched>,
    /// For a reader started at `LATEST`: the stream's time ([`KinesisApi::now`]) taken right
    /// before its first `LATEST` position was asked for, so never after it. `LATEST` means "after
    /// what arrived before this moment": the position can be stored as `AT_TIMESTAMP` it, and
    /// the reader itself restarts there (less [`super::LATEST_RESTART_MARGIN`]) if its iterator
    /// or subscription must be made again before it read a record. `None` for other positions.
    pub(crate) latest_at: Option<SystemTime>,
}

/// The stream's time for a reader starting at `position`, if it is `LATEST`: taken now, before
/// the reader's task makes its first call.
pub(crate) fn latest_at(
    kinesis: &dyn KinesisApi,
    position: &IteratorPosition,
) -> Option<SystemTime> {
    (*position == IteratorPosition::Latest).then(|| kinesis.now())
}

/// Starts the fetcher task for `shard`, from `position`. Returns the receiving end of the
/// prefetch queue (and, at `LATEST`, the moment it stands for). The task stops when `stop` is
/// cancelled or the receiver is dropped. Records come as read (KPL aggregates included): the
/// consumer deaggregates them and drops what the checkpoint already covers.
// Each input is distinct (the fetcher and the subscriber take the same ones).
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn_fetcher(
    kinesis: Arc<dyn KinesisApi>,
    stream: String,
    shard: ShardId,
    position: IteratorPosition,
    cfg: PollingConfig,
    budget: Arc<PrefetchBudget>,
    metrics: Arc<crate::metrics::ShardMetrics>,
    stop: CancellationToken,
) -> Reading {
    let (tx, rx) = mpsc::channel(cfg.prefetch_batches);
    let latest_at = latest_at(kinesis.as_ref(), &position);
    let fetcher = Fetcher {
        reader: budget.reader(),
        budget,
        record_bytes: None,
        data_bytes: None,
        behind: false,
        empty_at_tip: 0,
        kinesis,
        stream,
        shard,
        cfg,
        last_read: None,
        latest_at,
        metrics,
    };
    tokio::spawn(async move {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {}
            _ = fetcher.run(position, tx) => {}
        }
    });
    Reading {
        records: rx,
        latest_at,
    }
}

struct Fetcher {
    kinesis: Arc<dyn KinesisApi>,
    stream: String,
    shard: ShardId,
    cfg: PollingConfig,
    reader: Reader,
    budget: Arc<PrefetchBudget>,
    /// Moving average of the footprint of this shard's records (as read), to size calls to
    /// the budget; `None` until records were read: calls are then sized for the largest.
    record_bytes: Option<usize>,
    /// Moving average of the data of this shard's records (what Kinesis' read limit counts),
    /// to ask for what the shard can deliver; `None` until records were read.
    data_bytes: Option<usize>,
    /// The last answer carried records and was behind the tip: the next call asks for what
    /// the shard can deliver (see [`records_wanted`]). At the tip a call asks for what the
    /// reader's share holds: it reads everything there is already.
    behind: bool,
    /// Answers in a row that were empty at the tip (see [`idle_pause`]).
    empty_at_tip: u32,
    /// The last (outer) record read: an expired iterator is renewed after it.
    last_read: Option<SequenceNumber>,
    /// Started at `LATEST`: the stream's time right before the first iterator was asked for.
    latest_at: Option<SystemTime>,
    /// The shard's metric handles.
    metrics: Arc<crate::metrics::ShardMetrics>,
}

impl Fetcher {
    fn backoff(&self) -> impl Iterator<Item = Duration> {
        let seed = crate::backoff::seed(&[&self.stream, self.shard.as_str()]);
        crate::backoff::exponential(Duration::from_millis(100), Duration::from_secs(10), seed)
            .build()
    }

    /// An iterator at `position`, retried while the failures are retryable. A retry is made
    /// at the restart position: once a `LATEST` was asked for, "the tip" means the moment it
    /// was first asked, not a later one.
    async fn iterator(
        &self,
        position: &IteratorPosition,
    ) -> Result<ShardIterator, KinesisApiError> {
        let mut delays = self.backoff();
        let mut position = position.clone();
        loop {
            match self
                .kinesis
                .get_shard_iterator(&self.stream, &self.shard, &position)
                .await
            {
                Err(e) if e.is_retryable() => {
                    position = restart_position(&position, self.latest_at);
                    let d = delays.next().unwrap_or(Duration::from_secs(10));
                    debug!(shard = %self.shard, error = %e, "GetShardIterator failed; retrying");
                    tokio::time::sleep(d).await;
                }
                other => return other,
            }
        }
    }

    /// Position to renew an expired iterator from: after the last record read; before the
    /// first one, where the reader started (`LATEST` as of when it was first asked for).
    fn renew_position(&self, initial: &IteratorPosition) -> IteratorPosition {
        match &self.last_read {
            Some(seq) => IteratorPosition::AfterSequence(seq.clone()),
            None => restart_position(initial, self.latest_at),
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
        let mut last_call: Option<Instant> = None;
        loop {
            tokio::time::sleep_until(next_call).await;
            // Room for the answer is reserved before asking, so the budget bounds what is in
            // flight as well as what waits for the processor (a response held while waiting
            // for room would be outside it). The call asks for what the room reserved holds.
            let per_record = self
                .reader
                .per_record(self.record_bytes.unwrap_or(LARGEST_RECORD));
            // Behind the tip, with the record size known: what the shard delivers since the
            // previous call.
            let want = match (self.behind, self.data_bytes, last_call) {
                (true, Some(data), Some(last)) => records_wanted(
                    data,
                    last.elapsed(),
                    self.cfg.min_interval,
                    self.cfg.max_records,
                ),
                _ => 1,
            };
            let Reservation {
                mut room,
                records: limit,
                limited,
                waited,
                _undersized,
            } = self
                .reader
                .reserve(per_record, want, self.cfg.max_records)
                .await;
            if limited && want > 1 {
                // The budget, not the shard or the processor, sets this shard's pace.
                self.metrics.budget_limited(waited);
                self.budget.limited(waited);
            }
            let started = Instant::now();
            last_call = Some(started);
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
                    drop(room);
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
                    drop(room);
                    if matches!(e, KinesisApiError::Throttled(_)) {
                        self.metrics.read_throttled();
                    } else {
                        self.metrics.read_error();
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
            // A full answer at the tip may have left records behind it too.
            self.behind = !records.is_empty() && (!at_tip || records.len() >= limit as usize);
            if let Some(last) = records.last() {
                self.empty_at_tip = 0;
                self.last_read = Some(last.sequence_number.clone());
                let avg = footprint(&records) / records.len();
                self.record_bytes = Some(match self.record_bytes {
                    // The first records seen replace the guess of the largest at once.
                    None => avg,
                    Some(before) => (before * 3 + avg) / 4,
                });
                let data = records.iter().map(|r| r.data.len()).sum::<usize>() / records.len();
                self.data_bytes = Some(match self.data_bytes {
                    None => data,
                    Some(before) => (before * 3 + data) / 4,
                });
                room.read(&records);
                // The answer is counted: the next undersized call may start.
                drop(_undersized);
                let batch = Fetched::Records {
                    records,
                    millis_behind_latest: out.millis_behind_latest,
                    room,
                };
                if tx.send(batch).await.is_err() {
                    return;
                }
            } else {
                drop(room);
                if at_tip {
                    // Counted from the answer, not the call: a server that answers slowly
                    // (overloaded) is asked less often. Counting from the call's start was
                    // measured on kinesis-local at 16 shards: p50 337 ms instead of 129 ms.
                    // A shard that stays quiet is asked less and less often, up to
                    // `idle_max_interval`; the first answer with records restores the pace.
                    self.empty_at_tip = self.empty_at_tip.saturating_add(1);
                    let pause = idle_pause(
                        self.cfg.idle_interval,
                        self.cfg.idle_max_interval,
                        self.empty_at_tip,
                    );
                    next_call = next_call.max(Instant::now() + pause);
                } else {
                    self.empty_at_tip = 0;
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
    use bytes::Bytes;

    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn the_overhead_constant_covers_a_record_and_its_allocations() {
        // The struct (its slot in a batch's Vec), two heap strings' allocator headers (16 bytes
        // each with glibc) and the shared buffer header of its data (32).
        let least = std::mem::size_of::<Record>() + 2 * 16 + 32;
        assert!(
            RECORD_OVERHEAD >= least,
            "{RECORD_OVERHEAD} < {least} (size_of::<Record>() = {})",
            std::mem::size_of::<Record>()
        );
        // …and does not dwarf small records.
        assert!(RECORD_OVERHEAD <= 2 * least);
        let r = Record::new(
            Bytes::from(vec![0u8; 1000]),
            "pk",
            SequenceNumber::from_u128(7),
            None,
        );
        let seq = r.sequence_number.as_str().len();
        assert_eq!(record_footprint(&r), 1000 + 2 + seq + RECORD_OVERHEAD);
        assert_eq!(
            footprint(&[r.clone(), r]),
            2 * (1000 + 2 + seq + RECORD_OVERHEAD)
        );
    }

    #[test]
    fn plans_size_calls_to_the_share_the_free_room_and_one_record() {
        use Plan::*;
        // (total, readers, held, mine, per_record, max_records) → plan, wanting one record
        #[rustfmt::skip]
        type Case = ((usize, usize, usize, usize, usize, u32), Plan);
        let cases: &[Case] = &[
            // Alone: the share is half the budget (room is kept for a newcomer).
            (
                (1000, 1, 0, 0, 10, 10_000),
                Call {
                    room: 500,
                    records: 50,
                    short: false,
                },
            ),
            // 4 readers: a fifth each; never more records than asked for.
            (
                (1000, 4, 0, 0, 10, 10_000),
                Call {
                    room: 200,
                    records: 20,
                    short: false,
                },
            ),
            (
                (1000, 4, 0, 0, 10, 5),
                Call {
                    room: 50,
                    records: 5,
                    short: false,
                },
            ),
            // Part of the share is held: the rest of it.
            (
                (1000, 4, 0, 150, 10, 10_000),
                Call {
                    room: 50,
                    records: 5,
                    short: false,
                },
            ),
            // The share is full: wait for the own processor, whatever is free.
            ((1000, 4, 0, 200, 10, 10_000), OwnShareFull),
            ((1000, 4, 0, 250, 10, 10_000), OwnShareFull),
            // Less free room than the rest of the share: the free room.
            (
                (1000, 4, 930, 0, 10, 10_000),
                Call {
                    room: 70,
                    records: 7,
                    short: false,
                },
            ),
            // A share smaller than one record: one record's room (the "plus one call").
            (
                (1000, 4, 0, 0, 300, 10_000),
                Call {
                    room: 300,
                    records: 1,
                    short: false,
                },
            ),
            (
                (1000, 4, 0, 150, 300, 10_000),
                Call {
                    room: 300,
                    records: 1,
                    short: false,
                },
            ),
            // Free room, but less than one record may need: an undersized call.
            ((1000, 4, 800, 0, 300, 10_000), Undersized { room: 200 }),
            // No room at all (or over the total: an answer carried over).
            ((1000, 4, 1000, 0, 10, 10_000), NoRoom),
            ((1000, 4, 1200, 0, 10, 10_000), NoRoom),
            // A record needing more than the whole budget gets all of it, when all is free.
            (
                (1000, 1, 0, 0, 4000, 10_000),
                Call {
                    room: 1000,
                    records: 1,
                    short: false,
                },
            ),
            ((1000, 1, 1, 0, 4000, 10_000), Undersized { room: 999 }),
            // 100 fresh readers of a 24 MiB budget, sized for 1 MiB records (4 MiB in flight
            // each): one record's room each while there is room, then undersized calls.
            (
                (24 * MIB, 100, 0, 0, 4 * LARGEST_RECORD, 10_000),
                Call {
                    room: 4 * LARGEST_RECORD,
                    records: 1,
                    short: false,
                },
            ),
            (
                (24 * MIB, 100, 22 * MIB, 0, 4 * LARGEST_RECORD, 10_000),
                Undersized { room: 2 * MIB },
            ),
        ];
        for &((total, readers, held, mine, per, max), want) in cases {
            assert_eq!(
                plan(total, readers, held, mine, per, 1, max),
                want,
                "total {total}, readers {readers}, held {held}, mine {mine}, per record {per}"
            );
        }
    }

    #[test]
    fn calls_of_a_shard_behind_ask_for_what_it_delivers_since_the_previous_call() {
        let ms = Duration::from_millis;
        let min = ms(200);
        // (data bytes per record, time since the previous call, max_records) → records
        let cases: &[((usize, Duration, u32), u32)] = &[
            // 1 KiB records every 200 ms: 2 MiB/s × 0.2 s = 410 records (rounded up).
            ((1024, ms(200), 10_000), 410),
            // Called sooner than min_interval: still sized for min_interval.
            ((1024, ms(50), 10_000), 410),
            // Called late (waited for its processor or the budget): the time it missed.
            ((1024, ms(500), 10_000), 1024),
            // Never more than one answer carries: 10 MiB…
            ((1024, Duration::from_secs(60), 10_000), 10_000),
            ((100 << 10, Duration::from_secs(60), 10_000), 103),
            // …nor than max_records.
            ((1024, ms(200), 100), 100),
            ((16, ms(200), 10_000), 10_000),
            // At least one record, however large.
            ((1 << 20, ms(200), 10_000), 1),
            ((0, ms(200), 10_000), 10_000),
            ((1024, ms(200), 0), 1),
        ];
        for &((data, period, max), want) in cases {
            assert_eq!(
                records_wanted(data, period, min, max),
                want,
                "{data} B, {period:?}, max {max}"
            );
        }
    }

    #[test]
    fn quiet_shards_back_off_to_the_idle_maximum_and_records_restore_the_pace() {
        let ms = Duration::from_millis;
        // (idle_interval, idle_max_interval, empty answers in a row) → pause
        let cases: &[((Duration, Duration, u32), Duration)] = &[
            // An answer with records (or not at the tip): no idle pause.
            ((ms(200), ms(1000), 0), Duration::ZERO),
            // 200, 400, 800, then 1 s from then on.
            ((ms(200), ms(1000), 1), ms(200)),
            ((ms(200), ms(1000), 2), ms(400)),
            ((ms(200), ms(1000), 3), ms(800)),
            ((ms(200), ms(1000), 4), ms(1000)),
            ((ms(200), ms(1000), 40), ms(1000)),
            ((ms(200), ms(1000), u32::MAX), ms(1000)),
            // A maximum below idle_interval: idle_interval.
            ((ms(2000), ms(1000), 1), ms(2000)),
            ((ms(2000), ms(1000), 9), ms(2000)),
            // Backoff off: idle_max_interval = idle_interval.
            ((ms(200), ms(200), 5), ms(200)),
            // No idle pause at all.
            ((Duration::ZERO, ms(1000), 7), Duration::ZERO),
        ];
        for &((idle, max, empty), want) in cases {
            assert_eq!(
                idle_pause(idle, max, empty),
                want,
                "{idle:?} up to {max:?} after {empty}"
            );
        }
    }

    #[test]
    fn a_shard_behind_asks_for_what_it_delivers_beyond_its_share_within_the_free_room() {
        use Plan::*;
        // 64 shards of 1 KiB records on the default 24 MiB budget: a share of 378 KiB, 4.6 KiB
        // per record in flight.
        let per = 4 * (1024 + 5 + 56) + RECORD_OVERHEAD;
        let share = 24 * MIB / 65;
        // (held, mine, want) → plan
        let cases: &[((usize, usize, u32), Plan)] = &[
            // Behind, processor caught up: all 410 records the shard delivers in 200 ms.
            (
                (0, 0, 410),
                Call {
                    room: 410 * per,
                    records: 410,
                    short: false,
                },
            ),
            // Part of the share held: still the whole call.
            (
                (10 * MIB, share / 2, 410),
                Call {
                    room: 410 * per,
                    records: 410,
                    short: false,
                },
            ),
            // Share full (its processor lags): waits for it, not for the budget.
            ((0, share, 410), OwnShareFull),
            // Less free room than the call: a short call (the budget limits the rate).
            (
                (24 * MIB - 100 * per, 0, 410),
                Call {
                    room: 100 * per,
                    records: 100,
                    short: true,
                },
            ),
            // Wanting little: the rest of the share, as before.
            (
                (0, 0, 1),
                Call {
                    room: share / per * per,
                    records: (share / per) as u32,
                    short: false,
                },
            ),
        ];
        for &((held, mine, want), expected) in cases {
            assert_eq!(
                plan(24 * MIB, 64, held, mine, per, want, 10_000),
                expected,
                "held {held}, mine {mine}, want {want}"
            );
        }
    }

    #[test]
    fn a_record_in_flight_needs_four_times_what_travels_plus_its_overhead() {
        let budget = PrefetchBudget::new(24 * MIB);
        let reader = budget.reader();
        // 1 KiB of data, a 5-byte key, a 56-digit sequence number.
        let one_kib = 1024 + 5 + 56 + RECORD_OVERHEAD;
        assert_eq!(
            reader.per_record(one_kib),
            4 * (1024 + 5 + 56) + RECORD_OVERHEAD
        );
        // 16 shards of such records share the default 24 MiB: ~320 records per call, ~1.6 MiB
        // per second per shard at 5 calls/s.
        let _others: Vec<_> = (0..15).map(|_| budget.reader()).collect();
        match plan(24 * MIB, 16, 0, 0, reader.per_record(one_kib), 1, 10_000) {
            Plan::Call { records, .. } => assert_eq!(records, 322),
            other => panic!("{other:?}"),
        }
        // Unknown sizes: the largest record, 4 MiB in flight.
        assert!(reader.per_record(LARGEST_RECORD) > 4 * MIB);
        // Batches that grow tenfold when deaggregated need that much.
        reader.0.expansion.store(10 * PER_MILLE, Ordering::Relaxed);
        assert_eq!(reader.per_record(one_kib), 10 * one_kib);
    }

    #[test]
    fn a_release_wakes_in_order_only_the_waiters_whose_need_fits() {
        // (held before the release, needs queued in order) -> woken (by index), left queued.
        #[allow(clippy::type_complexity)]
        let cases: &[(usize, &[usize], &[usize], &[usize])] = &[
            // Nothing free: nobody.
            (1000, &[100, 200], &[], &[100, 200]),
            // 400 free: the first two fit (100 + 200), the third (200) no longer does.
            (600, &[100, 200, 200], &[0, 1], &[200]),
            // A large need is passed over, a smaller one behind it is woken.
            (700, &[500, 100, 300], &[1], &[500, 300]),
            // 1 000 quiet shards each needing 4 units, 8 free: two of them, not all.
            (992, &[4; 1000], &[0, 1], &[4; 998]),
        ];
        for (held_bytes, needs, woken, left) in cases {
            let wakes: Vec<Arc<Wake>> = needs.iter().map(|_| Arc::default()).collect();
            let mut held = Held {
                bytes: *held_bytes,
                ..Held::default()
            };
            for (wake, need) in wakes.iter().zip(needs.iter()) {
                held.wait_for_room(wake, *need);
                // Registered once however often it waits.
                held.wait_for_room(wake, *need);
            }
            let got: Vec<usize> = held
                .wake_fitting(1000)
                .iter()
                .map(|w| wakes.iter().position(|x| Arc::ptr_eq(x, w)).unwrap())
                .collect();
            assert_eq!(&got, woken, "held {held_bytes}, needs {needs:?}");
            let still: Vec<usize> = held.waiting.iter().map(|w| w.need).collect();
            assert_eq!(&still, left, "held {held_bytes}, needs {needs:?}");
            for (i, wake) in wakes.iter().enumerate() {
                assert_eq!(wake.queued.load(Ordering::Relaxed), !woken.contains(&i));
            }
        }
    }

    #[tokio::test]
    async fn a_waiter_that_got_room_another_way_gives_up_its_place() {
        let budget = PrefetchBudget::new(1000);
        let (a, b, c) = (budget.reader(), budget.reader(), budget.reader());
        let mut full = c.reserve(10, 1, 10_000).await;
        full.room.fit(1000);
        // `a` and `b` wait for 250 each (4 readers: shares of 250).
        let wa = a.reserve(250, 1, 10_000);
        let wb = b.reserve(250, 1, 10_000);
        tokio::pin!(wa, wb);
        assert!(futures::poll!(wa.as_mut()).is_pending());
        assert!(futures::poll!(wb.as_mut()).is_pending());
        assert_eq!(budget.lock().waiting.len(), 2);
        // 250 free: `a`, first in line, is woken and gets it.
        full.room.fit(750);
        let got_a = match futures::poll!(wa.as_mut()) {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => panic!("the first waiter was not woken"),
        };
        assert_eq!(got_a.room.bytes(), 250);
        assert!(futures::poll!(wb.as_mut()).is_pending());
        // `b` is still in line, and gets the next 250.
        full.room.fit(500);
        assert!(matches!(
            futures::poll!(wb.as_mut()),
            std::task::Poll::Ready(_)
        ));
        assert!(budget.lock().waiting.is_empty());
        // A reader that leaves while queued leaves the line.
        full.room.fit(2000);
        let wd = {
            let d = budget.reader();
            let mut w = Box::pin(async move { d.reserve(400, 1, 10_000).await });
            assert!(futures::poll!(w.as_mut()).is_pending());
            w
        };
        assert_eq!(budget.lock().waiting.len(), 1);
        drop(wd);
        assert!(budget.lock().waiting.is_empty());
    }

    #[tokio::test]
    async fn rooms_are_counted_until_dropped_and_resized_without_waiting() {
        let budget = PrefetchBudget::new(1000);
        let a = budget.reader();
        let b = budget.reader();
        let before = prefetch_usage().held;
        // 2 readers: shares of 333.
        let mut r = a.reserve(10, 1, 10_000).await;
        assert_eq!((r.room.bytes(), r.records), (330, 33));
        assert_eq!(budget.held(), 330);
        assert!(prefetch_usage().peak >= before + 330);
        // Smaller answer: the excess goes back at once.
        r.room.fit(100);
        assert_eq!(budget.held(), 100);
        // Larger, room free: taken.
        r.room.fit(300);
        assert_eq!(budget.held(), 300);
        // Larger than the free room: carried over the total, counted, and every new
        // reservation waits until enough is released.
        let other = b.reserve(10, 1, 10_000).await;
        assert_eq!(other.room.bytes(), 330);
        r.room.fit(900);
        assert_eq!(budget.held(), 1230);
        assert_eq!(budget.peak(), 1230);
        let blocked = b.reserve(10, 1, 10_000);
        tokio::pin!(blocked);
        assert!(futures::poll!(blocked.as_mut()).is_pending());
        drop(r);
        assert_eq!(budget.held(), 330);
        assert!(matches!(
            futures::poll!(blocked.as_mut()),
            std::task::Poll::Ready(_)
        ));
        drop(other);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_reader_holds_at_most_its_share_plus_one_call() {
        let budget = PrefetchBudget::new(1000);
        let stuck = budget.reader();
        let _other = budget.reader();
        // Its whole share (333) reserved and kept (its processor does not process).
        let first = stuck.reserve(1, 1, 10_000).await;
        let second = stuck.reserve(1, 1, 10_000);
        tokio::pin!(second);
        assert!(futures::poll!(second.as_mut()).is_pending());
        // The others are not held up by it: the rest is theirs.
        let r = _other.reserve(1, 1, 10_000).await;
        assert_eq!(r.room.bytes(), 333);
        // When it processes, it may read again.
        drop(first);
        assert!(matches!(
            futures::poll!(second.as_mut()),
            std::task::Poll::Ready(_)
        ));
    }

    #[tokio::test]
    async fn shares_follow_the_readers() {
        let budget = PrefetchBudget::new(1200);
        let a = budget.reader();
        let held = a.reserve(10, 1, 10_000).await; // 600: half, alone
        assert_eq!(held.room.bytes(), 600);
        let more = a.reserve(10, 1, 10_000);
        tokio::pin!(more);
        assert!(futures::poll!(more.as_mut()).is_pending());
        let others: Vec<_> = (0..2).map(|_| budget.reader()).collect();
        // 3 readers: shares of 300; `a` holds twice its share, and waits.
        assert!(futures::poll!(more.as_mut()).is_pending());
        drop(others);
        drop(held);
        // Alone again, nothing held: half the budget.
        let Reservation { room, .. } = more.await;
        assert_eq!(room.bytes(), 600);
    }

    #[tokio::test]
    async fn a_reader_waiting_for_a_large_room_does_not_hold_up_smaller_ones() {
        let budget = PrefetchBudget::new(1000);
        let (big, big2, small, filler) = (
            budget.reader(),
            budget.reader(),
            budget.reader(),
            budget.reader(),
        );
        // Everything held by others: `filler` holds its share, plus an over-budget answer.
        let mut full = filler.reserve(10, 1, 10_000).await;
        full.room.fit(1000);
        // One undersized call in flight (the worker's only slot)…
        full.room.fit(700);
        let in_flight = big2.reserve(600, 1, 10_000).await;
        assert_eq!((in_flight.room.bytes(), in_flight.records), (300, 1));
        assert!(in_flight._undersized.is_some());
        // …so `big` (600 per record) waits for the slot.
        let waiting = big.reserve(600, 1, 10_000);
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        // Room comes free: a smaller reader, who came later, gets it at once.
        full.room.fit(400);
        let got = small.reserve(100, 1, 10_000).await;
        assert_eq!((got.room.bytes(), got.records), (200, 2));
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        // When the undersized call is counted, `big` gets the slot and the free room.
        drop(got);
        drop(in_flight);
        let Reservation { room, records, .. } = waiting.await;
        assert_eq!((room.bytes(), records), (600, 1));
    }

    #[tokio::test]
    async fn deaggregation_grows_the_room_and_sizes_the_next_calls() {
        let budget = PrefetchBudget::new(100 * MIB);
        let reader = budget.reader();
        let record = |pk: &str, n: usize| {
            Record::new(
                Bytes::from(vec![0u8; n]),
                pk,
                SequenceNumber::from_u128(1),
                None,
            )
        };
        let aggregate = [record("agg", 10_000)];
        let subs: Vec<Record> = (0..100).map(|i| record(&format!("k{i}"), 100)).collect();
        let mut res = reader
            .reserve(reader.per_record(LARGEST_RECORD), 1, 10)
            .await;
        res.room.read(&aggregate);
        assert_eq!(res.room.bytes(), footprint(&aggregate));
        res.room.deaggregated(&subs);
        assert_eq!(res.room.bytes(), footprint(&subs));
        assert!(footprint(&subs) > 3 * footprint(&aggregate));
        // Later batches are sized and held for what they will be once deaggregated: 100
        // sub-records of ~360 bytes per 10 KiB aggregate (a quarter of the ratio is learned per
        // batch).
        let ratio = footprint(&subs) * PER_MILLE / footprint(&aggregate);
        assert_eq!(reader.expansion(), (PER_MILLE * 3 + ratio) / 4);
        // Never below what was read: sub-records keep their aggregate's buffer alive.
        let mut res = reader.reserve(reader.per_record(10_000), 1, 10).await;
        res.room.read(&aggregate);
        res.room.deaggregated(&subs[..1]);
        assert_eq!(res.room.bytes(), footprint(&aggregate));
    }
}

#[cfg(all(test, feature = "testkit"))]
mod fetcher_tests {
    use std::sync::Mutex as StdMutex;

    use async_trait::async_trait;
    use bytes::Bytes;

    use super::*;
    use crate::retrieval::GetRecordsOutput;
    use crate::shard::Shard;
    use crate::testkit::MemKinesis;

    /// [`MemKinesis`], noting the `limit` of every `GetRecords` call.
    #[derive(Debug, Clone, Default)]
    struct Limits {
        inner: MemKinesis,
        limits: Arc<StdMutex<Vec<u32>>>,
        /// When each call was made.
        calls: Arc<StdMutex<Vec<Instant>>>,
    }

    impl Limits {
        fn calls(&self) -> Vec<Instant> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }
    }

    #[async_trait]
    impl KinesisApi for Limits {
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
            if let Ok(mut l) = self.limits.lock() {
                l.push(limit);
            }
            if let Ok(mut c) = self.calls.lock() {
                c.push(Instant::now());
            }
            self.inner.get_records(iterator, limit).await
        }

        fn now(&self) -> std::time::SystemTime {
            self.inner.now()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_fetcher_sizes_its_calls_for_the_largest_records_until_it_knows() {
        let k = Limits::default();
        k.inner.create_stream("s", 1);
        let shard = k.inner.open_shard_ids("s")[0].clone();
        for _ in 0..50 {
            k.inner.put("s", "key", Bytes::from(vec![0u8; 500 << 10]));
        }
        // 40 MiB, alone: a 20 MiB share, 4 records of 1 MiB in flight (4 MiB each).
        let budget = PrefetchBudget::new(40 << 20);
        let mut rx = spawn_fetcher(
            Arc::new(k.clone()),
            "s".into(),
            shard,
            IteratorPosition::TrimHorizon,
            PollingConfig::default(),
            budget.clone(),
            crate::metrics::ShardMetrics::detached(),
            CancellationToken::new(),
        )
        .records;
        let mut got = 0;
        while got < 50 {
            match rx.recv().await {
                Some(Fetched::Records { records, .. }) => got += records.len(),
                other => panic!("unexpected {other:?}"),
            }
            // Never more than the budget is held (nothing here is larger than expected).
            assert!(budget.peak() <= 40 << 20, "{}", budget.peak());
        }
        let limits = k.limits.lock().map(|l| l.clone()).unwrap_or_default();
        assert_eq!(limits[0], 4, "{limits:?}");
        // Then at the size seen (500 KiB, 2 MiB in flight): up to 10 records in a 20 MiB share.
        assert!(limits[1] > 4 && limits[1] <= 10, "{limits:?}");
    }

    /// Starts a fetcher on every shard of `k`'s stream "s" with the default settings and
    /// `budget`, `stagger` apart, and a processor that keeps up (drops each batch as it
    /// arrives) for each; returns when each shard delivered `per_shard` records, with the tokio
    /// time that took per shard (from its own start).
    async fn drain_all(
        k: &MemKinesis,
        budget: &Arc<PrefetchBudget>,
        per_shard: usize,
        stagger: Duration,
    ) -> Vec<Duration> {
        let mut drains = Vec::new();
        for shard in k.open_shard_ids("s") {
            tokio::time::sleep(stagger).await;
            let t0 = Instant::now();
            let mut rx = spawn_fetcher(
                Arc::new(k.clone()),
                "s".into(),
                shard,
                IteratorPosition::TrimHorizon,
                PollingConfig::default(),
                budget.clone(),
                crate::metrics::ShardMetrics::detached(),
                CancellationToken::new(),
            )
            .records;
            drains.push(tokio::spawn(async move {
                let mut got = 0;
                while got < per_shard {
                    match rx.recv().await {
                        Some(Fetched::Records { records, .. }) => got += records.len(),
                        other => panic!("unexpected {other:?}"),
                    }
                }
                t0.elapsed()
            }));
        }
        let mut took = Vec::new();
        for d in drains {
            took.push(d.await.expect("drain task"));
        }
        took
    }

    /// A stream "s" of `shards` shards with `per_shard` records of `size` bytes each, written
    /// a minute ago (so readers are behind), read limits enforced. The records share one
    /// buffer: the budget counts their size, the test's memory does not grow with it.
    async fn backlog(shards: usize, per_shard: usize, size: usize) -> MemKinesis {
        let k = MemKinesis::new();
        k.create_stream("s", shards);
        k.enforce_read_limits(true);
        let data = Bytes::from(vec![7u8; size]);
        for shard in k.list_shards("s").await.expect("list") {
            for _ in 0..per_shard {
                k.put_with_hash("s", "key", shard.hash_range.start(), data.clone());
            }
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        k
    }

    #[tokio::test(start_paused = true)]
    async fn sixty_four_shards_behind_catch_up_at_the_shard_read_limit_on_the_default_budget() {
        // 64 shards, each 16 MiB behind (8 s at 2 MiB/s), records of 16 KiB; a reader's share
        // of the default 24 MiB is 378 KiB, less than the 1.7 MiB a 200 ms call needs in
        // flight. Before calls were sized by what the shard delivers, each read 5 records per
        // call (0.41 MB/s).
        let (shards, per_shard, size) = (64, 1024, 16 << 10);
        let k = backlog(shards, per_shard, size).await;
        let budget = PrefetchBudget::new(PollingConfig::default().prefetch_bytes);
        // Started 3 ms apart, as leases are taken: tokio's paused clock would otherwise make
        // every call of every shard at the same instant, before any processor ran.
        let took = drain_all(&k, &budget, per_shard, Duration::from_millis(3)).await;
        let slowest = took.iter().max().copied().unwrap_or_default();
        // Tokio's paused clock: deterministic, whatever the machine does.
        let rate = (per_shard * size) as f64 / slowest.as_secs_f64();
        assert!(
            rate >= 1.9e6,
            "the slowest shard read {rate:.0} B/s (drained in {slowest:?})"
        );
        assert_eq!(k.throttled_reads(), 0, "read faster than the shard allows");
        // Memory stayed within the budget, and the budget never held the readers back.
        assert!(
            budget.peak() <= PollingConfig::default().prefetch_bytes,
            "{}",
            budget.peak()
        );
        assert_eq!(budget.limited_calls(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_too_small_for_the_shards_behind_is_reported() {
        // 16 shards behind, each wanting 1.7 MiB in flight per call, on a 2 MiB budget.
        let (shards, per_shard, size) = (16, 128, 16 << 10);
        let k = backlog(shards, per_shard, size).await;
        let budget = PrefetchBudget::new(2 << 20);
        // All at once: their calls are made at the same instants, before any processor ran.
        drain_all(&k, &budget, per_shard, Duration::ZERO).await;
        assert!(budget.limited_calls() > 0);
        // Still within the budget (plus one record at most).
        assert!(
            budget.peak() <= (2 << 20) + LARGEST_RECORD,
            "{}",
            budget.peak()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_shard_is_polled_less_and_less_and_records_restore_the_pace() {
        let k = Limits::default();
        k.inner.create_stream("s", 1);
        let shard = k.inner.open_shard_ids("s")[0].clone();
        let t0 = Instant::now();
        let mut rx = spawn_fetcher(
            Arc::new(k.clone()),
            "s".into(),
            shard,
            IteratorPosition::TrimHorizon,
            PollingConfig::default(),
            PrefetchBudget::new(24 << 20),
            crate::metrics::ShardMetrics::detached(),
            CancellationToken::new(),
        )
        .records;
        tokio::time::sleep(Duration::from_millis(10_100)).await;
        let since = |calls: &[Instant]| -> Vec<u64> {
            calls
                .iter()
                .map(|c| c.duration_since(t0).as_millis() as u64)
                .collect()
        };
        // Quiet: after 200, 400, 800 ms, then every second (the default idle_max_interval),
        // not every 200 ms (50 calls).
        let quiet = since(&k.calls());
        assert_eq!(
            quiet,
            [0, 200, 600, 1400, 2400, 3400, 4400, 5400, 6400, 7400, 8400, 9400],
            "{quiet:?}"
        );
        // A record arrives: read at the next call (within a second)…
        k.inner.put("s", "key", "hello");
        assert_eq!(take(&mut rx, 1).await, ["hello"]);
        let read_at = Instant::now().duration_since(t0).as_millis() as u64;
        assert_eq!(read_at, 10_400);
        // …and the pace is back: the next call comes min_interval (200 ms) later, then, as the
        // shard is quiet again, 200 ms, 400 ms… after the answers.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let after = since(&k.calls()[quiet.len()..]);
        assert_eq!(after, [10_400, 10_600, 10_800], "{after:?}");
    }

    /// Receives batches until `n` records arrived (a minute of tokio time at most).
    async fn take(rx: &mut mpsc::Receiver<Fetched>, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        let read = async {
            while out.len() < n {
                match rx.recv().await {
                    Some(Fetched::Records { records, .. }) => out.extend(
                        records
                            .iter()
                            .map(|r| String::from_utf8_lossy(&r.data).into_owned()),
                    ),
                    other => panic!("after {out:?}: unexpected {other:?}"),
                }
            }
        };
        let timed_out = tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .is_err();
        assert!(!timed_out, "only {out:?} of {n} records arrived");
        out
    }

    #[tokio::test(start_paused = true)]
    async fn an_iterator_expiring_before_the_first_record_restarts_where_latest_was() {
        use crate::testkit::{Fault, FaultKind};
        let k = MemKinesis::new();
        k.create_stream("s", 1);
        let shard = k.open_shard_ids("s")[0].clone();
        k.put("s", "key", "old");
        tokio::time::advance(Duration::from_secs(10)).await;
        // The first 5 reads find their iterator expired (one every 200 ms): each time a new
        // one is taken before any record was read.
        k.faults().inject(
            Fault::new(FaultKind::ExpiredIterator)
                .on("get_records")
                .times(5),
        );
        let t0 = k.now();
        let Reading {
            records: mut rx,
            latest_at,
        } = spawn_fetcher(
            Arc::new(k.clone()),
            "s".into(),
            shard.clone(),
            IteratorPosition::Latest,
            PollingConfig::default(),
            PrefetchBudget::new(1 << 20),
            crate::metrics::ShardMetrics::detached(),
            CancellationToken::new(),
        );
        assert_eq!(
            latest_at,
            Some(t0),
            "LATEST is the stream's time at the start"
        );
        // Written after LATEST was taken, before the iterator is renewed: a renewal at a fresh
        // LATEST skipped it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        k.put("s", "key", "new");
        // The renewal goes back a second before t0 (clock skew), not to "old" (10 s before).
        assert_eq!(take(&mut rx, 1).await, ["new"]);

        // Positions other than LATEST have no LATEST time.
        let other = spawn_fetcher(
            Arc::new(k.clone()),
            "s".into(),
            shard,
            IteratorPosition::TrimHorizon,
            PollingConfig::default(),
            PrefetchBudget::new(1 << 20),
            crate::metrics::ShardMetrics::detached(),
            CancellationToken::new(),
        );
        assert_eq!(other.latest_at, None);
    }
}
