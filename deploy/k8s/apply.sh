#!/usr/bin/env bash
# Deploys the pipeline to the current kubectl context: the feature and decisions files as a
# ConfigMap made from the repository, then the manifests. A changed feature file: run
# `pipeline backfill` (as a Job, or from a shell with the same config) with the pod stopped,
# then this script again.
set -euo pipefail
cd "$(dirname "$0")/../.."
kubectl apply -f deploy/k8s/namespace.yaml
# The model is in the image (/app/models); the rules file names it from there.
rules=$(mktemp -d)/loan_rules.yaml
sed 's|^model: .*|model: /app/models/loan_default.onnx|' decisions/loan_rules.yaml >"$rules"
kubectl -n credit-features create configmap loan-features-files \
  --from-file=feature_defs/ --from-file="$rules" \
  --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -k deploy/k8s
