#!/usr/bin/env bash
# The whole test suite on a fresh machine: Postgres with wal_level=logical, formatting,
# lints, unit and end-to-end tests against real Postgres, and the Python reader examples.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pipeline-target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
step() { printf '\n== %s\n' "$*"; }

bash scripts/setup-postgres.sh
bash scripts/setup-s3.sh

step "deploy/ (offline: kubernetes-validate, terraform fmt, checkov, structural checks, compose)"
deploy_venv=${DEPLOY_VENV:-$HOME/.cache/pipeline-deploy-venv}
[ -x "$deploy_venv/bin/python" ] || python3 -m venv "$deploy_venv"
"$deploy_venv/bin/pip" install -q -r deploy/requirements.txt
manifests=$(ls deploy/k8s/*.yaml | grep -v kustomization.yaml)
# shellcheck disable=SC2086
"$deploy_venv/bin/kubernetes-validate" --strict --quiet $manifests
"$deploy_venv/bin/python" deploy/k8s/check_manifests.py
"$deploy_venv/bin/python" deploy/terraform/fmt_check.py
"$deploy_venv/bin/checkov" -d deploy/terraform --framework terraform --skip-download --compact --quiet
"$deploy_venv/bin/python" deploy/terraform/check_terraform.py
"$deploy_venv/bin/python" deploy/check_compose.py

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --all-targets -- -D warnings

step "cargo doc (broken links)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --document-private-items --lib --quiet

step "cargo test"
cargo test -- --test-threads=3

step "python readers (examples/)"
bash scripts/examples.sh
