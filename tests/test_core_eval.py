"""CORE eval: bundle loading (dir / zip / HTTP, cached), nanochat's prompts and spans, scoring rules,
left truncation, centered accuracy, a tiny GPT end to end without per-example recompiles, clear errors."""

from __future__ import annotations

import csv
import dataclasses
import http.server
import json
import random
import threading
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from flaxchat.eval import core
from flaxchat.eval.bundle import CoreTask, EvalError, load_core_bundle, read_bundle_dir
from flaxchat.model.gpt import gpt_forward
from tests.tiny_models import MAX_LEN, TinyModel, tiny_tokenizer

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "to", "a", "big", "red"]

CORE_YAML = """\
icl_tasks:
-
  label: mc_task
  dataset_uri: language_understanding/mc.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
-
  label: schema_task
  dataset_uri: language_understanding/schema.jsonl
  num_fewshot: [1]
  icl_task_type: schema
-
  label: lm_task
  dataset_uri: world_knowledge/lm.jsonl
  num_fewshot: [3]
  icl_task_type: language_modeling
  continuation_delimiter: "\\nAnswer: "
"""

META_HEADER = ["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline",
               "Centered Metric?", "Description"]


def _phrase(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_bundle(root: Path, n: int = 12, *, yaml_text: str = CORE_YAML, meta_labels=("mc_task", "schema_task", "lm_task"),
                 skip_files=()) -> Path:
    """A bundle in the real layout under root/eval_bundle."""
    rng = random.Random(0)
    b = root / "eval_bundle"
    (b / "eval_data" / "language_understanding").mkdir(parents=True)
    (b / "eval_data" / "world_knowledge").mkdir(parents=True)
    (b / "core.yaml").write_text(yaml_text)
    with open(b / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(META_HEADER)
        for label, base in zip(("mc_task", "schema_task", "lm_task"), ("25.0", "50", "0")):
            if label in meta_labels:
                w.writerow([label, "cat", "type", "0", str(n), base, "", "desc"])
    data = {
        "language_understanding/mc.jsonl": [
            {"query": f"Question: {_phrase(rng, 5)}?", "choices": [_phrase(rng, 2), _phrase(rng, 3), "red dog",
                                                                     f"big {i}"], "gold": i % 4} for i in range(n)],
        "language_understanding/schema.jsonl": [
            {"context_options": [_phrase(rng, 4), f"the dog {i}"], "continuation": _phrase(rng, 3), "gold": i % 2}
            for i in range(n)],
        "world_knowledge/lm.jsonl": [
            {"context": f"  {_phrase(rng, 6)} {i} ", "continuation": _phrase(rng, 2)} for i in range(n)],
    }
    for rel, items in data.items():
        if rel in skip_files:
            continue
        (b / "eval_data" / rel).write_text("".join(json.dumps(x) + "\n" for x in items))
    return b


def zip_dir(d: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(d.rglob("*")):
            zf.write(p, p.relative_to(d.parent).as_posix())       # keeps the top-level eval_bundle/ folder
    return out


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def mk_task(task_type, examples, num_fewshot=0, delim=" ", baseline=0.0, label="t"):
    return CoreTask(label=label, task_type=task_type, num_fewshot=num_fewshot, continuation_delimiter=delim,
                    random_baseline=baseline, examples=examples)


# --------------------------------------------------------------------------- loading

def test_load_from_dir_and_zip_agree(tmp_path):
    b = write_bundle(tmp_path / "src")
    tasks = load_core_bundle(str(b), cache_dir=str(tmp_path / "cache"))
    assert [t.label for t in tasks] == ["mc_task", "schema_task", "lm_task"]
    assert [t.task_type for t in tasks] == ["multiple_choice", "schema", "language_modeling"]
    assert [t.num_fewshot for t in tasks] == [2, 1, 3]
    assert [t.continuation_delimiter for t in tasks] == [" ", " ", "\nAnswer: "]
    assert [t.random_baseline for t in tasks] == [0.25, 0.5, 0.0]
    assert all(len(t.examples) == 12 for t in tasks)
    # nanochat's order: the file's lines shuffled with Random(1337)
    raw = [json.loads(x) for x in (b / "eval_data/language_understanding/mc.jsonl").read_text().splitlines()]
    random.Random(1337).shuffle(raw)
    assert tasks[0].examples == raw
    assert read_bundle_dir(str(b), shuffle=False)[0].examples[0]["gold"] == 0
    z = zip_dir(b, tmp_path / "eval_bundle.zip")
    from_zip = load_core_bundle(str(z), cache_dir=str(tmp_path / "cache"))
    assert [dataclass_tuple(t) for t in from_zip] == [dataclass_tuple(t) for t in tasks]
    assert len(list((tmp_path / "cache").iterdir())) == 1          # one unpacked dir, no temp left behind


def dataclass_tuple(t):
    return (t.label, t.task_type, t.num_fewshot, t.continuation_delimiter, t.random_baseline, t.examples)


class _Server:
    def __init__(self, payload: bytes, fail_first: int = 0):
        outer = self
        self.requests, self.fail_first = 0, fail_first

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                if outer.requests <= outer.fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/eval_bundle.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_load_from_http_is_cached_and_retries(tmp_path):
    z = zip_dir(write_bundle(tmp_path / "src"), tmp_path / "eval_bundle.zip")
    srv = _Server(z.read_bytes(), fail_first=1)
    try:
        cache = tmp_path / "cache"
        tasks = load_core_bundle(srv.url, cache_dir=str(cache), backoff_s=0.01)
        assert srv.requests == 2                                  # one 503, then the body
        assert [t.label for t in tasks] == ["mc_task", "schema_task", "lm_task"]
        again = load_core_bundle(srv.url, cache_dir=str(cache))
        assert srv.requests == 2                                  # cached: no request
        assert [dataclass_tuple(t) for t in again] == [dataclass_tuple(t) for t in tasks]
        assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []   # no temp files left
    finally:
        srv.close()


def test_http_non_zip_body_fails_clearly(tmp_path):
    srv = _Server(b"<html>not a zip</html>")
    try:
        with pytest.raises(EvalError, match="after 2 attempts.*not a zip"):
            load_core_bundle(srv.url, cache_dir=str(tmp_path / "c"), retries=1, backoff_s=0.01)
        assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    finally:
        srv.close()


def test_bad_bundles_give_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvalError, match="no core.yaml"):
        load_core_bundle(str(empty), cache_dir=str(tmp_path / "c"))
    with pytest.raises(EvalError, match="does not exist"):
        load_core_bundle(str(tmp_path / "nope"), cache_dir=str(tmp_path / "c"))
    b = write_bundle(tmp_path / "a", skip_files=("world_knowledge/lm.jsonl",))
    with pytest.raises(EvalError, match=r"task lm_task: dataset file .*lm.jsonl is missing"):
        load_core_bundle(str(b), cache_dir=str(tmp_path / "c"))
    b = write_bundle(tmp_path / "b", yaml_text=CORE_YAML.replace("icl_task_type: schema", "icl_task_type: ranking"))
    with pytest.raises(EvalError, match="task schema_task: unknown icl_task_type 'ranking'"):
        load_core_bundle(str(b), cache_dir=str(tmp_path / "c"))
    b = write_bundle(tmp_path / "d", meta_labels=("mc_task", "lm_task"))
    with pytest.raises(EvalError, match="task schema_task is not in eval_meta_data.csv"):
        load_core_bundle(str(b), cache_dir=str(tmp_path / "c"))
    b = write_bundle(tmp_path / "e")
    (b / "eval_data/language_understanding/mc.jsonl").write_text('{"query": "q", "gold": 0}\n')
    with pytest.raises(EvalError, match=r"task mc_task: .*line 1 lacks \['choices'\]"):
        load_core_bundle(str(b), cache_dir=str(tmp_path / "c"))
    (b / "core.yaml").unlink()
    z = zip_dir(b, tmp_path / "bad.zip")
    with pytest.raises(EvalError, match="no core.yaml in .*bad.zip"):
        load_core_bundle(str(z), cache_dir=str(tmp_path / "c"))


# --------------------------------------------------------------------------- prompts and spans

MC_ITEMS = [{"query": f"Q{i}: what?", "choices": [f"a{i}", f"b{i}", f"c{i}"], "gold": i % 3} for i in range(10)]


def test_render_prompts_match_nanochat_templates():
    mc = mk_task("multiple_choice", MC_ITEMS, num_fewshot=2, delim=" ")
    shots = [MC_ITEMS[4], MC_ITEMS[2]]
    assert core.render_prompts(mc, MC_ITEMS[0], shots) == [
        "Q4: what? b4\n\nQ2: what? c2\n\nQ0: what? a0",
        "Q4: what? b4\n\nQ2: what? c2\n\nQ0: what? b0",
        "Q4: what? b4\n\nQ2: what? c2\n\nQ0: what? c0"]
    assert core.render_prompts(mc, MC_ITEMS[1], []) == ["Q1: what? a1", "Q1: what? b1", "Q1: what? c1"]
    sc_items = [{"context_options": ["Tom went", "Ann went"], "continuation": "home.", "gold": 1},
                {"context_options": ["X ran", "Y sat"], "continuation": "away.", "gold": 0}]
    sc = mk_task("schema", sc_items, num_fewshot=1, delim=" ")
    assert core.render_prompts(sc, sc_items[0], [sc_items[1]]) == ["X ran away.\n\nTom went home.",
                                                                  "X ran away.\n\nAnn went home."]
    lm_items = [{"context": "  The capital of France is ", "continuation": "Paris"},
                {"context": "\tTwo plus two\n", "continuation": "four"}]
    lm = mk_task("language_modeling", lm_items, num_fewshot=1, delim="\nAnswer: ")
    # contexts trimmed; the prompt without the continuation .strip()-ed as a whole (drops "Answer: "'s space)
    assert core.render_prompts(lm, lm_items[0], [lm_items[1]]) == [
        "Two plus two\nAnswer: four\n\nThe capital of France is\nAnswer:",
        "Two plus two\nAnswer: four\n\nThe capital of France is\nAnswer: Paris"]
    assert core.render_prompts(mk_task("language_modeling", lm_items), lm_items[0], []) == [
        "The capital of France is", "The capital of France is Paris"]


def test_fewshot_draw_is_nanochats_excludes_self_and_is_deterministic():
    task = mk_task("multiple_choice", MC_ITEMS, num_fewshot=3)
    # pinned: random.Random(1234 + idx).sample([i for i in range(10) if i != idx], 3)
    assert core.fewshot_examples(task, 3) == [MC_ITEMS[2], MC_ITEMS[7], MC_ITEMS[9]]
    assert core.fewshot_examples(task, 0) == [MC_ITEMS[8], MC_ITEMS[2], MC_ITEMS[1]]
    for idx in range(10):
        shots = core.fewshot_examples(task, idx)
        assert MC_ITEMS[idx] not in shots and len(shots) == 3
        assert shots == core.fewshot_examples(task, idx)
    assert core.fewshot_examples(mk_task("multiple_choice", MC_ITEMS, num_fewshot=0), 3) == []
    # with 2 items and 1 shot the only other item is always drawn
    two = mk_task("multiple_choice", MC_ITEMS[:2], num_fewshot=1)
    assert core.fewshot_examples(two, 0) == [MC_ITEMS[1]] and core.fewshot_examples(two, 1) == [MC_ITEMS[0]]


def test_continuation_spans():
    assert core.continuation_spans("multiple_choice", [[1, 5, 6, 7], [1, 5, 6, 8, 9], [1, 5, 9]]) == \
        ([2, 2, 2], [4, 5, 3])
    assert core.continuation_spans("schema", [[1, 4, 7, 8], [1, 5, 6, 7, 8], [1, 9, 9, 9, 7, 8]]) == \
        ([2, 3, 4], [4, 5, 6])
    assert core.continuation_spans("language_modeling", [[1, 3, 4], [1, 3, 4, 5, 6]]) == ([3], [5])
    with pytest.raises(EvalError, match="prefix"):
        core.continuation_spans("language_modeling", [[1, 3, 4], [1, 3, 9, 5]])
    with pytest.raises(EvalError, match="empty continuation"):
        core.continuation_spans("multiple_choice", [[1, 5, 6], [1, 5, 6, 7]])   # option 0 is all prefix


def test_spans_on_real_tokens(tok):
    mc = mk_task("multiple_choice", [{"query": "the cat sat on", "choices": ["the mat", "a big red dog"], "gold": 0}])
    (ex,) = core.prepare_examples(mc, tok, 64)
    for row, s, e, choice in zip(ex.tokens, ex.starts, ex.ends, ["the mat", "a big red dog"]):
        assert row[0] == tok.bos_token_id and e == len(row)
        assert tok.decode(row[s:e]) == " " + choice and tok.decode(row[1:s]) == "the cat sat on"
    lm = mk_task("language_modeling", [{"context": "the cat sat on ", "continuation": "the mat"}])
    (ex,) = core.prepare_examples(lm, tok, 64)
    (row,), (s,), (e,) = ex.tokens, ex.starts, ex.ends
    assert tok.decode(row[s:e]) == " the mat" and e == len(row)


# --------------------------------------------------------------------------- scoring rules (stub scorer)

def table_scorer(loss_of_token: dict[int, float], pred_of_pos=None, default_loss=1.0, calls=None):
    """losses[r, t] = loss_of_token[tokens[r, t+1]]; preds[r, t] = pred_of_pos(tokens)[r, t] or tokens[r, t+1]."""
    def score(tokens):
        if calls is not None:
            calls.append(tokens.copy())
        nxt = np.roll(tokens, -1, axis=1)
        losses = np.vectorize(lambda t: loss_of_token.get(int(t), default_loss), otypes=[np.float32])(nxt)
        losses[:, -1] = np.nan
        preds = nxt if pred_of_pos is None else pred_of_pos(tokens)
        return losses, preds.astype(np.int32)
    return score


def test_mc_and_schema_pick_lowest_mean_loss(tok):
    c = {w: tok.encode(" " + w) for w in ["cat", "dog", "red", "big"]}
    assert all(len(v) == 1 for v in c.values())
    # option 0 (" cat", 1 token, loss 2.0) vs option 1 (" dog red red", 3 tokens, mean 1.5, sum 4.5)
    loss = {c["cat"][0]: 2.0, c["dog"][0]: 2.5, c["red"][0]: 1.0}
    mc = mk_task("multiple_choice", [{"query": "the", "choices": ["cat", "dog red red"], "gold": 1},    # mean, not sum
                                     {"query": "the", "choices": ["red", "cat cat"], "gold": 0},
                                     {"query": "the", "choices": ["dog red red", "cat"], "gold": 0}], baseline=0.5)
    r = core.evaluate_task(None, tok, mc, scorer=table_scorer(loss), max_len=64)
    assert r["accuracy"] == 1.0 and r["n"] == 3 and r["centered"] == 1.0      # by sum: 1/3
    # schema: spans are the common suffix; the context tokens before it do not count
    sc = mk_task("schema", [{"context_options": ["big big big", "cat"], "continuation": "red dog", "gold": 0}])
    loss = {c["big"][0]: 100.0, c["cat"][0]: 0.0, c["red"][0]: 1.0, c["dog"][0]: 1.0}
    # the common suffix " red dog" costs the same in both rows -> a tie -> the first option (0) wins;
    # counting the contexts (" big" = 100 vs "cat" = 0) would pick option 1
    assert core.evaluate_task(None, tok, sc, scorer=table_scorer(loss), max_len=64)["accuracy"] == 1.0
    loss_by_row = {}

    cat = tok.encode("cat")
    assert len(cat) == 1

    def row_scorer(tokens):   # loss depends on the row's context: the row starting "cat" gets lower losses
        losses, preds = table_scorer({})(tokens)
        for r_ in range(tokens.shape[0]):
            loss_by_row[r_] = 0.5 if tokens[r_, 1] == cat[0] else 3.0
            losses[r_, :-1] = loss_by_row[r_]
        return losses, preds
    assert core.evaluate_task(None, tok, sc, scorer=row_scorer, max_len=64)["accuracy"] == 0.0  # picks option 1


def test_lm_exact_match_needs_every_token(tok):
    lm = mk_task("language_modeling", [{"context": "the cat", "continuation": "sat on the mat"}])
    (ex,) = core.prepare_examples(lm, tok, 64)
    s, e = ex.starts[0], ex.ends[0]
    assert e - s >= 3
    assert core.evaluate_task(None, tok, lm, scorer=table_scorer({}), max_len=64)["accuracy"] == 1.0
    for wrong in (s - 1, e - 2, (s + e) // 2 - 1):               # first, last, a middle prediction wrong
        def one_wrong(tokens, wrong=wrong):
            preds = np.roll(tokens, -1, axis=1).copy()
            preds[0, wrong] += 1
            return preds
        r = core.evaluate_task(None, tok, lm, scorer=table_scorer({}, pred_of_pos=one_wrong), max_len=64)
        assert r["accuracy"] == 0.0, wrong

    def outside_wrong(tokens):
        preds = np.roll(tokens, -1, axis=1).copy()
        preds[0, :s - 1] += 1                                   # context predictions do not matter
        return preds
    assert core.evaluate_task(None, tok, lm, scorer=table_scorer({}, pred_of_pos=outside_wrong),
                              max_len=64)["accuracy"] == 1.0


def test_left_truncation_keeps_the_continuation(tok):
    ctx = " ".join(["the cat sat on the mat"] * 20)
    lm = mk_task("language_modeling", [{"context": ctx, "continuation": "a big red dog"}])
    full = tok.encode(ctx + " a big red dog", prepend=tok.bos_token_id)
    assert len(full) > 40
    (ex,) = core.prepare_examples(lm, tok, 40)
    (row,), (s,), (e,) = ex.tokens, ex.starts, ex.ends
    assert row == full[-40:] and e == 40 and tok.decode(row[s:e]) == " a big red dog"
    calls = []
    r = core.evaluate_task(None, tok, lm, scorer=table_scorer({}, calls=calls), max_len=40, batch_rows=4)
    assert r["accuracy"] == 1.0 and calls[0].shape == (4, 40)   # bucket capped at max_len
    mc = mk_task("multiple_choice", [{"query": ctx, "choices": ["cat", "big red dog"], "gold": 1}])
    (ex,) = core.prepare_examples(mc, tok, 40)
    for row, s, e, ch in zip(ex.tokens, ex.starts, ex.ends, ["cat", "big red dog"]):
        assert len(row) == 40 and e == 40 and tok.decode(row[s:e]) == " " + ch
    with pytest.raises(EvalError, match="task t: example 0: the continuation .* does not fit in 3 tokens"):
        core.prepare_examples(lm, tok, 3)


def test_batching_uses_fixed_rows_and_pow2_buckets(tok):
    items = [{"query": " ".join(["the cat"] * (1 + 3 * i)), "choices": ["red", "dog", "big mat"], "gold": 0}
             for i in range(7)]
    calls = []
    core.evaluate_task(None, tok, mk_task("multiple_choice", items), scorer=table_scorer({}, calls=calls),
                       max_len=64, batch_rows=4)
    assert {c.shape[0] for c in calls} == {4}
    assert {c.shape[1] for c in calls} <= {32, 64} and len(calls) >= 21 // 4
    assert core.bucket_len(1, 2048) == 32 and core.bucket_len(33, 2048) == 64 and core.bucket_len(64, 2048) == 64
    assert core.bucket_len(65, 100) == 100 and core.bucket_len(5, 16) == 16


def test_centered_and_core_mean_on_known_numbers(tok):
    c = {w: tok.encode(" " + w)[0] for w in ["cat", "dog", "red", "big"]}
    loss = {c["cat"]: 0.1, c["dog"]: 1.0, c["red"]: 2.0, c["big"]: 3.0}     # always picks " cat"
    choices = ["cat", "dog", "red", "big"]
    mc = mk_task("multiple_choice", [{"query": "the", "choices": choices, "gold": g} for g in (0, 0, 0, 1)],
                 baseline=0.25, label="mc")                                  # acc 0.75 -> centered 2/3
    lm = mk_task("language_modeling", [{"context": "the", "continuation": "cat"}] * 5, baseline=0.0, label="lm")
    out = core.evaluate_core(None, tok, [mc, lm], scorer=table_scorer(loss), max_len=64)
    assert out["tasks"]["mc"]["accuracy"] == 0.75 and out["tasks"]["mc"]["centered"] == pytest.approx(2 / 3)
    assert out["tasks"]["lm"]["centered"] == 1.0
    assert out["core"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert core.centered(0.3, 0.25) == pytest.approx(0.05 / 0.75)
    out = core.evaluate_core(None, tok, [mc, lm], scorer=table_scorer(loss), max_len=64, max_examples=3)
    assert out["tasks"]["mc"]["n"] == 3 and out["tasks"]["mc"]["accuracy"] == 1.0


def test_bad_example_names_task_and_index(tok):
    items = [{"query": "the", "choices": ["cat", "dog"], "gold": 0} for _ in range(5)]
    items[3] = {"query": "the", "choices": ["cat", "dog"], "gold": 2}
    with pytest.raises(EvalError, match="task mc: example 3: gold 2 is not an index into its 2 options"):
        core.evaluate_task(None, tok, mk_task("multiple_choice", items, label="mc"), scorer=table_scorer({}),
                           max_len=64)
    items[3] = {"query": "the", "choices": ["cat", "cat"], "gold": 0}
    with pytest.raises(EvalError, match="task mc: example 3: option 0 has an empty continuation span"):
        core.evaluate_task(None, tok, mk_task("multiple_choice", items, label="mc"), scorer=table_scorer({}),
                           max_len=64)
    with pytest.raises(EvalError, match="task mc: example 0: 9-shot"):
        core.evaluate_task(None, tok, mk_task("multiple_choice", items[:3], num_fewshot=9, label="mc"),
                           scorer=table_scorer({}), max_len=64)


# --------------------------------------------------------------------------- a real tiny GPT

_REF_ROWS = 4


@jax.jit
def _ref_logits(params, ids):
    return gpt_forward(params, _REF_SPEC[0], ids)


_REF_SPEC = [None]


def reference_correct(model, tok, task: CoreTask, max_len: int) -> list[bool]:
    """nanochat's per-example loop: one forward per example (its rows padded to (4, max_len)), float64 losses."""
    out = []
    params = model.param_tree()
    _REF_SPEC[0] = model.spec
    for ex in core.prepare_examples(task, tok, max_len):
        ids = np.full((_REF_ROWS, max_len), tok.bos_token_id, np.int32)
        for i, t in enumerate(ex.tokens):
            ids[i, :len(t)] = t
        logits = np.asarray(_ref_logits(params, ids), np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        losses = -np.take_along_axis(logp, np.roll(ids, -1, axis=1)[..., None], -1)[..., 0]
        preds = logits.argmax(-1)
        if task.task_type == "language_modeling":
            s, e = ex.starts[0], ex.ends[0]
            out.append(bool((preds[0, s - 1:e - 1] == ids[0, s:e]).all()))
        else:
            means = [losses[i, s - 1:e - 1].mean() for i, (s, e) in enumerate(zip(ex.starts, ex.ends))]
            out.append(int(np.argmin(means)) == ex.gold)
    return out


def greedy_lm_items(model, tok, contexts, n_tokens=2):
    """LM items whose continuation is the model's own greedy continuation (kept when it re-tokenizes the same)."""
    _REF_SPEC[0] = model.spec
    items = []
    for ctx in contexts:
        ids = tok.encode(ctx, prepend=tok.bos_token_id)
        for _ in range(n_tokens):
            row = np.full((_REF_ROWS, MAX_LEN), tok.bos_token_id, np.int32)
            row[0, :len(ids)] = ids
            ids = ids + [int(np.asarray(_ref_logits(model.param_tree(), row))[0, len(ids) - 1].argmax())]
        cont = tok.decode(ids[-n_tokens:])
        if tok.encode(ctx + cont) == tok.encode(ctx) + ids[-n_tokens:]:     # delimiter "": prompt = ctx + cont
            items.append({"context": ctx, "continuation": cont})
    return items


def test_tiny_gpt_end_to_end_without_per_example_recompiles(tmp_path, tok):
    tasks = load_core_bundle(str(write_bundle(tmp_path, n=10)), cache_dir=str(tmp_path / "cache"))
    model = TinyModel(tok.vocab_size, depth=2, seed=1)
    lens = [len(r) for t in tasks for ex in core.prepare_examples(t, tok, MAX_LEN) for r in ex.tokens]
    assert max(lens) == MAX_LEN and min(lens) <= 32         # the lm task is truncated; two buckets in use
    before = core.TRACE_COUNT[0]
    out = core.evaluate_core(model, tok, tasks, batch_rows=8)
    traces = core.TRACE_COUNT[0] - before
    assert 1 <= traces <= 2                                  # one program per bucket (32, 64), not per example
    assert set(out["tasks"]) == {"mc_task", "schema_task", "lm_task"}
    for t in tasks:
        r = out["tasks"][t.label]
        assert r["n"] == 10
        assert r["accuracy"] == pytest.approx(np.mean(reference_correct(model, tok, t, MAX_LEN)))
        assert r["centered"] == pytest.approx((r["accuracy"] - t.random_baseline) / (1 - t.random_baseline))
    assert out["core"] == pytest.approx(np.mean([r["centered"] for r in out["tasks"].values()]))
    again = core.evaluate_core(model, tok, tasks, batch_rows=8)
    assert core.TRACE_COUNT[0] - before == traces            # same shapes: nothing recompiled
    assert again == {**again, "core": out["core"]}
    # the greedy path: items whose continuation is the model's own argmax are all correct
    lm_items = greedy_lm_items(model, tok, [_phrase(random.Random(i), 5) for i in range(12)])
    assert len(lm_items) >= 2
    lm = CoreTask("greedy", "language_modeling", 0, "", 0.0, lm_items)
    assert core.evaluate_task(model, tok, lm, batch_rows=8)["accuracy"] == 1.0
    wrong = [{**it, "continuation": it["continuation"] + " the"} for it in lm_items]   # one more token
    ref = reference_correct(model, tok, dataclasses.replace(lm, examples=wrong), MAX_LEN)
    assert not all(ref)
    assert core.evaluate_task(model, tok, dataclasses.replace(lm, examples=wrong), batch_rows=8)["accuracy"] \
        == pytest.approx(np.mean(ref))
