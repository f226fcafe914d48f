"""The CORE metric (DCLM, arXiv 2406.11794) as nanochat's core_eval.py / base_eval.py compute it.

Per example (nanochat's behaviour, reproduced):
  * few-shot examples: `random.Random(1234 + idx).sample([all other indices], num_fewshot)` over
    the task's (shuffled, then `max_examples`-truncated) example list, never the item itself;
  * prompts (nanochat's jinja templates, written out as string formatting):
      multiple_choice    "".join(f"{q}{d}{choices[gold]}\\n\\n" for shots) + f"{query}{d}{choice}", one per choice
      schema             "".join(f"{options[gold]}{d}{cont}\\n\\n" for shots) + f"{option}{d}{continuation}", one per option
      language_modeling  shots as f"{context.strip()}{d}{continuation}\\n\\n"; two prompts, without the
                         continuation (the whole string .strip()-ed) and with it;
  * tokens: BOS + tokenizer.encode(prompt); the scored span is the tokens after the common prefix
    (multiple_choice), the common suffix (schema), or after the without-prompt (language_modeling);
  * rows longer than the model's sequence_len are cut from the LEFT, span indices shifted;
  * multiple_choice / schema: correct if the option with the lowest MEAN loss over its span is
    `gold` (first of equal minima); language_modeling: correct only if the greedy argmax
    reproduces every span token;
  * centered accuracy (acc - b) / (1 - b), b = random baseline; CORE = mean centered accuracy.

How it runs: every task's rows (one per option) are prepared on the host, grouped by length bucket
(a power of two, >= 32, <= sequence_len), and scored `batch_rows` rows at a time (padded with
BOS) by ONE jitted function returning per-position losses and argmax predictions from a single
forward, so a whole CORE run compiles at most one program per bucket. Its head runs chunk by chunk
(`gpt.gpt_nll_argmax`): the (rows, L, vocab) fp32 logits are never stored (8.06 -> 0.67 GiB
of compiled temp memory at 16 rows x 2048 tokens, vocab 65536). Batches are dispatched one
ahead of the host reduction (JAX's async dispatch overlaps the two). Any example that cannot be
prepared raises `EvalError` naming the task label and the example index; nothing is silently scored.

Difference from nanochat: nanochat truncates only models exposing `max_seq_len` (its HF GPT-2
wrapper, not its own GPT); here every model is cut at its `spec.sequence_len` (or `max_len=`).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxchat.eval.bundle import CoreTask, EvalError
from flaxchat.model.gpt import gpt_nll_argmax

FEWSHOT_SEED = 1234
MIN_BUCKET = 32

# --------------------------------------------------------------------------- prompts (pure)


def fewshot_examples(task: CoreTask, idx: int) -> list[dict[str, Any]]:
    """nanochat's few-shot draw for example `idx`: Random(1234 + idx) samples from the other items."""
    if task.num_fewshot <= 0:
        return []
    available = [i for i in range(len(task.examples)) if i != idx]
    if task.num_fewshot > len(available):
        raise EvalError(f"{task.num_fewshot}-shot needs more than {len(task.examples)} examples")
    rng = random.Random(FEWSHOT_SEED + idx)
    return [task.examples[i] for i in rng.sample(available, task.num_fewshot)]


def render_prompts(task: CoreTask, item: dict[str, Any], fewshot: Sequence[dict[str, Any]] = ()) -> list[str]:
    """The prompt strings nanochat's templates render for `item`: one per choice (multiple_choice),
    one per context option (schema), or [without continuation (stripped), with it] (language_modeling)."""
    d = task.continuation_delimiter
    if task.task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{option}{d}{item['continuation']}" for option in item["context_options"]]
    if task.task_type == "language_modeling":
        shots = "".join(f"{str(ex['context']).strip()}{d}{ex['continuation']}\n\n" for ex in fewshot)
        head = f"{shots}{str(item['context']).strip()}{d}"
        return [head.strip(), f"{head}{item['continuation']}"]
    raise EvalError(f"unknown task type {task.task_type!r}")


def common_length(seqs: Sequence[Sequence[int]], direction: str = "left") -> int:
    """Length of the common prefix ('left') or suffix ('right') of all sequences."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        j = i if direction == "left" else -1 - i
        tok = seqs[0][j]
        if any(s[j] != tok for s in seqs):
            return i
    return n


def continuation_spans(task_type: str, tokens: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """(starts, ends) of the scored token span of each row; for language_modeling `tokens` is
    [without, with] and the one span is of the `with` row. Raises EvalError on an empty span."""
    if task_type == "multiple_choice":
        start = common_length(tokens, "left")
        starts, ends = [start] * len(tokens), [len(t) for t in tokens]
    elif task_type == "schema":
        suffix = common_length(tokens, "right")
        ends = [len(t) for t in tokens]
        starts = [e - suffix for e in ends]
    elif task_type == "language_modeling":
        without, with_ = tokens
        if list(with_[:len(without)]) != list(without):
            raise EvalError("the prompt without the continuation does not tokenize to a prefix of the prompt with it")
        starts, ends = [len(without)], [len(with_)]
    else:
        raise EvalError(f"unknown task type {task_type!r}")
    for i, (s, e) in enumerate(zip(starts, ends)):
        if e <= s:
            raise EvalError(f"option {i} has an empty continuation span (its tokens are all shared with the others)")
        if s < 1:
            raise EvalError(f"option {i}'s continuation has no preceding token")
    return starts, ends


def truncate_left(tokens: Sequence[Sequence[int]], starts: Sequence[int], ends: Sequence[int], max_len: int
                  ) -> tuple[list[list[int]], list[int], list[int]]:
    """Keep the last max_len tokens of each row, shifting its span; the span must keep a preceding token."""
    out_t, out_s, out_e = [], [], []
    for t, s, e in zip(tokens, starts, ends):
        crop = max(0, len(t) - max_len)
        if s - crop < 1:
            raise EvalError(f"the continuation ({e - s} tokens) does not fit in {max_len} tokens with context")
        out_t.append(list(t[crop:]))
        out_s.append(s - crop)
        out_e.append(e - crop)
    return out_t, out_s, out_e


@dataclasses.dataclass
class PreparedExample:
    """Rows to score for one example (one per option; one for language_modeling) and their spans."""
    tokens: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int | None


def _check_gold(task: CoreTask, item: dict[str, Any]) -> int | None:
    if task.task_type == "language_modeling":
        return None
    n = len(item["choices"] if task.task_type == "multiple_choice" else item["context_options"])
    gold = item["gold"]
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < n:
        raise EvalError(f"gold {gold!r} is not an index into its {n} options")
    if n < 2:
        raise EvalError(f"needs at least 2 options, has {n}")
    return gold


def _render_all(task: CoreTask) -> list[list[str]]:
    out = []
    for idx, item in enumerate(task.examples):
        try:
            _check_gold(task, item)
            out.append(render_prompts(task, item, fewshot_examples(task, idx)))
        except Exception as e:
            raise EvalError(f"task {task.label}: example {idx}: {e}") from e
    return out


def prepare_examples(task: CoreTask, tokenizer, max_len: int) -> list[PreparedExample]:
    """Render, tokenize (BOS first, one batched encode), find spans and left-truncate every example."""
    prompts = _render_all(task)
    bos = tokenizer.bos_token_id
    flat = [p for ps in prompts for p in ps]
    try:
        flat_tokens = tokenizer.encode(flat, prepend=bos) if flat else []
    except Exception:
        flat_tokens = None                     # find the example that fails, below
    out, pos = [], 0
    for idx, ps in enumerate(prompts):
        try:
            if flat_tokens is None:
                toks = tokenizer.encode(ps, prepend=bos)
            else:
                toks = flat_tokens[pos:pos + len(ps)]
            pos += len(ps)
            starts, ends = continuation_spans(task.task_type, toks)
            if task.task_type == "language_modeling":
                toks = [toks[1]]
            toks, starts, ends = truncate_left(toks, starts, ends, max_len)
            out.append(PreparedExample(toks, starts, ends, _check_gold(task, task.examples[idx])))
        except Exception as e:
            raise EvalError(f"task {task.label}: example {idx}: {e}") from e
    return out


# --------------------------------------------------------------------------- scoring

TRACE_COUNT = [0]        # times _score_rows was traced (= compiled programs); tests read it


@functools.partial(jax.jit, static_argnums=0)
def _score_rows(spec, params, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """tokens (R,L) int32 -> (losses (R,L) fp32, argmax (R,L) int32) from one forward. losses[:, t]
    is the cross-entropy of tokens[:, t+1] (NaN in the last column, as nanochat); argmax[:, t] the
    greedy prediction for position t+1."""
    TRACE_COUNT[0] += 1
    losses, top = gpt_nll_argmax(params, spec, tokens, jnp.roll(tokens, -1, axis=1))   # (R,L,V) logits never stored
    return losses.at[:, -1].set(jnp.nan), top


def model_max_len(model) -> int:
    spec = getattr(model, "spec", None)
    if spec is None or not getattr(spec, "sequence_len", None):
        raise TypeError(f"{type(model).__name__} has no spec.sequence_len; pass max_len=")
    return int(spec.sequence_len)


def make_scorer(model) -> Callable[[np.ndarray], tuple[Any, Any]]:
    """fn(tokens (R,L) int32 numpy) -> (losses, argmax), possibly still-running device arrays.
    Models are anything with a ModelSpec `spec` and `param_tree()` (flaxchat.model.gpt.GPT, engine test models)."""
    if not (hasattr(model, "spec") and hasattr(model, "param_tree")):
        raise TypeError(f"{type(model).__name__} is not a GPT (needs .spec and .param_tree())")
    spec, params = model.spec, model.param_tree()
    return lambda tokens: _score_rows(spec, params, jnp.asarray(tokens, jnp.int32))


def bucket_len(n: int, max_len: int) -> int:
    """Row length for an n-token row: next power of two, at least 32, at most max_len."""
    return min(max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()), max_len)


def score_rows(scorer, rows: Sequence[Sequence[int]], starts: Sequence[int], ends: Sequence[int], *,
               max_len: int, pad_id: int, batch_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean loss over each row's span, whether argmax reproduces every span token) for all rows,
    scored in fixed (batch_rows, bucket) batches grouped by length bucket."""
    n = len(rows)
    mean_loss = np.full(n, np.nan, np.float64)
    exact = np.zeros(n, bool)
    by_bucket: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_bucket.setdefault(bucket_len(len(r), max_len), []).append(i)
    jobs = []
    for L in sorted(by_bucket):
        ids = by_bucket[L]
        for k in range(0, len(ids), batch_rows):
            jobs.append((L, ids[k:k + batch_rows]))

    def reduce(L: int, ids: list[int], tokens: np.ndarray, result) -> None:
        losses, preds = (np.asarray(x) for x in result)
        pos = np.arange(L)[None, :]
        s = np.asarray([starts[i] for i in ids])[:, None]
        e = np.asarray([ends[i] for i in ids])[:, None]
        m = len(ids)
        mask = (pos >= s - 1) & (pos < e - 1)                       # position t predicts token t+1
        target = np.roll(tokens[:m], -1, axis=1)
        mean_loss[ids] = np.where(mask, losses[:m], 0.0).sum(1, dtype=np.float64) / mask.sum(1)
        exact[ids] = np.where(mask, preds[:m] == target, True).all(1)

    pending = None
    for L, ids in jobs:
        tokens = np.full((batch_rows, L), pad_id, np.int32)
        for j, i in enumerate(ids):
            tokens[j, :len(rows[i])] = rows[i]
        result = scorer(tokens)                 # async on device; reduce the previous batch meanwhile
        if pending is not None:
            reduce(*pending)
        pending = (L, ids, tokens, result)
    if pending is not None:
        reduce(*pending)
    return mean_loss, exact


def centered(accuracy: float, random_baseline: float) -> float:
    return (accuracy - random_baseline) / (1.0 - random_baseline)


def evaluate_task(model, tokenizer, task: CoreTask, *, max_examples: int = -1, batch_rows: int = 16,
                  max_len: int | None = None, scorer=None) -> dict[str, Any]:
    """Accuracy of `model` on one CORE task -> {accuracy, centered, n, random_baseline, seconds}.
    max_examples > 0 keeps the first that many (of the bundle's shuffled order), as nanochat's
    max_per_task; few-shot draws then come from those only, as in nanochat."""
    t0 = time.perf_counter()
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    if max_examples > 0:
        task = dataclasses.replace(task, examples=task.examples[:max_examples])
    max_len = int(max_len) if max_len else model_max_len(model)
    scorer = scorer or make_scorer(model)
    prepared = prepare_examples(task, tokenizer, max_len)
    rows, starts, ends, owner = [], [], [], []
    for k, ex in enumerate(prepared):
        rows += ex.tokens
        starts += ex.starts
        ends += ex.ends
        owner += [k] * len(ex.tokens)
    mean_loss, exact = score_rows(scorer, rows, starts, ends, max_len=max_len, pad_id=tokenizer.bos_token_id,
                                  batch_rows=batch_rows)
    correct = np.zeros(len(prepared), bool)
    first = 0
    for k, ex in enumerate(prepared):
        sl = slice(first, first + len(ex.tokens))
        first += len(ex.tokens)
        if task.task_type == "language_modeling":
            correct[k] = exact[sl][0]
        else:
            losses = mean_loss[sl]
            if not np.all(np.isfinite(losses)):
                raise EvalError(f"task {task.label}: example {k}: non-finite option losses {losses.tolist()}")
            correct[k] = int(np.argmin(losses)) == ex.gold
    acc = float(correct.mean()) if len(correct) else float("nan")
    return {"accuracy": acc, "centered": centered(acc, task.random_baseline), "n": len(prepared),
            "random_baseline": task.random_baseline, "seconds": time.perf_counter() - t0}


def evaluate_core(model, tokenizer, tasks: Sequence[CoreTask], *, max_examples: int = -1, batch_rows: int = 16,
                  max_len: int | None = None, log: Callable[[str], None] | None = None, scorer=None
                  ) -> dict[str, Any]:
    """All tasks -> {"core": mean centered accuracy, "tasks": {label: evaluate_task's dict}}.
    `scorer` (default make_scorer(model)) maps (R,L) int32 tokens to (losses, argmax) as _score_rows."""
    if not tasks:
        raise EvalError("no CORE tasks to evaluate")
    scorer = scorer or make_scorer(model)
    results = {}
    for task in tasks:
        r = evaluate_task(model, tokenizer, task, max_examples=max_examples, batch_rows=batch_rows,
                          max_len=max_len, scorer=scorer)
        results[task.label] = r
        if log is not None:
            log(f"{task.label} ({task.num_fewshot}-shot, {task.task_type}): accuracy {r['accuracy']:.4f} | "
                f"centered {r['centered']:.4f} | n {r['n']} | {r['seconds']:.2f}s")
    core = float(np.mean([r["centered"] for r in results.values()]))
    return {"core": core, "tasks": results}


__all__ = ["fewshot_examples", "render_prompts", "continuation_spans", "common_length", "truncate_left",
           "prepare_examples", "make_scorer", "score_rows", "bucket_len", "centered", "evaluate_task",
           "evaluate_core", "TRACE_COUNT", "EvalError"]
