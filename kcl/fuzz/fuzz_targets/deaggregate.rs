//! Fuzzes KPL deaggregation: arbitrary bytes as a record's data must never panic, a record that
//! is not a valid aggregate must come back unchanged, and a valid one must give consistent
//! sub-records that re-aggregate to the same user records.
//!
//! Run with: `cd kcl && cargo +nightly fuzz run deaggregate` (see `../README.md`).

#![no_main]

use bytes::Bytes;
use kcl::producer::{aggregate, UserRecord};
use kcl::retrieval::deagg::{deaggregate, has_magic, in_range, Deaggregated, KPL_MAGIC};
use kcl::shard::HashKeyRange;
use kcl::{Record, SequenceNumber};
use libfuzzer_sys::fuzz_target;
use md5::{Digest, Md5};

/// The MD5 trailer's length.
const DIGEST_LEN: usize = 16;

fuzz_target!(|data: &[u8]| {
    // The input as a record's data...
    check(data);
    // ...and as the protobuf behind the magic and a correct digest, which random bytes almost
    // never carry: this reaches the protobuf decoding and the validation after it.
    let mut framed = KPL_MAGIC.to_vec();
    framed.extend_from_slice(data);
    framed.extend_from_slice(&Md5::digest(data));
    check(&framed);
});

fn outer(data: Bytes) -> Record {
    Record::new(data, "outer-key", SequenceNumber::from_u128(4242), None)
}

fn check(data: &[u8]) {
    let record = outer(Bytes::copy_from_slice(data));
    match deaggregate(record.clone()) {
        Deaggregated::Plain(r) => {
            assert_eq!(r, record, "a plain record must pass unchanged");
            assert!(!has_magic(data));
        }
        Deaggregated::Invalid { record: r, .. } => {
            assert_eq!(r, record, "an invalid aggregate must pass unchanged");
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
            for (a, b) in again.iter().zip(&subs) {
                assert_eq!(
                    (&a.partition_key, &a.data, a.explicit_hash_key),
                    (&b.partition_key, &b.data, b.explicit_hash_key)
                );
            }
        }
        _ => {}
    }
}
