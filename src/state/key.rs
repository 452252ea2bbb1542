//! Hashable key values extracted from Arrow arrays (primary keys, index keys).

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Int16Type, Int32Type, Int64Type};
use std::sync::Arc;

/// A key value. Integer widths are unified so that `loan.client_id int4` matches
/// `user.id int8`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Null,
    Int(i64),
    Text(Arc<str>),
    Tuple(Box<[Key]>),
}

/// Can `data_type` be used as a key or index column?
pub fn is_key_type(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Int16 | DataType::Int32 | DataType::Int64 | DataType::Utf8 | DataType::Date32
    )
}

/// The key of row `i` of `array` (which must have a key type).
pub fn key_at(array: &ArrayRef, i: usize) -> Key {
    if array.is_null(i) {
        return Key::Null;
    }
    match array.data_type() {
        DataType::Int16 => Key::Int(array.as_primitive::<Int16Type>().value(i) as i64),
        DataType::Int32 => Key::Int(array.as_primitive::<Int32Type>().value(i) as i64),
        DataType::Int64 => Key::Int(array.as_primitive::<Int64Type>().value(i)),
        DataType::Date32 => Key::Int(
            array
                .as_primitive::<arrow::datatypes::Date32Type>()
                .value(i) as i64,
        ),
        DataType::Utf8 => Key::Text(array.as_string::<i32>().value(i).into()),
        other => unreachable!("validated key type, got {other}"),
    }
}

/// The key made of `columns` at row `i` (a tuple only for composite keys).
pub(crate) fn composite_key_at(columns: &[&ArrayRef], i: usize) -> Key {
    match columns {
        [one] => key_at(one, i),
        many => Key::Tuple(many.iter().map(|c| key_at(c, i)).collect()),
    }
}

impl Key {
    /// From a DataFusion literal, for filter push-down.
    pub fn from_scalar(v: &datafusion::scalar::ScalarValue) -> Option<Key> {
        use datafusion::scalar::ScalarValue as S;
        Some(match v {
            S::Int8(Some(x)) => Key::Int(*x as i64),
            S::Int16(Some(x)) => Key::Int(*x as i64),
            S::Int32(Some(x)) => Key::Int(*x as i64),
            S::Int64(Some(x)) => Key::Int(*x),
            S::UInt8(Some(x)) => Key::Int(*x as i64),
            S::UInt16(Some(x)) => Key::Int(*x as i64),
            S::UInt32(Some(x)) => Key::Int(*x as i64),
            S::Date32(Some(x)) => Key::Int(*x as i64),
            S::Utf8(Some(s)) | S::LargeUtf8(Some(s)) | S::Utf8View(Some(s)) => {
                Key::Text(s.as_str().into())
            }
            _ => return None,
        })
    }
}
