"""The shared training loop: NaN stops with the step named and the last good checkpoint kept;
gradient accumulation equals one big batch; a checkpoint restores onto a different mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flaxchat.checkpoint import CheckpointStore, tree_digest
from flaxchat.config import MeshConfig, ModelConfig, TrainConfig
from flaxchat.mesh import create_sharded, create_sharded_optimizer, make_mesh
from flaxchat.model.gpt import GPT
from flaxchat.optim import build_optimizer
from flaxchat.train.loop import LoopConfig, TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]
T, ROWS, VOCAB = 16, 8, 256


def tiny_model_cfg() -> ModelConfig:
    cfg = ModelConfig(depth=2, aspect_ratio=32, head_dim=32, sequence_len=T, vocab_size=VOCAB, window_pattern="SL")
    cfg.derive()
    return cfg


def build(mesh_cfg: MeshConfig = MeshConfig(data=-1), seed: int = 0, steps: int = 8, tx=None):
    mcfg = tiny_model_cfg()
    mesh = make_mesh(mesh_cfg)
    model = create_sharded(lambda: GPT(mcfg, rngs=nnx.Rngs(seed)), mesh, mesh_cfg.rules)
    tx = tx or build_optimizer(TrainConfig(warmup_steps=1), mcfg, num_steps=steps)
    return mesh, model, create_sharded_optimizer(model, tx, mesh, mesh_cfg.rules)


class Batches:
    """Deterministic random batches; batch k can carry a NaN 'poison' flag."""

    def __init__(self, state=None, rows=ROWS, poison_at=None):
        self.k = (state or {}).get("k", 0)
        self.rows, self.poison_at = rows, poison_at

    def __iter__(self):
        while True:
            rng = np.random.default_rng(self.k)
            tokens = rng.integers(0, VOCAB, (self.rows, T + 1), dtype=np.int32)
            poison = np.full((self.rows,), float(self.k == self.poison_at), np.float32)
            self.k += 1
            yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "poison": poison}

    def state_dict(self):
        return {"k": self.k}


def loss_fn(model, batch):
    loss = model(batch["inputs"], batch["targets"])
    return loss + jnp.where(batch["poison"].sum() > 0, jnp.nan, 0.0)


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    mesh, model, opt = build()
    store = CheckpointStore(str(tmp_path / "ckpt"), keep=5)
    cfg = LoopConfig(num_steps=8, log_every=4, checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match=r"NaN/inf at step 6; last good checkpoint: step 4"):
        train(model=model, optimizer=opt, loss_fn=loss_fn, mesh=mesh, cfg=cfg, store=store,
              make_batches=lambda s: Batches(s, poison_at=5))        # batch index 5 = step 6
    store.wait()
    assert store.steps() == [2, 4]                                   # nothing saved after the NaN
    _, restored, meta = store.restore_latest(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        {"model": nnx.to_pure_dict(nnx.state(model)), "optimizer": nnx.to_pure_dict(nnx.state(opt))}))
    assert meta["loaders"] == [{"k": 4}]                             # one position per process
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))


def test_gradient_accumulation_equals_one_big_batch():
    results = []
    for accum, rows in ((1, 2 * ROWS), (2, ROWS)):
        # plain SGD: Adam/Muon normalise tiny gradients to O(lr) steps, which would turn fp32
        # summation-order noise on a near-zero gradient into a visible difference
        mesh, model, opt = build(steps=3, tx=optax.sgd(0.5))
        # two micro-batches of ROWS rows must equal one batch of 2*ROWS rows holding the same rows
        def batches(state, rows=rows):
            big = Batches(state, rows=2 * ROWS)
            if rows == 2 * ROWS:
                return big

            class Split:
                def __iter__(self):
                    for b in big:
                        yield {k: v[:ROWS] for k, v in b.items()}
                        yield {k: v[ROWS:] for k, v in b.items()}

                def state_dict(self):
                    return big.state_dict()
            return Split()
        train(model=model, optimizer=opt, loss_fn=loss_fn, mesh=mesh, make_batches=batches,
              cfg=LoopConfig(num_steps=3, accum_steps=accum, log_every=1))
        results.append(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


WORKER = r"""
import json, sys
import jax, numpy as np
from flax import nnx
sys.path.insert(0, sys.argv[2])
from test_train_loop import build, Batches, loss_fn
from flaxchat.checkpoint import CheckpointStore, tree_digest
from flaxchat.config import MeshConfig
from flaxchat.train.loop import LoopConfig, train
mesh, model, opt = build(MeshConfig(data=2, fsdp=4, rules="fsdp"), seed=123)   # different init, different mesh
store = CheckpointStore(sys.argv[1])
restored = train(model=model, optimizer=opt, loss_fn=loss_fn, mesh=mesh, make_batches=lambda s: Batches(s),
                 cfg=LoopConfig(num_steps=2, log_every=1), store=store)        # restore only: already at 2
digest = tree_digest({"model": nnx.to_pure_dict(nnx.state(model)), "opt": nnx.to_pure_dict(nnx.state(opt))})
more = train(model=model, optimizer=opt, loss_fn=loss_fn, mesh=mesh, make_batches=lambda s: Batches(s),
             cfg=LoopConfig(num_steps=3, log_every=1), store=store)
print(json.dumps({"resumed_from": restored.resumed_from, "devices": jax.device_count(), "digest": digest,
                  "wte_shards": [list(s.data.shape) for s in model.wte.value.addressable_shards][:2],
                  "continued_to": more.step, "loss": more.history[-1]["loss"]}))
"""


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
    """Train 2 steps on one device and checkpoint; a fresh 8-device process (DP×FSDP mesh, other
    init seed) restores it bit for bit (params AND optimizer state) and keeps training."""
    mesh, model, opt = build(seed=0)
    store = CheckpointStore(str(tmp_path / "ckpt"))
    train(model=model, optimizer=opt, loss_fn=loss_fn, mesh=mesh, make_batches=lambda s: Batches(s),
          cfg=LoopConfig(num_steps=2, log_every=1), store=store)
    store.close()
    want = tree_digest({"model": nnx.to_pure_dict(nnx.state(model)), "opt": nnx.to_pure_dict(nnx.state(opt))})
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path / "ckpt"), str(Path(__file__).parent)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8 and report["resumed_from"] == 2
    assert report["digest"] == want
    assert report["wte_shards"][0] != list(model.wte.value.shape)      # really sharded over there
    assert report["continued_to"] == 3 and np.isfinite(report["loss"])


def test_each_process_resumes_its_own_loader_position(monkeypatch):
    """meta["loaders"][p] is process p's position (gathered to process 0, which alone writes meta);
    checkpoints from before per-process positions carry one `loader`."""
    from flaxchat.train import loop
    meta = {"loaders": [{"p": 0}, {"p": 1}], "step": 4}
    for p in (0, 1):
        monkeypatch.setattr(loop.jax, "process_index", lambda p=p: p)
        assert loop.own_loader_state(meta) == {"p": p}
    monkeypatch.setattr(loop.jax, "process_index", lambda: 2)   # the job grew: position 0, which
    assert loop.own_loader_state(meta) == {"p": 0}               # a PackedLoader refuses by its settings
    assert loop.own_loader_state({"loader": {"k": 3}, "step": 3}) == {"k": 3}
    assert loop.own_loader_state({"step": 3}) is None
