//! How a run starts: from what the slot and the lake hold, take a new snapshot, resume
//! streaming, or refuse with the reason and the way out. A pure function of its facts,
//! so that every case is a unit test.

use crate::changelog::Lsn;
use crate::sink::{LakeTable, ResumePoint};
use crate::source::SlotStatus;

/// How far the lake got, from each table's committed versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LakeProgress {
    /// No table has anything from this pipeline.
    Empty,
    /// Some tables hold the initial snapshot at this LSN, the others nothing (the
    /// process stopped while committing it), or tables hold two different snapshots (a
    /// resnapshot stopped part-way). Retaking it, replacing every table, loses nothing.
    InterruptedSnapshot(Lsn),
    /// Every table has data; streaming resumes from the lowest committed version.
    Complete,
    /// Tables with nothing while others went further than a snapshot (named here).
    Partial(Vec<LakeTable>),
}

impl LakeProgress {
    pub(crate) fn of(lake: &ResumePoint) -> LakeProgress {
        let mut snapshots: Vec<Lsn> = lake
            .tables()
            .map(|(_, p)| p.snapshot)
            .filter(|v| !v.is_zero())
            .collect();
        snapshots.sort_unstable();
        snapshots.dedup();
        if let [.., newest] = snapshots[..] {
            if snapshots.len() > 1 {
                // The old tables cannot be caught up from the new slot: retake it.
                return LakeProgress::InterruptedSnapshot(newest);
            }
        }
        let missing: Vec<LakeTable> = lake
            .tables()
            .filter(|(_, p)| p.committed.is_zero())
            .map(|(t, _)| t.clone())
            .collect();
        let max = lake.committed_anywhere();
        if max.is_zero() {
            LakeProgress::Empty
        } else if missing.is_empty() {
            LakeProgress::Complete
        } else if lake
            .tables()
            .all(|(_, p)| p.committed.is_zero() || p.committed == max)
        {
            // Streaming starts only after the snapshot is in every table, so tables that
            // all stopped at one version next to empty ones are a part-written snapshot.
            LakeProgress::InterruptedSnapshot(max)
        } else {
            LakeProgress::Partial(missing)
        }
    }
}

/// Everything the start depends on.
#[derive(Debug, Clone)]
pub(crate) struct StartFacts<'a> {
    /// The pipeline's slot, if it exists.
    pub slot: Option<&'a SlotStatus>,
    /// The slot's name (it may not exist) and the database the pipeline reads.
    pub slot_name: &'a str,
    pub database: &'a str,
    pub lake_root: &'a str,
    pub lake: &'a ResumePoint,
    /// The lake carries the mark of a resnapshot that did not finish.
    pub resnapshot_mark: bool,
    /// `pipeline resnapshot` asked for a new snapshot.
    pub resnapshot_asked: bool,
}

/// Why a new snapshot is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SnapshotReason {
    /// Neither slot nor lake data: the first run.
    FirstRun,
    /// The initial snapshot was only partly committed (at this LSN).
    Interrupted(Lsn),
    /// A slot exists but nothing from it reached this lake (a first run that stopped
    /// during the snapshot, or a lake deleted to start over).
    NothingFromSlot,
    /// `pipeline resnapshot`, or finishing one that was interrupted.
    Resnapshot { interrupted: bool },
}

/// What the run does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Start {
    /// Create the slot with an exported snapshot (after dropping the existing one) and
    /// replace every table with the snapshot.
    Snapshot {
        drop_slot: bool,
        reason: SnapshotReason,
    },
    /// Rebuild state from the lake up to `rebuild_to`, then stream from the slot,
    /// skipping transactions that end at or before `skip_through` (in every table).
    Resume {
        rebuild_to: Lsn,
        skip_through: Lsn,
    },
    Refuse(Refusal),
}

impl Start {
    pub(crate) fn is_resnapshot(&self) -> bool {
        matches!(
            self,
            Start::Snapshot {
                reason: SnapshotReason::Resnapshot { .. },
                ..
            }
        )
    }
}

/// A start the pipeline must not make; each says what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the lake at {root} has data from this pipeline, but {} {} none: a feature file \
         added to a running pipeline gets its history with `pipeline backfill \
         <pipeline.yaml>`; a raw table deleted from the lake must be restored, or every \
         table rebuilt with `pipeline resnapshot <pipeline.yaml>`",
        missing.iter().map(LakeTable::path).collect::<Vec<_>>().join(", "),
        if missing.len() == 1 { "has" } else { "have" }
    )]
    PartialLake {
        root: String,
        missing: Vec<LakeTable>,
    },
    #[error(
        "replication slot `{slot}` belongs to database `{database}` (plugin {plugin}), not \
         to `{ours}`: slot names are per cluster, give each pipeline its own (source.slot / \
         PIPELINE_SLOT)"
    )]
    SlotOfAnotherDatabase {
        slot: String,
        database: String,
        plugin: String,
        ours: String,
    },
    #[error(
        "replication slot `{slot}` is in use by another process (pid {pid}); is another \
         pipeline running on it?"
    )]
    SlotBusy { slot: String, pid: i32 },
    #[error(
        "replication slot `{slot}` was invalidated (wal_status = lost): changes since the \
         last run are gone from the WAL, so the lake cannot be caught up. Rebuild it \
         consistently with `pipeline resnapshot <pipeline.yaml>` (raise \
         max_slot_wal_keep_size, or keep the pipeline running, to avoid this)"
    )]
    SlotLost { slot: String },
    #[error(
        "the lake at {root} has data but replication slot `{slot}` does not exist: changes \
         since the last run are lost. Rebuild the lake consistently with `pipeline \
         resnapshot <pipeline.yaml>`"
    )]
    LakeWithoutSlot { root: String, slot: String },
}

/// Decides how the run starts.
pub(crate) fn decide(f: &StartFacts<'_>) -> Start {
    let resnapshot = f.resnapshot_asked || f.resnapshot_mark;
    let progress = LakeProgress::of(f.lake);
    let slot_name = f.slot_name.to_string();
    if let LakeProgress::Partial(missing) = &progress {
        if !resnapshot {
            return Start::Refuse(Refusal::PartialLake {
                root: f.lake_root.to_string(),
                missing: missing.clone(),
            });
        }
    }
    if let Some(s) = f.slot {
        if s.database != f.database || s.plugin != "pgoutput" {
            return Start::Refuse(Refusal::SlotOfAnotherDatabase {
                slot: slot_name,
                database: s.database.clone(),
                plugin: s.plugin.clone(),
                ours: f.database.to_string(),
            });
        }
        if let Some(pid) = s.active_pid {
            return Start::Refuse(Refusal::SlotBusy {
                slot: slot_name,
                pid,
            });
        }
    }
    if resnapshot {
        return Start::Snapshot {
            drop_slot: f.slot.is_some(),
            reason: SnapshotReason::Resnapshot {
                interrupted: !f.resnapshot_asked,
            },
        };
    }
    let lake_has_data = match progress {
        LakeProgress::Empty => None,
        LakeProgress::InterruptedSnapshot(lsn) => Some(SnapshotReason::Interrupted(lsn)),
        LakeProgress::Complete | LakeProgress::Partial(_) => {
            return match f.slot {
                Some(s) if s.is_lost() => Start::Refuse(Refusal::SlotLost { slot: slot_name }),
                Some(s) => {
                    let skip_through = f.lake.committed_everywhere();
                    Start::Resume {
                        // State holds exactly the transactions that are not streamed
                        // again: those before the slot's confirmed position (Postgres
                        // resends the rest) and those in every table (skipped).
                        rebuild_to: s.confirmed_flush_lsn.unwrap_or_default().max(skip_through),
                        skip_through,
                    }
                }
                None => Start::Refuse(Refusal::LakeWithoutSlot {
                    root: f.lake_root.to_string(),
                    slot: slot_name,
                }),
            };
        }
    };
    match (f.slot, lake_has_data) {
        (None, None) => Start::Snapshot {
            drop_slot: false,
            reason: SnapshotReason::FirstRun,
        },
        (slot, Some(reason)) => Start::Snapshot {
            drop_slot: slot.is_some(),
            reason,
        },
        (Some(_), None) => Start::Snapshot {
            drop_slot: true,
            reason: SnapshotReason::NothingFromSlot,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::TableProgress;
    use crate::source::WalStatus;

    fn slot(confirmed: u64) -> SlotStatus {
        SlotStatus {
            slot: "s".into(),
            plugin: "pgoutput".into(),
            database: "crm".into(),
            active_pid: None,
            confirmed_flush_lsn: Some(Lsn::new(confirmed)),
            retained_wal_bytes: None,
            lag_bytes: None,
            wal_status: Some(WalStatus::Reserved),
            safe_wal_size: None,
        }
    }

    /// A lake of three tables with these (committed, snapshot) versions.
    fn lake(v: [(u64, u64); 3]) -> ResumePoint {
        let names = [
            LakeTable::raw("loan"),
            LakeTable::raw("user"),
            LakeTable::features("client_features"),
        ];
        ResumePoint::new(names.into_iter().zip(v).map(|(t, (c, s))| {
            (
                t,
                TableProgress {
                    committed: Lsn::new(c),
                    snapshot: Lsn::new(s),
                },
            )
        }))
    }

    fn decide_with(
        slot: Option<&SlotStatus>,
        lake: &ResumePoint,
        mark: bool,
        asked: bool,
    ) -> Start {
        decide(&StartFacts {
            slot,
            slot_name: "s",
            database: "crm",
            lake_root: "file:///lake/",
            lake,
            resnapshot_mark: mark,
            resnapshot_asked: asked,
        })
    }

    const EMPTY: [(u64, u64); 3] = [(0, 0); 3];

    #[test]
    fn the_lake_progress_tells_empty_complete_interrupted_and_partial_lakes_apart() {
        assert_eq!(LakeProgress::of(&lake(EMPTY)), LakeProgress::Empty);
        assert_eq!(
            LakeProgress::of(&lake([(10, 10), (30, 10), (20, 10)])),
            LakeProgress::Complete
        );
        // Snapshot committed to two tables of three.
        assert_eq!(
            LakeProgress::of(&lake([(10, 10), (0, 0), (10, 10)])),
            LakeProgress::InterruptedSnapshot(Lsn::new(10))
        );
        // A resnapshot stopped part-way: two snapshots, every table has data.
        assert_eq!(
            LakeProgress::of(&lake([(50, 50), (30, 10), (50, 50)])),
            LakeProgress::InterruptedSnapshot(Lsn::new(50))
        );
        // Streamed past the snapshot, but one table has nothing.
        assert_eq!(
            LakeProgress::of(&lake([(10, 10), (0, 0), (30, 10)])),
            LakeProgress::Partial(vec![LakeTable::raw("user")])
        );
    }

    #[test]
    fn first_runs_and_lakes_with_nothing_from_the_slot_take_a_snapshot() {
        let none = lake(EMPTY);
        assert_eq!(
            decide_with(None, &none, false, false),
            Start::Snapshot {
                drop_slot: false,
                reason: SnapshotReason::FirstRun
            }
        );
        let s = slot(100);
        assert_eq!(
            decide_with(Some(&s), &none, false, false),
            Start::Snapshot {
                drop_slot: true,
                reason: SnapshotReason::NothingFromSlot
            }
        );
        let interrupted = lake([(10, 10), (0, 0), (10, 10)]);
        assert_eq!(
            decide_with(Some(&s), &interrupted, false, false),
            Start::Snapshot {
                drop_slot: true,
                reason: SnapshotReason::Interrupted(Lsn::new(10))
            }
        );
        assert_eq!(
            decide_with(None, &interrupted, false, false),
            Start::Snapshot {
                drop_slot: false,
                reason: SnapshotReason::Interrupted(Lsn::new(10))
            }
        );
    }

    #[test]
    fn a_complete_lake_resumes_from_the_higher_of_the_slot_and_every_table() {
        let l = lake([(40, 10), (30, 10), (50, 10)]);
        assert_eq!(
            decide_with(Some(&slot(20)), &l, false, false),
            Start::Resume {
                rebuild_to: Lsn::new(30),
                skip_through: Lsn::new(30)
            }
        );
        assert_eq!(
            decide_with(Some(&slot(45)), &l, false, false),
            Start::Resume {
                rebuild_to: Lsn::new(45),
                skip_through: Lsn::new(30)
            }
        );
        let mut unconfirmed = slot(0);
        unconfirmed.confirmed_flush_lsn = None;
        assert_eq!(
            decide_with(Some(&unconfirmed), &l, false, false),
            Start::Resume {
                rebuild_to: Lsn::new(30),
                skip_through: Lsn::new(30)
            }
        );
    }

    #[test]
    fn a_resnapshot_asked_or_interrupted_replaces_everything_whatever_the_lake_holds() {
        let partial = lake([(10, 10), (0, 0), (30, 10)]);
        for (slot, mark, asked) in [
            (Some(slot(5)), false, true),
            (None, true, false),
            (Some(slot(5)), true, false),
        ] {
            let start = decide_with(slot.as_ref(), &partial, mark, asked);
            assert_eq!(
                start,
                Start::Snapshot {
                    drop_slot: slot.is_some(),
                    reason: SnapshotReason::Resnapshot {
                        interrupted: !asked
                    }
                }
            );
            assert!(start.is_resnapshot());
        }
        let mut lost = slot(5);
        lost.wal_status = Some(WalStatus::Lost);
        assert!(decide_with(Some(&lost), &lake([(10, 10); 3]), false, true).is_resnapshot());
    }

    #[test]
    fn refusals_name_the_way_out() {
        let complete = lake([(10, 10); 3]);
        let refusal = |start: Start| match start {
            Start::Refuse(r) => r,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let partial = refusal(decide_with(
            Some(&slot(5)),
            &lake([(10, 10), (0, 0), (30, 10)]),
            false,
            false,
        ));
        assert!(
            matches!(&partial, Refusal::PartialLake { missing, .. } if missing == &[LakeTable::raw("user")])
        );
        assert!(
            partial.to_string().contains("raw/user has none"),
            "{partial}"
        );

        let mut other_db = slot(5);
        other_db.database = "billing".into();
        let r = refusal(decide_with(Some(&other_db), &complete, false, false));
        assert!(
            matches!(&r, Refusal::SlotOfAnotherDatabase { database, .. } if database == "billing")
        );
        let mut other_plugin = slot(5);
        other_plugin.plugin = "wal2json".into();
        assert!(matches!(
            refusal(decide_with(Some(&other_plugin), &complete, false, false)),
            Refusal::SlotOfAnotherDatabase { .. }
        ));

        let mut busy = slot(5);
        busy.active_pid = Some(4242);
        assert_eq!(
            refusal(decide_with(Some(&busy), &complete, false, true)),
            Refusal::SlotBusy {
                slot: "s".into(),
                pid: 4242
            }
        );

        let mut lost = slot(5);
        lost.wal_status = Some(WalStatus::Lost);
        let r = refusal(decide_with(Some(&lost), &complete, false, false));
        assert_eq!(r, Refusal::SlotLost { slot: "s".into() });
        assert!(r.to_string().contains("pipeline resnapshot"));

        let r = refusal(decide_with(None, &complete, false, false));
        assert!(matches!(r, Refusal::LakeWithoutSlot { .. }));
        assert!(r.to_string().contains("pipeline resnapshot"));
    }
}
