//! `examples/s3_forwarder` writes every record to S3 exactly once, through SIGKILLs
//! (kinesis-local for the stream; moto for the lease table and S3).
//!
//! Two forwarder processes read a 2-shard stream while records are put continuously and one
//! shard is split. Each process is killed with SIGKILL twice and restarted: the first time
//! just after it logged "prepared; uploading" (its uploads go through a proxy that passes every
//! PUT on at once but holds its answer for a second, so the kill lands after the object was
//! stored and before the commit: the next owner must write that object again, under the same
//! key, or the records are in S3 twice), the second time at a random
//! moment. Then both are stopped with SIGTERM (exit 0), and:
//! - every record put is in exactly one line of one object, and no other line exists;
//! - within the objects of a shard (in key order), sequence numbers and each partition key's
//!   payload counters strictly increase;
//! - every key follows `P/YYYY/MM/DD/HH/<shard>/<first seq>-<last seq>.jsonl.gz`, and the
//!   first and last line of each object are those sequence numbers;
//! - at least one object was written again by a new owner (the replay path ran), and no lease
//!   is left with a pending checkpoint.
//!
//! Without the two-phase checkpoint (e.g. committing only, without `prepare`), the object a
//! killed process was uploading is written a second time under another key by the next owner,
//! whose batches end elsewhere: the "exactly one line" check fails with duplicates.

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::time::Duration;

use anyhow::{ensure, Context};
use base64::Engine as _;
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::lease::LeaseStore;
use kcl::SequenceNumber;
use kcl_integration_tests::cli::{example_binary, CliEnv, KclProcess};
use kcl_integration_tests::dynamo_servers::start_moto;
use kcl_integration_tests::kinesis_server::{
    create_stream, kinesis_client, put_records_with_parallelism, split_shard, start_kinesis_local,
};
use kcl_integration_tests::proxy::DelayProxy;
use kcl_integration_tests::{sdk_config, unique_name};
use tokio::time::Instant;

const KEYS: u32 = 20;
const WAVES: u32 = 60;
const WAVE_PAUSE: Duration = Duration::from_millis(300);
const BUCKET: &str = "forwarded";
const PREFIX: &str = "out";

/// One line of an object, parsed.
#[derive(Debug, Clone)]
struct Line {
    shard: String,
    seq: SequenceNumber,
    key: String,
    data: String,
}

fn parse_line(line: &str) -> anyhow::Result<Line> {
    let v: serde_json::Value = serde_json::from_str(line).context("not JSON")?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(v["data"].as_str().context("data")?)
        .context("data is not base64")?;
    ensure!(v["subseq"] == 0, "subseq {} (no KPL here)", v["subseq"]);
    Ok(Line {
        shard: v["shard"].as_str().context("shard")?.to_owned(),
        seq: SequenceNumber::parse(v["seq"].as_str().context("seq")?)?,
        key: v["key"].as_str().context("key")?.to_owned(),
        data: String::from_utf8(data).context("data is not UTF-8")?,
    })
}

/// Every object under the prefix, by key, as parsed lines.
async fn read_objects(s3: &aws_sdk_s3::Client) -> anyhow::Result<BTreeMap<String, Vec<Line>>> {
    let mut objects = BTreeMap::new();
    let mut pages = s3
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix(format!("{PREFIX}/"))
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.context("ListObjectsV2")?;
        for o in page.contents() {
            let key = o.key().context("an object without a key")?.to_owned();
            let body = s3
                .get_object()
                .bucket(BUCKET)
                .key(&key)
                .send()
                .await
                .with_context(|| format!("GetObject {key}"))?
                .body
                .collect()
                .await
                .context("reading an object")?
                .into_bytes();
            let mut text = String::new();
            flate2::read::GzDecoder::new(&body[..])
                .read_to_string(&mut text)
                .with_context(|| format!("{key} is not gzip"))?;
            let lines = text
                .lines()
                .map(parse_line)
                .collect::<anyhow::Result<Vec<_>>>()
                .with_context(|| format!("in {key}"))?;
            objects.insert(key, lines);
        }
    }
    Ok(objects)
}

/// Checks one key against the documented layout and its lines.
fn check_key(key: &str, lines: &[Line]) -> anyhow::Result<()> {
    let parts: Vec<&str> = key.split('/').collect();
    ensure!(
        parts.len() == 7,
        "{key}: expected P/YYYY/MM/DD/HH/shard/name"
    );
    ensure!(parts[0] == PREFIX, "{key}: prefix");
    for (part, len) in parts[1..5].iter().zip([4, 2, 2, 2]) {
        ensure!(
            part.len() == len && part.bytes().all(|b| b.is_ascii_digit()),
            "{key}: date part {part}"
        );
    }
    let (first, last) = (
        lines.first().context("an empty object")?,
        lines.last().context("an empty object")?,
    );
    ensure!(parts[5] == first.shard, "{key}: shard {}", first.shard);
    ensure!(
        parts[6] == format!("{}-{}.jsonl.gz", first.seq, last.seq),
        "{key}: its lines run from {} to {}",
        first.seq,
        last.seq
    );
    Ok(())
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarders_killed_at_any_moment_write_every_record_to_s3_exactly_once(
) -> anyhow::Result<()> {
    let kinesis = start_kinesis_local().await?;
    let moto = start_moto().await?;
    let bin = example_binary("s3_forwarder").await?;
    let client = kinesis_client(&kinesis).await;
    let stream = unique_name("s3-forward");
    let app = unique_name("s3-forward-app");
    create_stream(&client, &stream, 2).await?;
    let conf = sdk_config(&moto.endpoint()).await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&conf)
            .force_path_style(true)
            .build(),
    );
    s3.create_bucket()
        .bucket(BUCKET)
        .send()
        .await
        .context("CreateBucket")?;
    // Every upload's answer is held for a second: kills land between upload and commit.
    let slow_s3 = DelayProxy::start(
        format!("127.0.0.1:{}", moto.port()).parse()?,
        b"PUT ",
        Duration::from_secs(1),
    )
    .await?;
    let env = CliEnv::new(kinesis.endpoint(), moto.endpoint()).with_s3(slow_s3.endpoint());
    let spawn = |id: &str, run: u32| {
        KclProcess::spawn(
            &bin,
            &format!("{id}-{run}"),
            &env,
            [
                "--stream",
                &stream,
                "--app",
                &app,
                "--bucket",
                BUCKET,
                "--prefix",
                PREFIX,
                "--max-bytes",
                "100000",
                "--max-age",
                "2",
                "--gzip",
                "--worker-id",
                id,
                "--lease-duration",
                "3",
            ],
        )
    };

    // The producer: waves of one record per key, payload "key/n", in order per key.
    let producer = {
        let client = client.clone();
        let stream = stream.clone();
        tokio::spawn(async move {
            let mut puts = Vec::new();
            for n in 0..WAVES {
                let wave = (0..KEYS)
                    .map(|k| (format!("k{k}"), format!("k{k}/{n}").into_bytes()))
                    .collect();
                puts.extend(put_records_with_parallelism(&client, &stream, wave, 1).await?);
                tokio::time::sleep(WAVE_PAUSE).await;
            }
            anyhow::Ok(puts)
        })
    };

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    eprintln!("random kill times: seed {seed}");
    let mut rng_state = seed | 1;
    let mut random_ms = |max: u64| {
        // xorshift: reproducible from the printed seed.
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state % max
    };

    let started = Instant::now();
    let mut f1 = spawn("f1", 0)?;
    let mut f2 = spawn("f2", 0)?;
    let mut replays = 0;
    for (round, split) in [(1u32, true), (2, false)] {
        for (id, proc) in [("f1", &mut f1), ("f2", &mut f2)] {
            if round == 1 {
                // Just after a prepare: the upload is in flight for a second.
                let before = count(&proc.stderr(), "prepared; uploading");
                proc.wait_for_stderr("an upload", Duration::from_secs(60), |s| {
                    count(s, "prepared; uploading") > before
                })
                .await?;
            } else {
                tokio::time::sleep(Duration::from_millis(random_ms(3_000))).await;
            }
            replays += count(&proc.stderr(), "written again");
            proc.kill().await?;
            eprintln!("{:.1?}: killed {id} (round {round})", started.elapsed());
            tokio::time::sleep(Duration::from_millis(500 + random_ms(1_500))).await;
            *proc = spawn(id, round)?;
        }
        if split {
            let shard = "shardId-000000000000";
            split_shard(&client, &stream, shard, 1u128 << 126).await?;
            eprintln!("{:.1?}: split {shard}", started.elapsed());
        }
    }
    let puts = producer.await.context("producer panicked")??;
    let expected: HashMap<(String, SequenceNumber), String> = puts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (k, n) = (i as u32 % KEYS, i as u32 / KEYS);
            (
                (p.shard_id.to_string(), p.sequence_number.clone()),
                format!("k{k}/{n}"),
            )
        })
        .collect();
    ensure!(
        expected.len() == (KEYS * WAVES) as usize,
        "distinct sequence numbers"
    );

    // Everything reaches S3 (the last objects after --max-age).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let objects = read_objects(&s3).await?;
        let lines: usize = objects.values().map(Vec::len).sum();
        if lines >= expected.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for (id, proc) in [("f1", &mut f1), ("f2", &mut f2)] {
        replays += count(&proc.stderr(), "written again");
        let (status, took) = proc.terminate(Duration::from_secs(30)).await?;
        ensure!(status.success(), "{id} exited with {status} after SIGTERM");
        eprintln!("{id} stopped in {took:.1?}");
    }

    let objects = read_objects(&s3).await?;
    let mut seen: HashMap<(String, SequenceNumber), usize> = HashMap::new();
    for (key, lines) in &objects {
        check_key(key, lines)?;
        for l in lines {
            let id = (l.shard.clone(), l.seq.clone());
            let wanted = expected
                .get(&id)
                .with_context(|| format!("{key}: a line for no record put: {l:?}"))?;
            ensure!(*wanted == l.data, "{key}: {l:?} should carry {wanted}");
            ensure!(
                l.data.starts_with(&format!("{}/", l.key)),
                "{key}: key of {l:?}"
            );
            *seen.entry(id).or_default() += 1;
        }
    }
    let missing: Vec<_> = expected
        .keys()
        .filter(|id| !seen.contains_key(*id))
        .collect();
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(
        missing.is_empty() && twice.is_empty(),
        "{} objects: {} records missing (e.g. {:?}), {} written more than once (e.g. {:?})",
        objects.len(),
        missing.len(),
        missing.first(),
        twice.len(),
        twice.first()
    );

    // Per shard, in key order (each shard's objects share the date prefix only within an
    // hour: order them by first sequence number instead).
    let mut by_shard: BTreeMap<String, Vec<&Vec<Line>>> = BTreeMap::new();
    for lines in objects.values() {
        by_shard
            .entry(lines[0].shard.clone())
            .or_default()
            .push(lines);
    }
    for (shard, mut objs) in by_shard {
        objs.sort_by_key(|o| o[0].seq.clone());
        let mut last_seq: Option<&SequenceNumber> = None;
        let mut last_n: HashMap<&str, u32> = HashMap::new();
        for l in objs.into_iter().flatten() {
            ensure!(
                last_seq.is_none_or(|prev| l.seq > *prev),
                "{shard}: sequence {} after {last_seq:?}",
                l.seq
            );
            last_seq = Some(&l.seq);
            let n: u32 = l.data.rsplit('/').next().unwrap_or("").parse()?;
            if let Some(prev) = last_n.insert(&l.key, n) {
                ensure!(n > prev, "{shard}: {} after {}/{prev}", l.data, l.key);
            }
        }
    }
    ensure!(
        replays > 0,
        "no new owner wrote a killed process's object again: the kills missed the \
         prepare-to-commit window"
    );

    let table = DynamoLeaseStore::from_conf(&conf, app.clone())
        .list()
        .await?;
    for lease in &table.leases {
        ensure!(
            lease.pending_checkpoint.is_none() && lease.owner.is_none(),
            "after SIGTERM every lease is released with nothing pending: {lease:?}"
        );
    }
    eprintln!(
        "{} records in {} objects, {replays} objects written again by a new owner, {:.1?}",
        expected.len(),
        objects.len(),
        started.elapsed()
    );
    Ok(())
}
