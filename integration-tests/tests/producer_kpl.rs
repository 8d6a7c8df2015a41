//! The producer against kinesis-local through `aws-sdk-kinesis` (`AwsPutRecords`), read back
//! with `AwsKinesis::get_records` and `deaggregate`: KPL aggregates with many keys, explicit
//! hash keys, a record too large to share an aggregate, a split between two flushes, and the
//! same without aggregation. Every user record must come back exactly once, with its key, in
//! the order it was put per key.
//!
//! One kinesis-local serves every scenario (each on its own stream, concurrently); every
//! scenario's outcome is reported, then the test fails if any failed.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use anyhow::{bail, ensure};
use aws_sdk_kinesis::Client;
use futures::future::join_all;
use kcl::producer::aws::AwsPutRecords;
use kcl::producer::{Producer, UserRecord};
use kcl::retrieval::aws::AwsKinesis;
use kcl::retrieval::deagg::{deaggregate, in_range, Deaggregated};
use kcl::retrieval::IteratorPosition;
use kcl::shard::{hash_key, Shard};
use kcl::{KinesisApi, Record};
use kcl_integration_tests::kinesis_server::{
    create_stream, kinesis_client, split_shard, start_kinesis_local,
};
use kcl_integration_tests::unique_name;

type Scenario<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_against_kinesis_local() -> anyhow::Result<()> {
    let started = Instant::now();
    let server = start_kinesis_local().await?;
    let client = kinesis_client(&server).await;
    println!("kinesis-local up in {:?}", started.elapsed());

    let scenarios: Vec<(&str, Scenario<'_>)> = vec![
        (
            "aggregated_round_trip",
            Box::pin(aggregated_round_trip(&client)),
        ),
        (
            "aggregates_across_a_split",
            Box::pin(aggregates_across_a_split(&client)),
        ),
        ("plain_round_trip", Box::pin(plain_round_trip(&client))),
    ];
    let outcomes = join_all(scenarios.into_iter().map(|(name, scenario)| async move {
        let t = Instant::now();
        (name, scenario.await, t.elapsed())
    }))
    .await;
    let mut failed = Vec::new();
    for (name, outcome, took) in outcomes {
        match outcome {
            Ok(()) => println!("ok     {name} ({took:.1?})"),
            Err(e) => {
                println!("FAILED {name} ({took:.1?}): {e:#}");
                failed.push(name);
            }
        }
    }
    println!("total {:.1?}", started.elapsed());
    ensure!(failed.is_empty(), "failed scenarios: {failed:?}");
    Ok(())
}

/// 40 keys × 100 records, records routed by explicit hash keys (several keys per hash key), a
/// key with one record, and a 300 KB record: aggregated, then read back.
async fn aggregated_round_trip(client: &Client) -> anyhow::Result<()> {
    let stream = unique_name("kpl");
    create_stream(client, &stream, 4).await?;
    let kinesis = AwsKinesis::new(client.clone());
    let shards = kinesis.list_shards(&stream).await?;
    let producer = Producer::builder(AwsPutRecords::new(client.clone()), stream.clone())
        .aggregation(true)
        .build()?;

    let mut want = Want::default();
    for i in 0..100 {
        for k in 0..40 {
            want.put(
                &producer,
                UserRecord::new(format!("key-{k}"), payload(k, i)),
            )
            .await?;
        }
    }
    // Explicit hash keys: the start of each shard's range, three keys sharing each.
    for (s, shard) in shards.iter().enumerate() {
        for i in 0..6 {
            let key = format!("ehk-{s}-{}", i % 3);
            let record = UserRecord::new(key, format!("ehk {s} {i}"))
                .with_explicit_hash_key(shard.hash_range.start());
            want.put(&producer, record).await?;
        }
    }
    want.put(&producer, UserRecord::new("lonely", "alone"))
        .await?;
    want.put(&producer, UserRecord::new("key-7", vec![b'z'; 300_000]))
        .await?;
    producer.close().await?;

    let read = read_stream(&kinesis, &stream).await?;
    ensure!(
        read.outer < want.count / 20,
        "{} Kinesis records for {} user records: not aggregated",
        read.outer,
        want.count
    );
    want.check(&read)?;
    for sub in read
        .records
        .iter()
        .filter(|r| r.partition_key.starts_with("ehk-"))
    {
        let s: usize = sub.partition_key[4..5].parse()?;
        ensure!(
            sub.explicit_hash_key == Some(shards[s].hash_range.start()),
            "{} came back with explicit hash key {:?}",
            sub.partition_key,
            sub.explicit_hash_key
        );
    }
    Ok(())
}

/// Aggregates put before and after a split of the shard that holds their keys: per-key order
/// holds across parent and children, and no sub-record is outside the shard it was read from.
async fn aggregates_across_a_split(client: &Client) -> anyhow::Result<()> {
    let stream = unique_name("kpl-split");
    create_stream(client, &stream, 1).await?;
    let kinesis = AwsKinesis::new(client.clone());
    let producer = Producer::builder(AwsPutRecords::new(client.clone()), stream.clone())
        .aggregation(true)
        .max_aggregate_bytes(4 * 1024)
        .build()?;
    let mut want = Want::default();
    for i in 0..60 {
        for k in 0..20 {
            want.put(
                &producer,
                UserRecord::new(format!("key-{k}"), payload(k, i)),
            )
            .await?;
        }
        if i == 29 {
            producer.flush().await?;
            let parent = kinesis.list_shards(&stream).await?;
            split_shard(client, &stream, parent[0].id.as_str(), 1u128 << 127).await?;
        }
    }
    producer.close().await?;
    let read = read_stream(&kinesis, &stream).await?;
    ensure!(read.shards == 3, "{} shards read", read.shards);
    want.check(&read)
}

/// 20 keys × 20 records without aggregation: one record per key per call.
async fn plain_round_trip(client: &Client) -> anyhow::Result<()> {
    let stream = unique_name("plain");
    create_stream(client, &stream, 2).await?;
    let kinesis = AwsKinesis::new(client.clone());
    let producer = Producer::new(AwsPutRecords::new(client.clone()), stream.clone());
    let mut want = Want::default();
    for i in 0..20 {
        for k in 0..20 {
            want.put(
                &producer,
                UserRecord::new(format!("key-{k}"), payload(k, i)),
            )
            .await?;
        }
    }
    producer.close().await?;
    let read = read_stream(&kinesis, &stream).await?;
    ensure!(read.outer == want.count, "{} Kinesis records", read.outer);
    want.check(&read)
}

fn payload(key: usize, i: usize) -> String {
    format!("key-{key} record {i:04}")
}

/// What was put, per key in put order.
#[derive(Default)]
struct Want {
    by_key: BTreeMap<String, Vec<UserRecord>>,
    count: usize,
}

impl Want {
    async fn put(
        &mut self,
        producer: &Producer<AwsPutRecords>,
        record: UserRecord,
    ) -> anyhow::Result<()> {
        self.by_key
            .entry(record.partition_key.clone())
            .or_default()
            .push(record.clone());
        self.count += 1;
        producer.put_record(record).await?;
        Ok(())
    }

    /// Every record came back once, with its key, data and explicit hash key, in put order
    /// per key.
    fn check(&self, read: &Read) -> anyhow::Result<()> {
        let mut got: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
        for r in &read.records {
            got.entry(r.partition_key.clone()).or_default().push(r);
        }
        ensure!(
            read.records.len() == self.count,
            "{} user records read, {} put",
            read.records.len(),
            self.count
        );
        let want_keys: HashSet<&String> = self.by_key.keys().collect();
        let got_keys: HashSet<&String> = got.keys().collect();
        ensure!(want_keys == got_keys, "the keys read differ from those put");
        for (key, want) in &self.by_key {
            let got = &got[key];
            ensure!(
                got.len() == want.len(),
                "key {key}: {} records read, {} put",
                got.len(),
                want.len()
            );
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                if g.data != w.data || g.explicit_hash_key != w.explicit_hash_key {
                    bail!("key {key}: record {i} differs (out of order, or altered)");
                }
            }
        }
        Ok(())
    }
}

/// The user records of a stream, shards in lineage order (closed parents before children).
struct Read {
    records: Vec<Record>,
    /// Kinesis records read (aggregates count once).
    outer: usize,
    shards: usize,
}

async fn read_stream(kinesis: &AwsKinesis, stream: &str) -> anyhow::Result<Read> {
    let mut shards = kinesis.list_shards(stream).await?;
    // Parents first: closed shards, then open ones (one level of resharding at most here).
    shards.sort_by_key(|s| (!s.is_closed(), s.id.clone()));
    let mut read = Read {
        records: Vec::new(),
        outer: 0,
        shards: shards.len(),
    };
    for shard in &shards {
        for outer in read_shard(kinesis, stream, shard).await? {
            read.outer += 1;
            let sequence = outer.sequence_number.clone();
            match deaggregate(outer) {
                Deaggregated::Plain(r) => read.records.push(r),
                Deaggregated::Aggregate(subs) => {
                    for (i, sub) in subs.iter().enumerate() {
                        ensure!(
                            sub.sub_sequence_number == i as u64 && sub.sequence_number == sequence,
                            "sub-record {i} of {sequence} is numbered {}/{}",
                            sub.sequence_number,
                            sub.sub_sequence_number
                        );
                        ensure!(
                            in_range(sub, shard.hash_range),
                            "a sub-record of key {} is outside {}",
                            sub.partition_key,
                            shard.id
                        );
                    }
                    read.records.extend(subs);
                }
                Deaggregated::Invalid { reason, .. } => bail!("an invalid aggregate: {reason}"),
                other => bail!("unexpected {other:?}"),
            }
        }
    }
    Ok(read)
}

/// Every record of a shard: to its end if closed, else until an empty read at the tip.
async fn read_shard(
    kinesis: &AwsKinesis,
    stream: &str,
    shard: &Shard,
) -> anyhow::Result<Vec<Record>> {
    let mut it = kinesis
        .get_shard_iterator(stream, &shard.id, &IteratorPosition::TrimHorizon)
        .await?;
    let mut out = Vec::new();
    for _ in 0..1_000 {
        let page = kinesis.get_records(&it, 10_000).await?;
        let empty = page.records.is_empty();
        for r in &page.records {
            // Plain records route by their own key: they are in the shard too.
            if !r.data.starts_with(&[0xF3, 0x89, 0x9A, 0xC2]) {
                let h = hash_key(&r.partition_key);
                let explicit = r.partition_key.starts_with("ehk-");
                ensure!(
                    explicit || shard.hash_range.contains(h),
                    "plain record of key {} in {}",
                    r.partition_key,
                    shard.id
                );
            }
        }
        out.extend(page.records);
        match page.next_iterator {
            None => return Ok(out),
            Some(_) if empty && page.millis_behind_latest == Some(0) => return Ok(out),
            Some(next) => it = next,
        }
    }
    bail!("shard {} did not end in 1 000 reads", shard.id)
}
