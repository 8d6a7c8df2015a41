//! Records and positions in a shard.
//!
//! Kinesis sequence numbers are decimal integers of up to 128 digits (real ones are about 56
//! digits, more than a `u128` holds). [`SequenceNumber`] validates and normalises them and compares
//! them numerically, never as plain strings. [`ExtendedSequenceNumber`] adds the KPL sub-sequence
//! number and the sentinel positions a lease checkpoint can hold.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use bytes::Bytes;

use crate::shard::ShardId;

/// The longest sequence number Kinesis documents (`^\d{1,128}$`).
pub const MAX_SEQUENCE_DIGITS: usize = 128;

/// A Kinesis sequence number: a decimal integer of 1 to 128 digits, compared numerically.
///
/// ```
/// use kcl::SequenceNumber;
/// let a: SequenceNumber = "49590338271490256608559692538361571095921575989136588898".parse()?;
/// let b: SequenceNumber = "9".parse()?;
/// assert!(b < a); // as strings "9" > "4959…", numerically it is smaller
/// assert!("12x".parse::<SequenceNumber>().is_err());
/// # Ok::<(), kcl::record::InvalidSequenceNumber>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SequenceNumber(Box<str>);

/// A string that is not a valid sequence number; it keeps the rejected input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sequence number {input:?}: {reason}")]
pub struct InvalidSequenceNumber {
    input: String,
    reason: &'static str,
}

impl InvalidSequenceNumber {
    /// The rejected input.
    pub fn input(&self) -> &str {
        &self.input
    }
}

impl SequenceNumber {
    /// Parses a decimal sequence number; leading zeros are dropped.
    ///
    /// # Errors
    /// [`InvalidSequenceNumber`] if the input is empty, longer than 128 digits or not all digits.
    pub fn parse(input: &str) -> Result<Self, InvalidSequenceNumber> {
        let reject = |reason| InvalidSequenceNumber {
            input: input.to_owned(),
            reason,
        };
        if input.is_empty() {
            return Err(reject("empty"));
        }
        if input.len() > MAX_SEQUENCE_DIGITS {
            return Err(reject("longer than 128 digits"));
        }
        if !input.bytes().all(|b| b.is_ascii_digit()) {
            return Err(reject("not a decimal number"));
        }
        let trimmed = input.trim_start_matches('0');
        let normal = if trimmed.is_empty() { "0" } else { trimmed };
        Ok(Self(normal.into()))
    }

    /// The number in decimal, without leading zeros.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Builds a sequence number from an integer (used by the in-memory Kinesis).
    pub fn from_u128(n: u128) -> Self {
        Self(n.to_string().into())
    }
}

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        // Normalised: no leading zeros, so a shorter number is smaller.
        self.0
            .len()
            .cmp(&other.0.len())
            .then_with(|| self.0.as_bytes().cmp(other.0.as_bytes()))
    }
}

impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl FromStr for SequenceNumber {
    type Err = InvalidSequenceNumber;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SequenceNumber({})", self.0)
    }
}

/// A position a lease checkpoint can hold: a record (sequence + KPL sub-sequence) or a sentinel.
///
/// Sentinels order as: the initial positions (`TrimHorizon`, `AtTimestamp`, `Latest`) before any
/// record, `ShardEnd` after every record. Records order by sequence, then sub-sequence.
///
/// ```
/// use kcl::ExtendedSequenceNumber as Esn;
/// let a = Esn::parse("100", Some(0))?;
/// let b = Esn::parse("100", Some(3))?;
/// assert!(Esn::TrimHorizon < a && a < b && b < Esn::ShardEnd);
/// assert_eq!(Esn::parse("SHARD_END", None)?, Esn::ShardEnd);
/// # Ok::<(), kcl::record::InvalidSequenceNumber>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum ExtendedSequenceNumber {
    /// Start at the oldest record in the shard.
    TrimHorizon,
    /// Start at the first record at or after the configured timestamp.
    AtTimestamp,
    /// Start after the newest record at the time the shard is first read.
    Latest,
    /// A record: everything up to and including this (sequence, sub-sequence) is processed.
    Sequence {
        /// The record's sequence number.
        sequence: SequenceNumber,
        /// The KPL sub-record index (0 for records that are not aggregated).
        sub_sequence: u64,
    },
    /// The shard was read to its end and finished.
    ShardEnd,
}

impl ExtendedSequenceNumber {
    /// The string stored in the lease table's `checkpoint` attribute.
    pub fn checkpoint_str(&self) -> &str {
        match self {
            Self::TrimHorizon => "TRIM_HORIZON",
            Self::AtTimestamp => "AT_TIMESTAMP",
            Self::Latest => "LATEST",
            Self::ShardEnd => "SHARD_END",
            Self::Sequence { sequence, .. } => sequence.as_str(),
        }
    }

    /// The `checkpointSubSequenceNumber` attribute (0 for sentinels).
    pub fn sub_sequence(&self) -> u64 {
        match self {
            Self::Sequence { sub_sequence, .. } => *sub_sequence,
            _ => 0,
        }
    }

    /// Parses the table's `checkpoint` / `checkpointSubSequenceNumber` pair.
    ///
    /// # Errors
    /// [`InvalidSequenceNumber`] if `checkpoint` is neither a sentinel nor a decimal number.
    pub fn parse(
        checkpoint: &str,
        sub_sequence: Option<u64>,
    ) -> Result<Self, InvalidSequenceNumber> {
        Ok(match checkpoint {
            "TRIM_HORIZON" => Self::TrimHorizon,
            "AT_TIMESTAMP" => Self::AtTimestamp,
            "LATEST" => Self::Latest,
            "SHARD_END" => Self::ShardEnd,
            other => Self::Sequence {
                sequence: SequenceNumber::parse(other)?,
                sub_sequence: sub_sequence.unwrap_or(0),
            },
        })
    }

    /// A record position.
    pub fn at(sequence: SequenceNumber, sub_sequence: u64) -> Self {
        Self::Sequence {
            sequence,
            sub_sequence,
        }
    }

    /// The sequence number, if this is a record position.
    pub fn sequence(&self) -> Option<&SequenceNumber> {
        match self {
            Self::Sequence { sequence, .. } => Some(sequence),
            _ => None,
        }
    }

    /// True for `TrimHorizon`, `AtTimestamp` and `Latest`: nothing was checkpointed yet.
    pub fn is_initial(&self) -> bool {
        matches!(self, Self::TrimHorizon | Self::AtTimestamp | Self::Latest)
    }

    fn rank(&self) -> u8 {
        match self {
            Self::TrimHorizon => 0,
            Self::AtTimestamp => 1,
            Self::Latest => 2,
            Self::Sequence { .. } => 3,
            Self::ShardEnd => 4,
        }
    }
}

impl Ord for ExtendedSequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (
                Self::Sequence {
                    sequence: a,
                    sub_sequence: sa,
                },
                Self::Sequence {
                    sequence: b,
                    sub_sequence: sb,
                },
            ) => a.cmp(b).then(sa.cmp(sb)),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl PartialOrd for ExtendedSequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ExtendedSequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sequence {
                sequence,
                sub_sequence: 0,
            } => write!(f, "{sequence}"),
            Self::Sequence {
                sequence,
                sub_sequence,
            } => write!(f, "{sequence}/{sub_sequence}"),
            other => f.write_str(other.checkpoint_str()),
        }
    }
}

/// One data record read from a shard.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// The payload.
    pub data: Bytes,
    /// The partition key the producer chose.
    pub partition_key: String,
    /// The record's sequence number.
    pub sequence_number: SequenceNumber,
    /// The KPL sub-record index (0 for records that are not aggregated).
    pub sub_sequence_number: u64,
    /// When Kinesis accepted the record, if known.
    pub approximate_arrival: Option<SystemTime>,
    /// The explicit hash key a KPL sub-record was routed by, if it had one (`None` for records
    /// that are not aggregated: Kinesis does not return the explicit hash key of a record).
    pub explicit_hash_key: Option<u128>,
}

impl Record {
    /// A record that is not aggregated (sub-sequence 0).
    pub fn new(
        data: Bytes,
        partition_key: impl Into<String>,
        sequence_number: SequenceNumber,
        approximate_arrival: Option<SystemTime>,
    ) -> Self {
        Self {
            data,
            partition_key: partition_key.into(),
            sequence_number,
            sub_sequence_number: 0,
            approximate_arrival,
            explicit_hash_key: None,
        }
    }

    /// The record's position, for checkpoints.
    pub fn position(&self) -> ExtendedSequenceNumber {
        ExtendedSequenceNumber::at(self.sequence_number.clone(), self.sub_sequence_number)
    }
}

/// The records handed to one `process_records` call, in shard order.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RecordBatch {
    /// The shard the records come from.
    pub shard_id: ShardId,
    /// The records, oldest first (never empty when delivered).
    pub records: Vec<Record>,
    /// How far behind the tip of the shard this batch was read, if the service said.
    pub millis_behind_latest: Option<u64>,
}

impl RecordBatch {
    /// A batch of `records` from `shard_id` (the worker builds them; tests and dead-letter
    /// handlers may too).
    ///
    /// ```
    /// let batch = kcl::RecordBatch::of(kcl::ShardId::new("shardId-000000000000"), vec![]);
    /// assert!(batch.is_empty());
    /// ```
    pub fn of(shard_id: ShardId, records: Vec<Record>) -> Self {
        Self {
            shard_id,
            records,
            millis_behind_latest: None,
        }
    }

    /// Number of records in the batch.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Iterates over the records.
    pub fn iter(&self) -> std::slice::Iter<'_, Record> {
        self.records.iter()
    }

    /// Total payload bytes.
    pub fn data_bytes(&self) -> usize {
        self.records.iter().map(|r| r.data.len()).sum()
    }
}

impl<'a> IntoIterator for &'a RecordBatch {
    type Item = &'a Record;
    type IntoIter = std::slice::Iter<'a, Record>;
    fn into_iter(self) -> Self::IntoIter {
        self.records.iter()
    }
}

/// A record as one line of JSON, the format of `kcl consume` and the S3 forwarder example
/// (feature `json`):
/// `{"shard":"…","seq":"…","subseq":0,"key":"…","data":"<base64>"}` and a newline.
#[cfg(feature = "json")]
#[derive(Debug, thiserror::Error)]
#[error("encoding a record as a JSON line failed: {0}")]
pub struct JsonLineError(String);

#[cfg(feature = "json")]
impl Record {
    /// Appends the record, read from `shard`, as one JSON line to `buf`. On an error nothing
    /// is appended.
    ///
    /// ```
    /// use kcl::{Record, SequenceNumber, ShardId};
    ///
    /// let r = Record::new("hi".into(), "user-1", SequenceNumber::from_u128(42), None);
    /// let mut line = Vec::new();
    /// r.write_json_line(&ShardId::new("shardId-000000000000"), &mut line)?;
    /// assert_eq!(
    ///     String::from_utf8(line)?,
    ///     "{\"shard\":\"shardId-000000000000\",\"seq\":\"42\",\"subseq\":0,\"key\":\"user-1\",\"data\":\"aGk=\"}\n"
    /// );
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// A payload too large to encode (more than `usize::MAX / 4 * 3` bytes).
    pub fn write_json_line(&self, shard: &ShardId, buf: &mut Vec<u8>) -> Result<(), JsonLineError> {
        self.write_line(None, shard, buf)
    }

    /// As [`Record::write_json_line`], with the stream first: the format of `kcl consume`,
    /// `{"stream":"…","shard":"…","seq":"…","subseq":0,"key":"…","data":"<base64>"}`.
    ///
    /// ```
    /// use kcl::{Record, SequenceNumber, ShardId};
    ///
    /// let r = Record::new("hi".into(), "user-1", SequenceNumber::from_u128(42), None);
    /// let mut line = Vec::new();
    /// r.write_stream_json_line("orders", &ShardId::new("shardId-000000000000"), &mut line)?;
    /// assert!(String::from_utf8(line)?.starts_with("{\"stream\":\"orders\",\"shard\":"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`Record::write_json_line`].
    pub fn write_stream_json_line(
        &self,
        stream: &str,
        shard: &ShardId,
        buf: &mut Vec<u8>,
    ) -> Result<(), JsonLineError> {
        self.write_line(Some(stream), shard, buf)
    }

    fn write_line(
        &self,
        stream: Option<&str>,
        shard: &ShardId,
        buf: &mut Vec<u8>,
    ) -> Result<(), JsonLineError> {
        use base64::Engine as _;
        use std::io::Write as _;
        let start = buf.len();
        let result = (|| {
            if let Some(stream) = stream {
                buf.extend_from_slice(b"{\"stream\":");
                serde_json::to_writer(&mut *buf, stream)
                    .map_err(|e| JsonLineError(e.to_string()))?;
                buf.extend_from_slice(b",\"shard\":");
            } else {
                buf.extend_from_slice(b"{\"shard\":");
            }
            serde_json::to_writer(&mut *buf, shard.as_str())
                .map_err(|e| JsonLineError(e.to_string()))?;
            write!(
                buf,
                ",\"seq\":\"{}\",\"subseq\":{},\"key\":",
                self.sequence_number, self.sub_sequence_number
            )
            .map_err(|e| JsonLineError(e.to_string()))?;
            serde_json::to_writer(&mut *buf, &self.partition_key)
                .map_err(|e| JsonLineError(e.to_string()))?;
            buf.extend_from_slice(b",\"data\":\"");
            let at = buf.len();
            let len = base64::encoded_len(self.data.len(), true)
                .ok_or_else(|| JsonLineError("the record is too large".into()))?;
            buf.resize(at + len, 0);
            let n = base64::engine::general_purpose::STANDARD
                .encode_slice(&self.data, &mut buf[at..])
                .map_err(|e| JsonLineError(e.to_string()))?;
            buf.truncate(at + n);
            buf.extend_from_slice(b"\"}\n");
            Ok(())
        })();
        if result.is_err() {
            buf.truncate(start);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(s: &str) -> SequenceNumber {
        s.parse().expect("valid")
    }

    #[test]
    fn sequence_numbers_compare_numerically() {
        assert!(sn("9") < sn("10"));
        assert!(sn("0009") == sn("9"));
        assert!(sn("49590338271490256608559692538361571095921575989136588898") > sn("9"));
        let long_a = format!("1{}", "0".repeat(127));
        let long_b = format!("1{}1", "0".repeat(126));
        assert!(sn(&long_a) < sn(&long_b));
        assert_eq!(sn("0").as_str(), "0");
    }

    #[test]
    fn invalid_sequence_numbers_are_rejected_with_input() {
        for bad in ["", "12a", "-1", " 1", "1.0"] {
            let err = SequenceNumber::parse(bad).unwrap_err();
            assert_eq!(err.input(), bad);
        }
        assert!(SequenceNumber::parse(&"1".repeat(129)).is_err());
        assert!(SequenceNumber::parse(&"1".repeat(128)).is_ok());
    }

    #[test]
    fn extended_ordering() {
        let a = ExtendedSequenceNumber::at(sn("5"), 0);
        let b = ExtendedSequenceNumber::at(sn("5"), 1);
        let c = ExtendedSequenceNumber::at(sn("40"), 0);
        assert!(ExtendedSequenceNumber::Latest < a);
        assert!(a < b && b < c && c < ExtendedSequenceNumber::ShardEnd);
        assert_eq!(
            ExtendedSequenceNumber::parse("AT_TIMESTAMP", None).unwrap(),
            ExtendedSequenceNumber::AtTimestamp
        );
        assert!(ExtendedSequenceNumber::parse("12x", Some(0)).is_err());
    }
}
