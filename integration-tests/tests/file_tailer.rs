//! The `file_tailer` example (`examples/file_tailer.rs`) as a process against kinesis-local,
//! through a TCP proxy that can drop traffic. The test writes numbered lines — `<generation>
//! <number> <payload>`, one generation per file content — and puts the tailer through:
//!
//! 1. generation A, read from the start (`--from-start`);
//! 2. rename rotation: `app.log` → `app.log.1`, 10 more A lines written to the renamed file
//!    (the writer still has it open), a new `app.log` with generation B;
//! 3. copytruncate: `app.log` copied, truncated and at once rewritten with more C lines than it
//!    had B lines (only the fingerprint of its first bytes tells);
//! 4. Kinesis' answers lost (requests forwarded, records stored, answers dropped) while 40
//!    more C lines are read, then **SIGKILL** and a restart, which must send them again;
//! 5. Kinesis unreachable (requests dropped) while 20 more C lines are read, then **SIGKILL**;
//!    while stopped, a second rotation (`app.log` → `app.log.1`), 10 more C lines into the
//!    renamed file, a new `app.log` with generation D;
//! 6. restart: the tailer must find the rotated file by inode, finish it from the saved
//!    offset, then read `app.log` from 0 — including a line written in two parts (the first
//!    without its newline) and a 1.1 MiB line Kinesis cannot take (generation X: reported in the
//!    rejects file and the log with its offset, never sent);
//! 7. **SIGTERM** right after more D lines (exit 0, what was read flushed and saved), a fourth
//!    run that sends the rest, SIGTERM again (exit 0, state at the end of the file);
//!
//! then reads every shard from TRIM_HORIZON (deaggregating KPL aggregates) and checks that
//! every line of every generation arrived, in order, within one shard; a run of lines sent
//! again is allowed (and, after step 4, required) only in generation C, once: a duplicate
//! anywhere else — after a rotation, a truncation or a SIGTERM — fails. Run in two modes:
//! plain records with one key per file (`--partition-key file`), and KPL aggregation with one
//! fixed key (`--aggregate`).
//!
//! **A state file written before acknowledgement** fails the check "the state file moved while
//! Kinesis' answers were lost" in step 4 (and "… while Kinesis was unreachable" in step 5):
//! the state passed lines Kinesis had not acknowledged. Without those two checks the lost
//! lines show anyway: with aggregation the final order check fails ("generation C: line 140
//! follows 119: lines 120..140 missing": the lines read while Kinesis was unreachable are never
//! sent); with plain records step 5's wait for the last C line times out (of the 40 lines read
//! while the answers were lost only the first, alone in its call, was stored). Seen failing so,
//! in both modes, with `write_state` moved before the flush in `Tailer::checkpoint`. (Steps 4
//! and 5 wait for the stream, not only the state file, to hold every earlier line: otherwise
//! such a tailer would still have a flush due that the proxy swallows.)
//!
//! The example binary is built with `cargo build --workspace --all-features --example
//! file_tailer` (the feature set `scripts/test.sh` builds with: only a freshness check after
//! it).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use aws_sdk_kinesis::types::ShardIteratorType;
use bytes::Bytes;
use kcl::retrieval::deagg::deaggregate;
use kcl::{Record, SequenceNumber};
use kcl_integration_tests::cli::{example_binary, CliEnv, KclProcess};
use kcl_integration_tests::kinesis_server::{create_stream, kinesis_client, start_kinesis_local};
use kcl_integration_tests::unique_name;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

const SHARDS: u32 = 2;
/// How long the tailer may take to catch up with what was written.
const CATCH_UP: Duration = Duration::from_secs(20);
/// How long SIGTERM → exit may take.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the tailer runs against an unreachable Kinesis before the SIGKILL.
const UNREACHABLE_FOR: Duration = Duration::from_millis(1500);
/// The oversized line (over Kinesis' 1 MiB record limit).
const HUGE_LINE: usize = 1024 * 1024 + 100 * 1024;

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Plain records, `--partition-key file`.
    PlainFileKeys,
    /// `--aggregate`, the default fixed key.
    AggregatedFixedKey,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_records_one_key_per_file() -> anyhow::Result<()> {
    scenario(Mode::PlainFileKeys).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kpl_aggregates_fixed_key() -> anyhow::Result<()> {
    scenario(Mode::AggregatedFixedKey).await
}

/// What the proxy does to the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Nothing: it forwards both ways.
    None,
    /// Kinesis unreachable: requests are read and dropped, nothing is answered.
    BlackHole,
    /// Requests reach Kinesis (records are stored) but the answers are dropped.
    LoseAnswers,
}

/// A TCP proxy to kinesis-local that can drop traffic ([`Fault`]).
struct Proxy {
    port: u16,
    fault: watch::Sender<Fault>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (fault, rx) = watch::channel(Fault::None);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let drop_requests = |f: Fault| f == Fault::BlackHole;
                    let drop_answers = |f: Fault| f != Fault::None;
                    tokio::select! {
                        () = pipe(cr, sw, rx.clone(), drop_requests) => {}
                        () = pipe(sr, cw, rx, drop_answers) => {}
                    }
                });
            }
        });
        Ok(Self { port, fault, task })
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, dropping what is read while `dropping(fault)`.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    fault: watch::Receiver<Fault>,
    dropping: impl Fn(Fault) -> bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if dropping(*fault.borrow()) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The payload of line `n` of generation `generation` (checked on the way back: a torn or
/// merged line does not match).
fn payload(generation: &str, n: usize) -> String {
    format!("{generation} {n:06} payload-{}", "x".repeat(n % 17))
}

/// Writes numbered lines and counts them per generation.
#[derive(Default)]
struct Lines {
    written: BTreeMap<String, usize>,
}

impl Lines {
    /// The next `count` lines of `generation`, as one string.
    fn next(&mut self, generation: &str, count: usize) -> String {
        let next = self.written.entry(generation.to_owned()).or_default();
        let mut s = String::new();
        for n in *next..*next + count {
            s.push_str(&payload(generation, n));
            s.push('\n');
        }
        *next += count;
        s
    }

    /// Appends the next `count` lines of `generation` to `file` (one write).
    fn write(&mut self, file: &mut File, generation: &str, count: usize) -> anyhow::Result<()> {
        let text = self.next(generation, count);
        file.write_all(text.as_bytes())?;
        Ok(())
    }
}

/// The state file as the example writes it (`key=value` lines).
#[derive(Debug, Default, PartialEq, Eq)]
struct State {
    dev: u64,
    ino: u64,
    offset: u64,
}

fn read_state(path: &Path) -> Option<State> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut s = State::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "dev" => s.dev = v.parse().ok()?,
            "ino" => s.ino = v.parse().ok()?,
            "offset" => s.offset = v.parse().ok()?,
            _ => {}
        }
    }
    Some(s)
}

/// What the state must say once everything of `log` was acknowledged.
fn caught_up(log: &Path) -> anyhow::Result<State> {
    let meta = std::fs::metadata(log)?;
    Ok(State {
        dev: meta.dev(),
        ino: meta.ino(),
        offset: meta.len(),
    })
}

/// Waits until the state file says every line of `log` was acknowledged.
async fn wait_caught_up(tailer: &KclProcess, state: &Path, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let want = caught_up(log)?;
        let got = read_state(state);
        if got.as_ref() == Some(&want) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{}: state {got:?}, want {want:?} after {CATCH_UP:?}; stderr:\n{}",
            tailer.label(),
            tailer.stderr_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the stream holds `line`.
async fn wait_in_stream(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    line: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let records = read_stream(client, stream).await?;
        if records.iter().any(|(_, data)| data == line.as_bytes()) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{line:?} not in the stream after {CATCH_UP:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn scenario(mode: Mode) -> anyhow::Result<()> {
    let started = Instant::now();
    let bin = example_binary("file_tailer").await?;
    let server = start_kinesis_local().await?;
    let client = kinesis_client(&server).await;
    let stream = unique_name("file-tailer");
    create_stream(&client, &stream, SHARDS).await?;
    let proxy = Proxy::start(server.port).await?;
    let env = CliEnv::new(proxy.endpoint(), "http://127.0.0.1:9");

    let dir = std::env::temp_dir().join(unique_name("file-tailer"));
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("app.log");
    let state = dir.join("app.state");
    let rejects = dir.join("app.state.rejected");
    let mut args: Vec<String> = [
        "--file",
        log.to_str().context("utf-8 path")?,
        "--stream",
        &stream,
        "--state",
        state.to_str().context("utf-8 path")?,
        "--poll-interval",
        "50",
        "--from-start",
    ]
    .map(String::from)
    .to_vec();
    match mode {
        Mode::PlainFileKeys => args.extend(["--partition-key".into(), "file".into()]),
        Mode::AggregatedFixedKey => args.push("--aggregate".into()),
    }
    let spawn = |label: &str| KclProcess::spawn(&bin, label, &env, &args);
    let mut lines = Lines::default();
    let append = |p: &Path| OpenOptions::new().append(true).create(true).open(p);

    // 1. Generation A from the start.
    let mut writer = append(&log)?;
    lines.write(&mut writer, "A", 60)?;
    let mut tailer = spawn("tailer-1")?;
    let deadline = Instant::now() + CATCH_UP;
    while read_state(&state).is_none_or(|s| s.offset == 0) {
        ensure!(
            Instant::now() < deadline,
            "no progress; stderr:\n{}",
            tailer.stderr_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // 2. Rename rotation; the writer writes 10 more lines to the old file before reopening.
    std::fs::rename(&log, dir.join("app.log.1"))?;
    lines.write(&mut writer, "A", 10)?;
    writer = append(&log)?;
    lines.write(&mut writer, "B", 60)?;
    wait_caught_up(&tailer, &state, &log).await?;

    // 3. copytruncate, and at once more C lines than there were B lines.
    std::fs::copy(&log, dir.join("app.log.copy"))?;
    writer.set_len(0)?;
    lines.write(&mut writer, "C", 80)?;
    wait_caught_up(&tailer, &state, &log).await?;

    // 4. Answers lost: the records are stored but never acknowledged; SIGKILL; the restart
    // must send them again. (The stream, not only the state file, must hold every line so far:
    // a tailer that saved its state early would otherwise still have a flush due.)
    wait_in_stream(&client, &stream, &payload("C", lines.written["C"] - 1)).await?;
    let before = read_state(&state);
    let first_unacknowledged = lines.written["C"];
    proxy.set(Fault::LoseAnswers);
    lines.write(&mut writer, "C", 40)?;
    wait_in_stream(&client, &stream, &payload("C", first_unacknowledged)).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(
        read_state(&state) == before,
        "the state file moved while Kinesis' answers were lost (saved before the \
         acknowledgement): {before:?} → {:?}",
        read_state(&state)
    );
    tailer.kill().await?;
    proxy.set(Fault::None);
    let mut tailer = spawn("tailer-2")?;
    wait_caught_up(&tailer, &state, &log).await?;

    // 5. Kinesis unreachable while more lines are read; SIGKILL; a rotation while stopped.
    wait_in_stream(&client, &stream, &payload("C", lines.written["C"] - 1)).await?;
    let before = read_state(&state);
    proxy.set(Fault::BlackHole);
    lines.write(&mut writer, "C", 20)?;
    tokio::time::sleep(UNREACHABLE_FOR).await;
    ensure!(
        read_state(&state) == before,
        "the state file moved while Kinesis was unreachable (saved before the \
         acknowledgement): {before:?} → {:?}",
        read_state(&state)
    );
    tailer.kill().await?;
    proxy.set(Fault::None);
    std::fs::rename(dir.join("app.log.1"), dir.join("app.log.2"))?;
    std::fs::rename(&log, dir.join("app.log.1"))?;
    lines.write(&mut writer, "C", 10)?;
    writer = append(&log)?;
    lines.write(&mut writer, "D", 40)?;

    // Restart: finish app.log.1, then app.log; a line in two parts, an oversized line.
    let mut tailer = spawn("tailer-3")?;
    let split = lines.next("D", 1);
    writer.write_all(&split.as_bytes()[..10])?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    writer.write_all(&split.as_bytes()[10..])?;
    lines.write(&mut writer, "D", 9)?;
    let huge_offset = std::fs::metadata(&log)?.len();
    writer.write_all(format!("X {}\n", "y".repeat(HUGE_LINE - 2)).as_bytes())?;
    lines.write(&mut writer, "D", 20)?;
    wait_caught_up(&tailer, &state, &log).await?;

    // 6. SIGTERM right after more lines; a third run sends the rest.
    lines.write(&mut writer, "D", 30)?;
    let (status, took) = tailer.terminate(EXIT_TIMEOUT).await?;
    ensure!(
        status.success(),
        "SIGTERM: {status}; stderr:\n{}",
        tailer.stderr_tail(30)
    );
    let stderr3 = tailer.stderr();
    eprintln!("tailer-3 stopped in {took:.1?} after SIGTERM");
    let mut tailer = spawn("tailer-4")?;
    lines.write(&mut writer, "D", 10)?;
    wait_caught_up(&tailer, &state, &log).await?;
    let (status, _) = tailer.terminate(EXIT_TIMEOUT).await?;
    ensure!(
        status.success(),
        "SIGTERM: {status}; stderr:\n{}",
        tailer.stderr_tail(30)
    );
    ensure!(
        read_state(&state) == Some(caught_up(&log)?),
        "the state after SIGTERM is not at the end of the file"
    );

    // The oversized line: reported with its offset, in the log and the rejects file.
    let recorded = std::fs::read_to_string(&rejects).context("the rejects file")?;
    let needle = format!("offset={huge_offset}\tbytes={HUGE_LINE}");
    ensure!(
        recorded.lines().filter(|l| l.contains(&needle)).count() == 1
            && recorded.lines().count() == 1,
        "rejects file {recorded:?} should name the oversized line once ({needle})"
    );
    ensure!(
        stderr3.contains("line not sent") && stderr3.contains(&format!("offset={huge_offset}")),
        "the oversized line is not reported in the log:\n{stderr3}"
    );
    ensure!(
        stderr3.contains("rotated while stopped"),
        "the restart did not find the rotated file:\n{stderr3}"
    );

    // Everything in the stream, in order per generation.
    let records = read_stream(&client, &stream).await?;
    let mut by_generation: BTreeMap<String, (BTreeMap<String, usize>, Vec<usize>)> =
        BTreeMap::new();
    for (shard, data) in &records {
        let text = std::str::from_utf8(data).context("a record is not UTF-8")?;
        let mut parts = text.splitn(3, ' ');
        let (Some(generation), Some(n)) = (parts.next(), parts.next()) else {
            bail!("a record that is no line of the test: {text:?}");
        };
        ensure!(generation != "X", "the oversized line was sent");
        let n: usize = n
            .parse()
            .with_context(|| format!("record {text:?} has no line number"))?;
        ensure!(
            text == payload(generation, n),
            "record {text:?} is not line {n} of {generation} (torn or merged)"
        );
        let entry = by_generation.entry(generation.to_owned()).or_default();
        *entry.0.entry(shard.clone()).or_default() += 1;
        entry.1.push(n);
    }
    ensure!(
        by_generation.keys().eq(lines.written.keys()),
        "generations in the stream {:?}, written {:?}",
        by_generation.keys().collect::<Vec<_>>(),
        lines.written.keys().collect::<Vec<_>>()
    );
    let mut resent = 0;
    for (generation, (shards, numbers)) in &by_generation {
        ensure!(
            shards.len() == 1,
            "generation {generation} spread over shards {shards:?}"
        );
        resent += check_in_order(
            generation,
            numbers,
            lines.written[generation],
            generation == "C",
        )?;
    }
    ensure!(
        resent > 0,
        "no line was sent again after the SIGKILL that lost Kinesis' answers"
    );
    eprintln!(
        "{mode:?}: {} records read back, {} lines written, {resent} sent again after the \
         SIGKILL; {:.1?} in all",
        records.len(),
        lines.written.values().sum::<usize>(),
        started.elapsed()
    );
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// Checks the line numbers of one generation in stream order: `0..count`, each after the
/// one before; a step back (a run sent again) only if `resend_allowed`, once. Returns how many
/// lines were sent again.
fn check_in_order(
    generation: &str,
    numbers: &[usize],
    count: usize,
    resend_allowed: bool,
) -> anyhow::Result<usize> {
    let mut next = 0;
    let mut high = 0;
    let mut steps_back = 0;
    for (i, &n) in numbers.iter().enumerate() {
        if n > next {
            bail!(
                "generation {generation}: line {n} follows {}: lines {next}..{n} missing or out \
                 of order",
                if i == 0 {
                    "the start".to_owned()
                } else {
                    numbers[i - 1].to_string()
                }
            );
        }
        if n < next {
            ensure!(
                resend_allowed,
                "generation {generation}: line {n} again after line {}: a duplicate without a \
                 crash",
                numbers[i - 1]
            );
            steps_back += 1;
            ensure!(
                steps_back == 1,
                "generation {generation}: sent again more than once"
            );
        }
        next = n + 1;
        high = high.max(next);
    }
    ensure!(
        high == count,
        "generation {generation}: {high} of {count} lines arrived"
    );
    Ok(numbers.len() - count)
}

/// Every user record of the stream as (shard id, data), in shard order, KPL aggregates
/// deaggregated.
async fn read_stream(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> anyhow::Result<Vec<(String, Bytes)>> {
    let shards = client.list_shards().stream_name(stream).send().await?;
    let mut out = Vec::new();
    for shard in shards.shards() {
        let id = shard.shard_id();
        let mut iterator = client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(id)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await?
            .shard_iterator;
        while let Some(it) = iterator {
            let page = client
                .get_records()
                .shard_iterator(it)
                .limit(10_000)
                .send()
                .await?;
            if page.records().is_empty() {
                break;
            }
            for r in page.records() {
                let outer = Record::new(
                    Bytes::copy_from_slice(r.data().as_ref()),
                    r.partition_key().unwrap_or_default(),
                    SequenceNumber::parse(r.sequence_number())?,
                    None,
                );
                let d = deaggregate(outer);
                ensure!(d.invalid_reason().is_none(), "an invalid aggregate: {d:?}");
                out.extend(
                    d.into_records()
                        .into_iter()
                        .map(|r| (id.to_owned(), r.data)),
                );
            }
            iterator = page.next_shard_iterator;
        }
    }
    Ok(out)
}

#[test]
fn order_check_allows_one_resend_only_where_allowed() {
    assert_eq!(check_in_order("g", &[0, 1, 2], 3, false).expect("ok"), 0);
    assert_eq!(
        check_in_order("g", &[0, 1, 2, 1, 2, 3], 4, true).expect("ok"),
        2
    );
    assert!(check_in_order("g", &[0, 1, 2, 1, 2, 3], 4, false).is_err());
    assert!(check_in_order("g", &[0, 2, 3], 4, true).is_err());
    assert!(check_in_order("g", &[0, 1, 2], 4, true).is_err());
    assert!(check_in_order("g", &[1, 2], 3, true).is_err());
    assert!(check_in_order("g", &[0, 1, 0, 1, 0, 1, 2], 3, true).is_err());
}
