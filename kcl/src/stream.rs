//! Streams of a multi-stream application, named as the Java KCL names them.
//!
//! A worker reads one stream (single-stream mode: lease keys are shard ids, as always) or
//! several (multi-stream mode). In multi-stream mode every lease key is
//! `account:stream:creationEpoch:shardId`, and the lease also stores `streamName`
//! (`account:stream:creationEpoch`, the *stream identifier*) and `shardId`: the Java KCL's
//! multi-stream schema, so a Java multi-stream application's table is read and written as it is.
//! The creation epoch (seconds) tells a stream apart from an older one of the same name.
//!
//! Parent and child shard ids stay plain shard ids; they name shards of the lease's own stream.

use std::fmt;
use std::str::FromStr;

use crate::lease::LeaseKey;
use crate::shard::ShardId;

/// A stream of a multi-stream application: `account:name:creationEpoch`.
///
/// ```
/// use kcl::stream::StreamIdentifier;
///
/// let id: StreamIdentifier = "123456789012:orders:1700000000".parse()?;
/// assert_eq!(id.name(), "orders");
/// assert_eq!(id.to_string(), "123456789012:orders:1700000000");
/// # Ok::<(), kcl::stream::InvalidStreamIdentifier>(())
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamIdentifier {
    account: String,
    name: String,
    creation_epoch: u64,
}

/// A string that is not `account:name:creationEpoch`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a stream identifier (account:stream:creationEpoch): {reason}")]
pub struct InvalidStreamIdentifier {
    /// What was given.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl StreamIdentifier {
    /// The identifier of stream `name` of `account`, created at `creation_epoch` (seconds).
    ///
    /// # Errors
    /// An empty or non-numeric account, a name that is empty or holds `:`, or an epoch of 0.
    ///
    /// ```
    /// let id = kcl::stream::StreamIdentifier::new("000000000000", "orders", 1_700_000_000)?;
    /// assert_eq!(id.creation_epoch(), 1_700_000_000);
    /// # Ok::<(), kcl::stream::InvalidStreamIdentifier>(())
    /// ```
    pub fn new(
        account: impl Into<String>,
        name: impl Into<String>,
        creation_epoch: u64,
    ) -> Result<Self, InvalidStreamIdentifier> {
        let (account, name) = (account.into(), name.into());
        let bad = |reason| InvalidStreamIdentifier {
            value: format!("{account}:{name}:{creation_epoch}"),
            reason,
        };
        if account.is_empty() || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the account must be digits"));
        }
        if name.is_empty() || name.contains(':') {
            return Err(bad("the stream name must be non-empty, without ':'"));
        }
        if creation_epoch == 0 {
            return Err(bad("the creation epoch must be above 0"));
        }
        Ok(Self {
            account,
            name,
            creation_epoch,
        })
    }

    /// The account id.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// When the stream was created, seconds since the Unix epoch.
    pub fn creation_epoch(&self) -> u64 {
        self.creation_epoch
    }

    /// The lease key of `shard` of this stream: `account:name:epoch:shardId`.
    ///
    /// ```
    /// let id: kcl::stream::StreamIdentifier = "1:orders:2".parse()?;
    /// let key = id.lease_key(&kcl::ShardId::new("shardId-000000000000"));
    /// assert_eq!(key.as_str(), "1:orders:2:shardId-000000000000");
    /// # Ok::<(), kcl::stream::InvalidStreamIdentifier>(())
    /// ```
    pub fn lease_key(&self, shard: &ShardId) -> LeaseKey {
        LeaseKey::new(format!("{self}:{shard}"))
    }

    /// The stream a multi-stream lease key belongs to, or `None` for a single-stream key (a
    /// bare shard id) or anything else.
    ///
    /// ```
    /// use kcl::lease::LeaseKey;
    /// use kcl::stream::StreamIdentifier;
    ///
    /// let of = |k: &str| StreamIdentifier::of_key(&LeaseKey::new(k)).map(|s| s.to_string());
    /// assert_eq!(of("1:orders:2:shardId-0").as_deref(), Some("1:orders:2"));
    /// assert_eq!(of("shardId-0"), None);
    /// ```
    pub fn of_key(key: &LeaseKey) -> Option<Self> {
        let (stream, shard) = key.as_str().rsplit_once(':')?;
        if shard.is_empty() {
            return None;
        }
        stream.parse().ok()
    }
}

impl FromStr for StreamIdentifier {
    type Err = InvalidStreamIdentifier;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| InvalidStreamIdentifier {
            value: s.to_owned(),
            reason,
        };
        let mut parts = s.split(':');
        let (Some(account), Some(name), Some(epoch), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected three ':'-separated parts"));
        };
        let epoch = epoch
            .parse::<u64>()
            .map_err(|_| bad("the creation epoch must be a number"))?;
        Self::new(account, name, epoch).map_err(|e| bad(e.reason))
    }
}

impl fmt::Display for StreamIdentifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.account, self.name, self.creation_epoch)
    }
}

impl fmt::Debug for StreamIdentifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// The account id in a Kinesis stream ARN (`arn:aws:kinesis:region:account:stream/name`).
pub(crate) fn account_of_arn(arn: &str) -> Option<&str> {
    let mut parts = arn.split(':');
    let (Some("arn"), _, Some("kinesis"), _, Some(account)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    (!account.is_empty() && account.bytes().all(|b| b.is_ascii_digit())).then_some(account)
}

/// What a lease table holds, by its keys: single-stream leases, multi-stream leases, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableMode {
    Empty,
    Single,
    Multi,
    Mixed,
}

/// Whether the keys are single-stream (bare shard ids) or multi-stream keys.
pub(crate) fn table_mode<'a>(keys: impl IntoIterator<Item = &'a LeaseKey>) -> TableMode {
    let (mut single, mut multi) = (false, false);
    for key in keys {
        match StreamIdentifier::of_key(key) {
            Some(_) => multi = true,
            None => single = true,
        }
    }
    match (single, multi) {
        (false, false) => TableMode::Empty,
        (true, false) => TableMode::Single,
        (false, true) => TableMode::Multi,
        (true, true) => TableMode::Mixed,
    }
}

/// Refuses a table whose leases are of the other mode than this worker's: a single-stream
/// worker would take other streams' leases for shards of its own stream (and delete them as
/// shards gone from it); a multi-stream worker would do the same to a single-stream table.
pub(crate) fn check_table_mode<'a>(
    multi_stream: bool,
    keys: impl IntoIterator<Item = &'a LeaseKey> + Clone,
) -> Result<(), String> {
    let example = |want_multi: bool| {
        keys.clone()
            .into_iter()
            .find(|k| StreamIdentifier::of_key(k).is_some() == want_multi)
            .map(|k| k.to_string())
            .unwrap_or_default()
    };
    match (multi_stream, table_mode(keys.clone())) {
        (_, TableMode::Empty) | (false, TableMode::Single) | (true, TableMode::Multi) => Ok(()),
        (_, TableMode::Mixed) => Err(format!(
            "the lease table mixes single-stream leases (e.g. {:?}) and multi-stream leases \
             (e.g. {:?}); use one table per mode",
            example(false),
            example(true)
        )),
        (false, _) => Err(format!(
            "this worker reads one stream, but the lease table holds multi-stream leases \
             (e.g. {:?}, account:stream:creationEpoch:shardId); configure the streams with \
             `streams` or use another table",
            example(true)
        )),
        (true, _) => Err(format!(
            "this worker reads several streams, but the lease table holds single-stream \
             leases (e.g. {:?}); use another table for the multi-stream application",
            example(false)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_parse_and_refuse() {
        let ok = ["1:s:1", "123456789012:orders.v2-x_y:1700000000"];
        for s in ok {
            assert_eq!(s.parse::<StreamIdentifier>().unwrap().to_string(), s);
        }
        let bad = [
            "orders",
            "1:orders",
            "1:orders:0",
            "x:orders:1",
            ":orders:1",
            "1::1",
            "1:orders:1:shard",
            "1:orders:-1",
        ];
        for s in bad {
            assert!(s.parse::<StreamIdentifier>().is_err(), "{s} accepted");
        }
    }

    #[test]
    fn keys_name_their_stream_and_shard() {
        let id: StreamIdentifier = "1:orders:2".parse().unwrap();
        let key = id.lease_key(&ShardId::new("shardId-000000000001"));
        assert_eq!(StreamIdentifier::of_key(&key), Some(id));
        assert_eq!(key.shard_id(), ShardId::new("shardId-000000000001"));
        for single in ["shardId-000000000001", "a:b", "1:orders:2:"] {
            assert_eq!(
                StreamIdentifier::of_key(&LeaseKey::new(single)),
                None,
                "{single}"
            );
        }
    }

    #[test]
    fn arns_give_their_account() {
        assert_eq!(
            account_of_arn("arn:aws:kinesis:us-east-1:123456789012:stream/orders"),
            Some("123456789012")
        );
        assert_eq!(account_of_arn("arn:aws:s3:::bucket"), None);
        assert_eq!(account_of_arn("orders"), None);
    }

    #[test]
    fn table_modes() {
        let k = |s: &str| LeaseKey::new(s);
        let single = [k("shardId-0"), k("shardId-1")];
        let multi = [k("1:a:2:shardId-0"), k("1:b:2:shardId-0")];
        let mixed = [k("shardId-0"), k("1:b:2:shardId-0")];
        let cases: [(&str, bool, &[LeaseKey], Option<&str>); 7] = [
            ("empty single", false, &[], None),
            ("empty multi", true, &[], None),
            ("single single", false, &single, None),
            ("multi multi", true, &multi, None),
            (
                "single meets multi",
                false,
                &multi,
                Some("holds multi-stream leases (e.g. \"1:a:2:shardId-0\""),
            ),
            (
                "multi meets single",
                true,
                &single,
                Some("holds single-stream leases (e.g. \"shardId-0\")"),
            ),
            ("mixed", true, &mixed, Some("mixes single-stream leases")),
        ];
        for (name, multi_stream, keys, want) in cases {
            let got = check_table_mode(multi_stream, keys.iter());
            match want {
                None => assert!(got.is_ok(), "{name}: {got:?}"),
                Some(text) => {
                    let e = got.expect_err(name);
                    assert!(e.contains(text), "{name}: {e}");
                }
            }
        }
    }
}
