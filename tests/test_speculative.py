"""flaxchat.inference.speculative: greedy speculative decoding reproduces the target's own greedy tokens exactly,
whether the draft disagrees often (a different random model) or never (the target itself), tool calls
and their forced outputs included (compared with the plain engine on the same steered rows); sampling
is seeded and keeps the target's distribution (checked on the first token's histogram)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxchat.inference.engine import Engine
from flaxchat.model.gpt import gpt_forward
from flaxchat.inference.sampling import token_probs
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
    cut = spec.generate(prompt, **dict(GREEDY, max_tokens=18))[0][0].tokens   # budget ends mid-iteration
    assert cut == want[:18] and spec._speculative.last_target_forwards == 4


@pytest.mark.parametrize("draft_kind", ["self", "other"])
def test_filling_max_len_matches_the_plain_engine(tok, target, plain, draft_kind):
    """Prompt + output may fill max_len exactly, as in the plain engine, even though the k+1-token
    forwards overrun the cache near its end (those writes are dropped, their logits unused)."""
    draft = target if draft_kind == "self" else TinyModel(tok.vocab_size, resid_jitter=False, depth=1, seed=7)
    spec = Engine(target, tok, max_len=MAX_LEN, draft=draft, spec_k=4)
    long = prompts_of(tok)[0] * 20
    prompt = long[:MAX_LEN - 7]
    want = [c[0].tokens for c in plain.generate([prompt, long[:MAX_LEN - 1]], **dict(GREEDY, max_tokens=50))]
    got = [c[0].tokens for c in spec.generate([prompt, long[:MAX_LEN - 1]], **dict(GREEDY, max_tokens=50))]
    assert got == want and [len(t) for t in got] == [7, 1]
    assert list(spec.stream(prompt, **dict(GREEDY, max_tokens=50))) == want[0]


def test_stop_token(tok, plain, spec3):
    prompts = prompts_of(tok)
    free = [r[0].tokens for r in plain.generate(prompts, **GREEDY)]
    kw = dict(GREEDY, stop_tokens=[free[0][5]])
    assert [r[0].tokens for r in spec3.generate(prompts, **kw)] == [r[0].tokens for r in plain.generate(prompts, **kw)]


def special(tok, name):
    return tok.encode_special(name)


def both(plain, spec, prompts, **kw):
    """(plain, speculative) completions of the same greedy request, as (tokens, forced) pairs."""
    kw = dict(dict(max_tokens=20, temperature=0.0, stop_tokens=[]), **kw)
    return ([(c[0].tokens, c[0].forced) for c in plain.generate(prompts, **kw)],
            [(c[0].tokens, c[0].forced) for c in spec.generate(prompts, **kw)])


@pytest.mark.parametrize("k", [1, 3])
def test_tool_calls_match_the_plain_engine(tok, target, plain, k):
    """A row that calls the calculator mid-generation, a row whose prompt ends with a closed block,
    and a row that never calls a tool: same tokens and forced masks as the plain engine, with a
    draft that agrees (self-draft: forced output spans iterations) or disagrees."""
    ps, pe = special(tok, "<|python_start|>"), special(tok, "<|python_end|>")
    os_, oe = special(tok, "<|output_start|>"), special(tok, "<|output_end|>")
    prompts = prompts_of(tok)
    prompts[2] = [tok.bos_token_id, ps] + tok.encode("1+2") + [pe]
    free = [c[0].tokens for c in plain.generate(prompts[:1], max_tokens=3, temperature=0.0, stop_tokens=[])]
    steer = [free[0][:3] + [ps] + tok.encode("6*7") + [pe]]
    n = len(steer[0])
    for draft in (target, TinyModel(tok.vocab_size, resid_jitter=False, depth=1, seed=7)):
        spec = Engine(target, tok, max_len=MAX_LEN, draft=draft, spec_k=k)
        want, got = both(plain, spec, prompts, _steer=steer)
        assert got == want
        tokens, forced = got[0]
        assert tokens[n:n + 4] == [os_] + tok.encode("42") + [oe] and forced[n - 1:n + 5] == [0, 1, 1, 1, 1, 0]
        assert got[2][0][:3] == [os_] + tok.encode("3") + [oe] and got[2][1][:4] == [1, 1, 1, 0]
        assert got[1][1] == [0] * 20


def test_open_block_in_prompt_and_tools_off(tok, target, plain):
    ps, pe = special(tok, "<|python_start|>"), special(tok, "<|python_end|>")
    spec = Engine(target, tok, max_len=MAX_LEN, draft=target, spec_k=4)
    prompt = [tok.bos_token_id, ps] + tok.encode("10+")
    want, got = both(plain, spec, [prompt], _steer=[tok.encode("5") + [pe]], max_tokens=10)
    assert got == want and got[0][0][2:2 + 4] == [special(tok, "<|output_start|>")] + tok.encode("15") + \
        [special(tok, "<|output_end|>")]
    want, got = both(plain, spec, [prompt], _steer=[tok.encode("5") + [pe]], max_tokens=10, use_tools=False)
    assert got == want
    assert spec.compile_counts["speculative"] == 1


def test_walk_cuts_inside_an_iteration(tok):
    """The per-iteration bookkeeping on synthetic emissions: a stop token, a closing python_end and
    the token budget each end emission *before* the last accepted token; python state carries."""
    from types import SimpleNamespace

    from flaxchat.inference.engine import Settings
    from flaxchat.inference.speculative import _walk

    ps, pe = special(tok, "<|python_start|>"), special(tok, "<|python_end|>")
    S = 7                                                             # the stop token
    emitted = jnp.asarray([[1, S, 2, 3, 4],          # stop at j=1
                           [ps, 5, pe, 6, 7],        # opens and closes a block: tool call after j=2
                           [1, 2, 3, 4, 5],          # budget: 2 tokens left
                           [5, pe, 6, 7, 8],         # closes a block opened in an earlier iteration
                           [1, 2, 3, 4, 5]])         # only 2 emitted this iteration (n_emit)
    n_emit = jnp.asarray([5, 5, 5, 5, 2])
    st = SimpleNamespace(done=jnp.zeros(5, bool), in_py=jnp.asarray([False, False, False, True, False]),
                         py_start=jnp.zeros(5, jnp.int32), n_out=jnp.asarray([0, 4, 8, 3, 0]),
                         tcache=SimpleNamespace(pos=jnp.asarray([5, 5, 5, 5, 60]), max_len=64))
    stops = jnp.asarray([S] + [-1] * 7)
    cfg = Settings(jnp.float32(0), jnp.int32(0), jnp.float32(1), jnp.int32(10), stops, jnp.bool_(True))
    count, in_py, py_start, stopped, tool = jax.device_get(_walk(emitted, n_emit, st, tok.special_tokens, cfg))
    assert count.tolist() == [2, 3, 2, 2, 2]
    assert stopped.tolist() == [True, False, False, False, False]
    assert tool.tolist() == [False, True, False, True, False]
    assert in_py.tolist() == [False, False, False, False, False] and py_start[1] == 5
    st.tcache.pos = jnp.asarray([5, 5, 5, 5, 61])                    # row 4: prompt + output hits max_len
    count = jax.device_get(_walk(emitted, n_emit, st, tok.special_tokens, cfg))[0]
    assert count[4] == 2 and jax.device_get(_walk(emitted, n_emit, st, tok.special_tokens,
                                                  cfg._replace(max_tokens=jnp.int32(99))))[0][4] == 2
    st.tcache.pos = jnp.asarray([5, 5, 5, 5, 62])
    assert jax.device_get(_walk(emitted, n_emit, st, tok.special_tokens, cfg))[0][4] == 1
    tools_off = jax.device_get(_walk(emitted, n_emit, st, tok.special_tokens, cfg._replace(use_tools=jnp.bool_(False))))
    assert tools_off[0][1] == 5 and not tools_off[4].any() and not tools_off[1].any()   # blocks still close


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
    other = np.array([c.tokens[0] for c in spec.generate([prompt], seed=2, **kw)[0]])
    assert not np.array_equal(first, other)


def test_sampling_joint_of_three_tokens_follows_target(tok, target):
    """Acceptance at later positions, the residual after a rejection and the bonus token after full
    acceptance: the joint law of 3 sampled tokens (top-k 3: 27 outcomes) is the target's own."""
    draft = TinyModel(tok.vocab_size, resid_jitter=False, depth=1, seed=5)
    spec = Engine(target, tok, max_len=16, draft=draft, spec_k=2)
    prompt = [tok.bos_token_id] + tok.encode("the cat")
    kw = dict(num_samples=1024, max_tokens=3, temperature=1.0, top_k=3, stop_tokens=[], use_tools=False)
    seqs = [tuple(c.tokens) for c in spec.generate([prompt], seed=3, **kw)[0]]
    settings = (jnp.float32(1.0), jnp.int32(3), jnp.float32(1.0))
    forward = jax.jit(gpt_forward, static_argnums=1)

    def joint(model):
        """Exact law of 3 tokens under `model`: {sequence: probability}, by enumerating the top-3 tree."""
        law = {(): 1.0}
        for _ in range(3):
            nxt = {}
            for seq, pr in law.items():
                logits = forward(model.params, model.spec, jnp.asarray([prompt + list(seq)]))[0, -1]
                probs = np.asarray(token_probs(logits[None], *settings))[0]
                for t in np.flatnonzero(probs > 0):
                    nxt[seq + (int(t),)] = pr * float(probs[t])
            law = nxt
        return law

    p, q = joint(target), joint(draft)
    counts = {s_: seqs.count(s_) / len(seqs) for s_ in set(seqs)}
    tv = lambda law: 0.5 * sum(abs(counts.get(s_, 0.0) - law.get(s_, 0.0)) for s_ in set(law) | set(counts))
    assert 0.5 * sum(abs(p.get(s_, 0) - q.get(s_, 0)) for s_ in set(p) | set(q)) > 0.3
    assert tv(p) < 0.1 and tv(q) > 0.25


def test_stream_yields_what_generate_returns(tok, target, plain):
    """Engine.stream with a draft: one speculative iteration per call, tool output included; the
    same tokens as generate and as the plain engine's stream; compiled once."""
    ps, pe = special(tok, "<|python_start|>"), special(tok, "<|python_end|>")
    spec = Engine(target, tok, max_len=MAX_LEN, draft=TinyModel(tok.vocab_size, resid_jitter=False, depth=1, seed=7),
                  spec_k=3)
    kw = dict(max_tokens=12, temperature=0.0, stop_tokens=[])
    for prompt in (prompts_of(tok)[0], [tok.bos_token_id, ps] + tok.encode("2+2") + [pe]):
        streamed = list(spec.stream(prompt, **kw))
        assert streamed == spec.generate([prompt], **kw)[0][0].tokens == list(plain.stream(prompt, **kw))
    stop = streamed[4]
    assert list(spec.stream(prompt, **dict(kw, stop_tokens=[stop]))) == streamed[:streamed.index(stop) + 1]
    assert spec.compile_counts["spec_step"] == 1
