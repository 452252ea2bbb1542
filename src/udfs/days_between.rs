//! `days_between(later, earlier)`: whole days from `earlier` to `later` (dates), NULL
//! if either is NULL.

use arrow::array::{Array, AsArray, Int32Array};
use arrow::datatypes::{DataType, Date32Type};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};
use std::sync::Arc;

#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct DaysBetween {
    signature: Signature,
}

impl DaysBetween {
    pub(crate) fn new() -> Self {
        DaysBetween {
            signature: Signature::exact(
                vec![DataType::Date32, DataType::Date32],
                Volatility::Immutable,
            ),
        }
    }
}

impl Default for DaysBetween {
    fn default() -> Self {
        Self::new()
    }
}

impl ScalarUDFImpl for DaysBetween {
    fn name(&self) -> &str {
        "days_between"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int32)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let [later, earlier] = arrays.as_slice() else {
            return Err(DataFusionError::Plan("days_between takes two dates".into()));
        };
        let (later, earlier) = (
            later.as_primitive::<Date32Type>(),
            earlier.as_primitive::<Date32Type>(),
        );
        let out: Int32Array = (0..later.len())
            .map(|i| {
                (later.is_valid(i) && earlier.is_valid(i))
                    .then(|| later.value(i) - earlier.value(i))
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
