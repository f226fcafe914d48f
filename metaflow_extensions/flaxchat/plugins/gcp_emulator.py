"""A Metaflow GCP client provider for a local GCS emulator (gcp-storage-emulator, fake-gcs-server).

Metaflow's GCS datastore gets its `google.cloud.storage.Client` from the provider named by
METAFLOW_DEFAULT_GCP_CLIENT_PROVIDER. The default one (`gcp-default`) asks google.auth for default
credentials, which a test machine or CI runner does not have, and an emulator does not check. This
one returns an anonymous client; google-cloud-storage itself sends its requests to
STORAGE_EMULATOR_HOST. Select it only for an emulator:

    STORAGE_EMULATOR_HOST=http://127.0.0.1:9023 METAFLOW_DEFAULT_GCP_CLIENT_PROVIDER=gcs-emulator \
    METAFLOW_DEFAULT_DATASTORE=gs METAFLOW_DATASTORE_SYSROOT_GS=gs://bucket/metaflow python flows/...

A real bucket keeps Metaflow's default provider (no setting, no code change).
"""

import os
import threading

_clients = {}
PROJECT = "test"   # emulators accept any project id


def _emulator_host() -> str:
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        raise RuntimeError("METAFLOW_DEFAULT_GCP_CLIENT_PROVIDER=gcs-emulator needs STORAGE_EMULATOR_HOST "
                           "(e.g. http://127.0.0.1:9023); unset the provider to use a real bucket")
    return host


class EmulatorClientProvider:
    name = "gcs-emulator"

    @staticmethod
    def get_gs_storage_client(*args, **kwargs):
        # one client per process and thread, as Metaflow's default provider keeps them
        key = (os.getpid(), threading.get_ident(), _emulator_host())
        if key not in _clients:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage
            _clients[key] = storage.Client(project=PROJECT, credentials=AnonymousCredentials())
        return _clients[key]

    @staticmethod
    def get_credentials(scopes, *args, **kwargs):
        from google.auth.credentials import AnonymousCredentials
        _emulator_host()
        return AnonymousCredentials(), PROJECT
