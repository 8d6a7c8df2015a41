//! Seed sweeps: which seeds to run ([`SeedPlan`]), running them on a few OS threads
//! ([`sweep`]), and what a sweep found ([`SweepSummary`]).
//!
//! A sweep is only as good as what it notices, so [`SweepSummary::problems`] fails it when a
//! seed's invariants broke, when a seed panicked (the driver or the checker itself), when a
//! seed ran differently twice (with `check`), or when fewer seeds ran than were planned; and
//! [`SweepSummary::missing_chaos`] names the kinds of chaos that never happened.

use std::collections::BTreeMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::report::{SimReport, CHAOS_KINDS};
use super::scenario::Sim;

/// The command that replays `seed` alone.
pub fn replay_command(seed: u64) -> String {
    format!(
        "KCL_SIM_SEED={seed} cargo test -p kcl --features testkit --test sim -- --nocapture sweep"
    )
}

/// Which seeds to run, from the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedPlan {
    /// First seed.
    pub start: u64,
    /// How many seeds.
    pub count: u64,
    /// Run each seed twice and compare log hashes.
    pub check: bool,
    /// True if `KCL_SIM_SEED` was given (a replay: print everything).
    pub replay: bool,
}

impl SeedPlan {
    /// `KCL_SIM_SEED` (first seed; alone: replay that seed), `KCL_SIM_SEEDS` (how many),
    /// `KCL_SIM_CHECK=1` (determinism check); `default_count` seeds from 0 otherwise.
    ///
    /// # Panics
    /// If a variable is set but is not a number.
    pub fn from_env(default_count: u64) -> Self {
        let num = |name: &str| {
            std::env::var(name).ok().map(|v| {
                v.trim()
                    .parse::<u64>()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
            })
        };
        let seed = num("KCL_SIM_SEED");
        let count = num("KCL_SIM_SEEDS");
        let check = std::env::var("KCL_SIM_CHECK").is_ok_and(|v| v != "0" && !v.is_empty());
        Self {
            start: seed.unwrap_or(0),
            count: count.unwrap_or(if seed.is_some() { 1 } else { default_count }),
            check,
            replay: seed.is_some() && count.is_none(),
        }
    }

    /// The seeds.
    pub fn seeds(&self) -> std::ops::Range<u64> {
        self.start..self.start.saturating_add(self.count)
    }
}

/// The outcome of a sweep.
#[derive(Debug, Default)]
pub struct SweepSummary {
    /// Seeds planned.
    pub planned: usize,
    /// Seeds run to the end (their reports counted).
    pub seeds: usize,
    /// Reports of the seeds that failed, by seed.
    pub failed: Vec<SimReport>,
    /// Seeds whose run panicked (the sim, not a worker), with the panic message.
    pub panicked: Vec<(u64, String)>,
    /// Sweep threads that died outside any seed.
    pub lost_threads: usize,
    /// Seeds whose two runs hashed differently (with `check`), with both hashes and the first
    /// differing log entries.
    pub nondeterministic: Vec<(u64, String)>,
    /// Sum of real time over seeds.
    pub real_time: Duration,
    /// Slowest seed (seed, real time).
    pub slowest: (u64, Duration),
    /// Real time of every seed, sorted by time.
    pub times: Vec<(Duration, u64)>,
    /// Sum of counts.
    pub deliveries: usize,
    /// Sum of duplicates.
    pub duplicates: usize,
    /// Sum of zombie calls.
    pub zombie_calls: usize,
    /// Seeds with zombie calls.
    pub zombie_seeds: Vec<u64>,
    /// How often each kind of chaos happened, summed over seeds ([`SimReport::chaos`]).
    pub chaos: BTreeMap<&'static str, usize>,
    /// Seeds that ran with enhanced fan-out.
    pub fan_out_seeds: usize,
}

impl SweepSummary {
    /// Everything that makes the sweep fail, one line each: broken invariants, panicked
    /// seeds, nondeterministic seeds, seeds that did not run.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .failed
            .iter()
            .map(|r| format!("seed {} failed: {}", r.seed, r.replay_command()))
            .collect();
        out.extend(
            self.panicked
                .iter()
                .map(|(seed, why)| format!("seed {seed} panicked: {why}")),
        );
        out.extend(
            self.nondeterministic
                .iter()
                .map(|(seed, _)| format!("seed {seed} ran differently twice")),
        );
        if self.lost_threads > 0 {
            out.push(format!("{} sweep threads died", self.lost_threads));
        }
        let accounted = self.seeds + self.panicked.len();
        if accounted < self.planned {
            out.push(format!(
                "only {accounted} of {} planned seeds ran",
                self.planned
            ));
        }
        out
    }

    /// The kinds of [`CHAOS_KINDS`] that never happened in the sweep.
    pub fn missing_chaos(&self) -> Vec<&'static str> {
        CHAOS_KINDS
            .iter()
            .copied()
            .filter(|k| self.chaos.get(k).copied().unwrap_or(0) == 0)
            .collect()
    }

    fn add(&mut self, report: SimReport, twin: Option<SimReport>) {
        let seed = report.seed;
        self.seeds += 1;
        self.real_time += report.real_time;
        self.times.push((report.real_time, seed));
        if report.real_time > self.slowest.1 {
            self.slowest = (seed, report.real_time);
        }
        self.deliveries += report.counts.deliveries;
        self.duplicates += report.counts.duplicates;
        if report.stats.zombie_calls > 0 {
            self.zombie_calls += report.stats.zombie_calls;
            self.zombie_seeds.push(seed);
        }
        for (k, n) in report.chaos() {
            *self.chaos.entry(k).or_default() += n;
        }
        self.fan_out_seeds += usize::from(report.fan_out);
        if let Some(twin) = twin {
            if let Some(why) = divergence(&report, &twin) {
                self.nondeterministic.push((seed, why));
            }
        }
        if !report.is_ok() {
            self.failed.push(report);
        }
    }
}

impl fmt::Display for SweepSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = if self.seeds == 0 {
            Duration::ZERO
        } else {
            self.real_time / u32::try_from(self.seeds).unwrap_or(u32::MAX)
        };
        let pct = |p: usize| {
            self.times
                .get((self.times.len() * p / 100).min(self.times.len().saturating_sub(1)))
                .map_or(0, |t| t.0.as_millis())
        };
        writeln!(
            f,
            "{} of {} seeds run, {} failed, {} panicked, {} nondeterministic; {} deliveries, {} duplicates; real time per seed: mean {} ms, p50 {} ms, p90 {} ms, max {} ms (seed {}); {} zombie calls in {} seeds",
            self.seeds,
            self.planned,
            self.failed.len(),
            self.panicked.len(),
            self.nondeterministic.len(),
            self.deliveries,
            self.duplicates,
            per.as_millis(),
            pct(50),
            pct(90),
            self.slowest.1.as_millis(),
            self.slowest.0,
            self.zombie_calls,
            self.zombie_seeds.len()
        )?;
        let chaos: Vec<String> = CHAOS_KINDS
            .iter()
            .map(|k| format!("{k} {}", self.chaos.get(k).copied().unwrap_or(0)))
            .collect();
        writeln!(
            f,
            "chaos ({} fan-out seeds): {}",
            self.fan_out_seeds,
            chaos.join(", ")
        )?;
        if !self.zombie_seeds.is_empty() {
            writeln!(
                f,
                "seeds with zombie calls (tasks of aborted workers still running): {:?}",
                &self.zombie_seeds[..self.zombie_seeds.len().min(20)]
            )?;
        }
        for r in &self.failed {
            write!(f, "{r}")?;
        }
        for (seed, why) in &self.panicked {
            writeln!(
                f,
                "seed {seed}: PANICKED: {why}\n  replay: {}",
                replay_command(*seed)
            )?;
        }
        for (seed, why) in &self.nondeterministic {
            writeln!(f, "seed {seed}: NONDETERMINISTIC: {why}")?;
        }
        Ok(())
    }
}

/// Locks the summary (a thread that panicked holding it left nothing half updated that
/// matters).
fn lock(m: &Mutex<SweepSummary>) -> std::sync::MutexGuard<'_, SweepSummary> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The message of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".to_owned())
}

/// Runs `make(seed).run()` for every seed on `threads` OS threads (each run is still one
/// single-threaded runtime); with `check`, runs each seed twice and compares. A seed whose
/// run panics is recorded, and the sweep goes on. A watchdog aborts the process, naming the
/// seed, if one run takes longer than `hang` of real time (a livelock freezes paused time, so
/// it cannot time out).
pub fn sweep(
    seeds: impl IntoIterator<Item = u64>,
    threads: usize,
    check: bool,
    hang: Duration,
    make: impl Fn(u64) -> Sim + Sync,
) -> SweepSummary {
    let seeds: Vec<u64> = seeds.into_iter().collect();
    let next = AtomicU64::new(0);
    let summary = Mutex::new(SweepSummary {
        planned: seeds.len(),
        ..SweepSummary::default()
    });
    let threads = threads.max(1).min(seeds.len().max(1));
    // Per thread: (seed, start in ms since the sweep began) of the run in progress.
    let began = std::time::Instant::now();
    let busy: Vec<Mutex<Option<(u64, u128)>>> = (0..threads).map(|_| Mutex::new(None)).collect();
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                let now = began.elapsed().as_millis();
                for b in &busy {
                    let cur = *b.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some((seed, since)) = cur {
                        if now - since > hang.as_millis() {
                            eprintln!(
                                "seed {seed} has run for more than {hang:?} of real time: a livelock (paused time cannot advance)?\n  replay: {}",
                                replay_command(seed)
                            );
                            std::process::abort();
                        }
                    }
                }
            }
        });
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (next, summary, seeds, busy, make) = (&next, &summary, &seeds, &busy, &make);
                scope.spawn(move || loop {
                    let k = next.fetch_add(1, Ordering::SeqCst) as usize;
                    let Some(&seed) = seeds.get(k) else {
                        return;
                    };
                    *busy[t].lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((seed, began.elapsed().as_millis()));
                    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        let sim = make(seed);
                        let report = sim.run();
                        let twin = check.then(|| sim.run());
                        (report, twin)
                    }));
                    *busy[t].lock().unwrap_or_else(|p| p.into_inner()) = None;
                    let mut s = lock(summary);
                    match outcome {
                        Ok((report, twin)) => s.add(report, twin),
                        Err(payload) => s.panicked.push((seed, panic_message(&*payload))),
                    }
                })
            })
            .collect();
        // A seed's panic is caught above: a thread that still dies lost the seeds it would
        // have run (counted by `problems` as seeds that did not run).
        let lost = workers
            .into_iter()
            .map(|w| w.join().is_err())
            .filter(|&died| died)
            .count();
        lock(&summary).lost_threads += lost;
        done.store(true, Ordering::SeqCst);
    });
    let mut s = summary.into_inner().unwrap_or_else(|p| p.into_inner());
    s.failed.sort_by_key(|r| r.seed);
    s.panicked.sort_by_key(|(seed, _)| *seed);
    s.times.sort_unstable();
    s.zombie_seeds.sort_unstable();
    s.nondeterministic.sort_by_key(|(seed, _)| *seed);
    s
}

/// Where two runs of one seed first differ, if they do.
pub fn divergence(a: &SimReport, b: &SimReport) -> Option<String> {
    if a.hash == b.hash && a.log.len() == b.log.len() {
        return None;
    }
    let at = a
        .log
        .iter()
        .zip(&b.log)
        .position(|(x, y)| x != y)
        .unwrap_or(a.log.len().min(b.log.len()));
    let show = |r: &SimReport| {
        r.log
            .get(at)
            .map_or_else(|| "<end of log>".to_owned(), |e| format!("{e:?}"))
    };
    Some(format!(
        "hashes {:016x} / {:016x}; first difference at entry {at}:\n    {}\n    {}",
        a.hash,
        b.hash,
        show(a),
        show(b)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_with_missing_failed_or_nondeterministic_seeds_has_problems() {
        let fine = SweepSummary {
            planned: 2,
            seeds: 2,
            ..SweepSummary::default()
        };
        assert!(fine.problems().is_empty());
        let short = SweepSummary {
            planned: 3,
            seeds: 2,
            ..SweepSummary::default()
        };
        assert_eq!(short.problems(), ["only 2 of 3 planned seeds ran"]);
        let twice = SweepSummary {
            planned: 2,
            seeds: 2,
            nondeterministic: vec![(7, "hashes differ".into())],
            ..SweepSummary::default()
        };
        assert_eq!(twice.problems(), ["seed 7 ran differently twice"]);
        let failed = SweepSummary {
            planned: 1,
            seeds: 1,
            failed: vec![SimReport {
                seed: 9,
                ..SimReport::default()
            }],
            ..SweepSummary::default()
        };
        assert_eq!(failed.problems().len(), 1);
        let lost = SweepSummary {
            planned: 1,
            seeds: 1,
            lost_threads: 1,
            ..SweepSummary::default()
        };
        assert_eq!(lost.problems().len(), 1);
    }

    #[test]
    fn missing_chaos_names_what_never_happened() {
        let mut s = SweepSummary::default();
        assert_eq!(s.missing_chaos(), CHAOS_KINDS);
        for k in CHAOS_KINDS {
            s.chaos.insert(k, 1);
        }
        s.chaos.insert("merges", 0);
        assert_eq!(s.missing_chaos(), ["merges"]);
    }

    #[test]
    fn runs_that_differ_are_told_apart() {
        use crate::testkit::sim::log::{Entry, Event};
        let entry = |what: &'static str| Entry {
            at: Duration::ZERO,
            event: Event::Phase(what),
        };
        let a = SimReport {
            hash: 1,
            log: vec![entry("chaos"), entry("settle")],
            ..SimReport::default()
        };
        let b = SimReport {
            hash: 2,
            log: vec![entry("chaos"), entry("balance")],
            ..SimReport::default()
        };
        assert_eq!(divergence(&a, &a.clone()), None);
        let why = divergence(&a, &b).unwrap_or_default();
        assert!(why.contains("entry 1"), "{why}");
    }
}
