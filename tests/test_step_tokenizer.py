"""`python -m steps.tokenizer`: a real run, and every kind of bad input as a one-line error
with a non-zero exit and nothing left at the output location."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "tokenizer.vocab_size=300", "--set", "tokenizer.max_chars=200000",
         "--set", "data.demo_documents=300", "--set", "data.demo_val_documents=30"]


def _run(tmp_path, *args):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "steps.tokenizer", "--out", str(out),
                           "--set", f"data.cache_dir={tmp_path / 'cache'}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc, out


def test_standalone_run_writes_files_and_manifest(tmp_path):
    from flaxchat.manifest import read_manifest, verify_files

    proc, out = _run(tmp_path, *SMALL)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    on_disk = read_manifest(str(out))
    assert printed["files"] == on_disk["files"] and set(on_disk["files"]) == {"tokenizer.json", "tokenizer.tiktoken"}
    verify_files(on_disk)
    assert on_disk["metrics"]["bytes_per_token"] > 1.2  # raw bytes would be 1.0
    assert on_disk["data"]["shards"] and on_disk["config"]["preset"] == "demo"


def _parquet(path, column="text"):
    pq.write_table(pa.table({column: ["hello world"] * 10}), path)


@pytest.mark.parametrize("case, needle", [
    ("unknown_preset", "unknown preset 'huge'"),
    ("unknown_key", "did you mean 'tokenizer.vocab_size'"),
    ("vocab_too_small", "at least 265"),
    ("missing_dir", "directory not found"),
    ("empty_dir", "no .parquet files"),
    ("no_text_column", "no 'text' column"),
])
def test_bad_input_is_one_clear_line(tmp_path, case, needle):
    args = list(SMALL)
    data = tmp_path / "data"
    if case == "unknown_preset":
        args = ["--preset", "huge"]
    elif case == "unknown_key":
        args += ["--set", "tokenizer.vocab_sise=300"]
    elif case == "vocab_too_small":
        args += ["--set", "tokenizer.vocab_size=100"]
    elif case == "missing_dir":
        args += ["--set", f"data.source={data / 'nope'}"]
    elif case == "empty_dir":
        data.mkdir()
        args += ["--set", f"data.source={data}"]
    elif case == "no_text_column":
        data.mkdir()
        _parquet(data / "a.parquet", "body")
        _parquet(data / "b.parquet", "body")
        args += ["--set", f"data.source={data}"]
    proc, out = _run(tmp_path, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0], lines[0]
    assert not out.exists()
