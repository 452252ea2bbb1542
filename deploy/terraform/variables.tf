variable "region" {
  description = "AWS region of the lake bucket."
  type        = string
  default     = "eu-central-1"
}

variable "bucket_name" {
  description = "Name of the lake bucket (globally unique)."
  type        = string
}

variable "lake_prefix" {
  description = "Key prefix of the lake in the bucket: LAKE_URL is s3://<bucket>/<prefix>."
  type        = string
  default     = "lake"
}

variable "noncurrent_version_days" {
  description = <<-EOT
    Days a replaced or deleted object version is kept. The pipeline commits every 200 ms
    (a log entry per table, data files, compaction and vacuum rewrites), so noncurrent
    versions pile up fast; they are only an undo for mistakes, Delta time travel uses
    current objects.
  EOT
  type        = number
  default     = 7
}

variable "abort_multipart_days" {
  description = "Days after which an unfinished multipart upload (a crashed writer) is removed."
  type        = number
  default     = 1
}

variable "kms_deletion_window_days" {
  description = "Waiting period before the lake's KMS key is deleted."
  type        = number
  default     = 30
}

variable "oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider (IRSA) the pipeline's pod uses."
  type        = string
}

variable "oidc_provider_url" {
  description = "URL of that OIDC provider without https:// (oidc.eks.<region>.amazonaws.com/id/<id>)."
  type        = string
}

variable "k8s_namespace" {
  description = "Namespace of the pipeline's service account (deploy/k8s)."
  type        = string
  default     = "credit-features"
}

variable "k8s_service_account" {
  description = "The pipeline's service account (deploy/k8s)."
  type        = string
  default     = "loan-features"
}

variable "reader_principal_arns" {
  description = "IAM principals (data scientists' roles, the decision service) that may assume the read-only role."
  type        = list(string)
  default     = []
}
