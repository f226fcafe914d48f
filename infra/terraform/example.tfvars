# Copy to my.tfvars, fill in the four USER VARIABLES, then
#   terraform -chdir=infra/terraform apply -var-file=my.tfvars
# Check that your zone offers every machine type you enable before applying:
#   gcloud compute machine-types list --zones=us-central1-a --filter="name~'^(ct5lp|ct5p|ct6e|a3-highgpu)'"

# ---- USER VARIABLES ----
project_id  = "my-gcp-project"          # your project id
region      = "us-central1"             # bucket, registry, Cloud SQL, subnet
zone        = "us-central1-a"           # the cluster and all node pools
bucket_name = "my-gcp-project-flaxchat" # globally unique

# ---- TPU slices (all scale from 0; you pay only while a step runs) ----
tpu_pools = {
  # v5e single host: 4 chips, one pod requests google.com/tpu: 4
  "tpu-v5e-2x2" = { machine_type = "ct5lp-hightpu-4t", topology = "2x2", hosts = 1, max_slices = 1 }
  # v5e multi-host: 16 chips on 4 hosts -> @parallel with num_parallel = 4
  "tpu-v5e-4x4" = { machine_type = "ct5lp-hightpu-4t", topology = "4x4", hosts = 4, spot = true }

  # v5p single host (2x2x1 = 4 chips); needs a v5p zone such as us-east5-a:
  # "tpu-v5p-2x2x1" = { machine_type = "ct5p-hightpu-4t", topology = "2x2x1", hosts = 1 }
  # v6e multi-host (4x4 = 16 chips on 4 hosts); v6e zones include us-east5-b, europe-west4-a;
  # ct6e boots from Hyperdisk:
  # "tpu-v6e-4x4" = { machine_type = "ct6e-standard-4t", topology = "4x4", hosts = 4, disk_type = "hyperdisk-balanced" }
}

# ---- GPU (8 x H100 80GB per node) ----
gpu_pool_enabled = true
gpu_max_nodes    = 1
gpu_spot         = false

# ---- keep things after `terraform destroy`? ----
deletion_protection  = false
bucket_force_destroy = false
