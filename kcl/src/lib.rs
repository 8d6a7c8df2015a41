//! # kcl: a Kinesis consumer framework
//!
//! Implement [`RecordProcessor`], build a [`Worker`], run it. Workers of a fleet share a
//! DynamoDB(-compatible) lease table: each shard is leased to exactly one live worker, which
//! reads it, hands batches to your processor and stores checkpoints in the lease. Dead workers'
//! leases are taken over; after a split or merge, child shards start only once their parents
//! are finished, so per-partition-key order survives resharding. Records are processed at least
//! once and checkpoints never move backwards.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use kcl::testkit::MemBackends;
//! use kcl::{async_trait, Checkpointer, ProcessorError, RecordBatch, RecordProcessor, Worker};
//!
//! // 1. Implement the processor.
//! struct Print;
//! #[async_trait]
//! impl RecordProcessor for Print {
//!     async fn process_records(&mut self, batch: &RecordBatch, cp: &mut Checkpointer)
//!         -> Result<(), ProcessorError> {
//!         for r in batch {
//!             println!("{}: {:?}", r.partition_key, r.data);
//!         }
//!         // 2. Checkpoint once the batch is safely processed.
//!         cp.checkpoint().await.map_err(ProcessorError::retryable)
//!     }
//! }
//!
//! // 3. Choose the backends: in memory here; `kcl::Aws::from_conf(&sdk_config)` for AWS.
//! let backends = MemBackends::new();
//! backends.kinesis().create_stream("orders", 4);
//! backends.kinesis().put("orders", "customer-1", "hello");
//!
//! // 4. Build the worker (every field is validated here).
//! let worker = Worker::builder()
//!     .application_name("orders-app")
//!     .stream("orders")
//!     .backends(backends.clone())
//!     .processor(|| Print)
//!     .build()?;
//!
//! // 5. Run it; the handle stops it gracefully (checkpoint, then release the leases).
//! let stop = worker.shutdown_handle();
//! let running = tokio::spawn(worker.run());
//! # tokio::time::sleep(std::time::Duration::from_millis(300)).await;
//! stop.shutdown();
//! running.await??;
//! # Ok(())
//! # }
//! ```
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]

pub mod admin;
#[cfg(feature = "aws")]
mod aws;
mod backoff;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "aws")]
pub mod dead_letter;
pub mod error;
pub mod lease;
pub mod metrics;
pub mod processor;
pub mod producer;
pub mod record;
pub mod retrieval;
#[cfg(feature = "service")]
pub mod service;
pub mod shard;
pub mod stream;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod worker;

pub use async_trait::async_trait;
#[cfg(feature = "aws")]
pub use aws::Aws;
pub use checkpoint::{CheckpointError, CheckpointPolicy, Checkpointer, PendingCheckpoint};
pub use config::{
    ConfigError, Heartbeat, InitialPosition, LeaseLiveness, LeaseTableOptions, PollingConfig,
    Retrieval, TableEncryption, WorkerConfig,
};
pub use error::{Error, Result};
#[cfg(feature = "macros")]
pub use kcl_macros::{handler, service};
pub use lease::{Lease, LeaseStore, LeaseStoreError, WorkerId};
pub use processor::{ErrorPolicy, ProcessorError, ProcessorFactory, RecordProcessor, ShardContext};
pub use record::{ExtendedSequenceNumber, Record, RecordBatch, SequenceNumber};
pub use retrieval::{KinesisApi, KinesisApiError};
pub use shard::ShardId;
pub use worker::{Backends, ShutdownHandle, StatusHandle, Worker, WorkerBuilder, WorkerStatus};
