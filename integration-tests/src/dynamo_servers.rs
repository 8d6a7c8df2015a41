//! moto and dynalite, the DynamoDB stand-ins: the lease-store tests run against both.
//!
//! - moto 5.2.5 (PyPI, in the venv `.emulators/venv`): `moto_server -H 127.0.0.1 -p P`.
//!   Tables are `ACTIVE` at once; it also serves S3 on the same port.
//! - dynalite 4.0.0 (npm, `.emulators/node_modules/dynalite`), in memory, with 50 ms table
//!   state transitions. It lacks transactions, TTL and `ReturnValuesOnConditionCheckFailure`,
//!   which the lease protocol does not use.
//!
//! Each server gets its own free loopback port and is stopped when the returned
//! [`ServerProcess`] is dropped.

use anyhow::ensure;
use tokio::process::Command;

use crate::{emulators_dir, free_port, ServerProcess};

/// Starts `moto_server` on a free port of 127.0.0.1 and waits until it listens.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// let moto = kcl_integration_tests::dynamo_servers::start_moto().await?;
/// let conf = kcl_integration_tests::sdk_config(&moto.endpoint()).await;
/// # Ok(())
/// # }
/// ```
pub async fn start_moto() -> anyhow::Result<ServerProcess> {
    let bin = emulators_dir().join("venv").join("bin").join("moto_server");
    ensure!(
        bin.exists(),
        "moto is not installed at {} (run scripts/test.sh, or create the venv \
         `.emulators/venv` and `pip install \"moto[dynamodb,s3]==5.2.5\" flask flask-cors`)",
        bin.display()
    );
    let port = free_port()?;
    let mut cmd = Command::new(&bin);
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
        // Unbuffered, so the log shows what happened even when the server is killed.
        .env("PYTHONUNBUFFERED", "1");
    ServerProcess::spawn("moto", cmd, port).await
}

/// Starts dynalite (in memory, 50 ms create/update/delete table transitions) on a free port of
/// 127.0.0.1 and waits until it listens.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// let dynalite = kcl_integration_tests::dynamo_servers::start_dynalite().await?;
/// let conf = kcl_integration_tests::sdk_config(&dynalite.endpoint()).await;
/// # Ok(())
/// # }
/// ```
pub async fn start_dynalite() -> anyhow::Result<ServerProcess> {
    let cli = emulators_dir()
        .join("node_modules")
        .join("dynalite")
        .join("cli.js");
    ensure!(
        cli.exists(),
        "dynalite is not installed at {} (run scripts/test.sh, or \
         `npm install --prefix .emulators dynalite@4.0.0`)",
        cli.display()
    );
    ServerProcess::spawn_retrying("dynalite", || {
        let port = free_port()?;
        let mut cmd = Command::new("node");
        cmd.arg(&cli).args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--createTableMs",
            "50",
            "--updateTableMs",
            "50",
            "--deleteTableMs",
            "50",
        ]);
        Ok((cmd, port))
    })
    .await
}

/// Which DynamoDB stand-in a test's lease table runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// moto.
    Moto,
    /// dynalite.
    Dynalite,
}

/// Starts the stand-in `kind` and returns it with a lease store on a fresh table in it.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// use kcl_integration_tests::dynamo_servers::{lease_table, Table};
/// let (_server, store) = lease_table(Table::Dynalite).await?;
/// # Ok(())
/// # }
/// ```
pub async fn lease_table(
    kind: Table,
) -> anyhow::Result<(ServerProcess, std::sync::Arc<dyn kcl::lease::LeaseStore>)> {
    let server = match kind {
        Table::Moto => start_moto().await?,
        Table::Dynalite => start_dynalite().await?,
    };
    let conf = crate::sdk_config(&server.endpoint()).await;
    let store =
        kcl::lease::dynamo::DynamoLeaseStore::from_conf(&conf, crate::unique_name("leases"));
    Ok((server, std::sync::Arc::new(store)))
}
