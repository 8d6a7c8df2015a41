//! The lease coordinator: the leases this worker holds, the renewer task that heartbeats them,
//! and the taker task that acquires new ones.
//!
//! Every write to a held lease goes through [`HeldLease`]'s async lock, so a renewal and a
//! checkpoint never race on the counter and fail each other's condition. The renewer awaits only
//! the store and its interval, never a processor: a slow processor cannot lose its lease.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::sync::{mpsc, Mutex};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::expiry::ExpiryTracker;
use super::taker::{plan_takes, Limits, Snapshot, TakeReason};
use super::write::{self, LeaseWrite};
use super::{Lease, LeaseKey, LeaseStore, LeaseStoreError, WorkerId};
use crate::metrics as m;

/// A lease this worker holds.
#[derive(Debug)]
pub(crate) struct HeldLease {
    key: LeaseKey,
    /// The lease as last written by us. Held across the store call of every write.
    state: Mutex<HeldState>,
    /// Until when this worker may act on the lease: the start of the last successful write
    /// plus `lease_duration`. Nobody else can see the lease expire before then.
    valid_until: StdMutex<Instant>,
    /// Cancelled when the lease is lost (taken, expired locally, or released).
    lost: CancellationToken,
    /// Cancelled when another worker asked for the lease through a graceful handoff.
    handoff: CancellationToken,
    /// The worker the lease is being handed to.
    handoff_to: StdMutex<Option<WorkerId>>,
    lease_duration: Duration,
}

#[derive(Debug)]
struct HeldState {
    lease: Lease,
    /// A write whose outcome is unknown (its answer never came, or the call was dropped),
    /// with the lease it was conditional on: resolved by reading the lease back before the
    /// next write, which would otherwise fail its condition and look like a lost lease.
    unconfirmed: Option<(LeaseWrite, Lease)>,
}

impl HeldLease {
    pub(crate) fn new(lease: Lease, written_at: Instant, lease_duration: Duration) -> Self {
        Self {
            key: lease.key.clone(),
            state: Mutex::new(HeldState {
                lease,
                unconfirmed: None,
            }),
            valid_until: StdMutex::new(written_at + lease_duration),
            lost: CancellationToken::new(),
            handoff: CancellationToken::new(),
            handoff_to: StdMutex::new(None),
            lease_duration,
        }
    }

    /// The lease key.
    pub(crate) fn key(&self) -> &LeaseKey {
        &self.key
    }

    /// The lease as last written.
    pub(crate) async fn snapshot(&self) -> Lease {
        self.state.lock().await.lease.clone()
    }

    /// True while this worker may still deliver records and checkpoint.
    pub(crate) fn is_valid(&self) -> bool {
        !self.lost.is_cancelled() && Instant::now() < self.valid_until()
    }

    fn valid_until(&self) -> Instant {
        *self
            .valid_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Cancelled once the lease is lost.
    pub(crate) fn lost_token(&self) -> &CancellationToken {
        &self.lost
    }

    /// Marks the lease lost (stops its consumer).
    pub(crate) fn mark_lost(&self) {
        self.lost.cancel();
    }

    /// Cancelled once a graceful handoff of this lease was requested.
    pub(crate) fn handoff_token(&self) -> &CancellationToken {
        &self.handoff
    }

    /// The worker taking the lease over, if a handoff is pending.
    pub(crate) fn handoff_to(&self) -> Option<WorkerId> {
        self.handoff_to
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs the last write of this holder (release, completed handoff): the lease is marked
    /// lost under the same lock, so no renewal can follow it.
    pub(crate) async fn write_final(
        &self,
        store: &dyn LeaseStore,
        write: LeaseWrite,
    ) -> Result<Lease, LeaseStoreError> {
        let mut state = self.state.lock().await;
        let result = self.write_locked(&mut state, store, write).await;
        if result.is_ok() {
            self.mark_lost();
        }
        result
    }

    fn begin_handoff(&self, to: WorkerId) {
        *self.handoff_to.lock().unwrap_or_else(|p| p.into_inner()) = Some(to);
        self.handoff.cancel();
    }

    /// Runs one conditional write on the lease, serialised with every other write, and keeps
    /// the result. A successful write extends the lease's validity, except during a handoff
    /// (the new owner may take the lease `lease_duration` after it last saw the counter move).
    /// A write applied whose answer was lost counts as successful ([`write::apply`]).
    pub(crate) async fn write(
        &self,
        store: &dyn LeaseStore,
        write: LeaseWrite,
    ) -> Result<Lease, LeaseStoreError> {
        let mut state = self.state.lock().await;
        self.write_locked(&mut state, store, write).await
    }

    async fn write_locked(
        &self,
        state: &mut HeldState,
        store: &dyn LeaseStore,
        write: LeaseWrite,
    ) -> Result<Lease, LeaseStoreError> {
        if !self.is_valid() {
            return Err(LeaseStoreError::ConditionFailed {
                key: self.key.clone(),
            });
        }
        // Reads under the lock are tried once, never retried with sleeps: the renewer waits
        // on this lock, and its heartbeat must not stall behind a slow table.
        let read_once = Instant::now();
        // Cleared only once resolved: this call may be dropped during the read (the renewer
        // gives up after one interval), and the next write must still know.
        if let Some((earlier, seen)) = state.unconfirmed.clone() {
            let observed = write::read_back(store, &self.key, read_once).await?;
            if let Some(observed) = observed.filter(|o| earlier.was_applied(&seen, o)) {
                debug!(lease = %self.key, write = earlier.name(), "an earlier write whose answer was lost was applied");
                metrics::counter!(m::LOST_ANSWERS, "op" => earlier.name()).increment(1);
                state.lease = kept(&state.lease, observed);
            }
            // Otherwise not applied; or the lease moved, which the write below finds out.
            state.unconfirmed = None;
        }
        if let LeaseWrite::Checkpoint { position, .. } = &write {
            // The stored checkpoint may have moved since the caller looked (or an earlier
            // write whose answer was lost stored this one).
            if *position <= state.lease.checkpoint {
                return Ok(state.lease.clone());
            }
        }
        let started = Instant::now();
        // Set before sending: if this call is dropped or its answer lost, the next write
        // resolves it first.
        state.unconfirmed = Some((write.clone(), state.lease.clone()));
        let result = write::apply(store, &state.lease, &write, read_once).await;
        if !matches!(&result, Err(LeaseStoreError::Transient(_))) {
            state.unconfirmed = None;
        }
        let updated = result?;
        state.lease = kept(&state.lease, updated.clone());
        if !self.handoff.is_cancelled() {
            let mut until = self
                .valid_until
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *until = (*until).max(started + self.lease_duration);
        }
        Ok(updated)
    }
}

/// The lease after one of our writes, with our own view of the owner: during a handoff the
/// stored owner is the new one, but our conditions are written as the old owner.
fn kept(ours: &Lease, updated: Lease) -> Lease {
    Lease {
        owner: ours.owner.clone(),
        ..updated
    }
}

/// The leases held by this worker, shared by the renewer, the taker and the worker loop.
#[derive(Debug)]
pub(crate) struct LeaseCoordinator {
    store: Arc<dyn LeaseStore>,
    me: WorkerId,
    lease_duration: Duration,
    renew_interval: Duration,
    taker_interval: Duration,
    limits: Limits,
    /// Leases held or winding down, until their consumer exits.
    held: StdMutex<BTreeMap<LeaseKey, Arc<HeldLease>>>,
    /// Leases this worker will not take again (its processor failed for good).
    refused: StdMutex<BTreeSet<LeaseKey>>,
    /// Leases whose shard could not be read, set aside for a while.
    quarantined: StdMutex<BTreeMap<LeaseKey, Quarantine>>,
    /// The first quarantine of a shard; doubled per consecutive failure.
    quarantine: Duration,
}

/// A shard set aside after a read failure.
#[derive(Debug, Clone, Copy)]
struct Quarantine {
    until: Instant,
    failures: u32,
}

/// How long a shard is set aside after its `failures`-th consecutive read failure: `base`,
/// doubled per further failure, at most 32 × `base`.
pub(crate) fn quarantine_for(base: Duration, failures: u32) -> Duration {
    base.saturating_mul(1 << failures.saturating_sub(1).min(5))
}

impl LeaseCoordinator {
    pub(crate) fn new(
        store: Arc<dyn LeaseStore>,
        me: WorkerId,
        cfg: &crate::config::WorkerConfig,
    ) -> Self {
        Self {
            store,
            me,
            lease_duration: cfg.lease_duration,
            renew_interval: cfg.renew_interval,
            taker_interval: cfg.taker_interval,
            limits: Limits {
                max_leases_per_worker: cfg.max_leases_per_worker,
                max_leases_to_steal: cfg.max_leases_to_steal,
            },
            held: StdMutex::new(BTreeMap::new()),
            refused: StdMutex::new(BTreeSet::new()),
            quarantined: StdMutex::new(BTreeMap::new()),
            quarantine: cfg.quarantine,
        }
    }

    fn held_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<LeaseKey, Arc<HeldLease>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets a lease once its consumer has exited; it may be taken again later.
    pub(crate) fn forget(&self, key: &LeaseKey) {
        if let Some(h) = self.held_map().remove(key) {
            h.mark_lost();
        }
        metrics::gauge!(m::LEASES_HELD).set(self.held_map().len() as f64);
    }

    /// Never take this lease again in this process.
    pub(crate) fn refuse(&self, key: &LeaseKey) {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
    }

    /// Sets a shard that could not be read aside for a while (longer after each consecutive
    /// failure); its lease was released, so other workers may try it meanwhile.
    pub(crate) fn quarantine(&self, key: &LeaseKey, error: &str) {
        let mut q = self.quarantined.lock().unwrap_or_else(|p| p.into_inner());
        let failures = q.get(key).map_or(0, |e| e.failures) + 1;
        let pause = quarantine_for(self.quarantine, failures);
        q.insert(
            key.clone(),
            Quarantine {
                until: Instant::now() + pause,
                failures,
            },
        );
        warn!(lease = %key, %error, failures, retry_in = ?pause, "shard quarantined after a read failure");
        metrics::counter!(m::SHARDS_QUARANTINED).increment(1);
    }

    /// The shard was read again (or left for another reason): its failures are forgotten.
    pub(crate) fn clear_quarantine(&self, key: &LeaseKey) {
        self.quarantined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Leases not to take now: refused for good, or still in quarantine.
    fn excluded(&self, now: Instant) -> BTreeSet<LeaseKey> {
        let mut out = self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let q = self.quarantined.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(
            q.iter()
                .filter(|(_, e)| e.until > now)
                .map(|(k, _)| k.clone()),
        );
        out
    }

    /// Snapshot of the held leases.
    pub(crate) fn held(&self) -> Vec<Arc<HeldLease>> {
        self.held_map().values().cloned().collect()
    }

    /// Renews every held lease once per `renew_interval` until `stop` is cancelled.
    pub(crate) async fn run_renewer(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.renew_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let held = self.held();
            let renewals = held
                .iter()
                .filter(|h| !h.lost.is_cancelled() && !h.handoff.is_cancelled())
                .map(|h| self.renew(h));
            futures::future::join_all(renewals).await;
        }
    }

    async fn renew(&self, held: &HeldLease) {
        let started = Instant::now();
        let store = &self.store;
        // A renewal that hangs (a partition) must not hold up the next ones: give up after one
        // interval and count it as a failed renewal.
        let write = held.write(store.as_ref(), LeaseWrite::Renew);
        let result = tokio::time::timeout(self.renew_interval, write)
            .await
            .unwrap_or_else(|_| Err(LeaseStoreError::Transient("renewal timed out".into())));
        match result {
            Ok(_) => {
                metrics::histogram!(m::RENEWAL_LATENCY).record(started.elapsed().as_secs_f64());
            }
            Err(e) if e.is_condition_failed() => {
                // Either a peer asked for a graceful handoff (another owner, with us as the
                // checkpoint owner: we still hold it until we hand it over, and may have
                // checkpointed since) or the lease was taken. A read that fails is no answer:
                // the renewal is retried, and only our own clock ends the lease.
                let until = Instant::now() + self.renew_interval;
                match write::read_back(self.store.as_ref(), &held.key, until).await {
                    Ok(Some(now))
                        if now.checkpoint_owner.as_ref() == Some(&self.me)
                            && now.owner.as_ref() != Some(&self.me) =>
                    {
                        let to = now.owner.clone().unwrap_or_else(|| WorkerId::new(""));
                        info!(lease = %held.key, to = %to, "graceful handoff requested");
                        held.begin_handoff(to);
                    }
                    Ok(_) => {
                        info!(lease = %held.key, "lease lost: taken by another worker");
                        metrics::counter!(m::LEASES_LOST).increment(1);
                        held.mark_lost();
                    }
                    Err(read) => {
                        metrics::counter!(m::RENEWAL_FAILURES).increment(1);
                        debug!(lease = %held.key, error = %read, "renewal refused and the lease could not be read; will retry");
                    }
                }
            }
            Err(e) => {
                metrics::counter!(m::RENEWAL_FAILURES).increment(1);
                if Instant::now() >= held.valid_until() {
                    warn!(lease = %held.key, error = %e, "lease lost: could not renew it in time");
                    metrics::counter!(m::LEASES_LOST).increment(1);
                    held.mark_lost();
                } else {
                    debug!(lease = %held.key, error = %e, "renewal failed; will retry");
                }
            }
        }
    }

    /// Looks for leases to take every `taker_interval`, sending each acquired lease on `acquired`.
    pub(crate) async fn run_taker(
        self: Arc<Self>,
        acquired: mpsc::Sender<Arc<HeldLease>>,
        stop: CancellationToken,
    ) {
        let mut tracker = ExpiryTracker::default();
        let mut jitter = StdRng::seed_from_u64(crate::backoff::seed(&[self.me.as_str(), "taker"]));
        let mut first = true;
        let mut next_due: Option<Instant> = None;
        loop {
            // The first round at once (a starting worker announces itself), then between
            // 75 % and 100 % of `taker_interval`: peers started together drift apart instead
            // of planning on the same snapshot round after round, and no round comes later
            // than the interval says (failover waits for a round).
            let mut pause = if std::mem::take(&mut first) {
                Duration::ZERO
            } else {
                self.taker_interval.mul_f64(jitter.random_range(0.75..=1.0))
            };
            // A lease whose counter stands still is taken the moment it expires, not up to an
            // interval later: failover waits for the lease duration only.
            if let Some(due) = next_due.take() {
                pause = pause.min(due.saturating_duration_since(Instant::now()));
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            match self.take_round(&mut tracker, &stop).await {
                Ok((taken, due)) => {
                    next_due = due;
                    for h in taken {
                        if acquired.send(h).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => warn!(error = %e, "lease taker round failed"),
            }
        }
    }

    /// A peer asked for some of our leases (handoff pending in the table): start handing them
    /// over now rather than at their next renewal.
    async fn notice_handoffs(&self, leases: &[Lease]) {
        for lease in leases {
            if lease.checkpoint_owner.as_ref() != Some(&self.me) {
                continue;
            }
            let Some(held) = self.held_map().get(&lease.key).cloned() else {
                continue;
            };
            if held.lost.is_cancelled() || held.handoff.is_cancelled() {
                continue;
            }
            if held.snapshot().await.counter == lease.counter {
                if let Some(to) = lease.owner.clone() {
                    info!(lease = %lease.key, to = %to, "graceful handoff requested");
                    held.begin_handoff(to);
                }
            }
        }
    }

    /// At shutdown, once every consumer has exited: releases the leases the table names this
    /// worker as owner of without it holding them — a graceful handoff completed to it that
    /// its taker had not picked up yet — so peers need not wait for them to expire. A handoff
    /// still pending (`checkpointOwner` set: the old owner may still be processing) is left to
    /// expire, so no two workers ever process the shard at once.
    pub(crate) async fn release_unheld(&self) {
        let table = match self.store.list().await {
            Ok(table) => table,
            Err(e) => {
                warn!(error = %e, "could not list leases to release at shutdown");
                return;
            }
        };
        let held: BTreeSet<LeaseKey> = self.held_map().keys().cloned().collect();
        for lease in table.leases.iter().filter(|l| {
            l.owner.as_ref() == Some(&self.me)
                && l.checkpoint_owner.is_none()
                && !held.contains(&l.key)
        }) {
            let read_until = Instant::now() + self.lease_duration;
            match write::apply(self.store.as_ref(), lease, &LeaseWrite::Release, read_until).await {
                Ok(_) => {
                    info!(lease = %lease.key, "released a lease handed over but not yet taken")
                }
                Err(e) => {
                    debug!(lease = %lease.key, error = %e, "could not release lease at shutdown")
                }
            }
        }
    }

    async fn take_round(
        &self,
        tracker: &mut ExpiryTracker,
        stop: &CancellationToken,
    ) -> Result<(Vec<Arc<HeldLease>>, Option<Instant>), LeaseStoreError> {
        let table = self.store.list().await?;
        for bad in &table.malformed {
            warn!(error = %bad, "lease table holds a malformed lease item; leaving it untouched");
            metrics::counter!(m::MALFORMED_LEASES).increment(1);
        }
        let now = Instant::now();
        tracker.observe(&table.leases, now);
        let expired: BTreeSet<LeaseKey> = table
            .leases
            .iter()
            .filter(|l| tracker.is_expired(l, now, self.lease_duration))
            .map(|l| l.key.clone())
            .collect();
        self.notice_handoffs(&table.leases).await;
        let held: BTreeSet<LeaseKey> = self.held_map().keys().cloned().collect();
        let excluded = self.excluded(now);
        let plan = plan_takes(
            &Snapshot {
                leases: &table.leases,
                me: &self.me,
                held: &held,
                expired: &expired,
                excluded: &excluded,
                order_seed: crate::backoff::seed(&[self.me.as_str()]),
            },
            self.limits,
        );
        let by_key: BTreeMap<&LeaseKey, &Lease> =
            table.leases.iter().map(|l| (&l.key, l)).collect();
        let mut taken = Vec::new();
        for take in plan {
            if stop.is_cancelled() {
                break;
            }
            let Some(lease) = by_key.get(&take.key) else {
                continue;
            };
            if take.reason == TakeReason::Steal {
                // Planned move: ask the owner to hand the lease over after its final
                // checkpoint; we take it once it has (or by force once it expires).
                let write = LeaseWrite::RequestHandoff {
                    to: self.me.clone(),
                };
                let read_until = Instant::now() + self.lease_duration;
                match write::apply(self.store.as_ref(), lease, &write, read_until).await {
                    Ok(_) => {
                        info!(lease = %take.key, from = ?lease.owner, "requested graceful handoff");
                        metrics::counter!(m::LEASES_STOLEN).increment(1);
                    }
                    Err(e) => debug!(lease = %take.key, error = %e, "handoff request failed"),
                }
                continue;
            }
            let started = Instant::now();
            let write = LeaseWrite::Take {
                owner: self.me.clone(),
            };
            match write::apply(
                self.store.as_ref(),
                lease,
                &write,
                started + self.lease_duration,
            )
            .await
            {
                Ok(new) => {
                    info!(lease = %new.key, reason = ?take.reason, counter = %new.counter, "took lease");
                    metrics::counter!(m::LEASES_TAKEN).increment(1);
                    let held = Arc::new(HeldLease::new(new, started, self.lease_duration));
                    self.held_map().insert(take.key.clone(), held.clone());
                    taken.push(held);
                }
                Err(e) if e.is_condition_failed() => {
                    debug!(lease = %take.key, "lease changed before we could take it");
                }
                Err(e) => {
                    warn!(lease = %take.key, error = %e, "taking lease failed");
                }
            }
        }
        metrics::gauge!(m::LEASES_HELD).set(self.held_map().len() as f64);
        // The next moment a lease of another worker expires if its counter stays still.
        let held: BTreeSet<LeaseKey> = self.held_map().keys().cloned().collect();
        let due = table
            .leases
            .iter()
            .filter(|l| !l.is_finished() && !held.contains(&l.key) && !expired.contains(&l.key))
            .filter_map(|l| tracker.due(l, self.lease_duration))
            .min();
        Ok((taken, due))
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::config::WorkerConfig;
    use crate::record::ExtendedSequenceNumber;
    use crate::shard::ShardId;
    use crate::testkit::MemLeaseStore;

    async fn lease(store: &MemLeaseStore, shard: &str) -> Lease {
        let lease = Lease::new(&ShardId::new(shard), ExtendedSequenceNumber::TrimHorizon);
        assert!(store.create_if_absent(&lease).await.unwrap());
        lease
    }

    fn find(store: &MemLeaseStore, key: &LeaseKey) -> Lease {
        store.leases().into_iter().find(|l| &l.key == key).unwrap()
    }

    async fn held(store: &MemLeaseStore, shard: &str) -> Arc<HeldLease> {
        let l = lease(store, shard).await;
        let l = store.take(&l, &WorkerId::new("me")).await.unwrap();
        Arc::new(HeldLease::new(l, Instant::now(), Duration::from_secs(10)))
    }

    /// DESIGN §2.6: a write applied whose answer was lost — to a 5xx whose SDK retry then
    /// fails its condition, or to a timeout (the caller retries) — is not a lost lease.
    #[tokio::test(start_paused = true)]
    async fn a_write_whose_answer_was_lost_is_not_a_lost_lease() {
        use crate::record::SequenceNumber;
        use crate::testkit::{Fault, FaultKind};
        for retried in [true, false] {
            let store = MemLeaseStore::new();
            let h = held(&store, "shardId-1").await;
            // Loses the answer of the next `op`; the caller retries a transient error as
            // the renewer and the checkpointer do.
            let write = |op: &'static str, w: LeaseWrite| {
                let (store, h) = (store.clone(), h.clone());
                async move {
                    store.faults().inject(
                        Fault::new(FaultKind::AnswerLost { retried })
                            .on(op)
                            .times(1),
                    );
                    match h.write(&store, w.clone()).await {
                        Err(e) if !retried && e.is_retryable() => h.write(&store, w).await,
                        other => other,
                    }
                }
            };
            write("renew", LeaseWrite::Renew).await.unwrap();
            let position = ExtendedSequenceNumber::at(SequenceNumber::from_u128(5), 0);
            let checkpoint = LeaseWrite::Checkpoint {
                position: position.clone(),
                children: Vec::new(),
            };
            write("checkpoint", checkpoint).await.unwrap();
            assert!(h.is_valid(), "retried: {retried}");
            let stored = find(&store, &h.key);
            assert_eq!(stored.checkpoint, position);
            assert_eq!(h.snapshot().await, stored, "our view follows the table");
            // And the next write finds the counter it expects.
            write("renew", LeaseWrite::Renew).await.unwrap();
            assert!(h.is_valid(), "retried: {retried}");
            if retried {
                store.faults().inject(
                    Fault::new(FaultKind::AnswerLost { retried })
                        .on("release")
                        .times(1),
                );
                h.write_final(&store, LeaseWrite::Release).await.unwrap();
                assert_eq!(find(&store, &h.key).owner, None);
            }
        }
    }

    /// An answer lost for good (the read back failed too) is resolved before the next write,
    /// whatever that write is.
    #[tokio::test(start_paused = true)]
    async fn an_unconfirmed_write_is_resolved_before_the_next_one() {
        use crate::record::SequenceNumber;
        use crate::testkit::{Fault, FaultKind};
        let store = MemLeaseStore::new();
        let h = held(&store, "shardId-1").await;
        store.faults().inject(
            Fault::new(FaultKind::AnswerLost { retried: false })
                .on("renew")
                .times(1),
        );
        store
            .faults()
            .inject(Fault::new(FaultKind::Transient).on("get").times(1000));
        assert!(h.write(&store, LeaseWrite::Renew).await.is_err());
        store.faults().clear();
        // The renewal was applied: a checkpoint conditional on the old counter would fail.
        let position = ExtendedSequenceNumber::at(SequenceNumber::from_u128(9), 0);
        let write = LeaseWrite::Checkpoint {
            position: position.clone(),
            children: Vec::new(),
        };
        h.write(&store, write).await.unwrap();
        assert!(h.is_valid());
        assert_eq!(find(&store, &h.key).checkpoint, position);
    }

    /// A lease really taken by a peer is still lost.
    #[tokio::test(start_paused = true)]
    async fn a_lease_taken_by_a_peer_is_lost() {
        let store = MemLeaseStore::new();
        let h = held(&store, "shardId-1").await;
        let now = find(&store, &h.key);
        store.take(&now, &WorkerId::new("peer")).await.unwrap();
        let e = h.write(&store, LeaseWrite::Renew).await.unwrap_err();
        assert!(e.is_condition_failed(), "{e}");
    }

    #[test]
    fn quarantine_doubles_per_failure_up_to_32_times_the_base() {
        let base = Duration::from_secs(10);
        let table = [
            (1, 10),
            (2, 20),
            (3, 40),
            (5, 160),
            (6, 320),
            (7, 320),
            (100, 320),
        ];
        for (failures, secs) in table {
            assert_eq!(
                quarantine_for(base, failures),
                Duration::from_secs(secs),
                "{failures}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_quarantined_lease_is_excluded_until_its_time_is_up() {
        let store = MemLeaseStore::new();
        let mut cfg = WorkerConfig::new("app", "stream");
        cfg.quarantine = Duration::from_secs(10);
        let c = LeaseCoordinator::new(Arc::new(store), WorkerId::new("me"), &cfg);
        let key = LeaseKey::new("shardId-1");
        c.quarantine(&key, "AccessDenied");
        assert!(c.excluded(Instant::now()).contains(&key));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!c.excluded(Instant::now()).contains(&key));
        // A second failure in a row: twice as long.
        c.quarantine(&key, "AccessDenied");
        tokio::time::advance(Duration::from_secs(19)).await;
        assert!(c.excluded(Instant::now()).contains(&key));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!c.excluded(Instant::now()).contains(&key));
        // Read again: forgotten.
        c.clear_quarantine(&key);
        c.quarantine(&key, "AccessDenied");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!c.excluded(Instant::now()).contains(&key));
        // A processor failure is refused for good.
        c.refuse(&key);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(c.excluded(Instant::now()).contains(&key));
    }

    #[tokio::test]
    async fn shutdown_releases_completed_handoffs_not_yet_taken_and_nothing_else() {
        let store = MemLeaseStore::new();
        let (me, peer) = (WorkerId::new("me"), WorkerId::new("peer"));
        let coordinator = LeaseCoordinator::new(
            Arc::new(store.clone()),
            me.clone(),
            &WorkerConfig::new("app", "stream"),
        );
        // Handed over to us and completed, but not taken by our taker yet.
        let a = lease(&store, "shardId-a").await;
        let a = store.take(&a, &peer).await.unwrap();
        store.request_handoff(&a, &me).await.unwrap();
        // The old owner completes it with its own view of the lease.
        let a = store.complete_handoff(&a, &me).await.unwrap();
        // A handoff to us still pending: the peer may still be processing.
        let b = lease(&store, "shardId-b").await;
        let b = store.take(&b, &peer).await.unwrap();
        let b = store.request_handoff(&b, &me).await.unwrap();
        // Held by us (its consumer releases it), and a peer's lease.
        let c = lease(&store, "shardId-c").await;
        let c = store.take(&c, &me).await.unwrap();
        coordinator.held_map().insert(
            c.key.clone(),
            Arc::new(HeldLease::new(
                c.clone(),
                Instant::now(),
                Duration::from_secs(10),
            )),
        );
        let d = lease(&store, "shardId-d").await;
        let d = store.take(&d, &peer).await.unwrap();

        coordinator.release_unheld().await;

        let a_now = find(&store, &a.key);
        assert_eq!(a_now.owner, None);
        assert_eq!(a_now.counter, a.counter.next());
        assert_eq!(find(&store, &b.key), b);
        assert_eq!(find(&store, &c.key), c);
        assert_eq!(find(&store, &d.key), d);
    }
}
