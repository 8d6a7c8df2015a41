//! Benchmark 4: peak RSS of the `kcl consume` CLI draining a stream on kinesis-local, with
//! the lease table on dynalite.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::{ExtendedSequenceNumber, LeaseStore, SequenceNumber, ShardId};
use kcl_integration_tests::{dynamo_servers, kinesis_server, unique_name};

use crate::local::{dynamo_client, keys_per_shard, last_sequences, records_for, shard_ranges};
use crate::probe::{fmt_dur, fmt_rate, tv};

#[derive(Debug, Clone)]
pub struct RssOpts {
    pub shards: u32,
    pub per_shard: usize,
    pub record_size: usize,
    pub put_parallelism: usize,
    /// Stop loading after this long (fewer records than asked for).
    pub load_budget: Duration,
    pub kcl_bin: PathBuf,
}

#[derive(Debug)]
pub struct RssResult {
    pub per_shard_loaded: usize,
    pub records: u64,
    pub load: Duration,
    /// Peak RSS of the CLI (kernel's ru_maxrss at exit), bytes.
    pub peak_rss: u64,
    /// VmHWM when every record was checkpointed (before SIGTERM), bytes.
    pub hwm_at_drain: u64,
    /// Start of the CLI to every record checkpointed.
    pub drain: Duration,
    pub cpu: Duration,
    pub exit_status: i32,
    pub shutdown: Duration,
}

/// SIGKILLs and reaps the CLI if the benchmark stops early (error or interrupt).
struct KillOnDrop(Option<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: our own unreaped child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

fn proc_status(pid: i32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

pub async fn run(opts: &RssOpts) -> anyhow::Result<RssResult> {
    ensure!(
        opts.kcl_bin.exists(),
        "{} is missing: build it first with `cargo build --release -p kcl --features cli`",
        opts.kcl_bin.display()
    );
    let kinesis = kinesis_server::start_kinesis_local().await?;
    let dynalite = dynamo_servers::start_dynalite().await?;
    let kc = kinesis_server::kinesis_client(&kinesis).await;
    let dc = dynamo_client(&dynalite).await;
    let stream = "bench-rss";
    kinesis_server::create_stream(&kc, stream, opts.shards).await?;
    let ranges = shard_ranges(&kc, stream).await?;
    let keys = keys_per_shard(&ranges, opts.per_shard, "r");

    // Load in steps of 500 records per shard until done or out of budget.
    let step = 500.min(opts.per_shard);
    let mut loaded = 0;
    let mut last: BTreeMap<ShardId, SequenceNumber> = BTreeMap::new();
    let t = Instant::now();
    while loaded < opts.per_shard {
        if t.elapsed() > opts.load_budget {
            println!(
                "rss: load budget of {} spent: stopping at {loaded} records per shard",
                fmt_dur(opts.load_budget)
            );
            break;
        }
        let to = (loaded + step).min(opts.per_shard);
        let records = records_for(&keys, loaded, to, opts.record_size);
        let puts = kinesis_server::put_records_with_parallelism(
            &kc,
            stream,
            records,
            opts.put_parallelism,
        )
        .await?;
        last_sequences(&puts, &mut last);
        loaded = to;
        let done = loaded * ranges.len();
        println!(
            "rss: loaded {done} records ({loaded}/shard) in {} ({} so far)",
            fmt_dur(t.elapsed()),
            fmt_rate(done as f64 / t.elapsed().as_secs_f64())
        );
    }
    let load = t.elapsed();
    let total = (loaded * ranges.len()) as u64;
    ensure!(last.len() == ranges.len(), "not every shard got records");

    let app = unique_name("bench-rss");
    let store = DynamoLeaseStore::new(dc.clone(), &app);
    let log = std::fs::File::create(std::env::temp_dir().join(format!("{app}.stderr.log")))?;
    let started = Instant::now();
    let child = Command::new(&opts.kcl_bin)
        .args(["consume", "--stream", stream, "--app", &app])
        .env("AWS_ENDPOINT_URL_KINESIS", kinesis.endpoint())
        .env("AWS_ENDPOINT_URL_DYNAMODB", dynalite.endpoint())
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", opts.kcl_bin.display()))?;
    let pid = child.id() as i32;
    let mut guard = KillOnDrop(Some(pid));

    // Poll VmHWM every 50 ms; the lease table every 500 ms until every shard's checkpoint is
    // its last record.
    let mut hwm = 0;
    let mut max_rss = 0;
    let mut last_check = Instant::now() - Duration::from_secs(1);
    let drain = loop {
        if let Some((h, r)) = proc_status(pid) {
            hwm = hwm.max(h);
            max_rss = max_rss.max(r);
        }
        if started.elapsed() > Duration::from_secs(1800) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            bail!("the CLI did not drain the stream in 30 min");
        }
        if last_check.elapsed() >= Duration::from_millis(500) {
            last_check = Instant::now();
            if let Ok(table) = store.list().await {
                let done = table.leases.len() == last.len()
                    && table.leases.iter().all(|l| {
                        last.get(&l.shard_id()).is_some_and(|seq| {
                            l.checkpoint >= ExtendedSequenceNumber::at(seq.clone(), 0)
                        })
                    });
                if done {
                    break started.elapsed();
                }
            }
        }
        let mut status = 0;
        // SAFETY: non-blocking check that the child is still running.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            bail!(
                "the CLI exited before draining the stream (status {status}); see its log in /tmp"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let hwm_at_drain = proc_status(pid).map_or(hwm, |(h, _)| h.max(hwm));
    println!(
        "rss: the CLI checkpointed all {total} records after {} ({}); VmHWM {:.1} MiB",
        fmt_dur(drain),
        fmt_rate(total as f64 / drain.as_secs_f64()),
        hwm_at_drain as f64 / 1048576.0
    );

    // SIGTERM, then wait4 for the exit status and the kernel's peak RSS.
    let term = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let mut status = 0;
    // SAFETY: wait4 only writes into `status` and `ru`.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            break;
        }
        if term.elapsed() > Duration::from_secs(60) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if let Some((h, _)) = proc_status(pid) {
            hwm = hwm.max(h);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let shutdown = term.elapsed();
    guard.0 = None; // reaped
    drop(child);
    let peak_rss = (ru.ru_maxrss as u64 * 1024).max(hwm);
    let exit_status = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    };
    Ok(RssResult {
        per_shard_loaded: loaded,
        records: total,
        load,
        peak_rss,
        hwm_at_drain,
        drain,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        exit_status,
        shutdown,
    })
}
