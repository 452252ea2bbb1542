"""Structural checks of docker/compose.yaml (no Docker engine or compose plugin here):
the S3-API server is a service, the pipeline's lake is on it, and what it builds exists."""
import pathlib
import sys

import yaml

root = pathlib.Path(__file__).resolve().parent.parent
compose = yaml.safe_load((root / "docker/compose.yaml").read_text())
services = compose["services"]
errors = []
for name in ("postgres", "s3", "pipeline"):
    if name not in services:
        errors.append(f"service {name} missing")
if not errors:
    env = services["pipeline"]["environment"]
    if not str(env.get("LAKE_URL", "")).startswith("s3://"):
        errors.append("pipeline: LAKE_URL is not an s3:// URL")
    if env.get("AWS_ENDPOINT_URL") != "http://s3:9000":
        errors.append("pipeline: AWS_ENDPOINT_URL does not point at the s3 service")
    if "s3" not in services["pipeline"].get("depends_on", {}):
        errors.append("pipeline: does not depend on s3")
    if "wal_level=logical" not in services["postgres"].get("command", []):
        errors.append("postgres: wal_level=logical not set")
    for name, svc in services.items():
        build = svc.get("build")
        if build and not (root / build["dockerfile"]).exists():
            errors.append(f"{name}: {build['dockerfile']} does not exist")
if errors:
    sys.exit("docker/compose.yaml: " + "; ".join(errors))
print("docker/compose.yaml: services postgres, s3, pipeline; lake on s3")
