//! A small, faithful in-memory Kinesis: shards with hash ranges, MD5 partition-key routing,
//! 56-digit sequence numbers (more than a `u128` holds, as on AWS), split / merge /
//! update-shard-count with closed shards readable to their end and `ChildShards` at the end,
//! retention trimming, iterator expiry after 5 minutes, and fault injection.
//!
//! Time comes from tokio's clock (wall time = creation time + tokio's elapsed time), so it
//! runs exactly under `tokio::time::pause()`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::fault::{FaultKind, Faults, Injected};
use crate::record::{Record, SequenceNumber};
use crate::retrieval::{
    GetRecordsOutput, IteratorPosition, KinesisApi, KinesisApiError, ShardIterator,
};
use crate::shard::{hash_key, ChildShard, HashKeyRange, Shard, ShardId};

/// Sequence numbers are this prefix followed by a 52-digit counter: 56 digits, like AWS's.
const SEQ_PREFIX: &str = "4959";
const SEQ_DIGITS: usize = 52;
/// Shard iterators expire after this long, as on AWS.
const ITERATOR_TTL: Duration = Duration::from_secs(300);
/// The most payload one `GetRecords` returns.
const MAX_RESPONSE_BYTES: usize = 10 * 1024 * 1024;

/// The in-memory Kinesis. Clones share the same streams.
#[derive(Clone, Debug)]
pub struct MemKinesis {
    inner: Arc<Mutex<State>>,
    faults: Faults,
}

#[derive(Debug)]
struct State {
    epoch_wall: SystemTime,
    epoch: Instant,
    /// Global sequence counter: sequence numbers rise across shards over time, as on AWS.
    seq: u128,
    streams: BTreeMap<String, Stream>,
    /// When set, each shard allows 5 `GetRecords` calls and 2 MiB per second, as on AWS.
    read_limits: bool,
    /// Recent reads per (stream, shard): when, and how many bytes.
    reads: BTreeMap<(String, String), std::collections::VecDeque<(Instant, usize)>>,
    /// Reads refused by the limits.
    throttled: u64,
    /// Enhanced fan-out: registered consumers and their subscriptions.
    fan_out: FanOutState,
    /// When set, reads return copies of the records' data (see [`MemKinesis::copy_reads`]).
    copy_reads: bool,
}

#[derive(Debug, Default)]
struct Stream {
    shards: Vec<MemShard>,
    /// When it was created (this Kinesis' clock).
    created: Option<SystemTime>,
}

#[derive(Debug)]
struct MemShard {
    id: ShardId,
    parents: Vec<ShardId>,
    range: HashKeyRange,
    start: u128,
    end: Option<u128>,
    closed_at: Option<SystemTime>,
    records: Vec<Stored>,
    /// Set once retention trimmed every record of a closed shard: no longer listed.
    expired: bool,
}

#[derive(Debug, Clone)]
struct Stored {
    seq: u128,
    data: Bytes,
    key: Arc<str>,
    arrival: SystemTime,
}

fn seq_string(n: u128) -> SequenceNumber {
    let s = format!("{SEQ_PREFIX}{n:0width$}", width = SEQ_DIGITS);
    SequenceNumber::parse(&s).unwrap_or_else(|_| SequenceNumber::from_u128(n))
}

fn seq_value(s: &SequenceNumber) -> Result<u128, KinesisApiError> {
    s.as_str()
        .strip_prefix(SEQ_PREFIX)
        .filter(|rest| rest.len() == SEQ_DIGITS)
        .and_then(|rest| rest.parse().ok())
        .ok_or_else(|| KinesisApiError::Other(format!("invalid sequence number {s}").into()))
}

impl Default for MemKinesis {
    fn default() -> Self {
        Self::new()
    }
}

impl MemKinesis {
    /// An empty Kinesis.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(State {
                epoch_wall: SystemTime::now(),
                epoch: Instant::now(),
                seq: 0,
                streams: BTreeMap::new(),
                read_limits: false,
                reads: BTreeMap::new(),
                throttled: 0,
                fan_out: FanOutState::default(),
                copy_reads: false,
            })),
            faults: Faults::default(),
        }
    }

    /// The fault rules applied to the seam's operations (`list_shards`, `get_shard_iterator`,
    /// `get_records`).
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enforces (or stops enforcing) AWS's per-shard read limits: 5 `GetRecords` calls and
    /// 2 MiB per second, shared by every reader; excess calls fail as throttled.
    pub fn enforce_read_limits(&self, on: bool) {
        self.lock().read_limits = on;
    }

    /// When `on`, every read (`GetRecords`, fan-out events) returns freshly allocated copies of
    /// the records' data, as a network client does, instead of sharing the stored buffers: a
    /// measurement of the memory a reader holds (a counting allocator) then sees its records.
    pub fn copy_reads(&self, on: bool) {
        self.lock().copy_reads = on;
    }

    /// How many `GetRecords` calls the read limits refused.
    pub fn throttled_reads(&self) -> u64 {
        self.lock().throttled
    }

    /// The current wall time of this Kinesis (follows tokio's clock).
    pub fn now(&self) -> SystemTime {
        self.lock().now()
    }

    /// Creates a stream with `shards` shards splitting the hash-key space evenly.
    ///
    /// # Panics
    /// If `shards` is 0 or the stream exists.
    pub fn create_stream(&self, name: &str, shards: usize) {
        assert!(shards > 0, "a stream needs at least one shard");
        let mut st = self.lock();
        assert!(!st.streams.contains_key(name), "stream {name} exists");
        let start = st.seq + 1;
        let mut stream = Stream {
            created: Some(st.epoch_wall + st.epoch.elapsed()),
            ..Stream::default()
        };
        for (i, range) in even_ranges(HashKeyRange::FULL, shards)
            .into_iter()
            .enumerate()
        {
            stream
                .shards
                .push(MemShard::new(shard_id(i), vec![], range, start));
        }
        st.streams.insert(name.to_owned(), stream);
    }

    /// Puts one record; returns its shard and sequence number.
    ///
    /// # Panics
    /// If the stream does not exist.
    pub fn put(
        &self,
        stream: &str,
        partition_key: &str,
        data: impl Into<Bytes>,
    ) -> (ShardId, SequenceNumber) {
        self.put_with_hash(stream, partition_key, hash_key(partition_key), data.into())
    }

    /// Puts one record routed by an explicit hash key.
    ///
    /// # Panics
    /// If the stream does not exist.
    pub fn put_with_hash(
        &self,
        stream: &str,
        partition_key: &str,
        hash: u128,
        data: Bytes,
    ) -> (ShardId, SequenceNumber) {
        let mut st = self.lock();
        let now = st.now();
        st.seq += 1;
        let seq = st.seq;
        let s = st.stream_mut(stream);
        let shard = s
            .shards
            .iter_mut()
            .find(|sh| sh.end.is_none() && sh.range.contains(hash))
            .expect("open shards cover the hash-key space");
        shard.records.push(Stored {
            seq,
            data,
            key: partition_key.into(),
            arrival: now,
        });
        (shard.id.clone(), seq_string(seq))
    }

    /// Splits an open shard at `new_starting_hash_key`; returns the two children.
    ///
    /// # Panics
    /// If the shard is not open or the hash key is not inside its range.
    pub fn split(
        &self,
        stream: &str,
        shard: &ShardId,
        new_starting_hash_key: u128,
    ) -> (ShardId, ShardId) {
        let mut st = self.lock();
        let now = st.now();
        st.seq += 1;
        let seq = st.seq;
        let s = st.stream_mut(stream);
        let n = s.shards.len();
        let parent = s.open_shard_mut(shard);
        let (lo, hi) = parent
            .range
            .split_at(new_starting_hash_key)
            .expect("split point inside the shard's range");
        parent.close(seq, now);
        let a = MemShard::new(shard_id(n), vec![shard.clone()], lo, seq + 1);
        let b = MemShard::new(shard_id(n + 1), vec![shard.clone()], hi, seq + 1);
        let ids = (a.id.clone(), b.id.clone());
        s.shards.push(a);
        s.shards.push(b);
        ids
    }

    /// Merges two adjacent open shards; returns the child.
    ///
    /// # Panics
    /// If either shard is not open or they are not adjacent.
    pub fn merge(&self, stream: &str, shard: &ShardId, adjacent: &ShardId) -> ShardId {
        let mut st = self.lock();
        let now = st.now();
        st.seq += 1;
        let seq = st.seq;
        let s = st.stream_mut(stream);
        let n = s.shards.len();
        let ra = s.open_shard_mut(shard).range;
        let rb = s.open_shard_mut(adjacent).range;
        let range = ra.merge(&rb).expect("merged shards must be adjacent");
        s.open_shard_mut(shard).close(seq, now);
        s.open_shard_mut(adjacent).close(seq, now);
        let child = MemShard::new(
            shard_id(n),
            vec![shard.clone(), adjacent.clone()],
            range,
            seq + 1,
        );
        let id = child.id.clone();
        s.shards.push(child);
        id
    }

    /// Scales to `target` open shards with splits (of the widest shard) and merges (of the
    /// narrowest adjacent pair), as UpdateShardCount does.
    ///
    /// # Panics
    /// If `target` is 0.
    pub fn update_shard_count(&self, stream: &str, target: usize) {
        assert!(target > 0);
        loop {
            let mut open: Vec<(ShardId, HashKeyRange)> = {
                let mut st = self.lock();
                st.stream_mut(stream)
                    .shards
                    .iter()
                    .filter(|s| s.end.is_none())
                    .map(|s| (s.id.clone(), s.range))
                    .collect()
            };
            open.sort_by_key(|(_, r)| r.start());
            let width = |r: &HashKeyRange| r.end() - r.start();
            if open.len() < target {
                let (id, r) = open
                    .iter()
                    .max_by_key(|(_, r)| width(r))
                    .cloned()
                    .expect("open shards");
                self.split(stream, &id, r.start() + width(&r) / 2 + 1);
            } else if open.len() > target {
                let (i, _) = open
                    .windows(2)
                    .enumerate()
                    .min_by_key(|(_, w)| width(&w[0].1).saturating_add(width(&w[1].1)))
                    .expect("two open shards");
                self.merge(stream, &open[i].0, &open[i + 1].0);
            } else {
                return;
            }
        }
    }

    /// Drops records that arrived before `cutoff` (retention). Closed shards left with no
    /// records and closed before `cutoff` expire: they are no longer listed.
    pub fn trim_before(&self, stream: &str, cutoff: SystemTime) {
        let mut st = self.lock();
        for shard in &mut st.stream_mut(stream).shards {
            shard.records.retain(|r| r.arrival >= cutoff);
            if shard.records.is_empty() && shard.closed_at.is_some_and(|t| t < cutoff) {
                shard.expired = true;
            }
        }
    }

    /// Every shard id of the stream, open or closed (not expired).
    pub fn shard_ids(&self, stream: &str) -> Vec<ShardId> {
        let mut st = self.lock();
        st.stream_mut(stream)
            .shards
            .iter()
            .filter(|s| !s.expired)
            .map(|s| s.id.clone())
            .collect()
    }

    /// Ids of the open shards.
    pub fn open_shard_ids(&self, stream: &str) -> Vec<ShardId> {
        let mut st = self.lock();
        st.stream_mut(stream)
            .shards
            .iter()
            .filter(|s| s.end.is_none())
            .map(|s| s.id.clone())
            .collect()
    }

    /// Total records ever put and still retained in the stream.
    pub fn record_count(&self, stream: &str) -> usize {
        let mut st = self.lock();
        st.stream_mut(stream)
            .shards
            .iter()
            .map(|s| s.records.len())
            .sum()
    }

    async fn fault(&self, op: &str) -> Result<(), KinesisApiError> {
        match self.faults.check(op).await {
            Ok(()) => Ok(()),
            Err(Injected::Fail(kind)) => Err(match kind {
                FaultKind::Throttle => KinesisApiError::Throttled("injected throttle".into()),
                FaultKind::ExpiredIterator => KinesisApiError::ExpiredIterator,
                FaultKind::Fatal => KinesisApiError::Other("injected fatal error".into()),
                _ => KinesisApiError::Transient("injected transient error".into()),
            }),
        }
    }
}

fn shard_id(i: usize) -> ShardId {
    ShardId::new(format!("shardId-{i:012}"))
}

fn even_ranges(range: HashKeyRange, n: usize) -> Vec<HashKeyRange> {
    let n = n as u128;
    let step = (range.end() - range.start()) / n;
    let bound = |i: u128| range.start() + i * step;
    (0..n)
        .map(|i| {
            let end = if i + 1 == n {
                range.end()
            } else {
                bound(i + 1) - 1
            };
            HashKeyRange::new(bound(i), end).unwrap_or(range)
        })
        .collect()
}

impl MemShard {
    fn new(id: ShardId, parents: Vec<ShardId>, range: HashKeyRange, start: u128) -> Self {
        Self {
            id,
            parents,
            range,
            start,
            end: None,
            closed_at: None,
            records: Vec::new(),
            expired: false,
        }
    }

    fn close(&mut self, seq: u128, now: SystemTime) {
        self.end = Some(seq);
        self.closed_at = Some(now);
    }

    fn describe(&self) -> Shard {
        Shard::new(
            self.id.clone(),
            self.parents.clone(),
            self.range,
            seq_string(self.start),
            self.end.map(seq_string),
        )
    }
}

impl State {
    fn now(&self) -> SystemTime {
        self.epoch_wall + self.epoch.elapsed()
    }

    fn stream_mut(&mut self, name: &str) -> &mut Stream {
        self.streams
            .get_mut(name)
            .unwrap_or_else(|| panic!("no stream {name}"))
    }

    fn stream(&self, name: &str) -> Result<&Stream, KinesisApiError> {
        self.streams
            .get(name)
            .ok_or_else(|| KinesisApiError::NotFound(format!("stream {name}")))
    }
}

impl Stream {
    fn open_shard_mut(&mut self, id: &ShardId) -> &mut MemShard {
        self.shards
            .iter_mut()
            .find(|s| &s.id == id && s.end.is_none())
            .unwrap_or_else(|| panic!("{id} is not an open shard"))
    }

    fn shard(&self, id: &str) -> Result<&MemShard, KinesisApiError> {
        self.shards
            .iter()
            .find(|s| s.id.as_str() == id && !s.expired)
            .ok_or_else(|| KinesisApiError::NotFound(format!("shard {id}")))
    }
}

/// Iterators are stateless strings: `stream|shard|next sequence|issued at (ms since epoch)`.
fn encode_iterator(stream: &str, shard: &ShardId, next: u128, issued_ms: u128) -> ShardIterator {
    ShardIterator::new(format!("{stream}|{shard}|{next}|{issued_ms}"))
}

#[async_trait]
impl KinesisApi for MemKinesis {
    /// This Kinesis' own clock (it stamps arrival times): exact under tokio's paused clock.
    fn now(&self) -> SystemTime {
        MemKinesis::now(self)
    }

    async fn describe_stream(
        &self,
        stream: &str,
    ) -> Result<crate::retrieval::StreamSummary, KinesisApiError> {
        self.fault("describe_stream").await?;
        let st = self.lock();
        let created = st.stream(stream)?.created.unwrap_or(st.epoch_wall);
        Ok(crate::retrieval::StreamSummary::new(
            format!("arn:aws:kinesis:us-east-1:000000000000:stream/{stream}"),
            created,
        ))
    }

    async fn register_stream_consumer(
        &self,
        stream: &str,
        consumer_name: &str,
    ) -> Result<String, KinesisApiError> {
        self.fault("register_stream_consumer").await?;
        self.register_consumer(stream, consumer_name)
    }

    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard: &ShardId,
        position: &IteratorPosition,
    ) -> Result<SubscriptionStream, KinesisApiError> {
        self.fault("subscribe_to_shard").await?;
        self.subscribe(consumer_arn, shard, position)
    }

    async fn list_shards(&self, stream: &str) -> Result<Vec<Shard>, KinesisApiError> {
        self.fault("list_shards").await?;
        let st = self.lock();
        Ok(st
            .stream(stream)?
            .shards
            .iter()
            .filter(|s| !s.expired)
            .map(MemShard::describe)
            .collect())
    }

    async fn get_shard_iterator(
        &self,
        stream: &str,
        shard: &ShardId,
        position: &IteratorPosition,
    ) -> Result<ShardIterator, KinesisApiError> {
        self.fault("get_shard_iterator").await?;
        let st = self.lock();
        let sh = st.stream(stream)?.shard(shard.as_str())?;
        let tip = sh.end.unwrap_or(st.seq) + 1;
        let next = match position {
            IteratorPosition::TrimHorizon => sh.records.first().map_or(sh.start, |r| r.seq),
            IteratorPosition::Latest => tip,
            IteratorPosition::AtTimestamp(t) => sh
                .records
                .iter()
                .find(|r| r.arrival >= *t)
                .map_or(tip, |r| r.seq),
            IteratorPosition::AtSequence(s) => seq_value(s)?,
            IteratorPosition::AfterSequence(s) => seq_value(s)? + 1,
        };
        let issued = st.epoch.elapsed().as_millis();
        Ok(encode_iterator(stream, shard, next, issued))
    }

    async fn get_records(
        &self,
        iterator: &ShardIterator,
        limit: u32,
    ) -> Result<GetRecordsOutput, KinesisApiError> {
        self.fault("get_records").await?;
        let invalid =
            || KinesisApiError::Other(format!("invalid shard iterator {iterator:?}").into());
        let mut parts = iterator.as_str().split('|');
        let (Some(stream), Some(shard), Some(next), Some(issued), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(invalid());
        };
        let next: u128 = next.parse().map_err(|_| invalid())?;
        let issued: u128 = issued.parse().map_err(|_| invalid())?;
        let mut st = self.lock();
        if st.epoch.elapsed().as_millis().saturating_sub(issued) > ITERATOR_TTL.as_millis() {
            return Err(KinesisApiError::ExpiredIterator);
        }
        let reads_key = (stream.to_owned(), shard.to_owned());
        if st.read_limits {
            let now = Instant::now();
            let window = st.reads.entry(reads_key.clone()).or_default();
            while window
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) >= Duration::from_secs(1))
            {
                window.pop_front();
            }
            let bytes: usize = window.iter().map(|(_, b)| b).sum();
            if window.len() >= 5 || bytes >= 2 * 1024 * 1024 {
                st.throttled += 1;
                return Err(KinesisApiError::Throttled(
                    format!("read limits exceeded on {shard}").into(),
                ));
            }
        }
        let out = Self::read(&st, stream, shard, next, limit)?;
        if st.read_limits {
            let bytes = out.records.iter().map(|r| r.data.len()).sum();
            st.reads
                .entry(reads_key)
                .or_default()
                .push_back((Instant::now(), bytes));
        }
        Ok(out)
    }
}

impl MemKinesis {
    /// One `GetRecords` answer from `next` on, without side effects.
    fn read(
        st: &State,
        stream: &str,
        shard: &str,
        next: u128,
        limit: u32,
    ) -> Result<GetRecordsOutput, KinesisApiError> {
        let stream_state = st.stream(stream)?;
        let sh = stream_state.shard(shard)?;
        let from = sh.records.partition_point(|r| r.seq < next);
        let mut bytes = 0;
        let mut records = Vec::new();
        for r in &sh.records[from..] {
            if records.len() >= limit as usize
                || (bytes + r.data.len() > MAX_RESPONSE_BYTES && !records.is_empty())
            {
                break;
            }
            bytes += r.data.len();
            let data = if st.copy_reads {
                Bytes::copy_from_slice(&r.data)
            } else {
                r.data.clone()
            };
            records.push(Record::new(
                data,
                &*r.key,
                seq_string(r.seq),
                Some(r.arrival),
            ));
        }
        let consumed = from + records.len();
        let new_next = sh.records.get(consumed).map_or_else(
            || sh.end.unwrap_or(st.seq).max(next.saturating_sub(1)) + 1,
            |r| r.seq,
        );
        let now = st.now();
        let millis_behind = match sh.records.get(consumed) {
            None => 0,
            Some(r) => now
                .duration_since(r.arrival)
                .unwrap_or_default()
                .as_millis() as u64,
        };
        let at_end = sh.end.is_some() && consumed == sh.records.len();
        let (next_iterator, child_shards) = if at_end {
            let children = stream_state
                .shards
                .iter()
                .filter(|c| c.parents.contains(&sh.id))
                .map(|c| ChildShard::new(c.id.clone(), c.parents.clone(), c.range))
                .collect();
            (None, children)
        } else {
            let issued = st.epoch.elapsed().as_millis();
            (
                Some(encode_iterator(stream, &sh.id, new_next, issued)),
                Vec::new(),
            )
        };
        Ok(GetRecordsOutput::new(
            records,
            next_iterator,
            Some(millis_behind),
            child_shards,
        ))
    }
}

impl MemKinesis {
    /// Puts several records at once, each routed by its hash key (the MD5 of its partition key,
    /// or an explicit hash key): the in-memory side of `PutRecords` (see
    /// [`crate::producer::PutRecords`], which `MemKinesis` implements on top of this). Records
    /// get consecutive sequence numbers in the order given. Unlike [`put`](Self::put), a
    /// missing stream is an error rather than a panic.
    ///
    /// # Errors
    /// [`KinesisApiError::NotFound`] if the stream does not exist.
    pub fn put_many<'a>(
        &self,
        stream: &str,
        records: impl IntoIterator<Item = (&'a str, u128, Bytes)>,
    ) -> Result<Vec<(ShardId, SequenceNumber)>, KinesisApiError> {
        let mut st = self.lock();
        st.stream(stream)?;
        let now = st.now();
        let mut stored = Vec::new();
        for (partition_key, hash, data) in records {
            st.seq += 1;
            let seq = st.seq;
            let shard = st
                .stream_mut(stream)
                .shards
                .iter_mut()
                .find(|sh| sh.end.is_none() && sh.range.contains(hash))
                .ok_or_else(|| {
                    KinesisApiError::Transient(
                        format!("no open shard holds hash key {hash}").into(),
                    )
                })?;
            shard.records.push(Stored {
                seq,
                data,
                key: partition_key.into(),
                arrival: now,
            });
            stored.push((shard.id.clone(), seq_string(seq)));
        }
        Ok(stored)
    }
}

// ------------------------------------------------------------------------------------------
// Enhanced fan-out: `RegisterStreamConsumer` and `SubscribeToShard`.
//
// kinesis-local neither ends a subscription at a closed shard's end nor sends `ChildShards`,
// so this model is where fan-out's shard-end and resubscription behaviour is tested.
//
// Fault operations: `register_stream_consumer`, `subscribe_to_shard`, and
// `subscription_event` (checked before each event is sent; a failure is sent instead and ends
// the subscription, like a dropped connection).
// ------------------------------------------------------------------------------------------

use crate::retrieval::kinesis::{SubscriptionEvent, SubscriptionStream};

/// A subscription's stream ends this long after `SubscribeToShard` succeeded, as on AWS.
const SUBSCRIPTION_TTL: Duration = Duration::from_secs(300);
/// Within this long of a successful `SubscribeToShard`, another one for the same consumer and
/// shard is refused with `ResourceInUseException`; after it, the new call takes over.
const RESUBSCRIBE_GUARD: Duration = Duration::from_secs(5);
/// How often an open subscription looks for new records (tokio time).
const SUBSCRIPTION_POLL: Duration = Duration::from_millis(50);
/// After this long without records, a subscription sends an event with no records (its
/// continuation sequence number and `MillisBehindLatest` only), as Kinesis does.
const SUBSCRIPTION_HEARTBEAT: Duration = Duration::from_secs(5);
/// The most records one event carries.
const MAX_EVENT_RECORDS: u32 = 10_000;

/// Registered stream consumers and their current subscriptions.
#[derive(Debug, Default)]
struct FanOutState {
    /// By consumer ARN.
    consumers: BTreeMap<String, MemConsumer>,
    /// The current subscription of each (consumer ARN, shard): its id and when it was made.
    subscriptions: BTreeMap<(String, ShardId), (u64, Instant)>,
    /// The id of the last subscription made.
    last_subscription: u64,
}

#[derive(Debug)]
struct MemConsumer {
    stream: String,
    name: String,
}

impl MemKinesis {
    /// `RegisterStreamConsumer`: the consumer's ARN, registering it if it is new. Consumers are
    /// `ACTIVE` at once.
    fn register_consumer(&self, stream: &str, name: &str) -> Result<String, KinesisApiError> {
        let valid = (1..=128).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !valid {
            return Err(KinesisApiError::Other(
                format!("invalid consumer name {name:?}").into(),
            ));
        }
        let mut st = self.lock();
        st.stream(stream)?;
        let existing = st
            .fan_out
            .consumers
            .iter()
            .find(|(_, c)| c.stream == stream && c.name == name)
            .map(|(arn, _)| arn.clone());
        if let Some(arn) = existing {
            return Ok(arn);
        }
        let created = st
            .now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let arn = format!(
            "arn:aws:kinesis:us-east-1:000000000000:stream/{stream}/consumer/{name}:{created}"
        );
        st.fan_out.consumers.insert(
            arn.clone(),
            MemConsumer {
                stream: stream.to_owned(),
                name: name.to_owned(),
            },
        );
        Ok(arn)
    }

    /// Deregisters a stream consumer (`DeregisterStreamConsumer`); its open subscriptions fail
    /// with [`KinesisApiError::NotFound`] at their next event. Returns whether it existed.
    pub fn deregister_stream_consumer(&self, consumer_arn: &str) -> bool {
        let mut st = self.lock();
        st.fan_out
            .subscriptions
            .retain(|(arn, _), _| arn != consumer_arn);
        st.fan_out.consumers.remove(consumer_arn).is_some()
    }

    /// `SubscribeToShard`, with AWS's rules for a second subscription of the same consumer and
    /// shard: within 5 s of the last successful call it is refused with `ResourceInUseException`
    /// (a retryable [`KinesisApiError::Transient`]); later, it takes over, and the older
    /// subscription's stream fails with `ResourceInUseException` (also `Transient`) at its
    /// next event and ends.
    fn subscribe(
        &self,
        consumer_arn: &str,
        shard: &ShardId,
        position: &IteratorPosition,
    ) -> Result<SubscriptionStream, KinesisApiError> {
        let mut st = self.lock();
        let stream = st
            .fan_out
            .consumers
            .get(consumer_arn)
            .ok_or_else(|| KinesisApiError::NotFound(format!("consumer {consumer_arn}")))?
            .stream
            .clone();
        let next = {
            let sh = st.stream(&stream)?.shard(shard.as_str())?;
            let tip = sh.end.unwrap_or(st.seq) + 1;
            match position {
                IteratorPosition::TrimHorizon => sh.records.first().map_or(sh.start, |r| r.seq),
                IteratorPosition::Latest => tip,
                IteratorPosition::AtTimestamp(t) => sh
                    .records
                    .iter()
                    .find(|r| r.arrival >= *t)
                    .map_or(tip, |r| r.seq),
                IteratorPosition::AtSequence(s) => seq_value(s)?,
                IteratorPosition::AfterSequence(s) => seq_value(s)? + 1,
            }
        };
        let now = Instant::now();
        let key = (consumer_arn.to_owned(), shard.clone());
        if let Some((_, made)) = st.fan_out.subscriptions.get(&key) {
            if now.duration_since(*made) < RESUBSCRIBE_GUARD {
                return Err(KinesisApiError::Transient(
                    format!(
                        "ResourceInUseException: {consumer_arn} subscribed to {shard} less than \
                         {RESUBSCRIBE_GUARD:?} ago"
                    )
                    .into(),
                ));
            }
        }
        st.fan_out.last_subscription += 1;
        let id = st.fan_out.last_subscription;
        st.fan_out.subscriptions.insert(key.clone(), (id, now));
        drop(st);
        let subscription = MemSubscription {
            kinesis: self.clone(),
            key,
            stream,
            id,
            next,
            until: now + SUBSCRIPTION_TTL,
            last_event: now,
            finished: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            subscription,
            |mut s| async move {
                let item = s.next_event().await?;
                Some((item, s))
            },
        )))
    }
}

/// One open subscription. Events are made when the stream is polled (a consumer that does not
/// read gets nothing pushed: HTTP/2 flow control, modelled), from the shard's records at that
/// moment.
struct MemSubscription {
    kinesis: MemKinesis,
    /// (consumer ARN, shard).
    key: (String, ShardId),
    stream: String,
    id: u64,
    /// The sequence number of the next record to send.
    next: u128,
    /// When the stream ends (5 minutes after the subscription was made).
    until: Instant,
    last_event: Instant,
    finished: bool,
}

impl MemSubscription {
    async fn next_event(&mut self) -> Option<Result<SubscriptionEvent, KinesisApiError>> {
        if self.finished {
            return None;
        }
        loop {
            if Instant::now() >= self.until {
                self.finished = true;
                return None;
            }
            if let Some(result) = self.poll_once() {
                // A `subscription_event` fault breaks the subscription instead of sending the
                // event (a dropped connection).
                let result = match result {
                    Ok(event) => self
                        .kinesis
                        .fault("subscription_event")
                        .await
                        .map(|()| event),
                    Err(e) => Err(e),
                };
                // An error, or the shard's last event, ends the stream.
                self.finished = result
                    .as_ref()
                    .map_or(true, |e| e.continuation_sequence_number.is_none());
                return Some(result);
            }
            let wake = (Instant::now() + SUBSCRIPTION_POLL).min(self.until);
            tokio::time::sleep_until(wake).await;
        }
    }

    /// Looks at the shard once: an event to send, an error that ends the subscription, or
    /// nothing yet.
    fn poll_once(&mut self) -> Option<Result<SubscriptionEvent, KinesisApiError>> {
        let st = self.kinesis.lock();
        if !st.fan_out.consumers.contains_key(&self.key.0) {
            return Some(Err(KinesisApiError::NotFound(format!(
                "consumer {}",
                self.key.0
            ))));
        }
        if st.fan_out.subscriptions.get(&self.key).map(|(id, _)| *id) != Some(self.id) {
            return Some(Err(KinesisApiError::Transient(
                format!(
                    "ResourceInUseException: a newer subscription of {} to {} took over",
                    self.key.0, self.key.1
                )
                .into(),
            )));
        }
        let out = match MemKinesis::read(
            &st,
            &self.stream,
            self.key.1.as_str(),
            self.next,
            MAX_EVENT_RECORDS,
        ) {
            Ok(out) => out,
            Err(e) => return Some(Err(e)),
        };
        let at_end = out.next_iterator.is_none();
        let now = Instant::now();
        if out.records.is_empty()
            && !at_end
            && now.duration_since(self.last_event) < SUBSCRIPTION_HEARTBEAT
        {
            return None;
        }
        if let Some(last) = out.records.last() {
            match seq_value(&last.sequence_number) {
                Ok(seq) => self.next = seq + 1,
                Err(e) => return Some(Err(e)),
            }
        }
        self.last_event = now;
        let continuation = (!at_end).then(|| seq_string(self.next.saturating_sub(1)));
        Some(Ok(SubscriptionEvent::new(
            out.records,
            continuation,
            out.millis_behind_latest,
            out.child_shards,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn drain(
        k: &MemKinesis,
        stream: &str,
        shard: &ShardId,
    ) -> (Vec<Record>, Vec<ChildShard>) {
        let mut it = k
            .get_shard_iterator(stream, shard, &IteratorPosition::TrimHorizon)
            .await
            .unwrap();
        let mut out = Vec::new();
        for _ in 0..100 {
            let r = k.get_records(&it, 3).await.unwrap();
            out.extend(r.records);
            match r.next_iterator {
                Some(n) => it = n,
                None => return (out, r.child_shards),
            }
        }
        (out, Vec::new())
    }

    #[tokio::test(start_paused = true)]
    async fn routes_splits_and_ends_closed_shards_with_children() {
        let k = MemKinesis::new();
        k.create_stream("s", 2);
        for i in 0..20 {
            k.put("s", &format!("key-{i}"), format!("v{i}"));
        }
        let shards = k.list_shards("s").await.unwrap();
        assert_eq!(shards.len(), 2);
        let first = shards[0].id.clone();
        let (lo, hi) = k.split("s", &first, shards[0].hash_range.start() + 1000);
        k.put("s", "after", "x");
        let (records, children) = drain(&k, "s", &first).await;
        assert!(!records.is_empty());
        assert!(records
            .windows(2)
            .all(|w| w[0].sequence_number < w[1].sequence_number));
        let ids: Vec<_> = children.iter().map(|c| c.id.clone()).collect();
        assert_eq!(ids, vec![lo, hi]);
        // Sequence numbers are 56 digits.
        assert_eq!(records[0].sequence_number.as_str().len(), 56);
        assert_eq!(k.list_shards("s").await.unwrap().len(), 4);
        k.update_shard_count("s", 5);
        assert_eq!(k.open_shard_ids("s").len(), 5);
        k.update_shard_count("s", 2);
        assert_eq!(k.open_shard_ids("s").len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn iterators_expire_after_five_minutes() {
        let k = MemKinesis::new();
        k.create_stream("s", 1);
        let id = k.open_shard_ids("s")[0].clone();
        let it = k
            .get_shard_iterator("s", &id, &IteratorPosition::Latest)
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(301)).await;
        assert!(matches!(
            k.get_records(&it, 10).await,
            Err(KinesisApiError::ExpiredIterator)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn latest_and_after_sequence_positions() {
        let k = MemKinesis::new();
        k.create_stream("s", 1);
        let id = k.open_shard_ids("s")[0].clone();
        let (_, first) = k.put("s", "a", "1");
        let latest = k
            .get_shard_iterator("s", &id, &IteratorPosition::Latest)
            .await
            .unwrap();
        k.put("s", "a", "2");
        let r = k.get_records(&latest, 10).await.unwrap();
        assert_eq!(r.records.len(), 1);
        assert_eq!(&r.records[0].data[..], b"2");
        let after = k
            .get_shard_iterator("s", &id, &IteratorPosition::AfterSequence(first))
            .await
            .unwrap();
        assert_eq!(k.get_records(&after, 10).await.unwrap().records.len(), 1);
    }
}

#[cfg(test)]
mod fan_out_tests {
    use futures::StreamExt;

    use super::*;

    fn setup() -> (MemKinesis, ShardId) {
        let k = MemKinesis::new();
        k.create_stream("s", 1);
        let shard = k.open_shard_ids("s")[0].clone();
        (k, shard)
    }

    async fn next(events: &mut SubscriptionStream) -> SubscriptionEvent {
        match events.next().await {
            Some(Ok(event)) => event,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn registering_is_idempotent_and_checked() {
        let (k, _) = setup();
        let arn = k.register_stream_consumer("s", "app").await.unwrap();
        assert!(arn.starts_with("arn:aws:kinesis:"), "{arn}");
        assert!(arn.contains("/consumer/app:"), "{arn}");
        assert_eq!(k.register_stream_consumer("s", "app").await.unwrap(), arn);
        assert_ne!(k.register_stream_consumer("s", "other").await.unwrap(), arn);
        assert!(matches!(
            k.register_stream_consumer("missing", "app").await,
            Err(KinesisApiError::NotFound(_))
        ));
        assert!(matches!(
            k.register_stream_consumer("s", "no spaces").await,
            Err(KinesisApiError::Other(_))
        ));
        assert!(matches!(
            k.subscribe_to_shard(
                "arn:nope",
                &ShardId::new("shardId-000000000000"),
                &IteratorPosition::Latest
            )
            .await,
            Err(KinesisApiError::NotFound(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn events_carry_records_and_continuations_and_end_after_five_minutes() {
        let (k, shard) = setup();
        let arn = k.register_stream_consumer("s", "app").await.unwrap();
        let (_, a) = k.put("s", "key", "a");
        let started = Instant::now();
        let mut events = k
            .subscribe_to_shard(&arn, &shard, &IteratorPosition::TrimHorizon)
            .await
            .unwrap();
        let first = next(&mut events).await;
        assert_eq!(first.records.len(), 1);
        assert_eq!(first.continuation_sequence_number, Some(a.clone()));
        assert_eq!(first.millis_behind_latest, Some(0));
        // Records put later arrive in the next event (within one poll interval).
        let (_, b) = k.put("s", "key", "b");
        let (_, c) = k.put("s", "key", "c");
        let second = next(&mut events).await;
        let seqs: Vec<_> = second
            .records
            .iter()
            .map(|r| r.sequence_number.clone())
            .collect();
        assert_eq!(seqs, [b, c.clone()]);
        assert_eq!(second.continuation_sequence_number, Some(c.clone()));
        assert!(started.elapsed() <= SUBSCRIPTION_POLL * 2);
        // With nothing new, a heartbeat: no records, the same continuation.
        let quiet = next(&mut events).await;
        assert!(quiet.records.is_empty());
        assert_eq!(quiet.continuation_sequence_number, Some(c));
        assert!(started.elapsed() >= SUBSCRIPTION_HEARTBEAT);
        // The stream ends 5 minutes after the subscription was made.
        while let Some(event) = events.next().await {
            assert!(event.unwrap().records.is_empty());
        }
        assert_eq!(started.elapsed(), SUBSCRIPTION_TTL);
        // A subscription after the last continuation starts after it.
        let (_, d) = k.put("s", "key", "d");
        let mut events = k
            .subscribe_to_shard(&arn, &shard, &IteratorPosition::AfterSequence(a))
            .await
            .unwrap();
        let again = next(&mut events).await;
        assert_eq!(again.records.len(), 3);
        assert_eq!(again.continuation_sequence_number, Some(d));
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_subscription_continues_from_its_position() {
        let (k, shard) = setup();
        let arn = k.register_stream_consumer("s", "app").await.unwrap();
        let (_, a) = k.put("s", "key", "a");
        let mut events = k
            .subscribe_to_shard(&arn, &shard, &IteratorPosition::Latest)
            .await
            .unwrap();
        let quiet = next(&mut events).await;
        assert!(quiet.records.is_empty());
        // AFTER_SEQUENCE_NUMBER this continuation starts at the next record.
        assert_eq!(quiet.continuation_sequence_number, Some(a));
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_subscription_is_refused_within_five_seconds_then_takes_over() {
        let (k, shard) = setup();
        let arn = k.register_stream_consumer("s", "app").await.unwrap();
        let other = k.register_stream_consumer("s", "other").await.unwrap();
        let mut old = k
            .subscribe_to_shard(&arn, &shard, &IteratorPosition::TrimHorizon)
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(4)).await;
        match k
            .subscribe_to_shard(&arn, &shard, &IteratorPosition::TrimHorizon)
            .await
        {
            Err(e @ KinesisApiError::Transient(_)) => {
                assert!(e.is_retryable());
                assert!(
                    format!("{:?}", e).contains("ResourceInUseException"),
                    "{e:?}"
                );
            }
            Err(e) => panic!("unexpected {e:?}"),
            Ok(_) => panic!("a second subscription within 5 s was accepted"),
        }
        // Another consumer of the same shard is independent.
        let _independent = k
            .subscribe_to_shard(&other, &shard, &IteratorPosition::TrimHorizon)
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let mut new = k
            .subscribe_to_shard(&arn, &shard, &IteratorPosition::TrimHorizon)
            .await
            .unwrap();
        k.put("s", "key", "x");
        match old.next().await {
            Some(Err(e @ KinesisApiError::Transient(_))) => {
                assert!(
                    format!("{:?}", e).contains("ResourceInUseException"),
                    "{e:?}"
                )
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(old.next().await.is_none(), "the older subscription ended");
        assert_eq!(next(&mut new).await.records.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_shard_ends_with_children_and_no_continuation() {
        let (k, shard) = setup();
        let arn = k.register_stream_consumer("s", "app").await.unwrap();
        k.put("s", "key", "a");
        let mut events = k
            .subscribe_to_shard(&arn, &shard, &IteratorPosition::TrimHorizon)
            .await
            .unwrap();
        assert_eq!(next(&mut events).await.records.len(), 1);
        k.put("s", "key", "b");
        let (lo, hi) = k.split("s", &shard, 1 << 127);
        let last = next(&mut events).await;
        assert_eq!(last.records.len(), 1);
        assert_eq!(last.continuation_sequence_number, None);
        let ids: Vec<_> = last.child_shards.iter().map(|c| c.id.clone()).collect();
        assert_eq!(ids, [lo, hi]);
        assert!(events.next().await.is_none());
        // Subscribing again after the end: the final event at once.
        tokio::time::advance(RESUBSCRIBE_GUARD).await;
        let mut events = k
            .subscribe_to_shard(&arn, &shard, &IteratorPosition::TrimHorizon)
            .await
            .unwrap();
        let again = next(&mut events).await;
        assert_eq!(again.records.len(), 2);
        assert_eq!(again.continuation_sequence_number, None);
        assert_eq!(again.child_shards.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_injected_fault_breaks_the_subscription() {
        let (k, shard) = setup();
        let arn = k.register_stream_consumer("s", "app").await.unwrap();
        k.put("s", "key", "a");
        k.faults().inject(
            crate::testkit::Fault::new(FaultKind::Transient)
                .on("subscription_event")
                .times(1),
        );
        let mut events = k
            .subscribe_to_shard(&arn, &shard, &IteratorPosition::TrimHorizon)
            .await
            .unwrap();
        assert!(matches!(
            events.next().await,
            Some(Err(KinesisApiError::Transient(_)))
        ));
        assert!(events.next().await.is_none());
    }
}
