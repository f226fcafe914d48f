"""flaxchat.storage: the same behaviour on a local directory, `memory://` and `gs://` (an
in-process GCS emulator), plus what is specific to each (local atomic rename, GCS prefixes)."""

import hashlib
import io
import os
import sys
import uuid

import pytest

from flaxchat import storage

import gcs_emulator


# --------------------------------------------------------------------------- fixtures

def _start_emulator(bucket: str):
    return gcs_emulator.start(bucket)


@pytest.fixture(scope="module")
def gcs():
    """A GCS emulator on 127.0.0.1 with bucket `test-bucket`; yields the bucket URI."""
    pytest.importorskip("gcsfs", reason="gs:// needs gcsfs (the gcs extra)")
    server, host = _start_emulator("test-bucket")
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = host
    try:
        yield "gs://test-bucket"
    finally:
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        server.stop()


@pytest.fixture(params=["local", "memory", "gs"])
def root(request, tmp_path):
    """A fresh, empty directory URI on each backend."""
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "memory":
        return f"memory://flaxchat-test-{uuid.uuid4().hex[:8]}"
    return storage.join(request.getfixturevalue("gcs"), uuid.uuid4().hex[:8])


def _make_tree(path) -> dict[str, bytes]:
    files = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 10, "sub/deeper/c.txt": b"",
             "manifest.json": b'{"ok": true}'}
    for rel, data in files.items():
        p = os.path.join(path, *rel.split("/"))
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    return files


def _read_tree(path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(path):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, path).replace(os.sep, "/")] = open(p, "rb").read()
    return out


def _one_line_naming(exc: BaseException, uri: str) -> None:
    assert uri in str(exc) and "\n" not in str(exc), str(exc)


# --------------------------------------------------------------------------- every backend

def test_uri_helpers():
    assert storage.is_remote("gs://b/x") and storage.is_remote("memory://x") and storage.is_remote("s3://b/k")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("gsx/y") and not storage.is_remote("file:///x")
    assert storage.is_gcs is storage.is_remote
    assert storage.join("gs://b/pre/", "x", "/y/") == "gs://b/pre/x/y"
    assert storage.join("gs://b", "x") == "gs://b/x"
    assert storage.join("memory://r", "x") == "memory://r/x"
    assert storage.join("/tmp/a", "b", "c") == os.path.join("/tmp/a", "b", "c")
    assert storage.basename("gs://b/pre/x/") == "x" and storage.basename("/tmp/a/b") == "b"


def test_round_trip(root):
    f = storage.join(root, "dir", "f.txt")
    assert not storage.exists(f) and not storage.exists(root)
    storage.write_text(f, "héllo")
    storage.write_bytes(storage.join(root, "top.bin"), b"\x00\xff" * 100)
    assert storage.read_text(f) == "héllo" and storage.read_bytes(storage.join(root, "top.bin")) == b"\x00\xff" * 100
    storage.write_bytes(f, b"\x00\x01")  # overwrite
    assert storage.read_bytes(f) == b"\x00\x01"
    # directories: on object stores a prefix with objects under it, with no marker object
    assert storage.exists(f) and storage.exists(root) and storage.exists(storage.join(root, "dir"))
    assert storage.isdir(root) and storage.isdir(storage.join(root, "dir")) and not storage.isdir(f)
    assert not storage.isdir(storage.join(root, "nothing"))
    assert storage.listdir(root) == ["dir", "top.bin"]
    assert storage.listdir(storage.join(root, "dir")) == ["f.txt"]
    assert storage.find(root) == ["dir/f.txt", "top.bin"]
    with storage.open_read(storage.join(root, "top.bin")) as fh:
        fh.seek(199)
        assert fh.read() == b"\xff"
    assert storage.sha256_file(f) == hashlib.sha256(b"\x00\x01").hexdigest()
    storage.remove_tree(storage.join(root, "dir"))
    assert storage.listdir(root) == ["top.bin"] and not storage.exists(f)
    storage.remove_tree(root)
    assert not storage.exists(root)
    storage.remove_tree(storage.join(root, "never-existed"))  # missing is fine


def test_errors_are_one_line_and_name_the_uri(root):
    missing = storage.join(root, "missing")
    for op in (storage.read_bytes, storage.listdir, storage.sha256_file, storage.open_read):
        with pytest.raises(FileNotFoundError) as info:
            op(missing)
        assert isinstance(info.value, storage.StorageError)
        _one_line_naming(info.value, missing)
    storage.write_text(storage.join(root, "file"), "x")
    with pytest.raises(storage.StorageError) as info:
        storage.listdir(storage.join(root, "file"))
    _one_line_naming(info.value, storage.join(root, "file"))


@pytest.mark.parametrize("raised, kind", [
    (OSError("Forbidden: b/o/key\n{'error': 'caller lacks storage.objects.get'}"), storage.Denied),
    (PermissionError(13, "Permission denied"), storage.Denied),
    (ValueError("bad\nlong\nbody"), storage.StorageError)])
def test_backend_errors_become_one_line_storage_errors(root, monkeypatch, raised, kind):
    fs, _ = storage.filesystem(root)

    def boom(*a, **k):
        raise raised

    monkeypatch.setattr(fs, "cat_file", boom)
    uri = storage.join(root, "x")
    with pytest.raises(kind) as info:
        storage.read_bytes(uri)
    _one_line_naming(info.value, uri)


def test_pyarrow_reads_parquet_through_the_same_filesystem(root):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(10)]}), buf, row_group_size=4)
    uri = storage.join(root, "shard.parquet")
    storage.write_bytes(uri, buf.getvalue())
    fs, path = storage.filesystem(uri)
    assert storage.filesystem(root)[0] is fs  # one cached instance per backend
    with pq.ParquetFile(path, filesystem=fs) as pf:
        assert pf.num_row_groups == 3
        assert pf.read_row_group(2).column("text").to_pylist() == ["doc 8", "doc 9"]


def test_publish_is_atomic_for_readers(root, tmp_path, monkeypatch):
    """Every upload of non-manifest files happens while no manifest is visible, the manifest goes
    up alone and last, and an overwrite hides the old manifest before changing anything."""
    src = tmp_path / "build"
    files = _make_tree(src)
    dest = storage.join(root, "pub")
    manifest = storage.join(dest, "manifest.json")
    calls = []
    real_put = storage._put

    def recording_put(fs, local_dir, remote_root, rels):
        calls.append((sorted(rels), storage.exists(manifest)))
        real_put(fs, local_dir, remote_root, rels)

    monkeypatch.setattr(storage, "_put", recording_put)
    assert storage.publish_dir(str(src), dest) == dest
    assert _read_tree(storage.fetch_dir(dest, str(tmp_path / "fetched"))) == files
    with pytest.raises(storage.StorageError, match="overwrite=True"):
        storage.publish_dir(str(src), dest)

    (src / "sub" / "b.bin").unlink()
    (src / "new.txt").write_bytes(b"n")
    (src / "manifest.json").write_bytes(b'{"v": 2}')
    storage.publish_dir(str(src), dest, overwrite=True)
    fetched = _read_tree(storage.fetch_dir(dest, str(tmp_path / "fetched")))  # replaces the old copy
    assert "sub/b.bin" not in fetched and fetched["new.txt"] == b"n" and fetched["manifest.json"] == b'{"v": 2}'
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp dirs left
    if storage.is_remote(root):  # local publishing is one rename, no per-file uploads
        assert calls == [(["a.txt", "sub/b.bin", "sub/deeper/c.txt"], False), (["manifest.json"], False),
                         (["a.txt", "new.txt", "sub/deeper/c.txt"], False), (["manifest.json"], False)]
    else:
        assert not [n for n in os.listdir(os.path.dirname(dest)) if n.startswith(".")]
    with pytest.raises(storage.StorageError, match="not a directory"):
        storage.publish_dir(str(tmp_path / "nope"), storage.join(root, "x"))


def test_fetch_dir(root, tmp_path):
    src = tmp_path / "build"
    files = _make_tree(src)
    uri = storage.publish_dir(str(src), storage.join(root, "d"))
    copy = storage.fetch_dir(uri, str(tmp_path / "copy"))
    assert copy == str(tmp_path / "copy") and _read_tree(copy) == files
    (tmp_path / "copy" / "stale.txt").write_bytes(b"s")
    assert _read_tree(storage.fetch_dir(uri, str(tmp_path / "copy"))) == files  # replaced whole
    if storage.is_remote(uri):
        assert _read_tree(storage.fetch_dir(uri)) == files  # into a fresh temp dir
    else:
        assert storage.fetch_dir(uri) == uri  # already local: no copy
    storage.remove_tree(uri)
    with pytest.raises(FileNotFoundError) as info:
        storage.fetch_dir(uri, str(tmp_path / "again"))
    _one_line_naming(info.value, uri)
    assert not os.path.exists(tmp_path / "again")


# --------------------------------------------------------------------------- local only

def test_local_atomic_write_leaves_no_temp_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
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


# --------------------------------------------------------------------------- GCS only

def test_missing_gcsfs_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # makes the import fail
    with pytest.raises(storage.StorageError, match=r"pip install 'flaxchat\[gcs\]'"):
        storage.read_bytes("gs://bucket/x")


def test_gcs_bucket_root(gcs):
    assert storage.exists(gcs) and storage.isdir(gcs)
    with pytest.raises(storage.StorageError, match="bucket root"):
        storage.write_text(gcs, "x")
    with pytest.raises(storage.StorageError, match="whole bucket"):
        storage.remove_tree(gcs)


def test_gcs_listing_never_hides_another_writers_object(gcs):
    """A second client (another host, orbax) writes after we listed: we see it at once."""
    import gcsfs
    root = storage.join(gcs, "shared")
    storage.write_text(storage.join(root, "a"), "1")
    assert storage.listdir(root) == ["a"] and not storage.exists(storage.join(root, "b"))
    other = gcsfs.core.GCSFileSystem(endpoint_url=os.environ["STORAGE_EMULATOR_HOST"], token="anon",
                                     project="test", skip_instance_cache=True)
    other.pipe_file("test-bucket/shared/b", b"2")
    assert storage.listdir(root) == ["a", "b"] and storage.exists(storage.join(root, "b"))
    assert storage.find(root) == ["a", "b"]


def test_gcs_emulator_on_a_new_port_gets_a_new_filesystem(gcs, monkeypatch):
    fs1, _ = storage.filesystem(gcs)
    server, host = _start_emulator("test-bucket")
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
        fs2, _ = storage.filesystem(gcs)
        assert fs2 is not fs1
        storage.write_text(storage.join(gcs, "only-here"), "x")
        assert storage.listdir(gcs) == ["only-here"]
    finally:
        server.stop()


def test_put_file_copy_and_copy_dir(root, tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(b"payload" * 1000)
    storage.put_file(src, storage.join(root, "a", "blob.bin"))
    assert storage.read_bytes(storage.join(root, "a", "blob.bin")) == src.read_bytes()
    assert storage.size(storage.join(root, "a", "blob.bin")) == 7000
    assert int(storage.info(storage.join(root, "a", "blob.bin"))["size"]) == 7000
    storage.copy(storage.join(root, "a", "blob.bin"), storage.join(root, "b", "copy.bin"))
    assert storage.read_bytes(storage.join(root, "b", "copy.bin")) == src.read_bytes()
    storage.write_text(storage.join(root, "a", "z_marker.txt"), "done")
    order = []
    real_copy = storage.copy
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(storage, "copy", lambda s, d: (order.append(storage.basename(d)), real_copy(s, d)))
        storage.copy_dir(storage.join(root, "a"), storage.join(root, "c"), last=("blob.bin",))
    assert order == ["z_marker.txt", "blob.bin"]       # the `last` file after the others
    assert storage.find(storage.join(root, "c")) == ["blob.bin", "z_marker.txt"]
    with pytest.raises(storage.NotFound, match="nothing under it"):
        storage.copy_dir(storage.join(root, "nope"), storage.join(root, "d"))
    with pytest.raises(storage.NotFound, match="no such file"):
        storage.put_file(tmp_path / "missing.bin", storage.join(root, "x"))


def test_local_put_file_links_and_copy_keeps_the_old_target_on_failure(tmp_path, monkeypatch):
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    storage.put_file(src, tmp_path / "linked.bin", link=True)
    assert os.stat(tmp_path / "linked.bin").st_ino == os.stat(src).st_ino      # no bytes copied
    storage.put_file(src, tmp_path / "copied.bin")
    assert os.stat(tmp_path / "copied.bin").st_ino != os.stat(src).st_ino
    (tmp_path / "old.bin").write_bytes(b"old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(storage.StorageError, match="disk full"):
        storage.put_file(src, tmp_path / "old.bin")
    assert (tmp_path / "old.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copied.bin", "linked.bin", "old.bin", "src.bin"]


def test_gcs_copy_is_server_side(gcs, monkeypatch):
    """Within the bucket no byte comes down to this machine: GCS copies (objects.rewrite)."""
    import gcsfs
    base = storage.join(gcs, uuid.uuid4().hex[:8])
    storage.write_bytes(storage.join(base, "src", "x.bin"), b"x" * 5000)
    storage.write_bytes(storage.join(base, "src", "sub", "y.bin"), b"y" * 10)

    def no_download(*a, **k):
        raise AssertionError("downloaded during a server-side copy")
    for name in ("_cat_file", "_get_file", "_open"):
        monkeypatch.setattr(gcsfs.core.GCSFileSystem, name, no_download)
    storage.copy_dir(storage.join(base, "src"), storage.join(base, "dst"))
    monkeypatch.undo()
    assert storage.find(storage.join(base, "dst")) == ["sub/y.bin", "x.bin"]
    assert storage.read_bytes(storage.join(base, "dst", "x.bin")) == b"x" * 5000
