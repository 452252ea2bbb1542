//! `feature_defs/*.yaml`: one entity, the source tables it reads and how each maps to
//! the entity key, and the features as DataFusion SQL.

use super::{load_yaml, ConfigError};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// When the row's values became true (the as-of date they were computed for).
pub const FEATURE_TIME: &str = "feature_time";
/// Commit LSN of the source transaction the row was computed for.
pub const OUTPUT_LSN: &str = crate::changelog::LSN;
/// Wall-clock time the row was computed.
pub const COMPUTED_AT: &str = "computed_at";
/// The entity is gone (its row in the entity table was deleted).
pub const DELETED: &str = "_deleted";
/// Commit time (UTC) of the source transaction the row was computed for: from then on
/// the pipeline knew this value (a training set's known time). NULL in rows written
/// before the column existed (it is added to older tables on start).
pub const OUTPUT_COMMIT_TS: &str = crate::changelog::COMMIT_TS;
/// Columns every feature table has besides its key and features, in this order after
/// them: no feature may take these names.
pub const OUTPUT_COLUMNS: [&str; 5] = [
    FEATURE_TIME,
    OUTPUT_LSN,
    COMPUTED_AT,
    DELETED,
    OUTPUT_COMMIT_TS,
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFeatureFile {
    /// Name of the output Delta table (`<lake>/features/<name>`).
    name: String,
    #[serde(default)]
    description: Option<String>,
    entity: EntityDef,
    /// How a change in each other source table finds the entities it touches.
    #[serde(default)]
    sources: BTreeMap<String, RawMapping>,
    features: Vec<FeatureDef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityDef {
    /// Entity name (documentation and logs).
    pub name: String,
    /// Name of the key column in the feature table and in every feature query's output.
    pub key: String,
    /// The table holding one row per entity, and its key column.
    pub table: String,
    pub table_key: String,
}

/// How rows of a source table map to entity keys, as written in YAML: exactly one of
/// `column` or `via`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMapping {
    #[serde(default)]
    column: Option<String>,
    #[serde(default)]
    via: Option<ViaDef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ViaDef {
    table: String,
    column: String,
    references: String,
}

/// How rows of a source table map to entity keys.
#[derive(Debug, Clone)]
pub enum SourceMapping {
    /// The table has a column holding the entity key (`loan.client_id`).
    Column(String),
    /// The table references another mapped table (`payment.loan_id` → `loan.id`),
    /// whose row then gives the entity.
    Via {
        table: String,
        column: String,
        references: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureType {
    Bigint,
    Int,
    Double,
    Text,
    Boolean,
    Date,
}

impl FeatureType {
    pub fn arrow(self) -> arrow::datatypes::DataType {
        use arrow::datatypes::DataType as D;
        match self {
            FeatureType::Bigint => D::Int64,
            FeatureType::Int => D::Int32,
            FeatureType::Double => D::Float64,
            FeatureType::Text => D::Utf8,
            FeatureType::Boolean => D::Boolean,
            FeatureType::Date => D::Date32,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureDef {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: FeatureType,
    pub description: String,
    /// Value for entities the query returns no row for (e.g. 0 for counts).
    #[serde(default)]
    pub default: Option<serde_yaml::Value>,
    /// A query returning the entity key column and a column named like the feature,
    /// at most one row per entity.
    pub sql: String,
    /// Why recomputing this feature for a past date (an event-time training set) does not
    /// give the value it had then: the query reads something that changes without a
    /// date (e.g. a loan's current `status`). Absent: every input the query reads is
    /// filtered by dates <= `as_of_date()`, so the recompute is point-in-time correct.
    #[serde(default)]
    pub leaks_in_event_time: Option<String>,
}

/// A validated feature file.
#[derive(Debug, Clone)]
pub struct FeatureFile {
    pub file: PathBuf,
    pub name: String,
    pub description: Option<String>,
    pub entity: EntityDef,
    pub sources: BTreeMap<String, SourceMapping>,
    pub features: Vec<FeatureDef>,
    /// 1-based line of each feature's `name:` in the file, for error messages.
    pub feature_lines: Vec<Option<usize>>,
}

impl FeatureFile {
    pub fn load(path: &Path) -> Result<FeatureFile, ConfigError> {
        let raw: RawFeatureFile = load_yaml(path)?;
        let inv = |loc: String, msg: String| ConfigError::invalid(path, loc, msg);
        if !super::is_identifier(&raw.name) {
            return Err(inv(
                "name".into(),
                format!("`{}` is not an identifier", raw.name),
            ));
        }
        if raw.features.is_empty() {
            return Err(inv("features".into(), "no features defined".into()));
        }
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        let reserved: Vec<&str> = [raw.entity.key.as_str()]
            .into_iter()
            .chain(OUTPUT_COLUMNS)
            .collect();
        let mut feature_lines = Vec::new();
        for (i, f) in raw.features.iter().enumerate() {
            let line = find_line(&text, &f.name);
            let loc = match line {
                Some(l) => format!("features[{i}] `{}` (line {l})", f.name),
                None => format!("features[{i}] `{}`", f.name),
            };
            if !super::is_identifier(&f.name) || f.name != f.name.to_lowercase() {
                return Err(inv(
                    loc,
                    "feature names must be lower-case identifiers".into(),
                ));
            }
            if reserved.contains(&f.name.as_str()) || !seen.insert(f.name.clone()) {
                return Err(inv(loc, "duplicate or reserved feature name".into()));
            }
            if f.sql.trim().is_empty() {
                return Err(inv(loc, "empty sql".into()));
            }
            feature_lines.push(line);
        }
        let mut sources = BTreeMap::new();
        for (table, m) in raw.sources {
            let mapping = match (m.column, m.via) {
                (Some(c), None) => SourceMapping::Column(c),
                (None, Some(v)) => SourceMapping::Via {
                    table: v.table,
                    column: v.column,
                    references: v.references,
                },
                _ => {
                    return Err(inv(
                        format!("sources.{table}"),
                        "give exactly one of `column: <entity key column>` or \
                         `via: {table, column, references}`"
                            .into(),
                    ))
                }
            };
            sources.insert(table, mapping);
        }
        if sources.contains_key(&raw.entity.table) {
            return Err(inv(
                format!("sources.{}", raw.entity.table),
                "the entity table maps itself through entity.table_key; do not list it here".into(),
            ));
        }
        sources.insert(
            raw.entity.table.clone(),
            SourceMapping::Column(raw.entity.table_key.clone()),
        );
        // Every `via` must end, without cycles, at a table with a key column.
        for (table, _) in sources.iter() {
            let mut cur = table.as_str();
            for _ in 0..=sources.len() {
                match sources.get(cur) {
                    Some(SourceMapping::Column(_)) => break,
                    Some(SourceMapping::Via { table: next, .. }) => {
                        if !sources.contains_key(next) {
                            return Err(inv(
                                format!("sources.{table}.via.table"),
                                format!("`{next}` is not a mapped source of this file"),
                            ));
                        }
                        cur = next;
                    }
                    None => unreachable!("checked above"),
                }
            }
            if !matches!(sources.get(cur), Some(SourceMapping::Column(_))) {
                return Err(inv(
                    format!("sources.{table}"),
                    "`via` mappings form a cycle".into(),
                ));
            }
        }
        Ok(FeatureFile {
            file: path.to_path_buf(),
            name: raw.name,
            description: raw.description,
            entity: raw.entity,
            sources,
            features: raw.features,
            feature_lines,
        })
    }

    /// Source tables this file reads (the entity table included).
    pub fn source_tables(&self) -> impl Iterator<Item = &str> {
        self.sources.keys().map(String::as_str)
    }

    /// `file: features[i] `name` (line N)` for errors about feature `i`.
    pub fn locate(&self, i: usize) -> String {
        let f = &self.features[i];
        match self.feature_lines[i] {
            Some(l) => format!(
                "{}: feature `{}` (features[{i}], line {l})",
                self.file.display(),
                f.name
            ),
            None => format!(
                "{}: feature `{}` (features[{i}])",
                self.file.display(),
                f.name
            ),
        }
    }
}

/// Line of `name: <feature>` (or of a rule's `name:`) in the file text (best effort; used only in messages).
pub(super) fn find_line(text: &str, feature: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let t = l.trim_start().trim_start_matches("- ").trim();
            t.strip_prefix("name:")
                .map(|v| v.trim().trim_matches(['"', '\'']) == feature)
                .unwrap_or(false)
        })
        .map(|i| i + 1)
}
