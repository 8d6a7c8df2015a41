//! ferrokinesis (crates.io `ferrokinesis@0.7.0`): a fast Kinesis stand-in, used only by the RSS
//! benchmark to load and serve a large stream (kinesis-local loads ~800 records/s, ferrokinesis
//! ~40 000). EMULATORS.md lists its gaps (ListShards with only a NextToken, no ChildShards at a
//! closed shard's end); a benchmark that drains open shards of one listing page hits none of
//! them. Never use it for correctness tests. Install it with
//! `cargo install --root .emulators/ferrokinesis ferrokinesis@0.7.0` (about 5 minutes).

use std::path::PathBuf;

use kcl_integration_tests::{emulators_dir, free_port, ServerProcess};
use tokio::process::Command;

/// Where `cargo install --root .emulators/ferrokinesis` puts the binary.
pub fn binary() -> PathBuf {
    emulators_dir()
        .join("ferrokinesis")
        .join("bin")
        .join("ferrokinesis")
}

/// Whether ferrokinesis is installed.
pub fn installed() -> bool {
    binary().exists()
}

/// Starts ferrokinesis on a free loopback port with short stream-state transitions.
pub async fn start() -> anyhow::Result<ServerProcess> {
    let port = free_port()?;
    let mut cmd = Command::new(binary());
    cmd.args([
        "--port",
        &port.to_string(),
        "--create-stream-ms",
        "50",
        "--update-stream-ms",
        "50",
        "--shard-limit",
        "1000",
    ]);
    ServerProcess::spawn("ferrokinesis", cmd, port).await
}
