//! Which record may start next: at most `concurrency` at once, at most one per partition key,
//! each key's records in their order. Pure; no time, no I/O.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

/// Per-key FIFO queues of record indices (indices grow in shard order).
///
/// A key's head is *ready* (in `ready`) when nothing of that key is running or waiting for a
/// retry; the oldest ready record starts first, so the completed prefix moves as soon as it can.
#[derive(Debug)]
pub(crate) struct Scheduler {
    concurrency: usize,
    /// Each key's records not completed, oldest first; the head may be running or waiting.
    queues: HashMap<Arc<str>, VecDeque<u64>>,
    /// The key of each record not completed.
    keys: HashMap<u64, Arc<str>>,
    /// Records that may start: heads of idle keys, and failed heads whose retry is due.
    ready: BTreeSet<u64>,
    /// Records running now (each holds a slot).
    running: usize,
}

impl Scheduler {
    pub(crate) fn new(concurrency: usize) -> Self {
        Self {
            concurrency: concurrency.max(1),
            queues: HashMap::new(),
            keys: HashMap::new(),
            ready: BTreeSet::new(),
            running: 0,
        }
    }

    /// Queues record `index` of `key` (indices must grow).
    pub(crate) fn push(&mut self, index: u64, key: &str) {
        let key: Arc<str> = match self.queues.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => Arc::from(key),
        };
        let queue = self.queues.entry(key.clone()).or_default();
        queue.push_back(index);
        if queue.len() == 1 {
            self.ready.insert(index);
        }
        self.keys.insert(index, key);
    }

    /// The next record to start, if a slot is free: the oldest ready one. It holds a slot
    /// until [`Scheduler::pause`] or [`Scheduler::finish`].
    pub(crate) fn start(&mut self) -> Option<u64> {
        if self.running >= self.concurrency {
            return None;
        }
        let index = self.ready.pop_first()?;
        self.running += 1;
        Some(index)
    }

    /// Running record `index` failed and waits for a retry: its slot is free, its key stays
    /// blocked.
    pub(crate) fn pause(&mut self, _index: u64) {
        self.running -= 1;
    }

    /// The retry of paused record `index` is due: it may start again.
    pub(crate) fn resume(&mut self, index: u64) {
        if self.keys.contains_key(&index) {
            self.ready.insert(index);
        }
    }

    /// Running record `index` completed (or was dead-lettered): its slot is free and its key's
    /// next record is ready.
    pub(crate) fn finish(&mut self, index: u64) {
        self.running -= 1;
        let Some(key) = self.keys.remove(&index) else {
            return;
        };
        if let Some(queue) = self.queues.get_mut(&key) {
            debug_assert_eq!(queue.front(), Some(&index));
            queue.pop_front();
            match queue.front() {
                Some(&next) => {
                    self.ready.insert(next);
                }
                None => {
                    self.queues.remove(&key);
                }
            }
        }
    }

    /// Records holding a slot.
    pub(crate) fn running(&self) -> usize {
        self.running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy)]
    enum Op {
        Push(u64, &'static str),
        /// Start: the record expected (None: nothing may start).
        Start(Option<u64>),
        Finish(u64),
        Pause(u64),
        Resume(u64),
    }
    use Op::*;

    fn run(name: &str, concurrency: usize, ops: &[Op]) {
        let mut s = Scheduler::new(concurrency);
        for (step, op) in ops.iter().enumerate() {
            match *op {
                Push(i, k) => s.push(i, k),
                Start(want) => assert_eq!(s.start(), want, "{name}: step {step}"),
                Finish(i) => s.finish(i),
                Pause(i) => s.pause(i),
                Resume(i) => s.resume(i),
            }
            assert!(s.running() <= concurrency, "{name}: step {step}");
        }
    }

    #[test]
    fn table() {
        let cases: Vec<(&str, usize, Vec<Op>)> = vec![
            (
                "one key runs one at a time, in order",
                8,
                vec![
                    Push(0, "a"),
                    Push(1, "a"),
                    Start(Some(0)),
                    Start(None),
                    Finish(0),
                    Start(Some(1)),
                    Finish(1),
                    Start(None),
                ],
            ),
            (
                "distinct keys run together up to the bound",
                2,
                vec![
                    Push(0, "a"),
                    Push(1, "b"),
                    Push(2, "c"),
                    Start(Some(0)),
                    Start(Some(1)),
                    Start(None),
                    Finish(1),
                    Start(Some(2)),
                ],
            ),
            (
                "oldest ready first",
                1,
                vec![
                    Push(0, "a"),
                    Push(1, "a"),
                    Push(2, "b"),
                    Start(Some(0)),
                    Finish(0),
                    Start(Some(1)),
                    Finish(1),
                    Start(Some(2)),
                ],
            ),
            (
                "a paused key frees its slot and blocks only itself",
                1,
                vec![
                    Push(0, "a"),
                    Push(1, "a"),
                    Push(2, "b"),
                    Start(Some(0)),
                    Pause(0),
                    Start(Some(2)),
                    Finish(2),
                    Start(None),
                    Resume(0),
                    Start(Some(0)),
                    Finish(0),
                    Start(Some(1)),
                ],
            ),
            (
                "a record pushed behind a running one waits",
                4,
                vec![
                    Push(0, "a"),
                    Start(Some(0)),
                    Push(1, "a"),
                    Start(None),
                    Finish(0),
                    Start(Some(1)),
                ],
            ),
        ];
        for (name, concurrency, ops) in cases {
            run(name, concurrency, &ops);
        }
    }
}
