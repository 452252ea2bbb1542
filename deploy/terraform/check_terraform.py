"""Structural checks of deploy/terraform (run by scripts/test.sh, offline).

`terraform validate` needs the AWS provider, which cannot be downloaded here; these assert
the properties the lake depends on from the parsed HCL instead.
"""

import pathlib
import sys

import hcl2

here = pathlib.Path(__file__).parent


def plain(x):
    """Unwraps the one-element lists python-hcl2 puts attribute values in (blocks, lists
    of dicts, stay lists)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list):
        if len(x) == 1 and not isinstance(x[0], dict):
            return plain(x[0])
        return [plain(v) for v in x]
    return x


resources, data = {}, {}
for f in sorted(here.glob("*.tf")):
    doc = plain(hcl2.loads(f.read_text()))
    for block in doc.get("resource", []):
        for kind, named in block.items():
            for name, body in named.items():
                resources[(kind, name)] = body
    for block in doc.get("data", []):
        for kind, named in block.items():
            for name, body in named.items():
                data[(kind, name)] = body

problems = []


def check(ok, what):
    if not ok:
        problems.append(what)


def one(x):
    """hcl2 wraps nested blocks in lists."""
    return x[0] if isinstance(x, list) else x


def as_list(x):
    return x if isinstance(x, list) else [x]


def statements(name):
    return as_list(data[("aws_iam_policy_document", name)]["statement"])


versioning = one(resources[("aws_s3_bucket_versioning", "lake")]["versioning_configuration"])
check(versioning["status"] == "Enabled", "bucket versioning enabled")

sse = one(resources[("aws_s3_bucket_server_side_encryption_configuration", "lake")]["rule"])
default = one(sse["apply_server_side_encryption_by_default"])
check(default["sse_algorithm"] == "aws:kms", "SSE-KMS")
check(sse.get("bucket_key_enabled") is True, "S3 bucket key (KMS calls per bucket key, not per object)")
check(resources[("aws_kms_key", "lake")].get("enable_key_rotation") is True, "KMS key rotation")

block = resources[("aws_s3_bucket_public_access_block", "lake")]
for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"):
    check(block.get(flag) is True, f"public access block: {flag}")
owner = one(resources[("aws_s3_bucket_ownership_controls", "lake")]["rule"])
check(owner["object_ownership"] == "BucketOwnerEnforced", "bucket owner enforced (no ACLs)")

tls = [s for s in as_list(statements("tls_only")) if s.get("effect") == "Deny"]
check(
    any(
        c["variable"] == "aws:SecureTransport" and as_list(c["values"]) == ["false"]
        for s in tls
        for c in as_list(s.get("condition", []))
    ),
    "bucket policy denies requests without TLS",
)
check("tls_only" in str(resources[("aws_s3_bucket_policy", "lake")]["policy"]), "TLS policy attached")

rules = as_list(resources[("aws_s3_bucket_lifecycle_configuration", "lake")]["rule"])
check(any("noncurrent_version_expiration" in r for r in rules), "noncurrent versions expire")
check(any("abort_incomplete_multipart_upload" in r for r in rules), "abandoned uploads are aborted")

for role in ("writer", "reader"):
    for s in statements(role):
        for action in as_list(s["actions"]):
            check("*" not in action, f"{role} policy: no wildcard action ({action})")
        for r in as_list(s["resources"]):
            check(r != "*", f"{role} policy: no '*' resource")
writer_actions = {a for s in statements("writer") for a in as_list(s["actions"])}
check({"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"} <= writer_actions,
      "writer: list, get, put, delete (delta-rs deletes temporary log files)")
check(not any(a.startswith("dynamodb:") for a in writer_actions), "no DynamoDB (conditional writes)")
reader_actions = {a for s in statements("reader") for a in as_list(s["actions"])}
check(not ({"s3:PutObject", "s3:DeleteObject"} & reader_actions), "reader: read only")
check(all("lake_objects" in r or "aws_s3_bucket.lake.arn}" in r or "kms" in r
          for s in statements("writer") for r in as_list(s["resources"])),
      "writer resources: the bucket, the lake prefix, the key")

if problems:
    print("deploy/terraform:", *problems, sep="\n  ")
    sys.exit(1)
print(f"deploy/terraform: {len(resources)} resources, structural checks passed")
