# The GKE Standard cluster flaxchat's Metaflow steps run on, and its network.
#
# Zonal on purpose: TPU slices and A3 GPUs are zonal resources anyway, a zonal
# control plane is covered by GKE's free tier, and every node pool lives in
# var.zone. The VPC is VPC-native (alias IPs) so Cloud SQL's private IP is
# reachable from pods through private services access (database.tf).
#
# Node pools: node_pools.tf. Bucket, images and identities: storage_iam.tf.

locals {
  required_apis = [
    "compute.googleapis.com",
    "container.googleapis.com",
    "iam.googleapis.com",
    "storage.googleapis.com",
    "artifactregistry.googleapis.com",
    "sqladmin.googleapis.com",
    "servicenetworking.googleapis.com",
  ]
}

resource "google_project_service" "apis" {
  for_each           = toset(local.required_apis)
  service            = each.value
  disable_on_destroy = false # other things in the project may use them
}

# ----------------------------------------------------------------- network

resource "google_compute_network" "vpc" {
  name                    = "${var.cluster_name}-vpc"
  auto_create_subnetworks = false
  depends_on              = [google_project_service.apis]
}

resource "google_compute_subnetwork" "nodes" {
  name                     = "${var.cluster_name}-nodes"
  region                   = var.region
  network                  = google_compute_network.vpc.id
  ip_cidr_range            = "10.10.0.0/20"
  private_ip_google_access = true

  secondary_ip_range {
    range_name    = "pods"
    ip_cidr_range = "10.16.0.0/14"
  }
  secondary_ip_range {
    range_name    = "services"
    ip_cidr_range = "10.20.0.0/20"
  }
}

# ----------------------------------------------------------------- cluster

resource "google_container_cluster" "this" {
  name     = var.cluster_name
  location = var.zone

  network         = google_compute_network.vpc.id
  subnetwork      = google_compute_subnetwork.nodes.id
  networking_mode = "VPC_NATIVE"
  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }

  # Node pools are managed separately (node_pools.tf); GKE insists on creating a
  # default pool, which is removed right after.
  remove_default_node_pool = true
  initial_node_count       = 1

  # Pods get Google credentials from their Kubernetes service account, never
  # from a key file or the node's service account.
  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }

  release_channel {
    channel = "REGULAR"
  }

  deletion_protection = var.deletion_protection

  depends_on = [google_project_service.apis]
}
