//! The one seam through which a shard consumer gets its records: a [`ShardReader`] starts a
//! reader task for a shard and hands back its prefetch queue. Polling (`GetRecords`) and
//! enhanced fan-out (`SubscribeToShard` through a registered stream consumer) are its two
//! implementations; the consumer does not know which one it reads through.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::fanout::{spawn_subscriber, StreamConsumer};
use super::polling::{spawn_fetcher, PrefetchBudget, Reading};
use super::{IteratorPosition, KinesisApi};
use crate::config::PollingConfig;
use crate::metrics::ShardMetrics;
use crate::shard::ShardId;

/// What a reader task needs to read one shard.
pub(crate) struct ShardRead {
    pub(crate) kinesis: Arc<dyn KinesisApi>,
    /// The stream's name.
    pub(crate) stream: String,
    pub(crate) shard: ShardId,
    /// Where to start.
    pub(crate) position: IteratorPosition,
    pub(crate) config: PollingConfig,
    /// The worker's read-ahead budget.
    pub(crate) budget: Arc<PrefetchBudget>,
    pub(crate) metrics: Arc<ShardMetrics>,
    /// Stops the reader task.
    pub(crate) stop: CancellationToken,
}

/// Starts the reader task of one shard.
pub(crate) trait ShardReader: Send + Sync + std::fmt::Debug {
    /// Spawns the reader; records come through the returned queue until `read.stop` is
    /// cancelled.
    fn start(&self, read: ShardRead) -> Reading;
}

/// Polling: `GetRecords` calls paced by the polling settings.
#[derive(Debug, Default)]
pub(crate) struct Polling;

impl ShardReader for Polling {
    fn start(&self, r: ShardRead) -> Reading {
        spawn_fetcher(
            r.kinesis, r.stream, r.shard, r.position, r.config, r.budget, r.metrics, r.stop,
        )
    }
}

/// Enhanced fan-out through a registered stream consumer, shared by the worker's subscribers
/// (the first that finds it deregistered registers it again).
#[derive(Debug)]
pub(crate) struct FanOut(pub(crate) Arc<StreamConsumer>);

impl ShardReader for FanOut {
    fn start(&self, r: ShardRead) -> Reading {
        spawn_subscriber(
            r.kinesis,
            self.0.clone(),
            r.shard,
            r.position,
            r.config,
            r.budget,
            r.metrics,
            r.stop,
        )
    }
}
