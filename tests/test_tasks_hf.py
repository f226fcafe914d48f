"""flaxchat.tasks.hf: parquet-export downloads from a loopback Hub (FLAXCHAT_HF_ENDPOINT), caching
(a second call makes no request), the file lock, clear errors, and every HF task class loading
through it, including the nanochat SFT/RL mixtures."""

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flaxchat.tasks import TaskError, mixtures
from flaxchat.tasks.arc import ARC
from flaxchat.tasks.gsm8k import GSM8K
from flaxchat.tasks.hf import hf_parquet_files, hf_parquet_rows, parquet_url
from flaxchat.tasks.humaneval_task import HumanEval
from flaxchat.tasks.mmlu import MMLU
from flaxchat.tasks.smoltalk import SmolTalk

PREFIX = "/datasets/{repo}/resolve/refs%2Fconvert%2Fparquet/{config}/{split}/{i:04d}.parquet"


def _parquet(rows) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


class LoopbackHub:
    """Serves registered parquet files by exact URL path; everything else is a 404."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.delay_s = 0.0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.requests.append(self.path)
                time.sleep(hub.delay_s)
                body = hub.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                body = body if body is not None else b"Entry not found"
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def add(self, repo, config, split, *shards):
        for i, rows in enumerate(shards):
            self.files[PREFIX.format(repo=repo, config=config, split=split, i=i)] = _parquet(rows)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(monkeypatch):
    h = LoopbackHub()
    monkeypatch.setenv("FLAXCHAT_HF_ENDPOINT", h.url)
    yield h
    h.close()


def test_url_scheme(monkeypatch):
    monkeypatch.delenv("FLAXCHAT_HF_ENDPOINT", raising=False)
    assert parquet_url("openai/gsm8k", "main", "test", 1) == \
        "https://huggingface.co/datasets/openai/gsm8k/resolve/refs%2Fconvert%2Fparquet/main/test/0001.parquet"


def test_download_all_files_then_cache(hub, tmp_path):
    hub.add("o/d", "c", "train", [{"x": 1}, {"x": 2}], [{"x": 3}])
    rows = hf_parquet_rows("o/d", "c", "train", str(tmp_path))
    assert rows == [{"x": 1}, {"x": 2}, {"x": 3}]
    assert [r.rsplit("/", 1)[-1] for r in hub.requests] == ["0000.parquet", "0001.parquet", "0002.parquet"]
    hub.requests.clear()
    assert hf_parquet_rows("o/d", "c", "train", str(tmp_path)) == rows
    assert hub.requests == []  # the manifest answers without any request
    files = hf_parquet_files("o/d", "c", "train", str(tmp_path))
    assert [f.rsplit("/", 1)[-1] for f in files] == ["0000.parquet", "0001.parquet"]
    assert "o--d/c/train" in files[0] and hub.requests == []


def test_resume_after_interrupted_download(hub, tmp_path):
    hub.add("o/d", "c", "train", [{"x": 1}], [{"x": 2}])
    files = hf_parquet_files("o/d", "c", "train", str(tmp_path))
    (tmp_path / "o--d" / "c" / "train" / "manifest.json").unlink()  # as if killed before the end
    hub.requests.clear()
    assert hf_parquet_files("o/d", "c", "train", str(tmp_path)) == files
    assert [r.rsplit("/", 1)[-1] for r in hub.requests] == ["0002.parquet"]  # only the end probe


def test_missing_split_is_a_clear_error(hub, tmp_path):
    with pytest.raises(TaskError) as info:
        hf_parquet_rows("nobody/nothing", "main", "train", str(tmp_path), retries=0)
    msg = str(info.value)
    assert "nobody/nothing" in msg and "'main'" in msg and "'train'" in msg and "404" in msg
    assert "\n" not in msg


def test_concurrent_loads_download_each_file_once(hub, tmp_path):
    hub.add("o/d", "c", "test", [{"x": 1}], [{"x": 2}])
    hub.delay_s = 0.1  # keep the first download in flight while the others arrive
    results, errors = [], []

    def load():
        try:
            results.append(hf_parquet_rows("o/d", "c", "test", str(tmp_path)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and results == [[{"x": 1}, {"x": 2}]] * 4
    assert sorted(r.rsplit("/", 1)[-1] for r in hub.requests) == ["0000.parquet", "0001.parquet", "0002.parquet"]


GSM_ROWS = [{"question": f"Q{i}?", "answer": f"{i}+1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(12)]
MMLU_ROWS = [{"question": f"M{i}", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(10)]
ARC_ROWS = [{"id": "x", "question": "Q", "choices": {"text": ["a", "b", "c", "d"], "label": list("ABCD")},
             "answerKey": "C"}]
SMOL_ROWS = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}],
              "source": "t"} for i in range(6)]
HE_ROWS = [{"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
            "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}]


def _register_all(hub):
    hub.add("openai/gsm8k", "main", "train", GSM_ROWS[:7], GSM_ROWS[7:])
    hub.add("openai/gsm8k", "main", "test", GSM_ROWS[:5])
    hub.add("cais/mmlu", "all", "auxiliary_train", MMLU_ROWS)
    hub.add("cais/mmlu", "all", "test", MMLU_ROWS[:8])
    hub.add("allenai/ai2_arc", "ARC-Challenge", "test", ARC_ROWS)
    hub.add("HuggingFaceTB/smol-smoltalk", "default", "train", SMOL_ROWS)
    hub.add("HuggingFaceTB/smol-smoltalk", "default", "test", SMOL_ROWS[:3])
    hub.add("openai/openai_humaneval", "openai_humaneval", "test", HE_ROWS)


def test_each_task_loads_through_the_hub(hub, tmp_path):
    _register_all(hub)
    cache = str(tmp_path)
    gsm = GSM8K("train", cache_dir=cache)
    assert hub.requests == []  # constructing a task downloads nothing
    assert len(gsm) == 12
    # nanochat's order: rows permuted by np.random.default_rng(42), as datasets.shuffle(seed=42)
    perm = np.random.default_rng(42).permutation(12)
    assert [gsm.example(i)["messages"][0]["content"] for i in range(12)] == [f"Q{int(j)}?" for j in perm]
    conv = gsm.example(0)
    assert gsm.evaluate(conv, f"#### {int(perm[0]) + 1}") == 1.0
    assert len(GSM8K("train", cache_dir=cache, shuffle_seed=None, stop=3)) == 3
    mmlu = MMLU("test", cache_dir=cache)
    assert len(mmlu) == 8 and mmlu.example(0)["messages"][1]["content"] in "ABCD"
    arc = ARC("ARC-Challenge", "test", cache_dir=cache)
    assert arc.example(0)["messages"][1]["content"] == "C" and arc.evaluate(arc.example(0), "C") == 1.0
    smol = SmolTalk("test", cache_dir=cache)
    assert len(smol) == 3 and smol.example(0)["messages"][1] == {"role": "assistant", "content": "hello"}
    with pytest.raises(TaskError, match="SmolTalk has no automatic grader"):
        smol.evaluate(smol.example(0), "x")
    he = HumanEval(cache_dir=cache)
    assert he.evaluate(he.example(0), he.example(0)["messages"][1]["content"]) == 1.0


def test_nanochat_mixtures_through_the_hub(hub, tmp_path):
    _register_all(hub)
    tasks = SimpleNamespace(source="nanochat", user_jsonl="", user_epochs=2, mmlu_epochs=3, gsm8k_epochs=4,
                            val_mmlu_max=5, val_gsm8k_max=2, cache_dir=str(tmp_path))
    cfg = SimpleNamespace(seed=42, tasks=tasks)
    train = mixtures.sft_train_mixture(cfg)
    assert len(train) == 6 + 3 * 10 + 4 * 12
    counts = {}
    for i in range(len(train)):
        name = type(train.task_of(i)).__name__
        counts[name] = counts.get(name, 0) + 1
    assert counts == {"SmolTalk": 6, "MMLU": 30, "GSM8K": 48}
    assert len(mixtures.sft_val_mixture(cfg)) == 3 + 5 + 2
    assert len(mixtures.rl_train_task(cfg)) == 12 and len(mixtures.rl_eval_task(cfg)) == 5
