//! How a feature file's `entity` and `sources` lead from a row of each source table to
//! the entity keys it belongs to, resolved once against the source schemas; and which
//! columns the state must index for it.

use super::FeatureError;
use crate::config::{FeatureFile, SourceMapping};
use crate::source::TableSchema;
use crate::state::is_key_type;

/// How rows of one table lead to entity keys (column positions in that table).
#[derive(Debug, Clone)]
pub enum Mapping {
    /// The column holds the entity key.
    Column(usize),
    /// The column references `ref_col` of table `target`, which maps further.
    Via {
        col: usize,
        target: usize,
        ref_col: usize,
    },
}

/// Resolves a feature file's `entity` and `sources` against the source schemas.
pub(crate) fn resolve_mappings(
    file: &FeatureFile,
    schemas: &[TableSchema],
) -> Result<Vec<Option<Mapping>>, FeatureError> {
    let table_index = |name: &str, loc: &str| {
        schemas
            .iter()
            .position(|s| s.name.name == name)
            .ok_or_else(|| FeatureError::Invalid {
                location: format!("{}: {loc}", file.file.display()),
                message: format!("table `{name}` is not a source table of the pipeline"),
            })
    };
    let column = |t: usize, name: &str, loc: &str| {
        let s = &schemas[t];
        let c = s.column_index(name).ok_or_else(|| FeatureError::Invalid {
            location: format!("{}: {loc}", file.file.display()),
            message: format!("table {} has no column `{name}`", s.name),
        })?;
        if !is_key_type(&s.columns[c].data_type) {
            return Err(FeatureError::Invalid {
                location: format!("{}: {loc}", file.file.display()),
                message: format!(
                    "column {}.{name} has type {}; mapping columns must be integers, text or dates",
                    s.name, s.columns[c].type_name
                ),
            });
        }
        Ok(c)
    };
    let mut out = vec![None; schemas.len()];
    for (name, m) in &file.sources {
        let loc = format!("sources.{name}");
        let t = table_index(name, &loc)?;
        out[t] = Some(match m {
            SourceMapping::Column(c) => Mapping::Column(column(t, c, &loc)?),
            SourceMapping::Via {
                table,
                column: col,
                references,
            } => {
                let target = table_index(table, &format!("{loc}.via.table"))?;
                Mapping::Via {
                    col: column(t, col, &format!("{loc}.via.column"))?,
                    target,
                    ref_col: column(target, references, &format!("{loc}.via.references"))?,
                }
            }
        });
    }
    Ok(out)
}

/// Columns of table `t` that some mapping looks up, in a stable order.
pub(crate) fn index_columns(t: usize, resolved: &[Vec<Option<Mapping>>]) -> Vec<usize> {
    let mut cols = Vec::new();
    let mut add = |c: usize| {
        if !cols.contains(&c) {
            cols.push(c);
        }
    };
    for file in resolved {
        match &file[t] {
            Some(Mapping::Column(c)) => add(*c),
            Some(Mapping::Via { col, .. }) => add(*col),
            None => {}
        }
        for m in file.iter().flatten() {
            if let Mapping::Via {
                target, ref_col, ..
            } = m
            {
                if *target == t {
                    add(*ref_col);
                }
            }
        }
    }
    cols
}
