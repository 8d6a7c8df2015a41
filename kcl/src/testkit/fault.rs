//! Fault injection for the in-memory backends.
//!
//! Rules are checked at the start of every operation, in the order they were added; the first
//! that matches applies. Faults live only in the testkit, never in production code paths.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What an injected fault does.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultKind {
    /// Fail with the backend's throttling error.
    Throttle,
    /// Fail with the backend's transient error (timeout, 5xx).
    Transient,
    /// Fail with the backend's non-retryable error.
    Fatal,
    /// Kinesis only: fail with an expired-iterator error.
    ExpiredIterator,
    /// Delay the operation, then run it.
    Latency(Duration),
    /// Delay the operation, then fail it as transient (a partition: the call hangs until the
    /// client's timeout).
    Hang(Duration),
    /// Lease store writes only: apply the write, then lose its answer — to a timeout
    /// (`retried: false`: the caller gets a transient error), or to a 5xx that the SDK retries,
    /// whose condition then fails (`retried: true`: the caller gets a failed condition). Other
    /// operations fail as transient without running.
    AnswerLost {
        /// Whether the SDK's retry is modelled (a failed condition) rather than a timeout.
        retried: bool,
    },
}

/// One rule: a fault for one operation (or all), a number of times (or always).
#[derive(Clone, Debug)]
pub struct Fault {
    op: Option<String>,
    kind: FaultKind,
    remaining: Option<u64>,
}

impl Fault {
    /// A fault on every operation, until cleared.
    pub fn new(kind: FaultKind) -> Self {
        Self {
            op: None,
            kind,
            remaining: None,
        }
    }

    /// Only on the operation named `op` (the seam method's name, e.g. `"get_records"`).
    pub fn on(mut self, op: &str) -> Self {
        self.op = Some(op.to_owned());
        self
    }

    /// Only the next `n` matching calls.
    pub fn times(mut self, n: u64) -> Self {
        self.remaining = Some(n);
        self
    }
}

/// A shared set of fault rules. Cheap to clone; clones share rules.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    rules: Arc<Mutex<Vec<Fault>>>,
}

/// The outcome of checking the rules: what the operation must do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Injected {
    Fail(FaultKind),
}

impl Faults {
    /// Adds a rule.
    pub fn inject(&self, fault: Fault) {
        self.lock().push(fault);
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Fault>> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies the first matching rule: sleeps for latency, returns a failure to inject.
    pub(crate) async fn check(&self, op: &str) -> Result<(), Injected> {
        let kind = {
            let mut rules = self.lock();
            let Some(i) = rules
                .iter()
                .position(|r| r.op.as_deref().is_none_or(|o| o == op))
            else {
                return Ok(());
            };
            let kind = rules[i].kind.clone();
            if let Some(n) = rules[i].remaining.as_mut() {
                *n -= 1;
                if *n == 0 {
                    rules.remove(i);
                }
            }
            kind
        };
        match kind {
            FaultKind::Latency(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            FaultKind::Hang(d) => {
                tokio::time::sleep(d).await;
                Err(Injected::Fail(FaultKind::Transient))
            }
            other => Err(Injected::Fail(other)),
        }
    }
}
