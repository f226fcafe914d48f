"""A GCS emulator (gcp-storage-emulator) on 127.0.0.1 for tests, and the settings every client needs.

`start(bucket)` runs the emulator in this process (a thread per request) and returns it with its URL;
`client_env(url)` is what a process (ours, a Metaflow task, orbax's tensorstore) needs to talk to it:

* gcsfs / flaxchat.storage: STORAGE_EMULATOR_HOST, and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (else
  gcsfs probes the bucket over a gRPC API the emulator lacks and stalls 60 s);
* tensorstore (orbax checkpoints): TENSORSTORE_GCS_HTTP_URL and a dummy GOOGLE_AUTH_TOKEN_FOR_TESTING;
* Metaflow's GCS datastore: google-cloud-storage reads STORAGE_EMULATOR_HOST, and the `gcs-emulator`
  client provider (metaflow_extensions/flaxchat) supplies anonymous credentials.

One gap of the emulator is filled here: its media downloads carry no `x-goog-generation` header, so
tensorstore sees every object at generation 0 and refuses the conditional writes orbax's OCDBT
manifests need ("Malformed StorageGeneration"). Real GCS always sends the header; we add it.
"""

from __future__ import annotations

import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send_generation_headers(server_module, objects) -> None:
    """Wrap the emulator's media-download handlers to send the object's generation, as GCS does."""
    if getattr(server_module, "_flaxchat_generation_headers", False):
        return

    def with_generation(handler):
        def wrapped(request, response, storage, *args, **kwargs):
            result = handler(request, response, storage, *args, **kwargs)
            media = handler is objects.download or (request.query.get("alt") or [""])[0] == "media"
            if media and response.status.value == 200:
                try:
                    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
                except Exception:  # noqa: BLE001 — no object: the handler already answered 404
                    return result
                response["x-goog-generation"] = str(obj["generation"])
                response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
            return result
        return wrapped

    patched = []
    for regex, handlers in server_module.HANDLERS:
        handlers = dict(handlers)
        for method, handler in handlers.items():
            if handler in (objects.download, objects.get):
                handlers[method] = with_generation(handler)
        patched.append((regex, handlers))
    server_module.HANDLERS = tuple(patched)
    server_module._flaxchat_generation_headers = True


def start(bucket: str):
    """An in-memory emulator with `bucket`; returns (server, "http://127.0.0.1:PORT"). Stop it with
    server.stop(). Skips the test when the emulator is not installed (it is in the dev group)."""
    try:
        from gcp_storage_emulator import server as server_module
        from gcp_storage_emulator.handlers import objects
    except Exception as e:  # the dev group installs it; only a broken env skips
        pytest.skip(f"gcp-storage-emulator does not import ({e}); GCS tests need the dev dependency group")
    _send_generation_headers(server_module, objects)
    port = _free_port()
    server = server_module.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def client_env(url: str) -> dict[str, str]:
    """Environment for gcsfs, tensorstore and google-cloud-storage to use the emulator at `url`."""
    return {"STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x"}


@pytest.fixture(scope="module")
def gcs_bucket():
    """An emulator with bucket `test-bucket` for this module, this process's clients pointed at it
    (environment restored afterwards); yields "gs://test-bucket". Import it into a test module."""
    pytest.importorskip("gcsfs", reason="gs:// needs gcsfs (the gcs extra)")
    server, url = start("test-bucket")
    env = client_env(url)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield "gs://test-bucket"
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
