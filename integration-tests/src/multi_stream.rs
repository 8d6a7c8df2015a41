//! Multi-stream scenarios, run on the in-memory backends and on the local servers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use kcl::stream::StreamIdentifier;
use kcl::{ExtendedSequenceNumber, LeaseStore};

use crate::scenarios::{
    check_all_delivered, check_no_duplicates_or_overlap, check_parent_leases_finished,
    check_parents_first, check_per_key_order, poll, records, timed_worker, Delivery, DeliveryLog,
    StreamFixture,
};

/// Scenario: two workers consume two streams whose shards have the same ids, through one
/// lease table; each stream is resharded (a split, a merge) while consumed. Per stream and
/// shard: every record delivered once, in order per key, children after parents, and every
/// checkpoint in that stream's own lease (`account:stream:epoch:shardId`, with Java's
/// `streamName` and `shardId`).
pub async fn two_streams_resharded(
    fixture: &dyn StreamFixture,
    leases: Arc<dyn LeaseStore>,
) -> anyhow::Result<()> {
    const KEYS: u32 = 16;
    const WAVE: u32 = 400;
    let a = crate::unique_name("ms-a");
    let b = crate::unique_name("ms-b");
    fixture.create_stream(&a, 2).await?;
    fixture.create_stream(&b, 2).await?;
    let log = DeliveryLog::default();
    let mut runs = Vec::new();
    let mut stops = Vec::new();
    for id in ["w1", "w2"] {
        let w = timed_worker("multi-app", id, fixture, leases.clone(), &log)
            .streams([a.as_str(), b.as_str()])
            .build()?;
        stops.push(w.shutdown_handle());
        runs.push(tokio::spawn(w.run()));
    }

    for s in [&a, &b] {
        fixture.put(s, records(0, WAVE, KEYS)).await?;
    }
    let shards_a = fixture.kinesis().list_shards(&a).await?;
    let s0 = shards_a
        .iter()
        .min_by(|x, y| x.id.cmp(&y.id))
        .context("no shard")?;
    let at = s0.hash_range.start() + (s0.hash_range.end() - s0.hash_range.start()) / 2 + 1;
    fixture.split(&a, &s0.id, at).await?;
    for s in [&a, &b] {
        fixture.put(s, records(WAVE, 2 * WAVE, KEYS)).await?;
    }
    let mut shards_b = fixture.kinesis().list_shards(&b).await?;
    shards_b.sort_by_key(|s| s.hash_range.start());
    fixture.merge(&b, &shards_b[0].id, &shards_b[1].id).await?;
    for s in [&a, &b] {
        fixture.put(s, records(2 * WAVE, 3 * WAVE, KEYS)).await?;
    }
    let want = 2 * 3 * WAVE as usize;
    poll(
        "every record of both streams",
        Duration::from_secs(180),
        || {
            let log = log.snapshot();
            async move {
                let got: BTreeSet<(String, u32, u32)> =
                    log.iter().map(|d| (d.stream.clone(), d.key, d.n)).collect();
                Ok((got.len() >= want).then_some(()))
            }
        },
    )
    .await?;
    for stop in &stops {
        stop.shutdown();
    }
    for run in runs {
        run.await??;
    }

    let table = leases.list().await?.leases;
    let log = log.snapshot();
    for stream in [&a, &b] {
        let mine: Vec<Delivery> = log
            .iter()
            .filter(|d| &d.stream == stream)
            .cloned()
            .collect();
        check_all_delivered(&mine, 3 * WAVE, KEYS).with_context(|| format!("stream {stream}"))?;
        check_per_key_order(&mine).with_context(|| format!("stream {stream}"))?;
        check_no_duplicates_or_overlap(&mine).with_context(|| format!("stream {stream}"))?;
        let shards = fixture.kinesis().list_shards(stream).await?;
        check_parents_first(&mine, &shards).with_context(|| format!("stream {stream}"))?;
        let own: Vec<kcl::Lease> = table
            .iter()
            .filter(|l| l.key.stream().is_some_and(|s| s.name() == stream.as_str()))
            .cloned()
            .collect();
        check_parent_leases_finished(&own, &shards).with_context(|| format!("stream {stream}"))?;
        // Each open shard's checkpoint is the last record delivered from it, in its own lease.
        let mut last: BTreeMap<kcl::ShardId, kcl::SequenceNumber> = BTreeMap::new();
        for d in &mine {
            last.insert(d.shard.clone(), d.seq.clone());
        }
        for shard in shards.iter().filter(|s| !s.is_closed()) {
            let lease = own
                .iter()
                .find(|l| l.shard_id() == shard.id)
                .with_context(|| format!("stream {stream}: no lease for {}", shard.id))?;
            if let Some(seq) = last.get(&shard.id) {
                ensure!(
                    lease.checkpoint == ExtendedSequenceNumber::at(seq.clone(), 0),
                    "stream {stream}, {}: checkpoint {} is not the last record delivered {seq}",
                    shard.id,
                    lease.checkpoint
                );
            }
        }
    }
    for l in &table {
        let id: StreamIdentifier = l
            .key
            .stream()
            .with_context(|| format!("lease {} is not a multi-stream key", l.key))?;
        ensure!(
            id.name() == a || id.name() == b,
            "lease {} of an unknown stream",
            l.key
        );
    }
    Ok(())
}
