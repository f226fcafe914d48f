# Inputs of the flaxchat GCP stack. Only the first four have no default: they are
# yours (project, where, and a globally unique bucket name). Every other default
# is wired to infra/k8s/*.yaml and infra/metaflow/config.json.template; change a
# name here and change it there too (tests/test_infra.py checks they agree).

# ----------------------------------------------------------------- yours

variable "project_id" {
  description = "GCP project id (USER VARIABLE)."
  type        = string
}

variable "region" {
  description = "Region for the bucket, Artifact Registry, Cloud SQL and the subnet, e.g. us-central1 (USER VARIABLE)."
  type        = string
}

variable "zone" {
  description = "Zone of the (zonal) cluster and every node pool. It must offer every TPU/GPU machine type you enable: check `gcloud compute machine-types list --zones=ZONE` (USER VARIABLE)."
  type        = string
}

variable "bucket_name" {
  description = "Globally unique GCS bucket for the Metaflow datastore (gs://BUCKET/metaflow) and flaxchat artifacts (gs://BUCKET/flaxchat) (USER VARIABLE)."
  type        = string
}

# ----------------------------------------------------------------- names shared with infra/k8s and the Metaflow config

variable "cluster_name" {
  description = "GKE cluster name; also the prefix of the VPC, subnet and Cloud SQL instance."
  type        = string
  default     = "flaxchat"
}

variable "k8s_namespace" {
  description = "Kubernetes namespace of the Metaflow service, the UI and every step pod (infra/k8s/00-namespace.yaml)."
  type        = string
  default     = "flaxchat"
}

variable "k8s_service_account" {
  description = "Kubernetes service account the pods run as; bound to the runner GSA by Workload Identity (infra/k8s/10-service-account.yaml)."
  type        = string
  default     = "flaxchat-runner"
}

variable "runner_gsa_id" {
  description = "account_id of the Google service account the pods act as (storage.objectAdmin on the bucket)."
  type        = string
  default     = "flaxchat-runner"
}

variable "image_repository_id" {
  description = "Artifact Registry Docker repository holding the step images (REGION-docker.pkg.dev/PROJECT/<this>/flaxchat:{cpu,tpu,gpu})."
  type        = string
  default     = "flaxchat"
}

variable "deletion_protection" {
  description = "Protect the cluster and the database from `terraform destroy`. Off so the quick-start tears down cleanly; turn on for anything you keep."
  type        = bool
  default     = false
}

# ----------------------------------------------------------------- CPU pool (Metaflow service, UI, CPU steps)

variable "cpu_pool_name" {
  description = "Name of the CPU node pool; infra/k8s pins the Metaflow service and UI to it with cloud.google.com/gke-nodepool."
  type        = string
  default     = "cpu"
}

variable "cpu_machine_type" {
  type    = string
  default = "n2-standard-8"
}

variable "cpu_min_nodes" {
  description = "At least 1: the Metaflow service and UI live here."
  type        = number
  default     = 1
}

variable "cpu_max_nodes" {
  type    = number
  default = 4
}

# ----------------------------------------------------------------- TPU pools

variable "tpu_pools" {
  description = <<-EOT
    TPU slice node pools, keyed by pool name. machine_type decides the generation
    (ct5lp-* = v5e, ct5p-* = v5p, ct6e-* = v6e) and the chips per host (the "-4t"
    suffix = 4 chips); topology is the slice shape; hosts = chips in the topology /
    chips per host. hosts > 1 makes a multi-host slice: one atomic unit that scales
    0 <-> hosts, which is what Metaflow @parallel(num_parallel = hosts) runs on.
    max_slices only applies to single-host pools (independent nodes).
  EOT
  type = map(object({
    machine_type = string
    topology     = string
    hosts        = number
    max_slices   = optional(number, 1)
    spot         = optional(bool, false)
    disk_type    = optional(string)
  }))
  default = {
    "tpu-v5e-2x2" = { machine_type = "ct5lp-hightpu-4t", topology = "2x2", hosts = 1 }
    "tpu-v5e-4x4" = { machine_type = "ct5lp-hightpu-4t", topology = "4x4", hosts = 4 }
  }

  validation {
    condition = alltrue([
      for pool in values(var.tpu_pools) : contains(["ct5lp", "ct5p", "ct6e"], split("-", pool.machine_type)[0])
    ])
    error_message = "tpu_pools: machine_type must be a GKE TPU machine type starting with ct5lp- (v5e), ct5p- (v5p) or ct6e- (v6e)."
  }

  validation {
    condition     = alltrue([for pool in values(var.tpu_pools) : pool.hosts >= 1 && (pool.hosts == 1 || pool.max_slices == 1)])
    error_message = "tpu_pools: hosts must be >= 1, and a multi-host pool (hosts > 1) is one slice: leave max_slices at 1 and add another pool for a second slice."
  }
}

# ----------------------------------------------------------------- GPU pool

variable "gpu_pool_enabled" {
  description = "Create the GPU node pool (scales from 0, so it costs nothing idle; needs GPU quota in the zone)."
  type        = bool
  default     = true
}

variable "gpu_pool_name" {
  type    = string
  default = "gpu-h100"
}

variable "gpu_machine_type" {
  type    = string
  default = "a3-highgpu-8g"
}

variable "gpu_accelerator_type" {
  description = "GKE accelerator name; it is also the node label cloud.google.com/gke-accelerator that steps select."
  type        = string
  default     = "nvidia-h100-80gb"
}

variable "gpu_accelerator_count" {
  type    = number
  default = 8
}

variable "gpu_max_nodes" {
  type    = number
  default = 1
}

variable "gpu_spot" {
  type    = bool
  default = false
}

variable "gpu_driver_version" {
  description = "DEFAULT or LATEST: GKE installs this NVIDIA driver itself (no driver DaemonSet to apply)."
  type        = string
  default     = "LATEST"
}

# ----------------------------------------------------------------- Cloud SQL (metaflow-service database)

variable "db_tier" {
  type    = string
  default = "db-custom-1-3840"
}

variable "db_version" {
  type    = string
  default = "POSTGRES_15"
}

# ----------------------------------------------------------------- bucket

variable "tmp_prefixes" {
  description = "Object prefixes treated as scratch space and deleted after tmp_retention_days."
  type        = list(string)
  default     = ["tmp/", "flaxchat/tmp/"]
}

variable "tmp_retention_days" {
  type    = number
  default = 7
}

variable "bucket_force_destroy" {
  description = "Let `terraform destroy` delete a non-empty bucket (all checkpoints and runs go with it)."
  type        = bool
  default     = false
}
