//! The scoring model: an ONNX file a data scientist exports (`examples/train_model.py`),
//! run in-process with tract (pure Rust, builds from crates.io alone).
//!
//! The file describes itself in its metadata: `feature_names` (comma-separated, the
//! order of the input row), `fill_values` (what a NULL feature becomes, same order),
//! `model_name` and `model_version`, and `check_inputs` / `check_scores`: rows and the
//! probabilities the training library gave them, which the engine must reproduce when it
//! loads the model. Its first input takes a `[1, n]` float row; the output named
//! `probabilities` (`[1, classes]`) gives the score, the probability of class 1 (the bad
//! outcome).

use super::DecideError;
use std::path::Path;
use std::sync::Arc;
use tract_onnx::prelude::*;

type Plan = Arc<TypedRunnableModel>;

pub(crate) struct Model {
    /// `name@version`.
    pub(crate) id: String,
    /// Input names, in the order the model takes them.
    pub(crate) inputs: Vec<String>,
    /// The value each input takes when its feature is NULL.
    fill: Vec<f32>,
    plan: Plan,
    output: usize,
}

impl Model {
    /// Loads and checks `path`; errors name the file and what is wrong.
    pub(crate) fn load(path: &Path) -> Result<Model, DecideError> {
        let err = |message: String| DecideError::Model {
            file: path.to_path_buf(),
            message,
        };
        let onnx = onnx();
        let proto = onnx
            .proto_model_for_path(path)
            .map_err(|e| err(format!("not a readable ONNX model: {e:#}")))?;
        let meta = |key: &str| {
            proto
                .metadata_props
                .iter()
                .find(|p| p.key == key)
                .map(|p| p.value.clone())
        };
        let inputs: Vec<String> = meta("feature_names")
            .ok_or_else(|| {
                err("its metadata has no `feature_names` (see examples/train_model.py)".into())
            })?
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let fill: Vec<f32> = match meta("fill_values") {
            Some(v) => v
                .split(',')
                .map(|s| s.trim().parse::<f32>())
                .collect::<Result<_, _>>()
                .map_err(|e| err(format!("metadata `fill_values` `{v}`: {e}")))?,
            None => vec![0.0; inputs.len()],
        };
        if fill.len() != inputs.len() {
            return Err(err(format!(
                "metadata has {} feature_names but {} fill_values",
                inputs.len(),
                fill.len()
            )));
        }
        let id = format!(
            "{}@{}",
            meta("model_name").unwrap_or_else(|| "model".into()),
            meta("model_version").unwrap_or_else(|| proto.model_version.to_string())
        );
        let outputs: Vec<String> = proto
            .graph
            .as_ref()
            .map(|g| g.output.iter().map(|o| o.name.clone()).collect())
            .unwrap_or_default();
        let output = outputs
            .iter()
            .position(|o| o == "probabilities")
            .ok_or_else(|| {
                err(format!(
                    "no output named `probabilities` (outputs: {outputs:?})"
                ))
            })?;
        let n = inputs.len();
        let plan = onnx
            .model_for_proto_model(&proto)
            .and_then(|m| m.with_input_fact(0, f32::fact([1, n]).into()))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| {
                err(format!(
                    "cannot run it on a row of {n} floats ({}): {e:#}",
                    inputs.join(", ")
                ))
            })?;
        let model = Model {
            id,
            inputs,
            fill,
            plan,
            output,
        };
        // One run now, so that a model that cannot score fails the start, not a request.
        model
            .score(&vec![None; n])
            .map_err(|e| err(e.to_string()))?;
        // The training library's own probabilities for a few rows, when the file has them.
        if let (Some(rows), Some(scores)) = (meta("check_inputs"), meta("check_scores")) {
            model.check(&rows, &scores).map_err(err)?;
        }
        Ok(model)
    }

    /// Scores the training library's own rows and compares: the same model must give the
    /// same probabilities here.
    fn check(&self, rows: &str, scores: &str) -> Result<(), String> {
        let rows: Vec<Vec<f32>> =
            serde_json::from_str(rows).map_err(|e| format!("metadata `check_inputs`: {e}"))?;
        let scores: Vec<f64> =
            serde_json::from_str(scores).map_err(|e| format!("metadata `check_scores`: {e}"))?;
        if rows.len() != scores.len() {
            return Err(format!(
                "metadata has {} check_inputs rows but {} check_scores",
                rows.len(),
                scores.len()
            ));
        }
        for (row, want) in rows.iter().zip(&scores) {
            if row.len() != self.inputs.len() {
                return Err(format!(
                    "a check_inputs row has {} values for {} feature_names",
                    row.len(),
                    self.inputs.len()
                ));
            }
            let input: Vec<Option<f32>> = row.iter().copied().map(Some).collect();
            let got = self.score(&input).map_err(|e| e.to_string())?;
            if (got - want).abs() > 1e-4 {
                return Err(format!(
                    "scores {row:?} as {got:.6}, but training gave {want:.6}: this runtime \
                     does not reproduce the trained model"
                ));
            }
        }
        Ok(())
    }

    /// The probability of class 1 for one row of inputs (None: NULL, filled).
    pub(crate) fn score(&self, row: &[Option<f32>]) -> Result<f64, DecideError> {
        let values: Vec<f32> = row
            .iter()
            .zip(&self.fill)
            .map(|(v, fill)| v.unwrap_or(*fill))
            .collect();
        let err = |e: TractError| DecideError::Score(format!("{e:#}"));
        let input = Tensor::from_shape(&[1, values.len()], &values).map_err(err)?;
        let out = self.plan.run(tvec!(input.into_tvalue())).map_err(err)?;
        let probs = out[self.output].to_plain_array_view::<f32>().map_err(err)?;
        let p = probs.iter().nth(1).ok_or_else(|| {
            DecideError::Score("the model gives fewer than two class probabilities".into())
        })?;
        Ok(f64::from(*p))
    }
}
