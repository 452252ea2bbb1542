//! `as_of_date()`: the date features are computed as of (A): the batch's source commit
//! date, or the pipeline's fixed `clock.as_of`.

use arrow::datatypes::DataType;
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::scalar::ScalarValue;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

/// Shared, settable as-of date (days since 1970-01-01). The engine sets it per batch.
#[derive(Debug, Clone, Default)]
pub(crate) struct AsOfClock(Arc<AtomicI32>);

impl AsOfClock {
    pub(crate) fn set_days(&self, days: i32) {
        self.0.store(days, Ordering::SeqCst);
    }
    pub(crate) fn days(&self) -> i32 {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
pub(crate) struct AsOfDate {
    clock: AsOfClock,
    signature: Signature,
}

impl AsOfDate {
    pub(crate) fn new(clock: AsOfClock) -> Self {
        // Volatile: the value changes between executions of one cached plan, so the
        // optimizer must not fold it into a constant at planning time.
        AsOfDate {
            clock,
            signature: Signature::nullary(Volatility::Volatile),
        }
    }
}

impl PartialEq for AsOfDate {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.clock.0, &other.clock.0)
    }
}
impl Eq for AsOfDate {}
impl std::hash::Hash for AsOfDate {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        "as_of_date".hash(state)
    }
}

impl ScalarUDFImpl for AsOfDate {
    fn name(&self) -> &str {
        "as_of_date"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Date32)
    }
    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        Ok(ColumnarValue::Scalar(ScalarValue::Date32(Some(
            self.clock.days(),
        ))))
    }
}
