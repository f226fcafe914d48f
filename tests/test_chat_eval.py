"""flaxchat.eval.chat_eval: letter-logit choice, batching, compile reuse, generative grading,
EvalError, ChatCORE; flaxchat.tasks.demo_choice and mixtures.chat_eval_tasks."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_models
from flaxchat.chat_format import render_for_completion
from flaxchat.eval import chat_eval
from flaxchat.eval.chat_eval import (CHATCORE_BASELINES, EvalError, categorical_accuracy, chatcore,
                                     chatcore_details, evaluate_chat_model, generative_accuracy)
from flaxchat.tasks.base import Task
from flaxchat.tasks.demo_choice import DemoChoice
from flaxchat.tasks.mmlu import grade_letter, mc_conversation, render_mc
from flaxchat.tasks.spelling import SimpleSpelling


@pytest.fixture(scope="module")
def tok():
    return tiny_models.tiny_tokenizer()


class ListTask(Task):
    """Conversations in memory; records what it was asked to grade; can fail on one index."""

    def __init__(self, convs, eval_type="categorical", grade=grade_letter, fail_at=None):
        super().__init__()
        self.convs, self.eval_type, self.grade, self.fail_at = convs, eval_type, grade, fail_at
        self.graded: list[tuple[int, str]] = []

    def num_examples(self):
        return len(self.convs)

    def get_example(self, index):
        return {**self.convs[index], "_i": index}

    def evaluate(self, conversation, completion):
        i = conversation["_i"]
        if i == self.fail_at:
            raise KeyError("boom")
        self.graded.append((i, completion))
        return self.grade(conversation, completion)


def mc(q, gold, letters=("A", "B", "C", "D")):
    return mc_conversation(q, [f"choice {x}" for x in letters], list(letters), gold)


# ------------------------------------------------------------------ categorical: letter restriction

class StubLM:
    """idx (R,L) -> logits (R,L,V): position t of row r gets wanted[prefix] when the prefix
    idx[r,:t+1] is a registered prompt, else `default` (which favours letter D, so reading any
    position other than the row's own last one shows up as a D)."""

    def __init__(self, vocab, wanted, default):
        self.vocab, self.wanted, self.default = vocab, wanted, default

    def _host(self, idx):
        idx = np.asarray(idx)
        out = np.tile(self.default, idx.shape + (1,)).astype(np.float32)
        for r in range(idx.shape[0]):
            for t in range(idx.shape[1]):
                key = tuple(idx[r, :t + 1].tolist())
                if key in self.wanted:
                    out[r, t] = self.wanted[key]
        return out

    def __call__(self, idx):
        shape = jax.ShapeDtypeStruct(idx.shape + (self.vocab,), jnp.float32)
        return jax.pure_callback(self._host, shape, idx)


def test_letter_choice_is_restricted_to_the_offered_letters(tok):
    V = tok.vocab_size
    ids = {x: tok.encode(x)[0] for x in "ABCDE"}
    convs = [mc("first question?", "B"), mc("second question, a bit longer?", "C"),
             mc("third?", "A", letters=("A", "B", "C")), mc("fourth question here?", "B")]
    default = np.zeros(V, np.float32)
    default[ids["D"]] = 50.0
    wanted = {}
    plans = [  # (token ids given a logit, their logits)
        ({tok.bos_token_id: 99.0, ids["E"]: 80.0, ids["B"]: 3.0, ids["A"]: 2.0}, "B"),   # non-letters lose
        ({ids["A"]: 9.0, ids["C"]: 1.0}, "A"),                                             # wrong answer
        ({ids["D"]: 99.0, 0: 98.0, ids["C"]: 5.0, ids["B"]: 4.0}, "C"),  # D not offered; 0 pads empty slots
        ({ids["B"]: 1.0}, "B"),
    ]
    for conv, (logits, _) in zip(convs, plans):
        vec = np.full(V, -1.0, np.float32)
        for t, v in logits.items():
            vec[t] = v
        wanted[tuple(render_for_completion(tok, conv))] = vec
    task = ListTask(convs)
    res = categorical_accuracy(StubLM(V, wanted, default), tok, task, batch_rows=8)
    assert sorted(task.graded) == [(i, want) for i, (_, want) in enumerate(plans)]
    assert res == {"accuracy": 0.5, "n": 4, "correct": 2}        # examples 0 and 3
    assert categorical_accuracy(StubLM(V, wanted, default), tok, task, max_problems=2, batch_rows=3)["n"] == 2


def test_letters_must_be_single_tokens_and_present(tok):
    stub = lambda idx: jnp.zeros(idx.shape + (400,))  # noqa: E731
    bad = ListTask([mc("q?", "AB", letters=("AB", "CD"))])
    with pytest.raises(EvalError, match=r"ListTask example 0.*single token"):
        categorical_accuracy(stub, tok, bad)
    no_letters = ListTask([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}]}])
    with pytest.raises(EvalError, match="example 0.*letters"):
        categorical_accuracy(stub, tok, no_letters)


# ------------------------------------------------------------------ categorical: a real tiny GPT

@pytest.fixture(scope="module")
def gpt256():
    """A tiny GPT (tests/tiny_models.py weights) with sequence_len 256, for real prompt lengths."""
    old = tiny_models.MAX_LEN
    tiny_models.MAX_LEN = 256
    try:
        tok = tiny_models.tiny_tokenizer()
        model = tiny_models.TinyModel(tok.vocab_size, depth=2, seed=0)
    finally:
        tiny_models.MAX_LEN = old
    assert model.spec.sequence_len == 256
    return model, tok


LETTER_SETS = (("A", "B", "C", "D"), ("A", "D", "1", "2"), ("B", "C"), ("1", "2", "4", "D"), ("C", "B", "4"),
               ("2", "3", "A"), ("D", "4", "1"))


def varied_task(n):
    """DemoChoice-like rows of different lengths whose offered letters vary (A-D, digits, 2-4 of
    them), so a random tiny model does not give one constant answer."""
    inner = DemoChoice(7, n)
    convs = []
    for i in range(n):
        item, letters = inner.items[i], LETTER_SETS[i % len(LETTER_SETS)]
        convs.append(mc_conversation(item["question"] + " (" + "x" * (i % 5) + ")", item["choices"][:len(letters)],
                                     letters, letters[i % len(letters)]))
    return ListTask(convs)


def reference_picks(model, tok, task):
    """All prompts in one (n, 256) forward; each row's letters compared at its last position by hand."""
    from flaxchat.model.gpt import gpt_forward
    prompts = [render_for_completion(tok, task.example(i)) for i in range(len(task))]
    idx = np.zeros((len(prompts), model.spec.sequence_len), np.int32)
    for r, p in enumerate(prompts):
        idx[r, :len(p)] = p
    logits = np.asarray(jax.jit(gpt_forward, static_argnums=1)(model.param_tree(), model.spec, jnp.asarray(idx)))
    picks = []
    for r, p in enumerate(prompts):
        letters = task.example(r)["letters"]
        picks.append(letters[int(np.argmax([logits[r, len(p) - 1, tok.encode(x)[0]] for x in letters]))])
    return picks


def test_batched_padded_equals_one_by_one(gpt256):
    model, tok = gpt256
    task = varied_task(14)
    lens = [len(render_for_completion(tok, c)) for c in task.convs]
    assert len(set(lens)) > 5 and min(lens) <= 128 < max(lens)      # rows padded differently, two buckets
    want = reference_picks(model, tok, task)
    assert len(set(want)) > 2                                       # not a constant answer
    gold = [c["messages"][-1]["content"] for c in task.convs]
    for rows in (1, 5):
        task.graded.clear()
        res = categorical_accuracy(model, tok, task, batch_rows=rows)
        assert [c for _, c in sorted(task.graded)] == want, rows
        assert res["correct"] == sum(w == g for w, g in zip(want, gold))


def test_no_recompilation_within_a_length_bucket(gpt256):
    model, tok = gpt256
    inner = DemoChoice(11, 60)
    convs = [c for c in inner if 64 < len(render_for_completion(tok, c)) <= 128]   # one bucket: L = 128
    assert len(convs) >= 20
    lens = [len(render_for_completion(tok, c)) for c in convs]
    short = sorted(range(len(convs)), key=lambda i: lens[i])
    a = ListTask([convs[i] for i in short[:6]])                     # the shortest prompts
    b = ListTask([convs[i] for i in short[-5:]])                    # the longest, fewer of them
    assert max(len(render_for_completion(tok, c)) for c in a.convs) < min(
        len(render_for_completion(tok, c)) for c in b.convs)
    before = chat_eval.compile_counts["categorical"]
    categorical_accuracy(model, tok, a, batch_rows=4)               # compiles (rows 4, L 128) once
    first = chat_eval.compile_counts["categorical"]
    assert first - before <= 1
    categorical_accuracy(model, tok, b, batch_rows=4)
    categorical_accuracy(model, tok, ListTask(convs[:9]), batch_rows=4)
    assert chat_eval.compile_counts["categorical"] == first
    categorical_accuracy(model, tok, a, batch_rows=8)               # a different row count does compile
    assert chat_eval.compile_counts["categorical"] == first + 1


# ------------------------------------------------------------------ generative

class FakeEngine:
    """Answers problem q with `#### q` on samples < right[q] and `#### -1` otherwise."""

    def __init__(self, tok, right, max_len=1024):
        self.tokenizer, self.max_len, self.right, self.calls = tok, max_len, right, []

    def generate(self, prompts, *, num_samples, max_tokens, temperature, top_k, seed):
        self.calls.append((len(prompts), num_samples, max_tokens, temperature, top_k, seed))
        outs = []
        for p in prompts:
            q = int(self.tokenizer.decode(p).split("Q")[1].split("<")[0])
            outs.append([SimpleNamespace(text=f"#### {q if s < self.right[q] else -1}") for s in range(num_samples)])
        return outs


def numeric_task(n, fail_at=None):
    from flaxchat.tasks.gsm8k import grade_numeric
    convs = [{"messages": [{"role": "user", "content": f"Q{q}"}, {"role": "assistant", "content": f"#### {q}"}]}
             for q in range(n)]
    return ListTask(convs, eval_type="generative", grade=grade_numeric, fail_at=fail_at)


def test_generative_grading_batches_and_pass_at_k(tok):
    right = [0, 4, 1, 2, 0, 4, 3]                                   # correct samples of 4, per problem
    engine = FakeEngine(tok, right)
    task = numeric_task(7)
    res = generative_accuracy(engine, task, num_samples=4, max_new_tokens=32, batch_problems=3, seed=10)
    assert [c[0] for c in engine.calls] == [3, 3, 1]
    assert [c[5] for c in engine.calls] == [10, 13, 16]
    assert engine.calls[0][1:5] == (4, 32, 0.0, 50)
    assert res["n"] == 7 and res["num_samples"] == 4
    assert res["accuracy"] == pytest.approx(5 / 7) and res["correct"] == 5
    assert res["pass@1"] == pytest.approx(np.mean([c / 4 for c in right]))
    assert res["pass@4"] == pytest.approx(5 / 7)
    p2 = [1 - (0 if 4 - c < 2 else {4: 6, 3: 3, 2: 1}[4 - c]) / 6 for c in right]
    assert res["pass@2"] == pytest.approx(np.mean(p2))
    assert len(task.graded) == 28
    assert res["examples"][0] == {"index": 0, "prompt": "Q0", "completion": "#### -1", "correct": False}
    one = generative_accuracy(FakeEngine(tok, right), numeric_task(7), max_problems=5, batch_problems=64)
    assert one["n"] == 5 and one["accuracy"] == pytest.approx(3 / 5) and "pass@2" not in one


def test_prompt_that_does_not_fit_is_an_error(tok):
    engine = FakeEngine(tok, [1] * 3, max_len=24)
    task = numeric_task(3)
    n_prompt = len(render_for_completion(tok, task.example(0)))
    generative_accuracy(engine, task, max_new_tokens=24 - n_prompt)     # exactly fits
    with pytest.raises(EvalError, match=r"ListTask example 0.*max_len=24.*sequence_len.*max_new_tokens"):
        generative_accuracy(engine, task, max_new_tokens=25 - n_prompt)
    assert len(engine.calls) == 1                                       # nothing generated for the failing call


def test_grading_exception_is_an_eval_error_naming_task_and_index(tok):
    with pytest.raises(EvalError, match=r"MyTask example 5: grading failed \(KeyError"):
        generative_accuracy(FakeEngine(tok, [1] * 8), numeric_task(8, fail_at=5), name="MyTask")
    stub = lambda idx: jnp.zeros(idx.shape + (400,))  # noqa: E731
    with pytest.raises(EvalError, match=r"ListTask example 2: grading failed"):
        categorical_accuracy(stub, tok, ListTask([mc(f"q{i}?", "A") for i in range(4)], fail_at=2))


@pytest.fixture(scope="module")
def engine256(gpt256):
    from flaxchat.inference.engine import Engine
    model, tok = gpt256
    return Engine(model, tok)                    # shared: its loop compiles once per batch bucket


def test_generative_with_the_real_engine(gpt256, engine256):
    _, tok = gpt256
    engine = engine256
    inner = SimpleSpelling(size=8, split="test", seed=0)
    task = ListTask([inner.example(i) for i in range(8)], eval_type="generative", grade=inner.evaluate)
    res = generative_accuracy(engine, task, max_new_tokens=12, batch_problems=4, seed=3)
    assert res["n"] == 8 and 0.0 <= res["accuracy"] <= 1.0
    prompts = [render_for_completion(tok, c) for c in task.convs]
    direct = engine.generate(prompts[:4], num_samples=1, max_tokens=12, temperature=0.0, top_k=50, seed=3)
    direct += engine.generate(prompts[4:], num_samples=1, max_tokens=12, temperature=0.0, top_k=50, seed=7)
    assert [c for _, c in sorted(task.graded)] == [s[0].text for s in direct]
    assert len({s[0].text for s in direct}) > 1                      # the prompts really steer the model
    assert res["correct"] == sum(inner.evaluate(c, s[0].text) for c, s in zip(task.convs, direct))
    with pytest.raises(EvalError, match="example 0.*max_len=256"):
        generative_accuracy(engine, task, max_new_tokens=250)


def test_evaluate_chat_model_runs_each_task_by_type(gpt256, engine256):
    model, tok = gpt256
    tasks = {"DemoChoice": DemoChoice(0, 6), "MMLU": ListTask([mc("q?", "A"), mc("r?", "B")]),
             "GSM8K": numeric_task(3)}
    logs = []
    out = evaluate_chat_model(model, tok, tasks, max_problems=-1, max_new_tokens=8, batch_rows=4, log=logs.append,
                              engine=engine256)
    assert set(out["tasks"]) == set(tasks)
    assert out["tasks"]["DemoChoice"]["eval_type"] == "categorical" and out["tasks"]["DemoChoice"]["n"] == 6
    assert out["tasks"]["GSM8K"]["eval_type"] == "generative" and "pass@1" in out["tasks"]["GSM8K"]
    assert out["chatcore_included"] == ["MMLU", "GSM8K"] and not out["chatcore_complete"]
    assert out["chatcore"] == pytest.approx(chatcore(out["accuracies"]))
    assert any(line.startswith("ChatCORE:") and "partial" in line for line in logs)
    weird = ListTask([mc("q?", "A")], eval_type="ranking")
    with pytest.raises(EvalError, match="Weird: unknown eval_type"):
        evaluate_chat_model(model, tok, {"Weird": weird})


# ------------------------------------------------------------------ ChatCORE

def test_chatcore_known_numbers():
    assert CHATCORE_BASELINES == {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0,
                                  "HumanEval": 0.0}
    acc = {"ARC-Easy": 0.5, "ARC-Challenge": 0.25, "MMLU": 0.4, "GSM8K": 0.1, "HumanEval": 0.2, "SpellingBee": 0.9}
    assert chatcore(acc) == pytest.approx((1 / 3 + 0 + 0.2 + 0.1 + 0.2) / 5)
    d = chatcore_details(acc)
    assert d["complete"] and d["missing"] == [] and "SpellingBee" not in d["centered"]
    assert chatcore({k: 1.0 for k in CHATCORE_BASELINES}) == pytest.approx(1.0)
    assert chatcore({k: b for k, b in CHATCORE_BASELINES.items()}) == pytest.approx(0.0)
    assert chatcore({"ARC-Easy": 0.0}) == pytest.approx(-1 / 3)                 # below chance is negative
    part = chatcore_details({"MMLU": 0.25, "GSM8K": 0.5, "DemoChoice": 1.0})
    assert part["chatcore"] == pytest.approx(0.25) and not part["complete"]
    assert part["missing"] == ["ARC-Easy", "ARC-Challenge", "HumanEval"]
    assert chatcore_details({"DemoChoice": 0.9})["chatcore"] is None
    with pytest.raises(ValueError, match="no ChatCORE task"):
        chatcore({"SpellingBee": 0.5})
    with pytest.raises(ValueError, match="fractions"):
        chatcore({"MMLU": 42.0})


# ------------------------------------------------------------------ DemoChoice and chat_eval_tasks

def test_demo_choice_determinism_and_rendering():
    from flaxchat.data.demo_corpus import HOMES, LEGS, SOUNDS
    a, b = DemoChoice(3, 50), DemoChoice(3, 50)
    assert [a.example(i) for i in range(50)] == [b.example(i) for i in range(50)]
    assert [a.example(i) for i in range(50)] != [DemoChoice(4, 50).example(i) for i in range(50)]
    assert [a.example(i) for i in range(50)] != [DemoChoice(3, 50, split="train").example(i) for i in range(50)]
    assert DemoChoice.eval_type == "categorical" and len(a) == 50 and len(DemoChoice(3, 50, stop=7)) == 7
    golds = set()
    for i in range(50):
        conv, item = a.example(i), a.items[i]
        assert conv["letters"] == ["A", "B", "C", "D"]
        assert conv["messages"][0]["content"] == render_mc(item["question"], "ABCD", item["choices"])
        assert conv["messages"][0]["content"].startswith("Multiple Choice question: ")
        assert "\n- " + item["choices"][0] + "=A\n" in conv["messages"][0]["content"]
        gold = conv["messages"][1]["content"]
        golds.add(gold)
        truth = item["choices"]["ABCD".index(gold)]
        animal = item["question"].split()[-2]                       # "... a spider have?" / "... an owl live?"
        table = LEGS if "legs" in item["question"] else SOUNDS if "sound" in item["question"] else HOMES
        assert str(table[animal]) == truth and len(set(item["choices"])) == 4
        assert a.evaluate(conv, gold) == 1.0 and a.evaluate(conv, next(x for x in "ABCD" if x != gold)) == 0.0
    assert golds == {"A", "B", "C", "D"}
    assert len({a.example(i)["messages"][0]["content"] for i in range(50)}) > 25   # facts and orders vary
    assert {a.items[i]["question"].split()[1] for i in range(50)} == {"many", "sound", "does"}  # all three tables


def test_chat_eval_tasks_demo_builds_offline(monkeypatch, tmp_path):
    from flaxchat.config import build_config
    from flaxchat.tasks import hf, mixtures
    from flaxchat.tasks.demo import DemoMath
    from flaxchat.tasks.spelling import SpellingBee

    def no_network(*a, **k):
        raise AssertionError("chat_eval_tasks must not download")
    monkeypatch.setattr(hf, "hf_parquet_table", no_network)
    monkeypatch.setattr(hf, "hf_parquet_files", no_network)
    cfg = build_config("demo", dotted=["tasks.demo_val=12", "tasks.demo_problems=40",
                                       f"tasks.cache_dir={tmp_path / 'never'}"])
    tasks = mixtures.chat_eval_tasks(cfg)
    assert list(tasks) == ["DemoChoice", "DemoMath"]
    assert isinstance(tasks["DemoChoice"], DemoChoice) and isinstance(tasks["DemoMath"], DemoMath)
    assert [t.eval_type for t in tasks.values()] == ["categorical", "generative"]
    assert all(len(t) == 12 for t in tasks.values())
    held_out = mixtures.rl_eval_task(cfg)
    assert [tasks["DemoMath"].example(i) for i in range(12)] == [held_out.example(i) for i in range(12)]
    for t in tasks.values():
        t.evaluate(t.example(0), "whatever")
    # the nanochat source builds lazily too: nothing fetched until an example is asked for
    cfg.tasks.source = "nanochat"
    real = mixtures.chat_eval_tasks(cfg)
    assert isinstance(real["SpellingBee"], SpellingBee)
    assert list(real) == ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
    assert [t.eval_type for t in real.values()] == ["categorical"] * 3 + ["generative"] * 3
    assert len(real["SpellingBee"]) == 256
    assert not (tmp_path / "never").exists()
