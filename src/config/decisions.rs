//! `decisions/*.yaml`: how a loan application is decided from served features: the
//! feature file whose entity the request names, the application row the engine's state
//! holds, the scoring model, and ordered rules over features and the score.

use super::{find_line, is_identifier, load_yaml, ConfigError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawDecisionsFile {
    name: String,
    #[serde(default)]
    description: Option<String>,
    features: String,
    #[serde(default)]
    application: Option<ApplicationDef>,
    model: PathBuf,
    rules: Vec<RuleDef>,
}

/// The application (a source row, e.g. the loan) a request names, as the engine's state
/// holds it: its columns join the features as `application_<column>`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationDef {
    /// Request field carrying the application's key (e.g. `loan_id`).
    pub field: String,
    /// Source table and its primary-key column.
    pub table: String,
    pub key: String,
    /// Column that must equal the request's entity key (e.g. `client_id`).
    pub entity_column: String,
    /// Columns the model and the rules may use.
    pub columns: Vec<String>,
}

/// One rule: when `when` holds (a SQL boolean expression over the features,
/// `application_<column>`s and `score`), the application is rejected with `reason`.
/// NULL counts as not holding.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDef {
    pub name: String,
    pub when: String,
    pub reason: String,
}

/// A validated decisions file.
#[derive(Debug, Clone)]
pub struct DecisionsFile {
    pub file: PathBuf,
    /// Audit table `<lake>/decisions/<name>`.
    pub name: String,
    pub description: Option<String>,
    /// The feature file (by name) whose entity key the request carries.
    pub features: String,
    pub application: Option<ApplicationDef>,
    /// The ONNX model, resolved against the file's directory.
    pub model: PathBuf,
    pub rules: Vec<RuleDef>,
    /// 1-based line of each rule's `name:`, for error messages.
    pub rule_lines: Vec<Option<usize>>,
}

impl DecisionsFile {
    pub fn load(path: &Path) -> Result<DecisionsFile, ConfigError> {
        let raw: RawDecisionsFile = load_yaml(path)?;
        let inv = |loc: String, msg: String| ConfigError::invalid(path, loc, msg);
        if !is_identifier(&raw.name) {
            return Err(inv(
                "name".into(),
                format!("`{}` is not an identifier", raw.name),
            ));
        }
        if raw.rules.is_empty() {
            return Err(inv("rules".into(), "no rules defined".into()));
        }
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut rule_lines = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, r) in raw.rules.iter().enumerate() {
            let line = find_line(&text, &r.name);
            let loc = locate_rule(i, &r.name, line);
            if !is_identifier(&r.name) || !seen.insert(r.name.clone()) {
                return Err(inv(loc, "rule names must be distinct identifiers".into()));
            }
            if r.when.trim().is_empty() || r.reason.trim().is_empty() {
                return Err(inv(loc, "a rule needs `when` and `reason`".into()));
            }
            rule_lines.push(line);
        }
        if let Some(a) = &raw.application {
            for (at, v) in [
                ("field", &a.field),
                ("table", &a.table),
                ("key", &a.key),
                ("entity_column", &a.entity_column),
            ] {
                if !is_identifier(v) {
                    return Err(inv(
                        format!("application.{at}"),
                        format!("`{v}` is not an identifier"),
                    ));
                }
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let model = base.join(&raw.model);
        Ok(DecisionsFile {
            file: path.to_path_buf(),
            name: raw.name,
            description: raw.description,
            features: raw.features,
            application: raw.application,
            model,
            rules: raw.rules,
            rule_lines,
        })
    }

    /// `file: rule `name` (rules[i], line N)` for errors about rule `i`.
    pub fn locate(&self, i: usize) -> String {
        format!(
            "{}: {}",
            self.file.display(),
            locate_rule(i, &self.rules[i].name, self.rule_lines[i])
        )
    }
}

fn locate_rule(i: usize, name: &str, line: Option<usize>) -> String {
    match line {
        Some(l) => format!("rule `{name}` (rules[{i}], line {l})"),
        None => format!("rule `{name}` (rules[{i}])"),
    }
}
