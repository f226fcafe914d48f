"""The GPT, numerically faithful to nanochat's gpt.py, in Flax NNX with its layers under one scan.

Per token (B batch, T time, C=n_embd, H heads, Hkv kv heads, D head_dim, V padded vocab):
  x  = rms_norm(wte[idx])                                   (B,T,C)  embedding, normed
  x += smear_lambda * sigmoid(x[:, :24] @ smear_gate) * x[t-1]        previous token's embedding
  x0 = x
  for layer i (one lax.scan over L stacked layers):
    x  = resid_lambdas[i] * x + x0_lambdas[i] * x0
    h  = rms_norm(x)
    q, k, v = h @ c_q (B,T,H,D), h @ c_k, h @ c_v (B,T,Hkv,D)
    v += 3*sigmoid(h[:, :12] @ ve_gate) * value_embeds[idx]   only on value-embedding layers
    q, k = 1.2*rms_norm(rope(q)), 1.2*rms_norm(rope(k))
    x += attn(q, k, v; causal, window_i) @ c_proj
    x += relu(rms_norm(x) @ c_fc)^2 @ mlp.c_proj              (4C hidden)
    x_mid = x  if i == L//2                                   (backout capture)
  logits = 15*tanh((rms_norm(x - backout_lambda*x_mid) @ lm_head)[:vocab] / 15)     fp32

Dtypes: parameters are fp32 masters; matmuls run in the compute dtype (bf16 on GPU/TPU, fp32 on
CPU) and return it, like nanochat's Linear; the residual stream is stored in the compute dtype;
norms, RoPE, gates, softmax, softcap and the loss are computed in fp32 (the loss by
flaxchat.model.fused_head: lm_head, softcap and cross-entropy chunk by chunk, so the (B,T,V) logits
are never stored and their gradient is made once).

The CPU training path (`ModelSpec.cpu_train_path`, "chunked" attention, picked by "auto" on CPU):
XLA:CPU's autodiff of the same program spends most of the backward copying big operands into
transposed layouts, so there the block matmuls use flaxchat.model.linear's backward, attention is
flaxchat.model.chunked_attention (block-causal, recomputing probabilities) and the layer scan is
unrolled. Values are those of the plain path up to the order of floating-point sums.

Why value embeddings live in one stacked table: nanochat has a vocab x kv_dim table only on layers
i with i % 2 == (L-1) % 2. Stacking them as (n_ve, V, kv_dim) (and ve_gate as (n_ve, 12, Hkv)) keeps
nanochat's exact parameter count: no dummy tables for the other layers. Each scanned layer carries
a `ve_slot` (-1 = none); the body gathers `value_embeds[max(slot, 0), idx]` in one gather (the
table is never sliced or copied) and zeroes the gate when slot < 0, so there is no Python branch per
layer. Layers without a table waste one B*T*kv gather, small next to their c_v matmul. Gathering
all layers' rows before the scan instead was measured on an H100 (d12): same step time, ~L*B*T*kv
more memory, so the gather stays in the body.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta as flax_meta
from flax.core import spmd as flax_spmd

from flaxchat.model.attention import QK_SCALE, apply_rotary, causal_attention, resolve_attention_impl, rms_norm, rope_table
from flaxchat.config import ModelConfig
from flaxchat.model.fused_head import head_loss, head_nll, head_nll_argmax, chunk_len
from flaxchat.model.linear import linear
from flaxchat.mesh import with_logical_constraint   # no-op outside flaxchat.mesh.mesh_context

SMEAR_CHANNELS = 24      # smear gate reads the first 24 channels of the embedding
VE_GATE_CHANNELS = 12    # value-embedding gate reads the first 12 channels of the block input
VE_GATE_SCALE = 3.0      # gate = 3 * sigmoid(.), range (0, 3)
IGNORE_INDEX = -1
RESIDUAL_AXES = ("batch", "seq", None)


class ModelSpecError(ValueError):
    """The model config cannot be built into a GPT; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Static (hashable) shape and policy of a GPT, resolved from ModelConfig. Safe as a jit static arg."""
    vocab_size: int
    padded_vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    sequence_len: int
    windows: tuple[int, ...]          # per layer, tokens (FA3 left window; >= T means full causal)
    softcap: float
    compute_dtype: str                # "float32" | "bfloat16"
    remat: str                        # "none" | "full" | "dots"
    attention_impl: str               # resolved: "xla" | "cudnn" | "splash" | "chunked"

    @classmethod
    def from_config(cls, cfg: ModelConfig, backend: str | None = None) -> "ModelSpec":
        if cfg.vocab_size <= 0:
            raise ModelSpecError("model.vocab_size is 0: resolve the config first (build_config or set vocab_size)")
        if cfg.n_embd == 0:
            cfg = dataclasses.replace(cfg)
            cfg.derive()
        if cfg.n_embd < SMEAR_CHANNELS:
            raise ModelSpecError(f"n_embd={cfg.n_embd} < {SMEAR_CHANNELS}: the smear gate needs a wider model")
        backend = backend or jax.default_backend()
        dtype = cfg.compute_dtype
        if dtype == "auto":
            dtype = "bfloat16" if backend in ("gpu", "cuda", "rocm", "tpu") else "float32"
        impl = resolve_attention_impl(cfg.attention_impl, jnp.dtype(dtype), backend)
        return cls(vocab_size=cfg.vocab_size, padded_vocab_size=cfg.padded_vocab_size, n_layer=cfg.depth,
                   n_embd=cfg.n_embd, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, head_dim=cfg.head_dim,
                   sequence_len=cfg.sequence_len, windows=tuple(cfg.window_sizes()), softcap=float(cfg.softcap),
                   compute_dtype=dtype, remat=cfg.remat, attention_impl=impl)

    @property
    def cpu_train_path(self) -> bool:
        """The CPU-tuned training path ("chunked" attention, which "auto" picks on CPU): matmuls with
        flaxchat.model.linear's backward and the layer scan unrolled. Same values as the plain path;
        exports force "xla" attention and so also get the plain scan."""
        return self.attention_impl == "chunked"

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.compute_dtype)

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def ve_layers(self) -> tuple[int, ...]:
        """Layers with a value embedding: alternating, the last layer always included."""
        return tuple(i for i in range(self.n_layer) if i % 2 == (self.n_layer - 1) % 2)

    @property
    def ve_slots(self) -> tuple[int, ...]:
        """Per layer: index into the stacked value_embeds table, or -1."""
        slot = {layer: j for j, layer in enumerate(self.ve_layers)}
        return tuple(slot.get(i, -1) for i in range(self.n_layer))

    @property
    def distinct_windows(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.windows)))

    @property
    def window_slots(self) -> tuple[int, ...]:
        return tuple(self.distinct_windows.index(w) for w in self.windows)

    @property
    def backout_layer(self) -> int:
        return self.n_layer // 2


def _param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """A Param carrying logical axis names (`out_sharding` metadata, read by nnx.get_partition_spec
    and flaxchat.mesh). Flax's own eager sharding only runs when a mesh and flax logical rules are
    both active; flaxchat.mesh instead places the state with jit out_shardings."""
    eager = flax_meta.get_global_mesh() is not None and bool(flax_spmd.get_logical_axis_rules())
    return nnx.Param(value, out_sharding=axes, eager_sharding=eager)


def init_params(spec: ModelSpec, key: jax.Array) -> dict[str, Any]:
    """nanochat's init_weights as a pure function of a PRNG key -> nested dict of fp32 arrays.

    wte ~ N(0, 0.8); lm_head ~ N(0, 0.001); c_q/c_k/c_v/value_embeds ~ U(-b, b) with
    b = sqrt(3)/sqrt(n_embd) (the std of N(0, 1/sqrt(n_embd))); c_fc ~ U(-0.4b, 0.4b); both output
    projections zero; ve_gate and smear_gate ~ U(0, 0.02); resid_lambdas 1.15 -> 1.05 and
    x0_lambdas 0.20 -> 0.05 linearly over layers; smear_lambda 0; backout_lambda 0.2."""
    s = spec
    L, C, Vp, HD, n_ve = s.n_layer, s.n_embd, s.padded_vocab_size, s.n_head * s.head_dim, len(s.ve_layers)
    b = 3 ** 0.5 * C ** -0.5
    # Two random draws in total (one normal, one uniform) carved into parameters: each separate
    # threefry call costs a second or more of XLA compile on CPU, and the count must not grow.
    normal_shapes = {"wte": ((Vp, C), 0.8), "lm_head": ((C, Vp), 0.001)}
    uniform_shapes = {
        "c_q": ((L, C, HD), -b, b), "c_k": ((L, C, s.kv_dim), -b, b), "c_v": ((L, C, s.kv_dim), -b, b),
        "ve_gate": ((n_ve, VE_GATE_CHANNELS, s.n_kv_head), 0.0, 0.02),
        "c_fc": ((L, C, 4 * C), -0.4 * b, 0.4 * b), "value_embeds": ((n_ve, Vp, s.kv_dim), -b, b),
        "smear_gate": ((SMEAR_CHANNELS, 1), 0.0, 0.02),
    }
    k_normal, k_uniform = jax.random.split(key)
    out: dict[str, jax.Array] = {}
    for k, table, draw in ((k_normal, normal_shapes, jax.random.normal), (k_uniform, uniform_shapes, jax.random.uniform)):
        flat = draw(k, (sum(int(np.prod(v[0])) for v in table.values()),), jnp.float32)
        offset = 0
        for name, (shape, *scale) in table.items():
            n = int(np.prod(shape))
            piece = flat[offset:offset + n].reshape(shape)
            out[name] = scale[0] * piece if len(scale) == 1 else scale[0] + (scale[1] - scale[0]) * piece
            offset += n
    ramp = jnp.arange(L, dtype=jnp.float32) / max(L - 1, 1)
    return {
        "wte": out["wte"],
        "lm_head": out["lm_head"],
        "blocks": {
            "attn": {"c_q": out["c_q"], "c_k": out["c_k"], "c_v": out["c_v"],
                     "c_proj": jnp.zeros((L, HD, C), jnp.float32), "ve_gate": out["ve_gate"]},
            "mlp": {"c_fc": out["c_fc"], "c_proj": jnp.zeros((L, 4 * C, C), jnp.float32)},
        },
        "value_embeds": out["value_embeds"],
        "resid_lambdas": 1.15 - 0.10 * ramp,
        "x0_lambdas": 0.20 - 0.15 * ramp,
        "smear_gate": out["smear_gate"],
        "smear_lambda": jnp.zeros((), jnp.float32),
        "backout_lambda": jnp.full((), 0.2, jnp.float32),
    }


# Logical axis names per parameter: the contract with flaxchat.mesh (sharding rules) and the
# optimizer (which groups parameters by these paths).
PARAM_AXES: dict[str, Any] = {
    "wte": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "blocks": {
        "attn": {"c_q": ("layers", "embed", "heads"), "c_k": ("layers", "embed", "kv"),
                 "c_v": ("layers", "embed", "kv"), "c_proj": ("layers", "heads", "embed"),
                 "ve_gate": ("layers", None, None)},
        "mlp": {"c_fc": ("layers", "embed", "mlp"), "c_proj": ("layers", "mlp", "embed")},
    },
    "value_embeds": ("layers", "vocab", "kv"),
    "resid_lambdas": ("layers",),
    "x0_lambdas": ("layers",),
    "smear_gate": (None, None),
    "smear_lambda": (),
    "backout_lambda": (),
}


class _Group(nnx.Module):
    """A namespace of Params (blocks, blocks.attn, blocks.mlp)."""
    def __init__(self, values: dict[str, Any], axes: dict[str, Any]):
        for name, value in values.items():
            if isinstance(value, dict):
                setattr(self, name, _Group(value, axes[name]))
            else:
                setattr(self, name, _param(value, axes[name]))


class GPT(nnx.Module):
    """nanochat's GPT. `model(idx)` -> logits (B,T,vocab) fp32; `model(idx, targets)` -> loss.

    Parameters (kernels are (in, out); every block parameter is stacked on a leading layer axis):
      wte (V,C)  lm_head (C,V)  value_embeds (n_ve,V,kv)  resid_lambdas (L,)  x0_lambdas (L,)
      smear_gate (24,1)  smear_lambda ()  backout_lambda ()
      blocks.attn.{c_q (L,C,H*D), c_k (L,C,kv), c_v (L,C,kv), c_proj (L,H*D,C), ve_gate (n_ve,12,Hkv)}
      blocks.mlp.{c_fc (L,C,4C), c_proj (L,4C,C)}
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None = None, *, backend: str | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.spec = ModelSpec.from_config(config, backend)
        # one jitted program for the whole init: eager per-op random calls cost ~1 s of compile each
        values = jax.jit(init_params, static_argnums=0)(self.spec, rngs.params())
        for name, value in values.items():
            if isinstance(value, dict):
                setattr(self, name, _Group(value, PARAM_AXES[name]))
            else:
                setattr(self, name, _param(value, PARAM_AXES[name]))

    def param_tree(self) -> dict[str, Any]:
        """Plain nested dict of arrays, same structure as nnx.to_pure_dict(nnx.state(model, nnx.Param))."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, idx: jax.Array, targets: jax.Array | None = None, loss_reduction: str = "mean") -> jax.Array:
        return gpt_forward(self.param_tree(), self.spec, idx, targets, loss_reduction)

    def init_cache(self, batch_size: int, max_len: int):
        from flaxchat.model.kv_cache import init_cache
        return init_cache(self.spec, batch_size, max_len)

    def decode(self, idx: jax.Array, cache):
        """Cached forward of idx (B,T) after the cache's contents -> (logits (B,T,vocab), new cache)."""
        from flaxchat.model.kv_cache import decode
        return decode(self.param_tree(), self.spec, cache, idx)


# ----------------------------------------------------------------------------------------------
# Pure functions: params is the nested dict from GPT.param_tree(); spec is static under jit.

def _mm(x: jax.Array, w: jax.Array, dtype: jnp.dtype, out: jnp.dtype | None = None) -> jax.Array:
    """x @ w with both operands in the compute dtype (fp32 accumulation), like nanochat's Linear.
    The result is in the compute dtype unless `out` asks otherwise (only the tiny gate matmuls do):
    bf16 outputs halve the activations saved for the backward pass."""
    return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=out or dtype)


def _dense(s: ModelSpec, x: jax.Array, w: jax.Array) -> jax.Array:
    """A block/head matmul: `_mm`, through flaxchat.model.linear's backward on the CPU path."""
    if s.cpu_train_path:
        return linear(x.astype(s.dtype), w.astype(s.dtype))
    return _mm(x, w, s.dtype)


def embed_tokens(params: dict, s: ModelSpec, idx: jax.Array) -> jax.Array:
    """Normed token embedding (B,T,C) in the compute dtype; nanochat stores wte in that dtype."""
    return rms_norm(params["wte"][idx].astype(s.dtype))


def smear(params: dict, s: ModelSpec, x: jax.Array, prev: jax.Array, has_prev: jax.Array) -> jax.Array:
    """x[t] += smear_lambda * sigmoid(x[t, :24] @ smear_gate) * prev[t]. prev (B,T,C) is each
    position's previous normed (pre-smear) embedding; has_prev (B|1, T) says whether it exists."""
    gate = params["smear_lambda"] * jax.nn.sigmoid(_mm(x[..., :SMEAR_CHANNELS], params["smear_gate"], s.dtype, jnp.float32))
    gate = jnp.where(has_prev[..., None], gate, 0.0)
    return (x.astype(jnp.float32) + gate * prev.astype(jnp.float32)).astype(s.dtype)


def block_qkv(s: ModelSpec, layer: dict, x: jax.Array, x0: jax.Array, ve_row: jax.Array,
              cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, ...]:
    """Lambda mix + pre-attention half of a block. Returns (x mixed, q, k, v) in compute dtype."""
    B, T, _ = x.shape
    p = layer["p"]
    x = (layer["resid_lambda"] * x.astype(jnp.float32) + layer["x0_lambda"] * x0.astype(jnp.float32)).astype(s.dtype)
    h = rms_norm(x)
    q = _dense(s, h, p["attn"]["c_q"]).reshape(B, T, s.n_head, s.head_dim)
    k = _dense(s, h, p["attn"]["c_k"]).reshape(B, T, s.n_kv_head, s.head_dim)
    v = _dense(s, h, p["attn"]["c_v"]).reshape(B, T, s.n_kv_head, s.head_dim)
    gate = VE_GATE_SCALE * jax.nn.sigmoid(_mm(h[..., :VE_GATE_CHANNELS], layer["ve_gate"], s.dtype, jnp.float32))
    gate = jnp.where(layer["ve_slot"] >= 0, gate, 0.0)                    # (B,T,Hkv)
    ve = ve_row.astype(s.dtype).astype(jnp.float32).reshape(B, T, s.n_kv_head, s.head_dim)
    v = (v.astype(jnp.float32) + gate[..., None] * ve).astype(s.dtype)
    q = (QK_SCALE * rms_norm(apply_rotary(q, cos, sin))).astype(s.dtype)
    k = (QK_SCALE * rms_norm(apply_rotary(k, cos, sin))).astype(s.dtype)
    return x, q, k, v


def block_out(s: ModelSpec, layer: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Attention output projection + MLP half of a block. y (B,T,H,D) -> new residual (B,T,C)."""
    B, T, _ = x.shape
    p = layer["p"]
    f32 = jnp.float32
    x = (x.astype(f32) + _dense(s, y.reshape(B, T, -1), p["attn"]["c_proj"]).astype(f32)).astype(s.dtype)
    hid = jnp.square(jax.nn.relu(_dense(s, rms_norm(x), p["mlp"]["c_fc"]).astype(f32))).astype(s.dtype)
    return (x.astype(f32) + _dense(s, hid, p["mlp"]["c_proj"]).astype(f32)).astype(s.dtype)


def layer_inputs(params: dict, s: ModelSpec) -> dict:
    """Everything scanned over layers: stacked block weights, per-layer scalars and ve gate
    (L,12,Hkv) (slot 0's for layers without a value embedding; their gate is zeroed)."""
    blocks = params["blocks"]
    return {
        "p": {"attn": {k: v for k, v in blocks["attn"].items() if k != "ve_gate"}, "mlp": blocks["mlp"]},
        "ve_gate": blocks["attn"]["ve_gate"][jnp.maximum(jnp.asarray(s.ve_slots, jnp.int32), 0)],
        "resid_lambda": params["resid_lambdas"], "x0_lambda": params["x0_lambdas"],
        "layer_id": jnp.arange(s.n_layer, dtype=jnp.int32),
        "ve_slot": jnp.asarray(s.ve_slots, jnp.int32),
        "window_slot": jnp.asarray(s.window_slots, jnp.int32),
        "window": jnp.asarray(s.windows, jnp.int32),
    }


def value_rows(params: dict, layer: dict, idx: jax.Array) -> jax.Array:
    """This layer's value-embedding rows (B,T,kv) fp32: one gather from the stacked table."""
    return params["value_embeds"][jnp.maximum(layer["ve_slot"], 0), idx]


def remat_wrap(body, s: ModelSpec):
    if s.remat == "none":
        return body
    policy = {"full": jax.checkpoint_policies.nothing_saveable,
              "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[s.remat]
    return jax.checkpoint(body, policy=policy, prevent_cse=False)


def head_hidden(params: dict, s: ModelSpec, x: jax.Array, x_mid: jax.Array) -> jax.Array:
    """Backout and final norm -> the lm_head's input (B,T,C) in the compute dtype."""
    x = (x.astype(jnp.float32) - params["backout_lambda"] * x_mid.astype(jnp.float32)).astype(s.dtype)
    return rms_norm(x)


def head_raw(params: dict, s: ModelSpec, x: jax.Array, x_mid: jax.Array) -> jax.Array:
    """Backout, final norm, lm_head -> raw logits (B,T,padded_vocab) in the compute dtype (as
    nanochat's bf16 Linear). Softcap and vocab slicing happen in `softcap_logits`."""
    return _mm(head_hidden(params, s, x, x_mid), params["lm_head"], s.dtype)


def softcap_logits(raw: jax.Array, s: ModelSpec) -> jax.Array:
    """softcap * tanh(logits / softcap) in fp32, padded columns sliced off -> (B,T,vocab)."""
    return s.softcap * jnp.tanh(raw[..., :s.vocab_size].astype(jnp.float32) / s.softcap)


def logits_at_positions(params: dict, s: ModelSpec, x: jax.Array, x_mid: jax.Array, at: jax.Array) -> jax.Array:
    """The softcapped logits (B,vocab) of position at[b] of each row b of the final residual x (B,T,C)
    (x_mid: the backout capture): the head runs on B rows instead of B*T, for callers that read
    one position per row (a prefill's last prompt token, a letter-choice eval)."""
    rows = jnp.arange(x.shape[0])
    return softcap_logits(head_raw(params, s, x[rows, at][:, None], x_mid[rows, at][:, None]), s)[:, 0]


# Rows per chunk of the fused head. CPU, measured at the runcpu config (in-process A/B of fwd+bwd):
# 2048 rows vs 1024 is 0.965x time at B=4 (one chunk: no scan, no (C,V) d(W) accumulation) and 1.0x
# at B=8; 4096 (one chunk at B=8) is 1.05x, its logits' passes no longer near the caches.
# Accelerators want big matmuls, and 8192 x 32768 chunks still bound the logits' memory.
HEAD_CHUNK_ROWS = {"cpu": 2048}
HEAD_CHUNK_ROWS_DEFAULT = 8192


def head_chunk_len(B: int, T: int) -> int:
    """Sequence positions per chunk of the fused head for a (B,T) batch on this backend."""
    return chunk_len(B, T, HEAD_CHUNK_ROWS.get(jax.default_backend(), HEAD_CHUNK_ROWS_DEFAULT))


def head_loss_of(params: dict, s: ModelSpec, h: jax.Array, targets: jax.Array, reduction: str) -> jax.Array:
    """The loss of the softcapped logits of h (B,T,C) through flaxchat.model.fused_head (the (B,T,V)
    logits are never stored): 'mean' over non-ignored tokens (0 when none, where torch gives NaN),
    'sum', or 'none' (B,T) per-token losses, 0 where targets == -1."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"loss_reduction={reduction!r} must be 'mean', 'sum' or 'none'")
    B, T = targets.shape
    chunk = head_chunk_len(B, T)
    w = params["lm_head"].astype(s.dtype)
    h = with_logical_constraint(h, RESIDUAL_AXES)
    if reduction == "none":
        return head_nll(h, w, targets, s.softcap, s.vocab_size, chunk)
    valid = (targets != IGNORE_INDEX).astype(jnp.float32)
    weights = valid / jnp.maximum(valid.sum(), 1.0) if reduction == "mean" else valid
    return head_loss(h, w, targets, weights, s.softcap, s.vocab_size, chunk)


def gpt_forward(params: dict, s: ModelSpec, idx: jax.Array, targets: jax.Array | None = None,
                loss_reduction: str = "mean", logits_at: jax.Array | None = None) -> jax.Array:
    """Full-sequence forward. idx (B,T) int32 -> logits (B,T,vocab) fp32, or the loss if targets given.
    logits_at (B,) int32: only position logits_at[b] of row b gets logits, -> (B,vocab) (what a
    letter-choice eval reads; the head then runs on B rows instead of B*T)."""
    x, x_mid = gpt_trunk(params, s, idx)
    if targets is not None:
        return head_loss_of(params, s, head_hidden(params, s, x, x_mid), targets, loss_reduction)
    if logits_at is not None:
        return logits_at_positions(params, s, x, x_mid, logits_at)
    raw = with_logical_constraint(head_raw(params, s, x, x_mid), ("batch", "seq", "vocab"))
    return softcap_logits(raw, s)


def gpt_nll_argmax(params: dict, s: ModelSpec, idx: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Forward only (CORE eval): per-token nll (B,T) fp32 of targets (0 where -1) and each position's
    greedy prediction (B,T) int32, through the chunked head (the (B,T,V) logits are never stored)."""
    x, x_mid = gpt_trunk(params, s, idx)
    h = with_logical_constraint(head_hidden(params, s, x, x_mid), RESIDUAL_AXES)
    return head_nll_argmax(h, params["lm_head"].astype(s.dtype), targets, s.softcap, s.vocab_size,
                           head_chunk_len(*idx.shape))


def gpt_trunk(params: dict, s: ModelSpec, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Everything before the head: idx (B,T) int32 -> (final residual x, backout capture x_mid), both
    (B,T,C) in the compute dtype (`head_hidden` turns them into the head's input)."""
    B, T = idx.shape
    pos = jnp.arange(T, dtype=jnp.int32)
    x = embed_tokens(params, s, idx)
    prev = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
    x0 = x = smear(params, s, x, prev, (pos > 0)[None])
    cos, sin = rope_table(T, s.head_dim)                                   # (T,1,D/2)

    def body(carry, layer):
        x, x_mid = carry
        x, q, k, v = block_qkv(s, layer, x, x0, value_rows(params, layer, idx), cos, sin)
        y = causal_attention(q, k, v, layer["window_slot"], s.distinct_windows, s.attention_impl)
        x = block_out(s, layer, x, y)
        x_mid = jnp.where(layer["layer_id"] == s.backout_layer, x, x_mid)
        return (x, x_mid), None

    def constrained(carry, layer):
        # pin the residual stream to batch sharding so GSPMD never shards the scan carry on embed
        carry = jax.tree.map(lambda t: with_logical_constraint(t, RESIDUAL_AXES), carry)
        return body(carry, layer)

    # Unrolled on the CPU path: a rolled scan stacks every layer's saved activations into buffers it
    # zero-fills and slices each step; the jaxpr (one scan) does not grow with depth either way.
    unroll = s.n_layer if s.cpu_train_path else 1
    (x, x_mid), _ = jax.lax.scan(remat_wrap(constrained, s), (x, jnp.zeros_like(x)), layer_inputs(params, s),
                                 unroll=unroll)
    return x, x_mid
