//! The change stream: pgoutput events from the replication slot, decoded and mapped
//! onto the configured tables' columns.

use super::pgoutput::{self, Datum, Message};
use super::{SourceError, TableSchema};
use crate::changelog::{Lsn, Op, TableId};
use pgwire_replication::{ReplicationClient, ReplicationEvent};
use std::collections::HashMap;

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Prefix of the logical messages the pipeline emits as fences (see `--once`).
pub const FENCE_PREFIX: &str = "pipeline.fence";

#[derive(Debug)]
pub enum SourceEvent {
    Begin {
        commit_lsn: Lsn,
        commit_ts_micros: i64,
    },
    /// A row change; `row` is in the configured table's column order.
    Change {
        table: TableId,
        op: Op,
        row: Vec<Datum>,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts_micros: i64,
    },
    /// Our own fence message: everything committed before it has been delivered.
    Fence { token: String },
    /// A server keepalive: every transaction committed before `wal_end` has been sent.
    Heartbeat { wal_end: Lsn },
    /// A Relation message describes a configured table with other columns than the
    /// running schema (ALTER TABLE): the stages must be rebuilt on the new schema
    /// before the transaction that carries it can be processed.
    SchemaChanged {
        table: TableId,
        columns: Vec<pgoutput::RelationColumn>,
    },
}

struct RelationMap {
    table: TableId,
    /// pgoutput column position → configured column position.
    columns: Vec<Option<usize>>,
}

pub struct ChangeStream {
    client: ReplicationClient,
    schemas: Vec<TableSchema>,
    relations: HashMap<u32, Option<RelationMap>>,
    /// Events decoded from one message that are waiting to be returned.
    queued: std::collections::VecDeque<SourceEvent>,
}

impl ChangeStream {
    pub fn new(client: ReplicationClient, schemas: Vec<TableSchema>) -> ChangeStream {
        ChangeStream {
            client,
            schemas,
            relations: HashMap::new(),
            queued: Default::default(),
        }
    }

    /// Tells Postgres that everything up to `lsn` is durable downstream.
    pub fn ack(&self, lsn: Lsn) {
        self.client.update_applied_lsn(lsn.into());
    }

    /// Next event; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<SourceEvent>, SourceError> {
        loop {
            if let Some(ev) = self.queued.pop_front() {
                return Ok(Some(ev));
            }
            let Some(ev) = self.client.recv().await? else {
                return Ok(None);
            };
            self.handle(ev)?;
        }
    }

    /// Waits (at most `limit`) until the last acknowledged LSN was sent to the server.
    pub async fn wait_acked(&self, limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        while self.client.feedback_pending_since().is_some() && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    pub async fn shutdown(mut self) {
        let _ = self.client.shutdown().await;
    }

    fn handle(&mut self, ev: ReplicationEvent) -> Result<(), SourceError> {
        match ev {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => self.queued.push_back(SourceEvent::Begin {
                commit_lsn: final_lsn.into(),
                commit_ts_micros: commit_time_micros + PG_EPOCH_OFFSET_MICROS,
            }),
            ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            } => self.queued.push_back(SourceEvent::Commit {
                commit_lsn: lsn.into(),
                end_lsn: end_lsn.into(),
                commit_ts_micros: commit_time_micros + PG_EPOCH_OFFSET_MICROS,
            }),
            ReplicationEvent::Message {
                prefix, content, ..
            } if prefix == FENCE_PREFIX => self.queued.push_back(SourceEvent::Fence {
                token: String::from_utf8_lossy(&content).into_owned(),
            }),
            ReplicationEvent::XLogData { data, .. } => self.decode(&data)?,
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                self.queued.push_back(SourceEvent::Heartbeat {
                    wal_end: wal_end.into(),
                })
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    fn decode(&mut self, data: &bytes::Bytes) -> Result<(), SourceError> {
        match pgoutput::decode(data)? {
            Message::Relation {
                oid,
                namespace,
                name,
                columns,
            } => {
                let table = self
                    .schemas
                    .iter()
                    .position(|s| s.name.schema == namespace && s.name.name == name)
                    .map(TableId::new);
                let map = table.map(|table| {
                    let schema = &self.schemas[table.index()];
                    RelationMap {
                        table,
                        columns: columns
                            .iter()
                            .map(|c| schema.column_index(&c.name))
                            .collect(),
                    }
                });
                if let Some(table) = table {
                    if !self.schemas[table.index()].matches(&columns) {
                        self.queued
                            .push_back(SourceEvent::SchemaChanged { table, columns });
                    }
                }
                self.relations.insert(oid, map);
            }
            Message::Insert { rel, new } => self.change(rel, Op::Insert, new)?,
            Message::Update { rel, old, new } => {
                // An old tuple comes only when the key changed (or with REPLICA IDENTITY
                // FULL): record the old key's removal so state never keeps it.
                if let Some(old) = old {
                    if self.key_changed(rel, &old, &new) {
                        self.change(rel, Op::Delete, old)?;
                    }
                }
                self.change(rel, Op::Update, new)?
            }
            Message::Delete { rel, old } => self.change(rel, Op::Delete, old)?,
            Message::Truncate { rels } => {
                for rel in rels {
                    if let Some(Some(m)) = self.relations.get(&rel) {
                        let n = self.schemas[m.table.index()].columns.len();
                        self.queued.push_back(SourceEvent::Change {
                            table: m.table,
                            op: Op::Truncate,
                            row: vec![Datum::Null; n],
                        });
                    }
                }
            }
            Message::Other(_) => {}
        }
        Ok(())
    }

    fn key_changed(&self, rel: u32, old: &[Datum], new: &[Datum]) -> bool {
        let Some(Some(m)) = self.relations.get(&rel) else {
            return false;
        };
        let key = &self.schemas[m.table.index()].key;
        m.columns.iter().enumerate().any(|(i, target)| {
            target.is_some_and(|j| key.contains(&j))
                && old.get(i) != new.get(i)
                && !matches!(new.get(i), Some(Datum::UnchangedToast))
        })
    }

    fn change(&mut self, rel: u32, op: Op, values: Vec<Datum>) -> Result<(), SourceError> {
        let map = match self.relations.get(&rel) {
            Some(Some(m)) => m,
            Some(None) => return Ok(()), // not one of ours
            None => {
                return Err(SourceError::Protocol(format!(
                    "change for relation {rel} arrived before its Relation message"
                )))
            }
        };
        let mut row = vec![Datum::Null; self.schemas[map.table.index()].columns.len()];
        for (v, target) in values.into_iter().zip(&map.columns) {
            if let Some(j) = target {
                row[*j] = v;
            }
        }
        self.queued.push_back(SourceEvent::Change {
            table: map.table,
            op,
            row,
        });
        Ok(())
    }
}
