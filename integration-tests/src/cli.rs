//! The `kcl` command-line tool as a child process, for the CLI tests: finding (building) the
//! binary, pointing it at the local servers through the standard AWS environment variables,
//! collecting its stdout line by line (its stderr goes to a log file), and always killing it.
//!
//! `env!("CARGO_BIN_EXE_kcl")` only exists inside the `kcl` package, so [`kcl_binary`] asks
//! cargo for the binary: `cargo build --workspace --all-features --bin kcl`. That is the
//! feature set `scripts/test.sh` builds with (`cargo build --workspace --all-features
//! --all-targets`), so after the script's build it only checks freshness; it never builds
//! another package's tests. Set `KCL_BIN` to use a prebuilt binary instead.

use std::ffi::OsStr;
use std::io::Read as _;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use base64::Engine as _;
use kcl::SequenceNumber;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The workspace root (the parent of this package).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where the CLI processes' stderr logs go: `target/emulator-logs/`, next to the servers'.
fn log_dir() -> PathBuf {
    workspace_root().join("target").join("emulator-logs")
}

/// The path of the `kcl` binary, built if needed (once per test process): `KCL_BIN` if set,
/// else what `cargo build --workspace --all-features --bin kcl` reports as the executable.
///
/// # Errors
/// The build failed (with cargo's diagnostics), or `KCL_BIN` names no file.
pub async fn kcl_binary() -> anyhow::Result<PathBuf> {
    tokio::task::spawn_blocking(kcl_binary_blocking)
        .await
        .context("the kcl build task panicked")?
}

/// [`kcl_binary`] for synchronous callers (blocks while cargo runs).
///
/// # Errors
/// As [`kcl_binary`].
pub fn kcl_binary_blocking() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate_or_build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The executable of the example `name` of `kcl-examples` (all features), built once per
/// test process.
///
/// # Errors
/// The build failed.
pub async fn example_binary(name: &'static str) -> anyhow::Result<PathBuf> {
    tokio::task::spawn_blocking(move || example_binary_blocking(name))
        .await
        .context("the example build task panicked")?
}

/// As [`example_binary`], blocking.
///
/// # Errors
/// The build failed.
pub fn example_binary_blocking(name: &'static str) -> anyhow::Result<PathBuf> {
    type Built = Mutex<std::collections::HashMap<&'static str, Result<PathBuf, String>>>;
    static BUILT: OnceLock<Built> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    built
        .entry(name)
        .or_insert_with(|| {
            cargo_build(
                &["--workspace", "--all-features", "--example", name],
                name,
                "example",
            )
            .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

fn locate_or_build() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("KCL_BIN") {
        let bin = PathBuf::from(bin);
        ensure!(bin.is_file(), "KCL_BIN={} is not a file", bin.display());
        return Ok(bin);
    }
    cargo_build(
        &["--workspace", "--all-features", "--bin", "kcl"],
        "kcl",
        "bin",
    )
}

/// Runs `cargo build ARGS` in the workspace and returns the executable of target `name` of
/// kind `kind` (`bin`, `example`).
fn cargo_build(args: &[&str], name: &str, kind: &str) -> anyhow::Result<PathBuf> {
    // Cargo sets CARGO for the test processes it runs; fall back to the one that compiled us.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let started = std::time::Instant::now();
    let out = std::process::Command::new(&cargo)
        .current_dir(workspace_root())
        .arg("build")
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "`cargo build {}` failed ({}):\n{}",
        args.join(" "),
        out.status,
        tail(&stderr, 60)
    );
    let mut exe = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let wanted = msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == name
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == kind));
        if let (true, Some(path)) = (wanted, msg["executable"].as_str()) {
            exe = Some(PathBuf::from(path));
        }
    }
    let exe = exe.with_context(|| {
        format!(
            "`cargo build {}` built no `{name}` executable",
            args.join(" ")
        )
    })?;
    eprintln!(
        "{name} {kind}: {} (cargo build took {:.1?})",
        exe.display(),
        started.elapsed()
    );
    Ok(exe)
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The environment of a `kcl` process: the standard AWS variables pointing at the local
/// servers, with dummy credentials, and nothing inherited that could point elsewhere.
#[derive(Clone, Debug)]
pub struct CliEnv {
    /// `AWS_ENDPOINT_URL_KINESIS`.
    pub kinesis_endpoint: String,
    /// `AWS_ENDPOINT_URL_DYNAMODB`.
    pub dynamodb_endpoint: String,
    /// `AWS_REGION`.
    pub region: String,
    /// `RUST_LOG` (default `info`, or `KCL_CLI_LOG` from the test's environment).
    pub rust_log: String,
    /// `AWS_ENDPOINT_URL_S3`, if set.
    pub s3_endpoint: Option<String>,
}

impl CliEnv {
    /// Kinesis at `kinesis_endpoint`, DynamoDB at `dynamodb_endpoint`, region `us-east-1`.
    pub fn new(kinesis_endpoint: impl Into<String>, dynamodb_endpoint: impl Into<String>) -> Self {
        Self {
            kinesis_endpoint: kinesis_endpoint.into(),
            dynamodb_endpoint: dynamodb_endpoint.into(),
            region: "us-east-1".into(),
            rust_log: std::env::var("KCL_CLI_LOG").unwrap_or_else(|_| "info".into()),
            s3_endpoint: None,
        }
    }

    /// Also S3 at `endpoint`.
    pub fn with_s3(mut self, endpoint: impl Into<String>) -> Self {
        self.s3_endpoint = Some(endpoint.into());
        self
    }

    fn apply(&self, cmd: &mut Command) {
        for var in [
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "AWS_SESSION_TOKEN",
            "AWS_ROLE_ARN",
            "AWS_ROLE_SESSION_NAME",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
            "AWS_USE_FIPS_ENDPOINT",
            "AWS_USE_DUALSTACK_ENDPOINT",
            // anyhow would print a backtrace after every error message.
            "RUST_BACKTRACE",
            "RUST_LIB_BACKTRACE",
        ] {
            cmd.env_remove(var);
        }
        // An empty config and credentials file: no profile of the machine applies.
        let empty = log_dir().join("empty-aws-config");
        if !empty.exists() {
            std::fs::create_dir_all(log_dir()).ok();
            let _ = std::fs::write(&empty, b"");
        }
        cmd.env("AWS_ENDPOINT_URL_KINESIS", &self.kinesis_endpoint)
            .env("AWS_ENDPOINT_URL_DYNAMODB", &self.dynamodb_endpoint)
            .env("AWS_REGION", &self.region)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_CONFIG_FILE", &empty)
            .env("AWS_SHARED_CREDENTIALS_FILE", &empty)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", &self.rust_log)
            .env("NO_COLOR", "1");
        match &self.s3_endpoint {
            Some(s3) => cmd.env("AWS_ENDPOINT_URL_S3", s3),
            None => cmd.env_remove("AWS_ENDPOINT_URL_S3"),
        };
    }
}

/// One line of a process's stdout, with when the test read it.
#[derive(Clone, Debug)]
pub struct Line {
    /// The text, without the newline (lossily decoded if it was not UTF-8).
    pub text: String,
    /// Whether the bytes were valid UTF-8.
    pub utf8: bool,
    /// When the reader got it (orders lines of different processes, roughly).
    pub at: Instant,
}

#[derive(Debug, Default)]
struct Captured {
    lines: Vec<Line>,
    /// Bytes after the last newline (a line cut short by SIGKILL, once at EOF).
    partial: Vec<u8>,
    eof: bool,
    read_error: Option<String>,
}

/// Appends a chunk of stdout: complete lines to `lines`, the rest to `partial`.
fn feed(c: &mut Captured, mut chunk: &[u8]) {
    while let Some(i) = chunk.iter().position(|&b| b == b'\n') {
        let mut line = std::mem::take(&mut c.partial);
        line.extend_from_slice(&chunk[..i]);
        push_line(c, &line);
        chunk = &chunk[i + 1..];
    }
    c.partial.extend_from_slice(chunk);
}

fn push_line(c: &mut Captured, bytes: &[u8]) {
    let (text, utf8) = match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_owned(), true),
        Err(_) => (String::from_utf8_lossy(bytes).into_owned(), false),
    };
    c.lines.push(Line {
        text,
        utf8,
        at: Instant::now(),
    });
}

/// A running `kcl` process. Dropping it kills the process (SIGKILL), so a failing test
/// never leaves one behind.
#[derive(Debug)]
pub struct KclProcess {
    label: String,
    child: Child,
    pid: u32,
    out: Arc<Mutex<Captured>>,
    /// Reads stdout into `out`; hands the pipe back when `close` fires (`None` at EOF).
    reader: Option<JoinHandle<Option<ChildStdout>>>,
    /// Asks `reader` to stop and hand the pipe back ([`KclProcess::close_stdout`]).
    close: Option<oneshot::Sender<()>>,
    /// `reader` stops reading (and hands the pipe back) once it has this many lines.
    read_limit: Arc<AtomicUsize>,
    stderr_log: PathBuf,
    exit: Option<ExitStatus>,
}

impl KclProcess {
    /// Starts `bin args…` with `env`; `label` names it in messages and in its stderr log
    /// (`target/emulator-logs/kcl-<label>-<test pid>-<n>.log`).
    ///
    /// # Errors
    /// The process could not be started.
    pub fn spawn<I, S>(bin: &Path, label: &str, env: &CliEnv, args: I) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_with_stdout(bin, label, env, args, None)
    }

    /// As [`KclProcess::spawn`], but with stdout going to `stdout` (e.g. `/dev/full`, where
    /// every write fails with ENOSPC) instead of a pipe the test reads: no lines are collected.
    ///
    /// # Errors
    /// The process could not be started.
    pub fn spawn_writing_to<I, S>(
        bin: &Path,
        label: &str,
        env: &CliEnv,
        args: I,
        stdout: std::fs::File,
    ) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_with_stdout(bin, label, env, args, Some(stdout))
    }

    fn spawn_with_stdout<I, S>(
        bin: &Path,
        label: &str,
        env: &CliEnv,
        args: I,
        stdout: Option<std::fs::File>,
    ) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        std::fs::create_dir_all(log_dir()).ok();
        let stderr_log = log_dir().join(format!(
            "{}.log",
            crate::unique_name(&format!("kcl-{label}"))
        ));
        let log = std::fs::File::create(&stderr_log)
            .with_context(|| format!("creating {}", stderr_log.display()))?;
        let piped = stdout.is_none();
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(stdout.map_or_else(Stdio::piped, Stdio::from))
            .stderr(log)
            .kill_on_drop(true);
        env.apply(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} ({label})", bin.display()))?;
        let pid = child.id().context("the new process has no pid")?;
        let out = Arc::new(Mutex::new(Captured::default()));
        let read_limit = Arc::new(AtomicUsize::new(usize::MAX));
        let (reader, close) = if piped {
            let stdout = child.stdout.take().context("stdout not piped")?;
            let (close_tx, close_rx) = oneshot::channel();
            let reader = tokio::spawn(read_stdout(
                stdout,
                out.clone(),
                close_rx,
                read_limit.clone(),
            ));
            (Some(reader), Some(close_tx))
        } else {
            (None, None)
        };
        Ok(Self {
            label: label.to_owned(),
            child,
            pid,
            out,
            reader,
            close,
            read_limit,
            stderr_log,
            exit: None,
        })
    }

    /// Stops reading stdout once `n` lines were read (as a slow reader would): the process
    /// then blocks writing once the pipe is full. [`KclProcess::close_stdout`] reads the rest.
    pub fn stop_reading_after(&self, n: usize) {
        self.read_limit.store(n, Ordering::Relaxed);
    }

    /// Closes the test's end of the stdout pipe, as a reader that stops reading does (`head
    /// -n`), after reading exactly what the process wrote so far: stops the process (SIGSTOP),
    /// reads what is left in the pipe, closes the pipe and lets the process go on (SIGCONT).
    /// Its next write to stdout fails with EPIPE. Afterwards [`KclProcess::lines`] and
    /// [`KclProcess::partial_line`] hold every byte the process wrote before the close.
    /// Returns the number of complete lines.
    ///
    /// # Errors
    /// Stdout is not a pipe, was closed already or reached its end, or the process could not
    /// be stopped or continued.
    pub async fn close_stdout(&mut self) -> anyhow::Result<usize> {
        let close = self
            .close
            .take()
            .context("stdout is not a pipe the test reads, or was closed already")?;
        self.signal("STOP")?;
        let drained = self.drain_and_close(close).await;
        let resumed = self.signal("CONT");
        let lines = drained?;
        resumed?;
        Ok(lines)
    }

    async fn drain_and_close(&mut self, close: oneshot::Sender<()>) -> anyhow::Result<usize> {
        wait_stopped(self.pid, Duration::from_secs(10)).await?;
        // The reader hands the pipe back between two reads (or has, at its read limit):
        // nothing read is lost.
        let _ = close.send(());
        let reader = self.reader.take().context("no stdout reader")?;
        let stdout = reader
            .await
            .context("the stdout reader panicked")?
            .with_context(|| format!("kcl {} closed stdout before the test did", self.label))?;
        // The process is stopped: what the pipe holds now is all it wrote. Read it without
        // blocking (std sets O_NONBLOCK with ioctl(FIONBIO), which works on any descriptor).
        let fd = stdout.into_owned_fd().context("taking the stdout pipe")?;
        let fd = std::os::unix::net::UnixStream::from(fd);
        fd.set_nonblocking(true)
            .context("making the stdout pipe non-blocking")?;
        let mut pipe = std::fs::File::from(OwnedFd::from(fd));
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => feed(&mut lock(&self.out), &buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("draining the stdout pipe"),
            }
        }
        drop(pipe);
        let mut c = lock(&self.out);
        c.eof = true;
        Ok(c.lines.len())
    }

    /// The label given at spawn.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The stdout lines read so far.
    pub fn lines(&self) -> Vec<Line> {
        lock(&self.out).lines.clone()
    }

    /// The stdout lines read so far, text only.
    pub fn texts(&self) -> Vec<String> {
        lock(&self.out)
            .lines
            .iter()
            .map(|l| l.text.clone())
            .collect()
    }

    /// How many stdout lines were read so far.
    pub fn line_count(&self) -> usize {
        lock(&self.out).lines.len()
    }

    /// Bytes written after the last newline (only meaningful once the process has exited).
    pub fn partial_line(&self) -> Vec<u8> {
        lock(&self.out).partial.clone()
    }

    /// The last `n` lines of the process's stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
        tail(&text, n)
    }

    /// All of the process's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Where its stderr goes.
    pub fn stderr_log(&self) -> &Path {
        &self.stderr_log
    }

    /// Waits until `pred(lines so far)` holds; fails after `timeout`, or once stdout closed
    /// (the process exited) without it holding. `what` describes the wait in errors.
    ///
    /// # Errors
    /// Timeout or early exit, with the line count and the stderr tail.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&[Line]) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let (done, eof, count) = {
                let c = lock(&self.out);
                (pred(&c.lines), c.eof, c.lines.len())
            };
            if done {
                return Ok(());
            }
            if eof {
                bail!(
                    "kcl {} closed stdout (exited?) after {count} lines, before {what}; stderr:\n{}",
                    self.label,
                    self.stderr_tail(30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "kcl {}: no {what} after {timeout:?} ({count} lines); stderr:\n{}",
                    self.label,
                    self.stderr_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until `pred(stderr so far)` holds; fails after `timeout`, or once the process
    /// exited without it holding. `what` describes the wait in errors.
    ///
    /// # Errors
    /// Timeout or exit, with the stderr tail.
    pub async fn wait_for_stderr(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.stderr()) {
                return Ok(());
            }
            if let Some(status) = self.try_exit()? {
                // It may have written the awaited text just before exiting.
                ensure!(
                    pred(&self.stderr()),
                    "kcl {} exited ({status}) before {what}; stderr:\n{}",
                    self.label,
                    self.stderr_tail(30)
                );
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "kcl {}: no {what} after {timeout:?}; stderr:\n{}",
                self.label,
                self.stderr_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until at least `n` lines were printed.
    ///
    /// # Errors
    /// As [`KclProcess::wait_until`].
    pub async fn wait_for_lines(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until(&format!("{n} lines"), timeout, |l| l.len() >= n)
            .await
    }

    /// Whether the process has exited (without waiting).
    ///
    /// # Errors
    /// The status could not be read.
    pub fn try_exit(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait()?;
        }
        Ok(self.exit)
    }

    /// Sends a signal (`"TERM"`, `"INT"`, `"KILL"`, …) with `kill -s`.
    ///
    /// # Errors
    /// `kill` failed (e.g. the process is gone).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .args(["-s", signal, &self.pid.to_string()])
            .status()
            .context("running kill")?;
        ensure!(status.success(), "kill -s {signal} {} failed", self.pid);
        Ok(())
    }

    /// Waits for the process to exit and its stdout to be read to the end.
    ///
    /// # Errors
    /// It did not exit within `timeout` (it is then killed).
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let status = match self.exit {
            Some(s) => s,
            None => match tokio::time::timeout(timeout, self.child.wait()).await {
                Ok(s) => s?,
                Err(_) => {
                    let _ = self.child.start_kill();
                    bail!(
                        "kcl {} did not exit within {timeout:?} (killed it); stderr:\n{}",
                        self.label,
                        self.stderr_tail(30)
                    );
                }
            },
        };
        self.exit = Some(status);
        if let Some(reader) = self.reader.take() {
            // Another process holding the pipe (none here) could keep it open: bounded wait.
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        Ok(status)
    }

    /// SIGTERM, then waits up to `timeout` for the exit. Returns the status and how long
    /// the exit took.
    ///
    /// # Errors
    /// As [`KclProcess::signal`] and [`KclProcess::wait_exit`].
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<(ExitStatus, Duration)> {
        let started = Instant::now();
        self.signal("TERM")?;
        let status = self.wait_exit(timeout).await?;
        Ok((status, started.elapsed()))
    }

    /// SIGKILL, then waits for the exit.
    ///
    /// # Errors
    /// The process could not be killed.
    pub async fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if self.try_exit()?.is_none() {
            self.child.start_kill().context("SIGKILL")?;
        }
        self.wait_exit(Duration::from_secs(10)).await
    }
}

impl Drop for KclProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.start_kill();
            // Reap it promptly so no zombie outlives the test.
            for _ in 0..50 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads `stdout` into `sink` until EOF (then returns `None`), or until `close` fires or
/// `limit` lines were read (then returns the pipe, unread bytes still in it).
async fn read_stdout(
    mut stdout: ChildStdout,
    sink: Arc<Mutex<Captured>>,
    mut close: oneshot::Receiver<()>,
    limit: Arc<AtomicUsize>,
) -> Option<ChildStdout> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if lock(&sink).lines.len() >= limit.load(Ordering::Relaxed) {
            return Some(stdout);
        }
        let read = tokio::select! {
            biased;
            Ok(()) = &mut close => return Some(stdout),
            read = stdout.read(&mut buf) => read,
        };
        match read {
            Ok(0) => break,
            Ok(n) => feed(&mut lock(&sink), &buf[..n]),
            Err(e) => {
                lock(&sink).read_error = Some(e.to_string());
                break;
            }
        }
    }
    lock(&sink).eof = true;
    None
}

/// Waits until every thread of process `pid` is stopped (state `T` in
/// `/proc/<pid>/task/*/stat`).
async fn wait_stopped(pid: u32, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let tasks = PathBuf::from(format!("/proc/{pid}/task"));
    loop {
        let mut all_stopped = true;
        let entries =
            std::fs::read_dir(&tasks).with_context(|| format!("reading {}", tasks.display()))?;
        for entry in entries.flatten() {
            // A thread that ended meanwhile has no stat any more: it is not running either.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) S …`: the state follows the last `)` (comm may hold one).
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            if !matches!(state, Some('T' | 't' | 'Z' | 'X')) {
                all_stopped = false;
                break;
            }
        }
        if all_stopped {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "process {pid} not stopped {timeout:?} after SIGSTOP"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A finished short-lived `kcl` run (`kcl leases`, invalid input).
#[derive(Debug)]
pub struct Finished {
    /// Its exit status.
    pub status: ExitStatus,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
}

/// Runs `bin args…` with `env` to completion, killing it after `timeout`.
///
/// # Errors
/// It could not be started or did not finish in time.
pub async fn run_kcl<I, S>(
    bin: &Path,
    env: &CliEnv,
    args: I,
    timeout: Duration,
) -> anyhow::Result<Finished>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let mut cmd = Command::new(bin);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    env.apply(&mut cmd);
    let started = Instant::now();
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .with_context(|| format!("kcl {args:?} did not finish within {timeout:?}"))?
        .with_context(|| format!("running kcl {args:?}"))?;
    Ok(Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    })
}

/// One record as `kcl consume` prints it:
/// `{"stream":"<stream>","shard":"<shard id>","seq":"<sequence number>","subseq":<n>,"key":"<partition key>","data":"<base64>"}`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct OutputRecord {
    /// The stream's name.
    pub stream: String,
    /// The shard id.
    pub shard: String,
    /// The sequence number.
    pub seq: SequenceNumber,
    /// The KPL sub-sequence number (0 for plain records).
    pub subseq: u64,
    /// The partition key.
    pub key: String,
    /// The payload.
    pub data: Vec<u8>,
}

impl OutputRecord {
    /// The exact line `kcl consume` prints for this record (without the newline): fields in
    /// this order, no spaces, strings JSON-escaped as serde_json does, data in standard
    /// base64 with padding.
    pub fn to_line(&self) -> String {
        let s = |v: &str| serde_json::to_string(v).expect("a string serializes");
        format!(
            "{{\"stream\":{},\"shard\":{},\"seq\":{},\"subseq\":{},\"key\":{},\"data\":{}}}",
            s(&self.stream),
            s(&self.shard),
            s(self.seq.as_str()),
            self.subseq,
            s(&self.key),
            s(&base64::engine::general_purpose::STANDARD.encode(&self.data)),
        )
    }

    /// Parses one stdout line, and checks it is exactly in the form [`OutputRecord::to_line`]
    /// gives (so field order and formatting are checked too).
    ///
    /// # Errors
    /// Not JSON, a missing, extra or mistyped field, or not in the canonical form.
    pub fn parse(line: &str) -> anyhow::Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))?;
        let obj = v
            .as_object()
            .with_context(|| format!("not a JSON object: {line:?}"))?;
        let mut names: Vec<&str> = obj.keys().map(String::as_str).collect();
        names.sort_unstable();
        ensure!(
            names == ["data", "key", "seq", "shard", "stream", "subseq"],
            "fields {names:?} instead of stream, shard, seq, subseq, key, data: {line:?}"
        );
        let string = |f: &str| {
            obj[f]
                .as_str()
                .with_context(|| format!("{f} is not a string: {line:?}"))
        };
        let rec = Self {
            stream: string("stream")?.to_owned(),
            shard: string("shard")?.to_owned(),
            seq: SequenceNumber::parse(string("seq")?)
                .with_context(|| format!("seq is not a sequence number: {line:?}"))?,
            subseq: obj["subseq"]
                .as_u64()
                .with_context(|| format!("subseq is not an unsigned integer: {line:?}"))?,
            key: string("key")?.to_owned(),
            data: base64::engine::general_purpose::STANDARD
                .decode(string("data")?)
                .with_context(|| format!("data is not standard base64: {line:?}"))?,
        };
        let canonical = rec.to_line();
        ensure!(
            canonical == line,
            "line not in the documented form (field order, spacing, escaping):\n  got  {line}\n  want {canonical}"
        );
        Ok(rec)
    }
}

/// Parses every line with [`OutputRecord::parse`]; the error names the line's index.
///
/// # Errors
/// The first line that does not parse.
pub fn parse_lines<'a>(
    lines: impl IntoIterator<Item = &'a str>,
) -> anyhow::Result<Vec<OutputRecord>> {
    lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| OutputRecord::parse(l).with_context(|| format!("stdout line {}", i + 1)))
        .collect()
}
