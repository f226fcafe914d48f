"""Checkpoint store: async save + retention, verified restore, fallback on corruption."""

import json
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxchat import storage
from flaxchat.checkpoint import CHECKSUMS, CheckpointStore


def _state(v: float):
    return {"params": {"w": jnp.full((4, 3), v, jnp.float32), "b": jnp.arange(3, dtype=jnp.float32) + v},
            "step": jnp.asarray(int(v), jnp.int32)}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_save_restore_round_trip_with_meta_and_retention(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"), keep=2)
    for step in (10, 20, 30):
        store.save(step, _state(step), {"loader": {"row_group": step // 10}})
    store.wait()
    assert store.steps() == [20, 30]                       # retention keeps the newest 2
    assert all(store.verify(s) for s in store.steps())
    step, state, meta = store.restore_latest(_abstract(_state(0)))
    assert step == 30 and meta == {"loader": {"row_group": 3}, "step": 30}
    np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 30.0))
    store.close()


def test_a_tampered_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"), keep=3)
    store.save(1, _state(1), {})
    store.save(2, _state(2), {})
    store.wait()
    # overwrite one data file of step 2 in place, keeping its size (orbax alone would not notice)
    root = tmp_path / "ckpt" / "2"
    victims = [p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS and p.stat().st_size > 8]
    target = max(victims, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    assert store.verify(2) is False
    with pytest.warns(UserWarning, match="fails its checksums"):
        step, state, _ = store.restore_latest(_abstract(_state(0)))
    assert step == 1
    np.testing.assert_array_equal(state["params"]["b"], np.arange(3) + 1.0)


def test_missing_checksums_restore_unverified_and_empty_dir_gives_none(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    assert store.restore_latest(_abstract(_state(0))) is None
    store.save(5, _state(5), {})
    store.wait()
    os.remove(tmp_path / "ckpt" / "5" / CHECKSUMS)
    with pytest.warns(UserWarning, match="no checksum file"):
        step, _, _ = store.restore_latest(_abstract(_state(0)))
    assert step == 5


def test_checksum_file_lists_every_file(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    store.save(3, _state(3), {"a": 1})
    store.wait()
    sums = json.loads((tmp_path / "ckpt" / "3" / CHECKSUMS).read_text())
    on_disk = {str(p.relative_to(tmp_path / "ckpt" / "3")) for p in (tmp_path / "ckpt" / "3").rglob("*")
               if p.is_file() and p.name != CHECKSUMS}
    assert set(sums) == on_disk and len(sums) > 2


class _GatedHashing:
    """storage.sha256_file that records its thread and blocks until released."""

    def __init__(self, real):
        self.real, self.threads = real, set()
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, path):
        self.threads.add(threading.current_thread().name)
        self.started.set()
        assert self.release.wait(60), "hashing was never released"
        return self.real(path)


def test_checksums_are_computed_off_the_training_thread(tmp_path, monkeypatch):
    gate = _GatedHashing(storage.sha256_file)
    monkeypatch.setattr(storage, "sha256_file", gate)
    store = CheckpointStore(str(tmp_path / "ckpt"), keep=3)
    store.save(1, _state(1), {})
    assert gate.started.wait(60)                  # step 1 landed and is being hashed ...
    store.save(2, _state(2), {})                  # ... while the training thread saves on
    assert not (tmp_path / "ckpt" / "1" / CHECKSUMS).exists()
    assert threading.current_thread().name not in gate.threads
    gate.release.set()
    store.wait()                                  # joins the checksum thread
    assert gate.threads and all(n.startswith("flaxchat-checksums") for n in gate.threads), gate.threads
    assert store.verify(1) is True and store.verify(2) is True
    store.close()


def test_retention_never_deletes_a_step_while_it_is_hashed(tmp_path, monkeypatch):
    """keep=1: saving step n+1 deletes step n once it lands, so save() first lets step n's checksum
    finish; a checksum file must never be written into (and so resurrect) a deleted step."""
    real = storage.sha256_file
    monkeypatch.setattr(storage, "sha256_file", lambda path: (time.sleep(0.01), real(path))[1])
    store = CheckpointStore(str(tmp_path / "ckpt"), keep=1)
    for step in range(1, 5):
        store.save(step, _state(step), {})
    store.wait()
    assert store.steps() == [4] and store.verify(4) is True
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith(".")) == ["4"]
    store.close()


def test_synchronous_checksums_still_work(tmp_path, monkeypatch):
    """The old way (checksums on the calling thread), kept for bench/checkpoint_bench.py."""
    threads = set()
    real = storage.sha256_file
    monkeypatch.setattr(storage, "sha256_file", lambda path: (threads.add(threading.current_thread().name),
                                                               real(path))[1])
    store = CheckpointStore(str(tmp_path / "ckpt"), keep=2, background_checksums=False)
    store.save(1, _state(1), {"a": 1})
    store.save(2, _state(2), {"a": 2})
    store.wait()
    assert threads == {threading.current_thread().name}
    assert store.verify(1) is True and store.verify(2) is True
    step, _, meta = store.restore_latest(_abstract(_state(0)))
    assert step == 2 and meta == {"a": 2, "step": 2}
    store.close()
