//! The contiguous completed prefix: how far a checkpoint may reach when records finish out of
//! order. Pure; no time, no I/O.

use std::collections::VecDeque;

/// Records accepted in shard order, completed in any order. [`Prefix::through`] is the last
/// record of the longest run of completed records from the oldest one accepted: a checkpoint
/// there re-delivers, after a crash, exactly from the oldest record not completed.
#[derive(Debug)]
pub(crate) struct Prefix<P> {
    /// The index of `pending[0]`.
    base: u64,
    /// Accepted records past the prefix, oldest first: position and completion.
    pending: VecDeque<(P, bool)>,
    /// The last record of the completed prefix.
    through: Option<P>,
    /// Accepted records not completed.
    unfinished: usize,
}

impl<P: Clone> Prefix<P> {
    /// Nothing accepted yet.
    pub(crate) fn new() -> Self {
        Self {
            base: 0,
            pending: VecDeque::new(),
            through: None,
            unfinished: 0,
        }
    }

    /// Accepts the next record (in shard order); returns its index.
    pub(crate) fn accept(&mut self, pos: P) -> u64 {
        self.pending.push_back((pos, false));
        self.unfinished += 1;
        self.base + self.pending.len() as u64 - 1
    }

    /// Record `index` completed (or was dead-lettered). Returns true if the prefix moved.
    /// Completing an index twice, or one the prefix passed, changes nothing.
    pub(crate) fn complete(&mut self, index: u64) -> bool {
        let Some(offset) = index.checked_sub(self.base) else {
            return false;
        };
        match self.pending.get_mut(offset as usize) {
            Some(slot) if !slot.1 => {
                slot.1 = true;
                self.unfinished -= 1;
            }
            _ => return false,
        }
        let mut moved = false;
        while self.pending.front().is_some_and(|(_, done)| *done) {
            if let Some((pos, _)) = self.pending.pop_front() {
                self.through = Some(pos);
                self.base += 1;
                moved = true;
            }
        }
        moved
    }

    /// The last record of the completed prefix (none completed yet: `None`).
    pub(crate) fn through(&self) -> Option<&P> {
        self.through.as_ref()
    }

    /// The last record accepted.
    pub(crate) fn last_accepted(&self) -> Option<&P> {
        self.pending
            .back()
            .map(|(p, _)| p)
            .or(self.through.as_ref())
    }

    /// Accepted records not completed yet.
    pub(crate) fn unfinished(&self) -> usize {
        self.unfinished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, records accepted, completion order, expected prefix after each completion).
    type Case = (&'static str, u64, Vec<u64>, Vec<Option<u64>>);

    #[test]
    fn the_prefix_is_contiguous() {
        let cases: Vec<Case> = vec![
            (
                "in order",
                3,
                vec![0, 1, 2],
                vec![Some(0), Some(1), Some(2)],
            ),
            ("reversed", 3, vec![2, 1, 0], vec![None, None, Some(2)]),
            (
                "a hole holds it",
                4,
                vec![0, 2, 3, 1],
                vec![Some(0), Some(0), Some(0), Some(3)],
            ),
            (
                "twice changes nothing",
                2,
                vec![1, 1, 0, 0],
                vec![None, None, Some(1), Some(1)],
            ),
            ("unknown index", 1, vec![7, 0], vec![None, Some(0)]),
        ];
        for (name, n, order, want) in cases {
            let mut p = Prefix::new();
            for i in 0..n {
                assert_eq!(p.accept(i * 10), i, "{name}");
            }
            let got: Vec<Option<u64>> = order
                .iter()
                .map(|&i| {
                    p.complete(i);
                    p.through().map(|x| x / 10)
                })
                .collect();
            assert_eq!(got, want, "{name}");
            assert_eq!(p.unfinished(), 0, "{name}");
        }
    }

    #[test]
    fn counts_unfinished_and_keeps_indices_across_the_prefix() {
        let mut p = Prefix::new();
        assert_eq!(p.last_accepted(), None);
        let a = p.accept("a");
        let b = p.accept("b");
        assert_eq!(p.unfinished(), 2);
        assert!(!p.complete(b));
        assert!(p.complete(a));
        assert_eq!(p.through(), Some(&"b"));
        assert_eq!(p.last_accepted(), Some(&"b"));
        // Indices go on after the deque emptied.
        let c = p.accept("c");
        assert_eq!(c, 2);
        assert_eq!(p.unfinished(), 1);
        assert!(!p.complete(a), "already passed");
        assert!(p.complete(c));
        assert_eq!(p.through(), Some(&"c"));
    }
}
