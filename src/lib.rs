//! Streaming feature engine for credit decisions.
//!
//! Data flows through one module per stage; `runner` wires them together:
//! `source` (Postgres snapshot + pgoutput stream) → `batch` (200 ms micro-batches) →
//! `features` (in-memory `state` + DataFusion SQL + `udfs`) → `sink` (Delta Lake).

pub mod batch;
pub mod changelog;
pub mod config;
pub mod db;
pub mod fault;
pub mod features;
pub mod runner;
pub mod serve;
pub mod sink;
pub mod source;
pub mod state;

#[path = "../udfs/mod.rs"]
pub mod udfs;
