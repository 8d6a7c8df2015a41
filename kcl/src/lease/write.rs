//! One conditional write to a lease, as data — and how to tell, when its answer was lost,
//! whether it was applied.
//!
//! A write's answer can be lost after the table applied it: a 5xx or a timeout on the way
//! back. The SDK then retries it, and the retry's condition fails, because the first attempt
//! already moved the counter. Taken at face value that reads "the lease moved": a lone, healthy
//! worker would drop its own lease and process everything since the last checkpoint again. So
//! after a failed condition (or an answer that never came) the lease is read back, and the
//! write counts as applied when the item is exactly what it would have left: the next counter,
//! the owner, the checkpoint and the handoff fields it sets ([`LeaseWrite::was_applied`]). Only
//! otherwise is the lease lost.

use std::time::Duration;

use backon::BackoffBuilder;
use tokio::time::Instant;
use tracing::{debug, info};

use super::{item, Lease, LeaseKey, LeaseStore, LeaseStoreError, WorkerId};
use crate::checkpoint::PendingCheckpoint;
use crate::metrics as m;
use crate::record::ExtendedSequenceNumber;
use crate::shard::ShardId;

/// A conditional write to one lease (see the protocol table in [`crate::lease`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LeaseWrite {
    /// Heartbeat: counter + 1.
    Renew,
    /// Take the lease for `owner`.
    Take { owner: WorkerId },
    /// Store a checkpoint (with the children at `SHARD_END`).
    Checkpoint {
        position: ExtendedSequenceNumber,
        children: Vec<ShardId>,
    },
    /// Two-phase checkpoints: prepare (or, with `None`, clear) a pending checkpoint.
    SetPending { pending: Option<PendingCheckpoint> },
    /// Give the lease up.
    Release,
    /// Record the stream time a `LATEST` checkpoint stood for.
    ResolveLatest { at: std::time::SystemTime },
    /// Graceful handoff, step 1 (the new owner `to`).
    RequestHandoff { to: WorkerId },
    /// Graceful handoff, step 2 (the old owner, to `to`).
    CompleteHandoff { to: WorkerId },
    /// A graceful handoff withdrawn by the new owner (stopping) before step 2.
    WithdrawHandoff,
}

impl LeaseWrite {
    /// The operation's name (logs, metrics).
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Renew => "renew",
            Self::Take { .. } => "take",
            Self::Checkpoint { .. } => "checkpoint",
            Self::SetPending { .. } => "set_pending_checkpoint",
            Self::Release => "release",
            Self::ResolveLatest { .. } => "resolve_latest",
            Self::RequestHandoff { .. } => "request_handoff",
            Self::CompleteHandoff { .. } => "complete_handoff",
            Self::WithdrawHandoff => "withdraw_handoff",
        }
    }

    /// Sends the write once, conditional on `seen` (the caller's last view of the lease).
    pub(crate) async fn send(
        &self,
        store: &dyn LeaseStore,
        seen: &Lease,
    ) -> Result<Lease, LeaseStoreError> {
        match self {
            Self::Renew => store.renew(seen).await,
            Self::Take { owner } => store.take(seen, owner).await,
            Self::Checkpoint { position, children } => {
                store.checkpoint(seen, position, children).await
            }
            Self::SetPending { pending } => {
                store.set_pending_checkpoint(seen, pending.as_ref()).await
            }
            Self::Release => store.release(seen).await,
            Self::ResolveLatest { at } => store.resolve_latest(seen, *at).await,
            Self::RequestHandoff { to } => store.request_handoff(seen, to).await,
            Self::CompleteHandoff { to } => store.complete_handoff(seen, to).await,
            Self::WithdrawHandoff => store.withdraw_handoff(seen).await,
        }
    }

    /// True when `observed` is exactly the lease this write leaves when applied to `seen`:
    /// the counter it writes, and the owner, checkpoint and handoff fields it sets or
    /// requires. Counters only grow and each value is written by one write, so a match means
    /// this write (or an identical one by the same holder) was applied.
    pub(crate) fn was_applied(&self, seen: &Lease, observed: &Lease) -> bool {
        let next = observed.counter == seen.counter.next();
        let same_checkpoint = observed.checkpoint == seen.checkpoint;
        match self {
            Self::Renew => {
                next && seen.owner.is_some()
                    && observed.owner == seen.owner
                    && observed.checkpoint_owner == seen.checkpoint_owner
                    && same_checkpoint
            }
            Self::Take { owner } => {
                // A lease being handed to us is left in exactly this state by the old owner's
                // CompleteHandoff too: not ours by this write, so not recognised (the lease,
                // read again, names us and is taken at the next round).
                let handed_to_us =
                    seen.owner.as_ref() == Some(owner) && seen.checkpoint_owner.is_some();
                next && !handed_to_us
                    && observed.owner.as_ref() == Some(owner)
                    && observed.checkpoint_owner.is_none()
                    && same_checkpoint
            }
            Self::Checkpoint { position, children } => {
                // During a handoff the old owner writes as `checkpointOwner`.
                let holder = seen.owner.is_some()
                    && (observed.owner == seen.owner || observed.checkpoint_owner == seen.owner);
                next && holder
                    && observed.checkpoint == *position
                    && children
                        .iter()
                        .all(|c| observed.child_shard_ids.contains(c))
            }
            Self::SetPending { pending } => {
                let expected = super::store::effect::pending_set(seen, pending.as_ref());
                let holder = seen.owner.is_some()
                    && (observed.owner == seen.owner || observed.checkpoint_owner == seen.owner);
                next && holder
                    && same_checkpoint
                    && observed.pending_checkpoint == expected.pending_checkpoint
                    && observed.pending_checkpoint_state == expected.pending_checkpoint_state
            }
            Self::Release => next && observed.owner.is_none() && same_checkpoint,
            Self::ResolveLatest { at } => {
                next && seen.owner.is_some()
                    && observed.owner == seen.owner
                    && same_checkpoint
                    && observed.latest_resolved_at.map(item::epoch_millis)
                        == Some(item::epoch_millis(*at))
            }
            Self::RequestHandoff { to } => {
                // Leaves the counter as it was.
                observed.counter == seen.counter
                    && seen.owner.is_some()
                    && observed.owner.as_ref() == Some(to)
                    && observed.checkpoint_owner == seen.owner
                    && same_checkpoint
            }
            Self::CompleteHandoff { to } => {
                next && observed.owner.as_ref() == Some(to)
                    && observed.checkpoint_owner.is_none()
                    && same_checkpoint
            }
            Self::WithdrawHandoff => {
                // Leaves the counter as it was: the lease is back as before the request.
                observed.counter == seen.counter
                    && seen.checkpoint_owner.is_some()
                    && observed.owner == seen.checkpoint_owner
                    && observed.checkpoint_owner.is_none()
                    && same_checkpoint
            }
        }
    }
}

/// Sends `write` conditional on `seen`. When the condition fails, reads the lease back —
/// retrying the read until `read_until` — and returns the lease as stored if the write was
/// applied (its first answer was lost and the SDK's retry failed the condition).
///
/// A transient error (a timeout, a 5xx: the write may or may not have been applied) is
/// returned as is: the caller retries, and whoever writes next resolves the outcome first
/// (see `HeldLease`), or the taker reclaims a lease that names it.
///
/// # Errors
/// The write's error when it was not applied; a transient error when a failed condition could
/// not be checked by `read_until` (the outcome is unknown: not a lost lease).
pub(crate) async fn apply(
    store: &dyn LeaseStore,
    seen: &Lease,
    write: &LeaseWrite,
    read_until: Instant,
) -> Result<Lease, LeaseStoreError> {
    let error = match write.send(store, seen).await {
        Err(e) if e.is_condition_failed() => e,
        other => return other,
    };
    match read_back(store, &seen.key, read_until).await {
        Ok(Some(observed)) if write.was_applied(seen, &observed) => {
            info!(lease = %seen.key, write = write.name(), "the write was applied but its answer was lost; carrying on");
            metrics::counter!(m::LOST_ANSWERS, "op" => write.name()).increment(1);
            Ok(observed)
        }
        Ok(_) => Err(error),
        // Nobody can tell yet whether another worker moved the lease.
        Err(read) => Err(LeaseStoreError::Transient(
            format!(
                "{} failed its condition and the lease could not be read back: {read}",
                write.name()
            )
            .into(),
        )),
    }
}

/// Reads a lease (strongly consistent), retrying throttles and transient errors with backoff
/// until `until` (once, if `until` is now).
///
/// # Errors
/// The last error once `until` has passed, or a non-retryable error at once.
pub(crate) async fn read_back(
    store: &dyn LeaseStore,
    key: &LeaseKey,
    until: Instant,
) -> Result<Option<Lease>, LeaseStoreError> {
    let mut delays = crate::backoff::exponential(
        Duration::from_millis(50),
        Duration::from_secs(1),
        crate::backoff::seed(&[key.as_str(), "read_back"]),
    )
    .build();
    loop {
        match store.get(key).await {
            Err(e) if e.is_retryable() => {
                let delay = delays.next().unwrap_or(Duration::from_secs(1));
                if Instant::now() + delay >= until {
                    return Err(e);
                }
                debug!(lease = %key, error = %e, "reading the lease back failed; retrying");
                tokio::time::sleep(delay).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseCounter;
    use crate::record::SequenceNumber;

    fn lease(counter: u64, owner: Option<&str>) -> Lease {
        let mut l = Lease::new(
            &ShardId::new("shardId-1"),
            ExtendedSequenceNumber::TrimHorizon,
        );
        l.counter = LeaseCounter(counter);
        l.owner = owner.map(WorkerId::new);
        l
    }

    fn with(mut l: Lease, f: impl FnOnce(&mut Lease)) -> Lease {
        f(&mut l);
        l
    }

    fn at(n: u128) -> ExtendedSequenceNumber {
        ExtendedSequenceNumber::at(SequenceNumber::from_u128(n), 0)
    }

    #[test]
    fn a_write_is_recognised_only_in_the_state_it_leaves() {
        let me = WorkerId::new("me");
        let peer = WorkerId::new("peer");
        let seen = lease(7, Some("me"));
        let checkpoint = LeaseWrite::Checkpoint {
            position: at(42),
            children: Vec::new(),
        };
        let shard_end = LeaseWrite::Checkpoint {
            position: ExtendedSequenceNumber::ShardEnd,
            children: vec![ShardId::new("shardId-2"), ShardId::new("shardId-3")],
        };
        let prepare = LeaseWrite::SetPending {
            pending: Some(PendingCheckpoint::new(at(50), Some("k".into()))),
        };
        #[rustfmt::skip]
        let table: Vec<(&str, LeaseWrite, Lease, bool)> = vec![
            ("renew applied", LeaseWrite::Renew, lease(8, Some("me")), true),
            ("renew: counter moved twice", LeaseWrite::Renew, lease(9, Some("me")), false),
            ("renew: taken", LeaseWrite::Renew, lease(8, Some("peer")), false),
            ("renew: released", LeaseWrite::Renew, lease(8, None), false),
            ("renew: not applied", LeaseWrite::Renew, lease(7, Some("me")), false),
            ("renew: a checkpoint moved it", LeaseWrite::Renew,
                with(lease(8, Some("me")), |l| l.checkpoint = at(1)), false),
            ("renew: a handoff was asked", LeaseWrite::Renew,
                with(lease(8, Some("peer")), |l| l.checkpoint_owner = Some(me.clone())), false),
            ("checkpoint applied", checkpoint.clone(),
                with(lease(8, Some("me")), |l| l.checkpoint = at(42)), true),
            ("checkpoint applied during a handoff", checkpoint.clone(),
                with(lease(8, Some("peer")), |l| {
                    l.checkpoint = at(42);
                    l.checkpoint_owner = Some(me.clone());
                }), true),
            ("checkpoint: another position", checkpoint.clone(),
                with(lease(8, Some("me")), |l| l.checkpoint = at(41)), false),
            ("checkpoint: a renewal, not it", checkpoint.clone(), lease(8, Some("me")), false),
            ("checkpoint: taken and checkpointed", checkpoint.clone(),
                with(lease(8, Some("peer")), |l| l.checkpoint = at(42)), false),
            ("shard end applied", shard_end.clone(),
                with(lease(8, Some("me")), |l| {
                    l.checkpoint = ExtendedSequenceNumber::ShardEnd;
                    l.child_shard_ids = vec![ShardId::new("shardId-2"), ShardId::new("shardId-3")];
                }), true),
            ("shard end without the children", shard_end,
                with(lease(8, Some("me")), |l| l.checkpoint = ExtendedSequenceNumber::ShardEnd), false),
            ("prepare applied", prepare.clone(),
                with(lease(8, Some("me")), |l| {
                    l.pending_checkpoint = Some(at(50));
                    l.pending_checkpoint_state = Some("k".into());
                }), true),
            ("prepare: another state", prepare.clone(),
                with(lease(8, Some("me")), |l| {
                    l.pending_checkpoint = Some(at(50));
                    l.pending_checkpoint_state = Some("other".into());
                }), false),
            ("prepare: a renewal, not it", prepare.clone(), lease(8, Some("me")), false),
            ("prepare: taken and prepared by another", prepare,
                with(lease(8, Some("peer")), |l| {
                    l.pending_checkpoint = Some(at(50));
                    l.pending_checkpoint_state = Some("k".into());
                }), false),
            ("pending cleared", LeaseWrite::SetPending { pending: None }, lease(8, Some("me")), true),
            ("take applied", LeaseWrite::Take { owner: me.clone() }, lease(8, Some("me")), true),
            ("take: someone else took it", LeaseWrite::Take { owner: me.clone() },
                lease(8, Some("peer")), false),
            ("release applied", LeaseWrite::Release, lease(8, None), true),
            ("release: taken meanwhile", LeaseWrite::Release, lease(9, Some("peer")), false),
            ("handoff asked", LeaseWrite::RequestHandoff { to: peer.clone() },
                with(lease(7, Some("peer")), |l| l.checkpoint_owner = Some(me.clone())), true),
            ("handoff asked by another", LeaseWrite::RequestHandoff { to: peer.clone() },
                with(lease(7, Some("other")), |l| l.checkpoint_owner = Some(me.clone())), false),
            ("handoff completed", LeaseWrite::CompleteHandoff { to: peer.clone() },
                lease(8, Some("peer")), true),
            ("handoff: still pending", LeaseWrite::CompleteHandoff { to: peer.clone() },
                with(lease(8, Some("peer")), |l| l.checkpoint_owner = Some(me.clone())), false),
        ];
        for (case, write, observed, applied) in table {
            assert_eq!(write.was_applied(&seen, &observed), applied, "{case}");
        }
    }

    #[test]
    fn a_completed_handoff_to_us_is_not_mistaken_for_our_take() {
        // Being handed to us (counter 7), then completed by the old owner (counter 8): our
        // forced take conditional on 7 was refused, though the lease looks as it would leave.
        let seen = with(lease(7, Some("me")), |l| {
            l.checkpoint_owner = Some(WorkerId::new("old"))
        });
        let take = LeaseWrite::Take {
            owner: WorkerId::new("me"),
        };
        assert!(!take.was_applied(&seen, &lease(8, Some("me"))));
    }

    #[test]
    fn a_withdrawn_handoff_is_recognised_only_back_with_the_old_owner() {
        // Handed to us by "old" (counter 7, pending).
        let seen = with(lease(7, Some("me")), |l| {
            l.checkpoint_owner = Some(WorkerId::new("old"))
        });
        let w = LeaseWrite::WithdrawHandoff;
        let table = [
            ("withdrawn", lease(7, Some("old")), true),
            ("still pending", seen.clone(), false),
            ("completed by the old owner", lease(8, Some("me")), false),
            (
                "the old owner renewed after a withdrawal",
                lease(8, Some("old")),
                false,
            ),
            ("taken by a third", lease(8, Some("third")), false),
        ];
        for (case, observed, applied) in table {
            assert_eq!(w.was_applied(&seen, &observed), applied, "{case}");
        }
        // Nothing to withdraw on a lease not being handed over.
        assert!(!w.was_applied(&lease(7, Some("me")), &lease(7, Some("me"))));
    }
}
