"""flaxchat.rl.rollouts: rollout rows (who authored which token), and the GRPO batch source
(micro-batch layout, advantages, the round cursor, prompt sharding, the rollout report).

The source runs a tiny random GPT through the real compiled engine on a tiny task whose reward is
a known function of the completion text, so every number it reports can be recomputed here.
"""

import numpy as np
import pytest

from flaxchat.chat_format import render_for_completion
from flaxchat.config import RLConfig
from flaxchat.inference.engine import Engine
from flaxchat.rl.advantages import compute_advantages
from flaxchat.rl.rollouts import RolloutSource, completion_row
from flaxchat.tasks.base import Task
from tiny_models import MAX_LEN, TinyModel, tiny_tokenizer

PAD = 0


# ---------------------------------------------------------------------------- completion_row
def test_completion_row_targets_only_sampled_tokens():
    prompt = [10, 11, 12]
    #          sampled  | forced tool output | sampled, incl. the final stop token
    tokens = [20, 21, 30, 31, 32, 22, 99]
    forced = [0, 0, 1, 1, 1, 0, 0]
    inputs, targets, mask = completion_row(prompt, tokens, forced, row_len=12, pad_id=PAD)
    assert inputs.shape == targets.shape == mask.shape == (12,)
    assert inputs.dtype == np.int32 and targets.dtype == np.int32
    seq = prompt + tokens
    assert inputs.tolist() == seq + [PAD] * (12 - len(seq))
    # position i predicts seq[i+1]: the prompt is given (-1), the first sampled token is the target
    # at the last prompt position, forced output and padding are -1, the stop token is a target
    want = [-1, -1, 20, 21, -1, -1, -1, 22, 99, -1, -1, -1]
    assert targets.tolist() == want
    assert mask.tolist() == [int(t != -1) for t in want]


def test_completion_row_truncates_at_row_len():
    prompt = [10, 11, 12]
    tokens = [20, 21, 22, 23, 24, 25, 26]
    forced = [0] * 7
    inputs, targets, mask = completion_row(prompt, tokens, forced, row_len=6, pad_id=PAD)
    assert inputs.tolist() == [10, 11, 12, 20, 21, 22]
    assert targets.tolist() == [-1, -1, 20, 21, 22, 23]        # the 7th kept token is the last target
    assert mask.tolist() == [0, 0, 1, 1, 1, 1]
    # a row exactly full: prompt + tokens == row_len + 1
    inputs, targets, _ = completion_row([10], [20, 21, 22], [0, 1, 0], row_len=3, pad_id=PAD)
    assert inputs.tolist() == [10, 20, 21] and targets.tolist() == [20, -1, 22]
    # a prompt that already fills the row leaves nothing to learn
    inputs, targets, mask = completion_row([1, 2, 3, 4, 5], [6, 7], [0, 0], row_len=4, pad_id=PAD)
    assert inputs.tolist() == [1, 2, 3, 4] and targets.tolist() == [-1] * 4 and not mask.any()


def test_completion_row_empty_completion_is_all_ignored():
    inputs, targets, mask = completion_row([5, 6], [], [], row_len=5, pad_id=PAD)
    assert inputs.tolist() == [5, 6, PAD, PAD, PAD]
    assert targets.tolist() == [-1] * 5 and not mask.any()


# ---------------------------------------------------------------------------- RolloutSource
WORDS = ["the cat", "a dog", "the big mat", "red cat sat", "a mat", "dog ran", "the sum", "big red dog"]


class LengthTask(Task):
    """Prompts from WORDS; reward = len(completion) % 3 (known, and it varies between samples).
    Every reward call is recorded, in the order the source grades (prompt-major, then sample)."""

    def __init__(self, n=len(WORDS)):
        super().__init__()
        self.n = n
        self.graded: list[tuple[str, str, float]] = []

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": WORDS[index % len(WORDS)] + f" {index}"},
                             {"role": "assistant", "content": "ok"}]}

    def reward(self, conversation, completion):
        r = float(len(completion) % 3)
        self.graded.append((conversation["messages"][0]["content"], completion, r))
        return r


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(with_sums=True)


@pytest.fixture(scope="module")
def engine(tok):
    return Engine(TinyModel(tok.vocab_size), tok, max_len=MAX_LEN)


def rl_config(**kw):
    base = dict(prompts_per_step=4, samples_per_prompt=2, max_new_tokens=8, temperature=1.0, top_k=0,
                advantage="drgrpo", updates_per_batch=1)
    return RLConfig(**{**base, **kw})


def make_source(engine, task, rl, **kw):
    records = []
    kw.setdefault("rows_per_micro", 4)
    src = RolloutSource(engine, task, rl, seed=7, row_len=MAX_LEN, emit=lambda k, r: records.append((k, r)), **kw)
    return src, records


def test_round_layout_advantages_and_report(engine, tok):
    task = LengthTask()
    rl = rl_config()
    src, records = make_source(engine, task, rl)
    P, G, R, T = 4, 2, 4, MAX_LEN
    assert src.num_micro == P * G // R == 2 and src.micro_per_round == 2
    it = iter(src)
    micro = [next(it) for _ in range(src.num_micro)]
    for mb in micro:
        assert set(mb) == {"inputs", "targets", "advantages", "weights"}      # no logp_fn: no old_logp
        assert mb["inputs"].shape == mb["targets"].shape == mb["weights"].shape == (R, T)
        assert mb["advantages"].shape == (R,)
        assert mb["inputs"].dtype == mb["targets"].dtype == np.int32
        assert mb["advantages"].dtype == mb["weights"].dtype == np.float32

    # rewards exactly as graded (prompt-major), advantages = drgrpo of them, each group sums to ~0
    assert len(task.graded) == P * G
    rewards = np.array([r for _, _, r in task.graded], np.float32).reshape(P, G)
    adv = np.concatenate([mb["advantages"] for mb in micro]).reshape(P, G)
    np.testing.assert_allclose(adv, compute_advantages(rewards, "drgrpo"), atol=0)
    np.testing.assert_allclose(adv.sum(axis=1), 0.0, atol=1e-6)
    assert np.abs(adv).max() > 0, "the test task should give some group differing rewards"

    # rows: the rendered prompt, then the completion; loss only on sampled tokens
    order = src.prompt_indices(0)
    inputs = np.concatenate([mb["inputs"] for mb in micro])
    targets = np.concatenate([mb["targets"] for mb in micro])
    weights = np.concatenate([mb["weights"] for mb in micro])
    for row in range(P * G):
        conv = task.example(order[row // G])
        assert task.graded[row][0] == conv["messages"][0]["content"]
        prompt = render_for_completion(tok, conv)
        assert inputs[row, :len(prompt)].tolist() == prompt
        assert (targets[row, :len(prompt) - 1] == -1).all()
        assert (targets[row, len(prompt) - 1:len(prompt) - 1 + 1] != -1).all()   # first sampled token
        assert tok.decode([t for t in targets[row] if t != -1]).startswith(task.graded[row][1])
    assert ((weights != 0) == (targets != -1)).all()
    np.testing.assert_allclose(weights.sum(), src.num_micro, rtol=1e-5)          # token_mean over the step

    # the report
    rollouts = [r for k, r in records if k == "rollout"]
    assert len(rollouts) == 1
    rec = rollouts[0]
    assert rec["round"] == 0 and rec["step"] == 0
    assert rec["reward_mean"] == pytest.approx(float(rewards.mean()))
    assert rec["reward_std"] == pytest.approx(float(rewards.std()))
    # no forced tokens here unless a tool ran; sampled tokens == targets per row (nothing truncated)
    assert rec["sampled_len"] == pytest.approx(float((targets != -1).sum(axis=1).mean()))
    py = tok.encode_special("<|python_start|>")
    assert rec["tool_calls"] == pytest.approx(float((targets == py).sum(axis=1).mean()))
    assert rec["sampled_len"] > 0 and rec["tool_calls"] >= 0
    assert 1 <= len(rec["examples"]) <= 3 and {"prompt", "completion", "reward"} <= set(rec["examples"][0])


def test_round_counter_advances_only_on_round_boundaries(engine):
    src, records = make_source(engine, LengthTask(), rl_config())
    assert src.state_dict() == {"round": 0}
    it = iter(src)
    first = [next(it), next(it)]                         # round 0: 2 micro-batches
    assert src.state_dict() == {"round": 1}
    third = next(it)                                     # round 1 begins
    with pytest.raises(RuntimeError, match="round boundary"):
        src.state_dict()
    fourth = next(it)
    assert src.state_dict() == {"round": 2}
    assert [r["round"] for k, r in records if k == "rollout"] == [0, 1]

    # rollouts are a pure function of (params, round): a source resumed at round 1 replays it bitwise
    resumed, _ = make_source(engine, LengthTask(), rl_config(), state={"round": 1})
    assert resumed.state_dict() == {"round": 1}
    again = iter(resumed)
    for want in (third, fourth):
        got = next(again)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert not np.array_equal(first[0]["inputs"], third["inputs"])


def test_updates_per_batch_reuses_the_round(engine):
    calls = []

    def logp_fn(inputs, targets):
        calls.append(inputs.shape)
        return np.zeros(inputs.shape, np.float32)

    src, records = make_source(engine, LengthTask(), rl_config(updates_per_batch=2), logp_fn=logp_fn)
    assert src.micro_per_round == 4
    it = iter(src)
    got = [next(it) for _ in range(3)]
    with pytest.raises(RuntimeError):
        src.state_dict()
    got.append(next(it))
    assert src.state_dict() == {"round": 1}
    assert len(calls) == 2                                 # old_logp computed once per micro-batch per round
    for a, b in ((got[0], got[2]), (got[1], got[3])):    # the second update sees the same rows
        assert a["old_logp"].shape == a["inputs"].shape
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert len([r for k, r in records if k == "rollout"]) == 1


def test_prompt_indices_cover_an_epoch_and_split_over_processes():
    task = LengthTask(n=12)
    rl = rl_config(prompts_per_step=4)
    sources = [RolloutSource(None, task, rl, seed=3, row_len=MAX_LEN, rows_per_micro=4,
                             process_index=p, process_count=2) for p in range(2)]
    assert all(s.local_prompts == 2 for s in sources)
    rounds_per_epoch = 12 // 4
    epoch = []
    for r in range(rounds_per_epoch):
        a, b = (s.prompt_indices(r) for s in sources)
        assert len(a) == len(b) == 2 and not set(a) & set(b)       # disjoint across processes
        epoch += a + b
    assert sorted(epoch) == list(range(12))                         # every prompt once per epoch
    assert epoch != list(range(12))                                 # shuffled
    nxt = []
    for r in range(rounds_per_epoch, 2 * rounds_per_epoch):
        nxt += sources[0].prompt_indices(r) + sources[1].prompt_indices(r)
    assert sorted(nxt) == list(range(12)) and nxt != epoch          # a fresh permutation each epoch
    # one process alone walks the same global order
    single = RolloutSource(None, task, rl, seed=3, row_len=MAX_LEN, rows_per_micro=4)
    assert [i for r in range(rounds_per_epoch) for i in single.prompt_indices(r)] == epoch
    # deterministic: a new source (e.g. after a restart) gives the same indices
    again = RolloutSource(None, task, rl, seed=3, row_len=MAX_LEN, rows_per_micro=4, process_index=1,
                          process_count=2)
    assert again.prompt_indices(4) == sources[1].prompt_indices(4)


def test_prompt_indices_across_an_epoch_boundary():
    task = LengthTask(n=5)
    src = RolloutSource(None, task, rl_config(prompts_per_step=2), seed=0, row_len=MAX_LEN, rows_per_micro=4)
    flat = [i for r in range(5) for i in src.prompt_indices(r)]     # 10 prompts = 2 epochs of 5
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:]) == list(range(5))


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="micro-batches"):
        RolloutSource(None, LengthTask(), rl_config(prompts_per_step=3), seed=0, row_len=MAX_LEN, rows_per_micro=4)
    with pytest.raises(ValueError, match="processes"):
        RolloutSource(None, LengthTask(), rl_config(prompts_per_step=3), seed=0, row_len=MAX_LEN, rows_per_micro=2,
                      process_count=2)
