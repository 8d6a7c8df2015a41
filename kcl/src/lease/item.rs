//! The lease item codec: [`Lease`] ↔ table attributes, in the Java KCL 2.x schema.
//!
//! Shared by every store, so the DynamoDB store and the in-memory one decode (and reject)
//! exactly the same items.

use std::collections::BTreeMap;

use super::{Lease, LeaseCounter, LeaseKey, MalformedLease, WorkerId};
use crate::record::ExtendedSequenceNumber;
use crate::shard::{HashKeyRange, ShardId};

/// Attribute names of the lease table (Java KCL 2.x schema, plus 3.x's `checkpointOwner`).
pub mod attr {
    /// Hash key: the shard id.
    pub const LEASE_KEY: &str = "leaseKey";
    /// The worker holding the lease.
    pub const LEASE_OWNER: &str = "leaseOwner";
    /// Fencing counter.
    pub const LEASE_COUNTER: &str = "leaseCounter";
    /// Checkpoint sequence number or sentinel.
    pub const CHECKPOINT: &str = "checkpoint";
    /// KPL sub-sequence of the checkpoint.
    pub const CHECKPOINT_SUB: &str = "checkpointSubSequenceNumber";
    /// Owner changes since the last checkpoint.
    pub const OWNER_SWITCHES: &str = "ownerSwitchesSinceCheckpoint";
    /// Parent shard ids (string set).
    pub const PARENTS: &str = "parentShardId";
    /// Child shard ids (string set).
    pub const CHILDREN: &str = "childShardIds";
    /// First hash key.
    pub const STARTING_HASH_KEY: &str = "startingHashKey";
    /// Last hash key.
    pub const ENDING_HASH_KEY: &str = "endingHashKey";
    /// Two-phase checkpoint: prepared sequence number.
    pub const PENDING_CHECKPOINT: &str = "pendingCheckpoint";
    /// Two-phase checkpoint: prepared sub-sequence number.
    pub const PENDING_CHECKPOINT_SUB: &str = "pendingCheckpointSubSequenceNumber";
    /// Two-phase checkpoint: application state.
    pub const PENDING_CHECKPOINT_STATE: &str = "pendingCheckpointState";
    /// Graceful handoff: the previous owner (Java KCL 3.x).
    pub const CHECKPOINT_OWNER: &str = "checkpointOwner";
    /// This library's: the stream time (epoch milliseconds) a `LATEST` checkpoint stood for
    /// when the shard was first read.
    pub const LATEST_RESOLVED_AT: &str = "latestResolvedAt";
    /// Java KCL 3.x stores other entities in the table; only `LEASE` (or none) are leases.
    pub const ENTITY_TYPE: &str = "entityType";
    /// Number (Java KCL 3.x): the shard's recent throughput, KiB per second.
    pub const THROUGHPUT: &str = "throughputKBps";
    /// Multi-stream leases (Java KCL): the stream identifier, `account:stream:creationEpoch`.
    pub const STREAM_NAME: &str = "streamName";
    /// Multi-stream leases (Java KCL): the shard id (the key's last part).
    pub const SHARD_ID: &str = "shardId";
}

/// A table attribute value, independent of any SDK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttrValue {
    /// String.
    S(String),
    /// Number, in its decimal string form.
    N(String),
    /// String set.
    Ss(Vec<String>),
    /// Binary.
    B(Vec<u8>),
    /// Any other type (bool, list, map, …), kept only to be reported.
    Other(&'static str),
}

/// One table item.
pub type Item = BTreeMap<String, AttrValue>;

/// Encodes a lease as a full item (for `PutItem`).
pub fn encode(lease: &Lease) -> Item {
    let mut item = Item::new();
    let s = |v: &str| AttrValue::S(v.to_owned());
    let n = |v: u64| AttrValue::N(v.to_string());
    item.insert(attr::LEASE_KEY.into(), s(lease.key.as_str()));
    if let Some(o) = &lease.owner {
        item.insert(attr::LEASE_OWNER.into(), s(o.as_str()));
    }
    item.insert(attr::LEASE_COUNTER.into(), n(lease.counter.0));
    item.insert(
        attr::CHECKPOINT.into(),
        s(lease.checkpoint.checkpoint_str()),
    );
    item.insert(
        attr::CHECKPOINT_SUB.into(),
        n(lease.checkpoint.sub_sequence()),
    );
    item.insert(
        attr::OWNER_SWITCHES.into(),
        n(lease.owner_switches_since_checkpoint),
    );
    // DynamoDB rejects empty sets: absent means none.
    if !lease.parent_shard_ids.is_empty() {
        item.insert(attr::PARENTS.into(), ids(&lease.parent_shard_ids));
    }
    if !lease.child_shard_ids.is_empty() {
        item.insert(attr::CHILDREN.into(), ids(&lease.child_shard_ids));
    }
    if let Some(r) = &lease.hash_range {
        item.insert(attr::STARTING_HASH_KEY.into(), s(&r.start().to_string()));
        item.insert(attr::ENDING_HASH_KEY.into(), s(&r.end().to_string()));
    }
    if let Some(p) = &lease.pending_checkpoint {
        item.insert(attr::PENDING_CHECKPOINT.into(), s(p.checkpoint_str()));
        item.insert(attr::PENDING_CHECKPOINT_SUB.into(), n(p.sub_sequence()));
    }
    if let Some(state) = lease
        .pending_checkpoint_state
        .as_ref()
        .filter(|s| !s.is_empty())
    {
        item.insert(
            attr::PENDING_CHECKPOINT_STATE.into(),
            AttrValue::B(state.to_vec()),
        );
    }
    if let Some(o) = &lease.checkpoint_owner {
        item.insert(attr::CHECKPOINT_OWNER.into(), s(o.as_str()));
    }
    if let Some(t) = lease.latest_resolved_at {
        item.insert(attr::LATEST_RESOLVED_AT.into(), n(epoch_millis(t)));
    }
    if let Some(bps) = lease.throughput {
        item.insert(attr::THROUGHPUT.into(), throughput_kbps(bps));
    }
    if let Some(stream) = lease.key.stream() {
        item.insert(attr::STREAM_NAME.into(), s(&stream.to_string()));
        item.insert(attr::SHARD_ID.into(), s(lease.key.shard_id().as_str()));
    }
    item
}

/// `throughputKBps` for `bytes_per_sec`: KiB per second with at most three decimals, in the
/// canonical form DynamoDB stores numbers in (`12.5`, `0`; never `12.500`), so an item read
/// back compares equal to what was written.
pub fn throughput_kbps(bytes_per_sec: u64) -> AttrValue {
    let fixed = format!("{:.3}", bytes_per_sec as f64 / 1024.0);
    let trimmed = fixed.trim_end_matches('0').trim_end_matches('.');
    AttrValue::N(trimmed.to_owned())
}

/// Bytes per second from a `throughputKBps` value (the Java KCL writes a double).
pub(crate) fn parse_throughput(v: &str) -> Result<u64, String> {
    match v.parse::<f64>() {
        Ok(k) if k.is_finite() && k >= 0.0 => Ok((k * 1024.0).round() as u64),
        _ => Err(format!("expected a non-negative number, got {v:?}")),
    }
}

/// Milliseconds since the Unix epoch (0 for earlier times).
pub fn epoch_millis(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// String-set value of shard ids.
pub fn ids(ids: &[ShardId]) -> AttrValue {
    AttrValue::Ss(ids.iter().map(|i| i.as_str().to_owned()).collect())
}

/// Decodes an item. `Ok(None)` for items that are not leases (`entityType` other than `LEASE`).
///
/// # Errors
/// [`MalformedLease`] naming the first missing or malformed attribute.
pub fn decode(item: &Item) -> Result<Option<Lease>, MalformedLease> {
    match item.get(attr::ENTITY_TYPE) {
        None => {}
        Some(AttrValue::S(t)) if t == "LEASE" => {}
        Some(_) => return Ok(None),
    }
    let key = match item.get(attr::LEASE_KEY) {
        Some(AttrValue::S(k)) if !k.is_empty() => k.clone(),
        Some(other) => {
            return Err(MalformedLease::new(
                None,
                attr::LEASE_KEY,
                format!("expected a non-empty string, got {other:?}"),
            ))
        }
        None => return Err(MalformedLease::new(None, attr::LEASE_KEY, "missing")),
    };
    let bad = |attribute: &'static str, reason: String| {
        MalformedLease::new(Some(key.clone()), attribute, reason)
    };
    let opt_s = |name: &'static str| -> Result<Option<&str>, MalformedLease> {
        match item.get(name) {
            None => Ok(None),
            Some(AttrValue::S(v)) => Ok(Some(v.as_str())),
            Some(other) => Err(bad(name, format!("expected a string, got {other:?}"))),
        }
    };
    let opt_n = |name: &'static str| -> Result<Option<u64>, MalformedLease> {
        match item.get(name) {
            None => Ok(None),
            Some(AttrValue::N(v)) => v
                .parse::<u64>()
                .map(Some)
                .map_err(|_| bad(name, format!("expected a non-negative integer, got {v:?}"))),
            Some(other) => Err(bad(name, format!("expected a number, got {other:?}"))),
        }
    };
    let opt_ss = |name: &'static str| -> Result<Vec<ShardId>, MalformedLease> {
        match item.get(name) {
            None => Ok(Vec::new()),
            Some(AttrValue::Ss(v)) => {
                let mut ids: Vec<ShardId> = v.iter().map(|s| ShardId::new(s.as_str())).collect();
                ids.sort();
                Ok(ids)
            }
            Some(other) => Err(bad(name, format!("expected a string set, got {other:?}"))),
        }
    };
    let counter =
        opt_n(attr::LEASE_COUNTER)?.ok_or_else(|| bad(attr::LEASE_COUNTER, "missing".into()))?;
    let checkpoint_str =
        opt_s(attr::CHECKPOINT)?.ok_or_else(|| bad(attr::CHECKPOINT, "missing".into()))?;
    let checkpoint = ExtendedSequenceNumber::parse(checkpoint_str, opt_n(attr::CHECKPOINT_SUB)?)
        .map_err(|e| bad(attr::CHECKPOINT, e.to_string()))?;
    let pending_checkpoint = match opt_s(attr::PENDING_CHECKPOINT)? {
        None => None,
        Some(p) => Some(
            ExtendedSequenceNumber::parse(p, opt_n(attr::PENDING_CHECKPOINT_SUB)?)
                .map_err(|e| bad(attr::PENDING_CHECKPOINT, e.to_string()))?,
        ),
    };
    // Binary, as the Java KCL writes it on updates. (Its full-item encoder writes a number
    // there by mistake; such a value carries no state and is ignored.)
    let pending_checkpoint_state = match item.get(attr::PENDING_CHECKPOINT_STATE) {
        Some(AttrValue::B(b)) if !b.is_empty() => Some(bytes::Bytes::from(b.clone())),
        Some(AttrValue::B(_) | AttrValue::N(_)) | None => None,
        Some(other) => {
            return Err(bad(
                attr::PENDING_CHECKPOINT_STATE,
                format!("expected binary, got {other:?}"),
            ))
        }
    };
    let hash_range = match (
        opt_s(attr::STARTING_HASH_KEY)?,
        opt_s(attr::ENDING_HASH_KEY)?,
    ) {
        (Some(s), Some(e)) => Some(
            HashKeyRange::parse(s, e)
                .map_err(|err| bad(attr::STARTING_HASH_KEY, err.to_string()))?,
        ),
        (None, None) => None,
        (Some(_), None) => return Err(bad(attr::ENDING_HASH_KEY, "missing".into())),
        (None, Some(_)) => return Err(bad(attr::STARTING_HASH_KEY, "missing".into())),
    };
    // Multi-stream leases repeat their key's parts; a disagreement means the item is not what
    // its key says.
    if let Some(stream) = opt_s(attr::STREAM_NAME)? {
        let shard = opt_s(attr::SHARD_ID)?.ok_or_else(|| bad(attr::SHARD_ID, "missing".into()))?;
        if key != format!("{stream}:{shard}") {
            return Err(bad(
                attr::STREAM_NAME,
                format!("{stream:?} and shardId {shard:?} do not make the lease key"),
            ));
        }
    }
    let owner = match opt_s(attr::LEASE_OWNER)? {
        Some("") => return Err(bad(attr::LEASE_OWNER, "empty".into())),
        other => other.map(WorkerId::new),
    };
    Ok(Some(Lease {
        key: LeaseKey::new(key.clone()),
        owner,
        counter: LeaseCounter(counter),
        checkpoint,
        owner_switches_since_checkpoint: opt_n(attr::OWNER_SWITCHES)?.unwrap_or(0),
        parent_shard_ids: opt_ss(attr::PARENTS)?,
        child_shard_ids: opt_ss(attr::CHILDREN)?,
        hash_range,
        pending_checkpoint,
        pending_checkpoint_state,
        checkpoint_owner: opt_s(attr::CHECKPOINT_OWNER)?.map(WorkerId::new),
        latest_resolved_at: opt_n(attr::LATEST_RESOLVED_AT)?
            .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)),
        throughput: match item.get(attr::THROUGHPUT) {
            None => None,
            Some(AttrValue::N(v)) => {
                Some(parse_throughput(v).map_err(|e| bad(attr::THROUGHPUT, e))?)
            }
            Some(other) => {
                return Err(bad(
                    attr::THROUGHPUT,
                    format!("expected a number, got {other:?}"),
                ))
            }
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SequenceNumber;

    type Mutation = Box<dyn Fn(&mut Item)>;

    fn full_lease() -> Lease {
        let mut l = Lease::new(
            &ShardId::new("shardId-000000000003"),
            ExtendedSequenceNumber::at(
                SequenceNumber::parse("49590338271490256608559692538361571095921575989136588898")
                    .unwrap(),
                7,
            ),
        )
        .with_parents([
            ShardId::new("shardId-000000000001"),
            ShardId::new("shardId-000000000000"),
        ])
        .with_hash_range(HashKeyRange::new(5, u128::MAX).unwrap());
        l.owner = Some(WorkerId::new("w1"));
        l.counter = LeaseCounter(42);
        l.owner_switches_since_checkpoint = 2;
        l.child_shard_ids = vec![ShardId::new("shardId-000000000009")];
        l.throughput = Some(5_120);
        l
    }

    #[test]
    fn throughput_is_read_as_the_java_kcl_writes_it() {
        let mut item = encode(&full_lease());
        assert_eq!(item[attr::THROUGHPUT], AttrValue::N("5".into()));
        assert_eq!(throughput_kbps(12_800), AttrValue::N("12.5".into()));
        assert_eq!(throughput_kbps(0), AttrValue::N("0".into()));
        assert_eq!(throughput_kbps(1_000), AttrValue::N("0.977".into()));
        item.insert(attr::THROUGHPUT.into(), AttrValue::N("12.5".into()));
        assert_eq!(decode(&item).unwrap().unwrap().throughput, Some(12_800));
        for bad in ["-1", "NaN", "fast"] {
            item.insert(attr::THROUGHPUT.into(), AttrValue::N(bad.into()));
            let e = decode(&item).unwrap_err();
            assert!(e.to_string().contains(attr::THROUGHPUT), "{e}");
        }
    }

    #[test]
    fn round_trips() {
        let l = full_lease();
        assert_eq!(decode(&encode(&l)).unwrap(), Some(l));
        let bare = Lease::new(&ShardId::new("s"), ExtendedSequenceNumber::TrimHorizon);
        assert_eq!(decode(&encode(&bare)).unwrap(), Some(bare));
    }

    #[test]
    fn other_entities_are_skipped() {
        let mut item = encode(&full_lease());
        item.insert(
            attr::ENTITY_TYPE.into(),
            AttrValue::S("WORKER_METRICS".into()),
        );
        assert_eq!(decode(&item).unwrap(), None);
    }

    #[test]
    fn malformed_items_name_the_attribute() {
        let cases: Vec<(&str, Mutation)> = vec![
            (
                attr::LEASE_KEY,
                Box::new(|i| {
                    i.remove(attr::LEASE_KEY);
                }),
            ),
            (
                attr::LEASE_COUNTER,
                Box::new(|i| {
                    i.remove(attr::LEASE_COUNTER);
                }),
            ),
            (
                attr::LEASE_COUNTER,
                Box::new(|i| {
                    i.insert(attr::LEASE_COUNTER.into(), AttrValue::S("1".into()));
                }),
            ),
            (
                attr::CHECKPOINT,
                Box::new(|i| {
                    i.insert(attr::CHECKPOINT.into(), AttrValue::S("12abc".into()));
                }),
            ),
            (
                attr::CHECKPOINT,
                Box::new(|i| {
                    i.remove(attr::CHECKPOINT);
                }),
            ),
            (
                attr::PARENTS,
                Box::new(|i| {
                    i.insert(attr::PARENTS.into(), AttrValue::S("x".into()));
                }),
            ),
            (
                attr::STARTING_HASH_KEY,
                Box::new(|i| {
                    i.insert(attr::STARTING_HASH_KEY.into(), AttrValue::S("-1".into()));
                }),
            ),
        ];
        for (attribute, mutate) in cases {
            let mut item = encode(&full_lease());
            mutate(&mut item);
            let err = decode(&item).unwrap_err();
            assert_eq!(err.attribute(), attribute, "{err}");
        }
    }
}
