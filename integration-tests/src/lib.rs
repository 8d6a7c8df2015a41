//! The integration-test harness: starts the local stand-ins (kinesis-local, moto, dynalite)
//! on free loopback ports, hands out SDK configs pointing at them, and always stops them.
//!
//! The servers are installed into `.emulators/` at the workspace root by `scripts/test.sh`
//! (pinned versions; see `../shared/EMULATORS.md`).

pub mod cli;
pub mod dynamo_servers;
pub mod failures;
pub mod kinesis_server;
pub mod metrics_doc;
pub mod metrics_sweep;
pub mod multi_stream;
pub mod proxy;
pub mod scenarios;
pub mod sdk_faults;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

/// The workspace's `.emulators/` folder (override with `KCL_EMULATORS_DIR`).
pub fn emulators_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("KCL_EMULATORS_DIR") {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.join(".emulators"))
        .unwrap_or_else(|| PathBuf::from(".emulators"))
}

/// A free TCP port on 127.0.0.1 (bound, then released for the server to take).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding an ephemeral port")?;
    Ok(l.local_addr()?.port())
}

/// A server process that is stopped when dropped: SIGTERM, a short grace period, then
/// SIGKILL (kinesis-local has been seen to hang on SIGTERM).
#[derive(Debug)]
pub struct ServerProcess {
    name: &'static str,
    child: Option<Child>,
    /// The port it listens on.
    pub port: u16,
}

impl ServerProcess {
    /// Starts a server up to three times, each with the command (and port) `make` gives: a
    /// server that exits before it answers (its port taken meanwhile) is started again on
    /// another port.
    ///
    /// # Errors
    /// The last attempt's error.
    pub async fn spawn_retrying(
        name: &'static str,
        make: impl Fn() -> anyhow::Result<(Command, u16)>,
    ) -> anyhow::Result<Self> {
        let mut last = None;
        for _ in 0..3 {
            let (cmd, port) = make()?;
            match Self::spawn(name, cmd, port).await {
                Ok(server) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("{name} was not started")))
    }

    /// Spawns `cmd` (its output goes to a log file under `target/emulator-logs/`) and waits
    /// until `port` accepts TCP connections (and still does a moment later).
    ///
    /// # Errors
    /// The server could not be started, exited, or did not listen within 60 s.
    pub async fn spawn(name: &'static str, mut cmd: Command, port: u16) -> anyhow::Result<Self> {
        let log_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("emulator-logs");
        std::fs::create_dir_all(&log_dir).ok();
        let log = std::fs::File::create(log_dir.join(format!("{name}-{port}.log")))
            .context("creating the server log")?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name} (run scripts/test.sh to install it)"))?;
        let mut server = Self {
            name,
            child: Some(child),
            port,
        };
        server.wait_ready(Duration::from_secs(60)).await?;
        Ok(server)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                // Ports come from `free_port`, released before the server binds them: another
                // test may have held the same port for a moment (and this server then failed to
                // bind it). Ready only if the server still runs and still answers a moment later.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let alive = match self.child.as_mut() {
                    Some(child) => child.try_wait()?.is_none(),
                    None => false,
                };
                if alive
                    && tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                        .await
                        .is_ok()
                {
                    return Ok(());
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("{} exited before listening: {status}", self.name);
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} did not listen on port {} in {timeout:?}",
                    self.name,
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            // SIGTERM first; kill_on_drop sends SIGKILL if it is still running afterwards.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            for _ in 0..20 {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = child.start_kill();
    }
}

/// An SDK config with dummy credentials, pointing every service at `endpoint`.
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    sdk_loader(endpoint).load().await
}

/// The loader behind [`sdk_config`], for tests that add to it (timeouts, an HTTP client).
pub fn sdk_loader(endpoint: &str) -> aws_config::ConfigLoader {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new(
            "test",
            "test",
            None,
            None,
            "kcl-tests",
        ))
}

/// A name unique within this test run (streams, tables).
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
