//! A fleet of three `kcl consume` processes (p1, p2, p3) on one 64-shard kinesis-local stream,
//! lease table on dynalite, records put continuously while they run:
//!
//! 1. the three balance (20–22 leases each, through graceful handoffs; see [`BALANCED`]);
//! 2. p1 is killed with SIGKILL and p2 stopped with SIGTERM (exit code 0);
//! 3. p3 ends up with all 64 leases (p2's at once, released; p1's once they expired: the
//!    CLI's lease duration is the default 10 s);
//! 4. every record appears in some process's output; within one process, per shard sequence
//!    numbers and per key the payload counters strictly increase; across processes a shard's
//!    records only go back after p1's SIGKILL (the duplicates are counted and printed), and at
//!    the end every lease is released with its checkpoint at the shard's last record.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::lease::LeaseStore;
use kcl::retrieval::aws::AwsKinesis;
use kcl::retrieval::KinesisApi;
use kcl::{ExtendedSequenceNumber, Lease, SequenceNumber};
use kcl_integration_tests::cli::{kcl_binary, CliEnv, KclProcess, OutputRecord};
use kcl_integration_tests::dynamo_servers::start_dynalite;
use kcl_integration_tests::kinesis_server::{
    create_stream, kinesis_client, put_records_with_parallelism, start_kinesis_local,
};
use kcl_integration_tests::scenarios::{check_released, owned_by};
use kcl_integration_tests::{sdk_config, unique_name};
use tokio::sync::watch;
use tokio::time::Instant;

const SHARDS: usize = 64;
/// Partition keys `key-0` … `key-199`.
const KEYS: u32 = 200;
/// Waves of one record per key (payload `k/n`): 4 000 records, ~62 per shard.
const WAVES: u32 = 20;
/// Waves per `PutRecords` call (400 records: one call keeps each shard's records in order).
/// kinesis-local answers slowly while three processes poll its 64 shards, so fewer calls.
const WAVES_PER_CALL: u32 = 2;
/// Pause between two calls.
const PUT_PAUSE: Duration = Duration::from_millis(200);
/// Waves put before p1 is killed (at the earliest: the fleet must have balanced too).
const WAVES_BEFORE_KILL: u32 = 8;
/// Waves held back until p1 was killed, so records flow during the takeover.
const WAVES_AFTER_KILL: u32 = 4;
const WORKERS: [&str; 3] = ["p1", "p2", "p3"];
/// Leases per process once balanced. The target is ceil(64 / 3) = 22, and the taker never
/// steals from a process at the target, so 22/22/20 is a resting state as well as 22/21/21
/// (the Java KCL also steals one lease from a process at the target when the stealer is two
/// or more below it).
const BALANCED: std::ops::RangeInclusive<usize> = 20..=22;

const BALANCE_TIMEOUT: Duration = Duration::from_secs(75);
/// p1's leases expire after the CLI's default 10 s, and p3's taker looks every 2 s.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(40);
/// The earliest p1's leases can expire after its kill (lease duration 10 s, renewed every
/// 3.3 s), with some slack.
const MIN_EXPIRY: Duration = Duration::from_secs(6);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(40);
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

fn wave(n: u32) -> Vec<(String, Vec<u8>)> {
    (0..KEYS)
        .map(|k| (format!("key-{k}"), format!("{k}/{n}").into_bytes()))
        .collect()
}

/// Owner → number of leases, and how many leases are owned, unowned, or mid-handoff.
#[derive(Debug, Default)]
struct Owners {
    per_owner: BTreeMap<String, usize>,
    unowned: usize,
    handoffs: usize,
}

fn owners(leases: &[Lease]) -> Owners {
    let mut o = Owners::default();
    for l in leases {
        match &l.owner {
            Some(w) => *o.per_owner.entry(w.as_str().to_owned()).or_default() += 1,
            None => o.unowned += 1,
        }
        if l.checkpoint_owner.is_some() {
            o.handoffs += 1;
        }
    }
    o
}

/// The three processes. Dropping it (a failed check included) kills those still running:
/// each [`KclProcess`] sends SIGKILL when dropped.
struct Fleet(Vec<KclProcess>);

impl Fleet {
    fn get(&self, label: &str) -> &KclProcess {
        self.0
            .iter()
            .find(|p| p.label() == label)
            .expect("a fleet member")
    }
    fn get_mut(&mut self, label: &str) -> &mut KclProcess {
        self.0
            .iter_mut()
            .find(|p| p.label() == label)
            .expect("a fleet member")
    }
    /// Fails if any member has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        for p in &mut self.0 {
            if let Some(status) = p.try_exit()? {
                bail!(
                    "kcl {} exited early with {status}; stderr:\n{}",
                    p.label(),
                    p.stderr_tail(30)
                );
            }
        }
        Ok(())
    }
}

/// One printed record, with who printed it and when the test read it.
#[derive(Debug, Clone)]
struct Seen {
    worker: &'static str,
    at: Instant,
    rec: OutputRecord,
    key: u32,
    n: u32,
}

/// The records a process printed; a line cut short by SIGKILL is reported, not parsed.
fn seen_by(p: &KclProcess, worker: &'static str) -> anyhow::Result<Vec<Seen>> {
    let mut out = Vec::new();
    for (i, line) in p.lines().iter().enumerate() {
        ensure!(line.utf8, "{worker} line {} is not UTF-8", i + 1);
        let rec = OutputRecord::parse(&line.text)
            .with_context(|| format!("{worker} stdout line {}", i + 1))?;
        let payload = std::str::from_utf8(&rec.data)
            .with_context(|| format!("{worker}: payload of {rec:?}"))?;
        let (k, n) = payload
            .split_once('/')
            .with_context(|| format!("{worker}: payload {payload:?}"))?;
        let (key, n): (u32, u32) = (k.parse()?, n.parse()?);
        ensure!(
            rec.key == format!("key-{key}"),
            "{worker}: record of key {} carries payload {payload:?}",
            rec.key
        );
        out.push(Seen {
            worker,
            at: line.at,
            rec,
            key,
            n,
        });
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_balance_fail_over_and_deliver_everything() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let (bin, kinesis, dynamo) =
        tokio::try_join!(kcl_binary(), start_kinesis_local(), start_dynalite())?;
    let env = CliEnv::new(kinesis.endpoint(), dynamo.endpoint());
    let client = kinesis_client(&kinesis).await;
    let stream = unique_name("fleet-stream");
    let app = unique_name("fleet-app");
    let leases = DynamoLeaseStore::from_conf(&sdk_config(&dynamo.endpoint()).await, app.clone());
    create_stream(&client, &stream, SHARDS as u32).await?;
    // Which keys each shard gets (for progress reports).
    let shards = AwsKinesis::new(client.clone()).list_shards(&stream).await?;
    let shard_keys: BTreeMap<String, usize> = shards
        .iter()
        .map(|s| {
            let keys = (0..KEYS)
                .filter(|k| {
                    s.hash_range
                        .contains(kcl::shard::hash_key(&format!("key-{k}")))
                })
                .count();
            (s.id.as_str().to_owned(), keys)
        })
        .collect();
    eprintln!(
        "[{:>5.1?}] servers and a {SHARDS}-shard stream ready",
        t0.elapsed()
    );

    // The producer: waves of one record per key, calls one after the other (per-key order
    // holds); the last waves wait for `allow`.
    let (allow, mut allowed) = watch::channel(WAVES - WAVES_AFTER_KILL);
    let (put_tx, put_rx) = watch::channel(0u32);
    let producer = {
        let client = client.clone();
        let stream = stream.clone();
        tokio::spawn(async move {
            for first in (0..WAVES).step_by(WAVES_PER_CALL as usize) {
                let end = (first + WAVES_PER_CALL).min(WAVES);
                allowed
                    .wait_for(|&a| a >= end)
                    .await
                    .context("the test stopped the producer")?;
                let call = Instant::now();
                let records = (first..end).flat_map(wave).collect();
                put_records_with_parallelism(&client, &stream, records, 1).await?;
                eprintln!(
                    "[{:>5.1?}] waves {first}..{end} put in {:.1?}",
                    t0.elapsed(),
                    call.elapsed()
                );
                put_tx.send_replace(end);
                tokio::time::sleep(PUT_PAUSE).await;
            }
            anyhow::Ok(())
        })
    };
    let mut producer = AbortOnDrop(Some(producer));

    let mut fleet = Fleet(Vec::new());
    for w in WORKERS {
        fleet.0.push(KclProcess::spawn(
            &bin,
            w,
            &env,
            [
                "consume",
                "--stream",
                &stream,
                "--app",
                &app,
                "--worker-id",
                w,
            ],
        )?);
    }
    let started = Instant::now();

    // 1. Balance: 20–22 leases each, all owned, no handoff pending.
    let deadline = started + BALANCE_TIMEOUT;
    let mut last_seen = None;
    let balanced = loop {
        fleet.check_running()?;
        // The processes create the table: until then listing fails.
        let table = match leases.list().await {
            Ok(t) => t,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "lease table not readable yet");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            Err(e) => return Err(e).context("listing leases"),
        };
        let o = owners(&table.leases);
        if last_seen.as_ref() != Some(&o.per_owner) {
            eprintln!("[{:>5.1?}] leases held: {:?}", t0.elapsed(), o.per_owner);
            last_seen = Some(o.per_owner.clone());
        }
        let even = WORKERS
            .iter()
            .all(|w| o.per_owner.get(*w).is_some_and(|n| BALANCED.contains(n)));
        if table.leases.len() == SHARDS && o.unowned == 0 && o.handoffs == 0 && even {
            break table.leases;
        }
        ensure!(
            Instant::now() < deadline,
            "the fleet did not balance within {BALANCE_TIMEOUT:?}: {o:?} ({} leases)",
            table.leases.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let p1_shards: BTreeSet<String> = balanced
        .iter()
        .filter(|l| l.owner.as_ref().is_some_and(|o| o.as_str() == "p1"))
        .map(|l| l.key.as_str().to_owned())
        .collect();
    eprintln!(
        "[{:>5.1?}] balanced {:.1?} after the start: {:?}",
        t0.elapsed(),
        started.elapsed(),
        owners(&balanced).per_owner
    );

    // 2. Once enough records are out and every process printed some, p1 is killed while
    // records flow, and p2 stops gracefully.
    let mut progress = put_rx.clone();
    tokio::time::timeout(
        Duration::from_secs(60),
        progress.wait_for(|&n| n >= WAVES_BEFORE_KILL),
    )
    .await
    .context("the producer is stuck")??;
    for w in WORKERS {
        fleet
            .get(w)
            .wait_for_lines(1, Duration::from_secs(30))
            .await?;
    }
    fleet.check_running()?;
    let killed = Instant::now();
    let status = fleet.get_mut("p1").kill().await?;
    eprintln!("[{:>5.1?}] p1 killed ({status})", t0.elapsed());
    allow.send_replace(WAVES);
    let p2_before = owned_by(&leases, "p2").await?;
    let (status, took) = fleet.get_mut("p2").terminate(EXIT_TIMEOUT).await?;
    eprintln!(
        "[{:>5.1?}] p2: SIGTERM → {status} in {took:.1?}",
        t0.elapsed()
    );
    ensure!(
        status.code() == Some(0),
        "p2 exited with {status} after SIGTERM; stderr:\n{}",
        fleet.get("p2").stderr_tail(30)
    );
    // p2's leases were released (read from the table as soon as it exited: an abandoned lease
    // would still name p2 until it expired, 10 s later); p3 may have taken some already.
    check_released(&leases, "p2", &p2_before, Some("p3"))
        .await
        .context("p2's leases after SIGTERM")?;

    // 3. p3 takes everything: p2's released leases at once, p1's after they expired.
    let deadline = killed + TAKEOVER_TIMEOUT;
    let mut last_seen = None;
    loop {
        if fleet.get_mut("p3").try_exit()?.is_some() {
            bail!("p3 exited; stderr:\n{}", fleet.get("p3").stderr_tail(30));
        }
        let table = leases.list().await?;
        let o = owners(&table.leases);
        let p3 = o.per_owner.get("p3").copied().unwrap_or(0);
        if last_seen.as_ref() != Some(&o.per_owner) {
            eprintln!("[{:>5.1?}] leases held: {:?}", t0.elapsed(), o.per_owner);
            last_seen = Some(o.per_owner.clone());
        }
        if p3 == SHARDS && o.handoffs == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "p3 does not hold every lease {TAKEOVER_TIMEOUT:?} after p1's kill: {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let takeover = killed.elapsed();
    eprintln!(
        "[{:>5.1?}] p3 holds all {SHARDS} leases, {takeover:.1?} after p1's kill",
        t0.elapsed()
    );
    // p1 renewed every 10 s / 3: its leases cannot have looked expired to p3 much sooner
    // than 10 s - 3.3 s after the kill (p1 was at its target: nothing was stolen from it).
    ensure!(
        takeover >= MIN_EXPIRY,
        "p3 held p1's leases {takeover:?} after the kill: before they could have expired"
    );

    // 4. Every record printed by someone.
    let handle = producer.0.as_mut().expect("set");
    tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .with_context(|| format!("the producer did not finish its {WAVES} waves"))?
        .context("the producer panicked")??;
    producer.0 = None;
    let total = (KEYS * WAVES) as usize;
    let drain_deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut next_report = Instant::now() + Duration::from_secs(3);
    loop {
        let mut distinct = BTreeSet::new();
        for p in &fleet.0 {
            for l in p.lines() {
                distinct.insert(l.text);
            }
        }
        if distinct.len() >= total {
            break;
        }
        if fleet.get_mut("p3").try_exit()?.is_some() {
            bail!("p3 exited; stderr:\n{}", fleet.get("p3").stderr_tail(30));
        }
        let late = Instant::now() >= drain_deadline;
        if late || Instant::now() >= next_report {
            next_report = Instant::now() + Duration::from_secs(3);
            eprintln!(
                "[{:>5.1?}] {} of {total} records printed; behind: {}",
                t0.elapsed(),
                distinct.len(),
                behind(&distinct, &shard_keys)
            );
        }
        ensure!(
            !late,
            "only {} of {total} distinct records printed {DRAIN_TIMEOUT:?} after the takeover",
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("[{:>5.1?}] all {total} records printed", t0.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, took) = fleet.get_mut("p3").terminate(EXIT_TIMEOUT).await?;
    eprintln!(
        "[{:>5.1?}] p3: SIGTERM → {status} in {took:.1?}",
        t0.elapsed()
    );
    ensure!(
        status.code() == Some(0),
        "p3 exited with {status} after SIGTERM; stderr:\n{}",
        fleet.get("p3").stderr_tail(30)
    );

    // The checks on what was printed.
    let partial = fleet.get("p1").partial_line();
    if !partial.is_empty() {
        eprintln!(
            "p1's output ends with a line cut short by SIGKILL ({} bytes)",
            partial.len()
        );
    }
    for w in ["p2", "p3"] {
        ensure!(
            fleet.get(w).partial_line().is_empty(),
            "{w} ended stdout with an unterminated line"
        );
    }
    let mut all: Vec<Seen> = Vec::new();
    for w in WORKERS {
        let seen = seen_by(fleet.get(w), w)?;
        check_within_process(w, &seen)?;
        eprintln!("{w} printed {} records", seen.len());
        ensure!(!seen.is_empty(), "{w} printed nothing");
        all.extend(seen);
    }
    all.sort_by_key(|s| s.at);

    // Each key lives on one shard.
    let mut shard_of_key: BTreeMap<u32, &str> = BTreeMap::new();
    for s in &all {
        let shard = shard_of_key.entry(s.key).or_insert(&s.rec.shard);
        ensure!(
            *shard == s.rec.shard,
            "key-{} printed from {} and {}",
            s.key,
            shard,
            s.rec.shard
        );
    }

    // Every record, and the duplicates (only p1's, on shards p1 held when killed).
    let mut copies: BTreeMap<(u32, u32), Vec<&Seen>> = BTreeMap::new();
    for s in &all {
        copies.entry((s.key, s.n)).or_default().push(s);
    }
    let missing: Vec<(u32, u32)> = (0..WAVES)
        .flat_map(|n| (0..KEYS).map(move |k| (k, n)))
        .filter(|kn| !copies.contains_key(kn))
        .collect();
    ensure!(
        missing.is_empty(),
        "{} records never printed, e.g. (key, n) {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let dups: Vec<(&(u32, u32), &Vec<&Seen>)> =
        copies.iter().filter(|(_, v)| v.len() > 1).collect();
    eprintln!(
        "{} records printed twice (after p1's SIGKILL){}",
        dups.len(),
        if dups.is_empty() { "" } else { ":" }
    );
    for (kn, v) in dups.iter().take(20) {
        let who: Vec<String> = v
            .iter()
            .map(|s| format!("{} on {} seq {}", s.worker, s.rec.shard, s.rec.seq))
            .collect();
        eprintln!("  key-{}/{}: {}", kn.0, kn.1, who.join(", "));
    }
    for (kn, v) in &dups {
        let workers: BTreeSet<&str> = v.iter().map(|s| s.worker).collect();
        ensure!(
            v.len() == 2 && workers.contains("p1") && workers.len() == 2,
            "key-{}/{} printed {} times by {workers:?}: only a record p1 printed before its \
             SIGKILL may be printed again",
            kn.0,
            kn.1,
            v.len()
        );
        ensure!(
            p1_shards.contains(&v[0].rec.shard),
            "duplicate on {}, which p1 did not hold",
            v[0].rec.shard
        );
    }

    // Across processes, in the order the test read them: per shard, sequence numbers only go
    // back where p1 (killed) was followed by another process.
    let mut last: BTreeMap<&str, &Seen> = BTreeMap::new();
    for s in &all {
        if let Some(prev) = last.get(s.rec.shard.as_str()) {
            ensure!(
                prev.rec.seq < s.rec.seq || (prev.worker == "p1" && s.worker != "p1"),
                "shard {}: {} printed {} (key-{}/{}) after {} printed {} (key-{}/{})",
                s.rec.shard,
                s.worker,
                s.rec.seq,
                s.key,
                s.n,
                prev.worker,
                prev.rec.seq,
                prev.key,
                prev.n
            );
        }
        last.insert(&s.rec.shard, s);
    }

    // Every lease released, checkpointed at its shard's last record.
    let mut max_seq: BTreeMap<&str, &SequenceNumber> = BTreeMap::new();
    for s in &all {
        let e = max_seq.entry(&s.rec.shard).or_insert(&s.rec.seq);
        if *e < &s.rec.seq {
            *e = &s.rec.seq;
        }
    }
    let table = leases.list().await?;
    ensure!(
        table.leases.len() == SHARDS,
        "{} leases",
        table.leases.len()
    );
    for l in &table.leases {
        ensure!(
            l.owner.is_none() && l.checkpoint_owner.is_none(),
            "lease {} still owned after the last SIGTERM: {l:?}",
            l.key.as_str()
        );
        let want = match max_seq.get(l.key.as_str()) {
            Some(seq) => ExtendedSequenceNumber::at((*seq).clone(), 0),
            None => ExtendedSequenceNumber::TrimHorizon,
        };
        ensure!(
            l.checkpoint == want,
            "lease {} checkpointed at {}, its shard's last record is {want}",
            l.key.as_str(),
            l.checkpoint
        );
    }
    eprintln!("[{:>5.1?}] done", t0.elapsed());
    Ok(())
}

/// Shards with records not yet printed: `shard (printed/expected)`.
fn behind(distinct: &BTreeSet<String>, shard_keys: &BTreeMap<String, usize>) -> String {
    let mut printed: BTreeMap<String, usize> = BTreeMap::new();
    for line in distinct {
        if let Ok(r) = OutputRecord::parse(line) {
            *printed.entry(r.shard).or_default() += 1;
        }
    }
    let lagging: Vec<String> = shard_keys
        .iter()
        .filter_map(|(shard, &keys)| {
            let want = keys * WAVES as usize;
            let got = printed.get(shard).copied().unwrap_or(0);
            (got < want).then(|| format!("{shard} ({got}/{want})"))
        })
        .collect();
    lagging.join(", ")
}

/// Within one process's output: per shard, sequence numbers strictly increase; per key, the
/// payload counters strictly increase.
fn check_within_process(worker: &str, seen: &[Seen]) -> anyhow::Result<()> {
    let mut last_seq: BTreeMap<&str, &SequenceNumber> = BTreeMap::new();
    let mut last_n: BTreeMap<u32, u32> = BTreeMap::new();
    for s in seen {
        if let Some(prev) = last_seq.insert(&s.rec.shard, &s.rec.seq) {
            ensure!(
                prev < &s.rec.seq,
                "{worker}: shard {} printed {} after {prev}",
                s.rec.shard,
                s.rec.seq
            );
        }
        if let Some(prev) = last_n.insert(s.key, s.n) {
            ensure!(
                prev < s.n,
                "{worker}: key-{} printed record {} after record {prev}",
                s.key,
                s.n
            );
        }
    }
    Ok(())
}

/// Aborts the task when dropped (a failing test leaves no producer behind).
struct AbortOnDrop<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}
