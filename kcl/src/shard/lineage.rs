//! Parents before children: may a child shard start?

use std::collections::BTreeSet;

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

/// A child may start when every parent is finished, has no lease, or is no longer in the
/// stream (trimmed away: its records are gone, so waiting for it would block forever).
pub(crate) fn can_start(parents: &[(ShardId, ParentState)], listed: &BTreeSet<ShardId>) -> bool {
    parents.iter().all(|(id, state)| match state {
        ParentState::Finished | ParentState::NoLease => true,
        ParentState::Unfinished => !listed.contains(id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_wait_for_unfinished_listed_parents() {
        let p = ShardId::new("p");
        let q = ShardId::new("q");
        let listed: BTreeSet<_> = [p.clone(), q.clone()].into();
        use ParentState::*;
        assert!(can_start(&[], &listed));
        assert!(can_start(
            &[(p.clone(), Finished), (q.clone(), NoLease)],
            &listed
        ));
        assert!(!can_start(
            &[(p.clone(), Finished), (q.clone(), Unfinished)],
            &listed
        ));
        // q was trimmed away: it no longer blocks.
        let only_p: BTreeSet<_> = [p.clone()].into();
        assert!(can_start(&[(p, Finished), (q, Unfinished)], &only_p));
    }
}
