//! The procedural macros of [kcl](https://docs.rs/kcl): `#[kcl::handler]` and
//! `kcl::service!`. Use them through kcl with its `macros` feature; they only check syntax
//! and emit calls into `kcl::service`, where the logic lives (and is tested).
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]

use proc_macro::TokenStream;

mod handler;
mod service;

/// Turns an `async fn` of a decoded record into a Kinesis record processor.
///
/// ```
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64, item: String }
///
/// #[kcl::handler]
/// async fn handle(order: Order) -> Result<(), std::io::Error> {
///     println!("order {}: {}", order.id, order.item);
///     Ok(())
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // The function is still a function…
/// handle(Order { id: 1, item: "tea".into() }).await?;
/// // …and `handle::factory()` creates its processors.
/// let builder = kcl::Worker::builder().processor(handle::factory());
/// # let _ = builder;
/// # Ok(())
/// # }
/// ```
///
/// Then `kcl::service!(handle);` is the whole `main`; or pass `handle::factory()` to
/// `Worker::builder().processor(…)` or `kcl::service::Service::new(…)`.
///
/// # Signatures
///
/// | form | called |
/// |---|---|
/// | `async fn handle(order: Order)` | once per record |
/// | `async fn handle(order: Order, record: &kcl::Record)` | once per record, with its metadata (partition key, sequence number, arrival time) |
/// | `async fn handle(orders: Vec<Order>)` or `(orders: &[Order])` | once per batch, records in shard order |
/// | `async fn handle(orders: Vec<Order>, records: &[kcl::Record])` | once per batch, with the records |
///
/// It returns nothing, or `Result<(), E>` with `E` convertible into `kcl::error::BoxError`
/// (any `std::error::Error + Send + Sync + 'static`, `anyhow::Error`, `String`). Its future
/// must be `Send`.
///
/// # Codecs
///
/// | attribute | the record type | a record that does not decode |
/// |---|---|---|
/// | `#[kcl::handler]` or `#[kcl::handler(json)]` | any owned `serde::Deserialize` type (serde_json) | JSON of another shape |
/// | `#[kcl::handler(bytes)]` (the default for these types) | `bytes::Bytes`, `Vec<u8>`, `&[u8]` | never |
/// | `#[kcl::handler(text)]` (the default for `&str`) | `String`, `&str` | invalid UTF-8 |
///
/// A `String` record needs the codec named: `text` for the payload, `json` for a JSON string.
/// A record that is itself a JSON array decodes into a `Vec` of a batch handler: wrap it in a
/// `#[serde(transparent)]` newtype to take it per record.
///
/// # Checkpoints and errors
///
/// After each batch is handled the processor checkpoints it, and again at a graceful stop or
/// lease move, so neither repeats records. When the handler returns an error, the records of
/// the batch already handled are checkpointed and the error is **retryable**: the worker's
/// error policy retries from the record that failed (the default: with backoff, forever).
/// A record that does not decode is a **fatal** error naming the shard, sequence number,
/// sub-sequence number and partition key (`kcl::service::DecodeError`), logged at error
/// level after the records before it were handled and checkpointed; by default the shard
/// stops at it (its lease released, checkpointed just before it), `ErrorPolicy::handoff`
/// hands the batch to a dead-letter callback. Nothing is skipped silently, and nothing
/// panics. A handler that panics is a fatal error too.
///
/// # Misuse
///
/// Each mistake is a compile error that says what to write instead: a function that is not
/// `async`, takes no record, takes `self`, is generic, takes `&mut`, names an unknown codec,
/// asks `json` for raw bytes, or returns something other than `()` or `Result<(), E>`.
#[proc_macro_attribute]
pub fn handler(args: TokenStream, item: TokenStream) -> TokenStream {
    handler::expand(args.into(), item.into()).into()
}

/// Writes `fn main()` for a consumer service of a `#[kcl::handler]` function.
///
/// (Not compiled here, where kcl lacks its `aws` feature; `examples/macro_service.rs` is
/// this, compiled and run by the integration tests.)
///
/// ```ignore
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64 }
///
/// #[kcl::handler]
/// async fn handle(order: Order) {
///     println!("order {}", order.id);
/// }
///
/// kcl::service!(handle, app = "orders-app");
/// ```
///
/// `main` installs logging (`RUST_LOG`, default `info`), reads the flags, loads the standard
/// AWS configuration, and runs the worker until SIGINT or SIGTERM, then stops gracefully:
///
/// | flag | environment | default |
/// |---|---|---|
/// | `--stream <NAME>` | `KCL_STREAM` | option `stream`, else required |
/// | `--app <NAME>` | `KCL_APP` | option `app`, else required |
/// | `--table <NAME>` | `KCL_TABLE` | option `table`, else the application name |
/// | `--worker-id <ID>` | `KCL_WORKER_ID` | host name plus a random suffix |
/// | `--position <POS>` | `KCL_POSITION` | option `position` (a `kcl::InitialPosition`), else `trim-horizon` |
///
/// `--position` is `trim-horizon`, `latest` or `at-timestamp=<RFC 3339>`. The exit code is 0
/// after a graceful stop, 2 for an invalid flag or variable (the message names it), 1 if the
/// worker failed or a second signal cut the graceful stop short.
///
/// It expands to `kcl::service::Service::new(handle::factory())` with the options as
/// defaults, `.run()`: use `Service` directly for more settings (`configure`).
#[proc_macro]
pub fn service(input: TokenStream) -> TokenStream {
    service::expand(input.into()).into()
}
