//! The ordered-parallelism example runs in the test suite, and every check of its report must
//! hold (the example's source is compiled in, as for the quickstart).

#[allow(dead_code)]
#[path = "../../../examples/parallel.rs"]
mod parallel;

use anyhow::ensure;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parallel_example_runs_and_every_check_holds() -> anyhow::Result<()> {
    let report = parallel::run().await?;
    report.print();
    let checks = report.checks();
    ensure!(checks.len() >= 5, "the report has {} checks", checks.len());
    ensure!(report.checkpoints > 0, "no checkpoint was checked");
    report.check()
}
