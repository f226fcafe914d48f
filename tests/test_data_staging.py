"""Content-addressed data staging (flaxchat/data/staging.py) on the GCS emulator and locally, the
loader reading staged gs:// shards, and the tokenizer stage naming only staged URIs."""

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flaxchat import storage
from flaxchat.data import DataError
from flaxchat.data import staging
from flaxchat.data.loader import PackedLoader

from gcs_emulator import gcs_bucket  # noqa: F401  (fixture)


def _shards(tmp_path, n=3, docs=40):
    out = tmp_path / "cache"
    out.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        texts = [f"document {i}-{j} " + "word " * (j % 7 + 1) for j in range(docs)]
        path = out / f"shard_{i:05d}.parquet"
        pq.write_table(pa.table({"text": texts}), path, row_group_size=10)
        paths.append(str(path))
    return paths


def _encode(texts):
    return [[1 + (ord(c) % 50) for c in t] for t in texts]


def test_staged_shards_are_content_addressed_checked_and_read_by_the_loader(gcs_bucket, tmp_path):
    shards = _shards(tmp_path)
    root = storage.join(gcs_bucket, "art-a")
    entries = staging.stage_shards(shards, root)
    for path, e in zip(shards, entries):
        sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
        assert e["uri"] == f"{root}/data/sha256/{sha}.parquet" and e["sha256"] == sha and e["uploaded"]
        assert e["name"] == os.path.basename(path) and e["bytes"] == os.path.getsize(path)
        assert storage.read_bytes(e["uri"]) == open(path, "rb").read()
    staging.verify_staged(entries)

    # the loader reads the staged URIs (pyarrow through storage's gcsfs) to the very same batches
    def batches(paths):
        loader = PackedLoader(paths, _encode, bos_id=0, batch_size=2, seq_len=16, seed=3)
        return [next(loader) for _ in range(6)]
    for (xl, yl), (xr, yr) in zip(batches(shards), batches([e["uri"] for e in entries])):
        np.testing.assert_array_equal(xl, xr)
        np.testing.assert_array_equal(yl, yr)


def test_a_second_run_reuses_staged_shards_without_uploading_or_rehashing(gcs_bucket, tmp_path, monkeypatch):
    shards = _shards(tmp_path)
    root = storage.join(gcs_bucket, "art-b")
    first = staging.stage_shards(shards, root)
    assert all(e["uploaded"] for e in first)
    with monkeypatch.context() as mp:
        mp.setattr(storage, "put_file", lambda *a, **k: pytest.fail("uploaded a shard that is staged"))
        mp.setattr(staging, "_hash_file", lambda p: pytest.fail(f"re-hashed {p}, whose hash is cached"))
        again = staging.stage_shards(shards, root)
    assert [e["uri"] for e in again] == [e["uri"] for e in first] and not any(e["uploaded"] for e in again)

    # a changed cache file is a new content address (hashed again, uploaded); the old object stays
    with open(shards[0], "ab") as fh:
        fh.write(b"\0")
    changed = staging.stage_shards(shards, root)
    assert changed[0]["uploaded"] and changed[0]["uri"] != first[0]["uri"]
    assert storage.exists(first[0]["uri"]) and not any(e["uploaded"] for e in changed[1:])


def test_a_corrupted_upload_is_refused_and_removed(gcs_bucket, tmp_path, monkeypatch):
    shards = _shards(tmp_path, n=2)
    root = storage.join(gcs_bucket, "art-c")
    real_put = storage.put_file

    def flipping_put(local, uri, link=False):
        bad = tmp_path / "bad.bin"
        data = bytearray(open(local, "rb").read())
        data[100] ^= 0xFF                    # same size: only the server's md5 can tell
        bad.write_bytes(bytes(data))
        real_put(bad, uri, link=link)
    monkeypatch.setattr(storage, "put_file", flipping_put)
    with pytest.raises(DataError, match="stored copy does not match the local file") as err:
        staging.stage_shards(shards, root)
    assert len(str(err.value).splitlines()) == 1
    assert storage.find(storage.join(root, "data", "sha256")) == []


def test_local_root_stages_with_hard_links_and_remote_shards_stay_in_place(tmp_path):
    shards = _shards(tmp_path, n=2)
    entries = staging.stage_shards(shards + ["memory://elsewhere/val.parquet"], str(tmp_path / "art"))
    assert os.stat(entries[0]["uri"]).st_ino == os.stat(shards[0]).st_ino        # linked, not copied
    assert entries[0]["uri"].startswith(str(tmp_path / "art" / "data" / "sha256"))
    assert entries[2] == {"uri": "memory://elsewhere/val.parquet", "name": "val.parquet"}
    # the staged copies given back as the source are recognised as staged
    again = staging.stage_shards([e["uri"] for e in entries[:2]], str(tmp_path / "art"))
    assert [e["uri"] for e in again] == [e["uri"] for e in entries[:2]] and not any(e["uploaded"] for e in again)
    with pytest.raises(DataError, match="not found while staging"):
        staging.stage_shards([str(tmp_path / "gone.parquet")], str(tmp_path / "art"))


def test_tokenizer_stage_names_only_staged_uris_with_a_gcs_artifact_root(gcs_bucket, tmp_path):
    from flaxchat.config import build_config
    from flaxchat.manifest import read_manifest
    from steps import tokenizer

    small = {"tokenizer": {"vocab_size": 300, "max_chars": 100_000, "eval_chars": 5_000},
             "data": {"demo_documents": 200, "demo_val_documents": 20, "cache_dir": str(tmp_path / "cache")}}
    root = storage.join(gcs_bucket, "art-d")
    cfg = build_config("demo", overrides=small, artifact_root=root)
    manifest = tokenizer.run(cfg, {}, storage.join(root, "run1", "tokenizer"))
    data = manifest["data"]
    assert data["shards"] and all(s.startswith(f"{root}/data/sha256/") for s in data["shards"])
    assert [e["uri"] for e in data["staged"]] == data["shards"] and all(e["uploaded"] for e in data["staged"])
    assert read_manifest(manifest["uri"])["data"] == json.loads(json.dumps(data))
    # a second run (another run id) re-uses every staged object
    again = tokenizer.run(cfg, {}, storage.join(root, "run2", "tokenizer"))
    assert again["data"]["shards"] == data["shards"] and not any(e["uploaded"] for e in again["data"]["staged"])

    # a local artifact root keeps today's manifest: the cache's own paths
    local = tokenizer.run(build_config("demo", overrides=small, artifact_root=str(tmp_path / "art")), {},
                          str(tmp_path / "tok"))
    assert all(s.startswith(str(tmp_path / "cache")) for s in local["data"]["shards"])
    assert "staged" not in local["data"] and not (tmp_path / "art").exists()
