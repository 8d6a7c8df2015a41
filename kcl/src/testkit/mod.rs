//! In-memory backends and test helpers (feature `testkit`).
//!
//! [`MemKinesis`] and [`MemLeaseStore`] implement the same seams as the AWS backends, with the
//! same semantics (the lease store passes the same conformance suite as DynamoDB), plus test
//! controls (`put`, `split`, `merge`, `trim_before`, raw items) and [`Faults`]. They power the
//! quickstart, the unit tests, deterministic simulation and your own tests of your processors.

pub mod conformance;
pub mod fault;
mod harness;
mod mem_kinesis;
mod mem_lease;
mod protocol_fleet;
pub mod sim;

use std::sync::Arc;

use async_trait::async_trait;

pub use fault::{Fault, FaultKind, Faults};
pub use harness::{ProcessorHarness, Stored};
pub use mem_kinesis::MemKinesis;
pub use mem_lease::MemLeaseStore;
pub use protocol_fleet::ProtocolFleet;

use crate::checkpoint::Checkpointer;
use crate::lease::LeaseStore;
use crate::processor::{ProcessorError, RecordProcessor};
use crate::record::RecordBatch;
use crate::retrieval::KinesisApi;
use crate::worker::Backends;

/// In-memory Kinesis plus one in-memory lease table, shared by every worker built from a
/// clone. (Every table name maps to the same table.)
#[derive(Clone, Debug, Default)]
pub struct MemBackends {
    kinesis: MemKinesis,
    leases: MemLeaseStore,
}

impl MemBackends {
    /// Fresh, empty backends.
    pub fn new() -> Self {
        Self::default()
    }

    /// The in-memory Kinesis (to create streams, put records, reshard).
    pub fn kinesis(&self) -> &MemKinesis {
        &self.kinesis
    }

    /// The in-memory lease table.
    pub fn leases(&self) -> &MemLeaseStore {
        &self.leases
    }
}

impl Backends for MemBackends {
    fn kinesis(&self) -> Arc<dyn KinesisApi> {
        Arc::new(self.kinesis.clone())
    }

    fn lease_store(&self, _table: &str) -> Arc<dyn LeaseStore> {
        Arc::new(self.leases.clone())
    }
}

/// A processor that checkpoints every batch and does nothing else (for benchmarks and tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopProcessor;

#[async_trait]
impl RecordProcessor for NoopProcessor {
    async fn process_records(
        &mut self,
        _batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        cp.checkpoint().await?;
        Ok(())
    }
}
