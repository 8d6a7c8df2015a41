//! `kcl shards`: the stream's shard tree (parents before children), each shard's state and the
//! lease that covers it.

use std::collections::{BTreeMap, BTreeSet};

use crate::lease::Lease;
use crate::record::SequenceNumber;
use crate::shard::{HashKeyRange, Shard, ShardId};

/// A shard's state.
///
/// ```
/// use kcl::admin::shards::ShardState;
/// assert_eq!(ShardState::Open.label(), "OPEN");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShardState {
    /// Listed, still written to.
    Open,
    /// Listed, closed (split or merged) at this sequence number.
    Closed {
        /// The shard's last sequence number.
        ending: SequenceNumber,
    },
    /// Named as a parent or by a lease, but no longer listed: past the stream's retention.
    Expired,
}

impl ShardState {
    /// `OPEN`, `CLOSED` or `EXPIRED`.
    ///
    /// ```
    /// use kcl::admin::shards::ShardState;
    /// assert_eq!(ShardState::Expired.label(), "EXPIRED");
    /// ```
    pub fn label(&self) -> &'static str {
        match self {
            Self::Open => "OPEN",
            Self::Closed { .. } => "CLOSED",
            Self::Expired => "EXPIRED",
        }
    }
}

/// One shard of the tree.
///
/// ```
/// let nodes = kcl::admin::shards::shard_tree(&[], &[]);
/// assert!(nodes.is_empty());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShardNode {
    /// The shard.
    pub id: ShardId,
    /// Its state.
    pub state: ShardState,
    /// Its 0–2 parents.
    pub parents: Vec<ShardId>,
    /// Its children (shards that name it as a parent).
    pub children: Vec<ShardId>,
    /// Its hash-key range (from `ListShards`, else from its lease), if known.
    pub hash_range: Option<HashKeyRange>,
    /// Its lease, if the table has one.
    pub lease: Option<Lease>,
    /// How deep in the tree it is drawn (0: a root). A merge child is drawn once, under the
    /// first of its parents, one level below the deeper one.
    pub depth: usize,
}

/// Builds the tree from the shards `ListShards` returned and the lease table (either may be
/// empty). Shards come in drawing order: each root, then its descendants depth-first, children
/// in id order; a child with two parents comes after both.
///
/// ```
/// use kcl::admin::shards::{shard_tree, ShardState};
/// use kcl::shard::{HashKeyRange, Shard};
/// use kcl::{SequenceNumber, ShardId};
/// let child = Shard::new(ShardId::new("shardId-1"), vec![ShardId::new("shardId-0")],
///     HashKeyRange::FULL, SequenceNumber::from_u128(5), None);
/// let nodes = shard_tree(&[child], &[]);
/// assert_eq!(nodes[0].id.as_str(), "shardId-0");
/// assert_eq!(nodes[0].state, ShardState::Expired); // named as a parent, no longer listed
/// assert_eq!(nodes[1].depth, 1);
/// ```
pub fn shard_tree(shards: &[Shard], leases: &[Lease]) -> Vec<ShardNode> {
    let mut nodes: BTreeMap<ShardId, ShardNode> = BTreeMap::new();
    let blank = |id: &ShardId| ShardNode {
        id: id.clone(),
        state: ShardState::Expired,
        parents: Vec::new(),
        children: Vec::new(),
        hash_range: None,
        lease: None,
        depth: 0,
    };
    for s in shards {
        let n = nodes.entry(s.id.clone()).or_insert_with(|| blank(&s.id));
        n.state = match &s.ending_sequence {
            Some(e) => ShardState::Closed { ending: e.clone() },
            None => ShardState::Open,
        };
        n.parents = s.parents().cloned().collect();
        n.hash_range = Some(s.hash_range);
    }
    for l in leases {
        let id = l.shard_id();
        let n = nodes.entry(id.clone()).or_insert_with(|| blank(&id));
        if n.parents.is_empty() {
            n.parents = l.parent_shard_ids.clone();
        }
        n.hash_range = n.hash_range.or(l.hash_range);
        n.lease = Some(l.clone());
    }
    // Parents named by someone but neither listed nor leased.
    let named: Vec<ShardId> = nodes.values().flat_map(|n| n.parents.clone()).collect();
    for p in named {
        nodes.entry(p.clone()).or_insert_with(|| blank(&p));
    }
    let links: Vec<(ShardId, ShardId)> = nodes
        .values()
        .flat_map(|n| n.parents.iter().map(|p| (p.clone(), n.id.clone())))
        .collect();
    for (parent, child) in links {
        if let Some(n) = nodes.get_mut(&parent) {
            if !n.children.contains(&child) {
                n.children.push(child);
            }
        }
    }
    for n in nodes.values_mut() {
        n.children.sort();
    }
    // Depth-first from the roots; a node is drawn once all its parents are.
    let mut out: Vec<ShardNode> = Vec::with_capacity(nodes.len());
    let mut drawn: BTreeMap<ShardId, usize> = BTreeMap::new();
    let roots: Vec<ShardId> = nodes
        .values()
        .filter(|n| n.parents.iter().all(|p| !nodes.contains_key(p)))
        .map(|n| n.id.clone())
        .collect();
    let mut stack: Vec<ShardId> = roots.into_iter().rev().collect();
    while let Some(id) = stack.pop() {
        if drawn.contains_key(&id) {
            continue;
        }
        let Some(node) = nodes.get(&id) else { continue };
        let parent_depths: Option<Vec<usize>> = node
            .parents
            .iter()
            .filter(|p| nodes.contains_key(*p))
            .map(|p| drawn.get(p).copied())
            .collect();
        let Some(parent_depths) = parent_depths else {
            continue; // drawn later, under its last parent
        };
        let depth = parent_depths.iter().max().map_or(0, |d| d + 1);
        drawn.insert(id.clone(), depth);
        let mut n = node.clone();
        n.depth = depth;
        stack.extend(n.children.iter().rev().cloned());
        out.push(n);
    }
    // Anything in a cycle (a malformed table) is still shown, at the root level.
    let missing: BTreeSet<ShardId> = nodes
        .keys()
        .filter(|id| !drawn.contains_key(*id))
        .cloned()
        .collect();
    for id in missing {
        if let Some(n) = nodes.get(&id) {
            out.push(n.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Name, shards listed, leases, the nodes expected (id, depth, state, owner).
    type Case = (
        &'static str,
        Vec<Shard>,
        Vec<Lease>,
        Vec<(u32, usize, &'static str, Option<String>)>,
    );
    use crate::lease::WorkerId;
    use crate::record::ExtendedSequenceNumber;

    fn sid(n: u32) -> ShardId {
        ShardId::new(format!("shardId-{n:012}"))
    }

    fn shard(n: u32, parents: &[u32], end: Option<u128>) -> Shard {
        Shard::new(
            sid(n),
            parents.iter().map(|p| sid(*p)).collect(),
            HashKeyRange::FULL,
            SequenceNumber::from_u128(1),
            end.map(SequenceNumber::from_u128),
        )
    }

    fn lease(n: u32, parents: &[u32], owner: Option<&str>) -> Lease {
        let mut l = Lease::new(&sid(n), ExtendedSequenceNumber::TrimHorizon)
            .with_parents(parents.iter().map(|p| sid(*p)));
        l.owner = owner.map(WorkerId::new);
        l
    }

    fn view(nodes: &[ShardNode]) -> Vec<(u32, usize, &'static str, Option<String>)> {
        nodes
            .iter()
            .map(|n| {
                let id =
                    n.id.as_str()
                        .trim_start_matches("shardId-")
                        .parse()
                        .unwrap_or(u32::MAX);
                let owner = n.lease.as_ref().map(|l| {
                    l.owner
                        .as_ref()
                        .map_or_else(|| "-".to_owned(), |o| o.to_string())
                });
                (id, n.depth, n.state.label(), owner)
            })
            .collect()
    }

    #[test]
    fn trees() {
        let s = |o: &str| Some(o.to_owned());
        #[rustfmt::skip]
        let table: Vec<Case> = vec![
            ("one open shard, no leases", vec![shard(0, &[], None)], vec![],
                vec![(0, 0, "OPEN", None)]),
            ("a split: the parent closed, the children under it",
                vec![shard(0, &[], Some(9)), shard(2, &[0], None), shard(1, &[0], None)],
                vec![lease(1, &[0], Some("w1")), lease(0, &[], None)],
                vec![(0, 0, "CLOSED", s("-")), (1, 1, "OPEN", s("w1")), (2, 1, "OPEN", None)]),
            ("a merge: the child once, after both parents, below the deeper",
                vec![shard(0, &[], Some(9)), shard(1, &[0], Some(9)), shard(2, &[], Some(9)), shard(3, &[1, 2], None)],
                vec![],
                vec![(0, 0, "CLOSED", None), (1, 1, "CLOSED", None), (2, 0, "CLOSED", None), (3, 2, "OPEN", None)]),
            ("a parent past retention, named by the listing",
                vec![shard(1, &[0], None)], vec![],
                vec![(0, 0, "EXPIRED", None), (1, 1, "OPEN", None)]),
            ("a lease of a shard past retention, with its parent known only from the lease",
                vec![shard(2, &[], None)], vec![lease(5, &[4], Some("w2"))],
                vec![(2, 0, "OPEN", None), (4, 0, "EXPIRED", None), (5, 1, "EXPIRED", s("w2"))]),
            ("a cycle (malformed) is still shown",
                vec![shard(1, &[2], None), shard(2, &[1], None)], vec![],
                vec![(1, 0, "OPEN", None), (2, 0, "OPEN", None)]),
        ];
        for (name, shards, leases, want) in table {
            let got = shard_tree(&shards, &leases);
            assert_eq!(view(&got), want, "{name}");
        }
    }

    #[test]
    fn children_and_ending_are_kept() {
        let nodes = shard_tree(
            &[
                shard(0, &[], Some(77)),
                shard(1, &[0], None),
                shard(2, &[0], None),
            ],
            &[],
        );
        assert_eq!(nodes[0].children, vec![sid(1), sid(2)]);
        assert_eq!(
            nodes[0].state,
            ShardState::Closed {
                ending: SequenceNumber::from_u128(77)
            }
        );
    }
}
