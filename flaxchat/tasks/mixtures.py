"""Which conversations each post-training stage uses, chosen from the config tree.

`cfg.tasks.source` (resolved by flaxchat.config.resolve to "demo" or "nanochat"):
* nanochat — the recipe of nanochat's chat_sft / chat_rl:
    SFT train: SmolTalk train + MMLU auxiliary_train x mmlu_epochs + GSM8K train x gsm8k_epochs
    SFT val:   SmolTalk test + MMLU test[:val_mmlu_max] + GSM8K test[:val_gsm8k_max]
    RL:        GSM8K train; RL eval: GSM8K test
  (datasets downloaded once into tasks.cache_dir through flaxchat.tasks.hf).
* demo — offline, generated: DemoChat x1 + DemoMath x2 + DemoChoice x1 for SFT, DemoMath for RL, each with a
  disjoint validation split of tasks.demo_val items (see demo.py).
Either way `tasks.user_jsonl`, when set, adds the user's conversations x user_epochs to SFT train.
Mixtures are shuffled with cfg.seed (nanochat's fixed 42 is also our default seed).

Building a task downloads nothing; HF tasks fetch their split when first indexed (TaskMixture
does that at construction to count examples), and the demo path never touches the HF code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flaxchat.tasks.base import Task, TaskError, TaskMixture

if TYPE_CHECKING:
    from flaxchat.config import PipelineConfig


def _source(cfg: "PipelineConfig") -> str:
    source = cfg.tasks.source
    if source not in ("demo", "nanochat"):
        raise TaskError(f"tasks.source={source!r} must be 'demo' or 'nanochat' (resolve the config first: "
                        f"'auto' becomes one of them)")
    return source


def _epochs(name: str, value: int) -> int:
    if value < 0:
        raise TaskError(f"tasks.{name}={value} must be >= 0 (0 leaves the task out)")
    return value


def _with_epochs(entries: list[tuple[Task, int]]) -> list[tuple[Task, int]]:
    return [(task, epochs) for task, epochs in entries if epochs > 0]


def _user_entry(cfg: "PipelineConfig") -> list[tuple[Task, int]]:
    if not cfg.tasks.user_jsonl:
        return []
    from flaxchat.tasks.user_jsonl import UserJSONL
    return [(UserJSONL(cfg.tasks.user_jsonl), _epochs("user_epochs", cfg.tasks.user_epochs))]


def sft_train_mixture(cfg: "PipelineConfig") -> TaskMixture:
    t = cfg.tasks
    if _source(cfg) == "demo":
        from flaxchat.tasks.demo import DemoChat, DemoMath
        from flaxchat.tasks.demo_choice import DemoChoice
        # DemoChoice teaches the lettered multiple-choice format the eval stage asks in (as MMLU does)
        entries = [(DemoChat(cfg.seed, t.demo_conversations), 1), (DemoMath(cfg.seed, t.demo_problems), 2),
                   (DemoChoice(cfg.seed, t.demo_problems, split="train"), 1)]
    else:
        from flaxchat.tasks.gsm8k import GSM8K
        from flaxchat.tasks.mmlu import MMLU
        from flaxchat.tasks.smoltalk import SmolTalk
        entries = [
            (SmolTalk("train", cache_dir=t.cache_dir), 1),
            (MMLU("auxiliary_train", cache_dir=t.cache_dir), _epochs("mmlu_epochs", t.mmlu_epochs)),
            (GSM8K("train", cache_dir=t.cache_dir), _epochs("gsm8k_epochs", t.gsm8k_epochs)),
        ]
    return TaskMixture(_with_epochs(entries + _user_entry(cfg)), seed=cfg.seed)


def sft_val_mixture(cfg: "PipelineConfig") -> TaskMixture:
    t = cfg.tasks
    if _source(cfg) == "demo":
        from flaxchat.tasks.demo import DemoChat, DemoMath
        entries: list[Task] = [
            DemoChat(cfg.seed, t.demo_val, split="val", train_n=t.demo_conversations),
            DemoMath(cfg.seed, t.demo_val, split="val", train_n=t.demo_problems),
        ]
    else:
        from flaxchat.tasks.gsm8k import GSM8K
        from flaxchat.tasks.mmlu import MMLU
        from flaxchat.tasks.smoltalk import SmolTalk
        entries = [
            SmolTalk("test", cache_dir=t.cache_dir),
            MMLU("test", cache_dir=t.cache_dir, stop=t.val_mmlu_max),
            GSM8K("test", cache_dir=t.cache_dir, stop=t.val_gsm8k_max),
        ]
    return TaskMixture(entries, seed=cfg.seed)


def rl_train_task(cfg: "PipelineConfig") -> Task:
    if _source(cfg) == "demo":
        from flaxchat.tasks.demo import DemoMath
        return DemoMath(cfg.seed, cfg.tasks.demo_problems)
    from flaxchat.tasks.gsm8k import GSM8K
    return GSM8K("train", cache_dir=cfg.tasks.cache_dir)


def rl_eval_task(cfg: "PipelineConfig") -> Task:
    if _source(cfg) == "demo":
        from flaxchat.tasks.demo import DemoMath
        return DemoMath(cfg.seed, cfg.tasks.demo_val, split="val", train_n=cfg.tasks.demo_problems)
    from flaxchat.tasks.gsm8k import GSM8K
    return GSM8K("test", cache_dir=cfg.tasks.cache_dir)


def chat_eval_tasks(cfg: "PipelineConfig") -> dict[str, Task]:
    """The chat model's evaluation tasks by report name (flaxchat.eval.chat_eval runs them).

    nanochat: ARC-Easy, ARC-Challenge, MMLU (test splits; categorical), GSM8K test and HumanEval
    (generative; the five ChatCORE tasks), plus SpellingBee test (256 generated problems,
    reported beside ChatCORE). demo (offline): DemoChoice (categorical, tasks.demo_val generated
    questions) and DemoMath (the held-out split `rl_eval_task` uses).
    Nothing is downloaded here: the HF tasks fetch their split when first indexed.
    """
    from flaxchat.tasks.spelling import SpellingBee
    t = cfg.tasks
    if _source(cfg) == "demo":
        from flaxchat.tasks.demo_choice import DemoChoice
        # no SpellingBee offline: the demo mixture never teaches spelling, and its spelled-out answers
        # do not fit the demo's short generation budget, so it would only ever report 0
        return {"DemoChoice": DemoChoice(cfg.seed, t.demo_val, split="test"), "DemoMath": rl_eval_task(cfg)}
    from flaxchat.tasks.arc import ARC
    from flaxchat.tasks.gsm8k import GSM8K
    from flaxchat.tasks.humaneval_task import HumanEval
    from flaxchat.tasks.mmlu import MMLU
    return {
        "ARC-Easy": ARC("ARC-Easy", "test", cache_dir=t.cache_dir),
        "ARC-Challenge": ARC("ARC-Challenge", "test", cache_dir=t.cache_dir),
        "MMLU": MMLU("test", cache_dir=t.cache_dir),
        "GSM8K": GSM8K("test", cache_dir=t.cache_dir),
        "HumanEval": HumanEval(cache_dir=t.cache_dir),
        "SpellingBee": SpellingBee(size=256, split="test", seed=cfg.seed),
    }
