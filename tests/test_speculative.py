"""flaxchat.speculative: greedy speculative decoding reproduces the target's own greedy tokens exactly,
whether the draft disagrees often (a different random model) or never (the target itself); sampling
is seeded and keeps the target's distribution (checked on the first token's histogram)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxchat.engine import Engine
from flaxchat.model import gpt_forward
from flaxchat.sampling import token_probs
from tiny_models import MAX_LEN, TinyModel, tiny_tokenizer

@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(with_sums=False)


@pytest.fixture(scope="module")
def target(tok):
    return TinyModel(tok.vocab_size, resid_jitter=False, seed=0)


@pytest.fixture(scope="module")
def plain(tok, target):
    return Engine(target, tok, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def spec3(tok, target):
    """Target with a shallower, differently seeded draft: it disagrees often."""
    return Engine(target, tok, max_len=MAX_LEN, draft=TinyModel(tok.vocab_size, resid_jitter=False, depth=1, seed=7), spec_k=3)


def prompts_of(tok):
    bos = tok.bos_token_id
    return [[bos] + tok.encode("the cat sat on the mat"), [bos] + tok.encode("a dog"), [bos]]


GREEDY = dict(max_tokens=20, temperature=0.0, stop_tokens=[], use_tools=False)


def test_greedy_with_disagreeing_draft_equals_target_greedy(tok, plain, spec3):
    spec = spec3
    prompts = prompts_of(tok)
    want = [r[0].tokens for r in plain.generate(prompts, **GREEDY)]
    got = [r[0].tokens for r in spec.generate(prompts, **GREEDY)]
    assert got == want
    # rejections really happened: far more target forwards than 20 tokens / (k+1) per forward
    assert spec._speculative.last_target_forwards > 20 / 4 + 3
    spec.generate(prompts[::-1], **GREEDY)
    assert spec.compile_count == 1


def test_target_as_its_own_draft_accepts_everything(tok, target, plain):
    spec = Engine(target, tok, max_len=MAX_LEN, draft=target, spec_k=4)
    prompt = prompts_of(tok)[:1]
    want = plain.generate(prompt, **GREEDY)[0][0].tokens
    got = spec.generate(prompt, **GREEDY)[0][0]
    assert got.tokens == want and got.forced == [0] * 20
    assert spec._speculative.last_target_forwards == 4          # 5 tokens per forward, 20 tokens


def test_stop_token_and_tool_refusal(tok, plain, spec3):
    spec = spec3
    prompts = prompts_of(tok)
    free = [r[0].tokens for r in plain.generate(prompts, **GREEDY)]
    stop = free[0][5]
    kw = dict(GREEDY, stop_tokens=[stop])
    assert [r[0].tokens for r in spec.generate(prompts, **kw)] == [r[0].tokens for r in plain.generate(prompts, **kw)]
    with pytest.raises(ValueError, match="use_tools"):
        spec.generate(prompts, max_tokens=4)


def test_sampling_seeded_and_first_token_follows_target(tok, target):
    draft = TinyModel(tok.vocab_size, resid_jitter=False, depth=1, seed=5)
    spec = Engine(target, tok, max_len=16, draft=draft, spec_k=2)
    prompt = [tok.bos_token_id] + tok.encode("the cat")
    kw = dict(num_samples=256, max_tokens=1, temperature=1.0, top_k=6, stop_tokens=[], use_tools=False)
    first = np.array([c.tokens[0] for c in spec.generate([prompt], seed=1, **kw)[0]])
    again = np.array([c.tokens[0] for c in spec.generate([prompt], seed=1, **kw)[0]])
    assert np.array_equal(first, again)
    settings = (jnp.float32(1.0), jnp.int32(6), jnp.float32(1.0))
    forward = jax.jit(gpt_forward, static_argnums=1)
    logits_t = forward(target.params, target.spec, jnp.asarray([prompt]))[0, -1]
    logits_d = forward(draft.params, draft.spec, jnp.asarray([prompt]))[0, -1]
    p = np.asarray(token_probs(logits_t[None], *settings))[0]
    q = np.asarray(token_probs(logits_d[None], *settings))[0]
    empirical = np.bincount(first, minlength=p.size) / first.size
    tv_target, tv_draft = 0.5 * np.abs(empirical - p).sum(), 0.5 * np.abs(empirical - q).sum()
    assert 0.5 * np.abs(p - q).sum() > 0.3            # the draft really proposes something else
    assert tv_target < 0.15 and tv_draft > 0.25
