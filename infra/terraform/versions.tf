# Terraform and provider versions for the flaxchat GCP stack.
#
# google >= 6 has everything used here: placement_policy.tpu_topology on node
# pools, gpu_driver_installation_config, Cloud SQL `edition`, and
# AbortIncompleteMultipartUpload lifecycle actions.

terraform {
  required_version = ">= 1.5"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 6.0, < 8.0"
    }
    random = {
      source  = "hashicorp/random"
      version = ">= 3.5, < 4.0"
    }
  }
}

provider "google" {
  project = var.project_id
  region  = var.region
}
