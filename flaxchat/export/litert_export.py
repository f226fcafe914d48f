"""LiteRT (TFLite) export of the GPT: one fixed-shape fp32 forward, tokens (1, T) -> logits (1, T, vocab).

The path (the one Google documents for JAX -> LiteRT today, and the one that converts with
jax 0.10.2 + tensorflow-cpu 2.21.0 in one environment):

  gpt_forward (fp32, "xla" attention, the model's own lax.scan over layers)
    -> jax.experimental.jax2tf.convert (native serialization: one XlaCallModule op holding StableHLO;
       jax 0.10 has no other mode)
    -> tf.function with a fixed input signature, parameters held as tf.Variables (so the weights are
       not baked into the serialized StableHLO, which would hit protobuf's 2 GiB limit on big models)
    -> tf.lite.TFLiteConverter.from_concrete_functions, TFLite builtin ops only (the converter
       legalizes the StableHLO to TFLite ops; the layer scan becomes one WHILE op, no Flex/TF ops,
       so the plain `ai-edge-litert` runtime runs it)

Running it needs only `ai-edge-litert` (`ai_edge_litert.interpreter.Interpreter`); exporting needs
tensorflow too. Both are the `litert` extra; when one is missing, `LiteRTUnavailable` says so in
one line and the export step skips only this format.

Generation with the exported model is a full recompute over the fixed window: the prompt is
right-padded to T and the logits at the last real position are read. With causal attention the
logits at position t never depend on what follows t, so the padding value does not matter.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

MODEL_FILE = "model.tflite"
INPUT_NAME = "tokens"
OUTPUT_NAME = "logits"
SIGNATURE_KEY = "serving_default"
INSTALL_HINT = "pip install 'flaxchat[litert]'"
CONVERTER_PATH = ("jax2tf.convert (native StableHLO serialization) -> tf.function (fixed shape, params as "
                  "tf.Variables) -> tf.lite.TFLiteConverter.from_concrete_functions (TFLITE_BUILTINS)")


class LiteRTUnavailable(RuntimeError):
    """tensorflow or ai-edge-litert is not installed; the message names the extra to install."""


def _import_tf():
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError as e:
        raise LiteRTUnavailable(f"LiteRT export needs tensorflow ({e.name or e} is missing): {INSTALL_HINT}") from None
    return tf, jax2tf


def _import_interpreter():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:
        raise LiteRTUnavailable(f"LiteRT runtime needs ai-edge-litert ({e.name or e} is missing): {INSTALL_HINT}") from None
    return Interpreter


def _model_file(path: str | os.PathLike) -> Path:
    """A directory -> its model.tflite; a path ending in .tflite -> itself."""
    p = Path(path)
    return p if p.suffix == ".tflite" else p / MODEL_FILE


def export_spec(spec):
    """The spec the export runs: fp32 compute, portable "xla" attention, no remat (a bf16/cuDNN
    training spec would not convert, and parity is defined in fp32)."""
    return dataclasses.replace(spec, compute_dtype="float32", attention_impl="xla", remat="none")


def export_litert(params: dict, spec, path: str | os.PathLike, *, seq_len: int) -> dict[str, Any]:
    """Write `path`/model.tflite (or `path` itself when it ends in .tflite): the fp32 forward of
    batch 1 and `seq_len` tokens. Returns a description for the manifest. Raises LiteRTUnavailable
    when tensorflow is missing."""
    if int(seq_len) < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    T = int(seq_len)
    tf, jax2tf = _import_tf()
    import jax

    from flaxchat.model.gpt import gpt_forward

    s = export_spec(spec)
    np_params = jax.tree.map(lambda x: np.asarray(x, dtype=np.float32), params)

    module = tf.Module()
    module.params = tf.nest.map_structure(lambda x: tf.Variable(x, trainable=False), np_params)
    fwd = jax2tf.convert(lambda p, idx: gpt_forward(p, s, idx), with_gradient=False,
                         native_serialization_platforms=("cpu",))

    @tf.function(input_signature=[tf.TensorSpec((1, T), tf.int32, name=INPUT_NAME)], autograph=False)
    def serve(tokens):
        return {OUTPUT_NAME: fwd(module.params, tokens)}

    module.serve = serve
    converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if sum(a.nbytes for a in jax.tree.leaves(np_params)) > (1 << 31) - (1 << 27):
        converter._experimental_use_buffer_offset = True   # flatbuffers stop at 2 GiB; weights go after it
    flat = converter.convert()

    out = _model_file(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(flat)
    os.replace(tmp, out)
    return {
        "format": "litert",
        "files": [out.name],
        "bytes": len(flat),
        "signature": SIGNATURE_KEY,
        "inputs": [{"name": INPUT_NAME, "shape": [1, T], "dtype": "int32"}],
        "outputs": [{"name": OUTPUT_NAME, "shape": [1, T, s.vocab_size], "dtype": "float32"}],
        "seq_len": T,
        "vocab_size": s.vocab_size,
        "compute_dtype": "float32",
        "converter": CONVERTER_PATH,
        "versions": {"jax": jax.__version__, "tensorflow": tf.__version__},
        "generation": "full recompute over the fixed window: right-pad to seq_len, read the logits at the last real position",
    }


class LiteRTModel:
    """A loaded model.tflite: `logits(ids)` -> (len(ids), vocab) fp32; `greedy(prompt, n)` -> n ids."""

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        Interpreter = _import_interpreter()
        self.path = _model_file(path)
        self.interpreter = Interpreter(model_path=str(self.path), num_threads=num_threads)
        self.runner = self.interpreter.get_signature_runner(SIGNATURE_KEY)
        shape = self.runner.get_input_details()[INPUT_NAME]["shape"]
        self.seq_len = int(shape[1])

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits of the first len(ids) positions (<= seq_len): (len(ids), vocab) fp32."""
        n = len(ids)
        if not 1 <= n <= self.seq_len:
            raise ValueError(f"{n} tokens do not fit the exported window of {self.seq_len} (export with a larger seq_len)")
        window = np.zeros((1, self.seq_len), np.int32)
        window[0, :n] = np.asarray(ids, np.int32)
        return self.runner(**{INPUT_NAME: window})[OUTPUT_NAME][0, :n]

    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        """n greedy tokens after the prompt, each by a full recompute of the window."""
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("greedy generation needs a non-empty prompt")
        if len(ids) + n - 1 > self.seq_len:
            raise ValueError(f"prompt {len(ids)} + {n} new tokens exceed the exported window of {self.seq_len}")
        out: list[int] = []
        for _ in range(n):
            nxt = int(np.argmax(self.logits(ids)[-1]))
            out.append(nxt)
            ids.append(nxt)
        return out


def litert_greedy(path: str | os.PathLike, prompt_ids: Sequence[int], n: int) -> list[int]:
    """Load `path` (a directory holding model.tflite, or the file) and return n greedy token ids."""
    return LiteRTModel(path).greedy(prompt_ids, n)
