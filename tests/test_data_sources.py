"""flaxchat.data.sources / download: shard resolution, robust downloads from a loopback
HTTP server, parquet reading and the one-line errors for bad data."""

import io
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flaxchat import storage
from flaxchat.config import DataConfig
from flaxchat.data import DataError, DownloadError
from flaxchat.data.download import download_shards, shard_urls
from flaxchat.data.sources import iter_documents, iter_row_groups, list_parquet, resolve_shards


def _parquet_bytes(texts, row_group_size=2, column="text") -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({column: texts}), buf, row_group_size=row_group_size)
    return buf.getvalue()


def _write_shard(path, texts, column="text", row_group_size=2):
    with open(path, "wb") as f:
        f.write(_parquet_bytes(texts, row_group_size, column))


def _docs(name: str, n: int = 5) -> list[str]:
    return [f"{name} document {i}" for i in range(n)]


# --------------------------------------------------------------------------- loopback HF server

class FakeHub:
    """Serves any `.../shard_XXXXX.parquet` as a small generated parquet file.
    `modes[name]` picks a behaviour: 'ok', ('fail', k) = HTTP 500 k times then ok,
    'always500', 'hang' (never answers), '404', 'garbage' (200 with a non-parquet body)."""

    def __init__(self):
        self.modes: dict[str, object] = {}
        self.requests: list[str] = []
        self.release = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                hub.requests.append(name)
                mode = hub.modes.get(name, "ok")
                if isinstance(mode, tuple) and mode[0] == "fail" and mode[1] > 0:
                    hub.modes[name] = ("fail", mode[1] - 1)
                    mode = "always500"
                if mode == "hang":
                    hub.release.wait(10)
                    return
                status, body = 200, _parquet_bytes(_docs(name))
                if mode == "always500":
                    status, body = 500, b"server error"
                elif mode == "404":
                    status, body = 404, b"not found"
                elif mode == "garbage":
                    body = b"<html>rate limited</html>"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(monkeypatch):
    h = FakeHub()
    monkeypatch.setenv("FLAXCHAT_HF_ENDPOINT", h.url)
    yield h
    h.close()


def _download(tmp_path, **kw):
    args = dict(source="climbmix", num_shards=3, cache_dir=str(tmp_path / "cache"), timeout_s=5.0,
                retries=3, backoff_s=0.01)
    args.update(kw)
    return download_shards(**args)


def test_shard_plans():
    urls = shard_urls("climbmix", 3)
    assert [u for u, _ in urls][-1].endswith("/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_06542.parquet")
    assert [n for _, n in urls] == ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    assert shard_urls("fineweb-edu", 2)[-1][1] == "shard_01822.parquet"
    ts = [n for _, n in shard_urls("tinystories", 10)]
    assert ts == [f"train-0000{i}-of-00004.parquet" for i in range(4)] + ["validation-00000-of-00001.parquet"]
    with pytest.raises(DownloadError, match="at least 2"):
        shard_urls("climbmix", 1)


def test_download_and_read(hub, tmp_path):
    paths = _download(tmp_path)
    assert [os.path.basename(p) for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(os.path.basename(p) for p in paths)
    assert list(iter_documents(paths, "train")) == _docs("shard_00000.parquet") + _docs("shard_00001.parquet")
    assert list(iter_documents(paths, "val")) == _docs("shard_06542.parquet")


def test_resume_skips_present_shards_and_refetches_broken_ones(hub, tmp_path):
    paths = _download(tmp_path)
    assert len(hub.requests) == 3
    assert _download(tmp_path) == paths and len(hub.requests) == 3  # nothing fetched again
    with open(paths[1], "r+b") as f:  # a truncated shard (e.g. copied in by hand) is not trusted
        f.truncate(20)
    _download(tmp_path)
    assert hub.requests[3:] == ["shard_00001.parquet"]
    assert pq.read_table(paths[1]).column("text").to_pylist() == _docs("shard_00001.parquet")


def test_retries_after_server_errors(hub, tmp_path):
    hub.modes["shard_00001.parquet"] = ("fail", 2)
    paths = _download(tmp_path, retries=3)
    assert hub.requests.count("shard_00001.parquet") == 3
    assert pq.read_table(paths[1]).num_rows == 5


@pytest.mark.parametrize("mode, attempts", [("always500", 3), ("garbage", 3), ("hang", 2), ("404", 1)])
def test_failing_download_names_url_and_leaves_no_partial_file(hub, tmp_path, mode, attempts):
    hub.modes["shard_06542.parquet"] = mode
    timeout = 0.2 if mode == "hang" else 5.0
    with pytest.raises(DownloadError, match=r"http://127\.0\.0\.1:\d+/.*shard_06542\.parquet"):
        _download(tmp_path, retries=attempts - 1 if mode != "404" else 3, timeout_s=timeout)
    assert hub.requests.count("shard_06542.parquet") == attempts  # 404 is not retried
    left = sorted(os.listdir(tmp_path / "cache"))
    assert left == ["shard_00000.parquet", "shard_00001.parquet"]  # good shards kept, no temp files


# --------------------------------------------------------------------------- resolve / read

def test_resolve_demo_generates_once(tmp_path):
    cfg = DataConfig(source="demo", cache_dir=str(tmp_path), demo_documents=300, demo_val_documents=20)
    paths = resolve_shards(cfg, seed=3)
    assert len(paths) >= 2 and os.path.dirname(paths[0]).startswith(str(tmp_path))
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    assert resolve_shards(cfg, seed=3) == paths
    assert [os.stat(p).st_mtime_ns for p in paths] == mtimes  # reused, not regenerated
    val = list(iter_documents(paths, "val"))
    assert len(val) == 20 and len(list(iter_documents(paths, "train"))) == 300
    assert resolve_shards(cfg, seed=4) != paths


def test_resolve_named_remote(hub, tmp_path):
    cfg = DataConfig(source="fineweb-edu", cache_dir=str(tmp_path), num_shards=2, download_retries=0)
    paths = resolve_shards(cfg, seed=0)
    assert paths == [str(tmp_path / "fineweb-edu" / "shard_00000.parquet"),
                     str(tmp_path / "fineweb-edu" / "shard_01822.parquet")]


def test_local_directory_source(tmp_path):
    for i in range(3):
        _write_shard(tmp_path / f"part_{i}.parquet", _docs(f"p{i}", 5))
    (tmp_path / ".part_9.parquet.part-abc").write_bytes(b"partial")  # temp files are ignored
    (tmp_path / "README.md").write_text("not data")
    paths = resolve_shards(DataConfig(source=str(tmp_path)), seed=0)
    assert [os.path.basename(p) for p in paths] == ["part_0.parquet", "part_1.parquet", "part_2.parquet"]
    assert list(iter_documents(paths, "val")) == _docs("p2", 5)
    assert list(iter_documents(paths, "train", doc_cap=4)) == [d[:4] for d in _docs("p0") + _docs("p1")]
    capped = list(iter_documents(paths, "train", max_chars=30))
    assert sum(map(len, capped[:-1])) < 30 <= sum(map(len, capped))
    # row-group slicing (data-parallel) and resuming after a position
    groups = [(s, r) for s, r, _ in iter_row_groups(paths, "train")]
    assert groups == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [(s, r) for s, r, _ in iter_row_groups(paths, "train", start=1, step=2)] == [(0, 1), (1, 1)]
    assert [(s, r) for s, r, _ in iter_row_groups(paths, "train", resume_after=(0, 1))] == groups[2:]


def test_bad_local_sources(tmp_path):
    with pytest.raises(DataError, match="directory not found.*climbmix"):
        resolve_shards(DataConfig(source=str(tmp_path / "missing")), seed=0)
    (tmp_path / "file.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file"):
        list_parquet(str(tmp_path / "file.parquet"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .parquet files"):
        resolve_shards(DataConfig(source=str(empty)), seed=0)

    one = tmp_path / "one"
    one.mkdir()
    _write_shard(one / "only.parquet", _docs("x"))
    with pytest.raises(DataError, match="need at least 2"):
        resolve_shards(DataConfig(source=str(one)), seed=0)

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for i in range(2):
        _write_shard(wrong / f"s{i}.parquet", _docs("x"), column="content")
    with pytest.raises(DataError, match=r"no 'text' column \(it has: content\)"):
        resolve_shards(DataConfig(source=str(wrong)), seed=0)

    broken = tmp_path / "broken"
    broken.mkdir()
    _write_shard(broken / "a.parquet", _docs("x"))
    (broken / "b.parquet").write_bytes(b"definitely not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        resolve_shards(DataConfig(source=str(broken)), seed=0)

    empty_val = tmp_path / "empty_val"
    empty_val.mkdir()
    _write_shard(empty_val / "a.parquet", _docs("x"))
    _write_shard(empty_val / "b.parquet", pa.array([], type=pa.string()))
    paths = resolve_shards(DataConfig(source=str(empty_val)), seed=0)
    assert len(list(iter_documents(paths, "train"))) == 5
    with pytest.raises(DataError, match="'val' split is empty"):
        list(iter_documents(paths, "val"))
    with pytest.raises(DataError, match="'train' or 'val'"):
        list(iter_documents(paths, "test"))


def test_gcs_source(tmp_path, monkeypatch):
    try:
        from gcp_storage_emulator.server import create_server
    except Exception as e:
        pytest.skip(f"gcp-storage-emulator does not import ({e}); GCS tests need the dev dependency group")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="data-bucket")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    try:
        for i in range(3):
            storage.write_bytes(f"gs://data-bucket/corpus/shard_{i:05d}.parquet",
                                _parquet_bytes(_docs(f"g{i}", 4), row_group_size=3))
        paths = resolve_shards(DataConfig(source="gs://data-bucket/corpus"), seed=0)
        assert paths == [f"gs://data-bucket/corpus/shard_{i:05d}.parquet" for i in range(3)]
        assert list(iter_documents(paths, "train")) == _docs("g0", 4) + _docs("g1", 4)
        assert list(iter_documents(paths, "val")) == _docs("g2", 4)
        with pytest.raises(DataError, match="no such GCS prefix"):
            resolve_shards(DataConfig(source="gs://data-bucket/nothing-here"), seed=0)
    finally:
        server.stop()
