"""flaxchat.storage: local paths and gs:// URIs (against an in-process GCS emulator)."""

import os
import socket
import sys

import pytest

from flaxchat import storage


# --------------------------------------------------------------------------- fixtures

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
    """A GCS emulator on 127.0.0.1 with bucket `test-bucket`; yields the bucket URI."""
    try:
        from gcp_storage_emulator.server import create_server
    except Exception as e:  # the dev group installs it; only a broken env skips
        pytest.skip(f"gcp-storage-emulator does not import ({e}); GCS tests need the dev dependency group")
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="test-bucket")
    server.start()
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        yield "gs://test-bucket"
    finally:
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        server.stop()


def _make_tree(root) -> dict[str, bytes]:
    files = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 10, "sub/deeper/c.txt": b"",
             "manifest.json": b'{"ok": true}'}
    for rel, data in files.items():
        path = os.path.join(root, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return files


def _read_tree(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root).replace(os.sep, "/")] = open(p, "rb").read()
    return out


# --------------------------------------------------------------------------- local

def test_uri_helpers():
    assert storage.is_gcs("gs://b/x") and not storage.is_gcs("/tmp/x") and not storage.is_gcs("gsx/y")
    assert storage.join("gs://b/pre/", "x", "/y/") == "gs://b/pre/x/y"
    assert storage.join("gs://b", "x") == "gs://b/x"
    assert storage.join("/tmp/a", "b", "c") == os.path.join("/tmp/a", "b", "c")


def test_local_round_trip(tmp_path):
    target = str(tmp_path / "new" / "dir" / "f.txt")
    assert not storage.exists(target)
    storage.write_text(target, "héllo")
    assert storage.exists(target) and storage.read_text(target) == "héllo"
    storage.write_bytes(target, b"\x00\x01")
    assert storage.read_bytes(target) == b"\x00\x01"
    storage.write_text(str(tmp_path / "new" / "a.txt"), "x")
    assert storage.listdir(str(tmp_path / "new")) == ["a.txt", "dir"]
    assert storage.isdir(str(tmp_path / "new" / "dir")) and not storage.isdir(target)
    import hashlib
    assert storage.sha256_file(target) == hashlib.sha256(b"\x00\x01").hexdigest()
    storage.remove_tree(str(tmp_path / "new"))
    assert not storage.exists(str(tmp_path / "new"))
    storage.remove_tree(str(tmp_path / "never-existed"))  # missing is fine
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "missing"))


def test_atomic_write_leaves_no_temp_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = str(tmp_path / "state.json")
    storage.write_text(target, "old")
    assert os.listdir(tmp_path) == ["state.json"]

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        storage.write_text(target, "new" * 1000)
    assert storage.read_text(target) == "old"
    assert os.listdir(tmp_path) == ["state.json"]  # the temp file was cleaned up


def test_publish_dir_local(tmp_path):
    src = tmp_path / "build"
    files = _make_tree(src)
    dest = str(tmp_path / "out" / "ckpt")
    assert storage.publish_dir(str(src), dest) == dest
    assert _read_tree(dest) == files
    with pytest.raises(storage.StorageError, match="overwrite=True"):
        storage.publish_dir(str(src), dest)
    # overwrite replaces the whole directory (stale files disappear), no temp siblings remain
    (src / "a.txt").unlink()
    (src / "new.txt").write_bytes(b"n")
    storage.publish_dir(str(src), dest, overwrite=True)
    expected = dict(files)
    del expected["a.txt"]
    expected["new.txt"] = b"n"
    assert _read_tree(dest) == expected
    assert os.listdir(tmp_path / "out") == ["ckpt"]
    with pytest.raises(storage.StorageError, match="not a directory"):
        storage.publish_dir(str(tmp_path / "nope"), str(tmp_path / "x"))


def test_fetch_dir_local(tmp_path):
    src = tmp_path / "src"
    files = _make_tree(src)
    assert storage.fetch_dir(str(src)) == str(src)
    copy = storage.fetch_dir(str(src), str(tmp_path / "copy"))
    assert _read_tree(copy) == files
    with pytest.raises(FileNotFoundError):
        storage.fetch_dir(str(tmp_path / "absent"))


def test_missing_gcs_library_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # makes the import fail
    monkeypatch.setattr(storage, "_clients", {})
    with pytest.raises(storage.StorageError, match=r"pip install 'flaxchat\[gcs\]'"):
        storage.read_bytes("gs://bucket/x")


# --------------------------------------------------------------------------- GCS (emulator)

def test_gcs_round_trip(gcs):
    root = storage.join(gcs, "rt")
    uri = storage.join(root, "dir", "f.txt")
    assert not storage.exists(uri) and not storage.exists(root)
    storage.write_text(uri, "hello gcs")
    storage.write_bytes(storage.join(root, "top.bin"), b"\x00\xff" * 100)
    assert storage.read_text(uri) == "hello gcs"
    assert storage.exists(uri) and storage.exists(root) and storage.exists(storage.join(root, "dir"))
    assert storage.isdir(storage.join(root, "dir")) and not storage.isdir(uri)
    assert storage.listdir(root) == ["dir", "top.bin"]
    assert storage.listdir(storage.join(root, "dir")) == ["f.txt"]
    with storage.open_read(storage.join(root, "top.bin")) as f:
        f.seek(199)
        assert f.read() == b"\xff"
    import hashlib
    assert storage.sha256_file(uri) == hashlib.sha256(b"hello gcs").hexdigest()
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing"))
    with pytest.raises(FileNotFoundError):
        storage.listdir(storage.join(root, "missing"))
    storage.remove_tree(root)
    assert not storage.exists(root)


def test_gcs_publish_uploads_manifest_last_and_fetch_round_trips(gcs, tmp_path, monkeypatch):
    from google.cloud.storage import Blob
    src = tmp_path / "build"
    files = _make_tree(src)
    order = []
    real_upload = Blob.upload_from_filename

    def recording_upload(self, filename, *a, **k):
        order.append(self.name.removeprefix("pub/"))
        return real_upload(self, filename, *a, **k)

    monkeypatch.setattr(Blob, "upload_from_filename", recording_upload)
    dest = storage.join(gcs, "pub")
    storage.publish_dir(str(src), dest)
    assert order[-1] == "manifest.json" and sorted(order) == sorted(files)
    assert _read_tree(storage.fetch_dir(dest, str(tmp_path / "fetched"))) == files
    with pytest.raises(storage.StorageError, match="already exists"):
        storage.publish_dir(str(src), dest)

    (src / "sub" / "b.bin").unlink()
    (src / "manifest.json").write_bytes(b'{"v": 2}')
    storage.publish_dir(str(src), dest, overwrite=True)
    fetched = _read_tree(storage.fetch_dir(dest, str(tmp_path / "fetched")))  # replaces the old copy
    assert "sub/b.bin" not in fetched and fetched["manifest.json"] == b'{"v": 2}'
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp dirs left
    storage.remove_tree(dest)
    with pytest.raises(FileNotFoundError):
        storage.fetch_dir(dest, str(tmp_path / "again"))
