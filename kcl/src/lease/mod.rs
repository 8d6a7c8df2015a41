//! Leases: which worker reads which shard, and how far it got.
//!
//! One lease per shard lives in a DynamoDB(-compatible) table shared by the fleet (schema:
//! `docs/lease-table.md`, compatible with the Java KCL 2.x). Every write is conditional on the
//! lease's `leaseCounter`, the fencing token, and bumps it:
//!
//! | operation  | condition                          | effect                                   |
//! |------------|------------------------------------|------------------------------------------|
//! | create     | item absent                        | new lease, unowned, counter 0            |
//! | renew      | counter = seen, owner = me         | counter + 1                              |
//! | take       | counter = seen                     | owner = me, counter + 1, switches + 1    |
//! | checkpoint | counter = seen, owner = me         | checkpoint, counter + 1, switches = 0    |
//! | release    | counter = seen, owner = me         | owner removed, counter + 1               |
//! | prepare    | counter = seen, owner = me         | pending checkpoint (+ state) set or cleared, counter + 1 |
//! | resolve `LATEST` | counter = seen, owner = me, checkpoint `LATEST` | `latestResolvedAt`, counter + 1 |
//!
//! **Expiry is observed, never computed from clocks**: a lease is expired for an observer when
//! its counter has not changed for `lease_duration` by the observer's own monotonic clock
//! ([`expiry`]). The owner stops delivering as soon as its own clock says the lease could have
//! expired (last successful renewal + `lease_duration`), which is before any other worker can
//! see it expire: that is what bounds the window in which two workers might hold one shard.

pub mod capacity;
pub(crate) mod coordinator;
pub mod drain;
pub(crate) mod expiry;
pub mod item;
pub mod liveness;
pub(crate) mod load;
pub mod store;
pub(crate) mod taker;
pub(crate) mod write;

#[cfg(feature = "aws")]
pub mod dynamo;

use std::fmt;

use crate::record::ExtendedSequenceNumber;
use crate::shard::{HashKeyRange, ShardId};

pub use store::{LeaseStore, LeaseStoreError, LeaseTable, MalformedLease};

/// The lease table's hash key: a shard id (or `account:stream:epoch:shardId` in multi-stream
/// tables written by the Java KCL).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseKey(Box<str>);

impl LeaseKey {
    /// Wraps a key string.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into().into_boxed_str())
    }

    /// The key of a single-stream lease for `shard`.
    pub fn for_shard(shard: &ShardId) -> Self {
        Self::new(shard.as_str())
    }

    /// The key as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The shard the lease is for (the last `:`-separated part of multi-stream keys).
    pub fn shard_id(&self) -> ShardId {
        ShardId::new(self.0.rsplit(':').next().unwrap_or(&self.0))
    }

    /// The stream of a multi-stream key (`None` for a single-stream key).
    pub fn stream(&self) -> Option<crate::stream::StreamIdentifier> {
        crate::stream::StreamIdentifier::of_key(self)
    }

    /// The key of `shard` of the same stream as this key: how a lease names its parents and
    /// children (stored as bare shard ids).
    ///
    /// ```
    /// use kcl::{lease::LeaseKey, ShardId};
    /// let parent = ShardId::new("shardId-0");
    /// assert_eq!(LeaseKey::new("shardId-2").sibling(&parent).as_str(), "shardId-0");
    /// assert_eq!(LeaseKey::new("1:s:9:shardId-2").sibling(&parent).as_str(), "1:s:9:shardId-0");
    /// ```
    pub fn sibling(&self, shard: &ShardId) -> LeaseKey {
        match self.stream() {
            Some(stream) => stream.lease_key(shard),
            None => Self::for_shard(shard),
        }
    }
}

impl fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A worker's identity in the lease table (`leaseOwner`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(Box<str>);

impl WorkerId {
    /// Wraps a worker id.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into().into_boxed_str())
    }

    /// A fresh id: the host name plus a random suffix. Pass your own stable id (e.g. a pod name)
    /// to [`crate::WorkerBuilder::worker_id`] so a restarted worker reclaims its leases at once.
    pub fn generate() -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
                    .filter(|h| !h.is_empty())
            })
            .unwrap_or_else(|| "worker".to_owned());
        let suffix: u32 = rand::random();
        Self::new(format!("{host}-{suffix:08x}"))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The fencing token: bumped by every write to a lease.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct LeaseCounter(pub u64);

impl LeaseCounter {
    /// The counter after one more write.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for LeaseCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One item of the lease table.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// `leaseKey`.
    pub key: LeaseKey,
    /// `leaseOwner`: the worker holding the lease, if any.
    pub owner: Option<WorkerId>,
    /// `leaseCounter`: the fencing token.
    pub counter: LeaseCounter,
    /// `checkpoint` + `checkpointSubSequenceNumber`.
    pub checkpoint: ExtendedSequenceNumber,
    /// `ownerSwitchesSinceCheckpoint`.
    pub owner_switches_since_checkpoint: u64,
    /// `parentShardId`: the shard's 0–2 parents.
    pub parent_shard_ids: Vec<ShardId>,
    /// `childShardIds`: written when the shard ends.
    pub child_shard_ids: Vec<ShardId>,
    /// `startingHashKey` / `endingHashKey`, when known.
    pub hash_range: Option<HashKeyRange>,
    /// `pendingCheckpoint` + `pendingCheckpointSubSequenceNumber` (two-phase checkpoints:
    /// prepared, not committed yet).
    pub pending_checkpoint: Option<ExtendedSequenceNumber>,
    /// `pendingCheckpointState` (Java KCL 2.x/3.x, binary): the application's state stored
    /// with the prepared checkpoint, e.g. the key of an object being uploaded.
    pub pending_checkpoint_state: Option<bytes::Bytes>,
    /// `checkpointOwner` (Java KCL 3.x): the previous owner during a graceful handoff.
    pub checkpoint_owner: Option<WorkerId>,
    /// `latestResolvedAt` (this library's): while the checkpoint is still `LATEST`, the
    /// stream's time that `LATEST` stood for when the shard was first read. A new owner
    /// resumes there (`AT_TIMESTAMP`), not at a fresh `LATEST` that would skip what arrived
    /// meanwhile. Other KCLs ignore it (and start at `LATEST`, as they always do).
    pub latest_resolved_at: Option<std::time::SystemTime>,
    /// `throughputKBps` (the Java KCL 3.x attribute, KiB per second), here in bytes per
    /// second: what the owner's processor received from the shard lately, stored with each
    /// checkpoint. Balancing by load moves leases by it.
    pub throughput: Option<u64>,
}

impl Lease {
    /// A new, unowned lease for `shard` starting at `checkpoint`.
    pub fn new(shard: &ShardId, checkpoint: ExtendedSequenceNumber) -> Self {
        Self {
            key: LeaseKey::for_shard(shard),
            owner: None,
            counter: LeaseCounter(0),
            checkpoint,
            owner_switches_since_checkpoint: 0,
            parent_shard_ids: Vec::new(),
            child_shard_ids: Vec::new(),
            hash_range: None,
            pending_checkpoint: None,
            pending_checkpoint_state: None,
            checkpoint_owner: None,
            latest_resolved_at: None,
            throughput: None,
        }
    }

    /// Sets the parents (sorted, deduplicated).
    pub fn with_parents(mut self, parents: impl IntoIterator<Item = ShardId>) -> Self {
        self.parent_shard_ids = parents.into_iter().collect();
        self.parent_shard_ids.sort();
        self.parent_shard_ids.dedup();
        self
    }

    /// Sets the hash range.
    pub fn with_hash_range(mut self, range: HashKeyRange) -> Self {
        self.hash_range = Some(range);
        self
    }

    /// The shard the lease is for.
    pub fn shard_id(&self) -> ShardId {
        self.key.shard_id()
    }

    /// True once the shard was read to its end and checkpointed there.
    pub fn is_finished(&self) -> bool {
        self.checkpoint == ExtendedSequenceNumber::ShardEnd
    }

    /// True if `worker` owns the lease.
    pub fn is_owned_by(&self, worker: &WorkerId) -> bool {
        self.owner.as_ref() == Some(worker)
    }
}
