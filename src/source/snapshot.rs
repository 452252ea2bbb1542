//! The initial snapshot: a replication slot created with an exported snapshot, and every
//! table copied inside that snapshot. Changes committed before the slot's consistent
//! point are in the copy; every later commit comes through the slot: nothing is lost or
//! doubled at the switch.

use super::connect::{connect, ConnInfo};
use super::text::ColumnBuilder;
use super::{SourceError, TableSchema};
use arrow::array::RecordBatch;
use futures::StreamExt;
use pgwire_replication::ReplicationClient;
use std::time::Instant;

/// Rows per Arrow batch while copying.
const CHUNK_ROWS: usize = 64 * 1024;

pub struct InitialSnapshot {
    /// The slot's consistent point: the stream starts right after it.
    pub consistent_lsn: crate::changelog::Lsn,
    /// Row images per configured table.
    pub tables: Vec<Vec<RecordBatch>>,
    /// When the snapshot was taken (unix micros).
    pub taken_at_micros: i64,
}

/// Creates the slot on the gated replication session `repl` (which must not have
/// started) and copies every table within its exported snapshot. `repl` must stay
/// open until this returns: the exported snapshot lives as long as that session is idle.
pub async fn create_slot_with_snapshot(
    repl: &mut ReplicationClient,
    slot: &str,
    conn: &ConnInfo,
    schemas: &[TableSchema],
) -> Result<InitialSnapshot, SourceError> {
    let rows = repl
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')",
            crate::config::quote_ident(slot)
        ))
        .await?;
    let row = rows
        .first()
        .ok_or_else(|| SourceError::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
    let text = |i: usize| {
        row.get(i)
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .ok_or_else(|| {
                SourceError::Protocol(format!("CREATE_REPLICATION_SLOT: column {i} missing"))
            })
    };
    let consistent_lsn: crate::changelog::Lsn = text(1)?.parse().map_err(|e| {
        SourceError::Protocol(format!(
            "CREATE_REPLICATION_SLOT: bad consistent point: {e}"
        ))
    })?;
    let snapshot_name = text(2)?;
    tracing::info!(slot, %consistent_lsn, snapshot = %snapshot_name,
        "created replication slot with exported snapshot");
    let taken_at_micros = chrono::Utc::now().timestamp_micros();

    let started = Instant::now();
    let copies = schemas.iter().map(|schema| {
        let conn = conn.clone();
        let snapshot_name = snapshot_name.clone();
        let schema = schema.clone();
        tokio::spawn(async move { copy_table(&conn, &snapshot_name, &schema).await })
    });
    let mut tables = Vec::with_capacity(schemas.len());
    for handle in futures::future::join_all(copies).await {
        let batches = handle.map_err(|e| SourceError::SnapshotTask(e.to_string()))??;
        tables.push(batches);
    }
    let total: usize = tables.iter().flatten().map(RecordBatch::num_rows).sum();
    tracing::info!(
        rows = total,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "snapshot copied"
    );
    Ok(InitialSnapshot {
        consistent_lsn,
        tables,
        taken_at_micros,
    })
}

async fn copy_table(
    conn: &ConnInfo,
    snapshot_name: &str,
    schema: &TableSchema,
) -> Result<Vec<RecordBatch>, SourceError> {
    let client = connect(conn, 3).await?;
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            snapshot_name.replace('\'', "''")
        ))
        .await?;
    let estimate: f32 = client
        .query_one(
            "SELECT GREATEST(reltuples, 0)::real FROM pg_class WHERE oid = $1",
            &[&schema.oid],
        )
        .await?
        .get(0);
    let cols: Vec<String> = schema
        .columns
        .iter()
        .map(|c| crate::config::quote_ident(&c.name))
        .collect();
    let sql = format!(
        "COPY (SELECT {} FROM {}) TO STDOUT",
        cols.join(", "),
        schema.name.quoted()
    );
    let stream = client.copy_out(sql.as_str()).await?;
    futures::pin_mut!(stream);

    let progress =
        indicatif::ProgressBar::new(estimate as u64).with_message(schema.name.to_string());
    progress.set_style(
        indicatif::ProgressStyle::with_template("{msg:>16} {bar:30} {pos}/~{len} rows")
            .expect("valid template"),
    );
    let mut parser = CopyParser::new(schema);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        parser.feed(&chunk)?;
        progress.set_position(parser.rows_total as u64);
    }
    progress.finish_and_clear();
    let batches = parser.finish()?;
    client.batch_execute("COMMIT").await?;
    tracing::info!(table = %schema.name, rows = batches.iter().map(RecordBatch::num_rows).sum::<usize>(), "table copied");
    Ok(batches)
}

/// Parses COPY text format (tab-separated, `\N` for NULL, backslash escapes) into
/// Arrow batches. Chunks from the server do not align with lines.
struct CopyParser<'a> {
    schema: &'a TableSchema,
    builders: Vec<ColumnBuilder>,
    pending: Vec<u8>,
    rows_in_chunk: usize,
    rows_total: usize,
    batches: Vec<RecordBatch>,
    field: Vec<u8>,
    bad_values: usize,
}

impl<'a> CopyParser<'a> {
    fn new(schema: &'a TableSchema) -> Self {
        CopyParser {
            schema,
            builders: Self::builders(schema),
            pending: Vec::new(),
            rows_in_chunk: 0,
            rows_total: 0,
            batches: Vec::new(),
            field: Vec::new(),
            bad_values: 0,
        }
    }

    fn builders(schema: &TableSchema) -> Vec<ColumnBuilder> {
        schema
            .columns
            .iter()
            .map(|c| ColumnBuilder::new(&c.data_type, CHUNK_ROWS))
            .collect()
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<(), SourceError> {
        let mut data = chunk;
        let owned;
        if !self.pending.is_empty() {
            self.pending.extend_from_slice(chunk);
            owned = std::mem::take(&mut self.pending);
            data = &owned;
        }
        let mut start = 0;
        while let Some(nl) = memchr(b'\n', &data[start..]) {
            self.line(&data[start..start + nl])?;
            start += nl + 1;
        }
        self.pending.extend_from_slice(&data[start..]);
        Ok(())
    }

    fn line(&mut self, line: &[u8]) -> Result<(), SourceError> {
        let n = self.builders.len();
        let mut col = 0;
        for raw in line.split(|&b| b == b'\t') {
            if col >= n {
                return Err(self.error(format!(
                    "row {} has more than {n} fields",
                    self.rows_total + 1
                )));
            }
            if raw == b"\\N" {
                self.builders[col].append_null();
            } else {
                let value: &[u8] = if raw.contains(&b'\\') {
                    unescape(raw, &mut self.field);
                    &self.field
                } else {
                    raw
                };
                if let Err(e) = self.builders[col].append_text(value) {
                    self.bad_values += 1;
                    if self.bad_values <= 10 {
                        tracing::warn!(table = %self.schema.name, column = %self.schema.columns[col].name,
                            error = %e, "value stored as NULL");
                    }
                }
            }
            col += 1;
        }
        if col != n {
            return Err(self.error(format!(
                "row {} has {col} fields, expected {n}",
                self.rows_total + 1
            )));
        }
        self.rows_in_chunk += 1;
        self.rows_total += 1;
        if self.rows_in_chunk == CHUNK_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SourceError> {
        if self.rows_in_chunk == 0 {
            return Ok(());
        }
        let arrays = self
            .builders
            .iter_mut()
            .map(ColumnBuilder::finish)
            .collect();
        let batch = RecordBatch::try_new(self.schema.schema.clone(), arrays)
            .map_err(|e| self.error(e.to_string()))?;
        self.batches.push(batch);
        self.rows_in_chunk = 0;
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<RecordBatch>, SourceError> {
        if !self.pending.is_empty() {
            let last = std::mem::take(&mut self.pending);
            self.line(&last)?;
        }
        self.flush()?;
        Ok(self.batches)
    }

    fn error(&self, message: String) -> SourceError {
        SourceError::Snapshot {
            table: self.schema.name.clone(),
            message,
        }
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

/// Undoes COPY text escaping into `out`.
fn unescape(raw: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' || i + 1 == raw.len() {
            out.push(b);
            i += 1;
            continue;
        }
        let e = raw[i + 1];
        i += 2;
        match e {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = (e - b'0') as u32;
                let mut k = 0;
                while k < 2 && i < raw.len() && (b'0'..=b'7').contains(&raw[i]) {
                    v = v * 8 + (raw[i] - b'0') as u32;
                    i += 1;
                    k += 1;
                }
                out.push(v as u8);
            }
            b'x' => {
                let mut v = 0u32;
                let mut k = 0;
                while k < 2 && i < raw.len() && raw[i].is_ascii_hexdigit() {
                    v = v * 16 + (raw[i] as char).to_digit(16).unwrap();
                    i += 1;
                    k += 1;
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_copy_text() {
        let mut out = Vec::new();
        unescape(br"a\tb\\c\nd\101\x41", &mut out);
        assert_eq!(out, b"a\tb\\c\ndAA");
    }
}
