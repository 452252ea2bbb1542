# Two roles: the pipeline writes the lake (IRSA from its Kubernetes service account); data
# scientists and the decision service read it. Least privilege: listing limited to the lake
# prefix, objects under it, the lake's KMS key; no wildcard actions.

locals {
  lake_objects = "${aws_s3_bucket.lake.arn}/${var.lake_prefix}/*"
}

data "aws_iam_policy_document" "writer_trust" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_provider_url}:sub"
      values   = ["system:serviceaccount:${var.k8s_namespace}:${var.k8s_service_account}"]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_provider_url}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "writer" {
  statement {
    sid       = "ListTheLake"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.lake.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.lake_prefix}/*", var.lake_prefix]
    }
  }
  statement {
    # Delete: delta-rs removes its temporary log files, and vacuum removes unreferenced data.
    sid       = "ReadWriteTheLake"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = [local.lake_objects]
  }
  statement {
    sid       = "LakeKey"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [aws_kms_key.lake.arn]
  }
}

resource "aws_iam_role" "writer" {
  name               = "${var.bucket_name}-writer"
  assume_role_policy = data.aws_iam_policy_document.writer_trust.json
}

resource "aws_iam_role_policy" "writer" {
  name   = "lake-read-write"
  role   = aws_iam_role.writer.id
  policy = data.aws_iam_policy_document.writer.json
}

data "aws_iam_policy_document" "reader_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type = "AWS"
      # No reader configured: only the account itself (nobody, until a policy allows it).
      identifiers = length(var.reader_principal_arns) > 0 ? var.reader_principal_arns : [
        "arn:aws:iam::${data.aws_caller_identity.current.account_id}:root"
      ]
    }
  }
}

data "aws_iam_policy_document" "reader" {
  statement {
    sid       = "ListTheLake"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.lake.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.lake_prefix}/*", var.lake_prefix]
    }
  }
  statement {
    sid       = "ReadTheLake"
    actions   = ["s3:GetObject"]
    resources = [local.lake_objects]
  }
  statement {
    sid       = "LakeKey"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.lake.arn]
  }
}

resource "aws_iam_role" "reader" {
  name               = "${var.bucket_name}-reader"
  assume_role_policy = data.aws_iam_policy_document.reader_trust.json
}

resource "aws_iam_role_policy" "reader" {
  name   = "lake-read"
  role   = aws_iam_role.reader.id
  policy = data.aws_iam_policy_document.reader.json
}
