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
pub mod reset;
pub mod shards;
pub mod summary;
pub mod takeover;
