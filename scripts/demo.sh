#!/usr/bin/env bash
# One command for a fresh machine: Postgres with wal_level=logical, data loaded, the
# pipeline built and run on the local lake (./lake), and feature rows shown arriving
# as the demo changes data. `--fresh` reloads the database and empties the lake.
# `--s3` puts the lake on a local S3-API server (s3s-fs on 127.0.0.1:9000, data in ./s3data).
set -euo pipefail
cd "$(dirname "$0")/.."
fresh=false s3=false
for arg in "$@"; do
  case $arg in
    --fresh) fresh=true ;;
    --s3) s3=true ;;
    *) echo "usage: $0 [--fresh] [--s3]" >&2; exit 2 ;;
  esac
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pipeline-target}
export PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432/de_test_task_db}
if $s3; then
  export S3_PORT=${S3_PORT:-9000} AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-pipeline}
  export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-pipeline-secret} AWS_REGION=${AWS_REGION:-us-east-1}
  export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_ALLOW_HTTP=true
  bash scripts/setup-s3.sh --start ./s3data
  export LAKE_URL=s3://lake/loan_features
  lake_dir=./s3data/lake/loan_features
fi
export LAKE_URL=${LAKE_URL:-./lake}
$s3 || lake_dir=$LAKE_URL
PIPELINE=pipelines/loan_features.yaml
BIN=$CARGO_TARGET_DIR/release/pipeline
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

bash scripts/setup-postgres.sh

say "building (release; the first build takes ~30 min on 2 cores)"
cargo build --release --bin pipeline

db=${PG_URL##*/}
has_data=$(psql -X -tA "$PG_URL" -c "SELECT to_regclass('public.loan') IS NOT NULL" 2>/dev/null || true)
if $fresh || [ "$has_data" != "t" ]; then
  rm -rf "$lake_dir"
  if [ -f ../shared/dumps/de_test_task_db ]; then
    say "restoring ../shared/dumps/de_test_task_db into $db"
    "$BIN" db restore --clean ../shared/dumps/de_test_task_db
  else
    say "no dump found: seeding deterministic data into $db"
    "$BIN" db seed --clean --users 20000
  fi
fi

"$BIN" validate "$PIPELINE"
say "running the pipeline (snapshot on first run, then streaming); log: pipeline.log"
"$BIN" run "$PIPELINE" >pipeline.log 2>&1 &
pid=$!
trap 'kill -INT $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  grep -q "streaming changes" pipeline.log && break
  kill -0 $pid 2>/dev/null || { cat pipeline.log; exit 1; }
  sleep 0.2
done
grep -E "snapshot|state rebuilt|streaming" pipeline.log | sed 's/^/  /'

client=$(psql -X -tA "$PG_URL" -c 'SELECT id FROM "user" ORDER BY id LIMIT 1')
say "client $client before the demo changes"
"$BIN" latest "$PIPELINE" "$client"

psql -X -q "$PG_URL" <<SQL
INSERT INTO loan (id, client_id, amount, created_on, duration, matured_on, status, updated_on)
VALUES ((SELECT max(id) + 1 FROM loan), $client, 500, CURRENT_DATE, 30, CURRENT_DATE + 30, 'paid', CURRENT_DATE);
SQL
sleep 0.5
say "after inserting a paid loan for client $client (paid_loans_count +1)"
"$BIN" latest "$PIPELINE" "$client"

psql -X -q "$PG_URL" <<SQL
INSERT INTO payment (id, loan_id, amount, principle, interest, status, created_on)
VALUES ((SELECT max(id) + 1 FROM payment), (SELECT max(id) FROM loan WHERE client_id = $client), 550, 500, 50, 'late', CURRENT_DATE);
SQL
sleep 0.5
say "after a late payment today (days_since_last_late_payment = 0, profit rate 0.1)"
"$BIN" latest "$PIPELINE" "$client"

API=http://${PIPELINE_LISTEN:-127.0.0.1:8080}
say "the same client online, from memory (GET $API/v1/features/client_features/$client)"
curl -sf "$API/v1/features/client_features/$client" | python3 -m json.tool

if grep -q "serving decisions" pipeline.log; then
  say "a new client applies for a loan: committed in the CRM, then decided on features that include it"
  read -r new_client new_loan <<<"$(psql -X -tA -F' ' "$PG_URL" -c \
    'SELECT (SELECT max(id) + 1 FROM "user"), (SELECT max(id) + 1 FROM loan)')"
  lsn=$(psql -X -tA -q "$PG_URL" <<SQL
BEGIN;
INSERT INTO "user" (id, created_on, first_name) VALUES ($new_client, CURRENT_DATE, 'Demo');
INSERT INTO loan (id, client_id, amount, created_on, duration, matured_on, status, updated_on)
VALUES ($new_loan, $new_client, 1200, CURRENT_DATE, 90, CURRENT_DATE + 90, 'application', CURRENT_DATE);
COMMIT;
SELECT pg_current_wal_lsn();
SQL
)
  echo "  committed client $new_client, application $new_loan; pg_current_wal_lsn() = $lsn"
  echo "  POST $API/v1/decisions {\"client_id\": $new_client, \"loan_id\": $new_loan, \"min_lsn\": \"$lsn\"}"
  curl -sf -X POST "$API/v1/decisions" -H 'content-type: application/json' \
    -d "{\"client_id\": $new_client, \"loan_id\": $new_loan, \"min_lsn\": \"$lsn\"}" | python3 -m json.tool
fi

say "stopping (SIGINT: flush, commit, acknowledge)"
kill -INT $pid; wait $pid || true
trap - EXIT
tail -n 3 pipeline.log | sed 's/^/  /'
say "the lake: $LAKE_URL (raw/<table> change logs, features/client_features); read it with examples/read_lake.py"
