"""Export stage: the last trained model, written in the formats people serve and study models in.

Takes the newest trained stage present (grpo, then sft, then pretrain; or `export.source`) and
writes each format in `export.formats` into its own folder under `output_uri`:
  hf/        model.safetensors (nanochat's names), config.json + modeling_flaxchat.py (the whole
             architecture, trust_remote_code), tokenizer.json + chat template, generation_config.json
  nanochat/  a nanochat base dir: tokenizer/ and <stage>_checkpoints/d<depth>/model_<step>.pt + meta
  onnx/      model.onnx (full forward) and decoder.onnx (one token with an explicit KV cache)
  litert/    model.tflite (fixed window)
Each written format is loaded back with its own runtime and compared with the JAX model (logits to
`export.parity_rtol`, greedy ids over `export.parity_new_tokens`); a mismatch fails the stage. A
runtime that is not installed is skipped with a one-line reason in the manifest; a converter that is
not installed skips only its format. Everything is written to a local staging folder first and
published whole, manifest last, so a failed export leaves nothing half-written at `output_uri`.

    python -m steps.export --model artifacts/<flow>/<run>/grpo --out /tmp/export --set export.formats=hf,onnx
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from flaxchat import storage
from flaxchat.chat.loading import load_chat_model
from flaxchat.config import PipelineConfig
from flaxchat.export.formats import WRITERS, ExportModel, FormatUnavailable, check_format
from flaxchat.manifest import MANIFEST_NAME, ManifestError, build_manifest, read_manifest

STAGE = "export"
TRAINED = ("grpo", "sft", "pretrain")        # newest first


class ExportError(ValueError):
    """The export cannot be made or does not match the model; the message says why and what to do."""


def pick_source(config: PipelineConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    wanted = TRAINED if config.export.source == "auto" else (config.export.source,)
    for name in wanted:
        if inputs.get(name):
            return inputs[name]
    raise ManifestError(f"the export stage needs a trained model ({' or '.join(wanted)}): pass it as a flow "
                        f"artifact, --input STAGE=URI or --model URI")


def refuse_other_export(output_uri: str, source: dict[str, Any]) -> bool:
    """True if `output_uri` already holds this same export (re-export replaces it); an error if it holds
    another model's, or anything that is not an export, so nothing of the user's is overwritten."""
    if not storage.exists(output_uri):
        return False
    if not storage.exists(storage.join(output_uri, MANIFEST_NAME)):
        if not storage.is_gcs(output_uri) and os.path.isdir(output_uri) and not os.listdir(output_uri):
            return True
        raise ExportError(f"{output_uri} already exists and is not an export; choose another --out or remove it")
    old = read_manifest(output_uri)
    same = old.get("stage") == STAGE and (old.get("source") or {}).get("params_sha256") == \
        (source.get("metrics") or {}).get("params_sha256")
    if not same:
        what = (old.get("source") or {}).get("uri", old.get("stage"))
        raise ExportError(f"{output_uri} already holds a different export (of {what}); choose another --out "
                          f"or remove it first")
    return True


def completion_prompt(model: ExportModel) -> list[int]:
    """The prompt whose greedy continuation every runtime must reproduce."""
    if model.stage == "pretrain":
        return model.tokenizer.encode("Once upon a time, there was", prepend="<|bos|>")
    return model.tokenizer.render_for_completion({"messages": [{"role": "user", "content": "What is 12 + 30?"},
                                                               {"role": "assistant", "content": ""}]})


def run(config: PipelineConfig, inputs: dict[str, dict[str, Any]], output_uri: str, **_: Any) -> dict[str, Any]:
    started = time.time()
    source = pick_source(config, inputs)
    replace = refuse_other_export(output_uri, source)
    loaded = load_chat_model(source["uri"])
    model = ExportModel(params=jax.tree.map(lambda x: np.asarray(x, np.float32), loaded.model.param_tree()),
                        model_config=loaded.config.model, tokenizer=loaded.tokenizer, stage=source["stage"],
                        step=loaded.step, metrics=source.get("metrics") or {})
    prompt = completion_prompt(model)
    formats: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="flaxchat-export-") as tmp:
        for name in config.export.format_list():
            folder = os.path.join(tmp, name)
            os.makedirs(folder)
            try:
                info = WRITERS[name](model, folder, config.export)
            except FormatUnavailable as exc:
                print(f"export: {name} skipped: {exc}", flush=True)
                shutil.rmtree(folder)
                formats[name] = {"status": "skipped", "reason": str(exc)}
                continue
            check = check_format(name, model, folder, config.export, prompt)
            if check.get("passed") is False:
                raise ExportError(f"the {name} export does not match the JAX model ({_describe(check)}); "
                                  f"nothing was published to {output_uri}")
            formats[name] = {"status": "written", **info, "parity": check}
            metrics.update({f"{name}/{k}": v for k, v in check.items() if k in ("max_rel_err", "greedy_match",
                                                                                "round_trip_identical")})
            print(f"export: {name} written; parity {_describe(check)}", flush=True)
        files = {os.path.relpath(os.path.join(d, f), tmp): storage.sha256_file(os.path.join(d, f))
                 for d, _, names in os.walk(tmp) for f in names}
        metrics.update({"formats_written": sum(f["status"] == "written" for f in formats.values()),
                        "wall_seconds": time.time() - started})
        manifest = build_manifest(STAGE, output_uri, metrics, config.to_dict(), files, formats=formats,
                                  source={"stage": source["stage"], "uri": source["uri"], "step": loaded.step,
                                          "params_sha256": model.metrics.get("params_sha256")})
        with open(os.path.join(tmp, MANIFEST_NAME), "w") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True, default=float)
        storage.publish_dir(tmp, output_uri, overwrite=replace)
    return manifest


def _describe(check: dict[str, Any]) -> str:
    if "skipped" in check:
        return f"not checked: {check['skipped']}"
    if "round_trip_identical" in check:
        return f"round trip identical: {check['round_trip_identical']}"
    return (f"max relative logits error {check['max_rel_err']:.2e} (limit {check['rtol']:.0e}), greedy "
            f"{check['greedy_tokens']} tokens {'identical' if check['greedy_match'] else 'DIFFER'}")


if __name__ == "__main__":
    from steps.common import main
    from steps.eval import _cli
    sys.exit(main(STAGE, run, _cli(sys.argv[1:])))
