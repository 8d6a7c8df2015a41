//! Shards, their hash-key ranges, and the resharding rules.
//!
//! A split closes one parent and opens two children; a merge closes two parents and opens one
//! child. Both keep per-partition-key order only if a child's records are delivered after all of
//! its parents' records: so a child's lease waits until every parent's lease is checkpointed at
//! `SHARD_END`, or the parent is gone from the stream and the table ([`lineage`]). New shards get
//! leases from the periodic shard sync ([`sync`]) and, at once, from the consumer that reaches a
//! parent's end.

pub mod lineage;
pub mod sync;

use std::fmt;

use crate::record::SequenceNumber;

/// A shard's id, e.g. `shardId-000000000001`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardId(Box<str>);

impl ShardId {
    /// Wraps a shard id string.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into().into_boxed_str())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<&str> for ShardId {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for ShardId {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

/// An inclusive range of 128-bit hash keys (`MD5(partition key)` as a big-endian integer).
///
/// ```
/// use kcl::shard::HashKeyRange;
/// let all = HashKeyRange::FULL;
/// let (lo, hi) = all.split_at(1u128 << 127).unwrap();
/// assert_eq!(lo.end() + 1, hi.start());
/// assert!(hi.contains(u128::MAX));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct HashKeyRange {
    start: u128,
    end: u128,
}

/// A hash-key range whose bounds are not decimal 128-bit integers or are out of order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid hash key range [{start}, {end}]: {reason}")]
pub struct InvalidHashKeyRange {
    start: String,
    end: String,
    reason: &'static str,
}

impl HashKeyRange {
    /// Every hash key.
    pub const FULL: Self = Self {
        start: 0,
        end: u128::MAX,
    };

    /// A range from `start` to `end`, both included.
    ///
    /// # Errors
    /// [`InvalidHashKeyRange`] if `start > end`.
    pub fn new(start: u128, end: u128) -> Result<Self, InvalidHashKeyRange> {
        if start > end {
            return Err(InvalidHashKeyRange {
                start: start.to_string(),
                end: end.to_string(),
                reason: "start is after end",
            });
        }
        Ok(Self { start, end })
    }

    /// Parses decimal bounds, as Kinesis and the lease table write them.
    ///
    /// # Errors
    /// [`InvalidHashKeyRange`] if a bound is not a decimal `u128` or the bounds are out of order.
    pub fn parse(start: &str, end: &str) -> Result<Self, InvalidHashKeyRange> {
        let err = |reason| InvalidHashKeyRange {
            start: start.to_owned(),
            end: end.to_owned(),
            reason,
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(start) || !digits(end) {
            return Err(err("bounds must be decimal integers"));
        }
        let s: u128 = start.parse().map_err(|_| err("start exceeds 2^128-1"))?;
        let e: u128 = end.parse().map_err(|_| err("end exceeds 2^128-1"))?;
        Self::new(s, e).map_err(|_| err("start is after end"))
    }

    /// The first hash key in the range.
    pub fn start(&self) -> u128 {
        self.start
    }

    /// The last hash key in the range.
    pub fn end(&self) -> u128 {
        self.end
    }

    /// True if `key` falls in the range.
    pub fn contains(&self, key: u128) -> bool {
        self.start <= key && key <= self.end
    }

    /// Splits into `[start, at-1]` and `[at, end]`; `None` unless `start < at <= end`.
    pub fn split_at(&self, at: u128) -> Option<(Self, Self)> {
        (self.start < at && at <= self.end).then(|| {
            (
                Self {
                    start: self.start,
                    end: at - 1,
                },
                Self {
                    start: at,
                    end: self.end,
                },
            )
        })
    }

    /// The union of two adjacent ranges; `None` if they do not touch.
    pub fn merge(&self, other: &Self) -> Option<Self> {
        let (lo, hi) = if self.start <= other.start {
            (self, other)
        } else {
            (other, self)
        };
        (lo.end.checked_add(1) == Some(hi.start)).then_some(Self {
            start: lo.start,
            end: hi.end,
        })
    }
}

/// The hash key Kinesis routes a partition key by: MD5 of its UTF-8 bytes, big-endian.
///
/// ```
/// assert_eq!(kcl::shard::hash_key("a"), 0x0cc175b9c0f1b6a831c399e269772661);
/// ```
pub fn hash_key(partition_key: &str) -> u128 {
    use md5::{Digest, Md5};
    let digest = Md5::digest(partition_key.as_bytes());
    u128::from_be_bytes(digest.into())
}

/// A shard as listed by `ListShards`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Shard {
    /// The shard's id.
    pub id: ShardId,
    /// The parent (split or merge) shard, if any.
    pub parent: Option<ShardId>,
    /// The second parent of a merge, if any.
    pub adjacent_parent: Option<ShardId>,
    /// The hash keys routed to this shard.
    pub hash_range: HashKeyRange,
    /// The first sequence number of the shard.
    pub starting_sequence: SequenceNumber,
    /// The last sequence number, once the shard is closed.
    pub ending_sequence: Option<SequenceNumber>,
}

impl Shard {
    /// A shard description.
    pub fn new(
        id: ShardId,
        parents: Vec<ShardId>,
        hash_range: HashKeyRange,
        starting_sequence: SequenceNumber,
        ending_sequence: Option<SequenceNumber>,
    ) -> Self {
        let mut parents = parents.into_iter();
        Self {
            id,
            parent: parents.next(),
            adjacent_parent: parents.next(),
            hash_range,
            starting_sequence,
            ending_sequence,
        }
    }

    /// The 0–2 parents.
    pub fn parents(&self) -> impl Iterator<Item = &ShardId> {
        self.parent.iter().chain(self.adjacent_parent.iter())
    }

    /// True once the shard is closed (no more writes; readable to its end).
    pub fn is_closed(&self) -> bool {
        self.ending_sequence.is_some()
    }
}

/// A child shard reported by `GetRecords` (or fan-out) at the end of its parent.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChildShard {
    /// The child's id.
    pub id: ShardId,
    /// All parents of the child (one for a split, two for a merge).
    pub parents: Vec<ShardId>,
    /// The child's hash-key range.
    pub hash_range: HashKeyRange,
}

impl ChildShard {
    /// A child shard description.
    pub fn new(id: ShardId, parents: Vec<ShardId>, hash_range: HashKeyRange) -> Self {
        Self {
            id,
            parents,
            hash_range,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_and_merge() {
        let (a, b) = HashKeyRange::FULL.split_at(100).unwrap();
        assert_eq!(a.merge(&b), Some(HashKeyRange::FULL));
        assert_eq!(b.merge(&a), Some(HashKeyRange::FULL));
        assert!(HashKeyRange::FULL.split_at(0).is_none());
        assert!(a.merge(&a).is_none());
    }

    #[test]
    fn ranges_parse_and_reject() {
        let r = HashKeyRange::parse("0", "340282366920938463463374607431768211455").unwrap();
        assert_eq!(r, HashKeyRange::FULL);
        assert!(HashKeyRange::parse("5", "4").is_err());
        assert!(HashKeyRange::parse("x", "4").is_err());
        assert!(HashKeyRange::parse("0", "340282366920938463463374607431768211456").is_err());
    }
}
