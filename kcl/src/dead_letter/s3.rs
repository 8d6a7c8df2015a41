//! [`S3DeadLetter`]: failed records to S3, one object per letter.

use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;

use super::{envelope_with, DeadLetterError};
use crate::config::ConfigError;
use crate::error::BoxError;
use crate::lease::item::epoch_millis;
use crate::processor::policy::{DeadLetter, DeadLetterHandler};
use crate::record::Record;

/// The longest `error` metadata value, in bytes (S3 allows 2 KB of user metadata in all;
/// the other values are at most a few hundred bytes).
pub const MAX_ERROR_METADATA: usize = 1024;

/// Writes each letter to S3 as one object: key `{prefix}{stream}/{shardId}/{first}-{last}.jsonl`
/// (`first` and `last` are the sequence numbers of the letter's first and last records, each
/// followed by `.{subSequenceNumber}` when that is not 0, for KPL sub-records), body the
/// records' [envelopes](super::envelope), one per line, content type `application/x-ndjson`.
///
/// The key depends on the records only, so a letter handed over again (after a failed
/// `PutObject`, or by the next owner of the shard) overwrites the same object rather than
/// adding another. The object's user metadata (`x-amz-meta-*`) says what it holds without
/// reading it: `stream`, `shard-id`, `first-sequence-number`, `last-sequence-number`,
/// `records`, `attempts`, `first-failure` (epoch milliseconds) and `error` (the error chain,
/// cut to [`MAX_ERROR_METADATA`] bytes). Metadata must be ASCII: other characters, and control
/// characters, become `?`.
///
/// Needs `s3:PutObject` on the bucket (and `kms:GenerateDataKey` if it is encrypted with a
/// customer managed KMS key).
///
/// ```no_run
/// # async fn demo() -> Result<(), kcl::ConfigError> {
/// use kcl::dead_letter::S3DeadLetter;
///
/// let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
/// let dlq = S3DeadLetter::builder(aws_sdk_s3::Client::new(&conf))
///     .bucket("my-dead-letters")
///     .prefix("orders/")
///     .build()?;
/// let policy = kcl::ErrorPolicy::dead_letter(dlq);
/// # let _ = policy;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct S3DeadLetter {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

/// Builds an [`S3DeadLetter`] ([`S3DeadLetter::builder`]).
///
/// ```no_run
/// # async fn demo() -> Result<(), kcl::ConfigError> {
/// # let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
/// let dlq = kcl::dead_letter::S3DeadLetter::builder(aws_sdk_s3::Client::new(&conf))
///     .bucket("my-dead-letters")
///     .build()?; // no prefix: keys start with the stream name
/// # let _ = dlq;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
#[must_use]
pub struct S3DeadLetterBuilder {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

impl S3DeadLetterBuilder {
    /// The bucket (required).
    ///
    /// ```no_run
    /// # async fn demo(client: aws_sdk_s3::Client) {
    /// let builder = kcl::dead_letter::S3DeadLetter::builder(client).bucket("my-dead-letters");
    /// # let _ = builder;
    /// # }
    /// ```
    pub fn bucket(mut self, bucket: impl Into<String>) -> Self {
        self.bucket = bucket.into();
        self
    }

    /// What every key starts with (default: nothing). Give it a trailing `/` to make it a
    /// folder.
    ///
    /// ```no_run
    /// # async fn demo(client: aws_sdk_s3::Client) {
    /// let builder = kcl::dead_letter::S3DeadLetter::builder(client)
    ///     .bucket("shared")
    ///     .prefix("dead-letters/orders/");
    /// # let _ = builder;
    /// # }
    /// ```
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The handler.
    ///
    /// # Errors
    /// A [`ConfigError`] when the bucket is empty, or the prefix starts with `/` or is longer
    /// than 512 bytes (S3 keys are at most 1024 bytes).
    ///
    /// ```no_run
    /// # async fn demo(client: aws_sdk_s3::Client) {
    /// let missing = kcl::dead_letter::S3DeadLetter::builder(client).build();
    /// assert_eq!(missing.unwrap_err().field(), "bucket");
    /// # }
    /// ```
    pub fn build(self) -> Result<S3DeadLetter, ConfigError> {
        check_bucket(&self.bucket)?;
        check_prefix(&self.prefix)?;
        Ok(S3DeadLetter {
            client: self.client,
            bucket: self.bucket,
            prefix: self.prefix,
        })
    }
}

fn check_bucket(bucket: &str) -> Result<(), ConfigError> {
    if bucket.is_empty() {
        return Err(ConfigError::new("bucket", "the bucket must not be empty"));
    }
    if bucket.contains('/') {
        return Err(ConfigError::new(
            "bucket",
            "a bucket name has no '/' (put folders in the prefix)",
        ));
    }
    Ok(())
}

fn check_prefix(prefix: &str) -> Result<(), ConfigError> {
    if prefix.starts_with('/') {
        return Err(ConfigError::new(
            "prefix",
            "the prefix must not start with '/'",
        ));
    }
    if prefix.len() > 512 {
        return Err(ConfigError::new(
            "prefix",
            "the prefix is longer than 512 bytes",
        ));
    }
    Ok(())
}

impl S3DeadLetter {
    /// A builder over `client` (its region, endpoint, credentials and retry settings are used
    /// as they are).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), kcl::ConfigError> {
    /// let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    /// let dlq = kcl::dead_letter::S3DeadLetter::builder(aws_sdk_s3::Client::new(&conf))
    ///     .bucket("my-dead-letters")
    ///     .build()?;
    /// # let _ = dlq;
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder(client: aws_sdk_s3::Client) -> S3DeadLetterBuilder {
        S3DeadLetterBuilder {
            client,
            bucket: String::new(),
            prefix: String::new(),
        }
    }

    /// The bucket.
    ///
    /// ```no_run
    /// # fn demo(dlq: kcl::dead_letter::S3DeadLetter) {
    /// println!("dead letters go to s3://{}/", dlq.bucket());
    /// # }
    /// ```
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key `letter` is written under (see [`S3DeadLetter`]); `None` for a letter without
    /// records (nothing is written).
    ///
    /// ```no_run
    /// # fn demo(dlq: kcl::dead_letter::S3DeadLetter, letter: kcl::processor::policy::DeadLetter<'_>) {
    /// // e.g. "orders/orders/shardId-000000000000/4960-4971.jsonl"
    /// println!("{:?}", dlq.key(&letter));
    /// # }
    /// ```
    pub fn key(&self, letter: &DeadLetter<'_>) -> Option<String> {
        object_key(&self.prefix, letter)
    }
}

/// `{prefix}{stream}/{shardId}/{first}-{last}.jsonl`.
fn object_key(prefix: &str, letter: &DeadLetter<'_>) -> Option<String> {
    let (first, last) = (letter.records.first()?, letter.records.last()?);
    Some(format!(
        "{prefix}{}/{}/{}-{}.jsonl",
        letter.stream,
        letter.shard_id,
        position(first),
        position(last)
    ))
}

fn position(r: &Record) -> String {
    if r.sub_sequence_number == 0 {
        r.sequence_number.to_string()
    } else {
        format!("{}.{}", r.sequence_number, r.sub_sequence_number)
    }
}

/// Printable ASCII only (other characters become `?`), trimmed, at most `max` bytes.
fn metadata_value(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    // ASCII only: every char is one byte, so any length is a char boundary.
    if out.len() > max {
        out.truncate(max.saturating_sub(3));
        out.push_str("...");
    }
    out.trim().to_owned()
}

/// The object's user metadata, sanitized.
fn metadata(letter: &DeadLetter<'_>, error: &str) -> Vec<(&'static str, String)> {
    let seq = |r: Option<&Record>| r.map(position).unwrap_or_default();
    vec![
        ("stream", metadata_value(letter.stream, 256)),
        ("shard-id", metadata_value(letter.shard_id.as_str(), 256)),
        (
            "first-sequence-number",
            metadata_value(&seq(letter.records.first()), 128),
        ),
        (
            "last-sequence-number",
            metadata_value(&seq(letter.records.last()), 128),
        ),
        ("records", letter.records.len().to_string()),
        ("attempts", letter.attempts.to_string()),
        (
            "first-failure",
            epoch_millis(letter.first_failure).to_string(),
        ),
        ("error", metadata_value(error, MAX_ERROR_METADATA)),
    ]
}

/// The body: one envelope per line.
fn body(letter: &DeadLetter<'_>, error: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for r in letter.records {
        out.extend_from_slice(envelope_with(letter, error, r).as_bytes());
        out.push(b'\n');
    }
    out
}

#[async_trait]
impl DeadLetterHandler for S3DeadLetter {
    async fn handle(&self, letter: &DeadLetter<'_>) -> Result<(), BoxError> {
        let Some(key) = self.key(letter) else {
            return Ok(());
        };
        let error = crate::error::chain(letter.error);
        let mut put = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_type("application/x-ndjson")
            .body(ByteStream::from(body(letter, &error)));
        for (name, value) in metadata(letter, &error) {
            put = put.metadata(name, value);
        }
        match put.send().await {
            Ok(_) => Ok(()),
            Err(e) => Err(DeadLetterError::S3 {
                bucket: self.bucket.clone(),
                key,
                source: Box::new(e),
            }
            .into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::processor::ProcessorError;
    use crate::record::SequenceNumber;
    use crate::shard::ShardId;

    fn record(seq: &str, sub: u64) -> Record {
        let mut r = Record::new(
            "x".into(),
            "k",
            SequenceNumber::parse(seq).expect("valid"),
            None,
        );
        r.sub_sequence_number = sub;
        r
    }

    #[test]
    fn keys_are_deterministic() {
        let shard = ShardId::new("shardId-000000000001");
        let error = ProcessorError::fatal("e");
        let records = [record("100", 0), record("105", 0), record("107", 3)];
        let letter = DeadLetter::new("orders", &shard, &records, &error, 2, UNIX_EPOCH);
        assert_eq!(
            object_key("dlq/", &letter).as_deref(),
            Some("dlq/orders/shardId-000000000001/100-107.3.jsonl")
        );
        let one = DeadLetter::new("orders", &shard, &records[..1], &error, 9, UNIX_EPOCH);
        assert_eq!(
            object_key("", &one).as_deref(),
            Some("orders/shardId-000000000001/100-100.jsonl")
        );
        let none = DeadLetter::new("orders", &shard, &[], &error, 1, UNIX_EPOCH);
        assert_eq!(object_key("", &none), None);
    }

    #[test]
    fn metadata_is_ascii_and_bounded() {
        let shard = ShardId::new("shardId-000000000001");
        let error = ProcessorError::fatal("é\nx");
        let records = [record("100", 0), record("200", 0)];
        let first = UNIX_EPOCH + Duration::from_millis(1234);
        let letter = DeadLetter::new("orders", &shard, &records, &error, 3, first);
        let long = format!("bad: {}", "ü".repeat(5000));
        let meta = metadata(&letter, &long);
        let total: usize = meta.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(total < 2048, "{total}");
        for (k, v) in &meta {
            assert!(
                v.chars().all(|c| c == ' ' || c.is_ascii_graphic()),
                "{k}: {v:?}"
            );
        }
        let get = |name: &str| {
            meta.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
                .expect(name)
        };
        assert_eq!(get("first-sequence-number"), "100");
        assert_eq!(get("last-sequence-number"), "200");
        assert_eq!(get("attempts"), "3");
        assert_eq!(get("records"), "2");
        assert_eq!(get("first-failure"), "1234");
        assert_eq!(get("error").len(), MAX_ERROR_METADATA);
        assert!(get("error").ends_with("..."));
        assert_eq!(
            metadata(&letter, &crate::error::chain(&error))
                .iter()
                .find(|(k, _)| *k == "error")
                .map(|(_, v)| v.as_str()),
            Some("record processor failed (fatal): ??x")
        );
    }

    #[test]
    fn the_body_is_one_envelope_per_line() {
        let shard = ShardId::new("shardId-000000000001");
        let error = ProcessorError::fatal("e");
        let records = [record("100", 0), record("200", 0)];
        let letter = DeadLetter::new("orders", &shard, &records, &error, 1, UNIX_EPOCH);
        let body = String::from_utf8(body(&letter, "e")).expect("UTF-8");
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(body.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(lines[1]).expect("JSON");
        assert_eq!(v["sequenceNumber"], "200");
    }

    #[test]
    fn builder_validates() {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .build();
        let client = aws_sdk_s3::Client::from_conf(conf);
        let e = S3DeadLetter::builder(client.clone())
            .build()
            .expect_err("no bucket");
        assert_eq!(e.field(), "bucket");
        let e = S3DeadLetter::builder(client.clone())
            .bucket("b")
            .prefix("/x")
            .build()
            .expect_err("bad prefix");
        assert_eq!(e.field(), "prefix");
        let ok = S3DeadLetter::builder(client)
            .bucket("b")
            .prefix("p/")
            .build()
            .expect("valid");
        assert_eq!(ok.bucket(), "b");
    }
}
