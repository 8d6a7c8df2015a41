//! What happens when a processor fails. Records are never skipped silently: a failure is
//! retried, stops the shard, or goes to a dead-letter handler whose success is what lets the
//! shard move past it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::ProcessorError;
use crate::error::BoxError;
use crate::record::{Record, RecordBatch};
use crate::shard::ShardId;

/// A synchronous callback that takes a failed batch ([`ErrorPolicy::handoff`]).
pub type FailedBatchHandler = Arc<dyn Fn(&RecordBatch, &ProcessorError) + Send + Sync>;

/// The worker's answer to a processor error.
#[derive(Clone)]
#[non_exhaustive]
pub enum ErrorPolicy {
    /// Retry the same batch with exponential backoff, without limit (the default). Fatal
    /// errors stop the shard instead, as [`ErrorPolicy::StopShard`].
    Retry {
        /// First delay.
        min_delay: Duration,
        /// Largest delay.
        max_delay: Duration,
    },
    /// Stop processing the shard and release its lease; this worker will not take it again
    /// until restarted (another worker may).
    StopShard,
    /// Retry within a [`RetryLimit`], then hand the failed records to an async
    /// [`DeadLetterHandler`]. The shard moves past them only once the handler succeeds (a
    /// failing handler is retried with the same backoff). Fatal errors skip the retries.
    DeadLetter(DeadLetterPolicy),
}

impl Default for ErrorPolicy {
    fn default() -> Self {
        Self::Retry {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl ErrorPolicy {
    /// Hands a failed batch at once (no retry) to a synchronous closure, then goes on with the
    /// next batch: [`ErrorPolicy::DeadLetter`] with one attempt.
    ///
    /// ```
    /// let policy = kcl::ErrorPolicy::handoff(|batch, error| {
    ///     eprintln!("{} records of {} failed: {error}", batch.len(), batch.shard_id);
    /// });
    /// assert!(matches!(policy, kcl::ErrorPolicy::DeadLetter(_)));
    /// ```
    pub fn handoff(f: impl Fn(&RecordBatch, &ProcessorError) + Send + Sync + 'static) -> Self {
        Self::DeadLetter(DeadLetterPolicy::new(ClosureHandler(Arc::new(f))).attempts(1))
    }

    /// [`ErrorPolicy::DeadLetter`] with `handler` and the default limit (3 attempts) and delays.
    ///
    /// ```
    /// use std::time::Duration;
    /// use kcl::{async_trait, ErrorPolicy};
    /// use kcl::processor::policy::{DeadLetter, DeadLetterHandler, DeadLetterPolicy};
    ///
    /// struct Log;
    /// #[async_trait]
    /// impl DeadLetterHandler for Log {
    ///     async fn handle(&self, letter: &DeadLetter<'_>) -> Result<(), kcl::error::BoxError> {
    ///         eprintln!("{} records of {} dead-lettered", letter.records.len(), letter.shard_id);
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let policy = ErrorPolicy::DeadLetter(
    ///     DeadLetterPolicy::new(Log).attempts(5).within(Duration::from_secs(60)),
    /// );
    /// ```
    pub fn dead_letter(handler: impl DeadLetterHandler) -> Self {
        Self::DeadLetter(DeadLetterPolicy::new(handler))
    }

    /// What to do after a failure: a pure decision, shared by the worker (per batch) and the
    /// parallel adapter (per record).
    ///
    /// ```
    /// use std::time::Duration;
    /// use kcl::ErrorPolicy;
    /// use kcl::processor::policy::{Failure, FailureAction};
    ///
    /// let first = Failure { attempts: 1, since_first: Duration::ZERO, retryable: true, has_records: true };
    /// assert_eq!(ErrorPolicy::default().decide(&first), FailureAction::Retry);
    /// assert_eq!(ErrorPolicy::StopShard.decide(&first), FailureAction::Stop);
    /// ```
    pub fn decide(&self, failure: &Failure) -> FailureAction {
        match self {
            Self::StopShard => FailureAction::Stop,
            Self::Retry { .. } if !failure.retryable => FailureAction::Stop,
            Self::Retry { .. } => FailureAction::Retry,
            // Nothing to hand over (`initialize`, `idle`, …): retried, or stopped when fatal.
            Self::DeadLetter(_) if !failure.has_records => {
                if failure.retryable {
                    FailureAction::Retry
                } else {
                    FailureAction::Stop
                }
            }
            Self::DeadLetter(p) if !failure.retryable || p.limit.exhausted(failure) => {
                FailureAction::DeadLetter
            }
            Self::DeadLetter(_) => FailureAction::Retry,
        }
    }

    /// The first and largest retry delays.
    pub fn delays(&self) -> (Duration, Duration) {
        match self {
            Self::Retry {
                min_delay,
                max_delay,
            } => (*min_delay, *max_delay),
            Self::DeadLetter(p) => (p.min_delay, p.max_delay),
            Self::StopShard => (DEFAULT_MIN_DELAY, DEFAULT_MAX_DELAY),
        }
    }
}

const DEFAULT_MIN_DELAY: Duration = Duration::from_millis(100);
const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(30);

impl fmt::Debug for ErrorPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retry {
                min_delay,
                max_delay,
            } => f
                .debug_struct("Retry")
                .field("min_delay", min_delay)
                .field("max_delay", max_delay)
                .finish(),
            Self::StopShard => f.write_str("StopShard"),
            Self::DeadLetter(p) => f.debug_tuple("DeadLetter").field(p).finish(),
        }
    }
}

/// One failure, as [`ErrorPolicy::decide`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Failed attempts so far, this one included (1 at the first failure).
    pub attempts: u32,
    /// Time since the first failure of these records.
    pub since_first: Duration,
    /// [`ProcessorError::is_retryable`].
    pub retryable: bool,
    /// Whether there are records to hand over (false for `initialize`, `idle`, …).
    pub has_records: bool,
}

/// [`ErrorPolicy::decide`]'s answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureAction {
    /// Try the same records again after the next backoff delay.
    Retry,
    /// Hand the records to the dead-letter handler; move past them once it succeeds.
    DeadLetter,
    /// Stop the shard (its lease is released, checkpointed before the failed records).
    Stop,
}

/// How long a failure is retried before it is dead-lettered: a number of attempts, a time
/// since the first failure, or both (whichever is reached first). Neither: without limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryLimit {
    /// At most this many attempts (the first one included).
    pub attempts: Option<u32>,
    /// Stop retrying once this long has passed since the first failure.
    pub within: Option<Duration>,
}

impl RetryLimit {
    /// True once `failure` reached the limit.
    pub fn exhausted(&self, failure: &Failure) -> bool {
        self.attempts.is_some_and(|n| failure.attempts >= n)
            || self.within.is_some_and(|d| failure.since_first >= d)
    }
}

/// [`ErrorPolicy::DeadLetter`]'s settings.
#[derive(Clone)]
#[non_exhaustive]
pub struct DeadLetterPolicy {
    /// When to stop retrying (default: 3 attempts).
    pub limit: RetryLimit,
    /// First retry delay (also between attempts of a failing handler).
    pub min_delay: Duration,
    /// Largest retry delay.
    pub max_delay: Duration,
    /// Where failed records go.
    pub handler: Arc<dyn DeadLetterHandler>,
}

impl DeadLetterPolicy {
    /// Dead-letters to `handler` after 3 attempts, with delays from 100 ms to 30 s.
    pub fn new(handler: impl DeadLetterHandler) -> Self {
        Self::from_arc(Arc::new(handler))
    }

    /// As [`DeadLetterPolicy::new`], for a shared handler.
    pub fn from_arc(handler: Arc<dyn DeadLetterHandler>) -> Self {
        Self {
            limit: RetryLimit {
                attempts: Some(3),
                within: None,
            },
            min_delay: DEFAULT_MIN_DELAY,
            max_delay: DEFAULT_MAX_DELAY,
            handler,
        }
    }

    /// At most `n` attempts (at least 1) before dead-lettering.
    pub fn attempts(mut self, n: u32) -> Self {
        self.limit.attempts = Some(n.max(1));
        self
    }

    /// Retries for at most `d` since the first failure before dead-lettering.
    pub fn within(mut self, d: Duration) -> Self {
        self.limit.within = Some(d);
        self
    }

    /// No limit on attempts (use with [`DeadLetterPolicy::within`]).
    pub fn unlimited_attempts(mut self) -> Self {
        self.limit.attempts = None;
        self
    }

    /// The retry delays.
    pub fn delays(mut self, min: Duration, max: Duration) -> Self {
        self.min_delay = min;
        self.max_delay = max;
        self
    }
}

impl fmt::Debug for DeadLetterPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterPolicy")
            .field("limit", &self.limit)
            .field("min_delay", &self.min_delay)
            .field("max_delay", &self.max_delay)
            .finish_non_exhaustive()
    }
}

/// Failed records handed over by [`ErrorPolicy::DeadLetter`]: a whole batch (from the worker)
/// or one record (from the parallel adapter).
#[derive(Debug)]
#[non_exhaustive]
pub struct DeadLetter<'a> {
    /// The stream the records come from.
    pub stream: &'a str,
    /// Their shard.
    pub shard_id: &'a ShardId,
    /// The records, oldest first.
    pub records: &'a [Record],
    /// The last failure.
    pub error: &'a ProcessorError,
    /// Failed attempts.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failure: SystemTime,
}

impl<'a> DeadLetter<'a> {
    /// A letter (handlers are usually given one; tests build their own).
    pub fn new(
        stream: &'a str,
        shard_id: &'a ShardId,
        records: &'a [Record],
        error: &'a ProcessorError,
        attempts: u32,
        first_failure: SystemTime,
    ) -> Self {
        Self {
            stream,
            shard_id,
            records,
            error,
            attempts,
            first_failure,
        }
    }
}

/// Takes records that failed for good somewhere durable. `Ok` lets the shard move past them
/// (they count as processed, and a checkpoint may cover them); an error is retried with
/// backoff while the shard waits.
#[async_trait]
pub trait DeadLetterHandler: Send + Sync + 'static {
    /// Stores `letter`.
    ///
    /// # Errors
    /// Any error: the same letter is handed over again after a delay.
    async fn handle(&self, letter: &DeadLetter<'_>) -> Result<(), BoxError>;
}

/// [`ErrorPolicy::handoff`]'s closure as a handler (it sees the letter as a batch).
struct ClosureHandler(FailedBatchHandler);

#[async_trait]
impl DeadLetterHandler for ClosureHandler {
    async fn handle(&self, letter: &DeadLetter<'_>) -> Result<(), BoxError> {
        let batch = RecordBatch::of(letter.shard_id.clone(), letter.records.to_vec());
        (self.0)(&batch, letter.error);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nowhere;
    #[async_trait]
    impl DeadLetterHandler for Nowhere {
        async fn handle(&self, _: &DeadLetter<'_>) -> Result<(), BoxError> {
            Ok(())
        }
    }

    fn failure(attempts: u32, secs: u64, retryable: bool, has_records: bool) -> Failure {
        Failure {
            attempts,
            since_first: Duration::from_secs(secs),
            retryable,
            has_records,
        }
    }

    #[test]
    fn decisions() {
        use FailureAction::*;
        let retry = ErrorPolicy::default();
        let three = ErrorPolicy::DeadLetter(DeadLetterPolicy::new(Nowhere));
        let minute = ErrorPolicy::DeadLetter(
            DeadLetterPolicy::new(Nowhere)
                .unlimited_attempts()
                .within(Duration::from_secs(60)),
        );
        let both = ErrorPolicy::DeadLetter(
            DeadLetterPolicy::new(Nowhere)
                .attempts(10)
                .within(Duration::from_secs(60)),
        );
        let handoff = ErrorPolicy::handoff(|_, _| {});
        let cases: Vec<(&str, &ErrorPolicy, Failure, FailureAction)> = vec![
            (
                "retry retries",
                &retry,
                failure(1_000, 9_999, true, true),
                Retry,
            ),
            (
                "retry stops on fatal",
                &retry,
                failure(1, 0, false, true),
                Stop,
            ),
            (
                "stop stops",
                &ErrorPolicy::StopShard,
                failure(1, 0, true, true),
                Stop,
            ),
            (
                "3 attempts: 1st retried",
                &three,
                failure(1, 0, true, true),
                Retry,
            ),
            (
                "3 attempts: 2nd retried",
                &three,
                failure(2, 0, true, true),
                Retry,
            ),
            (
                "3 attempts: 3rd dead-lettered",
                &three,
                failure(3, 0, true, true),
                DeadLetter,
            ),
            (
                "fatal dead-lettered at once",
                &three,
                failure(1, 0, false, true),
                DeadLetter,
            ),
            (
                "no records: retried",
                &three,
                failure(9, 0, true, false),
                Retry,
            ),
            (
                "no records, fatal: stopped",
                &three,
                failure(1, 0, false, false),
                Stop,
            ),
            (
                "within: before",
                &minute,
                failure(500, 59, true, true),
                Retry,
            ),
            (
                "within: at",
                &minute,
                failure(500, 60, true, true),
                DeadLetter,
            ),
            (
                "both: attempts first",
                &both,
                failure(10, 1, true, true),
                DeadLetter,
            ),
            (
                "both: time first",
                &both,
                failure(2, 61, true, true),
                DeadLetter,
            ),
            ("both: neither", &both, failure(9, 59, true, true), Retry),
            (
                "handoff: first failure",
                &handoff,
                failure(1, 0, true, true),
                DeadLetter,
            ),
        ];
        for (name, policy, f, want) in cases {
            assert_eq!(policy.decide(&f), want, "{name}");
        }
    }
}
