"""GRPO stage end to end on a tiny pretrained model: its manifest, a bitwise resume after a SIGKILL
mid-training, and the config it must refuse.

A 4-step depth-1 model never solves a word problem, so with the real reward every advantage is 0
and the rollouts could not influence the weights at all (a resume that replayed the wrong rounds
would still end bitwise equal). The stage subprocesses therefore run with a test-only
`sitecustomize` (written into tmp, chaining to tests/killhook when KILL_MODE is set) that replaces
DemoMath's reward with a deterministic function of the completion text, so groups get differing
rewards and the sampled tokens shape every update. Everything else is the real stage.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flaxchat.config import ConfigError, build_config

ROOT = Path(__file__).resolve().parents[1]
KILLHOOK = ROOT / "tests" / "killhook" / "sitecustomize.py"

TINY = {
    "model": {"depth": 1, "aspect_ratio": 64, "head_dim": 64, "sequence_len": 128, "window_pattern": "L"},
    "tokenizer": {"vocab_size": 400, "max_chars": 200_000, "eval_chars": 20_000},
    "data": {"demo_documents": 300, "demo_val_documents": 30},
    "pretrain": {"num_steps": 4, "device_batch_size": 2, "total_batch_size": 256, "warmup_steps": 1,
                 "eval_every": 0, "sample_every": 0, "checkpoint_every": 0, "log_every": 1, "eval_tokens": 256},
    "tasks": {"demo_conversations": 20, "demo_problems": 20, "demo_val": 8},
    "rl": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 16, "eval_problems": 4,
           "eval_samples": 2},
    "grpo": {"num_steps": 6, "checkpoint_every": 2, "device_batch_size": 2, "eval_every": 0, "log_every": 1,
             "sample_every": 0},
}
# 6 steps with a checkpoint every 2: a kill before step 6 comes after the step-4 save began, and
# every save first waits for the previous one, so the step-2 checkpoint has surely landed (with 4
# steps the async step-2 write can still be in flight at any kill point, and resume from 0).
NUM_STEPS = 6

REWARD_HOOK = f"""
import os, runpy
from flaxchat.tasks import demo

def _reward(self, conversation, completion):
    return float(len(completion) % 2)

demo.DemoMath.reward = _reward
if os.environ.get("KILL_MODE"):
    runpy.run_path({str(KILLHOOK)!r})
"""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny tokenizer + 4-step pretrain (in-process, once), the config file and the reward hook."""
    import steps.pretrain
    import steps.tokenizer
    base = tmp_path_factory.mktemp("grpopipe")
    overrides = json.loads(json.dumps(TINY))
    overrides["data"]["cache_dir"] = str(base / "cache")
    cfg = build_config("demo", overrides=overrides)
    tok = steps.tokenizer.run(cfg, {}, str(base / "tok"))
    pt = steps.pretrain.run(cfg, {"tokenizer": tok}, str(base / "pt"))
    (base / "cfg.yaml").write_text(yaml.safe_dump(overrides))
    hook = base / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(REWARD_HOOK)
    return {"base": base, "pretrain": pt, "config": str(base / "cfg.yaml"), "hook": str(hook)}


def _grpo(pipeline, out: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [pipeline["hook"], os.environ.get("PYTHONPATH")]))}
    env.pop("KILL_MODE", None)
    if kill:
        env["KILL_MODE"] = kill
    return subprocess.run([sys.executable, "-m", "steps.grpo", "--preset", "demo", "--config", pipeline["config"],
                           "--input", f"pretrain={pipeline['pretrain']['uri']}", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def uninterrupted(pipeline):
    out = pipeline["base"] / "grpo-full"
    proc = _grpo(pipeline, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "manifest.json").read_text())


def test_grpo_stage_manifest(pipeline, uninterrupted):
    from flaxchat.manifest import verify_files
    m, pt = uninterrupted["metrics"], pipeline["pretrain"]
    assert uninterrupted["stage"] == "grpo"
    assert m["steps"] == NUM_STEPS and m["resumed_from_step"] is None and m["seed"] == 42
    assert m["rounds"] == NUM_STEPS and m["row_len"] == 128 and m["advantage"] == "grpo"
    assert m["eval_problems"] == 4
    for key in ("pass@1_initial", "pass@1", "pass@2_initial", "pass@2"):
        assert m[key] is not None and 0.0 <= m[key] <= 1.0, key
    assert m["pass@2"] >= m["pass@1"]
    # one rollout record per round, with its statistics; examples kept for the last rounds only
    rollouts = uninterrupted["rollouts"]
    assert [r["round"] for r in rollouts] == list(range(NUM_STEPS))
    assert [r["step"] for r in rollouts] == list(range(NUM_STEPS))
    for r in rollouts:
        assert {"reward_mean", "reward_std", "sampled_len", "tool_calls"} <= set(r)
        assert 0 < r["sampled_len"] <= 16 and r["tool_calls"] >= 0
    assert "examples" not in rollouts[0] and rollouts[-1]["examples"]
    assert any(r["reward_std"] > 0 for r in rollouts), "the test reward should give differing rewards"
    # the model continues from the pretrain checkpoint, shape from its manifest
    assert uninterrupted["config"]["model"] == pt["config"]["model"]
    assert uninterrupted["parent"] == {"stage": "pretrain", "uri": pt["uri"]}
    assert uninterrupted["checkpoint"]["step"] == NUM_STEPS
    assert [h["step"] for h in uninterrupted["history"]] == list(range(1, NUM_STEPS + 1))
    assert m["params_sha256"] != pt["metrics"]["params_sha256"]
    verify_files(uninterrupted)


def test_grpo_killed_run_resumes_bitwise(pipeline, uninterrupted, tmp_path):
    out = tmp_path / "grpo"
    # the loop assembles step k's batch on its k-th call of loop._global: die before step 6
    first = _grpo(pipeline, out, kill="batch:6")
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert not (out / "manifest.json").exists()            # an unfinished stage publishes nothing
    landed = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert landed and landed[-1] in (2, 4), landed
    resumed = landed[-1]

    second = _grpo(pipeline, out)
    assert second.returncode == 0, second.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    m, full = manifest["metrics"], uninterrupted["metrics"]
    assert m["resumed_from_step"] == resumed > 0
    assert m["steps"] == NUM_STEPS
    assert m["params_sha256"] == full["params_sha256"]
    # the resumed run sampled the same rounds from the same params and took the same steps; the
    # manifest reports the whole run (what came before the checkpoint is carried in it)
    assert [r["round"] for r in manifest["rollouts"]] == list(range(NUM_STEPS))
    for got, want in zip(manifest["rollouts"], uninterrupted["rollouts"]):
        assert (got["reward_mean"], got["reward_std"], got["sampled_len"]) == \
            (want["reward_mean"], want["reward_std"], want["sampled_len"])
    assert [h["loss"] for h in manifest["history"]] == [h["loss"] for h in uninterrupted["history"]]
    assert m["pass@1"] == full["pass@1"] and m["pass@1_initial"] == full["pass@1_initial"]   # step 0: carried
    assert m["tokens_seen"] == full["tokens_seen"]


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_group_baseline_needs_two_samples(advantage, capsys):
    with pytest.raises(ConfigError) as info:
        build_config("demo", dotted=["rl.samples_per_prompt=1", f"rl.advantage={advantage}"])
    msg = str(info.value)
    assert "\n" not in msg and "drgrpo" in msg and "samples_per_prompt" in msg, msg
    # the CLI reports it as one line before doing any work
    import steps.grpo
    from steps.common import main
    rc = main("grpo", steps.grpo.run, ["--preset", "demo", "--set", "rl.samples_per_prompt=1",
                                       "--set", f"rl.advantage={advantage}", "--input", "pretrain=/nonexistent"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.splitlines() == [f"error: {msg}"]


def test_one_sample_per_prompt_is_fine_for_drgrpo():
    cfg = build_config("demo", dotted=["rl.samples_per_prompt=1", "rl.advantage=drgrpo"])
    assert cfg.rl.samples_per_prompt == 1 and cfg.rl.advantage == "drgrpo"
