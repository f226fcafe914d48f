"""Eval stage: score the base, SFT and RL checkpoints named by their manifests; write the report card.

- BASE (the `pretrain` manifest): CORE (DCLM's centered accuracy over the bundle's tasks; the `demo`
  preset generates a bundle in the same format from its corpus, `flaxchat/eval/demo_bundle.py`).
- SFT and RL (`sft`, `grpo`): the chat tasks (ARC-Easy/Challenge and MMLU by letter logits; GSM8K
  with the calculator, HumanEval in the sandbox and SpellingBee through the batched engine; the demo's
  own multiple-choice and word-problem tasks offline) and ChatCORE.
Whatever stages exist are evaluated; a missing one is a missing row. Outputs under `output_uri`:
`report.json`, `report.md` (environment, wall time and cost per stage, parameters, tokens seen, final
losses, the BASE / SFT / RL metrics table beside nanochat's figures) and the manifest.

    python -m steps.eval --preset demo --model artifacts/<flow>/<run>/sft --model …/grpo --out /tmp/eval
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from flaxchat import storage
from flaxchat.chat.loading import load_chat_model
from flaxchat.config import PipelineConfig
from flaxchat.eval.report import ROWS, STAGE_OF_ROW, build_report, render_markdown
from flaxchat.model.flops import param_counts
from flaxchat.manifest import ManifestError, build_manifest, write_manifest

STAGE = "eval"


def core_tasks(config: PipelineConfig):
    """The CORE bundle the config names ('demo': generated from the demo corpus), or None."""
    source = config.eval.core_bundle
    if not source:
        return None
    from flaxchat.eval.bundle import load_core_bundle
    if source == "demo":
        from flaxchat.eval.demo_bundle import BUNDLE_VERSION, write_demo_bundle
        cache = os.path.expanduser(config.eval.cache_dir)
        source = write_demo_bundle(os.path.join(cache, f"demo-bundle-v{BUNDLE_VERSION}-s{config.seed}"), config.seed)
    return load_core_bundle(source, cache_dir=config.eval.cache_dir)


def evaluate_base(model, tokenizer, tasks, config: PipelineConfig) -> tuple[dict[str, float], dict[str, Any]]:
    from flaxchat.eval.core import evaluate_core
    out = evaluate_core(model, tokenizer, tasks, max_examples=config.eval.core_max_examples)
    return {"CORE": out["core"]}, out["tasks"]


def evaluate_chat(model, tokenizer, config: PipelineConfig) -> tuple[dict[str, float], dict[str, Any]]:
    from flaxchat.eval.chat_eval import evaluate_chat_model
    from flaxchat.tasks.mixtures import chat_eval_tasks
    e = config.eval
    out = evaluate_chat_model(model, tokenizer, chat_eval_tasks(config), max_problems=e.chat_max_problems,
                              max_new_tokens=e.max_new_tokens, batch_rows=e.batch_rows)
    row = {name: r["accuracy"] for name, r in out["tasks"].items()}
    if out.get("chatcore_complete"):       # ChatCORE is defined over its five tasks, never a subset
        row["ChatCORE"] = out["chatcore"]
    return row, out["tasks"]


def run(config: PipelineConfig, inputs: dict[str, dict[str, Any]], output_uri: str, *,
        git_revision: str = "unknown", extra_sinks: tuple = ()) -> dict[str, Any]:
    present = {row: inputs[STAGE_OF_ROW[row]] for row in ROWS if inputs.get(STAGE_OF_ROW[row])}
    if not present:
        raise ManifestError("the eval stage needs at least one model: pass pretrain, sft and/or grpo "
                            "(flow artifacts or --input STAGE=URI / --model URI)")
    tasks = core_tasks(config) if "BASE" in present else None
    results: dict[str, dict[str, float]] = {}
    details: dict[str, Any] = {}
    model_config = None
    for row, manifest in present.items():
        loaded = load_chat_model(manifest["uri"])
        model_config = model_config or loaded.config.model
        if row == "BASE":
            if tasks is None:
                continue
            results[row], details[row] = evaluate_base(loaded.model, loaded.tokenizer, tasks, loaded.config)
        else:
            results[row], details[row] = evaluate_chat(loaded.model, loaded.tokenizer, config)
        for sink in extra_sinks:
            sink("eval_row", {"row": row, "metrics": results[row]})
    from flaxchat.sandbox import sandbox_isolation
    upstream = {"tokenizer": inputs["tokenizer"]} if inputs.get("tokenizer") else {}
    upstream.update({STAGE_OF_ROW[r]: m for r, m in present.items()})     # in pipeline order
    report = build_report(upstream, results, depth=model_config.depth, params=param_counts(model_config),
                          git_revision=git_revision, hourly_price_usd=config.eval.hourly_price_usd,
                          extra={"details": details, "isolation": sandbox_isolation()})
    text = json.dumps(report, indent=2, default=float)
    markdown = render_markdown(report)
    storage.write_text(storage.join(output_uri, "report.json"), text)
    storage.write_text(storage.join(output_uri, "report.md"), markdown)
    files = {name: storage.sha256_file(storage.join(output_uri, name)) for name in ("report.json", "report.md")}
    metrics = {f"{row}/{key}": value for row, values in results.items() for key, value in values.items()}
    manifest = build_manifest(STAGE, output_uri, metrics, config.to_dict(), files, report=report,
                              models={row: m["uri"] for row, m in present.items()})
    write_manifest(manifest)
    return manifest


def _cli(argv: list[str]) -> list[str]:
    """`--model URI` names a model stage output; it becomes `--input <its stage>=URI`."""
    from flaxchat.manifest import read_manifest
    out, it = [], iter(argv)
    for arg in it:
        if arg == "--model" or arg.startswith("--model="):
            uri = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            try:
                out += ["--input", f"{read_manifest(uri)['stage']}={uri}"]
            except ManifestError as exc:
                raise SystemExit(f"error: {exc}")
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    from steps.common import main
    sys.exit(main(STAGE, run, _cli(sys.argv[1:])))
