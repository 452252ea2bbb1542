#!/usr/bin/env bash
# Produces a small lake with the pipeline and reads it from Python with deltalake,
# Polars and DuckDB (examples/read_lake.py).
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
