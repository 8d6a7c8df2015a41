//! [`KinesisDeadLetter`]: failed records to another Kinesis stream, through
//! [`Producer`].

use std::fmt;

use async_trait::async_trait;

use super::{envelope_with, DeadLetterError};
use crate::error::BoxError;
use crate::processor::policy::{DeadLetter, DeadLetterHandler};
use crate::producer::aws::AwsPutRecords;
use crate::producer::{Producer, PutRecords};

/// Puts each failed record's [envelope](super::envelope) to another Kinesis stream, keyed by
/// the record's own partition key, so that the records of a key stay in order in the
/// dead-letter stream too.
///
/// Each letter goes through a [`Producer`] of its own, closed before
/// [`handle`](DeadLetterHandler::handle) returns: `Ok` means Kinesis stored every envelope; a
/// flush that did not store them all (after the producer's retries) is an error, and the shard
/// waits and hands the letter over again (envelopes already stored are then put again: at
/// least once). An envelope larger than Kinesis' record limit (1 MiB, the base64 payload
/// included: records over about 750 KiB) cannot be put, and keeps failing: use
/// [`S3DeadLetter`](super::S3DeadLetter) for large records.
///
/// Needs `kinesis:PutRecords` on the dead-letter stream.
///
/// ```no_run
/// # async fn demo() {
/// use kcl::dead_letter::KinesisDeadLetter;
/// use kcl::processor::policy::DeadLetterPolicy;
/// use kcl::ErrorPolicy;
///
/// let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
/// let policy = ErrorPolicy::DeadLetter(
///     DeadLetterPolicy::new(KinesisDeadLetter::from_conf(&conf, "orders-dlq")).attempts(3),
/// );
/// # let _ = policy;
/// # }
/// ```
#[derive(Clone)]
pub struct KinesisDeadLetter<P = AwsPutRecords> {
    api: P,
    stream: String,
    max_attempts: u32,
}

impl<P: fmt::Debug> fmt::Debug for KinesisDeadLetter<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KinesisDeadLetter")
            .field("stream", &self.stream)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

impl KinesisDeadLetter<AwsPutRecords> {
    /// To `stream`, through an SDK client ([`AwsPutRecords::new`]).
    ///
    /// ```no_run
    /// # async fn demo() {
    /// let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    /// let client = aws_sdk_kinesis::Client::new(&conf);
    /// let dlq = kcl::dead_letter::KinesisDeadLetter::from_client(client, "orders-dlq");
    /// # let _ = dlq;
    /// # }
    /// ```
    pub fn from_client(client: aws_sdk_kinesis::Client, stream: impl Into<String>) -> Self {
        Self::new(AwsPutRecords::new(client), stream)
    }

    /// To `stream`, with an SDK client built from `conf`.
    ///
    /// ```no_run
    /// # async fn demo() {
    /// let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    /// let dlq = kcl::dead_letter::KinesisDeadLetter::from_conf(&conf, "orders-dlq");
    /// # let _ = dlq;
    /// # }
    /// ```
    pub fn from_conf(conf: &aws_config::SdkConfig, stream: impl Into<String>) -> Self {
        Self::new(AwsPutRecords::from_conf(conf), stream)
    }
}

impl<P: PutRecords + Clone> KinesisDeadLetter<P> {
    /// To `stream`, through any [`PutRecords`] (the producer's seam: an SDK client, or an
    /// in-memory stream in tests). Each envelope is tried up to 10 times per letter.
    ///
    /// ```
    /// use kcl::dead_letter::KinesisDeadLetter;
    /// use kcl::testkit::MemKinesis;
    ///
    /// let kinesis = MemKinesis::new();
    /// kinesis.create_stream("orders-dlq", 1);
    /// let dlq = KinesisDeadLetter::new(kinesis, "orders-dlq").max_attempts(5);
    /// assert_eq!(dlq.stream(), "orders-dlq");
    /// ```
    pub fn new(api: P, stream: impl Into<String>) -> Self {
        Self {
            api,
            stream: stream.into(),
            max_attempts: 10,
        }
    }

    /// How many times the producer tries each envelope before the letter fails (at least 1;
    /// default 10).
    ///
    /// ```
    /// # use kcl::dead_letter::KinesisDeadLetter;
    /// # let kinesis = kcl::testkit::MemKinesis::new();
    /// let dlq = KinesisDeadLetter::new(kinesis, "orders-dlq").max_attempts(3);
    /// # let _ = dlq;
    /// ```
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The dead-letter stream.
    ///
    /// ```
    /// # use kcl::dead_letter::KinesisDeadLetter;
    /// # let kinesis = kcl::testkit::MemKinesis::new();
    /// assert_eq!(KinesisDeadLetter::new(kinesis, "dlq").stream(), "dlq");
    /// ```
    pub fn stream(&self) -> &str {
        &self.stream
    }

    async fn put(&self, letter: &DeadLetter<'_>) -> Result<(), BoxError> {
        let producer = Producer::builder(self.api.clone(), self.stream.clone())
            .max_attempts(self.max_attempts)
            .build()?;
        let error = crate::error::chain(letter.error);
        for record in letter.records {
            let line = envelope_with(letter, &error, record);
            producer
                .put(record.partition_key.clone(), line.into_bytes())
                .await?;
        }
        producer.close().await?;
        Ok(())
    }
}

#[async_trait]
impl<P: PutRecords + Clone> DeadLetterHandler for KinesisDeadLetter<P> {
    async fn handle(&self, letter: &DeadLetter<'_>) -> Result<(), BoxError> {
        self.put(letter).await.map_err(|source| {
            DeadLetterError::Kinesis {
                stream: self.stream.clone(),
                records: letter.records.len(),
                source,
            }
            .into()
        })
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::processor::ProcessorError;
    use crate::record::{Record, SequenceNumber};
    use crate::shard::ShardId;
    use crate::testkit::MemKinesis;

    fn letter_records() -> Vec<Record> {
        (1..=3)
            .map(|i| {
                Record::new(
                    format!("poison {i}").into(),
                    format!("key-{}", i % 2),
                    SequenceNumber::parse(&format!("{i}00")).expect("valid"),
                    None,
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn every_record_is_put_keyed_by_its_partition_key() {
        let kinesis = MemKinesis::new();
        kinesis.create_stream("dlq", 1);
        let dlq = KinesisDeadLetter::new(kinesis.clone(), "dlq");
        let shard = ShardId::new("shardId-000000000000");
        let records = letter_records();
        let error = ProcessorError::fatal("bad");
        let letter = DeadLetter::new("orders", &shard, &records, &error, 2, SystemTime::now());
        dlq.handle(&letter).await.expect("stored");
        assert_eq!(kinesis.record_count("dlq"), 3);
    }

    #[tokio::test]
    async fn a_missing_stream_is_an_error() {
        let kinesis = MemKinesis::new();
        let dlq = KinesisDeadLetter::new(kinesis, "nowhere").max_attempts(1);
        let shard = ShardId::new("shardId-000000000000");
        let records = letter_records();
        let error = ProcessorError::fatal("bad");
        let letter = DeadLetter::new("orders", &shard, &records, &error, 1, SystemTime::now());
        let e = dlq.handle(&letter).await.expect_err("no such stream");
        let text = crate::error::chain(e.as_ref());
        assert!(text.contains("Kinesis stream nowhere"), "{text}");
    }
}
