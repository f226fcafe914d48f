"""One small file API over local paths and remote URIs (`gs://`, `s3://`, `memory://`, ...).

Every stage hands its outputs (tokenizer, checkpoints, manifests, data shards) to the next
through a URI, so the pipeline runs unchanged on a laptop and on a cluster with a bucket.
Transport is fsspec (gcsfs for gs:// with google default credentials, s3fs for s3://, the
in-memory filesystem in tests); `filesystem(uri)` hands out its cached filesystem objects, so
pyarrow reads parquet through the same connection (`pq.ParquetFile(path, filesystem=fs)`).
What this module adds are the rules that keep readers safe:

* `write_bytes` is atomic: locally a temp file beside the target, fsync, `os.replace`;
  remotely one object upload, which object stores expose only once complete.
* `publish_dir` makes a finished directory appear at once: locally a sibling temp directory
  renamed into place; remotely (no directory rename) every file goes up before the `last=`
  files (the manifest), and an overwrite deletes the old manifest before touching anything,
  so a reader that trusts only a directory with its manifest never sees a half-written one.
* `copy`/`copy_dir` inside one object store are server-side (GCS: objects.rewrite), so adopting a
  checkpoint never moves its bytes through this machine; `put_file` uploads one file atomically.
* Failures are one-line `StorageError`s naming the URI (`NotFound` and `Denied` are also
  FileNotFoundError and PermissionError, which callers catch).

With STORAGE_EMULATOR_HOST set, gs:// goes to that emulator anonymously (project "test").
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from typing import IO, Any, Callable, Iterator, Sequence

import fsspec
from fsspec.core import split_protocol, url_to_fs

_CHUNK = 1 << 20


class StorageError(OSError):
    """A storage operation that cannot proceed; the message names the URI and says why."""


class NotFound(StorageError, FileNotFoundError):
    """The file, object or directory does not exist."""


class Denied(StorageError, PermissionError):
    """The credentials may not do this (HTTP 403 or a local permission error)."""


# --------------------------------------------------------------------------- URIs

def is_remote(uri: str | os.PathLike) -> bool:
    """True for `proto://...` URIs other than file://; plain paths are local."""
    return split_protocol(os.fspath(uri))[0] not in (None, "file", "local")


is_gcs = is_remote  # the old name: callers use it to mean "not a local path"


def join(uri: str | os.PathLike, *parts: str) -> str:
    uri = os.fspath(uri)
    if not is_remote(uri):
        return os.path.join(uri, *parts)
    return "/".join([uri.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")])


def basename(uri: str | os.PathLike) -> str:
    return os.fspath(uri).rstrip("/").rsplit("/", 1)[-1]


def _gcs_filesystem() -> Any:
    try:
        import gcsfs
    except ImportError as e:
        raise StorageError("gs:// URIs need gcsfs, which is not installed: pip install 'flaxchat[gcs]'") from e
    # No listings cache: other processes (orbax, other hosts) write the same prefixes, and a
    # stale listing would hide a just-published manifest.
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        # The plain HTTP client, not gcsfs' default ExtendedGcsFileSystem, which probes each bucket
        # over the gRPC storage-control API that emulators lack (a 60 s stall). endpoint_url is part
        # of fsspec's instance-cache key, so an emulator on a new port never gets a stale instance.
        return gcsfs.core.GCSFileSystem(endpoint_url=emulator if "://" in emulator else f"http://{emulator}",
                                        token="anon", project="test", use_listings_cache=False)
    return fsspec.filesystem("gs", use_listings_cache=False)  # token=None: google default credentials


def _resolve(uri: str) -> tuple[Any, str]:
    protocol = split_protocol(uri)[0]
    if protocol in ("gs", "gcs"):
        fs = _gcs_filesystem()
        return fs, fs._strip_protocol(uri)
    if protocol in ("s3", "s3a"):  # s3fs caches listings as gcsfs does
        return url_to_fs(uri, use_listings_cache=False)
    return url_to_fs(uri)


@contextlib.contextmanager
def _on(uri: str | os.PathLike, action: str) -> Iterator[tuple[Any, str]]:
    """(fs, path) for `uri`; whatever the backend raises inside (a FileNotFoundError with a bare
    key, gcsfs' multi-line HTTP errors, ImportError for a missing backend) becomes one line
    naming the URI."""
    uri = os.fspath(uri)
    try:
        yield _resolve(uri)
    except StorageError:
        raise
    except Exception as e:
        detail = (str(e).strip().splitlines() or [""])[0]
        if isinstance(e, FileNotFoundError):
            raise NotFound(f"cannot {action} {uri}: no such file or directory") from e
        if isinstance(e, PermissionError) or detail.startswith("Forbidden"):  # gcsfs: 403 -> OSError
            raise Denied(f"cannot {action} {uri}: permission denied ({detail})") from e
        name = "" if isinstance(e, ImportError) else f"{type(e).__name__}: "
        raise StorageError(f"cannot {action} {uri}: {name}{detail}") from e


def filesystem(uri: str | os.PathLike) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a local path or URI. fsspec caches the instances,
    so every caller, pyarrow included (`pq.ParquetFile(path, filesystem=fs)`), shares one."""
    with _on(uri, "open a filesystem for") as fs_path:
        return fs_path


# --------------------------------------------------------------------------- files

def exists(uri: str | os.PathLike) -> bool:
    with _on(uri, "check") as (fs, path):
        return fs.exists(path)


def isdir(uri: str | os.PathLike) -> bool:
    """On object stores a "directory" is a prefix with at least one object under it."""
    with _on(uri, "check") as (fs, path):
        return fs.isdir(path)


def read_bytes(uri: str | os.PathLike) -> bytes:
    with _on(uri, "read") as (fs, path):
        return fs.cat_file(path)


def read_text(uri: str | os.PathLike, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def _atomic_local_write(path: str, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename it over `path`.
    On any failure the temp file is removed and the old `path` is untouched."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _is_bucket(fs: Any, path: str) -> bool:
    """A bucket itself (object stores have root_marker ''; memory:// and local have '/')."""
    return not fs.root_marker and "/" not in path.strip("/")


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    with _on(uri, "write") as (fs, path):
        if not is_remote(uri):
            return _atomic_local_write(path, data)
        if _is_bucket(fs, path):
            raise StorageError(f"cannot write to a bucket root: {os.fspath(uri)}; name an object path")
        fs.pipe_file(path, data)


def write_text(uri: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def open_read(uri: str | os.PathLike) -> IO[bytes]:
    """A seekable binary reader; remote reads fetch blocks on demand, not the whole object."""
    with _on(uri, "open") as (fs, path):
        return fs.open(path, "rb")


def listdir(uri: str | os.PathLike) -> list[str]:
    """Sorted names of the direct children (files and sub-directories / prefixes)."""
    with _on(uri, "list") as (fs, path):
        entries, here = fs.ls(path, detail=True), path.rstrip("/")
        if [(e["name"].rstrip("/"), e["type"]) for e in entries] == [(here, "file")]:
            raise NotADirectoryError(path)  # fsspec lists a file as itself
    # skip the directory's own "dir/" marker object, which gcsfs may list
    return sorted({e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["name"].rstrip("/") != here})


def find(uri: str | os.PathLike) -> list[str]:
    """Sorted '/'-separated paths, relative to `uri`, of every file under it ([] if none)."""
    with _on(uri, "list") as (fs, path):
        root = path.rstrip("/") + "/"
        # object stores may hold "dir/" marker objects: they are not files
        return sorted(p[len(root):] for p in fs.find(path) if p.startswith(root) and not p.endswith("/"))


def remove_tree(uri: str | os.PathLike) -> None:
    """Delete a directory (or prefix, or file) and everything under it; missing is not an error."""
    with _on(uri, "delete") as (fs, path):
        if _is_bucket(fs, path):
            raise StorageError(f"refusing to delete a whole bucket: {os.fspath(uri)}")
        if not is_remote(uri) and os.path.islink(path):
            return os.unlink(path)  # the link, not the tree it points to (fsspec would rmtree it)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)


def sha256_file(uri: str | os.PathLike) -> str:
    """Streamed, so a multi-GB checkpoint file never sits in memory."""
    h = hashlib.sha256()
    with _on(uri, "read") as (fs, path), fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def size(uri: str | os.PathLike) -> int:
    """Bytes in a file or object."""
    with _on(uri, "check") as (fs, path):
        return int(fs.size(path))


def info(uri: str | os.PathLike) -> dict[str, Any]:
    """The backend's description of a file or object (size, and on GCS `md5Hash`, `crc32c`, …)."""
    with _on(uri, "check") as (fs, path):
        return dict(fs.info(path))


def _local_copy(src: str, dst: str, link: bool) -> None:
    """Copy a local file so `dst` appears complete or not at all: a hard link (no bytes copied) when
    `link` and both are on one filesystem, else a copy, into a temp name renamed over `dst`."""
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        try:
            if not link:
                raise OSError("copy requested")
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def put_file(local_path: str | os.PathLike, uri: str | os.PathLike, link: bool = False) -> None:
    """Upload (or locally copy) one local file to `uri`, atomically for readers: remotely one object
    that appears only once the upload is complete (a resumable upload for big files); locally a temp
    file renamed into place, hard-linked instead of copied when `link` (the source must then never be
    modified in place: a hard link shares its bytes)."""
    local_path = os.fspath(local_path)
    if not os.path.isfile(local_path):
        raise NotFound(f"cannot upload {local_path}: no such file")
    with _on(uri, "write") as (fs, path):
        if not is_remote(uri):
            return _local_copy(local_path, path, link)
        if _is_bucket(fs, path):
            raise StorageError(f"cannot write to a bucket root: {os.fspath(uri)}; name an object path")
        fs.put_file(local_path, path)


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy one file. Within one object store this is a server-side copy (GCS: objects.rewrite), no
    bytes pass through this machine; local to local hard-links; across backends it streams."""
    src, dst = os.fspath(src), os.fspath(dst)
    if not is_remote(src) and not is_remote(dst):
        with _on(src, "copy"):
            return _local_copy(os.path.abspath(src), os.path.abspath(dst), link=True)
    with _on(src, "copy") as (sfs, spath), _on(dst, f"copy {src} to") as (dfs, dpath):
        if split_protocol(src)[0] == split_protocol(dst)[0] and sfs is dfs:
            return sfs.copy(spath, dpath)
        if not is_remote(src):
            return dfs.put_file(spath, dpath)
        with tempfile.TemporaryDirectory(prefix="flaxchat-copy-") as tmp:
            local = os.path.join(tmp, basename(src))
            sfs.get_file(spath, local)
            if is_remote(dst):
                return dfs.put_file(local, dpath)
            _local_copy(local, dpath, link=True)


def copy_dir(src: str | os.PathLike, dst: str | os.PathLike, last: Sequence[str] = ()) -> None:
    """Copy every file under `src` to `dst` with `copy` (server-side within one object store), the
    `last` files (relative paths: a commit marker, a checksum file) after all the others, so a reader
    that trusts only a directory with those files never sees a partial copy."""
    src, dst = os.fspath(src), os.fspath(dst)
    files = find(src)
    if not files:
        raise NotFound(f"no such directory (nothing under it): {src}")
    for rel in [f for f in files if f not in last] + [f for f in last if f in files]:
        copy(join(src, *rel.split("/")), join(dst, *rel.split("/")))


# --------------------------------------------------------------------------- directories

def _into_place(dest: str, fill: Callable[[str], None]) -> None:
    """fill() a sibling temp directory, then rename it to `dest` (replacing an existing one, which
    is put back if the rename fails): `dest` is only ever absent, the old one, or complete."""
    dest = os.path.abspath(dest)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    sibling = lambda tag: os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.{tag}-{uuid.uuid4().hex[:12]}")
    tmp, old = sibling("tmp"), None
    try:
        fill(tmp)
        if os.path.lexists(dest):
            old = sibling("old")
            os.rename(dest, old)
        try:
            os.rename(tmp, dest)
        except BaseException:
            if old is not None:
                os.rename(old, dest)
                old = None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _put(fs: Any, local_dir: str, root: str, rels: Sequence[str]) -> None:
    """Upload files (relative paths) of local_dir under root; async backends upload them concurrently."""
    if rels:
        fs.put([os.path.join(local_dir, *r.split("/")) for r in rels], [f"{root}/{r}" for r in rels])


def publish_dir(local_dir: str | os.PathLike, uri: str | os.PathLike, overwrite: bool = False,
                last: Sequence[str] = ("manifest.json",)) -> str:
    """Copy a finished local directory to `uri` so no reader ever sees it half-written.

    `last` names files (relative paths) written after all the others on remote stores: readers
    must treat a directory without its manifest as absent. Returns `uri`."""
    local_dir, uri = os.fspath(local_dir), os.fspath(uri)
    if not os.path.isdir(local_dir):
        raise StorageError(f"publish_dir: {local_dir} is not a directory; write the files there first")
    if not overwrite and exists(uri):
        raise StorageError(f"publish_dir: {uri} already exists; pass overwrite=True to replace it")
    files = find(local_dir)
    with _on(uri, "publish to") as (fs, root):
        if not is_remote(uri):
            if os.path.abspath(local_dir) != os.path.abspath(root):
                _into_place(root, lambda tmp: shutil.copytree(local_dir, tmp))
            return uri
        root = root.rstrip("/")
        if overwrite:  # readers stop trusting the directory before any file in it changes
            for name in last:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(f"{root}/{name}")
        _put(fs, local_dir, root, [f for f in files if f not in last])
        stale = sorted(set(find(uri)) - set(files)) if overwrite else []
        if stale:
            fs.rm([f"{root}/{r}" for r in stale])
        _put(fs, local_dir, root, [n for n in last if n in files])
    return uri


def fetch_dir(uri: str | os.PathLike, local_dir: str | os.PathLike | None = None) -> str:
    """Make the directory at `uri` available locally and return its local path.

    A local `uri` with no `local_dir` (or the same path) is returned as is; a remote one with no
    `local_dir` goes to a new temp directory. Otherwise the files are copied/downloaded into a
    sibling temp directory renamed to `local_dir`, which replaces whatever was there."""
    uri = os.fspath(uri)
    with _on(uri, "download") as (fs, src):
        here = not is_remote(uri) and (local_dir is None or os.path.abspath(local_dir) == os.path.abspath(src))
        rels = [] if here else find(uri)
        if not rels and not fs.isdir(src):
            raise NotFound(f"no such directory (nothing under it): {uri}")
        if here:
            return uri
        if local_dir is None:  # the caller owns the copy, as with any download
            local_dir = os.path.join(tempfile.mkdtemp(prefix="flaxchat-fetch-"), basename(uri))

        def download(tmp: str) -> None:
            targets = [os.path.join(tmp, *r.split("/")) for r in rels]
            for t in [os.path.join(tmp, "_")] + targets:  # the root too: the directory may be empty
                os.makedirs(os.path.dirname(t), exist_ok=True)
            fs.get([f"{src.rstrip('/')}/{r}" for r in rels], targets)

        _into_place(os.fspath(local_dir), download)
    return os.fspath(local_dir)
