//! SIGINT / SIGTERM as graceful stops (feature `signal`, Unix).
//!
//! A service should stop gracefully on the first SIGINT (Ctrl-C) or SIGTERM (what Kubernetes,
//! ECS and systemd send), so that processors checkpoint and leases are released at once, and
//! stop at once on a second one. [`Worker::run_until_signal`] does exactly that; [`StopSignals`]
//! is the building block for loops of your own (the `kcl` CLI uses it).

use std::fmt;

use tracing::info;

use super::Worker;

/// A signal that asks for a graceful stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopSignal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl fmt::Display for StopSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Interrupt => "SIGINT",
            Self::Terminate => "SIGTERM",
        })
    }
}

/// SIGINT and SIGTERM, caught from [`StopSignals::install`] on (they no longer end the
/// process): [`StopSignals::recv`] returns each one as it arrives, also those that arrived
/// before it was called. Needs a tokio runtime with the signal driver (`tokio/signal`).
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// use kcl::worker::signal::StopSignals;
///
/// let mut signals = StopSignals::install()?; // install early: a signal during start-up counts
/// let first = signals.recv().await;
/// eprintln!("{first} received; stopping");
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Installs the handlers.
    ///
    /// # Errors
    /// A handler could not be installed (no tokio runtime, or the OS refused).
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// The next signal.
    ///
    /// # Cancel safety
    /// Cancel safe: a signal is never lost by dropping the future.
    pub async fn recv(&mut self) -> StopSignal {
        tokio::select! {
            Some(()) = self.interrupt.recv() => StopSignal::Interrupt,
            Some(()) = self.terminate.recv() => StopSignal::Terminate,
            // Both streams ended (the runtime is shutting down): no more signals.
            else => std::future::pending().await,
        }
    }
}

/// How [`Worker::run_until_signal`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignalOutcome {
    /// `run` returned by itself (a handle stopped it).
    Finished,
    /// A signal asked for a graceful stop, and it completed: processors checkpointed,
    /// leases were released.
    Stopped(StopSignal),
    /// A second signal came during the graceful stop: the worker was dropped without waiting.
    /// Leases still held expire after the lease duration; nothing checkpointed is lost.
    Abandoned(StopSignal),
}

impl Worker {
    /// Runs the worker until SIGINT or SIGTERM, then stops it gracefully (processors run
    /// `shutdown_requested`, leases are released). A second signal during that stop returns
    /// at once ([`SignalOutcome::Abandoned`]). The handlers are installed before the worker
    /// starts. Feature `signal`.
    ///
    /// ```no_run
    /// # async fn demo(worker: kcl::Worker) -> kcl::Result<()> {
    /// match worker.run_until_signal().await? {
    ///     kcl::worker::signal::SignalOutcome::Abandoned(s) => eprintln!("{s} twice: abandoned"),
    ///     _ => {}
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`Worker::run`]; an [`std::io::Error`] from installing the handlers becomes
    /// [`crate::Error::Signal`].
    pub async fn run_until_signal(self) -> crate::Result<SignalOutcome> {
        let mut signals = StopSignals::install().map_err(crate::Error::Signal)?;
        let stop = self.shutdown_handle();
        let run = self.run();
        tokio::pin!(run);
        let first = tokio::select! {
            r = &mut run => return r.map(|()| SignalOutcome::Finished),
            s = signals.recv() => s,
        };
        info!(signal = %first, "signal received; shutting down gracefully (again to stop at once)");
        stop.shutdown();
        tokio::select! {
            r = &mut run => r.map(|()| SignalOutcome::Stopped(first)),
            s = signals.recv() => {
                tracing::warn!(signal = %s, "second signal: stopping without waiting for the graceful shutdown");
                Ok(SignalOutcome::Abandoned(s))
            }
        }
    }
}
