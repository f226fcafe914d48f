# PostgreSQL for metaflow-service (run/step/task/artifact metadata the UI shows).
#
# Connection choice: PRIVATE IP, not the Cloud SQL Auth Proxy sidecar. The
# instance gets an address inside this VPC through private services access, so
# the metaflow-service and UI pods connect to it directly as an ordinary
# PostgreSQL host; it has no public IP, so nothing outside the VPC can reach it.
# The price is that the password lives in a Kubernetes Secret (created from
# `terraform output` in infra/README.md) instead of IAM database auth; in return
# the Deployments need no proxy container, no extra IAM role and no sidecar
# lifecycle handling for the migration init container.

resource "google_compute_global_address" "sql_peering" {
  name          = "${var.cluster_name}-sql-peering"
  purpose       = "VPC_PEERING"
  address_type  = "INTERNAL"
  prefix_length = 16
  network       = google_compute_network.vpc.id
}

resource "google_service_networking_connection" "sql" {
  network                 = google_compute_network.vpc.id
  service                 = "servicenetworking.googleapis.com"
  reserved_peering_ranges = [google_compute_global_address.sql_peering.name]
}

# Cloud SQL instance names stay reserved for a week after deletion: a random
# suffix lets destroy + apply work the same day.
resource "random_id" "db_suffix" {
  byte_length = 3
}

resource "google_sql_database_instance" "metaflow" {
  name                = "${var.cluster_name}-metaflow-${random_id.db_suffix.hex}"
  region              = var.region
  database_version    = var.db_version
  deletion_protection = var.deletion_protection

  settings {
    edition           = "ENTERPRISE" # db-custom-* tiers are not offered on ENTERPRISE_PLUS
    tier              = var.db_tier
    availability_type = "ZONAL"
    disk_size         = 10
    disk_autoresize   = true

    ip_configuration {
      ipv4_enabled    = false
      private_network = google_compute_network.vpc.id
    }

    backup_configuration {
      enabled = true
    }
  }

  depends_on = [google_service_networking_connection.sql]
}

resource "google_sql_database" "metaflow" {
  name     = "metaflow"
  instance = google_sql_database_instance.metaflow.name
}

resource "random_password" "db" {
  length  = 32
  special = false # it goes into a postgres:// URL inside metaflow-service
}

resource "google_sql_user" "metaflow" {
  name     = "metaflow"
  instance = google_sql_database_instance.metaflow.name
  password = random_password.db.result
}
