//! The lease-store conformance suite: what every [`LeaseStore`] must do, checked end to end.
//!
//! [`MemLeaseStore`] and `kcl::lease::dynamo::DynamoLeaseStore` (against
//! DynamoDB, moto and dynalite) both pass it; run it against your own implementation too. Each
//! check panics with a message naming the case and the violation, so it is meant to be called
//! from a test:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use kcl::testkit::{conformance, MemLeaseStore};
//!
//! conformance::run_all(&MemLeaseStore::new()).await;
//! # }
//! ```
//!
//! The suite works in a table that already holds other items: every run uses lease keys of its
//! own (`conformance-<unique>-<case>`) and only ever looks at those. It leaves its leases (and a
//! few deliberately malformed or non-lease items) behind, so point it at a test table.
//!
//! - [`run_protocol`] needs only the [`LeaseStore`] trait: create, get, list (across pages),
//!   renew, take, checkpoint, release, delete and the graceful handoff, with every fencing
//!   failure, writes to missing leases, and concurrent takes.
//! - [`run_raw_items`] also writes raw items through [`RawItems`]: items of other entity types
//!   are skipped, malformed leases are reported and never overwritten.
//! - [`run_all`] runs both.

use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::BoxFuture;

use super::MemLeaseStore;
use crate::lease::item::{self, attr, AttrValue, Item};
use crate::lease::{Lease, LeaseCounter, LeaseKey, LeaseStore, LeaseStoreError, WorkerId};
use crate::record::{ExtendedSequenceNumber, SequenceNumber};
use crate::shard::{HashKeyRange, ShardId};

/// Raw access to a lease table's items, bypassing the codec and every condition: how the suite
/// plants items that are not leases, or leases that do not decode.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kcl::LeaseStoreError> {
/// use kcl::lease::item::{attr, AttrValue, Item};
/// use kcl::testkit::conformance::RawItems;
/// use kcl::testkit::MemLeaseStore;
/// use kcl::LeaseStore;
///
/// let store = MemLeaseStore::new();
/// let mut item = Item::new();
/// item.insert(attr::LEASE_KEY.into(), AttrValue::S("shardId-000000000000".into()));
/// item.insert(attr::LEASE_COUNTER.into(), AttrValue::S("one".into()));
/// store.put_raw(item).await?;
/// assert_eq!(store.list().await?.malformed.len(), 1);
/// # Ok(())
/// # }
/// ```
pub trait RawItems: Send + Sync {
    /// Writes `item` as it is, replacing any item with the same `leaseKey`.
    fn put_raw(&self, item: Item) -> BoxFuture<'_, Result<(), LeaseStoreError>>;

    /// Reads the item with `leaseKey` = `key` as it is stored, if the store can (`None`: it
    /// cannot, and the suite checks what it can through [`LeaseStore`] instead).
    fn get_raw<'a>(
        &'a self,
        key: &'a str,
    ) -> Option<BoxFuture<'a, Result<Option<Item>, LeaseStoreError>>> {
        let _ = key;
        None
    }
}

impl RawItems for MemLeaseStore {
    fn put_raw(&self, item: Item) -> BoxFuture<'_, Result<(), LeaseStoreError>> {
        self.put_raw_item(item);
        Box::pin(async { Ok(()) })
    }
}

/// Runs the whole suite: [`run_protocol`], then [`run_raw_items`].
///
/// # Panics
/// On the first violation, with a message naming the case.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// kcl::testkit::conformance::run_all(&kcl::testkit::MemLeaseStore::new()).await;
/// # }
/// ```
pub async fn run_all<S>(store: &S)
where
    S: LeaseStore + RawItems,
{
    run_protocol(store).await;
    run_raw_items(store, store).await;
}

/// [`run_all`] without the concurrent-writes case, for servers that do not apply conditional
/// writes atomically under concurrent requests (moto: two of six concurrent takes with the same
/// counter have been seen to succeed on a loaded machine). DynamoDB, dynalite and the in-memory
/// store must pass [`run_all`].
///
/// # Panics
/// On the first violation, with a message naming the case.
pub async fn run_all_serial<S>(store: &S)
where
    S: LeaseStore + RawItems,
{
    run_protocol_cases(store, false).await;
    run_raw_items(store, store).await;
}

/// Every operation of the protocol and every fencing failure, through the [`LeaseStore`]
/// trait alone. Calls [`LeaseStore::ensure_table`] (twice) first.
///
/// # Panics
/// On the first violation, with a message naming the case.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// kcl::testkit::conformance::run_protocol(&kcl::testkit::MemLeaseStore::new()).await;
/// # }
/// ```
pub async fn run_protocol(store: &dyn LeaseStore) {
    run_protocol_cases(store, true).await;
}

async fn run_protocol_cases(store: &dyn LeaseStore, concurrent: bool) {
    let cx = Cx::new(store);
    ensure_table_is_idempotent(&cx).await;
    create_if_absent_creates_once(&cx).await;
    leases_round_trip(&cx).await;
    list_reads_every_page(&cx).await;
    renew(&cx).await;
    take(&cx).await;
    checkpoint(&cx).await;
    checkpoint_with_children(&cx).await;
    release(&cx).await;
    resolve_latest(&cx).await;
    two_phase_checkpoint(&cx).await;
    eventually_consistent_list(&cx).await;
    worker_liveness(&cx).await;
    draining_worker(&cx).await;
    delete(&cx).await;
    graceful_handoff(&cx).await;
    withdrawn_handoff(&cx).await;
    handoff_ended_by_a_take(&cx).await;
    missing_leases_fail_every_write(&cx).await;
    if concurrent {
        concurrent_takes_have_one_winner(&cx).await;
    }
}

/// The cases that plant raw items: items of other entity types are skipped (neither leases nor
/// malformed), and [`malformed_leases_are_reported`].
///
/// # Panics
/// On the first violation, with a message naming the case.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = kcl::testkit::MemLeaseStore::new();
/// kcl::testkit::conformance::run_raw_items(&store, &store).await;
/// # }
/// ```
pub async fn run_raw_items(store: &dyn LeaseStore, raw: &dyn RawItems) {
    let cx = Cx::new(store);
    other_entities_are_skipped(&cx, raw).await;
    malformed_leases_are_reported(store, raw, &cx.prefix).await;
}

/// Items whose `entityType` is not `LEASE` are not leases: `list` skips them (neither leases
/// nor malformed), `get` returns `None`. Items with `entityType` `LEASE` are leases.
async fn other_entities_are_skipped(cx: &Cx<'_>, raw: &dyn RawItems) {
    const CASE: &str = "other entity types are skipped";
    let store = cx.store;
    let metrics = cx.full_lease("worker-metrics");
    let mut item = item::encode(&metrics);
    item.insert(
        attr::ENTITY_TYPE.into(),
        AttrValue::S("WORKER_METRICS_STATS".into()),
    );
    must(CASE, "put_raw", raw.put_raw(item).await);
    // Not a lease, so not malformed either, whatever else it holds.
    let odd_key = cx.key("coordinator-state");
    let mut odd = Item::new();
    odd.insert(attr::LEASE_KEY.into(), AttrValue::S(odd_key.clone()));
    odd.insert(attr::ENTITY_TYPE.into(), AttrValue::S("COORDINATOR".into()));
    odd.insert(
        attr::LEASE_COUNTER.into(),
        AttrValue::S("not a number".into()),
    );
    must(CASE, "put_raw", raw.put_raw(odd).await);
    // An explicit LEASE entity is a lease.
    let explicit = cx.full_lease("explicit-lease-entity");
    let mut item = item::encode(&explicit);
    item.insert(attr::ENTITY_TYPE.into(), AttrValue::S("LEASE".into()));
    must(CASE, "put_raw", raw.put_raw(item).await);

    let table = must(CASE, "list", store.list().await);
    for key in [metrics.key.as_str(), odd_key.as_str()] {
        check(
            !table.leases.iter().any(|l| l.key.as_str() == key),
            CASE,
            format!("list returned the non-lease item {key:?} as a lease"),
        );
        check(
            !table.malformed.iter().any(|m| m.key() == Some(key)),
            CASE,
            format!("list reported the non-lease item {key:?} as a malformed lease"),
        );
        let got = must(CASE, "get", store.get(&LeaseKey::new(key)).await);
        check(
            got.is_none(),
            CASE,
            format!("get({key:?}) returned {got:?}, expected None"),
        );
    }
    let listed = find(&table.leases, &explicit.key);
    check(
        listed == Some(&explicit),
        CASE,
        format!("an entityType LEASE item lists as {listed:?}, expected {explicit:?}"),
    );
}

/// Leases that do not decode are reported by `list` (naming the attribute at fault) beside the
/// leases that do, `get` fails with [`LeaseStoreError::Malformed`], and `create_if_absent` does
/// not overwrite them. Keys are `<prefix>-bad-*` and `<prefix>-good-*`.
///
/// Returns the keys of the malformed items with the attribute each must be reported for.
///
/// # Panics
/// On the first violation, with a message naming the case.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use kcl::testkit::{conformance, MemLeaseStore};
///
/// let store = MemLeaseStore::new();
/// let bad = conformance::malformed_leases_are_reported(&store, &store, "t1").await;
/// let table = kcl::LeaseStore::list(&store).await.unwrap();
/// assert_eq!(table.malformed.len(), bad.len());
/// # }
/// ```
pub async fn malformed_leases_are_reported(
    store: &dyn LeaseStore,
    raw: &dyn RawItems,
    prefix: &str,
) -> Vec<(String, &'static str)> {
    const CASE: &str = "malformed leases are reported";
    let key = |name: &str| format!("{prefix}-{name}");
    let good: Vec<Lease> = (0..2)
        .map(|i| full_lease(&ShardId::new(key(&format!("good-{i}")))))
        .collect();
    let template = &good[0];
    // (key, the attribute at fault, the attribute's bad value: `None` removes it)
    let cases = [
        ("bad-missing-counter", attr::LEASE_COUNTER, None),
        (
            "bad-checkpoint",
            attr::CHECKPOINT,
            Some(AttrValue::S("12abc".into())),
        ),
        (
            "bad-counter-type",
            attr::LEASE_COUNTER,
            Some(AttrValue::S("7".into())),
        ),
        (
            "bad-parents-type",
            attr::PARENTS,
            Some(AttrValue::S("shardId-000000000000".into())),
        ),
        (
            "bad-switches-type",
            attr::OWNER_SWITCHES,
            Some(AttrValue::Other("BOOL")),
        ),
    ];
    let mut planted = Vec::new();
    for (name, attribute, value) in cases {
        let k = key(name);
        let mut item = item::encode(template);
        item.insert(attr::LEASE_KEY.into(), AttrValue::S(k.clone()));
        match value {
            Some(v) => item.insert(attribute.into(), v),
            None => item.remove(attribute),
        };
        must(CASE, "put_raw", raw.put_raw(item.clone()).await);
        planted.push((k, attribute, item));
    }
    for l in &good {
        check(
            must(CASE, "create_if_absent", store.create_if_absent(l).await),
            CASE,
            format!("create_if_absent({}) on a fresh key returned false", l.key),
        );
    }

    let table = must(CASE, "list", store.list().await);
    for l in &good {
        let listed = find(&table.leases, &l.key);
        check(
            listed == Some(l),
            CASE,
            format!(
                "the valid lease {} beside malformed ones lists as {listed:?}, expected {l:?}",
                l.key
            ),
        );
    }
    for (k, attribute, item) in &planted {
        check(
            !table.leases.iter().any(|l| l.key.as_str() == k),
            CASE,
            format!("list returned the malformed item {k:?} as a lease"),
        );
        let reported: Vec<_> = table
            .malformed
            .iter()
            .filter(|m| m.key() == Some(k.as_str()))
            .collect();
        check(
            reported.len() == 1 && reported[0].attribute() == *attribute,
            CASE,
            format!(
                "list must report {k:?} once as malformed in attribute {attribute}, got {reported:?}"
            ),
        );
        match store.get(&LeaseKey::new(k.as_str())).await {
            Err(LeaseStoreError::Malformed(m)) => check(
                m.attribute() == *attribute && m.key() == Some(k.as_str()),
                CASE,
                format!(
                    "get({k:?}) blamed {:?} / {:?}, expected {attribute}",
                    m.key(),
                    m.attribute()
                ),
            ),
            other => fail(
                CASE,
                format!(
                    "get({k:?}) of a malformed item returned {other:?}, expected Err(Malformed)"
                ),
            ),
        }
        // Creating a lease for the shard must not overwrite what is there.
        let replacement = Lease::new(&ShardId::new(k.as_str()), ExtendedSequenceNumber::Latest);
        let created = must(
            CASE,
            "create_if_absent",
            store.create_if_absent(&replacement).await,
        );
        check(
            !created,
            CASE,
            format!("create_if_absent overwrote the malformed item {k:?}"),
        );
        if let Some(read) = raw.get_raw(k) {
            let stored = must(CASE, "get_raw", read.await).map(normalized);
            check(
                stored == Some(normalized(item.clone())),
                CASE,
                format!("the malformed item {k:?} changed: stored {stored:?}, written {item:?}"),
            );
        }
    }
    let table = must(CASE, "list", store.list().await);
    for (k, _, _) in &planted {
        check(
            table.malformed.iter().any(|m| m.key() == Some(k.as_str())),
            CASE,
            format!("the malformed item {k:?} disappeared"),
        );
    }
    planted.into_iter().map(|(k, a, _)| (k, a)).collect()
}

/// The suite's view of the store: the store and this run's key prefix.
struct Cx<'a> {
    store: &'a dyn LeaseStore,
    prefix: String,
}

impl<'a> Cx<'a> {
    fn new(store: &'a dyn LeaseStore) -> Self {
        static RUN: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let prefix = format!(
            "conformance-{}-{}-{nanos:09}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed)
        );
        Self { store, prefix }
    }

    fn key(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn shard(&self, name: &str) -> ShardId {
        ShardId::new(self.key(name))
    }

    /// A new, unowned lease at `TRIM_HORIZON`.
    fn lease(&self, name: &str) -> Lease {
        Lease::new(&self.shard(name), ExtendedSequenceNumber::TrimHorizon)
            .with_hash_range(HashKeyRange::FULL)
    }

    /// A lease with every attribute set.
    fn full_lease(&self, name: &str) -> Lease {
        full_lease(&self.shard(name))
    }

    /// Creates `lease`, which must not exist yet.
    async fn create(&self, case: &str, lease: &Lease) {
        let created = must(
            case,
            "create_if_absent",
            self.store.create_if_absent(lease).await,
        );
        check(
            created,
            case,
            format!(
                "create_if_absent({}) on a fresh key returned false",
                lease.key
            ),
        );
    }

    /// Asserts the stored lease equals `expected` (`None`: absent).
    async fn expect_stored(&self, case: &str, key: &LeaseKey, expected: Option<&Lease>) {
        let got = must(case, "get", self.store.get(key).await);
        check(
            got.as_ref() == expected,
            case,
            format!("get({key}) returned {got:?}, expected {expected:?}"),
        );
    }
}

/// 56 digits, as real Kinesis sequence numbers are: more than a u128 holds.
const SEQ_56: &str = "49590338271490256608559692538361571095921575989136588898";

fn seq(digits: &str, sub: u64) -> ExtendedSequenceNumber {
    match SequenceNumber::parse(digits) {
        Ok(s) => ExtendedSequenceNumber::at(s, sub),
        Err(e) => panic!("lease store conformance: bad test sequence number: {e}"),
    }
}

fn full_lease(shard: &ShardId) -> Lease {
    let id = shard.as_str();
    let mut l = Lease::new(shard, seq(SEQ_56, 7))
        .with_parents([
            ShardId::new(format!("{id}-parent-b")),
            ShardId::new(format!("{id}-parent-a")),
        ])
        .with_hash_range(HashKeyRange::new(5, u128::MAX).unwrap_or(HashKeyRange::FULL));
    l.owner = Some(WorkerId::new("worker-1"));
    l.counter = LeaseCounter(42);
    l.owner_switches_since_checkpoint = 3;
    l.child_shard_ids = vec![
        ShardId::new(format!("{id}-child-1")),
        ShardId::new(format!("{id}-child-2")),
    ];
    l.pending_checkpoint = Some(seq(SEQ_56, 9));
    l.checkpoint_owner = Some(WorkerId::new("worker-0"));
    l
}

fn fail(case: &str, message: String) -> ! {
    panic!("lease store conformance: {case}: {message}")
}

fn check(ok: bool, case: &str, message: String) {
    if !ok {
        fail(case, message)
    }
}

fn must<T>(case: &str, op: &str, result: Result<T, LeaseStoreError>) -> T {
    match result {
        Ok(v) => v,
        Err(e) => fail(case, format!("{op} failed unexpectedly: {e} ({e:?})")),
    }
}

/// Asserts that a write failed its condition, blaming `key`.
fn condition_failed<T: std::fmt::Debug>(
    case: &str,
    what: &str,
    key: &LeaseKey,
    result: Result<T, LeaseStoreError>,
) {
    match result {
        Err(LeaseStoreError::ConditionFailed { key: k }) if &k == key => {}
        other => fail(
            case,
            format!("{what}: expected Err(ConditionFailed {{ key: {key} }}), got {other:?}"),
        ),
    }
}

/// Sets have no order: sorts them so items compare by content.
fn normalized(mut item: Item) -> Item {
    for v in item.values_mut() {
        if let AttrValue::Ss(ss) = v {
            ss.sort();
        }
    }
    item
}

fn find<'l>(leases: &'l [Lease], key: &LeaseKey) -> Option<&'l Lease> {
    let found: Vec<_> = leases.iter().filter(|l| &l.key == key).collect();
    match found.as_slice() {
        [] => None,
        [one] => Some(one),
        many => panic!(
            "lease store conformance: list returned {} leases with key {key}",
            many.len()
        ),
    }
}

async fn ensure_table_is_idempotent(cx: &Cx<'_>) {
    const CASE: &str = "ensure_table";
    must(
        CASE,
        "the first ensure_table",
        cx.store.ensure_table().await,
    );
    must(
        CASE,
        "the second ensure_table",
        cx.store.ensure_table().await,
    );
}

async fn create_if_absent_creates_once(cx: &Cx<'_>) {
    const CASE: &str = "create_if_absent";
    let first = cx.lease("create");
    cx.create(CASE, &first).await;
    cx.expect_stored(CASE, &first.key, Some(&first)).await;
    let mut second = cx.full_lease("create");
    second.owner = Some(WorkerId::new("intruder"));
    let created = must(
        CASE,
        "create_if_absent",
        cx.store.create_if_absent(&second).await,
    );
    check(
        !created,
        CASE,
        "a second create_if_absent for an existing key returned true".into(),
    );
    cx.expect_stored(CASE, &first.key, Some(&first)).await;
}

async fn leases_round_trip(cx: &Cx<'_>) {
    const CASE: &str = "leases round-trip through create, get and list";
    let mut leases = vec![cx.full_lease("full"), cx.lease("bare")];
    let mut bare = Lease::new(&cx.shard("no-hash-range"), ExtendedSequenceNumber::Latest);
    bare.counter = LeaseCounter(u64::from(u32::MAX) + 1);
    leases.push(bare);
    for (name, cp) in [
        ("at-timestamp", ExtendedSequenceNumber::AtTimestamp),
        ("shard-end", ExtendedSequenceNumber::ShardEnd),
        ("seq-128-digits", seq(&"9".repeat(128), 0)),
        ("seq-1-digit", seq("0", 0)),
        ("seq-sub-max", seq(SEQ_56, u64::from(u32::MAX) * 4)),
    ] {
        let mut l = cx.full_lease(name);
        l.checkpoint = cp;
        l.pending_checkpoint = None;
        l.checkpoint_owner = None;
        leases.push(l);
    }
    let mut merged = cx.lease("merged-child").with_parents([
        ShardId::new("shardId-000000000001"),
        ShardId::new("shardId-000000000000"),
    ]);
    merged.hash_range = Some(HashKeyRange::new(0, 0).unwrap_or(HashKeyRange::FULL));
    leases.push(merged);

    for l in &leases {
        cx.create(CASE, l).await;
        cx.expect_stored(CASE, &l.key, Some(l)).await;
    }
    let table = must(CASE, "list", cx.store.list().await);
    for l in &leases {
        let listed = find(&table.leases, &l.key);
        check(
            listed == Some(l),
            CASE,
            format!("list returned {listed:?} for {}, expected {l:?}", l.key),
        );
    }
    check(
        table.leases.windows(2).all(|w| w[0].key < w[1].key),
        CASE,
        "list must return the leases sorted by key, without duplicates".into(),
    );
    cx.expect_stored(CASE, &LeaseKey::new(cx.key("never-created")), None)
        .await;
}

async fn list_reads_every_page(cx: &Cx<'_>) {
    const CASE: &str = "list reads every page";
    let leases: Vec<Lease> = (0..25).map(|i| cx.lease(&format!("page-{i:02}"))).collect();
    for l in &leases {
        cx.create(CASE, l).await;
    }
    let table = must(CASE, "list", cx.store.list().await);
    let missing: Vec<_> = leases
        .iter()
        .filter(|l| find(&table.leases, &l.key) != Some(l))
        .map(|l| l.key.to_string())
        .collect();
    check(
        missing.is_empty(),
        CASE,
        format!(
            "list missed (or altered) {} of 25 leases: {missing:?}",
            missing.len()
        ),
    );
}

/// Creates an unowned lease and takes it for `owner`: the usual starting point.
async fn owned(cx: &Cx<'_>, case: &str, name: &str, owner: &str) -> Lease {
    let l = cx.full_lease(name);
    let mut l = l;
    l.owner = None;
    l.counter = LeaseCounter(0);
    cx.create(case, &l).await;
    must(case, "take", cx.store.take(&l, &WorkerId::new(owner)).await)
}

async fn renew(cx: &Cx<'_>) {
    const CASE: &str = "renew";
    let held = owned(cx, CASE, "renew", "w1").await;
    let renewed = must(CASE, "renew by the owner", cx.store.renew(&held).await);
    let mut expected = held.clone();
    expected.counter = held.counter.next();
    check(
        renewed == expected,
        CASE,
        format!("renew returned {renewed:?}, expected {expected:?} (only the counter bumped)"),
    );
    cx.expect_stored(CASE, &held.key, Some(&renewed)).await;

    condition_failed(
        CASE,
        "renew with a stale counter",
        &held.key,
        cx.store.renew(&held).await,
    );
    let mut ahead = renewed.clone();
    ahead.counter = renewed.counter.next();
    condition_failed(
        CASE,
        "renew with a counter from the future",
        &held.key,
        cx.store.renew(&ahead).await,
    );
    let mut other = renewed.clone();
    other.owner = Some(WorkerId::new("w2"));
    condition_failed(
        CASE,
        "renew by a worker that does not own the lease",
        &held.key,
        cx.store.renew(&other).await,
    );
    cx.expect_stored(CASE, &held.key, Some(&renewed)).await;

    let again = must(CASE, "a second renew", cx.store.renew(&renewed).await);
    check(
        again.counter == LeaseCounter(renewed.counter.0 + 1),
        CASE,
        format!("the second renew left counter {}", again.counter),
    );
    cx.expect_stored(CASE, &held.key, Some(&again)).await;
}

async fn take(cx: &Cx<'_>) {
    const CASE: &str = "take";
    let mut fresh = cx.full_lease("take");
    fresh.owner = None;
    fresh.counter = LeaseCounter(0);
    fresh.owner_switches_since_checkpoint = 0;
    cx.create(CASE, &fresh).await;

    let mut stale = fresh.clone();
    stale.counter = LeaseCounter(5);
    condition_failed(
        CASE,
        "take with a wrong counter",
        &fresh.key,
        cx.store.take(&stale, &WorkerId::new("w1")).await,
    );
    cx.expect_stored(CASE, &fresh.key, Some(&fresh)).await;

    let w1 = WorkerId::new("w1");
    let taken = must(
        CASE,
        "take of an unowned lease",
        cx.store.take(&fresh, &w1).await,
    );
    let mut expected = fresh.clone();
    expected.owner = Some(w1.clone());
    expected.counter = LeaseCounter(1);
    expected.owner_switches_since_checkpoint = 1;
    // A take ends any pending graceful handoff.
    expected.checkpoint_owner = None;
    check(
        taken == expected,
        CASE,
        format!("take returned {taken:?}, expected {expected:?} (owner set, counter + 1, owner switches + 1, checkpointOwner removed)"),
    );
    cx.expect_stored(CASE, &fresh.key, Some(&taken)).await;

    condition_failed(
        CASE,
        "take with the counter seen before someone else took it",
        &fresh.key,
        cx.store.take(&fresh, &WorkerId::new("w2")).await,
    );

    let w2 = WorkerId::new("w2");
    let stolen = must(
        CASE,
        "take of an owned lease (steal)",
        cx.store.take(&taken, &w2).await,
    );
    check(
        stolen.owner.as_ref() == Some(&w2)
            && stolen.counter == LeaseCounter(2)
            && stolen.owner_switches_since_checkpoint == 2
            && stolen.checkpoint == fresh.checkpoint,
        CASE,
        format!("steal returned {stolen:?}: expected owner w2, counter 2, switches 2"),
    );
    cx.expect_stored(CASE, &fresh.key, Some(&stolen)).await;
    condition_failed(
        CASE,
        "renew by the previous owner after a steal",
        &fresh.key,
        cx.store.renew(&taken).await,
    );
}

async fn checkpoint(cx: &Cx<'_>) {
    const CASE: &str = "checkpoint";
    let held = owned(cx, CASE, "checkpoint", "w1").await;
    check(
        held.owner_switches_since_checkpoint > 0 && held.pending_checkpoint.is_some(),
        CASE,
        format!("set-up: expected owner switches and a pending checkpoint, got {held:?}"),
    );
    let position = seq(SEQ_56, 3);
    let done = must(
        CASE,
        "checkpoint by the owner",
        cx.store.checkpoint(&held, &position, &[]).await,
    );
    let mut expected = held.clone();
    expected.checkpoint = position.clone();
    expected.counter = held.counter.next();
    expected.owner_switches_since_checkpoint = 0;
    expected.pending_checkpoint = None;
    check(
        done == expected,
        CASE,
        format!(
            "checkpoint returned {done:?}, expected {expected:?} (checkpoint set, counter + 1, \
             owner switches 0, pending checkpoint removed, children kept)"
        ),
    );
    cx.expect_stored(CASE, &held.key, Some(&done)).await;

    condition_failed(
        CASE,
        "checkpoint with a stale counter",
        &held.key,
        cx.store.checkpoint(&held, &seq(SEQ_56, 4), &[]).await,
    );
    let mut other = done.clone();
    other.owner = Some(WorkerId::new("w2"));
    condition_failed(
        CASE,
        "checkpoint by a worker that does not own the lease",
        &held.key,
        cx.store.checkpoint(&other, &seq(SEQ_56, 4), &[]).await,
    );
    cx.expect_stored(CASE, &held.key, Some(&done)).await;

    // A sentinel, then a 128-digit sequence number.
    let latest = must(
        CASE,
        "checkpoint at a sentinel",
        cx.store
            .checkpoint(&done, &ExtendedSequenceNumber::Latest, &[])
            .await,
    );
    cx.expect_stored(CASE, &held.key, Some(&latest)).await;
    let big = seq(&"9".repeat(128), 12);
    let big_done = must(
        CASE,
        "checkpoint at a 128-digit sequence number",
        cx.store.checkpoint(&latest, &big, &[]).await,
    );
    check(
        big_done.checkpoint == big && big_done.counter == LeaseCounter(held.counter.0 + 3),
        CASE,
        format!("checkpoint returned {big_done:?}"),
    );
    cx.expect_stored(CASE, &held.key, Some(&big_done)).await;

    // A steal bumps the switches again; the next checkpoint resets them.
    let stolen = must(
        CASE,
        "take",
        cx.store.take(&big_done, &WorkerId::new("w2")).await,
    );
    check(
        stolen.owner_switches_since_checkpoint == 1,
        CASE,
        format!(
            "a take after a checkpoint left owner switches {}",
            stolen.owner_switches_since_checkpoint
        ),
    );
    let reset = must(
        CASE,
        "checkpoint",
        cx.store.checkpoint(&stolen, &big, &[]).await,
    );
    check(
        reset.owner_switches_since_checkpoint == 0,
        CASE,
        format!(
            "checkpoint left owner switches {}",
            reset.owner_switches_since_checkpoint
        ),
    );
    cx.expect_stored(CASE, &held.key, Some(&reset)).await;
}

async fn checkpoint_with_children(cx: &Cx<'_>) {
    const CASE: &str = "checkpoint at shard end with children";
    let mut l = cx.lease("parent");
    l.child_shard_ids.clear();
    cx.create(CASE, &l).await;
    let held = must(CASE, "take", cx.store.take(&l, &WorkerId::new("w1")).await);
    let children = [
        ShardId::new("shardId-000000000009"),
        ShardId::new("shardId-000000000008"),
        ShardId::new("shardId-000000000009"),
    ];
    let ended = must(
        CASE,
        "checkpoint SHARD_END with children",
        cx.store
            .checkpoint(&held, &ExtendedSequenceNumber::ShardEnd, &children)
            .await,
    );
    let sorted = vec![
        ShardId::new("shardId-000000000008"),
        ShardId::new("shardId-000000000009"),
    ];
    check(
        ended.checkpoint == ExtendedSequenceNumber::ShardEnd
            && ended.child_shard_ids == sorted
            && ended.is_finished(),
        CASE,
        format!("checkpoint returned {ended:?}: expected SHARD_END with children {sorted:?} (sorted, deduplicated)"),
    );
    cx.expect_stored(CASE, &held.key, Some(&ended)).await;

    // A checkpoint without children keeps the recorded ones.
    let again = must(
        CASE,
        "checkpoint without children",
        cx.store
            .checkpoint(&ended, &ExtendedSequenceNumber::ShardEnd, &[])
            .await,
    );
    check(
        again.child_shard_ids == sorted,
        CASE,
        format!(
            "a checkpoint without children changed them to {:?}",
            again.child_shard_ids
        ),
    );
    cx.expect_stored(CASE, &held.key, Some(&again)).await;
}

async fn release(cx: &Cx<'_>) {
    const CASE: &str = "release";
    let held = owned(cx, CASE, "release", "w1").await;
    let mut stale = held.clone();
    stale.counter = LeaseCounter(held.counter.0.saturating_sub(1));
    condition_failed(
        CASE,
        "release with a stale counter",
        &held.key,
        cx.store.release(&stale).await,
    );
    let mut other = held.clone();
    other.owner = Some(WorkerId::new("w2"));
    condition_failed(
        CASE,
        "release by a worker that does not own the lease",
        &held.key,
        cx.store.release(&other).await,
    );
    cx.expect_stored(CASE, &held.key, Some(&held)).await;

    let released = must(CASE, "release by the owner", cx.store.release(&held).await);
    let mut expected = held.clone();
    expected.owner = None;
    expected.counter = held.counter.next();
    check(
        released == expected,
        CASE,
        format!(
            "release returned {released:?}, expected {expected:?} (owner removed, counter + 1)"
        ),
    );
    cx.expect_stored(CASE, &held.key, Some(&released)).await;
    condition_failed(
        CASE,
        "a second release with the counter seen before the first",
        &held.key,
        cx.store.release(&held).await,
    );
    condition_failed(
        CASE,
        "renew by the owner that released the lease",
        &held.key,
        cx.store.renew(&held).await,
    );

    let retaken = must(
        CASE,
        "take after release",
        cx.store.take(&released, &WorkerId::new("w2")).await,
    );
    check(
        retaken.owner == Some(WorkerId::new("w2")) && retaken.counter == released.counter.next(),
        CASE,
        format!("take after release returned {retaken:?}"),
    );
    cx.expect_stored(CASE, &held.key, Some(&retaken)).await;
}

async fn resolve_latest(cx: &Cx<'_>) {
    const CASE: &str = "resolve_latest";
    let mut l = cx.lease("resolve-latest");
    l.checkpoint = ExtendedSequenceNumber::Latest;
    cx.create(CASE, &l).await;
    let held = must(CASE, "take", cx.store.take(&l, &WorkerId::new("w1")).await);
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_764_000_000_123);
    let mut other = held.clone();
    other.owner = Some(WorkerId::new("w2"));
    condition_failed(
        CASE,
        "resolve by a worker that does not own the lease",
        &held.key,
        cx.store.resolve_latest(&other, at).await,
    );
    let resolved = must(
        CASE,
        "resolve by the owner",
        cx.store.resolve_latest(&held, at).await,
    );
    let mut expected = held.clone();
    expected.counter = held.counter.next();
    expected.latest_resolved_at = Some(at);
    check(
        resolved == expected,
        CASE,
        format!("resolve_latest returned {resolved:?}, expected {expected:?}"),
    );
    cx.expect_stored(CASE, &held.key, Some(&resolved)).await;
    condition_failed(
        CASE,
        "resolve with a stale counter",
        &held.key,
        cx.store.resolve_latest(&held, at).await,
    );
    // Once checkpointed past LATEST, there is nothing to resolve.
    let position = ExtendedSequenceNumber::at(crate::record::SequenceNumber::from_u128(7), 0);
    let checkpointed = must(
        CASE,
        "checkpoint",
        cx.store.checkpoint(&resolved, &position, &[]).await,
    );
    condition_failed(
        CASE,
        "resolve after a checkpoint",
        &held.key,
        cx.store.resolve_latest(&checkpointed, at).await,
    );
}

/// Two-phase checkpoints: prepare stores the pending checkpoint and its binary state without
/// moving the checkpoint; a checkpoint clears both; clearing without a checkpoint works too;
/// only the owner (or the old owner during a handoff) may prepare.
/// `list_eventually` reads the same leases as `list` once writes settled.
async fn eventually_consistent_list(cx: &Cx<'_>) {
    const CASE: &str = "eventually_consistent_list";
    let lease = cx.lease("eventual");
    cx.create(CASE, &lease).await;
    let mut seen = false;
    for _ in 0..20 {
        let table = must(CASE, "list_eventually", cx.store.list_eventually().await);
        if table.leases.iter().any(|l| l == &lease) {
            seen = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    check(
        seen,
        CASE,
        format!("list_eventually never returned {}", lease.key),
    );
}

/// The worker table: register, heartbeat (fenced by incarnation and `fencedBy`), handoff
/// notices removed one by one, fencing conditional on the heartbeat seen, removal. A store
/// that keeps no worker table refuses every call with `Other` (workers then renew per lease).
async fn worker_liveness(cx: &Cx<'_>) {
    use crate::lease::liveness::{Beat, HandoffNotice, WorkerItem};
    const CASE: &str = "worker_liveness";
    let me = WorkerId::new(cx.key("worker"));
    let key = LeaseKey::new(me.as_str());
    let item = WorkerItem::new(me.clone(), 17);
    match cx.store.register_worker(&item).await {
        Err(LeaseStoreError::Other(_)) => {
            let listed = cx.store.list_workers(true).await;
            check(
                matches!(listed, Err(LeaseStoreError::Other(_))),
                CASE,
                format!("register_worker refused, but list_workers answered {listed:?}"),
            );
            return;
        }
        other => must(CASE, "register_worker", other),
    }
    let find = |table: crate::lease::liveness::WorkerTable| {
        table.workers.into_iter().find(|w| w.worker == me)
    };
    let listed = find(must(
        CASE,
        "list_workers",
        cx.store.list_workers(true).await,
    ));
    check(
        listed.as_ref() == Some(&item),
        CASE,
        format!("registered {item:?}, listed {listed:?}"),
    );
    condition_failed(
        CASE,
        "heartbeat of another incarnation",
        &key,
        cx.store.heartbeat(&Beat::new(me.clone(), 18)).await,
    );
    let beat = Beat::new(me.clone(), 17).lease_count(3).table_changes(2);
    let after = must(CASE, "heartbeat", cx.store.heartbeat(&beat).await);
    check(
        after.heartbeat == item.heartbeat + 1 && after.lease_count == 3 && after.table_changes == 2,
        CASE,
        format!("after one heartbeat: {after:?}"),
    );
    // Notices: two requests for one lease stay apart; the owner removes only what it handled.
    let lease = LeaseKey::new(cx.key("asked"));
    let (first, second) = (
        HandoffNotice::new(lease.clone(), 1),
        HandoffNotice::new(lease.clone(), 2),
    );
    condition_failed(
        CASE,
        "notice to another incarnation",
        &key,
        cx.store.notify_handoff(&me, 18, &first).await,
    );
    must(
        CASE,
        "notify",
        cx.store.notify_handoff(&me, 17, &first).await,
    );
    must(
        CASE,
        "notify",
        cx.store.notify_handoff(&me, 17, &second).await,
    );
    let asked = must(CASE, "heartbeat", cx.store.heartbeat(&beat).await);
    check(
        asked.handoffs == vec![first.clone(), second.clone()],
        CASE,
        format!("two notices, the heartbeat returned {:?}", asked.handoffs),
    );
    let handled = beat.clone().handled(vec![first.clone()]);
    let after = must(CASE, "heartbeat", cx.store.heartbeat(&handled).await);
    check(
        after.handoffs == vec![second.clone()],
        CASE,
        format!("handled the first notice, left {:?}", after.handoffs),
    );
    // Fencing: only on the heartbeat seen; then heartbeats and notices fail.
    let mut stale = after.clone();
    stale.heartbeat -= 1;
    let peer = WorkerId::new(cx.key("peer"));
    condition_failed(
        CASE,
        "fence on a stale heartbeat",
        &key,
        cx.store.fence_worker(&stale, &peer).await,
    );
    must(CASE, "fence", cx.store.fence_worker(&after, &peer).await);
    condition_failed(
        CASE,
        "fence twice",
        &key,
        cx.store.fence_worker(&after, &peer).await,
    );
    condition_failed(
        CASE,
        "heartbeat after fencing",
        &key,
        cx.store.heartbeat(&beat).await,
    );
    condition_failed(
        CASE,
        "notice after fencing",
        &key,
        cx.store.notify_handoff(&me, 17, &first).await,
    );
    let fenced = find(must(
        CASE,
        "list_workers",
        cx.store.list_workers(true).await,
    ));
    check(
        fenced.as_ref().and_then(|w| w.fenced_by.as_ref()) == Some(&peer),
        CASE,
        format!("after fencing: {fenced:?}"),
    );
    // A new incarnation starts over.
    let again = WorkerItem::new(me.clone(), 19);
    must(
        CASE,
        "register again",
        cx.store.register_worker(&again).await,
    );
    let beat = Beat::new(me.clone(), 19);
    let after = must(CASE, "heartbeat", cx.store.heartbeat(&beat).await);
    check(
        after.fenced_by.is_none() && after.handoffs.is_empty(),
        CASE,
        format!("a new incarnation: {after:?}"),
    );
    condition_failed(
        CASE,
        "remove another incarnation",
        &key,
        cx.store.remove_worker(&me, 17).await,
    );
    must(CASE, "remove", cx.store.remove_worker(&me, 19).await);
    let gone = find(must(
        CASE,
        "list_workers",
        cx.store.list_workers(false).await,
    ));
    check(
        gone.is_none(),
        CASE,
        format!("removed, still listed: {gone:?}"),
    );
    condition_failed(
        CASE,
        "heartbeat of a removed worker",
        &key,
        cx.store.heartbeat(&beat).await,
    );
}

/// `drainingSince`: set and cleared on the incarnation asked, kept by heartbeats, refused on
/// another incarnation or a fenced item, gone with a new registration.
async fn draining_worker(cx: &Cx<'_>) {
    use crate::lease::liveness::{Beat, WorkerItem};
    const CASE: &str = "draining worker";
    let me = WorkerId::new(cx.key("drained"));
    let key = LeaseKey::new(me.as_str());
    match cx
        .store
        .register_worker(&WorkerItem::new(me.clone(), 5))
        .await
    {
        // No worker table: nothing to drain; the method must refuse the same way.
        Err(LeaseStoreError::Other(_)) => {
            let asked = cx.store.set_draining(&me, 5, Some(1)).await;
            check(
                matches!(asked, Err(LeaseStoreError::Other(_))),
                CASE,
                format!("register_worker refused, but set_draining answered {asked:?}"),
            );
            return;
        }
        other => must(CASE, "register_worker", other),
    }
    let read = || async {
        must(CASE, "list_workers", cx.store.list_workers(true).await)
            .workers
            .into_iter()
            .find(|w| w.worker == me)
    };
    condition_failed(
        CASE,
        "drain another incarnation",
        &key,
        cx.store.set_draining(&me, 6, Some(1_764_633_600_000)).await,
    );
    must(
        CASE,
        "set_draining",
        cx.store.set_draining(&me, 5, Some(1_764_633_600_000)).await,
    );
    let beat = Beat::new(me.clone(), 5).lease_count(2);
    let after = must(CASE, "heartbeat", cx.store.heartbeat(&beat).await);
    check(
        after.draining_since == Some(1_764_633_600_000) && after.lease_count == 2,
        CASE,
        format!("a heartbeat must keep drainingSince: {after:?}"),
    );
    let listed = read().await;
    check(
        listed.as_ref().and_then(|w| w.draining_since) == Some(1_764_633_600_000),
        CASE,
        format!("listed {listed:?}"),
    );
    must(
        CASE,
        "stop draining",
        cx.store.set_draining(&me, 5, None).await,
    );
    let listed = read().await;
    check(
        listed.as_ref().is_some_and(|w| !w.is_draining()),
        CASE,
        format!("after clearing: {listed:?}"),
    );
    // A restart (new incarnation) starts without it.
    must(
        CASE,
        "set_draining",
        cx.store.set_draining(&me, 5, Some(7)).await,
    );
    must(
        CASE,
        "register again",
        cx.store
            .register_worker(&WorkerItem::new(me.clone(), 8))
            .await,
    );
    let listed = read().await;
    check(
        listed.as_ref().is_some_and(|w| !w.is_draining()),
        CASE,
        format!("a new incarnation: {listed:?}"),
    );
    // Fenced (declared dead): no drain.
    let seen = listed.unwrap_or_else(|| fail(CASE, "the item is gone".into()));
    must(
        CASE,
        "fence",
        cx.store
            .fence_worker(&seen, &WorkerId::new(cx.key("peer")))
            .await,
    );
    condition_failed(
        CASE,
        "drain a fenced worker",
        &key,
        cx.store.set_draining(&me, 8, Some(9)).await,
    );
    must(CASE, "remove", cx.store.remove_worker(&me, 8).await);
}

async fn two_phase_checkpoint(cx: &Cx<'_>) {
    use crate::checkpoint::PendingCheckpoint;
    const CASE: &str = "two_phase_checkpoint";
    let fresh = cx.lease("two-phase");
    cx.create(CASE, &fresh).await;
    let held = must(
        CASE,
        "take",
        cx.store.take(&fresh, &WorkerId::new("w1")).await,
    );
    let position = ExtendedSequenceNumber::at(crate::record::SequenceNumber::from_u128(99), 3);
    // Not UTF-8, with a zero byte: the state is binary.
    let state = bytes::Bytes::from_static(&[0, 159, 146, 150, b'k']);
    let pending = PendingCheckpoint::new(position.clone(), Some(state.clone()));
    let mut other = held.clone();
    other.owner = Some(WorkerId::new("w2"));
    condition_failed(
        CASE,
        "prepare by a worker that does not own the lease",
        &held.key,
        cx.store
            .set_pending_checkpoint(&other, Some(&pending))
            .await,
    );
    let prepared = must(
        CASE,
        "prepare by the owner",
        cx.store.set_pending_checkpoint(&held, Some(&pending)).await,
    );
    let mut expected = held.clone();
    expected.counter = held.counter.next();
    expected.pending_checkpoint = Some(position.clone());
    expected.pending_checkpoint_state = Some(state);
    check(
        prepared == expected,
        CASE,
        format!("prepare returned {prepared:?}, expected {expected:?}"),
    );
    cx.expect_stored(CASE, &held.key, Some(&prepared)).await;
    condition_failed(
        CASE,
        "prepare with a stale counter",
        &held.key,
        cx.store.set_pending_checkpoint(&held, Some(&pending)).await,
    );
    // A second prepare without state replaces the first, state included.
    let again = PendingCheckpoint::new(position.clone(), None);
    let replaced = must(
        CASE,
        "prepare again without state",
        cx.store
            .set_pending_checkpoint(&prepared, Some(&again))
            .await,
    );
    check(
        replaced.pending_checkpoint_state.is_none(),
        CASE,
        format!("the state was replaced: {replaced:?}"),
    );
    cx.expect_stored(CASE, &held.key, Some(&replaced)).await;
    let prepared = must(
        CASE,
        "prepare with state",
        cx.store
            .set_pending_checkpoint(&replaced, Some(&pending))
            .await,
    );
    // Commit: the checkpoint moves, the pending fields go.
    let committed = must(
        CASE,
        "commit",
        cx.store.checkpoint(&prepared, &position, &[]).await,
    );
    check(
        committed.pending_checkpoint.is_none()
            && committed.pending_checkpoint_state.is_none()
            && committed.checkpoint == position,
        CASE,
        format!("a checkpoint clears the pending checkpoint: {committed:?}"),
    );
    cx.expect_stored(CASE, &held.key, Some(&committed)).await;
    // Prepare, then clear (a rollback): the checkpoint stays.
    let later = ExtendedSequenceNumber::at(crate::record::SequenceNumber::from_u128(120), 0);
    let prepared = must(
        CASE,
        "prepare after the commit",
        cx.store
            .set_pending_checkpoint(
                &committed,
                Some(&PendingCheckpoint::new(later, Some("s".into()))),
            )
            .await,
    );
    let cleared = must(
        CASE,
        "clear",
        cx.store.set_pending_checkpoint(&prepared, None).await,
    );
    let mut expected = committed.clone();
    expected.counter = prepared.counter.next();
    check(
        cleared == expected,
        CASE,
        format!("clear returned {cleared:?}, expected {expected:?}"),
    );
    cx.expect_stored(CASE, &held.key, Some(&cleared)).await;
}

async fn delete(cx: &Cx<'_>) {
    const CASE: &str = "delete";
    let fresh = cx.lease("delete");
    cx.create(CASE, &fresh).await;
    let held = must(
        CASE,
        "take",
        cx.store.take(&fresh, &WorkerId::new("w1")).await,
    );
    condition_failed(
        CASE,
        "delete with a stale counter",
        &fresh.key,
        cx.store.delete(&fresh).await,
    );
    cx.expect_stored(CASE, &fresh.key, Some(&held)).await;

    must(
        CASE,
        "delete with the current counter",
        cx.store.delete(&held).await,
    );
    cx.expect_stored(CASE, &fresh.key, None).await;
    let table = must(CASE, "list", cx.store.list().await);
    check(
        find(&table.leases, &fresh.key).is_none(),
        CASE,
        "list still returns the deleted lease".into(),
    );
    condition_failed(
        CASE,
        "a second delete",
        &fresh.key,
        cx.store.delete(&held).await,
    );
    // The key can be used again.
    cx.create(CASE, &fresh).await;
    cx.expect_stored(CASE, &fresh.key, Some(&fresh)).await;
}

/// A handoff withdrawn by the new owner (it stops before the old owner completed it): the lease
/// is back exactly as before the request (owner = old, no checkpointOwner, counter unchanged);
/// only the requester can withdraw, only while the request is pending; the old owner's renewals
/// pass again and its completion no longer can.
async fn withdrawn_handoff(cx: &Cx<'_>) {
    const CASE: &str = "withdrawn handoff";
    let (w1, w2, w3) = (
        WorkerId::new("w1"),
        WorkerId::new("w2"),
        WorkerId::new("w3"),
    );
    let mut fresh = cx.full_lease("withdrawn");
    fresh.owner = None;
    fresh.checkpoint_owner = None;
    fresh.counter = LeaseCounter(0);
    cx.create(CASE, &fresh).await;
    let old_view = must(CASE, "take", cx.store.take(&fresh, &w1).await);
    condition_failed(
        CASE,
        "withdraw_handoff with no handoff pending",
        &fresh.key,
        cx.store.withdraw_handoff(&old_view).await,
    );
    let requested = must(
        CASE,
        "request_handoff",
        cx.store.request_handoff(&old_view, &w2).await,
    );
    let mut by_another = requested.clone();
    by_another.owner = Some(w3.clone());
    condition_failed(
        CASE,
        "withdraw_handoff by a worker that did not ask for it",
        &fresh.key,
        cx.store.withdraw_handoff(&by_another).await,
    );
    let mut from_another = requested.clone();
    from_another.checkpoint_owner = Some(w3.clone());
    condition_failed(
        CASE,
        "withdraw_handoff naming the wrong old owner",
        &fresh.key,
        cx.store.withdraw_handoff(&from_another).await,
    );
    let mut stale = requested.clone();
    stale.counter = fresh.counter;
    condition_failed(
        CASE,
        "withdraw_handoff with a stale counter",
        &fresh.key,
        cx.store.withdraw_handoff(&stale).await,
    );
    cx.expect_stored(CASE, &fresh.key, Some(&requested)).await;

    let withdrawn = must(
        CASE,
        "withdraw_handoff",
        cx.store.withdraw_handoff(&requested).await,
    );
    check(
        withdrawn == old_view,
        CASE,
        format!(
            "withdraw_handoff returned {withdrawn:?}, expected the lease as before the \
             request: {old_view:?}"
        ),
    );
    cx.expect_stored(CASE, &fresh.key, Some(&old_view)).await;
    condition_failed(
        CASE,
        "a second withdraw_handoff",
        &fresh.key,
        cx.store.withdraw_handoff(&requested).await,
    );
    condition_failed(
        CASE,
        "complete_handoff by the old owner once withdrawn",
        &fresh.key,
        cx.store.complete_handoff(&old_view, &w2).await,
    );
    let renewed = must(
        CASE,
        "renew by the old owner once withdrawn",
        cx.store.renew(&old_view).await,
    );
    cx.expect_stored(CASE, &fresh.key, Some(&renewed)).await;
}

/// Graceful handoff: the new owner requests it (owner = new, checkpointOwner = old, counter
/// unchanged); the old owner's renewals fail, its final checkpoint is accepted, and it completes
/// the handoff (checkpointOwner removed, counter + 1); then the new owner takes the lease.
async fn graceful_handoff(cx: &Cx<'_>) {
    const CASE: &str = "graceful handoff";
    let (w1, w2, w3) = (
        WorkerId::new("w1"),
        WorkerId::new("w2"),
        WorkerId::new("w3"),
    );
    let mut fresh = cx.full_lease("handoff");
    fresh.owner = None;
    fresh.checkpoint_owner = None;
    fresh.counter = LeaseCounter(0);
    cx.create(CASE, &fresh).await;
    condition_failed(
        CASE,
        "request_handoff of an unowned lease",
        &fresh.key,
        cx.store.request_handoff(&fresh, &w2).await,
    );
    // The old owner's view, and (identical) what the new owner read from the table.
    let old_view = must(CASE, "take", cx.store.take(&fresh, &w1).await);
    let mut stale = old_view.clone();
    stale.counter = fresh.counter;
    condition_failed(
        CASE,
        "request_handoff with a stale counter",
        &fresh.key,
        cx.store.request_handoff(&stale, &w2).await,
    );
    let mut not_owner = old_view.clone();
    not_owner.owner = Some(w3.clone());
    condition_failed(
        CASE,
        "request_handoff naming the wrong current owner",
        &fresh.key,
        cx.store.request_handoff(&not_owner, &w2).await,
    );
    cx.expect_stored(CASE, &fresh.key, Some(&old_view)).await;

    let requested = must(
        CASE,
        "request_handoff",
        cx.store.request_handoff(&old_view, &w2).await,
    );
    let mut expected = old_view.clone();
    expected.owner = Some(w2.clone());
    expected.checkpoint_owner = Some(w1.clone());
    check(
        requested == expected,
        CASE,
        format!(
            "request_handoff returned {requested:?}, expected {expected:?} (owner = new, \
             checkpointOwner = old, counter unchanged)"
        ),
    );
    cx.expect_stored(CASE, &fresh.key, Some(&requested)).await;
    condition_failed(
        CASE,
        "a second request_handoff while one is pending",
        &fresh.key,
        cx.store.request_handoff(&requested, &w3).await,
    );
    condition_failed(
        CASE,
        "renew by the old owner once a handoff is requested",
        &fresh.key,
        cx.store.renew(&old_view).await,
    );
    condition_failed(
        CASE,
        "release by the old owner once a handoff is requested",
        &fresh.key,
        cx.store.release(&old_view).await,
    );
    cx.expect_stored(CASE, &fresh.key, Some(&requested)).await;

    // The old owner's final checkpoint, written as the old owner.
    let mut bystander = old_view.clone();
    bystander.owner = Some(w3.clone());
    condition_failed(
        CASE,
        "checkpoint by a worker that is neither owner nor checkpoint owner",
        &fresh.key,
        cx.store.checkpoint(&bystander, &seq(SEQ_56, 8), &[]).await,
    );
    let final_position = seq(SEQ_56, 8);
    let checkpointed = must(
        CASE,
        "the old owner's final checkpoint",
        cx.store.checkpoint(&old_view, &final_position, &[]).await,
    );
    check(
        checkpointed.counter == old_view.counter.next()
            && checkpointed.checkpoint == final_position,
        CASE,
        format!("the final checkpoint returned {checkpointed:?}"),
    );
    let mut stored = requested.clone();
    stored.counter = old_view.counter.next();
    stored.checkpoint = final_position.clone();
    stored.owner_switches_since_checkpoint = 0;
    stored.pending_checkpoint = None;
    cx.expect_stored(CASE, &fresh.key, Some(&stored)).await;

    // The old owner completes the handoff, still writing as itself.
    let mut old_after = old_view.clone();
    old_after.counter = checkpointed.counter;
    condition_failed(
        CASE,
        "complete_handoff to the wrong new owner",
        &fresh.key,
        cx.store.complete_handoff(&old_after, &w3).await,
    );
    condition_failed(
        CASE,
        "complete_handoff with a stale counter",
        &fresh.key,
        cx.store.complete_handoff(&old_view, &w2).await,
    );
    let mut not_old = old_after.clone();
    not_old.owner = Some(w3.clone());
    condition_failed(
        CASE,
        "complete_handoff by a worker that is not the checkpoint owner",
        &fresh.key,
        cx.store.complete_handoff(&not_old, &w2).await,
    );
    let completed = must(
        CASE,
        "complete_handoff",
        cx.store.complete_handoff(&old_after, &w2).await,
    );
    let mut expected = stored.clone();
    expected.counter = stored.counter.next();
    expected.checkpoint_owner = None;
    check(
        completed.counter == expected.counter
            && completed.owner.as_ref() == Some(&w2)
            && completed.checkpoint_owner.is_none(),
        CASE,
        format!("complete_handoff returned {completed:?}, expected counter {}, owner w2, no checkpointOwner", expected.counter),
    );
    cx.expect_stored(CASE, &fresh.key, Some(&expected)).await;
    condition_failed(
        CASE,
        "a second complete_handoff",
        &fresh.key,
        cx.store.complete_handoff(&old_after, &w2).await,
    );

    // The new owner takes the lease it was handed.
    let taken = must(
        CASE,
        "take by the new owner",
        cx.store.take(&expected, &w2).await,
    );
    check(
        taken.owner.as_ref() == Some(&w2)
            && taken.counter == expected.counter.next()
            && taken.checkpoint == final_position,
        CASE,
        format!("take after the handoff returned {taken:?}"),
    );
    cx.expect_stored(CASE, &fresh.key, Some(&taken)).await;
}

/// A take (e.g. by force, once the lease expired) ends a pending handoff: `checkpointOwner` is
/// removed and the old owner can no longer checkpoint.
async fn handoff_ended_by_a_take(cx: &Cx<'_>) {
    const CASE: &str = "a take during a handoff";
    let (w1, w2) = (WorkerId::new("w1"), WorkerId::new("w2"));
    let mut fresh = cx.lease("handoff-forced");
    fresh.checkpoint_owner = None;
    cx.create(CASE, &fresh).await;
    let old_view = must(CASE, "take", cx.store.take(&fresh, &w1).await);
    let requested = must(
        CASE,
        "request_handoff",
        cx.store.request_handoff(&old_view, &w2).await,
    );
    let forced = must(CASE, "take", cx.store.take(&requested, &w2).await);
    check(
        forced.checkpoint_owner.is_none()
            && forced.owner.as_ref() == Some(&w2)
            && forced.counter == old_view.counter.next(),
        CASE,
        format!("take during a handoff returned {forced:?}"),
    );
    cx.expect_stored(CASE, &fresh.key, Some(&forced)).await;
    condition_failed(
        CASE,
        "checkpoint by the old owner after the take",
        &fresh.key,
        cx.store
            .checkpoint(&old_view, &ExtendedSequenceNumber::ShardEnd, &[])
            .await,
    );
    let mut late = old_view.clone();
    late.counter = forced.counter;
    condition_failed(
        CASE,
        "checkpoint by the old owner with the current counter after the take",
        &fresh.key,
        cx.store
            .checkpoint(&late, &ExtendedSequenceNumber::ShardEnd, &[])
            .await,
    );
    condition_failed(
        CASE,
        "complete_handoff after the take",
        &fresh.key,
        cx.store.complete_handoff(&late, &w2).await,
    );
    cx.expect_stored(CASE, &fresh.key, Some(&forced)).await;
}

async fn missing_leases_fail_every_write(cx: &Cx<'_>) {
    const CASE: &str = "writes to a missing lease";
    let mut ghost = cx.full_lease("ghost");
    ghost.counter = LeaseCounter(0);
    let key = ghost.key.clone();
    let w = WorkerId::new("w1");
    condition_failed(CASE, "renew", &key, cx.store.renew(&ghost).await);
    condition_failed(CASE, "take", &key, cx.store.take(&ghost, &w).await);
    condition_failed(
        CASE,
        "checkpoint",
        &key,
        cx.store
            .checkpoint(
                &ghost,
                &ExtendedSequenceNumber::ShardEnd,
                &[ShardId::new("c")],
            )
            .await,
    );
    condition_failed(CASE, "release", &key, cx.store.release(&ghost).await);
    condition_failed(CASE, "delete", &key, cx.store.delete(&ghost).await);
    condition_failed(
        CASE,
        "request_handoff",
        &key,
        cx.store.request_handoff(&ghost, &WorkerId::new("w2")).await,
    );
    condition_failed(
        CASE,
        "complete_handoff",
        &key,
        cx.store
            .complete_handoff(&ghost, &WorkerId::new("w2"))
            .await,
    );
    // None of them may have created the item.
    cx.expect_stored(CASE, &key, None).await;
}

async fn concurrent_takes_have_one_winner(cx: &Cx<'_>) {
    const CASE: &str = "concurrent takes";
    let fresh = cx.lease("contended");
    cx.create(CASE, &fresh).await;
    let workers: Vec<WorkerId> = (0..6).map(|i| WorkerId::new(format!("w{i}"))).collect();
    let results = futures::future::join_all(workers.iter().map(|w| cx.store.take(&fresh, w))).await;
    let mut winners = Vec::new();
    for (w, r) in workers.iter().zip(results) {
        match r {
            Ok(l) => winners.push((w.clone(), l)),
            Err(LeaseStoreError::ConditionFailed { key }) if key == fresh.key => {}
            Err(e) => fail(
                CASE,
                format!("take by {w} failed with {e:?}, expected ConditionFailed"),
            ),
        }
    }
    check(
        winners.len() == 1,
        CASE,
        format!(
            "{} of 6 concurrent takes with the same counter succeeded, expected exactly 1",
            winners.len()
        ),
    );
    let (winner, lease) = &winners[0];
    check(
        lease.owner.as_ref() == Some(winner),
        CASE,
        format!("the winning take returned {lease:?}"),
    );
    cx.expect_stored(CASE, &fresh.key, Some(lease)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mem_lease_store_conforms() {
        run_all(&MemLeaseStore::new()).await;
    }

    #[tokio::test]
    async fn the_suite_can_run_twice_on_one_table() {
        let store = MemLeaseStore::new();
        run_all(&store).await;
        run_all(&store).await;
    }

    use crate::lease::liveness::{Beat, HandoffNotice, WorkerItem, WorkerTable};

    /// The one rule of the protocol a [`Planted`] store breaks.
    #[derive(Debug, PartialEq, Eq)]
    enum Plant {
        /// Takes whatever the counter (ignores the fence).
        TakeIgnoresTheCounter,
        /// A heartbeat succeeds on a fenced item, clearing the fence.
        HeartbeatIgnoresFencing,
        /// Withdraws a handoff with a take: the counter moves.
        WithdrawsByTaking,
        /// A heartbeat rewrites the whole item, dropping `drainingSince`.
        HeartbeatForgetsTheDrain,
    }

    /// The in-memory store with one planted violation: the suite must notice it.
    #[derive(Debug)]
    struct Planted(MemLeaseStore, Plant);

    #[async_trait::async_trait]
    impl LeaseStore for Planted {
        async fn ensure_table(&self) -> Result<(), LeaseStoreError> {
            self.0.ensure_table().await
        }
        async fn list(&self) -> Result<crate::lease::LeaseTable, LeaseStoreError> {
            self.0.list().await
        }
        async fn get(&self, key: &LeaseKey) -> Result<Option<Lease>, LeaseStoreError> {
            self.0.get(key).await
        }
        async fn create_if_absent(&self, lease: &Lease) -> Result<bool, LeaseStoreError> {
            self.0.create_if_absent(lease).await
        }
        async fn renew(&self, lease: &Lease) -> Result<Lease, LeaseStoreError> {
            self.0.renew(lease).await
        }
        async fn take(&self, lease: &Lease, owner: &WorkerId) -> Result<Lease, LeaseStoreError> {
            if self.1 == Plant::TakeIgnoresTheCounter {
                let Some(current) = self.0.get(&lease.key).await? else {
                    return Err(LeaseStoreError::ConditionFailed {
                        key: lease.key.clone(),
                    });
                };
                return self.0.take(&current, owner).await;
            }
            self.0.take(lease, owner).await
        }
        async fn checkpoint(
            &self,
            lease: &Lease,
            checkpoint: &ExtendedSequenceNumber,
            children: &[ShardId],
        ) -> Result<Lease, LeaseStoreError> {
            self.0.checkpoint(lease, checkpoint, children).await
        }
        async fn release(&self, lease: &Lease) -> Result<Lease, LeaseStoreError> {
            self.0.release(lease).await
        }
        async fn delete(&self, lease: &Lease) -> Result<(), LeaseStoreError> {
            self.0.delete(lease).await
        }
        async fn request_handoff(
            &self,
            lease: &Lease,
            new_owner: &WorkerId,
        ) -> Result<Lease, LeaseStoreError> {
            self.0.request_handoff(lease, new_owner).await
        }
        async fn complete_handoff(
            &self,
            lease: &Lease,
            new_owner: &WorkerId,
        ) -> Result<Lease, LeaseStoreError> {
            self.0.complete_handoff(lease, new_owner).await
        }
        async fn list_eventually(&self) -> Result<crate::lease::LeaseTable, LeaseStoreError> {
            self.0.list_eventually().await
        }
        async fn resolve_latest(
            &self,
            lease: &Lease,
            at: std::time::SystemTime,
        ) -> Result<Lease, LeaseStoreError> {
            self.0.resolve_latest(lease, at).await
        }
        async fn set_pending_checkpoint(
            &self,
            lease: &Lease,
            pending: Option<&crate::checkpoint::PendingCheckpoint>,
        ) -> Result<Lease, LeaseStoreError> {
            self.0.set_pending_checkpoint(lease, pending).await
        }
        async fn register_worker(&self, item: &WorkerItem) -> Result<(), LeaseStoreError> {
            self.0.register_worker(item).await
        }
        async fn heartbeat(&self, beat: &Beat) -> Result<WorkerItem, LeaseStoreError> {
            if self.1 == Plant::HeartbeatIgnoresFencing {
                let stored = self
                    .0
                    .workers()
                    .into_iter()
                    .find(|w| w.worker == beat.worker && w.incarnation == beat.incarnation);
                if let Some(mut w) = stored.filter(|w| w.fenced_by.is_some()) {
                    w.fenced_by = None;
                    self.0.register_worker(&w).await?;
                }
            }
            let written = self.0.heartbeat(beat).await?;
            if self.1 == Plant::HeartbeatForgetsTheDrain && written.is_draining() {
                let mut w = written;
                w.draining_since = None;
                self.0.register_worker(&w).await?;
                return Ok(w);
            }
            Ok(written)
        }
        async fn withdraw_handoff(&self, lease: &Lease) -> Result<Lease, LeaseStoreError> {
            if self.1 == Plant::WithdrawsByTaking {
                // Gives the lease back by taking it for the old owner: the counter moves,
                // so the old owner's view no longer matches.
                let old = lease
                    .checkpoint_owner
                    .clone()
                    .unwrap_or_else(|| WorkerId::new(""));
                return self.0.take(lease, &old).await;
            }
            self.0.withdraw_handoff(lease).await
        }
        async fn list_workers(&self, consistent: bool) -> Result<WorkerTable, LeaseStoreError> {
            self.0.list_workers(consistent).await
        }
        async fn fence_worker(
            &self,
            seen: &WorkerItem,
            by: &WorkerId,
        ) -> Result<(), LeaseStoreError> {
            self.0.fence_worker(seen, by).await
        }
        async fn notify_handoff(
            &self,
            worker: &WorkerId,
            incarnation: u64,
            notice: &HandoffNotice,
        ) -> Result<(), LeaseStoreError> {
            self.0.notify_handoff(worker, incarnation, notice).await
        }
        async fn remove_worker(
            &self,
            worker: &WorkerId,
            incarnation: u64,
        ) -> Result<(), LeaseStoreError> {
            self.0.remove_worker(worker, incarnation).await
        }
        async fn set_draining(
            &self,
            worker: &WorkerId,
            incarnation: u64,
            since: Option<u64>,
        ) -> Result<(), LeaseStoreError> {
            self.0.set_draining(worker, incarnation, since).await
        }
    }

    #[tokio::test]
    #[should_panic(expected = "lease store conformance: take")]
    async fn the_suite_catches_a_store_without_fencing() {
        run_protocol(&Planted(MemLeaseStore::new(), Plant::TakeIgnoresTheCounter)).await;
    }

    #[tokio::test]
    #[should_panic(expected = "lease store conformance: worker_liveness")]
    async fn the_suite_catches_a_heartbeat_that_ignores_fencing() {
        run_protocol(&Planted(
            MemLeaseStore::new(),
            Plant::HeartbeatIgnoresFencing,
        ))
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "lease store conformance: withdrawn handoff")]
    async fn the_suite_catches_a_withdrawal_that_moves_the_counter() {
        run_protocol(&Planted(MemLeaseStore::new(), Plant::WithdrawsByTaking)).await;
    }

    #[tokio::test]
    #[should_panic(expected = "lease store conformance: draining worker")]
    async fn the_suite_catches_a_heartbeat_that_forgets_the_drain() {
        run_protocol(&Planted(
            MemLeaseStore::new(),
            Plant::HeartbeatForgetsTheDrain,
        ))
        .await;
    }

    #[tokio::test]
    async fn a_store_without_a_worker_table_passes_by_refusing_it() {
        run_protocol(&MemLeaseStore::without_worker_table()).await;
    }
}
