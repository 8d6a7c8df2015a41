//! The decisions behind the `kcl` admin commands (`kcl leases`, `kcl shards`, `kcl reset`,
//! `kcl release`), as pure functions over what was read from the lease table, the worker
//! table and `ListShards`, plus [`takeover`], the conditional writes that move a lease's
//! checkpoint or clear its owner while workers run.
//!
//! The command-line tool only reads, prints and asks; everything that decides is here and
//! table-tested.
//!
//! ```
//! use kcl::admin::owner::{decide, Action, OwnerState};
//! // An unowned lease is taken at once; a live owner is asked to hand it over only with --force.
//! assert_eq!(decide(&OwnerState::Unowned, false), Action::Take);
//! ```

pub mod owner;

use crate::Lease;

/// The leases of `stream`: in a multi-stream table those whose key names it, in a
/// single-stream table all of them (its leases are of the one stream it serves).
///
/// ```
/// use kcl::{ExtendedSequenceNumber, Lease, ShardId};
/// use kcl::stream::StreamIdentifier;
///
/// let shard = ShardId::new("shardId-000000000000");
/// let of = |stream: &str| {
///     let mut l = Lease::new(&shard, ExtendedSequenceNumber::TrimHorizon);
///     l.key = format!("1:{stream}:2").parse::<StreamIdentifier>().unwrap().lease_key(&shard);
///     l
/// };
/// let table = vec![of("orders"), of("refunds")];
/// assert_eq!(kcl::admin::of_stream(table, "orders").len(), 1);
/// ```
pub fn of_stream(leases: Vec<Lease>, stream: &str) -> Vec<Lease> {
    if leases.iter().all(|l| l.key.stream().is_none()) {
        return leases;
    }
    leases
        .into_iter()
        .filter(|l| l.key.stream().is_some_and(|s| s.name() == stream))
        .collect()
}
pub mod reset;
pub mod shards;
pub mod summary;
pub mod takeover;
