//! `AwsKinesis` (the `KinesisApi` over aws-sdk-kinesis) against kinesis-local: shard listing
//! across pages, every iterator position, reading a split parent to its end (no next iterator,
//! `ChildShards` with the right hash ranges), merges, error classification, and a bulk load
//! read back record by record.
//!
//! One kinesis-local serves every scenario (it takes ~1 s and ~300 MiB to start); each
//! scenario uses its own stream and they run concurrently, the bulk load last and alone. Every
//! scenario's outcome is reported, then the test fails if any failed. The 10 000-record load
//! measurement is an ignored test of its own.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context};
use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::Client;
use futures::future::join_all;
use kcl::retrieval::aws::AwsKinesis;
use kcl::retrieval::{IteratorPosition, ShardIterator};
use kcl::shard::{hash_key, ChildShard, HashKeyRange, Shard};
use kcl::{KinesisApi, KinesisApiError, Record, ShardId};
use kcl_integration_tests::kinesis_server::{
    create_stream, kinesis_client, merge_shards, put_records, split_shard, start_kinesis_local, Put,
};
use kcl_integration_tests::{free_port, sdk_config, unique_name};

type Scenario<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_kinesis_against_kinesis_local() -> anyhow::Result<()> {
    let started = Instant::now();
    let server = start_kinesis_local().await?;
    let endpoint = server.endpoint();
    let client = kinesis_client(&server).await;
    println!("kinesis-local up in {:?}", started.elapsed());

    let concurrent: Vec<(&str, Scenario<'_>)> = vec![
        (
            "list_shards_paginates",
            Box::pin(list_shards_paginates(&client)),
        ),
        ("iterator_positions", Box::pin(iterator_positions(&client))),
        ("split_then_merge", Box::pin(split_then_merge(&client))),
        (
            "errors_are_classified",
            Box::pin(errors_are_classified(&client, &endpoint)),
        ),
    ];
    let mut outcomes = join_all(concurrent.into_iter().map(|(name, scenario)| async move {
        let t = Instant::now();
        (name, scenario.await, t.elapsed())
    }))
    .await;
    let t = Instant::now();
    outcomes.push((
        "bulk_load_and_read_back",
        bulk_load_and_read_back(&client, 2_000, 16).await,
        t.elapsed(),
    ));

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

/// ListShards over several pages: 120 shards, a 7-shard first page, then kinesis-local's
/// pages (at most 100); and with the default first page (1000, capped at 100 by the server).
async fn list_shards_paginates(client: &Client) -> anyhow::Result<()> {
    let stream = unique_name("paged");
    create_stream(client, &stream, 120).await?;
    let small_pages = AwsKinesis::new(client.clone()).with_list_shards_page_size(7);
    let shards = small_pages.list_shards(&stream).await?;
    check_even_open_shards(&shards, 120).context("7-shard first page")?;
    // kinesis-local caps a page at 100 shards even when asked for 1000 (AWS allows 10 000),
    // so the default also takes two pages here.
    let first_page = client
        .list_shards()
        .stream_name(&stream)
        .max_results(1000)
        .send()
        .await?;
    ensure!(
        first_page.shards().len() < 120 && first_page.next_token().is_some(),
        "kinesis-local returned {} shards in one page: the default path does not paginate",
        first_page.shards().len()
    );
    let default_pages = AwsKinesis::new(client.clone());
    let again = default_pages.list_shards(&stream).await?;
    ensure!(again == shards, "the default page size lists other shards");
    Ok(())
}

/// `n` open shards without parents, distinct ids, whose ranges tile the hash-key space.
fn check_even_open_shards(shards: &[Shard], n: usize) -> anyhow::Result<()> {
    ensure!(
        shards.len() == n,
        "{} shards listed, want {n}",
        shards.len()
    );
    let ids: HashSet<_> = shards.iter().map(|s| s.id.clone()).collect();
    ensure!(ids.len() == n, "duplicate shard ids");
    let mut ranges: Vec<HashKeyRange> = shards.iter().map(|s| s.hash_range).collect();
    ranges.sort();
    ensure!(
        ranges[0].start() == 0,
        "the first range starts at {}",
        ranges[0].start()
    );
    ensure!(
        ranges[n - 1].end() == u128::MAX,
        "the last range ends before 2^128-1"
    );
    for w in ranges.windows(2) {
        ensure!(
            w[0].end() + 1 == w[1].start(),
            "gap or overlap: {:?} {:?}",
            w[0],
            w[1]
        );
    }
    for s in shards {
        ensure!(!s.is_closed(), "{} is closed", s.id);
        ensure!(s.parents().next().is_none(), "{} has parents", s.id);
    }
    Ok(())
}

/// TRIM_HORIZON, LATEST, AT_SEQUENCE_NUMBER, AFTER_SEQUENCE_NUMBER and AT_TIMESTAMP each
/// start at the right record; `limit` is honoured; records keep data, key and sequence.
async fn iterator_positions(client: &Client) -> anyhow::Result<()> {
    let api = AwsKinesis::new(client.clone());
    let stream = unique_name("positions");
    create_stream(client, &stream, 1).await?;
    let shard = single_shard(&api, &stream).await?;

    let before_first = SystemTime::now() - Duration::from_secs(1);
    let first_batch = batch("first", 10);
    let first = put_records(client, &stream, first_batch.clone()).await?;
    let latest = api
        .get_shard_iterator(&stream, &shard, &IteratorPosition::Latest)
        .await?;
    // Arrival times of the two batches must fall on either side of `between`.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let between = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second_batch = batch("second", 10);
    let second = put_records(client, &stream, second_batch.clone()).await?;
    let all_batch: Vec<_> = first_batch.iter().chain(&second_batch).cloned().collect();
    let all: Vec<_> = first.iter().chain(&second).cloned().collect();
    ensure!(
        all.windows(2)
            .all(|w| w[0].sequence_number < w[1].sequence_number),
        "sequence numbers of one shard do not rise"
    );

    let read = |position: IteratorPosition| {
        let (api, stream, shard) = (&api, &stream, &shard);
        async move {
            let it = api.get_shard_iterator(stream, shard, &position).await?;
            read_exactly(api, it, usize::MAX, 10_000).await
        }
    };
    let trim = read(IteratorPosition::TrimHorizon).await?;
    expect_records(&trim, &all_batch, &all).context("TRIM_HORIZON")?;
    for r in &trim {
        let arrival = r.approximate_arrival.context("no approximate arrival")?;
        ensure!(
            arrival >= before_first && arrival <= SystemTime::now() + Duration::from_secs(1),
            "arrival {arrival:?} is not around now"
        );
    }

    let after_latest = read_exactly(&api, latest, 10, 10_000).await?;
    expect_records(&after_latest, &second_batch, &second).context("LATEST")?;

    let at = read(IteratorPosition::AtSequence(
        first[4].sequence_number.clone(),
    ))
    .await?;
    expect_records(&at, &all_batch[4..], &all[4..]).context("AT_SEQUENCE_NUMBER")?;

    let after = read(IteratorPosition::AfterSequence(
        first[4].sequence_number.clone(),
    ))
    .await?;
    expect_records(&after, &all_batch[5..], &all[5..]).context("AFTER_SEQUENCE_NUMBER")?;

    let at_time = read(IteratorPosition::AtTimestamp(between)).await?;
    expect_records(&at_time, &second_batch, &second).context("AT_TIMESTAMP")?;

    // `limit` caps a response; the next iterator continues right after it.
    let it = api
        .get_shard_iterator(&stream, &shard, &IteratorPosition::TrimHorizon)
        .await?;
    let page = api.get_records(&it, 3).await?;
    expect_records(&page.records, &all_batch[..3], &all[..3]).context("limit 3")?;
    ensure!(page.millis_behind_latest.is_some(), "no MillisBehindLatest");
    ensure!(
        page.child_shards.is_empty(),
        "an open shard reported children"
    );
    let next = page.next_iterator.context("an open shard ended")?;
    let rest = read_exactly(&api, next, 17, 10_000).await?;
    expect_records(&rest, &all_batch[3..], &all[3..]).context("after limit 3")?;
    Ok(())
}

/// After a split, the parent reads to its end: exactly its records, then no next iterator
/// and both children with the two halves of its range; the children got the later records.
/// After merging the children, each of them ends with the merged child.
async fn split_then_merge(client: &Client) -> anyhow::Result<()> {
    let api = AwsKinesis::new(client.clone());
    let stream = unique_name("split");
    create_stream(client, &stream, 1).await?;
    let parent = single_shard(&api, &stream).await?;
    let pre_batch = batch("pre", 30);
    let pre = put_records(client, &stream, pre_batch.clone()).await?;

    let middle = 1u128 << 127;
    split_shard(client, &stream, parent.as_str(), middle).await?;
    let post_batch = batch("post", 40);
    let post = put_records(client, &stream, post_batch.clone()).await?;

    let (records, children) = read_to_end(&api, &stream, &parent).await?;
    expect_records(&records, &pre_batch, &pre).context("the parent's records")?;
    let (lo, hi) = HashKeyRange::FULL.split_at(middle).context("split point")?;
    let mut children = children;
    children.sort_by_key(|c| c.hash_range);
    ensure!(children.len() == 2, "children {children:?}");
    for (child, range) in children.iter().zip([lo, hi]) {
        ensure!(
            child.hash_range == range,
            "child {child:?}, want range {range:?}"
        );
        ensure!(
            child.parents == vec![parent.clone()],
            "child {child:?}: parents"
        );
    }

    let shards = api.list_shards(&stream).await?;
    ensure!(shards.len() == 3, "{} shards after the split", shards.len());
    let by_id: BTreeMap<_, _> = shards.iter().map(|s| (s.id.clone(), s)).collect();
    let closed = by_id.get(&parent).context("the parent is not listed")?;
    // kinesis-local reports 9223372036854775807 (i64::MAX) as every closed shard's ending
    // sequence number, below its real 56-digit ones: only check that it is there.
    ensure!(closed.is_closed(), "the parent is not closed: {closed:?}");
    let last_pre = &pre[pre.len() - 1].sequence_number;
    for child in &children {
        let listed = by_id.get(&child.id).context("a child is not listed")?;
        ensure!(!listed.is_closed(), "{} is closed", child.id);
        ensure!(
            listed.hash_range == child.hash_range,
            "{}: listed range differs",
            child.id
        );
        ensure!(
            listed.parent.as_ref() == Some(&parent),
            "{}: listed parent",
            child.id
        );
        ensure!(
            listed.starting_sequence > *last_pre,
            "{} starts before its parent's last record",
            child.id
        );
    }

    // The later records went to the children, by hash key.
    let mut read_post = Vec::new();
    for child in &children {
        let it = api
            .get_shard_iterator(&stream, &child.id, &IteratorPosition::TrimHorizon)
            .await?;
        let records = read_exactly(&api, it, usize::MAX, 10_000).await?;
        for r in &records {
            ensure!(
                child.hash_range.contains(hash_key(&r.partition_key)),
                "{} holds key {} outside its range",
                child.id,
                r.partition_key
            );
        }
        read_post.extend(records);
    }
    read_post.sort_by(|a, b| a.sequence_number.cmp(&b.sequence_number));
    let mut expected: Vec<_> = post_batch
        .iter()
        .cloned()
        .zip(post.iter().cloned())
        .collect();
    expected.sort_by(|a, b| a.1.sequence_number.cmp(&b.1.sequence_number));
    let (expected_batch, expected_puts): (Vec<_>, Vec<_>) = expected.into_iter().unzip();
    expect_records(&read_post, &expected_batch, &expected_puts).context("the children")?;

    // Merge the children back: each ends with the merged child, which has both as parents.
    merge_shards(
        client,
        &stream,
        children[0].id.as_str(),
        children[1].id.as_str(),
    )
    .await?;
    let mut merged = None;
    for child in &children {
        let (records, grandchildren) = read_to_end(&api, &stream, &child.id).await?;
        ensure!(
            records
                .iter()
                .all(|r| child.hash_range.contains(hash_key(&r.partition_key))),
            "{}: a record outside its range",
            child.id
        );
        ensure!(
            grandchildren.len() == 1,
            "{}: children {grandchildren:?}",
            child.id
        );
        let g = &grandchildren[0];
        ensure!(
            g.hash_range == HashKeyRange::FULL,
            "merged range {:?}",
            g.hash_range
        );
        let parents: HashSet<_> = g.parents.iter().cloned().collect();
        let want: HashSet<_> = children.iter().map(|c| c.id.clone()).collect();
        ensure!(parents == want, "merged parents {:?}", g.parents);
        if let Some(previous) = merged.replace(g.id.clone()) {
            ensure!(
                previous == g.id,
                "the children end with different merged shards"
            );
        }
    }
    let merged = merged.context("no merged child")?;
    let shards = api.list_shards(&stream).await?;
    ensure!(shards.len() == 4, "{} shards after the merge", shards.len());
    let listed = shards
        .iter()
        .find(|s| s.id == merged)
        .context("the merged shard is not listed")?;
    ensure!(
        listed.parents().count() == 2,
        "the merged shard's parents: {listed:?}"
    );
    ensure!(
        shards.iter().filter(|s| !s.is_closed()).count() == 1,
        "open shards after merge"
    );
    Ok(())
}

/// Unknown streams and shards are `NotFound`; a malformed shard id is `Other` (a validation
/// error); a garbage iterator (HTTP 500) and an unreachable endpoint are `Transient`.
async fn errors_are_classified(client: &Client, endpoint: &str) -> anyhow::Result<()> {
    let api = AwsKinesis::new(client.clone());
    let stream = unique_name("errors");
    create_stream(client, &stream, 1).await?;
    let shard = single_shard(&api, &stream).await?;

    match api.list_shards("no-such-stream").await {
        Err(KinesisApiError::NotFound(what)) => {
            ensure!(
                what.contains("no-such-stream"),
                "NotFound({what:?}) does not name it"
            )
        }
        other => bail!("list_shards of an unknown stream: {other:?}"),
    }
    let unknown = ShardId::new("shardId-000000009999");
    match api
        .get_shard_iterator(&stream, &unknown, &IteratorPosition::TrimHorizon)
        .await
    {
        Err(KinesisApiError::NotFound(what)) => ensure!(
            what.contains("shardId-000000009999"),
            "NotFound({what:?}) does not name the shard"
        ),
        other => bail!("iterator of an unknown shard: {other:?}"),
    }
    match api
        .get_shard_iterator("no-such-stream", &shard, &IteratorPosition::Latest)
        .await
    {
        Err(KinesisApiError::NotFound(_)) => {}
        other => bail!("iterator in an unknown stream: {other:?}"),
    }
    // A malformed shard id is a validation error (InvalidArgumentException): not retryable.
    let garbage = ShardId::new("not a shard id!");
    match api
        .get_shard_iterator(&stream, &garbage, &IteratorPosition::TrimHorizon)
        .await
    {
        Err(e @ KinesisApiError::Other(_)) => ensure!(!e.is_retryable()),
        other => bail!("iterator of a garbage shard id: {other:?}"),
    }

    // kinesis-local answers a garbage iterator with HTTP 500, which the SDK retries; without
    // retries it must surface as Transient.
    let no_retries = aws_sdk_kinesis::config::Builder::from(&sdk_config(endpoint).await)
        .retry_config(RetryConfig::disabled())
        .build();
    let strict = AwsKinesis::new(Client::from_conf(no_retries));
    match strict.get_records(&ShardIterator::new("garbage"), 10).await {
        Err(e @ KinesisApiError::Transient(_)) => ensure!(e.is_retryable()),
        other => bail!("garbage iterator: {other:?}"),
    }

    // Nothing listens on a fresh free port: a dispatch failure is Transient.
    let nowhere = format!("http://127.0.0.1:{}", free_port()?);
    let no_retries = aws_sdk_kinesis::config::Builder::from(&sdk_config(&nowhere).await)
        .retry_config(RetryConfig::disabled())
        .build();
    let unreachable = AwsKinesis::new(Client::from_conf(no_retries));
    match unreachable.list_shards(&stream).await {
        Err(KinesisApiError::Transient(_)) => {}
        other => bail!("unreachable endpoint: {other:?}"),
    }
    Ok(())
}

/// The 10 000-record load rate (~25 s): `cargo test -p kcl-integration-tests --test
/// retrieval_aws_kinesis -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a ~25 s measurement; run explicitly"]
async fn put_records_load_rate() -> anyhow::Result<()> {
    let server = start_kinesis_local().await?;
    let client = kinesis_client(&server).await;
    bulk_load_and_read_back(&client, 10_000, 16).await
}

/// Loads `count` records of 1 KiB into `shards` shards with `put_records`, reports the rate,
/// and reads every record back from the shard it went to.
async fn bulk_load_and_read_back(client: &Client, count: usize, shards: u32) -> anyhow::Result<()> {
    let api = AwsKinesis::new(client.clone());
    let stream = unique_name("bulk");
    create_stream(client, &stream, shards).await?;
    let records: Vec<(String, Vec<u8>)> = (0..count)
        .map(|i| {
            let mut data = format!("record-{i:05}-").into_bytes();
            data.resize(1024, b'x');
            (format!("key-{i}"), data)
        })
        .collect();
    let t = Instant::now();
    let puts = put_records(client, &stream, records.clone()).await?;
    let took = t.elapsed();
    println!(
        "put_records: {count} records of 1 KiB into {shards} shards in {took:.2?} \
         ({:.0} records/s)",
        count as f64 / took.as_secs_f64()
    );
    ensure!(puts.len() == count, "{} puts", puts.len());

    let t = Instant::now();
    let mut seen = 0;
    let mut by_seq: BTreeMap<_, _> = puts
        .iter()
        .zip(&records)
        .map(|(p, r)| (p.sequence_number.clone(), (p.shard_id.clone(), r)))
        .collect();
    for shard in api.list_shards(&stream).await? {
        let it = api
            .get_shard_iterator(&stream, &shard.id, &IteratorPosition::TrimHorizon)
            .await?;
        for r in read_exactly(&api, it, usize::MAX, 10_000).await? {
            let (put_shard, (key, data)) = by_seq
                .remove(&r.sequence_number)
                .with_context(|| format!("unexpected or repeated {:?}", r.sequence_number))?;
            ensure!(
                put_shard == shard.id,
                "{:?} read from the wrong shard",
                r.sequence_number
            );
            ensure!(
                &r.partition_key == key && r.data == data[..],
                "record content differs"
            );
            seen += 1;
        }
    }
    ensure!(by_seq.is_empty(), "{} records not read back", by_seq.len());
    let took = t.elapsed();
    println!(
        "read back {seen} records in {took:.2?} ({:.0} records/s)",
        seen as f64 / took.as_secs_f64()
    );
    Ok(())
}

fn batch(prefix: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            (
                format!("{prefix}-key-{i}"),
                format!("{prefix}-{i}").into_bytes(),
            )
        })
        .collect()
}

async fn single_shard(api: &AwsKinesis, stream: &str) -> anyhow::Result<ShardId> {
    let shards = api.list_shards(stream).await?;
    ensure!(shards.len() == 1, "{} shards", shards.len());
    Ok(shards[0].id.clone())
}

/// Reads from `it` until `want` records arrived (or, with `usize::MAX`, until the shard's tip
/// or end), then checks that nothing more follows.
async fn read_exactly(
    api: &AwsKinesis,
    mut it: ShardIterator,
    want: usize,
    limit: u32,
) -> anyhow::Result<Vec<Record>> {
    let mut records = Vec::new();
    for _ in 0..200 {
        let out = api.get_records(&it, limit).await?;
        let empty = out.records.is_empty();
        records.extend(out.records);
        let Some(next) = out.next_iterator else {
            break;
        };
        it = next;
        let caught_up = empty && out.millis_behind_latest == Some(0);
        if records.len() >= want || (want == usize::MAX && caught_up) {
            if records.len() >= want {
                let extra = api.get_records(&it, limit).await?;
                ensure!(
                    extra.records.is_empty(),
                    "{} records too many",
                    extra.records.len()
                );
            }
            return Ok(records);
        }
    }
    ensure!(
        want == usize::MAX || records.len() >= want,
        "read {} records, want {want}",
        records.len()
    );
    Ok(records)
}

/// Reads a shard from TRIM_HORIZON to its end: its records and the children reported there.
async fn read_to_end(
    api: &AwsKinesis,
    stream: &str,
    shard: &ShardId,
) -> anyhow::Result<(Vec<Record>, Vec<ChildShard>)> {
    let mut it = api
        .get_shard_iterator(stream, shard, &IteratorPosition::TrimHorizon)
        .await?;
    let mut records = Vec::new();
    for _ in 0..200 {
        let out = api.get_records(&it, 7).await?;
        records.extend(out.records);
        match out.next_iterator {
            Some(next) => {
                ensure!(out.child_shards.is_empty(), "children before the end");
                it = next;
            }
            None => return Ok((records, out.child_shards)),
        }
    }
    bail!("{shard} did not end")
}

/// `records` are exactly `sent` with the sequence numbers `puts`, in order.
fn expect_records(
    records: &[Record],
    sent: &[(String, Vec<u8>)],
    puts: &[Put],
) -> anyhow::Result<()> {
    ensure!(
        records.len() == sent.len(),
        "{} records, want {}: {:?}",
        records.len(),
        sent.len(),
        records.iter().map(|r| &r.partition_key).collect::<Vec<_>>()
    );
    for ((r, (key, data)), put) in records.iter().zip(sent).zip(puts) {
        ensure!(
            &r.partition_key == key,
            "key {}, want {key}",
            r.partition_key
        );
        ensure!(r.data == data[..], "data of {key} differs");
        ensure!(
            r.sequence_number == put.sequence_number,
            "{key}: sequence {}, want {}",
            r.sequence_number,
            put.sequence_number
        );
        ensure!(r.sub_sequence_number == 0, "{key}: sub-sequence number");
    }
    Ok(())
}
