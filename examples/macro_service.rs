//! A whole Kinesis consumer service in 13 lines of code (not counting blank lines and
//! comments; the Java KCL needs ~80): typed JSON records, a checkpoint after every batch and
//! at a graceful stop, `--stream`/`--app`/… flags or `KCL_*` variables, logs on stderr
//! (`RUST_LOG`), graceful SIGINT/SIGTERM.
//!
//! Run with:
//! `cargo run -p kcl-examples --features aws --example macro_service -- --stream orders --app orders-app`
//! (endpoints, region and credentials come from the standard AWS configuration).
//!
//! Guarantee demonstrated: at-least-once, and no record skipped. A failed write is retried
//! from the order that failed; a record that is not a JSON `Order` stops its shard there,
//! logged by shard, sequence number and partition key (see docs/macros.md).

use std::io::Write;

#[derive(serde::Deserialize)]
struct Order {
    id: u64,
    item: String,
    quantity: u32,
}

#[kcl::handler]
async fn handle(order: Order) -> std::io::Result<()> {
    let Order { id, item, quantity } = order;
    writeln!(std::io::stdout(), "order {id}: {quantity} x {item}")
}

kcl::service!(handle);
