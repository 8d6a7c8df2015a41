//! Record codecs: how a record's payload becomes the value a handler takes.
//!
//! A codec is a marker type; [`Decode<'r, C>`](Decode) says which types codec `C` produces.
//! `#[kcl::handler(json)]`, `(bytes)` and `(text)` pick [`Json`], [`Raw`] and [`Text`]:
//!
//! | codec | the handler takes | fails when |
//! |---|---|---|
//! | [`Json`] (the default) | any owned type that implements `serde::Deserialize` | the payload is not JSON of that type |
//! | [`Raw`] (`bytes`) | `bytes::Bytes`, `Vec<u8>` or `&[u8]` | never |
//! | [`Text`] (`text`) | `String` or `&str` | the payload is not UTF-8 |
//!
//! The same functions serve hand-written [`Handler`](super::Handler)s:
//!
//! ```
//! use kcl::service::codec::{Decode, Json};
//! use kcl::{Record, SequenceNumber};
//!
//! #[derive(serde::Deserialize, Debug, PartialEq)]
//! struct Order { id: u64 }
//!
//! let record = Record::new(r#"{"id":7}"#.into(), "key", SequenceNumber::from_u128(1), None);
//! let order = <Order as Decode<'_, Json>>::decode(&record)?;
//! assert_eq!(order, Order { id: 7 });
//!
//! let bad = Record::new("{oops".into(), "key", SequenceNumber::from_u128(2), None);
//! let err = <Order as Decode<'_, Json>>::decode(&bad).unwrap_err();
//! assert!(err.to_string().contains("not valid JSON"), "{err}");
//! # Ok::<(), kcl::service::codec::CodecError>(())
//! ```

use bytes::Bytes;

use crate::error::BoxError;
use crate::record::Record;

/// The JSON codec (serde_json): the payload is one JSON value of the handler's type (see the
/// [module docs](self) for an example).
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub struct Json;

/// The raw codec (`#[kcl::handler(bytes)]`): the payload as it is.
///
/// ```
/// use kcl::service::codec::{Decode, Raw};
/// let record = kcl::Record::new(vec![0xff, 0].into(), "k", kcl::SequenceNumber::from_u128(1), None);
/// assert_eq!(<&[u8] as Decode<'_, Raw>>::decode(&record)?, [0xff, 0]);
/// # Ok::<(), kcl::service::codec::CodecError>(())
/// ```
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub struct Raw;

/// The text codec (`#[kcl::handler(text)]`): the payload as UTF-8 text.
///
/// ```
/// use kcl::service::codec::{Decode, Text};
/// let record = kcl::Record::new("grüße".into(), "k", kcl::SequenceNumber::from_u128(1), None);
/// assert_eq!(<&str as Decode<'_, Text>>::decode(&record)?, "grüße");
/// let bad = kcl::Record::new(vec![0xff].into(), "k", kcl::SequenceNumber::from_u128(2), None);
/// assert!(<String as Decode<'_, Text>>::decode(&bad).is_err());
/// # Ok::<(), kcl::service::codec::CodecError>(())
/// ```
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub struct Text;

/// A payload the codec could not decode. Its [`source`](std::error::Error::source) is the
/// codec's own error (serde_json's, with line and column, or a UTF-8 error).
#[derive(Debug, thiserror::Error)]
#[error("the payload is not valid {codec} for `{target}`")]
pub struct CodecError {
    codec: &'static str,
    target: &'static str,
    #[source]
    source: BoxError,
}

impl CodecError {
    /// An error of codec `codec` (e.g. `"JSON"`) decoding into `target` (a type name).
    pub fn new(codec: &'static str, target: &'static str, source: impl Into<BoxError>) -> Self {
        Self {
            codec,
            target,
            source: source.into(),
        }
    }

    /// The codec's name, e.g. `"JSON"`.
    pub fn codec(&self) -> &'static str {
        self.codec
    }

    /// The type the payload was to become.
    pub fn target(&self) -> &'static str {
        self.target
    }
}

/// Decodes a record into `Self` with codec `C`. The lifetime lets `&[u8]` and `&str` borrow
/// the payload.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a record type of the `{C}` codec",
    label = "cannot be decoded by this codec",
    note = "#[kcl::handler] or #[kcl::handler(json)]: an owned type that implements `serde::Deserialize`",
    note = "#[kcl::handler(bytes)]: `bytes::Bytes`, `Vec<u8>` or `&[u8]`",
    note = "#[kcl::handler(text)]: `String` or `&str`"
)]
pub trait Decode<'r, C>: Sized {
    /// Decodes `record`'s payload.
    ///
    /// # Errors
    /// [`CodecError`] if the payload is not valid for the codec and type.
    fn decode(record: &'r Record) -> Result<Self, CodecError>;
}

impl<'r, T> Decode<'r, Json> for T
where
    T: serde::de::DeserializeOwned,
{
    fn decode(record: &'r Record) -> Result<Self, CodecError> {
        serde_json::from_slice(&record.data)
            .map_err(|e| CodecError::new("JSON", std::any::type_name::<T>(), e))
    }
}

impl<'r> Decode<'r, Raw> for Bytes {
    fn decode(record: &'r Record) -> Result<Self, CodecError> {
        Ok(record.data.clone())
    }
}

impl<'r> Decode<'r, Raw> for &'r [u8] {
    fn decode(record: &'r Record) -> Result<Self, CodecError> {
        Ok(&record.data)
    }
}

impl<'r> Decode<'r, Raw> for Vec<u8> {
    fn decode(record: &'r Record) -> Result<Self, CodecError> {
        Ok(record.data.to_vec())
    }
}

impl<'r> Decode<'r, Text> for &'r str {
    fn decode(record: &'r Record) -> Result<Self, CodecError> {
        std::str::from_utf8(&record.data).map_err(|e| CodecError::new("UTF-8", "&str", e))
    }
}

impl<'r> Decode<'r, Text> for String {
    fn decode(record: &'r Record) -> Result<Self, CodecError> {
        <&str as Decode<'r, Text>>::decode(record)
            .map(str::to_owned)
            .map_err(|e| CodecError {
                target: "String",
                ..e
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SequenceNumber;

    fn record(data: &'static [u8]) -> Record {
        Record::new(
            Bytes::from_static(data),
            "k",
            SequenceNumber::from_u128(1),
            None,
        )
    }

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Order {
        id: u64,
    }

    #[test]
    fn json_decodes_or_names_the_type_and_keeps_the_serde_error() {
        let ok = record(br#"{"id": 3}"#);
        assert_eq!(
            <Order as Decode<'_, Json>>::decode(&ok).unwrap(),
            Order { id: 3 }
        );
        let bad = record(b"{\"id\": \"x\"}");
        let err = <Order as Decode<'_, Json>>::decode(&bad).unwrap_err();
        assert_eq!(err.codec(), "JSON");
        assert!(err.target().ends_with("Order"), "{}", err.target());
        let source = std::error::Error::source(&err)
            .expect("the serde error")
            .to_string();
        assert!(source.contains("line 1 column"), "{source}");
    }

    #[test]
    fn raw_is_the_payload_and_text_checks_utf8() {
        let r = record(b"\xff\x00abc");
        assert_eq!(
            <Bytes as Decode<'_, Raw>>::decode(&r).unwrap(),
            &b"\xff\x00abc"[..]
        );
        assert_eq!(
            <&[u8] as Decode<'_, Raw>>::decode(&r).unwrap(),
            b"\xff\x00abc"
        );
        assert_eq!(<Vec<u8> as Decode<'_, Raw>>::decode(&r).unwrap().len(), 5);
        let err = <String as Decode<'_, Text>>::decode(&r).unwrap_err();
        assert_eq!((err.codec(), err.target()), ("UTF-8", "String"));
        let ok = record("grüße".as_bytes());
        assert_eq!(<&str as Decode<'_, Text>>::decode(&ok).unwrap(), "grüße");
        assert_eq!(<String as Decode<'_, Text>>::decode(&ok).unwrap(), "grüße");
    }
}
