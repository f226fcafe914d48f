"""Exact resume: a pretrain run SIGKILLed mid-training (or mid-save) and restarted ends with
parameters bitwise identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.depth=2", "--set", "model.sequence_len=64", "--set", "tokenizer.vocab_size=300",
        "--set", "pretrain.num_steps=10", "--set", "pretrain.device_batch_size=2",
        "--set", "pretrain.total_batch_size=256", "--set", "pretrain.warmup_steps=2",
        "--set", "pretrain.checkpoint_every=3", "--set", "pretrain.log_every=1",
        "--set", "pretrain.eval_every=5", "--set", "pretrain.sample_every=0",
        "--set", "pretrain.eval_tokens=256"]


def _env():
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("tok")
    proc = subprocess.run([sys.executable, "-m", "steps.tokenizer", "--out", str(base / "tok"), *TINY,
                           "--set", "data.demo_documents=400", "--set", "data.demo_val_documents=40",
                           "--set", f"data.cache_dir={base / 'cache'}", "--set", "tokenizer.max_chars=300000"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr
    return str(base / "tok")


KILLHOOK = str(ROOT / "tests" / "killhook")


def _pretrain(out, tokenizer_dir, killer=None):
    env = _env()
    if killer:  # tests/killhook/sitecustomize.py makes the real stage SIGKILL itself at that moment
        env |= {"KILL_MODE": killer, "PYTHONPATH": os.pathsep.join(filter(None, [KILLHOOK, env.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "steps.pretrain", "--out", str(out),
                           "--input", f"tokenizer={tokenizer_dir}", *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("full") / "pt"
    proc = _pretrain(out, tokenizer_dir)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "manifest.json").read_text())


def _finished_checkpoints(out):
    """Steps whose orbax write completed (renamed from its temp name) before the kill."""
    root = out / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.exists() else []


@pytest.mark.parametrize("killer, min_resume", [
    ("batch:5", 0),   # mid-training, the async step-3 write possibly still in flight
    ("save:6", 3),    # right after the step-6 save started (write in flight); step 3 had landed
    ("batch:8", 3),   # between checkpoints, well after step 3 landed
])
def test_killed_run_resumes_bitwise(tmp_path, tokenizer_dir, uninterrupted, killer, min_resume):
    out = tmp_path / "pt"
    first = _pretrain(out, tokenizer_dir, killer)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert not (out / "manifest.json").exists()          # an unfinished stage publishes nothing
    landed = _finished_checkpoints(out)
    assert (landed[-1] if landed else 0) >= min_resume

    second = _pretrain(out, tokenizer_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    # it continues from the newest checkpoint that had landed, not from scratch
    assert manifest["metrics"]["resumed_from_step"] == (landed[-1] if landed else None)
    assert manifest["metrics"]["steps"] == 10
    assert manifest["metrics"]["params_sha256"] == uninterrupted["metrics"]["params_sha256"]
    assert manifest["history"][-1]["loss"] == uninterrupted["history"][-1]["loss"]
