//! Benchmark 6: many quiet shards on one worker. A stream of `shards` empty shards on
//! ferrokinesis, one worker with the default settings holding all of them (lease table on
//! dynalite, `NoopProcessor`). Once every lease is taken and the shards had time to back off,
//! measures over `window`: this process's CPU (the worker's; the servers are other processes)
//! as a share of one core, `GetRecords` calls per shard per second, and the peak RSS of the
//! whole run (`VmHWM`: start-up included).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use kcl::retrieval::aws::AwsKinesis;
use kcl::testkit::NoopProcessor;
use kcl::{Backends, KinesisApi, Worker};
use kcl_integration_tests::{dynamo_servers, kinesis_server};

use crate::counters;
use crate::local::dynamo_client;
use crate::probe::{fmt_dur, process_cpu_time};

#[derive(Debug, Clone)]
pub struct ManyOpts {
    pub shards: u32,
    /// After every lease was taken, wait this long before measuring (idle backoff settles).
    pub settle: Duration,
    /// How long the idle worker is measured.
    pub window: Duration,
    /// `polling.idle_max_interval` (`None`: the library's default, 1 s).
    pub idle_max: Option<Duration>,
}

#[derive(Debug)]
pub struct ManyResult {
    /// `run()` to every lease taken.
    pub taken: Duration,
    pub cpu: Duration,
    pub wall: Duration,
    pub calls: u64,
    pub peak_rss: u64,
    pub rss_end: u64,
}

impl ManyResult {
    pub fn cpu_share(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64()
    }

    pub fn calls_per_shard_second(&self, shards: u32) -> f64 {
        self.calls as f64 / f64::from(shards) / self.wall.as_secs_f64()
    }
}

/// `/proc/self/status` field, bytes.
pub fn status_field(name: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

pub async fn run(opts: &ManyOpts) -> anyhow::Result<ManyResult> {
    ensure!(
        crate::ferro::installed(),
        "ferrokinesis is not installed: cargo install --root .emulators/ferrokinesis ferrokinesis@0.7.0"
    );
    let kinesis = crate::ferro::start().await?;
    let dynalite = dynamo_servers::start_dynalite().await?;
    let kc = kinesis_server::kinesis_client(&kinesis).await;
    let dc = dynamo_client(&dynalite).await;
    let stream = "bench-many";
    kinesis_server::create_stream(&kc, stream, opts.shards).await?;

    let app = kcl_integration_tests::unique_name("many");
    let aws = kcl::Aws::from_clients(kc.clone(), dc.clone());
    let kinesis_api: Arc<dyn KinesisApi> = Arc::new(counters::CountingKinesis {
        inner: Arc::new(AwsKinesis::new(kc.clone()).with_list_shards_page_size(1000)),
    });
    let mut polling = kcl::PollingConfig::default();
    if let Some(d) = opts.idle_max {
        polling.idle_max_interval = d;
    }
    let worker = Worker::builder()
        .application_name(&app)
        .stream(stream)
        .kinesis(kinesis_api)
        .lease_store(aws.lease_store(&app))
        .polling(polling)
        .processor(|| NoopProcessor)
        .build()?;
    let stop = worker.shutdown_handle();
    let taken0 = counters::get("kcl_leases_taken_total");
    let t0 = Instant::now();
    let mut running = tokio::spawn(worker.run());
    let all_taken = async {
        loop {
            let taken = counters::get("kcl_leases_taken_total") - taken0;
            if taken >= u64::from(opts.shards) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let s = t0.elapsed().as_secs();
            if s % 10 == 0 && t0.elapsed().subsec_millis() < 500 {
                println!("many: {taken} leases taken after {}", fmt_dur(t0.elapsed()));
            }
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(Duration::from_secs(600), all_taken) => {}
        r = &mut running => bail!("the worker stopped: {r:?}"),
    }
    let taken = t0.elapsed();
    ensure!(
        counters::get("kcl_leases_taken_total") - taken0 >= u64::from(opts.shards),
        "not every lease was taken in 10 minutes"
    );
    println!(
        "many: all {} leases taken after {}; settling for {}",
        opts.shards,
        fmt_dur(taken),
        fmt_dur(opts.settle)
    );
    tokio::time::sleep(opts.settle).await;
    let calls0 = counters::get(counters::GET_RECORDS);
    let cpu0 = process_cpu_time();
    let w0 = Instant::now();
    tokio::time::sleep(opts.window).await;
    let wall = w0.elapsed();
    let cpu = process_cpu_time().saturating_sub(cpu0);
    let calls = counters::get(counters::GET_RECORDS) - calls0;
    let peak_rss = status_field("VmHWM:").unwrap_or(0);
    let rss_end = status_field("VmRSS:").unwrap_or(0);
    stop.shutdown();
    let joined = running.await.context("worker panicked")?;
    joined?;
    Ok(ManyResult {
        taken,
        cpu,
        wall,
        calls,
        peak_rss,
        rss_end,
    })
}
