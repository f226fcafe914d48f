# Everything infra/README.md needs after `terraform apply`: read them with
# `terraform -chdir=infra/terraform output -raw NAME`.

output "project_id" {
  value = var.project_id
}

output "region" {
  value = var.region
}

output "get_credentials_command" {
  description = "Points kubectl at the cluster."
  value       = "gcloud container clusters get-credentials ${google_container_cluster.this.name} --zone ${var.zone} --project ${var.project_id}"
}

output "bucket_name" {
  value = google_storage_bucket.artifacts.name
}

output "metaflow_datastore_sysroot" {
  description = "METAFLOW_DATASTORE_SYSROOT_GS in infra/metaflow/config.json.template."
  value       = "gs://${google_storage_bucket.artifacts.name}/metaflow"
}

output "flaxchat_artifact_root" {
  description = "What to pass as --artifact-root to flows/full_pipeline.py."
  value       = "gs://${google_storage_bucket.artifacts.name}/flaxchat"
}

output "image_repository" {
  description = "Push the step images here as IMAGE_REPO/flaxchat:{cpu,tpu,gpu}."
  value       = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}

output "runner_service_account_email" {
  description = "The GSA that infra/k8s/10-service-account.yaml's annotation names."
  value       = google_service_account.runner.email
}

output "k8s_namespace" {
  value = var.k8s_namespace
}

output "k8s_service_account" {
  value = var.k8s_service_account
}

output "db_host" {
  description = "Private IP of the metaflow-service PostgreSQL (reachable from pods only)."
  value       = google_sql_database_instance.metaflow.private_ip_address
}

output "db_name" {
  value = google_sql_database.metaflow.name
}

output "db_user" {
  value = google_sql_user.metaflow.name
}

output "db_password" {
  value     = random_password.db.result
  sensitive = true
}

output "tpu_node_selectors" {
  description = "Per TPU pool: the node_selector a @kubernetes step uses to land on it."
  value       = local.tpu_node_selectors
}

output "tpu_chips_per_host" {
  description = "Per TPU pool: the google.com/tpu count each pod (one per host) requests."
  value       = local.tpu_chips_per_host
}

output "gpu_node_selector" {
  value = var.gpu_pool_enabled ? { "cloud.google.com/gke-accelerator" = var.gpu_accelerator_type } : null
}
