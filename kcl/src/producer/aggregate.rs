//! KPL aggregation: packing user records into Kinesis records, bytes-compatible with the KPL
//! (so the Java KCL, the KPL's own deaggregators and [`crate::retrieval::deagg`] read them).

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use md5::{Digest, Md5};
use prost::encoding::encoded_len_varint;
use prost::{length_delimiter_len, Message};

use super::UserRecord;
use crate::retrieval::deagg::{AggregatedRecord, SubRecord, DIGEST_LEN, KPL_MAGIC};

/// The bytes of the magic and the MD5 trailer around the protobuf.
const FRAMING: usize = KPL_MAGIC.len() + DIGEST_LEN;

/// Encodes `records` as one KPL aggregate (magic, protobuf, MD5), whatever their number and
/// size. The aggregate's own partition key is up to the caller (the KPL uses the first
/// record's).
///
/// An empty slice gives an aggregate without sub-records, which readers treat as invalid.
///
/// ```
/// use kcl::producer::{aggregate, UserRecord};
/// use kcl::retrieval::deagg::deaggregate;
/// use kcl::{Record, SequenceNumber};
///
/// let data = aggregate(&[UserRecord::new("k", "a"), UserRecord::new("k", "b")]);
/// assert!(data.starts_with(&[0xF3, 0x89, 0x9A, 0xC2]));
/// let outer = Record::new(data, "k", SequenceNumber::from_u128(1), None);
/// let subs = deaggregate(outer).into_records();
/// assert_eq!(subs.len(), 2);
/// ```
pub fn aggregate(records: &[UserRecord]) -> Bytes {
    let mut builder = AggregateBuilder::default();
    for r in records {
        builder.push(r);
    }
    builder.encode()
}

/// An aggregate being filled, which knows its encoded size at every step.
#[derive(Debug, Default)]
pub(crate) struct AggregateBuilder {
    message: AggregatedRecord,
    key_index: HashMap<String, u64>,
    hash_key_index: HashMap<u128, u64>,
    /// The protobuf's encoded length so far.
    body_len: usize,
}

/// The encoded length of a length-delimited field (tag, length, bytes), for field numbers < 16.
fn delimited_len(len: usize) -> usize {
    1 + length_delimiter_len(len) + len
}

impl AggregateBuilder {
    /// The number of user records in the aggregate.
    pub(crate) fn len(&self) -> usize {
        self.message.records.len()
    }

    /// The first record's partition key (the aggregate's own, as with the KPL).
    pub(crate) fn partition_key(&self) -> Option<&str> {
        self.message.partition_key_table.first().map(String::as_str)
    }

    /// What the aggregate would count for in Kinesis' record-size limit (data plus partition
    /// key) after pushing `record`.
    pub(crate) fn size_with(&self, record: &UserRecord) -> usize {
        let (grown, _) = self.growth(record);
        let key = self
            .partition_key()
            .unwrap_or(record.partition_key.as_str());
        FRAMING + self.body_len + grown + key.len()
    }

    /// How much the body grows by pushing `record`, and its sub-record message.
    fn growth(&self, record: &UserRecord) -> (usize, SubRecord) {
        let mut grown = 0;
        let key_index = match self.key_index.get(&record.partition_key) {
            Some(&i) => i,
            None => {
                grown += delimited_len(record.partition_key.len());
                self.message.partition_key_table.len() as u64
            }
        };
        let hash_key_index = record
            .explicit_hash_key
            .map(|h| match self.hash_key_index.get(&h) {
                Some(&i) => i,
                None => {
                    grown += delimited_len(decimal_len(h));
                    self.message.explicit_hash_key_table.len() as u64
                }
            });
        let sub = SubRecord {
            partition_key_index: Some(key_index),
            explicit_hash_key_index: hash_key_index,
            data: Some(record.data.clone()),
            tags: Vec::new(),
        };
        let sub_len = 1
            + encoded_len_varint(key_index)
            + hash_key_index.map_or(0, |i| 1 + encoded_len_varint(i))
            + delimited_len(record.data.len());
        debug_assert_eq!(sub_len, sub.encoded_len());
        (grown + delimited_len(sub_len), sub)
    }

    /// Adds `record` (whatever the size).
    pub(crate) fn push(&mut self, record: &UserRecord) {
        let (grown, sub) = self.growth(record);
        self.body_len += grown;
        let m = &mut self.message;
        if let Some(i) = sub.partition_key_index {
            if i as usize == m.partition_key_table.len() {
                m.partition_key_table.push(record.partition_key.clone());
                self.key_index.insert(record.partition_key.clone(), i);
            }
        }
        if let (Some(i), Some(h)) = (sub.explicit_hash_key_index, record.explicit_hash_key) {
            if i as usize == m.explicit_hash_key_table.len() {
                m.explicit_hash_key_table.push(h.to_string());
                self.hash_key_index.insert(h, i);
            }
        }
        m.records.push(sub);
        debug_assert_eq!(self.body_len, self.message.encoded_len());
    }

    /// The aggregate's bytes: magic, protobuf, MD5 of the protobuf.
    pub(crate) fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(FRAMING + self.body_len);
        out.put_slice(&KPL_MAGIC);
        self.message
            .encode(&mut out)
            .expect("BytesMut grows as needed");
        let digest = Md5::digest(&out[KPL_MAGIC.len()..]);
        out.put_slice(&digest);
        out.freeze()
    }
}

/// The number of decimal digits of `n`.
fn decimal_len(n: u128) -> usize {
    n.checked_ilog10().map_or(1, |l| l as usize + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_exact() {
        let mut b = AggregateBuilder::default();
        assert_eq!(b.encode().len(), FRAMING);
        let records = [
            UserRecord::new("k", "x"),
            UserRecord::new("k", vec![0u8; 200]),
            UserRecord::new("other-key", vec![1u8; 20_000]),
            UserRecord::new("k", "y").with_explicit_hash_key(u128::MAX),
            UserRecord::new("z", "").with_explicit_hash_key(0),
            UserRecord::new("z", "w").with_explicit_hash_key(u128::MAX),
        ];
        for r in &records {
            let predicted = b.size_with(r);
            b.push(r);
            assert_eq!(predicted, b.encode().len() + "k".len());
        }
        assert_eq!(b.len(), records.len());
        assert_eq!(b.message.partition_key_table, ["k", "other-key", "z"]);
        assert_eq!(b.message.explicit_hash_key_table.len(), 2);
    }

    #[test]
    fn decimal_lengths() {
        assert_eq!(decimal_len(0), 1);
        assert_eq!(decimal_len(9), 1);
        assert_eq!(decimal_len(10), 2);
        assert_eq!(decimal_len(u128::MAX), 39);
    }
}
