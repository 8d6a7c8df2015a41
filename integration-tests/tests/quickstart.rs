//! The quickstart runs in the test suite, and every check of its report must hold.
//!
//! The example's own source is compiled into this test (its `main` only adds logging, printing
//! and the exit code), so the test runs exactly the quickstart's code without building or
//! spawning the example binary.

#[allow(dead_code)]
#[path = "../../examples/quickstart.rs"]
mod quickstart;

use anyhow::ensure;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_runs_and_every_check_holds() -> anyhow::Result<()> {
    let report = quickstart::run().await?;
    report.print();
    let checks = report.checks();
    ensure!(checks.len() >= 4, "the report has {} checks", checks.len());
    let failed: Vec<&str> = checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(what, _)| *what)
        .collect();
    ensure!(failed.is_empty(), "quickstart checks failed: {failed:?}");
    // What `main` decides its exit code from.
    report.check()
}
