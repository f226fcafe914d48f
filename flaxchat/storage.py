"""One small file API over local paths and `gs://bucket/prefix` URIs.

Every stage hands its outputs (tokenizer, checkpoints, manifests, data shards) to the next
through a URI, so the pipeline runs unchanged on a laptop and on a cluster with a bucket.
The rules that keep readers safe:

* `write_bytes` is atomic: locally a temp file in the same directory then `os.replace`
  (same filesystem, so the rename is atomic); on GCS a single-object upload is atomic.
* `publish_dir` makes a whole finished directory appear at once: locally a sibling temp
  directory renamed into place; on GCS (which has no directory rename) every file is
  uploaded and the manifest (`last=`) goes up last, so a reader that trusts only a
  directory with a manifest never sees a half-written one.

GCS goes through google-cloud-storage (the optional `gcs` extra), imported lazily so local
runs never need it. With STORAGE_EMULATOR_HOST set the client talks to that emulator with
anonymous credentials and project "test".
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, Iterable, Sequence

GCS_PREFIX = "gs://"
_CHUNK = 1 << 20


class StorageError(RuntimeError):
    """A storage operation that cannot proceed; the message says why and what to do."""


# --------------------------------------------------------------------------- URIs

def is_gcs(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(GCS_PREFIX)


def _split_gcs(uri: str) -> tuple[str, str]:
    """'gs://bucket/a/b/' -> ('bucket', 'a/b'); the key never has leading/trailing slashes."""
    rest = str(uri)[len(GCS_PREFIX):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"bad GCS URI {uri!r}: expected gs://bucket/path")
    return bucket, key.strip("/")


def join(uri: str | os.PathLike, *parts: str) -> str:
    uri = str(uri)
    if not is_gcs(uri):
        return os.path.join(uri, *parts)
    pieces = [uri.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
    return "/".join(pieces)


def basename(uri: str | os.PathLike) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


# --------------------------------------------------------------------------- GCS client

_clients: dict[str | None, Any] = {}
_clients_lock = threading.Lock()


def _storage_module() -> Any:
    import importlib
    try:
        storage = importlib.import_module("google.cloud.storage")  # lazy: only gs:// users need it
    except ImportError as e:
        raise StorageError(
            "gs:// URIs need google-cloud-storage, which is not installed: "
            "pip install 'flaxchat[gcs]'") from e
    return storage


def gcs_client() -> Any:
    """A cached client; a different STORAGE_EMULATOR_HOST (tests) gets its own client."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST") or None
    with _clients_lock:
        if emulator not in _clients:
            storage = _storage_module()
            if emulator:
                from google.auth.credentials import AnonymousCredentials
                endpoint = emulator if "://" in emulator else f"http://{emulator}"
                _clients[emulator] = storage.Client(
                    project="test", credentials=AnonymousCredentials(),
                    client_options={"api_endpoint": endpoint})
            else:
                _clients[emulator] = storage.Client()
        return _clients[emulator]


def _bucket(uri: str) -> tuple[Any, str]:
    name, key = _split_gcs(uri)
    return gcs_client().bucket(name), key


def _not_found(exc: BaseException) -> bool:
    return type(exc).__name__ == "NotFound"


def _iter_blobs(uri: str) -> Iterable[Any]:
    """Every object strictly under the prefix `uri/` (recursive)."""
    bucket, key = _bucket(uri)
    prefix = f"{key}/" if key else ""
    return bucket.client.list_blobs(bucket, prefix=prefix)


# --------------------------------------------------------------------------- files

def exists(uri: str | os.PathLike) -> bool:
    uri = str(uri)
    if not is_gcs(uri):
        return os.path.exists(uri)
    bucket, key = _bucket(uri)
    if not key:
        return bucket.exists()
    return bucket.blob(key).exists() or isdir(uri)


def isdir(uri: str | os.PathLike) -> bool:
    uri = str(uri)
    if not is_gcs(uri):
        return os.path.isdir(uri)
    bucket, key = _bucket(uri)
    if not key:
        return bucket.exists()
    # GCS has no directories: a "directory" is a prefix with at least one object under it.
    return any(True for _ in bucket.client.list_blobs(bucket, prefix=f"{key}/", max_results=1))


def read_bytes(uri: str | os.PathLike) -> bytes:
    uri = str(uri)
    if not is_gcs(uri):
        with open(uri, "rb") as f:
            return f.read()
    bucket, key = _bucket(uri)
    try:
        return bucket.blob(key).download_as_bytes()
    except Exception as e:
        if _not_found(e):
            raise FileNotFoundError(f"no such object: {uri}") from e
        raise


def read_text(uri: str | os.PathLike, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def _atomic_local_write(path: str, write: Any) -> None:
    """Run write(fileobj) on a temp file beside `path`, then rename it over `path`.
    On any failure the temp file is removed and the old `path` is untouched."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    uri = str(uri)
    if not is_gcs(uri):
        _atomic_local_write(uri, lambda f: f.write(data))
        return
    bucket, key = _bucket(uri)
    if not key:
        raise StorageError(f"cannot write to a bucket root: {uri!r}; name an object path")
    bucket.blob(key).upload_from_string(data)


def write_text(uri: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def open_read(uri: str | os.PathLike) -> IO[bytes]:
    """A seekable binary reader (pyarrow can read parquet row groups from it without
    downloading the whole object first)."""
    uri = str(uri)
    if not is_gcs(uri):
        return open(uri, "rb")
    bucket, key = _bucket(uri)
    blob = bucket.blob(key)
    try:
        blob.reload()  # fail now with FileNotFoundError rather than on the first read
    except Exception as e:
        if _not_found(e):
            raise FileNotFoundError(f"no such object: {uri}") from e
        raise
    return blob.open("rb", chunk_size=8 * _CHUNK)


def listdir(uri: str | os.PathLike) -> list[str]:
    """Sorted names of the direct children (files and sub-directories)."""
    uri = str(uri)
    if not is_gcs(uri):
        return sorted(os.listdir(uri))
    bucket, key = _bucket(uri)
    prefix = f"{key}/" if key else ""
    it = bucket.client.list_blobs(bucket, prefix=prefix, delimiter="/")
    names = {b.name[len(prefix):] for b in it if b.name != prefix}
    names |= {p[len(prefix):].rstrip("/") for p in it.prefixes}  # filled once pages are consumed
    names.discard("")
    # an empty listing means "no such directory", except for an existing (empty) bucket root
    if not names and (key or not bucket.exists()):
        raise FileNotFoundError(f"no such directory: {uri}")
    return sorted(names)


def remove_tree(uri: str | os.PathLike) -> None:
    """Delete a directory (or prefix) and everything under it; missing is not an error."""
    uri = str(uri)
    if not is_gcs(uri):
        if os.path.isdir(uri) and not os.path.islink(uri):
            shutil.rmtree(uri)
        elif os.path.lexists(uri):
            os.unlink(uri)
        return
    bucket, key = _bucket(uri)
    if not key:
        raise StorageError(f"refusing to delete a whole bucket: {uri!r}")
    for blob in list(_iter_blobs(uri)):
        blob.delete()
    marker = bucket.blob(key)
    if marker.exists():
        marker.delete()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    if is_gcs(path):
        h.update(read_bytes(path))
        return h.hexdigest()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- directories

def _local_files(local_dir: str) -> list[str]:
    """Relative paths (with '/') of every file under local_dir, sorted."""
    out = []
    for root, _, files in os.walk(local_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local_dir)
            out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def _sibling_temp(path: str, tag: str) -> str:
    path = os.path.abspath(path.rstrip("/"))
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{tag}-{uuid.uuid4().hex[:12]}")


def _swap_in_local(tmp: str, dest: str) -> None:
    """Rename a complete directory `tmp` to `dest`, replacing an existing `dest`."""
    old = None
    if os.path.lexists(dest):
        old = _sibling_temp(dest, "old")
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)  # put the previous version back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_dir(local_dir: str | os.PathLike, uri: str | os.PathLike, overwrite: bool = False,
                last: Sequence[str] = ("manifest.json",), workers: int = 8) -> str:
    """Copy a finished local directory to `uri` so no reader ever sees it half-written.

    `last` names files (relative paths) uploaded after all the others on GCS: readers
    must treat a directory without its manifest as absent. Returns `uri`.
    """
    local_dir, uri = str(local_dir), str(uri)
    if not os.path.isdir(local_dir):
        raise StorageError(f"publish_dir: {local_dir!r} is not a directory; write the files there first")
    if not overwrite and exists(uri):
        raise StorageError(f"publish_dir: {uri!r} already exists; pass overwrite=True to replace it")
    if not is_gcs(uri):
        if os.path.abspath(local_dir) == os.path.abspath(uri):
            return uri
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        tmp = _sibling_temp(uri, "tmp")
        try:
            shutil.copytree(local_dir, tmp)
            _swap_in_local(tmp, uri)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return uri

    files = _local_files(local_dir)
    last_set = [f for f in files if f in set(last)]
    first = [f for f in files if f not in set(last)]
    bucket, key = _bucket(uri)
    if overwrite:
        # Drop the old manifest first so readers stop trusting the directory while it changes.
        for name in last:
            blob = bucket.blob(f"{key}/{name}")
            if blob.exists():
                blob.delete()

    def upload(rel: str) -> None:
        bucket.blob(f"{key}/{rel}").upload_from_filename(os.path.join(local_dir, rel))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(upload, first))
    if overwrite:
        keep = {f"{key}/{rel}" for rel in files}
        for blob in list(_iter_blobs(uri)):
            if blob.name not in keep:
                blob.delete()
    for rel in last_set:
        upload(rel)
    return uri


def fetch_dir(uri: str | os.PathLike, local_dir: str | os.PathLike | None = None, workers: int = 8) -> str:
    """Make the directory at `uri` available locally and return its local path.

    A local `uri` with no `local_dir` (or the same path) is returned as is; otherwise the
    files are copied/downloaded into a sibling temp directory renamed to `local_dir`, which
    replaces whatever was there."""
    uri = str(uri)
    if not is_gcs(uri):
        if not os.path.isdir(uri):
            raise FileNotFoundError(f"no such directory: {uri}")
        if local_dir is None or os.path.abspath(str(local_dir)) == os.path.abspath(uri):
            return uri
    elif local_dir is None:
        raise StorageError(f"fetch_dir({uri!r}) needs a local_dir to download into")
    local_dir = str(local_dir)
    os.makedirs(os.path.dirname(os.path.abspath(local_dir)), exist_ok=True)
    tmp = _sibling_temp(local_dir, "tmp")
    try:
        if not is_gcs(uri):
            shutil.copytree(uri, tmp)
        else:
            _, key = _split_gcs(uri)
            prefix = f"{key}/" if key else ""
            blobs = [b for b in _iter_blobs(uri) if not b.name.endswith("/")]
            if not blobs:
                raise FileNotFoundError(f"no such directory (no objects under it): {uri}")

            def download(blob: Any) -> None:
                dest = os.path.join(tmp, *blob.name[len(prefix):].split("/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                blob.download_to_filename(dest)

            os.makedirs(tmp)
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                list(pool.map(download, blobs))
        _swap_in_local(tmp, local_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return local_dir
