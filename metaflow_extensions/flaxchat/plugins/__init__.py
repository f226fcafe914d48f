"""flaxchat's Metaflow extension: plugins Metaflow picks up from the `metaflow_extensions` namespace.

`GCP_CLIENT_PROVIDERS_DESC` adds the `gcs-emulator` client provider (see gcp_emulator.py). Metaflow
keeps using its own `gcp-default` provider (google default credentials) unless
METAFLOW_DEFAULT_GCP_CLIENT_PROVIDER=gcs-emulator selects this one, so a real bucket needs nothing.
"""

GCP_CLIENT_PROVIDERS_DESC = [("gcs-emulator", ".gcp_emulator.EmulatorClientProvider")]
