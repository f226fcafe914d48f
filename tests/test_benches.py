"""Benchmarks still run end to end (tiny settings; the figures themselves are not asserted).

Slow: each trains or compiles several models. `uv run pytest -q -m slow tests/test_benches.py`.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_speculative_bench_trains_once_then_measures(tmp_path):
    args = ["--workdir", str(tmp_path), "--target-depth", "2", "--target-steps", "4", "--draft-depth", "1",
            "--draft-steps", "4", "--ks", "1", "3", "--prompts", "2", "--prompt-len", "8", "--tokens", "6",
            "--set", "tokenizer.vocab_size=512", "--set", "data.demo_documents=600",
            "--set", "data.demo_val_documents=40", "--set", "pretrain.eval_tokens=2048"]
    first = run_bench("speculative_bench.py", *args)
    assert first.count("trained ") == 3                         # tokenizer, target, draft
    rows = [line.split() for line in first.splitlines() if line.strip().split(" ")[0] in ("1", "3")]
    assert [r[0] for r in rows] == ["1", "3"] and all(r[-1] == "True" for r in rows)   # exact greedy tokens
    again = run_bench("speculative_bench.py", *args)
    assert "trained " not in again                              # the pair is cached in the workdir


def test_sft_bench_quick(tmp_path):
    out = run_bench("sft_bench.py", "--quick", "--workdir", str(tmp_path))
    rows = [line.split() for line in out.splitlines() if line.split()[:2] == ["4", "128"]]
    assert len(rows) == 1 and len(rows[0]) == 11                # B T compile step tok/s sup pad sup% fill rows/s rows/s


def test_grpo_bench_quick(tmp_path):
    out = run_bench("grpo_bench.py", "--quick", "--workdir", str(tmp_path))
    assert "policy: trained " in out and "no _steer" in out     # trained in the workdir, tools sampled
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("2x2 ")]
    assert len(rows) == 1 and "|" in rows[0]


def test_core_eval_bench_quick():
    out = run_bench("core_eval_bench.py", "--quick")
    assert "ex/s" in out and "rows/s" in out


def test_chat_eval_bench_quick():
    out = run_bench("chat_eval_bench.py", "--quick")
    assert "categorical" in out and "generative" in out


def test_engine_bench_runcpu_prints_the_ceiling_row():
    out = run_bench("engine_bench.py", "--runcpu", "--rounds", "1", "--repeats", "1", "--tokens", "8")
    table = {line[:22].strip(): line[22:].split() for line in out.splitlines() if line.startswith(("flaxchat ", "matmuls"))}
    assert set(table) == {"flaxchat", "matmuls only (ceiling)"}, out
    assert "cores, " in out                                     # the CPU it ran on (bench/machine.py)
    assert table["flaxchat"][0] == "64" and table["matmuls only (ceiling)"][0] == "-"     # cache bucket 32+8 -> 64
    assert all(float(v) > 0 for row in table.values() for v in row[1:3])
