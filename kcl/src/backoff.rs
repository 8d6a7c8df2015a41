//! Retry delays: exponential with jitter ([`backon`]), seeded per worker and resource.
//!
//! backon draws its jitter from a fixed seed unless given one (its `std` feature, which would
//! seed from the OS, is off), so every worker of a fleet would wait exactly as long after the
//! same failure and retry in lockstep. Seeding from names (worker id, shard id) spreads them
//! out, and keeps a run reproducible for the deterministic simulation.

use std::time::Duration;

use backon::ExponentialBuilder;

/// A 64-bit seed from names (FNV-1a over each part and a separator): stable across runs and
/// platforms, different for different parts.
pub(crate) fn seed(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Exponential delays from `min` to `max` with jitter drawn from `seed`, never giving up
/// (callers decide when to stop).
pub(crate) fn exponential(min: Duration, max: Duration, seed: u64) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .with_jitter_seed(seed)
        .without_max_times()
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::BackoffBuilder;

    fn delays(seed: u64) -> Vec<Duration> {
        exponential(Duration::from_millis(100), Duration::from_secs(10), seed)
            .build()
            .take(6)
            .collect()
    }

    #[test]
    fn seeds_differ_by_part_and_order_and_are_stable() {
        assert_ne!(seed(&["w1", "shard-0"]), seed(&["w2", "shard-0"]));
        assert_ne!(seed(&["w1", "shard-0"]), seed(&["shard-0", "w1"]));
        assert_ne!(seed(&["ab", "c"]), seed(&["a", "bc"]));
        assert_eq!(seed(&["w1", "shard-0"]), seed(&["w1", "shard-0"]));
    }

    #[test]
    fn workers_with_different_seeds_wait_differently_and_reproducibly() {
        let a = delays(seed(&["w1", "shard-0"]));
        let b = delays(seed(&["w2", "shard-0"]));
        assert_ne!(a, b, "peers must not retry in lockstep");
        assert_eq!(a, delays(seed(&["w1", "shard-0"])));
        // Still exponential: each delay at least the unjittered one, at most the cap plus it.
        for (i, d) in a.iter().enumerate() {
            let base = Duration::from_millis(100) * 2u32.pow(i as u32);
            assert!(*d >= base.min(Duration::from_secs(10)), "{i}: {d:?}");
        }
    }
}
