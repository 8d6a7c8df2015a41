//! Every supported handler form and the generated factories. (`kcl::service!` needs kcl's
//! `aws` feature, which these tests leave out to build fast: the example `macro_service`
//! compiles it, and its options are checked in `src/service.rs`.)
use bytes::Bytes;
use kcl::service::{Delivery, Handler, HandlerFactory};
use kcl::Record;

#[derive(serde::Deserialize)]
pub struct Order {
    pub id: u64,
}

#[derive(Debug)]
pub struct MyError;
impl std::fmt::Display for MyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("my error")
    }
}
impl std::error::Error for MyError {}

#[kcl::handler]
async fn json_record(order: Order) -> Result<(), MyError> {
    let _ = order.id;
    Ok(())
}

#[kcl::handler(json)]
pub async fn json_record_meta(order: Order, record: &kcl::Record) -> Result<(), String> {
    let _ = (order.id, &record.partition_key);
    Ok(())
}

/// Infallible, documented, public.
#[kcl::handler]
pub async fn infallible(_order: Order) {}

#[kcl::handler]
async fn json_batch(orders: Vec<Order>) -> std::io::Result<()> {
    let _ = orders.len();
    Ok(())
}

#[kcl::handler]
async fn json_slice_meta(orders: &[Order], records: &[Record]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    assert_eq!(orders.len(), records.len());
    Ok(())
}

#[kcl::handler]
async fn raw_bytes(data: Bytes) {
    let _ = data;
}

#[kcl::handler(bytes)]
async fn raw_slice(data: &[u8], record: &Record) {
    let _ = (data, record);
}

#[kcl::handler]
async fn raw_vec(data: Vec<u8>) {
    let _ = data;
}

#[kcl::handler(bytes)]
async fn raw_batch(batch: Vec<Bytes>) {
    let _ = batch;
}

#[kcl::handler]
async fn text_str(line: &str) {
    let _ = line;
}

#[kcl::handler(text)]
async fn text_string(line: String) {
    let _ = line;
}

#[kcl::handler(text)]
async fn text_batch(lines: &[&str]) {
    let _ = lines;
}

/// A JSON string, asked for explicitly.
#[kcl::handler(json)]
async fn json_string(s: String) {
    let _ = s;
}

/// A type alias: the codec is named, the type checker judges.
type Payload = Bytes;

#[kcl::handler(bytes)]
async fn aliased(p: Payload) {
    let _ = p;
}

/// Patterns in parameters.
#[kcl::handler]
async fn destructured(Order { id }: Order) {
    let _ = id;
}

/// Handler and local names that the expansion also uses.
#[kcl::handler]
async fn record(items: Order, records: &Record) {
    let _ = (items, records);
}

fn assert_delivery<H: Handler>(expected: Delivery) {
    assert_eq!(H::DELIVERY, expected);
}

fn main() {
    // The functions are still functions.
    let _ = json_record(Order { id: 1 });
    // The factories are processor factories.
    let _ = kcl::Worker::builder().processor(json_record::factory());
    let _: HandlerFactory<raw_bytes> = raw_bytes::factory();
    let _ = (json_record_meta::factory(), infallible::factory(), json_batch::factory());
    let _ = (json_slice_meta::factory(), raw_slice::factory(), raw_vec::factory());
    let _ = (raw_batch::factory(), text_str::factory(), text_string::factory());
    let _ = (text_batch::factory(), json_string::factory(), aliased::factory());
    let _ = (destructured::factory(), record::factory());
    assert_delivery::<json_record>(Delivery::Record);
    assert_delivery::<json_batch>(Delivery::Batch);
    assert_delivery::<json_slice_meta>(Delivery::Batch);
    assert_delivery::<raw_vec>(Delivery::Record);
    assert_delivery::<raw_batch>(Delivery::Batch);
    assert_delivery::<text_batch>(Delivery::Batch);
}
