//! Serving features: the online store the processor writes ([`Online`]: every entity's
//! latest features and the watermark read-your-writes waits on), the HTTP API over it
//! ([`http`]), and reads of the Delta feature tables ([`mod@latest`]).

pub mod http;
mod latest;
mod online;
mod table;

pub use latest::{latest, ServeError};
pub use online::{Online, Phase, ReadError, WaitTimeout};
pub(crate) use table::date_text;
pub use table::OnlineRow;
