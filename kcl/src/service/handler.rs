//! Handlers: a function of a decoded record (or batch) turned into a [`RecordProcessor`].
//!
//! `#[kcl::handler]` implements [`Handler`] for a function; you can implement it by hand for a
//! handler with state (a client, a connection pool). [`HandlerFactory`] hands one
//! [`HandlerProcessor`] per shard lease to the worker; the processor
//!
//! - decodes each record and calls the handler, per record or per batch ([`Delivery`]);
//! - checkpoints after every batch handled, and in `shutdown_requested`, so a graceful stop or
//!   a planned lease move repeats nothing;
//! - turns a handler error into a **retryable** [`ProcessorError`] (a [`HandlerError`] naming
//!   the records), after checkpointing the records of the batch already handled: a retry
//!   starts at the record that failed, not at the top of the batch;
//! - turns a record that does not decode into a **fatal** [`ProcessorError`] (a
//!   [`DecodeError`] naming the shard, sequence number, sub-sequence number and partition
//!   key), after handing over and checkpointing the records before it. It is logged, and the
//!   worker's [`ErrorPolicy`](crate::ErrorPolicy) decides what follows: the default stops
//!   the shard at that record; [`ErrorPolicy::handoff`](crate::ErrorPolicy::handoff) gives
//!   the whole batch to a dead-letter callback, where [`DecodeError::handled`] tells the
//!   records handled (up to the bad one) from those that were not (after it). The record is
//!   never skipped silently.
//!
//! A panicking handler is caught by the worker and treated as a fatal error.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use tracing::{debug, error};

use crate::checkpoint::Checkpointer;
use crate::error::BoxError;
use crate::processor::{ProcessorError, ProcessorFactory, RecordProcessor};
use crate::record::{ExtendedSequenceNumber, Record, RecordBatch};
use crate::shard::ShardId;

/// The future a [`Handler`] returns.
pub type HandlerFuture<'r> = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'r>>;

/// Whether a [`Handler`] takes one record at a time or whole batches.
///
/// ```
/// use kcl::service::Delivery;
/// fn unit(d: Delivery) -> &'static str {
///     match d {
///         Delivery::Record => "record",
///         Delivery::Batch => "batch",
///         _ => "other",
///     }
/// }
/// assert_eq!(unit(Delivery::Batch), "batch");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// One record per call (`async fn handle(order: Order)`).
    Record,
    /// The decoded records of a batch per call (`async fn handle(orders: Vec<Order>)`).
    Batch,
}

/// A function of decoded records, run by a [`HandlerProcessor`]. `#[kcl::handler]`
/// implements it; implement it by hand for a handler with state.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use kcl::error::BoxError;
/// use kcl::service::codec::{Decode, Json};
/// use kcl::service::{Delivery, Handler, HandlerFactory, HandlerFuture};
/// use kcl::Record;
///
/// #[derive(serde::Deserialize)]
/// struct Order { amount: u64 }
///
/// /// Sums the amounts of all orders, over every shard this worker holds.
/// #[derive(Default)]
/// struct Total(AtomicU64);
///
/// impl Handler for Total {
///     type Item<'r> = Order;
///     const DELIVERY: Delivery = Delivery::Batch;
///
///     fn decode<'r>(&self, record: &'r Record) -> Result<Order, BoxError> {
///         Ok(<Order as Decode<'r, Json>>::decode(record)?)
///     }
///
///     fn handle<'r>(&'r self, orders: Vec<Order>, _records: &'r [Record]) -> HandlerFuture<'r> {
///         Box::pin(async move {
///             let sum: u64 = orders.iter().map(|o| o.amount).sum();
///             self.0.fetch_add(sum, Ordering::Relaxed);
///             Ok(())
///         })
///     }
/// }
///
/// let factory = HandlerFactory::new(Total::default()); // `.processor(factory)` on a builder
/// # let _ = factory;
/// ```
pub trait Handler: Send + Sync + 'static {
    /// What one record decodes into; may borrow the record (`&'r [u8]`, `&'r str`).
    type Item<'r>: Send;

    /// One record per call, or batches.
    const DELIVERY: Delivery;

    /// Decodes one record (typically with a [codec](super::codec)).
    ///
    /// # Errors
    /// The record cannot be decoded: a fatal error of its shard (see the [module
    /// docs](self)).
    fn decode<'r>(&self, record: &'r Record) -> Result<Self::Item<'r>, BoxError>;

    /// Handles `items`, decoded from `records` (as many, in shard order). With
    /// [`Delivery::Record`] both hold exactly one element.
    ///
    /// # Errors
    /// Any error: retried by the worker's error policy (the default retries with backoff).
    fn handle<'r>(&'r self, items: Vec<Self::Item<'r>>, records: &'r [Record])
        -> HandlerFuture<'r>;
}

/// What a handler function may return: nothing, or `Result<(), E>` with `E` convertible into
/// a [`BoxError`] (any `std::error::Error + Send + Sync + 'static`, `anyhow::Error`,
/// `String`, `&'static str`).
///
/// ```
/// use kcl::service::HandlerOutput;
/// assert!(().into_result().is_ok());
/// assert!(Err::<(), _>("downstream unavailable").into_result().is_err());
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a valid return type for a #[kcl::handler]",
    label = "return nothing or `Result<(), E>`",
    note = "a #[kcl::handler] returns nothing, or `Result<(), E>` where `E: Into<kcl::error::BoxError>` (any `std::error::Error + Send + Sync + 'static`, `anyhow::Error`, `String`)"
)]
pub trait HandlerOutput {
    /// The result, with the error boxed.
    ///
    /// # Errors
    /// The handler's error.
    fn into_result(self) -> Result<(), BoxError>;
}

impl HandlerOutput for () {
    fn into_result(self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl<E: Into<BoxError>> HandlerOutput for Result<(), E> {
    fn into_result(self) -> Result<(), BoxError> {
        self.map_err(Into::into)
    }
}

/// A record that could not be decoded: a fatal error of its shard. Find it as the
/// [`source`](std::error::Error::source) of the [`ProcessorError`] (e.g. in an
/// [`ErrorPolicy::handoff`](crate::ErrorPolicy::handoff) callback, to dead-letter the
/// record); its own source is the codec's error.
///
/// ```
/// # fn demo(e: &kcl::ProcessorError) {
/// use kcl::service::DecodeError;
/// if let Some(bad) = std::error::Error::source(e).and_then(|s| s.downcast_ref::<DecodeError>()) {
///     eprintln!("dead-lettering {} of {}", bad.position(), bad.shard_id());
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[error(
    "record {position} of shard {shard_id} (partition key {partition_key:?}) could not be decoded"
)]
pub struct DecodeError {
    shard_id: ShardId,
    position: ExtendedSequenceNumber,
    partition_key: String,
    handled: Option<ExtendedSequenceNumber>,
    #[source]
    source: BoxError,
}

impl DecodeError {
    fn new(
        shard_id: &ShardId,
        record: &Record,
        handled: Option<ExtendedSequenceNumber>,
        source: BoxError,
    ) -> Self {
        Self {
            shard_id: shard_id.clone(),
            position: record.position(),
            partition_key: record.partition_key.clone(),
            handled,
            source,
        }
    }

    /// The last record handled before this one (and checkpointed), if any. An
    /// [`ErrorPolicy::handoff`](crate::ErrorPolicy::handoff) callback gets the whole batch:
    /// its records up to this one were handled, those after [`position`](Self::position)
    /// were not.
    pub fn handled(&self) -> Option<&ExtendedSequenceNumber> {
        self.handled.as_ref()
    }

    /// The record's shard.
    pub fn shard_id(&self) -> &ShardId {
        &self.shard_id
    }

    /// The record's sequence and sub-sequence number.
    pub fn position(&self) -> &ExtendedSequenceNumber {
        &self.position
    }

    /// The record's partition key.
    pub fn partition_key(&self) -> &str {
        &self.partition_key
    }
}

/// The handler returned an error (retryable). Its [`source`](std::error::Error::source) is
/// the handler's error.
///
/// ```
/// # fn demo(e: &kcl::ProcessorError) {
/// use kcl::service::HandlerError;
/// if let Some(failed) = std::error::Error::source(e).and_then(|s| s.downcast_ref::<HandlerError>()) {
///     eprintln!("{} records from {} of {} failed", failed.records(), failed.first(), failed.shard_id());
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[error("the handler failed on {} of shard {shard_id}", Records(*.records, .first, .last))]
pub struct HandlerError {
    shard_id: ShardId,
    first: ExtendedSequenceNumber,
    last: ExtendedSequenceNumber,
    records: usize,
    #[source]
    source: BoxError,
}

/// "record A" or "n records A..=B".
struct Records<'a>(
    usize,
    &'a ExtendedSequenceNumber,
    &'a ExtendedSequenceNumber,
);

impl fmt::Display for Records<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Records(1, first, _) => write!(f, "record {first}"),
            Records(n, first, last) => write!(f, "{n} records {first}..={last}"),
        }
    }
}

impl HandlerError {
    fn new(shard_id: &ShardId, records: &[Record], source: BoxError) -> Self {
        let position =
            |r: Option<&Record>| r.map_or(ExtendedSequenceNumber::TrimHorizon, Record::position);
        Self {
            shard_id: shard_id.clone(),
            first: position(records.first()),
            last: position(records.last()),
            records: records.len(),
            source,
        }
    }

    /// The shard.
    pub fn shard_id(&self) -> &ShardId {
        &self.shard_id
    }

    /// The first record handed to the failed call.
    pub fn first(&self) -> &ExtendedSequenceNumber {
        &self.first
    }

    /// The last record handed to the failed call (the first, per record).
    pub fn last(&self) -> &ExtendedSequenceNumber {
        &self.last
    }

    /// How many records the failed call had.
    pub fn records(&self) -> usize {
        self.records
    }
}

/// Creates one [`HandlerProcessor`] per shard lease, all sharing one handler. `#[kcl::handler]`
/// functions give one with `handle::factory()`.
///
/// ```
/// # use kcl::service::{Delivery, Handler, HandlerFuture};
/// # struct Noop;
/// # impl Handler for Noop {
/// #     type Item<'r> = &'r [u8];
/// #     const DELIVERY: Delivery = Delivery::Record;
/// #     fn decode<'r>(&self, r: &'r kcl::Record) -> Result<&'r [u8], kcl::error::BoxError> { Ok(&r.data) }
/// #     fn handle<'r>(&'r self, _: Vec<&'r [u8]>, _: &'r [kcl::Record]) -> HandlerFuture<'r> { Box::pin(async { Ok(()) }) }
/// # }
/// let builder = kcl::Worker::builder().processor(kcl::service::HandlerFactory::new(Noop));
/// # let _ = builder;
/// ```
pub struct HandlerFactory<H> {
    handler: Arc<H>,
}

impl<H> HandlerFactory<H> {
    /// A factory for `handler`.
    pub fn new(handler: H) -> Self {
        Self::shared(Arc::new(handler))
    }

    /// A factory for a handler shared with other code.
    pub fn shared(handler: Arc<H>) -> Self {
        Self { handler }
    }
}

impl<H> Clone for HandlerFactory<H> {
    fn clone(&self) -> Self {
        Self {
            handler: self.handler.clone(),
        }
    }
}

impl<H> fmt::Debug for HandlerFactory<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HandlerFactory<{}>", std::any::type_name::<H>())
    }
}

impl<H: Handler> ProcessorFactory for HandlerFactory<H> {
    fn create(&self, _shard: &ShardId) -> Box<dyn RecordProcessor> {
        Box::new(HandlerProcessor::shared(self.handler.clone()))
    }
}

/// The [`RecordProcessor`] that runs a [`Handler`] on one shard (see the [module
/// docs](self) for what it checkpoints and how it fails). [`HandlerFactory`] creates them;
/// build one yourself to wrap it in a processor of your own.
///
/// ```
/// # use kcl::service::{Delivery, Handler, HandlerFuture};
/// # struct Noop;
/// # impl Handler for Noop {
/// #     type Item<'r> = &'r [u8];
/// #     const DELIVERY: Delivery = Delivery::Record;
/// #     fn decode<'r>(&self, r: &'r kcl::Record) -> Result<&'r [u8], kcl::error::BoxError> { Ok(&r.data) }
/// #     fn handle<'r>(&'r self, _: Vec<&'r [u8]>, _: &'r [kcl::Record]) -> HandlerFuture<'r> { Box::pin(async { Ok(()) }) }
/// # }
/// use kcl::service::HandlerProcessor;
/// let builder = kcl::Worker::builder().processor(|| HandlerProcessor::new(Noop));
/// # let _ = builder;
/// ```
pub struct HandlerProcessor<H> {
    handler: Arc<H>,
    /// The last record handled (its call returned `Ok`): a retried batch starts after it.
    handled: Option<ExtendedSequenceNumber>,
}

impl<H> fmt::Debug for HandlerProcessor<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerProcessor")
            .field("handler", &std::any::type_name::<H>())
            .field("handled", &self.handled)
            .finish()
    }
}

impl<H: Handler> HandlerProcessor<H> {
    /// A processor running `handler`.
    pub fn new(handler: H) -> Self {
        Self::shared(Arc::new(handler))
    }

    /// A processor running a shared handler.
    pub fn shared(handler: Arc<H>) -> Self {
        Self {
            handler,
            handled: None,
        }
    }

    /// One call per record; stops at the first failure.
    async fn per_record(&mut self, shard: &ShardId, todo: &[Record]) -> Result<(), ProcessorError> {
        for record in todo {
            let one = std::slice::from_ref(record);
            let item = self
                .handler
                .decode(record)
                .map_err(|e| decode_failed(shard, record, self.handled.clone(), e))?;
            self.handler
                .handle(vec![item], one)
                .await
                .map_err(|e| ProcessorError::retryable(HandlerError::new(shard, one, e)))?;
            self.handled = Some(record.position());
        }
        Ok(())
    }

    /// One call for the records decoded, up to the first that does not decode.
    async fn per_batch(&mut self, shard: &ShardId, todo: &[Record]) -> Result<(), ProcessorError> {
        let mut items = Vec::with_capacity(todo.len());
        let mut undecodable = None;
        for record in todo {
            match self.handler.decode(record) {
                Ok(item) => items.push(item),
                Err(e) => {
                    undecodable = Some((record, e));
                    break;
                }
            }
        }
        let decoded = &todo[..items.len()];
        if let Some(last) = decoded.last() {
            self.handler
                .handle(items, decoded)
                .await
                .map_err(|e| ProcessorError::retryable(HandlerError::new(shard, decoded, e)))?;
            self.handled = Some(last.position());
        }
        match undecodable {
            Some((record, e)) => Err(decode_failed(shard, record, self.handled.clone(), e)),
            None => Ok(()),
        }
    }

    /// After a failure: checkpoints the records of `batch` handled before it (best effort).
    async fn checkpoint_handled(&self, batch: &RecordBatch, cp: &mut Checkpointer) {
        let (Some(handled), Some(first)) = (&self.handled, batch.records.first()) else {
            return;
        };
        if *handled < first.position() {
            return; // nothing of this batch was handled
        }
        if let Err(e) = cp.checkpoint_at(handled.clone()).await {
            debug!(error = %e, "checkpointing the records handled before the failure failed");
        }
    }
}

fn decode_failed(
    shard: &ShardId,
    record: &Record,
    handled: Option<ExtendedSequenceNumber>,
    source: BoxError,
) -> ProcessorError {
    let e = DecodeError::new(shard, record, handled, source);
    error!(
        shard_id = %shard,
        sequence_number = %record.sequence_number,
        sub_sequence_number = record.sub_sequence_number,
        partition_key = %record.partition_key,
        error = %Chain(&e),
        "a record could not be decoded: a fatal error, handed to the error policy (by default the \
         shard stops at this record, checkpointed just before it)"
    );
    ProcessorError::fatal(e)
}

/// An error and its sources, `: `-separated.
struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[async_trait]
impl<H: Handler> RecordProcessor for HandlerProcessor<H> {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        // A retried batch: the records handled before the failure are not handled again.
        let skip = match &self.handled {
            Some(handled) => batch.records.partition_point(|r| r.position() <= *handled),
            None => 0,
        };
        let todo = &batch.records[skip..];
        let result = match H::DELIVERY {
            Delivery::Record => self.per_record(&batch.shard_id, todo).await,
            Delivery::Batch => self.per_batch(&batch.shard_id, todo).await,
        };
        match result {
            Ok(()) => Ok(cp.checkpoint().await?),
            Err(e) => {
                self.checkpoint_handled(batch, cp).await;
                Err(e)
            }
        }
    }

    async fn shutdown_requested(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        // Every batch processed: usually stored already, unless its checkpoint failed. After a
        // failure the stored checkpoint may be further (the records handled before it).
        let Some(processed) = cp.last_processed().cloned() else {
            return Ok(());
        };
        if cp.current().await >= processed {
            return Ok(());
        }
        Ok(cp.checkpoint_at(processed).await?)
    }
}
