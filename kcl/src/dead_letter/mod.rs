//! Ready-made [`DeadLetterHandler`]s for [`ErrorPolicy::DeadLetter`]: another Kinesis stream
//! ([`KinesisDeadLetter`], through [`crate::producer::Producer`]) or S3 ([`S3DeadLetter`]).
//!
//! Both store each failed record as one **envelope**, a JSON object ([`envelope`]):
//!
//! | field | JSON type | what |
//! |---|---|---|
//! | `stream` | string | the stream the record comes from |
//! | `shardId` | string | its shard |
//! | `sequenceNumber` | string | its sequence number (decimal digits) |
//! | `subSequenceNumber` | number | its KPL sub-record index (0 when not aggregated) |
//! | `partitionKey` | string | its partition key |
//! | `approximateArrivalTimestamp` | number | when Kinesis took it, milliseconds since the Unix epoch (left out when unknown) |
//! | `error` | string | the processor's last error with its chain of sources (`outer: cause: root`) |
//! | `attempts` | number | how many times processing failed |
//! | `firstFailure` | number | when the first attempt failed, milliseconds since the Unix epoch |
//! | `data` | string | the payload, standard base64 with padding |
//!
//! Times are epoch milliseconds (as Kinesis' own `ApproximateArrivalTimestamp` in JSON), so
//! that any consumer can compare them without parsing dates.
//!
//! A handler's success is what lets the shard move past the records: each one returns `Ok`
//! only once the records are stored (flushed to the stream, or the object written). Delivery
//! is at least once: a letter handed over again after a failure may be stored twice (the S3
//! destination overwrites the same key instead).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kcl::dead_letter::{KinesisDeadLetter, S3DeadLetter};
//! use kcl::processor::policy::DeadLetterPolicy;
//! use kcl::ErrorPolicy;
//!
//! let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
//! // To another stream, keyed by the original partition keys:
//! let to_stream = ErrorPolicy::DeadLetter(
//!     DeadLetterPolicy::new(KinesisDeadLetter::from_conf(&conf, "orders-dlq")).attempts(5),
//! );
//! // Or to S3, one object per failed batch:
//! let s3 = S3DeadLetter::builder(aws_sdk_s3::Client::new(&conf))
//!     .bucket("my-dead-letters")
//!     .prefix("orders/")
//!     .build()?;
//! let to_s3 = ErrorPolicy::dead_letter(s3);
//! # let _ = (to_stream, to_s3);
//! # Ok(())
//! # }
//! ```
//!
//! [`DeadLetterHandler`]: crate::processor::policy::DeadLetterHandler
//! [`ErrorPolicy::DeadLetter`]: crate::ErrorPolicy::DeadLetter

pub mod kinesis;
pub mod s3;

use base64::Engine as _;

use crate::error::BoxError;
use crate::lease::item::epoch_millis;
use crate::processor::policy::DeadLetter;
use crate::record::Record;

pub use kinesis::KinesisDeadLetter;
pub use s3::{S3DeadLetter, S3DeadLetterBuilder};

/// Why a ready-made handler could not store a letter (the shard waits and hands it over
/// again).
///
/// ```
/// use kcl::dead_letter::DeadLetterError;
/// # fn show(e: &DeadLetterError) {
/// match e {
///     DeadLetterError::Kinesis { stream, .. } => eprintln!("to stream {stream}: {e}"),
///     DeadLetterError::S3 { bucket, key, .. } => eprintln!("to s3://{bucket}/{key}: {e}"),
///     _ => eprintln!("{e}"),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterError {
    /// The producer did not get every envelope into the dead-letter stream.
    #[error("putting {records} dead letters to Kinesis stream {stream} failed")]
    Kinesis {
        /// The dead-letter stream.
        stream: String,
        /// The records of the letter.
        records: usize,
        /// The producer's error.
        #[source]
        source: BoxError,
    },
    /// `PutObject` failed.
    #[error("writing the dead letters to s3://{bucket}/{key} failed")]
    S3 {
        /// The bucket.
        bucket: String,
        /// The object's key.
        key: String,
        /// The SDK's error.
        #[source]
        source: BoxError,
    },
}

/// One failed record of `letter` as its envelope: a JSON object on one line, without a line
/// break (see the [module docs](self) for its fields).
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use kcl::processor::policy::DeadLetter;
/// use kcl::{ProcessorError, Record, SequenceNumber, ShardId};
///
/// let shard = ShardId::new("shardId-000000000001");
/// let records = [Record::new("hi".into(), "user-1", SequenceNumber::parse("42")?, None)];
/// let error = ProcessorError::fatal("bad input");
/// let first = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
/// let letter = DeadLetter::new("orders", &shard, &records, &error, 3, first);
/// let v: serde_json::Value = serde_json::from_str(&kcl::dead_letter::envelope(&letter, &records[0]))?;
/// assert_eq!(v["shardId"], "shardId-000000000001");
/// assert_eq!(v["sequenceNumber"], "42");
/// assert_eq!(v["attempts"], 3);
/// assert_eq!(v["firstFailure"], 1_700_000_000_000u64);
/// assert_eq!(v["error"], "record processor failed (fatal): bad input");
/// assert_eq!(v["data"], "aGk=");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn envelope(letter: &DeadLetter<'_>, record: &Record) -> String {
    envelope_with(letter, &crate::error::chain(letter.error), record)
}

/// [`envelope`] with the letter's error chain computed once.
pub(crate) fn envelope_with(letter: &DeadLetter<'_>, error: &str, record: &Record) -> String {
    let mut v = serde_json::json!({
        "stream": letter.stream,
        "shardId": letter.shard_id.as_str(),
        "sequenceNumber": record.sequence_number.to_string(),
        "subSequenceNumber": record.sub_sequence_number,
        "partitionKey": record.partition_key,
        "error": error,
        "attempts": letter.attempts,
        "firstFailure": epoch_millis(letter.first_failure),
        "data": base64::engine::general_purpose::STANDARD.encode(&record.data),
    });
    if let (Some(at), Some(map)) = (record.approximate_arrival, v.as_object_mut()) {
        map.insert(
            "approximateArrivalTimestamp".into(),
            epoch_millis(at).into(),
        );
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::processor::ProcessorError;
    use crate::record::SequenceNumber;
    use crate::shard::ShardId;

    #[derive(Debug, thiserror::Error)]
    #[error("the database said no")]
    struct Root;

    #[derive(Debug, thiserror::Error)]
    #[error("saving order 7")]
    struct Saving(#[source] Root);

    fn seq(s: &str) -> SequenceNumber {
        SequenceNumber::parse(s).expect("valid")
    }

    #[test]
    fn every_field_with_the_error_chain() {
        let shard = ShardId::new("shardId-000000000003");
        let mut r = Record::new(
            bytes::Bytes::from_static(&[0, 159, 146, 150]),
            "key \"1\"",
            seq("4900"),
            Some(UNIX_EPOCH + Duration::from_millis(1_600_000_000_123)),
        );
        r.sub_sequence_number = 2;
        let error = ProcessorError::retryable(Saving(Root));
        let first = UNIX_EPOCH + Duration::from_millis(1_700_000_000_456);
        let records = [r];
        let letter = DeadLetter::new("orders", &shard, &records, &error, 4, first);
        let line = envelope(&letter, &records[0]);
        assert!(!line.contains('\n'), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        let want = serde_json::json!({
            "stream": "orders",
            "shardId": "shardId-000000000003",
            "sequenceNumber": "4900",
            "subSequenceNumber": 2,
            "partitionKey": "key \"1\"",
            "approximateArrivalTimestamp": 1_600_000_000_123u64,
            "error": "record processor failed (retryable): saving order 7: the database said no",
            "attempts": 4,
            "firstFailure": 1_700_000_000_456u64,
            "data": "AJ+Slg==",
        });
        assert_eq!(v, want);
    }

    #[test]
    fn unknown_arrival_is_left_out() {
        let shard = ShardId::new("shardId-000000000000");
        let records = [Record::new(bytes::Bytes::new(), "k", seq("1"), None)];
        let error = ProcessorError::fatal("x");
        let letter = DeadLetter::new("s", &shard, &records, &error, 1, UNIX_EPOCH);
        let v: serde_json::Value =
            serde_json::from_str(&envelope(&letter, &records[0])).expect("JSON");
        assert!(v.get("approximateArrivalTimestamp").is_none(), "{v}");
        assert_eq!(v["data"], "");
        assert_eq!(v["firstFailure"], 0);
    }
}
