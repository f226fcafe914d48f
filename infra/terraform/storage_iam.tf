# The bucket, the image registry, and who may touch them.
#
# Two Google service accounts:
#   * nodes  - what the VMs run as: logs/metrics and pulling images, nothing else.
#   * runner - what step pods, the Metaflow service and the UI act as, through
#              Workload Identity: the Kubernetes service account
#              var.k8s_namespace/var.k8s_service_account (infra/k8s/10-service-account.yaml)
#              may impersonate it, and it may read/write objects in the bucket.
# So no key files exist anywhere, and a pod without that KSA gets no bucket access.

# ----------------------------------------------------------------- bucket

resource "google_storage_bucket" "artifacts" {
  name     = var.bucket_name
  location = var.region # same region as the nodes: no cross-region egress for checkpoints

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.bucket_force_destroy

  # Checkpoints are rewritten often and big; old versions would only cost money.
  versioning {
    enabled = false
  }

  lifecycle_rule {
    condition {
      age            = var.tmp_retention_days
      matches_prefix = var.tmp_prefixes
    }
    action {
      type = "Delete"
    }
  }

  # A killed upload (preempted node, cancelled step) leaves parts behind otherwise.
  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  depends_on = [google_project_service.apis]
}

# ----------------------------------------------------------------- images

resource "google_artifact_registry_repository" "images" {
  repository_id = var.image_repository_id
  location      = var.region
  format        = "DOCKER"
  description   = "flaxchat step images (tags cpu, tpu, gpu) built from infra/docker/Dockerfile"
  depends_on    = [google_project_service.apis]
}

# ----------------------------------------------------------------- node identity

resource "google_service_account" "nodes" {
  account_id   = "${var.cluster_name}-nodes"
  display_name = "flaxchat GKE nodes"
  depends_on   = [google_project_service.apis]
}

resource "google_project_iam_member" "nodes_default" {
  project = var.project_id
  role    = "roles/container.defaultNodeServiceAccount" # logging, monitoring, metadata
  member  = "serviceAccount:${google_service_account.nodes.email}"
}

resource "google_artifact_registry_repository_iam_member" "nodes_pull" {
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.nodes.email}"
}

# ----------------------------------------------------------------- workload identity

resource "google_service_account" "runner" {
  account_id   = var.runner_gsa_id
  display_name = "flaxchat Metaflow steps, service and UI (Workload Identity)"
  depends_on   = [google_project_service.apis]
}

resource "google_storage_bucket_iam_member" "runner_objects" {
  bucket = google_storage_bucket.artifacts.name
  role   = "roles/storage.objectAdmin"
  member = "serviceAccount:${google_service_account.runner.email}"
}

resource "google_service_account_iam_member" "runner_workload_identity" {
  service_account_id = google_service_account.runner.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${var.k8s_namespace}/${var.k8s_service_account}]"

  # The identity pool PROJECT.svc.id.goog exists only once a cluster enables it.
  depends_on = [google_container_cluster.this]
}
