//! `kcl-bench`: benchmarks of kcl, run by hand (never part of `scripts/test.sh`).
//!
//! ```text
//! cargo build --release -p kcl --features cli      # for `rss` (target/release/kcl)
//! cargo run --release -p kcl-bench -- all           # or mem | local | startup | rss
//! cargo run --release -p kcl-bench -- catchup       # or many-shards (ferrokinesis; not in `all`)
//! cargo run --release -p kcl-bench -- parallel      # OrderedParallel vs sequential (in memory)
//! ```
//!
//! Prints details while it runs, then one table: measured figure, target, pass/fail.

mod catchup;
mod counters;
mod ferro;
mod local;
mod many;
mod mem;
mod parallel;
mod probe;
mod rss;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, ValueEnum};

use probe::{fmt_dur, fmt_rate};

#[derive(Parser, Debug)]
#[command(name = "kcl-bench", about = "Benchmarks of the kcl worker and CLI")]
struct Args {
    /// Which benchmark(s) to run.
    #[arg(value_enum, default_value_t = Mode::All)]
    mode: Mode,

    /// Payload size of every record, bytes.
    #[arg(long, default_value_t = 1024)]
    record_size: usize,

    /// mem: shards of the in-memory stream.
    #[arg(long, default_value_t = 16)]
    mem_shards: usize,
    /// mem: records per shard.
    #[arg(long, default_value_t = 50_000)]
    mem_records: usize,
    /// mem: polling.min_interval in microseconds (library default: 200 000).
    #[arg(long, default_value_t = 0)]
    mem_min_interval_us: u64,
    /// mem: polling.idle_interval in microseconds (library default: 200 000).
    #[arg(long, default_value_t = 1000)]
    mem_idle_interval_us: u64,
    /// mem: polling.max_records (GetRecords limit).
    #[arg(long, default_value_t = 10_000)]
    mem_max_records: u32,
    /// mem: worker runs over the same data; the one with the least CPU time is reported.
    #[arg(long, default_value_t = 3)]
    mem_repeats: usize,
    /// mem: skip the plain MemKinesis loop (e.g. when profiling the worker alone).
    #[arg(long)]
    mem_no_plain: bool,

    /// local: shards of the kinesis-local stream.
    #[arg(long, default_value_t = 4)]
    local_shards: u32,
    /// local: records per shard.
    #[arg(long, default_value_t = 5_000)]
    local_records: usize,
    /// local: rounds of (plain loop, worker), alternating which goes first (kinesis-local's
    /// times vary by ±20 % from run to run, so fewer rounds say little).
    #[arg(long, default_value_t = 4)]
    local_rounds: usize,
    /// local: the worker's polling.min_interval in ms (default: the library's, 200 ms).
    #[arg(long)]
    local_min_interval_ms: Option<u64>,
    /// local: GetRecords limit of the plain loop and the worker's polling.max_records.
    #[arg(long, default_value_t = 10_000)]
    local_max_records: u32,
    /// local: the worker's polling.prefetch_bytes in MiB (default: the library's, 24 MiB).
    #[arg(long)]
    local_prefetch_mib: Option<usize>,

    /// startup: shards.
    #[arg(long, default_value_t = 16)]
    startup_shards: u32,
    /// startup: measurements per case.
    #[arg(long, default_value_t = 3)]
    startup_repeats: usize,
    /// startup: skip the moto rows.
    #[arg(long)]
    no_moto: bool,

    /// rss: shards.
    #[arg(long, default_value_t = 16)]
    rss_shards: u32,
    /// rss: records per shard (fewer if loading runs over --rss-load-budget-secs).
    #[arg(long, default_value_t = 20_000)]
    rss_records: usize,
    /// rss: stop loading after this many seconds.
    #[arg(long, default_value_t = 300)]
    rss_load_budget_secs: u64,
    /// rss: runs of the CLI over the same data (the worst peak is reported).
    #[arg(long, default_value_t = 2)]
    rss_runs: usize,
    /// rss: also run the CLI once under heaptrack, writing the profile into this directory.
    #[arg(long)]
    rss_heaptrack: Option<PathBuf>,
    /// rss: after the measured runs, one more run with this extra environment variable for the
    /// CLI (KEY=VALUE, repeatable; e.g. MALLOC_ARENA_MAX=2), printed but not in the table.
    #[arg(long)]
    rss_extra_env: Vec<String>,
    /// rss: the Kinesis server: ferrokinesis when installed (`auto`), else kinesis-local.
    #[arg(long, value_enum, default_value_t = RssKinesis::Auto)]
    rss_kinesis: RssKinesis,
    /// rss: the kcl CLI binary.
    #[arg(long, default_value_os_t = default_kcl_bin())]
    kcl_bin: PathBuf,

    /// catchup: shards with a backlog.
    #[arg(long, default_value_t = 64)]
    catchup_shards: u32,
    /// catchup: backlog per shard, in seconds at 2 MB/s.
    #[arg(long, default_value_t = 10.0)]
    catchup_seconds: f64,
    /// catchup: stop loading after this many seconds (a smaller backlog).
    #[arg(long, default_value_t = 240)]
    catchup_load_budget_secs: u64,

    /// many-shards: quiet shards held by one worker.
    #[arg(long, default_value_t = 1000)]
    many_shards: u32,
    /// many-shards: seconds measured once every lease is taken and the shards settled.
    #[arg(long, default_value_t = 60)]
    many_window_secs: u64,
    /// many-shards: seconds between every lease taken and the measurement.
    #[arg(long, default_value_t = 10)]
    many_settle_secs: u64,
    /// many-shards: the worker's polling.idle_max_interval in ms (default: the library's, 1 s).
    #[arg(long)]
    many_idle_max_ms: Option<u64>,

    /// parallel: records of the sequential run (20 rec/s at 50 ms each).
    #[arg(long, default_value_t = 300)]
    parallel_sequential_records: usize,
    /// parallel: records of the OrderedParallel run.
    #[arg(long, default_value_t = 10_000)]
    parallel_records: usize,
    /// parallel: distinct partition keys.
    #[arg(long, default_value_t = 1000)]
    parallel_keys: usize,
    /// parallel: the handler's wait per record, ms.
    #[arg(long, default_value_t = 50)]
    parallel_delay_ms: u64,
    /// parallel: OrderedParallel's concurrency.
    #[arg(long, default_value_t = 64)]
    parallel_concurrency: usize,

    /// PutRecords calls in flight while loading kinesis-local.
    #[arg(long, default_value_t = 8)]
    put_parallelism: usize,
}

fn default_kcl_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("release")
        .join("kcl")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    All,
    Mem,
    Local,
    Startup,
    Rss,
    /// A worker draining a backlog on every shard (ferrokinesis; not part of `all`).
    Catchup,
    /// Many quiet shards on one worker (ferrokinesis; not part of `all`).
    ManyShards,
    /// OrderedParallel against the sequential processor, same slow handler (in memory).
    Parallel,
}

/// The Kinesis server of the `rss` benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RssKinesis {
    /// ferrokinesis when installed under `.emulators/ferrokinesis`, else kinesis-local.
    Auto,
    KinesisLocal,
    Ferrokinesis,
}

/// One line of the final table.
struct Row {
    name: String,
    measured: String,
    target: String,
    pass: Option<bool>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let all = args.mode == Mode::All;
    let mut rows: Vec<Row> = Vec::new();

    if all || args.mode == Mode::Mem {
        let opts = mem::MemOpts {
            shards: args.mem_shards,
            per_shard: args.mem_records,
            record_size: args.record_size,
            min_interval: Duration::from_micros(args.mem_min_interval_us),
            idle_interval: Duration::from_micros(args.mem_idle_interval_us),
            max_records: args.mem_max_records,
            plain: !args.mem_no_plain,
            repeats: args.mem_repeats,
        };
        println!(
            "== mem: {} shards x {} records of {} B, current-thread runtime, \
             polling.min_interval {:?}, idle_interval {:?}, max_records {}",
            opts.shards,
            opts.per_shard,
            opts.record_size,
            opts.min_interval,
            opts.idle_interval,
            opts.max_records
        );
        match mem::run(&opts) {
            Ok(r) => {
                // One core: records per CPU-second of the (single-threaded) process is the
                // figure a busy shared machine cannot distort; wall-clock beside it.
                rows.push(Row {
                    name: format!(
                        "1. in-memory worker, NoopProcessor, {}x{} x {} B, current-thread runtime, run() to last checkpoint (least CPU of {})",
                        opts.shards, opts.per_shard, opts.record_size, opts.repeats
                    ),
                    measured: format!(
                        "{} per CPU-s ({} wall; {} records, CPU {}, wall {})",
                        fmt_rate(r.cpu_rate()),
                        fmt_rate(r.rate()),
                        r.records,
                        fmt_dur(r.cpu),
                        fmt_dur(r.elapsed)
                    ),
                    target: ">= 1 M rec/s per core".into(),
                    pass: Some(r.cpu_rate() >= 1e6),
                });
                let own = r.cpu.saturating_sub(r.backend_cpu);
                rows.push(Row {
                    name: "   same run, CPU outside MemKinesis::get_records (the worker's own work, incl. dropping records)".into(),
                    measured: format!(
                        "{} per CPU-s ({} of {} CPU in get_records)",
                        fmt_rate(r.records as f64 / own.as_secs_f64()),
                        fmt_dur(r.backend_cpu),
                        fmt_dur(r.cpu)
                    ),
                    target: "-".into(),
                    pass: None,
                });
                if let Some((wall, cpu, elapsed)) = r.plain {
                    rows.push(Row {
                        name: "   same data, plain MemKinesis GetRecords loop (the backend alone)"
                            .into(),
                        measured: format!(
                            "{} per CPU-s ({} wall, {}); worker/plain {:.2} per CPU-s",
                            fmt_rate(cpu),
                            fmt_rate(wall),
                            fmt_dur(elapsed),
                            r.cpu_rate() / cpu
                        ),
                        target: "-".into(),
                        pass: None,
                    });
                }
                let _ = (r.load, r.steady);
            }
            Err(e) => rows.push(failed("1. in-memory worker throughput", &e)),
        }
    }

    let needs_runtime = all
        || matches!(
            args.mode,
            Mode::Local
                | Mode::Startup
                | Mode::Rss
                | Mode::Catchup
                | Mode::ManyShards
                | Mode::Parallel
        );
    if needs_runtime {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        if all || args.mode == Mode::Local {
            let opts = local::LocalOpts {
                shards: args.local_shards,
                per_shard: args.local_records,
                record_size: args.record_size,
                rounds: args.local_rounds,
                put_parallelism: args.put_parallelism,
                min_interval: args.local_min_interval_ms.map(Duration::from_millis),
                max_records: args.local_max_records,
                prefetch_bytes: args.local_prefetch_mib.map(|m| m << 20),
            };
            println!(
                "== local: kinesis-local + dynalite, {} shards x {} records of {} B, GetRecords limit {}, worker polling.min_interval {}, prefetch_bytes {}",
                opts.shards,
                opts.per_shard,
                opts.record_size,
                opts.max_records,
                opts.min_interval
                    .map_or("200 ms (default)".to_string(), |d| format!("{d:?}")),
                opts.prefetch_bytes
                    .map_or("24 MiB (default)".to_string(), |b| format!("{} MiB", b >> 20))
            );
            match rt.block_on(interruptible(local::throughput(&opts))) {
                Ok(r) => {
                    let (p, w) = (r.best_plain(), r.best_worker());
                    let ratio = p.as_secs_f64() / w.as_secs_f64();
                    let mut per_round: Vec<f64> = r
                        .plain
                        .iter()
                        .zip(&r.worker)
                        .map(|(p, w)| p.as_secs_f64() / w.elapsed.as_secs_f64())
                        .collect();
                    let rounds: Vec<String> = per_round.iter().map(|x| format!("{x:.2}")).collect();
                    per_round.sort_by(f64::total_cmp);
                    let median = match per_round.len() {
                        0 => f64::NAN,
                        n if n % 2 == 1 => per_round[n / 2],
                        n => (per_round[n / 2 - 1] + per_round[n / 2]) / 2.0,
                    };
                    rows.push(Row {
                        name: format!(
                            "2. kinesis-local, plain GetRecords loop, {}x{} x {} B (best of {})",
                            opts.shards, opts.per_shard, opts.record_size, opts.rounds
                        ),
                        measured: format!("{} ({})", fmt_rate(r.rate(p)), fmt_dur(p)),
                        target: "-".into(),
                        pass: None,
                    });
                    rows.push(Row {
                        name: "2. kinesis-local, worker (Aws + DynamoLeaseStore on dynalite), run() to last checkpoint".into(),
                        measured: format!(
                            "{} ({}); ratio {ratio:.2} best of each (per round: {}; median {median:.2})",
                            fmt_rate(r.rate(w)),
                            fmt_dur(w),
                            rounds.join(", ")
                        ),
                        target: ">= 0.95 x plain".into(),
                        pass: Some(ratio >= 0.95),
                    });
                    let wr = r.best_worker_reading();
                    let rounds_reading: Vec<String> = r
                        .plain
                        .iter()
                        .zip(&r.worker)
                        .map(|(p, w)| format!("{:.2}", p.as_secs_f64() / w.reading().as_secs_f64()))
                        .collect();
                    rows.push(Row {
                        name: "   same worker runs, from the first GetShardIterator (without start-up: lease table, ListShards, takes)".into(),
                        measured: format!(
                            "{} ({}); ratio {:.2} (per round: {})",
                            fmt_rate(r.rate(wr)),
                            fmt_dur(wr),
                            p.as_secs_f64() / wr.as_secs_f64(),
                            rounds_reading.join(", ")
                        ),
                        target: "-".into(),
                        pass: None,
                    });
                    let _ = r.load;
                }
                Err(e) => rows.push(failed("2. kinesis-local worker vs plain loop", &e)),
            }
        }
        if (all || args.mode == Mode::Startup) && !INTERRUPTED.load(Ordering::Relaxed) {
            let opts = local::StartupOpts {
                shards: args.startup_shards,
                repeats: args.startup_repeats,
                moto: !args.no_moto,
            };
            println!(
                "== startup: {} shards, kinesis-local + dynalite{}, {} repeats",
                opts.shards,
                if opts.moto { " / moto" } else { "" },
                opts.repeats
            );
            match rt.block_on(interruptible(local::startup(&opts))) {
                Ok(rs) => {
                    for r in rs {
                        let samples: Vec<String> = r.samples.iter().map(|d| fmt_dur(*d)).collect();
                        rows.push(Row {
                            name: format!(
                                "3. run() to first record, {} shards, {}, {}",
                                opts.shards,
                                r.backend,
                                r.case.label()
                            ),
                            measured: format!(
                                "median {} max {} ({})",
                                fmt_dur(r.median()),
                                fmt_dur(r.max()),
                                samples.join(", ")
                            ),
                            target: format!("<= {}", fmt_dur(r.case.target())),
                            pass: Some(r.max() <= r.case.target()),
                        });
                    }
                }
                Err(e) => rows.push(failed("3. time to first record", &e)),
            }
        }
        if (all || args.mode == Mode::Rss) && !INTERRUPTED.load(Ordering::Relaxed) {
            let opts = rss::RssOpts {
                shards: args.rss_shards,
                per_shard: args.rss_records,
                record_size: args.record_size,
                put_parallelism: args.put_parallelism,
                load_budget: Duration::from_secs(args.rss_load_budget_secs),
                kcl_bin: args.kcl_bin.clone(),
                runs: args.rss_runs,
                heaptrack: args.rss_heaptrack.clone(),
                extra_env: args.rss_extra_env.clone(),
                ferrokinesis: match args.rss_kinesis {
                    RssKinesis::Auto => ferro::installed(),
                    RssKinesis::KinesisLocal => false,
                    RssKinesis::Ferrokinesis => true,
                },
            };
            let server = if opts.ferrokinesis {
                "ferrokinesis"
            } else {
                "kinesis-local"
            };
            println!(
                "== rss: `kcl consume`, {} shards x {} records of {} B on {server} + dynalite",
                opts.shards, opts.per_shard, opts.record_size
            );
            match rt.block_on(interruptible(rss::run(&opts))) {
                Ok(r) => {
                    let mib = |b: u64| b as f64 / 1048576.0;
                    rows.push(Row {
                        name: format!(
                            "4. peak RSS of `kcl consume`, {}x{} x {} B on {server}{}",
                            opts.shards,
                            r.per_shard_loaded,
                            opts.record_size,
                            if r.per_shard_loaded < opts.per_shard {
                                format!(" (load budget: {} asked)", opts.per_shard)
                            } else {
                                String::new()
                            }
                        ),
                        measured: format!(
                            "{:.1} MiB = {:.1} MB (runs: {}; {}); drained {} in {}, {}; CPU {}; load {}; exit {} after SIGTERM in {}",
                            mib(r.peak_rss),
                            r.peak_rss as f64 / 1e6,
                            r.peaks.iter().map(|p| format!("{:.1} MiB", mib(*p))).collect::<Vec<_>>().join(", "),
                            r.how,
                            r.records,
                            fmt_dur(r.drain),
                            fmt_rate(r.records as f64 / r.drain.as_secs_f64()),
                            fmt_dur(r.cpu),
                            fmt_dur(r.load),
                            r.exit_status,
                            fmt_dur(r.shutdown)
                        ),
                        target: "<= 40 MB".into(),
                        pass: Some(r.peak_rss <= 40_000_000),
                    });
                }
                Err(e) => rows.push(failed("4. peak RSS of kcl consume", &e)),
            }
        }
        if (all || args.mode == Mode::Parallel) && !INTERRUPTED.load(Ordering::Relaxed) {
            let opts = parallel::ParallelOpts {
                sequential_records: args.parallel_sequential_records,
                parallel_records: args.parallel_records,
                keys: args.parallel_keys,
                delay: Duration::from_millis(args.parallel_delay_ms),
                concurrency: args.parallel_concurrency,
            };
            println!(
                "== parallel: 1 in-memory shard, {} keys, handler waits {:?} per record; sequential processor ({} records) vs OrderedParallel x{} ({} records), each under a Worker",
                opts.keys, opts.delay, opts.sequential_records, opts.concurrency, opts.parallel_records
            );
            match rt.block_on(interruptible(parallel::run(&opts))) {
                Ok(r) => {
                    rows.push(Row {
                        name: format!(
                            "7. sequential RecordProcessor, {} ms/record, {} records, first start to last completion",
                            opts.delay.as_millis(),
                            r.sequential.records
                        ),
                        measured: format!(
                            "{:.1} rec/s ({})",
                            r.sequential.rate(),
                            fmt_dur(r.sequential.elapsed)
                        ),
                        target: "-".into(),
                        pass: None,
                    });
                    rows.push(Row {
                        name: format!(
                            "7. OrderedParallel x{}, {} keys, {} records; per-key order + checkpoint <= completed prefix checked",
                            opts.concurrency, opts.keys, r.parallel.records
                        ),
                        measured: format!(
                            "{:.1} rec/s ({}); speed-up {:.1}x; {} checkpoints, at most {} running",
                            r.parallel.rate(),
                            fmt_dur(r.parallel.elapsed),
                            r.ratio(),
                            r.parallel.checkpoints,
                            r.parallel.max_running
                        ),
                        target: ">= 40 x sequential".into(),
                        pass: Some(r.ratio() >= 40.0),
                    });
                }
                Err(e) => rows.push(failed("7. ordered parallelism", &e)),
            }
        }
        if args.mode == Mode::Catchup {
            counters::install();
            let opts = catchup::CatchupOpts {
                shards: args.catchup_shards,
                seconds: args.catchup_seconds,
                record_size: args.record_size,
                put_parallelism: args.put_parallelism,
                load_budget: Duration::from_secs(args.catchup_load_budget_secs),
                timeout: Duration::from_secs(600),
            };
            println!(
                "== catchup: {} shards x {} s of backlog at 2 MB/s, records of {} B, on ferrokinesis + dynalite; default settings, NoopProcessor",
                opts.shards, opts.seconds, opts.record_size
            );
            match rt.block_on(interruptible(catchup::run(&opts))) {
                Ok(r) => {
                    let mb = |b: f64| b / 1e6;
                    let mib = |b: u64| b as f64 / 1048576.0;
                    let secs = r.bytes_per_shard as f64 / 2e6;
                    rows.push(Row {
                        name: format!(
                            "5. catch-up, {}x{} x {} B ({:.1} MB = {secs:.1} s at 2 MB/s per shard{}), read rate per shard (own first to last record)",
                            opts.shards,
                            r.per_shard_loaded,
                            opts.record_size,
                            mb(r.bytes_per_shard as f64),
                            if secs + 0.05 < opts.seconds { ", load budget" } else { "" }
                        ),
                        measured: format!(
                            "min {:.2} MB/s, median {:.2} MB/s; all shards {:.2} MB/s each; drained in {} (load {}); CPU {} (ferrokinesis {}); {} GetRecords, {} each on average; budget-limited calls {}",
                            mb(r.min_rate()),
                            mb(r.median_rate()),
                            mb(r.overall_rate),
                            fmt_dur(r.drain),
                            fmt_dur(r.load),
                            fmt_dur(r.cpu),
                            r.server_cpu.map_or("?".into(), fmt_dur),
                            r.get_records_calls,
                            fmt_dur(r.get_records_latency),
                            r.limited_calls
                        ),
                        target: ">= 1.9 MB/s".into(),
                        pass: Some(r.min_rate() >= 1.9e6),
                    });
                    rows.push(Row {
                        name: "   same run, peak RSS of the process while draining".into(),
                        measured: format!(
                            "{:.1} MiB (before the worker started: {:.1} MiB)",
                            mib(r.peak_rss),
                            mib(r.baseline_rss)
                        ),
                        target: "bounded".into(),
                        pass: None,
                    });
                }
                Err(e) => rows.push(failed("5. catch-up", &e)),
            }
        }
        if args.mode == Mode::ManyShards {
            counters::install();
            let opts = many::ManyOpts {
                shards: args.many_shards,
                settle: Duration::from_secs(args.many_settle_secs),
                window: Duration::from_secs(args.many_window_secs),
                idle_max: args.many_idle_max_ms.map(Duration::from_millis),
            };
            println!(
                "== many-shards: {} quiet shards, one worker (NoopProcessor), ferrokinesis + dynalite, polling.idle_max_interval {}",
                opts.shards,
                opts.idle_max
                    .map_or("1 s (default)".to_string(), |d| format!("{d:?}"))
            );
            match rt.block_on(interruptible(many::run(&opts))) {
                Ok(r) => {
                    let mib = |b: u64| b as f64 / 1048576.0;
                    rows.push(Row {
                        name: format!(
                            "6. {} quiet shards on one worker, peak RSS (whole run){}",
                            opts.shards,
                            opts.idle_max
                                .map_or(String::new(), |d| format!(", idle_max_interval {d:?}"))
                        ),
                        measured: format!(
                            "{:.1} MiB = {:.1} MB (at the end {:.1} MiB); every lease taken after {}",
                            mib(r.peak_rss),
                            r.peak_rss as f64 / 1e6,
                            mib(r.rss_end),
                            fmt_dur(r.taken)
                        ),
                        target: "<= 200 MB".into(),
                        pass: Some(r.peak_rss <= 200_000_000),
                    });
                    rows.push(Row {
                        name: format!("6. same, idle CPU over {} (of one core)", fmt_dur(r.wall)),
                        measured: format!(
                            "{:.1} % ({} CPU); GetRecords {:.2} calls/s per shard",
                            100.0 * r.cpu_share(),
                            fmt_dur(r.cpu),
                            r.calls_per_shard_second(opts.shards)
                        ),
                        target: "<= 10 %".into(),
                        pass: Some(r.cpu_share() <= 0.10),
                    });
                }
                Err(e) => rows.push(failed("6. many quiet shards", &e)),
            }
        }
    }

    print_table(&rows);
    Ok(())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Runs `fut` until it ends or SIGINT / SIGTERM arrives; on a signal the future is dropped,
/// which stops the servers it started (they are killed when their handles drop).
async fn interruptible<T>(
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        r = fut => r,
        _ = term.recv() => {
            INTERRUPTED.store(true, Ordering::Relaxed);
            anyhow::bail!("interrupted (SIGTERM)")
        }
        _ = int.recv() => {
            INTERRUPTED.store(true, Ordering::Relaxed);
            anyhow::bail!("interrupted (SIGINT)")
        }
    }
}

fn failed(name: &str, e: &anyhow::Error) -> Row {
    eprintln!("{name}: {e:#}");
    Row {
        name: name.into(),
        measured: format!("error: {e:#}"),
        target: "-".into(),
        pass: Some(false),
    }
}

fn print_table(rows: &[Row]) {
    let header = ["benchmark", "measured", "target", "result"];
    let cells: Vec<[String; 4]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.measured.clone(),
                r.target.clone(),
                match r.pass {
                    Some(true) => "PASS".into(),
                    Some(false) => "FAIL".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    println!();
    let line = |c: [&str; 4]| {
        println!(
            "| {:<w0$} | {:<w1$} | {:<w2$} | {:<w3$} |",
            c[0],
            c[1],
            c[2],
            c[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    };
    line(header);
    println!(
        "|{}|{}|{}|{}|",
        "-".repeat(widths[0] + 2),
        "-".repeat(widths[1] + 2),
        "-".repeat(widths[2] + 2),
        "-".repeat(widths[3] + 2)
    );
    for r in &cells {
        line([&r[0], &r[1], &r[2], &r[3]]);
    }
}
