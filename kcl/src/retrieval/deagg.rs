//! KPL deaggregation: one Kinesis record holding many user records.
//!
//! The Kinesis Producer Library (and [`crate::producer::Producer`] with aggregation on) packs
//! many small user records into one Kinesis record, to stay under the per-shard limit of 1 000
//! records/s and to pay for fewer, larger puts. The record's data is then
//!
//! ```text
//! F3 89 9A C2  |  protobuf AggregatedRecord  |  MD5(protobuf bytes), 16 bytes
//! ```
//!
//! with (proto2)
//!
//! ```text
//! message AggregatedRecord {
//!   repeated string partition_key_table     = 1;
//!   repeated string explicit_hash_key_table = 2;
//!   repeated Record records                 = 3;
//! }
//! message Record {
//!   required uint64 partition_key_index     = 1;
//!   optional uint64 explicit_hash_key_index = 2;
//!   required bytes  data                    = 3;
//!   repeated Tag    tags                    = 4;
//! }
//! message Tag { required string key = 1; optional string value = 2; }
//! ```
//!
//! [`deaggregate`] turns such a record into its sub-records: they share the outer record's
//! sequence number and arrival time, are numbered by sub-sequence number `0..n` in the order
//! the aggregate holds them (so a checkpoint can point inside an aggregate), and carry their
//! own partition key, explicit hash key (if any) and data (a zero-copy slice of the outer
//! record's data). Tags are dropped, as the Java KCL does.
//!
//! A record without the magic is an ordinary record and comes back as it is. A record *with*
//! the magic that does not decode (too short, wrong MD5, bad protobuf, a missing required
//! field, a key index out of range, an explicit hash key that is not a 128-bit decimal, or no
//! sub-record at all) also comes back unchanged, with the reason: the caller counts it
//! ([`crate::metrics::INVALID_AGGREGATES`]) and logs it. Nothing is ever dropped silently.
//!
//! After a split or merge a KPL aggregate may have been written to a shard that does not own
//! every sub-record's hash key (the KPL predicts the shard from a shard map that can be out of
//! date, and puts those sub-records again to the right shard). Readers of a shard therefore drop
//! the sub-records outside its hash-key range: [`in_range`], or [`deaggregate_batch`] which does
//! everything above for a whole `GetRecords` response.
//!
//! ```
//! use bytes::Bytes;
//! use kcl::producer::{aggregate, UserRecord};
//! use kcl::retrieval::deagg::{deaggregate, Deaggregated};
//! use kcl::{Record, SequenceNumber};
//!
//! let data = aggregate(&[UserRecord::new("a", "one"), UserRecord::new("b", "two")]);
//! let outer = Record::new(data, "a", SequenceNumber::from_u128(7), None);
//! let Deaggregated::Aggregate(subs) = deaggregate(outer) else { panic!("an aggregate") };
//! assert_eq!(subs.len(), 2);
//! assert_eq!((subs[1].partition_key.as_str(), &subs[1].data[..]), ("b", &b"two"[..]));
//! assert_eq!(subs[1].sub_sequence_number, 1);
//!
//! let plain = Record::new(Bytes::from("hello"), "k", SequenceNumber::from_u128(8), None);
//! assert!(matches!(deaggregate(plain), Deaggregated::Plain(_)));
//! ```

use bytes::Bytes;
use md5::{Digest, Md5};
use prost::Message;
use tracing::{debug, warn};

use crate::record::Record;
use crate::shard::{hash_key, HashKeyRange, ShardId};

/// The four bytes every KPL aggregate starts with.
pub const KPL_MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// The length of the MD5 trailer.
pub(crate) const DIGEST_LEN: usize = 16;

/// `AggregatedRecord`. Required proto2 fields are modelled as `optional` so that a missing one
/// is seen (and the aggregate rejected, as protobuf-java does); on the wire a present optional
/// field and a required one are the same bytes.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct AggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    pub(crate) partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub(crate) explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    pub(crate) records: Vec<SubRecord>,
}

/// `Record` (a user record inside an aggregate).
#[derive(Clone, PartialEq, Message)]
pub(crate) struct SubRecord {
    #[prost(uint64, optional, tag = "1")]
    pub(crate) partition_key_index: Option<u64>,
    #[prost(uint64, optional, tag = "2")]
    pub(crate) explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "bytes", optional, tag = "3")]
    pub(crate) data: Option<Bytes>,
    #[prost(message, repeated, tag = "4")]
    pub(crate) tags: Vec<Tag>,
}

/// `Tag` (decoded to validate the aggregate, then dropped).
#[derive(Clone, PartialEq, Message)]
pub(crate) struct Tag {
    #[prost(string, optional, tag = "1")]
    pub(crate) key: Option<String>,
    #[prost(string, optional, tag = "2")]
    pub(crate) value: Option<String>,
}

/// What [`deaggregate`] made of one record.
///
/// ```
/// # use kcl::retrieval::deagg::Deaggregated;
/// # fn handle(d: Deaggregated) {
/// match d {
///     Deaggregated::Plain(record) => { /* an ordinary record */ }
///     Deaggregated::Aggregate(subs) => { /* its user records, sub-sequence 0..n */ }
///     Deaggregated::Invalid { record, reason } => { /* count, log, deliver as it is */ }
///     _ => {}
/// }
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Deaggregated {
    /// Not an aggregate (no KPL magic): the record, unchanged.
    Plain(Record),
    /// A valid aggregate's user records (never empty), in order.
    Aggregate(Vec<Record>),
    /// The record carries the KPL magic but is not a valid aggregate: unchanged.
    Invalid {
        /// The record, exactly as it was read.
        record: Record,
        /// Why it is not a valid aggregate.
        reason: InvalidAggregate,
    },
}

impl Deaggregated {
    /// The records to deliver: the sub-records of an aggregate, else the record itself.
    pub fn into_records(self) -> Vec<Record> {
        match self {
            Self::Plain(record) | Self::Invalid { record, .. } => vec![record],
            Self::Aggregate(subs) => subs,
        }
    }

    /// Why the record is not a valid aggregate, if it carried the magic and is not.
    pub fn invalid_reason(&self) -> Option<&InvalidAggregate> {
        match self {
            Self::Invalid { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// True for a valid aggregate.
    pub fn is_aggregate(&self) -> bool {
        matches!(self, Self::Aggregate(_))
    }
}

/// Why a record with the KPL magic is not a valid aggregate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidAggregate {
    /// Shorter than the magic plus the MD5 trailer.
    #[error("too short for the magic and the MD5 trailer ({len} bytes)")]
    TooShort {
        /// The record's data length.
        len: usize,
    },
    /// The MD5 trailer does not match the protobuf bytes.
    #[error("the MD5 trailer does not match")]
    DigestMismatch,
    /// The protobuf bytes do not decode as an `AggregatedRecord`.
    #[error("the protobuf does not decode: {0}")]
    Protobuf(String),
    /// A required protobuf field is missing.
    #[error("a sub-record lacks the required field {0}")]
    MissingField(&'static str),
    /// A sub-record's partition key index is past the end of the partition key table.
    #[error("partition key index {index} out of range ({len} keys)")]
    PartitionKeyIndex {
        /// The index.
        index: u64,
        /// The table's length.
        len: usize,
    },
    /// A sub-record's explicit hash key index is past the end of the explicit hash key table.
    #[error("explicit hash key index {index} out of range ({len} keys)")]
    ExplicitHashKeyIndex {
        /// The index.
        index: u64,
        /// The table's length.
        len: usize,
    },
    /// An explicit hash key that is not a decimal integer below 2^128.
    #[error("explicit hash key {0:?} is not a 128-bit decimal")]
    ExplicitHashKey(String),
    /// The aggregate holds no user record.
    #[error("no sub-record")]
    Empty,
}

/// True if `data` starts with the KPL magic (it is meant to be an aggregate).
pub fn has_magic(data: &[u8]) -> bool {
    data.starts_with(&KPL_MAGIC)
}

/// Splits a KPL aggregate into its user records; see the [module docs](self).
///
/// Never fails: a record that is not a valid aggregate comes back unchanged, as
/// [`Deaggregated::Plain`] (no magic) or [`Deaggregated::Invalid`] (magic, but invalid).
pub fn deaggregate(record: Record) -> Deaggregated {
    if !has_magic(&record.data) {
        return Deaggregated::Plain(record);
    }
    match decode(&record) {
        Ok(subs) => Deaggregated::Aggregate(subs),
        Err(reason) => Deaggregated::Invalid { record, reason },
    }
}

fn decode(outer: &Record) -> Result<Vec<Record>, InvalidAggregate> {
    let data = &outer.data;
    let len = data.len();
    if len < KPL_MAGIC.len() + DIGEST_LEN {
        return Err(InvalidAggregate::TooShort { len });
    }
    let body = data.slice(KPL_MAGIC.len()..len - DIGEST_LEN);
    if Md5::digest(&body)[..] != data[len - DIGEST_LEN..] {
        return Err(InvalidAggregate::DigestMismatch);
    }
    // Decoding from `Bytes` makes every sub-record's data a slice of the outer buffer.
    let aggregate =
        AggregatedRecord::decode(body).map_err(|e| InvalidAggregate::Protobuf(e.to_string()))?;
    if aggregate.records.is_empty() {
        return Err(InvalidAggregate::Empty);
    }
    let explicit_hash_keys = aggregate
        .explicit_hash_key_table
        .iter()
        .map(|s| parse_hash_key(s))
        .collect::<Vec<_>>();
    let keys = &aggregate.partition_key_table;
    let mut subs = Vec::with_capacity(aggregate.records.len());
    for (sub_sequence, sub) in (0u64..).zip(aggregate.records) {
        if sub.tags.iter().any(|t| t.key.is_none()) {
            return Err(InvalidAggregate::MissingField("tags.key"));
        }
        let key_index = sub
            .partition_key_index
            .ok_or(InvalidAggregate::MissingField("partition_key_index"))?;
        let partition_key = usize::try_from(key_index)
            .ok()
            .and_then(|i| keys.get(i))
            .ok_or(InvalidAggregate::PartitionKeyIndex {
                index: key_index,
                len: keys.len(),
            })?;
        let explicit_hash_key = match sub.explicit_hash_key_index {
            None => None,
            Some(index) => {
                let parsed = usize::try_from(index)
                    .ok()
                    .and_then(|i| explicit_hash_keys.get(i))
                    .ok_or(InvalidAggregate::ExplicitHashKeyIndex {
                        index,
                        len: explicit_hash_keys.len(),
                    })?;
                Some(parsed.clone()?)
            }
        };
        let data = sub.data.ok_or(InvalidAggregate::MissingField("data"))?;
        let mut record = Record::new(
            data,
            partition_key.clone(),
            outer.sequence_number.clone(),
            outer.approximate_arrival,
        );
        record.sub_sequence_number = sub_sequence;
        record.explicit_hash_key = explicit_hash_key;
        subs.push(record);
    }
    Ok(subs)
}

/// Parses an explicit hash key as Kinesis accepts it: a decimal integer in `0..2^128`.
fn parse_hash_key(s: &str) -> Result<u128, InvalidAggregate> {
    let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits
        .then(|| s.parse::<u128>().ok())
        .flatten()
        .ok_or_else(|| InvalidAggregate::ExplicitHashKey(s.to_owned()))
}

/// The hash key a record is routed by: its explicit hash key if it has one, else the MD5 of
/// its partition key.
pub fn effective_hash_key(record: &Record) -> u128 {
    record
        .explicit_hash_key
        .unwrap_or_else(|| hash_key(&record.partition_key))
}

/// True if the sub-record's hash key ([`effective_hash_key`]) falls in `range`.
///
/// Meant for the sub-records of an aggregate, whose hash keys the aggregate reveals. For a
/// record that is not aggregated it says nothing useful: Kinesis routed it itself, and does not
/// return the explicit hash key it may have been put with.
///
/// ```
/// use kcl::retrieval::deagg::in_range;
/// use kcl::shard::{hash_key, HashKeyRange};
/// use kcl::{Record, SequenceNumber};
///
/// let mut r = Record::new("x".into(), "a", SequenceNumber::from_u128(1), None);
/// let h = hash_key("a");
/// assert!(in_range(&r, HashKeyRange::new(h, h).unwrap()));
/// r.explicit_hash_key = Some(h + 1);
/// assert!(!in_range(&r, HashKeyRange::new(h, h).unwrap()));
/// ```
pub fn in_range(record: &Record, range: HashKeyRange) -> bool {
    range.contains(effective_hash_key(record))
}

/// Deaggregates the records of one `GetRecords` response from `shard`, in order.
///
/// Aggregates become their sub-records, keeping those in `range` (the shard's hash-key range;
/// `None` keeps all); plain records pass as they are. A record with the KPL magic that is not a
/// valid aggregate is passed on unchanged and logged at `warn` (a worker also counts it in
/// [`crate::metrics::INVALID_AGGREGATES`]). A batch with no aggregate comes back without
/// copying.
pub fn deaggregate_batch(
    records: Vec<Record>,
    shard: &ShardId,
    range: Option<HashKeyRange>,
) -> Vec<Record> {
    deaggregate_counted(records, shard, range, &metrics::Counter::noop())
}

/// [`deaggregate_batch`], counting invalid aggregates in `invalid`.
pub(crate) fn deaggregate_counted(
    records: Vec<Record>,
    shard: &ShardId,
    range: Option<HashKeyRange>,
    invalid: &metrics::Counter,
) -> Vec<Record> {
    if !records.iter().any(|r| has_magic(&r.data)) {
        return records;
    }
    let mut out = Vec::with_capacity(records.len());
    for record in records {
        match deaggregate(record) {
            Deaggregated::Plain(record) => out.push(record),
            Deaggregated::Invalid { record, reason } => {
                warn!(
                    %shard,
                    sequence = %record.sequence_number,
                    %reason,
                    "a record with the KPL magic is not a valid aggregate; delivering it as it is"
                );
                invalid.increment(1);
                out.push(record);
            }
            Deaggregated::Aggregate(subs) => {
                let total = subs.len();
                let before = out.len();
                out.extend(
                    subs.into_iter()
                        .filter(|s| range.is_none_or(|r| in_range(s, r))),
                );
                let dropped = total - (out.len() - before);
                if dropped > 0 {
                    debug!(
                        %shard,
                        dropped,
                        total,
                        "dropped KPL sub-records outside the shard's hash-key range"
                    );
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::producer::{aggregate, UserRecord};
    use crate::record::SequenceNumber;
    use std::time::{Duration, SystemTime};

    fn outer(data: Bytes) -> Record {
        Record::new(
            data,
            "outer-key",
            SequenceNumber::from_u128(4242),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
        )
    }

    /// Wraps protobuf bytes in the magic and a correct digest.
    fn framed(body: &[u8]) -> Bytes {
        let mut v = KPL_MAGIC.to_vec();
        v.extend_from_slice(body);
        v.extend_from_slice(&Md5::digest(body));
        Bytes::from(v)
    }

    fn users() -> Vec<UserRecord> {
        vec![
            UserRecord::new("alpha", "first"),
            UserRecord::new("beta", Bytes::new()),
            UserRecord::new("alpha", vec![0u8, 1, 2, 255]),
            UserRecord::new("gamma", "fourth").with_explicit_hash_key(u128::MAX),
            UserRecord::new("delta", "fifth").with_explicit_hash_key(0),
            UserRecord::new("gamma", "sixth").with_explicit_hash_key(u128::MAX),
        ]
    }

    #[test]
    fn round_trip_keeps_keys_data_hash_keys_and_numbers_sub_records() {
        let users = users();
        let data = aggregate(&users);
        assert!(has_magic(&data));
        let record = outer(data.clone());
        let out = deaggregate(record.clone());
        let Deaggregated::Aggregate(subs) = out else {
            panic!("not an aggregate: {out:?}");
        };
        assert_eq!(subs.len(), users.len());
        for (i, (sub, user)) in subs.iter().zip(&users).enumerate() {
            assert_eq!(sub.partition_key, user.partition_key);
            assert_eq!(sub.data, user.data);
            assert_eq!(sub.explicit_hash_key, user.explicit_hash_key);
            assert_eq!(sub.sub_sequence_number, i as u64);
            assert_eq!(sub.sequence_number, record.sequence_number);
            assert_eq!(sub.approximate_arrival, record.approximate_arrival);
            // Zero-copy: the payload is a slice of the outer buffer.
            if !sub.data.is_empty() {
                let outer_range = data.as_ptr() as usize..data.as_ptr() as usize + data.len();
                assert!(outer_range.contains(&(sub.data.as_ptr() as usize)));
            }
        }
        // Positions inside the aggregate order after the outer record and each other.
        assert!(subs.windows(2).all(|w| w[0].position() < w[1].position()));
    }

    fn unhex(parts: &[&str]) -> Bytes {
        let hex: String = parts.concat();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect::<Vec<u8>>()
            .into()
    }

    /// Aggregates made by other implementations of the format (captured from
    /// awslabs/kinesis-aggregation's test data, and a Ruby port's with explicit hash keys)
    /// decode, and the producer encodes the same user records to the same bytes.
    #[test]
    fn third_party_aggregates_decode_and_encode_byte_for_byte() {
        let three_keys = unhex(&[
            "f3899ac20a04706b2d300a04706b2d310a04706b2d321a1308001a0f7b226d7367223a226c696e65",
            "30227d1a1308011a0f7b226d7367223a226c696e6531227d1a1308021a0f7b226d7367223a226c69",
            "6e6532227d9f21c9a748fafd8a64f66b5068a6e9c4",
        ]);
        let want: Vec<UserRecord> = (0..3)
            .map(|i| UserRecord::new(format!("pk-{i}"), format!("{{\"msg\":\"line{i}\"}}")))
            .collect();
        let with_hash_keys = unhex(&[
            "f3899ac20a2466633033646438382d336537392d343438612d623031612d37636631626434376237",
            "38340a2463616534316231632d656136312d343366322d393062652d623837353565626638386532",
            "0a2464343930363930632d653734642d346462322d613363382d6438663266313834666432330a24",
            "63393234626330392d623835652d343766312d623332652d33333635323265653533633812263338",
            "34383634393538363735303833393930373831353937323338343630353138303730323012273139",
            "33373837363030303337363831373036393532313433333537303731393136333532363034122732",
            "36363838303433363936343933323432343236353436363931363733343036383638343433391227",
            "3333393630363630303934323936373339313835343630333535323430323032313834373239321a",
            "26080010001a205245434f5244203232207065656f6268637a627a646d736b626f75706779710a1a",
            "26080110011a205245434f5244203233207573776b78667478726f657573736378736a686e6f0a1a",
            "26080210021a205245434f524420323420636173656864676976666178657573746c79737a790a1a",
            "26080310031a205245434f5244203235206e76666676706d756f67646f706a68616d6576726b0a51",
            "c153d0de0a34ca9e18ea4bccd2add5",
        ]);
        let want_hashed = vec![
            UserRecord::new(
                "fc03dd88-3e79-448a-b01a-7cf1bd47b784",
                "RECORD 22 peeobhczbzdmskboupgyq\n",
            )
            .with_explicit_hash_key(38486495867508399078159723846051807020),
            UserRecord::new(
                "cae41b1c-ea61-43f2-90be-b8755ebf88e2",
                "RECORD 23 uswkxftxroeusscxsjhno\n",
            )
            .with_explicit_hash_key(193787600037681706952143357071916352604),
            UserRecord::new(
                "d490690c-e74d-4db2-a3c8-d8f2f184fd23",
                "RECORD 24 casehdgivfaxeustlyszy\n",
            )
            .with_explicit_hash_key(266880436964932424265466916734068684439),
            UserRecord::new(
                "c924bc09-b85e-47f1-b32e-336522ee53c8",
                "RECORD 25 nvffvpmuogdopjhamevrk\n",
            )
            .with_explicit_hash_key(339606600942967391854603552402021847292),
        ];
        for (data, want) in [(three_keys, want), (with_hash_keys, want_hashed)] {
            let subs = deaggregate(outer(data.clone())).into_records();
            let got: Vec<UserRecord> = subs
                .iter()
                .map(|s| UserRecord {
                    partition_key: s.partition_key.clone(),
                    data: s.data.clone(),
                    explicit_hash_key: s.explicit_hash_key,
                })
                .collect();
            assert_eq!(got, want);
            assert_eq!(aggregate(&want), data, "byte-for-byte the same aggregate");
        }
    }

    #[test]
    fn plain_records_pass_unchanged() {
        for data in [
            Bytes::new(),
            Bytes::from_static(b"hello"),
            Bytes::from_static(&[0xF3, 0x89, 0x9A]),
            Bytes::from_static(&[0xF3, 0x89, 0x9A, 0xC3, 0, 0]),
        ] {
            let r = outer(data);
            assert_eq!(deaggregate(r.clone()), Deaggregated::Plain(r));
        }
    }

    #[test]
    fn invalid_aggregates_pass_unchanged_with_a_reason() {
        let valid = aggregate(&users());
        type Case = (Bytes, fn(&InvalidAggregate) -> bool);
        let mut cases: Vec<Case> = Vec::new();
        // Magic only, and magic plus less than a digest.
        cases.push((Bytes::from_static(&KPL_MAGIC), |r| {
            matches!(r, InvalidAggregate::TooShort { len: 4 })
        }));
        cases.push((valid.slice(..19), |r| {
            matches!(r, InvalidAggregate::TooShort { .. })
        }));
        // A flipped byte in the body or the digest.
        for at in [5, valid.len() / 2, valid.len() - 1] {
            let mut v = valid.to_vec();
            v[at] ^= 0x40;
            cases.push((Bytes::from(v), |r| *r == InvalidAggregate::DigestMismatch));
        }
        // Truncated.
        cases.push((valid.slice(..valid.len() - 1), |r| {
            *r == InvalidAggregate::DigestMismatch
        }));
        // A correct digest over bytes that are not protobuf.
        cases.push((framed(&[0xFF, 0xFF, 0xFF]), |r| {
            matches!(r, InvalidAggregate::Protobuf(_))
        }));
        // Valid protobuf, but empty.
        cases.push((framed(&[]), |r| *r == InvalidAggregate::Empty));
        let msg = |records: Vec<SubRecord>, ehks: Vec<String>| {
            AggregatedRecord {
                partition_key_table: vec!["k".into()],
                explicit_hash_key_table: ehks,
                records,
            }
            .encode_to_vec()
        };
        let sub = |pk: Option<u64>, ehk: Option<u64>, data: Option<&'static [u8]>| SubRecord {
            partition_key_index: pk,
            explicit_hash_key_index: ehk,
            data: data.map(Bytes::from_static),
            tags: vec![],
        };
        cases.push((
            framed(&msg(vec![sub(Some(1), None, Some(b"x"))], vec![])),
            |r| *r == InvalidAggregate::PartitionKeyIndex { index: 1, len: 1 },
        ));
        cases.push((
            framed(&msg(vec![sub(Some(0), Some(0), Some(b"x"))], vec![])),
            |r| *r == InvalidAggregate::ExplicitHashKeyIndex { index: 0, len: 0 },
        ));
        let too_big = "340282366920938463463374607431768211456".to_owned();
        cases.push((
            framed(&msg(vec![sub(Some(0), Some(0), Some(b"x"))], vec![too_big])),
            |r| matches!(r, InvalidAggregate::ExplicitHashKey(_)),
        ));
        cases.push((
            framed(&msg(
                vec![sub(Some(0), Some(0), Some(b"x"))],
                vec!["-1".into()],
            )),
            |r| matches!(r, InvalidAggregate::ExplicitHashKey(_)),
        ));
        cases.push((
            framed(&msg(vec![sub(None, None, Some(b"x"))], vec![])),
            |r| *r == InvalidAggregate::MissingField("partition_key_index"),
        ));
        cases.push((framed(&msg(vec![sub(Some(0), None, None)], vec![])), |r| {
            *r == InvalidAggregate::MissingField("data")
        }));
        let mut tagged = sub(Some(0), None, Some(b"x"));
        tagged.tags.push(Tag {
            key: None,
            value: Some("v".into()),
        });
        cases.push((framed(&msg(vec![tagged], vec![])), |r| {
            *r == InvalidAggregate::MissingField("tags.key")
        }));
        // A sub-record after a valid one that is broken: the whole record is invalid.
        cases.push((
            framed(&msg(
                vec![
                    sub(Some(0), None, Some(b"ok")),
                    sub(Some(9), None, Some(b"x")),
                ],
                vec![],
            )),
            |r| matches!(r, InvalidAggregate::PartitionKeyIndex { index: 9, .. }),
        ));

        for (i, (data, expected)) in cases.into_iter().enumerate() {
            let r = outer(data);
            match deaggregate(r.clone()) {
                Deaggregated::Invalid { record, reason } => {
                    assert_eq!(record, r, "case {i}: the record must pass unchanged");
                    assert!(expected(&reason), "case {i}: unexpected reason {reason:?}");
                }
                other => panic!("case {i}: expected invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn tags_and_unknown_fields_are_accepted_and_dropped() {
        let mut body = AggregatedRecord {
            partition_key_table: vec!["k".into()],
            explicit_hash_key_table: vec![],
            records: vec![SubRecord {
                partition_key_index: Some(0),
                explicit_hash_key_index: None,
                data: Some(Bytes::from_static(b"payload")),
                tags: vec![Tag {
                    key: Some("t".into()),
                    value: None,
                }],
            }],
        }
        .encode_to_vec();
        // Field 15, varint 1: unknown to the schema, skipped as protobuf-java does.
        body.extend_from_slice(&[0x78, 0x01]);
        let subs = deaggregate(outer(framed(&body))).into_records();
        assert_eq!(subs.len(), 1);
        assert_eq!(&subs[0].data[..], b"payload");
        assert_eq!(subs[0].partition_key, "k");
    }

    #[test]
    fn hash_range_filter_uses_explicit_hash_key_else_md5() {
        let mut r = outer(Bytes::from_static(b"x"));
        r.partition_key = "a".into();
        let h = hash_key("a");
        let just = |lo, hi| HashKeyRange::new(lo, hi).expect("range");
        assert!(in_range(&r, HashKeyRange::FULL));
        assert!(in_range(&r, just(h, h)));
        assert!(!in_range(&r, just(h + 1, u128::MAX)));
        r.explicit_hash_key = Some(5);
        assert_eq!(effective_hash_key(&r), 5);
        assert!(in_range(&r, just(0, 5)));
        assert!(!in_range(&r, just(h, h)));
    }

    #[test]
    fn batch_filters_sub_records_outside_the_shard_but_never_plain_or_invalid_ones() {
        let (lo, hi) = HashKeyRange::FULL.split_at(1 << 127).expect("split");
        let users = users();
        let in_lo = users
            .iter()
            .filter(|u| {
                lo.contains(
                    u.explicit_hash_key
                        .unwrap_or_else(|| hash_key(&u.partition_key)),
                )
            })
            .count();
        assert!(
            in_lo > 0 && in_lo < users.len(),
            "the sample spans both halves"
        );
        let plain = outer(Bytes::from_static(b"plain"));
        let invalid = outer(Bytes::from_static(&[0xF3, 0x89, 0x9A, 0xC2, 1]));
        let batch = vec![plain.clone(), outer(aggregate(&users)), invalid.clone()];
        let shard = ShardId::new("shardId-000000000001");

        let got = deaggregate_batch(batch.clone(), &shard, Some(lo));
        assert_eq!(got.len(), 2 + in_lo);
        assert_eq!(got[0], plain);
        assert_eq!(got[got.len() - 1], invalid);
        assert!(got[1..got.len() - 1].iter().all(|s| in_range(s, lo)));
        // Sub-sequence numbers stay those of the aggregate (gaps where records were dropped).
        let kept = deaggregate_batch(batch.clone(), &shard, Some(hi));
        assert_eq!(kept.len(), 2 + users.len() - in_lo);
        assert_eq!(
            deaggregate_batch(batch, &shard, None).len(),
            2 + users.len()
        );

        let no_aggregates = vec![plain.clone(), plain];
        let ptr = no_aggregates.as_ptr();
        let same = deaggregate_batch(no_aggregates, &shard, Some(lo));
        assert_eq!(same.as_ptr(), ptr, "returned without copying");
    }

    /// The invariants the fuzz target (`kcl/fuzz`) checks, for one record's data.
    fn check(data: &[u8]) {
        let record = outer(Bytes::copy_from_slice(data));
        let out = deaggregate(record.clone());
        match &out {
            Deaggregated::Plain(r) => {
                assert_eq!(r, &record);
                assert!(!has_magic(data));
            }
            Deaggregated::Invalid { record: r, .. } => {
                assert_eq!(r, &record);
                assert!(has_magic(data));
            }
            Deaggregated::Aggregate(subs) => {
                assert!(has_magic(data) && data.len() >= KPL_MAGIC.len() + DIGEST_LEN);
                assert!(!subs.is_empty());
                for (i, s) in subs.iter().enumerate() {
                    assert_eq!(s.sub_sequence_number, i as u64);
                    assert_eq!(s.sequence_number, record.sequence_number);
                    assert_eq!(s.approximate_arrival, record.approximate_arrival);
                    assert!(s.data.len() <= data.len());
                    assert!(in_range(s, HashKeyRange::FULL));
                }
                // Re-aggregating the user records gives the same user records back.
                let users: Vec<UserRecord> = subs
                    .iter()
                    .map(|s| {
                        let u = UserRecord::new(s.partition_key.clone(), s.data.clone());
                        match s.explicit_hash_key {
                            Some(h) => u.with_explicit_hash_key(h),
                            None => u,
                        }
                    })
                    .collect();
                let again = deaggregate(outer(aggregate(&users))).into_records();
                assert_eq!(again.len(), subs.len());
                for (a, b) in again.iter().zip(subs) {
                    assert_eq!(
                        (&a.partition_key, &a.data, a.explicit_hash_key),
                        (&b.partition_key, &b.data, b.explicit_hash_key)
                    );
                }
            }
        }
    }

    /// A stable-Rust stand-in for `cargo +nightly fuzz run deaggregate`: random bytes, random
    /// bodies behind a correct digest, and mutations of valid aggregates, from a fixed seed.
    #[test]
    fn fuzz_smoke_never_panics_and_outputs_are_consistent() {
        use rand::{Rng, RngCore, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b706c);
        let seeds: Vec<Vec<u8>> = vec![
            aggregate(&users()).to_vec(),
            aggregate(&[UserRecord::new("k", "v")]).to_vec(),
            aggregate(&[
                UserRecord::new("k", vec![7u8; 300]),
                UserRecord::new("k", "w").with_explicit_hash_key(12345),
            ])
            .to_vec(),
        ];
        let mut valid = 0;
        for i in 0..6_000 {
            let mut data = match i % 3 {
                0 => {
                    let mut v = vec![0u8; rng.random_range(0..64)];
                    rng.fill_bytes(&mut v);
                    if rng.random_bool(0.5) {
                        v.splice(0..0, KPL_MAGIC);
                    }
                    v
                }
                1 => {
                    // A random protobuf-ish body with a correct digest.
                    let mut body = vec![0u8; rng.random_range(0..48)];
                    rng.fill_bytes(&mut body);
                    framed(&body).to_vec()
                }
                _ => seeds[rng.random_range(0..seeds.len())].clone(),
            };
            // Mutate: flip bits, truncate, or insert bytes, then maybe fix the digest up.
            for _ in 0..rng.random_range(0..4) {
                if data.is_empty() {
                    break;
                }
                let at = rng.random_range(0..data.len());
                match rng.random_range(0..3) {
                    0 => data[at] ^= 1 << rng.random_range(0..8),
                    1 => data.truncate(at),
                    _ => data.insert(at, rng.random()),
                }
            }
            if i % 3 == 2 && has_magic(&data) && data.len() >= 20 && rng.random_bool(0.7) {
                let body = data[4..data.len() - DIGEST_LEN].to_vec();
                data = framed(&body).to_vec();
            }
            check(&data);
            valid += usize::from(deaggregate(outer(Bytes::from(data))).is_aggregate());
        }
        assert!(
            valid > 100,
            "the inputs reach the decoder's success path ({valid})"
        );
    }
}
