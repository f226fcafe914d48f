# Node pools: a CPU pool that always runs (Metaflow service, UI, CPU steps), TPU
# slice pools and a GPU pool that scale from zero when a step asks for them.
#
# How a step lands on a pool: GKE labels TPU nodes with
# cloud.google.com/gke-tpu-accelerator / cloud.google.com/gke-tpu-topology and GPU
# nodes with cloud.google.com/gke-accelerator, and taints them
# (google.com/tpu / nvidia.com/gpu, NoSchedule). A Metaflow @kubernetes step that
# requests the resource (extended_resources={"google.com/tpu": "4"} or gpu=8) and
# selects those labels is scheduled there and triggers the autoscaler; everything
# else stays on the CPU pool. `terraform output tpu_node_selectors` prints the
# exact selector of each TPU pool.

locals {
  # machine-type family -> the value GKE puts in cloud.google.com/gke-tpu-accelerator
  tpu_accelerator_labels = {
    ct5lp = "tpu-v5-lite-podslice"
    ct5p  = "tpu-v5p-slice"
    ct6e  = "tpu-v6e-slice"
  }

  tpu_chips_per_host = {
    for name, pool in var.tpu_pools : name => tonumber(trimsuffix(element(split("-", pool.machine_type), 2), "t"))
  }
  tpu_topology_dims = {
    for name, pool in var.tpu_pools : name => [for d in split("x", pool.topology) : tonumber(d)]
  }
  # "2x4" or "2x2x2": product of the 2 or 3 dimensions
  tpu_topology_chips = {
    for name, dims in local.tpu_topology_dims : name => dims[0] * dims[1] * try(dims[2], 1)
  }

  tpu_node_selectors = {
    for name, pool in var.tpu_pools : name => {
      "cloud.google.com/gke-tpu-accelerator" = local.tpu_accelerator_labels[split("-", pool.machine_type)[0]]
      "cloud.google.com/gke-tpu-topology"    = pool.topology
    }
  }

  node_oauth_scopes = ["https://www.googleapis.com/auth/cloud-platform"]
}

# ----------------------------------------------------------------- CPU

resource "google_container_node_pool" "cpu" {
  name           = var.cpu_pool_name
  cluster        = google_container_cluster.this.id
  location       = var.zone
  node_locations = [var.zone]

  initial_node_count = var.cpu_min_nodes
  autoscaling {
    min_node_count = var.cpu_min_nodes
    max_node_count = var.cpu_max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.cpu_machine_type
    disk_size_gb    = 100
    service_account = google_service_account.nodes.email
    oauth_scopes    = local.node_oauth_scopes
    labels          = { "flaxchat/pool" = "cpu" }

    workload_metadata_config {
      mode = "GKE_METADATA" # the Workload Identity metadata server
    }
  }

  lifecycle {
    ignore_changes = [initial_node_count]
  }
}

# ----------------------------------------------------------------- TPU

resource "google_container_node_pool" "tpu" {
  for_each = var.tpu_pools

  name           = each.key
  cluster        = google_container_cluster.this.id
  location       = var.zone
  node_locations = [var.zone]

  # A single-host pool is a set of independent TPU VMs (0..max_slices); a
  # multi-host pool is one slice that GKE creates and deletes as a unit, so its
  # only sizes are 0 and `hosts`.
  initial_node_count = 0
  autoscaling {
    min_node_count  = 0
    max_node_count  = each.value.hosts > 1 ? each.value.hosts : each.value.max_slices
    location_policy = "ANY"
  }

  dynamic "placement_policy" {
    for_each = each.value.hosts > 1 ? [each.value.topology] : []
    content {
      type         = "COMPACT"
      tpu_topology = placement_policy.value
    }
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = each.value.machine_type
    spot            = each.value.spot
    disk_type       = each.value.disk_type
    disk_size_gb    = 100
    service_account = google_service_account.nodes.email
    oauth_scopes    = local.node_oauth_scopes
    labels          = { "flaxchat/pool" = each.key }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }
  }

  lifecycle {
    ignore_changes = [initial_node_count]
    precondition {
      condition     = local.tpu_topology_chips[each.key] == each.value.hosts * local.tpu_chips_per_host[each.key]
      error_message = "tpu_pools[\"${each.key}\"]: topology ${each.value.topology} has ${local.tpu_topology_chips[each.key]} chips but ${each.value.hosts} host(s) of ${each.value.machine_type} hold ${each.value.hosts * local.tpu_chips_per_host[each.key]}; set hosts = chips / ${local.tpu_chips_per_host[each.key]}."
    }
  }
}

# ----------------------------------------------------------------- GPU

resource "google_container_node_pool" "gpu" {
  count = var.gpu_pool_enabled ? 1 : 0

  name           = var.gpu_pool_name
  cluster        = google_container_cluster.this.id
  location       = var.zone
  node_locations = [var.zone]

  initial_node_count = 0
  autoscaling {
    min_node_count = 0
    max_node_count = var.gpu_max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.gpu_machine_type
    spot            = var.gpu_spot
    disk_size_gb    = 200
    service_account = google_service_account.nodes.email
    oauth_scopes    = local.node_oauth_scopes
    labels          = { "flaxchat/pool" = var.gpu_pool_name }

    guest_accelerator {
      type  = var.gpu_accelerator_type
      count = var.gpu_accelerator_count
      gpu_driver_installation_config {
        gpu_driver_version = var.gpu_driver_version
      }
    }

    gvnic {
      enabled = true # required by A3 machine types, harmless elsewhere
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }
  }

  lifecycle {
    ignore_changes = [initial_node_count]
  }
}
