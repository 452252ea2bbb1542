output "lake_url" {
  description = "LAKE_URL for the pipeline file (lake.url)."
  value       = "s3://${aws_s3_bucket.lake.bucket}/${var.lake_prefix}"
}

output "storage_options" {
  description = "lake.storage_options for the pipeline file (credentials come from the role)."
  value       = { aws_region = var.region }
}

output "writer_role_arn" {
  description = "For the pipeline's service account annotation (eks.amazonaws.com/role-arn)."
  value       = aws_iam_role.writer.arn
}

output "reader_role_arn" {
  description = "Read-only access for data scientists and the decision service."
  value       = aws_iam_role.reader.arn
}

output "kms_key_arn" {
  value = aws_kms_key.lake.arn
}
