//! Observed expiry: a lease is expired for an observer when its counter has not moved for
//! `lease_duration` by the observer's own monotonic clock. (A graceful handoff request changes
//! the owner without the counter: it restarts the clock too, since the old owner stops
//! `lease_duration` after it at the latest.) No wall clocks are compared across
//! machines, so clock skew cannot make a live lease look dead.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::{Lease, LeaseCounter, LeaseKey, WorkerId};

/// What makes a lease "changed" for an observer: its counter, owner and handoff state.
type Version = (LeaseCounter, Option<WorkerId>, Option<WorkerId>);

fn version(l: &Lease) -> Version {
    (l.counter, l.owner.clone(), l.checkpoint_owner.clone())
}

/// Remembers when each lease's counter was last seen to change.
#[derive(Debug, Default)]
pub(crate) struct ExpiryTracker {
    seen: BTreeMap<LeaseKey, (Version, Instant)>,
}

impl ExpiryTracker {
    /// Records one lease as seen at `now` (after our own write, or a read of it).
    pub(crate) fn observe_one(&mut self, lease: &Lease, now: Instant) {
        let v = version(lease);
        match self.seen.get(&lease.key) {
            Some((seen, _)) if *seen == v => {}
            _ => {
                self.seen.insert(lease.key.clone(), (v, now));
            }
        }
    }

    /// Forgets a lease (deleted).
    pub(crate) fn forget(&mut self, key: &LeaseKey) {
        self.seen.remove(key);
    }

    /// Records a table snapshot taken at `now`, and forgets leases no longer in it.
    pub(crate) fn observe(&mut self, leases: &[Lease], now: Instant) {
        let mut next = BTreeMap::new();
        for lease in leases {
            let v = version(lease);
            let since = match self.seen.get(&lease.key) {
                Some((seen, since)) if *seen == v => *since,
                _ => now,
            };
            next.insert(lease.key.clone(), (v, since));
        }
        self.seen = next;
    }

    /// When `lease` expires for this observer if its counter does not move again: `None` for
    /// an unowned lease (takeable already) or one not observed yet.
    pub(crate) fn due(&self, lease: &Lease, lease_duration: Duration) -> Option<Instant> {
        lease.owner.as_ref()?;
        match self.seen.get(&lease.key) {
            Some((seen, since)) if *seen == version(lease) => Some(*since + lease_duration),
            _ => None,
        }
    }

    /// True if `lease` (owned or not) has not changed for `lease_duration` since this tracker
    /// first saw it so.
    pub(crate) fn stood_still(
        &self,
        lease: &Lease,
        now: Instant,
        lease_duration: Duration,
    ) -> bool {
        match self.seen.get(&lease.key) {
            Some((seen, since)) if *seen == version(lease) => {
                now.saturating_duration_since(*since) >= lease_duration
            }
            _ => false,
        }
    }

    /// True if `lease` may be taken: it has no owner, or its counter has not changed for
    /// `lease_duration` since this tracker first saw it.
    pub(crate) fn is_expired(&self, lease: &Lease, now: Instant, lease_duration: Duration) -> bool {
        if lease.owner.is_none() {
            return true;
        }
        match self.seen.get(&lease.key) {
            Some((seen, since)) if *seen == version(lease) => {
                now.saturating_duration_since(*since) >= lease_duration
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::WorkerId;
    use crate::record::ExtendedSequenceNumber;
    use crate::shard::ShardId;

    fn lease(counter: u64, owner: Option<&str>) -> Lease {
        let mut l = Lease::new(
            &ShardId::new("shardId-0"),
            ExtendedSequenceNumber::TrimHorizon,
        );
        l.counter = LeaseCounter(counter);
        l.owner = owner.map(WorkerId::new);
        l
    }

    #[tokio::test(start_paused = true)]
    async fn expires_only_after_counter_stands_still() {
        let d = Duration::from_secs(10);
        let mut t = ExpiryTracker::default();
        let t0 = Instant::now();
        t.observe(&[lease(1, Some("a"))], t0);
        assert!(!t.is_expired(&lease(1, Some("a")), t0 + Duration::from_secs(9), d));
        // The counter moved at t0+5: the clock restarts.
        t.observe(&[lease(2, Some("a"))], t0 + Duration::from_secs(5));
        assert!(!t.is_expired(&lease(2, Some("a")), t0 + Duration::from_secs(14), d));
        assert!(t.is_expired(&lease(2, Some("a")), t0 + Duration::from_secs(15), d));
        // Unowned leases are always takeable.
        assert!(t.is_expired(&lease(2, None), t0, d));
        // Due lease_duration after the counter was first seen standing still.
        assert_eq!(
            t.due(&lease(2, Some("a")), d),
            Some(t0 + Duration::from_secs(15))
        );
        assert_eq!(t.due(&lease(2, None), d), None);
        assert_eq!(t.due(&lease(3, Some("a")), d), None, "not observed yet");
        // A handoff request (owner changes, counter does not) restarts the clock.
        let mut asked = lease(2, Some("b"));
        asked.checkpoint_owner = Some(WorkerId::new("a"));
        t.observe_one(&asked, t0 + Duration::from_secs(20));
        assert!(!t.is_expired(&asked, t0 + Duration::from_secs(29), d));
        assert!(t.is_expired(&asked, t0 + Duration::from_secs(30), d));
        // A lease never observed is not expired.
        let fresh = ExpiryTracker::default();
        assert!(!fresh.is_expired(&lease(1, Some("a")), t0 + d * 10, d));
    }
}
