//! `safe_divide(numerator, denominator)`: numerator / denominator as DOUBLE, NULL when
//! either is NULL or the denominator is 0 (instead of an error or ±inf).

use arrow::array::{Array, AsArray, Float64Array};
use arrow::datatypes::{DataType, Float64Type};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};
use std::sync::Arc;

#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct SafeDivide {
    signature: Signature,
}

impl SafeDivide {
    pub(crate) fn new() -> Self {
        SafeDivide {
            // Numeric arguments are coerced to DOUBLE.
            signature: Signature::uniform(2, vec![DataType::Float64], Volatility::Immutable),
        }
    }
}

impl Default for SafeDivide {
    fn default() -> Self {
        Self::new()
    }
}

impl ScalarUDFImpl for SafeDivide {
    fn name(&self) -> &str {
        "safe_divide"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let [num, den] = arrays.as_slice() else {
            return Err(DataFusionError::Plan(
                "safe_divide takes two numbers".into(),
            ));
        };
        let num = arrow::compute::cast(num, &DataType::Float64)?;
        let den = arrow::compute::cast(den, &DataType::Float64)?;
        let (num, den) = (
            num.as_primitive::<Float64Type>(),
            den.as_primitive::<Float64Type>(),
        );
        let out: Float64Array = (0..num.len())
            .map(|i| {
                (num.is_valid(i) && den.is_valid(i) && den.value(i) != 0.0)
                    .then(|| num.value(i) / den.value(i))
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
