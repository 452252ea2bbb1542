#!/usr/bin/env bash
# Installs s3s-fs (an S3-API server over a local directory, from crates.io) for the tests and
# the S3 demo. It honours conditional writes (If-None-Match), which Delta commits rely on.
# Idempotent. `--start DIR` also starts it on 127.0.0.1:${S3_PORT:-9000} serving DIR.
set -euo pipefail
log() { echo "[setup-s3] $*" >&2; }
VERSION=0.14.1
bin="${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs"
if [ ! -x "$bin" ] || ! "$bin" --version 2>/dev/null | grep -q "$VERSION"; then
  log "installing s3s-fs $VERSION from crates.io"
  cargo install s3s-fs --version "$VERSION" --features binary --locked --quiet
fi
log "s3s-fs ready: $bin"

if [ "${1:-}" = "--start" ]; then
  dir=${2:?usage: setup-s3.sh --start DIR}
  port=${S3_PORT:-9000}
  mkdir -p "$dir/${S3_BUCKET:-lake}"
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    log "something already listens on 127.0.0.1:$port: using it"
    exit 0
  fi
  nohup "$bin" --host 127.0.0.1 --port "$port" \
    --access-key "${AWS_ACCESS_KEY_ID:-pipeline}" --secret-key "${AWS_SECRET_ACCESS_KEY:-pipeline-secret}" \
    "$dir" >"$dir/s3s-fs.log" 2>&1 &
  for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  log "s3s-fs serving $dir on http://127.0.0.1:$port (bucket ${S3_BUCKET:-lake})"
fi
