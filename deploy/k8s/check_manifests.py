"""Structural checks of deploy/k8s beyond the schemas (run by scripts/test.sh).

One consumer per slot, probes on the pipeline's health endpoints, resources set, and the
pipeline file the pod reads present in the ConfigMap it mounts.
"""

import pathlib
import sys

import yaml

here = pathlib.Path(__file__).parent
docs = {}
for f in sorted(here.glob("*.yaml")):
    for d in yaml.safe_load_all(f.read_text()):
        if d and "kind" in d and d["kind"] != "Kustomization":
            docs[(d["kind"], d["metadata"]["name"])] = d

problems = []


def check(ok, what):
    if not ok:
        problems.append(what)


sts = docs[("StatefulSet", "loan-features")]
spec = sts["spec"]
pod = spec["template"]["spec"]
c = pod["containers"][0]
check(spec["replicas"] == 1, "StatefulSet: one replica (a slot has one consumer)")
check(c["readinessProbe"]["httpGet"]["path"] == "/health/ready", "readiness on /health/ready")
check(c["livenessProbe"]["httpGet"]["path"] == "/health/live", "liveness on /health/live")
for kind in ("requests", "limits"):
    check({"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"resources.{kind}")
check(pod.get("serviceAccountName") in {n for k, n in docs if k == "ServiceAccount"},
      "the pod's service account is defined")
check(pod.get("terminationGracePeriodSeconds", 30) >= 30, "time to finish a batch on SIGTERM")
secrets = [d for (k, _), d in docs.items() if k == "Secret"]
for secret in secrets:
    url = secret.get("stringData", {}).get("PG_URL", "")
    check("sslmode=verify-full" in url, "the example PG_URL verifies the server (sslmode=verify-full)")
pdb = docs[("PodDisruptionBudget", "loan-features")]
check(pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"],
      "the PDB selects the pipeline's pod")
cm = docs[("ConfigMap", "loan-features")]
pipeline = yaml.safe_load(cm["data"]["pipeline.yaml"])
check(c["args"] == ["run", "/etc/pipeline/pipeline.yaml"], "the pod runs the ConfigMap's file")
check({"name", "source", "lake", "features"} <= set(pipeline), "pipeline.yaml has its sections")
check(pipeline["lake"]["url"].startswith("${") or pipeline["lake"]["url"].startswith("s3://"),
      "an S3 lake in the cluster")
check(all(f.startswith("/etc/pipeline/files/") for f in pipeline["features"]),
      "feature files from the mounted ConfigMap")

if problems:
    print("deploy/k8s:", *problems, sep="\n  ")
    sys.exit(1)
print(f"deploy/k8s: {len(docs)} manifests, structural checks passed")
