"""A CORE-format eval bundle made from the demo corpus's facts, so the offline demo measures CORE too.

The real bundle (DCLM's 22 tasks) cannot be downloaded in an offline demo and would say nothing about
a model trained on generated children's stories. This writes a bundle in exactly the real format
(`core.yaml`, `eval_meta_data.csv`, `eval_data/<task>.jsonl`), one task per type, from what the demo
corpus states (`flaxchat.data.demo_corpus`): the same loader and scorer then run on it unchanged.

- demo_sounds  (multiple_choice, 2-shot): "What sound does a cow make?" — which quoted sound follows.
- demo_homes   (schema, 2-shot): which "Where does X live?" context the answer "... in a hive." follows.
- demo_calc    (language_modeling, 3-shot): complete a calculator annotation `7*8 = <<7*8=` -> `56>>56`.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import uuid

import yaml

from flaxchat.data.demo_corpus import HOMES, SOUNDS, _a, _cap

BUNDLE_VERSION = 1


def _sounds(rng: random.Random, n: int) -> list[dict]:
    animals = sorted(SOUNDS)
    out = []
    for _ in range(n):
        animal = rng.choice(animals)
        wrong = rng.sample([a for a in animals if SOUNDS[a] != SOUNDS[animal]], 3)
        options = [animal, *wrong]
        rng.shuffle(options)
        out.append({"query": f"User: What sound does {_a(animal)} make?\nAssistant: {_cap(_a(animal))} says",
                    "choices": [f"\"{SOUNDS[o]}\"." for o in options], "gold": options.index(animal)})
    return out


def _homes(rng: random.Random, n: int) -> list[dict]:
    animals = sorted(HOMES)
    out = []
    for _ in range(n):
        animal = rng.choice(animals)
        others = rng.sample([a for a in animals if HOMES[a] != HOMES[animal]], 3)
        options = [animal, *others]
        rng.shuffle(options)
        out.append({"context_options": [f"User: Where does {_a(o)} live?\nAssistant: {_cap(_a(o))} lives"
                                        for o in options],
                    "continuation": f"{HOMES[animal]}.", "gold": options.index(animal)})
    return out


def _calc(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 15), rng.randint(2, 12)
        out.append({"context": f"{a}*{b} = <<{a}*{b}=", "continuation": f"{a * b}>>{a * b}"})
    return out


TASKS = (  # label, type, shots, delimiter, random baseline (%), generator
    ("demo_sounds", "multiple_choice", 2, " ", 25.0, _sounds),
    ("demo_homes", "schema", 2, " ", 25.0, _homes),
    ("demo_calc", "language_modeling", 3, "", 0.0, _calc),
)


def write_demo_bundle(out_dir: str, seed: int = 0, n: int = 150) -> str:
    """Write the bundle under out_dir (built beside it, renamed into place); returns out_dir.
    Deterministic in (seed, n, BUNDLE_VERSION)."""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(os.path.join(out_dir, "core.yaml")):
        return out_dir
    tmp = f"{out_dir}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(os.path.join(tmp, "eval_data", "demo"))
    try:
        icl, meta = [], []
        for label, kind, shots, delim, baseline, make in TASKS:
            rng = random.Random(f"flaxchat-demo-bundle-v{BUNDLE_VERSION}-{label}-{seed}")
            with open(os.path.join(tmp, "eval_data", "demo", f"{label}.jsonl"), "w") as fh:
                for item in make(rng, n):
                    fh.write(json.dumps(item) + "\n")
            icl.append({"label": label, "dataset_uri": f"demo/{label}.jsonl", "num_fewshot": [shots],
                        "icl_task_type": kind, "continuation_delimiter": delim})
            meta.append({"Eval Task": label, "Task Category": "demo", "Task Type": kind,
                         "#shots": shots, "#datapoints": n, "Random baseline": baseline})
        with open(os.path.join(tmp, "core.yaml"), "w") as fh:
            yaml.safe_dump({"icl_tasks": icl}, fh, sort_keys=False)
        with open(os.path.join(tmp, "eval_meta_data.csv"), "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(meta[0]))
            writer.writeheader()
            writer.writerows(meta)
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        try:
            os.rename(tmp, out_dir)
        except OSError:           # another process published the same deterministic bundle first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
