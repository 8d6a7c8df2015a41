//! Parents before children: may a child shard start?

use crate::lease::Lease;
use crate::shard::ShardId;

/// What is known about one parent of a waiting child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParentState {
    /// The parent's lease is checkpointed at `SHARD_END`.
    Finished,
    /// The parent has a lease that is not finished.
    Unfinished,
    /// No lease for the parent (never leased, or already cleaned up).
    NoLease,
}

impl ParentState {
    pub(crate) fn of(lease: Option<&Lease>) -> Self {
        match lease {
            None => Self::NoLease,
            Some(l) if l.is_finished() => Self::Finished,
            Some(_) => Self::Unfinished,
        }
    }
}

/// A child may start when every parent is finished or has no lease.
///
/// A parent that left the stream (trimmed away) does not block forever: the shard syncer
/// deletes the lease of a shard missing from a listing taken *after* the table was read
/// (`shard::sync`), and then the parent has no lease. Deciding from a worker's own, possibly
/// older, listing instead would let a child start before a parent created after that listing.
pub(crate) fn can_start(parents: &[(ShardId, ParentState)]) -> bool {
    parents
        .iter()
        .all(|(_, state)| matches!(state, ParentState::Finished | ParentState::NoLease))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_wait_for_unfinished_parents() {
        let p = ShardId::new("p");
        let q = ShardId::new("q");
        use ParentState::*;
        assert!(can_start(&[]));
        assert!(can_start(&[(p.clone(), Finished), (q.clone(), NoLease)]));
        assert!(!can_start(&[(p, Finished), (q, Unfinished)]));
    }
}
