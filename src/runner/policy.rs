//! The one place that decides what a failure means for the run: retry (a restart may
//! cure it), ask an operator (with the fix), or stop for good. The supervisor retries
//! only [`Action::Retry`]; every error type is classified here by its variants and the
//! types it wraps, never by the text of a message.

use super::RunError;
use crate::sink::SinkError;
use crate::source::SourceError;

/// What to do about a failed run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Restart with backoff: state from the lake, changes from the slot. Nothing was
    /// acknowledged past what is durable, so a restart loses and doubles nothing.
    Retry,
    /// Stop; an operator must act first (the fix says how).
    Operator { fix: &'static str },
    /// Stop: a bug or a state the pipeline cannot explain.
    Fatal,
}

const TLS: &str = "fix source.url's sslmode/sslrootcert/sslcert/sslkey, or the server's \
                   certificate (docs/operations.md, TLS)";
const RESNAPSHOT: &str = "rebuild the lake with `pipeline resnapshot <pipeline.yaml>`";

/// How the runner treats `error`.
pub fn action(error: &RunError) -> Action {
    use super::start::Refusal;
    let operator = |fix| Action::Operator { fix };
    match error {
        RunError::Source(e) => source(e),
        RunError::Sink(e) => sink(e),
        RunError::Features(_) => operator("fix the feature file named in the error"),
        RunError::Refused(r) => match r {
            Refusal::SlotBusy { .. } => Action::Retry,
            Refusal::SlotOfAnotherDatabase { .. } => {
                operator("give the pipeline a slot of its own (source.slot / PIPELINE_SLOT)")
            }
            Refusal::PartialLake { .. } => operator(
                "`pipeline backfill` for an added feature file, `pipeline resnapshot` for a \
                 lost raw table",
            ),
            Refusal::SlotLost { .. } | Refusal::LakeWithoutSlot { .. } => operator(RESNAPSHOT),
        },
        RunError::SchemaChange { .. } => {
            operator("change the feature file to the new source schema, then start again")
        }
        RunError::RawWrite { .. } => operator(RESNAPSHOT),
        RunError::BackfillUnfinished { .. } => operator("run `pipeline backfill` to finish it"),
        RunError::Rebuild { source, .. } => {
            if store_unreachable(source.as_ref()) {
                Action::Retry
            } else {
                Action::Fatal
            }
        }
        RunError::PiecesWithoutEnd | RunError::Task(_) | RunError::Arrow(_) => Action::Fatal,
    }
}

fn source(e: &SourceError) -> Action {
    let operator = |fix| Action::Operator { fix };
    match e {
        SourceError::Connect { .. } | SourceError::StreamEnded => Action::Retry,
        SourceError::Postgres(e) => match e.as_db_error() {
            None => Action::Retry,
            Some(db) if e.is_closed() || transient_sqlstate(db.code().code()) => Action::Retry,
            Some(_) => Action::Fatal,
        },
        SourceError::Tls { .. }
        | SourceError::Replication {
            source: pgwire_replication::PgWireError::Tls(_),
            ..
        } => operator(TLS),
        SourceError::Replication { sqlstate, source } => match source {
            pgwire_replication::PgWireError::Io(_) | pgwire_replication::PgWireError::Task(_) => {
                Action::Retry
            }
            pgwire_replication::PgWireError::Server(_)
                if sqlstate.as_deref().is_some_and(transient_sqlstate) =>
            {
                Action::Retry
            }
            _ => Action::Fatal,
        },
        SourceError::WalLevel(_) => operator("set wal_level = logical and restart Postgres"),
        SourceError::SlotDropped { .. } | SourceError::SlotInvalidated { .. } => {
            operator(RESNAPSHOT)
        }
        SourceError::Url(_) => operator("fix source.url"),
        SourceError::TableMissing(_) | SourceError::Table { .. } => {
            operator("fix the source table or source.tables")
        }
        SourceError::Decode(_)
        | SourceError::Protocol(_)
        | SourceError::Snapshot { .. }
        | SourceError::SnapshotTask(_) => Action::Fatal,
    }
}

/// Server errors that a reconnect cures: connection exceptions (class 08), the server
/// shutting down, crashed or starting up (57P01–57P03), too many connections (53300).
fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
}

/// The object store unreachable or failing, a commit race: a retry may cure it.
/// Schema, URL and data errors are not.
pub(crate) fn sink(e: &SinkError) -> Action {
    use deltalake::DeltaTableError as E;
    let retry = match e {
        SinkError::Delta { source, .. } => {
            matches!(
                source,
                E::ObjectStore { .. }
                    | E::Io { .. }
                    | E::Transaction { .. }
                    | E::VersionAlreadyExists(_)
                    | E::KernelError(_)
                    | E::Kernel { .. }
                    | E::Generic(_)
                    | E::GenericError { .. }
            ) || store_unreachable(source)
        }
        SinkError::Open { source, .. } => store_unreachable(source),
        SinkError::Read { source, .. } => store_unreachable(source),
        SinkError::Store { .. } | SinkError::Sync { .. } => true,
        SinkError::Schema { .. } => {
            return Action::Operator {
                fix: "give the feature table its new columns and their history with `pipeline \
                      backfill <pipeline.yaml>`, or make the feature file match the table again",
            }
        }
        SinkError::Url { .. } => {
            return Action::Operator {
                fix: "fix lake.url",
            }
        }
        SinkError::Unknown(_) | SinkError::Missing(_) => false,
    };
    if retry {
        Action::Retry
    } else {
        Action::Fatal
    }
}

/// Whether `error`, or an error it wraps, is the object store failing to answer
/// (connection refused or reset, timeouts, 5xx after the client's own retries): the lake
/// may be back later. A missing object or a refused credential is not.
pub(crate) fn store_unreachable(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(store) = e.downcast_ref::<deltalake::ObjectStoreError>() {
            return matches!(
                store,
                deltalake::ObjectStoreError::Generic { .. }
                    | deltalake::ObjectStoreError::JoinError { .. }
            );
        }
        if e.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::LakeTable;
    use deltalake::ObjectStoreError;

    fn in_parquet(e: ObjectStoreError) -> SinkError {
        SinkError::Delta {
            table: LakeTable::raw("user"),
            source: deltalake::DeltaTableError::Parquet {
                source: deltalake::parquet::errors::ParquetError::External(Box::new(e)),
            },
        }
    }

    #[test]
    fn an_unreachable_store_deep_in_an_error_is_transient_a_missing_file_is_not() {
        let unreachable = in_parquet(ObjectStoreError::Generic {
            store: "S3",
            source: "error sending request".into(),
        });
        assert_eq!(action(&unreachable.into()), Action::Retry);
        let missing = in_parquet(ObjectStoreError::NotFound {
            path: "part-0.parquet".into(),
            source: "404".into(),
        });
        assert_eq!(action(&missing.into()), Action::Fatal);
    }

    #[test]
    fn server_states_a_reconnect_cures_are_retried_and_the_slot_errors_are_not() {
        let server = |code: &str| {
            RunError::Source(SourceError::from(pgwire_replication::PgWireError::Server(
                format!("FATAL: terminating connection (SQLSTATE {code})"),
            )))
        };
        assert_eq!(action(&server("57P01")), Action::Retry);
        assert_eq!(action(&server("08006")), Action::Retry);
        assert_eq!(action(&server("42704")), Action::Fatal);
        assert_eq!(
            action(&RunError::Source(SourceError::StreamEnded)),
            Action::Retry
        );
        assert!(matches!(
            action(&RunError::Source(SourceError::SlotInvalidated { slot: "s".into() })),
            Action::Operator { fix } if fix.contains("pipeline resnapshot")
        ));
        assert_eq!(
            action(&RunError::Refused(super::super::start::Refusal::SlotBusy {
                slot: "s".into(),
                pid: 1
            })),
            Action::Retry
        );
    }
}
