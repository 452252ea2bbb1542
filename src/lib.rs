//! Streaming feature engine for credit decisions: Postgres logical replication → Arrow
//! micro-batches → features as DataFusion SQL → Delta Lake.
//!
//! # Layout
//!
//! One module per stage, in the order a change row travels; [`runner`] only wires them
//! (`docs/architecture.md` has the diagram):
//!
//! - [`source`]: the Postgres side: catalog → Arrow schemas, publication and slot
//!   administration, the exported snapshot, the pgoutput change stream, and the encoding
//!   of Postgres text values into raw change rows.
//! - `batch`: the micro-batcher, a state machine from source events to
//!   `ChangeBatch`es (whole transactions, pieces of large ones, the end of a `--once`
//!   run), and the acknowledgement rules.
//! - [`state`]: the current image of every source table, in memory, with the indexes the
//!   features' scoped scans need.
//! - [`features`]: the feature files planned as DataFusion SQL (plus the `udfs`), run
//!   over the entities a batch touches.
//! - [`sink`]: the [`sink::Destination`] contract (a commit returns once durable), Delta
//!   Lake on a local directory or S3, the lake's layout and background maintenance.
//! - [`serve`]: the online store the processor publishes computed features to (with the
//!   watermark read-your-writes waits on), the HTTP API over it, and reads of the Delta
//!   feature tables.
//! - [`decide`]: `POST /v1/decisions`: served features + the application's row → an ONNX
//!   model's score → rules → the decision, audited to the lake.
//! - [`offline`]: point-in-time training sets for data scientists from the same feature
//!   files: known time (the rows the stream wrote) or event time (recomputed per date).
//! - [`runner`]: the start decision, the processor (batch → features served online →
//!   durable commits → the LSN to acknowledge), the read-your-writes fencer, the snapshot
//!   writer, the state rebuild, the retry policy, the supervisor.
//!
//! Shared by all: [`changelog`] (`Lsn`, `Op`, `TableId`, `Changes`, and the raw change
//! log's columns), [`config`] (typed pipeline and feature files) and [`metrics`] (what
//! `/metrics` exports).
//!
//! The binary adds the CLI and the `db` dev tooling (restore, seed).
//!
//! What the binary, the tests and the docs do not need is `pub(crate)`.

pub(crate) mod batch;
pub mod changelog;
pub mod config;
pub mod decide;
pub(crate) mod fault;
pub mod features;
pub mod metrics;
pub mod offline;
pub mod runner;
pub mod serve;
pub mod sink;
pub mod source;
pub mod state;
pub(crate) mod udfs;
