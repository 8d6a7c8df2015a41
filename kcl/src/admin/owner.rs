//! Whether a lease's owner is alive, judged the way the fleet judges it
//! (`docs/lease-table.md`, "Expiry is observed, never computed from clocks"), and what an
//! admin command may do with the lease.
//!
//! An owner with a worker item is alive while its `heartbeat` moves (or its item names a new
//! incarnation); an owner without one (a Java KCL worker, a worker set to per-lease liveness, a
//! pseudo-owner left by an interrupted `kcl reset`) while the lease's own `leaseCounter`
//! moves. Either must stand still for the fleet's lease duration before the owner is judged
//! gone: the command observes that long (it may stop early once every owner was seen alive).

use crate::lease::liveness::WorkerItem;
use crate::lease::{Lease, WorkerId};

/// What was observed of a lease's owner.
///
/// ```
/// use kcl::admin::owner::OwnerState;
/// let s = OwnerState::Unowned;
/// assert!(!s.is_live());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OwnerState {
    /// Nobody owns the lease.
    Unowned,
    /// A graceful handoff is pending (`checkpointOwner` set): `from` is finishing, `to` waits.
    HandoffPending {
        /// The old owner (`checkpointOwner`).
        from: WorkerId,
        /// The new owner (`leaseOwner`).
        to: WorkerId,
    },
    /// The owner has a worker item whose heartbeat moved (or whose incarnation changed).
    LiveWorker {
        /// The owner.
        owner: WorkerId,
        /// Its item as last read (its incarnation addresses handoff notices).
        item: WorkerItem,
    },
    /// The owner has no worker item and the lease counter moved: a Java KCL worker (or a
    /// worker renewing per lease) that is running.
    LiveWithoutItem {
        /// The owner.
        owner: WorkerId,
    },
    /// The owner's item is fenced (`fencedBy`): it was declared dead and drops its leases.
    Fenced {
        /// The owner.
        owner: WorkerId,
    },
    /// The owner's heartbeat stood still for the whole observation: it must be fenced (on
    /// exactly this item) before its lease is taken.
    HeartbeatStill {
        /// The owner.
        owner: WorkerId,
        /// Its item, as seen at both ends of the observation.
        item: WorkerItem,
    },
    /// The owner has no worker item and the lease counter stood still for the whole
    /// observation.
    CounterStill {
        /// The owner.
        owner: WorkerId,
    },
}

impl OwnerState {
    /// True if the owner is running (or a handoff is under way).
    ///
    /// ```
    /// use kcl::admin::owner::OwnerState;
    /// use kcl::lease::WorkerId;
    /// assert!(OwnerState::LiveWithoutItem { owner: WorkerId::new("java-1") }.is_live());
    /// ```
    pub fn is_live(&self) -> bool {
        matches!(
            self,
            Self::LiveWorker { .. } | Self::LiveWithoutItem { .. } | Self::HandoffPending { .. }
        )
    }

    /// A short word for tables and JSON: `unowned`, `handoff`, `live`, `live-no-item`,
    /// `fenced`, `dead`.
    ///
    /// ```
    /// use kcl::admin::owner::OwnerState;
    /// assert_eq!(OwnerState::Unowned.label(), "unowned");
    /// ```
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unowned => "unowned",
            Self::HandoffPending { .. } => "handoff",
            Self::LiveWorker { .. } => "live",
            Self::LiveWithoutItem { .. } => "live-no-item",
            Self::Fenced { .. } => "fenced",
            Self::HeartbeatStill { .. } | Self::CounterStill { .. } => "dead",
        }
    }
}

/// Judges `lease`'s owner from two observations: the lease and the owner's worker item (if
/// any) at the start (`lease_before`, `item_before`) and at the end (`lease_after`,
/// `item_after`) of a period as long as the fleet's lease duration. `item_*` are `None` when
/// the owner has no item (or there is no worker table).
///
/// ```
/// use kcl::admin::owner::{judge, OwnerState};
/// use kcl::lease::{Lease, LeaseCounter, WorkerId};
/// use kcl::{ExtendedSequenceNumber, ShardId};
/// let mut before = Lease::new(&ShardId::new("shardId-0"), ExtendedSequenceNumber::TrimHorizon);
/// before.owner = Some(WorkerId::new("java-1"));
/// let mut after = before.clone();
/// after.counter = LeaseCounter(1); // renewed meanwhile
/// assert!(matches!(judge(&before, &after, None, None), OwnerState::LiveWithoutItem { .. }));
/// ```
pub fn judge(
    lease_before: &Lease,
    lease_after: &Lease,
    item_before: Option<&WorkerItem>,
    item_after: Option<&WorkerItem>,
) -> OwnerState {
    let Some(owner) = lease_after.owner.clone() else {
        return OwnerState::Unowned;
    };
    if let Some(from) = lease_after.checkpoint_owner.clone() {
        return OwnerState::HandoffPending { from, to: owner };
    }
    match item_after {
        Some(item) if item.fenced_by.is_some() => OwnerState::Fenced { owner },
        Some(after) => {
            let moved = match item_before {
                Some(before) => {
                    before.incarnation != after.incarnation || before.heartbeat != after.heartbeat
                }
                // The item appeared during the observation: a worker registered.
                None => true,
            };
            if moved {
                OwnerState::LiveWorker {
                    owner,
                    item: after.clone(),
                }
            } else {
                OwnerState::HeartbeatStill {
                    owner,
                    item: after.clone(),
                }
            }
        }
        None => {
            let same_owner = lease_before.owner.as_ref() == Some(&owner);
            if same_owner && lease_before.counter == lease_after.counter {
                OwnerState::CounterStill { owner }
            } else {
                OwnerState::LiveWithoutItem { owner }
            }
        }
    }
}

/// What an admin command does to get a lease into its own (pseudo-owner's) hands.
///
/// ```
/// use kcl::admin::owner::Action;
/// assert_ne!(Action::Take, Action::Handoff);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// `take`, conditional on the counter (unowned, or an owner without item judged gone, or a
    /// fenced owner).
    Take,
    /// Fence the owner's item (conditional on the heartbeat seen), then `take`.
    FenceThenTake,
    /// Graceful handoff: notify the owner, request the lease, wait until the owner completes it.
    Handoff,
    /// Nothing may be done; the reason says why and what to do.
    Refuse(String),
}

/// What to do with a lease whose owner is in `state`; `force` allows a graceful handoff from a
/// live worker of this library.
///
/// ```
/// use kcl::admin::owner::{decide, Action, OwnerState};
/// use kcl::lease::WorkerId;
/// let java = OwnerState::LiveWithoutItem { owner: WorkerId::new("java-1") };
/// assert!(matches!(decide(&java, true), Action::Refuse(_)));
/// ```
pub fn decide(state: &OwnerState, force: bool) -> Action {
    match state {
        OwnerState::Unowned | OwnerState::Fenced { .. } | OwnerState::CounterStill { .. } => {
            Action::Take
        }
        OwnerState::HeartbeatStill { .. } => Action::FenceThenTake,
        OwnerState::LiveWorker { .. } if force => Action::Handoff,
        OwnerState::LiveWorker { owner, .. } => Action::Refuse(format!(
            "held by the live worker {owner}: stop it, or pass --force to have it hand the \
             lease over gracefully (its processor checkpoints and stops)"
        )),
        OwnerState::LiveWithoutItem { owner } => Action::Refuse(format!(
            "held by {owner}, which renews the lease but has no worker item (a Java KCL \
             worker?): it cannot be asked for a handoff; stop it first"
        )),
        OwnerState::HandoffPending { from, to } => Action::Refuse(format!(
            "a handoff from {from} to {to} is under way: try again once it completed"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Name, lease before and after, item before and after, the label expected.
    type Case = (
        &'static str,
        Lease,
        Lease,
        Option<WorkerItem>,
        Option<WorkerItem>,
        &'static str,
    );
    use crate::lease::LeaseCounter;
    use crate::record::ExtendedSequenceNumber;
    use crate::shard::ShardId;

    fn lease(owner: Option<&str>, counter: u64, checkpoint_owner: Option<&str>) -> Lease {
        let mut l = Lease::new(
            &ShardId::new("shardId-0"),
            ExtendedSequenceNumber::TrimHorizon,
        );
        l.owner = owner.map(WorkerId::new);
        l.counter = LeaseCounter(counter);
        l.checkpoint_owner = checkpoint_owner.map(WorkerId::new);
        l
    }

    fn item(incarnation: u64, heartbeat: u64, fenced: bool) -> WorkerItem {
        let mut w = WorkerItem::new(WorkerId::new("w1"), incarnation);
        w.heartbeat = heartbeat;
        w.fenced_by = fenced.then(|| WorkerId::new("w2"));
        w
    }

    #[test]
    fn owners_are_judged_by_what_moved() {
        let w1 = lease(Some("w1"), 5, None);
        #[rustfmt::skip]
        let table: Vec<Case> = vec![
            ("unowned", lease(None, 5, None), lease(None, 5, None), None, None, "unowned"),
            ("released during the observation", w1.clone(), lease(None, 6, None), None, None, "unowned"),
            ("handoff pending", w1.clone(), lease(Some("w2"), 5, Some("w1")), Some(item(1, 3, false)), Some(item(1, 4, false)), "handoff"),
            ("heartbeat moved", w1.clone(), w1.clone(), Some(item(1, 3, false)), Some(item(1, 4, false)), "live"),
            ("new incarnation", w1.clone(), w1.clone(), Some(item(1, 3, false)), Some(item(2, 0, false)), "live"),
            ("item appeared", w1.clone(), w1.clone(), None, Some(item(1, 0, false)), "live"),
            ("heartbeat still", w1.clone(), w1.clone(), Some(item(1, 3, false)), Some(item(1, 3, false)), "dead"),
            ("heartbeat still, lease counter moved (not how an item owner is judged)", w1.clone(), lease(Some("w1"), 6, None), Some(item(1, 3, false)), Some(item(1, 3, false)), "dead"),
            ("fenced", w1.clone(), w1.clone(), Some(item(1, 3, false)), Some(item(1, 3, true)), "fenced"),
            ("no item, counter moved", w1.clone(), lease(Some("w1"), 6, None), None, None, "live-no-item"),
            ("no item, counter still", w1.clone(), w1.clone(), None, None, "dead"),
            ("no item, owner changed (taken meanwhile)", lease(Some("w0"), 5, None), w1.clone(), None, None, "live-no-item"),
        ];
        for (name, before, after, ib, ia, want) in table {
            let got = judge(&before, &after, ib.as_ref(), ia.as_ref());
            assert_eq!(got.label(), want, "{name}: {got:?}");
        }
    }

    #[test]
    fn only_a_live_owner_of_this_library_is_asked_and_only_with_force() {
        let owner = WorkerId::new("w1");
        let live = OwnerState::LiveWorker {
            owner: owner.clone(),
            item: item(1, 3, false),
        };
        let still = OwnerState::HeartbeatStill {
            owner: owner.clone(),
            item: item(1, 3, false),
        };
        let java = OwnerState::LiveWithoutItem {
            owner: owner.clone(),
        };
        let handoff = OwnerState::HandoffPending {
            from: owner.clone(),
            to: WorkerId::new("w2"),
        };
        #[rustfmt::skip]
        let table: Vec<(OwnerState, bool, &str)> = vec![
            (OwnerState::Unowned, false, "take"),
            (OwnerState::Unowned, true, "take"),
            (OwnerState::Fenced { owner: owner.clone() }, false, "take"),
            (OwnerState::CounterStill { owner: owner.clone() }, false, "take"),
            (still, false, "fence"),
            (live.clone(), false, "refuse"),
            (live, true, "handoff"),
            (java.clone(), false, "refuse"),
            (java, true, "refuse"),
            (handoff.clone(), false, "refuse"),
            (handoff, true, "refuse"),
        ];
        for (state, force, want) in table {
            let got = match decide(&state, force) {
                Action::Take => "take",
                Action::FenceThenTake => "fence",
                Action::Handoff => "handoff",
                Action::Refuse(_) => "refuse",
            };
            assert_eq!(got, want, "{state:?} force={force}");
        }
    }
}
