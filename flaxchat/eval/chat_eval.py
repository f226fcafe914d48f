"""The chat model's task evaluations and ChatCORE (nanochat's scripts/chat_eval.py).

Two ways to score a task, chosen by its `eval_type`:

* categorical (MMLU, ARC, DemoChoice): no sampling. Each prompt (the conversation rendered up to
  <|assistant_start|>) goes through one forward pass, whose head runs on the prompt's last position
  only (`gpt_forward(..., logits_at=)`: no (rows, L, vocab) logits buffer); those logits are
  restricted to the token ids of the example's answer letters (`conversation["letters"]`, each must
  be one token), and the argmax letter is graded by `task.evaluate(conv, letter)`. As in nanochat
  this is easier than generating: only the offered letters compete, whatever else the model
  prefers. Prompts are sorted by length, right-padded with <|bos|> into a fixed (batch_rows, L)
  array with L a power of two (>= 32, capped at the model's sequence_len) and scored by one jitted
  function per (model spec, batch_rows, L, letter slots), so a whole task compiles once per length
  bucket and later calls compile nothing. A short last batch is filled with dummy rows.
* generative (GSM8K, HumanEval, SpellingBee, DemoMath): completions sampled with the batched
  `flaxchat.inference.engine.Engine` (tool use on), `batch_problems` prompts per `generate` call, each graded
  by `task.evaluate`. `accuracy` is nanochat's: the share of problems where *any* of the
  num_samples completions passes (pass@num_samples; pass@1 when num_samples == 1); pass@k for
  k = 1, 2, 4, ... <= num_samples uses the unbiased estimator (flaxchat.train.generative.pass_at_k).

Length policy (generative): every prompt must leave room for the full answer budget,
len(prompt) + max_new_tokens <= engine.max_len (the model's sequence_len), checked for all
problems before anything is generated; otherwise `EvalError` names the task, the example and the
fix (raise model.sequence_len or lower max_new_tokens). Letting long prompts answer in fewer
tokens would score them on a different budget without saying so. Categorical prompts must fit
the model's sequence_len.

Errors are never scored: a failure to build, render or grade an example (including an exception
inside `task.evaluate`) raises `EvalError` naming the task and the example index.

ChatCORE (nanochat): the mean over ARC-Easy, ARC-Challenge, MMLU (baseline 0.25: 1 of 4 letters)
and GSM8K, HumanEval (baseline 0) of the centered accuracy (acc - b) / (1 - b), so 0 is chance and
1 is perfect. SpellingBee and the demo tasks are reported beside it, not in it. `chatcore` averages
over the ChatCORE tasks present (nanochat prints nothing unless all five ran);
`chatcore_details` and `evaluate_chat_model` say which were included and which were missing, and
`complete` is True only when all five were.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxchat.chat_format import render_for_completion
from flaxchat.eval.bundle import EvalError  # the eval package's one error type (re-exported here)
from flaxchat.train.generative import pass_at_k

__all__ = ["CHATCORE_BASELINES", "EvalError", "categorical_accuracy", "chatcore", "chatcore_details",
           "evaluate_chat_model", "generative_accuracy"]


CHATCORE_BASELINES: dict[str, float] = {
    "ARC-Easy": 0.25,       # multiple choice, 1 of 4
    "ARC-Challenge": 0.25,
    "MMLU": 0.25,
    "GSM8K": 0.0,           # open-ended
    "HumanEval": 0.0,
}

MIN_BUCKET = 32             # smallest padded prompt length of a categorical batch
MIN_LETTER_SLOTS = 4        # letter slots per row (padded; ARC rows with 5 choices use 8)
# trace counts of the categorical scorer (a trace is a compilation); tests read this
compile_counts: Counter[str] = Counter()


def _next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, (int(n) - 1).bit_length()))


def _task_name(task: Any, name: str | None) -> str:
    return name or getattr(task, "name", type(task).__name__)


def _num_problems(task: Any, max_problems: int, name: str) -> int:
    total = len(task)
    n = total if max_problems is None or max_problems < 0 else min(int(max_problems), total)
    if n < 1:
        raise EvalError(f"{name}: nothing to evaluate ({total} examples, max_problems={max_problems})")
    return n


# ------------------------------------------------------------------------------------ categorical

def _choose(last_logits: jax.Array, letter_ids: jax.Array, letter_mask: jax.Array) -> jax.Array:
    """(R,V) logits, (R,K) letter ids and mask -> (R,) index of the best offered letter (first on ties)."""
    focus = jnp.take_along_axis(last_logits.astype(jnp.float32), letter_ids, axis=1)
    return jnp.argmax(jnp.where(letter_mask, focus, -jnp.inf), axis=-1)


@functools.partial(jax.jit, static_argnames=("spec",))
def _gpt_choose(params, idx, last, letter_ids, letter_mask, *, spec):
    from flaxchat.model.gpt import gpt_forward
    compile_counts["categorical"] += 1
    last_logits = gpt_forward(params, spec, idx, logits_at=last)  # (R,V) fp32, each row at its own last position
    return _choose(last_logits, letter_ids, letter_mask)


@functools.partial(jax.jit, static_argnames=("fn",))
def _callable_choose(idx, last, letter_ids, letter_mask, *, fn):
    compile_counts["categorical"] += 1
    logits = fn(idx)
    return _choose(logits[jnp.arange(idx.shape[0]), last], letter_ids, letter_mask)


def _scorer(model: Any) -> tuple[Callable[..., jax.Array], int | None]:
    """(choose(idx, last, letter_ids, letter_mask) -> (R,) choices, max prompt length or None).

    A GPT (anything with `spec` and `param_tree()`) runs `gpt_forward` on its current params; any
    other callable is taken as a pure function idx (R,L) -> logits (R,L,V) (tests use a stub)."""
    if hasattr(model, "param_tree") and hasattr(model, "spec"):
        params, spec = model.param_tree(), model.spec
        return (lambda *a: _gpt_choose(params, *a, spec=spec)), spec.sequence_len
    if callable(model):
        return (lambda *a: _callable_choose(*a, fn=model)), None
    raise TypeError(f"model must be a GPT (spec + param_tree) or a callable idx -> logits, got {type(model).__name__}")


def _letter_id(tokenizer: Any, letter: str, cache: dict[str, int]) -> int:
    if letter not in cache:
        ids = tokenizer.encode(letter)
        if len(ids) != 1:
            raise EvalError(f"answer letter {letter!r} encodes to {len(ids)} tokens {ids}; categorical "
                            f"evaluation needs each letter to be a single token")
        cache[letter] = int(ids[0])
    return cache[letter]


def categorical_accuracy(model: Any, tokenizer: Any, task: Any, *, max_problems: int = -1, batch_rows: int = 16,
                         name: str | None = None) -> dict[str, Any]:
    """nanochat's categorical eval of the first max_problems (-1: all) examples of `task`.

    -> {"accuracy", "n", "correct"}. `model` is a GPT (scored with its current params) or, for
    tests, a pure callable idx (R,L) int32 -> logits (R,L,V). See the module docstring."""
    name = _task_name(task, name)
    if batch_rows < 1:
        raise ValueError(f"batch_rows={batch_rows} must be >= 1")
    n = _num_problems(task, max_problems, name)
    choose, max_len = _scorer(model)
    bos = tokenizer.bos_token_id
    cache: dict[str, int] = {}
    convs, prompts, letter_ids = [], [], []
    for i in range(n):
        try:
            conv = task.example(i)
            letters = conv.get("letters")
            if not letters:
                raise EvalError(f"the conversation has no 'letters' (is {name} a multiple-choice task?)")
            ids = [_letter_id(tokenizer, letter, cache) for letter in letters]
            prompt = render_for_completion(tokenizer, conv)
        except Exception as e:
            raise EvalError(f"{name} example {i}: could not prepare it for categorical evaluation: {e}") from e
        if max_len is not None and len(prompt) > max_len:
            raise EvalError(f"{name} example {i}: the prompt has {len(prompt)} tokens, more than the model's "
                            f"sequence_len={max_len}; raise model.sequence_len or leave the task out")
        convs.append(conv)
        prompts.append(prompt)
        letter_ids.append(ids)

    K = _next_pow2(max(len(x) for x in letter_ids), MIN_LETTER_SLOTS)
    order = sorted(range(n), key=lambda i: len(prompts[i]))      # similar lengths share a bucket
    picks = np.zeros(n, np.int64)
    for start in range(0, n, batch_rows):
        chunk = order[start:start + batch_rows]
        L = _next_pow2(max(len(prompts[i]) for i in chunk), MIN_BUCKET)
        if max_len is not None:
            L = min(L, max_len)
        idx = np.full((batch_rows, L), bos, np.int32)
        last = np.zeros(batch_rows, np.int32)
        lid = np.zeros((batch_rows, K), np.int32)
        mask = np.zeros((batch_rows, K), bool)
        mask[:, 0] = True                                          # dummy rows: any valid answer
        for r, i in enumerate(chunk):
            p = prompts[i]
            idx[r, :len(p)], last[r] = p, len(p) - 1
            lid[r, :len(letter_ids[i])] = letter_ids[i]
            mask[r, :len(letter_ids[i])] = True
        chosen = np.asarray(choose(idx, last, lid, mask))
        picks[chunk] = chosen[:len(chunk)]

    correct = 0
    for i, conv in enumerate(convs):
        letter = conv["letters"][int(picks[i])]
        correct += int(_grade(task, name, i, conv, letter) > 0)
    return {"accuracy": correct / n, "n": n, "correct": correct}


def _grade(task: Any, name: str, i: int, conv: dict, completion: str) -> float:
    try:
        return float(task.evaluate(conv, completion))
    except Exception as e:
        raise EvalError(f"{name} example {i}: grading failed ({type(e).__name__}: {e}); the example was not "
                        f"scored — fix the task's evaluate or leave the example out") from e


# ------------------------------------------------------------------------------------ generative

def _user_text(conv: dict) -> str:
    users = [m.get("content") for m in conv.get("messages", []) if m.get("role") == "user"]
    return users[-1] if users and isinstance(users[-1], str) else ""


def _ks(num_samples: int) -> list[int]:
    return sorted({1, *[k for k in (2, 4, 8, 16, 32, 64) if k <= num_samples], num_samples})


def generative_accuracy(engine: Any, task: Any, *, max_problems: int = -1, num_samples: int = 1,
                        max_new_tokens: int = 512, temperature: float = 0.0, top_k: int = 50,
                        batch_problems: int = 64, seed: int = 0, name: str | None = None,
                        keep_examples: int = 3) -> dict[str, Any]:
    """Sample num_samples completions per problem with `engine` (an Engine, or anything with
    `.generate`, `.tokenizer` and `.max_len`), grade each with `task.evaluate`.

    -> {"accuracy" (problems with any passing sample), "n", "correct", "num_samples",
    "pass@k" for k = 1, 2, 4, ... <= num_samples, "examples" (the first keep_examples: prompt,
    first completion, whether it passed)}. Call i of generate uses seed + (index of its first
    problem), so greedy results do not depend on batch_problems; sampled ones do."""
    name = _task_name(task, name)
    if batch_problems < 1 or num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_problems={batch_problems}, num_samples={num_samples} and "
                         f"max_new_tokens={max_new_tokens} must all be >= 1")
    n = _num_problems(task, max_problems, name)
    tokenizer, max_len = engine.tokenizer, int(engine.max_len)
    convs, prompts = [], []
    for i in range(n):
        try:
            conv = task.example(i)
            prompt = render_for_completion(tokenizer, conv)
        except Exception as e:
            raise EvalError(f"{name} example {i}: could not render its prompt: {e}") from e
        if len(prompt) + max_new_tokens > max_len:
            raise EvalError(f"{name} example {i}: its prompt has {len(prompt)} tokens, and with "
                            f"max_new_tokens={max_new_tokens} it needs {len(prompt) + max_new_tokens} > the engine's "
                            f"max_len={max_len}; raise model.sequence_len or lower max_new_tokens "
                            f"(eval.max_new_tokens), or leave the task out")
        convs.append(conv)
        prompts.append(prompt)

    outcomes = np.zeros((n, num_samples), bool)
    examples = []
    for start in range(0, n, batch_problems):
        stop = min(start + batch_problems, n)
        outs = engine.generate(prompts[start:stop], num_samples=num_samples, max_tokens=max_new_tokens,
                               temperature=temperature, top_k=top_k, seed=seed + start)
        if len(outs) != stop - start:
            raise EvalError(f"{name}: the engine returned {len(outs)} results for {stop - start} prompts")
        for j, samples in enumerate(outs):
            i = start + j
            if len(samples) != num_samples:
                raise EvalError(f"{name} example {i}: the engine returned {len(samples)} samples, "
                                f"expected {num_samples}")
            for s, completion in enumerate(samples):
                outcomes[i, s] = _grade(task, name, i, convs[i], completion.text) > 0
            if len(examples) < keep_examples:
                examples.append({"index": i, "prompt": _user_text(convs[i]),
                                 "completion": samples[0].text, "correct": bool(outcomes[i, 0])})

    counts = outcomes.sum(axis=1)
    result: dict[str, Any] = {"accuracy": float(np.mean(counts > 0)), "n": n, "correct": int((counts > 0).sum()),
                              "num_samples": num_samples}
    for k in _ks(num_samples):
        result[f"pass@{k}"] = float(np.mean([pass_at_k(num_samples, int(c), k) for c in counts]))
    result["examples"] = examples
    return result


# ------------------------------------------------------------------------------------ ChatCORE

def chatcore_details(accuracies: Mapping[str, float]) -> dict[str, Any]:
    """{"chatcore" (None when no ChatCORE task is present), "centered" per included task,
    "included", "missing", "complete"}; tasks outside CHATCORE_BASELINES are ignored."""
    centered = {}
    for task, base in CHATCORE_BASELINES.items():
        if task in accuracies:
            acc = float(accuracies[task])
            if not 0.0 <= acc <= 1.0:
                raise ValueError(f"accuracy of {task} is {acc}; accuracies are fractions in [0, 1]")
            centered[task] = (acc - base) / (1.0 - base)
    missing = [t for t in CHATCORE_BASELINES if t not in centered]
    return {"chatcore": float(np.mean(list(centered.values()))) if centered else None,
            "centered": centered, "included": list(centered), "missing": missing, "complete": not missing}


def chatcore(accuracies: Mapping[str, float]) -> float:
    """nanochat's ChatCORE: the mean centered accuracy over the ChatCORE tasks in `accuracies`.

    With some of the five missing it is the mean over those present (not comparable with a full
    ChatCORE: check `chatcore_details(...)["complete"]`); with none present it raises ValueError."""
    details = chatcore_details(accuracies)
    if details["chatcore"] is None:
        raise ValueError(f"no ChatCORE task among {sorted(accuracies)}; ChatCORE needs some of "
                         f"{list(CHATCORE_BASELINES)}")
    return details["chatcore"]


# ------------------------------------------------------------------------------------ all tasks

def evaluate_chat_model(model: Any, tokenizer: Any, tasks: Mapping[str, Any], *, max_problems: int = -1,
                        max_new_tokens: int = 512, batch_rows: int = 16, batch_problems: int = 64,
                        num_samples: int = 1, temperature: float = 0.0, top_k: int = 50, seed: int = 0,
                        engine: Any = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every task by its eval_type (nanochat's defaults: greedy, top_k 50, one sample).

    -> {"tasks": {name: result + eval_type, seconds}, "accuracies": {name: accuracy},
        "chatcore": float or None, "chatcore_complete": bool, "chatcore_included": [...],
        "chatcore_missing": [...], "centered": {...}}.
    `engine` reuses an existing Engine for the generative tasks (else one is built on first need
    with max_len = the model's sequence_len)."""
    results: dict[str, Any] = {}
    for name, task in tasks.items():
        kind = getattr(task, "eval_type", None)
        t0 = time.perf_counter()
        if kind == "categorical":
            res = categorical_accuracy(model, tokenizer, task, max_problems=max_problems, batch_rows=batch_rows,
                                       name=name)
        elif kind == "generative":
            if engine is None:
                from flaxchat.inference.engine import Engine
                engine = Engine(model, tokenizer)
            res = generative_accuracy(engine, task, max_problems=max_problems, num_samples=num_samples,
                                      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                      batch_problems=batch_problems, seed=seed, name=name)
        else:
            raise EvalError(f"{name}: unknown eval_type {kind!r}; a task is 'categorical' or 'generative'")
        res = {"eval_type": kind, **res, "seconds": time.perf_counter() - t0}
        results[name] = res
        if log is not None:
            log(f"{name}: {100 * res['accuracy']:.2f}% of {res['n']} ({kind}, {res['seconds']:.1f}s)")
    accuracies = {name: r["accuracy"] for name, r in results.items()}
    details = chatcore_details(accuracies)
    if log is not None and details["chatcore"] is not None:
        note = "" if details["complete"] else f" (partial: missing {', '.join(details['missing'])})"
        log(f"ChatCORE: {details['chatcore']:.4f}{note}")
    return {"tasks": results, "accuracies": accuracies, "chatcore": details["chatcore"],
            "chatcore_complete": details["complete"], "chatcore_included": details["included"],
            "chatcore_missing": details["missing"], "centered": details["centered"]}
