//! The multi-stream example (`examples/multi_stream.rs`) runs in the test suite, and every check of its report must hold.
//! Its source is compiled into this test (its `main` only adds logging and printing).

#[allow(dead_code)]
#[path = "../../../examples/multi_stream.rs"]
mod multi_stream;

use anyhow::ensure;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_stream_example_runs_and_every_check_holds() -> anyhow::Result<()> {
    let report = multi_stream::run().await?;
    report.print();
    let checks = report.checks();
    ensure!(checks.len() >= 5, "the report has {} checks", checks.len());
    report.check()
}
