//! `kcl consume`: a stream as JSON lines on stdout, checkpointing exactly what was written.

use std::collections::VecDeque;
use std::io::Write as _;
use std::os::fd::AsFd as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use kcl::service::parse_position;

use crate::parse_duration;
use kcl::worker::signal::StopSignals;
use kcl::{
    async_trait, Checkpointer, ExtendedSequenceNumber, InitialPosition, ProcessorError, Record,
    RecordBatch, RecordProcessor, Worker,
};
use tokio_util::sync::CancellationToken;

/// `kcl consume`'s flags.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The stream to read. Given more than once, one worker reads every stream with one
    /// lease table (multi-stream mode, Java KCL multi-stream lease keys).
    #[arg(long, required = true)]
    stream: Vec<String>,
    /// The application name (also the lease table, unless --table is given).
    #[arg(long)]
    app: String,
    /// The lease table (default: the application name).
    #[arg(long)]
    table: Option<String>,
    /// This worker's id (default: host name plus a random suffix).
    #[arg(long)]
    worker_id: Option<String>,
    /// Where shards without a checkpoint start: `trim-horizon`, `latest`, or
    /// `at-timestamp=<RFC 3339>` (e.g. `at-timestamp=2026-11-25T10:00:00Z`).
    #[arg(long, default_value = "trim-horizon", value_parser = parse_position)]
    position: InitialPosition,
    /// Read with enhanced fan-out as this stream consumer (registered if missing) instead of
    /// polling.
    #[arg(long, value_name = "NAME")]
    fan_out: Option<String>,
    /// A lease not renewed for this long may be taken by another worker (default 10s).
    #[arg(long, value_parser = parse_duration)]
    lease_duration: Option<Duration>,
    /// How often held leases are renewed (default a third of --lease-duration).
    #[arg(long, value_parser = parse_duration)]
    renew_interval: Option<Duration>,
    /// How often this worker looks for leases to take (default 2s).
    #[arg(long, value_parser = parse_duration)]
    taker_interval: Option<Duration>,
    /// The most leases this worker holds (default unlimited).
    #[arg(long, value_name = "N")]
    max_leases: Option<usize>,
    /// The most leases asked from other workers per taker round (default 4).
    #[arg(long, value_name = "N")]
    max_leases_to_steal: Option<usize>,
    /// How long a graceful stop waits for the processors (default 30s).
    #[arg(long, value_parser = parse_duration)]
    shutdown_timeout: Option<Duration>,
    /// Polling: the most records per GetRecords call, 1 to 10000 (default 10000).
    #[arg(long, value_name = "N")]
    max_records: Option<u32>,
    /// Polling: the shortest time between two GetRecords calls on a shard (default 200ms).
    #[arg(long, value_parser = parse_duration)]
    poll_interval: Option<Duration>,
    /// Polling: the time between two GetRecords calls on a shard with nothing new (default
    /// 200ms).
    #[arg(long, value_parser = parse_duration)]
    idle_interval: Option<Duration>,
}

/// The `kcl consume` flag that sets a worker configuration field, for error messages.
fn flag_of(field: &str) -> Option<&'static str> {
    Some(match field {
        "stream" | "streams" => "--stream",
        "application_name" => "--app",
        "table_name" => "--table (default: --app)",
        "worker_id" => "--worker-id",
        "retrieval.consumer_name" => "--fan-out",
        "lease_duration" => "--lease-duration",
        "renew_interval" => "--renew-interval",
        "taker_interval" => "--taker-interval",
        "max_leases_per_worker" => "--max-leases",
        "max_leases_to_steal" => "--max-leases-to-steal",
        "shutdown_timeout" => "--shutdown-timeout",
        "polling.max_records" => "--max-records",
        "polling.min_interval" => "--poll-interval",
        "polling.idle_interval" => "--idle-interval",
        _ => return None,
    })
}

/// How many bytes of lines are collected before they are written out (and at the end of every
/// batch).
const WRITE_CHUNK: usize = 64 * 1024;

/// `kcl consume`'s stdout, shared by the processors of every shard.
///
/// Lines are appended to one buffer and written to a duplicate of file descriptor 1 with plain
/// `write(2)` calls (no other buffering between them and the file), so the number of bytes that
/// reached stdout is known exactly, and with it the last record of each shard whose line was
/// written whole. Only those records are ever checkpointed: a line cut short by a failed write
/// is not written, and it is completed before anything else is written (a retry never writes
/// a line twice or splices two lines).
struct Output {
    state: tokio::sync::Mutex<OutputState>,
    /// Cancelled once stdout is closed (EPIPE): the consumer stops.
    closed: CancellationToken,
}

/// The last record of one processor whose line was written whole.
type Watermark = std::sync::Mutex<Option<ExtendedSequenceNumber>>;

/// One line in [`OutputState::buf`], not written whole yet.
struct Pending {
    /// Where the line ends, counted in bytes since the start of the output.
    end: u64,
    /// The watermark of the processor that queued it.
    mark: Arc<Watermark>,
    /// Its record.
    position: ExtendedSequenceNumber,
}

struct OutputState {
    /// File descriptor 1, duplicated.
    file: Arc<std::fs::File>,
    /// Bytes not written yet: the rest of the line a failed write cut short, then whole lines.
    buf: Vec<u8>,
    /// The lines in `buf`, oldest first.
    pending: VecDeque<Pending>,
    /// Bytes written so far.
    written_bytes: u64,
    /// Lines written whole so far.
    written_lines: u64,
    /// A write is in flight, or one was abandoned half-way (its future dropped): `buf` is then
    /// gone with it, and nothing can be written any more.
    busy: bool,
    /// Stdout was closed (EPIPE): nothing can be written any more.
    broken: bool,
    /// The last write's error, until a write succeeds again.
    failing: Option<String>,
}

/// Why a line could not be written.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    /// Stdout was closed: the reader went away (`| head`). Retrying cannot help.
    #[error("stdout was closed (broken pipe)")]
    Closed,
    /// A write failed (e.g. a full disk); the worker's error policy retries it.
    #[error("writing to stdout failed: {0}")]
    Failed(#[source] std::io::Error),
    /// An earlier write was abandoned (shutdown timeout) and took the unwritten bytes with it.
    #[error("an earlier write to stdout was abandoned")]
    Abandoned,
    /// A line could not be encoded.
    #[error("encoding a record as a JSON line failed: {0}")]
    Encode(String),
}

impl WriteError {
    fn into_processor_error(self) -> ProcessorError {
        match self {
            Self::Failed(_) => ProcessorError::retryable(self),
            Self::Closed | Self::Abandoned | Self::Encode(_) => ProcessorError::fatal(self),
        }
    }
}

impl Output {
    /// Stdout, duplicated: written unbuffered from blocking threads.
    fn stdout() -> anyhow::Result<Arc<Self>> {
        let fd = std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .context("stdout is not open")?;
        Ok(Arc::new(Self {
            state: tokio::sync::Mutex::new(OutputState {
                file: Arc::new(std::fs::File::from(fd)),
                buf: Vec::with_capacity(WRITE_CHUNK),
                pending: VecDeque::new(),
                written_bytes: 0,
                written_lines: 0,
                busy: false,
                broken: false,
                failing: None,
            }),
            closed: CancellationToken::new(),
        }))
    }

    /// After the worker stopped: writes what is left in the buffer if it can (a line cut short
    /// by a failed write is completed rather than left half-written; the lines of records
    /// that were not checkpointed come again in the next run). An error if stdout was closed
    /// or the last write failed: the records not written were not checkpointed.
    async fn finish(&self) -> anyhow::Result<()> {
        let mut st = self.state.lock().await;
        if !st.buf.is_empty() {
            // Bounded: nobody may be reading any more.
            let _ = tokio::time::timeout(Duration::from_secs(2), st.write_out()).await;
        }
        let lines = st.written_lines;
        if st.busy {
            bail!(
                "a write to stdout did not finish, after {lines} records; the records not \
                 written were not checkpointed (the next run starts with them)"
            );
        }
        if st.broken {
            bail!(
                "stdout was closed (broken pipe) after {lines} records; stopped, and the \
                 records not written were not checkpointed (the next run starts with them)"
            );
        }
        if let Some(e) = &st.failing {
            bail!(
                "writing to stdout failed ({e}) after {lines} records; the records not written \
                 were not checkpointed (the next run starts with them)"
            );
        }
        Ok(())
    }
}

impl OutputState {
    /// Whether anything can be written.
    fn check(&self) -> Result<(), WriteError> {
        if self.broken {
            Err(WriteError::Closed)
        } else if self.busy {
            Err(WriteError::Abandoned)
        } else {
            Ok(())
        }
    }

    /// Appends `r`'s line. On an error nothing of it stays in the buffer.
    fn push_line(
        &mut self,
        stream: &str,
        shard: &kcl::ShardId,
        r: &Record,
        mark: &Arc<Watermark>,
    ) -> Result<(), WriteError> {
        r.write_stream_json_line(stream, shard, &mut self.buf)
            .map_err(|e| WriteError::Encode(e.to_string()))?;
        self.pending.push_back(Pending {
            end: self.written_bytes + self.buf.len() as u64,
            mark: mark.clone(),
            position: r.position(),
        });
        Ok(())
    }

    /// Writes the whole buffer, from a blocking thread. Moves the watermarks of the lines
    /// written whole, also when the write fails half-way.
    async fn write_out(&mut self) -> Result<(), WriteError> {
        self.check()?;
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let file = self.file.clone();
        self.busy = true;
        let (mut buf, n, result) = tokio::task::spawn_blocking(move || {
            let mut n = 0;
            let result = loop {
                if n == buf.len() {
                    break Ok(());
                }
                match (&*file).write(&buf[n..]) {
                    Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // A non-blocking stdout (set so by whoever shares it) that is full.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => break Err(e),
                }
            };
            (buf, n, result)
        })
        .await
        .map_err(|_| WriteError::Abandoned)?;
        self.busy = false;
        buf.drain(..n);
        self.buf = buf;
        self.written_bytes += n as u64;
        while let Some(p) = self.pending.front() {
            if p.end > self.written_bytes {
                break;
            }
            if let Some(p) = self.pending.pop_front() {
                *lock(&p.mark) = Some(p.position);
                self.written_lines += 1;
            }
        }
        match result {
            Ok(()) => {
                self.failing = None;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.broken = true;
                Err(WriteError::Closed)
            }
            Err(e) => {
                self.failing = Some(e.to_string());
                Err(WriteError::Failed(e))
            }
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes one shard's records as JSON lines to the shared [`Output`], and checkpoints exactly
/// the last record whose line was written whole: never a record delivered but not written.
struct JsonLines {
    out: Arc<Output>,
    /// The last of this processor's records whose line was written whole (moved by whoever
    /// writes the buffer out).
    written: Arc<Watermark>,
    /// The last record whose line was queued (written or in the buffer): a retried batch skips
    /// the lines already queued.
    queued: Option<ExtendedSequenceNumber>,
    /// The shard's stream (from `initialize`), printed in every line.
    stream: String,
}

impl JsonLines {
    fn new(out: Arc<Output>) -> Self {
        Self {
            stream: String::new(),
            out,
            written: Arc::new(std::sync::Mutex::new(None)),
            queued: None,
        }
    }

    /// Queues the batch's lines not queued yet and writes the buffer out.
    async fn write(&mut self, batch: &RecordBatch) -> Result<(), WriteError> {
        let shard = &batch.shard_id;
        let mut st = self.out.state.lock().await;
        // First what a failed write left (the rest of a line may have been written already).
        st.write_out().await?;
        for r in batch {
            let position = r.position();
            if self.queued.as_ref().is_some_and(|q| position <= *q) {
                continue;
            }
            st.push_line(&self.stream, shard, r, &self.written)?;
            self.queued = Some(position);
            if st.buf.len() >= WRITE_CHUNK {
                st.write_out().await?;
            }
        }
        st.write_out().await
    }

    /// Checkpoints the last record written whole, if any.
    async fn checkpoint_written(&self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        let written = lock(&self.written).clone();
        match written {
            Some(pos) => cp
                .checkpoint_at(pos)
                .await
                .map_err(ProcessorError::retryable),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl RecordProcessor for JsonLines {
    async fn initialize(&mut self, shard: &kcl::ShardContext) -> Result<(), ProcessorError> {
        self.stream = shard.stream.clone();
        Ok(())
    }

    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        if let Err(e) = self.write(batch).await {
            // Inside `process_records` the batch may be checkpointed up to its last line
            // written whole; after it returns an error, no callback may (the worker's
            // processed watermark stops before a failed batch).
            if let Err(cp_error) = self.checkpoint_written(cp).await {
                tracing::debug!(error = %cp_error, "checkpointing the lines written failed");
            }
            if matches!(e, WriteError::Closed) {
                // The consumer stops; the leases are released, checkpointed at what was written.
                self.out.closed.cancel();
            }
            return Err(e.into_processor_error());
        }
        self.checkpoint_written(cp).await
    }

    async fn shard_ended(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        // Every batch returned Ok, so every line was written; SHARD_END says so.
        if *lock(&self.written) != self.queued {
            return Err(ProcessorError::retryable(
                "the shard's last lines are not written yet",
            ));
        }
        cp.checkpoint().await.map_err(ProcessorError::retryable)?;
        Ok(())
    }

    async fn shutdown_requested(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        // Only what was written, and (outside `process_records`) no further than the batches
        // processed whole: a failed batch's lines written were checkpointed when it failed.
        let written = lock(&self.written).clone();
        let result = match (written, cp.last_processed().cloned()) {
            (Some(w), Some(p)) => cp
                .checkpoint_at(w.min(p))
                .await
                .map_err(ProcessorError::retryable),
            _ => Ok(()),
        };
        result
    }
}

/// Runs `kcl consume` until a signal, a closed stdout or an error.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let Args {
        stream,
        app,
        table,
        worker_id,
        position,
        fan_out,
        lease_duration,
        renew_interval,
        taker_interval,
        max_leases,
        max_leases_to_steal,
        shutdown_timeout,
        max_records,
        poll_interval,
        idle_interval,
    } = args;
    // Caught from now on: a signal during start-up is a graceful stop too.
    let mut signals = StopSignals::install().context("installing signal handlers")?;
    let out = Output::stdout()?;
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let mut builder = Worker::builder().application_name(app);
    builder = match stream.as_slice() {
        [one] => builder.stream(one.clone()),
        several => builder.streams(several.iter().cloned()),
    };
    let mut builder = builder
        .backends(kcl::Aws::from_conf(&sdk))
        .initial_position(position)
        .processor({
            let out = out.clone();
            move || JsonLines::new(out.clone())
        });
    if let Some(t) = table {
        builder = builder.table_name(t);
    }
    if let Some(id) = worker_id {
        builder = builder.worker_id(id);
    }
    if let Some(name) = fan_out {
        builder = builder.fan_out(name);
    }
    if let Some(d) = lease_duration {
        builder = builder.lease_duration(d);
        if renew_interval.is_none() {
            builder = builder.renew_interval(d / 3);
        }
    }
    if let Some(d) = renew_interval {
        builder = builder.renew_interval(d);
    }
    if let Some(d) = taker_interval {
        builder = builder.taker_interval(d);
    }
    if let Some(n) = max_leases {
        builder = builder.max_leases_per_worker(n);
    }
    if let Some(n) = max_leases_to_steal {
        builder = builder.max_leases_to_steal(n);
    }
    if let Some(d) = shutdown_timeout {
        builder = builder.shutdown_timeout(d);
    }
    if max_records.is_some() || poll_interval.is_some() || idle_interval.is_some() {
        let mut polling = kcl::PollingConfig::default();
        if let Some(n) = max_records {
            polling.max_records = n;
        }
        if let Some(d) = poll_interval {
            polling.min_interval = d;
        }
        if let Some(d) = idle_interval {
            polling.idle_interval = d;
        }
        builder = builder.polling(polling);
    }
    let worker = builder.build().map_err(|e| match flag_of(e.field()) {
        Some(flag) => anyhow::anyhow!("invalid {flag}: {}", e.reason()),
        None => anyhow::Error::new(e),
    })?;
    // Before anything is created: a mistyped stream must not leave an empty lease table.
    for stream in &stream {
        check_stream(&sdk, stream).await?;
    }
    let stop = worker.shutdown_handle();
    let run = worker.run();
    tokio::pin!(run);
    let stopped = tokio::select! {
        r = &mut run => {
            r?;
            true
        }
        signal = signals.recv() => {
            tracing::info!(%signal, "signal received; shutting down gracefully");
            false
        }
        _ = out.closed.cancelled() => {
            tracing::warn!("stdout was closed (broken pipe); shutting down gracefully");
            false
        }
    };
    if !stopped {
        stop.shutdown();
        let result = tokio::select! {
            r = &mut run => r,
            signal = signals.recv() => bail!(
                "{signal} received again: stopped without waiting for the graceful \
                 shutdown (the leases still held expire after the lease duration)"
            ),
        };
        if let Err(kcl::Error::Abandoned { shards }) = &result {
            let why = format!(
                "{} processor(s) (shards {}) did not finish within --shutdown-timeout and were \
                 abandoned: their leases expire after the lease duration, and the records they \
                 had not checkpointed come again",
                shards.len(),
                shards
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return Err(match out.finish().await {
                Err(e) => e.context(why),
                Ok(()) => anyhow::anyhow!(why),
            });
        }
        result?;
    }
    out.finish().await
}

/// Fails, naming `--stream`, if the stream cannot be listed (it does not exist, or is not
/// readable): checked before the worker creates its lease table.
async fn check_stream(sdk: &aws_config::SdkConfig, stream: &str) -> anyhow::Result<()> {
    use kcl::retrieval::{KinesisApi as _, KinesisApiError};
    match kcl::retrieval::aws::AwsKinesis::from_conf(sdk)
        .list_shards(stream)
        .await
    {
        Ok(_) => Ok(()),
        Err(KinesisApiError::NotFound(what)) => {
            bail!("--stream {stream}: no such stream ({what}); nothing was created")
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "listing the shards of --stream {stream}; nothing was created"
        ))),
    }
}
