//! The `kcl` admin commands, run as processes against kinesis-local and dynalite (one pair for
//! the whole binary), next to in-process workers with the real AWS backends:
//!
//! - `kcl leases` shows each lease's lag and each worker; `kcl shards` the shard tree with the
//!   owners;
//! - `kcl reset` refuses a live worker's lease without `--force`, refuses to prompt without a
//!   terminal, prints its plan with `--dry-run` and changes nothing;
//! - `kcl reset --force --to trim-horizon` racing a running worker (records still arriving):
//!   afterwards every record is delivered again from the start, in order per shard, with no
//!   two processors of a shard delivering at once;
//! - `kcl release` refuses a live owner, releases one whose lease stood still, and with
//!   `--force` has a live worker hand its lease over without delivering anything twice;
//! - `kcl reset --to at-timestamp=T` and `--to seq=N` (the next worker resumes exactly at T,
//!   and just after N);
//! - `kcl destroy` refuses while heartbeats move, then deletes both tables and the fan-out
//!   consumer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use kcl::lease::dynamo::DynamoLeaseStore;
use kcl::lease::{LeaseStore, WorkerId};
use kcl::retrieval::KinesisApi;
use kcl::{
    async_trait, Checkpointer, ExtendedSequenceNumber, ProcessorError, RecordBatch,
    RecordProcessor, SequenceNumber, ShardContext, ShardId,
};
use kcl_integration_tests::cli::{kcl_binary, run_kcl, CliEnv, Finished, KclProcess};
use kcl_integration_tests::dynamo_servers::start_dynalite;
use kcl_integration_tests::scenarios::{
    check_parents_first, check_per_key_order, poll, records, worker, Delivery, DeliveryLog,
    LocalKinesis, Recorder, StreamFixture,
};
use kcl_integration_tests::{sdk_config, unique_name};
use tokio::time::Instant;

const KEYS: u32 = 16;
/// How long a `kcl` admin command may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// The in-process workers' lease duration (`scenarios::worker`).
const LEASE_DURATION: &str = "6s";

struct Env {
    bin: std::path::PathBuf,
    cli: CliEnv,
    kinesis: LocalKinesis,
    dynamo_conf: aws_config::SdkConfig,
}

impl Env {
    async fn kcl(&self, args: &[&str]) -> anyhow::Result<Finished> {
        let out = run_kcl(&self.bin, &self.cli, args, RUN_TIMEOUT).await?;
        eprintln!(
            "$ kcl {} → {} in {:.1?}",
            args.join(" "),
            out.status,
            out.elapsed
        );
        Ok(out)
    }

    /// Runs `kcl args`, which must succeed; returns its stdout.
    async fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.kcl(args).await?;
        ensure!(
            out.status.success(),
            "kcl {args:?} failed ({}):\n{}",
            out.status,
            out.stderr
        );
        Ok(out.stdout)
    }

    /// Runs `kcl args`, which must fail with `needle` in its stderr.
    async fn refused(&self, args: &[&str], needle: &str) -> anyhow::Result<()> {
        let out = self.kcl(args).await?;
        ensure!(
            !out.status.success(),
            "kcl {args:?} succeeded but must be refused; stdout:\n{}",
            out.stdout
        );
        ensure!(
            out.stderr.contains(needle),
            "kcl {args:?} failed without saying {needle:?}:\n{}",
            out.stderr
        );
        Ok(())
    }

    async fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = self.ok(args).await?;
        serde_json::from_str(&out).with_context(|| format!("kcl {args:?} printed {out}"))
    }

    /// A new stream of `shards` shards holding records `0..n`, and a new application name.
    async fn stream(&self, name: &str, shards: u32, n: u32) -> anyhow::Result<(String, String)> {
        let stream = unique_name(name);
        self.kinesis.create_stream(&stream, shards).await?;
        self.kinesis.put(&stream, records(0, n, KEYS)).await?;
        Ok((stream, unique_name(&format!("{name}-app"))))
    }

    fn store(&self, app: &str) -> Arc<DynamoLeaseStore> {
        Arc::new(DynamoLeaseStore::from_conf(&self.dynamo_conf, app))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands() -> anyhow::Result<()> {
    let started = Instant::now();
    let (bin, kinesis, dynamo) =
        tokio::try_join!(kcl_binary(), LocalKinesis::start(), start_dynalite())?;
    let env = Env {
        bin,
        cli: CliEnv::new(kinesis.server.endpoint(), dynamo.endpoint()),
        dynamo_conf: sdk_config(&dynamo.endpoint()).await,
        kinesis,
    };
    eprintln!("setup: {:.1?}", started.elapsed());
    let (a, b, c, d) = tokio::join!(
        timed("reset racing a worker", reset_racing_a_worker(&env)),
        timed(
            "reset to a time and a sequence number",
            reset_to_a_time_and_a_sequence_number(&env)
        ),
        timed("reset of a split parent", reset_of_a_split_parent(&env)),
        timed("kcl consume's flag errors and abandonment", async {
            consume_flag_errors(&env).await?;
            consume_abandons_a_stuck_processor(&env).await
        }),
    );
    a?;
    b?;
    c?;
    d?;
    eprintln!("total: {:.1?}", started.elapsed());
    Ok(())
}

/// Runs one part of the test, printing how long it took; its error names it.
async fn timed(
    what: &str,
    part: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let t = Instant::now();
    let r = part.await.context(what.to_owned());
    eprintln!("{what}: {:.1?}", t.elapsed());
    r
}

/// Which processors are running, per shard, across every worker of a test; a processor that
/// starts (`initialize`) while another of its shard has not ended is an overlap.
#[derive(Clone, Default)]
struct Exclusivity {
    active: Arc<std::sync::Mutex<BTreeMap<ShardId, String>>>,
    overlaps: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Exclusivity {
    /// A processor factory: `Recorder`s of `worker` logging into `log`, watched.
    fn factory(
        &self,
        worker: &str,
        log: &DeliveryLog,
    ) -> impl Fn() -> Exclusive + Send + Sync + 'static {
        let (this, worker, recorder) = (
            self.clone(),
            worker.to_owned(),
            Recorder::factory(worker, log),
        );
        move || Exclusive {
            inner: recorder(),
            watch: this.clone(),
            worker: worker.clone(),
            shard: None,
        }
    }

    fn overlaps(&self) -> Vec<String> {
        self.overlaps.lock().map(|o| o.clone()).unwrap_or_default()
    }
}

/// A `Recorder` that notes when it starts and ends in an [`Exclusivity`].
struct Exclusive {
    inner: Recorder,
    watch: Exclusivity,
    worker: String,
    shard: Option<ShardId>,
}

impl Exclusive {
    fn end(&mut self) {
        if let (Some(shard), Ok(mut active)) = (self.shard.take(), self.watch.active.lock()) {
            active.remove(&shard);
        }
    }
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        self.end();
    }
}

#[async_trait]
impl RecordProcessor for Exclusive {
    async fn initialize(&mut self, shard: &ShardContext) -> Result<(), ProcessorError> {
        if let Ok(mut active) = self.watch.active.lock() {
            if let Some(other) = active.insert(shard.shard_id.clone(), self.worker.clone()) {
                if let Ok(mut o) = self.watch.overlaps.lock() {
                    o.push(format!(
                        "a processor of {} on {} started while one of {other} ran",
                        shard.shard_id, self.worker
                    ));
                }
            }
        }
        self.shard = Some(shard.shard_id.clone());
        self.inner.initialize(shard).await
    }

    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        self.inner.process_records(batch, cp).await
    }

    async fn shard_ended(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        let r = self.inner.shard_ended(cp).await;
        self.end();
        r
    }

    async fn lease_lost(&mut self) {
        self.inner.lease_lost().await;
        self.end();
    }

    async fn shutdown_requested(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        let r = self.inner.shutdown_requested(cp).await;
        self.end();
        r
    }
}

/// Per shard, the sequence numbers delivered, in delivery order.
fn per_shard(log: &[Delivery]) -> BTreeMap<ShardId, Vec<&Delivery>> {
    let mut m: BTreeMap<ShardId, Vec<&Delivery>> = BTreeMap::new();
    for d in log {
        m.entry(d.shard.clone()).or_default().push(d);
    }
    m
}

/// After one reset to the trim horizon: per shard, the deliveries go up, drop back once to
/// the shard's first record, and go up again through every record of the shard. A second
/// processor delivering at the same time as another would interleave two runs (more than one
/// drop); a reset not applied would have no drop; one applied at the wrong place would not
/// restart at the first record. Returns whether every shard has been replayed whole.
fn check_replayed_once(log: &[Delivery], all: &BTreeSet<(u32, u32)>) -> anyhow::Result<bool> {
    let mut replayed: BTreeSet<(u32, u32)> = BTreeSet::new();
    let mut complete = true;
    for (shard, ds) in per_shard(log) {
        let first = ds.iter().map(|d| &d.seq).min().context("no deliveries")?;
        let drops: Vec<usize> = (1..ds.len())
            .filter(|&i| ds[i].seq <= ds[i - 1].seq)
            .collect();
        ensure!(
            drops.len() <= 1,
            "shard {shard}: the deliveries went back {} times (at deliveries {drops:?}): two \
             processors delivered at once, or a record was delivered twice outside the replay",
            drops.len()
        );
        let Some(&at) = drops.first() else {
            complete = false;
            continue;
        };
        ensure!(
            &ds[at].seq == first,
            "shard {shard}: the replay started at {}, not at the shard's first record {first}",
            ds[at].seq
        );
        replayed.extend(ds[at..].iter().map(|d| (d.key, d.n)));
    }
    Ok(complete && replayed == *all)
}

/// Two running workers; `kcl leases`, `kcl shards`; the refusals; then `kcl reset --force`
/// while records keep arriving; `kcl release --force`; `kcl destroy`.
async fn reset_racing_a_worker(env: &Env) -> anyhow::Result<()> {
    const WAVE: u32 = 200;
    let (stream, app) = env.stream("admin-race", 2, WAVE).await?;
    let store = env.store(&app);
    let log = DeliveryLog::default();
    let watch = Exclusivity::default();
    let mut workers = Vec::new();
    for id in ["w1", "w2"] {
        let w = worker(&app, &stream, id, &env.kinesis, store.clone(), &log)
            .processor(watch.factory(id, &log))
            .build()?;
        workers.push((w.shutdown_handle(), tokio::spawn(w.run())));
    }
    log.wait_for(WAVE as usize, Duration::from_secs(60)).await?;
    // One lease per worker, each checkpointed.
    let owners = poll(
        "one checkpointed lease per worker",
        Duration::from_secs(30),
        || async {
            let t = store.list().await?.leases;
            let owners: BTreeSet<String> = t
                .iter()
                .filter_map(|l| l.owner.as_ref().map(|o| o.to_string()))
                .collect();
            let done = t.len() == 2
                && owners.len() == 2
                && t.iter().all(|l| l.checkpoint.sequence().is_some());
            Ok(done.then_some(owners))
        },
    )
    .await?;
    ensure!(
        owners == BTreeSet::from(["w1".to_owned(), "w2".to_owned()]),
        "owners {owners:?}"
    );

    // kcl leases: the lag of each lease, and the workers.
    let leases = env
        .json(&["leases", "--app", &app, "--stream", &stream, "--json"])
        .await?;
    let leases = leases.as_array().context("an array of leases")?;
    ensure!(leases.len() == 2, "{} leases: {leases:?}", leases.len());
    for l in leases {
        ensure!(
            l["leaseOwner"].is_string() && l["lagState"] == "measured" && l["lagMillis"].is_u64(),
            "an owned lease with its lag measured: {l}"
        );
    }
    let summary = env
        .json(&[
            "leases",
            "--app",
            &app,
            "--workers",
            "--observe",
            "3s",
            "--json",
        ])
        .await?;
    for (i, id) in ["w1", "w2"].iter().enumerate() {
        let w = &summary[i];
        ensure!(
            w["workerId"] == *id && w["leases"] == 1 && w["heartbeatState"] == "moving",
            "{id} with 1 lease and a moving heartbeat: {summary}"
        );
    }
    let human = env
        .ok(&["leases", "--app", &app, "--stream", &stream])
        .await?;
    check_width(&human)?;
    ensure!(
        human.contains("LAG") && human.contains("WORKER") && human.contains("w2"),
        "the human table has a lag column and a worker table:\n{human}"
    );

    // kcl shards: two open roots, each leased.
    let shards = env
        .json(&["shards", "--stream", &stream, "--app", &app, "--json"])
        .await?;
    let shards = shards.as_array().context("an array of shards")?;
    ensure!(
        shards.len() == 2
            && shards.iter().all(|s| s["state"] == "OPEN"
                && s["depth"] == 0
                && s["lease"]["leaseOwner"].is_string()),
        "two open shards, each leased: {shards:?}"
    );
    check_width(
        &env.ok(&["shards", "--stream", &stream, "--app", &app])
            .await?,
    )?;

    // The refusals change nothing.
    let before = store.list().await?.leases;
    let reset_all = [
        "reset",
        "--app",
        &app,
        "--stream",
        &stream,
        "--all",
        "--to",
        "trim-horizon",
    ];
    let with = |extra: &[&'static str]| -> Vec<String> {
        reset_all
            .iter()
            .map(|s| s.to_string())
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    env.refused(
        &args(&with(&["--yes", "--lease-duration", LEASE_DURATION])),
        "--force",
    )
    .await?;
    env.refused(&args(&with(&["--force"])), "stdin is not a terminal")
        .await?;
    let plan = env.json(&args(&with(&["--dry-run", "--json"]))).await?;
    ensure!(
        plan["steps"].as_array().map(Vec::len) == Some(2)
            && plan["steps"][0]["to"] == "TRIM_HORIZON",
        "the dry run's plan: {plan}"
    );
    let shard0 = before[0].shard_id();
    env.refused(
        &[
            "release",
            "--app",
            &app,
            "--shard",
            shard0.as_str(),
            "--lease-duration",
            LEASE_DURATION,
        ],
        "--force",
    )
    .await?;
    let after = store.list().await?.leases;
    for (b, a) in before.iter().zip(&after) {
        ensure!(
            a.checkpoint == b.checkpoint && a.owner == b.owner,
            "a refused command changed {}: {b:?} → {a:?}",
            a.key
        );
    }
    env.refused(
        &[
            "destroy",
            "--app",
            &app,
            "--yes",
            "--lease-duration",
            LEASE_DURATION,
        ],
        "--force",
    )
    .await?;

    // The reset, while a second wave arrives.
    let put = {
        let kinesis = env.kinesis.client.clone();
        let stream = stream.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            kcl_integration_tests::kinesis_server::put_records_with_parallelism(
                &kinesis,
                &stream,
                records(WAVE, 2 * WAVE, KEYS),
                1,
            )
            .await
        })
    };
    let reset = env
        .json(&args(&with(&[
            "--force",
            "--yes",
            "--json",
            "--lease-duration",
            LEASE_DURATION,
            "--handoff-timeout",
            "30s",
        ])))
        .await?;
    put.await??;
    ensure!(
        reset["steps"]
            .as_array()
            .is_some_and(|s| s.len() == 2 && s.iter().all(|s| s["reset"] == true)),
        "both leases reset: {reset}"
    );
    // Given back at once: nothing is left to the pseudo-owner (to expire).
    let held: Vec<_> = store
        .list()
        .await?
        .leases
        .into_iter()
        .filter(|l| {
            l.owner
                .as_ref()
                .is_some_and(|o| o.as_str().starts_with("kcl-reset/"))
                || l.checkpoint_owner
                    .as_ref()
                    .is_some_and(|o| o.as_str().starts_with("kcl-reset/"))
        })
        .collect();
    ensure!(held.is_empty(), "still held by the reset: {held:?}");
    let all: BTreeSet<(u32, u32)> = (0..2 * WAVE).map(|i| (i % KEYS, i / KEYS)).collect();
    poll(
        "every record delivered again from the start",
        Duration::from_secs(60),
        || async { Ok(check_replayed_once(&log.snapshot(), &all)?.then_some(())) },
    )
    .await?;

    // kcl release --force: the owner hands the lease over, a worker takes it, and nothing is
    // delivered twice.
    let delivered = log.snapshot().len();
    let released = env
        .json(&[
            "release",
            "--app",
            &app,
            "--shard",
            shard0.as_str(),
            "--force",
            "--json",
            "--lease-duration",
            LEASE_DURATION,
        ])
        .await?;
    ensure!(
        released["ownerState"] == "live",
        "release --force of a live worker's lease: {released}"
    );
    poll(
        "a worker holds the lease again",
        Duration::from_secs(30),
        || async {
            let t = store.list().await?.leases;
            Ok(t.iter()
                .all(|l| {
                    l.owner
                        .as_ref()
                        .is_some_and(|o| o.as_str().starts_with('w'))
                })
                .then_some(()))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        log.snapshot().len() == delivered,
        "after a graceful release {} records were delivered again",
        log.snapshot().len() - delivered
    );
    check_replayed_once(&log.snapshot(), &all)?;
    let overlaps = watch.overlaps();
    ensure!(overlaps.is_empty(), "processors overlapped: {overlaps:?}");

    for (stop, _) in &workers {
        stop.shutdown();
    }
    for (_, run) in workers {
        run.await??;
    }
    // kcl destroy once the workers stopped: both tables go.
    let destroyed = env
        .json(&[
            "destroy",
            "--app",
            &app,
            "--yes",
            "--json",
            "--lease-duration",
            "2s",
        ])
        .await?;
    ensure!(
        destroyed["deleted"]["leaseTable"] == app.as_str()
            && destroyed["deleted"]["workerTable"] == format!("{app}-workers").as_str(),
        "both tables deleted: {destroyed}"
    );
    let (leases_left, workers_left) = env.store(&app).open_existing().await?;
    ensure!(
        !leases_left && !workers_left,
        "a table is left after kcl destroy"
    );
    Ok(())
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Every line of a human table fits 80 columns.
fn check_width(out: &str) -> anyhow::Result<()> {
    for l in out.lines() {
        ensure!(
            l.chars().count() <= 80,
            "{} columns: {l:?}",
            l.chars().count()
        );
    }
    Ok(())
}

/// Runs a worker until it delivered `n` records (and a moment more, to see nothing else
/// comes), then stops it gracefully; returns its log.
async fn consume(
    env: &Env,
    app: &str,
    stream: &str,
    id: &str,
    n: usize,
) -> anyhow::Result<Vec<Delivery>> {
    let log = DeliveryLog::default();
    let w = worker(app, stream, id, &env.kinesis, env.store(app), &log).build()?;
    let stop = w.shutdown_handle();
    let run = tokio::spawn(w.run());
    log.wait_for(n, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.shutdown();
    run.await??;
    Ok(log.snapshot())
}

/// `--to at-timestamp=T` then `--to seq=N` on a stopped application: the next worker delivers
/// exactly the records from T, then exactly those after N; a dead owner's lease is released;
/// `kcl destroy` deregisters the fan-out consumer.
async fn reset_to_a_time_and_a_sequence_number(env: &Env) -> anyhow::Result<()> {
    const WAVE: u32 = 40;
    let (stream, app) = env.stream("admin-time", 1, WAVE).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t = env.kinesis.now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    env.kinesis
        .put(&stream, records(WAVE, 2 * WAVE, KEYS))
        .await?;
    let wave2: BTreeSet<(u32, u32)> = (WAVE..2 * WAVE).map(|i| (i % KEYS, i / KEYS)).collect();
    let first = consume(env, &app, &stream, "c1", 2 * WAVE as usize).await?;
    ensure!(
        first.len() == 2 * WAVE as usize,
        "{} deliveries",
        first.len()
    );
    let last_of_wave1: SequenceNumber = first
        .iter()
        .filter(|d| !wave2.contains(&(d.key, d.n)))
        .map(|d| d.seq.clone())
        .max()
        .context("wave 1 delivered")?;
    let shard = first[0].shard.clone();
    let exactly_wave2 = |log: &[Delivery], what: &str| -> anyhow::Result<()> {
        let got: Vec<(u32, u32)> = log.iter().map(|d| (d.key, d.n)).collect();
        let set: BTreeSet<(u32, u32)> = got.iter().copied().collect();
        ensure!(
            got.len() == set.len() && set == wave2,
            "{what}: {} deliveries of {} records, {} of them not in wave 2, {} of wave 2 missing",
            got.len(),
            set.len(),
            set.difference(&wave2).count(),
            wave2.difference(&set).count()
        );
        Ok(())
    };

    let at = format!("at-timestamp={}", humantime::format_rfc3339_millis(t));
    env.ok(&[
        "reset", "--app", &app, "--stream", &stream, "--all", "--to", &at, "--yes",
    ])
    .await?;
    let lease = env
        .store(&app)
        .get(&kcl::lease::LeaseKey::for_shard(&shard))
        .await?;
    ensure!(
        lease
            .as_ref()
            .is_some_and(|l| l.checkpoint == ExtendedSequenceNumber::Latest
                && l.latest_resolved_at.is_some()
                && l.owner.is_none()),
        "reset to a time: LATEST resolved at it, released: {lease:?}"
    );
    exactly_wave2(
        &consume(env, &app, &stream, "c2", WAVE as usize).await?,
        "from T",
    )?;

    let seq = format!("seq={last_of_wave1}");
    let reset_shard = |to: &str| -> Vec<String> {
        [
            "reset",
            "--app",
            &app,
            "--stream",
            &stream,
            "--shard",
            shard.as_str(),
            "--to",
            to,
            "--yes",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    env.ok(&args(&reset_shard(&seq))).await?;
    exactly_wave2(
        &consume(env, &app, &stream, "c3", WAVE as usize).await?,
        "after N",
    )?;
    // A sequence number outside the shard is refused, naming the flag.
    env.refused(&args(&reset_shard("seq=1")), "--to seq=1")
        .await?;
    // `latest` skips everything up to the reset, whatever `latestResolvedAt` the lease held
    // from the earlier reset (it would resume at T again): only what is put after it comes.
    env.ok(&args(&reset_shard("latest"))).await?;
    env.kinesis
        .put(&stream, records(2 * WAVE, 3 * WAVE, KEYS))
        .await?;
    let wave3: BTreeSet<(u32, u32)> = (2 * WAVE..3 * WAVE).map(|i| (i % KEYS, i / KEYS)).collect();
    let latest = consume(env, &app, &stream, "c4", WAVE as usize).await?;
    let got: BTreeSet<(u32, u32)> = latest.iter().map(|d| (d.key, d.n)).collect();
    ensure!(
        latest.len() == WAVE as usize && got == wave3,
        "after a reset to latest: {} deliveries, {} of them not put after it",
        latest.len(),
        got.difference(&wave3).count()
    );

    // A dead owner (no worker item, a counter that does not move) is released.
    let store = env.store(&app);
    store.open_existing().await?;
    let lease = store
        .get(&kcl::lease::LeaseKey::for_shard(&shard))
        .await?
        .context("the lease")?;
    store.take(&lease, &WorkerId::new("ghost")).await?;
    let released = env
        .json(&[
            "release",
            "--app",
            &app,
            "--shard",
            shard.as_str(),
            "--json",
            "--lease-duration",
            "2s",
        ])
        .await?;
    ensure!(
        released["ownerState"] == "dead" && released["leaseOwner"] == "ghost",
        "the dead owner's lease released: {released}"
    );
    let lease = store.get(&kcl::lease::LeaseKey::for_shard(&shard)).await?;
    ensure!(
        lease.as_ref().is_some_and(|l| l.owner.is_none()),
        "still owned after kcl release: {lease:?}"
    );

    // kcl destroy with the fan-out consumer.
    let kinesis = kcl::retrieval::aws::AwsKinesis::new(env.kinesis.client.clone());
    kinesis
        .register_stream_consumer(&stream, "admin-efo")
        .await?;
    let destroyed = env
        .json(&[
            "destroy",
            "--app",
            &app,
            "--stream",
            &stream,
            "--fan-out",
            "admin-efo",
            "--yes",
            "--json",
            "--lease-duration",
            "1s",
        ])
        .await?;
    ensure!(
        destroyed["deleted"]["consumer"] == "admin-efo"
            && destroyed["deleted"]["leaseTable"] == app.as_str(),
        "the consumer and the tables deleted: {destroyed}"
    );
    let out = env.kcl(&["destroy", "--app", &app, "--yes"]).await?;
    ensure!(
        !out.status.success() && out.stderr.contains("nothing to delete"),
        "a second destroy finds nothing: {}",
        out.stderr
    );
    Ok(())
}

/// A shard split after its records were read: `kcl reset --shard <parent>` sends the children
/// (started) back to `TRIM_HORIZON`, and the next worker delivers every record again, the
/// parent's before its children's, in order per key; `kcl shards` shows the tree.
async fn reset_of_a_split_parent(env: &Env) -> anyhow::Result<()> {
    const WAVE: u32 = 48;
    let (stream, app) = env.stream("admin-split", 1, WAVE).await?;
    let parent = ShardId::new("shardId-000000000000");
    env.kinesis.split(&stream, &parent, 1u128 << 127).await?;
    env.kinesis
        .put(&stream, records(WAVE, 2 * WAVE, KEYS))
        .await?;
    let first = consume(env, &app, &stream, "s1", 2 * WAVE as usize).await?;
    ensure!(
        first.len() == 2 * WAVE as usize,
        "{} deliveries",
        first.len()
    );

    let tree = env
        .json(&["shards", "--stream", &stream, "--app", &app, "--json"])
        .await?;
    let states: Vec<(String, String, u64)> = tree
        .as_array()
        .context("an array")?
        .iter()
        .map(|n| {
            (
                n["shardId"].as_str().unwrap_or_default().to_owned(),
                n["state"].as_str().unwrap_or_default().to_owned(),
                n["depth"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    ensure!(
        states.len() == 3
            && states[0] == (parent.to_string(), "CLOSED".to_owned(), 0)
            && states[1..].iter().all(|(_, s, d)| s == "OPEN" && *d == 1),
        "the parent, closed, then its two children: {tree}"
    );

    let reset = env
        .json(&[
            "reset",
            "--app",
            &app,
            "--stream",
            &stream,
            "--shard",
            parent.as_str(),
            "--to",
            "trim-horizon",
            "--yes",
            "--json",
        ])
        .await?;
    let reasons: Vec<&str> = reset["steps"]
        .as_array()
        .context("steps")?
        .iter()
        .map(|s| s["reason"].as_str().unwrap_or_default())
        .collect();
    ensure!(
        reasons == ["requested", "descendant", "descendant"],
        "the parent, then both children: {reset}"
    );
    let again = consume(env, &app, &stream, "s2", 2 * WAVE as usize).await?;
    ensure!(
        again.len() == 2 * WAVE as usize,
        "{} deliveries after the reset, for {} records",
        again.len(),
        2 * WAVE
    );
    let shards = env.kinesis.kinesis().list_shards(&stream).await?;
    check_parents_first(&again, &shards)?;
    check_per_key_order(&again)?;
    Ok(())
}

/// `kcl consume` names the flag at fault, and checks the stream exists before it creates the
/// lease table.
async fn consume_flag_errors(env: &Env) -> anyhow::Result<()> {
    let app = unique_name("admin-consume-app");
    let missing = unique_name("no-such-stream");
    env.refused(
        &["consume", "--stream", &missing, "--app", &app],
        &format!("--stream {missing}: no such stream"),
    )
    .await?;
    let (leases, workers) = env.store(&app).open_existing().await?;
    ensure!(
        !leases && !workers,
        "a table was created for a missing stream"
    );
    let stream = unique_name("admin-consume");
    env.kinesis.create_stream(&stream, 1).await?;
    for (flag, value) in [
        ("--lease-duration", "50ms"),
        ("--renew-interval", "9s"),
        ("--max-records", "0"),
        ("--max-leases", "0"),
        ("--fan-out", "not a name"),
        ("--shutdown-timeout", "0s"),
    ] {
        env.refused(
            &["consume", "--stream", &stream, "--app", &app, flag, value],
            &format!("invalid {flag}"),
        )
        .await?;
    }
    Ok(())
}

/// `kcl consume` whose stdout nobody reads any more: a SIGTERM cannot finish the processor
/// blocked writing, which is abandoned after `--shutdown-timeout`, and the exit status says so.
async fn consume_abandons_a_stuck_processor(env: &Env) -> anyhow::Result<()> {
    let stream = unique_name("admin-stuck");
    let app = unique_name("admin-stuck-app");
    env.kinesis.create_stream(&stream, 1).await?;
    // ~2 KB lines: far more than a pipe holds.
    let big: Vec<(String, Vec<u8>)> = records(0, 200, KEYS)
        .into_iter()
        .map(|(k, mut v)| {
            v.resize(2000, b'.');
            (k, v)
        })
        .collect();
    env.kinesis.put(&stream, big).await?;
    let mut p = KclProcess::spawn(
        &env.bin,
        "consume-stuck",
        &env.cli,
        [
            "consume",
            "--stream",
            &stream,
            "--app",
            &app,
            "--shutdown-timeout",
            "1s",
        ],
    )?;
    p.stop_reading_after(10);
    p.wait_for_lines(10, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, took) = p.terminate(Duration::from_secs(20)).await?;
    eprintln!("stuck consume: SIGTERM → {status} in {took:.1?}");
    let stderr = p.stderr();
    ensure!(
        !status.success() && stderr.contains("abandoned"),
        "kcl consume exited with {status}; stderr:\n{}",
        p.stderr_tail(20)
    );
    Ok(())
}
