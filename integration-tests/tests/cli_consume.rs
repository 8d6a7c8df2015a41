//! The `kcl` command-line tool, run as a process against the real local servers (kinesis-local
//! for the stream; dynalite and moto for the lease table), configured only through the
//! standard AWS environment variables:
//!
//! - `kcl consume` prints every record exactly once as one JSON line in the documented form,
//!   nothing else on stdout; SIGTERM stops it with exit code 0 within a few seconds, every
//!   lease released and checkpointed at the last record printed for its shard;
//! - a second run on the same application prints only what was not checkpointed;
//! - `kcl leases` prints the lease table as a readable table and, with `--json`, as a JSON
//!   array with the table's own attribute names;
//! - invalid input fails fast, naming the field;
//! - a record whose line could not be written is never checkpointed: a closed stdout (EPIPE)
//!   stops `kcl consume` with a non-zero exit and its leases released, and a stdout that
//!   fails every write (ENOSPC) keeps every checkpoint where it was through a SIGTERM; a
//!   second run then prints every record the first did not write.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context};
use aws_sdk_dynamodb::types::AttributeValue;
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::lease::LeaseStore;
use kcl::retrieval::aws::AwsKinesis;
use kcl::retrieval::KinesisApi;
use kcl::shard::Shard;
use kcl::{ExtendedSequenceNumber, Lease, SequenceNumber};
use kcl_integration_tests::cli::{
    kcl_binary, parse_lines, run_kcl, CliEnv, KclProcess, OutputRecord,
};
use kcl_integration_tests::dynamo_servers::{start_dynalite, start_moto};
use kcl_integration_tests::kinesis_server::{
    create_stream, kinesis_client, put_records, start_kinesis_local,
};
use kcl_integration_tests::{free_port, sdk_config, unique_name, ServerProcess};
use tokio::time::Instant;

/// Records per shard in the first wave.
const PER_SHARD: usize = 300;
/// Records in the second wave (spread over both shards).
const SECOND_WAVE: usize = 100;
/// How long a `kcl consume` may take to print a wave.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(90);
/// How long SIGTERM → exit may take ("within a few seconds").
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a run that must print nothing more is watched.
const QUIET_PERIOD: Duration = Duration::from_millis(1500);

/// A partition key with JSON-special characters (quotes, backslash) and non-ASCII text.
const ODD_KEY: &str = "odd \"quoted\" \\ key: ünïcödé ключ 🦀 \t\u{7f}";
/// A payload that is not UTF-8 (and holds a newline, a quote and a NUL).
const BINARY_PAYLOAD: &[u8] = &[0xff, 0xfe, 0x00, 0x80, 0xc3, 0x28, b'\n', b'"', 0xf0, 0x9f];

enum Table {
    Dynalite,
    Moto,
}

async fn start_table(kind: Table) -> anyhow::Result<ServerProcess> {
    match kind {
        Table::Dynalite => start_dynalite().await,
        Table::Moto => start_moto().await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_resume_and_leases_on_dynalite() -> anyhow::Result<()> {
    consume_resume_and_leases(Table::Dynalite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_resume_and_leases_on_moto() -> anyhow::Result<()> {
    consume_resume_and_leases(Table::Moto).await
}

/// The first wave: exactly `PER_SHARD` records per shard (keys chosen by their hash), among
/// them one with [`ODD_KEY`] and one with [`BINARY_PAYLOAD`].
fn first_wave(shards: &[Shard]) -> Vec<(String, Vec<u8>)> {
    let shard_of = |key: &str| {
        let h = kcl::shard::hash_key(key);
        shards
            .iter()
            .position(|s| s.hash_range.contains(h))
            .expect("the open shards cover the hash-key space")
    };
    let mut counts = vec![0usize; shards.len()];
    let mut records = Vec::new();
    for (key, data) in [
        (
            ODD_KEY.to_owned(),
            "payload of the odd key: ✓".as_bytes().to_vec(),
        ),
        ("binary-payload".to_owned(), BINARY_PAYLOAD.to_vec()),
    ] {
        counts[shard_of(&key)] += 1;
        records.push((key, data));
    }
    let mut i = 0;
    while counts.iter().any(|&c| c < PER_SHARD) {
        let key = format!("key-{i}");
        let s = shard_of(&key);
        if counts[s] < PER_SHARD {
            counts[s] += 1;
            records.push((key, format!("record {i} of wave 1").into_bytes()));
        }
        i += 1;
    }
    records
}

/// What `kcl consume` must print for `records` put where `puts` says.
fn expected(
    stream: &str,
    records: &[(String, Vec<u8>)],
    puts: &[kcl_integration_tests::kinesis_server::Put],
) -> BTreeSet<OutputRecord> {
    records
        .iter()
        .zip(puts)
        .map(|((key, data), put)| OutputRecord {
            stream: stream.to_owned(),
            shard: put.shard_id.as_str().to_owned(),
            seq: put.sequence_number.clone(),
            subseq: 0,
            key: key.clone(),
            data: data.clone(),
        })
        .collect()
}

/// Parses a run's stdout, checks every line is a record in the documented form, no record
/// twice, and per shard strictly increasing sequence numbers; returns the records.
fn check_output(p: &KclProcess) -> anyhow::Result<Vec<OutputRecord>> {
    let lines = p.lines();
    for (i, l) in lines.iter().enumerate() {
        ensure!(
            l.utf8,
            "stdout line {} of {} is not UTF-8: {:?}",
            i + 1,
            p.label(),
            l.text
        );
    }
    ensure!(
        p.partial_line().is_empty(),
        "{} ended stdout with an unterminated line: {:?}",
        p.label(),
        String::from_utf8_lossy(&p.partial_line())
    );
    let records = parse_lines(lines.iter().map(|l| l.text.as_str()))
        .with_context(|| format!("stdout of {}", p.label()))?;
    let mut last: BTreeMap<&str, &SequenceNumber> = BTreeMap::new();
    for r in &records {
        if let Some(prev) = last.insert(&r.shard, &r.seq) {
            ensure!(
                prev < &r.seq,
                "{}: shard {} printed {} after {prev}",
                p.label(),
                r.shard,
                r.seq
            );
        }
    }
    Ok(records)
}

/// Every record of `got` is in `want` exactly once and vice versa.
fn check_exactly(
    got: &[OutputRecord],
    want: &BTreeSet<OutputRecord>,
    what: &str,
) -> anyhow::Result<()> {
    let got_set: BTreeSet<OutputRecord> = got.iter().cloned().collect();
    ensure!(
        got_set.len() == got.len(),
        "{what}: {} lines but {} distinct records",
        got.len(),
        got_set.len()
    );
    let missing: Vec<_> = want.difference(&got_set).take(3).collect();
    let extra: Vec<_> = got_set.difference(want).take(3).collect();
    ensure!(
        missing.is_empty() && extra.is_empty(),
        "{what}: {} records missing (e.g. {missing:?}), {} unexpected (e.g. {extra:?})",
        want.difference(&got_set).count(),
        got_set.difference(want).count()
    );
    Ok(())
}

/// The last sequence number printed per shard.
fn last_per_shard(records: &[OutputRecord]) -> BTreeMap<String, SequenceNumber> {
    let mut last = BTreeMap::new();
    for r in records {
        last.insert(r.shard.clone(), r.seq.clone());
    }
    last
}

/// After a graceful stop: one lease per shard, none owned, none mid-handoff, each checkpointed
/// at the last record printed for its shard (or, for a shard nothing was printed for this
/// run, at `before`'s checkpoint).
fn check_released(
    leases: &[Lease],
    shards: &[Shard],
    last: &BTreeMap<String, SequenceNumber>,
) -> anyhow::Result<()> {
    ensure!(
        leases.len() == shards.len(),
        "{} leases for {} shards: {leases:?}",
        leases.len(),
        shards.len()
    );
    for l in leases {
        ensure!(
            l.owner.is_none() && l.checkpoint_owner.is_none(),
            "lease {} still owned after SIGTERM: {l:?}",
            l.key.as_str()
        );
        let want = last
            .get(l.key.as_str())
            .with_context(|| format!("nothing printed for lease {}", l.key.as_str()))?;
        ensure!(
            l.checkpoint == ExtendedSequenceNumber::at(want.clone(), 0),
            "lease {} checkpointed at {} but the last record printed was {want}",
            l.key.as_str(),
            l.checkpoint
        );
    }
    Ok(())
}

async fn consume_resume_and_leases(table: Table) -> anyhow::Result<()> {
    let test_start = Instant::now();
    let (bin, kinesis, dynamo) =
        tokio::try_join!(kcl_binary(), start_kinesis_local(), start_table(table))?;
    let env = CliEnv::new(kinesis.endpoint(), dynamo.endpoint());
    let client = kinesis_client(&kinesis).await;
    let stream = unique_name("cli-stream");
    let app = unique_name("cli-app");
    let leases = DynamoLeaseStore::from_conf(&sdk_config(&dynamo.endpoint()).await, app.clone());

    create_stream(&client, &stream, 2).await?;
    let mut shards = AwsKinesis::new(client.clone()).list_shards(&stream).await?;
    shards.sort_by(|a, b| a.id.cmp(&b.id));
    ensure!(shards.len() == 2, "expected 2 shards, got {shards:?}");
    let wave1 = first_wave(&shards);
    let puts = put_records(&client, &stream, wave1.clone()).await?;
    let want1 = expected(&stream, &wave1, &puts);
    for s in &shards {
        let n = want1.iter().filter(|r| r.shard == s.id.as_str()).count();
        ensure!(
            n == PER_SHARD,
            "{n} records went to {} (hash routing differs?)",
            s.id
        );
    }
    eprintln!(
        "setup (build check, servers, stream, {} records): {:.1?}",
        want1.len(),
        test_start.elapsed()
    );

    // (a) The first run prints every record, exactly once, in the documented form.
    let started = Instant::now();
    let mut w1 = KclProcess::spawn(
        &bin,
        "consume-w1",
        &env,
        [
            "consume",
            "--stream",
            &stream,
            "--app",
            &app,
            "--worker-id",
            "w1",
        ],
    )?;
    w1.wait_for_lines(want1.len(), DRAIN_TIMEOUT).await?;
    eprintln!(
        "w1 printed {} records in {:.1?}",
        want1.len(),
        started.elapsed()
    );

    // While it runs, `kcl leases --json` shows both leases owned by w1.
    let running = leases_json(&bin, &env, &app).await?;
    ensure!(
        running.len() == 2,
        "{} leases in --json while running",
        running.len()
    );
    for l in &running {
        ensure!(
            l["leaseOwner"] == "w1",
            "while w1 runs its lease has leaseOwner {}: {l}",
            l["leaseOwner"]
        );
    }

    tokio::time::sleep(QUIET_PERIOD).await;
    let (status, took) = w1.terminate(EXIT_TIMEOUT).await?;
    eprintln!("w1: SIGTERM → exit in {took:.1?}");
    ensure!(
        status.code() == Some(0),
        "kcl consume exited with {status} after SIGTERM; stderr:\n{}",
        w1.stderr_tail(30)
    );
    let got1 = check_output(&w1)?;
    check_exactly(&got1, &want1, "first run")?;
    check_logs_on_stderr(&w1)?;
    let last1 = last_per_shard(&got1);
    let table1 = leases.list().await?;
    check_released(&table1.leases, &shards, &last1)?;

    // (b) A second run on the same application prints exactly the records put since.
    let wave2: Vec<(String, Vec<u8>)> = (0..SECOND_WAVE)
        .map(|i| {
            (
                format!("second-{i}"),
                format!("record {i} of wave 2").into_bytes(),
            )
        })
        .collect();
    let puts2 = put_records(&client, &stream, wave2.clone()).await?;
    let want2 = expected(&stream, &wave2, &puts2);
    let started = Instant::now();
    let mut w2 = KclProcess::spawn(
        &bin,
        "consume-w2",
        &env,
        [
            "consume",
            "--stream",
            &stream,
            "--app",
            &app,
            "--worker-id",
            "w2",
        ],
    )?;
    w2.wait_for_lines(want2.len(), DRAIN_TIMEOUT).await?;
    eprintln!(
        "w2 printed {} records in {:.1?}",
        want2.len(),
        started.elapsed()
    );
    tokio::time::sleep(QUIET_PERIOD).await;
    let (status, took) = w2.terminate(EXIT_TIMEOUT).await?;
    eprintln!("w2: SIGTERM → exit in {took:.1?}");
    ensure!(
        status.code() == Some(0),
        "second kcl consume exited with {status}; stderr:\n{}",
        w2.stderr_tail(30)
    );
    let got2 = check_output(&w2)?;
    check_exactly(&got2, &want2, "second run")?;
    let mut last2 = last1.clone();
    last2.extend(last_per_shard(&got2));
    let table2 = leases.list().await?;
    check_released(&table2.leases, &shards, &last2)?;

    // (c) `kcl leases`: the table, and the same leases as JSON with the table's attributes.
    check_leases_table(&bin, &env, &app, &table2.leases).await?;
    check_leases_json(&bin, &env, &app, &dynamo, &table2.leases).await?;
    eprintln!("whole test: {:.1?}", test_start.elapsed());
    Ok(())
}

/// stderr has the logs (the worker's start, the signal), stdout had none of them.
fn check_logs_on_stderr(p: &KclProcess) -> anyhow::Result<()> {
    let stderr = p.stderr();
    ensure!(
        stderr.contains("starting worker") && stderr.contains("signal received"),
        "expected the worker's logs on stderr of {}, got:\n{}",
        p.label(),
        p.stderr_tail(20)
    );
    Ok(())
}

async fn leases_json(
    bin: &Path,
    env: &CliEnv,
    app: &str,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = run_kcl(
        bin,
        env,
        ["leases", "--app", app, "--json"],
        Duration::from_secs(30),
    )
    .await?;
    ensure!(
        out.status.success(),
        "kcl leases --json failed ({}): {}",
        out.status,
        out.stderr
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .with_context(|| format!("kcl leases --json printed no JSON: {:?}", out.stdout))?;
    v.as_array()
        .cloned()
        .with_context(|| format!("kcl leases --json printed no array: {v}"))
}

/// `kcl leases`: a header (LEASE, OWNER, COUNTER, CHECKPOINT, PARENTS), then one aligned row
/// per lease with its key, `-` for no owner, its counter and its checkpoint (a long sequence
/// number shortened in the middle, `4965…781634`, to fit 80 columns), then, after a blank
/// line, the per-worker summary.
async fn check_leases_table(
    bin: &Path,
    env: &CliEnv,
    app: &str,
    leases: &[Lease],
) -> anyhow::Result<()> {
    let out = run_kcl(bin, env, ["leases", "--app", app], Duration::from_secs(30)).await?;
    ensure!(
        out.status.success(),
        "kcl leases failed ({}): {}",
        out.status,
        out.stderr
    );
    eprintln!("kcl leases:\n{}", out.stdout);
    let lines: Vec<&str> = out.stdout.lines().take_while(|l| !l.is_empty()).collect();
    for l in out.stdout.lines() {
        ensure!(l.chars().count() <= 80, "wider than 80 columns: {l:?}");
    }
    ensure!(
        lines.len() == 1 + leases.len(),
        "expected a header and {} rows, got:\n{}",
        leases.len(),
        out.stdout
    );
    let header = lines[0];
    let columns = ["LEASE", "OWNER", "COUNTER", "CHECKPOINT", "PARENTS"];
    ensure!(
        header.split_whitespace().collect::<Vec<_>>() == columns,
        "header {header:?}"
    );
    let offsets: Vec<usize> = columns
        .iter()
        .map(|c| header.find(c).expect("checked above"))
        .collect();
    let mut seen = BTreeSet::new();
    for row in &lines[1..] {
        let key = row.split_whitespace().next().unwrap_or_default();
        let lease = leases
            .iter()
            .find(|l| l.key.as_str() == key)
            .with_context(|| format!("row for an unknown lease: {row:?}"))?;
        ensure!(seen.insert(key), "two rows for {key}");
        let cells = [
            lease.key.as_str().to_owned(),
            lease
                .owner
                .as_ref()
                .map_or("-".to_owned(), |o| o.as_str().to_owned()),
            lease.counter.0.to_string(),
            lease.checkpoint.checkpoint_str().to_owned(),
        ];
        for ((cell, &at), name) in cells.iter().zip(&offsets).zip(columns) {
            let shown = row
                .get(at..)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or_default();
            ensure!(
                shows(shown, cell) && (at == 0 || row.as_bytes()[at - 1] == b' '),
                "row {row:?}: column {name} (at {at}) should read {cell:?}"
            );
        }
        // No parents: the row ends after the checkpoint.
        ensure!(
            row.get(offsets[3]..)
                .is_some_and(|r| r.split_whitespace().count() == 1),
            "row {row:?} has parents or trailing text"
        );
    }
    Ok(())
}

/// A table cell `shown` reads `full`, whole or shortened in the middle (`head…tail`).
fn shows(shown: &str, full: &str) -> bool {
    match shown.split_once('…') {
        Some((head, tail)) => {
            full.starts_with(head) && full.ends_with(tail) && head.len() + tail.len() < full.len()
        }
        None => shown == full,
    }
}

/// `kcl leases --json`: one object per lease with exactly the attributes (names and values)
/// of the item in the table, as a raw DynamoDB Scan returns them.
async fn check_leases_json(
    bin: &Path,
    env: &CliEnv,
    app: &str,
    dynamo: &ServerProcess,
    leases: &[Lease],
) -> anyhow::Result<()> {
    let items = leases_json(bin, env, app).await?;
    ensure!(
        items.len() == leases.len(),
        "{} objects in --json for {} leases",
        items.len(),
        leases.len()
    );
    let ddb = aws_sdk_dynamodb::Client::new(&sdk_config(&dynamo.endpoint()).await);
    let scan = ddb.scan().table_name(app).send().await.context("Scan")?;
    let raw: BTreeMap<String, serde_json::Value> = scan
        .items()
        .iter()
        .map(|item| {
            let obj: serde_json::Map<String, serde_json::Value> = item
                .iter()
                .map(|(k, v)| (k.clone(), attr_json(v)))
                .collect();
            let key = obj["leaseKey"].as_str().unwrap_or_default().to_owned();
            (key, serde_json::Value::Object(obj))
        })
        .collect();
    for item in &items {
        let key = item["leaseKey"]
            .as_str()
            .with_context(|| format!("no leaseKey: {item}"))?;
        let lease = leases
            .iter()
            .find(|l| l.key.as_str() == key)
            .with_context(|| format!("--json lists an unknown lease {key}"))?;
        ensure!(
            item.get("leaseOwner").is_none(),
            "released lease with a leaseOwner: {item}"
        );
        ensure!(
            item["leaseCounter"] == lease.counter.0,
            "leaseCounter: {item}"
        );
        ensure!(
            item["checkpoint"] == lease.checkpoint.checkpoint_str(),
            "checkpoint: {item}"
        );
        ensure!(
            item["checkpointSubSequenceNumber"] == 0,
            "checkpointSubSequenceNumber: {item}"
        );
        ensure!(
            item["ownerSwitchesSinceCheckpoint"] == 0,
            "ownerSwitchesSinceCheckpoint: {item}"
        );
        let raw_item = raw
            .get(key)
            .with_context(|| format!("no item {key} in the Scan"))?;
        ensure!(
            item == raw_item,
            "--json differs from the table's item:\n  --json {item}\n  table  {raw_item}"
        );
    }
    Ok(())
}

/// A DynamoDB attribute as `kcl leases --json` renders it: S → string, N → number, SS →
/// array of strings, B → base64.
fn attr_json(v: &AttributeValue) -> serde_json::Value {
    use base64::Engine as _;
    match v {
        AttributeValue::S(s) => s.clone().into(),
        AttributeValue::N(n) => n
            .parse::<u64>()
            .map(serde_json::Value::from)
            .unwrap_or_else(|_| n.clone().into()),
        AttributeValue::Ss(v) => {
            let mut v = v.clone();
            v.sort();
            v.into()
        }
        AttributeValue::B(b) => base64::engine::general_purpose::STANDARD
            .encode(b.as_ref())
            .into(),
        other => format!("{other:?}").into(),
    }
}

/// (d) Invalid input fails fast, before touching the network (the endpoints here point at
/// ports nobody listens on), naming the field; missing arguments are usage errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_fails_fast_naming_the_field() -> anyhow::Result<()> {
    let bin = kcl_binary().await?;
    let nowhere = |p: u16| format!("http://127.0.0.1:{p}");
    let env = CliEnv::new(nowhere(free_port()?), nowhere(free_port()?));
    let limit = Duration::from_secs(5);

    let out = run_kcl(
        &bin,
        &env,
        [
            "consume",
            "--stream",
            "bad name!",
            "--app",
            "cli-app",
            "--worker-id",
            "w1",
        ],
        Duration::from_secs(30),
    )
    .await?;
    eprintln!(
        "--stream \"bad name!\": {} in {:.1?}: {}",
        out.status,
        out.elapsed,
        out.stderr.trim()
    );
    ensure!(
        !out.status.success(),
        "kcl consume accepted --stream \"bad name!\""
    );
    ensure!(
        out.elapsed < limit,
        "rejecting a bad stream name took {:?}",
        out.elapsed
    );
    ensure!(
        out.stderr.contains("stream") && out.stderr.contains("bad name!"),
        "the error should name the field `stream` and the value: {:?}",
        out.stderr
    );
    ensure!(out.stdout.is_empty(), "stdout not empty: {:?}", out.stdout);

    let out = run_kcl(
        &bin,
        &env,
        ["consume", "--app", "cli-app"],
        Duration::from_secs(30),
    )
    .await?;
    ensure!(
        out.status.code() == Some(2) && out.stderr.contains("--stream"),
        "a missing --stream should be a usage error naming it: {} {:?}",
        out.status,
        out.stderr
    );
    ensure!(out.stdout.is_empty(), "stdout not empty: {:?}", out.stdout);
    Ok(())
}

/// How long `kcl consume` may take to notice a closed stdout and exit: its next poll of the
/// stream (~1 s), the write, the graceful stop.
const BROKEN_PIPE_EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// The `kcl consume` arguments for `app` on `stream` as worker `id`.
fn consume_args<'a>(stream: &'a str, app: &'a str, id: &'a str) -> [&'a str; 7] {
    [
        "consume",
        "--stream",
        stream,
        "--app",
        app,
        "--worker-id",
        id,
    ]
}

/// (e) The reader of `kcl consume`'s stdout goes away after some lines (`| head -n`): the
/// next write fails with EPIPE, and the consumer stops at once, without retrying, with a
/// non-zero exit and a message; its leases are released and checkpointed at most at the last
/// line it wrote (never past it). A second run prints every record the first did not write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_stops_the_consumer_and_loses_no_record() -> anyhow::Result<()> {
    let test_start = Instant::now();
    let (bin, kinesis, dynamo) =
        tokio::try_join!(kcl_binary(), start_kinesis_local(), start_dynalite())?;
    let env = CliEnv::new(kinesis.endpoint(), dynamo.endpoint());
    let client = kinesis_client(&kinesis).await;
    let stream = unique_name("cli-epipe");
    let app = unique_name("cli-epipe-app");
    let leases = DynamoLeaseStore::from_conf(&sdk_config(&dynamo.endpoint()).await, app.clone());
    create_stream(&client, &stream, 2).await?;
    let mut shards = AwsKinesis::new(client.clone()).list_shards(&stream).await?;
    shards.sort_by(|a, b| a.id.cmp(&b.id));
    // ~2.7 KB lines: a shard's batch (~800 KB) is many times the pipe's 64 KB, so the close
    // comes in the middle of a batch, most likely in the middle of a line.
    let wave1: Vec<(String, Vec<u8>)> = first_wave(&shards)
        .into_iter()
        .map(|(key, mut data)| {
            data.resize(data.len() + 2000, b'.');
            (key, data)
        })
        .collect();
    let want1 = expected(
        &stream,
        &wave1,
        &put_records(&client, &stream, wave1.clone()).await?,
    );

    let mut w1 = KclProcess::spawn(&bin, "epipe-w1", &env, consume_args(&stream, &app, "w1"))?;
    // A reader that stops reading after a while, then goes away: kcl is blocked writing into
    // a full pipe when it does.
    w1.stop_reading_after(want1.len() / 4);
    w1.wait_for_lines(want1.len() / 4, DRAIN_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let read = w1.close_stdout().await?;
    eprintln!(
        "w1: closed its stdout after {read} complete lines ({} bytes of a partial one)",
        w1.partial_line().len()
    );
    // Records the first run has not seen yet: its next write after them fails.
    let wave2: Vec<(String, Vec<u8>)> = (0..SECOND_WAVE)
        .map(|i| {
            (
                format!("after-close-{i}"),
                format!("wave 2 record {i}").into_bytes(),
            )
        })
        .collect();
    let want2 = expected(
        &stream,
        &wave2,
        &put_records(&client, &stream, wave2.clone()).await?,
    );

    let started = Instant::now();
    let status = w1.wait_exit(BROKEN_PIPE_EXIT_TIMEOUT).await?;
    eprintln!(
        "w1: exited with {status} {:.1?} after the close",
        started.elapsed()
    );
    ensure!(
        !status.success(),
        "kcl consume exited with {status} after its stdout was closed; stderr:\n{}",
        w1.stderr_tail(30)
    );
    let stderr = w1.stderr();
    ensure!(
        stderr.contains("stdout") && stderr.to_lowercase().contains("broken pipe"),
        "the exit message should say stdout was closed (broken pipe); stderr:\n{}",
        w1.stderr_tail(30)
    );
    // Every complete line is a record, in order; a line cut short by the close is not one.
    let written = parse_lines(w1.texts().iter().map(String::as_str))?;
    let last_written = last_per_shard(&written);

    // Released, and checkpointed at most at the last line written for each shard.
    let table = leases.list().await?;
    ensure!(
        table.leases.len() == shards.len(),
        "leases: {:?}",
        table.leases
    );
    let mut checkpoints = BTreeMap::new();
    for l in &table.leases {
        ensure!(
            l.owner.is_none(),
            "lease {} still owned after the broken pipe: {l:?}",
            l.key.as_str()
        );
        let limit = last_written
            .get(l.key.as_str())
            .map(|s| ExtendedSequenceNumber::at(s.clone(), 0))
            .unwrap_or(ExtendedSequenceNumber::TrimHorizon);
        ensure!(
            l.checkpoint <= limit,
            "lease {} checkpointed at {} but the last line written for it was {limit}",
            l.key.as_str(),
            l.checkpoint
        );
        eprintln!(
            "lease {}: checkpoint {} (last line written: {limit})",
            l.key.as_str(),
            l.checkpoint
        );
        checkpoints.insert(l.key.as_str().to_owned(), l.checkpoint.clone());
    }

    // The second run prints exactly the records after each checkpoint: with the first run's
    // lines, every record (no gap).
    let all: BTreeSet<OutputRecord> = want1.union(&want2).cloned().collect();
    let after_checkpoint: BTreeSet<OutputRecord> = all
        .iter()
        .filter(|r| ExtendedSequenceNumber::at(r.seq.clone(), 0) > checkpoints[&r.shard])
        .cloned()
        .collect();
    let written_set: BTreeSet<OutputRecord> = written.iter().cloned().collect();
    let mut w2 = KclProcess::spawn(&bin, "epipe-w2", &env, consume_args(&stream, &app, "w2"))?;
    w2.wait_for_lines(after_checkpoint.len(), DRAIN_TIMEOUT)
        .await?;
    tokio::time::sleep(QUIET_PERIOD).await;
    let (status, _) = w2.terminate(EXIT_TIMEOUT).await?;
    ensure!(status.code() == Some(0), "second run exited with {status}");
    let got2 = check_output(&w2)?;
    check_exactly(&got2, &after_checkpoint, "second run after the broken pipe")?;
    let unseen: Vec<_> = all
        .iter()
        .filter(|r| !written_set.contains(*r) && !after_checkpoint.contains(*r))
        .take(3)
        .collect();
    ensure!(
        unseen.is_empty(),
        "records neither written by the first run nor printed by the second: {unseen:?}"
    );
    eprintln!(
        "first run wrote {} records, second printed {} ({} again); whole test {:.1?}",
        written.len(),
        got2.len(),
        got2.iter().filter(|r| written_set.contains(*r)).count(),
        test_start.elapsed()
    );
    Ok(())
}

/// (f) Every write to stdout fails (`/dev/full`: ENOSPC), and the consumer retries; a SIGTERM
/// then stops it gracefully (leases released, within a few seconds) without checkpointing
/// anything, with a non-zero exit that says records were not written. A second run prints
/// every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_stdout_checkpoints_nothing_through_sigterm() -> anyhow::Result<()> {
    let test_start = Instant::now();
    let (bin, kinesis, dynamo) =
        tokio::try_join!(kcl_binary(), start_kinesis_local(), start_dynalite())?;
    let env = CliEnv::new(kinesis.endpoint(), dynamo.endpoint());
    let client = kinesis_client(&kinesis).await;
    let stream = unique_name("cli-enospc");
    let app = unique_name("cli-enospc-app");
    let leases = DynamoLeaseStore::from_conf(&sdk_config(&dynamo.endpoint()).await, app.clone());
    create_stream(&client, &stream, 2).await?;
    let mut shards = AwsKinesis::new(client.clone()).list_shards(&stream).await?;
    shards.sort_by(|a, b| a.id.cmp(&b.id));
    let wave1 = first_wave(&shards);
    let want = expected(
        &stream,
        &wave1,
        &put_records(&client, &stream, wave1.clone()).await?,
    );

    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .context("opening /dev/full")?;
    let mut w1 = KclProcess::spawn_writing_to(
        &bin,
        "enospc-w1",
        &env,
        consume_args(&stream, &app, "w1"),
        full,
    )?;
    // Both shards' processors have failed to write (and are being retried).
    w1.wait_for_stderr("failed writes on both shards", DRAIN_TIMEOUT, |e| {
        shards.iter().all(|s| {
            e.lines().any(|l| {
                l.contains(s.id.as_str())
                    && (l.contains("process_records failed") || l.contains("writing to stdout"))
            })
        })
    })
    .await?;
    // A few retries.
    tokio::time::sleep(QUIET_PERIOD).await;
    let (status, took) = w1.terminate(EXIT_TIMEOUT).await?;
    eprintln!("w1: SIGTERM → {status} in {took:.1?}");

    let table = leases.list().await?;
    ensure!(
        table.leases.len() == shards.len(),
        "leases: {:?}",
        table.leases
    );
    for l in &table.leases {
        ensure!(
            l.checkpoint == ExtendedSequenceNumber::TrimHorizon,
            "lease {} checkpointed at {} although no line could be written",
            l.key.as_str(),
            l.checkpoint
        );
        ensure!(
            l.owner.is_none(),
            "lease {} still owned after SIGTERM: {l:?}",
            l.key.as_str()
        );
    }
    ensure!(
        !status.success(),
        "kcl consume exited with {status} although no record could be written; stderr:\n{}",
        w1.stderr_tail(20)
    );
    ensure!(
        w1.stderr().contains("not written"),
        "the exit message should say records were not written; stderr:\n{}",
        w1.stderr_tail(20)
    );

    let mut w2 = KclProcess::spawn(&bin, "enospc-w2", &env, consume_args(&stream, &app, "w2"))?;
    w2.wait_for_lines(want.len(), DRAIN_TIMEOUT).await?;
    tokio::time::sleep(QUIET_PERIOD).await;
    let (status, _) = w2.terminate(EXIT_TIMEOUT).await?;
    ensure!(status.code() == Some(0), "second run exited with {status}");
    check_exactly(&check_output(&w2)?, &want, "second run after ENOSPC")?;
    eprintln!("whole test: {:.1?}", test_start.elapsed());
    Ok(())
}

/// (g) `--stream` twice: one worker reads both streams (whose shards have the same ids) with
/// one lease table of multi-stream leases; every line names its stream; each stream's records
/// are printed once, in order per shard, and checkpointed in that stream's own leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_print_their_names_and_keep_their_own_leases() -> anyhow::Result<()> {
    let (bin, kinesis, dynamo) =
        tokio::try_join!(kcl_binary(), start_kinesis_local(), start_dynalite())?;
    let env = CliEnv::new(kinesis.endpoint(), dynamo.endpoint());
    let client = kinesis_client(&kinesis).await;
    let (a, b) = (unique_name("cli-ms-a"), unique_name("cli-ms-b"));
    let app = unique_name("cli-ms-app");
    let leases = DynamoLeaseStore::from_conf(&sdk_config(&dynamo.endpoint()).await, app.clone());
    let mut want = BTreeSet::new();
    for stream in [&a, &b] {
        create_stream(&client, stream, 2).await?;
        let mut shards = AwsKinesis::new(client.clone()).list_shards(stream).await?;
        shards.sort_by(|x, y| x.id.cmp(&y.id));
        let wave = first_wave(&shards);
        want.extend(expected(
            stream,
            &wave,
            &put_records(&client, stream, wave.clone()).await?,
        ));
    }
    let mut w1 = KclProcess::spawn(
        &bin,
        "consume-ms",
        &env,
        [
            "consume",
            "--stream",
            &a,
            "--stream",
            &b,
            "--app",
            &app,
            "--worker-id",
            "w1",
        ],
    )?;
    w1.wait_for_lines(want.len(), DRAIN_TIMEOUT).await?;
    let (status, _) = w1.terminate(EXIT_TIMEOUT).await?;
    ensure!(status.success(), "kcl consume exited with {status}");
    let lines = w1.lines();
    let got = parse_lines(lines.iter().map(|l| l.text.as_str()))?;
    let mut last: BTreeMap<(&str, &str), &SequenceNumber> = BTreeMap::new();
    for r in &got {
        if let Some(prev) = last.insert((&r.stream, &r.shard), &r.seq) {
            ensure!(
                prev < &r.seq,
                "{}/{}: {} after {prev}",
                r.stream,
                r.shard,
                r.seq
            );
        }
    }
    let printed: BTreeSet<OutputRecord> = got.iter().cloned().collect();
    ensure!(printed.len() == got.len(), "a record was printed twice");
    ensure!(
        printed == want,
        "printed {} records, want {}",
        printed.len(),
        want.len()
    );

    let table = leases.list().await?.leases;
    ensure!(table.len() == 4, "leases: {table:?}");
    for l in &table {
        let id = l
            .key
            .stream()
            .with_context(|| format!("{} is not a multi-stream lease key", l.key))?;
        let stream = id.name();
        let shard = l.shard_id();
        let last = last
            .get(&(stream, shard.as_str()))
            .with_context(|| format!("nothing printed for lease {}", l.key))?;
        ensure!(
            l.checkpoint == ExtendedSequenceNumber::at((*last).clone(), 0),
            "lease {} checkpointed at {}, last printed {last}",
            l.key,
            l.checkpoint
        );
    }

    // `kcl shards --stream` on the multi-stream table shows that stream's own leases.
    for stream in [&a, &b] {
        let out = run_kcl(
            &bin,
            &env,
            [
                "shards",
                "--stream",
                stream.as_str(),
                "--app",
                &app,
                "--json",
            ],
            Duration::from_secs(30),
        )
        .await?;
        ensure!(out.status.success(), "kcl shards failed: {}", out.stderr);
        let nodes: serde_json::Value = serde_json::from_str(&out.stdout)?;
        let nodes = nodes
            .as_array()
            .context("kcl shards --json: not an array")?;
        ensure!(nodes.len() == 2, "{nodes:?}");
        for node in nodes {
            let key = node["lease"]["leaseKey"].as_str().unwrap_or_default();
            ensure!(
                key.contains(&format!(":{stream}:")),
                "kcl shards --stream {stream} shows lease {key:?}"
            );
        }
    }
    Ok(())
}
