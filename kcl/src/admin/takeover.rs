//! Getting a lease into an admin command's hands while workers run, writing to it, and giving
//! it back — every write conditional, as the fleet's own (`docs/lease-table.md`).
//!
//! The command acts as a *pseudo-owner*, a worker id of its own (`kcl-reset/<random>`) that
//! has no worker item:
//!
//! 1. [`observe`]: reads the leases and the worker table, then watches them for up to the
//!    fleet's lease duration (less once every owner was seen alive) and judges each owner
//!    ([`super::owner::judge`]);
//! 2. [`Takeover::acquire`]: takes an unowned lease or one whose owner is gone (fencing the
//!    owner's worker item first if its heartbeat stood still), or, for a live worker of this
//!    library (`--force`), asks for a graceful handoff (a notice in the owner's item, then the
//!    request) and waits until the owner completed it: its processor checkpointed and stopped;
//! 3. [`Takeover::checkpoint`] (reset) and [`Takeover::give_back`]: releases the lease, or,
//!    if a worker's taker asked the pseudo-owner for it meanwhile, completes that handoff.
//!
//! A write whose answer was lost is recognised when the lease is read back, as the workers
//! do.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::owner::{judge, Action, OwnerState};
use crate::lease::liveness::{HandoffNotice, WorkerItem, WorkerTable};
use crate::lease::write::{apply, LeaseWrite};
use crate::lease::{Lease, LeaseKey, LeaseStore, LeaseStoreError, WorkerId};
use crate::record::ExtendedSequenceNumber;

/// How often leases and worker items are read while observing or waiting.
const POLL: Duration = Duration::from_millis(250);
/// Up to this many leases are observed with one `GetItem` each, more with a `Scan`.
const FEW_LEASES: usize = 16;
/// How long a write's lost answer is looked for.
const READ_BACK: Duration = Duration::from_secs(5);

/// Progress lines for the user (the command prints them on stderr).
///
/// ```
/// let progress: kcl::admin::takeover::Progress<'_> = &|line| eprintln!("{line}");
/// progress("observing the owners");
/// ```
pub type Progress<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// Why a takeover failed.
///
/// ```
/// use kcl::admin::takeover::TakeoverError;
/// let e = TakeoverError::Refused { key: kcl::lease::LeaseKey::new("shardId-0"), reason: "x".into() };
/// assert!(e.to_string().contains("shardId-0"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TakeoverError {
    /// The lease table could not be read or written.
    #[error(transparent)]
    Store(#[from] LeaseStoreError),
    /// The owner's state forbids it (see [`super::owner::decide`]).
    #[error("lease {key}: {reason}")]
    Refused {
        /// The lease.
        key: LeaseKey,
        /// Why, and what to do.
        reason: String,
    },
    /// The lease changed under the command (another writer won); nothing more was written.
    #[error("lease {key} changed meanwhile ({now}); nothing more was written to it")]
    Changed {
        /// The lease.
        key: LeaseKey,
        /// What it is now.
        now: String,
    },
    /// The owner did not complete the handoff in time; the request was withdrawn.
    #[error(
        "lease {key}: {owner} did not complete the handoff within {waited:?}; the request was \
         withdrawn and the lease left with it"
    )]
    HandoffTimeout {
        /// The lease.
        key: LeaseKey,
        /// Its owner.
        owner: WorkerId,
        /// How long the command waited.
        waited: Duration,
    },
}

/// A lease and its owner's state, as [`observe`] judged it.
///
/// ```
/// # fn demo(o: kcl::admin::takeover::Observed) {
/// println!("{} is {}", o.lease.key, o.state.label());
/// # }
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Observed {
    /// The lease at the end of the observation.
    pub lease: Lease,
    /// Its owner's state.
    pub state: OwnerState,
}

/// Reads `keys` (strongly consistent) and the worker table, and, if any lease is owned,
/// watches them until every owner was seen alive or `lease_duration` passed. A lease that no
/// longer exists is left out. `workers` says whether to read the worker table (it exists).
///
/// ```no_run
/// # async fn demo(store: &dyn kcl::LeaseStore, keys: Vec<kcl::lease::LeaseKey>) {
/// use std::time::Duration;
/// let seen = kcl::admin::takeover::observe(store, &keys, true, Duration::from_secs(10), &|p| eprintln!("{p}")).await;
/// # }
/// ```
///
/// # Errors
/// A lease could not be read.
pub async fn observe(
    store: &dyn LeaseStore,
    keys: &[LeaseKey],
    workers: bool,
    lease_duration: Duration,
    progress: Progress<'_>,
) -> Result<Vec<Observed>, LeaseStoreError> {
    // A few leases are read one by one; more with one scan of the table.
    let few = keys.len() <= FEW_LEASES;
    let poll = if few { POLL } else { POLL * 4 };
    let read_leases = || async {
        let mut out = BTreeMap::new();
        if few {
            for k in keys {
                if let Some(l) = store.get(k).await? {
                    out.insert(k.clone(), l);
                }
            }
        } else {
            let wanted: std::collections::BTreeSet<&LeaseKey> = keys.iter().collect();
            for l in store.list().await?.leases {
                if wanted.contains(&l.key) {
                    out.insert(l.key.clone(), l);
                }
            }
        }
        Ok::<_, LeaseStoreError>(out)
    };
    let read_workers = || async {
        if !workers {
            return None;
        }
        match store.list_workers(true).await {
            Ok(t) => Some(items(&t)),
            Err(e) => {
                tracing::warn!(error = %e, "the worker table could not be read: owners are judged by their lease counters");
                None
            }
        }
    };
    let before = read_leases().await?;
    let items_before = read_workers().await;
    let owned = before.values().any(|l| l.owner.is_some());
    let started = Instant::now();
    let mut after = before.clone();
    let mut items_after = items_before.clone();
    if owned {
        progress(&format!(
            "observing the owners' heartbeats for up to {lease_duration:?} (an owner is judged \
             gone only once it stood still that long)"
        ));
        let mut last_note = Instant::now();
        loop {
            let states = judge_all(&before, &after, items_before.as_ref(), items_after.as_ref());
            let undecided = states
                .iter()
                .filter(|o| !(o.state.is_live() || o.state == OwnerState::Unowned))
                .count();
            if undecided == 0 || started.elapsed() >= lease_duration {
                break;
            }
            if last_note.elapsed() >= Duration::from_secs(2) {
                progress(&format!(
                    "  {undecided} owner(s) not seen alive yet, {:.0?} left",
                    lease_duration.saturating_sub(started.elapsed())
                ));
                last_note = Instant::now();
            }
            tokio::time::sleep(poll.min(lease_duration.saturating_sub(started.elapsed()))).await;
            after = read_leases().await?;
            items_after = read_workers().await;
        }
    }
    Ok(judge_all(
        &before,
        &after,
        items_before.as_ref(),
        items_after.as_ref(),
    ))
}

fn items(t: &WorkerTable) -> BTreeMap<WorkerId, WorkerItem> {
    t.workers
        .iter()
        .map(|w| (w.worker.clone(), w.clone()))
        .collect()
}

fn judge_all(
    before: &BTreeMap<LeaseKey, Lease>,
    after: &BTreeMap<LeaseKey, Lease>,
    items_before: Option<&BTreeMap<WorkerId, WorkerItem>>,
    items_after: Option<&BTreeMap<WorkerId, WorkerItem>>,
) -> Vec<Observed> {
    after
        .iter()
        .map(|(k, a)| {
            let b = before.get(k).unwrap_or(a);
            let owner = a.owner.as_ref();
            let before = owner.and_then(|o| items_before.and_then(|m| m.get(o)));
            let after = owner.and_then(|o| items_after.and_then(|m| m.get(o)));
            Observed {
                lease: a.clone(),
                state: judge(b, a, before, after),
            }
        })
        .collect()
}

/// An admin command's pseudo-owner and its settings.
///
/// ```
/// use std::time::Duration;
/// let t = kcl::admin::takeover::Takeover::new("kcl-reset", Duration::from_secs(60));
/// assert!(t.pseudo_owner().as_str().starts_with("kcl-reset/"));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Takeover {
    pseudo: WorkerId,
    handoff_timeout: Duration,
}

impl Takeover {
    /// A pseudo-owner `<prefix>/<random>`; a live owner gets `handoff_timeout` to complete a
    /// handoff.
    ///
    /// ```
    /// use std::time::Duration;
    /// let t = kcl::admin::takeover::Takeover::new("kcl-release", Duration::from_secs(30));
    /// println!("{}", t.pseudo_owner());
    /// ```
    pub fn new(prefix: &str, handoff_timeout: Duration) -> Self {
        let suffix: u32 = rand::random();
        Self {
            pseudo: WorkerId::new(format!("{prefix}/{suffix:08x}")),
            handoff_timeout,
        }
    }

    /// The pseudo-owner's worker id.
    ///
    /// ```
    /// # let t = kcl::admin::takeover::Takeover::new("kcl-reset", std::time::Duration::from_secs(1));
    /// assert!(t.pseudo_owner().as_str().contains('/'));
    /// ```
    pub fn pseudo_owner(&self) -> &WorkerId {
        &self.pseudo
    }

    /// Gets `seen.lease` into the pseudo-owner's hands by `action` (from
    /// [`super::owner::decide`]). Returns the lease as held (owned by the pseudo-owner; a
    /// worker may have asked for it since, `checkpointOwner` then being the pseudo-owner).
    ///
    /// ```no_run
    /// # async fn demo(store: &dyn kcl::LeaseStore, seen: kcl::admin::takeover::Observed) -> Result<(), kcl::admin::takeover::TakeoverError> {
    /// use kcl::admin::owner::decide;
    /// use kcl::admin::takeover::Takeover;
    /// let t = Takeover::new("kcl-reset", std::time::Duration::from_secs(60));
    /// let action = decide(&seen.state, false);
    /// let held = t.acquire(store, &seen, &action, &|p| eprintln!("{p}")).await?;
    /// t.give_back(store, &held).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`TakeoverError`]: refused, changed meanwhile, a handoff not completed in time, or the
    /// table failed.
    pub async fn acquire(
        &self,
        store: &dyn LeaseStore,
        seen: &Observed,
        action: &Action,
        progress: Progress<'_>,
    ) -> Result<Lease, TakeoverError> {
        let lease = &seen.lease;
        let changed = |e: LeaseStoreError, lease: &Lease| -> TakeoverError {
            if e.is_condition_failed() {
                TakeoverError::Changed {
                    key: lease.key.clone(),
                    now: "another writer moved its counter".into(),
                }
            } else {
                TakeoverError::Store(e)
            }
        };
        match action {
            Action::Refuse(reason) => Err(TakeoverError::Refused {
                key: lease.key.clone(),
                reason: reason.clone(),
            }),
            Action::Take => self.take(store, lease).await,
            Action::FenceThenTake => {
                let OwnerState::HeartbeatStill { owner, item } = &seen.state else {
                    return self.take(store, lease).await;
                };
                progress(&format!(
                    "{}: fencing {owner}, whose heartbeat stood still",
                    lease.key
                ));
                store.fence_worker(item, &self.pseudo).await.map_err(|e| {
                    match e.is_condition_failed() {
                        true => TakeoverError::Changed {
                            key: lease.key.clone(),
                            now: format!("{owner} came alive (its heartbeat moved)"),
                        },
                        false => TakeoverError::Store(e),
                    }
                })?;
                self.take(store, lease).await
            }
            Action::Handoff => {
                let OwnerState::LiveWorker { owner, item } = &seen.state else {
                    return Err(TakeoverError::Refused {
                        key: lease.key.clone(),
                        reason: "no live worker to ask for a handoff".into(),
                    });
                };
                progress(&format!(
                    "{}: asking {owner} to hand the lease over",
                    lease.key
                ));
                let notice = HandoffNotice::new(lease.key.clone(), rand::random());
                store
                    .notify_handoff(owner, item.incarnation, &notice)
                    .await
                    .map_err(|e| changed(e, lease))?;
                let current =
                    store
                        .get(&lease.key)
                        .await?
                        .ok_or_else(|| TakeoverError::Changed {
                            key: lease.key.clone(),
                            now: "deleted".into(),
                        })?;
                if current.owner.as_ref() != Some(owner) || current.checkpoint_owner.is_some() {
                    return Err(TakeoverError::Changed {
                        key: lease.key.clone(),
                        now: describe(&current),
                    });
                }
                let write = LeaseWrite::RequestHandoff {
                    to: self.pseudo.clone(),
                };
                let requested = apply(store, &current, &write, Instant::now() + READ_BACK)
                    .await
                    .map_err(|e| changed(e, &current))?;
                self.await_handoff(store, requested, owner, progress).await
            }
        }
    }

    /// `kcl release`: clears `seen.lease`'s owner. A gone owner's lease is released in its
    /// name (conditional on the counter and owner observed; a worker item whose heartbeat
    /// stood still is fenced first); a live worker's (`Action::Handoff`, with `--force`) is
    /// handed over to the pseudo-owner first, which then gives it back. Returns `None` if the
    /// lease was unowned already.
    ///
    /// ```no_run
    /// # async fn demo(store: &dyn kcl::LeaseStore, seen: kcl::admin::takeover::Observed) -> Result<(), kcl::admin::takeover::TakeoverError> {
    /// use kcl::admin::owner::decide;
    /// let t = kcl::admin::takeover::Takeover::new("kcl-release", std::time::Duration::from_secs(60));
    /// t.clear(store, &seen, &decide(&seen.state, false), &|p| eprintln!("{p}")).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Takeover::acquire`].
    pub async fn clear(
        &self,
        store: &dyn LeaseStore,
        seen: &Observed,
        action: &Action,
        progress: Progress<'_>,
    ) -> Result<Option<Lease>, TakeoverError> {
        if seen.state == OwnerState::Unowned {
            return Ok(None);
        }
        match action {
            Action::Take | Action::FenceThenTake => {
                if let (Action::FenceThenTake, OwnerState::HeartbeatStill { owner, item }) =
                    (action, &seen.state)
                {
                    progress(&format!(
                        "{}: fencing {owner}, whose heartbeat stood still",
                        seen.lease.key
                    ));
                    store.fence_worker(item, &self.pseudo).await.map_err(|e| {
                        match e.is_condition_failed() {
                            true => TakeoverError::Changed {
                                key: seen.lease.key.clone(),
                                now: format!("{owner} came alive (its heartbeat moved)"),
                            },
                            false => TakeoverError::Store(e),
                        }
                    })?;
                }
                match apply(
                    store,
                    &seen.lease,
                    &LeaseWrite::Release,
                    Instant::now() + READ_BACK,
                )
                .await
                {
                    Ok(l) => Ok(Some(l)),
                    Err(e) if e.is_condition_failed() => {
                        let now = store.get(&seen.lease.key).await?;
                        Err(TakeoverError::Changed {
                            key: seen.lease.key.clone(),
                            now: now.as_ref().map_or_else(|| "deleted".into(), describe),
                        })
                    }
                    Err(e) => Err(e.into()),
                }
            }
            _ => {
                let held = self.acquire(store, seen, action, progress).await?;
                self.give_back(store, &held).await.map(Some)
            }
        }
    }

    async fn take(&self, store: &dyn LeaseStore, lease: &Lease) -> Result<Lease, TakeoverError> {
        let write = LeaseWrite::Take {
            owner: self.pseudo.clone(),
        };
        match apply(store, lease, &write, Instant::now() + READ_BACK).await {
            Ok(l) => Ok(l),
            Err(e) if e.is_condition_failed() => {
                let now = store.get(&lease.key).await?;
                Err(TakeoverError::Changed {
                    key: lease.key.clone(),
                    now: now.as_ref().map_or_else(|| "deleted".into(), describe),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until `owner` completed the handoff of `requested` to the pseudo-owner.
    async fn await_handoff(
        &self,
        store: &dyn LeaseStore,
        requested: Lease,
        owner: &WorkerId,
        progress: Progress<'_>,
    ) -> Result<Lease, TakeoverError> {
        let started = Instant::now();
        let mut last_note = Instant::now();
        loop {
            let now = store.get(&requested.key).await?;
            match now {
                Some(l) if l.is_owned_by(&self.pseudo) && l.checkpoint_owner.is_none() => {
                    progress(&format!(
                        "{}: {owner} handed it over after {:.1?}",
                        l.key,
                        started.elapsed()
                    ));
                    return Ok(l);
                }
                Some(l)
                    if l.is_owned_by(&self.pseudo)
                        && l.checkpoint_owner.as_ref() == Some(owner) => {}
                other => {
                    return Err(TakeoverError::Changed {
                        key: requested.key.clone(),
                        now: other.as_ref().map_or_else(|| "deleted".into(), describe),
                    })
                }
            }
            if started.elapsed() >= self.handoff_timeout {
                let withdrawn = apply(
                    store,
                    &requested,
                    &LeaseWrite::WithdrawHandoff,
                    Instant::now() + READ_BACK,
                )
                .await;
                if let Err(e) = withdrawn {
                    tracing::warn!(lease = %requested.key, error = %e, "withdrawing the handoff request failed: the lease expires after the lease duration instead");
                }
                return Err(TakeoverError::HandoffTimeout {
                    key: requested.key.clone(),
                    owner: owner.clone(),
                    waited: started.elapsed(),
                });
            }
            if last_note.elapsed() >= Duration::from_secs(2) {
                progress(&format!(
                    "  {}: waiting for {owner} to checkpoint and hand over ({:.0?} of {:?})",
                    requested.key,
                    started.elapsed(),
                    self.handoff_timeout
                ));
                last_note = Instant::now();
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Checkpoints `held` at `to` (and, for `LATEST`, stores `resolve_latest_at` as
    /// `latestResolvedAt`). Allowed also while a worker asks the pseudo-owner for the lease
    /// (the pseudo-owner is then its `checkpointOwner`). Returns the lease as held after it.
    ///
    /// ```no_run
    /// # async fn demo(store: &dyn kcl::LeaseStore, t: kcl::admin::takeover::Takeover, held: kcl::Lease) -> Result<(), kcl::admin::takeover::TakeoverError> {
    /// let held = t.checkpoint(store, &held, &kcl::ExtendedSequenceNumber::TrimHorizon, None).await?;
    /// t.give_back(store, &held).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The lease was taken from the pseudo-owner (e.g. by force, after the lease duration), or
    /// the table failed.
    pub async fn checkpoint(
        &self,
        store: &dyn LeaseStore,
        held: &Lease,
        to: &ExtendedSequenceNumber,
        resolve_latest_at: Option<std::time::SystemTime>,
    ) -> Result<Lease, TakeoverError> {
        let mut mine = self.as_holder(held);
        // The previous owner's throughput is not the pseudo-owner's to write again.
        mine.throughput = None;
        let write = LeaseWrite::Checkpoint {
            position: to.clone(),
            children: Vec::new(),
        };
        let mut done = apply(store, &mine, &write, Instant::now() + READ_BACK)
            .await
            .map_err(|e| self.lost(e, &mine))?;
        if let Some(at) = resolve_latest_at {
            let write = LeaseWrite::ResolveLatest { at };
            done = apply(store, &done, &write, Instant::now() + READ_BACK)
                .await
                .map_err(|e| match e.is_condition_failed() {
                    true => TakeoverError::Changed {
                        key: held.key.clone(),
                        now: "a worker asked for it before latestResolvedAt was written: it \
                              starts at LATEST; run the reset of this shard again"
                            .into(),
                    },
                    false => TakeoverError::Store(e),
                })?;
        }
        if held.checkpoint_owner.as_ref() == Some(&self.pseudo) {
            // A worker asked for it: it stays the `leaseOwner`.
            done.owner.clone_from(&held.owner);
        }
        Ok(done)
    }

    /// Gives `held` back: releases it, or, if a worker asked the pseudo-owner for it
    /// meanwhile, completes that handoff.
    ///
    /// ```no_run
    /// # async fn demo(store: &dyn kcl::LeaseStore, t: kcl::admin::takeover::Takeover, held: kcl::Lease) -> Result<(), kcl::admin::takeover::TakeoverError> {
    /// t.give_back(store, &held).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The lease was taken from the pseudo-owner, or the table failed.
    pub async fn give_back(
        &self,
        store: &dyn LeaseStore,
        held: &Lease,
    ) -> Result<Lease, TakeoverError> {
        let mut current = held.clone();
        for _ in 0..5 {
            let result = match &current.checkpoint_owner {
                Some(me) if *me == self.pseudo => {
                    let to = current.owner.clone().unwrap_or_else(|| self.pseudo.clone());
                    let mine = self.as_holder(&current);
                    apply(
                        store,
                        &mine,
                        &LeaseWrite::CompleteHandoff { to },
                        Instant::now() + READ_BACK,
                    )
                    .await
                }
                _ => {
                    apply(
                        store,
                        &current,
                        &LeaseWrite::Release,
                        Instant::now() + READ_BACK,
                    )
                    .await
                }
            };
            match result {
                Ok(l) => return Ok(l),
                Err(e) if e.is_condition_failed() => {
                    // A worker asked for it between the read and the write: read and retry.
                    match store.get(&held.key).await? {
                        Some(l)
                            if l.is_owned_by(&self.pseudo)
                                || l.checkpoint_owner.as_ref() == Some(&self.pseudo) =>
                        {
                            current = l;
                        }
                        other => return Err(self.lost(e, other.as_ref().unwrap_or(held))),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(TakeoverError::Changed {
            key: held.key.clone(),
            now: "it kept changing while being given back".into(),
        })
    }

    /// `lease` as the pseudo-owner's writes need it: `owner` = the pseudo-owner, also while a
    /// worker's request names that worker as `leaseOwner` (checkpoint and completion are
    /// conditional on `checkpointOwner` then).
    fn as_holder(&self, lease: &Lease) -> Lease {
        let mut l = lease.clone();
        if l.checkpoint_owner.as_ref() == Some(&self.pseudo) {
            l.owner = Some(self.pseudo.clone());
        }
        l
    }

    fn lost(&self, e: LeaseStoreError, lease: &Lease) -> TakeoverError {
        if e.is_condition_failed() {
            TakeoverError::Changed {
                key: lease.key.clone(),
                now: format!("no longer held by {}", self.pseudo),
            }
        } else {
            TakeoverError::Store(e)
        }
    }
}

/// A lease's owner fields, for messages.
fn describe(l: &Lease) -> String {
    match (&l.owner, &l.checkpoint_owner) {
        (None, _) => format!("unowned, counter {}", l.counter),
        (Some(o), None) => format!("owned by {o}, counter {}", l.counter),
        (Some(o), Some(c)) => format!("being handed from {c} to {o}, counter {}", l.counter),
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::admin::owner::decide;
    use crate::record::SequenceNumber;
    use crate::shard::ShardId;
    use crate::testkit::MemLeaseStore;

    fn quiet() -> Progress<'static> {
        &|_| {}
    }

    fn at(n: u128) -> ExtendedSequenceNumber {
        ExtendedSequenceNumber::at(SequenceNumber::from_u128(n), 0)
    }

    /// A lease checkpointed at 42, owned by `owner` (if any), with `owner`'s worker item.
    async fn setup(owner: Option<&str>) -> (MemLeaseStore, Lease) {
        let store = MemLeaseStore::new();
        let lease = Lease::new(&ShardId::new("shardId-0"), at(42));
        assert!(matches!(store.create_if_absent(&lease).await, Ok(true)));
        let Some(owner) = owner else {
            return (store, lease);
        };
        let w = WorkerId::new(owner);
        let taken = store.take(&lease, &w).await.expect("take");
        store
            .register_worker(&WorkerItem::new(w, 7))
            .await
            .expect("register");
        (store, taken)
    }

    fn seen(lease: &Lease, state: OwnerState) -> Observed {
        Observed {
            lease: lease.clone(),
            state,
        }
    }

    async fn now(store: &MemLeaseStore) -> Lease {
        store
            .get(&LeaseKey::new("shardId-0"))
            .await
            .ok()
            .flatten()
            .expect("the lease")
    }

    #[tokio::test]
    async fn an_unowned_lease_is_taken_checkpointed_back_and_released() {
        let (store, lease) = setup(None).await;
        let t = Takeover::new("kcl-reset", Duration::from_secs(1));
        let held = t
            .acquire(
                &store,
                &seen(&lease, OwnerState::Unowned),
                &Action::Take,
                quiet(),
            )
            .await
            .expect("acquire");
        assert!(held.is_owned_by(t.pseudo_owner()));
        // Backwards: the store does not refuse it (monotonicity is the Checkpointer's).
        let held = t
            .checkpoint(&store, &held, &ExtendedSequenceNumber::TrimHorizon, None)
            .await
            .expect("checkpoint");
        t.give_back(&store, &held).await.expect("give back");
        let l = now(&store).await;
        assert_eq!(
            (l.owner, l.checkpoint),
            (None, ExtendedSequenceNumber::TrimHorizon)
        );
    }

    #[tokio::test]
    async fn a_worker_asking_the_pseudo_owner_gets_the_lease_with_the_new_checkpoint() {
        let (store, lease) = setup(None).await;
        let t = Takeover::new("kcl-reset", Duration::from_secs(1));
        let held = t
            .acquire(
                &store,
                &seen(&lease, OwnerState::Unowned),
                &Action::Take,
                quiet(),
            )
            .await
            .expect("acquire");
        // A peer's taker asks for it before the checkpoint, and again after it.
        let peer = WorkerId::new("peer");
        store.request_handoff(&held, &peer).await.expect("request");
        let held = t
            .checkpoint(&store, &held, &ExtendedSequenceNumber::TrimHorizon, None)
            .await
            .expect("checkpoint as checkpointOwner");
        let done = t.give_back(&store, &held).await.expect("give back");
        let l = now(&store).await;
        assert_eq!(done.owner.as_ref(), Some(&peer));
        assert_eq!(
            (l.owner, l.checkpoint_owner, l.checkpoint),
            (Some(peer), None, ExtendedSequenceNumber::TrimHorizon)
        );
    }

    #[tokio::test]
    async fn latest_is_resolved_at_the_time_given() {
        let (store, lease) = setup(None).await;
        let t = Takeover::new("kcl-reset", Duration::from_secs(1));
        let held = t
            .acquire(
                &store,
                &seen(&lease, OwnerState::Unowned),
                &Action::Take,
                quiet(),
            )
            .await
            .expect("acquire");
        let when = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let held = t
            .checkpoint(&store, &held, &ExtendedSequenceNumber::Latest, Some(when))
            .await
            .expect("checkpoint");
        t.give_back(&store, &held).await.expect("give back");
        let l = now(&store).await;
        assert_eq!(
            (l.checkpoint, l.latest_resolved_at),
            (ExtendedSequenceNumber::Latest, Some(when))
        );
    }

    #[tokio::test]
    async fn a_live_owner_hands_over_before_anything_is_written() {
        let (store, lease) = setup(Some("w1")).await;
        let item = store.workers().into_iter().next().expect("w1's item");
        let state = OwnerState::LiveWorker {
            owner: WorkerId::new("w1"),
            item,
        };
        assert!(matches!(decide(&state, false), Action::Refuse(_)));
        assert_eq!(decide(&state, true), Action::Handoff);
        let t = Takeover::new("kcl-reset", Duration::from_secs(5));
        // The owner: finds the request, checkpoints at 50, completes the handoff.
        let owner = {
            let store = store.clone();
            let pseudo = t.pseudo_owner().clone();
            tokio::spawn(async move {
                loop {
                    let l = now(&store).await;
                    if l.checkpoint_owner.is_some() {
                        let mut mine = l.clone();
                        mine.owner = Some(WorkerId::new("w1"));
                        let mut done = store.checkpoint(&mine, &at(50), &[]).await.expect("final");
                        done.owner = Some(WorkerId::new("w1"));
                        store
                            .complete_handoff(&done, &pseudo)
                            .await
                            .expect("complete");
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let held = t
            .acquire(&store, &seen(&lease, state), &Action::Handoff, quiet())
            .await
            .expect("acquire");
        owner.await.expect("the owner task");
        assert!(held.is_owned_by(t.pseudo_owner()) && held.checkpoint_owner.is_none());
        assert_eq!(
            held.checkpoint,
            at(50),
            "the owner's final checkpoint came first"
        );
        let notices = store.workers().into_iter().next().map(|w| w.handoffs.len());
        assert_eq!(notices, Some(1), "the owner was notified in its item");
    }

    #[tokio::test]
    async fn a_handoff_not_completed_in_time_is_withdrawn() {
        let (store, lease) = setup(Some("w1")).await;
        let item = store.workers().into_iter().next().expect("w1's item");
        let state = OwnerState::LiveWorker {
            owner: WorkerId::new("w1"),
            item,
        };
        let t = Takeover::new("kcl-reset", Duration::from_millis(300));
        let r = t
            .acquire(&store, &seen(&lease, state), &Action::Handoff, quiet())
            .await;
        assert!(
            matches!(r, Err(TakeoverError::HandoffTimeout { .. })),
            "{r:?}"
        );
        let l = now(&store).await;
        assert_eq!(
            (l.owner, l.checkpoint_owner, l.checkpoint),
            (Some(WorkerId::new("w1")), None, at(42)),
            "as before the request"
        );
    }

    #[tokio::test]
    async fn a_gone_owner_is_released_in_its_name_and_a_still_heartbeat_is_fenced_first() {
        let (store, lease) = setup(Some("w1")).await;
        let item = store.workers().into_iter().next().expect("w1's item");
        let t = Takeover::new("kcl-release", Duration::from_secs(1));
        let state = OwnerState::HeartbeatStill {
            owner: WorkerId::new("w1"),
            item,
        };
        let action = decide(&state, false);
        assert_eq!(action, Action::FenceThenTake);
        let done = t
            .clear(&store, &seen(&lease, state), &action, quiet())
            .await
            .expect("clear");
        assert!(done.is_some_and(|l| l.owner.is_none()));
        let fenced = store.workers().into_iter().next().and_then(|w| w.fenced_by);
        assert_eq!(fenced.as_ref(), Some(t.pseudo_owner()));
        assert_eq!(now(&store).await.checkpoint, at(42), "the checkpoint stays");
    }

    #[tokio::test]
    async fn a_lease_that_moved_since_the_observation_is_left_alone() {
        let (store, lease) = setup(None).await;
        // A worker takes it after the observation.
        store
            .take(&lease, &WorkerId::new("w2"))
            .await
            .expect("take");
        let t = Takeover::new("kcl-reset", Duration::from_secs(1));
        let r = t
            .acquire(
                &store,
                &seen(&lease, OwnerState::Unowned),
                &Action::Take,
                quiet(),
            )
            .await;
        assert!(matches!(r, Err(TakeoverError::Changed { .. })), "{r:?}");
        assert!(now(&store).await.is_owned_by(&WorkerId::new("w2")));
    }
}
