//! Typed pipeline and feature-file configuration, validated once at load time.
//!
//! Every error names the file and, where serde can tell, the YAML path and line.

mod decisions;
mod feature_file;
mod interpolate;
mod maintenance;
mod serve;

pub use decisions::{ApplicationDef, DecisionsFile, RuleDef};
use feature_file::find_line;
pub use feature_file::{
    EntityDef, FeatureDef, FeatureFile, FeatureType, SourceMapping, COMPUTED_AT, DELETED,
    FEATURE_TIME, OUTPUT_COLUMNS, OUTPUT_COMMIT_TS, OUTPUT_LSN,
};
pub use interpolate::interpolate;
pub use maintenance::MaintenanceConfig;
pub use serve::ServeConfig;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
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

/// What a section's own check found wrong: the YAML path below the section and why.
/// [`Invalid::within`] puts the section's path in front as the error travels up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub at: String,
    pub message: String,
}

impl Invalid {
    pub fn at(at: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid {
            at: at.into(),
            message: message.into(),
        }
    }

    /// The same fault, seen from the enclosing section `section`.
    pub fn within(self, section: &str) -> Invalid {
        let at = match self.at.is_empty() {
            true => section.to_string(),
            false => format!("{section}.{}", self.at),
        };
        Invalid { at, ..self }
    }

    fn in_file(self, file: &Path) -> ConfigError {
        ConfigError::invalid(file, self.at, self.message)
    }
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
/// Deserialized from the file, or built in code (tests, benchmarks) and saved with
/// [`PipelineConfig::save`]; [`Pipeline::from_config`] validates either.
#[derive(Debug, Clone, Deserialize, Serialize)]
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
    /// The online API; off when the file has no `serve:` section.
    #[serde(default = "ServeConfig::disabled")]
    pub serve: ServeConfig,
    /// A decisions file (rules + model) served as `POST /v1/decisions`, relative to this
    /// file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decisions: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// libpq-style URL: `postgres://user[:password]@host[:port]/database`
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

impl SourceConfig {
    /// A source on `url` publishing `tables` through `publication`, other settings at
    /// their defaults.
    pub fn new(url: impl Into<String>, publication: impl Into<String>, tables: &[&str]) -> Self {
        SourceConfig {
            url: url.into(),
            publication: publication.into(),
            slot: None,
            tables: tables.iter().map(|t| t.to_string()).collect(),
            connect_retries: default_connect_retries(),
        }
    }

    /// The configured slot, if one is set (an empty value means the default).
    pub fn slot(&self) -> Option<&str> {
        self.slot.as_deref().filter(|s| !s.trim().is_empty())
    }

    fn validate(&self) -> Result<(), Invalid> {
        plain_identifier("publication", &self.publication)?;
        if let Some(slot) = self.slot() {
            plain_identifier("slot", slot)?;
            if slot != slot.to_lowercase() {
                return Err(Invalid::at(
                    "slot",
                    "replication slot names must be lower case",
                ));
            }
        }
        if self.tables.is_empty() {
            return Err(Invalid::at("tables", "at least one table is needed"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
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

    fn validate(&self) -> Result<(), Invalid> {
        if self.interval_ms == 0 {
            return Err(Invalid::at("interval_ms", "must be positive"));
        }
        if self.max_rows == 0 {
            return Err(Invalid::at("max_rows", "must be positive"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
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
    pub maintenance: MaintenanceConfig,
}

impl LakeConfig {
    /// A lake at `url` (a directory or `s3://…`), other settings at their defaults.
    pub fn new(url: impl Into<String>) -> LakeConfig {
        LakeConfig {
            url: url.into(),
            storage_options: Default::default(),
            maintenance: MaintenanceConfig::default(),
        }
    }

    pub fn open(&self) -> Result<crate::sink::Lake, crate::sink::SinkError> {
        let retention = self.maintenance.log_retention_minutes.saturating_mul(60);
        Ok(crate::sink::Lake::new(&self.url, &self.storage_options)?
            .with_log_retention(Duration::from_secs(retention)))
    }

    fn validate(&self) -> Result<(), Invalid> {
        if self.url.trim().is_empty() {
            return Err(Invalid::at("url", "the lake needs a URL or directory"));
        }
        self.maintenance
            .validate()
            .map_err(|e| e.within("maintenance"))
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClockConfig {
    /// Fixed as-of date (YYYY-MM-DD) for replaying historical dumps; empty means
    /// "the batch's source commit time".
    #[serde(default)]
    pub as_of: Option<String>,
}

impl ClockConfig {
    /// The fixed as-of date, if one is set.
    fn as_of(&self) -> Result<Option<chrono::NaiveDate>, Invalid> {
        match self.as_of.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(s) => chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .map(Some)
                .map_err(|e| {
                    Invalid::at("as_of", format!("`{s}` is not a date (YYYY-MM-DD): {e}"))
                }),
        }
    }
}

impl PipelineConfig {
    /// A pipeline named `name` from `source` into `lake`, computing `features` (paths
    /// relative to the directory the file is saved in, or absolute).
    pub fn new(
        name: impl Into<String>,
        source: SourceConfig,
        lake: LakeConfig,
        features: Vec<PathBuf>,
    ) -> PipelineConfig {
        PipelineConfig {
            name: name.into(),
            source,
            batch: BatchConfig::default(),
            lake,
            features,
            clock: ClockConfig::default(),
            serve: ServeConfig::disabled(),
            decisions: None,
        }
    }

    /// Writes the config as a pipeline file `path` (YAML).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let yaml = serde_yaml::to_string(self).map_err(std::io::Error::other)?;
        std::fs::write(path, yaml)
    }

    /// Every section's own checks, each error at its YAML path.
    fn validate(&self) -> Result<(), Invalid> {
        plain_identifier("name", &self.name)?;
        self.source.validate().map_err(|e| e.within("source"))?;
        self.batch.validate().map_err(|e| e.within("batch"))?;
        self.lake.validate().map_err(|e| e.within("lake"))?;
        self.clock.as_of().map_err(|e| e.within("clock"))?;
        self.serve.validate().map_err(|e| e.within("serve"))?;
        if self.features.is_empty() {
            return Err(Invalid::at(
                "features",
                "at least one feature file is needed",
            ));
        }
        Ok(())
    }
}

fn plain_identifier(at: &str, v: &str) -> Result<(), Invalid> {
    match is_identifier(v) {
        true => Ok(()),
        false => Err(Invalid::at(
            at,
            format!("`{v}` must be a plain identifier (letters, digits, _)"),
        )),
    }
}

/// A loaded pipeline: its config plus every feature file it names, all validated.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub file: PathBuf,
    pub config: PipelineConfig,
    pub as_of: Option<chrono::NaiveDate>,
    pub tables: Vec<TableName>,
    pub feature_files: Vec<FeatureFile>,
    pub decisions: Option<DecisionsFile>,
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
    /// The app id of the `txn` actions this pipeline commits with slot `slot`: what each
    /// Delta table's progress is read by.
    pub fn app_id(&self, slot: &str) -> String {
        format!("pipeline-{}-{}", self.config.name, slot)
    }

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
        Pipeline::from_config(load_yaml(path)?, path)
    }

    /// Validates `config` as the pipeline file `file` (which names it in errors and
    /// anchors relative feature paths; it need not exist) and loads its feature files.
    pub fn from_config(mut config: PipelineConfig, file: &Path) -> Result<Pipeline, ConfigError> {
        config.validate().map_err(|e| e.in_file(file))?;
        if config.source.slot().is_none() {
            config.source.slot = None;
        }
        let as_of = config
            .clock
            .as_of()
            .map_err(|e| e.within("clock").in_file(file))?;
        let tables: Vec<TableName> = config
            .source
            .tables
            .iter()
            .map(|t| TableName::parse(t))
            .collect();
        let base = file.parent().unwrap_or(Path::new("."));
        let mut feature_files = Vec::new();
        for (i, f) in config.features.iter().enumerate() {
            let fpath = base.join(f);
            if !fpath.exists() {
                return Err(ConfigError::invalid(
                    file,
                    format!("features[{i}]"),
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
                            file.display()
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
        let decisions = match &config.decisions {
            None => None,
            Some(d) => {
                let dpath = base.join(d);
                if !dpath.exists() {
                    return Err(ConfigError::invalid(
                        file,
                        "decisions",
                        format!("decisions file {} does not exist", dpath.display()),
                    ));
                }
                let dec = DecisionsFile::load(&dpath)?;
                if !feature_files.iter().any(|f| f.name == dec.features) {
                    return Err(ConfigError::invalid(
                        &dpath,
                        "features",
                        format!(
                            "`{}` is not a feature file of {} (it has: {})",
                            dec.features,
                            file.display(),
                            feature_files
                                .iter()
                                .map(|f| f.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
                if let Some(a) = &dec.application {
                    if !tables.iter().any(|t| t.name == a.table) {
                        return Err(ConfigError::invalid(
                            &dpath,
                            "application.table",
                            format!("`{}` is not in source.tables", a.table),
                        ));
                    }
                }
                Some(dec)
            }
        };
        Ok(Pipeline {
            file: file.to_path_buf(),
            config,
            as_of,
            tables,
            feature_files,
            decisions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_section_names_its_yaml_path_and_a_built_config_round_trips() {
        let mut config = PipelineConfig::new(
            "demo",
            SourceConfig::new("postgres://h/db", "pub", &["user"]),
            LakeConfig::new("./lake"),
            vec!["f.yaml".into()],
        );
        assert_eq!(config.validate(), Ok(()));
        config.lake.maintenance.vacuum_retention_hours = 0;
        assert_eq!(
            config.validate().unwrap_err().at,
            "lake.maintenance.vacuum_retention_hours"
        );
        config.lake.maintenance = MaintenanceConfig::default();
        config.batch.max_rows = 0;
        assert_eq!(config.validate().unwrap_err().at, "batch.max_rows");
        config.batch = BatchConfig::default();
        config.source.slot = Some("Upper".into());
        assert_eq!(config.validate().unwrap_err().at, "source.slot");
        config.source.slot = Some(String::new());
        assert_eq!(config.validate(), Ok(()), "an empty slot means the default");
        config.clock.as_of = Some("2020-13-01".into());
        assert_eq!(config.validate().unwrap_err().at, "clock.as_of");
        config.clock.as_of = Some("2020-08-23".into());

        let yaml = serde_yaml::to_string(&config).unwrap();
        let back: PipelineConfig = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(serde_yaml::to_string(&back).unwrap(), yaml);
    }

    #[test]
    fn table_names_default_to_public_and_quote_reserved_words() {
        let t = TableName::parse("user");
        assert_eq!(t.schema, "public");
        assert_eq!(t.quoted(), "\"public\".\"user\"");
        assert_eq!(TableName::parse("crm.loan").schema, "crm");
    }
}
