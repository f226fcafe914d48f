"""flaxchat's Metaflow extension: what Metaflow core lacks for running the pipeline on GKE.

Metaflow loads this file because it is `metaflow_extensions/<org>/plugins/mfextinit_<org>.py`
in a directory on sys.path (or an installed distribution). Each `*_DESC` list adds plugins of
one kind; the paths are relative to this package.
"""

# @tpu: a step on a GKE TPU slice (single host, or a multi-host gang through @parallel)
STEP_DECORATORS_DESC = [("tpu", ".tpu_decorator.TpuDecorator")]

# `gcs-emulator`: an anonymous google-cloud-storage client for a local GCS emulator (gcp_emulator.py).
# Used only when METAFLOW_DEFAULT_GCP_CLIENT_PROVIDER=gcs-emulator; a real bucket keeps Metaflow's
# `gcp-default` (google default credentials).
GCP_CLIENT_PROVIDERS_DESC = [("gcs-emulator", ".gcp_emulator.EmulatorClientProvider")]
