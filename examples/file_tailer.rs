//! `file_tailer`: follows a growing log file — across rotation and truncation — and sends each
//! line to a Kinesis stream through [`kcl::producer`], remembering its position across
//! restarts in a small state file (what the Amazon Kinesis Agent does).
//!
//! ```text
//! cargo run -p kcl-examples --features aws --example file_tailer -- \
//!     --file /var/log/app.log --stream logs --state /var/lib/file_tailer/app.state \
//!     [--partition-key fixed|file|line-hash] [--key KEY] [--aggregate] \
//!     [--poll-interval MS] [--from-start] [--batch-lines N] [--batch-bytes N] \
//!     [--rejected FILE] [--stop-timeout SECS]
//! ```
//!
//! The endpoint, region and credentials come from the standard AWS variables and files
//! (`aws_config::load_defaults`: `AWS_REGION`, `AWS_PROFILE`, `AWS_ENDPOINT_URL_KINESIS`, …).
//! Logs go to stderr (`RUST_LOG`, default `info`). SIGINT or SIGTERM: it stops reading,
//! flushes what was read, writes the state and exits 0 (1 if Kinesis did not take everything
//! within `--stop-timeout`: the state then stays at the last acknowledged line); a second
//! signal exits at once (130) — the state file is never torn.
//!
//! # How it works
//!
//! The file is polled every `--poll-interval` (default 250 ms). Each round reads up to
//! `--batch-lines` lines / `--batch-bytes` bytes, puts every whole line (without its `\n`) into
//! the producer, then *checkpoints*: [`Producer::flush`] until Kinesis acknowledged every
//! record, and only then the state file is replaced with the offset just past the last line
//! (written atomically: temporary file, fsync, rename, fsync of the directory). A failed flush
//! is retried with backoff (1 s doubling to 30 s) for as long as it takes, without reading more
//! and without moving the state: the records stay buffered in the producer.
//!
//! * **Whole lines only.** A last line without its `\n` waits for it. A line is held in
//!   memory until its newline (at most 1 MiB of it; longer ones are refused, see below).
//! * **Rotation** (the path now names another file: device or inode changed, as after
//!   `mv app.log app.log.1; touch app.log`): the old file stays open and is read to its end;
//!   once a whole poll interval brought nothing more to it, the tailer switches to the new file
//!   from offset 0. While nothing is at the path (renamed, not yet re-created) the old file is
//!   read on. Lines written to the old file after the switch are not read.
//! * **Truncation** (copytruncate: same file, now shorter than what was read, or its first
//!   bytes changed — checked after every read, before its lines are sent, so that new content
//!   read at the old offset is never sent): reading starts again at offset 0. Lines written
//!   between the last read and the truncation are in the copy only and are not sent (inherent
//!   to copytruncate; prefer rename rotation).
//! * **State file** (`--state`): device, inode, offset, and a fingerprint of the file's first
//!   bytes (up to 1 KiB) that tells a file from a later one with the same inode, and a file from
//!   its truncated and rewritten self. On start:
//!   - the path is the saved file (same identity and fingerprint, not shorter than the
//!     offset): resume at the offset;
//!   - the same identity but shorter or with other first bytes: truncated while stopped,
//!     start at 0 (a warning says so);
//!   - the path is another file (rotated while stopped): the saved file is looked for in the
//!     path's directory by device and inode (`app.log.1` after logrotate's rename), checked
//!     against the fingerprint, read from the saved offset to its end, and then the path is
//!     read from 0. If it is not there (deleted, compressed, moved to another directory), a
//!     warning says that the lines written to it after the saved offset while the tailer was
//!     stopped were not sent, and the path is read from 0;
//!   - no state file: start at the end of the file (at the start of its last, unterminated
//!     line), or at its beginning with `--from-start`; a file that appears later is read from
//!     its beginning. A state file is written at once.
//!
//!   A malformed state file stops the tailer with an error (rather than resend or skip a
//!   file); delete it to start over.
//! * **Partition keys** (`--partition-key`): `fixed` (default) puts every line with one key
//!   (`--key`, default the file's name); `file` uses one key per file (`dev:inode`), so that
//!   files after rotations spread over the shards; `line-hash` uses a hash of each line.
//! * **Aggregation** (`--aggregate`): KPL aggregation (`ProducerBuilder::aggregation`), read
//!   back by any KPL-aware consumer (the Java KCL, `kcl::retrieval::deagg`). Recommended with
//!   `fixed` and `file`: the producer sends at most one Kinesis record per partition key per
//!   `PutRecords` call (that is how it keeps per-key order), so without aggregation one key
//!   gets one line per round trip.
//!
//! # Guarantees
//!
//! Every whole line reaches the stream **at least once**, and **in order per file** with
//! `fixed` and `file` keys (the producer stores a key's records in the order they were put,
//! across flushes; one file never changes key). With `line-hash`, lines of one file spread over
//! shards: order holds between checkpoint batches (a batch is acknowledged before the next is
//! read) but not within one. Duplicates happen only after a crash, or a stop whose final
//! flush failed (the lines between the last state written and the crash are sent again), or a
//! `PutRecords` answer lost in transit (the producer sends the call again). These hold for the
//! file being followed and its rotated predecessor as described above; the limits are listed
//! below. `integration-tests/tests/file_tailer.rs` checks them against kinesis-local, through
//! rotations, a copytruncate, SIGKILLs with Kinesis unreachable or its answers lost, and
//! SIGTERMs, with and without aggregation.
//!
//! # Refused lines
//!
//! A line Kinesis can never accept — longer than 1 MiB with its partition key (or an invalid
//! key) — is not sent, and is never dropped silently: it is logged at ERROR level with the
//! file's name and identity, its byte offset and length and the reason, and recorded with the
//! same fields in the rejects file (`--rejected`, default `STATE.rejected`; one tab-separated
//! line per refusal). The line itself stays in the log file at that offset. The same goes for
//! the unterminated last line of a file left for good (rotated away or truncated): it is never
//! sent, since only whole lines are. Everything else Kinesis refuses (throttling, an outage,
//! missing permissions, a deleted stream) is retried until it succeeds or the tailer is
//! stopped; the state never passes a line that was not acknowledged.
//!
//! # Limits
//!
//! * Follow-by-name: a file rotated twice between two looks (or twice while stopped) has its
//!   middle generation skipped, and on restart only the path's directory is searched for the
//!   saved file.
//! * copytruncate loses what was written between the last read and the truncation.
//! * One file per process; lines are sent as bytes (not checked to be UTF-8); `\r` is kept.

#[path = "file_tailer/follow.rs"]
mod follow;
#[path = "file_tailer/state.rs"]
mod state;

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use kcl::producer::aws::AwsPutRecords;
use kcl::producer::{Producer, ProducerError, UserRecord, MAX_PARTITION_KEY_CHARS};
use kcl::worker::signal::StopSignals;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use follow::{Change, FileId, Line, Resume, Tailed};
use state::Saved;

/// Follows a log file and sends its lines to a Kinesis stream, at least once and in order.
#[derive(Parser, Debug, Clone)]
#[command(name = "file_tailer")]
struct Args {
    /// The file to follow (by name: across rotation and truncation).
    #[arg(long, value_name = "PATH")]
    file: PathBuf,
    /// The Kinesis stream.
    #[arg(long, value_name = "STREAM")]
    stream: String,
    /// The state file (file identity and acknowledged offset).
    #[arg(long, value_name = "STATE_FILE")]
    state: PathBuf,
    /// How lines are keyed.
    #[arg(long, value_enum, default_value_t = KeyMode::Fixed)]
    partition_key: KeyMode,
    /// The key of `--partition-key fixed` (default: the file's name).
    #[arg(long)]
    key: Option<String>,
    /// Packs lines into KPL aggregates.
    #[arg(long)]
    aggregate: bool,
    /// How often to look for new lines, rotation and truncation.
    #[arg(long, value_name = "MS", default_value_t = 250)]
    poll_interval: u64,
    /// Without a state file, start at the beginning of the file (default: at its end).
    #[arg(long)]
    from_start: bool,
    /// The most lines read before a checkpoint (flush, then state file).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    batch_lines: usize,
    /// About the most bytes read before a checkpoint.
    #[arg(long, value_name = "N", default_value_t = 4 * 1024 * 1024)]
    batch_bytes: usize,
    /// Where refused lines are recorded (default: STATE_FILE.rejected).
    #[arg(long, value_name = "FILE")]
    rejected: Option<PathBuf>,
    /// How long the final flush may take on SIGINT / SIGTERM.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    stop_timeout: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum KeyMode {
    /// One key for every line (`--key`).
    Fixed,
    /// One key per file: `dev:inode`.
    File,
    /// A hash of the line: spreads lines over shards, no order within a batch.
    LineHash,
}

/// The partition key of a line of file `id`.
fn partition_key(mode: KeyMode, fixed: &str, id: FileId, data: &[u8]) -> String {
    match mode {
        KeyMode::Fixed => fixed.to_owned(),
        KeyMode::File => id.to_string(),
        KeyMode::LineHash => format!("{:016x}", follow::fnv1a(data)),
    }
}

/// The error of a wait that a stop signal ended.
#[derive(Debug)]
struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped by a signal")
    }
}

impl std::error::Error for Stopped {}

/// Where refused lines are recorded.
struct Rejects {
    path: PathBuf,
}

impl Rejects {
    fn record(&self, name: &Path, id: FileId, line: &Line, reason: &str) {
        use std::io::Write as _;
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let entry = format!(
            "{at}\t{}\t{id}\toffset={}\tbytes={}\t{reason}\n",
            name.display(),
            line.offset,
            line.len
        );
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(entry.as_bytes()));
        if let Err(e) = written {
            error!(rejects = %self.path.display(), error = %e, "could not record the refused line");
        }
    }
}

/// The tailer: one followed file, the producer, the state file.
struct Tailer {
    args: Args,
    fixed_key: String,
    producer: Producer<AwsPutRecords>,
    stop: watch::Receiver<bool>,
    rejects: Rejects,
    /// The file being read (`None`: waiting for the path to appear).
    current: Option<Tailed>,
    /// The state last written.
    saved: Option<Saved>,
    sent: u64,
    refused: u64,
}

impl Tailer {
    fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.args.poll_interval.max(1))
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps `d`; true if a stop signal came first (or had come).
    async fn pause(&mut self, d: Duration) -> bool {
        let stopped = tokio::select! {
            () = tokio::time::sleep(d) => false,
            _ = self.stop.wait_for(|s| *s) => true,
        };
        stopped || self.stopping()
    }

    /// Decides where to start, from the state file and what is at the path.
    fn start(&mut self) -> anyhow::Result<()> {
        let path = self.args.file.clone();
        let saved = Saved::load(&self.args.state)?;
        let at_path = open_if_present(&path)?;
        let Some(saved) = saved else {
            match at_path {
                Some(file) => {
                    let len = file.metadata()?.len();
                    let offset = if self.args.from_start {
                        0
                    } else {
                        follow::start_of_last_line(&file, len)?
                    };
                    info!(file = %path.display(), offset, len, "no state file: starting");
                    self.current = Some(Tailed::new(file, &path, offset)?);
                }
                None => info!(
                    file = %path.display(),
                    "no state file and no file yet: waiting for it, to read it from its start"
                ),
            }
            return self.write_state();
        };
        info!(
            name = %saved.name.display(), id = %saved.id, offset = saved.offset,
            "state file loaded"
        );
        if let Some(file) = at_path {
            let meta = file.metadata()?;
            if FileId::of(&meta) == saved.id {
                let offset =
                    match follow::resume(saved.offset, meta.len(), saved.head.matches(&file)?) {
                        Resume::At(offset) => {
                            info!(file = %path.display(), offset, "resuming");
                            offset
                        }
                        Resume::FromStart(why) => {
                            warn!(
                                file = %path.display(), saved_offset = saved.offset,
                                "reading the file again from its start: {why}"
                            );
                            0
                        }
                    };
                self.current = Some(Tailed::new(file, &path, offset)?);
                return self.write_state();
            }
        }
        // The path is another file, or nothing: the saved file was rotated while stopped.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        for candidate in follow::find_by_id(&dir, saved.id, &path)? {
            let Some(file) = open_if_present(&candidate)? else {
                continue;
            };
            let len = file.metadata()?.len();
            if follow::resume(saved.offset, len, saved.head.matches(&file)?)
                == Resume::At(saved.offset)
            {
                info!(
                    rotated_to = %candidate.display(), offset = saved.offset, len,
                    "the saved file was rotated while stopped: finishing it first"
                );
                let mut old = Tailed::new(file, &candidate, saved.offset)?;
                old.rotated = true;
                self.current = Some(old);
                return self.write_state();
            }
        }
        warn!(
            name = %saved.name.display(), id = %saved.id, offset = saved.offset,
            dir = %dir.display(),
            "the saved file is not at the path nor in its directory (deleted, compressed or \
             moved): lines written to it after the saved offset while stopped were not sent"
        );
        if !self.open_path()? {
            info!(file = %path.display(), "waiting for the file to appear");
        }
        Ok(())
    }

    /// Starts following the path from offset 0 (a new file). False if there is nothing there.
    fn open_path(&mut self) -> anyhow::Result<bool> {
        let path = self.args.file.clone();
        let Some(file) = open_if_present(&path)? else {
            return Ok(false);
        };
        let t = Tailed::new(file, &path, 0)?;
        info!(file = %path.display(), id = %t.id, "following a new file from its start");
        self.current = Some(t);
        self.write_state()?;
        Ok(true)
    }

    /// Writes the state file for the current file, at the offset past the last line handed
    /// over: call only once the producer acknowledged every record put.
    fn write_state(&mut self) -> anyhow::Result<()> {
        let Some(cur) = &self.current else {
            return Ok(());
        };
        let offset = cur.done;
        let saved = Saved {
            name: cur.name.clone(),
            id: cur.id,
            offset,
            head: cur.fingerprint(offset),
        };
        if self.saved.as_ref() == Some(&saved) {
            return Ok(());
        }
        saved
            .store(&self.args.state)
            .with_context(|| format!("writing the state file {}", self.args.state.display()))?;
        debug!(file = %saved.name.display(), offset, "state written");
        self.saved = Some(saved);
        Ok(())
    }

    /// Flushes until Kinesis acknowledged every record put, retrying with backoff.
    ///
    /// # Errors
    /// [`Stopped`] when a stop signal came first (the records stay buffered).
    async fn flush_until_ok(&mut self) -> anyhow::Result<()> {
        let mut delay = Duration::from_secs(1);
        loop {
            let flushed = tokio::select! {
                r = self.producer.flush() => r,
                _ = self.stop.wait_for(|s| *s) => return Err(Stopped.into()),
            };
            match flushed {
                Ok(()) => return Ok(()),
                Err(e) => {
                    error!(
                        error = %e, buffered = self.producer.buffered(), retry_in = ?delay,
                        "Kinesis did not take the records: they stay buffered and the state \
                         file stays at the last acknowledged line"
                    );
                    if self.pause(delay).await {
                        return Err(Stopped.into());
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Flush, then the state file.
    async fn checkpoint(&mut self) -> anyhow::Result<()> {
        self.flush_until_ok().await?;
        if let Err(e) = self.write_state() {
            // At least once still holds: a restart resends from the older state.
            error!(error = %format!("{e:#}"), "could not write the state file; retrying at the next checkpoint");
        }
        Ok(())
    }

    /// Reports a line that is not sent, ever.
    fn refuse(&mut self, name: &Path, id: FileId, line: &Line, reason: &str) {
        self.refused += 1;
        error!(
            file = %name.display(), id = %id, offset = line.offset, bytes = line.len,
            rejects = %self.rejects.path.display(),
            "line not sent: {reason}"
        );
        self.rejects.record(name, id, line, reason);
    }

    /// Puts one line into the producer (or refuses it for good).
    async fn send(&mut self, name: &Path, id: FileId, line: Line) -> anyhow::Result<()> {
        if line.is_cut() {
            self.refuse(
                name,
                id,
                &line,
                "longer than a Kinesis record may be (1 MiB with its partition key)",
            );
            return Ok(());
        }
        let key = partition_key(self.args.partition_key, &self.fixed_key, id, &line.data);
        let mut record = UserRecord::new(key, line.data.clone());
        loop {
            match self.producer.put_record(record).await {
                Ok(()) => {
                    self.sent += 1;
                    return Ok(());
                }
                Err(ProducerError::InvalidRecord(r)) => {
                    let reason = format!("Kinesis would refuse it: {r}");
                    self.refuse(name, id, &line, &reason);
                    return Ok(());
                }
                Err(ProducerError::BufferFull(r)) => {
                    record = r.into_record();
                    self.flush_until_ok().await?;
                }
                Err(e) => return Err(e).context("putting a line"),
            }
        }
    }

    /// Reports the unterminated last line of a file left for good.
    fn drop_unterminated(&mut self, why: &str) {
        let Some(cur) = self.current.as_mut() else {
            return;
        };
        let (name, id) = (cur.name.clone(), cur.id);
        if let Some(tail) = cur.lines.take_unterminated() {
            if cur.done == tail.offset {
                cur.done = tail.offset + tail.len;
            }
            let reason =
                format!("unterminated last line of a file {why}; only whole lines are sent");
            self.refuse(&name, id, &tail, &reason);
        }
    }

    /// The current file was truncated: report its unterminated line, read it again from 0.
    async fn truncated(&mut self) -> anyhow::Result<()> {
        let Some(cur) = self.current.as_ref() else {
            return Ok(());
        };
        warn!(
            file = %cur.name.display(), read = cur.lines.read_pos(), len = cur.len()?,
            "the file was truncated (copytruncate?): reading it again from its start"
        );
        self.drop_unterminated("truncated");
        if let Some(cur) = self.current.as_mut() {
            cur.restart();
        }
        // Acknowledges the lines of the old content, then saves offset 0.
        self.checkpoint().await
    }

    /// Follows the file until a stop signal.
    async fn run(&mut self) -> anyhow::Result<()> {
        let path = self.args.file.clone();
        let mut lines = Vec::new();
        let mut missing_logged = false;
        loop {
            if self.stopping() {
                return Ok(());
            }
            let Some(cur) = self.current.as_mut() else {
                if !self.open_path()? && self.pause(self.poll_interval()).await {
                    return Ok(());
                }
                continue;
            };
            let (read, eof) = cur
                .read(self.args.batch_lines, self.args.batch_bytes, &mut lines)
                .with_context(|| format!("reading {}", cur.name.display()))?;
            let (name, id) = (cur.name.clone(), cur.id);
            if read > 0 && !cur.rotated && !cur.head_unchanged()? {
                // Truncated and rewritten before or while reading: what was just read may be
                // the new content at the old offset. Drop it and start again from 0.
                lines.clear();
                self.truncated().await?;
                continue;
            }
            if !lines.is_empty() {
                for line in std::mem::take(&mut lines) {
                    let end = line.end();
                    self.send(&name, id, line).await?;
                    if let Some(cur) = self.current.as_mut() {
                        cur.done = end;
                    }
                }
                self.checkpoint().await?;
            }
            if !eof {
                continue;
            }
            let cur = self.current.as_mut().expect("set above");
            let at_path = match std::fs::metadata(&path) {
                Ok(meta) => Some(FileId::of(&meta)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
            };
            let change = follow::classify(
                cur.id,
                cur.lines.read_pos(),
                cur.len()?,
                cur.head_unchanged()?,
                at_path,
            );
            if change != Change::PathMissing {
                missing_logged = false;
            }
            match change {
                Change::Same => {}
                Change::PathMissing => {
                    if !missing_logged {
                        info!(file = %path.display(), "nothing at the path: reading on the open file until a new one appears");
                        missing_logged = true;
                    }
                }
                Change::Truncated => {
                    self.truncated().await?;
                    continue;
                }
                Change::Rotated if !cur.rotated => {
                    info!(
                        file = %cur.name.display(), id = %cur.id,
                        "the file was rotated: reading it to its end before following the new one"
                    );
                    cur.rotated = true;
                }
                Change::Rotated if read > 0 => {} // still being written: another round
                Change::Rotated => {
                    self.drop_unterminated("rotated away");
                    self.checkpoint().await?;
                    let cur = self.current.take().expect("set above");
                    debug_assert_eq!(cur.done, cur.lines.start(), "every line read handed over");
                    info!(file = %cur.name.display(), id = %cur.id, offset = cur.done, "finished the rotated file");
                    continue;
                }
            }
            if self.pause(self.poll_interval()).await {
                return Ok(());
            }
        }
    }

    /// The graceful stop: flush what was read, then the state. True if both succeeded.
    async fn shutdown(&mut self) -> bool {
        let pending = self.producer.buffered();
        info!(pending, "stopping: flushing what was read");
        let limit = Duration::from_secs(self.args.stop_timeout);
        let ok = match tokio::time::timeout(limit, self.producer.flush()).await {
            Ok(Ok(())) => match self.write_state() {
                Ok(()) => true,
                Err(e) => {
                    error!(error = %format!("{e:#}"), "could not write the state file");
                    false
                }
            },
            Ok(Err(e)) => {
                error!(error = %e, "the last records were not acknowledged: the state stays at the last acknowledged line; they are sent again on the next start");
                false
            }
            Err(_) => {
                error!(timeout = ?limit, "the final flush did not finish in time: the state stays at the last acknowledged line");
                false
            }
        };
        let (name, offset) = self
            .saved
            .as_ref()
            .map(|s| (s.name.display().to_string(), s.offset))
            .unwrap_or_default();
        info!(
            sent = self.sent, refused = self.refused, state_file = %name, state_offset = offset,
            "stopped"
        );
        ok
    }
}

fn open_if_present(path: &Path) -> anyhow::Result<Option<std::fs::File>> {
    match std::fs::File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("opening {}", path.display())),
    }
}

/// Installs the signal handlers: the first SIGINT/SIGTERM sets the stop flag, a second one
/// exits at once.
fn stop_on_signals() -> anyhow::Result<watch::Receiver<bool>> {
    let mut signals = StopSignals::install().context("installing the signal handlers")?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let first = signals.recv().await;
        info!(signal = %first, "stopping gracefully (again to exit at once)");
        let _ = tx.send(true);
        let second = signals.recv().await;
        warn!(signal = %second, "second signal: exiting without flushing");
        std::process::exit(130);
    });
    Ok(rx)
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let stop = stop_on_signals()?;
    let fixed_key = match &args.key {
        Some(k) => k.clone(),
        None => args
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file_tailer".into()),
    };
    let key_len = fixed_key.chars().count();
    if args.partition_key == KeyMode::Fixed && !(1..=MAX_PARTITION_KEY_CHARS).contains(&key_len) {
        bail!("--key must have 1 to {MAX_PARTITION_KEY_CHARS} characters");
    }
    if args.batch_lines == 0 || args.batch_bytes == 0 {
        bail!("--batch-lines and --batch-bytes must be positive");
    }
    let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let producer = Producer::builder(AwsPutRecords::from_conf(&conf), args.stream.clone())
        .aggregation(args.aggregate)
        .build()?;
    let rejects = Rejects {
        path: args.rejected.clone().unwrap_or_else(|| {
            let mut p = args.state.as_os_str().to_owned();
            p.push(".rejected");
            PathBuf::from(p)
        }),
    };
    let mut tailer = Tailer {
        args,
        fixed_key,
        producer,
        stop,
        rejects,
        current: None,
        saved: None,
        sent: 0,
        refused: 0,
    };
    tailer.start()?;
    let ran = tailer.run().await;
    let clean = tailer.shutdown().await;
    match ran {
        Ok(()) => Ok(clean),
        Err(e) if e.is::<Stopped>() => Ok(clean),
        Err(e) => Err(e),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_keys() {
        let id = FileId { dev: 8, ino: 42 };
        assert_eq!(partition_key(KeyMode::Fixed, "app", id, b"x"), "app");
        assert_eq!(partition_key(KeyMode::File, "app", id, b"x"), "8:42");
        let h = partition_key(KeyMode::LineHash, "app", id, b"x");
        assert_eq!(h.len(), 16);
        assert_eq!(h, partition_key(KeyMode::LineHash, "other", id, b"x"));
        assert_ne!(h, partition_key(KeyMode::LineHash, "app", id, b"y"));
    }

    #[test]
    fn parses_the_command_line() {
        let a = Args::try_parse_from([
            "file_tailer",
            "--file",
            "/var/log/a.log",
            "--stream",
            "s",
            "--state",
            "st",
            "--partition-key",
            "line-hash",
            "--aggregate",
            "--poll-interval",
            "50",
        ])
        .expect("parses");
        assert_eq!(a.partition_key, KeyMode::LineHash);
        assert!(a.aggregate && !a.from_start);
        assert_eq!(a.poll_interval, 50);
        assert!(Args::try_parse_from(["file_tailer", "--file", "f"]).is_err());
    }
}
