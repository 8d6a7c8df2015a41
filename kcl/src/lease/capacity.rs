//! What lease-table requests cost, in the capacity units DynamoDB charges.
//!
//! DynamoDB bills (and throttles, per partition) reads in 4 KB units — half a unit for an
//! eventually consistent read — and writes in 1 KB units, rounded up per request:
//! - `GetItem`: the item's size; a `Scan`: the summed size of the items it reads;
//! - `PutItem`/`UpdateItem`: the larger of the item before and after the write; `DeleteItem`:
//!   the item's size; a write whose condition fails is charged as if it had been applied to
//!   the stored item.
//!
//! Item sizes follow DynamoDB's rules: an attribute costs the UTF-8 length of its name plus
//! its value — a string's UTF-8 length, a binary's length, a number's significant digits / 2
//! (rounded up) + 1, a set's elements summed.
//!
//! [`CapacityMeter`] sums the charges by operation; the in-memory store keeps one
//! (`MemLeaseStore::capacity`), so that tests, the simulation and the fleet benchmark can
//! report what a protocol would cost on DynamoDB.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::item::{AttrValue, Item};

/// A read's unit size.
const READ_UNIT: usize = 4096;
/// A write's unit size.
const WRITE_UNIT: usize = 1024;

/// The size DynamoDB accounts for `item`, in bytes.
///
/// ```
/// use kcl::lease::capacity::item_size;
/// use kcl::lease::item::{AttrValue, Item};
///
/// let mut item = Item::new();
/// item.insert("leaseKey".into(), AttrValue::S("shardId-000000000000".into()));
/// item.insert("leaseCounter".into(), AttrValue::N("12345".into()));
/// // 8 + 20 for the key; 12 + (5 digits → 3) + 1 for the counter
/// assert_eq!(item_size(&item), 28 + 16);
/// ```
pub fn item_size(item: &Item) -> usize {
    item.iter()
        .map(|(name, v)| name.len() + value_size(v))
        .sum()
}

fn value_size(v: &AttrValue) -> usize {
    match v {
        AttrValue::S(s) => s.len(),
        AttrValue::N(n) => number_size(n),
        AttrValue::Ss(ss) => ss.iter().map(String::len).sum(),
        AttrValue::B(b) => b.len(),
        // Booleans and nulls are 1 byte; lists and maps at least their 3-byte overhead.
        AttrValue::Other("BOOL" | "NULL") => 1,
        AttrValue::Other(_) => 3,
    }
}

/// A number's size: its significant digits (leading and trailing zeros dropped) / 2, rounded
/// up, plus 1.
fn number_size(n: &str) -> usize {
    let digits: String = n.chars().filter(char::is_ascii_digit).collect();
    let significant = digits.trim_start_matches('0').trim_end_matches('0').len();
    significant.div_ceil(2) + 1
}

/// The read units of reading `bytes` in one request (at least one unit).
///
/// ```
/// use kcl::lease::capacity::read_units;
/// assert_eq!(read_units(300, true), 1.0);
/// assert_eq!(read_units(300, false), 0.5);
/// assert_eq!(read_units(64 * 300, false), 2.5); // a scan of 64 items of 300 B
/// ```
pub fn read_units(bytes: usize, consistent: bool) -> f64 {
    let units = bytes.div_ceil(READ_UNIT).max(1) as f64;
    if consistent {
        units
    } else {
        units / 2.0
    }
}

/// The write units of writing an item of `bytes` (at least one unit).
///
/// ```
/// use kcl::lease::capacity::write_units;
/// assert_eq!(write_units(300), 1.0);
/// assert_eq!(write_units(1025), 2.0);
/// ```
pub fn write_units(bytes: usize) -> f64 {
    bytes.div_ceil(WRITE_UNIT).max(1) as f64
}

/// What one kind of request consumed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Consumed {
    /// Requests made.
    pub requests: u64,
    /// Read capacity units.
    pub read_units: f64,
    /// Write capacity units.
    pub write_units: f64,
}

impl Consumed {
    /// Read and write units together.
    pub fn units(&self) -> f64 {
        self.read_units + self.write_units
    }
}

/// Sums the capacity consumed by each operation (`renew`, `list`, `checkpoint`, …). Clones
/// share the sums.
#[derive(Clone, Debug, Default)]
pub struct CapacityMeter {
    by_op: Arc<Mutex<BTreeMap<String, Consumed>>>,
}

impl CapacityMeter {
    /// A meter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Charges a read of `bytes` by `op`.
    pub fn read(&self, op: &str, bytes: usize, consistent: bool) {
        self.charge(op, read_units(bytes, consistent), 0.0);
    }

    /// Charges a write of an item of `bytes` by `op`.
    pub fn write(&self, op: &str, bytes: usize) {
        self.charge(op, 0.0, write_units(bytes));
    }

    /// Charges units already counted (what DynamoDB reports in `ConsumedCapacity`).
    ///
    /// ```
    /// use kcl::lease::capacity::CapacityMeter;
    /// let meter = CapacityMeter::new();
    /// meter.charge_units("Scan", 2.5, 0.0);
    /// assert_eq!(meter.total().read_units, 2.5);
    /// ```
    pub fn charge_units(&self, op: &str, read_units: f64, write_units: f64) {
        self.charge(op, read_units, write_units);
    }

    fn charge(&self, op: &str, read: f64, write: f64) {
        let mut by_op = self.by_op.lock().unwrap_or_else(|p| p.into_inner());
        let c = by_op.entry(op.to_owned()).or_default();
        c.requests += 1;
        c.read_units += read;
        c.write_units += write;
    }

    /// The sums so far, by operation.
    pub fn snapshot(&self) -> BTreeMap<String, Consumed> {
        self.by_op.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Everything consumed so far.
    pub fn total(&self) -> Consumed {
        self.snapshot()
            .values()
            .fold(Consumed::default(), |mut t, c| {
                t.requests += c.requests;
                t.read_units += c.read_units;
                t.write_units += c.write_units;
                t
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_dynamodbs_rules() {
        #[rustfmt::skip]
        let table: [(&str, AttrValue, usize); 8] = [
            ("s", AttrValue::S("héllo".into()), 1 + 6),
            ("n", AttrValue::N("0".into()), 1 + 1),
            ("n", AttrValue::N("100".into()), 1 + 2),
            ("n", AttrValue::N("12345".into()), 1 + 4),
            ("n", AttrValue::N("49590338271490256608559692538361571095921575989136588898".into()), 1 + 29),
            ("ss", AttrValue::Ss(vec!["ab".into(), "cde".into()]), 2 + 5),
            ("b", AttrValue::B(vec![0; 10]), 1 + 10),
            ("bool", AttrValue::Other("BOOL"), 4 + 1),
        ];
        for (name, value, size) in table {
            let item: Item = [(name.to_owned(), value.clone())].into_iter().collect();
            assert_eq!(item_size(&item), size, "{name} = {value:?}");
        }
    }

    #[test]
    fn units_round_up_per_request() {
        #[rustfmt::skip]
        let reads = [
            // bytes, consistent, units
            (0, true, 1.0), (1, true, 1.0), (4096, true, 1.0), (4097, true, 2.0),
            (1, false, 0.5), (8192, false, 1.0), (8193, false, 1.5),
        ];
        for (bytes, consistent, units) in reads {
            assert_eq!(
                read_units(bytes, consistent),
                units,
                "{bytes} B, consistent {consistent}"
            );
        }
        for (bytes, units) in [(0, 1.0), (1024, 1.0), (1025, 2.0), (4000, 4.0)] {
            assert_eq!(write_units(bytes), units, "{bytes} B");
        }
    }

    #[test]
    fn the_meter_sums_by_operation() {
        let m = CapacityMeter::new();
        m.write("renew", 300);
        m.write("renew", 300);
        m.read("list", 64 * 300, true);
        let s = m.snapshot();
        assert_eq!(s["renew"].requests, 2);
        assert_eq!(s["renew"].write_units, 2.0);
        assert_eq!(s["list"].read_units, 5.0);
        assert_eq!(m.total().units(), 7.0);
    }
}
