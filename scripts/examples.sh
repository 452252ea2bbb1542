#!/usr/bin/env bash
# Produces a small lake with the pipeline and reads it from Python with deltalake,
# Polars and DuckDB (examples/read_lake.py), builds training sets and reads them back
# (examples/read_training_set.py), then trains the decision model on the lake
# (examples/train_model.py) and checks the engine accepts the exported ONNX file.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pipeline-target}
venv=${EXAMPLES_VENV:-$HOME/.cache/pipeline-examples-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q -r examples/requirements.txt

cargo build --bin pipeline
bin=$CARGO_TARGET_DIR/debug/pipeline
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PG_URL=postgres://postgres@127.0.0.1:5432/pt_examples
export LAKE_URL=$work/lake
export AS_OF=2020-08-23
export PIPELINE_SLOT=examples_slot
"$bin" db seed --clean --users 2000
"$bin" run pipelines/loan_features.yaml --once
psql -X -q "$PG_URL" -c "SELECT pg_drop_replication_slot('examples_slot')" >/dev/null
"$venv/bin/python" examples/read_lake.py "$LAKE_URL" --expect-clients 2000

# Training sets from the same lake, read back with Polars, DuckDB, pyarrow and deltalake:
# event time (every loan application, as of its date) to Parquet, known time (every
# client, now) to a Delta table.
"$bin" training-set pipelines/loan_features.yaml --mode event \
  --spine "SELECT id AS loan_id, client_id, created_on, status = 'overdue' AS label FROM loan" \
  --key client_id --time created_on --out "$work/train_event.parquet"
loans=$(psql -X -tA "$PG_URL" -c "SELECT count(*) FROM loan")
"$venv/bin/python" examples/read_training_set.py "$work/train_event.parquet" --expect-rows "$loans"
"$bin" training-set pipelines/loan_features.yaml --mode known \
  --spine "SELECT id AS client_id, now() AS at FROM \"user\"" --key client_id --time at \
  --out "$work/train_known"
"$venv/bin/python" examples/read_training_set.py "$work/train_known" --expect-rows 2000

# The model loop, on the shared dump when it is there (the seeded data otherwise; AS_OF is
# the dump's last day): an event-time training set, models on the current features vs
# point-in-time ones, the ONNX export; then `pipeline validate` loads the ONNX file with
# the decision rules (feature names, and the model's own check rows scored in Rust must
# match scikit-learn's probabilities).
dump=../shared/dumps/de_test_task_db
if [ -e "$dump" ]; then
  export PG_URL=postgres://postgres@127.0.0.1:5432/pt_examples_dump
  export LAKE_URL=$work/dump_lake
  export PIPELINE_SLOT=examples_dump_slot
  "$bin" db restore "$dump" --clean
  "$bin" run pipelines/loan_features.yaml --once
  psql -X -q "$PG_URL" -c "SELECT pg_drop_replication_slot('examples_dump_slot')" >/dev/null
fi
"$venv/bin/python" examples/train_model.py pipelines/loan_features.yaml --lake "$LAKE_URL" \
  --bin "$bin" --out "$work/model.onnx"
sed "s|^model: .*|model: $work/model.onnx|" decisions/loan_rules.yaml >"$work/rules.yaml"
sed -e "s|\.\./feature_defs/|$PWD/feature_defs/|" -e "s|^decisions: .*|decisions: $work/rules.yaml|" \
  pipelines/loan_features.yaml >"$work/pipeline.yaml"
"$bin" validate "$work/pipeline.yaml"
