//! [`PutRecords`] for the in-memory Kinesis.

use async_trait::async_trait;

use super::{PutRecords, PutRecordsEntry, PutRecordsResult};
use crate::retrieval::KinesisApiError;
use crate::testkit::fault::{FaultKind, Injected};
use crate::testkit::MemKinesis;

/// Stores every entry (routed by its explicit hash key, else the MD5 of its partition key) with
/// [`MemKinesis::put_many`]. Fault rules on the operation `"put_records"` fail the whole call
/// ([`Faults`](crate::testkit::Faults)); to reject single entries, wrap it.
#[async_trait]
impl PutRecords for MemKinesis {
    async fn put_records(
        &self,
        stream: &str,
        entries: &[PutRecordsEntry],
    ) -> Result<Vec<PutRecordsResult>, KinesisApiError> {
        if let Err(Injected::Fail(kind)) = self.faults().check("put_records").await {
            return Err(match kind {
                FaultKind::Throttle => KinesisApiError::Throttled("injected throttle".into()),
                FaultKind::Fatal => KinesisApiError::Other("injected fatal error".into()),
                _ => KinesisApiError::Transient("injected transient error".into()),
            });
        }
        let stored = self.put_many(
            stream,
            entries
                .iter()
                .map(|e| (e.partition_key.as_str(), e.hash_key(), e.data.clone())),
        )?;
        Ok(stored
            .into_iter()
            .map(|(shard_id, sequence_number)| PutRecordsResult::Accepted {
                shard_id,
                sequence_number,
            })
            .collect())
    }
}
