//! Typed pipeline and feature-file configuration, validated once at load time.
//!
//! Every error names the file and, where serde can tell, the YAML path and line.

mod feature_file;
mod interpolate;

pub use feature_file::{EntityDef, FeatureDef, FeatureFile, FeatureType, SourceMapping};
pub use interpolate::interpolate;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {location}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        location: String,
        message: String,
    },
}

impl ConfigError {
    pub fn invalid(file: &Path, location: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: file.to_path_buf(),
            location: location.into(),
            message: message.into(),
        }
    }
}

/// `pipelines/*.yaml`: where data comes from, how it is batched, where it goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub name: String,
    pub source: SourceConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    pub lake: LakeConfig,
    /// Feature files, relative to the pipeline file's directory.
    pub features: Vec<PathBuf>,
    #[serde(default)]
    pub clock: ClockConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// libpq-style URL: postgres://user[:password]@host[:port]/database
    pub url: String,
    pub publication: String,
    /// Replication slot; default `<pipeline name>_<database>`. Slot names are per
    /// cluster, so each deployment needs its own.
    #[serde(default)]
    pub slot: Option<String>,
    /// Source tables, `name` (schema `public`) or `schema.name`.
    pub tables: Vec<String>,
    /// Connection attempts before giving up (with exponential backoff).
    #[serde(default = "default_connect_retries")]
    pub connect_retries: u32,
}

fn default_connect_retries() -> u32 {
    8
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
}

fn default_interval_ms() -> u64 {
    200
}
fn default_max_rows() -> usize {
    100_000
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            interval_ms: default_interval_ms(),
            max_rows: default_max_rows(),
        }
    }
}

impl BatchConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeConfig {
    /// A local directory (`./lake`, `file:///…`) or `s3://bucket/prefix`.
    pub url: String,
    /// Object-store settings passed to delta-rs (`aws_endpoint`, `aws_region`,
    /// `aws_allow_http`, …). Secrets only through `${VAR}` interpolation; the standard AWS
    /// environment variables and profile chain apply too.
    #[serde(default)]
    pub storage_options: std::collections::BTreeMap<String, String>,
    /// Checkpoints, compaction and vacuum, run beside the appends.
    #[serde(default)]
    pub maintenance: crate::sink::MaintenanceConfig,
}

impl LakeConfig {
    pub fn open(&self) -> Result<crate::sink::Lake, crate::sink::SinkError> {
        crate::sink::Lake::new(&self.url, &self.storage_options)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockConfig {
    /// Fixed as-of date (YYYY-MM-DD) for replaying historical dumps; empty means
    /// "the batch's source commit time".
    #[serde(default)]
    pub as_of: Option<String>,
}

/// A loaded pipeline: its config plus every feature file it names, all validated.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub file: PathBuf,
    pub config: PipelineConfig,
    pub as_of: Option<chrono::NaiveDate>,
    pub tables: Vec<TableName>,
    pub feature_files: Vec<FeatureFile>,
}

/// A source table's qualified name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn parse(s: &str) -> TableName {
        match s.split_once('.') {
            Some((schema, name)) => TableName {
                schema: schema.to_string(),
                name: name.to_string(),
            },
            None => TableName {
                schema: "public".to_string(),
                name: s.to_string(),
            },
        }
    }

    /// `"schema"."name"`, safe to splice into SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// Reads `path`, interpolates the environment, and deserializes with path-aware errors.
pub(crate) fn load_yaml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let raw = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_path_buf(),
        source,
    })?;
    let text = interpolate(&raw, path, &|k| std::env::var(k).ok())?;
    let de = serde_yaml::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let yaml_path = e.path().to_string();
        let inner = e.into_inner();
        let line = inner
            .location()
            .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
            .unwrap_or_default();
        // serde_yaml already appends "at line N column M" to some messages; keep ours uniform.
        let message = inner.to_string();
        let message = message.split(" at line ").next().unwrap_or(&message);
        let message = message
            .strip_prefix(&format!("{yaml_path}: "))
            .unwrap_or(message)
            .to_string();
        ConfigError::invalid(path, format!("{yaml_path}{line}"), message)
    })
}

impl Pipeline {
    /// The replication slot for `database`: the configured one, or
    /// `<pipeline name>_<database>` (lower case, non-identifier characters as `_`).
    pub fn slot_name(&self, database: &str) -> String {
        if let Some(s) = &self.config.source.slot {
            return s.clone();
        }
        let raw = format!("{}_{}", self.config.name, database).to_lowercase();
        let clean: String = raw
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        clean.chars().take(63).collect()
    }

    /// Loads and validates the pipeline file and every feature file it names.
    pub fn load(path: &Path) -> Result<Pipeline, ConfigError> {
        let config: PipelineConfig = load_yaml(path)?;
        let inv = |loc: &str, msg: String| ConfigError::invalid(path, loc, msg);
        let mut config = config;
        if config
            .source
            .slot
            .as_deref()
            .is_some_and(|s| s.trim().is_empty())
        {
            config.source.slot = None;
        }
        let slot = config
            .source
            .slot
            .clone()
            .unwrap_or_else(|| "default".into());
        for (key, v) in [
            ("source.publication", &config.source.publication),
            ("source.slot", &slot),
            ("name", &config.name),
        ] {
            if !is_identifier(v) {
                return Err(inv(
                    key,
                    format!("`{v}` must be a plain identifier (letters, digits, _)"),
                ));
            }
        }
        if slot != slot.to_lowercase() {
            return Err(inv(
                "source.slot",
                "replication slot names must be lower case".into(),
            ));
        }
        if config.lake.maintenance.vacuum_retention_hours < 1 {
            // Vacuum deletes unreferenced files older than this; a shorter window could
            // delete the Parquet files of an append that has not committed yet.
            return Err(inv(
                "lake.maintenance.vacuum_retention_hours",
                "must be at least 1".into(),
            ));
        }
        if config.source.tables.is_empty() {
            return Err(inv("source.tables", "at least one table is needed".into()));
        }
        if config.batch.interval_ms == 0 || config.batch.max_rows == 0 {
            return Err(inv(
                "batch",
                "interval_ms and max_rows must be positive".into(),
            ));
        }
        if config.features.is_empty() {
            return Err(inv(
                "features",
                "at least one feature file is needed".into(),
            ));
        }
        let as_of = match config.clock.as_of.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(
                chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|e| {
                    inv(
                        "clock.as_of",
                        format!("`{s}` is not a date (YYYY-MM-DD): {e}"),
                    )
                })?,
            ),
        };
        let tables: Vec<TableName> = config
            .source
            .tables
            .iter()
            .map(|t| TableName::parse(t))
            .collect();
        let base = path.parent().unwrap_or(Path::new("."));
        let mut feature_files = Vec::new();
        for (i, f) in config.features.iter().enumerate() {
            let fpath = base.join(f);
            if !fpath.exists() {
                return Err(inv(
                    &format!("features[{i}]"),
                    format!("feature file {} does not exist", fpath.display()),
                ));
            }
            let ff = FeatureFile::load(&fpath)?;
            for t in ff.source_tables() {
                if !tables.iter().any(|x| x.name == t) {
                    return Err(ConfigError::invalid(
                        &fpath,
                        "sources",
                        format!(
                            "reads table `{t}`, which is not in {}'s source.tables",
                            path.display()
                        ),
                    ));
                }
            }
            if feature_files
                .iter()
                .any(|x: &FeatureFile| x.name == ff.name)
            {
                return Err(ConfigError::invalid(
                    &fpath,
                    "name",
                    format!("feature table `{}` is defined twice", ff.name),
                ));
            }
            feature_files.push(ff);
        }
        Ok(Pipeline {
            file: path.to_path_buf(),
            config,
            as_of,
            tables,
            feature_files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_default_to_public_and_quote_reserved_words() {
        let t = TableName::parse("user");
        assert_eq!(t.schema, "public");
        assert_eq!(t.quoted(), "\"public\".\"user\"");
        assert_eq!(TableName::parse("crm.loan").schema, "crm");
    }
}
