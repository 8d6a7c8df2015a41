//! Benchmark 4: peak RSS of the `kcl consume` CLI draining a stream on ferrokinesis (when
//! installed; kinesis-local otherwise, which loads too slowly for the full size), with the
//! lease table on dynalite.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
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
    /// Runs of the CLI over the same data (each from TRIM_HORIZON).
    pub runs: usize,
    /// Also run the CLI once under heaptrack, writing the profile here.
    pub heaptrack: Option<PathBuf>,
    /// After the measured runs, one more run per entry with this extra environment variable
    /// (`KEY=VALUE`, e.g. `MALLOC_ARENA_MAX=2`), reported on its own.
    pub extra_env: Vec<String>,
    /// Serve the stream from ferrokinesis instead of kinesis-local.
    pub ferrokinesis: bool,
}

#[derive(Debug)]
pub struct RssResult {
    pub per_shard_loaded: usize,
    pub records: u64,
    pub load: Duration,
    /// Peak RSS of the CLI, bytes (the worst run).
    pub peak_rss: u64,
    /// Every run's peak.
    pub peaks: Vec<u64>,
    /// How the peak was measured.
    pub how: String,
    /// Start of the CLI to every record checkpointed.
    pub drain: Duration,
    pub cpu: Duration,
    pub exit_status: i32,
    pub shutdown: Duration,
}

/// SIGKILLs the CLI (and its wrapper) if the benchmark stops early (error or interrupt), and
/// reaps the wrapper.
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: signalling processes we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if let Some(&wrapper) = self.0.last() {
            // SAFETY: our own unreaped child.
            unsafe { libc::waitpid(wrapper, std::ptr::null_mut(), 0) };
        }
    }
}

/// `/proc/PID/status` figures, bytes: (VmHWM, RssAnon, RssFile).
fn proc_status(pid: i32) -> Option<(u64, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmHWM:")?, field("RssAnon:")?, field("RssFile:")?))
}

pub async fn run(opts: &RssOpts) -> anyhow::Result<RssResult> {
    ensure!(
        opts.kcl_bin.exists(),
        "{} is missing: build it first with `cargo build --release -p kcl --features cli`",
        opts.kcl_bin.display()
    );
    let kinesis = if opts.ferrokinesis {
        crate::ferro::start().await?
    } else {
        kinesis_server::start_kinesis_local().await?
    };
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

    let mut runs = Vec::new();
    for run in 0..opts.runs.max(1) {
        let r = run_cli(opts, &kinesis, &dynalite, &dc, stream, &last, None, None).await?;
        println!(
            "rss: run {run}: peak RSS {:.1} MiB ({}); checkpointed all {total} records after {} ({}); \
             CPU {}; exit {} {} after SIGTERM",
            r.peak as f64 / 1048576.0,
            r.how,
            fmt_dur(r.drain),
            fmt_rate(total as f64 / r.drain.as_secs_f64()),
            fmt_dur(r.cpu),
            r.exit_status,
            fmt_dur(r.shutdown)
        );
        runs.push(r);
    }
    if let Some(dir) = &opts.heaptrack {
        let out = dir.join("kcl-consume");
        let r = run_cli(
            opts,
            &kinesis,
            &dynalite,
            &dc,
            stream,
            &last,
            Some(&out),
            None,
        )
        .await?;
        println!(
            "rss: heaptrack run (RSS not representative): drained in {}; profile {}.*",
            fmt_dur(r.drain),
            out.display()
        );
    }
    for kv in &opts.extra_env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--rss-extra-env {kv:?}: expected KEY=VALUE"))?;
        let r = run_cli(
            opts,
            &kinesis,
            &dynalite,
            &dc,
            stream,
            &last,
            None,
            Some((k, v)),
        )
        .await?;
        println!(
            "rss: with {kv}: peak RSS {:.1} MiB ({}); drained in {}",
            r.peak as f64 / 1048576.0,
            r.how,
            fmt_dur(r.drain)
        );
    }
    let worst = runs.iter().max_by_key(|r| r.peak).context("no run")?;
    Ok(RssResult {
        per_shard_loaded: loaded,
        records: total,
        load,
        peak_rss: worst.peak,
        peaks: runs.iter().map(|r| r.peak).collect(),
        how: worst.how.clone(),
        drain: worst.drain,
        cpu: worst.cpu,
        exit_status: worst.exit_status,
        shutdown: worst.shutdown,
    })
}

/// One run of the CLI over the whole stream (a fresh application: from TRIM_HORIZON).
struct CliRun {
    /// Peak RSS in bytes.
    peak: u64,
    /// How `peak` was measured.
    how: String,
    drain: Duration,
    cpu: Duration,
    exit_status: i32,
    shutdown: Duration,
}

/// The pid of the process whose argv[0] is `bin` and whose arguments include `needle`.
fn find_pid(bin: &std::path::Path, needle: &str) -> Option<i32> {
    let bin = bin.to_string_lossy();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| *a == bin) && args.iter().any(|a| a == needle) {
            return Some(pid);
        }
    }
    None
}

#[allow(clippy::too_many_arguments)]
async fn run_cli(
    opts: &RssOpts,
    kinesis: &kcl_integration_tests::ServerProcess,
    dynalite: &kcl_integration_tests::ServerProcess,
    dc: &aws_sdk_dynamodb::Client,
    stream: &str,
    last: &BTreeMap<ShardId, SequenceNumber>,
    heaptrack: Option<&std::path::Path>,
    extra_env: Option<(&str, &str)>,
) -> anyhow::Result<CliRun> {
    let app = unique_name("bench-rss");
    let store = DynamoLeaseStore::new(dc.clone(), &app);
    let log_path = std::env::temp_dir().join(format!("{app}.stderr.log"));
    let log = std::fs::File::create(&log_path)?;
    let time_out = std::env::temp_dir().join(format!("{app}.maxrss"));
    let time = std::path::Path::new("/usr/bin/time");
    // Under /usr/bin/time (its %M is the child's ru_maxrss; a child spawned straight from this
    // big process would inherit this process's high-water mark at exec), or under heaptrack.
    let mut cmd = match heaptrack {
        Some(out) => {
            let mut c = Command::new("heaptrack");
            c.arg("-o").arg(out).arg(&opts.kcl_bin);
            c
        }
        None if time.exists() => {
            let mut c = Command::new(time);
            c.args(["-f", "%M", "-o"]).arg(&time_out).arg(&opts.kcl_bin);
            c
        }
        None => Command::new(&opts.kcl_bin),
    };
    if let Some((k, v)) = extra_env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let wrapper = cmd
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
    let wpid = wrapper.id() as i32;
    let mut guard = KillOnDrop(vec![wpid]);
    let pid = loop {
        if let Some(pid) = find_pid(&opts.kcl_bin, &app) {
            break pid;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the CLI process did not appear"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    guard.0.insert(0, pid);

    // Poll VmHWM every 50 ms; the lease table every 500 ms until every shard's checkpoint is
    // its last record.
    let mut hwm = 0;
    // The largest heap (anonymous) and mapped-file (the binary's pages) parts seen.
    let (mut anon, mut file) = (0, 0);
    let mut last_check = Instant::now() - Duration::from_secs(1);
    let drain = loop {
        if let Some((h, a, f)) = proc_status(pid) {
            hwm = hwm.max(h);
            anon = anon.max(a);
            file = file.max(f);
        }
        ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "the CLI did not drain the stream in 30 min"
        );
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
        // SAFETY: non-blocking check that the wrapper (or the CLI) is still running.
        let r = unsafe { libc::waitpid(wpid, &mut status, libc::WNOHANG) };
        ensure!(
            r != wpid,
            "the CLI exited before draining the stream (status {status}); see {}",
            log_path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if let Some((h, a, f)) = proc_status(pid) {
        hwm = hwm.max(h);
        anon = anon.max(a);
        file = file.max(f);
    }

    // SIGTERM to the CLI, then reap the wrapper (which exits with it).
    let term = Instant::now();
    // SAFETY: signalling our own (grand)child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let mut status = 0;
    // SAFETY: wait4 only writes into `status` and `ru`.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let r = unsafe { libc::wait4(wpid, &mut status, libc::WNOHANG, &mut ru) };
        if r == wpid {
            break;
        }
        if term.elapsed() > Duration::from_secs(60) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if let Some((h, _, _)) = proc_status(pid) {
            hwm = hwm.max(h);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let shutdown = term.elapsed();
    guard.0.clear(); // reaped
    drop(wrapper);
    let exit_status = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    };
    let time_kib = std::fs::read_to_string(&time_out)
        .ok()
        .and_then(|s| s.lines().last().and_then(|l| l.trim().parse::<u64>().ok()));
    let _ = std::fs::remove_file(&time_out);
    let parts = format!(
        "largest polled: heap (RssAnon) {:.1} MiB, binary and files (RssFile) {:.1} MiB",
        anon as f64 / 1048576.0,
        file as f64 / 1048576.0
    );
    let (peak, how) = match time_kib {
        Some(kib) => (
            (kib * 1024).max(hwm),
            format!(
                "/usr/bin/time %M {:.1} MiB, VmHWM polled {:.1} MiB; {parts}",
                kib as f64 / 1024.0,
                hwm as f64 / 1048576.0
            ),
        ),
        None => (hwm, format!("VmHWM polled every 50 ms; {parts}")),
    };
    Ok(CliRun {
        peak,
        how,
        drain,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        exit_status,
        shutdown,
    })
}
