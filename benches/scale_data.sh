#!/usr/bin/env bash
# `run --once` (snapshot → raw mirror + every entity's features) at 1× and 10× the shared
# dump's size, from `pipeline db seed` (same shape: ~1.47 loans and ~0.77 payments per
# user): wall time and peak RSS, so memory per million entities and per million source rows
# can be read off. Usage: bash benches/scale_data.sh [users at 1×, default 113836]
# Needs the release binary (cargo bench --no-run builds it) and the local Postgres.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BENCH_PIPELINE_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/pipeline-target}/release/pipeline}
base=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
users=${1:-113836}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for scale in 1 10; do
  n=$((users * scale))
  url="$base/bench_scale_$scale"
  echo "== ${scale}x: $n users" >&2
  "$bin" db --url "$url" seed --clean --users "$n" --seed 7 >&2
  rows=$(psql -X -tA "$url" -c 'SELECT (SELECT count(*) FROM "user") + (SELECT count(*) FROM loan) + (SELECT count(*) FROM payment)')
  cat > "$work/p$scale.yaml" <<YAML
name: scale$scale
source: { url: "$url", publication: scale_pub, slot: scale_slot_$scale, tables: [user, loan, payment] }
lake: { url: "$work/lake$scale" }
features: [ $PWD/feature_defs/client_features.yaml ]
clock: { as_of: "2020-08-23" }
YAML
  psql -X -tA "$url" -c "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots WHERE slot_name = 'scale_slot_$scale'" >/dev/null
  /usr/bin/time -f "%e %M" -o "$work/time$scale" env RUST_LOG=warn "$bin" run --once "$work/p$scale.yaml"
  read -r wall kb < "$work/time$scale"
  psql -X -tA "$url" -c "SELECT pg_drop_replication_slot('scale_slot_$scale')" >/dev/null
  awk -v s="$scale" -v n="$n" -v r="$rows" -v w="$wall" -v kb="$kb" 'BEGIN {
    mib = kb / 1024
    printf "scale=%sx users=%d source_rows=%d once_wall_s=%s peak_rss_mib=%.0f mib_per_million_users=%.0f mib_per_million_rows=%.0f\n",
      s, n, r, w, mib, mib * 1e6 / n, mib * 1e6 / r }'
done
