//! The lake's layout: the one place that names paths under its root.
//!
//! ```text
//! <root>/raw/<table>/        change log of a source table (Delta)
//! <root>/features/<name>/    a feature file's output (Delta)
//! <root>/decisions/<name>/   a decisions file's audit trail (Delta)
//! <root>/_pipeline/<mark>    the pipeline's own marks (e.g. a resnapshot in progress)
//! <root>/_state/<table path> a table's state checkpoint (Delta; newest row per key)
//! ```

use std::fmt;
use std::sync::Arc;

/// A Delta table of the lake.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LakeTable {
    kind: TableKind,
    name: Arc<str>,
}

/// What a table of the lake holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TableKind {
    /// The change log of a source table (`raw/<table>`).
    Raw,
    /// The output of a feature file (`features/<name>`).
    Features,
    /// Every decision served by a decisions file (`decisions/<name>`).
    Decisions,
    /// A state checkpoint of another table (`_state/<its path>`).
    Checkpoint,
}

impl LakeTable {
    /// The change log of the source table of this name.
    pub fn raw(table: impl AsRef<str>) -> LakeTable {
        LakeTable {
            kind: TableKind::Raw,
            name: table.as_ref().into(),
        }
    }

    /// The change log of source table `table`: named by the table alone (its schema is
    /// not part of the path).
    pub fn raw_of(table: &crate::config::TableName) -> LakeTable {
        LakeTable::raw(&table.name)
    }

    /// The output of the feature file of this name.
    pub fn features(name: impl AsRef<str>) -> LakeTable {
        LakeTable {
            kind: TableKind::Features,
            name: name.as_ref().into(),
        }
    }

    /// The audit trail of the decisions file of this name.
    pub fn decisions(name: impl AsRef<str>) -> LakeTable {
        LakeTable {
            kind: TableKind::Decisions,
            name: name.as_ref().into(),
        }
    }

    /// The state checkpoint of `table` ([`super::checkpoint`]).
    pub fn checkpoint_of(table: &LakeTable) -> LakeTable {
        LakeTable {
            kind: TableKind::Checkpoint,
            name: table.path().into(),
        }
    }

    pub fn kind(&self) -> TableKind {
        self.kind
    }

    /// The source table's or feature file's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The table's directory under the lake root, without a trailing slash.
    pub fn path(&self) -> String {
        match self.kind {
            TableKind::Raw => format!("raw/{}", self.name),
            TableKind::Features => format!("features/{}", self.name),
            TableKind::Decisions => format!("decisions/{}", self.name),
            TableKind::Checkpoint => format!("_state/{}", self.name),
        }
    }

    pub fn is_raw(&self) -> bool {
        self.kind == TableKind::Raw
    }

    /// The log entry of `version`, relative to the table's directory (what
    /// [`super::Lake::sync_files`] takes).
    pub(crate) fn commit_file(version: u64) -> String {
        format!("_delta_log/{version:020}.json")
    }

    /// Every table of `pipeline`: the raw tables in configured order, then the feature
    /// tables.
    pub fn all_of(pipeline: &crate::config::Pipeline) -> Vec<LakeTable> {
        let raw = pipeline.tables.iter().map(LakeTable::raw_of);
        let features = pipeline
            .feature_files
            .iter()
            .map(|f| LakeTable::features(&f.name));
        raw.chain(features).collect()
    }
}

impl fmt::Display for LakeTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path())
    }
}

/// A small file of the pipeline's own beside the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Present while a resnapshot is replacing the tables: a run that finds it finishes
    /// the resnapshot instead of streaming onto a half-replaced lake.
    ResnapshotInProgress,
    /// Present while `pipeline backfill` rebuilds feature tables (it names them): a run
    /// refuses to stream onto a history that is half old, half new.
    BackfillInProgress,
}

impl Mark {
    /// The mark's path under the lake root.
    pub fn path(self) -> &'static str {
        match self {
            Mark::ResnapshotInProgress => "_pipeline/resnapshot-in-progress",
            Mark::BackfillInProgress => "_pipeline/backfill-in-progress",
        }
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_the_root() {
        assert_eq!(LakeTable::raw("loan").path(), "raw/loan");
        assert_eq!(
            LakeTable::features("client_features").to_string(),
            "features/client_features"
        );
        assert!(LakeTable::raw("user").is_raw() && !LakeTable::features("f").is_raw());
        assert_eq!(LakeTable::decisions("loan").path(), "decisions/loan");
        assert_eq!(
            LakeTable::checkpoint_of(&LakeTable::raw("loan")).path(),
            "_state/raw/loan"
        );
        assert_eq!(
            Mark::ResnapshotInProgress.path(),
            "_pipeline/resnapshot-in-progress"
        );
    }
}
