//! The streams a multi-stream worker consumes right now, and those it stopped consuming.
//!
//! The set comes from the configuration and, if set, a discovery callback asked every
//! `stream_discovery_interval`. Each active stream has a cancellation token (a child of the
//! worker's shutdown token) that its shard consumers use as their shutdown: a stream that
//! leaves the set stops its shards the way a shutdown does (the processor checkpoints, the
//! lease is released). Its leases stay for `former_stream_retention`, then the shard syncer
//! deletes them.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use tokio_util::task::AbortOnDropHandle;

use crate::config::MetricsLevel;
use crate::error::{BoxError, Error};
use crate::lease::LeaseKey;
use crate::metrics::WorkerMetrics;
use crate::retrieval::KinesisApi;
use crate::stream::{account_of_arn, StreamIdentifier};

/// A user callback naming the streams to consume (names or `account:name:creationEpoch`),
/// asked at start and then every `stream_discovery_interval`.
pub type StreamDiscovery = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Vec<String>, BoxError>> + Send>> + Send + Sync,
>;

#[derive(Debug, Default)]
struct State {
    active: BTreeMap<StreamIdentifier, CancellationToken>,
    /// Streams that left the set, and since when.
    former: BTreeMap<StreamIdentifier, Instant>,
}

/// The active and former streams of a multi-stream worker.
#[derive(Debug)]
pub(crate) struct StreamTracker {
    state: Mutex<State>,
    shutdown: CancellationToken,
}

/// What [`StreamTracker::set`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct StreamChanges {
    pub(crate) added: Vec<StreamIdentifier>,
    pub(crate) removed: Vec<StreamIdentifier>,
}

impl StreamTracker {
    pub(crate) fn new(shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            shutdown,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `streams` the active set: streams that left it stop their shards now.
    pub(crate) fn set(&self, streams: &[StreamIdentifier], now: Instant) -> StreamChanges {
        let mut st = self.lock();
        let mut changes = StreamChanges::default();
        let gone: Vec<StreamIdentifier> = st
            .active
            .keys()
            .filter(|id| !streams.contains(id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(token) = st.active.remove(&id) {
                token.cancel();
            }
            st.former.insert(id.clone(), now);
            changes.removed.push(id);
        }
        for id in streams {
            if !st.active.contains_key(id) {
                st.former.remove(id);
                st.active.insert(id.clone(), self.shutdown.child_token());
                changes.added.push(id.clone());
            }
        }
        changes
    }

    /// The active streams.
    pub(crate) fn active(&self) -> Vec<StreamIdentifier> {
        self.lock().active.keys().cloned().collect()
    }

    /// True if `key` is a lease of an active stream.
    pub(crate) fn is_active(&self, key: &LeaseKey) -> bool {
        key.stream()
            .is_some_and(|id| self.lock().active.contains_key(&id))
    }

    /// The shutdown token of `key`'s stream (`None` for a stream not active).
    pub(crate) fn token(&self, key: &LeaseKey) -> Option<CancellationToken> {
        let id = key.stream()?;
        self.lock().active.get(&id).cloned()
    }

    /// Former streams whose leases may go now (out of the set for `retention`).
    pub(crate) fn former_due(
        &self,
        now: Instant,
        retention: std::time::Duration,
    ) -> Vec<StreamIdentifier> {
        self.lock()
            .former
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= retention)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The leases of former stream `id` are gone.
    pub(crate) fn forget(&self, id: &StreamIdentifier) {
        self.lock().former.remove(id);
    }
}

/// One stream's handles, and the task that keeps its series alive.
type StreamSeries = (Arc<WorkerMetrics>, AbortOnDropHandle<()>);

/// The metric handles of each stream a multi-stream worker consumes: per-stream series carry
/// their own `stream` label. A single-stream worker has only `base`.
pub(crate) struct StreamMetrics {
    base: Arc<WorkerMetrics>,
    multi: bool,
    level: MetricsLevel,
    refresh: std::time::Duration,
    /// Each stream's handles, and the task keeping its series alive (stopped when dropped).
    streams: Mutex<BTreeMap<String, StreamSeries>>,
}

impl std::fmt::Debug for StreamMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamMetrics").finish_non_exhaustive()
    }
}

impl StreamMetrics {
    pub(crate) fn new(
        base: Arc<WorkerMetrics>,
        multi: bool,
        level: MetricsLevel,
        refresh: std::time::Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            base,
            multi,
            level,
            refresh,
            streams: Mutex::new(BTreeMap::new()),
        })
    }

    /// The handles of `stream`'s series.
    pub(crate) fn of(&self, stream: &str) -> Arc<WorkerMetrics> {
        if !self.multi {
            return self.base.clone();
        }
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams
            .entry(stream.to_owned())
            .or_insert_with(|| {
                let m = WorkerMetrics::new(self.level, stream);
                let refresher =
                    AbortOnDropHandle::new(tokio::spawn(m.clone().run_refresher(self.refresh)));
                (m, refresher)
            })
            .0
            .clone()
    }
}

/// Names each entry: an identifier as it is, a stream name through `DescribeStreamSummary`
/// (its ARN gives the account, its creation time the epoch).
pub(crate) async fn resolve(
    kinesis: &dyn KinesisApi,
    entries: &[String],
) -> Result<Vec<StreamIdentifier>, Error> {
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        if entry.contains(':') {
            let id = entry
                .parse()
                .map_err(|e: crate::stream::InvalidStreamIdentifier| Error::Stream {
                    stream: entry.clone(),
                    reason: e.to_string(),
                })?;
            out.push(id);
            continue;
        }
        crate::config::check_stream_entry(entry)?;
        let summary = kinesis.describe_stream(entry).await?;
        let bad = |reason: String| Error::Stream {
            stream: entry.clone(),
            reason,
        };
        let account = account_of_arn(&summary.arn)
            .ok_or_else(|| bad(format!("the stream ARN {:?} names no account", summary.arn)))?;
        let epoch = summary
            .created
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .max(1);
        let id = StreamIdentifier::new(account, entry.as_str(), epoch)
            .map_err(|e| bad(e.to_string()))?;
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> StreamIdentifier {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn streams_come_and_go_with_their_tokens() {
        let shutdown = CancellationToken::new();
        let t = StreamTracker::new(shutdown.clone());
        let (a, b) = (id("1:a:5"), id("1:b:5"));
        let changes = t.set(&[a.clone(), b.clone()], Instant::now());
        assert_eq!(changes.added, vec![a.clone(), b.clone()]);
        let key_b = b.lease_key(&crate::ShardId::new("shardId-0"));
        let token_b = t.token(&key_b).unwrap();
        assert!(t.is_active(&key_b));
        assert!(!t.is_active(&LeaseKey::new("shardId-0")));

        let changes = t.set(std::slice::from_ref(&a), Instant::now());
        assert_eq!(changes.removed, vec![b.clone()]);
        assert!(token_b.is_cancelled(), "a removed stream stops its shards");
        assert!(!t.is_active(&key_b));
        let retention = std::time::Duration::from_secs(60);
        assert!(t.former_due(Instant::now(), retention).is_empty());
        tokio::time::advance(retention).await;
        assert_eq!(t.former_due(Instant::now(), retention), vec![b.clone()]);

        // Back within the retention: active again, not due for deletion.
        t.set(&[a.clone(), b.clone()], Instant::now());
        assert!(t.former_due(Instant::now(), retention).is_empty());
        let token_a = t.token(&a.lease_key(&crate::ShardId::new("x"))).unwrap();
        shutdown.cancel();
        assert!(
            token_a.is_cancelled(),
            "the worker's shutdown stops every stream"
        );
    }
}
