"""ONNX export of the GPT (jax2onnx), run with onnxruntime: a full forward and a KV-cached decode step.

Files (fp32 weights baked in as initializers, opset 23, onnxruntime's CPU provider runs both):
  model.onnx    input_ids (B, T) int32 -> logits (B, T, vocab) fp32. B and T are symbolic.
  decoder.onnx  (kv_cache=True) the cached forward of a chunk, the cache as explicit tensors:
                input_ids (B, T) int32, k_cache / v_cache (L, B, S, Hkv, D) fp32, pos (B,) int32,
                prev_embed (B, C) fp32 -> logits (B, T, vocab), k_cache_out, v_cache_out, pos_out,
                prev_embed_out. B, T and S (cache slots) are symbolic: prefill a prompt with T = its
                length, then step with T = 1. These are the fields of flaxchat.model.kv_cache.KVCache.

How each graph is traced, and why:
- model.onnx is `flaxchat.model.gpt.gpt_forward` itself (fp32 compute, "xla" attention: what jax2onnx
  can convert; the layer scan becomes one ONNX Loop). One workaround: jax2onnx replaces `jnp.arange`
  with its own primitive, whose symbolic length breaks later indexing (`AttributeError: ...
  _DynamicDimSentinel ... rmax`), so while tracing `jnp.arange(n)` is routed to `lax.iota` (same
  values; `_iota_arange`). Without it, only fixed T would export.
- decoder.onnx is `_decode_step`, a re-expression of `flaxchat.model.kv_cache.decode` from the model's own
  block functions. jax2onnx mis-lowers decode's cache write (the scatter
  `k_all.at[layer, rows, positions].set(..)`): onnxruntime fails in a Reshape/Expand even with all
  shapes fixed. Here each layer's cache slice is a scanned input/output, and a slot takes the
  chunk's key by a gather + where (slot s holds chunk token s - pos when that is in [0, T)) instead
  of a scatter. Same values (writes past S are dropped, as in decode); tests/test_export_onnx.py
  checks the result against decode and the full forward.

Limits: fp32 only (a bf16-trained model is exported with fp32 compute, so its logits match our fp32
CPU forward, not the bf16 GPU one); RoPE is computed on the fly, so nothing stops T past
`sequence_len`, but the model was not trained there. Every decode step attends over all S slots
(masked), like kv_cache.decode. Over ~1.8 GB of weights the tensors go to `<name>.onnx.data` next to
the graph (protobuf's 2 GiB limit); onnxruntime finds it when loading from the file's path. Each
graph holds its own copy of the weights (2x on disk with the decoder), and exporting peaks at ~5x
the fp32 weights in RAM (measured: 9.7 GB for a 2.05 GB model, written with external data, rel err
1e-6). `_iota_arange` swaps `jnp.arange` process-wide while tracing: do not trace other JAX code in
another thread meanwhile.

Only jax/numpy are imported here at module level; jax2onnx (export) and onnxruntime (run) are
imported when used, and a missing one raises `OnnxUnavailable` naming the `onnx` extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxchat.model.attention import cached_attention, rope_cos_sin
from flaxchat.model.gpt import (ModelSpec, block_out, block_qkv, embed_tokens, gpt_forward, head_raw, layer_inputs,
                            smear, softcap_logits, value_rows)

MODEL_FILE = "model.onnx"
DECODER_FILE = "decoder.onnx"
OPSET = 23
INSTALL_HINT = "pip install 'flaxchat[onnx]'"
EXTERNAL_DATA_BYTES = 1_800_000_000      # above this, weights go to a .onnx.data sidecar (protobuf: 2 GiB)
DECODER_INPUTS = ("input_ids", "k_cache", "v_cache", "pos", "prev_embed")
DECODER_OUTPUTS = ("logits", "k_cache_out", "v_cache_out", "pos_out", "prev_embed_out")


class OnnxUnavailable(RuntimeError):
    """jax2onnx or onnxruntime is not installed; the message names the extra to install."""


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise OnnxUnavailable(f"ONNX {what} needs {module} ({e.name or e} is missing): {INSTALL_HINT}") from None


def export_spec(spec: ModelSpec) -> ModelSpec:
    """The spec the ONNX graphs are traced with: fp32 compute, plain XLA attention, no remat."""
    return dataclasses.replace(spec, compute_dtype="float32", attention_impl="xla", remat="none")


@contextlib.contextmanager
def _iota_arange():
    """While tracing, `jnp.arange(n[, dtype])` -> `lax.iota` (see the module docstring: jax2onnx's own
    arange loses symbolic lengths). Restores whatever was installed before (jax2onnx's patch)."""
    installed = jnp.arange

    def arange(start, stop=None, step=None, dtype=None, **kw):
        integral = dtype is None or jnp.issubdtype(dtype, jnp.integer)
        if stop is None and step is None and not kw and integral and not isinstance(start, float):
            return jax.lax.broadcasted_iota(dtype or jnp.int32, (start,), 0)
        return installed(start, stop, step, dtype=dtype, **kw)

    jnp.arange = arange
    try:
        yield
    finally:
        jnp.arange = installed


def _decode_step(params: dict, s: ModelSpec, idx: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                 pos: jax.Array, prev_embed: jax.Array) -> tuple[jax.Array, ...]:
    """flaxchat.model.kv_cache.decode with a scatter-free cache write (why: module docstring).
    -> (logits (B,T,vocab), k_cache, v_cache, pos + T, prev_embed)."""
    T, S = idx.shape[1], k_cache.shape[2]
    positions = pos[:, None] + jax.lax.broadcasted_iota(jnp.int32, (1, T), 1)      # (B,T)
    x_emb = embed_tokens(params, s, idx)
    prev = jnp.concatenate([prev_embed[:, None].astype(x_emb.dtype), x_emb[:, :-1]], axis=1)
    x0 = smear(params, s, x_emb, prev, positions > 0)
    cos, sin = rope_cos_sin(positions, s.head_dim)
    src = jax.lax.broadcasted_iota(jnp.int32, (1, S), 1) - pos[:, None]            # (B,S) chunk index per slot
    fresh = ((src >= 0) & (src < T))[:, :, None, None]
    src = jnp.clip(src, 0, T - 1)[:, :, None, None]

    def body(carry, xs):
        x, x_mid = carry
        layer, k_l, v_l = xs
        x, q, k, v = block_qkv(s, layer, x, x0, value_rows(params, layer, idx), cos, sin)
        k_l = jnp.where(fresh, jnp.take_along_axis(k, src, axis=1), k_l)
        v_l = jnp.where(fresh, jnp.take_along_axis(v, src, axis=1), v_l)
        # cached_attention reads kv_cache's layouts (keys (B,Hkv,S,D), values (B,Hkv,D,S)); this graph
        # keeps the token-major (B,S,Hkv,D) slice of its (L,B,S,Hkv,D) inputs
        y = cached_attention(q, jnp.swapaxes(k_l, 1, 2), jnp.transpose(v_l, (0, 2, 3, 1)), positions,
                             layer["window"])
        x = block_out(s, layer, x, y)
        x_mid = jnp.where(layer["layer_id"] == s.backout_layer, x, x_mid)
        return (x, x_mid), (k_l, v_l)

    (x, x_mid), (k_new, v_new) = jax.lax.scan(body, (x0, jnp.zeros_like(x0)),
                                              (layer_inputs(params, s), k_cache, v_cache))
    return softcap_logits(head_raw(params, s, x, x_mid), s), k_new, v_new, pos + T, x_emb[:, -1]


def _io(values) -> list[dict[str, Any]]:
    return [{"name": v.name, "dtype": v.dtype.numpy().name,
             "shape": [d if isinstance(d, int) else str(d) for d in v.shape]} for v in values]


def _convert(fn: Callable, inputs: list, names: Sequence[str], outputs: Sequence[str], path: str) -> dict[str, Any]:
    """Trace `fn` with jax2onnx and save it; returns its manifest entry."""
    jax2onnx = _import("jax2onnx", "export")
    ir = _import("onnx_ir", "export")
    quiet = logging.getLogger("onnx_ir")    # "value type ... not known" for every shape-only temp
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model = jax2onnx.to_onnx(fn, inputs, opset=OPSET, model_name=os.path.basename(path).split(".")[0],
                                 input_names=list(names), output_names=list(outputs), return_mode="ir")
        for v in model.graph.outputs:      # a scanned output's layer dim comes back unnamed: copy the input's
            twin = next((i for i in model.graph.inputs if v.name == f"{i.name}_out"), None)
            if twin is not None:
                v.shape = twin.shape
        weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        external = weight_bytes > EXTERNAL_DATA_BYTES
        data = os.path.basename(path) + ".data"
        ir.save(model, path, external_data=data if external else None)
    finally:
        quiet.setLevel(level)
    files = [os.path.basename(path)] + ([data] if external else [])
    return {"files": files, "inputs": _io(model.graph.inputs), "outputs": _io(model.graph.outputs),
            "weight_bytes": int(weight_bytes)}


def export_onnx(params: dict[str, Any], spec: ModelSpec, path: str, *, kv_cache: bool = True) -> dict[str, Any]:
    """Write `path` (model.onnx) and, with kv_cache, decoder.onnx next to it. params: our nested
    parameter dict (GPT.param_tree(), any float dtype, on one host). Returns the manifest entry:
    files, each graph's input/output names, dtypes and shapes (symbolic dims as names), opset."""
    _import("jax2onnx", "export")
    s = export_spec(spec)
    p = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float32)), params)
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)

    def full(idx):
        with _iota_arange():
            return gpt_forward(p, s, idx)

    graphs = {os.path.basename(path): _convert(full, [jax.ShapeDtypeStruct(("B", "T"), jnp.int32)],
                                               ["input_ids"], ["logits"], path)}
    if kv_cache:
        cache = jax.ShapeDtypeStruct((s.n_layer, "B", "S", s.n_kv_head, s.head_dim), jnp.float32)

        def step(idx, k, v, pos, prev):
            with _iota_arange():
                return _decode_step(p, s, idx, k, v, pos, prev)

        inputs = [jax.ShapeDtypeStruct(("B", "T"), jnp.int32), cache, cache,
                  jax.ShapeDtypeStruct(("B",), jnp.int32), jax.ShapeDtypeStruct(("B", s.n_embd), jnp.float32)]
        graphs[DECODER_FILE] = _convert(step, inputs, DECODER_INPUTS, DECODER_OUTPUTS,
                                        os.path.join(out_dir, DECODER_FILE))
    from importlib.metadata import version
    return {"files": [f for g in graphs.values() for f in g["files"]], "graphs": graphs, "opset": OPSET,
            "dtype": "float32", "exporter": f"jax2onnx {version('jax2onnx')}", "decoder": kv_cache,
            "runtime": "onnxruntime (CPUExecutionProvider)"}


# ------------------------------------------------------------------------------ running with onnxruntime

def _session(path: str):
    ort = _import("onnxruntime", "runtime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3     # jax2onnx leaves unused constants in the Loop body; ORT warns per constant
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


class OnnxRunner:
    """onnxruntime sessions for an export folder (or its model.onnx / decoder.onnx path)."""

    def __init__(self, path: str):
        self.dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        self._model = self._decoder = None

    @property
    def has_decoder(self) -> bool:
        return os.path.exists(os.path.join(self.dir, DECODER_FILE))

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Full forward: ids (B,T) any int dtype -> logits (B,T,vocab) fp32."""
        if self._model is None:
            self._model = _session(os.path.join(self.dir, MODEL_FILE))
        return self._model.run(["logits"], {"input_ids": np.asarray(ids, np.int32)})[0]

    def init_cache(self, batch: int, slots: int) -> dict[str, np.ndarray]:
        """An empty cache for the decoder (the KVCache fields), `slots` tokens per row."""
        if self._decoder is None:
            self._decoder = _session(os.path.join(self.dir, DECODER_FILE))
        shapes = {i.name: i.shape for i in self._decoder.get_inputs()}
        L, _, _, Hkv, D = shapes["k_cache"]
        kv = np.zeros((L, batch, slots, Hkv, D), np.float32)
        return {"k_cache": kv, "v_cache": kv.copy(), "pos": np.zeros((batch,), np.int32),
                "prev_embed": np.zeros((batch, shapes["prev_embed"][1]), np.float32)}

    def decode(self, cache: dict[str, np.ndarray], ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One decoder call: ids (B,T) after what the cache holds -> (logits (B,T,vocab), new cache)."""
        if self._decoder is None:
            self._decoder = _session(os.path.join(self.dir, DECODER_FILE))
        out = self._decoder.run(list(DECODER_OUTPUTS), dict(cache, input_ids=np.asarray(ids, np.int32)))
        return out[0], dict(zip(DECODER_INPUTS[1:], out[1:]))

    def greedy(self, prompt_ids, n: int, use_cache: bool = False) -> np.ndarray:
        """n greedy tokens after prompt_ids ((T,) or (B,T)): full recompute with model.onnx, or one
        prefill + n-1 single-token steps with decoder.onnx. -> (n,) or (B, n) int64."""
        ids = np.asarray(prompt_ids, np.int64)
        rows = ids[None] if ids.ndim == 1 else ids
        new = []
        if use_cache:
            cache = self.init_cache(rows.shape[0], rows.shape[1] + n)
            chunk = rows
            for _ in range(n):
                logits, cache = self.decode(cache, chunk)
                chunk = np.argmax(logits[:, -1], axis=-1)[:, None]
                new.append(chunk[:, 0])
        else:
            for _ in range(n):
                nxt = np.argmax(self.logits(rows)[:, -1], axis=-1)
                new.append(nxt)
                rows = np.concatenate([rows, nxt[:, None]], axis=1)
        out = np.stack(new, axis=1).astype(np.int64)
        return out[0] if ids.ndim == 1 else out


def onnx_greedy(path: str, prompt_ids, n: int, *, use_cache: bool | None = None) -> np.ndarray:
    """Greedy n tokens through onnxruntime. use_cache=None: the decoder iff `path` names decoder.onnx."""
    if use_cache is None:
        use_cache = os.path.basename(path) == DECODER_FILE
    return OnnxRunner(path).greedy(prompt_ids, n, use_cache=use_cache)


def onnx_logits_fn(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """`ids (B,T) -> logits (B,T,vocab)` through model.onnx: the runner flaxchat.export.parity checks."""
    return OnnxRunner(path).logits
